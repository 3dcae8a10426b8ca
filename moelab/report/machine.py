"""What a figure ran on, written beside it: the GPU's name, or the CPU's model and cores.

`platform.processor()` is empty on most Linux systems, so the CPU's model comes from
/proc/cpuinfo where there is one.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str | torch.device) -> str:
    """"NVIDIA H200" for a CUDA device; "AMD EPYC 7B13 (2 cores)" for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"
