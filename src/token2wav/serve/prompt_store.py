"""Registered prompts on disk (``token2wav serve --prompt-dir DIR``), so a ``prompt_id`` outlives a restart.

One file per prompt, ``DIR/<prompt_id>.npz``, holding three plain arrays (``tokens`` int64 ``[P]``, ``mel``
float32 ``[frames, mel_dim]``, ``embedding`` float32 ``[D]``). Files are written atomically (a temporary file
in the same folder, flushed to disk, then renamed over the final name), so a crash mid-write leaves either
the old state or the new file, never a truncated entry. Reading uses ``np.load(allow_pickle=False)``: a file
cannot make the server execute anything. A file that is not a valid prompt (corrupt, foreign, renamed, of
another model) is skipped with a warning; it is never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["PromptStore", "prompt_id"]

log = logging.getLogger("token2wav.serve")

_ID = re.compile(r"^p_[0-9a-f]{24}$")
_KEYS = {"tokens", "mel", "embedding"}
_TMP_PREFIX = ".tmp-"

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def prompt_id(tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> str:
    """Content hash of a prompt: the same arrays always get the same id."""
    h = hashlib.sha256()
    for arr in (np.asarray(tokens).astype("<i8"), np.asarray(mel).astype("<f4"), np.asarray(embedding).astype("<f4")):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return "p_" + h.hexdigest()[:24]


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
        if not _ID.match(pid):
            raise ValueError(f"not a prompt id: {pid[:40]!r}")
        return self.directory / f"{pid}.npz"

    def save(self, pid: str, tokens: np.ndarray, mel: np.ndarray, embedding: np.ndarray) -> None:
        final = self.path(pid)
        if final.is_file() and self._read(final, pid) is not None:
            return  # same id, same content (a damaged file of that name is replaced)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npz", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    tokens=np.asarray(tokens, dtype="<i8"),
                    mel=np.asarray(mel, dtype="<f4"),
                    embedding=np.asarray(embedding, dtype="<f4"),
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

    def _read(self, path: Path, pid: str) -> Arrays | None:
        try:
            size = path.stat().st_size
            if size > self.max_file_bytes:
                raise ValueError(f"{size} bytes, over the {self.max_file_bytes} allowed")
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                if set(data.files) != _KEYS:
                    raise ValueError(f"holds {sorted(data.files)}, expected {sorted(_KEYS)}")
                tokens, mel, emb = data["tokens"], data["mel"], data["embedding"]
            arrays = self._check(tokens, mel, emb)
            if prompt_id(*arrays) != pid:
                raise ValueError("content does not match its name (damaged or renamed)")
            return arrays
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
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

