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
            charged.append(s.reserved_bytes)
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
        before = s.reserved_bytes
        s.push(_tokens(tiny, 100))
        assert 0 < before < s.reserved_bytes
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
