"""LoRA adapters as program inputs on a backend (the emulator here; the ANE on a Mac), each cost as a ratio to a
reference timed in the same run (absolute times on a shared machine are noise):

* adapter swap: with two adapters resident and the prefill and decode programs loaded, ``set_adapter`` from one to
  the other (a write of the adapter inputs) against what a swap costs without adapter inputs: recompiling the
  programs of the same phases and sizes with the other adapter merged into the base weights (``W + s B A``; graphs
  built, compiled and loaded through a cache that cannot hit). Checked, not timed: the swaps compile nothing, and
  after a swap the logits equal those of a model built from the merged weights (the largest error is recorded);
* per-token cost: greedy generation with the adapter programs (an adapter active) against the base model (no
  adapters, same weights): prefill time, decode time per token, the decode programs' evaluation alone, dispatches
  per token, and the input surfaces each program binds: every input of a program gets a surface of the largest
  input's size (reference section 5), so the adapter inputs add surfaces, and can raise the size of all of them.

The model is GPT-2-shaped with random weights (``--layers 12`` is GPT-2 124M's depth; the default 4 keeps the run
short on the emulator); the adapters come from ``orion.lora.new_adapter`` with a random, nonzero B.

    python benchmarks/lora.py [--backend emulator] [--layers 4] [--d 768] [--heads 12] [--vocab 2048]
                              [--targets qkv] [--rank 16] [--prompt 96] [--new-tokens 24] [--threads 1]
                              [--json benchmarks/results/lora.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orion.lora import Adapter, new_adapter
from orion.models import model_backend
from orion.models.bench import interleave
from orion.models.gpt2 import (
    GPT2,
    LORA_MODULES,
    GPT2Config,
    adapter_spec,
    blocks_per_program,
    bucket_for,
    decode_graph,
    gpt2_weights,
    prefill_graph,
)
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from orion.runtime.program import Program
from common import paired, write_report  # noqa: E402

#: Standard deviation of the adapters' random B: large enough that an adapter changes the logits well past the
#: fp16 error of the comparison with merged weights, so that check can fail.
B_STD = 0.05
#: Tolerance of the merged-weights check, as a fraction of the largest reference logit (the GPT-2 tests' bound).
LOGIT_TOLERANCE = 0.02


def random_state(config: GPT2Config, seed: int) -> dict[str, np.ndarray]:
    """GPT-2's tensors (Hugging Face names and Conv1D ``[in, out]`` layout) at GPT-2's init scale; the LayerNorms
    get random gamma and beta so folding them into the adapters (``A diag(gamma)``, ``s B A beta``) is exercised."""
    rng = np.random.default_rng(seed)
    d, v, p = config.n_embd, config.vocab_size, config.n_positions

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    state = {"wte.weight": normal((v, d), 0.02), "wpe.weight": normal((p, d), 0.01),
             "ln_f.weight": 1 + normal((d,), 0.1), "ln_f.bias": normal((d,), 0.1)}
    shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}
    for i in range(config.n_layer):
        for norm in ("ln_1", "ln_2"):
            state[f"h.{i}.{norm}.weight"] = 1 + normal((d,), 0.1)
            state[f"h.{i}.{norm}.bias"] = normal((d,), 0.1)
        for module, shape in shapes.items():
            state[f"h.{i}.{module}.weight"] = normal(shape, 0.02)
            state[f"h.{i}.{module}.bias"] = normal((shape[1],), 0.02)
    return state


def random_adapter(config: GPT2Config, targets: str, rank: int, alpha: float, seed: int) -> Adapter:
    """PEFT's initialization (B = 0) with B then drawn at random, as after some training."""
    adapter = new_adapter(adapter_spec(config), targets, rank, alpha, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    for module in adapter.modules.values():
        module.b[...] = rng.normal(0.0, B_STD, module.b.shape)
    return adapter


def merged_state(state: dict[str, np.ndarray], adapter: Adapter) -> dict[str, np.ndarray]:
    """The base tensors with the adapter merged in: ``W + s B A`` (transposed into GPT-2's ``[in, out]``)."""
    merged = dict(state)
    for (layer, target), module in adapter.modules.items():
        key = f"h.{layer}.{LORA_MODULES[target]}.weight"
        merged[key] = (state[key] + module.delta().T).astype(np.float32)
    return merged


def recompile(state: dict[str, np.ndarray], adapter: Adapter, config: GPT2Config, kinds: list[tuple[str, int]],
              backend, target, budget: CompileBudget) -> tuple[float, float]:
    """A swap without adapter inputs: merge, build the graphs, compile and load every program of ``kinds`` through a
    fresh memory-only cache (it cannot hit). Returns (total seconds, compile + load seconds)."""
    t0 = time.perf_counter()
    _, blocks, _ = gpt2_weights(merged_state(state, adapter), config)
    group = blocks_per_program(target, config.n_layer)
    graphs = [prefill_graph(blocks[first:first + group], first, config, size) if kind == "prefill" else
              decode_graph(blocks[first:first + group], first, config, size, target=target)
              for kind, size in kinds for first in range(0, config.n_layer, group)]
    t1 = time.perf_counter()
    cache = ProgramCache(None)
    programs = [Program.from_graph(g, backend=backend, target=target, cache=cache, budget=budget).load()
                for g in graphs]
    t2 = time.perf_counter()
    if cache.hits:
        raise RuntimeError(f"the recompile reference hit the cache {cache.hits} times; it must compile every program")
    for p in programs:
        p.close()
    return t2 - t0, t2 - t1


def surfaces(programs: list[Program]) -> dict:
    """What each program binds as inputs: how many, one surface size for all, their total, and the packed bytes."""
    return {"inputs": [len(p.plan.inputs) for p in programs],
            "surface_bytes": [p.plan.input_surface_bytes for p in programs],
            "bound_bytes": [len(p.plan.inputs) * p.plan.input_surface_bytes for p in programs],
            "packed_bytes": [sum(size for _, size in p.plan.inputs) for p in programs]}


def generation(model: GPT2, prompt: np.ndarray, new_tokens: int) -> dict:
    list(model.generate_ids(prompt, new_tokens))
    s = model.stats
    return {"prefill_ms": s.prefill_seconds * 1e3, "decode_ms_per_token": s.decode_seconds / s.decode_steps * 1e3,
            "decode_tok_s": s.decode_tok_s, "dispatches_per_token": s.dispatches_per_token, "compiles": s.compiles}


def evaluate_ms(programs: list[Program], repeats: int) -> float:
    """The decode programs alone: the median of each program's evaluation, summed (one token's dispatches)."""
    total = 0.0
    for p in programs:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            p.evaluate()
            times.append(time.perf_counter() - t0)
        total += statistics.median(times)
    return total * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="emulator")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=2048, help="GPT-2's own is 50257 (its classifier runs on the CPU)")
    parser.add_argument("--targets", default="qkv", help="LoRA targets: qkv, o, fc, proj, attn, ffn or all")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--prompt", type=int, default=96, help="prompt tokens (prefill bucket: the next of 32...1024)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--swap-repeats", type=int, default=20)
    parser.add_argument("--recompile-repeats", type=int, default=2)
    parser.add_argument("--gen-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="numpy's BLAS threads (0: one per core; on a busy machine those swing by 10x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/lora.json"))
    args = parser.parse_args()
    if args.new_tokens < 2 or args.prompt < 1 or args.prompt + args.new_tokens > 1024:
        parser.error("give --prompt >= 1 and --new-tokens >= 2 (a decode step to time), together at most 1024")
    if args.threads:
        threadpool_limits(args.threads)

    config = GPT2Config(args.vocab, 1024, args.d, args.layers, args.heads)
    state = random_state(config, args.seed)
    backend = model_backend(args.backend)
    budget = CompileBudget(10_000)
    first = random_adapter(config, args.targets, args.rank, args.alpha, seed=args.seed + 1)
    second = random_adapter(config, args.targets, args.rank, args.alpha, seed=args.seed + 2)
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, args.prompt)
    kinds = [("prefill", bucket_for(args.prompt)), ("decode", bucket_for(args.prompt + args.new_tokens))]
    options = {"backend": backend, "budget": budget}
    results: dict[str, float] = {}
    checks: dict[str, object] = {}
    pairs: dict[str, dict] = {}  # interleaved comparisons, by what they measure

    lora = GPT2(config, state, cache=ProgramCache(None), **options)
    base = GPT2(config, state, cache=ProgramCache(None), **options)
    merged = GPT2(config, merged_state(state, second), cache=ProgramCache(None), **options)
    try:
        lora.add_adapter(first, "first")
        lora.add_adapter(second, "second")
        lora.set_adapter("first")
        print(f"compiling the adapter programs ({', '.join(f'{k} {s}' for k, s in kinds)}) ...", flush=True)
        loaded = [p for kind, size in kinds for p in lora.programs(kind, size)]

        # 1. adapter swap against recompiling the same programs with the other adapter merged in
        used = budget.used
        swaps = []
        for i in range(2 * args.swap_repeats):
            name = "second" if i % 2 == 0 else "first"
            t0 = time.perf_counter()
            lora.set_adapter(name)
            swaps.append(time.perf_counter() - t0)
        checks["swap_compiles"] = budget.used - used
        print(f"recompiling {len(loaded)} programs with the adapter merged, {args.recompile_repeats}x ...", flush=True)
        rebuilt = [recompile(state, second, config, kinds, backend, lora.target, budget)
                   for _ in range(args.recompile_repeats)]
        results["swap_ms"] = statistics.median(swaps) * 1e3
        results["recompile_ms"] = statistics.median(t for t, _ in rebuilt) * 1e3
        results["recompile_compile_load_ms"] = statistics.median(t for _, t in rebuilt) * 1e3

        # sanity: after a swap, the adapter programs compute the merged model (and with no adapter, the base)
        lora.set_adapter("second")
        got, want = lora.logits(prompt), merged.logits(prompt)
        scale = float(np.abs(want).max())
        checks["merged_max_abs_err"] = float(np.abs(got - want).max())
        checks["merged_logit_scale"] = scale
        checks["merged_within_tolerance"] = checks["merged_max_abs_err"] <= LOGIT_TOLERANCE * scale
        checks["merged_top1_agreement"] = float((got.argmax(-1) == want.argmax(-1)).mean())
        lora.set_adapter("first")
        checks["adapter_effect_max_abs"] = float(np.abs(lora.logits(prompt) - got).max())  # what the check can see
        lora.set_adapter(None)
        checks["no_adapter_vs_base_max_abs_err"] = float(np.abs(lora.logits(prompt) - base.logits(prompt)).max())
        lora.set_adapter("first")

        # 2. per-token cost: adapter programs (an adapter active) against the base model, alternating
        print(f"generating {args.new_tokens} tokens after {args.prompt}, 1 + {args.gen_repeats} runs each ...",
              flush=True)
        generation(lora, prompt, args.new_tokens)  # warm-ups (base compiles its programs)
        generation(base, prompt, args.new_tokens)
        gens = interleave([lambda: generation(lora, prompt, args.new_tokens),
                           lambda: generation(base, prompt, args.new_tokens)], args.gen_repeats)
        runs = dict(zip(("lora", "base"), gens))
        for what in ("prefill_ms", "decode_ms_per_token"):
            pairs[what] = paired(f"{what} lora / base", [r[what] for r in runs["lora"]],
                                 [r[what] for r in runs["base"]])
        for key, model in (("lora", lora), ("base", base)):
            rows = runs[key]
            for measure in ("prefill_ms", "decode_ms_per_token", "decode_tok_s"):
                results[f"{key}_{measure}"] = statistics.median(r[measure] for r in rows)
            results[f"{key}_dispatches_per_token"] = rows[-1]["dispatches_per_token"]
            results[f"{key}_decode_evaluate_ms_per_token"] = evaluate_ms(model.programs(*kinds[1]), 5)
            checks[f"{key}_compiles_while_measured"] = sum(r["compiles"] for r in rows)
        io = {f"{key}_{kind}": surfaces(model.programs(kind, size))
              for key, model in (("lora", lora), ("base", base)) for kind, size in kinds}
        layout = lora.lora
    finally:
        for model in (lora, base, merged):
            model.close()

    for kind, _ in kinds:
        for key in ("lora", "base"):
            results[f"{key}_{kind}_input_surface_MB"] = sum(io[f"{key}_{kind}"]["bound_bytes"]) / 1e6
    # what a swap writes: the adapter inputs of every program, packed (the surfaces they sit in are larger)
    results["swap_written_MB"] = sum(sum(io[f"lora_{kind}"]["packed_bytes"]) - sum(io[f"base_{kind}"]["packed_bytes"])
                                     for kind, _ in kinds) / 1e6
    ratios = {
        "recompile_over_swap": results["recompile_ms"] / results["swap_ms"],
        "prefill_lora_over_base": pairs["prefill_ms"]["ratio"],  # medians of the interleaved pairs' ratios
        "decode_per_token_lora_over_base": pairs["decode_ms_per_token"]["ratio"],
        "decode_evaluate_lora_over_base": (results["lora_decode_evaluate_ms_per_token"]
                                           / results["base_decode_evaluate_ms_per_token"]),
    }
    for kind, _ in kinds:
        ratios[f"{kind}_input_surface_lora_over_base"] = (results[f"lora_{kind}_input_surface_MB"]
                                                          / results[f"base_{kind}_input_surface_MB"])

    prefill, decode = kinds[0][1], kinds[1][1]
    table = Table(title=f"LoRA on {args.backend}: {args.layers} layers, d {args.d}; {','.join(layout.targets)} rank "
                        f"{args.rank} (slot {layout.rank}); prompt {args.prompt} + {args.new_tokens} tokens")
    for col in ("measure", "LoRA", "reference", "ratio"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row("swap (set_adapter) vs recompile, ms", f"{results['swap_ms']:.2f}", f"{results['recompile_ms']:.0f}",
                  f"{ratios['recompile_over_swap']:.0f}x faster")
    table.add_row("  recompile: of which compile + load, ms", "", f"{results['recompile_compile_load_ms']:.0f}", "")
    table.add_row("  swap: adapter inputs written, MB", f"{results['swap_written_MB']:.2f}", "", "")
    for what, label, digits in (("prefill_ms", f"prefill {prefill}, ms (vs base)", 0),
                                ("decode_ms_per_token", "decode, ms/token (vs base)", 1)):
        pair = pairs[what]
        table.add_row(label, f"{pair['median']:.{digits}f} ±{pair['spread']:.0%}",
                      f"{pair['reference_median']:.{digits}f} ±{pair['reference_spread']:.0%}",
                      f"{pair['ratio']:.3f} ±{pair['ratio_spread']:.0%}" + ("" if pair["trusted"] else " (noise)"))
    table.add_row("decode, tok/s (vs base)", f"{results['lora_decode_tok_s']:.1f}",
                  f"{results['base_decode_tok_s']:.1f}", "")
    table.add_row("decode programs' evaluation, ms/token", f"{results['lora_decode_evaluate_ms_per_token']:.1f}",
                  f"{results['base_decode_evaluate_ms_per_token']:.1f}",
                  f"{ratios['decode_evaluate_lora_over_base']:.3f}")
    table.add_row("dispatches per token", str(results["lora_dispatches_per_token"]),
                  str(results["base_dispatches_per_token"]), "")
    for kind, size in kinds:
        lo, ba = io[f"lora_{kind}"], io[f"base_{kind}"]
        table.add_row(f"{kind} {size}: inputs x surface KB, program 0",
                      *(f"{x['inputs'][0]} x {x['surface_bytes'][0] / 1e3:.0f}" for x in (lo, ba)), "")
        table.add_row(f"{kind} {size}: input surfaces, MB, all programs",
                      *(f"{results[f'{key}_{kind}_input_surface_MB']:.2f}" for key in ("lora", "base")),
                      f"{ratios[f'{kind}_input_surface_lora_over_base']:.3f}")
    table.add_row("compiles during swaps", str(checks["swap_compiles"]), "", "")
    table.add_row("logits after swap vs merged weights, max err", f"{checks['merged_max_abs_err']:.4f}",
                  f"{LOGIT_TOLERANCE * checks['merged_logit_scale']:.4f}",
                  "ok" if checks["merged_within_tolerance"] else "FAILED")
    table.add_row("  (the adapters' own effect on the logits)", f"{checks['adapter_effect_max_abs']:.4f}", "", "")
    table.add_row("no adapter vs base model, max err", f"{checks['no_adapter_vs_base_max_abs_err']:.4f}", "", "")
    Console(width=120).print(table)

    report = {
        "backend": args.backend, "threads": args.threads or "one per core",
        "config": {k: str(v) for k, v in vars(args).items()},
        "layout": {"targets": list(layout.targets), "rank": layout.rank},
        "programs": {"prefill_bucket": prefill, "decode_capacity": decode,
                     "per_phase": len(io["lora_prefill"]["inputs"])},
        "results": results, "ratios": ratios, "checks": checks, "input_surfaces": io, "compiles": budget.used,
        "pairs": {key: {k: v for k, v in pair.items() if k != "warning"} for key, pair in pairs.items()},
    }
    write_report(args.json, report)
    if checks["swap_compiles"] or not checks["merged_within_tolerance"]:
        sys.exit("a check failed: swaps must not compile and must compute the merged model")


if __name__ == "__main__":
    main()
