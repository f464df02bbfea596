"""Emulator speed on a GPT-2 124M-sized transformer block (d 768, 12 heads), against the block's own FLOPs done as
plain float32 numpy matmuls in the same run, so the cost of emulating ANE numerics shows as a ratio.

The emulator runs the block's MIL with the ``fp32`` accumulator (BLAS matmuls plus the fp16 rounding and output
rules after every op). The reference multiplies the same conv weights by activations of the block's shape and does
the attention's two batched matmuls, nothing else: the time a float32 numpy forward pass could not go below. The
two sides' runs are interleaved; the table gives medians, their spread and the median of the per-pair ratios.

    python benchmarks/emulator.py [--d 768] [--heads 12] [--seqs 16 128] [--repeats 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.transformer_block import add_block  # noqa: E402
from orion.compiler.compile import compile_graph  # noqa: E402
from orion.ir.builder import GraphBuilder  # noqa: E402
from orion.ir.graph import Graph  # noqa: E402
from orion.runtime.backends.emulator import EmulatedProgram, load_program  # noqa: E402
from orion.runtime.backends.numerics import Numerics  # noqa: E402
from common import compare, write_report  # noqa: E402


def block_graph(d: int, heads: int, seq: int, seed: int = 0) -> Graph:
    b = GraphBuilder("block")
    x = b.input("x", (1, d, 1, seq))
    b.output("y", add_block(b, x, d, heads, np.random.default_rng(seed)))
    return b.graph


def emulated(graph: Graph, directory: Path) -> EmulatedProgram:
    compile_graph(graph, "default").module.write(directory)
    return load_program(directory, Numerics(accumulator="fp32"))


def reference_matmuls(graph: Graph, d: int, heads: int, seq: int, rng: np.random.Generator) -> Callable[[], None]:
    """The block's matmuls in float32: every conv weight [O, I] times an [I, seq] activation, and per head
    q k^T ([S, hd] x [hd, S]) and probabilities times v ([S, S] x [S, hd])."""
    pairs = []
    for node in graph.nodes:
        if node.op == "conv":
            w = node.inputs["weight"].producer.attrs["val"]
            w2 = np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.float32)
            pairs.append((w2, rng.normal(size=(w2.shape[1], seq)).astype(np.float32)))
    hd = d // heads
    q = rng.normal(size=(heads, seq, hd)).astype(np.float32)
    kt = rng.normal(size=(heads, hd, seq)).astype(np.float32)
    p = rng.normal(size=(heads, seq, seq)).astype(np.float32)
    v = rng.normal(size=(heads, seq, hd)).astype(np.float32)

    def run() -> None:
        for w2, act in pairs:
            np.matmul(w2, act)
        np.matmul(q, kt)
        np.matmul(p, v)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seqs", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/emulator.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="orion-bench-emulator-") as tmp:
        for seq in args.seqs:
            graph = block_graph(args.d, args.heads, seq)
            program = emulated(graph, Path(tmp) / f"seq{seq}")
            feed = {"x": rng.normal(0.0, 1.0, (1, args.d, 1, seq)).astype(np.float16)}
            c = compare(f"seq {seq} emulator / matmuls", functools.partial(program.run, feed),
                        reference_matmuls(graph, args.d, args.heads, seq, rng), args.repeats)
            ops = sum(1 for st in program.program.statements if st.op != "const")
            rows.append({"seq": seq, "ops": ops, "emulator_ms": c["ms"], "emulator_spread": c["spread"],
                         "numpy_matmul_ms": c["reference_ms"], "numpy_matmul_spread": c["reference_spread"],
                         "overhead_ratio": c["ratio"], "ratio_spread": c["ratio_spread"], "trusted": c["trusted"]})

    table = Table(title=f"emulator, one block d {args.d} ({args.heads} heads), accumulator fp32, medians of "
                        f"{args.repeats} interleaved runs (± interquartile range / median)")
    for column in ("seq", "ops", "emulator ms", "float32 matmuls ms", "emulator / matmuls"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["seq"]), str(r["ops"]), f"{r['emulator_ms']:.2f} ±{r['emulator_spread']:.0%}",
                      f"{r['numpy_matmul_ms']:.2f} ±{r['numpy_matmul_spread']:.0%}",
                      f"{r['overhead_ratio']:.2f}x ±{r['ratio_spread']:.0%}" + ("" if r["trusted"] else " (noise)"))
    Console(width=110).print(table)
    write_report(args.json, {"config": {"d": args.d, "heads": args.heads, "repeats": args.repeats,
                                        "accumulator": "fp32"}, "results": rows})


if __name__ == "__main__":
    main()
