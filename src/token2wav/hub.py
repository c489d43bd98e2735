"""Released models by name: ``ORG/NAME[@REVISION]`` (Hugging Face Hub) and ``modelscope:ORG/NAME[@REVISION]``.

Only what token2wav reads is downloaded: the config (``cosyvoice3.yaml``, ``cosyvoice2.yaml`` or our
``token2wav.yaml``), the flow and vocoder weights (``flow``/``hift`` as ``.safetensors``, ``.pt`` or ``.pth``),
the two ONNX front-end models (``speech_tokenizer_v2.onnx`` or ``_v3``, ``campplus.onnx``) and ``spk2info.pt``.
A release's LLM (``llm.pt``), its text-LLM folder (``CosyVoice-BlankEN/``), its TensorRT/ONNX exports and
anything else in the repository are never requested.

The order of work: the repository's file list (one metadata call), then the config alone, which is read as data
and must be a config token2wav understands, then the weights. A repository that is not a CosyVoice 2/3 model
therefore costs one small download, not gigabytes. Files land in the hub's own cache (Hugging Face:
``HF_HOME`` / ``HF_HUB_CACHE``, the same cache ``huggingface_hub`` and ``transformers`` use; ModelScope:
``MODELSCOPE_CACHE``), or in a folder of your choice (``token2wav download --dir``), and are loaded by the same
safe loaders as any model directory. Tokens, endpoints and offline mode are the client library's
(``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE=1``; ``MODELSCOPE_API_TOKEN``). When the hub cannot be reached,
a model already in the cache is used as it is.

The client libraries are optional: ``pip install 'token2wav[hub]'`` (huggingface_hub) or
``pip install 'token2wav[modelscope]'``. Every failure is one line (:class:`HubError`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CONFIG_NAMES, ConfigError, ModelConfig, read_config
from .version import __version__

__all__ = [
    "HubError",
    "HubFile",
    "HubId",
    "HubModel",
    "HubNotFoundError",
    "download",
    "format_size",
    "is_hub_id",
    "parse_hub_id",
    "plan",
    "resolve",
]

HUGGINGFACE = "huggingface"
MODELSCOPE = "modelscope"
_PREFIXES = {"hf": HUGGINGFACE, "huggingface": HUGGINGFACE, "modelscope": MODELSCOPE, "ms": MODELSCOPE}

# one path segment of a repository id: letters, digits, '-', '_', '.', not starting with '.' or '-'
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,95}"
_ID = re.compile(rf"^(?:(?P<prefix>[a-z]+):)?(?P<repo>{_SEGMENT}/{_SEGMENT})(?:@(?P<rev>[^\s@]+))?$")

# What token2wav reads, beside the config (mirrors checkpoints.find_weights_file and the ONNX front end).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
WEIGHT_STEMS = {"flow": ("flow",), "vocoder": ("hift", "vocoder")}
SPEAKER_MODEL = "campplus.onnx"
VOICES = "spk2info.pt"


class HubError(ValueError):
    """A model id that cannot be used: one line naming the id and what to do."""


class HubNotFoundError(HubError, FileNotFoundError):
    """No such repository or revision, or no network and nothing cached."""


@dataclass(frozen=True)
class HubId:
    """A parsed model id: which hub, which repository, which revision (None: the default branch)."""

    hub: str
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        prefix = "modelscope:" if self.hub == MODELSCOPE else ""
        return f"{prefix}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubFile:
    """One file of a repository: its path, its size in bytes (None: the hub did not say), what token2wav reads
    it as (None: never fetched) and whether it is already on disk."""

    path: str
    size: int | None
    role: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class HubModel:
    """What a model id resolves to: the files token2wav reads, the rest of the repository (never fetched), and
    where the files are (``location``; for a plan, where they would be once downloaded, or None)."""

    id: HubId
    commit: str | None
    config: str
    files: tuple[HubFile, ...]
    ignored: tuple[HubFile, ...]
    location: Path | None
    from_cache: bool = False

    @property
    def config_path(self) -> Path:
        if self.location is None:
            raise HubError(f"{self.id}: not downloaded")
        return self.location / self.config

    @property
    def fetch_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def ignored_bytes(self) -> int:
        return sum(f.size or 0 for f in self.ignored)

    @property
    def complete(self) -> bool:
        """Every file token2wav reads is already on disk."""
        return all(f.cached for f in self.files)


# ----------------------------------------------------------------------------------------------------- ids


def is_hub_id(text: object) -> bool:
    """Whether ``text`` is written like a model id (``ORG/NAME``, ``ORG/NAME@REV``, ``modelscope:ORG/NAME``).

    Says nothing about whether it exists; a local path that exists is the caller's to prefer."""
    if not isinstance(text, str):
        return False
    m = _ID.match(text)
    if m is None:
        return False
    prefix = m.group("prefix")
    if prefix is not None and prefix not in _PREFIXES:
        return False
    repo = m.group("repo")
    return ".." not in repo and "--" not in repo and not repo.endswith((".yaml", ".yml"))


