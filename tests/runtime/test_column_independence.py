"""The property exact speculative decoding rests on, checked where the emulator gets it from BLAS.

A decode program computes one token per column; a verification pass puts drafted tokens in the other columns and
reads keys and values from slots a one-token pass leaves at 0 (masked). Its logits equal the one-token pass's bit
for bit only if, in a product of one shape, a column's result depends neither on the other columns' values nor on
its place (and a slot weighted 0 adds nothing). The ``fixed-point`` accumulator sums exactly, so order never
matters; the ``fp32`` one, which models run under, sums in float32 BLAS, whose blocking could break it. A machine
whose BLAS does fails here, loudly, rather than in a speculative run's tokens at a near tie. On the ANE the same
property is assumed (docs/decode.md, "Exact speculative decoding")."""

from __future__ import annotations

import numpy as np
import pytest

from orion.ir.builder import GraphBuilder
from orion.models import model_backend
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from orion.runtime.program import Program

D, HEADS, S, T = 768, 12, 16, 256  # GPT-2 124M's width and heads, a decode surface's columns, a cache bucket
HD = D // HEADS


@pytest.fixture(scope="module")
def products():
    """The products of a decode program, as it writes them: a linear layer (1x1 conv) over the columns, scores
    ``q k`` (GPT-2's rows), the weighted sum of values with ``transpose_y`` (GPT-2's rows; Llama's columns)."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("columns")
    x = b.input("x", (1, D, 1, S))
    b.output("linear", b.linear(x, rng.standard_normal((D, D)) * 0.05, rng.standard_normal(D) * 0.1))
    q, k = b.input("q", (1, HEADS, S, HD)), b.input("k", (1, HEADS, HD, T))
    p, v = b.input("p", (1, HEADS, S, T)), b.input("v", (1, HEADS, HD, T))
    b.output("scores", b.matmul(q, k, transpose_x=False, transpose_y=False))
    b.output("ctx_rows", b.matmul(p, v, transpose_x=False, transpose_y=True))
    b.output("ctx_columns", b.matmul(v, p, transpose_x=False, transpose_y=True))
    program = Program.from_graph(b.graph, backend=model_backend("emulator", accumulator="fp32"),
                                 cache=ProgramCache(None), budget=CompileBudget(10))
    yield program
    program.close()


def fp16(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def test_a_columns_bits_do_not_depend_on_the_other_columns_nor_on_its_place(products):
    """Column 0 of one run moved to column 9 of another whose other columns (and masked slots) hold other values."""
    assert products.backend.numerics.accumulator == "fp32"
    rng = np.random.default_rng(1)
    first = {"x": fp16(rng, 1, D, 1, S), "q": fp16(rng, 1, HEADS, S, HD), "k": fp16(rng, 1, HEADS, HD, T),
             "p": fp16(rng, 1, HEADS, S, T, scale=0.01), "v": fp16(rng, 1, HEADS, HD, T)}
    first["p"][..., T // 2:] = 0  # slots masked for every column: weight 0
    second = {"x": fp16(rng, 1, D, 1, S), "q": fp16(rng, 1, HEADS, S, HD), "k": first["k"].copy(),
              "p": fp16(rng, 1, HEADS, S, T, scale=0.01), "v": first["v"].copy()}
    second["x"][..., 9] = first["x"][..., 0]
    second["q"][:, :, 9] = first["q"][:, :, 0]
    second["p"][:, :, 9] = first["p"][:, :, 0]
    second["k"][..., T // 2:] = fp16(rng, 1, HEADS, HD, T - T // 2)  # what the masked slots hold differs
    second["v"][..., T // 2:] = fp16(rng, 1, HEADS, HD, T - T // 2)
    a, b = products.run(first), products.run(second)
    assert np.array_equal(a["linear"][..., 0], b["linear"][..., 9])
    assert np.array_equal(a["scores"][:, :, 0, :T // 2], b["scores"][:, :, 9, :T // 2])
    assert np.array_equal(a["ctx_rows"][:, :, 0], b["ctx_rows"][:, :, 9])
    assert np.array_equal(a["ctx_columns"][..., 0], b["ctx_columns"][..., 9])
    assert not np.array_equal(a["linear"][..., 1], b["linear"][..., 1])  # the other columns did change
