"""Comparisons, logical ops, select, layout and indexing ops, each run as MIL text by the emulator and compared with
coremltools' own numpy meaning of the op (its ``value_inference``) on the same values."""

from __future__ import annotations

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.errors import GraphError, MILProgramError
from orion.ir.builder import GraphBuilder
from orion.runtime.backends.emulator import load_text
from tests.runtime.op_oracles import assert_within_fp16, mil_literal

MIL_TYPES = {np.dtype(np.float16): "fp16", np.dtype(np.int32): "int32", np.dtype(np.bool_): "bool"}


def _param_literal(value) -> tuple[str, str]:
    """``mil_literal``, and bool lists as bool tensors (masks)."""
    if isinstance(value, list) and value and isinstance(value[0], bool):
        t = f"tensor<bool, [{len(value)}]>"
        return t, f"{t}([{', '.join(str(v).lower() for v in value)}])"
    return mil_literal(value)


def program_text(op: str, inputs: dict[str, np.ndarray], out_shape, out_dtype: str = "fp16",
                 variadic: str | None = None, **params) -> str:
    """A one-op MIL program: ``inputs`` are function inputs (fp16, int32 or bool), parameters named consts."""
    lines = []
    for name, value in params.items():
        t, lit = _param_literal(value)
        lines.append(f'        {t} p_{name} = const()[name=string("p_{name}"), val={lit}];')
    tensors = [f"{variadic}=({', '.join(inputs)})"] if variadic else [f"{n}={n}" for n in inputs]
    args = ", ".join([f"{name}=p_{name}" for name in params] + tensors)
    lines.append(f'        tensor<{out_dtype}, {list(out_shape)}> out = {op}({args})[name=string("out")];')
    signature = ", ".join(f"tensor<{MIL_TYPES[v.dtype]}, {list(v.shape)}> {n}" for n, v in inputs.items())
    return (f"program(1.3)\n{{\n    func main<ios18>({signature}) {{\n" + "\n".join(lines)
            + "\n    } -> (out);\n}\n")


def run_program(tmp_path, op: str, inputs: dict[str, np.ndarray], out_shape, out_dtype: str = "fp16",
                variadic: str | None = None, **params) -> np.ndarray:
    text = program_text(op, inputs, out_shape, out_dtype, variadic, **params)
    return load_text(text, tmp_path).run(inputs)["out"]


def _oracle_inputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in inputs.items()}


# -- 1. comparisons, logical ops, select ------------------------------------------------------------------------------

COMPARISONS = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]


def _close_pairs(rng, shape_x, shape_y):
    """fp16 operands on a coarse grid, so that equal values are common and every comparison has both answers."""
    x = (rng.integers(-4, 5, shape_x) * 0.5).astype(np.float16)
    y = (rng.integers(-4, 5, shape_y) * 0.5).astype(np.float16)
    return x, y


@pytest.mark.parametrize("shape_y", [(1, 6, 1, 16), (1, 1, 1, 16), (6, 1, 1)], ids=["same", "row", "column"])
@pytest.mark.parametrize("op", COMPARISONS)
def test_comparison_matches_coremltools_and_returns_0_or_1(tmp_path, rng, coreml, op, shape_y):
    x, y = _close_pairs(rng, (1, 6, 1, 16), shape_y)
    oracle = coreml(op, x=x.astype(np.float32), y=y.astype(np.float32))
    assert 0 < oracle.mean() < 1, "both answers occur"
    got = run_program(tmp_path, op, {"x": x, "y": y}, oracle.shape, out_dtype="bool")
    assert got.dtype == np.float16  # a bool output reads as fp16 0s and 1s, as the emulator holds it
    np.testing.assert_array_equal(got, oracle)


