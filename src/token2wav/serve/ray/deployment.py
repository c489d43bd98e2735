"""The Ray Serve deployment: ``token2wav serve``'s FastAPI app on every replica, prompts in one shared actor.

* Replicas. Each replica builds the server ``token2wav serve`` runs with
  :func:`token2wav.serve.assembly.build_server` (its model loaded once and warmed up, its own batcher, the app):
  same endpoints, protocol, limits and metrics as one process. Serve's
  proxy routes every HTTP request and every WebSocket to one replica; a WebSocket stays on it from ``start`` to
  ``done``. The replica's id is added to the ``started`` message (``"replica"``) and to every HTTP response
  (``X-Token2wav-Replica``).
* Prompts. :class:`PromptRegistry`, one named Ray actor per application, holds every registered prompt's arrays;
  each replica's prompt store writes through to it and reads from it what it does not hold, so a prompt
  registered through any replica works on all, and outlives any replica. With ``prompt_dir`` the actor also
  keeps the prompts on disk (the ``--prompt-dir`` format), so they outlive the actor and the cluster too.
* ``/health`` and ``/metrics``. Every replica reports its own to the registry each ``report_interval``; the
  replica that answers adds the others' recent reports: per replica and in total (see ``aggregate.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
from ray import serve

from token2wav.serve.ray import proxy
from token2wav.serve.ray.aggregate import merge_expositions, merge_health
from token2wav.serve.ray.settings import RaySettings, settings_from_options

__all__ = ["PromptRegistry", "REGISTRY_NAMESPACE", "Token2WavDeployment", "build_app", "registry_name", "run"]

log = logging.getLogger("token2wav.serve")

REGISTRY_NAMESPACE = "token2wav"
DEPLOYMENT_NAME = "Token2Wav"
REPLICA_HEADER = "x-token2wav-replica"
_STALE_REPORTS = 3.0  # a replica whose last report is older than this many intervals is left out
_REGISTRY_TIMEOUT_S = 10.0


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def registry_name(app_name: str) -> str:
    return f"token2wav-prompts-{app_name}"


# ------------------------------------------------------------------------------------------ shared registry


class _Registry:
    """Prompt arrays by id (least recently used dropped past ``max_prompts`` or ``max_bytes`` of arrays; still on
    disk with a folder) and the replicas' latest reports. Methods are idempotent, so Ray may retry them after a
    restart."""

    def __init__(self, vocab_size: int, prompt_dir: str | None, max_prompts: int, max_file_bytes: int,
                 max_bytes: int = 1 << 30) -> None:
        from token2wav.serve.prompt_store import PromptStore

        self.prompts: OrderedDict[str, Arrays] = OrderedDict()
        self.max_prompts = int(max_prompts)
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.store = None if prompt_dir is None else PromptStore(prompt_dir, vocab_size, max_file_bytes=max_file_bytes)
        self.reports: dict[str, tuple[float, dict[str, Any], str]] = {}
        self.saves = 0
        self.loads = 0

    def _keep(self, pid: str, arrays: Arrays) -> None:
        old = self.prompts.pop(pid, None)
        if old is not None:
            self.nbytes -= sum(a.nbytes for a in old)
        self.prompts[pid] = arrays
        self.nbytes += sum(a.nbytes for a in arrays)
        while self.prompts and (len(self.prompts) > self.max_prompts or self.nbytes > self.max_bytes):
            _, dropped = self.prompts.popitem(last=False)  # an entry larger than max_bytes is not kept at all
            self.nbytes -= sum(a.nbytes for a in dropped)

    def save(self, pid: str, tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> Arrays:
        """Register ``pid`` and return the arrays kept under it. A replica names a prompt by its input
        (prompt_store's docstring); the first arrays under an id are kept and handed back, so every replica
        serves the same prompt for it, whatever CPU computed a later clone of the same recording."""
        from token2wav.serve.prompt_store import is_prompt_id

        if not is_prompt_id(pid):
            raise ValueError(f"prompt registry: not a prompt id: {str(pid)[:40]!r}")
        self.saves += 1
        kept = self.prompts.get(pid)
        if kept is None and self.store is not None:
            kept = self.store.load(pid)
        if kept is None:
            arrays = (np.asarray(tokens), np.asarray(mel), np.asarray(embedding))
            kept = arrays if self.store is None else self.store.save(pid, *arrays)
        self._keep(pid, kept)
        return kept

    def load(self, pid: str) -> Arrays | None:
        self.loads += 1
        arrays = self.prompts.get(pid)
        if arrays is None and self.store is not None:
            arrays = self.store.load(pid)
            if arrays is not None:
                self._keep(pid, arrays)
        elif arrays is not None:
            self.prompts.move_to_end(pid)
        return arrays

    def stats(self) -> dict[str, Any]:
        return {"prompts": len(self.prompts), "bytes": self.nbytes, "saves": self.saves, "loads": self.loads,
                "pid": os.getpid()}

    def report(self, replica: str, health: dict[str, Any], metrics: str) -> None:
        self.reports[replica] = (time.time(), health, metrics)

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def recent(self, max_age_s: float) -> dict[str, tuple[dict[str, Any], str]]:
        now = time.time()
        for rid in [r for r, (t, _, _) in self.reports.items() if now - t > max_age_s]:
            del self.reports[rid]
        return {rid: (h, m) for rid, (_, h, m) in self.reports.items()}


PromptRegistry = ray.remote(_Registry)


def _registry(settings: RaySettings, vocab_size: int) -> Any:
    """The application's registry actor: created by the first replica that asks, found by the others."""
    return PromptRegistry.options(
        name=registry_name(settings.name),
        namespace=REGISTRY_NAMESPACE,
        lifetime="detached",  # outlives the replicas; removed by `token2wav serve --ray` on exit
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=1,
    ).remote(vocab_size, settings.prompt_dir, settings.max_registry_prompts, settings.limits.max_prompt_bytes,
             int(settings.max_registry_mb * 2**20))


class RegistryPromptStore:
    """The replica side of the registry, in the shape of :class:`token2wav.serve.prompt_store.PromptStore`
    (``save``/``load``/``load_all``) that the app's prompt handling already uses; called from worker threads."""

    def __init__(self, handle: Any, timeout_s: float = _REGISTRY_TIMEOUT_S) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def save(self, pid: str, tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> Arrays:
        try:
            return ray.get(self.handle.save.remote(pid, tokens, mel, embedding), timeout=self.timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:  # the app warns and keeps the prompt locally
            raise OSError(f"shared prompt registry unavailable: {type(e).__name__}") from None

    def load(self, pid: str) -> Arrays | None:
        try:
            return ray.get(self.handle.load.remote(pid), timeout=self.timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.warning("prompt registry: cannot load %s: %s", pid[:40], type(e).__name__)
            return None

    def load_all(self, limit: int | None = None) -> list[Any]:
        return []  # prompts are fetched from the registry when a session asks for them


# ------------------------------------------------------------------------------------------ the replica

_CURRENT: Token2WavReplica | None = None  # one replica per Ray actor process


class _Dispatch:
    """The ASGI app handed to ``serve.ingress``: forwards to the replica built in this process. (A plain object
    rather than the FastAPI app itself, because the app can only be built once the replica has its model.)"""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        replica = _CURRENT
        if replica is None:
            raise RuntimeError("token2wav replica not initialised")
        await replica.asgi(scope, receive, send)


class Token2WavReplica:
    """One replica: one model, one batcher, one app."""

    def __init__(self, settings: RaySettings) -> None:
        global _CURRENT
        from token2wav.serve.assembly import build_server

        t0 = time.perf_counter()
        self._reporter: asyncio.Task[None] | None = None
        self.settings = settings
        server = build_server(settings.server_spec())
        try:
            self.replica_id = str(serve.get_replica_context().replica_tag)
        except Exception:  # built outside Serve (tests of the class itself)
            self.replica_id = f"local-{os.getpid()}"
        self.node = ray.util.get_node_ip_address() if ray.is_initialized() else "local"
        self.registry = _registry(settings, int(server.t2w.config.vocab_size))
        app = server.app
        self.fastapi_app = app
        self.state = app.state.server
        self.state.prompt_store = RegistryPromptStore(self.registry)
        self._own_health, self._own_metrics = _replace_route(app, "/health"), _replace_route(app, "/metrics")
        self._install_cluster_routes()
        self.load_s = time.perf_counter() - t0
        _CURRENT = self
        log.info("token2wav replica %s ready in %.1f s (pid %d)", self.replica_id, self.load_s, os.getpid())

    # -- reports
    async def own_report(self) -> tuple[dict[str, Any], str]:
        health = json.loads((await self._own_health()).body)
        health.update(pid=os.getpid(), node=self.node, rss_mb=_rss_mb(), load_s=round(self.load_s, 2))
        metrics = (await self._own_metrics()).body.decode("utf-8")
        return health, metrics

    async def _report_forever(self) -> None:
        interval = self.settings.report_interval
        while True:
            with contextlib.suppress(Exception):  # a registry being restarted: report again next time
                health, metrics = await self.own_report()
                await asyncio.wait_for(self.registry.report.remote(self.replica_id, health, metrics), 5 * interval)
            await asyncio.sleep(interval)

    async def reports(self) -> dict[str, tuple[dict[str, Any], str]]:
        max_age = _STALE_REPORTS * self.settings.report_interval + 1.0
        try:
            out = dict(await asyncio.wait_for(self.registry.recent.remote(max_age), _REGISTRY_TIMEOUT_S))
        except Exception:  # the registry is being restarted: this replica alone
            out = {}
        out[self.replica_id] = await self.own_report()  # live, not the last report
        return out

    def _install_cluster_routes(self) -> None:
        from fastapi.responses import JSONResponse, Response

        from token2wav.serve.metrics import CONTENT_TYPE

        @self.fastapi_app.get("/health")
        async def health() -> Response:
            reports = await self.reports()
            body, status = merge_health(self.replica_id, {rid: h for rid, (h, _) in reports.items()})
            return JSONResponse(body, status_code=status)

        @self.fastapi_app.get("/metrics")
        async def metrics() -> Response:
            reports = await self.reports()
            return Response(merge_expositions({rid: m for rid, (_, m) in reports.items()}), media_type=CONTENT_TYPE)

    # -- ASGI
    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._reporter is None:  # the first call (the lifespan start-up) runs on the replica's event loop
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        kind = scope.get("type")
        rid = self.replica_id
        if kind == "http":

            async def send_tagged(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), rid.encode())]
                    message = {**message, "headers": headers}
                await send(message)

            await self.fastapi_app(scope, receive, send_tagged)
        elif kind == "websocket":
            tag = ',"replica":' + json.dumps(rid) + "}"

            async def send_tagged(message: dict[str, Any]) -> None:
                text = message.get("text") if message["type"] == "websocket.send" else None
                if text is not None and text.startswith('{"type":"started"') and text.endswith("}"):
                    message = {**message, "text": text[:-1] + tag}
                await send(message)

            await self.fastapi_app(scope, receive, send_tagged)
        else:
            await self.fastapi_app(scope, receive, send)

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        with contextlib.suppress(Exception):
            self.registry.forget.remote(self.replica_id)


def _replace_route(app: Any, path: str) -> Any:
    """Take the app's own GET ``path`` route out (its endpoint is returned: this replica's own answer)."""
    for route in list(app.router.routes):
        if getattr(route, "path", None) == path and "GET" in (getattr(route, "methods", None) or ()):
            app.router.routes.remove(route)
            return route.endpoint
    raise RuntimeError(f"the app has no GET {path} route")


def _rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


Token2WavDeployment = serve.ingress(_Dispatch())(Token2WavReplica)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve application builder (``import_path: token2wav.serve.ray:build_app``; ``args`` as in the config
    file, the options of :data:`token2wav.serve.ray.settings.DEFAULTS`)."""
    settings = settings_from_options(args)
    deployment = serve.deployment(Token2WavDeployment, name=DEPLOYMENT_NAME, **settings.deployment_options())
    return deployment.bind(settings)


# ------------------------------------------------------------------------------------------ `serve --ray`


def run(
    options: dict[str, Any],
    *,
    host: str,
    port: int,
    address: str | None,
    num_cpus: int,
    object_store_mb: int,
) -> int:
    """Deploy on Ray (a local one bounded to ``num_cpus`` and ``object_store_mb``, or the cluster at
    ``address``), serve until SIGTERM/SIGINT, then remove the application and stop what was started here."""
    settings = settings_from_options(options)
    t0 = time.perf_counter()
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(sig: int, frame: Any) -> None:
        signals.append(sig)
        stop.set()

    previous: dict[int, Any] = {}
    local = address is None
    try:
        if local:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # the proxy ends a stream whose replica died with an error message and close 1011 (serve/ray/proxy.py)
            os.environ.setdefault(proxy.CALLBACK_ENV, proxy.CALLBACK_PATH)
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_mb << 20,
                include_dashboard=False,
                namespace=REGISTRY_NAMESPACE,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, namespace=REGISTRY_NAMESPACE, logging_level=logging.WARNING)
        # after ray.init, which puts its own fatal-signal handler in place: these end the wait below instead
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(options), name=settings.name, route_prefix="/", blocking=False)
        except RuntimeError as e:  # a replica failed to start: its traceback is in the log above
            raise ValueError(f"Ray Serve could not deploy the application: {str(e).splitlines()[0]}") from None
        count = settings.replicas if settings.autoscale is None else f"{settings.autoscale[0]}-{settings.autoscale[1]}"
        print(
            f"token2wav: serving {settings.model} on Ray Serve, {count} replica(s), on http://{host}:{port} "
            f"(stream: ws://{host}:{port}/v1/stream); ready in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(f"token2wav: {signal.Signals(signals[0]).name}: removing the application", file=sys.stderr)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if ray.is_initialized():
            # each step bounded: when the whole process group got the signal (systemd, `timeout`), Ray's own
            # processes may be gone already and these calls would wait for them forever
            _bounded("removing the application", lambda: serve.delete(settings.name), settings.drain_timeout + 15)
            _bounded(
                "removing the prompt registry",
                lambda: ray.kill(ray.get_actor(registry_name(settings.name), namespace=REGISTRY_NAMESPACE)),
                10,
            )
            if local:
                _bounded("stopping Serve", serve.shutdown, 15)
            ray.shutdown()
    return 0


def _bounded(what: str, fn: Any, timeout_s: float) -> None:
    """Run ``fn`` for at most ``timeout_s`` (in a daemon thread); errors and overruns are reported, not raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=target, name=f"token2wav-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        print(f"token2wav: {what}: no answer from Ray within {timeout_s:g} s, going on", file=sys.stderr)
    elif errors and not isinstance(errors[0], ValueError):  # ValueError: nothing to remove
        print(f"token2wav: {what}: {type(errors[0]).__name__}: {errors[0]}", file=sys.stderr)