def parse_hub_id(text: str, revision: str | None = None) -> HubId:
    """``"ORG/NAME"``, ``"ORG/NAME@REV"``, ``"modelscope:ORG/NAME[@REV]"`` (also ``hf:``) -> :class:`HubId`.

    ``revision`` (a branch, tag or commit) is the same as ``@REV``; giving two different ones is an error."""
    if not is_hub_id(text):
        raise HubError(
            f"model id {text!r} is not ORG/NAME, ORG/NAME@REVISION or modelscope:ORG/NAME[@REVISION]"
        )
    m = _ID.match(text)
    assert m is not None
    hub = _PREFIXES[m.group("prefix") or "hf"]
    rev = m.group("rev")
    if revision is not None:
        if not isinstance(revision, str) or not revision.strip() or any(c.isspace() for c in revision):
            raise HubError(f"revision must be a branch, tag or commit name, got {revision!r}")
        if rev is not None and rev != revision:
            raise HubError(f"{text}: two revisions given ('@{rev}' and revision={revision!r}); give one")
        rev = revision
    return HubId(hub=hub, repo_id=m.group("repo"), revision=rev)


def format_size(size: int | None) -> str:
    """``1329028480`` -> ``"1.33 GB"`` (decimal units, as the hubs show them)."""
    if size is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{size} B"


# ----------------------------------------------------------------------------------------------- public API


def resolve(model: str, revision: str | None = None) -> Path:
    """The config file of a hub model, after downloading what token2wav reads into the hub's cache (only what
    is missing), or straight from the cache when offline. Load it as any model: ``from_pretrained(path)``."""
    return download(model, revision).config_path


def download(model: str, revision: str | None = None, local_dir: str | Path | None = None) -> HubModel:
    """Fetch the files token2wav reads into the hub's cache, or into ``local_dir`` (a plain folder you can copy
    or pass as ``--model``). Files already present are not fetched again."""
    hid = parse_hub_id(model, revision)
    return _Resolver(hid, local_dir).run(fetch=True)


def plan(model: str, revision: str | None = None) -> HubModel:
    """What ``download`` would fetch and how large it is, from the hub's metadata; only the config (a few kB) is
    downloaded, to check that the repository holds a model token2wav understands."""
    hid = parse_hub_id(model, revision)
    return _Resolver(hid, None).run(fetch=False)


# ------------------------------------------------------------------------------------------ file selection


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _pick_config(names: Iterable[str]) -> str | None:
    present = set(names)
    return next((n for n in CONFIG_NAMES if n in present), None)


