"""Parity of Orion's GPT-2 with transformers' GPT2LMHeadModel at 124M size (random weights, offline):
max logit error and top-1 agreement over every position of a few sequences, and greedy agreement.

    python benchmarks/gpt2_parity.py [--positions 256] [--model DIR] [--backend emulator] [--json FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import GPT2LMHeadModel

import orion
from orion.models.bench import make_random_gpt2
from orion.runtime.cache import ProgramCache
from common import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--backend", default="emulator")
    parser.add_argument("--exact-numerics", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gpt2_parity.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or make_random_gpt2(Path(tmp) / "gpt2")
        reference = GPT2LMHeadModel.from_pretrained(folder).eval()
        model = orion.load(str(folder), backend=args.backend, cache=ProgramCache(None),
                           accumulator=None if args.exact_numerics else "fp32")
        rows = []
        for seed in range(args.sequences):
            ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, args.positions)
            got = model.logits(ids)
            with torch.no_grad():
                ref = reference(torch.tensor(ids)[None]).logits[0].numpy()
            top2 = np.sort(ref, -1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 0.05  # positions where the reference's top-2 are not a near tie
            rows.append({
                "seed": seed, "positions": int(ids.size), "max_abs_logit_error": float(np.abs(got - ref).max()),
                "mean_abs_logit_error": float(np.abs(got - ref).mean()),
                "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
                "top1_agreement_clear_positions": float((got.argmax(-1) == ref.argmax(-1))[clear].mean()),
                "clear_positions": int(clear.sum()),
            })
        model.close()
    table = Table(title=f"GPT-2 124M parity with transformers ({args.backend}, {args.positions} positions/sequence)")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=140).print(table)
    write_report(args.json, {"backend": args.backend, "rows": rows})


if __name__ == "__main__":
    main()
