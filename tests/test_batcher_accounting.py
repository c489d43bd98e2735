"""The batcher charges what a session holds, and gets it all back however the session ends: finished, closed
while a push is finishing, or dropped without close() (garbage-collected)."""

from __future__ import annotations

import gc
import random
import threading
import time
from typing import Any

import numpy as np
import pytest

from token2wav.streaming.batcher import CacheBudgetError, SessionClosedError


@pytest.fixture(scope="module")
def tiny() -> Any:
    from token2wav import Token2Wav

    return Token2Wav.from_pretrained("tiny")


def _tokens(t2w: Any, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, t2w.config.vocab_size, n).tolist()


def _all_back(batcher: Any) -> None:
    # a worker finishing its bookkeeping may hold the last batch's sessions a moment after push() returned
    deadline = time.monotonic() + 10
    while batcher.sessions_open and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    stats = batcher.stats()
    assert batcher.sessions_open == 0 and batcher.reserved_bytes == 0, stats
    assert stats["kv_pages_free"] == stats["kv_pages_total"], stats


def test_a_window_session_is_charged_by_its_window(tiny: Any) -> None:
    """1,000 tokens under 16 MiB: a window session holds its window, not its history (it was refused at 275)."""
    tokens = _tokens(tiny, 1000)
    with tiny.batcher(max_cache_bytes=16 << 20) as batcher:
        s = batcher.stream(mode="window", window_frames=50)
        charged = []
        for i in range(0, len(tokens), 25):
            s.push(tokens[i : i + 25])
            charged.append(batcher.reserved_bytes_of(s))
        s.finish()
        assert max(charged) == charged[len(charged) // 2]  # flat after the window filled
        _all_back(batcher)
        whole = batcher.stream()  # a cached session keeps its history and is charged for it
        with pytest.raises(CacheBudgetError, match="cache budget exceeded"):
            for i in range(0, len(tokens), 25):
                whole.push(tokens[i : i + 25])
        whole.close()
        _all_back(batcher)


def test_a_recompute_session_is_charged_by_its_prefix(tiny: Any) -> None:
    with tiny.batcher() as batcher:
        s = batcher.stream(mode="recompute", hop=25)
        before = batcher.reserved_bytes_of(s)
        s.push(_tokens(tiny, 100))
        assert 0 < before < batcher.reserved_bytes_of(s)
        s.finish()
        assert batcher.reserved_bytes == 0


def test_abandoned_sessions_are_released(tiny: Any) -> None:
    """Twenty sessions dropped without close() or finish(): a budget that admits only a few is free again."""
    tokens = _tokens(tiny, 60)
    with tiny.batcher(max_cache_bytes=8 << 20) as batcher:
        for _ in range(20):
            s = batcher.stream()
            s.push(tokens)
            del s  # the caller vanished: no close(), no finish()
            _all_back(batcher)  # released: without that the third would already be refused
        held = []
        with pytest.raises(CacheBudgetError):  # the budget binds: a few sessions of this length fill it ...
            for _ in range(100):
                s = batcher.stream()
                held.append(s)
                s.push(tokens)
        assert 2 <= len(held) < 100
        for s in held:
            s.close()
        del s
        fresh = batcher.stream()  # ... and after twenty abandoned sessions a new one is admitted and served
        out = np.concatenate([*fresh.push(tokens), fresh.finish()])
        assert out.size > 0 and np.isfinite(out).all()
        _all_back(batcher)


def test_closes_racing_pushes_leak_no_page(tiny: Any) -> None:
    rng = random.Random(1)
    tokens = _tokens(tiny, 90)
    with tiny.batcher(max_cache_bytes=16 << 20) as batcher:
        for _ in range(30):
            s = batcher.stream()
            done = threading.Event()

            def push(session: Any = s, event: threading.Event = done) -> None:
                try:
                    session.push(tokens)
                except (SessionClosedError, RuntimeError):
                    pass
                finally:
                    event.set()

            t = threading.Thread(target=push)
            t.start()
            threading.Event().wait(rng.random() * 0.05)  # close at any point of the push, or after it
            s.close()
            t.join(30)
            assert done.is_set()
        _all_back(batcher)


def test_a_stream_alone_is_a_batch_of_one_on_the_callers_thread(tiny: Any, monkeypatch: Any) -> None:
    """Token2Wav.stream() runs the batcher's path inline: every chunk one row, on pages, computed on the caller's
    thread (no worker thread started); apush gives the same chunks as push."""
    from token2wav.streaming import batcher as batcher_module

    calls: list[tuple[Any, int, list[bool]]] = []
    real = batcher_module.run_rows

    def spy(rows: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread(), len(rows), [r.table is not None for r in rows]))
        return real(rows, **kwargs)

    monkeypatch.setattr(batcher_module, "run_rows", spy)
    tokens = _tokens(tiny, 90, seed=3)
    threads = threading.active_count()
    with tiny.stream(output="mel") as s:
        pushed = s.push(tokens[:60]) + [s.finish()]
    assert threading.active_count() == threads
    assert len(calls) == len(pushed) >= 2
    assert all(t is threading.current_thread() and n == 1 and paged == [True] for t, n, paged in calls)

    import asyncio

    async def run() -> list[np.ndarray]:
        with tiny.stream(output="mel") as a:
            return await a.apush(tokens[:60]) + [await a.afinish()]

    awaited = asyncio.run(run())
    assert len(awaited) == len(pushed)
    for x, y in zip(awaited, pushed):
        np.testing.assert_array_equal(x, y)  # the same computation, row for row: identical floats


