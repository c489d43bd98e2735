"""HiFi-GAN generator: checkpoint layout, weight norm, streaming equality, the shipped int8 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from token2wav.models.hifigan import HiFiGANGenerator, HiFiGANStreamState, vocode_stream

DEMO = Path(__file__).parents[1] / "src" / "token2wav" / "assets" / "demo"


def _small(seed: int = 0) -> HiFiGANGenerator:
    # Same kernels, strides and dilations as the universal V1 model (so the same receptive field), fewer channels.
    torch.manual_seed(seed)
    return HiFiGANGenerator(upsample_initial_channel=16).eval()


def test_checkpoint_layout_and_size():
    g = HiFiGANGenerator()
    keys = set(g.state_dict())
    for k in (
        "conv_pre.weight_g",
        "conv_pre.weight_v",
        "conv_pre.bias",
        "ups.0.weight_v",
        "ups.3.weight_g",
        "resblocks.0.convs1.0.weight_v",
        "resblocks.11.convs2.2.bias",
        "conv_post.weight_v",
    ):
        assert k in keys
    assert not any(k.endswith(".weight") for k in keys)
    assert len(g.resblocks) == 12
    # the universal V1 generator's parameter count
    assert sum(p.numel() for p in g.parameters()) == 13_936_130
    assert tuple(g.state_dict()["ups.0.weight_v"].shape) == (512, 256, 16)
    assert g.hop_length == 256


def test_output_length_and_range():
    g = _small()
    with torch.no_grad():
        wav = g(torch.randn(2, 80, 13))
    assert wav.shape == (2, 1, 13 * 256)
    assert wav.abs().max() <= 1.0
    with pytest.raises(ValueError, match="mel"):
        g(torch.randn(1, 40, 10))
    with pytest.raises(ValueError, match="resblock"):
        HiFiGANGenerator(resblock="2")


def test_weight_norm_scale_invariance_and_folding():
    g = _small()
    mel = torch.randn(1, 80, 9)
    with torch.no_grad():
        ref = g(mel)  # eval: folded weights
        g.train()
        unfolded = g(mel)
        g.eval()
        state = {k: (v * 3.7 if k.endswith("weight_v") else v) for k, v in g.state_dict().items()}
        g.load_state_dict(state)  # must drop the folded cache
        scaled = g(mel)
    # one pass of a small network whose weights move by an ulp (g * v / |v| re-rounded): NETWORK relative to
    # |wav| <= 0.1 is 1e-6, and allclose's default rtol adds 1e-5 relative (measured 1.5e-8 at |wav| 0.08)
    assert torch.allclose(ref, unfolded, atol=1e-6)
    assert torch.allclose(ref, scaled, atol=1e-6)


@pytest.mark.parametrize("piece", [2, 13])
def test_stream_equals_offline(piece):
    g = _small(1)
    mel = torch.randn(1, 80, 45)
    with torch.no_grad():
        ref = g(mel)[:, 0]
        state, out = None, []
        for i in range(0, 45, piece):
            audio, state = vocode_stream(g, mel[:, :, i : i + piece], state, final=i + piece >= 45)
            out.append(audio)
    got = torch.cat(out, dim=1)
    assert got.shape == ref.shape
    # Not rounding alone: the default window (24 frames back, 8 ahead) is shorter than the receptive field, whose
    # far taps leave ~4e-6 here (measured 4.2e-6 at |audio| 0.4; with a 64 / 64 window: 0). Float32 rounding of
    # the pass is NETWORK relative to the peak. 1e-4 relative covers both; a window cut at the wrong frame moves
    # whole samples (the demo voice's too short former window: 0.29).
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_stream_holds_back_lookahead_frames():
    g = _small(2)
    with torch.no_grad():
        audio, state = vocode_stream(g, torch.randn(1, 80, 20), None, lookahead=12)
    assert audio.shape == (1, 8 * 256)
    assert isinstance(state, HiFiGANStreamState) and state.pending == 12
    with pytest.raises(ValueError, match="lookahead"):
        vocode_stream(g, torch.randn(1, 80, 4), None, lookahead=-1)


@pytest.mark.skipif(not (DEMO / "vocoder.safetensors").exists(), reason="demo assets not present")
def test_shipped_int8_vocoder_loads_strictly():
    from safetensors.torch import load_file

    state = load_file(str(DEMO / "vocoder.safetensors"))
    assert state["conv_pre.weight_v"].dtype == torch.int8
    g = HiFiGANGenerator().eval()
    g.load_state_dict(state, strict=True)  # int8 weight_v: the per-slice scale cancels in weight norm
    w = g.conv_pre.effective_weight()
    norms = w.flatten(1).norm(dim=1)
    # |g v / |v|| = g up to a float32 norm's rounding (~1e-6 relative); 1e-3 checks the int8 scale cancels
    assert torch.allclose(norms, state["conv_pre.weight_g"].float().flatten(), rtol=1e-3)
    with torch.no_grad():
        wav = g(torch.full((1, 80, 8), -5.0))
    assert wav.shape == (1, 1, 2048) and torch.isfinite(wav).all()
