"""Audio -> speech tokens of the demo voice (log-mel, then the nearest k-means centroid).

A token stands for `stack` consecutive mel frames (token_mel_ratio). The analysis is the one the
HiFi-GAN "universal" vocoder was trained with, so the same front end serves prompts, training targets
and tokens:

    22.05 kHz, n_fft 1024, hop 256, win 1024 (periodic Hann), reflect padding of (n_fft - hop) / 2 on
    both sides, no centering, magnitude sqrt(re^2 + im^2 + 1e-9), Slaney-style mel filters (80 bins,
    0..8000 Hz, area normalised), natural log with a 1e-5 floor.

The centroids live in a safetensors file: ``centroids`` (K, stack * n_mels) float; the tokenizer's
settings are in its metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import audio

__all__ = [
    "MelSpec",
    "HIFIGAN_MEL",
    "mel_filterbank",
    "log_mel",
    "resample",
    "KMeansTokenizer",
    "kmeans_fit",
]


@dataclass(frozen=True)
class MelSpec:
    """Parameters of a log-mel analysis (no centering; reflect padding of (n_fft - hop) / 2)."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop: int = 256
    win: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    floor: float = 1e-5


HIFIGAN_MEL = MelSpec()


def mel_filterbank(spec: MelSpec = HIFIGAN_MEL) -> Tensor:
    """(n_mels, n_fft // 2 + 1) Slaney filters of ``spec`` (the same bank as the 24 kHz front end)."""
    return audio.mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax)


def log_mel(wave: Tensor, spec: MelSpec = HIFIGAN_MEL) -> Tensor:
    """Log-mel of (T,) or (B, T) audio at spec.sample_rate -> (n_mels, frames) or (B, n_mels, frames).

    The analysis of :func:`token2wav.audio.mel_spectrogram` with ``spec``'s settings; frames = T // hop."""
    if not isinstance(wave, Tensor):
        raise TypeError(f"wave must be a torch.Tensor, got {type(wave).__name__}")
    if wave.dim() not in (1, 2):
        raise ValueError(f"wave must have shape (T,) or (B, T), got {tuple(wave.shape)}")
    out = audio.mel_spectrogram(
        wave.float(), sample_rate=spec.sample_rate, n_fft=spec.n_fft, hop=spec.hop, win=spec.win,
        n_mels=spec.n_mels, fmin=spec.fmin, fmax=spec.fmax, floor=spec.floor,
    )
    return out[0] if wave.dim() == 1 else out


@lru_cache(maxsize=16)
def _sinc_kernels(orig: int, new: int, zeros: int, rolloff: float) -> tuple[Tensor, int]:
    # Windowed-sinc polyphase bank: row j interpolates output phase j (time j * orig / new, in input samples).
    cutoff = min(1.0, new / orig) * rolloff  # fraction of the input sample rate's Nyquist band kept
    half = math.ceil(zeros / cutoff)
    taps = torch.arange(2 * half + orig, dtype=torch.float64)
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new
    tau = phase - taps[None, :] + half
    window = torch.where(tau.abs() <= half, torch.cos(math.pi * tau / (2 * half)) ** 2, torch.zeros_like(tau))
    kernel = cutoff * torch.sinc(cutoff * tau) * window
    return kernel.float()[:, None, :], half


