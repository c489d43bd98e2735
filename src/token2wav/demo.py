"""`token2wav demo`: the main job. Streams a bundled utterance through the engine and writes demo.wav.

By default it streams the way a voice assistant would, for the earliest audio: the first hop is the smallest
one whose chunk ends exactly at the end of the voice prompt (no alignment pad: 16 tokens for the demo voice's
64-token prompts), and the hops then double up to four of those chunks. The voice's prompt state is computed
once at load, as a server does. The flow solver keeps the model's 10 Euler steps: 5 steps cut the first chunk
by a quarter but cost 0.03 of streamed WER on the held-out utterances (README, "How fast the demo starts
talking"). It prints the first-chunk latency, the RTF and where the time went (flow, vocoder, the rest; set-up
apart).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cpu import detect_cpu
from .loading import default_model
from .models.hifigan import VOCODER_PRECISION_HELP, VOCODER_PRECISIONS

LOW_LATENCY_STEPS = None  # flow solver steps of the demo's default setting: None keeps the model's (10)


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


def low_latency_options(t2w: Any, prompt: Any) -> dict[str, Any]:
    """Stream options for the earliest first chunk on this model and prompt.

    A model trained with run-time chunk sizes (``supported.chunk_tokens``) takes the smallest hop that divides
    the prompt (the first emission is then the hop alone, no pad to the next chunk boundary), else the hop that
    minimises hop + pad; hops then double up to four chunks. Other models use the 'assistant' preset."""
    supported = getattr(t2w.config, "supported_chunk_tokens", None)
    if not supported:
        return {"preset": "assistant"}
    lo, hi = int(supported[0]), int(supported[1])
    p = 0 if prompt is None else int(np.asarray(prompt.tokens).size)
    no_pad = [h for h in range(lo, hi + 1) if p % h == 0]
    hop = no_pad[0] if no_pad else min(range(lo, hi + 1), key=lambda h: (h + (-p) % h, -h))
    return {"hop": hop, "schedule": "exponential", "max_hop": 4 * hop}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory or bundled name (default: demo)")
    parser.add_argument("--speaker", default=None, help="voice of the demo model (default: its first)")
    parser.add_argument("--preset", default=None,
                        help="assistant | balanced | quality | constrained (default: the low-latency setting above; "
                             "'balanced' is the setting before it)")
    parser.add_argument("--hop", type=int, default=None, help="first hop in tokens (overrides the default's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="flow solver steps (default: the model's, 10; 5 is faster and less intelligible)")
    parser.add_argument("--vocoder-precision", default="float32", choices=VOCODER_PRECISIONS,
                        help=VOCODER_PRECISION_HELP)
    parser.add_argument("--out", type=Path, default=Path("demo.wav"))
    parser.add_argument("--json", action="store_true", help="also print the measurements as one JSON line")


MAX_STEPS = 100  # --steps: ten times the model's 10 is far past any gain (and ten times the wait)


def main(args: argparse.Namespace) -> int:
    from .audio import write_wav
    from .streaming.engine import Token2Wav
    from .tokens_io import check_output_path

    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be in [1, {MAX_STEPS}], got {args.steps}")
    check_output_path(args.out)
    model = args.model or default_model()
    if model == "tiny":
        print("note: the bundled demo voice is not installed; running the tiny model with RANDOM weights "
              "(the whole pipeline runs, the audio is noise-like)")
    t_load = time.perf_counter()
    t2w = Token2Wav.from_pretrained(model, vocoder_precision=args.vocoder_precision)
    load_s = time.perf_counter() - t_load
    if args.speaker is not None and args.speaker not in t2w.speakers:
        raise ValueError(f"--speaker {args.speaker} is not one of the model's voices: "
                         f"{', '.join(t2w.speakers) or 'it has none'}")
    tokens, text, speaker = _utterance(t2w, args.speaker)
    prompt = t2w.speaker_prompt(speaker) if speaker in t2w.speakers else None
    if args.preset is None:
        options = low_latency_options(t2w, prompt)
        label = "low latency"
    else:
        options = {"preset": args.preset}
        label = f"preset {args.preset}"
    steps = args.steps if args.steps is not None else (LOW_LATENCY_STEPS if args.preset is None else None)
    if steps:
        t2w.n_timesteps = steps
    if args.hop is not None:
        options["hop"] = args.hop
        if options.get("max_hop") is not None:
            options["max_hop"] = max(options["max_hop"], 4 * args.hop)
    if text:
        print(f"text ({speaker}, held out from training): {text}")

    # Set-up, once per process (a server does it at start): the voice's prompt state (the flow's cache after
    # the prompt) and one-time allocations, through one throwaway chunk.
    t_setup = time.perf_counter()
    with t2w.stream(prompt, **options) as warm:
        warm.push(tokens[: 2 * int(warm.plan.hop) + int(warm.plan.lookahead)])
    setup_s = time.perf_counter() - t_setup

    pieces: list[np.ndarray] = []
    first: dict[str, float] | None = None
    feed = max(1, t2w.config.chunk_tokens // 5)  # an LLM delivers a few tokens at a time
    start, cpu_start = time.perf_counter(), time.process_time()
    with t2w.stream(prompt, **options) as session:
        plan = session.plan
        clock = session.compute_s  # the flow's and vocoder's wall time, chunk by chunk
        for i in range(0, len(tokens), feed):
            out = session.push(tokens[i : i + feed])
            if first is None and any(o.size for o in out):
                first = {"s": time.perf_counter() - start, "cpu": time.process_time() - cpu_start, **clock,
                         "audio_s": sum(o.size for o in out) / t2w.sample_rate}
            pieces.extend(out)
        pieces.append(session.finish())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if first is None:
        first = {"s": elapsed, "cpu": cpu, **clock, "audio_s": pieces[-1].size / t2w.sample_rate}
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    seconds = len(audio) / t2w.sample_rate
    write_wav(args.out, audio, t2w.sample_rate)
    rtf = elapsed / max(seconds, 1e-9)
    look = plan.lookahead
    print(f"model: {model}  tokens: {len(tokens)} ({len(tokens) / t2w.token_rate:.1f} s)  setting: {label} "
          f"(hop {plan.hop}{' + pad ' + str(plan.pad) if plan.pad else ''}, {plan.schedule}"
          f"{' to ' + str(plan.max_hop) if plan.schedule == 'exponential' else ''}, lookahead {look}, "
          f"{t2w.n_timesteps} solver steps)")
    other = elapsed - clock["flow"] - clock["vocoder"]
    f_other = first["s"] - first["flow"] - first["vocoder"]
    print(f"cpu: {detect_cpu().describe()}")
    if args.vocoder_precision != "float32":
        print(f"vocoder precision: {args.vocoder_precision} (not float32: about 48 dB SNR off the float32 audio)")
    print(f"set-up (once): load {load_s * 1e3:.0f} ms, voice prompt state + warm-up {setup_s * 1e3:.0f} ms")
    print(f"first chunk: flow {first['flow'] * 1e3:.0f} ms + vocoder {first['vocoder'] * 1e3:.0f} ms + other "
          f"{f_other * 1e3:.0f} ms ({first['audio_s']:.2f} s of audio)")
    print(f"whole utterance: flow {clock['flow'] / seconds:.3f} + vocoder {clock['vocoder'] / seconds:.3f} + other "
          f"{other / seconds:.3f} s per s of audio")
    print(f"CPU time, all threads: first chunk {first['cpu'] * 1e3:.0f} ms, {cpu / seconds:.3f} s per s of audio "
          "(close to the wall times below on an idle machine; far below them on a busy one)")
    print(f"first-chunk latency: {first['s'] * 1e3:.0f} ms   RTF: {rtf:.3f}   "
          f"audio: {seconds:.2f} s in {len(pieces)} chunks -> {args.out}")
    if args.json:
        print(json.dumps({
            "first_chunk_ms": round(first["s"] * 1e3, 1), "rtf": round(rtf, 4), "audio_s": round(seconds, 3),
            "first_flow_ms": round(first["flow"] * 1e3, 1), "first_vocoder_ms": round(first["vocoder"] * 1e3, 1),
            "flow_rtf": round(clock["flow"] / seconds, 4), "vocoder_rtf": round(clock["vocoder"] / seconds, 4),
            "other_rtf": round(other / seconds, 4),
            # CPU time of all threads (on a busy machine: what the work costs, whatever share of the CPU it got)
            "first_chunk_cpu_ms": round(first["cpu"] * 1e3, 1), "cpu_rtf": round(cpu / seconds, 4),
            "load_ms": round(load_s * 1e3), "setup_ms": round(setup_s * 1e3),
            "hop": plan.hop, "pad": plan.pad, "schedule": plan.schedule, "max_hop": plan.max_hop,
            "lookahead": look, "steps": t2w.n_timesteps, "chunks": len(pieces), "cpu": detect_cpu().as_dict(),
            "vocoder_precision": args.vocoder_precision,
        }))
    return 0
