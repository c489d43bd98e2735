"""token2wav: a streaming speech-token to waveform engine for CosyVoice-family flow-matching decoders."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, read_config
from .loading import build_flow, build_vocoder, load_flow, load_vocoder
from .version import __version__ as __version__

__all__ = [
    "read_config",
    "ModelConfig",
    "build_flow",
    "load_flow",
    "build_vocoder",
    "load_vocoder",
    "Token2Wav",
    "Prompt",
    "Batcher",
]


def __getattr__(name: str) -> Any:
    # The engine imports every model; keep `import token2wav` light for config-only users.
    if name in ("Token2Wav", "Prompt"):
        from .streaming import engine

        return getattr(engine, name)
    if name == "Batcher":
        from .streaming.batcher import Batcher

        return Batcher
    raise AttributeError(f"module 'token2wav' has no attribute {name!r}")
