"""Weights: reading checkpoint files safely, mapping released key layouts, strict loading with readable errors."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointNote",
    "check_flow_family",
    "flow_family",
    "unfold_weight_norm_keys",
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
    ignored: list[str] = []
    for key in ("state_dict", "model", "generator"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            ignored += [k for k in obj if k != key]
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors, got {type(obj).__name__}")
    # The reference's training checkpoints store 'epoch' and 'step' (and sometimes more) beside the weights.
    ignored += [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    weights = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise CheckpointError(f"{path}: holds no tensors (entries: {', '.join(map(str, list(obj)[:8]))})")
    if ignored:
        warnings.warn(
            f"{path}: loaded the weights; ignored training entries {', '.join(map(str, ignored))}",
            CheckpointNote,
            stacklevel=2,
        )
    return weights


class CheckpointNote(UserWarning):
    """Something in a weights file was set aside (training entries, a folded weight-norm layout)."""


# Keys that only one flow family has: (family, a key prefix it has, what it is)
_FLOW_FAMILIES = (
    ("cosyvoice3", "decoder.estimator.transformer_blocks.", "CosyVoice 3 (DiT)"),
    ("cosyvoice2", "encoder.encoders.", "CosyVoice 2 (conformer encoder + U-Net)"),
    ("cosyvoice2", "decoder.estimator.down_blocks.", "CosyVoice 2 (conformer encoder + U-Net)"),
)
_FAMILY_CONFIG = {"cosyvoice3": "cosyvoice3.yaml", "cosyvoice2": "cosyvoice2.yaml"}


def flow_family(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(family, description) of a flow state dict from its key names, or None if it looks like neither."""
    for family, prefix, what in _FLOW_FAMILIES:
        if any(k.startswith(prefix) for k in state):
            return family, what
    return None


def check_flow_family(state: Mapping[str, torch.Tensor], family: str, config_name: str, source: str) -> None:
    """One line instead of a thousand key names when a flow checkpoint belongs to the other family."""
    found = flow_family(state)
    if found is None or found[0] == family:
        return
    want = next(what for f, _, what in _FLOW_FAMILIES if f == family)
    raise CheckpointError(
        f"{source} holds a {found[1]} flow, but {config_name} describes a {want} model: use the "
        f"{found[0]} release's {_FAMILY_CONFIG[found[0]]} with these weights, or this config's own flow weights"
    )


def unfold_weight_norm_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Accept weights saved with weight norm folded (plain ``X.weight`` where the model has ``X``'s weight norm).

    A folded weight ``w`` is the same generator as ``g = ||w||`` (per output channel) with ``v = w``: ``g v / ||v||``
    gives ``w`` back to float rounding. Returns the mapped state and how many weights were unfolded."""
    from torch.nn.utils import parametrize

    out = dict(state)
    count = 0
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        prefix = f"{name}." if name else ""
        plain = f"{prefix}weight"
        g_key = f"{prefix}parametrizations.weight.original0"
        v_key = f"{prefix}parametrizations.weight.original1"
        if plain not in out or g_key in out or v_key in out:
            continue
        w = out.pop(plain)
        dim = getattr(module.parametrizations.weight[0], "dim", 0)
        out[g_key] = torch.norm_except_dim(w, 2, dim)
        out[v_key] = w
        count += 1
    return out, count


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
    """The first existing `<stem>.safetensors` or `<stem>.pt` in a model directory (or beside a config file)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    for stem in stems:
        for suffix in (".safetensors", ".pt", ".pth"):
            candidate = model_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    names = ", ".join(f"{s}.safetensors|.pt" for s in stems)
    raise CheckpointError(f"{model_dir}: no weights file found (looked for {names})")

