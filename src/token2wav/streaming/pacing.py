"""The listener's clock: when a stream's audio runs dry, which hop to emit next, and how much to buffer.

Everything here is arithmetic on times the caller passes in (seconds on any monotonic clock), so it is tested
on a simulated clock without a model.

* ``PlaybackClock``: the listener plays from the first chunk's delivery plus its start buffer, without pause;
  each chunk delivered later than the audio before it ends is a stall (the listener hears silence).
  ``dry_at`` is when the audio delivered so far runs out.
* ``RateMeter``: tokens per second arriving from the caller (the LLM), measured.
* ``ComputeMeter``: seconds a chunk of ``h`` tokens takes from submission to delivery on this model at the current
  load (queueing included), fitted as ``a + b * h + c * h * history`` over recent chunks (a chunk attends to
  the tokens before it).
* ``CallMeter``: a scheduler's calls, wall time against audio, fitted as a fixed cost plus a cost per audio
  second: the audio it computes per second (admission's capacity) and how long a chunk can wait behind other
  streams' chunks (a start buffer's bound).
* ``choose_hop``: the ``adaptive`` schedule. The smallest valid hop while there is no audio (first audio comes
  early); then the largest hop whose tokens (at the measured rate) plus its compute still arrive before the
  audio runs dry, with a margin, so hops grow with slack (fewer, larger calls) and shrink when it runs short;
  a stream that fell behind anyway moves to a hop that keeps up rather than the smallest one.
* ``recommend_start_buffer``: the audio a client should buffer before playing, from the same quantities.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["CallMeter", "ComputeMeter", "PlaybackClock", "RateMeter", "choose_hop", "recommend_start_buffer",
           "HEADROOM", "PLAN_S", "SAFETY_MARGIN_S"]

# Kept between a chunk's expected delivery (p95 compute) and the moment the listener would run dry: scheduling
# noise (thread wake-ups, the event loop, the network on a LAN) and chunks slower than their p95. Measured on a
# shared 2-core VM, demo voice: with 0.08 s, 2 of 7 streams of 20 s stalled once (29 and 40 ms); with 0.12 s, 0 of 8.
SAFETY_MARGIN_S = 0.12

# The speech a recommended start buffer is planned for: the hop it reaches must keep up this far into the stream,
# where chunks attend to a longer history (a typical utterance is shorter; longer streams go on with the slack
# they have, and the adaptive schedule then moves to larger hops where it can).
PLAN_S = 20.0

# The share of its audio a hop's typical compute must leave free to count as keeping up (in a recommendation and in
# the adaptive schedule): a hop whose chunks take all of their audio never wins back what a chunk slower than its
# p95 loses. (Added for 0.16 s buffers that stalled 2 demo streams of 8; those were later traced to the 147 ms
# the vocoder holds back, which the session now adds, see StreamSession.vocoder_lag_s. It stays as a margin.)
HEADROOM = 0.05

# How many standard errors a fitted growth with history must stand above zero to be used (see _growth_fit). Three
# was set when a start-up calibration reached histories of 84 tokens; since it measures over 10 s of history, a
# real growth stands 2.4-4.2 standard errors up on a noisy 2-core AVX2 VM (three calibrations of the demo voice:
# 7.0e-6, 9.8e-6 and 7.5e-6 s per token per token of history), and three dropped the one at 2.4: the first stream
# was then planned with no growth at all and stalled. The spurious growth of short histories stands at 1.8.
GROWTH_T = 2.0


@dataclass
class PlaybackClock:
    """What the listener hears: playback starts ``start_buffer_s`` after the first chunk's delivery."""

    start_buffer_s: float = 0.0
    first_at: float | None = None  # when the first audio arrived
    play_start: float | None = None
    audio_s: float = 0.0  # audio delivered so far
    stall_s: float = 0.0  # silence heard so far (sum of stalls)
    worst_stall_s: float = 0.0
    stalls: int = 0
    # the least audio left to play when a later chunk arrived (negative: a stall that long): how much of the start
    # buffer the stream did not need; inf until a second chunk
    least_slack_s: float = math.inf

    def deliver(self, now: float, seconds: float) -> float:
        """A chunk of ``seconds`` of audio reaches the listener at ``now``; returns the stall it causes (0 if none).
        An empty chunk plays nothing: it is never a stall."""
        if seconds <= 0:
            return 0.0
        gap = 0.0
        if self.play_start is None:
            self.first_at = now
            self.play_start = now + self.start_buffer_s
        else:
            end = self.dry_at
            self.least_slack_s = min(self.least_slack_s, end - now)
            if now > end:  # the listener has been hearing silence since `end`
                gap = now - end
                self.stall_s += gap
                self.stalls += 1
                self.worst_stall_s = max(self.worst_stall_s, gap)
        self.audio_s += seconds
        return gap

    def buffering(self, now: float) -> bool:
        """Whether playback has not started yet at ``now``."""
        return self.play_start is None or now < self.play_start

    def recommend(self, now: float, start_buffer_s: float) -> None:
        """A newer start buffer, known at ``now``: used if playback has not started by then (it then starts
        ``start_buffer_s`` after the first audio, or at once if that time has passed; ``start_buffer_s`` becomes
        the buffer actually used)."""
        if not self.buffering(now):
            return
        self.start_buffer_s = float(start_buffer_s)
        if self.first_at is not None:
            self.play_start = max(now, self.first_at + self.start_buffer_s)
            self.start_buffer_s = self.play_start - self.first_at

    def complete(self, now: float) -> None:
        """The stream's last audio has arrived by ``now``: a listener still buffering starts at once, whatever its
        start buffer asked for, since nothing is left to wait for (a slow machine's recommendation covers a long
        stream; a short utterance would otherwise sit in silence). The buffer actually used becomes
        ``start_buffer_s``."""
        if self.first_at is not None and self.buffering(now):
            self.play_start = max(now, self.first_at)
            self.start_buffer_s = self.play_start - self.first_at

    @property
    def started(self) -> bool:
        return self.play_start is not None

    @property
    def dry_at(self) -> float:
        """When the audio delivered so far has all been played (inf before the first chunk)."""
        if self.play_start is None:
            return math.inf
        return self.play_start + self.audio_s + self.stall_s

    def slack(self, now: float) -> float:
        return self.dry_at - now


