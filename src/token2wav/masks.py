"""Boolean attention masks (True = may attend / is valid).

Conventions follow the reference's WeNet-style helpers: ``make_pad_mask`` marks *padding* with True,
every other mask here marks *allowed* positions with True.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["make_pad_mask", "make_chunk_mask", "fill_empty_rows", "add_chunk_mask"]


def make_pad_mask(lengths: Tensor, max_len: int = 0) -> Tensor:
    """Return ``[B, max_len]`` bool, True where a position is padding (index >= its length).

    ``max_len <= 0`` means ``lengths.max()``.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    if max_len <= 0:
        max_len = int(lengths.max().item()) if lengths.numel() > 0 else 0
    steps = torch.arange(max_len, dtype=torch.int64, device=lengths.device)
    return steps.unsqueeze(0) >= lengths.to(torch.int64).unsqueeze(1)


def make_chunk_mask(
    size: int,
    chunk_size: int,
    num_left_chunks: int = -1,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Chunk-causal mask of shape ``[size, offset + size]``.

    Row ``i`` is the frame at absolute position ``p = offset + i``; column ``k`` is the key at absolute
    position ``k``. A frame sees every key up to the end of its own chunk (chunks laid on the grid
    ``0, chunk_size, 2*chunk_size, ...`` counted from position 0), never beyond the last existing key
    ``offset + size``. With ``num_left_chunks >= 0`` it additionally sees only that many whole chunks to
    the left of its own. ``chunk_size <= 0`` means full attention.

    ``offset > 0`` gives the rows of a cached decode: the new frames ``[offset, offset + size)`` against all
    keys ``[0, offset + size)``; it equals rows ``offset:`` of ``make_chunk_mask(offset + size, ...)``.
    """
    if size < 0 or offset < 0:
        raise ValueError(f"size and offset must be >= 0, got size={size}, offset={offset}")
    total = offset + size
    rows = torch.arange(offset, total, device=device)
    cols = torch.arange(total, device=device)
    if chunk_size <= 0:
        return torch.ones(size, total, dtype=torch.bool, device=device)
    chunk_idx = torch.div(rows, chunk_size, rounding_mode="floor")
    end = (chunk_idx + 1) * chunk_size  # exclusive; keys >= total do not exist anyway
    allowed = cols.unsqueeze(0) < end.unsqueeze(1)
    if num_left_chunks >= 0:
        start = ((chunk_idx - num_left_chunks) * chunk_size).clamp(min=0)
        allowed = allowed & (cols.unsqueeze(0) >= start.unsqueeze(1))
    return allowed


def fill_empty_rows(mask: Tensor) -> Tensor:
    """Return a copy of ``mask`` where every row (last dim) that allows nothing allows everything.

    Softmax over an all-masked row is NaN; the reference turns such rows (queries on padding) into
    full rows and relies on masking their outputs later. We do the same, without mutating the input.
    """
    empty = ~mask.any(dim=-1, keepdim=True)
    if not bool(empty.any()):
        return mask
    return mask | empty


def add_chunk_mask(valid: Tensor, chunk_size: int, num_left_chunks: int = -1) -> Tensor:
    """Combine a key-validity mask ``[B, 1, T]`` with the chunk-causal rule, giving ``[B, T, T]``.

    ``chunk_size <= 0``: no chunking; the result is ``valid`` itself (``[B, 1, T]``, broadcastable), exactly
    what the reference returns. Rows that end up all-false are made all-true (see ``fill_empty_rows``).
    """
    if valid.dtype != torch.bool or valid.dim() != 3 or valid.shape[1] != 1:
        raise ValueError(f"valid must be a bool [B, 1, T] tensor, got {valid.dtype} {tuple(valid.shape)}")
    if chunk_size > 0:
        chunks = make_chunk_mask(valid.shape[-1], chunk_size, num_left_chunks, device=valid.device)
        mask = valid & chunks.unsqueeze(0)
    else:
        mask = valid
    return fill_empty_rows(mask)
