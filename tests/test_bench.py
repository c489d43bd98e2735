"""`token2wav bench` end to end on the tiny bundled model: every mode runs and the report has every field."""

from __future__ import annotations

import json

import pytest
import torch

from token2wav import bench

REQUIRED = {"model", "mode", "utterance_s", "first_chunk_ms", "first_chunk_cold_ms", "chunk_ms", "total_s", "rtf",
            "peak_rss_mb"}


def test_bench_report_and_plots(tmp_path):
    snapshots = []  # the report after every row: what a run cut short still has written
    report = bench.run_bench(["tiny"], quick=False, utterances=[2.0], modes=list(bench.MODES), sessions=[1, 2],
                             device="cpu", dtype=torch.float32, log=lambda _: None, isolate=False,
                             checkpoint=lambda r: snapshots.append((len(r["runs"]), len(r["concurrency"]))))
    rows = len(bench.MODES) + 4
    assert snapshots == [(min(k, len(bench.MODES)), max(0, k - len(bench.MODES))) for k in range(1, rows + 1)]
    assert {"cpu", "threads", "torch", "device", "dtype", "commit"} <= set(report["machine"])
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == set(bench.MODES)
    for mode, run in runs.items():
        assert REQUIRED <= set(run), mode
        assert run["total_s"] > 0 and run["rtf"] == run["total_s"] / 2.0
        assert all(ms > 0 for ms in run["chunk_ms"])
        if mode != "offline":
            assert run["vs_offline"] == run["total_s"] / runs["offline"]["total_s"]
            assert len(run["chunk_ms"]) >= 2  # at least one hop and the flush
    conc = [(c["sessions"], c["batched"]) for c in report["concurrency"]]
    assert conc == [(1, True), (1, False), (2, True), (2, False)]
    for c in report["concurrency"]:
        assert c["throughput"] == c["sessions"] * 2.0 / c["wall_s"]
        assert c["first_chunk_ms_p50"] <= c["first_chunk_ms_p99"] and c["chunk_ms_p50"] <= c["chunk_ms_p99"]
        assert c["ops_per_session_chunk"] > 100 and c["peak_rss_mb"] > 0
        # every stream played against a real-time clock, as token2wav loadtest plays it
        assert c["prebuffer_s"] == 0.5 and c["stall_s"] >= 0 and c["stalls"] >= 0
        assert 0 <= c["worst_stall_s"]["max"] <= c["stall_s"] + 1e-4
        assert 0 <= c["share_worst_stall_le_50ms"] <= c["share_worst_stall_le_100ms"] <= 1
    two = next(c for c in report["concurrency"] if c["sessions"] == 2 and c["batched"])
    assert sum(n * k for n, k in two["batch_sizes"].items()) >= 2 * 2  # both streams' chunks went through it
    assert {t["target"] for t in report["batching_targets"]} == {
        "2 sessions: batched throughput >= 2 x unbatched", "2 sessions: batched first-chunk p99 <= 3 x one session's",
        "2 sessions: batched ops per session-chunk <= 1/5 of one session's"}
    assert {t["target"] for t in report["targets"]} == {
        "cached total <= 1.25 x offline", "last/first chunk compute <= 1.3",
        "warm first chunk <= 0.3 x recompute first chunk"}
    json.dumps(report)  # everything in it is plain JSON
    paths = bench.plot(report, tmp_path)
    assert [p.name for p in paths] == ["chunk_ms.png", "total_vs_length.png", "sessions.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_isolated_rows_run_in_their_own_process():
    # the default: each row builds its own engine in a fresh interpreter, so its peak RSS is its own
    report = bench.run_bench(["tiny"], quick=False, utterances=[2.0], modes=["offline", "cached"], sessions=[],
                             device="cpu", dtype=torch.float32, log=lambda _: None)
    assert report["isolated"] is True
    offline, cached = report["runs"]
    assert (offline["mode"], cached["mode"]) == ("offline", "cached")
    for run in (offline, cached):
        assert REQUIRED <= set(run)
        assert 0 < run["loaded_rss_mb"] <= run["peak_rss_mb"]
    assert cached["vs_offline"] == cached["total_s"] / offline["total_s"]


def test_mid_size_keeps_the_architecture():
    cfg = bench.read_config(bench._CONFIGS / "cosyvoice3.yaml")
    mid = bench.mid_size(cfg)
    est = mid.flow.get("decoder").get("estimator")
    assert (est.get("dim"), est.get("depth")) == (256, 4)
    assert mid.flow.target == cfg.flow.target and mid.vocoder.target == cfg.vocoder.target
    assert mid.token_mel_ratio == cfg.token_mel_ratio and mid.static_chunk_size == cfg.static_chunk_size


def test_a_mode_the_model_lacks_is_reported_as_skipped(monkeypatch):
    real = bench.measure_mode

    def measure(model, quick, device, dtype, seconds, mode, engine=None):
        if mode == "window":
            raise NotImplementedError("no window cache here")
        return real(model, quick, device, dtype, seconds, mode, engine=engine)

    monkeypatch.setattr(bench, "measure_mode", measure)
    report = bench.run_bench(["tiny"], quick=False, utterances=[1.0], modes=["offline", "window"], sessions=[],
                             device="cpu", dtype=torch.float32, log=lambda _: None, isolate=False)
    assert [r["mode"] for r in report["runs"]] == ["offline"]
    assert report["skipped"] == [{"model": "tiny", "mode": "window", "utterance_s": 1.0,
                                  "reason": "no window cache here"}]


def test_a_row_out_of_gpu_memory_is_reported_and_the_rest_run(monkeypatch):
    """The one GPU run must not lose its other rows to one that does not fit."""
    real = bench.measure_concurrency

    def measure(model, quick, device, dtype, seconds, sessions, batched=False, graphs=False, workers=None,
                engine=None):
        if sessions == 2 and not batched:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(model, quick, device, dtype, seconds, sessions, batched, graphs, workers, engine=engine)

    monkeypatch.setattr(bench, "measure_concurrency", measure)
    report = bench.run_bench(["tiny"], quick=False, utterances=[1.0], modes=[], sessions=[1, 2], device="cpu",
                             dtype=torch.float32, log=lambda _: None, isolate=False)
    assert [(c["sessions"], c["batched"]) for c in report["concurrency"]] == [(1, True), (1, False), (2, True)]
    assert report["skipped"] == [{"model": "tiny", "sessions": 2, "batched": False, "graphs": False,
                                  "reason": "out of memory: CUDA out of memory. Tried to allocate 80.00 GiB"}]


def test_session_levels():
    assert bench.session_levels("1,2,4,8,16") == [1, 2, 4, 8, 16]
    assert bench.session_levels("8") == [1, 2, 4, 8]
    assert bench.session_levels("1") == []
    for bad in ("0", "a,b", ""):
        try:
            bench.session_levels(bad)
        except ValueError as exc:
            assert "--sessions" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_batch_workers_flag_is_checked():
    from token2wav import cli

    # refused before any model is built (SystemExit prints the message as the command's one line)
    with pytest.raises(SystemExit, match=r"--batch-workers must be in \[1, 64\], got 0"):
        cli.main(["bench", "--quick", "--modes", "", "--sessions", "2", "--batch-workers", "0"])


@pytest.mark.parametrize("seconds", ["-1", "0", "0.5", "nan", "601"])
def test_utterance_lengths_are_checked_before_any_model_is_built(seconds, monkeypatch):
    from token2wav import bench, cli

    def refuse(*args, **kwargs):
        raise AssertionError("the bench ran before the bad --utterance was reported")

    monkeypatch.setattr(bench, "run_bench", refuse)
    # -1 reached numpy's seed ("expected non-negative integer"), 0 the engine ("tokens is empty")
    with pytest.raises(SystemExit, match=r"--utterance must be in \[1, 600\] seconds, got "):
        cli.main(["bench", "--quick", "--utterance", "10", "--utterance", seconds])


def test_gpu_targets_prefer_the_graphs_rows():
    from token2wav.bench import gpu_targets

    def row(n, graphs, p50, p99, thr, chunk99):
        return {"model": "cv3", "sessions": n, "batched": True, "graphs": graphs, "utterance_s": 10.0,
                "first_chunk_ms_p50": p50, "first_chunk_ms_p99": p99, "throughput": thr, "chunk_ms_p99": chunk99,
                "hop_audio_ms": 1000.0}

    conc = [row(1, False, 90, 90, 5, 80), row(1, True, 50, 55, 6, 45), row(16, True, 120, 160, 70, 150),
            row(64, False, 300, 900, 70, 900), {"model": "cv3", "sessions": 64, "batched": False}]
    got = {t["target"]: (t["value"], t["met"]) for t in gpu_targets(conc)}
    assert got == {
        "GPU 1 session: first chunk p50 <= 60 ms (graphs)": (50, True),
        "GPU 16 sessions: first chunk p99 <= 150 ms (graphs)": (160, False),
        "GPU 64 sessions: aggregate throughput >= 64 audio s/s": (70, True),  # no graphs row at 64: the batched one
        "GPU 64 sessions: chunk p99 <= the hop's audio duration (ms)": (900, True),
    }


def test_repeated_rows_run_in_turns_and_compare_each_run_with_its_neighbour(monkeypatch):
    """--repeat 3: offline and cached alternate. The machine slows down 3x once, between the second offline run
    and the second cached run: the median of the paired ratios stays the true 1.2, where the ratio of the two
    modes' median totals would be 3.6. Each row is its median run."""
    calls = []
    slowdown = iter([1, 1, 1, 3, 3, 3])

    def measure(model, quick, device, dtype, seconds, mode, engine=None):
        calls.append(mode)
        factor = next(slowdown)
        total = factor * (1.0 if mode == "offline" else 1.2)
        return {"total_s": total, "chunk_ms": [total * 1e3], "first_chunk_ms": total * 1e3,
                "first_chunk_cold_ms": total * 1e3, "peak_rss_mb": 1.0}

    monkeypatch.setattr(bench, "measure_mode", measure)
    monkeypatch.setattr(bench, "_warm_engine", lambda *a: object())
    report = bench.run_bench(["tiny"], quick=False, utterances=[1.0], modes=["offline", "cached"], sessions=[],
                             device="cpu", dtype=torch.float32, log=lambda _: None, isolate=False, repeat=3)
    assert calls == ["offline", "cached"] * 3
    offline, cached = report["runs"]
    assert offline["totals_s"] == [1.0, 1.0, 3.0] and offline["total_s"] == 1.0
    assert cached["total_s"] == pytest.approx(3.6)  # the median run
    assert cached["vs_offline_each"] == pytest.approx([1.2, 3.6, 1.2]) and cached["vs_offline"] == pytest.approx(1.2)
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        bench.run_bench(["tiny"], quick=False, utterances=[1.0], modes=["offline"], sessions=[], device="cpu",
                        dtype=torch.float32, log=lambda _: None, isolate=False, repeat=0)
