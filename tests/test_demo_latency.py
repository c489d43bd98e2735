"""`token2wav demo`'s low-latency default, its time breakdown, and the demo vocoder's exact streamed window."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from token2wav import Token2Wav
from token2wav.demo import LOW_LATENCY_STEPS, low_latency_options


@pytest.fixture(scope="module")
def demo() -> Token2Wav:
    return Token2Wav.from_pretrained("demo")


def test_low_latency_hop_needs_no_prompt_pad(demo: Token2Wav) -> None:
    prompt = demo.speaker_prompt("slt")
    assert int(prompt.tokens.numel()) == 64
    opts = low_latency_options(demo, prompt)
    assert opts == {"hop": 16, "schedule": "exponential", "max_hop": 64}
    with demo.stream(prompt, **opts) as s:
        assert s.plan.pad == 0 and s.plan.hop == 16  # the first chunk waits for 16 tokens + lookahead only
    # a prompt no hop divides: the smallest hop + pad
    odd = SimpleNamespace(tokens=np.zeros(67, dtype=np.int64))
    assert low_latency_options(demo, odd)["hop"] == 14  # 67 is prime: 12 + 5 and 14 + 3 tie, the larger hop wins
    # a model without run-time chunk sizes keeps its preset
    assert low_latency_options(Token2Wav.from_pretrained("tiny"), None) == {"preset": "assistant"}


def test_demo_vocoder_streams_exactly_with_its_configured_window(demo: Token2Wav) -> None:
    """The yaml's vocoder_stream (16 frames of context, 12 of look-ahead) is what sessions use: streamed audio
    equals the offline vocoder. The former default window (24 / 8) was off by up to ~0.5 at chunk seams."""
    voc = demo.vocoder
    assert (voc.stream_left_context, voc.stream_lookahead) == (16, 12)
    with demo.stream(demo.speaker_prompt("rms"), output="mel", hop=16) as s:
        mels = s.push(json.loads((Path(demo.config.path).parent / "demo_tokens.json").read_text())["utterances"][1][
            "tokens"][:120])
        mels.append(s.finish())
    mel = torch.from_numpy(np.concatenate([m for m in mels if m.size], axis=-1))[None]
    with torch.inference_mode():
        offline = voc(mel)[0, 0].numpy()
    with demo.stream(demo.speaker_prompt("rms"), hop=16) as s:
        # the same mel through a session's vocoder path, chunk by chunk
        from token2wav.models.hifigan import vocode_stream

        state, outs = None, []
        for i in range(0, mel.shape[2], 32):
            out, state = vocode_stream(voc, mel[:, :, i : i + 32], state, final=i + 32 >= mel.shape[2])
            outs.append(out[0].numpy())
    streamed = np.concatenate(outs)
    assert streamed.shape == offline.shape
    # Not float rounding alone: the configured window is shorter than HiFi-GAN's receptive field, whose far taps
    # leave ~4e-4 at |audio| 0.76 (measured 3.6e-4; the old 24 / 8 window: 0.29); float32 rounding of a network
    # pass (NETWORK relative to the peak, ~1e-5) is well under. 1e-3 separates the window from a wrong one.
    assert float(np.abs(streamed - offline).max()) < 1e-3


def test_demo_command_reports_latency_rtf_and_where_the_time_went(tmp_path, capsys) -> None:
    from token2wav import cli

    out = tmp_path / "demo.wav"
    assert cli.main(["demo", "--out", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    assert "first-chunk latency:" in text and "RTF:" in text and "set-up (once)" in text
    assert "10 solver steps" in text and "hop 16," in text  # the model's steps: 5 cost intelligibility
    m = json.loads(text.strip().splitlines()[-1])
    assert m["hop"] == 16 and m["pad"] == 0 and m["steps"] == 10 and LOW_LATENCY_STEPS is None
    # the breakdown adds up: flow + vocoder never exceed the first chunk's latency or the whole run
    assert 0 < m["first_flow_ms"] and 0 < m["first_vocoder_ms"]
    assert m["first_flow_ms"] + m["first_vocoder_ms"] <= m["first_chunk_ms"] + 1
    assert abs(m["flow_rtf"] + m["vocoder_rtf"] + m["other_rtf"] - m["rtf"]) < 2e-3  # 4 values rounded to 1e-4
    import soundfile as sf

    audio, sr = sf.read(str(out))
    assert sr == 22050 and abs(len(audio) / sr - m["audio_s"]) < 1e-3  # audio_s is rounded to 1 ms
    # the setting before this one stays available
    assert cli.main(["demo", "--out", str(out), "--preset", "balanced", "--steps", "5", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["steps"] == 5 and m["hop"] == 25 and m["pad"] == 11
