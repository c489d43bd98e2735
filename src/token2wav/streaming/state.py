"""Per-session streaming state, and the prompt cache shared between sessions.

A session's state is plain data: the tokens it has been given, where the next emission starts, the
flow's cache (whatever ``flow.stream_step`` returns) and the vocoder's cache. Models never hold any of it,
which is what lets one loaded model serve many sessions at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..budget import BudgetedLRU, MemoryBudget
from ..models.kv_store import RowStore


@dataclass
class CrossFadeVocoderState:
    """The reference's CosyVoice 2 vocoder hand-over between calls.

    Each call re-vocodes the previous call's last ``mel_tail`` frames ahead of its own mel, continues the
    harmonic source from ``source_tail``, and cross-fades its first samples with ``speech_tail`` (the samples
    the previous call held back) under a Hamming window.
    """

    mel_tail: torch.Tensor | None = None  # [1, mel_dim, mel_cache_len]
    source_tail: torch.Tensor | None = None  # [1, 1, source_cache_len]
    speech_tail: torch.Tensor | None = None  # [1, source_cache_len]


@dataclass
class RevocodeState:
    """Recompute mode with a causal vocoder: all mel so far is re-vocoded by every call."""

    mel: torch.Tensor | None = None  # [1, mel_dim, frames]
    speech_offset: int = 0


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated prompt on the model's device.

    tokens [1, P] int64, feat [1, P * ratio, mel_dim], embedding [1, spk_embed_dim].
    """

    tokens: torch.Tensor
    feat: torch.Tensor
    embedding: torch.Tensor
    digest: str

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])


@dataclass
class SessionState:
    """Everything a session mutates. Replaced field by field only after a call has fully succeeded."""

    tokens: torch.Tensor  # [1, n] int64, target tokens received so far
    offset: int = 0  # first target token not yet emitted
    index: int = 0  # number of emissions made
    vocoder_calls: int = 0
    flow_state: Any = None
    vocoder_state: Any = None
    finished: bool = False
    closed: bool = False
    chunk_frames: list[int] = field(default_factory=list)  # mel frames per emitted chunk (for inspection)

    @property
    def available(self) -> int:
        return int(self.tokens.shape[1])


# ----------------------------------------------------------------------------------------------------
# Prompt cache
# ----------------------------------------------------------------------------------------------------


