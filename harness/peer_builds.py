"""Install the carried peer packages on the GPU machine: a step of the GPU check.

The GPU image has no network and not our peers, so they travel in ``.whl/``
(git-ignored, named in the device call's ``carry``), fetched beforehand by
``scripts/fetch-peers.sh`` where PyPI is reachable:

- wheels (``*.whl``): deformops 3.0.1 (pure Python) and the build tools the
  sdists want (setuptools >= 77, packaging >= 24.2), installed with
  ``pip --no-index --no-deps --target SITE``;
- sdists (``*.tar.gz``): torch-ms-deform-attn 0.1.1 and DCNv4 1.0.0.post2,
  built against the image's torch and CUDA toolkit, for this GPU's
  architecture only (``TORCH_CUDA_ARCH_LIST``), all cores (``MAX_JOBS``), both
  at once, with ``--no-build-isolation`` (no index to fetch build tools from).

Every later step of the GPU check has SITE on its ``PYTHONPATH``. Each
package's outcome, seconds and log tail go to ``peer-builds.json`` in the
check's work directory: the build times the closing notes report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LOG_TAIL = 3000  # characters of a failed build's log kept in peer-builds.json


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-cache-dir", "--upgrade", *args]


def _cuda_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def install(wheels: Path, site: Path, work: Path) -> int:
    """Install the wheels, then build the sdists in parallel; 0 when every package installed."""
    site.mkdir(parents=True, exist_ok=True)
    outcomes = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "MAX_JOBS": str(os.cpu_count() or 1)}
    built = sorted(wheels.glob("*.whl"))
    if built:
        start = time.monotonic()
        done = subprocess.run(_pip("--target", str(site), *map(str, built)), env=env,
                              capture_output=True, text=True)
        outcomes.append({"packages": [p.name for p in built], "kind": "wheels",
                         "status": "ok" if done.returncode == 0 else "failed",
                         "seconds": round(time.monotonic() - start, 1),
                         "log": (done.stdout + done.stderr)[-LOG_TAIL:]})
    sdists = sorted(wheels.glob("*.tar.gz"))
    if sdists:
        env["TORCH_CUDA_ARCH_LIST"] = _cuda_arch()
    builds = {}
    for sdist in sdists:
        log = (work / f"build-{sdist.name.removesuffix('.tar.gz')}.log").open("w")
        builds[sdist] = (time.monotonic(), log, subprocess.Popen(
            _pip("--no-build-isolation", "--target", str(site), str(sdist)), env=env,
            stdout=log, stderr=subprocess.STDOUT))
    for sdist, (start, log, process) in builds.items():
        process.wait()
        seconds = round(time.monotonic() - start, 1)
        log.close()
        outcomes.append({"packages": [sdist.name], "kind": "sdist", "status":
                         "ok" if process.returncode == 0 else "failed", "seconds": seconds,
                         "cuda_arch": env["TORCH_CUDA_ARCH_LIST"],
                         "log": Path(log.name).read_text(errors="replace")[-LOG_TAIL:]})
    (work / "peer-builds.json").write_text(json.dumps(outcomes, indent=1) + "\n")
    for outcome in outcomes:
        print(f"{outcome['status']:6} {outcome['seconds']:6.1f} s  {', '.join(outcome['packages'])}")
    return 0 if all(o["status"] == "ok" for o in outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.peer_builds",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, required=True, help="the carried .whl/ folder")
    parser.add_argument("--site", type=Path, required=True, help="where to install them")
    parser.add_argument("--work", type=Path, required=True, help="where peer-builds.json goes")
    options = parser.parse_args(argv)
    return install(options.wheels, options.site, options.work)


if __name__ == "__main__":
    sys.exit(main())
