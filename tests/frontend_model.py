"""A CosyVoice 3 model directory for the front-end tests: the parity fixtures' flow and vocoder plus the ONNX
stand-ins of tests/data/frontend.

The stand-in tokenizer emits ids up to 6561 (the S3 codebook) while the fixture flow has 512 token embeddings,
so the directory's flow gets 6561 rows: row i is the fixture's row i % 512 (deterministic, and the fixture
weights are otherwise untouched). Its config is the fixture config with that vocab_size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).resolve().parent / "data"
FRONTEND = DATA / "frontend"
S3_VOCAB = 6561


def make_model_dir(root: Path, onnx: tuple[str, ...] = ("campplus.onnx", "speech_tokenizer_v3.onnx")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = (DATA / "cv3_config.yaml").read_text()
    assert text.count("vocab_size: 512") == 1
    (root / "cosyvoice3.yaml").write_text(text.replace("vocab_size: 512", f"vocab_size: {S3_VOCAB}"))
    state = load_file(str(DATA / "cv3_flow_state.safetensors"))
    emb = state["input_embedding.weight"]
    state["input_embedding.weight"] = emb[torch.arange(S3_VOCAB) % emb.shape[0]].contiguous()
    save_file(state, str(root / "flow.safetensors"))
    shutil.copyfile(DATA / "cv3_hift_state.safetensors", root / "hift.safetensors")
    for name in onnx:
        shutil.copyfile(FRONTEND / name, root / name)
    return root
