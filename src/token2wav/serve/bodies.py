"""Request bodies read with their size capped: a declared length over the limit is refused before reading,
and a chunked body (no declared length) is counted as it arrives."""

from __future__ import annotations

from starlette.requests import Request

from token2wav.serve import protocol as P

__all__ = ["read_body"]


async def read_body(request: Request, limit: int, limit_name: str = "max_message_bytes") -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.ProtocolError(f"request body of {declared} bytes exceeds {limit_name}={limit}", ws_code=P.WS_TOO_BIG)
    chunks: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:  # chunked uploads carry no length: count as we go
            raise P.ProtocolError(f"request body exceeds {limit_name}={limit}", ws_code=P.WS_TOO_BIG)
        chunks.append(part)
    return b"".join(chunks)
