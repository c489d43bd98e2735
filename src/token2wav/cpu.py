"""What this machine's CPU offers, and which compute path token2wav takes on it.

Detected once at start from the CPU's feature flags and torch's own kernel level (which the environment can
lower: ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``), and shown by ``token2wav info``, the demo and the
benchmarks, so a user sees which path runs and a number can be traced to the kernels that made it.

The default path is the same on every CPU: float32 everywhere, oneDNN convolutions, the HiFi-GAN vocoder in
the channels-last layout. Native bfloat16 (AMX, AVX512-BF16) is reported, and used only when asked for: the whole
demo vocoder in bfloat16 is 2.3x faster but 19 dB SNR off float32 (max |error| 0.54), far outside the tolerance
streamed audio is held to; ``vocoder_precision="bfloat16-mixed"`` (``--vocoder-precision``) runs its middle
stages in bfloat16, 1.4x faster at 48.6 dB SNR (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["CPUInfo", "detect_cpu"]

# The feature flags (as /proc/cpuinfo names them) that decide a kernel's speed here, widest first.
_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")


@dataclass(frozen=True)
class CPUInfo:
    """model: the CPU's name; kernels: torch's vector kernel level in use (``AVX512``, ``AVX2``, ``DEFAULT``);
    features: the flags of ``_FEATURES`` the CPU has; onednn: oneDNN convolutions available; limits: the
    environment variables that lower the kernels, as set; threads: torch's intra-op threads."""

    model: str
    kernels: str
    features: tuple[str, ...]
    onednn: bool
    limits: tuple[str, ...]
    threads: int

    @property
    def native_bf16(self) -> bool:
        return "amx_bf16" in self.features or "avx512_bf16" in self.features

    @property
    def bf16_in_reach(self) -> bool:
        """Native bfloat16 that oneDNN may use: present, and not limited away (``ONEDNN_MAX_CPU_ISA`` below it)."""
        isa = next((v.split("=", 1)[1].upper() for v in self.limits if v.startswith("ONEDNN_MAX_CPU_ISA=")), None)
        return self.native_bf16 and (isa is None or isa == "ALL" or "BF16" in isa or "AMX" in isa)

    @property
    def path(self) -> str:
        """The compute path token2wav takes on this CPU, in words."""
        convs = "oneDNN convolutions (HiFi-GAN channels-last)" if self.onednn else "torch's own convolutions"
        bf16 = ("; native bfloat16 present (used only with --vocoder-precision bfloat16-mixed)"
                if self.native_bf16 else "")
        return f"float32, {self.kernels} kernels, {convs}{bf16}"

    def describe(self) -> str:
        """One line: the CPU, its features, the path, the threads."""
        features = " ".join(self.features) or "no AVX2"
        limits = f"; limited by {' '.join(self.limits)}" if self.limits else ""
        return f"{self.model} ({features}); {self.path}; {self.threads} threads{limits}"

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "kernels": self.kernels, "features": list(self.features),
                "onednn": self.onednn, "native_bf16": self.native_bf16, "limits": list(self.limits),
                "threads": self.threads, "path": self.path}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model and flags and key == "":
                    break  # the first processor's block is enough
    except OSError:  # not Linux: the name alone, features from torch's level below
        pass
    return model, flags


@lru_cache(maxsize=1)
def _static() -> tuple[str, str, tuple[str, ...], bool, tuple[str, ...]]:
    model, flags = _cpuinfo()
    kernels = torch.backends.cpu.get_cpu_capability()
    features = tuple(f for f in _FEATURES if f in flags)
    if not flags:  # no flag list: what torch's kernel level implies
        features = {"AVX512": ("avx512f", "avx2"), "AVX2": ("avx2",)}.get(kernels, ())
    limits = tuple(f"{name}={os.environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                             "MKL_ENABLE_INSTRUCTIONS") if name in os.environ)
    return model, kernels, features, bool(torch.backends.mkldnn.is_available()), limits


def detect_cpu() -> CPUInfo:
    """This machine's CPU and the path token2wav takes on it (threads as torch has them now)."""
    model, kernels, features, onednn, limits = _static()
    return CPUInfo(model, kernels, features, onednn, limits, torch.get_num_threads())
