"""A stream's options, resolved and validated once against a model's config.

``StreamOptions`` is what a caller may choose for a stream (hop, schedule, preset, mode, window, output,
lookahead); ``resolve(config)`` checks it against the model's config alone and returns ``ResolvedStream``, what
the session runs with. The engine, the command line's early checks (before any weights load), the server's
``start`` message and Ray's settings all go through it, so a rule and its message exist once. ``names`` maps an
option to the caller's spelling (the CLI's ``--window-frames``), so each caller's error names what it typed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..presets import PRESETS, PresetSettings, resolve_preset
from .schedule import DEFAULT_MAX_HOP_CHUNKS, SCHEDULES, chunk_tokens, validate_hop

__all__ = ["MODES", "OUTPUTS", "ResolvedStream", "StreamOptions"]

MODES = ("cached", "recompute", "window")
OUTPUTS = ("audio", "mel")


class _Names:
    """Spells an option as the caller does: ``hop`` (API), ``--hop`` (CLI)."""

    def __init__(self, names: Mapping[str, str] | None) -> None:
        self._names = dict(names or {})

    def __call__(self, option: str, value: Any = None, *, with_value: bool = False) -> str:
        name = self._names.get(option, option)
        if not with_value:
            return name
        return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def _one_of(spell: _Names, option: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{spell(option)} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class ResolvedStream:
    """A stream's settings once resolved: what its session plans and computes with."""

    hop: int  # tokens per emission (before the first emission's prompt pad)
    schedule: str
    max_hop: int | None
    mode: str
    output: str
    window_frames: int | None
    chunk: int  # tokens per attention chunk the session decodes with
    chunk_frames: int | None  # a run-time chunk in frames for dynamic-chunk models; None: the trained one
    lookahead: int  # the lookahead the session runs with
    lookahead_override: int | None  # passed to the flow where it differs from the trained lookahead
    preset: PresetSettings | None
    start_buffer_s: float | None = None

    @property
    def quantize(self) -> bool:
        return self.preset is not None and self.preset.quantize


