"""Tests of the ANE numerics model (section 9 of the ANE reference).

Expected values come from reasoning about fp16 (spacing 2 in [2048, 4096), 16 in [16384, 32768), ...) or from
independent oracles: exact rational arithmetic with ``fractions.Fraction`` and a rounding function that looks fp16
neighbours up in a table of every fp16 value, never from the module under test.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orion.errors import BindingError, GraphError, OrionError, SettingsError
from orion.runtime.backends import numerics as nm
from orion.runtime.backends.numerics import (
    ACCUMULATORS,
    Numerics,
    activation_quirks,
    ane_fix,
    boundary_input,
    matmul,
    reduce_sum,
    round_fp16,
    slice_overflow,
)

F16 = np.float16
#: Every non-negative finite fp16 value in order; the index of a value is its bit pattern.
FP16_MAGNITUDES = np.arange(0x7C00, dtype=np.uint16).view(F16).astype(np.float64)
#: The same as exact rationals, plus 65536, the value an overflowing rounding "reaches" (bit pattern 0x7C00, even).
FP16_FRACTIONS = [Fraction(float(v)) for v in FP16_MAGNITUDES] + [Fraction(65536)]


def oracle_round(value: Fraction | float, ties: str) -> float:
    """Round an exact value to fp16 by looking up its two neighbours: an oracle independent of numpy's casts."""
    if isinstance(value, float) and math.isinf(value):
        return value
    value = Fraction(value)
    magnitude = abs(value)
    i = bisect_left(FP16_FRACTIONS, magnitude)
    if i == len(FP16_FRACTIONS):  # beyond 65536: overflow
        chosen = 0x7C00
    elif FP16_FRACTIONS[i] == magnitude:
        chosen = i
    else:
        below, above = i - 1, i
        gap_below, gap_above = magnitude - FP16_FRACTIONS[below], FP16_FRACTIONS[above] - magnitude
        if gap_below != gap_above:
            chosen = below if gap_below < gap_above else above
        elif ties == "half-away":
            chosen = above
        else:
            chosen = below if below % 2 == 0 else above
    result = math.inf if chosen == 0x7C00 else float(FP16_FRACTIONS[chosen])
    return -result if value < 0 else result


def ones_dot(count: int, numerics: Numerics) -> float:
    """The ANE's result for [1, count] @ [count, 1] with every element 1: the sum of ``count`` ones."""
    return float(matmul(np.ones((1, count), F16), np.ones((count, 1), F16), numerics)[0, 0])


# ------------------------------------------------------------------------------------------------- N2: wide sums


@pytest.mark.parametrize("accumulator", ACCUMULATORS)
def test_16384_ones_sum_exactly_in_every_accumulator(accumulator):
    assert ones_dot(16384, Numerics(accumulator=accumulator)) == 16384.0


def test_fp16_running_sum_stalls_at_2048_only_when_switched_on():
    ones = np.ones(4096, F16)
    # 2048 + 1 = 2049 lies halfway between 2048 and 2050; half-even keeps 2048 (mantissa 0), forever.
    assert float(reduce_sum(ones, [0], False, Numerics(reduce_sum_fp16=True))) == 2048.0
    assert float(reduce_sum(ones, [0], False, Numerics())) == 4096.0
    # With ties away every step past 2048 is a tie (2049, 2051, ...) that jumps by 2: 2048 + 2 * 952 for 3000 ones.
    away = Numerics(reduce_sum_fp16=True, elementwise_ties="half-away")
    assert float(reduce_sum(np.ones(3000, F16), [0], False, away)) == 3952.0


# ----------------------------------------------------------------------------------- N4 ceiling with N10 ties


