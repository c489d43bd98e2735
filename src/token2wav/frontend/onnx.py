"""The two ONNX models of a CosyVoice 2/3 release, run with onnxruntime on the CPU.

* ``speech_tokenizer_v2.onnx`` / ``speech_tokenizer_v3.onnx``: the S3 speech tokenizer. Input by position:
  Whisper log-mel features ``[1, 128, T]`` float32 and their length ``[1]`` int32; output ``[1, ceil(T / 4)]``
  int32 token ids (25 per second).
* ``campplus.onnx``: the CAM++ speaker model. Input: the mean-normalised 80-bin Kaldi fbank ``[1, T, 80]``
  float32; output ``[1, 192]``, the speaker embedding the flow is conditioned on.

onnxruntime is an optional dependency (``pip install 'token2wav[frontend]'``); it is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INSTALL_HINT", "SPEECH_TOKENIZER_NAMES", "OnnxModel", "SpeechTokenizer", "SpeakerEncoder"]

INSTALL_HINT = "pip install 'token2wav[frontend]'"
# Each family's own tokenizer: the two give different tokens, so one never stands in for the other.
SPEECH_TOKENIZER_NAMES = {"cosyvoice2": "speech_tokenizer_v2.onnx", "cosyvoice3": "speech_tokenizer_v3.onnx"}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            f"voice prompts from audio run the model's ONNX speech tokenizer and speaker model with onnxruntime, "
            f"which is not installed: {INSTALL_HINT}"
        ) from exc
    return onnxruntime


class OnnxModel:
    """One inference session, created once and shared (onnxruntime sessions may be run from many threads)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        ort = _onnxruntime()
        self.path = Path(path)
        opts = ort.SessionOptions()
        # The reference's settings: full graph optimisation, one intra-op thread (prompts are short; the
        # engine's own threads do the heavy work).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a damaged file
            raise ValueError(f"{self.path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, *arrays: np.ndarray) -> np.ndarray:
        if len(arrays) != len(self.inputs):
            raise ValueError(f"{self.path.name} takes {len(self.inputs)} inputs ({self.inputs}), got {len(arrays)}")
        return self.session.run(None, dict(zip(self.inputs, arrays)))[0]


class SpeechTokenizer(OnnxModel):
    """Whisper log-mel ``[128, T]`` -> speech tokens ``[ceil(T / 4)]`` int64."""

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(log_mel, dtype=np.float32)[None]
        length = np.array([feats.shape[2]], dtype=np.int32)
        return self.run(feats, length).reshape(-1).astype(np.int64)


class SpeakerEncoder(OnnxModel):
    """Mean-normalised fbank ``[T, 80]`` -> speaker embedding ``[192]`` float32."""

    def __call__(self, fbank: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(fbank, dtype=np.float32)[None]
        return self.run(feats).reshape(-1).astype(np.float32)
