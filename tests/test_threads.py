"""One OpenMP pool per process (token2wav.threads): short-lived threads, and a server whose torch work leaves only
the batcher worker's pool.

GNU OpenMP keeps one pool of worker threads per thread that ran a parallel operator, until that thread exits;
the pools' threads are native threads Python does not list, so counting them counts pools (one pool of a
2-thread team is one native thread)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from token2wav.threads import ShortLivedThreads, run_in_short_lived_thread

COUNT = textwrap.dedent("""
    import os, threading, time

    def native():
        # threads of this process that Python did not start: OpenMP pool threads, among others
        return len({int(t) for t in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()})

    def settled():
        # a pool whose thread ended winds down asynchronously: wait until the count holds still
        last, t0 = native(), time.time()
        while time.time() - t0 < 5:
            time.sleep(0.1)
            now = native()
            if now == last:
                return now
            last = now
        return last
""")


def _run(body: str) -> dict:
    script = COUNT + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_short_lived_thread_returns_and_raises() -> None:
    assert run_in_short_lived_thread(lambda x, y=0: x + y, 2, y=3) == 5
    main = threading.get_ident()
    assert run_in_short_lived_thread(threading.get_ident) != main
    with pytest.raises(KeyError, match="boom"):
        run_in_short_lived_thread(lambda: {}["boom"])


def test_short_lived_threads_bound_concurrency_and_end_when_idle() -> None:
    ex = ShortLivedThreads(max_workers=2, name="t")
    running, peak, lock = [0], [0], threading.Lock()
    gate = threading.Event()

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(5)
        with lock:
            running[0] -= 1
        return i * i

    futures = [ex.submit(task, i) for i in range(6)]
    time.sleep(0.2)
    assert ex.threads == 2 and running[0] == 2  # the other four wait for a thread
    gate.set()
    assert [f.result(5) for f in futures] == [0, 1, 4, 9, 16, 25]
    assert peak[0] == 2
    deadline = time.time() + 5
    while ex.threads and time.time() < deadline:
        time.sleep(0.01)
    assert ex.threads == 0  # idle: no thread (and no OpenMP pool) is kept
    failing = ex.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(task, 1)
    with pytest.raises(ValueError, match="max_workers must be an int >= 1, got 0"):
        ShortLivedThreads(0)


def test_shutdown_cancels_waiting_tasks() -> None:
    ex = ShortLivedThreads(max_workers=1)
    gate = threading.Event()
    first = ex.submit(gate.wait, 5)
    deadline = time.time() + 5
    while not first.running() and time.time() < deadline:
        time.sleep(0.01)
    waiting = ex.submit(lambda: "never")
    ex.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled()
    gate.set()
    assert first.result(5) is True


def test_a_pool_ends_with_its_short_lived_thread_and_outlives_a_pooled_one() -> None:
    """The mechanism the server relies on, measured on this torch build: a parallel operator on a thread starts
    one pool (one native thread for a 2-thread team); the pool ends with a short-lived thread, but stays for a
    ThreadPoolExecutor's thread."""
    counts = _run("""
        import json, torch
        from concurrent.futures import ThreadPoolExecutor
        from token2wav.threads import run_in_short_lived_thread, ShortLivedThreads
        torch.set_num_threads(2)
        def matmul():
            a = torch.randn(512, 512)
            return float((a @ a).sum())
        base = settled()
        matmul()
        main = settled()
        run_in_short_lived_thread(matmul)
        short = settled()
        ShortLivedThreads(2).submit(matmul).result()
        executor = settled()
        pool = ThreadPoolExecutor(1)
        pool.submit(matmul).result()
        pooled = settled()
        print(json.dumps(dict(base=base, main=main, short=short, executor=executor, pooled=pooled)))
    """)
    assert counts["main"] == counts["base"] + 1
    assert counts["short"] == counts["main"] and counts["executor"] == counts["main"]
    assert counts["pooled"] == counts["main"] + 1


def test_a_server_keeps_one_openmp_pool() -> None:
    """The server's loading, a stream opened as the server opens one, its chunks (the batcher's worker) and an
    offline synthesis on the server's task threads: one pool in all. A parallel operator on the main thread
    afterwards adds one more, so the count would see a second."""
    counts = _run("""
        import json, torch
        torch.set_num_threads(2)
        base = settled()
        from token2wav.serve.assembly import ServerSpec, build_server
        server = build_server(ServerSpec(model="tiny"))
        state = server.app.state.server
        tokens = torch.randint(0, server.t2w.config.vocab_size, (120,), generator=torch.Generator().manual_seed(0))
        tokens = tokens.tolist()
        session = state.executor.submit(lambda: server.batcher.stream(None)).result()
        session.push(tokens)
        session.finish()
        session.close()
        state.executor.submit(lambda: server.t2w.synthesize(tokens[:60])).result()
        one = settled()
        a = torch.randn(512, 512)
        float((a @ a).sum())
        two = settled()
        server.batcher.close()
        print(json.dumps(dict(base=base, one=one, two=two, workers=server.batcher.workers)))
    """)
    assert counts["workers"] == 1
    assert counts["one"] == counts["base"] + 1, counts  # the batcher worker's pool only
    assert counts["two"] == counts["one"] + 1, counts

