"""Voice prompts from recordings: the CosyVoice 2/3 prompt front end, written from the published definitions.

``dsp`` holds the signal processing (resampling, Whisper log-mel, Kaldi fbank, loading), ``onnx`` the two ONNX
models of a release (needs ``pip install 'token2wav[frontend]'``), ``prompt`` the whole front end and
``voices`` the saved voices of a model directory (``spk2info.pt``). Use it through
``Token2Wav.prompt_from_wav``.
"""

from __future__ import annotations

from .dsp import MIN_SAMPLE_RATE, kaldi_fbank, load_wav, resample, whisper_log_mel
from .prompt import MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS, PromptFrontend, align_prompt, prompt_audio
from .voices import SPK2INFO, read_voices, save_voice

__all__ = [
    "MAX_PROMPT_SECONDS",
    "MIN_PROMPT_SECONDS",
    "MIN_SAMPLE_RATE",
    "SPK2INFO",
    "PromptFrontend",
    "align_prompt",
    "kaldi_fbank",
    "load_wav",
    "prompt_audio",
    "read_voices",
    "resample",
    "save_voice",
    "whisper_log_mel",
]
