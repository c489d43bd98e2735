"""Weights: reading checkpoint files safely, mapping released key layouts, strict loading with readable errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "strip_generator_prefix",
    "upgrade_weight_norm_keys",
    "load_strict",
    "fold_weight_norm",
    "find_weights_file",
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pt`/`.pth` (never unpickling code: weights_only) or `.safetensors` file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not a plain tensor file"
        raise CheckpointError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})") from None
    # Training checkpoints sometimes wrap the weights.
    for key in ("state_dict", "model", "generator"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(obj)


def strip_generator_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HiFT checkpoints saved from the GAN wrapper name every key 'generator.…'.

    The reference removes the substring wherever it appears; so do we, so that the same files load."""
    return {k.replace("generator.", ""): v for k, v in state.items()}


def upgrade_weight_norm_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map legacy weight-norm keys (`weight_g`, `weight_v`) to the parametrization layout the model has."""
    expected = set(model.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for legacy, current in ((".weight_g", ".parametrizations.weight.original0"),
                                (".weight_v", ".parametrizations.weight.original1")):
            if key.endswith(legacy):
                candidate = key[: -len(legacy)] + current
                if candidate in expected:
                    key = candidate
                break
        out[key] = value
    return out


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load every parameter and persistent buffer; anything missing, extra or misshapen is one clear error."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match {type(model).__name__}"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        raise CheckpointError("; ".join(parts))
    # Parameters are cast to the model's dtype on copy; buffers keep theirs (the copy casts into the existing buffer).
    model.load_state_dict(dict(state), strict=True)


def fold_weight_norm(model: nn.Module) -> int:
    """Replace weight-norm parametrizations by the plain weight they compute (inference needs only that).

    A module flagged ``keep_weight_norm = True`` keeps its parametrization: the causal F0 predictor evaluates
    g and v in float64, which a folded float32 weight cannot reproduce. Returns how many were folded."""
    from torch.nn.utils import parametrize

    folded = 0
    for module in model.modules():
        if parametrize.is_parametrized(module) and not getattr(module, "keep_weight_norm", False):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                folded += 1
    return folded


def find_weights_file(model_dir: Path, stems: tuple[str, ...]) -> Path:
    """The first existing `<stem>.safetensors` or `<stem>.pt` in a model directory."""
    for stem in stems:
        for suffix in (".safetensors", ".pt", ".pth"):
            candidate = model_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    names = ", ".join(f"{s}.safetensors|.pt" for s in stems)
    raise CheckpointError(f"{model_dir}: no weights file found (looked for {names})")

