"""Admission by capacity: a stream that would take the audio the open streams need past what the server computes
waits in a bounded queue ('queued' messages) or is refused with 1013 and a retry hint; the admitted streams keep
playing without a stall; /metrics shows need against capacity."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from test_server import _metrics, running_server
from websockets.asyncio.client import connect

from token2wav import Token2Wav
from token2wav.serve.app import create_app
from token2wav.serve.protocol import ServerLimits

TIMEOUT = 60.0


class _Capacity:
    """A batch-of-one batcher that reports a fixed capacity (audio seconds per second) instead of measuring."""

    def __init__(self, inner: Any, capacity: float) -> None:
        self._inner, self.value = inner, capacity

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def capacity(self, streams: int | None = None) -> float:
        return self.value


@pytest.fixture(scope="module")
def engine() -> Any:
    return Token2Wav.from_pretrained("tiny")


async def _first(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


def test_a_stream_over_capacity_waits_then_starts_when_one_ends(engine: Any) -> None:
    # capacity 2.5: two real-time streams fit (2 + 1 > 2.5 * 0.9 for a third)
    batcher = _Capacity(engine.batcher(max_batch=1), 2.5)
    limits = ServerLimits(max_sessions=8, max_waiting_streams=1, admission_wait_s=20.0, workers=2)
    app = create_app(engine, name="admission", limits=limits, batcher=batcher)
    with running_server(app) as addr:
        url, base = f"ws://{addr}/v1/stream", f"http://{addr}"

        async def scenario() -> dict[str, Any]:
            open_ = [await connect(url) for _ in range(2)]
            for ws in open_:
                await ws.send(json.dumps({"type": "start"}))
                assert (await _first(ws))["type"] == "started"
            third = await connect(url)
            queued = await _first(third)  # sent before 'start' is even read: the stream is held at the door
            metrics = _metrics(base)
            fourth = await connect(url)  # the queue (one place) is full: refused at once, with a retry hint
            refused = await _first(fourth)
            await third.send(json.dumps({"type": "start"}))  # read while it waits, kept for when it starts
            await open_[0].send(json.dumps({"type": "end"}))  # one stream ends ...
            await open_[0].close()
            started = await _first(third)  # ... and the waiting one starts
            for ws in (open_[1], third, fourth):
                await ws.close()
            return {"queued": queued, "refused": refused, "started": started, "metrics": metrics}

        out = asyncio.run(scenario())
    assert out["queued"] == {"type": "queued", "position": 1, "need": 2.0, "capacity": 2.5}
    assert out["refused"]["type"] == "error" and out["refused"]["code"] == 1013
    assert "server at capacity" in out["refused"]["message"] and out["refused"]["retry_after_s"] > 0
    assert out["started"]["type"] == "started"
    m = out["metrics"]
    assert m["token2wav_audio_need"] == 2.0 and m["token2wav_audio_capacity"] == 2.5
    assert m["token2wav_streams_waiting"] == 1.0


def test_streams_that_arrive_together_are_counted_from_their_admission(engine: Any) -> None:
    """Capacity 2.5: three connections at once, none has started its session yet (no 'start' sent). The first two
    are admitted and count in the need from then on, so the third waits. (Counted only once their sessions were
    open, all three were admitted: measured, 16 streams within 0.5 s all admitted and all stalled.)"""
    batcher = _Capacity(engine.batcher(max_batch=1), 2.5)
    limits = ServerLimits(max_sessions=8, max_waiting_streams=4, admission_wait_s=20.0, workers=2)
    app = create_app(engine, name="together", limits=limits, batcher=batcher)
    with running_server(app) as addr:

        async def scenario() -> dict[str, Any]:
            conns = [await connect(f"ws://{addr}/v1/stream") for _ in range(3)]
            third = await _first(conns[2])
            for ws in conns:
                await ws.close()
            return third

        third = asyncio.run(scenario())
    assert third == {"type": "queued", "position": 1, "need": 2.0, "capacity": 2.5}


def test_a_waiting_stream_is_refused_after_the_admission_wait(engine: Any) -> None:
    """Capacity 0.5 audio s/s: not even one stream is real time. An idle server still takes one (refusing it
    helps no one, and only its calls re-measure the capacity); the next waits, then is refused."""
    batcher = _Capacity(engine.batcher(max_batch=1), 0.5)
    limits = ServerLimits(max_sessions=4, admission_wait_s=0.3, workers=1)
    app = create_app(engine, name="full", limits=limits, batcher=batcher)
    with running_server(app) as addr:

        async def scenario() -> list[dict[str, Any]]:
            async with connect(f"ws://{addr}/v1/stream") as first:
                await first.send(json.dumps({"type": "start"}))
                started = await _first(first)
                async with connect(f"ws://{addr}/v1/stream") as second:
                    return [started, await _first(second), await _first(second)]

        started, queued, refused = asyncio.run(scenario())
    assert started["type"] == "started"
    assert queued["type"] == "queued" and queued["position"] == 1
    assert refused["code"] == 1013 and "1 real-time streams open need 1.0 s of audio per second" in refused["message"]


def test_admitted_streams_do_not_stall(engine: Any) -> None:
    """Two streams at the model's token rate on the measured capacity (no stand-in): both admitted, neither
    stalls in the server's model of its listener (recommended start buffer, adaptive hops)."""
    from token2wav.serve.client import stream_tokens

    app = create_app(engine, name="real", limits=ServerLimits(max_sessions=4, workers=2))
    rate = float(engine.token_rate)
    tokens = list(range(0, 2 * int(rate)))  # two seconds of speech each
    with running_server(app) as addr:
        async def two() -> list[Any]:
            return await asyncio.gather(*(stream_tokens(f"ws://{addr}/v1/stream", tokens, rate=rate)
                                          for _ in range(2)))

        results = asyncio.run(two())
        m = _metrics(f"http://{addr}")
    assert all(r.started["schedule"] == "adaptive" for r in results)
    assert m["token2wav_stream_worst_stall_seconds_count"] == 2
    assert m['token2wav_stream_worst_stall_seconds_bucket{le="0.1"}'] == 2  # both: worst stall <= 100 ms


