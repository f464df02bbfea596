"""A Llama-family model in the decode machinery GPT-2 has too: exact speculative decoding with a Llama target and a
Llama draft, and the cost model's view of its programs (counted by hand). Random weights in numpy (no reference
needed: the target alone is the reference of speculative decoding, and the cost model charges sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from orion.models import model_backend
from orion.models.bench import random_llama
from orion.models.llama import Llama
from orion.models.lm import predict
from orion.models.speculative import speculative_ids
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache

VOCAB = 97
#: Qwen2's layout (q/k/v biases) with grouped-query attention: 4 query heads over 2 k/v heads of 16.
SETTINGS = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=True, max_position_embeddings=128)


def random_model(seed: int, layers: int = 3, head: str = "cpu", target: str = "default") -> Llama:
    """Matrices scaled up so the logits are far apart: greedy tokens are then no near-ties
    (exactness at near-ties is tests/models/test_exact_verify.py's)."""
    config, weights = random_llama({**SETTINGS, "num_hidden_layers": layers}, seed=seed, weight_scale=10.0)
    return Llama(config, weights, backend=model_backend("emulator"), target=target, cache=ProgramCache(None),
                 budget=CompileBudget(100), head=head)


@pytest.fixture(scope="module")
def models():
    """The target (classifier on the CPU, and on the ANE); a differently seeded one-block draft (it disagrees
    almost always); the target's own weights loaded a second time (it agrees always)."""
    built = {"target": random_model(0), "target_ane": random_model(0, head="ane"), "other": random_model(1, layers=1),
             "same": random_model(0)}
    yield built
    for model in built.values():
        model.close()


NEW = 20
PROMPTS = [np.random.default_rng(seed).integers(0, VOCAB, n) for seed, n in ((0, 9), (1, 3))]


@pytest.mark.parametrize("target_name,draft_name,draft_tokens", [
    ("target", "other", 3), ("target", "same", 4), ("target_ane", "same", 5), ("target_ane", "other", 2)])
def test_greedy_tokens_of_a_llama_target_are_its_own_whatever_the_llama_draft(models, target_name, draft_name,
                                                                            draft_tokens):
    target, draft = models[target_name], models[draft_name]
    drafted = accepted = 0
    for prompt in PROMPTS:
        alone = list(target.generate_ids(prompt, max_tokens=NEW))
        assert len(alone) == NEW and len(set(alone)) > 3  # a run that says something
        assert list(speculative_ids(target, draft, prompt, NEW, draft_tokens=draft_tokens)) == alone
        stats = target.stats
        assert stats.new_tokens == NEW and stats.dispatches_per_token == 2 + (target.head == "ane")
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    if draft_name == "same":  # every drafted token kept: a pass yields draft_tokens + 1 tokens
        assert accepted == drafted > 0
        assert stats.decode_steps == -(-(NEW - 1) // (draft_tokens + 1))
    else:
        assert accepted < 0.5 * drafted


# -- the cost model ------------------------------------------------------------------------------------------------

D, F, KV = 64, 96, 2 * 16
#: fp16 weights of one block as the inference programs bake them: q/k/v fused (and its bias), o, gate and up fused,
#: down.
BLOCK_BYTES = 2 * ((D + 2 * KV) * D + (D + 2 * KV) + D * D + 2 * F * D + D * F)


@pytest.mark.parametrize("head", ["cpu", "ane"])
def test_the_cost_model_counts_a_llamas_programs_and_weights(head):
    """On m4 (16 weight tensors per program, 4 of them the programs' scalars) a block's 5 weight tensors let a
    program hold 2 blocks: the 3 blocks are 2 programs; a decode program also holds the [16, 16] fp16 identity that
    places new keys and values into the cache. The classifier is the CPU's 97 x 64 float32 rows, or, on the ANE, one
    more program of 97 rows padded to 128 in fp16."""
    with random_model(0, head=head, target="m4") as model:
        figures = predict(model, "m4", prompt_tokens=20, new_tokens=8)
    classifier = 2 * 128 * D if head == "ane" else 0
    for phase in ("decode", "prefill"):
        step = figures[phase]
        assert step.dispatches == 2 + (head == "ane")
        identity = 2 * 16 * 16 * 2 if phase == "decode" else 0
        assert step.weight_mb == pytest.approx((3 * BLOCK_BYTES + identity + classifier) / 1e6)
        assert step.host_bytes == (VOCAB * D * 4 if head == "cpu" else 0)
    assert figures["decode"].tok_s > 0 and figures["prefill"].tok_s > figures["decode"].tok_s


def test_bench_llama_predict_prints_the_cost_model_for_a_preset(tmp_path):
    """The tiny preset (2 blocks of d 64, a 512-entry tied classifier): one block program, plus one classifier
    program with --head ane."""
    report = tmp_path / "predict.json"
    args = ["bench", "llama", "--predict", "m4", "--preset", "tiny", "--prompt-tokens", "20", "--new-tokens", "8",
            "--json", str(report)]
    cpu = CliRunner().invoke(cli, args)
    assert cpu.exit_code == 0, cpu.output
    assert "ANE cost model: random tiny on" in cpu.stdout
    cpu_figures = json.loads(report.read_text())
    ane = CliRunner().invoke(cli, [*args, "--head", "ane"])
    assert ane.exit_code == 0, ane.output
    ane_figures = json.loads(report.read_text())
    assert cpu_figures["target"] == "m4" and cpu_figures["decode"]["dispatches"] == 1
    assert ane_figures["decode"]["dispatches"] == 2
    assert ane_figures["decode"]["weight_mb"] - cpu_figures["decode"]["weight_mb"] == pytest.approx(2 * 512 * 64 / 1e6)
    int4 = CliRunner().invoke(cli, [*args, "--quantize", "int4/32"])
    assert int4.exit_code == 0, int4.output
    int4_figures = json.loads(report.read_text())
    assert int4_figures["weights"] == "int4/32"
    assert int4_figures["decode"]["weight_mb"] < cpu_figures["decode"]["weight_mb"] / 2
    measured_without_json = CliRunner().invoke(cli, ["bench", "llama", "--preset", "tiny"])
    assert measured_without_json.exit_code == 2 and "--json" in measured_without_json.stderr
