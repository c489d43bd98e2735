"""The scheduler: queues sessions' planned chunks, groups them into shared calls, admits and pages.

A ``Batcher`` owns an engine's model calls; it computes nothing itself (``compute.run_rows`` does). Sessions
(``StreamSession``) plan their chunks on the caller's thread and submit each one as a job. Worker threads (one by
default: on a CPU each keeps an OpenMP pool, see ``token2wav.threads``) gather the queued jobs, group those that
can share a solver pass, and hand each group to ``run_rows``: one ``flow.stream_step_rows`` call (all solver
steps, both guidance branches, every row against its own cache) and a batched vocoder step where the vocoder has
one. With ``workers=0`` the batcher is *inline*: a submitted chunk is computed at once on the submitting thread,
a batch of one. ``Token2Wav.stream()`` uses such a batcher, so a single stream runs the same code as a batched
one (page pool included).

Exactness: a row's chunk is what the session computes alone, whatever else shares the call (``compute.py``).
A row whose session was closed meanwhile is dropped before it runs and leaves the others untouched.

Scheduling by the listener's clock: each queued row has a deadline, when its session's listener runs dry
(``session.deadline``, from its playback clock), or for a first chunk its queueing time plus
``FIRST_AUDIO_BUDGET_S``; the most urgent row goes first and the rest of its call is filled with the rows that
can share it, in deadline order (``priority`` clamps a deadline to +-``STARVATION_BOUND_S`` of the queueing time,
so no row starves). A call waits for more rows at most ``max_wait_ms``, only while some session is mid-push and
has not queued its next chunk yet, and only while the most urgent row can afford it. Rows of one call share
``n_timesteps`` and the flow; ``recompute`` sessions run alone. The batcher measures the submission-to-delivery
time of chunks (``compute``, which sessions plan their hops with) and its capacity (``capacity()``, audio seconds
per wall second, which the server admits streams by).

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

import logging
import math
import os
import statistics
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..budget import KV_SHARE, MemoryBudget
from ..models.buckets import ShapeBuckets
from ..models.interfaces import KVLayoutEstimator, RowsFlow, RowsSolver
from ..models.kv_pool import RESERVED_PAGES, KVPool, PageTable
from ..models.padded_solve import PaddedSolver, has_fixed_shapes
from ..threads import run_in_short_lived_thread
from .compute import CacheExhaustedError, Chunk, Row, run_rows
from .pacing import PLAN_S, SAFETY_MARGIN_S, CallMeter, ComputeMeter
from .schedule import Emission
from .session import SessionClosedError, StreamSession
from .state import SessionState

log = logging.getLogger("token2wav.batcher")

__all__ = ["Batcher", "CacheBudgetError", "BatcherClosedError", "count_aten_ops"]

# Stores grow by half when full (kv_store.append_rows): what a session holds can exceed what it uses by that.
_STORE_GROWTH = 1.5
# A stream's first chunk is due this long after it was queued (its deadline before any audio exists).
FIRST_AUDIO_BUDGET_S = 0.5
# Deadlines count for ordering within this much of a row's queueing time (Batcher.priority): no row starves.
STARVATION_BOUND_S = 2.0
# Frames per page of the key/value pool: small pages waste little of a stream's last page; attention reads
# keys by slot anyway, so the page size does not shape any kernel.
DEFAULT_PAGE_FRAMES = 16


class CacheBudgetError(CacheExhaustedError):
    """A session or chunk would take the batcher's caches past ``max_cache_bytes``."""


class BatcherClosedError(RuntimeError):
    """The batcher was closed; it takes no more work."""


@dataclass(eq=False)
class _Job:
    session: StreamSession
    row: Row
    queued_at: float
    group: tuple[Any, ...]
    deadline: float  # when the session's listener runs dry (inf: no audio yet)
    future: Future = field(default_factory=Future)


