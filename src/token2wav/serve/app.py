"""FastAPI application: one loaded model, many concurrent streaming sessions.

Model work (session creation, ``push``, ``finish``, offline synthesis) runs in a thread pool so the event
loop only moves bytes; a slow session therefore never blocks another one's I/O. Per-session work is
strictly sequential (each handler awaits its own ``push`` before reading the next message), which is the
contract of an engine session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from token2wav.serve import protocol as P
from token2wav.serve.metrics import CONTENT_TYPE, Registry
from token2wav.serve.upload import prompt_request

__all__ = ["ServerState", "create_app", "uvicorn_config"]

T = TypeVar("T")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_COMPUTE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Metrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.sessions_open = r.gauge("token2wav_sessions_open", "Streams and synthesize requests in progress.")
        self.sessions_total = r.counter("token2wav_sessions_total", "Sessions admitted.", ["kind"])
        self.rejected_total = r.counter(
            "token2wav_rejected_total", "Requests refused or ended by a limit or a client error.", ["reason"]
        )
        self.disconnects_total = r.counter("token2wav_disconnects_total", "Streams the client left before done.")
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

    def collect(self, t2w: Any) -> None:
        cache = getattr(t2w, "prompt_cache", None)
        if cache is not None:
            self.cache_hits.set(getattr(cache, "hits", 0))
            self.cache_misses.set(getattr(cache, "misses", 0))
            self.cache_entries.set(len(cache))


@dataclass
class ServerState:
    t2w: Any
    name: str
    limits: P.ServerLimits
    vocab_size: int
    executor: ThreadPoolExecutor
    metrics: _Metrics
    prompts: OrderedDict[str, Any]
    open_sessions: int = 0  # touched only on the event loop thread

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def try_admit(self, kind: str) -> bool:
        if self.open_sessions >= self.limits.max_sessions:
            return False  # the caller reports (and counts) the refusal
        self.open_sessions += 1
        self.metrics.sessions_open.set(self.open_sessions)
        self.metrics.sessions_total.inc(kind=kind)
        return True

    def release(self) -> None:
        self.open_sessions -= 1
        self.metrics.sessions_open.set(self.open_sessions)

    def busy_error(self) -> P.ProtocolError:
        return P.ProtocolError(
            f"server busy: {self.limits.max_sessions} sessions open, try again later",
            ws_code=P.WS_TRY_AGAIN_LATER,
        )

    def lookup_prompt(self, prompt_id: str | None, *, status: int = 404) -> Any:
        if prompt_id is None:
            return None
        prompt = self.prompts.get(prompt_id)
        if prompt is None:
            raise P.ProtocolError(
                f"unknown prompt_id {prompt_id[:40]!r}; register it with POST /v1/prompts", status=status
            )
        self.prompts.move_to_end(prompt_id)
        return prompt


def _vocab_size(t2w: Any) -> int:
    try:
        return int(t2w.config.vocab_size)
    except AttributeError:
        raise ValueError("t2w: engine config has no vocab_size (needed to check token ids)") from None


def _prompt_id(req: P.PromptRequest) -> str:
    h = hashlib.sha256()
    for arr in (req.tokens.astype("<i8"), req.mel.astype("<f4"), req.embedding.astype("<f4")):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return "p_" + h.hexdigest()[:24]


def _error_response(err: P.ProtocolError) -> JSONResponse:
    return JSONResponse({"error": err.message, "status": err.status}, status_code=err.status)


async def _read_body(request: Request, limit: int, limit_name: str = "max_message_bytes") -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.ProtocolError(f"request body of {declared} bytes exceeds {limit_name}={limit}", ws_code=P.WS_TOO_BIG)
    chunks: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:  # chunked uploads carry no length: count as we go
            raise P.ProtocolError(f"request body exceeds {limit_name}={limit}", ws_code=P.WS_TOO_BIG)
        chunks.append(part)
    return b"".join(chunks)


def create_app(
    t2w: Any,
    *,
    name: str = "model",
    limits: P.ServerLimits | None = None,
    prompt_factory: Callable[[np.ndarray, np.ndarray, np.ndarray], Any] | None = None,
) -> FastAPI:
    """Build the server around an already loaded engine (``token2wav.Token2Wav`` or anything alike)."""
    limits = limits or P.ServerLimits()
    if prompt_factory is None:
        from token2wav import Prompt

        def prompt_factory(tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> Any:
            return Prompt(tokens=tokens, mel=mel, embedding=embedding)

    make_prompt = prompt_factory
    state = ServerState(
        t2w=t2w,
        name=name,
        limits=limits,
        vocab_size=_vocab_size(t2w),
        executor=ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="token2wav-model"),
        metrics=_Metrics(),
        prompts=OrderedDict(),
    )
    info = P.describe_model(t2w, name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="token2wav", version="1", lifespan=lifespan)
    app.state.server = state

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "sessions_open": state.open_sessions,
            "max_sessions": limits.max_sessions,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [info]}

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.collect(t2w)
        return Response(state.metrics.registry.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/prompts")
    async def register_prompt(request: Request) -> Response:
        try:
            body = await _read_body(request, limits.max_prompt_bytes, "max_prompt_bytes")
            # JSON arrays, or a recording (audio/wav or multipart) that the engine clones: see serve/upload.py
            req = await prompt_request(state, t2w, request.headers.get("content-type"), body)
            pid = _prompt_id(req)
            if pid not in state.prompts:
                try:
                    # building (and warming) the prompt may run the encoder: keep it off the loop
                    prompt = await state.run(make_prompt, req.tokens, req.mel, req.embedding)
                    prepare = getattr(t2w, "prepare_prompt", None)
                    if callable(prepare):
                        await state.run(prepare, prompt)
                except (ValueError, TypeError) as e:
                    raise P.ProtocolError(f"invalid prompt: {e}") from None
                state.prompts[pid] = prompt
                while len(state.prompts) > limits.max_prompts:
                    state.prompts.popitem(last=False)
                state.metrics.prompts.set(len(state.prompts))
            state.prompts.move_to_end(pid)
        except P.ProtocolError as e:
            state.metrics.rejected_total.inc(reason=_reason(e))
            return _error_response(e)
        return JSONResponse({"prompt_id": pid, "tokens": int(req.tokens.size), "mel_frames": int(req.mel.shape[0])})

    @app.post("/v1/synthesize")
    async def synthesize(request: Request) -> Response:
        try:
            req = P.parse_synthesize_request(await _read_body(request, limits.max_message_bytes), state.vocab_size)
            if req.tokens.size > limits.max_tokens_per_session:
                raise P.ProtocolError(
                    f"{req.tokens.size} tokens exceed max_tokens_per_session={limits.max_tokens_per_session}",
                    ws_code=P.WS_TOO_BIG,
                )
            prompt = state.lookup_prompt(req.prompt_id)
            if not state.try_admit("synthesize"):
                raise state.busy_error()
        except P.ProtocolError as e:
            state.metrics.rejected_total.inc(reason=_reason(e))
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
                state.metrics.rejected_total.inc(reason=_reason(err))
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
        if not state.try_admit("stream"):
            await _StreamHandler(state, ws).fail(state.busy_error())
            return
        handler = _StreamHandler(state, ws)
        try:
            await handler.run()
        finally:
            state.release()
            handler.close_session()

    return app


def _reason(err: P.ProtocolError) -> str:
    return {400: "bad_request", 404: "unknown_prompt", 408: "idle_timeout", 413: "too_big", 503: "busy"}.get(
        err.status, str(err.status)
    )


class _Disconnected(Exception):
    pass


class _StreamHandler:
    """One WebSocket stream: a small state machine around one engine session."""

    def __init__(self, state: ServerState, ws: WebSocket) -> None:
        self.state = state
        self.ws = ws
        self.session: Any = None
        self.pending: Future[Any] | None = None  # the model call in flight, if any
        self.tokens = 0
        self.chunks = 0
        self.samples = 0
        self.first_sent = False
        self.done = False
        self.stop = threading.Event()  # tells a running push job to stop between pieces
        self.piece = 25  # tokens per push inside one message; set from the model at 'start'

    # -- model calls: keep a handle on the future so a vanished client cannot close a busy session
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        fut = self.state.executor.submit(fn, *args)
        self.pending = fut
        try:
            return await asyncio.wrap_future(fut)
        finally:
            if fut.done():
                self.pending = None

    def close_session(self) -> None:
        self.stop.set()
        session, self.session = self.session, None
        if session is None:
            return
        pending = self.pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f: _quiet_close(session))
        else:
            _quiet_close(session)

    # -- transport
    async def _send_json(self, payload: dict[str, Any]) -> None:
        await self._send(self.ws.send_json(payload))

    async def _send(self, coro: Any) -> None:
        try:
            await asyncio.wait_for(coro, self.state.limits.send_timeout_s)
        except asyncio.TimeoutError:
            raise _Disconnected("send timeout") from None
        except (WebSocketDisconnect, RuntimeError, OSError) as e:  # the peer is gone
            raise _Disconnected(str(e)) from None

    async def _receive_text(self) -> str:
        limits = self.state.limits
        # A connection holds one of max_sessions slots: one that never starts a session gives it back sooner.
        waiting_for_start = self.session is None
        timeout = limits.start_timeout_s if waiting_for_start else limits.idle_timeout_s
        try:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
        except asyncio.TimeoutError:
            what = "no 'start' message" if waiting_for_start else "no message"
            raise P.ProtocolError(f"idle timeout: {what} for {timeout:g} s", status=408) from None
        if msg["type"] == "websocket.disconnect":
            raise _Disconnected("client closed")
        text = msg.get("text")
        if text is None:
            raise P.ProtocolError("binary frames are not accepted: send JSON text messages")
        if len(text) > limits.max_message_bytes or len(text.encode("utf-8")) > limits.max_message_bytes:
            raise P.ProtocolError(f"message exceeds max_message_bytes={limits.max_message_bytes}", ws_code=P.WS_TOO_BIG)
        return text

    async def fail(self, err: P.ProtocolError) -> None:
        self.state.metrics.rejected_total.inc(reason=_reason(err))
        with contextlib.suppress(_Disconnected, Exception):
            await self._send_json(err.to_json())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(err.ws_code, err.close_reason), self.state.limits.send_timeout_s)

    # -- the protocol
    async def run(self) -> None:
        try:
            while not self.done:
                raw = await self._receive_text()
                await self._handle(P.parse_client_message(raw, self.state.vocab_size))
            with contextlib.suppress(Exception):  # a client gone right after 'done' is no error
                await asyncio.wait_for(self.ws.close(P.WS_NORMAL), self.state.limits.send_timeout_s)
        except P.ProtocolError as e:
            await self.fail(e)
        except (_Disconnected, WebSocketDisconnect):
            if not self.done:
                self.state.metrics.disconnects_total.inc()
        except Exception as e:
            self.state.metrics.errors_total.inc()
            err = P.ProtocolError(f"internal error: {type(e).__name__}: {e}", ws_code=P.WS_INTERNAL_ERROR)
            with contextlib.suppress(Exception):
                await self._send_json(err.to_json())
                await self.ws.close(err.ws_code, err.close_reason)

    async def _handle(self, msg: P.ClientMessage) -> None:
        st = self.state
        if isinstance(msg, P.StartMessage):
            if self.session is not None:
                raise P.ProtocolError("wrong message order: 'start' sent twice")
            prompt = st.lookup_prompt(msg.prompt_id, status=400)
            kwargs: dict[str, Any] = {"prompt": prompt}
            for key in ("preset", "hop", "mode", "window_frames"):
                if getattr(msg, key) is not None:
                    kwargs[key] = getattr(msg, key)
            try:
                self.session = await self._call(lambda: st.t2w.stream(**kwargs))
            except (ValueError, TypeError, NotImplementedError) as e:
                raise P.ProtocolError(f"cannot start session: {e}") from None
            chunk = int(getattr(st.t2w, "chunk_tokens", 25))
            self.piece = max(1, min(chunk, msg.hop or chunk))
            await self._send_json(
                {
                    "type": "started",
                    "session": uuid.uuid4().hex[:16],
                    "sample_rate": int(st.t2w.sample_rate),
                    "token_rate": float(st.t2w.token_rate),
                }
            )
            return
        if self.session is None:
            kind = "tokens" if isinstance(msg, P.TokensMessage) else "end"
            raise P.ProtocolError(f"wrong message order: '{kind}' before 'start'")
        arrived = time.perf_counter()
        if isinstance(msg, P.TokensMessage):
            n = int(msg.tokens.size)
            if self.tokens + n > st.limits.max_tokens_per_session:
                raise P.ProtocolError(
                    f"session would hold {self.tokens + n} tokens, over max_tokens_per_session="
                    f"{st.limits.max_tokens_per_session}",
                    ws_code=P.WS_TOO_BIG,
                )
            self.tokens += n
            st.metrics.tokens_total.inc(float(n))
            if n == 0:
                return
            await self._push(msg.tokens, arrived)
            return
        # end
        if self.tokens > 0:
            t0 = time.perf_counter()
            last = await self._call(self.session.finish)
            elapsed = time.perf_counter() - t0
            st.metrics.compute.observe(elapsed, call="finish")
            await self._send_chunks([np.asarray(last)], elapsed, arrived)
        await self._send_json({"type": "done", "chunks": self.chunks, "samples": self.samples})
        self.done = True

    async def _push(self, tokens: np.ndarray, arrived: float) -> None:
        """Push a message's tokens in pieces of at most one chunk, all in one worker job, and send each chunk
        as soon as it exists: a client that sends many tokens at once still gets its first chunk early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        session, piece, stop = self.session, self.piece, self.stop

        def post(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            for i in range(0, tokens.size, piece):
                if stop.is_set():  # the client left: do not compute audio nobody will read
                    return
                t0 = time.perf_counter()
                chunks = session.push(tokens[i : i + piece])
                post((chunks, time.perf_counter() - t0))

        fut = self.state.executor.submit(work)
        self.pending = fut
        fut.add_done_callback(lambda _f: post(None))  # queued after every piece's result
        while (item := await queue.get()) is not None:
            chunks, elapsed = item
            self.state.metrics.compute.observe(elapsed, call="push")
            await self._send_chunks([np.asarray(c) for c in chunks], elapsed, arrived)
        fut.result()  # re-raise a failed push
        self.pending = None

    async def _send_chunks(self, chunks: list[np.ndarray], elapsed: float, arrived: float) -> None:
        chunks = [c.reshape(-1) for c in chunks if c.size > 0]
        if not chunks:
            return
        share_ms = elapsed * 1e3 / len(chunks)  # one call producing several chunks: split its time evenly
        sr = self.state.t2w.sample_rate
        m = self.state.metrics
        for c in chunks:
            await self._send_json(
                {
                    "type": "chunk",
                    "index": self.chunks,
                    "samples": int(c.size),
                    "compute_ms": round(share_ms, 3),
                }
            )
            await self._send(self.ws.send_bytes(P.pcm16_bytes(c)))
            if not self.first_sent:
                self.first_sent = True
                m.first_chunk.observe(time.perf_counter() - arrived)
            self.chunks += 1
            self.samples += int(c.size)
            m.chunks_total.inc()
            m.audio_seconds_total.inc(c.size / sr)


def _quiet_close(session: Any) -> None:
    with contextlib.suppress(Exception):
        session.close()


def uvicorn_config(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 50000, log_level: str = "warning", **kwargs: Any
) -> Any:
    """uvicorn settings matching the app's limits (the protocol-level frame cap sits above the app's own)."""
    import uvicorn

    limits: P.ServerLimits = app.state.server.limits
    return uvicorn.Config(
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
