"""Per-chunk cost of cached streaming vs the reference's recompute, over one long stream.

    python benchmarks/cached_vs_recompute.py [--seconds 30] [--hop 25] [--family cv3] [--output audio]

Builds the mid-size variant of the real CosyVoice 3 (or 2) architecture with random weights (speed does not
depend on the weights), streams ``--seconds`` of tokens after a 3 s prompt with a fixed hop, and times every
chunk of a ``cached``, a ``window`` and a ``recompute`` session fed the same tokens. A cached session's
chunk time stays nearly flat (only attention to the cached keys grows with the stream); window mode bounds
even that; recompute re-runs the flow (and, for CosyVoice 3, the vocoder) over the whole prefix, so its
chunk time grows with the chunk index.

Measured 2026-11-24 on the shared 2-core CPU box (2 threads, quiet moment), cv3 mid-size, hop 25, mel only:
per chunk cached 216 -> 285 ms (first / last five chunks, x1.32), window (8 chunks) 192 -> 240 ms (x1.25),
recompute 726 -> 4375 ms (x6.0); totals 8.0 s / 7.1 s / 72.3 s for 30 s of audio. Under load from other
processes the same run gave 3-10x larger and erratic numbers: compare runs taken at the same time only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from token2wav.bench import build_engine
from token2wav.streaming.engine import Prompt


def _workload(engine, seconds: float, prompt_seconds: float, seed: int) -> tuple[Prompt, np.ndarray]:
    cfg = engine.config
    g = np.random.default_rng(seed)
    n_prompt = int(round(prompt_seconds * cfg.token_rate))
    prompt = Prompt(
        g.integers(0, cfg.vocab_size, n_prompt),
        (g.standard_normal((n_prompt * cfg.token_mel_ratio, cfg.mel_dim)) - 5).astype(np.float32),
        g.standard_normal(cfg.spk_embed_dim).astype(np.float32),
    )
    return prompt, g.integers(0, cfg.vocab_size, int(round(seconds * cfg.token_rate)))


def time_stream(engine, prompt: Prompt, tokens: np.ndarray, mode: str, hop: int, output: str,
                window_frames: int | None = None) -> list[float]:
    """Milliseconds spent in each push that produced a chunk, then in finish()."""
    times = []
    extra = {"window_frames": window_frames} if mode == "window" else {}
    with engine.stream(prompt, mode=mode, hop=hop, schedule="fixed", output=output, **extra) as s:
        for i in range(0, len(tokens), hop):
            t0 = time.perf_counter()
            out = s.push(tokens[i : i + hop])
            dt = (time.perf_counter() - t0) * 1e3
            if out:
                times.append(dt)
        t0 = time.perf_counter()
        s.finish()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hop", type=int, default=None, help="tokens per chunk (default: one model chunk)")
    parser.add_argument("--family", choices=["cv3", "cv2"], default="cv3")
    parser.add_argument("--output", choices=["audio", "mel"], default="mel",
                        help="mel times the flow only; audio adds the vocoder (recompute re-vocodes everything)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--window-chunks", type=int, default=8, help="window mode: attention cache in chunks")
    parser.add_argument("--json", default=None, help="also write the timings here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = build_engine(args.family, quick=True, device="cpu", dtype=torch.float32)
    hop = args.hop or engine.chunk_tokens
    prompt, tokens = _workload(engine, args.seconds, 3.0, seed=0)
    # The first pass through new tensor shapes is slow (allocator, kernel selection): warm up on the same
    # workload once, with a fresh prompt state, so the timed runs show steady-state cost.
    time_stream(engine, prompt, tokens, "cached", hop, args.output)
    time_stream(engine, prompt, tokens[: 4 * hop], "recompute", hop, args.output)
    engine.prompt_cache.clear()

    window_frames = args.window_chunks * engine.config.static_chunk_size
    cached = time_stream(engine, prompt, tokens, "cached", hop, args.output)
    window = time_stream(engine, prompt, tokens, "window", hop, args.output, window_frames)
    recompute = time_stream(engine, prompt, tokens, "recompute", hop, args.output)

    print(f"{args.family} mid-size, {args.seconds:g} s stream after a 3 s prompt, hop {hop} tokens "
          f"({hop / engine.token_rate:.2f} s), output={args.output}, {torch.get_num_threads()} threads")
    print(f"{'chunk':>5} {'cached ms':>10} {'window ms':>10} {'recompute ms':>13}")
    for k, (c, w, r) in enumerate(zip(cached, window, recompute)):
        print(f"{k:>5} {c:>10.1f} {w:>10.1f} {r:>13.1f}")
    n = max(1, min(5, len(cached) // 3))
    summary = {}
    for name, t in (("cached", cached), ("window", window), ("recompute", recompute)):
        body = t[1:-1] or t  # the first chunk carries the prompt pad, the last the flush
        head, tail = statistics.mean(body[:n]), statistics.mean(body[-n:])
        summary[name] = {"first_ms": head, "last_ms": tail, "growth": tail / head, "total_s": sum(t) / 1e3}
        print(f"{name:>10}: mean of first {n} chunks {head:.1f} ms, last {n} {tail:.1f} ms "
              f"(x{tail / head:.2f}); total {sum(t) / 1e3:.2f} s for {args.seconds:g} s of audio")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "hop": hop, "cached_ms": cached, "window_ms": window,
                       "recompute_ms": recompute, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
