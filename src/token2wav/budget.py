"""One memory budget for every cache and buffer a server keeps (``serve --max-cache-mb``).

Accounts, in bytes:

* ``kv_pages``: the batcher's key/value page pool, as allocated; streams are admitted against its share (their
  reserved pages).
* ``prompt_states``: the engine's cache of prompt states (a prompt's encoder output and attention caches).
* ``prompt_registry``: the server's registered prompts (their arrays, as tensors).
* ``fixed_shape_buffers``: the fixed-shape solver's buffers, one set per padded shape (``--graphs``).

Each account has a fixed share of the budget (``SHARES``), so no cache can starve another or the streams. The
last three are caches: each keeps its entries least recently used first and drops its oldest when a new one
would pass its share; an entry larger than the whole share is not kept at all (it is still used by whoever
asked for it). Without a budget the accounts are still kept, for ``/metrics``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator

import torch

__all__ = ["ACCOUNTS", "KV_SHARE", "SHARES", "BudgetedLRU", "MemoryBudget", "tensor_bytes"]

# Shares of the budget. Streams need the pages; a prompt state (encoder output and attention caches of the
# prompt's frames) is the largest cache entry; registry entries are arrays; fixed-shape buffers are a few per
# padded shape.
SHARES = {"kv_pages": 0.70, "prompt_states": 0.12, "prompt_registry": 0.08, "fixed_shape_buffers": 0.10}
ACCOUNTS = tuple(SHARES)
KV_SHARE = SHARES["kv_pages"]


def tensor_bytes(value: object, _seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from ``value`` (tensors, dataclasses, lists, dicts,
    objects' attributes), each storage counted once. Modules are not followed: weights a cached state refers
    to belong to the model, not to the cache."""
    seen = set() if _seen is None else _seen
    if isinstance(value, torch.nn.Module):
        return 0
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr() if storage.data_ptr() else id(storage)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, dict):
        items: Iterable[object] = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    elif hasattr(value, "__slots__"):
        items = (getattr(value, s, None) for s in value.__slots__)
    else:
        return 0
    return sum(tensor_bytes(v, seen) for v in items)


class MemoryBudget:
    """A thread-safe byte account per holder, against one total (None: unbounded, accounts kept)."""

    def __init__(self, total_bytes: int | None = None) -> None:
        if total_bytes is not None and (isinstance(total_bytes, bool) or not isinstance(total_bytes, int)
                                        or total_bytes < 1):
            raise ValueError(f"total_bytes must be a positive int or None, got {total_bytes!r}")
        self.total_bytes = total_bytes
        self._used = dict.fromkeys(ACCOUNTS, 0)
        self._lock = threading.Lock()

    @property
    def kv_bytes(self) -> int | None:
        """The most the key/value pool may take, or None."""
        return None if self.total_bytes is None else self.share("kv_pages")

    def try_charge(self, account: str, nbytes: int) -> bool:
        """Add ``nbytes`` to ``account`` if it stays within its share; False (nothing added) if not."""
        if account not in self._used:
            raise ValueError(f"account must be one of {ACCOUNTS}, got {account!r}")
        with self._lock:
            if self.total_bytes is not None and self._used[account] + nbytes > self.share(account):
                return False
            self._used[account] += nbytes
            return True

    def share(self, account: str) -> int:
        """The most ``account`` may hold (unbounded without a total)."""
        return (1 << 62) if self.total_bytes is None else int(self.total_bytes * SHARES[account])

    def set_used(self, account: str, nbytes: int) -> None:
        """Set what ``account`` holds (memory measured elsewhere, such as the pool's allocated pages)."""
        with self._lock:
            self._used[account] = int(nbytes)

    def release(self, account: str, nbytes: int) -> None:
        with self._lock:
            self._used[account] = max(0, self._used[account] - nbytes)

    def used(self, account: str | None = None) -> int:
        with self._lock:
            return sum(self._used.values()) if account is None else self._used[account]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._used)


class BudgetedLRU:
    """Entries kept least recently used first, at most ``maxsize`` of them, their bytes charged to ``account``
    of ``budget``: a new entry drops the oldest ones until it fits, and is not kept if it cannot fit alone.
    Not thread-safe: its owner locks (or uses it from one thread, as the server's event loop does)."""

    def __init__(self, budget: MemoryBudget, account: str, maxsize: int | None = None) -> None:
        self.budget = budget
        self.account = account
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._items))

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._items.values())

    def get(self, key: Hashable, default: object = None) -> object:
        entry = self._items.get(key)
        if entry is None:
            return default
        self._items.move_to_end(key)
        return entry[0]

    def move_to_end(self, key: Hashable) -> None:
        if key in self._items:
            self._items.move_to_end(key)

    def pop(self, key: Hashable) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.budget.release(self.account, entry[1])

    def clear(self) -> None:
        for key in list(self._items):
            self.pop(key)

    def put(self, key: Hashable, value: object, nbytes: int | None = None) -> bool:
        """Keep ``value`` under ``key`` (replacing it); False if it does not fit in the budget even alone."""
        self.pop(key)
        nbytes = tensor_bytes(value) if nbytes is None else int(nbytes)
        if nbytes > self.budget.share(self.account):
            return False  # could never fit: the entries held stay
        while self.maxsize is not None and self._items and len(self._items) >= self.maxsize:
            self.pop(next(iter(self._items)))
        while not self.budget.try_charge(self.account, nbytes):
            if not self._items:
                return False
            self.pop(next(iter(self._items)))
        if self.maxsize == 0:
            self.budget.release(self.account, nbytes)
            return False
        self._items[key] = (value, nbytes)
        return True

    def rebudget(self, budget: MemoryBudget) -> None:
        """Charge the entries to ``budget`` instead (oldest dropped where they do not fit)."""
        entries = list(self._items.items())
        self.clear()
        self.budget = budget
        for key, (value, nbytes) in entries:
            self.put(key, value, nbytes)
