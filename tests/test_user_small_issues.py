"""Issue 16, item 5: the smaller things a new user hit, each reproduced the way the user did it."""

from __future__ import annotations

import json
import pickle
import wave

import numpy as np
import pytest
import torch
from release_like import OTHER_RELEASE_FILES, write_release_dir

import token2wav
from token2wav import bench, cli
from token2wav.tokens_io import parse_tokens


@pytest.fixture(scope="module")
def tiny():
    return cli.load_engine("tiny")


@pytest.fixture(autouse=True)
def _reuse_tiny(monkeypatch, tiny):
    real = cli.load_engine

    def load(model, device="cpu", dtype="float32"):
        return tiny if (model, device, dtype) == ("tiny", "cpu", "float32") else real(model, device, dtype)

    monkeypatch.setattr(cli, "load_engine", load)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ client, empty file


def test_client_refuses_an_empty_token_file(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    # nothing listens on port 9: the refusal must come before any connection attempt
    code = cli.main(["client", "--url", "ws://127.0.0.1:9/v1/stream", "--tokens", str(empty)])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--tokens: {empty} holds no tokens" in line and "RTF" not in line


# ------------------------------------------------------------------------------------------ LLM text with a prefix


@pytest.mark.parametrize(
    "text",
    [
        "[assistant]: <|s_12|><|s_7|><|s_300|>",
        "{assistant} <|s_12|> <|s_7|>\n<|s_300|>",
        "[{\"role\": \"assistant\"}] <|speech_start|><|s_12|><|s_7|><|s_300|><|speech_end|>",
    ],
)
def test_marker_text_with_a_role_prefix_is_marker_text(text, tmp_path, capsys):
    assert parse_tokens(text).tolist() == [12, 7, 300]
    path = tmp_path / "llm.txt"
    path.write_text(text)
    out = tmp_path / "o.wav"
    assert cli.main(["synth", "--model", "tiny", "--tokens", str(path), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 3 and summary["samples"] == 3 * 960


def test_plain_json_is_still_json():
    assert parse_tokens("[1, 2, 3]").tolist() == [1, 2, 3]
    assert parse_tokens('{"tokens": [4, 5]}').tolist() == [4, 5]


# ------------------------------------------------------------------------------------------ --prompt, wrong file


def _wav(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, dtype="<i2").tobytes())


def _pickled_npz(path):
    # a prompt written with object arrays (e.g. a dict saved by numpy.savez): needs pickle, which we never run
    np.savez(path, tokens=np.array([{"a": 1}], dtype=object), mel=np.zeros((2, 80)), embedding=np.zeros(192))


def _torch_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"tokens": [1, 2]}, f)


