"""Wire protocol of the streaming server: limits, message parsing and validation, PCM/WAV encoding.

Everything here is plain Python + numpy so that the client, the command line and the tests can use it
without importing FastAPI.

WebSocket ``/v1/stream`` (client -> server, JSON text frames)::

    {"type": "start", "prompt_id"?: str, "preset"?: str, "hop"?: int, "schedule"?: str, "mode"?: str,
     "window_frames"?: int, "pre_lookahead_len"?: int, "start_buffer_ms"?: number}
    {"type": "tokens", "tokens": [int, ...]}            # any number of times
    {"type": "end"}

server -> client::

    {"type": "queued", "position": k, "need": x, "capacity": y}   waiting for capacity (before "started")
    {"type": "started", "session": str, "sample_rate": int, "token_rate": float, "max_queued_tokens": int,
     "schedule": str, "start_buffer_ms": int}
    {"type": "chunk", "index": i, "samples": n, "compute_ms": x, "queued_tokens": q, "decoded_tokens": d,
     "start_buffer_ms": int, "stall_ms": x}
    followed by one binary frame: <n int16 little-endian PCM samples>
    {"type": "slow_down", "queued_tokens": q, "decoded_tokens": d}   the decoder is behind
    {"type": "resume", "queued_tokens": q, "decoded_tokens": d}      it caught up
    {"type": "done", "chunks": k, "samples": s}
    {"type": "error", "code": <ws close code>, "status": <http status>, "message": str}  then close

The server reads while it computes: tokens that arrive during a push wait in a queue of at most
``max_queued_tokens`` tokens, in order; ``slow_down`` is sent when the queue passes half of that and
``resume`` when it falls to a quarter; a message that would overfill it ends the stream with close 1008
(status 429). A client that keeps ``sent - decoded_tokens <= max_queued_tokens`` never overfills it.

``schedule`` defaults to ``adaptive``: each hop is chosen from the listener's clock (``streaming/pacing.py``).
``start_buffer_ms`` in ``started`` is the audio the server recommends buffering before playback starts, so that
this stream does not stall at the current load; each chunk header carries the current value (a client still
buffering uses the newest). A client's own ``start_buffer_ms`` in ``start`` wins and is what the server plans
with. ``stall_ms`` is the silence the server's model of the listener expects before that chunk (0 normally).
When the streams open already need more audio per second than the server measures it can compute, a new stream
waits in a bounded queue (``queued`` messages) or is refused with close 1013 and ``retry_after_s`` in its error.
"""

from __future__ import annotations

import io
import json
import logging
import math
import wave
from dataclasses import dataclass
from typing import Any

import numpy as np

from token2wav.streaming.options import MODES
from token2wav.streaming.schedule import SCHEDULES

MAX_START_BUFFER_MS = 60_000

__all__ = [
    "WS_GOING_AWAY",
    "WS_INTERNAL_ERROR",
    "WS_NORMAL",
    "WS_POLICY_VIOLATION",
    "WS_TOO_BIG",
    "WS_TRY_AGAIN_LATER",
    "EndMessage",
    "PromptRequest",
    "ProtocolError",
    "ServerLimits",
    "StartMessage",
    "SynthesizeRequest",
    "TokensMessage",
    "decode_json",
    "describe_model",
    "parse_client_message",
    "parse_prompt_request",
    "parse_synthesize_request",
    "pcm16_bytes",
    "pcm16_to_float",
    "validate_tokens",
    "wav_bytes",
]

# WebSocket close codes (RFC 6455 section 7.4.1)
WS_NORMAL = 1000
WS_GOING_AWAY = 1001
WS_POLICY_VIOLATION = 1008
WS_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013

_HTTP_FOR_WS = {
    WS_POLICY_VIOLATION: 400,
    WS_TOO_BIG: 413,
    WS_TRY_AGAIN_LATER: 503,
    WS_INTERNAL_ERROR: 500,
    WS_GOING_AWAY: 408,
}

MAX_HOP = 10_000
MAX_WINDOW_FRAMES = 1_000_000
AUDIO_FORMATS = ("wav", "pcm")
ATTENTIONS = ("full", "chunk")


