"""HiFi-GAN generator (V1 layout, "resblock 1"), the vocoder of the bundled demo voice.

Parameter names follow the original generator checkpoints (``conv_pre``, ``ups.i``, ``resblocks.j.convs1.k``,
``conv_post``) in their weight-norm form (``weight_g``, ``weight_v``, ``bias``), so such a checkpoint's
``generator`` dict loads with ``load_state_dict(strict=True)`` as it is.

Weight norm: weight = g * v / ||v||, the norm taken over every dimension but the first. Because the norm
removes any per-slice scale of v, a v stored as int8 with one scale per first-dimension slice loads
directly (the scale cancels); the demo ships its vocoder that way.

Streaming: `vocode_stream` runs the generator over a window of past mel context plus the new frames and
keeps back the newest frames whose receptive field still reaches into the future, so concatenated chunks
reproduce the offline output to float rounding, without cross-fades. The state is a dataclass, never
stored on the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HiFiGANGenerator", "HiFiGANStreamState", "vocode_stream"]

LRELU_SLOPE = 0.1


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

    def effective_weight(self) -> Tensor:
        if self._folded is not None:
            return self._folded
        return self.weight_v * (self.weight_g / _norm_except_dim0(self.weight_v))

    def fold(self) -> None:
        """Cache the effective weight (parameters stay for state-dict compatibility)."""
        with torch.no_grad():
            self._folded = None
            self._folded = self.effective_weight().detach().clone()

    def unfold(self) -> None:
        self._folded = None


class WNConv1d(_WeightNormMixin, nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


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
        for c1, c2 in zip(self.convs1, self.convs2):
            y = c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
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
        # vocode_stream's window when the caller gives none; loading sets them from the config's vocoder_stream
        self.stream_left_context = 24
        self.stream_lookahead = 8
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

    def forward(self, mel: Tensor) -> Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.in_channels:
            raise ValueError(f"mel must have shape (B, {self.in_channels}, frames), got {tuple(mel.shape)}")
        if self.training:
            if self._is_folded:
                self._unfold()
        elif not self._is_folded:
            self.fold_weight_norm()
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            acc = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                acc = acc + self.resblocks[i * self.num_kernels + j](x)
            x = acc / self.num_kernels
        # The original uses leaky_relu's default slope (0.01) here, not LRELU_SLOPE.
        x = self.conv_post(F.leaky_relu(x, 0.01))
        return torch.tanh(x)


@dataclass
class HiFiGANStreamState:
    """Mel frames seen but not yet fully vocoded, plus how many frames of audio were already emitted."""

    context: Tensor | None = None  # (B, n_mels, L): left context followed by pending frames
    pending: int = 0  # trailing frames of `context` whose audio has not been emitted


def vocode_stream(
    generator: HiFiGANGenerator,
    mel: Tensor,
    state: HiFiGANStreamState | None = None,
    *,
    final: bool = False,
    left_context: int | None = None,
    lookahead: int | None = None,
) -> tuple[Tensor, HiFiGANStreamState]:
    """Vocode (B, n_mels, n) new frames; returns (B, samples) of newly final audio and the next state.

    Audio for a frame is emitted once `lookahead` later frames are known (or at `final`), computed from
    `left_context` earlier frames. With both at least the generator's effective receptive radius the
    result equals the offline `generator(all_mel)` up to float rounding. Cost per chunk: its own frames
    plus left_context + lookahead frames."""
    window = _plan_window(generator, mel, state, final, left_context, lookahead)
    if isinstance(window, HiFiGANStreamState):
        return mel.new_zeros(mel.shape[0], 0), window
    return window.cut(generator(window.mel)[:, 0])


@dataclass(frozen=True)
class _Window:
    """One streaming call's vocoder input window and how to cut its audio."""

    mel: Tensor  # (B, n_mels, stop - start)
    ctx: Tensor
    pending: int
    ready: int
    first: int  # index in ctx of the first frame not yet emitted
    start: int  # index in ctx where the window starts
    hop: int
    left_context: int

    def cut(self, wav: Tensor) -> tuple[Tensor, HiFiGANStreamState]:
        """The newly final audio from the window's waveform ``(B, samples)``, and the next state."""
        lo = (self.first - self.start) * self.hop
        audio = wav[:, lo : lo + self.ready * self.hop]
        keep_from = max(0, self.first + self.ready - self.left_context)
        return audio, HiFiGANStreamState(self.ctx[:, :, keep_from:], self.pending - self.ready)


def _plan_window(
    generator: HiFiGANGenerator, mel: Tensor, state: HiFiGANStreamState | None, final: bool,
    left_context: int | None, lookahead: int | None,
) -> _Window | HiFiGANStreamState:
    """The window a call vocodes, or (nothing ready yet) the next state."""
    # unset: the generator's own (its config's ``vocoder_stream``; 24 / 8 if it has none)
    left_context = generator.stream_left_context if left_context is None else left_context
    lookahead = generator.stream_lookahead if lookahead is None else lookahead
    if left_context < 0 or lookahead < 0:
        raise ValueError(f"left_context and lookahead must be >= 0, got {left_context} and {lookahead}")
    state = state or HiFiGANStreamState()
    ctx = mel if state.context is None else torch.cat([state.context, mel], dim=2)
    pending = state.pending + mel.shape[2]
    ready = pending if final else max(0, pending - lookahead)
    if ready == 0:
        return HiFiGANStreamState(ctx, pending)
    total = ctx.shape[2]
    first = total - pending
    start = max(0, first - left_context)
    stop = total if final else min(total, first + ready + lookahead)
    return _Window(ctx[:, :, start:stop], ctx, pending, ready, first, start, generator.hop_length, left_context)


def vocode_stream_rows(
    generator: HiFiGANGenerator,
    mels: list[Tensor],
    states: list[HiFiGANStreamState | None],
    finals: list[bool],
    *,
    left_context: int | None = None,
    lookahead: int | None = None,
) -> list[tuple[Tensor, HiFiGANStreamState]]:
    """``vocode_stream`` for many streams (batch 1 each): windows of equal length go through the generator as
    one batch, so each row computes exactly what it computes alone (a padded window would not: the generator's
    receptive field reaches past the ``lookahead`` frames, by about 1e-3 on the demo voice). In a steady stream
    every window has ``left_context + hop + lookahead`` frames, so rows at the same hop share one call."""
    results: list[tuple[Tensor, HiFiGANStreamState] | None] = [None] * len(mels)
    groups: dict[int, list[tuple[int, _Window]]] = {}
    for i, (mel, state, final) in enumerate(zip(mels, states, finals)):
        window = _plan_window(generator, mel, state, final, left_context, lookahead)
        if isinstance(window, HiFiGANStreamState):
            results[i] = (mel.new_zeros(mel.shape[0], 0), window)
        else:
            groups.setdefault(window.mel.shape[2], []).append((i, window))
    for group in groups.values():
        stacked = group[0][1].mel if len(group) == 1 else torch.cat([w.mel for _, w in group], dim=0)
        wav = generator(stacked)[:, 0]
        for row, (i, window) in enumerate(group):
            results[i] = window.cut(wav[row : row + 1])
    return results  # type: ignore[return-value]
