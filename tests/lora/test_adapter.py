"""orion.lora as data: padding into slots, layouts, and PEFT's file format read and written.

Oracles are independent of Orion: adapters written by peft itself (``get_peft_model`` + ``save_pretrained``), peft's
own per-module rank, scaling and ``get_delta_weight``, peft's ``PeftModel.from_pretrained`` for the files Orion
writes, torch's kaiming-uniform formula for the initial A, and float64 numpy for the padded products. The specs are
built from the transformers modules themselves (their in/out features), not from Orion's model code.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orion.errors import OrionError
from orion.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Adapter,
    AdapterError,
    AdapterSpec,
    LoraLayout,
    LoraModule,
    new_adapter,
    parse_peft,
    peft_files,
)
from orion.models.bench import randomize_biases_and_norms

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

GPT2_PATHS = {"qkv": "attn.c_attn", "o": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}
LLAMA_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# -- fixtures: tiny transformers models and specs read off their modules ---------------------------------------------


def _spec_of(model, family: str, prefix: str, paths: dict[str, str], n_layers: int) -> AdapterSpec:
    """An AdapterSpec whose features come from layer 0's torch modules (Conv1D stores [in, out])."""
    features = {}
    for target, path in paths.items():
        module = model.get_submodule(f"{prefix}.0.{path}")
        if family == "gpt2":
            features[target] = tuple(module.weight.shape)  # Conv1D: [in, out]
        else:
            features[target] = (module.in_features, module.out_features)
    return AdapterSpec(family, prefix, paths, features, n_layers, default_targets=tuple(paths)[:1],
                       fan_in_fan_out=family == "gpt2")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = randomize_biases_and_norms(transformers.GPT2LMHeadModel(config)).eval()
    return model, _spec_of(model, "gpt2", "transformer.h", GPT2_PATHS, 2)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = randomize_biases_and_norms(transformers.LlamaForCausalLM(config)).eval()
    return model, _spec_of(model, "llama", "model.layers", LLAMA_PATHS, 2)


def peft_adapter(base, folder, config=None, **lora):
    """Save an adapter with peft; returns (its config dict, its tensors, the peft model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config or peft.LoraConfig(**lora))
        model.save_pretrained(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    return cfg, safetensors_numpy.load_file(str(folder / WEIGHTS_FILE)), model


def lora_layers(model) -> dict[str, object]:
    """peft's LoRA layers by module path without peft's ``base_model.model.`` prefix."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_matches_peft(adapter: Adapter, model, spec: AdapterSpec) -> None:
    """Every module of ``adapter`` is one of peft's LoRA layers with the same A, B, rank, scale and delta."""
    layers = lora_layers(model)
    assert {spec.module_key(i, t) for i, t in adapter.modules} == set(layers)
    for (i, t), m in adapter.modules.items():
        layer = layers[spec.module_key(i, t)]
        np.testing.assert_array_equal(m.a, layer.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(m.b, layer.lora_B["default"].weight.detach().numpy())
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        delta = layer.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(m.delta(), delta.T if spec.fan_in_fan_out else delta, rtol=1e-5, atol=1e-6)


# -- LoraModule.padded ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rank=st.integers(1, 6), extra=st.integers(0, 40), fan_in=st.integers(1, 24), fan_out=st.integers(1, 24),
       scale=st.floats(0.01, 64.0), seed=st.integers(0, 2**32 - 1))
def test_padded_product_equals_scaled_lora(rank, extra, fan_in, fan_out, scale, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, fan_in)).astype(np.float32)
    b = rng.standard_normal((fan_out, rank)).astype(np.float32)
    x = rng.standard_normal((fan_in, 5))
    slot = rank + extra
    pa, pb = LoraModule(a, b, alpha=scale * rank, scale=scale).padded(slot)
    assert pa.shape == (slot, fan_in) and pb.shape == (fan_out, slot)
    assert pa.dtype == np.float32 and pb.dtype == np.float32
    # the padding is exact zeros, the real rows are A and the real columns s B in float32 (within 2 ulp: s and
    # the product may each be rounded to float32)
    np.testing.assert_array_equal(pa[:rank], a)
    assert not pa[rank:].any() and not pb[:, rank:].any()
    np.testing.assert_allclose(pb[:, :rank], scale * b.astype(np.float64), rtol=2.5e-7, atol=0)
    expected = scale * (b.astype(np.float64) @ (a.astype(np.float64) @ x))
    got = pb.astype(np.float64) @ (pa.astype(np.float64) @ x)
    # only the float32 rounding of s B separates the two (relative 2^-24 per entry)
    bound = 1e-6 * (scale * np.abs(b).astype(np.float64) @ (np.abs(a).astype(np.float64) @ np.abs(x)))
    assert (np.abs(got - expected) <= bound + 1e-30).all()


