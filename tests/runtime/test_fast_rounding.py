"""The float32-bit rounding the emulator runs on gives the same bits as the fp16 reference path it replaced.

Oracles: ``round_fp16`` + ``_finish``/``ane_fix`` (the fp16 reference rules, themselves tested against exact
arithmetic in test_numerics.py), ``boundary_input`` and numpy's float16 casts; for whole programs, the emulator's
former per-op path (fp16 round trip after every op), kept here as a subclass.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.ir.builder import GraphBuilder
from orion.ir.ops import OPS
from orion.mil.parse import parse_program
from orion.runtime.backends import numerics as nm
from orion.runtime.backends.emulator import (
    F16,
    LOG_OF_ZERO,
    AneKernels,
    EmulatedProgram,
    directory_blob_loader,
    load_program,
)
from orion.runtime.backends.numerics import Numerics

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.transformer_block import add_block  # noqa: E402

CEILINGS = (None, 32768.0, 1000.0, 2.0**-20, 65504.0, float("inf"))


def reference(x32: np.ndarray, ties: str, ceiling: float | None = None, flush: bool = False) -> np.ndarray:
    """The fp16 path: one rounding to fp16, the output rules on fp16 bits, back to float32."""
    with np.errstate(all="ignore"):
        return nm._finish(nm.round_fp16(x32, ties), flush, ceiling).astype(np.float32)


def _fp16_grid_f32_bits() -> np.ndarray:
    """float32 bit patterns of every non-negative fp16 value, every midpoint between neighbours (the ties, including
    the one toward 65536, the overflow) and 2**16 itself."""
    values = np.arange(0x7C00, dtype=np.uint16).view(F16).astype(np.float64)
    values = np.append(values, 2.0**16)
    midpoints = (values[:-1] + values[1:]) / 2  # exact in float32: 12 significant bits
    return np.concatenate([values, midpoints]).astype(np.float32).view(np.uint32)


def bit_patterns() -> np.ndarray:
    """float32 patterns that exercise every branch: a stride through all 2**32, each fp16 value and tie with its
    neighbours +-3 ulps (both signs), and the special values."""
    stride = np.arange(0, 2**32, 2**32 // 600_001, dtype=np.uint64).astype(np.uint32)
    grid = _fp16_grid_f32_bits().astype(np.int64)
    near = (grid[:, None] + np.arange(-3, 4)[None, :]).ravel()
    near = np.concatenate([near, near | 0x80000000]) % 2**32
    specials = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF,
                         0x7FFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x80800000],
                        dtype=np.int64)
    return np.concatenate([stride, near.astype(np.uint32), specials.astype(np.uint32)])


PATTERNS = bit_patterns()


def assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> None:
    """Equal float32 arrays bit for bit; a failure names the first input that differs."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    bad = np.flatnonzero(got.view(np.uint32).ravel() != want.view(np.uint32).ravel())
    if bad.size:
        i = bad[0]
        pytest.fail(f"{bad.size} differ, e.g. input {np.asarray(x).ravel()[i]!r}: "
                    f"got {got.view(np.uint32).ravel()[i]:#010x}, want {want.view(np.uint32).ravel()[i]:#010x}")


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("ceiling", CEILINGS)
@pytest.mark.parametrize("ties", ["half-even", "half-away"])
def test_round_f32_gives_the_reference_bits_for_every_kind_of_pattern(ties, ceiling, flush):
    x = PATTERNS.view(np.float32)
    before = x.copy()
    got = nm.round_f32(x, ties, ceiling=ceiling, flush_subnormals=flush)
    assert_same_bits(got, reference(x, ties, ceiling, flush), x)
    assert np.array_equal(x.view(np.uint32), before.view(np.uint32))  # a new array unless asked


@pytest.mark.slow
def test_round_f32_and_hold_input_on_every_float32_pattern():
    """All 2**32 patterns (about 15 minutes): both tie modes, with and without the 2**15 ceiling and the flush."""
    chunk = 1 << 24
    for start in range(0, 2**32, chunk):
        x = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32).view(np.float32)
        for ties in ("half-even", "half-away"):
            with np.errstate(all="ignore"):
                fp16 = nm.round_fp16(x, ties)
            for ceiling in (None, 32768.0):
                for flush in (False, True):
                    want = nm._finish(fp16, flush, ceiling).astype(np.float32)
                    assert_same_bits(nm.round_f32(x, ties, ceiling=ceiling, flush_subnormals=flush), want, x)
        assert_same_bits(nm.hold_input(x, "fp16"), nm.boundary_input(x, "fp16").astype(np.float32), x)