def test_the_most_urgent_row_runs_first_and_none_starves(tiny: Any, monkeypatch: Any) -> None:
    """Rows queued behind a busy worker run in order of when their listeners run dry (earliest deadline first),
    first chunks by their arrival plus the first-audio budget; a deadline only counts within
    STARVATION_BOUND_S of the row's queueing time, so no row waits forever."""
    from token2wav.streaming import batcher as batcher_module

    order: list[Any] = []
    hold = threading.Event()
    real = batcher_module.run_rows

    def spy(rows: Any, **kwargs: Any) -> Any:
        hold.wait(10)
        order.extend(r.spec for r in rows)
        return real(rows, **kwargs)

    monkeypatch.setattr(batcher_module, "run_rows", spy)
    tokens = _tokens(tiny, 28, seed=4)  # one chunk of the tiny model: 25 tokens + 3 of lookahead
    with tiny.batcher(workers=1, max_batch=1, max_wait_ms=0) as batcher:
        blocker = batcher.stream(output="mel")
        sessions = {name: batcher.stream(output="mel") for name in ("relaxed", "urgent", "soon")}
        now = time.perf_counter()
        for name, seconds in (("relaxed", 1.5), ("urgent", 0.2), ("soon", 0.8)):  # audio still buffered
            sessions[name].playback.play_start, sessions[name].playback.audio_s = now, seconds
        threads = [threading.Thread(target=blocker.push, args=(tokens,))]
        threads[0].start()
        deadline = time.monotonic() + 10
        while batcher.stats()["rows"] == 0 and not batcher._inflight and time.monotonic() < deadline:
            time.sleep(0.005)  # the blocker's chunk holds the only worker
        for name in ("relaxed", "urgent", "soon"):
            threads.append(threading.Thread(target=sessions[name].push, args=(tokens,)))
            threads[-1].start()
        while len(batcher._queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        hold.set()
        for t in threads:
            t.join(10)
    names = {id(s.spec): name for name, s in sessions.items()} | {id(blocker.spec): "blocker"}
    assert [names[id(spec)] for spec in order] == ["blocker", "urgent", "soon", "relaxed"]
    # the clamp: a deadline far away counts as queued + 2 s, one long past as queued - 2 s
    assert batcher_module.Batcher.priority(100.0, 10.0) == 12.0
    assert batcher_module.Batcher.priority(-50.0, 10.0) == 8.0
    assert batcher_module.Batcher.priority(10.5, 10.0) == 10.5
