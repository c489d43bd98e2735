"""One place assembles a server (serve/assembly.py): `token2wav serve` and every Ray replica build it from a spec.

Without batching the server still runs its streams through a batcher, of one (``max_batch`` 1), under the same
memory budget as with batching.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest
from test_server import TIMEOUT, running_server
from test_threads import _run

from token2wav.cli import main
from token2wav.serve.assembly import ServerSpec, build_server
from token2wav.serve.client import stream_tokens_sync
from token2wav.serve.protocol import ServerLimits

LIMITS = ServerLimits(max_sessions=4, workers=2)


def _demo_model() -> str:
    from token2wav.loading import default_model

    return default_model()  # the demo voice where it is installed, else the tiny model


@pytest.mark.parametrize("batching, max_batch", [(False, 1), (True, 3)])
def test_the_spec_builds_an_app_whose_streams_run_through_a_batcher(batching: bool, max_batch: int) -> None:
    spec = ServerSpec(model=_demo_model(), batching=batching, max_batch=3, max_wait_ms=1.0, max_cache_mb=64.0,
                      batch_workers=1, limits=LIMITS, name="assembled")
    server = build_server(spec)
    state = server.app.state.server
    assert state.batcher is server.batcher
    assert server.batcher.max_batch == max_batch
    assert server.batcher.memory.total_bytes == 64 << 20  # the budget of --max-cache-mb, batched or not
    assert state.name == "assembled" and state.limits is LIMITS and server.load_s > 0
    assert server.batcher.compute.measured  # calibrated before serving (the default)
    vocab = int(server.t2w.config.vocab_size)
    tokens = np.random.default_rng(0).integers(0, vocab, 40)
    with running_server(server.app) as addr:  # its lifespan closes the batcher at the end
        result = stream_tokens_sync(f"ws://{addr}/v1/stream", tokens, rate=0, receive_timeout=TIMEOUT)
    assert result.samples > 0
    assert server.batcher.sessions_open == 0


class _Built(Exception):
    """Raised by the stand-in build_server once it has the spec it was given."""


@pytest.fixture
def specs(monkeypatch: pytest.MonkeyPatch) -> list[ServerSpec]:
    seen: list[ServerSpec] = []

    def fake_build_server(spec: ServerSpec) -> Any:
        seen.append(spec)
        raise _Built

    monkeypatch.setattr("token2wav.serve.assembly.build_server", fake_build_server)
    return seen


def test_serve_command_builds_its_server_through_the_assembly(specs: list[ServerSpec], tmp_path: Any) -> None:
    args = ["serve", "--model", "tiny", "--no-batching", "--max-cache-mb", "32", "--threads", "1",
            "--prompt-dir", str(tmp_path), "--host", "127.0.0.1", "--allow-origin", "https://app.example",
            "--vocoder-precision", "bfloat16-mixed", "--no-calibrate"]
    with pytest.raises(_Built):
        main(args)
    (spec,) = specs
    assert (spec.model, spec.batching, spec.max_cache_mb, spec.threads, spec.prompt_dir) == (
        "tiny", False, 32.0, 1, str(tmp_path))
    assert spec.vocoder_precision == "bfloat16-mixed" and not spec.calibrate
    assert spec.allow_origins == ("https://app.example",) and spec.api_key is None
    assert "127.0.0.1" in spec.allowed_hosts and "app.example" in spec.allowed_hosts


def test_ray_replica_builds_its_server_through_the_assembly(specs: list[ServerSpec]) -> None:
    pytest.importorskip("ray.serve")
    from token2wav.serve.ray.deployment import Token2WavReplica
    from token2wav.serve.ray.settings import settings_from_options

    settings = settings_from_options({"model": "tiny", "batching": False, "max_batch": 5, "max_cache_mb": 16.0,
                                      "prompt_dir": "prompts", "vocoder_precision": "bfloat16-mixed",
                                      "calibrate": False})
    with pytest.raises(_Built):
        Token2WavReplica(settings)
    (spec,) = specs
    assert spec == settings.server_spec()
    assert (spec.model, spec.batching, spec.max_batch, spec.max_cache_mb) == ("tiny", False, 5, 16.0)
    assert spec.vocoder_precision == "bfloat16-mixed" and not spec.calibrate
    assert spec.prompt_dir is None  # the replicas' prompts go through the shared registry


def test_a_served_demo_voice_runs_the_vocoder_precision_it_was_given() -> None:
    server = build_server(ServerSpec(model="demo", vocoder_precision="bfloat16-mixed", batch_workers=1,
                                     limits=LIMITS, calibrate=False))
    assert server.t2w.vocoder.precision == "bfloat16-mixed"
    server.batcher.close()
    with pytest.raises(ValueError, match="applies to HiFi-GAN vocoders"):
        build_server(ServerSpec(model="bench:cv3", vocoder_precision="bfloat16-mixed", limits=LIMITS))


@pytest.mark.wallclock  # the calibration's chunk times decide what it asserts
def test_calibration_plans_the_first_stream_from_measurements() -> None:
    """Before any stream, the meter knows nothing and a first stream is told to buffer for a cold guess (demo
    voice: 3.2 s before its first chunk is measured). Calibrated, it holds the chunk sizes an adaptive stream
    starts with, over histories as long as a few seconds of speech, and the same stream is told what they say:
    on a machine with room (chunks at under 3/4 of their audio; about 0.55-0.7 on the 2-core AVX-512 EPYC,
    estimated from the chunk times in docs/benchmarks.md) a fraction of the cold guess. (On a 2-core AVX2 EPYC
    the demo runs at 0.9-1.1x real time: at a measured 1.0 its calibrated recommendation was 0.56 s in one run
    and 3.7 s, more than the cold guess, in another; at 0.80, 1.46 s against a 3.16 s cold guess, under half
    but not under a third, so 0.85 was too loose a bound.) Calibration leaves
    nothing open or reserved, and the server's one OpenMP pool (the batcher worker's); the server freezes its
    objects for the garbage collector.
    In a process of its own, as a server: beside another thread's pool every chunk measures 20-30 % slower."""
    out = _run(f"""
        import gc, json
        from token2wav.demo import low_latency_options
        from token2wav.serve.assembly import ServerSpec, build_server
        from token2wav.threads import run_in_short_lived_thread

        base = settled()
        server = build_server(ServerSpec(model={_demo_model()!r}, calibrate=False))
        batcher = server.batcher
        hop = low_latency_options(server.t2w, None).get("hop")

        def recommend():
            with batcher.stream(hop=hop, schedule="adaptive") as session:
                return session.recommended_start_buffer_s(), session.plan.hop, 1 / session.spec.audio_s_per_token

        cold, first, tokens_per_s = run_in_short_lived_thread(recommend)
        measured_before = batcher.compute.measured
        held = run_in_short_lived_thread(batcher.calibrate, hop=hop)
        pools = settled()
        warm = run_in_short_lived_thread(recommend)[0]
        print(json.dumps(dict(cold=cold, warm=warm, first=first, tokens_per_s=tokens_per_s, held=held,
                              measured_before=measured_before, measured=batcher.compute.measured, base=base,
                              frozen=gc.get_freeze_count(),
                              samples=list(batcher.compute.samples), pools=pools,
                              open=batcher.sessions_open, reserved=batcher.reserved_bytes)))
        batcher.close()
    """)
    first, samples = out["first"], out["samples"]
    assert not out["measured_before"] and out["measured"] and out["held"] == len(samples)
    assert {t for t, _, _ in samples} == {first, 2 * first}
    assert max(h for _, _, h in samples) >= 10.0 * out["tokens_per_s"] - 2 * first  # the mel stream's history
    assert all(s > 0 for _, s, _ in samples)
    assert out["open"] == 0 and out["reserved"] == 0
    assert out["pools"] == out["base"] + 1  # the batcher worker's (a 2-thread team: one native thread)
    assert out["warm"] != out["cold"], out  # planned from the measurements, not the guess
    load = statistics.median(s * out["tokens_per_s"] / t for t, s, _ in samples)  # compute per second of audio
    if load < 0.75:
        assert out["warm"] < out["cold"] / 3, (load, out)
    # the server's lifelong objects are out of the collector's way: a full collection walked them for 0.10-0.13 s
    assert out["frozen"] > 10_000, out["frozen"]
