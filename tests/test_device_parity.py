"""Reference parity and batched == alone on the device named by $T2W_TEST_DEVICE (default: the CPU).

`benchmarks/gpu.sh` runs this file on CUDA in float32 with TF32 off; CI runs it on the CPU, where it repeats
(cheaply) what the CPU parity tests check, so the file itself is known to work before a GPU runs it.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
from conftest import DATA
from safetensors.torch import load_file
from tolerances import SOLVE

from token2wav.config import read_config
from token2wav.loading import load_flow, load_vocoder
from token2wav.streaming.engine import Prompt, Token2Wav

DEVICE = os.environ.get("T2W_TEST_DEVICE", "cpu")
# mel after a flow solve against the reference fixtures, as the CPU parity tests (FIXTURES.md suggests 1e-4); on
# CUDA with TF32 off measured within 1.5e-6
MEL_TOL = SOLVE
# a batched row against the row alone: a flow solve whose GEMMs may be blocked differently for another row count
# (as tests/test_batcher.py's MEL_TOL)
BATCH_TOL = SOLVE

if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.fail(f"T2W_TEST_DEVICE={DEVICE} but no CUDA device is available", pytrace=False)


@pytest.fixture(scope="module", params=["cv3", "cv2"])
def case(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = request.param
    cfg = DATA / f"{name}_config.yaml"
    flow = load_flow(cfg, DATA / f"{name}_flow_state.safetensors", device=DEVICE)
    vocoder = load_vocoder(cfg, DATA / f"{name}_hift_state.safetensors", device=DEVICE)
    engine = Token2Wav(flow, vocoder, read_config(cfg))
    data = load_file(str(DATA / f"{name}_token2wav.safetensors"))
    meta = json.loads((DATA / f"{name}_token2wav.json").read_text())
    prompt = Prompt(data["prompt_token"], data["prompt_feat"], data["embedding"])
    return name, engine, prompt, data, meta


def _maxdiff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max())


def test_reference_mel_on_device(case):
    name, engine, prompt, data, meta = case
    assert engine.device.type == torch.device(DEVICE).type
    tokens = data["token"][0]
    offline = engine.synthesize(tokens, prompt, attention="full", output="mel")
    assert _maxdiff(offline, data["offline_mel"][0]) <= MEL_TOL, name
    with engine.stream(prompt, mode="recompute", schedule="exponential", output="mel") as s:
        mels = s.push(tokens) + [s.finish()]
    assert len(mels) == len(meta["calls"])
    for k, mel in enumerate(mels):
        assert _maxdiff(mel, data[f"flow_mel{k}"][0]) <= MEL_TOL, (name, k)


def _alone_and_batched(engine, prompts, tokens, push: int | None, **batcher_options):
    """Each stream's mel chunks alone, then through one batcher from threads that start together (pushes of
    ``push`` tokens; None: all at once) so that their chunks share calls; and the batcher's stats."""

    def drive(s, tk: list[int]) -> list[np.ndarray]:
        step = push or len(tk)
        return [m for k in range(0, len(tk), step) for m in s.push(tk[k : k + step])] + [s.finish()]

    want = []
    for p, tk in zip(prompts, tokens):
        with engine.stream(p, output="mel") as s:
            want.append(drive(s, tk))
    got: list[list[np.ndarray]] = [[] for _ in prompts]
    with engine.batcher(max_wait_ms=50, workers=1, **batcher_options) as batcher:
        start = threading.Barrier(len(prompts))

        def run(i: int) -> None:
            with batcher.stream(prompts[i], output="mel") as s:
                start.wait()
                got[i] = drive(s, tokens[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return want, got, batcher.stats()


def _assert_equal(want, got, name: str) -> None:
    for a, b in zip(want, got):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert float(np.abs(x - y).max(initial=0.0)) <= BATCH_TOL, name


def test_batched_equals_alone_on_device(case):
    name, engine, prompt, data, meta = case
    rng = np.random.default_rng(4)
    tokens = [rng.integers(0, engine.config.vocab_size, n).tolist() for n in (70, 55, 90)]
    want, got, stats = _alone_and_batched(engine, [prompt, None, prompt], tokens, push=None)
    assert max(stats["batch_sizes"]) >= 2
    _assert_equal(want, got, name)


def test_fixed_shape_batches_equal_alone_on_device(case):
    """graphs=True: on CUDA every bucket is captured once as a CUDA graph and replayed; on a CPU the same
    fixed-shape body runs eagerly. Either way each row equals the session alone (CosyVoice 3's DiT and
    CosyVoice 2's U-Net)."""
    name, engine, prompt, data, meta = case
    rng = np.random.default_rng(5)
    tokens = [rng.integers(0, engine.config.vocab_size, n).tolist() for n in (80, 45, 120)]
    want, got, stats = _alone_and_batched(engine, [prompt, None, prompt], tokens, push=25, graphs=True)
    assert max(stats["batch_sizes"]) >= 2 and stats["fixed_shapes"]
    # a bucket met again is replayed, not captured again (unless the pool grew under it)
    if DEVICE.startswith("cuda"):
        assert stats["graph_captures"] >= len(stats["fixed_shapes"])
        assert stats["kv_pool_grown"] > 0 or stats["graph_captures"] == len(stats["fixed_shapes"]), stats
    else:
        assert stats["graph_captures"] == 0
    _assert_equal(want, got, name)
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
