"""Training step cost: Orion (block programs on a backend, the rest on the CPU) against a PyTorch CPU training step
of the same model (transformers' LlamaForCausalLM, float32, eager attention) on the same batches, timed in the same
run, their steps interleaved; the table and the JSON give the medians over the measured steps (after warm-up steps),
their spread, and the median of the per-step ratios orion/pytorch, flagged when they spread too wide to trust.
Each step's process CPU time (every thread of the process: Orion's worker thread included) is taken too, and its
ratio reported beside: on a machine other work loads, wall time swings with the scheduler, while the CPU time a
step needs holds much better.

Each Orion step is the trainer's step (forward and backward of every sequence, guarded AdamW, new weights written
into the programs' input surfaces), split into:

* backend: the block programs (the emulator's numpy model of ANE numerics here; the ANE on a Mac);
* cpu: embedding, final norm, classifier, loss and its gradient, the weight gradients (these run on a worker
  thread while the backend runs the next block's backward, so backend + cpu can exceed the step);
* update: the guarded AdamW step plus writing the new weights into the input surfaces (the trainer's metrics count
  the AdamW part as cpu).

Configurations: ``tiny`` (the preset: 2 layers, d 64, vocab 2048, seq 128) and ``d768`` (stories110m's shapes: 12
layers, d 768, 12 heads, hidden 2048, seq 256, with ``--vocab`` tokens, 2048 by default; 32000 is stories110m's
own), on random token batches. ``--threads N`` caps numpy's BLAS and torch alike; on a busy machine multi-threaded
OpenMP/BLAS timings swing by 10x, one thread each does not. ``--parity-steps N`` also trains the tiny preset N steps
on the story corpus with both (the slow test's comparison) and reports the largest per-step loss gap. ``--lora
RANK:TARGETS`` (default ``16:q,v``) adds, for each configuration, the step of a LoRA adapter on the frozen model
against peft's on the PyTorch side (``none`` skips it).

``--data-parallel N`` also measures the trainer's step (metrics.jsonl's ``ms``, median over N steps after 2) on 1
process and on 2 ranks launched by torchrun on this machine, global batch 8, for the tiny preset and a ``d256``
model (4 layers, d 256): the share of the step spent waiting for the gradient all-reduce (``ms_allreduce``: what
did not overlap with the backward), with the per-block all-reduces overlapped and, to see whether that pays, all
started after the backward; and one all-reduce of the whole gradient on its own.

    python benchmarks/train.py [--backend emulator] [--configs tiny,d768] [--vocab 2048] [--threads 1]
                               [--lora 16:q,v] [--parity-steps 200] [--data-parallel 8]
                               [--json benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orion.lora import LoraLayout, new_adapter  # noqa: E402
from orion.models import model_backend  # noqa: E402
from orion.models.bench import interleave  # noqa: E402
from orion.models.llama import PRESETS, LlamaConfig, adapter_spec, init_weights  # noqa: E402
from orion.runtime.cache import ProgramCache  # noqa: E402
from orion.train.corpus import make_story_corpus, write_corpus  # noqa: E402
from orion.train.engine import LlamaEngine  # noqa: E402
from orion.train.optim import AdamW, LossScaler, guarded_step  # noqa: E402
from orion.train.trainer import FRESH_DEFAULTS, TrainSettings  # noqa: E402
from common import paired, write_report  # noqa: E402
from tests.train.torch_reference import hf_llama, loss_parity, torch_adamw, torch_training_step  # noqa: E402

LR = 3e-4


class OrionStep:
    """The trainer's step on ``backend``, timed and split as the module docstring says; with ``lora`` (rank,
    targets), the step of an adapter on the frozen model."""

    def __init__(self, config: LlamaConfig, backend, lora: tuple[int, str] | None = None):
        settings = TrainSettings().with_defaults()
        self.grad_clip = settings.grad_clip
        self.weights = init_weights(config, seed=0)
        self.adapter = None if lora is None else new_adapter(adapter_spec(config), lora[1], lora[0], lora[0])
        self.params = self.weights if lora is None else self.adapter.to_arrays()
        self.optimizer = AdamW(self.params, lr=LR, betas=(settings.beta1, settings.beta2), eps=settings.adam_eps,
                               weight_decay=settings.weight_decay)
        self.scaler = LossScaler(FRESH_DEFAULTS["loss_scale"], init_scale=settings.init_scale)
        self.engine = LlamaEngine(config, config.max_seq_len, backend=backend, target="default",
                                  cache=ProgramCache(None),
                                  lora=None if lora is None else LoraLayout.covering([self.adapter], 32))
        self.engine.set_weights(self.weights)
        self.push()

    def push(self) -> None:
        """The optimizer's new values into the programs' inputs."""
        if self.adapter is None:
            self.engine.set_weights(self.weights)
        else:
            self.engine.set_adapter(self.adapter)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> dict:
        engine, tokens = self.engine, inputs.size
        c0, t0 = time.process_time(), time.perf_counter()
        before = dict(engine.timings)
        grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        weights = self.weights | self.params
        loss = sum(engine.loss_and_grads(weights, inputs[i], targets[i], self.scaler.scale, grads, tokens)
                   for i in range(inputs.shape[0])) / tokens
        t1 = time.perf_counter()
        report = guarded_step(self.optimizer, self.scaler, grads, max_norm=self.grad_clip, lr=LR)
        t2 = time.perf_counter()
        if not report.skipped:
            self.push()
        t3 = time.perf_counter()
        return {"ms": (t3 - t0) * 1e3, "process_ms": (time.process_time() - c0) * 1e3, "backend_ms": (engine.timings["backend"] - before["backend"]) * 1e3,
                "cpu_ms": (engine.timings["cpu"] - before["cpu"]) * 1e3, "adamw_ms": (t2 - t1) * 1e3,
                "write_ms": (t3 - t2) * 1e3, "loss": loss, "skipped": report.skipped}


class TorchStep:
    """A float32 PyTorch CPU step (forward, backward, clip, AdamW) of the same model, timed; with ``lora``, of a
    peft LoRA adapter of the same rank and targets on the frozen model."""

    def __init__(self, config: LlamaConfig, lora: tuple[int, str] | None = None):
        self.settings = TrainSettings(lr=LR).with_defaults()
        self.model = hf_llama(config, init_weights(config, seed=0)).train()
        if lora is not None:
            import peft

            spec = adapter_spec(config)
            self.model = peft.get_peft_model(self.model, peft.LoraConfig(
                r=lora[0], lora_alpha=lora[0], target_modules=[spec.modules[t] for t in spec.parse_targets(lora[1])]))
        self.optimizer = torch_adamw(self.model, self.settings)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> dict:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = torch_training_step(self.model, self.optimizer, inputs, targets, LR, self.settings.grad_clip)
        return {"ms": (time.perf_counter() - t0) * 1e3, "process_ms": (time.process_time() - c0) * 1e3, "loss": loss}


def measure(name: str, config: LlamaConfig, batch: int, steps: int, warmup: int, backend,
            lora: tuple[int, str] | None = None) -> dict:
    """Both sides on the same random batches, their steps interleaved (A B, B A, ...) as ``orion bench gpt2`` does:
    a machine that gets busier during the run weighs on both alike. With more than one thread, torch's OpenMP
    threads spin for a while after each step and slow numpy's BLAS threads down: ``--threads 1`` keeps it fair."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(warmup + steps):
        windows = rng.integers(0, config.vocab_size, (batch, config.max_seq_len + 1))
        batches.append((windows[:, :-1].copy(), windows[:, 1:].copy()))
    orion_step = OrionStep(config, backend, lora)
    try:
        torch_step = TorchStep(config, lora)
        feeds = [iter(batches), iter(batches)]
        ours, reference = interleave([lambda: orion_step(*next(feeds[0])), lambda: torch_step(*next(feeds[1]))],
                                     warmup + steps)
        compiles = orion_step.engine.compiles
    finally:
        orion_step.engine.close()

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows[warmup:])

    pair = paired(f"{name} step orion / pytorch", [r["ms"] for r in ours[warmup:]],
                  [r["ms"] for r in reference[warmup:]])
    process = paired(f"{name} step's CPU time orion / pytorch", [r["process_ms"] for r in ours[warmup:]],
                     [r["process_ms"] for r in reference[warmup:]])
    result = {
        "config": name, "model": config.to_dict(), "batch": batch, "seq": config.max_seq_len,
        "tokens_per_step": batch * config.max_seq_len, "measured_steps": steps, "warmup_steps": warmup,
        "orion_ms": median(ours, "ms"), "orion_spread": pair["spread"], "orion_backend_ms": median(ours, "backend_ms"),
        "orion_cpu_ms": median(ours, "cpu_ms"), "orion_update_ms": median(ours, "adamw_ms") + median(ours, "write_ms"),
        "orion_adamw_ms": median(ours, "adamw_ms"), "orion_weight_write_ms": median(ours, "write_ms"),
        "pytorch_ms": median(reference, "ms"), "pytorch_spread": pair["reference_spread"],
        "orion_step_ms": [r["ms"] for r in ours[warmup:]], "pytorch_step_ms": [r["ms"] for r in reference[warmup:]],
        "compiles": compiles, "skipped_steps": sum(r["skipped"] for r in ours),
        "loss": {"orion": [r["loss"] for r in ours], "pytorch": [r["loss"] for r in reference]},
        "ratio_orion_over_pytorch": pair["ratio"], "ratio_spread": pair["ratio_spread"], "trusted": pair["trusted"],
        "orion_process_ms": process["median"], "pytorch_process_ms": process["reference_median"],
        "process_ratio_orion_over_pytorch": process["ratio"], "process_ratio_spread": process["ratio_spread"],
        "process_trusted": process["trusted"],
    }
    return result


