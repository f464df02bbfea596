"""Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3) on the emulator against transformers (PyTorch, CPU) on
the same weights: small random configs saved as Hugging Face folders and read back by ``orion.load``, each with the
settings its family is known for (grouped-query attention, Llama 3's rope_scaling, attention biases, q/k norms, a
head_dim other than d/heads, tied or separate embeddings, sharded or bf16 safetensors), with random non-zero biases
and norm gains (a dropped or misplaced one changes the logits). Criteria as GPT-2's (tests/models/test_gpt2.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import orion
from orion.compiler.compile import compile_graph
from orion.compiler.targets import get_target
from orion.errors import BindingError, OrionError
from orion.models.bench import randomize_biases_and_norms
from orion.models.llama import (
    Llama,
    LlamaConfig,
    blocks_per_inference_program,
    config_from_hf,
    from_hf,
    inference_blocks,
    inference_decode_graph,
    inference_prefill_graph,
)
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from tests.conftest import assert_ane_head_is_the_cpu_head
from tests.models.test_spill import same_value

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 211
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
FAMILIES = {
    # GQA (2 k/v heads), Llama 3's rope_scaling over a short original context (so it changes the frequencies),
    # attention_bias (q, k, v and o), separate classifier, sharded safetensors
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_theta=500000.0, attention_bias=True,
                                             tie_word_embeddings=False, rms_norm_eps=1e-5,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16}),
              dict(max_shard_size="100KB")),
    # one k/v head for 4 query heads, q/k/v biases, tied embeddings, bf16 weights
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True,
                                             rms_norm_eps=1e-6), dict(bf16=True)),
    # head_dim 32 with d 64 and 4 heads, q/k norms, GQA, tied
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                             rms_norm_eps=1e-6), {}),
    # GQA, a sliding window wider than the context, separate classifier
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=4096,
                                                 tie_word_embeddings=False), {}),
}


def make_reference(family: str, folder):
    """A random model of ``family`` saved in ``folder``; returns the float32 reference of what was saved."""
    config_cls, settings, save = FAMILIES[family]
    torch.manual_seed(list(FAMILIES).index(family))
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **settings)).eval()
    with torch.no_grad():  # larger weights: logits far from ties, so greedy tokens compare meaningfully
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    randomize_biases_and_norms(model, seed=3)
    if save.get("bf16"):
        model = model.to(torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        return model.float()
    model.save_pretrained(folder, safe_serialization=True, **save)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_reference(request.param, folder)
    model = orion.load(str(folder), backend="emulator", cache=ProgramCache(None), budget=CompileBudget(100))
    yield request.param, reference, model, folder
    model.close()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def test_the_folder_is_read_as_saved(family):
    name, _, model, folder = family
    assert isinstance(model, Llama)
    files = {p.name for p in folder.iterdir()}
    assert ("model.safetensors.index.json" in files) == (name == "llama")
    config = json.loads((folder / "config.json").read_text())
    assert model.config.n_kv_heads == config["num_key_value_heads"]
    assert model.config.head_dim == config.get("head_dim", 16)


def test_logits_match_transformers(family):
    _, reference, model, _ = family
    ids = np.random.default_rng(1).integers(0, VOCAB, 60)
    got, ref = model.logits(ids), torch_logits(reference, ids)
    assert got.shape == (60, VOCAB) and got.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.02 * scale, (np.abs(got - ref).max(), scale)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.97


def test_decode_steps_with_the_kv_cache_match_full_sequence_logits(family):
    """Teacher forcing through the decode programs: each step's logits equal the reference at that position."""
    _, reference, model, _ = family
    ids = np.random.default_rng(2).integers(0, VOCAB, 40)
    ref = torch_logits(reference, ids)
    prompt = 17
    session, first = model.start(ids[:prompt], ids.size - prompt)
    assert session.capacity == 64 and session.end == ids.size
    steps = np.stack([first] + [session.step(int(ids[p])) for p in range(prompt, ids.size - 1)])
    expected = ref[prompt - 1:-1]
    assert np.abs(steps - expected).max() < 0.02 * np.abs(expected).max()
    assert (steps.argmax(-1) == expected.argmax(-1)).mean() >= 0.96


