"""Model configs, read as data.

Two formats are understood:

* CosyVoice's hyperpyyaml files (``cosyvoice2.yaml``, ``cosyvoice3.yaml``). Their tags (``!new:``, ``!name:``,
  ``!ref``, ``!apply:``) are parsed into plain nodes; nothing a file names is ever imported or called. Only the
  ``flow``, ``hift`` and ``feat_extractor`` entries are evaluated, and only classes listed in ``REGISTRY`` are
  built (as our own classes, with the file's keyword arguments).
* Our own ``token2wav.yaml``: plain YAML where a module is ``{class: Name, kwargs: {...}}``.
"""

from __future__ import annotations

import ast
import importlib
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ModuleSpec",
    "MelConfig",
    "ModelConfig",
    "read_config",
    "build_module",
    "REGISTRY",
    "find_config_file",
]


class ConfigError(ValueError):
    """A config file that we cannot or will not interpret."""


# Reference class path -> our implementation ("module:attribute"). Imported lazily, and only from our own package.
REGISTRY: dict[str, str] = {
    "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": "token2wav.models.flow:CausalMaskedDiffWithDiT",
    "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": "token2wav.models.flow:CausalMaskedDiffWithXvec",
    "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer": "token2wav.models.lookahead:PreLookaheadLayer",
    "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder":
        "token2wav.models.conformer:UpsampleConformerEncoder",
    "cosyvoice.flow.flow_matching.CausalConditionalCFM": "token2wav.models.cfm:CausalConditionalCFM",
    "cosyvoice.flow.DiT.dit.DiT": "token2wav.models.dit:DiT",
    "cosyvoice.flow.decoder.CausalConditionalDecoder": "token2wav.models.unet:CausalConditionalDecoder",
    "cosyvoice.hifigan.generator.HiFTGenerator": "token2wav.models.hift:HiFTGenerator",
    "cosyvoice.hifigan.generator.CausalHiFTGenerator": "token2wav.models.hift:CausalHiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": "token2wav.models.hift:ConvRNNF0Predictor",
    "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor": "token2wav.models.hift:CausalConvRNNF0Predictor",
    # Our own format names classes by their short name.
    "CausalMaskedDiffWithDiT": "token2wav.models.flow:CausalMaskedDiffWithDiT",
    "PreLookaheadLayer": "token2wav.models.lookahead:PreLookaheadLayer",
    "CausalConditionalCFM": "token2wav.models.cfm:CausalConditionalCFM",
    "DiT": "token2wav.models.dit:DiT",
    "HiFiGANGenerator": "token2wav.models.hifigan:HiFiGANGenerator",
}

# `!apply:` calls the reference configs make at the top of the file to seed RNGs. We recognise them and do nothing:
# seeding a process is not a config's business. Any other `!apply:` is refused.
_IGNORED_APPLY = {"random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all"}
_DATA_CLASSES = {"omegaconf.DictConfig"}  # `!new:omegaconf.DictConfig {content: {...}}` is just a dict
_MEL_FUNCTIONS = {"matcha.utils.audio.mel_spectrogram"}
_SECTIONS = ("flow", "hift", "feat_extractor")  # the only entries of a CosyVoice yaml we evaluate


# ----------------------------------------------------------------------------------------------------------------
# Parsing: tags become nodes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TagNode:
    """A tagged YAML value, kept as data: kind is 'new', 'name' or 'apply'."""

    kind: str
    target: str
    args: list[Any]
    kwargs: dict[str, Any]
    line: int


@dataclass
class RefNode:
    """`!ref <a> * <b>`: a reference (or arithmetic over references), resolved lazily."""

    expr: str
    line: int


class _DataLoader(yaml.SafeLoader):
    """A SafeLoader that turns hyperpyyaml tags into inert nodes."""


def _tag_node(kind: str):
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> TagNode:
        line = node.start_mark.line + 1
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if isinstance(node, yaml.MappingNode):
            kwargs = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            args = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
            if value not in ("", None):
                args = [value]
        return TagNode(kind, suffix, args, kwargs, line)

    return construct


def _ref_node(loader: yaml.SafeLoader, node: yaml.Node) -> RefNode:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"line {node.start_mark.line + 1}: !ref takes a scalar such as '<name>'")
    return RefNode(str(loader.construct_scalar(node)), node.start_mark.line + 1)


