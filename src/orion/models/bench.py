"""``orion bench gpt2`` and ``orion bench llama``: Orion against a reference on the same weights, each side in its own
process so its peak memory is its own. Random weights at real size (GPT-2 124M, or a Llama-family preset such as
``qwen2.5-0.5b``) are made offline with transformers (a test/dev extra) and saved once in Hugging Face layout; every
side loads that folder.

    python -m orion.models.bench --side orion --model DIR --prompt-tokens 128 --new-tokens 64 --backend emulator

Each side loads and warms up once, then runs one repetition per line read from stdin; the parent interleaves the two
sides' repetitions (A B, B A, ...) and reports medians, their spread and the ratio of each pair.
"""

from __future__ import annotations

import argparse
import atexit
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
    """This process's peak RSS in MB. On Linux its own memory's high-water mark (VmHWM): ru_maxrss there also counts
    the RSS the parent had when it started this process (execve carries the old image's peak over), so a side
    started by a parent that made the random weights would report at least the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def _prompt(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def orion_side(model_dir: Path, prompt_tokens: int, new_tokens: int, backend: str, accumulator: str | None,
               target: str = "default", head: str = "cpu"):
    """Load and warm up Orion; returns its description and a function that runs one measured repetition."""
    from orion.models import load
    from orion.runtime.cache import ProgramCache, os_build

    t0 = time.perf_counter()
    model = load(str(model_dir), backend=backend, target=target, accumulator=accumulator, cache=ProgramCache(None),
                 head=head)
    atexit.register(model.close)  # the programs' staged weight files go with the side, not left in the temp folder
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
        "dispatches_per_token": model.stats.dispatches_per_token, "blocks_per_program": model.group, "head": head,
    }
    return info, repetition


def transformers_side(model_dir: Path, prompt_tokens: int, new_tokens: int):
    """Load and warm up the folder's model in transformers (float32); its description and one measured
    repetition."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise OrionError(f"the transformers reference needs torch and transformers ({exc}); "
                         "install the test extra: pip install -e '.[test]'") from None
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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


#: Real sizes of the Llama-family checkpoints people run on the ANE, as config.json settings: random weights of
#: these sizes stand in when no checkpoint is at hand. "tiny" is for tests.
LLAMA_PRESETS = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2048),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=256),
}


