"""Tolerances of the tests' float comparisons, each with where it comes from (docs/exactness.md has the table).

Two results of the same float32 computation differ across CPUs and kernel settings (AVX-512, AVX2, torch's
default kernels; oneDNN, MKL and pocketfft) because sums are taken in another order (vector width, GEMM
blocking, thread count) and with or without fused multiply-adds. Each rounding is at most half an ulp, so a
reduction of K terms of size ~|x| moves by about sqrt(K) * EPS32 * |x| (at most K * EPS32 * |x|), and a chain of
D such layers carries that forward, each layer adding its own. The classes below are that estimate for the
sizes and depths we test, rounded up to a power of ten. Measured values on three kernel settings sit well
under each (docs/exactness.md); "bit-identical" is asserted only where the computation is integer, a copy, or
the same kernels on the same shapes in one process.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = 2.0**-23  # float32 machine epsilon, 1.19e-7

# One reduction (a convolution, a matmul row, an FFT frame, a mel filterbank) of up to ~4096 terms on values of
# size <= ~5: sqrt(4096) * EPS32 * 5 = 3.8e-5 worst-aligned, ~1e-6 for the signed, cancelling sums we have.
ONE_OP = 1e-6

# One pass of a 10-50 layer network (conformer, U-Net, DiT, HiFT's decoder) on activations of size ~1 to 5:
# ONE_OP per layer, carried forward through residual paths of gain ~1.
NETWORK = 1e-5

# A flow solve: N <= 10 Euler steps of a NETWORK pass, each step adding its error to the state it advances, on a
# mel of size ~5 to 6 (the fixtures' float64-vs-float32 runs differ by 1.4e-6 (CV3) and 1.5e-5 (CV2)).
SOLVE = 1e-4

# A relative error that last-bit differences of the inputs become after a float32 network (F0 from a mel, a mel
# from an embedding): 10 * EPS32 per layer over up to ~1000 rounding steps on the path, ~1e-6.
REL_AFTER_NETWORK = 1e-6

# The highest F0 the sine sources are driven with: speech stays under 500 Hz, and the random-weight test models'
# F0 predictors give 276-325 Hz on random mels (measured: cv2, cv3, tiny).
F0_MAX_HZ = 500.0

PCM_STEP = 1 / 32768  # one int16 step


def sine_source_audio(peak: float, seconds: float, rel: float = REL_AFTER_NETWORK) -> float:
    """Audio tolerance after a vocoder with a harmonic source (CosyVoice's HiFT; the demo's HiFi-GAN has none).

    The source's phase is the running sum of 2*pi*F0/sr, so a relative F0 error ``rel`` shifts the phase by up
    to 2*pi*F0_MAX_HZ*seconds*rel after ``seconds``, and a sine of amplitude ``peak`` moves by at most ``peak``
    times that. Plus the vocoder's own float32 pass (NETWORK, relative to ``peak``). Grows with length, as the
    measured differences do.
    """
    return peak * (2 * math.pi * F0_MAX_HZ * seconds * rel + NETWORK)


def pcm_steps(peak: float, seconds: float, rel: float = REL_AFTER_NETWORK) -> int:
    """:func:`sine_source_audio` in int16 steps, plus one for the rounding flip of a value near a half step."""
    return 1 + math.ceil(sine_source_audio(peak, seconds, rel) / PCM_STEP)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))
