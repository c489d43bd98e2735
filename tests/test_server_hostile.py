"""A keyless server on loopback against a web page elsewhere: DNS rebinding, cross-site requests, and the key.

Each attack runs against a real uvicorn server on 127.0.0.1 and must be refused before any model work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from typing import Any

import httpx
import numpy as np
import pytest
from test_server import TIMEOUT, running_server
from test_server_access import LIMITS, CountingEngine, _ws_outcome
from websockets.asyncio.client import connect as websockets_connect

from token2wav.serve.app import create_app
from token2wav.serve.auth import AccessPolicy, RedactTokens, redact
from token2wav.serve.protocol import ProtocolError, ServerLimits
from token2wav.serve.upload import audio_from_body

KEY = "k3y-for-hostile-tests-42"


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    return Token2Wav.from_pretrained("tiny")


@pytest.fixture(scope="module")
def keyless(engine: Any) -> Any:
    eng = CountingEngine(engine)
    app = create_app(eng, name="keyless", limits=LIMITS, access=AccessPolicy(allowed_hosts=("127.0.0.1",)))
    with running_server(app) as addr:
        yield {"eng": eng, "addr": addr, "port": int(addr.rsplit(":", 1)[1]), "http": f"http://{addr}"}


def _prompt_json(vocab: int) -> str:
    rng = np.random.default_rng(0)
    return json.dumps({"tokens": rng.integers(0, vocab, 10).tolist(), "mel": rng.random((20, 80)).round(3).tolist(),
                       "embedding": rng.random(192).round(3).tolist()})


def test_dns_rebinding_is_refused_on_http_and_websocket(keyless: dict[str, Any], engine: Any) -> None:
    """A foreign name resolved to 127.0.0.1: its page's requests carry Host (and Origin) of that name."""
    base, port = keyless["http"], keyless["port"]
    evil = f"rebind.example:{port}"
    before = keyless["eng"].calls
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/prompts"), ("POST", "/v1/synthesize")):
        r = httpx.request(method, base + path, headers={"Host": evil, "Origin": f"http://{evil}",
                                                        "Content-Type": "application/json"},
                          content=_prompt_json(int(engine.config.vocab_size)), timeout=TIMEOUT)
        assert r.status_code == 421, (path, r.text)
        assert "'rebind.example' is not a name of this server" in r.json()["error"]

    async def websocket_through_a_foreign_name() -> dict[str, Any]:
        sock = socket.create_connection(("127.0.0.1", port))  # what the rebound name resolves to
        return await _ws_outcome(f"ws://{evil}/v1/stream", sock=sock, origin=f"http://{evil}")

    out = asyncio.run(websocket_through_a_foreign_name())
    assert out["code"] == 1008 and out["texts"][0]["status"] == 421, out
    assert keyless["eng"].calls == before  # nothing reached the model
    # loopback names still work, whatever the port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1"):
        assert httpx.get(base + "/health", headers={"Host": host}, timeout=TIMEOUT).status_code == 200, host


def test_cross_site_requests_are_refused(keyless: dict[str, Any], engine: Any) -> None:
    """A page on another origin: fetch/form POSTs with its Origin, and the form-only content types."""
    base = keyless["http"]
    body = _prompt_json(int(engine.config.vocab_size))
    before = keyless["eng"].calls
    for ctype in ("text/plain", "application/json", "multipart/form-data; boundary=x", "audio/wav"):
        r = httpx.post(base + "/v1/prompts", content=body, timeout=TIMEOUT,
                       headers={"Origin": "https://evil.example", "Content-Type": ctype})
        assert r.status_code == 403 and "origin 'https://evil.example' refused" in r.json()["error"], ctype
    # without an Origin (an old browser's form), the types a form can send are refused anyway
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"):
        r = httpx.post(base + "/v1/prompts", content=body, headers={"Content-Type": ctype}, timeout=TIMEOUT)
        assert r.status_code == 415 and "application/json" in r.json()["error"], ctype
    assert keyless["eng"].calls == before
    # the server's own page and non-browser clients are served
    own = {"Origin": base, "Content-Type": "application/json"}
    assert httpx.post(base + "/v1/prompts", content=body, headers=own, timeout=TIMEOUT).status_code == 200
    r = httpx.post(base + "/v1/prompts", content=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 200
    metrics = httpx.get(base + "/metrics", timeout=TIMEOUT).text
    assert 'token2wav_rejected_total{reason="forbidden_origin"} 4' in metrics
    assert 'token2wav_rejected_total{reason="form_content_type"} 3' in metrics


def test_host_policy() -> None:
    p = AccessPolicy()
    for host in ("127.0.0.1:50000", "localhost", "LOCALHOST:1", "[::1]:50000", "127.8.9.1"):
        assert p.host_allowed(host), host
    for host in (None, "", "evil.example:50000", "127.0.0.1.evil.example", "[::2]:1", "0.0.0.0"):
        assert not p.host_allowed(host), host
    named = AccessPolicy(allowed_hosts=("tts.lan",), allow_origins=("https://app.example:8443",))
    assert named.host_allowed("tts.lan:50000") and named.host_allowed("app.example")
    assert AccessPolicy(allowed_hosts=("*",)).host_allowed("anything.example")
    assert AccessPolicy(api_key=KEY).host_allowed("anything.example")  # with a key, the key is the defence


def test_the_key_never_shows(engine: Any, caplog) -> None:
    policy = AccessPolicy(api_key=KEY)
    assert KEY not in repr(policy) and KEY not in str(policy)
    for bad in ("kéy-with-accent-0", "key\u2028separator", "tab\tinside-key"):
        with pytest.raises(ValueError, match="printable ASCII") as exc:
            AccessPolicy(api_key=bad)
        assert bad not in str(exc.value)
    for url in (f"/v1/stream?token={KEY}", f"/v1/stream?%74oken={KEY}", f"/v1/stream?a=1&TOKEN={KEY}",
                f"/v1/stream?%74%6F%6B%65%6E={KEY}&b=2", f"/v1/stream?x=1;token={KEY}"):
        assert KEY not in redact(url), url
    assert redact("/v1/stream?tokens=5&b=2") == "/v1/stream?tokens=5&b=2"  # other parameters are left alone
    record = logging.getLogger("uvicorn.error").makeRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", f"/v1/stream?%74oken={KEY}"), None)
    RedactTokens().filter(record)
    assert KEY not in record.getMessage()
    # the key sent the encoded way is accepted (as the name decodes to "token") and masked in uvicorn's log
    app = create_app(engine, name="keyed", limits=LIMITS, access=policy)
    with running_server(app) as addr, caplog.at_level(logging.INFO):
        out = asyncio.run(_ws_outcome(f"ws://{addr}/v1/stream?%74oken={KEY}"))
        assert out["code"] == 1000 and out["texts"][-1]["type"] == "done", out
        wrong = asyncio.run(_ws_outcome(f"ws://{addr}/v1/stream?%74oken=wrong-{KEY}"))
        assert wrong["code"] == 1008 and KEY not in json.dumps(wrong)
    assert KEY not in caplog.text


def _junk_form(boundary: str, lines: int) -> bytes:
    """A multipart body of one text field of ``lines`` short lines: slow for the standard library's parser."""
    junk = b"\r\n".join(b"xx" for _ in range(lines))
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n".encode() + junk
            + f"\r\n--{boundary}--\r\n".encode())


