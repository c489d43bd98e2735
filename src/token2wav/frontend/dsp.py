"""Signal processing of the CosyVoice prompt front end, written from the published definitions.

* :func:`resample`: band-limited (windowed-sinc, Hann window) resampling with the parameters and output length
  of torchaudio's default ``transforms.Resample``: its polyphase kernel (bit for bit) where the reduced rates are
  small, the same filter evaluated per output sample where they are not (a 16005 Hz header would otherwise ask
  for a 3200 x 3215 kernel, 44101 Hz for 16000 x 44135: memory and time bounded by the audio, not the rates);
* :func:`whisper_log_mel`: the 128-bin log10 mel of OpenAI Whisper (16 kHz, 25 ms / 10 ms, global 8-decade floor);
* :func:`kaldi_fbank`: Kaldi's log mel filterbank with its defaults (25 ms / 10 ms frames, snip edges, DC removal,
  pre-emphasis 0.97, Povey window, 512-point power spectrum, 20 Hz .. Nyquist, natural log floored at float eps);
* :func:`load_wav`: a sound file or an array, as mono float32 at a target rate.

Everything here works on float32 CPU tensors like the reference did; see ``tests/data/frontend/README.md`` for
the measured agreement.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import mel_filterbank

__all__ = ["MIN_SAMPLE_RATE", "as_float_array", "check_rate", "kaldi_fbank", "load_wav", "resample", "to_mono",
           "whisper_log_mel"]

MIN_SAMPLE_RATE = 16000  # the speech tokenizer and CAM++ analyse 16 kHz audio; we never upsample to them

_ZEROS = 6  # lowpass filter width: zero crossings of the sinc on each side
_ROLLOFF = 0.99  # cutoff as a share of the lower Nyquist frequency
# Largest polyphase kernel (elements) kept: the standard rates need at most 320 x 476 (22050 -> 16000); with
# 16 cached that is at most 32 MB. Larger reduced rates take the per-sample form.
MAX_KERNEL_ELEMENTS = 1 << 19
_DIRECT_BLOCK = 4096  # output samples per block of the per-sample form (a block's weights: ~1 MB)


def check_rate(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int (Hz), got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=16)
def _kernel_elements(orig: int, new: int) -> int:
    cutoff = min(orig, new) * _ROLLOFF
    return new * (2 * math.ceil(_ZEROS * orig / cutoff) + orig)


def _windowed_sinc(t: torch.Tensor) -> torch.Tensor:
    """The filter at ``t`` zero crossings from its centre (float64): sinc times a Hann window of 2 * _ZEROS."""
    t = t.clamp(-_ZEROS, _ZEROS)
    window = torch.cos(t * (math.pi / (2 * _ZEROS))) ** 2
    arg = t * math.pi
    return torch.where(arg == 0, torch.ones_like(arg), torch.sin(arg) / torch.where(arg == 0, 1.0, arg)) * window


def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase kernel [new, 1, taps] float32 for reduced rates orig -> new, and its half width in input samples."""
    cutoff = min(orig, new) * _ROLLOFF  # in units where the reduced input rate is ``orig``
    half = math.ceil(_ZEROS * orig / cutoff)
    taps = torch.arange(-half, half + orig, dtype=torch.float64) / orig  # input offsets in output periods
    # The phase of output j within one period, j / new. torchaudio builds it in float32 (default dtype) before
    # it joins the float64 taps; doing the same gives its kernel bit for bit (a float64 phase moves the output
    # by ~1e-6, ten times the float32 rounding of the output itself).
    phase = (torch.arange(0, -new, -1, dtype=torch.float32) / new).to(torch.float64)
    t = (phase[:, None] + taps[None, :]) * cutoff  # in zero crossings of the sinc
    kernel = _windowed_sinc(t) * (cutoff / orig)
    return kernel.to(torch.float32).unsqueeze(1).contiguous(), half