def parity(steps: int) -> dict:
    """The tiny preset trained ``steps`` steps on the story corpus by the Trainer and by PyTorch: the run of
    ``loss_parity`` in tests/train/torch_reference.py (batch 2 x 32 tokens, lr 3e-3)."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stories.txt"
        write_corpus(corpus, make_story_corpus(400, seed=0))
        ours, reference, skipped = loss_parity(corpus, Path(tmp) / "run", steps)
    gap = np.abs(ours - reference)
    finite = np.isfinite(ours) & np.isfinite(reference)
    return {"steps": steps, "largest_loss_gap": float(np.nanmax(gap)), "at_step": int(np.nanargmax(gap)) + 1,
            "mean_loss_gap": float(np.nanmean(gap)), "non_finite_steps": int((~finite).sum()) + skipped,
            "orion_loss": [float(ours[0]), float(ours[-1])], "pytorch_loss": [float(reference[0]),
                                                                              float(reference[-1])]}


#: One rank of the data-parallel measurement (argv[1]: JSON of settings, backend, overlap, where the raw all-reduce
#: time goes): the trainer as ``orion train`` runs it, with the overlap switch the CLI does not offer.
_RANK = """
import contextlib, json, statistics, sys, time
from orion.models import model_backend
from orion.models.llama import init_weights
from orion.train.distributed import ProcessGroup, launched
from orion.train.trainer import Trainer, TrainSettings
spec = json.loads(sys.argv[1])
group = ProcessGroup.from_environment() if launched() else None
with group if group is not None else contextlib.nullcontext():
    trainer = Trainer(TrainSettings(**spec["settings"]), backend=model_backend(spec["backend"]), group=group)
    trainer.overlap = spec["overlap"]
    trainer.run()
    if group is not None:
        import torch
        gradient = torch.zeros(sum(a.size for a in init_weights(trainer.config).values()))
        times = []
        for _ in range(10):
            group.dist.barrier()
            t0 = time.perf_counter()
            group.dist.all_reduce(gradient)
            times.append(time.perf_counter() - t0)
        if group.is_writer:
            json.dump({"elements": gradient.numel(), "ms": statistics.median(times) * 1e3}, open(spec["raw"], "w"))
