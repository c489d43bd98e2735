"""The listener's clock and the adaptive schedule, on a simulated clock (no model): stalls are counted exactly, no
stall happens whenever the capacity exists, hops grow with slack and stay whole chunks."""

from __future__ import annotations

import math
import random

import pytest

from token2wav.streaming import pacing
from token2wav.streaming.pacing import (
    SAFETY_MARGIN_S,
    ComputeMeter,
    PlaybackClock,
    RateMeter,
    choose_hop,
    recommend_start_buffer,
)

AUDIO_PER_TOKEN = 2 * 256 / 22050  # the demo voice: 43.07 tokens per second of audio


def test_playback_clock_counts_each_stall() -> None:
    clock = PlaybackClock(start_buffer_s=0.25)
    assert clock.dry_at == math.inf and clock.deliver(10.0, 1.0) == 0.0
    assert clock.dry_at == 11.25 and clock.least_slack_s == math.inf  # plays from 10.25 for 1 s
    assert clock.deliver(11.0, 0.5) == 0.0 and clock.dry_at == 11.75
    assert clock.least_slack_s == pytest.approx(0.25)  # arrived with 0.25 s still to play
    assert clock.deliver(12.0, 0.5) == pytest.approx(0.25)  # 0.25 s of silence from 11.75
    assert clock.least_slack_s == pytest.approx(-0.25)
    assert clock.dry_at == pytest.approx(12.5)
    assert clock.deliver(13.5, 0.1) == pytest.approx(1.0)
    assert (clock.stalls, clock.stall_s, clock.worst_stall_s) == (2, pytest.approx(1.25), pytest.approx(1.0))


def test_a_listener_still_buffering_when_the_stream_ends_starts_at_once() -> None:
    clock = PlaybackClock(start_buffer_s=5.0)
    clock.complete(1.0)  # nothing arrived: nothing to play
    assert not clock.started
    clock.deliver(10.0, 0.3)
    clock.deliver(10.5, 0.4)
    clock.complete(10.6)  # all 0.7 s are in by 10.6: waiting until 15.0 would be 4.4 s of needless silence
    assert clock.play_start == 10.6 and clock.start_buffer_s == pytest.approx(0.6)
    assert clock.dry_at == pytest.approx(11.3) and clock.stalls == 0
    late = PlaybackClock(start_buffer_s=0.2)  # already playing when the stream ends: nothing changes
    late.deliver(10.0, 1.0)
    late.complete(10.5)
    assert late.play_start == 10.2 and late.start_buffer_s == 0.2


def test_rate_meter_measures_arrivals() -> None:
    meter = RateMeter(prior=43.0)
    assert meter.rate == 43.0
    for i in range(11):
        meter.arrived(1.0 + 0.1 * i, 5)  # 5 tokens every 0.1 s: 50 tokens/s
    assert meter.rate == pytest.approx(50.0)


def test_compute_meter_fits_a_line() -> None:
    meter = ComputeMeter()
    for tokens in (16, 32, 48, 64) * 3:
        meter.observe(tokens, 0.05 + 0.004 * tokens)
    assert meter.seconds(100) == pytest.approx(0.45)
    assert meter.p95_ratio() == pytest.approx(1.0)


def _simulate(*, compute_s: callable, rate: float, n_tokens: int, chunk: int, first_hop: int, max_hop: int,
              lookahead: int = 3, buffer_s: float | None = None, adaptive: bool = True,
              meter: ComputeMeter | None = None, horizon_s: float = 10.0, prompt: int | None = None) -> dict:
    """One stream: tokens arrive at ``rate`` from t = 0 (real-time pushes every 10 ms), each chunk takes
    ``compute_s(hop)`` after it is planned; the listener starts ``buffer_s`` after the first chunk (default:
    the recommendation). ``meter``: what earlier streams measured (default: nothing yet). ``prompt``: a prompt
    of that many tokens, and chunks whose cost grows with their history: ``compute_s(hop, history)``, where the
    history is the tokens before the chunk, passed to the meter and the schedule as the engine does. Returns the
    hops and the playback clock."""
    meter = meter if meter is not None else ComputeMeter()
    history = (lambda at: None) if prompt is None else (lambda at: prompt + at)  # noqa: E731
    cost_at = (lambda h, at: compute_s(h)) if prompt is None else (lambda h, at: compute_s(h, history(at)))  # noqa: E731
    arrivals = RateMeter(prior=1 / AUDIO_PER_TOKEN)
    clock = PlaybackClock()
    offset, hops, t = 0, [], 0.0
    busy_until, seen = 0.0, 0
    while offset < n_tokens:
        available = min(n_tokens, int(t * rate))
        arrivals.arrived(t, available - seen)
        seen = available
        if t < busy_until:
            t += 0.01
            continue
        if adaptive and hops:
            hop = choose_hop(chunk=chunk, first_hop=first_hop, max_hop=max_hop, offset=offset, available=available,
                             lookahead=lookahead, now=t, dry_at=clock.dry_at, token_rate=arrivals.rate, compute=meter,
                             audio_s_per_token=AUDIO_PER_TOKEN, horizon_s=horizon_s, history=history(offset))
        else:
            hop = first_hop
        hop = min(hop, n_tokens - offset)
        if available - offset >= hop + lookahead or available == n_tokens:
            done = t + cost_at(hop, offset)
            meter.observe(hop, cost_at(hop, offset), history(offset) or 0)
            if not clock.started:
                clock.start_buffer_s = buffer_s if buffer_s is not None else recommend_start_buffer(
                    first_hop=first_hop, audio_s_per_token=AUDIO_PER_TOKEN, token_rate=arrivals.rate, compute=meter,
                    chunk=chunk if prompt is not None else None, max_hop=max_hop if prompt is not None else None,
                    history=history(offset + hop) or 0, first_compute_s=done - t)  # as the session does
            clock.deliver(done, hop * AUDIO_PER_TOKEN)
            hops.append(hop)
            offset += hop
            busy_until = done
        t += 0.01
    return {"hops": hops, "clock": clock}


