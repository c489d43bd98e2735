"""Scale-out on Ray Serve: ``token2wav serve --ray``, ``python -m token2wav.serve.ray``, or ``serve deploy`` of
a Serve config file whose application has ``import_path: token2wav.serve.ray:build_app``.

This package can be imported without Ray (options, settings, ``--help``); what needs Ray lives in
``deployment.py`` and is imported only when a deployment is made. Install it with
``pip install 'token2wav[ray]'``.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from token2wav.serve.ray.settings import DEFAULTS, RaySettings, settings_from_options

__all__ = [
    "INSTALL_HINT",
    "RaySettings",
    "add_ray_options",
    "build_app",
    "options_from_args",
    "require_ray",
    "serve_on_ray",
    "settings_from_options",
]

INSTALL_HINT = "pip install 'token2wav[ray]'"


def require_ray() -> None:
    """Raise ValueError (one line, with the install command) when Ray Serve is not installed."""
    try:
        with warnings.catch_warnings():  # Ray's own deprecation warnings (pydantic) are not the user's concern
            warnings.simplefilter("ignore")
            import ray.serve  # noqa: F401
    except ImportError:
        raise ValueError(f"--ray needs Ray Serve, which is not installed: {INSTALL_HINT}") from None


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """Options of ``token2wav serve`` for running on Ray Serve."""
    g = p.add_argument_group("Ray Serve (scale-out; needs token2wav[ray])")
    g.add_argument("--ray", action="store_true", help="deploy the server on Ray Serve: one model per replica")
    g.add_argument("--replicas", type=int, help="number of replicas (default 1)")
    g.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas on open sessions")
    g.add_argument(
        "--target-sessions",
        type=float,
        help="open sessions per replica the autoscaler aims at (default: half of --max-sessions)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (auto, or ray://HOST:10001); default: start a local Ray bounded by "
        "--ray-cpus and --ray-object-store-mb, without dashboard",
    )
    g.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    g.add_argument(
        "--ray-object-store-mb", type=int, default=256, help="object store of the local Ray, MB (default 256)"
    )
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    g.add_argument("--replica-gpus", type=float, help="GPUs per replica, may be fractional (default: 1 on cuda)")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment options (keys of ``DEFAULTS``) of a ``token2wav serve --ray`` command line."""
    opts = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "vocoder_precision": args.vocoder_precision,
        "replicas": args.replicas,
        "autoscale": args.autoscale,
        "target_sessions": args.target_sessions,
        "replica_cpus": args.replica_cpus,
        "replica_gpus": args.replica_gpus,
        "max_sessions": args.max_sessions,
        "max_tokens": args.max_tokens,
        "max_message_bytes": args.max_message_bytes,
        "max_prompt_bytes": args.max_prompt_bytes,
        "idle_timeout": args.idle_timeout,
        "start_timeout": args.start_timeout,
        "workers": args.workers,
        "threads": args.threads,
        "batching": not args.no_batching,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "max_cache_mb": args.max_cache_mb,
        "batch_workers": args.batch_workers,
        "graphs": args.graphs,
        "calibrate": not args.no_calibrate,
        "max_queued_tokens": args.max_queued_tokens,
        "prompt_dir": args.prompt_dir,
        "api_key": args.api_key,
        "api_key_file": args.api_key_file,
        "allow_origin": list(args.allow_origin),
        "drain_timeout": args.drain_timeout,
    }
    assert set(opts) <= set(DEFAULTS)
    return {k: v for k, v in opts.items() if v is not None}


def serve_on_ray(args: argparse.Namespace) -> int:
    """``token2wav serve --ray``: check everything, then deploy and serve until SIGTERM/SIGINT."""
    require_ray()
    from token2wav.serve.runner import access_from_args

    access_from_args(args)  # a public --host without a key, or a bad --port, is refused here, as without --ray
    cpus = args.ray_cpus if args.ray_cpus is not None else (os.cpu_count() or 1)
    if args.ray_address is None:
        if not 1 <= cpus <= 4096:
            raise ValueError(f"--ray-cpus must be an integer in [1, 4096], got {cpus}")
        if not 80 <= args.ray_object_store_mb <= 1 << 20:
            raise ValueError(f"--ray-object-store-mb must be in [80, {1 << 20}], got {args.ray_object_store_mb}")
    elif not (args.ray_address == "auto" or ":" in args.ray_address):
        raise ValueError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT, got {args.ray_address!r}")
    if args.model is None:  # as without --ray: the bundled demo voice (the tiny model if it is not installed)
        from token2wav.loading import default_model

        args.model = default_model()
    options = options_from_args(args)
    settings = settings_from_options(options)  # every value checked before Ray starts
    need = settings.replica_cpus * (settings.replicas or settings.autoscale[0])  # type: ignore[index]
    if args.ray_address is None and need > cpus:
        raise ValueError(
            f"--replicas x --replica-cpus = {need:g} CPUs, more than the local Ray's --ray-cpus {cpus}: "
            "lower --replica-cpus (e.g. 0.5) or raise --ray-cpus"
        )
    from token2wav.serve.ray import deployment

    return deployment.run(
        options,
        host=args.host,
        port=args.port,
        address=args.ray_address,
        num_cpus=cpus,
        object_store_mb=args.ray_object_store_mb,
    )


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Ray Serve application builder: ``import_path: token2wav.serve.ray:build_app`` with ``args`` (the options
    of ``DEFAULTS``: model, replicas or autoscale, limits, ...)."""
    require_ray()
    from token2wav.serve.ray import deployment

    return deployment.build_app(args)
