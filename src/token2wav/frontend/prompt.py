"""A voice prompt from a recording: speech tokens, speaker embedding and prompt mel, aligned 2:1.

For a CosyVoice 2/3 release this is the reference's zero-shot front end: the S3 speech tokenizer on the Whisper
log-mel of the 16 kHz audio, CAM++ on its mean-normalised Kaldi fbank, the model's own ``feat_extractor`` mel on
the 24 kHz audio, then tokens and mel cut to the same length (``min(frames // ratio, tokens)`` tokens).
For the bundled demo voice it is its own k-means tokenizer and 22.05 kHz mel, with a named voice's embedding.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audio import mel_spectrogram
from .audio_file import read_audio_bounded
from .dsp import (
    MIN_SAMPLE_RATE,
    as_float_array,
    check_rate,
    kaldi_fbank,
    resample,
    to_mono,
    whisper_log_mel,
)
from .onnx import SPEECH_TOKENIZER_NAMES, SpeakerEncoder, SpeechTokenizer

__all__ = [
    "MAX_PROMPT_SECONDS",
    "MIN_PROMPT_SECONDS",
    "PromptFrontend",
    "PromptTiming",
    "align_prompt",
    "files_digest",
    "frontend_files",
    "prompt_audio",
]

MAX_PROMPT_SECONDS = 30.0  # the S3 tokenizer's limit, measured on the 16 kHz waveform (30.0 s passes)
MIN_PROMPT_SECONDS = 0.5  # shorter gives a handful of tokens: not enough to carry a voice
SILENCE_PEAK = 1e-4  # -80 dBFS, about 3 LSB of 16-bit audio: nothing to clone


def _n_out(n: int, orig: int, new: int) -> int:
    """Samples after resampling n samples orig -> new (ceil(n * new / orig) on the reduced rates)."""
    g = math.gcd(orig, new)
    return -(-n * (new // g) // (orig // g))


def _too_long(seconds: float) -> str:
    return (f"wav is {seconds:.2f} s long; a prompt must be at most {MAX_PROMPT_SECONDS:g} s (the speech "
            "tokenizer's limit)")


def prompt_audio(wav: Any, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """Mono float32 samples ``[n]`` and their rate, checked for use as a prompt (before any resampling).

    ``wav``: a path to a sound file, or an array / tensor (``[n]``, ``[channels, n]`` or ``[n, channels]``, float
    in [-1, 1] or int16 PCM) with ``sample_rate``. Raises ValueError on rates below 16 kHz, non-finite samples,
    silence, and durations outside [0.5, 30] s (measured at 16 kHz, as the reference does).
    """
    if isinstance(wav, (str, Path)):
        if not Path(wav).is_file():
            raise FileNotFoundError(f"wav: no such file: {wav}")
        # refused from its header where that tells (n frames at sr Hz are at most 30 s exactly when their 16 kHz
        # resampling is), and never decoded past the limit
        data, sr = read_audio_bounded(wav, MAX_PROMPT_SECONDS, too_long=_too_long)
        if sample_rate is not None and check_rate(sample_rate, "sample_rate") != sr:
            raise ValueError(f"sample_rate={sample_rate} disagrees with the file's own rate {sr}")
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    else:
        if sample_rate is None:
            raise ValueError(f"sample_rate is required when wav is an array (Hz, >= {MIN_SAMPLE_RATE})")
        sr = check_rate(sample_rate, "sample_rate")
        mono = to_mono(as_float_array(wav))
    if sr < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {MIN_SAMPLE_RATE} Hz, got {sr}")
    if not np.isfinite(mono).all():
        raise ValueError("wav holds NaN or infinite samples")
    n16 = _n_out(mono.shape[0], sr, 16000)
    seconds = n16 / 16000
    if n16 > MAX_PROMPT_SECONDS * 16000:
        raise ValueError(_too_long(seconds))
    if seconds < MIN_PROMPT_SECONDS:
        raise ValueError(f"wav is {seconds:.3f} s long; a prompt must be at least {MIN_PROMPT_SECONDS:g} s")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"wav is silent (peak {peak:.2g} < {SILENCE_PEAK:g}); record the voice to clone")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), sr


def align_prompt(tokens: torch.Tensor, mel: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's trim: ``L = min(frames // ratio, tokens)`` tokens and ``ratio * L`` mel frames."""
    keep = min(mel.shape[0] // ratio, tokens.shape[0])
    return tokens[:keep], mel[: keep * ratio]


@dataclass(frozen=True)
class PromptTiming:
    """Wall time of each step of the last prompt, in seconds (for the CLI's report)."""

    load: float
    tokens: float
    embedding: float
    mel: float


class PromptFrontend:
    """The CosyVoice 2/3 front end of one model directory; its ONNX sessions are created once and shared.

    Thread-safe: onnxruntime sessions may run concurrently, everything else is per call.
    """

    def __init__(self, model_dir: str | Path, mel: Any, token_mel_ratio: int = 2, family: str = "cosyvoice3") -> None:
        model_dir = Path(model_dir)
        if mel is None:
            raise ValueError(f"{model_dir}: the config has no feat_extractor, so the prompt mel's settings are "
                             "unknown (CosyVoice 2/3 configs have one)")
        if family not in SPEECH_TOKENIZER_NAMES:
            raise ValueError(f"family must be one of {sorted(SPEECH_TOKENIZER_NAMES)}, got {family!r}")
        tok_path = model_dir / SPEECH_TOKENIZER_NAMES[family]
        spk_path = model_dir / "campplus.onnx"
        # Both files are checked before either session is made: an error leaves nothing half-built.
        missing = []
        if not tok_path.is_file():
            missing.append(f"{tok_path.name} (the {family} S3 speech tokenizer: prompt audio -> prompt speech "
                           "tokens)")
        if not spk_path.is_file():
            missing.append("campplus.onnx (the CAM++ speaker model: prompt audio -> speaker embedding)")
        if missing:
            raise FileNotFoundError(f"{model_dir}: no {'; no '.join(missing)}. Copy it from the CosyVoice "
                                    "release this model came from")
        self.model_dir = model_dir
        self.mel = mel
        self.ratio = int(token_mel_ratio)
        self.tokenizer = SpeechTokenizer(tok_path)
        self.speaker_encoder = SpeakerEncoder(spk_path)
        self.last_timing: PromptTiming | None = None

    @classmethod
    def for_config(cls, config: Any) -> PromptFrontend:
        return cls(Path(config.path).parent, config.mel, int(config.token_mel_ratio), family=config.family)

    def speech_tokens(self, wave_16k: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer(whisper_log_mel(wave_16k, n_mels=128).numpy()))

    def speaker_embedding(self, wave_16k: torch.Tensor) -> torch.Tensor:
        fbank = kaldi_fbank(wave_16k, num_mel_bins=80)
        fbank = fbank - fbank.mean(dim=0, keepdim=True)  # CAM++ was trained on mean-normalised features
        return torch.from_numpy(self.speaker_encoder(fbank.numpy()))

    def prompt_mel(self, wave_24k: torch.Tensor) -> torch.Tensor:
        """``[frames, n_mels]`` with the model's ``feat_extractor`` settings."""
        m = self.mel
        return mel_spectrogram(wave_24k, sample_rate=m.sample_rate, n_fft=m.n_fft, hop=m.hop, win=m.win,
                               n_mels=m.n_mels, fmin=m.fmin, fmax=m.fmax)[0].T.contiguous()

    def __call__(self, wav: Any, sample_rate: int | None = None,
                 embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [L] int64, mel [ratio * L, n_mels], embedding [192]) of a recording; ``embedding`` replaces
        CAM++'s (a saved voice's)."""
        t0 = time.perf_counter()
        mono, sr = prompt_audio(wav, sample_rate)
        wave_16k = resample(mono, sr, 16000)
        wave_24k = resample(mono, sr, int(self.mel.sample_rate))
        t1 = time.perf_counter()
        mel = self.prompt_mel(wave_24k)
        t2 = time.perf_counter()
        tokens = self.speech_tokens(wave_16k)
        t3 = time.perf_counter()
        emb = self.speaker_embedding(wave_16k) if embedding is None else embedding
        t4 = time.perf_counter()
        self.last_timing = PromptTiming(load=t1 - t0, mel=t2 - t1, tokens=t3 - t2, embedding=t4 - t3)
        tokens, mel = align_prompt(tokens, mel, self.ratio)
        return tokens, mel, emb


def frontend_files(config: Any) -> list[Path]:
    """The files whose bytes decide the prompt a recording gives on this model: the config (mel settings,
    family), then CosyVoice's tokenizer and CAM++ ONNX files or a bundled tokenizer, those that exist."""
    folder = Path(config.path).parent
    files = [Path(config.path)]
    if config.format == "cosyvoice":
        names = [SPEECH_TOKENIZER_NAMES.get(config.family, ""), "campplus.onnx"]
    else:
        names = [(config.extra.get("files") or {}).get("tokenizer", "")]
    return files + [folder / n for n in names if n and (folder / n).is_file()]


def files_digest(paths: list[Path]) -> str:
    """sha256 over each file's name, size and bytes, read in 1 MiB blocks (a 1 GB tokenizer: about a second)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}|{path.stat().st_size}|".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def demo_prompt(t2w: Any, wav: Any, sample_rate: int | None, speaker: str) -> tuple[torch.Tensor, ...]:
    """The bundled demo voice: its own tokenizer and mel on the recording, the named voice's embedding."""
    mono, sr = prompt_audio(wav, sample_rate)
    emb = t2w.speaker_prompt(speaker).embedding
    tok = t2w.speech_tokenizer()
    feats = tok.features(mono, sr)  # [n_mels, frames] at the tokenizer's analysis rate
    tokens = tok.tokens_from_mel(feats)
    tokens, mel = align_prompt(tokens, feats.T.contiguous(), int(t2w.config.token_mel_ratio))
    return tokens, mel, emb
