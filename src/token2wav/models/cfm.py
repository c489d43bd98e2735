"""Conditional flow matching (CosyVoice's ``CausalConditionalCFM``): Euler ODE solver with classifier-free
guidance at inference, the flow-matching regression loss for training."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .buckets import ShapeBuckets
from .kv_pool import PageTable, PooledRows

__all__ = ["CausalConditionalCFM", "CFMCache", "NOISE_FRAMES", "NOISE_CHANNELS", "fixed_noise"]

# The reference draws its fixed noise once: seed 0, then randn([1, 80, 50 * 300]) (300 s at 50 frames/s).
NOISE_CHANNELS = 80
NOISE_FRAMES = 50 * 300
_NOISE_SEED = 0
_noise_master: Tensor | None = None


def fixed_noise() -> Tensor:
    """The reference's fixed noise ``[1, 80, 15000]`` (float32, CPU), drawn from a private generator.

    Equal to ``torch.manual_seed(0); torch.randn([1, 80, 15000])`` but leaves the global RNG untouched.
    Created on first use and shared (read-only) by every CFM.
    """
    global _noise_master
    if _noise_master is None:
        gen = torch.Generator(device="cpu").manual_seed(_NOISE_SEED)
        _noise_master = torch.randn([1, NOISE_CHANNELS, NOISE_FRAMES], generator=gen)
    return _noise_master


def noise_sha256() -> str:
    return hashlib.sha256(fixed_noise().contiguous().numpy().tobytes()).hexdigest()


def _param(params: Any, name: str, default: Any) -> Any:
    # cfm_params arrives as a plain dict from our config loader, or attribute-style (DictConfig-like)
    if isinstance(params, Mapping):
        return params.get(name, default)
    return getattr(params, name, default)


@dataclass(frozen=True)
class CFMCache:
    """Estimator caches for a cached solve: one per Euler step, each over the batch of two CFG branches
    (row 0 conditional, row 1 unconditional). ``offset`` frames are covered. Immutable and shareable.

    modulations: per step, the estimator's time-only terms (``estimator.modulation``), when it has them;
    filled by the first ``solve_chunk`` and reused by every later chunk (a step's time never changes).
    paged: the keys/values live in a stream's ``PageTable`` (``models/kv_pool.py``), not in ``steps``,
    which then hold only the convolution tails; only ``solve_rows`` with that table continues it.
    """

    steps: tuple[Any, ...]
    modulations: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    paged: bool = False

    @property
    def offset(self) -> int:
        return int(self.steps[0].offset) if self.steps else 0

    @property
    def n_timesteps(self) -> int:
        return len(self.steps)


class CausalConditionalCFM(nn.Module):
    """Flow-matching decoder around an estimator (the DiT or the U-Net).

    Constructor kwargs follow the reference. ``cfm_params`` keys used: ``sigma_min``, ``t_scheduler``
    (``'cosine'`` or linear), ``training_cfg_rate``, ``inference_cfg_rate``. The initial noise for frame ``f``
    is always column ``f`` of the reference's fixed noise (``fixed_noise``), so a frame's noise does not
    depend on how the sequence was cut. Frames past 15000 (300 s, where the reference fails) reuse the
    noise modulo 15000.
    """

    def __init__(
        self,
        in_channels: int,
        cfm_params: Any,
        n_spks: int = 1,
        spk_emb_dim: int = 64,
        estimator: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = _param(cfm_params, "solver", "euler")
        self.sigma_min = float(_param(cfm_params, "sigma_min", 1e-4))
        self.t_scheduler = _param(cfm_params, "t_scheduler", "cosine")
        self.training_cfg_rate = float(_param(cfm_params, "training_cfg_rate", 0.0))
        self.inference_cfg_rate = float(_param(cfm_params, "inference_cfg_rate", 0.0))
        if self.solver != "euler":
            raise ValueError(f"cfm_params.solver must be 'euler', got {self.solver!r}")
        self.estimator = estimator
        self._noise_copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ noise / schedule
    def noise(self, start: int, stop: int, channels: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Fixed noise for absolute frames ``[start, stop)``: ``[1, channels, stop - start]``."""
        if channels > NOISE_CHANNELS:
            raise ValueError(f"the fixed noise has {NOISE_CHANNELS} channels, the model needs {channels}")
        if start < 0 or stop < start:
            raise ValueError(f"bad noise range [{start}, {stop})")
        key = (torch.device(device), dtype)
        table = self._noise_copies.get(key)
        if table is None:
            table = fixed_noise().to(device=device, dtype=dtype)
            self._noise_copies[key] = table
        if stop <= NOISE_FRAMES:
            return table[:, :channels, start:stop]
        idx = torch.arange(start, stop, device=device) % NOISE_FRAMES
        return table[:, :channels].index_select(2, idx)

    def time_span(self, n_timesteps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if not isinstance(n_timesteps, int) or isinstance(n_timesteps, bool) or n_timesteps < 1:
            raise ValueError(f"n_timesteps must be an int >= 1, got {n_timesteps!r}")
        span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
        if self.t_scheduler == "cosine":
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        return span

    # ------------------------------------------------------------------ inference
    def guided(self, raw: Tensor) -> Tensor:
        """The guided velocity from the [conditional; unconditional] estimator output."""
        cond_v, uncond_v = raw.chunk(2, dim=0)
        return (1.0 + self.inference_cfg_rate) * cond_v - self.inference_cfg_rate * uncond_v

    @staticmethod
    def guidance_pair(value: Tensor) -> Tensor:
        # conditional branch gets the value, the unconditional branch zeros
        return torch.cat([value, torch.zeros_like(value)], dim=0)

    @staticmethod
    def euler_steps(t_span: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(t, dt)`` of every Euler step over ``t_span``. The reference accumulates t by adding dt (not by
        indexing t_span) and takes the next dt as ``t_span[k + 1] - t``: kept here, with its rounding."""
        steps = []
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            steps.append((t, dt))
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return steps

    @torch.inference_mode()
    def forward(
        self,
        mu: Tensor,
        mask: Tensor,
        n_timesteps: int,
        temperature: float = 1.0,
        spks: Tensor | None = None,
        cond: Tensor | None = None,
        streaming: bool = False,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, None]:
        """Sample mel ``[1, C, T]`` for ``mu`` ``[1, C, T]`` (frames from 0). Returns ``(mel, None)`` like the
        reference. ``chunk_size`` overrides the estimator's chunk when streaming (DiT estimators only)."""
        if mu.shape[0] != 1:
            raise ValueError(f"mu must have batch 1, got {mu.shape[0]}")
        z = self.noise(0, mu.shape[2], mu.shape[1], device=mu.device, dtype=mu.dtype) * temperature
        span = self.time_span(n_timesteps, mu.device, mu.dtype)
        return self.solve_euler(z, span, mu, mask, spks, cond, streaming, chunk_size), None

    def solve_euler(
        self,
        x: Tensor,
        t_span: Tensor,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor | None,
        cond: Tensor | None,
        streaming: bool = False,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Fixed-step Euler from ``t_span[0]`` to ``t_span[-1]`` with guidance (batch of two per step)."""
        extra = {} if chunk_size is None else {"chunk_size": chunk_size}
        if cond is None:
            cond = torch.zeros_like(x)
        mask_in = torch.cat([mask, mask], dim=0)
        mu_in = self.guidance_pair(mu)
        spks_in = self.guidance_pair(spks) if spks is not None else None
        cond_in = self.guidance_pair(cond)
        for t, dt in self.euler_steps(t_span):
            x_in = torch.cat([x, x], dim=0)
            t_in = t.reshape(1).expand(2).contiguous()
            raw = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming=streaming, **extra)
            x = x + dt * self.guided(raw)
        return x.float()

    def empty_cache(self, n_timesteps: int, device: torch.device, dtype: torch.dtype) -> CFMCache:
        return CFMCache(tuple(self.estimator.empty_cache(2, device, dtype) for _ in range(n_timesteps)))

    @torch.inference_mode()
    def solve_chunk(
        self,
        mu: Tensor,
        spks: Tensor | None,
        cond: Tensor,
        *,
        cache: CFMCache,
        temperature: float = 1.0,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, CFMCache]:
        """Solve only the new frames ``[cache.offset, cache.offset + T)`` (mu, cond ``[1, C, T]``).

        Step ``k`` of the Euler loop runs the estimator's ``forward_chunk`` against ``cache.steps[k]``, which
        holds what the earlier frames produced at that step, for both guidance branches. Returns the new
        frames' mel and a new cache covering them too; ``cache`` is not modified.
        """
        if mu.shape[0] != 1:
            raise ValueError(f"mu must have batch 1, got {mu.shape[0]}")
        start, length = cache.offset, mu.shape[2]
        x = self.noise(start, start + length, mu.shape[1], device=mu.device, dtype=mu.dtype) * temperature
        span = self.time_span(cache.n_timesteps, mu.device, mu.dtype)
        mu_in = self.guidance_pair(mu)
        spks_in = self.guidance_pair(spks) if spks is not None else None
        cond_in = self.guidance_pair(cond)
        new_steps = []
        modulate = hasattr(self.estimator, "modulation")
        mods = list(cache.modulations)
        shared: dict[str, Any] = {}
        if hasattr(self.estimator, "chunk_geometry"):  # the same frames at every step: mask/rotary once
            shared["geometry"] = self.estimator.chunk_geometry(cache.steps[0].offset, length, chunk_size)
        for step, (t, dt) in enumerate(self.euler_steps(span), start=1):
            x_in = torch.cat([x, x], dim=0)
            t_in = t.reshape(1).expand(2).contiguous()
            extra = dict(shared)
            if modulate:
                if len(mods) < step:
                    mods.append(self.estimator.modulation(t_in, 2))
                extra["modulation"] = mods[step - 1]
            raw, step_cache = self.estimator.forward_chunk(
                x_in, mu_in, t_in, spks_in, cond_in, cache=cache.steps[step - 1], chunk_size=chunk_size, **extra
            )
            new_steps.append(step_cache)
            x = x + dt * self.guided(raw)
        return x.float(), CFMCache(tuple(new_steps), tuple(mods) if modulate else ())

    @torch.inference_mode()
    def solve_rows(
        self,
        mus: list[Tensor],
        spks: list[Tensor | None],
        conds: list[Tensor],
        *,
        caches: list[CFMCache],
        chunk_sizes: list[int | None],
        temperature: float = 1.0,
        tables: Sequence[PageTable] | None = None,
        buckets: ShapeBuckets | None = None,
        padded: Any = None,
    ) -> tuple[list[Tensor], list[CFMCache]]:
        """``solve_chunk`` for many streams at once: row ``i`` solves ``mus[i]`` ``[1, C, T_i]`` against
        ``caches[i]``, and gets what ``solve_chunk`` gives it alone.

        With an estimator that has ``forward_rows`` every solver step is one estimator call over the rows'
        frames packed along time (see ``models/rows.py``); otherwise the rows run one after another. All rows
        need the same number of solver steps (the same time schedule).
        tables: per row, the stream's pages in a ``KVPool`` (all in one pool): attention then reads and
        writes the pool (one gather per layer for all rows) and the returned caches are paged; a row whose
        cache still holds tensors (a voice prompt's) is moved into its table first, the prompt's full pages
        shared. buckets: the padded attention sizes (default: no padding). padded: a
        ``models.padded_solve.PaddedSolver`` for this pool: every row padded to its buckets, the whole solve in
        fixed shapes (replayed as a CUDA graph when the solver captures them).
        """
        steps = {c.n_timesteps for c in caches}
        if len(steps) != 1:
            raise ValueError(f"rows of one solve need the same n_timesteps, got {sorted(steps)}")
        est = self.estimator
        if tables is None and any(c.paged for c in caches):
            raise ValueError("a paged cache continues only with its page table (tables=...)")
        if tables is None and (not hasattr(est, "forward_rows") or len(mus) == 1):
            pairs = [
                self.solve_chunk(m, s, c, cache=k, temperature=temperature, chunk_size=n)
                for m, s, c, k, n in zip(mus, spks, conds, caches, chunk_sizes)
            ]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        from .rows import RowLayout

        ref = mus[0]
        layout = RowLayout(tuple(int(m.shape[2]) for m in mus))
        offsets = [c.offset for c in caches]
        x = torch.cat(
            [self.noise(o, o + n, ref.shape[1], device=ref.device, dtype=ref.dtype) for o, n in
             zip(offsets, layout.lengths)], dim=2,
        ) * temperature  # fmt: skip
        span = self.time_span(caches[0].n_timesteps, ref.device, ref.dtype)
        mu_cat, cond_cat = torch.cat(mus, dim=2), torch.cat(conds, dim=2)
        spk_cat = None
        if spks[0] is not None:  # the speaker of every frame
            spk_cat = torch.cat([s.unsqueeze(-1).expand(-1, -1, n) for s, n in zip(spks, layout.lengths)], dim=2)
        if tables is not None:
            if any(table.pool is not tables[0].pool for table in tables):
                raise ValueError("the rows' page tables belong to different pools")
            caches = [self._paged(c, table) for c, table in zip(caches, tables)]
            for table, o, n in zip(tables, offsets, layout.lengths):
                table.reserve(o + n)
        if padded is not None:
            if tables is None:
                raise ValueError("padded solves keep their caches in a page pool: tables=... is required")
            return self._solve_padded(padded, x, mu_cat, cond_cat, spk_cat, caches, tables, offsets, layout,
                                      chunk_sizes)  # fmt: skip
        mu_in, cond_in = self.guidance_pair(mu_cat), self.guidance_pair(cond_cat)
        spk_in = self.guidance_pair(spk_cat) if spk_cat is not None else None
        context = est.prepare_rows([c.steps[0].offset for c in caches], layout, chunk_sizes)
        kv = None
        if tables is not None:
            kv = self._pooled_rows(tables, offsets, layout, chunk_sizes, buckets)
        modulate = hasattr(est, "modulation")
        # a step's time-only terms are the same for every stream: take them from any row that has them
        mods = list(max((c.modulations for c in caches), key=len)) if modulate else []
        new_steps: list[list[Any]] = [[] for _ in mus]
        with kv.pool.reading() if kv is not None else nullcontext():
            for step, (t, dt) in enumerate(self.euler_steps(span), start=1):
                x_in = torch.cat([x, x], dim=0)
                t_in = t.reshape(1).expand(2).contiguous()
                extra: dict[str, Any] = {"t": t_in}
                if modulate:
                    if len(mods) < step:
                        mods.append(est.modulation(t_in, 2))
                    extra = {"modulation": mods[step - 1]}
                if kv is not None:
                    extra.update(kv=kv, step=step - 1)
                raw, step_caches = est.forward_rows(
                    x_in, mu_in, cond_in, spk_in, caches=[c.steps[step - 1] for c in caches], layout=layout,
                    context=context, **extra,
                )  # fmt: skip
                for row, step_cache in zip(new_steps, step_caches):
                    row.append(step_cache)
                x = x + dt * self.guided(raw)
        mels = list(layout.split(x.float(), dim=2))
        kept = tuple(mods) if modulate else ()
        return mels, [CFMCache(tuple(row), kept, paged=kv is not None) for row in new_steps]

    @staticmethod
    def _paged(cache: CFMCache, table: PageTable) -> CFMCache:
        """``cache`` with its keys/values in ``table`` (moved there when it still holds tensors)."""
        if cache.paged:
            if table.capacity < cache.offset:
                raise ValueError(f"a paged cache of {cache.offset} frames came with a table of {table.capacity}")
            return cache
        pool = table.pool
        if cache.n_timesteps != pool.steps:
            raise ValueError(f"the pool is for {pool.steps} solver steps, the cache has {cache.n_timesteps}")
        steps = cache.steps
        table.adopt(cache, cache.offset, lambda s, layer: (steps[s].keys[layer], steps[s].values[layer]))
        return CFMCache(tuple(replace(c, keys=(), values=(), stores=()) for c in steps), cache.modulations, True)

    def _pooled_rows(
        self,
        tables: Sequence[PageTable],
        offsets: list[int],
        layout: Any,
        chunk_sizes: list[int | None],
        buckets: ShapeBuckets | None,
    ) -> PooledRows:
        pool = tables[0].pool
        ends = [o + n for o, n in zip(offsets, layout.lengths)]
        sizes = (len(tables), max(layout.lengths), max(ends))
        rows, queries, keys = buckets.pad(*sizes) if buckets is not None else sizes
        return PooledRows.build(pool, tables, offsets, layout.lengths, self._chunks(chunk_sizes), rows=rows,
                                queries=queries, keys=keys)  # fmt: skip

    def _chunks(self, chunk_sizes: list[int | None]) -> list[int]:
        default = int(self.estimator.static_chunk_size)
        return [default if c is None else int(c) for c in chunk_sizes]

    def _solve_padded(
        self,
        padded: Any,
        x: Tensor,
        mu: Tensor,
        cond: Tensor,
        spk: Tensor | None,
        caches: list[CFMCache],
        tables: Sequence[PageTable],
        offsets: list[int],
        layout: Any,
        chunk_sizes: list[int | None],
    ) -> tuple[list[Tensor], list[CFMCache]]:
        if padded.cfm is not self or padded.pool is not tables[0].pool or padded.n_timesteps != caches[0].n_timesteps:
            raise ValueError("the padded solver belongs to another flow, pool or solver schedule")
        mel, steps = padded.solve(
            x, mu, cond, spk, caches=[c.steps for c in caches], tables=tables, offsets=offsets,
            lengths=layout.lengths, chunk_sizes=self._chunks(chunk_sizes),
        )  # fmt: skip
        # a DiT's caches keep the steps' time modulations (shared); a U-Net keeps none
        kept = padded.constants if hasattr(self.estimator, "modulation") else ()
        new = [CFMCache(tuple(row), kept, paged=True) for row in steps]
        return list(layout.split(mel, dim=2)), new

    # ------------------------------------------------------------------ training
    def compute_loss(
        self,
        x1: Tensor,
        mask: Tensor,
        mu: Tensor,
        spks: Tensor | None = None,
        cond: Tensor | None = None,
        chunk_size: int | None = None,
        *,
        streaming: bool | None = None,
        t_sampling: str = "uniform",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Flow-matching loss, as the reference trains.

        x1 target mel, mu, cond ``[B, C, T]``; mask ``[B, 1, T]``; spks ``[B, spk]``.
        ``t ~ U(0, 1)`` per item (``t_sampling='cosine'`` maps it through ``1 - cos(t*pi/2)``, which the
        reference did before commit 1822c5c), ``y = (1 - (1 - sigma_min) t) z + t x1``, target
        ``u = x1 - (1 - sigma_min) z``. With probability ``training_cfg_rate`` an item loses mu, spks and
        cond (trains the unconditional branch). Attention: ``chunk_size`` > 0 chunk-causal with that size,
        ``streaming=True`` without a chunk size uses the estimator's default chunk, else full attention.
        Returns ``(masked MSE, y)``.
        """
        if t_sampling not in ("uniform", "cosine"):
            raise ValueError(f"t_sampling must be 'uniform' or 'cosine', got {t_sampling!r}")
        batch = mu.shape[0]
        t = torch.rand([batch, 1, 1], device=mu.device, dtype=mu.dtype, generator=generator)
        if t_sampling == "cosine":
            t = 1 - torch.cos(t * 0.5 * math.pi)
        z = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        y = (1 - (1 - self.sigma_min) * t) * z + t * x1
        u = x1 - (1 - self.sigma_min) * z
        if cond is None:
            cond = torch.zeros_like(x1)
        if self.training_cfg_rate > 0:
            keep = torch.rand(batch, device=x1.device, generator=generator) > self.training_cfg_rate
            mu = mu * keep.view(-1, 1, 1)
            cond = cond * keep.view(-1, 1, 1)
            if spks is not None:
                spks = spks * keep.view(-1, 1)
        if chunk_size is not None and chunk_size > 0:
            pred = self.estimator(y, mask, mu, t.view(batch), spks, cond, streaming=True, chunk_size=chunk_size)
        else:
            pred = self.estimator(y, mask, mu, t.view(batch), spks, cond, streaming=bool(streaming))
        loss = F.mse_loss(pred * mask, u * mask, reduction="sum") / (torch.sum(mask) * u.shape[1])
        return loss, y