class ProtocolError(Exception):
    """A client error with the HTTP status and the WebSocket close code that report it."""

    def __init__(
        self, message: str, *, ws_code: int = WS_POLICY_VIOLATION, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.ws_code = ws_code
        self.status = status if status is not None else _HTTP_FOR_WS.get(ws_code, 400)

    retry_after_s: float | None = None  # set on refusals that a later retry may pass

    def to_json(self) -> dict[str, Any]:
        out = {"type": "error", "code": self.ws_code, "status": self.status, "message": self.message}
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out

    @property
    def reason(self) -> str:
        """The ``reason`` label of ``token2wav_rejected_total`` for this refusal."""
        if self.ws_code == WS_GOING_AWAY:
            return "shutting_down"
        return {
            400: "bad_request",
            404: "unknown_prompt",
            408: "idle_timeout",
            413: "too_big",
            429: "queue_full",
            503: "busy",
        }.get(self.status, str(self.status))

    @property
    def close_reason(self) -> str:
        # a close frame's reason must fit in 123 bytes of UTF-8
        raw = self.message.encode("utf-8")
        if len(raw) <= 123:
            return self.message
        return raw[:120].decode("utf-8", errors="ignore") + "..."


# Limits below these leave no room for what they bound: a 'start' or 'tokens' message, a prompt's JSON or WAV.
LIMIT_MINIMUMS = {"max_message_bytes": 1024, "max_prompt_bytes": 1024}
# The `token2wav serve` option of each limit, named in its error beside the field
LIMIT_FLAGS = {
    "max_sessions": "--max-sessions",
    "max_tokens_per_session": "--max-tokens",
    "max_message_bytes": "--max-message-bytes",
    "max_prompt_bytes": "--max-prompt-bytes",
    "max_prompt_tokens": "--max-prompt-tokens",
    "workers": "--workers",
    "max_queued_tokens": "--max-queued-tokens",
    "max_waiting_streams": "--max-waiting-streams",
    "idle_timeout_s": "--idle-timeout",
    "start_timeout_s": "--start-timeout",
    "admission_wait_s": "--admission-wait",
}


def _limit_name(field: str) -> str:
    flag = LIMIT_FLAGS.get(field)
    return f"{field} ({flag})" if flag else field


@dataclass(frozen=True)
class ServerLimits:
    """Resource limits of one server process. Every value is checked by ``__post_init__``."""

    max_sessions: int = 16  # open WebSocket streams + in-flight /v1/synthesize requests
    max_tokens_per_session: int = 25 * 600  # ten minutes of speech at 25 tokens/s
    max_message_bytes: int = 1 << 20  # one WebSocket message or one /v1/synthesize request body
    max_prompt_bytes: int = 16 << 20  # one /v1/prompts body (a mel as JSON text is large)
    idle_timeout_s: float = 30.0  # longest wait for the next client message on a stream
    start_timeout_s: float = 5.0  # longest wait for 'start' on a new stream: an unused slot is freed sooner
    send_timeout_s: float = 30.0  # longest wait for a client to take one outgoing frame
    max_prompts: int = 256  # registered prompts kept; the least recently used is dropped
    # tokens of one posted prompt: its first pass attends over all of them (O(N^2)); 60 s at 25 tokens/s, twice
    # what a release's front end makes from its longest (30 s) recording
    max_prompt_tokens: int = 1500
    workers: int = 4  # threads running model work
    max_queued_tokens: int = 25 * 120  # tokens received but not yet decoded, per stream (2 min of speech)
    # admission: a stream that would take the audio the open streams need past the measured capacity waits for
    # capacity (at most max_waiting_streams of them, each at most admission_wait_s), else close 1013
    max_waiting_streams: int = 8
    admission_wait_s: float = 10.0
    admit_by_capacity: bool = True  # False: admit up to max_sessions whatever the load

    def __post_init__(self) -> None:
        ints = (
            "max_sessions",
            "max_tokens_per_session",
            "max_message_bytes",
            "max_prompt_bytes",
            "max_prompts",
            "max_prompt_tokens",
            "workers",
            "max_queued_tokens",
            "max_waiting_streams",
        )
        for name in ints:
            v = getattr(self, name)
            low = LIMIT_MINIMUMS.get(name, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{_limit_name(name)} must be an integer >= {low}, got {v!r}")
        for name in ("idle_timeout_s", "start_timeout_s", "send_timeout_s", "admission_wait_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{_limit_name(name)} must be a finite number > 0, got {v!r}")


# ----------------------------------------------------------------------------------------- validation


def decode_json(raw: str | bytes, *, what: str = "message") -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON in {what}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"malformed JSON in {what}: not UTF-8") from None
    except RecursionError:  # hostile nesting depth
        raise ProtocolError(f"malformed JSON in {what}: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal with thousands of digits
        raise ProtocolError(f"malformed JSON in {what}: {str(e)[:60]}") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_tokens(value: object, vocab_size: int, *, name: str = "tokens") -> np.ndarray:
    """Check a JSON token list: ints in ``[0, vocab_size)``. Returns an int64 array."""
    if not isinstance(value, list):
        raise ProtocolError(f"'{name}' must be a list of integers, got {type(value).__name__}")
    for v in value:
        if not _is_int(v):
            raise ProtocolError(f"'{name}' must hold only integers, found {json.dumps(v)[:40]}")
    if not value:
        return np.zeros(0, dtype=np.int64)
    lo, hi = min(value), max(value)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ProtocolError(f"token id {bad} in '{name}' is out of range [0, {vocab_size})")
    return np.asarray(value, dtype=np.int64)


def _opt_str(d: dict[str, Any], key: str, choices: tuple[str, ...] | None = None) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ProtocolError(f"'{key}' must be a non-empty string, got {json.dumps(v)[:40]}")
    if choices is not None and v not in choices:
        raise ProtocolError(f"'{key}' must be one of {', '.join(choices)}, got {v[:40]!r}")
    return v


def _float_array(value: object, name: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise ProtocolError(f"'{name}' must be a {ndim}-D array of numbers") from None
    if arr.ndim != ndim or arr.size == 0:
        raise ProtocolError(f"'{name}' must be a non-empty {ndim}-D array of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ProtocolError(f"'{name}' must hold finite numbers")
    return arr


# ----------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class StartMessage:
    prompt_id: str | None = None
    preset: str | None = None
    hop: int | None = None
    mode: str | None = None
    window_frames: int | None = None
    pre_lookahead_len: int | None = None
    schedule: str | None = None
    start_buffer_ms: float | None = None


@dataclass(frozen=True)
class TokensMessage:
    tokens: np.ndarray


@dataclass(frozen=True)
class EndMessage:
    pass


ClientMessage = StartMessage | TokensMessage | EndMessage

_ALLOWED_KEYS = {
    "start": {"type", "prompt_id", "preset", "hop", "mode", "window_frames", "pre_lookahead_len", "schedule",
              "start_buffer_ms"},
    "tokens": {"type", "tokens"},
    "end": {"type"},
}


def parse_client_message(raw: str | bytes, vocab_size: int) -> ClientMessage:
    """Parse one WebSocket text frame. Raises :class:`ProtocolError` (close 1008) on anything malformed."""
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _ALLOWED_KEYS:  # a list or dict here is not hashable
        raise ProtocolError(f"unknown message type {json.dumps(kind)[:40]}; expected start, tokens or end")
    extra = set(data) - _ALLOWED_KEYS[kind]
    if extra:
        raise ProtocolError(f"unexpected field(s) in '{kind}' message: {', '.join(sorted(extra))[:60]}")
    if kind == "tokens":
        if "tokens" not in data:
            raise ProtocolError("'tokens' message lacks the 'tokens' list")
        return TokensMessage(validate_tokens(data["tokens"], vocab_size))
    if kind == "end":
        return EndMessage()
    for key, top in (("hop", MAX_HOP), ("window_frames", MAX_WINDOW_FRAMES)):
        v = data.get(key)
        if v is not None and (not _is_int(v) or not 1 <= v <= top):
            raise ProtocolError(f"'{key}' must be an integer in [1, {top}], got {json.dumps(v)[:40]}")
    look = data.get("pre_lookahead_len")
    if look is not None and (not _is_int(look) or not 0 <= look <= MAX_HOP):
        raise ProtocolError(f"'pre_lookahead_len' must be an integer >= 0, got {json.dumps(look)[:40]}")
    buffer_ms = data.get("start_buffer_ms")
    if buffer_ms is not None and (isinstance(buffer_ms, bool) or not isinstance(buffer_ms, (int, float))
                                  or not 0 <= buffer_ms <= MAX_START_BUFFER_MS):
        raise ProtocolError(f"'start_buffer_ms' must be a number in [0, {MAX_START_BUFFER_MS}], "
                            f"got {json.dumps(buffer_ms)[:40]}")
    return StartMessage(
        schedule=_opt_str(data, "schedule", SCHEDULES),
        start_buffer_ms=buffer_ms,
        prompt_id=_opt_str(data, "prompt_id"),
        preset=_opt_str(data, "preset"),
        hop=data.get("hop"),
        mode=_opt_str(data, "mode", MODES),
        window_frames=data.get("window_frames"),
        pre_lookahead_len=look,
    )


@dataclass(frozen=True)
class SynthesizeRequest:
    tokens: np.ndarray
    prompt_id: str | None = None
    format: str = "wav"
    attention: str | None = None


def parse_synthesize_request(raw: bytes, vocab_size: int) -> SynthesizeRequest:
    data = decode_json(raw, what="request body")
    if not isinstance(data, dict):
        raise ProtocolError("request body must be a JSON object")
    extra = set(data) - {"tokens", "prompt_id", "format", "attention"}
    if extra:
        raise ProtocolError(f"unexpected field(s): {', '.join(sorted(extra))[:60]}")
    if "tokens" not in data:
        raise ProtocolError("request lacks the 'tokens' list")
    tokens = validate_tokens(data["tokens"], vocab_size)
    if tokens.size == 0:
        raise ProtocolError("'tokens' must not be empty")
    return SynthesizeRequest(
        tokens=tokens,
        prompt_id=_opt_str(data, "prompt_id"),
        format=_opt_str(data, "format", AUDIO_FORMATS) or "wav",
        attention=_opt_str(data, "attention", ATTENTIONS),
    )


@dataclass(frozen=True)
class PromptRequest:
    tokens: np.ndarray
    mel: np.ndarray
    embedding: np.ndarray
    prompt_id: str | None = None  # set for a recording (named by its audio); arrays are named by their hash


def parse_prompt_request(raw: bytes, vocab_size: int, max_tokens: int | None = None) -> PromptRequest:
    """A JSON prompt; ``max_tokens`` bounds its length before any array is built (``max_prompt_tokens``)."""
    data = decode_json(raw, what="request body")
    if not isinstance(data, dict):
        raise ProtocolError("request body must be a JSON object")
    missing = [k for k in ("tokens", "mel", "embedding") if k not in data]
    if missing:
        raise ProtocolError(f"request lacks field(s): {', '.join(missing)}")
    extra = set(data) - {"tokens", "mel", "embedding"}
    if extra:
        raise ProtocolError(f"unexpected field(s): {', '.join(sorted(extra))[:60]}")
    if max_tokens is not None and isinstance(data["tokens"], list) and len(data["tokens"]) > max_tokens:
        raise ProtocolError(f"prompt of {len(data['tokens'])} tokens exceeds max_prompt_tokens={max_tokens}",
                            ws_code=WS_TOO_BIG)
    tokens = validate_tokens(data["tokens"], vocab_size)
    if tokens.size == 0:
        raise ProtocolError("'tokens' must not be empty")
    return PromptRequest(
        tokens=tokens,
        mel=_float_array(data["mel"], "mel", 2),
        embedding=_float_array(data["embedding"], "embedding", 1),
    )


# ----------------------------------------------------------------------------------------- audio


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """Float audio in [-1, 1] -> int16 little-endian bytes (clipped, rounded to nearest)."""
    a = np.asarray(audio, dtype=np.float32).reshape(-1)
    return np.round(np.clip(a, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """A mono 16-bit PCM WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm16_bytes(audio))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- model facts


def voice_names(t2w: Any) -> list[str]:
    """The model's voices (``Token2Wav.speakers``); none for an engine without them or with a damaged voices
    file, which still serves everything else (logged)."""
    try:
        return [str(s) for s in (getattr(t2w, "speakers", None) or [])]
    except Exception as e:  # noqa: BLE001
        logging.getLogger("token2wav.serve").warning("voices unavailable: %s", e)
        return []


def describe_model(t2w: Any, name: str = "") -> dict[str, Any]:
    """The facts ``token2wav info`` prints and ``GET /v1/models`` returns, as plain JSON types."""
    cfg = t2w.config
    ratio = int(cfg.token_mel_ratio)
    rate = float(t2w.token_rate)
    lookahead = int(cfg.pre_lookahead_len)
    flow_params = sum(p.numel() for p in t2w.flow.parameters())
    voc_params = sum(p.numel() for p in t2w.vocoder.parameters()) if t2w.vocoder is not None else 0
    info: dict[str, Any] = {
        "name": name,
        "family": str(getattr(cfg, "family", "")),
        "sample_rate": int(t2w.sample_rate),
        "token_rate": rate,
        "token_mel_ratio": ratio,
        "pre_lookahead_len": lookahead,
        "static_chunk_size": int(cfg.static_chunk_size),
        "chunk_tokens": int(cfg.static_chunk_size) // ratio,
        "vocab_size": int(cfg.vocab_size),
        "mel_dim": int(cfg.mel_dim),
        "spk_embed_dim": int(cfg.spk_embed_dim),
        "samples_per_token": int(cfg.samples_per_frame) * ratio,
        "parameters": {"flow": flow_params, "vocoder": voc_params, "total": flow_params + voc_params},
        "device": str(getattr(t2w, "device", "cpu")),
        "dtype": str(getattr(t2w, "dtype", "")).replace("torch.", ""),
    }
    supported = getattr(cfg, "supported_chunk_tokens", None)
    if supported:
        info["supported_chunk_tokens"] = [int(supported[0]), int(supported[1])]
    supported_look = getattr(cfg, "supported_pre_lookahead", None)
    if supported_look:
        info["supported_pre_lookahead"] = [int(supported_look[0]), int(supported_look[1])]
    presets: dict[str, Any] = {}
    from token2wav.presets import PRESETS

    for preset in PRESETS:
        s = t2w.preset(preset)
        first = int(s.first_chunk_tokens(lookahead))
        presets[preset] = {
            "hop": int(s.hop),
            "schedule": s.schedule,
            "max_hop": None if s.max_hop is None else int(s.max_hop),
            "chunk_tokens": int(s.chunk_tokens),
            "int8_flow": bool(s.quantize),
            "first_chunk_tokens": first,  # without a prompt's alignment pad
            "first_chunk_audio_wait_s": round(first / rate, 3),
            "summary": s.summary,
        }
    info["presets"] = presets
    info["batching"] = describe_batching(t2w)
    return info


def describe_batching(t2w: Any) -> dict[str, Any]:
    """How a Batcher (with its defaults) runs this model's streams: what shares a call, where the caches live,
    the padded sizes, and what each stream's cache costs."""
    from token2wav.models.buckets import ShapeBuckets
    from token2wav.models.interfaces import KVLayoutEstimator, RowsEstimator
    from token2wav.models.padded_solve import has_fixed_shapes
    from token2wav.streaming.batcher import DEFAULT_PAGE_FRAMES, cache_bytes_per_frame
    from token2wav.streaming.compute import vocoder_kind

    flow = t2w.flow
    per_frame = cache_bytes_per_frame(flow, int(getattr(t2w, "n_timesteps", 10)))
    frames_per_minute = 60 * float(t2w.token_rate) * int(t2w.config.token_mel_ratio)
    estimator = getattr(getattr(flow, "decoder", None), "estimator", None)
    packed = isinstance(estimator, RowsEstimator)
    paged = packed and isinstance(estimator, KVLayoutEstimator)
    vocoder = {"hifigan": "rows in the same state in one call", "causal": "rows in the same state in one call",
               "crossfade": "row by row"}.get(vocoder_kind(t2w.vocoder) or "", "none")
    flow_text = "row by row"
    if packed:
        flow_text = "rows packed along time in one call per solver step"
        if paged:
            flow_text += f"; keys/values in a page pool ({DEFAULT_PAGE_FRAMES}-frame pages, a prompt's shared)"
    return {
        "flow": flow_text,
        "vocoder": vocoder,
        "buckets": ShapeBuckets().describe() if has_fixed_shapes(estimator) else None,  # graphs only
        "graphs": "available: fixed-shape batches, CUDA graphs on a GPU (graphs=True, serve --graphs)"
        if has_fixed_shapes(estimator) else "not available for this estimator",
        "cache_bytes_per_frame": per_frame,
        "cache_mb_per_stream_minute": round(per_frame * frames_per_minute / 2**20, 1),
    }
