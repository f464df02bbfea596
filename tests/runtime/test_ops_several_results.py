"""Ops with several results (``split``, ``topk``) and the index reductions (``reduce_argmax``/``reduce_argmin``), run
as MIL text by the emulator in both spellings public programs use for several results, against coremltools' own
numpy meaning of each op (its ``value_inference``)."""

from __future__ import annotations

import numpy as np
import pytest

from orion.compiler.constraints import check_program
from orion.compiler.targets import get_target
from orion.errors import MILProgramError
from orion.mil.parse import parse_program
from orion.runtime.backends.emulator import load_text
from tests.runtime.op_oracles import mil_literal


@pytest.fixture(scope="module")
def coreml_results():
    """``coreml_results(op, **params)``: coremltools' value of an op of one or several results, as a tuple."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import Builder as mb, Function

    def value(op: str, **params) -> tuple[np.ndarray, ...]:
        with Function({}, opset_version=ct.target.iOS18):
            out = getattr(mb, op)(**params)
        return tuple(np.asarray(v.val) for v in (out if isinstance(out, (tuple, list)) else (out,)))

    return value


MIL_DTYPES = {np.dtype(np.float16): "fp16", np.dtype(np.int32): "int32", np.dtype(np.uint16): "uint16"}


def several_results_program(op: str, x: np.ndarray, results: list[tuple[str, np.ndarray]], parenthesized: bool,
                            **params) -> str:
    """One op of input ``x`` whose results (``name``, an array of the result's dtype and shape) are all outputs."""
    lines = []
    for name, value in params.items():
        t, lit = mil_literal(value)
        lines.append(f"        {t} p_{name} = const()[name=string(\"p_{name}\"), val={lit}];")
    declared = ", ".join(f"tensor<{MIL_DTYPES[v.dtype]}, {list(v.shape)}> {n}" for n, v in results)
    if parenthesized:
        declared = f"({declared})"
    args = ", ".join([f"{name}=p_{name}" for name in params] + ["x=x"])
    lines.append(f"        {declared} = {op}({args})[name=string(\"{op}_0\")];")
    return (f"program(1.3)\n{{\n    func main<ios18>(tensor<{MIL_DTYPES[x.dtype]}, {list(x.shape)}> x) {{\n"
            + "\n".join(lines) + f"\n    }} -> ({', '.join(n for n, _ in results)});\n}}\n")


def run_several(tmp_path, op, x, oracle, parenthesized, **params) -> list[np.ndarray]:
    names = [f"r{i}" for i in range(len(oracle))]
    text = several_results_program(op, x, list(zip(names, oracle)), parenthesized, **params)
    outputs = load_text(text, tmp_path).run({"x": x})
    return [outputs[n] for n in names]


@pytest.mark.parametrize("parenthesized", [False, True])
@pytest.mark.parametrize("params", [
    {"axis": 1, "num_splits": 3},
    {"axis": -1, "split_sizes": [2, 5, 1]},
    {"axis": 3, "num_splits": 3, "split_sizes": [4, 1, 3]},
    {"axis": 0, "num_splits": 2},
])
def test_split_matches_coremltools(tmp_path, coreml_results, parenthesized, params):
    x = np.random.default_rng(1).normal(size=(2, 6, 3, 8)).astype(np.float16)
    oracle = coreml_results("split", x=x.astype(np.float32), **params)
    got = run_several(tmp_path, "split", x, [o.astype(np.float16) for o in oracle], parenthesized, **params)
    assert len(got) == len(oracle) > 1
    for g, o in zip(got, oracle):
        np.testing.assert_array_equal(g, o.astype(np.float16))  # moved values: exact


@pytest.mark.parametrize("parenthesized", [False, True])
@pytest.mark.parametrize("params", [
    {"k": 3},
    {"k": 4, "axis": 1, "ascending": True},
    {"k": 1, "axis": -2},
    {"k": 5, "axis": 3, "return_indices": False},
])
def test_topk_values_and_indices_match_coremltools(tmp_path, coreml_results, parenthesized, params):
    rng = np.random.default_rng(2)
    x = (rng.permutation(2 * 5 * 3 * 7) - 100).reshape(2, 5, 3, 7).astype(np.float16)  # distinct: no ties
    oracle = coreml_results("topk", x=x.astype(np.float32), **params)
    assert len(oracle) == (1 if params.get("return_indices") is False else 2)
    declared = [oracle[0].astype(np.float16)] + [o.astype(np.int32) for o in oracle[1:]]
    got = run_several(tmp_path, "topk", x, declared, parenthesized, **params)
    np.testing.assert_array_equal(got[0], oracle[0].astype(np.float16))
    if len(oracle) == 2:
        assert got[1].dtype == np.int32
        np.testing.assert_array_equal(got[1], oracle[1])


def test_topk_of_int32_values(tmp_path, coreml_results):
    """Integer values are picked exactly (70001 is not an fp16 value)."""
    x = np.array([[5, 70001, -3, 2049, 12]], dtype=np.int32)
    oracle = coreml_results("topk", x=x, k=3)
    got = run_several(tmp_path, "topk", x, [o.astype(np.int32) for o in oracle], False, k=3)
    np.testing.assert_array_equal(got[0], oracle[0])
    np.testing.assert_array_equal(got[1], oracle[1])
    assert got[0].dtype == np.int32 and got[0][0, 0] == 70001


def test_split_results_feed_later_statements(tmp_path):
    """Each result of a split is a variable of its own: here a difference of the halves, against numpy."""
    text = """program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 8, 1, 4]> x) {
        int32 ax = const()[name=string("ax"), val=int32(1)];
        int32 n = const()[name=string("n"), val=int32(2)];
        tensor<fp16, [1, 4, 1, 4]> lo, tensor<fp16, [1, 4, 1, 4]> hi = split(axis=ax, num_splits=n, x=x)[name=string("s")];
        tensor<fp16, [1, 4, 1, 4]> d = sub(x=hi, y=lo)[name=string("d")];
    } -> (d);
}
"""
    x = np.random.default_rng(3).normal(size=(1, 8, 1, 4)).astype(np.float16)
    d = load_text(text, tmp_path).run({"x": x})["d"]
    np.testing.assert_array_equal(d, (x[:, 4:].astype(np.float32) - x[:, :4]).astype(np.float16))


@pytest.mark.parametrize("declared, message", [
    ("tensor<fp16, [1, 4, 1, 4]> a, tensor<fp16, [1, 4, 1, 4]> b, tensor<fp16, [1, 4, 1, 4]> c",
     r"split of these operands gives 2 results, the statement declares 3 \(a, b, c\)"),
    ("tensor<fp16, [1, 4, 1, 4]> a, tensor<fp16, [1, 5, 1, 4]> b",
     r"'b' is declared tensor<fp16, \[1, 5, 1, 4\]> but split of these operands gives tensor<fp16, \[1, 4, 1, 4\]>"),
])
def test_split_statement_disagreeing_with_its_results_is_refused(tmp_path, declared, message):
    text = f"""program(1.3)
{{
    func main<ios18>(tensor<fp16, [1, 8, 1, 4]> x) {{
        int32 ax = const()[name=string("ax"), val=int32(1)];
        int32 n = const()[name=string("n"), val=int32(2)];
        {declared} = split(axis=ax, num_splits=n, x=x)[name=string("s")];
    }} -> (a);
}}
"""
    with pytest.raises(MILProgramError, match=message):
        load_text(text, tmp_path)
    problems = [v for v in check_program(parse_program(text), get_target("default")) if v.constraint == "ANE-38"]
    assert problems and message.replace("\\", "")[:20] in problems[0].message.replace("\\", "")


def test_split_and_topk_are_flagged_as_not_known_on_the_ane():
    x = np.zeros((1, 4, 1, 8), np.float16)
    text = several_results_program("split", x, [("a", x[:, :2]), ("b", x[:, 2:])], True, axis=1, num_splits=2)
    found = {v.constraint for v in check_program(parse_program(text), get_target("default"))}
    assert "ANE-34" in found and "ANE-38" not in found


def test_graph_builder_emitter_and_passes_carry_every_result(tmp_path):
    """split and topk built in a graph: each result is a value of its own, the passes keep the node once (two of
    its results read), the emitter writes one statement with several results, and the emulator runs it."""
    from orion.compiler.compile import compile_graph
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("g")
    x = b.input("x", (1, 8, 1, 32))
    lo, mid, hi = b.op("split", x=x, axis=1, split_sizes=[2, 2, 4])
    assert [v.shape for v in (lo, mid, hi)] == [(1, 2, 1, 32), (1, 2, 1, 32), (1, 4, 1, 32)]
    values, _ = b.op("topk", x=hi, k=3, axis=-1)
    b.output("d", b.sub(mid, lo))
    b.output("top", values)
    assert "%split, %split_1, %split_2 = split(x=%x)" in str(b.graph)
    result = compile_graph(b.graph, target="default")
    text = result.module.text
    assert text.count(" = split(") == 1 and text.count(" = topk(") == 1
    result.module.write(tmp_path)
    x_in = np.random.default_rng(7).normal(size=(1, 8, 1, 32)).astype(np.float16)
    from orion.runtime.backends.emulator import load_program

    got = load_program(tmp_path).run({"x": x_in})
    np.testing.assert_array_equal(got["d"], (x_in[:, 2:4].astype(np.float32) - x_in[:, :2]).astype(np.float16))
    np.testing.assert_array_equal(got["top"], -np.sort(-x_in[:, 4:], axis=-1)[..., :3])


# -- reduce_argmax / reduce_argmin ------------------------------------------------------------------------------------


def _arg_program(op: str, x: np.ndarray, out: np.ndarray, **params) -> str:
    return several_results_program(op, x, [("out", out)], False, **params)


@pytest.mark.parametrize("op", ["reduce_argmax", "reduce_argmin"])
@pytest.mark.parametrize("params", [{}, {"axis": 1}, {"axis": -3, "keep_dims": True}, {"axis": 0, "keep_dims": False},
                                    {"axis": 3, "output_dtype": "uint16"}])
def test_index_reductions_match_coremltools_exactly(tmp_path, coreml_results, op, params):
    """Positions past 2048 along a long axis come back exact (an fp16 hold would make 2049 read 2048)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 2, 2500)).astype(np.float16)
    if params.get("axis", -1) in (-1, 3):
        x[..., 2049] = 40.0 if op == "reduce_argmax" else -40.0  # the extreme at 2049 in every row
    (oracle,) = coreml_results(op, x=x.astype(np.float32), **params)
    dtype = np.uint16 if params.get("output_dtype") == "uint16" else np.int32
    text = _arg_program(op, x, oracle.astype(dtype), **params)
    got = load_text(text, tmp_path).run({"x": x})["out"]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, oracle)
    if params.get("axis", -1) in (-1, 3):
        assert (got == 2049).all()


def test_argmax_of_int32_values_and_its_positions_moved_by_layout_stay_exact(tmp_path):
    """int32 values above fp16's range are compared exactly; the positions, reshaped, read back as int32."""
    text = """program(1.3)
{
    func main<ios18>(tensor<int32, [2, 3000]> x) {
        int32 ax = const()[name=string("ax"), val=int32(1)];
        bool kd = const()[name=string("kd"), val=bool(true)];
        tensor<int32, [2, 1]> i = reduce_argmax(axis=ax, keep_dims=kd, x=x)[name=string("i")];
        tensor<int32, [2]> s = const()[name=string("s"), val=tensor<int32, [2]>([1, 2])];
        tensor<int32, [1, 2]> y = reshape(shape=s, x=i)[name=string("y")];
    } -> (y);
}
"""
    x = np.zeros((2, 3000), np.int32)
    x[0, 2999], x[0, 2998] = 70001, 70000  # equal as fp16 values (both inf): only exact integers tell them apart
    x[1, 2051] = 5
    y = load_text(text, tmp_path).run({"x": x})["y"]
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, [[2999, 2051]])


def test_index_ops_are_flagged_unverified_and_their_int32_output_refused():
    """The catalog: an int32 output is rejected on the ANE (ANE-23), the op is not known there (ANE-34), and what
    the ANE does with integer positions is unverified (ANE-41, a warning naming the result)."""
    x = np.zeros((1, 4, 1, 8), np.float16)
    text = _arg_program("reduce_argmax", x, np.zeros((1, 4, 1), np.int32), axis=-1)
    found = check_program(parse_program(text), get_target("default"))
    by_id = {v.constraint: v for v in found}
    assert {"ANE-23", "ANE-34", "ANE-41"} <= set(by_id) and "ANE-38" not in by_id
    assert by_id["ANE-41"].severity == "warning" and "out" in by_id["ANE-41"].message
    assert "unverified" in by_id["ANE-41"].message
    values_only = several_results_program("topk", x, [("v", x[..., :2])], False, k=2, return_indices=False)
    assert "ANE-41" not in {v.constraint for v in check_program(parse_program(values_only), get_target("default"))}