def test_adaptive_hops_grow_with_slack_and_never_stall_when_the_capacity_exists() -> None:
    # the demo voice's shape on this CPU: about 60 ms + 4.5 ms per token (RTF ~0.45)
    demo = dict(compute_s=lambda h: 0.06 + 0.0045 * h, n_tokens=860, chunk=16, first_hop=16, max_hop=96)
    # tokens at the model's own rate: a bigger hop waits for its tokens as long as its audio lasts, so the slack
    # is the start buffer; no stall with the recommended one
    realtime = _simulate(rate=43.07, **demo)
    assert realtime["clock"].stalls == 0, (realtime["hops"], realtime["clock"])
    assert realtime["clock"].start_buffer_s < 0.5  # small when compute is faster than real time
    # an LLM twice as fast as real time: the slack builds up and the hops grow, up to the cap
    fast = _simulate(rate=86.0, **demo)
    hops = fast["hops"]
    assert fast["clock"].stalls == 0
    assert hops[0] == 16 and max(hops) == 96  # the first audio early, larger hops once there is slack
    assert all(h % 16 == 0 for h in hops[:-1])  # whole (session) chunks: the last may be the remainder
    fixed = _simulate(rate=86.0, adaptive=False, **demo)  # the smallest hop throughout makes more calls
    assert len(hops) < len(fixed["hops"]) / 2


def test_trained_chunk_models_keep_whole_chunks() -> None:
    run = _simulate(compute_s=lambda h: 0.1 + 0.01 * h, rate=60.0, n_tokens=500, chunk=25, first_hop=25,
                    max_hop=100)
    assert run["clock"].stalls == 0
    assert set(run["hops"][:-1]) <= {25, 50, 75, 100} and max(run["hops"]) > 25


def test_a_stream_stalls_without_the_capacity_and_the_recommendation_says_so() -> None:
    """Compute slower than real time (RTF 1.5): no schedule can keep up; the recommended buffer grows to cover
    the shortfall over its horizon and the stall stays bounded by it."""
    slow = _simulate(compute_s=lambda h: 1.5 * h * AUDIO_PER_TOKEN, rate=43.07, n_tokens=430, chunk=16,
                     first_hop=16, max_hop=96, buffer_s=0.0)
    assert slow["clock"].stalls > 0 and slow["clock"].stall_s > 1.0
    meter = ComputeMeter()
    meter.observe(16, 1.5 * 16 * AUDIO_PER_TOKEN)  # RTF 1.5 at every hop: no hop is sustainable
    # p95 spread 1.5 (too few samples to measure it): 2.25 x real time, over the 10 s horizon, capped at it
    assert recommend_start_buffer(first_hop=16, audio_s_per_token=AUDIO_PER_TOKEN, token_rate=43.07,
                                  compute=meter) == 10.0


def test_the_recommendation_reaches_a_hop_that_keeps_up() -> None:
    """Small hops slower than real time (a fixed cost per call), larger ones faster: the recommended buffer is
    what it takes to reach the smallest sustainable hop, and with it the simulated stream does not stall."""
    cost = lambda h: 0.35 + 0.004 * h  # noqa: E731 - 16 tokens: 0.41 s for 0.37 s of audio: too slow
    meter = ComputeMeter()
    for h in (16, 32, 48, 64) * 2:
        meter.observe(h, cost(h))
    buffer_s = recommend_start_buffer(first_hop=16, audio_s_per_token=AUDIO_PER_TOKEN, token_rate=43.07,
                                      compute=meter, chunk=16, max_hop=96)
    # 32 tokens: 0.48 s of compute <= 0.74 s of audio (the fit is exact: spread 1); 16 more tokens (0.37 s) to reach
    assert buffer_s == pytest.approx(16 / 43.07 + cost(32) - cost(16) + SAFETY_MARGIN_S)
    run = _simulate(compute_s=cost, rate=43.07, n_tokens=860, chunk=16, first_hop=16, max_hop=96, buffer_s=buffer_s)
    # the simulated meter starts empty (it learns the cost as it goes): short stalls, none over 100 ms
    assert run["clock"].worst_stall_s <= 0.1


