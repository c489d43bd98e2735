"""Streamed WER of the demo voice's bundled held-out utterances at several streaming settings.

The model card's streamed row (0.323) decodes held-out sentences 0-9 of each voice with hop 25, lookahead 3 and
10 Euler steps; `demo_tokens.json` ships exactly those 30 utterances (text, voice, tokens), so this script needs
no rendered data: it streams each utterance through `Token2Wav.stream` (prompt cache warm, every token pushed in
LLM-sized pieces), recognises the audio with pocketsphinx (`pip install -e '.[train]'`) and scores it.

    python recipes/demo/wer_settings.py --setting base:hop=25,steps=10 \
        --setting demo:hop=16,schedule=exponential,max_hop=64,steps=5 --out wer.json
    python recipes/demo/wer_settings.py --setting mixed:hop=16,schedule=exponential,max_hop=64,vocoder=bfloat16-mixed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from evaluate import Recognizer, wer  # noqa: E402

from token2wav import Token2Wav  # noqa: E402


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts: dict = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        opts[k] = v if k in ("schedule", "vocoder") else int(v)
    return name, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", required=True, help="name:key=value,... (hop, steps, ...)")
    ap.add_argument("--limit", type=int, default=None, help="first N utterances only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t2w = Token2Wav.from_pretrained("demo")
    utts = json.loads((Path(t2w.config.path).parent / "demo_tokens.json").read_text())["utterances"]
    utts = utts[: args.limit] if args.limit else utts
    asr = Recognizer()
    results = {}
    for spec in args.setting:
        name, opts = parse_setting(spec)
        t2w.n_timesteps = int(opts.pop("steps", 10))
        t2w.vocoder.set_precision(opts.pop("vocoder", "float32"))  # float32 or bfloat16-mixed
        pairs, hyps = [], []
        t0 = time.perf_counter()
        for u in utts:
            prompt = t2w.speaker_prompt(u["speaker"])
            with t2w.stream(prompt, **opts) as warm:  # prompt cache, as on a server / in the demo
                warm.push(u["tokens"][:40])
            pieces = []
            with t2w.stream(prompt, **opts) as s:
                for i in range(0, len(u["tokens"]), 5):
                    pieces += s.push(u["tokens"][i : i + 5])
                pieces.append(s.finish())
            audio = torch.from_numpy(np.concatenate(pieces))
            hyp = asr(audio)
            pairs.append((u["text"], hyp))
            hyps.append({"id": u.get("id"), "speaker": u["speaker"], "ref": u["text"], "hyp": hyp})
            print(json.dumps({"setting": name, **hyps[-1]}), flush=True)  # a partial run can still be scored
        score = wer(pairs)
        results[name] = {"setting": spec, "wer": round(score, 4), "utterances": len(utts),
                         "wall_s": round(time.perf_counter() - t0, 1), "hyps": hyps}
        print(f"{name:12s} WER {score:.3f} on {len(utts)} utterances ({spec})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
