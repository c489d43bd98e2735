"""Voice cloning from the command line (``token2wav prompt``, ``--prompt-wav``) and the server's WAV upload
(``POST /v1/prompts`` with ``audio/wav`` or multipart), on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from frontend_model import FRONTEND, make_model_dir
from safetensors.torch import load_file

from token2wav import Token2Wav, cli
from token2wav.serve.app import create_app, uvicorn_config
from token2wav.serve.protocol import ServerLimits

TIMEOUT = 30.0
MAX_PROMPT_BYTES = 1_500_000


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FRONTEND / "frontend.safetensors"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cv3_frontend_cli"))


def _expected_id(ref, wav: str) -> str:
    """The id the server gives the reference's own prompt arrays (its documented content hash)."""
    k = f"{wav}/prompt_cv3"
    h = hashlib.sha256()
    for arr in (ref[f"{k}/speech_token"][0].numpy().astype("<i8"), ref[f"{k}/speech_feat"][0].numpy().astype("<f4"),
                ref[f"{k}/embedding"][0].numpy().astype("<f4")):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return "p_" + h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------ CLI


def test_prompt_command_writes_the_reference_prompt(model_dir, ref, tmp_path, capsys) -> None:
    out = tmp_path / "p.npz"
    code = cli.main(["prompt", "--model", str(model_dir), str(FRONTEND / "dev2_22k_mono.wav"), "--out", str(out)])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("77 tokens, 3.08 s of speech, ") and line.endswith(f"ms -> {out}")
    with np.load(out) as z:
        assert np.array_equal(z["tokens"], ref["dev2_22k_mono/prompt_cv3/speech_token"][0].numpy())
        assert np.abs(z["mel"] - ref["dev2_22k_mono/prompt_cv3/speech_feat"][0].numpy()).max() <= 1.5e-2
        assert np.abs(z["embedding"] - ref["dev2_22k_mono/prompt_cv3/embedding"][0].numpy()).max() <= 1e-5


def test_prompt_command_saves_a_voice_and_synth_uses_it(model_dir, tmp_path, capsys) -> None:
    npz = tmp_path / "p.npz"
    wav = str(FRONTEND / "dev1_16k_mono.wav")
    assert cli.main(["prompt", "--model", str(model_dir), wav, "--out", str(npz), "--json"]) == 0
    assert '"tokens": 25' in capsys.readouterr().out
    assert cli.main(["prompt", "--model", str(model_dir), str(npz), "--save-as", "dev1"]) == 0
    assert "voice 'dev1'" in capsys.readouterr().out
    tokens = tmp_path / "t.json"
    tokens.write_text(str(list(range(100, 140))))
    outs = {}
    for name, extra in {"npz": ["--prompt", str(npz)], "wav": ["--prompt-wav", wav],
                        "voice": ["--speaker", "dev1"]}.items():
        outs[name] = tmp_path / f"{name}.wav"
        argv = ["synth", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(outs[name]), *extra]
        assert cli.main(argv) == 0, capsys.readouterr().err
    audio = {k: sf.read(str(v), dtype="int16")[0] for k, v in outs.items()}
    assert audio["npz"].size > 0 and np.abs(audio["npz"]).max() > 30
    assert np.array_equal(audio["npz"], audio["wav"]) and np.array_equal(audio["npz"], audio["voice"])
    (model_dir / "spk2info.pt").unlink()


