"""Compile a GPT-2 124M-sized stack (12 blocks, d 768, random weights) and time each stage.

    python benchmarks/compile.py [--layers 12] [--d 768] [--seq 64] [--json benchmarks/results/compile.json]

Stages: building the IR, the pass pipeline, MIL text emission, and writing the weight files. The weight-writing rate
is reported next to a plain write (+ fsync) of the same bytes measured in the same run, as a ratio: absolute times on
shared machines are noise. The two writes take turns (A B, B A, ...); the ratio is the median of the per-pair
ratios, flagged when they spread too wide to trust. Goals: text emission under 1 s; weight writing within 1.5x of the plain write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from orion.compiler.passes import default_passes, run_pipeline
from orion.compiler.targets import get_target
from orion.ir.builder import GraphBuilder
from orion.mil.emit import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.transformer_block import add_block  # noqa: E402
from common import paired, spread, timed_once, write_report  # noqa: E402


def build_stack(layers: int, d: int, heads: int, seq: int):
    rng = np.random.default_rng(0)
    b = GraphBuilder("gpt2_stack")
    x = b.input("x", (1, d, 1, seq))
    mask = b.causal_mask(seq)
    for i in range(layers):
        with b.scope(f"h{i}"):
            x = add_block(b, x, d, heads, rng, mask)
    b.output("y", x)
    return b.graph


def plain_write(directory: Path, arrays: list[np.ndarray]) -> float:
    """The reference: the same bytes written with f.write and fsynced, one file per array."""
    t0 = time.perf_counter()
    for i, a in enumerate(arrays):
        with open(directory / f"plain{i}.bin", "wb") as f:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/compile.json"))
    args = parser.parse_args()
    target = get_target("default")

    rows: dict[str, list[float]] = {k: [] for k in ("ir", "passes", "text", "weights", "plain_write")}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        graph = build_stack(args.layers, args.d, args.heads, args.seq)
        t1 = time.perf_counter()
        optimized = run_pipeline(graph, default_passes(target))
        t2 = time.perf_counter()
        module = emit(optimized, version=target.mil_version)
        t3 = time.perf_counter()
        arrays = [a for file in module.weight_files.values() for a in file]
        with tempfile.TemporaryDirectory(dir=".") as tmp:  # the weights and the plain write in turns: A B, B A, ...
            writes = [lambda: rows["weights"].append(timed_once(lambda: module.write(Path(tmp) / "model"))),
                      lambda: rows["plain_write"].append(plain_write(Path(tmp), arrays))]
            for write in writes if len(rows["ir"]) % 2 == 0 else writes[::-1]:
                write()
        rows["ir"].append(t1 - t0)
        rows["passes"].append(t2 - t1)
        rows["text"].append(t3 - t2)

    med = {k: statistics.median(v) for k, v in rows.items()}
    weight_bytes = module.weight_bytes()
    pair = paired("weights / plain write", rows["weights"], rows["plain_write"])
    ratio = pair["ratio"]
    result = {
        "config": vars(args) | {"json": str(args.json)},
        "statements": len(module.program.statements),
        "weight_files": len(module.weight_files),
        "weight_bytes": weight_bytes,
        "median_seconds": med,
        "all_seconds": rows,
        "weights_MBps": weight_bytes / med["weights"] / 1e6,
        "plain_write_MBps": weight_bytes / med["plain_write"] / 1e6,
        "spread": {k: spread(v) for k, v in rows.items()},
        "weights_vs_plain_write": ratio,
        "weights_vs_plain_write_spread": pair["ratio_spread"],
        "weights_vs_plain_write_trusted": pair["trusted"],
        "goals": {"text_under_1s": med["text"] < 1.0, "weights_within_1.5x_plain": ratio <= 1.5},
    }
    table = Table(title=f"compile: {args.layers} blocks, d {args.d}, seq {args.seq} "
                        f"({len(module.program.statements)} statements, {weight_bytes / 2**20:.0f} MiB of weights)")
    table.add_column("stage")
    table.add_column("median s", justify="right")
    table.add_column("note")
    table.add_row("IR build", f"{med['ir']:.3f}", "")
    table.add_row("passes", f"{med['passes']:.3f}", "")
    table.add_row("MIL text", f"{med['text']:.3f}", "goal < 1 s: " + ("met" if med["text"] < 1 else "MISSED"))
    table.add_row("weight files", f"{med['weights']:.3f}", f"{result['weights_MBps']:.0f} MB/s")
    table.add_row("plain write+fsync", f"{med['plain_write']:.3f}", f"{result['plain_write_MBps']:.0f} MB/s")
    table.add_row("weights / plain", f"{ratio:.2f}x ±{pair['ratio_spread']:.0%}",
                  "goal <= 1.5x: " + ("met" if ratio <= 1.5 else "MISSED") + ("" if pair["trusted"] else " (noise)"))
    Console(width=110).print(table)
    write_report(args.json, result)


if __name__ == "__main__":
    main()
