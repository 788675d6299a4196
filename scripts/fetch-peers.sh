#!/usr/bin/env bash
# Fetch the peer packages the GPU check installs (harness/peer_builds.py) into
# .whl/ (git-ignored), where PyPI is reachable; the device call then carries
# .whl. The GPU image has Python 3.12 and no network.
#
#   bash scripts/fetch-peers.sh     # then: run(..., carry=[".whl"]) with scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# A Python with torch: the sdists' metadata imports it (PYTHON=/path/to/venv/bin/python).
pip=("${PYTHON:-python3}" -m pip download --no-deps -d .whl)
# Pure-Python wheels for the image's Python 3.12: deformops and the build tools
# torch-ms-deform-attn's pyproject asks for (the image's setuptools may be older).
"${pip[@]}" --only-binary=:all: --python-version 3.12 --implementation cp \
    deformops==3.0.1 "setuptools==80.9.0" "packaging==25.0"
# The sdists, built on the GPU machine. pip reads an sdist's metadata before it
# saves it, and DCNv4's setup.py raises without a visible GPU: a sitecustomize
# that lets torch report one, for this download only, gets past it.
"${pip[@]}" --no-binary=:all: --no-build-isolation torch-ms-deform-attn==0.1.1
shim=$(mktemp -d)
printf 'import torch\ntorch.cuda.is_available = lambda: True\n' > "$shim/sitecustomize.py"
PYTHONPATH="$shim" "${pip[@]}" --no-binary=:all: --no-build-isolation DCNv4==1.0.0.post2
rm -r "$shim"
ls -l .whl
