"""Exact cached streaming of the causal HiFT: chunked stream_step output == one offline inference."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import max_abs_diff
from safetensors.torch import load_file
from tolerances import NETWORK, ONE_OP

from token2wav import build_vocoder
from token2wav.models.hift import CausalHiFTCache, CausalHiFTGenerator, fold_weight_norm

DATA = Path(__file__).parent / "data"
# Streamed vs offline (or the reference's) speech of the causal HiFT on the same mel: F0 and the source phase are
# float64, so only the float32 decoder pass re-associates: NETWORK (FIXTURES.md suggests 1e-5; the float64 decode is
# 9.2e-8 away at |speech| 0.07)
TOL = NETWORK


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def hift() -> CausalHiFTGenerator:
    model = build_vocoder(DATA / "cv3_config.yaml", device="cpu")
    state = {k: v.float() for k, v in load_file(DATA / "cv3_hift_state.safetensors").items()}
    model.load_state_dict(state, strict=True)
    fold_weight_norm(model)
    model.set_source_noise(7000)
    return model.eval()


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(DATA / "cv3_hift.safetensors")


def _stream(model: CausalHiFTGenerator, mel: torch.Tensor, chunk: int, finalize_last: bool = False
            ) -> tuple[torch.Tensor, CausalHiFTCache]:
    cache, outs = model.new_cache(mel.shape[0]), []
    n = mel.shape[-1]
    for i in range(0, n, chunk):
        last = finalize_last and i + chunk >= n
        speech, cache = model.stream_step(mel[:, :, i:i + chunk], cache, finalize=last)
        outs.append(speech)
    if not finalize_last:
        speech, cache = model.stream_step(mel[:, :, :0], cache, finalize=True)
        outs.append(speech)
    return torch.cat(outs, dim=-1), cache




@pytest.mark.parametrize("chunk", [1, 7, 30, 50])
def test_chunked_equals_offline(hift, fx, chunk):
    mel = fx["stream_mel"]
    offline = hift.inference(mel)[0]
    streamed, cache = _stream(hift, mel, chunk)
    assert streamed.shape == (1, 90 * 480)
    assert max_abs_diff(streamed, offline) < TOL
    # and against the reference's own offline output (its streaming steps concatenate to it)
    ref = torch.cat([fx[f"stream_step{k}"] for k in range(3)], dim=-1)
    assert max_abs_diff(streamed, ref) < TOL
    assert cache.finalized and cache.held_frames == 0


def test_finalize_with_last_chunk(hift, fx):
    mel = fx["stream_mel"]
    a, _ = _stream(hift, mel, 30, finalize_last=True)
    b, _ = _stream(hift, mel, 30)
    assert max_abs_diff(a, b) < TOL


def test_emits_everything_final_and_holds_lookahead(hift, fx):
    mel = fx["stream_mel"]
    cache = hift.new_cache()
    for n in (3, 5, 12, 40):
        _, cache = hift.stream_step(mel[:, :, cache.mel_frames:n], cache)
        # conv_pre looks 4 frames ahead; the iSTFT overlap holds 4 more samples
        assert cache.speech_samples == max(0, 480 * (n - 4) - 4), n
        assert cache.held_frames == (n if n <= 4 else 5)


def test_short_streams(hift):
    gen = torch.Generator().manual_seed(3)
    for frames in (1, 2, 5, 9):
        mel = torch.randn(1, 80, frames, generator=gen) * 2 - 5
        offline = hift.inference(mel)[0]
        assert offline.shape == (1, frames * 480)
        streamed, _ = _stream(hift, mel, 1)
        assert max_abs_diff(streamed, offline) < TOL
    empty, cache = hift.stream_step(torch.zeros(1, 80, 0), None, finalize=True)
    assert empty.shape == (1, 0) and cache.finalized


def test_cache_is_never_mutated(hift, fx):
    mel = fx["stream_mel"]
    _, c1 = _stream_partial(hift, mel[:, :, :33])
    snapshot = [t.clone() for t in _tensors(c1)]
    a, _ = hift.stream_step(mel[:, :, 33:60], c1)
    b, _ = hift.stream_step(mel[:, :, 33:41], c1)  # a different branch from the same cache
    c, _ = hift.stream_step(mel[:, :, 33:60], c1)
    assert torch.equal(a, c)  # the same call again: same kernels, same shapes
    assert a.shape[-1] > b.shape[-1]
    assert all(torch.equal(x, y) for x, y in zip(_tensors(c1), snapshot))  # untouched: equal to its copy


def test_cache_size_is_bounded(hift):
    gen = torch.Generator().manual_seed(4)
    mel = torch.randn(1, 80, 120, generator=gen) * 2 - 5
    cache, sizes = hift.new_cache(), []
    for i in range(120):
        _, cache = hift.stream_step(mel[:, :, i:i + 1], cache)
        sizes.append(cache.nbytes())
    assert max(sizes[10:]) == min(sizes[10:])  # O(1) state: nothing grows with the stream


def test_batch_streams(hift):
    gen = torch.Generator().manual_seed(5)
    mel = torch.randn(2, 80, 37, generator=gen) * 2 - 5
    streamed, _ = _stream(hift, mel, 11)
    for b in range(2):
        assert max_abs_diff(streamed[b:b + 1], hift.inference(mel[b:b + 1])[0]) < TOL


def test_deepcopy(hift, fx):
    twin = copy.deepcopy(hift)
    mel = fx["stream_mel"][:, :, :20]
    assert torch.equal(twin.inference(mel)[0], hift.inference(mel)[0])  # equal weights, the same call


def test_errors(hift, fx):
    mel = fx["stream_mel"]
    _, cache = hift.stream_step(mel[:, :, :10], None, finalize=True)
    with pytest.raises(ValueError, match="finalized"):
        hift.stream_step(mel[:, :, 10:20], cache)
    with pytest.raises(ValueError, match="batch"):
        hift.stream_step(mel[:, :, :10].expand(2, -1, -1), hift.new_cache(1))
    with pytest.raises(ValueError, match="80 mel channels"):
        hift.stream_step(torch.zeros(1, 79, 5), hift.new_cache())


def _reference_style_source(model: CausalHiFTGenerator, f0: torch.Tensor) -> torch.Tensor:
    """The causal source exactly as the reference computes it: per sample, with torch's interpolations."""
    src = model.m_source
    up = model.samples_per_frame
    f0_up = F.interpolate(f0.unsqueeze(1), scale_factor=float(up)).transpose(1, 2)  # [1, L, 1]
    rad = (f0_up * torch.arange(1, 10, dtype=torch.float32) / 24000) % 1
    per_frame = F.interpolate(rad.transpose(1, 2), scale_factor=1 / up, mode="linear").transpose(1, 2)
    phase = torch.cumsum(per_frame, dim=1) * 2 * math.pi  # float32 scan, as the reference
    phase = F.interpolate(phase.transpose(1, 2) * up, scale_factor=float(up), mode="nearest").transpose(1, 2)
    uv = (f0_up > src.voiced_threshold).float()
    noise = model.source_noise(0, f0_up.shape[1])
    mixed = torch.sin(phase) * src.sine_amp * uv + (uv * src.noise_std + (1 - uv) * src.sine_amp / 3) * noise
    return torch.tanh(src.l_linear(mixed)).transpose(1, 2)


