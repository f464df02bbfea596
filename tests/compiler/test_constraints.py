"""The constraint catalog and its checks: one tiny MIL program per rule, built from program.py's dataclasses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from orion.compiler.constraints import (
    CATALOG,
    CATALOG_COLUMNS,
    CATEGORIES,
    CHECKED_AT,
    SEVERITIES,
    Violation,
    check_binding,
    check_program,
    format_catalog,
    raise_on_errors,
)
from orion.compiler.targets import TARGETS, Target, get_target
from orion.errors import ConstraintError
from orion.mil.parse import parse_program
from orion.mil.program import BlobRef, Literal, Program, Statement, TensorType, VarRef

DEFAULT = get_target("default")
M1, M4 = get_target("m1"), get_target("m4")


# --- building programs -------------------------------------------------------------------------------------------


def tt(*shape: int, dtype: str = "fp16") -> TensorType:
    return TensorType(dtype, tuple(shape))


NP = {"bool": np.bool_, "int32": np.int32, "fp16": np.float16, "fp32": np.float32}


def lit(dtype: str, value, shape: tuple[int, ...] = ()) -> Literal:
    if dtype == "string":
        return Literal(TensorType("string"), value)
    return Literal(TensorType(dtype, shape), np.asarray(value, dtype=NP[dtype]).reshape(shape))


def ints(*values: int) -> Literal:
    return lit("int32", list(values), (len(values),))


def blob(shape: tuple[int, ...], path: str, offset: int = 64) -> Literal:
    return Literal(TensorType("fp16", shape), BlobRef(f"@model_path/weights/{path}", offset))


def const(var: str, value: Literal, line: int = 0) -> Statement:
    return Statement(value.type, var, "const", {}, {"name": lit("string", var), "val": value}, line)


def op(type_: TensorType, var: str, name: str, line: int = 0, **args) -> Statement:
    args = {k: VarRef(v) if isinstance(v, str) else v for k, v in args.items()}
    return Statement(type_, var, name, args, {"name": lit("string", var)}, line)


X = tt(1, 768, 1, 32)  # 49,152 bytes in fp16, 64-byte rows


def conv_consts() -> list[Statement]:
    return [
        const("dl", ints(1, 1)),
        const("gr", lit("int32", 1)),
        const("pd", ints(0, 0, 0, 0)),
        const("pt", lit("string", "valid")),
        const("st", ints(1, 1)),
    ]


CONV_PARAMS = dict(dilations="dl", groups="gr", pad="pd", pad_type="pt", strides="st")


def valid_program(version: str = "1.3") -> Program:
    """A conv + bias + written-out attention block that breaks no rule on any profile."""
    statements = [
        *conv_consts(),
        const("W", blob((768, 768, 1, 1), "w.bin")),
        const("b", blob((1, 768, 1, 1), "b.bin")),
        op(X, "y0", "conv", weight="W", x="x", **CONV_PARAMS),
        op(X, "y1", "add", x="y0", y="b"),
        const("sh", ints(1, 12, 64, 32)),
        op(tt(1, 12, 64, 32), "q", "reshape", shape="sh", x="y1"),
        const("tt_", lit("bool", True)),
        const("tf", lit("bool", False)),
        op(tt(1, 12, 32, 32), "s", "matmul", transpose_x="tt_", transpose_y="tf", x="q", y="q"),
        const("ax", lit("int32", -1)),
        op(tt(1, 12, 32, 32), "p", "softmax", axis="ax", x="s"),
        op(tt(1, 12, 64, 32), "o", "matmul", transpose_x="tf", transpose_y="tf", x="q", y="p"),
        const("sh2", ints(1, 768, 1, 32)),
        op(X, "o2", "reshape", shape="sh2", x="o"),
        const("half", lit("fp16", 0.5)),
        op(X, "z", "mul", x="o2", y="half"),
    ]
    return Program(inputs=[("x", X)], statements=statements, outputs=["z"], version=version,
                   opset={"1.0": "ios16", "1.3": "ios18"}[version])


def relu_program(inputs: list[tuple[str, TensorType]], version: str = "1.3") -> Program:
    """relu of each input, each returned: for the I/O rules."""
    statements = [op(t, f"r_{name}", "relu", x=name) for name, t in inputs]
    return Program(inputs=inputs, statements=statements, outputs=[s.var for s in statements], version=version)


def ids(violations: list[Violation]) -> list[str]:
    return [v.constraint for v in violations]


def for_target(target: Target) -> Program:
    return valid_program(target.mil_version)


def with_statements(program: Program, *extra: Statement) -> Program:
    program.statements.extend(extra)
    return program


# --- a valid program -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_program_has_no_violation_on_any_target(name):
    target = get_target(name)
    assert check_program(for_target(target), target) == []


@pytest.mark.parametrize("version", ["1.0", "1.3"])
def test_valid_program_survives_printing_and_parsing(version):
    target = M1 if version == "1.0" else M4
    parsed = parse_program(valid_program(version).to_text())
    assert check_program(parsed, target) == []


# --- one check per rule ----------------------------------------------------------------------------------------------


def concat_statements(**extra_args) -> list[Statement]:
    return [
        const("cax", lit("int32", 1)),
        op(tt(1, 1536, 1, 32), "cat", "concat", axis="cax", values=(VarRef("y0"), VarRef("y1")), **extra_args),
    ]


def test_concat_per_target():
    assert ids(check_program(with_statements(valid_program(), *concat_statements()), DEFAULT)) == ["ANE-01"]
    # interleave targets need the interleave= parameter ...
    assert ids(check_program(with_statements(for_target(M4), *concat_statements()), M4)) == ["ANE-01"]
    with_flag = [const("il", lit("bool", False)), *concat_statements(interleave="il")]
    assert check_program(with_statements(for_target(M4), *with_flag), M4) == []
    # ... and "forbid" rejects even that form, "allow" accepts both.
    assert ids(check_program(with_statements(valid_program(), *with_flag), DEFAULT)) == ["ANE-01"]
    allow = DEFAULT.with_overrides(concat="allow")
    assert check_program(with_statements(valid_program(), *concat_statements()), allow) == []


@pytest.mark.parametrize(
    "op_name, setting, cid",
    [("gelu", "gelu_native", "ANE-10"), ("silu", "silu_native", "ANE-27"), ("rsqrt", "rsqrt_native", "ANE-22")],
)
def test_activations_per_target(op_name, setting, cid):
    def program():
        extra = {"mode": "gm"} if op_name == "gelu" else {}
        statements = [const("gm", lit("string", "TANH_APPROXIMATION"))] if op_name == "gelu" else []
        return with_statements(valid_program(), *statements, op(X, "act", op_name, x="y1", **extra))

    violations = check_program(program(), DEFAULT)
    assert ids(violations) == [cid] and violations[0].severity == "error"
    assert check_program(program(), DEFAULT.with_overrides(**{setting: True})) == []


def test_scaled_dot_product_attention_is_rejected():
    sdpa = op(tt(1, 12, 64, 32), "att", "scaled_dot_product_attention", query="q", key="q", value="q")
    assert ids(check_program(with_statements(valid_program(), sdpa), DEFAULT)) == ["ANE-06"]


def test_ops_outside_the_registry_are_rejected():
    from orion.ir.ops import OPS

    assert "lstm" not in OPS
    violations = check_program(with_statements(valid_program(), op(X, "h", "lstm", x="y1")), DEFAULT)
    assert ids(violations) == ["ANE-34"] and "lstm" in violations[0].message


def test_inline_matmul_flag_names_line_and_statement():
    program = valid_program()
    inline = op(tt(1, 12, 32, 32), "qk", "matmul", line=7, transpose_x="tt_", transpose_y=lit("bool", False),
                x="q", y="q")
    violations = check_program(with_statements(program, inline), DEFAULT)
    assert ids(violations) == ["ANE-12"]
    assert str(violations[0]) == (
        "ANE-12 error at line 7 (matmul 'qk'): transpose_y is an inline literal; fix: emit a named bool const"
    )


def test_inline_matmul_flag_from_parsed_text_reports_the_source_line():
    text = valid_program("1.3").to_text().splitlines()
    # Replace the first matmul's named transpose_y with an inline literal, on its own line of the text.
    row = next(i for i, line in enumerate(text) if " = matmul(" in line)
    text[row] = text[row].replace("transpose_y=tf", "transpose_y=bool(false)")
    violations = check_program(parse_program("\n".join(text)), M4)
    assert ids(violations) == ["ANE-12"]
    assert violations[0].where == f"line {row + 1} (matmul 's')"


@pytest.mark.parametrize(
    "param, literal",
    [
        ("pad_type", lit("string", "valid")),
        ("strides", ints(1, 1)),
        ("pad", ints(0, 0, 0, 0)),
        ("dilations", ints(1, 1)),
        ("groups", lit("int32", 1)),
    ],
)
def test_inline_conv_parameters_are_rejected(param, literal):
    params = {**CONV_PARAMS, param: literal}
    conv = op(X, "c2", "conv", weight="W", x="y1", **params)
    violations = check_program(with_statements(valid_program(), conv), DEFAULT)
    assert ids(violations) == ["ANE-32"] and param in violations[0].message


def test_conv_bias_is_rejected():
    conv = op(X, "c2", "conv", weight="W", x="y1", bias="b", **CONV_PARAMS)
    assert ids(check_program(with_statements(valid_program(), conv), DEFAULT)) == ["ANE-13"]


@pytest.mark.parametrize("offset, ok", [(0, False), (32, False), (65, False), (128 + 1, False), (64, True)])
def test_blobfile_offset_must_be_a_record_offset(offset, ok):
    program = with_statements(valid_program(), const("W2", blob((1, 768, 1, 1), "w2.bin", offset)))
    assert ids(check_program(program, DEFAULT)) == ([] if ok else ["ANE-08"])


def test_later_blob_offsets_are_fine_where_files_may_hold_several():
    # Record offsets of a file with blobs of 64 and 128 bytes: 64, 64+64+64, 192+64+128.
    stmts = [const(f"v{i}", blob((1, 32, 1, 1) if i < 2 else (1, 64, 1, 1), "pack.bin", off))
             for i, off in enumerate((64, 192, 384))]
    assert check_program(with_statements(for_target(M4), *stmts), M4) == []
    violations = check_program(with_statements(for_target(M1), *stmts), M1)
    assert ids(violations) == ["ANE-28"] and "pack.bin" in violations[0].where


def test_a_lone_blob_away_from_offset_64_means_a_shared_file_on_m1():
    program = with_statements(for_target(M1), const("W2", blob((1, 768, 1, 1), "w2.bin", 128)))
    assert ids(check_program(program, M1)) == ["ANE-28"]


def small_blobs(n: int) -> list[Statement]:
    return [const(f"k{i}", blob((1, 768, 1, 1), f"k{i}.bin")) for i in range(n)]


def test_weight_tensor_limit_counts_blobs_and_float_constant_operands():
    # valid_program holds 2 blobs and reads one named fp16 scalar (half): 3 of the 16 weight tensors. Its int and
    # bool parameters (groups, axis, transpose flags) take no slot.
    assert check_program(with_statements(valid_program(), *small_blobs(13)), DEFAULT) == []
    violations = check_program(with_statements(valid_program(), *small_blobs(14)), DEFAULT)
    assert ids(violations) == ["ANE-21"] and "17 weight tensors (16 BLOBFILE constants + 1" in violations[0].message
    # a second read of the same named scalar takes no new slot, nor does a scalar nobody reads
    again = [op(X, "again", "mul", x="z", y="half"), const("unread", lit("fp16", 3.0))]
    assert check_program(with_statements(valid_program(), *small_blobs(13), *again), DEFAULT) == []
    per_use = DEFAULT.with_overrides(shared_scalar_slots="per-use")  # where orion doctor finds each read costs one
    assert check_program(with_statements(valid_program(), *small_blobs(13)), per_use) == []
    violations = check_program(with_statements(valid_program(), *small_blobs(13), *again), per_use)
    assert ids(violations) == ["ANE-21"] and "17 weight tensors (15 BLOBFILE constants + 2" in violations[0].message
    # another named scalar (fp16 or fp32), or an inline one, takes a slot each
    for extra in ([const("eps", lit("fp16", 1e-5)), op(X, "e", "add", x="y1", y="eps")],
                  [const("eps", lit("fp32", 1e-5)), op(TensorType("fp32"), "e", "add", x="eps", y="eps")],
                  [op(X, "inl", "pow", x="y1", y=lit("fp16", -0.5))]):
        assert ids(check_program(with_statements(valid_program(), *small_blobs(13), *extra), DEFAULT)) == ["ANE-21"]
    inline_twice = [op(X, "i1", "add", x="y1", y=lit("fp16", 1.0)), op(X, "i2", "add", x="i1", y=lit("fp16", 1.0))]
    assert check_program(with_statements(valid_program(), *small_blobs(12), inline_twice[0]), DEFAULT) == []
    assert ids(check_program(with_statements(valid_program(), *small_blobs(12), *inline_twice), DEFAULT)) == \
        ["ANE-21"]
    unlimited = DEFAULT.with_overrides(max_blob_constants=None)
    assert check_program(with_statements(valid_program(), *small_blobs(40)), unlimited) == []


def test_returned_names_must_be_defined():
    program = valid_program()
    program.outputs.append("ghost")
    violations = check_program(program, DEFAULT)
    assert ids(violations) == ["ANE-14"] and violations[0].where == "output 'ghost'"


def test_io_dtypes_fp16_fp32_only():
    program = valid_program()
    program.inputs.append(("idx", tt(1, 384, 1, 32, dtype="int32")))  # same 49,152 bytes as x
    assert ids(check_program(program, DEFAULT)) == ["ANE-23"]
    program = with_statements(valid_program(), const("bft", lit("string", "bf16")),
                              op(tt(1, 768, 1, 32, dtype="bf16"), "zb", "cast", dtype="bft", x="z"))
    program.outputs.append("zb")
    violations = check_program(program, DEFAULT)  # nor is bf16 a type MIL's cast or the emulator takes: ANE-38
    assert sorted(ids(violations)) == ["ANE-23", "ANE-38", "ANE-38"]
    assert [v.where for v in violations if v.constraint == "ANE-23"] == ["output 'zb'"]


def test_rank_above_five_is_rejected():
    reshape = [const("s6", ints(1, 1, 768, 1, 1, 32)), op(tt(1, 1, 768, 1, 1, 32), "r6", "reshape", shape="s6", x="y1")]
    assert ids(check_program(with_statements(valid_program(), *reshape), DEFAULT)) == ["ANE-24"]


@pytest.mark.parametrize("extent, older, newer", [(16384, True, True), (16385, False, True), (65537, False, False)])
def test_per_axis_limit(extent, older, newer):
    def program(target):
        return with_statements(for_target(target), const("E", blob((1, extent, 1, 1), "e.bin")))

    assert ids(check_program(program(M1), M1)) == ([] if older else ["ANE-25"])
    assert ids(check_program(program(M4), M4)) == ([] if newer else ["ANE-25"])


def test_conv_input_channels_limit_applies_to_inputs_only():
    wide = [const("s1", ints(1, 24576, 1, 1)), op(tt(1, 24576, 1, 1), "flat", "reshape", shape="s1", x="y1")]
    conv_in = op(tt(1, 16, 1, 1), "cin", "conv", weight="Wi", x="flat", **CONV_PARAMS)
    program = with_statements(for_target(M4), *wide, const("Wi", blob((16, 24576, 1, 1), "wi.bin")), conv_in)
    violations = check_program(program, M4)
    assert ids(violations) == ["ANE-16"] and "24576" in violations[0].message
    assert check_program(program, M4.with_overrides(max_conv_input_channels=32768)) == []
    # 24,576 OUTPUT channels compile (maderix's 32K-output conv).
    conv_out = op(tt(1, 24576, 1, 32), "cout", "conv", weight="Wo", x="y1", **CONV_PARAMS)
    program = with_statements(for_target(M4), const("Wo", blob((24576, 768, 1, 1), "wo.bin")), conv_out)
    assert check_program(program, M4) == []


@pytest.mark.parametrize("transpose_x, inner", [("tt_", 24), ("tf", 32)])
def test_matmul_inner_dimension_multiple_of_32(transpose_x, inner):
    # a: [1, 32, 24, 32]; with transpose_x the contraction runs over the 24-axis.
    stmts = [
        const("sa", ints(1, 32, 24, 32)),
        op(tt(1, 32, 24, 32), "a", "reshape", shape="sa", x="y1"),
        op(tt(1, 32, 32, 32) if inner == 24 else tt(1, 32, 24, 24), "m", "matmul",
           transpose_x=transpose_x, transpose_y="tt_" if inner == 32 else "tf", x="a", y="a"),
    ]
    violations = check_program(with_statements(valid_program(), *stmts), DEFAULT)
    if inner % 32:
        assert ids(violations) == ["ANE-26"] and violations[0].severity == "warning"
        assert "24" in violations[0].message
    else:
        assert violations == []


def test_matmul_with_a_constant_operand_suggests_conv():
    stmts = [const("Wm", blob((1, 12, 32, 64), "wm.bin")),
             op(tt(1, 12, 32, 32), "mw", "matmul", transpose_x="tf", transpose_y="tf", x="Wm", y="q")]
    violations = check_program(with_statements(valid_program(), *stmts), DEFAULT)
    assert ids(violations) == ["ANE-17"] and violations[0].severity == "warning"


@pytest.mark.parametrize(
    "begin, mask, shape, flagged",
    [((0, 0, 0, 16), None, (1, 768, 1, 16), True), ((0, 16, 0, 0), None, (1, 752, 1, 32), False),
     ((0, 0, 0, 16), (False, False, False, True), (1, 768, 1, 32), False)],
)
def test_slice_offset_overflow_on_the_last_axis(begin, mask, shape, flagged):
    def program(target):
        stmts = [const("bg", ints(*begin)), const("en", ints(1, 768, 1, 32))]
        args = dict(begin="bg", end="en", x="y1")
        if mask is not None:
            stmts.append(const("bm", lit("bool", list(mask), (4,))))
            args["begin_mask"] = "bm"
        return with_statements(for_target(target), *stmts, op(tt(*shape), "sl", "slice_by_index", **args))

    violations = check_program(program(M1), M1)
    assert ids(violations) == (["ANE-29"] if flagged else [])
    assert all(v.severity == "warning" for v in violations)
    assert check_program(program(M4), M4) == []


def test_slice_by_size_is_checked_too():
    stmts = [const("bg", ints(0, 0, 0, 8)), const("sz", ints(1, 768, 1, 16)),
             op(tt(1, 768, 1, 16), "sl", "slice_by_size", begin="bg", size="sz", x="y1")]
    assert ids(check_program(with_statements(for_target(M1), *stmts), M1)) == ["ANE-29"]


def test_dialect_must_match_the_target():
    violations = check_program(valid_program("1.3"), M1)
    assert ids(violations) == ["ANE-30"] and "1.0" in violations[0].fix
    assert ids(check_program(valid_program("1.0"), M4)) == ["ANE-30"]


# --- I/O rules at compile time: notes for the binding planner ---------------------------------------------------------


def test_io_size_differences_are_binding_warnings():
    program = relu_program([("a", tt(1, 768, 1, 32)), ("b", tt(1, 768, 1, 64))])
    violations = check_program(program, DEFAULT)
    assert sorted(ids(violations)) == ["ANE-02", "ANE-18"]
    assert all(v.severity == "warning" for v in violations)
    assert "98304" in violations[0].fix or "98304" in violations[1].fix


def test_small_io_tensors_are_binding_warnings():
    violations = check_program(relu_program([("x", tt(1, 768, 1, 1))]), DEFAULT)
    # 1,536 bytes (a decode step of one token: known to fail), and a 2-byte last axis; input and output each.
    assert sorted(ids(violations)) == ["ANE-04", "ANE-04", "ANE-35", "ANE-35"]
    assert all(v.severity == "warning" for v in violations)
    assert check_program(relu_program([("x", tt(1, 768, 1, 32))]), DEFAULT) == []


def test_io_rows_should_be_multiples_of_64_bytes():
    program = relu_program([("x", tt(1, 1536, 1, 16))])  # 49,152 bytes, 32-byte rows
    assert ids(check_program(program, DEFAULT)) == ["ANE-35", "ANE-35"]
    assert check_program(program, DEFAULT.with_overrides(io_row_align_bytes=None)) == []


def test_fp32_inputs_need_a_cast_first():
    xf = tt(1, 768, 1, 16, dtype="fp32")
    used = Program(inputs=[("xf", xf)], statements=[op(xf, "r", "relu", x="xf")], outputs=["r"], version="1.3")
    violations = check_program(used, M4)
    assert ids(violations) == ["ANE-33"] and "relu 'r'" in violations[0].message
    cast = Program(
        inputs=[("xf", xf)],
        statements=[const("d", lit("string", "fp16")), op(tt(1, 768, 1, 16), "h", "cast", dtype="d", x="xf"),
                    op(tt(1, 768, 1, 16), "r", "relu", x="h"), const("d32", lit("string", "fp32")),
                    op(xf, "out", "cast", dtype="d32", x="r")],
        outputs=["out"],
        version="1.3",
    )
    assert check_program(cast, M4) == []


def test_fp32_inputs_and_outputs_are_rejected_where_the_profile_says_so():
    """Orion-fork (2026-09-06): M1 rejects fp32 program inputs and outputs; default takes that side, M4 takes fp32."""
    xf = tt(1, 768, 1, 16, dtype="fp32")

    def program(target: Target) -> Program:
        return Program(
            inputs=[("xf", xf)],
            statements=[const("d", lit("string", "fp16")), op(tt(1, 768, 1, 16), "h", "cast", dtype="d", x="xf"),
                        const("d32", lit("string", "fp32")), op(xf, "out", "cast", dtype="d32", x="h")],
            outputs=["out"], version=target.mil_version, opset={"1.0": "ios16", "1.3": "ios18"}[target.mil_version],
        )

    assert check_program(program(M4), M4) == []
    for target in (DEFAULT, M1, get_target("m2")):
        violations = check_program(program(target), target)
        assert ids(violations) == ["ANE-23", "ANE-23"], target.name
        assert {v.where for v in violations} == {"input 'xf'", "output 'out'"}
        assert all("fp32 is not one of fp16" in v.message for v in violations)


# --- binding ----------------------------------------------------------------------------------------------------------


def test_check_binding():
    assert check_binding({"a": 49152, "b": 49152}, {"y": 65536}, DEFAULT) == []
    violations = check_binding({"a": 49152, "b": 98304}, {"y": 49152, "z": 65536}, DEFAULT)
    assert sorted(ids(violations)) == ["ANE-02", "ANE-18"]
    assert all(v.severity == "error" for v in violations)
    by_id = {v.constraint: v for v in violations}
    assert "98304" in by_id["ANE-18"].fix and "65536" in by_id["ANE-02"].fix
    small = check_binding({"x": 3072}, {"y": 3072}, DEFAULT)
    assert ids(small) == ["ANE-04", "ANE-04"] and {v.where for v in small} == {"input 'x'", "output 'y'"}
    assert check_binding({"x": 3072}, {"y": 3072}, DEFAULT.with_overrides(min_surface_bytes=2048)) == []


# --- violations and errors -----------------------------------------------------------------------------------------


def test_violation_str_without_a_place():
    v = Violation("ANE-21", "error", "", "too many", "split")
    assert str(v) == "ANE-21 error: too many; fix: split"


def test_raise_on_errors_raises_only_for_errors():
    warning = Violation("ANE-26", "warning", "matmul 'm'", "inner dimension 24", "pad")
    error = Violation("ANE-13", "error", "conv 'c'", "bias", "add")
    raise_on_errors([warning])
    with pytest.raises(ConstraintError) as err:
        raise_on_errors([warning, error])
    assert err.value.violations == [error]
    assert str(error) in str(err.value)


def test_a_real_error_program_raises():
    conv = op(X, "c2", "conv", weight="W", x="y1", bias="b", **CONV_PARAMS)
    with pytest.raises(ConstraintError, match="ANE-13"):
        raise_on_errors(check_program(with_statements(valid_program(), conv), DEFAULT))


# --- the catalog ------------------------------------------------------------------------------------------------------


def test_catalog_ids_are_unique_ordered_and_complete():
    keys = list(CATALOG)
    assert keys == [f"ANE-{i:02d}" for i in range(1, len(keys) + 1)]
    assert all(key == c.id for key, c in CATALOG.items())
    assert len(keys) >= 30


def test_catalog_entries_are_filled_in():
    target_fields = {f.name for f in dataclasses.fields(Target)}
    for c in CATALOG.values():
        for f in ("id", "title", "category", "symptom", "fix", "source", "checked_at", "severity"):
            assert isinstance(getattr(c, f), str) and getattr(c, f).strip(), (c.id, f)
        assert c.category in CATEGORIES and c.checked_at in CHECKED_AT and c.severity in SEVERITIES, c.id
        if c.setting is not None:
            assert c.setting in target_fields, c.id
        if c.conflict is not None:
            assert c.conflict == c.setting, c.id
        if c.checked_at == "not-checkable":
            assert "by construction" in c.fix or "nothing" in c.fix or "runtime" in c.fix, c.id


def test_orion_table_3_numbers_are_kept():
    # Keywords of the paper's Table 3 rows, as the reference lists them.
    table3 = {
        1: "concat", 2: "outputs", 3: "outputs", 4: "minimum", 5: "119", 6: "causal", 7: "baked", 8: "offset",
        9: "NSData", 10: "gelu", 11: "dict", 12: "transpose", 13: "bias", 14: "return", 15: "re-exec", 16: "input",
        17: "1x1", 18: "inputs", 19: "inputs", 20: "packed",
    }
    for number, keyword in table3.items():
        entry = CATALOG[f"ANE-{number:02d}"]
        assert keyword.lower() in entry.title.lower(), entry.id
        assert f"#{number}" in entry.source, entry.id


def test_every_conflict_of_the_reference_maps_to_a_target_field():
    # The reference's CONFLICT items: concat (#1), gelu (#10), silu (section 3), reloading weights (section 2, #7).
    expected = {"ANE-01": "concat", "ANE-07": "weight_update", "ANE-10": "gelu_native", "ANE-27": "silu_native"}
    assert {c.id: c.conflict for c in CATALOG.values() if c.conflict} == expected


def test_later_reports_are_in_the_catalog():
    titles = " | ".join(c.title.lower() for c in CATALOG.values())
    for fact in ("16 weight tensors", "a scalar", "rsqrt", "fp16 or fp32", "m1 rejects fp32", "rank at most 5",
                 "per-axis", "multiple of 32", "silu", "one blob per weight file", "slice", "dialect", "32768"):
        assert fact in titles, fact
    # the replication of 2026-09-06 is named as the source of each of its facts
    for cid in ("ANE-21", "ANE-22", "ANE-23"):
        assert "HiQS-Labs/Orion-fork test results of 2026-09-06 (M1 Pro, M4 Pro)" in CATALOG[cid].source, cid


def test_format_catalog_rows():
    rows = format_catalog()
    assert len(rows) == len(CATALOG) and all(len(r) == len(CATALOG_COLUMNS) for r in rows)
    assert [r[0] for r in rows] == list(CATALOG)
    m1_rows = {r[0]: r for r in format_catalog(M1)}
    assert m1_rows["ANE-01"][5] == "concat='forbid' (CONFLICT)"
    assert m1_rows["ANE-25"][5] == "max_axis=16384"
    assert m1_rows["ANE-06"][5] == ""


def test_integer_casts_inside_a_program_are_flagged_unverified():
    program = with_statements(valid_program(), const("to_int", lit("string", "int32")),
                              op(tt(1, 768, 1, 32, dtype="int32"), "zi", "cast", dtype="to_int", x="z"),
                              const("to_half", lit("string", "fp16")),
                              op(tt(1, 768, 1, 32), "zh", "cast", dtype="to_half", x="zi"))
    violations = check_program(program, DEFAULT)
    assert ids(violations) == ["ANE-39"] and violations[0].severity == "warning" and "'zi'" in violations[0].where
    assert "unverified" in CATALOG["ANE-39"].source
