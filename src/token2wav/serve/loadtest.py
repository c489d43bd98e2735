"""`token2wav loadtest`: how many real-time callers a running server holds.

Opens N streams to ``/v1/stream`` that send speech tokens at R tokens per second, the way an LLM produces
them, and plays each stream's audio against a real-time clock: playback starts a *start buffer* after the
first chunk arrives, and a chunk that arrives after the audio before it has finished playing is a *stall*
(an underrun: the caller hears a gap of that length). The start buffer is ``--prebuffer`` when given;
otherwise the server's recommendation, ``start_buffer_ms`` of its ``started`` message, replaced by a newer
one in a ``chunk`` header while playback has not started yet; 0.5 s when the server sends none. Reported per
stream (``prebuffer_s`` and ``prebuffer_from``: ``option``, ``server`` or ``default``, say which was used):

* ``first_chunk_latency_s``: from sending the token that completed the first chunk's input to receiving
  that chunk's audio: what the server adds (the same span as the server's own first-chunk metric, plus the
  network);
* ``first_audio_s``: from the first token sent to the first audio received (includes waiting for tokens);
  ``first_play_s``: to the start of playback (``first_audio_s`` plus the start buffer);
* ``worst_stall_s`` (the longest single stall), ``stall_s`` (their total), ``underruns`` (their number;
  ``underrun_s`` is the older name of ``stall_s``), audio seconds, errors;
* ``least_slack_s``: the least audio still buffered when a chunk arrived (negative: a stall); in a stream
  without a stall, ``prebuffer_s - least_slack_s`` is the start buffer it needed;
* ``viable``: no error, worst stall <= 100 ms and first audio *heard* (``first_play_s``) within
  ``--latency-bound``. A start buffer as long as the stream would play every stream without a stall; the
  bound on when the listener hears it is what makes a stream real time.

In aggregate: first-chunk and first-audio percentiles, ``share_worst_stall_le_50ms`` and
``share_worst_stall_le_100ms`` (the fraction of streams whose worst stall is at most 50 / 100 ms), stall
totals, and ``realtime``: at least 99 % of the streams with a worst stall <= 100 ms, no error, and p95 of the
first audio heard (``first_play_s``) <= ``--latency-bound`` (default 2.5 s).

``--find-max`` searches the largest N that is ``realtime``: N doubles until a run fails, then a bisection
between the last good and the first failed N. Output: a summary on stderr, ``--json FILE`` (``-``: stdout)
and ``--plot FILE.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from token2wav.serve.client import start_buffer_ms
from token2wav.streaming.pacing import PlaybackClock

__all__ = [
    "DEFAULT_PREBUFFER_S",
    "LATENCY_BOUND_S",
    "LoadConfig",
    "Player",
    "StreamStats",
    "add_arguments",
    "choose_prebuffer",
    "find_max",
    "main",
    "plot",
    "run_load",
    "stall_summary",
    "stream_viable",
    "summarize",
]

_MAX_SEARCH = 1024
DEFAULT_PREBUFFER_S = 0.5  # the start buffer when neither --prebuffer nor the server gives one
LATENCY_BOUND_S = 2.5  # p95 bound of a real-time run's first audio heard (the first-audio bound)
STALL_OK_S = 0.1  # a stream whose worst stall is at most this is heard as uninterrupted
REALTIME_SHARE = 0.99  # the share of streams that must be within STALL_OK_S
_EPS = 1e-9  # stalls are rounded to 0.1 ms: compare with the bounds inclusively


# ----------------------------------------------------------------------------------------- playback


class Player(PlaybackClock):
    """A real-time audio player: what a caller would hear from chunks arriving at given times (the listener's
    clock of ``streaming/pacing.py`` under the load test's names).

    Playback starts ``prebuffer_s`` after the first chunk arrives, or when the stream is done if that is sooner;
    a chunk arriving after the audio before it has finished playing is a stall of that length (``underruns``
    counts them, ``stall_s`` is their total, ``worst_stall_s`` the longest)."""

    def __init__(self, prebuffer_s: float = 0.0) -> None:
        super().__init__(start_buffer_s=float(prebuffer_s))

    def arrive(self, t: float, seconds: float) -> None:
        """A chunk of ``seconds`` of audio arrived at time ``t`` (an empty one plays nothing: ignored)."""
        self.deliver(t, seconds)

    @property
    def prebuffer_s(self) -> float:
        return self.start_buffer_s

    @property
    def start(self) -> float | None:
        """When playback starts (None before the first audio)."""
        return self.play_start

    @property
    def play_end(self) -> float | None:
        """When the audio received so far finishes playing (None before the first audio)."""
        return self.dry_at if self.started else None

    @property
    def underruns(self) -> int:
        return self.stalls

    @property
    def underrun_s(self) -> float:
        return self.stall_s


def choose_prebuffer(explicit_s: float | None, recommended_s: float | None) -> tuple[float, str]:
    """The start buffer a stream uses and where it comes from: the explicit one (``--prebuffer``) if given
    (``"option"``), else the server's recommendation (``"server"``), else :data:`DEFAULT_PREBUFFER_S`
    (``"default"``)."""
    if explicit_s is not None:
        return float(explicit_s), "option"
    if recommended_s is not None:
        return float(recommended_s), "server"
    return DEFAULT_PREBUFFER_S, "default"


def _recommended_s(message: dict[str, Any]) -> float | None:
    ms = start_buffer_ms(message)
    return None if ms is None else ms / 1e3


# ----------------------------------------------------------------------------------------- one stream


@dataclass
class StreamStats:
    index: int
    start_offset_s: float
    tokens: int = 0
    chunks: int = 0
    audio_s: float = 0.0
    first_chunk_latency_s: float | None = None
    first_audio_s: float | None = None
    first_play_s: float | None = None
    prebuffer_s: float | None = None  # the start buffer used
    prebuffer_from: str | None = None  # option | server | default
    underruns: int = 0
    underrun_s: float = 0.0
    stall_s: float = 0.0
    worst_stall_s: float = 0.0
    least_slack_s: float | None = None  # the least audio still buffered when a chunk arrived (None: one chunk)
    viable: bool | None = None
    slow_downs: int = 0
    wall_s: float = 0.0
    error: str | None = None
    close_code: int | None = None


@dataclass
class LoadConfig:
    url: str
    sessions: int
    rate: float
    duration_s: float
    ramp_s: float = 0.5
    send_interval_s: float = 0.04
    prebuffer_s: float | None = None  # None: the server's start_buffer_ms, else DEFAULT_PREBUFFER_S
    preset: str | None = None
    hop: int | None = None
    prompt_id: str | None = None
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 120.0
    first_chunk_tokens: int | None = None  # tokens the first chunk needs, when known from /v1/models
    tokens: list[int] | None = None  # token ids to send (repeated to fill the duration); None: random
    vocab_size: int = 0


async def _one_stream(cfg: LoadConfig, index: int, offset: float, ids: list[int]) -> StreamStats:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, WebSocketException

    st = StreamStats(index=index, start_offset_s=round(offset, 4), tokens=len(ids))
    await asyncio.sleep(offset)
    prebuffer, source = choose_prebuffer(cfg.prebuffer_s, None)  # until the server recommends one
    player = Player(prebuffer)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    start: dict[str, Any] = {"type": "start"}
    for key in ("preset", "hop", "prompt_id"):
        if getattr(cfg, key) is not None:
            start[key] = getattr(cfg, key)
    sent_at: list[float] = []  # time each token was sent
    t_begin = time.perf_counter()
    try:
        async with connect(cfg.url, additional_headers=headers, open_timeout=cfg.timeout_s, max_size=None) as ws:
            await ws.send(json.dumps(start))
            started = json.loads(await asyncio.wait_for(ws.recv(), cfg.timeout_s))
            while started.get("type") == "queued":  # the server waits for capacity: the stream's clock runs on
                started = json.loads(await asyncio.wait_for(ws.recv(), cfg.timeout_s))
            if started.get("type") != "started":
                raise RuntimeError(str(started.get("message", started))[:200])
            sr = float(started["sample_rate"])
            if cfg.prebuffer_s is None and (rec := _recommended_s(started)) is not None:
                player.recommend(time.perf_counter(), rec)
                source = "server"
            window = started.get("max_queued_tokens")
            decoded = [0]
            progress = asyncio.Event()

            async def send_tokens() -> None:
                t0 = time.perf_counter()
                sent = 0
                while sent < len(ids):
                    due = min(len(ids), int((time.perf_counter() - t0) * cfg.rate) + 1)
                    if isinstance(window, int) and window > 0:  # the server's queue limit: wait, as the client does
                        due = min(due, decoded[0] + window)
                    if due > sent:
                        await ws.send(json.dumps({"type": "tokens", "tokens": ids[sent:due]}))
                        now = time.perf_counter()
                        sent_at.extend([now] * (due - sent))
                        sent = due
                    if sent < len(ids):
                        if isinstance(window, int) and window > 0 and sent >= decoded[0] + window:
                            progress.clear()
                            await progress.wait()
                            continue
                        next_due = t0 + sent / cfg.rate
                        await asyncio.sleep(max(cfg.send_interval_s, next_due - time.perf_counter()))
                await ws.send(json.dumps({"type": "end"}))

            sender = asyncio.create_task(send_tokens())
            first_needed: int | None = None
            try:
                while True:
                    msg = await asyncio.wait_for(ws.recv(), cfg.timeout_s)
                    now = time.perf_counter()
                    if isinstance(msg, bytes):
                        seconds = len(msg) / 2 / sr
                        if st.chunks == 0 and sent_at:
                            st.first_audio_s = now - sent_at[0]
                            k = first_needed or len(sent_at)
                            st.first_chunk_latency_s = now - sent_at[min(k, len(sent_at)) - 1]
                        player.arrive(now, seconds)
                        st.chunks += 1
                        continue
                    data = json.loads(msg)
                    kind = data.get("type")
                    if kind == "chunk" and cfg.prebuffer_s is None and player.buffering(now):
                        rec = _recommended_s(data)  # the newest recommendation, while still buffering
                        if rec is not None:
                            player.recommend(now, rec)
                            source = "server"
                    reported = data.get("decoded_tokens")
                    if isinstance(reported, int) and reported > decoded[0]:
                        decoded[0] = reported
                        progress.set()
                    if kind == "chunk" and st.chunks == 0 and isinstance(reported, int):
                        # the token that completed the first chunk: at most the tokens decoded so far
                        first_needed = min(reported, cfg.first_chunk_tokens or reported) or None
                    elif kind == "slow_down":
                        st.slow_downs += 1
                    elif kind == "done":
                        player.complete(now)  # all audio is in: a player still buffering starts now
                        break
                    elif kind == "error":
                        st.close_code = data.get("code")
                        raise RuntimeError(f"{data.get('message')} (close {data.get('code')})")
                await sender
            finally:
                sender.cancel()
            st.close_code = 1000
    except ConnectionClosed as e:
        st.error = f"connection closed: {e}"[:200]
        st.close_code = e.rcvd.code if e.rcvd else None
    except (OSError, WebSocketException, asyncio.TimeoutError, RuntimeError, ValueError, KeyError) as e:
        st.error = (str(e) or type(e).__name__)[:200]
    st.wall_s = round(time.perf_counter() - t_begin, 4)
    st.audio_s = round(player.audio_s, 4)
    st.underruns = player.underruns
    st.underrun_s = st.stall_s = round(player.stall_s, 4)
    st.worst_stall_s = round(player.worst_stall_s, 4)
    st.least_slack_s = round(player.least_slack_s, 4) if math.isfinite(player.least_slack_s) else None
    st.prebuffer_s, st.prebuffer_from = round(player.prebuffer_s, 4), source
    if player.start is not None and sent_at:
        st.first_play_s = player.start - sent_at[0]
    for key in ("first_chunk_latency_s", "first_audio_s", "first_play_s"):
        v = getattr(st, key)
        if v is not None:
            setattr(st, key, round(v, 4))
    return st


def _token_ids(cfg: LoadConfig, index: int) -> list[int]:
    n = max(1, int(round(cfg.rate * cfg.duration_s)))
    if cfg.tokens:
        reps = -(-n // len(cfg.tokens))
        offset = (index * 7) % len(cfg.tokens)  # streams do not all say the same thing at the same time
        seq = (cfg.tokens[offset:] + cfg.tokens[:offset]) * reps
        return seq[:n]
    rng = np.random.default_rng(cfg.seed * 100_003 + index)
    return rng.integers(0, max(1, cfg.vocab_size), n).tolist()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)), 4)


def stall_summary(worst_stall_s: list[float], stall_s: list[float]) -> dict[str, Any]:
    """Stall statistics of a set of streams, from each stream's worst stall and total stall (seconds):
    the worst stall's p50 / p99 / max, the total, and the shares of streams whose worst stall is at most
    50 ms and 100 ms (None without streams)."""
    n = len(worst_stall_s)

    def share(limit: float) -> float | None:
        return round(sum(1 for w in worst_stall_s if w <= limit + _EPS) / n, 4) if n else None

    return {
        "worst_stall_s": {"p50": _pct(worst_stall_s, 50), "p99": _pct(worst_stall_s, 99),
                          "max": round(max(worst_stall_s), 4) if n else None},
        "stall_s": round(sum(stall_s), 4),
        "streams_with_stalls": sum(1 for w in worst_stall_s if w > 0),
        "share_worst_stall_le_50ms": share(0.05),
        "share_worst_stall_le_100ms": share(STALL_OK_S),
    }


def stream_viable(s: StreamStats, latency_bound_s: float = LATENCY_BOUND_S) -> bool:
    """A stream a caller would accept: no error, audio heard (playback started) within ``latency_bound_s`` of
    the first token, and no stall over 100 ms."""
    return bool(s.error is None and s.first_play_s is not None and s.first_play_s <= latency_bound_s + _EPS
                and s.worst_stall_s <= STALL_OK_S + _EPS)


def summarize(streams: list[StreamStats], latency_bound_s: float = LATENCY_BOUND_S) -> dict[str, Any]:
    lat = [s.first_chunk_latency_s for s in streams if s.first_chunk_latency_s is not None]
    first = [s.first_audio_s for s in streams if s.first_audio_s is not None]
    play = [s.first_play_s for s in streams if s.first_play_s is not None]
    errors = [s for s in streams if s.error is not None]
    agg = {
        "sessions": len(streams),
        "completed": len(streams) - len(errors),
        "errors": len(errors),
        "error_examples": sorted({s.error for s in errors if s.error})[:3],
        "first_chunk_latency_s": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99),
                                  "max": round(max(lat), 4) if lat else None},
        "first_audio_s": {"p50": _pct(first, 50), "p95": _pct(first, 95), "p99": _pct(first, 99)},
        "first_play_s": {"p50": _pct(play, 50), "p95": _pct(play, 95)},
        **stall_summary([s.worst_stall_s for s in streams], [s.stall_s for s in streams]),
        "streams_with_underruns": sum(1 for s in streams if s.underruns),
        "underruns": sum(s.underruns for s in streams),
        "underrun_s": round(sum(s.underrun_s for s in streams), 4),
        "viable_streams": sum(1 for s in streams if stream_viable(s, latency_bound_s)),
        "prebuffer_from": sorted({s.prebuffer_from for s in streams if s.prebuffer_from}),
        "audio_s": round(sum(s.audio_s for s in streams), 4),
        "slow_downs": sum(s.slow_downs for s in streams),
    }
    p95 = agg["first_play_s"]["p95"]
    share = agg["share_worst_stall_le_100ms"]
    agg["realtime"] = bool(
        streams and not errors and share is not None and share >= REALTIME_SHARE
        and p95 is not None and p95 <= latency_bound_s + _EPS
    )
    return agg


async def run_load(cfg: LoadConfig, latency_bound_s: float = LATENCY_BOUND_S) -> dict[str, Any]:
    """One run of ``cfg.sessions`` streams. Returns ``{"config", "aggregate", "streams"}``."""
    rng = random.Random(cfg.seed)
    offsets = sorted(rng.uniform(0.0, cfg.ramp_s) for _ in range(cfg.sessions))
    streams = await asyncio.gather(
        *(_one_stream(cfg, i, offsets[i], _token_ids(cfg, i)) for i in range(cfg.sessions))
    )
    for s in streams:
        s.viable = stream_viable(s, latency_bound_s)
    conf = {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "tokens")}
    conf["token_source"] = "file" if cfg.tokens else "random"
    return {"config": conf, "aggregate": summarize(list(streams), latency_bound_s),
            "streams": [asdict(s) for s in streams]}


# ----------------------------------------------------------------------------------------- search


async def _wait_idle(base: str, headers: dict[str, str], timeout: float = 60.0) -> None:
    """Wait until the server holds no session (the previous run's streams are all closed)."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers=headers, timeout=10) as c:
        while time.monotonic() < deadline:
            try:
                r = await c.get(base + "/health")
                if r.status_code == 200 and r.json().get("sessions_open", 0) == 0:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)


async def find_max(cfg: LoadConfig, latency_bound_s: float, max_sessions: int, log: Any = None) -> dict[str, Any]:
    """The largest number of streams that is real time (see :func:`summarize`), by doubling then bisection."""
    from token2wav.serve.client import http_base_url

    base = http_base_url(cfg.url)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    trials: dict[int, dict[str, Any]] = {}

    async def trial(n: int) -> bool:
        await _wait_idle(base, headers)
        run = await run_load(_with_sessions(cfg, n), latency_bound_s)
        trials[n] = run
        if log is not None:
            log(_line(n, run["aggregate"]))
        return bool(run["aggregate"]["realtime"])

    good, bad = 0, None
    n = 1
    while n <= max_sessions:
        if await trial(n):
            good = n
            n *= 2
        else:
            bad = n
            break
    if bad is None and good < max_sessions and good * 2 > max_sessions:
        if await trial(max_sessions):
            good = max_sessions
        else:
            bad = max_sessions
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if await trial(mid):
            good = mid
        else:
            bad = mid
    ordered = [{"sessions": k, **trials[k]["aggregate"]} for k in sorted(trials)]
    return {
        "max_realtime_sessions": good,
        "first_failing_sessions": bad,
        "searched_up_to": max_sessions,
        "latency_bound_s": latency_bound_s,
        "criterion": _criterion(latency_bound_s),
        "at_1": trials[1]["aggregate"] if 1 in trials else None,
        "at_max": trials[good]["aggregate"] if good in trials else None,
        "trials": ordered,
        "config": trials[min(trials)]["config"] if trials else None,
        "runs": {str(k): trials[k]["streams"] for k in sorted(trials)},
    }


def _with_sessions(cfg: LoadConfig, n: int) -> LoadConfig:
    return LoadConfig(**{**asdict(cfg), "sessions": n})


def _criterion(latency_bound_s: float) -> str:
    return (f">= {REALTIME_SHARE:.0%} of streams with worst stall <= {STALL_OK_S * 1e3:.0f} ms, no error, "
            f"first audio heard p95 <= {latency_bound_s:g} s")


def _line(n: int, agg: dict[str, Any]) -> str:
    lat, first, heard = agg["first_chunk_latency_s"], agg["first_audio_s"], agg["first_play_s"]
    return (
        f"{n:4d} streams: {'real time' if agg['realtime'] else 'NOT real time'}; first chunk p50 "
        f"{_ms(lat['p50'])} p99 {_ms(lat['p99'])}; first audio p50 {_ms(first['p50'])} p95 {_ms(first['p95'])}; "
        f"heard p50 {_ms(heard['p50'])} p95 {_ms(heard['p95'])}; "
        f"worst stall <= 50 ms {_share(agg['share_worst_stall_le_50ms'])}, <= 100 ms "
        f"{_share(agg['share_worst_stall_le_100ms'])} of streams (max {_ms(agg['worst_stall_s']['max'])}); "
        f"stalls {agg['underruns']} ({agg['stall_s']:.2f} s) in {agg['streams_with_stalls']} stream(s); "
        f"errors {agg['errors']}"
        + (f" ({agg['error_examples'][0]})" if agg["error_examples"] else "")
    )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f} ms"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


