"""Choosing the next token from logits: greedy, or temperature + top-k + top-p sampling with a seeded generator.

The arithmetic is float64 whatever the logits' dtype, so the same logits and seed give the same tokens on any backend
that produced those logits; each :class:`Sampler` owns one PCG64 generator, so a seed fixes a whole generation.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from orion.errors import BindingError, SettingsError


class Sampler:
    """``temperature`` 0 is greedy (argmax, lowest index on ties). Otherwise the softmax of ``logits / temperature``
    is cut to the ``top_k`` most likely tokens, then to the smallest set whose probability is at least ``top_p``
    (always one token or more), renormalised, and drawn from."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        if isinstance(temperature, bool) or not isinstance(temperature, Real) \
                or not math.isfinite(temperature) or temperature < 0:
            raise SettingsError(f"temperature {temperature!r} is not a number >= 0; use 0 for greedy decoding")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise SettingsError(f"top_k {top_k!r} is not an integer >= 1; use None to keep every token")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real)
                                  or not 0 < top_p <= 1):
            raise SettingsError(f"top_p {top_p!r} is not in (0, 1]; use None (or 1) to keep every token")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0):
            raise SettingsError(f"seed {seed!r} is not an integer >= 0; use None for a fresh random seed")
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The float64 distribution :meth:`sample` draws from (zero outside the kept tokens); for temperature 0,
        all mass on the argmax."""
        x = self._check(logits)
        if self.temperature == 0:
            p = np.zeros(x.size)
            p[np.argmax(x)] = 1.0
            return p
        z = x / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        # Most likely first, ranked by the scores themselves (probabilities can round equal where scores differ);
        # ties keep the lower index first, so filters are deterministic and top_k=1 is the argmax.
        order = np.argsort(-z, kind="stable")
        kept = order if self.top_k is None else order[:self.top_k]
        if self.top_p is not None:
            mass = np.cumsum(p[kept]) / p[kept].sum()
            # The smallest prefix reaching top_p; rounding can leave mass[-1] a hair under 1, hence the clamp.
            kept = kept[:min(int(np.searchsorted(mass, self.top_p, side="left")) + 1, kept.size)]
        out = np.zeros(x.size)
        out[kept] = p[kept] / p[kept].sum()
        return out

    def sample(self, logits: np.ndarray) -> int:
        """The next token id."""
        if self.temperature == 0:
            return int(np.argmax(self._check(logits)))
        return self.draw(self.probabilities(logits))

    def draw(self, p: np.ndarray) -> int:
        """A token drawn from the distribution ``p`` (non-negative, any positive total) with this sampler's
        generator."""
        candidates = np.flatnonzero(p)  # tokens filtered out (or underflowed to 0) can never be drawn
        cdf = np.cumsum(p[candidates])
        i = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(candidates[min(i, candidates.size - 1)])  # the clamp guards u * total rounding up to total

    def uniform(self) -> float:
        """A number in [0, 1) from this sampler's generator."""
        return float(self._rng.random())

    @staticmethod
    def _check(logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float64)
        if x.ndim != 1 or x.size == 0:
            raise BindingError(f"logits must be one non-empty row [vocab], got shape {x.shape}")
        if np.isnan(x).any() or np.isposinf(x).any() or not np.isfinite(x).any():
            raise BindingError("logits hold NaN or +inf, or are all -inf; the model produced no usable scores")
        return x