def _unsupported(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    raise ConfigError(f"line {node.start_mark.line + 1}: unsupported YAML tag '{node.tag}'")


# YAML 1.2 (which hyperpyyaml's ruamel parser follows) reads `1e-06` as a float; PyYAML's 1.1 rules read a string.
_DataLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_DataLoader.add_multi_constructor("!new:", _tag_node("new"))
_DataLoader.add_multi_constructor("!name:", _tag_node("name"))
_DataLoader.add_multi_constructor("!apply:", _tag_node("apply"))
_DataLoader.add_constructor("!ref", _ref_node)
_DataLoader.add_multi_constructor("!", _unsupported)
# yaml's own python tags (!!python/object ...) are already refused by SafeLoader.


def _parse_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_DataLoader)  # noqa: S506 - data-only loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _refuse_code(data, path)
    return data


def _refuse_code(value: Any, path: Path) -> None:
    """Refuse any `!apply:` that is not one of the reference's RNG seeding calls, wherever it stands."""
    if isinstance(value, TagNode):
        if value.kind == "apply" and value.target not in _IGNORED_APPLY:
            raise ConfigError(
                f"{path}: line {value.line}: tag '!apply:{value.target}' would execute code; "
                "token2wav never runs code named in a config"
            )
        for item in (*value.args, *value.kwargs.values()):
            _refuse_code(item, path)
    elif isinstance(value, dict):
        for item in value.values():
            _refuse_code(item, path)
    elif isinstance(value, list):
        for item in value:
            _refuse_code(item, path)


# ----------------------------------------------------------------------------------------------------------------
# Resolving references and arithmetic
# ----------------------------------------------------------------------------------------------------------------

_REF = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _eval_arith(expr: str, line: int) -> int | float:
    """Evaluate numbers and + - * / // % ** with parentheses; nothing else."""

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(
            node.value, bool
        ):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise ConfigError(f"line {line}: !ref expression '{expr}' is not plain arithmetic")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ConfigError(f"line {line}: cannot parse !ref expression '{expr}'") from None
    value = walk(tree)
    if isinstance(value, float) and value.is_integer() and "/" not in expr:
        value = int(value)
    return value


