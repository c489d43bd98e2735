"""Full-duplex streams on a real uvicorn server: a stream keeps reading while its session computes.

A gated engine (the tiny model whose ``push`` waits for the test to open a gate) makes "during a push" a
fact rather than a matter of timing: everything asserted while the gate is closed happened during a push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from test_server import TIMEOUT, _assert_pcm_close, _metrics, _tokens, running_server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from token2wav.serve.app import create_app, uvicorn_config
from token2wav.serve.client import stream_tokens
from token2wav.serve.protocol import ServerLimits, pcm16_bytes


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    t2w = Token2Wav.from_pretrained("tiny")
    with t2w.stream() as s:  # one-time costs out of the way
        s.push(list(range(30)))
    return t2w


class GatedBatcher:
    """The tiny engine's batch-of-one batcher; while ``gate`` is closed, sessions' pushes wait for it (after
    setting ``entered``) in a thread, as a long model call would."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()
        self.pushes = 0  # push calls started
        self.pushing = 0  # push calls in progress
        self.closed = 0  # sessions closed
        self.closed_while_pushing = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stream(self, **kwargs: Any) -> Any:
        return _GatedSession(self, self._inner.stream(**kwargs))


class _GatedSession:
    def __init__(self, eng: GatedBatcher, inner: Any) -> None:
        self.eng = eng
        self.inner = inner
        self.busy = False

    def __getattr__(self, name: str) -> Any:  # the session's clock, plan, ...
        return getattr(self.inner, name)

    def push(self, tokens: Any) -> Any:
        eng = self.eng
        with eng.lock:
            eng.pushes += 1
            eng.pushing += 1
            self.busy = True
        try:
            eng.entered.set()
            assert eng.gate.wait(TIMEOUT), "gate never opened"
            return self.inner.push(tokens)
        finally:
            with eng.lock:
                eng.pushing -= 1
                self.busy = False

    async def apush(self, tokens: Any, arrived_at: float | None = None) -> Any:
        return await asyncio.to_thread(self.push, tokens)

    async def afinish(self) -> Any:
        return await self.inner.afinish()

    def close(self) -> None:
        with self.eng.lock:
            self.eng.closed += 1
            self.eng.closed_while_pushing += int(self.busy)
        self.inner.close()


def _wait(cond: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


async def _await(cond: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.fixture()
def gated(engine: Any) -> Iterator[dict[str, Any]]:
    eng = GatedBatcher(engine.batcher(max_batch=1))
    limits = ServerLimits(
        max_sessions=4, max_tokens_per_session=400, max_message_bytes=8192, max_queued_tokens=100, workers=2
    )
    app = create_app(engine, name="gated", limits=limits, batcher=eng)
    try:
        with running_server(app) as addr:
            yield {"eng": eng, "http": f"http://{addr}", "ws": f"ws://{addr}/v1/stream", "limits": limits}
    finally:
        eng.gate.set()


async def _start(url: str) -> Any:
    ws = await connect(url, open_timeout=TIMEOUT, max_size=None)
    await ws.send(json.dumps({"type": "start"}))
    started = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert started["type"] == "started", started
    return ws, started


async def _read_all(ws: Any) -> tuple[list[dict[str, Any]], bytes]:
    texts: list[dict[str, Any]] = []
    pcm = bytearray()
    try:
        while True:
            msg = await asyncio.wait_for(ws.recv(), TIMEOUT)
            if isinstance(msg, bytes):
                pcm += msg
            else:
                texts.append(json.loads(msg))
    except ConnectionClosed:
        pass
    return texts, bytes(pcm)


def test_disconnect_during_a_push_frees_the_slot_within_100ms(gated: dict[str, Any], engine: Any) -> None:
    eng, base = gated["eng"], gated["http"]
    before = _metrics(base)
    eng.gate.clear()
    eng.entered.clear()

    async def scenario() -> float:
        ws, _ = await _start(gated["ws"])
        await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(90, 1, int(engine.config.vocab_size))}))
        await asyncio.to_thread(eng.entered.wait, TIMEOUT)  # the first 25-token piece is being pushed
        t_abort = time.time()
        ws.transport.abort()  # vanish: no close frame
        return t_abort

    t_abort = asyncio.run(scenario())
    _wait(lambda: _metrics(base)["token2wav_sessions_open"] == 0, "the slot to be freed")
    after = _metrics(base)
    assert not eng.gate.is_set() and eng.pushing == 1  # freed while its push still runs
    detected = after["token2wav_last_disconnect_timestamp_seconds"] - t_abort
    assert 0 <= detected < 0.1, f"slot freed {detected * 1e3:.1f} ms after the client vanished"
    assert after["token2wav_disconnects_total"] - before["token2wav_disconnects_total"] == 1
    # 25 tokens were in the model; the other 65 were queued and are dropped, never pushed
    assert after["token2wav_dropped_tokens_total"] - before["token2wav_dropped_tokens_total"] == 65
    # the session is closed at once, under its running push (a session's close() is safe then: its chunk is
    # discarded and its pages come back when the push ends, tests/test_batcher_accounting.py) ...
    assert eng.closed == 1 and eng.closed_while_pushing == 1
    eng.gate.set()
    _wait(lambda: eng.pushing == 0, "the push to end")
    batcher = gated["eng"]
    _wait(lambda: batcher.sessions_open == 0, "its reservation to be released")  # ... and released after it
    stats = batcher.stats()
    assert eng.pushes == 1 and stats["kv_pages_free"] == stats["kv_pages_total"]


