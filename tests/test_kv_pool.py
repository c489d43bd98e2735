"""The page pool behind batched attention: gathered attention equals each row's own attention, pages are
shared, returned and never handed out twice, growth waits for running steps, sizes pad to buckets."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from tolerances import ONE_OP, SOLVE

from token2wav.masks import make_chunk_mask
from token2wav.models.buckets import ShapeBuckets
from token2wav.models.kv_pool import KVPool, PageTable, PooledRows, PoolExhaustedError, pooled_attention

HEADS, WIDTH = 4, 8


def _pool(**kwargs) -> KVPool:
    return KVPool(steps=2, layers=3, heads=HEADS, dim_head=WIDTH, page_frames=5, **kwargs)


def _cache(frames: int, seed: int):
    """A tensor cache as the estimators keep it: per (step, layer) keys/values [2, H, frames, d]."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, HEADS, frames, WIDTH)
    kv = {(s, layer): (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
          for s in range(2) for layer in range(3)}  # fmt: skip
    return kv, (lambda s, layer: kv[(s, layer)])


def _projection(frames: int, seed: int) -> torch.Tensor:
    # [2, S, H, d] viewed as [2, H, S, d], the layout the estimators' projections have
    return torch.randn(2, frames, HEADS, WIDTH, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)


def _rows_attention(pool, tables, pasts, news, chunks, seed, padded=None, step=1, layer=2):
    # each row's frames drawn from its own seed: a row's inputs do not depend on the other rows
    q, k, v = (torch.cat([_projection(n, seed + 10 * r + i) for r, n in enumerate(news)], dim=2) for i in range(3))
    for table, o, n in zip(tables, pasts, news):
        table.reserve(o + n)
    sizes = padded or (len(tables), max(news), max(o + n for o, n in zip(pasts, news)))
    rows = PooledRows.build(pool, tables, pasts, news, chunks, rows=sizes[0], queries=sizes[1], keys=sizes[2])
    with pool.reading():
        out = pooled_attention(q, k, v, rows, step, layer)
    return q, k, v, out


def test_gathered_attention_equals_each_rows_own():
    pool = _pool(pages=3)  # small: it grows while tables adopt and reserve
    pasts, news, chunks = [0, 20, 7, 50], [13, 5, 30, 1], [10, 10, 0, 25]
    tables = [PageTable(pool) for _ in pasts]
    caches = []
    for i, (table, frames) in enumerate(zip(tables, pasts)):
        kv, step_layers = _cache(frames, seed=i)
        table.adopt(object(), frames, step_layers)
        caches.append(kv)
    q, k, v, out = _rows_attention(pool, tables, pasts, news, chunks, seed=9, padded=(8, 32, 128))
    start = 0
    for kv, o, n, chunk in zip(caches, pasts, news, chunks):
        span = slice(start, start + n)
        past_k, past_v = kv[(1, 2)]
        keys = torch.cat([past_k, k[:, :, span]], dim=2)
        values = torch.cat([past_v, v[:, :, span]], dim=2)
        mask = make_chunk_mask(n, chunk, -1, offset=o) if chunk > 0 else None
        want = F.scaled_dot_product_attention(q[:, :, span], keys, values, attn_mask=mask)
        # gathered vs direct attention: one softmax-weighted sum over <= 80 keys, re-associated (ONE_OP)
        torch.testing.assert_close(out[:, :, span], want, atol=ONE_OP, rtol=0)
        start += n
    assert pool.grown >= 1


def test_a_row_does_not_depend_on_its_neighbours_within_one_padded_size():
    pool = _pool(pages=64)
    a, b, c = PageTable(pool), PageTable(pool), PageTable(pool)
    for table, frames, seed in ((a, 30, 1), (b, 12, 2), (c, 41, 3)):
        table.adopt(object(), frames, _cache(frames, seed)[1])
    padded = (4, 16, 64)
    _, _, _, with_b = _rows_attention(pool, [a, b], [30, 12], [10, 16], [10, 10], seed=5, padded=padded)
    _, _, _, with_c = _rows_attention(pool, [a, c], [30, 41], [10, 3], [10, 10], seed=5, padded=padded)
    assert not torch.equal(with_b[:, :, 10:13], with_c[:, :, 10:13])
    # row a: same inputs in the same padded shapes, so the same kernels: bit for bit
    assert torch.equal(with_b[:, :, :10], with_c[:, :, :10])


def test_a_prompts_full_pages_are_shared_and_every_page_comes_back():
    pool = _pool(pages=32)
    free = pool.pages_free
    prompt = object()
    kv, step_layers = _cache(23, seed=4)  # 4 full pages of 5 frames and 3 frames more
    first, second = PageTable(pool), PageTable(pool)
    first.adopt(prompt, 23, step_layers)
    second.adopt(prompt, 23, step_layers)
    assert first.pages[:4] == second.pages[:4] and first.pages[4] != second.pages[4]
    assert pool.pages_free == free - 6  # 4 shared + one own page each
    with pool.reading():  # every frame landed where the table says (copies: atol=0)
        slots = second.slots(0, 23)
        keys, values = pool.planes(1, 2)
        torch.testing.assert_close(keys.index_select(1, slots), kv[(1, 2)][0].transpose(1, 2), atol=0, rtol=0)
        torch.testing.assert_close(values.index_select(1, slots), kv[(1, 2)][1].transpose(1, 2), atol=0, rtol=0)
    first.release()
    assert pool.pages_free == free - 5  # the shared pages stay while the second table holds them
    second.release()
    assert pool.pages_free == free and not pool._prefixes
    with pytest.raises(ValueError, match="is not held"):
        pool.release([3])
    with pytest.raises(ValueError, match="is not held"):
        pool.release([1])  # the padding page is never anyone's


def test_a_full_pool_refuses_all_or_nothing():
    pool = _pool(pages=5, max_pages=5)  # pages 0 and 1 are reserved: 3 usable
    table = PageTable(pool)
    table.reserve(10)  # 2 pages
    with pytest.raises(PoolExhaustedError, match=r"pool is full: 2 more pages .* 1 free of 3 \(max_pages=5\)"):
        table.reserve(20)
    assert pool.pages_free == 1 and len(table.pages) == 2
    table.release()
    assert pool.pages_free == 3


def test_growth_waits_for_running_steps():
    pool = _pool(pages=3)  # one usable page
    inside, leave = threading.Event(), threading.Event()

    def step() -> None:
        with pool.reading():
            inside.set()
            leave.wait(10)

    reader = threading.Thread(target=step)
    reader.start()
    inside.wait(10)
    grower = threading.Thread(target=lambda: pool.alloc(4))
    grower.start()
    grower.join(0.3)
    assert grower.is_alive() and pool.grown == 0  # the step still holds the old tensors
    leave.set()
    grower.join(10)
    reader.join(10)
    assert pool.grown == 1 and pool.pages_total == 4 and pool.pages_free == 0


def test_buckets_pad_to_few_sizes():
    buckets = ShapeBuckets()
    assert buckets.pad(3, 50, 261) == (4, 64, 384)
    assert buckets.pad(1, 1, 1) == (1, 16, 128)
    assert buckets.pad(5, 100, 1100) == (8, 128, 1536)
    assert buckets.pad(65, 129, 4097) == (128, 256, 6144)  # beyond the largest: multiples
    # a 10-minute stream (30,000 frames at 50 frames/s) meets few key sizes
    assert len({buckets.pad(1, 50, k)[2] for k in range(50, 30_001, 50)}) == 23
    with pytest.raises(ValueError, match="rows must be increasing positive sizes"):
        ShapeBuckets(rows=(4, 2))
    with pytest.raises(ValueError, match="keys_multiple must be >= 1"):
        ShapeBuckets(keys_multiple=0)


def test_fixed_shape_solver_keeps_a_bounded_number_of_shapes():
    """The least recently used shapes are dropped beyond max_shapes; the rows stay exact (vs the packed path)."""
    from conftest import DATA

    from token2wav.loading import load_flow
    from token2wav.models.padded_solve import PaddedSolver

    flow = load_flow(DATA / "cv3_config.yaml", DATA / "cv3_flow_state.safetensors")
    est = flow.decoder.estimator
    layers, heads, width = est.kv_layout()
    pool = KVPool(steps=10, layers=layers, heads=heads, dim_head=width)
    solver = PaddedSolver(flow.decoder, pool, buckets=ShapeBuckets(), graphs=False, max_shapes=2)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 192, generator=g)
    for n_rows, tokens in ((1, 60), (2, 60), (3, 60), (1, 60)):  # 114 new frames each: shapes (R, 128, 128)
        start = flow.stream_start(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), emb)
        toks = [torch.randint(0, 512, (1, tokens), generator=g) for _ in range(n_rows)]  # the fixture vocabulary
        tables = [PageTable(pool) for _ in range(n_rows)]
        with torch.inference_mode():
            alone = [flow.stream_step(start, t, finalize=False)[0] for t in toks]
            padded = flow.stream_step_rows([start] * n_rows, toks, finalize=[False] * n_rows,
                                           lookahead=[None] * n_rows, tables=tables, padded=solver)  # fmt: skip
        for a, (b, _) in zip(alone, padded):
            # a flow solve on padded rows vs the row alone: other GEMM shapes re-associate its sums (SOLVE)
            assert a.shape == b.shape and float((a - b).abs().max()) <= SOLVE
        assert len(solver.shapes()) <= 2
        for table in tables:
            table.release()
    assert solver.shapes() == [(1, 128, 128), (4, 128, 128)]  # (2, ...) was the least recently used


