"""The prompt front end against the reference's own outputs (tests/data/frontend, see its README.md).

Order as the fixture README suggests: waveforms from the WAV file, features from the stored reference waveforms
(which isolates each feature step), then tokens and embedding end to end from the file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import max_abs_diff
from safetensors.torch import load_file
from tolerances import ONE_OP

from token2wav.audio import mel_spectrogram
from token2wav.config import MelConfig
from token2wav.frontend import kaldi_fbank, load_wav, resample, whisper_log_mel
from token2wav.frontend.onnx import SpeakerEncoder, SpeechTokenizer
from token2wav.frontend.prompt import PromptFrontend, align_prompt, prompt_audio

WAVS = ("dev1_16k_mono", "dev2_22k_mono", "dev3_44k_stereo", "dev4_48k_mono")
# The fixture README's suggested tolerances (stored waveform / from the WAV file): the worst differences of
# independent float32 and float64 implementations of the same definitions, with room; large only where a log
# sees a tiny value (bins 60 dB under their frame's loudest, values near the log floor).
TOL = {
    "wav": 1e-5,
    "whisper_logmel": (1e-4, 2e-3),
    "fbank": (2e-3, 2e-2),
    "speech_feat_cv2": (1e-3, 1e-3),
    "speech_feat_cv3": (4e-3, 1.5e-2),
    "embedding": 1e-5,
}
MELS = {
    "cv2": MelConfig(sample_rate=24000, n_fft=1920, hop=480, win=1920, n_mels=80, fmin=0.0, fmax=8000.0),
    "cv3": MelConfig(sample_rate=24000, n_fft=1920, hop=480, win=1920, n_mels=80, fmin=0.0, fmax=None),
}


@pytest.fixture(scope="module")
def fdir(data_dir):
    return data_dir / "frontend"


@pytest.fixture(scope="module")
def ref(fdir) -> dict[str, torch.Tensor]:
    return load_file(str(fdir / "frontend.safetensors"))


@pytest.fixture(scope="module")
def index(fdir) -> dict:
    return json.loads((fdir / "frontend.json").read_text())


@pytest.fixture(scope="module")
def models(fdir):
    # onnxruntime is in the dev extra: CI runs these (no importorskip, a missing package fails loudly)
    return SpeechTokenizer(fdir / "speech_tokenizer_v3.onnx"), SpeakerEncoder(fdir / "campplus.onnx")


@pytest.mark.parametrize("wav", WAVS)
def test_fixture_wavs_are_the_ones_the_reference_read(fdir, index, wav) -> None:
    import hashlib

    meta = index["wavs"][wav]
    assert hashlib.sha256((fdir / f"{wav}.wav").read_bytes()).hexdigest() == meta["sha256"]
    trim = meta["trim_cv3"]  # the recorded trim lengths: tokens before, mel frames before, kept tokens
    assert trim["token_len"] == min(trim["feat_frames_before"] // 2, trim["tokens_before"])


@pytest.mark.parametrize("wav", WAVS)
@pytest.mark.parametrize("rate", [16000, 24000])
def test_load_wav_matches_reference_waveforms(fdir, ref, wav, rate) -> None:
    got = load_wav(fdir / f"{wav}.wav", rate)
    want = ref[f"{wav}/wav{rate // 1000}k"][0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    # fixture README: 1e-5 (independent resamplers sit 1e-6 to 4e-6 away); ours reproduces the reference's kernel,
    # so only summation order differs (measured 0 on AVX-512, AVX2 and default kernels)
    assert max_abs_diff(got, want) <= TOL["wav"]


def test_load_wav_array_input_and_channel_mean(fdir, ref) -> None:
    import soundfile as sf

    data, sr = sf.read(str(fdir / "dev3_44k_stereo.wav"), dtype="int16", always_2d=True)  # [n, 2]
    want = ref["dev3_44k_stereo/wav16k"][0]
    for arr in (data, data.T, torch.from_numpy(data.T.copy())):  # soundfile's and torch's layouts, int16 PCM
        assert max_abs_diff(load_wav(arr, 16000, sample_rate=sr), want) <= TOL["wav"]
    first_only = load_wav(data[:, 0], 16000, sample_rate=sr)
    assert max_abs_diff(first_only, want) > 1e-2  # one channel is not the mix: the check above can fail


def test_resample_semantics() -> None:
    x = torch.randn(2, 3, 1001, generator=torch.Generator().manual_seed(0))
    assert resample(x, 16000, 16000) is x  # equal rates: untouched
    y = resample(x, 22050, 16000)
    assert y.shape == (2, 3, -(-1001 * 320 // 441))  # ceil(n * new / old) on the reduced rates
    # leading dims: independent signals. One strided conv (~460 taps on |x| <= 4.1), batch 6 vs 1: one reduction
    # re-associated (ONE_OP; measured 4.8e-7 on AVX-512 and AVX2, 1.2e-7 on default kernels)
    assert max_abs_diff(y[1, 2], resample(x[1, 2], 22050, 16000)) < ONE_OP
    # a tone well inside the pass band survives 16k -> 24k -> 16k with small error
    t = torch.arange(16000) / 16000
    tone = torch.sin(2 * torch.pi * 440 * t)
    back = resample(resample(tone, 16000, 24000), 24000, 16000)
    # the filter's own pass-band error, not rounding (6e-4, the same in float64)
    assert max_abs_diff(back[200:-200], tone[200:-200]) < 1e-3


@pytest.mark.parametrize("wav", WAVS)
def test_whisper_log_mel_from_stored_and_file(fdir, ref, wav) -> None:
    want = ref[f"{wav}/whisper_logmel"]
    stored = whisper_log_mel(ref[f"{wav}/wav16k"][0], n_mels=128)
    assert stored.shape == want.shape == (128, ref[f"{wav}/wav16k"].shape[1] // 160)
    assert max_abs_diff(stored, want) <= TOL["whisper_logmel"][0]
    from_file = whisper_log_mel(load_wav(fdir / f"{wav}.wav", 16000))
    assert max_abs_diff(from_file, want) <= TOL["whisper_logmel"][1]


@pytest.mark.parametrize("wav", WAVS)
def test_kaldi_fbank_from_stored_and_file(fdir, ref, wav) -> None:
    want = ref[f"{wav}/fbank"]  # the reference's fbank minus its mean over frames
    n16 = ref[f"{wav}/wav16k"].shape[1]
    stored = kaldi_fbank(ref[f"{wav}/wav16k"][0], num_mel_bins=80)
    assert stored.shape == (1 + (n16 - 400) // 160, 80)
    assert max_abs_diff(stored - stored.mean(0, keepdim=True), want) <= TOL["fbank"][0]
    from_file = kaldi_fbank(load_wav(fdir / f"{wav}.wav", 16000))
    assert max_abs_diff(from_file - from_file.mean(0, keepdim=True), want) <= TOL["fbank"][1]


@pytest.mark.parametrize("wav", WAVS)
@pytest.mark.parametrize("version", ["cv2", "cv3"])
def test_prompt_mel_with_each_feat_extractor(fdir, ref, wav, version) -> None:
    m = MELS[version]
    want = ref[f"{wav}/speech_feat_{version}"][0]
    stored = mel_spectrogram(ref[f"{wav}/wav24k"][0], fmax=m.fmax)[0].T
    assert stored.shape == want.shape == (ref[f"{wav}/wav24k"].shape[1] // 480, 80)
    assert max_abs_diff(stored, want) <= TOL[f"speech_feat_{version}"][0]
    from_file = mel_spectrogram(load_wav(fdir / f"{wav}.wav", 24000), fmax=m.fmax)[0].T
    assert max_abs_diff(from_file, want) <= TOL[f"speech_feat_{version}"][1]


@pytest.mark.parametrize("wav", WAVS)
def test_tokens_and_embedding_from_the_file(fdir, ref, models, wav) -> None:
    tokenizer, encoder = models
    w16 = load_wav(fdir / f"{wav}.wav", 16000)
    tokens = tokenizer(whisper_log_mel(w16).numpy())
    want_tokens = ref[f"{wav}/speech_token"][0].numpy()
    assert tokens.shape == want_tokens.shape
    # integers: each is a rounding to -1/0/1 with margin (fixture README: feature noise of std 1e-4 changes none
    # of 1 580 tokens, and independent float32 / float64 log-mels reproduce them all), so exact on any kernel
    np.testing.assert_array_equal(tokens, want_tokens)
    fb = kaldi_fbank(w16)
    emb = torch.from_numpy(encoder((fb - fb.mean(0, keepdim=True)).numpy()))
    assert max_abs_diff(emb, ref[f"{wav}/embedding"][0]) <= TOL["embedding"]  # fixture README; measured <= 3e-7


@pytest.mark.parametrize("wav", WAVS)
@pytest.mark.parametrize("version", ["cv2", "cv3"])
def test_whole_front_end_gives_the_aligned_reference_prompt(fdir, ref, index, wav, version) -> None:
    # one engine-less front end over the fixture ONNX files (the v3 tokenizer for both, as the fixtures were made)
    front = PromptFrontend(fdir, MELS[version], token_mel_ratio=2)
    tokens, mel, emb = front(fdir / f"{wav}.wav")
    key = f"{wav}/prompt_{version}"
    want_tokens = ref[f"{key}/speech_token"][0]
    assert int(ref[f"{key}/speech_token_len"][0]) == tokens.shape[0]
    assert int(ref[f"{key}/speech_feat_len"][0]) == mel.shape[0] == 2 * tokens.shape[0]
    assert torch.equal(tokens, want_tokens.long())  # integers, as in the test above
    assert max_abs_diff(mel, ref[f"{key}/speech_feat"][0]) <= TOL[f"speech_feat_{version}"][1]
    assert max_abs_diff(emb, ref[f"{key}/embedding"][0]) <= TOL["embedding"]


def test_alignment_drops_the_odd_frame_and_last_token(ref) -> None:
    # dev2: 78 tokens, 155 mel frames -> 77 tokens, 154 frames (the reference's min(frames // 2, tokens))
    tok = ref["dev2_22k_mono/speech_token"][0]
    mel = ref["dev2_22k_mono/speech_feat_cv3"][0]
    t, m = align_prompt(tok, mel, 2)  # slices: copies compare bit for bit
    assert torch.equal(t, ref["dev2_22k_mono/prompt_cv3/speech_token"][0])
    assert torch.equal(m, ref["dev2_22k_mono/prompt_cv3/speech_feat"][0])


# ------------------------------------------------------------------------------------------ refusals


def _tone(seconds: float, sr: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("wave", "sr", "words"),
    [
        (_tone(1.0, 8000), 8000, "sample_rate must be >= 16000 Hz, got 8000"),
        (_tone(30.01), 16000, "at most 30 s"),
        (_tone(0.4), 16000, "at least 0.5 s"),
        (np.zeros(16000, np.float32), 16000, "silent"),
        (np.where(np.arange(16000) == 5, np.nan, _tone(1.0)).astype(np.float32), 16000, "NaN or infinite"),
        (np.where(np.arange(16000) == 5, np.inf, _tone(1.0)).astype(np.float32), 16000, "NaN or infinite"),
        (_tone(1.0), 0, "sample_rate must be a positive int"),
        (_tone(1.0), None, "sample_rate is required"),
    ],
)
def test_prompt_audio_refuses(wave, sr, words) -> None:
    with pytest.raises(ValueError, match=words) as info:
        prompt_audio(wave, sr)
    assert "\n" not in str(info.value)


def test_thirty_seconds_exactly_passes() -> None:
    mono, sr = prompt_audio(_tone(30.0), 16000)  # the reference accepts 30.0 s
    assert sr == 16000 and mono.shape == (480000,)


def test_load_wav_refuses_low_rates_and_non_audio(tmp_path) -> None:
    with pytest.raises(ValueError, match="sample_rate must be >= 16000 Hz, got 11025"):
        load_wav(_tone(1.0, 11025), 16000, sample_rate=11025)
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio\n")
    with pytest.raises(ValueError, match="not a readable audio file"):
        load_wav(bad, 16000)
    with pytest.raises(ValueError, match="target_sr must be a positive int"):
        load_wav(_tone(1.0), -1, sample_rate=16000)


@pytest.mark.parametrize(("orig", "new"), [(22050, 16000), (44100, 24000), (48000, 16000), (16000, 22050)])
def test_per_sample_resampler_is_the_same_filter(orig: int, new: int) -> None:
    """Rates whose reduced pair would need a huge polyphase kernel take the per-sample form of the same filter.
    Against the polyphase form on the standard rates: the reference builds its phases in float32, which moves
    a weight by up to ~1e-5 zero crossings (cutoff 316 x 6e-8 rounding), so up to 2e-5 on signals of |x| < 1.3."""
    import math

    from token2wav.frontend import dsp

    x = torch.randn(2, 9000, generator=torch.Generator().manual_seed(3)) * 0.3
    g = math.gcd(orig, new)
    direct = dsp._resample_direct(x, orig, new, math.ceil(new // g * x.shape[-1] / (orig // g)))
    assert max_abs_diff(direct, resample(x, orig, new)) <= 2e-5


def test_odd_rates_resample_in_bounded_memory(tmp_path) -> None:
    """A header of 16005 or 44101 Hz: the polyphase kernel would be 10 M or 706 M floats (3 GB); the per-sample
    form keeps the process under its baseline plus 200 MB for 30 s of audio (measured: 47 MB)."""
    import subprocess
    import sys

    script = (
        "import resource, torch\n"
        "from token2wav.frontend import resample\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for rate in (16005, 44101):\n"
        "    x = torch.randn(rate * 30) * 0.3\n"
        "    assert resample(x, rate, 16000).shape[-1] == -(-x.shape[-1] * 16000 // rate)\n"
        "    assert resample(x, rate, 24000).shape[-1] == -(-x.shape[-1] * 24000 // rate)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert int(out.stdout.strip()) < 200, out.stdout
