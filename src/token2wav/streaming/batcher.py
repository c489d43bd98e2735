"""Continuous batching: the ready chunks of many sessions run as one model call.

One ``Batcher`` owns an engine's model calls. Its sessions (``BatchedSession``: the ``StreamSession`` API plus
``apush`` / ``afinish`` for asyncio) validate and plan their chunks on the caller's thread, then hand each
chunk to the batcher as a job and wait for it. Worker threads (one on a GPU, two per core on a CPU) gather the
queued jobs, group those that can share a solver pass, and run each group as one ``flow.stream_step_rows`` call
(all solver steps, both guidance branches, every row against its own cache) followed by a batched vocoder step
where the vocoder has one (HiFi-GAN windows of equal length, causal HiFT rows in the same state).

Exactness: a row's chunk is what the session computes alone (``stream_step_rows`` is tested against
``stream_step``), whatever else shares the call. Rows commit only after their whole chunk succeeded, so a
row that fails (or whose session was closed meanwhile) leaves its session unchanged and the other rows'
results untouched: when a packed call raises, its rows are re-run one by one to find the culprit.

Scheduling: a job waits at most ``max_wait_ms`` for others to join, and only while some session is in the
middle of a push and has not queued its next chunk yet (waiting for nobody would only add latency). First
chunks go before later ones. Rows of one call share ``n_timesteps`` and the flow; ``recompute`` sessions
run alone.

Keys/values: ``cached`` sessions keep theirs in a page pool (``models/kv_pool.py``, one per number of solver
steps), so a chunk writes only its own frames, one gather per layer serves every row of a call, a voice
prompt's pages are shared by all sessions that start from it, and a session's pages return to the pool when
it finishes or closes (after the step it is in, if any). With ``graphs=True`` every call is padded to
``buckets`` (fixed shapes, replayed as CUDA graphs on a GPU); otherwise calls keep their exact sizes.
``window`` sessions keep per-session tensors (their window is trimmed in place) and run in their own calls.

Memory: with ``max_cache_bytes`` the batcher accounts each session's attention cache (frames held x bytes per
frame, rounded up to pages; x 1.5 for a window session's growth room) and refuses a new session, or a chunk,
that would pass the budget with ``CacheBudgetError`` (the server maps it to 503 / close 1013). The page pool
never grows past the budget either.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..budget import KV_SHARE, MemoryBudget
from ..models.buckets import ShapeBuckets
from ..models.kv_pool import RESERVED_PAGES, KVPool, PageTable, PoolExhaustedError
from ..models.padded_solve import PaddedSolver, has_fixed_shapes
from .schedule import Emission
from .session import SessionClosedError, StreamSession
from .state import SessionState

__all__ = ["Batcher", "BatchedSession", "CacheBudgetError", "BatcherClosedError", "count_aten_ops"]

# Stores grow by half when full (kv_store.append_rows): what a session holds can exceed what it uses by that.
_STORE_GROWTH = 1.5
# Frames per page of the key/value pool: small pages waste little of a stream's last page; attention reads
# keys by slot anyway, so the page size does not shape any kernel.
DEFAULT_PAGE_FRAMES = 16


class CacheBudgetError(RuntimeError):
    """A session or chunk would take the batcher's caches past ``max_cache_bytes``."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed; it takes no more work."""


@dataclass
class _Job:
    session: BatchedSession
    work: SessionState
    emission: Emission
    queued_at: float
    future: Future = field(default_factory=Future)
    flow_done: bool = False  # its pages are no longer read or written by this batch

    @property
    def group(self) -> tuple[Any, ...]:
        s = self.session
        if s.mode == "recompute" or not hasattr(s.flow, "stream_step_rows") or not s._shares_calls:
            return ("alone", id(self))
        return (id(s.flow), s.n_timesteps, s._kv_table is not None)


