"""Scale-out figures for the README (issue 14): `token2wav serve --ray` against the plain `token2wav serve`.

    python benchmarks/ray_scaleout.py --json benchmarks/results/ray_scaleout.json

Measures, on this machine with the tiny model (local Ray: --ray-cpus 2, 200 MB object store, no dashboard):
* time from launching `token2wav serve --ray --replicas 2` to the first served request (a stream done);
* memory (RSS) per replica after the runs, from /health;
* 8 concurrent streams (paced so they overlap) against the same streams one at a time: largest difference in
  int16 steps, and which replica served each;
* the ingress cost per chunk: streams in lock step (one hop of tokens sent, its chunk awaited), the time from
  sending to receiving minus the server's compute for that chunk, through Ray Serve's proxy and replica and
  through the single-process server; the difference is what the Ray hop adds to every chunk's latency; and the
  CPU time Serve's proxy process spends per chunk (its tokens message in, its header and audio out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stream(url: str, tokens: list[int], pace_s: float = 0.0, piece: int = 10) -> dict[str, Any]:
    pcm = bytearray()
    compute_ms = 0.0
    chunks = 0
    replica = None
    t0 = time.perf_counter()
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start"}))

        async def send_all() -> None:
            if pace_s == 0:
                await ws.send(json.dumps({"type": "tokens", "tokens": tokens}))
            else:
                for i in range(0, len(tokens), piece):
                    await ws.send(json.dumps({"type": "tokens", "tokens": tokens[i : i + piece]}))
                    await asyncio.sleep(pace_s)
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send_all())
        last = None
        async for msg in ws:
            if isinstance(msg, bytes):
                pcm += msg
                continue
            m = json.loads(msg)
            if m["type"] == "started":
                replica = m.get("replica")
            elif m["type"] == "chunk":
                chunks += 1
                compute_ms += m["compute_ms"]
            elif m["type"] in ("done", "error"):
                last = m
                break
        await sender
    wall = time.perf_counter() - t0
    assert last is not None and last["type"] == "done", last
    return {
        "audio": np.frombuffer(bytes(pcm), "<i2"),
        "replica": replica,
        "chunks": chunks,
        "wall_s": wall,
        "compute_s": compute_ms / 1e3,
    }


def wait_ready(base: str, timeout: float, replicas: int | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h = httpx.get(f"{base}/health", timeout=5).json()
            if replicas is None or h.get("replicas_ok") == replicas:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready")


async def lockstep(url: str, tokens: list[int]) -> list[float]:
    """One stream in lock step: send one hop of tokens, wait for its chunk. Per chunk: (time from sending the
    tokens to receiving the chunk's audio) - (the server's compute_ms for it) = what transport and framing cost."""
    out = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "started"
        i, step = 0, 28  # the first chunk needs its 25 tokens and the 3 of look-ahead
        while i + step <= len(tokens):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "tokens", "tokens": tokens[i : i + step]}))
            head = json.loads(await ws.recv())
            assert head["type"] == "chunk", head
            await ws.recv()  # its audio
            out.append(time.perf_counter() - t0 - head["compute_ms"] / 1e3)
            i, step = i + step, 25
        await ws.send(json.dumps({"type": "end"}))
        async for msg in ws:
            if isinstance(msg, str) and json.loads(msg)["type"] in ("done", "error"):
                break
    return out


def overhead_per_chunk(url: str, tokens: list[int], runs: int) -> dict[str, float]:
    per: list[float] = []
    for _ in range(runs):
        per += asyncio.run(lockstep(url, tokens))
    per.sort()
    return {
        "median_ms": round(statistics.median(per) * 1e3, 2),
        "p90_ms": round(per[int(0.9 * (len(per) - 1))] * 1e3, 2),
        "chunks": len(per),
    }


def proxy_pid(root: int) -> int:
    """Serve's HTTP proxy actor among the processes below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    todo, found = [root], []
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"ProxyActor" in f.read():
                    found.append(c)
    if len(found) != 1:
        raise RuntimeError(f"expected one proxy process, found {found}")
    return found[0]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--runs", type=int, default=5, help="streams per ingress measurement (default 5)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = 256  # within the tiny model's vocabulary
    long_tokens = rng.integers(0, vocab, 528).tolist()  # 21 chunks in lock step
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": "tiny"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out["commit"] = commit

    # the single-process server, for the ingress comparison
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    single = subprocess.Popen(
        [sys.executable, "-m", "token2wav", "serve", "--model", "tiny", "--port", str(port), "--threads", "1",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_ready(base, 120, None)
        out["ingress_single_process"] = overhead_per_chunk(f"ws://127.0.0.1:{port}/v1/stream", long_tokens, args.runs)
        with open(f"/proc/{single.pid}/status", encoding="ascii") as f:
            rss = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")][0]
        out["single_process_rss_mb"] = round(rss / 1024, 1)
    finally:
        stop(single)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/v1/stream"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "token2wav", "serve", "--ray", "--model", "tiny", "--replicas", "2", "--port",
         str(port), "--ray-cpus", "2", "--ray-object-store-mb", "200", "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=open(os.environ.get("RAY_SCALEOUT_LOG", os.devnull), "wb"),
    )  # fmt: skip
    try:
        wait_ready(base, 300, 2)
        asyncio.run(stream(url, long_tokens[:60]))
        out["ray_start_to_first_request_s"] = round(time.monotonic() - t0, 1)
        jobs = [rng.integers(0, vocab, 60 + 7 * i).tolist() for i in range(8)]
        singles = [asyncio.run(stream(url, t)) for t in jobs]

        async def together() -> list[dict[str, Any]]:
            return await asyncio.gather(*(stream(url, t, pace_s=0.1) for t in jobs))

        many = asyncio.run(together())
        diffs = [
            int(np.abs(a["audio"].astype(np.int32) - b["audio"].astype(np.int32)).max()) for a, b in zip(singles, many)
        ]
        out["concurrent_8"] = {
            "max_diff_int16_steps": max(diffs),
            "same_length": all(a["audio"].size == b["audio"].size for a, b in zip(singles, many)),
            "streams_per_replica": {r: sum(1 for m in many if m["replica"] == r) for r in {m["replica"] for m in many}},
        }
        proxy = proxy_pid(proc.pid)
        cpu0, t0 = cpu_seconds(proxy), time.perf_counter()
        time.sleep(5.0)  # the proxy's own background work (long polls, metrics), idle
        idle_rate = (cpu_seconds(proxy) - cpu0) / (time.perf_counter() - t0)
        cpu0, t0 = cpu_seconds(proxy), time.perf_counter()
        out["ingress_ray"] = overhead_per_chunk(url, long_tokens, args.runs)
        busy = cpu_seconds(proxy) - cpu0 - idle_rate * (time.perf_counter() - t0)
        # CPU the proxy spends per chunk (its tokens message in, header and audio out): sizes the ingress tier
        out["proxy_idle_cpu_percent"] = round(idle_rate * 100, 1)
        out["proxy_cpu_ms_per_chunk"] = round(busy * 1e3 / out["ingress_ray"]["chunks"], 2)
        h = httpx.get(f"{base}/health", timeout=10).json()
        out["replica_rss_mb"] = [r["rss_mb"] for r in h["replicas"]]
        out["replica_load_s"] = [r["load_s"] for r in h["replicas"]]
    finally:
        stop(proc)
    out["ingress_added_per_chunk_ms"] = round(
        out["ingress_ray"]["median_ms"] - out["ingress_single_process"]["median_ms"], 2
    )
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
