"""What every benchmark shares: a median timing, two sides timed in interleaved repetitions with their ratio (the
helpers ``orion bench gpt2`` uses), the machine it ran on, and its JSON report written atomically."""

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
from orion.models.bench import TRUSTED_SPREAD, interleave, paired_ratio, spread


def timed_once(fn: Callable[[], object]) -> float:
    """Seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0) -> float:
    """Median seconds of ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_once(fn) for _ in range(repeats))


def compare(what: str, ours: Callable[[], object], reference: Callable[[], object], repeats: int,
            warmup: int = 1) -> dict:
    """``ours`` against ``reference``, their repetitions interleaved (A B, B A, ...) after ``warmup`` untimed calls
    of each: :func:`paired` of their seconds, with the medians in ms."""
    for _ in range(warmup):
        ours()
        reference()
    mine, theirs = interleave([lambda: timed_once(ours), lambda: timed_once(reference)], repeats)
    pair = paired(what, mine, theirs)
    return {**pair, "ms": pair["median"] * 1e3, "reference_ms": pair["reference_median"] * 1e3}


def paired(what: str, ours: list[float], reference: list[float]) -> dict:
    """Measures already taken in interleaved pairs (in any unit): their medians and spreads, the median of the
    per-pair ratios with its spread, and the warning (also printed) when that spread is too wide to trust."""
    ratio, ratio_spread, warning = paired_ratio(what, ours, reference)
    if warning:
        print(f"warning: {warning}", flush=True)
    return {"median": statistics.median(ours), "spread": spread(ours), "reference_median": statistics.median(reference),
            "reference_spread": spread(reference), "ratio": ratio, "ratio_spread": ratio_spread,
            "trusted": ratio_spread <= TRUSTED_SPREAD, "warning": warning, "repeats": len(ours)}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "orion_version": __version__}


def write_report(path: Path, report: dict) -> None:
    """``report`` with the machine's description, as JSON at ``path`` (written atomically: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"machine": machine(), **report}, indent=2) + "\n")
    print(f"wrote {path}")
