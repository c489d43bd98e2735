"""Named streaming presets, resolved to values that are valid for a given model.

A preset only fills in what the caller left unset (hop, schedule, max_hop); explicit arguments always win.

* ``assistant``: the smallest valid first hop (lowest first-chunk latency), then the reference's doubling.
* ``balanced``: the reference's defaults: one chunk first, doubling up to four chunks.
* ``quality``: larger hops (two chunks, doubling up to eight): fewer calls and, for a vocoder that
  cross-fades its seams (CosyVoice 2), fewer seams. With a causal vocoder the cached output does not depend
  on the hop at all; only latency and per-call overhead change.
* ``constrained``: balanced hops, with a copy of the flow whose Linear layers are int8 dynamically quantized
  (CPU only; made once per engine). Output deviates slightly from float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PRESETS = ("assistant", "balanced", "quality", "constrained")


@dataclass(frozen=True)
class PresetSettings:
    """What a preset resolves to for one model. Token counts are target tokens."""

    name: str
    hop: int
    schedule: str
    max_hop: int | None
    chunk_tokens: int  # attention chunk the session decodes with
    quantize: bool
    summary: str

    def first_chunk_tokens(self, lookahead: int, pad: int = 0) -> int:
        """Tokens that must arrive before the first chunk comes out (prompt pad included)."""
        return self.hop + pad + lookahead

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _chunk_range(config: Any) -> tuple[int, int, int]:
    """(trained chunk, smallest supported chunk, largest supported chunk), all in tokens."""
    trained = config.static_chunk_size // config.token_mel_ratio
    supported = getattr(config, "supported_chunk_tokens", None)
    if supported:
        return trained, int(supported[0]), int(supported[1])
    return trained, trained, trained


def resolve_preset(name: str, config: Any) -> PresetSettings:
    """The settings preset ``name`` stands for on the model described by ``config`` (a ModelConfig)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    chunk, smallest, _ = _chunk_range(config)
    if name == "assistant":
        # the cap stays a whole number of (possibly smaller) chunks, at most the reference's four chunks
        cap = smallest * max(1, (4 * chunk) // smallest)
        return PresetSettings(
            name, hop=smallest, schedule="exponential", max_hop=cap, chunk_tokens=smallest,
            quantize=False, summary="lowest first-chunk latency, then hops double",
        )
    if name == "quality":
        return PresetSettings(
            name, hop=2 * chunk, schedule="exponential", max_hop=8 * chunk, chunk_tokens=chunk,
            quantize=False, summary="larger hops: fewer calls and seams, more latency",
        )
    return PresetSettings(
        name, hop=chunk, schedule="exponential", max_hop=4 * chunk, chunk_tokens=chunk,
        quantize=name == "constrained",
        summary=(
            "reference defaults with an int8-quantized flow (CPU)" if name == "constrained"
            else "reference defaults: one chunk, doubling to four"
        ),
    )


def describe_presets(config: Any) -> str:
    """A human-readable table of what every preset resolves to for this model (``token2wav info``)."""
    rate = float(config.token_rate)
    look = int(config.pre_lookahead_len)
    lines = [
        f"presets (chunk = {config.static_chunk_size // config.token_mel_ratio} tokens, "
        f"lookahead = {look} tokens, {config.token_rate} tokens/s):"
    ]
    for name in PRESETS:
        s = resolve_preset(name, config)
        first = s.first_chunk_tokens(look)
        cap = f"up to {s.max_hop}" if s.schedule == "exponential" else "fixed"
        lines.append(
            f"  {name:<12} hop {s.hop} tokens ({s.hop / rate:.2f} s), {s.schedule} {cap}; first chunk after "
            f"{first} tokens ({first / rate:.2f} s) + prompt pad; chunk {s.chunk_tokens} tokens"
            f"{'; int8 flow' if s.quantize else ''} - {s.summary}"
        )
    return "\n".join(lines)


__all__ = ["PRESETS", "PresetSettings", "resolve_preset", "describe_presets"]
