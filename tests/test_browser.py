"""The web page of `token2wav serve`, in a real headless Chromium against a real server process on loopback.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package (dev extra); `.ci/run`
installs both. Without them the test fails (it does not skip), unless TOKEN2WAV_SKIP_BROWSER=1 says to.
TOKEN2WAV_SCREENSHOT=path also saves the timeline screenshot there (the README's copy is made that way).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

CHROMIUM = os.environ.get("TOKEN2WAV_CHROMIUM", "/usr/bin/chromium")
START_TIMEOUT = 240.0  # loading and warming the demo voice on a slow, busy machine

if os.environ.get("TOKEN2WAV_SKIP_BROWSER") == "1":
    pytest.skip("TOKEN2WAV_SKIP_BROWSER=1", allow_module_level=True)


def _require_browser() -> Any:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
        sync_playwright = None
    if missing:
        pytest.fail("browser test needs " + " and ".join(missing) + "; .ci/run installs them "
                    "(or set TOKEN2WAV_SKIP_BROWSER=1)", pytrace=False)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`token2wav serve` with no --model (the demo voice), as a user runs it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "token2wav", "serve", "--port", str(port), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"token2wav serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"token2wav serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield {"base": base, "port": port, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# Records, independently of the page's own bookkeeping, what crosses the WebSocket: when the first 'tokens'
# message left, when each audio frame arrived, and every chunk header.
WIRE_TAP = """
(() => {
  window.__wire = { firstTokens: null, binaries: [], headers: [], sent: 0 };
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (typeof data === 'string') {
      const m = JSON.parse(data);
      if (m.type === 'tokens') {
        if (window.__wire.firstTokens === null) window.__wire.firstTokens = performance.now();
        window.__wire.sent += m.tokens.length;
      }
    }
    return send.call(this, data);
  };
  const Orig = window.WebSocket;
  window.WebSocket = function (url, protocols) {
    const ws = protocols === undefined ? new Orig(url) : new Orig(url, protocols);
    window.__wire = { firstTokens: null, binaries: [], headers: [], sent: 0, url: url };
    ws.addEventListener('message', (ev) => {
      if (typeof ev.data === 'string') {
        const m = JSON.parse(ev.data);
        if (m.type === 'chunk') window.__wire.headers.push(m);
      } else {
        window.__wire.binaries.push({ t: ev.timeStamp, bytes: ev.data.byteLength });
      }
    });
    return ws;
  };
  window.WebSocket.prototype = Orig.prototype;
  Object.assign(window.WebSocket, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
})();
"""


def _state(page: Any) -> dict[str, Any]:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.t2w.state))")


def test_page_streams_plays_uploads_and_shows_errors(server: dict[str, Any], tmp_path: Path) -> None:
    sync_playwright = _require_browser()
    base = server["base"]
    stderr = server["log"].read_text()
    assert f"open http://127.0.0.1:{server['port']}/ in a browser" in stderr, stderr  # the CLI prints the page
    assert "serving demo" in stderr  # no --model: the demo voice

    r = httpx.get(base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            # a fake microphone (a beeping test signal) for the page's recorder, allowed without a prompt
            args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox", "--mute-audio",
                  "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
        )
        try:
            ctx = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 1400})
            page = ctx.new_page()
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            page.on("websocket", lambda ws: requests.append(ws.url))
            console_errors: list[str] = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            not_found: list[str] = []  # a missing icon is a console error on every load
            page.on("response", lambda resp: not_found.append(resp.url) if resp.status == 404 else None)
            page.add_init_script(WIRE_TAP)
            page.goto(base + "/")
            page.wait_for_function("() => window.t2w && window.t2w.ready === true", timeout=60_000)
            st = _state(page)
            assert st["error"] is None, st["error"]
            assert st["sampleRate"] == 22050
            voices = page.eval_on_selector_all("#voice option", "os => os.map(o => o.textContent)")
            assert {"slt", "rms", "awb"} <= set(voices)

            # -- 1. a bundled held-out utterance, streamed at the model's token rate, played gaplessly
            utts = page.evaluate("() => window.t2w.utterances")
            idx = min(range(len(utts)), key=lambda i: len(utts[i]["tokens"]))  # the shortest: a quick test
            page.select_option("#utterance", str(idx))
            page.select_option("#voice", label=utts[idx]["speaker"])
            # the page's defaults: tokens at the model's own rate (43 tokens/s, as an LLM would send them), the start
            # buffer the server recommends (it covers a slow machine's shortfall too, tests/test_pacing.py)
            assert page.input_value("#rate") == "43" and page.input_value("#buffer") == ""
            page.click("#speak")
            page.wait_for_function("() => window.t2w.state.phase === 'done' || window.t2w.state.phase === 'error'",
                                   timeout=120_000)
            st = _state(page)
            assert st["phase"] == "done", st["error"]
            # the voice's low-latency hop (no alignment pad after its 64-token prompt) with the assistant preset
            assert st["request"]["hop"] == 16 and st["request"]["preset"] == "assistant", st["request"]
            wire = page.evaluate("() => window.__wire")
            chunks = st["chunks"]
            n = st["done"]["chunks"]
            # every chunk arrived, once, in order, with all its samples
            assert n >= 2 and len(chunks) == n == len(wire["headers"]) == len(wire["binaries"])
            assert [c["index"] for c in chunks] == list(range(n))
            assert all(c["received"] == c["samples"] and c["samples"] > 0 for c in chunks)
            assert sum(c["samples"] for c in chunks) == st["done"]["samples"]
            assert all(b["bytes"] == 2 * h["samples"] for b, h in zip(wire["binaries"], wire["headers"]))
            assert wire["sent"] == st["tokensSent"] == st["tokensTotal"] == len(utts[idx]["tokens"])
            assert len(st["sends"]) > 3  # paced: many small messages, not one
            # scheduled on the audio clock in order, each chunk starting exactly where the previous one ends
            for prev, cur in zip(chunks, chunks[1:]):
                assert cur["start"] == prev["end"], (prev, cur)
                assert cur["gapS"] == 0
            assert st["underruns"] == 0, (chunks, st["startBufferMs"], st["recommendedBufferMs"])
            assert st["request"].get("schedule") is None
            if st["playedAtDone"]:  # a machine slow enough to be told more than this short utterance lasts
                assert st["startBufferMs"] < st["recommendedBufferMs"]
                assert chunks[0]["start"] - st["doneAudioS"] <= 0.05, (chunks[0], st["doneAudioS"])
            else:  # never before the server's newest recommendation (one that came late starts playback on arrival)
                assert st["startBufferMs"] >= st["recommendedBufferMs"], (st["startBufferMs"],
                                                                          st["recommendedBufferMs"])
            assert chunks[0]["start"] >= 0 and all(c["end"] > c["start"] for c in chunks)
            # the first-chunk latency shown is the one measured on the wire
            measured = wire["binaries"][0]["t"] - wire["firstTokens"]
            # both read the binary message's own event time; the page's clock starts before its one JSON.stringify
            # of a few tokens and the tapped send(): later by well under 5 ms on a busy 2-core machine (and never
            # earlier, but for performance.now()'s 0.1 ms granularity)
            assert -0.2 <= st["firstChunkMs"] - measured < 5.0, (st["firstChunkMs"], measured)
            # JavaScript's Math.round rounds halves up; Python's round() rounds them to even
            assert page.text_content("#stat-first") == f"{math.floor(st['firstChunkMs'] + 0.5)} ms"
            assert page.text_content("#stat-chunks") == str(n)
            assert page.text_content("#stat-underruns") == "0"
            assert st["rtf"] is not None and st["rtf"] > 0
            # the audio clock really ran through the whole schedule (the context played it out)
            last_end = chunks[-1]["end"]
            page.wait_for_function("() => window.t2w.playedOut === true", timeout=int((last_end + 30) * 1000))
            assert page.evaluate("() => window.t2w.audioTime()") >= last_end
            shot = tmp_path / "timeline.png"
            page.locator("#run-section").screenshot(path=str(shot))
            assert shot.stat().st_size > 5000
            if os.environ.get("TOKEN2WAV_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["TOKEN2WAV_SCREENSHOT"])

            # -- 2. Download saves the WAV that was played
            with page.expect_download() as dl:
                page.click("#download")
            wav_path = tmp_path / "played.wav"
            dl.value.save_as(str(wav_path))
            audio, sr = sf.read(str(wav_path), dtype="float32")
            assert sr == 22050 and len(audio) == st["done"]["samples"]
            assert float(np.abs(audio).max()) > 0.05  # speech, not silence

            # -- 3. a WAV uploaded as a voice (the demo model clones it with a bundled voice's embedding)
            page.click("#voice-new summary")
            page.select_option("#clone-speaker", "rms")
            page.set_input_files("#voice-file", str(wav_path))
            page.click("#voice-upload")
            page.wait_for_function("() => window.t2w.state.lastUpload || window.t2w.state.error", timeout=60_000)
            st = _state(page)
            assert st["error"] is None, st["error"]
            pid = st["lastUpload"]["prompt_id"]
            assert page.input_value("#voice") == pid  # the new voice is selected
            listed = httpx.get(base + "/v1/voices").json()["prompts"]
            assert pid in listed

            # ... and one recorded with the microphone (the page encodes it as a WAV and uploads it the same way)
            ctx.grant_permissions(["microphone"])
            page.click("#rec")
            page.wait_for_function("() => document.getElementById('rec-status').textContent.startsWith('recording')",
                                   timeout=10_000)
            page.wait_for_timeout(1500)
            page.click("#rec")
            page.wait_for_function(f"() => (window.t2w.state.lastUpload && window.t2w.state.lastUpload.prompt_id "
                                   f"!== '{pid}') || window.t2w.state.error", timeout=60_000)
            st = _state(page)
            assert st["error"] is None, st["error"]
            rec_pid = st["lastUpload"]["prompt_id"]
            assert page.input_value("#voice") == rec_pid and rec_pid in httpx.get(base + "/v1/voices").json()["prompts"]
            assert "registered as" in page.text_content("#rec-status")

            # -- 4. "speak like this recording": the page tokenizes a WAV into the token box
            page.set_input_files("#say-file", str(wav_path))
            page.click("#tokenize")
            page.wait_for_function("() => window.t2w.state.lastTokenize || window.t2w.state.error", timeout=60_000)
            st = _state(page)
            assert st["error"] is None, st["error"]
            got = page.evaluate("() => window.t2w.parseTokens(document.getElementById('tokens').value)")
            assert got == st["lastTokenize"]["tokens"]
            assert abs(len(got) - len(audio) / sr * 43.066) < 3
            assert page.is_checked("input[name=source][value=tokens]")

            # ... spoken at once with a start buffer far longer than the speech: playback starts when the stream is
            # done, not 20 s after its first audio (all audio is in; nothing is left to wait for)
            page.fill("#rate", "0")
            page.fill("#buffer", "20000")
            page.click("#speak")
            page.wait_for_function("() => window.t2w.state.phase === 'done' || window.t2w.state.phase === 'error'",
                                   timeout=120_000)
            st = _state(page)
            assert st["phase"] == "done", st["error"]
            chunks = st["chunks"]
            assert st["playedAtDone"] and st["underruns"] == 0
            assert 0 <= chunks[0]["start"] - st["doneAudioS"] <= 0.05, (chunks[0], st["doneAudioS"])
            assert st["startBufferMs"] < 20000 and page.text_content("#stat-underruns") == "0"
            assert all(cur["start"] == prev["end"] for prev, cur in zip(chunks, chunks[1:]))
            page.fill("#buffer", "")

            # -- 5. a server error is shown to the user: a bad token id pasted
            page.fill("#tokens", "12 874 99999 33")
            page.fill("#rate", "0")
            page.click("#speak")
            page.wait_for_function("() => window.t2w.state.phase === 'error'", timeout=60_000)
            msg = page.text_content("#error")
            assert page.is_visible("#error")
            assert "99999" in msg and "out of range [0, 2048)" in msg and "server error 400" in msg, msg
            # and the page's own refusal of text that is not tokens
            page.fill("#tokens", "hello world")
            page.click("#speak")
            assert "not a token" in page.text_content("#error")

            # nothing was fetched from anywhere but this server
            host = f"127.0.0.1:{server['port']}"
            assert requests and all(re.match(rf"(https?|wss?)://{re.escape(host)}/", u) for u in requests), requests
            assert not console_errors, console_errors
            assert not not_found, not_found
            icon = page.eval_on_selector("link[rel=icon]", "l => l.href")
            assert page.evaluate("async (u) => (await fetch(u)).status", icon) == 200
        finally:
            browser.close()


def test_page_endpoints_need_the_key_but_the_page_does_not(tmp_path: Path) -> None:
    """GET / and its files are public (they hold no data); /v1/voices etc. need the key like the rest."""
    from test_server import running_server

    from token2wav import Token2Wav
    from token2wav.serve.app import create_app
    from token2wav.serve.auth import AccessPolicy

    key = "page-test-key-0123"
    app = create_app(Token2Wav.from_pretrained("tiny"), name="tiny", access=AccessPolicy(api_key=key))
    with running_server(app) as hostport:
        base = f"http://{hostport}"
        for path in ("/", "/static/app.js", "/static/style.css", "/static/icon.svg", "/favicon.ico"):
            assert httpx.get(base + path).status_code == 200, path
        icon = httpx.get(base + "/favicon.ico")
        assert icon.headers["content-type"] == "image/svg+xml" and icon.content.startswith(b"<svg")
        assert httpx.get(base + "/static/nope.js").status_code == 404
        assert httpx.post(base + "/").status_code in (401, 405)
        for path in ("/v1/voices", "/v1/utterances"):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "audio/wav"}
        buf = io.BytesIO()
        sf.write(buf, np.sin(np.arange(22050) * 0.05).astype(np.float32) * 0.5, 22050, format="WAV")
        r = httpx.post(base + "/v1/tokenize", content=buf.getvalue(), headers=auth)
        assert r.status_code == 501 and "no speech tokenizer" in r.json()["error"]  # tiny has none
        v = httpx.get(base + "/v1/voices", headers=auth).json()
        assert v["speakers"] == [] and v["tokenize"] is False


def test_tokenize_endpoint_on_the_demo_voice(server: dict[str, Any]) -> None:
    base = server["base"]
    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(np.arange(44100) * 0.03) + 0.01 * rng.standard_normal(44100)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 44100, format="WAV")
    r = httpx.post(base + "/v1/tokenize", content=buf.getvalue(), headers={"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    body = r.json()
    from token2wav import Token2Wav

    expected = Token2Wav.from_pretrained("demo").tokenize(wave, 44100)
    assert body["tokens"] == [int(t) for t in expected] and body["seconds"] == 1.0
    bad = httpx.post(base + "/v1/tokenize", content=b"not audio", headers={"Content-Type": "audio/wav"})
    assert bad.status_code == 400 and "not a readable audio file" in bad.json()["error"]
    voices = httpx.get(base + "/v1/voices").json()
    assert [s["name"] for s in voices["speakers"]] == ["slt", "rms", "awb"] and voices["clone_needs_speaker"]
    utts = httpx.get(base + "/v1/utterances").json()["utterances"]
    assert len(utts) == 30 and all(u["tokens"] and u["text"] for u in utts)
    # a stream may name a bundled voice by its prompt_id and pick a lookahead in the model's range
    ws_url = f"ws://127.0.0.1:{server['port']}/v1/stream"
    from websockets.sync.client import connect

    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "prompt_id": voices["speakers"][1]["prompt_id"], "hop": 16,
                            "pre_lookahead_len": 9}))
        err = json.loads(ws.recv(timeout=60))
    assert err["type"] == "error" and "pre_lookahead_len=9" in err["message"], err


def test_page_with_an_access_key(tmp_path: Path) -> None:
    """A server with a key: the page loads without it, asks for it, and sends it (Bearer on HTTP, ?token= on the
    WebSocket); a wrong key is shown as the server's 401."""
    sync_playwright = _require_browser()
    from test_server import running_server

    from token2wav import Token2Wav
    from token2wav.serve.app import create_app
    from token2wav.serve.auth import AccessPolicy

    key = "page-key-0123456789"
    t2w = Token2Wav.from_pretrained("tiny")
    app = create_app(t2w, name="tiny", access=AccessPolicy(api_key=key))
    with running_server(app) as hostport, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox",
                                           "--mute-audio"])
        try:
            page = browser.new_page()
            page.goto(f"http://{hostport}/")  # no key: the page loads, its data requests are refused
            page.wait_for_function("() => window.t2w && window.t2w.ready === true", timeout=60_000)
            assert "server error 401" in page.text_content("#error")
            page.goto(f"http://{hostport}/?token={key}")  # the key given to the page
            page.wait_for_function("() => window.t2w && window.t2w.ready === true", timeout=60_000)
            st = _state(page)
            assert st["error"] is None, st["error"]
            assert page.is_checked("input[name=source][value=tokens]")  # tiny ships no utterances
            n = 2 * int(t2w.chunk_tokens) + int(t2w.config.pre_lookahead_len)
            page.fill("#tokens", " ".join(str(i % 50) for i in range(n)))
            page.fill("#rate", "0")
            page.click("#speak")
            page.wait_for_function("() => ['done', 'error'].includes(window.t2w.state.phase)", timeout=60_000)
            st = _state(page)
            assert st["phase"] == "done", st["error"]
            assert st["chunks"] and sum(c["samples"] for c in st["chunks"]) == st["done"]["samples"]
            page.fill("#key", "wrong-key-0123456789")
            page.click("#speak")
            page.wait_for_function("() => window.t2w.state.phase === 'error'", timeout=60_000)
            assert "401" in page.text_content("#error")
        finally:
            browser.close()