@pytest.mark.parametrize(
    "make, words",
    [
        (_wav, "is not a prompt file"),
        (lambda p: np.save(p, np.zeros(3)), "is not a prompt file"),
        (_torch_pickle, "is not a prompt file"),
        (_pickled_npz, "holds Python objects, not plain arrays"),
        (lambda p: np.savez(p, feat=np.zeros((2, 80))), "lacks array(s) tokens, mel, embedding (has feat)"),
    ],
)
def test_prompt_that_is_not_a_prompt_file(make, words, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "voice.npz"
    make(bad)
    if not bad.exists():  # np.save / np.savez add their own extension
        bad = next(tmp_path.glob("voice*"))
    tokens = tmp_path / "t.txt"
    tokens.write_text("1 2 3")
    monkeypatch.setattr(cli, "load_engine", lambda *a: pytest.fail("loaded the model before reading the prompt"))
    code = cli.main(["synth", "--model", "tiny", "--tokens", str(tokens), "--out", str(tmp_path / "o.wav"),
                     "--prompt", str(bad)])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert words in line and str(bad) in line
    assert "NumPy .npz archive" in line and "'tokens' [P]" in line and "'embedding' [192]" in line
    assert "allow_pickle" not in line


# ------------------------------------------------------------------------------------------ synth --json values


def test_synth_json_reports_the_values_used(tmp_path, capsys):
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps(list(range(60))))
    base = ["synth", "--model", "tiny", "--tokens", str(tokens), "--out", str(tmp_path / "o.wav"), "--stream", "--json"]
    assert cli.main(base) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["preset"], s["hop"], s["schedule"], s["max_hop"], s["mode"], s["window_frames"]) == (
        "none", 25, "fixed", None, "cached", None)
    assert s["quantized_flow"] is False
    assert cli.main([*base, "--preset", "quality"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["preset"], s["hop"], s["schedule"], s["max_hop"], s["mode"]) == ("quality", 50, "exponential", 200,
                                                                                "cached")
    assert cli.main([*base, "--mode", "window", "--window-frames", "100", "--hop", "50"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["preset"], s["hop"], s["mode"], s["window_frames"]) == ("none", 50, "window", 100)


# ------------------------------------------------------------------------------------------ info: files read/ignored


def test_info_says_which_files_it_read_and_ignored(tmp_path, capsys):
    d = write_release_dir(tmp_path / "Fun-CosyVoice3-0.5B")
    assert cli.main(["info", str(d), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert (files["config"], files["flow"], files["vocoder"]) == ("cosyvoice3.yaml", "flow.pt", "hift.pt")
    assert files["ignored"] == sorted([*OTHER_RELEASE_FILES, "CosyVoice-BlankEN/"])
    assert cli.main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "files read         cosyvoice3.yaml, flow.pt, hift.pt" in out
    assert "llm.pt" in next(line for line in out.splitlines() if line.startswith("files ignored"))


def test_info_on_the_demo_lists_its_assets_as_read(capsys):
    assert cli.main(["info", "demo", "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files["flow"] == "flow.safetensors" and files["vocoder"] == "vocoder.safetensors"
    assert files["assets"] == ["demo_tokens.json", "speakers.safetensors", "tokenizer.safetensors"]
    assert "token2wav.yaml" not in files["ignored"] and "MODEL_CARD.md" in files["ignored"]


# ------------------------------------------------------------------------------------------ constrained: memory


def test_constrained_flow_shares_the_float_weights_instead_of_copying_them():
    t2w = token2wav.Token2Wav.from_pretrained("tiny")
    before = {k: v.clone() for k, v in t2w.flow.state_dict().items()}
    quant = t2w.quantized_flow()
    float_ptrs = {t.data_ptr() for t in [*t2w.flow.parameters(), *t2w.flow.buffers()]}
    leftover = [*quant.parameters(), *quant.buffers()]
    # every float tensor the int8 flow still has is the engine's own (no second float copy alive)
    assert leftover and all(t.data_ptr() in float_ptrs for t in leftover)
    packed = [m for m in quant.modules() if hasattr(m, "_packed_params")]
    assert len(packed) >= 20
    # the engine's float flow is untouched (the in-place quantization swapped modules in the copy only)
    after = t2w.flow.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "_packed_params") for m in t2w.flow.modules())
    # and the int8 weights are about a quarter of the float Linear weights they replace
    linear_mb = sum(m.weight.numel() * 4 for n, m in t2w.flow.named_modules()
                    if isinstance(m, torch.nn.Linear)) / 2**20
    assert 0 < bench.quantized_size_mb(quant) < 0.5 * linear_mb


def test_bench_reports_the_constrained_preset_memory():
    report = bench.run_bench(["tiny"], quick=False, utterances=[1.0], modes=["constrained"], sessions=1,
                             device="cpu", dtype=torch.float32, log=lambda _: None, isolate=False)
    (row,) = report["runs"]
    assert row["mode"] == "constrained"
    assert row["peak_rss_mb"] > 0 and row["cold_peak_rss_mb"] > 0 and row["quantized_flow_mb"] > 0
