"""Token2Wav: one loaded model; it resolves what a stream or an offline decode is, and hands out sessions.

The engine holds the flow and vocoder (stateless modules, shared read-only), the model config, and a prompt
cache: a voice prompt's flow state is computed once and reused by every session with the same prompt. It turns
options and prompts into a session's fixed settings (``compute.StreamSpec``) and hop plan; the model calls
themselves are ``compute.py``'s, and ``stream()`` sessions run on an inline ``Batcher`` (a batch of one).
"""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..memory import (
    ONE_SHOT_FRAMES,
    InsufficientMemoryError,
    check_offline_memory,
    is_out_of_memory,
    out_of_memory_message,
)
from ..models.interfaces import CachedFlow, WindowedEstimator
from ..presets import PresetSettings, resolve_preset
from .compute import StreamSpec, offline_mel, prompt_flow_state, vocode_whole, vocoder_kind
from .options import OUTPUTS, StreamOptions
from .schedule import HopPlan, chunk_tokens, prompt_pad
from .session import RngSpec, StreamSession, as_tokens, make_rng
from .state import PreparedPrompt, PromptCache, tensor_digest, trim_flow_state

__all__ = ["Token2Wav", "Prompt"]

ATTENTIONS = ("full", "chunk")
# A prompt whose mel and tokens disagree by at most this many tokens (or this share of the prompt) is trimmed
# the reference's way, with a warning; a larger mismatch means they describe different audio.
_TRIM_TOKENS = 2
_OFFLINE_HOP_CHUNKS = 4  # chunks per call when a long offline chunk-attention decode goes through a session
_TRIM_SHARE = 0.1


