"""Demo tokenizer: log-mel analysis, resampling, k-means, and the shipped tokenizer / speaker files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from token2wav.tokenizer import (
    HIFIGAN_MEL,
    KMeansTokenizer,
    MelSpec,
    kmeans_fit,
    load_speakers,
    log_mel,
    mel_filterbank,
    resample,
    stack_frames,
)

DATA = Path(__file__).parent / "data"
DEMO = Path(__file__).parents[1] / "src" / "token2wav" / "assets" / "demo"


def test_log_mel_matches_reference_fixture():
    # The same recipe (reflect pad, periodic Hann, sqrt(|X|^2 + 1e-9), Slaney filters, log floor 1e-5) at
    # CosyVoice's 24 kHz settings; FIXTURES.md suggests 1e-4.
    with safe_open(str(DATA / "mel24k.safetensors"), framework="pt") as f:
        wave, mel = f.get_tensor("wave"), f.get_tensor("mel")
    spec = MelSpec(sample_rate=24000, n_fft=1920, hop=480, win=1920, n_mels=80, fmin=0.0, fmax=12000.0)
    # a float32 sum of 77k values totalling 6.4 (cascade summation): at most log2(77k) * 2^-24 * 6.4 = 6.5e-6 off
    assert mel_filterbank(spec).sum().item() == pytest.approx(6.3991737211076725, abs=1e-5)
    out = log_mel(wave, spec)
    assert out.shape == mel.shape
    assert (out - mel).abs().max().item() < 1e-4  # an FFT frame and filterbank; this mel stays far above the floor


def test_filterbank_shape_and_area_normalisation():
    fb = mel_filterbank(HIFIGAN_MEL)
    assert fb.shape == (80, 513)
    # Slaney area normalisation: each triangle integrates to ~1 over Hz (wide filters sample it well).
    area = fb.sum(1) * (HIFIGAN_MEL.sample_rate / HIFIGAN_MEL.n_fft)
    assert torch.allclose(area[40:], torch.ones(40), atol=0.03)  # a Riemann sum over the bins, not rounding
    # nothing above fmax = 8 kHz
    bins = torch.linspace(0, HIFIGAN_MEL.sample_rate / 2, 513)
    assert fb[:, bins > 8000.5].abs().max() == 0


def test_log_mel_frames_and_floor():
    wave = torch.zeros(256 * 40)
    mel = log_mel(wave)
    assert mel.shape == (80, 40)
    assert torch.allclose(mel, torch.full_like(mel, math.log(1e-5)))
    with pytest.raises(ValueError, match="wave"):
        log_mel(torch.zeros(2, 3, 4))


def test_resample_sine_and_lengths():
    t = torch.arange(16000, dtype=torch.float64) / 16000
    x = torch.sin(2 * math.pi * 1000 * t).float()
    y = resample(x, 16000, 22050)
    assert y.shape == (22050,)
    ty = torch.arange(22050, dtype=torch.float64) / 22050
    expect = torch.sin(2 * math.pi * 1000 * ty).float()
    # the filter's pass-band error, not rounding (5.1e-6, the same in float64)
    assert (y - expect)[200:-200].abs().max().item() < 2e-3
    down = resample(y, 22050, 16000)
    assert down.shape == (16000,)
    assert (down - x)[200:-200].abs().max().item() < 3e-3  # two passes of the filter (5.9e-6)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="orig_sr"):
        resample(x, 0, 16000)


def test_stack_frames_layout():
    mel = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)  # 3 bins, 5 frames
    rows = stack_frames(mel, 2)
    assert rows.shape == (2, 6)
    assert rows[1].tolist() == [2.0, 7.0, 12.0, 3.0, 8.0, 13.0]  # frames 2 and 3, bins in order


def test_kmeans_recovers_clusters_and_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 160, generator=g) * 5
    labels = torch.arange(400) % 4
    x = centres[labels] + 0.05 * torch.randn(400, 160, generator=g)
    # Lloyd iterations never increase the quantisation error
    _, hist_rand = kmeans_fit(x, 4, iters=6, seed=3)
    # once the assignment is stable the same computation repeats (equal values); before, the error drops by
    # hundreds. 1e-4 is under one float32 ulp of these values (~1e3)
    assert all(b <= a + 1e-4 for a, b in zip(hist_rand, hist_rand[1:]))
    cents, hist = kmeans_fit(x, 4, iters=10, init=x[[0, 1, 2, 3]] + 1.0)
    assert hist[-1] < 0.01 * 160
    tok = KMeansTokenizer(cents, stack=2)
    mel = x.reshape(-1, 2, 80).reshape(-1, 80).T  # back to (80, frames)
    ids = tok.tokens_from_mel(mel)
    # one token per pair of frames; same cluster <-> same token
    assert ids.shape == (400,)
    assert len(set(zip(labels.tolist(), ids.tolist()))) == 4
    path = tmp_path / "tok.safetensors"
    tok.save(path)
    again = KMeansTokenizer.from_file(path)
    assert again.vocab_size == 4 and again.stack == 2 and again.mel == HIFIGAN_MEL
    assert torch.equal(again.tokens_from_mel(mel), ids)  # integers from the same centroids (saved exactly)
    with pytest.raises(ValueError, match="centroids"):
        KMeansTokenizer(torch.zeros(4, 100))


@pytest.mark.skipif(not (DEMO / "tokenizer.safetensors").exists(), reason="demo assets not present")
def test_shipped_tokenizer_on_audio():
    tok = KMeansTokenizer.from_file(DEMO / "tokenizer.safetensors")
    assert tok.vocab_size == 2048 and tok.stack == 2 and tok.mel == HIFIGAN_MEL
    g = torch.Generator().manual_seed(1)
    wave = 0.3 * torch.randn(16000, generator=g)  # 1 s at 16 kHz -> 22050 samples -> 86 frames -> 43 tokens
    ids = tok(wave, 16000)
    assert isinstance(ids, list) and len(ids) == 43
    assert all(isinstance(i, int) and 0 <= i < 2048 for i in ids)
    assert tok(wave.numpy(), 16000) == ids  # numpy input too
    assert tok(torch.stack([wave, wave]), 16000) == ids  # (channels, T) is averaged to mono


@pytest.mark.skipif(not (DEMO / "speakers.safetensors").exists(), reason="demo assets not present")
def test_shipped_speakers():
    spk = load_speakers(DEMO / "speakers.safetensors")
    assert list(spk) == ["slt", "rms", "awb"]
    for entry in spk.values():
        assert entry["embedding"].shape == (1, 192)
        n = entry["prompt_token"].shape[1]
        assert entry["prompt_token"].shape == (1, n) and n > 50
        assert entry["prompt_feat"].shape == (1, 2 * n, 80)
        assert int(entry["prompt_token"].max()) < 2048


@pytest.mark.skipif(not (DEMO / "tokenizer.safetensors").exists(), reason="demo assets not present")
def test_tokenize_command(tmp_path):
    import argparse
    import json

    import soundfile as sf

    from token2wav import tokenizer

    g = torch.Generator().manual_seed(2)
    wave = 0.3 * torch.randn(24000, generator=g)
    sf.write(str(tmp_path / "x.wav"), wave.numpy(), 24000)
    parser = argparse.ArgumentParser()
    tokenizer.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "x.wav"), "-o", str(tmp_path / "t.json")])
    assert tokenizer.main(args) == 0
    tokens = json.loads((tmp_path / "t.json").read_text())
    assert len(tokens) == 43  # 1 s -> 22050 samples -> 86 frames -> 43 tokens
    assert tokens == KMeansTokenizer.from_file(DEMO / "tokenizer.safetensors")(wave, 24000)
