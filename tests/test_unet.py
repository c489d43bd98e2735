"""CausalConditionalDecoder (CosyVoice 2 flow estimator): construction, masks, and cached chunk decoding.

End-to-end parity with the reference goes through the flow (tests/test_flow_cv2.py); here the weights are the
fixture's estimator weights and the oracle for chunked decoding is our own whole-sequence ``forward``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerances import NETWORK, ONE_OP

from token2wav.models.unet import (
    BasicTransformerBlock,
    CausalConditionalDecoder,
    FeedForward,
    SinusoidalPosEmb,
    UNetCache,
)

DATA = Path(__file__).resolve().parent / "data"
# our chunked decode vs our whole-sequence decode: one estimator pass on other sequence lengths (FIXTURES.md: 1e-5)
STREAM_TOL = NETWORK

# The estimator block of tests/data/cv2_config.yaml.
ESTIMATOR_KWARGS = {
    "in_channels": 320,
    "out_channels": 80,
    "channels": [64],
    "dropout": 0.0,
    "attention_head_dim": 16,
    "n_blocks": 1,
    "num_mid_blocks": 2,
    "num_heads": 4,
    "act_fn": "gelu",
    "static_chunk_size": 50,
    "num_decoding_left_chunks": -1,
}


@pytest.fixture(scope="module")
def estimator() -> CausalConditionalDecoder:
    state = load_file(DATA / "cv2_flow_state.safetensors")
    prefix = "decoder.estimator."
    model = CausalConditionalDecoder(**ESTIMATOR_KWARGS)
    model.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)},
                          strict=True)  # fmt: skip
    return model.eval()


def inputs(length: int, batch: int = 2, seed: int = 0):
    """x, mu, t, spks, cond for a guidance-style batch (row 1 has zero conditions, like the solver's)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 80, length, generator=gen)
    mu = torch.randn(batch, 80, length, generator=gen)
    spks = torch.randn(batch, 80, generator=gen)
    cond = torch.randn(batch, 80, length, generator=gen)
    mu[1:], spks[1:], cond[1:] = 0, 0, 0
    t = torch.full((batch,), 0.37)
    return x, mu, t, spks, cond


def offline(est, x, mu, t, spks, cond, chunk_size=None):
    mask = torch.ones(x.shape[0], 1, x.shape[2])
    return est(x, mask, mu, t, spks, cond, streaming=True, chunk_size=chunk_size)


def run_chunks(est, args, splits, cache=None, start=0, chunk_size=None):
    x, mu, t, spks, cond = args
    outs, pos = [], start
    for n in splits:
        sl = slice(pos, pos + n)
        out, cache = est.forward_chunk(x[..., sl], mu[..., sl], t, spks, cond[..., sl], cache=cache,
                                       chunk_size=chunk_size)  # fmt: skip
        assert out.shape == (x.shape[0], 80, n)
        outs.append(out)
        pos += n
    return torch.cat(outs, dim=2), cache


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# construction


def test_fixture_weights_load_strictly_and_shapes(estimator):
    x, mu, t, spks, cond = inputs(30)
    mask = torch.ones(2, 1, 30)
    mask[1, :, 22:] = 0
    with torch.inference_mode():
        out = estimator(x, mask, mu, t, spks, cond)
    assert out.shape == (2, 80, 30) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, :, 22:], torch.zeros(80, 8))  # padded frames are zeroed


@pytest.mark.parametrize(
    "override,word",
    [
        ({"act_fn": "snake"}, "act_fn"),
        ({"channels": []}, "channels"),
        ({"static_chunk_size": -2}, "static_chunk_size"),
        ({"in_channels": 321}, "in_channels"),
    ],
)
def test_inconsistent_config_is_rejected(override, word):
    with pytest.raises(ValueError, match=word):
        CausalConditionalDecoder(**{**ESTIMATOR_KWARGS, **override})


def test_wrong_input_channels_are_rejected(estimator):
    x, mu, t, spks, cond = inputs(10)
    with pytest.raises(ValueError, match="in_channels"):
        estimator(x, torch.ones(2, 1, 10), mu, t, spks, None)


