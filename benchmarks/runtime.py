"""Runtime costs on a backend (the emulator here; the ANE on a Mac), each as a ratio to a reference timed in the
same run, the two sides' repetitions interleaved (A B, B A, ...) with medians, spreads and the median per-pair ratio
(flagged when the pairs spread too wide to trust):

* dispatch overhead: one run of a tiny program through ``Program.run`` against the bare emulated program;
* weight updates for the programs of a GPT-2 124M-sized model (one program per block, 12 blocks, d 768): each
  strategy (reload, patch, weights-as-inputs) against recompiling the same programs; weights-as-inputs also against
  a plain memory copy of the same bytes;
* the program cache: loading with a hit against loading with a miss (a compile).

    python benchmarks/runtime.py [--backend emulator] [--layers 12] [--d 768] [--seq 64] [--json FILE]

Goals: reload/patch at least 20x faster than recompiling; a weights-as-inputs update within 2x of a plain copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.transformer_block import add_block  # noqa: E402
from orion.ir.builder import GraphBuilder  # noqa: E402
from orion.models.bench import interleave  # noqa: E402
from orion.runtime.budget import CompileBudget  # noqa: E402
from orion.runtime.cache import ProgramCache  # noqa: E402
from orion.runtime.program import Program  # noqa: E402
from common import compare, paired, timed, timed_once, write_report  # noqa: E402


def block_graph(layer: int, d: int, heads: int, seq: int, seed: int):
    b = GraphBuilder(f"block{layer}")
    x = b.input("x", (1, d, 1, seq))
    with b.scope(f"h{layer}"):
        b.output("y", add_block(b, x, d, heads, np.random.default_rng(seed)))
    return b.graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="emulator")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each weight update")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/runtime.json"))
    args = parser.parse_args()
    budget = CompileBudget(10_000)
    results: dict[str, float] = {}
    pairs: dict[str, dict] = {}  # interleaved comparisons, by the ratio they give
    tmp = Path(tempfile.mkdtemp(prefix="orion-bench-"))

    # dispatch overhead: a tiny program
    b = GraphBuilder("tiny")
    x = b.input("x", (1, 64, 1, 16))
    b.output("y", b.add(x, 1.0))
    with Program.from_graph(b.graph, backend=args.backend, cache=ProgramCache(None), budget=budget) as tiny:
        feed = {"x": np.ones((1, 64, 1, 16), np.float16)}
        tiny.run(feed)
        bare = getattr(tiny._model, "_program", None)
        if bare is not None:
            pairs["dispatch_program_over_bare"] = c = compare("program / bare dispatch", lambda: tiny.run(feed),
                                                              lambda: bare.run(feed), 200)
            results["dispatch_program_ms"], results["dispatch_bare_ms"] = c["ms"], c["reference_ms"]
        else:
            results["dispatch_program_ms"] = timed(lambda: tiny.run(feed), 200) * 1e3

    # the programs of a GPT-2-sized model
    graphs = [block_graph(i, args.d, args.heads, args.seq, seed=i) for i in range(args.layers)]
    new_graphs = [block_graph(i, args.d, args.heads, args.seq, seed=100 + i) for i in range(args.layers)]
    new_weights = [{n.name: n.attrs["val"] for n in g.nodes if n.is_const and n.attrs["val"].size > 1}
                   for g in new_graphs]
    cache = ProgramCache(tmp / "cache")
    programs = [Program.from_graph(g, backend=args.backend, cache=cache, budget=budget) for g in graphs]
    results["compile_all_s"] = timed(lambda: [p.load() for p in programs])  # all misses: compiles
    weight_bytes = sum(a.nbytes for w in new_weights for a in w.values())
    results["weight_MB"] = weight_bytes / 1e6
    strategies = ("recompile", "reload", "patch")
    updates = interleave([lambda s=strategy: timed_once(lambda: [p.update_weights(w, strategy=s)
                                                                 for p, w in zip(programs, new_weights)])
                          for strategy in strategies], args.repeats)
    for strategy, seconds in zip(strategies, updates):
        results[f"update_{strategy}_s"] = statistics.median(seconds)
    for strategy, seconds in zip(strategies[1:], updates[1:]):
        pairs[f"recompile_over_{strategy}"] = paired(f"recompile / {strategy}", updates[0], seconds)
    for p in programs:
        p.close()

    # cache: a second set of programs with the same text hits
    hits = [Program.from_graph(g, backend=args.backend, cache=ProgramCache(tmp / "cache"), budget=budget)
            for g in graphs]
    results["load_cache_hit_s"] = timed(lambda: [p.load() for p in hits])
    for p in hits:
        p.close()
    results["load_cache_miss_s"] = results["compile_all_s"]

    # weights as inputs: an update is a surface write
    names = [list(w) for w in new_weights]
    dynamic = [Program.from_graph(g, backend=args.backend, cache=cache, budget=budget, weights_as_inputs=n)
               for g, n in zip(graphs, names)]
    for p in dynamic:
        p.load()
    targets = [{k: np.empty_like(v, dtype=np.float16) for k, v in w.items()} for w in new_weights]
    pairs["inputs_over_plain_copy"] = c = compare(
        "inputs update / plain copy", lambda: [p.update_weights(w) for p, w in zip(dynamic, new_weights)],
        lambda: [np.copyto(t[k], w[k], casting="unsafe") for t, w in zip(targets, new_weights) for k in w],
        args.repeats + 2, warmup=0)
    results["update_inputs_s"], results["plain_copy_s"] = c["median"], c["reference_median"]
    for p in dynamic:
        p.close()

    ratios = {key: pair["ratio"] for key, pair in pairs.items()}
    ratios["miss_over_hit"] = results["load_cache_miss_s"] / results["load_cache_hit_s"]  # one of each: a miss
    # compiles, so it cannot repeat
    goals = {
        "reload_20x_faster_than_recompile": ratios["recompile_over_reload"] >= 20,
        "patch_20x_faster_than_recompile": ratios["recompile_over_patch"] >= 20,
        "inputs_update_within_2x_plain_copy": ratios["inputs_over_plain_copy"] <= 2,
    }
    table = Table(title=f"runtime on {args.backend}: {args.layers} block programs, d {args.d}, seq {args.seq} "
                        f"({results['weight_MB']:.0f} MB of weights)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}")
    for key, value in ratios.items():
        pair = pairs.get(key)
        table.add_row(key, f"{value:.2f}x" + ("" if pair is None else f" ±{pair['ratio_spread']:.0%}" +
                                              ("" if pair["trusted"] else " (noise)")))
    for key, ok in goals.items():
        table.add_row(key, "met" if ok else "MISSED")
    Console(width=110).print(table)
    write_report(args.json, {"backend": args.backend, "config": {k: str(v) for k, v in vars(args).items()},
                             "results": results, "ratios": ratios, "goals": goals,
                             "pairs": {key: {k: v for k, v in pair.items() if k != "warning"}
                                       for key, pair in pairs.items()}})


if __name__ == "__main__":
    main()
