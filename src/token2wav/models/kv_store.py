"""Growable key/value storage for attention caches (the DiT's and the U-Net's).

A cached decode appends a chunk's keys and values to every layer's cache on every solver step. ``cat``-ing
onto the old tensor would copy the whole cache each time (O(n^2) over a stream); ``append_rows`` writes
the new rows in place behind a shared store and copies only when the store is full, while every cache
object stays immutable in effect.
"""

from __future__ import annotations

import threading

from torch import Tensor

__all__ = ["PastKV", "RowStore", "append_rows", "extend_kv"]


class RowStore:
    """Growable storage ``[B, H, capacity, D]`` behind cached key/value views.

    Rows ``[0, length)`` are written once and never changed again. A cache holds the view
    ``data[:, :, :offset]``; extending it writes rows ``[offset, offset + n)`` in place, which is allowed only
    while nobody has written past ``offset`` (``length == offset``). Every existing view keeps seeing exactly
    what it saw, so caches stay immutable in effect, and a cache shared by many sessions (a voice prompt's)
    is extended in place by at most one of them; the others copy.
    """

    __slots__ = ("data", "length", "lock")

    def __init__(self, data: Tensor, length: int) -> None:
        self.data = data
        self.length = length
        self.lock = threading.Lock()

    def owns(self, view: Tensor) -> bool:
        """Whether ``view`` is this store's prefix of ``view.shape[2]`` rows."""
        data = self.data
        return (
            view.data_ptr() == data.data_ptr()
            and view.shape[:2] == data.shape[:2]
            and view.stride() == data.stride()
            and view.device == data.device
            and view.dtype == data.dtype
        )


def append_rows(past: Tensor, new: Tensor, store: RowStore | None) -> tuple[Tensor, RowStore]:
    """``cat([past, new], dim=2)`` without copying ``past`` when ``store`` holds it with room to spare.

    Returns the joined view and the store behind it. Falls back to a fresh store (one copy of ``past``)
    when ``past`` is not a view of ``store``, when another cache already extended that store beyond
    ``past``, or when it is full; capacity grows geometrically so the copies add up to O(total rows).
    """
    n_past, n_new = past.shape[2], new.shape[2]
    total = n_past + n_new
    if store is not None and n_past > 0 and store.owns(past):
        with store.lock:
            if store.length == n_past and store.data.shape[2] >= total:
                store.data[:, :, n_past:total] = new
                store.length = total
                return store.data[:, :, :total], store
    batch, heads, _, width = new.shape
    # Half again as much room (at least two more chunks): every row is copied about twice over a stream's
    # life. With an eighth, every other chunk of a full-size CosyVoice 3 stream on CPU took about 2 s longer
    # (of 6): each copy fills fresh pages of a multi-GB cache. Memory beyond what is used stays under a half.
    capacity = total + max(total // 2, 2 * n_new)
    data = new.new_empty(batch, heads, capacity, width)
    data[:, :, :n_past] = past
    data[:, :, n_past:total] = new
    fresh = RowStore(data, total)
    return data[:, :, :total], fresh


# One attention layer's cache as the layer receives it: keys, values and the stores behind them.
PastKV = tuple[Tensor, Tensor, RowStore | None, RowStore | None]


def extend_kv(k: Tensor, v: Tensor, past: PastKV | None) -> tuple[Tensor, Tensor, tuple[RowStore | None, ...]]:
    """A layer's new keys/values ``[B, H, T, d]`` joined after its cached ones (``past``), and their stores."""
    if past is None:
        return k, v, (None, None)
    past_k, past_v, k_store, v_store = past
    k, k_store = append_rows(past_k, k, k_store)
    v, v_store = append_rows(past_v, v, v_store)
    return k, v, (k_store, v_store)
