"""Token -> mel flows: CosyVoice 3 (``CausalMaskedDiffWithDiT``), CosyVoice 2 (``CausalMaskedDiffWithXvec``).

Both take the reference's constructor kwargs and submodule names (strict state-dict loading) and offer:

* ``inference(token, prompt_token, prompt_feat, embedding, *, streaming, finalize, n_timesteps=10)``: the
  reference's ``inference`` for batch 1, minus its length arguments, returning the target mel ``[1, 80, T]``.
* a session API, ``stream_start`` / ``stream_step``, giving the mel of a growing token sequence piece by
  piece. It is cached: each call runs the network on the new frames only (O(new frames) per call, plus
  attention to the cached keys of earlier frames), for the DiT and for the conformer + U-Net alike.

Streaming contract (both flows). ``tokens`` passed to ``stream_step`` are *all* target tokens so far. On a
non-final call the last ``lookahead`` of them are lookahead context: their frames are not produced yet.
Frames are committed (returned, and cached) only in whole attention chunks: the chunk grid is counted from
the prompt's first frame in steps of ``chunk_size`` mel frames. Frames of a trailing partial chunk are held
back (not returned) and produced by a later call, because in the chunk-causal model they still depend on
frames that have not arrived. The engine avoids the hold-back by padding the first hop so that prompt plus
first hop ends on a chunk boundary (as the reference's ``token2wav`` does) and hopping in whole chunks. The
final call (``finalize=True``) returns every remaining frame. Concatenated, the pieces equal
``inference(all tokens, streaming=True, finalize=True)`` (same chunk size), up to float rounding.

Runtime lookahead: ``stream_step(..., lookahead=l)`` with ``l < pre_lookahead_len`` (CosyVoice 3 only) lets
the frames of every chunk see target tokens at most ``l`` past the chunk's last token; later ones count as
zeros (prompt tokens are always visible). The result does not depend on the hop schedule and equals
``inference(all tokens, streaming=True, finalize=True, lookahead=l)``. With ``l = pre_lookahead_len`` (the
default) nothing is hidden that the layer could see, which is the reference's behaviour.

Prompt alignment: the prompt's mel must have exactly ``len(prompt_token) * token_mel_ratio`` frames. The
reference front end guarantees this by trimming both to ``n = min(frames // ratio, tokens)`` (see
``align_prompt``); a mismatch here is an error instead of the reference's silent misalignment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from token2wav.models.cfm import CFMCache

__all__ = ["CausalMaskedDiffWithDiT", "CausalMaskedDiffWithXvec", "FlowStreamState", "align_prompt"]


def align_prompt(prompt_token: Tensor, prompt_feat: Tensor, token_mel_ratio: int = 2) -> tuple[Tensor, Tensor]:
    """Trim a prompt the way the reference front end does: both to ``n = min(frames // ratio, tokens)``
    tokens. prompt_token ``[1, N]``, prompt_feat ``[1, F, C]``."""
    n = min(prompt_feat.shape[1] // token_mel_ratio, prompt_token.shape[1])
    return prompt_token[:, :n], prompt_feat[:, : n * token_mel_ratio]


@dataclass(frozen=True)
class FlowStreamState:
    """One streaming session of a flow. Immutable: ``stream_step`` returns a new state and never writes into
    tensors held here, so the state ``stream_start`` returns can be shared by any number of sessions.

    frames_done: absolute mel frames (prompt included, from the prompt's first frame) already committed;
    ``cache`` (the solver's per-step estimator caches) covers exactly these frames, ``encoder_cache``
    (CosyVoice 2 only) the tokens behind them. tokens: the target tokens seen so far (``[1, n]`` int64), used
    to check that each call extends the previous one.
    """

    prompt_token: Tensor
    prompt_feat: Tensor
    embedding: Tensor
    spks: Tensor
    n_timesteps: int
    chunk_size: int
    frames_done: int
    tokens: Tensor
    cache: CFMCache | None = None
    encoder_cache: Any = None
    finished: bool = False

    @property
    def prompt_frames(self) -> int:
        return int(self.prompt_feat.shape[1])

    @property
    def frames_emitted(self) -> int:
        """Target frames returned so far by this session."""
        return max(self.frames_done - self.prompt_frames, 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _FlowBase(nn.Module):
    """Input checks, speaker projection and the shared streaming bookkeeping."""

    vocab_size: int
    output_size: int
    token_mel_ratio: int
    pre_lookahead_len: int

    def _init_common(
        self,
        input_size: int,
        output_size: int,
        spk_embed_dim: int,
        output_type: str,
        vocab_size: int,
        input_frame_rate: int,
        only_mask_loss: bool,
        token_mel_ratio: int,
        pre_lookahead_len: int,
        decoder: nn.Module | None,
        decoder_conf: Any,
    ) -> None:
        for name, value, low in (
            ("vocab_size", vocab_size, 1),
            ("token_mel_ratio", token_mel_ratio, 1),
            ("pre_lookahead_len", pre_lookahead_len, 0),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if decoder is None:
            raise ValueError("decoder (a CausalConditionalCFM) is required")
        self.input_size = input_size
        self.output_size = output_size
        self.spk_embed_dim = spk_embed_dim
        self.output_type = output_type
        self.vocab_size = vocab_size
        self.input_frame_rate = input_frame_rate
        self.only_mask_loss = only_mask_loss
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.decoder_conf = decoder_conf
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)

    # ------------------------------------------------------------------ validation
    @property
    def _dtype(self) -> torch.dtype:
        return self.spk_embed_affine_layer.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.spk_embed_affine_layer.weight.device

    def _check_tokens(self, name: str, value: Any) -> Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(value).__name__}")
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
        if value.dim() != 2 or value.shape[0] != 1:
            raise ValueError(f"{name} must have shape [1, N] (batch 1), got {tuple(value.shape)}")
        if value.numel() > 0:
            low, high = int(value.min()), int(value.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"{name} ids must lie in [0, {self.vocab_size}), got values in [{low}, {high}]")
        return value.to(device=self._device, dtype=torch.long)

    def _check_prompt(self, prompt_token: Any, prompt_feat: Any) -> tuple[Tensor, Tensor]:
        prompt_token = self._check_tokens("prompt_token", prompt_token)
        if not isinstance(prompt_feat, Tensor):
            raise TypeError(f"prompt_feat must be a torch.Tensor, got {type(prompt_feat).__name__}")
        if not prompt_feat.is_floating_point():
            raise TypeError(f"prompt_feat must be floating point, got {prompt_feat.dtype}")
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != self.output_size:
            raise ValueError(
                f"prompt_feat must have shape [1, frames, {self.output_size}], got {tuple(prompt_feat.shape)}"
            )
        want = prompt_token.shape[1] * self.token_mel_ratio
        if prompt_feat.shape[1] != want:
            raise ValueError(
                f"prompt_feat must have prompt_token length * token_mel_ratio = {want} frames, "
                f"got {prompt_feat.shape[1]} (trim both with align_prompt, as the reference front end does)"
            )
        return prompt_token, prompt_feat.to(device=self._device, dtype=self._dtype)

    def _check_embedding(self, embedding: Any) -> Tensor:
        if not isinstance(embedding, Tensor):
            raise TypeError(f"embedding must be a torch.Tensor, got {type(embedding).__name__}")
        if not embedding.is_floating_point():
            raise TypeError(f"embedding must be floating point, got {embedding.dtype}")
        want = self.spk_embed_affine_layer.in_features
        if embedding.dim() != 2 or embedding.shape[0] != 1 or embedding.shape[1] != want:
            raise ValueError(f"embedding must have shape [1, {want}], got {tuple(embedding.shape)}")
        return embedding.to(device=self._device, dtype=self._dtype)

    def _check_lookahead(self, lookahead: Any) -> int:
        if lookahead is None:
            return self.pre_lookahead_len
        if not _is_int(lookahead) or not 0 <= lookahead <= self.pre_lookahead_len:
            raise ValueError(f"lookahead must be an int in [0, {self.pre_lookahead_len}], got {lookahead!r}")
        return lookahead

    @staticmethod
    def _check_n_timesteps(n_timesteps: Any) -> int:
        if not _is_int(n_timesteps) or n_timesteps < 1:
            raise ValueError(f"n_timesteps must be an int >= 1, got {n_timesteps!r}")
        return n_timesteps

    def _speaker(self, embedding: Tensor) -> Tensor:
        # normalised in float32 at least: in half precision the eps underflows and a zero embedding
        # (no prompt) would become 0/0
        unit = F.normalize(embedding.to(torch.promote_types(embedding.dtype, torch.float32)), dim=1)
        return self.spk_embed_affine_layer(unit.to(embedding.dtype))

    def _conditions(self, prompt_feat: Tensor, start: int, stop: int) -> Tensor:
        """``cond`` ``[1, C, stop - start]`` for absolute frames: the prompt's mel, zeros after it."""
        cond = prompt_feat.new_zeros(1, stop - start, self.output_size)
        n = min(stop, prompt_feat.shape[1]) - start
        if n > 0:
            cond[:, :n] = prompt_feat[:, start : start + n]
        return cond.transpose(1, 2)

    # ------------------------------------------------------------------ streaming bookkeeping
    def _stream_chunk(self, chunk_size: Any) -> int:
        raise NotImplementedError

    def _new_state(
        self, prompt_token: Any, prompt_feat: Any, embedding: Any, n_timesteps: Any, chunk_size: Any
    ) -> FlowStreamState:
        prompt_token, prompt_feat = self._check_prompt(prompt_token, prompt_feat)
        embedding = self._check_embedding(embedding)
        return FlowStreamState(
            prompt_token=prompt_token,
            prompt_feat=prompt_feat,
            embedding=embedding,
            spks=self._speaker(embedding),
            n_timesteps=self._check_n_timesteps(n_timesteps),
            chunk_size=self._stream_chunk(chunk_size),
            frames_done=0,
            tokens=prompt_token.new_zeros(1, 0),
        )

    def _plan(
        self,
        state: FlowStreamState,
        tokens: Any,
        finalize: Any,
        lookahead: Any,
        chunk_size: Any,
        n_timesteps: Any,
    ) -> tuple[Tensor, int, int]:
        """Validate a ``stream_step`` call; return (tokens, runtime lookahead, commit end frame)."""
        if not isinstance(state, FlowStreamState):
            raise TypeError(f"state must be a FlowStreamState, got {type(state).__name__}")
        if state.finished:
            raise ValueError("state is finished: this session was already finalized")
        if not isinstance(finalize, bool):
            raise TypeError(f"finalize must be a bool, got {type(finalize).__name__}")
        if chunk_size is not None and chunk_size != state.chunk_size:
            raise ValueError(
                f"chunk_size is fixed per session at stream_start ({state.chunk_size}), got {chunk_size!r}"
            )
        if n_timesteps is not None and n_timesteps != state.n_timesteps:
            raise ValueError(
                f"n_timesteps is fixed per session at stream_start ({state.n_timesteps}), got {n_timesteps!r}"
            )
        tokens = self._check_tokens("tokens", tokens)
        seen = state.tokens.shape[1]
        if tokens.shape[1] < seen or not torch.equal(tokens[:, :seen], state.tokens):
            raise ValueError(
                f"tokens must extend the tokens of the previous call ({seen} tokens); got {tokens.shape[1]} "
                "tokens that do not start with them"
            )
        look = self._check_lookahead(lookahead)
        n_prompt = state.prompt_token.shape[1]
        if finalize:
            return tokens, look, (n_prompt + tokens.shape[1]) * self.token_mel_ratio
        if tokens.shape[1] < look:
            raise ValueError(f"tokens must hold at least lookahead={look} tokens on a non-final call")
        avail = (n_prompt + tokens.shape[1] - look) * self.token_mel_ratio
        chunk = state.chunk_size
        end = avail // chunk * chunk if chunk > 0 else avail
        return tokens, look, end

    def _encode(
        self, state: FlowStreamState, all_tokens: Tensor, start: int, stop: int, finalize: bool, look: int
    ) -> tuple[Tensor, Any]:
        """``(mu [1, C, stop - start], new encoder cache)`` for absolute frames ``[start, stop)``; ``look`` is
        the session's runtime lookahead."""
        raise NotImplementedError

    def _advance(
        self, state: FlowStreamState, all_tokens: Tensor, end: int, finalize: bool, look: int
    ) -> tuple[Tensor, FlowStreamState]:
        """Commit frames ``[state.frames_done, end)``: their mel (absolute frames) and the advanced state."""
        mu, cond, cache, encoder_cache = self._solver_inputs(state, all_tokens, end, finalize, look)
        mel, cache = self.decoder.solve_chunk(mu, state.spks, cond, cache=cache, chunk_size=state.chunk_size)
        return mel, replace(state, frames_done=end, cache=cache, encoder_cache=encoder_cache)

    def _solver_inputs(
        self, state: FlowStreamState, all_tokens: Tensor, end: int, finalize: bool, look: int
    ) -> tuple[Tensor, Tensor, CFMCache, Any]:
        """mu and cond for frames ``[state.frames_done, end)``, the solver cache they continue, the new
        encoder cache."""
        start = state.frames_done
        cache = state.cache
        if cache is None:
            cache = self.decoder.empty_cache(state.n_timesteps, state.spks.device, state.spks.dtype)
        mu, encoder_cache = self._encode(state, all_tokens, start, end, finalize, look)
        return mu, self._conditions(state.prompt_feat, start, end), cache, encoder_cache

    @torch.inference_mode()
    def stream_start(
        self,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        *,
        n_timesteps: int = 10,
        chunk_size: int | None = None,
    ) -> FlowStreamState:
        """Start a session for a voice prompt; returns a state shareable (read-only) by many sessions.

        Precomputes, for every solver step, the caches of the prompt's leading whole chunks whose inputs are
        all inside the prompt (a frame's ``mu`` needs its token plus ``pre_lookahead_len`` more).
        ``n_timesteps`` and ``chunk_size`` (mel frames, default the estimator's ``static_chunk_size``) are
        fixed for the session.
        """
        state = self._new_state(prompt_token, prompt_feat, embedding, n_timesteps, chunk_size)
        n_prompt = state.prompt_token.shape[1]
        chunk = state.chunk_size
        ratio = self.token_mel_ratio
        # frames f < end need tokens <= (end - 1) // ratio + pre_lookahead_len, all inside the prompt
        end = 0
        while (end + chunk - 1) // ratio + self.pre_lookahead_len < n_prompt:
            end += chunk
        if end == 0:
            return state
        _, state = self._advance(state, state.prompt_token, end, False, self.pre_lookahead_len)
        return state

    @torch.inference_mode()
    def stream_step(
        self,
        state: FlowStreamState,
        tokens: Tensor,
        *,
        finalize: bool,
        lookahead: int | None = None,
        chunk_size: int | None = None,
        n_timesteps: int | None = None,
    ) -> tuple[Tensor, FlowStreamState]:
        """Advance a session: ``tokens`` ``[1, n]`` are all target tokens so far.

        Returns ``(mel, new_state)`` where mel ``[1, output_size, k]`` (float32) holds the target frames
        committed by this call (see the module docstring for the chunk rule; ``k`` may be 0). On a non-final
        call the last ``lookahead`` tokens (default ``pre_lookahead_len``; fewer is a shorter runtime
        lookahead, the missing ones count as zeros; CosyVoice 2 takes only the full lookahead) only serve as
        context. ``chunk_size`` and ``n_timesteps`` must be None or the session's. ``state`` is left
        untouched.
        """
        tokens, look, end = self._plan(state, tokens, finalize, lookahead, chunk_size, n_timesteps)
        start = state.frames_done
        if end <= start:
            return self._nothing_new(state, tokens, finalize)
        all_tokens = torch.cat([state.prompt_token, tokens], dim=1)
        mel, new_state = self._advance(state, all_tokens, end, finalize, look)
        return self._committed(state, new_state, mel, tokens, finalize)

    def _nothing_new(self, state: FlowStreamState, tokens: Tensor, finalize: bool) -> tuple[Tensor, FlowStreamState]:
        empty = state.prompt_feat.new_zeros(1, self.output_size, 0).float()
        return empty, replace(state, tokens=tokens, finished=finalize)

    @staticmethod
    def _committed(
        old: FlowStreamState, new: FlowStreamState, mel: Tensor, tokens: Tensor, finalize: bool
    ) -> tuple[Tensor, FlowStreamState]:
        # mel starts at absolute frame ``old.frames_done``; drop what still belongs to the prompt
        mel = mel[:, :, max(old.prompt_frames - old.frames_done, 0) :]
        return mel, replace(new, tokens=tokens, finished=finalize)

    @torch.inference_mode()
    def stream_step_rows(
        self,
        states: list[FlowStreamState],
        tokens: list[Tensor],
        *,
        finalize: list[bool],
        lookahead: list[int | None],
        tables: list[Any] | None = None,
        buckets: Any = None,
        padded: Any = None,
    ) -> list[tuple[Tensor, FlowStreamState]]:
        """``stream_step`` for many sessions in one solver pass: row ``i`` is
        ``stream_step(states[i], tokens[i], finalize=finalize[i], lookahead=lookahead[i])`` and gets the same
        result (to float rounding) as alone. Sessions may differ in prompt, position, chunk size, lookahead
        and finality; they must share ``n_timesteps``. Raises before any work if a row is invalid.
        tables, buckets, padded: per session its ``PageTable``, the padded sizes and the fixed-shape solver
        (see ``cfm.solve_rows``); the new states' caches are then paged and continue only through this method
        with the same tables.
        """
        if not (len(states) == len(tokens) == len(finalize) == len(lookahead)):
            raise ValueError("states, tokens, finalize and lookahead must have one entry per row")
        plans = [self._plan(st, tok, fin, look, None, None)
                 for st, tok, fin, look in zip(states, tokens, finalize, lookahead)]  # fmt: skip
        results: list[tuple[Tensor, FlowStreamState] | None] = [None] * len(states)
        rows, inputs = [], []
        if tables is not None and len(tables) != len(states):
            raise ValueError("tables must have one entry per row")
        for i, (state, (toks, look, end), fin) in enumerate(zip(states, plans, finalize)):
            if end <= state.frames_done:
                results[i] = self._nothing_new(state, toks, fin)
                continue
            all_tokens = torch.cat([state.prompt_token, toks], dim=1)
            rows.append(i)
            inputs.append(self._solver_inputs(state, all_tokens, end, fin, look))
        if rows:
            mels, caches = self.decoder.solve_rows(
                [inp[0] for inp in inputs], [states[i].spks for i in rows], [inp[1] for inp in inputs],
                caches=[inp[2] for inp in inputs], chunk_sizes=[states[i].chunk_size for i in rows],
                tables=None if tables is None else [tables[i] for i in rows], buckets=buckets, padded=padded,
            )  # fmt: skip
            for i, inp, mel, cache in zip(rows, inputs, mels, caches):
                state, (toks, _, end), fin = states[i], plans[i], finalize[i]
                new = replace(state, frames_done=end, cache=cache, encoder_cache=inp[3])
                results[i] = self._committed(state, new, mel, toks, fin)
        return results  # type: ignore[return-value]


class CausalMaskedDiffWithDiT(_FlowBase):
    """CosyVoice 3 flow: token embedding -> pre-lookahead layer -> repeat to mel rate -> CFM with a DiT."""

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        pre_lookahead_layer: nn.Module | None = None,
        decoder: nn.Module | None = None,
        decoder_conf: Any = None,
    ) -> None:
        super().__init__()
        self._init_common(
            input_size, output_size, spk_embed_dim, output_type, vocab_size, input_frame_rate,
            only_mask_loss, token_mel_ratio, pre_lookahead_len, decoder, decoder_conf,
        )  # fmt: skip
        if pre_lookahead_layer is None:
            raise ValueError("pre_lookahead_layer is required")
        if getattr(pre_lookahead_layer, "pre_lookahead_len", pre_lookahead_len) != pre_lookahead_len:
            raise ValueError(
                f"pre_lookahead_len ({pre_lookahead_len}) differs from the pre_lookahead_layer's "
                f"({pre_lookahead_layer.pre_lookahead_len})"
            )
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder

    # ------------------------------------------------------------------ offline
    def _stream_chunk(self, chunk_size: Any) -> int:
        if chunk_size is None:
            chunk_size = int(self.decoder.estimator.static_chunk_size)
        if not _is_int(chunk_size) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1 (mel frames), got {chunk_size!r}")
        return chunk_size

    @torch.inference_mode()
    def inference(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        *,
        streaming: bool,
        finalize: bool,
        n_timesteps: int = 10,
        chunk_size: int | None = None,
        lookahead: int | None = None,
    ) -> Tensor:
        """The reference's ``inference`` for batch 1: target mel ``[1, output_size, T]`` (float32).

        token ``[1, N]`` and prompt_token ``[1, P]`` integer ids in ``[0, vocab_size)``; prompt_feat
        ``[1, P * token_mel_ratio, output_size]``; embedding ``[1, spk_embed_dim]``. On a non-final call the
        last ``lookahead`` (default ``pre_lookahead_len``) tokens are context only, so ``T = (N - lookahead)
        * token_mel_ratio``; on a final call ``T = N * token_mel_ratio``. ``streaming`` selects chunk-causal
        attention with ``chunk_size`` frames (default: the estimator's ``static_chunk_size``).

        A runtime ``lookahead`` shorter than ``pre_lookahead_len`` with ``streaming=True`` applies to every
        chunk, final call included: the frames of a chunk see target tokens at most ``lookahead`` past the
        chunk's last token (zeros stand for later ones; prompt tokens are always visible). This is what the
        streaming API computes for any hop schedule. Without streaming it only sets the context split.
        """
        token = self._check_tokens("token", token)
        prompt_token, prompt_feat = self._check_prompt(prompt_token, prompt_feat)
        embedding = self._check_embedding(embedding)
        n_timesteps = self._check_n_timesteps(n_timesteps)
        if not isinstance(finalize, bool) or not isinstance(streaming, bool):
            raise TypeError("streaming and finalize must be bools")
        look = self._check_lookahead(lookahead)
        split_look = 0 if finalize else look
        if token.shape[1] < split_look:
            raise ValueError(f"token must hold at least lookahead={look} tokens on a non-final call")
        if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")

        spks = self._speaker(embedding)
        all_tokens = torch.cat([prompt_token, token], dim=1)
        total = (all_tokens.shape[1] - split_look) * self.token_mel_ratio
        n_prompt = prompt_feat.shape[1]
        if total == n_prompt:
            return prompt_feat.new_zeros(1, self.output_size, 0).float()
        if streaming and look < self.pre_lookahead_len:
            chunk = int(self.decoder.estimator.static_chunk_size) if chunk_size is None else chunk_size
            mu = self._mu_frames(all_tokens, 0, total, look, prompt_token.shape[1], chunk)
        else:
            # the reference's computation, on the whole sequence
            emb = self.input_embedding(all_tokens)
            split = emb.shape[1] - split_look
            h = self.pre_lookahead_layer(emb[:, :split], emb[:, split:])
            mu = h.repeat_interleave(self.token_mel_ratio, dim=1).transpose(1, 2).contiguous()
        cond = self._conditions(prompt_feat, 0, total)
        mask = torch.ones(1, 1, total, device=mu.device, dtype=mu.dtype)
        feat, _ = self.decoder(
            mu=mu,
            mask=mask,
            spks=spks,
            cond=cond,
            n_timesteps=n_timesteps,
            streaming=streaming,
            chunk_size=chunk_size,
        )
        return feat[:, :, n_prompt:].float()

    # ------------------------------------------------------------------ cached streaming
    def _mu_window(self, all_tokens: Tensor, start: int, stop: int) -> Tensor:
        """``mu`` ``[1, stop - start, C]`` for absolute frames, from a window of tokens around them.

        Every token of ``all_tokens`` is used as given; tokens past its end are zeros. The window adds the
        ``history_len`` tokens on the left and ``pre_lookahead_len`` on the right that the layer's two
        convolutions reach, so the result equals a whole-sequence run.
        """
        ratio = self.token_mel_ratio
        layer = self.pre_lookahead_layer
        first = start // ratio
        last = -(-stop // ratio)  # exclusive
        lo = max(first - layer.history_len, 0)
        hi = min(last + self.pre_lookahead_len, all_tokens.shape[1])
        emb = self.input_embedding(all_tokens[:, lo:hi])
        h = layer(emb[:, first - lo : last - lo], emb[:, last - lo :], history=emb[:, : first - lo])
        h = h.repeat_interleave(ratio, dim=1)
        skip = start - first * ratio
        return h[:, skip : skip + stop - start]

    def _mu_frames(self, all_tokens: Tensor, start: int, stop: int, look: int, n_prompt: int, chunk: int) -> Tensor:
        """``mu`` ``[1, C, stop - start]``. With ``look < pre_lookahead_len``: chunk by chunk, each chunk
        seeing target tokens up to ``look`` past its last token (prompt tokens always)."""
        if look >= self.pre_lookahead_len:
            return self._mu_window(all_tokens, start, stop).transpose(1, 2).contiguous()
        parts = []
        frame = start
        while frame < stop:
            chunk_end = min((frame // chunk + 1) * chunk, stop)
            visible = max((chunk_end - 1) // self.token_mel_ratio + 1 + look, n_prompt)
            parts.append(self._mu_window(all_tokens[:, :visible], frame, chunk_end))
            frame = chunk_end
        return torch.cat(parts, dim=1).transpose(1, 2).contiguous()

    def _encode(
        self, state: FlowStreamState, all_tokens: Tensor, start: int, stop: int, finalize: bool, look: int
    ) -> tuple[Tensor, None]:
        n_prompt = state.prompt_token.shape[1]
        return self._mu_frames(all_tokens, start, stop, look, n_prompt, state.chunk_size), None


class CausalMaskedDiffWithXvec(_FlowBase):
    """CosyVoice 2 flow: token embedding -> upsampling conformer encoder -> projection -> CFM with a U-Net.

    ``encoder`` must provide ``output_size()`` and ``forward(xs, xs_lens, context=..., streaming=...)`` ->
    ``(h, h_lengths)`` like the reference's ``UpsampleConformerEncoder``.
    """

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        decoder_conf: Any = None,
    ) -> None:
        super().__init__()
        self._init_common(
            input_size, output_size, spk_embed_dim, output_type, vocab_size, input_frame_rate,
            only_mask_loss, token_mel_ratio, pre_lookahead_len, decoder, decoder_conf,
        )  # fmt: skip
        if encoder is None:
            raise ValueError("encoder (an UpsampleConformerEncoder) is required")
        stride = getattr(encoder, "up_stride", token_mel_ratio)
        if stride != token_mel_ratio:
            raise ValueError(f"token_mel_ratio ({token_mel_ratio}) must equal the encoder's upsampling ({stride})")
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder

    def _check_lookahead(self, lookahead: Any) -> int:
        # the CosyVoice 2 encoder only takes a full-length lookahead context
        if lookahead is not None and lookahead != self.pre_lookahead_len:
            raise ValueError(f"lookahead must be None or {self.pre_lookahead_len} for this flow, got {lookahead!r}")
        return self.pre_lookahead_len

    def _stream_chunk(self, chunk_size: Any) -> int:
        # the encoder's token chunks and the estimator's frame chunks must share one grid
        native = int(getattr(self.decoder.estimator, "static_chunk_size", 0))
        token_chunk = int(getattr(self.encoder, "static_chunk_size", 0))
        if native <= 0 or token_chunk * self.token_mel_ratio != native:
            raise ValueError(
                "streaming needs chunk-causal models on one grid: encoder static_chunk_size "
                f"({token_chunk} tokens) * token_mel_ratio ({self.token_mel_ratio}) must equal the "
                f"estimator's static_chunk_size ({native} frames)"
            )
        if chunk_size is not None and chunk_size != native:
            raise ValueError(f"chunk_size must be None or the estimator's static_chunk_size {native}")
        return native

    @torch.inference_mode()
    def inference(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        *,
        streaming: bool,
        finalize: bool,
        n_timesteps: int = 10,
    ) -> Tensor:
        """The reference's ``inference`` for batch 1 (same arguments and result as the CosyVoice 3 flow)."""
        token = self._check_tokens("token", token)
        prompt_token, prompt_feat = self._check_prompt(prompt_token, prompt_feat)
        embedding = self._check_embedding(embedding)
        n_timesteps = self._check_n_timesteps(n_timesteps)
        if not isinstance(finalize, bool) or not isinstance(streaming, bool):
            raise TypeError("streaming and finalize must be bools")
        look = 0 if finalize else self.pre_lookahead_len
        if token.shape[1] < look:
            raise ValueError(f"token must hold at least {look} tokens on a non-final call")

        spks = self._speaker(embedding)
        ids = torch.cat([prompt_token, token], dim=1)
        emb = self.input_embedding(ids)
        lengths = torch.tensor([ids.shape[1]], device=ids.device)
        if finalize:
            h, _ = self.encoder(emb, lengths, streaming=streaming)
        else:
            split = emb.shape[1] - look
            h, _ = self.encoder(emb[:, :split], lengths, context=emb[:, split:], streaming=streaming)
        h = self.encoder_proj(h)
        total = h.shape[1]
        n_prompt = prompt_feat.shape[1]
        if total == n_prompt:
            return h.new_zeros(1, self.output_size, 0).float()
        cond = self._conditions(prompt_feat, 0, total)
        mask = torch.ones(1, 1, total, device=h.device, dtype=h.dtype)
        feat, _ = self.decoder(
            mu=h.transpose(1, 2).contiguous(), mask=mask, spks=spks, cond=cond, n_timesteps=n_timesteps,
            streaming=streaming,
        )  # fmt: skip
        return feat[:, :, n_prompt:].float()

    # ------------------------------------------------------------------ cached streaming
    def _encode(
        self, state: FlowStreamState, all_tokens: Tensor, start: int, stop: int, finalize: bool, look: int
    ) -> tuple[Tensor, Any]:
        """Encode the tokens behind frames ``[start, stop)`` with the encoder's cached ``forward_chunk``.

        Commits start and (except on the final call) end on the chunk grid, which is a token-chunk boundary of
        the encoder too, so the frames map to whole tokens ``[start / ratio, stop / ratio)``.
        """
        ratio = self.token_mel_ratio
        first, last = start // ratio, stop // ratio
        xs_new = self.input_embedding(all_tokens[:, first:last])
        context = None
        if not finalize:
            context = self.input_embedding(all_tokens[:, last : last + self.pre_lookahead_len])
        h, encoder_cache = self.encoder.forward_chunk(
            xs_new, context=context, cache=state.encoder_cache, finalize=finalize
        )
        return self.encoder_proj(h).transpose(1, 2).contiguous(), encoder_cache
