"""The HTTP/WebSocket server, end to end: a real uvicorn on a free loopback port, real clients.

Every test is bounded (timeouts on every wait) and every server is stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
import wave
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from tolerances import PCM_STEP, pcm_steps
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from token2wav.serve.app import create_app, uvicorn_config
from token2wav.serve.client import StreamError, stream_tokens
from token2wav.serve.metrics import parse_exposition
from token2wav.serve.protocol import ServerLimits, pcm16_bytes

TIMEOUT = 30.0  # upper bound for any single wait in this file

# ------------------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    t2w = Token2Wav.from_pretrained("tiny")  # the bundled tiny random model (CosyVoice 3 layout)
    # one-time set-up costs (first offline call, first streaming call) stay out of the tests' timings
    t2w.synthesize([1, 2, 3, 4], attention="chunk")
    with t2w.stream() as s:
        s.push(list(range(30)))
    return t2w


def _vocab(engine: Any) -> int:
    return int(engine.config.vocab_size)


# ------------------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port> in a thread; yields ``host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


LIMITS = ServerLimits(
    max_sessions=10,
    max_tokens_per_session=400,
    max_message_bytes=32 * 1024,
    idle_timeout_s=10.0,
    send_timeout_s=10.0,
    workers=4,
    admit_by_capacity=False,  # these tests open more streams at once than the tiny model computes in real time
)


@pytest.fixture(scope="module", params=["batched", "unbatched", "graphs"])
def server(engine: Any, request: Any) -> Iterator[dict[str, Any]]:
    """The server as `token2wav serve` runs it (streams through one batcher), with --no-batching, and with
    --graphs (fixed-shape batches; run eagerly on a CPU)."""
    engine.prompt_cache.clear()  # each variant computes its prompts' states itself
    batcher = None
    if request.param != "unbatched":
        batcher = engine.batcher(max_wait_ms=5, graphs=request.param == "graphs")
    app = create_app(engine, name="test", limits=LIMITS, batcher=batcher)
    with running_server(app) as addr:
        yield {"http": f"http://{addr}", "ws": f"ws://{addr}/v1/stream", "app": app, "batcher": batcher}
    if batcher is not None:
        assert batcher.sessions_open == 0  # every stream's session was released


# ------------------------------------------------------------------------------------------ helpers


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _pcm(audio: np.ndarray) -> np.ndarray:
    return np.frombuffer(pcm16_bytes(audio), dtype="<i2")


def _assert_pcm_close(got: np.ndarray, want: np.ndarray, sample_rate: int = 24000) -> None:
    """Equal up to what float32 kernels may move the audio by (tests/tolerances.py, in int16 steps).

    Streamed and offline chunk-causal mel (or a batched row and the row alone) agree to float32 rounding, and
    the tiny model's HiFT integrates F0 into a phase, which turns that into audio differences that grow with
    length: ``pcm_steps`` bounds them for the stream's duration and peak (measured 1.9e-5 (0.6 step) at 90
    tokens, 1.3e-4 at 250, and 2 steps for a batched graphs row on AVX2, where the bound is 1 + 0.1 * 2 s).
    """
    assert got.shape == want.shape, (got.shape, want.shape)
    peak = float(np.abs(want).max(initial=0)) * PCM_STEP
    steps = pcm_steps(peak, len(want) / sample_rate)
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max(initial=0) <= steps, steps


def _metrics(base: str) -> dict[str, float]:
    r = httpx.get(base + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse_exposition(r.text)


def _synth_pcm(base: str, tokens: list[int], **extra: Any) -> np.ndarray:
    r = httpx.post(base + "/v1/synthesize", json={"tokens": tokens, "format": "pcm", **extra}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return np.frombuffer(r.content, dtype="<i2")


async def _exchange(url: str, messages: list[Any], *, read_until_close: bool = True) -> dict[str, Any]:
    """Send raw frames, collect every reply until the server closes. Returns texts, binaries, close code."""
    texts: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    async with connect(url, open_timeout=TIMEOUT, max_size=None) as ws:
        for m in messages:
            await ws.send(json.dumps(m) if isinstance(m, dict) else m)
        try:
            while read_until_close:
                msg = await asyncio.wait_for(ws.recv(), TIMEOUT)
                if isinstance(msg, bytes):
                    binaries.append(msg)
                else:
                    texts.append(json.loads(msg))
        except ConnectionClosed:
            pass
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
        return {"texts": texts, "binaries": binaries, "code": ws.close_code, "reason": ws.close_reason}


def _good_stream(url: str, vocab: int, n: int = 12) -> None:
    r = asyncio.run(stream_tokens(url, _tokens(n, 99, vocab), rate=0))
    assert r.samples > 0


# ------------------------------------------------------------------------------------------ tests


def test_health_models_metrics(server: dict[str, Any], engine: Any) -> None:
    base = server["http"]
    h = httpx.get(base + "/health", timeout=TIMEOUT).json()
    assert h["status"] == "ok" and h["max_sessions"] == LIMITS.max_sessions
    models = httpx.get(base + "/v1/models", timeout=TIMEOUT).json()["models"]
    assert models[0]["name"] == "test"
    assert models[0]["sample_rate"] == engine.sample_rate
    m = _metrics(base)
    assert m["token2wav_sessions_open"] == 0
    assert "token2wav_first_chunk_latency_seconds_count" in m


def test_stream_equals_synthesize(server: dict[str, Any], engine: Any) -> None:
    tokens = _tokens(70, 1, _vocab(engine))
    offline = _pcm(engine.synthesize(np.asarray(tokens), attention="chunk"))
    via_http = _synth_pcm(server["http"], tokens, attention="chunk")
    _assert_pcm_close(via_http, offline)

    # 1000 tokens/s: one token per message, so the chunks come from many small pushes
    res = asyncio.run(stream_tokens(server["ws"], tokens, rate=1000.0, hop=25))
    streamed = np.frombuffer(res.pcm, dtype="<i2")
    _assert_pcm_close(streamed, offline)
    assert len(res.chunks) >= 2
    assert [c["index"] for c in res.chunks] == list(range(len(res.chunks)))
    assert res.first_chunk_latency_s is not None and res.first_chunk_latency_s < res.wall_s
    assert res.started["sample_rate"] == engine.sample_rate


def test_one_big_message_is_pushed_chunk_by_chunk(server: dict[str, Any], engine: Any) -> None:
    key = 'token2wav_model_call_seconds_count{call="push"}'
    before = _metrics(server["http"]).get(key, 0.0)
    tokens = _tokens(60, 30, _vocab(engine))
    # one message with all 60 tokens, on the fixed schedule (the default adaptive one may wait for a longer hop)
    res = asyncio.run(stream_tokens(server["ws"], tokens, rate=0, schedule="fixed"))
    assert _metrics(server["http"])[key] - before == 3  # pieces of one chunk: 25 + 25 + 10
    assert len(res.chunks) == 3  # two emitted while pushing, one by finish
    _assert_pcm_close(np.frombuffer(res.pcm, "<i2"), _pcm(engine.synthesize(np.asarray(tokens), attention="chunk")))


def test_synthesize_wav(server: dict[str, Any], engine: Any) -> None:
    tokens = _tokens(30, 2, _vocab(engine))
    r = httpx.post(server["http"] + "/v1/synthesize", json={"tokens": tokens}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(r.content)) as w:
        assert w.getframerate() == engine.sample_rate and w.getsampwidth() == 2 and w.getnchannels() == 1
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    _assert_pcm_close(frames, _pcm(engine.synthesize(np.asarray(tokens))))
    assert int(r.headers["x-samples"]) == frames.size


def _single_session(engine: Any, tokens: list[int], opts: dict[str, Any]) -> np.ndarray:
    session = engine.stream(**opts)
    try:
        pieces = session.push(np.asarray(tokens)) + [session.finish()]
    finally:
        session.close()
    return _pcm(np.concatenate(pieces))


CONCURRENT_OPTS = [
    {"hop": 25},
    {"hop": 50},
    {"preset": "balanced"},
    {"preset": "quality"},
    {"preset": "assistant"},
    {},
    {"preset": "constrained"},
    {"hop": 25, "mode": "recompute"},
]


def test_concurrent_sessions_match_single(server: dict[str, Any], engine: Any) -> None:
    vocab = _vocab(engine)
    jobs = [(_tokens(35 + 5 * i, 10 + i, vocab), CONCURRENT_OPTS[i]) for i in range(8)]
    single = [_single_session(engine, t, o) for t, o in jobs]

    async def all_at_once() -> list[Any]:
        # half of them at an LLM-like pace, half all at once, so that pushes of different sessions interleave
        return await asyncio.gather(
            *(stream_tokens(server["ws"], t, rate=0 if i % 2 else 200.0, **o) for i, (t, o) in enumerate(jobs))
        )

    t0 = time.perf_counter()
    results = asyncio.run(all_at_once())
    assert time.perf_counter() - t0 < TIMEOUT
    for res, want in zip(results, single):
        _assert_pcm_close(np.frombuffer(res.pcm, "<i2"), want)
    assert _metrics(server["http"])["token2wav_sessions_open"] == 0


BAD_STREAMS = [
    # (id, frames to send, close code, words in the error message)
    ("malformed-json", ['{"type": "start"'], 1008, "malformed JSON"),
    ("not-an-object", ["[1, 2]"], 1008, "JSON object"),
    ("deep-nesting", ["[" * 10000 + "]" * 10000], 1008, "nested too deeply"),
    ("huge-int-literal", ['{"type": "tokens", "tokens": [' + "9" * 5000 + "]}"], 1008, "malformed JSON"),
    ("unknown-type", [{"type": "hello"}], 1008, "unknown message type"),
    ("extra-field", [{"type": "start", "voice": "x"}], 1008, "unexpected field"),
    ("tokens-before-start", [{"type": "tokens", "tokens": [1]}], 1008, "before 'start'"),
    ("end-before-start", [{"type": "end"}], 1008, "before 'start'"),
    ("start-twice", [{"type": "start"}, {"type": "start"}], 1008, "'start' sent twice"),
    ("token-too-big", [{"type": "start"}, {"type": "tokens", "tokens": [1, 10**6]}], 1008, "out of range"),
    ("token-negative", [{"type": "start"}, {"type": "tokens", "tokens": [-1]}], 1008, "out of range"),
    ("token-not-int", [{"type": "start"}, {"type": "tokens", "tokens": [1.5]}], 1008, "only integers"),
    ("token-bool", [{"type": "start"}, {"type": "tokens", "tokens": [True]}], 1008, "only integers"),
    ("tokens-not-list", [{"type": "start"}, {"type": "tokens", "tokens": "1 2"}], 1008, "list of integers"),
    ("binary-frame", [{"type": "start"}, b"\x00\x01"], 1008, "binary frames"),
    ("bad-hop", [{"type": "start", "hop": 0}], 1008, "'hop'"),
    ("hop-not-a-chunk-multiple", [{"type": "start", "hop": 7}], 1008, "multiple"),
    ("bad-mode", [{"type": "start", "mode": "fast"}], 1008, "'mode'"),
    ("bad-preset", [{"type": "start", "preset": "turbo"}], 1008, "preset"),
    ("unknown-prompt", [{"type": "start", "prompt_id": "p_nope"}], 1008, "unknown prompt_id"),
    (
        "message-too-big",
        [{"type": "start"}, {"type": "tokens", "tokens": [1] * 20000}],
        1009,
        "max_message_bytes",
    ),
    (
        "too-many-tokens",
        # 20 tokens make no chunk yet; the next 390 cross the limit of 400 and are refused before any work
        [{"type": "start"}, {"type": "tokens", "tokens": [1] * 20}, {"type": "tokens", "tokens": [1] * 390}],
        1009,
        "max_tokens_per_session",
    ),
    # far over the limit: refused by the WebSocket layer itself before the app sees it
    ("frame-over-protocol-cap", [{"type": "start"}, "x" * 100_000], 1009, None),
    (
        "after-end",
        [
            {"type": "start"},
            {"type": "tokens", "tokens": [1] * 10},
            {"type": "end"},
            {"type": "tokens", "tokens": [1]},
        ],
        1000,
        None,
    ),
]


@pytest.mark.parametrize("frames, code, words", [b[1:] for b in BAD_STREAMS], ids=[b[0] for b in BAD_STREAMS])
def test_bad_stream_input(server: dict[str, Any], engine: Any, frames: list[Any], code: int, words: str | None) -> None:
    errors_before = _metrics(server["http"])["token2wav_internal_errors_total"]
    out = asyncio.run(_exchange(server["ws"], frames))
    assert out["code"] == code, out
    if words is not None:
        errors = [t for t in out["texts"] if t.get("type") == "error"]
        assert len(errors) == 1 and words in errors[0]["message"], out["texts"]
        assert errors[0]["code"] == code
        assert words.split()[0].strip("'") in out["reason"] or len(out["reason"]) > 100
    _good_stream(server["ws"], _vocab(engine))  # the server is still fine
    assert _metrics(server["http"])["token2wav_internal_errors_total"] == errors_before


BAD_HTTP = [
    ("malformed-json", b'{"tokens": [1,', 400, "malformed JSON"),
    ("not-object", b"[1, 2]", 400, "JSON object"),
    ("deep-nesting", b"[" * 10000 + b"]" * 10000, 400, "nested too deeply"),
    ("not-utf8", b'{"tokens": [1]}\xff', 400, "malformed JSON"),
    ("no-tokens", b"{}", 400, "lacks the 'tokens'"),
    ("empty-tokens", b'{"tokens": []}', 400, "must not be empty"),
    ("out-of-range", b'{"tokens": [1, 100000]}', 400, "out of range"),
    ("negative", b'{"tokens": [-3]}', 400, "out of range"),
    ("bad-format", b'{"tokens": [1], "format": "mp3"}', 400, "'format'"),
    ("bad-attention", b'{"tokens": [1], "attention": "half"}', 400, "'attention'"),
    ("unknown-prompt", b'{"tokens": [1], "prompt_id": "p_nope"}', 404, "unknown prompt_id"),
    ("too-many-tokens", json.dumps({"tokens": [1] * 401}).encode(), 413, "max_tokens_per_session"),
    ("body-too-big", json.dumps({"tokens": [1] * 20000}).encode(), 413, "max_message_bytes"),
]


@pytest.mark.parametrize("body, status, words", [b[1:] for b in BAD_HTTP], ids=[b[0] for b in BAD_HTTP])
def test_bad_synthesize_input(server: dict[str, Any], engine: Any, body: bytes, status: int, words: str) -> None:
    r = httpx.post(
        server["http"] + "/v1/synthesize",
        content=body,
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert _synth_pcm(server["http"], _tokens(10, 5, _vocab(engine))).size > 0


def test_chunked_body_over_limit_is_refused(server: dict[str, Any]) -> None:
    def gen() -> Iterator[bytes]:  # no content-length: the server must count as it reads
        yield b'{"tokens": ['
        for _ in range(8):
            yield b"1, " * 2000
        yield b"1]}"

    r = httpx.post(server["http"] + "/v1/synthesize", content=gen(), timeout=TIMEOUT)
    assert r.status_code == 413


def test_max_sessions(server: dict[str, Any], engine: Any) -> None:
    busy = 'token2wav_rejected_total{reason="busy"}'
    before = _metrics(server["http"]).get(busy, 0.0)

    async def scenario() -> None:
        held = []
        try:
            for _ in range(LIMITS.max_sessions):
                ws = await connect(server["ws"], open_timeout=TIMEOUT)
                held.append(ws)
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "started"
            out = await _exchange(server["ws"], [])
            assert out["code"] == 1013 and "busy" in out["texts"][0]["message"]
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                r = await c.post(server["http"] + "/v1/synthesize", json={"tokens": [1, 2, 3]})
                assert r.status_code == 503 and "busy" in r.json()["error"]
        finally:
            for ws in held:
                await ws.close()

    asyncio.run(scenario())
    assert _wait_sessions_closed(server["http"])[busy] - before == 2  # one stream, one synthesize
    _good_stream(server["ws"], _vocab(engine))
    assert _synth_pcm(server["http"], [1, 2, 3]).size > 0


def _wait_sessions_closed(base: str) -> dict[str, float]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        m = _metrics(base)
        if m["token2wav_sessions_open"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def test_aborted_streams_free_their_sessions(server: dict[str, Any], engine: Any) -> None:
    vocab = _vocab(engine)
    before = _metrics(server["http"])

    async def abort(i: int) -> None:
        ws = await connect(server["ws"], open_timeout=TIMEOUT)
        await ws.send(json.dumps({"type": "start", "hop": 25}))
        await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(20 + i % 30, i, vocab)}))
        if i % 3 == 0:
            ws.transport.abort()  # vanish without a close frame, mid-stream
        elif i % 3 == 1:
            await asyncio.wait_for(ws.recv(), TIMEOUT)  # read 'started', then close politely mid-stream
            await ws.close()
        else:
            await ws.close()  # close right away, possibly while the model is pushing

    async def run_all() -> None:
        for wave_start in range(0, 50, 10):  # ten at a time: stays below max_sessions
            await asyncio.gather(*(abort(i) for i in range(wave_start, wave_start + 10)))
            deadline = time.monotonic() + TIMEOUT
            while _metrics(server["http"])["token2wav_sessions_open"] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    asyncio.run(run_all())
    after = _wait_sessions_closed(server["http"])
    assert after["token2wav_sessions_open"] == 0
    assert after['token2wav_sessions_total{kind="stream"}'] - before['token2wav_sessions_total{kind="stream"}'] == 50
    assert after["token2wav_disconnects_total"] - before["token2wav_disconnects_total"] == 50
    assert after["token2wav_internal_errors_total"] == before["token2wav_internal_errors_total"]
    _good_stream(server["ws"], vocab)


def test_idle_timeout(engine: Any) -> None:
    limits = ServerLimits(max_sessions=2, idle_timeout_s=0.3, workers=1)
    app = create_app(engine, name="idle", limits=limits)
    with running_server(app) as addr:
        t0 = time.perf_counter()
        out = asyncio.run(_exchange(f"ws://{addr}/v1/stream", [{"type": "start"}]))
        assert out["code"] == 1008 and "idle timeout" in out["reason"]
        assert out["texts"][0]["type"] == "started" and out["texts"][-1]["status"] == 408
        assert time.perf_counter() - t0 < 10
        m = _wait_sessions_closed(f"http://{addr}")
        assert m['token2wav_rejected_total{reason="idle_timeout"}'] == 1


def test_connection_without_start_frees_its_slot(engine: Any) -> None:
    # max_sessions=1: a client that opens a socket and sends nothing must not lock others out for long
    limits = ServerLimits(max_sessions=1, idle_timeout_s=30.0, start_timeout_s=0.3, workers=1)
    app = create_app(engine, name="start", limits=limits)
    with running_server(app) as addr:
        t0 = time.perf_counter()
        out = asyncio.run(_exchange(f"ws://{addr}/v1/stream", []))
        assert time.perf_counter() - t0 < 10
        assert out["code"] == 1008 and "no 'start' message for 0.3 s" in out["reason"]
        assert out["texts"][-1]["status"] == 408
        _wait_sessions_closed(f"http://{addr}")
        res = asyncio.run(stream_tokens(f"ws://{addr}/v1/stream", _tokens(30, 1, _vocab(engine)), rate=0))
        assert res.samples > 0


def test_a_client_that_closes_at_once_does_not_hold_its_connection(engine: Any) -> None:
    """Clients that send their tokens and close at once: each stream's tasks are cancelled as its worker wakes
    for the tokens. A cancellation lost in that race (``asyncio.wait_for`` before Python 3.12) left the worker
    waiting out its idle timeout (10 s here) with the connection open, so the server took that long to stop."""
    vocab = _vocab(engine)
    app = create_app(engine, name="test", limits=LIMITS, batcher=engine.batcher(max_wait_ms=5))
    with running_server(app) as addr:

        async def close_at_once(i: int) -> None:
            ws = await connect(f"ws://{addr}/v1/stream", open_timeout=TIMEOUT)
            await ws.send(json.dumps({"type": "start", "hop": 25}))
            await ws.send(json.dumps({"type": "tokens", "tokens": _tokens(20 + i, i, vocab)}))
            await ws.close()

        async def waves() -> None:
            for _ in range(4):
                await asyncio.gather(*(close_at_once(i) for i in range(4)))

        asyncio.run(waves())
        _wait_sessions_closed(f"http://{addr}")
        stop_from = time.perf_counter()
    assert time.perf_counter() - stop_from < 3.0  # no stream task left waiting: uvicorn stops at once


def test_limits_are_validated_naming_the_field_and_its_serve_option() -> None:
    with pytest.raises(ValueError, match=r"start_timeout_s \(--start-timeout\) must be a finite number > 0"):
        ServerLimits(start_timeout_s=0)
    # no room for a 'start' message: refused, not a server that answers every message with 1009
    with pytest.raises(ValueError, match=r"max_message_bytes \(--max-message-bytes\) must be an integer >= 1024, "
                                         r"got 10"):
        ServerLimits(max_message_bytes=10)
    with pytest.raises(ValueError, match=r"^max_prompts must be an integer >= 1, got 0$"):  # no option of its own
        ServerLimits(max_prompts=0)


def test_client_that_never_reads_does_not_stall_others(server: dict[str, Any], engine: Any) -> None:
    vocab = _vocab(engine)

    async def scenario() -> float:
        hog = await connect(server["ws"], open_timeout=TIMEOUT, max_queue=1)
        try:
            await hog.send(json.dumps({"type": "start", "hop": 25}))
            await hog.send(json.dumps({"type": "tokens", "tokens": _tokens(300, 7, vocab)}))
            t0 = time.perf_counter()
            res = await stream_tokens(server["ws"], _tokens(20, 8, vocab), rate=0)
            assert res.samples > 0
            return time.perf_counter() - t0
        finally:
            hog.transport.abort()

    assert asyncio.run(scenario()) < 20
    _wait_sessions_closed(server["http"])


def test_prompt_registration_and_reuse(server: dict[str, Any], engine: Any) -> None:
    rng = np.random.default_rng(3)
    body = {
        "tokens": _tokens(10, 4, _vocab(engine)),
        "mel": rng.random((20, 80)).round(4).tolist(),
        "embedding": rng.random(192).round(4).tolist(),
    }
    r1 = httpx.post(server["http"] + "/v1/prompts", json=body, timeout=TIMEOUT)
    r2 = httpx.post(server["http"] + "/v1/prompts", json=body, timeout=TIMEOUT)
    assert r1.status_code == 200, r1.text
    pid = r1.json()["prompt_id"]
    assert r2.json()["prompt_id"] == pid  # same content, same id: computed once

    tokens = _tokens(40, 6, _vocab(engine))
    offline = _synth_pcm(server["http"], tokens, prompt_id=pid, attention="chunk")
    before = _metrics(server["http"])
    for _ in range(2):
        res = asyncio.run(stream_tokens(server["ws"], tokens, rate=0, prompt_id=pid))
        _assert_pcm_close(np.frombuffer(res.pcm, "<i2"), offline)
    after = _metrics(server["http"])
    # the prompt's flow state was computed by the first session only
    assert after["token2wav_prompt_cache_misses"] - before["token2wav_prompt_cache_misses"] == 1
    assert after["token2wav_prompt_cache_hits"] - before["token2wav_prompt_cache_hits"] >= 1

    wrong_dim = httpx.post(server["http"] + "/v1/prompts", json={**body, "mel": [[0.0] * 40] * 20}, timeout=TIMEOUT)
    assert wrong_dim.status_code == 400 and "invalid prompt" in wrong_dim.json()["error"]

    nan_body = json.dumps({**body, "mel": [[float("nan")] * 80]}).encode()  # Python writes NaN; JSON has none
    bad = httpx.post(server["http"] + "/v1/prompts", content=nan_body, timeout=TIMEOUT)
    assert bad.status_code == 400 and "finite" in bad.json()["error"]
    bad = httpx.post(server["http"] + "/v1/prompts", json={"tokens": [1]}, timeout=TIMEOUT)
    assert bad.status_code == 400 and "lacks field" in bad.json()["error"]


def test_client_reports_server_errors(server: dict[str, Any]) -> None:
    with pytest.raises(StreamError) as e:
        asyncio.run(stream_tokens(server["ws"], [1, 2, 3], rate=0, preset="turbo"))
    assert e.value.code == 1008


def test_client_command(server: dict[str, Any], engine: Any, tmp_path, capsys) -> None:
    from token2wav import cli

    tokens = _tokens(60, 21, _vocab(engine))
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("".join(f"<|s_{t}|>" for t in tokens))
    rng = np.random.default_rng(22)
    arrays = {
        "tokens": np.asarray(_tokens(12, 23, _vocab(engine))),
        "mel": rng.random((24, 80)),
        "embedding": rng.random(192),
    }
    np.savez(tmp_path / "prompt.npz", **arrays)
    out = tmp_path / "client.wav"
    argv = [
        "client",
        "--url",
        server["ws"],
        "--tokens",
        str(token_file),
        "--rate",
        "250",
        "--out",
        str(out),
        "--prompt",
        str(tmp_path / "prompt.npz"),
        "--prebuffer",
        "60",
        "--json",
    ]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 60 and summary["chunks"] >= 2
    assert 0 < summary["first_chunk_latency_s"] < summary["wall_s"]
    assert summary["rtf"] > 0 and summary["wall_rtf"] > 0
    # the listener: a 60 s start buffer outlasts the stream, so playback starts when the last audio is in (at
    # 'done'), shortening the buffer to what was needed, and nothing can stall after that
    assert summary["first_play_s"] == summary["wall_s"]
    assert summary["start_buffer_ms"] < 60_000 and summary["stalls"] == 0 and summary["worst_stall_s"] == 0
    # the server's recommended start buffer, when it sends one (None from a server that does not)
    rec = summary["recommended_start_buffer_ms"]
    assert rec is None or (isinstance(rec, int) and rec >= 0)
    with wave.open(str(out)) as w:
        got = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    # registering the same arrays again gives the same id: the client's prompt is the one used below
    pid = httpx.post(
        server["http"] + "/v1/prompts",
        timeout=TIMEOUT,
        json={
            "tokens": arrays["tokens"].tolist(),
            "mel": arrays["mel"].astype(np.float32).tolist(),
            "embedding": arrays["embedding"].astype(np.float32).tolist(),
        },
    ).json()["prompt_id"]
    _assert_pcm_close(got, _synth_pcm(server["http"], tokens, prompt_id=pid, attention="chunk"))

    assert cli.main(["client", "--url", server["ws"], "--tokens", str(token_file), "--preset", "turbo"]) == 1
    assert "preset" in capsys.readouterr().err
    assert cli.main(["client", "--url", server["ws"], "--tokens", str(token_file), "--voice", "slt"]) == 1
    assert capsys.readouterr().err.strip() == ("token2wav client: error: voice 'slt' is not one of the server's "
                                               "voices: none")
    # without --rate: the model's own token rate, from 'started'
    token_file.write_text(" ".join(map(str, tokens[:8])))
    assert cli.main(["client", "--url", server["ws"], "--tokens", str(token_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rate"] == engine.token_rate and summary["wall_s"] >= 7 / engine.token_rate


def test_batched_calls_are_counted_in_metrics(server: dict[str, Any], engine: Any) -> None:
    before = _metrics(server["http"])
    _good_stream(server["ws"], _vocab(engine), n=40)
    after = _metrics(server["http"])
    rows = after.get("token2wav_batch_rows_count", 0) - before.get("token2wav_batch_rows_count", 0)
    waits = after.get("token2wav_batch_queue_wait_seconds_count", 0) - before.get(
        "token2wav_batch_queue_wait_seconds_count", 0)
    # --no-batching is a batch of one: counted the same way (one call per chunk; 40 tokens: at least two chunks)
    assert rows >= 2 and waits >= 2
    if server["batcher"] is not None:
        # the stream is over: its key/value pages are back in the pool, which holds some (other tests' streams
        # on this server may still be closing: fewer pages, never more)
        assert after["token2wav_kv_pages_used"] <= before.get("token2wav_kv_pages_used", 0)
        assert after["token2wav_kv_pages_total"] > 0
        assert after["token2wav_kv_pool_bytes"] > 0
