"""MIL's ``cast`` among fp16, fp32, int8, uint8, int16, int32 and bool, against coremltools' value inference (the
reference implementation of MIL), directly and through the emulator, where every op's result is held as fp16."""

import platform
import warnings

import numpy as np
import pytest

from orion.ir.ops import cast_values
from orion.ir.types import NUMPY_DTYPES
from orion.runtime.backends.emulator import load_text

DTYPES = ("fp16", "fp32", "int8", "uint8", "int16", "int32", "bool")
#: coremltools computes a cast with numpy, whose float -> int of a value outside the type is the machine's rule.
X86 = platform.machine().lower() in ("x86_64", "amd64")
FLOATS = [0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.7, -0.7, 127.5, 127.6, 128.0, -128.5, -129.0, 255.5, 256.0, 300.7,
          -300.7, 2049.0, 32767.0, 32768.0, -32769.0, 40000.0, -40000.0, 65504.0, -65504.0, 70000.0, -1e10, 3e9,
          np.inf, -np.inf]
SOURCES = {
    "fp16": np.array(FLOATS, dtype=np.float32).astype(np.float16),  # 70000 and beyond: inf
    "fp32": np.array(FLOATS, dtype=np.float32),
    "int8": np.array([-128, -100, -1, 0, 1, 55, 127], dtype=np.int8),
    "uint8": np.array([0, 1, 127, 128, 200, 255], dtype=np.uint8),
    "int16": np.array([-32768, -300, -129, -1, 0, 255, 2049, 32767], dtype=np.int16),
    "int32": np.array([-(2**31), -100000, -70000, -300, -1, 0, 2049, 65519, 65520, 70000, 2**31 - 1], dtype=np.int32),
    "bool": np.array([True, False, True], dtype=np.bool_),
}


def in_range_only(values: np.ndarray, dst: str) -> np.ndarray:
    """Off x86-64, only the values a float -> int cast defines the same everywhere (inside the target type)."""
    if X86 or values.dtype.kind != "f" or dst in ("fp16", "fp32", "bool"):
        return values
    info = np.iinfo(NUMPY_DTYPES[dst])
    with np.errstate(invalid="ignore"):
        return values[np.isfinite(values) & (np.trunc(values) >= info.min) & (np.trunc(values) <= info.max)]


@pytest.fixture(scope="module")
def coremltools_cast():
    """cast(values, dst) as coremltools' value inference computes it (in an iOS18 program, which casts among all)."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    def cast(values: np.ndarray, dst: str) -> np.ndarray:
        out = {}

        @mb.program(input_specs=[mb.TensorSpec((1,))], opset_version=ct.target.iOS18)
        def prog(x):
            out["val"] = mb.cast(x=values, dtype=dst).val
            return x

        return np.asarray(out["val"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield cast


@pytest.mark.parametrize("src", DTYPES)
def test_cast_values_match_coremltools_for_every_pair(src, coremltools_cast):
    for dst in DTYPES:
        values = in_range_only(SOURCES[src], dst)
        with np.errstate(invalid="ignore", over="ignore"):
            want = coremltools_cast(values, dst)
            got = cast_values(values, dst)
        assert got.dtype == NUMPY_DTYPES[dst], (src, dst)
        np.testing.assert_array_equal(got, want, err_msg=f"cast {src} -> {dst} of {values.tolist()}")


def _program(src: str, n: int) -> str:
    outs = "\n".join(
        f'        string d_{d} = const()[name=string("d_{d}"), val=string("{d}")];\n'
        f'        tensor<{d}, [{n}]> y_{d} = cast(dtype=d_{d}, x=x)[name=string("y_{d}")];' for d in DTYPES)
    return (f"program(1.3)\n{{\n    func main<ios18>(tensor<{src}, [{n}]> x) {{\n{outs}\n"
            f"    }} -> ({', '.join(f'y_{d}' for d in DTYPES)});\n}}\n")


@pytest.mark.parametrize("src", DTYPES)
def test_emulator_casts_every_pair_as_mil_then_holds_fp16(src, coremltools_cast, tmp_path):
    """An integer or bool function input enters exactly; a float input is held as fp16 (N1); each cast's result is
    MIL's value of the held input, then held as fp16 like every op's (outputs of non-float type read as fp16)."""
    values = SOURCES[src]
    if src in ("fp16", "fp32"):
        values = values[np.abs(values) <= 65504]  # beyond fp16, an input is inf in flight: covered by the inf values
    program = load_text(_program(src, values.size), tmp_path)
    outputs = program.run({"x": values})
    held = values.astype(np.float16) if values.dtype.kind == "f" else values
    for dst in DTYPES:
        kept = in_range_only(held, dst)
        with np.errstate(invalid="ignore", over="ignore"):
            want = coremltools_cast(kept, dst).astype(np.float16)
        got = outputs[f"y_{dst}"]
        if kept.size != held.size:
            got = got[np.isin(held, kept)]
        assert got.dtype == (np.float32 if dst == "fp32" else np.float16)
        np.testing.assert_array_equal(got.astype(np.float16), want, err_msg=f"cast {src} -> {dst}")


def test_cast_to_int32_and_back_truncates(tmp_path):
    """The silent case of issue 12: cast to int32 and back was a no-op; it truncates toward zero."""
    text = """program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {
        string to_int = const()[name=string("to_int"), val=string("int32")];
        tensor<int32, [1, 4, 1, 8]> i = cast(dtype=to_int, x=x)[name=string("i")];
        string to_half = const()[name=string("to_half"), val=string("fp16")];
        tensor<fp16, [1, 4, 1, 8]> y = cast(dtype=to_half, x=i)[name=string("y")];
    } -> (y);
}
"""
    x = np.random.default_rng(0).uniform(-50, 50, (1, 4, 1, 8)).astype(np.float16)
    x[0, 0, 0, :4] = [2.5, -2.5, 0.5, -0.75]
    y = load_text(text, tmp_path).run({"x": x})["y"]
    np.testing.assert_array_equal(y, np.trunc(x))
    assert not np.array_equal(y, x)


def test_integer_input_moved_by_layout_reads_back_exactly(tmp_path):
    """An integer input that only layout ops move is never an fp16 value: it reads back exactly in its declared
    type (2049 and 70000 stay), neither garbled nor rounded; a computing op's result is fp16 (the cast tests)."""
    text = """program(1.3)
{
    func main<ios18>(tensor<int32, [4]> x) {
        tensor<int32, [2]> s = const()[name=string("s"), val=tensor<int32, [2]>([2, 2])];
        tensor<int32, [2, 2]> y = reshape(shape=s, x=x)[name=string("y")];
    } -> (y);
}
"""
    x = np.array([-3, 2049, 70000, 2**31 - 1], dtype=np.int32)
    y = load_text(text, tmp_path).run({"x": x})["y"]
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y.ravel(), x)
