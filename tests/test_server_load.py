"""`token2wav loadtest` against a real server on the tiny model, for a few seconds."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest
from test_server import running_server

from token2wav import cli
from token2wav.serve.app import create_app
from token2wav.serve.client import start_buffer_ms
from token2wav.serve.loadtest import (
    DEFAULT_PREBUFFER_S,
    Player,
    StreamStats,
    choose_prebuffer,
    stall_summary,
    stream_viable,
    summarize,
)
from token2wav.serve.protocol import ServerLimits

LIMITS = ServerLimits(max_sessions=4, max_tokens_per_session=2000, workers=2)


@pytest.fixture(scope="module")
def engine() -> Any:
    from token2wav import Token2Wav

    t2w = Token2Wav.from_pretrained("tiny")
    with t2w.stream() as s:
        s.push(list(range(30)))
    return t2w


def test_player_counts_underruns() -> None:
    p = Player()
    p.arrive(10.0, 1.0)  # plays 10-11
    p.arrive(10.5, 1.0)  # in time: plays 11-12
    p.arrive(12.25, 0.5)  # 0.25 s of silence, plays 12.25-12.75
    p.arrive(12.75, 1.0)  # exactly in time
    p.arrive(14.0, 1.0)  # 0.25 s of silence
    assert p.underruns == 2 and p.underrun_s == pytest.approx(0.5) and p.audio_s == pytest.approx(4.5)
    q = Player(prebuffer_s=0.5)  # a jitter buffer absorbs the first gap
    q.arrive(10.0, 1.0)  # plays 10.5-11.5
    q.arrive(11.4, 1.0)
    assert q.underruns == 0 and q.worst_stall_s == 0.0 and q.stall_s == 0.0


def test_player_worst_and_total_stall() -> None:
    p = Player(prebuffer_s=0.2)
    p.arrive(1.0, 0.5)  # playback starts at 1.2, plays 1.2-1.7
    p.arrive(1.78, 0.5)  # 80 ms stall, plays 1.78-2.28
    p.arrive(2.28, 0.0)  # an empty chunk plays nothing: never a stall
    p.arrive(2.43, 0.25)  # 150 ms stall, plays 2.43-2.68
    p.arrive(2.70, 1.0)  # 20 ms stall
    assert p.start == pytest.approx(1.2) and p.underruns == 3
    assert p.worst_stall_s == pytest.approx(0.15)
    assert p.stall_s == p.underrun_s == pytest.approx(0.25)


def test_player_takes_the_newest_recommendation_while_buffering() -> None:
    p = Player(prebuffer_s=0.5)  # from 'started'
    p.arrive(10.0, 0.25)  # would start at 10.5
    p.recommend(10.1, 0.8)  # a chunk header: start at 10.8 instead
    assert p.start == pytest.approx(10.8) and p.buffering(10.7)
    p.arrive(10.9, 0.25)  # plays 11.05-11.3 after the first chunk's 10.8-11.05
    p.recommend(11.0, 2.0)  # playing already: too late, ignored
    assert p.start == pytest.approx(10.8) and p.prebuffer_s == pytest.approx(0.8)
    p.arrive(11.5, 0.5)  # 0.2 s stall
    assert p.worst_stall_s == pytest.approx(0.2) and p.underruns == 1
    q = Player(prebuffer_s=1.0)
    q.arrive(5.0, 0.25)
    q.recommend(5.4, 0.1)  # smaller than the time already waited: playback starts at once
    assert q.start == pytest.approx(5.4) and q.play_end == pytest.approx(5.65) and q.prebuffer_s == pytest.approx(0.4)


def test_default_prebuffer_from_the_started_message() -> None:
    started = {"type": "started", "sample_rate": 24000, "start_buffer_ms": 320}
    assert start_buffer_ms(started) == 320
    assert choose_prebuffer(None, start_buffer_ms(started) / 1e3) == (pytest.approx(0.32), "server")
    assert choose_prebuffer(0.1, 0.32) == (0.1, "option")  # an explicit --prebuffer wins, even 0
    assert choose_prebuffer(0.0, 0.32) == (0.0, "option")
    older = {"type": "started", "sample_rate": 24000}  # a server that sends no recommendation
    assert start_buffer_ms(older) is None
    assert choose_prebuffer(None, None) == (DEFAULT_PREBUFFER_S, "default") and DEFAULT_PREBUFFER_S == 0.5
    for bad in (-5, "300", True, float("nan"), None):
        assert start_buffer_ms({"type": "chunk", "start_buffer_ms": bad}) is None
    assert start_buffer_ms({"type": "chunk", "start_buffer_ms": 149.6}) == 150


def _stream(i: int, worst: float, total: float, first_audio: float = 1.0, error: str | None = None,
            start_buffer: float = 0.5) -> StreamStats:
    return StreamStats(index=i, start_offset_s=0.0, first_audio_s=first_audio, first_chunk_latency_s=0.2,
                       first_play_s=first_audio + start_buffer, prebuffer_s=start_buffer,
                       worst_stall_s=worst, stall_s=total, underrun_s=total, underruns=int(worst > 0),
                       error=error, prebuffer_from="server")


def test_stall_shares_and_the_realtime_criterion() -> None:
    # worst stalls 0, 30, 50, 80, 100, 250 ms: <= 50 ms in 3 of 6, <= 100 ms in 5 of 6
    worst = [0.0, 0.03, 0.05, 0.08, 0.1, 0.25]
    total = [0.0, 0.03, 0.09, 0.08, 0.3, 0.4]
    s = stall_summary(worst, total)
    assert s["share_worst_stall_le_50ms"] == 0.5 and s["share_worst_stall_le_100ms"] == pytest.approx(0.8333, abs=1e-4)
    assert s["stall_s"] == pytest.approx(0.9) and s["streams_with_stalls"] == 5
    assert s["worst_stall_s"]["max"] == 0.25 and s["worst_stall_s"]["p50"] == pytest.approx(0.065)
    assert stall_summary([], [])["share_worst_stall_le_100ms"] is None

    streams = [_stream(i, w, t) for i, (w, t) in enumerate(zip(worst, total))]
    agg = summarize(streams, latency_bound_s=2.5)
    assert agg["share_worst_stall_le_100ms"] == pytest.approx(5 / 6, abs=1e-4) and agg["realtime"] is False
    assert agg["viable_streams"] == 5 and [stream_viable(x) for x in streams] == [True] * 5 + [False]
    # 100 streams, one with a 250 ms stall: 99 % within 100 ms is real time; two such streams are not
    ok = [_stream(i, 0.02, 0.02) for i in range(99)] + [_stream(99, 0.25, 0.25)]
    agg = summarize(ok, latency_bound_s=2.5)
    assert agg["share_worst_stall_le_100ms"] == 0.99 and agg["realtime"] is True
    assert agg["first_audio_s"] == {"p50": 1.0, "p95": 1.0, "p99": 1.0}
    assert summarize(ok[1:] + [_stream(100, 0.25, 0.25)] * 2, 2.5)["realtime"] is False
    # first audio heard (received + start buffer) with its p95 over the bound, or an error: not real time
    slow = [_stream(i, 0.0, 0.0, first_audio=1.0 if i < 90 else 3.0) for i in range(100)]
    agg = summarize(slow, latency_bound_s=2.5)
    assert agg["first_audio_s"]["p50"] == 1.0 and agg["first_audio_s"]["p95"] == 3.0 and agg["realtime"] is False
    assert agg["first_play_s"] == {"p50": 1.5, "p95": 3.5}
    assert summarize(slow, latency_bound_s=3.4)["realtime"] is False and summarize(slow, 3.5)["realtime"] is True
    # audio received at 1.5 s but a start buffer as long as the stream (measured: a loaded server recommended
    # 10 s): no stall, yet heard at 11.5 s, which is not real time
    held = [_stream(i, 0.0, 0.0, first_audio=1.5, start_buffer=10.0) for i in range(10)]
    agg = summarize(held, latency_bound_s=2.5)
    assert agg["share_worst_stall_le_100ms"] == 1.0 and agg["first_audio_s"]["p95"] == 1.5
    assert agg["realtime"] is False and agg["viable_streams"] == 0 and not stream_viable(held[0])
    assert summarize([*ok[:99], _stream(99, 0.0, 0.0, error="boom")], 2.5)["realtime"] is False


STREAM_FIELDS = {
    "index", "start_offset_s", "tokens", "chunks", "audio_s", "first_chunk_latency_s", "first_audio_s", "first_play_s",
    "prebuffer_s", "prebuffer_from", "underruns", "underrun_s", "stall_s", "worst_stall_s", "least_slack_s", "viable",
    "slow_downs", "wall_s", "error", "close_code",
}


def test_loadtest_command_reports_per_stream_and_aggregate(engine: Any, tmp_path, capsys) -> None:
    with running_server(create_app(engine, name="tiny", limits=LIMITS)) as addr:
        out, png = tmp_path / "load.json", tmp_path / "load.png"
        argv = ["loadtest", "--url", f"ws://{addr}/v1/stream", "--sessions", "2", "--rate", "25", "--duration", "2",
                "--preset", "balanced", "--json", str(out), "--plot", str(png)]
        assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"date", "commit", "model", "config", "aggregate", "streams"} <= set(report)
    assert report["config"]["sessions"] == 2 and report["config"]["rate"] == 25
    assert report["config"]["first_chunk_tokens"] == 28  # the preset's first chunk, from /v1/models
    agg = report["aggregate"]
    assert agg["sessions"] == 2 and agg["completed"] == 2 and agg["errors"] == 0
    assert set(agg["first_chunk_latency_s"]) == {"p50", "p90", "p99", "max"}
    assert {"underruns", "underrun_s", "streams_with_underruns", "realtime", "audio_s", "stall_s", "worst_stall_s",
            "share_worst_stall_le_50ms", "share_worst_stall_le_100ms", "viable_streams"} <= set(agg)
    assert set(agg["first_audio_s"]) == {"p50", "p95", "p99"}
    assert 0 <= agg["share_worst_stall_le_50ms"] <= agg["share_worst_stall_le_100ms"] <= 1
    assert len(report["streams"]) == 2
    for s in report["streams"]:
        assert set(s) == STREAM_FIELDS
        assert s["error"] is None and s["close_code"] == 1000 and s["tokens"] == 50
        # every token's audio arrived: one token is 0.04 s; the sum of chunk durations rounds by ~1e-15
        assert s["audio_s"] == pytest.approx(50 * 960 / 24000, abs=1e-3)
        assert 0 < s["first_chunk_latency_s"] <= s["first_audio_s"]
        assert s["first_audio_s"] >= 27 / 25  # the 28th token is sent 27/25 s after the first
        assert s["underruns"] >= 0 and s["underrun_s"] == s["stall_s"] >= s["worst_stall_s"] >= 0
        # a stalled stream's least slack is minus a stall; one without, what its buffer had left (at most all of it)
        if s["underruns"]:
            assert s["least_slack_s"] < 0 and -s["least_slack_s"] <= s["worst_stall_s"] + 1e-3
        else:
            assert 0 <= s["least_slack_s"] <= s["prebuffer_s"] + 2.0 + 1e-3  # plus the first chunk's 2 s of audio
        # no --prebuffer: the server's recommendation, or 0.5 s from a server that sends none
        assert s["prebuffer_from"] in ("server", "default")
        if s["prebuffer_from"] == "default":
            assert s["prebuffer_s"] == 0.5
        assert s["first_play_s"] == pytest.approx(s["first_audio_s"] + s["prebuffer_s"], abs=2e-4)
        assert s["viable"] == (s["worst_stall_s"] <= 0.1 and s["first_play_s"] <= 2.5)
    assert agg["underruns"] == sum(s["underruns"] for s in report["streams"])
    err = capsys.readouterr().err
    assert "2 streams:" in err and "stream   0: first chunk" in err
    assert "worst stall <= 50 ms" in err and "first audio p50" in err and "start buffer" in err


class SlowBatcher:
    """The tiny engine's batch-of-one batcher with every push and finish 1.2 s slower. 50 tokens give two
    chunks: the first (25 tokens, under 1 s of audio) from a push, the last from the finish, at least 1.2 s
    later: a gap."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stream(self, **kwargs: Any) -> Any:
        return _SlowSession(self._inner.stream(**kwargs))


