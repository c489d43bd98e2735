"""Hop schedules and lookahead bookkeeping for streaming sessions.

Everything here is a pure function of integers: a session's emission plan can be checked without a model.

Vocabulary (all counts in tokens unless a name says ``frames``):

* chunk: the estimator's attention block, ``static_chunk_size`` mel frames, i.e. ``static_chunk_size / ratio``
  tokens.
  The chunk grid starts at the first prompt frame.
* pad: extra tokens added to the first hop so that ``prompt + first hop`` ends on a chunk boundary; after that
  every emission boundary is a chunk boundary as long as hops are whole chunks.
* lookahead: ``pre_lookahead_len`` tokens past a boundary that the pre-lookahead convolution reads before the
  frames up to that boundary are final. A chunk is emitted once ``hop + lookahead`` tokens past the offset
  exist.
"""

from __future__ import annotations

from dataclasses import dataclass

# adaptive: each hop chosen from the listener's clock (streaming/pacing.py), between `hop` and `max_hop`
SCHEDULES = ("fixed", "exponential", "adaptive")
# The reference doubles the hop after every emission (its stream_scale_factor).
GROWTH_FACTOR = 2
# The reference's cap: four chunks.
DEFAULT_MAX_HOP_CHUNKS = 4


def nearby_multiples(value: int, factor: int, count: int = 2) -> list[int]:
    """Up to ``count`` positive multiples of ``factor`` on each side of ``value``, in increasing order."""
    below = [m for m in range((value // factor) * factor, 0, -factor) if m != value][:count]
    start = (value // factor + 1) * factor
    above = [start + i * factor for i in range(count)]
    return sorted(below + above)


def chunk_tokens(static_chunk_size: int, token_mel_ratio: int) -> int:
    """Tokens per attention chunk; the chunk (in mel frames) must hold a whole number of tokens."""
    if not isinstance(token_mel_ratio, int) or token_mel_ratio < 1:
        raise ValueError(f"token_mel_ratio must be a positive integer, got {token_mel_ratio!r}")
    if not isinstance(static_chunk_size, int) or static_chunk_size < 1:
        raise ValueError(f"static_chunk_size must be a positive int (mel frames), got {static_chunk_size!r}")
    if static_chunk_size % token_mel_ratio:
        near = nearby_multiples(static_chunk_size, token_mel_ratio)
        raise ValueError(
            f"static_chunk_size={static_chunk_size} mel frames is not a multiple of token_mel_ratio="
            f"{token_mel_ratio}, so a chunk would split a token; valid nearby values: {near}"
        )
    return static_chunk_size // token_mel_ratio


def prompt_pad(prompt_tokens: int, chunk: int) -> int:
    """Tokens to add to the first hop so that prompt + first hop ends on a chunk boundary."""
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    return (-prompt_tokens) % chunk


def validate_hop(value: int, chunk: int, *, name: str = "hop", dynamic: bool = False) -> int:
    """Check a hop length in tokens; without dynamic chunks it must be a whole number of chunks."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (tokens), got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 token, got {value}")
    if not dynamic and value % chunk:
        near = nearby_multiples(value, chunk)
        raise ValueError(
            f"{name}={value} tokens is not a multiple of the model's chunk ({chunk} tokens); this model was "
            f"trained with a fixed chunk, so {name} must be one of {chunk}, {2 * chunk}, {3 * chunk}, ... "
            f"(nearest: {near})"
        )
    return value


@dataclass(frozen=True)
class HopPlan:
    """How many tokens each emission consumes.

    ``hop`` is the base hop; emission 0 consumes ``hop + pad``; with the exponential schedule emission k >= 1
    consumes ``min(max_hop, hop * 2**k)``, the reference's growth, restarted for every session. With the
    adaptive schedule the session chooses each later hop (a multiple of ``chunk`` in ``[hop, max_hop]``) from
    its listener's clock; ``hop_at`` then gives the smallest.
    """

    hop: int
    pad: int
    lookahead: int
    schedule: str = "fixed"
    max_hop: int | None = None
    chunk: int | None = None  # the session's chunk: adaptive hops are multiples of it (default: hop)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.hop < 1:
            raise ValueError(f"hop must be >= 1 token, got {self.hop}")
        if self.pad < 0 or self.lookahead < 0:
            raise ValueError("pad and lookahead must be >= 0")
        if self.max_hop is not None and self.max_hop < self.hop:
            raise ValueError(f"max_hop={self.max_hop} must be >= hop={self.hop}")

    def hop_at(self, index: int) -> int:
        """Tokens consumed by emission ``index`` (0-based)."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        if index == 0:
            return self.hop + self.pad
        if self.schedule in ("fixed", "adaptive"):
            return self.hop
        cap = self.max_hop if self.max_hop is not None else self.hop
        # Stop doubling once past the cap so huge indices stay cheap.
        grown = self.hop
        for _ in range(index):
            grown *= GROWTH_FACTOR
            if grown >= cap:
                return cap
        return grown

    def needed(self, index: int) -> int:
        """Tokens past the offset that must exist before emission ``index`` can run."""
        return self.hop_at(index) + self.lookahead


@dataclass(frozen=True)
class Emission:
    """One flow call of a session: target tokens [start, end) become final.

    ``prefix`` is how many target tokens the call reads (``end + lookahead`` for a streaming emission, all
    tokens for the final one). The chunk's mel frames are ``[start * ratio, end * ratio)``, counted from the
    first target frame.
    """

    index: int
    start: int
    end: int
    prefix: int
    finalize: bool

    def frames(self, token_mel_ratio: int) -> tuple[int, int]:
        return self.start * token_mel_ratio, self.end * token_mel_ratio


def ready_emissions(plan: HopPlan, available: int, offset: int, index: int) -> list[Emission]:
    """All non-final emissions that ``available`` target tokens allow, starting at ``offset`` / ``index``."""
    out: list[Emission] = []
    while available - offset >= plan.needed(index):
        end = offset + plan.hop_at(index)
        out.append(Emission(index=index, start=offset, end=end, prefix=end + plan.lookahead, finalize=False))
        offset, index = end, index + 1
    return out


def final_emission(available: int, offset: int, index: int) -> Emission:
    """The closing call: every remaining token, lookahead included, is decoded with finalize."""
    if available < offset:
        raise ValueError(f"available={available} tokens is less than offset={offset}")
    return Emission(index=index, start=offset, end=available, prefix=available, finalize=True)


def plan_stream(plan: HopPlan, pushes: list[int]) -> list[Emission]:
    """The whole emission sequence for a stream fed by pushes of the given sizes, then finished."""
    emissions: list[Emission] = []
    available = offset = index = 0
    for n in pushes:
        if n < 0:
            raise ValueError(f"push sizes must be >= 0, got {n}")
        available += n
        new = ready_emissions(plan, available, offset, index)
        if new:
            offset, index = new[-1].end, new[-1].index + 1
        emissions.extend(new)
    emissions.append(final_emission(available, offset, index))
    return emissions
