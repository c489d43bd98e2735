"""The ``token2wav`` command.

Subcommands register themselves with :func:`subcommand`; adding one is one decorated function::

    from token2wav.cli import arg, subcommand

    @subcommand("hello", help="say hello", args=[arg("--name", default="world")])
    def hello(args) -> int:
        print(f"hello {args.name}")
        return 0

A module can also be a subcommand by itself: list it in :data:`COMMAND_MODULES` and give it two top-level
functions, ``add_arguments(parser)`` and ``main(args) -> int``; the first line of its docstring is the help
text. Such a module is imported only when its subcommand runs, so ``token2wav --help`` and the light
commands stay fast. Entry points in the ``token2wav.commands`` group are loaded too (they register with
:func:`subcommand` when imported).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from token2wav.models.hifigan import VOCODER_PRECISION_HELP, VOCODER_PRECISIONS

__all__ = ["COMMAND_MODULES", "arg", "build_parser", "main", "subcommand"]

# Subcommand name -> module with top-level add_arguments(parser) and main(args); skipped while absent.
COMMAND_MODULES: dict[str, str] = {
    "bench": "token2wav.bench",
    "demo": "token2wav.demo",
    "loadtest": "token2wav.serve.loadtest",
    "prompt": "token2wav.frontend.command",
    "tokenize": "token2wav.tokenizer",
}
ENTRY_POINT_GROUP = "token2wav.commands"

CommandFn = Callable[[argparse.Namespace], "int | None"]


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    configure: Callable[[argparse.ArgumentParser], None] | None
    run: CommandFn


_COMMANDS: dict[str, _Command] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One ``add_argument`` call, written down for :func:`subcommand`."""
    return flags, kwargs


def subcommand(
    name: str,
    *,
    help: str,
    args: Sequence[tuple[tuple[str, ...], dict[str, Any]]] = (),
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Callable[[CommandFn], CommandFn]:
    """Register ``fn(args) -> exit code`` as ``token2wav NAME``.

    ``args`` lists :func:`arg` entries; ``configure(parser)`` may add anything ``args`` cannot express.
    Registering a name twice replaces the earlier command (the last import wins).
    """

    def deco(fn: CommandFn) -> CommandFn:
        _COMMANDS[name] = _Command(name, help, tuple(args), configure, fn)
        return fn

    return deco


def _module_command_help(module: str) -> str | None:
    """Help text of a command module, read from its source without importing it (None: not a command)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ModuleNotFoundError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if not {"add_arguments", "main"} <= defs:
        return None
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    first = doc[0] if doc else module
    # "`token2wav bench`: what it does" -> "what it does"
    return re.sub(r"^`[^`]*`\s*:\s*", "", first)


def _load_entry_points() -> None:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # broken metadata must not break the built-in commands
        eps = ()
    for ep in eps:
        _import_quietly(ep.value, ep.load)


def _import_quietly(what: str, load: Callable[[], Any]) -> None:
    # one command whose optional dependency is missing must not take the other commands down
    try:
        load()
    except ImportError as e:
        print(f"token2wav: commands from {what} unavailable: {e}", file=sys.stderr)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. ``argv`` tells which module command (if any) must be imported to list its options."""
    _load_entry_points()
    parser = argparse.ArgumentParser(
        prog="token2wav", description="Speech tokens to waveform: synthesis, streaming server and client."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    entries: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}
    for name, module in COMMAND_MODULES.items():
        if name in _COMMANDS:
            continue
        help_text = _module_command_help(module)
        if help_text is not None:
            entries[name] = (help_text, _module_configurer(name, module, name == selected))
    for cmd in _COMMANDS.values():
        entries[cmd.name] = (cmd.help, _command_configurer(cmd))
    for name in sorted(entries):
        help_text, configure = entries[name]
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command_parser=command)  # its own usage line for options it does not know
        configure(command)
    return parser


def _command_configurer(cmd: _Command) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
        if cmd.configure is not None:
            cmd.configure(p)
        p.set_defaults(command_fn=cmd.run)

    return configure