def test_block_options_and_activations():
    with pytest.raises(ValueError, match="cross"):
        BasicTransformerBlock(16, 2, 8, cross_attention_dim=16)
    with pytest.raises(ValueError, match="norm_type"):
        BasicTransformerBlock(16, 2, 8, norm_type="ada_norm", num_embeds_ada_norm=10)
    x = torch.randn(2, 5, 16)
    for act in ("gelu", "gelu-approximate", "geglu", "geglu-approximate"):
        assert FeedForward(16, activation_fn=act)(x).shape == x.shape
    assert FeedForward(16, activation_fn="geglu").net[0].proj.weight.shape == (128, 16)


def test_time_embedding_is_the_sinusoid():
    emb = SinusoidalPosEmb(8)(torch.tensor([0.25, 1.0]))
    assert emb.shape == (2, 8)
    for row, t in enumerate([0.25, 1.0]):
        for i in range(4):
            angle = 1000 * t * math.exp(-i * math.log(10000) / 3)
            # float32 angles up to 1000 rad: each op rounds the angle by up to EPS32 * 1000 / 2 = 6e-5 rad, and
            # sin / cos move by as much
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=2e-4)
            assert emb[row, 4 + i].item() == pytest.approx(math.cos(angle), abs=2e-4)


def test_multi_level_unet_runs_offline_but_not_in_chunks():
    torch.manual_seed(0)
    est = CausalConditionalDecoder(**{**ESTIMATOR_KWARGS, "channels": [32, 48]}).eval()
    keys = est.state_dict().keys()
    assert "down_blocks.0.2.conv.weight" in keys and "up_blocks.0.2.conv.weight" in keys
    x, mu, t, spks, cond = inputs(24)
    with torch.inference_mode():
        for streaming in (False, True):
            out = est(x, torch.ones(2, 1, 24), mu, t, spks, cond, streaming=streaming)
            assert out.shape == (2, 80, 24) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match="channels"):
            est.forward_chunk(x, mu, t, spks, cond, cache=None)


# offline behaviour


def test_deterministic(estimator):
    args = inputs(60, seed=1)
    with torch.inference_mode():
        assert torch.equal(offline(estimator, *args), offline(estimator, *args))  # the same call twice


def test_chunk_mask_limits_what_earlier_frames_see(estimator):
    x, mu, t, spks, cond = inputs(120, seed=2)
    later = x.clone()
    later[..., 100:] += 1.0
    mask = torch.ones(2, 1, 120)
    with torch.inference_mode():
        a = estimator(x, mask, mu, t, spks, cond, streaming=True)
        b = estimator(later, mask, mu, t, spks, cond, streaming=True)
        full_a = estimator(x, mask, mu, t, spks, cond, streaming=False)
        full_b = estimator(later, mask, mu, t, spks, cond, streaming=False)
    # chunks [0, 50) and [50, 100) never see frame 100: the same shapes, the changed frames only behind the mask
    # and right of causal convs, so at most one op's rounding (ONE_OP); a leak moves them by > 1e-3
    assert maxdiff(a[..., :100], b[..., :100]) <= ONE_OP
    assert maxdiff(a[..., 100:], b[..., 100:]) > 1e-3
    assert maxdiff(full_a[..., :100], full_b[..., :100]) > 1e-3


# cached chunks


@pytest.mark.parametrize("splits", [[50, 50, 30], [100, 30], [130], [50, 80], [7]])
def test_forward_chunk_equals_offline(estimator, splits):
    args = inputs(sum(splits), seed=3)
    with torch.inference_mode():
        ref = offline(estimator, *args)
        got, cache = run_chunks(estimator, args, splits)
    assert maxdiff(got, ref) <= STREAM_TOL
    assert isinstance(cache, UNetCache) and cache.offset == sum(splits) and cache.batch_size == 2


@pytest.mark.parametrize("splits", [[10, 10, 10, 5], [20, 15], [30, 10, 3]])
def test_forward_chunk_other_chunk_size(estimator, splits):
    args = inputs(sum(splits), seed=4)
    with torch.inference_mode():
        ref = offline(estimator, *args, chunk_size=10)
        got, cache = run_chunks(estimator, args, splits, chunk_size=10)
    assert maxdiff(got, ref) <= STREAM_TOL
    assert cache.chunk_size == 10


