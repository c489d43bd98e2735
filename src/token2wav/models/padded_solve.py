"""A batched chunk solve with fixed shapes, captured once per shape as a CUDA graph and replayed.

``cfm.solve_rows`` packs the rows' new frames along time, so every call has new shapes: fine for eager
execution, impossible to capture. Here the rows are padded to a bucket (rows R, new frames per row Q, keys
per row K; ``models/buckets.py``): row ``r``'s frames sit at ``[r * Q, r * Q + n_r)``, its caches live in the
page pool, and every input of the whole solve (all Euler steps, both guidance branches) is a preallocated
buffer that each call fills in place: noise, mu, cond, speaker, the per-frame position terms (a DiT's rotary
angles), every causal convolution's tails at every step, the pool indices and the attention mask. The solve
itself (``_Bucket.body``) then touches only those buffers, the weights and the pool, so on CUDA it is captured
once per bucket (``graphs=True``) and each later call is one replay; on a CPU (or with ``graphs=False``) the
same body runs eagerly.

Exactness: padding frames sit after a row's real frames, write their keys to the pool's padding page and are
masked out of every real query, and each row is its own batch entry of the causal convolutions, so a row's
real frames get what they get alone (tested against the unpadded path). The estimator provides the pieces
(``has_fixed_shapes``): CosyVoice 3's DiT and CosyVoice 2's U-Net both do.
The pool must not be reallocated under a captured graph: a bucket recaptures when the pool has grown since.
A captured graph freezes every host value the body used (sizes, Python numbers) and the addresses of every tensor
it read, so the body reads per-call data only from the buffers; ``capture`` lets a test replay the body the way
a graph would on a CPU and check exactly that.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..budget import BudgetedLRU, MemoryBudget
from .buckets import ShapeBuckets
from .kv_pool import KVPool, PageTable, PooledRows

__all__ = ["FixedShapeEstimator", "PaddedSolver", "Replayable", "capture_cuda_graph", "has_fixed_shapes"]


class Replayable(Protocol):
    def replay(self) -> None: ...


class FixedShapeEstimator(Protocol):
    """What an estimator provides for fixed-shape solves (CosyVoice 3's DiT and CosyVoice 2's U-Net do).

    Layout: row ``r``'s new frames sit at ``[r * Q, r * Q + n_r)`` of x, mu, cond ``[B, C, R * Q]`` and spk
    ``[B, C_spk, R * Q]`` (speaker per frame), the rest is padding; per-row tensors are ``[B * R, ...]``,
    branch-major. A row's real frames must see only its tails, its earlier frames and its keys (in ``kv``).
    """

    def padded_constants(self, t: Tensor) -> Any:
        """The time-only terms of a solver step at ``t`` ``[2]`` (both guidance branches)."""

    def padded_terms(self, positions: Tensor) -> dict[str, Tensor]:
        """Per padded frame (absolute ``positions``), the inputs ``forward_padded`` takes by name."""

    def padded_tails(self, cache: Any) -> tuple[Tensor, ...]:
        """A row's causal-convolution tails ``[B, C, history]`` in a step cache, in network order."""

    def padded_advance(self, cache: Any, frames: int, chunk_size: int, tails: Sequence[Tensor]) -> Any:
        """A paged step cache moved on by ``frames`` with new tails (keys and values are in the pool)."""

    def forward_padded(self, x: Tensor, mu: Tensor, cond: Tensor, spk: Tensor | None, *, tails: Sequence[Tensor],
                       ends: Tensor, kv: PooledRows, step: int, constants: Any,
                       **terms: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
        """The velocity ``[B, C_out, R * Q]`` and the new tails. tails: per conv, every row's stacked
        ``[B * R, C, history]``; ends ``[B * R]``: ``n_r``; kv: the padded pool layout; step: the solver step
        (the pool's step index); constants: ``padded_constants``; terms: ``padded_terms``."""


def capture_cuda_graph(body: Callable[[], None], *, device: torch.device, memory_pool: Any) -> Replayable:
    """``body`` captured as a CUDA graph (not run: the caller replays it)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()  # warm-up (kernels pick their algorithms outside the capture)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: callers' threads keep using the GPU (planning, vocoding) while this one captures; every
    # shape's graph draws on one memory pool (replays never overlap: they share a stream)
    with torch.cuda.graph(graph, pool=memory_pool, capture_error_mode="thread_local"):
        body()
    return graph


class _Bucket:
    """The buffers and the (captured) solve for one padded size."""

    def __init__(self, solver: PaddedSolver, rows: int, queries: int, keys: int, channels: tuple[int, int, int],
                 terms: dict[str, Tensor], tails: Sequence[Tensor]) -> None:  # fmt: skip
        pool = solver.pool
        device, dtype = pool.device, solver.dtype
        frames = rows * queries
        mel, mu, spk = channels
        self.rows, self.queries, self.keys = rows, queries, keys
        self.x0 = torch.zeros(1, mel, frames, device=device, dtype=dtype)
        self.mu = torch.zeros(1, mu, frames, device=device, dtype=dtype)
        self.cond = torch.zeros(1, mel, frames, device=device, dtype=dtype)
        self.spk = torch.zeros(1, spk, frames, device=device, dtype=dtype) if spk else None
        self.terms = {name: torch.zeros_like(value, device=device) for name, value in terms.items()}
        # per causal conv: every step's and row's tail, [steps, 2R, C, history] (branch-major), and the new ones
        # (one buffer per conv, filled with one copy per call)
        self.tails = [t.new_zeros(solver.n_timesteps, 2 * rows, *t.shape[1:], device=device) for t in tails]
        self.new_tails = [torch.zeros_like(t) for t in self.tails]
        self.ends = torch.zeros(2 * rows, device=device, dtype=torch.long)
        self.mel = torch.zeros(1, mel, frames, device=device, dtype=torch.float32)
        self.kv = PooledRows(
            pool=pool, rows=rows, queries=queries, keys=keys,
            write_index=torch.zeros(frames, device=device, dtype=torch.long),
            read_index=torch.zeros(rows * keys, device=device, dtype=torch.long), query_index=None, out_index=None,
            mask=torch.zeros(pool.branches * rows, 1, queries, keys, device=device, dtype=pool.dtype),
        )  # fmt: skip
        self.solver = solver
        self.lock = threading.Lock()
        self.graph: Any = None
        own = [self.x0, self.mu, self.cond, self.spk, *self.terms.values(), *self.tails, *self.new_tails, self.ends,
               self.mel, self.kv.write_index, self.kv.read_index, self.kv.mask]
        self.nbytes = sum(t.numel() * t.element_size() for t in own if t is not None)  # the pool is not its own
        self.generation = -1  # pool.grown when the graph was captured

    def body(self) -> None:
        """The whole solve on the buffers (what a graph captures)."""
        solver = self.solver
        cfm, est = solver.cfm, solver.cfm.estimator
        mu_in, cond_in = cfm.guidance_pair(self.mu), cfm.guidance_pair(self.cond)
        spk_in = cfm.guidance_pair(self.spk) if self.spk is not None else None
        x = self.x0
        for step, (_, dt) in enumerate(solver.steps):
            raw, new = est.forward_padded(
                torch.cat([x, x], dim=0), mu_in, cond_in, spk_in, tails=[t[step] for t in self.tails],
                ends=self.ends, kv=self.kv, step=step, constants=solver.constants[step], **self.terms,
            )  # fmt: skip
            for buffer, tail in zip(self.new_tails, new):
                buffer[step].copy_(tail)
            x = x + dt * cfm.guided(raw)
        self.mel.copy_(x.float())

    def run(self) -> None:
        if not self.solver.graphs:
            self.body()
            return
        pool = self.solver.pool
        if self.graph is None or self.generation != pool.grown:
            self._capture()
        self.graph.replay()

    def _capture(self) -> None:
        generation = self.solver.pool.grown
        self.graph, self.generation = self.solver.capture(self.body), generation
        self.solver.captures += 1


class PaddedSolver:
    """``cfm.solve_rows`` with fixed shapes per bucket (see the module docstring), for a
    ``FixedShapeEstimator``.

    One per (flow, page pool); ``graphs``: capture and replay CUDA graphs (the pool must be on CUDA);
    max_shapes: how many shapes (buffers and graphs) to keep, the least recently used dropped beyond that;
    capture: with ``graphs``, what turns a shape's solve into something replayable (default: a CUDA graph;
    tests give a CPU stand-in that replays the recorded operator calls the way a graph does). budget: the
    buffers are charged to its ``fixed_shape_buffers`` account; the least recently used shapes are dropped
    to make room, and a shape that cannot fit alone is used for its call and not kept.
    """

    def __init__(
        self,
        cfm: Any,
        pool: KVPool,
        *,
        buckets: ShapeBuckets,
        graphs: bool,
        max_shapes: int = 64,
        capture: Callable[[Callable[[], None]], Replayable] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        est = cfm.estimator
        if not has_fixed_shapes(est):
            raise ValueError(f"fixed-shape batches need an estimator with forward_padded; {type(est).__name__} "
                             "has none")  # fmt: skip
        if graphs and capture is None and pool.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {pool.device}")
        self.cfm, self.pool, self.buckets, self.graphs = cfm, pool, buckets, graphs
        self.dtype = next(est.parameters()).dtype
        self.n_timesteps = pool.steps
        device = pool.device
        # the Euler steps and their time-only terms, once, as solve_chunk computes them (constants to a graph)
        self.steps = cfm.euler_steps(cfm.time_span(self.n_timesteps, device, self.dtype))
        with torch.inference_mode():
            self.constants = tuple(est.padded_constants(t.reshape(1).expand(2).contiguous()) for t, _ in self.steps)
        if graphs and capture is None:
            capture = functools.partial(capture_cuda_graph, device=device, memory_pool=torch.cuda.graph_pool_handle())
        self.capture = capture
        self.max_shapes = max_shapes
        self._buckets = BudgetedLRU(budget or MemoryBudget(), "fixed_shape_buffers", max_shapes)
        self._lock = threading.Lock()
        self.captures = 0

    def shapes(self) -> list[tuple[int, int, int]]:
        """The (rows, queries, keys) sizes met so far (each one bucket, one graph with ``graphs``)."""
        with self._lock:
            return sorted(self._buckets)

    def _bucket(self, rows: int, queries: int, keys: int, make: Callable[[], _Bucket]) -> _Bucket:
        with self._lock:
            key = (rows, queries, keys)
            bucket = self._buckets.get(key)
            if bucket is None:  # a dropped bucket still in use by a caller stays alive until that call ends
                bucket = make()
                self._buckets.put(key, bucket, bucket.nbytes)
            return bucket

    def solve(
        self,
        x: Tensor,
        mu: Tensor,
        cond: Tensor,
        spk: Tensor | None,
        *,
        caches: Sequence[Sequence[Any]],
        tables: Sequence[PageTable],
        offsets: Sequence[int],
        lengths: Sequence[int],
        chunk_sizes: Sequence[int],
    ) -> tuple[Tensor, list[list[Any]]]:
        """x (the starting noise), mu, cond ``[1, C, S]`` and spk ``[1, spk_dim, S]`` packed like
        ``solve_rows``'s rows (``lengths``); caches: each row's per-step estimator caches (paged, at
        ``offsets``); tables: their pages, reserved up to ``offset + length``. Returns the packed mel ``[1,
        C, S]`` (float32) and, per row, its step caches moved on (``padded_advance``)."""
        real = len(lengths)
        rows, queries, keys = self.buckets.pad(real, max(lengths), max(o + n for o, n in zip(offsets, lengths)))
        est = self.cfm.estimator
        positions = torch.arange(queries).repeat(rows)
        positions[: real * queries] += torch.tensor(list(offsets)).repeat_interleave(queries)
        terms = est.padded_terms(positions)
        row_tails = [[est.padded_tails(c[s]) for c in caches] for s in range(self.n_timesteps)]
        channels = (x.shape[1], mu.shape[1], 0 if spk is None else spk.shape[1])
        bucket = self._bucket(rows, queries, keys,
                              lambda: _Bucket(self, rows, queries, keys, channels, terms, row_tails[0][0]))  # fmt: skip
        device = self.pool.device
        pad_index = torch.cat([torch.arange(n) + r * queries for r, n in enumerate(lengths)]).to(device)
        ends = torch.zeros(rows, dtype=torch.long)
        ends[:real] = torch.tensor(list(lengths))
        layout = PooledRows.build(self.pool, tables, offsets, lengths, chunk_sizes, rows=rows, queries=queries,
                                  keys=keys, padded=True)  # fmt: skip
        with bucket.lock, self.pool.reading():
            bucket.x0.index_copy_(2, pad_index, x.to(self.dtype))
            bucket.mu.index_copy_(2, pad_index, mu.to(self.dtype))
            bucket.cond.index_copy_(2, pad_index, cond.to(self.dtype))
            if spk is not None:
                bucket.spk.index_copy_(2, pad_index, spk.to(self.dtype))
            for name, value in terms.items():
                bucket.terms[name].copy_(value)
            bucket.ends.copy_(ends.repeat(2))
            bucket.kv.copy_(layout)
            steps = self.n_timesteps
            for j, buffer in enumerate(bucket.tails):
                stacked = torch.stack([per_row[r][j] for per_row in row_tails for r in range(real)])
                per_step = stacked.view(steps, real, *stacked.shape[1:]).transpose(1, 2)  # [steps, 2, real, C, h]
                buffer.view(steps, 2, rows, *buffer.shape[2:])[:, :, :real].copy_(per_step)
            bucket.run()
            mel = bucket.mel.index_select(2, pad_index)
            new = [t.clone().view(steps, 2, rows, *t.shape[2:]) for t in bucket.new_tails]
        advanced = []
        for r, (row_caches, n, chunk) in enumerate(zip(caches, lengths, chunk_sizes)):
            advanced.append([est.padded_advance(cache, n, chunk, [t[s, :, r] for t in new])
                             for s, cache in enumerate(row_caches)])  # fmt: skip
        return mel, advanced


def has_fixed_shapes(estimator: Any) -> bool:
    """Whether an estimator can run fixed-shape (graph-captured) solves (is a ``FixedShapeEstimator``)."""
    return all(hasattr(estimator, name) for name in
               ("forward_padded", "padded_constants", "padded_terms", "padded_tails", "padded_advance"))
