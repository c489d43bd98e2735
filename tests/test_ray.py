"""Scale-out on Ray Serve (serve/ray/): a real local Ray with two replicas of the tiny model on loopback.

The deployment is started once for the module with ``python -m token2wav.serve.ray`` (= ``token2wav serve --ray``)
in its own process, bounded to 2 CPUs and a 200 MB object store without dashboard, and stopped by the last
test with SIGTERM, which checks that no process it started is left. The options, the aggregation of /health
and /metrics and the proxy's stream guard are also tested alone, without Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
from tolerances import PCM_STEP, pcm_steps
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from token2wav.serve.metrics import parse_exposition
from token2wav.serve.ray.aggregate import merge_expositions, merge_health
from token2wav.serve.ray.proxy import LOST_MESSAGE, StreamGuard
from token2wav.serve.ray.settings import settings_from_options

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 150.0  # Ray, Serve and two replicas on two busy cores
TIMEOUT = 60.0

# ------------------------------------------------------------------------------------ without Ray


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "--replicas must be an integer in [1, 1024], got 0"),
        ({"autoscale": "3:1"}, "--autoscale must be MIN:MAX with 1 <= MIN <= MAX <= 1024, got '3:1'"),
        ({"autoscale": "1:3", "replicas": 2}, "give --replicas N or --autoscale MIN:MAX, not both"),
        ({"target_sessions": 20, "max_sessions": 16}, "--target-sessions must be a number in (0, 16], got 20"),
        ({"replica_cpus": 0}, "--replica-cpus must be a number in (0, 1024], got 0"),
        ({"max_wait_ms": 2000}, "--max-wait-ms must be a number in [0, 1000], got 2000"),
        ({"batching": "yes"}, "--batching must be true or false, got 'yes'"),
        ({"replcas": 2}, "unknown option(s) replcas; allowed:"),
    ],
)
def test_bad_options_name_the_parameter_and_range(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as e:
        settings_from_options(options, environ={})
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_autoscaling_follows_open_sessions_per_replica() -> None:
    s = settings_from_options({"autoscale": "2:8", "max_sessions": 12, "target_sessions": 6}, environ={})
    opts = s.deployment_options()
    assert "num_replicas" not in opts
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (2, 8, 6.0)
    assert opts["max_ongoing_requests"] > 12  # room for /health; a 13th stream gets the server's own 1013
    fixed = settings_from_options({"replicas": 3}, environ={}).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert settings_from_options({}, environ={}).target_sessions == 8.0  # half of max_sessions 16


def _run_cli(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "token2wav"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})}
    )


def test_without_ray_serve_says_what_to_install() -> None:
    hide_ray = "import sys; sys.modules['ray'] = None; from token2wav.cli import main; sys.exit(main(sys.argv[1:]))"
    r = _run_cli("serve", "--ray", "--model", "tiny", code=hide_ray)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "token2wav serve: error: --ray needs Ray Serve, which is not installed: pip install 'token2wav[ray]'"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "3", "--ray-cpus", "2"], "--replicas x --replica-cpus = 3 CPUs, more than the local Ray's"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address and no access key is set"),
        (["--ray-object-store-mb", "10"], "--ray-object-store-mb must be in [80, 1048576], got 10"),
        (["--autoscale", "2"], "--autoscale must be MIN:MAX with 1 <= MIN <= MAX <= 1024, got '2'"),
        (["--ray-address", "nowhere"], "--ray-address must be auto, HOST:PORT or ray://HOST:PORT, got 'nowhere'"),
        (["--port", "70000"], "--port must be in [1, 65535], got 70000"),
        (["--max-cache-mb", "1"], "max_cache_bytes=1048576 cannot hold one chunk of one stream"),
    ],
)
def test_cli_refuses_bad_ray_options_before_starting_anything(args: list[str], message: str, capsys) -> None:
    from token2wav.cli import main

    assert main(["serve", "--ray", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("token2wav serve: error: " + message) and "\n" not in err, err


def test_metrics_and_health_add_up_over_replicas() -> None:
    a = (
        "# HELP t_total T.\n# TYPE t_total counter\nt_total{kind=\"stream\"} 3\n"
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n"
        "# HELP d_timestamp_seconds D.\n# TYPE d_timestamp_seconds gauge\nd_timestamp_seconds 100\n"
    )
    b = a.replace(" 3\n", " 4\n").replace("h_count 2", "h_count 5").replace(" 100\n", " 250\n")
    merged = parse_exposition(merge_expositions({"r1": a, "r2": b}))
    assert merged['t_total{kind="stream"}'] == 7
    assert merged['t_total{kind="stream",replica="r1"}'] == 3 and merged['t_total{kind="stream",replica="r2"}'] == 4
    assert merged["h_count"] == 7 and merged['h_bucket{le="+Inf",replica="r2"}'] == 2
    assert merged["d_timestamp_seconds"] == 250  # the latest, not a sum
    text = merge_expositions({"r1": a, "r2": b})
    assert text.count("# TYPE h histogram") == 1
    # a family's samples stay together (the exposition format requires it)
    names = [ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if not ln.startswith("#")]
    fams = [n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names]
    runs = [f for i, f in enumerate(fams) if i == 0 or fams[i - 1] != f]
    assert len(runs) == len(set(runs)) == 3, runs
    body, status = merge_health(
        "r1",
        {
            "r1": {"status": "ok", "model": "tiny", "sessions_open": 2, "max_sessions": 16},
            "r2": {"status": "draining", "model": "tiny", "sessions_open": 1, "max_sessions": 16},
        },
    )
    assert status == 200
    assert (body["sessions_open"], body["max_sessions"], body["replicas_ok"]) == (3, 16, 1)
    assert [r["replica"] for r in body["replicas"]] == ["r1", "r2"]
    assert merge_health("r1", {"r1": {"status": "draining", "sessions_open": 0}})[1] == 503


def _guard_run(app: Any, client: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    incoming = list(client)

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(StreamGuard(app)({"type": "websocket", "path": "/v1/stream"}, receive, send))
    return sent


def test_stream_guard_ends_a_lost_stream_with_error_and_1011() -> None:
    async def lost(scope: Any, receive: Any, send: Any) -> None:  # accepted, then the replica vanished
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": '{"type":"started"}'})

    sent = _guard_run(lost, [])
    assert sent[-1] == {"type": "websocket.close", "code": 1011, "reason": "replica lost"}
    assert json.loads(sent[-2]["text"]) == {"type": "error", "code": 1011, "status": 502, "message": LOST_MESSAGE}

    async def finished(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000, "reason": ""})

    assert _guard_run(finished, [])[-1]["code"] == 1000  # nothing added to a stream that ended itself

    async def client_left(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        await receive()

    assert _guard_run(client_left, [{"type": "websocket.disconnect", "code": 1001}]) == [{"type": "websocket.accept"}]


def test_registry_keeps_prompts_in_memory_and_on_disk(tmp_path: Path) -> None:
    from token2wav.serve.prompt_store import prompt_id
    from token2wav.serve.ray.deployment import _Registry

    rng = np.random.default_rng(0)
    arrays = [
        (rng.integers(0, 100, 5), rng.random((10, 80)).astype(np.float32), rng.random(192).astype(np.float32))
        for _ in range(3)
    ]
    ids = [prompt_id(*a) for a in arrays]
    reg = _Registry(vocab_size=100, prompt_dir=str(tmp_path), max_prompts=2, max_file_bytes=1 << 20)
    for pid, a in zip(ids, arrays):
        assert reg.save(pid, *a)
    assert list(reg.prompts) == ids[1:]  # the least recently used left memory ...
    back = reg.load(ids[0])  # ... and is read back from the folder
    # stored and read back: copies, bit for bit
    assert back is not None and all(np.array_equal(x, y) for x, y in zip(back, arrays[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.npz" for i in ids)
    kept = reg.save(ids[1], *arrays[2])  # other arrays under a held id (a clone on another CPU): the first stay
    assert all(np.array_equal(x, y) for x, y in zip(kept, arrays[1]))
    assert all(np.array_equal(x, y) for x, y in zip(reg.load(ids[1]), arrays[1]))
    with pytest.raises(ValueError, match="not a prompt id"):
        reg.save("../escape", *arrays[0])
    by_bytes = _Registry(vocab_size=100, prompt_dir=None, max_prompts=100, max_file_bytes=1 << 20,
                         max_bytes=2 * sum(a.nbytes for a in arrays[0]))  # two prompts' arrays
    for pid, a in zip(ids, arrays):
        by_bytes.save(pid, *a)
    assert list(by_bytes.prompts) == ids[1:] and by_bytes.stats()["bytes"] <= by_bytes.max_bytes
    no_disk = _Registry(vocab_size=100, prompt_dir=None, max_prompts=1, max_file_bytes=1 << 20)
    no_disk.save(ids[0], *arrays[0])
    no_disk.save(ids[1], *arrays[1])
    assert no_disk.load(ids[0]) is None and no_disk.load(ids[1]) is not None
    reg.report("a", {"status": "ok"}, "m 1\n")
    reg.reports["b"] = (time.time() - 60, {"status": "ok"}, "")  # a replica that stopped reporting
    assert set(reg.recent(4.0)) == {"a"} and "b" not in reg.reports


# ------------------------------------------------------------------------------------ a real deployment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(root: int) -> set[int]:
    """Every live process under ``root`` (Ray's GCS, raylet and workers are all started below the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Deployment:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/v1/stream"
        self.log = log
        self.started_s = float("nan")
        self.seen: set[int] = set()  # every process the deployment ran (collected while it runs)

    def note_processes(self) -> None:
        self.seen |= _descendants(self.proc.pid)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/health", timeout=TIMEOUT).json()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.note_processes()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                for pid in _descendants(self.proc.pid) | {self.proc.pid}:
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        return self.proc.returncode


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    cmd = [
        sys.executable, "-m", "token2wav.serve.ray", "--model", "tiny", "--replicas", "2", "--port", str(port),
        "--ray-cpus", "2", "--ray-object-store-mb", "200", "--replica-cpus", "1", "--threads", "1",
        "--workers", "2", "--log-level", "warning", "--prompt-dir", str(log.parent / "prompts"),
    ]  # fmt: skip
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    d = Deployment(proc, port, log)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve --ray exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() - t0 > START_TIMEOUT:
                raise RuntimeError(f"serve --ray not ready in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
            try:
                if d.health().get("replicas_ok") == 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        d.started_s = time.monotonic() - t0
        d.note_processes()
        yield d
    finally:
        d.stop()


def _tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


async def _stream(url: str, tokens: list[int], *, prompt_id: str | None = None, pace_s: float = 0.0,
                  piece: int = 10) -> dict[str, Any]:  # fmt: skip
    """One stream: tokens in pieces (``pace_s`` apart), every message and the audio; never raises."""
    out: dict[str, Any] = {"messages": [], "pcm": bytearray(), "close": None, "replica": None}
    async with connect(url, open_timeout=TIMEOUT, close_timeout=5) as ws:
        start: dict[str, Any] = {"type": "start"}
        if prompt_id is not None:
            start["prompt_id"] = prompt_id
        await ws.send(json.dumps(start))

        async def send_all() -> None:
            for i in range(0, len(tokens), piece):
                await ws.send(json.dumps({"type": "tokens", "tokens": tokens[i : i + piece]}))
                if pace_s:
                    await asyncio.sleep(pace_s)
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send_all())
        async def read_all() -> None:
            async for msg in ws:
                if isinstance(msg, bytes):
                    out["pcm"] += msg
                    continue
                m = json.loads(msg)
                out["messages"].append(m)
                if m["type"] == "started":
                    out["replica"] = m.get("replica")

        try:
            await asyncio.wait_for(read_all(), TIMEOUT)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        out["close"] = ws.close_code
    out["last"] = out["messages"][-1] if out["messages"] else None
    out["audio"] = np.frombuffer(bytes(out["pcm"]), "<i2")
    return out


def _run_streams(d: Deployment, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(*(_stream(d.ws, **job) for job in jobs))

    return asyncio.run(main())


def _pcm_tol(audio: np.ndarray, sample_rate: int = 24000) -> int:
    """int16 steps a stream may move by in a replica's batched calls against its single run: float32 rounding of
    batched rows, integrated by the tiny model's HiFT phase over the stream (tests/tolerances.py, as test_server)."""
    return pcm_steps(float(np.abs(audio).max(initial=0)) * PCM_STEP, len(audio) / sample_rate)


def test_eight_concurrent_streams_equal_their_single_runs_on_both_replicas(deployment: Deployment) -> None:
    d = deployment
    health = d.health()
    assert health["replicas_ok"] == 2 and len(health["replicas"]) == 2
    assert health["max_sessions"] == 32 and health["model"] == "tiny"
    vocab = httpx.get(f"{d.base}/v1/models", timeout=TIMEOUT).json()["models"][0]["vocab_size"]
    jobs = [{"tokens": _tokens(60 + 7 * i, i, vocab)} for i in range(8)]
    singles = [_run_streams(d, [job])[0] for job in jobs]  # one at a time
    # paced so that all eight are open together (each takes ~1 s to send)
    rounds = [_run_streams(d, [{**job, "pace_s": 0.1} for job in jobs])]
    if len({r["replica"] for r in rounds[0]}) < 2:
        # Serve's router picks between equally loaded replicas at random: all eight on one is rare, not wrong
        rounds.append(_run_streams(d, [{**job, "pace_s": 0.1} for job in jobs]))
    for together in rounds:
        for i, (one, many) in enumerate(zip(singles, together)):
            for r in (one, many):
                assert r["last"]["type"] == "done" and r["close"] == 1000, r["last"]
            assert many["audio"].size == one["audio"].size > 0
            diff = np.abs(many["audio"].astype(np.int32) - one["audio"].astype(np.int32)).max()
            steps = _pcm_tol(one["audio"])
            assert diff <= steps, f"stream {i}: concurrent audio differs from its single run by {diff} int16 steps"
    replicas = {r["replica"] for together in rounds for r in together}
    assert replicas == {h["replica"] for h in health["replicas"]}, f"streams all on {replicas}"
    # /metrics: every replica's own counters and their total
    m = parse_exposition(httpx.get(f"{d.base}/metrics", timeout=TIMEOUT).text)
    per = [m.get(f'token2wav_sessions_total{{kind="stream",replica="{rid}"}}', 0) for rid in sorted(replicas)]
    assert all(n >= 1 for n in per) and m['token2wav_sessions_total{kind="stream"}'] == sum(per) >= 16
    d.note_processes()


def test_a_prompt_registered_once_is_used_on_both_replicas(deployment: Deployment) -> None:
    d = deployment
    vocab = httpx.get(f"{d.base}/v1/models", timeout=TIMEOUT).json()["models"][0]["vocab_size"]
    rng = np.random.default_rng(5)
    body = {
        "tokens": _tokens(10, 9, vocab),
        "mel": rng.random((20, 80)).astype(np.float32).round(4).tolist(),
        "embedding": rng.random(192).astype(np.float32).round(4).tolist(),
    }
    r = httpx.post(f"{d.base}/v1/prompts", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    pid, registered_on = r.json()["prompt_id"], r.headers["x-token2wav-replica"]
    assert (d.log.parent / "prompts" / f"{pid}.npz").is_file()  # the registry writes through to --prompt-dir
    d.prompt = (pid, body)  # type: ignore[attr-defined]
    tokens = _tokens(60, 11, vocab)
    results: list[dict[str, Any]] = []
    for _ in range(4):  # until both replicas served one (the router picks at random between idle replicas)
        results += _run_streams(d, [{"tokens": tokens, "prompt_id": pid, "pace_s": 0.1} for _ in range(6)])
        assert all(x["last"]["type"] == "done" for x in results), [x["last"] for x in results]
        on = {x["replica"] for x in results}
        if len(on) == 2:
            break
    assert len(on) == 2 and registered_on in on, f"prompt streams ran on {on} only"
    ref = results[0]["audio"]
    steps = _pcm_tol(ref)
    for x in results[1:]:
        assert np.abs(x["audio"].astype(np.int32) - ref.astype(np.int32)).max() <= steps
    plain = _run_streams(d, [{"tokens": tokens}])[0]["audio"]
    assert plain.size == ref.size and np.abs(plain.astype(np.int32) - ref.astype(np.int32)).max() > steps


def test_a_killed_replica_ends_its_stream_with_an_error_others_serve_and_it_comes_back(
    deployment: Deployment,
) -> None:
    d = deployment
    health = d.health()
    pids = {h["replica"]: h["pid"] for h in health["replicas"]}
    vocab = httpx.get(f"{d.base}/v1/models", timeout=TIMEOUT).json()["models"][0]["vocab_size"]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float]:
        # a long stream (~8 s of paced tokens); its replica's process is killed once it has produced audio
        victim = asyncio.create_task(_stream(d.ws, _tokens(400, 3, vocab), pace_s=0.2))
        for _ in range(200):
            await asyncio.sleep(0.05)
            info = await asyncio.to_thread(d.health)
            busy = [h for h in info["replicas"] if h["sessions_open"] > 0]
            if busy:
                break
        assert busy, "the stream never opened"
        await asyncio.sleep(1.0)
        os.kill(pids[busy[0]["replica"]], signal.SIGKILL)
        t_kill = time.monotonic()
        lost = await asyncio.wait_for(victim, 20)
        ended_after = time.monotonic() - t_kill
        fresh = await _stream(d.ws, _tokens(60, 4, vocab))  # served meanwhile by the other replica
        return lost, fresh, ended_after

    lost, fresh, ended_after = asyncio.run(scenario())
    killed = lost["replica"]
    assert killed in pids and lost["audio"].size > 0
    assert lost["last"]["type"] == "error" and lost["last"]["code"] == 1011, lost["last"]
    assert "replica lost" in lost["last"]["message"] and lost["close"] == 1011
    assert ended_after < 10, f"the stream took {ended_after:.1f} s to end"
    assert fresh["last"]["type"] == "done" and fresh["replica"] != killed
    # Serve starts a replacement; /health lists two live replicas again, without the dead one
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = d.health()
        ids = {h["replica"] for h in info["replicas"]}
        if info["replicas_ok"] == 2 and killed not in ids:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {info}"
        time.sleep(0.5)
    new = (ids - set(pids)).pop()
    assert info["replicas"][[h["replica"] for h in info["replicas"]].index(new)]["pid"] != pids[killed]
    d.note_processes()
    # the prompt registered before is still usable, on the replacement too
    pid = getattr(d, "prompt", (None,))[0]
    if pid is not None:  # (the proxy learns of the replacement a moment after it reports: a few rounds)
        served: set[str] = set()
        while new not in served:
            assert time.monotonic() < deadline, f"no stream reached the replacement {new}: {served}"
            runs = _run_streams(d, [{"tokens": _tokens(40, 2, vocab), "prompt_id": pid, "pace_s": 0.1}] * 6)
            assert all(x["last"]["type"] == "done" for x in runs), [x["last"] for x in runs]
            served |= {x["replica"] for x in runs}


def test_shutdown_leaves_no_ray_process(deployment: Deployment) -> None:
    d = deployment
    d.note_processes()
    assert len(d.seen) >= 4, f"expected Ray's processes below the driver, saw {sorted(d.seen)}"
    assert d.stop() == 0, d.log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while (left := {p for p in d.seen if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {sorted(left)}"
