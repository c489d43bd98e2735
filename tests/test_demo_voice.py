"""The bundled demo voice: loads from its own format, exposes its voices and tokenizer, streams exactly."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tolerances import SOLVE

import token2wav
from token2wav.demo import _utterance
from token2wav.streaming.pacing import recommend_start_buffer


@pytest.fixture(scope="module")
def demo():
    return token2wav.Token2Wav.from_pretrained("demo")


def test_config_declares_runtime_ranges(demo):
    cfg = demo.config
    assert cfg.format == "token2wav"
    assert cfg.sample_rate == 22050 and cfg.token_mel_ratio == 2
    assert cfg.supported_chunk_tokens == (12, 50)
    assert cfg.supported_pre_lookahead == (0, 5)
    assert sum(p.numel() for p in demo.flow.parameters()) <= 10_000_000


def test_speakers_and_prompts(demo):
    assert demo.speakers == ["slt", "rms", "awb"]
    prompt = demo.speaker_prompt("rms")
    assert prompt.mel.shape[0] == 2 * prompt.tokens.shape[0]
    assert prompt.mel.shape[1] == 80 and prompt.embedding.shape == (192,)
    with pytest.raises(ValueError, match=r"speaker must be one of \['slt', 'rms', 'awb'\]"):
        demo.speaker_prompt("kal")


def test_tokenize_roundtrip_shape(demo):
    sr = 16000
    t = np.arange(sr) / sr
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    tokens = demo.tokenize(wave, sr)
    # one token per two 256-sample frames at 22.05 kHz: 1 s -> about 43 tokens
    assert 40 <= len(tokens) <= 44
    assert all(0 <= x < demo.config.vocab_size for x in tokens)
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        demo.tokenize(wave, 0)
    # the recording's layouts and PCM types that prompts take: channels averaged, int16 scaled like a WAV loader
    assert demo.tokenize(np.stack([wave, wave]), sr) == tokens
    assert demo.tokenize(np.stack([wave, wave], axis=1), sr) == tokens
    pcm = np.round(wave * 32767).astype(np.int16)
    assert demo.tokenize(pcm, sr) == demo.tokenize(pcm.astype(np.float32) / 32768, sr)


@pytest.mark.parametrize(("wave", "error", "message"), [
    (np.zeros(0, np.float32), ValueError, "wave is empty: tokenizing needs at least one sample"),
    (np.full(100, np.nan, np.float32), ValueError, "wave holds NaN or infinite samples"),
    (np.zeros((1, 2, 100), np.float32), ValueError, r"wave must be \[samples\], \[channels, samples\] or"),
    ("a.wav", TypeError, "wave must hold float or int16/int32 PCM samples"),
])
def test_tokenize_refuses_what_is_not_a_recording(demo, wave, error, message):
    with pytest.raises(error, match=message):
        demo.tokenize(wave, 16000)


def test_vocode_takes_one_mel_as_a_tensor_or_an_array_and_refuses_the_rest(demo):
    mel = torch.randn(80, 12, generator=torch.Generator().manual_seed(0)) - 5
    audio = demo.vocode(mel)
    assert audio.shape == (12 * 256,) and np.isfinite(audio).all()
    np.testing.assert_array_equal(demo.vocode(mel.numpy()), audio)  # the same call on the same values
    np.testing.assert_array_equal(demo.vocode(mel[None]), audio)
    cases = [
        (torch.zeros(2, 80, 12), ValueError, r"mel must be \[80, frames\] or \[1, 80, frames\] \(one mel at a time\), "
                                             r"got shape \(2, 80, 12\)"),
        (torch.zeros(79, 12), ValueError, r"got shape \(1, 79, 12\)"),
        (torch.zeros(80, 0), ValueError, "mel has no frames: vocode needs at least one"),
        (torch.full((80, 12), float("inf")), ValueError, "mel holds NaN or infinite values"),
        ("mel.npy", TypeError, "mel must be array-like, got str"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            demo.vocode(bad)


def test_recompute_mode_says_why_the_demo_voice_cannot_run_it(demo):
    # it decodes at lookahead 3 with a flow built for 5 (trained with random lookahead): no reference loop to redo
    with pytest.raises(ValueError, match=r"mode='recompute' is the reference algorithm, trained chunk and lookahead "
                                         r"only, which this model cannot run: it decodes with a lookahead of 3 "
                                         r"tokens, its flow was built with 5; mode='cached' is exact"):
        demo.stream(mode="recompute")
    with pytest.raises(ValueError, match="which this model cannot run"):  # its own lookahead, named: the same
        demo.stream(mode="recompute", pre_lookahead_len=3)


def test_default_stream_equals_chunk_synthesis(demo):
    # The demo flow was trained with lookahead up to 5 and runs at 3 by default: stream and offline chunk decode
    # must use the same value, so they agree to float rounding.
    tokens, _, speaker = _utterance(demo, "slt")
    tokens = tokens[:90]
    prompt = demo.speaker_prompt(speaker)
    offline = demo.synthesize(tokens, prompt=prompt, attention="chunk", output="mel")
    with demo.stream(prompt, output="mel") as s:
        pieces = [c for i in range(0, len(tokens), 7) for c in s.push(tokens[i : i + 7])]
        pieces.append(s.finish())
    streamed = np.concatenate([p for p in pieces if p.size], axis=1)
    assert streamed.shape == offline.shape == (80, 2 * len(tokens))
    assert np.abs(streamed - offline).max() < SOLVE  # a flow solve, streamed vs offline mel
    lookahead5 = demo.flow.inference(
        torch.tensor([tokens]), *_prompt_tensors(demo, prompt), streaming=True, finalize=True
    )[0].numpy()
    assert np.abs(lookahead5 - offline).max() > 1e-3  # the lookahead really is 3, not the trained 5


def _prompt_tensors(demo, prompt):
    p = demo.prepare_prompt(prompt)
    return p.tokens, p.feat, p.embedding


def test_bad_lookahead_and_hop(demo):
    with pytest.raises(ValueError, match=r"pre_lookahead_len=6 is not supported by this model: allowed 0..5"):
        demo.stream(pre_lookahead_len=6)
    with demo.stream(hop=12, pre_lookahead_len=0) as s:  # dynamic chunk and lookahead, inside the trained range
        assert s.push(list(range(12))) != []


def test_the_start_buffer_covers_the_audio_the_vocoder_holds_back(demo):
    """HiFi-GAN V1 holds back its right receptive field, 12.7 mel frames (counted by hand in tests/test_hifigan.py:
    20 frames give 1862 of their 5120 samples). The first chunk's audio is that much shorter than its tokens',
    so every later chunk arrives that much later than the audio before it ends, and the recommended start
    buffer adds it; a session of mel output adds nothing."""
    tokens, _, speaker = _utterance(demo, "slt")
    prompt = demo.speaker_prompt(speaker)
    held_s = (20 * 256 - 1862) / demo.sample_rate
    t0 = time.perf_counter()
    with demo.batcher(workers=0) as batcher:
        with batcher.stream(prompt, hop=12, schedule="fixed") as audio, \
                batcher.stream(prompt, hop=12, schedule="fixed", output="mel") as mel:
            assert audio.vocoder_lag_s == 0.0
            for s in (audio, mel):
                for i in range(0, 30, 3):  # the same arrivals: the same measured token rate
                    s.push(tokens[i : i + 3], arrived_at=t0 + i / 43.0)
            assert audio.playback.audio_s > 0 and mel.tokens_emitted == audio.tokens_emitted
            assert audio.vocoder_lag_s == pytest.approx(held_s, abs=1.5 / demo.sample_rate)
            assert mel.vocoder_lag_s == 0.0
            # each session plans against its own first chunk's time, so the two plans differ by more than the
            # lag: the session's recommendation is the plan of its quantities plus exactly the lag
            for s in (audio, mel):
                plan = recommend_start_buffer(
                    first_hop=12, audio_s_per_token=s.spec.audio_s_per_token, token_rate=s.arrivals.upper_rate,
                    compute=batcher.compute, history=s.spec.history(s.state.offset), first_compute_s=s.first_chunk_s)
                assert s.recommended_start_buffer_s() == pytest.approx(plan + s.vocoder_lag_s, abs=1e-9)