def rows_are_independent(flow: torch.nn.Module) -> bool:
    """Whether a row's result in a shared call is its result alone. Not with dynamically quantized layers (the
    constrained preset's int8 flow): they scale each call's whole input to int8 at once, so one row's numbers
    would depend on the other rows' and on padding. Such sessions run their own calls."""
    dynamic = torch.ao.nn.quantized.dynamic
    return not any(isinstance(m, (dynamic.Linear, dynamic.LSTM, dynamic.GRU)) for m in flow.modules())


def cache_bytes_per_frame(flow: torch.nn.Module, n_timesteps: int) -> int:
    """Bytes one mel frame adds to a cached session: keys and values of every attention layer, for every
    solver step and both guidance branches."""
    est = getattr(getattr(flow, "decoder", None), "estimator", None)
    if est is None or not hasattr(est, "kv_layout"):
        return 0
    ref = next(iter(est.parameters()), None)
    itemsize = ref.element_size() if ref is not None and ref.is_floating_point() else 4
    layers, heads, dim_head = est.kv_layout()
    return n_timesteps * layers * 2 * 2 * heads * dim_head * itemsize


def count_aten_ops(fn: Any) -> int:
    """How many aten operators ``fn()`` dispatches on this thread (each call that reaches a kernel, composite
    operators counted as the operators they decompose into). A dispatch mode, not the profiler: it is
    per-thread, and the profiler cannot be started from more than one thread of a process."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
            _Count.calls += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.calls


@dataclass
class _Reservation:
    """What a session holds in its batcher: reserved cache bytes and its pages. Kept apart from the session so
    that a session dropped without ``close()`` can be released by a finalizer that does not keep it alive."""

    nbytes: int = 0
    table: PageTable | None = None
    released: bool = False


class BatchedSession(StreamSession):
    """A ``StreamSession`` whose chunks are computed by a ``Batcher``, together with other sessions' chunks.

    ``push`` / ``finish`` block until their chunks are computed; ``apush`` / ``afinish`` await them. One call
    at a time per session (a second concurrent call on the same session raises). ``close`` returns at once,
    even while a chunk is in flight: a queued chunk is dropped, one being computed is discarded.
    """

    def __init__(self, *, batcher: Batcher, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._batcher = batcher
        self._closing = False
        self._reservation = _Reservation()
        self._shares_calls = True  # may share calls with other rows (set by the batcher)

    @property
    def reserved_bytes(self) -> int:
        return self._reservation.nbytes

    @reserved_bytes.setter
    def reserved_bytes(self, value: int) -> None:
        self._reservation.nbytes = value

    @property
    def _kv_table(self) -> PageTable | None:
        """This session's pages (cached mode), set by the batcher."""
        return self._reservation.table

    @_kv_table.setter
    def _kv_table(self, table: PageTable | None) -> None:
        self._reservation.table = table

    # ---------------------------------------------------------------------------------------------- public

    def push(self, tokens: Any) -> list[np.ndarray]:
        return self._drive(self._push_steps(tokens))

    def finish(self) -> np.ndarray:
        return self._drive(self._finish_steps())

    async def apush(self, tokens: Any) -> list[np.ndarray]:
        """``push`` for asyncio callers: the event loop is free while the chunks are computed."""
        return await self._adrive(self._push_steps(tokens))

    async def afinish(self) -> np.ndarray:
        return await self._adrive(self._finish_steps())

    def close(self) -> None:
        self._closing = True
        self._batcher._drop(self)
        self._release_if_idle()  # a push in flight releases when it ends (it looks again after unlocking)

    # ---------------------------------------------------------------------------------------------- internals

    def _release_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._lock.release()

    def _release(self) -> None:
        if self._reservation.released:
            return
        self._reservation.released = True
        self.state = replace(self.state, flow_state=None, vocoder_state=None, closed=True)
        self._batcher._forget(self)

    def _check_open(self, what: str) -> None:
        if self._closing and not self.state.closed:
            raise SessionClosedError(f"{what}() on a closed session; start a new one with Batcher.stream()")
        super()._check_open(what)

    def _push_steps(self, tokens: Any) -> Iterator[Any]:
        """The push as a generator: yields (work, emission) per chunk, is sent the chunk, returns them all."""
        work, emissions = self._plan_push(tokens)
        outs = []
        for em in emissions:
            outs.append((yield work, em))
        self.state = work
        return outs

    def _finish_steps(self) -> Iterator[Any]:
        work, em = self._plan_finish()
        out = yield work, em
        self.state = self._finished(work)
        self._batcher._forget(self)
        return out

    @contextmanager
    def _call(self) -> Iterator[None]:
        """One push/finish: exclusive per session; the vocoder's random generator rewound if it fails."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("another push/finish of this session is running: call them one at a time")
        gen_state = self._shared_gen.get_state() if self._shared_gen is not None else None
        self._batcher._pushing(+1)
        try:
            yield
        except BaseException:
            if gen_state is not None:
                self._shared_gen.set_state(gen_state)
            raise
        finally:
            self._batcher._pushing(-1)
            self._lock.release()
            # after unlocking: a close() that found the lock held (and so released nothing) is seen here
            if self._closing:
                self._release_if_idle()

    def _drive(self, steps: Iterator[Any]) -> Any:
        with self._call():
            try:
                request = next(steps)
                while True:
                    request = steps.send(self._batcher._submit(self, *request).result())
            except StopIteration as done:
                return done.value

    async def _adrive(self, steps: Iterator[Any]) -> Any:
        with self._call():
            try:
                request = next(steps)
                while True:
                    future = self._batcher._submit(self, *request)
                    try:
                        result = await asyncio.wrap_future(future)
                    except asyncio.CancelledError:
                        self.close()  # the caller went away: its queued chunk is dropped, nothing is committed
                        raise
                    request = steps.send(result)
            except StopIteration as done:
                return done.value


class Batcher:
    """Runs the chunks of all its sessions in batched model calls (see the module docstring).

    ``Batcher(t2w, max_batch=16, max_wait_ms=10.0, max_cache_bytes=None)``; ``b.stream(...)`` takes the
    arguments of ``Token2Wav.stream``. Use as a context manager or call ``close()`` to stop its thread.
    paged_kv: keep cached sessions' keys/values in a page pool (False: per-session tensors, the earlier
    path, kept for comparison); page_frames: frames per page; buckets: the padded sizes of fixed-shape
    batches (default ``ShapeBuckets()``); without graphs, given buckets pad the eager calls' attention too
    (by default those keep their exact sizes: padding only costs time when nothing is captured).
    graphs: run cached sessions (DiT or U-Net) as fixed-shape batches (every row padded to ``buckets``:
    ``models/padded_solve.py``), each shape captured once as a CUDA graph and replayed on a GPU, run eagerly
    on a CPU. With ``max_cache_bytes`` the page pool is allocated whole at the start, so it never grows
    (growing copies every cache once and makes every captured graph capture again).
    """

    def __init__(
        self,
        t2w: Any,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        max_cache_bytes: int | None = None,
        workers: int | None = None,
        graphs: bool = False,
        paged_kv: bool = True,
        page_frames: int = DEFAULT_PAGE_FRAMES,
        buckets: ShapeBuckets | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must be a number in [0, 1000], got {max_wait_ms!r}")
        if max_cache_bytes is not None and (
            isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes < 1
        ):
            raise ValueError(f"max_cache_bytes must be a positive int or None, got {max_cache_bytes!r}")
        if workers is None:
            # CPU: two calls per core at a time. A worker thread runs its call's Python on one core, and torch's
            # intra-op threads gain little at these sizes (measured: 2 unbatched streams on 2 cores run at
            # twice one stream's throughput; one batched call of 2 rows at 1.2x); with paced streams a second
            # call per core fills the gaps (load test, mid-size CosyVoice 3 on 2 cores: 4 real-time streams
            # with 2 workers, 7 with 4). GPU: one stream of calls.
            workers = 1 if t2w.device.type != "cpu" else max(1, min(2 * (os.cpu_count() or 1), 16))
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
            raise ValueError(f"workers must be an int in [1, 64] or None, got {workers!r}")
        if graphs and not (paged_kv and has_fixed_shapes(getattr(getattr(t2w.flow, "decoder", None), "estimator",
                                                                  None))):  # fmt: skip
            raise ValueError(
                "graphs=True runs fixed-shape batches of a cached flow (CosyVoice 3, CosyVoice 2, the demo voice) "
                "with paged_kv=True; this engine has no such path: use graphs=False"
            )
        if isinstance(page_frames, bool) or not isinstance(page_frames, int) or not 1 <= page_frames <= 1024:
            raise ValueError(f"page_frames must be an int in [1, 1024], got {page_frames!r}")
        self.t2w = t2w
        self.paged_kv = bool(paged_kv) and hasattr(getattr(t2w.flow, "decoder", None), "solve_rows") and hasattr(
            getattr(t2w.flow.decoder, "estimator", None), "kv_layout"
        )
        self.page_frames = page_frames
        self.buckets = ShapeBuckets() if buckets is None else buckets
        self._eager_buckets = buckets  # None: exact sizes
        self.graphs = bool(graphs)
        self._pools: dict[int, KVPool] = {}  # per n_timesteps
        # with graphs: per (flow decoder, n_timesteps) -- the engine's flow, or its int8 copy (constrained preset)
        self._padded: dict[tuple[int, int], PaddedSolver] = {}
        self._independent: dict[int, bool] = {}  # per flow (id): rows_are_independent
        self._running: Counter[BatchedSession] = Counter()  # sessions with a chunk being computed
        self._release_after_step: set[BatchedSession] = set()
        # calls that can compute side by side: CPU cores (a call's Python runs on one), one GPU stream
        self._cores = 1 if t2w.device.type != "cpu" else max(1, os.cpu_count() or 1)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_cache_bytes = max_cache_bytes
        # one budget for the page pool, the engine's prompt states, a server's prompt registry and the fixed-shape
        # buffers (token2wav.budget); streams are admitted against its key/value share
        self.memory = MemoryBudget(max_cache_bytes)
        self._bytes_per_frame = cache_bytes_per_frame(t2w.flow, t2w.n_timesteps)
        self._ratio = int(t2w.config.token_mel_ratio)
        if max_cache_bytes is not None:
            frames = int(t2w.config.static_chunk_size)  # one chunk of one stream, in whole pages
            chunk = -(-frames // page_frames) * page_frames * self._bytes_per_frame
            least = int(-(-chunk // KV_SHARE))
            if self.memory.kv_bytes < chunk:
                raise ValueError(f"max_cache_bytes={max_cache_bytes} cannot hold one chunk of one stream: at least "
                                 f"{least} bytes ({least / 2**20:.2f} MiB; {KV_SHARE:.0%} of the budget is for "
                                 "key/value pages)")
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._pushers = 0
        self._inflight = 0  # jobs being computed by a worker
        self._idle_workers = 0
        # open sessions, held weakly: one dropped without close() or finish() is released by its finalizer
        self._sessions: weakref.WeakSet[BatchedSession] = weakref.WeakSet()
        self._reserved = 0
        self._closed = False
        # statistics (read by the server's /metrics and by bench)
        self.batch_sizes: Counter[int] = Counter()
        self.queue_wait_s = 0.0
        self.jobs_done = 0
        self.listeners: list[Any] = []  # callables (rows, queue waits) called after every batch
        self.count_ops = False  # bench: count the torch operators each batched call runs (profiler; slow)
        self.ops_counted = 0
        self.ops_rows = 0  # chunks computed while counting
        self.workers = workers
        self._threads = [threading.Thread(target=self._loop, name=f"token2wav-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------------------------------------- public

    def stream(self, prompt: Any = None, **options: Any) -> BatchedSession:
        """A batched streaming session; arguments as ``Token2Wav.stream``."""
        if self._closed:
            raise BatcherClosedError("the batcher is closed")
        session = BatchedSession(batcher=self, **self.t2w.session_options(prompt, **options))
        with self._cv:
            shares = self._independent.get(id(session.flow))
        if shares is None:  # once per flow (the engine's, its int8 copy): the flows outlive the batcher
            shares = rows_are_independent(session.flow)
            with self._cv:
                self._independent[id(session.flow)] = shares
        session._shares_calls = shares
        if self.paged_kv and session.mode == "cached" and session._shares_calls:
            session._kv_table = PageTable(self._pool(session.n_timesteps))
        need = self._session_bytes(session, session.prompt.num_tokens + session.plan.pad + session.plan.hop)
        with self._cv:
            self._admit(need, 0)
            session.reserved_bytes = need
            self._reserved += need
            self._sessions.add(session)
        weakref.finalize(session, self._abandoned, session._reservation)
        return session

    def _abandoned(self, reservation: _Reservation) -> None:
        """A session garbage-collected without close() or finish(): its reservation and pages come back (no
        chunk of it can be running: a running chunk holds the session)."""
        if reservation.released:
            return
        reservation.released = True
        with self._cv:
            self._reserved -= reservation.nbytes
            reservation.nbytes = 0
        if reservation.table is not None:
            reservation.table.release()

    def _pool(self, n_timesteps: int) -> KVPool:
        with self._cv:
            pool = self._pools.get(n_timesteps)
            if pool is None:
                est = self.t2w.flow.decoder.estimator
                layers, heads, dim_head = est.kv_layout()
                ref = next(est.parameters())
                per_page = cache_bytes_per_frame(self.t2w.flow, n_timesteps) * self.page_frames
                # the budget bounds the pool too (plus the two reserved pages)
                kv_bytes = self.memory.kv_bytes
                cap = None if kv_bytes is None else kv_bytes // per_page + RESERVED_PAGES
                # with a budget the first pool is allocated whole at once: it never grows (no copy of every cache,
                # nothing to capture again; a CPU commits its memory only as pages are first written). Pools of
                # other step counts (rarer presets) start small, so the budget is not allocated twice.
                first = cap if cap is not None and not self._pools else 64
                pool = KVPool(steps=n_timesteps, layers=layers, heads=heads, dim_head=dim_head, pages=first,
                              page_frames=self.page_frames, max_pages=cap, device=ref.device,
                              dtype=ref.dtype)  # fmt: skip
                self._pools[n_timesteps] = pool
                self._count_pools()
            return pool

    def _count_pools(self) -> None:
        """The pool pages as allocated, in the budget's ``kv_pages`` account (pools grow only without one)."""
        self.memory.set_used("kv_pages", sum(p.pages_total * p.bytes_per_page for p in self._pools.values()))

    def _padded_solver(self, flow: Any, n_timesteps: int) -> PaddedSolver:
        """The fixed-shape solver of the flow a session runs (sessions of one pool may run different flows:
        the engine's or its int8 copy), on the pool of its step count."""
        pool = self._pool(n_timesteps)
        with self._cv:
            key = (id(flow.decoder), n_timesteps)  # the solver keeps the decoder alive: the id stays its own
            solver = self._padded.get(key)
            if solver is None:
                solver = self._padded[key] = PaddedSolver(flow.decoder, pool, buckets=self.buckets,
                                                          graphs=pool.device.type == "cuda",
                                                          budget=self.memory)  # fmt: skip
            return solver

    @property
    def sessions_open(self) -> int:
        with self._cv:
            return len(self._sessions)

    @property
    def reserved_bytes(self) -> int:
        with self._cv:
            return self._reserved

    def stats(self) -> dict[str, Any]:
        with self._cv:
            self._count_pools()
            done = self.jobs_done
            pools = list(self._pools.values())
            return {
                "batches": sum(self.batch_sizes.values()),
                "rows": done,
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "mean_queue_wait_ms": 1000.0 * self.queue_wait_s / done if done else 0.0,
                "sessions_open": len(self._sessions),
                "reserved_cache_bytes": self._reserved,
                "kv_pages_total": sum(p.pages_total for p in pools),
                "kv_pages_free": sum(p.pages_free for p in pools),
                "kv_pool_bytes": sum(p.pages_total * p.bytes_per_page for p in pools),
                "kv_pool_grown": sum(p.grown for p in pools),
                "graphs": self.graphs,
                "fixed_shapes": sorted({shape for p in self._padded.values() for shape in p.shapes()}),
                "graph_captures": sum(p.captures for p in self._padded.values()),
                "memory_budget_bytes": self.memory.total_bytes,
                "memory_bytes": self.memory.snapshot(),
            }

    def close(self) -> None:
        """Stop the worker; queued chunks fail with ``BatcherClosedError``."""
        with self._cv:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for job in pending:
            job.future.set_exception(BatcherClosedError("the batcher was closed"))
        for thread in self._threads:
            thread.join(timeout=30)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- accounting

    def _session_bytes(self, session: BatchedSession, tokens: int) -> int:
        """The cache a session holds once it has ``tokens`` (prompt included): what it is charged."""
        frames = tokens * self._ratio
        if session.mode == "recompute":
            return frames * self._bytes_per_frame  # rebuilt for the whole prefix on every call
        if session.mode == "window":
            # the prompt's chunks, the last window_frames, and the chunk being added before the trim
            chunk = int(self.t2w.config.static_chunk_size)
            prompt = -(-session.prompt.num_tokens * self._ratio // chunk) * chunk
            hop = (session.plan.max_hop or session.plan.hop) * self._ratio + chunk
            frames = min(frames, prompt + int(session.window_frames) + hop)
        if session._kv_table is not None:
            return -(-frames // self.page_frames) * self.page_frames * self._bytes_per_frame
        return int(frames * self._bytes_per_frame * _STORE_GROWTH)

    def _admit(self, need: int, held: int) -> None:
        budget = self.memory.kv_bytes
        if budget is not None and self._reserved - held + need > budget:
            raise CacheBudgetError(
                f"cache budget exceeded: {(self._reserved - held + need) / 2**20:.1f} MiB of key/value pages needed "
                f"of the {budget / 2**20:.1f} MiB ({KV_SHARE:.0%}) that max_cache_bytes="
                f"{self.max_cache_bytes / 2**20:.1f} MiB leaves them ({len(self._sessions)} sessions open); "
                "retry later or raise the budget"
            )

    def _forget(self, session: BatchedSession) -> None:
        with self._cv:
            if session in self._sessions:
                self._sessions.discard(session)
                self._reserved -= session.reserved_bytes
                session.reserved_bytes = 0
            if self._running[session]:  # its pages are still being read or written: free them after the step
                self._release_after_step.add(session)
                return
        self._free_pages(session)

    @staticmethod
    def _free_pages(session: BatchedSession) -> None:
        if session._kv_table is not None:
            session._kv_table.release()

    # ---------------------------------------------------------------------------------------------- queue

    def _pushing(self, delta: int) -> None:
        with self._cv:
            self._pushers += delta
            self._cv.notify_all()

    def _submit(self, session: BatchedSession, work: SessionState, em: Emission) -> Future:
        need = self._session_bytes(session, session.prompt.num_tokens + em.prefix)
        with self._cv:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            if session._closing:
                raise SessionClosedError("the session was closed")
            if need > session.reserved_bytes:
                self._admit(need, session.reserved_bytes)
                self._reserved += need - session.reserved_bytes
                session.reserved_bytes = need
            job = _Job(session, work, em, time.perf_counter())
            self._queue.append(job)
            self._cv.notify_all()
        return job.future

    def _drop(self, session: BatchedSession) -> None:
        with self._cv:
            dropped = [j for j in self._queue if j.session is session]
            for job in dropped:
                self._queue.remove(job)
        for job in dropped:
            job.future.set_exception(SessionClosedError("the session was closed"))

    def _take(self) -> list[_Job] | None:
        """Block until a group of jobs is ready; None when closed."""
        with self._cv:
            self._idle_workers += 1
            try:
                while True:
                    while not self._queue and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return None
                    deadline = self._queue[0].queued_at + self.max_wait_s
                    # wait for sessions that are mid-push and have not queued their next chunk yet (those being
                    # computed by another worker cannot queue before it ends)
                    while (self._queue and len(self._queue) < min(self._pushers - self._inflight, self.max_batch)
                           and not self._closed):
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    if self._closed:
                        return None
                    if self._queue:  # else a closed session's jobs were dropped meanwhile, or another worker took them
                        break
                # first chunks first, then arrival order
                order = sorted(self._queue, key=lambda j: (j.emission.index > 0, j.queued_at))
                key = order[0].group
                group = [j for j in order if j.group == key]
                # split the ready rows over the cores that no call occupies yet (two half batches on two free
                # cores beat one on one; more calls than cores only shrink the batches), at least one call
                busy = self.workers - self._idle_workers
                share = -(-len(group) // max(1, min(self._idle_workers, self._cores - busy)))
                batch = group[: min(self.max_batch, share)]
                for job in batch:
                    self._queue.remove(job)
                    self._running[job.session] += 1
                self._inflight += len(batch)
                return batch
            finally:
                self._idle_workers -= 1

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            started = time.perf_counter()
            ops = None
            try:
                ops = count_aten_ops(lambda batch=batch: self._run(batch)) if self.count_ops else None
                if ops is None:
                    self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - a worker never dies with callers waiting on it
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            waits = [started - j.queued_at for j in batch]
            self._flow_done(batch)  # (those a failure left marked running)
            with self._cv:
                self._inflight -= len(batch)
                self._cv.notify_all()
                if ops is not None:
                    self.ops_counted += ops
                    self.ops_rows += len(batch)
                self.batch_sizes[len(batch)] += 1
                self.jobs_done += len(batch)
                self.queue_wait_s += sum(waits)
            for listener in list(self.listeners):
                try:
                    listener(len(batch), waits)
                except Exception:  # noqa: BLE001 - statistics must never stop the worker
                    pass
            # while this worker waits for the next batch, it must not keep the last one's sessions alive: a
            # session its caller dropped is released by its finalizer
            del batch
            job = None  # noqa: F841

    # ---------------------------------------------------------------------------------------------- model calls

    def _flow_done(self, jobs: list[_Job]) -> None:
        """These jobs' flow work is over (before any of their futures is set): a session closed or finished
        meanwhile gets its pages back now."""
        release = []
        with self._cv:
            for job in jobs:
                if job.flow_done:
                    continue
                job.flow_done = True
                self._running[job.session] -= 1
                if not self._running[job.session]:
                    del self._running[job.session]
                    if job.session in self._release_after_step:
                        self._release_after_step.discard(job.session)
                        release.append(job.session)
        for session in release:
            self._free_pages(session)

    def _run(self, batch: list[_Job]) -> None:
        live = []
        for job in batch:
            if job.session._closing:
                self._flow_done([job])
                job.future.set_exception(SessionClosedError("the session was closed"))
            elif job.future.set_running_or_notify_cancel():
                live.append(job)
            else:
                self._flow_done([job])
        if not live:
            return
        try:
            with torch.inference_mode():
                flows = self._flow_rows(live)
            self._flow_done(live)
        except Exception:  # noqa: BLE001 - isolate the failing row; the others still get their chunks
            flows = None
        recorded: list[tuple[_Job, torch.Tensor]] = []
        for i, job in enumerate(live):
            try:
                with torch.inference_mode():
                    try:
                        mel = flows[i] if flows is not None else self._flow_rows([job])[0]
                    finally:
                        self._flow_done([job])
                    mel_out = job.session._record(job.work, job.emission, mel)
            except BaseException as exc:  # noqa: BLE001 - delivered to the row's caller
                job.future.set_exception(exc)
                continue
            if job.session.output == "mel":
                job.future.set_result(mel_out)
            else:
                recorded.append((job, mel))
        self._vocode_rows(recorded)

    def _vocode_rows(self, rows: list[tuple[_Job, torch.Tensor]]) -> None:
        """Each row's audio: HiFi-GAN and causal HiFT rows through their batched steps (which stack the rows
        that can share a call), other vocoders row by row."""
        from ..models.hifigan import vocode_stream_rows

        def hifigan(voc: Any, mels: list, states: list, finals: list) -> list:
            return vocode_stream_rows(voc, mels, states, finals)

        def causal(voc: Any, mels: list, states: list, finals: list) -> list:
            return voc.stream_step_rows(mels, states, finals)

        steppers = {"hifigan": hifigan, "causal": causal}
        by_kind: dict[str, list[tuple[_Job, torch.Tensor]]] = {}
        alone: list[tuple[_Job, torch.Tensor]] = []
        for job, mel in rows:
            kind = job.session.vocoder_kind
            if kind in steppers and job.session.mode != "recompute":
                by_kind.setdefault(kind, []).append((job, mel))
            else:
                alone.append((job, mel))
        for kind, group in by_kind.items():
            if len(group) == 1:
                alone += group
                continue
            try:
                with torch.inference_mode():
                    outs = steppers[kind](
                        group[0][0].session.vocoder, [mel for _, mel in group],
                        [job.work.vocoder_state for job, _ in group], [job.emission.finalize for job, _ in group],
                    )  # fmt: skip
            except Exception:  # noqa: BLE001 - fall back to one row at a time below
                alone += group
                continue
            for (job, _), (audio, state) in zip(group, outs):
                job.work.vocoder_state = state
                job.future.set_result(audio[0].float().cpu().numpy())
        for job, mel in alone:
            try:
                with torch.inference_mode():
                    speech = job.session._vocode(job.work, mel, job.emission.finalize)
            except BaseException as exc:  # noqa: BLE001 - delivered to the row's caller
                job.future.set_exception(exc)
            else:
                job.future.set_result(speech[0].float().cpu().numpy())

    def _flow_rows(self, jobs: list[_Job]) -> list[torch.Tensor]:
        """Each job's mel; cached sessions in one ``stream_step_rows`` call, committing their flow states."""
        paged = jobs[0].session._kv_table is not None
        if jobs[0].group[0] == "alone" or (len(jobs) == 1 and not paged):
            return [job.session._flow_chunk(job.work, job.emission) for job in jobs]
        sessions = [job.session for job in jobs]
        states = [s._flow_state(job.work) for s, job in zip(sessions, jobs)]
        extra: dict[str, Any] = {}
        if paged:
            extra = {"tables": [s._kv_table for s in sessions], "buckets": self._eager_buckets}
            if self.graphs:
                extra["padded"] = self._padded_solver(sessions[0].flow, sessions[0].n_timesteps)
        try:
            rows = sessions[0].flow.stream_step_rows(
                states,
                [job.work.tokens[:, : job.emission.prefix] for job in jobs],
                finalize=[job.emission.finalize for job in jobs],
                lookahead=[s.lookahead for s in sessions],
                **extra,
            )
        except PoolExhaustedError as exc:
            raise CacheBudgetError(f"cache budget exceeded: {exc}") from exc
        mels = []
        for s, job, (mel, new_state) in zip(sessions, jobs, rows):
            s._commit_flow(job.work, job.emission, new_state)
            mels.append(mel)
        return mels