class _Resolver:
    def __init__(self, data: dict[str, Any], path: Path):
        self.data = data
        self.path = path
        self._active: set[str] = set()

    def lookup(self, name: str, line: int) -> Any:
        if name not in self.data:
            raise ConfigError(f"{self.path}: line {line}: !ref to undefined name '<{name}>'")
        if name in self._active:
            raise ConfigError(f"{self.path}: line {line}: circular !ref through '<{name}>'")
        self._active.add(name)
        try:
            return self.resolve(self.data[name])
        finally:
            self._active.discard(name)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, RefNode):
            return self._resolve_ref(value)
        if isinstance(value, TagNode):
            return TagNode(
                value.kind,
                value.target,
                [self.resolve(v) for v in value.args],
                {k: self.resolve(v) for k, v in value.kwargs.items()},
                value.line,
            )
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def _resolve_ref(self, ref: RefNode) -> Any:
        expr = ref.expr.strip()
        whole = _REF.fullmatch(expr)
        if whole:
            return self.lookup(whole.group(1), ref.line)

        def substitute(match: re.Match[str]) -> str:
            value = self.lookup(match.group(1), ref.line)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"{self.path}: line {ref.line}: '<{match.group(1)}>' is used in arithmetic but is not a number"
                )
            return repr(value)

        try:
            return _eval_arith(_REF.sub(substitute, expr), ref.line)
        except ConfigError as exc:
            if str(exc).startswith(str(self.path)):
                raise
            raise ConfigError(f"{self.path}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Typed configs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSpec:
    """One module to build: our class (looked up in REGISTRY by `target`) and its keyword arguments.

    Keyword argument values may themselves be ModuleSpecs (built first, then passed in)."""

    target: str
    kwargs: dict[str, Any]
    line: int | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.kwargs.get(key, default)


@dataclass(frozen=True)
class MelConfig:
    """The log-mel analysis that prompt features must be computed with."""

    sample_rate: int
    n_fft: int
    hop: int
    win: int
    n_mels: int
    fmin: float
    fmax: float | None
    center: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a model, plus the specs to build it."""

    path: Path
    format: str  # "cosyvoice" or "token2wav"
    family: str  # "cosyvoice2" (conformer + U-Net), "cosyvoice3" (DiT)
    sample_rate: int
    token_rate: int  # tokens per second
    token_mel_ratio: int
    pre_lookahead_len: int
    static_chunk_size: int  # mel frames of the estimator's chunk-causal attention
    num_decoding_left_chunks: int
    vocab_size: int
    spk_embed_dim: int
    mel_dim: int
    samples_per_frame: int  # vocoder samples per mel frame
    flow: ModuleSpec
    vocoder: ModuleSpec
    mel: MelConfig | None
    # Run-time ranges a model was trained for (dynamic chunks / lookahead); None = only the trained values.
    supported_chunk_tokens: tuple[int, int] | None = None
    supported_pre_lookahead: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_tokens(self) -> int:
        """The attention chunk in tokens."""
        return self.static_chunk_size // self.token_mel_ratio

    @property
    def mel_rate(self) -> float:
        return self.token_rate * self.token_mel_ratio


def _tag_to_spec(value: Any, section: str) -> Any:
    """Turn resolved tag nodes of an evaluated section into ModuleSpecs, refusing what we do not know."""
    if isinstance(value, TagNode):
        where = f"line {value.line}: tag '!{value.kind}:{value.target}' in '{section}'"
        if value.kind == "new" and value.target in _DATA_CLASSES:
            content = value.kwargs.get("content", value.args[0] if value.args else {})
            return _tag_to_spec(content, section)
        if value.kind == "new":
            if value.target not in REGISTRY:
                raise ConfigError(f"{where}: unknown class; token2wav knows: {', '.join(sorted(_REF_CLASSES))}")
            if value.args:
                raise ConfigError(f"{where}: positional arguments are not supported")
            kwargs = {k: _tag_to_spec(v, section) for k, v in value.kwargs.items()}
            return ModuleSpec(value.target, kwargs, value.line)
        if value.kind == "name" and value.target in _MEL_FUNCTIONS:
            return ModuleSpec(value.target, dict(value.kwargs), value.line)
        raise ConfigError(f"{where}: not supported here")
    if isinstance(value, dict):
        return {k: _tag_to_spec(v, section) for k, v in value.items()}
    if isinstance(value, list):
        return [_tag_to_spec(v, section) for v in value]
    return value


_REF_CLASSES = [k for k in REGISTRY if "." in k]


def _spec_from_own(value: Any, where: str) -> Any:
    """Our own format: {class: Name, kwargs: {...}} -> ModuleSpec, recursively."""
    if isinstance(value, dict) and "class" in value:
        target = value["class"]
        if target not in REGISTRY:
            raise ConfigError(f"{where}: unknown class '{target}'")
        unknown = set(value) - {"class", "kwargs"}
        if unknown:
            raise ConfigError(f"{where}: unexpected keys {sorted(unknown)} next to 'class'")
        kwargs = {k: _spec_from_own(v, f"{where}.{k}") for k, v in (value.get("kwargs") or {}).items()}
        return ModuleSpec(target, kwargs)
    if isinstance(value, dict):
        return {k: _spec_from_own(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_spec_from_own(v, where) for v in value]
    return value


def _samples_per_frame(vocoder: ModuleSpec) -> int:
    rates = vocoder.get("upsample_rates")
    if not rates:
        raise ConfigError("vocoder config has no 'upsample_rates'")
    hop = math.prod(int(r) for r in rates)
    istft = vocoder.get("istft_params")
    if isinstance(istft, dict):
        hop *= int(istft.get("hop_len", 1))
    return hop


def _require_int(value: Any, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: '{name}' must be an integer, got {value!r}")
    return value


def _check_chunking(static_chunk_size: int, token_mel_ratio: int, path: Path) -> None:
    if token_mel_ratio < 1:
        raise ConfigError(f"{path}: token_mel_ratio must be >= 1, got {token_mel_ratio}")
    if static_chunk_size <= 0:
        raise ConfigError(f"{path}: static_chunk_size must be a positive number of mel frames, got {static_chunk_size}")
    if static_chunk_size % token_mel_ratio:
        lower = static_chunk_size - static_chunk_size % token_mel_ratio
        options = [v for v in (lower, lower + token_mel_ratio) if v > 0]
        raise ConfigError(
            f"{path}: static_chunk_size ({static_chunk_size} mel frames) must be a multiple of token_mel_ratio "
            f"({token_mel_ratio}) so that chunks hold whole tokens; nearby valid values: {options}"
        )


def _read_cosyvoice(path: Path, data: dict[str, Any]) -> ModelConfig:
    resolver = _Resolver(data, path)
    missing = [s for s in ("flow", "hift") if s not in data]
    if missing:
        raise ConfigError(f"{path}: missing top-level entries {missing}")
    flow = _tag_to_spec(resolver.resolve(data["flow"]), "flow")
    vocoder = _tag_to_spec(resolver.resolve(data["hift"]), "hift")
    if not isinstance(flow, ModuleSpec) or not isinstance(vocoder, ModuleSpec):
        raise ConfigError(f"{path}: 'flow' and 'hift' must be '!new:' modules")
    mel = None
    if "feat_extractor" in data:
        feat = _tag_to_spec(resolver.resolve(data["feat_extractor"]), "feat_extractor")
        if isinstance(feat, ModuleSpec):
            fmax = feat.get("fmax")
            mel = MelConfig(
                sample_rate=int(feat.get("sampling_rate")),
                n_fft=int(feat.get("n_fft")),
                hop=int(feat.get("hop_size")),
                win=int(feat.get("win_size")),
                n_mels=int(feat.get("num_mels")),
                fmin=float(feat.get("fmin", 0)),
                fmax=None if fmax is None else float(fmax),
                center=bool(feat.get("center", False)),
            )

    decoder = flow.get("decoder")
    estimator = decoder.get("estimator") if isinstance(decoder, ModuleSpec) else None
    if not isinstance(estimator, ModuleSpec):
        raise ConfigError(f"{path}: flow.decoder.estimator must be a module")
    if flow.target.endswith("CausalMaskedDiffWithDiT"):
        family = "cosyvoice3"
    elif flow.target.endswith("CausalMaskedDiffWithXvec"):
        family = "cosyvoice2"
    else:
        raise ConfigError(f"{path}: flow class '{flow.target}' is not a streaming (causal) flow")

    token_mel_ratio = _require_int(flow.get("token_mel_ratio", 2), "flow.token_mel_ratio", path)
    static_chunk_size = _require_int(estimator.get("static_chunk_size", 50), "estimator.static_chunk_size", path)
    _check_chunking(static_chunk_size, token_mel_ratio, path)
    sample_rate = int(data.get("sample_rate", vocoder.get("sampling_rate", 24000)))
    return ModelConfig(
        path=path,
        format="cosyvoice",
        family=family,
        sample_rate=sample_rate,
        token_rate=int(flow.get("input_frame_rate", data.get("token_frame_rate", 25))),
        token_mel_ratio=token_mel_ratio,
        pre_lookahead_len=_require_int(flow.get("pre_lookahead_len", 3), "flow.pre_lookahead_len", path),
        static_chunk_size=static_chunk_size,
        num_decoding_left_chunks=int(estimator.get("num_decoding_left_chunks", -1)),
        vocab_size=_require_int(flow.get("vocab_size"), "flow.vocab_size", path),
        spk_embed_dim=_require_int(flow.get("spk_embed_dim", 192), "flow.spk_embed_dim", path),
        mel_dim=int(flow.get("output_size", 80)),
        samples_per_frame=_samples_per_frame(vocoder),
        flow=flow,
        vocoder=vocoder,
        mel=mel,
    )


def _range(value: Any, name: str, path: Path) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ConfigError(f"{path}: '{name}' must be a [min, max] pair of integers, got {value!r}")
    return (value[0], value[1])


def _read_own(path: Path, data: dict[str, Any]) -> ModelConfig:
    if data.get("format") != "token2wav/1":
        raise ConfigError(f"{path}: 'format' must be 'token2wav/1', got {data.get('format')!r}")
    for key in ("flow", "vocoder", "sample_rate", "token_mel_ratio"):
        if key not in data:
            raise ConfigError(f"{path}: missing key '{key}'")
    flow = _spec_from_own(data["flow"], "flow")
    vocoder = _spec_from_own(data["vocoder"], "vocoder")
    estimator = flow.get("decoder").get("estimator")
    token_mel_ratio = _require_int(data["token_mel_ratio"], "token_mel_ratio", path)
    static_chunk_size = _require_int(
        data.get("static_chunk_size", estimator.get("static_chunk_size", 50)), "static_chunk_size", path
    )
    _check_chunking(static_chunk_size, token_mel_ratio, path)
    mel_data = data.get("mel") or {}
    sample_rate = _require_int(data["sample_rate"], "sample_rate", path)
    mel = (
        MelConfig(
            sample_rate=sample_rate,
            n_fft=int(mel_data["n_fft"]),
            hop=int(mel_data["hop"]),
            win=int(mel_data["win"]),
            n_mels=int(mel_data.get("n_mels", 80)),
            fmin=float(mel_data.get("fmin", 0)),
            fmax=None if mel_data.get("fmax") is None else float(mel_data["fmax"]),
            center=bool(mel_data.get("center", False)),
        )
        if mel_data
        else None
    )
    supported = data.get("supported") or {}
    return ModelConfig(
        path=path,
        format="token2wav",
        family="cosyvoice3",
        sample_rate=sample_rate,
        token_rate=int(data.get("token_rate", round(sample_rate / (mel.hop if mel else 256) / token_mel_ratio))),
        token_mel_ratio=token_mel_ratio,
        pre_lookahead_len=_require_int(data.get("pre_lookahead_len", flow.get("pre_lookahead_len", 3)),
                                       "pre_lookahead_len", path),
        static_chunk_size=static_chunk_size,
        num_decoding_left_chunks=int(data.get("num_decoding_left_chunks", -1)),
        vocab_size=_require_int(flow.get("vocab_size"), "flow.vocab_size", path),
        spk_embed_dim=_require_int(flow.get("spk_embed_dim", 192), "flow.spk_embed_dim", path),
        mel_dim=int(flow.get("output_size", 80)),
        samples_per_frame=int(data.get("samples_per_frame", _samples_per_frame(vocoder))),
        flow=flow,
        vocoder=vocoder,
        mel=mel,
        supported_chunk_tokens=_range(supported.get("chunk_tokens"), "supported.chunk_tokens", path),
        supported_pre_lookahead=_range(supported.get("pre_lookahead_len"), "supported.pre_lookahead_len", path),
        extra={k: v for k, v in data.items() if k not in {"flow", "vocoder", "mel", "supported"}},
    )


CONFIG_NAMES = ("token2wav.yaml", "cosyvoice3.yaml", "cosyvoice2.yaml", "cosyvoice.yaml")


def find_config_file(model_dir: str | Path) -> Path:
    """The config file of a model directory (ours first, then the CosyVoice names)."""
    model_dir = Path(model_dir)
    found = [model_dir / name for name in CONFIG_NAMES if (model_dir / name).is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(
            f"{model_dir} holds {len(found)} model configs ({names}): give the one to use as the model "
            f"instead of the directory, e.g. {found[0]}"
        )
    if found:
        return found[0]
    raise ConfigError(f"{model_dir}: no config file found (looked for {', '.join(CONFIG_NAMES)})")


def read_config(path: str | Path) -> ModelConfig:
    """Read a model config (a YAML file, or a model directory holding one) as data."""
    path = Path(path)
    if path.is_dir():
        path = find_config_file(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _parse_yaml(path)
    if "format" in data:
        return _read_own(path, data)
    return _read_cosyvoice(path, data)


# ----------------------------------------------------------------------------------------------------------------
# Building modules from specs
# ----------------------------------------------------------------------------------------------------------------


def _resolve_class(target: str) -> type:
    module_name, _, attr = REGISTRY[target].partition(":")
    module = importlib.import_module(module_name)  # always one of our own modules
    return getattr(module, attr)


def build_module(spec: ModuleSpec) -> Any:
    """Construct our class for `spec`, building nested module specs first."""

    def build(value: Any) -> Any:
        if isinstance(value, ModuleSpec):
            return build_module(value)
        if isinstance(value, dict):
            return {k: build(v) for k, v in value.items()}
        if isinstance(value, list):
            return [build(v) for v in value]
        return value

    cls = _resolve_class(spec.target)
    where = f" (line {spec.line})" if spec.line else ""
    accepted = _accepted_kwargs(cls)
    if accepted is not None:
        unknown = sorted(set(spec.kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{_short(spec.target)}{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
            )
    kwargs = {k: build(v) for k, v in spec.kwargs.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"cannot build '{spec.target}'{where}: {exc}") from None


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _accepted_kwargs(cls: type) -> list[str] | None:
    """The keyword arguments ``cls`` takes, in order (None when it takes any: ``**kwargs``)."""
    import inspect

    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in named]
