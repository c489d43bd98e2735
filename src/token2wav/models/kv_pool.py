"""Paged key/value caches for many streams: one pool, pages handed out to streams, attention by gathering.

The batched path keeps every stream's attention keys/values in one preallocated pool per (solver steps,
estimator) instead of one growing tensor per stream and layer. A stream owns a ``PageTable``: the pages that
hold its frames, in order. Then

* a chunk writes its new keys/values into its own pages (one ``index_copy_`` per layer for all rows), so
  nothing is ever copied when a stream grows;
* attention gathers every row's keys into a padded ``[rows, capacity]`` block (one ``index_select`` per layer
  for all rows) and runs one masked attention call: each query sees its own row's keys up to the end of its
  chunk (chunk-causal), padded keys point at a zero page and are masked out, so a row's result does not
  depend on its neighbours;
* a voice prompt's full pages are shared, read-only and reference-counted, by every stream that starts from
  it; the frames after its last full page are copied into the stream's first own page;
* a finished stream's pages return to the pool at once.

Pool layout: ``[steps, layers, branches, slots, heads, dim_head]`` with ``slots = pages * page_frames``; a
layer's plane ``[branches, slots, heads, dim_head]`` is what a ``[B, T, heads, dim_head]`` projection writes.
Two pages are never handed out: page 0 stays zero (padded reads land there), page 1 takes the writes of
padding frames (``RESERVED_PAGES``).

Threads: page accounting is under a mutex. Steps that read or write the tensors hold the pool's shared lock;
growing the pool (a bigger tensor, the old pages copied once) takes it exclusively, so a step never sees the
tensors change under it. Allocate before entering a step.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVPool", "PageTable", "PoolExhaustedError", "PooledRows", "RESERVED_PAGES", "pooled_attention"]

RESERVED_PAGES = 2  # page 0: zeros, read by padding; page 1: written by padding frames


class PoolExhaustedError(RuntimeError):
    """The pool has no free page and may not grow (its ``max_pages`` is reached)."""


class _SharedLock:
    """Many readers or one writer; a waiting writer stops new readers (growth is never starved)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._writing or self._writers_waiting:
                self._cv.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cv.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cv:
                self._writing = False
                self._cv.notify_all()


@dataclass
class _SharedPrefix:
    owner: object  # kept alive so that its id() is not reused while the entry exists
    pages: list[int]


