"""GPT-2 on the emulator against Hugging Face transformers' GPT2LMHeadModel (PyTorch, CPU) on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.compiler.targets import get_target
from orion.errors import BindingError, OrionError
from orion.lora import LoraLayout
from orion.mil.parse import parse_program
from orion.models.bench import randomize_biases_and_norms
from orion.models.gpt2 import GPT2, GPT2Config, blocks_per_program, decode_graph, gpt2_weights, prefill_graph
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from tests.conftest import assert_ane_head_is_the_cpu_head

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 211


@pytest.fixture(scope="module")
def reference():
    """A small random GPT-2 (3 blocks, d 64) with weights scaled up so its logits are not near ties, and random
    biases and norms: a bias or a norm's gain or offset dropped or put in another's place changes the logits."""
    torch.manual_seed(0)
    return random_hf_gpt2(transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
                                                  bos_token_id=0, eos_token_id=0))


def random_hf_gpt2(config):
    """transformers' GPT-2 of ``config`` (torch's seed as set), its matrices scaled by 4 and random biases and norms;
    with its config and a numpy copy of its weights."""
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.mul_(4.0)
    randomize_biases_and_norms(model)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, config, state


@pytest.fixture(scope="module")
def orion_model(reference):
    _, config, state = reference
    model = GPT2(GPT2Config.from_hf(config.to_dict()), state, backend="emulator", cache=ProgramCache(None),
                 budget=CompileBudget(100))
    yield model
    model.close()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


def test_logits_match_transformers(reference, orion_model):
    ids = np.random.default_rng(1).integers(0, VOCAB, 100)
    got, ref = orion_model.logits(ids), torch_logits(reference[0], ids)
    assert got.shape == (100, VOCAB) and got.dtype == np.float32
    err = np.abs(got - ref).max()
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    scale = np.abs(ref).max()
    assert err < 0.02 * scale, (err, scale)
    assert top1 >= 0.97, top1


def test_the_classifier_on_the_ane_gives_the_cpu_classifiers_logits():
    """head="ane" with an axis limit of 256: a 600-entry vocabulary splits into 3 chunks of 256 rows (the last
    padded), the final LayerNorm (random gain and offset) runs in the same program; its logits are the CPU head's
    and transformers', for prompt rows and decode steps, and it adds one dispatch per token."""
    torch.manual_seed(3)
    vocab = 600
    model, config, state = random_hf_gpt2(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab,
                                                                   n_positions=64))
    target = get_target("default").with_overrides(max_axis=256, name="narrow")
    with GPT2(GPT2Config.from_hf(config.to_dict()), state, backend="emulator", target=target,
              cache=ProgramCache(None), budget=CompileBudget(100), head="ane") as ane:
        assert len(ane._head_graphs()) == 1 and len(ane._head_graphs()[0].outputs) == 3
        assert_ane_head_is_the_cpu_head(ane, config.n_embd, vocab)
        ids = np.random.default_rng(7).integers(0, vocab, 24)
        session, first = ane.start(ids[:16], 8)
        rows = np.stack([first] + [session.step(int(t)) for t in ids[16:23]])
        ref = torch_logits(model, ids)[15:23]
        assert np.abs(rows - ref).max() < 0.02 * np.abs(ref).max()
        assert (rows.argmax(-1) == ref.argmax(-1)).mean() >= 0.85
        assert session.dispatches == len(session.programs) + 1
        assert len(ane.step_graphs("decode", 64)) == session.dispatches
        assert ane.host_bytes("decode") == 0


def test_decode_steps_with_the_kv_cache_match_full_sequence_logits(reference, orion_model):
    """Teacher forcing through the decode programs: each step's logits equal the reference at that position, whether
    tokens go one per pass or several per pass (the verify pass of speculative decoding), and after positions fed
    with wrong tokens are rolled back."""
    ids = np.random.default_rng(2).integers(0, VOCAB, 48)
    ref = torch_logits(reference[0], ids)
    prompt = 20
    session, first = orion_model.start(ids[:prompt], ids.size - prompt)
    assert session.length == prompt and session.columns == 32 and session.end == ids.size
    steps = [first[None]] + [session.step(int(ids[p]))[None] for p in range(prompt, 30)]
    wrong = (ids[30:35] + 1) % VOCAB  # fed, kept, then rolled back: the later logits must not see them
    session.feed(wrong)
    session.commit(5)
    session.rollback(30)
    for start in range(30, ids.size - 1, 7):
        chunk = ids[start:min(start + 7, ids.size - 1)]
        steps.append(session.feed(chunk))
        session.commit(chunk.size)
    got = np.concatenate(steps)
    expected = ref[prompt - 1:-1]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.96
    with pytest.raises(BindingError, match="1 to 32 tokens"):
        session.feed(ids[:33])
    with pytest.raises(BindingError, match="pass the session's end"):
        session.feed(ids[:3])


