"""Cached streaming equals the chunk-causal offline decode at every chunk.

Small random CosyVoice 3 models are built here from a config written in the reference's YAML format, with
token_mel_ratio 2 and 3 and pre_lookahead_len 3 and 5, and streamed with fixed and exponential schedules,
prompts whose length is and is not a multiple of the chunk, and several push sizes (one token at a time
included).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tolerances import NETWORK, SOLVE, sine_source_audio

from token2wav.config import read_config
from token2wav.loading import build_flow, build_vocoder
from token2wav.streaming.engine import Prompt, Token2Wav
from token2wav.streaming.schedule import HopPlan, plan_stream, prompt_pad

# Streamed cached chunks vs the chunk-causal offline decode: a flow solve re-associated (tests/tolerances.py);
# measured below ~1e-6. Audio: the HiFT's phase integrates that over the stream (sine_source_audio).
MEL_TOL = SOLVE
SR = 24000

TEMPLATE = """
sample_rate: 24000
spk_embed_dim: 192
token_frame_rate: 25
token_mel_ratio: {ratio}
chunk_size: {chunk}
num_decoding_left_chunks: -1
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 100
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: {look}
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: 32
        pre_lookahead_len: {look}
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: 32
            depth: 2
            heads: 2
            dim_head: 16
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>
hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: 16
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16
"""


def tiny_engine(tmp_dir, *, ratio: int = 2, chunk: int = 4, look: int = 3, seed: int = 0,
                vocoder: bool = True, n_timesteps: int = 3) -> Token2Wav:
    """A random CosyVoice 3 model at toy size (chunk in tokens)."""
    path = tmp_dir / f"cv3_r{ratio}_c{chunk}_l{look}.yaml"
    path.write_text(TEMPLATE.format(ratio=ratio, chunk=chunk, look=look))
    cfg = read_config(path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        flow = build_flow(cfg, device="cpu")
        voc = build_vocoder(cfg, device="cpu") if vocoder else None
    if voc is not None and hasattr(voc, "set_source_noise"):
        voc.set_source_noise(seed)
    return Token2Wav(flow, voc, cfg, n_timesteps=n_timesteps)


def random_prompt(engine: Token2Wav, n_tokens: int, seed: int = 1) -> Prompt:
    g = np.random.default_rng(seed)
    cfg = engine.config
    return Prompt(
        tokens=g.integers(0, cfg.vocab_size, n_tokens),
        mel=(g.standard_normal((n_tokens * cfg.token_mel_ratio, 80)) * 2 - 5).astype(np.float32),
        embedding=g.standard_normal(192).astype(np.float32),
    )


def random_tokens(engine: Token2Wav, n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, engine.config.vocab_size, n)


def run_stream(engine, prompt, tokens, push: int, **kwargs) -> list[np.ndarray]:
    outs = []
    with engine.stream(prompt, **kwargs) as s:
        for i in range(0, len(tokens), push):
            outs.extend(s.push(tokens[i : i + push]))
        outs.append(s.finish())
    return outs


def expected_frames(engine, prompt_tokens: int, n: int, push: int, **kwargs) -> list[int]:
    """Mel frames per chunk that the schedule module predicts for this stream."""
    cfg = engine.config
    chunk = engine.chunk_tokens
    hop = kwargs.get("hop") or chunk
    sched = kwargs.get("schedule") or "fixed"
    max_hop = kwargs.get("max_hop") or (4 * chunk if sched == "exponential" else None)
    plan = HopPlan(hop, prompt_pad(prompt_tokens, chunk), cfg.pre_lookahead_len, sched, max_hop)
    pushes = [min(push, n - i) for i in range(0, n, push)]
    return [(e.end - e.start) * cfg.token_mel_ratio for e in plan_stream(plan, pushes)]


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cfg")


# (ratio, chunk tokens, lookahead, prompt tokens, target tokens)
CASES = [
    (2, 4, 3, 8, 37),  # prompt a multiple of the chunk
    (2, 4, 3, 7, 37),  # prompt not a multiple
    (3, 4, 5, 5, 29),  # ratio 3, lookahead 5
    (3, 3, 3, 9, 26),  # ratio 3, prompt a multiple
    (2, 4, 5, 10, 31),  # lookahead 5, prompt not a multiple
]


@pytest.mark.parametrize("ratio,chunk,look,n_prompt,n", CASES)
def test_cached_mel_equals_chunk_causal_offline(tmp_dir, ratio, chunk, look, n_prompt, n):
    engine = tiny_engine(tmp_dir, ratio=ratio, chunk=chunk, look=look, vocoder=False)
    prompt = random_prompt(engine, n_prompt)
    tokens = random_tokens(engine, n)
    offline = engine.synthesize(tokens, prompt, attention="chunk", output="mel")
    assert offline.shape == (80, n * ratio)
    for schedule in ("fixed", "exponential"):
        for push in (1, 5, n):
            outs = run_stream(engine, prompt, tokens, push, schedule=schedule, output="mel")
            sizes = [o.shape[1] for o in outs]
            assert sizes == expected_frames(engine, n_prompt, n, push, schedule=schedule)
            start = 0
            for k, o in enumerate(outs):
                want = offline[:, start : start + o.shape[1]]
                diff = float(np.abs(o - want).max()) if o.size else 0.0
                assert diff <= MEL_TOL, (schedule, push, k, diff)
                start += o.shape[1]
            assert start == offline.shape[1]


def test_adaptive_hops_keep_the_mel_equal_to_offline(tmp_dir):
    """Whatever hops the listener's clock chooses (small with no slack, up to max_hop with a long start buffer),
    the cached chunks are the chunk-causal offline decode."""
    engine = tiny_engine(tmp_dir, vocoder=False)
    prompt = random_prompt(engine, 7)
    tokens = random_tokens(engine, 61)
    offline = engine.synthesize(tokens, prompt, attention="chunk", output="mel")
    hop_sets = []
    for buffer_ms in (0, 60_000):
        for push in (1, 6, 61):
            with engine.stream(prompt, schedule="adaptive", start_buffer_ms=buffer_ms, output="mel") as s:
                outs = [o for i in range(0, 61, push) for o in s.push(tokens[i : i + push])] + [s.finish()]
                frames = list(s.state.chunk_frames)
            mel = np.concatenate(outs, axis=1)
            assert mel.shape == offline.shape and np.abs(mel - offline).max() <= MEL_TOL, (buffer_ms, push)
            hop_sets.append(frames)
    chunk_frames = engine.chunk_tokens * engine.config.token_mel_ratio
    assert all(f % chunk_frames == 0 for frames in hop_sets for f in frames[1:-1])  # whole chunks
    assert max(max(f[1:-1], default=0) for f in hop_sets[3:]) > chunk_frames  # slack: hops grew


def test_the_token_rate_is_measured_from_arrival_times(tmp_dir):
    """A caller that queues tokens while chunks are computed (the server) passes their arrival times: the rate the
    schedule plans with is the producer's (here 25 tokens per second), not the rhythm of the pushes (here all at
    once). Without them, the pushes' own times count."""
    engine = tiny_engine(tmp_dir, vocoder=False)
    tokens = random_tokens(engine, 40)
    t0 = time.perf_counter() - 2.0  # the tokens arrived over the last 1.6 s, one every 40 ms
    with engine.stream(None, schedule="adaptive", output="mel") as s:
        for i in range(40):
            s.push(tokens[i : i + 1], arrived_at=t0 + 0.04 * i)
        assert s.arrivals.rate == pytest.approx(25.0)
        with pytest.raises(ValueError, match="arrived_at must be a time.perf_counter"):
            s.push(tokens[:1], arrived_at=float("nan"))
    with engine.stream(None, schedule="adaptive", output="mel") as s:
        s.push(tokens[:1])
        time.sleep(0.25)
        s.push(tokens[1:21])
        assert s.arrivals.rate == pytest.approx(20 / 0.25, rel=0.3)


