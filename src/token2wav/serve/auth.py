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
* Without a key the server only binds to a loopback address, unless ``--insecure`` says otherwise, and it
  answers only requests whose ``Host`` names it: a loopback name (``localhost``, ``127.x.x.x``, ``[::1]``), the
  ``--host`` it listens on, or the host of an ``--allow-origin``. A foreign name that a DNS-rebinding attack
  points at 127.0.0.1 is refused (HTTP 421, WebSocket close 1008) before it reaches the model.
* Every state-changing HTTP request (POST and the like) is held to the same ``Origin`` rule as WebSockets,
  and bodies of the types an HTML form can send across sites without a CORS preflight (``text/plain``,
  ``application/x-www-form-urlencoded``) are refused (415): a page elsewhere cannot register prompts or run
  synthesis through the user's browser.
* The key never appears in a ``repr``, a log line or an error: keys are printable ASCII (what a header can
  carry), and a ``token`` query parameter is masked in logs however its name is percent-encoded.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

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


def host_name(host: str | None) -> str:
    """The name in a ``Host`` header, lower case, without port or brackets (``[::1]:80`` -> ``::1``)."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(frozen=True)
class AccessPolicy:
    """``api_key`` None: no key required. ``allow_origins``: extra web origins (``"*"``: any) for WebSockets
    and state-changing HTTP requests. ``allowed_hosts``: host names a keyless server answers besides loopback
    ones (the ``--host`` it listens on; ``"*"``: any, for ``--insecure`` on all interfaces)."""

    api_key: str | None = field(default=None, repr=False)
    allow_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None:
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
                raise ValueError(f"the access key must be at least {MIN_KEY_CHARS} characters long")
            if not all("!" <= c <= "~" for c in key):
                raise ValueError("the access key must be printable ASCII without spaces (what an HTTP header "
                                 "can carry)")
        origins = []
        for o in self.allow_origins:
            try:
                origins.append(o if o == "*" else normalize_origin(o))
            except ValueError as e:
                raise ValueError(f"--allow-origin: {e}") from None
        object.__setattr__(self, "allow_origins", tuple(origins))
        hosts = {h if h == "*" else host_name(h) for h in self.allowed_hosts}
        hosts |= {host_name(urlsplit(o).netloc) for o in origins if o not in ("*", "null")}
        object.__setattr__(self, "allowed_hosts", tuple(sorted(h for h in hosts if h)))

    def host_allowed(self, host: str | None) -> bool:
        """A keyless server answers loopback names and its own; with a key the key is the defence."""
        if self.api_key is not None or "*" in self.allowed_hosts:
            return True
        name = host_name(host)
        return bool(name) and (is_loopback(name) or name in self.allowed_hosts)

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


FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded")  # sent cross-site with no CORS preflight


def _media_type(scope: Scope) -> str:
    return (_header(scope, b"content-type") or "").split(";")[0].strip().lower()


def _is_public_page(scope: Scope) -> bool:
    """GET/HEAD of the web page (``/``), its icon and static files (``/static/...``): served without a key."""
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path in ("/", "/favicon.ico") or path.startswith("/static/"))


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
        host = _header(scope, b"host")
        if not policy.host_allowed(host):
            await self._refuse(
                scope, receive, send, 421, "forbidden_host",
                f"Host {host_name(host)[:80]!r} is not a name of this server: a server without an access key "
                "answers loopback names and its --host only",
            )
            return
        changes_state = kind == "websocket" or scope.get("method") not in ("GET", "HEAD", "OPTIONS")
        if changes_state and not policy.origin_allowed(_header(scope, b"origin"), host, scope.get("scheme", "ws")):
            origin = (_header(scope, b"origin") or "")[:80]
            what = "WebSocket" if kind == "websocket" else f"{scope.get('method')} request"
            await self._refuse(
                scope, receive, send, 403, "forbidden_origin",
                f"{what} from origin {origin!r} refused: not this server's own origin; allow it with --allow-origin",
            )
            return
        if kind == "http" and changes_state and _media_type(scope) in FORM_TYPES:
            await self._refuse(
                scope, receive, send, 415, "form_content_type",
                f"Content-Type {_media_type(scope)} is refused (a cross-site form can send it): send JSON as "
                "application/json, audio as audio/*, or a multipart upload",
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

_QUERY_PARAM = re.compile(r"([?&;])([^=&;\s\"'#]+)=([^&;\s\"'#]*)")


def redact(text: str) -> str:
    """Masks the value of every query parameter whose name decodes to ``token`` (``token``, ``%74oken``,
    ``TOKEN``, ...): the server reads the key from such a parameter, so its log must not show it."""

    def mask(m: re.Match[str]) -> str:
        name = unquote_plus(m.group(2)).strip().lower()
        return f"{m.group(1)}{m.group(2)}=***" if name == "token" else m.group(0)

    return _QUERY_PARAM.sub(mask, text)


class RedactTokens(logging.Filter):
    """Masks ``token=...`` query parameters in log records (uvicorn logs WebSocket paths with their query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
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