@pytest.mark.parametrize("accumulator", ACCUMULATORS)
def test_sums_of_32767_and_32768_ones_overflow_at_the_matmul_ceiling(accumulator):
    numerics = Numerics(accumulator=accumulator)
    # fp16 spacing in [16384, 32768) is 16: 32767 is 1 from 32768 and 15 from 32752, so both sums round to
    # 32768 = 2**15, which the ceiling turns into inf.
    assert ones_dot(32767, numerics) == math.inf
    assert ones_dot(32768, numerics) == math.inf
    neg = matmul(np.ones((1, 32767), F16), -np.ones((32767, 1), F16), numerics)
    assert float(neg[0, 0]) == -math.inf
    # Without a ceiling the same sums are finite.
    assert ones_dot(32767, Numerics(accumulator=accumulator, matmul_ceiling=math.inf)) == 32768.0


@pytest.mark.parametrize("ties", ["half-away", "half-even"])
def test_32759_is_the_largest_finite_sum_of_ones_in_both_tie_modes(ties):
    # 32752 is the largest fp16 below 2**15 (mantissa all ones, odd), 16 below 32768 (mantissa 0, even). 32760 is
    # their midpoint, so both half-away and half-even round it up to 32768, which the ceiling sends to inf: the
    # "~32,759" limit of a bisection over K.
    numerics = Numerics(reduction_ties=ties)
    assert ones_dot(32759, numerics) == 32752.0
    assert ones_dot(32760, numerics) == math.inf


def test_reduce_sum_overflows_only_at_the_fp16_limit():
    numerics = Numerics()
    assert float(reduce_sum(np.ones(32768, F16), None, False, numerics)) == 32768.0
    assert float(reduce_sum(np.array([30000, 30000], F16), 0, False, numerics)) == 60000.0
    # 65519 is nearer 65504 than the overflow midpoint 65520; 65520 itself overflows in both tie modes.
    assert float(reduce_sum(np.array([65504, 15], F16), 0, False, numerics)) == 65504.0
    assert float(reduce_sum(np.array([65504, 16], F16), 0, False, numerics)) == math.inf
    assert float(reduce_sum(np.array([-65504, -16], F16), 0, False, numerics)) == -math.inf


# ------------------------------------------------------------------------------------------------- N10 ties


@pytest.mark.parametrize("accumulator", ACCUMULATORS)
@pytest.mark.parametrize(
    ("ties", "plus_2049", "plus_2051", "minus_2049"),
    # 2049 and 2051 are midpoints of fp16 neighbours 2 apart; the even ones are 2048 and 2052.
    [("half-away", 2050.0, 2052.0, -2050.0), ("half-even", 2048.0, 2052.0, -2048.0)],
)
def test_2048_plus_1_ties(accumulator, ties, plus_2049, plus_2051, minus_2049):
    numerics = Numerics(accumulator=accumulator, reduction_ties=ties)
    ones = np.ones(2, F16)
    for first, expected in ((2048, plus_2049), (2050, plus_2051), (-2050, minus_2049)):
        terms = np.array([first, 1], F16)
        assert float(matmul(terms, ones, numerics)) == expected
        assert float(reduce_sum(terms, 0, False, numerics)) == expected


def test_default_ties_are_half_even_elementwise_and_half_away_for_reductions():
    numerics = Numerics()
    assert float(round_fp16(np.float32(2049), numerics.elementwise_ties)) == 2048.0
    assert float(reduce_sum(np.array([2048, 1], F16), 0, False, numerics)) == 2050.0


# ------------------------------------------------------------------------------------------ N3 small products


def _small_products(exponent: int, numerics: Numerics) -> float:
    """[1, 64] @ [64, 1] with every product 2**exponent, from normal fp16 operands 2**-9 and 2**(exponent + 9)."""
    a = np.full((1, 64), 2.0**-9, F16)
    b = np.full((64, 1), 2.0 ** (exponent + 9), F16)
    return float(matmul(a, b, numerics)[0, 0])


def test_small_products_are_lost_or_kept_as_the_grid_says():
    fixed = Numerics()
    # On the 2**-16 grid a product of 2**-18 is 0.25 steps (rounds to 0) and 2**-17 is 0.5 (a tie, to even: 0).
    assert _small_products(-18, fixed) == 0.0
    assert _small_products(-17, fixed) == 0.0
    assert _small_products(-16, fixed) == 64 * 2.0**-16
    finer = Numerics(accumulator_grid=2.0**-18)
    assert _small_products(-18, finer) == 64 * 2.0**-18
    fp32 = Numerics(accumulator="fp32")
    groups = Numerics(accumulator="groups-of-4")  # a group of four 2**-18 is 2**-16, an fp16 value
    for exponent in (-18, -17, -16):
        assert _small_products(exponent, fp32) == 64 * 2.0**exponent
        assert _small_products(exponent, groups) == 64 * 2.0**exponent


