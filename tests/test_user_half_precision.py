"""Issue 16, item 1: half precision works end to end on the CPU (spectral ops run in float32 inside).

The user ran `token2wav synth --dtype float16` on a CPU: the flow decoded, then the vocoder's STFT died with
"MKL FFT doesn't support tensors of type: Half". Both families, both half dtypes, offline and streamed.
"""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from release_like import write_release_dir

import token2wav
from token2wav import cli

TOKENS = list(range(1, 31))


def _wav(path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


@pytest.fixture(scope="module")
def tiny32():
    return token2wav.Token2Wav.from_pretrained("tiny")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("stream", [False, True])
def test_cli_synth_in_half_precision_on_cpu(tmp_path, capsys, dtype, stream):
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps(TOKENS))
    out = tmp_path / "o.wav"
    args = ["synth", "--model", "tiny", "--tokens", str(tokens), "--out", str(out), "--dtype", dtype, "--json"]
    assert cli.main(args + (["--stream"] if stream else [])) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no traceback, and no NaN cast warning either
    assert json.loads(captured.out)["samples"] == len(TOKENS) * 960
    audio = _wav(out)
    assert audio.size == len(TOKENS) * 960 and np.abs(audio).max() > 0


@pytest.mark.parametrize(("dtype", "mel_tol", "min_snr_db"), [("float16", 0.03, 28.0), ("bfloat16", 0.15, 10.0)])
def test_api_takes_the_dtype_as_a_string_and_stays_close_to_float32(tiny32, dtype, mel_tol, min_snr_db):
    t2w = token2wav.Token2Wav.from_pretrained("tiny", dtype=dtype)
    assert t2w.dtype == getattr(torch, dtype) and next(t2w.vocoder.parameters()).dtype == getattr(torch, dtype)
    mel = t2w.synthesize(TOKENS, output="mel")
    ref = tiny32.synthesize(TOKENS, output="mel")
    assert np.isfinite(mel).all()
    # Half precision rounds each layer's activations to 11 (float16) or 8 (bfloat16) significant bits: on mels of
    # peak 4.9 one rounding is 2.4e-3 or 1.9e-2, and the solve's layers carry a few: the bounds are ~12 and ~8 such
    # steps (measured: 0.0064 (float16) and 0.053 (bfloat16))
    assert float(np.abs(mel - ref).max()) < mel_tol
    # the half vocoder on the float32 mel: convolutions in half, STFT / iSTFT / F0 / source in float32
    audio = t2w.vocode(torch.from_numpy(ref))
    audio32 = tiny32.vocode(torch.from_numpy(ref))
    assert audio.dtype == np.float32 and audio.shape == audio32.shape
    # Each half conv adds rounding noise 6 dB lower per significant bit; over the vocoder's ~30 layers it sums and
    # the random weights amplify it, so the bounds come from measurement with margin (33.6 dB for float16, 13.7 dB
    # for bfloat16 against float32), 18 dB apart: bfloat16's 3 fewer bits
    snr_db = 10 * np.log10(float((audio32**2).sum()) / float(((audio - audio32) ** 2).sum()))
    assert snr_db > min_snr_db


def test_cosyvoice2_vocoder_in_half_precision_offline_and_streamed(tmp_path):
    d = write_release_dir(tmp_path / "cv2", "cv2", extra_files=False)
    t2w = token2wav.Token2Wav.from_pretrained(d, dtype="float16")
    tokens = [5, 9, 23, 7, 50, 31, 2, 60, 17, 30, 8, 41] * 4
    offline = t2w.synthesize(tokens)
    with t2w.stream() as s:
        pieces = [c for i in range(0, len(tokens), 5) for c in s.push(tokens[i : i + 5])]
        pieces.append(s.finish())
    streamed = np.concatenate(pieces)
    assert offline.shape == streamed.shape == (len(tokens) * 960,)
    assert np.isfinite(offline).all() and np.isfinite(streamed).all() and np.abs(streamed).max() > 0


def test_zero_speaker_embedding_stays_finite_in_half():
    # no prompt means a zero embedding; normalising it in float16 was 0/0 (the eps underflows)
    t2w = token2wav.Token2Wav.from_pretrained("tiny", dtype=torch.float16)
    spk = t2w.flow._speaker(torch.zeros(1, 192, dtype=torch.float16))
    assert spk.dtype == torch.float16 and torch.isfinite(spk).all()


def test_unknown_dtype_string_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float16, bfloat16, float64; got 'int8'"):
        token2wav.Token2Wav.from_pretrained("tiny", dtype="int8")
