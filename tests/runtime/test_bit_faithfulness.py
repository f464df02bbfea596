"""The emulator's outputs stay bit-identical while its interpreter is made faster.

The compiler example (examples/transformer_block.py), a small random GPT-2 (prefill and decode with the KV cache)
and a Llama training block (forward and backward) run under fixed seeds with the ``fp32`` and the ``fixed-point``
accumulator, and every output's sha256 is compared with the digests in ``bit_faithfulness.json``, recorded from the
code before the speed work. Inputs include overflow, subnormals and NaN/inf so every rounding path is reached.

The digests change only deliberately, when the numerics are meant to change (never to make a speed change pass):

    PYTHONPATH=src python tests/runtime/test_bit_faithfulness.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from examples.transformer_block import build as build_example  # noqa: E402
from orion.compiler.compile import compile_graph  # noqa: E402
from orion.compiler.targets import get_target  # noqa: E402
from orion.models.gpt2 import GPT2, GPT2Config, causal_mask  # noqa: E402
from orion.models.llama import (  # noqa: E402
    BACKWARD_TAPS,
    LlamaConfig,
    backward_graph,
    forward_graph,
    init_weights,
    layer_inputs,
    rope_tables,
)
from orion.runtime.backends import numerics  # noqa: E402
from orion.runtime.backends.emulator import EmulatorBackend, load_program  # noqa: E402
from orion.runtime.backends.numerics import Numerics  # noqa: E402
from orion.runtime.budget import CompileBudget  # noqa: E402
from orion.runtime.cache import ProgramCache  # noqa: E402
from orion.runtime.program import Program  # noqa: E402

DIGESTS = Path(__file__).with_name("bit_faithfulness.json")
ACCUMULATORS = ("fp32", "fixed-point")


def digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def backend(accumulator: str) -> EmulatorBackend:
    return EmulatorBackend(get_target("default"), Numerics(accumulator=accumulator))


def example_outputs(settings: Numerics, tmp: Path) -> dict[str, np.ndarray]:
    """examples/transformer_block.py compiled as `orion compile` does, run on ordinary and extreme inputs."""
    compile_graph(build_example(d=64, heads=4, seq=16, seed=0), "default").module.write(tmp)
    program = load_program(tmp, settings)
    x = np.random.default_rng(3).normal(0, 1, (1, 64, 1, 16))
    specials = x.copy()
    specials[0, :4, 0, 0] = [np.nan, np.inf, -np.inf, -0.0]
    feeds = {"normal": x.astype(np.float16), "big": (x * 3000).astype(np.float32),
             "tiny": (x * 2e-6).astype(np.float16), "specials": specials}
    return {f"{label}/y": program.run({"x": v})["y"] for label, v in feeds.items()}


def gpt2_state(config: GPT2Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random GPT-2 tensors in Hugging Face names, non-zero biases and norm parameters."""
    d, state = config.n_embd, {}
    state["wte.weight"] = rng.normal(0, 0.5, (config.vocab_size, d))
    state["wpe.weight"] = rng.normal(0, 0.2, (config.n_positions, d))
    state["ln_f.weight"], state["ln_f.bias"] = rng.normal(1, 0.1, d), rng.normal(0, 0.1, d)
    for i in range(config.n_layer):
        shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                  "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                  "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                  "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
                  "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}
        for name, shape in shapes.items():
            mean = 1.0 if name.startswith("ln_") and name.endswith("weight") else 0.0
            scale = 0.1 if len(shape) == 1 else 0.5 / np.sqrt(shape[0])
            state[f"h.{i}.{name}"] = rng.normal(mean, scale, shape)
    return {k: v.astype(np.float32) for k, v in state.items()}


