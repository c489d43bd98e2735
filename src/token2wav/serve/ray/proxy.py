"""ASGI middleware for Ray Serve's HTTP proxy: a stream whose replica died ends with an error and a close code.

When a replica process dies, Serve's proxy ends the client's WebSocket without a close frame (the client sees an
abnormal closure, 1006, and no reason). :class:`StreamGuard` wraps the proxy's ASGI app: on a ``/v1/stream``
WebSocket that was accepted, is still open on the client's side and was not closed by the replica, it sends the
protocol's ``error`` message (``code`` 1011, ``status`` 502) and closes with 1011, so a client knows to start a
new stream (which Serve routes to a live replica). Serve installs it from the environment variable
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=token2wav.serve.ray.proxy:middlewares`` of the Ray nodes;
``token2wav serve --ray`` sets it for the local Ray it starts. No Ray import here.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

__all__ = ["CALLBACK_ENV", "CALLBACK_PATH", "LOST_MESSAGE", "StreamGuard", "middlewares"]

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "token2wav.serve.ray.proxy:middlewares"
WS_INTERNAL_ERROR = 1011
LOST_MESSAGE = "replica lost: the server process running this stream stopped; start a new stream"


class StreamGuard:
    """Pure ASGI middleware; only WebSockets on paths ending in ``stream_path`` are watched."""

    def __init__(self, app: Any, stream_path: str = "/v1/stream") -> None:
        self.app = app
        self.stream_path = stream_path

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "websocket" or not str(scope.get("path", "")).endswith(self.stream_path):
            await self.app(scope, receive, send)
            return
        seen = {"accepted": False, "closed": False, "client_gone": False}

        async def watch_receive() -> Any:
            message = await receive()
            if message.get("type") == "websocket.disconnect":
                seen["client_gone"] = True
            return message

        async def watch_send(message: dict[str, Any]) -> None:
            kind = message.get("type")
            if kind == "websocket.accept":
                seen["accepted"] = True
            elif kind == "websocket.close":
                seen["closed"] = True
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        finally:
            if seen["accepted"] and not seen["closed"] and not seen["client_gone"]:
                error = {"type": "error", "code": WS_INTERNAL_ERROR, "status": 502, "message": LOST_MESSAGE}
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.send", "text": json.dumps(error)})
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": WS_INTERNAL_ERROR, "reason": "replica lost"})


def middlewares() -> list[Any]:
    """The callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Serve's proxy applies these."""
    from starlette.middleware import Middleware

    return [Middleware(StreamGuard)]
