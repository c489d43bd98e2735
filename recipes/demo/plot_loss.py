"""Plot the flow's training loss from the trainer's log.jsonl files (one per training run).

python recipes/demo/plot_loss.py work_data/train2/log.jsonl --out src/token2wav/assets/demo/loss_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", type=Path, nargs="+")
    ap.add_argument("--label", nargs="*", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for n, path in enumerate(args.logs):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        label = args.label[n] if args.label and n < len(args.label) else path.parent.name
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.5, alpha=0.35)
        ax.plot([r["step"] for r in rows], [r["smooth"] for r in rows], lw=1.5, label=f"{label} (smoothed)")
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 64 x 600 mel frames)")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title("demo voice flow: training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()
