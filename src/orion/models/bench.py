"""``orion bench gpt2``: Orion against a reference on the same weights, each side in its own process so its peak
memory is its own. Random GPT-2 124M weights are made offline with transformers (a test/dev extra) and saved once in
Hugging Face layout; both sides load that folder.

    python -m orion.models.bench --side orion --model DIR --prompt-tokens 128 --new-tokens 64 --backend emulator
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from orion.errors import OrionError

MARK = "ORION_BENCH_RESULT "


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def _prompt(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def run_orion(model_dir: Path, prompt_tokens: int, new_tokens: int, backend: str, accumulator: str | None,
              target: str = "default") -> dict:
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
    list(model.generate_ids(ids, max_tokens=new_tokens))  # measured: everything cached and loaded
    stats = model.stats
    machine = model.backend.describe()  # the chip where the ANE ran; results on it hinge on the OS build
    out = {
        "target": model.target.name, "chip": machine.get("chip"),
        "os_build": machine.get("macos_build") or os_build(),
        "backend": stats.backend, "accumulator": getattr(getattr(model.backend, "numerics", None), "accumulator",
                                                         None),
        "load_s": load_s, "first_prefill_s": first_prefill_s, "cached_prefill_s": stats.prefill_seconds,
        "prefill_tok_s": stats.prefill_tok_s, "decode_tok_s": stats.decode_tok_s,
        "dispatches_per_token": stats.dispatches_per_token, "blocks_per_program": model.group,
        "peak_mb": _peak_mb(),
    }
    model.close()
    return out


def run_transformers(model_dir: Path, prompt_tokens: int, new_tokens: int) -> dict:
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
    with torch.no_grad():
        model(ids)  # warm-up
        t1 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t1
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):  # greedy decode with the KV cache, as Orion does
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t2
    return {"backend": "transformers (PyTorch CPU, fp32)", "load_s": load_s, "cached_prefill_s": prefill_s,
            "prefill_tok_s": prompt_tokens / prefill_s, "decode_tok_s": (new_tokens - 1) / decode_s,
            "peak_mb": _peak_mb(), "torch_threads": torch.get_num_threads()}


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


def _child(side: str, model_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "orion.models.bench", "--side", side, "--model", str(model_dir),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--backend", args.backend, "--target", args.target] + (["--exact-numerics"] if args.exact_numerics else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise OrionError(f"the {side} benchmark process failed (exit {proc.returncode}): {tail}")


def bench_gpt2(model: str | None, backend: str, reference: str | None, prompt_tokens: int, new_tokens: int,
               exact_numerics: bool = False, target: str = "default") -> dict:
    from orion.compiler.targets import get_target
    from orion.runtime.program import get_backend

    # resolved here, before any weights are made: an unavailable backend is an error naming why, and the child
    # runs on exactly the backend resolved here (its report names the one that ran)
    args = argparse.Namespace(prompt_tokens=prompt_tokens, new_tokens=new_tokens, exact_numerics=exact_numerics,
                              backend=get_backend(backend, get_target(target)).name, target=target)
    with tempfile.TemporaryDirectory(prefix="orion-bench-gpt2-") as tmp:
        folder = Path(model) if model else make_random_gpt2(Path(tmp) / "gpt2-random")
        orion = _child("orion", folder, args)
        report = {"model": model or "random GPT-2 124M", "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                  **{key: orion.pop(key) for key in ("target", "chip", "os_build")}, "orion": orion}
        if reference == "transformers":
            report["reference"] = _child("transformers", folder, args)
            report["ratios"] = {
                "decode": report["orion"]["decode_tok_s"] / report["reference"]["decode_tok_s"],
                "prefill": report["orion"]["prefill_tok_s"] / report["reference"]["prefill_tok_s"],
            }
    return report


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
        result = run_orion(args.model, args.prompt_tokens, args.new_tokens, args.backend,
                           None if args.exact_numerics else "fp32", args.target)
    else:
        result = run_transformers(args.model, args.prompt_tokens, args.new_tokens)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
