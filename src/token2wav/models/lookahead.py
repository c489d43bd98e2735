"""Pre-lookahead layer of the CosyVoice 3 flow: a right-looking conv then a causal conv, with a residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PreLookaheadLayer"]


class PreLookaheadLayer(nn.Module):
    """Token features ``[B, T, C]`` -> ``[B, T, C]``; output ``j`` depends on inputs ``j-2 .. j+L``.

    ``conv1`` (kernel ``L + 1``) looks ``L = pre_lookahead_len`` frames to the right, ``conv2`` (kernel 3)
    looks two frames of ``conv1`` output to the left. Keys and sizes follow the reference so its weights load.
    """

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 1) -> None:
        super().__init__()
        if pre_lookahead_len < 0:
            raise ValueError(f"pre_lookahead_len must be >= 0, got {pre_lookahead_len}")
        self.in_channels = in_channels
        self.channels = channels
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1, stride=1, padding=0)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3, stride=1, padding=0)

    @property
    def history_len(self) -> int:
        """How many input frames left of a window ``forward(history=...)`` needs to be exact."""
        return self.conv2.kernel_size[0] - 1

    def forward(self, inputs: Tensor, context: Tensor | None = None, *, history: Tensor | None = None) -> Tensor:
        """Run the layer on ``inputs`` ``[B, T, C]``.

        context: the features of up to ``pre_lookahead_len`` frames that follow ``inputs`` (the lookahead
            tokens of a non-final streaming call). Missing frames, all of them when ``None``, are zeros, as at
            the end of an utterance. Fewer than ``pre_lookahead_len`` frames is a shorter runtime lookahead.
        history: up to ``history_len`` frames that precede ``inputs`` in the same sequence, for computing a
            window of a longer sequence exactly. Fewer frames than ``history_len`` (or ``None``) means
            ``inputs`` starts at the beginning of the sequence, where the reference pads with zeros.
        """
        if inputs.dim() != 3:
            raise ValueError(f"inputs must be [B, T, C], got shape {tuple(inputs.shape)}")
        batch, _, chans = inputs.shape
        look = self.pre_lookahead_len
        if context is None or context.numel() == 0:
            context = inputs.new_zeros(batch, 0, chans)
        if history is None or history.numel() == 0:
            history = inputs.new_zeros(batch, 0, chans)
        for name, extra, limit in (("context", context, look), ("history", history, self.history_len)):
            if extra.dim() != 3 or extra.shape[0] != batch or extra.shape[2] != chans:
                raise ValueError(f"{name} must be [B={batch}, n, C={chans}], got shape {tuple(extra.shape)}")
            if extra.shape[1] > limit:
                raise ValueError(f"{name} may hold at most {limit} frames, got {extra.shape[1]}")

        n_hist = history.shape[1]
        seq = torch.cat([history, inputs, context], dim=1).transpose(1, 2)
        # zeros stand in for lookahead frames that are not there (end of input or a shorter lookahead)
        seq = F.pad(seq, (0, look - context.shape[1]))
        hidden = F.leaky_relu(self.conv1(seq))
        # conv2 is causal: conv1 outputs left of the sequence start are zeros, the history supplies the rest
        hidden = F.pad(hidden, (self.history_len - n_hist, 0))
        out = self.conv2(hidden).transpose(1, 2)
        return out + inputs