class _SlowSession:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # everything else (the server reads the session's state) as is
        return getattr(self.inner, name)

    async def apush(self, tokens: Any, arrived_at: float | None = None) -> Any:
        await asyncio.sleep(1.2)
        return await self.inner.apush(tokens, arrived_at=arrived_at)

    async def afinish(self) -> Any:
        await asyncio.sleep(1.2)
        return await self.inner.afinish()

    def close(self) -> None:
        self.inner.close()


def test_loadtest_hears_the_gaps_of_a_slow_server(engine: Any, tmp_path) -> None:
    with running_server(create_app(engine, name="slow", limits=LIMITS,
                                           batcher=SlowBatcher(engine.batcher(max_batch=1)))) as addr:
        out = tmp_path / "slow.json"
        argv = ["loadtest", "--url", f"ws://{addr}/v1/stream", "--rate", "100", "--duration", "0.5",
                "--prebuffer", "0", "--json", str(out)]  # an explicit start buffer wins over the server's
        assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    (s,) = report["streams"]
    assert s["error"] is None and s["chunks"] >= 2
    assert (s["prebuffer_s"], s["prebuffer_from"]) == (0.0, "option")
    assert s["underruns"] >= 1 and s["underrun_s"] >= 1.2 - 1.0
    assert s["worst_stall_s"] >= 1.2 - 1.0 and s["viable"] is False
    agg = report["aggregate"]
    assert agg["share_worst_stall_le_100ms"] == 0.0 and agg["realtime"] is False