def test_large_k_relative_error_of_fixed_point_grows_with_k():
    rng = np.random.default_rng(1)
    errors = {}
    for k in (512, 8192):
        a = (rng.standard_normal((16, k)) / np.sqrt(k)).astype(F16)
        b = (rng.standard_normal((k, 16)) / np.sqrt(k)).astype(F16)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        for accumulator in ("fixed-point", "fp32"):
            y = matmul(a, b, Numerics(accumulator=accumulator)).astype(np.float64)
            errors[accumulator, k] = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    print("relative errors:", {key: f"{value:.2e}" for key, value in errors.items()})
    # The reference cites 2.6e-3 (K 512) and 6.2e-2 (K 8192) on hardware.
    assert 5e-4 < errors["fixed-point", 512] < 1e-2
    assert 1e-2 < errors["fixed-point", 8192] < 2e-1
    assert errors["fixed-point", 8192] > 4 * errors["fixed-point", 512]
    # A float32 sum only pays the final fp16 rounding (~2**-11 relative at worst).
    assert errors["fp32", 8192] < 1e-3


# ------------------------------------------------------------------------------------------------- N9 subnormals


@pytest.mark.parametrize("accumulator", ACCUMULATORS)
def test_subnormal_operands_and_results_are_flushed_only_when_set(accumulator):
    flush = Numerics(accumulator=accumulator)
    keep = Numerics(accumulator=accumulator, flush_subnormals_in_matmul=False)
    tiny = np.array([2.0**-20], F16)  # below 2**-14: subnormal
    big = np.array([2.0**10], F16)
    assert float(matmul(tiny, big, flush)) == 0.0
    assert float(matmul(tiny, big, keep)) == 2.0**-10
    # 2**-8 * 2**-8 = 2**-16: on the grid, but a subnormal result.
    small = np.array([2.0**-8], F16)
    assert float(matmul(small, small, flush)) == 0.0
    assert float(matmul(small, small, keep)) == 2.0**-16


def test_reduce_sum_passes_subnormals():
    assert float(reduce_sum(np.array([2.0**-20, 2.0**-20], F16), 0, False, Numerics())) == 2.0**-19


# ------------------------------------------------------------------------------------------------- N6 NaN and -0


def test_ane_fix_turns_nan_and_negative_zero_into_positive_zero():
    x = np.array([np.nan, -np.nan, -0.0, 0.0, 1.5, -2.0, np.inf, -np.inf, 2.0**-24], F16)
    y = ane_fix(x)
    assert y.dtype == F16
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 1.5, -2.0, math.inf, -math.inf, 2.0**-24]
    assert not np.signbit(y[:4]).any()
    assert np.isnan(x[0]) and np.signbit(x[2])  # the argument is left alone


@pytest.mark.parametrize("accumulator", ACCUMULATORS)
def test_matmul_outputs_are_nan_free(accumulator):
    numerics = Numerics(accumulator=accumulator)
    inf_times_zero = matmul(np.array([np.inf, 1], F16), np.array([0, 1], F16), numerics)
    inf_minus_inf = matmul(np.array([np.inf, np.inf], F16), np.array([1, -1], F16), numerics)
    negative_zero = matmul(np.array([-1], F16), np.array([0], F16), numerics)  # -1 * 0 = -0
    for y in (inf_times_zero, inf_minus_inf, negative_zero):
        assert float(y) == 0.0 and not np.signbit(y)
    assert float(reduce_sum(np.array([np.inf, -np.inf], F16), 0, False, numerics)) == 0.0


# ------------------------------------------------------------------------------------------- N1 boundary casts


