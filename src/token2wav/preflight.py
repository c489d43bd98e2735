"""Checks that the config alone decides, run before any weights are loaded.

Loading a full-size model takes seconds; a hop that is not a whole number of chunks, an unknown preset or an
out-of-range token id is known from the YAML alone. These functions raise the same kind of one-line
``ValueError`` the engine would, naming the argument as the caller spelled it: ``names`` maps an API argument
(``"window_frames"``) to the caller's spelling (the CLI passes ``{"window_frames": "--window-frames", ...}``).

The engine keeps its own checks (it is also used without this module); these run first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import ModelConfig
from .presets import PRESETS, resolve_preset
from .streaming.schedule import chunk_tokens, validate_hop

__all__ = ["CLI_NAMES", "check_stream_options", "check_token_ids"]

MODES = ("cached", "recompute", "window")

# API argument -> CLI flag, for messages printed by the command line.
CLI_NAMES: dict[str, str] = {
    "hop": "--hop",
    "preset": "--preset",
    "mode": "--mode",
    "window_frames": "--window-frames",
    "tokens": "--tokens",
    "dtype": "--dtype",
    "device": "--device",
    "attention": "--attention",
}


def _namer(names: Mapping[str, str] | None):
    names = names or {}

    def spell(arg: str, value: Any = None, *, with_value: bool = False) -> str:
        name = names.get(arg, arg)
        if not with_value:
            return name
        if name.startswith("--"):
            return f"{name} {value}"
        return f"{name}={value!r}"

    return spell


def check_stream_options(
    config: ModelConfig,
    *,
    preset: str | None = None,
    hop: int | None = None,
    mode: str | None = None,
    window_frames: int | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError for streaming options this model cannot run, before anything is loaded."""
    spell = _namer(names)
    if mode is not None and mode not in MODES:
        raise ValueError(f"{spell('mode')} must be one of {', '.join(MODES)}; got {mode!r}")
    settings = None
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{spell('preset')} must be one of {', '.join(PRESETS)}; got {preset!r}")
        settings = resolve_preset(preset, config)
    chunk = chunk_tokens(int(config.static_chunk_size), int(config.token_mel_ratio))
    session_chunk = chunk
    effective_hop = hop if hop is not None else (settings.hop if settings is not None else None)
    supported = getattr(config, "supported_chunk_tokens", None)
    if effective_hop is not None:
        dynamic = bool(supported) and effective_hop % chunk != 0 and supported[0] <= effective_hop <= supported[1]
        if dynamic:
            session_chunk = effective_hop
        elif hop is not None:
            try:
                validate_hop(hop, chunk, name=spell("hop"))
            except ValueError as exc:
                msg = str(exc).replace(f"{spell('hop')}={hop}", spell("hop", hop, with_value=True))
                if supported:
                    msg += f"; or any hop in {supported[0]}..{supported[1]} tokens (a dynamic chunk on this model)"
                raise ValueError(msg) from None
    if mode == "window":
        if window_frames is None:
            frames = session_chunk * int(config.token_mel_ratio)
            raise ValueError(
                f"{spell('mode', 'window', with_value=True)} needs {spell('window_frames')}: the target mel frames "
                f"kept in the attention cache, a positive multiple of the chunk ({frames} frames), e.g. "
                f"{spell('window_frames', 8 * frames, with_value=True)}"
            )
        if isinstance(window_frames, bool) or not isinstance(window_frames, int) or window_frames < 1:
            raise ValueError(f"{spell('window_frames')} must be a positive int, got {window_frames!r}")
        frames = session_chunk * int(config.token_mel_ratio)
        if window_frames % frames:
            lower = max(frames, window_frames - window_frames % frames)
            raise ValueError(
                f"{spell('window_frames', window_frames, with_value=True)} must be a multiple of the chunk "
                f"({frames} frames), e.g. {lower} or {lower + frames}"
            )
        if config.family != "cosyvoice3":
            raise ValueError(
                f"{spell('mode', 'window', with_value=True)} trims the DiT attention cache of CosyVoice 3-style "
                f"models; {config.path.name} is a {config.family} model: use {spell('mode', 'cached', with_value=True)}"
            )
    elif window_frames is not None:
        raise ValueError(f"{spell('window_frames')} applies only with {spell('mode', 'window', with_value=True)}")


def check_token_ids(tokens: Any, config: ModelConfig, *, name: str = "tokens") -> None:
    """Raise ValueError if a token id lies outside ``[0, vocab_size)`` of the model (index and value named)."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    vocab = int(config.vocab_size)
    bad = np.flatnonzero((flat < 0) | (flat >= vocab))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}: token id {int(flat[i])} at position {i} is outside the model's vocabulary: ids must be in "
            f"[0, {vocab}) for {config.path.name} ({bad.size} id(s) out of range)"
        )
