"""Continuous batching: every session's chunks through a Batcher equal the same session run alone.

Engines: the reference-trained CosyVoice 3 and CosyVoice 2 fixture models (tests/data) and the bundled demo
voice (DiT + HiFi-GAN, run-time chunk and lookahead). Sessions differ in prompt (none, short, long),
schedule, hop, output and push sizes (1 token to all at once), and run from threads that start together, so
first chunks, later chunks and last chunks share calls. "Alone" is a plain ``Token2Wav.stream`` session fed
with other push sizes, which is the oracle the streaming tests already tie to the offline decode.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest
import torch
from conftest import DATA
from graph_replay import record_graph
from safetensors.torch import load_file
from tolerances import ONE_OP, SOLVE, sine_source_audio

import token2wav
from token2wav.budget import KV_SHARE
from token2wav.config import read_config
from token2wav.loading import load_flow, load_vocoder
from token2wav.models.buckets import ShapeBuckets
from token2wav.models.padded_solve import PaddedSolver
from token2wav.models.rows import RowLayout, packed_causal_conv
from token2wav.streaming import batcher as batcher_module
from token2wav.streaming import compute as compute_module
from token2wav.streaming.batcher import CacheBudgetError, cache_bytes_per_frame
from token2wav.streaming.engine import Prompt, Token2Wav
from token2wav.streaming.session import SessionClosedError

# A batched row and the row alone: the same per-row reductions, except where the row count picks another GEMM
# kernel (one row: a matrix-vector product), so up to a solve's re-association (tests/tolerances.py). Measured
# <= 1e-5 on AVX-512, AVX2 and default kernels.
MEL_TOL = SOLVE
LOWEST_RATE = 22050  # the test models' lowest sample rate: the longest time a sample count can span
# The causal HiFT's rows stacked into one call against each row alone: F0 and the source phase are float64 (no
# phase drift), so only the float32 decoder pass differs (batch 3 vs 1 may pick other conv blocking): NETWORK
# relative to |speech| <= ~0.1 = 1e-6 (fixture evidence: a float64 decode is 9.2e-8 away at |speech| 0.07).
VOCODER_ROWS_TOL = 1e-6


def _fixture_engine(case: str) -> Token2Wav:
    cfg = DATA / f"{case}_config.yaml"
    flow = load_flow(cfg, DATA / f"{case}_flow_state.safetensors")
    vocoder = load_vocoder(cfg, DATA / f"{case}_hift_state.safetensors")
    return Token2Wav(flow, vocoder, read_config(cfg))


@pytest.fixture(scope="module", params=["cv3", "cv2", "demo"])
def engine_case(request):
    if request.param == "demo":
        t2w = Token2Wav.from_pretrained("demo")
        long_prompt = t2w.speaker_prompt("rms")
    else:
        t2w = _fixture_engine(request.param)
        data = load_file(str(DATA / f"{request.param}_token2wav.safetensors"))
        long_prompt = Prompt(data["prompt_token"], data["prompt_feat"], data["embedding"])
    g = torch.Generator().manual_seed(3)
    cfg = t2w.config
    n = 13
    short_prompt = Prompt(torch.randint(0, cfg.vocab_size, (n,), generator=g),
                          torch.randn(n * cfg.token_mel_ratio, cfg.mel_dim, generator=g) - 4,
                          torch.randn(cfg.spk_embed_dim, generator=g))
    return request.param, t2w, short_prompt, long_prompt


def _specs(case: str, short: Prompt, long: Prompt) -> list[dict]:
    specs = [
        dict(prompt=long, output="mel"),
        dict(prompt=None, output="mel"),
        dict(prompt=short, schedule="exponential", output="mel"),
        dict(prompt=long, rng=5),  # audio
        dict(prompt=short, hop=None),  # audio
        dict(prompt=None, mode="recompute", output="mel"),  # runs alone, never packed with the others
    ]
    if case == "demo":  # run-time chunk and lookahead, which this model was trained for
        specs[1].update(hop=12, pre_lookahead_len=0)
        specs[4].update(hop=20, pre_lookahead_len=2)
        specs[5] = dict(prompt=None, preset="assistant", output="mel")
    return specs


PUSH_SIZES = [[1], [5], [1000], [3, 11], [2, 40], [7]]


def _run(session, tokens: list[int], sizes: list[int], start: threading.Barrier | None = None) -> list[np.ndarray]:
    if start is not None:
        start.wait()
    outs, i, k = [], 0, 0
    while i < len(tokens):
        n = sizes[k % len(sizes)]
        outs += session.push(tokens[i : i + n])
        i, k = i + n, k + 1
    outs.append(session.finish())
    return outs


def _tokens(t2w: Token2Wav, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [90, 70, 160, 60, 110, 50][:count]
    return [rng.integers(0, t2w.config.vocab_size, n).tolist() for n in lengths]


def _check_equal(alone: list[list[np.ndarray]], batched: list[list[np.ndarray]], specs: list[dict]) -> None:
    for a, b, spec in zip(alone, batched, specs):
        assert len(a) == len(b), spec
        end = 0
        for x, y in zip(a, b):
            assert x.shape == y.shape, spec
            end += x.shape[-1]
            peak = float(np.max(np.abs(x), initial=0.0))
            tol = MEL_TOL if spec.get("output") == "mel" else sine_source_audio(peak, end / LOWEST_RATE)
            assert float(np.max(np.abs(x - y), initial=0.0)) <= tol, spec


def test_threads_through_one_batcher_equal_alone(engine_case):
    case, t2w, short, long = engine_case
    specs = _specs(case, short, long)
    tokens = _tokens(t2w, len(specs), seed=11)
    alone = [_run(t2w.stream(**spec), tk, [9]) for spec, tk in zip(specs, tokens)]
    # attention padded to the buckets here (the default keeps exact sizes; the asyncio test runs those)
    with t2w.batcher(max_batch=8, max_wait_ms=100, workers=1, buckets=ShapeBuckets()) as batcher:
        results: list = [None] * len(specs)
        start = threading.Barrier(len(specs))
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                results[i] = _run(batcher.stream(**specs[i]), tokens[i], PUSH_SIZES[i], start)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    stats = batcher.stats()
    _check_equal(alone, results, specs)
    assert max(stats["batch_sizes"]) >= 3, stats  # rows really shared calls
    assert stats["sessions_open"] == 0 and stats["reserved_cache_bytes"] == 0
    assert stats["kv_pages_free"] == stats["kv_pages_total"]  # every page back in the pool


def test_fixed_shape_batches_equal_alone(engine_case, monkeypatch):
    """graphs=True: every row padded to its bucket, the whole solve in fixed shapes, each shape captured once
    and replayed (here by the CPU stand-in for a CUDA graph, ``graph_replay``): CosyVoice 3 and the demo voice
    (DiT), CosyVoice 2 (U-Net)."""
    case, t2w, short, long = engine_case
    recorded = []

    def capture(body):
        recorded.append(record_graph(body))
        return recorded[-1]

    def solver(*args, **kwargs):
        return PaddedSolver(*args, **{**kwargs, "graphs": True, "capture": capture})

    monkeypatch.setattr(batcher_module, "PaddedSolver", solver)
    specs = _specs(case, short, long)[:5]
    tokens = _tokens(t2w, len(specs), seed=13)
    alone = [_run(t2w.stream(**spec), tk, [9]) for spec, tk in zip(specs, tokens)]
    with t2w.batcher(max_batch=8, max_wait_ms=100, workers=1, graphs=True) as batcher:
        results: list = [None] * len(specs)
        start = threading.Barrier(len(specs))
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, _run(batcher.stream(**specs[i]), tokens[i], PUSH_SIZES[i], start))) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stats = batcher.stats()
    _check_equal(alone, results, specs)
    # every shape captured (again only if the pool grew under it), every call a replay
    assert stats["graphs"] and len(stats["fixed_shapes"]) <= stats["graph_captures"] == len(recorded)
    assert all(g.replays >= 1 for g in recorded)
    assert max(stats["batch_sizes"]) >= 3 and any(rows >= 4 for rows, _, _ in stats["fixed_shapes"]), stats
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_asyncio_sessions_equal_alone(engine_case):
    case, t2w, short, long = engine_case
    specs = _specs(case, short, long)[:4]
    tokens = _tokens(t2w, len(specs), seed=12)
    alone = [_run(t2w.stream(**spec), tk, [25]) for spec, tk in zip(specs, tokens)]

    async def one(batcher, spec, tk, size):
        s = batcher.stream(**spec)
        outs = []
        for i in range(0, len(tk), size):
            outs += await s.apush(tk[i : i + size])
        outs.append(await s.afinish())
        return outs

    async def main():
        with t2w.batcher(max_wait_ms=50) as batcher:
            sizes = (4, 13, 1, 60)
            return await asyncio.gather(*(one(batcher, sp, tk, sz) for sp, tk, sz in zip(specs, tokens, sizes)))

    _check_equal(alone, asyncio.run(main()), specs)


@pytest.fixture(scope="module")
def cv3():
    return _fixture_engine("cv3")


@pytest.mark.parametrize("graphs", [False, True])
def test_quantized_sessions_run_their_own_calls_and_stay_exact(cv3, graphs):
    """The constrained preset's int8 flow scales each call's whole input at once: sharing a call (or padding)
    would change a row's numbers. Three constrained sessions at once, beside an ordinary one, each equal alone;
    the int8 sessions keep no pages and never share a call."""
    specs = [dict(preset="constrained", output="mel")] * 3 + [dict(output="mel")]
    tokens = _tokens(cv3, len(specs), seed=21)
    alone = [_run(cv3.stream(**spec), tk, [25]) for spec, tk in zip(specs, tokens)]
    with cv3.batcher(max_wait_ms=100, workers=1, graphs=graphs) as batcher:
        sessions = [batcher.stream(**spec) for spec in specs]
        assert [batcher.holds_pages(s) for s in sessions] == [False, False, False, True]
        start = threading.Barrier(len(specs))
        results: list = [None] * len(specs)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, _run(sessions[i], tokens[i], [25], start))) for i in range(len(specs))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    _check_equal(alone, results, specs)


def test_row_that_fails_mid_batch_leaves_the_others_exact(cv3, monkeypatch):
    rng = np.random.default_rng(5)
    tokens = [rng.integers(0, cv3.config.vocab_size, 80).tolist() for _ in range(3)]
    alone = [_run(cv3.stream(), tk, [10]) for tk in tokens]
    with cv3.batcher(max_wait_ms=200) as batcher:
        sessions = [batcher.stream() for _ in range(3)]
        calls = {"n": 0}
        original = compute_module._record

        def failing_record(row, mel):
            if row.spec is sessions[1].spec:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("vocoder exploded")
            return original(row, mel)

        monkeypatch.setattr(compute_module, "_record", failing_record)
        results: list = [None] * 3
        failures: list = []
        start = threading.Barrier(3)

        def worker(i: int) -> None:
            start.wait()
            outs = []
            for j in range(0, 80, 10):
                try:
                    outs += sessions[i].push(tokens[i][j : j + 10])
                except RuntimeError as exc:
                    failures.append((i, j, str(exc)))
                    outs += sessions[i].push(tokens[i][j : j + 10])  # state unchanged: the retry continues
            outs.append(sessions[i].finish())
            results[i] = outs

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [f[0] for f in failures] == [1] and "vocoder exploded" in failures[0][2]
    _check_equal(alone, results, [{}] * 3)


def test_session_closed_while_its_chunk_is_queued(cv3):
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, cv3.config.vocab_size, 60).tolist()
    alone = _run(cv3.stream(), tokens, [60])
    with cv3.batcher(max_wait_ms=1000) as batcher:
        doomed, survivor = batcher.stream(), batcher.stream()
        batcher.call_started()  # a phantom pusher: the worker waits up to 1 s for it before running the queue
        error: list = []

        def push_doomed() -> None:
            try:
                doomed.push(tokens)
            except SessionClosedError as exc:
                error.append(exc)

        t = threading.Thread(target=push_doomed)
        t.start()
        deadline = time.perf_counter() + 5
        while not batcher._queue and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert batcher._queue, "the doomed session's chunk never got queued"
        doomed.close()
        t.join(timeout=5)
        batcher.call_ended()
        assert error and "closed" in str(error[0])
        assert batcher.sessions_open == 1  # its slot is free at once
        got = _run(survivor, tokens, [60])
    _check_equal([alone], [got], [{}])
    with pytest.raises(SessionClosedError):
        doomed.push([1])


def test_cache_budget_refuses_cleanly(cv3):
    per_frame = cache_bytes_per_frame(cv3.flow, cv3.n_timesteps)
    assert per_frame == 10 * 2 * 2 * 2 * (4 * 16) * 4  # steps x layers x (k, v) x branches x heads*dim_head x fp32
    # the estimate is what a per-session cache (no page pool) really holds per frame
    with cv3.batcher(workers=0, paged_kv=False) as unpaged, unpaged.stream() as probe:
        probe.push(list(range(53)))
        cache = probe.state.flow_state.cache
        held = sum(t.numel() * t.element_size() for step in cache.steps for t in (*step.keys, *step.values))
        assert held == per_frame * cache.offset
    # accounting: frames a session's next chunk needs, rounded up to 16-frame pages, x bytes per frame;
    # a first chunk needs 50 frames (4 pages: 64), a second 106 (7 pages: 112); the budget's key/value share
    # (KV_SHARE of it: the rest is for prompt states, the registry and fixed-shape buffers) holds 130
    budget = math.ceil(per_frame * 130 / KV_SHARE)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cv3.config.vocab_size, 53).tolist()
    with cv3.batcher(max_cache_bytes=budget) as batcher:
        a = batcher.stream()
        b = batcher.stream()
        with pytest.raises(CacheBudgetError, match=r"max_cache_bytes=.*2 sessions open"):
            batcher.stream()
        a.push(tokens[:28])
        with pytest.raises(CacheBudgetError, match="cache budget exceeded"):
            a.push(tokens[28:])
        assert a.tokens_received == 28  # the refused push left the session as it was
        b.close()
        assert batcher.sessions_open == 1
        a.push(tokens[28:])  # with b's share back, it fits
        a.finish()
        assert batcher.sessions_open == 0 and batcher.reserved_bytes == 0
    stats = batcher.stats()  # after close: a finished session's pages go back once its last step has ended
    assert stats["kv_pages_free"] == stats["kv_pages_total"] > 0  # every page is back in the pool
    # the pool was allocated at the budget's size once (8 pages of 16 frames <= 130 frames) and never grew
    assert stats["kv_pages_total"] == 8 and stats["kv_pool_grown"] == 0
    assert stats["kv_pool_bytes"] <= KV_SHARE * budget and stats["memory_bytes"]["kv_pages"] == stats["kv_pool_bytes"]


def test_batcher_arguments_are_checked(cv3):
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        token2wav.Batcher(cv3, max_batch=0)
    with pytest.raises(ValueError, match=r"max_wait_ms must be a number in \[0, 1000\]"):
        token2wav.Batcher(cv3, max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_cache_bytes must be a positive int"):
        token2wav.Batcher(cv3, max_cache_bytes=0)
    with pytest.raises(ValueError, match=r"workers must be an int in \[0, 64\] or None \(0: inline\)"):
        token2wav.Batcher(cv3, workers=-1)
    with pytest.raises(ValueError, match="page_frames must be an int in"):
        token2wav.Batcher(cv3, page_frames=0)
    with pytest.raises(ValueError, match="graphs=True runs fixed-shape batches of a cached flow .* with paged_kv"):
        token2wav.Batcher(cv3, graphs=True, paged_kv=False)
    with cv3.batcher() as batcher, pytest.raises(ValueError, match="hop=7 tokens is not a multiple"):
        batcher.stream(hop=7)


@pytest.mark.parametrize("lengths", [(5, 1, 7), (5, 4, 9)])  # a row shorter than the history; all longer
def test_packed_causal_conv_equals_each_row_alone(lengths):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 3, 3, dilation=2)
    layout = RowLayout(lengths)
    x = torch.randn(2, 4, layout.total)
    tails = [torch.randn(2, 4, 4) for _ in range(3)]
    tail_index = layout.tail_index(4, x.device)
    assert (tail_index is None) == (min(lengths) < 4)
    out, new_tails = packed_causal_conv(conv, x, tails, layout, tail_index=tail_index)
    for row, tail, got, new in zip(layout.split(x, 2), tails, layout.split(out, 2), new_tails):
        full = torch.cat([tail, row], dim=2)
        assert torch.allclose(got, conv(full), atol=ONE_OP)  # one conv of 4 x 3 terms, packed vs alone
        assert torch.equal(new, full[:, :, -4:])  # the new tail is a copy of the input's last frames


def test_info_describes_batching(cv3):
    from token2wav.serve.protocol import describe_model

    info = describe_model(cv3)["batching"]
    assert info["flow"].startswith("rows packed along time") and "page pool (16-frame pages" in info["flow"]
    assert info["vocoder"] == "rows in the same state in one call"  # the causal HiFT stacks rows
    assert info["buckets"]["rows"] == [1, 2, 4, 8, 16, 32, 64] and info["buckets"]["keys"][:3] == [128, 256, 384]
    assert info["graphs"].startswith("available")
    assert info["cache_bytes_per_frame"] == 20480
    # 25 tokens/s x 2 frames per token x 60 s x 20480 bytes
    assert info["cache_mb_per_stream_minute"] == round(20480 * 3000 / 2**20, 1)


def test_causal_vocoder_rows_at_different_positions_share_a_step(cv3):
    voc = cv3.vocoder
    g = torch.Generator().manual_seed(9)
    mels = [torch.randn(1, 80, 400, generator=g) - 5 for _ in range(3)]
    # three streams 0, 50 and 150 frames in, then each gets 50-frame chunks
    starts = [50, 100, 200]
    caches = []
    for mel, start in zip(mels, starts):
        _, cache = voc.stream_step(mel[:, :, :start])
        caches.append(cache)
    sigs = {voc._row_signature(mel[:, :, s : s + 50], c, False) for mel, s, c in zip(mels, starts, caches)}
    assert len(sigs) == 1 and None not in sigs  # different positions, one shared step
    alone_caches, rows_caches = list(caches), list(caches)
    for step in range(3):
        pieces = [mel[:, :, s + 50 * step : s + 50 * (step + 1)] for mel, s in zip(mels, starts)]
        want = [voc.stream_step(p, c) for p, c in zip(pieces, alone_caches)]
        got = voc.stream_step_rows(pieces, rows_caches, [False] * 3)
        for (wa, wc), (ga, gc) in zip(want, got):
            assert wa.shape == ga.shape
            assert float((wa - ga).abs().max()) <= VOCODER_ROWS_TOL
            assert (gc.source_samples, gc.istft_count, gc.speech_samples) == (
                wc.source_samples, wc.istft_count, wc.speech_samples)
        alone_caches, rows_caches = [w[1] for w in want], [r[1] for r in got]
    tail = [voc.stream_step(mel[:, :, s + 150 :], c, finalize=True)[0] for mel, s, c in
            zip(mels, starts, rows_caches)]  # fmt: skip
    want_tail = [voc.stream_step(mel[:, :, s + 150 :], c, finalize=True)[0] for mel, s, c in
                 zip(mels, starts, alone_caches)]  # fmt: skip
    for a, b in zip(tail, want_tail):
        assert float((a - b).abs().max()) <= VOCODER_ROWS_TOL  # the stacked caches continue like the row's own


def test_pages_of_a_session_closed_mid_step_come_back_after_the_step(cv3, monkeypatch):
    rng = np.random.default_rng(8)
    tokens = rng.integers(0, cv3.config.vocab_size, 60).tolist()
    cfg = cv3.config
    g = torch.Generator().manual_seed(4)
    prompt = Prompt(torch.randint(0, cfg.vocab_size, (80,), generator=g),  # 80 tokens: 150 frames are cached
                    torch.randn(160, cfg.mel_dim, generator=g) - 4, torch.randn(cfg.spk_embed_dim, generator=g))
    alone = _run(cv3.stream(prompt), tokens, [60])
    with cv3.batcher(max_wait_ms=500, workers=1) as batcher:
        doomed, survivor = batcher.stream(prompt), batcher.stream(prompt)
        released_while_running: list[int] = []
        table = batcher._sessions[doomed].table
        survivor_table = batcher._sessions[survivor].table
        original_release = table.release

        def watched_release() -> None:
            if table.pages:  # (adopting the prompt releases an empty table first)
                released_while_running.append(batcher._running[doomed])
            original_release()

        table.release = watched_release
        original_flow = compute_module._flow_rows
        shared: list[int] = []

        def closing_flow(rows, *args):
            if any(row.spec is doomed.spec for row in rows):
                doomed.close()  # the caller goes away while its chunk is being computed
                mels = original_flow(rows, *args)
                if any(row.spec is survivor.spec for row in rows):
                    shared.append(len(set(table.pages) & set(survivor_table.pages)))
                return mels
            return original_flow(rows, *args)

        monkeypatch.setattr(compute_module, "_flow_rows", closing_flow)
        start = threading.Barrier(2)
        outs: list = []
        refused: list = []

        def push_doomed() -> None:
            start.wait()
            try:
                doomed.push(tokens)
            except SessionClosedError as exc:  # its next chunk is refused: the session is closed
                refused.append(exc)

        threads = [threading.Thread(target=push_doomed),
                   threading.Thread(target=lambda: outs.append(_run(survivor, tokens, [60], start)))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stats = batcher.stats()
    # the prompt's cached chunks (150 frames) fill 9 full 16-frame pages, which both sessions read
    assert shared == [9]
    assert released_while_running == [0]  # freed only once its step had ended
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    _check_equal([alone], outs, [{}])


def test_every_call_is_logged_with_its_timing_at_debug(cv3, caplog):
    """``serve --log-level debug`` shows each model call: rows, tokens, audio, seconds and seconds per token (how
    a user sees what a chunk costs on their server); at the default level nothing is formatted."""
    tokens = _tokens(cv3, 1, seed=5)[0][:60]
    with caplog.at_level("INFO", logger="token2wav.batcher"):
        _run(cv3.stream(hop=25), tokens, [60])
    assert not [r for r in caplog.records if r.name == "token2wav.batcher"]
    with caplog.at_level("DEBUG", logger="token2wav.batcher"):
        _run(cv3.stream(hop=25), tokens, [60])
    calls = [r.getMessage() for r in caplog.records if r.name == "token2wav.batcher"]
    # 60 tokens, hop 25 with the 3-token look-ahead: 25 and 25 on push, the last 10 on finish
    assert len(calls) == 3, calls
    assert "1 row(s), 25 tokens (1.00 s of audio) in " in calls[0] and " s per token; waited " in calls[0]
    assert "1 row(s), 10 tokens (0.40 s of audio)" in calls[2]


def test_the_calibration_and_each_adaptive_hop_are_logged_at_debug(cv3, caplog):
    """``serve --log-level debug`` also shows what the start-up calibration measured and, for a stream on the
    adaptive schedule, every hop it chose with what it chose from (the log that found a stream stuck at its
    smallest hop on a slow CPU, docs/serving.md)."""
    with cv3.batcher() as batcher:
        with caplog.at_level("DEBUG", logger="token2wav"):
            batcher.calibrate()
            session = batcher.stream(schedule="adaptive")
            _run(session, _tokens(cv3, 1, seed=7)[0], [10])
    calibrated = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibrated: ")]
    assert len(calibrated) == 1 and " with no history, " in calibrated[0] and " after 20 s of it (" in calibrated[0]
    hops = [r.getMessage() for r in caplog.records if r.name == "token2wav.session"]
    # every emission after the first is chosen (the first takes the smallest hop before any audio exists)
    assert hops and all(m.startswith("adaptive hop ") and " s of audio left to play, " in m for m in hops), hops
    assert all(int(m.split()[2].rstrip(":")) % int(session.plan.chunk or session.plan.hop) == 0 for m in hops)


def test_the_server_prints_its_own_logs_at_its_log_level():
    import logging

    from token2wav.serve.runner import show_own_logs

    logger = logging.getLogger("token2wav")  # restored after the test (tests/conftest.py)
    show_own_logs("debug")
    show_own_logs("warning")  # a second call changes the level, adds no second handler
    own = [h for h in logger.handlers if getattr(h, "token2wav_own", False)]
    assert len(own) == 1 and logger.level == logging.WARNING
    assert logging.getLogger("token2wav.batcher").getEffectiveLevel() == logging.WARNING
