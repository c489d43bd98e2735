"""CosyVoice 2 flow estimator: a causal 1-D U-Net with transformer blocks (``CausalConditionalDecoder``).

Module and parameter names follow the reference checkpoints (``decoder.estimator.*`` in ``flow.pt``): the
reference builds this network from Matcha-TTS / diffusers blocks, re-implemented here (no diffusers
dependency) with the same keys.

* :meth:`CausalConditionalDecoder.forward` is the reference computation on whole sequences
  (``streaming=True``: chunk-causal attention; otherwise full attention).
* :meth:`CausalConditionalDecoder.forward_chunk` computes the chunk-causal network incrementally for the
  next frames, carrying a :class:`UNetCache` (per transformer block the keys/values of all earlier frames,
  per causal conv its last ``kernel-1`` input frames), so each call costs O(new frames x all frames).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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

__all__ = [
    "Attention",
    "BasicTransformerBlock",
    "CausalBlock1D",
    "CausalConditionalDecoder",
    "CausalConv1d",
    "CausalResnetBlock1D",
    "FeedForward",
    "SinusoidalPosEmb",
    "TimestepEmbedding",
    "UNetCache",
]

_MASK_BIAS = -1.0e10  # additive bias the reference uses for blocked attention entries


def _activation(name: str) -> nn.Module:
    table = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
    if name not in table:
        raise ValueError(f"act_fn={name!r} is not supported; allowed: {', '.join(map(repr, table))}")
    return table[name]()


# ----------------------------------------------------------------------------------------------------
# Time embedding
# ----------------------------------------------------------------------------------------------------


class SinusoidalPosEmb(nn.Module):
    """Diffusion time ``t`` ``[B]`` -> ``[B, dim]`` as ``[sin(1000 t w), cos(1000 t w)]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"in_channels (the time-embedding size) must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, x: Tensor, scale: float = 1000) -> Tensor:
        if x.dim() < 1:
            x = x.unsqueeze(0)
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device).float() * -step)
        angle = scale * x.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((angle.sin(), angle.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """``linear_2(act(linear_1(t)))`` (keys ``linear_1``, ``linear_2``)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = None
        if cond_proj_dim is not None:
            self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.act = _activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim if out_dim is not None else time_embed_dim)
        self.post_act = _activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("condition given but the embedding was built without cond_proj_dim")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


# ----------------------------------------------------------------------------------------------------
# Causal conv blocks
# ----------------------------------------------------------------------------------------------------


class _Tails:
    """Reads the conv histories of an old cache in network order while collecting the new ones."""

    def __init__(self, old: Sequence[Tensor]) -> None:
        self._old: Iterator[Tensor] = iter(old)
        self.new: list[Tensor] = []

    def step(self, conv: CausalConv1d, x: Tensor) -> Tensor:
        y, tail = conv.forward_cached(x, next(self._old))
        self.new.append(tail)
        return y


class _PackedTails:
    """``_Tails`` for packed rows (see ``models/rows.py``): every causal conv runs once over all rows, each
    row continuing from its own history."""

    def __init__(self, old: Sequence[Sequence[Tensor]], layout: RowLayout) -> None:
        self._old: Iterator[tuple[Tensor, ...]] = iter(zip(*old))  # per conv: every row's history
        self._layout = layout
        self._index: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.new: list[list[Tensor]] = []  # per conv: every row's new history

    def step(self, conv: CausalConv1d, x: Tensor) -> Tensor:
        history = conv.causal_padding
        if history not in self._index:
            self._index[history] = (self._layout.conv_index(history, x.device),
                                    self._layout.tail_index(history, x.device))
        y, tails = packed_causal_conv(
            lambda seq: nn.Conv1d.forward(conv, seq), x, next(self._old), self._layout, *self._index[history]
        )
        self.new.append(tails)
        return y

    def per_row(self) -> list[tuple[Tensor, ...]]:
        return [tuple(conv[r] for conv in self.new) for r in range(len(self._layout))]


class _PaddedTails:
    """``_Tails`` for padded rows (fixed shapes, ``models/padded_solve.py``): x ``[B, C, R * Q]`` with row ``r``
    at ``[r * Q, r * Q + n_r)``; every causal conv runs with each row as its own batch entry, continuing from
    its tail (``[B * R, C, history]``, branch-major); ends ``[B * R]``: ``n_r``."""

    def __init__(self, old: Sequence[Tensor], ends: Tensor, rows: int) -> None:
        self._old: Iterator[Tensor] = iter(old)
        self._ends, self._rows = ends, rows
        self.new: list[Tensor] = []

    def step(self, conv: CausalConv1d, x: Tensor) -> Tensor:
        y, tail = padded_causal_conv(
            lambda seq: nn.Conv1d.forward(conv, seq), padded_rows(x, self._rows), next(self._old), self._ends
        )
        self.new.append(tail)
        return unpadded_rows(y, x.shape[0])


class CausalConv1d(nn.Conv1d):
    """Stride-1 conv that sees only the current and ``kernel_size-1`` earlier frames (zero history at t=0)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        if stride != 1:
            raise ValueError(f"CausalConv1d needs stride=1, got {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        # dilation widens the receptive field: (k-1)*d earlier frames
        self.causal_padding = (kernel_size - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))

    def forward_cached(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Conv of a window ``[B, C, n]`` given the ``causal_padding`` frames before it.

        Returns the output and the history for the next window.
        """
        full = torch.cat([history, x], dim=2)
        return super().forward(full), full[:, :, full.size(2) - self.causal_padding:]


class Transpose(nn.Module):
    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1

    def forward(self, x: Tensor) -> Tensor:
        return torch.transpose(x, self.dim0, self.dim1)


class CausalBlock1D(nn.Module):
    """Causal conv (k=3), LayerNorm over channels, Mish; inputs and outputs masked (keys ``block.0/2``)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3),
            Transpose(1, 2),
            nn.LayerNorm(dim_out),
            Transpose(1, 2),
            nn.Mish(),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.block(x * mask) * mask

    def forward_cached(self, x: Tensor, tails: _Tails) -> Tensor:
        # Streaming inputs carry no padding (mask all ones); multiplying by one is exact, so it is skipped.
        h = tails.step(self.block[0], x)
        for module in list(self.block)[1:]:
            h = module(h)
        return h


class CausalResnetBlock1D(nn.Module):
    """Two causal blocks with the time embedding added in between, plus a 1x1 residual conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, time_emb: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)

    def forward_cached(self, x: Tensor, time_emb: Tensor, tails: _Tails) -> Tensor:
        h = self.block1.forward_cached(x, tails) + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2.forward_cached(h, tails)
        return h + self.res_conv(x)


class Downsample1D(nn.Module):
    """Stride-2 conv (k=3, padding 1); only used with more than one U-Net level."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """Transposed conv (k=4, stride 2, padding 1) doubling the length; only used with several U-Net levels."""

    def __init__(self, channels: int, use_conv: bool = False, use_conv_transpose: bool = True,
                 out_channels: int | None = None, name: str = "conv") -> None:
        super().__init__()
        if not use_conv_transpose:
            raise ValueError("Upsample1D supports only use_conv_transpose=True (the reference's choice)")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.conv = nn.ConvTranspose1d(channels, self.out_channels, 4, 2, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.conv(inputs)


# ----------------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------------


class GELU(nn.Module):
    """Linear projection followed by GELU (exact or tanh-approximate); key ``proj``."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: project to twice the width, ``value * gelu(gate)``; key ``proj``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """Projection then ``x * sigmoid(1.702 x)``; key ``proj``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


class FeedForward(nn.Module):
    """``net = [activation-with-projection, dropout, linear]`` with hidden width ``mult * dim``."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False) -> None:
        super().__init__()
        inner = int(dim * mult)
        makers = {
            "gelu": lambda: GELU(dim, inner),
            "gelu-approximate": lambda: GELU(dim, inner, approximate="tanh"),
            "geglu": lambda: GEGLU(dim, inner),
            "geglu-approximate": lambda: ApproximateGELU(dim, inner),
        }
        if activation_fn not in makers:
            allowed = ", ".join(map(repr, makers))
            raise ValueError(f"act_fn={activation_fn!r} is not supported; allowed: {allowed}")
        # Dropout slots keep the reference's module indices (net.0 / net.2); they are identity at inference.
        self.net = nn.ModuleList(
            [makers[activation_fn](), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim)]
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class Attention(nn.Module):
    """Multi-head self-attention (keys ``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 bias: bool = False, out_bias: bool = True) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(query_dim, inner, bias=bias)
        self.to_v = nn.Linear(query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def _split(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1, self.heads, self.dim_head).transpose(1, 2)

    def forward(
        self,
        hidden_states: Tensor,
        attention_bias: Tensor | None = None,
        past: PastKV | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[RowStore | None, RowStore | None]]:
        """``[B, T, D]`` -> ``[B, T, D]``; keys/values ``[B, H, P+T, d]`` include the past ones.

        attention_bias: additive float bias broadcastable to ``[B, H, T, P+T]``.
        past: cached keys, values ``[B, H, P, d]`` and the stores behind them (see ``kv_store``), or None.
        Returns the output, the full keys and values, and their stores.
        """
        q, k, v = (self._split(proj(hidden_states)) for proj in (self.to_q, self.to_k, self.to_v))
        k, v, stores = extend_kv(k, v, past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=0.0)
        return self._merge(out, q.dtype), k, v, stores

    def _merge(self, out: Tensor, dtype: torch.dtype) -> Tensor:
        out = out.transpose(1, 2).reshape(out.size(0), -1, self.heads * self.dim_head).to(dtype)
        return self.to_out[0](out)

    def forward_rows(
        self, hidden_states: Tensor, biases: list[Tensor | None], pasts: list[PastKV], layout: RowLayout
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[tuple[RowStore | None, RowStore | None]]]:
        """``forward`` for packed rows: each row attends to its own cache with its own bias."""
        q, k, v = (self._split(proj(hidden_states)) for proj in (self.to_q, self.to_k, self.to_v))
        out, keys, values, stores = packed_attention(q, k, v, pasts, biases, layout)
        return self._merge(out, q.dtype), keys, values, stores

    def forward_pooled(self, hidden_states: Tensor, kv: PooledRows, step: int, layer: int) -> Tensor:
        """``forward_rows`` with the rows' caches in a page pool (see ``models/kv_pool.py``)."""
        q, k, v = (self._split(proj(hidden_states)) for proj in (self.to_q, self.to_k, self.to_v))
        return self._merge(pooled_attention(q, k, v, kv, step, layer), q.dtype)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention and feed-forward with residuals (keys ``norm1``, ``attn1``, ``norm3``, ``ff``).

    Only the configuration CosyVoice uses is supported: plain layer norms, no cross-attention.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        num_embeds_ada_norm: int | None = None,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_type: str = "layer_norm",
        final_dropout: bool = False,
    ) -> None:
        super().__init__()
        if norm_type != "layer_norm" or num_embeds_ada_norm is not None:
            raise ValueError(f"norm_type={norm_type!r} is not supported; only 'layer_norm'")
        if cross_attention_dim is not None or only_cross_attention or double_self_attention:
            raise ValueError("cross-attention options are not supported (cross_attention_dim must be None)")
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                               bias=attention_bias)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        timestep: Tensor | None = None,
        past: PastKV | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[RowStore | None, RowStore | None]]:
        """``attention_mask`` is an additive bias ``[B, H, T, P+T]`` (or broadcastable); returns
        (x, k, v, stores) as ``Attention.forward``."""
        attn, k, v, stores = self.attn1(self.norm1(hidden_states), attention_mask, past)
        return self._feed_forward(attn + hidden_states), k, v, stores

    def _feed_forward(self, hidden_states: Tensor) -> Tensor:
        return self.ff(self.norm3(hidden_states)) + hidden_states

    def forward_rows(
        self, hidden_states: Tensor, biases: list[Tensor | None], pasts: list[PastKV], layout: RowLayout
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[tuple[RowStore | None, RowStore | None]]]:
        """``forward`` for packed rows (see ``models/rows.py``)."""
        attn, keys, values, stores = self.attn1.forward_rows(self.norm1(hidden_states), biases, pasts, layout)
        return self._feed_forward(attn + hidden_states), keys, values, stores

    def forward_pooled(self, hidden_states: Tensor, kv: PooledRows, step: int, layer: int) -> Tensor:
        attn = self.attn1.forward_pooled(self.norm1(hidden_states), kv, step, layer)
        return self._feed_forward(attn + hidden_states)