def test_no_prompt_and_larger_hops(tmp_dir):
    engine = tiny_engine(tmp_dir, vocoder=False)
    tokens = random_tokens(engine, 41)
    offline = engine.synthesize(tokens, None, attention="chunk", output="mel")
    for kwargs in ({"hop": 8}, {"hop": 4, "schedule": "exponential", "max_hop": 8}, {"preset": "quality"}):
        mel = np.concatenate(run_stream(engine, None, tokens, 3, output="mel", **kwargs), axis=1)
        assert np.abs(mel - offline).max() <= MEL_TOL, kwargs


def test_prompt_cache_is_shared_and_bounded(tmp_dir):
    engine = tiny_engine(tmp_dir, vocoder=False)
    engine.prompt_cache.maxsize = 2
    prompts = [random_prompt(engine, 8, seed=s) for s in range(3)]
    tokens = random_tokens(engine, 12)
    first = np.concatenate(run_stream(engine, prompts[0], tokens, 12, output="mel"), axis=1)
    assert engine.prompt_cache.misses == 1
    again = np.concatenate(run_stream(engine, prompts[0], tokens, 4, output="mel"), axis=1)
    assert engine.prompt_cache.hits == 1 and engine.prompt_cache.misses == 1
    # the shared state was not modified by the first session: the same chunk calls on the same shapes (chunks
    # follow the hop plan, not the push sizes), same kernels, one process
    np.testing.assert_array_equal(first, again)
    # An equal prompt built from other objects hits the same entry (content hash).
    clone = Prompt(prompts[0].tokens.clone(), prompts[0].mel.clone(), prompts[0].embedding.clone())
    run_stream(engine, clone, tokens, 12, output="mel")
    assert engine.prompt_cache.hits == 2
    for p in prompts[1:]:
        run_stream(engine, p, tokens, 12, output="mel")
    assert len(engine.prompt_cache) == 2  # LRU bound


