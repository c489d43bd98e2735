"""From a config and a weights file to a ready, stateless model: build, load strictly, fold, place."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoints import (
    check_flow_family,
    fold_weight_norm,
    load_strict,
    read_state_dict,
    strip_generator_prefix,
    unfold_weight_norm_keys,
    upgrade_weight_norm_keys,
)
from .config import ConfigError, ModelConfig, build_module, read_config

__all__ = ["build_flow", "load_flow", "build_vocoder", "load_vocoder", "resolve_model_dir", "model_files",
           "is_hub_model", "resolve_dtype", "BUNDLED_MODELS"]

_ASSETS = Path(__file__).resolve().parent / "assets"
# Models that ship inside the package, by name.
BUNDLED_MODELS = {
    "demo": _ASSETS / "demo",
    "tiny": _ASSETS / "tiny",
}


def default_model() -> str:
    """The model commands use when none is named: the demo voice where it is installed, else the tiny model."""
    return "demo" if (BUNDLED_MODELS["demo"] / "token2wav.yaml").is_file() else "tiny"


def display_name(model: str) -> str:
    """How a server names MODEL: a directory by its folder name, a bundled name or a model id as given."""
    path = Path(model)
    return path.name if path.exists() else model


def resolve_model_dir(model: str | Path, revision: str | None = None) -> Path:
    """A model directory (or a config file inside one) from a path, the name of a bundled model, or a model id.

    Local first: a bundled name, then an existing directory or ``.yaml`` file (also one spelled like
    ``ORG/NAME``). Otherwise a string written as ``ORG/NAME[@REVISION]`` or ``modelscope:ORG/NAME[@REVISION]``
    is fetched from its hub (only the files token2wav reads; see :mod:`token2wav.hub`) and its config file in the
    cache is returned. ``revision`` (a branch, tag or commit) applies to model ids only."""
    if isinstance(model, str) and model in BUNDLED_MODELS:
        _no_revision(model, revision)
        path = BUNDLED_MODELS[model]
        if not path.is_dir():
            raise FileNotFoundError(f"bundled model '{model}' is not installed (expected {path})")
        return path
    path = Path(model)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        _no_revision(model, revision)
        return path  # one config of a directory holding several: the weights are read beside it
    if path.is_dir():
        _no_revision(model, revision)
        return path
    from . import hub

    if isinstance(model, str) and hub.is_hub_id(model):
        return hub.resolve(model, revision)
    names = ", ".join(sorted(BUNDLED_MODELS))
    raise FileNotFoundError(
        f"model '{model}' is neither a directory nor a bundled model ({names}); a model's .yaml file also works, "
        "and so does a model id (ORG/NAME[@REVISION], modelscope:ORG/NAME)"
    )


def _no_revision(model: str | Path, revision: str | None) -> None:
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to model ids (ORG/NAME) only; '{model}' is local")


def is_hub_model(model: str | Path) -> bool:
    """Whether ``model`` names a model on a hub rather than a bundled model or something on this disk."""
    from . import hub

    if not isinstance(model, str) or model in BUNDLED_MODELS or Path(model).exists():
        return False
    return hub.is_hub_id(model)


def model_files(model: str | Path) -> dict[str, object]:
    """Which files of a model directory token2wav reads, and which it ignores (``token2wav info``).

    ``{"directory", "config", "flow", "vocoder", "assets", "ignored"}``: file names relative to the directory;
    ``assets`` are files a bundled model reads on first use (voices, tokenizer). Everything else (the LLM, ONNX
    exports, the speech tokenizer of a CosyVoice release, ...) is listed under ``ignored``."""
    from .checkpoints import find_weights_file
    from .config import find_config_file

    path = resolve_model_dir(model)
    directory = path.parent if path.is_file() else path
    config_path = path if path.is_file() else find_config_file(path)
    config = read_config(config_path)
    flow = find_weights_file(directory, ("flow",))
    vocoder = find_weights_file(directory, ("hift", "vocoder"))
    declared = config.extra.get("files") or {}
    assets = sorted(str(v) for k, v in declared.items() if k not in ("flow", "vocoder"))
    used = {config_path.name, flow.name, vocoder.name, *assets}
    ignored = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir() if p.name not in used)
    return {
        "directory": str(directory),
        "config": config_path.name,
        "flow": flow.name,
        "vocoder": vocoder.name,
        "assets": assets,
        "ignored": ignored,
    }


def _config(config: str | Path | ModelConfig) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else read_config(config)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "fp32": torch.float32, "fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float16", "bfloat16", "float32", "float64"; "fp16", "bf16")."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, float64; got {dtype!r}")
        return _DTYPES[key]
    _check_dtype(dtype)
    return dtype


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, float64; got {dtype}")


def build_flow(config_path: str | Path | ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """The flow (token -> mel) of a config, without weights. On 'meta' nothing is allocated."""
    config = _config(config_path)
    with torch.device(device):
        flow = _build(config, config.flow, "flow")
    return flow.eval()


def _build(config: ModelConfig, spec: object, section: str) -> nn.Module:
    try:
        return build_module(spec)
    except ConfigError as exc:  # name the file and the section: "cosyvoice3.yaml: hift: ..."
        raise ConfigError(f"{config.path}: {section}: {exc}") from None


def build_vocoder(config_path: str | Path | ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """The vocoder (mel -> waveform) of a config, without weights. On 'meta' nothing is allocated."""
    config = _config(config_path)
    with torch.device(device):
        vocoder = _build(config, config.vocoder, "hift" if config.format == "cosyvoice" else "vocoder")
    return vocoder.eval()


def _place(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def load_flow(
    config_path: str | Path | ModelConfig,
    weights_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> nn.Module:
    """Build the flow of a config and load `flow.pt` / `flow.safetensors` into it strictly."""
    dtype = resolve_dtype(dtype)
    config = _config(config_path)
    flow = build_flow(config, device="cpu")
    state = read_state_dict(weights_path)
    check_flow_family(state, config.family, config.path.name, str(weights_path))
    load_strict(flow, state, source=str(weights_path))
    return _place(flow, device, dtype)


def load_vocoder(
    config_path: str | Path | ModelConfig,
    weights_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> nn.Module:
    """Build the vocoder of a config and load `hift.pt` / `.safetensors` strictly, then fold weight norm."""
    dtype = resolve_dtype(dtype)
    config = _config(config_path)
    vocoder = build_vocoder(config, device="cpu")
    state = strip_generator_prefix(read_state_dict(weights_path))
    state = upgrade_weight_norm_keys(state, vocoder)
    state, _ = unfold_weight_norm_keys(state, vocoder)  # saved with weight norm folded: the same generator
    load_strict(vocoder, state, source=str(weights_path))
    fold_weight_norm(vocoder)
    seed = config.extra.get("source_noise_seed")
    if seed is not None and hasattr(vocoder, "set_source_noise"):
        vocoder.set_source_noise(int(seed))
    return _place(vocoder, device, dtype)