@pytest.mark.parametrize("declared", ["fp32", "fp16", np.float32, np.dtype(np.float16)])
@pytest.mark.parametrize("source", [np.float64, np.float32])
def test_boundary_casts(declared, source):
    x = np.array([70000, 65519, 65520, np.nan, -np.nan, -70000, 1.0, -0.0], source)
    y = boundary_input(x, declared)
    assert y.dtype == F16
    assert y[:7].tolist() == [math.inf, 65504.0, math.inf, math.inf, math.inf, -math.inf, 1.0]
    assert float(y[7]) == 0.0 and np.signbit(y[7])  # -0 is held as written


def test_fp32_boundary_rounds_twice():
    # 2049 + 2**-30 is just above a tie: direct rounding gives 2050; the float32 surface holds 2049, a tie, -> 2048.
    x = np.array([2049 + 2.0**-30])
    assert float(boundary_input(x, "fp16")[0]) == 2050.0
    assert float(boundary_input(x, "fp32")[0]) == 2048.0


def test_boundary_rejects_bad_types():
    with pytest.raises(BindingError, match="int32"):
        boundary_input(np.zeros(3), "int32")
    with pytest.raises(BindingError, match="complex"):
        boundary_input(np.zeros(3, complex), "fp16")


# ------------------------------------------------------------------------------------------------- round_fp16


