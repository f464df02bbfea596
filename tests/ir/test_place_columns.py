"""``GraphBuilder.place_columns``: new keys put into their cache slots by a one-hot matmul read, bit for bit, as they
read once committed to the cache, under both accumulators, also for the values a matmul rounds (subnormals, which
the fp32 model flushes; values off the fixed-point accumulator's 2**-16 grid)."""

from __future__ import annotations

import numpy as np
import pytest

from orion.ir.builder import GraphBuilder
from orion.models import model_backend
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from orion.runtime.program import Program

H, W, S, T = 2, 8, 16, 64
LENGTH, N = 20, 5  # committed positions, columns fed


def columns(rng) -> np.ndarray:
    """fp16 values of every size a key takes, the small ones a matmul rounds among them."""
    scale = 2.0 ** rng.integers(-20, 2, size=(1, H, W, S))
    return (rng.standard_normal((1, H, W, S)) * scale).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("accumulator", ["fp32", "fixed-point"])
def test_placed_columns_read_as_they_read_once_committed(accumulator):
    b = GraphBuilder("place")
    written, full = b.place_columns(b.input("new", (1, H, W, S)), b.input("cache", (1, H, W, T)),
                                    b.input("slots", (1, 1, S, T)), "k")
    b.output("written", written)
    b.output("full", full)
    program = Program.from_graph(b.graph, backend=model_backend("emulator", accumulator=accumulator),
                                 cache=ProgramCache(None), budget=CompileBudget(10))
    rng = np.random.default_rng(0)
    new = columns(rng)
    cache = np.zeros((1, H, W, T), np.float32)
    cache[..., :LENGTH] = columns(rng)[..., :1].repeat(LENGTH, axis=-1) * rng.standard_normal(LENGTH)
    cache = cache.astype(np.float16).astype(np.float32)
    slots = np.zeros((1, 1, S, T), np.float32)
    slots[0, 0, np.arange(N), LENGTH + np.arange(N)] = 1
    with program:
        fed = program.run({"new": new, "cache": cache, "slots": slots})
        assert np.array_equal(fed["full"][..., :LENGTH], cache[..., :LENGTH])  # committed slots as they are
        assert np.array_equal(fed["full"][..., LENGTH:LENGTH + N], fed["written"][..., :N])
        assert not fed["full"][..., LENGTH + N:].any()
        # the columns committed (what a session copies into the cache), then a pass that places nothing there
        cache[..., LENGTH:LENGTH + N] = fed["written"][..., :N]
        later = program.run({"new": columns(rng), "cache": cache, "slots": np.zeros_like(slots)})
        assert np.array_equal(later["full"], fed["full"])
        assert not np.array_equal(fed["written"], new)  # the data reached the matmul's rounding
