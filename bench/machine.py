"""Where a bench ran: machine, runtime versions (every registered backend's) and threads, recorded with every result."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ats_deploy import __version__, backends
from ats_deploy.backends import Backend


def cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe(threads: int | None, measured: Sequence[Backend]) -> dict[str, Any]:
    """The machine, every registered runtime's version (``None``: not installed), and the threads of the CPU
    runtimes ``measured`` ran on (``threads`` from the profile, else what the runtime chooses; the reference's
    are PyTorch's own)."""
    cpu_threads = {b.runtime: threads or b.default_threads for b in measured if b.device == "cpu" and b.exports}
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "runtimes": {
            "ats_deploy": __version__,
            "torch": torch.__version__,
            **{b.runtime: b.version() for b in backends.all_backends() if b.exports},
        },
        "threads": {"pytorch": torch.get_num_threads(), **cpu_threads},
    }