def test_padded_refuses_a_slot_smaller_than_the_rank():
    m = LoraModule(np.ones((4, 3), np.float32), np.ones((2, 4), np.float32), 8.0, 2.0)
    with pytest.raises(AdapterError, match=r"rank 4 does not fit a slot of rank 3"):
        m.padded(3)


# -- LoraLayout -----------------------------------------------------------------------------------------------------


def _adapter(rank: int, targets, layers=(0,)) -> Adapter:
    return Adapter("llama", {(i, t): LoraModule(np.zeros((rank, 8), np.float32), np.zeros((8, rank), np.float32),
                                                 2.0 * rank, 2.0)
                             for i in layers for t in targets})


def test_covering_takes_the_union_of_targets_and_rounds_the_rank_up():
    first, second = _adapter(3, ["q", "v"]), _adapter(8, ["o", "q"], layers=(1,))
    assert LoraLayout.covering([first, second]) == LoraLayout(("o", "q", "v"), 8)
    assert LoraLayout.covering([first, second], multiple=32) == LoraLayout(("o", "q", "v"), 32)
    assert LoraLayout.covering([first, second], multiple=8) == LoraLayout(("o", "q", "v"), 8)
    assert LoraLayout.covering([_adapter(33, ["down"])], multiple=32) == LoraLayout(("down",), 64)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 80), st.sets(st.sampled_from(list(LLAMA_PATHS)), min_size=1)),
                min_size=1, max_size=4),
       st.sampled_from([1, 4, 32]))
def test_covering_is_the_smallest_layout_every_adapter_fits(specs, multiple):
    adapters = [_adapter(r, sorted(t)) for r, t in specs]
    layout = LoraLayout.covering(adapters, multiple)
    top = max(r for r, _ in specs)
    assert layout.rank % multiple == 0 and top <= layout.rank < top + multiple
    assert set(layout.targets) == set().union(*(t for _, t in specs))
    assert list(layout.targets) == sorted(layout.targets)
    assert all(layout.fits(a) for a in adapters)


def test_fits_needs_the_targets_and_the_rank():
    layout = LoraLayout(("q", "v"), 8)
    assert layout.fits(_adapter(8, ["q"])) and layout.fits(_adapter(1, ["q", "v"]))
    assert not layout.fits(_adapter(9, ["q"]))  # rank past the slot
    assert not layout.fits(_adapter(2, ["q", "k"]))  # a projection the programs do not adapt


# -- parse_peft on files peft wrote ----------------------------------------------------------------------------------


def test_parse_peft_reads_what_peft_saves_gpt2_with_patterns_and_rslora(gpt2, tmp_path):
    base, spec = gpt2
    config, tensors, model = peft_adapter(
        base, tmp_path, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        use_rslora=True, rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"mlp.c_proj": 3},
        init_lora_weights=False)
    adapter = parse_peft(config, tensors, spec, str(tmp_path))
    assert adapter.family == "gpt2" and adapter.rslora
    assert adapter.targets == ("fc", "o", "proj", "qkv") and adapter.rank == 4
    assert_matches_peft(adapter, model, spec)
    # the numbers peft's layers hold, spelled out: rsLoRA divides by sqrt(r)
    assert adapter.modules[(1, "qkv")].rank == 2
    assert adapter.modules[(1, "qkv")].scale == pytest.approx(8 / math.sqrt(2))
    assert adapter.modules[(0, "proj")].alpha == 3 and adapter.modules[(0, "proj")].scale == pytest.approx(3 / 2)
    assert adapter.modules[(0, "qkv")].alpha == 8 and adapter.modules[(0, "qkv")].scale == pytest.approx(4.0)