def test_window_mode_deviation(tmp_dir, capsys):
    """Window mode is exact while nothing is dropped, and an approximation after; report the deviation."""
    engine = tiny_engine(tmp_dir, vocoder=False)
    prompt = random_prompt(engine, 7)
    tokens = random_tokens(engine, 80)
    offline = engine.synthesize(tokens, prompt, attention="chunk", output="mel")
    chunk_frames = engine.chunk_tokens * engine.config.token_mel_ratio
    big = np.concatenate(
        run_stream(engine, prompt, tokens, 80, output="mel", mode="window", window_frames=200 * chunk_frames),
        axis=1,
    )
    assert np.abs(big - offline).max() <= MEL_TOL
    report = []
    for chunks in (1, 2, 4, 8):
        frames = chunks * chunk_frames
        mel = np.concatenate(
            run_stream(engine, prompt, tokens, 80, output="mel", mode="window", window_frames=frames), axis=1
        )
        assert mel.shape == offline.shape and np.isfinite(mel).all()
        dev = float(np.abs(mel - offline).max())
        report.append((chunks, dev))
    with capsys.disabled():
        print("\nwindow mode: max |mel - chunk-causal offline| by window (chunks):",
              ", ".join(f"{c}: {d:.3g}" for c, d in report))
    # Dropping context changes the output, and the change shrinks as the window grows.
    assert report[0][1] > MEL_TOL
    assert report[-1][1] <= report[0][1]


@pytest.mark.parametrize("schedule", ["fixed", "exponential", "adaptive"])
def test_cached_audio_equals_offline_chunk_causal_audio(tmp_dir, schedule):
    pytest.importorskip("token2wav.models.hift")
    engine = tiny_engine(tmp_dir)
    prompt = random_prompt(engine, 7)
    tokens = random_tokens(engine, 45)
    offline = engine.synthesize(tokens, prompt, attention="chunk")
    for push in (1, 7):
        outs = run_stream(engine, prompt, tokens, push, schedule=schedule)
        audio = np.concatenate(outs)
        assert audio.shape == offline.shape
        start, peak = 0, float(np.abs(offline).max())
        for k, o in enumerate(outs):
            diff = float(np.abs(o - offline[start : start + o.size]).max()) if o.size else 0.0
            start += o.size
            assert diff <= sine_source_audio(peak, start / SR), (push, k, diff)


