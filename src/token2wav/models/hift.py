"""HiFT vocoders: neural-source-filter + iSTFT generators of CosyVoice 2 and CosyVoice 3.

* :class:`HiFTGenerator` (CosyVoice 2) is non-causal and draws fresh random phases / Gaussian noise on every
  call, in the same order and memory layout as the reference, so seeding the global RNG (or passing a
  ``torch.Generator``) reproduces its output.
* :class:`CausalHiFTGenerator` (CosyVoice 3) is causal with a fixed right context and uses *fixed* uniform
  noise indexed by absolute sample position.  Its offline call and its cached streaming call share one code
  path (:meth:`CausalHiFTGenerator.stream_step`), so chunked decoding equals one-shot decoding.

Module and parameter names equal the reference checkpoints' state-dict keys; every weight-normalised conv is
parametrised with ``torch.nn.utils.parametrizations.weight_norm`` so the keys end in
``parametrizations.weight.original0/1``.  Call :func:`fold_weight_norm` after loading.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from ..checkpoints import fold_weight_norm as _fold_weight_norm

__all__ = [
    "CausalConvRNNF0Predictor",
    "CausalHiFTCache",
    "CausalHiFTGenerator",
    "ConvRNNF0Predictor",
    "HiFTGenerator",
    "ResBlock",
    "Snake",
    "SourceModuleHnNSF",
    "UniformNoiseTable",
    "fold_weight_norm",
    "reference_noise_offset",
]

Tensor = torch.Tensor

# Uniform draws the real CosyVoice 3 config makes between the CFM's seed-0 reset (plus its 1x80x15000 normal
# draw) and the vocoder's fixed-noise draws: the flow's token embedding (6561 x 80) and speaker projection
# (192 -> 80), then the full-size causal F0 predictor's parameters.  Measured: it reproduces the manifest's
# rand_ini, first rows and sha256 of both noise tensors exactly.
CV3_REFERENCE_NOISE_OFFSET = 3_852_961
_REFERENCE_NOISE_ROWS = 300 * 24000  # the reference allocates 300 s of noise at 24 kHz


# --------------------------------------------------------------------------------------------- weight norm
def _wn(module: nn.Module) -> nn.Module:
    return _weight_norm(module)


def fold_weight_norm(module: nn.Module) -> int:
    """Fold weight norm for inference; see :func:`token2wav.checkpoints.fold_weight_norm` (which keeps the
    parametrisation of convs flagged ``keep_weight_norm``). Returns how many were folded."""
    return _fold_weight_norm(module)


_HALF = (torch.float16, torch.bfloat16)


def _spectral(dtype: torch.dtype) -> torch.dtype:
    """The dtype the spectral ops (STFT, iSTFT, F0 and the sine source) run in for a model in ``dtype``.

    Half-precision models keep them in float32: FFTs do not take half tensors on every device, and a
    half-precision phase (tens of thousands of radians after a few seconds) would be noise."""
    return torch.float32 if dtype in _HALF else dtype


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in the dtype of ``x`` (the layer's weights cast, the module untouched)."""
    if layer.weight.dtype == x.dtype:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def _weight_in(conv: nn.Module, dtype: torch.dtype) -> Tensor:
    """The conv's effective weight in ``dtype``; weight norm is evaluated in that dtype when possible."""
    if parametrize.is_parametrized(conv, "weight"):
        plist = conv.parametrizations.weight
        g, v = plist.original0, plist.original1
        if v.dtype == dtype:
            return conv.weight
        g, v = g.to(dtype), v.to(dtype)
        norm = v.pow(2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()
        return v * (g / norm)
    return conv.weight.to(dtype)


# ------------------------------------------------------------------------------------------ small helpers
def _empty_time(like: Tensor, channels: int | None = None) -> Tensor:
    shape = list(like.shape)
    if channels is not None:
        shape[1] = channels
    shape[-1] = 0
    return like.new_zeros(shape)


def _cat_time(a: Tensor, b: Tensor) -> Tensor:
    if a.shape[-1] == 0:
        return b
    if b.shape[-1] == 0:
        return a
    return torch.cat([a, b], dim=-1)


def _conv_run(x: Tensor, tail: Tensor, weight: Tensor, bias: Tensor | None,
              stride: int = 1, dilation: int = 1) -> tuple[Tensor, Tensor]:
    """Valid (unpadded) conv over ``tail ++ x``: every output whose receptive field is complete.

    Returns the outputs and the input still needed for the next outputs (a fresh copy, so a cache never
    aliases a caller's tensor).
    """
    buf = _cat_time(tail, x)
    span = (weight.shape[-1] - 1) * dilation + 1
    n = buf.shape[-1]
    if n < span:
        return _empty_time(buf, weight.shape[0]), buf.clone()
    n_out = (n - span) // stride + 1
    used = (n_out - 1) * stride + span
    y = F.conv1d(buf[..., :used], weight, bias, stride=stride, dilation=dilation)
    return y, buf[..., n_out * stride:].clone()


def _check_mel(name: str, mel: Tensor, channels: int) -> None:
    if not isinstance(mel, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [batch, {channels}, frames]")
    if mel.dim() != 3:
        raise ValueError(f"{name} must have rank 3 [batch, {channels}, frames], got shape {tuple(mel.shape)}")
    if mel.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} mel channels (dim 1), got shape {tuple(mel.shape)}")
    if not mel.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {mel.dtype}")


# ------------------------------------------------------------------------------------------------ layers
class Snake(nn.Module):
    """Periodic activation x + sin^2(a x) / a with a learned per-channel ``alpha``."""

    def __init__(self, in_features: int, alpha: float = 1.0, alpha_trainable: bool = True,
                 alpha_logscale: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.alpha_logscale = alpha_logscale
        init = torch.zeros(in_features) if alpha_logscale else torch.full((in_features,), float(alpha))
        self.alpha = nn.Parameter(init, requires_grad=alpha_trainable)

    def _terms(self) -> tuple[Tensor, Tensor]:
        """``a`` and ``1 / (a + 1e-9)`` as ``[1, C, 1]``. Without autograd they are kept per parameter version:
        a streamed vocoder calls each Snake about 70 times per chunk, and these are three kernels each time."""
        alpha = self.alpha
        if torch.is_grad_enabled() and alpha.requires_grad:
            return self._compute_terms()
        key = (alpha._version, alpha.data_ptr(), alpha.dtype, alpha.device)
        memo = self.__dict__.get("_memo")
        if memo is None or memo[0] != key:
            memo = self.__dict__["_memo"] = (key, self._compute_terms())
        return memo[1]

    def _compute_terms(self) -> tuple[Tensor, Tensor]:
        a = self.alpha.view(1, -1, 1)
        if self.alpha_logscale:
            a = a.exp()
        return a, 1.0 / (a + 1e-9)

    def forward(self, x: Tensor) -> Tensor:
        a, inv = self._terms()
        return x + inv * torch.sin(x * a).pow(2)


class _Conv1d(nn.Conv1d):
    """Conv1d that records how much context it needs on each side (padding is applied by the caller)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 left: int = 0, right: int = 0) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, dilation=dilation)
        self.left_context = left
        self.right_context = right

    def forward(self, x: Tensor) -> Tensor:  # offline use with zero padding
        return super().forward(F.pad(x, (self.left_context, self.right_context)))


def _causal(cin: int, cout: int, k: int, dilation: int = 1) -> _Conv1d:
    return _Conv1d(cin, cout, k, dilation=dilation, left=(k - 1) * dilation)


def _lookahead(cin: int, cout: int, k: int) -> _Conv1d:
    return _Conv1d(cin, cout, k, right=k - 1)


class ResBlock(nn.Module):
    """Residual stack of (Snake, dilated conv, Snake, conv) pairs; optionally causal (left padding only)."""

    def __init__(self, channels: int = 512, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5),
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.convs1 = nn.ModuleList()
        self.convs2 = nn.ModuleList()
        for d in dilations:
            if causal:
                c1, c2 = _causal(channels, channels, kernel_size, d), _causal(channels, channels, kernel_size)
            else:
                pad = (kernel_size - 1) // 2
                c1 = nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=pad * d)
                c2 = nn.Conv1d(channels, channels, kernel_size, padding=pad)
            self.convs1.append(_wn(c1))
            self.convs2.append(_wn(c2))
        self.activations1 = nn.ModuleList([Snake(channels) for _ in dilations])
        self.activations2 = nn.ModuleList([Snake(channels) for _ in dilations])

    def forward(self, x: Tensor) -> Tensor:
        if self.causal:
            return self.stream(x, self.initial_tails(x))[0]
        for a1, c1, a2, c2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = c2(a2(c1(a1(x)))) + x
        return x

    def initial_tails(self, like: Tensor) -> tuple[Tensor, ...]:
        """Zero left context for every conv, for a stream starting at position 0."""
        tails = []
        for c1, c2 in zip(self.convs1, self.convs2):
            for c in (c1, c2):
                tails.append(like.new_zeros(like.shape[0], c.in_channels, c.left_context))
        return tuple(tails)

    def stream(self, x: Tensor, tails: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Causal block on new positions ``x`` given the left context; length preserving."""
        new_tails = []
        layers = zip(self.activations1, self.convs1, self.activations2, self.convs2)
        for i, (a1, c1, a2, c2) in enumerate(layers):
            h, t1 = _conv_run(a1(x), tails[2 * i], c1.weight, c1.bias, dilation=c1.dilation[0])
            h, t2 = _conv_run(a2(h), tails[2 * i + 1], c2.weight, c2.bias, dilation=c2.dilation[0])
            x = h + x
            new_tails += [t1, t2]
        return x, tuple(new_tails)


# ------------------------------------------------------------------------------------------ F0 predictors
class ConvRNNF0Predictor(nn.Module):
    """Five weight-normalised k=3 convs with ELU, then a linear head; |output| is F0 in Hz per mel frame."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            cin = in_channels if i == 0 else cond_channels
            layers.append(_wn(nn.Conv1d(cin, cond_channels, 3, padding=1)))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, x: Tensor) -> Tensor:
        """F0 [B, T] of a mel [B, 80, T], computed in the dtype of ``x`` (float32 inside a half model)."""
        if x.dtype == self.classifier.weight.dtype:
            h = self.condnet(x)
        else:
            h = x
            for layer in self.condnet:
                if isinstance(layer, nn.Conv1d):
                    bias = None if layer.bias is None else layer.bias.to(x.dtype)
                    h = F.conv1d(h, _weight_in(layer, x.dtype), bias, layer.stride, layer.padding,
                                 layer.dilation, layer.groups)
                else:
                    h = layer(h)
        return _linear(self.classifier, h.transpose(1, 2)).squeeze(-1).abs()


class CausalConvRNNF0Predictor(nn.Module):
    """Causal F0 predictor: a k=4 conv that looks 3 frames ahead, then four causal k=3 convs.

    It runs in the dtype of its input, with the weights converted functionally (the module itself is never
    cast); for float64 the weight norm is evaluated in float64 from g and v, as the reference does after it
    casts the whole predictor.
    """

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            if i == 0:
                conv = _lookahead(in_channels, cond_channels, 4)
            else:
                conv = _causal(cond_channels, cond_channels, 3)
            conv.keep_weight_norm = True
            layers.append(_wn(conv))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)
        self._memo: tuple[tuple, list[tuple[Tensor, Tensor | None]]] | None = None

    @property
    def lookahead(self) -> int:
        """Mel frames of right context the first conv needs."""
        return self.condnet[0].right_context

    def _convs(self) -> list[nn.Module]:
        return [self.condnet[2 * i] for i in range(5)]

    def _weight64(self, conv: nn.Module) -> Tensor:
        # These convs keep their weight norm (keep_weight_norm), so g and v are evaluated in float64 as the
        # reference does after casting the predictor; a folded float32 weight would lose the F0 tolerance.
        if parametrize.is_parametrized(conv, "weight"):
            return _weight_in(conv, torch.float64)
        return conv.weight.to(torch.float64)

    def _params_in(self, dtype: torch.dtype) -> list[tuple[Tensor, Tensor | None]]:
        """Weights and biases of the five convs and the head in ``dtype``, memoised per parameter version."""
        key_parts: list = [dtype]
        for p in self.parameters():
            key_parts += [id(p), p._version, p.dtype, p.device]
        key = tuple(key_parts)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        with torch.no_grad():
            params = []
            for c in self._convs():
                w = self._weight64(c) if dtype == torch.float64 else _weight_in(c, dtype)
                params.append((w.to(dtype), c.bias.to(dtype)))
            params.append((self.classifier.weight.to(dtype), self.classifier.bias.to(dtype)))
        if dtype != self.classifier.weight.dtype:  # only memoise converted copies
            self._memo = (key, params)
        return params

    def initial_state(self, like: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        b = like.shape[0]
        pending = like.new_zeros(b, self.condnet[0].in_channels, 0)
        tails = tuple(like.new_zeros(b, self.condnet[2 * i].in_channels, 2) for i in range(1, 5))
        return pending, tails

    def stream(self, x: Tensor, pending: Tensor, tails: tuple[Tensor, ...], finalize: bool
               ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """F0 for every frame whose look-ahead is available (all of them when ``finalize``)."""
        params = self._params_in(x.dtype)
        if finalize:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], self.lookahead)], dim=-1)
        h, pending = _conv_run(x, pending.to(x.dtype), *params[0])
        h = F.elu(h)
        new_tails = []
        for i in range(1, 5):
            h, t = _conv_run(h, tails[i - 1].to(x.dtype), *params[i])
            h = F.elu(h)
            new_tails.append(t)
        f0 = F.linear(h.transpose(1, 2), *params[5]).squeeze(-1).abs()
        return f0, pending, tuple(new_tails)

    def forward(self, x: Tensor, finalize: bool = True) -> Tensor:
        """F0 [batch, frames]; without ``finalize`` the last 3 frames only serve as right context."""
        pending, tails = self.initial_state(x)
        return self.stream(x, pending, tails, finalize)[0]


# ------------------------------------------------------------------------------------------------ noise
class UniformNoiseTable:
    """Rows of ``torch.rand(1, N, width, generator=g)`` for any N, produced in blocks on demand.

    CPU ``torch.rand`` consumes its generator one draw per element in order, so a block drawn from the
    generator state saved at its first row equals the same rows of one big draw.  Only the states at block
    boundaries are kept (about 5 KB each) plus a few recent blocks; positions can be read in any order.
    """

    def __init__(self, start_state: Tensor, width: int, limit: int | None = None,
                 block_rows: int = 16384, cached_blocks: int = 8) -> None:
        self.width = width
        self.limit = limit
        self.block_rows = block_rows
        self._states: list[Tensor] = [start_state.clone()]
        self._blocks: OrderedDict[int, Tensor] = OrderedDict()
        self._max_blocks = cached_blocks
        self._lock = threading.Lock()

    def _block(self, k: int) -> Tensor:
        blk = self._blocks.get(k)
        if blk is not None:
            self._blocks.move_to_end(k)
            return blk
        g = torch.Generator()
        start = min(k, len(self._states) - 1)
        g.set_state(self._states[start])
        for j in range(start, k + 1):
            blk = torch.rand(1, self.block_rows, self.width, generator=g)
            if j + 1 == len(self._states):
                self._states.append(g.get_state())
        self._blocks[k] = blk
        if len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        return blk

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) as a [1, stop - start, width] float32 tensor (a new tensor)."""
        if start < 0 or stop < start:
            raise ValueError(f"noise rows need 0 <= start <= stop, got {start}, {stop}")
        if self.limit is not None and stop > self.limit:
            raise ValueError(f"fixed source noise covers {self.limit} samples; {stop} requested "
                             f"(call set_source_noise with a larger length)")
        if stop == start:
            return torch.zeros(1, 0, self.width)
        parts = []
        with self._lock:
            pos = start
            while pos < stop:
                k, off = divmod(pos, self.block_rows)
                take = min(stop - pos, self.block_rows - off)
                parts.append(self._block(k)[:, off:off + take])
                pos += take
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()


def reference_noise_offset(vocab_size: int, flow_input_size: int, spk_embed_dim: int, flow_output_size: int,
                           f0_predictor: nn.Module) -> int:
    """Uniform draws between the reference CFM's seed-0 reset and the causal vocoder's noise draws.

    After ``set_all_random_seed(0)`` and its 1x80x15000 normal draw, the reference builds the flow's token
    embedding and speaker projection and then the F0 predictor, one draw per parameter element.
    """
    n = vocab_size * flow_input_size + spk_embed_dim * flow_output_size + flow_output_size
    for m in f0_predictor.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):  # weight norm's g is computed, not drawn
            w = m.parametrizations.weight.original1 if parametrize.is_parametrized(m, "weight") else m.weight
            n += w.numel() + (m.bias.numel() if m.bias is not None else 0)
    return n


# ------------------------------------------------------------------------------------------ source module
class SourceModuleHnNSF(nn.Module):
    """Harmonic source: F0 -> sines of 9 harmonics (+ noise) -> linear mix -> tanh.

    ``random_source`` is the CosyVoice 2 variant (fresh random draws per call); ``causal_frames`` is the
    CosyVoice 3 variant with fixed uniform noise and nearest-neighbour phase up-sampling.
    """

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshod: float = 0, causal: bool = False) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = int(upsample_scale)
        self.harmonic_num = harmonic_num
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.voiced_threshold = voiced_threshod
        self.causal = causal
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def _frame_increments(self, f0: Tensor) -> Tensor:
        """Per-frame phase increment in cycles, [B, T, H].

        The reference computes it per sample and linearly down-samples by the frame size; both samples that
        interpolation reads lie inside one frame and are equal, so the per-frame value is bit-identical.
        (The random initial phase it adds at sample 0 is never read, hence has no effect.)
        """
        harm = torch.arange(1, self.harmonic_num + 2, device=f0.device, dtype=f0.dtype)
        return (f0.unsqueeze(-1) * harm / self.sampling_rate) % 1

    def _noise_amp(self, uv: Tensor) -> Tensor:
        return uv * self.noise_std + (1 - uv) * self.sine_amp / 3

    def random_source(self, f0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """CosyVoice 2 source for F0 frames [B, T] -> ([B, 1, T*scale], initial phases [B, H]).

        Draw order and layouts follow the reference exactly: uniform initial phases [B, H], then normal
        noise filled into a [B, L, H] view of [B, H, L] memory, then an unused [B, L, 1] normal draw.
        """
        b, t = f0.shape
        h, up = self.harmonic_num + 1, self.upsample_scale
        length = t * up
        # draw where the generator lives (a CPU generator may serve a CUDA model), then move
        dev = generator.device if generator is not None else f0.device
        rand_ini = torch.rand(b, h, generator=generator, device=dev).to(f0.device)
        rand_ini[:, 0] = 0
        cycles = torch.cumsum(self._frame_increments(f0), dim=1) * 2 * math.pi
        phase = F.interpolate(cycles.transpose(1, 2) * up, scale_factor=float(up), mode="linear")  # [B, H, L]
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0 > self.voiced_threshold).to(f0.dtype).repeat_interleave(up, dim=1).unsqueeze(1)  # [B, 1, L]
        noise = torch.empty(b, h, length, device=dev, dtype=f0.dtype).transpose(1, 2)
        noise.normal_(generator=generator)
        mixed = sines * uv + self._noise_amp(uv) * noise.transpose(1, 2).to(f0.device)
        merged = torch.tanh(_linear(self.l_linear, mixed.transpose(1, 2)))  # [B, L, 1]
        torch.empty(b, length, 1, device=dev, dtype=f0.dtype).normal_(generator=generator)
        return merged.transpose(1, 2), rand_ini

    def causal_frames(self, f0: Tensor, phase_sum: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """CosyVoice 3 source for consecutive F0 frames [B, n].

        ``phase_sum`` [B, H] float64 (kept on the CPU) is the running sum of increments before these frames
        (CPU float32 cumsum accumulates in float64 and rounds each output; continuing the float64 sum
        reproduces a scan over the whole sequence bit for bit).  ``noise`` holds the fixed uniform rows
        [1, n*scale, H] for these samples.  Returns the source [B, 1, n*scale] and the new running sum.
        """
        up = self.upsample_scale
        inc = self._frame_increments(f0.cpu())
        # The scan runs on the CPU whatever the device: it is tiny (frames x harmonics), and a GPU scan would
        # associate the sums differently from one chunk to the next.
        acc = torch.cumsum(torch.cat([phase_sum.cpu().unsqueeze(1), inc.to(torch.float64)], dim=1), dim=1)
        cycles = (acc[:, 1:].to(f0.dtype) * 2 * math.pi * up).to(f0.device)
        sines = torch.sin(cycles) * self.sine_amp  # constant over a frame (nearest up-sampling)
        uv = (f0 > self.voiced_threshold).to(f0.dtype).unsqueeze(-1)  # [B, n, 1]
        sines = sines.repeat_interleave(up, dim=1)
        uv = uv.repeat_interleave(up, dim=1)
        mixed = sines * uv + self._noise_amp(uv) * noise.to(device=f0.device, dtype=f0.dtype)
        merged = torch.tanh(_linear(self.l_linear, mixed))  # [B, n*scale, 1]
        return merged.transpose(1, 2), acc[:, -1].clone()  # not a view that keeps the whole scan alive


# -------------------------------------------------------------------------------------------- generators
class _HiFTBase(nn.Module):
    """Layers shared by both generators (names follow the reference state dict)."""

    def __init__(self, causal: bool, in_channels: int, base_channels: int, nb_harmonics: int,
                 sampling_rate: int, nsf_alpha: float, nsf_sigma: float, nsf_voiced_threshold: float,
                 upsample_rates: Sequence[int], upsample_kernel_sizes: Sequence[int], istft_params: dict,
                 resblock_kernel_sizes: Sequence[int], resblock_dilation_sizes: Sequence[Sequence[int]],
                 source_resblock_kernel_sizes: Sequence[int],
                 source_resblock_dilation_sizes: Sequence[Sequence[int]], lrelu_slope: float,
                 audio_limit: float, f0_predictor: nn.Module | None, conv_pre_look_right: int = 4) -> None:
        super().__init__()
        if sampling_rate == 22050:
            raise NotImplementedError("sampling_rate 22050 selects the CosyVoice 1 sine generator, which is "
                                      "not implemented; CosyVoice 2/3 use 24000")
        upsample_rates = [int(u) for u in upsample_rates]
        if len(upsample_kernel_sizes) != len(upsample_rates):
            raise ValueError("upsample_kernel_sizes must have one entry per upsample rate")
        n_fft, hop = int(istft_params["n_fft"]), int(istft_params["hop_len"])
        self.out_channels = 1
        self.in_channels = in_channels
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.istft_params = {"n_fft": n_fft, "hop_len": hop}
        self.n_fft, self.hop_len = n_fft, hop
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.upsample_rates = upsample_rates
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.samples_per_frame = math.prod(upsample_rates) * hop
        self.m_source = SourceModuleHnNSF(sampling_rate, self.samples_per_frame, nb_harmonics, nsf_alpha,
                                          nsf_sigma, nsf_voiced_threshold, causal=causal)
        if causal:
            self.conv_pre = _wn(_lookahead(in_channels, base_channels, conv_pre_look_right + 1))
        else:
            self.conv_pre = _wn(nn.Conv1d(in_channels, base_channels, 7, padding=3))
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            cin, cout = base_channels // 2 ** i, base_channels // 2 ** (i + 1)
            if causal:
                up = _causal(cin, cout, k)
            else:
                up = nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2)
            self.ups.append(_wn(up))
        # source STFT -> each stage's rate: stride = product of the later upsample rates
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        self._down_strides = [math.prod(upsample_rates[i + 1:]) for i in range(len(upsample_rates))]
        for i, (u, k, d) in enumerate(zip(self._down_strides, source_resblock_kernel_sizes,
                                          source_resblock_dilation_sizes)):
            ch = base_channels // 2 ** (i + 1)
            if u == 1:
                down = _causal(n_fft + 2, ch, 1) if causal else nn.Conv1d(n_fft + 2, ch, 1)
            elif causal:
                down = _Conv1d(n_fft + 2, ch, 2 * u, stride=u, left=u - 1)
            else:
                down = nn.Conv1d(n_fft + 2, ch, 2 * u, u, padding=u // 2)
            self.source_downs.append(down)
            self.source_resblocks.append(ResBlock(ch, k, d, causal=causal))
        if len(self.source_downs) != self.num_upsamples:
            raise ValueError("source_resblock_kernel_sizes/dilation_sizes need one entry per upsample rate")
        self.resblocks = nn.ModuleList()
        ch = base_channels
        for i in range(self.num_upsamples):
            ch = base_channels // 2 ** (i + 1)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d, causal=causal))
        post = _causal(ch, n_fft + 2, 7) if causal else nn.Conv1d(ch, n_fft + 2, 7, padding=3)
        self.conv_post = _wn(post)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).to(torch.float32)
        self.register_buffer("stft_window", window, persistent=False)
        if f0_predictor is None:
            f0_cls = CausalConvRNNF0Predictor if causal else ConvRNNF0Predictor
            f0_predictor = f0_cls(in_channels=in_channels)
        self.f0_predictor = f0_predictor

    def remove_weight_norm(self) -> int:
        """Fold weight norm into plain weights (see :func:`fold_weight_norm`)."""
        return fold_weight_norm(self)

    def _stage_resblocks(self, i: int, x: Tensor) -> Tensor:
        xs = None
        for j in range(self.num_kernels):
            y = self.resblocks[i * self.num_kernels + j](x)
            xs = y if xs is None else xs + y
        return xs / self.num_kernels

    def _spec_to_complex(self, x: Tensor) -> Tensor:
        half = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half]).clamp(max=1e2)
        phase = torch.sin(x[:, half:])  # the network's phase output goes through sin, as trained
        return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))


