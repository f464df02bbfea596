"""``orion bench gpt2``: Orion against a reference on the same weights, each side in its own process so its peak
memory is its own. Random GPT-2 124M weights are made offline with transformers (a test/dev extra) and saved once in
Hugging Face layout; both sides load that folder.

    python -m orion.models.bench --side orion --model DIR --prompt-tokens 128 --new-tokens 64 --backend emulator

Each side loads and warms up once, then runs one repetition per line read from stdin; the parent interleaves the two
sides' repetitions (A B, B A, ...) and reports medians, their spread and the ratio of each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from orion.errors import OrionError

MARK = "ORION_BENCH_RESULT "
T = TypeVar("T")


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def _prompt(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def orion_side(model_dir: Path, prompt_tokens: int, new_tokens: int, backend: str, accumulator: str | None,
               target: str = "default"):
    """Load and warm up Orion; returns its description and a function that runs one measured repetition."""
    from orion.models import load
    from orion.runtime.cache import ProgramCache, os_build

    t0 = time.perf_counter()
    model = load(str(model_dir), backend=backend, target=target, accumulator=accumulator, cache=ProgramCache(None))
    load_s = time.perf_counter() - t0
    ids = _prompt(model.config.vocab_size, prompt_tokens)
    t1 = time.perf_counter()
    list(model.generate_ids(ids, max_tokens=1))  # first prefill: compiles the prefill programs
    first_prefill_s = time.perf_counter() - t1
    list(model.generate_ids(ids, max_tokens=new_tokens))  # compiles the decode programs

    def repetition() -> dict:
        list(model.generate_ids(ids, max_tokens=new_tokens))  # everything cached and loaded
        stats = model.stats
        return {"cached_prefill_s": stats.prefill_seconds, "prefill_tok_s": stats.prefill_tok_s,
                "decode_tok_s": stats.decode_tok_s}

    machine = model.backend.describe()  # the chip where the ANE ran; results on it hinge on the OS build
    info = {
        "target": model.target.name, "chip": machine.get("chip"),
        "os_build": machine.get("macos_build") or os_build(),
        "backend": model.stats.backend,
        "accumulator": getattr(getattr(model.backend, "numerics", None), "accumulator", None),
        "load_s": load_s, "first_prefill_s": first_prefill_s,
        "dispatches_per_token": model.stats.dispatches_per_token, "blocks_per_program": model.group,
    }
    return info, repetition


def transformers_side(model_dir: Path, prompt_tokens: int, new_tokens: int):
    """Load and warm up transformers' GPT2LMHeadModel; its description and one measured repetition."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError as exc:
        raise OrionError(f"the transformers reference needs torch and transformers ({exc}); "
                         "install the test extra: pip install -e '.[test]'") from None
    t0 = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor(_prompt(model.config.vocab_size, prompt_tokens))[None]

    @torch.no_grad()
    def repetition() -> dict:
        t1 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t1
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):  # greedy decode with the KV cache, as Orion does
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t2
        return {"cached_prefill_s": prefill_s, "prefill_tok_s": prompt_tokens / prefill_s,
                "decode_tok_s": (new_tokens - 1) / decode_s}

    with torch.no_grad():
        model(ids)  # warm-up
    info = {"backend": "transformers (PyTorch CPU, fp32)", "load_s": load_s, "torch_threads": torch.get_num_threads()}
    return info, repetition