def _module_configurer(name: str, module: str, selected: bool) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        if not selected:  # not running: no need to import it (keeps --help fast)
            return
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(command_fn=mod.main)

    return configure


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser (its usage), not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _note_printer(args.command)  # notes (e.g. ignored training entries): one line
            code = args.command_fn(args)
    except (ValueError, TypeError, FileNotFoundError, MemoryError) as e:
        # bad input (or an input this machine cannot hold): one clear line, no traceback
        print(f"token2wav {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from token2wav.memory import is_out_of_memory, out_of_memory_message

        if not is_out_of_memory(e):
            raise
        print(f"token2wav {args.command}: error: {out_of_memory_message(e, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


def _note_printer(command: str) -> Callable[..., None]:
    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"token2wav {command}: note: {message}", file=sys.stderr)

    return show


# ----------------------------------------------------------------------------------------- helpers

_MODEL_ARGS = [
    arg("--device", default="cpu", help="torch device (default: cpu)"),
    arg("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype"),
]


MODEL_HELP = ("model directory, bundled model name, or a released model's id: ORG/NAME[@REVISION] (Hugging Face "
              "Hub) or modelscope:ORG/NAME[@REVISION]; an id downloads only what token2wav reads")


def load_engine(model: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load MODEL (a model directory, a bundled model name or a model id ORG/NAME[@REVISION])."""
    import torch

    from token2wav import Token2Wav

    return Token2Wav.from_pretrained(model, device=device, dtype=getattr(torch, dtype))


def _local_model(model: str) -> str:
    """MODEL as something on this disk: a model id is fetched (only what token2wav reads) or found in the hub's
    cache, once, before any weights are loaded; a directory or bundled name is returned as it is."""
    from token2wav.loading import is_hub_model

    if not is_hub_model(model):
        return model
    from token2wav import hub

    return str(hub.resolve(model))


def _write_wav(path: str, audio: Any, sample_rate: int) -> None:
    from token2wav.serve.protocol import wav_bytes

    data = wav_bytes(audio, sample_rate)
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(data)
    except OSError as e:  # a read-only folder, a full disk: one line, not a traceback
        raise ValueError(f"--out {path}: cannot write it ({e.strerror or e})") from None


def _load_prompt(path: str | None) -> Any:
    if path is None:
        return None
    from token2wav import Prompt
    from token2wav.tokens_io import load_prompt_npz

    arrays = load_prompt_npz(path)
    return Prompt(tokens=arrays.tokens, mel=arrays.mel, embedding=arrays.embedding)


def _prompt_from_wav(t2w: Any, path: str, speaker: str | None) -> Any:
    try:
        return t2w.prompt_from_wav(path, speaker=speaker)
    except ImportError as e:  # onnxruntime missing: the message says what to install
        raise ValueError(str(e)) from None


def _print_table(info: dict[str, Any], indent: str = "") -> None:
    width = max((len(k) for k in info), default=0)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_table(value, indent + "  ")
        else:
            print(f"{indent}{key:<{width}}  {value}")


# ----------------------------------------------------------------------------------------- commands


@subcommand(
    "info",
    help="show a model's rates, chunking, parameter count and presets",
    args=[
        arg("model", metavar="MODEL", help=MODEL_HELP + " (for an id: what it would fetch, and its size)"),
        arg("--revision", help="branch, tag or commit of a model id (the same as ORG/NAME@REVISION)"),
        arg("--json", action="store_true", help="print JSON"),
        *_MODEL_ARGS,
    ],
)
def _info(args: argparse.Namespace) -> int:
    from token2wav.loading import is_hub_model, model_files
    from token2wav.serve.protocol import describe_model

    if args.revision is not None or is_hub_model(args.model):
        return _info_hub(args)

    files = model_files(args.model)
    t2w = load_engine(args.model, args.device, args.dtype)
    from token2wav.cpu import detect_cpu
    from token2wav.loading import display_name

    info = describe_model(t2w, display_name(args.model))
    info["files"] = files
    cpu = detect_cpu()
    if args.json:
        info["cpu"] = cpu.as_dict()
        print(json.dumps(info, indent=2))
    else:
        from token2wav.presets import describe_presets

        params = info.pop("parameters")
        info.pop("presets")
        info["parameters"] = f"{params['total']:,} (flow {params['flow']:,}, vocoder {params['vocoder']:,})"
        files = info.pop("files")
        read = [files["config"], files["flow"], files["vocoder"], *files["assets"]]
        info["files read"] = f"{', '.join(read)} (in {files['directory']})"
        info["files ignored"] = ", ".join(files["ignored"]) or "none"
        batching = info.pop("batching")
        info["batching"] = (f"flow: {batching['flow']}; vocoder: {batching['vocoder']}; cache "
                            f"{batching['cache_mb_per_stream_minute']} MB per stream-minute")
        if batching["buckets"]:
            b = batching["buckets"]
            info["graph buckets"] = (f"rows {b['rows']}, new frames per row {b['queries']}, keys per row "
                                     f"{b['keys']}, then multiples of {b['keys_multiple']}")
        info["cuda graphs"] = batching["graphs"]
        info["cpu"] = cpu.describe()
        _print_table(info)
        print(describe_presets(t2w.config))
    return 0


def _hub_json(m: Any) -> dict[str, Any]:
    return {
        "model": str(m.id),
        "hub": m.id.hub,
        "repo_id": m.id.repo_id,
        "revision": m.id.revision,
        "commit": m.commit,
        "config": m.config,
        "files": [{"path": f.path, "size": f.size, "role": f.role, "cached": f.cached} for f in m.files],
        "fetch_bytes": m.fetch_bytes,
        "ignored": [{"path": f.path, "size": f.size} for f in m.ignored],
        "ignored_bytes": m.ignored_bytes,
        "location": None if m.location is None else str(m.location),
        "from_cache": m.from_cache,
    }


def _files(n: int) -> str:
    return f"{n} file" + ("" if n == 1 else "s")


def _ignored_summary(files: Sequence[Any]) -> str:
    """``llm.pt (2.0 GB), CosyVoice-BlankEN/ (7 files, 988.1 MB), ...``: folders counted as one entry."""
    from token2wav.hub import format_size

    groups: dict[str, list[Any]] = {}
    for f in files:
        head, sep, _ = f.path.partition("/")
        groups.setdefault(head + sep, []).append(f)
    parts = []
    for name, members in sorted(groups.items(), key=lambda kv: -sum(f.size or 0 for f in kv[1])):
        size = format_size(sum(f.size or 0 for f in members))
        parts.append(f"{name} ({_files(len(members))}, {size})" if name.endswith("/") else f"{name} ({size})")
    return ", ".join(parts)


def _info_hub(args: argparse.Namespace) -> int:
    """``token2wav info ORG/NAME``: what a download fetches and how large it is (only the config is fetched)."""
    from token2wav import hub

    m = hub.plan(args.model, args.revision)
    if args.json:
        print(json.dumps(_hub_json(m), indent=2))
        return 0
    where = "Hugging Face Hub" if m.id.hub == hub.HUGGINGFACE else "ModelScope"
    rev = m.id.revision or "default branch"
    cached = sum(f.cached for f in m.files)
    print(f"model     {m.id} ({where}, {rev}{f', commit {m.commit}' if m.commit else ''})")
    print(f"fetches   {_files(len(m.files))}, {hub.format_size(m.fetch_bytes)} ({cached} of {len(m.files)} already "
          "on disk)" if not m.from_cache else f"reads     {len(m.files)} cached files (the hub was not reached)")
    width = max(len(f.path) for f in m.files)
    for f in m.files:
        state = "cached" if f.cached else "to fetch"
        print(f"  {f.path:<{width}}  {hub.format_size(f.size):>10}  {f.role}, {state}")
    if m.ignored:
        print(f"never     {_files(len(m.ignored))}, {hub.format_size(m.ignored_bytes)}: {_ignored_summary(m.ignored)}")
    if m.location is not None:
        print(f"location  {m.location}")
    if m.complete:
        print(f"all files are on disk: `token2wav info {m.location / m.config}` shows the model's rates, chunking "
              "and parameters")
    else:
        print(f"fetch it: token2wav download {m.id} (or use the id as --model, which downloads on first use)")
    return 0


@subcommand(
    "download",
    help="fetch a released model by id (ORG/NAME[@REVISION], modelscope:ORG/NAME): only the files token2wav reads",
    args=[
        arg("model", metavar="ORG/NAME", help="model id: ORG/NAME[@REVISION] (Hugging Face Hub) or "
            "modelscope:ORG/NAME[@REVISION]"),
        arg("--revision", help="branch, tag or commit (the same as ORG/NAME@REVISION)"),
        arg("--dir", metavar="DIR", help="put the files in this folder (then --model DIR) instead of the hub's "
            "cache (then --model ORG/NAME)"),
        arg("--json", action="store_true", help="print JSON"),
    ],
)
def _download(args: argparse.Namespace) -> int:
    from token2wav import hub

    if not hub.is_hub_id(args.model):
        raise ValueError(f"{args.model!r} is not a model id (ORG/NAME[@REVISION] or modelscope:ORG/NAME); a model "
                         "directory or bundled model needs no download")
    m = hub.download(args.model, args.revision, local_dir=args.dir)
    if args.json:
        print(json.dumps(_hub_json(m), indent=2))
        return 0
    how = "found in the cache (the hub was not reached)" if m.from_cache else "downloaded or already cached"
    print(f"{m.id}: {_files(len(m.files))}, {hub.format_size(m.fetch_bytes)}, {how}: {m.location}")
    if m.ignored:
        print(f"not fetched: {_files(len(m.ignored))}, {hub.format_size(m.ignored_bytes)} that token2wav does not read")
    print(f"use it: --model {args.dir if args.dir is not None else m.id}")
    return 0


@subcommand(
    "synth",
    help="synthesize a token file to a WAV file (offline, or through a streaming session)",
    args=[
        arg("--model", required=True, help=MODEL_HELP),
        arg(
            "--tokens",
            required=True,
            metavar="FILE|-",
            help="JSON list, whitespace-separated ints, .npy, or LLM text with <|s_N|> markers",
        ),
        arg("--out", required=True, metavar="OUT.wav", help="output WAV ('-' for stdout)"),
        arg("--prompt", metavar="PROMPT.npz", help="speaker prompt with arrays tokens, mel, embedding"),
        arg("--prompt-wav", metavar="IN.wav", help="clone the voice of this recording (0.5-30 s)"),
        arg("--speaker", help="a voice of the model (e.g. slt, rms, awb for demo; or from its spk2info.pt)"),
        arg("--stream", action="store_true", help="decode through a streaming session, token by token"),
        arg("--preset", help="streaming preset (see `token2wav info`)"),
        arg("--hop", type=int, help="streaming hop in tokens"),
        arg("--mode", choices=["cached", "recompute", "window"], help="streaming mode"),
        arg("--window-frames", type=int, help="attention window (target mel frames) for --mode window"),
        arg("--attention", choices=["full", "chunk"], help="offline attention (default: the engine's)"),
        arg("--json", action="store_true", help="print a JSON summary (latency, RTF, chunks)"),
        arg(
            "--warmup",
            action="store_true",
            help="decode a few tokens first so timings exclude one-time costs",
        ),
        *_MODEL_ARGS,
    ],
)
def _synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from token2wav.tokens_io import check_output_path, read_tokens

    tokens = read_tokens(args.tokens)
    if tokens.size == 0:
        raise ValueError(f"tokens: {args.tokens} holds no tokens")
    check_output_path(args.out)
    if not args.stream:
        for opt in ("preset", "hop", "mode", "window_frames"):
            if getattr(args, opt) is not None:
                raise ValueError(f"--{opt.replace('_', '-')} applies only with --stream")
    elif args.attention is not None:
        raise ValueError("--attention applies only without --stream (streaming is chunk-causal)")
    if args.speaker is not None and args.prompt is not None:
        raise ValueError("--speaker and --prompt are alternatives: give one")
    if args.prompt_wav is not None and args.prompt is not None:
        raise ValueError("--prompt and --prompt-wav are alternatives: give one")
    prompt = None if args.speaker is not None else _load_prompt(args.prompt)
    model = _local_model(args.model)  # a model id: fetched (or found in the cache) here, once
    _precheck_synth(args, tokens, prompt, model)  # what the config alone decides, before seconds of loading
    t2w = load_engine(model, args.device, args.dtype)
    if args.prompt_wav is not None:  # with --speaker: that voice's embedding (the demo model needs one)
        prompt = _prompt_from_wav(t2w, args.prompt_wav, args.speaker)
    elif args.speaker is not None:
        prompt = t2w.speaker_prompt(args.speaker)
    if args.warmup:
        t2w.warm_up()
    sr = int(t2w.sample_rate)
    show = tokens.size >= 20 * float(t2w.token_rate)  # a bar only for inputs of 20 s of speech or more
    bar = tqdm(total=int(tokens.size), unit="tok", disable=None if show else True, file=sys.stderr)
    first_latency: float | None = None
    chunks = 0
    t0 = time.perf_counter()
    if args.stream:
        opts = {k: getattr(args, k) for k in ("preset", "hop", "mode", "window_frames") if getattr(args, k) is not None}
        session = t2w.stream(prompt=prompt, **opts)
        used = {  # what the session decodes with, defaults and preset resolved (for --json)
            "preset": args.preset or "none",
            "hop": int(session.plan.hop),
            "schedule": session.plan.schedule,
            "max_hop": session.plan.max_hop,
            "mode": session.mode,
            "window_frames": session.window_frames,
            "quantized_flow": session.flow is not t2w.flow,
        }
        pieces = []
        try:
            t0 = time.perf_counter()
            for i in range(tokens.size):  # one token per push, the way an LLM emits them
                for c in session.push(tokens[i : i + 1]):
                    if len(c):
                        first_latency = first_latency if first_latency is not None else time.perf_counter() - t0
                        pieces.append(c)
                        chunks += 1
                bar.update(1)
            last = session.finish()
            if len(last):
                first_latency = first_latency if first_latency is not None else time.perf_counter() - t0
                pieces.append(last)
                chunks += 1
        finally:
            session.close()
        import numpy as np

        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    else:
        kwargs = {"prompt": prompt}
        if args.attention is not None:
            kwargs["attention"] = args.attention
        audio = t2w.synthesize(tokens, **kwargs)
        bar.update(int(tokens.size))
        chunks = 1
        first_latency = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    bar.close()
    _write_wav(args.out, audio, sr)
    audio_s = len(audio) / sr
    summary = {
        "out": args.out,
        "tokens": int(tokens.size),
        "samples": int(len(audio)),
        "sample_rate": sr,
        "audio_s": round(audio_s, 4),
        "wall_s": round(wall, 4),
        "rtf": round(wall / audio_s, 4) if audio_s else None,
        "first_chunk_latency_s": None if first_latency is None else round(first_latency, 4),
        "chunks": chunks,
        "stream": bool(args.stream),
    }
    if args.stream:
        summary.update(used)
    if args.json:
        print(json.dumps(summary, indent=2), file=sys.stderr if args.out == "-" else sys.stdout)
    elif args.out != "-":
        print(
            f"wrote {args.out}: {audio_s:.2f} s of audio in {wall:.2f} s (RTF {summary['rtf']}), "
            f"{chunks} chunk(s), first chunk after {summary['first_chunk_latency_s']} s"
        )
    return 0


def _precheck_cache_budget(args: argparse.Namespace) -> None:
    """Refuse a ``--max-cache-mb`` that cannot hold one chunk of one stream, from the model's config (the
    random-weight ``bench:`` models are checked when built)."""
    import torch

    from token2wav.config import read_config
    from token2wav.loading import default_model, resolve_model_dir
    from token2wav.memory import kv_bytes_per_frame
    from token2wav.streaming.batcher import check_cache_budget

    model = args.model if args.model is not None else default_model()
    if model.startswith("bench:"):
        return
    config = read_config(resolve_model_dir(_local_model(model)))
    per_frame = kv_bytes_per_frame(config, getattr(torch, args.dtype))
    check_cache_budget(int(args.max_cache_mb * 2**20), per_frame, int(config.static_chunk_size))


def _precheck_synth(args: argparse.Namespace, tokens: Any, prompt: Any = None, model: str | None = None) -> None:
    """Refuse, before any weights are read, what the model's config alone rules out (flags named as typed).
    ``model``: ``args.model`` already resolved to this disk (see :func:`_local_model`)."""
    from token2wav.config import read_config
    from token2wav.loading import resolve_model_dir
    from token2wav.memory import check_offline_memory
    from token2wav.preflight import CLI_NAMES, check_stream_options, check_token_ids

    config = read_config(resolve_model_dir(args.model if model is None else model))
    check_token_ids(tokens, config, name=f"--tokens {args.tokens}")
    if args.stream:
        check_stream_options(
            config, preset=args.preset, hop=args.hop, mode=args.mode, window_frames=args.window_frames,
            names=CLI_NAMES,
        )
    else:
        import torch

        prompt_tokens = 0 if prompt is None else int(prompt.num_tokens)
        frames = (prompt_tokens + int(tokens.size)) * int(config.token_mel_ratio)
        check_offline_memory(config, frames, attention=args.attention or "full", dtype=getattr(torch, args.dtype),
                             device=args.device, names=CLI_NAMES)
    if args.speaker is not None:
        from token2wav.frontend.voices import voice_names

        speakers = list(config.extra.get("speakers") or []) + voice_names(config.path.parent)
        if args.speaker not in speakers:
            have = (f"must be one of {', '.join(speakers)}" if speakers
                    else "not available: this model ships no voices (use --prompt or --prompt-wav)")
            raise ValueError(f"--speaker {args.speaker}: {have}")


def _serve_options(p: argparse.ArgumentParser) -> None:
    importlib.import_module("token2wav.serve.runner").add_server_options(p)
    importlib.import_module("token2wav.serve.ray").add_ray_options(p)  # imports no Ray


@subcommand(
    "serve",
    help="run the HTTP/WebSocket streaming server and its web page (GET /)",
    args=[
        arg("--model", default=None, help=MODEL_HELP + " (default: the demo voice)"),
        arg("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)"),
        arg("--port", type=int, default=50000, help="port (default: 50000)"),
        arg("--max-sessions", type=int, default=16, help="open streams + synthesize requests at once"),
        arg("--max-waiting-streams", type=int, default=8,
            help="new streams that wait (a 'queued' message) while the open ones need all the capacity the server "
                 "measures; beyond, close 1013 (default 8)"),
        arg("--admission-wait", type=float, default=10.0,
            help="seconds a new stream may wait for capacity before it is refused (default 10)"),
        arg("--no-admission-control", action="store_true",
            help="admit streams up to --max-sessions whatever the load (default: by measured capacity)"),
        arg("--max-tokens", type=int, default=25 * 600, help="tokens one session may send"),
        arg("--max-message-bytes", type=int, default=1 << 20, help="largest WebSocket message / request body"),
        arg("--max-prompt-bytes", type=int, default=16 << 20, help="largest /v1/prompts request body"),
        arg("--max-prompt-tokens", type=int, default=1500,
            help="most tokens of a prompt posted as JSON (its first pass is quadratic in them; default 1500)"),
        arg("--idle-timeout", type=float, default=30.0, help="seconds a stream may stay silent"),
        arg("--start-timeout", type=float, default=5.0,
            help="seconds a new stream may wait before its 'start' message"),
        arg("--workers", type=int, default=4, help="threads running model work"),
        arg("--threads", type=int, help="torch intra-op threads (default: torch's choice)"),
        arg("--vocoder-precision", default="float32", choices=VOCODER_PRECISIONS, help=VOCODER_PRECISION_HELP),
        arg("--no-batching", action="store_true",
            help="compute every chunk in a call of its own, a batch of one (default: the batcher runs streams' "
                 "ready chunks together)"),
        arg("--max-batch", type=int, default=16, help="most chunks in one batched call (default 16)"),
        arg("--max-wait-ms", type=float, default=10.0,
            help="longest a ready chunk waits for others to join its batch (default 10)"),
        arg("--batch-workers", type=int,
            help="threads running batched calls (default 1; on a CPU, more than one wants --threads 1: "
                 "docs/streaming.md)"),
        arg("--max-cache-mb", type=float,
            help="memory budget of all streams' attention caches; a stream that would pass it gets 503 / 1013"),
        arg("--graphs", action="store_true",
            help="batched streams in fixed-shape batches (CosyVoice 3, CosyVoice 2, the demo voice), each shape "
                 "captured once as a CUDA graph and replayed (on a CPU the same path runs eagerly); give "
                 "--max-cache-mb with it so that the key/value pool is allocated once and never grows"),
        arg("--no-calibrate", action="store_true",
            help="start without measuring the model's chunk times (a few seconds; default: measure them, so that "
                 "the first stream's hops and start buffer are planned from measurements)"),
        arg("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]),
        *_MODEL_ARGS,
    ],
    configure=_serve_options,
)
def _serve(args: argparse.Namespace) -> int:
    from token2wav.serve.assembly import ServerSpec, build_server
    from token2wav.serve.protocol import ServerLimits
    from token2wav.serve.runner import access_from_args, run_server, show_own_logs

    if args.ray:  # the same server on Ray Serve replicas (serve/ray/)
        from token2wav.serve.ray import serve_on_ray

        if args.model is not None:
            _local_model(args.model)  # a model id: downloaded once here; replicas find it in the (shared) cache
        if args.max_cache_mb is not None and args.max_cache_mb > 0:
            _precheck_cache_budget(args)  # before any replica loads the model
        return serve_on_ray(args)
    access = access_from_args(args)  # before loading anything: a refused address or a bad key fails fast
    if args.model is None:  # the bundled demo voice (the tiny random-weight model if it is not installed)
        from token2wav.loading import default_model

        args.model = default_model()
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 0 <= args.max_wait_ms <= 1000:
        raise ValueError(f"--max-wait-ms must be in [0, 1000], got {args.max_wait_ms}")
    if args.batch_workers is not None and not 1 <= args.batch_workers <= 64:
        raise ValueError(f"--batch-workers must be in [1, 64], got {args.batch_workers}")
    if args.max_cache_mb is not None and not args.max_cache_mb > 0:
        raise ValueError(f"--max-cache-mb must be > 0, got {args.max_cache_mb}")
    if args.max_cache_mb is not None:
        _precheck_cache_budget(args)  # the config alone decides it: before seconds of loading
    if args.graphs and args.no_batching:
        raise ValueError("--graphs runs the batcher's fixed-shape batches; it cannot be used with --no-batching")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")

    limits = ServerLimits(
        max_sessions=args.max_sessions,
        max_tokens_per_session=args.max_tokens,
        max_message_bytes=args.max_message_bytes,
        max_prompt_bytes=args.max_prompt_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        idle_timeout_s=args.idle_timeout,
        start_timeout_s=args.start_timeout,
        workers=args.workers,
        max_queued_tokens=args.max_queued_tokens,
        max_waiting_streams=args.max_waiting_streams,
        admission_wait_s=args.admission_wait,
        admit_by_capacity=not args.no_admission_control,
    )
    spec = ServerSpec(
        model=args.model, device=args.device, dtype=args.dtype, vocoder_precision=args.vocoder_precision,
        threads=args.threads,
        batching=not args.no_batching, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_cache_mb=args.max_cache_mb, batch_workers=args.batch_workers, graphs=args.graphs,
        calibrate=not args.no_calibrate, limits=limits,
        api_key=access.api_key, allow_origins=access.allow_origins, allowed_hosts=access.allowed_hosts,
        prompt_dir=args.prompt_dir,
    )
    show_own_logs(args.log_level)  # before building: the calibration's measurements at debug
    server = build_server(spec)
    done = "loaded, warmed up and measured" if spec.calibrate else "loaded and warmed up"
    print(f"token2wav: model {args.model} {done} ({server.load_s:.1f} s)", file=sys.stderr)
    if args.graphs and args.max_cache_mb is None and server.t2w.device.type == "cuda":
        print("token2wav: warning: --graphs without --max-cache-mb: the key/value pool starts small and grows; "
              "each growth copies every stream's cache and makes every captured shape capture again",
              file=sys.stderr)
    app = server.app
    print(
        f"token2wav: serving {args.model} on http://{args.host}:{args.port} "
        f"(stream: ws://{args.host}:{args.port}/v1/stream)"
        + ("; access key required" if access.api_key else ""),
        file=sys.stderr,
    )
    page_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    page_host = f"[{page_host}]" if ":" in page_host else page_host
    print(f"token2wav: open http://{page_host}:{args.port}/ in a browser to hear it", file=sys.stderr, flush=True)
    return run_server(
        app, host=args.host, port=args.port, log_level=args.log_level, drain_timeout_s=args.drain_timeout
    )


@subcommand(
    "client",
    help="stream a token file to a server at an LLM-like pace; report latency and RTF",
    args=[
        arg("--url", default="ws://127.0.0.1:50000/v1/stream", help="server (ws://HOST:PORT/v1/stream)"),
        arg("--tokens", required=True, metavar="FILE|-", help="token file (same formats as synth)"),
        arg("--rate", type=float, default=None,
            help="tokens per second to send (default: the model's own token rate, as a real-time LLM sends them; "
                 "0: all at once)"),
        arg("--prebuffer", type=float, metavar="SECONDS",
            help="the listener's start buffer, for the stalls reported (default: the server's recommendation)"),
        arg("--out", metavar="OUT.wav", help="write the received audio"),
        arg("--voice", help="one of the server's voices (GET /v1/voices; the demo voice: slt, rms, awb)"),
        arg("--prompt", metavar="PROMPT.npz", help="register this prompt first and use it"),
        arg("--prompt-wav", metavar="IN.wav", help="upload this recording as the prompt (the server clones it)"),
        arg("--prompt-id", help="use an already registered prompt"),
        arg("--preset", help="streaming preset"),
        arg("--hop", type=int, help="hop in tokens"),
        arg("--mode", choices=["cached", "recompute", "window"], help="streaming mode"),
        arg("--window-frames", type=int, help="attention window (target mel frames) for --mode window"),
        arg("--json", action="store_true", help="print a JSON summary"),
    ],
)
def _client(args: argparse.Namespace) -> int:
    import httpx
    from websockets.exceptions import WebSocketException

    from token2wav.serve.client import StreamError, register_prompt, stream_tokens_sync, voice_prompt_id
    from token2wav.tokens_io import check_output_path, load_prompt_npz, read_tokens

    if sum(x is not None for x in (args.voice, args.prompt, args.prompt_id, args.prompt_wav)) > 1:
        raise ValueError("give one of --voice, --prompt, --prompt-wav, --prompt-id")
    if args.prompt_wav is not None and not Path(args.prompt_wav).is_file():
        raise FileNotFoundError(f"--prompt-wav: no such file: {args.prompt_wav}")
    if args.rate is not None and not 0 <= args.rate < float("inf"):
        raise ValueError(f"--rate must be a number of tokens per second >= 0, got {args.rate}")
    if args.prebuffer is not None and not 0 <= args.prebuffer <= 60:
        raise ValueError(f"--prebuffer must be in [0, 60] seconds, got {args.prebuffer}")
    check_output_path(args.out)
    tokens = read_tokens(args.tokens)
    if tokens.size == 0:
        raise ValueError(f"--tokens: {args.tokens} holds no tokens")
    prompt_id = args.prompt_id
    try:
        if args.prompt:
            p = load_prompt_npz(args.prompt)
            prompt_id = register_prompt(args.url, p.tokens, p.mel, p.embedding)
        elif args.prompt_wav:
            from token2wav.serve.client import register_prompt_wav

            prompt_id = register_prompt_wav(args.url, args.prompt_wav)
        elif args.voice:
            prompt_id = voice_prompt_id(args.url, args.voice)
        result = stream_tokens_sync(
            args.url,
            tokens,
            rate=args.rate,
            prebuffer_ms=None if args.prebuffer is None else args.prebuffer * 1e3,
            prompt_id=prompt_id,
            preset=args.preset,
            hop=args.hop,
            mode=args.mode,
            window_frames=args.window_frames,
        )
    except (StreamError, OSError, WebSocketException, httpx.HTTPError) as e:
        print(f"token2wav client: error: {e}", file=sys.stderr)
        return 1
    if args.out:
        _write_wav(args.out, result.audio, result.sample_rate)
    summary = result.summary()
    summary["tokens"] = int(tokens.size)
    summary["rate"] = args.rate if args.rate is not None else result.started.get("token_rate")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        lat, heard = summary["first_chunk_latency_s"], summary["first_play_s"]
        print(
            f"{summary['chunks']} chunks, {summary['audio_s']:.2f} s of audio; first chunk after "
            f"{lat if lat is None else f'{lat * 1e3:.1f} ms'}; RTF {summary['rtf']} (server compute), "
            f"wall/audio {summary['wall_rtf']}"
        )
        if heard is not None:
            source = "given" if args.prebuffer is not None else "the server's recommendation"
            stalls = summary["stalls"]
            print(f"a player would start {heard * 1e3:.0f} ms after the first token (start buffer "
                  f"{summary['start_buffer_ms']} ms, {source}) and hear "
                  + (f"{stalls} stall(s), {summary['stall_s'] * 1e3:.0f} ms in all, the worst "
                     f"{summary['worst_stall_s'] * 1e3:.0f} ms" if stalls else "no stall"))
    return 0