def gpt2_outputs(accumulator: str) -> dict[str, np.ndarray]:
    """Prefill (hidden rows and every block's k/v) and 6 decode steps' hidden rows, as the emulator gives them."""
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    rng = np.random.default_rng(11)
    model = GPT2(config, gpt2_state(config, rng), backend=backend(accumulator), cache=ProgramCache(None),
                 budget=CompileBudget(100))
    ids = rng.integers(0, config.vocab_size, 20)
    out: dict[str, np.ndarray] = {}
    try:
        hidden, kv, _ = model._prefill(ids)
        out["prefill/hidden"] = hidden
        out.update({f"prefill/{k}": v for k, v in sorted(kv.items())})
        rows = []
        head = model._head
        model._head = lambda h, **kw: (rows.append(np.array(h)), head(h, **kw))[1]
        list(model.generate_ids(ids, max_tokens=7))
        out["decode/hidden"] = np.concatenate(rows[1:])  # rows[0] is the prefill's last row
    finally:
        model.close()
    return out


def llama_outputs(accumulator: str) -> dict[str, np.ndarray]:
    """A Llama block's forward (every tap) and backward (every gradient) programs, as training runs them."""
    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=192, vocab_size=256, max_seq_len=32)
    seq = 32
    rng = np.random.default_rng(5)
    weights = init_weights(config, seed=1)
    for key in ("layers.0.attention_norm", "layers.0.ffn_norm"):
        weights[key] = (1 + 0.1 * rng.standard_normal(config.dim)).astype(np.float32)
    x = rng.standard_normal((1, config.dim, 1, seq)).astype(np.float32)
    dy = (rng.standard_normal((1, config.dim, 1, seq)) * 25.6).astype(np.float32)
    cos, sin = rope_tables(config, seq)
    common = {"cos": cos, "sin": sin, **layer_inputs(weights, 0, config)}
    options = dict(backend=backend(accumulator), cache=ProgramCache(None), budget=CompileBudget(10))
    with Program.from_graph(forward_graph(config, seq), **options) as fwd:
        taps = fwd.run({"x": x, "mask": causal_mask(seq), **common})
    with Program.from_graph(backward_graph(config, seq), **options) as bwd:
        feed = {"dy": dy, **common, **{k: taps[k] for k in BACKWARD_TAPS}}
        grads = bwd.run({k: v for k, v in feed.items() if k in bwd.input_names})
    return {**{f"forward/{k}": v for k, v in taps.items()}, **{f"backward/{k}": v for k, v in grads.items()}}


def all_digests(accumulator: str, tmp: Path) -> dict[str, str]:
    outputs = {f"example/{k}": v for k, v in example_outputs(Numerics(accumulator=accumulator), tmp).items()}
    # unflushed matmul outputs reach the rounding of subnormals with ties away from zero
    unflushed = Numerics(accumulator=accumulator, flush_subnormals_in_matmul=False)
    outputs.update({f"example-unflushed/{k}": v for k, v in example_outputs(unflushed, tmp).items()})
    outputs.update({f"gpt2/{k}": v for k, v in gpt2_outputs(accumulator).items()})
    outputs.update({f"llama/{k}": v for k, v in llama_outputs(accumulator).items()})
    return {name: digest(value) for name, value in sorted(outputs.items())}


@pytest.mark.parametrize("round_chunk", [None, 1000], ids=["default-chunks", "small-chunks"])
@pytest.mark.parametrize("accumulator", ACCUMULATORS)
def test_outputs_are_bit_identical_to_the_recorded_digests(accumulator, round_chunk, tmp_path, monkeypatch):
    """``small-chunks`` makes the large-array path of the rounding run on these small programs too."""
    if round_chunk is not None:
        monkeypatch.setattr(numerics, "_ROUND_CHUNK", round_chunk)
    want = json.loads(DIGESTS.read_text())[accumulator]
    got = all_digests(accumulator, tmp_path)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"{len(differ)} of {len(want)} outputs changed bits: {differ}"


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = {"_comment": "sha256 of each output's dtype, shape and bytes, written by `PYTHONPATH=src python "
                              "tests/runtime/test_bit_faithfulness.py --record`; regenerate only when the numerics "
                              "are meant to change. First recorded from commit 598c1b4, before the speed work."}
        record.update({acc: all_digests(acc, Path(tmp) / acc) for acc in ACCUMULATORS})
    DIGESTS.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {DIGESTS}: {sum(len(v) for k, v in record.items() if k != '_comment')} digests")
