"""Sampler against independent oracles: numpy's argmax, and transformers' temperature / top-k / top-p warpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from orion.errors import BindingError, SettingsError
from orion.models.sampling import Sampler

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")

finite_logits = arrays(np.float32, st.integers(1, 64), elements=st.floats(-30, 30, width=32))


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None):
    """What transformers' generate samples from: temperature, then top-k, then top-p, then softmax."""
    scores = torch.tensor(logits, dtype=torch.float64)[None, :]
    ids = torch.zeros((1, 1), dtype=torch.long)
    warpers = [logits_process.TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        warpers.append(logits_process.TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(logits_process.TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@given(finite_logits)
def test_greedy_is_argmax(logits):
    assert Sampler(temperature=0).sample(logits) == int(np.argmax(logits))


def test_greedy_takes_the_first_of_tied_maxima():
    assert Sampler(temperature=0).sample(np.array([1.0, 5.0, 2.0, 5.0, 5.0])) == 1


@settings(max_examples=50)
@given(finite_logits, st.floats(0.05, 5), st.integers(0, 2**32))
def test_top_k_1_and_tiny_top_p_are_greedy(logits, temperature, seed):
    if np.count_nonzero(logits == logits.max()) > 1:
        return  # a tie at the top: sampling between them is right, greedy's first-index rule does not apply
    greedy = int(np.argmax(logits))
    assert Sampler(temperature=temperature, top_k=1, seed=seed).sample(logits) == greedy
    assert Sampler(temperature=temperature, top_p=1e-9, seed=seed).sample(logits) == greedy


def test_same_seed_same_tokens():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((200, 50)).astype(np.float32)

    def run(seed):
        sampler = Sampler(temperature=0.9, top_k=20, top_p=0.95, seed=seed)
        return [sampler.sample(row) for row in rows]

    first, second, other = run(11), run(11), run(12)
    assert first == second
    assert first != other  # 200 draws over ~20 tokens: equal by chance with negligible probability


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None),
    (0.7, 5, None),
    (1.5, None, 0.8),
    (1.0, 8, 0.6),
    (2.0, 100, 0.9),
])
def test_distribution_matches_transformers_and_draws_follow_it(temperature, top_k, top_p):
    logits = np.random.default_rng(3).normal(0, 2, 24).astype(np.float32)
    logits[[4, 9]] = -np.inf  # masked tokens must never be drawn
    want = reference_distribution(logits, temperature, top_k, top_p)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    np.testing.assert_allclose(sampler.probabilities(logits), want, rtol=1e-9, atol=1e-12)

    n = 20_000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=logits.size)
    assert counts[want == 0].sum() == 0
    kept = want > 0
    expected = n * want[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = max(int(kept.sum()) - 1, 1)
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof)


@settings(max_examples=60)
@given(arrays(np.float64, st.integers(2, 30), elements=st.floats(-10, 10)), st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, top_p):
    """Checked from the definition, not from transformers (whose boundary ties differ in the last bit)."""
    probs = Sampler(temperature=1.0, top_p=top_p).probabilities(logits)
    full = np.exp(logits - logits.max())
    full /= full.sum()
    kept = np.flatnonzero(probs)
    mass = full[kept].sum()
    assert mass >= top_p - 1e-12 or len(kept) == len(logits)
    # No kept token could be dropped while keeping the mass at least p (the smallest kept is the candidate)...
    assert mass - full[kept].min() < top_p + 1e-12 or len(kept) == 1
    # ...and every kept token is at least as likely as every dropped one.
    dropped = np.setdiff1d(np.arange(len(logits)), kept)
    if dropped.size:
        assert full[kept].min() >= full[dropped].max()
    np.testing.assert_allclose(probs[kept], full[kept] / mass, rtol=1e-9)


@pytest.mark.parametrize("options, named", [
    (dict(temperature=-0.5), "temperature -0.5"),
    (dict(temperature=float("nan")), "temperature nan"),
    (dict(temperature=float("inf")), "temperature inf"),
    (dict(temperature="1"), "temperature '1'"),
    (dict(top_k=0), "top_k 0"),
    (dict(top_k=-3), "top_k -3"),
    (dict(top_k=2.5), "top_k 2.5"),
    (dict(top_k=True), "top_k True"),
    (dict(top_p=0.0), "top_p 0.0"),
    (dict(top_p=1.5), "top_p 1.5"),
    (dict(top_p=-0.1), "top_p -0.1"),
    (dict(top_p=float("nan")), "top_p nan"),
    (dict(seed=-1), "seed -1"),
])
def test_bad_settings_are_named(options, named):
    with pytest.raises(SettingsError, match=f"^{named} "):
        Sampler(**options)


def test_boundary_settings_are_accepted_and_mean_what_they_say():
    logits = np.array([0.5, 2.0, -1.0, 1.5, 0.0])
    greedy = Sampler(temperature=0, top_k=1, top_p=1.0, seed=0)
    assert greedy.sample(logits) == 1 and greedy.probabilities(logits).tolist() == [0, 1, 0, 0, 0]
    # top_p 1.0 keeps every token: the plain softmax
    everything = Sampler(temperature=1.0, top_p=1.0, seed=0).probabilities(logits)
    np.testing.assert_allclose(everything, np.exp(logits) / np.exp(logits).sum(), rtol=1e-12)
    # numpy scalars are taken as the Python numbers they hold: the same distribution (three tokens) and draws
    typed = Sampler(temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.99), seed=np.uint32(7))
    plain = Sampler(temperature=0.5, top_k=3, top_p=0.99, seed=7)
    assert np.count_nonzero(plain.probabilities(logits)) == 3
    np.testing.assert_array_equal(typed.probabilities(logits), plain.probabilities(logits))
    np.testing.assert_allclose(typed.probabilities(logits), reference_distribution(logits, 0.5, 3, 0.99), atol=1e-12)
    assert [typed.sample(logits) for _ in range(50)] == [plain.sample(logits) for _ in range(50)]


@pytest.mark.parametrize("logits", [np.zeros((2, 3)), np.zeros(0), np.array([0.0, np.nan]),
                                    np.array([0.0, np.inf]), np.array([-np.inf, -np.inf])])
def test_unusable_logits(logits):
    with pytest.raises(BindingError, match="logits"):
        Sampler(seed=0).sample(logits)
