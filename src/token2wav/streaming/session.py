"""StreamSession: one stream's plan and state. Tokens in, audio (or mel) chunks out.

A session decides *what* to compute (which emissions its tokens make ready, from its hop plan) and owns its
state (``state.py``); it never calls a model. Each planned chunk goes to its scheduler (a ``Batcher``), which
computes it with ``compute.run_rows``: together with other sessions' chunks in a shared batcher, or at once on
the caller's thread for ``Token2Wav.stream()`` (a batch of one). Three modes produce the chunks:

* ``recompute``: the reference algorithm. Every emission re-runs the flow on the whole prefix and keeps
  the new frames; the last call uses full attention (the reference's ``stream=False`` on its final call).
  A causal vocoder re-vocodes all mel each call and returns the samples past what it already gave.
* ``cached``: ``flow.stream_step`` carries the attention / convolution caches, so a chunk costs only its own
  frames (plus attention to the cached keys); a causal vocoder is stepped with its own cache. The mel equals
  the chunk-causal offline decode (measured 1.2e-6 on the CV3 fixture model over 20 s).
* ``window``: ``cached`` with the attention cache limited to the prompt's chunks plus the last
  ``window_frames`` target frames, so memory and time per chunk stay bounded on very long streams. It is
  exactly chunk-causal attention with that window (tested), hence an approximation of the full-context
  decode: on the CV3 fixture model over 20 s, max |mel diff| 0.039 / 0.028 / 0.0125 / 0.004 for windows of
  1 / 4 / 8 / 16 chunks (mel std 1.24).

Audio. A causal vocoder (CosyVoice 3's CausalHiFT) streams exactly: fed the same mel, its chunks equal the
offline vocoding to 1e-7. Fed the cached mel, the audio differs from offline chunk-causal audio by ~1e-4 on
long streams (1.3e-4 over 20 s) because the F0 path integrates the mel's 1e-6 float rounding into the sine
phase; a 1e-6 mel perturbation alone moves offline audio by 2.8e-4 over 20 s.
A non-causal vocoder (CosyVoice 2's HiFT) is driven the reference's way in every mode: the previous call's
last 8 mel frames and 8 * 480 source samples are carried over and the seam is cross-faded with a Hamming
window. That audio is not the offline audio (random source per call, blended seams): max |diff| 0.067 at
|audio| max 0.12 on the CV2 fixture (the reference itself shows 0.084 between its stream and offline).
The vocoder's randomness comes from the session's ``rng`` (seed 0 by default), never the global RNG.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .compute import Chunk, StreamSpec
from .options import MODES, OUTPUTS
from .pacing import ComputeMeter, PlaybackClock, RateMeter, choose_hop, recommend_start_buffer
from .schedule import Emission, HopPlan, final_emission, ready_emissions
from .state import PreparedPrompt, SessionState

DEFAULT_TIMESTEPS = 10

log = logging.getLogger("token2wav.session")

RngSpec = int | torch.Generator | Callable[[int], torch.Generator | None] | None


class SessionClosedError(RuntimeError):
    """The session was finished or closed and takes no more calls."""


def as_tokens(tokens: Any, vocab_size: int, *, name: str = "tokens", device: Any = "cpu") -> torch.Tensor:
    """Token ids (list, numpy or torch; 1-D or [1, n]) as a [1, n] int64 tensor, range-checked."""
    if isinstance(tokens, torch.Tensor):
        t = tokens.detach().cpu()
    elif isinstance(tokens, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(tokens))
    elif isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        t = torch.tensor([int(tokens)])
    elif isinstance(tokens, Sequence) and not isinstance(tokens, (str, bytes)):
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in tokens):
            raise TypeError(f"{name} must hold integer token ids")
        t = torch.tensor([int(x) for x in tokens], dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be a sequence of ints, a numpy array or a torch tensor, "
                        f"got {type(tokens).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D or [1, n], got shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel():
        bad = ((t < 0) | (t >= vocab_size)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"{name}[{i}] = {int(t[i])} is outside the model's vocabulary: token ids must be in "
                f"[0, {vocab_size}) ({bad.numel()} id(s) out of range)"
            )
    return t.unsqueeze(0).to(device)


def make_rng(rng: RngSpec) -> tuple[Callable[[int], torch.Generator | None], torch.Generator | None]:
    """Normalise ``rng`` for the (random) CosyVoice 2 vocoder: ``(call index -> generator, shared one)``.

    int: one private generator seeded once per session; a Generator: used as given; a callable: asked before
    every vocoder call (``lambda k: torch.Generator().manual_seed(500 + k)`` replays the reference fixtures);
    None: seed 0. The global torch RNG is never used. The shared generator (if any) is returned too so that a
    failed push can rewind it.
    """
    if rng is None:
        rng = 0
    if isinstance(rng, bool):
        raise TypeError("rng must be an int seed, a torch.Generator or a callable, not bool")
    if isinstance(rng, (int, np.integer)):
        rng = torch.Generator().manual_seed(int(rng))
    if isinstance(rng, torch.Generator):
        gen = rng
        return (lambda _k: gen), gen
    if callable(rng):
        return rng, None
    raise TypeError(f"rng must be an int seed, a torch.Generator or a callable, got {type(rng).__name__}")


class ChunkScheduler(Protocol):
    """What a session needs from the scheduler that computes its chunks (``Batcher``)."""

    inline: bool  # chunks are computed on the submitting thread
    compute: ComputeMeter  # submission-to-delivery time of this model's chunks at the current load

    def submit(self, session: StreamSession, work: SessionState, emission: Emission) -> Future[Chunk]: ...

    def cancel(self, session: StreamSession) -> None: ...

    def release(self, session: StreamSession) -> None: ...

    def call_started(self) -> None: ...

    def call_ended(self) -> None: ...

    def chunk_bound_s(self, audio_s: float) -> float | None: ...


class StreamSession:
    """One stream: ``push`` tokens as they come, ``finish`` once, ``close`` (or use ``with``).

    ``push`` / ``finish`` return once their chunks are computed; ``apush`` / ``afinish`` await them (the event
    loop stays free). One call at a time per session: a second concurrent call raises. ``close`` returns at
    once, even while a chunk is in flight: a queued chunk is dropped, one being computed is discarded.
    A push that fails leaves the session as it was (the caller may retry with the same tokens).
    """

    def __init__(self, *, scheduler: ChunkScheduler, spec: StreamSpec, plan: HopPlan, vocab_size: int,
                 shared_rng: torch.Generator | None = None, start_buffer_s: float | None = None) -> None:
        self._scheduler = scheduler
        self.spec = spec
        self.plan = plan
        self.vocab_size = vocab_size
        self._shared_gen = shared_rng  # rewound when a push fails
        self._device = spec.prompt.tokens.device
        self._lock = threading.Lock()  # one call at a time per session; sessions never share one
        self._closing = False
        self.state = SessionState(tokens=torch.zeros(1, 0, dtype=torch.int64, device=self._device))
        self.last_mel: np.ndarray | None = None  # the mel behind the newest chunk, for inspection and tests
        self.compute_s = {"flow": 0.0, "vocoder": 0.0}  # wall time of the model calls behind its chunks
        # the listener's clock: its start buffer is the caller's, or the recommendation when audio first leaves
        self._explicit_buffer_s = start_buffer_s
        self._adopted_cold = False  # the adopted start buffer came from a meter without a measured spread
        self.playback = PlaybackClock(start_buffer_s=start_buffer_s or 0.0)
        self.arrivals = RateMeter(prior=1.0 / spec.audio_s_per_token)  # the model's own rate until measured
        # audio the vocoder holds back (its right receptive field; demo voice 147 ms), measured when audio first
        # leaves: every later chunk's audio arrives that much later than its tokens alone would say, so the
        # start buffer covers it (measured without it: stalls of 10-33 ms at the recommended buffer)
        self._lag_s = 0.0
        # seconds from submitting the first audible chunk to its delivery: the listener's clock starts there, so
        # a later chunk has what it costs beyond this one to spare (pacing.recommend_start_buffer)
        self._first_chunk_s: float | None = None
        # this stream's own steady chunks, measured over what the meter expected when the stream started: a
        # machine busier than the meter measured shows here (the meter soon absorbs a stream's chunks into its
        # fit; a browser on the same cores made the demo's chunks 2x dearer and a stream told 1.1 s stalled)
        self._expected: ComputeMeter | None = None
        self._ratios: deque[float] = deque(maxlen=8)

    # ---------------------------------------------------------------------------------------------- settings

    @property
    def flow(self) -> nn.Module:
        return self.spec.flow

    @property
    def vocoder(self) -> nn.Module | None:
        return self.spec.vocoder

    @property
    def prompt(self) -> PreparedPrompt:
        return self.spec.prompt

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def output(self) -> str:
        return self.spec.output

    @property
    def n_timesteps(self) -> int:
        return self.spec.n_timesteps

    @property
    def window_frames(self) -> int | None:
        return self.spec.window_frames

    @property
    def vocoder_kind(self) -> str | None:
        return self.spec.vocoder_kind

    # ---------------------------------------------------------------------------------------------- public

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def closed(self) -> bool:
        return self.state.closed

    @property
    def closing(self) -> bool:
        """close() was called (its chunks in flight are being dropped)."""
        return self._closing

    @property
    def tokens_received(self) -> int:
        return self.state.available

    @property
    def tokens_emitted(self) -> int:
        return self.state.offset

    @property
    def start_buffer_s(self) -> float:
        """The listener's start buffer this session plans with: the caller's (``start_buffer_ms``), else the
        recommendation, adopted when the first chunk leaves and revised while the listener is still buffering
        (see ``_delivered``; until the first chunk: the current recommendation)."""
        if self._explicit_buffer_s is not None:
            return self._explicit_buffer_s
        if self.playback.started:
            return self.playback.start_buffer_s
        return self.recommended_start_buffer_s()

    @property
    def vocoder_lag_s(self) -> float:
        """Audio the vocoder holds back behind the tokens decoded so far (its right receptive field), measured
        when audio first leaves (0 before; 0 for mel output)."""
        return self._lag_s

    @property
    def first_chunk_s(self) -> float | None:
        """Seconds from submitting the first audible chunk to its delivery (None before it left)."""
        return self._first_chunk_s

    def recommended_start_buffer_s(self) -> float:
        """Audio to buffer before playing so that this stream does not stall at the current load, from the
        measured compute time of this model's chunks, the measured token rate (its upper estimate: a producer at
        the model's rate must not read as slower) and the smallest hop (``pacing.recommend_start_buffer``), plus
        the audio the vocoder holds back (``vocoder_lag_s``); once audio has left, later chunks are costed against
        the first one's measured time rather than the meter's estimate of it. With other streams open, the
        buffer also covers a chunk that waits for a chunk of each of theirs (``Batcher.chunk_bound_s``). A lone
        stream's chunks costed over the meter's spread (``slowdown``) are costed at their own rate; with others
        open, the bound covers their load, and waits behind their chunks would read as a slowdown."""
        plan = self.plan
        adaptive = plan.schedule == "adaptive"
        bounded = self._scheduler.chunk_bound_s(plan.hop * self.spec.audio_s_per_token) is not None
        return self._lag_s + recommend_start_buffer(
            first_hop=plan.hop, audio_s_per_token=self.spec.audio_s_per_token, token_rate=self.arrivals.upper_rate,
            compute=self._scheduler.compute, chunk=plan.chunk if adaptive else None,
            max_hop=plan.max_hop if adaptive else None, history=self.spec.history(self.state.offset),
            first_compute_s=self._first_chunk_s,
            loaded_s=lambda h: self._scheduler.chunk_bound_s(h * self.spec.audio_s_per_token),
            slowdown=1.0 if bounded else self.slowdown)

    @property
    def slowdown(self) -> float:
        """How much slower than the compute meter expected when this stream started its recent steady chunks all
        ran, where even the least of them is beyond that meter's p95 spread (1.0: within it, or nothing measured
        yet). The recommendation then costs its chunks at that rate."""
        expected = self._expected
        if expected is None or not expected.measured or not self._ratios:
            return 1.0
        least = min(self._ratios)
        return least if least > expected.p95_ratio() else 1.0

    @property
    def deadline(self) -> float:
        """When the listener runs dry (``time.perf_counter`` clock); inf before the first chunk."""
        return self.playback.dry_at

    def push(self, tokens: Any, arrived_at: float | None = None) -> list[np.ndarray]:
        """Add tokens; return every chunk that became ready (possibly none).

        ``arrived_at``: when the tokens arrived (``time.perf_counter`` clock; default: now). A caller that queues
        tokens while a chunk is computed passes their arrival, so that the token rate the adaptive schedule and
        the recommended start buffer plan with is the producer's, not the rhythm of the pushes."""
        return self._drive(self._push_steps(tokens, arrived_at))

    def finish(self) -> np.ndarray:
        """Decode every remaining token with finalize and return the last chunk; the session then ends."""
        return self._drive(self._finish_steps())

    async def apush(self, tokens: Any, arrived_at: float | None = None) -> list[np.ndarray]:
        """``push`` for asyncio callers: the event loop is free while the chunks are computed."""
        return await self._adrive(self._push_steps(tokens, arrived_at))

    async def afinish(self) -> np.ndarray:
        return await self._adrive(self._finish_steps())

    def close(self) -> None:
        """End the session without flushing; frees its caches. Safe to call more than once."""
        self._closing = True
        self._scheduler.cancel(self)
        self._release_if_idle()  # a push in flight releases when it ends (it looks again after unlocking)

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- planning

    def _check_open(self, what: str) -> None:
        if self.state.closed or self._closing:
            raise SessionClosedError(f"{what}() on a closed session; start a new one with Token2Wav.stream()")
        if self.state.finished:
            raise SessionClosedError(f"{what}() after finish(); start a new session with Token2Wav.stream()")

    def _plan_push(self, tokens: Any, arrived_at: float | None = None) -> SessionState:
        """Validate a push; return the working copy of the state with the new tokens."""
        self._check_open("push")
        if arrived_at is not None and (isinstance(arrived_at, bool) or not isinstance(arrived_at, (int, float))
                                       or not math.isfinite(arrived_at)):
            raise ValueError(f"arrived_at must be a time.perf_counter() time in seconds, got {arrived_at!r}")
        new = as_tokens(tokens, self.vocab_size, device=self._device)
        now = time.perf_counter()
        self.arrivals.arrived(now if arrived_at is None else min(float(arrived_at), now), int(new.shape[1]))
        state = self.state
        # Work on a copy; the session's state changes only once every emission succeeded.
        return replace(state, tokens=torch.cat([state.tokens, new], dim=1), chunk_frames=list(state.chunk_frames))

    def _next_emission(self, work: SessionState) -> Emission | None:
        """The next chunk the tokens in ``work`` allow, or None. Fixed and exponential schedules follow the hop
        plan; the adaptive one chooses the hop from the listener's clock (``pacing.choose_hop``)."""
        plan = self.plan
        if plan.schedule != "adaptive" or work.index == 0:
            ready = ready_emissions(plan, work.available, work.offset, work.index)
            return ready[0] if ready else None
        now, meter, history = time.perf_counter(), self._scheduler.compute, self.spec.history(work.offset)
        hop = choose_hop(chunk=plan.chunk or plan.hop, first_hop=plan.hop, max_hop=plan.max_hop or plan.hop,
                         offset=work.offset, available=work.available, lookahead=plan.lookahead,
                         now=now, dry_at=self.playback.dry_at, token_rate=self.arrivals.rate,
                         compute=meter, audio_s_per_token=self.spec.audio_s_per_token, history=history)  # fmt: skip
        if log.isEnabledFor(logging.DEBUG):  # why a stream took the hops it took (`serve --log-level debug`)
            log.debug("adaptive hop %d: %.3f s of audio left to play, %d tokens beyond the last chunk, %.1f tokens/s; "
                      "meter: %d tokens %.3f s, %d tokens %.3f s (history %d), p95 x%.2f, typical x%.2f",
                      hop, self.playback.dry_at - now, work.available - work.offset - plan.lookahead,
                      self.arrivals.rate, plan.hop, meter.seconds(plan.hop, history), 2 * plan.hop,
                      meter.seconds(2 * plan.hop, history), history, meter.p95_ratio(), meter.typical_ratio())
        if work.available - work.offset < hop + plan.lookahead:
            return None
        end = work.offset + hop
        return Emission(index=work.index, start=work.offset, end=end, prefix=end + plan.lookahead, finalize=False)

    def _delivered(self, value: np.ndarray, em: Emission, submitted: float) -> None:
        """A chunk leaves for the listener now: the playback clock advances.

        Without an explicit start buffer the first chunk adopts the recommendation. Each later chunk that leaves
        while the listener is still buffering may revise it (clients that follow ``start_buffer_ms`` do the same):
        upward always, downward only if the adopted one came from a meter that had not yet measured the spread of
        chunk times (a cold server: its first stream then starts once measured chunks bring the 10 s cap down).
        A warm recommendation is not lowered: measured at the stream's start, where chunks attend to little
        history, the meter would under-predict the later chunks (lowered that way, 3 of 3 demo runs stalled)."""
        now = time.perf_counter()
        frames = value.shape[-1]
        seconds = frames / self.spec.sample_rate if self.output == "audio" else \
            frames * self.spec.samples_per_frame / self.spec.sample_rate
        if not self.playback.started and seconds > 0:
            self._lag_s = max(0.0, em.end * self.spec.audio_s_per_token - self.playback.audio_s - seconds)
            self._first_chunk_s = now - submitted
        elif em.index > 0 and not em.finalize and seconds > 0 and self._expected is not None:  # a steady chunk
            fitted = self._expected.seconds(em.end - em.start, self.spec.history(em.start))
            if fitted > 0:
                self._ratios.append((now - submitted) / fitted)
        if self._explicit_buffer_s is None:
            if not self.playback.started:
                self.playback.start_buffer_s = self.recommended_start_buffer_s()
                self._adopted_cold = not self._scheduler.compute.measured
            elif self.playback.buffering(now):
                newer = self.recommended_start_buffer_s()
                if newer > self.playback.start_buffer_s or self._adopted_cold:
                    self.playback.recommend(now, newer)
                    self._adopted_cold = not self._scheduler.compute.measured
        self.playback.deliver(now, seconds)
        if em.finalize:
            self.playback.complete(now)  # as a listener does: the last audio is in, nothing left to buffer for

    def _plan_finish(self) -> tuple[SessionState, Emission]:
        self._check_open("finish")
        state = self.state
        if state.available == 0:
            raise ValueError("finish() called before any token was pushed: push at least one token first")
        em = final_emission(state.available, state.offset, state.index)
        return replace(state, chunk_frames=list(state.chunk_frames)), em

    def _push_steps(self, tokens: Any, arrived_at: float | None = None) -> Iterator[Any]:
        """The push as a generator: yields (work, emission) per chunk, is sent the chunk, returns them all."""
        work = self._plan_push(tokens, arrived_at)
        outs = []
        while (em := self._next_emission(work)) is not None:
            if self._expected is None:
                self._expected = self._scheduler.compute.snapshot()
            submitted = time.perf_counter()
            value = yield work, em
            self._delivered(value, em, submitted)
            outs.append(value)
        self.state = work
        return outs

    def _finish_steps(self) -> Iterator[Any]:
        work, em = self._plan_finish()
        submitted = time.perf_counter()
        out = yield work, em
        self._delivered(out, em, submitted)
        work.finished = True
        work.flow_state = work.vocoder_state = None  # free the caches
        self.state = work
        self._scheduler.release(self)
        return out

    # ---------------------------------------------------------------------------------------------- driving

    def _release_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                if not self.state.closed:
                    self.state = replace(self.state, flow_state=None, vocoder_state=None, closed=True)
                    self._scheduler.release(self)
            finally:
                self._lock.release()

    @contextmanager
    def _call(self) -> Iterator[None]:
        """One push/finish: exclusive per session; the vocoder's random generator rewound if it fails."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("another push/finish of this session is running: call them one at a time")
        gen_state = self._shared_gen.get_state() if self._shared_gen is not None else None
        playback = replace(self.playback)  # chunks of a failed call never reach the listener
        self._scheduler.call_started()
        try:
            yield
        except BaseException:
            if gen_state is not None:
                self._shared_gen.set_state(gen_state)
            self.playback = playback
            raise
        finally:
            self._scheduler.call_ended()
            self._lock.release()
            # after unlocking: a close() that found the lock held (and so released nothing) is seen here
            if self._closing:
                self._release_if_idle()

    def _take(self, chunk: Chunk) -> np.ndarray:
        self.last_mel = chunk.mel
        self.compute_s["flow"] += chunk.flow_s
        self.compute_s["vocoder"] += chunk.vocoder_s
        return chunk.value

    def _drive(self, steps: Iterator[Any]) -> Any:
        with self._call():
            try:
                request = next(steps)
                while True:
                    request = steps.send(self._take(self._scheduler.submit(self, *request).result()))
            except StopIteration as done:
                return done.value

    async def _adrive(self, steps: Iterator[Any]) -> Any:
        with self._call():
            try:
                request = next(steps)
                while True:
                    if self._scheduler.inline:  # computed where it is submitted: not on the event loop
                        future = asyncio.get_running_loop().run_in_executor(
                            None, lambda r=request: self._scheduler.submit(self, *r).result())
                    else:
                        future = asyncio.wrap_future(self._scheduler.submit(self, *request))
                    try:
                        chunk = await future
                    except asyncio.CancelledError:
                        self.close()  # the caller went away: its queued chunk is dropped, nothing is committed
                        raise
                    request = steps.send(self._take(chunk))
            except StopIteration as done:
                return done.value


__all__ = ["MODES", "OUTPUTS", "ChunkScheduler", "PreparedPrompt", "SessionClosedError", "StreamSession",
           "as_tokens", "make_rng"]