def test_a_lone_row_on_consecutive_pages_attends_in_place():
    """One unpadded row whose pages follow each other reads its keys as a view of the pool (no gather); its
    result is the direct attention over its own keys, as for gathered rows."""
    pool = _pool(pages=40)
    table = PageTable(pool)
    kv, step_layers = _cache(23, seed=3)
    table.adopt(object(), 23, step_layers)  # 4 full pages shared, the rest copied into the table's own page
    q, k, v, out = _rows_attention(pool, [table], [23], [12], [10], seed=5)
    assert table.pages == list(range(table.pages[0], table.pages[0] + len(table.pages)))
    rows = PooledRows.build(pool, [table], [23], [12], [10], rows=1, queries=12, keys=35)
    assert rows.read_run == (table.pages[0] * pool.page_frames, 35)
    past_k, past_v = kv[(1, 2)]
    want = F.scaled_dot_product_attention(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2),
                                          attn_mask=make_chunk_mask(12, 10, -1, offset=23))
    # the same attention over a view of the pool instead of a gathered copy: ONE_OP, as above
    torch.testing.assert_close(out, want, atol=ONE_OP, rtol=0)
    # padded sizes (graph replay) and rows of several streams keep the gather
    assert PooledRows.build(pool, [table], [23], [12], [10], rows=1, queries=12, keys=40).read_run is None
    other = PageTable(pool)
    other.reserve(10)
    assert PooledRows.build(pool, [table, other], [23, 0], [12, 10], [10, 10], rows=2, queries=12,
                            keys=35).read_run is None
    # a lone row keeps its frames in place (no gathers); its frames span two attention chunks, so it keeps a mask
    assert (rows.query_index, rows.out_index) == (None, None) and rows.mask is not None