def _neighbour_pairs():
    """Every pair of consecutive non-negative fp16 values, and the overflow pair (65504, 65536 -> inf)."""
    lower = FP16_MAGNITUDES
    upper = np.append(FP16_MAGNITUDES[1:], 65536.0)
    return lower, upper, np.arange(lower.size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_round_fp16_on_every_tie(dtype, sign):
    lower, upper, lower_bits = _neighbour_pairs()
    midpoints = ((lower + upper) / 2).astype(dtype)  # 12 significant bits: exact in float32 and float64
    assert np.array_equal(midpoints.astype(np.float64), (lower + upper) / 2)
    upper_value = np.where(upper == 65536.0, np.inf, upper)
    even = np.where(lower_bits % 2 == 0, lower, upper_value)
    away = round_fp16(sign * midpoints, "half-away")
    assert away.dtype == F16
    np.testing.assert_array_equal(away.astype(np.float64), sign * upper_value)
    np.testing.assert_array_equal(round_fp16(sign * midpoints, "half-even").astype(np.float64), sign * even)
    # One step of the input type off a tie, both modes pick the nearer neighbour.
    for ties in ("half-away", "half-even"):
        below = round_fp16(sign * np.nextafter(midpoints, dtype(0)), ties).astype(np.float64)
        above = round_fp16(sign * np.nextafter(midpoints, dtype(np.inf)), ties).astype(np.float64)
        np.testing.assert_array_equal(below, sign * lower)
        np.testing.assert_array_equal(above, sign * upper_value)


def test_round_fp16_half_away_equals_the_cast_off_ties_and_keeps_shapes():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 33)) * 10.0 ** rng.integers(-9, 6, (64, 33))).astype(np.float32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(round_fp16(x.T, "half-away"), x.T.astype(F16))
    scalar = round_fp16(np.float32(2049), "half-away")
    assert scalar.shape == () and float(scalar) == 2050.0
    assert np.isnan(round_fp16(np.array([np.nan]), "half-away")[0])
    with pytest.raises(ValueError):
        round_fp16(np.zeros(1), "up")


# ---------------------------------------------------------------- matmul against exact and float64 oracles

FINITE_FP16_BITS = st.integers(0, 0xFFFF).filter(lambda bits: bits & 0x7FFF < 0x7C00)
FP16_VALUES = st.one_of(
    FINITE_FP16_BITS.map(lambda bits: float(np.array(bits, np.uint16).view(F16))),
    st.integers(-64, 64).map(float),
    st.sampled_from([2.0**-9, 2.0**-8, 2.0**-7, 0.5, 1.5]),
)


def _fp16_matrices(draw, m, k, n, values=FP16_VALUES):
    a = np.array(draw(st.lists(values, min_size=m * k, max_size=m * k)), F16).reshape(m, k)
    b = np.array(draw(st.lists(values, min_size=k * n, max_size=k * n)), F16).reshape(k, n)
    return a, b


def _is_subnormal(v: float) -> bool:
    return 0 < abs(v) < 2.0**-14


def _oracle_output(exact_or_inf, numerics: Numerics) -> float:
    """The output rules applied to an exact sum: round, flush, ceiling, no NaN or -0."""
    if isinstance(exact_or_inf, float) and math.isnan(exact_or_inf):
        return 0.0
    y = oracle_round(exact_or_inf, numerics.reduction_ties)
    if numerics.flush_subnormals_in_matmul and _is_subnormal(y):
        y = 0.0
    if abs(y) >= numerics.matmul_ceiling:
        y = math.copysign(math.inf, y)
    return y + 0.0


def _oracle_matmul(a: np.ndarray, b: np.ndarray, numerics: Numerics) -> np.ndarray:
    """Scalar model of the fixed-point and groups-of-4 accumulators in exact rationals."""
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    if numerics.flush_subnormals_in_matmul:
        fa = np.where(np.abs(fa) < 2.0**-14, 0.0, fa)
        fb = np.where(np.abs(fb) < 2.0**-14, 0.0, fb)
    grid = Fraction(numerics.accumulator_grid)
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            products = [Fraction(fa[i, t]) * Fraction(fb[t, j]) for t in range(a.shape[1])]
            if numerics.accumulator == "fixed-point":
                total = sum((round(p / grid) * grid for p in products), Fraction(0))  # round(): ties to even
            else:
                groups = []
                for g in range(0, len(products), 4):
                    acc = np.float32(0)
                    for p in products[g : g + 4]:
                        acc = np.float32(acc + np.float32(p))  # each product is exact in float32
                    groups.append(oracle_round(Fraction(float(acc)), numerics.reduction_ties))
                infinite = [v for v in groups if math.isinf(v)]
                if infinite:
                    total = math.nan if len(set(infinite)) > 1 else infinite[0]
                else:
                    total = sum((Fraction(v) for v in groups), Fraction(0))
            out[i, j] = _oracle_output(total, numerics)
    return out


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 4)),
    accumulator=st.sampled_from(["fixed-point", "groups-of-4"]),
    ties=st.sampled_from(["half-away", "half-even"]),
    flush=st.booleans(),
    grid=st.sampled_from([2.0**-24, 2.0**-16, 2.0**-8, 1.0]),
)
def test_exact_sum_accumulators_match_a_rational_oracle(data, shape, accumulator, ties, flush, grid):
    a, b = _fp16_matrices(data.draw, *shape)
    numerics = Numerics(
        accumulator=accumulator, reduction_ties=ties, flush_subnormals_in_matmul=flush, accumulator_grid=grid
    )
    y = matmul(a, b, numerics)
    assert y.dtype == F16 and y.shape == (shape[0], shape[2])
    np.testing.assert_array_equal(y.astype(np.float64), _oracle_matmul(a, b, numerics))
    assert not np.signbit(y[y == 0]).any()


@pytest.mark.parametrize("accumulator", ["fixed-point", "groups-of-4"])
@pytest.mark.parametrize(("batch", "m", "k", "n"), [(3, 5, 10, 2), (1, 1, 21, 1)])
def test_chunked_products_match_the_oracle(accumulator, batch, m, k, n, monkeypatch):
    # A budget of 7 products forces chunks over the batch, the rows and k (in steps of 4 for groups-of-4).
    monkeypatch.setattr(nm, "_PRODUCT_BUDGET", 7)
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((batch, m, k)) * 4).astype(F16)
    b = (rng.standard_normal((batch, k, n)) * 4).astype(F16)
    numerics = Numerics(accumulator=accumulator)
    y = matmul(a, b, numerics)
    for i in range(batch):
        np.testing.assert_array_equal(y[i].astype(np.float64), _oracle_matmul(a[i], b[i], numerics))