def test_find_max_searches_and_reports(engine: Any, tmp_path) -> None:
    with running_server(create_app(engine, name="tiny", limits=LIMITS)) as addr:
        out = tmp_path / "max.json"
        argv = ["loadtest", "--url", f"ws://{addr}/v1/stream", "--find-max", "--max-search", "2", "--duration", "1",
                "--latency-bound", "5", "--json", str(out), "--plot", str(tmp_path / "max.png")]
        assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    trials = {t["sessions"]: t for t in report["trials"]}
    assert 1 in trials and set(trials) <= {1, 2}
    best = report["max_realtime_sessions"]
    assert best == max([n for n, t in trials.items() if t["realtime"]], default=0)
    assert report["first_failing_sessions"] in (None, *[n for n, t in trials.items() if not t["realtime"]])
    assert report["at_1"] == trials[1]
    assert (tmp_path / "max.png").stat().st_size > 0


def test_loadtest_rejects_bad_options(capsys) -> None:
    for argv, words in (
        (["--sessions", "0"], "--sessions must be in [1, 1024]"),
        (["--rate", "-1"], "--rate must be a finite number > 0"),
        (["--ramp", "nan"], "--ramp must be a finite number >= 0"),
        (["--url", "127.0.0.1:1"], "--url must be ws://HOST:PORT/v1/stream"),
    ):
        assert cli.main(["loadtest", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert cli.main(["loadtest", "--url", "ws://127.0.0.1:9/v1/stream"]) == 1  # nothing listens there
    assert "cannot reach the server" in capsys.readouterr().err


async def _recommending_server(ws: Any, done_after_s: float = 0.0) -> None:
    """A stand-in server that recommends a start buffer: 300 ms in 'started', then 400 and 900 ms in the
    first two chunk headers (both arrive before playback starts), each chunk 0.1 s of audio at 1 kHz; 'done'
    ``done_after_s`` after them."""
    await ws.recv()  # start
    await ws.send(json.dumps({"type": "started", "sample_rate": 1000, "start_buffer_ms": 300}))
    await ws.recv()  # the first tokens
    for i, rec in enumerate((400, 900)):
        await ws.send(json.dumps({"type": "chunk", "index": i, "samples": 100, "decoded_tokens": 5,
                                  "start_buffer_ms": rec}))
        await ws.send(bytes(200))
        await asyncio.sleep(0.05)
    await asyncio.sleep(done_after_s)
    await ws.send(json.dumps({"type": "done"}))
    try:
        async for _ in ws:  # the rest of the tokens, and 'end'
            pass
    except Exception:  # noqa: BLE001 - the client may close first
        pass


def test_loadtest_uses_the_servers_newest_start_buffer_unless_given_one() -> None:
    from websockets.asyncio.server import serve

    from token2wav.serve.loadtest import LoadConfig, run_load

    async def main(prebuffer_s: float | None, done_after_s: float = 1.0) -> dict[str, Any]:
        handler = functools.partial(_recommending_server, done_after_s=done_after_s)
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            cfg = LoadConfig(url=f"ws://127.0.0.1:{port}/v1/stream", sessions=1, rate=50.0, duration_s=0.1,
                             ramp_s=0.0, prebuffer_s=prebuffer_s, vocab_size=10, timeout_s=10.0)
            return await run_load(cfg)

    auto = asyncio.run(main(None))
    (s,) = auto["streams"]
    assert s["error"] is None and s["chunks"] == 2 and s["audio_s"] == pytest.approx(0.2)
    assert (s["prebuffer_s"], s["prebuffer_from"]) == (0.9, "server")  # the newest one before playback
    assert s["worst_stall_s"] == 0.0 and s["viable"] is True and auto["aggregate"]["prebuffer_from"] == ["server"]
    assert s["first_play_s"] == pytest.approx(s["first_audio_s"] + 0.9, abs=2e-4)
    given = asyncio.run(main(0.05))
    (s,) = given["streams"]
    assert (s["prebuffer_s"], s["prebuffer_from"]) == (0.05, "option")
    # done 0.05 s after the last audio, long before 0.9 s: a player starts then, with all the audio in
    early = asyncio.run(main(None, done_after_s=0.0))
    (s,) = early["streams"]
    assert s["error"] is None and s["prebuffer_from"] == "server" and s["worst_stall_s"] == 0.0
    assert 0.05 <= s["prebuffer_s"] < 0.5, s
    assert s["first_play_s"] == pytest.approx(s["first_audio_s"] + s["prebuffer_s"], abs=2e-4)


def test_client_reports_the_servers_newest_start_buffer() -> None:
    from websockets.asyncio.server import serve

    from token2wav.serve.client import stream_tokens

    async def main() -> Any:
        async with serve(_recommending_server, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            return await stream_tokens(f"ws://127.0.0.1:{port}/v1/stream", list(range(5)), rate=50.0)

    result = asyncio.run(main())
    # 300 from 'started', replaced by the first chunk header's 400, then by the second's 900: it came 50 ms after
    # the first audio, while a player would still be buffering (for 400 ms)
    assert result.started["start_buffer_ms"] == 300 and result.start_buffer_ms == 900
    assert result.summary()["recommended_start_buffer_ms"] == 900
