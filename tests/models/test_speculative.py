"""Exact speculative decoding: the target's tokens, greedy or sampled, whatever the draft proposes."""

from __future__ import annotations

import numpy as np
import pytest

from orion.errors import BindingError
from orion.models import model_backend
from orion.models.bench import random_gpt2_state
from orion.models.gpt2 import GPT2, GPT2Config
from orion.models.sampling import Sampler
from orion.models.speculative import accept_or_resample, speculative_ids
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache

VOCAB = 97


def random_gpt2(seed: int, layers: int = 2, d: int = 64, vocab: int = VOCAB, weight_scale: float = 20.0) -> GPT2:
    """A random GPT-2 (random biases and norms) whose matrices are scaled up so its logits are far apart: greedy
    tokens are then no near-ties (exactness at near-ties is tests/models/test_exact_verify.py's)."""
    config, state = random_gpt2_state(n_layer=layers, n_embd=d, vocab_size=vocab, n_positions=128, seed=seed)
    for value in state.values():
        if value.ndim == 2:
            value *= weight_scale
    return GPT2(GPT2Config.from_hf(config), state, backend=model_backend("emulator"), cache=ProgramCache(None),
                budget=CompileBudget(100))


@pytest.fixture(scope="module")
def models():
    """The target; a differently seeded one-block draft (it disagrees almost always); the target's own weights
    loaded a second time (it agrees always)."""
    built = {"target": random_gpt2(0), "other": random_gpt2(1, layers=1), "same": random_gpt2(0)}
    yield built
    for model in built.values():
        model.close()


NEW = 24
PROMPTS = [np.random.default_rng(seed).integers(0, VOCAB, n) for seed, n in ((0, 9), (1, 3), (2, 17))]