def _roles(names: Iterable[str], config_name: str, config: ModelConfig, hid: HubId) -> dict[str, str]:
    """``{path: role}`` of the files token2wav reads, in the order it reads them; raises when weights lack."""
    present = set(names)
    roles = {config_name: "config"}
    for role, stems in WEIGHT_STEMS.items():
        found = next((f"{s}{x}" for s in stems for x in WEIGHT_SUFFIXES if f"{s}{x}" in present), None)
        if found is None:
            looked = ", ".join(f"{s}.safetensors|.pt" for s in stems)
            raise HubError(
                f"{hid}: {config_name} is there but the {role} weights are not ({looked}); "
                "it is not a complete CosyVoice 2/3 release"
            )
        roles[found] = role
    from .frontend.onnx import SPEECH_TOKENIZER_NAMES  # the name depends on the model family

    tokenizer = SPEECH_TOKENIZER_NAMES.get(config.family)
    if tokenizer in present:
        roles[tokenizer] = "speech tokenizer (voice cloning)"
    if SPEAKER_MODEL in present:
        roles[SPEAKER_MODEL] = "speaker model (voice cloning)"
    if VOICES in present:
        roles[VOICES] = "saved voices"
    declared = config.extra.get("files") or {}  # token2wav.yaml names the assets it reads
    if isinstance(declared, Mapping):
        for key, value in declared.items():
            name = str(value)
            if name in present and name not in roles and _safe_relative(name):
                roles[name] = str(key)
    return roles


