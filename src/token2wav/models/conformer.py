"""CosyVoice 2 token encoder: a conformer stack, a 2x upsampler, and a second conformer stack.

Module and parameter names follow the reference checkpoints (``encoder.*`` in ``flow.pt``) so weights load
strictly. Two entry points:

* :meth:`UpsampleConformerEncoder.forward` is the reference computation on a whole (padded) batch;
  ``streaming=True`` selects chunk-causal attention.
* :meth:`UpsampleConformerEncoder.forward_chunk` computes the same chunk-causal encoder incrementally. It
  carries a :class:`ConformerCache` (attention keys/values, the pre-lookahead history and the upsampler's
  left context) so each call costs O(new tokens x all tokens) instead of re-encoding the prefix, and
  concatenated chunk outputs equal ``forward(..., streaming=True)`` on the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from token2wav.masks import add_chunk_mask, make_chunk_mask, make_pad_mask
from token2wav.models.kv_store import PastKV, RowStore, extend_kv
from token2wav.models.lookahead import PreLookaheadLayer

__all__ = [
    "ConformerCache",
    "ConformerEncoderLayer",
    "EspnetRelPositionalEncoding",
    "LinearNoSubsampling",
    "PositionwiseFeedForward",
    "RelPositionMultiHeadedAttention",
    "Upsample1D",
    "UpsampleConformerEncoder",
]

# The reference builds its pre-lookahead layer and upsampler with these sizes whatever the config says.
_FIXED_CHANNELS = 512
_FIXED_LOOKAHEAD = 3
_FIXED_STRIDE = 2

_ACTIVATIONS = {
    "hardtanh": nn.Hardtanh,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


# ----------------------------------------------------------------------------------------------------
# Positional encoding and input layer
# ----------------------------------------------------------------------------------------------------


def relative_position_table(max_rel: int, min_rel: int, d_model: int, *, device=None, dtype=None) -> Tensor:
    """Sinusoids for the relative distances ``max_rel, max_rel - 1, ..., min_rel`` as ``[1, R, d_model]``.

    Distance ``r`` (query position minus key position) gets ``sin(r w_k)`` at even and ``cos(r w_k)`` at odd
    channels, the ESPnet layout; rows are in decreasing ``r`` so the shift trick of the attention applies.
    Values are computed in float32 from the same products as the reference table, then cast.
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoidal encodings, got {d_model}")
    rel = torch.arange(max_rel, min_rel - 1, -1, dtype=torch.float32, device=device).unsqueeze(1)
    freqs = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    angle = rel * freqs
    table = torch.empty(rel.shape[0], d_model, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.unsqueeze(0).to(dtype=dtype if dtype is not None else torch.float32)


class EspnetRelPositionalEncoding(nn.Module):
    """Scales the input by ``sqrt(d_model)`` and supplies relative-position sinusoids (no parameters).

    ``forward(x, offset)`` returns ``(x * sqrt(d_model), pos_emb)``; ``pos_emb`` ``[1, 2(T+offset)-1, d]``
    covers distances ``T+offset-1 .. -(T+offset-1)``, as the reference does. ``max_len`` is accepted for
    signature compatibility; the table is computed on demand, so there is no length limit.
    """

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len

    def position_encoding(self, max_rel: int, min_rel: int, *, device=None, dtype=None) -> Tensor:
        return relative_position_table(max_rel, min_rel, self.d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        span = x.size(1) + offset
        pos_emb = self.position_encoding(span - 1, -(span - 1), device=x.device, dtype=x.dtype)
        return x * self.xscale, pos_emb


class LinearNoSubsampling(nn.Module):
    """Linear + LayerNorm input layer followed by the positional module (keys ``out.0``, ``out.1``)."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: nn.Module) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.pos_enc = pos_enc_class
        self.right_context = 0
        self.subsampling_rate = 1

    def project(self, x: Tensor) -> Tensor:
        """Per-frame part only: linear, norm and the ``sqrt(d)`` scale; no positions needed."""
        return self.out(x) * self.pos_enc.xscale

    def forward(self, x: Tensor, x_mask: Tensor, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        x, pos_emb = self.pos_enc(self.out(x), offset)
        return x, pos_emb, x_mask


# ----------------------------------------------------------------------------------------------------
# Attention, feed-forward, encoder layer
# ----------------------------------------------------------------------------------------------------


def _rel_shift(scores: Tensor, n_keys: int) -> Tensor:
    """Turn ``[..., T1, T2 + T1 - 1]`` scores against decreasing distances into ``[..., T1, T2]``.

    Row ``r`` (the last of the T1 queries is aligned with the last key) keeps columns ``T1-1-r .. T1-2-r+T2``,
    i.e. entry ``[r, j]`` is the score for distance ``(T2 - T1 + r) - j``. Done with a pad and reshapes, the
    classic Transformer-XL trick generalised to ``T2 >= T1``; pure indexing, so values are untouched.
    """
    *lead, t1, width = scores.shape
    padded = F.pad(scores, (1, 0)).reshape(*lead, t1 * (width + 1))
    return padded[..., t1:].reshape(*lead, t1, width)[..., :n_keys]


class RelPositionMultiHeadedAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (``pos_bias_u``/``pos_bias_v``)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention size {n_feat} must be a multiple of attention_heads={n_head}")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        pos_emb: Tensor,
        past: PastKV | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[RowStore | None, ...]]:
        """Attend from ``x`` ``[B, T1, D]`` to earlier keys (``past``: keys/values ``[B, H, P, d_k]`` and their
        stores, see ``kv_store``) and to ``x``.

        pos_emb: ``[1, P + 2*T1 - 1, D]`` sinusoids for distances ``P+T1-1 .. -(T1-1)``.
        mask: bool, True = may attend, ``[B, T1, P+T1]`` or ``[B, 1, P+T1]``; ``None`` for no mask.
        Returns the output, the full keys/values ``[B, H, P+T1, d_k]`` and their stores (earlier views of the
        stores are untouched).
        """
        batch, t1, _ = x.shape
        q = self.linear_q(x).view(batch, t1, self.h, self.d_k)
        k = self.linear_k(x).view(batch, t1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(batch, t1, self.h, self.d_k).transpose(1, 2)
        k, v, stores = extend_kv(k, v, past)
        n_keys = k.size(2)
        if pos_emb.size(1) != n_keys + t1 - 1:
            raise ValueError(f"pos_emb must cover {n_keys + t1 - 1} distances, got {pos_emb.size(1)}")

        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))
        position = torch.matmul(q_v, p.transpose(-2, -1))
        if position.shape != content.shape:
            position = _rel_shift(position, n_keys)
        scores = (content + position) / math.sqrt(self.d_k)

        if mask is not None and mask.size(-1) > 0:
            blocked = ~mask.unsqueeze(1)[..., :n_keys]  # [B, 1, T1|1, T2]
            scores = scores.masked_fill(blocked, -float("inf"))
            attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous().view(batch, t1, self.h * self.d_k)
        return self.linear_out(out), k, v, stores


class PositionwiseFeedForward(nn.Module):
    """``w_2(act(w_1(x)))`` on every frame."""

    def __init__(
        self, idim: int, hidden_units: int, dropout_rate: float = 0.0, activation: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation if activation is not None else nn.ReLU()
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, xs: Tensor) -> Tensor:
        return self.w_2(self.activation(self.w_1(xs)))


class ConformerEncoderLayer(nn.Module):
    """Optional macaron FFN, relative-position self-attention, FFN; pre- or post-norm residuals.

    The convolution module of a full conformer is not supported (``conv_module`` must be None): no CosyVoice
    config enables it.
    """

    def __init__(
        self,
        size: int,
        self_attn: RelPositionMultiHeadedAttention,
        feed_forward: nn.Module | None = None,
        feed_forward_macaron: nn.Module | None = None,
        conv_module: nn.Module | None = None,
        dropout_rate: float = 0.1,
        normalize_before: bool = True,
    ) -> None:
        super().__init__()
        if conv_module is not None:
            raise ValueError("conv_module is not supported (use_cnn_module must be False)")
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        if feed_forward_macaron is not None:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-12)
            self.ff_scale = 0.5
        else:
            self.ff_scale = 1.0
        self.size = size
        self.normalize_before = normalize_before

    def _pre(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return norm(x) if self.normalize_before else x

    def _post(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return x if self.normalize_before else norm(x)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        pos_emb: Tensor,
        past: PastKV | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[RowStore | None, ...]]:
        """Returns ``(x, keys, values, stores)``; keys/values include ``past``'s (see the attention)."""
        if self.feed_forward_macaron is not None:
            y = self.feed_forward_macaron(self._pre(x, self.norm_ff_macaron))
            x = self._post(x + self.ff_scale * y, self.norm_ff_macaron)
        y, keys, values, stores = self.self_attn(self._pre(x, self.norm_mha), mask, pos_emb, past)
        x = self._post(x + y, self.norm_mha)
        y = self.feed_forward(self._pre(x, self.norm_ff))
        x = self._post(x + self.ff_scale * y, self.norm_ff)
        return x, keys, values, stores


# ----------------------------------------------------------------------------------------------------
# Upsampler
# ----------------------------------------------------------------------------------------------------


class Upsample1D(nn.Module):
    """Repeat each frame ``stride`` times, then a causal conv of kernel ``2*stride+1`` (left zero padding)."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1, stride=1, padding=0)

    @property
    def history_len(self) -> int:
        """Upsampled frames left of a window that the conv reads (``2 * stride``)."""
        return self.conv.kernel_size[0] - 1

    def forward(self, inputs: Tensor, input_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, T]`` -> ``[B, C_out, stride*T]`` and the scaled lengths."""
        # nearest-neighbour interpolation by an integer factor is exactly a repeat
        up = inputs.repeat_interleave(self.stride, dim=2)
        up = F.pad(up, (self.history_len, 0))
        return self.conv(up), input_lengths * self.stride

    def forward_cached(self, inputs: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Upsample a window ``[B, C, T]`` given the previous ``history_len`` upsampled frames ``[B, C, K]``.

        Returns the output ``[B, C_out, stride*T]`` and the history for the next window.
        """
        up = torch.cat([history, inputs.repeat_interleave(self.stride, dim=2)], dim=2)
        return self.conv(up), up[:, :, up.size(2) - self.history_len:]


# ----------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConformerCache:
    """Everything :meth:`UpsampleConformerEncoder.forward_chunk` needs to continue a token sequence.

    Tensors are never modified in place (each call builds new ones), so one cache, e.g. of a shared voice
    prompt, may seed any number of continuations.

    offset: tokens encoded so far (absolute position of the next token).
    lookahead_history: the last up to 2 projected token frames ``[B, n, C]`` (pre-lookahead causal conv).
    context: the lookahead features ``[B, L, C]`` given with the last call (as passed in); the next call must
        start with them. Empty after a final call.
    keys, values: per conformer layer, ``[B, H, offset, d_k]``.
    up_history: the last ``2*stride`` upsampled frames ``[B, C, 2*stride]`` entering the upsampler conv.
    up_keys, up_values: per upsampled-rate layer, ``[B, H, stride*offset, d_k]``.
    finalized: the sequence was closed by a ``finalize=True`` call; no further call is possible.
    stores, up_stores: per layer, the ``RowStore`` behind keys and values (``()`` when unknown); they only let
        the next call append without copying the earlier rows.
    """

    offset: int
    lookahead_history: Tensor
    context: Tensor
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    up_history: Tensor
    up_keys: tuple[Tensor, ...]
    up_values: tuple[Tensor, ...]
    finalized: bool = False
    stores: tuple[tuple[RowStore | None, ...], ...] = field(default=(), compare=False, repr=False)
    up_stores: tuple[tuple[RowStore | None, ...], ...] = field(default=(), compare=False, repr=False)

    @property
    def batch_size(self) -> int:
        return self.up_history.size(0)


class UpsampleConformerEncoder(nn.Module):
    """``[B, T, 512]`` token features -> ``[B, 2T, 512]`` mel-rate features (CosyVoice 2 flow encoder).

    Embedding (linear + norm), a 3-token pre-lookahead conv, ``num_blocks`` conformer layers under a
    ``static_chunk_size``-token chunk mask, a 2x causal upsampler, a second embedding and 4 conformer layers
    under a ``2*static_chunk_size``-frame chunk mask, and a final norm. Keyword arguments are those of the
    reference class; training-only ones (dropouts, dynamic chunks, checkpointing) are accepted and ignored.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = True,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # The reference hard-codes 512-channel pre-lookahead and upsampler layers, and its second input layer
        # maps input_size -> output_size on the upsampler's output: both sizes must be 512.
        for name, value in (("output_size", output_size), ("input_size", input_size)):
            if value != _FIXED_CHANNELS:
                raise ValueError(
                    f"{name}={value} is not supported: the upsampling encoder's pre-lookahead and upsample "
                    f"layers are fixed at {_FIXED_CHANNELS} channels, so {name} must be {_FIXED_CHANNELS}"
                )
        _choice("input_layer", input_layer, ("linear",))
        _choice("pos_enc_layer_type", pos_enc_layer_type, ("rel_pos_espnet",))
        _choice("selfattention_layer_type", selfattention_layer_type, ("rel_selfattn",))
        _choice("activation_type", activation_type, tuple(_ACTIVATIONS))
        if use_cnn_module:
            raise ValueError("use_cnn_module=True is not supported (CosyVoice configs set it to False)")
        if global_cmvn is not None:
            raise ValueError("global_cmvn is not supported (CosyVoice configs leave it unset)")
        if static_chunk_size < 0:
            raise ValueError(f"static_chunk_size must be >= 0 (0 = no chunking), got {static_chunk_size}")
        if num_blocks < 0 or linear_units <= 0 or attention_heads <= 0:
            raise ValueError(
                f"num_blocks must be >= 0 and linear_units, attention_heads > 0; got {num_blocks}, "
                f"{linear_units}, {attention_heads}"
            )

        self._output_size = output_size
        self.normalize_before = normalize_before
        self.static_chunk_size = static_chunk_size
        self.pre_lookahead_len = _FIXED_LOOKAHEAD
        self.global_cmvn = None

        def layer() -> ConformerEncoderLayer:
            act = _ACTIVATIONS[activation_type]

            def ffn() -> PositionwiseFeedForward:
                return PositionwiseFeedForward(output_size, linear_units, dropout_rate, act())

            return ConformerEncoderLayer(
                output_size,
                RelPositionMultiHeadedAttention(attention_heads, output_size, key_bias=key_bias),
                ffn(),
                ffn() if macaron_style else None,
                None,
                dropout_rate,
                normalize_before,
            )

        def embed() -> LinearNoSubsampling:
            pos = EspnetRelPositionalEncoding(output_size, positional_dropout_rate)
            return LinearNoSubsampling(input_size, output_size, dropout_rate, pos)

        self.embed = embed()
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.pre_lookahead_layer = PreLookaheadLayer(_FIXED_CHANNELS, _FIXED_CHANNELS, _FIXED_LOOKAHEAD)
        self.encoders = nn.ModuleList([layer() for _ in range(num_blocks)])
        self.up_layer = Upsample1D(_FIXED_CHANNELS, _FIXED_CHANNELS, stride=_FIXED_STRIDE)
        self.up_embed = embed()
        self.up_encoders = nn.ModuleList([layer() for _ in range(4)])

    def output_size(self) -> int:
        return self._output_size

    @property
    def up_stride(self) -> int:
        """Output frames per input token (fixed at 2 by the architecture)."""
        return self.up_layer.stride

    # -- offline --

    def forward(
        self,
        xs: Tensor,
        xs_lens: Tensor,
        context: Tensor | None = None,
        decoding_chunk_size: int = 0,
        num_decoding_left_chunks: int = -1,
        streaming: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Encode a padded batch like the reference.

        xs: ``[B, T, input_size]``; xs_lens: ``[B]`` (may exceed T, as the reference's flow passes the length
        including the lookahead tokens). context: ``[B, 3, input_size]`` features of the lookahead tokens that
        follow ``xs`` (non-final streaming call), or None/empty for zeros (end of sequence).
        streaming: chunk-causal attention (``static_chunk_size`` tokens, then twice that in output frames);
        otherwise full attention. ``decoding_chunk_size`` and ``num_decoding_left_chunks`` are ignored, as
        in the reference.
        Returns ``([B, 2T, output_size], mask [B, 1, 2T])``.
        """
        if xs.dim() != 3:
            raise ValueError(f"xs must be [B, T, {self._output_size}], got shape {tuple(xs.shape)}")
        n_tokens = xs.size(1)
        valid = ~make_pad_mask(xs_lens, n_tokens).unsqueeze(1)
        xs, pos_emb, valid = self.embed(xs, valid)
        if context is not None and context.numel() > 0:
            context = self.embed.project(context)
        else:
            context = None
        chunk = self.static_chunk_size if streaming else 0
        masks = add_chunk_mask(valid, chunk)
        xs = self.pre_lookahead_layer(xs, context)
        for layer in self.encoders:
            xs = layer(xs, masks, pos_emb)[0]

        xs, up_lens = self.up_layer(xs.transpose(1, 2), xs_lens)
        xs = xs.transpose(1, 2)
        valid = ~make_pad_mask(up_lens, xs.size(1)).unsqueeze(1)
        xs, pos_emb, valid = self.up_embed(xs, valid)
        masks = add_chunk_mask(valid, chunk * self.up_stride)
        for layer in self.up_encoders:
            xs = layer(xs, masks, pos_emb)[0]
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, valid

    # -- incremental --

    def init_cache(
        self, batch_size: int = 1, *, device=None, dtype: torch.dtype | None = None
    ) -> ConformerCache:
        """An empty cache: the next :meth:`forward_chunk` encodes from the first token."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ref = self.after_norm.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        heads = self.up_encoders[0].self_attn.h
        d_k = self.up_encoders[0].self_attn.d_k
        empty_kv = torch.zeros(batch_size, heads, 0, d_k, device=device, dtype=dtype)
        chans = self._output_size
        return ConformerCache(
            offset=0,
            lookahead_history=torch.zeros(batch_size, 0, chans, device=device, dtype=dtype),
            context=torch.zeros(batch_size, 0, chans, device=device, dtype=dtype),
            keys=tuple(empty_kv for _ in self.encoders),
            values=tuple(empty_kv for _ in self.encoders),
            up_history=torch.zeros(batch_size, chans, self.up_layer.history_len, device=device, dtype=dtype),
            up_keys=tuple(empty_kv for _ in self.up_encoders),
            up_values=tuple(empty_kv for _ in self.up_encoders),
        )

    def forward_chunk(
        self,
        xs_new: Tensor,
        *,
        context: Tensor | None,
        cache: ConformerCache | None,
        finalize: bool,
    ) -> tuple[Tensor, ConformerCache]:
        """Encode the next tokens of a sequence, reusing ``cache`` (None = start of the sequence).

        xs_new: ``[B, n, 512]`` features of the tokens at positions ``cache.offset ..`` (the flow's token
            embeddings). A call that is not the last must end on the chunk grid, i.e. ``cache.offset + n``
            a multiple of ``static_chunk_size``: only whole chunks are final under chunk-causal attention.
        context: ``[B, 3, 512]`` features of the 3 tokens after ``xs_new`` (required unless ``finalize``);
            the next call must start with those tokens.
        finalize: the sequence ends after ``xs_new`` (lookahead past the end is zeros); the returned cache
            is closed.
        Returns ``h_new`` ``[B, 2n, 512]`` and the new cache. Concatenating the ``h_new`` of calls
        ``n_1, n_2, ...`` gives ``forward(all, streaming=True)`` for a final last call, or the same call with
        ``context`` for a non-final one (equal up to float rounding of differently sized matmuls).

        To continue from a position off the grid, keep the cache of the last on-grid call and re-send the
        tokens after it: caches are immutable, so an earlier cache stays valid.
        """
        chunk = self.static_chunk_size
        if chunk <= 0:
            raise ValueError("forward_chunk needs chunk-causal attention: static_chunk_size must be > 0")
        if xs_new.dim() != 3 or xs_new.size(2) != self._output_size:
            raise ValueError(f"xs_new must be [B, n, {self._output_size}], got shape {tuple(xs_new.shape)}")
        batch, n_new, _ = xs_new.shape
        if cache is None:
            cache = self.init_cache(batch, device=xs_new.device, dtype=xs_new.dtype)
        if cache.finalized:
            raise ValueError("cache is finalized: the sequence was closed by a finalize=True call")
        if cache.batch_size != batch:
            raise ValueError(f"xs_new has batch size {batch}, the cache {cache.batch_size}")
        if cache.offset % chunk:
            raise ValueError(
                f"cache ends at token {cache.offset}, off the {chunk}-token chunk grid; continue from the "
                "cache of the last call that ended on the grid and re-send the tokens after it"
            )
        look = self.pre_lookahead_len
        if finalize:
            if context is not None and context.numel() > 0:
                raise ValueError("context must be None or empty when finalize=True")
            ctx = None
        else:
            if context is None or tuple(context.shape) != (batch, look, self._output_size):
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"context must be [{batch}, {look}, {self._output_size}] when finalize=False, got {got}"
                )
            ctx = self.embed.project(context)
            if n_new < 1:
                raise ValueError("a non-final call must bring at least one token")
        if n_new == 0:
            # Closing a sequence that has no tokens left to encode (only possible on a fresh cache).
            if cache.context.size(1) > 0:
                raise ValueError("xs_new must start with the tokens given as context in the previous call")
            return xs_new.new_zeros(batch, 0, self._output_size), _closed(cache)

        n_prev_ctx = cache.context.size(1)
        if n_prev_ctx > 0:
            overlap = min(n_prev_ctx, n_new)
            same = torch.equal(xs_new[:, :overlap], cache.context[:, :overlap])
            if not same or (finalize and n_new < n_prev_ctx):
                raise ValueError("xs_new must start with the tokens given as context in the previous call")
        x = self.embed.project(xs_new)

        history_len = self.pre_lookahead_layer.history_len
        x_out = self.pre_lookahead_layer(x, ctx, history=cache.lookahead_history)
        lookahead_history = torch.cat([cache.lookahead_history, x], dim=1)
        # cloned: a slice would keep this call's projected tokens alive in the cache
        lookahead_history = lookahead_history[:, max(0, lookahead_history.size(1) - history_len):].clone()

        x_out, keys, values, stores = self._run_layers(self.encoders, self.embed, x_out, cache.offset, chunk,
                                                       cache.keys, cache.values, cache.stores)

        up, up_history = self.up_layer.forward_cached(x_out.transpose(1, 2), cache.up_history)
        up_history = up_history.clone()  # a slice of this call's frames: keep only itself
        up = self.up_embed.project(up.transpose(1, 2))
        stride = self.up_stride
        up, up_keys, up_values, up_stores = self._run_layers(self.up_encoders, self.up_embed, up,
                                                             cache.offset * stride, chunk * stride, cache.up_keys,
                                                             cache.up_values, cache.up_stores)
        if self.normalize_before:
            up = self.after_norm(up)

        new_cache = ConformerCache(
            offset=cache.offset + n_new,
            lookahead_history=lookahead_history,
            context=context if ctx is not None else xs_new.new_zeros(batch, 0, self._output_size),
            keys=keys,
            values=values,
            up_history=up_history,
            up_keys=up_keys,
            up_values=up_values,
            finalized=finalize,
            stores=stores,
            up_stores=up_stores,
        )
        return up, new_cache

    @staticmethod
    def _run_layers(
        layers: nn.ModuleList,
        embed: LinearNoSubsampling,
        x: Tensor,
        offset: int,
        chunk: int,
        past_keys: tuple[Tensor, ...],
        past_values: tuple[Tensor, ...],
        past_stores: tuple[tuple[RowStore | None, ...], ...],
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], tuple[tuple[RowStore | None, ...], ...]]:
        """Run conformer layers on frames ``[offset, offset+n)`` against cached keys of ``[0, offset)``."""
        n_new = x.size(1)
        pos_emb = embed.pos_enc.position_encoding(offset + n_new - 1, -(n_new - 1), device=x.device,
                                                  dtype=x.dtype)
        mask = make_chunk_mask(n_new, chunk, offset=offset, device=x.device).unsqueeze(0)
        keys, values, stores = [], [], []
        for i, (layer, pk, pv) in enumerate(zip(layers, past_keys, past_values)):
            k_store, v_store = past_stores[i] if past_stores else (None, None)
            x, k, v, layer_stores = layer(x, mask, pos_emb, (pk, pv, k_store, v_store))
            keys.append(k)
            values.append(v)
            stores.append(layer_stores)
        return x, tuple(keys), tuple(values), tuple(stores)


def _closed(cache: ConformerCache) -> ConformerCache:
    return replace(cache, finalized=True)