@pytest.mark.parametrize("op", ["logical_and", "logical_or", "logical_xor", "logical_not"])
def test_logical_op_of_comparisons_matches_coremltools(tmp_path, rng, coreml, op):
    """Bool inputs, and bool results of comparisons fed to a logical op (held as fp16 0/1 between the two)."""
    x, y = rng.random((2, 6, 16)) < 0.5
    operands = {"x": x} if op == "logical_not" else {"x": x, "y": y}
    oracle = coreml(op, **operands)
    np.testing.assert_array_equal(run_program(tmp_path, op, operands, x.shape, out_dtype="bool"), oracle)
    a, b = _close_pairs(rng, (6, 16), (6, 16))
    both = {"x": "less(x=a, y=b)", "y": "equal(x=a, y=b)"}
    calls = [f'        tensor<bool, [6, 16]> {n} = {c}[name=string("{n}")];' for n, c in both.items()]
    args = "x=x" if op == "logical_not" else "x=x, y=y"
    text = ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [6, 16]> a, tensor<fp16, [6, 16]> b) {\n"
            + "\n".join(calls) + f'\n        tensor<bool, [6, 16]> z = {op}({args})[name=string("z")];\n'
            + "    } -> (z);\n}\n")
    got = load_text(text, tmp_path).run({"a": a, "b": b})["z"]
    want = {"x": a < b, "y": a == b}
    np.testing.assert_array_equal(got, coreml(op, **({"x": want["x"]} if op == "logical_not" else want)))


def test_logical_op_refuses_numeric_operands(tmp_path):
    x = np.ones((2, 3), np.float16)
    with pytest.raises(MILProgramError, match="logical_and: needs bool operands, got fp16"):
        run_program(tmp_path, "logical_and", {"x": x, "y": x}, x.shape, out_dtype="bool")
    with pytest.raises(MILProgramError, match="declared tensor<fp16, \\[2, 3\\]> but less"):
        run_program(tmp_path, "less", {"x": x, "y": x}, x.shape, out_dtype="fp16")


@pytest.mark.parametrize("shapes", [((6, 16), (6, 16), (6, 16)), ((1, 16), (6, 16), (6, 1)), ((6, 16), (16,), ())])
def test_select_matches_coremltools(tmp_path, rng, coreml, shapes):
    cond = rng.random(shapes[0]) < 0.5
    a = rng.normal(0, 3, shapes[1]).astype(np.float16)
    b = rng.normal(10, 3, shapes[2]).astype(np.float16)
    operands = {"cond": cond, "a": a, "b": b}
    oracle = coreml("select", **_oracle_inputs(operands))
    got = run_program(tmp_path, "select", operands, oracle.shape)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


def test_select_of_a_comparison_through_builder_emitter_and_catalog(tmp_path, rng):
    """relu written as select(x > 0, x, 0*x): built, emitted, run; the catalog names select and greater (ANE-34)."""
    b = GraphBuilder("sel")
    x = b.input("x", (1, 6, 1, 16))
    b.output("y", b.select(b.greater(x, b.mul(x, 0.0)), x, b.mul(x, 0.0)))
    result = compile_graph(b.graph, target="m4")
    flagged = {m.split("'")[1] for c, m in ((v.constraint, v.message) for v in result.violations) if c == "ANE-34"}
    assert flagged == {"select", "greater"}
    result.module.write(tmp_path)
    data = rng.normal(0, 2, (1, 6, 1, 16)).astype(np.float16)
    np.testing.assert_array_equal(load_text(result.module.text, tmp_path).run({"x": data})["y"], np.maximum(data, 0))


# -- 2. layout ops ----------------------------------------------------------------------------------------------------

