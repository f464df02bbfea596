"""The compressed-weight ops (constexpr_*) and quantize/dequantize against coremltools' own meanings: the constexpr
ops' ``decompress`` (what coremltools materializes), quantize's value inference. Our ops compute in float32 and the
emulator rounds once to fp16, so each is compared after that rounding: w = fp16(s * (q - z)) (reference N12)."""

from __future__ import annotations

import numpy as np
import pytest

from orion.errors import GraphError
from orion.ir.graph import Graph
from orion.ir.ops import OPS, Kernels

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, Function  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import (  # noqa: E402
    constexpr_affine_dequantize as CtAffine)
from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (  # noqa: E402
    constexpr_blockwise_shift_scale as CtShiftScale, constexpr_lut_to_dense as CtLut)


def ours(op: str, *inputs, **attrs) -> np.ndarray:
    """The op's numpy meaning, rounded to fp16 as the emulator holds every result."""
    return OPS[op].compute(Kernels(), list(inputs), {**{k: None for k in OPS[op].attrs}, **attrs}).astype(np.float16)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float16).view(np.uint16), b.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_affine_dequantize_matches_coremltools(dtype, axis):
    rng = np.random.default_rng(axis + 3)
    low, high = (-128, 127) if dtype == "int8" else (0, 255)
    q = rng.integers(low, high + 1, (6, 5, 4)).astype(dtype)
    n = q.shape[axis]
    zero = rng.integers(low, high + 1, n).astype(dtype)
    scale = (rng.random(n) * 0.02 + 0.001).astype(np.float16)
    want = CtAffine.decompress(q, zero, scale, axis)
    assert same(ours("constexpr_affine_dequantize", q, zero, scale, axis=axis), want)
    # scalar scale and zero point broadcast over every axis
    assert same(ours("constexpr_affine_dequantize", q, zero[:1].reshape(()), scale[1].reshape(()), axis=axis),
                CtAffine.decompress(q, zero[0], scale[1], axis))


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("per_block", [(3, 2, 1, 1), (6, 1, 1, 1), (1, 8, 1, 1)])
@pytest.mark.parametrize("offset", [False, True])
def test_blockwise_shift_scale_matches_coremltools(dtype, per_block, offset):
    rng = np.random.default_rng(len(dtype) + sum(per_block))
    low, high = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}[dtype]
    holder = np.int8 if dtype.startswith("int") else np.uint8
    data = rng.integers(low, high + 1, (6, 16, 1, 1)).astype(holder)
    scale = (rng.random(per_block) * 0.05 + 0.001).astype(np.float16)
    off = rng.integers(low, high + 1, per_block).astype(holder) if offset else None
    got = ours("constexpr_blockwise_shift_scale", data, scale, *([off] if offset else []))
    assert same(got, CtShiftScale.decompress(data, scale, off))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("palettes", [(1, 1), (3, 1), (2, 2)])
def test_lut_to_dense_matches_coremltools(bits, palettes):
    rng = np.random.default_rng(bits)
    indices = rng.integers(0, 2 ** bits, (6, 4)).astype(np.uint8)
    lut = rng.standard_normal(palettes + (2 ** bits, 1)).astype(np.float16)
    assert same(ours("constexpr_lut_to_dense", indices, lut), CtLut.decompress(indices, lut, None))


@pytest.mark.parametrize("vector_axis", [0, 1, 2, -1])
def test_vector_palettes_match_coremltools(vector_axis):
    rng = np.random.default_rng(5)
    indices = rng.integers(0, 4, (2, 4, 2)).astype(np.uint8)
    lut = rng.standard_normal((1, 2, 1, 4, 3)).astype(np.float16)
    got = ours("constexpr_lut_to_dense", indices, lut, vector_axis=vector_axis)
    assert same(got, CtLut.decompress(indices, lut, np.int32(vector_axis)))


def coreml_quantize(**params) -> np.ndarray:
    with Function({}, opset_version=ct.target.iOS18):
        return np.asarray(mb.quantize(**params).val)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_quantize_and_dequantize_match_coremltools(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 5, 3)) * 3).astype(np.float16)
    scale = (rng.random(5) * 0.05 + 0.01).astype(np.float16)
    zero = rng.integers(-20 if dtype == "int8" else 100, 20 if dtype == "int8" else 140, 5).astype(dtype)
    want = coreml_quantize(input=x, scale=scale, zero_point=zero, axis=1, output_dtype=dtype)
    got = OPS["quantize"].compute(Kernels(), [x.astype(np.float32), scale, zero], {"axis": 1, "output_dtype": dtype})
    assert np.array_equal(got, want.astype(np.float32)) and np.abs(got).max() >= 100  # clipped values included
    back = OPS["dequantize"].compute(Kernels(), [got, scale, zero], {"axis": 1}).astype(np.float16)
    # coremltools has no value inference for dequantize: its documented meaning, (input - zero_point) * scale
    ref = (want.astype(np.float64) - zero.astype(np.float64)[:, None]) * scale.astype(np.float64)[:, None]
    assert same(back, ref)


def test_quantize_ties_follow_the_round_setting():
    """Halves round by the kernels' round rule (MIL's: to even; the ANE's is the N10 setting)."""
    x = np.array([0.5, 1.5, 2.5, -0.5, 127.6, 300.0], np.float32)
    got = OPS["quantize"].compute(Kernels(), [x, np.float32(1.0)], {"axis": None, "output_dtype": "int8"})
    assert got.tolist() == [0, 2, 2, -0, 127, 127]


def test_shape_rules_refuse_mismatched_parameters():
    g = Graph()
    data = g.add_const(np.zeros((6, 16, 1, 1), np.int8), "d", "int4")
    with pytest.raises(GraphError, match=r"scale \[4, 1, 1, 1\] must have one size per axis of \[6, 16, 1, 1\]"):
        g.add_node("constexpr_blockwise_shift_scale", {"data": data, "scale": g.add_const(np.ones((4, 1, 1, 1),
                                                                                                  np.float16))})
    idx = g.add_const(np.zeros((6, 4), np.uint8), "i", "uint2")
    with pytest.raises(GraphError, match="uint2 indices need 4 palette entries, lut has 16"):
        g.add_node("constexpr_lut_to_dense", {"indices": idx, "lut": g.add_const(np.ones((1, 1, 16, 1), np.float16))})
    q = g.add_const(np.zeros((6, 5), np.int8))
    with pytest.raises(GraphError, match=r"scale fp16\[6\] must be a scalar or a vector of 5 values \(axis 1\)"):
        g.add_node("constexpr_affine_dequantize", {"quantized_data": q, "zero_point": g.add_const(np.int8(0)),
                                                   "scale": g.add_const(np.ones(6, np.float16))}, {"axis": 1})
    w = g.add_node("constexpr_lut_to_dense", {"indices": idx, "lut": g.add_const(np.ones((3, 1, 4, 1), np.float16))})
    assert w.type.dtype == "fp16" and w.shape == (6, 4)
