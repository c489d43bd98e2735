"""How much memory a decode needs, how much the machine has, and one-line refusals when it cannot fit.

The rules (also in the README, "Troubleshooting"):

* Full attention (``attention="full"``, the default offline decode) builds, per layer and solver step, one
  attention matrix of ``2 x heads x T^2`` scores (two guidance branches, T = prompt + target mel frames) in the
  model's dtype. It is refused before any work when that one matrix exceeds half the available memory: RAM
  (``MemAvailable`` in /proc/meminfo, else ``os.sysconf``) on the CPU, free device memory on CUDA.
* Chunk attention (``attention="chunk"``) over more than :data:`ONE_SHOT_FRAMES` frames is decoded chunk by chunk
  through the cached streaming path (the same output to float rounding); its memory is the key/value cache,
  linear in T: ``n_timesteps x 2 x layers x 2 x inner_dim`` values per frame. It is refused when that cache
  would exceed the available memory; streaming with ``mode="window"`` bounds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "ONE_SHOT_FRAMES",
    "InsufficientMemoryError",
    "attention_shape",
    "available_bytes",
    "check_offline_memory",
    "full_attention_bytes",
    "kv_bytes_per_frame",
    "kv_cache_bytes",
    "out_of_memory_message",
]

# Up to this many mel frames (20 s at 50 frames/s) chunk attention runs in one shot (attention matrix
# 2 x heads x T^2: 0.5 GB at full-size CosyVoice 3 in float32); above it, chunk by chunk.
ONE_SHOT_FRAMES = 1000
FULL_ATTENTION_SHARE = 0.5  # refuse full attention when one attention matrix needs more than this share
_KV_GROWTH = 1.5  # the key/value stores grow by half when full (models/kv_store.py)


class InsufficientMemoryError(MemoryError):
    """A decode that cannot fit in this machine's memory (raised before any work, or after an allocation failed)."""


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory free for a new allocation on ``device`` (None if it cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except Exception:  # no driver, or a device that cannot report
            return None
    if device.type == "meta":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(heads, attention layers, inner width) of the flow's estimator, read from the config."""
    estimator = config.flow.get("decoder").get("estimator")
    if estimator.get("depth") is not None:  # DiT
        heads = int(estimator.get("heads", 8))
        return heads, int(estimator.get("depth")), heads * int(estimator.get("dim_head", 64))
    heads = int(estimator.get("num_heads", 4))  # the CosyVoice 2 U-Net: down, mid and up transformer blocks
    n_blocks = int(estimator.get("n_blocks", 1))
    stages = len(estimator.get("channels") or [256])
    layers = n_blocks * (2 * stages + int(estimator.get("num_mid_blocks", 2)))
    return heads, layers, heads * int(estimator.get("attention_head_dim", 64))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def full_attention_bytes(config: Any, frames: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one full-attention score matrix over ``frames`` mel frames (both guidance branches)."""
    heads, _, _ = attention_shape(config)
    return 2 * heads * frames * frames * _itemsize(dtype)


def kv_bytes_per_frame(config: Any, dtype: torch.dtype = torch.float32, n_timesteps: int = 10) -> int:
    """Bytes one mel frame adds to a cached stream's keys and values (every solver step, guidance branch and
    attention layer), from the config alone: what ``streaming.batcher.cache_bytes_per_frame`` reads off a
    loaded flow."""
    _, layers, inner = attention_shape(config)
    return n_timesteps * 2 * layers * 2 * inner * _itemsize(dtype)


def kv_cache_bytes(config: Any, frames: int, dtype: torch.dtype = torch.float32, n_timesteps: int = 10) -> int:
    """Bytes of the cached path's key/value stores over ``frames`` frames (every step, branch and layer)."""
    return int(kv_bytes_per_frame(config, dtype, n_timesteps) * frames * _KV_GROWTH)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_offline_memory(
    config: Any,
    frames: int,
    *,
    attention: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    n_timesteps: int = 10,
    names: Mapping[str, str] | None = None,
    available: int | None = None,
) -> None:
    """Raise InsufficientMemoryError before decoding ``frames`` mel frames offline if they cannot fit.

    ``names`` spells the alternatives for the caller: the CLI passes
    ``{"attention": "--attention", "stream": "--stream", "mode": "--mode"}``."""
    names = names or {}
    cli = names.get("attention", "attention").startswith("--")
    free = available_bytes(device) if available is None else available
    if free is None:
        return
    seconds = frames / (config.token_rate * config.token_mel_ratio)
    if cli:
        chunk_alt, stream_alt = "--attention chunk", "--stream --mode window --window-frames N"
    else:
        chunk_alt, stream_alt = "attention='chunk'", "t2w.stream(mode='window', window_frames=N)"
    if attention == "full":
        need = full_attention_bytes(config, frames, dtype)
        if need > FULL_ATTENTION_SHARE * free:
            limit = int((FULL_ATTENTION_SHARE * free / (need / frames**2)) ** 0.5)
            raise InsufficientMemoryError(
                f"full attention over {frames} mel frames ({seconds:.0f} s with the prompt) needs {_gb(need)} for "
                f"one attention matrix, more than half of the {_gb(free)} available on {torch.device(device)}: "
                f"the limit here is about {limit} frames; use {chunk_alt} (memory linear in length) or stream it "
                f"({stream_alt})"
            )
        return
    if frames <= ONE_SHOT_FRAMES:
        return
    need = kv_cache_bytes(config, frames, dtype, n_timesteps)
    if need > free:
        per_frame = need / frames
        raise InsufficientMemoryError(
            f"chunk attention over {frames} mel frames ({seconds:.0f} s with the prompt) keeps {_gb(need)} of "
            f"keys/values ({per_frame / 1e6:.1f} MB per frame), more than the {_gb(free)} available on "
            f"{torch.device(device)}: the limit here is about {int(free / per_frame)} frames; split the input, "
            f"or stream it with a bounded cache ({stream_alt})"
        )


def out_of_memory_message(exc: BaseException, what: str) -> str:
    """One line for an allocation that failed anyway (the estimate is not the whole story)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"out of memory during {what} ({text[:200]}); use a shorter input, attention='chunk', or stream it"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation (CPU or device), whatever type torch gave it."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
