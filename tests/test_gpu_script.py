"""`benchmarks/gpu.sh` (the prepared device check of issue [1/6]) runs end to end; CI exercises it on the CPU
with tiny sizes, so that the one try on a GPU machine does not fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_on_cpu_quick(tmp_path):
    # the CPU at 2 cores needs longer step limits than the device
    env = dict(os.environ, PYTHON=sys.executable, T2W_STEP_SECONDS="400 200 400")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 passed" in (tmp_path / "parity.txt").read_text()
    half = json.loads((tmp_path / "half_precision.json").read_text())
    assert [(r["model"], r["dtype"]) for r in half] == [("tiny", "bfloat16"), ("tiny", "float16")]
    assert all(r["finite"] and r["peak"] > 0 for r in half)
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["complete"] is True and "gpu.sh: done (status 0)" in proc.stdout
    assert "wrote" in (tmp_path / "bench.log").read_text() and (tmp_path / "half_precision.log").exists()
    assert bench["machine"]["dtype"] == "torch.bfloat16" or "bfloat16" in str(bench["machine"]["dtype"])
    assert [(c["sessions"], c["batched"], c["graphs"]) for c in bench["concurrency"]] == [
        (n, batched, graphs) for n in (1, 2) for batched, graphs in ((True, True), (True, False), (False, False))]
    assert all(c["fixed_shapes"] >= 1 and c["graph_captures"] == 0 for c in bench["concurrency"] if c["graphs"])
    # batched rows get a key/value budget for their workload: the pool allocated once, never grown
    assert all(c["max_cache_bytes"] > 0 and c["kv_pool_grown"] == 0 for c in bench["concurrency"] if c["batched"])
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"chunk_ms.png", "total_vs_length.png",
                                                                "sessions.png"}


def test_a_step_over_its_time_limit_is_cut_and_the_rest_still_run(tmp_path):
    """One slow step must not use up the device time of the others: each is cut at its limit and reported."""
    env = dict(os.environ, PYTHON=sys.executable, T2W_STEP_SECONDS="1 1 1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    for log in ("parity.txt", "half_precision.log", "bench.log"):
        assert f"cut at 1 s (see {log})" in proc.stdout and (tmp_path / log).exists()
    assert "gpu.sh: done (status 1)" in proc.stdout