def test_forward_chunk_batch_of_one_and_scalar_time(estimator):
    x, mu, t, spks, cond = inputs(60, batch=1, seed=5)
    with torch.inference_mode():
        ref = offline(estimator, x, mu, t, spks, cond)
        got, _ = run_chunks(estimator, (x, mu, t[0], spks, cond), [50, 10])
    assert maxdiff(got, ref) <= STREAM_TOL


def test_prompt_cache_is_shared_read_only(estimator):
    a = inputs(110, seed=6)
    b = inputs(75, seed=7)
    # both continuations share the first 50 frames (the "prompt")
    b = tuple(torch.cat([pa[..., :50], pb[..., 50:]], -1) if pa.dim() == 3 else pa for pa, pb in zip(a, b))
    with torch.inference_mode():
        head, shared = run_chunks(estimator, a, [50])
        snapshot = [tensor.clone() for tensor in (*shared.conv_tails, *shared.keys, *shared.values)]
        got_a, _ = run_chunks(estimator, a, [50, 10], cache=shared, start=50)
        got_b, _ = run_chunks(estimator, b, [25], cache=shared, start=50)
        again_a, _ = run_chunks(estimator, a, [60], cache=shared, start=50)
        ref_a = offline(estimator, *a)
        ref_b = offline(estimator, *b)
    assert maxdiff(torch.cat([head, got_a], 2), ref_a) <= STREAM_TOL
    assert maxdiff(torch.cat([head, got_b], 2), ref_b) <= STREAM_TOL
    assert maxdiff(again_a, got_a) <= STREAM_TOL
    after = [*shared.conv_tails, *shared.keys, *shared.values]
    assert all(torch.equal(s, t) for s, t in zip(snapshot, after))  # untouched: equal to its copy
    assert shared.offset == 50


def test_forward_chunk_appends_keys_in_place(estimator):
    # The second chunk's keys go into the room the first call left: the cached rows are not copied again.
    args = inputs(150, seed=9)
    with torch.inference_mode():
        _, first = run_chunks(estimator, args, [50])
        _, second = run_chunks(estimator, args, [50], cache=first, start=50)
        _, branch = run_chunks(estimator, args, [50], cache=first, start=50)  # the store is taken: a copy
    for k1, k2, k3 in zip(first.keys, second.keys, branch.keys):
        assert k2.data_ptr() == k1.data_ptr() and k2.shape[2] == 100
        assert k3.data_ptr() != k1.data_ptr() and torch.equal(k3, k2)  # the same call on the same cache


def test_forward_chunk_errors(estimator):
    x, mu, t, spks, cond = inputs(80, seed=8)
    with torch.inference_mode():
        _, off_grid = estimator.forward_chunk(x[..., :30], mu[..., :30], t, spks, cond[..., :30], cache=None)
        with pytest.raises(ValueError, match="grid"):
            estimator.forward_chunk(x[..., 30:50], mu[..., 30:50], t, spks, cond[..., 30:50], cache=off_grid)
        _, cache = estimator.forward_chunk(x[..., :50], mu[..., :50], t, spks, cond[..., :50], cache=None)
        rest = (x[..., 50:], mu[..., 50:], t, spks, cond[..., 50:])
        with pytest.raises(ValueError, match="chunk"):
            estimator.forward_chunk(*rest, cache=cache, chunk_size=25)
        with pytest.raises(ValueError, match="batch"):
            estimator.forward_chunk(*(a[:1] for a in rest), cache=cache)
        with pytest.raises(ValueError, match="mu"):
            estimator.forward_chunk(x[..., 50:], mu[..., 50:60], t, spks, cond[..., 50:], cache=cache)
        with pytest.raises(ValueError, match="chunk_size"):
            estimator.init_cache(2, chunk_size=0)
        empty, same = estimator.forward_chunk(x[..., :0], mu[..., :0], t, spks, cond[..., :0], cache=cache)
    assert empty.shape == (2, 80, 0) and same is cache
