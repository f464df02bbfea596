"""A verification pass (several tokens in one evaluation of the decode programs) gives, bit for bit, the logits the
one-token passes give: what makes speculative decoding token-identical to the target alone, also at near-ties.

GPT-2 and the Llama families (GQA, Qwen2's biases, Qwen3's q/k norms), random weights with non-zero biases and norm
gains, on the emulator with the ``fp32`` accumulator the models run under, and a tiny config under the reference's
``fixed-point`` one. The reference is the target alone, token by token; rows are compared with ``np.array_equal``."""

from __future__ import annotations

import numpy as np
import pytest

from orion.models import model_backend
from orion.models.bench import random_gpt2_state, random_llama
from orion.models.gpt2 import GPT2, GPT2Config
from orion.models.llama import Llama
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache

VOCAB = 97
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
             rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=128)
FAMILIES = {
    "llama-gqa": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2-biases": dict(model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=True),
    "qwen3-qk-norms": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}
NEW = 24  # every session of a test has room for as many tokens: one capacity, the same programs


def gpt2(accumulator: str | None = "fp32", layers: int = 2, d: int = 128) -> GPT2:
    config, state = random_gpt2_state(n_layer=layers, n_embd=d, vocab_size=VOCAB, n_positions=128, seed=3)
    return GPT2(GPT2Config.from_hf(config), state, backend=model_backend("emulator", accumulator=accumulator),
                cache=ProgramCache(None), budget=CompileBudget(100))


def llama(family: str, accumulator: str | None = "fp32") -> Llama:
    config, weights = random_llama({**LLAMA, **FAMILIES[family]}, seed=4)
    return Llama(config, weights, backend=model_backend("emulator", accumulator=accumulator),
                 cache=ProgramCache(None), budget=CompileBudget(100))


def greedy_steps(model, prompt, k: int) -> tuple[list[int], np.ndarray]:
    """The target alone: k greedy tokens, one pass each, and the logits each pass gave ``[k, vocab]``."""
    session, logits = model.start(prompt, NEW)
    tokens, rows = [], []
    for _ in range(k):
        tokens.append(int(np.argmax(logits)))
        logits = session.step(tokens[-1])
        rows.append(logits)
    return tokens, np.stack(rows)


def assert_bit_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    differ = np.flatnonzero((got != want).any(axis=-1))
    assert differ.size == 0, (f"positions {differ.tolist()} differ, by up to "
                              f"{np.abs(got - want).max():.3g} of {np.abs(want).max():.3g}")


def check_verify_equals_steps(model, prompt, k: int) -> None:
    tokens, single = greedy_steps(model, prompt, k)
    session, _ = model.start(prompt, NEW)
    assert_bit_identical(session.feed(tokens), single)
    # a verification pass after a draft's rollback: the positions it forgets held other tokens' keys
    session, _ = model.start(prompt, NEW)
    for junk in (5, 17, 40):
        session.step(junk)
    session.rollback(prompt.size)
    assert_bit_identical(session.feed(tokens), single)
    # two accepted, the rest verified again from there; then one-token passes after a rollback
    session.commit(2)
    assert_bit_identical(session.feed(tokens[2:]), single[2:])
    session.commit(k - 2)
    session.rollback(prompt.size + 1)
    assert_bit_identical(np.stack([session.step(t) for t in tokens[1:]]), single[1:])


PROMPT = np.random.default_rng(0).integers(0, VOCAB, 9)


@pytest.mark.parametrize("k", [4, 8])
def test_gpt2_verification_pass_is_bit_identical_to_single_steps(k):
    with gpt2() as model:
        check_verify_equals_steps(model, PROMPT, k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_family_verification_pass_is_bit_identical_to_single_steps(family):
    with llama(family) as model:
        check_verify_equals_steps(model, PROMPT, 6)


@pytest.mark.parametrize("build", [lambda: gpt2(None, layers=1, d=64), lambda: llama("llama-gqa", None)],
                         ids=["gpt2", "llama-gqa"])
def test_verification_pass_is_bit_identical_under_the_fixed_point_accumulator(build):
    with build() as model:
        assert model.backend.numerics.accumulator == "fixed-point"
        check_verify_equals_steps(model, PROMPT[:5], 5)
