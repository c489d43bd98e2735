"""The one owner of model calls: ready chunk rows in, mel and audio out.

Every call of a flow's or vocoder's compute methods in the engine is in this module: the prompt's flow state,
the offline decode and vocoding, and the chunks of streams. A *row* is one session's next chunk: the session's
fixed settings (``StreamSpec``), its working state and the emission it plans. ``run_rows`` computes any mix of
rows that the scheduler grouped to share a call (1..N, first and last chunks, any positions): the flow for all
of them in one ``stream_step_rows`` call where they share one, then the vocoder, batched by kind.

Exactness: a row's chunk is what it would be alone (``stream_step_rows`` is tested against ``stream_step``).
A row commits into its working state only; the session adopts that state once its whole push succeeded. When
a packed call raises, its rows are re-run one by one, so a failing row cannot take the others down.

Vocoders. A stepped vocoder (CosyVoice 3's CausalHiFT) streams exactly with its own cache, and so does our
HiFi-GAN through ``vocode_stream`` (each conv carries its input tail; nothing is recomputed): chunks equal the
offline vocoding to float rounding. CosyVoice 2's HiFT is driven the reference's way: the previous call's
last 8 mel frames and 8 x 480 source samples carried over, the seam cross-faded with a Hamming window (not
equal to offline audio: random source per call, blended seams; see ``session.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.hifigan import HiFiGANGenerator, vocode_stream, vocode_stream_rows
from ..models.interfaces import CachedFlow, RowsVocoder, SteppedVocoder
from ..models.kv_pool import PageTable, PoolExhaustedError
from .schedule import Emission
from .state import CrossFadeVocoderState, PreparedPrompt, RevocodeState, SessionState

__all__ = ["Chunk", "Row", "StreamSpec", "offline_mel", "prompt_flow_state", "run_rows", "vocode_whole",
           "vocoder_kind", "CacheExhaustedError"]

# The reference's CosyVoice 2 vocoder hand-over: 8 mel frames of context, their samples cross-faded.
MEL_CACHE_FRAMES = 8


class CacheExhaustedError(RuntimeError):
    """The key/value page pool has no page left for a row (its budget is spent)."""


def vocoder_kind(vocoder: nn.Module | None) -> str | None:
    """How a vocoder streams: 'causal' (its own stream_step, e.g. CausalHiFT), 'hifigan' (our HiFi-GAN with
    its carried-state ``vocode_stream``) or 'crossfade' (CosyVoice 2's HiFT, driven the reference's way)."""
    if vocoder is None:
        return None
    if isinstance(vocoder, SteppedVocoder):
        return "causal"
    if isinstance(vocoder, HiFiGANGenerator):
        return "hifigan"
    return "crossfade"


@dataclass(frozen=True, eq=False)
class StreamSpec:
    """What one session's chunks are computed with, fixed for its life (made by ``Token2Wav``)."""

    flow: nn.Module
    vocoder: nn.Module | None  # None: mel output
    prompt: PreparedPrompt
    prompt_state: Callable[[], Any] | None  # the shared flow state after the prompt (None: recompute)
    mode: str  # cached / recompute / window
    output: str  # audio / mel
    ratio: int  # token_mel_ratio
    samples_per_frame: int
    sample_rate: int
    n_timesteps: int
    rng: Callable[[int], torch.Generator | None]  # vocoder call index -> generator (CosyVoice 2's HiFT)
    lookahead: int | None = None  # run-time lookahead where it differs from the trained one
    chunk_size: int | None = None  # run-time chunk in frames (dynamic-chunk models)
    window_frames: int | None = None
    window_fn: Callable[[Any, int], Any] | None = None  # window mode: trims a flow state

    @property
    def vocoder_kind(self) -> str | None:
        return vocoder_kind(self.vocoder)

    @property
    def audio_s_per_token(self) -> float:
        return self.ratio * self.samples_per_frame / self.sample_rate

    def history(self, start: int) -> int:
        """The tokens a chunk that starts at target token ``start`` attends to before its own (the prompt's and
        the earlier chunks', within the window of a ``window`` session): what its cost grows with."""
        before = self.prompt.num_tokens + start
        if self.window_frames is not None:
            before = min(before, self.prompt.num_tokens + self.window_frames // self.ratio)
        return before


@dataclass(eq=False)
class Row:
    """One session's next chunk. ``work`` is the session's working state; it is advanced in place."""

    spec: StreamSpec
    work: SessionState
    emission: Emission
    table: PageTable | None = None  # the session's key/value pages (paged cached rows)
    flow_finished: bool = False  # set once the row's pages are no longer read or written


@dataclass(frozen=True)
class Chunk:
    """A computed row: its mel ``[mel_dim, frames]``, for audio output its samples, and the wall time of the
    flow and vocoder calls it was computed in (a shared call's time divided by its rows)."""

    mel: np.ndarray
    audio: np.ndarray | None
    flow_s: float = 0.0
    vocoder_s: float = 0.0

    @property
    def value(self) -> np.ndarray:
        """What the session's caller gets: the audio, or the mel for ``output='mel'``."""
        return self.mel if self.audio is None else self.audio


# ------------------------------------------------------------------------------------------------ offline


def prompt_flow_state(flow: nn.Module, prompt: PreparedPrompt, **options: Any) -> Any:
    """The flow's cache after the prompt (computed once per prompt by the engine's prompt cache)."""
    if not isinstance(flow, CachedFlow):
        raise NotImplementedError(
            f"{type(flow).__name__} has no cached streaming API (stream_start / stream_step); use mode='recompute'"
        )
    with torch.inference_mode():
        return flow.stream_start(prompt.tokens, prompt.feat, prompt.embedding, **options)


def offline_mel(flow: nn.Module, tokens: torch.Tensor, prompt: PreparedPrompt, *, streaming: bool,
                n_timesteps: int, **extra: Any) -> torch.Tensor:
    """All tokens' mel in one flow call: full attention, or chunk-causal with ``streaming=True``."""
    with torch.inference_mode():
        mel = flow.inference(tokens, prompt.tokens, prompt.feat, prompt.embedding, streaming=streaming,
                             finalize=True, n_timesteps=n_timesteps, **extra)  # fmt: skip
    return mel


def vocode_whole(vocoder: nn.Module, mel: torch.Tensor, *, rng: Callable[[int], torch.Generator | None],
                 piece_frames: int) -> torch.Tensor:
    """A whole mel ``[1, mel_dim, frames]`` as samples ``[1, n]``. A long mel goes through a stepped vocoder's
    streaming API ``piece_frames`` at a time (the same samples to float rounding), so activations stay bounded."""
    kind = vocoder_kind(vocoder)
    with torch.inference_mode():
        if kind == "causal" and mel.shape[-1] > piece_frames:
            cache, parts = None, []
            for start in range(0, mel.shape[-1], piece_frames):
                last = start + piece_frames >= mel.shape[-1]
                part, cache = vocoder.stream_step(mel[..., start : start + piece_frames], cache, finalize=last)
                parts.append(part)
            return torch.cat(parts, dim=-1)
        if kind == "causal":
            return vocoder.inference(mel, finalize=True)[0]
        if kind == "hifigan":
            return vocoder(mel)[:, 0]
        return vocoder.inference(mel, generator=rng(0))[0]


# ------------------------------------------------------------------------------------------------ streams


def run_rows(
    rows: list[Row],
    *,
    buckets: Any = None,
    padded: Callable[[nn.Module, int], Any] | None = None,
    flow_done: Callable[[list[Row]], None] | None = None,
) -> list[Chunk | BaseException]:
    """Compute rows that may share a call; one result per row: its chunk, or the exception it raised.

    buckets / padded: the scheduler's padded sizes for eager calls and its fixed-shape solver (graphs) for a
    (flow, steps). flow_done(rows) is called as soon as rows' flow work is over (their pages may then be freed).
    """

    def finished(done: list[Row]) -> None:
        fresh = [r for r in done if not r.flow_finished]
        for r in fresh:
            r.flow_finished = True
        if fresh and flow_done is not None:
            flow_done(fresh)

    results: list[Chunk | BaseException | None] = [None] * len(rows)
    mels: list[torch.Tensor] | None = None
    flow_s = [0.0] * len(rows)
    if len(rows) > 1:
        t0 = time.perf_counter()
        try:
            mels = _flow_rows(rows, buckets, padded)
            finished(rows)
            flow_s = [(time.perf_counter() - t0) / len(rows)] * len(rows)
        except Exception:  # noqa: BLE001 - isolate the failing row below; the others still get their chunks
            mels = None
    to_vocode: list[tuple[int, Row, torch.Tensor, np.ndarray]] = []
    for i, row in enumerate(rows):
        try:
            t0 = time.perf_counter()
            try:
                mel = mels[i] if mels is not None else _flow_rows([row], buckets, padded)[0]
            finally:
                finished([row])
            if mels is None:
                flow_s[i] = time.perf_counter() - t0
            mel_np = _record(row, mel)
        except BaseException as exc:  # noqa: BLE001 - delivered to the row's caller
            results[i] = exc
            continue
        if row.spec.output == "mel":
            results[i] = Chunk(mel_np, None, flow_s=flow_s[i])
        else:
            to_vocode.append((i, row, mel, mel_np))
    for i, outcome in _vocode_rows(to_vocode):
        results[i] = replace(outcome, flow_s=flow_s[i]) if isinstance(outcome, Chunk) else outcome
    return results  # type: ignore[return-value]


def _record(row: Row, mel: torch.Tensor) -> np.ndarray:
    """Check the row's mel and advance its working state past the emission; the mel as numpy."""
    em, work = row.emission, row.work
    want = (em.end - em.start) * row.spec.ratio
    if mel.shape[-1] != want:
        raise RuntimeError(f"flow returned {mel.shape[-1]} mel frames for tokens [{em.start}, {em.end}), "
                           f"expected {want}")
    work.offset, work.index = em.end, em.index + 1
    work.chunk_frames.append(want)
    return mel[0].float().cpu().numpy()


def _flow_state(row: Row) -> Any:
    """The flow state the row's step continues (the shared prompt state before a session's first chunk)."""
    work = row.work
    if work.flow_state is None and row.spec.prompt_state is not None:
        work.flow_state = row.spec.prompt_state()
    return work.flow_state


def _commit_flow(row: Row, new_state: Any) -> None:
    spec = row.spec
    if spec.mode == "window" and not row.emission.finalize:
        new_state = spec.window_fn(new_state, spec.window_frames)
    row.work.flow_state = new_state


def _flow_rows(rows: list[Row], buckets: Any, padded: Callable[[nn.Module, int], Any] | None) -> list[torch.Tensor]:
    """Each row's mel; rows on pages (or several rows) in one ``stream_step_rows`` call."""
    with torch.inference_mode():
        if len(rows) == 1 and rows[0].table is None:
            return [_flow_one(rows[0])]
        spec = rows[0].spec
        extra: dict[str, Any] = {}
        if rows[0].table is not None:
            extra = {"tables": [r.table for r in rows], "buckets": buckets}
            if padded is not None:
                extra["padded"] = padded(spec.flow, spec.n_timesteps)
        try:
            out = spec.flow.stream_step_rows(
                [_flow_state(r) for r in rows],
                [r.work.tokens[:, : r.emission.prefix] for r in rows],
                finalize=[r.emission.finalize for r in rows],
                lookahead=[r.spec.lookahead for r in rows],
                **extra,
            )
        except PoolExhaustedError as exc:
            raise CacheExhaustedError(f"cache budget exceeded: {exc}") from exc
        mels = []
        for row, (mel, new_state) in zip(rows, out):
            _commit_flow(row, new_state)
            mels.append(mel)
        return mels


def _flow_one(row: Row) -> torch.Tensor:
    spec, em = row.spec, row.emission
    tokens = row.work.tokens[:, : em.prefix]
    p = spec.prompt
    if spec.mode == "recompute":
        # The reference's final call leaves `stream` at False: full attention over everything.
        mel = spec.flow.inference(tokens, p.tokens, p.feat, p.embedding, streaming=not em.finalize,
                                  finalize=em.finalize, n_timesteps=spec.n_timesteps)  # fmt: skip
        return mel[:, :, em.start * spec.ratio :]
    # chunk size and solver steps were fixed when the prompt state was made (stream_start)
    kwargs: dict[str, Any] = {"finalize": em.finalize}
    if spec.lookahead is not None:
        kwargs["lookahead"] = spec.lookahead
    mel, new_state = spec.flow.stream_step(_flow_state(row), tokens, **kwargs)
    _commit_flow(row, new_state)
    return mel


def _vocode_rows(rows: list[tuple[int, Row, torch.Tensor, np.ndarray]]) -> list[tuple[int, Chunk | BaseException]]:
    """Each row's audio: HiFi-GAN and stepped-vocoder rows of one vocoder through their batched steps, other
    vocoders (and recompute rows) one by one."""
    out: list[tuple[int, Chunk | BaseException]] = []
    groups: dict[tuple[str, int], list[tuple[int, Row, torch.Tensor, np.ndarray]]] = {}
    alone = []
    for item in rows:
        spec = item[1].spec
        kind = spec.vocoder_kind
        batched = kind == "hifigan" or (kind == "causal" and isinstance(spec.vocoder, RowsVocoder))
        if batched and spec.mode != "recompute":
            groups.setdefault((kind, id(spec.vocoder)), []).append(item)
        else:
            alone.append(item)
    for (kind, _), group in groups.items():
        if len(group) == 1:
            alone += group
            continue
        voc = group[0][1].spec.vocoder
        mels = [mel for _, _, mel, _ in group]
        states = [row.work.vocoder_state for _, row, _, _ in group]
        finals = [row.emission.finalize for _, row, _, _ in group]
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                if kind == "hifigan":
                    steps = vocode_stream_rows(voc, mels, states, finals)
                else:
                    steps = voc.stream_step_rows(mels, states, finals)
        except Exception:  # noqa: BLE001 - fall back to one row at a time below
            alone += group
            continue
        share = (time.perf_counter() - t0) / len(group)
        for (i, row, _, mel_np), (audio, state) in zip(group, steps):
            row.work.vocoder_state = state
            out.append((i, Chunk(mel_np, audio[0].float().cpu().numpy(), vocoder_s=share)))
    for i, row, mel, mel_np in alone:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                speech = _vocode_one(row, mel)
        except BaseException as exc:  # noqa: BLE001 - delivered to the row's caller
            out.append((i, exc))
        else:
            out.append((i, Chunk(mel_np, speech[0].float().cpu().numpy(), vocoder_s=time.perf_counter() - t0)))
    return out


def _vocode_one(row: Row, mel: torch.Tensor) -> torch.Tensor:
    spec, work, finalize = row.spec, row.work, row.emission.finalize
    voc = spec.vocoder
    kind = spec.vocoder_kind
    if kind == "hifigan":
        out, work.vocoder_state = vocode_stream(voc, mel, work.vocoder_state, final=finalize)
        return out
    if kind == "causal":
        if spec.mode == "recompute":
            st = work.vocoder_state or RevocodeState()
            full = mel if st.mel is None else torch.cat([st.mel, mel], dim=2)
            speech = voc.inference(full, finalize=finalize)[0]
            out = speech[:, st.speech_offset :]
            work.vocoder_state = RevocodeState(mel=full, speech_offset=st.speech_offset + out.shape[1])
            return out
        out, work.vocoder_state = voc.stream_step(mel, work.vocoder_state, finalize=finalize)
        return out
    return _crossfade_vocode(row, mel)


def _crossfade_vocode(row: Row, mel: torch.Tensor) -> torch.Tensor:
    spec, work, finalize = row.spec, row.work, row.emission.finalize
    st: CrossFadeVocoderState = work.vocoder_state or CrossFadeVocoderState()
    keep = MEL_CACHE_FRAMES * spec.samples_per_frame
    if st.mel_tail is not None:
        mel = torch.cat([st.mel_tail, mel], dim=2)
        cache_source = st.source_tail
    else:
        cache_source = mel.new_zeros(1, 1, 0)
    gen = spec.rng(work.vocoder_calls)
    work.vocoder_calls += 1
    speech, source = spec.vocoder.inference(mel, cache_source=cache_source, generator=gen)
    if st.speech_tail is not None:
        speech = _crossfade(speech, st.speech_tail, keep)
    if finalize:
        work.vocoder_state = CrossFadeVocoderState()
        return speech
    # cloned: a slice would keep the whole call's mel, source and speech alive in the session
    work.vocoder_state = CrossFadeVocoderState(
        mel_tail=mel[:, :, -MEL_CACHE_FRAMES:].clone(),
        source_tail=source[:, :, -keep:].clone(),
        speech_tail=speech[:, -keep:].clone(),
    )
    return speech[:, :-keep]


def _crossfade(fade_in: torch.Tensor, fade_out: torch.Tensor, overlap: int) -> torch.Tensor:
    """Blend the first ``overlap`` samples of ``fade_in`` with the held-back samples ``fade_out``; the blend
    under a symmetric Hamming window (as numpy.hamming) is computed in float64, then rounded."""
    win = torch.from_numpy(np.hamming(2 * overlap)).to(fade_in.device)
    out = fade_in.clone()
    head = fade_in[..., :overlap].double() * win[:overlap] + fade_out[..., -overlap:].double() * win[overlap:]
    out[..., :overlap] = head.to(out.dtype)
    return out