def _resample_direct(flat: torch.Tensor, orig_sr: int, new_sr: int, length: int) -> torch.Tensor:
    """The polyphase filter evaluated per output sample: output m sits at input time m * orig / new and sums
    the input samples within _ZEROS zero crossings of it. Work and memory grow with the audio only."""
    scale = min(orig_sr, new_sr) * _ROLLOFF / orig_sr  # zero crossings per input sample
    reach = math.ceil(_ZEROS / scale)  # input samples on each side that the filter can touch
    taps = torch.arange(-reach, reach + 2, dtype=torch.float64)
    padded = F.pad(flat, (reach + 1, reach + 2))
    out = torch.empty(flat.shape[0], length, dtype=flat.dtype, device=flat.device)
    for start in range(0, length, _DIRECT_BLOCK):
        m = torch.arange(start, min(length, start + _DIRECT_BLOCK), dtype=torch.float64)
        when = m * orig_sr / new_sr  # exact products below 2**53, one rounding in the division
        first = torch.floor(when)
        weights = _windowed_sinc((first[:, None] + taps[None, :] - when[:, None]) * scale) * scale
        index = (first.long()[:, None] + taps.long()[None, :]) + (reach + 1)
        window = padded[:, index].to(torch.float64)  # [rows, block, taps]
        out[:, start : start + m.shape[0]] = (window * weights).sum(-1).to(flat.dtype)
    return out


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample ``wave`` ([..., samples], float) from ``orig_sr`` to ``new_sr`` Hz.

    Windowed sinc with a Hann window, 6 zero crossings, cutoff 0.99 x the lower Nyquist frequency; output
    length ``ceil(samples * new / orig)``; equal rates return the input unchanged (torchaudio's default
    ``transforms.Resample`` semantics).
    """
    orig_sr = check_rate(orig_sr, "orig_sr")
    new_sr = check_rate(new_sr, "new_sr")
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"wave must be a torch.Tensor, got {type(wave).__name__}")
    if not wave.is_floating_point():
        raise TypeError(f"wave must be floating point, got {wave.dtype}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])
    n = flat.shape[-1]
    if _kernel_elements(orig, new) > MAX_KERNEL_ELEMENTS:
        return _resample_direct(flat, orig_sr, new_sr, math.ceil(new * n / orig)).reshape(*shape[:-1], -1)
    kernel, half = _sinc_kernel(orig, new)
    padded = F.pad(flat, (half, half + orig))
    # One strided convolution per phase: output sample k * new + j reads input k * orig + taps (phase j).
    out = F.conv1d(padded[:, None], kernel.to(dtype=wave.dtype, device=wave.device), stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    length = math.ceil(new * n / orig)
    return out[:, :length].reshape(*shape[:-1], -1)


# ------------------------------------------------------------------------------------------ whisper log-mel

_W_NFFT = 400
_W_HOP = 160


@functools.lru_cache(maxsize=4)
def _whisper_bank(n_mels: int) -> torch.Tensor:
    # Whisper ships librosa's Slaney bank (16 kHz, n_fft 400, fmax 8 kHz) as float32; ours is the same construction.
    return mel_filterbank(16000, _W_NFFT, n_mels, 0.0, 8000.0)


def whisper_log_mel(wave_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel ``[n_mels, samples // 160]`` of 16 kHz audio ``[samples]`` (or ``[1, samples]``).

    Centred STFT (reflect padding of 200, periodic Hann of 400, hop 160) without its last frame, power
    spectrum, Slaney mel bank, log10 floored at 1e-10, then raised to (global max - 8) and mapped by (x + 4) / 4.
    """
    if n_mels not in (80, 128):
        raise ValueError(f"n_mels must be 80 or 128 (the banks Whisper ships), got {n_mels}")
    x = _mono_1d(wave_16k, "wave_16k")
    if x.shape[0] <= _W_NFFT // 2:
        raise ValueError(f"wave_16k needs more than {_W_NFFT // 2} samples, got {x.shape[0]}")
    spec = torch.stft(x, _W_NFFT, _W_HOP, window=torch.hann_window(_W_NFFT, dtype=x.dtype, device=x.device),
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2
    mel = _whisper_bank(n_mels).to(device=x.device, dtype=x.dtype) @ power
    log = torch.clamp(mel, min=1e-10).log10()
    # The floor is global: a frame's values depend on the loudest frame anywhere in the prompt.
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


# ------------------------------------------------------------------------------------------ Kaldi fbank

_K_RATE = 16000
_K_LEN = 400  # 25 ms
_K_SHIFT = 160  # 10 ms
_K_NFFT = 512  # frame length rounded up to a power of two


def _kaldi_mel(f: torch.Tensor | float) -> Any:
    if isinstance(f, torch.Tensor):
        return 1127.0 * (1.0 + f / 700.0).log()
    return 1127.0 * math.log(1.0 + f / 700.0)


@functools.lru_cache(maxsize=4)
def _kaldi_bank(num_bins: int, low: float, high: float) -> torch.Tensor:
    """Triangles on Kaldi's mel scale, [num_bins, NFFT // 2 + 1] float32 (the Nyquist column is zero)."""
    lo_mel, hi_mel = _kaldi_mel(low), _kaldi_mel(high)
    step = (hi_mel - lo_mel) / (num_bins + 1)
    # float32 throughout, like the reference's default-dtype tensors
    b = torch.arange(num_bins, dtype=torch.float32)[:, None]
    left = lo_mel + b * step
    centre = lo_mel + (b + 1.0) * step
    right = lo_mel + (b + 2.0) * step
    bin_mel = _kaldi_mel(torch.arange(_K_NFFT // 2, dtype=torch.float32) * (_K_RATE / _K_NFFT))[None, :]
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    bank = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(bank, (0, 1))


@functools.lru_cache(maxsize=2)
def _povey(n: int) -> torch.Tensor:
    return torch.hann_window(n, periodic=False, dtype=torch.float32) ** 0.85


def kaldi_fbank(wave_16k: torch.Tensor, num_mel_bins: int = 80) -> torch.Tensor:
    """Kaldi log mel filterbank ``[1 + (samples - 400) // 160, num_mel_bins]`` of 16 kHz audio.

    What ``torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=..., dither=0, sample_frequency=16000)``
    computes: the samples are used as given (the reference feeds [-1, 1], not Kaldi's int16 scale, which
    changes where the log floor binds).
    """
    if isinstance(num_mel_bins, bool) or not isinstance(num_mel_bins, int) or not 1 <= num_mel_bins <= 128:
        raise ValueError(f"num_mel_bins must be an int in [1, 128], got {num_mel_bins!r}")
    x = _mono_1d(wave_16k, "wave_16k")
    if x.shape[0] < _K_LEN:
        raise ValueError(f"wave_16k needs at least {_K_LEN} samples (one 25 ms frame), got {x.shape[0]}")
    frames = x.unfold(0, _K_LEN, _K_SHIFT)  # snip edges: only whole frames
    frames = frames - frames.mean(dim=1, keepdim=True)
    # pre-emphasis; the first sample of a frame is its own predecessor
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev
    frames = frames * _povey(_K_LEN).to(device=x.device, dtype=x.dtype)
    frames = F.pad(frames, (0, _K_NFFT - _K_LEN))
    power = torch.fft.rfft(frames).abs() ** 2
    bank = _kaldi_bank(num_mel_bins, 20.0, _K_RATE / 2).to(device=x.device, dtype=x.dtype)
    energies = power @ bank.T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


def _mono_1d(wave: Any, name: str) -> torch.Tensor:
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(wave).__name__}")
    if wave.dim() == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.dim() != 1:
        raise ValueError(f"{name} must be [samples] or [1, samples], got shape {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {wave.dtype}")
    return wave


# ------------------------------------------------------------------------------------------ loading


def as_float_array(data: Any, name: str = "wav") -> np.ndarray:
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.dtype == np.int16:  # PCM as stored in a WAV: the loader's [-1, 1) scaling
        return arr.astype(np.float32) / 32768.0
    if arr.dtype == np.int32:
        return (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must hold float or int16/int32 PCM samples, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def to_mono(arr: np.ndarray, name: str = "wav") -> np.ndarray:
    if arr.ndim == 1:
        return arr
    if arr.ndim == 2 and arr.size == 0:  # no samples on any channel: empty, whichever side is which
        return arr.reshape(0)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [samples], [channels, samples] or [samples, channels], got shape {arr.shape}")
    # [channels, samples] (torch convention) or [samples, channels] (soundfile's): channels are the short side
    chans_first = arr.shape[0] <= arr.shape[1]
    return arr.mean(axis=0 if chans_first else 1, dtype=np.float32)


def read_audio(path: str | Path, name: str = "wav") -> tuple[np.ndarray, int]:
    """A sound file as float32 ``[samples, channels]`` in [-1, 1) and its rate; ValueError if it is not audio
    (``name``: the parameter the messages name)."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no such file: {p}")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, TypeError) as exc:  # libsndfile's "format not recognised" etc.
        from .audio_file import unreadable_reason

        raise ValueError(f"{name}: {p} is not a readable audio file ({unreadable_reason(exc)})") from None
    return data, int(sr)


def load_wav(path_or_array: Any, target_sr: int, sample_rate: int | None = None) -> torch.Tensor:
    """Mono float32 ``[samples]`` at ``target_sr``: channels averaged (before resampling), then resampled.

    ``path_or_array``: a path to a sound file (its own rate is used; ``sample_rate`` must be None or agree), or
    an array / tensor of samples with ``sample_rate`` given. Rates below 16 kHz are refused: the prompt front
    end would have to invent the missing band.
    """
    target_sr = check_rate(target_sr, "target_sr")
    if isinstance(path_or_array, (str, Path)):
        data, sr = read_audio(path_or_array)
        if sample_rate is not None and check_rate(sample_rate, "sample_rate") != sr:
            raise ValueError(f"sample_rate={sample_rate} disagrees with the file's own rate {sr}")
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    else:
        if sample_rate is None:
            raise ValueError("sample_rate is required when wav is an array (Hz, >= 16000)")
        sr = check_rate(sample_rate, "sample_rate")
        mono = to_mono(as_float_array(path_or_array))
    if sr < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {MIN_SAMPLE_RATE} Hz, got {sr}")
    wave = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
    return resample(wave, sr, target_sr)