def test_a_stream_slower_than_the_meter_measured_is_buffered_for_its_own_rate() -> None:
    """A meter calibrated on an idle machine (chunks at half their audio), and a stream whose chunks run 3x
    that (a browser on the same cores): costed at the meter's rate it is told a buffer that stalls at nearly every
    chunk; costed at its own (``slowdown``), one that carries 10 s of speech without a stall."""
    calibrated = lambda h: 0.5 * h * AUDIO_PER_TOKEN  # noqa: E731
    meter = ComputeMeter()
    for h in (16, 32, 48, 64) * 2:
        meter.observe(h, calibrated(h))
    kwargs = dict(first_hop=16, audio_s_per_token=AUDIO_PER_TOKEN, token_rate=43.07, compute=meter, chunk=16,
                  max_hop=64)
    calm = recommend_start_buffer(**kwargs)
    busy = recommend_start_buffer(**kwargs, slowdown=3.0)
    assert calm < 0.5 and busy > 4.0
    assert recommend_start_buffer(**kwargs, slowdown=1.0) == calm
    actual = lambda h: 3.0 * calibrated(h)  # noqa: E731 - 1.5x real time
    run = dict(compute_s=actual, rate=43.07, n_tokens=430, chunk=16, first_hop=16, max_hop=16, adaptive=False)
    stalled = _simulate(buffer_s=calm, **run)["clock"]
    assert stalled.stalls > 10 and stalled.stall_s > 3.0  # a stall at nearly every chunk: 1/3 of it silence
    assert _simulate(buffer_s=busy, **run)["clock"].stalls == 0
    with pytest.raises(ValueError, match="slowdown must be a positive finite number"):
        recommend_start_buffer(**kwargs, slowdown=0.0)


def test_choose_hop_takes_the_largest_hop_that_arrives_in_time() -> None:
    meter = ComputeMeter()
    for h in (25, 50, 75, 100) * 2:
        meter.observe(h, 0.002 * h)  # 2 ms per token, exactly
    kwargs = dict(chunk=25, first_hop=25, max_hop=100, offset=0, available=200, lookahead=3, token_rate=50.0,
                  compute=meter, margin_s=0.0, audio_s_per_token=AUDIO_PER_TOKEN)
    assert choose_hop(now=0.0, dry_at=math.inf, **kwargs) == 25  # no audio yet: the smallest
    assert choose_hop(now=0.0, dry_at=0.2, **kwargs) == 100  # every hop is ready by 0.2 s
    assert choose_hop(now=0.0, dry_at=0.12, **kwargs) == 50  # 75 tokens take 0.15 s
    assert choose_hop(now=0.0, dry_at=0.01, **kwargs) == 25  # nothing fits: emit as early as possible
    # tokens not there yet: waiting for 50 more at 50 tokens/s costs a second
    short = dict(kwargs, available=28)
    assert choose_hop(now=0.0, dry_at=0.5, **short) == 25
    assert choose_hop(now=0.0, dry_at=0.7, **short) == 50  # 25 more tokens (0.5 s) + 0.1 s
    assert choose_hop(now=0.0, dry_at=1.2, **short) == 75  # 50 more (1 s) + 0.15 s


def _measured(cost: callable, hops: tuple[int, ...] = (12, 24, 48, 96)) -> ComputeMeter:
    """A meter that has seen chunks of several sizes at exactly ``cost`` (a warm server's)."""
    meter = ComputeMeter()
    for h in hops:
        meter.observe(h, cost(h))
    return meter