def test_a_verification_pass_of_several_tokens_equals_single_steps(family):
    """A feed of several tokens (what speculative decoding verifies) gives the logits of one step per token, bit for
    bit; a rollback forgets the positions committed after it, and a feed not committed leaves the cache as it was."""
    _, _, model, _ = family
    ids = np.random.default_rng(4).integers(0, VOCAB, 30)
    session, _ = model.start(ids[:20], 44)
    single = np.stack([session.step(int(ids[p])) for p in range(20, 26)])
    session.rollback(20)
    first = session.feed(ids[20:23])
    session.commit(3)
    rest = session.feed(ids[23:26])
    session.commit(3)
    assert np.array_equal(np.concatenate([first, rest]), single)
    session.rollback(22)
    session.feed((ids[22:25] + 1) % VOCAB)  # verified, none accepted: nothing of it may stay
    session.commit(0)
    assert np.array_equal(session.feed(ids[22:24]), single[2:4])
    with pytest.raises(BindingError, match=f"1 to {session.columns} tokens"):
        session.feed([1] * (session.columns + 1))
    short, _ = model.start(ids[:20], 2)
    with pytest.raises(BindingError, match=r"pass the session's end \(22\)"):
        short.feed([1, 2, 3])


def test_greedy_generation_equals_transformers_until_a_near_tie(family):
    _, reference, model, _ = family
    prompt = np.random.default_rng(3).integers(1, VOCAB, 12)
    new = 30
    with torch.no_grad():
        out = reference.generate(torch.tensor(prompt)[None], max_new_tokens=new, do_sample=False,
                                 min_new_tokens=new, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
    ref_tokens = out.sequences[0, prompt.size:].tolist()
    gaps = [float(np.diff(np.sort(s[0].float().numpy())[-2:])[0]) for s in out.scores]
    got = list(model.generate_ids(prompt, max_tokens=new))
    agree = next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), len(ref_tokens))
    near_tie = next((i for i, g in enumerate(gaps) if g < 0.05 * max(1.0, abs(out.scores[i][0]).max().item())),
                    len(gaps))
    assert agree >= min(near_tie, len(ref_tokens)), (agree, near_tie, got, ref_tokens)
    assert agree >= 10
    assert model.stats.dispatches_per_token == -(-3 // model.group)


def test_every_group_compiles_within_the_weight_tensor_limit(family):
    """The blocks a program takes (constants per block + the program's scalars <= the limit, ANE-21) compile for the
    default profile, prefill and decode; a larger limit takes more blocks."""
    name, reference, model, _ = family
    default = get_target("default")
    blocks = model.blocks
    group = blocks_per_inference_program(default, blocks)
    assert group == model.group
    for graph in (inference_prefill_graph(blocks[:group], 0, model.config, 32),
                  inference_decode_graph(blocks[:group], 0, model.config, 32, target=default)):
        assert compile_graph(graph, default).errors == [], graph.name
    bigger = default.with_overrides(max_blob_constants=16 + blocks[0].constants)
    assert blocks_per_inference_program(bigger, blocks) == min(3, group + 1)
    assert compile_graph(inference_decode_graph(blocks[:group + 1], 0, model.config, 32, target=bigger),
                         bigger).errors == []


def test_the_classifier_on_the_ane_splits_the_vocabulary_within_the_axis_limit(family):
    """head="ane" with an axis limit of 128 (211 entries -> 2 chunks of 128 rows, the last padded) gives the CPU
    classifier's logits and adds its programs to the dispatches; the blocks' projections split to fit too (Qwen3's
    split block, with its 4 q/k norm gains, takes 17 weight tensors: more than 16)."""
    name, reference, model, folder = family
    target = get_target("default").with_overrides(max_axis=128, name="narrow",
                                                  max_blob_constants=20 if name == "qwen3" else 16)
    config, weights = from_hf(json.loads((folder / "config.json").read_text()),
                              {k: v.float().numpy() for k, v in reference.state_dict().items()})
    with Llama(config, weights, backend="emulator", target=target, cache=ProgramCache(None),
               budget=CompileBudget(100), head="ane") as ane:
        assert len(ane._head_graphs()) == 1 and len(ane._head_graphs()[0].outputs) == 2
        assert_ane_head_is_the_cpu_head(ane, config.dim, VOCAB)
        list(ane.generate_ids([1, 2, 3], max_tokens=3))
        assert ane.stats.dispatches_per_token == -(-3 // ane.group) + 1
        assert len(ane.step_graphs("decode", 64)) == ane.stats.dispatches_per_token


@pytest.mark.parametrize("change, field", [
    ({"model_type": "phi"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_a_config_orion_cannot_run_is_refused_naming_the_field(change, field, tmp_path):
    config = {"model_type": "llama", **COMMON, "num_key_value_heads": 2, **change}
    with pytest.raises(OrionError, match=field):
        config_from_hf(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OrionError, match=field):
        orion.load(str(tmp_path), backend="emulator")


def test_training_refuses_the_inference_only_settings():
    from orion.models.llama import forward_graph

    with pytest.raises(OrionError, match="n_kv_heads"):
        forward_graph(LlamaConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=96, vocab_size=64, max_seq_len=32,
                                  n_kv_heads=2), 32)


def test_a_missing_or_misshapen_weight_is_named(family):
    name, reference, _, folder = family
    config = json.loads((folder / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in reference.state_dict().items()}
    key = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(OrionError, match=key):
        from_hf(config, {k: v for k, v in state.items() if k != key})
    with pytest.raises(OrionError, match=f"{key} has shape"):
        from_hf(config, {**state, key: state[key][:-1]})
    inference_blocks(from_hf(config, state)[1], from_hf(config, state)[0], 16384)


def test_load_spills_the_blocks_and_they_come_back_bit_for_bit(family):
    """orion.load reads the checkpoint lazily and keeps the folded blocks in a temporary file: each block, the
    embeddings and the classifier come back exactly as from the whole file read at once (sharded, bf16, tied and
    separate classifiers among the families)."""
    from orion.models.hub import load_weights
    from orion.models.spill import SpilledList

    _, _, model, folder = family
    config, weights = from_hf(json.loads((folder / "config.json").read_text()), load_weights(folder))
    assert isinstance(weights, dict)
    kept = inference_blocks(weights, config, model.target.max_axis)
    assert isinstance(model.blocks, SpilledList) and len(model.blocks) == len(kept) == 3
    for got, want in zip(model.blocks, kept, strict=True):
        assert all(same_value(getattr(got, f), getattr(want, f)) for f in vars(want)), f
    assert all(same_value(model.blocks.field(i, "norms"), kept[i].norms) for i in range(3))
    assert isinstance(model.embeddings, np.memmap)  # looked up a row at a time: kept in a file, mapped
    assert same_value(np.asarray(model.embeddings), weights["tok_embeddings"])
    output = weights.get("output", weights["tok_embeddings"])
    assert same_value(model.head_w, np.float32(np.float64(output) * np.float64(weights["norm"])))


def test_load_reads_one_block_at_a_time(family, monkeypatch):
    """orion.load reads the tensors as the blocks fold: a block's tensors are gone before the next block's are read,
    so the file is never all in memory (a shard's tensors too)."""
    import re
    import weakref

    from orion.models.hub import SafetensorsFile

    _, _, _, folder = family
    alive: list[tuple[int, weakref.ref]] = []  # (block, tensor) of every tensor read
    blocks_read = set()
    read = SafetensorsFile.__getitem__

    def counted(self, name):
        found = re.search(r"layers\.(\d+)\.", name)
        i = int(found.group(1)) if found else -1
        if found:
            blocks_read.add(i)
            assert not [j for j, r in alive if 0 <= j < i and r() is not None], f"block {i} read before the last's went"
        array = read(self, name)
        alive.append((i, weakref.ref(array)))
        return array

    monkeypatch.setattr(SafetensorsFile, "__getitem__", counted)
    orion.load(str(folder), backend="emulator", cache=ProgramCache(None)).close()
    assert blocks_read == {0, 1, 2}


def test_a_lazy_read_refuses_a_misshapen_weight_when_it_is_read(family):
    _, reference, _, folder = family
    config = json.loads((folder / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in reference.state_dict().items()}
    key = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(OrionError, match=key):
        from_hf(config, {k: v for k, v in state.items() if k != key}, lazy=True)
    _, lazy = from_hf(config, {**state, key: state[key][:-1]}, lazy=True)
    assert same_value(lazy["layers.1.wq"], state["model.layers.1.self_attn.q_proj.weight"])
    with pytest.raises(OrionError, match=f"{key} has shape"):
        lazy["layers.1.wk"]
