"""What every benchmark shares: a median timing, the machine it ran on, and its JSON report written atomically."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from orion import __version__
from orion.fileio import write_atomic


def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0) -> float:
    """Median seconds of ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "orion_version": __version__}


def write_report(path: Path, report: dict) -> None:
    """``report`` with the machine's description, as JSON at ``path`` (written atomically: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"machine": machine(), **report}, indent=2) + "\n")
    print(f"wrote {path}")