def test_a_stream_that_fell_behind_moves_to_a_hop_that_keeps_up() -> None:
    """A call's fixed cost makes the smallest hop slower than real time (12 tokens: 0.40 s for 0.28 s of audio)
    and larger ones faster (24: 0.45 s for 0.56 s). Once the listener runs dry, emitting the smallest hop again
    (the old rule, which ``horizon_s=0`` keeps) stalls at every chunk; the schedule moves to 24 instead."""
    cost = lambda h: 0.35 + 0.004 * h  # noqa: E731
    kwargs = dict(chunk=12, first_hop=12, max_hop=96, offset=0, available=500, lookahead=3, token_rate=43.07,
                  compute=_measured(cost), audio_s_per_token=AUDIO_PER_TOKEN, margin_s=0.0)
    assert choose_hop(now=0.0, dry_at=0.0, horizon_s=0.0, **kwargs) == 12  # the earliest chunk, again too slow
    assert choose_hop(now=0.0, dry_at=0.0, **kwargs) == 24  # the smallest hop that keeps up
    assert choose_hop(now=0.0, dry_at=5.0, **kwargs) == 96  # slack: the largest hop that arrives in time
    # with 0.42 s of slack the 12-token chunk arrives in time, but the stream would run dry within 10 s of
    # audio (0.43 s lost per second); 24 costs a 0.03 s gap now and nothing later
    assert choose_hop(now=0.0, dry_at=0.42, **kwargs) == 24

    run = dict(compute_s=cost, rate=43.07, n_tokens=860, chunk=12, first_hop=12, max_hop=96, buffer_s=0.0)
    old = _simulate(meter=_measured(cost), horizon_s=0.0, **run)
    new = _simulate(meter=_measured(cost), **run)
    assert set(old["hops"][:-1]) == {12} and old["clock"].stalls > 60 and old["clock"].stall_s > 8.0
    assert new["clock"].stall_s < 0.5 and new["clock"].stalls <= 6, new["clock"]
    # mostly 24; with slack for a 12-token chunk to arrive in time (tokens come at their real pace), it takes one
    middle = new["hops"][1:-1]
    assert middle.count(24) >= 0.6 * len(middle) and set(middle) <= {12, 24}, new["hops"]

    # A producer at the model's rate reads a hair slower on the server (42.8-42.9 tokens/s for 43.07). That weighs
    # on every hop alike and must not hide which hops keep up with their compute: it once made every hop count as
    # falling behind, and a stream that fell behind kept its smallest hop.
    hair = dict(kwargs, token_rate=42.9)
    assert choose_hop(now=0.0, dry_at=0.0, **hair) == 24
    assert choose_hop(now=0.0, dry_at=0.42, **hair) == 24
    hair_run = _simulate(meter=_measured(cost), **dict(run, rate=42.9))
    assert hair_run["clock"].stall_s < 0.5, hair_run["clock"]


def test_a_demo_stream_on_a_slow_cpu_recovers_from_a_short_buffer() -> None:
    """The demo voice on a 2-core AVX2 CPU, as the server's debug log measured it: 0.13 s + 15 ms per token, so a
    12-token chunk takes 0.31 s for 0.28 s of audio and a 24-token one 0.49 s for 0.56 s. The meter calibrated on
    both sizes (as ``Batcher.calibrate`` does), tokens at 42.9 per second (the model's rate as the server reads
    it), and a start buffer too short to wait for a 24-token hop at once. The stream kept 12-token hops and
    stalled at every chunk (on the server: 25 stalls, 4.6 s of silence in 20 s; here 62, 2.35 s); it now takes
    one short gap to reach 24-token hops and keeps them."""
    cost = lambda h: 0.13 + 0.015 * h  # noqa: E731
    run = _simulate(compute_s=cost, rate=42.9, n_tokens=860, chunk=12, first_hop=12, max_hop=96, buffer_s=0.3,
                    meter=_measured(cost, (12, 24) * 4))
    clock = run["clock"]
    # the first gap reaches the 24-token hop (0.16 s); then each chunk waits for tokens 0.4 % slower than its
    # audio (a few ms per chunk: what no start buffer avoids for good)
    assert clock.worst_stall_s < 0.2 and clock.stall_s < 0.5, clock
    assert all(h >= 24 for h in run["hops"][1:-1]), run["hops"]


def test_a_stream_with_slack_keeps_growing_its_hops() -> None:
    """Every hop faster than real time: no silence anywhere, so the largest hop that arrives in time, as before."""
    cost = lambda h: 0.06 + 0.0045 * h  # noqa: E731
    run = _simulate(compute_s=cost, rate=86.0, n_tokens=860, chunk=12, first_hop=12, max_hop=96,
                    meter=_measured(cost))
    assert run["clock"].stalls == 0 and max(run["hops"]) == 96


def test_compute_meter_fits_the_growth_with_history() -> None:
    """Exact attention makes a chunk's cost grow with the tokens before it: a + b * tokens + c * tokens * history.
    One history only (or none given): the line of before."""
    meter = ComputeMeter()
    for i, tokens in enumerate((12, 24, 36, 48) * 4):
        history = 64 + 40 * i
        meter.observe(tokens, 0.05 + 0.006 * tokens + 1.5e-5 * tokens * history, history)
    a, b, c, p95, median = meter._terms()
    assert (a, b, c) == (pytest.approx(0.05), pytest.approx(0.006), pytest.approx(1.5e-5))
    assert p95 == pytest.approx(1.0)
    assert median == pytest.approx(1.0)
    assert meter.seconds(12, 924) == pytest.approx(0.05 + 0.072 + 1.5e-5 * 12 * 924)
    flat = ComputeMeter()
    for tokens in (12, 24, 36, 48) * 2:
        flat.observe(tokens, 0.05 + 0.006 * tokens, 300)
    assert flat._terms()[2] == 0.0 and flat.seconds(100, 5000) == pytest.approx(0.65)


class _MeterWithoutHistory(ComputeMeter):
    """The meter as it was before it knew histories: every chunk as if it had the same one."""

    def observe(self, tokens: int, seconds: float, history: int = 0) -> None:
        super().observe(tokens, seconds, 0)

    def seconds(self, tokens: int, history: int | None = None, default_per_token: float = 0.02) -> float:
        return super().seconds(tokens, None, default_per_token)


