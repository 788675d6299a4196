"""What a result depends on besides the code: the machine, the versions, the commit."""

from __future__ import annotations

import datetime
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from harness import nvml, registry

REPO_ROOT = Path(__file__).resolve().parent.parent


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the checkout the harness runs from (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def use_contract_precision() -> None:
    """GEMMs as the contract asks: float32 without TF32, half types reduced in float32.

    torch allows fp16/bf16 GEMMs to reduce partial sums in half by default,
    which breaks "accumulate in float32"; TF32 would judge float32 by TF32's
    tolerance. ``collect`` records the settings with every run.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def collect(device: str) -> dict[str, Any]:
    """Metadata of this machine and software for a run on ``device``."""
    cuda = device == "cuda"
    return {
        "time": utc_now(),
        "host": socket.gethostname(),
        "git": git_state(),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "driver": nvml.driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "cupy": _version("cupy"),
            "numpy": _version("numpy"),
        },
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "half_reduced_precision_reduction": {
            "fp16": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "bf16": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        },
        **registry.run_metadata(),  # "peers": harness.operators.peer_packages
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
