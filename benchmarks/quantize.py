"""Quantized weights against fp16 on a model trained here (no pretrained weights can be downloaded here), per scheme:

* quality on held-out text (stories of another seed than the training corpus, none of them in it): perplexity and
  its change against fp16, the mean KL divergence KL(fp16 || quantized) of the next-token distributions, and the
  top-1 agreement with fp16;
* a repetition check on a 256-token greedy generation (a sliding window of the model's context): the share of
  4-grams seen earlier in the same text, and whether its last 128 tokens collapsed into a loop of period <= 16;
* bytes: the block programs' weight bytes (what each token's forward reads from the programs' weight files, the
  ANE-resident weights) against fp16, the classifier/embedding bytes on the CPU (float32, unchanged by any scheme),
  and the resident total.

The model: ``orion train`` of the tiny preset widened (d 128, 4 layers, SwiGLU 384) on the demo's story corpus, a few
minutes of CPU on the emulator, trained once into ``--work`` and reused; or ``--model`` (an Orion checkpoint or a
Hugging Face Llama/GPT-2 folder: a real checkpoint wherever a user has one).

    python benchmarks/quantize.py [--model DIR] [--work out/quant-bench] [--train-steps 300] [--layers 4]
                                  [--schemes fp16,int8,int8/32,int4,int4/32,lut4,lut4+ends,int4/32+ends]
                                  [--eval-windows 48] [--gen-tokens 256] [--json benchmarks/results/quantize.json]

A scheme is ``compile_graph``'s ``weights`` (``int4/32``: int4 with one scale per 32 input channels); ``+ends`` keeps
the first and last block in fp16.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_report  # noqa: E402
import orion  # noqa: E402
from orion.compiler.passes import WeightCompression  # noqa: E402
from orion.train.checkpoint import latest_checkpoint  # noqa: E402
from orion.train.corpus import make_story_corpus, write_corpus  # noqa: E402

DEFAULT_SCHEMES = "fp16,int8,int8/32,int4,int4/32,int4/32+ends,lut4,lut4+ends"
SHAPE = {"dim": 128, "n_heads": 4, "hidden_dim": 384}


def trained_model(work: Path, steps: int, layers: int) -> Path:
    """The checkpoint of a tiny-preset model trained on the demo corpus (trained here on first use)."""
    from orion.models import model_backend
    from orion.train.trainer import Trainer, TrainSettings

    found = latest_checkpoint(work / "run") if (work / "run").is_dir() else None
    if found is not None:
        return found
    work.mkdir(parents=True, exist_ok=True)
    write_corpus(work / "stories.txt", make_story_corpus(2000, seed=0))
    settings = TrainSettings(preset="tiny", data=str(work / "stories.txt"), out=str(work / "run"), steps=steps,
                             batch=8, seq_len=64, lr=2e-3, save_every=steps,
                             model_overrides={**SHAPE, "n_layers": layers})
    t0 = time.perf_counter()
    summary = Trainer(settings, backend=model_backend("emulator")).run()
    print(f"trained {steps} steps in {time.perf_counter() - t0:.0f} s: final loss {summary['final_loss']:.3f}")
    return Path(summary["checkpoint"])


def held_out_windows(tokenizer, window: int, count: int) -> list[np.ndarray]:
    """``count`` windows of ``window`` tokens from stories that are not in the training corpus."""
    seen = set(make_story_corpus(2000, seed=0))
    ids: list[int] = []
    for story in make_story_corpus(4 * count, seed=1):
        if story not in seen:
            ids += tokenizer.encode(story) + [tokenizer.eos_id]
        if len(ids) >= window * count:
            break
    return [np.asarray(ids[i * window:(i + 1) * window]) for i in range(count)]


def scheme_spec(name: str) -> WeightCompression | None:
    if name == "fp16":
        return None
    base, _, ends = name.partition("+")
    spec = WeightCompression.of(base)
    return replace(spec, keep_ends=1) if ends == "ends" else spec


def greedy(model, prompt: list[int], tokens: int, window: int) -> list[int]:
    """Greedy tokens after ``prompt``, each from the last ``window - 1`` tokens (a sliding context)."""
    ids = list(prompt)
    for _ in range(tokens):
        ids.append(int(np.argmax(model.logits(ids[-(window - 1):])[-1])))
    return ids[len(prompt):]


def repetition(ids: list[int]) -> dict:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    tail = ids[-128:]
    period = next((p for p in range(1, 17) if all(tail[i] == tail[i - p] for i in range(p, len(tail)))), None)
    return {"repeated_4gram_share": repeats / max(1, len(grams)), "loop_period": period, "collapsed": period is not None}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def program_weight_bytes(model) -> int:
    return sum(p.module.weight_bytes() for p in model.blocks.programs)


def measure(path: Path, name: str, windows: list[np.ndarray], prompt: list[int], gen_tokens: int,
            reference: dict | None) -> dict:
    spec = scheme_spec(name)
    t0 = time.perf_counter()
    with orion.load(str(path), backend="emulator", quantize=spec) as model:
        window = model.config.max_seq_len
        logps = [log_softmax(model.logits(w)) for w in windows]
        load_and_eval = time.perf_counter() - t0
        nll = np.concatenate([-lp[np.arange(len(w) - 1), w[1:]] for lp, w in zip(logps, windows)])
        generated = greedy(model, prompt, gen_tokens, window)
        weights = program_weight_bytes(model)
        cpu = sum(a.nbytes for k, a in model.weights.items() if not k.startswith("layers."))
        text = model.tokenizer.decode(generated)
    row = {"scheme": name, "perplexity": float(np.exp(nll.mean())), "program_weight_bytes": weights,
           "cpu_weight_bytes": cpu, "resident_weight_bytes": weights + cpu, "eval_seconds": load_and_eval,
           **repetition(generated), "generation": text, "logps": logps}
    if reference is not None:
        ref = reference["logps"]
        kl = np.concatenate([(np.exp(r) * (r - q)).sum(-1) for r, q in zip(ref, logps)])
        top1 = np.concatenate([r.argmax(-1) == q.argmax(-1) for r, q in zip(ref, logps)])
        row.update(ppl_change=row["perplexity"] / reference["perplexity"] - 1, kl_mean=float(kl.mean()),
                   kl_max=float(kl.max()), top1_agreement=float(top1.mean()),
                   weight_bytes_ratio=weights / reference["program_weight_bytes"])
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="An Orion checkpoint or a Hugging Face Llama folder.")
    parser.add_argument("--work", default="out/quant-bench", type=Path)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=4, help="Blocks of the model trained here.")
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--json", default="benchmarks/results/quantize.json", type=Path)
    args = parser.parse_args(argv)

    path = Path(args.model) if args.model else trained_model(args.work, args.train_steps, args.layers)
    with orion.load(str(path), backend="emulator") as model:
        windows = held_out_windows(model.tokenizer, model.config.max_seq_len, args.eval_windows)
        prompt = model.tokenizer.encode("Once upon a time")
    rows: list[dict] = []
    reference = None
    for name in ["fp16"] + [s for s in args.schemes.split(",") if s != "fp16"]:
        row = measure(path, name, windows, prompt, args.gen_tokens, reference)
        reference = reference or row
        rows.append(row)
        print(f"{name}: ppl {row['perplexity']:.4f} ({row.get('ppl_change', 0.0):+.2%}), KL {row.get('kl_mean', 0.0):.2e}, "
              f"top-1 {row.get('top1_agreement', 1.0):.2%}, weight bytes x{row.get('weight_bytes_ratio', 1.0):.3f}, "
              f"repeated 4-grams {row['repeated_4gram_share']:.2f}, loop {row['loop_period'] or '-'}", flush=True)

    print(f"\nmodel {path}; {len(windows)} held-out windows of {len(windows[0])} tokens; greedy {args.gen_tokens} "
          "tokens from 'Once upon a time'")
    head = (f"{'scheme':<14}{'ppl':>9}{'change':>9}{'KL':>10}{'top-1':>8}{'prog bytes':>12}{'ratio':>7}"
            f"{'resident':>11}{'rep4':>7}{'loop':>6}")
    print(head)
    for r in rows:
        print(f"{r['scheme']:<14}{r['perplexity']:>9.4f}{r.get('ppl_change', 0.0):>+9.2%}{r.get('kl_mean', 0.0):>10.2e}"
              f"{r.get('top1_agreement', 1.0):>8.2%}{r['program_weight_bytes']:>12,}{r.get('weight_bytes_ratio', 1.0):>7.3f}"
              f"{r['resident_weight_bytes']:>11,}{r['repeated_4gram_share']:>7.2f}{str(r['loop_period'] or '-'):>6}")
    for r in rows:
        r.pop("logps")
    write_report(args.json, {"benchmark": "quantize", "model": str(path), "eval_windows": len(windows),
                             "window_tokens": len(windows[0]), "gen_tokens": args.gen_tokens, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