def test_a_lone_row_inside_one_attention_chunk_needs_no_mask():
    """Every query of a lone row whose new frames lie in one attention chunk sees every key: the call has no
    mask (adding zeros changes nothing) and the result is the direct attention, as with a mask."""
    pool = _pool(pages=40)
    table = PageTable(pool)
    kv, step_layers = _cache(20, seed=4)
    table.adopt(object(), 20, step_layers)
    q, k, v, out = _rows_attention(pool, [table], [20], [10], [10], seed=6)  # frames [20, 30): one chunk of 10
    rows = PooledRows.build(pool, [table], [20], [10], [10], rows=1, queries=10, keys=30)
    assert rows.mask is None and rows.query_index is None and rows.out_index is None
    past_k, past_v = kv[(1, 2)]
    want = F.scaled_dot_product_attention(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
    torch.testing.assert_close(out, want, atol=ONE_OP, rtol=0)  # ONE_OP, as above
    # with the next chunk's first frame in the call, the mask comes back
    assert PooledRows.build(pool, [table], [20], [10], [9], rows=1, queries=10, keys=30).mask is not None


def test_pages_go_lowest_first_and_a_table_grows_onto_the_pages_after_its_own():
    pool = _pool(pages=20)
    a, b, c = PageTable(pool), PageTable(pool), PageTable(pool)
    for table in (a, b, c):
        table.reserve(5)  # one page each
    assert (a.pages, b.pages, c.pages) == ([2], [3], [4])
    b.release()  # free: 3, 5, 6, ...
    c.reserve(10)
    assert c.pages == [4, 5]  # the page after its own, not the lowest free one (3)
    a.reserve(15)
    assert a.pages == [2, 3, 6]  # pages 3 and 4 are not both free (4 is c's): the lowest free ones
    d = PageTable(pool)
    d.reserve(10)
    assert d.pages == [7, 8]
