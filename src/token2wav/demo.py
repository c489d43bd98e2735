"""`token2wav demo`: the main job. Streams a bundled utterance through the engine and writes demo.wav."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .loading import BUNDLED_MODELS


def _default_model() -> str:
    return "demo" if (BUNDLED_MODELS["demo"] / "token2wav.yaml").is_file() else "tiny"


def _utterance(t2w, speaker: str | None) -> tuple[list[int], str | None, str | None]:
    """(tokens, text, speaker) of a bundled held-out utterance, or seeded random tokens for a model without any."""
    tokens_file = Path(t2w.config.path).parent / "demo_tokens.json"
    if tokens_file.is_file():
        utterances = json.loads(tokens_file.read_text())["utterances"]
        if speaker is not None:
            utterances = [u for u in utterances if u["speaker"] == speaker] or utterances
        u = utterances[0]
        return [int(t) for t in u["tokens"]], u.get("text"), speaker or u.get("speaker")
    rng = np.random.default_rng(0)
    return rng.integers(0, t2w.config.vocab_size, 8 * t2w.config.token_rate).tolist(), None, speaker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory or bundled name (default: demo)")
    parser.add_argument("--speaker", default=None, help="voice of the demo model (default: its first)")
    parser.add_argument("--preset", default="balanced", help="assistant | balanced | quality | constrained")
    parser.add_argument("--out", type=Path, default=Path("demo.wav"))


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .audio import write_wav
    from .streaming.engine import Token2Wav

    model = args.model or _default_model()
    if model == "tiny":
        print("note: the bundled demo voice is not installed; running the tiny model with RANDOM weights "
              "(the whole pipeline runs, the audio is noise-like)")
    t2w = Token2Wav.from_pretrained(model)
    if args.speaker is not None and args.speaker not in t2w.speakers:
        raise SystemExit(f"--speaker must be one of {t2w.speakers or 'none (this model has no bundled voices)'}")
    tokens, text, speaker = _utterance(t2w, args.speaker)
    prompt = t2w.speaker_prompt(speaker) if speaker in t2w.speakers else None
    if text:
        print(f"text ({speaker}, held out from training): {text}")
    print(f"model: {model}  tokens: {len(tokens)} ({len(tokens) / t2w.token_rate:.1f} s)  preset: {args.preset}")

    pieces: list[np.ndarray] = []
    first_chunk_s = None
    feed = max(1, t2w.config.chunk_tokens // 5)  # an LLM delivers a few tokens at a time
    start = time.perf_counter()
    with t2w.stream(prompt, preset=args.preset) as session, tqdm(total=len(tokens), unit="tok") as bar:
        for i in range(0, len(tokens), feed):
            out = session.push(tokens[i : i + feed])
            bar.update(len(tokens[i : i + feed]))
            if out and first_chunk_s is None:
                first_chunk_s = time.perf_counter() - start
            pieces.extend(out)
        pieces.append(session.finish())
    elapsed = time.perf_counter() - start
    if first_chunk_s is None:
        first_chunk_s = elapsed
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    seconds = len(audio) / t2w.sample_rate
    write_wav(args.out, audio, t2w.sample_rate)
    print(f"first-chunk latency: {first_chunk_s * 1e3:.0f} ms   RTF: {elapsed / max(seconds, 1e-9):.3f}   "
          f"audio: {seconds:.2f} s in {len(pieces)} chunks -> {args.out}")
    return 0
