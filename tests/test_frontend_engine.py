"""``Token2Wav.prompt_from_wav`` end to end, saved voices (``spk2info.pt``) and the front end's refusals.

The model directory is the parity fixtures' CosyVoice 3 flow and vocoder plus the ONNX stand-ins
(see frontend_model.py).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from frontend_model import FRONTEND, S3_VOCAB, make_model_dir
from helpers import max_abs_diff
from safetensors.torch import load_file
from tolerances import sine_source_audio

from token2wav import Prompt, Token2Wav

MEL_TOL_FILE = 1.5e-2  # fixture README: speech_feat_cv3 from the WAV file
TOL_CV2_FILE = 1e-3  # fixture README: speech_feat_cv2 from the WAV file
EMB_TOL = 1e-5  # fixture README, embedding from the WAV file (independent implementations: 2.5e-6)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FRONTEND / "frontend.safetensors"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cv3_frontend_model"))


@pytest.fixture(scope="module")
def t2w(model_dir, one_thread) -> Token2Wav:
    return Token2Wav.from_pretrained(model_dir, n_timesteps=4)


def _fixture_prompt(ref, wav: str) -> Prompt:
    k = f"{wav}/prompt_cv3"
    return Prompt(ref[f"{k}/speech_token"], ref[f"{k}/speech_feat"], ref[f"{k}/embedding"])


def _stream(t2w: Token2Wav, prompt: Prompt | None, n: int = 60) -> np.ndarray:
    tokens = torch.randint(0, S3_VOCAB, (n,), generator=torch.Generator().manual_seed(7)).tolist()
    out: list[np.ndarray] = []
    with t2w.stream(prompt) as s:
        for i in range(0, n, 7):
            out += s.push(tokens[i:i + 7])
        out.append(s.finish())
    return np.concatenate(out)


@pytest.mark.parametrize("wav", ["dev1_16k_mono", "dev2_22k_mono", "dev3_44k_stereo"])
def test_prompt_from_wav_is_the_reference_prompt(t2w, ref, wav) -> None:
    got = t2w.prompt_from_wav(FRONTEND / f"{wav}.wav")
    want = _fixture_prompt(ref, wav)
    assert torch.equal(got.tokens, want.tokens)  # trimmed as the reference does (dev2, dev3: one token less)
    assert got.mel.shape == want.mel.shape
    assert max_abs_diff(got.mel, want.mel) <= MEL_TOL_FILE  # measured <= 1.9e-4 (default kernels), 0 (AVX2/512)
    assert max_abs_diff(got.embedding, want.embedding) <= EMB_TOL  # measured <= 1.8e-7 across kernel settings


def test_array_input_equals_file_input_and_sessions_are_made_once(t2w) -> None:
    data, sr = sf.read(str(FRONTEND / "dev2_22k_mono.wav"), dtype="float32")
    a = t2w.prompt_from_wav(FRONTEND / "dev2_22k_mono.wav")
    frontend = t2w._frontend
    b = t2w.prompt_from_wav(data, sample_rate=sr)
    assert t2w._frontend is frontend  # the ONNX sessions are per engine, not per call
    assert a.digest == b.digest


def test_streamed_decode_with_the_wav_prompt_equals_the_fixture_prompt(t2w, ref) -> None:
    from_wav = _stream(t2w, t2w.prompt_from_wav(FRONTEND / "dev1_16k_mono.wav"))
    from_fixture = _stream(t2w, _fixture_prompt(ref, "dev1_16k_mono"))
    assert from_wav.shape == from_fixture.shape and np.abs(from_wav).max() > 1e-3
    # The two prompts differ by what this CPU's front end computes differently from the reference's: the
    # embedding by ~1e-7, the log-mel by up to 1.9e-4 in bins near the log floor (measured with the default
    # kernels; 0 on AVX-512 and AVX2). Through the flow that is a last-bits change of the F0, integrated by the
    # HiFT's phase (tests/tolerances.py). Measured 0 (AVX-512), 3.1e-5 (AVX2), 2.6e-5 (default).
    peak = float(np.abs(from_fixture).max())
    assert np.abs(from_wav - from_fixture).max() <= sine_source_audio(peak, len(from_fixture) / t2w.sample_rate)


def test_speaker_replaces_the_embedding(t2w, model_dir, ref) -> None:
    voice = _fixture_prompt(ref, "dev4_48k_mono")
    t2w.add_voice("dev4", voice, overwrite=True)
    p = t2w.prompt_from_wav(FRONTEND / "dev1_16k_mono.wav", speaker="dev4")
    assert torch.equal(p.embedding, voice.embedding)  # the stored voice's embedding, copied
    assert torch.equal(p.tokens, _fixture_prompt(ref, "dev1_16k_mono").tokens)
    (model_dir / "spk2info.pt").unlink()
    t2w._saved_voices = None


# ------------------------------------------------------------------------------------------ saved voices


def _reference_entry(ref, wav: str) -> dict[str, torch.Tensor]:
    """An entry as the reference's add_zero_shot_spk stores it: frontend_zero_shot's dict less the target text."""
    k = f"{wav}/prompt_cv3"
    tok, feat, emb = ref[f"{k}/speech_token"], ref[f"{k}/speech_feat"], ref[f"{k}/embedding"]
    return {
        "prompt_text": torch.tensor([[11, 12, 13]], dtype=torch.int32),
        "prompt_text_len": torch.tensor([3], dtype=torch.int32),
        "llm_prompt_speech_token": tok, "llm_prompt_speech_token_len": ref[f"{k}/speech_token_len"],
        "flow_prompt_speech_token": tok, "flow_prompt_speech_token_len": ref[f"{k}/speech_token_len"],
        "prompt_speech_feat": feat, "prompt_speech_feat_len": ref[f"{k}/speech_feat_len"],
        "llm_embedding": emb, "flow_embedding": emb,
    }


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory, ref):
    d = make_model_dir(tmp_path_factory.mktemp("cv3_voices"), onnx=())
    spk2info = {
        "alice": _reference_entry(ref, "dev2_22k_mono"),
        "sft_voice": {"embedding": ref["dev4_48k_mono/embedding"]},  # older releases: an embedding only
    }
    torch.save(spk2info, d / "spk2info.pt")  # what save_spkinfo does
    return d


def test_spk2info_voices_load_and_stream(voices_dir, ref, one_thread) -> None:
    t2w = Token2Wav.from_pretrained(voices_dir, n_timesteps=4)
    assert t2w.speakers == ["alice", "sft_voice"]
    alice = t2w.speaker_prompt("alice")
    want = _fixture_prompt(ref, "dev2_22k_mono")
    assert alice.digest == want.digest
    assert np.array_equal(_stream(t2w, alice), _stream(t2w, want))  # equal prompts: the same calls, one process
    sft = t2w.speaker_prompt("sft_voice")
    assert sft.num_tokens == 0 and sft.num_frames == 0
    assert torch.equal(sft.embedding, ref["dev4_48k_mono/embedding"][0])
    audio = _stream(t2w, sft)
    assert np.isfinite(audio).all() and audio.shape == _stream(t2w, None).shape
    with pytest.raises(ValueError, match=r"speaker must be one of \['alice', 'sft_voice'\]"):
        t2w.speaker_prompt("carol")


def test_add_voice_writes_the_reference_layout(tmp_path, ref, one_thread) -> None:
    d = make_model_dir(tmp_path / "m", onnx=())
    t2w = Token2Wav.from_pretrained(d, n_timesteps=4)
    assert t2w.speakers == []
    prompt = _fixture_prompt(ref, "dev1_16k_mono")
    t2w.add_voice("carol", prompt)
    assert t2w.speakers == ["carol"]
    data = torch.load(str(d / "spk2info.pt"), weights_only=True)
    entry = data["carol"]  # the prompt's arrays written and read back: copies compare bit for bit
    assert torch.equal(entry["flow_prompt_speech_token"], ref["dev1_16k_mono/prompt_cv3/speech_token"])
    assert entry["flow_prompt_speech_token"].dtype == torch.int32
    assert torch.equal(entry["prompt_speech_feat_len"], ref["dev1_16k_mono/prompt_cv3/speech_feat_len"])
    assert torch.equal(entry["flow_embedding"], ref["dev1_16k_mono/prompt_cv3/embedding"])
    assert Token2Wav.from_pretrained(d, n_timesteps=4).speaker_prompt("carol").digest == prompt.digest
    with pytest.raises(ValueError, match="already a voice"):
        t2w.add_voice("carol", prompt)


def test_spk2info_with_code_is_refused(tmp_path) -> None:
    d = make_model_dir(tmp_path / "m", onnx=())
    torch.save({"eve": {"flow_embedding": torch.zeros(1, 192), "x": np.dtype("float32").type}}, d / "spk2info.pt")
    t2w = Token2Wav.from_pretrained(d, n_timesteps=4)
    with pytest.raises(ValueError, match="not a readable spk2info file of tensors"):
        t2w.speakers  # noqa: B018


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("keep", "words"),
    [
        (("speech_tokenizer_v3.onnx",), "no campplus.onnx \\(the CAM\\+\\+ speaker model"),
        (("campplus.onnx",), "no speech_tokenizer_v3.onnx \\(the cosyvoice3 S3 speech tokenizer"),
    ],
)
def test_missing_onnx_file_is_named(tmp_path, keep, words, one_thread) -> None:
    d = make_model_dir(tmp_path / "m", onnx=keep)
    t2w = Token2Wav.from_pretrained(d, n_timesteps=4)
    with pytest.raises(FileNotFoundError, match=words):
        t2w.prompt_from_wav(FRONTEND / "dev1_16k_mono.wav")
    assert t2w._frontend is None  # nothing half-made


@pytest.mark.parametrize("wav", ["dev2_22k_mono", "dev4_48k_mono"])
def test_cosyvoice2_directory_uses_v2_tokenizer_and_its_fmax(tmp_path, ref, wav, one_thread) -> None:
    d = make_model_dir(tmp_path / "m", family="cv2")
    t2w = Token2Wav.from_pretrained(d, n_timesteps=2)
    assert t2w.config.mel.fmax == 8000.0  # read from the YAML's feat_extractor, as data
    got = t2w.prompt_from_wav(FRONTEND / f"{wav}.wav")
    k = f"{wav}/prompt_cv2"
    assert torch.equal(got.tokens, ref[f"{k}/speech_token"][0].long())
    assert max_abs_diff(got.mel, ref[f"{k}/speech_feat"][0]) <= TOL_CV2_FILE
    assert max_abs_diff(got.embedding, ref[f"{k}/embedding"][0]) <= EMB_TOL
    assert max_abs_diff(got.mel, _fixture_prompt(ref, wav).mel) > 0.1  # the cv3 mel differs: fmax matters
    (d / "speech_tokenizer_v2.onnx").rename(d / "speech_tokenizer_v3.onnx")  # the other family's file is no use
    with pytest.raises(FileNotFoundError, match="no speech_tokenizer_v2.onnx"):
        Token2Wav.from_pretrained(d, n_timesteps=2).prompt_from_wav(FRONTEND / f"{wav}.wav")


def test_without_onnxruntime_the_error_says_what_to_install(model_dir, monkeypatch) -> None:
    from token2wav.frontend.prompt import PromptFrontend

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    t2w = Token2Wav.from_pretrained(model_dir, n_timesteps=4)
    with pytest.raises(ImportError, match=r"pip install 'token2wav\[frontend\]'"):
        t2w.prompt_from_wav(FRONTEND / "dev1_16k_mono.wav")
    with pytest.raises(ImportError, match="onnxruntime"):
        PromptFrontend.for_config(t2w.config)


def _tone(seconds: float, sr: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.mark.parametrize(
    ("wave", "sr", "words"),
    [
        (_tone(31.0), 16000, "wav is 31.00 s long; a prompt must be at most 30 s"),
        (_tone(0.3, 48000), 48000, "at least 0.5 s"),
        (_tone(1.0, 8000), 8000, "sample_rate must be >= 16000 Hz, got 8000"),
        (np.zeros(24000, np.float32), 24000, "silent"),
        (np.full(16000, np.nan, np.float32), 16000, "NaN or infinite"),
    ],
)
def test_prompt_from_wav_refuses_bad_audio(t2w, wave, sr, words) -> None:
    with pytest.raises(ValueError, match=words) as info:
        t2w.prompt_from_wav(wave, sample_rate=sr)
    assert "\n" not in str(info.value)


def test_prompt_from_wav_refuses_files_that_are_not_audio(t2w, tmp_path) -> None:
    bad = tmp_path / "voice.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(ValueError, match="not a readable audio file"):
        t2w.prompt_from_wav(bad)
    low = tmp_path / "low.wav"
    sf.write(str(low), _tone(1.0, 8000), 8000, subtype="PCM_16")
    with pytest.raises(ValueError, match="sample_rate must be >= 16000 Hz, got 8000"):
        t2w.prompt_from_wav(low)
    with pytest.raises(FileNotFoundError):
        t2w.prompt_from_wav(tmp_path / "absent.wav")
    long = tmp_path / "long.wav"  # refused from its header, before the samples are read
    sf.write(str(long), _tone(31.0, 22050), 22050, subtype="PCM_16")
    with pytest.raises(ValueError, match="wav is 31.00 s long; a prompt must be at most 30 s"):
        t2w.prompt_from_wav(long)


# ------------------------------------------------------------------------------------------ demo voice


def test_demo_voice_prompt_from_wav() -> None:
    demo = Token2Wav.from_pretrained("demo")
    wave, sr = sf.read(str(FRONTEND / "dev2_22k_mono.wav"), dtype="float32")
    p = demo.prompt_from_wav(wave, sample_rate=sr, speaker="rms")
    tokens = demo.tokenize(wave, sr)
    assert p.num_frames == 2 * p.num_tokens and p.tokens.tolist() == tokens[: p.num_tokens]
    assert abs(p.num_tokens - len(tokens)) <= 1
    assert torch.equal(p.embedding, demo.speaker_prompt("rms").embedding)
    demo.prepare_prompt(p)  # usable by the model as it is (no trim warning needed)
    with pytest.raises(ValueError, match="speaker is required"):
        demo.prompt_from_wav(wave, sample_rate=sr)
