#!/usr/bin/env bash
# Wheels that benchmarks/gpu.sh installs on a device whose Python has torch and numpy but none of our other
# dependencies, fetched here (the device reaches no network):
#
#   benchmarks/gpu_wheels.sh .gpu-wheels [PYTHON_VERSION ...]     # default: 3.10 3.11 3.12 3.13 (7.8 MB)
#   then, with the device tool:  run(command="T2W_WHEELS=.gpu-wheels benchmarks/gpu.sh $OUT", carry=[".gpu-wheels"])
#
# No numpy (torch brings it) and no matplotlib (tens of MB with its dependencies; gpu.sh then skips the plots,
# which can be drawn here from the JSON it writes: `token2wav bench` has no separate plot command, so load the
# JSON and call token2wav.bench.plot).
set -euo pipefail
dir="${1:?usage: benchmarks/gpu_wheels.sh DIR [PYTHON_VERSION ...]}"
shift
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)
for version in "${versions[@]}"; do
    "${PYTHON:-python3}" -m pip download -q -d "$dir" --no-deps --only-binary=:all: --python-version "$version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        safetensors PyYAML soundfile cffi pycparser tqdm pytest pluggy iniconfig packaging pygments \
        typing_extensions
done
du -sh "$dir"
