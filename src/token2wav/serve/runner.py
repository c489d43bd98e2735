"""Running the server: command-line options beyond the model's, access set-up, and graceful shutdown.

``token2wav serve`` adds :func:`add_server_options` to its parser and ends with :func:`run_server`.
Shutdown: on SIGTERM the server stops admitting (new streams get close 1001, ``/health`` answers 503
``draining``), lets open streams finish for up to ``--drain-timeout`` seconds, closes the rest with 1001
"server shutting down" and exits 0. SIGINT (Ctrl-C) does the same with at most ``INTERRUPT_DRAIN_S`` of
draining; a second signal closes the remaining streams at once, a third exits without waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Any

__all__ = ["INTERRUPT_DRAIN_S", "access_from_args", "add_server_options", "run_server"]

INTERRUPT_DRAIN_S = 2.0

log = logging.getLogger("token2wav.serve")


def add_server_options(p: argparse.ArgumentParser) -> None:
    """Options of ``token2wav serve`` about access, persistence, queueing and shutdown."""
    from token2wav.serve.auth import API_KEY_ENV

    p.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require this key on every request (Authorization: Bearer KEY; WebSocket: also ?token=KEY); "
        f"visible in the process list: prefer --api-key-file or ${API_KEY_ENV}",
    )
    p.add_argument("--api-key-file", metavar="FILE", help="read the access key from FILE")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an access key (anyone who can reach it can use it)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="web origin (scheme://host[:port], or *) whose pages may open streams; repeatable. "
        "Default: only the server's own origin",
    )
    p.add_argument(
        "--prompt-dir",
        metavar="DIR",
        help="keep registered prompts in DIR (written atomically, loaded at start): prompt ids survive restarts",
    )
    p.add_argument(
        "--max-queued-tokens",
        type=int,
        default=25 * 120,
        help="tokens a stream may have waiting to be decoded (default 3000); more ends the stream (1008, 429)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds open streams may take to finish before they are closed (default 30)",
    )


def access_from_args(args: argparse.Namespace) -> Any:
    """The :class:`AccessPolicy` of the command line; refuses a public address without a key, and a port that
    cannot be bound (ValueError)."""
    from token2wav.serve.auth import AccessPolicy, check_bind_address, resolve_api_key

    if isinstance(args.port, bool) or not isinstance(args.port, int) or not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    key = resolve_api_key(args.api_key, args.api_key_file)
    check_bind_address(args.host, has_key=key is not None, insecure=args.insecure)
    # a keyless server answers its own --host besides loopback names; on every interface (--insecure) any name
    wildcard = args.host.strip("[]") in ("0.0.0.0", "::", "")
    hosts = ("*",) if wildcard else (args.host,)
    policy = AccessPolicy(api_key=key, allow_origins=tuple(args.allow_origin), allowed_hosts=hosts)
    if not (args.drain_timeout >= 0 and args.drain_timeout < float("inf")):
        raise ValueError(f"--drain-timeout must be a finite number >= 0, got {args.drain_timeout}")
    return policy


def run_server(app: Any, *, host: str, port: int, log_level: str = "info", drain_timeout_s: float = 30.0) -> int:
    """Serve ``app`` until SIGTERM/SIGINT, then drain (see the module docstring). Returns the exit code."""
    from token2wav.serve.app import uvicorn_config

    show_own_logs(log_level)
    server = _draining_server_class()(
        # after the drain, connections that still do not close (a client that stopped reading) are not waited for
        uvicorn_config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5),
        state=app.state.server,
        drain_timeout_s=drain_timeout_s,
    )
    server.run()
    return 0 if server.started else 1


def show_own_logs(level: str) -> None:
    """Print token2wav's own log records (the server's, the batcher's per-call timings at ``debug``) at
    ``level``, in uvicorn's format; uvicorn configures only its own loggers."""
    logger = logging.getLogger("token2wav")
    logger.setLevel(level.upper())
    if not any(getattr(h, "token2wav_own", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        handler.token2wav_own = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self, config: Any, *, state: Any, drain_timeout_s: float) -> None:
            super().__init__(config)
            self.state = state
            self.drain_timeout_s = float(drain_timeout_s)
            self.signals: list[int] = []
            self.drain_task: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Unlike uvicorn's own handler, the signal is not re-raised after shutdown: a drained server
            # exits 0. The event loop picks the request up on its next tick (every 0.1 s).
            self.signals.append(sig)
            if len(self.signals) >= 3:
                self.force_exit = True
                self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            if self.signals and self.drain_task is None:
                first = self.signals[0]
                timeout = self.drain_timeout_s
                if first == signal.SIGINT:
                    timeout = min(timeout, INTERRUPT_DRAIN_S)
                print(
                    f"token2wav: {signal.Signals(first).name}: draining {self.state.open_sessions} open "
                    f"session(s) for up to {timeout:g} s",
                    file=sys.stderr,
                )
                self.drain_task = asyncio.create_task(self.state.drain(timeout))
            if len(self.signals) >= 2 and not self.state.closing.is_set():
                self.state.closing.set()  # a second signal: close the remaining streams now
            if self.drain_task is not None and self.drain_task.done():
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer
