"""Audio front end: the 24 kHz log-mel used by CosyVoice 2/3 (matcha-style), and small WAV helpers.

The mel filterbank is the Slaney-scale, Slaney-normalised bank that librosa builds by default; it is
computed here with numpy (librosa is not a dependency) and cached per parameter set.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mel_filterbank", "mel_spectrogram", "read_wav", "write_wav"]

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    high = hz >= _MIN_LOG_HZ
    mel[high] = _MIN_LOG_MEL + np.log(hz[high] / _MIN_LOG_HZ) / _LOGSTEP
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    high = mel >= _MIN_LOG_MEL
    hz[high] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel[high] - _MIN_LOG_MEL))
    return hz


@functools.lru_cache(maxsize=16)
def _filterbank_np(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    lo, hi = _hz_to_mel(np.array([fmin, fmax]))
    edges = _mel_to_hz(np.linspace(lo, hi, n_mels + 2))
    widths = np.diff(edges)
    dist = edges[:, None] - freqs[None, :]  # edge minus bin frequency
    bank = np.zeros((n_mels, freqs.shape[0]), dtype=np.float32)
    for m in range(n_mels):
        rising = -dist[m] / widths[m]
        falling = dist[m + 2] / widths[m + 1]
        bank[m] = np.maximum(0.0, np.minimum(rising, falling))
    # area normalisation; done in float64 on the float32 bank, then stored as float32 again
    bank *= (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, None]
    bank.setflags(write=False)
    return bank


def mel_filterbank(sample_rate: int = 24000, n_fft: int = 1920, n_mels: int = 80, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """Slaney mel filterbank [n_mels, n_fft // 2 + 1] float32 (librosa's default ``filters.mel``)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if n_fft < 2:
        raise ValueError(f"n_fft must be >= 2, got {n_fft}")
    if n_mels < 1:
        raise ValueError(f"n_mels must be >= 1, got {n_mels}")
    top = sample_rate / 2 if fmax is None else float(fmax)
    if not 0 <= fmin < top <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, fmax={fmax}")
    bank = _filterbank_np(int(sample_rate), int(n_fft), int(n_mels), float(fmin), float(top))
    return torch.from_numpy(bank.copy())


@functools.lru_cache(maxsize=32)
def _bank_on(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None,
             device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _window_on(win: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(win, dtype=dtype, device=device)


def mel_spectrogram(wave: torch.Tensor, sample_rate: int = 24000, n_fft: int = 1920, hop: int = 480,
                    win: int = 1920, n_mels: int = 80, fmin: float = 0.0,
                    fmax: float | None = None, floor: float = 1e-5) -> torch.Tensor:
    """Natural-log mel spectrogram [B, n_mels, L // hop] of a wave [L] or [B, L] (values in [-1, 1]).

    The steps of CosyVoice's ``feat_extractor``: reflect-pad (n_fft - hop) / 2 on both sides, STFT without
    centering (periodic Hann window of ``win``), magnitude sqrt(re^2 + im^2 + 1e-9), Slaney mel bank,
    log(max(x, floor)).  The filterbank cache is keyed by every parameter.
    """
    if not isinstance(wave, torch.Tensor):
        raise TypeError("wave must be a torch.Tensor [samples] or [batch, samples]")
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"wave must have shape [samples] or [batch, samples], got {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise TypeError(f"wave must be floating point, got {wave.dtype}")
    if hop < 1 or win < 1 or win > n_fft:
        raise ValueError(f"need hop >= 1 and 1 <= win <= n_fft, got hop={hop}, win={win}, n_fft={n_fft}")
    if (n_fft - hop) % 2:
        raise ValueError(f"n_fft - hop must be even, got n_fft={n_fft}, hop={hop}")
    pad = (n_fft - hop) // 2
    if wave.shape[-1] <= pad:
        raise ValueError(f"wave needs more than {pad} samples for reflect padding, got {wave.shape[-1]}")
    x = F.pad(wave.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=_window_on(win, x.device, x.dtype),
                      center=False, normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    bank = _bank_on(int(sample_rate), int(n_fft), int(n_mels), float(fmin),
                    None if fmax is None else float(fmax), x.device, x.dtype)
    return torch.log(torch.clamp(torch.matmul(bank, mag), min=floor))


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read a sound file as float32 mono [samples] (channels averaged) and its sample rate."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), int(sr)


def write_wav(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """Write float mono audio ([samples] or [1, samples]) as 16-bit PCM WAV, clipped to [-1, 1]."""
    import soundfile as sf

    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if isinstance(wave, torch.Tensor):
        arr = wave.detach().cpu().float().numpy()
    else:
        arr = np.asarray(wave, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"wave must be mono [samples] or [1, samples], got shape {arr.shape}")
    sf.write(str(path), np.clip(arr, -1.0, 1.0), int(sample_rate), subtype="PCM_16")
