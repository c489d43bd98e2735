#!/usr/bin/env bash
# One prepared device check (issue [1/6]); at most 8 minutes on one H200 (each step has a time limit).
#
#   benchmarks/gpu.sh OUT_DIR                 # CUDA: parity tests (fp32, TF32 off), half-precision streams,
#                                             # bench in bfloat16 at 1, 4, 16, 64 sessions: unbatched,
#                                             # batched, batched with CUDA graphs (CosyVoice 3 and 2)
#   benchmarks/gpu.sh OUT_DIR --device cpu --quick   # the same steps, tiny sizes, on the CPU (tested in CI)
#
# The device's Python may lack some of our dependencies (it has torch; no FastAPI is needed here): wheels in
# $T2W_WHEELS (a folder carried along with the command, made here with benchmarks/gpu_wheels.sh) are
# installed from that folder only, never from the network.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:?usage: benchmarks/gpu.sh OUT_DIR [--device cuda|cpu] [--quick]}"
shift
device=cuda
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
py="${PYTHON:-python3}"

if [ -n "${T2W_WHEELS:-}" ] && [ -d "$T2W_WHEELS" ]; then
    # one at a time: a package missing from the folder (matplotlib, by default) must not block the others
    for pair in safetensors:safetensors PyYAML:yaml soundfile:soundfile tqdm:tqdm pytest:pytest \
        matplotlib:matplotlib; do
        package="${pair%%:*}" module="${pair##*:}"
        "$py" -c "import $module" 2>/dev/null && continue
        "$py" -m pip install -q --no-index --find-links "$T2W_WHEELS" "$package" 2>&1 | tail -1 || true
    done
fi
plots=()
if "$py" -c "import matplotlib" 2>/dev/null; then plots=(--plots "$out/plots"); else
    echo "gpu.sh: no matplotlib here: no plots (draw them from bench.json with token2wav.bench.plot)"; fi
# the source tree, not an installed copy: nothing to build on the device
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$quick" = 1 ]; then
    models=(--model tiny); seconds=1; sessions=1,2; utterance=2; bench_model=(--model tiny)
else
    models=(--model cv3 --model cv2); seconds=30; sessions=1,4,16,64; utterance=10; bench_model=(--model cv3 --model cv2)
fi

# Each step has a time limit (seconds; T2W_STEP_SECONDS="parity half bench"), so that one slow step cannot use
# up the device time of the others; the bench rewrites its JSON after every row, so a cut-short bench keeps
# the rows it measured ("complete": false). Logs go to $out too: they come back even when the run is cut.
read -r parity_s half_s bench_s <<< "${T2W_STEP_SECONDS:-120 90 270}"
status=0
step() {  # step SECONDS LOG COMMAND...: run with a time limit, log to $out/LOG, never stop the script
    local limit="$1" log="$2"
    shift 2
    timeout "$limit" "$@" > "$out/$log" 2>&1 || { rc=$?; status=1;
        if [ "$rc" = 124 ]; then echo "   cut at ${limit} s (see $log)"; else echo "   failed: exit $rc (see $log)"; fi; }
    tail -3 "$out/$log"
}

echo "== 1/3 parity on $device (fp32, TF32 off): reference fixtures, batched == alone, graphs == alone"
step "$parity_s" parity.txt env T2W_TEST_DEVICE="$device" "$py" -m pytest -o addopts= -q -p no:cacheprovider \
    tests/test_device_parity.py

echo "== 2/3 half precision: ${seconds} s streams, finite audio"
step "$half_s" half_precision.log "$py" benchmarks/half_precision_check.py --device "$device" "${models[@]}" \
    --seconds "$seconds" --json "$out/half_precision.json"

echo "== 3/3 bench in bfloat16, unbatched / batched / batched with graphs, sessions $sessions"
step "$bench_s" bench.log "$py" -m token2wav bench "${bench_model[@]}" --device "$device" --dtype bfloat16 \
    --modes offline,cached --utterance "$utterance" --sessions "$sessions" --graphs --same-process \
    --json "$out/bench.json" ${plots[@]+"${plots[@]}"}
echo "gpu.sh: done (status $status); results in $out"
exit "$status"
