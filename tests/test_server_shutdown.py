"""Graceful shutdown of a real ``token2wav serve`` process: SIGTERM drains, SIGINT drains faster; exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 30.0
START_TIMEOUT = 180.0  # importing torch and warming the model up on a busy 2-core machine

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*extra: str) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TOKEN2WAV_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "token2wav", "serve", "--model", "tiny", "--port", str(port), "--threads", "1",
         "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start")
        time.sleep(0.2)


async def _open(url: str) -> Any:
    ws = await connect(url, open_timeout=TIMEOUT, max_size=None)
    await ws.send(json.dumps({"type": "start"}))
    assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "started"
    return ws


async def _until_closed(ws: Any) -> list[Any]:
    got = []
    try:
        while True:
            msg = await asyncio.wait_for(ws.recv(), TIMEOUT)
            got.append(msg if isinstance(msg, bytes) else json.loads(msg))
    except ConnectionClosed:
        pass
    return got


async def _wait_draining(port: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    async with httpx.AsyncClient() as c:
        while True:
            r = await c.get(f"http://127.0.0.1:{port}/health", timeout=5)
            if r.status_code == 503:
                assert r.json()["status"] == "draining"
                return
            assert time.monotonic() < deadline, "the server never started draining"
            await asyncio.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> str:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"server did not exit: {err[-2000:]}") from None
    return err


def test_sigterm_drains_open_streams_then_exits_0() -> None:
    proc, port = _serve("--drain-timeout", "4")
    url = f"ws://127.0.0.1:{port}/v1/stream"
    try:

        async def scenario() -> None:
            active = await _open(url)  # will finish while the server drains
            await active.send(json.dumps({"type": "tokens", "tokens": list(range(30))}))
            idle = await _open(url)  # never finishes: closed at the end of the drain
            proc.send_signal(signal.SIGTERM)
            await _wait_draining(port)
            late = await connect(url, open_timeout=TIMEOUT)  # nothing new is admitted
            refused = await _until_closed(late)
            assert late.close_code == 1001 and refused[0]["status"] == 503, refused
            assert "shutting down" in refused[0]["message"]
            await active.send(json.dumps({"type": "tokens", "tokens": list(range(30, 60))}))
            await active.send(json.dumps({"type": "end"}))
            finished = await _until_closed(active)
            assert active.close_code == 1000 and finished[-1]["type"] == "done"
            assert finished[-1]["samples"] > 0
            rest = await _until_closed(idle)
            assert idle.close_code == 1001 and rest[-1]["message"] == "server shutting down"

        asyncio.run(scenario())
        err = _stop(proc)
        assert proc.returncode == 0, err[-2000:]
        assert "SIGTERM: draining 2 open session(s) for up to 4 s" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigint_drains_for_at_most_two_seconds() -> None:
    proc, port = _serve("--drain-timeout", "600")
    url = f"ws://127.0.0.1:{port}/v1/stream"
    try:

        async def scenario() -> None:
            idle = await _open(url)
            proc.send_signal(signal.SIGINT)
            rest = await _until_closed(idle)  # closed after 2 s, not 600
            assert idle.close_code == 1001 and rest[-1]["message"] == "server shutting down"

        asyncio.run(scenario())
        err = _stop(proc)
        assert proc.returncode == 0, err[-2000:]
        assert "SIGINT: draining 1 open session(s) for up to 2 s" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
