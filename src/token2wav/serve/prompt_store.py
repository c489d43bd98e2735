"""Prompt ids, and registered prompts on disk (``token2wav serve --prompt-dir DIR``) so an id outlives a restart.

What a ``prompt_id`` promises: it names the prompt's *input*, never bits that a CPU computed.

* A prompt posted as arrays (JSON) is named by those arrays, exactly as sent (:func:`prompt_id`).
* A prompt cloned from a recording is named by the decoded samples, their rate, and the fingerprint of what
  turns audio into a prompt on this model (its config file and front-end model files, and a named voice's
  stored embedding; :func:`audio_prompt_id`). The arrays the front end computes from it may differ in their
  last bits between CPUs (FFT, GEMM and vector-width differences); the id does not. So the same recording and
  model get the same id on every machine and on every replica of a Ray cluster, whatever its nodes' CPUs.
  The first arrays registered under an id are the ones kept (in a replica's memory and in ``--prompt-dir``).
  PCM, float and FLAC files decode to the same samples everywhere; lossy formats (Ogg Vorbis, MP3) only with
  the same decoder library.

One file per prompt, ``DIR/<prompt_id>.npz``, holding plain arrays (``tokens`` int64 ``[P]``, ``mel`` float32
``[frames, mel_dim]``, ``embedding`` float32 ``[D]``, and ``prompt_id``: the id's bytes, so a renamed file is
caught). Files are written atomically (a temporary file in the same folder, flushed to disk, then renamed over
the final name), so a crash mid-write leaves either the old state or the new file, never a truncated entry.
Reading uses ``np.load(allow_pickle=False)``: a file cannot make the server execute anything. A file that is
not a valid prompt (corrupt, foreign, renamed, of another model) is skipped with a warning; it is never fatal.
Files written before ids named audio (three arrays, no ``prompt_id``) are still read: their name must be the
hash of their arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["PromptStore", "audio_prompt_id", "is_prompt_id", "prompt_id"]

log = logging.getLogger("token2wav.serve")

_ID = re.compile(r"^p_[0-9a-f]{24}$")
_ARRAYS = {"tokens", "mel", "embedding"}
_KEYS = _ARRAYS | {"prompt_id"}
_TMP_PREFIX = ".tmp-"

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _id(hex_digest: str) -> str:
    return "p_" + hex_digest[:24]


def is_prompt_id(pid: object) -> bool:
    return isinstance(pid, str) and _ID.match(pid) is not None


def prompt_id(tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> str:
    """Id of a prompt given as arrays: a hash of the arrays as sent (the same arrays always get the same id)."""
    h = hashlib.sha256()
    for arr in (np.asarray(tokens).astype("<i8"), np.asarray(mel).astype("<f4"), np.asarray(embedding).astype("<f4")):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return _id(h.hexdigest())


def audio_prompt_id(samples: np.ndarray, sample_rate: int, frontend: str) -> str:
    """Id of a prompt cloned from a recording: a hash of its decoded samples (``[n]`` or ``[n, channels]``),
    their rate and ``frontend`` (the model's front-end fingerprint), never of the arrays computed from them."""
    arr = np.ascontiguousarray(np.asarray(samples, dtype="<f4"))
    h = hashlib.sha256(b"token2wav audio prompt v1\0")
    h.update(f"{frontend}|{int(sample_rate)}|{arr.shape}".encode())
    h.update(arr.tobytes())
    return _id(h.hexdigest())


class PromptStore:
    """A folder of prompt files. ``max_file_bytes`` bounds what is read back (a larger file is skipped)."""

    def __init__(self, directory: str | os.PathLike[str], vocab_size: int, *, max_file_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"--prompt-dir: {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"--prompt-dir: {self.directory} is not writable")
        self.vocab_size = int(vocab_size)
        self.max_file_bytes = int(max_file_bytes)

    def path(self, pid: str) -> Path:
        if not is_prompt_id(pid):
            raise ValueError(f"not a prompt id: {pid[:40]!r}")
        return self.directory / f"{pid}.npz"

    def save(self, pid: str, tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> Arrays:
        """Keep the prompt under ``pid`` and return the arrays kept: a valid file already there wins (the
        first arrays registered under an id; a damaged file of that name is replaced)."""
        final = self.path(pid)
        if final.is_file():
            kept = self._read(final, pid)
            if kept is not None:
                return kept
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npz", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    tokens=np.asarray(tokens, dtype="<i8"),
                    mel=np.asarray(mel, dtype="<f4"),
                    embedding=np.asarray(embedding, dtype="<f4"),
                    prompt_id=np.frombuffer(pid.encode("ascii"), dtype=np.uint8),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return self._check(np.asarray(tokens), np.asarray(mel), np.asarray(embedding))

    def load(self, pid: str) -> Arrays | None:
        """The arrays of ``pid``, or None if there is no such file or it is not a valid prompt (warned)."""
        try:
            path = self.path(pid)
        except ValueError:
            return None
        if not path.is_file():
            return None
        return self._read(path, pid)

    def load_all(self, limit: int | None = None) -> list[tuple[str, Arrays]]:
        """Every valid prompt in the folder, newest first (at most ``limit``). Others are skipped, warned."""
        for leftover in self.directory.glob(_TMP_PREFIX + "*"):  # a write interrupted by a crash
            with contextlib.suppress(OSError):
                leftover.unlink()
        entries = []
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                continue
            pid = path.name[:-4] if path.name.endswith(".npz") else ""
            if not _ID.match(pid) or not path.is_file():
                log.warning("prompt store: skipping %s: not a prompt file (<prompt_id>.npz)", path.name)
                continue
            with contextlib.suppress(OSError):
                entries.append((path.stat().st_mtime, pid, path))
        entries.sort(reverse=True)
        out: list[tuple[str, Arrays]] = []
        for _, pid, path in entries:
            if limit is not None and len(out) >= limit:
                break
            arrays = self._read(path, pid)
            if arrays is not None:
                out.append((pid, arrays))
        return out

    def _check_members(self, path: Path) -> None:
        """Refuse an archive whose members would unpack to more than the file limit, or whose array headers
        declare more data than the member holds (numpy allocates the declared size before reading)."""
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > self.max_file_bytes:
                    raise ValueError(f"member {info.filename[:40]!r} unpacks to {info.file_size} bytes, over the "
                                     f"{self.max_file_bytes} allowed")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = _NPY_HEADERS.get(version)
                    if read_header is None:
                        raise ValueError(f"member {info.filename[:40]!r}: .npy format {version} is not read")
                    shape, _, dtype = read_header(member, max_header_size=10000)
                    if dtype.hasobject:
                        raise ValueError(f"member {info.filename[:40]!r} holds Python objects")
                    declared = math.prod(shape) * dtype.itemsize
                    if declared > info.file_size:
                        raise ValueError(f"member {info.filename[:40]!r} declares {declared} bytes of data but "
                                         f"holds {info.file_size}")

    def _read(self, path: Path, pid: str) -> Arrays | None:
        try:
            size = path.stat().st_size
            if size > self.max_file_bytes:
                raise ValueError(f"{size} bytes, over the {self.max_file_bytes} allowed")
            self._check_members(path)
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                if set(data.files) not in (_KEYS, _ARRAYS):
                    raise ValueError(f"holds {sorted(data.files)}, expected {sorted(_KEYS)}")
                tokens, mel, emb = data["tokens"], data["mel"], data["embedding"]
                named = data["prompt_id"] if "prompt_id" in data.files else None
            arrays = self._check(tokens, mel, emb)
            if named is None:  # written before ids named audio: the name is the arrays' hash
                if prompt_id(*arrays) != pid:
                    raise ValueError("content does not match its name (damaged or renamed)")
            elif named.dtype != np.uint8 or named.tobytes() != pid.encode("ascii"):
                raise ValueError("the id stored in the file is not its name (renamed)")
            return arrays
        except Exception as e:  # zipfile and numpy raise many kinds on damaged files; a file is never fatal
            # (memory is bounded before anything is unpacked: _check_members)
            log.warning("prompt store: skipping %s: %s", path.name, str(e)[:200])
            return None

    def _check(self, tokens: np.ndarray, mel: np.ndarray, emb: np.ndarray) -> Arrays:
        if tokens.dtype.kind not in "iu" or tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids outside [0, {self.vocab_size})")
        for name, arr, ndim in (("mel", mel, 2), ("embedding", emb, 1)):
            if arr.dtype.kind != "f" or arr.ndim != ndim or arr.size == 0:
                raise ValueError(f"{name} must be a non-empty {ndim}-D float array, got {arr.dtype} {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} holds non-finite values")
        return tokens.astype(np.int64), mel.astype(np.float32), emb.astype(np.float32)

