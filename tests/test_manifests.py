"""The full-size CosyVoice 2/3 flows and vocoders built from the real configs have exactly the released keys/shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import token2wav

DATA = Path(__file__).resolve().parent / "data"


def _manifest(name: str) -> dict:
    return json.loads((DATA / "manifests" / f"{name}.json").read_text())


def _compare(module, manifest: dict) -> None:
    state = module.state_dict()
    ours = {k: list(v.shape) for k, v in state.items()}
    theirs = {k: v["shape"] for k, v in manifest["keys"].items()}
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    assert not missing, f"{len(missing)} keys missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} unexpected keys, e.g. {extra[:5]}"
    bad = [k for k in theirs if ours[k] != theirs[k]]
    assert not bad, [(k, ours[k], theirs[k]) for k in bad[:5]]
    assert len(ours) == manifest["num_keys"]
    params = sum(p.numel() for p in module.parameters())
    assert params == int(manifest["num_parameters"])


@pytest.mark.parametrize(("config", "manifest"), [("cosyvoice3", "cosyvoice3_flow"), ("cosyvoice2", "cosyvoice2_flow")])
def test_full_size_flow_keys_and_shapes(config, manifest):
    flow = token2wav.build_flow(DATA / "real_configs" / f"{config}.yaml", device="meta")
    _compare(flow, _manifest(manifest))


@pytest.mark.parametrize(("config", "manifest"), [("cosyvoice3", "cosyvoice3_hift"), ("cosyvoice2", "cosyvoice2_hift")])
def test_full_size_vocoder_keys_and_shapes(config, manifest):
    vocoder = token2wav.build_vocoder(DATA / "real_configs" / f"{config}.yaml", device="meta")
    _compare(vocoder, _manifest(manifest))
