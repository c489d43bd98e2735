"""`token2wav demo`'s low-latency default, its time breakdown, and the demo vocoder's exact streamed window."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tolerances import NETWORK

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


def test_demo_vocoder_streams_exactly_with_carried_state(demo: Token2Wav) -> None:
    """A session's vocoder path carries each conv's state: the demo voice's streamed audio equals its offline
    vocoder output. (The windowed form it replaced, 16 frames back and 12 ahead, was 3.6e-4 off; 24 / 8: 0.29.)"""
    voc = demo.vocoder
    with demo.stream(demo.speaker_prompt("rms"), output="mel", hop=16) as s:
        mels = s.push(json.loads((Path(demo.config.path).parent / "demo_tokens.json").read_text())["utterances"][1][
            "tokens"][:120])
        mels.append(s.finish())
    mel = torch.from_numpy(np.concatenate([m for m in mels if m.size], axis=-1))[None]
    with torch.inference_mode():
        offline = voc(mel)[0, 0].numpy()
    with demo.stream(demo.speaker_prompt("rms"), hop=16) as s:
        chunks = s.push(json.loads((Path(demo.config.path).parent / "demo_tokens.json").read_text())["utterances"][1][
            "tokens"][:120])
        chunks.append(s.finish())
    streamed = np.concatenate([c for c in chunks if c.size])
    assert streamed.shape == offline.shape
    # Float rounding of one pass of the generator at other lengths. Its longest path is 30 convolutions of up to
    # 512 x 11 = 5632 terms, past NETWORK's 10-50 layers of ~4096; and two kernel choices for the same pass (1-D
    # convolutions vs 2-D channels-last, benchmarks/vocoder_cpu.py) differ by 3.2e-5 at this peak (0.76), which
    # another CPU's oneDNN may pick by length. So 5 x NETWORK relative to the peak. Measured 6.7e-6 (AVX-512),
    # 7.0e-6 (AVX2), 7.2e-6 (default kernels). A conv cut at the wrong sample moves whole samples (~1e-2 and up).
    assert float(np.abs(streamed - offline).max()) <= 5 * NETWORK * max(1.0, float(np.abs(offline).max()))


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


def _demo_mel(demo: Token2Wav, tokens: int) -> torch.Tensor:
    with demo.stream(demo.speaker_prompt("rms"), output="mel", hop=16) as s:
        mels = s.push(json.loads((Path(demo.config.path).parent / "demo_tokens.json").read_text())["utterances"][1][
            "tokens"][:tokens])
        mels.append(s.finish())
    return torch.from_numpy(np.concatenate([m for m in mels if m.size], axis=-1))[None]


def test_bfloat16_mixed_vocoder_error_is_stated_and_it_streams_like_its_offline_pass() -> None:
    """``vocoder_precision="bfloat16-mixed"``: the middle stages' resblocks convolve in bfloat16. Its distance
    to float32 is bfloat16's, and its streamed audio equals its own offline pass up to bfloat16 rounding."""
    from token2wav.models.hifigan import vocode_stream

    with warnings.catch_warnings():  # the kernel passes emulate bfloat16: the engine warns (tested below)
        warnings.simplefilter("ignore", UserWarning)
        mixed = Token2Wav.from_pretrained("demo", vocoder_precision="bfloat16-mixed")
    assert mixed.vocoder.precision == "bfloat16-mixed"
    mel = _demo_mel(mixed, 64)  # 1.5 s: bfloat16 is emulated, and slow, in the kernel passes
    voc = mixed.vocoder
    with torch.inference_mode():
        low = voc(mel)[0, 0]
        state, parts = None, []
        for i in range(0, mel.shape[-1], 16):
            audio, state = vocode_stream(voc, mel[:, :, i : i + 16], state, final=i + 16 >= mel.shape[-1])
            parts.append(audio[0])
        streamed = torch.cat(parts)
        voc.set_precision("float32")
        high = voc(mel)[0, 0]
    peak = float(high.abs().max())
    # bfloat16 keeps 8 significant bits: each of the ~36 convolutions it runs rounds its inputs and outputs by up
    # to 2^-9 relative. Measured 47.6 / 47.7 / 47.6 dB SNR to float32 (AVX-512 with AVX512-BF16 / AVX2 / default
    # kernels; 48.6 dB on a whole utterance); rounding to bfloat16 is the same on every CPU (round to nearest
    # even), the float32 sums inside differ by float rounding only: at least 44 dB.
    snr = 20 * np.log10(float(high.pow(2).mean().sqrt()) / float((low - high).pow(2).mean().sqrt()))
    assert snr >= 44.0, snr
    # Streamed vs offline in this mode: float rounding differences of ~1e-6 flip some bfloat16 roundings (2^-9
    # relative), and those flips travel through the later convolutions like the mode's own error (max 0.0056 at
    # a peak of 0.76). Measured 3.8e-3 / 2.8e-3 / 3.2e-3 here (peak 0.75), 4.0e-3 to 4.5e-3 on a whole utterance
    # in calls of 7-100 frames: at most 1 % of the peak. A conv cut at the wrong sample moves whole samples.
    assert streamed.shape == low.shape
    assert float((streamed - low).abs().max()) <= 0.01 * peak


def test_vocoder_precision_warns_where_bfloat16_is_emulated(monkeypatch) -> None:
    from token2wav import cpu

    avx2_only = cpu.CPUInfo("a CPU", "AVX2", ("avx2", "fma"), True, (), 2)
    assert not avx2_only.bf16_in_reach
    assert not cpu.CPUInfo("a CPU", "AVX512", ("avx512_bf16",), True, ("ONEDNN_MAX_CPU_ISA=AVX2",), 2).bf16_in_reach
    monkeypatch.setattr(cpu, "detect_cpu", lambda: avx2_only)
    with pytest.warns(UserWarning, match="without native bfloat16 .* slower than in float32"):
        Token2Wav.from_pretrained("demo", vocoder_precision="bfloat16-mixed")


def test_vocoder_precision_is_checked_before_loading_and_names_what_applies(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"vocoder_precision must be one of \('float32', 'bfloat16-mixed'\)"):
        Token2Wav.from_pretrained(tmp_path / "no-such-model", vocoder_precision="bfloat16")  # no load attempted
    with pytest.raises(ValueError, match="needs dtype=torch.float32"):
        Token2Wav.from_pretrained("demo", dtype=torch.bfloat16, vocoder_precision="bfloat16-mixed")
    with pytest.raises(ValueError, match="applies to HiFi-GAN vocoders .* use 'float32'"):
        Token2Wav.from_pretrained("tiny", vocoder_precision="bfloat16-mixed")
    from token2wav.models.hifigan import HiFiGANGenerator

    with pytest.raises(ValueError, match="vocoder precision must be one of"):
        HiFiGANGenerator(upsample_initial_channel=32).set_precision("float16")
    with pytest.raises(ValueError, match="needs float32 weights"):
        HiFiGANGenerator(upsample_initial_channel=32).to(torch.bfloat16).set_precision("bfloat16-mixed")
    from token2wav.serve.ray.settings import settings_from_options

    with pytest.raises(ValueError, match="--vocoder-precision must be float32 or bfloat16-mixed"):
        settings_from_options({"vocoder_precision": "fast"}, environ={})
