#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine, under 8 minutes, with only the
# packages of its image (torch, cupy, torchvision, numpy, pandas, rich, pytest,
# nvidia-ml-py): the GPU tests, then the smoke, resnet50-dcn, dtypes,
# internimage, flash-internimage, rfcn-dpsroi and faster-rcnn-dpool suites on
# CUDA. Everything it writes lands in one tarball under $OUT (the device
# tool brings back at most 8 files) or under results/local/ elsewhere.
#
#   bash scripts/gpu-check.sh            # from a plain checkout
#
# Each step has its own time limit so a slow step cannot eat the others'.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d)/gpu-check-$stamp
mkdir -p "$work"
dest=${OUT:-results/local}
mkdir -p "$dest"

step() {  # step NAME SECONDS COMMAND...: run, log, remember the exit code
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$work/$name.log"
    echo "$name exit ${PIPESTATUS[0]}" | tee -a "$work/exit-codes.txt"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv > "$work/nvidia-smi.csv" 2>&1
# The emulator and build-check tests need CPU-side tooling (g++, ml_dtypes, the
# NVRTC wheels) that the GPU image lacks, and hold no GPU tests.
step gpu-tests 90 python3 -m pytest -q -m gpu tests -p no:cacheprovider -x \
    --ignore=tests/emulator --ignore=tests/test_build_check.py --ignore=tests/reports
# Short timing windows: the whole script must fit one 8-minute call. A step cut
# off by its limit gets SIGINT: the runner keeps every finished row.
fast=(--warmup-ms 5 --rep-ms 20)
step smoke 45 python3 -m harness run --suite smoke --device cuda --out "$work/smoke" "${fast[@]}"
step resnet50-dcn 70 python3 -m harness run --suite resnet50-dcn --device cuda \
    --out "$work/resnet50-dcn" "${fast[@]}"
step dtypes 60 python3 -m harness run --suite dtypes --device cuda --out "$work/dtypes" "${fast[@]}"
step internimage 75 python3 -m harness run --suite internimage --device cuda \
    --out "$work/internimage" "${fast[@]}"
step flash-internimage 30 python3 -m harness run --suite flash-internimage --device cuda \
    --out "$work/flash-internimage" "${fast[@]}"
step rfcn-dpsroi 30 python3 -m harness run --suite rfcn-dpsroi --device cuda \
    --out "$work/rfcn-dpsroi" "${fast[@]}"
step faster-rcnn-dpool 30 python3 -m harness run --suite faster-rcnn-dpool --device cuda \
    --out "$work/faster-rcnn-dpool" "${fast[@]}"

tar -czf "$dest/gpu-check-$stamp.tar.gz" -C "$(dirname "$work")" "$(basename "$work")"
cp "$work/exit-codes.txt" "$dest/gpu-check-$stamp-exit-codes.txt"
echo "results: $dest/gpu-check-$stamp.tar.gz"
cat "$work/exit-codes.txt"
