"""Property-based checks (hypothesis) of everything a client can hand the server: protocol messages, uploads
(WAV, FLAC and OGG with odd rates, channel counts and lengths, and damaged headers), prompt JSON and prompt files.

The property is always the same: a clear refusal (ProtocolError / ValueError / a skipped file) or a result
within the limits; never another exception, never memory or work beyond the limits.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from token2wav.frontend.audio_file import MAX_CHANNELS, MAX_DECODED_SAMPLES, MAX_RATE, read_audio_bounded
from token2wav.serve import protocol as P
from token2wav.serve.prompt_store import PromptStore, prompt_id

VOCAB = 100
# derandomize: the same examples on every run, so CI is reproducible (a failure found locally is kept as a case)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)
message_keys = st.sampled_from(["type", "tokens", "prompt_id", "preset", "hop", "mode", "window_frames",
                                "pre_lookahead_len", "format", "attention", "mel", "embedding", "x"])
messages = st.dictionaries(message_keys, json_values, max_size=6) | json_values


def _raw(value: object, mangle: bytes) -> bytes:
    return json.dumps(value).encode() if not mangle else json.dumps(value).encode()[: len(mangle)] + mangle


@SETTINGS
@given(messages, st.binary(max_size=4))
def test_protocol_messages_are_parsed_or_refused(value: object, mangle: bytes) -> None:
    raw = _raw(value, mangle)
    for parse in (P.parse_client_message, P.parse_synthesize_request):
        try:
            parse(raw, VOCAB)
        except P.ProtocolError as e:
            assert e.message and 400 <= e.status < 600


@SETTINGS
@given(
    st.lists(st.integers(-5, 2 * VOCAB), max_size=40) | json_values,
    st.lists(st.lists(st.floats(width=32, allow_nan=True), min_size=0, max_size=4), max_size=6) | json_values,
    st.lists(st.floats(width=32, allow_nan=True), max_size=8) | json_values,
)
def test_prompt_json_is_parsed_or_refused(tokens: object, mel: object, emb: object) -> None:
    raw = json.dumps({"tokens": tokens, "mel": mel, "embedding": emb}).encode()
    try:
        req = P.parse_prompt_request(raw, VOCAB, max_tokens=30)
    except P.ProtocolError as e:
        assert e.message
        return
    assert 0 < req.tokens.size <= 30 and req.tokens.min() >= 0 and req.tokens.max() < VOCAB
    assert req.mel.ndim == 2 and req.embedding.ndim == 1
    assert np.isfinite(req.mel).all() and np.isfinite(req.embedding).all()


FORMATS = [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]


# libvorbis's encoder (writing the test's own file, not our reading) crashes the process on some odd rates
# and channel counts: Ogg files are made at the rates and layouts recorders use; WAV and FLAC take any.
OGG_RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]


@SETTINGS
@given(
    st.sampled_from(FORMATS),
    st.integers(1, 400_000),
    st.integers(1, 10),
    st.integers(0, 3000),
    st.floats(0.01, 60.0),
    st.sampled_from(OGG_RATES),
)
def test_uploads_are_decoded_within_limits_or_refused(fmt, rate: int, channels: int, frames: int,
                                                      max_seconds: float, ogg_rate: int) -> None:
    kind, subtype = fmt
    if kind == "OGG":
        rate, channels = ogg_rate, min(channels, 2)
    buf = io.BytesIO()
    data = (0.1 * np.sin(np.arange(frames * channels) * 0.01)).astype(np.float32).reshape(frames, channels)
    try:
        sf.write(buf, data, rate, format=kind, subtype=subtype)
    except Exception:  # a combination the encoder refuses (Vorbis above its rates, FLAC past 655 kHz...)
        return
    try:
        got, got_rate = read_audio_bounded(buf.getvalue(), max_seconds)
    except ValueError as e:
        assert str(e)
        return
    assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == channels <= MAX_CHANNELS
    assert got_rate == rate <= MAX_RATE
    assert got.shape[0] <= max_seconds * rate and got.size <= MAX_DECODED_SAMPLES


@SETTINGS
@given(st.sampled_from(FORMATS[:3]), st.integers(0, 80), st.binary(min_size=1, max_size=8))
def test_damaged_audio_headers_are_refused_or_bounded(fmt, at: int, junk: bytes) -> None:
    kind, subtype = fmt
    buf = io.BytesIO()
    sf.write(buf, np.full((800, 2), 0.1, np.float32), 16000, format=kind, subtype=subtype)
    raw = bytearray(buf.getvalue())
    raw[at : at + len(junk)] = junk
    try:
        got, rate = read_audio_bounded(bytes(raw), 30.0)
    except ValueError:
        return
    assert got.size <= MAX_DECODED_SAMPLES and 1 <= rate <= MAX_RATE and got.shape[0] <= 30 * rate


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> PromptStore:
    return PromptStore(tmp_path_factory.mktemp("prompts"), vocab_size=VOCAB, max_file_bytes=1 << 20)


def _npz(arrays: dict[str, np.ndarray], deflate: bool) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for key, arr in arrays.items():
            b = io.BytesIO()
            np.save(b, arr, allow_pickle=False)
            z.writestr(f"{key}.npy", b.getvalue())
    return buf.getvalue()


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.integers(0, 2000), st.binary(min_size=1, max_size=16), st.sampled_from(
    ["tokens", "mel", "embedding", "prompt_id", "extra"]))
def test_prompt_files_are_read_or_skipped(store: PromptStore, deflate: bool, at: int, junk: bytes, drop: str) -> None:
    arrays = {"tokens": np.array([1, 2, 3]), "mel": np.ones((6, 80), np.float32), "embedding": np.ones(192, np.float32)}
    pid = prompt_id(*arrays.values())
    arrays["prompt_id"] = np.frombuffer(pid.encode(), np.uint8)
    if drop == "extra":
        arrays["extra"] = np.zeros(3)
    else:
        arrays.pop(drop)
    raw = bytearray(_npz(arrays, deflate))
    raw[at % len(raw) : at % len(raw) + len(junk)] = junk
    (store.directory / f"{pid}.npz").write_bytes(bytes(raw))
    got = store.load(pid)  # never raises: a valid prompt or None (warned)
    if got is not None:
        assert [a.shape for a in got] == [(3,), (6, 80), (192,)]
        assert got[0].max() < VOCAB and all(np.isfinite(a).all() for a in got[1:])