@dataclass
class RateMeter:
    """Tokens per second arriving, over the stream so far (the first arrival starts the clock)."""

    prior: float  # assumed until a rate is measurable: the model's own token rate (a real-time LLM)
    first_at: float | None = None
    last_at: float | None = None
    tokens_after_first: int = 0

    def arrived(self, now: float, n: int) -> None:
        if n <= 0:
            return
        if self.first_at is None:
            self.first_at = now
        else:
            self.tokens_after_first += n
        self.last_at = now if self.last_at is None else max(self.last_at, now)  # arrival times may repeat

    @property
    def rate(self) -> float:
        """Tokens per second; over less than 0.2 s of arrivals, at least the prior (a burst may be a fast LLM, or
        just one message split in pieces)."""
        if self.first_at is None or self.last_at is None:
            return self.prior
        span = self.last_at - self.first_at
        if span >= 0.2:
            return self.tokens_after_first / span
        if span <= 0 or self.tokens_after_first == 0:
            return self.prior
        return max(self.prior, self.tokens_after_first / span)  # a burst: at least the prior

    @property
    def upper_rate(self) -> float:
        """The highest rate the arrivals so far are consistent with: tokens come whole, so a steady producer may
        be up to one token further along than counted. Over the first second that is a few percent, enough to
        read a producer at exactly the model's rate as slower than real time (whose shortfall a start buffer
        would then be sized for). At least ``rate``."""
        if self.first_at is None or self.last_at is None:
            return self.prior
        span = self.last_at - self.first_at
        if span < 0.2 or self.tokens_after_first == 0:
            return self.rate
        return (self.tokens_after_first + 1) / span


