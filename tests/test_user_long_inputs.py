"""Issue 16, item 2: long inputs.

The user decoded 20,000 tokens offline: 13.4 GB on the tiny model, and on full-size CosyVoice 3 a 12.8 GB
allocation that crashed with a traceback. Now: chunk attention runs chunk by chunk through the cached path
(linear memory, the same output), full attention that cannot fit is refused up front naming the limit and the
alternatives, and an allocation failure is one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import SOLVE, sine_source_audio

import token2wav
from token2wav import cli, memory
from token2wav.config import read_config

DATA = Path(__file__).resolve().parent / "data"
GB = 10**9


@pytest.fixture(scope="module")
def tiny():
    return token2wav.Token2Wav.from_pretrained("tiny")


def _prompt(seed: int = 1) -> token2wav.Prompt:
    rng = np.random.default_rng(seed)
    return token2wav.Prompt(rng.integers(0, 512, 30), rng.standard_normal((60, 80)).astype(np.float32) - 5,
                            rng.standard_normal(192).astype(np.float32))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ chunk: linear memory


def _largest_attention(fn) -> tuple[int, int]:
    """(largest query x key score count of any attention call, largest key length) while running fn."""
    seen = {"scores": 0, "keys": 0}
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen["scores"] = max(seen["scores"], q.shape[-2] * k.shape[-2])
        seen["keys"] = max(seen["keys"], k.shape[-2])
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        fn()
    finally:
        F.scaled_dot_product_attention = real
    return seen["scores"], seen["keys"]


def test_long_chunk_attention_decode_grows_linearly_and_gives_the_same_output(tiny):
    tokens = np.random.default_rng(0).integers(0, 512, 400)
    prompt = _prompt()
    one_shot = tiny.synthesize(tokens[:200], prompt, attention="chunk", output="mel")
    s_short, _ = _largest_attention(lambda: tiny.synthesize(tokens[:200], prompt, attention="chunk", output="mel"))
    s_long, _ = _largest_attention(lambda: tiny.synthesize(tokens, prompt, attention="chunk", output="mel"))
    assert s_long / s_short == pytest.approx((860 / 460) ** 2, rel=0.01)  # one shot: quadratic
    try:
        tiny.one_shot_frames = 200  # what happens above ONE_SHOT_FRAMES, at a size a test can afford
        chunked = tiny.synthesize(tokens[:200], prompt, attention="chunk", output="mel")
        c_short, k_short = _largest_attention(
            lambda: tiny.synthesize(tokens[:200], prompt, attention="chunk", output="mel"))
        c_long, k_long = _largest_attention(lambda: tiny.synthesize(tokens, prompt, attention="chunk", output="mel"))
        audio_chunked = tiny.synthesize(tokens[:200], prompt, attention="chunk")
    finally:
        tiny.one_shot_frames = memory.ONE_SHOT_FRAMES
    # queries are at most one call's frames (4 chunks = 200), keys the whole prefix: linear in length
    assert c_long / c_short == pytest.approx(k_long / k_short, rel=0.01) and c_long / c_short < 2.0
    assert c_long <= 206 * k_long
    # the same output as the one-shot decode, to float rounding: a flow solve on other shapes (mel, SOLVE), and its
    # integration by the vocoder's sine phase over the 8 s (sine_source_audio)
    assert chunked.shape == one_shot.shape and float(np.abs(chunked - one_shot).max()) < SOLVE
    audio = tiny.synthesize(tokens[:200], prompt, attention="chunk")
    audio_tol = sine_source_audio(float(np.abs(audio).max()), len(audio) / tiny.sample_rate)
    assert audio.shape == audio_chunked.shape and float(np.abs(audio - audio_chunked).max()) < audio_tol


def test_default_threshold_is_twenty_seconds(tiny):
    assert tiny.one_shot_frames == memory.ONE_SHOT_FRAMES == 1000


# ------------------------------------------------------------------------------------------ full: refused up front


def test_full_size_cv3_offline_20000_tokens_refused_before_loading(tmp_path, capsys, monkeypatch):
    d = tmp_path / "Fun-CosyVoice3-0.5B"
    d.mkdir()
    shutil.copy(DATA / "real_configs" / "cosyvoice3.yaml", d / "cosyvoice3.yaml")
    (d / "flow.pt").write_bytes(b"placeholder")
    (d / "hift.pt").write_bytes(b"placeholder")
    tokens = tmp_path / "long.json"
    tokens.write_text(json.dumps(np.random.default_rng(0).integers(0, 6561, 20000).tolist()))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 64 * GB)
    monkeypatch.setattr(cli, "load_engine", lambda *a: pytest.fail("loaded the model before refusing"))
    code = cli.main(["synth", "--model", str(d), "--tokens", str(tokens), "--out", str(tmp_path / "o.wav")])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    # 2 branches x 16 heads x 40000^2 frames x 4 bytes = 204.8 GB; limit sqrt(32e9 / 128) = 15811 frames
    assert "full attention over 40000 mel frames (800 s with the prompt) needs 204.8 GB" in line
    assert "64.0 GB available on cpu" in line and "the limit here is about 15811 frames" in line
    assert "--attention chunk" in line and "--stream --mode window" in line
    # chunk attention: 3.6 MB per frame x 1.5 growth = 216 GB of keys/values over 40000 frames, also refused
    code = cli.main(["synth", "--model", str(d), "--tokens", str(tokens), "--out", str(tmp_path / "o.wav"),
                     "--attention", "chunk"])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert "chunk attention over 40000 mel frames" in line and "(5.4 MB per frame)" in line
    assert "--stream --mode window" in line


def test_tiny_model_20000_tokens_full_attention_refused_chunk_accepted(tiny, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 8 * GB)
    config = tiny.config
    # 2 x 4 heads x 40000^2 x 4 bytes = 51.2 GB > half of 8 GB
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs 51\.2 GB .* use attention='chunk'"):
        tiny.synthesize(np.zeros(20000, dtype=np.int64))
    # the chunked decode's cache for the same length: 10 x 2 x 2 layers x 2 x 64 x 4 bytes x 1.5 per frame
    assert memory.kv_cache_bytes(config, 40000) == 10 * 2 * 2 * 2 * 64 * 4 * 40000 * 3 // 2
    memory.check_offline_memory(config, 40000, attention="chunk", available=8 * GB)  # fits: no error


def test_attention_shapes_of_the_real_configs():
    cv3 = read_config(DATA / "real_configs" / "cosyvoice3.yaml")
    cv2 = read_config(DATA / "real_configs" / "cosyvoice2.yaml")
    assert memory.attention_shape(cv3) == (16, 22, 1024)
    assert memory.attention_shape(cv2) == (8, 56, 512)  # 4 blocks x (down + 12 mid + up)
    assert memory.kv_cache_bytes(cv3, 1, n_timesteps=10) == int(3_604_480 * 1.5)  # README: 3.6 MB per frame


def test_available_memory_is_read_from_the_system():
    free = memory.available_bytes("cpu")
    assert free is None or free > 0


# ------------------------------------------------------------------------------------------ out of memory: one line


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.80 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 12800000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_an_allocation_failure_is_one_line(tiny, tmp_path, capsys, monkeypatch, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(tiny.flow, "inference", fail)
    with pytest.raises(memory.InsufficientMemoryError, match="out of memory during offline synthesis"):
        tiny.synthesize([1, 2, 3])
    monkeypatch.setattr(cli, "load_engine", lambda *a: tiny)
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3")
    assert cli.main(["synth", "--model", "tiny", "--tokens", str(tokens), "--out", str(tmp_path / "o.wav")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("token2wav synth: error: out of memory during offline synthesis")


def test_out_of_memory_while_streaming_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 999 bytes")

    monkeypatch.setattr(tiny.flow, "stream_step", fail)
    monkeypatch.setattr(tiny.flow, "stream_step_rows", fail)  # a stream alone steps on pages
    monkeypatch.setattr(cli, "load_engine", lambda *a: tiny)
    tokens = tmp_path / "t.txt"
    tokens.write_text(" ".join(["1"] * 60))
    code = cli.main(["synth", "--model", "tiny", "--tokens", str(tokens), "--out", str(tmp_path / "o.wav"),
                     "--stream"])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert "out of memory during synth" in line and "can't allocate memory" in line
