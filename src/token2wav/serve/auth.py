"""Who may use the server: an access key, the web origins allowed to open streams, and where it may listen.

* With a key (``--api-key KEY``, ``--api-key-file FILE`` or ``$TOKEN2WAV_API_KEY``), every HTTP request must
  carry ``Authorization: Bearer KEY`` and every WebSocket the same header or, for browsers (which cannot set
  headers on a WebSocket), a ``token=KEY`` query parameter. A missing or wrong key is refused (HTTP 401,
  WebSocket close 1008) before the request reaches the application, so it causes no model work. Keys are
  compared in constant time (hashes of both sides), and the ``token`` parameter is masked in uvicorn's logs.
* A WebSocket upgrade carrying an ``Origin`` header (browsers always send one) is accepted only from the
  server's own origin (the origin whose host matches the request's ``Host``) or from an origin listed with
  ``--allow-origin``: a web page elsewhere cannot drive a server on the user's machine. Clients that are not
  browsers send no ``Origin`` and are not affected.
* Without a key the server only binds to a loopback address, unless ``--insecure`` says otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "API_KEY_ENV",
    "AccessMiddleware",
    "AccessPolicy",
    "RedactTokens",
    "check_bind_address",
    "is_loopback",
    "normalize_origin",
    "resolve_api_key",
]

API_KEY_ENV = "TOKEN2WAV_API_KEY"
MIN_KEY_CHARS = 8

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", errors="surrogatepass")).digest()


def normalize_origin(origin: str) -> str:
    """``HTTP://Example.com:80/`` -> ``http://example.com``; raises ValueError if it is not an origin."""
    if origin == "null":
        return origin
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"not a web origin (scheme://host[:port]): {origin[:80]!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"not a web origin (scheme://host[:port]): {origin[:80]!r}")
    return f"{parts.scheme}://{_netloc(parts.scheme, parts.netloc)}"


def _netloc(scheme: str, netloc: str) -> str:
    netloc = netloc.lower().rsplit("@", 1)[-1]
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(":" + default):
        netloc = netloc[: -len(default) - 1]
    return netloc


@dataclass(frozen=True)
class AccessPolicy:
    """``api_key`` None: no key required. ``allow_origins``: extra web origins (``"*"``: any) for WebSockets."""

    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None:
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
                raise ValueError(f"the access key must be at least {MIN_KEY_CHARS} characters long")
            if any(c.isspace() or not c.isprintable() for c in key):
                raise ValueError("the access key must not hold spaces or control characters")
        origins = []
        for o in self.allow_origins:
            try:
                origins.append(o if o == "*" else normalize_origin(o))
            except ValueError as e:
                raise ValueError(f"--allow-origin: {e}") from None
        object.__setattr__(self, "allow_origins", tuple(origins))

    def key_matches(self, presented: str | None) -> bool:
        if self.api_key is None:
            return True
        # hashing both sides first makes the comparison's time independent of where (and whether) they differ
        return hmac.compare_digest(_digest(presented or ""), _digest(self.api_key)) and presented is not None

    def origin_allowed(self, origin: str | None, host: str | None, scheme: str) -> bool:
        if origin is None:
            return True  # not a browser
        if "*" in self.allow_origins:
            return True
        try:
            norm = normalize_origin(origin)
        except ValueError:
            return False
        if norm in self.allow_origins:
            return True
        if norm == "null" or not host:
            return False
        # the server's own page: same host and port as the one the request was sent to
        own_scheme = "https" if scheme in ("https", "wss") else "http"
        return norm == f"{own_scheme}://{_netloc(own_scheme, host)}"


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _presented_key(scope: Scope) -> str | None:
    auth = _header(scope, b"authorization")
    if auth is not None:
        kind, _, value = auth.strip().partition(" ")
        return value.strip() if kind.lower() == "bearer" else ""
    if scope["type"] == "websocket":
        query = scope.get("query_string", b"").decode("latin-1")
        values = parse_qs(query, keep_blank_values=True).get("token")
        if values:
            return values[-1]
    return None


def _is_public_page(scope: Scope) -> bool:
    """GET/HEAD of the web page (``/``) and its static files (``/static/...``): served without a key."""
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))


class AccessMiddleware:
    """ASGI middleware applying an :class:`AccessPolicy` to every HTTP request and WebSocket.

    ``on_refuse(reason)`` is called for each refusal (``"unauthorized"`` or ``"forbidden_origin"``).
    """

    def __init__(self, app: Any, policy: AccessPolicy, on_refuse: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.policy = policy
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = self.policy
        if kind == "websocket" and not policy.origin_allowed(
            _header(scope, b"origin"), _header(scope, b"host"), scope.get("scheme", "ws")
        ):
            origin = (_header(scope, b"origin") or "")[:80]
            await self._refuse(
                scope, receive, send, 403, "forbidden_origin",
                f"WebSocket from origin {origin!r} refused: not this server's own origin; "
                "allow it with --allow-origin",
            )
            return
        if kind == "http" and _is_public_page(scope):  # the page holds no data: it asks for the key itself
            await self.app(scope, receive, send)
            return
        if not policy.key_matches(_presented_key(scope)):
            how = "'Authorization: Bearer <key>'" + (" or ?token=<key>" if kind == "websocket" else "")
            await self._refuse(scope, receive, send, 401, "unauthorized", f"missing or wrong access key: send {how}")
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, reason: str, msg: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason)
        body = {"type": "error", "code": 1008, "status": status, "message": msg}
        if scope["type"] == "http":
            from starlette.responses import JSONResponse

            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            response = JSONResponse({"error": msg, "status": status}, status_code=status, headers=headers)
            await response(scope, receive, send)
            return
        from starlette.websockets import WebSocket

        ws = WebSocket(scope, receive, send)
        try:
            await ws.accept()
            await ws.send_json(body)
            await ws.close(1008, msg[:120])
        except Exception:  # the client is already gone
            pass


# ------------------------------------------------------------------------------------------ logs

_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    return _TOKEN_IN_URL.sub(r"\1***", text)


class RedactTokens(logging.Filter):
    """Masks ``token=...`` query parameters in log records (uvicorn logs WebSocket paths with their query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_log_redaction(names: tuple[str, ...] = ("uvicorn.error", "uvicorn.access", "uvicorn")) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


# ------------------------------------------------------------------------------------------ set-up


def resolve_api_key(
    api_key: str | None, api_key_file: str | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The key from ``--api-key``, ``--api-key-file`` or ``$TOKEN2WAV_API_KEY`` (in that order), or None."""
    if api_key is not None and api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        with open(api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"--api-key-file: {api_key_file} is empty")
        return key
    if api_key is not None:
        return api_key
    env = os.environ if environ is None else environ
    return env.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, *, has_key: bool, insecure: bool) -> None:
    """Refuse to listen beyond this machine without an access key, unless ``insecure``."""
    if has_key or insecure or is_loopback(host):
        return
    raise ValueError(
        f"--host {host} is not a loopback address and no access key is set, so anyone who can reach it could "
        f"use the server: give --api-key-file FILE (or --api-key KEY, or ${API_KEY_ENV}), or --insecure"
    )
