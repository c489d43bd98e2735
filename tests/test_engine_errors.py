"""User-facing validation errors name the parameter and what is allowed; failures leave sessions usable."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from tolerances import SOLVE

from token2wav.presets import PRESETS, describe_presets, resolve_preset
from token2wav.streaming.engine import Prompt, Token2Wav
from token2wav.streaming.session import SessionClosedError


@pytest.fixture(scope="module")
def engine() -> Token2Wav:
    # The bundled toy model (CosyVoice 3 layout, random weights): vocab 512, chunk 25 tokens, lookahead 3.
    return Token2Wav.from_pretrained("tiny", n_timesteps=2)


@pytest.fixture(scope="module")
def prompt() -> Prompt:
    g = np.random.default_rng(0)
    return Prompt(g.integers(0, 512, 10), g.standard_normal((20, 80)).astype(np.float32) - 5,
                  g.standard_normal(192).astype(np.float32))


def tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 512, n)


def test_from_pretrained_properties(engine):
    assert engine.sample_rate == 24000 and engine.token_rate == 25
    assert engine.config.vocab_size == 512 and engine.chunk_tokens == 25
    assert engine.flow is not None and engine.vocoder is not None
    with pytest.raises(FileNotFoundError, match="neither a directory nor a bundled model"):
        Token2Wav.from_pretrained("/nonexistent/model/dir")


def test_token_range_and_type(engine):
    with pytest.raises(ValueError, match=r"tokens\[1\] = 512 is outside the model's vocabulary.*\[0, 512\)"):
        engine.synthesize([3, 512, 4], output="mel")
    with pytest.raises(ValueError, match=r"tokens\[0\] = -1"):
        engine.synthesize([-1], output="mel")
    with pytest.raises(TypeError, match="integer"):
        engine.synthesize([1.5, 2.0], output="mel")
    with pytest.raises(TypeError, match="integer dtype"):
        engine.synthesize(torch.tensor([1.0]), output="mel")
    with pytest.raises(ValueError, match="tokens is empty"):
        engine.synthesize([], output="mel")
    with engine.stream() as s, pytest.raises(ValueError, match=r"outside the model's vocabulary"):
        s.push([1, 2, 9999])


def test_argument_values(engine):
    with pytest.raises(ValueError, match=r"attention must be one of \('full', 'chunk'\)"):
        engine.synthesize([1], attention="causal")
    with pytest.raises(ValueError, match="output must be one of"):
        engine.synthesize([1], output="wav")
    with pytest.raises(ValueError, match=r"mode must be one of cached, recompute, window; got"):
        engine.stream(mode="fast")
    with pytest.raises(ValueError, match="schedule must be one of"):
        engine.stream(schedule="linear")
    with pytest.raises(ValueError, match="preset must be one of"):
        engine.stream(preset="turbo")
    with pytest.raises(ValueError, match="output must be one of"):
        engine.stream(output="wav")
    with pytest.raises(TypeError, match="rng must be"):
        engine.stream(rng="seed")
    with pytest.raises(TypeError, match="prompt must be a token2wav.Prompt"):
        engine.stream(prompt={"tokens": [1]})


def test_hop_errors_name_the_valid_values(engine):
    with pytest.raises(ValueError, match=r"hop=30 tokens is not a multiple of the model's chunk \(25 tokens\)"
                       r".*25, 50, 75"):
        engine.stream(hop=30)
    with pytest.raises(ValueError, match="hop must be >= 1"):
        engine.stream(hop=0)
    with pytest.raises(TypeError, match="hop must be an int"):
        engine.stream(hop=25.0)
    with pytest.raises(ValueError, match=r"max_hop=60 tokens is not a multiple"):
        engine.stream(hop=25, schedule="exponential", max_hop=60)
    with pytest.raises(ValueError, match="max_hop=25 must be >= hop=50"):
        engine.stream(hop=50, schedule="exponential", max_hop=25)
    with pytest.raises(ValueError, match="max_hop only applies to schedule='exponential'"):
        engine.stream(max_hop=100)
    assert engine.stream(hop=50).plan.hop == 50
    s = engine.stream(schedule="exponential")
    assert [s.plan.hop_at(i) for i in range(4)] == [25, 50, 100, 100]  # reference defaults, prompt pad 0


def test_window_arguments(engine):
    with pytest.raises(ValueError, match="mode='window' needs window_frames"):
        engine.stream(mode="window")
    with pytest.raises(ValueError, match="window_frames=30 must be a multiple of the chunk \\(50 frames\\)"):
        engine.stream(mode="window", window_frames=30)
    with pytest.raises(ValueError, match="window_frames must be a positive int"):
        engine.stream(mode="window", window_frames=-50)
    with pytest.raises(ValueError, match="window_frames only applies to mode='window'"):
        engine.stream(window_frames=50)


def test_chunk_size_must_hold_whole_tokens(engine):
    cfg = dataclasses.replace(engine.config, static_chunk_size=49)
    with pytest.raises(ValueError, match=r"static_chunk_size=49 .* token_mel_ratio=2.*\[46, 48, 50, 52\]"):
        Token2Wav(engine.flow, engine.vocoder, cfg)


def test_lookahead_must_be_the_trained_one_unless_supported(engine):
    with pytest.raises(ValueError, match=r"pre_lookahead_len=2 is not supported by this model: allowed 3"):
        engine.stream(pre_lookahead_len=2)
    assert engine.stream(pre_lookahead_len=3).plan.lookahead == 3
    flexible = Token2Wav(engine.flow, engine.vocoder,
                         dataclasses.replace(engine.config, supported_pre_lookahead=(1, 3)), n_timesteps=2)
    assert flexible.stream(pre_lookahead_len=2).plan.lookahead == 2
    with pytest.raises(ValueError, match=r"allowed 1\.\.3"):
        flexible.stream(pre_lookahead_len=5)
    with pytest.raises(ValueError, match="mode='recompute' is the reference algorithm, trained chunk and lookahead "
                                         "only: leave pre_lookahead_len out"):
        flexible.stream(pre_lookahead_len=2, mode="recompute")


def test_dynamic_chunk_models_accept_other_hops(engine):
    dyn = Token2Wav(engine.flow, None, dataclasses.replace(engine.config, supported_chunk_tokens=(5, 25)),
                    n_timesteps=2)
    with pytest.raises(ValueError, match=r"mode='recompute' is the reference algorithm, trained chunk and lookahead "
                                         r"only: hop=7 is a dynamic chunk of this model; use a multiple of the "
                                         r"trained chunk \(25 tokens\)"):
        dyn.stream(hop=7, mode="recompute")
    with pytest.raises(ValueError, match=r"^hop=3 tokens: this model takes any hop in 5\.\.25 tokens \(a dynamic "
                                         r"chunk\), or a multiple of its trained chunk \(25 tokens: 25, 50, 75, "
                                         r"\.\.\.\)$"):
        dyn.stream(hop=3)
    ids = tokens(23)
    with dyn.stream(hop=10, output="mel") as s:
        outs = [o for i in range(0, 23, 4) for o in s.push(ids[i : i + 4])] + [s.finish()]
    # The session decodes with a 10-token (20-frame) chunk: equal to the offline decode with that chunk.
    with torch.inference_mode():
        p = dyn.prepare_prompt(None)
        want = dyn.flow.inference(torch.as_tensor(ids)[None], p.tokens, p.feat, p.embedding, streaming=True,
                                  finalize=True, n_timesteps=2, chunk_size=20)[0].numpy()
    assert np.abs(np.concatenate(outs, axis=1) - want).max() <= SOLVE  # a flow solve, streamed vs offline mel
    assert dyn.preset("assistant").hop == 5


def test_session_lifecycle_errors(engine):
    s = engine.stream(output="mel")
    with pytest.raises(ValueError, match="finish\\(\\) called before any token was pushed"):
        s.finish()
    s.push(tokens(5))
    s.finish()
    assert s.finished
    with pytest.raises(SessionClosedError, match="push\\(\\) after finish\\(\\)"):
        s.push([1])
    with pytest.raises(SessionClosedError, match="finish\\(\\) after finish\\(\\)"):
        s.finish()
    with engine.stream() as s2:
        pass
    assert s2.closed
    with pytest.raises(SessionClosedError, match="push\\(\\) on a closed session"):
        s2.push([1])
    s2.close()  # idempotent


def test_failed_push_leaves_the_session_usable(engine, prompt, monkeypatch):
    ids = tokens(100)
    clean = []
    with engine.stream(prompt, output="mel") as s:
        clean += s.push(ids[:5])
        clean += s.push(ids[5:])
        clean.append(s.finish())
    assert len(clean) == 4  # three chunks in the second push, then the tail

    s = engine.stream(prompt, output="mel")
    got = s.push(ids[:5])
    with pytest.raises(ValueError):
        s.push([*ids[5:40].tolist(), 10_000])  # an invalid id: rejected before anything changes
    assert s.tokens_received == 5
    # A failure inside the model in the middle of a push (after one of its three chunks was decoded) is
    # rolled back as well: the session is as before the push, and retrying gives the clean result.
    calls = {"n": 0}

    def flaky(real):
        def step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated failure")
            return real(self, *args, **kwargs)
        return step

    for method in ("stream_step", "stream_step_rows"):  # a session alone steps on pages: stream_step_rows
        monkeypatch.setattr(type(engine.flow), method, flaky(getattr(type(engine.flow), method)))
    with pytest.raises(RuntimeError, match="simulated failure"):
        s.push(ids[5:])
    monkeypatch.undo()
    assert s.tokens_received == 5 and s.tokens_emitted == 0
    got += s.push(ids[5:])
    got.append(s.finish())
    assert len(got) == len(clean)
    for a, b in zip(got, clean):
        np.testing.assert_array_equal(a, b)  # the same chunk calls as the clean run: same kernels and shapes


def test_prompt_validation(engine):
    g = np.random.default_rng(5)
    emb = g.standard_normal(192).astype(np.float32)
    with pytest.raises(ValueError, match=r"Prompt.mel must be \[frames, mel_dim\]"):
        Prompt([1, 2], np.zeros(80, np.float32), emb)
    with pytest.raises(ValueError, match=r"Prompt.mel must be \[frames, 80\] for this model"):
        engine.stream(Prompt([1, 2], np.zeros((4, 40), np.float32), emb))
    with pytest.raises(ValueError, match="Prompt.embedding must have 192 values"):
        engine.stream(Prompt([1, 2], np.zeros((4, 80), np.float32), emb[:100]))
    with pytest.raises(ValueError, match=r"Prompt.tokens\[1\] = 600 is outside"):
        engine.stream(Prompt([1, 600], np.zeros((4, 80), np.float32), emb))
    with pytest.raises(ValueError, match="must be finite"):
        Prompt([1], np.full((2, 80), np.nan, np.float32), emb)
    with pytest.raises(TypeError, match="integer token ids"):
        Prompt([1.5], np.zeros((2, 80), np.float32), emb)
    # One frame too many (a common feature-extractor off-by-one): trimmed like the reference, with a warning.
    mel = g.standard_normal((41, 80)).astype(np.float32)
    with pytest.warns(UserWarning, match="trimmed to 20 tokens and 40 frames"):
        p = engine.prepare_prompt(Prompt(tokens(20), mel, emb))
    assert p.tokens.shape == (1, 20) and p.feat.shape == (1, 40, 80)
    with pytest.warns(UserWarning, match="trimmed to 19 tokens and 38 frames"):
        engine.prepare_prompt(Prompt(tokens(20), mel[:39], emb))
    with pytest.raises(ValueError, match="prompt mel has 10 frames but its 20 tokens need 40"):
        engine.prepare_prompt(Prompt(tokens(20), mel[:10], emb))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.prepare_prompt(Prompt(tokens(20), mel[:40], emb))  # exact: no warning


def test_presets_resolve_to_valid_values(engine):
    cfg = engine.config
    table = describe_presets(cfg)
    for name in PRESETS:
        s = resolve_preset(name, cfg)
        assert s.hop % engine.chunk_tokens == 0 and s.max_hop % engine.chunk_tokens == 0
        assert name in table
        session = engine.stream(preset=name, output="mel")
        assert session.plan.hop == s.hop and session.plan.max_hop == s.max_hop
    assert resolve_preset("balanced", cfg).hop == 25 and resolve_preset("balanced", cfg).max_hop == 100
    assert resolve_preset("quality", cfg).hop > resolve_preset("balanced", cfg).hop
    assert resolve_preset("constrained", cfg).quantize
    # Explicit arguments win over the preset.
    assert engine.stream(preset="quality", hop=25, output="mel").plan.hop == 25
    assert engine.stream(preset="balanced", schedule="fixed", output="mel").plan.max_hop is None


def test_constrained_preset_quantizes_a_copy_once(engine, prompt):
    ids = tokens(40)
    first = engine.quantized_flow()
    assert engine.quantized_flow() is first and first is not engine.flow
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in first.modules())
    assert not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in engine.flow.modules())
    with engine.stream(prompt, preset="constrained", output="mel") as s:
        mel = np.concatenate(s.push(ids) + [s.finish()], axis=1)
    with engine.stream(prompt, preset="balanced", output="mel") as s:
        ref = np.concatenate(s.push(ids) + [s.finish()], axis=1)
    dev = float(np.abs(mel - ref).max())
    assert mel.shape == ref.shape and np.isfinite(mel).all()
    assert 0 < dev < 0.5 * float(np.abs(ref).max())


def test_a_device_this_torch_cannot_use_is_named_before_loading():
    # a CPU build asked for CUDA raised "Torch not compiled with CUDA enabled" (AssertionError) inside loading
    beyond = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: unavailable on every machine
    with pytest.raises(ValueError, match=rf"^device='{beyond}' is not available to this torch \("):
        Token2Wav.from_pretrained("tiny", device=beyond)
    with pytest.raises(ValueError, match=r"^device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                                         r"got 'tpu'$"):
        Token2Wav.from_pretrained("tiny", device="tpu")
