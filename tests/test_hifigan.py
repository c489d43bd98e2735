"""HiFi-GAN generator: checkpoint layout, weight norm, streaming equality, the shipped int8 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tolerances import NETWORK, ONE_OP

from token2wav.models import hifigan
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


def _stream(g: HiFiGANGenerator, mel: torch.Tensor, piece: int) -> torch.Tensor:
    state, out = None, []
    for i in range(0, mel.shape[-1], piece):
        audio, state = vocode_stream(g, mel[:, :, i : i + piece], state, final=i + piece >= mel.shape[-1])
        out.append(audio)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("piece", [1, 2, 13, 45])
def test_stream_equals_offline(piece):
    g = _small(1)
    mel = torch.randn(1, 80, 45)
    with torch.no_grad():
        ref = g(mel)[:, 0]
        got = _stream(g, mel, piece)
    assert got.shape == ref.shape
    # Carried state computes every sample once, from the same inputs as offline: only the convolutions' lengths
    # differ, so float rounding alone (one NETWORK pass, relative to the peak). Measured 6e-8 at |audio| 0.3;
    # the former windowed streaming (24 frames back, 8 ahead) left 4.2e-6 here and 0.29 on the demo voice.
    assert (got - ref).abs().max().item() <= NETWORK * max(1.0, ref.abs().max().item())


def test_stream_emits_exactly_the_samples_whose_inputs_are_known():
    """Emitted samples never change with later frames, and every sample whose inputs are all known is emitted."""
    g = _small(2)
    head = torch.randn(1, 80, 20)
    tails = [torch.randn(1, 80, 25), torch.randn(1, 80, 25)]
    with torch.no_grad():
        audio, state = vocode_stream(g, head, None)
        full = [g(torch.cat([head, t], dim=-1))[0, 0] for t in tails]
    n = audio.shape[1]
    assert isinstance(state, HiFiGANStreamState) and state.frames == 20 and state.samples == n
    for f in full:
        assert (f[:n] - audio[0]).abs().max().item() <= NETWORK
    # Counted by hand through V1's layers, each output taken once its inputs are known: conv_pre (k 7, pad 3):
    # 20 - 3 = 17 frames; ups.0 (x8, k 16, pad 4): 17 * 8 - 4 = 132; the k=11 resblock, the slowest (pads 5+5,
    # 15+5, 25+5): 132 - 60 = 72; ups.1: 72 * 8 - 4 - 60 = 512; ups.2 (x2, k 4, pad 1): 512 * 2 - 1 - 60 = 963;
    # ups.3: 963 * 2 - 1 - 60 = 1865; conv_post (pad 3): 1862 samples, 12.7 of the 20 frames' audio held back.
    assert n == 1862
    with pytest.raises(ValueError, match="finished"):
        state = vocode_stream(g, head, None, final=True)[1]
        vocode_stream(g, head, state)


def test_stream_computes_each_sample_once(monkeypatch):
    """A chunk costs its own frames: summed over a stream, the convolutions take about the inputs the offline
    pass takes (plus each conv's tail of kernel span per call), not a window of context around every chunk."""
    g = _small(3)
    mel = torch.randn(1, 80, 45)
    seen = {"n": 0}
    for cls in (hifigan.WNConv1d, hifigan.WNConvTranspose1d):
        original = cls.frames

        def counted(self, x, padded=True, _original=original):
            seen["n"] += x.shape[-1] * x.shape[1] * self.out_channels * self.kernel_size[0]
            return _original(self, x, padded)

        monkeypatch.setattr(cls, "frames", counted)
    with torch.no_grad():
        g(mel)
        offline, seen["n"] = seen["n"], 0
        _stream(g, mel, 5)
    # 9 calls of 5 frames: measured 1.12x; the windowed form ran (24 + 5 + 8) / 5, about 7x, by count
    assert seen["n"] <= 1.2 * offline


def test_rows_equal_alone():
    g = _small(4)
    mels = [torch.randn(1, 80, 30) for _ in range(3)]
    with torch.no_grad():
        alone = [_stream(g, m, 10) for m in mels]
        states, outs = [None] * 3, [[] for _ in mels]
        for i in range(0, 30, 10):
            steps = hifigan.vocode_stream_rows(g, [m[:, :, i : i + 10] for m in mels], states, [i + 10 >= 30] * 3)
            for r, (audio, state) in enumerate(steps):
                outs[r].append(audio)
                states[r] = state
    for a, o in zip(alone, outs):
        # the same convolutions on a batch of rows: each row's sums in the same order (measured bit-identical);
        # ONE_OP allows a batch-dependent blocking on other kernels
        assert (torch.cat(o, dim=1) - a).abs().max().item() <= ONE_OP


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
