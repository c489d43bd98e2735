"""Access control on a real uvicorn server: access keys, WebSocket origins, the loopback-only default."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_server import TIMEOUT, running_server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import token2wav
from token2wav.serve.app import create_app, uvicorn_config
from token2wav.serve.auth import (
    API_KEY_ENV,
    AccessPolicy,
    RedactTokens,
    check_bind_address,
    resolve_api_key,
)
from token2wav.serve.protocol import ServerLimits

KEY = "k3y-for-tests-0123456789"


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    return Token2Wav.from_pretrained("tiny")


class CountingEngine:
    """The tiny engine, counting every model entry point the server may call."""

    def __init__(self, t2w: Any) -> None:
        self._t2w = t2w
        self.calls = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t2w, name)

    def _count(self) -> None:
        with self.lock:
            self.calls += 1

    def batcher(self, **kwargs: Any) -> Any:
        return token2wav.Batcher(self, **kwargs)  # its sessions are set up through this engine: counted

    def session_setup(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self._t2w.session_setup(*args, **kwargs)

    def synthesize(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self._t2w.synthesize(*args, **kwargs)

    def prepare_prompt(self, *args: Any) -> Any:
        self._count()
        return self._t2w.prepare_prompt(*args)


LIMITS = ServerLimits(max_sessions=4, max_tokens_per_session=400, workers=2)


@pytest.fixture(scope="module")
def keyed(engine: Any) -> Iterator[dict[str, Any]]:
    eng = CountingEngine(engine)
    app = create_app(eng, name="keyed", limits=LIMITS, access=AccessPolicy(api_key=KEY))
    with running_server(app) as addr:
        yield {"eng": eng, "http": f"http://{addr}", "ws": f"ws://{addr}/v1/stream", "addr": addr}


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _metric(base: str, name: str) -> float:
    from token2wav.serve.metrics import parse_exposition

    r = httpx.get(base + "/metrics", headers=_auth(), timeout=TIMEOUT)
    assert r.status_code == 200
    return parse_exposition(r.text).get(name, 0.0)


async def _ws_outcome(url: str, **kw: Any) -> dict[str, Any]:
    """Open a stream, send start + a few tokens + end, and report what came back."""
    texts: list[dict[str, Any]] = []
    async with connect(url, open_timeout=TIMEOUT, max_size=None, **kw) as ws:
        try:
            await ws.send(json.dumps({"type": "start"}))
            await ws.send(json.dumps({"type": "tokens", "tokens": [1, 2, 3, 4, 5] * 8}))
            await ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass
        try:
            while True:
                msg = await asyncio.wait_for(ws.recv(), TIMEOUT)
                if isinstance(msg, str):
                    texts.append(json.loads(msg))
        except ConnectionClosed:
            pass
        return {"texts": texts, "code": ws.close_code, "reason": ws.close_reason}


@pytest.mark.parametrize("headers", [{}, _auth("wrong-key-0123456789"), {"Authorization": KEY}, _auth(KEY[:-1])],
                         ids=["none", "wrong", "not-bearer", "prefix"])
def test_http_without_the_key_is_refused_without_work(keyed: dict[str, Any], headers: dict[str, str]) -> None:
    base, eng = keyed["http"], keyed["eng"]
    calls = eng.calls
    refused = _metric(base, 'token2wav_rejected_total{reason="unauthorized"}')
    for method, path, body in (
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/synthesize", {"tokens": [1, 2, 3]}),
        ("POST", "/v1/prompts", {"tokens": [1], "mel": [[0.0] * 80] * 2, "embedding": [0.0] * 192}),
    ):
        r = httpx.request(method, base + path, json=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401, (path, r.text)
        assert "access key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        assert KEY not in r.text
    assert eng.calls == calls  # no model work at all
    assert _metric(base, 'token2wav_rejected_total{reason="unauthorized"}') - refused == 5


def test_http_with_the_key_works(keyed: dict[str, Any]) -> None:
    base = keyed["http"]
    assert httpx.get(base + "/health", headers=_auth(), timeout=TIMEOUT).json()["status"] == "ok"
    r = httpx.post(base + "/v1/synthesize", json={"tokens": [1, 2, 3], "format": "pcm"}, headers=_auth(),
                   timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.content) > 0


@pytest.mark.parametrize(
    "how", ["none", "wrong-header", "wrong-token", "token-of-another-name"],
)
def test_stream_without_the_key_is_refused_without_work(keyed: dict[str, Any], how: str) -> None:
    base, url, eng = keyed["http"], keyed["ws"], keyed["eng"]
    calls = eng.calls
    streams = _metric(base, 'token2wav_sessions_total{kind="stream"}')
    kw: dict[str, Any] = {}
    if how == "wrong-header":
        kw["additional_headers"] = _auth("wrong-key-0123456789")
    elif how == "wrong-token":
        url += "?token=wrong-key-0123456789"
    elif how == "token-of-another-name":
        url += f"?key={KEY}"
    out = asyncio.run(_ws_outcome(url, **kw))
    assert out["code"] == 1008, out
    assert [t["type"] for t in out["texts"]] == ["error"] and out["texts"][0]["status"] == 401
    assert "access key" in out["texts"][0]["message"]
    assert eng.calls == calls
    assert _metric(base, 'token2wav_sessions_total{kind="stream"}') == streams


@pytest.mark.parametrize("how", ["header", "query"])
def test_stream_with_the_key_works(keyed: dict[str, Any], engine: Any, how: str) -> None:
    url = keyed["ws"]
    kw: dict[str, Any] = {}
    if how == "header":
        kw["additional_headers"] = _auth()
    else:
        url += f"?token={KEY}"  # what a browser does
    out = asyncio.run(_ws_outcome(url, **kw))
    assert out["code"] == 1000, out
    assert out["texts"][-1]["type"] == "done" and out["texts"][-1]["samples"] > 0


def test_cross_origin_stream_is_refused(engine: Any) -> None:
    eng = CountingEngine(engine)
    app = create_app(eng, name="origin", limits=LIMITS, access=AccessPolicy(allow_origins=("https://app.example",)))
    with running_server(app) as addr:
        url = f"ws://{addr}/v1/stream"
        out = asyncio.run(_ws_outcome(url, origin="http://evil.example"))
        assert out["code"] == 1008 and out["texts"][0]["status"] == 403, out
        assert "evil.example" in out["texts"][0]["message"] and "--allow-origin" in out["texts"][0]["message"]
        out = asyncio.run(_ws_outcome(url, origin=f"http://localhost:{addr.split(':')[1]}"))  # another host name
        assert out["code"] == 1008
        assert eng.calls == 0
        # the server's own page, a listed origin, and a client that is not a browser (no Origin) are served
        for origin in (f"http://{addr}", "https://app.example", None):
            kw = {"origin": origin} if origin else {}
            out = asyncio.run(_ws_outcome(url, **kw))
            assert out["code"] == 1000 and out["texts"][-1]["type"] == "done", (origin, out)
        m = httpx.get(f"http://{addr}/metrics", timeout=TIMEOUT).text
        assert 'token2wav_rejected_total{reason="forbidden_origin"} 2' in m


def test_policy_checks() -> None:
    p = AccessPolicy(api_key=KEY, allow_origins=("HTTPS://App.Example:443/",))
    assert p.allow_origins == ("https://app.example",)
    assert p.key_matches(KEY)
    for bad in (None, "", KEY[:-1], KEY + "x", KEY.upper()):
        assert not p.key_matches(bad)
    assert AccessPolicy().key_matches(None)
    assert p.origin_allowed(None, "h:1", "ws")
    assert p.origin_allowed("https://app.example", "h:1", "ws")
    assert p.origin_allowed("http://h:1", "h:1", "ws") and not p.origin_allowed("https://h:1", "h:1", "ws")
    assert not p.origin_allowed("null", "h:1", "ws")
    assert not p.origin_allowed("http://h:1.evil", "h:1", "ws")
    with pytest.raises(ValueError, match="at least 8 characters"):
        AccessPolicy(api_key="short")
    with pytest.raises(ValueError, match="spaces"):
        AccessPolicy(api_key="has a space in it")
    with pytest.raises(ValueError, match="--allow-origin: not a web origin"):
        AccessPolicy(allow_origins=("app.example",))


def test_key_sources(tmp_path) -> None:
    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    assert resolve_api_key(None, str(f), {}) == KEY
    assert resolve_api_key("abcdefgh12", None, {API_KEY_ENV: KEY}) == "abcdefgh12"
    assert resolve_api_key(None, None, {API_KEY_ENV: KEY}) == KEY
    assert resolve_api_key(None, None, {}) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key(KEY, str(f), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(None, str(tmp_path / "empty"), {})


def test_public_address_needs_a_key_or_insecure() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind_address(host, has_key=False, insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ValueError, match="not a loopback address and no access key"):
            check_bind_address(host, has_key=False, insecure=False)
        check_bind_address(host, has_key=True, insecure=False)
        check_bind_address(host, has_key=False, insecure=True)


def test_serve_command_refuses_a_public_address_without_a_key(capsys, monkeypatch) -> None:
    from token2wav import cli

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli.main(["serve", "--model", "tiny", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--insecure" in err and "Traceback" not in err
    assert cli.main(["serve", "--model", "tiny", "--api-key", "short"]) == 2
    assert "at least 8 characters" in capsys.readouterr().err


def test_token_query_parameter_is_masked_in_logs(engine: Any) -> None:
    app = create_app(engine, name="logs", limits=LIMITS, access=AccessPolicy(api_key=KEY))
    uvicorn_config(app, log_level="info")  # installs the filter on uvicorn's loggers
    logger = logging.getLogger("uvicorn.error")
    assert any(isinstance(f, RedactTokens) for f in logger.filters)
    record = logger.makeRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", f"/v1/stream?a=1&token={KEY}&b=2"), None,
    )
    for f in logger.filters:
        f.filter(record)
    text = record.getMessage()
    assert KEY not in text and "token=***" in text and "b=2" in text


def test_bundled_client_sends_the_key(keyed: dict[str, Any], monkeypatch) -> None:
    from token2wav.serve.client import StreamError, stream_tokens

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    tokens = [1, 2, 3, 4, 5] * 8
    with pytest.raises(StreamError) as refused:
        asyncio.run(stream_tokens(keyed["ws"], tokens, rate=0))
    assert refused.value.code == 1008
    assert asyncio.run(stream_tokens(keyed["ws"], tokens, rate=0, api_key=KEY)).samples > 0
    monkeypatch.setenv(API_KEY_ENV, KEY)  # what `token2wav client` relies on
    assert asyncio.run(stream_tokens(keyed["ws"], tokens, rate=0)).samples > 0
