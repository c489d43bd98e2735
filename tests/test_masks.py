import pytest
import torch

from token2wav.masks import add_chunk_mask, fill_empty_rows, make_chunk_mask, make_pad_mask


def _chunk_mask_loop(size: int, chunk: int, left: int) -> torch.Tensor:
    # straightforward per-row definition to compare the vectorised one against
    out = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        start = 0 if left < 0 else max((i // chunk - left) * chunk, 0)
        out[i, start : min((i // chunk + 1) * chunk, size)] = True
    return out


def test_make_pad_mask():
    got = make_pad_mask(torch.tensor([5, 3, 2]))
    want = torch.tensor(
        [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)
    assert make_pad_mask(torch.tensor([2]), max_len=4).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="lengths"):
        make_pad_mask(torch.tensor([[1]]))


@pytest.mark.parametrize("size,chunk,left", [(7, 2, -1), (10, 3, -1), (10, 3, 1), (12, 4, 0), (5, 8, -1)])
def test_chunk_mask_matches_loop(size, chunk, left):
    assert torch.equal(make_chunk_mask(size, chunk, left), _chunk_mask_loop(size, chunk, left))


@pytest.mark.parametrize("offset,size,chunk,left", [(4, 6, 4, -1), (6, 5, 4, -1), (3, 9, 2, 1), (10, 1, 5, -1)])
def test_chunk_mask_offset_rows_are_rows_of_full_mask(offset, size, chunk, left):
    full = make_chunk_mask(offset + size, chunk, left)
    part = make_chunk_mask(size, chunk, left, offset=offset)
    assert part.shape == (size, offset + size)
    assert torch.equal(part, full[offset:])


def test_chunk_mask_full_attention_when_no_chunk():
    assert make_chunk_mask(3, 0, offset=2).all()
    assert make_chunk_mask(3, 0, offset=2).shape == (3, 5)


def test_fill_empty_rows_copies():
    mask = torch.tensor([[True, False], [False, False]])
    out = fill_empty_rows(mask)
    assert out.tolist() == [[True, False], [True, True]]
    assert mask.tolist() == [[True, False], [False, False]]  # input untouched


def test_add_chunk_mask_combines_padding():
    valid = ~make_pad_mask(torch.tensor([5, 3]), 5).unsqueeze(1)
    mask = add_chunk_mask(valid, 2)
    assert mask.shape == (2, 5, 5)
    assert torch.equal(mask[0], _chunk_mask_loop(5, 2, -1))
    # item 1: keys 3, 4 are padding; every row still attends to something
    assert not mask[1, :, 3:].any()
    assert mask[1].any(dim=-1).all()
    no_chunk = add_chunk_mask(valid, 0)
    assert torch.equal(no_chunk, valid)
    # a row with no valid key at all becomes all-true, like the reference
    empty = add_chunk_mask(torch.zeros(1, 1, 3, dtype=torch.bool), 2)
    assert empty.all()
