"""Saved voices: a CosyVoice ``spk2info.pt`` in the model directory.

The reference's ``add_zero_shot_spk`` / ``save_spkinfo`` write ``torch.save`` of ``{name: entry}``, where an
entry is the zero-shot front end's output (less the target text): ``flow_prompt_speech_token`` ``[1, L]``,
``prompt_speech_feat`` ``[1, 2L, 80]``, ``flow_embedding`` ``[1, 192]`` and their ``*_len`` companions, plus
the LLM's copies and the prompt text. Older releases' ``spk2info.pt`` (SFT voices) hold only ``embedding``:
such a voice has no prompt speech and is used with an empty prompt.

Reading never executes code from the file (``torch.load(weights_only=True)``: tensors, dicts, lists only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["SPK2INFO", "read_voices", "save_voice", "voice_entry", "voice_names"]

SPK2INFO = "spk2info.pt"


def _tensor(entry: dict[str, Any], keys: tuple[str, ...]) -> torch.Tensor | None:
    for key in keys:
        value = entry.get(key)
        if value is not None:
            return torch.as_tensor(value)
    return None


def read_voices(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{name: (tokens [L] int64, mel [frames, n_mels] float32, embedding [D] float32)}`` from a spk2info file.

    A voice with only an embedding gets ``L = 0`` tokens and 0 frames (an empty prompt: the voice comes from
    the embedding alone).
    """
    path = Path(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal or a damaged file: one clear line either way
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable spk2info file of tensors ({why})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of voices, got {type(data).__name__}")
    voices: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: voice {name!r} is a {type(entry).__name__}, expected a dict of tensors")
        emb = _tensor(entry, ("flow_embedding", "embedding", "llm_embedding"))
        if emb is None:
            raise ValueError(f"{path}: voice {name!r} has no flow_embedding / embedding")
        emb = emb.float().reshape(-1)
        tokens = _tensor(entry, ("flow_prompt_speech_token",))
        mel = _tensor(entry, ("prompt_speech_feat",))
        if tokens is None or mel is None:
            tokens = torch.zeros(0, dtype=torch.int64)
            mel = torch.zeros(0, 80, dtype=torch.float32)
        else:
            tokens = tokens.reshape(-1).long()
            mel = mel.float()
            if mel.dim() == 3 and mel.shape[0] == 1:
                mel = mel[0]
            n_tok = _tensor(entry, ("flow_prompt_speech_token_len",))
            n_mel = _tensor(entry, ("prompt_speech_feat_len",))
            if n_tok is not None:  # the stored lengths are the valid prefix
                tokens = tokens[: int(n_tok.reshape(-1)[0])]
            if n_mel is not None:
                mel = mel[: int(n_mel.reshape(-1)[0])]
        voices[str(name)] = (tokens, mel, emb)
    return voices


def voice_names(model_dir: str | Path) -> list[str]:
    """Names of the voices saved in ``model_dir/spk2info.pt`` (none if there is no such file)."""
    path = Path(model_dir) / SPK2INFO
    return list(read_voices(path)) if path.is_file() else []


def voice_entry(tokens: torch.Tensor, mel: torch.Tensor, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """An spk2info entry in the reference's layout and dtypes (int32 tokens and lengths, float32 features).

    No prompt text: our prompts come from audio alone (the reference's LLM would also want the transcript)."""
    tok = tokens.reshape(1, -1).to(torch.int32)
    feat = mel.reshape(1, mel.shape[-2], mel.shape[-1]).to(torch.float32)
    emb = embedding.reshape(1, -1).to(torch.float32)
    n_tok = torch.tensor([tok.shape[1]], dtype=torch.int32)
    n_feat = torch.tensor([feat.shape[1]], dtype=torch.int32)
    return {
        "llm_prompt_speech_token": tok.clone(), "llm_prompt_speech_token_len": n_tok.clone(),
        "flow_prompt_speech_token": tok, "flow_prompt_speech_token_len": n_tok,
        "prompt_speech_feat": feat, "prompt_speech_feat_len": n_feat,
        "llm_embedding": emb.clone(), "flow_embedding": emb,
    }


def save_voice(model_dir: str | Path, name: str, tokens: torch.Tensor, mel: torch.Tensor,
               embedding: torch.Tensor, *, overwrite: bool = False) -> Path:
    """Add (or with ``overwrite`` replace) voice ``name`` in ``model_dir/spk2info.pt``; returns the file.

    The file is rewritten atomically (temporary file, then rename), so a reader never sees half of it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    path = model_dir / SPK2INFO
    data: dict[str, Any] = {}
    if path.is_file():
        read_voices(path)  # refuse to extend a file we could not read back
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if name in data and not overwrite:
        raise ValueError(f"name {name!r} is already a voice in {path}; choose another or overwrite it")
    data[name] = voice_entry(tokens, mel, embedding)
    fd, tmp = tempfile.mkstemp(prefix=".spk2info.", suffix=".tmp", dir=str(model_dir))
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
