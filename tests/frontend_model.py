"""A CosyVoice 3 model directory for the front-end tests: the parity fixtures' flow and vocoder plus the ONNX
stand-ins of tests/data/frontend.

The stand-in tokenizer emits ids up to 6561 (the S3 codebook) while the fixture flows have 512 (CosyVoice 3) or
64 (CosyVoice 2) token embeddings, so the directory's flow gets 6561 rows: row i is the fixture's row i modulo its
row count (deterministic, and the fixture weights are otherwise untouched). Its config is the fixture config
with that vocab_size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).resolve().parent / "data"
FRONTEND = DATA / "frontend"
S3_VOCAB = 6561


def make_model_dir(root: Path, onnx: tuple[str, ...] = ("campplus.onnx", "speech_tokenizer_v3.onnx"),
                   family: str = "cv3") -> Path:
    """``family="cv2"``: the CosyVoice 2 fixture flow (U-Net) and HiFT, with the real cosyvoice2.yaml's
    feat_extractor fmax of 8000 (the trimmed fixture config has null) and the stand-in tokenizer stored under
    the CosyVoice 2 name, as the cv2 reference prompts were made with that graph."""
    root.mkdir(parents=True, exist_ok=True)
    text = (DATA / f"{family}_config.yaml").read_text()
    vocab = "vocab_size: 512" if family == "cv3" else "vocab_size: 64"
    assert text.count(vocab) == 1
    text = text.replace(vocab, f"vocab_size: {S3_VOCAB}")
    if family == "cv2":
        assert text.count("fmax: null") == 1
        text = text.replace("fmax: null", "fmax: 8000")
    (root / ("cosyvoice3.yaml" if family == "cv3" else "cosyvoice2.yaml")).write_text(text)
    state = load_file(str(DATA / f"{family}_flow_state.safetensors"))
    emb = state["input_embedding.weight"]
    state["input_embedding.weight"] = emb[torch.arange(S3_VOCAB) % emb.shape[0]].contiguous()
    save_file(state, str(root / "flow.safetensors"))
    shutil.copyfile(DATA / f"{family}_hift_state.safetensors", root / "hift.safetensors")
    for name in onnx:
        target = "speech_tokenizer_v2.onnx" if family == "cv2" and name == "speech_tokenizer_v3.onnx" else name
        shutil.copyfile(FRONTEND / name, root / target)
    return root
