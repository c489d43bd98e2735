"""Issue 16, item 3: mistakes in model files are diagnosed in one line that names the file.

Directories are written the way the releases are (tests/release_like.py: ``torch.save`` of plain state dicts,
reference key names, the files a release ships beside them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from release_like import DATA, fixture_state, legacy_weight_norm, write_release_dir
from tolerances import sine_source_audio

import token2wav
from token2wav import cli
from token2wav.checkpoints import flow_family

TOKENS = [5, 9, 23, 7, 50, 31, 2, 60, 17, 30, 8, 41]  # the fixture models have 64 token ids


def _synth(model: Path | str, tmp_path: Path, *extra: str) -> int:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    return cli.main(["synth", "--model", str(model), "--tokens", str(tokens), "--out", str(tmp_path / "o.wav"),
                     "--attention", "chunk", *extra])


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ flow of the other family


@pytest.mark.parametrize(("config_family", "flow_family_", "holds", "describes"), [
    ("cv2", "cv3", "CosyVoice 3 (DiT) flow", "cosyvoice2.yaml describes a CosyVoice 2"),
    ("cv3", "cv2", "CosyVoice 2 (conformer encoder + U-Net) flow", "cosyvoice3.yaml describes a CosyVoice 3"),
])
def test_flow_of_the_other_family_is_named_not_listed(tmp_path, capsys, config_family, flow_family_, holds,
                                                      describes):
    d = write_release_dir(tmp_path / "model", config_family, flow_family=flow_family_)
    assert _synth(d, tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(d / "flow.pt") in line and holds in line and describes in line
    assert "missing keys" not in line and "unexpected keys" not in line


@pytest.mark.parametrize(("manifest", "family"), [("cosyvoice3_flow", "cosyvoice3"), ("cosyvoice2_flow", "cosyvoice2")])
def test_family_is_recognised_from_full_size_key_layouts(manifest, family):
    keys = json.loads((DATA / "manifests" / f"{manifest}.json").read_text())["keys"]
    assert flow_family(dict.fromkeys(keys))[0] == family
    assert flow_family({"foo.weight": None}) is None


# ------------------------------------------------------------------------------------------ two YAMLs


def test_two_configs_in_one_directory_refused_then_chosen(tmp_path, capsys):
    d = write_release_dir(tmp_path / "model", "cv3")
    shutil.copy(DATA / "cv2_config.yaml", d / "cosyvoice2.yaml")
    assert _synth(d, tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert "holds 2 model configs (cosyvoice3.yaml, cosyvoice2.yaml)" in line
    assert str(d / "cosyvoice3.yaml") in line  # how to choose
    assert cli.main(["info", str(d)]) == 2
    capsys.readouterr()
    # choosing: the YAML itself is the model; the weights are read beside it
    assert _synth(d / "cosyvoice3.yaml", tmp_path, "--json") == 0
    assert json.loads(capsys.readouterr().out)["samples"] == len(TOKENS) * 960
    t2w = token2wav.Token2Wav.from_pretrained(d / "cosyvoice3.yaml")
    assert t2w.config.family == "cosyvoice3"
    assert cli.main(["info", str(d / "cosyvoice3.yaml"), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files["config"] == "cosyvoice3.yaml" and "cosyvoice2.yaml" in files["ignored"]


# ------------------------------------------------------------------------------------------ training checkpoints


def test_training_checkpoint_with_epoch_and_step_loads_and_says_so(tmp_path, capsys):
    plain = write_release_dir(tmp_path / "plain", "cv3", extra_files=False)
    train = write_release_dir(tmp_path / "train", "cv3", extra_files=False,
                              flow={**fixture_state("cv3", "flow"), "epoch": 7, "step": 120000})
    assert _synth(plain, tmp_path, "--json") == 0
    ref = json.loads(capsys.readouterr().out)
    out_plain = (tmp_path / "o.wav").read_bytes()
    assert _synth(train, tmp_path, "--json") == 0
    captured = capsys.readouterr()
    note = _one_line(captured.err)
    assert str(train / "flow.pt") in note and "ignored training entries epoch, step" in note
    assert json.loads(captured.out)["samples"] == ref["samples"]
    assert (tmp_path / "o.wav").read_bytes() == out_plain  # the same weights, the same audio


def test_checkpoint_without_tensors_is_one_line(tmp_path, capsys):
    d = write_release_dir(tmp_path / "m", "cv3", extra_files=False, flow={"epoch": 7, "step": 1})
    assert _synth(d, tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(d / "flow.pt") in line and "holds no tensors" in line


# ------------------------------------------------------------------------------------------ folded weight norm


def _folded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a vocoder saved after removing weight norm looks like: plain `X.weight` = g * v / ||v||."""
    out = {}
    for k, v in state.items():
        if k.endswith(".parametrizations.weight.original1"):
            continue
        if k.endswith(".parametrizations.weight.original0"):
            base = k[: -len(".parametrizations.weight.original0")]
            vv = state[base + ".parametrizations.weight.original1"].double()
            w = v.double() * vv / torch.norm_except_dim(vv, 2, 0)
            out[base + ".weight"] = w.float()
            continue
        out[k] = v
    return out