def resample(wave: Tensor, orig_sr: int, new_sr: int, *, zeros: int = 24, rolloff: float = 0.94) -> Tensor:
    """Band-limited resampling of (..., T) audio by a rational factor (windowed-sinc polyphase filter)."""
    for name, v in (("orig_sr", orig_sr), ("new_sr", new_sr)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer sample rate, got {v!r}")
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    if orig == new:
        return wave
    shape = wave.shape
    x = wave.reshape(-1, shape[-1]).float()
    kernel, half = _sinc_kernels(orig, new, zeros, rolloff)
    n_in = x.shape[-1]
    n_out = -(-n_in * new // orig)
    blocks = -(-n_out // new)
    right = blocks * orig + half + orig - n_in
    x = torch.nn.functional.pad(x[:, None], (half, max(right, 0)))
    y = torch.nn.functional.conv1d(x, kernel.to(x.device), stride=orig)[..., :blocks]  # (B, new, blocks)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]
    return y.reshape(*shape[:-1], n_out)


def stack_frames(mel: Tensor, stack: int) -> Tensor:
    """(n_mels, F) -> (F // stack, stack * n_mels): frame-major, so row t holds frames t*stack .. t*stack+stack-1."""
    n_mels, frames = mel.shape
    usable = frames - frames % stack
    return mel[:, :usable].T.reshape(usable // stack, stack * n_mels)


def _nearest(x: Tensor, centroids: Tensor, c_sq: Tensor, batch: int = 8192) -> Tensor:
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        # |x - c|^2 = |c|^2 - 2 x.c (+ |x|^2, the same for every centroid)
        d = c_sq[None, :] - 2.0 * (xb @ centroids.T)
        out.append(d.argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def kmeans_fit(
    x: Tensor, k: int, iters: int = 25, seed: int = 0, batch: int = 8192, init: Tensor | None = None
) -> tuple[Tensor, list[float]]:
    """Plain Lloyd k-means started from `init` or from k random distinct rows (seeded).

    Returns (centroids, mean squared distance per iteration). Empty clusters are re-seeded from the rows
    currently worst served."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0]}] (number of rows), got {k}")
    x = x.float()
    if init is not None:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        centroids = init.float().to(x.device).clone()
    else:
        g = torch.Generator().manual_seed(seed)
        centroids = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
    history: list[float] = []
    for _ in range(iters):
        c_sq = centroids.square().sum(1)
        assign = _nearest(x, centroids, c_sq, batch)
        dist = (x - centroids[assign]).square().sum(1)
        history.append(float(dist.mean()))
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = (~filled).nonzero().flatten()
        if len(empty):
            worst = dist.topk(len(empty)).indices
            centroids[empty] = x[worst]
    return centroids, history


class KMeansTokenizer:
    """Wave -> log-mel -> stacks of `stack` frames -> index of the nearest centroid."""

    def __init__(self, centroids: Tensor, stack: int = 2, mel: MelSpec = HIFIGAN_MEL, peak: float | None = 0.95):
        if centroids.dim() != 2 or centroids.shape[1] != stack * mel.n_mels:
            raise ValueError(
                f"centroids must have shape (K, stack * n_mels) = (K, {stack * mel.n_mels}), "
                f"got {tuple(centroids.shape)}"
            )
        self.centroids = centroids.float()
        self.c_sq = self.centroids.square().sum(1)
        self.stack = stack
        self.mel = mel
        self.peak = peak

    @property
    def vocab_size(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def from_file(cls, path: str | Path) -> KMeansTokenizer:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            centroids = f.get_tensor("centroids")
        mel = MelSpec(
            **{k: type(getattr(HIFIGAN_MEL, k))(meta[k]) for k in HIFIGAN_MEL.__dataclass_fields__ if k in meta}
        )
        peak = meta.get("peak", "0.95")
        return cls(centroids, stack=int(meta.get("stack", 2)), mel=mel, peak=None if peak == "none" else float(peak))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {k: str(getattr(self.mel, k)) for k in self.mel.__dataclass_fields__}
        meta.update(stack=str(self.stack), peak="none" if self.peak is None else str(self.peak))
        save_file({"centroids": self.centroids.half().contiguous()}, str(path), metadata=meta)

    def prepare(self, wave: Tensor | np.ndarray, sample_rate: int) -> Tensor:
        """Mono float audio at the analysis rate, peak-normalised like the vocoder's training data. ``wave``:
        ``[samples]``, ``[channels, samples]`` or ``[samples, channels]`` (averaged), float or int16/int32 PCM,
        read as a prompt's recording is (``frontend.dsp``)."""
        from .frontend.dsp import as_float_array, to_mono

        w = torch.from_numpy(np.ascontiguousarray(to_mono(as_float_array(wave, "wave"), "wave"), dtype=np.float32))
        if w.numel() == 0:
            raise ValueError("wave is empty: tokenizing needs at least one sample")
        if not torch.isfinite(w).all():
            raise ValueError("wave holds NaN or infinite samples")
        w = resample(w, int(sample_rate), self.mel.sample_rate)
        if self.peak is not None:
            m = w.abs().max()
            if m > 0:
                w = w * (self.peak / m)
        return w

    def features(self, wave: Tensor | np.ndarray, sample_rate: int) -> Tensor:
        """(n_mels, frames) log-mel of the prepared audio."""
        return log_mel(self.prepare(wave, sample_rate), self.mel)

    def tokens_from_mel(self, mel: Tensor) -> Tensor:
        """(n_mels, F) log-mel -> (F // stack,) int64 tokens."""
        if mel.dim() != 2 or mel.shape[0] != self.mel.n_mels:
            raise ValueError(f"mel must have shape ({self.mel.n_mels}, frames), got {tuple(mel.shape)}")
        x = stack_frames(mel.float().to(self.centroids.device), self.stack)
        return _nearest(x, self.centroids, self.c_sq)

    def mel_from_tokens(self, tokens: Tensor) -> Tensor:
        """Centroid lookup (the no-model baseline): (N,) -> (n_mels, N * stack)."""
        c = self.centroids[tokens.long()]
        return c.reshape(-1, self.stack, self.mel.n_mels).reshape(-1, self.mel.n_mels).T

    def __call__(self, wave: Tensor | np.ndarray, sample_rate: int) -> list[int]:
        return self.tokens_from_mel(self.features(wave, sample_rate)).tolist()


def load_speakers(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """Read a demo ``speakers.safetensors``: {name: {embedding [1, D], prompt_token [1, P] int64,
    prompt_feat [1, P * ratio, n_mels] float32}}, in the file's speaker order."""
    import json

    from safetensors import safe_open

    out: dict[str, dict[str, Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        names = json.loads(meta["speakers"]) if "speakers" in meta else sorted({k.split(".")[0] for k in keys})
        for name in names:
            out[name] = {
                "embedding": f.get_tensor(f"{name}.embedding").float(),
                "prompt_token": f.get_tensor(f"{name}.prompt_token").long(),
                "prompt_feat": f.get_tensor(f"{name}.prompt_feat").float(),
            }
    return out


# ---------------------------------------------------------------------------------------------- CLI
# `token2wav tokenize` (listed in token2wav.cli.COMMAND_MODULES): the module docstring's first line is its help.


def add_arguments(parser) -> None:  # argparse.ArgumentParser
    parser.add_argument("audio", help="audio file (any rate, mono or multi-channel; read with soundfile)")
    parser.add_argument("--model", default="demo", help="bundled model name or model directory (default: demo)")
    parser.add_argument("-o", "--output", default="-", help="where to write the tokens as JSON ('-' = stdout)")


def main(args) -> int:
    import json
    import sys

    from token2wav.frontend.dsp import read_audio
    from token2wav.loading import resolve_model_dir

    path = resolve_model_dir(args.model) / "tokenizer.safetensors"
    if not path.is_file():
        print(f"error: model '{args.model}' has no tokenizer ({path} missing)", file=sys.stderr)
        return 2
    wave, sample_rate = read_audio(args.audio, "audio")  # ValueError / FileNotFoundError: one line, exit 2
    tokens = KMeansTokenizer.from_file(path)(torch.from_numpy(wave.T.copy()), sample_rate)
    text = json.dumps(tokens)
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text + "\n")
        print(f"{len(tokens)} tokens -> {args.output}", file=sys.stderr)
    return 0
