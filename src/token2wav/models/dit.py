"""CosyVoice 3 flow estimator: a diffusion transformer (DiT) over mel frames.

Module and parameter names follow the reference (``cosyvoice/flow/DiT``) so its state dict loads strictly.
Two entry points share every layer:

* ``DiT.forward`` runs a whole (padded) batch, full or chunk-causal attention, as the reference does.
* ``DiT.forward_chunk`` runs only new frames against a ``DiTCache`` holding everything the earlier frames
  contribute (per-layer keys/values and the causal position-conv tails). With chunk-causal attention and
  the cached frames ending on the chunk grid, it gives the rows of the full forward for those frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from token2wav.masks import add_chunk_mask, make_chunk_mask
from token2wav.models.kv_pool import PooledRows, pooled_attention
from token2wav.models.kv_store import PastKV, RowStore, extend_kv
from token2wav.models.rows import (
    RowLayout,
    packed_attention,
    packed_causal_conv,
    padded_causal_conv,
    padded_rows,
    unpadded_rows,
)

__all__ = ["ChunkGeometry", "DiT", "DiTCache", "RowsGeometry", "TimeModulation"]

_LN_EPS = 1e-6


@dataclass(frozen=True)
class DiTCache:
    """What frames ``[0, offset)`` leave behind for later frames, for one batch (e.g. the two CFG branches).

    keys/values: per transformer block, ``[B, heads, offset, dim_head]``; keys already carry the rotary
    rotation of their absolute positions. pos_tail1/pos_tail2: ``[B, dim, kernel - 1]``, the last inputs of
    the two causal position convolutions (zeros before position 0, like the reference's left padding).
    Immutable in effect: ``forward_chunk`` never changes what these tensors show, so one cache (e.g. a voice
    prompt's) can back many sessions at once. stores: per block, the ``RowStore`` behind keys and values
    (``()`` when unknown); it only lets the next chunk append without copying the earlier rows.
    """

    offset: int
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    pos_tail1: Tensor
    pos_tail2: Tensor
    stores: tuple[tuple[RowStore | None, RowStore | None], ...] = field(default=(), compare=False, repr=False)

    @property
    def batch_size(self) -> int:
        return self.pos_tail1.shape[0]


@dataclass(frozen=True)
class TimeModulation:
    """What the estimator derives from the solver time alone, for one batch: per block the six AdaLN-Zero
    vectors, and the output norm's scale and shift (each ``[B, 1, dim]``, scales as ``1 + scale``).

    In a cached solve every chunk meets the same times (step k of the schedule), so the solver computes these
    once per step and passes them to every chunk. That saves the modulation matmuls (about 40 % of the
    full-size DiT's weights) on every chunk after the first.
    """

    blocks: tuple[tuple[Tensor, ...], ...]
    final: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ChunkGeometry:
    """What depends only on where new frames sit: ``[offset, offset + length)`` against keys ``[0, offset +
    length)``. The attention mask (None when every new frame sees every key, as for one chunk-aligned chunk)
    and the rotary cos/sin. The solver's steps all decode the same frames, so it builds this once per chunk."""

    offset: int
    length: int
    chunk_size: int
    mask: Tensor | None
    cos: Tensor
    sin: Tensor


@dataclass(frozen=True)
class RowsGeometry:
    """``ChunkGeometry`` of every row of a packed call, with the rotary terms packed like the frames and the
    positions of the rows' frames in a packed causal convolution's output."""

    rows: tuple[ChunkGeometry, ...]
    cos: Tensor
    sin: Tensor
    conv_index: Tensor
    tail_index: Tensor | None


def _sinusoidal(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """``[B]`` times -> ``[B, dim]`` features: sines then cosines of geometrically spaced frequencies."""
    half = dim // 2
    rate = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -rate)
    # same operation order as the reference so the float32 rounding matches
    args = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_embed_dim: int = 256) -> None:
        super().__init__()
        self.freq_embed_dim = freq_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        feats = _sinusoidal(t, self.freq_embed_dim).to(t.dtype)
        return self.time_mlp(feats)


class CausalConvPositionEmbedding(nn.Module):
    """Two causal grouped convolutions with Mish; the embedding added to the projected input."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())

    def forward(self, x: Tensor, tail1: Tensor, tail2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x ``[B, T, D]`` new frames; tails ``[B, D, kernel-1]`` the inputs just before them.

        Returns the embedding ``[B, T, D]`` and the two new tails.
        """
        keep = self.kernel_size - 1
        seq1 = torch.cat([tail1, x.transpose(1, 2)], dim=2)
        hid = self.conv1(seq1)
        seq2 = torch.cat([tail2, hid], dim=2)
        out = self.conv2(seq2)
        return out.transpose(1, 2), seq1[:, :, seq1.shape[2] - keep :], seq2[:, :, seq2.shape[2] - keep :]


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, text_dim: int, out_dim: int, spk_dim: int | None = None) -> None:
        super().__init__()
        self.spk_dim = 0 if spk_dim is None else spk_dim
        self.proj = nn.Linear(mel_dim * 2 + text_dim + self.spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim=out_dim)

    def forward(
        self, x: Tensor, cond: Tensor, mu: Tensor, spks: Tensor | None, tail1: Tensor, tail2: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        parts = [x, cond, mu]
        if self.spk_dim > 0:
            if spks is None:
                raise ValueError("spks is required: the estimator was built with spk_dim > 0")
            parts.append(spks.unsqueeze(1).expand(-1, x.shape[1], -1))
        h = self.proj(torch.cat(parts, dim=-1))
        pos, tail1, tail2 = self.conv_pos_embed(h, tail1, tail2)
        return pos + h, tail1, tail2


class RotaryEmbedding(nn.Module):
    """Rotary position frequencies in the x-transformers layout.

    ``inv_freq[i] = base ** (-2i / dim)``; each frequency covers an adjacent channel pair ``(2i, 2i + 1)``
    (interleaved, not split halves). ``inv_freq`` is a persistent buffer because the checkpoint holds it.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def angles(self, start: int, length: int) -> Tensor:
        """``[length, dim]`` rotation angles for absolute positions ``[start, start + length)``."""
        return self.angles_at(torch.arange(start, start + length, device=self.inv_freq.device))

    def angles_at(self, positions: Tensor) -> Tensor:
        """``[N, dim]`` rotation angles for absolute positions ``[N]`` (integers)."""
        pos = positions.to(self.inv_freq.device, self.inv_freq.dtype)
        freqs = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0)
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)


def rotary_terms(angles: Tensor) -> tuple[Tensor, Tensor]:
    """The rotation of ``angles`` ``[T, rot]`` as the factors ``(cos, sin)`` of ``_apply_rotary``, each
    ``[T, rot]``: sin carries the pair's sign (``-sin`` on each pair's first channel, ``+sin`` on its second)."""
    sign = torch.tensor([-1.0, 1.0], dtype=angles.dtype, device=angles.device).repeat(angles.shape[-1] // 2)
    return angles.cos(), angles.sin() * sign


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` ``[B, T, inner]`` pairwise by the factors of
    ``rotary_terms``; keep the rest.

    The reference rotates *before* splitting into heads, so only the first head's channels turn. A turned pair
    ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``: the same products and sum as the reference's
    ``stack((-b, a))`` form (negating a factor is exact), in five kernels instead of twelve, one of them over
    the full width (the copy that joins the rest).
    """
    rot = cos.shape[-1]
    head = x[..., :rot]
    swapped = head.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.cat((head * cos + swapped * sin, x[..., rot:]), dim=-1)


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)

    def modulation(self, emb: Tensor) -> tuple[Tensor, ...]:
        """``(shift_a, 1 + scale_a, gate_a, shift_f, 1 + scale_f, gate_f)``, each ``[B, 1, dim]``: a function of
        time only, in the form the blocks use (computed once per solver step, not once per block call)."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.linear(self.silu(emb)).unsqueeze(1).chunk(6, dim=2)
        return shift_a, 1 + scale_a, gate_a, shift_f, 1 + scale_f, gate_f

    @staticmethod
    def apply(x: Tensor, mod: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod
        normed = F.layer_norm(x, (x.shape[-1],), eps=_LN_EPS)
        return normed * scale_a + shift_a, gate_a, shift_f, scale_f, gate_f

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.apply(x, self.modulation(emb))


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)

    def modulation(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 + scale, shift)``, each ``[B, 1, dim]``."""
        scale, shift = self.linear(self.silu(emb)).unsqueeze(1).chunk(2, dim=2)
        return 1 + scale, shift

    @staticmethod
    def apply(x: Tensor, mod: tuple[Tensor, Tensor]) -> Tensor:
        scale, shift = mod
        normed = F.layer_norm(x, (x.shape[-1],), eps=_LN_EPS)
        return normed * scale + shift

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.apply(x, self.modulation(emb))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Dropout(dropout),
            nn.Linear(inner, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        expand, dropout, project = self.ff
        h = expand(x)
        return project(dropout(h) if self.training else h)  # an eval-mode dropout would still be a kernel call


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: PastKV | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[RowStore | None, RowStore | None]]:
        """x ``[B, T, dim]`` (new frames); mask bool, broadcastable to ``[B, heads, T, past + T]``, or None.

        past: cached keys, values ``[B, heads, past, dim_head]`` and their stores, or None.
        Returns the projected output, the full keys/values ``[B, heads, past + T, dim_head]`` and their stores.
        """
        q, k, v = self.project(x, cos, sin)
        k, v, stores = extend_kv(k, v, past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self.output(out), k, v, stores

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries and keys, and values, ``[B, heads, T, dim_head]`` each, for frames ``x`` ``[B, T, dim]``."""
        batch, length, _ = x.shape
        q = _apply_rotary(self.to_q(x), cos, sin)
        k = _apply_rotary(self.to_k(x), cos, sin)
        v = self.to_v(x)
        return tuple(z.view(batch, length, self.heads, self.dim_head).transpose(1, 2) for z in (q, k, v))

    def output(self, attended: Tensor) -> Tensor:
        """``[B, heads, T, dim_head]`` attention result -> ``[B, T, dim]``."""
        batch, _, length, _ = attended.shape
        out = attended.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)
        out = self.to_out[0](out)
        return self.to_out[1](out) if self.training else out


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=_LN_EPS)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=dropout)

    def forward(
        self,
        x: Tensor,
        mod: tuple[Tensor, ...],
        mask: Tensor,
        row_valid: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        past: PastKV | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[RowStore | None, RowStore | None]]:
        """mod: this block's ``attn_norm.modulation`` of the time embedding."""
        normed, gate_a, shift_f, scale_f, gate_f = self.attn_norm.apply(x, mod)
        attn, k, v, stores = self.attn(normed, mask, cos, sin, past)
        if row_valid is not None:
            # padded query rows attend to something arbitrary; zero them like the reference
            attn = attn.masked_fill(~row_valid.unsqueeze(-1), 0.0)
        return self._feed_forward(x, attn, gate_a, shift_f, scale_f, gate_f), k, v, stores

    def _feed_forward(
        self, x: Tensor, attn: Tensor, gate_a: Tensor, shift_f: Tensor, scale_f: Tensor, gate_f: Tensor
    ) -> Tensor:
        x = x + gate_a * attn
        ff_in = self.ff_norm(x) * scale_f + shift_f
        return x + gate_f * self.ff(ff_in)

    def forward_rows(
        self,
        x: Tensor,
        mod: tuple[Tensor, ...],
        cos: Tensor,
        sin: Tensor,
        pasts: list[PastKV],
        masks: list[Tensor | None],
        layout: RowLayout,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[tuple[RowStore | None, RowStore | None]]]:
        """``forward`` for packed rows (see ``models/rows.py``): each row attends to its own cache."""
        normed, gate_a, shift_f, scale_f, gate_f = self.attn_norm.apply(x, mod)
        q, k, v = self.attn.project(normed, cos, sin)
        attended, keys, values, stores = packed_attention(q, k, v, pasts, masks, layout)
        attn = self.attn.output(attended)
        return self._feed_forward(x, attn, gate_a, shift_f, scale_f, gate_f), keys, values, stores

    def forward_pooled(
        self, x: Tensor, mod: tuple[Tensor, ...], cos: Tensor, sin: Tensor, kv: PooledRows, step: int, layer: int
    ) -> Tensor:
        """``forward_rows`` with the rows' caches in a page pool (see ``models/kv_pool.py``)."""
        normed, gate_a, shift_f, scale_f, gate_f = self.attn_norm.apply(x, mod)
        q, k, v = self.attn.project(normed, cos, sin)
        attn = self.attn.output(pooled_attention(q, k, v, kv, step, layer))
        return self._feed_forward(x, attn, gate_a, shift_f, scale_f, gate_f)


class DiT(nn.Module):
    """Velocity estimator ``(x, mask, mu, t, spks, cond) -> dx/dt``, all mel tensors ``[B, C, T]``.

    Constructor kwargs are the reference's. ``dropout`` applies in training only. ``num_decoding_left_chunks``
    is stored but, as in the reference, attention always sees all left chunks. ``out_channels`` is stored
    only: the output has ``mel_dim`` channels.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        ff_mult: float = 4,
        mel_dim: int = 80,
        mu_dim: int | None = None,
        long_skip_connection: bool = False,
        spk_dim: int | None = None,
        out_channels: int | None = None,
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ) -> None:
        super().__init__()
        if mu_dim is None:
            mu_dim = mel_dim
        self.time_embed = TimestepEmbedding(dim)
        self.input_embed = InputEmbedding(mel_dim, mu_dim, dim, spk_dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.mel_dim = mel_dim
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim, heads, dim_head, ff_mult=ff_mult, dropout=dropout) for _ in range(depth)]
        )
        self.long_skip_connection = nn.Linear(dim * 2, dim, bias=False) if long_skip_connection else None
        self.norm_out = AdaLayerNormZeroFinal(dim)
        self.proj_out = nn.Linear(dim, mel_dim)
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size
        self.num_decoding_left_chunks = num_decoding_left_chunks

    # ------------------------------------------------------------------ helpers
    def kv_layout(self) -> tuple[int, int, int]:
        """Attention layers, heads and head width: the shape of one frame's keys (or values) per branch."""
        return self.depth, self.heads, self.dim_head

    def _chunk(self, chunk_size: int | None) -> int:
        if chunk_size is None:
            return int(self.static_chunk_size)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        return chunk_size

    def _time(self, t: Tensor, batch: int) -> Tensor:
        if t.dim() == 0:
            t = t.repeat(batch)
        return self.time_embed(t)

    def modulation(self, t: Tensor, batch: int) -> TimeModulation:
        """The time-only part of the forward pass for times ``t`` (``[batch]`` or 0-d)."""
        temb = self._time(t, batch)
        return TimeModulation(
            tuple(block.attn_norm.modulation(temb) for block in self.transformer_blocks),
            self.norm_out.modulation(temb),
        )

    def chunk_geometry(self, offset: int, length: int, chunk_size: int | None = None) -> ChunkGeometry:
        """Mask and rotary terms for new frames ``[offset, offset + length)`` (see ``forward_chunk``)."""
        chunk = self._chunk(chunk_size)
        device = self.rotary_embed.inv_freq.device
        end_of_first = (offset // chunk + 1) * chunk if chunk > 0 else offset + length
        mask = None
        if end_of_first < offset + length:  # the new frames span chunks: later chunks stay hidden from earlier
            mask = make_chunk_mask(length, chunk, -1, offset=offset, device=device)
        cos, sin = rotary_terms(self.rotary_embed.angles(offset, length))
        return ChunkGeometry(offset, length, chunk, mask, cos, sin)

    def _trunk(
        self,
        h: Tensor,
        mod: TimeModulation,
        mask: Tensor | None,
        row_valid: Tensor | None,
        offset: int,
        cache: DiTCache | None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, DiTCache | None]:
        """Blocks and output head; with a cache, also the cache's keys/values extended by these frames."""
        if rotary is None:
            rotary = rotary_terms(self.rotary_embed.angles(offset, h.shape[1]))
        cos, sin = rotary
        residual = h
        keys, values, stores = [], [], []
        for i, block in enumerate(self.transformer_blocks):
            past = None
            if cache is not None:
                k_store, v_store = cache.stores[i] if cache.stores else (None, None)
                past = (cache.keys[i], cache.values[i], k_store, v_store)
            h, k, v, layer_stores = block(h, mod.blocks[i], mask, row_valid, cos, sin, past)
            keys.append(k)
            values.append(v)
            stores.append(layer_stores)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        h = self.norm_out.apply(h, mod.final)
        out = self.proj_out(h).transpose(1, 2)
        if cache is None:
            return out, None
        new = DiTCache(offset + residual.shape[1], tuple(keys), tuple(values), cache.pos_tail1, cache.pos_tail2,
                       tuple(stores))  # fmt: skip
        return out, new

    # ------------------------------------------------------------------ API
    def empty_cache(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DiTCache:
        """The cache of zero frames (what ``forward_chunk`` starts from at position 0)."""
        ref = self.proj_out.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        keep = self.input_embed.conv_pos_embed.kernel_size - 1
        kv = torch.zeros(batch, self.heads, 0, self.dim_head, device=device, dtype=dtype)
        tail = torch.zeros(batch, self.dim, keep, device=device, dtype=dtype)
        return DiTCache(0, (kv,) * self.depth, (kv,) * self.depth, tail, tail)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor | None = None,
        cond: Tensor | None = None,
        streaming: bool = False,
        chunk_size: int | None = None,
    ) -> Tensor:
        """x, mu, cond ``[B, C, T]``; mask ``[B, 1, T]`` (1 = valid); t ``[B]`` or 0-d; spks ``[B, spk_dim]``.

        streaming: chunk-causal attention with ``chunk_size`` frames (default ``static_chunk_size``);
        otherwise full attention over the valid frames. Returns ``[B, mel_dim, T]``.
        """
        batch, _, length = x.shape
        if cond is None:
            cond = torch.zeros_like(x)
        mod = self.modulation(t, batch)
        empty = self.empty_cache(batch, x.device, x.dtype)
        h, _, _ = self.input_embed(
            x.transpose(1, 2),
            cond.transpose(1, 2),
            mu.transpose(1, 2),
            spks,
            empty.pos_tail1,
            empty.pos_tail2,
        )
        valid = mask.bool()
        chunk = self._chunk(chunk_size) if streaming else 0
        attn_mask = add_chunk_mask(valid, chunk, -1)
        if attn_mask.shape[1] == 1:
            attn_mask = attn_mask.expand(batch, length, length)
        row_valid = valid[:, 0, :]
        out, _ = self._trunk(h, mod, attn_mask.unsqueeze(1), row_valid, 0, None)
        return out

    def forward_chunk(
        self,
        x: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor | None,
        cond: Tensor,
        *,
        cache: DiTCache,
        chunk_size: int | None = None,
        modulation: TimeModulation | None = None,
        geometry: ChunkGeometry | None = None,
    ) -> tuple[Tensor, DiTCache]:
        """Estimate the velocity of the new frames ``[cache.offset, cache.offset + T)`` only.

        x, mu, cond ``[B, C, T]`` cover just the new frames (no padding); the cache holds every earlier frame
        of the same batch. The new rows use the chunk-causal mask on the absolute grid (``chunk_size``,
        default ``static_chunk_size``; ``<= 0`` lets every new frame see all new frames). The result equals
        the matching rows of ``forward(..., streaming=True)`` over the whole sequence whenever
        ``cache.offset`` is a multiple of the chunk size (earlier chunks never see later frames).
        modulation: ``self.modulation(t, B)`` computed once by the caller (then ``t`` is not used);
        geometry: ``self.chunk_geometry(cache.offset, T, chunk_size)``, likewise.
        Returns ``(velocity [B, mel_dim, T], cache covering offset + T frames)``; ``cache`` is not modified.
        """
        batch, _, length = x.shape
        if cache.batch_size != batch:
            raise ValueError(f"cache holds batch {cache.batch_size}, inputs have batch {batch}")
        if len(cache.keys) != self.depth:
            raise ValueError(f"cache has {len(cache.keys)} layers, the estimator has {self.depth}")
        mod = self.modulation(t, batch) if modulation is None else modulation
        h, tail1, tail2 = self.input_embed(
            x.transpose(1, 2),
            cond.transpose(1, 2),
            mu.transpose(1, 2),
            spks,
            cache.pos_tail1,
            cache.pos_tail2,
        )
        if geometry is None:
            geometry = self.chunk_geometry(cache.offset, length, chunk_size)
        elif (geometry.offset, geometry.length, geometry.chunk_size) != (cache.offset, length,
                                                                        self._chunk(chunk_size)):
            raise ValueError(f"geometry is for frames {geometry.offset}+{geometry.length} (chunk "
                             f"{geometry.chunk_size}), the call is for {cache.offset}+{length}")
        out, extended = self._trunk(h, mod, geometry.mask, None, cache.offset, cache, (geometry.cos, geometry.sin))
        return out, replace(extended, pos_tail1=tail1, pos_tail2=tail2)

    def _project_frames(self, x: Tensor, mu: Tensor, cond: Tensor, spk: Tensor | None) -> Tensor:
        """The input projection of frames given channel-first with a per-frame speaker: ``[B, T, dim]``."""
        parts = [x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2)]
        if self.input_embed.spk_dim > 0:
            if spk is None:
                raise ValueError("spk is required: the estimator was built with spk_dim > 0")
            parts.append(spk.transpose(1, 2))
        return self.input_embed.proj(torch.cat(parts, dim=-1))

    # ------------------------------------------------------------------ padded rows (static shapes)
    # ------------------------------------------------------------------ padded rows (fixed shapes)
    # ``models/padded_solve.FixedShapeEstimator``: what a graph-captured solve needs
    def padded_constants(self, t: Tensor) -> TimeModulation:
        return self.modulation(t, 2)

    def padded_terms(self, positions: Tensor) -> dict[str, Tensor]:
        """The rotary terms of every padded frame."""
        angles = self.rotary_embed.angles_at(positions.to(self.rotary_embed.inv_freq.device))
        cos, sin = rotary_terms(angles)
        return {"cos": cos, "sin": sin}

    @staticmethod
    def padded_tails(cache: DiTCache) -> tuple[Tensor, ...]:
        return cache.pos_tail1, cache.pos_tail2

    @staticmethod
    def padded_advance(cache: DiTCache, frames: int, chunk_size: int, tails: Sequence[Tensor]) -> DiTCache:
        return replace(cache, offset=cache.offset + frames, pos_tail1=tails[0], pos_tail2=tails[1])

    def forward_padded(
        self,
        x: Tensor,
        mu: Tensor,
        cond: Tensor,
        spk: Tensor | None,
        *,
        tails: Sequence[Tensor],
        ends: Tensor,
        kv: PooledRows,
        step: int,
        constants: TimeModulation,
        cos: Tensor,
        sin: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``forward_rows`` with every shape fixed by ``kv``'s padded sizes; tails: the two position
        convolutions'."""
        batch, rows = x.shape[0], kv.rows
        h = self._project_frames(x, mu, cond, spk)  # [B, R * Q, dim]
        pos_conv = self.input_embed.conv_pos_embed
        # each row a batch entry of the position convolutions, continuing from its own tails
        y1, new1 = padded_causal_conv(pos_conv.conv1, padded_rows(h.transpose(1, 2), rows), tails[0], ends)
        pos, new2 = padded_causal_conv(pos_conv.conv2, y1, tails[1], ends)
        h = unpadded_rows(pos, batch).transpose(1, 2) + h
        residual = h
        for i, block in enumerate(self.transformer_blocks):
            h = block.forward_pooled(h, constants.blocks[i], cos, sin, kv, step, i)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        h = self.norm_out.apply(h, constants.final)
        return self.proj_out(h).transpose(1, 2), (new1, new2)

    # ------------------------------------------------------------------ packed rows (many streams, one call)
    def prepare_rows(self, offsets: list[int], layout: RowLayout, chunk_sizes: list[int | None]) -> RowsGeometry:
        """What every solver step of a packed call shares: per-row geometry, packed rotary terms, conv index."""
        geoms = [self.chunk_geometry(o, n, c) for o, n, c in zip(offsets, layout.lengths, chunk_sizes)]
        device = self.rotary_embed.inv_freq.device
        history = self.input_embed.conv_pos_embed.kernel_size - 1
        return RowsGeometry(
            rows=tuple(geoms),
            cos=torch.cat([g.cos for g in geoms]),
            sin=torch.cat([g.sin for g in geoms]),
            conv_index=layout.conv_index(history, device),
            tail_index=layout.tail_index(history, device),
        )

    def forward_rows(
        self,
        x: Tensor,
        mu: Tensor,
        cond: Tensor,
        spk: Tensor | None,
        *,
        caches: list[DiTCache],
        layout: RowLayout,
        context: RowsGeometry,
        modulation: TimeModulation,
        kv: PooledRows | None = None,
        step: int = 0,
    ) -> tuple[Tensor, list[DiTCache]]:
        """``forward_chunk`` of many streams in one call, their new frames packed along time.

        x, mu, cond ``[B, C, S]`` and spk ``[B, spk_dim, S]`` (the speaker per frame) hold row ``i``'s frames
        at ``layout``'s span ``i``; ``caches[i]`` is row ``i``'s cache (batch ``B``, the guidance branches).
        Every row gives what ``forward_chunk`` gives it alone; ``context`` is ``prepare_rows(...)``.
        kv: where the rows' keys/values live in a page pool, at solver ``step`` (the caches then hold none).
        Returns the packed velocity ``[B, mel_dim, S]`` and each row's new cache.
        """
        for cache, geom in zip(caches, context.rows):
            if cache.offset != geom.offset:
                raise ValueError(f"a row's cache ends at frame {cache.offset}, its geometry starts at {geom.offset}")
        embed = self.input_embed
        h = self._project_frames(x, mu, cond, spk)
        pos_conv = embed.conv_pos_embed
        hidden, tails1 = packed_causal_conv(
            pos_conv.conv1, h.transpose(1, 2), [c.pos_tail1 for c in caches], layout, context.conv_index,
            context.tail_index,
        )
        pos, tails2 = packed_causal_conv(
            pos_conv.conv2, hidden, [c.pos_tail2 for c in caches], layout, context.conv_index, context.tail_index
        )
        h = pos.transpose(1, 2) + h
        residual = h
        masks = [g.mask for g in context.rows]
        per_layer = []
        for i, block in enumerate(self.transformer_blocks):
            if kv is not None:
                h = block.forward_pooled(h, modulation.blocks[i], context.cos, context.sin, kv, step, i)
                continue
            pasts = []
            for cache in caches:
                k_store, v_store = cache.stores[i] if cache.stores else (None, None)
                pasts.append((cache.keys[i], cache.values[i], k_store, v_store))
            h, keys, values, stores = block.forward_rows(
                h, modulation.blocks[i], context.cos, context.sin, pasts, masks, layout
            )
            per_layer.append((keys, values, stores))
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        h = self.norm_out.apply(h, modulation.final)
        out = self.proj_out(h).transpose(1, 2)
        if kv is not None:
            return out, [DiTCache(cache.offset + n, (), (), tails1[r], tails2[r])
                         for r, (cache, n) in enumerate(zip(caches, layout.lengths))]  # fmt: skip
        new = [
            DiTCache(
                cache.offset + n,
                tuple(layer[0][r] for layer in per_layer),
                tuple(layer[1][r] for layer in per_layer),
                tails1[r],
                tails2[r],
                tuple(layer[2][r] for layer in per_layer),
            )
            for r, (cache, n) in enumerate(zip(caches, layout.lengths))
        ]
        return out, new
