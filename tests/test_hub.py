"""Released models by id (token2wav.hub), without the network.

A small Hugging Face Hub runs on 127.0.0.1 in a thread of the test: the endpoints huggingface_hub calls (model
info with file sizes, ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with ranges, and the ``X-Error-Code``
answers it maps to its exceptions). Its repositories are laid out like the real releases: ``cosyvoice3.yaml``,
``flow.pt``, ``hift.pt``, the ONNX front end and ``spk2info.pt`` beside a large ``llm.pt``, a
``CosyVoice-BlankEN/`` text-LLM folder and ONNX/TensorRT exports that are served lazily and must never be asked
for. The weights are the bundled tiny model's (a CosyVoice 3 architecture), so a download loads and speaks.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported; in this process the
fixture sets the matching ``huggingface_hub.constants`` (as its own tests do), and one test runs the command line
in a fresh process with the environment variables alone. ModelScope is exercised through a stand-in module with
the signatures token2wav calls (a real ModelScope server is not emulated).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import token2wav
from token2wav import Token2Wav, cli, hub
from token2wav.loading import resolve_model_dir

pytest.importorskip("huggingface_hub")

TINY = Path(token2wav.__file__).resolve().parent / "assets" / "tiny"
FRONTEND = Path(__file__).resolve().parent / "data" / "frontend"
TOKEN = "hf_test_token_granted"
MB = 1_000_000
# What a CosyVoice 3 release holds besides what token2wav reads: never to be requested.
NEVER = ("llm.pt", "CosyVoice-BlankEN/", "flow.decoder.estimator.fp32.onnx", "README.md", "configuration.json",
         ".gitattributes", "speech_tokenizer_v2.onnx")


# ------------------------------------------------------------------------------------------- the fake hub


@dataclass(frozen=True)
class Lazy:
    """A large file of zeros that is listed with its size but whose bytes are made only if someone asks."""

    size: int


@dataclass
class Repo:
    refs: dict[str, str]  # branch or tag -> commit
    commits: dict[str, dict[str, bytes | Lazy]]  # commit -> {path: content}
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    auth: str | None


def _commit(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def _etag(content: bytes | Lazy) -> str:
    data = content if isinstance(content, bytes) else f"zeros-{content.size}".encode()
    return hashlib.sha256(data).hexdigest()


def _size(content: bytes | Lazy) -> int:
    return len(content) if isinstance(content, bytes) else content.size


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=dict)  # file -> bytes sent by its first GET before hanging up
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, revisions: dict[str, dict[str, bytes | Lazy]], *, gated: bool = False) -> None:
        refs, commits = {}, {}
        for rev, files in revisions.items():
            commit = _commit(repo_id, rev)
            refs[rev] = commit
            commits[commit] = files
        self.repos[repo_id] = Repo(refs, commits, gated)

    def start(self) -> FakeHub:
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub_._handle(self, "HEAD")

            def do_GET(self) -> None:  # noqa: N802
                hub_._handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def requested(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.log if method is None or r.method == method]

    def file_requests(self, name: str) -> list[Request]:
        return [r for r in self.log if "/resolve/" in r.path and r.path.endswith("/" + name)]

    # --- request handling

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.log.append(Request(method, path, h.headers.get("Range"), h.headers.get("Authorization")))
        if path.startswith("/api/models/"):
            return self._model_info(h, path[len("/api/models/"):], parse_qs(url.query))
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        return self._error(h, 404, None)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, commit: str | None = None) -> None:
        body = json.dumps({"error": code or "not found"}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _lookup(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound")  # what the Hub answers for a missing (or private) repository
            return None
        rev = rev or "main"
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            self._error(h, 404, "RevisionNotFound")
            return None
        return repo, commit

    def _model_info(self, h: BaseHTTPRequestHandler, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        repo_id, rev = "/".join(parts[:2]), None
        if len(parts) >= 4 and parts[2] == "revision":
            rev = "/".join(parts[3:])
        elif len(parts) != 2:
            return self._error(h, 404, None)
        found = self._lookup(h, repo_id, rev)
        if found is None:
            return None
        repo, commit = found
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, content in repo.commits[commit].items():
            entry: dict[str, object] = {"rfilename": name}
            if blobs:
                entry.update(size=_size(content), blobId=_etag(content)[:40])
                if _size(content) > 100_000:
                    entry["lfs"] = {"size": _size(content), "sha256": _etag(content), "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "disabled": False,
                           "gated": "manual" if repo.gated else False, "downloads": 0, "likes": 0, "tags": [],
                           "lastModified": "2025-12-16T00:00:00.000Z", "siblings": siblings}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        return None

    def _resolve(self, h: BaseHTTPRequestHandler, method: str, repo_id: str, rev: str, name: str) -> None:
        found = self._lookup(h, repo_id, rev)
        if found is None:
            return None
        repo, commit = found
        if repo.gated and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(h, 401, "GatedRepo")
        content = repo.commits[commit].get(name)
        if content is None:
            return self._error(h, 404, "EntryNotFound", commit)
        size = _size(content)
        start = 0
        ranged = h.headers.get("Range")
        if method == "GET" and ranged and ranged.startswith("bytes="):
            start = int(ranged[len("bytes="):].split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{_etag(content)}"')
        if size > 100_000:
            h.send_header("X-Linked-Etag", f'"{_etag(content)}"')
            h.send_header("X-Linked-Size", str(size))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(size - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        if method == "HEAD":
            return None
        data = content if isinstance(content, bytes) else bytes(size)
        body = data[start:]
        if name in self.cut and not start:
            keep = self.cut.pop(name)  # first full GET: send part of the body, then hang up
            h.wfile.write(body[:keep])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        h.wfile.write(body)
        return None


# ------------------------------------------------------------------------------------------- repositories


def _pt(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _safetensors(state: dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / "w.safetensors"
    save_file(state, str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, bytes | Lazy]]]:
    """Repository contents: {repo: {revision: {path: content}}}."""
    tmp = tmp_path_factory.mktemp("weights")
    flow = load_file(str(TINY / "flow.safetensors"))
    hift = load_file(str(TINY / "hift.safetensors"))
    config = (TINY / "cosyvoice3.yaml").read_bytes()
    voices = _pt({"alice": {"embedding": torch.full((1, 192), 0.1)}})
    release = {  # laid out like Fun-CosyVoice3-0.5B-2512
        ".gitattributes": b"*.pt filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# a CosyVoice 3 release (test)\n",
        "configuration.json": b'{"framework": "pytorch"}\n',
        "cosyvoice3.yaml": config,
        "flow.pt": _pt(flow),
        "hift.pt": _pt(hift),
        "campplus.onnx": (FRONTEND / "campplus.onnx").read_bytes(),
        "speech_tokenizer_v3.onnx": (FRONTEND / "speech_tokenizer_v3.onnx").read_bytes(),
        "speech_tokenizer_v2.onnx": Lazy(3 * MB),  # the other family's tokenizer: not read by a CosyVoice 3
        "spk2info.pt": voices,
        "llm.pt": Lazy(50 * MB),
        "flow.decoder.estimator.fp32.onnx": Lazy(20 * MB),
        "CosyVoice-BlankEN/config.json": b'{"architectures": ["Qwen2ForCausalLM"]}\n',
        "CosyVoice-BlankEN/model.safetensors": Lazy(30 * MB),
    }
    older = dict(flow)  # revision v1: other flow weights, in safetensors
    older["input_embedding.weight"] = flow["input_embedding.weight"] * 0.5
    v1 = {
        "cosyvoice3.yaml": config,
        "flow.safetensors": _safetensors(older, tmp),
        "hift.safetensors": (TINY / "hift.safetensors").read_bytes(),
        "llm.pt": Lazy(50 * MB),
    }
    return {
        "org/cv3": {"main": release, "v1": v1},
        "org/gated": {"main": release},
        "org/textllm": {"main": {"config.json": b"{}", "model.safetensors": Lazy(40 * MB), "README.md": b"x"}},
        "org/badyaml": {"main": {"cosyvoice2.yaml": b"llm: !new:foo.Bar\n  a: 1\n", "flow.pt": Lazy(10 * MB),
                                 "hift.pt": Lazy(10 * MB)}},
    }


def _set_hf(monkeypatch: pytest.MonkeyPatch, name: str, value: object) -> None:
    """Set a huggingface_hub constant where it is read: on ``constants`` and on every module that imported it by
    name (older releases do, e.g. ``from .constants import ENDPOINT``)."""
    for module in ("file_download", "hf_api", "_snapshot_download", "utils._http", "utils._headers"):
        try:
            __import__(f"huggingface_hub.{module}")  # imported now, so that the copies they take are the originals
        except ImportError:
            pass
    for mod_name, module in list(sys.modules.items()):
        if (mod_name == "huggingface_hub.constants" or mod_name.startswith("huggingface_hub.")) and hasattr(
                module, name):
            monkeypatch.setattr(module, name, value)


@pytest.fixture
def fake_hub(releases, tmp_path, monkeypatch):
    server = FakeHub()
    for repo_id, revisions in releases.items():
        server.add(repo_id, revisions, gated=repo_id == "org/gated")
    server.start()
    home = tmp_path / "hf-home"
    cache = home / "hub"
    settings = {
        "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"), "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True,
        "ENDPOINT": server.url, "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
    }
    for name, value in settings.items():
        _set_hf(monkeypatch, name, value)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    server.cache = cache  # type: ignore[attr-defined]
    yield server
    server.stop()


READ = {"cosyvoice3.yaml", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx", "spk2info.pt"}


def _never_asked(server: FakeHub) -> None:
    for path in server.requested():
        assert not any(f"/{n}" in path for n in NEVER), f"requested {path}"


def _write_local(files: dict[str, bytes | Lazy], where: Path) -> Path:
    where.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, bytes) and "/" not in name:
            (where / name).write_bytes(content)
    return where


def _tokens(n: int = 60) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 512, n)


# ------------------------------------------------------------------------------------------------ ids


def test_parse_ids() -> None:
    assert hub.parse_hub_id("FunAudioLLM/Fun-CosyVoice3-0.5B-2512") == hub.HubId(
        "huggingface", "FunAudioLLM/Fun-CosyVoice3-0.5B-2512", None)
    assert hub.parse_hub_id("org/name@v1.0") == hub.HubId("huggingface", "org/name", "v1.0")
    assert hub.parse_hub_id("org/name", revision="abc") == hub.HubId("huggingface", "org/name", "abc")
    assert hub.parse_hub_id("modelscope:iic/CosyVoice2-0.5B@master") == hub.HubId(
        "modelscope", "iic/CosyVoice2-0.5B", "master")
    assert str(hub.parse_hub_id("modelscope:iic/CosyVoice2-0.5B@master")) == "modelscope:iic/CosyVoice2-0.5B@master"
    for not_id in ("demo", "./org/name", "/abs/org/name", "a/b/c", "org/name.yaml", "org/../x", "x:org/name",
                   "org/na me", "~/models", "org/"):
        assert not hub.is_hub_id(not_id), not_id
    with pytest.raises(hub.HubError, match="two revisions"):
        hub.parse_hub_id("org/name@v1", revision="v2")


def test_local_directory_wins_over_an_id(fake_hub, tmp_path, monkeypatch, releases) -> None:
    monkeypatch.chdir(tmp_path)
    _write_local(releases["org/cv3"]["main"], tmp_path / "org" / "cv3")
    assert resolve_model_dir("org/cv3") == Path("org/cv3")
    assert resolve_model_dir("tiny") == TINY
    assert fake_hub.log == []  # the hub was never asked
    with pytest.raises(ValueError, match="applies to model ids"):
        resolve_model_dir("org/cv3", revision="v1")
    with pytest.raises(FileNotFoundError, match="neither a directory nor a bundled model"):
        resolve_model_dir("./no/such/dir")


# --------------------------------------------------------------------------------------- downloading


def test_from_pretrained_by_id_fetches_only_what_it_reads(fake_hub, tmp_path, releases) -> None:
    t2w = Token2Wav.from_pretrained("org/cv3")
    local = Token2Wav.from_pretrained(_write_local(releases["org/cv3"]["main"], tmp_path / "local"))
    tokens = _tokens()
    assert np.array_equal(t2w.synthesize(tokens), local.synthesize(tokens))
    assert "alice" in t2w.speakers  # spk2info.pt came along
    fetched = {r.path.rsplit("/", 1)[1] for r in fake_hub.log if r.method == "GET" and "/resolve/" in r.path}
    assert fetched == READ
    _never_asked(fake_hub)
    # the hub's own cache layout: blobs, a snapshot per commit, and refs/main
    storage = fake_hub.cache / "models--org--cv3"
    commit = (storage / "refs" / "main").read_text()
    assert commit == _commit("org/cv3", "main")
    assert {p.name for p in (storage / "snapshots" / commit).iterdir()} == READ
    # a second load asks only for the file list: nothing is downloaded again
    before = len(fake_hub.log)
    Token2Wav.from_pretrained("org/cv3")
    asked = [r.path for r in fake_hub.log[before:] if r.path.startswith("/api/models/") or "/resolve/" in r.path]
    assert asked == ["/api/models/org/cv3"]


def test_pinned_revision(fake_hub, releases) -> None:
    v1_flow = load_file(str(TINY / "flow.safetensors"))["input_embedding.weight"] * 0.5
    main = Token2Wav.from_pretrained("org/cv3")
    for model, kwargs in (("org/cv3@v1", {}), ("org/cv3", {"revision": "v1"}),
                          (f"org/cv3@{_commit('org/cv3', 'v1')}", {})):
        t2w = Token2Wav.from_pretrained(model, **kwargs)
        assert torch.equal(t2w.flow.input_embedding.weight, v1_flow), model
        assert not torch.equal(main.flow.input_embedding.weight, v1_flow)
    assert fake_hub.file_requests("flow.safetensors") and fake_hub.file_requests("flow.pt")
    storage = fake_hub.cache / "models--org--cv3"
    assert (storage / "refs" / "v1").read_text() == _commit("org/cv3", "v1")
    _never_asked(fake_hub)
    with pytest.raises(hub.HubNotFoundError, match="no revision 'v9'") as err:
        Token2Wav.from_pretrained("org/cv3@v9")
    assert "\n" not in str(err.value)


def test_interrupted_download_resumes(fake_hub, releases, monkeypatch) -> None:
    content = releases["org/cv3"]["main"]["flow.pt"]
    assert isinstance(content, bytes)
    # huggingface_hub writes what it received in chunks of 10 MB; these weights are smaller than one, so use
    # chunks of 64 kB for the cut below to fall after some were written (as it does in a real 1 GB flow.pt)
    _set_hf(monkeypatch, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    fake_hub.cut["flow.pt"] = len(content) // 2  # the first GET hangs up halfway
    try:
        path = hub.resolve("org/cv3")  # huggingface_hub >= 1 retries at once, from where it stopped
    except hub.HubError as exc:  # older clients give up at the cut, keep the partial file and resume on a rerun
        assert "run it again" in str(exc) and "\n" not in str(exc)
        path = hub.resolve("org/cv3")
    gets = [r for r in fake_hub.file_requests("flow.pt") if r.method == "GET"]
    assert gets[0].range is None
    # the retry asks for the rest only: from the last whole chunk written before the cut
    starts = [int(r.range[len("bytes="):-1]) for r in gets[1:] if r.range and r.range.endswith("-")]
    assert starts and 0 < starts[0] <= len(content) // 2, [r.range for r in gets]
    assert (path.parent / "flow.pt").read_bytes() == content
    assert Token2Wav.from_pretrained("org/cv3").vocoder is not None


def test_offline_mode_reads_the_cache(fake_hub, monkeypatch) -> None:
    online = Token2Wav.from_pretrained("org/cv3")
    Token2Wav.from_pretrained("org/cv3@v1")
    fake_hub.stop()
    _set_hf(monkeypatch, "HF_HUB_OFFLINE", True)
    before = len(fake_hub.log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit offline mode: no note, the cache is simply used
        offline = Token2Wav.from_pretrained("org/cv3")
        older = Token2Wav.from_pretrained("org/cv3@v1")
    assert len(fake_hub.log) == before
    tokens = _tokens(40)
    assert np.array_equal(online.synthesize(tokens), offline.synthesize(tokens))
    assert not torch.equal(older.flow.input_embedding.weight, offline.flow.input_embedding.weight)
    # the network down without offline mode: the cached copy too, with a one-line note
    _set_hf(monkeypatch, "HF_HUB_OFFLINE", False)
    with pytest.warns(UserWarning, match="unreachable.*cached copy of org/cv3"):
        again = Token2Wav.from_pretrained("org/cv3")
    assert np.array_equal(again.synthesize(tokens), offline.synthesize(tokens))


def test_no_network_and_nothing_cached(fake_hub, monkeypatch) -> None:
    fake_hub.stop()
    with pytest.raises(hub.HubNotFoundError) as err:
        Token2Wav.from_pretrained("org/cv3")
    message = str(err.value)
    assert "\n" not in message and "cannot reach the Hugging Face Hub" in message
    assert "token2wav download org/cv3" in message and "HF_HUB_OFFLINE=1" in message and "directory" in message
    _set_hf(monkeypatch, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE=1 and the model is not in .*hub") as err:
        Token2Wav.from_pretrained("org/cv3@v1")
    assert "\n" not in str(err.value)


def test_unknown_repository(fake_hub) -> None:
    with pytest.raises(hub.HubNotFoundError, match="org/nope: no such model on the Hugging Face Hub") as err:
        Token2Wav.from_pretrained("org/nope")
    assert "\n" not in str(err.value) and "no such local directory" in str(err.value)


def test_gated_repository_needs_a_token(fake_hub, monkeypatch) -> None:
    with pytest.raises(hub.HubError, match="gated") as err:
        Token2Wav.from_pretrained("org/gated")
    message = str(err.value)
    assert "\n" not in message and "HF_TOKEN" in message and "hf auth login" in message
    assert f"{fake_hub.url}/org/gated" in message
    assert not fake_hub.file_requests("flow.pt")  # refused at the config, before any weights
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert Token2Wav.from_pretrained("org/gated").vocoder is not None
    assert all(r.auth == f"Bearer {TOKEN}" for r in fake_hub.file_requests("flow.pt"))


def test_not_a_cosyvoice_repository(fake_hub) -> None:
    with pytest.raises(hub.HubError, match="org/textllm is not a CosyVoice 2/3 model: it holds no") as err:
        Token2Wav.from_pretrained("org/textllm")
    assert "\n" not in str(err.value)
    with pytest.raises(hub.HubError, match="cosyvoice2.yaml is not a CosyVoice 2/3 config token2wav understands"):
        Token2Wav.from_pretrained("org/badyaml")
    fetched = [r.path for r in fake_hub.log if "/resolve/" in r.path]
    assert fetched and all(p.endswith("/cosyvoice2.yaml") for p in fetched)  # the config only, never weights


def test_replicas_share_one_cache(fake_hub) -> None:
    """Several loaders at once (Ray replicas on one shared cache): one download of each file, one snapshot."""
    paths: list[Path] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            paths.append(hub.resolve("org/cv3"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    for name in READ:
        assert len([r for r in fake_hub.file_requests(name) if r.method == "GET"]) == 1, name


# ------------------------------------------------------------------------------------------- command line


def test_cli_download_to_a_directory(fake_hub, tmp_path, capsys, releases) -> None:
    target = tmp_path / "cv3"
    assert cli.main(["download", "org/cv3", "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"use it: --model {target}" in out and "not fetched: 8 files" in out
    files = {str(p.relative_to(target)) for p in target.rglob("*")  # less the client's bookkeeping folder
             if p.is_file() and not p.relative_to(target).parts[0].startswith(".")}
    assert files == READ
    for name in READ:
        assert (target / name).read_bytes() == releases["org/cv3"]["main"][name]
    _never_asked(fake_hub)
    assert cli.main(["download", "org/cv3", "--revision", "v1", "--dir", str(tmp_path / "v1"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["commit"] == _commit("org/cv3", "v1") and summary["revision"] == "v1"
    assert {f["path"] for f in summary["files"]} == {"cosyvoice3.yaml", "flow.safetensors", "hift.safetensors"}
    assert [f["path"] for f in summary["ignored"]] == ["llm.pt"] and summary["ignored_bytes"] == 50 * MB


def test_cli_info_says_what_it_would_fetch(fake_hub, capsys, releases) -> None:
    assert cli.main(["info", "org/cv3"]) == 0
    out = capsys.readouterr().out
    main = releases["org/cv3"]["main"]
    for name in READ:
        assert name in out
    assert hub.format_size(len(main["flow.pt"])) in out
    assert "never     8 files, 103.0 MB" in out and "llm.pt (50.0 MB)" in out
    assert "CosyVoice-BlankEN/ (2 files, 30.0 MB)" in out
    assert "to fetch" in out
    downloaded = [r.path for r in fake_hub.log if r.method == "GET" and "/resolve/" in r.path]
    assert all(p.endswith("/cosyvoice3.yaml") for p in downloaded)  # the config only: no weights
    assert not (fake_hub.cache / "models--org--cv3" / "refs" / "main").exists()  # not a usable copy offline
    assert cli.main(["info", "org/cv3@v1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    sizes = {f["path"]: f["size"] for f in plan["files"]}
    assert sizes == {n: len(c) for n, c in releases["org/cv3"]["v1"].items() if isinstance(c, bytes)}
    assert plan["fetch_bytes"] == sum(sizes.values())


def test_cli_synth_with_an_id(fake_hub, tmp_path, capsys) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(_tokens(30).tolist()))
    out = tmp_path / "out.wav"
    assert cli.main(["synth", "--model", "org/cv3@v1", "--tokens", str(tokens), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert fake_hub.file_requests("flow.safetensors") and not fake_hub.file_requests("flow.pt")
    # resolved once for the config check and the load together
    assert fake_hub.requested().count("/api/models/org/cv3/revision/v1") == 1


def test_cli_serve_with_an_id(fake_hub, monkeypatch, capsys) -> None:
    """``serve --model ID`` loads the id; with ``--ray`` the driver downloads it before any replica starts."""
    import token2wav.serve.ray as ray_serve
    import token2wav.serve.runner as runner

    served = {}

    def fake_run_server(app, **kwargs):
        served["app"] = app
        return 0

    monkeypatch.setattr(runner, "run_server", fake_run_server)
    assert cli.main(["serve", "--model", "org/cv3@v1", "--no-batching", "--port", "50999"]) == 0
    assert "app" in served and "serving org/cv3@v1" in capsys.readouterr().err
    assert fake_hub.file_requests("flow.safetensors")

    seen = {}

    def fake_serve_on_ray(args):
        seen["model"] = args.model
        seen["cached"] = (fake_hub.cache / "models--org--cv3" / "refs" / "main").is_file()
        seen["gets"] = len([r for r in fake_hub.file_requests("flow.pt") if r.method == "GET"])
        return 0

    monkeypatch.setattr(ray_serve, "serve_on_ray", fake_serve_on_ray)
    assert cli.main(["serve", "--ray", "--model", "org/cv3"]) == 0
    assert seen == {"model": "org/cv3", "cached": True, "gets": 1}  # replicas get the id, the cache is full


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["info", "org/nope"], "no such model on the Hugging Face Hub"),
        (["download", "org/gated"], "gated repository"),
        (["download", "org/textllm"], "is not a CosyVoice 2/3 model"),
        (["download", "tiny"], "is not a model id"),
        (["info", "org/cv3@v1", "--revision", "v2"], "two revisions"),
        (["synth", "--model", "org/nope", "--tokens", "{tokens}", "--out", "{out}"], "no such model"),
    ],
)
def test_cli_errors_are_one_line(fake_hub, tmp_path, capsys, argv, expected) -> None:
    tokens = tmp_path / "t.json"
    tokens.write_text("[1, 2, 3]")
    argv = [a.format(tokens=tokens, out=tmp_path / "o.wav") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"token2wav {argv[0]}: error: ") and expected in err
    assert "\n" not in err and "Traceback" not in err


def test_environment_variables_in_a_fresh_process(fake_hub, tmp_path) -> None:
    """What users set: HF_ENDPOINT and HF_HOME, then HF_HUB_OFFLINE=1 with the server gone."""
    home = tmp_path / "user-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    run = [sys.executable, "-m", "token2wav"]
    done = subprocess.run([*run, "download", "org/cv3"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{home / 'hub' / 'models--org--cv3'}" in done.stdout
    fake_hub.stop()
    offline = subprocess.run([*run, "info", "org/cv3", "--json"], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0, offline.stderr
    plan = json.loads(offline.stdout)
    assert plan["from_cache"] and {f["path"] for f in plan["files"]} == READ
    missing = subprocess.run([*run, "download", "org/other"], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "HF_HUB_OFFLINE=1 and the model is not in" in missing.stderr


# ------------------------------------------------------------------------------------------- optional parts


def test_missing_client_library_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(hub.HubError, match=r"pip install 'token2wav\[hub\]'"):
        Token2Wav.from_pretrained("org/whatever")
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(hub.HubError, match=r"pip install 'token2wav\[modelscope\]'"):
        resolve_model_dir("modelscope:org/whatever")


class FakeModelScope:
    """Stands in for the modelscope package: ``snapshot_download`` and ``hub.api.HubApi().get_model_files`` with
    the signatures token2wav uses, serving one repository from memory into a cache folder."""

    def __init__(self, files: dict[str, dict[str, bytes | Lazy]], cache: Path) -> None:
        self.files, self.cache, self.calls = files, cache, []
        self.online = True

    def modules(self) -> dict[str, types.ModuleType]:
        fake = self
        root = types.ModuleType("modelscope")
        hub_mod = types.ModuleType("modelscope.hub")
        api_mod = types.ModuleType("modelscope.hub.api")

        class HubApi:
            def get_model_files(self, model_id: str, revision: str | None = None, root: str | None = None,
                                recursive: bool = True, **kwargs: object) -> list[dict]:
                fake.calls.append(("get_model_files", model_id, revision))
                if not fake.online:
                    raise ConnectionError("no route to host")
                return [{"Path": n, "Name": n.rsplit("/", 1)[-1], "Size": _size(c), "Type": "blob"}
                        for n, c in fake.files[revision or "master"].items()]

        def snapshot_download(model_id: str, revision: str | None = None, cache_dir: str | None = None,
                              local_files_only: bool = False, allow_file_pattern: list[str] | None = None,
                              local_dir: str | None = None, **kwargs: object) -> str:
            fake.calls.append(("snapshot_download", model_id, revision, tuple(allow_file_pattern or ()),
                               local_files_only))
            where = Path(local_dir) if local_dir else fake.cache / model_id / (revision or "master")
            if local_files_only:
                if not where.is_dir():
                    raise ValueError("not cached")
                return str(where)
            if not fake.online:
                raise ConnectionError("no route to host")
            where.mkdir(parents=True, exist_ok=True)
            for name in allow_file_pattern or ():
                content = fake.files[revision or "master"][name]
                assert isinstance(content, bytes), f"asked for {name}"
                (where / name).write_bytes(content)
            return str(where)

        api_mod.HubApi = HubApi
        root.snapshot_download = snapshot_download
        root.hub = hub_mod
        hub_mod.api = api_mod
        return {"modelscope": root, "modelscope.hub": hub_mod, "modelscope.hub.api": api_mod}


def test_modelscope_ids(releases, tmp_path, monkeypatch) -> None:
    fake = FakeModelScope({"master": releases["org/cv3"]["main"], "v1": releases["org/cv3"]["v1"]}, tmp_path)
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    t2w = Token2Wav.from_pretrained("modelscope:FunAudioLLM/Fun-CosyVoice3-0.5B-2512")
    asked = {n for call in fake.calls if call[0] == "snapshot_download" for n in call[3]}
    assert asked == READ
    older = Token2Wav.from_pretrained("modelscope:FunAudioLLM/Fun-CosyVoice3-0.5B-2512", revision="v1")
    assert ("get_model_files", "FunAudioLLM/Fun-CosyVoice3-0.5B-2512", "v1") in fake.calls
    assert not torch.equal(older.flow.input_embedding.weight, t2w.flow.input_embedding.weight)
    fake.online = False  # the hub unreachable: the cached copy, with a note
    with pytest.warns(UserWarning, match="cached copy"):
        again = Token2Wav.from_pretrained("modelscope:FunAudioLLM/Fun-CosyVoice3-0.5B-2512@v1")
    assert torch.equal(again.flow.input_embedding.weight, older.flow.input_embedding.weight)
    with pytest.raises(hub.HubNotFoundError, match="cannot reach the ModelScope hub"):
        Token2Wav.from_pretrained("modelscope:other/model")


def test_modelscope_signatures_match_the_stand_in() -> None:
    """The keywords token2wav passes exist in the installed modelscope (skipped where it is not installed)."""
    import inspect

    modelscope = pytest.importorskip("modelscope")
    params = inspect.signature(modelscope.snapshot_download).parameters
    assert {"revision", "allow_file_pattern", "local_dir", "local_files_only"} <= set(params)
    from modelscope.hub.api import HubApi

    assert {"revision", "recursive"} <= set(inspect.signature(HubApi.get_model_files).parameters)