def _safe_relative(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not name.startswith(("/", "~")) and ".." not in parts and "" not in parts


def _read_config(path: Path, hid: HubId) -> ModelConfig:
    try:
        return read_config(path)
    except ConfigError as exc:
        why = str(exc)
        prefix = f"{path}: "
        why = why[len(prefix):] if why.startswith(prefix) else why
        raise HubError(
            f"{hid}: {path.name} is not a CosyVoice 2/3 config token2wav understands ({_first_line(ValueError(why))})"
        ) from None


# ------------------------------------------------------------------------------------------------ resolver


class _Resolver:
    def __init__(self, hid: HubId, local_dir: str | Path | None) -> None:
        self.hid = hid
        try:
            self.hub: _Backend = _HuggingFace() if hid.hub == HUGGINGFACE else _ModelScope()
        except ImportError as exc:  # the optional client library: one line on what to install
            raise HubError(f"{hid}: {exc} (or, if you meant a local directory: it does not exist)") from None
        self.local_dir = None if local_dir is None else Path(local_dir).expanduser()

    def run(self, *, fetch: bool) -> HubModel:
        hid, hub = self.hid, self.hub
        reason = hub.offline_reason()
        listing: list[HubFile] | None = None
        commit = None
        if reason is None:
            try:
                commit, listing = hub.list_files(hid)
            except Exception as exc:  # noqa: BLE001 - every failure becomes one line below
                reason = hub.unreachable(exc)
                if reason is None:
                    raise hub.error(exc, hid) from None
        if listing is None:
            return self._from_disk(reason or "offline", explicit=hub.offline_reason() is not None)
        files = {f.path: f for f in listing}
        config_name = _pick_config(files)
        if config_name is None:
            top = sorted(files)
            shown = ", ".join(top[:8]) + (f", ... ({len(top) - 8} more)" if len(top) > 8 else "")
            raise HubError(
                f"{hid} is not a CosyVoice 2/3 model: it holds no {', '.join(CONFIG_NAMES)} "
                f"(it holds {shown or 'no files'})"
            )
        where = hub.fetch(hid, commit, [config_name], self.local_dir)
        config = _read_config(where / config_name, hid)
        roles = _roles(files, config_name, config, hid)
        if fetch:
            where = hub.fetch(hid, commit, [n for n in roles if n != config_name], self.local_dir)
            if self.local_dir is None:  # complete: from now on the revision finds this commit offline
                hub.record(hid, commit, where / config_name)
        chosen = tuple(
            HubFile(n, files[n].size, role, cached=(where / n).is_file()) for n, role in roles.items()
        )
        ignored = tuple(HubFile(f.path, f.size) for f in listing if f.path not in roles)
        return HubModel(hid, commit, config_name, chosen, ignored, where)

    def _from_disk(self, reason: str, *, explicit: bool) -> HubModel:
        """Offline (or the hub unreachable): the cached copy, or one line on how to get one."""
        hid, hub = self.hid, self.hub
        where = hub.cached_dir(hid, self.local_dir)
        if where is None:
            raise HubNotFoundError(self._offline_message(reason, explicit))
        names = {p.name for p in where.iterdir() if p.is_file()}
        config_name = _pick_config(names)
        if config_name is None:
            raise HubNotFoundError(self._offline_message(reason, explicit))
        config = _read_config(where / config_name, hid)
        try:
            roles = _roles(names, config_name, config, hid)
        except HubError as exc:
            raise HubNotFoundError(f"{exc} (in the cached copy {where}; {reason})") from None
        for name in roles:  # declared assets may live in sub-folders
            if not (where / name).is_file():
                raise HubNotFoundError(f"{hid}: the cached copy in {where} lacks {name} ({reason})")
        if not explicit:
            warnings.warn(f"{hub.name} unreachable ({reason}); using the cached copy of {hid} in {where}",
                          stacklevel=3)
        chosen = tuple(
            HubFile(n, (where / n).stat().st_size, role, cached=True) for n, role in roles.items()
        )
        return HubModel(hid, None, config_name, chosen, (), where, from_cache=True)

    def _offline_message(self, reason: str, explicit: bool) -> str:
        hid, hub = self.hid, self.hub
        where = self.local_dir if self.local_dir is not None else hub.cache_dir()
        head = (f"{hid}: {reason} and the model is not in {where}" if explicit else
                f"{hid}: cannot reach the {hub.name} ({reason}) and the model is not in {where}")
        return (
            f"{head}; download it once with network access (`token2wav download {hid}`){hub.offline_hint}, "
            "or put its files (config, flow and hift weights) in a directory and pass that directory as the model"
        )


# ------------------------------------------------------------------------------------------------ backends


class _Backend:
    name = "hub"
    offline_hint = ""

    def offline_reason(self) -> str | None:
        return None

    def cache_dir(self) -> str:
        raise NotImplementedError

    def list_files(self, hid: HubId) -> tuple[str | None, list[HubFile]]:
        raise NotImplementedError

    def fetch(self, hid: HubId, commit: str | None, names: list[str], local_dir: Path | None) -> Path:
        raise NotImplementedError

    def cached_dir(self, hid: HubId, local_dir: Path | None) -> Path | None:
        raise NotImplementedError

    def record(self, hid: HubId, commit: str | None, fetched: Path) -> None:
        """Note in the cache which commit ``hid.revision`` was, once all its files are there (or nothing)."""

    def unreachable(self, exc: BaseException) -> str | None:
        """A short reason when ``exc`` means the hub could not be reached (then the cache is tried)."""
        if _is_connection_problem(exc):
            return _first_line(exc)
        status = _status(exc)
        if status is not None and (status >= 500 or status == 429):
            return f"HTTP {status}"
        return None

    def error(self, exc: BaseException, hid: HubId, file: str | None = None) -> HubError:
        raise NotImplementedError


def _is_connection_problem(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    # requests, urllib3, httpx: none of their transport errors derive from the built-in ConnectionError
    return bool(names & {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "Timeout",
                         "ConnectionError", "NetworkError", "TransportError", "ProxyError", "NewConnectionError",
                         "MaxRetryError", "RemoteProtocolError", "ProtocolError"})


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _write_ref(snapshot_file: Path, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in a Hugging Face cache (``refs/<revision>``, its documented layout), so
    that the revision is found offline; files were fetched by commit to keep them all from one commit."""
    storage = snapshot_file.parent.parent.parent  # <cache>/models--org--name/snapshots/<commit>/<file>
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    except OSError as exc:  # a read-only shared cache: loading works, only the offline lookup by name does not
        warnings.warn(f"could not record {revision} -> {commit} in {ref}: {exc}", stacklevel=4)


class _HuggingFace(_Backend):
    name = "Hugging Face Hub"
    offline_hint = " (then HF_HUB_OFFLINE=1 reads it from the cache; copy HF_HOME to move it)"

    def __init__(self) -> None:
        try:
            import huggingface_hub
        except ImportError:
            raise ImportError(
                "models by id (ORG/NAME) come from the Hugging Face Hub through huggingface_hub, which is not "
                "installed: pip install 'token2wav[hub]'"
            ) from None
        self.hf = huggingface_hub
        from huggingface_hub import constants

        self.constants = constants

    def offline_reason(self) -> str | None:
        return "HF_HUB_OFFLINE=1" if getattr(self.constants, "HF_HUB_OFFLINE", False) else None

    def cache_dir(self) -> str:
        return str(getattr(self.constants, "HF_HUB_CACHE", "the Hugging Face cache"))

    def _endpoint(self) -> str:
        return str(getattr(self.constants, "ENDPOINT", "https://huggingface.co"))

    def list_files(self, hid: HubId) -> tuple[str | None, list[HubFile]]:
        api = self.hf.HfApi(library_name="token2wav", library_version=__version__)
        info = api.model_info(hid.repo_id, revision=hid.revision, files_metadata=True)
        files = [HubFile(s.rfilename, s.size) for s in (info.siblings or [])]
        return info.sha, files

    def fetch(self, hid: HubId, commit: str | None, names: list[str], local_dir: Path | None) -> Path:
        revision = commit or hid.revision
        last = None
        for name in names:
            try:
                path = self.hf.hf_hub_download(
                    hid.repo_id, name, revision=revision, local_dir=None if local_dir is None else str(local_dir),
                    library_name="token2wav", library_version=__version__,
                )
            except Exception as exc:  # noqa: BLE001
                raise self.error(exc, hid, file=name) from None
            last = Path(path)
        return self.location(hid, commit, local_dir) if last is None else last.parent

    def record(self, hid: HubId, commit: str | None, fetched: Path) -> None:
        # Files are fetched by commit, so that they all come from one; the client then writes no ref for the
        # branch or tag. Writing it only now, after the last file, keeps an older complete copy in use offline
        # rather than a newer one whose download was cut or that `info` only looked at.
        if commit is not None and (hid.revision or "main") != commit:
            _write_ref(fetched, hid.revision or "main", commit)

    def location(self, hid: HubId, commit: str | None, local_dir: Path | None) -> Path:
        if local_dir is not None:
            return local_dir
        folder = "models--" + hid.repo_id.replace("/", "--")
        return Path(self.cache_dir()) / folder / "snapshots" / (commit or "unknown")

    def cached_dir(self, hid: HubId, local_dir: Path | None) -> Path | None:
        if local_dir is not None:
            return local_dir if local_dir.is_dir() and _pick_config(p.name for p in local_dir.iterdir()) else None
        for name in CONFIG_NAMES:
            try:
                found = self.hf.try_to_load_from_cache(hid.repo_id, name, revision=hid.revision or "main")
            except Exception:  # noqa: BLE001 - a damaged cache reads as "not cached"
                return None
            if isinstance(found, str):
                return Path(found).parent
        return None

    def error(self, exc: BaseException, hid: HubId, file: str | None = None) -> HubError:
        from huggingface_hub import utils as hf_utils

        token_hint = "give a token: HF_TOKEN=... or `hf auth login` (older clients: `huggingface-cli login`)"
        has_token = self._has_token()
        if isinstance(exc, hf_utils.GatedRepoError):
            page = f"{self._endpoint()}/{hid.repo_id}"
            if has_token:
                return HubError(f"{hid} is a gated repository and your token has no access to it: request access on "
                                f"{page}, then retry")
            return HubError(f"{hid} is a gated repository: request access on {page}, then {token_hint}")
        if isinstance(exc, hf_utils.RevisionNotFoundError):
            return HubNotFoundError(f"{hid}: the {self.name} has no revision {hid.revision or 'main'!r} of "
                                    f"{hid.repo_id} (a branch, tag or commit)")
        if isinstance(exc, hf_utils.RepositoryNotFoundError):
            private = ("if it is private, your token has no access to it" if has_token
                       else f"if it is private, {token_hint}")
            return HubNotFoundError(f"{hid}: no such model on the {self.name} ({self._endpoint()}) and no such "
                                    f"local directory; check the id ({private})")
        if isinstance(exc, hf_utils.EntryNotFoundError) and file is not None:
            return HubNotFoundError(f"{hid}: {file} is listed but cannot be downloaded ({_first_line(exc)})")
        status = _status(exc)
        if status in (401, 403):
            return HubError(f"{hid}: the {self.name} refused access (HTTP {status}); {token_hint}")
        what = f"downloading {file} of {hid}" if file is not None else f"looking up {hid}"
        if file is not None and (_is_connection_problem(exc) or isinstance(exc, OSError)):
            return HubError(f"{what} failed ({_first_line(exc)}); run it again: complete files are kept")
        if _is_connection_problem(exc):
            return HubNotFoundError(f"{what}: cannot reach the {self.name} ({_first_line(exc)})")
        return HubError(f"{what} failed: {type(exc).__name__}: {_first_line(exc)}")

    def _has_token(self) -> bool:
        try:
            return self.hf.get_token() is not None
        except Exception:  # noqa: BLE001
            return False


class _ModelScope(_Backend):
    name = "ModelScope hub"
    offline_hint = " (then it is read from the cache, MODELSCOPE_CACHE, whenever the hub is unreachable)"

    def __init__(self) -> None:
        try:
            import modelscope  # noqa: F401
            from modelscope import snapshot_download
            from modelscope.hub.api import HubApi
        except ImportError:
            raise ImportError(
                "modelscope: ids come from ModelScope through the modelscope package, which is not installed: "
                "pip install 'token2wav[modelscope]'"
            ) from None
        self.snapshot_download = snapshot_download
        self.api = HubApi

    def cache_dir(self) -> str:
        return os.environ.get("MODELSCOPE_CACHE") or str(Path("~/.cache/modelscope").expanduser())

    def list_files(self, hid: HubId) -> tuple[str | None, list[HubFile]]:
        entries = self.api().get_model_files(hid.repo_id, revision=hid.revision, recursive=True)
        files = []
        for entry in entries or []:
            if not isinstance(entry, Mapping) or entry.get("Type") == "tree":
                continue
            path = entry.get("Path") or entry.get("Name")
            if path:
                size = entry.get("Size")
                files.append(HubFile(str(path), int(size) if isinstance(size, int) else None))
        return None, files

    def _download(self, hid: HubId, names: list[str], local_dir: Path | None, **extra: Any) -> Path:
        kwargs: dict[str, Any] = {"revision": hid.revision, "allow_file_pattern": list(names), **extra}
        if local_dir is not None:
            kwargs["local_dir"] = str(local_dir)
        return Path(self.snapshot_download(hid.repo_id, **kwargs))

    def fetch(self, hid: HubId, commit: str | None, names: list[str], local_dir: Path | None) -> Path:
        try:
            return self._download(hid, names, local_dir)
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, hid, file=", ".join(names)) from None

    def cached_dir(self, hid: HubId, local_dir: Path | None) -> Path | None:
        if local_dir is not None:
            return local_dir if local_dir.is_dir() and _pick_config(p.name for p in local_dir.iterdir()) else None
        try:
            found = self._download(hid, list(CONFIG_NAMES), None, local_files_only=True)
        except Exception:  # noqa: BLE001 - nothing (usable) cached
            return None
        return found if found.is_dir() and _pick_config(p.name for p in found.iterdir()) else None

    def error(self, exc: BaseException, hid: HubId, file: str | None = None) -> HubError:
        names = {c.__name__ for c in type(exc).__mro__}
        status = _status(exc)
        token_hint = "give a token: MODELSCOPE_API_TOKEN=... (or log in with the modelscope command line)"
        if names & {"NotLoginException", "AuthenticationError", "PermissionDeniedError"} or status in (401, 403):
            return HubError(f"{hid}: ModelScope refused access (gated or private); {token_hint}")
        if names & {"NotExistError", "NoValidRevisionError", "FileNotFoundError"} or status == 404:
            return HubNotFoundError(f"{hid}: no such model or revision on ModelScope, and no such local directory; "
                                    f"check the id (if it is private, {token_hint})")
        what = f"downloading {file} of {hid}" if file is not None else f"looking up {hid}"
        if _is_connection_problem(exc):
            return HubNotFoundError(f"{what}: cannot reach the {self.name} ({_first_line(exc)})")
        return HubError(f"{what} failed: {type(exc).__name__}: {_first_line(exc)}")