def test_greedy_generation_equals_transformers_until_a_near_tie(reference, orion_model):
    model = reference[0]
    prompt = np.random.default_rng(3).integers(1, VOCAB, 12)
    new = 40
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt)[None], max_new_tokens=new, do_sample=False, min_new_tokens=new,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    ref_tokens = out.sequences[0, prompt.size:].tolist()
    gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
    got = list(orion_model.generate_ids(prompt, max_tokens=new))
    agree = next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), len(ref_tokens))
    near_tie = next((i for i, g in enumerate(gaps) if g < 0.05 * max(1.0, abs(out.scores[i][0]).max().item())),
                    len(gaps))
    assert agree >= min(near_tie, len(ref_tokens)), (agree, near_tie, got, ref_tokens)
    assert agree >= 10  # the test means something only if a good stretch is compared
    stats = orion_model.stats
    assert stats.prompt_tokens == prompt.size and stats.new_tokens == new
    assert stats.dispatches_per_token == -(-3 // orion_model.group)
    assert len(orion_model.step_graphs("decode", 64)) == stats.dispatches_per_token  # the cost model's view of a step


def test_blocks_per_program_follow_the_weight_tensor_limit(reference):
    """A block takes 8 weight tensors and a program's scalars 8 more (ANE-21): under 16 one block per program, and
    every group the rule picks compiles within its limit, prefill and decode."""
    default = get_target("default")
    assert blocks_per_program(default, 12) == 1
    assert blocks_per_program(default.with_overrides(max_blob_constants=None), 12) == 12
    assert blocks_per_program(default.with_overrides(max_blob_constants=4), 12) == 1
    _, config, state = reference
    cfg = GPT2Config.from_hf(config.to_dict())
    _, blocks, _ = gpt2_weights(state, cfg)
    for limit, group in ((16, 1), (23, 1), (24, 2), (40, 3)):
        target = default.with_overrides(max_blob_constants=limit)
        assert blocks_per_program(target, cfg.n_layer) == group, limit
        for graph in (prefill_graph(blocks[:group], 0, cfg, 32), decode_graph(blocks[:group], 0, cfg, 32,
                                                                              target=target)):
            assert compile_graph(graph, target).errors == [], (limit, graph.name)


def test_greedy_tokens_are_the_same_under_every_profile(reference, orion_model):
    """default, m1 (fp16-only I/O, MIL 1.0) and m4 (fp32 I/O) give the same greedy tokens; m1's programs cross no
    fp32 tensor while m4's decode programs use the fp32 form; with no weight-tensor limit all 3 blocks share one
    program and still agree."""
    _, config, state = reference
    prompt = np.random.default_rng(5).integers(1, VOCAB, 12)
    expected = list(orion_model.generate_ids(prompt, max_tokens=10))
    unlimited = get_target("m4").with_overrides(max_blob_constants=None, name="m4-unlimited")
    io = {}
    for target in ("m1", "m4", unlimited):
        model = GPT2(GPT2Config.from_hf(config.to_dict()), state, backend="emulator", target=target,
                     cache=ProgramCache(None), budget=CompileBudget(100))
        with model:
            assert list(model.generate_ids(prompt, max_tokens=10)) == expected, model.target.name
            programs = [p for ps in model._programs.values() for p in ps]
            assert len(programs) == 2 * -(-config.n_layer // model.group)
            io[model.target.name] = {(kind, dtype) for (kind, _), ps in model._programs.items() for p in ps
                                     for dtype in mil_io_dtypes(p.module.text)}
    assert io["m1"] == {("prefill", "fp16"), ("decode", "fp16")}
    assert io["m4"] == io["m4-unlimited"] == {("prefill", "fp16"), ("decode", "fp16"), ("decode", "fp32")}


def test_adapted_programs_follow_the_profile_too(reference):
    """With every projection adapted (A, B and the folded-bias inputs), the m1 programs still cross only fp16 and
    stay within the weight-tensor limit; m4's decode keeps its fp32 per-token tensors."""
    _, config, state = reference
    cfg = GPT2Config.from_hf(config.to_dict())
    _, blocks, _ = gpt2_weights(state, cfg)
    lora = LoraLayout(("fc", "o", "proj", "qkv"), 32)
    for name, decode_dtypes in (("m1", {"fp16"}), ("m4", {"fp16", "fp32"})):
        target = get_target(name)
        prefill = compile_graph(prefill_graph(blocks[:1], 0, cfg, 32, lora), target)
        decode = compile_graph(decode_graph(blocks[:1], 0, cfg, 64, lora, target=target), target)
        assert prefill.errors == decode.errors == [], name
        assert any("lora" in n for n, _ in decode.module.program.inputs)
        assert mil_io_dtypes(prefill.module.text) == {"fp16"}
        assert mil_io_dtypes(decode.module.text) == decode_dtypes, name


def mil_io_dtypes(text: str) -> set[str]:
    """The dtypes of a MIL program's inputs and outputs, read from its text."""
    program = parse_program(text)
    return {t.dtype for _, t in program.inputs} | {t.dtype for _, t in program.output_types()}


def test_bad_input_is_refused_with_a_clear_error(reference, orion_model):
    _, config, state = reference
    with pytest.raises(BindingError, match="empty"):
        orion_model.logits([])
    with pytest.raises(BindingError, match="context of 128"):
        orion_model.logits(np.zeros(129, dtype=int))
    with pytest.raises(BindingError, match="token ids"):
        orion_model.logits([VOCAB])
    with pytest.raises(OrionError, match="model_type 'bert'"):
        GPT2Config.from_hf({**config.to_dict(), "model_type": "bert"})
    broken = dict(state)
    del broken["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(OrionError, match="h.1.mlp.c_fc.weight is missing"):
        GPT2(GPT2Config.from_hf(config.to_dict()), broken, backend="emulator")
    bad = dict(state)
    bad["transformer.wte.weight"] = bad["transformer.wte.weight"][:, :10]
    with pytest.raises(OrionError, match="wte.weight has shape"):
        GPT2(GPT2Config.from_hf(config.to_dict()), bad, backend="emulator")


def test_generation_runs_one_decode_step_per_token_after_the_first(orion_model):
    """The first token comes from the prefill; each later one costs one decode step, and none is run past the last."""
    prompt = np.random.default_rng(4).integers(1, VOCAB, 10)
    tokens = list(orion_model.generate_ids(prompt, max_tokens=5))
    assert len(tokens) == 5
    assert orion_model.stats.new_tokens == 5 and orion_model.stats.decode_steps == 4


@pytest.mark.parametrize("layers, d, vocab", [
    (2, 128, 5000),  # GPT-2's layout at a small size: the default run
    pytest.param(12, 768, 50257, marks=pytest.mark.slow),  # GPT-2 124M (a minute: it quantizes 85M weights twice)
])
def test_int8_gpt2_with_the_ane_classifier_is_predicted_as_counted_by_hand(layers, d, vocab):
    """The cost model on the programs GPT-2 builds for m4 (int8 blocks, the classifier on the ANE), against a count
    by hand from the reference's figures: per block program (one per program under m4's 16 weight tensors), four
    int8 matrices (a byte per weight, an fp16 scale per output channel; one int8 zero point, shared once the
    compiler merges equal constants) and their fp16 biases, and the [16, 16] fp16 identity that places new keys and
    values into the cache; the classifier program, the vocabulary padded to 64 rows in fp16 and the final LayerNorm's
    gain and offset. Surfaces (64-byte rows, at least 49,152 bytes): x, y, the new k and v as [d, 16] fp32, the mask
    and the slots as [16, 256] fp16, the k and v caches of 256 positions in fp16, the logits [rows, 16] fp32.
    Each program costs 90 us plus its bytes over 67 GB/s (decode is memory-bound: checked); the CPU reads nothing."""
    from orion.compiler.costmodel import get_chip
    from orion.models.bench import random_gpt2_state
    from orion.models.lm import predict

    chip = get_chip("m4")
    f, columns, capacity = 4 * d, 16, 256

    def surface(nbytes: int) -> int:
        return max(49152, -(-nbytes // 64) * 64)

    config, state = random_gpt2_state(layers, d, vocab, n_positions=256)
    with GPT2(GPT2Config.from_hf(config), state, backend="emulator", target="m4", quantize="int8",
              head="ane") as model:
        figures = predict(model, chip, prompt_tokens=128, new_tokens=64)
    decode = figures["decode"]
    block_weights = 1 + sum(out * inp + 2 * out + 2 * out for out, inp in ((3 * d, d), (d, d), (f, d), (d, f)))
    block_weights += columns * columns * 2
    block_io = 4 * surface(columns * d * 4) + 2 * surface(columns * capacity * 2) + 2 * surface(capacity * d * 2)
    rows = -(-vocab // 64) * 64
    head_weights, head_io = rows * d * 2 + 2 * d * 2, surface(columns * d * 4) + surface(rows * columns * 4)
    counted = [(block_weights, block_io)] * layers + [(head_weights, head_io)]
    assert decode.dispatches == len(counted) == layers + 1
    seconds = 0.0
    for cost, (weights, io) in zip(decode.programs, counted):
        assert (cost.weight_bytes, cost.io_bytes) == (weights, io)
        memory = (weights + io) / (chip.ane_gbps.value * 1e9)
        assert cost.seconds(chip)[2] < memory  # the roofline takes memory
        seconds += chip.dispatch_us.value * 1e-6 + memory
    assert decode.host_bytes == 0
    assert decode.tok_s == pytest.approx(1 / seconds, rel=1e-9)