def test_end_sent_during_a_push_is_honoured_in_order(gated: dict[str, Any], engine: Any) -> None:
    eng, base = gated["eng"], gated["http"]
    vocab = int(engine.config.vocab_size)
    first, second = _tokens(50, 2, vocab), _tokens(30, 3, vocab)
    eng.gate.clear()
    eng.entered.clear()

    async def scenario() -> tuple[list[dict[str, Any]], bytes]:
        ws, _ = await _start(gated["ws"])
        received = _metrics(base)["token2wav_tokens_total"]
        await ws.send(json.dumps({"type": "tokens", "tokens": first}))
        await asyncio.to_thread(eng.entered.wait, TIMEOUT)
        await ws.send(json.dumps({"type": "tokens", "tokens": second}))
        await ws.send(json.dumps({"type": "end"}))
        # the server read both messages while its first push is still held
        await _await(lambda: _metrics(base)["token2wav_tokens_total"] - received == 80, "tokens read")
        assert not eng.gate.is_set() and eng.pushes == 1
        eng.gate.set()
        return await _read_all(ws)

    texts, pcm = asyncio.run(scenario())
    # 55 tokens waited behind the held push (over half the 100-token queue): the client was told to slow down
    assert [t["type"] for t in texts if t["type"] in ("slow_down", "resume")] == ["slow_down", "resume"]
    texts = [t for t in texts if t["type"] in ("chunk", "done")]
    kinds = [t["type"] for t in texts]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"chunk"}, kinds
    assert [t["index"] for t in texts[:-1]] == list(range(len(texts) - 1))
    with engine.stream() as s:  # the same tokens in one session, directly
        want = np.concatenate([*s.push(first + second), s.finish()])
    _assert_pcm_close(np.frombuffer(pcm, "<i2"), np.frombuffer(pcm16_bytes(want), "<i2"))
    assert texts[-1]["samples"] == want.size


def test_oversized_message_during_a_push_gets_its_error(gated: dict[str, Any], engine: Any) -> None:
    eng, base = gated["eng"], gated["http"]
    eng.gate.clear()
    eng.entered.clear()

    async def scenario() -> tuple[list[dict[str, Any]], Any]:
        ws, _ = await _start(gated["ws"])
        await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(40, 4, int(engine.config.vocab_size))}))
        await asyncio.to_thread(eng.entered.wait, TIMEOUT)
        await ws.send(json.dumps({"type": "tokens", "tokens": [1] * 5000}))  # > max_message_bytes=8192
        texts = []
        try:
            while True:
                texts.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)))
        except ConnectionClosed:
            pass
        assert not eng.gate.is_set()  # the error came while the push was still held
        return texts, ws

    texts, ws = asyncio.run(scenario())
    assert [t["type"] for t in texts] == ["error"] and texts[0]["code"] == 1009
    assert "max_message_bytes=8192" in texts[0]["message"]
    assert ws.close_code == 1009
    eng.gate.set()
    _wait(lambda: eng.closed == 1, "the session to be closed")
    assert eng.pushes == 1  # nothing after the error was computed
    assert _metrics(base)["token2wav_sessions_open"] == 0


def test_queue_limit_slow_down_then_error(gated: dict[str, Any], engine: Any) -> None:
    eng, base = gated["eng"], gated["http"]
    vocab = int(engine.config.vocab_size)
    before = _metrics(base)
    eng.gate.clear()
    eng.entered.clear()

    async def scenario() -> list[dict[str, Any]]:
        ws, started = await _start(gated["ws"])
        assert started["max_queued_tokens"] == 100
        await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(50, 5, vocab)}))
        await asyncio.to_thread(eng.entered.wait, TIMEOUT)  # 25 in the model, 25 queued
        await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(40, 6, vocab)}))  # 65 queued: over half
        slow = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert slow == {"type": "slow_down", "queued_tokens": 65, "decoded_tokens": 25}
        await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(40, 7, vocab)}))  # 105: over the limit
        texts, _ = await _read_all(ws)
        assert ws.close_code == 1008
        return texts

    texts = asyncio.run(scenario())
    assert [t["type"] for t in texts] == ["error"], texts
    assert texts[0]["status"] == 429 and "max_queued_tokens=100" in texts[0]["message"]
    eng.gate.set()
    _wait(lambda: eng.closed == 1, "the session to be closed")
    after = _metrics(base)
    assert after['token2wav_rejected_total{reason="queue_full"}'] - before.get(
        'token2wav_rejected_total{reason="queue_full"}', 0
    ) == 1