def test_a_client_that_leaves_the_queue_ends_quietly_and_frees_its_place(engine: Any) -> None:
    """Waiting clients that close their connections leave the queue at once (not after admission_wait_s), and
    quietly: no error in the log (a 'queued' update to a closed client once ended in 'Exception in ASGI
    application')."""
    batcher = _Capacity(engine.batcher(max_batch=1), 0.5)  # not even one stream fits: all but the first wait
    limits = ServerLimits(max_sessions=4, max_waiting_streams=2, admission_wait_s=60.0, workers=1)
    app = create_app(engine, name="leaving", limits=limits, batcher=batcher)
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    uvicorn_log = logging.getLogger("uvicorn.error")
    try:
        with running_server(app) as addr:
            uvicorn_log.addHandler(handler)  # after uvicorn configured its loggers (that drops their handlers)
            url, base = f"ws://{addr}/v1/stream", f"http://{addr}"

            async def scenario() -> tuple[dict[str, Any], dict[str, Any], float]:
                holder = await connect(url)  # an idle server takes one stream whatever its capacity
                await holder.send(json.dumps({"type": "start"}))
                assert (await _first(holder))["type"] == "started"
                first, second = await connect(url), await connect(url)
                places = (await _first(first), await _first(second))
                await second.close()  # the second leaves while it waits ...
                await first.close()  # ... then the first
                deadline = time.monotonic() + 10.0  # well before admission_wait_s
                while _metrics(base)["token2wav_streams_waiting"] > 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await holder.close()
                return places[0], places[1], _metrics(base)["token2wav_streams_waiting"]

            first, second, waiting = asyncio.run(scenario())
    finally:
        uvicorn_log.removeHandler(handler)
    assert (first["position"], second["position"]) == (1, 2)
    assert waiting == 0.0
    assert [r.getMessage() for r in errors] == []


