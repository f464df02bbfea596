"""LoRA adapters in GPT-2 and Llama on the emulator against transformers + peft (PyTorch, CPU) with the same adapter.

Oracles: peft's own forward (``get_peft_model`` with ``init_lora_weights=False``, so A and B are both random and the
adapter moves the logits by ~0.2-1), greedy decoding done with peft's full forward at every step, and, for "no
adapter", a model that never saw an adapter. Compile counts are read from an explicit CompileBudget and from each
program's own counters.

Tolerance: the programs compute in fp16 (unit roundoff u = 2^-11 ~ 4.9e-4) and every op rounds its output, so a
few blocks leave the logits (magnitude ~1) within a few u of float32 PyTorch: measured 5e-4 without an adapter and
up to 2e-3 with one (the error grows with the adapter's scale, which enlarges the q/k and FFN activations fp16
rounds; a scale-5.7 rsLoRA adapter on GPT-2's c_attn measured 2.3e-3). We allow 5e-3 * max(1, |logits|), about
10 u, and require the adapter's own effect on the logits to be at least 20 times that, so a dropped module, a wrong
scale (alpha/r vs alpha/sqrt(r), a rank or alpha pattern ignored), a transposed factor or an unfolded LayerNorm fails.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import orion
from orion.errors import BindingError, OrionError
from orion.lora import AdapterError, LoraLayout, new_adapter
from orion.models import model_backend
from orion.models.bench import randomize_biases_and_norms
from orion.runtime.budget import PROCESS_BUDGET, CompileBudget
from orion.runtime.cache import ProgramCache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96
TOL = 5e-3
IDS = np.random.default_rng(0).integers(0, VOCAB, 20)


@dataclass
class Family:
    name: str
    base: object  # the transformers model
    make: Callable  # make(budget=...) -> a fresh Orion model on the emulator with its own in-memory program cache
    folders: dict[str, Path] = field(default_factory=dict)  # adapter name -> PEFT folder
    peft_models: dict[str, object] = field(default_factory=dict)
    refs: dict = field(default_factory=dict)  # adapter name (None: base) -> peft logits on IDS


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


def save_peft(base, folder: Path, safe: bool = True, **lora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora)).eval()
        model.save_pretrained(folder, safe_serialization=safe)
    return model


def _family(name: str, base, make, adapters: dict, tmp: Path) -> Family:
    fam = Family(name, base, make)
    fam.refs[None] = torch_logits(base, IDS)
    for adapter, lora in adapters.items():
        fam.folders[adapter] = tmp / adapter
        fam.peft_models[adapter] = save_peft(base, tmp / adapter, **lora)
        fam.refs[adapter] = torch_logits(fam.peft_models[adapter], IDS)
    return fam


GPT2_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], init_lora_weights=False),
    "b": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["attn.c_proj", "c_fc"], init_lora_weights=False,
              rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"attn.c_proj": 4}),
    "big": dict(r=40, lora_alpha=40, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False),
    "zero": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),  # peft's init: B = 0
}
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL, init_lora_weights=False),
    "b": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
              init_lora_weights=False, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 4}),
    "big": dict(r=40, lora_alpha=40, target_modules=["k_proj", "up_proj"], init_lora_weights=False),
    "zero": dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL),
}


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    from orion.models.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    # random biases and norms: folding a norm into an adapted projection (GPT-2: A diag(gamma) and the bias
    # s B A beta) is tested, not a no-op
    base = randomize_biases_and_norms(transformers.GPT2LMHeadModel(config)).eval()
    state = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}

    def make(budget=None):
        return GPT2(GPT2Config.from_hf(config.to_dict()), state, backend=model_backend("emulator"),
                    cache=ProgramCache(None), budget=budget or CompileBudget(100))

    return _family("gpt2", base, make, GPT2_ADAPTERS, tmp_path_factory.mktemp("gpt2-adapters"))


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    from orion.models.llama import Llama, from_hf

    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = randomize_biases_and_norms(transformers.LlamaForCausalLM(config), seed=1).eval()
    ours, weights = from_hf(config.to_dict(), {k: v.detach().numpy().copy() for k, v in base.state_dict().items()})

    def make(budget=None):
        return Llama(ours, weights, backend=model_backend("emulator"), cache=ProgramCache(None),
                     budget=budget or CompileBudget(100))

    return _family("llama", base, make, LLAMA_ADAPTERS, tmp_path_factory.mktemp("llama-adapters"))


@pytest.fixture(params=["gpt2", "llama"])
def family(request) -> Family:
    return request.getfixturevalue(f"{request.param}_family")


def assert_matches(got: np.ndarray, fam: Family, adapter: str | None) -> None:
    ref = fam.refs[adapter]
    tol = TOL * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err < tol, f"{fam.name} adapter {adapter}: max error {err:.2e} > {tol:.2e}"
    if adapter is not None:
        effect = float(np.abs(ref - fam.refs[None]).max())
        assert effect > 20 * tol, f"the adapter {adapter} barely moves the logits ({effect:.3f}): a weak test"


def programs_of(model) -> list:
    if hasattr(model, "_programs"):  # GPT-2: (kind, size) -> programs
        return [p for ps in model._programs.values() for p in ps]
    return model.blocks.programs


def counters(model) -> dict[int, tuple[int, int]]:
    return {id(p): (p.compiles, p.cache_hits) for p in programs_of(model)}


# -- parity ---------------------------------------------------------------------------------------------------------


def test_logits_with_a_peft_adapter_match_peft(family):
    with family.make() as model:
        assert_matches(model.logits(IDS), family, None)
        for name in ("a", "b"):
            assert model.load_adapter(family.folders[name], name=name) == name
            model.set_adapter(name)
            assert model.active_adapter == name
            assert_matches(model.logits(IDS), family, name)
        assert model.adapters == ["a", "b"]


def test_no_adapter_and_a_zero_adapter_are_bit_identical_to_the_base_model(family):
    with family.make() as plain:
        base = plain.logits(IDS)
    with family.make() as model:
        model.load_adapter(family.folders["a"], name="a")
        model.load_adapter(family.folders["zero"], name="zero")
        model.add_adapter(new_adapter(model.adapter_spec, "all", rank=8, alpha=16), "fresh")
        assert model.active_adapter is None
        np.testing.assert_array_equal(model.logits(IDS), base)  # loaded but none active
        model.set_adapter("a")
        assert np.abs(model.logits(IDS) - base).max() > 0.1
        for name in ("zero", None, "fresh"):
            model.set_adapter(name)
            np.testing.assert_array_equal(model.logits(IDS), base, err_msg=str(name))
        model.set_adapter("a")
        model.delete_adapter("a")  # deleting the active adapter leaves the base model
        assert model.active_adapter is None and "a" not in model.adapters
        np.testing.assert_array_equal(model.logits(IDS), base)


def test_switching_adapters_compiles_nothing_and_each_still_matches(family):
    budget = CompileBudget(50)
    with family.make(budget=budget) as model:
        model.load_adapter(family.folders["a"], name="a")
        model.load_adapter(family.folders["b"], name="b")
        assert model.lora == LoraLayout.covering([model._adapters["a"], model._adapters["b"]],
                                                 model.target.matmul_inner_multiple)
        model.set_adapter("a")
        assert_matches(model.logits(IDS), family, "a")
        if family.name == "gpt2":
            list(model.generate_ids(IDS[:9], max_tokens=3))  # the decode programs too
        assert budget.used > 0
        used, process_used, before = budget.used, PROCESS_BUDGET.used, counters(model)
        for name in ("b", None, "a", "b", None, "a", "b"):
            model.set_adapter(name)
            assert_matches(model.logits(IDS), family, name)
        if family.name == "gpt2":
            list(model.generate_ids(IDS[:9], max_tokens=3))
        assert budget.used == used and PROCESS_BUDGET.used == process_used
        assert counters(model) == before  # the same program objects, not one more compile or cache hit


def test_generation_stats_count_the_compiles_of_that_generation_only(family):
    """What `orion serve` adds up into its compile counter."""
    with family.make() as model:
        model.set_adapter(model.load_adapter(family.folders["a"], name="a"))
        list(model.generate_ids(IDS[:9], max_tokens=3))
        first = model.stats.compiles
        model.set_adapter(None)
        list(model.generate_ids(IDS[:9], max_tokens=3))
        assert first > 0 and model.stats.compiles == 0


def test_an_adapter_that_does_not_fit_the_layout_rebuilds_and_still_matches(family):
    budget = CompileBudget(50)
    with family.make(budget=budget) as model:
        model.set_adapter(model.load_adapter(family.folders["a"], name="a"))
        assert_matches(model.logits(IDS), family, "a")
        first, used = model.lora, budget.used
        model.load_adapter(family.folders["big"], name="big")  # rank 40: past the first layout's slot of 32
        assert model.lora.rank >= 40 and model.lora.rank % model.target.matmul_inner_multiple == 0
        assert set(model.lora.targets) >= set(first.targets)
        assert model.active_adapter == "a"
        assert_matches(model.logits(IDS), family, "a")  # rebuilt for the new layout with "a" still active
        assert budget.used > used
        model.set_adapter("big")
        assert_matches(model.logits(IDS), family, "big")


def _peft_greedy(model, prompt, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from the full forward at every step, and each step's top-1 minus top-2 gap."""
    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor(ids)[None]).logits[0, -1].numpy()
            top = np.sort(logits)
            gaps.append(float(top[-1] - top[-2]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], gaps


def test_greedy_generation_with_an_adapter_equals_peft_gpt2(gpt2_family):
    """Prefill, then the decode programs with the KV cache; switching adapters reaches the decode programs too.
    Tokens are compared up to the reference's first near tie (top-2 gap under 2 TOL, where fp16 may flip them)."""
    prompt = np.random.default_rng(81).integers(0, VOCAB, 9)  # no near ties for either adapter
    new = 8
    with gpt2_family.make() as model:
        model.load_adapter(gpt2_family.folders["a"], name="a")
        model.load_adapter(gpt2_family.folders["b"], name="b")
        base, _ = _peft_greedy(gpt2_family.base, prompt, new)
        for name in ("a", "b", "a"):
            expected, gaps = _peft_greedy(gpt2_family.peft_models[name], prompt, new)
            near_tie = next((i for i, g in enumerate(gaps) if g < 2 * TOL), new)
            assert near_tie >= 5 and len(set(expected[:near_tie])) > 1, \
                f"adapter {name}: {expected} with a near tie at token {near_tie} ({gaps}): a weak test"
            model.set_adapter(name)
            got = list(model.generate_ids(prompt, max_tokens=new))
            assert got[:near_tie] == expected[:near_tie], (name, got, expected, gaps)
            assert got[:near_tie] != base[:near_tie]  # the adapter changes what greedy decoding says


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(gpt2_family, tmp_path_factory):
    """Adapters that do not fit the 3-layer, d 64 GPT-2: other width, other depth, pickle only."""
    tmp = tmp_path_factory.mktemp("foreign")
    out = {}
    for name, kw in (("narrow", dict(n_embd=32, n_layer=3)), ("deep", dict(n_embd=64, n_layer=4))):
        torch.manual_seed(0)
        other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_head=4, vocab_size=VOCAB, n_positions=64,
                                                                     **kw))
        save_peft(other, tmp / name, r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        out[name] = tmp / name
    save_peft(gpt2_family.base, tmp / "pickled", safe=False, r=4, target_modules=["c_attn"])
    out["pickled"] = tmp / "pickled"
    assert not (out["pickled"] / "adapter_model.safetensors").exists()
    return out


def test_adapter_errors_name_the_fault_and_leave_the_model_unchanged(gpt2_family, llama_family, foreign, tmp_path):
    from orion.models.llama import PRESETS
    from orion.models.llama import adapter_spec as llama_spec

    with gpt2_family.make() as model:
        base = model.logits(IDS)
        model.set_adapter(model.load_adapter(gpt2_family.folders["a"], name="a"))
        with_a = model.logits(IDS)
        cases = [
            (lambda: model.set_adapter("nope"), BindingError, ["no adapter named 'nope'", "'a'"]),
            (lambda: model.load_adapter(llama_family.folders["a"]), AdapterError,
             ["model.layers.0.", "not a LoRA weight of a projection Orion adapts in gpt2"]),
            (lambda: model.load_adapter(foreign["narrow"]), AdapterError,
             [str(foreign["narrow"]), "A [r, 64]", "another model size"]),
            (lambda: model.load_adapter(foreign["deep"]), AdapterError, ["for layer 3", "the model has 3 layers"]),
            (lambda: model.load_adapter(foreign["pickled"]), OrionError,
             ["adapter_model.bin", "pickle", "safe_serialization=True"]),
            (lambda: model.load_adapter(tmp_path / "missing"), OrionError,
             [f"no adapter folder at {tmp_path / 'missing'}", "adapter_config.json"]),
            (lambda: model.add_adapter(new_adapter(llama_spec(PRESETS["tiny"]), "q", 4, 8), "x"), AdapterError,
             ["for llama, not gpt2"]),
        ]
        for call, kind, fragments in cases:
            with pytest.raises(kind) as info:
                call()
            message = str(info.value)
            assert "\n" not in message
            for fragment in fragments:
                assert fragment in message, (fragment, message)
        assert model.adapters == ["a"] and model.active_adapter == "a"
        np.testing.assert_array_equal(model.logits(IDS), with_a)
        model.set_adapter(None)
        np.testing.assert_array_equal(model.logits(IDS), base)


def test_an_adapter_object_for_another_size_is_refused(gpt2_family):
    """add_adapter takes Adapter objects (training makes them): one for a deeper or wider GPT-2 must be refused
    before it is resident, not silently cut to this model's layers or failing inside numpy."""
    from orion.models.gpt2 import GPT2Config, adapter_spec

    with gpt2_family.make() as model:
        base = model.logits(IDS)
        for other, fragment in ((GPT2Config(VOCAB, 64, 64, 5, 4), "layer 3"),
                                (GPT2Config(VOCAB, 64, 32, 3, 4), "another model size")):
            adapter = new_adapter(adapter_spec(other), "all", 4, 8)
            with pytest.raises(AdapterError, match=fragment):
                model.add_adapter(adapter, "other")
        assert model.adapters == [] and model.lora is None
        np.testing.assert_array_equal(model.logits(IDS), base)


def test_llama_refuses_a_gpt2_adapter(gpt2_family, llama_family):
    with llama_family.make() as model:
        with pytest.raises(AdapterError, match=r"transformer\.h\.0\..*not a LoRA weight of a projection Orion "
                                               r"adapts in llama"):
            model.load_adapter(gpt2_family.folders["a"])
        assert model.adapters == []


# -- loading from folders -------------------------------------------------------------------------------------------


def test_orion_load_of_a_saved_folder_then_load_adapter(family, tmp_path):
    folder = tmp_path / "model"
    family.base.save_pretrained(folder, safe_serialization=True)
    with orion.load(str(folder), backend="emulator", cache=ProgramCache(None)) as model:
        name = model.load_adapter(str(family.folders["b"]))
        assert name == "b" and model.adapters == ["b"]  # named after its folder
        model.set_adapter(name)
        assert_matches(model.logits(IDS), family, "b")


def test_load_adapter_by_hub_id_fetches_only_the_safe_files_and_is_named_by_the_id(gpt2_family, tmp_path,
                                                                                  monkeypatch, no_network):
    """A hub snapshot's folder is named after a commit: the adapter is named by its hub id instead. Only the two
    PEFT files are asked for (never adapter_model.bin, a pickle)."""
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "models--someone--story-lora" / "snapshots" / "0123abcd"
    shutil.copytree(gpt2_family.folders["a"], snapshot)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with gpt2_family.make() as model:
        assert model.load_adapter("someone/story-lora") == "someone/story-lora"
        model.set_adapter("someone/story-lora")
        assert_matches(model.logits(IDS), gpt2_family, "a")
    assert [c[0] for c in calls] == ["someone/story-lora"]
    assert sorted(calls[0][1]["allow_patterns"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert no_network == []


# -- the binding planner's rules on LoRA programs ----------------------------------------------------------------------


_SIGNATURE = re.compile(r"func main<\w+>\((.*?)\)\s*\{", re.DOTALL)
_ARG = re.compile(r"tensor<(fp16|fp32), \[([\d, ]+)\]>\s+(\w+)")


def test_lora_programs_bind_inputs_alphabetically_on_one_surface_size(family):
    with family.make() as model:
        model.load_adapter(family.folders["a"], name="a")
        model.load_adapter(family.folders["b"], name="b")
        model.set_adapter("a")
        model.logits(IDS)
        program = programs_of(model)[0]
        declared = {name: (dtype, [int(n) for n in shape.split(",")])
                    for dtype, shape, name in _ARG.findall(_SIGNATURE.search(program.module.text).group(1))}
        names = [n for n, _ in program.plan.inputs]
        assert names == sorted(names) == sorted(declared)
        lora = [n for n in names if "lora" in n]
        # the base weights are baked (BLOBFILE constants): the other inputs are activations, the mask and RoPE tables
        assert {n for n in names if n not in lora} <= {"x", "mask", "cos", "sin", "cos_q", "sin_q", "cos_k", "sin_k"}
        assert len(program.module.weight_names) >= 4
        # every adapted projection of the layout has its A and B (or B's two rotary halves) in the program
        for target in model.lora.targets:
            mine = [n for n in lora if re.search(rf"lora_{target}_", n)]
            assert any(n.endswith("_a") for n in mine) and any(re.search(r"_b(\d|_\w+)?$", n) for n in mine), \
                (target, lora)
            a = next(n for n in mine if n.endswith("_a"))
            assert declared[a][1][2] == model.lora.rank  # A has the slot's rank rows
        itemsize = {"fp16": 2, "fp32": 4}
        for name, nbytes in program.plan.inputs:  # packed: no row padding in the plan's sizes
            dtype, shape = declared[name]
            assert nbytes == int(np.prod(shape)) * itemsize[dtype], name
        surface = program.plan.input_surface_bytes
        assert surface >= max(n for _, n in program.plan.inputs) and surface >= model.target.min_surface_bytes
        assert {program.input_tensor(n).surface.nbytes for n in names} == {surface}