def test_long_run_has_no_phase_drift(hift):
    """1500 frames (30 s): phases reach ~1e6 rad, where one float32 step is ~0.06 rad."""
    frames = 1500
    gen = torch.Generator().manual_seed(6)
    f0 = 150 + 250 * torch.rand(1, frames, generator=gen)  # always voiced: the sine path dominates
    with torch.inference_mode():
        ref = _reference_style_source(hift, f0)
        whole, _ = hift.m_source.causal_frames(f0, torch.zeros(1, 9, dtype=torch.float64),
                                               hift.source_noise(0, frames * 480))
        parts, acc = [], torch.zeros(1, 9, dtype=torch.float64)
        for i in range(0, frames, 37):
            seg = f0[:, i:i + 37]
            noise = hift.source_noise(i * 480, (i + seg.shape[1]) * 480)
            s, acc = hift.m_source.causal_frames(seg, acc, noise)
            parts.append(s)
    # Both make the same float32 phases (a float64 running sum rounded per output, as torch's float32 cumsum), so
    # only the 9-term l_linear re-associates: ONE_OP. The chunks continue the float64 sum bit for bit, but run the
    # linear on other row counts: ONE_OP too. A drift of one float32 step of the phase moves the source by 6e-3.
    assert max_abs_diff(whole, ref) < ONE_OP
    assert max_abs_diff(torch.cat(parts, dim=-1), whole) <= ONE_OP

    mel = torch.randn(1, 80, frames, generator=gen) * 2 - 5
    offline = hift.inference(mel)[0]
    streamed, _ = _stream(hift, mel, 50)
    assert max_abs_diff(streamed, offline) < TOL


def _stream_partial(model, mel):
    cache = model.new_cache()
    speech, cache = model.stream_step(mel, cache)
    return speech, cache


def _tensors(cache: CausalHiFTCache) -> list[torch.Tensor]:
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, tuple):
            for x in v:
                walk(x)

    for v in cache.__dict__.values():
        walk(v)
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_equals_cuda_offline_and_reference(hift, fx):
    # TF32 convolutions (cuDNN default) alone move the output by ~3e-5; parity needs full float32
    with _no_tf32():
        _test_cuda_stream_equals_cuda_offline_and_reference(hift, fx)


def _test_cuda_stream_equals_cuda_offline_and_reference(hift, fx):
    model = build_vocoder(DATA / "cv3_config.yaml", device="cpu")
    state = {k: v.float() for k, v in load_file(DATA / "cv3_hift_state.safetensors").items()}
    model.load_state_dict(state, strict=True)
    fold_weight_norm(model)
    model.set_source_noise(7000)
    model = model.to("cuda").eval()
    mel = fx["stream_mel"].cuda()
    offline = model.inference(mel)[0]
    ref = torch.cat([fx[f"stream_step{k}"] for k in range(3)], dim=-1)
    assert max_abs_diff(offline.cpu(), ref) < TOL
    assert max_abs_diff(model.inference(fx["mel"].cuda())[0].cpu(), fx["speech_finalize"]) < TOL
    for chunk in (1, 7, 50):
        streamed, _ = _stream(model, mel, chunk)
        assert max_abs_diff(streamed, offline) < TOL, chunk
    gen = torch.Generator().manual_seed(6)
    long_mel = (torch.randn(1, 80, 1500, generator=gen) * 2 - 5).cuda()
    offline = model.inference(long_mel)[0]
    streamed, _ = _stream(model, long_mel, 50)
    assert max_abs_diff(streamed, offline) < TOL
    # cuDNN's float32 conv algorithms against the CPU's over 30 s: the decoder pass (NETWORK) with 10x room; F0
    # and phase are float64 on both
    assert max_abs_diff(offline.cpu(), hift.inference(long_mel.cpu())[0]) < 1e-4


@contextlib.contextmanager
def _no_tf32():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
