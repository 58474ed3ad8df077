"""Where a bench ran: machine, runtime versions and thread counts, recorded with every result."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from ats_deploy import __version__


def cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _tensorrt_version() -> str | None:
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return tensorrt.__version__


def describe(onnxruntime_threads: int | None) -> dict[str, Any]:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "runtimes": {
            "ats_deploy": __version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tensorrt": _tensorrt_version(),
        },
        "threads": {
            "pytorch": torch.get_num_threads(),
            "onnxruntime": onnxruntime_threads or "default (one per physical core)",
        },
    }
