"""Soak: a real `token2wav serve` process on loopback takes a few thousand hostile requests mixed with normal
streams. Its memory stays bounded and every normal stream is served exactly, during and after.

Bounded in count (2,400 hostile requests) and time (a few tens of seconds on 2 cores).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
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
from websockets.asyncio.client import connect

from token2wav.serve.client import stream_tokens

HOSTILE = 2400
CONCURRENCY = 8
RSS_GROWTH_MB = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port = _free_port()
    prompts = tmp_path_factory.mktemp("soak-prompts")
    log = tmp_path_factory.mktemp("soak") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "token2wav", "serve", "--model", "tiny", "--port", str(port), "--log-level",
             "warning", "--prompt-dir", str(prompts), "--max-prompt-bytes", str(1 << 20)],
            stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield {"pid": proc.pid, "http": base, "ws": f"ws://127.0.0.1:{port}/v1/stream", "port": port, "log": log}
    finally:
        proc.terminate()
        proc.wait(30)


def _wav(rate: int, seconds: float, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    n = max(1, int(rate * seconds))
    sf.write(buf, (0.2 * np.sin(np.arange(n * channels) / 7)).reshape(n, channels).astype(np.float32), rate,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _flac_silence(seconds: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((48000 * seconds, 2), np.float32), 48000, format="FLAC")
    return buf.getvalue()


async def _hostile_http(client: httpx.AsyncClient, base: str, port: int, rng: random.Random, blobs: dict) -> int:
    kind = rng.randrange(9)
    if kind == 0:  # a page elsewhere posting a prompt
        r = await client.post(base + "/v1/prompts", content=b'{"tokens":[1]}',
                              headers={"Origin": "https://evil.example", "Content-Type": "application/json"})
    elif kind == 1:  # DNS rebinding
        r = await client.get(base + "/v1/models", headers={"Host": f"evil.example:{port}"})
    elif kind == 2:  # a form's content type
        r = await client.post(base + "/v1/synthesize", content=b"tokens=1", headers={"Content-Type": "text/plain"})
    elif kind == 3:  # malformed or hostile JSON
        body = rng.choice([b"{", b"[" * 5000, b'{"tokens": [1e999]}', b'{"tokens": "x"}', b"9" * 5000,
                           json.dumps({"tokens": list(range(5000)), "mel": [], "embedding": []}).encode()])
        r = await client.post(base + rng.choice(["/v1/prompts", "/v1/synthesize"]), content=body,
                              headers={"Content-Type": "application/json"})
    elif kind == 4:  # an odd-rate or multichannel recording (tiny has no front end: decoded, then refused)
        r = await client.post(base + "/v1/prompts", content=rng.choice(blobs["wavs"]),
                              headers={"Content-Type": "audio/wav"})
    elif kind == 5:  # a compressed bomb
        r = await client.post(base + "/v1/prompts", content=blobs["flac"], headers={"Content-Type": "audio/flac"})
    elif kind == 6:  # over the body limit
        r = await client.post(base + "/v1/prompts", content=blobs["big"], headers={"Content-Type": "audio/wav"})
    elif kind == 7:  # garbage multipart
        r = await client.post(base + "/v1/prompts", content=rng.randbytes(300),
                              headers={"Content-Type": "multipart/form-data; boundary=zz"})
    else:  # a valid prompt with random content: the registry stays bounded (max_prompts, LRU)
        mel = np.round(np.random.default_rng(rng.randrange(1 << 30)).random((8, 80)), 3).tolist()
        r = await client.post(base + "/v1/prompts", json={"tokens": [1, 2, 3, 4], "mel": mel,
                                                           "embedding": [0.1] * 192})
    assert r.status_code < 500 or r.status_code in (501, 503), (kind, r.status_code, r.text[:200])  # not a crash
    return r.status_code


async def _hostile_ws(url: str, rng: random.Random) -> None:
    """Abrupt drops mid-stream, malformed frames, binary where text is expected."""
    try:
        async with connect(url, open_timeout=10, close_timeout=1) as ws:
            kind = rng.randrange(3)
            if kind == 0:
                await ws.send(json.dumps({"type": "start"}))
                await ws.send(json.dumps({"type": "tokens", "tokens": [rng.randrange(100) for _ in range(60)]}))
                ws.transport.abort()  # the client vanishes while its chunk is being computed
            elif kind == 1:
                await ws.send(rng.choice(['{"type": []}', "{", '{"type": "start", "hop": -1}', "null"]))
                await asyncio.wait_for(ws.recv(), 10)
            else:
                await ws.send(b"\x00\x01binary")
                await asyncio.wait_for(ws.recv(), 10)
    except Exception:  # the server closing on us is the expected outcome
        pass


async def _normal(url: str, tokens: list[int]) -> bytes:
    # the fixed schedule: the same hops every time (adaptive ones follow the load; equal only to float rounding)
    res = await stream_tokens(url, tokens, rate=0, schedule="fixed")
    return res.pcm


def test_soak_hostile_requests_keep_memory_bounded_and_streams_exact(server: dict[str, Any]) -> None:
    rng = random.Random(0)
    vocab = int(httpx.get(server["http"] + "/v1/models").json()["models"][0]["vocab_size"])
    jobs = [[rng.randrange(vocab) for _ in range(n)] for n in (30, 45, 60)]
    blobs = {
        "wavs": [_wav(16005, 0.6), _wav(44101, 0.6), _wav(47999, 0.5, 2), _wav(8000, 1.0), _wav(96000, 0.3, 6)],
        "flac": _flac_silence(600),
        "big": b"RIFF" + b"\0" * ((1 << 20) + 10),
    }

    async def soak(count: int) -> None:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> None:
                async with sem:
                    if i % 12 == 0:
                        await _hostile_ws(server["ws"], rng)
                    else:
                        await _hostile_http(client, server["http"], server["port"], rng, blobs)

            await asyncio.gather(*(one(i) for i in range(count)))

    async def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
        before = [await _normal(server["ws"], t) for t in jobs]
        await soak(200)  # warm-up: allocator pools, prompt registry, worker threads
        rss.append(_rss_mb(server["pid"]))
        during = await asyncio.gather(soak(HOSTILE), *(_normal(server["ws"], t) for t in jobs))
        rss.append(_rss_mb(server["pid"]))
        after = [await _normal(server["ws"], t) for t in jobs]
        return before, list(during[1:]), after

    rss: list[float] = []
    t0 = time.monotonic()
    before, during, after = asyncio.run(run())
    elapsed = time.monotonic() - t0
    print(f"\nsoak: {HOSTILE} hostile requests in {elapsed:.1f} s; server RSS {rss[0]:.0f} -> {rss[1]:.0f} MB")
    assert rss[1] - rss[0] <= RSS_GROWTH_MB, rss
    # During the soak (and right after it, while the last hostile requests' work drains) a stream may share calls
    # with other rows: equal up to float rounding (tests/tolerances.py), in int16 steps.
    from tolerances import PCM_STEP, pcm_steps

    for b, d, a in zip(before, during, after):
        x = np.frombuffer(b, "<i2").astype(np.int32)
        for other in (d, a):
            y = np.frombuffer(other, "<i2").astype(np.int32)
            assert x.shape == y.shape
            assert np.abs(x - y).max() <= pcm_steps(np.abs(x).max() * PCM_STEP, len(x) / 24000)
    health = httpx.get(server["http"] + "/health").json()
    assert health["status"] == "ok" and health["sessions_open"] == 0
    assert "Traceback" not in server["log"].read_text()
