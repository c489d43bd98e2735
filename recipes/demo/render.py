"""Render corpus sentences with flite and compute the vocoder's log-mel features.

Voices slt, rms, awb are the demo's three speakers. flite writes 16 kHz audio; it is resampled to
22.05 kHz (token2wav.tokenizer.resample), peak-normalised to 0.95 (as the HiFi-GAN training data was) and
analysed with token2wav.tokenizer.log_mel (token2wav.audio.mel_spectrogram at 22.05 kHz settings).

Training sentence i (in corpus order) is spoken by voice i % 3, so every voice gets different text;
held-out sentences are spoken by every voice.

    python recipes/demo/render.py --split heldout --out work_data/demo/heldout.safetensors --keep-audio
    python recipes/demo/render.py --split train --per-voice 300 --out work_data/demo/kmeans_subset.safetensors

Output (safetensors): ``mel`` (frames_total, 80) float16, ``offsets`` (N + 1,) int64, ``speaker`` (N,) int64,
optionally ``audio`` / ``audio_offsets``; metadata ``ids`` and ``texts`` (JSON lists) and ``voices``.
The FLITE environment variable overrides the flite command (e.g. a copied binary with LD_LIBRARY_PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from token2wav.tokenizer import HIFIGAN_MEL, log_mel, resample

VOICES = ("slt", "rms", "awb")
PEAK = 0.95


def read_sentences(path: Path, split: str) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        uid, sp, text = line.split("\t")
        if sp == split:
            rows.append((uid, text))
    return rows


def plan(rows: list[tuple[str, str]], split: str, per_voice: int, offset: int = 0) -> list[tuple[str, int, str]]:
    """(utterance id, speaker index, text) to render."""
    if split == "heldout":
        return [(f"{uid}_{VOICES[s]}", s, text) for uid, text in rows for s in range(len(VOICES))]
    chosen = rows[offset * len(VOICES) : (offset + per_voice) * len(VOICES)] if per_voice else rows
    return [(f"{uid}_{VOICES[i % len(VOICES)]}", i % len(VOICES), text) for i, (uid, text) in enumerate(chosen)]


def synth_16k(text: str, voice: str, flite: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "x.wav")
        subprocess.run(
            [*flite.split(), "-voice", voice, "-t", text, "-o", wav],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # stdlib reader: flite writes 16-bit PCM, and the GPU machine has no soundfile
        with wave.open(wav, "rb") as w:
            sr, width, frames = w.getframerate(), w.getsampwidth(), w.readframes(w.getnframes())
    if sr != 16000 or width != 2:
        raise RuntimeError(f"flite wrote {sr} Hz, {8 * width}-bit audio; expected 16000 Hz, 16-bit")
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def render_one(job: tuple[str, int, str, str]) -> tuple[np.ndarray, np.ndarray]:
    _uid, spk, text, flite = job
    audio = torch.from_numpy(synth_16k(text, VOICES[spk], flite))
    audio = resample(audio, 16000, HIFIGAN_MEL.sample_rate)
    audio = audio * (PEAK / audio.abs().max().clamp_min(1e-6))
    audio = audio[: len(audio) - len(audio) % HIFIGAN_MEL.hop]  # whole frames only
    mel = log_mel(audio)
    return mel.T.numpy().astype(np.float16), audio.numpy()


def _init_worker() -> None:
    torch.set_num_threads(1)


def render(jobs: list[tuple[str, int, str]], flite: str, workers: int, keep_audio: bool) -> dict:
    t0 = time.time()
    mels, audios = [], []
    with Pool(workers, initializer=_init_worker) as pool:
        for i, (mel, audio) in enumerate(pool.imap(render_one, [(u, s, t, flite) for u, s, t in jobs], chunksize=4)):
            mels.append(mel)
            if keep_audio:
                audios.append(audio.astype(np.float32))
            if (i + 1) % 200 == 0:
                print(f"  rendered {i + 1}/{len(jobs)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    lengths = np.array([m.shape[0] for m in mels])
    out = {
        "mel": torch.from_numpy(np.concatenate(mels)),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
        "speaker": torch.tensor([s for _, s, _ in jobs], dtype=torch.int64),
    }
    if keep_audio:
        alen = np.array([len(a) for a in audios])
        out["audio"] = torch.from_numpy(np.concatenate(audios))
        out["audio_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(alen)]).astype(np.int64))
    hours = lengths.sum() * HIFIGAN_MEL.hop / HIFIGAN_MEL.sample_rate / 3600
    print(f"rendered {len(jobs)} utterances, {hours:.2f} h, in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=Path, default=Path("work_data/demo/sentences.tsv"))
    ap.add_argument("--split", choices=["train", "heldout"], required=True)
    ap.add_argument("--per-voice", type=int, default=0, help="training sentences per voice (0 = all)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many sentences per voice")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--keep-audio", action="store_true")
    args = ap.parse_args()

    from safetensors.torch import save_file

    jobs = plan(read_sentences(args.sentences, args.split), args.split, args.per_voice, args.offset)
    data = render(jobs, os.environ.get("FLITE", "flite"), args.workers, args.keep_audio)
    meta = {
        "ids": json.dumps([u for u, _, _ in jobs]),
        "texts": json.dumps([t for _, _, t in jobs]),
        "voices": json.dumps(list(VOICES)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in data.items()}, str(args.out), metadata=meta)


if __name__ == "__main__":
    main()