def test_window_mode_is_exactly_windowed_attention(tmp_dir, monkeypatch):
    """With one chunk per call, window mode equals an offline chunk-causal decode whose mask also hides
    every key older than ``window_frames`` before the row's chunk, except the prompt's chunks: this checks
    the cache trimming, the re-rotated keys and the absolute noise positions together."""
    import token2wav.models.dit as dit
    from token2wav.masks import fill_empty_rows, make_chunk_mask

    engine = tiny_engine(tmp_dir, vocoder=False)
    prompt = random_prompt(engine, 7)
    tokens = random_tokens(engine, 60)
    chunk = engine.chunk_tokens * engine.config.token_mel_ratio
    head = -(-7 * engine.config.token_mel_ratio // chunk) * chunk
    window = 2 * chunk
    outs = run_stream(engine, prompt, tokens, 1, output="mel", mode="window", window_frames=window)
    streamed = np.concatenate(outs, axis=1)

    def windowed(valid, chunk_size, num_left_chunks=-1):
        size = valid.shape[-1]
        causal = make_chunk_mask(size, chunk_size, -1, device=valid.device)
        recent = make_chunk_mask(size, chunk_size, window // chunk_size, device=valid.device)
        in_head = torch.arange(size, device=valid.device).unsqueeze(0) < head
        return fill_empty_rows(valid & (recent | (causal & in_head)).unsqueeze(0))

    monkeypatch.setattr(dit, "add_chunk_mask", windowed)
    reference = engine.synthesize(tokens, prompt, attention="chunk", output="mel")
    monkeypatch.undo()
    plain = engine.synthesize(tokens, prompt, attention="chunk", output="mel")
    assert np.abs(streamed - reference).max() <= MEL_TOL
    assert np.abs(streamed - plain).max() > MEL_TOL  # the window did drop context


def test_window_mode_appends_into_the_room_its_trim_left(tmp_dir):
    # After a trim, the kept keys sit in a store with room for the next chunk: that chunk is written in place.
    engine = tiny_engine(tmp_dir, vocoder=False)
    chunk = engine.chunk_tokens
    with engine.stream(random_prompt(engine, 7), mode="window", output="mel",
                       window_frames=2 * chunk * engine.config.token_mel_ratio) as session:
        tokens = random_tokens(engine, 8 * chunk)
        session.push(tokens[: 5 * chunk])  # the window is full and trimmed from now on
        before = session.state.flow_state.cache.steps[0]
        session.push(tokens[5 * chunk : 6 * chunk])
        after = session.state.flow_state.cache.steps[0]
    assert after.keys[0].shape[2] == before.keys[0].shape[2]  # bounded: one chunk in, one chunk out
    old_store, _ = before.stores[0]
    assert old_store is not None and old_store.data.shape[2] > before.keys[0].shape[2]  # room was left
    assert old_store.length > before.keys[0].shape[2]  # and the next chunk was written into it


def test_cv2_cached_mel_and_crossfaded_audio(capsys):
    """CosyVoice 2 (fixture model): cached mel equals the chunk-causal decode; the audio goes through the
    reference's HiFT hand-over (8 mel frames of context, source carried over, Hamming cross-fade), so it is
    *not* the offline audio: the vocoder draws fresh noise every call and each seam is a blend."""
    from pathlib import Path

    from safetensors.torch import load_file

    from token2wav.loading import load_flow, load_vocoder

    data_dir = Path(__file__).resolve().parent / "data"
    cfg_path = data_dir / "cv2_config.yaml"
    engine = Token2Wav(
        load_flow(cfg_path, data_dir / "cv2_flow_state.safetensors"),
        load_vocoder(cfg_path, data_dir / "cv2_hift_state.safetensors"),
        read_config(cfg_path),
    )
    d = load_file(str(data_dir / "cv2_token2wav.safetensors"))
    prompt = Prompt(d["prompt_token"], d["prompt_feat"], d["embedding"])
    ids = d["token"][0]
    chunk_mel = engine.synthesize(ids, prompt, attention="chunk", output="mel")
    mels, audio = [], []
    with engine.stream(prompt, schedule="exponential", rng=1) as s:
        for i in range(0, len(ids), 9):
            for out in s.push(ids[i : i + 9]):
                audio.append(out)
                mels.append(s.last_mel)
        audio.append(s.finish())
        mels.append(s.last_mel)
    start = 0
    for k, m in enumerate(mels):
        assert np.abs(m - chunk_mel[:, start : start + m.shape[1]]).max() <= MEL_TOL, k
        start += m.shape[1]
    streamed = np.concatenate(audio)
    offline = engine.vocode(torch.from_numpy(chunk_mel), rng=1)
    assert streamed.shape == offline.shape and np.isfinite(streamed).all()
    dev = float(np.abs(streamed - offline).max())
    with capsys.disabled():
        print(f"\nCV2 cached audio vs offline chunk-causal audio: max |diff| {dev:.3g} "
              f"(|audio| max {np.abs(offline).max():.3g}; random source per call + cross-fades)")
    assert dev > sine_source_audio(float(np.abs(offline).max()), len(offline) / SR)  # not float rounding


def test_hifigan_vocoder_streams_like_offline(tmp_dir):
    """Our own format's HiFi-GAN vocoder (the demo voice) is streamed with its carried-state vocode_stream."""
    from token2wav.models.hifigan import HiFiGANGenerator

    base = tiny_engine(tmp_dir, vocoder=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gen = HiFiGANGenerator(upsample_rates=(8, 8, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4),
                               upsample_initial_channel=32, sampling_rate=24000).eval()
    engine = Token2Wav(base.flow, gen, base.config, n_timesteps=3)
    assert engine.vocoder_kind == "hifigan"
    prompt = random_prompt(engine, 7)
    tokens = random_tokens(engine, 45)
    offline = engine.synthesize(tokens, prompt, attention="chunk")
    for push in (1, 7):
        audio = np.concatenate(run_stream(engine, prompt, tokens, push, schedule="exponential"))
        assert audio.shape == offline.shape
        # no harmonic source: one network pass on windows of other lengths on each side (tests/tolerances.py)
        assert np.abs(audio - offline).max() <= NETWORK * max(1.0, float(np.abs(offline).max()))


def _stream_until_delivered(s, tokens, i, chunk):
    """Push a chunk of tokens at a time from ``i`` until the session delivers audio; returns the next ``i``."""
    delivered = s.playback.audio_s
    while s.playback.audio_s == delivered and i < len(tokens):
        s.push(tokens[i : i + chunk])
        i += chunk
    return i


def test_the_start_buffer_follows_the_recommendation_until_playback_starts(tmp_dir):
    """A cold meter (spread not yet measured) recommends the 10 s cap here. Once chunks measure fast, the next
    chunk that leaves while the listener is still buffering brings the recommendation (and the session's own
    playback start) down. A recommendation adopted from a measured meter is not lowered; once playing, or with
    an explicit buffer, nothing moves."""
    engine = tiny_engine(tmp_dir, vocoder=False)
    tokens = random_tokens(engine, 600)
    chunk = engine.chunk_tokens
    with engine.batcher(workers=0) as batcher:
        meter = batcher.compute
        for _ in range(2):
            meter.observe(chunk, 100.0)  # far slower than real time, too few chunks to be "measured"
        assert not meter.measured
        with batcher.stream(schedule="adaptive", output="mel") as s:
            i = _stream_until_delivered(s, tokens, 0, chunk)
            first_at = s.playback.first_at
            assert s.start_buffer_s == pytest.approx(10.0)
            for _ in range(meter.window):
                meter.observe(chunk, 1e-4)  # now measured, and far faster than real time
            i = _stream_until_delivered(s, tokens, i, chunk)
            assert s.start_buffer_s < 1.0, s.start_buffer_s
            assert s.playback.play_start < first_at + 1.0
            playing = s.start_buffer_s
            while s.playback.buffering(time.perf_counter()):
                time.sleep(0.01)
            for _ in range(meter.window):
                meter.observe(chunk, 100.0)
            _stream_until_delivered(s, tokens, i, chunk)
            assert s.start_buffer_s == playing  # playing already: a later recommendation changes nothing
        assert meter.measured  # a warm meter's recommendation (the cap again) is adopted and kept
        with batcher.stream(schedule="adaptive", output="mel") as s:
            i = _stream_until_delivered(s, tokens, 0, chunk)
            assert s.start_buffer_s == pytest.approx(10.0)
            for _ in range(meter.window):
                meter.observe(chunk, 1e-4)
            _stream_until_delivered(s, tokens, i, chunk)
            assert s.playback.buffering(time.perf_counter()) and s.start_buffer_s == pytest.approx(10.0)
        with batcher.stream(schedule="adaptive", output="mel", start_buffer_ms=300) as s:
            _stream_until_delivered(s, tokens, 0, chunk)
            assert s.start_buffer_s == pytest.approx(0.3)