def _to_tensor(value: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be array-like, got {type(value).__name__}") from exc
    if dtype.is_floating_point:
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
        return t.to(dtype)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    return t.to(dtype)


def _usable_device(device: Any) -> torch.device:
    """``device`` as a torch device this torch can allocate on; else ValueError naming it (a CPU build asked for
    CUDA raised an AssertionError deep in loading)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:  # torch says "not compiled with CUDA", "invalid device ordinal"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"device={str(dev)!r} is not available to this torch ({reason})") from None
    return dev


@dataclass(frozen=True, eq=False)
class Prompt:
    """A voice prompt: its speech tokens, its log-mel ``[frames, mel_dim]`` and a speaker embedding.

    Accepts lists, numpy arrays or tensors; ``[1, P]`` tokens, ``[1, frames, mel_dim]`` mel and ``[1, D]``
    embeddings are squeezed. Checks against a particular model (vocabulary, mel size, frames per token)
    happen when a Token2Wav uses it.
    """

    tokens: Any
    mel: Any
    embedding: Any
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        tokens = _to_tensor(self.tokens, "Prompt.tokens", torch.int64)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"Prompt.tokens must be 1-D (or [1, P]), got shape {tuple(tokens.shape)}")
        mel = _to_tensor(self.mel, "Prompt.mel", torch.float32)
        if mel.dim() == 3 and mel.shape[0] == 1:
            mel = mel[0]
        if mel.dim() != 2:
            raise ValueError(f"Prompt.mel must be [frames, mel_dim], got shape {tuple(mel.shape)}")
        emb = _to_tensor(self.embedding, "Prompt.embedding", torch.float32)
        if emb.dim() == 2 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.dim() != 1:
            raise ValueError(f"Prompt.embedding must be 1-D (or [1, D]), got shape {tuple(emb.shape)}")
        if not torch.isfinite(mel).all() or not torch.isfinite(emb).all():
            raise ValueError("Prompt.mel and Prompt.embedding must be finite")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "mel", mel)
        object.__setattr__(self, "embedding", emb)
        object.__setattr__(self, "digest", tensor_digest(tokens, mel, emb))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.mel.shape[0])


def _share_weights_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its float32 parameters and buffers (nothing is copied).

    The constrained preset replaces the copy's Linear layers by int8 ones; everything else is read-only at
    inference, so sharing it is safe. A module not in float32 is converted on a real copy instead (the
    conversion must not touch the engine's own weights)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return copy.deepcopy(module).float()
    memo = {id(t): t for t in tensors}
    return copy.deepcopy(module, memo)


class Token2Wav:
    """A loaded token-to-waveform model.

    ``Token2Wav(flow, vocoder, config)`` wraps modules you built; ``Token2Wav.from_pretrained(dir)`` loads a
    CosyVoice 2/3 release directory or one of ours. Thread-safe: sessions share only read-only state.
    """

    def __init__(
        self,
        flow: nn.Module,
        vocoder: nn.Module | None,
        config: Any,
        *,
        prompt_cache_size: int = 16,
        n_timesteps: int = 10,
    ) -> None:
        self._flow = flow.eval()
        self._vocoder = vocoder.eval() if vocoder is not None else None
        self._config = config
        self.n_timesteps = n_timesteps
        # Checked here so a bad config fails at load time, naming the valid nearby values.
        self._chunk = chunk_tokens(int(config.static_chunk_size), int(config.token_mel_ratio))
        self.prompt_cache = PromptCache(prompt_cache_size)
        self._quantized: nn.Module | None = None
        self._quant_lock = threading.Lock()
        self._assets_lock = threading.Lock()  # speakers / tokenizer of bundled models, loaded on first use
        self._speakers: dict[str, dict[str, torch.Tensor]] | None = None
        self._tokenizer: Any = None
        self._saved_voices: dict[str, Any] | None = None  # spk2info.pt of the model directory, read on first use
        self._frontend: Any = None  # ONNX prompt front end (token2wav.frontend), made on first prompt_from_wav
        self._frontend_digest: str | None = None  # hash of the front-end files, computed on first use
        self._digest_lock = threading.Lock()  # hashing a release's tokenizer takes a second: not under _assets_lock
        ref = next(iter(flow.parameters()), None)
        self._device = ref.device if ref is not None else torch.device("cpu")
        self._dtype = ref.dtype if ref is not None else torch.float32
        # offline chunk attention above this many mel frames runs chunk by chunk (token2wav.memory)
        self.one_shot_frames = ONE_SHOT_FRAMES
        self._inline_batcher: Any = None  # runs stream() sessions on their callers' threads; made on first use
        self._inline_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        vocoder_precision: str = "float32",
        **kwargs: Any,
    ) -> Token2Wav:
        """Load a model directory (``cosyvoice{2,3}.yaml`` + ``flow``/``hift`` weights, ``.pt`` or
        ``.safetensors``, or our ``token2wav.yaml``), a bundled model by name, or a released model by id:
        ``"FunAudioLLM/Fun-CosyVoice3-0.5B-2512"`` (Hugging Face Hub; ``"ORG/NAME@REV"`` or ``revision=`` pins a
        branch, tag or commit) or ``"modelscope:ORG/NAME"``. An id downloads only the files token2wav reads into
        the hub's cache (offline: read from it); see :mod:`token2wav.hub`.

        vocoder_precision: ``"float32"``, or ``"bfloat16-mixed"`` for a HiFi-GAN vocoder (the demo voice) in
        float32 weights: its middle stages convolve in bfloat16, 1.4x faster on CPUs with native bfloat16 and
        about 48 dB SNR off float32 (``HiFiGANGenerator.set_precision``)."""
        from ..checkpoints import find_weights_file
        from ..config import read_config
        from ..cpu import detect_cpu
        from ..loading import load_flow, load_vocoder, resolve_model_dir
        from ..models.hifigan import VOCODER_PRECISIONS, HiFiGANGenerator

        device = _usable_device(device)  # before anything is downloaded or loaded
        if vocoder_precision not in VOCODER_PRECISIONS:
            raise ValueError(f"vocoder_precision must be one of {VOCODER_PRECISIONS}, got {vocoder_precision!r}")
        if vocoder_precision != "float32" and dtype != torch.float32:
            raise ValueError(f"vocoder_precision={vocoder_precision!r} needs dtype=torch.float32 (it picks which "
                             f"convolutions run in bfloat16), got dtype={dtype}")
        path = resolve_model_dir(model_dir, revision=revision)  # a model id is fetched here, before any weights load
        config = read_config(path)
        flow = load_flow(config, find_weights_file(path, ("flow",)), device=device, dtype=dtype)
        voc_path = find_weights_file(path, ("hift", "vocoder"))
        vocoder = load_vocoder(config, voc_path, device=device, dtype=dtype)
        if vocoder_precision != "float32":
            if not isinstance(vocoder, HiFiGANGenerator):
                raise ValueError(f"vocoder_precision={vocoder_precision!r} applies to HiFi-GAN vocoders (the demo "
                                 f"voice); this model's vocoder is {type(vocoder).__name__}: use 'float32'")
            vocoder.set_precision(vocoder_precision)
            if not detect_cpu().bf16_in_reach:
                warnings.warn("vocoder_precision='bfloat16-mixed' on a CPU without native bfloat16 (AMX or "
                              "AVX512-BF16) within oneDNN's reach: bfloat16 is emulated there and the vocoder is "
                              "slower than in float32 (measured 4.3x slower with oneDNN limited to AVX2)",
                              stacklevel=2)
        return cls(flow, vocoder, config, **kwargs)

    # ------------------------------------------------------------------------------------------ properties

    @property
    def config(self) -> Any:
        return self._config

    @property
    def flow(self) -> nn.Module:
        return self._flow

    @property
    def vocoder(self) -> nn.Module | None:
        return self._vocoder

    @property
    def sample_rate(self) -> int:
        return int(self._config.sample_rate)

    @property
    def token_rate(self) -> int:
        return int(self._config.token_rate)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def chunk_tokens(self) -> int:
        """The model's attention chunk in tokens."""
        return self._chunk

    @property
    def vocoder_kind(self) -> str | None:
        """'causal', 'hifigan', 'crossfade' or None; see ``compute.vocoder_kind``."""
        return vocoder_kind(self._vocoder)

    # ------------------------------------------------------------------------------------------ prompts

    def prepare_prompt(self, prompt: Prompt | None) -> PreparedPrompt:
        """Check a prompt against this model and put it on the model's device.

        Mel frames and tokens must cover the same audio: ``frames == tokens * token_mel_ratio``. A small
        mismatch is trimmed as the reference front end does (keep ``min(frames // ratio, tokens)`` tokens and
        ``ratio`` times as many frames) with a warning; a large one is an error.
        """
        cfg = self._config
        ratio = int(cfg.token_mel_ratio)
        if prompt is None:
            return PreparedPrompt(
                tokens=torch.zeros(1, 0, dtype=torch.int64, device=self._device),
                feat=torch.zeros(1, 0, cfg.mel_dim, dtype=self._dtype, device=self._device),
                embedding=torch.zeros(1, cfg.spk_embed_dim, dtype=self._dtype, device=self._device),
                digest="none",
            )
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompt must be a token2wav.Prompt or None, got {type(prompt).__name__}")
        if prompt.mel.shape[1] != cfg.mel_dim:
            raise ValueError(f"Prompt.mel must be [frames, {cfg.mel_dim}] for this model, "
                             f"got shape {tuple(prompt.mel.shape)}")
        if prompt.embedding.shape[0] != cfg.spk_embed_dim:
            raise ValueError(f"Prompt.embedding must have {cfg.spk_embed_dim} values for this model, "
                             f"got {prompt.embedding.shape[0]}")
        tokens = as_tokens(prompt.tokens, cfg.vocab_size, name="Prompt.tokens")
        mel = prompt.mel
        n_tok, n_frames = tokens.shape[1], mel.shape[0]
        keep = min(n_frames // ratio, n_tok)
        digest = prompt.digest
        if keep * ratio != n_frames or keep != n_tok:
            lost = max(n_tok - keep, (n_frames - keep * ratio) / ratio)
            if keep == 0 or lost > max(_TRIM_TOKENS, _TRIM_SHARE * max(n_tok, 1)):
                raise ValueError(
                    f"prompt mel has {n_frames} frames but its {n_tok} tokens need {n_tok * ratio} "
                    f"(token_mel_ratio={ratio}); they must describe the same audio (trimming would drop "
                    f"{lost:g} tokens' worth)"
                )
            warnings.warn(
                f"prompt: {n_frames} mel frames vs {n_tok} tokens x {ratio}; trimmed to {keep} tokens and "
                f"{keep * ratio} frames as the reference front end does",
                UserWarning,
                stacklevel=3,
            )
            tokens, mel = tokens[:, :keep], mel[: keep * ratio]
            digest = tensor_digest(tokens, mel, prompt.embedding)
        return PreparedPrompt(
            tokens=tokens.to(self._device),
            feat=mel.unsqueeze(0).to(device=self._device, dtype=self._dtype),
            embedding=prompt.embedding.unsqueeze(0).to(device=self._device, dtype=self._dtype),
            digest=digest,
        )

    def _prompt_state(self, flow: nn.Module, prompt: PreparedPrompt, **options: Any) -> Any:
        """The flow's cache after the prompt, computed once per (prompt, flow, options) and shared."""
        key = (prompt.digest, id(flow), tuple(sorted(options.items())))
        return self.prompt_cache.get_or_compute(key, lambda: prompt_flow_state(flow, prompt, **options))

    def _default_lookahead_override(self) -> int | None:
        """The config's run-time lookahead where it differs from the flow's trained (maximum) one.

        Models trained with random lookahead (the demo voice: trained up to 5, run at 3 by default) need it
        passed explicitly; for released models the two are equal and nothing is passed."""
        configured = int(self._config.pre_lookahead_len)
        trained = int(getattr(self._flow, "pre_lookahead_len", configured))
        return configured if configured != trained else None

    # ------------------------------------------------------------------------------------------ voices

    def _asset(self, key: str) -> Path:
        files = self._config.extra.get("files") or {}
        if key not in files:
            raise ValueError(f"this model ships no {key} (only bundled token2wav-format models such as 'demo' do)")
        return Path(self._config.path).parent / files[key]

    def _voices(self) -> dict[str, Any]:
        """Saved voices of the model directory's ``spk2info.pt`` (CosyVoice's format), read once."""
        with self._assets_lock:
            if self._saved_voices is None:
                from ..frontend.voices import SPK2INFO, read_voices

                path = Path(self._config.path).parent / SPK2INFO
                self._saved_voices = read_voices(path) if path.is_file() else {}
            return self._saved_voices

    @property
    def speakers(self) -> list[str]:
        """Names of the model's voices: bundled ones, then those saved in its ``spk2info.pt``."""
        names = list(self._config.extra.get("speakers") or [])
        return names + [n for n in self._voices() if n not in names]

    def speaker_prompt(self, name: str) -> Prompt:
        """The voice prompt (embedding, prompt tokens and mel) of speaker ``name``. A saved voice that has only
        an embedding gives a prompt of 0 tokens."""
        if name not in self.speakers:
            raise ValueError(f"speaker must be one of {self.speakers}, got {name!r}")
        if name not in (self._config.extra.get("speakers") or []):
            return Prompt(*self._voices()[name])
        with self._assets_lock:
            if self._speakers is None:
                from ..tokenizer import load_speakers

                self._speakers = load_speakers(self._asset("speakers"))
        entry = self._speakers[name]
        return Prompt(entry["prompt_token"][0], entry["prompt_feat"][0], entry["embedding"][0])

    def tokenize(self, wave: Any, sample_rate: int) -> list[int]:
        """Speech tokens of a waveform, with the model's own tokenizer: ``[samples]``, ``[channels, samples]``
        or ``[samples, channels]`` (averaged to mono), float in [-1, 1] or int16/int32 PCM, any sample rate."""
        from ..frontend.dsp import check_rate

        return self.speech_tokenizer()(wave, check_rate(sample_rate, "sample_rate"))  # the tokenizer reads the layout

    def speech_tokenizer(self) -> Any:
        """The bundled model's own k-means speech tokenizer, loaded once."""
        with self._assets_lock:
            if self._tokenizer is None:
                from ..tokenizer import KMeansTokenizer

                self._tokenizer = KMeansTokenizer.from_file(self._asset("tokenizer"))
        return self._tokenizer

    def prompt_from_wav(self, wav: Any, sample_rate: int | None = None, *, speaker: str | None = None) -> Prompt:
        """A voice prompt from a recording (a sound file path, or samples with ``sample_rate``), 0.5 to 30 s.

        CosyVoice 2/3 directories need ``speech_tokenizer_v{2,3}.onnx`` and ``campplus.onnx`` (onnxruntime:
        ``pip install 'token2wav[frontend]'``); ``speaker`` then replaces CAM++'s embedding by a voice's. The
        demo voice uses its own tokenizer and mel and needs ``speaker`` for the embedding. See
        ``token2wav.frontend``."""
        from ..frontend.prompt import PromptFrontend, demo_prompt

        emb = None if speaker is None else self.speaker_prompt(speaker).embedding
        if self._config.format != "cosyvoice":
            if "tokenizer" not in (self._config.extra.get("files") or {}):
                raise ValueError("this model has neither a CosyVoice front end nor a bundled tokenizer")
            if speaker is None:
                raise ValueError(f"speaker is required for this model (it has no speaker encoder): one of "
                                 f"{self.speakers}")
            return Prompt(*demo_prompt(self, wav, sample_rate, speaker))
        with self._assets_lock:
            if self._frontend is None:
                self._frontend = PromptFrontend.for_config(self._config)
            frontend = self._frontend
        return Prompt(*frontend(wav, sample_rate, embedding=emb))

    def warm_up(self) -> None:
        """Run one short offline decode and one streamed chunk, so that the first caller does not pay the
        one-time costs (allocator pools, kernel selection, lazily built tables)."""
        n = int(self._chunk) + int(self._config.pre_lookahead_len)
        self.synthesize([0] * n, attention="chunk")
        with self.stream() as session:
            session.push([0] * n)

    def frontend_fingerprint(self, speaker: str | None = None) -> str:
        """A hex digest of what turns a recording into a prompt on this model: the config file and the front-end
        model files (CosyVoice's ONNX tokenizer and CAM++, or a bundled tokenizer), and ``speaker``'s stored
        embedding when one replaces the speaker model's. Equal files give equal fingerprints on any machine; the
        server names cloned prompts by it (``token2wav.serve.prompt_store.audio_prompt_id``)."""
        from ..frontend.prompt import files_digest, frontend_files

        with self._digest_lock:
            if self._frontend_digest is None:
                self._frontend_digest = files_digest(frontend_files(self._config))
            digest = self._frontend_digest
        if speaker is None:
            return digest
        return tensor_digest(np.frombuffer(f"{digest}|{speaker}".encode(), np.uint8),
                             self.speaker_prompt(speaker).embedding)

    def add_voice(self, name: str, prompt: Prompt, *, overwrite: bool = False) -> Path:
        """Save ``prompt`` as voice ``name`` in the model directory's ``spk2info.pt`` (the reference's format)."""
        from ..frontend.voices import save_voice

        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompt must be a token2wav.Prompt, got {type(prompt).__name__}")
        if name in (self._config.extra.get("speakers") or []):
            raise ValueError(f"name {name!r} is a bundled voice of this model; choose another")
        self.prepare_prompt(prompt)  # only prompts this model can use
        path = save_voice(Path(self._config.path).parent, name, prompt.tokens, prompt.mel, prompt.embedding,
                          overwrite=overwrite)
        with self._assets_lock:
            self._saved_voices = None  # re-read on next use
        return path

    # ------------------------------------------------------------------------------------------ presets

    def quantized_flow(self) -> nn.Module:
        """An int8 dynamically quantized copy of the flow's Linear layers (CPU), made once per engine."""
        if self._device.type != "cpu":
            raise ValueError(f"the constrained preset quantizes for the CPU; engine is on {self._device}")
        with self._quant_lock:
            if self._quantized is None:
                clone = _share_weights_copy(self._flow)
                # Linear layers whose `.weight` the models read for device/dtype stay float (they are tiny).
                keep = {"spk_embed_affine_layer", "decoder.estimator.proj_out",
                        "decoder.estimator.final_proj"}
                qconfig = torch.ao.quantization.default_dynamic_qconfig
                spec = {name: qconfig for name, mod in clone.named_modules()
                        if isinstance(mod, nn.Linear) and name not in keep}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch marks eager-mode quantization as deprecated
                    # in place: the clone's Linear modules are swapped for int8 ones one by one, so no
                    # second float copy of the flow ever exists (peak: the flow + its int8 Linear weights)
                    quant = torch.ao.quantization.quantize_dynamic(clone, spec, dtype=torch.qint8, inplace=True)
                self._quantized = quant.eval()
            return self._quantized

    def preset(self, name: str) -> PresetSettings:
        return resolve_preset(name, self._config)

    # ------------------------------------------------------------------------------------------ offline

    def synthesize(
        self,
        tokens: Any,
        prompt: Prompt | None = None,
        attention: str = "full",
        output: str = "audio",
        rng: RngSpec = None,
    ) -> np.ndarray:
        """Decode all tokens at once. ``attention='full'`` is the reference's non-streaming decode;
        ``'chunk'`` is the chunk-causal decode every streaming mode is checked against.

        Returns float32 audio ``[samples]`` or mel ``[mel_dim, frames]``. ``rng`` seeds the CosyVoice 2
        vocoder's random source (int, Generator or ``call -> Generator``; default seed 0).
        """
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        ids = as_tokens(tokens, self._config.vocab_size, device=self._device)
        if ids.shape[1] == 0:
            raise ValueError("tokens is empty: synthesize needs at least one token")
        p = self.prepare_prompt(prompt)
        frames = (int(p.tokens.shape[1]) + int(ids.shape[1])) * int(self._config.token_mel_ratio)
        # refused up front when it cannot fit (see token2wav.memory for the rule)
        check_offline_memory(self._config, frames, attention=attention, dtype=self._dtype, device=self._device,
                             n_timesteps=self.n_timesteps)
        extra: dict[str, Any] = {}
        look = self._default_lookahead_override()
        if attention == "chunk" and look is not None:
            extra["lookahead"] = look  # the same lookahead a default stream decodes with
        try:
            if attention == "chunk" and frames > self.one_shot_frames:
                # long input: chunk by chunk through the cached path (the same mel to float rounding),
                # so memory grows linearly with length instead of with its square
                mel = self._chunked_mel(ids, prompt)
            else:
                mel = offline_mel(self._flow, ids, p, streaming=attention == "chunk", n_timesteps=self.n_timesteps,
                                  **extra)  # fmt: skip
            if output == "mel":
                return mel[0].float().cpu().numpy()
            return self.vocode(mel, rng=rng)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise InsufficientMemoryError(out_of_memory_message(exc, "offline synthesis")) from None
            raise

    def _chunked_mel(self, ids: torch.Tensor, prompt: Prompt | None) -> torch.Tensor:
        """The chunk-attention mel of ``ids`` decoded by a cached session, four chunks per call."""
        session = self.stream(prompt, hop=_OFFLINE_HOP_CHUNKS * self._chunk, schedule="fixed", output="mel")
        with session:
            pieces = session.push(ids[0].cpu())
            pieces.append(session.finish())
        mel = np.concatenate([m for m in pieces if m.ndim == 2 and m.shape[-1]], axis=-1)
        return torch.from_numpy(mel).unsqueeze(0).to(device=self._device, dtype=self._dtype)

    def vocode(self, mel: Any, rng: RngSpec = None) -> np.ndarray:
        """Vocode a whole mel ``[1, mel_dim, frames]`` (or ``[mel_dim, frames]``; a tensor or an array) at once."""
        if self._vocoder is None:
            raise ValueError("this engine has no vocoder; use output='mel'")
        mel = _to_tensor(mel, "mel", torch.float32) if not isinstance(mel, torch.Tensor) else mel
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        dim = int(self._config.mel_dim)
        if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != dim:
            raise ValueError(f"mel must be [{dim}, frames] or [1, {dim}, frames] (one mel at a time), got shape "
                             f"{tuple(mel.shape)}")
        if mel.shape[2] == 0:
            raise ValueError("mel has no frames: vocode needs at least one")
        if not mel.is_floating_point():
            mel = mel.float()
        if not torch.isfinite(mel).all():
            raise ValueError("mel holds NaN or infinite values")
        mel = mel.to(device=self._device, dtype=self._dtype)
        speech = vocode_whole(self._vocoder, mel, rng=make_rng(rng)[0], piece_frames=self.one_shot_frames)
        return speech[0].float().cpu().numpy()

    # ------------------------------------------------------------------------------------------ streaming

    def stream(self, prompt: Prompt | None = None, **options: Any) -> StreamSession:
        """Start a streaming session. See StreamSession for push / finish / close.

        Options (keyword-only): hop, schedule, max_hop, mode, window_frames, preset, output, rng,
        pre_lookahead_len; see ``session_setup``.
        """
        return self._inline().stream(prompt, **options)

    def _inline(self) -> Any:
        """The engine's inline batcher: every ``stream()`` session's chunks are computed on its caller's thread,
        by the same code as a batched session's, with its keys/values in a page pool (no growth copies)."""
        with self._inline_lock:
            if self._inline_batcher is None:
                from .batcher import Batcher

                self._inline_batcher = Batcher(self, workers=0, max_batch=1)
            return self._inline_batcher

    def batcher(self, **kwargs: Any) -> Any:
        """A ``token2wav.Batcher`` for this engine: sessions whose chunks run batched (see ``streaming/batcher``)."""
        from .batcher import Batcher

        return Batcher(self, **kwargs)

    def session_setup(self, prompt: Prompt | None = None, *, rng: RngSpec = None, **options: Any) -> dict[str, Any]:
        """Resolve a stream's options (``StreamOptions``: hop, schedule, max_hop, mode, window_frames, preset,
        output, pre_lookahead_len) and prompt into a StreamSession's settings: its spec, hop plan and rng.

        hop: tokens per emission (default one chunk); the first emission adds the prompt pad.
        schedule: 'fixed' (default) or 'exponential' (the reference's doubling up to ``max_hop``, default
        four chunks), restarted for every session. mode: 'cached' (default), 'recompute' (the reference
        algorithm) or 'window' (cached, attention limited to prompt + last ``window_frames`` frames).
        preset: fills hop / schedule / max_hop left unset (see ``token2wav.presets``); 'constrained' also
        decodes with an int8 flow. pre_lookahead_len: only where the model supports another lookahead.
        """
        unknown = set(options) - set(StreamOptions.names())
        if unknown:
            raise TypeError(f"unknown stream option(s) {', '.join(sorted(unknown))}; options are "
                            f"{', '.join(StreamOptions.names())}, rng")
        cfg = self._config
        trained = int(getattr(self._flow, "pre_lookahead_len", cfg.pre_lookahead_len))
        opts = StreamOptions(**options).resolve(cfg, trained_lookahead=trained)
        mode, output, window_frames = opts.mode, opts.output, opts.window_frames
        chunk, chunk_frames, look_override = opts.chunk, opts.chunk_frames, opts.lookahead_override
        flow = self._flow
        if opts.quantize:
            flow = self.quantized_flow()
        prepared = self.prepare_prompt(prompt)
        plan = HopPlan(hop=opts.hop, pad=prompt_pad(prepared.num_tokens, chunk), lookahead=opts.lookahead,
                       schedule=opts.schedule, max_hop=opts.max_hop, chunk=chunk)
        options: dict[str, Any] = {"n_timesteps": self.n_timesteps}
        if chunk_frames is not None:
            options["chunk_size"] = chunk_frames
        prompt_state = None
        if mode != "recompute":
            if not isinstance(flow, CachedFlow):
                raise NotImplementedError(
                    f"{type(flow).__name__} has no cached streaming API yet; use mode='recompute'"
                )

            def prompt_state() -> Any:
                return self._prompt_state(flow, prepared, **options)

        window_fn = None
        if mode == "window":
            estimator = flow.decoder.estimator
            if not isinstance(estimator, WindowedEstimator):
                raise NotImplementedError(
                    f"mode='window' trims the DiT's attention cache; {type(flow).__name__} has none "
                    "(use mode='cached')"
                )
            chunk_mel = chunk * int(cfg.token_mel_ratio)
            head = -(-prepared.feat.shape[1] // chunk_mel) * chunk_mel  # the prompt's chunks, always kept

            def window_fn(state: Any, frames: int) -> Any:
                return trim_flow_state(state, head_frames=head, window_frames=frames, estimator=estimator)
        rng_fn, shared_rng = make_rng(rng)
        spec = StreamSpec(
            flow=flow,
            vocoder=self._vocoder if output == "audio" else None,
            prompt=prepared,
            prompt_state=prompt_state,
            mode=mode,
            output=output,
            ratio=int(cfg.token_mel_ratio),
            samples_per_frame=int(cfg.samples_per_frame),
            sample_rate=int(cfg.sample_rate),
            n_timesteps=self.n_timesteps,
            rng=rng_fn,
            lookahead=look_override,
            chunk_size=chunk_frames,
            window_frames=window_frames,
            window_fn=window_fn,
        )
        return {"spec": spec, "plan": plan, "vocab_size": int(cfg.vocab_size), "shared_rng": shared_rng,
                "start_buffer_s": opts.start_buffer_s}