@dataclass(frozen=True)
class StreamOptions:
    """What a caller chooses for one stream (every field optional)."""

    hop: int | None = None
    schedule: str | None = None
    max_hop: int | None = None
    mode: str = "cached"
    window_frames: int | None = None
    preset: str | None = None
    output: str = "audio"
    pre_lookahead_len: int | None = None
    start_buffer_ms: int | None = None  # the listener's start buffer; None: the session's recommendation

    @staticmethod
    def exact_under_any_hops(mode: str | None, preset: str | None, config: Any) -> bool:
        """Whether a stream's chunks are the same whatever its hop sequence, which the adaptive schedule needs:
        cached chunks are final; recompute, window and the int8 flow (a preset that quantizes) depend on it."""
        if mode not in (None, "cached"):
            return False
        return preset not in PRESETS or not resolve_preset(preset, config).quantize

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def resolve(self, config: Any, *, trained_lookahead: int | None = None,
                names: Mapping[str, str] | None = None) -> ResolvedStream:
        """Check these options against a model's config; raise ``ValueError`` (``TypeError`` for a wrong type)
        naming the option as ``names`` spells it. ``trained_lookahead``: the flow's trained lookahead, where the
        config's run-time one may differ (the demo voice)."""
        spell = _Names(names)
        _one_of(spell, "mode", self.mode, MODES)
        _one_of(spell, "output", self.output, OUTPUTS)
        if self.schedule is not None:
            _one_of(spell, "schedule", self.schedule, SCHEDULES)
        hop, schedule, max_hop = self.hop, self.schedule, self.max_hop
        settings = None
        if self.preset is not None:
            _one_of(spell, "preset", self.preset, PRESETS)
            settings = resolve_preset(self.preset, config)
            hop = settings.hop if hop is None else hop
            schedule = settings.schedule if schedule is None else schedule
            if schedule == "exponential" and max_hop is None:
                max_hop = settings.max_hop
        schedule = schedule or "fixed"
        ratio = int(config.token_mel_ratio)
        trained = chunk_tokens(int(config.static_chunk_size), ratio)
        supported = getattr(config, "supported_chunk_tokens", None)
        chunk, chunk_frames = trained, None
        if hop is not None and isinstance(hop, int) and not isinstance(hop, bool) and supported \
                and hop % trained and supported[0] <= hop <= supported[1]:
            chunk, chunk_frames = hop, hop * ratio  # a dynamic chunk: any hop the model supports
        if hop is None:
            hop = chunk
        else:
            try:
                validate_hop(hop, chunk, name=spell("hop"))
            except ValueError as exc:
                if supported:  # not "trained with a fixed chunk": say both ways this model takes a hop
                    raise ValueError(
                        f"{spell('hop', hop, with_value=True)} tokens: this model takes any hop in {supported[0]}.."
                        f"{supported[1]} tokens (a dynamic chunk), or a multiple of its trained chunk ({trained} "
                        f"tokens: {trained}, {2 * trained}, {3 * trained}, ...)") from None
                raise ValueError(str(exc).replace(f"{spell('hop')}={hop}", spell("hop", hop, with_value=True))) \
                    from None
        if max_hop is not None:
            if schedule not in ("exponential", "adaptive"):
                raise ValueError(f"{spell('max_hop')} only applies to schedule='exponential' or 'adaptive'")
            validate_hop(max_hop, chunk, name=spell("max_hop"))
            if max_hop < hop:
                raise ValueError(f"{spell('max_hop')}={max_hop} must be >= {spell('hop')}={hop}")
        elif schedule == "exponential":
            max_hop = max(hop, DEFAULT_MAX_HOP_CHUNKS * chunk)
        elif schedule == "adaptive":  # up to four trained chunks, in the session's chunks
            max_hop = max(hop, DEFAULT_MAX_HOP_CHUNKS * trained // chunk * chunk)
        lookahead = int(config.pre_lookahead_len)
        override = None
        look = self.pre_lookahead_len
        look_given = look is not None and look != lookahead  # a lookahead other than the config's, asked for
        if look_given:
            allowed = getattr(config, "supported_pre_lookahead", None)
            if not allowed or not allowed[0] <= look <= allowed[1]:
                what = f"{allowed[0]}..{allowed[1]}" if allowed else f"{lookahead} (trained value)"
                raise ValueError(f"{spell('pre_lookahead_len')}={look} is not supported by this model: allowed {what}")
            lookahead = override = int(look)
        elif trained_lookahead is not None and trained_lookahead != lookahead:
            override = lookahead  # a model trained with random lookahead runs at the config's
        if self.mode == "recompute" and (chunk_frames is not None or override is not None):
            rec = f"{spell('mode', 'recompute', with_value=True)} is the reference algorithm, trained chunk and " \
                  "lookahead only"
            if chunk_frames is not None:
                raise ValueError(f"{rec}: {spell('hop', hop, with_value=True)} is a dynamic chunk of this model; use a "
                                 f"multiple of the trained chunk ({trained} tokens)")
            if look_given:
                raise ValueError(f"{rec}: leave {spell('pre_lookahead_len')} out")
            raise ValueError(f"{rec}, which this model cannot run: it decodes with a lookahead of {lookahead} "
                             f"tokens, its flow was built with {trained_lookahead}; "
                             f"{spell('mode', 'cached', with_value=True)} is exact")
        if schedule == "adaptive" and not self.exact_under_any_hops(self.mode, self.preset, config):
            raise ValueError(f"{spell('schedule')}='adaptive' needs {spell('mode', 'cached', with_value=True)} without "
                             "the int8 flow (preset constrained): only there is a chunk the same whatever the hops")
        self._check_window(config, spell, chunk * ratio)
        buffer_ms = self.start_buffer_ms
        if buffer_ms is not None and (isinstance(buffer_ms, bool) or not isinstance(buffer_ms, (int, float))
                                      or not 0 <= buffer_ms <= 60_000):
            raise ValueError(f"{spell('start_buffer_ms')} must be a number of milliseconds in [0, 60000], "
                             f"got {buffer_ms!r}")
        return ResolvedStream(hop=hop, schedule=schedule, max_hop=max_hop, mode=self.mode, output=self.output,
                              window_frames=self.window_frames, chunk=chunk, chunk_frames=chunk_frames,
                              lookahead=lookahead, lookahead_override=override, preset=settings,
                              start_buffer_s=None if buffer_ms is None else buffer_ms / 1000)  # fmt: skip

    def _check_window(self, config: Any, spell: _Names, frames: int) -> None:
        window = self.window_frames
        if self.mode != "window":
            if window is not None:
                raise ValueError(f"{spell('window_frames')} only applies to {spell('mode', 'window', with_value=True)}")
            return
        if window is None:
            raise ValueError(
                f"{spell('mode', 'window', with_value=True)} needs {spell('window_frames')}: the target mel frames "
                f"kept in the attention cache, a positive multiple of the chunk ({frames} frames), e.g. "
                f"{spell('window_frames', 8 * frames, with_value=True)}"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{spell('window_frames')} must be a positive int, got {window!r}")
        if window % frames:
            lower = max(frames, window - window % frames)
            raise ValueError(f"{spell('window_frames', window, with_value=True)} must be a multiple of the chunk "
                             f"({frames} frames), e.g. {lower} or {lower + frames}")
        if getattr(config, "family", "cosyvoice3") != "cosyvoice3":
            raise ValueError(
                f"{spell('mode', 'window', with_value=True)} trims the DiT attention cache of CosyVoice 3-style "
                f"models; this is a {config.family} model: use {spell('mode', 'cached', with_value=True)}"
            )
