"""Row packing: the new frames of many streams run through one estimator call.

A cached decode of one stream computes a few dozen new frames per chunk, so its matrix products are small and
the call is dominated by per-operator costs (one weight read and one kernel launch per layer and step). Many
streams' chunks are therefore packed *along time* into one sequence ``[B, C, S]`` with ``S = sum(T_i)``, where
``B`` is the estimator's own batch (the two guidance branches). Everything that is frame-local (linear
layers, norms, activations, time modulation, since every stream is at the same solver step) runs once on the
packed sequence. Only what mixes frames is done per stream ("row"):

* causal convolutions: each row continues from its own tail. All rows go through *one* convolution call by
  interleaving ``[tail_0, x_0, tail_1, x_1, ...]`` and keeping the outputs that lie inside a row;
* attention: each row appends its keys/values to its own cache and attends to them with its own chunk mask,
  exactly as the row would alone.

Nothing is padded, so no row can see another row's frames, and every row's arithmetic is the arithmetic of
that row alone (up to the matrix-product blocking, which moves float32 results by ~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_store import PastKV, RowStore, extend_kv

__all__ = ["RowLayout", "packed_attention", "packed_causal_conv", "padded_causal_conv", "padded_rows", "unpadded_rows"]


@dataclass(frozen=True)
class RowLayout:
    """Where each row's frames sit in a packed sequence: row ``i`` is ``[starts[i], starts[i] + lengths[i])``."""

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"every row needs at least one frame, got lengths {self.lengths}")

    @cached_property
    def starts(self) -> tuple[int, ...]:
        out, pos = [], 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def split(self, x: Tensor, dim: int) -> tuple[Tensor, ...]:
        """The rows of a packed tensor (views)."""
        return torch.split(x, list(self.lengths), dim=dim)

    def conv_index(self, history: int, device: torch.device) -> Tensor:
        """Positions, in the output of a padding-free conv over ``[tail_0, x_0, tail_1, x_1, ...]`` (each tail
        ``history`` frames), of every row's frames, in packed order."""
        parts = [torch.arange(n) + start + i * history for i, (start, n) in enumerate(zip(self.starts, self.lengths))]
        return torch.cat(parts).to(device)

    def tail_index(self, history: int, device: torch.device) -> Tensor | None:
        """Positions in the packed sequence of every row's last ``history`` frames, row after row; None when a
        row is shorter than that (its tail then reaches into its old one)."""
        if history == 0 or min(self.lengths) < history:
            return None
        parts = [torch.arange(start + n - history, start + n) for start, n in zip(self.starts, self.lengths)]
        return torch.cat(parts).to(device)


def packed_causal_conv(
    conv: Callable[[Tensor], Tensor],
    x: Tensor,
    tails: Sequence[Tensor],
    layout: RowLayout,
    index: Tensor | None = None,
    tail_index: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """A causal convolution over packed rows, each continuing from its own tail.

    conv: a padding-free convolution (output length = input length - history); x ``[B, C, S]`` packed;
    tails: per row ``[B, C, history]``, the inputs just before the row. Returns the packed output and each
    row's new tail (its last ``history`` inputs, tail included when the row is shorter than that).
    index: ``layout.conv_index(history, ...)``, when the caller already has it; tail_index:
    ``layout.tail_index(history, ...)``, likewise (the new tails are then gathered in one call).
    """
    history = tails[0].shape[2]
    rows = layout.split(x, dim=2)
    if history == 0:
        return conv(x), [t for t in tails]
    seq = torch.cat([piece for pair in zip(tails, rows) for piece in pair], dim=2)
    y = conv(seq)
    if index is None:
        index = layout.conv_index(history, x.device)
    out = y.index_select(2, index)
    if tail_index is not None:
        return out, list(x.index_select(2, tail_index).split(history, dim=2))
    new_tails = []
    for tail, row in zip(tails, rows):
        if row.shape[2] >= history:
            new_tails.append(row[:, :, row.shape[2] - history :])
        else:
            new_tails.append(torch.cat([tail, row], dim=2)[:, :, -history:])
    return out, new_tails


def padded_rows(x: Tensor, rows: int) -> Tensor:
    """``[B, C, R * Q]`` with row ``r``'s frames at ``[r * Q, (r + 1) * Q)`` -> ``[B * R, C, Q]`` (branch-major):
    each row its own batch entry."""
    batch, channels, frames = x.shape
    return x.view(batch, channels, rows, frames // rows).transpose(1, 2).reshape(batch * rows, channels, -1)


def unpadded_rows(x: Tensor, batch: int) -> Tensor:
    """The inverse of ``padded_rows``: ``[B * R, C, Q]`` -> ``[B, C, R * Q]``."""
    entries, channels, queries = x.shape
    rows = entries // batch
    return x.view(batch, rows, channels, queries).transpose(1, 2).reshape(batch, channels, rows * queries)


def padded_causal_conv(
    conv: Callable[[Tensor], Tensor], x: Tensor, tail: Tensor, ends: Tensor
) -> tuple[Tensor, Tensor]:
    """A causal convolution of padded rows (fixed shapes, for a captured graph): x ``[N, C, Q]``, one row per
    entry, its real frames first; tail ``[N, C, history]``: the inputs just before each row; ends ``[N]``
    (int64): each row's number of real frames. conv: padding-free. Returns the output ``[N, C', Q]`` (a
    row's real frames see only its tail and its earlier frames) and each row's new tail, its last
    ``history`` real inputs (reaching into the old tail when the row is shorter)."""
    history = tail.shape[2]
    seq = torch.cat([tail, x], dim=2)
    index = (ends.view(-1, 1, 1) + torch.arange(history, device=ends.device)).expand(-1, x.shape[1], history)
    return conv(seq), seq.gather(2, index)


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pasts: Sequence[PastKV | None],
    masks: Sequence[Tensor | None],
    layout: RowLayout,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[tuple[RowStore | None, RowStore | None]]]:
    """Attention of packed rows, each against its own cache: q, k, v ``[B, H, S, d]``.

    pasts: per row, the cached keys/values (and stores) before its frames; masks: per row, a mask for
    ``[T_i, past_i + T_i]`` (bool or additive) or None. Returns the packed output ``[B, H, S, d]`` and, per
    row, its full keys, values and their stores.
    """
    outs, keys, values, stores = [], [], [], []
    for qi, ki, vi, past, mask in zip(layout.split(q, 2), layout.split(k, 2), layout.split(v, 2), pasts, masks):
        ki, vi, st = extend_kv(ki, vi, past)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=0.0))
        keys.append(ki)
        values.append(vi)
        stores.append(st)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out, keys, values, stores
