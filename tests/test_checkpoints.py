from __future__ import annotations

import pickle

import pytest
import torch
from tolerances import ONE_OP
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from token2wav.checkpoints import (
    CheckpointError,
    fold_weight_norm,
    load_strict,
    read_state_dict,
    strip_generator_prefix,
    upgrade_weight_norm_keys,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(2, 3, 3))
        self.proj = nn.Linear(3, 4)


def test_strict_error_lists_missing_unexpected_and_shapes():
    model = Tiny()
    state = dict(model.state_dict())
    del state["proj.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["proj.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, state, source="x.pt")
    text = str(err.value)
    assert "missing keys (1): proj.bias" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "shape mismatches (1): proj.weight (5, 3) vs model (4, 3)" in text


def test_long_listings_are_truncated_with_counts():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(12)])
    with pytest.raises(CheckpointError, match=r"missing keys \(24\): .*\(16 more\)"):
        load_strict(model, {}, source="empty")


def test_legacy_weight_norm_and_generator_prefix(tmp_path):
    ref = Tiny()
    legacy = {
        "generator.conv.weight_g": ref.conv.parametrizations.weight.original0.detach().clone(),
        "generator.conv.weight_v": ref.conv.parametrizations.weight.original1.detach().clone(),
        "generator.conv.bias": ref.conv.bias.detach().clone(),
        "generator.proj.weight": ref.proj.weight.detach().clone(),
        "generator.proj.bias": ref.proj.bias.detach().clone(),
    }
    path = tmp_path / "hift.pt"
    torch.save(legacy, path)
    model = Tiny()
    state = upgrade_weight_norm_keys(strip_generator_prefix(read_state_dict(path)), model)
    load_strict(model, state)
    x = torch.randn(1, 2, 9)
    expected = ref.conv(x)
    fold_weight_norm(model)
    assert not hasattr(model.conv, "parametrizations")
    assert torch.allclose(model.conv(x), expected, atol=ONE_OP)  # one conv of 2 x 3 terms, folded weight vs g, v


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "flow.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a loadable weights-only checkpoint"):
        read_state_dict(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="weights file not found"):
        read_state_dict("/nonexistent/flow.pt")