@pytest.mark.parametrize("draft_name,draft_tokens", [("other", 3), ("same", 4), ("same", 31)])
def test_greedy_tokens_are_the_targets_whatever_the_draft(models, draft_name, draft_tokens):
    target, draft = models["target"], models[draft_name]
    drafted = accepted = 0
    for prompt in PROMPTS:
        alone = list(target.generate_ids(prompt, max_tokens=NEW))
        assert len(alone) == NEW
        assert list(speculative_ids(target, draft, prompt, NEW, draft_tokens=draft_tokens)) == alone
        stats = target.stats
        assert stats.new_tokens == NEW and stats.prompt_tokens == prompt.size
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    if draft_name == "same":  # every drafted token kept: a pass yields draft_tokens + 1 tokens
        assert accepted == drafted > 0
        assert stats.decode_steps == -(-(NEW - 1) // (draft_tokens + 1))
    else:  # a draft that disagrees costs passes, never tokens
        assert accepted < 0.5 * drafted


def test_stop_tokens_and_the_context_end_stop_a_speculative_run_where_the_target_stops(models):
    target, same = models["target"], models["same"]
    prompt = PROMPTS[0]
    alone = list(target.generate_ids(prompt, max_tokens=30))
    stop = alone[7]
    expected = alone[:alone.index(stop) + 1]
    assert list(speculative_ids(target, same, prompt, 30, stop_ids=(stop,), draft_tokens=5)) == expected
    long_prompt = np.random.default_rng(5).integers(0, VOCAB, 120)  # context 128: 8 more positions at most
    alone = list(target.generate_ids(long_prompt, max_tokens=20))
    assert list(speculative_ids(target, same, long_prompt, 20, draft_tokens=6)) == alone and len(alone) == 9


def test_bad_drafts_are_refused(models):
    with pytest.raises(BindingError, match="another model object"):
        list(speculative_ids(models["target"], models["target"], PROMPTS[0], 5))
    with pytest.raises(BindingError, match="draft_tokens"):
        list(speculative_ids(models["target"], models["same"], PROMPTS[0], 5, draft_tokens=0))
    small = random_gpt2(3, layers=1, vocab=50)
    with pytest.raises(BindingError, match="vocabulary"):
        list(speculative_ids(models["target"], small, PROMPTS[0][:3] % 50, 5))
    small.close()


# -- the rejection rule's distribution ---------------------------------------------------------------------------


class GridSampler:
    """Stands in for the sampler so that one round can be integrated exactly: ``uniform`` returns the value it is
    set to, ``draw`` records the (normalised) distribution it was asked to draw from instead of drawing."""

    def __init__(self, u: float):
        self.u = u

    def uniform(self) -> float:
        return self.u

    def draw(self, p):
        return np.asarray(p, dtype=np.float64) / np.sum(p)


def first_token_distribution(p_rows, q_rows, grid: int = 2000) -> np.ndarray:
    """The exact distribution of the first token a round emits, over every drafted sequence (probability q) and a
    midpoint grid of the uniform draws (each acceptance test is then exact to 1/grid)."""
    k, vocab = len(q_rows), len(p_rows[0])
    out = np.zeros(vocab)
    for first in range(vocab):
        rest = [0] * (k - 1)  # later drafted tokens only matter after the first is kept, which emits ``first``
        weight = q_rows[0][first]
        if weight == 0:
            continue
        for u in (np.arange(grid) + 0.5) / grid:
            kept, following = accept_or_resample(p_rows, q_rows, [first, *rest], GridSampler(u))
            if kept >= 1:
                out[first] += weight / grid
            else:
                out += weight / grid * following
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_the_first_emitted_token_is_distributed_as_the_target(k):
    rng = np.random.default_rng(7)
    vocab = 6
    p_rows = rng.dirichlet(np.ones(vocab) * 0.7, size=k + 1)
    q_rows = rng.dirichlet(np.ones(vocab) * 0.7, size=k)
    q_rows[0][2] = 0.0  # a token the draft never proposes must still come out as often as the target draws it
    q_rows[0] /= q_rows[0].sum()
    got = first_token_distribution(p_rows, q_rows)
    assert np.abs(got - p_rows[0]).sum() < 2e-3  # total variation x 2, against the grid's 1/2000 resolution
    assert np.abs(q_rows[0] - p_rows[0]).sum() > 0.3  # the draft alone would be far off


SEEDS = 300


def test_sampled_generation_with_a_draft_follows_the_targets_distribution():
    """End to end on models with 8 tokens, 300 seeds: the second new token (the first the rule decides) against
    the target's exact distribution given the first, by a chi-square statistic over the 8 x 8 pairs. The draft's
    distributions are far from the target's: a rule that accepted with q/p, or resampled from p, would be off by a
    chi-square of several hundred here."""
    target = random_gpt2(10, layers=1, d=32, vocab=8, weight_scale=8.0)  # peaked, but not one-hot
    draft = random_gpt2(13, layers=1, d=32, vocab=8, weight_scale=3.0)  # flatter and elsewhere: p and q far apart
    prompt = np.array([1, 5, 2])
    try:
        sampler = Sampler(temperature=1.0)
        first = sampler.probabilities(target.logits(prompt)[-1])
        exact = np.array([first[a] * sampler.probabilities(target.logits(np.append(prompt, a))[-1])
                          for a in range(8)])  # [first, second]
        counts = np.zeros((8, 8))
        for seed in range(SEEDS):
            a, b = list(speculative_ids(target, draft, prompt, 2 + 1, Sampler(temperature=1.0, seed=seed),
                                        draft_tokens=1))[:2]
            counts[a, b] += 1
    finally:
        target.close()
        draft.close()
    expected = exact * counts.sum()
    keep = expected > 5  # the chi-square approximation's usual condition; the rest pooled into one cell
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum() + \
        (counts[~keep].sum() - expected[~keep].sum()) ** 2 / max(expected[~keep].sum(), 1e-9)
    dof = keep.sum()
    assert chi2 < dof + 4 * np.sqrt(2 * dof), (chi2, dof)  # about 4 standard deviations of the statistic
