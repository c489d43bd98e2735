"""One loaded model, many sessions from many threads: every session's output equals running it alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from token2wav.config import read_config
from token2wav.loading import build_flow, build_vocoder
from token2wav.streaming.engine import Prompt, Token2Wav

N_THREADS = 3
SESSIONS_PER_THREAD = 2

CONFIG = """
sample_rate: 24000
spk_embed_dim: 192
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 4
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    vocab_size: 64
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: 32
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.7
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: 32
            depth: 1
            heads: 2
            dim_head: 16
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
hift: !new:cosyvoice.hifigan.generator.{vocoder}
    in_channels: 80
    base_channels: 8
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    {extra}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.{f0}
        num_class: 1
        in_channels: 80
        cond_channels: 8
"""


def _engine(tmp_path, causal: bool) -> Token2Wav:
    text = CONFIG.format(
        vocoder="CausalHiFTGenerator" if causal else "HiFTGenerator",
        f0="CausalConvRNNF0Predictor" if causal else "ConvRNNF0Predictor",
        extra="conv_pre_look_right: 4" if causal else "",
    )
    path = tmp_path / f"model_{causal}.yaml"
    path.write_text(text)
    cfg = read_config(path)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        flow = build_flow(cfg, device="cpu")
        vocoder = build_vocoder(cfg, device="cpu")
    if causal:
        vocoder.set_source_noise(11)
    return Token2Wav(flow, vocoder, cfg, n_timesteps=2)


def _prompt(seed: int, n: int) -> Prompt:
    g = np.random.default_rng(seed)
    return Prompt(g.integers(0, 64, n), g.standard_normal((2 * n, 80)).astype(np.float32) - 4,
                  g.standard_normal(192).astype(np.float32))


def _job(i: int) -> dict:
    """Session i: its own prompt (two sessions share each prompt), tokens, push size, mode and schedule."""
    g = np.random.default_rng(100 + i)
    return {
        "prompt": i // 2,
        "tokens": g.integers(0, 64, 14 + 2 * i),
        "push": 1 + i % 3,
        "kwargs": {
            "mode": ("cached", "recompute", "window")[i % 3],
            "schedule": ("fixed", "exponential")[i % 2],
            "rng": i,
            **({"window_frames": 8} if i % 3 == 2 else {}),
        },
    }


def _run(engine: Token2Wav, prompts: list[Prompt], job: dict) -> list[np.ndarray]:
    outs = []
    with engine.stream(prompts[job["prompt"]], **job["kwargs"]) as s:
        toks, step = job["tokens"], job["push"]
        for j in range(0, len(toks), step):
            outs.extend(s.push(toks[j : j + step]))
        outs.append(s.finish())
    return outs


@pytest.mark.parametrize("causal", [True, False], ids=["causal-vocoder", "crossfade-vocoder"])
def test_threads_equal_single_runs(tmp_path, causal):
    engine = _engine(tmp_path, causal)
    n = N_THREADS * SESSIONS_PER_THREAD
    jobs = [_job(i) for i in range(n)]
    prompts = [_prompt(s, 5 + s) for s in range((n + 1) // 2)]
    alone = [_run(engine, prompts, job) for job in jobs]

    engine.prompt_cache.clear()  # make the threads race to build the shared prompt states
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(N_THREADS)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            # Interleave: each thread advances its sessions in turns, so sessions overlap in time.
            mine = list(range(t, n, N_THREADS))
            for i in mine:
                results[i] = _run(engine, prompts, jobs[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i in range(n):
        assert len(results[i]) == len(alone[i])
        for a, b in zip(results[i], alone[i]):
            # the same calls on the same shapes in one process (each call keeps torch's intra-op thread count):
            # bit for bit, so that any state shared between threads would show
            np.testing.assert_array_equal(a, b)


def test_interleaved_sessions_in_one_thread(tmp_path):
    """Sessions advanced alternately (push A, push B, ...) do not see each other's state."""
    engine = _engine(tmp_path, causal=True)
    prompts = [_prompt(0, 6), _prompt(1, 9)]
    toks = [np.random.default_rng(7).integers(0, 64, 16), np.random.default_rng(8).integers(0, 64, 16)]
    alone = [_run(engine, prompts, {"prompt": i, "tokens": toks[i], "push": 2, "kwargs": {}}) for i in (0, 1)]
    sessions = [engine.stream(prompts[i]) for i in (0, 1)]
    got: list[list[np.ndarray]] = [[], []]
    for j in range(0, 16, 2):
        for i in (0, 1):
            got[i].extend(sessions[i].push(toks[i][j : j + 2]))
    for i in (0, 1):
        got[i].append(sessions[i].finish())
        sessions[i].close()
        for a, b in zip(got[i], alone[i]):
            np.testing.assert_array_equal(a, b)  # the same calls on the same shapes, one process