def test_a_long_stream_after_short_ones_is_planned_for_its_dearer_chunks() -> None:
    """Short utterances fill the meter with cheap early chunks. A 20 s stream after them: its chunks get dearer
    with their history, up to where its first hop no longer keeps up (12 tokens: 0.29 s for 0.28 s of audio
    after 860 tokens). Planned with the growth, its buffer reaches a hop that keeps up and it never stalls;
    planned on the cheap chunks alone, it stalls chunk after chunk once they get dear."""
    cost = lambda h, history: 0.05 + 0.006 * h + 1.5e-5 * h * history  # noqa: E731
    demo = dict(compute_s=cost, rate=43.07, chunk=4, first_hop=12, max_hop=48, prompt=64)
    clocks = {}
    for name, meter in (("growth", ComputeMeter()), ("without", _MeterWithoutHistory())):
        for _ in range(5):
            _simulate(n_tokens=130, meter=meter, **demo)  # 3 s each
        clocks[name] = _simulate(n_tokens=860, meter=meter, **demo)["clock"]
    assert clocks["growth"].stalls == 0
    assert clocks["without"].stalls >= 5
    assert clocks["without"].start_buffer_s < clocks["growth"].start_buffer_s < 1.0


def _steady(rate: float, seconds: float, every_s: float = 0.05) -> RateMeter:
    """A producer at ``rate`` that sends the tokens due every ``every_s`` (whole tokens), for ``seconds``."""
    meter = RateMeter(prior=1 / AUDIO_PER_TOKEN)
    sent, t = 0, 0.0
    while t <= seconds + 1e-9:
        due = int(rate * t) + 1  # the first token at t = 0
        meter.arrived(t, due - sent)
        sent, t = due, t + every_s
    return meter


def test_a_producer_at_the_models_rate_is_not_read_as_slower() -> None:
    """Half a second of whole tokens at exactly the model's rate reads a few percent slow; as a shortfall over the
    10 s horizon that would add a quarter to half a second to the start buffer. The upper estimate (one token more)
    keeps it real time, and a producer that really is slower still reads slower."""
    real_time = 1 / AUDIO_PER_TOKEN
    exact = _steady(real_time, 0.5)
    assert exact.rate < 0.98 * real_time <= real_time <= exact.upper_rate
    meter = ComputeMeter()
    for h in (12, 24, 36, 48) * 2:
        meter.observe(h, 0.05 + 0.005 * h)
    kwargs = dict(first_hop=12, audio_s_per_token=AUDIO_PER_TOKEN, compute=meter, chunk=4, max_hop=48)
    planned = recommend_start_buffer(token_rate=exact.upper_rate, **kwargs)
    assert planned == pytest.approx(SAFETY_MARGIN_S)  # the first hop keeps up: the margin only
    assert recommend_start_buffer(token_rate=exact.rate, **kwargs) > planned + 0.2
    slow = _steady(0.85 * real_time, 0.5)
    assert slow.upper_rate < real_time
    assert recommend_start_buffer(token_rate=slow.upper_rate, **kwargs) > 1.0


def test_the_meter_keeps_other_hop_sizes_after_a_long_run_of_one() -> None:
    """A stream that kept one hop size for more than the meter's window: the last chunks of the other sizes are
    kept, so the fixed cost per call and the cost per token stay apart and a larger hop is costed as such (not
    in proportion to the one size, which made every larger hop look as slow and the next start buffer large)."""
    cost = lambda h: 0.1 + 0.01 * h  # noqa: E731
    meter = ComputeMeter()
    for h in (12, 24, 36) * 5:
        meter.observe(h, cost(h), 100)
    for _ in range(3 * meter.window):
        meter.observe(12, cost(12), 100)
    assert {t for t, _, _ in meter.samples} == {12}
    assert meter.seconds(36) == pytest.approx(cost(36))
    only_recent = ComputeMeter(per_size=0)
    for h in (12, 24, 36) * 5 + (12,) * (3 * meter.window):
        only_recent.observe(h, cost(h), 100)
    assert only_recent.seconds(36) == pytest.approx(3 * cost(12))  # what the window alone says


# Calibration-like chunks of the demo voice's shape (0.06 s + 10.7 ms per token, no growth with history) over the
# short histories a start-up measurement reaches, with a few percent of noise that happens to rise with history.
_NOISE = (1.00, 1.02, 0.98, 0.99, 0.98, 1.02, 1.04)
_SHORT = ((12, 12), (12, 24), (12, 36), (24, 12), (24, 36), (24, 60), (24, 84))  # (tokens, history)


