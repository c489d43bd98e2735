"""The web page of ``token2wav serve`` and the small read-only endpoints it needs.

* ``GET /``: one self-contained page (``static/index.html``, ``app.js``, ``style.css`` shipped in the package;
  no build step, nothing fetched from another origin: the Content-Security-Policy says so to the browser).
* ``GET /static/{name}``: the page's script, style sheet and icon; ``GET /favicon.ico``: the icon again.
* ``GET /v1/voices``: the model's bundled voices (each registered as a prompt, so a stream's ``start`` can name
  it by ``prompt_id``), the prompts registered so far, and whether a recording can be cloned here.
* ``GET /v1/utterances``: the bundled held-out utterances (text, voice, tokens) of models that ship them.
* ``POST /v1/tokenize``: a recording (``audio/wav`` body, or any type soundfile reads) -> the model's speech
  tokens, for models with their own tokenizer (the demo voice); "speak like this recording".

The page and its files are served without an access key (they hold no data; the page asks for the key and sends
it with each request, ``?token=`` on the WebSocket). Every ``/v1/...`` endpoint here requires it like the rest.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from token2wav.demo import low_latency_options
from token2wav.serve import protocol as P
from token2wav.serve.bodies import read_body
from token2wav.serve.prompt_store import prompt_id

__all__ = ["install_page", "STATIC_FILES", "MAX_TOKENIZE_SECONDS"]

log = logging.getLogger("token2wav.serve")

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
MAX_TOKENIZE_SECONDS = 60.0


def _static(name: str) -> bytes:
    return resources.files("token2wav.serve").joinpath("static", name).read_bytes()


def _csp(host: str) -> str:
    # the page talks to its own server only: HTTP to 'self', the stream to ws(s)://<the same host>
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]{1,255}", host):
        host = "127.0.0.1"  # a Host header that is not a host[:port] never reaches the policy
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' ws://{host} wss://{host}; media-src 'self' blob:; base-uri 'none'; form-action 'none'"
    )


def _utterances(t2w: Any) -> list[dict[str, Any]]:
    """The held-out utterances shipped with the model (``files.demo_tokens`` of its config), else none."""
    cfg = getattr(t2w, "config", None)
    files = (getattr(cfg, "extra", None) or {}).get("files") or {}
    name = files.get("demo_tokens")
    path = getattr(cfg, "path", None)
    if not name or path is None:
        return []
    f = Path(path).parent / name
    if not f.is_file():
        return []
    data = json.loads(f.read_text())
    return [
        {"id": u.get("id", i), "speaker": u.get("speaker"), "text": u.get("text", ""), "tokens": list(u["tokens"])}
        for i, u in enumerate(data.get("utterances", []))
    ]


def _has_own_tokenizer(t2w: Any) -> bool:
    cfg = getattr(t2w, "config", None)
    files = (getattr(cfg, "extra", None) or {}).get("files") or {}
    return bool(files.get("tokenizer")) and callable(getattr(t2w, "tokenize", None))


def _decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    from token2wav.frontend.audio_file import read_audio_bounded

    try:
        samples, sr = read_audio_bounded(data, MAX_TOKENIZE_SECONDS, limit_note="the longest recording tokenized")
    except ValueError as e:
        raise P.ProtocolError(str(e)) from None
    if samples.shape[0] == 0:
        raise P.ProtocolError("the recording is empty")
    if not np.isfinite(samples).all():
        raise P.ProtocolError("the recording has non-finite samples")
    return samples.mean(axis=1), int(sr)


def install_page(app: FastAPI, state: Any) -> None:
    """Add the page and its endpoints to a server made by :func:`token2wav.serve.app.create_app`."""
    t2w = state.t2w
    speaker_ids: dict[str, str] = {}  # voice name -> prompt_id, registered on first use

    def page_response(name: str, request: Request) -> Response:
        headers = {
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": _csp(request.headers.get("host", "127.0.0.1")),
        }
        return Response(_static(name), media_type=STATIC_FILES[name], headers=headers)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        return page_response("index.html", request)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon(request: Request) -> Response:
        # browsers ask for it on every first load; a 404 there is a console error on every visit
        return page_response("icon.svg", request)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        if name not in STATIC_FILES or name == "index.html":
            return JSONResponse({"error": f"no such file: {name[:60]}", "status": 404}, status_code=404)
        return page_response(name, request)

    def register_speaker(name: str) -> tuple[str, Any]:
        prompt = t2w.speaker_prompt(name)
        tokens = np.asarray(prompt.tokens, dtype=np.int64).reshape(-1)
        mel = np.asarray(prompt.mel, dtype=np.float32)
        mel = mel.reshape(-1, mel.shape[-1])
        emb = np.asarray(prompt.embedding, dtype=np.float32).reshape(-1)
        return prompt_id(tokens, mel, emb), prompt

    @app.get("/v1/voices")
    async def voices() -> Response:
        bundled = []
        for name in P.voice_names(t2w):
            pid = speaker_ids.get(name)
            if pid is None or pid not in state.prompts:
                try:
                    pid, prompt = await state.run(register_speaker, name)
                except Exception as e:  # a voice without a usable prompt is left out, not fatal
                    log.warning("voice %s not offered: %s", name, e)
                    continue
                speaker_ids[name] = pid
                if pid not in state.prompts:
                    state.add_prompt(pid, prompt)
            entry = {"name": name, "prompt_id": pid}
            low = low_latency_options(t2w, state.prompts.get(pid))
            if "hop" in low:  # the first hop that needs no alignment pad after this voice's prompt
                entry["low_latency_hop"] = low["hop"]
            bundled.append(entry)
        mine = set(speaker_ids.values())
        registered = [pid for pid in state.prompts if pid not in mine]
        clone = callable(getattr(t2w, "prompt_from_wav", None))
        own_tokenizer = _has_own_tokenizer(t2w)
        return JSONResponse(
            {
                "speakers": bundled,
                "prompts": registered,
                "clone": clone,
                # a model without a speaker encoder (the demo voice) takes a voice's embedding for a clone
                "clone_needs_speaker": clone and own_tokenizer,
                "tokenize": own_tokenizer,
            }
        )

    @app.get("/v1/utterances")
    async def utterances() -> Response:
        return JSONResponse({"utterances": await state.run(_utterances, t2w)})

    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        if not await state.admit("tokenize"):  # a recording to read and decode: a session slot, as a stream
            err = state.busy_error()
            state.metrics.rejected_total.inc(reason=err.reason)
            return JSONResponse({"error": err.message, "status": err.status}, status_code=err.status)
        try:
            return await _tokenize(request)
        finally:
            state.release()

    async def _tokenize(request: Request) -> Response:
        try:
            if not _has_own_tokenizer(t2w):
                raise P.ProtocolError(
                    "this model has no speech tokenizer of its own (the bundled demo voice has one)", status=501
                )
            body = await read_body(request, state.limits.max_prompt_bytes, "max_prompt_bytes")
            wave, sr = await state.run(_decode_audio, body)  # decoding is work: off the event loop
            try:
                tokens = await state.run(t2w.tokenize, wave, sr)
            except (FileNotFoundError, KeyError, NotImplementedError) as e:
                raise P.ProtocolError(f"this model has no speech tokenizer: {e}", status=501) from None
            except ValueError as e:
                raise P.ProtocolError(f"cannot tokenize this recording: {e}") from None
        except P.ProtocolError as e:
            state.metrics.rejected_total.inc(reason=e.reason)
            return JSONResponse({"error": e.message, "status": e.status}, status_code=e.status)
        tokens = [int(t) for t in tokens]
        return JSONResponse({"tokens": tokens, "seconds": round(len(wave) / sr, 3), "sample_rate": sr})
