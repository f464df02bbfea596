"""Every pass keeps what the emulator computes: bit for bit for clean-up passes, within fp16 rounding for the
legalization rewrites (which replace one rounded op by several)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion.compiler import passes as P
from orion.compiler.targets import get_target
from orion.errors import GraphError
from orion.ir.builder import GraphBuilder
from orion.ir.graph import Graph
from tests.conftest import emulate

C, S = 8, 4
CONSERVATIVE = get_target("default").with_overrides(
    concat="forbid", gelu_native=False, silu_native=False, rsqrt_native=False
)


def _weights(draw, shape, scale=0.5):
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).normal(0, scale, size=shape).astype(np.float32)


@st.composite
def random_graphs(draw) -> Graph:
    """Small graphs over [1, C, 1, S] values that exercise every pass: dead nodes, constant-only subtrees,
    identities, cast chains, and every op that legalization rewrites."""
    b = GraphBuilder("random")
    values = [b.input("x", (1, C, 1, S))]
    if draw(st.booleans()):
        values.append(b.input("a_second", (1, C, 1, S)))
    for i in range(draw(st.integers(1, 8))):
        x = draw(st.sampled_from(values))
        kind = draw(st.sampled_from([
            "add", "mul", "const_chain", "identity", "reshape_roundtrip", "transpose_roundtrip", "cast_roundtrip",
            "tanh", "sigmoid", "silu", "gelu", "rsqrt", "conv", "conv_bias", "concat_slice", "softmax",
            "layer_norm", "rms_norm", "dead",
        ]))
        if kind in ("add", "mul"):
            y = draw(st.sampled_from(values))
            v = getattr(b, kind)(x, y)
        elif kind == "const_chain":  # a subtree of constants that folding collapses
            c = b.const(_weights(draw, (1, C, 1, 1)), dtype="fp16")
            c2 = b.mul(b.add(c, 1.5), b.transpose(b.const(_weights(draw, (1, 1, C, 1)), dtype="fp16"),
                                                    perm=[0, 2, 1, 3]))
            v = b.add(x, b.reshape(c2, shape=[1, C, 1, 1]))
        elif kind == "identity":
            v = b.identity(x)
        elif kind == "reshape_roundtrip":
            v = b.reshape(b.reshape(x, shape=[1, C * S]), shape=[1, C, 1, S])
        elif kind == "transpose_roundtrip":
            v = b.transpose(b.transpose(x, perm=[0, 3, 2, 1]), perm=[0, 3, 2, 1])
        elif kind == "cast_roundtrip":
            v = b.cast(b.cast(x, "fp32"), "fp16")
        elif kind in ("tanh", "sigmoid", "silu"):
            v = getattr(b, kind)(x)
        elif kind == "gelu":
            v = b.gelu(x, mode=draw(st.sampled_from(["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])))
        elif kind == "rsqrt":
            v = b.rsqrt(b.add(b.mul(x, x), 1.0))
        elif kind in ("conv", "conv_bias"):
            bias = _weights(draw, (C,)) if kind == "conv_bias" else None
            v = b.linear(x, _weights(draw, (C, C)), bias, name=f"lin{i}")
        elif kind == "concat_slice":
            y = draw(st.sampled_from(values))
            axis = draw(st.sampled_from([1, 3]))
            cat = b.concat([x, y], axis=axis, interleave=draw(st.booleans()))
            end = [1, C, 1, S]
            begin = [0, 0, 0, 0]
            begin[axis] = draw(st.sampled_from([0, end[axis]]))
            end[axis] += begin[axis]
            v = b.slice_by_index(cat, begin=begin, end=end)
        elif kind == "softmax":
            v = b.softmax(x, axis=draw(st.sampled_from([1, -1])))
        elif kind == "layer_norm":
            v = b.layer_norm(x, 1 + _weights(draw, (C,)), _weights(draw, (C,)), name=f"ln{i}")
        elif kind == "rms_norm":
            v = b.rms_norm(x, 1 + _weights(draw, (C,)), name=f"rms{i}")
        else:
            b.exp(x)  # never used: dead code
            continue
        values.append(v)
    outputs = draw(st.lists(st.sampled_from(values), min_size=1, max_size=2))
    for j, v in enumerate(outputs):
        b.output(f"out{j}", v)
    return b.graph


def _inputs(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.normal(0, 1, v.shape).astype(np.float32) for v in graph.inputs}


EXACT_PASSES = {
    "eliminate_identities": P.eliminate_identities,
    "eliminate_casts": P.eliminate_casts,
    "eliminate_dead_code": P.eliminate_dead_code,
    "fold_constants": P.fold_constants,
    "merge_scalar_constants": P.merge_scalar_constants,
    "canonicalize_io": P.canonicalize_io,
}


@pytest.mark.parametrize("name", sorted(EXACT_PASSES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(graph=random_graphs(), seed=st.integers(0, 1000))
def test_cleanup_pass_keeps_outputs_bit_exact(name, graph, seed, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(name)
    inputs = _inputs(graph, seed)
    before = emulate(graph, inputs, out_dir)
    after = emulate(EXACT_PASSES[name](graph), inputs, out_dir)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=f"{name} changed output {key}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), seed=st.integers(0, 1000))
def test_full_pipeline_keeps_outputs_within_fp16_rounding(graph, seed, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("pipeline")
    inputs = _inputs(graph, seed)
    before = emulate(graph, inputs, out_dir)
    optimized = P.run_pipeline(graph, P.default_passes(CONSERVATIVE))
    ops = {n.op for n in optimized.nodes}
    assert not ops & {"rsqrt", "gelu", "silu", "concat", "identity"}, ops
    assert all("bias" not in n.inputs for n in optimized.nodes if n.op == "conv")
    after = emulate(optimized, inputs, out_dir)
    for key in before:
        # several rounded fp16 ops in place of one: a few fp16 ulps, relative to the output's scale
        scale = max(1.0, float(np.abs(before[key].astype(np.float32)).max()))
        np.testing.assert_allclose(after[key].astype(np.float32), before[key].astype(np.float32),
                                   atol=2e-2 * scale, rtol=2e-2)


def test_pipeline_reaches_a_fixpoint_and_is_idempotent():
    b = GraphBuilder()
    x = b.input("x", (1, C, 1, S))
    b.output("y", b.identity(b.cast(b.cast(b.rsqrt(b.add(b.mul(x, x), 1.0)), "fp32"), "fp16")))
    once = P.run_pipeline(b.graph, P.default_passes(CONSERVATIVE))
    twice = P.run_pipeline(once, P.default_passes(CONSERVATIVE))
    assert once.fingerprint() == twice.fingerprint()
    assert [n.op for n in once.nodes if not n.is_const] == ["mul", "add", "pow"]


def test_dead_code_elimination_keeps_inputs_and_drops_unused_nodes():
    b = GraphBuilder()
    x = b.input("x", (1, C, 1, S))
    b.input("unused", (1, C, 1, S))
    b.exp(x)
    b.output("y", b.tanh(x))
    g = P.eliminate_dead_code(b.graph)
    assert [v.name for v in g.inputs] == ["x", "unused"]
    assert [n.op for n in g.nodes] == ["tanh"]


def test_constant_folding_rounds_like_the_hardware():
    b = GraphBuilder()
    x = b.input("x", (1, 1, 1, 1))
    c = b.add(b.const(np.float16(1.0)), b.const(np.float16(2.0 ** -11)))  # 1 + half an ulp: a tie, rounds to even
    b.output("y", b.add(x, c))
    g = P.fold_constants(b.graph)
    folded = g.nodes[-1].inputs["y"].producer
    assert folded.is_const and folded.attrs["val"].dtype == np.float16 and folded.attrs["val"] == 1.0


def test_io_canonicalization_sorts_names():
    b = GraphBuilder()
    z = b.input("z", (1, C, 1, S))
    a = b.input("a", (1, C, 1, S))
    b.output("y", b.add(z, a))
    b.output("b", b.mul(z, a))
    g = P.canonicalize_io(b.graph)
    assert [v.name for v in g.inputs] == ["a", "z"]
    assert list(g.outputs) == ["b", "y"]


def test_legalize_respects_target_flags():
    b = GraphBuilder()
    x = b.input("x", (1, C, 1, S))
    b.output("y", b.concat([b.gelu(x, mode="TANH_APPROXIMATION"), b.silu(b.rsqrt(b.exp(x)))], axis=1))
    native = get_target("default").with_overrides(concat="allow", gelu_native=True, silu_native=True,
                                                   rsqrt_native=True)
    assert {n.op for n in P.legalize(native)(b.graph).nodes} >= {"gelu", "silu", "rsqrt", "concat"}
    rewritten = {n.op for n in P.legalize(CONSERVATIVE)(b.graph).nodes}
    assert not rewritten & {"gelu", "silu", "rsqrt", "concat"}


def test_equal_scalars_become_one_constant_and_weights_keep_their_names():
    """Each distinct constant takes a weight-tensor slot (ANE-21): the two norms' eps and -0.5 exponent are one
    constant each after the pipeline; equal weight tensors and scalars of another dtype stay apart."""
    b = GraphBuilder()
    x = b.input("x", (1, C, 1, S))
    gain = np.linspace(0.5, 1.5, C)
    h = b.rms_norm(b.rms_norm(x, gain, name="n1"), gain, name="n2")
    wide = b.cast(h, "fp32")
    b.output("y", b.cast(b.mul(wide, 0.5), "fp16"))
    b.output("z", b.mul(h, 0.5))
    g = P.run_pipeline(b.graph, P.default_passes(CONSERVATIVE))
    scalars = sorted((n.output.dtype, float(n.attrs["val"])) for n in g.nodes
                     if n.is_const and n.output.type.size == 1)
    assert scalars == sorted([("fp16", 1.0 / C), ("fp16", float(np.float16(1e-5))), ("fp16", -0.5), ("fp16", 0.5),
                              ("fp32", 0.5)])
    assert sorted(n.name for n in g.nodes if n.is_const and n.output.type.size > 1) == ["n1_weight", "n2_weight"]


def test_rsqrt_is_lowered_to_pow_for_every_profile():
    """rsqrt fails to compile on M1 Pro and M4 Pro (Orion-fork, 2026-09-06): no profile emits it."""
    from orion.compiler.compile import compile_graph
    from orion.compiler.targets import TARGETS

    b = GraphBuilder()
    x = b.input("x", (1, 768, 1, 32))
    b.output("y", b.rsqrt(b.add(b.mul(x, x), 1.0)))
    for target in TARGETS.values():
        result = compile_graph(b.graph, target)
        ops = [st.op for st in result.module.program.statements]
        assert "rsqrt" not in ops and "pow" in ops, target.name
        assert result.errors == [], target.name


@pytest.mark.parametrize("weight_shape, attrs", [
    ((4, 8, 3, 1), {}),  # a 3x1 kernel, valid: no padding, stride 1
    ((4, 8, 1, 1), {"strides": [1, 2]}),
    ((4, 8, 1, 1), {"pad_type": "custom", "pad": [0, 0, 1, 0]}),
    ((4, 4, 1, 1), {"groups": 2}),
])
def test_weights_to_inputs_refuses_a_conv_that_is_not_one_matmul(weight_shape, attrs):
    """Only a plain 1x1 conv is a matmul of its weight; the rewrite would silently compute another op."""
    b = GraphBuilder("wi")
    x = b.input("x", (1, 8, 3, 6))
    b.output("y", b.op("conv", x=x, weight=b.weight("w", np.ones(weight_shape, np.float32)), **attrs))
    with pytest.raises(GraphError, match="'w' feeds a conv that is not 1x1"):
        P.weights_to_inputs(["w"])(b.graph)


def test_weights_to_inputs_keeps_a_plain_1x1_conv():
    b = GraphBuilder("wi")
    x = b.input("x", (1, 8, 1, 6))
    b.output("y", b.op("conv", x=x, weight=b.weight("w", np.ones((4, 8, 1, 1), np.float32)), pad_type="same"))
    assert [n.op for n in P.weights_to_inputs(["w"])(b.graph).nodes if not n.is_const] == [
        "reshape", "matmul", "reshape"]


@pytest.mark.parametrize("mode", ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])
def test_legalized_gelu_keeps_its_mode(mode, tmp_path):
    """Each gelu mode is rewritten into a formula for that mode: the sigmoid approximation is 0.02 away from the
    tanh form near x = -2, far past fp16 rounding of the result."""
    b = GraphBuilder()
    x = b.input("x", (1, C, 1, S))
    b.output("y", b.gelu(x, mode=mode))
    inputs = {"x": np.linspace(-4, 4, C * S, dtype=np.float32).reshape(1, C, 1, S)}
    before = emulate(b.graph, inputs, tmp_path / "before")["y"].astype(np.float32)
    after = emulate(P.legalize(CONSERVATIVE)(b.graph), inputs, tmp_path / "after")["y"].astype(np.float32)
    np.testing.assert_allclose(after, before, atol=4e-3)
