"""Issue 16, item 4: mistakes the config alone decides are reported before any weights are loaded.

The user ran `token2wav synth` against a release-like CosyVoice 3 directory (the real cosyvoice3.yaml next to
its weights) and waited 5-8 s for the model to load before hearing about `--hop 7`. Here the weights file is a
placeholder that cannot be loaded and `load_engine` fails the test if called: the error must come first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import token2wav
from token2wav import cli
from token2wav.config import read_config
from token2wav.preflight import check_stream_options

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def cv3_dir(tmp_path) -> Path:
    d = tmp_path / "CosyVoice3-0.5B"
    d.mkdir()
    shutil.copy(DATA / "real_configs" / "cosyvoice3.yaml", d / "cosyvoice3.yaml")
    (d / "flow.pt").write_bytes(b"not loaded in these tests")
    (d / "hift.pt").write_bytes(b"not loaded in these tests")
    return d


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_engine", refuse)


def _synth(cv3_dir: Path, tmp_path: Path, tokens: str, *extra: str) -> int:
    path = tmp_path / "tokens.txt"
    path.write_text(tokens)
    return cli.main(["synth", "--model", str(cv3_dir), "--tokens", str(path), "--out", str(tmp_path / "o.wav"),
                     *extra])


@pytest.mark.parametrize(
    "extra, tokens, words",
    [
        (["--stream", "--hop", "7"], "1 2 3", ["--hop 7 tokens is not a multiple", "25, 50, 75"]),
        (["--stream", "--preset", "fast"], "1 2 3",
         ["--preset must be one of assistant, balanced, quality, constrained", "'fast'"]),
        (["--stream", "--mode", "window"], "1 2 3",
         ["--mode window needs --window-frames", "multiple of the chunk (50"]),
        (["--stream", "--mode", "window", "--window-frames", "60"], "1 2 3",
         ["--window-frames 60 must be a multiple of the chunk (50 frames)", "50 or 100"]),
        (["--stream", "--window-frames", "100"], "1 2 3", ["--window-frames only applies to --mode window"]),
        ([], "1 2 6561 7", ["token id 6561 at position 2 is outside the model's vocabulary", "[0, 6561)"]),
        (["--stream"], "[5, -1]", ["token ids must be >= 0"]),
        (["--speaker", "slt"], "1 2 3", ["--speaker slt", "ships no voices", "--prompt"]),
    ],
)
def test_config_decided_errors_come_before_loading(cv3_dir, tmp_path, capsys, no_loading, extra, tokens, words):
    assert _synth(cv3_dir, tmp_path, tokens, *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_recompute_on_the_demo_voice_refused_before_loading(tmp_path, capsys, no_loading):
    # its config alone says it decodes at lookahead 3 with a flow built for 5: no reference loop to redo
    path = tmp_path / "tokens.txt"
    path.write_text("1 2 3")
    assert cli.main(["synth", "--model", "demo", "--tokens", str(path), "--out", str(tmp_path / "o.wav"),
                     "--stream", "--mode", "recompute"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("token2wav synth: error: --mode recompute is the reference algorithm, trained chunk and "
                           "lookahead only, which this model cannot run: it decodes with a lookahead of 3 tokens, "
                           "its flow was built with 5; --mode cached is exact")


def test_window_message_names_the_flag_not_the_api_argument(cv3_dir, tmp_path, capsys, no_loading):
    assert _synth(cv3_dir, tmp_path, "1 2 3", "--stream", "--mode", "window") == 2
    err = capsys.readouterr().err
    assert "--window-frames" in err and "window_frames" not in err and "mode='window'" not in err


def test_cosyvoice2_window_mode_refused_before_loading(tmp_path, capsys, no_loading):
    d = tmp_path / "CosyVoice2-0.5B"
    d.mkdir()
    shutil.copy(DATA / "real_configs" / "cosyvoice2.yaml", d / "cosyvoice2.yaml")
    assert _synth(d, tmp_path, "1 2 3", "--stream", "--mode", "window", "--window-frames", "100") == 2
    err = capsys.readouterr().err
    assert "cosyvoice2 model" in err and "--mode cached" in err


def test_a_good_command_still_reaches_loading(cv3_dir, tmp_path, capsys, monkeypatch):
    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "load_engine", record)
    assert _synth(cv3_dir, tmp_path, "1 2 3", "--stream", "--hop", "50", "--mode", "window",
                  "--window-frames", "200") == 2
    assert calls and "stop here" in capsys.readouterr().err


def test_api_preflight_names_api_arguments():
    config = read_config(DATA / "real_configs" / "cosyvoice3.yaml")
    with pytest.raises(ValueError, match=r"mode='window' needs window_frames"):
        check_stream_options(config, mode="window")
    with pytest.raises(ValueError, match=r"hop=7 tokens is not a multiple"):
        check_stream_options(config, hop=7)
    check_stream_options(config, preset="assistant", mode="window", window_frames=400)  # valid: no error


def test_engine_and_preflight_agree_on_the_tiny_model():
    # the engine's own checks (used without the CLI) accept and refuse the same things as the preflight
    t2w = token2wav.Token2Wav.from_pretrained("tiny")
    for kwargs in ({"hop": 7}, {"mode": "window"}, {"preset": "fast"}, {"mode": "window", "window_frames": 60}):
        with pytest.raises(ValueError):
            t2w.stream(**kwargs)
        with pytest.raises(ValueError):
            check_stream_options(t2w.config, **kwargs)
    t2w.stream(hop=50, mode="window", window_frames=100).close()
    check_stream_options(t2w.config, hop=50, mode="window", window_frames=100)


def test_serve_graphs_without_batching_refused_before_loading(tmp_path, capsys, no_loading):
    d = tmp_path / "CosyVoice2-0.5B"
    d.mkdir()
    shutil.copy(DATA / "real_configs" / "cosyvoice2.yaml", d / "cosyvoice2.yaml")
    assert cli.main(["serve", "--model", str(d), "--graphs", "--no-batching", "--port", "50123"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--graphs runs the batcher's fixed-shape batches; it cannot be used with --no-batching" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--max-tokens", "0"], "max_tokens_per_session (--max-tokens) must be an integer >= 1, got 0"),
    (["--max-message-bytes", "10"], "max_message_bytes (--max-message-bytes) must be an integer >= 1024, got 10"),
    (["--idle-timeout", "-1"], "idle_timeout_s (--idle-timeout) must be a finite number > 0, got -1.0"),
])
def test_serve_limits_name_their_option_before_loading(capsys, monkeypatch, args, message):
    import token2wav.serve.assembly as assembly

    def refuse(*a, **k):
        raise AssertionError("the server was built before the bad limit was reported")

    monkeypatch.setattr(assembly, "build_server", refuse)
    assert cli.main(["serve", *args]) == 2
    assert capsys.readouterr().err.strip() == f"token2wav serve: error: {message}"


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-5"])
def test_serve_refuses_a_port_it_cannot_bind_before_loading(tmp_path, capsys, monkeypatch, port):
    # uvicorn took 99999 and bound another port (99999 mod 65536) after the model had loaded
    import token2wav.serve.assembly as assembly

    def refuse(*args, **kwargs):
        raise AssertionError("the server was built before the bad port was reported")

    monkeypatch.setattr(assembly, "build_server", refuse)
    assert cli.main(["serve", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"token2wav serve: error: --port must be in [1, 65535], got {port}"