@dataclass
class ComputeMeter:
    """Seconds from a chunk's submission to its delivery, over the last ``window`` chunks, as
    ``a + b * tokens + c * tokens * history``: a call's fixed cost, a cost per token, and exact attention's cost of
    each new token against the ``history`` (tokens before the chunk: its prompt and earlier chunks), which makes
    a stream's chunks dearer as it goes. Where the samples cannot tell the last term apart (one history, or a
    negative fit) it is left out: ``a + b * tokens``.

    The last ``per_size`` chunks of every other hop size seen lately are kept too: a stream that kept one hop
    size for more than ``window`` chunks would otherwise leave a meter that cannot tell a call's fixed cost from
    its per-token cost, and so cannot cost any other hop (the next stream's start buffer then covered the worst
    case: measured 1.65-2.42 s against 0.46-0.73 s).

    The fit and its spread are computed once per observation, not per question: the scheduler asks for every
    queued row and the adaptive schedule for every candidate hop."""

    window: int = 32
    samples: deque = field(default_factory=deque)  # (tokens, seconds, history), the last ``window``
    per_size: int = 4
    max_sizes: int = 16
    _by_size: dict = field(default_factory=dict)  # tokens -> deque of its last ``per_size`` samples (LRU order)
    _fit: tuple[float, float, float, float, float] | None = None  # (a, b, c, p95 and median of observed / fitted)

    def observe(self, tokens: int, seconds: float, history: int = 0) -> None:
        if tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        sample = (tokens, seconds, max(0, int(history)))
        self.samples.append(sample)
        while len(self.samples) > self.window:
            self.samples.popleft()
        kept = self._by_size.pop(tokens, None) or deque(maxlen=self.per_size)
        kept.append(sample)
        self._by_size[tokens] = kept  # most recently seen size last
        while len(self._by_size) > self.max_sizes:
            del self._by_size[next(iter(self._by_size))]
        self._fit = None

    def _fitted_samples(self) -> list[tuple[int, float, int]]:
        """The last ``window`` chunks, and the kept chunks of the sizes they do not include."""
        recent = {t for t, _, _ in self.samples}
        older = [x for size, kept in self._by_size.items() if size not in recent for x in kept]
        return older + list(self.samples)

    def _terms(self) -> tuple[float, float, float, float, float]:
        """The fitted ``(a, b, c)``, and the 95th percentile and the median of observed / fitted time."""
        if self._fit is None:
            fitted = self._fitted_samples()
            a, b, c = _growth_fit(fitted) or (*_line_fit(fitted), 0.0)
            p95 = median = 1.5  # too few chunks to measure the spread: assume half again
            if self.measured:  # the spread of the recent chunks
                ratios = sorted(y / max(a + b * x + c * x * h, 1e-6) for x, y, h in self.samples)
                p95 = _p95_ratio(ratios)
                median = ratios[len(ratios) // 2]
            self._fit = (a, b, c, p95, median)
        return self._fit

    def seconds(self, tokens: int, history: int | None = None, default_per_token: float = 0.02) -> float:
        """Expected seconds for a chunk of ``tokens`` after ``history`` tokens (default: the measured chunks'
        mean history), or ``default_per_token`` each before any chunk was measured."""
        if not self.samples:
            return default_per_token * tokens
        a, b, c, _, _ = self._terms()
        if history is None:
            history = sum(h for _, _, h in self.samples) / len(self.samples)
        return a + b * tokens + c * tokens * history

    @property
    def measured(self) -> bool:
        """Whether enough chunks were measured for the spread (``p95_ratio``) to be observed, not assumed."""
        return len(self.samples) >= 4

    def snapshot(self) -> ComputeMeter:
        """A copy that later observations leave as it is: what a stream expected when it started."""
        return ComputeMeter(window=self.window, samples=deque(self.samples), per_size=self.per_size,
                            max_sizes=self.max_sizes,
                            _by_size={k: deque(v, maxlen=v.maxlen) for k, v in self._by_size.items()}, _fit=self._fit)

    def p95_ratio(self) -> float:
        """The 95th percentile of observed / fitted time: how much slower than expected a chunk can be."""
        return self._terms()[3] if self.samples else 1.5

    def typical_ratio(self) -> float:
        """The median of observed / fitted time: what a hop's chunks cost as a rate (whether it keeps up); a
        chunk up to ``p95_ratio`` slower is a one-off that the listener's buffer covers."""
        return self._terms()[4] if self.samples else 1.5


@dataclass
class CallMeter:
    """Wall seconds of a scheduler's recent calls against the audio seconds each computed, fitted as
    ``fixed + per_audio * audio``. It answers how much audio the calls compute per second (``throughput``, and
    ``throughput_at`` for calls of more rows), and how long a chunk can take, waiting included, when other
    streams' chunks go before it or share its call (``chunk_bound_s``). A stream's own meter (``ComputeMeter``)
    measures the load as it was; when several streams start together, their first chunks see a load that no
    meter has seen yet (measured on mid-size CosyVoice 3, 8 batched streams after a run of 4: start buffers of
    0.2 s, stalls up to 213 ms)."""

    window: int = 64
    calls: deque = field(default_factory=deque)  # (wall seconds, audio seconds, rows), the last ``window``
    _fit: tuple[float, float, float] | None = None  # (fixed, per_audio, p95 of observed / fitted)

    MIN_CALLS = 8  # fewer measure nothing

    def observe(self, wall_s: float, audio_s: float, rows: int = 1) -> None:
        if not (math.isfinite(wall_s) and wall_s > 0 and math.isfinite(audio_s) and audio_s > 0 and rows >= 1):
            return
        self.calls.append((wall_s, audio_s, int(rows)))
        while len(self.calls) > self.window:
            self.calls.popleft()
        self._fit = None

    def clear(self) -> None:
        self.calls.clear()
        self._fit = None

    def reprice(self, factor: float) -> None:
        """Scale every measured call's wall time by ``factor`` (> 0): calls measured where chunks were cheaper
        than a stream's will be (short histories) stand for the dearer ones."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be a positive finite number, got {factor!r}")
        self.calls = deque((w * factor, a, r) for w, a, r in self.calls)
        self._fit = None

    @property
    def measured(self) -> bool:
        return len(self.calls) >= self.MIN_CALLS

    def throughput(self) -> float | None:
        """Audio seconds per wall second of the calls measured (None under ``MIN_CALLS``)."""
        if not self.measured:
            return None
        return sum(a for _, a, _ in self.calls) / sum(w for w, _, _ in self.calls)

    def throughput_at(self, rows: int) -> float | None:
        """Audio seconds per wall second of calls of ``rows`` rows of the mean size measured, from the fit: a
        busier scheduler puts more rows in a call and pays its fixed cost fewer times per audio second. Carried
        at most one row past the largest call measured: the line fitted to small calls underprices large ones
        (mid-size CosyVoice 3 on 2 cores, carried as far as the streams went: 12.9 audio s/s read with 12 streams
        open, and 7 of the 12 admitted stalled). At least the throughput measured (None under ``MIN_CALLS``)."""
        terms = self.fit()
        if terms is None:
            return None
        fixed, per_audio, _ = terms
        row_audio = sum(a for _, a, _ in self.calls) / sum(r for _, _, r in self.calls)
        audio = max(1, min(rows, max(r for _, _, r in self.calls) + 1)) * row_audio
        return max(self.throughput() or 0.0, audio / max(fixed + per_audio * audio, 1e-9))

    def fit(self) -> tuple[float, float, float] | None:
        """``(fixed, per_audio, p95)``: least squares over the calls when their sizes tell the first two apart
        (else through the origin, the fixed cost spread over the sizes seen), and the 95th percentile of
        observed over fitted wall time (at least 1); None under ``MIN_CALLS``."""
        if not self.measured:
            return None
        if self._fit is None:
            fixed, per_audio = _line_fit([(a, w, 0) for w, a, _ in self.calls])
            ratios = sorted(w / max(fixed + per_audio * a, 1e-9) for w, a, _ in self.calls)
            self._fit = fixed, per_audio, _p95_ratio(ratios)
        return self._fit

    def chunk_bound_s(self, audio_s: float, others: int, max_batch: int) -> float | None:
        """The longest a chunk of ``audio_s`` waits and computes when a chunk of the same size from each of
        ``others`` streams is ahead of it or beside it, in calls of at most ``max_batch`` rows: their calls
        first, then its own, ``(ceil(others / max_batch) + 1)`` fixed costs and ``others + 1`` chunks' audio,
        times the calls' p95 spread. None before calls were measured."""
        terms = self.fit()
        if terms is None:
            return None
        fixed, per_audio, p95 = terms
        calls = -(-max(0, others) // max(1, max_batch)) + 1
        return p95 * (calls * fixed + per_audio * (max(0, others) + 1) * audio_s)


def _p95_ratio(ratios: Sequence[float]) -> float:
    """The 95th percentile of sorted observed / fitted ratios, at least 1 (a fit is never read as pessimistic)."""
    return max(1.0, ratios[min(len(ratios) - 1, int(0.95 * len(ratios)))])


def _line_fit(samples: Sequence[tuple[float, float, int]]) -> tuple[float, float]:
    """Least squares ``a + b * size`` (through the origin when the samples all had one size, or when the line
    would go negative)."""
    xs = [t for t, _, _ in samples]
    ys = [s for _, s, _ in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var > 0:
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
        if slope >= 0 and my - slope * mx >= 0:
            return my - slope * mx, slope
    return 0.0, my / mx


def _growth_fit(samples: Sequence[tuple[int, float, int]]) -> tuple[float, float, float] | None:
    """Least squares (relative) ``a + b * tokens + c * tokens * history`` with every term >= 0 and a growth
    (c > 0) that the samples show beyond their noise, or None. Tried without the fixed cost too (a = 0) when the
    full fit makes a term negative."""
    if len(samples) < 4 or len({h for _, _, h in samples}) < 3 or min(s for _, s, _ in samples) <= 0:
        return None
    # relative errors (each row divided by its observed time): the plan asks how far a hop is from its audio, a
    # ratio, and absolute least squares let a few large chunks set the line, leaving the small hops 10-20 %
    # off (measured on the steady chunks of three demo streams: hop 12 observed 0.152-0.16 s early on, fitted
    # 0.171 s absolute, 0.151 s relative)
    rows = [(1.0 / s, t / s, t * h / 1000.0 / s) for t, s, h in samples]  # history per 1000 tokens: a sane scale
    ys = [1.0] * len(samples)
    for used in ((0, 1, 2), (1, 2)):
        fitted = _least_squares([[r[i] for i in used] for r in rows], ys)
        if fitted is None:
            continue
        coef, growth_se = fitted
        if any(v < 0 for v in coef) or coef[-1] <= 0:
            continue
        # The plan extrapolates the growth far past the histories seen (PLAN_S of speech): a growth drawn from
        # noise is then worse than none. Measured: the chunks of a start-up calibration (histories 12-84 tokens,
        # 5 % noise) fitted three times a 20 s stream's growth and recommended 4.5 s where 0.3 s was enough.
        if coef[-1] < GROWTH_T * growth_se:
            return None
        full = dict(zip(used, coef))
        return full.get(0, 0.0), full.get(1, 0.0), full.get(2, 0.0) / 1000.0
    return None


def _least_squares(rows: list[list[float]], ys: list[float]) -> tuple[list[float], float] | None:
    """Solve a small least-squares problem by its normal equations (Gauss-Jordan elimination): the coefficients
    and the standard error of the last one (from the residuals; 0 when there are too few rows to tell), or None
    if singular."""
    k = len(rows[0])
    # the normal matrix with two right-hand sides: X'y (the coefficients) and the last unit vector (the inverse's
    # last column, whose last entry scales the last coefficient's variance)
    m = [[sum(r[i] * r[j] for r in rows) for j in range(k)]
         + [sum(r[i] * y for r, y in zip(rows, ys)), 1.0 if i == k - 1 else 0.0] for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(m[r][col]))
        scale = max(abs(m[r][col]) for r in range(k)) or 1.0
        if abs(m[pivot][col]) <= 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(k):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    coef = [m[i][k] / m[i][i] for i in range(k)]
    dof = len(rows) - k
    if dof <= 0:
        return coef, 0.0
    residual = sum((y - sum(c * x for c, x in zip(coef, r))) ** 2 for r, y in zip(rows, ys))
    return coef, math.sqrt(max(0.0, residual / dof * m[k - 1][k + 1] / m[k - 1][k - 1]))


def choose_hop(*, chunk: int, first_hop: int, max_hop: int, offset: int, available: int, lookahead: int,
               now: float, dry_at: float, token_rate: float, compute: ComputeMeter,
               audio_s_per_token: float, margin_s: float = SAFETY_MARGIN_S,
               horizon_s: float = 10.0, history: int | None = None) -> int:
    """The next emission's hop (tokens) under the adaptive schedule; hops are multiples of ``chunk`` (the
    session's chunk; one token on run-time-chunk models would break chunk-causal equality, so not less).

    ``first_hop``: the smallest hop (the first emission's, pad included, uses it before any audio exists).
    While no audio was delivered (``dry_at`` is inf) the smallest hop is taken. Then the largest hop whose
    tokens arrive (at ``token_rate``) and whose chunk is computed (p95) before ``dry_at - margin_s``, so hops
    grow with slack; the smallest hop when none does.

    Unless the stream is behind (not even the smallest hop arrives in time), or the hop that rule takes does not
    keep up with its compute while another does (its typical compute, the median of observed over fitted times,
    leaves ``HEADROOM`` of its audio free): then each hop is scored by the silence the listener would hear over
    the next ``horizon_s`` seconds of audio if the stream kept it (the gap before this chunk arrives, plus what
    the hop loses at every later call, to its compute or to tokens slower than real time, less the slack left
    after this chunk), and the least silence wins (among hops that cost none, the largest). Small hops carry a
    call's fixed cost: a stream that fell behind moves to a hop that keeps up, instead of repeating a small hop
    that stalls chunk after chunk. Whether a hop keeps up is judged on its compute alone: the token rate weighs
    on every hop alike (a hop of ``h`` tokens waits ``h / token_rate`` for ``h`` tokens of audio), and a producer at
    exactly the model's rate reads a hair slower than it (42.8-42.9 tokens/s for 43.07 on the server), which
    once made every hop count as falling behind, so that a stream that fell behind kept its smallest hop and
    stalled at every chunk (demo voice on a 2-core AVX2 CPU: 25 stalls, 4.6 s of silence in 20 s). While the
    meter has seen one hop size only it cannot tell a fixed cost: every hop then costs the same per token, and
    the score takes the smallest. ``history``: the tokens the next chunk attends to before its own (see
    ``ComputeMeter``).
    """
    if not math.isfinite(dry_at):
        return first_hop
    slow, typical = compute.p95_ratio(), compute.typical_ratio()
    # (hop, slack after its chunk arrives (negative: a gap), silence lost per second of audio, whether its compute
    # keeps up)
    scored: list[tuple[int, float, float, bool]] = []
    for h in range(first_hop, max(first_hop, max_hop) + 1, chunk):
        missing = max(0, offset + h + lookahead - available)
        wait = 0.0 if missing == 0 else (missing / token_rate if token_rate > 0 else math.inf)
        fitted = compute.seconds(h, history)
        audio = h * audio_s_per_token
        # keeping up: a typical chunk leaves HEADROOM of its audio free (else what a slow chunk loses is never won
        # back); one up to the p95 is a one-off, which the slack covers
        rate_s = typical * fitted / (1.0 - HEADROOM)
        tokens_s = h / token_rate if token_rate > 0 else math.inf
        behind = max(0.0, max(rate_s, tokens_s) / audio - 1.0)
        scored.append((h, dry_at - (now + wait + slow * fitted + margin_s), behind, rate_s <= audio))
    in_time = first_hop
    for h, slack, _, _ in scored:
        if slack < 0:
            break
        in_time = h
    keeps_up = {h for h, _, _, computed in scored if computed}
    if scored[0][1] >= 0 and (not keeps_up or in_time in keeps_up):
        return in_time

    def silence(item: tuple[int, float, float, bool]) -> float:
        _, slack, behind, _ = item
        return max(0.0, -slack) + max(0.0, behind * horizon_s - max(0.0, slack))

    least = min(silence(item) for item in scored)
    tied = [item[0] for item in scored if silence(item) == least]
    return max(tied) if least == 0.0 else min(tied)


def recommend_start_buffer(*, first_hop: int, audio_s_per_token: float, token_rate: float, compute: ComputeMeter,
                           chunk: int | None = None, max_hop: int | None = None, horizon_s: float = 10.0,
                           margin_s: float = SAFETY_MARGIN_S, history: int = 0, plan_s: float = PLAN_S,
                           first_compute_s: float | None = None,
                           loaded_s: Callable[[int], float | None] | None = None, slowdown: float = 1.0) -> float:
    """Seconds of audio to buffer before playing so that the stream does not stall, at the current load.

    The adaptive schedule starts with ``first_hop`` and can move to any hop ``h`` (a multiple of ``chunk`` up to
    ``max_hop``) once the buffer covers the wait for its extra tokens and its compute. A hop is *sustainable* when
    its tokens (``h / token_rate``) take no longer than its audio and its typical compute (``typical_ratio``)
    leaves ``HEADROOM`` of it free; the buffer covers a chunk up to the p95. The recommendation is
    the smallest buffer that reaches a sustainable hop: ``(h - first_hop) / token_rate`` + the compute of ``h``
    beyond the first chunk's + a margin. When no hop is sustainable (tokens or compute slower than real time), the
    shortfall of the best hop over ``horizon_s`` seconds of audio is added instead, capped at ``horizon_s``.

    Chunks get dearer with their history (see ``ComputeMeter``): the first chunk is costed after ``history``
    tokens (where the stream is now), the larger hop after ``plan_s`` seconds of speech more, so that the hop
    the buffer reaches still keeps up that far into the stream.

    ``first_compute_s``: what the first chunk took, once it was delivered. Playback starts from its delivery, so
    a later chunk has its own cost less this one's to make up; a stream's first chunk is often cheaper than its
    steady ones (demo voice: 0.13 s against 0.17-0.2 s for 12 tokens), which the meter's estimate misses. A
    first chunk dearer than the estimate earns no more than it: its tokens kept arriving meanwhile, so the chunks
    behind it run back to back with no slack of its making, and what made it dear (a new voice's prompt state,
    another program on the cores) may hold for them too (the page on a 2-core AVX2 machine: a first chunk of
    1.56 s, credited in full, left a 0.45 s buffer and three stalls).

    ``loaded_s(h)``: the longest a chunk of ``h`` tokens can take with the streams open now, waiting for theirs
    included (``CallMeter.chunk_bound_s``; None: no bound). The buffer covers it too: the meter measured the
    load of the chunks before, and streams that start together see a load it has not measured.

    ``slowdown``: how much slower than the meter's fit this stream's own chunks ran, where that is beyond the
    meter's spread (1: not). Its chunks are then costed at that rate, typical and p95 alike: the machine is
    busier than the meter measured (a browser on the same two cores: chunks at 2x the calibrated cost).
    """
    if not (math.isfinite(slowdown) and slowdown > 0):
        raise ValueError(f"slowdown must be a positive finite number, got {slowdown!r}")
    step = chunk or first_hop
    top = max(first_hop, max_hop or first_hop)
    slow, typical = max(compute.p95_ratio(), slowdown), max(compute.typical_ratio(), slowdown)
    later = history + int(plan_s / audio_s_per_token)
    first_s = compute.seconds(first_hop, history)
    if first_compute_s is not None:
        first_s = min(first_s, first_compute_s)
    best_short = math.inf
    h = first_hop
    while h <= top:
        audio = h * audio_s_per_token
        tokens_s = h / token_rate if token_rate > 0 else math.inf
        fitted = compute.seconds(h, later)
        wait = (h - first_hop) / token_rate if token_rate > 0 else math.inf
        reach = max(0.0, wait + slow * fitted - first_s)  # the buffer covers a chunk up to the p95
        bound = loaded_s(h) if loaded_s is not None else None
        if bound is not None:
            reach = max(reach, wait + bound - first_s)
        rate_s = typical * fitted  # whether the hop keeps up: what its chunks typically cost
        if tokens_s <= audio and rate_s <= (1.0 - HEADROOM) * audio:
            return min(horizon_s, reach + margin_s)
        best_short = min(best_short, reach + (max(tokens_s, rate_s) / audio - 1.0) * horizon_s)
        h += step
    return min(horizon_s, best_short + margin_s)