# ----------------------------------------------------------------------------------------------------
# The U-Net
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetCache:
    """State carried by :meth:`CausalConditionalDecoder.forward_chunk` between calls.

    One cache belongs to one solver step (the network input differs per step) and covers a fixed batch (e.g.
    the 2 classifier-free-guidance branches). Tensors are never modified in place, so a cache (e.g. of a
    shared voice prompt) can seed any number of continuations.

    offset: frames processed so far (absolute position of the next frame).
    chunk_size: the attention chunk size the frames were computed with.
    conv_tails: per causal conv in network order, its last ``kernel-1`` input frames ``[B, C, k-1]``.
    keys, values: per transformer block in network order, ``[B, H, offset, d]``.
    stores: per block, the ``RowStore`` behind keys and values (``()`` when unknown); it only lets the next
    call append without copying the earlier rows.
    """

    offset: int
    chunk_size: int
    conv_tails: tuple[Tensor, ...]
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    stores: tuple[tuple[RowStore | None, RowStore | None], ...] = field(default=(), compare=False, repr=False)

    @property
    def batch_size(self) -> int:
        return self.conv_tails[0].size(0)


class CausalConditionalDecoder(nn.Module):
    """Flow-matching estimator ``v(x, mu, t, spks, cond)`` for ``[B, 80, T]`` mel frames.

    Keyword arguments are the reference's; ``dropout`` is ignored at inference and
    ``num_decoding_left_chunks`` is stored but unused, as in the reference (all left chunks are visible).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "snake",
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) <= 0:
            raise ValueError(f"channels must be a non-empty list of positive sizes, got {list(channels)}")
        if n_blocks < 0 or num_mid_blocks < 0 or num_heads <= 0 or attention_head_dim <= 0:
            raise ValueError("n_blocks, num_mid_blocks must be >= 0 and num_heads, attention_head_dim > 0")
        if static_chunk_size < 0:
            raise ValueError(f"static_chunk_size must be >= 0, got {static_chunk_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size
        self.num_decoding_left_chunks = num_decoding_left_chunks
        self.num_heads = num_heads
        self.attention_head_dim = attention_head_dim
        time_embed_dim = channels[0] * 4
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim, act_fn="silu")

        def blocks(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                BasicTransformerBlock(dim, num_heads, attention_head_dim, activation_fn=act_fn)
                for _ in range(n_blocks)
            )

        self.down_blocks = nn.ModuleList()
        out_ch = in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down = CausalConv1d(out_ch, out_ch, 3) if last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([CausalResnetBlock1D(in_ch, out_ch, time_embed_dim),
                                                   blocks(out_ch), down]))
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(channels[-1], out_ch, time_embed_dim), blocks(out_ch)])
            for _ in range(num_mid_blocks)
        )
        ups = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(ups) - 1):
            last = i == len(ups) - 2
            out_ch = ups[i + 1]
            up = CausalConv1d(out_ch, out_ch, 3) if last else Upsample1D(out_ch, use_conv_transpose=True)
            self.up_blocks.append(nn.ModuleList([CausalResnetBlock1D(ups[i] * 2, out_ch, time_embed_dim),
                                                 blocks(out_ch), up]))
        self.final_block = CausalBlock1D(ups[-1], ups[-1])
        self.final_proj = nn.Conv1d(ups[-1], out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference's init (matters only for random-weight tests; checkpoints overwrite it).
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- shared pieces --

    def _time(self, t: Tensor, batch: int) -> Tensor:
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() != 1 or t.size(0) not in (1, batch):
            raise ValueError(f"t must be a scalar or [B={batch}], got shape {tuple(t.shape)}")
        return self.time_mlp(self.time_embeddings(t).to(t.dtype))

    def _inputs(self, x: Tensor, mu: Tensor, spks: Tensor | None, cond: Tensor | None) -> Tensor:
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        if cond is not None:
            parts.append(cond)
        h = torch.cat(parts, dim=1)
        if h.size(1) != self.in_channels:
            raise ValueError(
                f"x, mu, spks and cond together have {h.size(1)} channels, the estimator expects "
                f"in_channels={self.in_channels}"
            )
        return h

    def _bias(self, valid: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
        """Additive attention bias ``[B, H, T, T]`` with the reference's values (0 allowed, -1e10 blocked)."""
        allowed = add_chunk_mask(valid.bool(), chunk)
        if allowed.size(1) == 1:
            allowed = allowed.repeat(1, valid.size(-1), 1)
        bias = (1.0 - allowed.to(dtype)) * _MASK_BIAS
        # same values for every head; a broadcast view instead of the reference's per-head copies
        return bias.unsqueeze(1).expand(-1, self.num_heads, -1, -1)

    @staticmethod
    def _transformers(blocks: nn.ModuleList, x: Tensor, bias: Tensor, t: Tensor) -> Tensor:
        x = x.transpose(1, 2).contiguous()
        for block in blocks:
            x = block(x, bias, t)[0]
        return x.transpose(1, 2).contiguous()

    # -- offline --

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
        """Velocity ``[B, out_channels, T]``, computed as the reference does.

        x, mu, cond: ``[B, 80, T]``; mask: ``[B, 1, T]``; t: ``[B]``; spks: ``[B, 80]``.
        streaming: chunk-causal attention (``chunk_size`` frames, default ``static_chunk_size``) instead of
        full attention.
        """
        temb = self._time(t, x.size(0))
        h = self._inputs(x, mu, spks, cond)
        chunk = (self.static_chunk_size if chunk_size is None else int(chunk_size)) if streaming else 0

        biases: dict[int, Tensor] = {}

        def bias_for(m: Tensor) -> Tensor:
            # one bias per distinct mask tensor (a single-level U-Net uses one mask throughout)
            if id(m) not in biases:
                biases[id(m)] = self._bias(m, chunk, h.dtype)
            return biases[id(m)]

        skips = []
        masks = [mask]
        for resnet, blocks, down in self.down_blocks:
            mask_down = masks[-1]
            h = resnet(h, mask_down, temb)
            h = self._transformers(blocks, h, bias_for(mask_down), temb)
            skips.append(h)
            h = down(h * mask_down)
            masks.append(mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]
        for resnet, blocks in self.mid_blocks:
            h = resnet(h, mask_mid, temb)
            h = self._transformers(blocks, h, bias_for(mask_mid), temb)
        mask_up = mask
        for resnet, blocks, up in self.up_blocks:
            mask_up = masks.pop()
            skip = skips.pop()
            h = resnet(torch.cat([h[:, :, :skip.size(-1)], skip], dim=1), mask_up, temb)
            h = self._transformers(blocks, h, bias_for(mask_up), temb)
            h = up(h * mask_up)
        h = self.final_block(h, mask_up)
        return self.final_proj(h * mask_up) * mask

    # -- incremental --

    def _conv_shapes(self) -> list[tuple[int, int]]:
        """(channels, history length) of every causal conv in the order forward_chunk visits them."""
        shapes: list[tuple[int, int]] = []

        def resnet(r: CausalResnetBlock1D) -> None:
            for b in (r.block1, r.block2):
                conv = b.block[0]
                shapes.append((conv.in_channels, conv.causal_padding))

        for r, _, down in self.down_blocks:
            resnet(r)
            shapes.append((down.in_channels, down.causal_padding))
        for r, _ in self.mid_blocks:
            resnet(r)
        for r, _, up in self.up_blocks:
            resnet(r)
            shapes.append((up.in_channels, up.causal_padding))
        conv = self.final_block.block[0]
        shapes.append((conv.in_channels, conv.causal_padding))
        return shapes

    def _all_blocks(self) -> list[BasicTransformerBlock]:
        groups = [b for _, b, _ in self.down_blocks] + [b for _, b in self.mid_blocks]
        groups += [b for _, b, _ in self.up_blocks]
        return [block for group in groups for block in group]

    def init_cache(self, batch_size: int = 2, *, chunk_size: int | None = None, device=None,
                   dtype: torch.dtype | None = None) -> UNetCache:
        """An empty cache for ``batch_size`` rows (2 for the guided and unguided branches of the solver)."""
        self._check_streamable()
        chunk = self.static_chunk_size if chunk_size is None else int(chunk_size)
        if chunk <= 0:
            raise ValueError(f"chunk_size must be > 0 for incremental decoding, got {chunk}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ref = self.final_proj.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        kw = {"device": device, "dtype": dtype}
        tails = tuple(torch.zeros(batch_size, c, k, **kw) for c, k in self._conv_shapes())
        empty = torch.zeros(batch_size, self.num_heads, 0, self.attention_head_dim, **kw)
        n_blocks = len(self._all_blocks())
        return UNetCache(offset=0, chunk_size=chunk, conv_tails=tails, keys=(empty,) * n_blocks,
                         values=(empty,) * n_blocks)

    def empty_cache(self, batch_size: int = 2, device=None, dtype: torch.dtype | None = None) -> UNetCache:
        """Same as :meth:`init_cache` with the default chunk size (the CFM's cached solver calls this)."""
        return self.init_cache(batch_size, device=device, dtype=dtype)

    def kv_layout(self) -> tuple[int, int, int]:
        """Attention layers (every transformer block, network order), heads and head width."""
        attn = [m.attn1 for m in self.modules() if isinstance(m, BasicTransformerBlock)]
        if not attn or len({(a.heads, a.dim_head) for a in attn}) != 1:
            raise ValueError("a page pool needs transformer blocks that all share heads and head width")
        return len(attn), attn[0].heads, attn[0].dim_head

    def _check_streamable(self) -> None:
        if len(self.down_blocks) != 1:
            raise ValueError(
                f"forward_chunk supports a single U-Net level (len(channels) == 1), this estimator has "
                f"{len(self.down_blocks)}: its stride-2 down/up-sampling looks ahead"
            )

    def forward_chunk(
        self,
        x: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor | None = None,
        cond: Tensor | None = None,
        *,
        cache: UNetCache | None,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, UNetCache]:
        """Velocity for the next ``n`` frames, continuing ``cache`` (None = first frame of the sequence).

        x, mu, cond: ``[B, 80, n]`` for frames ``cache.offset .. cache.offset+n-1`` (no padding);
        t: ``[B]`` or scalar; spks: ``[B, 80]``. chunk_size: attention chunk (default ``static_chunk_size``,
        fixed for a sequence).
        A call must start on the chunk grid (``cache.offset`` a multiple of the chunk size): frames of a
        partly filled chunk are not final until the chunk is complete. Keep the cache of the last call that
        ended on the grid and re-send the frames after it to continue otherwise (caches are immutable).
        Returns ``([B, out_channels, n], new_cache)``; concatenated outputs equal
        ``forward(..., streaming=True)`` on the whole sequence up to float rounding.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be [B, C, n], got shape {tuple(x.shape)}")
        batch, _, n_new = x.shape
        for name, value in (("mu", mu), ("cond", cond)):
            if value is not None and (value.dim() != 3 or value.size(0) != batch or value.size(2) != n_new):
                raise ValueError(f"{name} must be [B={batch}, C, n={n_new}], got shape {tuple(value.shape)}")
        if spks is not None and (spks.dim() != 2 or spks.size(0) != batch):
            raise ValueError(f"spks must be [B={batch}, C], got shape {tuple(spks.shape)}")
        if cache is None:
            cache = self.init_cache(batch, chunk_size=chunk_size, device=x.device, dtype=x.dtype)
        chunk = cache.chunk_size if chunk_size is None else int(chunk_size)
        if chunk <= 0:
            raise ValueError(f"chunk_size must be > 0 for incremental decoding, got {chunk}")
        if cache.offset == 0:
            # nothing computed yet: an empty cache takes the chunk size of its first call
            cache = UNetCache(0, chunk, cache.conv_tails, cache.keys, cache.values, cache.stores)
        if chunk != cache.chunk_size:
            raise ValueError(f"chunk_size={chunk} differs from the cache's chunk size {cache.chunk_size}")
        if cache.batch_size != batch:
            raise ValueError(f"x has batch size {batch}, the cache {cache.batch_size}")
        if cache.offset % chunk:
            raise ValueError(
                f"cache ends at frame {cache.offset}, off the {chunk}-frame chunk grid; continue from the "
                "cache of the last call that ended on the grid and re-send the frames after it"
            )
        self._check_streamable()
        if n_new == 0:
            return x.new_zeros(batch, self.out_channels, 0), cache

        temb = self._time(t, batch)
        h = self._inputs(x, mu, spks, cond)
        offset = cache.offset
        bias = self._chunk_bias(offset, n_new, chunk, h.dtype, h.device)
        tails = _Tails(cache.conv_tails)
        old_stores = cache.stores or ((None, None),) * len(cache.keys)
        past = iter(zip(cache.keys, cache.values, old_stores))
        keys: list[Tensor] = []
        values: list[Tensor] = []
        stores: list[tuple[RowStore | None, RowStore | None]] = []

        def attend(block: BasicTransformerBlock, h: Tensor) -> Tensor:
            pk, pv, (k_store, v_store) = next(past)
            h, k, v, block_stores = block(h, bias, temb, (pk, pv, k_store, v_store))
            keys.append(k)
            values.append(v)
            stores.append(block_stores)
            return h

        out = self._cached_trunk(h, temb, tails, attend)
        new_cache = UNetCache(offset=offset + n_new, chunk_size=chunk, conv_tails=tuple(tails.new),
                              keys=tuple(keys), values=tuple(values), stores=tuple(stores))
        return out, new_cache

    @staticmethod
    def _chunk_bias(offset: int, n_new: int, chunk: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Additive bias for new frames ``[offset, offset + n_new)`` against every key up to them; None when
        they form one chunk-aligned chunk (every key visible)."""
        if (offset // chunk + 1) * chunk >= offset + n_new:
            return None
        allowed = make_chunk_mask(n_new, chunk, offset=offset, device=device)
        return ((1.0 - allowed.to(dtype)) * _MASK_BIAS).view(1, 1, n_new, offset + n_new)

    def _cached_trunk(self, h: Tensor, temb: Tensor, tails: _Tails | _PackedTails, attend: Any) -> Tensor:
        """The network after the inputs, with causal convs through ``tails`` and each transformer block run
        by ``attend(block, h [B, T, C]) -> h``."""

        def transformers(blocks: nn.ModuleList, h: Tensor) -> Tensor:
            h = h.transpose(1, 2).contiguous()
            for block in blocks:
                h = attend(block, h)
            return h.transpose(1, 2).contiguous()

        resnet, blocks, down = self.down_blocks[0]
        h = resnet.forward_cached(h, temb, tails)
        skip = transformers(blocks, h)
        h = tails.step(down, skip)
        for resnet, blocks in self.mid_blocks:
            h = transformers(blocks, resnet.forward_cached(h, temb, tails))
        for resnet, blocks, up in self.up_blocks:
            h = resnet.forward_cached(torch.cat([h, skip], dim=1), temb, tails)
            h = tails.step(up, transformers(blocks, h))
        h = self.final_block.forward_cached(h, tails)
        return self.final_proj(h)

    # -- packed rows (many streams, one call) --

    def prepare_rows(
        self, offsets: list[int], layout: RowLayout, chunk_sizes: list[int | None]
    ) -> tuple[list[int], list[Tensor | None]]:
        """Per row, its chunk size and the attention bias of its new frames (shared by every solver step)."""
        self._check_streamable()
        weight = self.final_proj.weight
        chunks, biases = [], []
        for offset, n, chunk in zip(offsets, layout.lengths, chunk_sizes):
            chunk = self.static_chunk_size if chunk is None else int(chunk)
            if chunk <= 0 or offset % chunk:
                raise ValueError(f"a row starts at frame {offset}, off its {chunk}-frame chunk grid")
            chunks.append(chunk)
            biases.append(self._chunk_bias(offset, n, chunk, weight.dtype, weight.device))
        return chunks, biases

    def forward_rows(
        self,
        x: Tensor,
        mu: Tensor,
        cond: Tensor,
        spk: Tensor | None,
        *,
        caches: list[UNetCache],
        layout: RowLayout,
        context: tuple[list[int], list[Tensor | None]],
        t: Tensor,
        kv: PooledRows | None = None,
        step: int = 0,
    ) -> tuple[Tensor, list[UNetCache]]:
        """``forward_chunk`` of many streams in one call, their new frames packed along time.

        x, mu, cond ``[B, 80, S]`` and spk ``[B, 80, S]`` (speaker per frame) hold row ``i``'s frames at
        ``layout``'s span ``i``; ``caches[i]`` is row ``i``'s cache; ``context`` is ``prepare_rows(...)``.
        kv: where the rows' keys/values live in a page pool, at solver ``step`` (the caches then hold none).
        Returns the packed velocity and each row's new cache.
        """
        batch = x.size(0)
        chunks, biases = context
        temb = self._time(t, batch)
        parts = [x, mu] + ([spk] if spk is not None else []) + [cond]
        h = torch.cat(parts, dim=1)
        if h.size(1) != self.in_channels:
            raise ValueError(f"x, mu, spk and cond together have {h.size(1)} channels, the estimator expects "
                             f"in_channels={self.in_channels}")
        tails = _PackedTails([c.conv_tails for c in caches], layout)
        pasts = iter(zip(*[zip(c.keys, c.values, c.stores or ((None, None),) * len(c.keys)) for c in caches]))
        per_block = []

        layers = itertools.count()  # attention layers in network order: the pool's layer index

        def attend(block: BasicTransformerBlock, h: Tensor) -> Tensor:
            if kv is not None:
                return block.forward_pooled(h, kv, step, next(layers))
            row_pasts = [(pk, pv, ks, vs) for pk, pv, (ks, vs) in next(pasts)]
            h, keys, values, stores = block.forward_rows(h, biases, row_pasts, layout)
            per_block.append((keys, values, stores))
            return h

        out = self._cached_trunk(h, temb, tails, attend)
        if kv is not None:
            return out, [UNetCache(offset=cache.offset + n, chunk_size=chunk, conv_tails=row_tails, keys=(), values=())
                         for cache, n, row_tails, chunk in zip(caches, layout.lengths, tails.per_row(), chunks)]
        new = [
            UNetCache(offset=cache.offset + n, chunk_size=chunk, conv_tails=row_tails,
                      keys=tuple(b[0][r] for b in per_block), values=tuple(b[1][r] for b in per_block),
                      stores=tuple(b[2][r] for b in per_block))
            for r, (cache, n, row_tails, chunk) in enumerate(zip(caches, layout.lengths, tails.per_row(), chunks))
        ]  # fmt: skip
        return out, new

    # -- padded rows (fixed shapes): ``models/padded_solve.FixedShapeEstimator`` --

    def padded_constants(self, t: Tensor) -> Tensor:
        """The time embedding."""
        self._check_streamable()
        return self._time(t, 2)

    def padded_terms(self, positions: Tensor) -> dict[str, Tensor]:
        """None: a U-Net knows positions only through its causal convs' tails."""
        return {}

    @staticmethod
    def padded_tails(cache: UNetCache) -> tuple[Tensor, ...]:
        return tuple(cache.conv_tails)

    @staticmethod
    def padded_advance(cache: UNetCache, frames: int, chunk_size: int, tails: Sequence[Tensor]) -> UNetCache:
        return replace(cache, offset=cache.offset + frames, chunk_size=chunk_size, conv_tails=tuple(tails),
                       keys=(), values=(), stores=())  # fmt: skip

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
        constants: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``forward_rows`` with every shape fixed by ``kv``'s padded sizes; every causal conv runs with each
        row as its own batch entry."""
        h = torch.cat([x, mu] + ([spk] if spk is not None else []) + [cond], dim=1)
        if h.size(1) != self.in_channels:
            raise ValueError(f"x, mu, spk and cond together have {h.size(1)} channels, the estimator expects "
                             f"in_channels={self.in_channels}")
        row_tails = _PaddedTails(tails, ends, kv.rows)
        layers = itertools.count()  # attention layers in network order: the pool's layer index
        out = self._cached_trunk(h, constants, row_tails,
                                 lambda block, h: block.forward_pooled(h, kv, step, next(layers)))  # fmt: skip
        return out, tuple(row_tails.new)