SMALL_FP16 = st.floats(-8, 8, width=16, allow_subnormal=False)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), shape=st.tuples(st.integers(1, 5), st.integers(1, 8), st.integers(1, 5)))
def test_fp32_accumulator_is_within_fp32_summation_error_of_float64(data, shape):
    """One fp16 ulp of the exact result, plus what k fp32 additions may lose to cancellation (k * 2^-23 of the
    summed magnitudes): a sum of products near 30 that cancels to 2^-12 is 8 fp16 ulps off, legitimately."""
    a, b = _fp16_matrices(data.draw, *shape, values=SMALL_FP16)
    y = matmul(a, b, Numerics(accumulator="fp32", flush_subnormals_in_matmul=False)).astype(np.float64)
    reference = (a.astype(np.float64) @ b.astype(np.float64)).astype(F16).astype(np.float64)
    ulp = np.maximum(np.spacing(np.abs(y).astype(F16)), np.spacing(np.abs(reference).astype(F16)))
    summation = shape[1] * 2.0**-23 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    assert (np.abs(y - reference) <= ulp.astype(np.float64) + summation).all()


def test_matmul_broadcasts_like_numpy():
    rng = np.random.default_rng(7)
    a = rng.integers(-8, 9, (2, 1, 3, 4)).astype(F16)
    b = rng.integers(-8, 9, (5, 4, 2)).astype(F16)
    for accumulator in ACCUMULATORS:
        numerics = Numerics(accumulator=accumulator)
        # small integers: every sum is exact and representable, so the ANE result equals numpy's
        expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
        np.testing.assert_array_equal(matmul(a, b, numerics), expected)
        v = np.arange(4, dtype=F16)
        for x, y in ((v, b[0]), (a[0, 0], v), (v, v)):
            np.testing.assert_array_equal(matmul(x, y, numerics), np.matmul(x.astype(np.float64), y.astype(np.float64)))


def test_matmul_rejects_bad_shapes_and_dtypes():
    numerics = Numerics()
    with pytest.raises(GraphError, match="inner"):
        matmul(np.zeros((2, 3), F16), np.zeros((4, 2), F16), numerics)
    with pytest.raises(GraphError, match="broadcast"):
        matmul(np.zeros((2, 2, 3), F16), np.zeros((3, 3, 2), F16), numerics)
    with pytest.raises(TypeError, match="float16"):
        matmul(np.zeros((2, 3), np.float32), np.zeros((3, 2), F16), numerics)


# ------------------------------------------------------------------------------------------------- reduce_sum


@pytest.mark.parametrize("fp16_running_sum", [False, True])
@pytest.mark.parametrize(("axes", "keep_dims"), [((1, 3), True), ([-1], False), (None, False), (2, True)])
def test_reduce_sum_axes_and_shapes(axes, keep_dims, fp16_running_sum):
    rng = np.random.default_rng(11)
    x = rng.integers(-20, 21, (2, 3, 4, 5)).astype(F16)
    y = reduce_sum(x, axes, keep_dims, Numerics(reduce_sum_fp16=fp16_running_sum))
    summed = None if axes is None else tuple(np.atleast_1d(axes))
    expected = np.sum(x.astype(np.float64), axis=summed, keepdims=keep_dims)
    assert y.dtype == F16
    np.testing.assert_array_equal(y, expected)  # integer partial sums below 2048 are exact in fp16


def test_reduce_sum_rejects_bad_axes():
    with pytest.raises(OrionError, match="out of range"):
        reduce_sum(np.zeros((2, 3), F16), [2], False, Numerics())
    with pytest.raises(OrionError, match="repeat"):
        reduce_sum(np.zeros((2, 3), F16), [1, -1], False, Numerics())


# ------------------------------------------------------------------------------------------- N7 and N11 quirks


