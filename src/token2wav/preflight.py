"""Checks that the config alone decides, run before any weights are loaded.

Loading a full-size model takes seconds; a hop that is not a whole number of chunks, an unknown preset or an
out-of-range token id is known from the YAML alone. These functions raise the same kind of one-line
``ValueError`` the engine would, naming the argument as the caller spelled it: ``names`` maps an API argument
(``"window_frames"``) to the caller's spelling (the CLI passes ``{"window_frames": "--window-frames", ...}``).

The stream options' rules live in ``streaming/options.py`` (the engine applies the same ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import ModelConfig
from .streaming.options import StreamOptions

__all__ = ["CLI_NAMES", "check_stream_options", "check_token_ids"]

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


def check_stream_options(
    config: ModelConfig,
    *,
    preset: str | None = None,
    hop: int | None = None,
    mode: str | None = None,
    window_frames: int | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError for streaming options this model cannot run, before anything is loaded (the rules are
    ``StreamOptions.resolve``'s, the engine's own)."""
    # the lookahead the flow is built with, from its config (the loaded flow's own, as the engine reads it)
    flow = getattr(config, "flow", None)
    built = flow.get("pre_lookahead_len", config.pre_lookahead_len) if flow is not None else None
    StreamOptions(preset=preset, hop=hop, mode=mode or "cached", window_frames=window_frames).resolve(
        config, trained_lookahead=built, names=names)


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
