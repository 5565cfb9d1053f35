"""What a result was measured on and with: device, versions, commit."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} (CPU), torch threads={torch.get_num_threads()}"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: ``nvidia-h100-80gb-hbm3``, ``cpu-intel-r-xeon-r-processor-2core-1thread``."""
    if device.type == "cuda":
        base = torch.cuda.get_device_name(device)
    else:
        base = f"cpu {_cpu_model()} {os.cpu_count()}core {torch.get_num_threads()}thread"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def git_commit() -> str:
    """``NNK_GIT_COMMIT`` if set (machines that get a copy of the tree without
    .git), else ``git rev-parse`` of this checkout, with ``-dirty`` when
    tracked files differ from it."""
    if os.environ.get("NNK_GIT_COMMIT"):
        return os.environ["NNK_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import nnk

    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": version("triton"),
        "nnk": nnk.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "nnk_build": nnk.ops.build_info(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "peers": {d: version(d) for d in ("liger-kernel", "cut-cross-entropy", "pytorch-metric-learning")},
    }