def test_parse_peft_reads_what_peft_saves_llama_every_target(llama, tmp_path):
    base, spec = llama
    config, tensors, model = peft_adapter(base, tmp_path, r=4, lora_alpha=16, init_lora_weights=False,
                                          target_modules=[p.split(".")[-1] for p in LLAMA_PATHS.values()])
    adapter = parse_peft(config, tensors, spec)
    assert set(adapter.targets) == set(LLAMA_PATHS) and len(adapter.modules) == 2 * len(LLAMA_PATHS)
    assert all(m.scale == 4.0 and m.alpha == 16 for m in adapter.modules.values()) and not adapter.rslora
    assert_matches_peft(adapter, model, spec)


def test_parse_peft_reads_layers_to_transform(llama, tmp_path):
    base, spec = llama
    config, tensors, model = peft_adapter(base, tmp_path, r=2, target_modules=["q_proj", "v_proj"],
                                          layers_to_transform=[1], init_lora_weights=False)
    adapter = parse_peft(config, tensors, spec)
    assert set(adapter.modules) == {(1, "q"), (1, "v")}
    assert_matches_peft(adapter, model, spec)


# -- parse_peft refusals ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(gpt2, tmp_path_factory):
    """A valid GPT-2 adapter as peft saves it (r 4 on c_attn and both c_proj)."""
    folder = tmp_path_factory.mktemp("gpt2-lora")
    config, tensors, _ = peft_adapter(gpt2[0], folder, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                      fan_in_fan_out=True, init_lora_weights=False)
    return config, tensors


A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B0 = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


def _nan(tensors):
    out = dict(tensors)
    out[B0] = out[B0].copy()
    out[B0][1, 2] = np.nan
    return out


@pytest.mark.parametrize("change_config,change_tensors,fragments", [
    ({"peft_type": "IA3"}, None, ["peft_type 'IA3' is not LORA"]),
    ({"use_dora": True}, None, ["use_dora=True", "DoRA"]),
    ({"bias": "all"}, None, ["bias='all'", "biases"]),
    ({"bias": "lora_only"}, None, ["bias='lora_only'"]),
    ({"modules_to_save": ["lm_head"]}, None, ["modules_to_save=['lm_head']", "merge"]),
    ({"alora_invocation_tokens": [5, 6]}, None, ["alora_invocation_tokens", "aLoRA", "plain LoRA"]),
    ({"r": 8}, None, ["transformer.h.0.attn.c_", "lora_A has 4 rows", "r=8"]),
    ({"r": 0}, None, ["r must be a positive number, got 0"]),
    ({"lora_alpha": None}, None, ["lora_alpha must be a positive number"]),
    ({"rank_pattern": {"h.1.attn.c_proj": 2}}, None, ["transformer.h.1.attn.c_proj", "r=2"]),
    (None, lambda t: {k: v for k, v in t.items() if k != B0}, ["transformer.h.0.attn.c_attn has lora_A but not lora_B"]),
    (None, lambda t: {**t, A0: t[A0].T.copy()}, ["lora_A [32, 4]", "A [r, 32]", "another model size"]),
    (None, lambda t: {**t, A0.replace("h.0", "h.7"): t[A0], B0.replace("h.0", "h.7"): t[B0]},
     ["layer 7", "2 layers"]),
    (None, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)},
     ["lm_head", "not a LoRA weight of a projection", "transformer.h.N.attn.c_attn"]),
    (None, _nan, ["transformer.h.0.attn.c_attn", "NaN"]),
    (None, lambda t: {}, ["holds no LoRA tensors"]),
])
def test_parse_peft_refuses_with_a_message_naming_the_fault(saved, gpt2, change_config, change_tensors, fragments):
    config, tensors = saved
    config = {**config, **(change_config or {})}
    tensors = change_tensors(tensors) if change_tensors else tensors
    with pytest.raises(AdapterError) as info:
        parse_peft(config, tensors, gpt2[1], "/adapters/demo")
    message = str(info.value)
    assert isinstance(info.value, OrionError)
    assert message.startswith("/adapters/demo: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("make_config,fragment", [
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "use_dora"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "bias='all'"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[3, 4],
                                      task_type="CAUSAL_LM"), "aLoRA"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), "lm_head"),
    (lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
])
def test_parse_peft_refuses_adapters_peft_saves_that_are_not_plain_lora(llama, tmp_path, make_config, fragment):
    """aLoRA keeps LoRA's tensors (it only acts after its invocation tokens): only its config can refuse it."""
    base, spec = llama
    config, tensors, _ = peft_adapter(base, tmp_path, make_config())
    with pytest.raises(AdapterError, match=re.escape(fragment)):
        parse_peft(config, tensors, spec, str(tmp_path))


