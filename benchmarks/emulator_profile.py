"""Where the emulator's time goes in a GPT-2 prefill and decode step: per MIL op type (statements, elements, time,
of which holding the result, its fp16 rounding) and per kind of work (BLAS, rounding, flushing matmul operands,
converting input surfaces, the rest of the ops' arithmetic and Python dispatch, what runs outside the statements).

Timers wrap the emulator's functions in this process only (they add a few microseconds per statement), and read
process CPU time, which another process's load disturbs less than the wall clock. One BLAS thread by default
(``--threads``): on a busy machine OpenBLAS threads wait for each other's cores, and CPU time counts every thread.

    python benchmarks/emulator_profile.py [--model DIR] [--prompt-tokens 128] [--steps 8] [--threads 1]

Without ``--model``, random GPT-2 124M weights are made with transformers (the test extra).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from orion.models import load
from orion.models.bench import make_random_gpt2
from orion.runtime.backends import emulator, numerics
from orion.runtime.cache import ProgramCache


def profile(model_dir: Path, prompt_tokens: int, steps: int) -> dict[str, dict]:
    """Per phase: CPU seconds per prefill or decode step, by kind of work and by op type (timers stay installed)."""
    clock = time.process_time
    model = load(str(model_dir), backend="emulator", accumulator="fp32", cache=ProgramCache(None), head="cpu")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_tokens)
    list(model.generate_ids(ids, max_tokens=4))  # compiles and loads every program the measures run

    kinds: dict[str, float] = defaultdict(float)
    ops: dict[str, list] = defaultdict(lambda: [0, 0, 0.0, 0.0])  # statements, elements, seconds, result holding

    def timing(owner, name: str, kind: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                kinds[kind] += clock() - start

        setattr(owner, name, timed)

    execute, hold_result = emulator.EmulatedProgram._execute, emulator.EmulatedProgram._hold_result

    def timed_execute(self, step, env):
        start = clock()
        result = execute(self, step, env)
        row = ops[step.op.name]
        row[0] += 1
        row[1] += sum(np.size(r) for r in (result if isinstance(result, tuple) else (result,)))
        row[2] += clock() - start
        return result

    def timed_hold_result(self, step, result, arrays):
        start = clock()
        try:
            return hold_result(self, step, result, arrays)
        finally:
            ops[step.op.name][3] += clock() - start

    emulator.EmulatedProgram._execute, emulator.EmulatedProgram._hold_result = timed_execute, timed_hold_result
    numpy_matmul = np.matmul

    class _BlasTimed:  # the emulator's module-level numpy, with matmul timed
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def matmul(*args, **kwargs):
            start = clock()
            try:
                return numpy_matmul(*args, **kwargs)
            finally:
                kinds["BLAS (np.matmul)"] += clock() - start

    emulator.np = _BlasTimed()
    timing(numerics, "round_f32", "fp16 rounding (round_f32)")
    timing(numerics, "flush_subnormals", "flush of matmul operands")
    timing(emulator.EmulatedProgram, "hold", "input surfaces to held values")
    timing(emulator, "output_value", "held values to output surfaces")
    timing(emulator.EmulatedProgram, "_execute", "statements (everything in the ops)")

    report = {}
    for phase in ("prefill", "decode"):
        kinds.clear()
        ops.clear()
        start = clock()
        if phase == "prefill":
            hidden, kv, _ = model._prefill(ids)
            per = 1
        else:
            session = model._session(kv, ids.size, steps + 1)
            start = clock()
            for i in range(steps):
                session.step(int(ids[i]))
            per = steps
        total = clock() - start
        statements = kinds["statements (everything in the ops)"]
        rest = statements - sum(kinds[k] for k in ("BLAS (np.matmul)", "fp16 rounding (round_f32)",
                                                   "flush of matmul operands"))
        report[phase] = {
            "seconds": total / per,
            "kinds": {**{k: v / per for k, v in kinds.items()},
                      "other op arithmetic and dispatch": rest / per,
                      "outside the statements": (total - statements) / per},
            "ops": {name: {"statements": c / per, "elements": e / per, "seconds": s / per, "holding": r / per}
                    for name, (c, e, s, r) in sorted(ops.items(), key=lambda kv: -kv[1][2])},
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GPT-2 folder (default: random 124M weights)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orion-profile-") as tmp, threadpool_limits(args.threads):
        folder = args.model or make_random_gpt2(Path(tmp) / "gpt2")
        report = profile(folder, args.prompt_tokens, args.steps)
    for phase, r in report.items():
        unit = "prefill" if phase == "prefill" else "decode step"
        print(f"\n{unit}: {1000 * r['seconds']:.1f} ms CPU")
        for kind, seconds in r["kinds"].items():
            if kind != "statements (everything in the ops)":
                print(f"  {kind:40s} {1000 * seconds:8.1f} ms  {seconds / r['seconds']:5.0%}")
        print(f"  {'op':18s} {'statements':>10s} {'elements':>11s} {'ms':>8s} {'holding ms':>12s}")
        for name, row in r["ops"].items():
            print(f"  {name:18s} {row['statements']:10.0f} {row['elements']:11.0f} {1000 * row['seconds']:8.1f} "
                  f"{1000 * row['holding']:12.1f}")


if __name__ == "__main__":
    main()