def test_a_growth_the_samples_cannot_tell_from_noise_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unconstrained, these chunks fit a growth of 8.8e-6 s per token and history token (t = 1.8). Carried 20 s
    ahead, it prices the 12-token hop out (0.275 s for 0.265 s of audio less headroom) and the plan waits for a
    larger hop (0.71 s of buffer); left out, the hop keeps up and the margin is enough (0.12 s). The same noise
    over a long stream's histories shows a real growth, which is kept."""
    def meter(cost: callable, points: tuple) -> ComputeMeter:
        m = ComputeMeter()
        for (t, h), noise in zip(points, _NOISE * 4):
            m.observe(t, cost(t, h) * noise, h)
        return m

    flat = lambda t, h: 0.06 + 0.0107 * t  # noqa: E731
    plan = dict(first_hop=12, audio_s_per_token=AUDIO_PER_TOKEN, token_rate=1 / AUDIO_PER_TOKEN, chunk=12,
                max_hop=48, first_compute_s=flat(12, 0))
    short = meter(flat, _SHORT)
    assert short._terms()[2] == 0.0
    assert recommend_start_buffer(compute=short, **plan) < 0.25
    monkeypatch.setattr(pacing, "GROWTH_T", 0.0)  # any positive growth, as before
    spurious = meter(flat, _SHORT)
    assert spurious._terms()[2] == pytest.approx(8.75e-6, rel=0.01)
    assert recommend_start_buffer(compute=spurious, **plan) > 0.6  # 0.71 s: the wait for the 24-token hop
    monkeypatch.undo()
    growing = lambda t, h: 0.06 + 0.0107 * t + 8e-6 * t * h  # noqa: E731
    long = meter(growing, [(t, h) for h in range(12, 900, 36) for t in (12, 24)][:28])
    assert long._terms()[2] == pytest.approx(8e-6, rel=0.25)


# A start-up calibration of the demo voice on a 2-core AVX2 VM (Batcher.calibrate, as the server runs it): flow-only
# chunks of 50 tokens over 10 s of history with the vocoder's cost added, then audio chunks of 25 and 50 tokens
# (tokens, seconds, history). The machine's noise leaves its growth 2.4 standard errors above zero.
_AVX2_CALIBRATION = ((50, 0.911, 25), (50, 0.924, 75), (50, 0.953, 125), (50, 0.994, 175), (50, 1.039, 225),
                     (50, 1.161, 275), (50, 1.037, 325), (50, 1.022, 375), (50, 0.951, 425), (25, 0.492, 25),
                     (25, 0.446, 50), (25, 0.474, 75), (25, 0.519, 100), (25, 0.585, 125), (25, 0.578, 150),
                     (50, 0.887, 25), (50, 0.948, 75))


def test_a_growth_measured_over_ten_seconds_of_history_is_kept() -> None:
    """Left out (at three standard errors, the rule before), the plan for the first stream after a start assumed
    no growth: a 24-token chunk 20 s into a stream at 0.49 s, where the server's streams measured 0.64-0.68 s for
    0.56 s of audio, and the stream stalled. Kept, the 20 s plan prices it at about 0.63 s."""
    meter = ComputeMeter()
    for sample in _AVX2_CALIBRATION:
        meter.observe(*sample)
    a, b, c, _, _ = meter._terms()
    assert c == pytest.approx(7.5e-6, rel=0.02)
    assert meter.seconds(24, 880) == pytest.approx(0.63, abs=0.01)
    assert meter.seconds(24, 880) > 24 * AUDIO_PER_TOKEN  # slower than real time, 20 s into a stream


def test_the_start_buffer_is_costed_against_the_first_chunks_measured_time() -> None:
    """Playback starts when the first chunk is delivered, so each later chunk has its own cost less the first
    one's to make up: a first chunk cheaper than the steady ones (a stream's first 12 demo tokens: 0.13 s, the
    next ones 0.17-0.2 s) needs that much more buffer; one that took longer earns no more than the estimate (the
    chunks behind it run back to back)."""
    meter = _measured(lambda h: 0.06 + 0.0107 * h, hops=(12, 24) * 3)
    kwargs = dict(first_hop=12, audio_s_per_token=AUDIO_PER_TOKEN, token_rate=1 / AUDIO_PER_TOKEN, compute=meter,
                  chunk=12, max_hop=48)
    steady = meter.seconds(12, 0)
    assert recommend_start_buffer(**kwargs) == pytest.approx(SAFETY_MARGIN_S)  # estimated: the steady cost
    assert recommend_start_buffer(first_compute_s=steady - 0.05, **kwargs) == pytest.approx(SAFETY_MARGIN_S + 0.05)
    assert recommend_start_buffer(first_compute_s=steady + 0.05, **kwargs) == pytest.approx(SAFETY_MARGIN_S)
    spread = ComputeMeter()  # the same chunks, 20 % apart: p95 over the fit above 1
    for i, h in enumerate((12, 24) * 4):
        spread.observe(h, (0.06 + 0.0107 * h) * (0.9 if i % 4 < 2 else 1.1))
    kwargs["compute"] = spread
    estimated = recommend_start_buffer(**kwargs)
    assert estimated > SAFETY_MARGIN_S + 0.01
    assert recommend_start_buffer(first_compute_s=spread.seconds(12, 0) + 1.0, **kwargs) == pytest.approx(estimated)


