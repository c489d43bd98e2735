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


def _arrays_id(tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> str:
    """The documented id of a prompt posted as arrays, written out here from its definition (docs/exactness.md)."""
    h = hashlib.sha256()
    for arr in (tokens.astype("<i8"), mel.astype("<f4"), embedding.astype("<f4")):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return "p_" + h.hexdigest()[:24]


def _audio_id(wav: bytes, files: list, speaker: str = "") -> str:
    """The documented id of a recording, written out from its definition: sha256 of the front-end files
    (name|size|bytes each), then of a tag, that digest, the rate, the shape and the decoded float32 samples."""
    f = hashlib.sha256()
    for path in files:
        f.update(f"{path.name}|{path.stat().st_size}|".encode() + path.read_bytes())
    assert not speaker
    samples, sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    h = hashlib.sha256(b"token2wav audio prompt v1\0")
    h.update(f"{f.hexdigest()}|{sr}|{samples.shape}".encode() + np.ascontiguousarray(samples, "<f4").tobytes())
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
        # fixture README, from the WAV file: speech_feat_cv3 1.5e-2 (a log of tiny values), embedding 1e-5
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
    # one prompt cloned twice in this process (the npz and the voice hold its float32 arrays exactly), then the
    # same calls on the same shapes: bit for bit
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
    # an --out that cannot be written: refused before the recording is read (it does not exist either)
    assert cli.main(["prompt", "--model", str(model_dir), "missing.wav", "--out", str(tmp_path / "no" / "p.npz")]) == 2
    assert capsys.readouterr().err.strip() == (f"token2wav prompt: error: --out {tmp_path / 'no' / 'p.npz'}: the "
                                               f"folder {tmp_path / 'no'} does not exist")


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


def _front_end_files(model_dir) -> list:
    return [model_dir / "cosyvoice3.yaml", model_dir / "speech_tokenizer_v3.onnx", model_dir / "campplus.onnx"]


def test_wav_upload_id_names_the_recording_and_the_model(server, model_dir) -> None:
    url = f"http://{server}/v1/prompts"
    data = (FRONTEND / "dev1_16k_mono.wav").read_bytes()
    want = _audio_id(data, _front_end_files(model_dir))
    r = httpx.post(url, content=data, headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt_id": want, "tokens": 25, "mel_frames": 50}
    r = httpx.post(url, files={"file": ("voice.wav", data, "audio/wav")}, timeout=TIMEOUT)  # multipart
    assert r.status_code == 200 and r.json()["prompt_id"] == want
    # one sample one step louder: another recording, another id
    samples, sr = sf.read(io.BytesIO(data), dtype="int16")
    samples[8000] += 1
    other = httpx.post(url, content=_wav_bytes(samples, sr), headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT)
    assert other.status_code == 200 and other.json()["prompt_id"] not in (want, None)


def test_json_prompt_id_is_the_hash_of_the_arrays_sent(server, ref) -> None:
    k = "dev1_16k_mono/prompt_cv3"
    tokens, mel, emb = (ref[f"{k}/{n}"][0].numpy() for n in ("speech_token", "speech_feat", "embedding"))
    url = f"http://{server}/v1/prompts"
    body = {"tokens": tokens.tolist(), "mel": mel.tolist(), "embedding": emb.tolist()}
    assert httpx.post(url, json=body, timeout=TIMEOUT).json()["prompt_id"] == _arrays_id(tokens, mel, emb)
    body["embedding"][0] = float(np.nextafter(emb[0], np.float32(1)))  # one float32 step
    assert httpx.post(url, json=body, timeout=TIMEOUT).json()["prompt_id"] != _arrays_id(tokens, mel, emb)


class _OtherCpu:
    """The engine as another CPU runs it: its front end's mel differs in the last bits (FFT and GEMM kernels)."""

    def __init__(self, t2w: Token2Wav, ulps: int) -> None:
        self.t2w, self.ulps = t2w, ulps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.t2w, name)

    def prompt_from_wav(self, *args: Any, **kwargs: Any) -> Any:
        p = self.t2w.prompt_from_wav(*args, **kwargs)
        mel = p.mel.numpy()
        for _ in range(self.ulps):
            mel = np.nextafter(mel, np.float32(np.inf))
        return type(p)(p.tokens, torch.from_numpy(mel), p.embedding)


def test_the_same_recording_gets_the_same_id_and_prompt_on_other_cpus(model_dir, tmp_path) -> None:
    """Two servers sharing a --prompt-dir (as Ray replicas share the registry) whose CPUs compute the prompt's
    mel a few ulps apart: one id, and the first arrays registered are the ones both serve."""
    data = (FRONTEND / "dev2_22k_mono.wav").read_bytes()
    t2w = Token2Wav.from_pretrained(model_dir, n_timesteps=2)
    limits = ServerLimits(max_prompt_bytes=MAX_PROMPT_BYTES, workers=1)
    ids, stored = [], []
    for ulps in (0, 3):
        app = create_app(_OtherCpu(t2w, ulps), limits=limits, prompt_dir=str(tmp_path / "prompts"))
        with _serve(app) as hostport:
            r = httpx.post(f"http://{hostport}/v1/prompts", content=data, headers={"Content-Type": "audio/wav"},
                           timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            ids.append(r.json()["prompt_id"])
            stored.append(app.state.server.prompts.get(ids[-1]).mel.numpy().copy())
    assert ids[0] == ids[1] == _audio_id(data, _front_end_files(model_dir))
    assert np.array_equal(stored[0], stored[1])  # the second server serves the first one's arrays
    assert not np.array_equal(stored[0], _OtherCpu(t2w, 3).prompt_from_wav(FRONTEND / "dev2_22k_mono.wav").mel)


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
    if status == 400:
        assert r.json()["error"].startswith("cannot clone a voice from this recording: ")
        assert "<_io." not in r.json()["error"]  # libsndfile named the in-memory body by its address


def test_an_upload_for_a_voice_the_model_lacks_is_refused_before_decoding(server) -> None:
    r = httpx.post(f"http://{server}/v1/prompts?speaker=slt", content=b"not even audio",
                   headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"] == "?speaker='slt' is not one of the model's voices: it has none"


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
    # The same stream in process, cloning the same file on this CPU (the server's process): equal up to the
    # int16 rounding of the wire. (Not the reference's arrays: another CPU's front end moves the prompt mel by
    # up to 1.5e-2, see docs/exactness.md, and with it the audio.)
    t2w = Token2Wav.from_pretrained(model_dir, n_timesteps=4)
    prompt = t2w.prompt_from_wav(FRONTEND / "dev1_16k_mono.wav")
    with t2w.stream(prompt) as s:
        local = np.concatenate([*s.push(list(range(200, 260))), s.finish()])
    assert streamed.shape == local.shape
    # the same calls in one process give the same floats; the wire rounds v * 32767 to an int16 (half a step) and
    # the file reads back as / 32768 (|v| / 32768 <= one step more)
    assert np.abs(streamed - local).max() <= 2 / 32768


def _rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize("rate", [16005, 44101, 47999])
def test_odd_rate_uploads_are_cloned_in_bounded_memory(server, rate) -> None:
    """Rates whose reduced pair with 16/24 kHz is huge once needed a kernel of up to 706 M floats (tens of GB);
    the per-sample resampler keeps a 1 s upload within 100 MB of the server's peak (server and test share it)."""
    t = np.arange(rate) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    before = _rss_kib()
    r = httpx.post(f"http://{server}/v1/prompts", content=_wav_bytes(wave, rate),
                   headers={"Content-Type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] > 0
    assert _rss_kib() - before < 100 << 10


def test_compressed_bombs_are_refused_before_decoding(server) -> None:
    """A FLAC of 10 minutes of silence is a few KB and would decode to 230 MB: its header says how long it is,
    so it is refused before decoding, on /v1/prompts as on a multipart upload."""
    rate = 48000
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=2, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate * 10, 2), np.float32)
        for _ in range(60):
            f.write(block)
    data = buf.getvalue()
    assert len(data) < 200_000  # a small body
    before = _rss_kib()
    for kwargs in ({"content": data, "headers": {"Content-Type": "audio/flac"}},
                   {"files": {"file": ("bomb.flac", data, "audio/flac")}}):
        r = httpx.post(f"http://{server}/v1/prompts", timeout=TIMEOUT, **kwargs)
        assert r.status_code == 400 and "600.00 s long; at most 30 s" in r.json()["error"], r.text
    assert _rss_kib() - before < 50 << 10