class HiFTGenerator(_HiFTBase):
    """CosyVoice 2 HiFT vocoder (non-causal): mel [B, 80, T] -> speech [B, T*480].

    Its harmonic source is random on every call; see :meth:`inference` for how to reproduce it.
    """

    def __init__(self, in_channels: int = 80, base_channels: int = 512, nb_harmonics: int = 8,
                 sampling_rate: int = 22050, nsf_alpha: float = 0.1, nsf_sigma: float = 0.003,
                 nsf_voiced_threshold: float = 10, upsample_rates: Sequence[int] = (8, 8),
                 upsample_kernel_sizes: Sequence[int] = (16, 16), istft_params: dict | None = None,
                 resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
                 resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 source_resblock_kernel_sizes: Sequence[int] = (7, 11),
                 source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
                 lrelu_slope: float = 0.1, audio_limit: float = 0.99,
                 f0_predictor: nn.Module | None = None) -> None:
        super().__init__(False, in_channels, base_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma,
                         nsf_voiced_threshold, upsample_rates, upsample_kernel_sizes,
                         istft_params or {"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes,
                         resblock_dilation_sizes, source_resblock_kernel_sizes,
                         source_resblock_dilation_sizes, lrelu_slope, audio_limit, f0_predictor)

    def source_spec(self, source: Tensor) -> Tensor:
        """Centered STFT of the source [B, 1, L] as [B, n_fft + 2, L / hop + 1] (real, then imaginary)."""
        sd = _spectral(source.dtype)
        spec = torch.stft(source.squeeze(1).to(sd), self.n_fft, self.hop_len, self.n_fft,
                          window=self.stft_window.to(sd), center=True, return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def decode(self, speech_feat: Tensor, source: Tensor) -> Tensor:
        """Speech [B, T*480] from a mel [B, 80, T] and a given harmonic source [B, 1, T*480]."""
        _check_mel("speech_feat", speech_feat, self.in_channels)
        want = speech_feat.shape[-1] * self.samples_per_frame
        if source.dim() != 3 or source.shape[1] != 1 or source.shape[-1] != want:
            raise ValueError(f"source must have shape [batch, 1, {want}], got {tuple(source.shape)}")
        speech_feat = speech_feat.to(self.stft_window.dtype)  # the model's dtype (a float32 mel into a half model)
        spec = self.source_spec(source).to(speech_feat.dtype)
        x = self.conv_pre(speech_feat)
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, self.lrelu_slope))
            if i == self.num_upsamples - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](spec))
            x = self._stage_resblocks(i, x)
        x = self.conv_post(F.leaky_relu(x))
        sd = _spectral(x.dtype)  # float32 speech from a half model
        speech = torch.istft(self._spec_to_complex(x.to(sd)), self.n_fft, self.hop_len, self.n_fft,
                             window=self.stft_window.to(sd), center=True)
        return speech.clamp(-self.audio_limit, self.audio_limit)

    def source(self, speech_feat: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(F0 [B, T], random harmonic source [B, 1, T*480]) exactly as :meth:`inference` draws them."""
        _check_mel("speech_feat", speech_feat, self.in_channels)
        f0 = self.f0_predictor(speech_feat.to(_spectral(speech_feat.dtype)))
        return f0, self.m_source.random_source(f0, generator)[0]

    @torch.inference_mode()
    def inference(self, speech_feat: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mel [B, 80, T] -> (speech [B, T*480], source [B, 1, T*480]).

        With ``generator`` None the random phases and noise come from the global torch RNG in the
        reference's order, so ``torch.manual_seed(s)`` before the call reproduces the reference's output;
        otherwise they come from ``generator``.  ``cache_source`` [B, 1, C] replaces the first C source
        samples (the previous call's tail, which avoids a glitch at chunk joins).
        """
        f0, source = self.source(speech_feat, generator)
        if cache_source is not None and cache_source.numel() > 0:
            cs = cache_source.shape
            if cache_source.dim() != 3 or cs[1] != 1 or cs[0] != source.shape[0]:
                raise ValueError(f"cache_source must have shape [{source.shape[0]}, 1, samples], "
                                 f"got {tuple(cache_source.shape)}")
            n = cache_source.shape[-1]
            if n > source.shape[-1]:
                raise ValueError(f"cache_source has {n} samples but the mel only yields {source.shape[-1]}")
            source = torch.cat([cache_source.to(source), source[..., n:]], dim=-1)
        return self.decode(speech_feat, source), source


# ----------------------------------------------------------------------------------------- causal HiFT
@dataclass(frozen=True)
class CausalHiFTCache:
    """Everything :meth:`CausalHiFTGenerator.stream_step` needs to continue a stream exactly.

    Tensors are never modified in place: a step returns a new cache and the old one stays valid, so a
    caller may branch or retry from any earlier cache.
    """

    mel_frames: int  # mel frames received so far
    f0_pending: Tensor  # float64 mel frames waiting for the F0 predictor's look-ahead
    f0_tails: tuple[Tensor, ...]  # left context of the F0 predictor's causal convs (float64)
    phase_sum: Tensor  # [B, H] float64 running sum of per-frame phase increments (always on the CPU)
    source_samples: int  # source samples made so far (= position in the fixed noise)
    stft_buf: Tensor  # source samples (padded coordinates) not yet consumed by the STFT
    stft_started: bool  # whether the leading reflect padding has been applied
    down_tails: tuple[Tensor, ...]  # pending input of each source down-sampling conv
    source_res_tails: tuple[tuple[Tensor, ...], ...]
    pre_pending: Tensor  # mel frames waiting for conv_pre's look-ahead
    up_tails: tuple[Tensor, ...]  # left context of each upsampling conv (after nearest repeat)
    reflect_done: bool  # the last stage's one-sample reflect padding has been emitted
    x_pending: tuple[Tensor, ...]  # main branch positions waiting for their source positions, per stage
    s_pending: tuple[Tensor, ...]  # source branch positions waiting for main positions, per stage
    res_tails: tuple[tuple[Tensor, ...], ...]
    post_tail: Tensor
    istft_frames: Tensor  # last n_fft/hop - 1 windowed iSTFT frames [B, n, n_fft]
    istft_count: int  # iSTFT frames made so far
    speech_samples: int  # speech samples emitted so far
    finalized: bool = False
    samples_per_frame: int = 480

    @property
    def held_frames(self) -> int:
        """Mel frames received whose speech has not been emitted yet (the look-ahead latency)."""
        return self.mel_frames - self.speech_samples // self.samples_per_frame

    def nbytes(self) -> int:
        total = 0
        for v in self.__dict__.values():
            for t in _flatten(v):
                total += t.numel() * t.element_size()
        return total


def _stack_field(values: list) -> Tensor | tuple:
    """Rows' values of one cache field (a tensor or nested tuples of tensors) joined along the batch."""
    if isinstance(values[0], Tensor):
        return torch.cat(values, dim=0)
    return tuple(_stack_field([v[i] for v in values]) for i in range(len(values[0])))


def _split_rows(value: Tensor | tuple) -> tuple:
    """A stacked field as per-row pieces (one split per tensor), nested like the field."""
    if isinstance(value, Tensor):
        return ("rows", value.split(1, dim=0))
    return ("tuple", tuple(_split_rows(v) for v in value))


def _take_row(split: tuple, row: int) -> Tensor | tuple:
    kind, parts = split
    if kind == "rows":
        return parts[row]
    return tuple(_take_row(p, row) for p in parts)


def _flatten(v) -> list[Tensor]:
    if isinstance(v, Tensor):
        return [v]
    if isinstance(v, tuple):
        return [t for x in v for t in _flatten(x)]
    return []


class CausalHiFTGenerator(_HiFTBase):
    """CosyVoice 3 causal HiFT vocoder with a look-ahead of ``conv_pre_look_right`` mel frames.

    The harmonic source uses fixed uniform noise per absolute sample position.  By default it is the noise
    the reference has with the released CosyVoice 3 config (reproduced exactly, generated lazily);
    :meth:`set_source_noise` installs the seeded recipe used by the test fixtures.
    """

    def __init__(self, in_channels: int = 80, base_channels: int = 512, nb_harmonics: int = 8,
                 sampling_rate: int = 22050, nsf_alpha: float = 0.1, nsf_sigma: float = 0.003,
                 nsf_voiced_threshold: float = 10, upsample_rates: Sequence[int] = (8, 8),
                 upsample_kernel_sizes: Sequence[int] = (16, 16), istft_params: dict | None = None,
                 resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
                 resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 source_resblock_kernel_sizes: Sequence[int] = (7, 11),
                 source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
                 lrelu_slope: float = 0.1, audio_limit: float = 0.99, conv_pre_look_right: int = 4,
                 f0_predictor: nn.Module | None = None) -> None:
        super().__init__(True, in_channels, base_channels, nb_harmonics, sampling_rate, nsf_alpha, nsf_sigma,
                         nsf_voiced_threshold, upsample_rates, upsample_kernel_sizes,
                         istft_params or {"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes,
                         resblock_dilation_sizes, source_resblock_kernel_sizes,
                         source_resblock_dilation_sizes, lrelu_slope, audio_limit, f0_predictor,
                         conv_pre_look_right)
        if conv_pre_look_right < 1:
            raise ValueError(f"conv_pre_look_right must be >= 1, got {conv_pre_look_right}")
        if self.n_fft % self.hop_len or (self.n_fft // 2) % self.hop_len:
            raise ValueError("istft_params: n_fft and n_fft/2 must be multiples of hop_len (causal HiFT)")
        if not isinstance(self.f0_predictor, CausalConvRNNF0Predictor):
            raise TypeError("CausalHiFTGenerator needs a CausalConvRNNF0Predictor as f0_predictor")
        self.conv_pre_look_right = conv_pre_look_right
        self._noise_spec: tuple = ("reference", CV3_REFERENCE_NOISE_OFFSET)
        self._noise_tables: dict[str, UniformNoiseTable] | None = None
        self._rand_ini: Tensor | None = None
        self._noise_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # locks cannot be pickled or deep-copied; the noise tables are rebuilt lazily from the spec
        state = self.__dict__.copy()
        state["_noise_lock"] = None
        state["_noise_tables"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._noise_lock = threading.Lock()

    # ------------------------------------------------------------------ fixed noise
    def set_source_noise(self, seed: int, length: int | None = None) -> None:
        """Fixed noise from dedicated generators: initial phases from ``seed`` (column 0 zeroed), sine
        noise from ``seed + 1``, noise-branch uv from ``seed + 2`` (rows of ``torch.rand(1, N, 9)`` and
        ``torch.rand(1, N, 1)``).

        ``length`` limits the samples a stream may use (the reference has 300 s); None means unlimited,
        the rows are produced on demand.
        """
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0 or None, got {length}")
        with self._noise_lock:
            self._noise_spec = ("seeded", int(seed), length)
            self._noise_tables = None
            self._rand_ini = None

    def set_reference_source_noise(self, offset: int = CV3_REFERENCE_NOISE_OFFSET) -> None:
        """The noise the reference draws at construction after its flow's seed-0 reset.

        ``offset`` is the number of uniform draws in between (see :func:`reference_noise_offset`); the
        default is the released CosyVoice 3 config's.  This is the default noise.
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        with self._noise_lock:
            self._noise_spec = ("reference", int(offset))
            self._noise_tables = None
            self._rand_ini = None

    def _tables(self) -> dict[str, UniformNoiseTable]:
        with self._noise_lock:
            if self._noise_tables is not None:
                return self._noise_tables
            h = self.nb_harmonics + 1
            if self._noise_spec[0] == "seeded":
                _, seed, length = self._noise_spec
                rand_ini = torch.rand(1, h, generator=torch.Generator().manual_seed(seed))
                sine = UniformNoiseTable(torch.Generator().manual_seed(seed + 1).get_state(), h, length)
                uv = UniformNoiseTable(torch.Generator().manual_seed(seed + 2).get_state(), 1, length)
            else:
                g = torch.Generator().manual_seed(0)
                torch.randn(1, 80, 50 * 300, generator=g)
                offset = self._noise_spec[1]
                while offset > 0:  # skip in bounded pieces
                    n = min(offset, 1 << 22)
                    torch.rand(n, generator=g)
                    offset -= n
                rand_ini = torch.rand(1, h, generator=g)
                sine = UniformNoiseTable(g.get_state(), h, None)
                uv = _LazyAfter(g.get_state(), _REFERENCE_NOISE_ROWS * h + h + 1)
            rand_ini[:, 0] = 0
            self._rand_ini = rand_ini
            self._noise_tables = {"sine": sine, "uv": uv}
            return self._noise_tables

    @property
    def source_rand_ini(self) -> Tensor:
        """Initial phases [1, H] of the fixed noise (drawn for parity; they do not affect the output)."""
        self._tables()
        return self._rand_ini.clone()

    def source_noise(self, start: int, stop: int, which: str = "sine") -> Tensor:
        """Fixed uniform noise rows [1, stop - start, H] ('sine') or [1, n, 1] ('uv', unused here)."""
        if which not in ("sine", "uv"):
            raise ValueError(f"which must be 'sine' or 'uv', got {which!r}")
        return self._tables()[which].rows(start, stop)

    # ------------------------------------------------------------------ streaming
    def new_cache(self, batch_size: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> CausalHiFTCache:
        """Empty cache for a stream starting at mel frame 0."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = self.conv_pre
        dev = torch.device(device) if device is not None else self.stft_window.device
        dt = dtype or self.stft_window.dtype
        sd = _spectral(dt)
        like = torch.zeros(batch_size, 1, 0, device=dev, dtype=dt)
        f0_pending, f0_tails = self.f0_predictor.initial_state(like.to(torch.float64))
        z = lambda c, n: torch.zeros(batch_size, c, n, device=dev, dtype=dt)  # noqa: E731
        down_tails = tuple(z(d.in_channels, d.left_context) for d in self.source_downs)
        up_tails = tuple(z(u.in_channels, u.left_context) for u in self.ups)
        empties = tuple(z(u.out_channels, 0) for u in self.ups)
        return CausalHiFTCache(
            mel_frames=0,
            f0_pending=f0_pending,
            f0_tails=f0_tails,
            phase_sum=torch.zeros(batch_size, self.nb_harmonics + 1, dtype=torch.float64),  # CPU scan
            source_samples=0,
            stft_buf=torch.zeros(batch_size, 0, device=dev, dtype=sd),
            stft_started=False,
            down_tails=down_tails,
            source_res_tails=tuple(r.initial_tails(like) for r in self.source_resblocks),
            pre_pending=z(p.in_channels, 0),
            up_tails=up_tails,
            reflect_done=False,
            x_pending=empties,
            s_pending=empties,
            res_tails=tuple(r.initial_tails(like) for r in self.resblocks),
            post_tail=z(self.conv_post.in_channels, self.conv_post.left_context),
            istft_frames=torch.zeros(batch_size, 0, self.n_fft, device=dev, dtype=sd),
            istft_count=0,
            speech_samples=0,
            samples_per_frame=self.samples_per_frame,
        )

    def _source_stft(self, s: Tensor, buf: Tensor, started: bool, finalize: bool
                     ) -> tuple[Tensor, Tensor, bool]:
        """Centered (reflect-padded) STFT frames of the source whose samples are all known."""
        half = self.n_fft // 2
        buf = _cat_time(buf, s)
        if not started and buf.shape[-1] > half:
            buf = torch.cat([buf[..., 1:half + 1].flip(-1), buf], dim=-1)
            started = True
        if finalize:
            if not started:
                if buf.shape[-1] == 0:
                    return buf.new_zeros(buf.shape[0], self.n_fft + 2, 0), buf, started
                raise ValueError(f"the stream is too short to vocode ({buf.shape[-1]} source samples)")
            buf = torch.cat([buf, buf[..., -half - 1:-1].flip(-1)], dim=-1)
        n = buf.shape[-1]
        if not started or n < self.n_fft:
            return buf.new_zeros(buf.shape[0], self.n_fft + 2, 0), buf.clone(), started
        frames = (n - self.n_fft) // self.hop_len + 1
        used = (frames - 1) * self.hop_len + self.n_fft
        spec = torch.stft(buf[..., :used], self.n_fft, self.hop_len, self.n_fft,
                          window=self.stft_window.to(buf.dtype), center=False, return_complex=True)
        spec = torch.view_as_real(spec)
        spec = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
        return spec, buf[..., frames * self.hop_len:].clone(), started

    def _istft(self, x: Tensor, prev: Tensor, count: int, emitted: int, finalize: bool
               ) -> tuple[Tensor, Tensor, int, int]:
        """Overlap-add of new iSTFT frames; emits every output sample whose frames are all known.

        Output sample o sits at overlap-add position p = o + n_fft/2 (the centered transform's trim);
        block k covers p in [k*hop, (k+1)*hop) and sums segment j of frame k - j for j < n_fft/hop.
        The envelope (sum of squared windows) counts only frames that exist, as torch.istft does.
        """
        hop, r, half = self.hop_len, self.n_fft // self.hop_len, self.n_fft // 2
        frames = prev
        window = self.stft_window.to(prev.dtype)  # float32 inside a half model (see _spectral)
        if x.shape[-1]:
            t = torch.fft.irfft(self._spec_to_complex(x.to(prev.dtype)), n=self.n_fft, dim=1)
            t = t * window.view(1, -1, 1)
            frames = torch.cat([prev, t.transpose(1, 2)], dim=1)
        total = count + x.shape[-1]
        first = total - frames.shape[1]  # absolute index of frames[:, 0]
        keep = frames[:, max(0, frames.shape[1] - (r - 1)):].clone()
        lo = (emitted + half) // hop
        if finalize:
            hi = (half + hop * (total - 1)) // hop if total else lo
        else:
            hi = total
        bsz = frames.shape[0]
        if hi <= lo:
            return frames.new_zeros(bsz, 0), keep, total, emitted
        start = lo - r + 1  # first frame index the blocks [lo, hi) read
        if 0 < first and start < first:
            raise RuntimeError("internal: an iSTFT frame needed for overlap-add was dropped")
        have_lo, have_hi = max(start, first), min(hi, total)
        sel = frames[:, have_lo - first:have_hi - first]
        sel = F.pad(sel, (0, 0, have_lo - start, hi - have_hi)).view(bsz, hi - start, r, hop)
        idx = torch.arange(start, hi, device=frames.device)
        exists = ((idx >= 0) & (idx < total)).to(frames.dtype).unsqueeze(-1)
        w2 = window.pow(2).view(r, hop)
        nb = hi - lo
        acc = sel[:, r - 1:r - 1 + nb, 0]
        env = exists[r - 1:r - 1 + nb] * w2[0]
        for j in range(1, r):
            acc = acc + sel[:, r - 1 - j:r - 1 - j + nb, j]
            env = env + exists[r - 1 - j:r - 1 - j + nb] * w2[j]
        out = (acc / env).reshape(bsz, nb * hop)[:, emitted + half - lo * hop:]
        return out, keep, total, emitted + out.shape[-1]

    def _advance(self, mel: Tensor, c: CausalHiFTCache, finalize: bool, noise_starts: Sequence[int] | None = None
                 ) -> tuple[Tensor, Tensor, CausalHiFTCache]:
        """One streaming step. ``noise_starts``: for stacked streams (``stream_step_rows``), where each row's
        fixed source noise starts (default: every row at ``c.source_samples``)."""
        if c.finalized:
            raise ValueError("this stream was finalized; start a new cache with new_cache()")
        _check_mel("mel_new", mel, self.in_channels)
        if mel.shape[0] != c.phase_sum.shape[0]:
            raise ValueError(f"mel_new batch {mel.shape[0]} != the cache's batch {c.phase_sum.shape[0]}")
        dt = self.stft_window.dtype
        mel = mel.to(device=self.stft_window.device, dtype=dt)
        spf = self.samples_per_frame

        # F0 in float64, then the harmonic source for the new F0 frames
        f0, f0_pending, f0_tails = self.f0_predictor.stream(mel.to(torch.float64), c.f0_pending, c.f0_tails,
                                                            finalize)
        f0 = f0.to(_spectral(dt))
        n_src = f0.shape[-1] * spf
        table = self._tables()["sine"]
        if noise_starts is None:
            noise = table.rows(c.source_samples, c.source_samples + n_src)
        else:
            noise = torch.cat([table.rows(start, start + n_src) for start in noise_starts], dim=0)
        source, phase_sum = self.m_source.causal_frames(f0, c.phase_sum, noise)

        # source branch: STFT, then each stage's down-sampling conv and resblock
        spec, stft_buf, started = self._source_stft(source.squeeze(1), c.stft_buf, c.stft_started, finalize)
        spec = spec.to(dt)
        s_stage, down_tails, sres_tails = [], [], []
        for i, down in enumerate(self.source_downs):
            si, t = _conv_run(spec, c.down_tails[i], down.weight, down.bias, stride=down.stride[0])
            si, rt = self.source_resblocks[i].stream(si, c.source_res_tails[i])
            s_stage.append(si)
            down_tails.append(t)
            sres_tails.append(rt)

        # main branch
        x = mel
        if finalize:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], self.conv_pre_look_right)], dim=-1)
        x, pre_pending = _conv_run(x, c.pre_pending, self.conv_pre.weight, self.conv_pre.bias)
        up_tails, x_pend, s_pend, res_tails = [], [], [], list(c.res_tails)
        reflect_done = c.reflect_done
        for i, up in enumerate(self.ups):
            x = F.leaky_relu(x, self.lrelu_slope).repeat_interleave(self.upsample_rates[i], dim=-1)
            x, t = _conv_run(x, c.up_tails[i], up.weight, up.bias)
            up_tails.append(t)
            if i == self.num_upsamples - 1 and not reflect_done and x.shape[-1] > 0:
                if x.shape[-1] < 2:
                    raise RuntimeError("internal: the reflect padding needs two samples")
                x = torch.cat([x[..., 1:2], x], dim=-1)
                reflect_done = True
            xp, sp = _cat_time(c.x_pending[i], x), _cat_time(c.s_pending[i], s_stage[i])
            n = min(xp.shape[-1], sp.shape[-1])
            x = xp[..., :n] + sp[..., :n]
            x_pend.append(xp[..., n:].clone())
            s_pend.append(sp[..., n:].clone())
            xs = None
            for j in range(self.num_kernels):
                k = i * self.num_kernels + j
                y, res_tails[k] = self.resblocks[k].stream(x, c.res_tails[k])
                xs = y if xs is None else xs + y
            x = xs / self.num_kernels
        x, post_tail = _conv_run(F.leaky_relu(x), c.post_tail, self.conv_post.weight, self.conv_post.bias)
        speech, frames, count, emitted = self._istft(x, c.istft_frames, c.istft_count, c.speech_samples,
                                                     finalize)
        speech = speech.clamp(-self.audio_limit, self.audio_limit)
        if finalize and any(p.shape[-1] for p in x_pend + s_pend):
            raise RuntimeError("internal: branches did not line up at the end of the stream")
        new = replace(
            c, mel_frames=c.mel_frames + mel.shape[-1], f0_pending=f0_pending, f0_tails=f0_tails,
            phase_sum=phase_sum, source_samples=c.source_samples + n_src, stft_buf=stft_buf,
            stft_started=started, down_tails=tuple(down_tails), source_res_tails=tuple(sres_tails),
            pre_pending=pre_pending, up_tails=tuple(up_tails), reflect_done=reflect_done,
            x_pending=tuple(x_pend), s_pending=tuple(s_pend), res_tails=tuple(res_tails), post_tail=post_tail,
            istft_frames=frames, istft_count=count, speech_samples=emitted, finalized=finalize,
        )
        return speech, source, new

    @torch.inference_mode()
    def stream_step(self, mel_new: Tensor, cache: CausalHiFTCache | None = None, finalize: bool = False
                    ) -> tuple[Tensor, CausalHiFTCache]:
        """Vocode the next mel frames [B, 80, t] of a stream; O(t) work whatever came before.

        Returns the speech samples that became final [B, s] and the new cache (the given one is not
        changed).  Without ``finalize`` about ``conv_pre_look_right`` frames stay held back as look-ahead;
        with it the stream is flushed.  Concatenated outputs equal ``inference(all frames)``.
        """
        if cache is None:
            _check_mel("mel_new", mel_new, self.in_channels)
            cache = self.new_cache(mel_new.shape[0], mel_new.device)
        speech, _, cache = self._advance(mel_new, cache, finalize)
        return speech, cache

    def _row_signature(self, mel: Tensor, c: CausalHiFTCache, finalize: bool) -> tuple | None:
        """What must be equal for streams to share one step: everything but their absolute position.

        A step's arithmetic depends on position only through the source noise (taken per row) and through the
        overlap-add bookkeeping, which is translation invariant once the first iSTFT frames exist: the frame
        and sample counters enter as differences and as the sample count modulo the hop. None: not stackable
        (stream start or end, where the absolute position matters).
        """
        hop, r, half = self.hop_len, self.n_fft // self.hop_len, self.n_fft // 2
        if finalize or c.finalized or not (c.stft_started and c.reflect_done):
            return None
        if (c.speech_samples + half) // hop - r + 1 < 0:
            return None
        shapes = tuple(tuple(t.shape) for v in c.__dict__.values() for t in _flatten(v))
        return (tuple(mel.shape), c.istft_count * hop - c.speech_samples, c.speech_samples % hop, shapes)

    @torch.inference_mode()
    def stream_step_rows(self, mels: list[Tensor], caches: list[CausalHiFTCache | None], finalize: list[bool]
                         ) -> list[tuple[Tensor, CausalHiFTCache]]:
        """``stream_step`` for many streams (batch 1 each): streams in the same state but at different positions
        (see ``_row_signature``) run as one batch; the others one by one. Each gets what it gets alone."""
        results: list[tuple[Tensor, CausalHiFTCache] | None] = [None] * len(mels)
        groups: dict[tuple, list[int]] = {}
        for i, (mel, cache, fin) in enumerate(zip(mels, caches, finalize)):
            sig = None if cache is None or mel.shape[0] != 1 else self._row_signature(mel, cache, fin)
            if sig is None:
                results[i] = self.stream_step(mel, cache, finalize=fin)
            else:
                groups.setdefault(sig, []).append(i)
        for rows in groups.values():
            if len(rows) == 1:
                results[rows[0]] = self.stream_step(mels[rows[0]], caches[rows[0]], finalize=False)
                continue
            row_caches = [caches[i] for i in rows]
            first = row_caches[0]
            stacked = replace(first, **{k: _stack_field([getattr(c, k) for c in row_caches])
                                        for k, v in first.__dict__.items() if _flatten(v)})  # fmt: skip
            speech, _, new = self._advance(torch.cat([mels[i] for i in rows], dim=0), stacked, False,
                                           noise_starts=[c.source_samples for c in row_caches])
            split = {k: _split_rows(v) for k, v in new.__dict__.items() if _flatten(v)}
            for j, (i, old) in enumerate(zip(rows, row_caches)):
                fields = {k: _take_row(v, j) for k, v in split.items()}
                for k in ("mel_frames", "source_samples", "istft_count", "speech_samples"):
                    fields[k] = getattr(old, k) + getattr(new, k) - getattr(first, k)
                results[i] = (speech[j : j + 1], replace(new, **fields))
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def inference(self, speech_feat: Tensor, finalize: bool = True) -> tuple[Tensor, Tensor]:
        """Mel [B, 80, T] -> (speech, source), the reference's offline call.

        ``finalize`` True: T*480 samples, the end zero-padded.  False: the last frames are treated as
        look-ahead of a longer stream and (T - 8)*480 samples come out, as in the reference (the streaming
        API emits more of them; see :meth:`stream_step`); the source then covers T - 3 frames.
        """
        _check_mel("speech_feat", speech_feat, self.in_channels)
        cache = self.new_cache(speech_feat.shape[0], speech_feat.device)
        speech, source, _ = self._advance(speech_feat, cache, finalize)
        if not finalize:
            held = self.f0_predictor.lookahead + self.conv_pre_look_right + 1
            speech = speech[:, :max(0, speech_feat.shape[-1] - held) * self.samples_per_frame]
        return speech, source


class _LazyAfter:
    """A [1, N, 1] uniform stream that starts ``skip`` draws after a generator state (made on first use)."""

    def __init__(self, state: Tensor, skip: int) -> None:
        self._state, self._skip = state, skip
        self._table: UniformNoiseTable | None = None

    def rows(self, start: int, stop: int) -> Tensor:
        if self._table is None:
            g = torch.Generator()
            g.set_state(self._state)
            left = self._skip
            while left > 0:
                n = min(left, 1 << 22)
                torch.rand(n, generator=g)
                left -= n
            self._table = UniformNoiseTable(g.get_state(), 1, None)
        return self._table.rows(start, stop)
