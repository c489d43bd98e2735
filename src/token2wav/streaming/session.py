"""StreamSession: tokens in, audio (or mel) chunks out.

A session owns only its state (see ``state.py``); the flow and vocoder it calls are shared, read-only modules.
Three modes produce the chunks:

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

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .schedule import Emission, HopPlan, final_emission, ready_emissions
from .state import CrossFadeVocoderState, RevocodeState, SessionState

MODES = ("cached", "recompute", "window")
OUTPUTS = ("audio", "mel")
# The reference's CosyVoice 2 vocoder hand-over: 8 mel frames of context, their samples cross-faded.
MEL_CACHE_FRAMES = 8
DEFAULT_TIMESTEPS = 10

RngSpec = int | torch.Generator | Callable[[int], torch.Generator | None] | None


class SessionClosedError(RuntimeError):
    """The session was finished or closed and takes no more calls."""


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated prompt on the model's device.

    tokens [1, P] int64, feat [1, P * ratio, mel_dim], embedding [1, spk_embed_dim].
    """

    tokens: torch.Tensor
    feat: torch.Tensor
    embedding: torch.Tensor
    digest: str

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])


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


def vocoder_kind(vocoder: torch.nn.Module | None) -> str | None:
    """How a vocoder streams: 'causal' (own stream_step, e.g. CausalHiFT), 'hifigan' (our HiFi-GAN with
    its windowed ``vocode_stream``) or 'crossfade' (CosyVoice 2's HiFT, driven the reference's way)."""
    if vocoder is None:
        return None
    if hasattr(vocoder, "stream_step"):
        return "causal"
    from ..models.hifigan import HiFiGANGenerator

    if isinstance(vocoder, HiFiGANGenerator):
        return "hifigan"
    return "crossfade"


def _hamming(n: int) -> torch.Tensor:
    # Symmetric Hamming window in float64, as numpy.hamming; the blend is computed in float64 then rounded.
    return torch.from_numpy(np.hamming(n))