def test_prompt_command_errors_are_one_line(model_dir, tmp_path, capsys) -> None:
    bare = make_model_dir(tmp_path / "bare", onnx=("speech_tokenizer_v3.onnx",))
    wav = str(FRONTEND / "dev1_16k_mono.wav")
    assert cli.main(["prompt", "--model", str(bare), wav, "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("token2wav prompt: error: ") and "no campplus.onnx (the CAM++ speaker model" in err
    assert "\n" not in err
    sf.write(str(tmp_path / "short.wav"), np.full(4000, 0.1, np.float32), 16000)
    assert cli.main(["prompt", "--model", str(model_dir), str(tmp_path / "short.wav"), "--save-as", "x"]) == 2
    assert "at least 0.5 s" in capsys.readouterr().err
    assert not (model_dir / "spk2info.pt").exists()  # nothing half-made
    tokens = tmp_path / "t.json"
    tokens.write_text("[1, 2, 3]")
    assert cli.main(["synth", "--model", str(model_dir), "--tokens", str(tokens), "--out", "x.wav",
                     "--prompt", "a.npz", "--prompt-wav", wav]) == 2
    assert "alternatives" in capsys.readouterr().err


def test_prompt_command_without_onnxruntime_says_what_to_install(model_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    wav = str(FRONTEND / "dev1_16k_mono.wav")
    assert cli.main(["prompt", "--model", str(model_dir), wav, "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'token2wav[frontend]'" in err and "\n" not in err


# ------------------------------------------------------------------------------------------ server


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[str]:
    t2w = Token2Wav.from_pretrained(model_dir, n_timesteps=4)
    limits = ServerLimits(max_prompt_bytes=MAX_PROMPT_BYTES, workers=2)
    with _serve(create_app(t2w, name="cv3-frontend", limits=limits)) as hostport:
        yield hostport


def _wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_wav_upload_gets_the_id_of_the_reference_prompt(server, ref) -> None:
    url = f"http://{server}/v1/prompts"
    data = (FRONTEND / "dev1_16k_mono.wav").read_bytes()
    want = _expected_id(ref, "dev1_16k_mono")
    r = httpx.post(url, content=data, headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt_id": want, "tokens": 25, "mel_frames": 50}
    r = httpx.post(url, files={"file": ("voice.wav", data, "audio/wav")}, timeout=TIMEOUT)  # multipart
    assert r.status_code == 200 and r.json()["prompt_id"] == want
    k = "dev1_16k_mono/prompt_cv3"
    body = {"tokens": ref[f"{k}/speech_token"][0].tolist(), "mel": ref[f"{k}/speech_feat"][0].tolist(),
            "embedding": ref[f"{k}/embedding"][0].tolist()}
    assert httpx.post(url, json=body, timeout=TIMEOUT).json()["prompt_id"] == want  # JSON path unchanged


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda: _wav_bytes(np.full((12 * 48000, 2), 0.1, np.float32), 48000), 413, "max_prompt_bytes"),
        (lambda: _wav_bytes((0.2 * np.sin(np.arange(31 * 16000) / 9)).astype(np.float32), 16000), 400,
         "at most 30 s"),
        (lambda: _wav_bytes(np.full(4000, 0.2, np.float32), 16000), 400, "at least 0.5 s"),
        (lambda: _wav_bytes(np.full(16000, 0.2, np.float32), 8000), 400, ">= 16000 Hz"),
        (lambda: _wav_bytes(np.zeros(16000, np.float32), 16000), 400, "silent"),
        (lambda: b"RIFF....WAVEnot really", 400, "not a readable audio file"),
    ],
)
def test_wav_upload_limits(server, make, status, words) -> None:
    r = httpx.post(f"http://{server}/v1/prompts", content=make(), headers={"Content-Type": "audio/wav"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_upload_to_a_model_without_front_end_is_501(tmp_path) -> None:
    bare = make_model_dir(tmp_path / "bare", onnx=())
    app = create_app(Token2Wav.from_pretrained(bare, n_timesteps=2), limits=ServerLimits(workers=1))
    with _serve(app) as hostport:
        r = httpx.post(f"http://{hostport}/v1/prompts", content=(FRONTEND / "dev1_16k_mono.wav").read_bytes(),
                       headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 501 and "campplus.onnx" in r.json()["error"]


def test_multipart_without_a_file_is_400(server) -> None:
    r = httpx.post(f"http://{server}/v1/prompts", data={"name": "x"}, files={"meta": (None, "x")}, timeout=TIMEOUT)
    assert r.status_code == 400 and "no file part" in r.json()["error"]


def test_client_command_uploads_the_wav(server, model_dir, ref, tmp_path, capsys) -> None:
    tokens = tmp_path / "t.txt"
    tokens.write_text(" ".join(str(t) for t in range(200, 260)))
    out = tmp_path / "client.wav"
    argv = ["client", "--url", f"ws://{server}/v1/stream", "--tokens", str(tokens), "--rate", "0",
            "--prompt-wav", str(FRONTEND / "dev1_16k_mono.wav"), "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    streamed, sr = sf.read(str(out), dtype="float32")
    assert sr == 24000 and np.abs(streamed).max() > 1e-3
    # the same stream in process with the reference's prompt arrays: equal up to the int16 rounding of the wire
    from token2wav import Prompt

    k = "dev1_16k_mono/prompt_cv3"
    prompt = Prompt(ref[f"{k}/speech_token"], ref[f"{k}/speech_feat"], ref[f"{k}/embedding"])
    t2w = Token2Wav.from_pretrained(model_dir, n_timesteps=4)
    with t2w.stream(prompt) as s:
        local = np.concatenate([*s.push(list(range(200, 260))), s.finish()])
    assert streamed.shape == local.shape
    assert np.abs(streamed - local).max() <= 2 / 32768
