"""HiFi-GAN generator (V1 layout, "resblock 1"), the vocoder of the bundled demo voice.

Parameter names follow the original generator checkpoints (``conv_pre``, ``ups.i``, ``resblocks.j.convs1.k``,
``conv_post``) in their weight-norm form (``weight_g``, ``weight_v``, ``bias``), so such a checkpoint's
``generator`` dict loads with ``load_state_dict(strict=True)`` as it is.

Weight norm: weight = g * v / ||v||, the norm taken over every dimension but the first. Because the norm
removes any per-slice scale of v, a v stored as int8 with one scale per first-dimension slice loads
directly (the scale cancels); the demo ships its vocoder that way. The effective weights are computed once
(``fold_weight_norm``), never per call.

Streaming with carried state (``vocode_stream``): every convolution keeps the tail of its input that later
outputs still need, and emits only the outputs whose right context has arrived; where two paths of different
delay meet (a residual add, the sum of a stage's resblocks) the earlier path's surplus waits in the state.
Nothing is computed twice, a call costs in proportion to its new frames, and the concatenated chunks equal
the offline ``generator(all_mel)`` up to float rounding (the same convolutions over other lengths). The price
is the network's right receptive field (12.7 mel frames for V1), held back until later frames or the end
arrive. The state is a value, never stored on the module; a call never changes the state it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VOCODER_PRECISIONS", "VOCODER_PRECISION_HELP", "HiFiGANGenerator", "HiFiGANStreamState", "vocode_stream",
           "vocode_stream_rows"]

# float32 throughout, or bfloat16 in the middle stages' resblocks (HiFiGANGenerator.set_precision)
VOCODER_PRECISIONS = ("float32", "bfloat16-mixed")
VOCODER_PRECISION_HELP = ("bfloat16-mixed: a HiFi-GAN vocoder's (the demo voice's) middle stages in bfloat16, 1.4x "
                          "faster where the CPU has native bfloat16, about 48 dB SNR off float32 (default: float32)")

LRELU_SLOPE = 0.1


# Activations run as [B, C, 1, T] stored channels-last ([B, 1, T, C] in memory) through 2-D convolutions: on CPU,
# oneDNN convolves that layout 1.1x (wide early stages) to 3x (narrow late stages) faster than [B, C, T], the
# whole generator 1.05-1.3x (measured, float32, 2 threads: benchmarks/vocoder_cpu.py), equal to float rounding.
_CHANNELS_LAST = torch.channels_last


def frames_last(x: Tensor) -> Tensor:
    """``[B, C, T]`` -> ``[B, C, 1, T]`` in the generator's channels-last layout."""
    return x.unsqueeze(2).contiguous(memory_format=_CHANNELS_LAST)