LAYOUT = [  # op, input shape, parameters
    ("tile", (2, 3, 4), {"reps": [1, 2, 3]}),
    ("tile", (2, 3, 4), {"reps": [3, 1, 1]}),
    ("squeeze", (1, 6, 1, 16), {}),
    ("squeeze", (1, 6, 1, 16), {"axes": [2]}),
    ("squeeze", (1, 6, 1, 16), {"axes": [0, -2]}),
    ("expand_dims", (6, 16), {"axes": [0]}),
    ("expand_dims", (6, 16), {"axes": [-1]}),
    ("expand_dims", (6, 16), {"axes": [0, 2]}),
    ("expand_dims", (6, 16), {"axes": [1, -1]}),
    ("pad", (2, 5, 6), {"pad": [1, 2, 3, 0]}),
    ("pad", (2, 5, 6), {"pad": [1, 2, 3, 0], "mode": "constant", "constant_val": -2.5}),
    ("pad", (2, 5, 6), {"pad": [0, 1, 2, 3, 4, 1], "mode": "reflect"}),
    ("pad", (2, 5, 6), {"pad": [2, 1], "mode": "reflect"}),
    ("pad", (2, 5, 6), {"pad": [1, 3, 2, 0], "mode": "replicate"}),
    ("slice_by_index", (4, 6, 8), {"begin": [1, 0, 2], "end": [3, 6, 7], "squeeze_mask": [True, False, False]}),
    ("slice_by_index", (4, 6, 8), {"begin": [1, 2, -3], "end": [3, 6, 7], "stride": [1, 2, 1],
                                   "squeeze_mask": [False, False, True]}),
    ("slice_by_index", (4, 6, 8), {"begin": [2, 0, 5], "end": [0, 0, 0], "begin_mask": [False, True, False],
                                   "end_mask": [False, True, False], "squeeze_mask": [True, False, True]}),
    ("band_part", (2, 6, 8), {}),
    ("band_part", (2, 6, 8), {"lower": 0}),
    ("band_part", (2, 6, 8), {"upper": 0}),
    ("band_part", (2, 6, 8), {"lower": 2, "upper": 1}),
    ("band_part", (8, 6), {"lower": 1, "upper": -1}),
]


def _params_for_coreml(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, list) and isinstance(v[0], bool):
            out[k] = np.array(v)
        elif isinstance(v, list):
            out[k] = np.array(v, np.int32)
        else:
            out[k] = np.float32(v) if isinstance(v, float) else v
    return out


@pytest.mark.parametrize("op, shape, params", LAYOUT, ids=[f"{op}{sorted(p.items())}" for op, _, p in LAYOUT])
def test_layout_op_matches_coremltools(tmp_path, rng, coreml, op, shape, params):
    x = rng.normal(0, 3, shape).astype(np.float16)
    oracle = coreml(op, x=x.astype(np.float32), **_params_for_coreml(params))
    got = run_program(tmp_path, op, {"x": x}, oracle.shape, **params)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("exclusive, reverse", [(False, False), (False, True), (True, False), (True, True)])
def test_cumsum_matches_coremltools_and_torch(tmp_path, rng, coreml, axis, exclusive, reverse):
    """coremltools' value inference fails on ``exclusive`` (it calls np.zeros with the data as dtype): there the
    oracle is torch's cumsum with the element itself taken out, reversed by flips."""
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 2, (3, 5, 7)).astype(np.float16)
    if exclusive:
        t = torch.tensor(x.astype(np.float64))
        t = t.flip(axis) if reverse else t
        out = torch.cumsum(t, dim=axis) - t
        oracle = (out.flip(axis) if reverse else out).numpy()
    else:
        oracle = coreml("cumsum", x=x.astype(np.float32), axis=axis, reverse=reverse)
    got = run_program(tmp_path, "cumsum", {"x": x}, x.shape, axis=axis, exclusive=exclusive, reverse=reverse)
    assert_within_fp16(got, oracle, what=f"cumsum axis={axis} exclusive={exclusive} reverse={reverse}")


@pytest.mark.parametrize("op, shape, params, message", [
    ("tile", (2, 3), {"reps": [2]}, "reps \\[2\\] must have 2 entries"),
    ("pad", (2, 3), {"pad": [1, 2, 3]}, "before, after"),
    ("pad", (2, 3), {"pad": [0, 3], "mode": "reflect"}, "smaller than each padded axis"),
    ("pad", (2, 3), {"pad": [0, 1], "mode": "circular"}, "mode 'circular' is not one of"),
    ("cumsum", (2, 3), {"axis": -2}, "axis -2 is not in \\[-1, 1\\]"),
    ("band_part", (6,), {}, "rank 2 or more"),
    ("squeeze", (1, 6), {"axes": [0, 1]}, "axis 1 has size 6, not 1"),
    ("expand_dims", (2, 3), {"axes": [3]}, "axis 3 out of range for rank 3"),
])
def test_layout_op_refuses_bad_parameters_with_one_line(tmp_path, op, shape, params, message):
    with pytest.raises(MILProgramError, match=message):
        run_program(tmp_path, op, {"x": np.ones(shape, np.float16)}, shape, **params)