@pytest.mark.parametrize("ties", ["half-even", "half-away"])
def test_round_f32_in_place_and_on_strided_or_empty_arrays(ties):
    x = PATTERNS[: 300_000].view(np.float32).reshape(3000, 100)
    want = reference(x, ties)
    inplace = x.copy()
    assert nm.round_f32(inplace, ties, out=inplace) is inplace
    assert_same_bits(inplace, want, x)
    strided = x.T[::2]
    assert_same_bits(nm.round_f32(strided, ties), reference(strided, ties), strided)
    target = np.empty_like(x)
    assert nm.round_f32(x, ties, out=target) is target
    assert_same_bits(target, want, x)
    strided_target = np.empty((100, 3000), np.float32).T[::2, ::2]  # a non-contiguous out
    assert nm.round_f32(x[::2, ::2], ties, out=strided_target) is strided_target
    assert_same_bits(strided_target, want[::2, ::2], x[::2, ::2])
    assert nm.round_f32(np.float32(-0.0), ties).view(np.uint32) == 0  # 0-d
    assert nm.round_f32(np.zeros((0, 4), np.float32), ties).shape == (0, 4)


def test_round_f32_decides_its_extra_passes_per_array():
    """The passes for NaN, overflow and small values run only when an array needs them: one-element arrays at the
    edges (each ceiling's fp16 value and the tie below it, 65520, 2**-14 and the tie below it) must still get
    them."""
    edges = [65520.0, 2.0**-14, 2.0**-14 - 2.0**-25, 2.0**-24, 2.0**-25]
    for ceiling in (32768.0, 1000.0, 2.0**-20):
        at = float(np.float16(ceiling))
        below = float(np.nextafter(np.float16(at), np.float16(0)))
        edges += [at, (at + below) / 2]
    bits = np.array(edges, dtype=np.float32).view(np.uint32).astype(np.int64)
    near = (bits[:, None] + np.array([-0x1001, -0x1000, -0xFFF, -1, 0, 1, 0xFFF, 0x1000, 0x1001])).ravel()
    near = np.concatenate([near, near | 0x80000000]).astype(np.uint32)
    for ties in ("half-even", "half-away"):
        for ceiling in CEILINGS:
            for flush in (False, True):
                for p in near:
                    x = np.array([p], dtype=np.uint32).view(np.float32)
                    assert_same_bits(nm.round_f32(x, ties, ceiling=ceiling, flush_subnormals=flush),
                                     reference(x, ties, ceiling, flush), x)


def test_round_f32_subnormal_ties_go_the_right_way():
    """Values an odd multiple of 2**-25 away from 0 lie halfway between fp16 subnormals: even k or away."""
    k = np.arange(0, 2048, dtype=np.float64)
    x = np.concatenate([(k + 0.5) * 2.0**-24, -(k + 0.5) * 2.0**-24]).astype(np.float32)
    for ties in ("half-even", "half-away"):
        got = nm.round_f32(x, ties).astype(np.float64)
        steps = np.abs(got) / 2.0**-24
        lower = np.floor(np.abs(x.astype(np.float64)) / 2.0**-24)
        expected = lower + 1 if ties == "half-away" else np.where(lower % 2 == 0, lower, lower + 1)
        assert np.array_equal(steps, expected)
        assert not np.signbit(got[got == 0]).any()  # no -0


def test_round_f32_refuses_other_dtypes_and_ties():
    with pytest.raises(TypeError):
        nm.round_f32(np.ones(3), "half-even")
    with pytest.raises(ValueError):
        nm.round_f32(np.ones(3, np.float32), "up")


@pytest.mark.parametrize("declared", ["fp16", "fp32"])
def test_hold_input_is_boundary_input_held_as_float32(declared, rng):
    every_fp16 = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(F16)
    wide = rng.normal(0, 1, 200_000) * np.exp2(rng.uniform(-40, 40, 200_000))
    wide[:6] = [np.nan, -np.inf, np.inf, -0.0, 1e300, -1e-300]
    for data in (every_fp16, PATTERNS.view(np.float32), wide, wide.astype(np.longdouble), np.arange(-5, 5)):
        got = nm.hold_input(data, declared)
        want = nm.boundary_input(data, declared).astype(np.float32)
        assert_same_bits(got, want, data)
        assert not np.shares_memory(got, data)


