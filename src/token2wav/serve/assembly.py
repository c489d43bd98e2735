"""Assembling a server: turning server settings into a loaded engine, its batcher and the FastAPI app.

``token2wav serve`` (one process) and every Ray Serve replica (``serve/ray/``) describe the server they run as
one :class:`ServerSpec` and build it with :func:`build_server`: the same engine loading, warm-up, batcher and
app. Every server runs its streams through a batcher; without batching it is a batcher of one (``max_batch``
1), so one compute path and one memory budget (``max_cache_mb``) serve both.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

from token2wav.serve.protocol import ServerLimits

__all__ = ["AssembledServer", "ServerSpec", "build_server"]


@dataclass(frozen=True)
class ServerSpec:
    """What a server is built from (checked by whoever builds it from its options: the command line, Ray's).

    ``model``: a model directory, bundled name, model id or a ``bench:`` architecture (random weights, for load
    tests). ``batching`` False: streams run one chunk at a time (a batcher of one); ``graphs`` applies to
    batching only. ``max_cache_mb``: the memory budget of the streams' caches, prompt states and registry (None:
    unbounded, counted for /metrics). ``api_key`` / ``allow_origins`` / ``allowed_hosts``: the
    :class:`token2wav.serve.auth.AccessPolicy`. ``name``: the model's name the server shows (default: from
    ``model``). ``calibrate``: measure the model's chunk times before serving (a few seconds), so that the first
    stream's plan and start buffer come from measurements, not a cold guess.
    """

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    vocoder_precision: str = "float32"  # or "bfloat16-mixed" (HiFi-GAN vocoders: Token2Wav.from_pretrained)
    threads: int | None = None  # torch intra-op threads (None: torch's choice)
    batching: bool = True
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_cache_mb: float | None = None
    batch_workers: int | None = None
    graphs: bool = False
    calibrate: bool = True  # measure chunk times before serving (Batcher.calibrate)
    limits: ServerLimits = field(default_factory=ServerLimits)
    api_key: str | None = field(default=None, repr=False)  # never printed
    allow_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    prompt_dir: str | None = None
    name: str | None = None

    @property
    def max_cache_bytes(self) -> int | None:
        return None if self.max_cache_mb is None else int(self.max_cache_mb * 2**20)


@dataclass
class AssembledServer:
    """A built server: the engine, the batcher that runs its streams, the app (which closes the batcher at
    shutdown) and the seconds building took (loading and warming up, mostly)."""

    spec: ServerSpec
    t2w: Any
    batcher: Any
    app: Any
    load_s: float


def _load_engine(spec: ServerSpec) -> Any:
    """The spec's engine, loaded (not warmed up)."""
    if spec.model.startswith("bench:"):  # the random-weight architectures of `token2wav bench`, for load tests
        from token2wav.bench import bench_engine

        if spec.vocoder_precision != "float32":  # their vocoders are HiFT
            raise ValueError(f"--vocoder-precision {spec.vocoder_precision} applies to HiFi-GAN vocoders (the demo "
                             f"voice); {spec.model} has HiFT: use float32")
        return bench_engine(spec.model, spec.device, spec.dtype)
    import torch

    from token2wav import Token2Wav

    return Token2Wav.from_pretrained(spec.model, device=spec.device, dtype=getattr(torch, spec.dtype),
                                     vocoder_precision=spec.vocoder_precision)


def build_server(spec: ServerSpec) -> AssembledServer:
    """Set torch's threads, load and warm up the engine, make its batcher and build the app around them, then
    measure the model's chunk times (``spec.calibrate``, ``Batcher.calibrate``).

    The building runs on a short-lived thread: the OpenMP pool that loading starts ends with it, and the
    batcher's worker keeps the process's only pool (token2wav.threads)."""
    from token2wav.serve.app import first_hop
    from token2wav.threads import run_in_short_lived_thread

    server = run_in_short_lived_thread(_build_server, spec, name="token2wav-load")
    _settle_garbage()
    if spec.calibrate:
        # once the loading thread (and its OpenMP pool) has ended: beside a second pool every operator runs
        # slower, and the calibration measured it (12-token demo chunks 0.20-0.25 s against 0.16 s when serving)
        t0 = time.perf_counter()
        try:
            # the hop the server's streams start from, after the default prompt (None)
            run_in_short_lived_thread(server.batcher.calibrate, hop=first_hop(server.t2w, None),
                                      name="token2wav-calibrate")
        except BaseException:
            server.batcher.close()
            raise
        server.load_s += time.perf_counter() - t0
        _settle_garbage()
    return server


def _settle_garbage() -> None:
    """Collect, then move what exists (the model, its modules, the app: it lives as long as the server) out of
    the collector's way. Otherwise every full collection walks it, 0.10-0.13 s with the demo voice (2 ms
    without), and the chunk it lands in is that much late: a first stream's first chunk, a stall later on, or a
    slow chunk measured by the calibration."""
    gc.collect()
    gc.freeze()


def _build_server(spec: ServerSpec) -> AssembledServer:
    from token2wav.loading import display_name
    from token2wav.serve.app import create_app
    from token2wav.serve.auth import AccessPolicy

    t0 = time.perf_counter()
    access = AccessPolicy(api_key=spec.api_key, allow_origins=spec.allow_origins, allowed_hosts=spec.allowed_hosts)
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    t2w = _load_engine(spec)
    t2w.warm_up()
    if spec.batching:
        batcher = t2w.batcher(max_batch=spec.max_batch, max_wait_ms=spec.max_wait_ms,
                              max_cache_bytes=spec.max_cache_bytes, workers=spec.batch_workers, graphs=spec.graphs)
    else:  # a batch of one: each chunk runs as soon as it is queued, under the same budget
        batcher = t2w.batcher(max_batch=1, max_wait_ms=0.0, max_cache_bytes=spec.max_cache_bytes,
                              workers=spec.batch_workers)
    try:
        app = create_app(t2w, name=spec.name or display_name(spec.model), limits=spec.limits, access=access,
                         prompt_dir=spec.prompt_dir, batcher=batcher)
    except BaseException:
        batcher.close()  # its worker threads
        raise
    return AssembledServer(spec=spec, t2w=t2w, batcher=batcher, app=app, load_s=time.perf_counter() - t0)
