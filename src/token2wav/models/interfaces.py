"""What the engine may ask of a flow, an estimator or a vocoder: declared interfaces, not attribute probes.

Each capability is a ``runtime_checkable`` Protocol; a model has it when it defines the methods (the models in
this package say which they implement). The streaming code asks ``isinstance(flow, CachedFlow)`` and so on, so
what a model must provide for each streaming path is written down in one place.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["CachedFlow", "KVLayoutEstimator", "RowsEstimator", "RowsFlow", "RowsSolver", "SteppedVocoder",
           "RowsVocoder", "WindowedEstimator"]


@runtime_checkable
class CachedFlow(Protocol):
    """A flow that streams with carried caches: a prompt state once, then one step per chunk."""

    def stream_start(self, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, **options: Any) -> Any: ...

    def stream_step(self, state: Any, tokens: Tensor, *, finalize: bool = False, **options: Any
                    ) -> tuple[Tensor, Any]: ...


@runtime_checkable
class RowsFlow(Protocol):
    """A cached flow that steps many sessions' chunks in one call, each row against its own cache."""

    def stream_step_rows(self, states: list[Any], tokens: list[Tensor], **options: Any) -> list[tuple[Tensor, Any]]: ...


@runtime_checkable
class RowsSolver(Protocol):
    """A flow decoder whose solver runs rows of different sessions together (paged keys/values)."""

    def solve_rows(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class RowsEstimator(Protocol):
    """An estimator that runs many sessions' new frames packed along time in one forward pass."""

    def forward_rows(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class KVLayoutEstimator(Protocol):
    """An estimator with attention caches: ``(layers, heads, dim_head)`` sizes one frame's keys and values."""

    def kv_layout(self) -> tuple[int, int, int]: ...


@runtime_checkable
class WindowedEstimator(Protocol):
    """An estimator whose attention cache can be trimmed to a window (rotary positions, the DiT)."""

    rotary_embed: Any


@runtime_checkable
class SteppedVocoder(Protocol):
    """A causal vocoder that streams with its own carried cache (CosyVoice 3's CausalHiFT)."""

    def stream_step(self, mel: Tensor, cache: Any = None, finalize: bool = False) -> tuple[Tensor, Any]: ...


@runtime_checkable
class RowsVocoder(Protocol):
    """A stepped vocoder that runs many sessions' chunks in one call."""

    def stream_step_rows(self, mels: list[Tensor], caches: list[Any], finalize: list[bool]
                         ) -> list[tuple[Tensor, Any]]: ...