def test_flush_subnormals_on_float32_matches_its_definition():
    x = PATTERNS.view(np.float32)
    for data in (x, x[: 600_000].reshape(600, 1000).T, np.float32(-1e-6)):
        want = np.where(np.abs(data) < np.float32(2.0**-14), np.float32(0.0), data)
        got = nm.flush_subnormals(data)
        assert got.dtype == np.float32 and got.tobytes() == np.ascontiguousarray(want).tobytes()
        assert got.shape == np.shape(data) and got.flags.c_contiguous  # BLAS sums C and F order differently
        assert not np.shares_memory(got, data)


def test_fp16_of_held_returns_every_fp16_value_bit_for_bit():
    every = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(F16)
    finite_or_inf = every[~np.isnan(every)]
    held = finite_or_inf.astype(np.float32)
    assert np.array_equal(nm.fp16_of_held(held).view(np.uint16), finite_or_inf.view(np.uint16))
    target = np.empty((2, held.size // 2), F16)
    assert nm.fp16_of_held(held.reshape(2, -1), out=target) is target
    assert np.array_equal(target.ravel().view(np.uint16), finite_or_inf.view(np.uint16))


# --------------------------------------------------------------------------------------- whole programs, old vs new


class ReferenceKernels(AneKernels):
    """The kernels as they were: fp16 outputs from the fp16 reference functions."""

    def matmul(self, a, b):
        if self.settings.accumulator != "fp32":
            return nm.matmul(a.astype(F16), b.astype(F16), self.settings)
        return nm.finish_wide(np.matmul(self._operand(a), self._operand(b)), self.settings)

    def reduce_sum(self, x, axes, keep_dims):
        return nm.reduce_sum(x.astype(F16), axes, keep_dims, self.settings)


class ReferenceProgram(EmulatedProgram):
    """The emulator's former per-op path: round to float16, ane_fix, back to float32; inputs through
    boundary_input, outputs through astype."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        flushed = self.kernels.flushed
        self.kernels = ReferenceKernels(self.settings)
        self.kernels.flushed = flushed

    def bind(self, inputs):
        return {name: nm.boundary_input(np.asarray(inputs[name]), t.dtype).astype(np.float32)
                for name, t in self.inputs}

    def run(self, inputs):
        held = self.run_bound(self.bind(inputs))
        return {name: held[name].astype(t.numpy_dtype) for name, t in self.outputs}

    def _execute(self, step, env):
        flushed = self._wide_consts if step.op.kind == "wide" else {}
        args = [[env[n] for n in i] if isinstance(i, tuple) else flushed.get(i, env[i]) for i in step.inputs]
        arrays = args[0] if step.op.variadic else args
        kind = step.op.kind
        result = step.op.compute(self.kernels, arrays, step.attrs)
        if kind == "layout":
            return np.asarray(result, dtype=np.float32)
        ties = self.settings.reduction_ties if kind in ("reduction", "wide") else self.settings.elementwise_ties
        out = result if result.dtype == F16 else nm.round_fp16(np.asarray(result, dtype=np.float32), ties)
        out = nm.ane_fix(out)
        if step.op.name == "log":
            out[arrays[0] == 0] = LOG_OF_ZERO
        return out.astype(np.float32)


def run_recording(program: EmulatedProgram, inputs: dict) -> tuple[dict, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The outputs, and every op's result as returned with a copy taken at once (to catch a later in-place write)."""
    steps: list[tuple[str, np.ndarray, np.ndarray]] = []
    execute = program._execute

    def recording(step, env):
        out = execute(step, env)
        steps.append((step.var, out, np.array(out, copy=True)))
        return out

    program._execute = recording
    try:
        return program.run(inputs), steps
    finally:
        del program._execute


@pytest.mark.parametrize("meaning", [lambda k, xs, a: xs[0], lambda k, xs, a: xs[0][...]], ids=["itself", "view"])
def test_results_that_share_an_input_are_rounded_on_a_copy(tmp_path, monkeypatch, meaning):
    """Rounding happens in place only on arrays an op allocated: a meaning that hands back its input or a view of
    it (a patched relu here) must leave the input, which a later reshape passes to an output, untouched."""
    monkeypatch.setitem(OPS, "relu", dataclasses.replace(OPS["relu"], compute=meaning))
    b = GraphBuilder("share")
    x = b.input("x", (1, 4, 1, 2))
    b.output("r", b.relu(x, name="r"))
    b.output("v", b.reshape(x, shape=[1, 8, 1, 1], name="v"))
    compile_graph(b.graph, "default").module.write(tmp_path)
    data = np.array([-0.0, 1.0, -3.0, np.nan, 0.1, -0.0, 2.0, 5.0], F16).reshape(1, 4, 1, 2)
    out = load_program(tmp_path).run({"x": data})
    held = nm.boundary_input(data, "fp16")
    assert out["r"].tobytes() == nm.ane_fix(held).tobytes()
    assert out["v"].tobytes() == held.tobytes()  # -0 kept: x was not rounded in place


@pytest.fixture(scope="module")
def block_dir(tmp_path_factory):
    b = GraphBuilder("block")
    x = b.input("x", (1, 64, 1, 16))
    b.output("y", add_block(b, x, 64, 4, np.random.default_rng(7)))
    directory = tmp_path_factory.mktemp("block")
    compile_graph(b.graph, "default").module.write(directory)
    return directory


def block_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (1, 64, 1, 16))
    big = x * 3000.0  # overflows inside the MLP: inf, and NaN (inf - inf) turned to 0
    tiny = x * 2e-6  # fp16 subnormals everywhere
    specials = x.copy()
    specials[0, :4, 0, 0] = [np.nan, np.inf, -np.inf, -0.0]
    return {"normal": x.astype(F16), "big": big.astype(np.float32), "tiny": tiny.astype(F16), "specials": specials}


@pytest.mark.parametrize("settings", [
    Numerics(accumulator="fp32"),
    Numerics(),
    Numerics(accumulator="groups-of-4", reduction_ties="half-even"),
    Numerics(accumulator="fp32", flush_subnormals_in_matmul=False, elementwise_ties="half-away",
             matmul_ceiling=float("inf")),
], ids=["fp32", "fixed-point", "groups-of-4", "fp32-no-flush-half-away"])
def test_transformer_block_is_bit_identical_to_the_fp16_round_trip_path(block_dir, settings):
    text = (block_dir / "model.mil").read_text()
    new = load_program(block_dir, settings)
    old = ReferenceProgram(parse_program(text), directory_blob_loader(block_dir), settings)
    for label, x in block_inputs().items():
        (got, new_steps), (want, old_steps) = run_recording(new, {"x": x}), run_recording(old, {"x": x})
        assert got["y"].dtype == want["y"].dtype == F16
        assert got["y"].tobytes() == want["y"].tobytes(), label
        assert [var for var, _, _ in new_steps] == [var for var, _, _ in old_steps]
        for (var, out, copy), (_, ref, _) in zip(new_steps, old_steps):
            assert out.dtype == np.float32, var
            assert out.tobytes() == ref.tobytes(), f"{label}: {var} differs"
            assert out.tobytes() == copy.tobytes(), f"{label}: {var} was modified after it was computed"


@pytest.mark.parametrize("settings", [Numerics(), Numerics(reduce_sum_fp16=True, reduction_ties="half-even")],
                         ids=["wide", "fp16-running-sum"])
def test_reduce_sum_held_is_reduce_sum_on_the_fp16_values(settings, rng):
    """The emulator sums float32-held values without casting them to fp16 first: the same bits as the fp16 path,
    with overflow to inf, inf - inf and sums that round (ties included) among the values."""
    x = rng.normal(0, 1, (3, 5, 40)) * rng.choice([1e-3, 1.0, 3000.0], (3, 5, 1))
    x[0, 0, :3] = [np.inf, -np.inf, 1.0]
    x[1, 1, :] = 2048.0
    x[1, 1, 0] = 1.0
    x16 = x.astype(F16)
    for axes, keep in [((2,), True), ((1, 2), False), (None, False), (0, True)]:
        want = nm.reduce_sum(x16, axes, keep, settings).astype(np.float32)
        got = nm.reduce_sum_held(x16.astype(np.float32), axes, keep, settings)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), (axes, keep)
