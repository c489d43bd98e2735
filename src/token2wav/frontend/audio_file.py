"""Sound files read with their size bounded before any work: what a small upload may make the server decode.

A 50 KB FLAC can decode to hundreds of MB, and a header can claim any rate, length or channel count. So the
header (frames, rate, channels) is read first and checked against the limits, and decoding then stops at the
limit whatever the header said (compressed streams may not know their length). Memory is at most
``MAX_DECODED_SAMPLES`` float32 samples (64 MB), whatever the file.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["MAX_CHANNELS", "MAX_DECODED_SAMPLES", "MAX_RATE", "read_audio_bounded"]

MAX_RATE = 384_000  # the highest rate of common recording hardware
MAX_CHANNELS = 8  # 7.1; a voice recording has one or two
MAX_DECODED_SAMPLES = 16 << 20  # samples over all channels: 64 MB of float32


def unreadable_reason(exc: Exception) -> str:
    """libsndfile's reason for refusing a file, without its "Error opening <object or path>: " prefix (which
    names an in-memory buffer by its address)."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^Error opening .*?: ", "", first)[:120] or type(exc).__name__


def _not_audio(source: bytes | str | Path, exc: Exception) -> ValueError:
    what = "body" if isinstance(source, bytes) else f"wav: {source}"
    return ValueError(f"{what} is not a readable audio file ({unreadable_reason(exc)})")


def read_audio_bounded(
    source: bytes | str | Path,
    max_seconds: float,
    *,
    limit_note: str = "",
    too_long: Callable[[float], str] | None = None,
) -> tuple[np.ndarray, int]:
    """Float32 samples ``[frames, channels]`` in [-1, 1] and their rate, from a sound file's bytes or path.

    Refused with ValueError, before decoding where the header tells: not audio; a rate outside [1, MAX_RATE];
    more than MAX_CHANNELS channels; longer than ``max_seconds`` (``limit_note`` says whose limit, or
    ``too_long(seconds)`` words the whole message); more than MAX_DECODED_SAMPLES samples. Where the header does
    not know the length, decoding stops at the limit.
    """
    import soundfile as sf

    def open_file() -> sf.SoundFile:
        return sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))

    try:
        f = open_file()
    except Exception as exc:  # libsndfile's "format not recognised", a truncated header, ...
        raise _not_audio(source, exc) from None
    with f:
        rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
        if not 1 <= rate <= MAX_RATE:
            raise ValueError(f"sample rate must be in [1, {MAX_RATE}] Hz, got {rate}")
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"channels must be in [1, {MAX_CHANNELS}], got {channels}")
        cap = min(math.floor(max_seconds * rate), MAX_DECODED_SAMPLES // channels)
        note = f" ({limit_note})" if limit_note else ""

        def refusal(n: int, at_least: bool = False) -> ValueError:
            if n > MAX_DECODED_SAMPLES // channels and n / rate <= max_seconds:
                return ValueError(f"audio of {n} frames x {channels} channels is over the {MAX_DECODED_SAMPLES} "
                                  "samples the server decodes")
            more = "more than " if at_least else ""
            if too_long is not None:
                return ValueError(too_long(n / rate))
            return ValueError(f"audio is {more}{n / rate:.2f} s long; at most {max_seconds:g} s is accepted{note}")

        if 0 < frames < (1 << 62) and frames > cap:  # the header tells: refuse before decoding anything
            raise refusal(frames)
        try:
            data = f.read(frames=cap + 1, dtype="float32", always_2d=True)
        except Exception as exc:
            raise _not_audio(source, exc) from None
    if data.shape[0] > cap:
        raise refusal(data.shape[0], at_least=True)
    return data, rate
