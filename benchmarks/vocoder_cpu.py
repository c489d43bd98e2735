"""The demo voice's HiFi-GAN vocoder: its CPU options side by side, in one run.

    python benchmarks/vocoder_cpu.py [--threads 2] [--repeats 3] [--json out.json]

Vocodes the mel of one demo utterance (the flow's own output, about 6 s) with each option and reports the
time per second of audio (median of ``--repeats``), the largest difference from the float32 path the engine
runs, and the signal-to-error ratio. An option is worth adopting only when it is faster *and* within the
tolerance streamed audio is held to (5e-5 relative to the peak: tests/test_demo_latency.py).

Options:
* ``float32 channels-last``: what the engine runs (oneDNN convolutions on [B, C, 1, T] channels-last frames).
* ``float32 channels-first``: the same weights through 1-D convolutions on [B, C, T], the former layout.
* ``float32, torch's own kernels``: oneDNN switched off.
* ``streamed, carried state``: ``vocode_stream`` at 32 frames per call (the cost of streaming itself).
* ``bfloat16``: the whole generator in bfloat16 (run only where the CPU has native bf16: AMX, AVX512-BF16).
* ``torch.compile``: the channels-last path compiled (its compile time reported apart).
* ``onnxruntime``: the generator exported to ONNX (needs the ``onnx`` package to export) and run by ONNX Runtime
  with as many threads.
* ``int8 weights, dequantized per call``: the engine folds the int8-stored weights into float32 once, at load;
  this row adds what folding them on every call would cost.

Options are timed in turns (each repeat runs every option once), so a slow spell of a shared machine spreads
over all of them. "Adopt" needs the tolerance and a speed-up past NOISE, this machine's run-to-run spread.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from token2wav import Token2Wav
from token2wav.cpu import detect_cpu
from token2wav.models.hifigan import LRELU_SLOPE, HiFiGANGenerator, vocode_stream

TOLERANCE = 5e-5  # relative to the peak: the streamed == offline bound of tests/test_demo_latency.py
NOISE = 1.15  # median-of-3 times of one option vary by up to ~10 % between runs on the shared 2-core VM


def demo_mel(t2w: Token2Wav) -> torch.Tensor:
    tokens = json.loads((Path(t2w.config.path).parent / "demo_tokens.json").read_text())["utterances"][1]["tokens"]
    with t2w.stream(t2w.speaker_prompt("rms"), output="mel", hop=32) as session:
        mels = session.push(tokens)
        mels.append(session.finish())
    return torch.from_numpy(np.concatenate([m for m in mels if m.size], axis=-1))[None].float()


def channels_first(g: HiFiGANGenerator, mel: torch.Tensor) -> torch.Tensor:
    """The generator on [B, C, T] with 1-D convolutions (the layout before channels-last)."""
    def conv(c, x):
        return F.conv1d(x, c.effective_weight(), c.bias, c.stride, c.padding, c.dilation)

    x = conv(g.conv_pre, mel)
    for i, up in enumerate(g.ups):
        x = F.conv_transpose1d(F.leaky_relu(x, LRELU_SLOPE), up.effective_weight(), up.bias, up.stride, up.padding)
        acc = None
        for j in range(g.num_kernels):
            y = x
            block = g.resblocks[i * g.num_kernels + j]
            for c1, c2 in zip(block.convs1, block.convs2):
                y = y + conv(c2, F.leaky_relu(conv(c1, F.leaky_relu(y, LRELU_SLOPE)), LRELU_SLOPE))
            acc = y if acc is None else acc + y
        x = acc / g.num_kernels
    return torch.tanh(conv(g.conv_post, F.leaky_relu(x, 0.01)))[:, 0]


def streamed(g: HiFiGANGenerator, mel: torch.Tensor, hop: int = 32) -> torch.Tensor:
    state, out = None, []
    for i in range(0, mel.shape[-1], hop):
        audio, state = vocode_stream(g, mel[:, :, i : i + hop], state, final=i + hop >= mel.shape[-1])
        out.append(audio)
    return torch.cat(out, dim=1)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out = out.float().reshape(ref.shape)
    err = (out - ref).abs().max().item()
    noise = (out - ref).pow(2).mean().sqrt().item()
    signal = ref.pow(2).mean().sqrt().item()
    snr = float("inf") if noise == 0 else 20 * np.log10(signal / noise)
    return {"max_abs_error": err, "snr_db": snr}


def onnx_runner(g: HiFiGANGenerator, mel: torch.Tensor, threads: int) -> Callable[[], torch.Tensor] | str:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime as ort
    except ImportError as exc:
        return f"skipped: {exc.name} is not installed (pip install onnx onnxruntime)"
    path = Path(tempfile.mkdtemp()) / "hifigan.onnx"
    torch.onnx.export(g, (mel,), str(path), input_names=["mel"], output_names=["audio"],
                      dynamic_axes={"mel": {2: "frames"}, "audio": {2: "samples"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"mel": mel.numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per option; the median is reported")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it takes 10-30 s)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    cpu = detect_cpu()
    t2w = Token2Wav.from_pretrained("demo")
    g = t2w.vocoder.eval()
    mel = demo_mel(t2w)
    seconds = mel.shape[-1] * g.hop_length / g.sampling_rate
    print(f"cpu: {cpu.describe()}\nmel: {mel.shape[-1]} frames = {seconds:.2f} s of audio; torch {torch.__version__}")

    options: list[tuple[str, Callable[[], torch.Tensor] | str, str]] = []
    options.append(("float32 channels-last (engine)", lambda: g(mel), ""))
    options.append(("float32 channels-first", lambda: channels_first(g, mel), ""))

    def native_kernels() -> torch.Tensor:
        with torch.backends.mkldnn.flags(enabled=False):
            return g(mel)

    options.append(("float32, torch's own kernels", native_kernels, "oneDNN off"))
    options.append(("streamed, carried state (32 frames/call)", lambda: streamed(g, mel), ""))
    if cpu.native_bf16:
        half = copy.deepcopy(g).to(torch.bfloat16)
        half.fold_weight_norm()
        options.append(("bfloat16", lambda: half(mel.bfloat16()), ""))
    else:
        options.append(("bfloat16", "skipped: no native bf16 on this CPU (AMX or AVX512-BF16)", ""))
    if args.no_compile:
        options.append(("torch.compile", "skipped (--no-compile)", ""))
    else:
        start = time.perf_counter()
        compiled = torch.compile(g)
        with torch.inference_mode():
            compiled(mel)
        options.append(("torch.compile", lambda: compiled(mel), f"compile {time.perf_counter() - start:.1f} s"))
    options.append(("onnxruntime", onnx_runner(g, mel, args.threads), ""))
    unfolded = copy.deepcopy(g)

    def fold_per_call() -> torch.Tensor:
        unfolded.fold_weight_norm()
        return unfolded(mel)

    options.append(("int8 weights, dequantized per call", fold_per_call, "the engine folds once, at load"))

    with torch.inference_mode():
        ref = g(mel)[:, 0]
        peak = ref.abs().max().item()
        outputs = {name: fn() for name, fn, _ in options if not isinstance(fn, str)}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in outputs}
        for _ in range(args.repeats):
            for name, fn, _ in options:
                if not isinstance(fn, str):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    rows: list[dict] = []
    for name, fn, note in options:
        if isinstance(fn, str):
            rows.append({"option": name, "note": fn})
        else:
            rows.append({"option": name, "s_per_audio_s": statistics.median(times[name]) / seconds, "note": note,
                         **compare(outputs[name], ref)})
    engine_time = rows[0]["s_per_audio_s"]
    print(f"\n{'option':44s} {'s per s of audio':>16s} {'vs engine':>9s} {'max |err|':>10s} {'SNR dB':>7s}  adopt?")
    for row in rows:
        if "s_per_audio_s" not in row:
            print(f"{row['option']:44s} {row['note']}")
            continue
        speed = engine_time / row["s_per_audio_s"]
        exact = row["max_abs_error"] <= TOLERANCE * max(1.0, peak)
        row["speedup_vs_engine"] = speed
        row["within_tolerance"] = exact
        verdict = "engine" if row is rows[0] else ("yes" if exact and speed > NOISE else "no")
        print(f"{row['option']:44s} {row['s_per_audio_s']:16.3f} {speed:8.2f}x {row['max_abs_error']:10.2e} "
              f"{row['snr_db']:7.1f}  {verdict}  {row['note']}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu.as_dict(), "audio_s": seconds, "peak": peak,
                                         "tolerance": TOLERANCE, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