def test_a_start_buffer_covers_a_chunk_behind_each_other_open_stream(engine: Any) -> None:
    """With calls measured at 1 s fixed + 0.05 s per audio second, a second open stream adds a chunk that may
    have to wait for the other's: the bound counts two calls' fixed costs (rows of two streams in calls of one)
    and both chunks' audio, and the recommended start buffer covers it. Alone, the stream's own meter decides."""
    batcher = engine.batcher(max_batch=1)
    try:
        for audio in (0.5, 1.0) * 4:
            batcher.calls.observe(1.0 + 0.05 * audio, audio)
        with batcher.stream() as a:
            assert batcher.chunk_bound_s(1.0) is None
            lone = a.recommended_start_buffer_s()
            with batcher.stream() as b:
                assert batcher.chunk_bound_s(1.0) == pytest.approx(2 * 1.0 + 0.05 * 2 * 1.0)
                assert a.recommended_start_buffer_s() > lone + 1.0 and b.recommended_start_buffer_s() > lone + 1.0
            assert a.recommended_start_buffer_s() == lone
    finally:
        batcher.close()
    inline = engine.batcher(workers=0)  # Token2Wav.stream(): each chunk on its caller's thread, no queue
    try:
        for audio in (0.5, 1.0) * 4:
            inline.calls.observe(1.0 + 0.05 * audio, audio)
        with inline.stream(), inline.stream():
            assert inline.chunk_bound_s(1.0) is None
    finally:
        inline.close()


def test_capacity_counts_the_rows_more_streams_would_put_in_a_call(engine: Any) -> None:
    """Calls of one and seven rows of 1 s of audio measured at 0.1 s + 0.08 s per audio second: a batcher of up
    to 16 rows computes more audio per second for 8 streams than it measured, a batch-of-one batcher does not;
    both report the measured throughput without a number of streams."""
    for max_batch, at_8 in ((16, 8 / (0.1 + 0.08 * 8)), (1, None)):
        batcher = engine.batcher(max_batch=max_batch)
        try:
            for i in range(8):
                rows = 7 if i % 2 else 1
                batcher.calls.observe(0.1 + 0.08 * rows, float(rows), rows=rows)
            measured = batcher.capacity()
            assert measured == pytest.approx(32.0 / (0.8 + 0.08 * 32.0))
            assert batcher.capacity(streams=8) == pytest.approx(at_8 or measured)
        finally:
            batcher.close()


def test_a_stream_whose_chunks_run_slower_than_the_meter_measured_reads_its_own_slowdown(engine: Any) -> None:
    """The meter holds a calibration 30 chunks long that priced a token at 10 us. A stream's steady chunks take
    far longer: its ``slowdown`` is the least of their ratios to what the meter expected when the stream started
    (the meter itself soon fits them; the recommendation then costs its chunks at that rate, tests/test_pacing.py).
    A stream whose chunks cost what the meter holds reads 1."""
    batcher = engine.batcher(max_batch=1)
    try:
        for i in range(30):
            batcher.compute.observe(25 + 25 * (i % 2), 1e-5 * (25 + 25 * (i % 2)))
        vocab = int(engine.config.vocab_size)
        with batcher.stream(hop=25, schedule="fixed") as session:
            assert session.slowdown == 1.0  # nothing measured yet
            session.push([i % vocab for i in range(25 * 5 + 3)])  # chunks 0-4; 1-4 are steady
            slowdown = session.slowdown
            assert slowdown > 10 * batcher.compute.p95_ratio(), (slowdown, batcher.compute.p95_ratio())
        costs = [s for _, s, _ in batcher.compute.samples][-4:]  # the stream's own chunks, as the meter saw them
        batcher.compute = type(batcher.compute)()
        for i in range(30):
            batcher.compute.observe(25, costs[i % len(costs)] * (0.5 + 0.75 * (i % 3)))
        with batcher.stream(hop=25, schedule="fixed") as session:
            session.push([i % vocab for i in range(25 * 5 + 3)])
            assert session.slowdown == 1.0
    finally:
        batcher.close()