# -- peft_files: Orion writes, peft reads ----------------------------------------------------------------------------


def _random_adapter(spec: AdapterSpec, targets, rank: int, alpha: float, seed: int, rslora: bool = False,
                    odd: dict | None = None) -> Adapter:
    """Random A and B on ``targets`` of every layer; ``odd`` maps (layer, target) -> (rank, alpha) exceptions."""
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(spec.n_layers):
        for t in targets:
            r, al = (odd or {}).get((layer, t), (rank, alpha))
            fan_in, fan_out = spec.features[t]
            s = al / math.sqrt(r) if rslora else al / r
            modules[(layer, t)] = LoraModule(rng.standard_normal((r, fan_in)).astype(np.float32) * 0.3,
                                             rng.standard_normal((fan_out, r)).astype(np.float32) * 0.3, al, s)
    return Adapter(spec.family, modules, rslora=rslora)


def _write(files: dict[str, bytes], folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _merged_logits(base, spec: AdapterSpec, adapter: Adapter, ids) -> np.ndarray:
    """The base model with ``W + s B A`` written into its weights by hand (no peft in the path)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for (i, t), m in adapter.modules.items():
            w = model.get_submodule(spec.module_key(i, t)).weight
            delta = torch.tensor(m.delta(), dtype=torch.float32)
            w += delta.T if spec.fan_in_fan_out else delta
        return model(torch.tensor(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("family,targets,rslora", [("gpt2", ["qkv", "o", "fc", "proj"], False),
                                                   ("llama", ["q", "v", "down"], True)])
def test_peft_files_load_in_peft_and_mean_the_same_adapter(gpt2, llama, tmp_path, family, targets, rslora):
    base, spec = gpt2 if family == "gpt2" else llama
    odd = {(1, targets[0]): (2, 5.0), (0, targets[-1]): (4, 3.0)}  # a rank and an alpha off the common ones
    adapter = _random_adapter(spec, targets, 4, 8.0, seed=3, rslora=rslora, odd=odd)
    files = peft_files(adapter, spec, base_model="tiny-base")
    assert set(files) == {CONFIG_FILE, WEIGHTS_FILE}
    folder = _write(files, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert_matches_peft(adapter, model, spec)
    ids = np.arange(12) * 5 % 64
    with torch.no_grad():
        got = model(torch.tensor(ids)[None]).logits[0].numpy()
        plain = base(torch.tensor(ids)[None]).logits[0].numpy()
    expected = _merged_logits(base, spec, adapter, ids)
    assert np.abs(expected - plain).max() > 0.05  # the adapter changes the logits ...
    np.testing.assert_allclose(got, expected, atol=1e-4)  # ... and peft's forward agrees with the merged weights
    # and Orion reads its own files back to the same adapter
    again = parse_peft(json.loads(files[CONFIG_FILE]), safetensors_numpy.load_file(str(folder / WEIGHTS_FILE)), spec)
    assert again.rslora == rslora and again.base_model == "tiny-base" and set(again.modules) == set(adapter.modules)
    for key, m in adapter.modules.items():
        n = again.modules[key]
        np.testing.assert_array_equal(n.a, m.a)
        np.testing.assert_array_equal(n.b, m.b)
        assert (n.alpha, n.rank) == (m.alpha, m.rank) and n.scale == pytest.approx(m.scale)


def test_peft_files_refuses_an_empty_adapter(llama):
    with pytest.raises(AdapterError, match="no modules"):
        peft_files(Adapter("llama", {}), llama[1])


# -- parse_targets and new_adapter -----------------------------------------------------------------------------------


def test_parse_targets_expands_aliases_in_declaration_order():
    from orion.models.gpt2 import GPT2Config
    from orion.models.gpt2 import adapter_spec as gpt2_spec
    from orion.models.llama import PRESETS
    from orion.models.llama import adapter_spec as llama_spec

    ll = llama_spec(PRESETS["tiny"])
    assert ll.default_targets == ("q", "v")
    assert ll.parse_targets("v,q") == ("q", "v")
    assert ll.parse_targets(" q , v ,") == ("q", "v")
    assert ll.parse_targets(["down", "q"]) == ("q", "down")
    assert ll.parse_targets("ffn") == ("gate", "up", "down") == ll.parse_targets("mlp")
    assert ll.parse_targets("attn,up") == ("q", "k", "v", "o", "up")
    assert ll.parse_targets("all") == ("q", "k", "v", "o", "gate", "up", "down")
    gp = gpt2_spec(GPT2Config(64, 32, 32, 2, 4))
    assert gp.parse_targets("ffn") == ("fc", "proj") and gp.parse_targets("attn") == ("qkv", "o")
    assert gp.parse_targets("all") == ("qkv", "o", "fc", "proj")


@pytest.mark.parametrize("text,fragments", [
    ("", ["no LoRA targets given", "choose from q, k, v, o, gate, up, down", "ffn", "all"]),
    (" , ", ["no LoRA targets given"]),
    ("q,lm_head", ["unknown LoRA target 'lm_head' for llama", "choose from q, k, v, o, gate, up, down"]),
    ("Q", ["unknown LoRA target 'Q'"]),
])
def test_parse_targets_refuses_unknown_names(text, fragments):
    from orion.models.llama import PRESETS
    from orion.models.llama import adapter_spec as llama_spec

    with pytest.raises(AdapterError) as info:
        llama_spec(PRESETS["tiny"]).parse_targets(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_new_adapter_starts_as_peft_does(llama):
    _, spec = llama
    adapter = new_adapter(spec, "q,down", rank=8, alpha=16, seed=5)
    assert set(adapter.modules) == {(i, t) for i in range(2) for t in ("q", "down")}
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))  # kaiming_uniform_(a=sqrt(5)), as peft does
    for (_, t), m in adapter.modules.items():
        fan_in, fan_out = spec.features[t]
        bound = gain * math.sqrt(3.0 / fan_in)
        assert m.a.shape == (8, fan_in) and m.b.shape == (fan_out, 8)
        assert m.a.dtype == np.float32 and m.b.dtype == np.float32
        assert not m.b.any()  # B = 0: the adapted model starts equal to its base
        assert np.abs(m.a).max() <= bound and np.abs(m.a).max() > 0.9 * bound
        assert abs(m.a.mean()) < 0.1 * bound and m.a.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)
        assert m.scale == 2.0 and m.alpha == 16 and not np.abs(m.delta()).any()
    assert not np.array_equal(adapter.modules[(0, "q")].a, adapter.modules[(1, "q")].a)
    again = new_adapter(spec, "q,down", rank=8, alpha=16, seed=5)
    assert all(np.array_equal(again.modules[k].a, m.a) for k, m in adapter.modules.items())


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets="q", rank=0, alpha=8), "rank must be at least 1, got 0"),
    (dict(targets="q", rank=4, alpha=0), "alpha must be positive, got 0"),
    (dict(targets="nope", rank=4, alpha=8), "unknown LoRA target 'nope'"),
])
def test_new_adapter_refuses_bad_settings(llama, kwargs, message):
    with pytest.raises(AdapterError, match=re.escape(message)):
        new_adapter(llama[1], **kwargs)


def test_parse_peft_reads_adapters_of_the_bare_model(saved, gpt2):
    """peft on GPT2Model (no LM head) names tensors ``h.0...`` instead of ``transformer.h.0...``: the same adapter."""
    config, tensors = saved
    bare = {k.replace("base_model.model.transformer.", "base_model.model."): v for k, v in tensors.items()}
    assert bare.keys() != tensors.keys()
    ours, theirs = parse_peft(config, bare, gpt2[1]), parse_peft(config, tensors, gpt2[1])
    assert ours.modules.keys() == theirs.modules.keys()
    for key, m in theirs.modules.items():
        np.testing.assert_array_equal(ours.modules[key].a, m.a)
        np.testing.assert_array_equal(ours.modules[key].b, m.b)
