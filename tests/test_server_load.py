"""`token2wav loadtest` against a real server on the tiny model, for a few seconds."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from test_server import running_server

from token2wav import cli
from token2wav.serve.app import create_app
from token2wav.serve.loadtest import Player
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
    assert q.underruns == 0


STREAM_FIELDS = {
    "index", "start_offset_s", "tokens", "chunks", "audio_s", "first_chunk_latency_s", "first_audio_s", "underruns",
    "underrun_s", "slow_downs", "wall_s", "error", "close_code",
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
    assert {"underruns", "underrun_s", "streams_with_underruns", "realtime", "audio_s"} <= set(agg)
    assert len(report["streams"]) == 2
    for s in report["streams"]:
        assert set(s) == STREAM_FIELDS
        assert s["error"] is None and s["close_code"] == 1000 and s["tokens"] == 50
        # every token's audio arrived: one token is 0.04 s; the sum of chunk durations rounds by ~1e-15
        assert s["audio_s"] == pytest.approx(50 * 960 / 24000, abs=1e-3)
        assert 0 < s["first_chunk_latency_s"] <= s["first_audio_s"]
        assert s["first_audio_s"] >= 27 / 25  # the 28th token is sent 27/25 s after the first
        assert s["underruns"] >= 0 and s["underrun_s"] >= 0
    assert agg["underruns"] == sum(s["underruns"] for s in report["streams"])
    err = capsys.readouterr().err
    assert "2 streams:" in err and "stream   0: first chunk" in err


class SlowEngine:
    """The tiny engine with every push and finish 1.2 s slower. 50 tokens give two chunks: the first
    (25 tokens, under 1 s of audio) from a push, the last from the finish, at least 1.2 s later: a gap."""

    def __init__(self, t2w: Any) -> None:
        self._t2w = t2w

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t2w, name)

    def stream(self, **kwargs: Any) -> Any:
        return _SlowSession(self._t2w.stream(**kwargs))


class _SlowSession:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def push(self, tokens: Any) -> Any:
        time.sleep(1.2)
        return self.inner.push(tokens)

    def finish(self) -> Any:
        time.sleep(1.2)
        return self.inner.finish()

    def close(self) -> None:
        self.inner.close()


def test_loadtest_hears_the_gaps_of_a_slow_server(engine: Any, tmp_path) -> None:
    with running_server(create_app(SlowEngine(engine), name="slow", limits=LIMITS)) as addr:
        out = tmp_path / "slow.json"
        argv = ["loadtest", "--url", f"ws://{addr}/v1/stream", "--rate", "100", "--duration", "0.5",
                "--json", str(out)]
        assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    (s,) = report["streams"]
    assert s["error"] is None and s["chunks"] >= 2
    assert s["underruns"] >= 1 and s["underrun_s"] >= 1.2 - 1.0
    assert report["aggregate"]["realtime"] is False


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
