"""FastAPI application: one loaded model, many concurrent streaming sessions.

Model work (session creation, ``push``, ``finish``, offline synthesis) runs in a thread pool so the event
loop only moves bytes; a slow session therefore never blocks another one's I/O. Each WebSocket stream is
full duplex: it keeps reading while its session computes (tokens queue up in order, bounded; a disconnect,
an ``end`` or a bad message is seen at once), and the session's calls stay strictly sequential, which is the
contract of an engine session. Streams get their session from :meth:`ServerState.open_session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from token2wav.budget import BudgetedLRU, MemoryBudget
from token2wav.demo import low_latency_options
from token2wav.serve import protocol as P
from token2wav.serve.auth import AccessMiddleware, AccessPolicy, install_log_redaction
from token2wav.serve.bodies import read_body
from token2wav.serve.metrics import CONTENT_TYPE, Registry
from token2wav.serve.prompt_store import PromptStore, prompt_id
from token2wav.serve.upload import prompt_request
from token2wav.serve.waiting import wait_event, within
from token2wav.streaming.batcher import CacheBudgetError
from token2wav.streaming.options import StreamOptions
from token2wav.streaming.state import PromptCache
from token2wav.threads import ShortLivedThreads

__all__ = ["ServerState", "create_app", "first_hop", "uvicorn_config"]

T = TypeVar("T")
# Admission keeps this share of the measured capacity for new streams at most: the measurement is noisy and
# streams' compute comes in bursts.
CAPACITY_HEADROOM = 0.9

log = logging.getLogger("token2wav.serve")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_COMPUTE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def first_hop(t2w: Any, prompt: Any) -> int | None:
    """The hop an adaptive stream on this server starts from when its client names none: the first audio as
    early as the model allows, its smallest valid hop after ``prompt`` (the demo voice's run-time chunk), from
    which the adaptive schedule grows; None: the model's default (trained chunks). The start-up calibration
    measures this hop (serve/assembly.py)."""
    return low_latency_options(t2w, prompt).get("hop")


_STALL_BUCKETS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _Metrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.sessions_open = r.gauge("token2wav_sessions_open", "Streams and synthesize requests in progress.")
        self.sessions_total = r.counter("token2wav_sessions_total", "Sessions admitted.", ["kind"])
        self.rejected_total = r.counter(
            "token2wav_rejected_total", "Requests refused or ended by a limit or a client error.", ["reason"]
        )
        self.disconnects_total = r.counter(
            "token2wav_disconnects_total", "Streams the client left (or stopped reading) before done."
        )
        self.last_disconnect = r.gauge(
            "token2wav_last_disconnect_timestamp_seconds",
            "Unix time at which the slot of the last stream whose client left was released.",
        )
        self.dropped_tokens_total = r.counter(
            "token2wav_dropped_tokens_total", "Queued tokens never decoded because their stream ended early."
        )
        self.draining = r.gauge("token2wav_draining", "1 while the server shuts down: nothing new is admitted.")
        self.errors_total = r.counter("token2wav_internal_errors_total", "Requests failed by a server error.")
        self.tokens_total = r.counter("token2wav_tokens_total", "Speech tokens received.")
        self.chunks_total = r.counter("token2wav_chunks_total", "Audio chunks sent on streams.")
        self.audio_seconds_total = r.counter("token2wav_audio_seconds_total", "Seconds of audio produced.")
        self.first_chunk = r.histogram(
            "token2wav_first_chunk_latency_seconds",
            "Stream first-chunk latency: from arrival of the message that completed the first chunk "
            "to that chunk being sent.",
            _LATENCY_BUCKETS,
        )
        self.compute = r.histogram(
            "token2wav_model_call_seconds",
            "Time of one model call (push, finish or synthesize).",
            _COMPUTE_BUCKETS,
            ["call"],
        )
        self.prompts = r.gauge("token2wav_prompts_registered", "Prompts held in the prompt registry.")
        # read from the engine's prompt cache when /metrics is scraped
        self.cache_hits = r.gauge("token2wav_prompt_cache_hits", "Sessions that reused a cached prompt state.")
        self.cache_misses = r.gauge("token2wav_prompt_cache_misses", "Prompt states computed.")
        self.cache_entries = r.gauge("token2wav_prompt_cache_entries", "Prompt states held by the engine.")
        self.batch_rows = r.histogram(
            "token2wav_batch_rows", "Chunks (sessions) computed together in one batched model call.", _ROW_BUCKETS
        )
        self.queue_wait = r.histogram(
            "token2wav_batch_queue_wait_seconds", "Time a chunk waited in the batcher's queue.", _LATENCY_BUCKETS
        )
        self.kv_pages_used = r.gauge("token2wav_kv_pages_used", "Pages of the batcher's key/value pool in use.")
        self.kv_pages_total = r.gauge("token2wav_kv_pages_total", "Pages the batcher's key/value pool holds.")
        self.kv_pool_bytes = r.gauge("token2wav_kv_pool_bytes", "Memory of the batcher's key/value pool.")
        self.memory_bytes = r.gauge("token2wav_memory_bytes", "Bytes held in each account of the server's memory "
                                    "budget (--max-cache-mb).", ["account"])
        self.memory_budget = r.gauge("token2wav_memory_budget_bytes", "The memory budget (--max-cache-mb); 0: none.")
        self.audio_need = r.gauge("token2wav_audio_need", "Audio seconds per second the open streams need (one each).")
        self.audio_capacity = r.gauge("token2wav_audio_capacity", "Audio seconds per second the server measures it "
                                      "can compute with one more stream than are open, its chunks sharing calls (0: "
                                      "not measured yet).")
        self.streams_waiting = r.gauge("token2wav_streams_waiting", "New streams waiting for capacity.")
        self.worst_stall = r.histogram(
            "token2wav_stream_worst_stall_seconds",
            "Per ended stream: its longest silence, as the server's model of the listener (chunk delivery times, "
            "the start buffer) hears it.",
            _STALL_BUCKETS,
        )

    def collect_memory(self, memory: MemoryBudget) -> None:
        for account, nbytes in memory.snapshot().items():
            self.memory_bytes.set(float(nbytes), account=account)
        self.memory_budget.set(float(memory.total_bytes or 0))

    def observe_batch(self, rows: int, waits: list[float]) -> None:
        """Batcher listener (called on its worker thread after every batched call)."""
        self.batch_rows.observe(float(rows))
        for wait in waits:
            self.queue_wait.observe(wait)

    def collect(self, t2w: Any) -> None:
        cache = getattr(t2w, "prompt_cache", None)
        if cache is not None:
            self.cache_hits.set(getattr(cache, "hits", 0))
            self.cache_misses.set(getattr(cache, "misses", 0))
            self.cache_entries.set(len(cache))

    def collect_batcher(self, batcher: Any) -> None:
        self.audio_capacity.set(batcher.capacity(streams=batcher.sessions_open + 1) or 0.0)
        stats = batcher.stats()
        self.kv_pages_used.set(stats["kv_pages_total"] - stats["kv_pages_free"])
        self.kv_pages_total.set(stats["kv_pages_total"])
        self.kv_pool_bytes.set(stats["kv_pool_bytes"])


# A new stream or synthesize request arriving at a full server waits this long for a slot before it is refused:
# a client that just vanished is noticed and freed within this time (the receiver sees its disconnect at once).
ADMIT_WAIT_S = 0.1


@dataclass
class ServerState:
    t2w: Any
    name: str
    limits: P.ServerLimits
    vocab_size: int
    executor: Executor
    metrics: _Metrics
    prompts: BudgetedLRU  # prompt_id -> prompt, bounded by count (max_prompts) and by the memory budget
    open_sessions: int = 0  # touched only on the event loop thread
    make_prompt: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None
    prompt_store: PromptStore | None = None  # with --prompt-dir
    draining: bool = False  # set when shutdown begins: nothing new is admitted
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set when the drain time is over
    slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    batcher: Any = None  # a token2wav.Batcher: computes every stream's chunks (a batch of one with --no-batching)
    streams: set[Any] = field(default_factory=set)  # streams holding a slot and a session (event loop thread only)
    waiting: list[Any] = field(default_factory=list)  # streams waiting for capacity, in order
    # streams admitted by load whose session is still being opened: counted from admission on. Counted only once
    # open, streams that arrived together were each admitted against the few already open (measured: of 16 within
    # 0.5 s, 14-16 admitted and 14-16 stalled)
    starting: set[Any] = field(default_factory=set)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def open_session(self, **kwargs: Any) -> Any:
        """The one place a stream gets its session: the batcher's ``stream(**kwargs)``; ``await s.apush(tokens,
        arrived_at=...)`` / ``await s.afinish()`` wait for its chunks, ``s.close()`` releases it."""
        fut = self.executor.submit(lambda: self.batcher.stream(**kwargs))
        try:
            session = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the client left while the session was being made
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else _quiet_close(f.result()))
            raise
        return session

    def try_admit(self, kind: str) -> bool:
        if self.draining or self.open_sessions >= self.limits.max_sessions:
            return False  # the caller reports (and counts) the refusal
        self.open_sessions += 1
        self.metrics.sessions_open.set(self.open_sessions)
        self.metrics.sessions_total.inc(kind=kind)
        return True

    async def admit(self, kind: str) -> bool:
        """Take a session slot, waiting up to ``ADMIT_WAIT_S`` for one to be freed."""
        if self.try_admit(kind):
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADMIT_WAIT_S
        while not self.draining and (left := deadline - loop.time()) > 0:
            self.slot_freed.clear()
            await wait_event(self.slot_freed, left)
            if self.try_admit(kind):
                return True
        return False

    def release(self) -> None:
        self.open_sessions -= 1
        self.metrics.sessions_open.set(self.open_sessions)
        self.slot_freed.set()

    def audio_need(self) -> float:
        """Audio seconds per second the open streams need, and those admitted and starting: one each (a listener
        hears its stream in real time)."""
        return float(len(self.streams) + len(self.starting))

    def load_allows(self, extra: float = 1.0) -> bool:
        """Whether ``extra`` more real-time streams fit in what the batcher measures it can compute (with
        CAPACITY_HEADROOM kept free for the measurement's noise); yes while nothing is measured yet, and yes on an
        idle server: refusing its one stream helps no one, and only calls re-measure a capacity that may be stale
        (measured: after two demo streams on 2 cores it read 0.9 audio s/s and every later stream was refused)."""
        if not self.limits.admit_by_capacity or not (self.streams or self.starting):
            return True
        capacity = self.capacity(extra)
        return capacity is None or self.audio_need() + extra <= capacity * CAPACITY_HEADROOM

    def capacity(self, extra: float = 1.0) -> float | None:
        """What the batcher computes, in audio seconds per second, with ``extra`` more real-time streams than are
        open: their chunks share calls (``Batcher.capacity(streams=...)``)."""
        return self.batcher.capacity(streams=len(self.streams) + len(self.starting) + math.ceil(extra))

    async def wait_for_capacity(self, notify: Callable[[int], Any], gone: Callable[[], bool] = lambda: False,
                                stream: Any = None) -> bool:
        """Hold a new stream until the load allows it: in a bounded queue, for at most admission_wait_s,
        calling ``notify(position)`` when its place changes. False: refused (queue full or waited too long), or
        ``gone()`` (its client left; whoever notices sets ``slot_freed`` so that the queue looks again). True:
        ``stream`` is counted in ``starting`` (in the same step, so that no other stream is admitted without
        it) until it opens or ends."""
        if not self.waiting and self.load_allows():
            if stream is not None:
                self.starting.add(stream)
            return True
        if len(self.waiting) >= self.limits.max_waiting_streams:
            return False
        ticket = object()
        self.waiting.append(ticket)
        self.metrics.streams_waiting.set(len(self.waiting))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.admission_wait_s
        shown = -1
        try:
            while not self.draining and not gone():
                position = self.waiting.index(ticket) + 1
                if position == 1 and self.load_allows():
                    if stream is not None:
                        self.starting.add(stream)
                    return True
                if position != shown:
                    shown = position
                    await notify(position)
                left = deadline - loop.time()
                if left <= 0:
                    return False
                self.slot_freed.clear()
                await wait_event(self.slot_freed, min(left, 0.25))  # capacity is re-measured as calls finish
            return False
        finally:
            self.waiting.remove(ticket)
            self.metrics.streams_waiting.set(len(self.waiting))
            self.slot_freed.set()  # the next in line looks again

    def over_capacity_error(self) -> P.ProtocolError:
        capacity = self.capacity() or 0.0
        err = P.ProtocolError(
            f"server at capacity: {len(self.streams) + len(self.starting)} real-time streams open need "
            f"{self.audio_need():.1f} s of audio per second, it computes about {capacity:.1f}; try again later",
            ws_code=P.WS_TRY_AGAIN_LATER,
        )
        err.retry_after_s = 2.0
        return err

    def busy_error(self) -> P.ProtocolError:
        if self.draining:
            return P.ProtocolError("server shutting down", ws_code=P.WS_GOING_AWAY, status=503)
        return P.ProtocolError(
            f"server busy: {self.limits.max_sessions} sessions open, try again later",
            ws_code=P.WS_TRY_AGAIN_LATER,
        )

    def lookup_prompt(self, prompt_id: str | None, *, status: int = 404) -> Any:
        if prompt_id is None:
            return None
        prompt = self.prompts.get(prompt_id)
        if prompt is None:
            hint = ""
            if prompt_id in P.voice_names(self.t2w):  # a voice's name where its prompt id belongs
                hint = f" ({prompt_id!r} is one of the model's voices: GET /v1/voices gives its prompt_id)"
            raise P.ProtocolError(
                f"unknown prompt_id {prompt_id[:40]!r}; register it with POST /v1/prompts{hint}", status=status
            )
        self.prompts.move_to_end(prompt_id)
        return prompt

    async def get_prompt(self, prompt_id: str | None, *, status: int = 404) -> Any:
        """:meth:`lookup_prompt`, reloading a prompt dropped from memory from ``--prompt-dir`` if it is there."""
        if prompt_id is not None and prompt_id not in self.prompts and self.prompt_store is not None:
            arrays = await self.run(self.prompt_store.load, prompt_id)
            if arrays is not None and self.make_prompt is not None:
                try:
                    prompt = await self.run(self.make_prompt, *arrays)
                except (ValueError, TypeError) as e:
                    log.warning("prompt store: cannot use %s: %s", prompt_id, e)
                else:
                    self.add_prompt(prompt_id, prompt)
                    return prompt  # kept if the budget has room; used for this request either way
        return self.lookup_prompt(prompt_id, status=status)

    def add_prompt(self, prompt_id: str, prompt: Any) -> bool:
        """Register ``prompt``; False if the memory budget cannot hold it (the oldest were dropped for room:
        with --prompt-dir they are reloaded when asked for)."""
        kept = self.prompts.put(prompt_id, prompt)
        self.metrics.prompts.set(len(self.prompts))
        return kept

    async def drain(self, timeout_s: float, *, grace_s: float = 5.0) -> None:
        """Stop admitting, let open sessions finish for up to ``timeout_s``, then close the rest with 1001."""
        self.draining = True
        self.metrics.draining.set(1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.open_sessions > 0 and loop.time() < deadline:
            self.slot_freed.clear()
            await wait_event(self.slot_freed, min(0.5, deadline - loop.time()))
        self.closing.set()
        deadline = loop.time() + grace_s  # closing frames to clients that read; others are cut by uvicorn
        while self.open_sessions > 0 and loop.time() < deadline:
            self.slot_freed.clear()
            await wait_event(self.slot_freed, deadline - loop.time())


def _vocab_size(t2w: Any) -> int:
    try:
        return int(t2w.config.vocab_size)
    except AttributeError:
        raise ValueError("t2w: engine config has no vocab_size (needed to check token ids)") from None


def _prompt_id(req: P.PromptRequest) -> str:
    """A recording's id names its audio (set by serve/upload.py); posted arrays are named by their hash."""
    return req.prompt_id or prompt_id(req.tokens, req.mel, req.embedding)


async def _build_prompt(state: ServerState, t2w: Any, arrays: tuple[np.ndarray, ...]) -> Any:
    """A registered prompt, checked and warmed (this may run the encoder: in the thread pool, off the loop)."""
    try:
        prompt = await state.run(state.make_prompt, *arrays)
        prepare = getattr(t2w, "prepare_prompt", None)
        if callable(prepare):
            await state.run(prepare, prompt)
    except (ValueError, TypeError) as e:
        raise P.ProtocolError(f"invalid prompt: {e}") from None
    return prompt


def _error_response(err: P.ProtocolError) -> JSONResponse:
    return JSONResponse({"error": err.message, "status": err.status}, status_code=err.status)


def create_app(
    t2w: Any,
    *,
    name: str = "model",
    limits: P.ServerLimits | None = None,
    prompt_factory: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None,
    access: AccessPolicy | None = None,
    prompt_dir: str | None = None,
    batcher: Any = None,
) -> FastAPI:
    """Build the server around an already loaded engine (``token2wav.Token2Wav`` or anything alike).

    ``access``: key and web origins required of clients (default: no key, WebSockets from the server's own
    origin only). ``prompt_dir``: a folder where registered prompts are kept across restarts. ``batcher``: a
    ``token2wav.Batcher`` of ``t2w`` that computes the streams' chunks and owns the memory budget (the app
    closes it at shutdown); default: ``t2w.batcher(max_batch=1)``, a batch of one per call, no budget.
    """
    limits = limits or P.ServerLimits()
    if prompt_factory is None:
        from token2wav import Prompt

        def prompt_factory(tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> Any:
            return Prompt(tokens=tokens, mel=mel, embedding=embedding)

    make_prompt = prompt_factory
    if batcher is None:
        batcher = t2w.batcher(max_batch=1)
    # one memory budget for the key/value pages, prompt states, this registry and the fixed-shape buffers: the
    # batcher's (--max-cache-mb; without one it only counts, for /metrics)
    memory = batcher.memory
    if isinstance(getattr(t2w, "prompt_cache", None), PromptCache):
        t2w.prompt_cache.use_budget(memory)
    state = ServerState(
        t2w=t2w,
        name=name,
        limits=limits,
        vocab_size=_vocab_size(t2w),
        # short-lived threads: a prompt pass or an upload's torch work must not leave a second OpenMP pool beside
        # the batcher's (token2wav.threads)
        executor=ShortLivedThreads(max_workers=limits.workers, name="token2wav-task"),
        metrics=_Metrics(),
        prompts=BudgetedLRU(memory, "prompt_registry", limits.max_prompts),
        make_prompt=make_prompt,
        batcher=batcher,
    )
    batcher.listeners.append(state.metrics.observe_batch)
    if prompt_dir is not None:
        state.prompt_store = PromptStore(prompt_dir, state.vocab_size, max_file_bytes=limits.max_prompt_bytes)
        _load_stored_prompts(state, t2w)
    info = P.describe_model(t2w, name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)
        state.batcher.close()

    app = FastAPI(title="token2wav", version="1", lifespan=lifespan)
    app.state.server = state
    app.state.access = access = access or AccessPolicy()
    app.add_middleware(
        AccessMiddleware, policy=access, on_refuse=lambda reason: state.metrics.rejected_total.inc(reason=reason)
    )

    @app.get("/health")
    async def health() -> Response:
        body = {
            "status": "draining" if state.draining else "ok",
            "model": name,
            "sessions_open": state.open_sessions,
            "max_sessions": limits.max_sessions,
        }
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [info]}

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.collect(t2w)
        state.metrics.collect_batcher(state.batcher)  # also brings the pool into the budget's account
        state.metrics.audio_need.set(state.audio_need())
        state.metrics.collect_memory(memory)
        return Response(state.metrics.registry.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/prompts")
    async def register_prompt(request: Request) -> Response:
        # an upload holds its body (up to --max-prompt-bytes) and runs work: it takes a session slot like a stream,
        # so concurrent uploads are bounded by --max-sessions (503 beyond)
        if not await state.admit("prompt"):
            err = state.busy_error()
            state.metrics.rejected_total.inc(reason=err.reason)
            return _error_response(err)
        try:
            return await _register_prompt(request)
        finally:
            state.release()

    async def _register_prompt(request: Request) -> Response:
        try:
            body = await read_body(request, limits.max_prompt_bytes, "max_prompt_bytes")
            # JSON arrays, or a recording (audio/wav or multipart) that the engine clones: see serve/upload.py
            req = await prompt_request(
                state, t2w, request.headers.get("content-type"), body, request.query_params.get("speaker")
            )
            pid = _prompt_id(req)
            if pid not in state.prompts:
                arrays = (req.tokens, req.mel, req.embedding)
                prompt = await _build_prompt(state, t2w, arrays)
                if state.prompt_store is not None:
                    try:
                        kept = await state.run(state.prompt_store.save, pid, *arrays)
                    except OSError as e:  # the prompt still works until a restart
                        log.warning("prompt store: cannot write %s: %s", pid, e)
                    else:
                        # the first arrays stored under an id win: a recording cloned again on another CPU
                        # (or replica) serves the prompt every other replica serves
                        if not all(np.array_equal(a, b) for a, b in zip(kept, arrays)):
                            prompt = await _build_prompt(state, t2w, kept)
                if not state.add_prompt(pid, prompt):
                    raise P.ProtocolError(
                        "the server's memory budget (--max-cache-mb) has no room for this prompt; try later or "
                        "send a shorter one", ws_code=P.WS_TRY_AGAIN_LATER)
            state.prompts.move_to_end(pid)
        except P.ProtocolError as e:
            state.metrics.rejected_total.inc(reason=e.reason)
            return _error_response(e)
        return JSONResponse({"prompt_id": pid, "tokens": int(req.tokens.size), "mel_frames": int(req.mel.shape[0])})

    @app.post("/v1/synthesize")
    async def synthesize(request: Request) -> Response:
        try:
            body = await read_body(request, limits.max_message_bytes)
            req = await state.run(P.parse_synthesize_request, body, state.vocab_size)  # off the event loop
            if req.tokens.size > limits.max_tokens_per_session:
                raise P.ProtocolError(
                    f"{req.tokens.size} tokens exceed max_tokens_per_session={limits.max_tokens_per_session}",
                    ws_code=P.WS_TOO_BIG,
                )
            prompt = await state.get_prompt(req.prompt_id)
            if not await state.admit("synthesize"):
                raise state.busy_error()
        except P.ProtocolError as e:
            state.metrics.rejected_total.inc(reason=e.reason)
            return _error_response(e)
        try:
            kwargs: dict[str, Any] = {"prompt": prompt}
            if req.attention is not None:
                kwargs["attention"] = req.attention
            t0 = time.perf_counter()
            try:
                audio = await state.run(t2w.synthesize, req.tokens, **kwargs)
            except ValueError as e:
                err = P.ProtocolError(f"synthesis refused the input: {e}")
                state.metrics.rejected_total.inc(reason=err.reason)
                return _error_response(err)
            except Exception as e:  # an engine bug must not take the server down
                state.metrics.errors_total.inc()
                return JSONResponse(
                    {"error": f"internal error: {type(e).__name__}: {e}", "status": 500}, status_code=500
                )
            elapsed = time.perf_counter() - t0
        finally:
            state.release()
        state.metrics.compute.observe(elapsed, call="synthesize")
        state.metrics.tokens_total.inc(float(req.tokens.size))
        sr = int(t2w.sample_rate)
        state.metrics.audio_seconds_total.inc(len(audio) / sr)
        headers = {
            "X-Sample-Rate": str(sr),
            "X-Samples": str(len(audio)),
            "X-Compute-Ms": f"{elapsed * 1e3:.2f}",
        }
        if req.format == "wav":
            return Response(P.wav_bytes(audio, sr), media_type="audio/wav", headers=headers)
        return Response(P.pcm16_bytes(audio), media_type="application/octet-stream", headers=headers)

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        handler = _StreamHandler(state, ws)
        if not await state.admit("stream"):
            await handler.fail(state.busy_error())
            return
        try:
            # admission by load: the audio the open streams need against what the server computes
            try:
                admitted = await state.wait_for_capacity(handler.send_queued, handler.left, handler)
            except _Disconnected:
                return  # the client left while it waited: its 'queued' update could not be sent
            finally:
                await handler.stop_watching()
            if handler.left():
                return
            if not admitted:
                await handler.fail(state.busy_error() if state.draining else state.over_capacity_error())
                return
            await handler.run()
        finally:
            state.starting.discard(handler)
            handler.release()
            handler.close_session()

    from token2wav.serve.page import install_page  # GET / (the web page), /v1/voices, /v1/utterances, /v1/tokenize

    install_page(app, state)
    return app


def _load_stored_prompts(state: ServerState, t2w: Any) -> None:
    """Register the prompts kept in ``--prompt-dir`` (newest first, up to max_prompts); skip unusable ones."""
    store = state.prompt_store
    assert store is not None and state.make_prompt is not None
    loaded = 0
    prepare = getattr(t2w, "prepare_prompt", None)
    for pid, arrays in reversed(store.load_all(limit=state.limits.max_prompts)):  # oldest first: LRU order
        try:
            prompt = state.make_prompt(*arrays)
            if callable(prepare):
                prepare(prompt)  # checks it against this model (mel size, frames per token)
        except (ValueError, TypeError) as e:
            log.warning("prompt store: skipping %s: not usable with this model: %s", pid, str(e)[:200])
            continue
        state.add_prompt(pid, prompt)
        loaded += 1
    if loaded:
        log.info("prompt store: %d prompt(s) loaded from %s", loaded, store.directory)


class _Disconnected(Exception):
    pass


@dataclass
class _Frames:
    frames: list[Any]  # dict (sent as JSON text) or bytes
    chunk: np.ndarray | None = None  # set for an audio chunk: accounted when sent
    arrived: float = 0.0


@dataclass
class _Close:
    code: int
    reason: str = ""


class _Outbox:
    """What the sender task writes, in order. Audio chunks take one of a few slots (so a client that reads
    slowly holds back the model work of its own stream only); control messages never wait."""

    def __init__(self, chunk_slots: int = 4) -> None:
        self.items: deque[_Frames | _Close] = deque()
        self.ready = asyncio.Event()
        self.slots = asyncio.Semaphore(chunk_slots)

    def put(self, item: _Frames | _Close) -> None:
        self.items.append(item)
        self.ready.set()

    async def put_chunk(self, item: _Frames) -> None:
        await self.slots.acquire()
        self.put(item)

    def replace_with(self, item: _Close, first: _Frames | None = None) -> None:
        """Drop what is not sent yet and end with ``item`` (after ``first``, if given)."""
        for old in self.items:
            if isinstance(old, _Frames) and old.chunk is not None:
                self.slots.release()
        self.items.clear()
        if first is not None:
            self.items.append(first)
        self.put(item)

    async def get(self) -> _Frames | _Close:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


class _StreamHandler:
    """One WebSocket stream, full duplex: three tasks around one engine session.

    * the receiver reads every client message as it arrives, whatever the model is doing: it validates it,
      queues tokens (at most ``max_queued_tokens``), notes ``end``, and sees a disconnect at once;
    * the worker feeds queued tokens to the session one chunk-sized piece at a time, in order, then finishes;
    * the sender writes the worker's chunks (and control messages) to the client.

    Whichever ends first decides: the sender after ``done`` (close 1000), a client error (its error, then its
    close code), a disconnect or a client that stops reading (slot freed at once, queued work dropped), or a
    server drain (close 1001).
    """

    def __init__(self, state: ServerState, ws: WebSocket) -> None:
        self.state = state
        self.ws = ws
        self.session: Any = None
        self.outbox = _Outbox()
        self.input = asyncio.Event()  # set by the receiver whenever it queued something for the worker
        self.start_msg: P.StartMessage | None = None
        self.pending: deque[tuple[np.ndarray, float]] = deque()  # (tokens, arrival time) not yet decoded
        self.queued = 0  # tokens in ``pending``
        self.decoded = 0  # tokens handed to the model so far
        self.end_at: float | None = None  # arrival time of 'end'
        self.slowed = False  # a 'slow_down' is outstanding
        self.tokens = 0
        self.chunks = 0
        self.samples = 0
        self.first_sent = False
        self.done = False
        self.piece = 25  # tokens per push; set from the model at 'start'
        self.released = False
        # while it waits for admission: the connection is watched (a client that leaves frees its place at once)
        # and a first message that arrives meanwhile is kept for the receiver
        self._watch: asyncio.Future[None] | None = None
        self._gone = False
        self._early: Any = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.streams.discard(self)
            self.state.release()

    def close_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            if session.playback.started:  # what the server's model of this listener heard
                self.state.metrics.worst_stall.observe(session.playback.worst_stall_s)
            session.close()
            self.state.slot_freed.set()  # capacity freed: a waiting stream looks again

    def left(self) -> bool:
        """Whether the client closed the connection while its stream waited for admission."""
        return self._gone

    async def _watch_while_queued(self) -> None:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            self._gone = True
            self.state.slot_freed.set()  # the waiting loop looks again, and leaves the queue
        else:
            self._early = msg  # one message is kept; a disconnect after it shows when the stream runs

    async def stop_watching(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def send_queued(self, position: int) -> None:
        if self._watch is None:  # first time in the queue
            self._watch = asyncio.ensure_future(self._watch_while_queued())
        st = self.state
        await self._send({"type": "queued", "position": position, "need": round(st.audio_need(), 2),
                          "capacity": round(st.capacity() or 0.0, 2)})

    # -- transport
    async def _send(self, frame: Any) -> None:
        coro = self.ws.send_bytes(frame) if isinstance(frame, bytes) else self.ws.send_json(frame)
        try:
            await within(coro, self.state.limits.send_timeout_s)
        except asyncio.TimeoutError:
            raise _Disconnected("send timeout: the client stopped reading") from None
        except (WebSocketDisconnect, RuntimeError, OSError) as e:  # the peer is gone
            raise _Disconnected(str(e)) from None

    async def fail(self, err: P.ProtocolError) -> None:
        """Refuse a connection that holds no session (busy, draining): error message, then close."""
        self.state.metrics.rejected_total.inc(reason=err.reason)
        with contextlib.suppress(Exception):
            await self._send(err.to_json())
        with contextlib.suppress(Exception):
            await within(self.ws.close(err.ws_code, err.close_reason), self.state.limits.send_timeout_s)

    # -- the three tasks
    async def _receive_loop(self) -> None:
        st = self.state
        limits = st.limits
        while True:
            if self._early is not None:
                msg, self._early = self._early, None
            else:
                msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise _Disconnected("client closed")
            text = msg.get("text")
            if text is None:
                raise P.ProtocolError("binary frames are not accepted: send JSON text messages")
            if len(text) > limits.max_message_bytes or len(text.encode("utf-8")) > limits.max_message_bytes:
                raise P.ProtocolError(
                    f"message exceeds max_message_bytes={limits.max_message_bytes}", ws_code=P.WS_TOO_BIG
                )
            if self.end_at is not None:
                continue  # after 'end' the stream is finishing: later messages are ignored
            parsed = P.parse_client_message(text, st.vocab_size)
            now = time.perf_counter()
            if isinstance(parsed, P.StartMessage):
                if self.start_msg is not None:
                    raise P.ProtocolError("wrong message order: 'start' sent twice")
                self.start_msg = parsed
            elif self.start_msg is None:
                kind = "tokens" if isinstance(parsed, P.TokensMessage) else "end"
                raise P.ProtocolError(f"wrong message order: '{kind}' before 'start'")
            elif isinstance(parsed, P.TokensMessage):
                self._queue_tokens(parsed.tokens, now)
            else:
                self.end_at = now
            self.input.set()

    def _queue_tokens(self, tokens: np.ndarray, now: float) -> None:
        limits = self.state.limits
        n = int(tokens.size)
        if self.tokens + n > limits.max_tokens_per_session:
            raise P.ProtocolError(
                f"session would hold {self.tokens + n} tokens, over max_tokens_per_session="
                f"{limits.max_tokens_per_session}",
                ws_code=P.WS_TOO_BIG,
            )
        if self.queued + n > limits.max_queued_tokens:
            raise P.ProtocolError(
                f"queue limit: {self.queued} tokens wait to be decoded and {n} more arrived, over "
                f"max_queued_tokens={limits.max_queued_tokens}; send no faster than the audio plays "
                "(pause on 'slow_down' until 'resume')",
                status=429,
            )
        self.tokens += n
        self.state.metrics.tokens_total.inc(float(n))
        if n == 0:
            return
        self.pending.append((tokens, now))
        self.queued += n
        if not self.slowed and self.queued > limits.max_queued_tokens // 2:
            self.slowed = True
            self.outbox.put(_Frames([{"type": "slow_down", **self._progress()}]))

    def _take(self, count: int) -> tuple[np.ndarray, float]:
        """Up to ``count`` queued tokens, joined across messages, and the arrival of the last message used."""
        parts: list[np.ndarray] = []
        arrived = 0.0
        need = count
        while need > 0 and self.pending:
            tokens, arrived = self.pending[0]
            if tokens.size <= need:
                self.pending.popleft()
                parts.append(tokens)
                need -= tokens.size
            else:
                parts.append(tokens[:need])
                self.pending[0] = (tokens[need:], arrived)
                need = 0
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.queued -= int(out.size)
        self.decoded += int(out.size)
        limits = self.state.limits
        if self.slowed and self.queued <= limits.max_queued_tokens // 4:
            self.slowed = False
            self.outbox.put(_Frames([{"type": "resume", **self._progress()}]))
        return out, arrived

    def _progress(self) -> dict[str, int]:
        return {"queued_tokens": self.queued, "decoded_tokens": self.decoded}

    async def _wait_input(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            self.input.clear()
            if not await wait_event(self.input, deadline - loop.time()):
                raise P.ProtocolError(f"idle timeout: {what} for {timeout:g} s", status=408)

    async def _work_loop(self) -> None:
        st = self.state
        limits = st.limits
        # A connection holds one of max_sessions slots: one that never starts a session gives it back sooner.
        await self._wait_input(lambda: self.start_msg is not None, limits.start_timeout_s, "no 'start' message")
        msg = self.start_msg
        assert msg is not None
        prompt = await st.get_prompt(msg.prompt_id, status=400)
        # the server's streams are paced by their listeners' clocks (where that keeps them exact: cached mode, float
        # flow) unless the client names a schedule
        kwargs: dict[str, Any] = {"prompt": prompt}
        exact_any_hop = StreamOptions.exact_under_any_hops(msg.mode, msg.preset, st.t2w.config)
        if msg.schedule is not None or exact_any_hop:
            kwargs["schedule"] = msg.schedule or "adaptive"
        if kwargs.get("schedule") == "adaptive" and msg.hop is None and msg.preset is None:
            hop = first_hop(st.t2w, prompt)
            if hop is not None:
                kwargs["hop"] = hop
        for key in ("preset", "hop", "mode", "window_frames", "pre_lookahead_len", "start_buffer_ms"):
            if getattr(msg, key) is not None:
                kwargs[key] = getattr(msg, key)
        try:
            self.session = await st.open_session(**kwargs)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise P.ProtocolError(f"cannot start session: {e}") from None
        st.starting.discard(self)
        if not self.released:  # (release() takes it out: when the client leaves, before its session closes)
            st.streams.add(self)
        chunk = int(getattr(st.t2w, "chunk_tokens", 25))
        self.piece = max(1, min(chunk, msg.hop or chunk))
        self.outbox.put(
            _Frames(
                [
                    {
                        "type": "started",
                        "session": uuid.uuid4().hex[:16],
                        "sample_rate": int(st.t2w.sample_rate),
                        "token_rate": float(st.t2w.token_rate),
                        "max_queued_tokens": limits.max_queued_tokens,
                        "schedule": self.session.plan.schedule,
                        "start_buffer_ms": round(self.session.start_buffer_s * 1000),
                    }
                ]
            )
        )
        while True:
            if self.queued > 0:
                # one chunk-sized piece per call: a large message still gets its first chunk early, and a
                # disconnect or an error stops the work between pieces
                tokens, arrived = self._take(self.piece)
                t0 = time.perf_counter()
                chunks = await self.session.apush(tokens, arrived_at=arrived)  # the rate is the client's
                elapsed = time.perf_counter() - t0
                st.metrics.compute.observe(elapsed, call="push")
                await self._emit([np.asarray(c) for c in chunks], elapsed, arrived)
            elif self.end_at is not None:
                if self.tokens > 0:
                    t0 = time.perf_counter()
                    last = await self.session.afinish()
                    elapsed = time.perf_counter() - t0
                    st.metrics.compute.observe(elapsed, call="finish")
                    await self._emit([np.asarray(last)], elapsed, self.end_at)
                self.outbox.put(_Frames([{"type": "done", "chunks": self.chunks, "samples": self.samples}]))
                self.outbox.put(_Close(P.WS_NORMAL))
                return
            else:
                await self._wait_input(
                    lambda: self.queued > 0 or self.end_at is not None, limits.idle_timeout_s, "no message"
                )

    async def _emit(self, chunks: list[np.ndarray], elapsed: float, arrived: float) -> None:
        chunks = [c.reshape(-1) for c in chunks if c.size > 0]
        if not chunks:
            return
        share_ms = elapsed * 1e3 / len(chunks)  # one call producing several chunks: split its time evenly
        for c in chunks:
            header = {
                "type": "chunk",
                "index": self.chunks,
                "samples": int(c.size),
                "compute_ms": round(share_ms, 3),
                "start_buffer_ms": round(self.session.start_buffer_s * 1000),
                **self._progress(),
            }
            self.chunks += 1
            self.samples += int(c.size)
            await self.outbox.put_chunk(_Frames([header, P.pcm16_bytes(c)], chunk=c, arrived=arrived))

    async def _send_loop(self) -> None:
        m = self.state.metrics
        sr = self.state.t2w.sample_rate
        while True:
            item = await self.outbox.get()
            if isinstance(item, _Close):
                with contextlib.suppress(Exception):  # a client gone right after the last message is no error
                    await within(self.ws.close(item.code, item.reason), self.state.limits.send_timeout_s)
                return
            for frame in item.frames:
                await self._send(frame)
                if isinstance(frame, dict) and frame.get("type") == "done":
                    self.done = True  # a client that leaves from here on left a finished stream
            if item.chunk is not None:
                self.outbox.slots.release()
                if not self.first_sent:
                    self.first_sent = True
                    m.first_chunk.observe(time.perf_counter() - item.arrived)
                m.chunks_total.inc()
                m.audio_seconds_total.inc(item.chunk.size / sr)

    # -- supervision
    async def run(self) -> None:
        recv = asyncio.create_task(self._receive_loop())
        work = asyncio.create_task(self._work_loop())
        send = asyncio.create_task(self._send_loop())
        drain = asyncio.create_task(self.state.closing.wait())
        tasks = [recv, send, work, drain]  # checked in this order when several end at once
        outcome: BaseException | None = None
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while outcome is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in tasks:
                    if t not in done:
                        continue
                    if t is drain:
                        outcome = P.ProtocolError("server shutting down", ws_code=P.WS_GOING_AWAY, status=503)
                    elif t.exception() is not None:
                        outcome = t.exception()
                    elif t is send:
                        outcome = _Finished()
                    else:
                        continue  # the worker queued its last message: wait for the sender
                    break
            await self._conclude(outcome, recv, work, send)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _conclude(
        self, outcome: BaseException, recv: asyncio.Task[Any], work: asyncio.Task[Any], send: asyncio.Task[Any]
    ) -> None:
        st = self.state
        m = st.metrics
        if isinstance(outcome, _Finished) or self.done:
            return
        if isinstance(outcome, (_Disconnected, WebSocketDisconnect)):
            # the client left (or stopped reading): its slot is free now, its queued tokens are dropped, and a
            # model call in flight finishes in its thread, after which the session is closed
            self.release()
            work.cancel()
            send.cancel()
            m.disconnects_total.inc()
            m.dropped_tokens_total.inc(float(self.queued))
            m.last_disconnect.set(time.time())
            return
        if isinstance(outcome, CacheBudgetError):  # the batcher's memory budget: like a full server
            outcome = P.ProtocolError(f"server busy: {outcome}", ws_code=P.WS_TRY_AGAIN_LATER, status=503)
        if isinstance(outcome, P.ProtocolError):
            err = outcome
            m.rejected_total.inc(reason=err.reason)
        else:
            m.errors_total.inc()
            err = P.ProtocolError(
                f"internal error: {type(outcome).__name__}: {outcome}", ws_code=P.WS_INTERNAL_ERROR
            )
        # an error ends the model work now; the sender finishes the frame it is writing (so a chunk header
        # is never cut from its audio), then writes the error and closes with its code
        work.cancel()
        m.dropped_tokens_total.inc(float(self.queued))
        if send.done():
            return
        self.outbox.replace_with(_Close(err.ws_code, err.close_reason), _Frames([err.to_json()]))
        # wait for the sender only: the receiver may be the task that raised (it is done already); a client
        # that is gone or not reading ends the sender through its failed or timed-out write
        await asyncio.wait({send}, timeout=2 * st.limits.send_timeout_s)


class _Finished(Exception):
    """The stream ended normally: 'done' sent, closed with 1000."""


def _quiet_close(session: Any) -> None:
    with contextlib.suppress(Exception):
        session.close()


def uvicorn_config(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 50000, log_level: str = "warning", **kwargs: Any
) -> Any:
    """uvicorn settings matching the app's limits (the protocol-level frame cap sits above the app's own)."""
    import uvicorn

    limits: P.ServerLimits = app.state.server.limits
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=2 * limits.max_message_bytes + 4096,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_keep_alive=5,
        **kwargs,
    )
    install_log_redaction()  # after uvicorn set up its loggers: a browser's ?token=KEY is never logged
    return config