def tensor_digest(*tensors: torch.Tensor | np.ndarray) -> str:
    """A content hash of tensors: dtype, shape and bytes of each, in order."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            arr = t.detach().cpu().contiguous().numpy()
        else:
            arr = np.ascontiguousarray(t)
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class PromptCache:
    """A bounded, thread-safe LRU of prompt states keyed by content.

    Concurrent requests for the same missing key compute it once: the first caller builds it under a
    per-key lock while later callers wait on that lock, then read the stored value. Values are shared
    read-only. Bounded by count (``maxsize``) and by bytes: states are charged to the ``prompt_states``
    account of a :class:`token2wav.budget.MemoryBudget` (:meth:`use_budget`; a server's ``--max-cache-mb``).
    """

    def __init__(self, maxsize: int = 16, budget: MemoryBudget | None = None):
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self._items = BudgetedLRU(budget or MemoryBudget(), "prompt_states", maxsize)
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    @property
    def maxsize(self) -> int:
        return int(self._items.maxsize or 0)

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"maxsize must be >= 0, got {value}")
        with self._lock:
            self._items.maxsize = value

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._items.nbytes

    def use_budget(self, budget: MemoryBudget) -> None:
        """Charge the cached states to ``budget`` from now on (the oldest dropped where they do not fit)."""
        with self._lock:
            self._items.rebudget(budget)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self.hits += 1
                return self._items.get(key)
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:  # built by another thread while we waited
                    self.hits += 1
                    return self._items.get(key)
                self.misses += 1
            try:
                value = compute()
            except BaseException:
                with self._lock:
                    self._building.pop(key, None)
                raise
            with self._lock:
                self._items.put(key, value)  # not kept if it does not fit the budget: still returned
                self._building.pop(key, None)
            return value


# ----------------------------------------------------------------------------------------------------
# Window mode: bounded attention cache
# ----------------------------------------------------------------------------------------------------
#
# The flow's cached state keeps, per solver step, a DiT cache of keys/values for every committed frame.
# Window mode keeps the first ``head_frames`` (the prompt's chunks) and the last ``window_frames`` and
# drops the frames between. The estimator knows nothing about this, so the cache is kept self-consistent:
#
# * The DiT places new frames at cache position ``cache.offset`` (rotary angle and chunk mask). After
#   dropping ``d`` frames that position is ``d`` too small, so every kept key is rotated back by ``d``
#   positions too: only position differences enter rotary attention, and they stay exact.
# * New frames see every cached key (all left chunks are visible), so the mask is right whenever the
#   shift is a whole number of chunks, which holds because head, window and commits are chunk-aligned.
# * The solver's fixed noise must stay at absolute frames: the step caches are wrapped in a CFMCache
#   whose ``offset`` adds the shift back (``frames_done`` minus the cache length).


def _windowed_cfm_cache_class() -> type:
    from ..models.cfm import CFMCache

    @dataclass(frozen=True)
    class ShiftedCFMCache(CFMCache):
        """CFMCache whose caches hold ``shift`` fewer frames than the absolute position they stand at."""

        shift: int = 0

        @property
        def offset(self) -> int:
            return int(self.steps[0].offset) + self.shift

    return ShiftedCFMCache


_SHIFTED: type | None = None


def _rotate_positions_(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate keys ``[B, heads, T, dh]`` in place on the first ``2 * len(cos)`` flattened channels, channel pair
    ``i`` by the angle whose cosine and sine are ``cos[i]``, ``sin[i]``.

    The DiT applies rotary embeddings to the flattened ``[B, T, heads * dh]`` projection, channel pairs
    ``(2i, 2i + 1)`` interleaved; a further rotation by the same per-pair angle composes with it. Its rotary
    width is ``dim_head``, so only head 0 turns and only that slice is computed.
    """
    rot, dh = 2 * cos.shape[-1], keys.shape[-1]
    for head in range(-(-rot // dh)):
        width = min(dh, rot - head * dh)
        pairs = keys[:, head, :, :width].unflatten(-1, (-1, 2))
        c, s = cos[head * dh // 2 : (head * dh + width) // 2], sin[head * dh // 2 : (head * dh + width) // 2]
        x, y = pairs[..., 0].clone(), pairs[..., 1].clone()
        pairs[..., 0] = x * c - y * s
        pairs[..., 1] = x * s + y * c


def _kept_rows(rows: torch.Tensor, head: int, drop: int, room: int) -> tuple[torch.Tensor, RowStore]:
    """``rows`` ``[B, H, T, d]`` without rows ``[head, head + drop)``, in a fresh store with ``room`` spare rows
    so that the next chunk appends in place."""
    b, h, t, d = rows.shape
    kept = t - drop
    data = rows.new_empty(b, h, kept + room, d)
    data[:, :, :head] = rows[:, :, :head]
    data[:, :, head:kept] = rows[:, :, head + drop :]
    return data[:, :, :kept], RowStore(data, kept)


def trim_flow_state(state: Any, *, head_frames: int, window_frames: int, estimator: torch.nn.Module) -> Any:
    """Drop cached frames between the first ``head_frames`` and the last ``window_frames`` (see above)."""
    global _SHIFTED
    from dataclasses import replace

    cache = getattr(state, "cache", None)
    if cache is None or not cache.steps:
        return state
    if _SHIFTED is None:
        _SHIFTED = _windowed_cfm_cache_class()
    kept = int(cache.steps[0].offset)
    shift = int(state.frames_done) - kept
    excess = kept - head_frames - window_frames
    if excess <= 0:
        return replace(state, cache=_SHIFTED(steps=cache.steps, modulations=cache.modulations, shift=shift))
    rotary = estimator.rotary_embed
    angles = rotary.angles(-excess, 1)[0, 0::2]  # one angle per channel pair, the same for every layer
    cos, sin = angles.cos(), angles.sin()
    room = max(excess, 1)  # the next chunk's frames: appended in place, then trimmed again
    steps = []
    for step in cache.steps:
        keys, values, stores = [], [], []
        for k, v in zip(step.keys, step.values):
            k, k_store = _kept_rows(k, head_frames, excess, room)
            _rotate_positions_(k, cos.to(k.device), sin.to(k.device))
            v, v_store = _kept_rows(v, head_frames, excess, room)
            keys.append(k)
            values.append(v)
            stores.append((k_store, v_store))
        fields = {"offset": kept - excess, "keys": tuple(keys), "values": tuple(values)}
        if hasattr(step, "stores"):
            fields["stores"] = tuple(stores)
        steps.append(replace(step, **fields))
    return replace(state, cache=_SHIFTED(steps=tuple(steps), modulations=cache.modulations, shift=shift + excess))