def test_client_keeps_within_the_queue_limit(engine: Any) -> None:
    # 70 tokens sent "all at once" through a 60-token queue: the bundled client waits for decode reports
    limits = ServerLimits(max_sessions=2, max_tokens_per_session=1000, max_queued_tokens=60, workers=2)
    vocab = int(engine.config.vocab_size)
    tokens = _tokens(70, 8, vocab)
    with running_server(create_app(engine, name="q", limits=limits)) as addr:
        res = asyncio.run(stream_tokens(f"ws://{addr}/v1/stream", tokens, rate=0))
        m = _metrics(f"http://{addr}")
    with engine.stream() as s:
        want = np.concatenate([*s.push(tokens), s.finish()])
    _assert_pcm_close(np.frombuffer(res.pcm, "<i2"), np.frombuffer(pcm16_bytes(want), "<i2"))
    assert m.get('token2wav_rejected_total{reason="queue_full"}', 0) == 0


@pytest.mark.parametrize("batched", [False, True, "graphs"], ids=["unbatched", "batched", "graphs"])
def test_twenty_vanished_clients_then_a_21st_is_served(engine: Any, batched: bool | str) -> None:
    limits = ServerLimits(max_sessions=16, max_tokens_per_session=400, workers=4)
    vocab = int(engine.config.vocab_size)
    batcher = engine.batcher(max_wait_ms=5, graphs=batched == "graphs") if batched else None
    with running_server(create_app(engine, name="burst", limits=limits, batcher=batcher)) as addr:
        url, base = f"ws://{addr}/v1/stream", f"http://{addr}"

        async def scenario() -> Any:
            for i in range(20):  # start, 39 tokens, drop the TCP connection
                ws, _ = await _start(url)
                await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(39, 100 + i, vocab)}))
                ws.transport.abort()
            return await stream_tokens(url, _tokens(30, 9, vocab), rate=0)  # at once: no 1013

        res = asyncio.run(scenario())
        assert res.samples > 0
        _wait(lambda: _metrics(base)["token2wav_sessions_open"] == 0, "all slots free")
        m = _metrics(base)
        assert m["token2wav_disconnects_total"] == 20
        assert m.get('token2wav_rejected_total{reason="busy"}', 0) == 0
        assert m['token2wav_sessions_total{kind="stream"}'] == 21
        if batcher is not None:  # every vanished stream's batched session was released too
            _wait(lambda: batcher.sessions_open == 0, "the batcher's sessions to close")


@contextlib.contextmanager
def small_buffer_server(app: Any) -> Iterator[str]:
    """:func:`running_server` with a 16 KiB kernel send buffer per connection (no autotuning up to 4 MiB), so a
    client that stops reading blocks the server's sends after ~100 KB instead of after megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # inherited by accepted connections
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


def test_client_that_never_reads_is_dropped_without_stalling_others(engine: Any) -> None:
    limits = ServerLimits(max_sessions=4, max_tokens_per_session=2000, send_timeout_s=1.0, workers=2)
    vocab = int(engine.config.vocab_size)
    with small_buffer_server(create_app(engine, name="hog", limits=limits)) as addr:
        url, base = f"ws://{addr}/v1/stream", f"http://{addr}"
        host, port = addr.split(":")

        async def scenario() -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills quickly
            sock.connect((host, int(port)))
            sock.setblocking(False)
            hog = await connect(url, sock=sock, open_timeout=TIMEOUT, max_queue=1, max_size=None)
            try:
                await hog.send(json.dumps({"type": "start"}))
                await hog.send(json.dumps({"type": "tokens", "tokens": _tokens(300, 10, vocab)}))  # ~580 KB
                await hog.send(json.dumps({"type": "end"}))
                # meanwhile another client is served in full
                res = await stream_tokens(url, _tokens(30, 11, vocab), rate=0)
                assert res.samples > 0
                # the hog never reads: a send times out, the hog is dropped and its slot freed
                await _await(lambda: _metrics(base)["token2wav_sessions_open"] == 0, "the hog to be dropped")
            finally:
                hog.transport.abort()

        asyncio.run(scenario())
        m = _metrics(base)
        assert m["token2wav_disconnects_total"] == 1
        assert m['token2wav_sessions_total{kind="stream"}'] == 2
        assert m["token2wav_chunks_total"] < 300 / 25 + 2  # the hog's audio was never all sent
        r = httpx.get(base + "/health", timeout=TIMEOUT)
        assert r.json()["sessions_open"] == 0
