"""Fit the demo tokenizer: k-means over stacks of `stack` log-mel frames.

    python recipes/demo/train_tokenizer.py --data work_data/demo/kmeans_subset.safetensors \
        --k 2048 --iters 20 --max-rows 200000 --seed 1234 --out work_data/demo/tokenizer.safetensors

Runs on CPU or CUDA (--device). Prints the mean squared quantisation error per iteration.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors import safe_open

from token2wav.tokenizer import KMeansTokenizer, kmeans_fit, stack_frames


def stacked_rows(path: Path, stack: int) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        mel, off = f.get_tensor("mel"), f.get_tensor("offsets")
    rows = [stack_frames(mel[off[i] : off[i + 1]].float().T, stack) for i in range(len(off) - 1)]
    return torch.cat(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--stack", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    x = torch.cat([stacked_rows(p, args.stack) for p in args.data])
    g = torch.Generator().manual_seed(args.seed)
    if x.shape[0] > args.max_rows:
        x = x[torch.randperm(x.shape[0], generator=g)[: args.max_rows]]
    print(f"k-means: {x.shape[0]} rows of {x.shape[1]} dims, k={args.k}", flush=True)
    t0 = time.time()
    centroids, hist = kmeans_fit(x.to(args.device), args.k, iters=args.iters, seed=args.seed)
    print("mse per iteration:", " ".join(f"{h / x.shape[1]:.4f}" for h in hist))
    print(f"done in {time.time() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    KMeansTokenizer(centroids.cpu(), stack=args.stack).save(args.out)


if __name__ == "__main__":
    main()