class StreamSession:
    """One stream: ``push`` tokens as they come, ``finish`` once, ``close`` (or use ``with``)."""

    def __init__(
        self,
        *,
        flow: torch.nn.Module,
        vocoder: torch.nn.Module | None,
        prompt: PreparedPrompt,
        prompt_state: Callable[[], Any] | None,
        plan: HopPlan,
        token_mel_ratio: int,
        vocab_size: int,
        samples_per_frame: int,
        mode: str = "cached",
        output: str = "audio",
        window_frames: int | None = None,
        rng: RngSpec = None,
        chunk_size: int | None = None,
        lookahead: int | None = None,
        n_timesteps: int = DEFAULT_TIMESTEPS,
        window_fn: Callable[[Any, int], Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "audio" and vocoder is None:
            raise ValueError("output='audio' needs a vocoder")
        self.flow = flow
        self.vocoder = vocoder
        self.prompt = prompt
        self._prompt_state = prompt_state
        self.plan = plan
        self.mode = mode
        self.output = output
        self.window_frames = window_frames
        self.ratio = token_mel_ratio
        self.vocab_size = vocab_size
        self.samples_per_frame = samples_per_frame
        self.chunk_size = chunk_size
        self.lookahead = lookahead
        self.n_timesteps = n_timesteps
        self._window_fn = window_fn
        self._rng, self._shared_gen = make_rng(rng)
        self._device = prompt.tokens.device
        self._lock = threading.Lock()  # one call at a time per session; sessions never share one
        self.state = SessionState(tokens=torch.zeros(1, 0, dtype=torch.int64, device=self._device))
        self.vocoder_kind = vocoder_kind(vocoder)
        self.last_mel: np.ndarray | None = None

    # ---------------------------------------------------------------------------------------------- public

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def closed(self) -> bool:
        return self.state.closed

    @property
    def tokens_received(self) -> int:
        return self.state.available

    @property
    def tokens_emitted(self) -> int:
        return self.state.offset

    def push(self, tokens: Any) -> list[np.ndarray]:
        """Add tokens; return every chunk that became ready (possibly none)."""
        with self._lock:
            work, emissions = self._plan_push(tokens)
            outs = self._run(work, emissions)
            self.state = work
            return outs

    def finish(self) -> np.ndarray:
        """Decode every remaining token with finalize and return the last chunk; the session then ends."""
        with self._lock:
            work, em = self._plan_finish()
            out = self._run(work, [em])[0]
            self.state = self._finished(work)
            return out

    def _plan_push(self, tokens: Any) -> tuple[SessionState, list[Emission]]:
        """Validate a push; return the working copy of the state and the emissions it makes ready."""
        self._check_open("push")
        new = as_tokens(tokens, self.vocab_size, device=self._device)
        state = self.state
        all_tokens = torch.cat([state.tokens, new], dim=1)
        emissions = ready_emissions(self.plan, all_tokens.shape[1], state.offset, state.index)
        # Work on a copy; the session's state changes only once every emission succeeded, so a failed
        # push leaves it exactly as before (the caller may retry with the same tokens).
        return replace(state, tokens=all_tokens, chunk_frames=list(state.chunk_frames)), emissions

    def _plan_finish(self) -> tuple[SessionState, Emission]:
        self._check_open("finish")
        state = self.state
        if state.available == 0:
            raise ValueError("finish() called before any token was pushed: push at least one token first")
        em = final_emission(state.available, state.offset, state.index)
        return replace(state, chunk_frames=list(state.chunk_frames)), em

    @staticmethod
    def _finished(work: SessionState) -> SessionState:
        work.finished = True
        work.flow_state = work.vocoder_state = None  # free the caches
        return work

    def close(self) -> None:
        """End the session without flushing; frees its caches. Safe to call more than once."""
        with self._lock:
            self.state = replace(self.state, flow_state=None, vocoder_state=None, closed=True)

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- internals

    def _check_open(self, what: str) -> None:
        if self.state.closed:
            raise SessionClosedError(f"{what}() on a closed session; start a new one with Token2Wav.stream()")
        if self.state.finished:
            raise SessionClosedError(f"{what}() after finish(); start a new session with Token2Wav.stream()")

    def _run(self, work: SessionState, emissions: list[Emission]) -> list[np.ndarray]:
        gen = self._shared_gen
        gen_state = gen.get_state() if gen is not None else None
        try:
            with torch.inference_mode():
                return [self._emit(work, em) for em in emissions]
        except BaseException:
            if gen is not None:
                gen.set_state(gen_state)
            raise

    def _emit(self, work: SessionState, em: Emission) -> np.ndarray:
        return self._output(work, em, self._flow_chunk(work, em))

    def _output(self, work: SessionState, em: Emission, mel: torch.Tensor) -> np.ndarray:
        """Record emission ``em``'s mel in ``work`` and turn it into the chunk the caller gets."""
        mel_out = self._record(work, em, mel)
        if self.output == "mel":
            return mel_out
        speech = self._vocode(work, mel, em.finalize)
        return speech[0].float().cpu().numpy()

    def _record(self, work: SessionState, em: Emission, mel: torch.Tensor) -> np.ndarray:
        """Check emission ``em``'s mel and advance ``work`` past it; returns the mel as numpy."""
        want = (em.end - em.start) * self.ratio
        if mel.shape[-1] != want:
            raise RuntimeError(
                f"flow returned {mel.shape[-1]} mel frames for tokens [{em.start}, {em.end}), expected {want}"
            )
        work.offset, work.index = em.end, em.index + 1
        work.chunk_frames.append(want)
        mel_out = mel[0].float().cpu().numpy()
        self.last_mel = mel_out  # the mel behind the newest chunk, for inspection and tests
        return mel_out

    def _flow_chunk(self, work: SessionState, em: Emission) -> torch.Tensor:
        tokens = work.tokens[:, : em.prefix]
        p = self.prompt
        if self.mode == "recompute":
            # The reference's final call leaves `stream` at False: full attention over everything.
            mel = self.flow.inference(
                tokens, p.tokens, p.feat, p.embedding, streaming=not em.finalize, finalize=em.finalize,
                n_timesteps=self.n_timesteps,
            )
            return mel[:, :, em.start * self.ratio :]
        state = self._flow_state(work)
        # chunk size and solver steps were fixed when the prompt state was made (stream_start)
        kwargs: dict[str, Any] = {"finalize": em.finalize}
        if self.lookahead is not None:
            kwargs["lookahead"] = self.lookahead
        mel, new_state = self.flow.stream_step(state, tokens, **kwargs)
        self._commit_flow(work, em, new_state)
        return mel

    def _flow_state(self, work: SessionState) -> Any:
        """The flow state the next cached step continues (the shared prompt state before the first)."""
        if work.flow_state is None:
            work.flow_state = self._prompt_state() if self._prompt_state is not None else None
        return work.flow_state

    def _commit_flow(self, work: SessionState, em: Emission, new_state: Any) -> None:
        if self.mode == "window" and not em.finalize:
            new_state = self._window_fn(new_state, self.window_frames)
        work.flow_state = new_state

    def _vocode(self, work: SessionState, mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        voc = self.vocoder
        if self.vocoder_kind == "hifigan":
            from ..models.hifigan import vocode_stream

            out, work.vocoder_state = vocode_stream(voc, mel, work.vocoder_state, final=finalize)
            return out
        if self.vocoder_kind == "causal":
            if self.mode == "recompute":
                st = work.vocoder_state or RevocodeState()
                full = mel if st.mel is None else torch.cat([st.mel, mel], dim=2)
                speech = voc.inference(full, finalize=finalize)[0]
                out = speech[:, st.speech_offset :]
                work.vocoder_state = RevocodeState(mel=full, speech_offset=st.speech_offset + out.shape[1])
                return out
            out, cache = voc.stream_step(mel, work.vocoder_state, finalize=finalize)
            work.vocoder_state = cache
            return out
        return self._crossfade_vocode(work, mel, finalize)

    def _crossfade_vocode(self, work: SessionState, mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        st: CrossFadeVocoderState = work.vocoder_state or CrossFadeVocoderState()
        keep = MEL_CACHE_FRAMES * self.samples_per_frame
        if st.mel_tail is not None:
            mel = torch.cat([st.mel_tail, mel], dim=2)
            cache_source = st.source_tail
        else:
            cache_source = mel.new_zeros(1, 1, 0)
        gen = self._rng(work.vocoder_calls)
        work.vocoder_calls += 1
        speech, source = self.vocoder.inference(mel, cache_source=cache_source, generator=gen)
        if st.speech_tail is not None:
            speech = _crossfade(speech, st.speech_tail, keep)
        if finalize:
            work.vocoder_state = CrossFadeVocoderState()
            return speech
        work.vocoder_state = CrossFadeVocoderState(
            mel_tail=mel[:, :, -MEL_CACHE_FRAMES:],
            source_tail=source[:, :, -keep:],
            speech_tail=speech[:, -keep:],
        )
        return speech[:, :-keep]


def _crossfade(fade_in: torch.Tensor, fade_out: torch.Tensor, overlap: int) -> torch.Tensor:
    """Blend the first ``overlap`` samples of ``fade_in`` with the held-back samples ``fade_out``."""
    win = _hamming(2 * overlap).to(fade_in.device)
    out = fade_in.clone()
    head = fade_in[..., :overlap].double() * win[:overlap] + fade_out[..., -overlap:].double() * win[overlap:]
    out[..., :overlap] = head.to(out.dtype)
    return out


__all__ = [
    "MODES", "OUTPUTS", "PreparedPrompt", "SessionClosedError", "StreamSession", "as_tokens", "make_rng",
]
