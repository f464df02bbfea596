"""Tests of the MIL text parser: hand-written programs in the styles public ANE projects write, round trips through
the printer in both dialects, error positions, unsafe blob paths, and random programs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orion.errors import MILProgramError, MILSyntaxError, UnsafePathError
from orion.mil.parse import parse_program, resolve_blob_path
from orion.mil.program import (
    DEFAULT_BUILD_INFO,
    DIALECTS,
    NUMPY_DTYPES,
    BlobRef,
    Literal,
    Program,
    Statement,
    TensorType,
    VarRef,
    format_argument,
)

# ---------------------------------------------------------------------------------------------------------------------
# Comparison: by value and bit pattern, ignoring source lines (a program built in Python has line 0).


def same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    return type(a) is type(b) and a == b


def same_argument(a, b) -> bool:
    if isinstance(a, Literal) and isinstance(b, Literal):
        return a.type == b.type and same_value(a.value, b.value)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_argument(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def same_named(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(same_argument(a[k], b[k]) for k in a)


def assert_same_program(got: Program, want: Program, *, compare_dialect: bool = True) -> None:
    assert got.inputs == want.inputs
    assert got.outputs == want.outputs
    assert got.function == want.function
    assert got.build_info == want.build_info
    if compare_dialect:
        assert (got.version, got.opset) == (want.version, want.opset)
    assert len(got.statements) == len(want.statements)
    for g, w in zip(got.statements, want.statements):
        assert (g.type, g.var, g.op, g.more_outputs) == (w.type, w.var, w.op, w.more_outputs)
        assert same_named(g.args, w.args), (g.args, w.args)
        assert same_named(g.attrs, w.attrs), (g.attrs, w.attrs)


def lit(dtype: str, value, shape=None) -> Literal:
    """A literal built independently of the parser: numpy converts the Python value."""
    if dtype == "string" or isinstance(value, BlobRef):
        return Literal(TensorType(dtype, tuple(shape or ())), value)
    array = np.array(value, dtype=NUMPY_DTYPES[dtype])
    return Literal(TensorType(dtype, array.shape if shape is None else tuple(shape)), array)


def s(text: str) -> Literal:
    return Literal(TensorType("string"), text)


F16 = "fp16"
X4 = TensorType(F16, (1, 4, 1, 8))

# ---------------------------------------------------------------------------------------------------------------------
# Hand-written programs in the styles seen in public ANE projects


COMPACT_13 = """\
program(1.3)
[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}, \
{"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {
        tensor<fp16, [1,4,1,8]> sq = mul(x=x,y=x)[name=string("sq")];
        tensor<int32, [1]> raxCh = const()[name=string("rax_ch"), val=tensor<int32, [1]>([1])];
        bool kd = const()[name=string("kd"), val=bool(true)];
        tensor<fp16, [1,1,1,8]> ss = reduce_sum(x=sq,axes=raxCh,keep_dims=kd)[name=string("ss")];
        fp16 eps = const()[name=string("eps"), val=fp16(0.00001)];
        tensor<fp16, [1,1,1,8]> ss2 = add(x=ss,y=eps)[name=string("ss2")];
        fp16 nhalf = const()[name=string("nhalf"), val=fp16(-0.5)];
        tensor<fp16, [1,1,1,8]> rrms = pow(x=ss2,y=nhalf)[name=string("rrms")];
        tensor<fp16, [1,4,1,8]> xr = mul(x=x,y=rrms)[name=string("xr")];
        string pt = const()[name=string("pt"), val=string("valid")];
        tensor<int32, [2]> st = const()[name=string("st"), val=tensor<int32, [2]>([1,1])];
        tensor<int32, [4]> pd = const()[name=string("pd"), val=tensor<int32, [4]>([0,0,0,0])];
        tensor<int32, [2]> dl = const()[name=string("dl"), val=tensor<int32, [2]>([1,1])];
        int32 gr = const()[name=string("gr"), val=int32(1)];
        tensor<fp16, [4, 4, 1, 1]> W = const()[name=string("W"), \
val=tensor<fp16, [4, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/wq.bin"), offset=uint64(64)))];
        tensor<fp16, [1, 4, 1, 8]> qf = conv(dilations=dl, groups=gr, pad=pd, pad_type=pt, strides=st, weight=W, \
x=xr)[name=string("cq")];
    } -> (qf);
}
"""


def compact_13_expected() -> Program:
    one = TensorType(F16, (1, 1, 1, 8))
    st_ = [
        Statement(X4, "sq", "mul", {"x": VarRef("x"), "y": VarRef("x")}, {"name": s("sq")}),
        Statement(TensorType("int32", (1,)), "raxCh", "const", {}, {"name": s("rax_ch"), "val": lit("int32", [1])}),
        Statement(TensorType("bool"), "kd", "const", {}, {"name": s("kd"), "val": lit("bool", True)}),
        Statement(one, "ss", "reduce_sum", {"x": VarRef("sq"), "axes": VarRef("raxCh"), "keep_dims": VarRef("kd")},
                  {"name": s("ss")}),
        # 1e-5 is the fp16 subnormal 168 * 2**-24 (bit pattern 0x00A8)
        Statement(TensorType(F16), "eps", "const", {},
                  {"name": s("eps"), "val": Literal(TensorType(F16), np.array(0x00A8, np.uint16).view(np.float16))}),
        Statement(one, "ss2", "add", {"x": VarRef("ss"), "y": VarRef("eps")}, {"name": s("ss2")}),
        Statement(TensorType(F16), "nhalf", "const", {}, {"name": s("nhalf"), "val": lit(F16, -0.5)}),
        Statement(one, "rrms", "pow", {"x": VarRef("ss2"), "y": VarRef("nhalf")}, {"name": s("rrms")}),
        Statement(X4, "xr", "mul", {"x": VarRef("x"), "y": VarRef("rrms")}, {"name": s("xr")}),
        Statement(TensorType("string"), "pt", "const", {}, {"name": s("pt"), "val": s("valid")}),
        Statement(TensorType("int32", (2,)), "st", "const", {}, {"name": s("st"), "val": lit("int32", [1, 1])}),
        Statement(TensorType("int32", (4,)), "pd", "const", {}, {"name": s("pd"), "val": lit("int32", [0, 0, 0, 0])}),
        Statement(TensorType("int32", (2,)), "dl", "const", {}, {"name": s("dl"), "val": lit("int32", [1, 1])}),
        Statement(TensorType("int32"), "gr", "const", {}, {"name": s("gr"), "val": lit("int32", 1)}),
        Statement(TensorType(F16, (4, 4, 1, 1)), "W", "const", {},
                  {"name": s("W"), "val": lit(F16, BlobRef("@model_path/weights/wq.bin", 64), (4, 4, 1, 1))}),
        Statement(X4, "qf", "conv",
                  {"dilations": VarRef("dl"), "groups": VarRef("gr"), "pad": VarRef("pd"), "pad_type": VarRef("pt"),
                   "strides": VarRef("st"), "weight": VarRef("W"), "x": VarRef("xr")},
                  {"name": s("cq")}),
    ]
    return Program([("x", X4)], st_, ["qf"], "1.3", "ios18", "main", dict(DEFAULT_BUILD_INFO))


VERBOSE_10 = """\
program(1.0)
[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios16>(tensor<fp16, [1, 4, 1, 8]> a, tensor<fp16, [1, 4, 1, 8]> b) {
        tensor<bool, []> ff = const()[name = tensor<string, []>("ff"), val = tensor<bool, []>(false)];
        tensor<fp16, [1, 4, 8, 8]> mm = matmul(transpose_x = ff, transpose_y = ff, x = a, y = b)\
[name = tensor<string, []>("mm")];
        tensor<int32, []> ax = const()[name = tensor<string, []>("ax"), val = tensor<int32, []>(-1)];
        tensor<fp16, [1, 4, 8, 8]> sm = softmax(axis = ax, x = mm)[name = tensor<string, []>("sm")];
        tensor<fp16, []> sc = const()[name = tensor<string, []>("sc"), val = tensor<fp16, []>(0.125)];
        tensor<fp16, [4, 4, 1, 1]> W = const()[name = tensor<string, []>("W"), val = tensor<fp16, [4, 4, 1, 1]>\
(BLOBFILE(path = tensor<string, []>("@model_path/weights/weight.bin"), offset = tensor<uint64, []>(128)))];
        tensor<fp16, [1, 4, 8, 8]> y = mul(x = sm, y = sc)[name = tensor<string, []>("y")];
    } -> (y, mm);
}
"""


def verbose_10_expected() -> Program:
    mm_t = TensorType(F16, (1, 4, 8, 8))
    st_ = [
        Statement(TensorType("bool"), "ff", "const", {}, {"name": s("ff"), "val": lit("bool", False)}),
        Statement(mm_t, "mm", "matmul", {"transpose_x": VarRef("ff"), "transpose_y": VarRef("ff"), "x": VarRef("a"),
                                         "y": VarRef("b")}, {"name": s("mm")}),
        Statement(TensorType("int32"), "ax", "const", {}, {"name": s("ax"), "val": lit("int32", -1)}),
        Statement(mm_t, "sm", "softmax", {"axis": VarRef("ax"), "x": VarRef("mm")}, {"name": s("sm")}),
        Statement(TensorType(F16), "sc", "const", {}, {"name": s("sc"), "val": lit(F16, 0.125)}),
        Statement(TensorType(F16, (4, 4, 1, 1)), "W", "const", {},
                  {"name": s("W"), "val": lit(F16, BlobRef("@model_path/weights/weight.bin", 128), (4, 4, 1, 1))}),
        Statement(mm_t, "y", "mul", {"x": VarRef("sm"), "y": VarRef("sc")}, {"name": s("y")}),
    ]
    return Program([("a", X4), ("b", X4)], st_, ["y", "mm"], "1.0", "ios16", "main",
                   {"coremlc-version": "3505.4.1"})


# Loose hand-written style: no build info, params over several lines, no spaces or many spaces, statements without
# attributes, inline literal arguments, a tuple argument, comments, a name attribute differing from the variable.
LOOSE = """program(1.3){
  func encoder_block<ios17>(
      tensor<fp16,[1,4,1,8]> x ,
      tensor<fp32, [2]>y
  ) {
    // a comment on its own line
    tensor<fp16,[1,8,1,8]>cat=concat(values=(x,x),axis=int32(1),interleave=bool(false))   ;
    tensor<fp16,[1,8,1,8]> r = relu( x = cat ) [ name = string( "relu_0" ) ] ;  // trailing comment
    tensor<fp16, [1, 2, 4, 8]> rs = reshape(shape = tensor<int32, [4]>([1, 2, 4, 8]), x = r)[];
    tensor<fp32,[2]> z=sub(x=y,y=tensor<fp32, [2]>([0x1.8p+1, -1e4]));
  } -> (rs,z);
}"""


def loose_expected() -> Program:
    st_ = [
        Statement(TensorType(F16, (1, 8, 1, 8)), "cat", "concat",
                  {"values": (VarRef("x"), VarRef("x")), "axis": lit("int32", 1), "interleave": lit("bool", False)}),
        Statement(TensorType(F16, (1, 8, 1, 8)), "r", "relu", {"x": VarRef("cat")}, {"name": s("relu_0")}),
        Statement(TensorType(F16, (1, 2, 4, 8)), "rs", "reshape",
                  {"shape": lit("int32", [1, 2, 4, 8]), "x": VarRef("r")}),
        Statement(TensorType("fp32", (2,)), "z", "sub", {"x": VarRef("y"), "y": lit("fp32", [3.0, -10000.0])}),
    ]
    return Program([("x", X4), ("y", TensorType("fp32", (2,)))], st_, ["rs", "z"], "1.3", "ios17",
                   "encoder_block", {})


@pytest.mark.parametrize(
    "text, expected",
    [(COMPACT_13, compact_13_expected), (VERBOSE_10, verbose_10_expected), (LOOSE, loose_expected)],
    ids=["compact-1.3", "verbose-1.0", "loose"],
)
def test_hand_written_programs(text, expected):
    assert_same_program(parse_program(text), expected())


def test_statement_lines_are_source_lines():
    program = parse_program(COMPACT_13)
    lines = COMPACT_13.splitlines()
    for st_ in program.statements:
        assert re.search(rf"\b{st_.var} = ", lines[st_.line - 1])
    assert [st.line for st in parse_program(LOOSE).statements] == [7, 8, 9, 10]


def test_name_attribute_may_differ_from_variable():
    statement = parse_program(COMPACT_13).statement("qf")
    assert statement.name == "cq" and statement.var == "qf"


def test_zero_parameters_and_empty_build_info():
    text = """program(1.0)
[buildInfo = dict<string, string>({})]
{
    func main<ios16>() {
        tensor<fp16, [2]> c = const()[val = tensor<fp16, [2]>([1, 2])];
    } -> (c);
}
"""
    program = parse_program(text)
    assert program.inputs == [] and program.build_info == {} and program.outputs == ["c"]
    assert same_value(program.statement("c").const_value, np.array([1, 2], np.float16))


# ---------------------------------------------------------------------------------------------------------------------
# Literals


def _const_value(literal_text: str, type_text: str) -> Literal:
    body = f"  {type_text} v = const()[val={literal_text}];\n"
    text = f"program(1.3)\n{{\n func main<ios18>() {{\n{body} }} -> (v);\n}}\n"
    return parse_program(text).statement("v").attrs["val"]


F16_MAX_BITS = np.array(0x7BFF, np.uint16).view(np.float16)


@pytest.mark.parametrize(
    "literal_text, type_text, expected",
    [
        ("fp16(0.00001)", "fp16", Literal(TensorType(F16), np.array(0x00A8, np.uint16).view(np.float16))),
        ("fp32(-1e4)", "fp32", lit("fp32", -10000.0)),
        ("fp32(0x1p-149)", "fp32", lit("fp32", np.finfo(np.float32).smallest_subnormal)),
        ("fp16(0x1.6ap-3)", "fp16", lit(F16, 0.1767578125)),
        ("fp16(-0x1P+0)", "fp16", lit(F16, -1.0)),
        ("fp16(65504)", "fp16", Literal(TensorType(F16), F16_MAX_BITS)),
        ("fp16(-inf)", "fp16", lit(F16, -math.inf)),
        ("fp16(inf)", "fp16", lit(F16, math.inf)),
        ("fp32(+inf)", "fp32", lit("fp32", math.inf)),
        ("fp16(-0.0)", "fp16", Literal(TensorType(F16), np.array(0x8000, np.uint16).view(np.float16))),
        ("fp32(.5)", "fp32", lit("fp32", 0.5)),
        ("fp32(3.)", "fp32", lit("fp32", 3.0)),
        ("int32(1)", "int32", lit("int32", 1)),
        ("int32(-2147483648)", "int32", lit("int32", -(2**31))),
        ("int8(-128)", "int8", lit("int8", -128)),
        ("uint64(64)", "uint64", lit("uint64", 64)),
        ("uint64(18446744073709551615)", "uint64", lit("uint64", 2**64 - 1)),
        ("bool(true)", "bool", lit("bool", True)),
        ('string("valid")', "string", s("valid")),
        ('string("")', "string", s("")),
        (r'string("a \"q\" b\\c")', "string", s('a "q" b\\c')),
        ('string("ünï")', "string", s("ünï")),
        ("tensor<fp16, []>(0.5)", "tensor<fp16, []>", lit(F16, 0.5)),
        ('tensor<string, []>("x")', "tensor<string, []>", s("x")),
        ("tensor<bool, []>(false)", "tensor<bool, []>", lit("bool", False)),
        ("tensor<int32, [4]>([0,1,3,2])", "tensor<int32, [4]>", lit("int32", [0, 1, 3, 2])),
        ("tensor<bool,[3]>([true,false, true])", "tensor<bool, [3]>", lit("bool", [True, False, True])),
        ("tensor<fp32, [2, 2]>([1.5, -2e-3, 7, -inf])", "tensor<fp32, [2, 2]>",
         lit("fp32", [[1.5, -2e-3], [7, -math.inf]])),
        ("tensor<int32, [1, 1, 1, 1, 2]>([5, -6])", "tensor<int32, [1,1,1,1,2]>", lit("int32", [[[[[5, -6]]]]])),
        ("tensor<fp32, [0]>([])", "tensor<fp32, [0]>", lit("fp32", np.zeros(0))),
        ('tensor<fp16, [8, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/wq.bin"), offset=uint64(64)))',
         "tensor<fp16, [8, 4, 1, 1]>", lit(F16, BlobRef("@model_path/weights/wq.bin", 64), (8, 4, 1, 1))),
        ('tensor<fp16, [2]>(BLOBFILE(offset = tensor<uint64, []>(192), '
         'path = tensor<string, []>("@model_path/w.bin")))',
         "tensor<fp16, [2]>", lit(F16, BlobRef("@model_path/w.bin", 192), (2,))),
    ],
)
def test_literal_values(literal_text, type_text, expected):
    got = _const_value(literal_text, type_text)
    assert got.type == expected.type
    assert same_value(got.value, expected.value), (got.value, expected.value)


def _operand(arg_text: str) -> Literal:
    text = ("program(1.3)\n{\n func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {\n"
            f"  tensor<fp16, [1, 4, 8, 1]> y = reshape(shape = {arg_text}, x = x);\n }} -> (y);\n}}\n")
    return parse_program(text).statement("y").args["shape"]


@pytest.mark.parametrize(
    "untyped, typed",
    [
        ("[1, 4, 8, 1]", "tensor<int32, [4]>([1, 4, 8, 1])"),
        ("[-1]", "tensor<int32, [1]>([-1])"),
        ("[true,false]", "tensor<bool, [2]>([true, false])"),
        ("[0.5, -0x1.8p+1, 2]", "tensor<fp32, [3]>([0.5, -3.0, 2])"),
        ("[1e-5, -inf]", "tensor<fp32, [2]>([0.00001, -inf])"),
        ("[]", "tensor<int32, [0]>([])"),
    ],
)
def test_untyped_list_operand_is_the_typed_literal(untyped, typed):
    """Other tools write list operands without a type (``axes = [1]``); they parse to the literal coremltools gives
    such a list (int32, bool, else fp32), and print back typed."""
    got, want = _operand(untyped), _operand(typed)
    assert got.type == want.type and same_value(got.value, want.value), (got, want)
    reparsed = _operand(format_argument(got, verbose=False))
    assert reparsed.type == want.type and same_value(reparsed.value, want.value)


@pytest.mark.parametrize(
    "untyped, message",
    [
        ("[1, true]", "expected a number, found 'true'"),
        ("[x]", "expected a number, found 'x'"),
        ("[1, 2147483648]", r"expected an integer in \[-2147483648, 2147483647\] for int32, found 2147483648"),
        ("[nan]", "found NaN"),
        ("[1, 2", "expected ',' or ']' after a value"),
    ],
)
def test_untyped_list_refusals(untyped, message):
    with pytest.raises(MILSyntaxError, match=message):
        _operand(untyped)


def test_literal_types_and_dtypes():
    for dtype, np_dtype in NUMPY_DTYPES.items():
        value = "true" if dtype == "bool" else "1"
        got = _const_value(f"tensor<{dtype}, [2]>([{value}, {value}])", f"tensor<{dtype}, [2]>")
        assert got.value.dtype == np_dtype and got.value.shape == (2,)


# ---------------------------------------------------------------------------------------------------------------------
# Round trips through the printer


def sample_program() -> Program:
    """A program built in Python covering every literal kind; values chosen to stress exact printing."""
    f16 = np.array([0.1, -0.0, 6e-8, 65504, -math.inf, 1 / 3], np.float16).reshape(1, 2, 1, 3)
    f32 = np.array([0.1, 1e-45, 3.4028235e38, -1e20, 16777217, 2.5], np.float32)
    return Program(
        inputs=[("x", X4), ("s", TensorType("fp32"))],
        statements=[
            Statement(TensorType(F16, (1, 2, 1, 3)), "c16", "const", {}, {"name": s("c16"), "val": lit(F16, f16)}),
            Statement(TensorType("fp32", (6,)), "c32", "const", {}, {"name": s("c32"), "val": lit("fp32", f32)}),
            Statement(TensorType("uint64"), "u", "const", {}, {"val": lit("uint64", 2**64 - 1)}),
            Statement(TensorType("bool", (2,)), "bb", "const", {}, {"val": lit("bool", [True, False])}),
            Statement(TensorType("string"), "q", "const", {}, {"name": s('quote " and \\'), "val": s("fp16")}),
            Statement(TensorType(F16, (4, 4, 1, 1)), "W", "const", {},
                      {"name": s("W"), "val": lit(F16, BlobRef("@model_path/weights/a b.bin", 64), (4, 4, 1, 1))}),
            Statement(TensorType(F16, (1, 8, 1, 8)), "cat", "concat",
                      {"axis": lit("int32", 1), "interleave": lit("bool", False), "values": (VarRef("x"), VarRef("x"))},
                      {"name": s("cat")}),
            Statement(X4, "y", "add", {"x": VarRef("x"), "y": lit(F16, -0.0)}, {}),
        ],
        outputs=["y", "cat"],
        build_info={"coremlc-version": "3505.4.1", "k": ""},
    )


@pytest.mark.parametrize("version", sorted(DIALECTS))
def test_round_trip_program_text_program(version):
    program = sample_program()
    program.version, program.opset = version, DIALECTS[version]
    text = program.to_text()
    parsed = parse_program(text)
    assert_same_program(parsed, program)
    assert parsed.to_text() == text


@pytest.mark.parametrize("text", [COMPACT_13, VERBOSE_10, LOOSE])
def test_printed_text_reprints_identically(text):
    printed = parse_program(text).to_text()
    assert parse_program(printed).to_text() == printed


@pytest.mark.parametrize("source, target", [("1.3", "1.0"), ("1.0", "1.3")])
def test_dialect_conversion_keeps_the_program(source, target):
    program = sample_program()
    program.version, program.opset = source, DIALECTS[source]
    converted = parse_program(program.to_text(target))
    assert (converted.version, converted.opset) == (target, DIALECTS[target])
    assert_same_program(converted, program, compare_dialect=False)
    assert converted.to_text(source) == program.to_text()


def test_dialects_differ_only_in_scalar_spelling():
    program = sample_program()
    short, verbose = program.to_text("1.3"), program.to_text("1.0")
    assert "tensor<string, []>(" not in short and 'string("' in short
    assert re.search(r"(?<![<\w])(string|fp16|uint64|int32|bool)\(", verbose) is None


# ---------------------------------------------------------------------------------------------------------------------
# Syntax errors: "§" marks where the error must be reported (the marker is removed before parsing).

GOOD_HEAD = "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {\n"
GOOD_TAIL = "    } -> (x);\n}\n"
SYNTAX_ERRORS = [
    ("§", "end of input"),
    ("§prog(1.3)", "'program"),
    ("program(§2.0)\n{\n}", "version"),
    ("program(1.3)\n[§foo = bar]", "buildInfo"),
    (GOOD_HEAD + '        tensor<fp16, [1,4,1,8]> y = relu(x=x)[name=string("y")]\n    §} -> (y);\n}\n', "';'"),
    (GOOD_HEAD + "        tensor<fp16, [1,4,1,8]> y §relu(x=x);\n" + GOOD_TAIL, "'='"),
    (GOOD_HEAD + "        tensor<§fp17, [2]> y = relu(x=x);\n" + GOOD_TAIL, "element type"),
    (GOOD_HEAD + "        tensor<fp16, [§?, 8]> y = relu(x=x);\n" + GOOD_TAIL, "MIL token"),
    (GOOD_HEAD + '        string y = const()[val=string(§"open)];\n' + GOOD_TAIL, "closing '\"'"),
    (GOOD_HEAD + r'        string y = const()[val=string("a§\n")];' + "\n" + GOOD_TAIL, "escape"),
    (GOOD_HEAD + "        tensor<int32, [4]> y = const()[val=§tensor<int32, [4]>([0,1,2])];\n" + GOOD_TAIL,
     "expected 4 values"),
    (GOOD_HEAD + "        fp16 y = const()[val=fp16(§70000)];\n" + GOOD_TAIL, "overflows"),
    (GOOD_HEAD + "        int32 y = const()[val=int32(§1.5)];\n" + GOOD_TAIL, "integer"),
    (GOOD_HEAD + "        int8 y = const()[val=int8(§200)];\n" + GOOD_TAIL, "[-128, 127]"),
    (GOOD_HEAD + "        uint64 y = const()[val=uint64(§-1)];\n" + GOOD_TAIL, "[0, "),
    (GOOD_HEAD + "        bool y = const()[val=bool(§1)];\n" + GOOD_TAIL, "true or false"),
    (GOOD_HEAD + "        fp32 y = const()[val=fp32(§nan)];\n" + GOOD_TAIL, "NaN"),
    (GOOD_HEAD + "        fp16 y = const()[val=fp16(§[1])];\n" + GOOD_TAIL, "a number"),
    (GOOD_HEAD + "        fp16 §bool = const()[val=fp16(1)];\n" + GOOD_TAIL, "reserved"),
    (GOOD_HEAD + "        tensor<fp16, [1,4,1,8]> y = add(x=x, §x=x);\n" + GOOD_TAIL, "repeated"),
    (GOOD_HEAD + "        tensor<fp16, [1,4,1,8]> y = add(x=x, y=§);\n" + GOOD_TAIL, "a variable name, a literal"),
    (GOOD_HEAD + "        tensor<fp16, [1,4,1,8]> y = add(x=x y=x);\n".replace(" y=x", " §y=x") + GOOD_TAIL, "','"),
    (GOOD_HEAD + "        tensor<fp16, [1,4,1,8]> y = relu(x=x)[name=§y];\n" + GOOD_TAIL, "literal"),
    (GOOD_HEAD + "        §tensr<fp16, [2]> y = relu(x=x);\n" + GOOD_TAIL, "a statement"),
    (GOOD_HEAD + "        tensor<fp16, [2]> y = const()[val=tensor<fp16, [2]>(§BLOBFILE(path=string(\"@model_path/a"
     "\")))];\n" + GOOD_TAIL, "'offset="),
    (GOOD_HEAD + "        tensor<fp16, [2]> y = const()[val=tensor<fp16, [2]>(BLOBFILE(path=§uint64(1), "
     "offset=uint64(64)))];\n" + GOOD_TAIL, "string literal"),
    (GOOD_HEAD + "        tensor<string, §[2]> y = const()[val=string(\"a\")];\n" + GOOD_TAIL, "shape []"),
    ("program(1.3)\n{\n    func main<§ios>() {\n" + GOOD_TAIL, "opset"),
    ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x, §) {\n" + GOOD_TAIL, "parameter type"),
    ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x) {\n    } -> (§);\n}\n", "at least one output"),
    ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x) {\n    } -> (x)\n§}\n", "';'"),
    ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x) {\n    } -> (x);\n}\n§}", "end of input"),
    ("program(1.3)\n[buildInfo = dict<string, §fp16>({})]\n{\n", "string"),
    ('program(1.3)\n[buildInfo = dict<string, string>({{"a", "b"}, {§"a", "c"}})]\n{\n', "repeated key"),
    ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x) {\n    } -> (x);\n    §fn f<ios18>",
     "'func' starting another function"),
]


@pytest.mark.parametrize("marked, fragment", SYNTAX_ERRORS)
def test_syntax_error_position(marked, fragment):
    offset = marked.index("§")
    text = marked.replace("§", "", 1)
    line = marked.count("\n", 0, offset) + 1
    column = offset - (marked.rfind("\n", 0, offset) + 1) + 1
    with pytest.raises(MILSyntaxError) as info:
        parse_program(text, "model.mil")
    error = info.value
    assert (error.line, error.column) == (line, column), str(error)
    assert fragment in str(error)
    assert "expected" in str(error) and "model.mil" in str(error)


def test_syntax_error_message_says_expected_and_found():
    with pytest.raises(MILSyntaxError) as info:
        parse_program(GOOD_HEAD + "        tensor<fp16, [1,4,1,8]> y = relu(x=x) foo;\n" + GOOD_TAIL)
    assert "expected ';' ending the statement, found 'foo'" in str(info.value)
    assert str(info.value).startswith("line 4, column 47:")


# ---------------------------------------------------------------------------------------------------------------------
# Semantic errors


def _line_of(error: Exception) -> int:
    return int(re.search(r"line (\d+)", str(error)).group(1))


@pytest.mark.parametrize(
    "body, line, fragment",
    [
        ("        tensor<fp16, [2]> y = relu(x=x);\n        tensor<fp16, [2]> y = relu(x=x);\n", 5, "defined twice"),
        ("        tensor<fp16, [2]> x = relu(x=x);\n", 4, "defined twice"),
        ("        tensor<fp16, [2]> y = relu(x=z);\n", 4, "'z' is used before"),
        ("        tensor<fp16, [2]> y = relu(x=y);\n", 4, "'y' is used before"),
        ("        tensor<fp16, [2]> y = add(x=x, y=w);\n        tensor<fp16, [2]> w = relu(x=x);\n", 4, "'w'"),
        ("        tensor<fp16, [4]> y = concat(axis=int32(0), values=(x, q));\n", 4, "'q' is used before"),
    ],
)
def test_variable_errors(body, line, fragment):
    text = "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x) {\n" + body + "    } -> (x);\n}\n"
    with pytest.raises(MILProgramError) as info:
        parse_program(text)
    assert _line_of(info.value) == line and fragment in str(info.value)


def test_duplicate_parameter():
    with pytest.raises(MILProgramError, match="'x' is defined twice"):
        parse_program("program(1.3)\n{\n func main<ios18>(fp16 x,\n fp32 x) {\n } -> (x);\n}\n")


def test_undefined_output():
    text = "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2]> x) {\n    } -> (x,\n nope);\n}\n"
    with pytest.raises(MILProgramError) as info:
        parse_program(text)
    assert _line_of(info.value) == 5 and "output 'nope' is not defined" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Blob paths

UNSAFE_PATHS = [
    "weights/w.bin",  # no @model_path/
    "@model_pathweights/w.bin",
    "/etc/passwd",
    "@model_path//etc/passwd",
    "@model_path/../w.bin",
    "@model_path/weights/../../w.bin",
    "@model_path/a/./../..",
    "@model_path/..",
    "@model_path/",
    "@model_path/.",
    "@model_path/weights\\w.bin",
    "@model_path/weights/w\0.bin",
]
SAFE_PATHS = {
    "@model_path/weights/wq.bin": ("weights", "wq.bin"),
    "@model_path/w.bin": ("w.bin",),
    "@model_path/a/../b.bin": ("b.bin",),
    "@model_path/./x//y.bin": ("x", "y.bin"),
    "@model_path/..w.bin": ("..w.bin",),
}


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_unsafe_blob_path_refused_by_parser(path):
    escaped = path.replace("\\", "\\\\")
    text = (f"program(1.3)\n{{\n  func main<ios18>() {{\n"
            f'    tensor<fp16, [2]> w = const()[val=tensor<fp16, [2]>(BLOBFILE(path=string("{escaped}"), '
            f"offset=uint64(64)))];\n  }} -> (w);\n}}\n")
    with pytest.raises(UnsafePathError) as info:
        parse_program(text)
    assert "line 4" in str(info.value)


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_unsafe_blob_path_refused_by_resolve(path, tmp_path):
    with pytest.raises(UnsafePathError):
        resolve_blob_path(tmp_path, path)


@pytest.mark.parametrize("path, parts", SAFE_PATHS.items())
def test_safe_blob_path_resolves_inside(path, parts, tmp_path):
    resolved = resolve_blob_path(tmp_path, path)
    assert resolved == tmp_path.joinpath(*parts)
    assert Path(resolved).resolve().is_relative_to(tmp_path.resolve())


# ---------------------------------------------------------------------------------------------------------------------
# Random programs: print, parse back, compare


RESERVED_WORDS = {"any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false", "string",
                  "bf16", "fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                  "uint64", "state"}
IDENTS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n not in RESERVED_WORDS)
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)
# print_program writes buildInfo strings without escapes, so keep quotes and backslashes out of them
PLAIN_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters='"\\'), max_size=8)
NUMERIC = sorted(NUMPY_DTYPES)
OPS = ["const", "add", "mul", "relu", "concat", "reshape", "softmax", "conv", "matmul"]
ARG_NAMES = ["x", "y", "axis", "shape", "weight", "values", "transpose_x"]
PATH_PART = st.from_regex(r"[A-Za-z0-9_ .-]{1,6}", fullmatch=True).filter(lambda p: p not in (".", ".."))


def element_strategy(dtype: str):
    if dtype == "fp16":
        return st.floats(width=16, allow_nan=False)
    if dtype == "fp32":
        return st.floats(width=32, allow_nan=False)
    if dtype == "bool":
        return st.booleans()
    info = np.iinfo(NUMPY_DTYPES[dtype])
    return st.integers(int(info.min), int(info.max))


@st.composite
def types(draw, *, allow_string=True) -> TensorType:
    dtype = draw(st.sampled_from(NUMERIC + (["string"] if allow_string else [])))
    if dtype == "string":
        return TensorType("string")
    return TensorType(dtype, tuple(draw(st.lists(st.integers(1, 3), max_size=5))))


@st.composite
def literals(draw, t: TensorType | None = None) -> Literal:
    t = t or draw(types())
    if t.dtype == "string":
        return Literal(t, draw(TEXT))
    if draw(st.integers(0, 4)) == 0:
        path = "@model_path/" + "/".join(draw(st.lists(PATH_PART, min_size=1, max_size=3)))
        return Literal(t, BlobRef(path, draw(st.integers(0, 2**64 - 1))))
    value = draw(hnp.arrays(NUMPY_DTYPES[t.dtype], t.shape, elements=element_strategy(t.dtype)))
    return Literal(t, np.asarray(value).reshape(t.shape))


@st.composite
def arguments(draw, defined: list[str]):
    kinds = ["literal"] + (["var", "tuple"] if defined else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "var":
        return VarRef(draw(st.sampled_from(defined)))
    if kind == "tuple":
        return tuple(VarRef(n) for n in draw(st.lists(st.sampled_from(defined), min_size=1, max_size=3)))
    return draw(literals())


@st.composite
def programs(draw) -> Program:
    n_inputs, n_statements = draw(st.integers(0, 3)), draw(st.integers(1, 5))
    names = draw(st.lists(IDENTS, min_size=n_inputs + n_statements, max_size=n_inputs + n_statements, unique=True))
    inputs = [(name, draw(types())) for name in names[:n_inputs]]
    defined = [name for name, _ in inputs]
    statements = []
    for name in names[n_inputs:]:
        op, t = draw(st.sampled_from(OPS)), draw(types())
        args, attrs = {}, {}
        if draw(st.booleans()):
            attrs["name"] = Literal(TensorType("string"), draw(TEXT))
        if op == "const":
            attrs["val"] = draw(literals(t))
        else:
            for key in draw(st.lists(st.sampled_from(ARG_NAMES), unique=True, max_size=3)):
                args[key] = draw(arguments(defined))
        statements.append(Statement(t, name, op, args, attrs))
        defined.append(name)
    version = draw(st.sampled_from(sorted(DIALECTS)))
    return Program(
        inputs=inputs,
        statements=statements,
        outputs=draw(st.lists(st.sampled_from(defined), min_size=1, max_size=3)),
        version=version,
        opset=DIALECTS[version],
        function=draw(IDENTS),
        build_info=draw(st.dictionaries(PLAIN_TEXT, PLAIN_TEXT, min_size=1, max_size=3)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_random_programs_round_trip(program):
    text = program.to_text()
    parsed = parse_program(text)
    assert_same_program(parsed, program)
    assert parsed.to_text() == text
    other = "1.0" if program.version == "1.3" else "1.3"
    converted = parse_program(program.to_text(other))
    assert_same_program(converted, program, compare_dialect=False)
    assert converted.to_text(program.version) == text


# ---------------------------------------------------------------------------------------------------------------------
# Statements with several results (split), in both spellings public programs use

SPLIT_HEAD = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp16, [1, 6, 1, 8]> x) {
        int32 ax = const()[name = string("ax"), val = int32(1)];
        tensor<int32, [3]> sizes = const()[name = string("sizes"), val = tensor<int32, [3]>([1, 2, 3])];
"""
SPLIT_TAIL = """        tensor<fp16, [1, 3, 1, 8]> y = relu(x = c)[name = string("y")];
    } -> (b, y);
}
"""
PARTS = "tensor<fp16, [1, 1, 1, 8]> a, tensor<fp16, [1, 2, 1, 8]> b, tensor<fp16, [1, 3, 1, 8]> c"
SPLIT_CALL = ' = split(axis = ax, split_sizes = sizes, x = x)[name = string("sp")];\n'


@pytest.mark.parametrize("results", [PARTS, f"({PARTS})", f"( {PARTS.replace(', ', ' ,')} )"])
def test_several_results_in_either_spelling(results):
    program = parse_program(SPLIT_HEAD + "        " + results + SPLIT_CALL + SPLIT_TAIL)
    split = program.statements[2]
    want = [("a", TensorType(F16, (1, 1, 1, 8))), ("b", TensorType(F16, (1, 2, 1, 8))),
            ("c", TensorType(F16, (1, 3, 1, 8)))]
    assert split.op == "split" and split.name == "sp" and list(split.outputs) == want
    assert (split.var, split.type) == want[0] and split.more_outputs == tuple(want[1:])
    assert program.statement("c") is split and program.statement("a") is split
    assert program.output_types() == [("b", want[1][1]), ("y", TensorType(F16, (1, 3, 1, 8)))]
    assert program.statements[3].args["x"] == VarRef("c")
    printed = program.to_text()
    assert PARTS + " = split(" in printed
    assert_same_program(parse_program(printed), program)
    assert_same_program(parse_program(program.to_text("1.0")), program, compare_dialect=False)


@pytest.mark.parametrize(
    "results, error, message",
    [
        ("() ", MILSyntaxError, r"expected at least one result in the parentheses, found '\)'"),
        ("tensor<fp16, [1, 1, 1, 8]> a, b", MILSyntaxError, "expected a result type .*, found 'b'"),
        (f"({PARTS}", MILSyntaxError, "expected ',' or '\\)' after a result, found '='"),
        (PARTS.replace(" c", " a"), MILProgramError, "variable 'a' is defined twice"),
        (PARTS.replace(" c", " x"), MILProgramError, "variable 'x' is defined twice"),
    ],
)
def test_several_results_refusals(results, error, message):
    with pytest.raises(error, match=message):
        parse_program(SPLIT_HEAD + "        " + results + SPLIT_CALL + SPLIT_TAIL)


def test_a_split_cannot_read_its_own_results():
    text = SPLIT_HEAD + "        " + PARTS + SPLIT_CALL.replace("x = x", "x = b") + SPLIT_TAIL
    with pytest.raises(MILProgramError, match="variable 'b' is used before it is defined"):
        parse_program(text)