class KVPool:
    """Pages of keys and values for every (solver step, attention layer, guidance branch) of many streams.

    pages: how many pages to allocate at first (more are added, by half again, when they run out, unless
    ``max_pages`` is reached); page_frames: frames per page.
    """

    def __init__(
        self,
        *,
        steps: int,
        layers: int,
        heads: int,
        dim_head: int,
        branches: int = 2,
        page_frames: int = 16,
        pages: int = 64,
        max_pages: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if page_frames < 1:
            raise ValueError(f"page_frames must be >= 1, got {page_frames}")
        if max_pages is not None and max_pages <= RESERVED_PAGES:
            raise ValueError(f"max_pages must be > {RESERVED_PAGES} (pages 0 and 1 are reserved), got {max_pages}")
        self.steps, self.layers, self.branches = steps, layers, branches
        self.heads, self.dim_head, self.page_frames = heads, dim_head, page_frames
        self.device, self.dtype = torch.device(device), dtype
        self.max_pages = max_pages
        pages = max(RESERVED_PAGES + 1, pages if max_pages is None else min(pages, max_pages))
        self.keys = self._new_tensor(pages)
        self.values = self._new_tensor(pages)
        self.keys[:, :, :, :page_frames].zero_()
        self.values[:, :, :, :page_frames].zero_()
        self._planes: tuple[Tensor, list[list[tuple[Tensor, Tensor]]]] | None = None  # views, by planes()
        self._refs = [1] * RESERVED_PAGES + [0] * (pages - RESERVED_PAGES)  # the reserved pages are never free
        # ascending: the lowest pages go first, so a lone stream's pages tend to follow each other (see
        # PooledRows.read_run)
        self._free = list(range(RESERVED_PAGES, pages))
        self._mutex = threading.Lock()
        self._lock = _SharedLock()
        self._prefixes: dict[int, _SharedPrefix] = {}
        self.grown = 0  # how many times the tensors were reallocated

    # ------------------------------------------------------------------ sizes

    def _new_tensor(self, pages: int) -> Tensor:
        shape = (self.steps, self.layers, self.branches, pages * self.page_frames, self.heads, self.dim_head)
        return torch.empty(shape, device=self.device, dtype=self.dtype)

    @property
    def bytes_per_page(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_frame = self.steps * self.layers * self.branches * self.heads * self.dim_head * itemsize
        return 2 * per_frame * self.page_frames

    @property
    def pages_total(self) -> int:
        return len(self._refs) - RESERVED_PAGES

    @property
    def pages_free(self) -> int:
        with self._mutex:
            return len(self._free)

    def planes(self, step: int, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values ``[branches, slots, heads, dim_head]`` of one solver step and layer (call inside
        ``reading()``)."""
        planes = self._planes
        if planes is None or planes[0] is not self.keys:  # made once per pool tensor (not per layer call)
            planes = self._planes = (self.keys, [[(k, v) for k, v in zip(ks, vs)] for ks, vs in
                                                 zip(self.keys, self.values)])  # fmt: skip
        return planes[1][step][layer]

    # ------------------------------------------------------------------ pages

    def alloc(self, n: int, after: int | None = None) -> list[int]:
        """``n`` fresh pages (all or none); grows the pool when needed and allowed. after: a page the caller
        already holds; the ``n`` pages that follow it are taken when all are free (a stream's frames then
        stay one run of slots), the lowest free pages otherwise."""
        if n <= 0:
            return []
        with self._mutex:
            if len(self._free) >= n:
                return self._take(n, after)
        self._grow(n)
        with self._mutex:
            if len(self._free) < n:
                raise PoolExhaustedError(
                    f"the key/value pool is full: {n} more pages of {self.bytes_per_page / 2**20:.2f} MiB needed, "
                    f"{len(self._free)} free of {self.pages_total} (max_pages={self.max_pages})"
                )
            return self._take(n, after)

    def _take(self, n: int, after: int | None) -> list[int]:
        free = self._free
        start = 0
        if after is not None:
            i = bisect.bisect_left(free, after + 1)
            if i + n <= len(free) and free[i + n - 1] == after + n:  # sorted and distinct: a run after+1..after+n
                start = i
        pages = free[start : start + n]
        del free[start : start + n]
        for p in pages:
            self._refs[p] = 1
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; a page nobody holds is free again (and a shared prefix whose
        pages are free is forgotten, in the same step, so that nobody can be handed reused pages)."""
        with self._mutex:
            freed = set()
            for p in pages:
                if p < RESERVED_PAGES or self._refs[p] <= 0:
                    raise ValueError(f"page {p} is not held")
                self._refs[p] -= 1
                if self._refs[p] == 0:
                    bisect.insort(self._free, p)
                    freed.add(p)
            if freed:
                for key, entry in list(self._prefixes.items()):
                    if entry.pages[0] in freed:
                        del self._prefixes[key]

    def _grow(self, n: int) -> None:
        with self._lock.exclusive():
            with self._mutex:
                if len(self._free) >= n:
                    return
                old = len(self._refs)
                want = max(old + n - len(self._free), old + old // 2)
                if self.max_pages is not None:
                    want = min(want, self.max_pages)
                if want <= old:
                    return
            keys, values = self._new_tensor(want), self._new_tensor(want)
            slots = old * self.page_frames
            keys[:, :, :, :slots] = self.keys
            values[:, :, :, :slots] = self.values
            with self._mutex:
                self.keys, self.values = keys, values
                self._planes = None  # its views would keep the old tensors alive
                self._refs += [0] * (want - old)
                self._free += list(range(old, want))  # all above the free pages so far: still sorted
                self.grown += 1

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while a step reads or writes the tensors (they are never reallocated meanwhile)."""
        with self._lock.shared():
            yield

    def shared_prefix(self, owner: object, pages: int, fill: Callable[[list[int]], None]) -> list[int]:
        """The ``pages`` pages holding ``owner``'s leading frames (a voice prompt's), shared by every caller:
        the first caller allocates them and runs ``fill(pages)``; every caller holds one reference to each and
        gives it back with ``release``. The entry lives while anyone holds it."""
        key = id(owner)
        with self._mutex:
            entry = self._prefixes.get(key)
            if entry is not None and entry.owner is owner and len(entry.pages) == pages:
                for p in entry.pages:
                    self._refs[p] += 1
                return list(entry.pages)
        got = self.alloc(pages)
        try:
            with self.reading():
                fill(got)
        except BaseException:
            self.release(got)
            raise
        with self._mutex:
            if key not in self._prefixes:
                self._prefixes[key] = _SharedPrefix(owner, list(got))
            # else another caller registered the same prefix meanwhile: keep ours private, it is as valid
        return got

    # ------------------------------------------------------------------ copying a cache in

    def write_frames(self, pages: Sequence[int], first: int, step_layers: Callable[[int, int], tuple[Tensor, Tensor]],
                     start: int, stop: int) -> None:
        """Write frames ``[start, stop)`` of a tensor cache into ``pages`` (whose first slot is frame ``first``):
        ``step_layers(step, layer)`` gives that cache's keys and values ``[branches, heads, frames, dim_head]``.
        Call inside ``reading()``."""
        if stop <= start:
            return
        slots = _slots(pages, self.page_frames, start - first, stop - first).to(self.device)
        for s in range(self.steps):
            for layer in range(self.layers):
                k, v = step_layers(s, layer)
                pk, pv = self.planes(s, layer)
                pk.index_copy_(1, slots, k[:, :, start:stop].transpose(1, 2).to(self.dtype))
                pv.index_copy_(1, slots, v[:, :, start:stop].transpose(1, 2).to(self.dtype))


def _slots(pages: Sequence[int], page_frames: int, start: int, stop: int) -> Tensor:
    """Slot ids of frames ``[start, stop)`` of a stream whose frame 0 is slot 0 of ``pages[0]``."""
    pos = np.arange(start, stop)
    table = np.asarray(pages, dtype=np.int64)
    return torch.from_numpy(table[pos // page_frames] * page_frames + pos % page_frames)


class PageTable:
    """One stream's pages in a ``KVPool``: frame ``f`` lives in slot ``f % page_frames`` of ``pages[f //
    page_frames]``. The leading ``shared`` pages may be a voice prompt's, shared with other streams and never
    written. Owned by one session; ``release()`` gives every page back."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.pages: list[int] = []
        self.shared = 0

    @property
    def capacity(self) -> int:
        return len(self.pages) * self.pool.page_frames

    def reserve(self, frames: int) -> None:
        """Own enough pages for ``frames`` frames."""
        need = -(-frames // self.pool.page_frames) - len(self.pages)
        if need > 0:
            self.pages += self.pool.alloc(need, after=self.pages[-1] if self.pages else None)

    def slots(self, start: int, stop: int) -> Tensor:
        if stop > self.capacity:
            raise ValueError(f"frames up to {stop} asked, the table holds {self.capacity}")
        return _slots(self.pages, self.pool.page_frames, start, stop)

    def adopt(self, owner: object, frames: int, step_layers: Callable[[int, int], tuple[Tensor, Tensor]]) -> None:
        """Start from a tensor cache of ``frames`` frames (``step_layers`` as in ``KVPool.write_frames``):
        its full pages are shared through the pool under ``owner`` (the cache every stream of a prompt
        starts from), the rest is copied into a page of this table's own. Replaces what the table held."""
        self.release()
        pool = self.pool
        full = frames // pool.page_frames
        if full:
            self.pages = list(pool.shared_prefix(
                owner, full, lambda got: pool.write_frames(got, 0, step_layers, 0, full * pool.page_frames)
            ))
            self.shared = full
        self.reserve(frames)
        with pool.reading():
            done = full * pool.page_frames
            pool.write_frames(self.pages[full:], done, step_layers, done, frames)

    def release(self) -> None:
        pages, self.pages, self.shared = self.pages, [], 0
        if pages:
            self.pool.release(pages)


@dataclass(frozen=True)
class PooledRows:
    """Where a batched call's rows read and write in the pool (the same for every solver step and layer).

    Packed layout (rows' new frames one after another, ``S`` in all): write_index ``[S]``, the slot of every
    new frame; query_index ``[R * queries]``, per row the packed positions of its new frames (padding repeats
    position 0); out_index ``[S]``, where each frame's result sits in the padded ``[R * queries]`` output.
    Padded layout (row ``r``'s frames at ``[r * queries, r * queries + n_r)``, the rest padding): write_index
    ``[R * queries]`` (padding frames write to the padding page), no query_index / out_index.
    read_index ``[R * keys]``: per (padded) row, the slots of its keys, padded with the zero page. mask
    ``[2R, 1, queries, keys]`` (additive: 0 where a query sees a key, -inf elsewhere; per guidance branch and
    row). One unpadded row keeps its frames in place: no query_index / out_index, and no mask when each of its
    queries sees all its keys. read_run: ``(first slot, keys)`` when the call is one unpadded row whose keys are
    one run of slots; attention then reads them in place, a view, instead of gathering a copy of the row's whole
    history on every layer and solver step (what a lone stream pays otherwise).
    """

    pool: KVPool
    rows: int
    queries: int
    keys: int
    write_index: Tensor
    read_index: Tensor
    query_index: Tensor | None
    out_index: Tensor | None
    mask: Tensor | None
    read_run: tuple[int, int] | None = None

    @classmethod
    def build(
        cls,
        pool: KVPool,
        tables: Sequence[PageTable],
        offsets: Sequence[int],
        lengths: Sequence[int],
        chunk_sizes: Sequence[int],
        *,
        rows: int,
        queries: int,
        keys: int,
        padded: bool = False,
    ) -> PooledRows:
        """Rows ``i`` add frames ``[offsets[i], offsets[i] + lengths[i])`` to ``tables[i]``, with chunk-causal
        attention of ``chunk_sizes[i]`` frames (``<= 0``: every new frame sees all keys up to the row's last).
        ``rows``, ``queries``, ``keys``: the padded sizes (at least the real ones); padded: the layout of
        the frames (see the class docstring)."""
        real = len(tables)
        if rows < real or queries < max(lengths) or keys < max(o + n for o, n in zip(offsets, lengths)):
            raise ValueError("padded sizes smaller than the rows they hold")
        pf = pool.page_frames
        # padding frames write to the padding page (page 1), each to its own slot where it can
        write_all = (pf + torch.arange(rows * queries) % pf).view(rows, queries) if padded else None
        write, out = [], []
        read_all = torch.zeros(rows, keys, dtype=torch.long)
        query_all = torch.zeros(rows, queries, dtype=torch.long)
        vis = torch.ones(rows, queries, dtype=torch.long)  # how many keys each query sees (padding: key 0)
        packed = 0
        for i, (table, o, n, chunk) in enumerate(zip(tables, offsets, lengths, chunk_sizes)):
            total = o + n
            if padded:
                write_all[i, :n] = table.slots(o, total)
            else:
                write.append(table.slots(o, total))
                query_all[i, :n] = torch.arange(packed, packed + n)
                out.append(torch.arange(i * queries, i * queries + n))
            read_all[i, :total] = table.slots(0, total)
            pos = torch.arange(o, total)
            vis[i, :n] = torch.clamp((pos // chunk + 1) * chunk, max=total) if chunk > 0 else total
            packed += n
        read_run = None
        if not padded and real == rows == 1 and keys == offsets[0] + lengths[0]:
            first = int(read_all[0, 0])
            if torch.equal(read_all[0], torch.arange(first, first + keys)):
                read_run = (first, keys)
        seen = torch.arange(keys).view(1, 1, keys) < vis.unsqueeze(-1)
        # additive (0 / -inf) in the pool's dtype, made once per call: a bool mask would be converted by every
        # layer's attention call
        mask = torch.zeros(seen.shape, dtype=pool.dtype).masked_fill_(~seen, float("-inf"))
        device = pool.device
        # one unpadded row: its frames are already in place (the gathers would be copies in the same order), and
        # when every query sees every key (the chunk lies in one attention chunk) adding a zero mask changes nothing
        alone = not padded and real == rows == 1 and queries == lengths[0]
        return cls(
            pool=pool,
            rows=rows,
            queries=queries,
            keys=keys,
            write_index=(write_all.view(-1) if padded else torch.cat(write)).to(device),
            read_index=read_all.view(-1).to(device),
            query_index=None if padded or alone else query_all.view(-1).to(device),
            out_index=None if padded or alone else torch.cat(out).to(device),
            mask=None if alone and bool(seen.all()) else mask.unsqueeze(1).repeat(pool.branches, 1, 1, 1).to(device),
            read_run=read_run,
        )

    def copy_(self, other: PooledRows) -> None:
        """Take ``other``'s indices and mask into these tensors (same sizes): static buffers for a replay."""
        if other.read_run is not None:
            raise ValueError("a layout that reads its keys in place cannot be replayed through index buffers; "
                             "build it padded")
        for name in ("write_index", "read_index", "query_index", "out_index", "mask"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if (mine is None) != (theirs is None):
                raise ValueError(f"{name}: layouts differ")
            if mine is not None:
                mine.copy_(theirs)


def pooled_attention(q: Tensor, k: Tensor, v: Tensor, rows: PooledRows, step: int, layer: int) -> Tensor:
    """Attention of rows against their paged caches: q, k, v ``[B, H, S, d]`` for the rows' new frames in the
    layout of ``rows`` (views of ``[B, S, H, d]`` projections); writes k, v into the pool, returns the output
    ``[B, H, S, d]``."""
    pk, pv = rows.pool.planes(step, layer)
    branches, heads, _, width = q.shape
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if k.dtype != pk.dtype:
        k, v = k.to(pk.dtype), v.to(pv.dtype)
    pk.index_copy_(1, rows.write_index, k)
    pv.index_copy_(1, rows.write_index, v)
    r, nq, nk = rows.rows, rows.queries, rows.keys

    def per_row(frames: Tensor, length: int) -> Tensor:
        # [B, R * length, H, d] -> [B * R, H, length, d] (views only)
        return frames.reshape(branches * r, length, heads, width).transpose(1, 2)

    queries = q.transpose(1, 2)  # [B, S, H, d]
    if rows.query_index is not None:  # packed layout: gather each row's frames into its padded place
        queries = queries.index_select(1, rows.query_index)
    if rows.read_run is not None:
        first, count = rows.read_run
        keys, values = pk.narrow(1, first, count), pv.narrow(1, first, count)
    else:
        keys, values = pk.index_select(1, rows.read_index), pv.index_select(1, rows.read_index)
    out = F.scaled_dot_product_attention(
        per_row(queries, nq), per_row(keys, nk), per_row(values, nk), attn_mask=rows.mask
    )
    # [B * R, H, queries, d] -> [B, R * queries, H, d] -> (the packed frames) -> [B, H, S, d]
    out = out.transpose(1, 2).reshape(branches, r * nq, heads, width)
    if rows.out_index is not None:
        out = out.index_select(1, rows.out_index)
    return out.transpose(1, 2)
