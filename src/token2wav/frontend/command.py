"""make a voice prompt (.npz) from a recording, and optionally save it as one of the model's voices

``token2wav prompt --model MODEL in.wav --out prompt.npz`` prints the prompt's tokens, seconds and the time
taken. ``--save-as NAME`` adds the prompt to the model directory's ``spk2info.pt`` (then ``--speaker NAME``
works everywhere); the input may also be a ``.npz`` made earlier.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or bundled model name)")
    parser.add_argument("input", metavar="IN.wav", help="the voice to clone, 0.5-30 s (or a prompt .npz to save)")
    parser.add_argument("--out", metavar="PROMPT.npz", help="write arrays tokens, mel, embedding")
    parser.add_argument("--speaker", help="take the embedding from this voice (required for demo)")
    parser.add_argument("--save-as", metavar="NAME", help="add the prompt to the model's voices (spk2info.pt)")
    parser.add_argument("--overwrite", action="store_true", help="with --save-as: replace a voice of that name")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def main(args: argparse.Namespace) -> int:
    from token2wav import Prompt, Token2Wav
    from token2wav.tokens_io import check_output_path, load_prompt_npz

    if args.out is None and args.save_as is None:
        raise ValueError("give --out PROMPT.npz and/or --save-as NAME (otherwise the prompt goes nowhere)")
    check_output_path(args.out)
    t2w = Token2Wav.from_pretrained(args.model)
    start = time.perf_counter()
    if args.input.endswith(".npz"):
        arrays = load_prompt_npz(args.input)
        prompt = Prompt(arrays.tokens, arrays.mel, arrays.embedding)
        t2w.prepare_prompt(prompt)  # refuse a prompt this model cannot use before writing anything
    else:
        try:
            prompt = t2w.prompt_from_wav(args.input, speaker=args.speaker)
        except ImportError as exc:  # onnxruntime missing: one line that says what to install
            raise ValueError(str(exc)) from None
    took = time.perf_counter() - start
    if args.out is not None:
        out = Path(args.out)
        np.savez(out, tokens=prompt.tokens.numpy().astype(np.int64), mel=prompt.mel.numpy().astype(np.float32),
                 embedding=prompt.embedding.numpy().astype(np.float32))
    saved = None
    if args.save_as is not None:
        saved = str(t2w.add_voice(args.save_as, prompt, overwrite=args.overwrite))
    seconds = prompt.num_tokens / float(t2w.token_rate)
    summary = {"tokens": prompt.num_tokens, "mel_frames": prompt.num_frames, "seconds": round(seconds, 3),
               "time_s": round(took, 3), "out": args.out, "saved_to": saved, "voice": args.save_as}
    if args.json:
        print(json.dumps(summary))
    else:
        where = ", ".join(x for x in (args.out, saved and f"voice {args.save_as!r} in {saved}") if x)
        print(f"{prompt.num_tokens} tokens, {seconds:.2f} s of speech, {took * 1000:.0f} ms -> {where}")
    return 0
