"""The `token2wav` command line: subcommand registration, info, synth (offline and streamed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest
from tolerances import PCM_STEP, pcm_steps

from token2wav import cli

MODEL = "tiny"  # the bundled tiny random model


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


def _close(a: np.ndarray, b: np.ndarray, sample_rate: int = 24000) -> bool:
    # streamed vs offline chunk-causal audio: float rounding, amplified by the tiny HiFT's sine phase over the
    # stream (tests/tolerances.py, in int16 steps, as test_server's _assert_pcm_close; at least 2 steps)
    if a.shape != b.shape:
        return False
    steps = pcm_steps(float(np.abs(a).max(initial=0)) * PCM_STEP, len(a) / sample_rate)
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max(initial=0)) <= steps


@pytest.fixture(scope="module")
def shared_engine():
    return cli.load_engine(MODEL)


@pytest.fixture(autouse=True)
def _reuse_engine(monkeypatch, shared_engine):
    # every command below would load the same bundled model again; one copy keeps the file fast
    real = cli.load_engine

    def load(model: str, device: str = "cpu", dtype: str = "float32"):
        return shared_engine if (model, device, dtype) == (MODEL, "cpu", "float32") else real(model, device, dtype)

    monkeypatch.setattr(cli, "load_engine", load)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps(np.random.default_rng(5).integers(0, 512, 60).tolist()))
    return path


# ------------------------------------------------------------------------------------------ registration


def test_subcommand_decorator_registers_one_function(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "_COMMANDS", dict(cli._COMMANDS))

    @cli.subcommand("hello", help="say hello", args=[cli.arg("--name", default="world")])
    def hello(args) -> int:
        print(f"hello {args.name}")
        return 3

    assert cli.main(["hello", "--name", "token"]) == 3
    assert capsys.readouterr().out == "hello token\n"


def test_module_command_is_discovered_without_import(tmp_path, monkeypatch, capsys) -> None:
    pkg = tmp_path / "t2w_extra_cmd.py"
    pkg.write_text(
        textwrap.dedent(
            '''
            """`token2wav extra`: an extra command for the test."""
            IMPORTED = True

            def add_arguments(parser):
                parser.add_argument("--times", type=int, default=1)

            def main(args):
                print("extra " * args.times)
                return 0
            '''
        )
    )
    (tmp_path / "t2w_not_a_cmd.py").write_text('"""No add_arguments/main here."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli,
        "COMMAND_MODULES",
        {"extra": "t2w_extra_cmd", "plain": "t2w_not_a_cmd", "missing": "t2w_no_such_module_anywhere"},
    )
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "an extra command for the test" in out
    assert "plain" not in out and "missing" not in out
    assert "t2w_extra_cmd" not in sys.modules  # listing did not import it
    assert cli.main(["extra", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "extra extra"


def test_python_dash_m_lists_builtin_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "token2wav", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("info", "synth", "serve", "client"):
        assert name in r.stdout


# ------------------------------------------------------------------------------------------ commands


def test_info_json(capsys) -> None:
    assert cli.main(["info", MODEL, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == MODEL
    assert info["sample_rate"] == 24000 and info["token_rate"] == 25
    assert info["token_mel_ratio"] == 2 and info["pre_lookahead_len"] == 3 and info["static_chunk_size"] == 50
    assert info["parameters"]["total"] == info["parameters"]["flow"] + info["parameters"]["vocoder"] > 0
    assert set(info["presets"]) == {"assistant", "balanced", "quality", "constrained"}
    assert info["presets"]["balanced"]["hop"] == 25
    assert cli.main(["info", MODEL]) == 0
    table = capsys.readouterr().out
    assert "sample_rate" in table and "parameters" in table and "assistant" in table


def test_synth_offline_and_streamed_agree(token_file, tmp_path, capsys) -> None:
    chunk_wav, stream_wav = tmp_path / "chunk.wav", tmp_path / "stream.wav"
    args = ["synth", "--model", MODEL, "--tokens", str(token_file)]
    assert cli.main([*args, "--out", str(chunk_wav), "--attention", "chunk", "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert offline["tokens"] == 60 and offline["chunks"] == 1 and not offline["stream"]
    assert cli.main([*args, "--out", str(stream_wav), "--stream", "--preset", "balanced", "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["stream"] and streamed["chunks"] >= 2 and streamed["preset"] == "balanced"
    assert 0 < streamed["first_chunk_latency_s"] <= streamed["wall_s"]
    assert streamed["rtf"] > 0
    a, sr_a = _read_wav(chunk_wav)
    b, sr_b = _read_wav(stream_wav)
    assert sr_a == sr_b == 24000 and a.size == streamed["samples"] == offline["samples"]
    assert _close(a, b)


def test_synth_reads_llm_text_from_stdin_and_uses_a_prompt(tmp_path, monkeypatch, capsys) -> None:
    tokens = np.random.default_rng(6).integers(0, 512, 30)
    text = "<|speech_start|>" + "".join(f"<|s_{t}|>" for t in tokens) + "<|speech_end|>"

    class Stdin:
        buffer = io.BytesIO(text.encode())

    monkeypatch.setattr(sys, "stdin", Stdin())
    rng = np.random.default_rng(7)
    prompt = tmp_path / "prompt.npz"
    np.savez(prompt, tokens=rng.integers(0, 512, 10), mel=rng.random((20, 80)), embedding=rng.random(192))
    out = tmp_path / "p.wav"
    assert cli.main(["synth", "--model", MODEL, "--tokens", "-", "--out", str(out), "--prompt", str(prompt)]) == 0
    assert "wrote" in capsys.readouterr().out
    audio, _ = _read_wav(out)
    assert audio.size == 30 * 960


@pytest.mark.parametrize(
    "extra, tokens, words",
    [
        ([], "1 2 99999", "outside the model's vocabulary"),
        ([], "", "holds no tokens"),
        ([], "1 two 3", "cannot read 'two'"),
        (["--hop", "25"], "1 2 3", "--hop applies only with --stream"),
        (["--stream", "--hop", "7"], "1 2 3", "multiple"),
        (["--stream", "--attention", "full"], "1 2 3", "--attention applies only without --stream"),
    ],
)
def test_synth_bad_input_is_one_clear_line(tmp_path, capsys, extra, tokens, words) -> None:
    path = tmp_path / "t.txt"
    path.write_text(tokens)
    code = cli.main(["synth", "--model", MODEL, "--tokens", str(path), "--out", str(tmp_path / "x.wav"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tokenize_command_reads_a_recording_and_refuses_what_is_not_one(tmp_path, capsys) -> None:
    import soundfile as sf

    from token2wav.streaming.engine import Token2Wav

    sr = 24000
    t = np.arange(sr) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    path = tmp_path / "two.wav"
    sf.write(path, stereo.astype(np.float32), sr, subtype="FLOAT")
    out = tmp_path / "tokens.json"
    assert cli.main(["tokenize", str(path), "-o", str(out)]) == 0
    tokens = json.loads(out.read_text())
    # what the library makes of the same samples (the channels averaged), through the CLI's file handling
    assert tokens == Token2Wav.from_pretrained("demo").tokenize(stereo.astype(np.float32), sr)
    assert 40 <= len(tokens) <= 44  # 1 s at the demo's 43 tokens/s
    capsys.readouterr()

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("1 2 3")
    for audio, words in [
        (tmp_path / "missing.wav", "audio: no such file"),
        (not_audio, "is not a readable audio file"),
        (empty, "wave is empty"),
    ]:
        assert cli.main(["tokenize", str(audio)]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_an_output_that_cannot_be_written_is_refused_before_loading(tmp_path, capsys, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad --out was reported")

    monkeypatch.setattr(cli, "load_engine", refuse)
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3")
    for out, words in [(tmp_path / "no" / "x.wav", f"the folder {tmp_path / 'no'} does not exist"),
                       (tmp_path, "is a folder; give a file name")]:
        assert cli.main(["synth", "--model", MODEL, "--tokens", str(tokens), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"token2wav synth: error: --out {out}") and words in err, err
        assert len(err.strip().splitlines()) == 1


def test_an_unknown_option_is_reported_by_its_command_with_its_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prompt", "--model", "demo", "--wav", "x.wav"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: token2wav prompt ")  # the command's usage, not "token2wav [-h] COMMAND ..."
    assert err.strip().endswith("token2wav prompt: error: unrecognized arguments: --wav")


def test_demo_command_refuses_bad_steps_outputs_and_voices(tmp_path, capsys, monkeypatch) -> None:
    from token2wav.streaming.engine import Token2Wav

    loaded = Token2Wav.from_pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was reported")

    monkeypatch.setattr(Token2Wav, "from_pretrained", refuse)
    # --steps 0 ran the model's 10 steps (0 read as "not given"); 1000 ran for minutes
    for args, message in [
        (["--steps", "0"], "--steps must be in [1, 100], got 0"),
        (["--steps", "1000"], "--steps must be in [1, 100], got 1000"),
        (["--out", str(tmp_path / "no" / "d.wav")], f"--out {tmp_path / 'no' / 'd.wav'}: the folder "
                                                      f"{tmp_path / 'no'} does not exist"),
        (["--out", str(tmp_path)], f"--out {tmp_path} is a folder; give a file name"),
    ]:
        assert cli.main(["demo", *args]) == 2
        assert capsys.readouterr().err.strip() == f"token2wav demo: error: {message}"
    monkeypatch.setattr(Token2Wav, "from_pretrained", loaded)
    assert cli.main(["demo", "--speaker", "bob", "--out", str(tmp_path / "d.wav")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "token2wav demo: error: --speaker bob is not one of the model's voices: slt, rms, awb")


def test_unknown_model_is_a_clear_error(tmp_path, capsys, token_file) -> None:
    code = cli.main(
        ["synth", "--model", "no-such-model", "--tokens", str(token_file), "--out", str(tmp_path / "x.wav")]
    )
    assert code == 2
    assert "no-such-model" in capsys.readouterr().err


def test_serve_command_starts_and_answers(tmp_path) -> None:
    import socket
    import time

    import httpx

    with socket.socket() as sock:  # a free loopback port (tiny race with other processes, acceptable here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "token2wav",
        "serve",
        "--model",
        MODEL,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None and health["status"] == "ok" and health["model"] == MODEL, proc.poll()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/synthesize", json={"tokens": [1, 2, 3, 4], "format": "pcm"})
        assert r.status_code == 200 and len(r.content) == 2 * 4 * 960
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
