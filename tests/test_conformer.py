"""UpsampleConformerEncoder (CosyVoice 2 flow encoder): construction, masks, and cached chunk decoding.

End-to-end parity with the reference goes through the flow (tests/test_flow_cv2.py); here the weights are the
fixture's encoder weights and the oracle for chunked decoding is our own whole-sequence ``forward``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerances import NETWORK, ONE_OP

from token2wav.models.conformer import (
    ConformerCache,
    UpsampleConformerEncoder,
    _rel_shift,
    relative_position_table,
)

DATA = Path(__file__).resolve().parent / "data"
# our chunked decode vs our whole-sequence decode: one encoder pass on other sequence lengths (FIXTURES.md: 1e-5)
STREAM_TOL = NETWORK

# The encoder block of tests/data/cv2_config.yaml.
ENCODER_KWARGS = {
    "output_size": 512,
    "attention_heads": 8,
    "linear_units": 16,
    "num_blocks": 1,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "normalize_before": True,
    "input_layer": "linear",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "input_size": 512,
    "use_cnn_module": False,
    "macaron_style": False,
    "static_chunk_size": 25,
}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    state = load_file(DATA / "cv2_flow_state.safetensors")
    return {k[len("encoder."):]: v.float() for k, v in state.items() if k.startswith("encoder.")}


def make_encoder(weights: dict[str, torch.Tensor], **overrides) -> UpsampleConformerEncoder:
    encoder = UpsampleConformerEncoder(**{**ENCODER_KWARGS, **overrides})
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval()


@pytest.fixture(scope="module")
def encoder(weights) -> UpsampleConformerEncoder:
    return make_encoder(weights)


@pytest.fixture(scope="module")
def small_chunk_encoder(weights) -> UpsampleConformerEncoder:
    # same weights, 4-token chunks: many chunk boundaries with few tokens
    return make_encoder(weights, static_chunk_size=4)


def features(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, 512, generator=gen)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def offline(encoder, xs: torch.Tensor, n: int, *, final: bool) -> torch.Tensor:
    """Reference-style whole-prefix run: tokens [0, n), plus the 3 lookahead tokens when not final."""
    if final:
        out, _ = encoder(xs[:, :n], torch.tensor([n]), streaming=True)
    else:
        out, _ = encoder(xs[:, :n], torch.tensor([n + 3]), context=xs[:, n : n + 3], streaming=True)
    return out


def run_chunks(
    encoder, xs: torch.Tensor, splits: list[int], cache: ConformerCache | None = None, start: int = 0
):
    """Feed tokens [start, start + sum(splits)) in pieces; the last piece closes the sequence."""
    outs, pos = [], start
    for j, n in enumerate(splits):
        final = j == len(splits) - 1
        ctx = None if final else xs[:, pos + n : pos + n + 3]
        h, cache = encoder.forward_chunk(xs[:, pos : pos + n], context=ctx, cache=cache, finalize=final)
        assert h.shape == (xs.shape[0], 2 * n, 512)
        outs.append(h)
        pos += n
    return torch.cat(outs, dim=1), cache


# construction


def test_fixture_weights_load_strictly_and_shapes(encoder):
    assert encoder.output_size() == 512
    assert encoder.up_stride == 2 and encoder.pre_lookahead_len == 3
    xs = features(7, batch=2)
    with torch.inference_mode():
        out, mask = encoder(xs, torch.tensor([7, 5]))
    assert out.shape == (2, 14, 512) and out.dtype == torch.float32
    assert mask.shape == (2, 1, 14) and mask.dtype == torch.bool
    assert mask[0].all() and mask[1, 0, :10].all() and not mask[1, 0, 10:].any()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "override,word",
    [
        ({"output_size": 256}, "output_size"),
        ({"input_size": 80}, "input_size"),
        ({"input_layer": "conv2d"}, "input_layer"),
        ({"pos_enc_layer_type": "rel_pos"}, "pos_enc_layer_type"),
        ({"selfattention_layer_type": "selfattn"}, "selfattention_layer_type"),
        ({"use_cnn_module": True}, "use_cnn_module"),
        ({"activation_type": "snake"}, "activation_type"),
        ({"static_chunk_size": -1}, "static_chunk_size"),
        ({"attention_heads": 7}, "attention_heads"),
    ],
)
def test_inconsistent_config_is_rejected(override, word):
    with pytest.raises(ValueError, match=word):
        UpsampleConformerEncoder(**{**ENCODER_KWARGS, **override})


def test_training_only_kwargs_accepted_and_macaron_builds():
    enc = UpsampleConformerEncoder(
        **{**ENCODER_KWARGS, "macaron_style": True, "num_blocks": 0},
        use_dynamic_chunk=True, use_dynamic_left_chunk=True, gradient_checkpointing=True, causal=True,
        positionwise_conv_kernel_size=3, cnn_module_kernel=7, cnn_module_norm="layer_norm", key_bias=False,
    )  # fmt: skip
    keys = enc.state_dict().keys()
    assert "up_encoders.0.feed_forward_macaron.w_1.weight" in keys
    assert "up_encoders.0.norm_ff_macaron.weight" in keys
    assert "up_encoders.0.self_attn.linear_k.bias" not in keys
    with torch.inference_mode():
        out, _ = enc.eval()(features(5), torch.tensor([5]))
    assert out.shape == (1, 10, 512)


# building blocks


def test_position_table_is_the_espnet_sinusoid():
    table = relative_position_table(3, -2, 8)
    assert table.shape == (1, 6, 8)
    for row, rel in enumerate([3, 2, 1, 0, -1, -2]):
        for i in range(4):
            angle = rel * math.exp(-(2 * i) * math.log(10000.0) / 8)
            # float32 angle (|x| <= 3) and sin/cos, against float64: one op's rounding, a few 1e-7
            assert table[0, row, 2 * i].item() == pytest.approx(math.sin(angle), abs=ONE_OP)
            assert table[0, row, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=ONE_OP)


@pytest.mark.parametrize("t1,t2", [(1, 1), (4, 4), (3, 7), (1, 5)])
def test_rel_shift_selects_the_distance_of_each_pair(t1, t2):
    width = t2 + t1 - 1
    scores = torch.randn(2, 3, t1, width)
    shifted = _rel_shift(scores, t2)
    assert shifted.shape == (2, 3, t1, t2)
    for r in range(t1):
        for j in range(t2):
            distance = (t2 - t1 + r) - j  # query position minus key position
            column = (t2 - 1) - distance  # the table runs from distance t2-1 downwards
            assert torch.equal(shifted[:, :, r, j], scores[:, :, r, column])  # a shift only moves values


# offline behaviour


def test_deterministic(encoder):
    xs = features(30, seed=1)
    with torch.inference_mode():
        a, _ = encoder(xs, torch.tensor([30]), streaming=True)
        b, _ = encoder(xs, torch.tensor([30]), streaming=True)
    assert torch.equal(a, b)  # the same call twice: same kernels, same shapes


def test_chunk_mask_limits_what_earlier_frames_see(small_chunk_encoder):
    enc = small_chunk_encoder  # 4-token chunks
    xs = features(16, seed=2)
    changed = xs.clone()
    changed[:, 11:] += 1.0  # tokens from 11 on; token 7's lookahead reaches token 10, chunk [4, 8) ends at 8
    with torch.inference_mode():
        a, _ = enc(xs, torch.tensor([16]), streaming=True)
        b, _ = enc(changed, torch.tensor([16]), streaming=True)
        full_a, _ = enc(xs, torch.tensor([16]), streaming=False)
        full_b, _ = enc(changed, torch.tensor([16]), streaming=False)
    # output frames of tokens 0..7: the same shapes, the changed frames only behind the mask, so at most one op's
    # rounding (ONE_OP); a leak through the mask moves them by > 1e-3
    assert maxdiff(a[:, :16], b[:, :16]) <= ONE_OP
    assert maxdiff(a[:, 16:], b[:, 16:]) > 1e-3
    assert maxdiff(full_a[:, :16], full_b[:, :16]) > 1e-3  # full attention sees the future


def test_context_is_the_lookahead_of_the_last_tokens(encoder):
    xs = features(13, seed=3)
    with torch.inference_mode():
        whole, _ = encoder(xs, torch.tensor([13]), streaming=True)
        with_ctx, _ = encoder(xs[:, :10], torch.tensor([13]), context=xs[:, 10:], streaming=True)
        no_ctx, _ = encoder(xs[:, :10], torch.tensor([10]), streaming=True)
    assert with_ctx.shape == no_ctx.shape == (1, 20, 512)
    # the last 3 tokens' lookahead is the context instead of zeros: their frames change
    assert maxdiff(with_ctx, no_ctx) > 1e-3
    # the context is not part of the sequence: whole-sequence frames differ from both (longer attention span)
    assert maxdiff(with_ctx, whole[:, :20]) > 1e-6


# cached chunks


@pytest.mark.parametrize("splits", [[25, 25, 10], [50, 10], [60], [25, 35], [10]])
def test_forward_chunk_equals_offline(encoder, splits):
    total = sum(splits)
    xs = features(total + 3, seed=4)
    with torch.inference_mode():
        ref = offline(encoder, xs, total, final=True)
        got, cache = run_chunks(encoder, xs, splits)
    assert maxdiff(got, ref) <= STREAM_TOL
    assert cache.finalized and cache.offset == total


# a final piece holds at least the 3 tokens the previous call used as lookahead
@pytest.mark.parametrize("splits", [[4, 4, 4, 4, 3], [8, 12, 5], [4, 18], [12, 4, 3], [20, 3]])
def test_forward_chunk_equals_offline_small_chunks(small_chunk_encoder, splits):
    enc = small_chunk_encoder
    total = sum(splits)
    xs = features(total + 3, seed=5)
    with torch.inference_mode():
        ref = offline(enc, xs, total, final=True)
        got, _ = run_chunks(enc, xs, splits)
        assert maxdiff(got, ref) <= STREAM_TOL
        # every non-final call also equals the reference's own non-final call on the same prefix
        cache, pos, outs = None, 0, []
        for n in splits[:-1]:
            ctx = xs[:, pos + n : pos + n + 3]
            h, cache = enc.forward_chunk(xs[:, pos : pos + n], context=ctx, cache=cache, finalize=False)
            outs.append(h)
            pos += n
            assert maxdiff(torch.cat(outs, 1), offline(enc, xs, pos, final=False)) <= STREAM_TOL


def test_forward_chunk_batch_of_two(small_chunk_encoder):
    enc = small_chunk_encoder
    xs = features(15, seed=6, batch=2)
    with torch.inference_mode():
        got, _ = run_chunks(enc, xs, [8, 4])
        for b in range(2):
            ref = offline(enc, xs[b : b + 1], 12, final=True)
            assert maxdiff(got[b : b + 1], ref) <= STREAM_TOL


def test_prompt_cache_is_shared_read_only(encoder):
    prompt = features(30, seed=7)
    cont_a = features(20, seed=8)
    cont_b = features(33, seed=9)
    with torch.inference_mode():
        # the prompt's whole chunks whose lookahead lies inside the prompt: 25 tokens, context = prompt[25:28]
        h_prompt, shared = encoder.forward_chunk(prompt[:, :25], context=prompt[:, 25:28], cache=None,
                                                 finalize=False)  # fmt: skip
        snapshot = [t.clone() for t in _tensors(shared)]

        seq_a = torch.cat([prompt, cont_a], dim=1)
        seq_b = torch.cat([prompt, cont_b, features(3, seed=10)], dim=1)
        got_a, _ = run_chunks(encoder, seq_a, [25], cache=shared, start=25)
        got_b, _ = run_chunks(encoder, seq_b, [25, 13], cache=shared, start=25)
        again_a, _ = run_chunks(encoder, seq_a, [25], cache=shared, start=25)

        ref_a = offline(encoder, seq_a, 50, final=True)
        ref_b = offline(encoder, seq_b, 63, final=True)
    assert maxdiff(torch.cat([h_prompt, got_a], 1), ref_a) <= STREAM_TOL
    assert maxdiff(torch.cat([h_prompt, got_b], 1), ref_b) <= STREAM_TOL
    assert torch.equal(got_a, again_a)  # the same calls again on the same shapes
    assert all(torch.equal(a, b) for a, b in zip(snapshot, _tensors(shared)))  # left untouched: a copy compares
    assert shared.offset == 25 and not shared.finalized


def test_forward_chunk_appends_keys_in_place(encoder):
    # The second call's keys go into the room the first call left (both rates): earlier rows are not copied.
    xs = features(60, seed=12)
    with torch.inference_mode():
        _, first = encoder.forward_chunk(xs[:, :25], context=xs[:, 25:28], cache=None, finalize=False)
        _, second = encoder.forward_chunk(xs[:, 25:50], context=xs[:, 50:53], cache=first, finalize=False)
    for k1, k2 in zip(first.keys + first.up_keys, second.keys + second.up_keys):
        assert k2.data_ptr() == k1.data_ptr() and k2.shape[2] == 2 * k1.shape[2]


def _tensors(cache: ConformerCache) -> list[torch.Tensor]:
    return [cache.lookahead_history, cache.context, *cache.keys, *cache.values, cache.up_history,
            *cache.up_keys, *cache.up_values]  # fmt: skip


def test_forward_chunk_errors(small_chunk_encoder):
    enc = small_chunk_encoder
    xs = features(20, seed=11)
    with torch.inference_mode():
        _, off_grid = enc.forward_chunk(xs[:, :6], context=xs[:, 6:9], cache=None, finalize=False)
        with pytest.raises(ValueError, match="grid"):
            enc.forward_chunk(xs[:, 6:10], context=xs[:, 10:13], cache=off_grid, finalize=False)

        _, cache = enc.forward_chunk(xs[:, :4], context=xs[:, 4:7], cache=None, finalize=False)
        with pytest.raises(ValueError, match="context"):
            enc.forward_chunk(xs[:, 4:8], context=None, cache=cache, finalize=False)
        with pytest.raises(ValueError, match="context"):
            enc.forward_chunk(xs[:, 4:8], context=xs[:, 8:10], cache=cache, finalize=False)
        with pytest.raises(ValueError, match="context"):
            enc.forward_chunk(xs[:, 5:9], context=xs[:, 9:12], cache=cache, finalize=False)  # skipped a token
        with pytest.raises(ValueError, match="context"):
            enc.forward_chunk(xs[:, 4:6], context=None, cache=cache, finalize=True)  # lookahead past the end
        with pytest.raises(ValueError, match="context"):
            enc.forward_chunk(xs[:, 4:8], context=xs[:, 8:11], cache=cache, finalize=True)
        with pytest.raises(ValueError, match="batch"):
            enc.forward_chunk(features(4, batch=2), context=features(3, batch=2), cache=cache, finalize=False)
        with pytest.raises(ValueError, match="xs_new"):
            enc.forward_chunk(xs[:, 4:8, :80], context=xs[:, 8:11], cache=cache, finalize=False)

        _, closed = enc.forward_chunk(xs[:, 4:10], context=None, cache=cache, finalize=True)
        with pytest.raises(ValueError, match="finalized"):
            enc.forward_chunk(xs[:, 10:12], context=None, cache=closed, finalize=True)

    no_chunks = UpsampleConformerEncoder(**{**ENCODER_KWARGS, "static_chunk_size": 0})
    with pytest.raises(ValueError, match="static_chunk_size"):
        no_chunks.forward_chunk(xs[:, :4], context=None, cache=None, finalize=True)
