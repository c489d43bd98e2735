"""Settings of a Ray Serve deployment of token2wav, checked before anything starts (no Ray import here).

One dictionary of plain values describes a deployment. ``token2wav serve --ray`` builds it from its command
line, a Serve config file gives it as the application's ``args``; :func:`settings_from_options` checks every
value and turns it into :class:`RaySettings`, which every replica receives.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from token2wav.models.hifigan import VOCODER_PRECISIONS
from token2wav.serve.assembly import ServerSpec
from token2wav.serve.protocol import LIMIT_MINIMUMS, ServerLimits

__all__ = ["DEFAULTS", "MAX_REPLICAS", "RaySettings", "settings_from_options"]

MAX_REPLICAS = 1024
# requests a replica may be handed beyond its max_sessions: /health and /metrics, and streams that the replica
# then refuses itself with close 1013 (the same answer as a full single server)
ONGOING_HEADROOM = 8

# every option a deployment takes, with its default (the names of `token2wav serve`'s flags, '-' -> '_')
DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "device": "cpu",
    "dtype": "float32",
    "vocoder_precision": "float32",
    "name": "token2wav",
    "replicas": 1,
    "autoscale": None,  # "MIN:MAX"
    "target_sessions": None,  # default: half of max_sessions
    "replica_cpus": 1.0,
    "replica_gpus": None,  # default: 1 on a cuda device, else 0
    "max_sessions": 16,
    "max_tokens": 25 * 600,
    "max_message_bytes": 1 << 20,
    "max_prompt_bytes": 16 << 20,
    "idle_timeout": 30.0,
    "start_timeout": 5.0,
    "workers": 4,
    "threads": None,
    "batching": True,
    "max_batch": 16,
    "max_wait_ms": 10.0,
    "max_cache_mb": None,
    "batch_workers": None,
    "graphs": False,
    "calibrate": True,
    "max_queued_tokens": 25 * 120,
    "prompt_dir": None,
    "max_registry_prompts": 4096,
    "max_registry_mb": 1024.0,
    "api_key": None,
    "api_key_file": None,
    "allow_origin": [],
    "drain_timeout": 30.0,
    "report_interval": 1.0,
}


@dataclass(frozen=True)
class RaySettings:
    """Everything a replica needs to build the same server ``token2wav serve`` runs."""

    model: str
    device: str
    dtype: str
    name: str
    vocoder_precision: str
    limits: ServerLimits
    replicas: int | None  # fixed count, or None with autoscaling
    autoscale: tuple[int, int] | None
    target_sessions: float
    replica_cpus: float
    replica_gpus: float
    threads: int | None
    batching: bool
    max_batch: int
    max_wait_ms: float
    max_cache_mb: float | None
    batch_workers: int | None
    graphs: bool
    calibrate: bool  # each replica measures its chunk times before serving (Batcher.calibrate)
    prompt_dir: str | None
    max_registry_prompts: int
    max_registry_mb: float  # the shared registry's arrays in memory (least recently used dropped; on disk stays)
    api_key: str | None = field(repr=False)  # never printed
    allow_origins: tuple[str, ...]
    drain_timeout: float
    report_interval: float

    def server_spec(self) -> ServerSpec:
        """The server every replica builds (:func:`token2wav.serve.assembly.build_server`). No prompt folder:
        the replicas' prompts go through the shared registry, which keeps ``prompt_dir`` itself."""
        return ServerSpec(
            model=self.model, device=self.device, dtype=self.dtype, vocoder_precision=self.vocoder_precision,
            threads=self.threads, batching=self.batching,
            max_batch=self.max_batch, max_wait_ms=self.max_wait_ms, max_cache_mb=self.max_cache_mb,
            batch_workers=self.batch_workers, graphs=self.graphs, calibrate=self.calibrate, limits=self.limits,
            api_key=self.api_key, allow_origins=self.allow_origins,
        )

    @property
    def max_ongoing_requests(self) -> int:
        return self.limits.max_sessions + ONGOING_HEADROOM

    def deployment_options(self) -> dict[str, Any]:
        """Options of ``serve.deployment(...)``: replica count or autoscaling on open sessions, resources."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            # Serve waits this long for open streams (ongoing requests) before it stops a replica
            "graceful_shutdown_timeout_s": self.drain_timeout,
            "graceful_shutdown_wait_loop_s": 0.5,
        }
        if self.autoscale is None:
            opts["num_replicas"] = self.replicas
        else:
            lo, hi = self.autoscale
            # a WebSocket stream is one ongoing request from 'start' to 'done': Serve's autoscaler, which keeps
            # ongoing requests per replica near its target, follows open sessions per replica
            opts["autoscaling_config"] = {
                "min_replicas": lo,
                "max_replicas": hi,
                "initial_replicas": lo,
                "target_ongoing_requests": self.target_sessions,
                "upscale_delay_s": 5.0,
                "downscale_delay_s": 60.0,
            }
        return opts


def _int(opts: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{_flag(key)} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(opts: dict[str, Any], key: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    v = opts[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if open_lo else v >= lo) and v <= hi
    if not ok:
        bracket = "(" if open_lo else "["
        raise ValueError(f"{_flag(key)} must be a number in {bracket}{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _autoscale(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    text = str(v)
    lo_s, sep, hi_s = text.partition(":")
    if sep and lo_s.strip().isdigit() and hi_s.strip().isdigit():
        lo, hi = int(lo_s), int(hi_s)
        if 1 <= lo <= hi <= MAX_REPLICAS:
            return lo, hi
    raise ValueError(f"--autoscale must be MIN:MAX with 1 <= MIN <= MAX <= {MAX_REPLICAS}, got {text!r}")


def settings_from_options(
    options: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None
) -> RaySettings:
    """Check ``options`` (keys of :data:`DEFAULTS`; missing ones take their default) and resolve them.

    Raises ValueError with one line naming the option and its allowed range. The access key comes from
    ``api_key``, ``api_key_file`` or ``$TOKEN2WAV_API_KEY``, as for ``token2wav serve``.
    """
    from token2wav.serve.auth import AccessPolicy, resolve_api_key

    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(DEFAULTS))}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("model", "device", "dtype", "name"):
        if not isinstance(opts[key], str) or not opts[key]:
            raise ValueError(f"{_flag(key)} must be a non-empty string, got {opts[key]!r}")
    if opts["dtype"] not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype must be one of float32, float16, bfloat16, got {opts['dtype']!r}")
    if opts["vocoder_precision"] not in VOCODER_PRECISIONS:
        raise ValueError(f"--vocoder-precision must be {' or '.join(VOCODER_PRECISIONS)}, got "
                         f"{opts['vocoder_precision']!r}")
    autoscale = _autoscale(opts["autoscale"])
    if autoscale is not None and options.get("replicas") is not None:
        raise ValueError("give --replicas N or --autoscale MIN:MAX, not both")
    replicas = None if autoscale is not None else _int(opts, "replicas", 1, MAX_REPLICAS)
    limits = ServerLimits(
        max_sessions=_int(opts, "max_sessions", 1, 100_000),
        max_tokens_per_session=_int(opts, "max_tokens", 1, 10**9),
        max_message_bytes=_int(opts, "max_message_bytes", LIMIT_MINIMUMS["max_message_bytes"], 1 << 30),
        max_prompt_bytes=_int(opts, "max_prompt_bytes", LIMIT_MINIMUMS["max_prompt_bytes"], 1 << 30),
        idle_timeout_s=_float(opts, "idle_timeout", 0, 86400, open_lo=True),
        start_timeout_s=_float(opts, "start_timeout", 0, 86400, open_lo=True),
        workers=_int(opts, "workers", 1, 1024),
        max_queued_tokens=_int(opts, "max_queued_tokens", 1, 10**9),
    )
    target = opts["target_sessions"]
    if target is None:
        target = max(1.0, limits.max_sessions / 2)
    else:
        opts["target_sessions"] = target
        target = _float(opts, "target_sessions", 0, limits.max_sessions, open_lo=True)
    gpus = opts["replica_gpus"]
    if gpus is None:
        gpus = 1.0 if opts["device"].startswith("cuda") else 0.0
    else:
        gpus = _float(opts, "replica_gpus", 0, 64)
    threads = None if opts["threads"] is None else _int(opts, "threads", 1, 1024)
    for flag in ("batching", "graphs", "calibrate"):
        if not isinstance(opts[flag], bool):
            raise ValueError(f"--{flag} must be true or false, got {opts[flag]!r}")
    cache_mb = None if opts["max_cache_mb"] is None else _float(opts, "max_cache_mb", 0, 1 << 30, open_lo=True)
    prompt_dir = opts["prompt_dir"]
    if prompt_dir is not None and (not isinstance(prompt_dir, str) or not prompt_dir):
        raise ValueError(f"--prompt-dir must be a folder path, got {prompt_dir!r}")
    origins = opts["allow_origin"]
    if isinstance(origins, str):
        origins = [origins]
    if not isinstance(origins, (list, tuple)) or not all(isinstance(o, str) for o in origins):
        raise ValueError(f"--allow-origin must be a list of origins, got {origins!r}")
    key = resolve_api_key(opts["api_key"], opts["api_key_file"], os.environ if environ is None else environ)
    access = AccessPolicy(api_key=key, allow_origins=tuple(origins))  # checks the key and the origins
    return RaySettings(
        model=opts["model"],
        device=opts["device"],
        dtype=opts["dtype"],
        name=opts["name"],
        vocoder_precision=opts["vocoder_precision"],
        limits=limits,
        replicas=replicas,
        autoscale=autoscale,
        target_sessions=target,
        replica_cpus=_float(opts, "replica_cpus", 0, 1024, open_lo=True),
        replica_gpus=gpus,
        threads=threads,
        batching=opts["batching"],
        max_batch=_int(opts, "max_batch", 1, 4096),
        max_wait_ms=_float(opts, "max_wait_ms", 0, 1000),
        max_cache_mb=cache_mb,
        batch_workers=None if opts["batch_workers"] is None else _int(opts, "batch_workers", 1, 64),
        graphs=opts["graphs"],
        calibrate=opts["calibrate"],
        prompt_dir=None if prompt_dir is None else os.path.abspath(prompt_dir),
        max_registry_prompts=_int(opts, "max_registry_prompts", 1, 10**7),
        max_registry_mb=_float(opts, "max_registry_mb", 0, 1 << 30, open_lo=True),
        api_key=access.api_key,
        allow_origins=access.allow_origins,
        drain_timeout=_float(opts, "drain_timeout", 0, 86400),
        report_interval=_float(opts, "report_interval", 0.05, 60),
    )
