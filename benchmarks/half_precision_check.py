"""Half precision on a device: stream a long utterance through each full-size architecture in float16 and
bfloat16 and check that every chunk of audio is finite and not silent. Part of `benchmarks/gpu.sh`.

    python benchmarks/half_precision_check.py --device cuda --seconds 30 --json out/half.json
    python benchmarks/half_precision_check.py --device cpu --model tiny --seconds 2 --json out/half.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from token2wav import bench


def check(model: str, device: str, dtype: torch.dtype, seconds: float) -> dict:
    engine = bench.build_engine(model, False, device, dtype)
    prompt, tokens = bench._workload(engine, seconds, seed=3)
    hop = engine.config.chunk_tokens
    start = time.perf_counter()
    pieces = []
    with engine.stream(prompt, hop=hop) as session:
        for i in range(0, len(tokens), hop):
            pieces += session.push(tokens[i : i + hop])
        pieces.append(session.finish())
    audio = np.concatenate([p.reshape(-1) for p in pieces])
    return {
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "chunks": len(pieces),
        "samples": int(audio.size),
        "finite": bool(np.isfinite(audio).all()),
        "peak": float(np.abs(audio).max(initial=0.0)),
        "wall_s": time.perf_counter() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", action="append", help="cv3, cv2 (full size, random weights) or a bundled name")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    results = []
    for model in args.model or ["cv3", "cv2"]:
        for dtype in (torch.bfloat16, torch.float16):
            r = check(model, args.device, dtype, args.seconds)
            results.append(r)
            print(f"{r['model']} {r['dtype']}: {r['chunks']} chunks, finite={r['finite']}, peak {r['peak']:.3f}, "
                  f"{r['wall_s']:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    bad = [r for r in results if not r["finite"] or r["peak"] == 0.0]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