"""


def data_parallel(steps: int, backend: str, warmup: int = 2) -> list[dict]:
    """The trainer's step on 1 process and on 2 torchrun ranks (all-reduce overlapped or not), per model."""
    models = {"tiny": {}, "d256": {"dim": 256, "n_layers": 4, "n_heads": 4, "hidden_dim": 768}}
    runs = [(1, True), (2, True), (2, False)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stories.txt"
        write_corpus(corpus, make_story_corpus(400, seed=0))
        script = Path(tmp) / "rank.py"
        script.write_text(_RANK)
        for name, overrides in models.items():
            for ranks, overlap in runs:
                out = Path(tmp) / f"{name}-{ranks}-{overlap}"
                spec = {"settings": {"preset": "tiny", "model_overrides": overrides, "data": str(corpus),
                                     "out": str(out), "steps": warmup + steps, "batch": 8, "save_every": 10**6},
                        "backend": backend, "overlap": overlap, "raw": str(out / "raw.json")}
                with socket.socket() as free:
                    free.bind(("127.0.0.1", 0))
                    port = free.getsockname()[1]
                print(f"data-parallel: {name}, {ranks} rank(s){'' if overlap else ', all-reduce after the backward'}"
                      " ...", flush=True)
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                                "--master-addr", "127.0.0.1", "--master-port", str(port), str(script),
                                json.dumps(spec)], check=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
                ms = statistics.median(r["ms"] for r in rows)
                wait = statistics.median(r["ms_allreduce"] for r in rows)
                raw = json.loads((out / "raw.json").read_text()) if ranks > 1 else None
                results.append({"model": name, "ranks": ranks, "overlap": overlap, "global_batch": 8,
                                "seq": 128, "measured_steps": steps, "step_ms": ms, "allreduce_wait_ms": wait,
                                "allreduce_share": wait / ms, "tokens_per_s": 8 * 128 / ms * 1e3,
                                "gradient_elements": raw and raw["elements"],
                                "whole_gradient_allreduce_ms": raw and raw["ms"]})
    table = Table(title=f"data-parallel training step ({backend}), global batch 8 x 128, median ms")
    for col in ("model", "ranks", "all-reduce", "step", "waiting for all-reduce", "share", "tok/s",
                "whole-gradient all-reduce"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["model"], str(r["ranks"]), "-" if r["ranks"] == 1 else "overlapped" if r["overlap"]
                      else "after backward", f"{r['step_ms']:.1f}", f"{r['allreduce_wait_ms']:.1f}",
                      f"{r['allreduce_share']:.0%}", f"{r['tokens_per_s']:.0f}",
                      "-" if r["ranks"] == 1 else f"{r['whole_gradient_allreduce_ms']:.1f}")
    Console(width=140).print(table)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="emulator")
    parser.add_argument("--configs", default="tiny,d768")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary of the d768 configuration")
    parser.add_argument("--tiny-batch", type=int, default=4)
    parser.add_argument("--tiny-steps", type=int, default=5)
    parser.add_argument("--big-batch", type=int, default=2)
    parser.add_argument("--big-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for numpy's BLAS and torch alike (default: theirs, one per core)")
    parser.add_argument("--lora", default="16:q,v", help="also an adapter's training step, RANK:TARGETS (peft on "
                        "the PyTorch side); 'none' to skip")
    parser.add_argument("--parity-steps", type=int, default=0, help="also compare N training steps' losses")
    parser.add_argument("--data-parallel", type=int, default=0, metavar="STEPS",
                        help="also time N trainer steps on 1 process and on 2 torchrun ranks")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train.json"))
    args = parser.parse_args()
    backend = model_backend(args.backend)
    if args.threads:
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    configs = {
        "tiny": (PRESETS["tiny"], args.tiny_batch, args.tiny_steps),
        "d768": (dataclasses.replace(PRESETS["stories110m"], vocab_size=args.vocab), args.big_batch, args.big_steps),
    }
    results = []
    for name in filter(None, args.configs.split(",")):  # --configs "": only the sections asked for
        config, batch, steps = configs[name]
        print(f"{name}: {config.n_layers} layers, d {config.dim}, vocab {config.vocab_size}, batch {batch} x "
              f"{config.max_seq_len}, {args.warmup} + {steps} steps ...", flush=True)
        results.append(measure(name, config, batch, steps, args.warmup, backend))
        if args.lora != "none":
            rank, targets = args.lora.split(":")
            print(f"{name}, LoRA rank {rank} on {targets} ...", flush=True)
            results.append(measure(f"{name} LoRA r{rank} {targets}", config, batch, steps, args.warmup, backend,
                                   (int(rank), targets)))

    table = Table(title=f"median ms per training step, steps interleaved: Orion ({args.backend}) vs PyTorch CPU fp32 "
                        f"({torch.get_num_threads()} threads each; ± interquartile range / median)")
    for col in ("config", "tokens", "orion", "backend", "cpu", "update", "pytorch", "orion/pytorch",
                "CPU time orion/pytorch"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r['config']} (vocab {r['model']['vocab_size']})", f"{r['batch']}x{r['seq']}",
                      f"{r['orion_ms']:.1f} ±{r['orion_spread']:.0%}",
                      *(f"{r[k]:.1f}" for k in ("orion_backend_ms", "orion_cpu_ms", "orion_update_ms")),
                      f"{r['pytorch_ms']:.1f} ±{r['pytorch_spread']:.0%}",
                      f"{r['ratio_orion_over_pytorch']:.2f} ±{r['ratio_spread']:.0%}" + ("" if r["trusted"]
                                                                                        else " (noise)"),
                      f"{r['process_ratio_orion_over_pytorch']:.2f} ±{r['process_ratio_spread']:.0%}"
                      + ("" if r["process_trusted"] else " (noise)"))
    Console(width=170).print(table)
    report = {"torch_version": torch.__version__, "backend": args.backend, "threads": args.threads or "default",
              "torch_threads": torch.get_num_threads(), "lr": LR, "results": results}
    if args.parity_steps:
        print(f"parity: tiny preset, {args.parity_steps} steps ...", flush=True)
        report["parity"] = parity(args.parity_steps)
        p = report["parity"]
        print(f"loss parity over {p['steps']} steps: largest gap {p['largest_loss_gap']:.4f} nats (step "
              f"{p['at_step']}), mean gap {p['mean_loss_gap']:.4f}, non-finite steps {p['non_finite_steps']}; loss "
              f"{p['pytorch_loss'][0]:.3f} -> {p['pytorch_loss'][1]:.3f} (pytorch), "
              f"{p['orion_loss'][0]:.3f} -> {p['orion_loss'][1]:.3f} (orion)")
    if args.data_parallel:
        report["data_parallel"] = data_parallel(args.data_parallel, args.backend)
    write_report(args.json, report)


if __name__ == "__main__":
    main()
