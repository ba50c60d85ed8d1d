"""What machine a measurement ran on.

Training speed and timings differ about 2.4x between the CPUs this project has run on, so training logs and
benchmark reports record the CPU next to their figures.
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it, else what :mod:`platform` knows, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