# ----------------------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "trials" in report:
        ns = [t["sessions"] for t in report["trials"]]
        for key, what in (("first_audio_s", "received"), ("first_play_s", "heard")):
            p50 = [t[key]["p50"] or math.nan for t in report["trials"]]
            p95 = [t[key]["p95"] or math.nan for t in report["trials"]]
            axes[0].plot(ns, p50, "o-", label=f"{what} p50")
            axes[0].plot(ns, p95, "s-", label=f"{what} p95")
        axes[0].axhline(report["latency_bound_s"], color="grey", ls="--", label="bound (heard p95)")
        axes[0].set_xlabel("concurrent streams")
        axes[0].set_ylabel("first audio after the first token (s)")
        axes[0].legend()
        share = [t["share_worst_stall_le_100ms"] or 0.0 for t in report["trials"]]
        axes[1].bar([str(n) for n in ns], share, color="tab:green")
        axes[1].axhline(REALTIME_SHARE, color="grey", ls="--")
        axes[1].set_ylim(0, 1.05)
        axes[1].set_xlabel("concurrent streams")
        axes[1].set_ylabel("share of streams, worst stall <= 100 ms")
        fig.suptitle(f"max real-time streams: {report['max_realtime_sessions']}")
    else:
        streams = report["streams"]
        idx = [s["index"] for s in streams]
        axes[0].bar(idx, [s["first_chunk_latency_s"] or 0.0 for s in streams])
        axes[0].set_xlabel("stream")
        axes[0].set_ylabel("first-chunk latency (s)")
        axes[1].bar(idx, [s["worst_stall_s"] for s in streams], color="tab:red")
        axes[1].axhline(STALL_OK_S, color="grey", ls="--")
        axes[1].set_xlabel("stream")
        axes[1].set_ylabel("worst stall (s)")
        fig.suptitle(f"{len(streams)} streams at {report['config']['rate']:g} tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:50000/v1/stream", help="server (ws://HOST:PORT/v1/stream)")
    p.add_argument("--sessions", type=int, default=1, help="concurrent streams (default 1)")
    p.add_argument("--rate", type=float, help="tokens per second per stream (default: the model's token rate)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of tokens per stream (default 10)")
    p.add_argument("--ramp", type=float, default=0.5, help="streams start at random times within this many s")
    p.add_argument("--send-interval", type=float, default=0.04,
                   help="shortest time between two messages of a stream (tokens due meanwhile go together)")
    p.add_argument("--prebuffer", type=float,
                   help="seconds from a stream's first audio to the start of its playback (default: the server's "
                        f"recommended start_buffer_ms, {DEFAULT_PREBUFFER_S:g} s if it sends none)")
    p.add_argument("--preset", help="streaming preset of every stream")
    p.add_argument("--hop", type=int, help="hop in tokens of every stream")
    p.add_argument("--prompt-id", help="registered prompt every stream uses")
    p.add_argument("--tokens", metavar="FILE", help="token file to send (repeated as needed); default random ids")
    p.add_argument("--find-max", action="store_true", help="search the largest real-time number of streams")
    p.add_argument("--latency-bound", type=float, default=LATENCY_BOUND_S,
                   help=f"p95 bound of the first audio heard (first audio plus start buffer) in a real-time run and in "
                        f"--find-max (s, default {LATENCY_BOUND_S:g})")
    p.add_argument("--max-search", type=int, help="largest N --find-max tries (default: the server's max_sessions)")
    p.add_argument("--api-key", help="access key (default: $TOKEN2WAV_API_KEY)")
    p.add_argument("--api-key-file", metavar="FILE", help="read the access key from FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (- : stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="plot latencies and stalls")


def _check(args: argparse.Namespace) -> None:
    if args.sessions < 1 or args.sessions > _MAX_SEARCH:
        raise ValueError(f"--sessions must be in [1, {_MAX_SEARCH}], got {args.sessions}")
    for name, lo in (("rate", 0.0), ("duration", 0.0), ("latency_bound", 0.0), ("send_interval", 0.0)):
        v = getattr(args, name)
        if v is not None and not (v > lo and math.isfinite(v)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > {lo:g}, got {v}")
    for name in ("ramp", "prebuffer"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"--{name} must be a finite number >= 0, got {v}")
    if args.max_search is not None and not 1 <= args.max_search <= _MAX_SEARCH:
        raise ValueError(f"--max-search must be in [1, {_MAX_SEARCH}], got {args.max_search}")
    if not args.url.startswith(("ws://", "wss://", "http://", "https://")):
        raise ValueError(f"--url must be ws://HOST:PORT/v1/stream, got {args.url!r}")


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(args: argparse.Namespace) -> int:
    import httpx

    from token2wav.serve.auth import resolve_api_key
    from token2wav.serve.client import http_base_url, ws_stream_url

    _check(args)
    key = resolve_api_key(args.api_key, args.api_key_file)
    url = ws_stream_url(args.url)
    base = http_base_url(url)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        info = httpx.get(base + "/v1/models", headers=headers, timeout=30).raise_for_status().json()["models"][0]
        health = httpx.get(base + "/health", headers=headers, timeout=30).json()
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        print(f"token2wav loadtest: cannot reach the server at {base}: {e}", file=sys.stderr)
        return 1
    tokens = None
    if args.tokens:
        from token2wav.tokens_io import read_tokens

        tokens = [int(t) for t in read_tokens(args.tokens)]
        if not tokens:
            raise ValueError(f"--tokens: {args.tokens} holds no tokens")
    first_tokens = None
    if args.preset and args.prompt_id is None and args.hop is None:  # otherwise its size is not listed
        first_tokens = info.get("presets", {}).get(args.preset, {}).get("first_chunk_tokens")
    cfg = LoadConfig(
        url=url,
        sessions=args.sessions,
        rate=float(args.rate or info["token_rate"]),
        duration_s=args.duration,
        ramp_s=args.ramp,
        send_interval_s=args.send_interval,
        prebuffer_s=args.prebuffer,
        preset=args.preset,
        hop=args.hop,
        prompt_id=args.prompt_id,
        api_key=key,
        seed=args.seed,
        first_chunk_tokens=first_tokens,
        tokens=tokens,
        vocab_size=int(info["vocab_size"]),
    )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": _commit(),
        "model": info.get("name"),
        "server_max_sessions": health.get("max_sessions"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "command": "token2wav " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []),
    }

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.find_max:
        limit = args.max_search or int(health.get("max_sessions") or 16)
        report = asyncio.run(find_max(cfg, args.latency_bound, limit, log))
        report = {**meta, **report}
        log(f"largest real-time number of streams: {report['max_realtime_sessions']} "
            f"(searched up to {limit}; criterion: {_criterion(args.latency_bound)})")
    else:
        report = {**meta, **asyncio.run(run_load(cfg, args.latency_bound))}
        log(_line(cfg.sessions, report["aggregate"]))
        for s in report["streams"]:
            log(f"  stream {s['index']:3d}: first chunk {_ms(s['first_chunk_latency_s'])}, first audio "
                f"{_ms(s['first_audio_s'])}, start buffer {_ms(s['prebuffer_s'])} ({s['prebuffer_from']}), heard "
                f"{_ms(s['first_play_s'])}, least slack {_ms(s['least_slack_s'])}, {s['audio_s']:.2f} s audio, "
                f"{s['underruns']} stall(s) {_ms(s['stall_s'])} (worst "
                f"{_ms(s['worst_stall_s'])}), {'viable' if s['viable'] else 'NOT viable'}"
                + (f", error: {s['error']}" if s["error"] else ""))
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
