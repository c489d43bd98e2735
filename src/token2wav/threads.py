"""One OpenMP thread pool per process: where a server runs torch's CPU work.

GNU OpenMP, the runtime of PyTorch's Linux wheels, gives every thread that starts a parallel operator its own
pool of worker threads and keeps that pool until the thread exits. Once the pools' threads together outnumber
the CPUs, it stops letting idle workers spin, so every parallel operator then wakes its workers through the
kernel. Measured on 2 cores (docs/benchmarks.md, "One OpenMP pool"): a 200 x 512 layer norm costs 25 us from
the only pool and 104 us once a second pool exists; a demo stream's chunks cost 27 % more.

A server therefore runs its model calls on one long-lived thread (the batcher's worker) and everything else that
may call torch (loading, warm-up, prompt passes, uploads, offline synthesis) on short-lived threads, whose pools
end with them. No environment setting (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) removes the cost: measured.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["ShortLivedThreads", "run_in_short_lived_thread"]

T = TypeVar("T")


def run_in_short_lived_thread(fn: Callable[..., T], *args: Any, name: str = "token2wav-setup", **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread that ends when it returns (its OpenMP pool with it): its result,
    or its exception re-raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


class ShortLivedThreads(Executor):
    """An executor of at most ``max_workers`` threads that end as soon as no task waits.

    Like ``ThreadPoolExecutor``, except that an idle thread exits instead of waiting for work, so the OpenMP pool
    a task's torch operators start does not outlive the burst of tasks that needed it."""

    def __init__(self, max_workers: int, name: str = "token2wav-task") -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self._name = name
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._tasks: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._threads: set[threading.Thread] = set()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            self._tasks.append((future, fn, args, kwargs))
            if len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=f"{self._name}-{next(self._ids)}", daemon=True)
                self._threads.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._tasks:  # decided under the lock that submit() takes: no task is left unserved
                    self._threads.discard(threading.current_thread())
                    return
                future, fn, args, kwargs = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - the future carries it
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args, kwargs  # drop the last task's references before waiting for the lock

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._tasks:
                    self._tasks.popleft()[0].cancel()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    @property
    def threads(self) -> int:
        """Threads alive now (0 when idle)."""
        with self._lock:
            return len(self._threads)