def _norm_except_dim0(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class _WeightNormMixin:
    """Conv whose weight is g * v / ||v|| (legacy weight-norm parameter names), foldable for inference."""

    def _init_weight_norm(self) -> None:
        w = self.weight.detach()
        del self.weight
        self.weight_g = nn.Parameter(_norm_except_dim0(w).clone())
        self.weight_v = nn.Parameter(w.clone())
        self._folded: Tensor | None = None
        self._folded_2d: Tensor | None = None
        # None: compute in the weights' dtype; else (bfloat16) convolve in it, inputs and outputs cast (float32
        # accumulation inside oneDNN); set by HiFiGANGenerator.set_precision
        self.compute_dtype: torch.dtype | None = None
        self._low: tuple[Tensor, Tensor | None] | None = None

    def effective_weight(self) -> Tensor:
        if self._folded is not None:
            return self._folded
        return self.weight_v * (self.weight_g / _norm_except_dim0(self.weight_v))

    def weight_2d(self) -> Tensor:
        """The effective weight as a 2-D kernel ``[.., .., 1, k]`` in the channels-last layout."""
        if self._folded_2d is not None:
            return self._folded_2d
        return self.effective_weight().unsqueeze(2).contiguous(memory_format=_CHANNELS_LAST)

    def fold(self) -> None:
        """Cache the effective weight (parameters stay for state-dict compatibility)."""
        with torch.no_grad():
            self._folded = self._folded_2d = self._low = None
            self._folded = self.effective_weight().detach().clone()
            self._folded_2d = self.weight_2d().detach()

    def unfold(self) -> None:
        self._folded = self._folded_2d = self._low = None

    def low_weights(self) -> tuple[Tensor, Tensor | None]:
        """The 2-D kernel and bias in ``compute_dtype``, cast once while the weights are folded."""
        if self._low is not None:
            return self._low
        dtype = self.compute_dtype
        low = (self.weight_2d().to(dtype).contiguous(memory_format=_CHANNELS_LAST),
               None if self.bias is None else self.bias.to(dtype))
        if self._folded_2d is not None:
            self._low = low
        return low


class WNConv1d(_WeightNormMixin, nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def frames(self, x: Tensor, padded: bool = True) -> Tensor:
        """The conv on ``[B, C, 1, T]`` channels-last frames; ``padded=False``: no zero padding (valid)."""
        geometry = ((1, self.stride[0]), (0, self.padding[0] if padded else 0), (1, self.dilation[0]), self.groups)
        if self.compute_dtype is not None and self.compute_dtype != x.dtype:
            weight, bias = self.low_weights()
            return F.conv2d(x.to(self.compute_dtype), weight, bias, *geometry).to(x.dtype)
        return F.conv2d(x, self.weight_2d(), self.bias, *geometry)


class WNConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose1d(
            x,
            self.effective_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )

    def frames(self, x: Tensor, padded: bool = True) -> Tensor:
        """The transposed conv on ``[B, C, 1, T]`` channels-last frames; ``padded=False``: nothing trimmed."""
        return F.conv_transpose2d(x, self.weight_2d(), self.bias, (1, self.stride[0]),
                                  (0, self.padding[0] if padded else 0), (0, self.output_padding[0]), self.groups,
                                  (1, self.dilation[0]))


def _same_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs with leaky ReLUs and residual connections."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=1, padding=_same_padding(kernel_size, 1))
            for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, C, 1, T]`` channels-last frames."""
        for c1, c2 in zip(self.convs1, self.convs2):
            y = c2.frames(F.leaky_relu(c1.frames(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
            x = x + y
        return x


class HiFiGANGenerator(nn.Module):
    """Mel (B, in_channels, F) -> waveform (B, 1, F * prod(upsample_rates)) in [-1, 1]."""

    def __init__(
        self,
        in_channels: int = 80,
        upsample_rates: Sequence[int] = (8, 8, 2, 2),
        upsample_kernel_sizes: Sequence[int] = (16, 16, 4, 4),
        upsample_initial_channel: int = 512,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        resblock: str | int = "1",
        sampling_rate: int = 22050,
        **_training_only,
    ):
        super().__init__()
        if str(resblock) != "1":
            raise ValueError(f"resblock must be '1' (the V1/universal layout), got {resblock!r}")
        if len(upsample_rates) != len(upsample_kernel_sizes):
            raise ValueError(
                "upsample_rates and upsample_kernel_sizes must have the same length, got "
                f"{len(upsample_rates)} and {len(upsample_kernel_sizes)}"
            )
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        self.in_channels = in_channels
        self.upsample_rates = [int(u) for u in upsample_rates]
        self.sampling_rate = sampling_rate
        self.num_kernels = len(resblock_kernel_sizes)
        self._is_folded = False
        self.conv_pre = WNConv1d(in_channels, upsample_initial_channel, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = upsample_initial_channel
        for u, k in zip(upsample_rates, upsample_kernel_sizes):
            self.ups.append(WNConvTranspose1d(ch, ch // 2, k, stride=u, padding=(k - u) // 2))
            ch //= 2
            for rk, rd in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(ch, rk, rd))
        self.conv_post = WNConv1d(ch, 1, 7, padding=3)
        # Loading new weights invalidates folded weights (see fold_weight_norm).
        self.register_load_state_dict_post_hook(lambda module, _keys: module._unfold())

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame."""
        n = 1
        for u in self.upsample_rates:
            n *= u
        return n

    def fold_weight_norm(self) -> HiFiGANGenerator:
        """Compute every weight once for inference. Eval-mode forwards do this by themselves; the cache is
        dropped on load_state_dict and recomputed on .to()/.half(). Training-mode forwards never use it."""
        for m in self.modules():
            if isinstance(m, _WeightNormMixin):
                m.fold()
        self._is_folded = True
        return self

    @property
    def precision(self) -> str:
        """``"float32"`` (every conv in the weights' dtype) or ``"bfloat16-mixed"`` (see ``set_precision``)."""
        mixed = any(isinstance(m, WNConv1d) and m.compute_dtype is not None for m in self.resblocks.modules())
        return "bfloat16-mixed" if mixed else "float32"

    def set_precision(self, precision: str) -> HiFiGANGenerator:
        """``"bfloat16-mixed"``: the resblocks of the middle upsampling stages (1 and 2 of V1's four, about 60 %
        of the generator's FLOPs) convolve in bfloat16; the first conv, the upsamplers, the outer stages and the
        output conv stay in float32. Measured on the demo voice: 47.6-48.6 dB SNR against float32, 1.4x faster on
        a CPU with AVX512-BF16. The whole generator in bfloat16 is 19-21 dB off, mostly from rounding the log-mel
        input. ``"float32"``: everything in the weights' dtype (the default)."""
        if precision not in VOCODER_PRECISIONS:
            raise ValueError(f"vocoder precision must be one of {VOCODER_PRECISIONS}, got {precision!r}")
        dtype = None
        if precision == "bfloat16-mixed":
            if self.conv_pre.weight_v.dtype != torch.float32:
                raise ValueError(f"vocoder precision 'bfloat16-mixed' needs float32 weights, these are "
                                 f"{self.conv_pre.weight_v.dtype}")
            dtype = torch.bfloat16
        stages = range(1, len(self.ups) - 1)
        for i, block in enumerate(self.resblocks):
            for conv in block.modules():
                if isinstance(conv, WNConv1d):
                    conv.compute_dtype = dtype if i // self.num_kernels in stages else None
                    conv._low = None
        return self

    def _unfold(self) -> None:
        for m in self.modules():
            if isinstance(m, _WeightNormMixin):
                m.unfold()
        self._is_folded = False

    def _apply(self, fn, recurse=True):  # keep folded caches in step with .to() / .half()
        out = super()._apply(fn, recurse)
        for m in self.modules():
            if isinstance(m, _WeightNormMixin) and m._folded is not None:
                m.fold()
        return out

    def _check_mel(self, mel: Tensor) -> None:
        if mel.dim() != 3 or mel.shape[1] != self.in_channels:
            raise ValueError(f"mel must have shape (B, {self.in_channels}, frames), got {tuple(mel.shape)}")

    def _ready_weights(self) -> None:
        if self.training:
            if self._is_folded:
                self._unfold()
        elif not self._is_folded:
            self.fold_weight_norm()

    def forward(self, mel: Tensor) -> Tensor:
        self._check_mel(mel)
        self._ready_weights()
        x = self.conv_pre.frames(frames_last(mel))
        for i, up in enumerate(self.ups):
            x = up.frames(F.leaky_relu(x, LRELU_SLOPE))
            acc = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                acc = acc + self.resblocks[i * self.num_kernels + j](x)
            x = acc / self.num_kernels
        # The original uses leaky_relu's default slope (0.01) here, not LRELU_SLOPE.
        x = self.conv_post.frames(F.leaky_relu(x, 0.01))
        return torch.tanh(x)[:, :, 0]


@dataclass(frozen=True)
class HiFiGANStreamState:
    """Where a stream's vocoding stands: per convolution the input tail its next outputs need, per junction of
    two paths the earlier path's samples still waiting for the later one, per transposed conv how many leading
    outputs the offline padding still trims. ``frames``: mel frames taken; ``samples``: audio emitted."""

    buffers: dict[str, Tensor] = field(default_factory=dict)
    trims: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    samples: int = 0
    finished: bool = False

    def signature(self) -> tuple:
        """Equal for states whose buffers have equal shapes but the batch: such streams can share a call."""
        return (tuple((k, tuple(v.shape[1:])) for k, v in self.buffers.items()), tuple(self.trims.items()),
                self.finished)


class _Step:
    """One streaming call over a batch of streams: reads the old state, writes a new one."""

    def __init__(self, old: HiFiGANStreamState, final: bool) -> None:
        self.old, self.final = old, final
        self.buffers: dict[str, Tensor] = {}
        self.trims: dict[str, int] = dict(old.trims)

    def conv(self, key: str, conv: WNConv1d, x: Tensor) -> Tensor:
        """A "same"-padded conv: zeros stand for the input before the start and (on the final call) after the
        end, as in the offline padding; outputs are emitted once their whole receptive field is known."""
        pad, dilation = conv.padding[0], conv.dilation[0]
        span = (conv.kernel_size[0] - 1) * dilation  # input samples an output needs beyond its own
        tail = self.old.buffers.get(key)
        if tail is None:  # the start of the stream: the offline left padding
            tail = _zeros(x, x.shape[1], pad)
        buf = torch.cat([tail, x], dim=-1)
        if self.final:
            buf = torch.cat([buf, _zeros(x, x.shape[1], pad)], dim=-1)
        n_out = buf.shape[-1] - span
        if n_out <= 0:
            self.buffers[key] = _own(buf)
            return _zeros(buf, conv.out_channels, 0)
        self.buffers[key] = _own(buf[..., n_out:])
        return conv.frames(buf.contiguous(memory_format=_CHANNELS_LAST), padded=False)

    def up(self, key: str, conv: WNConvTranspose1d, x: Tensor) -> Tensor:
        """A transposed conv (stride u, kernel k, padding p): output position n (before the padding's trim)
        takes inputs m with m * u <= n < m * u + k, so it is complete once input floor(n / u) is known; the
        last (k - 1) // u inputs are kept for the outputs they still reach. The offline padding trims p
        outputs at the start and leaves k - u - p past the last input's stride at the end."""
        u, k, p = conv.stride[0], conv.kernel_size[0], conv.padding[0]
        tail = self.old.buffers.get(key)
        buf = x if tail is None else torch.cat([tail, x], dim=-1)
        keep = (k - 1) // u
        self.buffers[key] = _own(buf[..., buf.shape[-1] - min(keep, buf.shape[-1]):])
        if buf.shape[-1] == 0:
            return _zeros(buf, conv.out_channels, 0)
        y = conv.frames(buf.contiguous(memory_format=_CHANNELS_LAST), padded=False)
        start = (buf.shape[-1] - x.shape[-1]) * u
        stop = start + x.shape[-1] * u + (k - u - p if self.final else 0)
        trim = self.trims.get(key, p)
        first = start + min(trim, stop - start)
        self.trims[key] = trim - (first - start)
        return y[..., first:stop]

    def join(self, key: str, parts: list[Tensor]) -> list[Tensor]:
        """The common prefix of paths that emit the same positions with different delays; each path's
        surplus waits in the state for the others."""
        held = [self._held(f"{key}.{j}", part) for j, part in enumerate(parts)]
        n = min(h.shape[-1] for h in held)
        for j, h in enumerate(held):
            self.buffers[f"{key}.{j}"] = _own(h[..., n:])
        return [h[..., :n] for h in held]

    def _held(self, key: str, x: Tensor) -> Tensor:
        before = self.old.buffers.get(key)
        return x if before is None or before.shape[-1] == 0 else torch.cat([before, x], dim=-1)


def _own(tail: Tensor) -> Tensor:
    """A state buffer in storage of its own: a view would keep the whole activation it was cut from alive for
    as long as the state lives (hundreds of MB per stream across the generator's convolutions)."""
    return tail.clone(memory_format=_CHANNELS_LAST)


def _zeros(like: Tensor, channels: int, n: int) -> Tensor:
    return like.new_zeros(like.shape[0], channels, 1, n).contiguous(memory_format=_CHANNELS_LAST)


def _stream_generator(g: HiFiGANGenerator, mel: Tensor, step: _Step) -> Tensor:
    """``HiFiGANGenerator.forward`` as a streaming step (the same operations in the same order)."""
    x = step.conv("conv_pre", g.conv_pre, frames_last(mel))
    for i, up in enumerate(g.ups):
        x = step.up(f"ups.{i}", up, F.leaky_relu(x, LRELU_SLOPE))
        branches = []
        for j in range(g.num_kernels):
            n = i * g.num_kernels + j
            branches.append(_stream_resblock(g.resblocks[n], f"resblocks.{n}", x, step))
        parts = step.join(f"stage.{i}", branches)
        acc = parts[0]
        for part in parts[1:]:
            acc = acc + part
        x = acc / g.num_kernels
    x = step.conv("conv_post", g.conv_post, F.leaky_relu(x, 0.01))
    return torch.tanh(x)[:, :, 0]


def _stream_resblock(block: ResBlock1, key: str, x: Tensor, step: _Step) -> Tensor:
    for k, (c1, c2) in enumerate(zip(block.convs1, block.convs2)):
        y = step.conv(f"{key}.convs1.{k}", c1, F.leaky_relu(x, LRELU_SLOPE))
        y = step.conv(f"{key}.convs2.{k}", c2, F.leaky_relu(y, LRELU_SLOPE))
        skip, y = step.join(f"{key}.res.{k}", [x, y])
        x = skip + y
    return x


def vocode_stream(
    generator: HiFiGANGenerator,
    mel: Tensor,
    state: HiFiGANStreamState | None = None,
    *,
    final: bool = False,
) -> tuple[Tensor, HiFiGANStreamState]:
    """Vocode (B, n_mels, n) new frames; returns (B, samples) of newly final audio and the next state.

    A sample is emitted once every mel frame its receptive field reaches is known (or at ``final``, which
    flushes the stream). Cost: the new frames only. Concatenated outputs equal ``generator(all_mel)`` up to
    float rounding."""
    state = state or HiFiGANStreamState()
    if state.finished:
        raise ValueError("this stream was finished (final=True); start a new one with state=None")
    generator._check_mel(mel)
    generator._ready_weights()
    step = _Step(state, final)
    audio = _stream_generator(generator, mel.to(generator.conv_pre.bias.dtype), step)[:, 0]
    return audio, HiFiGANStreamState(step.buffers, step.trims, state.frames + mel.shape[-1],
                                     state.samples + audio.shape[-1], final)


def vocode_stream_rows(
    generator: HiFiGANGenerator,
    mels: list[Tensor],
    states: list[HiFiGANStreamState | None],
    finals: list[bool],
) -> list[tuple[Tensor, HiFiGANStreamState]]:
    """``vocode_stream`` for many streams (batch 1 each). Rows whose states have the same shape (in a steady
    stream: every row past its start) and that bring as many frames, equally final, go through the generator
    as one batch; each row computes exactly what it computes alone (no padding enters any row)."""
    results: list[tuple[Tensor, HiFiGANStreamState] | None] = [None] * len(mels)
    groups: dict[tuple, list[int]] = {}
    states = [s or HiFiGANStreamState() for s in states]
    for i, (mel, state, final) in enumerate(zip(mels, states, finals)):
        if mel.shape[0] != 1:
            raise ValueError(f"vocode_stream_rows takes one stream per row, got a batch of {mel.shape[0]}")
        groups.setdefault((mel.shape[-1], final, state.signature()), []).append(i)
    for (_, final, _), rows in groups.items():
        if len(rows) == 1:
            i = rows[0]
            results[i] = vocode_stream(generator, mels[i], states[i], final=final)
            continue
        first = states[rows[0]]
        stacked = HiFiGANStreamState(
            {k: torch.cat([states[i].buffers[k] for i in rows], dim=0) for k in first.buffers},
            dict(first.trims), first.frames, first.samples, first.finished,
        )
        audio, state = vocode_stream(generator, torch.cat([mels[i] for i in rows], dim=0), stacked, final=final)
        for r, i in enumerate(rows):
            own = states[i]
            results[i] = (audio[r : r + 1], HiFiGANStreamState(
                {k: _own(v[r : r + 1]) for k, v in state.buffers.items()}, dict(state.trims),
                own.frames + mels[i].shape[-1], own.samples + audio.shape[-1], final,
            ))
    return results  # type: ignore[return-value]
