"""Reading speech-token sequences and prompts from files, and checking where the commands write theirs.

Accepted token formats (detected from content, not only from the extension):

* ``.npy``: an integer array of shape ``(N,)`` or ``(1, N)``;
* JSON: a list of ints, a single-row nested list, or an object with a ``"tokens"`` list;
* LLM output text with ``<|s_123|>`` markers (everything between markers is ignored); any text holding such a
  marker is read this way, whatever it starts with (e.g. ``[assistant]: <|s_1|><|s_2|>``);
* plain text: integers separated by whitespace and/or commas.

``-`` means standard input (text or ``.npy`` bytes).
"""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["PromptArrays", "check_output_path", "load_prompt_npz", "parse_tokens", "read_tokens", "tokens_from_array"]

_SPEECH_MARKER = re.compile(r"<\|s_(\d+)\|>")
_NPY_MAGIC = b"\x93NUMPY"
_PLAIN_SEPARATORS = re.compile(r"[\s,]+")
_PLAIN_INT = re.compile(r"[+-]?[0-9]+")
PROMPT_FILE_HELP = (
    "a prompt file is a NumPy .npz archive (numpy.savez) with integer array 'tokens' [P], float array 'mel' "
    "[2P, 80] (log-mel, frames x bins) and float array 'embedding' [192]"
)


def tokens_from_array(arr: object, *, name: str = "tokens") -> np.ndarray:
    """Validate an array-like of token ids and return it as a 1-D int64 array."""
    a = np.asarray(arr)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]  # the reference keeps a batch axis of 1
    if a.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D sequence of token ids (or shape (1, N)), got shape {a.shape}"
        )
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{name}: token ids must be integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        # JSON readers and some tools hand ints over as floats; accept only exact integers.
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise TypeError(f"{name}: token ids must be integers, got non-integer values")
    out = a.astype(np.int64)
    if out.min() < 0:
        raise ValueError(f"{name}: token ids must be >= 0, got {int(out.min())}")
    return out


def _from_json(value: object) -> np.ndarray:
    if isinstance(value, dict):
        if "tokens" not in value:
            raise ValueError("tokens: JSON object has no 'tokens' key")
        value = value["tokens"]
    if not isinstance(value, list):
        raise ValueError(f"tokens: JSON must be a list of ints, got {type(value).__name__}")
    if value and all(isinstance(v, list) for v in value):
        if len(value) != 1:
            raise ValueError(f"tokens: nested JSON list must have exactly one row, got {len(value)}")
        value = value[0]
    for v in value:
        # bool is an int subclass; a list of true/false is not a token file
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"tokens: JSON list must hold only integers, found {v!r}")
    has_float = any(isinstance(v, float) for v in value)
    # floats such as 12.0 are accepted (some JSON writers emit them); tokens_from_array checks integrality
    try:
        arr = np.asarray(value, dtype=np.float64 if has_float else np.int64)
    except OverflowError:
        raise ValueError("tokens: token id does not fit in 64 bits") from None
    return tokens_from_array(arr)


def parse_tokens(text: str) -> np.ndarray:
    """Parse token ids from text (JSON, ``<|s_N|>`` markers, or whitespace/comma separated ints)."""
    stripped = text.strip()
    if not stripped:
        return np.zeros(0, dtype=np.int64)
    if _SPEECH_MARKER.search(stripped):
        # LLM output: markers anywhere win over any other reading ("[assistant]: <|s_1|>..." is not JSON)
        ids = [int(m) for m in _SPEECH_MARKER.findall(stripped)]
        if any(i >= 2**63 for i in ids):
            raise ValueError("tokens: token id does not fit in 64 bits")
        return tokens_from_array(np.asarray(ids, dtype=np.int64))
    if stripped[0] in "[{":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokens: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return _from_json(value)
    values = []
    for part in _PLAIN_SEPARATORS.split(stripped):
        if not part:
            continue
        if not _PLAIN_INT.fullmatch(part):
            raise ValueError(
                f"tokens: cannot read {part[:40]!r}; expected a JSON list, whitespace-separated integers, "
                "or LLM text with <|s_N|> markers"
            )
        values.append(int(part))
    try:
        arr = np.asarray(values, dtype=np.int64)
    except OverflowError:
        raise ValueError("tokens: token id does not fit in 64 bits") from None
    return tokens_from_array(arr)


def _from_bytes(data: bytes) -> np.ndarray:
    if data.startswith(_NPY_MAGIC):
        return tokens_from_array(np.load(io.BytesIO(data), allow_pickle=False))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("tokens: input is neither UTF-8 text nor a .npy array") from None
    return parse_tokens(text)


def read_tokens(source: str | Path | BinaryIO) -> np.ndarray:
    """Read a token sequence from a path, ``"-"`` (stdin) or a binary file object."""
    if isinstance(source, (str, Path)):
        if str(source) == "-":
            return _from_bytes(sys.stdin.buffer.read())
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"tokens: no such file: {path}")
        return _from_bytes(path.read_bytes())
    return _from_bytes(source.read())


@dataclass(frozen=True)
class PromptArrays:
    """The three arrays of a speaker prompt as stored in a ``.npz`` file."""

    tokens: np.ndarray
    mel: np.ndarray
    embedding: np.ndarray


def load_prompt_npz(path: str | Path) -> PromptArrays:
    """Load a prompt file holding arrays ``tokens``, ``mel`` and ``embedding``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt: no such file: {path}")
    with path.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # .npz files are zip archives
    if not is_zip:
        raise ValueError(f"prompt: {path} is not a prompt file: {PROMPT_FILE_HELP}")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"prompt: {path} could not be read as a .npz archive ({exc}); {PROMPT_FILE_HELP}") from None
    with z:
        missing = [k for k in ("tokens", "mel", "embedding") if k not in z.files]
        if missing:
            has = ", ".join(z.files) or "none"
            raise ValueError(f"prompt: {path} lacks array(s) {', '.join(missing)} (has {has}); {PROMPT_FILE_HELP}")
        try:
            tokens = tokens_from_array(z["tokens"], name="prompt tokens")
            mel = np.asarray(z["mel"], dtype=np.float32)
            embedding = np.asarray(z["embedding"], dtype=np.float32)
        except ValueError as exc:
            if "pickle" not in str(exc).lower():
                raise
            raise ValueError(f"prompt: {path} holds Python objects, not plain arrays; {PROMPT_FILE_HELP}") from None
    return PromptArrays(tokens=tokens, mel=mel, embedding=embedding)


def check_output_path(path: str | Path | None, flag: str = "--out") -> None:
    """Refuse an output file that cannot be written, before any work is done (ValueError naming ``flag``).
    None and ``-`` (standard output) pass."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {p.parent} does not exist")
