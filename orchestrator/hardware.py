"""Hardware detection (NVIDIA via nvidia-smi, more in the fit work). Returns catalog entries."""

from __future__ import annotations

import shutil
import subprocess

from . import catalog
from .catalog import Gpu


def detect_gpu() -> tuple[Gpu, int] | None:
    """The first NVIDIA GPU model and how many there are, or None when none is visible."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [n.strip() for n in out.splitlines() if n.strip()]
    if not names:
        return None
    try:
        return catalog.find_gpu(names[0]), len(names)
    except catalog.UnknownGpu:
        return None