def make_random_gpt2(folder: Path, seed: int = 0) -> Path:
    """GPT-2 124M with random weights, biases and norms included, saved as safetensors in Hugging Face layout
    (needs torch + transformers)."""
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise OrionError(f"making random GPT-2 weights needs torch and transformers ({exc}); install the test "
                         "extra, or pass --model with a local GPT-2 folder") from None
    torch.manual_seed(seed)
    model = randomize_biases_and_norms(GPT2LMHeadModel(GPT2Config()), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_gpt2_state(n_layer: int = 12, n_embd: int = 768, vocab_size: int = 50257, n_positions: int = 1024,
                      seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, tensors) of a GPT-2 with random weights, biases and norms, in numpy (no torch): enough for
    the cost model, which charges sizes, and for tests that need no reference."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    d = n_embd
    state = {"wte.weight": w(vocab_size, d), "wpe.weight": w(n_positions, d), "ln_f.weight": 1 + w(d) * 10,
             "ln_f.bias": w(d) * 10}
    for i in range(n_layer):
        for name, shape in (("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                            ("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,)),
                            ("attn.c_proj.weight", (d, d)), ("attn.c_proj.bias", (d,)),
                            ("mlp.c_fc.weight", (d, 4 * d)), ("mlp.c_fc.bias", (4 * d,)),
                            ("mlp.c_proj.weight", (4 * d, d)), ("mlp.c_proj.bias", (d,))):
            state[f"h.{i}.{name}"] = (1 + w(*shape) * 10) if name.endswith("ln_1.weight") or \
                name.endswith("ln_2.weight") else w(*shape)
    config = {"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": n_positions, "n_embd": d,
              "n_layer": n_layer, "n_head": max(1, d // 64)}
    return config, state


def randomize_biases_and_norms(model, seed: int = 0, norm_std: float = 0.2):
    """``model`` (a torch module, changed in place and returned) with random non-zero biases and norms: a layer's
    bias from N(0, std of its weight), a norm's gain from 1 + N(0, norm_std) and its offset from N(0, norm_std).
    transformers starts them at 0 and 1, where a model that dropped a bias or a norm's gain or offset, or put one
    in another's place, computes the same as a correct one."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                if is_norm:
                    p.copy_((1.0 if name == "weight" else 0.0) + norm_std * noise)
                elif name == "bias":
                    p.copy_(float(module.weight.std()) * noise)
    return model


#: Above this spread of the per-pair ratios (interquartile range / median), the report warns that the ratio is noise.
TRUSTED_SPREAD = 0.10
_MEASURED = ("cached_prefill_s", "prefill_tok_s", "decode_tok_s")
#: What caps the threads of numpy's BLAS and of torch in a side's process.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class _Side:
    """A benchmark side in its own process (so its peak memory is its own), loaded once, then asked for one
    repetition at a time."""

    def __init__(self, side: str, model_dir: Path, args, log):
        cmd = [sys.executable, "-m", "orion.models.bench", "--side", side, "--model", str(model_dir),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--backend", args.backend, "--target", args.target] + (["--exact-numerics"] if args.exact_numerics
                                                                                   else [])
        env = dict(os.environ)
        if args.threads:  # read by OpenBLAS, MKL and torch's OpenMP when they start
            env.update({name: str(args.threads) for name in THREAD_VARIABLES})
        self.side, self.log = side, log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        self.log.seek(0)
        tail = (self.log.read().strip().splitlines() or ["no output"])[-1]
        raise OrionError(f"the {self.side} benchmark process failed (exit {self.proc.returncode}): {tail}")

    def repetition(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> dict:
        """The side's description with its peak memory, once every repetition has run."""
        self.proc.stdin.close()
        final = self._read()
        self.proc.wait()
        return {**self.info, **final}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spread(values: Sequence[float]) -> float:
    """The interquartile range over the median: how far apart the middle half of the repetitions is, relative to
    the value reported (one outlier on a busy machine moves neither)."""
    if len(values) < 2:
        return 0.0
    q1, mid, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / mid if mid else float("inf")


def _summary(info: dict, reps: list[dict]) -> dict:
    out = {**info, "repetitions": reps}
    for key in _MEASURED:
        values = [r[key] for r in reps]
        out[key] = statistics.median(values)
        out[f"{key}_spread"] = spread(values)
    return out


def interleave(repetitions: Sequence[Callable[[], T]], repeats: int) -> list[list[T]]:
    """``repeats`` calls of each side's ``repetition``, alternating A B, B A, ...: a machine that gets busier or
    quieter during the run weighs on both sides alike, and each pair of repetitions gives one ratio."""
    reps: list[list[T]] = [[] for _ in repetitions]
    for r in range(repeats):
        order = range(len(repetitions)) if r % 2 == 0 else reversed(range(len(repetitions)))
        for i in order:
            reps[i].append(repetitions[i]())
    return reps


def paired_ratio(what: str, ours: Sequence[float], reference: Sequence[float]) -> tuple[float, float, str | None]:
    """The median of the per-pair ratios ``ours[i] / reference[i]``, their spread, and a warning (else None) when
    they spread wider than :data:`TRUSTED_SPREAD`."""
    pairs = [a / b for a, b in zip(ours, reference)]
    ratio, wide = statistics.median(pairs), spread(pairs)
    warning = None
    if wide > TRUSTED_SPREAD:
        warning = (f"{what} ratio: its {len(pairs)} pairs spread {wide:.0%} (more than {TRUSTED_SPREAD:.0%}), too "
                   "wide to trust: the machine is busy; run again when it is quieter, or with more repeats")
    return ratio, wide, warning


def bench_gpt2(model: str | None, backend: str, reference: str | None, prompt_tokens: int, new_tokens: int,
               exact_numerics: bool = False, target: str = "default", repeats: int = 5,
               threads: int | None = None) -> dict:
    """Orion (and the reference) on the same weights, repetitions interleaved; medians, their spread, and for
    each ratio the median of the per-pair ratios with a warning when those spread wider than
    :data:`TRUSTED_SPREAD`. ``threads`` caps both sides' BLAS/OpenMP threads (default: theirs, one per core); on a
    busy machine, threads that wait for each other's cores make the spread far wider than one thread each does."""
    from orion.compiler.targets import get_target
    from orion.runtime.program import get_backend

    if repeats < 1:
        raise OrionError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise OrionError(f"threads must be >= 1, got {threads}")
    # resolved here, before any weights are made: an unavailable backend is an error naming why, and the child
    # runs on exactly the backend resolved here (its report names the one that ran)
    args = argparse.Namespace(prompt_tokens=prompt_tokens, new_tokens=new_tokens, exact_numerics=exact_numerics,
                              backend=get_backend(backend, get_target(target)).name, target=target, threads=threads)
    names = ["orion"] + (["transformers"] if reference == "transformers" else [])
    with tempfile.TemporaryDirectory(prefix="orion-bench-gpt2-") as tmp:
        folder = Path(model) if model else make_random_gpt2(Path(tmp) / "gpt2-random")
        sides: list[_Side] = []
        logs = [open(Path(tmp) / f"{name}.log", "w+") for name in names]  # each side's stderr, for its failure
        try:
            for name, log in zip(names, logs):  # loaded one after the other, so neither load slows the other
                sides.append(_Side(name, folder, args, log))
            reps = interleave([side.repetition for side in sides], repeats)
            finals = [side.finish() for side in sides]
        finally:
            for side in sides:
                side.kill()
            for log in logs:
                log.close()
    orion = _summary(finals[0], reps[0])
    report = {"model": model or "random GPT-2 124M", "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              **{key: orion.pop(key) for key in ("target", "chip", "os_build")},
              "repeats": repeats, "threads": threads, "orion": orion, "warnings": []}
    if reference == "transformers":
        report["reference"] = _summary(finals[1], reps[1])
        report["ratios"], report["warnings"] = ratios(reps[0], reps[1])
    return report


def ratios(orion: list[dict], reference: list[dict]) -> tuple[dict, list[str]]:
    """Speed ratios orion / reference: the median of the ratios of each interleaved pair, their spread, and a
    warning for each ratio whose pairs spread wider than :data:`TRUSTED_SPREAD`."""
    out, warnings = {}, []
    for what, key in (("decode", "decode_tok_s"), ("prefill", "prefill_tok_s")):
        out[what], out[f"{what}_spread"], warning = paired_ratio(what, [r[key] for r in orion],
                                                                 [r[key] for r in reference])
        warnings += [warning] if warning else []
    return out, warnings


def flatten(report: dict) -> dict:
    """``{"orion": {"decode_tok_s": ..}}`` -> ``{"orion.decode_tok_s": ..}`` plus the nested form."""
    flat = dict(report)
    for side in ("orion", "reference", "ratios"):
        for key, value in report.get(side, {}).items():
            flat[f"{side}.{key}"] = value
    return flat


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["orion", "transformers"], required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--target", default="default")
    parser.add_argument("--exact-numerics", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("ORION_CACHE", "off")
    if args.side == "orion":
        info, repetition = orion_side(args.model, args.prompt_tokens, args.new_tokens, args.backend,
                                      None if args.exact_numerics else "fp32", args.target)
    else:
        info, repetition = transformers_side(args.model, args.prompt_tokens, args.new_tokens)
    print(MARK + json.dumps(info), flush=True)
    for _ in sys.stdin:  # one line per repetition; the parent closes stdin when it has them all
        print(MARK + json.dumps(repetition()), flush=True)
    print(MARK + json.dumps({"peak_mb": _peak_mb()}), flush=True)


if __name__ == "__main__":
    main()