# -- 3. gather, gather_along_axis, einsum -----------------------------------------------------------------------------


def _int_const(name: str, values: np.ndarray) -> str:
    t = f"tensor<int32, {list(values.shape)}>"
    return (f'        {t} {name} = const()[name=string("{name}"), '
            f'val={t}([{", ".join(str(int(v)) for v in values.ravel())}])];')


GATHERS = [  # x shape, indices shape, axis, batch_dims
    ((6, 5, 4), (3,), 0, 0),
    ((6, 5, 4), (2, 3), 1, 0),
    ((6, 5, 4), (7,), -1, 0),
    ((6, 5, 4), (), 1, 0),
    ((6, 5, 4), (6, 3), 1, 1),
    ((2, 3, 5, 4), (2, 3, 2, 2), 2, 2),
]


@pytest.mark.parametrize("as_input", [True, False], ids=["indices-input", "indices-const"])
@pytest.mark.parametrize("x_shape, idx_shape, axis, batch_dims", GATHERS)
def test_gather_matches_coremltools(tmp_path, rng, coreml, x_shape, idx_shape, axis, batch_dims, as_input):
    """Indices as an int32 function input (bound exactly) or an int32 const, negative ones counted from the end."""
    x = rng.normal(0, 3, x_shape).astype(np.float16)
    size = x_shape[axis]
    indices = rng.integers(-size, size, idx_shape).astype(np.int32)
    params = {"axis": axis, "batch_dims": batch_dims} if batch_dims else {"axis": axis}
    oracle = coreml("gather", x=x.astype(np.float32), indices=indices, **params)
    if as_input:
        got = run_program(tmp_path, "gather", {"x": x, "indices": indices}, oracle.shape, **params)
    else:
        text = program_text("gather", {"x": x}, oracle.shape, **params).replace("x=x", "x=x, indices=idx")
        text = text.replace("    func main<ios18>(tensor<fp16, " + str(list(x_shape)) + "> x) {\n",
                            "    func main<ios18>(tensor<fp16, " + str(list(x_shape)) + "> x) {\n"
                            + _int_const("idx", np.atleast_1d(indices)) + "\n")
        if idx_shape == ():
            text = text.replace("tensor<int32, [1]> idx", "int32 idx").replace("val=tensor<int32, [1]>([", "val=int32(")
            text = text.replace(f"int32({int(indices)}])", f"int32({int(indices)})")
        got = load_text(text, tmp_path).run({"x": x})["out"]
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_along_axis_matches_coremltools(tmp_path, rng, coreml, axis):
    x = rng.normal(0, 3, (4, 5, 6)).astype(np.float16)
    idx_shape = list(x.shape)
    idx_shape[axis] = 3
    size = x.shape[axis]
    indices = rng.integers(-size, size, idx_shape).astype(np.int32)
    oracle = coreml("gather_along_axis", x=x.astype(np.float32), indices=indices, axis=axis)
    got = run_program(tmp_path, "gather_along_axis", {"x": x, "indices": indices}, oracle.shape, axis=axis)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


def test_gather_of_a_computed_index_and_out_of_range_indices(tmp_path, rng):
    """An index computed by an op (held as a whole fp16 value) gathers like an int32 one; an index outside the axis
    is a one-line error naming it."""
    x = rng.normal(0, 3, (6, 4)).astype(np.float16)
    text = ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [6, 4]> x, tensor<int32, [3]> indices) {\n"
            '        tensor<int32, [3]> one = const()[name=string("one"), val=tensor<int32, [3]>([1, 1, 1])];\n'
            '        tensor<int32, [3]> next = add(x=indices, y=one)[name=string("next")];\n'
            '        int32 axis = const()[name=string("axis"), val=int32(0)];\n'
            '        tensor<fp16, [3, 4]> out = gather(axis=axis, indices=next, x=x)[name=string("out")];\n'
            "    } -> (out);\n}\n")
    program = load_text(text, tmp_path)
    np.testing.assert_array_equal(program.run({"x": x, "indices": np.array([0, 4, -3], np.int32)})["out"],
                                  x[[1, 5, -2]])
    with pytest.raises(GraphError, match="gather: index 6 is outside an axis of size 6"):
        program.run({"x": x, "indices": np.array([0, 5, 1], np.int32)})


