"""Evaluate the shipped demo voice on held-out sentences (CPU).

    python recipes/demo/evaluate.py --model src/token2wav/assets/demo \
        --heldout work_data/demo/heldout.safetensors --per-voice 8 --grid-per-voice 2 --out work_data/eval

Reports (JSON in --out/results.json, plus a markdown table on stdout):
  * vocoder check: WER of the original audio, of ground-truth mels vocoded (fp32 checkpoint and shipped int8),
    and of the centroid-lookup baseline (tokens -> centroid mels, no flow);
  * flow: mel L1 vs the original for the offline (full attention) decode and the streamed decode at the
    default preset, their difference, and WER of both resyntheses;
  * streaming grid over (chunk tokens, lookahead): first-chunk latency (compute from session start with the
    prompt cached, tokens already available, to the first audio sample), RTF, mel L1 vs original, and
    streamed-vs-offline mel difference.
WER uses pocketsphinx's bundled en-us model on 16 kHz audio; text is lower-cased, punctuation removed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import VOICES  # noqa: E402

from token2wav.config import read_config  # noqa: E402
from token2wav.models.hifigan import HiFiGANGenerator  # noqa: E402
from token2wav.streaming.engine import Token2Wav  # noqa: E402
from token2wav.tokenizer import KMeansTokenizer, log_mel, resample  # noqa: E402

SR = 22050


# ---------------------------------------------------------------------------------------------- WER
def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


class Recognizer:
    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=16000, loglevel="FATAL")

    def __call__(self, audio: torch.Tensor) -> str:
        x = resample(audio.float(), SR, 16000)
        pcm = (x.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def wer(pairs: list[tuple[str, str]]) -> float:
    errors = sum(edit_distance(_words(r), _words(h)) for r, h in pairs)
    return errors / max(1, sum(len(_words(r)) for r, _ in pairs))


# ---------------------------------------------------------------------------------------------- decoding
def stream_decode(t2w, tokens: torch.Tensor, voice: str, hop: int, look: int) -> dict:
    """Stream one utterance through the engine (``Token2Wav.stream``, cached mode): every target token is
    available at once and is pushed a hop at a time, as a token LLM running ahead of the audio would."""
    prompt = t2w.speaker_prompt(voice)
    ids = tokens[0].tolist()
    # One emission of a throwaway session fills the engine's prompt cache, so the clock below starts with the
    # voice ready, as on a server.
    with t2w.stream(prompt, hop=hop, pre_lookahead_len=look) as warm:
        warm.push(ids[: 2 * hop + look])
    mels, audio, first, first_len = [], [], None, 0.0
    t_start = time.perf_counter()
    with t2w.stream(prompt, hop=hop, pre_lookahead_len=look) as session:
        for i in range(0, len(ids), hop):
            for piece in session.push(ids[i : i + hop]):
                audio.append(piece)
                mels.append(session.last_mel)
                if first is None and piece.size:
                    first, first_len = time.perf_counter() - t_start, piece.size / SR
        audio.append(session.finish())
        mels.append(session.last_mel)
    total = time.perf_counter() - t_start
    wav = torch.from_numpy(np.concatenate(audio))
    return {
        "mel": torch.from_numpy(np.concatenate(mels, axis=1)),
        "audio": wav,
        "first_chunk_s": first if first is not None else total,
        "first_audio_s": first_len,
        "compute_s": total,
        "rtf": total / (wav.shape[0] / SR),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("src/token2wav/assets/demo"))
    ap.add_argument("--heldout", type=Path, default=Path("work_data/demo/heldout.safetensors"))
    ap.add_argument("--vocoder-fp32", type=Path, default=None, help="original checkpoint, for the int8 check")
    ap.add_argument("--per-voice", type=int, default=8)
    ap.add_argument("--grid-per-voice", type=int, default=2)
    ap.add_argument("--skip", type=int, default=0, help="skip this many held-out utterances per voice")
    ap.add_argument("--offline-only", action="store_true", help="no streamed decode in the WER loop")
    ap.add_argument("--grid-voices", type=int, default=3, help="voices (in order) used for the grid")
    ap.add_argument("--n-timesteps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("work_data/eval"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = read_config(args.model)
    t2w = Token2Wav.from_pretrained(args.model, n_timesteps=args.n_timesteps)
    voc = t2w.vocoder
    tok = KMeansTokenizer.from_file(args.model / "tokenizer.safetensors")
    asr = Recognizer()

    with safe_open(str(args.heldout), framework="pt") as f:
        mel_all, off = f.get_tensor("mel").float(), f.get_tensor("offsets")
        aud_all, aoff = f.get_tensor("audio"), f.get_tensor("audio_offsets")
        spk_all = f.get_tensor("speaker").tolist()
        texts = json.loads(f.metadata()["texts"])

    def heldout_mel(i: int) -> torch.Tensor:
        mel = mel_all[off[i] : off[i + 1]]
        return mel[: mel.shape[0] - mel.shape[0] % 2].T  # (80, F), whole tokens

    def offline_decode(tokens: torch.Tensor, voice: str) -> torch.Tensor:
        """The full-attention offline decode (the reference's non-streaming path), mel (80, F)."""
        mel = t2w.synthesize(tokens[0], prompt=t2w.speaker_prompt(voice), attention="full", output="mel")
        return torch.from_numpy(mel)
    items = []
    for s in range(len(VOICES)):
        idx = [i for i in range(len(spk_all)) if spk_all[i] == s][args.skip : args.skip + args.per_voice]
        items += [(i, s) for i in idx]
    voc_fp32 = None
    if args.vocoder_fp32 is not None:
        voc_fp32 = HiFiGANGenerator(**cfg.vocoder.kwargs).eval()
        state = torch.load(str(args.vocoder_fp32), weights_only=True, map_location="cpu")["generator"]
        voc_fp32.load_state_dict(state, strict=True)

    rec: dict[str, list] = {k: [] for k in ("orig", "gt_fp32", "gt_int8", "lookup", "offline", "stream")}
    l1 = {"offline": [], "stream": [], "stream_vs_offline": [], "lookup": [], "gt_int8": []}
    default = (cfg.static_chunk_size // cfg.token_mel_ratio, cfg.pre_lookahead_len)
    t_all = time.time()
    offline_mels: dict[int, tuple] = {}
    for n, (i, s) in enumerate(items):
        name = VOICES[s]
        mel = heldout_mel(i)
        audio = aud_all[aoff[i] : aoff[i + 1]]
        text = texts[i]
        tokens = tok.tokens_from_mel(mel)[None]
        with torch.inference_mode():
            rec["orig"].append((text, asr(audio)))
            gt = voc(mel[None])[0, 0]
            rec["gt_int8"].append((text, asr(gt)))
            l1["gt_int8"].append(float((log_mel(gt)[:, : mel.shape[1]] - mel).abs().mean()))
            if voc_fp32 is not None:
                rec["gt_fp32"].append((text, asr(voc_fp32(mel[None])[0, 0])))
            look_mel = tok.mel_from_tokens(tokens[0])
            rec["lookup"].append((text, asr(voc(look_mel[None])[0, 0])))
            l1["lookup"].append(float((look_mel - mel).abs().mean()))
            off_mel = offline_decode(tokens, name)
            rec["offline"].append((text, asr(voc(off_mel[None])[0, 0])))
            offline_mels[i] = (mel, tokens, off_mel)
            l1["offline"].append(float((off_mel - mel).abs().mean()))
        if not args.offline_only:
            st = stream_decode(t2w, tokens, name, default[0], default[1])
            rec["stream"].append((text, asr(st["audio"])))
            l1["stream"].append(float((st["mel"] - mel).abs().mean()))
            l1["stream_vs_offline"].append(float((st["mel"] - off_mel).abs().mean()))
            if n == 0:
                import soundfile as sf

                sf.write(str(args.out / f"example_{name}_stream.wav"), st["audio"].numpy(), SR)
                sf.write(str(args.out / f"example_{name}_orig.wav"), audio.numpy(), SR)
        last = rec["stream"][-1][1] if rec["stream"] else rec["offline"][-1][1]
        print(f"[{n + 1}/{len(items)}] {name} {time.time() - t_all:.0f}s: {last!r}", flush=True)

    results = {
        "n_utterances": len(items),
        "n_timesteps": args.n_timesteps,
        "default_preset": default,
        "wer": {k: wer(v) for k, v in rec.items() if v},
        "mel_l1": {k: float(np.mean(v)) for k, v in l1.items() if v},
        "transcripts": rec,
    }

    grid = []
    presets = [(12, 0), (12, 3), (25, 0), (25, 3), (25, 5), (50, 3), (50, 5)]
    grid_items = [
        (i, s)
        for s in range(args.grid_voices)
        for i in [j for j in range(len(spk_all)) if spk_all[j] == s][: args.grid_per_voice]
    ]
    cached = {}
    for i, s in grid_items:
        if i in offline_mels:  # decoded in the main loop already
            cached[i] = offline_mels[i]
            continue
        mel = heldout_mel(i)
        tokens = tok.tokens_from_mel(mel)[None]
        cached[i] = (mel, tokens, offline_decode(tokens, VOICES[s]))
    for chunk, look in presets if grid_items else []:
        rows = []
        for i, s in grid_items:
            mel, tokens, off_mel = cached[i]
            st = stream_decode(t2w, tokens, VOICES[s], chunk, look)
            rows.append(
                {
                    "first_chunk_s": st["first_chunk_s"],
                    "first_audio_s": st["first_audio_s"],
                    "rtf": st["rtf"],
                    "l1": float((st["mel"] - mel).abs().mean()),
                    "vs_offline": float((st["mel"] - off_mel).abs().mean()),
                }
            )
        agg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        agg.update(chunk_tokens=chunk, lookahead=look)
        grid.append(agg)
        print(json.dumps(agg), flush=True)
    results["grid"] = grid
    results["threads"] = args.threads
    results["wall_s"] = time.time() - t_all
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    print("\n| system | WER | mel L1 vs original |\n|---|---|---|")
    names = {
        "orig": "original flite audio",
        "gt_fp32": "ground-truth mel -> HiFi-GAN fp32",
        "gt_int8": "ground-truth mel -> HiFi-GAN int8 (shipped)",
        "lookup": "tokens -> centroid lookup",
        "offline": "tokens -> flow offline (full attention)",
        "stream": f"tokens -> flow streamed (hop {default[0]}, lookahead {default[1]})",
    }
    for k, label in names.items():
        if k in results["wer"]:
            print(f"| {label} | {results['wer'][k]:.3f} | {results['mel_l1'].get(k, float('nan')):.3f} |")
    if "stream_vs_offline" in results["mel_l1"]:
        print(f"\nstreamed vs offline mel L1: {results['mel_l1']['stream_vs_offline']:.3f}")


if __name__ == "__main__":
    main()
