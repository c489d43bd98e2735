"""``POST /v1/prompts`` with a recording: a WAV body (``Content-Type: audio/wav``) or a multipart form upload.

The recording is cloned into a prompt by the engine's ``prompt_from_wav`` (in the model thread pool) and
registered under an id named by the recording's decoded samples and the model's front end
(``prompt_store.audio_prompt_id``), so the same file gets the same id on every machine.

Multipart is parsed with the standard library's ``email`` parser rather than python-multipart: the body is
already size-capped in memory (``--max-prompt-bytes``) before parsing, there is one file to find, and it saves
a dependency that only this endpoint would use.
"""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from typing import Any

import numpy as np

from token2wav.serve import protocol as P
from token2wav.serve.prompt_store import audio_prompt_id

__all__ = ["AUDIO_TYPES", "audio_from_body", "prompt_request"]

AUDIO_TYPES = ("audio/", "application/octet-stream")  # a body of these types is a sound file (WAV, FLAC, ...)
_NOT_SUPPORTED = 501


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def audio_from_body(body: bytes, content_type: str | None) -> bytes | None:
    """The sound file in a request body, or None when the body is a JSON prompt."""
    media = _media_type(content_type)
    if media.startswith(AUDIO_TYPES):
        return body
    if media != "multipart/form-data":
        return None
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise P.ProtocolError("multipart body could not be parsed (missing or wrong boundary)")
    for part in msg.iter_parts():
        # the file field: one with a filename, or declared as audio
        if part.get_filename() is not None or _media_type(part.get_content_type()).startswith("audio/"):
            data = part.get_payload(decode=True)
            if data:
                return bytes(data)
    raise P.ProtocolError("multipart body has no file part: send the recording as a file field")


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    from token2wav.frontend.audio_file import read_audio_bounded
    from token2wav.frontend.prompt import MAX_PROMPT_SECONDS

    # the header is checked before decoding, and decoding stops at the limit (frontend/audio_file.py); n frames
    # at sr Hz are at most 30 s exactly when their 16 kHz resampling (ceil(n * 16000 / sr)) is
    return read_audio_bounded(data, MAX_PROMPT_SECONDS, limit_note="the speech tokenizer's limit")


def _clone(t2w: Any, data: bytes, speaker: str | None = None) -> tuple[Any, str]:
    """The prompt of a recording, and its id (from the samples and the model's front end, not the arrays)."""
    samples, sr = _decode(data)
    if speaker is not None:  # a voice's embedding instead of the speaker model's (the demo voice needs one)
        prompt = t2w.prompt_from_wav(samples, sample_rate=sr, speaker=speaker)
    else:
        prompt = t2w.prompt_from_wav(samples, sample_rate=sr)
    return prompt, audio_prompt_id(samples, sr, t2w.frontend_fingerprint(speaker))


async def prompt_request(
    state: Any, t2w: Any, content_type: str | None, body: bytes, speaker: str | None = None
) -> P.PromptRequest:
    """The prompt arrays of a ``/v1/prompts`` body: parsed JSON, or the clone of a recording (``speaker``: a
    voice of the model whose embedding the clone uses, from ``?speaker=``)."""
    # parsing a body of up to --max-prompt-bytes takes a while (0.1 s per MB): never on the event loop
    data = await state.run(audio_from_body, body, content_type)
    if data is None:
        return await state.run(P.parse_prompt_request, body, state.vocab_size, state.limits.max_prompt_tokens)
    if not callable(getattr(t2w, "prompt_from_wav", None)):
        raise P.ProtocolError("this server's engine cannot clone a voice from audio; post the prompt's arrays",
                              status=_NOT_SUPPORTED)
    if speaker is not None:
        voices = P.voice_names(t2w)
        if speaker not in voices:
            raise P.ProtocolError(f"?speaker={speaker[:40]!r} is not one of the model's voices: "
                                  f"{', '.join(voices) or 'it has none'}")
    try:
        prompt, pid = await state.run(_clone, t2w, data, speaker)
    except (ImportError, FileNotFoundError) as exc:  # the model has no front end (onnxruntime / ONNX files)
        raise P.ProtocolError(f"voice cloning is not available on this server: {exc}",
                              status=_NOT_SUPPORTED) from None
    except (ValueError, TypeError) as exc:  # too long, too short, silent, not audio, below 16 kHz; no ?speaker=
        raise P.ProtocolError(f"cannot clone a voice from this recording: {exc}") from None
    return P.PromptRequest(
        tokens=np.asarray(prompt.tokens, dtype=np.int64),
        mel=np.asarray(prompt.mel, dtype=np.float32),
        embedding=np.asarray(prompt.embedding, dtype=np.float32),
        prompt_id=pid,
    )