def test_gather_refuses_float_indices(tmp_path):
    x = np.ones((6, 4), np.float16)
    with pytest.raises(MILProgramError, match="indices must be an integer tensor"):
        run_program(tmp_path, "gather", {"x": x, "indices": np.ones(3, np.float16)}, (3, 4))


EINSUMS = [  # equation, x shape, y shape
    ("nchw,nwhu->nchu", (2, 3, 4, 5), (2, 5, 4, 6)),
    ("nchw,nwhu->nchu", (1, 3, 4, 5), (2, 5, 1, 6)),  # batch axes broadcast
    ("abcd,adce->abce", (2, 3, 4, 5), (2, 5, 4, 6)),  # the same pattern in other letters
    ("chw,whr->chr", (3, 4, 5), (5, 4, 6)),
    ("chw,whr->chr", (3, 1, 5), (5, 4, 6)),
]


@pytest.mark.parametrize("equation, x_shape, y_shape", EINSUMS)
def test_einsum_matches_coremltools(tmp_path, rng, coreml, equation, x_shape, y_shape):
    """Operands on a 2**-8 grid, so that every product lies on the emulated accumulator's 2**-16 grid (N3): what
    remains is the one rounding of each sum, which this compares."""
    x = (rng.integers(-256, 257, x_shape) / 256).astype(np.float16)
    y = (rng.integers(-256, 257, y_shape) / 256).astype(np.float16)
    oracle = coreml("einsum", values=(x.astype(np.float32), y.astype(np.float32)), equation=equation)
    got = run_program(tmp_path, "einsum", {"x": x, "y": y}, oracle.shape, variadic="values", equation=equation)
    assert_within_fp16(got, oracle, what=equation)


@pytest.mark.parametrize("equation", ["nchw,nwhu->nhcu", "ij,jk->ik", "nchw,nwhu"])
def test_einsum_refuses_equations_coremltools_does_not_define(tmp_path, equation):
    x = np.ones((2, 3, 4, 5), np.float16)
    with pytest.raises(MILProgramError, match="is not one coremltools supports"):
        run_program(tmp_path, "einsum", {"x": x, "y": np.ones((2, 5, 4, 6), np.float16)}, (2, 3, 4, 6),
                    variadic="values", equation=equation)


def test_int32_indices_and_layout_ops_through_builder_emitter_and_catalog(tmp_path, rng, coreml):
    """An int32 index const is emitted inline as written; gather, pad and cumsum run from the emitted text, and the
    catalog names each as not known on the ANE (ANE-34)."""
    b = GraphBuilder("gpc")
    x = b.input("x", (1, 6, 1, 16))
    indices = np.array([3, 0, -1], np.int32)
    y = b.gather(x, b.const(indices, "idx"), axis=1)
    b.output("y", b.cumsum(b.pad(y, pad=[1, 2], mode="reflect"), axis=3, reverse=True))
    result = compile_graph(b.graph, target="m4")
    assert "val=tensor<int32, [3]>([3, 0, -1])" in result.module.text
    flagged = {m.split("'")[1] for c, m in ((v.constraint, v.message) for v in result.violations) if c == "ANE-34"}
    assert flagged == {"gather", "pad", "cumsum"}
    result.module.write(tmp_path)
    data = rng.normal(0, 2, (1, 6, 1, 16)).astype(np.float16)
    got = load_text(result.module.text, tmp_path).run({"x": data})["y"]
    gathered = coreml("gather", x=data.astype(np.float32), indices=indices, axis=1).astype(np.float32)
    padded = coreml("pad", x=gathered, pad=np.array([1, 2], np.int32), mode="reflect").astype(np.float32)
    assert_within_fp16(got, coreml("cumsum", x=padded, axis=3, reverse=True), what="gather, pad, cumsum")