def test_activation_quirks_patch_only_when_enabled():
    on, off = Numerics(activation_quirks=True), Numerics()
    x = np.array([-0.0, 0.0, 1.0], F16)
    y = np.array([0.0, 0.0, 0.5], F16)
    assert activation_quirks("gelu", x, y, off) is y
    np.testing.assert_array_equal(activation_quirks("gelu", x, y, on), np.array([-0.000543, -0.000543, 0.5], F16))
    np.testing.assert_array_equal(activation_quirks("silu", x, y, on), np.array([-0.001259, -0.001259, 0.5], F16))
    assert activation_quirks("tanh", x, y, on) is y
    assert y.tolist() == [0.0, 0.0, 0.5]


def test_sigmoid_clamps_and_exp_overflow_quirks():
    on = Numerics(activation_quirks=True)
    x = np.array([-12.0, -9.0, 0.0, 12.0], F16)
    exact = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(F16)
    y = activation_quirks("sigmoid", x, exact, on)
    # below -9.94 the table holds its end value: sigmoid(-9.9375) ~ 4.84e-5, not sigmoid(-12) ~ 6.1e-6
    assert float(y[0]) == float(F16(1 / (1 + math.exp(9.9375))))
    assert y[1:].tolist() == exact[1:].tolist()
    e = np.array([11.0859375, 11.09375, 12.0], F16)  # consecutive fp16 values around 11.094
    patched = activation_quirks("exp", e, np.array([65248.0, 60000.0, 1.0], F16), on)
    assert patched.tolist() == [65248.0, math.inf, math.inf]


def test_slice_overflow_only_on_m1_m2_with_an_offset():
    x = np.array([4094, 4096, -5000, 100, -np.inf], F16)
    on = Numerics(slice_offset_overflow=True)
    assert slice_overflow(x, True, on).tolist() == [4094.0, math.inf, -math.inf, 100.0, -math.inf]
    assert slice_overflow(x, False, on) is x
    assert slice_overflow(x, True, Numerics()) is x


# ------------------------------------------------------------------------------------------------- settings


def test_numerics_defaults_round_trip_and_validation():
    defaults = Numerics()
    assert defaults.to_dict() == {
        "accumulator": "fixed-point",
        "accumulator_grid": 2.0**-16,
        "flush_subnormals_in_matmul": True,
        "elementwise_ties": "half-even",
        "reduction_ties": "half-away",
        "round_ties": "half-away",
        "activation_quirks": False,
        "reduce_sum_fp16": False,
        "slice_offset_overflow": False,
        "matmul_ceiling": 32768.0,
    }
    custom = Numerics.from_dict({"accumulator": "fp32", "matmul_ceiling": 32760})
    assert custom.matmul_ceiling == 32760.0 and isinstance(custom.matmul_ceiling, float)
    assert Numerics.from_dict(custom.to_dict()) == custom
    with pytest.raises(OrionError, match="'accumulater'"):
        Numerics.from_dict({"accumulater": "fp32"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("accumulator", "fp16"),
        ("accumulator_grid", 3e-5),
        ("accumulator_grid", 2.0**-30),
        ("accumulator_grid", True),
        ("flush_subnormals_in_matmul", "yes"),
        ("elementwise_ties", "half-up"),
        ("reduction_ties", None),
        ("matmul_ceiling", -1.0),
        ("matmul_ceiling", math.nan),
    ],
)
def test_numerics_rejects_bad_values_by_name(field, value):
    with pytest.raises(OrionError, match=field):
        Numerics(**{field: value})


def test_round_ties_are_a_setting_and_mil_rounds_them_to_even():
    """N10: ANEForge measured the ANE's ``round`` sending ties away from zero (the default); MIL's own meaning, the
    IR's plain kernels and coremltools', rounds them to even."""
    from orion.ir.ops import Kernels
    from orion.runtime.backends.emulator import AneKernels

    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 2.4, -2.6], np.float32)
    assert AneKernels(Numerics()).round_integer(x).tolist() == [1, 2, 3, -1, -3, 2, -3]
    assert AneKernels(Numerics(round_ties="half-even")).round_integer(x).tolist() == [0, 2, 2, -0.0, -2, 2, -3]
    assert Kernels().round_integer(x).tolist() == [0, 2, 2, -0.0, -2, 2, -3]
    with pytest.raises(SettingsError, match="round_ties"):
        Numerics(round_ties="up")
