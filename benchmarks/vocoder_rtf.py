"""Real-time factor of the full-size CosyVoice 2 / 3 HiFT vocoders on this CPU (random weights).

    python benchmarks/vocoder_rtf.py [--seconds 10] [--threads 2] [--chunk 50]

RTF = compute time / audio duration (below 1 is faster than real time).  For the causal CosyVoice 3
vocoder it also times cached streaming (``stream_step`` with ``--chunk`` mel frames per call).
Weights are random, so only the timing means anything; the output is checked to be finite.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from token2wav import build_vocoder
from token2wav.models.hift import CausalHiFTGenerator, fold_weight_norm

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "real_configs"
FRAME_RATE = 50  # mel frames per second at 24 kHz with 480-sample hops


def _small_init(model: torch.nn.Module) -> None:
    # PyTorch's default init lets exp(magnitude) overflow; a narrow normal keeps the output finite.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="audio length to vocode")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--chunk", type=int, default=50, help="mel frames per stream_step call (CosyVoice 3)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs; the best is reported")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = ap.parse_args()
    if args.seconds <= 0 or args.threads < 1 or args.chunk < 1 or args.repeats < 1:
        ap.error("--seconds must be > 0; --threads, --chunk and --repeats >= 1")
    torch.set_num_threads(args.threads)
    frames = round(args.seconds * FRAME_RATE)
    mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(1)) * 2 - 5
    dev = torch.device(args.device)
    mel = mel.to(dev)
    print(f"torch {torch.__version__} on {dev}, {args.threads} CPU threads, "
          f"{frames} mel frames = {args.seconds:g} s audio")

    for name in ("cosyvoice2", "cosyvoice3"):
        voc = build_vocoder(CONFIGS / f"{name}.yaml", device="cpu")
        _small_init(voc)
        fold_weight_norm(voc)
        voc = voc.to(dev)
        n_params = sum(p.numel() for p in voc.parameters())
        causal = isinstance(voc, CausalHiFTGenerator)
        with torch.inference_mode():
            voc.inference(mel[:, :, :20])  # warm-up (also builds the fixed noise)
            out = voc.inference(mel)[0]
            if not torch.isfinite(out).all():
                raise RuntimeError(f"{name}: non-finite output")
            t_off = _best(lambda v=voc: (v.inference(mel), _sync(dev)), args.repeats)
        print(f"{name:11s} {type(voc).__name__:20s} {n_params / 1e6:5.1f} M params  "
              f"offline RTF {t_off / args.seconds:.3f} ({t_off:.2f} s)")
        if causal:
            def run_stream(v=voc):
                cache = v.new_cache()
                times = []
                for i in range(0, frames, args.chunk):
                    t = time.perf_counter()
                    last = i + args.chunk >= frames
                    _, cache = v.stream_step(mel[:, :, i:i + args.chunk], cache, finalize=last)
                    _sync(dev)
                    times.append(time.perf_counter() - t)
                return times

            best = None
            for _ in range(args.repeats):
                times = run_stream()
                if best is None or sum(times) < sum(best):
                    best = times
            chunk_s = args.chunk / FRAME_RATE
            half = len(best) // 2
            print(f"{'':11s} stream_step, {args.chunk}-frame chunks: RTF {sum(best) / args.seconds:.3f}, "
                  f"per chunk {1e3 * sum(best) / len(best):.0f} ms for {1e3 * chunk_s:.0f} ms of audio "
                  f"(first half {1e3 * sum(best[:half]) / max(1, half):.0f} ms, "
                  f"second half {1e3 * sum(best[half:]) / max(1, len(best) - half):.0f} ms)")
        del voc


if __name__ == "__main__":
    main()