def rows_are_independent(flow: torch.nn.Module) -> bool:
    """Whether a row's result in a shared call is its result alone. Not with dynamically quantized layers (the
    constrained preset's int8 flow): they scale each call's whole input to int8 at once, so one row's numbers
    would depend on the other rows' and on padding. Such sessions run their own calls."""
    dynamic = torch.ao.nn.quantized.dynamic
    return not any(isinstance(m, (dynamic.Linear, dynamic.LSTM, dynamic.GRU)) for m in flow.modules())


def check_cache_budget(max_cache_bytes: int, bytes_per_frame: int, chunk_frames: int,
                       page_frames: int = DEFAULT_PAGE_FRAMES) -> None:
    """Refuse a memory budget whose key/value share cannot hold one chunk of one stream (in whole pages);
    the message gives the smallest budget that can. ``bytes_per_frame``: :func:`cache_bytes_per_frame`, or
    ``token2wav.memory.kv_bytes_per_frame`` of the config before a model is loaded."""
    chunk = -(-chunk_frames // page_frames) * page_frames * bytes_per_frame
    if MemoryBudget(max_cache_bytes).kv_bytes < chunk:
        least = int(-(-chunk // KV_SHARE))
        least_mb = math.ceil(least / 2**20 * 100) / 100  # as `serve --max-cache-mb` takes it, rounded up
        raise ValueError(f"max_cache_bytes={max_cache_bytes} cannot hold one chunk of one stream: at least "
                         f"{least} bytes ({least / 2**20:.2f} MiB; {KV_SHARE:.0%} of the budget is for "
                         f"key/value pages; token2wav serve --max-cache-mb {least_mb:.2f})")


def cache_bytes_per_frame(flow: torch.nn.Module, n_timesteps: int) -> int:
    """Bytes one mel frame adds to a cached session: keys and values of every attention layer, for every
    solver step and both guidance branches."""
    est = getattr(getattr(flow, "decoder", None), "estimator", None)
    if not isinstance(est, KVLayoutEstimator):
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


@dataclass(eq=False)
class _Reservation:
    """What a session holds in its batcher: reserved cache bytes and its pages. Kept apart from the session so
    that a session dropped without ``close()`` can be released by a finalizer that does not keep it alive."""

    nbytes: int = 0
    table: PageTable | None = None
    shares_calls: bool = True  # its rows may share calls with other sessions' rows
    released: bool = False


class Batcher:
    """Runs the chunks of all its sessions in batched model calls (see the module docstring).

    ``Batcher(t2w, max_batch=16, max_wait_ms=10.0, max_cache_bytes=None)``; ``b.stream(...)`` takes the
    arguments of ``Token2Wav.stream``. Use as a context manager or call ``close()`` to stop its threads.
    workers: threads computing calls (default: two per CPU core, one on a GPU); 0: inline, each chunk computed
    on the thread that submits it (a batch of one; what ``Token2Wav.stream()`` uses).
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
            # One worker, CPU and GPU alike. On a CPU each worker thread that runs torch keeps its own OpenMP
            # pool, and once several pools outnumber the cores every parallel operator pays a kernel wake-up
            # (token2wav.threads): measured on 2 cores, one demo stream costs 27 % less with one worker than
            # with four, and two streams no more. Several rows share a call instead.
            workers = 1
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 64:
            raise ValueError(f"workers must be an int in [0, 64] or None (0: inline), got {workers!r}")
        if graphs and not (paged_kv and has_fixed_shapes(getattr(getattr(t2w.flow, "decoder", None), "estimator",
                                                                  None))):  # fmt: skip
            raise ValueError(
                "graphs=True runs fixed-shape batches of a cached flow (CosyVoice 3, CosyVoice 2, the demo voice) "
                "with paged_kv=True; this engine has no such path: use graphs=False"
            )
        if isinstance(page_frames, bool) or not isinstance(page_frames, int) or not 1 <= page_frames <= 1024:
            raise ValueError(f"page_frames must be an int in [1, 1024], got {page_frames!r}")
        self.t2w = t2w
        decoder = getattr(t2w.flow, "decoder", None)
        self.paged_kv = (bool(paged_kv) and isinstance(decoder, RowsSolver)
                         and isinstance(getattr(decoder, "estimator", None), KVLayoutEstimator))
        self.page_frames = page_frames
        self.buckets = ShapeBuckets() if buckets is None else buckets
        self._eager_buckets = buckets  # None: exact sizes
        self.graphs = bool(graphs)
        self._pools: dict[int, KVPool] = {}  # per n_timesteps
        # with graphs: per (flow decoder, n_timesteps) -- the engine's flow, or its int8 copy (constrained preset)
        self._padded: dict[tuple[int, int], PaddedSolver] = {}
        self._independent: dict[int, bool] = {}  # per flow (id): rows_are_independent
        self._running: Counter[StreamSession] = Counter()  # sessions with a chunk being computed
        # sessions released while a chunk of theirs runs -> their pages, freed when the step ends
        self._release_after_step: dict[StreamSession, PageTable | None] = {}
        self._row_sessions: dict[Row, StreamSession] = {}  # rows being computed -> their sessions
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
            check_cache_budget(max_cache_bytes, self._bytes_per_frame, int(t2w.config.static_chunk_size), page_frames)
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._pushers = 0
        self._inflight = 0  # jobs being computed by a worker
        self._idle_workers = 0
        # open sessions, held weakly: one dropped without close() or finish() is released by its finalizer
        self._sessions: weakref.WeakKeyDictionary[StreamSession, _Reservation] = weakref.WeakKeyDictionary()
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
        self.inline = workers == 0
        # submission-to-delivery time of chunks at the current load: sessions plan adaptive hops and their
        # recommended start buffer with it (streaming/pacing.py)
        self.compute = ComputeMeter()
        self.first_audio_budget_s = FIRST_AUDIO_BUDGET_S
        self.calls = CallMeter()  # wall time against audio of each call: capacity() and chunk_bound_s()
        self._threads = [threading.Thread(target=self._loop, name=f"token2wav-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------------------------------------- public

    def stream(self, prompt: Any = None, **options: Any) -> StreamSession:
        """A streaming session whose chunks this batcher computes; arguments as ``Token2Wav.stream``."""
        if self._closed:
            raise BatcherClosedError("the batcher is closed")
        setup = self.t2w.session_setup(prompt, **options)
        session = StreamSession(scheduler=self, **setup)
        spec = session.spec
        with self._cv:
            shares = self._independent.get(id(spec.flow))
        if shares is None:  # once per flow (the engine's, its int8 copy): the flows outlive the batcher
            shares = rows_are_independent(spec.flow)
            with self._cv:
                self._independent[id(spec.flow)] = shares
        reservation = _Reservation(shares_calls=shares)
        if self.paged_kv and spec.mode == "cached" and shares:
            reservation.table = PageTable(self._pool(spec.n_timesteps))
        first = session.prompt.num_tokens + session.plan.pad + session.plan.hop
        need = self._session_bytes(session, reservation, first)
        with self._cv:
            self._admit(need, 0)
            reservation.nbytes = need
            self._reserved += need
            self._sessions[session] = reservation
        weakref.finalize(session, self._abandoned, reservation)
        return session

    def calibrate(self, prompt: Any = None, hop: int | None = None, history_s: float = 10.0) -> int:
        """Measure this model's chunk times before a caller's stream does; returns the chunks the meter then holds.

        Without it, the first stream after a start plans its hops and start buffer on a cold guess (the
        meter's default cost per token and an assumed spread) and is told to buffer far longer than it needs
        (demo voice: 1.9 s, against 0.3 s once a stream was measured). This runs unpaced streams of the hop
        sizes an adaptive stream from ``hop`` (default: the stream default) takes first, ``hop`` and twice it,
        after one pass that is not measured: a hop size's first calls pay one-time costs (demo
        voice: 24-token chunks took 0.39-0.43 s on the first pass and 0.30-0.33 s after).

        A chunk's cost grows with the history it attends to, and the plan needs that growth (demo voice: 12
        tokens cost 0.15 s at the start of a stream and 0.24 s after 20 s). Only the flow's attention grows, not
        the vocoder, so the growth is measured on a mel-output stream of ``history_s`` seconds of speech (half
        the cost of audio on the demo voice), and its chunks enter the meter with the vocoder's cost added, as
        measured on audio chunks of the same size after the same history. (The growth is not linear: the demo
        voice's chunks cost about the same over their first 5 s of history, so 6 s fitted too little of it and
        first streams stalled in 3 of 6 runs; paced streams grow faster still than unpaced ones.) These
        measurements replace what the meter and ``capacity()`` had seen (the calls priced at the middle of a
        ``PLAN_S`` stream, where its chunks cost more than here); under a ``max_cache_bytes`` too small
        for a stream that long, each stream goes as far as the budget allows. Call it before serving: its calls
        hold the workers (demo voice: about 5 s)."""
        # Opening the first session prepares the prompt's state on the opening thread: on a thread that ends, whose
        # OpenMP pool ends with it, or every chunk measured here would run beside a second pool (12-token demo
        # chunks: 0.20 s against 0.14-0.17 s; token2wav.threads).
        probe = run_in_short_lived_thread(self.stream, prompt, hop=hop, name="token2wav-prompt")
        with probe:
            first, pad, lookahead = int(probe.plan.hop), int(probe.plan.pad), int(probe.plan.lookahead)
            vocab, tokens_per_s = int(probe.vocab_size), 1.0 / probe.spec.audio_s_per_token

        def measure(top: int, later: int, output: str = "audio") -> list[tuple[int, float, int]]:
            """The meter's samples (tokens, seconds, history) of one unpaced stream whose hops double from
            ``first`` up to ``top``, ``later`` emissions after the first (which the meter leaves out)."""
            with self._cv:
                self.compute = ComputeMeter(window=max(32, later))
            n = pad + sum(min(top, first * 2**k) for k in range(later + 1)) + lookahead
            tokens = [(i * 37) % vocab for i in range(n)]
            try:
                with self.stream(prompt, hop=first, schedule="exponential", max_hop=top, output=output) as session:
                    for start in range(0, n, first):  # a hop at a time: under a small budget, as far as it goes
                        session.push(tokens[start : start + first])
            except CacheBudgetError:
                pass  # the memory budget holds no more of this stream: what was measured stands
            return list(self.compute.samples)

        measure(4 * first, 2)  # the pass that pays the one-time costs
        flow_only = measure(2 * first, max(4, math.ceil(history_s * tokens_per_s / (2 * first))), output="mel")
        with self._cv:
            self.calls.clear()  # capacity() counts audio calls only
        # the smallest hop (what a stream mostly takes at the token rate) and twice it: the two sizes set a call's
        # fixed cost apart from its cost per token. Six of the smallest anchor its cost, which the plan carries
        # 20 s ahead: with three, the fit traded the fixed cost against the growth (0.05-0.09 s over five
        # calibrations, 0.11-0.12 s in a traced server whose stream was told 1.4 s); with six, 0.055-0.063 s
        # over four.
        audio = measure(first, 6) + measure(2 * first, 2)
        at = {(t, h): s for t, s, h in flow_only}
        vocoder_s = [s - at[t, h] for t, s, h in audio if (t, h) in at]  # the same chunk, with and without it
        vocoder_s = statistics.median(vocoder_s) if vocoder_s else 0.0
        with self._cv:
            self.compute = ComputeMeter()
            for t, s, h in flow_only:
                self.compute.observe(t, s + vocoder_s, h)
            for sample in audio:
                self.compute.observe(*sample)
            # The audio calls ran after short histories, and admission reads its capacity from them: priced as
            # they are, two demo streams were admitted that together needed more than two cores (both stalled
            # 34-35 times). A stream's chunks get dearer with its history: the calls are priced at the middle of
            # the plan, PLAN_S / 2 of speech further on (by the growth fitted above; none when the growth was not
            # significant).
            if log.isEnabledFor(logging.DEBUG):
                start_s, later_s = (self.compute.seconds(first, h) for h in (0, int(PLAN_S * tokens_per_s)))
                log.debug("calibrated: %d-token chunks %.3f s with no history, %.3f s after %g s of it (%.3f s of "
                          "audio); p95 x%.2f", first, start_s, later_s, PLAN_S, first / tokens_per_s,
                          self.compute.p95_ratio())
            if audio:
                short = statistics.fmean(h for _, _, h in audio)
                later = short + PLAN_S / 2 * tokens_per_s
                now_s = max(self.compute.seconds(first, short), 1e-9)
                self.calls.reprice(max(1.0, self.compute.seconds(first, later) / now_s))
            return len(self.compute.samples)

    def _abandoned(self, reservation: _Reservation) -> None:
        """A session garbage-collected without close() or finish(): its reservation and pages come back (no
        chunk of it can be running: a running chunk holds the session)."""
        with self._cv:
            if reservation.released:
                return
            reservation.released = True
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

    def holds_pages(self, session: StreamSession) -> bool:
        """Whether the session's keys and values live in this batcher's page pool."""
        with self._cv:
            reservation = self._sessions.get(session)
            return reservation is not None and reservation.table is not None

    def pages_of(self, session: StreamSession) -> list[int]:
        """The pool pages the session holds now (for inspection and tests)."""
        with self._cv:
            reservation = self._sessions.get(session)
            table = None if reservation is None else reservation.table
        return [] if table is None else list(table.pages)

    def reserved_bytes_of(self, session: StreamSession) -> int:
        with self._cv:
            reservation = self._sessions.get(session)
            return 0 if reservation is None else reservation.nbytes

    def capacity(self, streams: int | None = None) -> float | None:
        """Audio seconds this batcher computes per wall second when its calls run back to back, measured over
        its recent calls (each call's audio over its wall time, times the calls that run side by side: one per
        core on a CPU, one on a GPU). None until 8 calls were seen.

        ``streams``: for that many streams, whose chunks a busy batcher gathers into calls of up to that many rows
        (at most ``max_batch``): from the calls' fitted fixed cost and cost per audio second
        (``CallMeter.throughput_at``), at least what was measured. Without it, measured at the batch sizes seen,
        which under a rising load reads low (mid-size CosyVoice 3 on 2 cores: 5.8 audio s/s at 6 streams, after a
        run of 4, where 8 streams were carried)."""
        with self._cv:
            if streams is None:
                throughput = self.calls.throughput()
            else:
                throughput = self.calls.throughput_at(min(max(1, streams), self.max_batch))
        return None if throughput is None else throughput * self._side_by_side()

    def _side_by_side(self) -> int:
        return max(1, min(self.workers, self._cores)) if not self.inline else 1

    def chunk_bound_s(self, audio_s: float) -> float | None:
        """The longest a chunk of ``audio_s`` seconds of audio can take, waiting included, if every other open
        session has a chunk of that size ahead of it (``CallMeter.chunk_bound_s``, calls of ``max_batch`` rows;
        with several workers on several cores the calls they run side by side count as one larger call). None
        with no other session open (its own meter measures what a lone stream gets) or no calls measured."""
        with self._cv:
            others = len(self._sessions) - 1
            if others < 1 or self.inline:
                return None
            return self.calls.chunk_bound_s(audio_s, others, self.max_batch * self._side_by_side())

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

    def _session_bytes(self, session: StreamSession, reservation: _Reservation, tokens: int) -> int:
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
        if reservation.table is not None:
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

    # ---------------------------------------------------------------------------------------------- sessions' calls

    def release(self, session: StreamSession) -> None:
        """The session finished or closed: its reservation and pages come back (pages after the step it is in,
        if any). Idempotent."""
        with self._cv:
            reservation = self._sessions.pop(session, None)
            if reservation is None or reservation.released:
                return
            reservation.released = True
            self._reserved -= reservation.nbytes
            reservation.nbytes = 0
            if self._running[session]:  # its pages are still being read or written: free them after the step
                self._release_after_step[session] = reservation.table
                return
        if reservation.table is not None:
            reservation.table.release()

    def call_started(self) -> None:
        """A session began a push or finish (its next chunk may be queued soon: worth waiting for)."""
        with self._cv:
            self._pushers += 1
            self._cv.notify_all()

    def call_ended(self) -> None:
        with self._cv:
            self._pushers -= 1
            self._cv.notify_all()

    def submit(self, session: StreamSession, work: SessionState, em: Emission) -> Future[Chunk]:
        """Queue one planned chunk (inline: compute it now); the future gets its ``Chunk``."""
        with self._cv:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            reservation = self._sessions.get(session)
            if session.closing or reservation is None:
                raise SessionClosedError("the session was closed")
            need = self._session_bytes(session, reservation, session.prompt.num_tokens + em.prefix)
            if need > reservation.nbytes:
                self._admit(need, reservation.nbytes)
                self._reserved += need - reservation.nbytes
                reservation.nbytes = need
            row = Row(spec=session.spec, work=work, emission=em, table=reservation.table)
            job = _Job(session, row, time.perf_counter(), self._group(session, reservation), session.deadline)
            if self.inline:
                self._running[session] += 1
                self._row_sessions[row] = session
                self._inflight += 1
            else:
                self._queue.append(job)
                self._cv.notify_all()
        if self.inline:
            self._execute([job])
        return job.future

    def cancel(self, session: StreamSession) -> None:
        """Drop the session's queued chunks (close()); one being computed is discarded when it ends."""
        with self._cv:
            dropped = [j for j in self._queue if j.session is session]
            for job in dropped:
                self._queue.remove(job)
        for job in dropped:
            job.future.set_exception(SessionClosedError("the session was closed"))

    def _latest_start(self) -> float:
        """When the queue's most urgent row must start to be delivered before its deadline (under the lock); no
        bound until a few chunks were measured (max_wait_ms alone then)."""
        if len(self.compute.samples) < 4:
            return float("inf")
        slow = self.compute.p95_ratio()
        return min(self._deadline(j) - slow * self.compute.seconds(j.row.emission.end - j.row.emission.start,
                                                                 j.row.spec.history(j.row.emission.start))
                   - SAFETY_MARGIN_S for j in self._queue)

    def _deadline(self, job: _Job) -> float:
        dry = job.deadline
        due = dry if dry < float("inf") else job.queued_at + self.first_audio_budget_s
        return self.priority(due, job.queued_at)

    @staticmethod
    def priority(deadline: float, queued_at: float) -> float:
        """The sort key of a queued row: its deadline, clamped to ``queued_at +- STARVATION_BOUND_S``. A row queued
        at q then goes before every row queued after q + 2 * STARVATION_BOUND_S, so none waits forever behind a
        stream of more urgent (or long stalled) rows."""
        return min(max(deadline, queued_at - STARVATION_BOUND_S), queued_at + STARVATION_BOUND_S)

    @staticmethod
    def _group(session: StreamSession, reservation: _Reservation) -> tuple[Any, ...]:
        """Jobs with equal keys may share a call."""
        if session.mode == "recompute" or not isinstance(session.flow, RowsFlow) or not reservation.shares_calls:
            return ("alone", id(session))
        return (id(session.flow), session.n_timesteps, reservation.table is not None)

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
                    # wait for more rows only while the most urgent one can afford it (its chunk still computed
                    # before its listener runs dry), and at most max_wait_ms
                    deadline = min(self._queue[0].queued_at + self.max_wait_s, self._latest_start())
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
                # earliest deadline first: when the row's listener runs dry, or for a first chunk its arrival
                # plus the first-audio budget (a fixed deadline per row: none waits forever)
                order = sorted(self._queue, key=self._deadline)
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
                    self._row_sessions[job.row] = job.session
                self._inflight += len(batch)
                return batch
            finally:
                self._idle_workers -= 1

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)
            # while this worker waits for the next batch, it must not keep the last one's sessions alive: a
            # session its caller dropped is released by its finalizer
            del batch

    def _execute(self, batch: list[_Job]) -> None:
        """Compute a taken batch (its sessions counted as running), deliver its chunks, keep statistics."""
        started = time.perf_counter()
        ops = None
        try:
            ops = count_aten_ops(lambda: self._run(batch)) if self.count_ops else None
            if ops is None:
                self._run(batch)
        except BaseException as exc:  # noqa: BLE001 - a worker never dies with callers waiting on it
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        waits = [started - j.queued_at for j in batch]
        delivered = time.perf_counter()
        audio_s = sum((j.row.emission.end - j.row.emission.start) * j.row.spec.audio_s_per_token for j in batch)
        self._flow_done([j.row for j in batch if not j.row.flow_finished])  # those a failure left running
        with self._cv:
            self._inflight -= len(batch)
            self._cv.notify_all()
            if ops is not None:
                self.ops_counted += ops
                self.ops_rows += len(batch)
            self.batch_sizes[len(batch)] += 1
            self.calls.observe(delivered - started, audio_s, len(batch))
            for job in batch:
                em = job.row.emission
                # the meter fits a stream's steady chunks. A final chunk also flushes the vocoder's held-back
                # tail and a first one sets the stream up: both would read as a large fixed cost per call and
                # price the small hops out of the plan (measured on the demo voice: a final 8 tokens 0.285 s
                # after 12-token chunks of 0.243 s; a first 12 tokens 0.21 s, the following ones 0.15-0.17 s; in
                # a run with them measured, the next stream's start buffer rose from 0.6 s to 3.1 s)
                if job.future.done() and job.future.exception() is None and not em.finalize and em.index > 0:
                    self.compute.observe(em.end - em.start, delivered - job.queued_at,
                                         job.row.spec.history(em.start))
            self.jobs_done += len(batch)
            self.queue_wait_s += sum(waits)
        if log.isEnabledFor(logging.DEBUG):
            tokens = sum(j.row.emission.end - j.row.emission.start for j in batch)
            log.debug("call on %s: %d row(s), %d tokens (%.2f s of audio) in %.3f s, %.4f s per token; waited %.3f s",
                      threading.current_thread().name, len(batch), tokens, audio_s, delivered - started,
                      (delivered - started) / max(tokens, 1), max(waits))
        for listener in list(self.listeners):
            try:
                listener(len(batch), waits)
            except Exception:  # noqa: BLE001 - statistics must never stop the worker
                pass

    # ---------------------------------------------------------------------------------------------- model calls

    def _flow_done(self, rows: list[Row]) -> None:
        """These rows' flow work is over (before any of their futures is set): a session closed or finished
        meanwhile gets its pages back now."""
        release = []
        with self._cv:
            for row in rows:
                row.flow_finished = True
                session = self._row_sessions.pop(row, None)
                if session is None:
                    continue
                self._running[session] -= 1
                if self._running[session] <= 0:
                    del self._running[session]
                    if session in self._release_after_step:
                        release.append(self._release_after_step.pop(session))
        for table in release:
            if table is not None:
                table.release()

    def _run(self, batch: list[_Job]) -> None:
        live = []
        for job in batch:
            if job.session.closing:
                self._flow_done([job.row])
                job.future.set_exception(SessionClosedError("the session was closed"))
            elif job.future.set_running_or_notify_cancel():
                live.append(job)
            else:
                self._flow_done([job.row])
        if not live:
            return
        padded = self._padded_solver if self.graphs else None
        results = run_rows([job.row for job in live], buckets=self._eager_buckets, padded=padded,
                           flow_done=self._flow_done)  # fmt: skip
        for job, result in zip(live, results):
            if isinstance(result, CacheExhaustedError) and not isinstance(result, CacheBudgetError):
                result = CacheBudgetError(str(result))
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
