"""Client for the token2wav server: stream tokens at an LLM-like pace, collect PCM, measure latency.

Example::

    from token2wav.serve.client import stream_tokens_sync
    result = stream_tokens_sync("ws://127.0.0.1:50000/v1/stream", tokens, rate=None)  # the model's token rate
    print(result.first_chunk_latency_s, result.rtf, result.listener.worst_stall_s)
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from token2wav.serve.protocol import pcm16_to_float
from token2wav.streaming.pacing import PlaybackClock

__all__ = [
    "StreamError",
    "StreamResult",
    "auth_headers",
    "http_base_url",
    "register_prompt",
    "register_prompt_wav",
    "start_buffer_ms",
    "stream_tokens",
    "stream_tokens_sync",
    "voice_prompt_id",
]

_MAX_TOKENS_PER_MESSAGE = 4096  # keeps each message far below the server's default size limit


class StreamError(RuntimeError):
    """The server ended the stream with an error (``code`` is the WebSocket close code)."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message if code is None else f"{message} (close code {code})")
        self.code = code
        self.status = status
        self.message = message


@dataclass
class StreamResult:
    pcm: bytes  # int16 little-endian, mono
    sample_rate: int
    chunks: list[dict[str, Any]] = field(default_factory=list)  # the server's chunk headers
    first_chunk_latency_s: float | None = None  # first token sent -> first audio frame received
    wall_s: float = 0.0  # first token sent -> done received
    started: dict[str, Any] = field(default_factory=dict)
    slow_downs: int = 0  # 'slow_down' messages received (the server's decoder fell behind the tokens)
    # the server's recommended start buffer (ms) a player would use: start_buffer_ms of 'started', replaced by a
    # newer one in a chunk header while a player would still be buffering (playback starts that many ms after
    # the first audio); None: the server sent none
    start_buffer_ms: int | None = None
    # what a player would have heard, with the start buffer given (prebuffer_ms) or else the server's newest
    # recommendation while it was still buffering (else none): stalls, and when playback started
    listener: PlaybackClock = field(default_factory=PlaybackClock)
    first_play_s: float | None = None  # first token sent -> playback started

    @property
    def audio(self) -> np.ndarray:
        return pcm16_to_float(self.pcm)

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    @property
    def audio_s(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    @property
    def compute_s(self) -> float:
        return sum(float(c.get("compute_ms", 0.0)) for c in self.chunks) / 1e3

    @property
    def rtf(self) -> float:
        """Server model time per second of audio (what a faster token source could not hide)."""
        return self.compute_s / self.audio_s if self.audio_s else math.nan

    @property
    def wall_rtf(self) -> float:
        """Wall time per second of audio; bounded below by the token pace."""
        return self.wall_s / self.audio_s if self.audio_s else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "chunks": len(self.chunks),
            "samples": self.samples,
            "sample_rate": self.sample_rate,
            "audio_s": round(self.audio_s, 4),
            "first_chunk_latency_s": None
            if self.first_chunk_latency_s is None
            else round(self.first_chunk_latency_s, 4),
            "wall_s": round(self.wall_s, 4),
            "rtf": round(self.rtf, 4) if self.audio_s else None,
            "wall_rtf": round(self.wall_rtf, 4) if self.audio_s else None,
            "recommended_start_buffer_ms": self.start_buffer_ms,
            "start_buffer_ms": round(self.listener.start_buffer_s * 1e3) if self.listener.started else None,
            "first_play_s": None if self.first_play_s is None else round(self.first_play_s, 4),
            "stalls": self.listener.stalls,
            "stall_s": round(self.listener.stall_s, 4),
            "worst_stall_s": round(self.listener.worst_stall_s, 4),
        }


def start_buffer_ms(message: dict[str, Any]) -> int | None:
    """The server's recommended start buffer in a ``started`` or ``chunk`` message (``start_buffer_ms``: how
    long a player waits after the first audio before it starts playing), or None when the message has none (an
    older server) or it is not a number >= 0."""
    v = message.get("start_buffer_ms")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return int(round(v))


def http_base_url(url: str) -> str:
    """``ws://host:port/v1/stream`` -> ``http://host:port`` (``wss`` -> ``https``)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def ws_stream_url(url: str) -> str:
    """Accept ``http://host:port`` or a full ``ws://.../v1/stream`` URL and return the latter."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/stream"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer KEY`` for ``api_key``, or for ``$TOKEN2WAV_API_KEY`` when not given."""
    import os

    key = api_key if api_key is not None else os.environ.get("TOKEN2WAV_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def register_prompt(
    url: str, tokens: Any, mel: Any, embedding: Any, *, timeout: float = 60.0, api_key: str | None = None
) -> str:
    """POST a prompt to the server and return its ``prompt_id``."""
    import httpx

    body = {
        "tokens": np.asarray(tokens).astype(int).reshape(-1).tolist(),
        "mel": np.asarray(mel, dtype=np.float32).tolist(),
        "embedding": np.asarray(embedding, dtype=np.float32).reshape(-1).tolist(),
    }
    r = httpx.post(http_base_url(url) + "/v1/prompts", json=body, timeout=timeout, headers=auth_headers(api_key))
    if r.status_code != 200:
        raise StreamError(
            f"prompt registration failed: HTTP {r.status_code}: {r.text[:200]}", status=r.status_code
        )
    return str(r.json()["prompt_id"])


