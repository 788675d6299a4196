#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine, well inside its 8 minutes, with
# only the packages of its image. The steps, their limits, what comes back and
# how to unpack it: harness/gpu_check.py.
#
#   bash scripts/gpu-check.sh            # from a plain checkout; one tarball under $OUT
#   bash scripts/gpu-check.sh --dry-run  # print the steps, check each can start (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 -m harness.gpu_check "$@"