def _parse_seconds(body: bytes, content_type: str) -> float:
    """How long the server's own parse takes here (the form has no file, which it says at the end)."""
    import time

    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="no file part"):
        audio_from_body(body, content_type)
    return time.perf_counter() - started


def test_a_large_upload_is_parsed_off_the_event_loop(engine: Any) -> None:
    """A multipart upload of millions of short lines takes the standard library's parser seconds; parsed on the
    event loop it stalled every open stream for that long. In the worker pool, the server keeps answering
    meanwhile. The body is sized on this CPU (a parse of about 4 s, from one of a million lines timed here
    first), so that a fast machine does not make the parse too short to tell a stall from a few slow replies."""
    import threading
    import time

    boundary = "b0undary"
    content_type = f"multipart/form-data; boundary={boundary}"
    probe = 1 << 20
    lines = max(probe, math.ceil(probe * 4.0 / _parse_seconds(_junk_form(boundary, probe), content_type)))
    body = _junk_form(boundary, lines)
    app = create_app(engine, name="big", limits=ServerLimits(workers=2, max_prompt_bytes=len(body) + 1024))
    with running_server(app) as addr:
        base = f"http://{addr}"
        done = threading.Event()
        status: list[int] = []

        def upload() -> None:
            try:
                status.append(httpx.post(base + "/v1/prompts", content=body, timeout=120,
                                         headers={"Content-Type": content_type}).status_code)
            finally:
                done.set()

        t = threading.Thread(target=upload)
        started = time.perf_counter()
        t.start()
        worst = 0.0
        while not done.is_set():
            t0 = time.perf_counter()
            assert httpx.get(base + "/health", timeout=30).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
        t.join()
        took = time.perf_counter() - started
    assert status == [400]  # parsed to the end: no file part
    assert took > 2.0, (lines, took)  # sized for about 4 s of parsing
    # /health waited at most a fraction of the upload (one GIL switch interval per request, plus the time the
    # body takes to arrive): on a 2-core AVX2 EPYC about a sixth, 0.54-1.03 s beside uploads of 4.8-6.2 s. Were
    # the parse on the event loop, /health would wait for all of it.
    assert worst < took / 3, (worst, took)


def test_uploads_are_admitted_like_streams(engine: Any) -> None:
    """An upload holds its body and runs work, so it takes a session slot: with every slot held by streams, a
    flood of uploads gets 503 instead of piling bodies up in memory."""
    app = create_app(engine, name="slots", limits=ServerLimits(max_sessions=1, workers=1))
    vocab = int(engine.config.vocab_size)

    async def while_a_stream_is_open(addr: str) -> tuple[int, int]:
        async with websockets_connect(f"ws://{addr}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()  # started: the only slot is taken
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                busy = await client.post(f"http://{addr}/v1/prompts", content=_prompt_json(vocab),
                                         headers={"Content-Type": "application/json"})
            await ws.send(json.dumps({"type": "end"}))
            with contextlib.suppress(Exception):
                while True:
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            free = await client.post(f"http://{addr}/v1/prompts", content=_prompt_json(vocab),
                                     headers={"Content-Type": "application/json"})
        assert "server busy" in busy.json()["error"]
        return busy.status_code, free.status_code

    with running_server(app) as addr:
        assert asyncio.run(while_a_stream_is_open(addr)) == (503, 200)