def voice_prompt_id(url: str, name: str, *, timeout: float = 30.0, api_key: str | None = None) -> str:
    """The ``prompt_id`` of the model's voice ``name`` (``GET /v1/voices``: the server registers its voices)."""
    import httpx

    r = httpx.get(http_base_url(url) + "/v1/voices", timeout=timeout, headers=auth_headers(api_key))
    if r.status_code != 200:
        raise StreamError(f"voice lookup failed: HTTP {r.status_code}: {r.text[:200]}", status=r.status_code)
    voices = {str(v.get("name")): v.get("prompt_id") for v in r.json().get("speakers", [])}
    if voices.get(name) is None:
        have = ", ".join(sorted(voices)) or "none"
        raise StreamError(f"voice {name[:40]!r} is not one of the server's voices: {have}")
    return str(voices[name])


def register_prompt_wav(url: str, path: str | Path, *, timeout: float = 120.0, api_key: str | None = None) -> str:
    """Upload a recording (WAV body, ``Content-Type: audio/wav``); the server clones it into a prompt and
    returns its ``prompt_id`` (the same id the prompt's arrays would get)."""
    import httpx

    data = Path(path).read_bytes()
    headers = {"Content-Type": "audio/wav", **auth_headers(api_key)}
    r = httpx.post(http_base_url(url) + "/v1/prompts", content=data, headers=headers, timeout=timeout)
    if r.status_code != 200:
        raise StreamError(
            f"prompt upload failed: HTTP {r.status_code}: {r.text[:200]}", status=r.status_code
        )
    return str(r.json()["prompt_id"])