def make_random_llama(folder: Path, preset: str, seed: int = 0) -> Path:
    """A Llama-family model of a :data:`LLAMA_PRESETS` size with random weights, biases and norms, saved as
    safetensors in Hugging Face layout (needs torch + transformers)."""
    if preset not in LLAMA_PRESETS:
        raise OrionError(f"no preset {preset!r}; presets: {', '.join(LLAMA_PRESETS)}")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise OrionError(f"making random weights needs torch and transformers ({exc}); install the test extra, or "
                         "pass --model with a local folder") from None
    settings = dict(LLAMA_PRESETS[preset])
    torch.manual_seed(seed)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = randomize_biases_and_norms(AutoModelForCausalLM.from_config(config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_llama(preset: str | dict, seed: int = 0, weight_scale: float = 1.0):
    """(LlamaConfig, Orion-named weights) of a :data:`LLAMA_PRESETS` size (or of config.json ``settings`` given as a
    dict) with random weights, biases and norm gains, in numpy (no torch): enough for the cost model, which charges
    sizes, and for tests that need no reference. ``weight_scale`` scales the matrices (logits far apart)."""
    from orion.models.llama import config_from_hf, layer_shapes

    if isinstance(preset, str) and preset not in LLAMA_PRESETS:
        raise OrionError(f"no preset {preset!r}; presets: {', '.join(LLAMA_PRESETS)}")
    config = config_from_hf(LLAMA_PRESETS[preset] if isinstance(preset, str) else preset)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02 * (weight_scale if len(shape) == 2
                                                                                  else 1.0))

    weights = {"tok_embeddings": w(config.vocab_size, config.dim), "norm": 1 + w(config.dim) * 10}
    for i in range(config.n_layers):
        for name, shape in layer_shapes(config).items():
            weights[f"layers.{i}.{name}"] = 1 + w(*shape) * 10 if name.endswith("norm") else w(*shape)
    if not config.tie_embeddings:
        weights["output"] = w(config.vocab_size, config.dim)
    return config, weights


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

    def __init__(self, side: str, model_dir: Path, args, log, head: str = "cpu"):
        cmd = [sys.executable, "-m", "orion.models.bench", "--side", side, "--model", str(model_dir),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--backend", args.backend, "--target", args.target, "--head", head] + (
                   ["--exact-numerics"] if args.exact_numerics else [])
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
    """Orion's GPT-2 (and the reference) on the same weights (random 124M ones without ``model``): see
    :func:`bench`."""
    return bench(model, lambda folder: make_random_gpt2(folder), "random GPT-2 124M", ("cpu",), backend, reference,
                 prompt_tokens, new_tokens, exact_numerics, target, repeats, threads)


def bench_llama(model: str | None, preset: str, backend: str, reference: str | None, prompt_tokens: int,
                new_tokens: int, heads: tuple[str, ...] = ("cpu", "ane"), exact_numerics: bool = False,
                target: str = "default", repeats: int = 5, threads: int | None = None) -> dict:
    """A Llama-family model (random weights of ``preset``'s size without ``model``) with its classifier at each of
    ``heads`` (``orion``: the first, ``orion_{head}_head`` the others; ``faster_head`` says which decodes faster),
    and the reference, on the same weights: see :func:`bench`."""
    if preset not in LLAMA_PRESETS:
        raise OrionError(f"no preset {preset!r}; presets: {', '.join(LLAMA_PRESETS)}")
    report = bench(model, lambda folder: make_random_llama(folder, preset), f"random {preset}", heads, backend,
                   reference, prompt_tokens, new_tokens, exact_numerics, target, repeats, threads)
    speeds = {h: report["orion" if i == 0 else f"orion_{h}_head"]["decode_tok_s"] for i, h in enumerate(heads)}
    report["faster_head"] = max(speeds, key=speeds.get)
    return report


def bench(model: str | None, make_random, label: str, heads: tuple[str, ...], backend: str, reference: str | None,
          prompt_tokens: int, new_tokens: int, exact_numerics: bool = False, target: str = "default",
          repeats: int = 5, threads: int | None = None) -> dict:
    """Orion (once per classifier place in ``heads``) and the reference on the same weights (``model``, or a folder
    ``make_random(folder)`` fills), repetitions interleaved; medians, their spread, and for each ratio the median
    of the per-pair ratios with a warning when those spread wider than :data:`TRUSTED_SPREAD`. ``threads`` caps
    every side's BLAS/OpenMP threads (default: theirs, one per core); on a busy machine, threads that wait for each
    other's cores make the spread far wider than one thread each does."""
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
    names = ["orion"] + [f"orion_{h}_head" for h in heads[1:]]
    sides_spec = [("orion", h) for h in heads] + ([("transformers", "cpu")] if reference == "transformers" else [])
    names += ["reference"] if reference == "transformers" else []
    with tempfile.TemporaryDirectory(prefix="orion-bench-") as tmp:
        folder = Path(model) if model else make_random(Path(tmp) / "random")
        sides: list[_Side] = []
        logs = [open(Path(tmp) / f"{name}.log", "w+") for name in names]  # each side's stderr, for its failure
        try:
            for (side, head), log in zip(sides_spec, logs):  # loaded one after the other: no load slows another
                sides.append(_Side(side, folder, args, log, head))
            reps = interleave([side.repetition for side in sides], repeats)
            finals = [side.finish() for side in sides]
        finally:
            for side in sides:
                side.kill()
            for log in logs:
                log.close()
    orion = _summary(finals[0], reps[0])
    report = {"model": model or label, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              **{key: orion.pop(key) for key in ("target", "chip", "os_build")},
              "repeats": repeats, "threads": threads, "orion": orion, "warnings": []}
    for i, name in enumerate(names[1:], start=1):
        report[name] = _summary(finals[i], reps[i])
    if reference == "transformers":
        report["ratios"], report["warnings"] = ratios(reps[0], reps[-1])
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
    for side in [k for k, v in report.items() if isinstance(v, dict)]:
        for key, value in report[side].items():
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
    parser.add_argument("--head", choices=["cpu", "ane"], default="cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("ORION_CACHE", "off")
    if args.side == "orion":
        info, repetition = orion_side(args.model, args.prompt_tokens, args.new_tokens, args.backend,
                                      None if args.exact_numerics else "fp32", args.target, args.head)
    else:
        info, repetition = transformers_side(args.model, args.prompt_tokens, args.new_tokens)
    print(MARK + json.dumps(info), flush=True)
    for _ in sys.stdin:  # one line per repetition; the parent closes stdin when it has them all
        print(MARK + json.dumps(repetition()), flush=True)
    print(MARK + json.dumps({"peak_mb": _peak_mb()}), flush=True)


if __name__ == "__main__":
    main()
