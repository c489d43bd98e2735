"""24 kHz log-mel front end against tests/data/mel24k.*, and the WAV helpers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from token2wav.audio import mel_filterbank, mel_spectrogram, read_wav, write_wav

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(DATA / "mel24k.safetensors")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((DATA / "mel24k.json").read_text())


def test_mel_matches_reference(fx):
    mel = mel_spectrogram(fx["wave"], sample_rate=24000, n_fft=1920, hop=480, win=1920, n_mels=80, fmin=0)
    assert mel.shape == fx["mel"].shape == (1, 80, 60)
    # FIXTURES.md suggests 1e-4 on the log-mel (~1e-3 only near the log(1e-5) floor; this mel stays above -3.6):
    # one FFT frame and filterbank, re-associated by ~ONE_OP relative, which the log keeps at ~1e-6
    assert (mel - fx["mel"]).abs().max().item() < 1e-4
    # 1-D input gives the same frames: the same call on the same shapes
    assert torch.equal(mel_spectrogram(fx["wave"][0]), mel)


def test_filterbank_matches_librosa(meta):
    bank = mel_filterbank(24000, 1920, 80, 0.0, None)
    info = meta["mel_basis"]
    assert list(bank.shape) == info["shape"]
    assert bank.dtype == torch.float32
    # float64 sums of the same float32 values (sha256-checked below) in another order: 77k terms summing to 6.4,
    # at most 77k * 2.2e-16 * 6.4 = 1.1e-10 apart
    assert abs(bank.double().sum().item() - info["sum"]) < 1e-9
    # The reference machine's np.exp put the top band edge 1 ulp above fmax (12000 + 1.8e-12 Hz), which
    # leaves 7.15e-18 instead of 0 in the Nyquist bin of the last filter; every other value is identical.
    ref = bank.numpy().copy()
    assert ref[79, 960] == 0.0
    ref[79, 960] = np.float32(7.1515984e-18)
    assert hashlib.sha256(ref.tobytes()).hexdigest() == info["sha256_float32"]


def test_filterbank_cache_is_keyed_by_every_parameter(fx):
    wave = fx["wave"][:, :9600]
    a = mel_spectrogram(wave, sample_rate=24000)
    b = mel_spectrogram(wave, sample_rate=16000)
    c = mel_spectrogram(wave, n_mels=40)
    d = mel_spectrogram(wave, fmax=8000)
    assert c.shape == (1, 40, 20)
    assert not torch.allclose(a, b) and not torch.allclose(a, d)
    assert torch.equal(mel_spectrogram(wave, sample_rate=24000), a)  # the same call again
    assert mel_filterbank(22050, 1024, 80).shape == (80, 513)


def test_frame_count_and_batch(fx):
    wave = torch.cat([fx["wave"], fx["wave"].flip(-1)], dim=0)[:, :10000]
    mel = mel_spectrogram(wave)
    assert mel.shape == (2, 80, 10000 // 480)
    # a batch of 2 vs 1: one FFT and filterbank per frame, re-associated by ~ONE_OP relative, which the log keeps
    # near 1e-6; 1e-5 (plus allclose's rtol 1e-5 of |log-mel|) leaves room for quiet bins
    assert torch.allclose(mel[:1], mel_spectrogram(wave[:1]), atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        mel_spectrogram(torch.zeros(1, 1, 4800))
    with pytest.raises(TypeError, match="floating"):
        mel_spectrogram(torch.zeros(4800, dtype=torch.int16))
    with pytest.raises(TypeError):
        mel_spectrogram(np.zeros(4800))
    with pytest.raises(ValueError, match="fmax"):
        mel_spectrogram(torch.zeros(4800), fmax=13000)
    with pytest.raises(ValueError, match="reflect"):
        mel_spectrogram(torch.zeros(500))


def test_wav_roundtrip(tmp_path):
    t = torch.arange(2400) / 24000
    wave = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    path = tmp_path / "a.wav"
    write_wav(path, wave.unsqueeze(0), 24000)
    back, sr = read_wav(path)
    assert sr == 24000 and back.dtype == torch.float32 and back.shape == wave.shape
    # 16-bit PCM: rounding (half a step) and libsndfile's 32767 scale in, 32768 out (|v| / 32768: half a step at
    # |v| 0.5), plus float32 rounding
    assert (back - wave).abs().max().item() < 1.0 / 32768 + 1e-6
    stereo = tmp_path / "s.wav"
    sf.write(stereo, np.stack([wave.numpy(), -wave.numpy() * 0.5], axis=1), 16000)
    mono, sr = read_wav(stereo)
    assert sr == 16000 and torch.allclose(mono, 0.25 * wave, atol=1e-4)  # two 16-bit channels: ~1 step (3e-5)
    with pytest.raises(ValueError, match="mono"):
        write_wav(path, torch.zeros(2, 100), 24000)
