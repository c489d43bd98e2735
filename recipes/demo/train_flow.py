"""Train the demo voice's flow (CosyVoice 3 family: pre-lookahead layer + chunk-causal DiT + CFM).

Objective: the reference's flow-matching loss (CausalConditionalCFM.compute_loss: uniform t, sigma_min,
condition dropout at training_cfg_rate), prompt conditioning on a random prefix of each example, plus
run-time flexibility:
  * per batch, with probability --p-stream, chunk-causal attention with a random chunk of
    12..50 tokens, and a random run-time lookahead of 0..5 tokens simulated exactly as the streaming
    engine sees it (tokens past chunk_end + lookahead are zeros for that chunk's frames);
    otherwise full attention and full lookahead (offline decoding).
Data: per speaker, all utterances are joined into one stream (in a seeded random order) and each example is
a random window of --window mel frames starting on a token boundary, so examples often span two utterances
(prompt-then-target, as at inference) and need no padding.

Time-budgeted: trains for --minutes, checkpoints (fp16 safetensors, EMA and raw) every --ckpt-every
seconds to --out, and can resume from such a checkpoint (--resume).

CPU smoke test:
    python recipes/demo/train_flow.py --data work_data/demo/kmeans_subset.safetensors \
        --tokenizer work_data/demo/tokenizer.safetensors --out /tmp/t2w_ckpt --minutes 0.5 --batch 4 --dim 64 --depth 2
GPU run (what was shipped; see MODEL_CARD.md for the exact command): --render renders the corpus with flite first.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import CHUNK_TOKENS_RANGE, PRE_LOOKAHEAD, SPK_EMBED_DIM, TOKEN_MEL_RATIO, build, flow_spec  # noqa: E402

from token2wav.tokenizer import KMeansTokenizer  # noqa: E402


# ---------------------------------------------------------------------------------------------- data
def load_mels(paths: list[Path]) -> tuple[list[torch.Tensor], list[int]]:
    mels, spks = [], []
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            off = f.get_tensor("offsets")
            spk = f.get_tensor("speaker")
            if "mel" in keys:
                mel = f.get_tensor("mel").float()
            else:  # uint8-quantised fallback data
                mel = f.get_tensor("mel_u8").float() * f.get_tensor("mel_scale") + f.get_tensor("mel_lo")
        for i in range(len(off) - 1):
            mels.append(mel[off[i] : off[i + 1]])
            spks.append(int(spk[i]))
    return mels, spks


def render_mels(sentences: Path, per_voice: int, workers: int) -> tuple[list[torch.Tensor], list[int]]:
    import render

    jobs = render.plan(render.read_sentences(sentences, "train"), "train", per_voice)
    data = render.render(jobs, os.environ.get("FLITE", "flite"), workers, keep_audio=False)
    off, mel = data["offsets"], data["mel"].float()
    return [mel[off[i] : off[i + 1]] for i in range(len(off) - 1)], data["speaker"].tolist()


class Streams:
    """All utterances of each speaker joined into one stream of mel frames and tokens, on the device."""

    def __init__(self, mels: list[torch.Tensor], spks: list[int], tok: KMeansTokenizer, device: str, seed: int):
        rng = random.Random(seed)
        order = list(range(len(mels)))
        rng.shuffle(order)
        n_spk = max(spks) + 1
        mel_parts: list[list[torch.Tensor]] = [[] for _ in range(n_spk)]
        for i in order:
            m = mels[i]
            m = m[: m.shape[0] - m.shape[0] % TOKEN_MEL_RATIO]  # whole tokens per utterance
            mel_parts[spks[i]].append(m)
        self.mel, self.tokens, self.bounds = [], [], []
        tok.centroids = tok.centroids.to(device)
        tok.c_sq = tok.c_sq.to(device)
        start = 0
        for s in range(n_spk):
            m = torch.cat(mel_parts[s]).to(device)
            t = tok.tokens_from_mel(m.T)
            self.mel.append(m.half())
            self.tokens.append(t)
            self.bounds.append((start, start + t.shape[0]))
            start += t.shape[0]
        self.mel_all = torch.cat(self.mel)  # (frames, 80)
        self.tok_all = torch.cat(self.tokens)  # (frames / 2,)
        self.lengths = torch.tensor([b - a for a, b in self.bounds], dtype=torch.float)
        self.device = device
        hours = self.mel_all.shape[0] * 256 / 22050 / 3600
        print(
            f"data: {len(mels)} utterances, {n_spk} speakers, {hours:.2f} h, {self.tok_all.shape[0]} tokens", flush=True
        )

    def batch(self, n: int, window_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        spk = torch.multinomial(self.lengths, n, replacement=True, generator=gen)
        lo = torch.tensor([self.bounds[s][0] for s in spk.tolist()])
        span = torch.tensor([self.bounds[s][1] - self.bounds[s][0] - window_tokens for s in spk.tolist()])
        u = lo + (torch.rand(n, generator=gen) * span).long()
        tidx = (u[:, None] + torch.arange(window_tokens)).to(self.device)
        fidx = (TOKEN_MEL_RATIO * u[:, None] + torch.arange(window_tokens * TOKEN_MEL_RATIO)).to(self.device)
        return self.tok_all[tidx], self.mel_all[fidx].float(), spk.to(self.device)


# ---------------------------------------------------------------------------------------------- model pieces
def lookahead_for_chunks(layer: torch.nn.Module, emb: torch.Tensor, chunk: int, look: int) -> torch.Tensor:
    """Pre-lookahead output as streaming sees it: for tokens of chunk k, inputs at or past
    (k + 1) * chunk + look are zeros (not yet received). emb (B, N, C) -> (B, N, C)."""
    b, n, c = emb.shape
    k = -(-n // chunk)
    pos = torch.arange(n, device=emb.device)
    limits = (torch.arange(k, device=emb.device) + 1) * chunk + look  # (K,)
    keep = (pos[None, :] < limits[:, None]).to(emb.dtype)  # (K, N)
    masked = emb[None] * keep[:, None, :, None]  # (K, B, N, C)
    out = layer(masked.reshape(k * b, n, c)).reshape(k, b, n, c)
    which = pos // chunk  # chunk of each position
    return out[which, :, pos].transpose(0, 1)  # (B, N, C)


def flow_loss(flow, spk_table, tokens, mel, spk, gen, chunk_tokens, look, cond_frac):
    b, n = tokens.shape
    emb = flow.input_embedding(tokens)
    if chunk_tokens > 0:
        h = lookahead_for_chunks(flow.pre_lookahead_layer, emb, chunk_tokens, look)
    else:
        h = flow.pre_lookahead_layer(emb)
    h = h.repeat_interleave(TOKEN_MEL_RATIO, dim=1)
    spks = flow.spk_embed_affine_layer(F.normalize(spk_table[spk], dim=1))
    frames = mel.shape[1]
    # Prompt conditioning as the reference: half the items get the mel of a random prefix as `cond`.
    use = torch.rand(b, generator=gen) < 0.5
    cut = (torch.rand(b, generator=gen) * cond_frac * frames).long() * use
    cmask = (torch.arange(frames)[None, :] < cut[:, None]).to(mel.device)
    cond = mel * cmask[..., None]
    x1 = mel.transpose(1, 2).contiguous()
    mask = torch.ones(b, 1, frames, device=mel.device, dtype=mel.dtype)
    chunk = chunk_tokens * TOKEN_MEL_RATIO if chunk_tokens > 0 else None
    loss, _ = flow.decoder.compute_loss(
        x1,
        mask,
        h.transpose(1, 2).contiguous(),
        spks,
        cond.transpose(1, 2).contiguous(),
        chunk_size=chunk,
        streaming=False,
    )
    return loss


# ---------------------------------------------------------------------------------------------- checkpoints
def state_fp16(flow: torch.nn.Module, spk_table: torch.Tensor) -> dict[str, torch.Tensor]:
    sd = {f"flow.{k}": v.detach().half().contiguous() for k, v in flow.state_dict().items()}
    sd["speaker_embedding"] = spk_table.detach().half().contiguous()
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="*", default=[])
    ap.add_argument("--render", type=Path, default=None, help="sentences.tsv: render with flite first")
    ap.add_argument("--per-voice", type=int, default=3000)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", type=Path, default=None, help="a *_ema.safetensors checkpoint")
    ap.add_argument("--minutes", type=float, default=7.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--window", type=int, default=600, help="mel frames per example (even)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--p-stream", type=float, default=0.7)
    ap.add_argument("--cond-frac", type=float, default=0.4)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ckpt-every", type=float, default=90.0, help="seconds")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    mels = None
    if args.render is not None:
        try:
            mels, spks = render_mels(args.render, args.per_voice, args.workers)
        except Exception as exc:  # e.g. flite missing on the training machine: use the carried data
            print(f"rendering failed ({exc!r}); falling back to --data", flush=True)
    if mels is None:
        mels, spks = load_mels(args.data)
    tok = KMeansTokenizer.from_file(args.tokenizer)
    streams = Streams(mels, spks, tok, device, args.seed)
    del mels
    n_spk = len(streams.bounds)
    print(f"data ready in {time.time() - t_start:.0f} s", flush=True)

    spec = flow_spec(dim=args.dim, depth=args.depth, heads=args.heads)
    flow = build(spec).to(device)
    spk_table = torch.nn.Parameter(torch.randn(n_spk, SPK_EMBED_DIM, device=device))
    if args.resume is not None:
        sd = load_file(str(args.resume))
        flow.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("flow.")}, strict=True)
        with torch.no_grad():
            spk_table.copy_(sd["speaker_embedding"].float())
        print(f"resumed from {args.resume}", flush=True)
    n_params = sum(p.numel() for p in flow.parameters())
    print(f"flow parameters: {n_params} ({n_params * 2 / 1e6:.2f} MB fp16)", flush=True)
    (args.out / "spec.json").write_text(json.dumps(spec, indent=1))

    params = list(flow.parameters()) + [spk_table]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    ema = [p.detach().clone().float() for p in params]

    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed + 1)
    budget = args.minutes * 60.0 - (time.time() - t_start)
    t0 = time.time()
    last_ckpt = t0
    log = open(args.out / "log.jsonl", "a")
    step, running = 0, 0.0
    # Divergence guard: a healthy snapshot (weights, optimizer, EMA) is kept; if the smoothed loss rises
    # well above the best seen, training returns to the snapshot with half the learning rate.
    best, lr_scale, snapshot, best_saved = float("inf"), 1.0, None, float("inf")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def save(tag: str) -> None:
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, e in zip(params, ema):
                p.copy_(e)
            save_file(
                state_fp16(flow, spk_table),
                str(args.out / f"flow_{tag}_ema.safetensors"),
                metadata={"step": str(step), "spec": json.dumps(spec)},
            )
            for p, s in zip(params, saved):
                p.copy_(s)

    while True:
        elapsed = time.time() - t0
        frac = min(1.0, elapsed / max(budget, 1.0))
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = lr_scale * args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        if rng.random() < args.p_stream:
            chunk = rng.randint(*CHUNK_TOKENS_RANGE)
            look = rng.randint(0, PRE_LOOKAHEAD)
        else:
            chunk, look = 0, PRE_LOOKAHEAD
        tokens, mel, spk = streams.batch(args.batch, args.window // TOKEN_MEL_RATIO, gen)
        with amp:
            loss = flow_loss(flow, spk_table, tokens, mel, spk, gen, chunk, look, args.cond_frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - d)
        step += 1
        lv = float(loss.detach())
        running = lv if step == 1 else 0.98 * running + 0.02 * lv
        if step % 50 == 0 or step == 1:
            rec = {
                "step": step,
                "loss": lv,
                "smooth": running,
                "lr": lr,
                "gnorm": float(gnorm),
                "chunk": chunk,
                "look": look,
                "t": round(time.time() - t0, 1),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % 500 == 0 or step == 1:
                print(json.dumps(rec), flush=True)
        if step % 250 == 0 and step >= args.warmup:
            if running < best:
                best = running
            if running <= 1.1 * best:
                snapshot = (
                    [p.detach().clone() for p in params],
                    copy.deepcopy(opt.state_dict()),
                    [e.clone() for e in ema],
                )
            elif running > 1.5 * best and snapshot is not None:
                with torch.no_grad():
                    for p, v in zip(params, snapshot[0]):
                        p.copy_(v)
                    for e, v in zip(ema, snapshot[2]):
                        e.copy_(v)
                opt.load_state_dict(snapshot[1])
                lr_scale *= 0.5
                running = best
                msg = {"step": step, "event": "rollback", "lr_scale": lr_scale}
                log.write(json.dumps(msg) + "\n")
                print(json.dumps(msg), flush=True)
        if time.time() - last_ckpt > args.ckpt_every:
            save("last")
            if running < best_saved:  # EMA weights at the best smoothed loss so far
                save("best")
                best_saved = running
            last_ckpt = time.time()
    save("last")
    log.close()
    print(f"done: {step} steps in {time.time() - t0:.0f} s ({step / max(time.time() - t0, 1e-9):.1f} steps/s)")


if __name__ == "__main__":
    main()