def test_one_off_slow_chunks_are_covered_by_the_buffer_not_priced_as_a_rate() -> None:
    """Every 16th chunk takes 60 % longer (a VM's hiccups), so the p95 of observed / fitted is about 1.5. Priced at
    its p95, the 12-token hop (0.19 s for 0.28 s of audio) looked slower than real time and no hop kept up; it
    keeps up at its typical cost, and the buffer covers one slow chunk: no stall, and a buffer far below a
    second."""
    calls = []

    def jittery(h: int) -> float:
        calls.append(h)
        return (0.06 + 0.0107 * h) * (1.6 if len(calls) % 16 == 0 else 1.0)

    warm = ComputeMeter()
    for _ in range(2):
        for h in (12, 24) * 8:
            warm.observe(h, jittery(h))
    assert warm.p95_ratio() > 1.4 and warm.typical_ratio() == pytest.approx(1.0, abs=0.05)
    run = _simulate(compute_s=jittery, rate=43.07, n_tokens=860, chunk=12, first_hop=12, max_hop=48, meter=warm)
    assert run["clock"].stalls == 0, run["clock"]
    assert run["clock"].start_buffer_s < 0.4


def test_least_squares_gives_the_textbook_standard_error() -> None:
    """The growth test needs the last coefficient's standard error, sqrt(sigma^2 (X'X)^-1), with sigma^2 the
    residual sum of squares over n - k; numpy's lstsq and inverse give the expected values."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    y = x @ np.array([1.0, 2.0, 0.5]) + rng.normal(scale=0.3, size=20)
    coef, se = pacing._least_squares(x.tolist(), y.tolist())
    expected = np.linalg.lstsq(x, y, rcond=None)[0]
    residual = y - x @ expected
    cov = residual @ residual / (20 - 3) * np.linalg.inv(x.T @ x)
    assert coef == pytest.approx(expected.tolist(), rel=1e-9)
    assert se == pytest.approx(float(np.sqrt(cov[2, 2])), rel=1e-9)
    assert pacing._least_squares(x[:3].tolist(), y[:3].tolist())[1] == 0.0  # no residual degrees of freedom


def test_call_meter_fits_a_calls_fixed_cost_and_its_cost_per_audio_second() -> None:
    """Calls of 1 and 2 s of audio at 0.1 s + 0.05 s per audio second (a mid-size CosyVoice 3 call's shape):
    the fit gives both terms back, throughput is the audio over the wall time, and the bound of a chunk behind
    other streams' is their calls' fixed costs plus all the audio."""
    meter = pacing.CallMeter()
    for audio in (1.0, 2.0) * 3 + (1.0,):
        meter.observe(0.1 + 0.05 * audio, audio)
    assert meter.fit() is None and meter.throughput() is None and meter.chunk_bound_s(1.0, 7, 16) is None  # 7 calls
    meter.observe(0.2, 2.0)
    fixed, per_audio, p95 = meter.fit()
    assert fixed == pytest.approx(0.1) and per_audio == pytest.approx(0.05) and p95 == pytest.approx(1.0)
    assert meter.throughput() == pytest.approx(12.0 / (8 * 0.1 + 0.05 * 12.0))
    # 7 others, calls of 16 rows: one call for theirs, one for its own; 8 chunks of 1 s of audio
    assert meter.chunk_bound_s(1.0, 7, 16) == pytest.approx(2 * 0.1 + 0.05 * 8)
    assert meter.chunk_bound_s(1.0, 7, 1) == pytest.approx(8 * (0.1 + 0.05))  # one row per call: 8 calls
    assert meter.chunk_bound_s(1.0, 0, 16) == pytest.approx(0.15)
    # one call in ten 1.5x its fitted time: the 95th percentile of observed / fitted scales the bound
    slow = pacing.CallMeter()
    for i in range(20):
        audio = 1.0 + i % 2
        slow.observe((0.1 + 0.05 * audio) * (1.5 if i % 10 == 9 else 1.0), audio)
    assert slow.fit()[2] > 1.3
    assert slow.chunk_bound_s(1.0, 7, 16) == pytest.approx(slow.fit()[2] * (2 * slow.fit()[0] + 8 * slow.fit()[1]))
    for bad in (0.0, -1.0, math.nan, math.inf):
        slow.observe(bad, 1.0)
        slow.observe(1.0, bad)
    slow.observe(1.0, 1.0, rows=0)
    assert len(slow.calls) == 20
    # priced 1.25x (calls measured after short histories standing for a stream's dearer ones): the fixed cost and
    # the cost per audio second scale alike, the spread does not, the throughput falls by as much
    before, fit = slow.throughput(), slow.fit()
    slow.reprice(1.25)
    assert slow.fit() == pytest.approx((1.25 * fit[0], 1.25 * fit[1], fit[2]))
    assert slow.throughput() == pytest.approx(before / 1.25)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="factor must be a positive finite number"):
            slow.reprice(bad)


def test_call_meter_capacity_grows_with_the_rows_a_call_would_hold() -> None:
    """Calls of one and four rows of 0.75 s of audio, at 0.1 s + 0.08 s per audio second: with more streams a busy
    batcher puts more rows in a call and computes more audio per second (5 rows: 3.75 / 0.4 s = 9.4 audio s/s),
    bounded by 1 / 0.08 = 12.5; carried at most one row past the largest call seen; never less than measured."""
    meter = pacing.CallMeter()
    for i in range(8):
        rows = 4 if i % 2 else 1
        meter.observe(0.1 + 0.08 * 0.75 * rows, 0.75 * rows, rows=rows)
    assert meter.throughput() == pytest.approx(15.0 / (0.8 + 0.08 * 15.0))
    assert meter.throughput_at(1) == pytest.approx(meter.throughput())  # the measured mix beats one row alone
    assert meter.throughput_at(5) == pytest.approx(5 * 0.75 / (0.1 + 0.08 * 5 * 0.75))
    assert meter.throughput_at(16) == meter.throughput_at(5) < 1 / 0.08  # four rows seen: five at most
    assert meter.throughput_at(0) == meter.throughput_at(1)
    assert pacing.CallMeter().throughput_at(8) is None


def _burst(n_streams: int, *, bounded: bool, fixed: float = 0.1, per_audio: float = 0.05) -> list[PlaybackClock]:
    """``n_streams`` streams of 10 s start within 0.5 s of each other on one worker that computes every ready row
    in one call of ``fixed + per_audio * audio`` s, up to 20 % longer at random (a trained chunk of 25 tokens at
    25 tokens/s, look-ahead 3). Each listener's start buffer is recommended when its first chunk arrives, from a
    meter that saw only a lone stream's chunks, with (``bounded``) or without the call meter's bound for a chunk
    behind the others'."""
    hop, rate, aspt, look, n_tokens = 25, 25.0, 0.04, 3, 250
    rng = random.Random(0)

    def call_s(audio: float) -> float:
        return (fixed + per_audio * audio) * (1.0 + 0.2 * rng.random())

    lone = ComputeMeter()
    calls = pacing.CallMeter()
    for h in (25, 50) * 8:  # what a lone stream measured (a calibration: single rows of two sizes)
        took = call_s(h * aspt)
        lone.observe(h, took, 100)
        calls.observe(took, h * aspt)
    offsets = [0.5 * i / n_streams for i in range(n_streams)]
    ready = sorted((o + min((k + 1) * hop + look, n_tokens) / rate, i, k)  # ready when its tokens have arrived
                   for i, o in enumerate(offsets) for k in range(n_tokens // hop))
    delivered: dict[tuple[int, int], float] = {}
    free = 0.0
    while ready:
        start = max(free, ready[0][0])
        batch = [r for r in ready if r[0] <= start]
        ready = [r for r in ready if r[0] > start]
        free = start + call_s(len(batch) * hop * aspt)
        for _ready_at, i, k in batch:
            delivered[(i, k)] = free
    clocks = []
    for i in range(n_streams):
        first_s = delivered[(i, 0)] - (offsets[i] + (hop + look) / rate)
        buffer = recommend_start_buffer(
            first_hop=hop, audio_s_per_token=aspt, token_rate=rate, compute=lone, chunk=hop, max_hop=hop,
            history=100, first_compute_s=first_s,
            loaded_s=(lambda h: calls.chunk_bound_s(h * aspt, n_streams - 1, 16)) if bounded else None)
        clock = PlaybackClock(start_buffer_s=buffer)
        for k in range(n_tokens // hop):
            clock.deliver(delivered[(i, k)], hop * aspt)
        clocks.append(clock)
    return clocks


def test_streams_that_start_together_are_buffered_for_the_load_they_make() -> None:
    """Eight streams start within 0.5 s (what a load test does, and a burst of callers): the first one's first
    chunk is computed alone, its later ones wait behind the others'. The worker is busy most of each second
    (eight chunks at 0.08 s per audio second, plus fixed costs). Recommended from a lone stream's meter, every
    buffer is the margin and streams stall (worst 206 ms); with the bound of a chunk behind the seven others'
    (two calls' fixed costs and eight chunks' audio, times the calls' spread) none stalls, and no buffer exceeds
    that bound plus the margin."""
    unbounded = _burst(8, bounded=False, per_audio=0.08)
    assert sum(c.stalls for c in unbounded) > 0 and max(c.worst_stall_s for c in unbounded) > 0.1
    bounded = _burst(8, bounded=True, per_audio=0.08)
    assert sum(c.stalls for c in bounded) == 0, [c.worst_stall_s for c in bounded]
    assert max(c.start_buffer_s for c in bounded) <= 1.2 * (2 * 0.1 + 0.08 * 8) + SAFETY_MARGIN_S
    # a lone stream: no other stream's chunk to wait for, the recommendation is the meter's alone
    assert _burst(1, bounded=True)[0].start_buffer_s == _burst(1, bounded=False)[0].start_buffer_s