async def stream_tokens(
    url: str,
    tokens: Sequence[int] | np.ndarray,
    *,
    rate: float | None = 25.0,
    prompt_id: str | None = None,
    preset: str | None = None,
    hop: int | None = None,
    mode: str | None = None,
    window_frames: int | None = None,
    schedule: str | None = None,
    prebuffer_ms: float | None = None,
    open_timeout: float = 10.0,
    receive_timeout: float = 120.0,
    api_key: str | None = None,
) -> StreamResult:
    """Stream ``tokens`` to ``/v1/stream`` at ``rate`` tokens per second (``rate <= 0``: all at once; None: the
    model's own token rate, from ``started``, as a real-time LLM would send them).

    The result also tells what a player would have heard (``listener``): playback starting ``prebuffer_ms``
    after the first audio, or else after the server's newest recommendation while still buffering, and at the
    latest when the stream is done.

    Tokens due at the same moment go in one message, so a high rate costs few messages. The client never
    has more than the server's ``max_queued_tokens`` tokens sent but not yet decoded (it waits for the
    server's ``decoded_tokens`` reports), so even ``rate=0`` respects the server's queue limit.
    ``api_key`` (default ``$TOKEN2WAV_API_KEY``) is sent as ``Authorization: Bearer``.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
    start: dict[str, Any] = {"type": "start"}
    options = {
        "prompt_id": prompt_id,
        "preset": preset,
        "hop": hop,
        "mode": mode,
        "window_frames": window_frames,
        "schedule": schedule,
        "start_buffer_ms": prebuffer_ms,  # the listener's own start buffer: the server plans with it
    }
    for key, value in options.items():
        if value is not None:
            start[key] = value

    headers = auth_headers(api_key) or None
    async with connect(
        ws_stream_url(url), open_timeout=open_timeout, max_size=64 << 20, additional_headers=headers
    ) as ws:
        try:
            await ws.send(json.dumps(start))
        except ConnectionClosed:
            pass  # refused at once (busy, no key, ...): the reason is in its error message or close frame
        try:
            first = await asyncio.wait_for(ws.recv(), receive_timeout)
            while isinstance(first, str) and json.loads(first).get("type") == "queued":  # waiting for capacity
                first = await asyncio.wait_for(ws.recv(), receive_timeout)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            raise StreamError(
                f"connection closed before 'started': {rcvd.reason if rcvd else 'no close frame'}",
                rcvd.code if rcvd else None,
            ) from None
        started = _expect(json.loads(first), "started")
        result = StreamResult(pcm=b"", sample_rate=int(started["sample_rate"]), started=started,
                              start_buffer_ms=start_buffer_ms(started))
        listener = result.listener
        if prebuffer_ms is not None:
            listener.start_buffer_s = prebuffer_ms / 1e3
        elif result.start_buffer_ms is not None:
            listener.start_buffer_s = result.start_buffer_ms / 1e3
        if rate is None:
            model_rate = started.get("token_rate")
            if isinstance(model_rate, bool) or not isinstance(model_rate, (int, float)) or not model_rate > 0:
                raise StreamError("rate=None needs the server's token_rate in 'started'; give a rate")
            rate = float(model_rate)
        t_first: list[float] = []
        limit = started.get("max_queued_tokens")
        window = limit if isinstance(limit, int) and limit > 0 else None  # None: an older server
        decoded = [0]
        progress = asyncio.Event()  # set when the server reports more tokens decoded

        async def send_all() -> None:
            t0 = time.perf_counter()
            t_first.append(t0)
            sent = 0
            while sent < len(ids):
                if rate > 0 and math.isfinite(rate):
                    due = min(len(ids), int((time.perf_counter() - t0) * rate) + 1)
                else:
                    due = len(ids)
                due = min(due, sent + _MAX_TOKENS_PER_MESSAGE)
                if window is not None and due > sent:
                    room = decoded[0] + window - sent  # what the server's queue can still take
                    if room <= 0:
                        progress.clear()
                        await progress.wait()
                        continue
                    due = min(due, sent + room)
                if due > sent:
                    await ws.send(json.dumps({"type": "tokens", "tokens": ids[sent:due]}))
                    sent = due
                if sent < len(ids) and rate > 0 and math.isfinite(rate):
                    await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
            if not ids:
                t_first.append(time.perf_counter())
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send_all())
        pcm = bytearray()
        first_audio_at: float | None = None
        try:
            expecting_audio: dict[str, Any] | None = None
            while True:
                try:
                    msg = await asyncio.wait_for(ws.recv(), receive_timeout)
                except ConnectionClosed as e:
                    rcvd = e.rcvd
                    raise StreamError(
                        f"connection closed before 'done': {rcvd.reason if rcvd else 'no close frame'}",
                        rcvd.code if rcvd else None,
                    ) from None
                if isinstance(msg, bytes):
                    if expecting_audio is None:
                        raise StreamError("protocol error: audio frame without a chunk header")
                    if len(msg) != 2 * int(expecting_audio["samples"]):
                        raise StreamError("protocol error: audio frame length differs from its header")
                    now = time.perf_counter()
                    if result.first_chunk_latency_s is None:
                        first_audio_at = now
                        result.first_chunk_latency_s = first_audio_at - t_first[0]
                    listener.deliver(now, len(msg) / 2 / result.sample_rate)
                    pcm.extend(msg)
                    result.chunks.append(expecting_audio)
                    expecting_audio = None
                    continue
                data = json.loads(msg)
                kind = data.get("type")
                reported = data.get("decoded_tokens")
                if isinstance(reported, int) and reported > decoded[0]:
                    decoded[0] = reported
                    progress.set()
                if kind == "slow_down":
                    result.slow_downs += 1
                if kind == "chunk":
                    expecting_audio = data
                    newer = start_buffer_ms(data)
                    now = time.perf_counter()
                    if newer is not None and (
                        first_audio_at is None  # a player would still be buffering
                        or now < first_audio_at + (result.start_buffer_ms or 0) / 1e3
                    ):
                        result.start_buffer_ms = newer
                    if newer is not None and prebuffer_ms is None:
                        listener.recommend(now, newer / 1e3)  # only while the player is still buffering
                elif kind == "done":
                    now = time.perf_counter()
                    result.wall_s = now - t_first[0]
                    listener.complete(now)  # all audio is in: a player still buffering starts now
                    if listener.play_start is not None:
                        result.first_play_s = listener.play_start - t_first[0]
                    break
                elif kind == "error":
                    raise StreamError(str(data.get("message")), data.get("code"), data.get("status"))
            await sender
        except Exception:
            sender.cancel()
            raise
        finally:
            if not sender.done():
                sender.cancel()
        result.pcm = bytes(pcm)
        return result


def _expect(data: dict[str, Any], kind: str) -> dict[str, Any]:
    if data.get("type") == "error":
        raise StreamError(str(data.get("message")), data.get("code"), data.get("status"))
    if data.get("type") != kind:
        raise StreamError(f"protocol error: expected a '{kind}' message, got {str(data)[:100]}")
    return data


def stream_tokens_sync(url: str, tokens: Sequence[int] | np.ndarray, **kwargs: Any) -> StreamResult:
    """:func:`stream_tokens` for code without an event loop."""
    return asyncio.run(stream_tokens(url, tokens, **kwargs))
