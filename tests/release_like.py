"""Model directories laid out and saved the way the CosyVoice releases are, at small size.

The releases ship ``cosyvoice{2,3}.yaml``, ``flow.pt`` and ``hift.pt`` (plain state dicts written with
``torch.save``) beside files token2wav does not use (``llm.pt``, ONNX exports, the speech tokenizer). The
weights here are the small reference-fixture models (tests/data/cv{2,3}_*) or the bundled tiny model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parent / "data"
TINY = Path(__file__).resolve().parents[1] / "src" / "token2wav" / "assets" / "tiny"

# what a release directory holds besides the config and flow/hift weights
OTHER_RELEASE_FILES = ("llm.pt", "campplus.onnx", "speech_tokenizer_v3.onnx", "flow.decoder.estimator.fp32.onnx",
                       "configuration.json")


def fixture_state(family: str, part: str) -> dict[str, torch.Tensor]:
    """The reference-keyed state dict of the small fixture model (family 'cv2'|'cv3', part 'flow'|'hift'),
    cast to float32 as the releases store it."""
    state = load_file(str(DATA / f"{family}_{part}_state.safetensors"))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def legacy_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename parametrization keys to the older ``weight_g`` / ``weight_v`` layout some releases use."""
    out = {}
    for k, v in state.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        out[k] = v
    return out


def write_release_dir(
    root: Path,
    family: str = "cv3",
    *,
    config_family: str | None = None,
    flow_family: str | None = None,
    hift: dict[str, torch.Tensor] | None = None,
    flow: dict[str, torch.Tensor] | None = None,
    extra_files: bool = True,
) -> Path:
    """A release-like directory from the fixture model of ``family`` (override any part to make a mistake)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg_family = config_family or family
    name = "cosyvoice3.yaml" if cfg_family == "cv3" else "cosyvoice2.yaml"
    shutil.copy(DATA / f"{cfg_family}_config.yaml", root / name)
    torch.save(flow if flow is not None else fixture_state(flow_family or family, "flow"), root / "flow.pt")
    torch.save(hift if hift is not None else legacy_weight_norm(fixture_state(family, "hift")), root / "hift.pt")
    if extra_files:
        for other in OTHER_RELEASE_FILES:
            (root / other).write_bytes(b"\0" * 16)
        (root / "CosyVoice-BlankEN").mkdir(exist_ok=True)
    return root
