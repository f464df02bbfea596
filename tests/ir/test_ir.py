"""The IR: op declarations, shape rules, graph printing and copying, and the builder's transformer patterns
checked against plain float64 numpy written out here (not against the op registry's own numpy meanings)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orion.errors import GraphError
from orion.ir.builder import GraphBuilder
from orion.ir.graph import Graph
from orion.ir.ops import OPS


def test_shape_rules_reject_bad_graphs_with_named_errors():
    b = GraphBuilder()
    x = b.input("x", (1, 8, 1, 4))
    with pytest.raises(GraphError, match="do not broadcast"):
        b.add(x, b.input("y", (1, 3, 1, 4)))
    with pytest.raises(GraphError, match="inner dimensions"):
        b.matmul(x, x)
    with pytest.raises(GraphError, match="cannot reshape"):
        b.reshape(x, shape=[1, 7, 1, 4])
    with pytest.raises(GraphError, match="unknown attribute"):
        b.softmax(x, axes=1)
    with pytest.raises(GraphError, match="not a valid MIL identifier"):
        b.input("bad name", (1, 1, 1, 1))
    with pytest.raises(GraphError, match="different dtypes"):
        b.add(x, b.cast(x, "fp32"))


def test_every_op_has_a_shape_rule_and_a_numpy_meaning():
    for op in OPS.values():
        assert callable(op.infer) and callable(op.compute), op.name
        assert op.kind in ("elementwise", "activation", "wide", "reduction", "layout", "index", "state", "const",
                           "constexpr")


def test_graph_prints_readably_and_copies_structurally():
    b = GraphBuilder("g")
    x = b.input("x", (1, 4, 1, 16))
    b.output("y", b.softmax(b.mul(x, 2.0), axis=-1))
    text = str(b.graph)
    assert text.splitlines()[0] == "graph g(%x: fp16[1,4,1,16]):"
    assert "softmax(x=%mul) {axis=-1} : fp16[1,4,1,16]" in text
    assert text.splitlines()[-1] == "  return (y=%softmax)"
    copy = b.graph.copy()
    assert str(copy) == text and copy.fingerprint() == b.graph.fingerprint()
    assert all(n1 is not n2 for n1, n2 in zip(copy.nodes, b.graph.nodes))


def test_fingerprint_sees_constant_bytes():
    def graph(value):
        b = GraphBuilder()
        b.output("y", b.add(b.input("x", (1, 2, 1, 2)), float(value)))
        return b.graph

    assert graph(1.0).fingerprint() == graph(1.0).fingerprint()
    assert graph(1.0).fingerprint() != graph(2.0).fingerprint()


def _reference_attention(q, k, v, heads):
    """float64 causal attention on [d, S] channel-first arrays."""
    d, s = q.shape
    hd = d // heads
    out = np.zeros_like(q)
    for h in range(heads):
        qh, kh, vh = (t[h * hd:(h + 1) * hd].T for t in (q, k, v))  # [S, hd]
        scores = qh @ kh.T / math.sqrt(hd)
        scores[np.triu_indices(s, 1)] = -np.inf
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[h * hd:(h + 1) * hd] = (p @ vh).T
    return out


def test_builder_patterns_match_float64_references(run_graph, rng):
    d, s, heads = 32, 16, 4
    b = GraphBuilder("patterns")
    x = b.input("x", (1, d, 1, s))
    w = rng.normal(0, 0.2, (d, d))
    bias = rng.normal(0, 0.1, d)
    gamma, beta = 1 + rng.normal(0, 0.1, d), rng.normal(0, 0.1, d)
    wg, wu, wd = (rng.normal(0, 0.2, shape) for shape in ((2 * d, d), (2 * d, d), (d, 2 * d)))
    b.output("lin", b.linear(x, w, bias, name="lin"))
    b.output("ln", b.layer_norm(x, gamma, beta, name="ln"))
    b.output("rms", b.rms_norm(x, gamma, name="rms"))
    b.output("gelu", b.gelu_tanh(x))
    b.output("swiglu", b.swiglu(x, wg, wu, wd))
    b.output("attn", b.attention(x, b.mul(x, 0.5), b.mul(x, -1.0), heads=heads))
    xv = rng.normal(0, 1, (1, d, 1, s)).astype(np.float16)
    got = {k: v.astype(np.float64)[0, :, 0, :] for k, v in run_graph(b.graph, {"x": xv}).items()}

    x64 = xv.astype(np.float64)[0, :, 0, :]  # [d, S]
    w16 = lambda a: a.astype(np.float16).astype(np.float64)  # weights are stored as fp16
    mean = x64.mean(0)
    var = ((x64 - mean) ** 2).mean(0)
    silu = lambda t: t / (1 + np.exp(-t))
    expected = {
        "lin": w16(w) @ x64 + w16(bias)[:, None],
        "ln": (x64 - mean) / np.sqrt(var + 1e-5) * w16(gamma)[:, None] + w16(beta)[:, None],
        "rms": x64 / np.sqrt((x64 ** 2).mean(0) + 1e-5) * w16(gamma)[:, None],
        "gelu": 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3))),
        "swiglu": w16(wd) @ (silu(w16(wg) @ x64) * (w16(wu) @ x64)),
        "attn": _reference_attention(x64, 0.5 * x64, -x64, heads),
    }
    for key, ref in expected.items():
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got[key], ref, atol=0.01 * scale + 2e-3, err_msg=key)


def test_attention_rejects_heads_that_do_not_divide_channels():
    b = GraphBuilder()
    x = b.input("x", (1, 10, 1, 4))
    with pytest.raises(GraphError, match="heads"):
        b.attention(x, x, x, heads=3)


def test_graph_validate_catches_dangling_values():
    g = Graph()
    b = GraphBuilder()
    x = b.input("x", (1, 1, 1, 1))
    g.set_output("y", b.exp(x))
    with pytest.raises(GraphError, match="undefined"):
        g.validate()


def test_a_node_of_several_results_is_listed_once_in_dependency_order():
    from orion.ir.graph import topological_nodes

    b = GraphBuilder("g")
    a, c = b.op("split", x=b.input("x", (1, 4, 1, 8)), axis=1, num_splits=2)
    y = b.add(a, c)
    order = topological_nodes([y, c])
    assert [n.op for n in order] == ["split", "add"]
    copy = b.graph.copy()
    assert str(copy) == str(b.graph) and copy.fingerprint() == b.graph.fingerprint()
    assert copy.nodes[0].more[0].producer is copy.nodes[0]
