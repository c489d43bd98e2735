"""Padded sizes for batched steps: a few shapes instead of one per batch.

A batched attention call is padded to (rows, new frames per row, keys per row) from a small set, so that a
step can be captured once per shape (a CUDA graph) and replayed, and so that an allocator sees the same
sizes again and again. Pure integer logic.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ShapeBuckets"]


def _round_up(n: int, sizes: tuple[int, ...], multiple: int) -> int:
    """The smallest of ``sizes`` that is ``>= n``; beyond the largest, ``n`` rounded up to ``multiple``."""
    for size in sizes:
        if size >= n:
            return size
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ShapeBuckets:
    """rows: batch sizes; queries: new frames per row (beyond the largest: multiples of it); keys: keys per row
    (beyond the largest: multiples of ``keys_multiple``). Key sizes grow by about half from one to the next, so
    a stream of any length meets only a dozen or so (each a captured graph per rows and queries); the padded
    keys cost attention work only."""

    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    queries: tuple[int, ...] = (16, 32, 64, 128)
    keys: tuple[int, ...] = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
    keys_multiple: int = 2048

    def __post_init__(self) -> None:
        for name in ("rows", "queries", "keys"):
            sizes = getattr(self, name)
            if not sizes or any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"{name} must be increasing positive sizes, got {sizes}")
        if self.keys_multiple < 1:
            raise ValueError(f"keys_multiple must be >= 1, got {self.keys_multiple}")

    def pad(self, rows: int, queries: int, keys: int) -> tuple[int, int, int]:
        """The padded (rows, queries, keys) for a step with that many rows, most new frames and most keys."""
        return (
            _round_up(rows, self.rows, self.rows[-1]),
            _round_up(queries, self.queries, self.queries[-1]),
            _round_up(keys, self.keys, self.keys_multiple),
        )

    def describe(self) -> dict[str, object]:
        return {"rows": list(self.rows), "queries": list(self.queries), "keys": list(self.keys),
                "keys_multiple": self.keys_multiple}