@pytest.mark.parametrize("family", ["cv3", "cv2"])
def test_vocoder_saved_with_weight_norm_folded_is_the_same_generator(tmp_path, family):
    normed = write_release_dir(tmp_path / "normed", family, extra_files=False)
    folded = write_release_dir(tmp_path / "folded", family, extra_files=False,
                               hift=_folded(fixture_state(family, "hift")))
    assert not any("weight_g" in k or "parametrizations" in k for k in torch.load(folded / "hift.pt"))
    a = token2wav.Token2Wav.from_pretrained(normed)
    b = token2wav.Token2Wav.from_pretrained(folded)
    mel = a.synthesize(TOKENS, output="mel", attention="chunk")
    wa, wb = a.vocode(torch.from_numpy(mel)), b.vocode(torch.from_numpy(mel))
    assert wa.shape == wb.shape and np.abs(wa).max() > 1e-3
    # weights folded in float64 vs evaluated at load: last bits of the weights, F0 included, through the sine
    # phase over the clip (sine_source_audio: 1.1e-4 and 1.7e-4 here; measured 1.7e-6 and 2.6e-6)
    assert float(np.abs(wa - wb).max()) < sine_source_audio(float(np.abs(wa).max()), len(wa) / a.sample_rate)


def test_legacy_weight_g_v_layout_still_loads(tmp_path):
    d = write_release_dir(tmp_path / "m", "cv3", extra_files=False,
                          hift=legacy_weight_norm(fixture_state("cv3", "hift")))
    assert any(k.endswith(".weight_g") for k in torch.load(d / "hift.pt"))
    token2wav.Token2Wav.from_pretrained(d)


# ------------------------------------------------------------------------------------------ unknown config keys


@pytest.mark.parametrize(("section", "anchor", "typo", "accepted"), [
    ("hift", "    upsample_rates:", "    upsample_rate: [8, 5, 3]\n", "upsample_rates"),
    ("flow", "    pre_lookahead_len:", "    pre_look_ahead_len: 3\n", "pre_lookahead_len"),
])
def test_unknown_config_key_is_an_error_in_every_section(tmp_path, capsys, section, anchor, typo, accepted):
    d = write_release_dir(tmp_path / "m", "cv3", extra_files=False)
    text = (d / "cosyvoice3.yaml").read_text()
    start = text.index(f"\n{section}:")
    at = text.index(anchor, start)
    (d / "cosyvoice3.yaml").write_text(text[:at] + typo + text[at:])
    assert _synth(d, tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(d / "cosyvoice3.yaml") in line and f": {section}: " in line
    assert f"unknown key(s) {typo.split(':')[0].strip()}" in line and "accepted: " in line and accepted in line
