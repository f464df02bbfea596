"""ANE numerics for the emulator: rounding, accumulation and the hardware's output rules.

The emulator holds every value as fp16 and computes each op in float32 (section 8 of the ANE reference); this module
turns those wide results into the fp16 the ANE would produce (section 9, items N1-N14). Items the public sources
disagree on are settings of :class:`Numerics`, with the reference's defaults.

Choices made where the reference is silent (each one a probe for ``orion doctor``):

* Tie rounding (N10): elementwise ops use ``elementwise_ties``; the OUTPUTS of conv, matmul and ``reduce_sum`` use
  ``reduction_ties``, because ANEForge reads 2050 for 2048+1 computed as a matmul on M1-M6. The same mode rounds the
  per-group sums of the ``groups-of-4`` model (they are partial results of the same reduction), while the steps of
  the optional fp16 running sum of ``reduce_sum`` are fp16 adds and use ``elementwise_ties`` (so the running sum
  stalls at 2048, as N2 describes).
* NaN (N6): a NaN produced anywhere inside an op (inf*0 or inf-inf inside a dot product, ...) turns the whole output
  element into +0, the same rule as for elementwise results. A NaN at the program boundary becomes +inf.
* A -0 handed in at the boundary is kept as the user wrote it; every op output turns it into +0.
* Subnormals (N9): the flush flag acts on conv/matmul operands and outputs only; ``reduce_sum`` passes them through
  like an elementwise op, and the internal group sums of ``groups-of-4`` are not flushed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from orion.errors import BindingError, GraphError, MILProgramError, SettingsError

ACCUMULATORS = ("fixed-point", "fp32", "groups-of-4")
TIES = ("half-even", "half-away")
#: Largest fp16 magnitude a slice with a nonzero last-axis offset keeps on M1/M2 (N11).
SLICE_OVERFLOW_LIMIT = 4094.0
#: Elements of the temporary products array of the exact-sum models: 4 MB of float32 stays in cache and is far
#: below the ~64 MB the emulator may spend (measured faster than larger chunks).
_PRODUCT_BUDGET = 1 << 20

_SIGN = 0x8000
_INF = 0x7C00  # exponent all ones, mantissa zero; larger magnitudes are NaNs
_MIN_NORMAL = 0x0400  # 2**-14; smaller nonzero magnitudes are subnormal

# N7 quirks. The measured thresholds are printed fp16 values, so they are compared as fp16.
_GELU_AT_ZERO = np.float16(-0.000543)
_SILU_AT_ZERO = np.float16(-0.001259)
_SIGMOID_LOW = float(np.float16(-9.94))
_SIGMOID_HIGH = float(np.float16(8.32))
_EXP_INF_FROM = float(np.float16(11.094))


@dataclass(frozen=True)
class Numerics:
    """The settings of the ANE numerics the public sources leave open (section 9 of the ANE reference).

    Defaults are the reference's: a ``fixed-point`` accumulator on a 2**-16 grid (N3), subnormals flushed inside
    conv/matmul (N9), ties half-even for elementwise and half-away for reduction outputs and ``round`` (N10), no
    activation-table quirks (N7), a wide ``reduce_sum`` (N14), no M1/M2 slice overflow (N11) and the 32768 matmul ceiling (N4).
    """

    accumulator: str = "fixed-point"
    accumulator_grid: float = 2.0**-16
    flush_subnormals_in_matmul: bool = True
    elementwise_ties: str = "half-even"
    reduction_ties: str = "half-away"
    #: The ``round`` op's ties: ANEForge's sweeps send them away from zero; MIL (numpy) rounds them to even (N10).
    round_ties: str = "half-away"
    activation_quirks: bool = False
    reduce_sum_fp16: bool = False
    slice_offset_overflow: bool = False
    matmul_ceiling: float = 32768.0

    def __post_init__(self) -> None:
        _check_choice("accumulator", self.accumulator, ACCUMULATORS)
        _check_choice("elementwise_ties", self.elementwise_ties, TIES)
        _check_choice("reduction_ties", self.reduction_ties, TIES)
        _check_choice("round_ties", self.round_ties, TIES)
        for name in ("flush_subnormals_in_matmul", "activation_quirks", "reduce_sum_fp16", "slice_offset_overflow"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise SettingsError(f"Numerics: {name}={value!r} is not a boolean; use true or false")
            object.__setattr__(self, name, bool(value))
        grid = _real(self.accumulator_grid, "accumulator_grid")
        # A power of two keeps p/grid exact in float32; 2**-24 (the fp16 subnormal step) bounds the exact float64 sum.
        if not (2.0**-24 <= grid <= 1.0 and math.frexp(grid)[0] == 0.5):
            raise SettingsError(
                f"Numerics: accumulator_grid={self.accumulator_grid!r} is not a power of two in [2**-24, 1]; "
                "use e.g. 2**-16 = 1.52587890625e-05"
            )
        ceiling = _real(self.matmul_ceiling, "matmul_ceiling")
        if not ceiling > 0:
            raise SettingsError(
                f"Numerics: matmul_ceiling={self.matmul_ceiling!r} must be > 0; use 32768.0, or inf for no ceiling"
            )
        object.__setattr__(self, "accumulator_grid", grid)
        object.__setattr__(self, "matmul_ceiling", ceiling)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Numerics:
        """Build from a settings mapping (a settings file or a report); missing keys keep their defaults."""
        if not isinstance(d, Mapping):
            raise SettingsError(f"Numerics settings must be a mapping of names to values, not {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise SettingsError(
                f"Numerics: unknown setting(s) {', '.join(map(repr, unknown))}; known settings: {', '.join(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name, the inverse of :meth:`from_dict`."""
        return asdict(self)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"Numerics: {name}={value!r} is not one of {', '.join(map(repr, choices))}; pick one of them")


def _real(value: object, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SettingsError(f"Numerics: {name}={value!r} is not a number; give a float")
    result = float(value)
    if math.isnan(result):
        raise SettingsError(f"Numerics: {name} is NaN; give a positive number")
    return result


# ---------------------------------------------------------------------------------------------------------- rounding


def round_fp16(x: np.ndarray, ties: str = "half-even") -> np.ndarray:
    """Round float32/float64 values to fp16 once, overflowing to +-inf from 65520 on (N5).

    numpy's cast already rounds half-even (correctly, from float64 too). ``"half-away"`` then fixes the exact ties
    the cast sent toward zero. Such a tie leaves a remainder ``r = x - fp16(x)`` (exact by Sterbenz's lemma, or
    because fp16(x) is 0) of half an fp16 step: a power of two, so only elements whose remainder has an all-zero
    significand are examined closely, which keeps the cost at a few passes over the array.
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}")
    x = np.asarray(x)
    if x.dtype == np.float16:
        return x
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if ties == "half-even":
            return x.astype(np.float16)
        x = x if x.flags.c_contiguous else x.copy(order="C")
        h = x.astype(np.float16)
        r = x - h.astype(x.dtype)
    uint, significand = (np.uint32, (1 << 23) - 1) if x.dtype == np.float32 else (np.uint64, (1 << 52) - 1)
    power_of_two = (r.view(uint) & uint(significand)) == 0
    power_of_two &= r != 0
    idx = np.flatnonzero(power_of_two)
    if idx.size:
        xs, hs, rs = x.ravel()[idx], h.ravel()[idx], r.ravel()[idx]
        with np.errstate(over="ignore", invalid="ignore"):
            step = np.spacing(np.abs(hs)).astype(x.dtype)  # the gap above |h|, where the rejected neighbour lies
            away = (2 * np.abs(rs) == step) & (np.abs(xs) > np.abs(hs))
        if away.any():
            toward = np.copysign(np.inf, xs[away]).astype(np.float16)
            h.ravel()[idx[away]] = np.nextafter(hs[away], toward)
    return h


@functools.lru_cache(maxsize=None)
def _magnitude_bits_at_least(limit: float) -> int:
    """The smallest fp16 magnitude bit pattern whose value is >= ``limit`` (0x7C00, inf, if no finite one is)."""
    magnitudes = np.arange(_INF + 1, dtype=np.uint16).view(np.float16).astype(np.float64)
    return int(np.searchsorted(magnitudes, limit, side="left"))


def _fp16_of_bits(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits).astype(np.uint16, copy=False).view(np.float16)


def _as_fp16(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float16:
        raise TypeError(f"{what} must be a float16 array (the emulator keeps fp16 values), got {x.dtype}")
    return x


def _finish(h16: np.ndarray, flush_subnormals: bool = False, ceiling: float | None = None) -> np.ndarray:
    """The output rules on fp16 bit patterns: optional ceiling to +-inf, NaN and -0 (and subnormals) to +0."""
    bits = h16.view(np.uint16)
    magnitude = bits & np.uint16(0x7FFF)
    out = bits
    if ceiling is not None:
        over = (magnitude >= _magnitude_bits_at_least(ceiling)) & (magnitude <= _INF)
        out = np.where(over, (bits & np.uint16(_SIGN)) | np.uint16(_INF), out)
    smallest_kept = _MIN_NORMAL if flush_subnormals else 1
    zero = (magnitude > _INF) | (magnitude < smallest_kept)
    return _fp16_of_bits(np.where(zero, np.uint16(0), out))


def ane_fix(x16: np.ndarray) -> np.ndarray:
    """Apply the N6 output policy after an op: NaN becomes +0 and -0 becomes +0, so outputs are NaN-free.

    Returns a new array; the argument is never modified.
    """
    return _finish(_as_fp16(x16, "ane_fix input"))


def boundary_input(x: np.ndarray, dtype: str | np.dtype | type) -> np.ndarray:
    """The fp16 values the ANE holds for a user's array bound to an input declared ``fp16`` or ``fp32`` (N1, N6).

    An fp32 input travels as float32 (the host's cast, possibly rounding a float64 array first) and the program's
    ``cast`` rounds it to fp16: both steps round half-even and overflow to inf. An fp16 input is rounded directly.
    A NaN becomes +inf (N6); -0 is kept, since only op outputs are known to turn it into +0.
    """
    declared = _io_dtype(dtype)
    data = np.asarray(x)
    if data.dtype.kind not in "biuf":
        raise BindingError(f"input data of dtype {data.dtype} is not real numbers; pass a float16 or float32 array")
    with np.errstate(over="ignore", invalid="ignore"):
        if declared == np.float32 and data.dtype != np.float16:
            data = data.astype(np.float32)
        held = round_fp16(data.astype(np.float64) if data.dtype.kind in "biu" else data, "half-even")
    bits = held.view(np.uint16)
    nan = (bits & np.uint16(0x7FFF)) > _INF
    return _fp16_of_bits(np.where(nan, np.uint16(_INF), bits))


def _io_dtype(dtype: str | np.dtype | type) -> np.dtype:
    names = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in names.values():
        raise BindingError(f"I/O dtype {dtype!r} is not one the ANE accepts; declare the input fp16 or fp32")
    return resolved


# --------------------------------------------------------------------------------- the same rules on float32 storage
# The emulator holds fp16 values in float32 arrays. numpy's float32 <-> float16 casts cost 1.5-2.5 ns per element,
# ten times a pass of integer or float32 arithmetic, so the functions below get the same bits with such passes, in
# place, and skip the passes for NaN, overflow and fp16 subnormals on arrays that have none. Their references are
# round_fp16/_finish/ane_fix/boundary_input above, which stay the definitions they are tested against.

_F32_SIGN = np.uint32(0x80000000)
_F32_MAGNITUDE = np.uint32(0x7FFFFFFF)
_F32_INF = 0x7F800000
_F32_KEEP = np.uint32(0xFFFFE000)  # sign, exponent and the 10 mantissa bits fp16 has; the low 13 bits go
_F32_HALF = 0x1000  # half of the last kept mantissa bit: the rounding tie
#: 2**-14, the smallest normal fp16: below it fp16 has a fixed step of 2**-24, not 10 bits of mantissa.
_F32_MIN_NORMAL16 = 0x38800000
#: 2**-14 - 2**-25, the tie between the largest fp16 subnormal and 2**-14 (both tie modes round it up).
_F32_SUBNORMAL_TIE = 0x387FE000
_HALF = np.float32(0.5)
#: Elements rounded (or flushed) at a time in large arrays: 256 KB of float32, which stays in a core's L2.
_ROUND_CHUNK = 1 << 16
_SUBNORMAL_STEP = np.float32(2.0**-24)


@functools.lru_cache(maxsize=None)
def _f32_overflow_bits(ceiling: float | None) -> tuple[int, int]:
    """(T, P): a rounded magnitude with float32 bits >= T goes to inf; only magnitudes >= P can round that high.

    T is the smallest fp16 >= ``ceiling`` (the fp16 overflow, 2**16 rounded, if none is smaller); P is the midpoint
    between T and the fp16 value below it, a cheap bound checked before the exact test.
    """
    top = _INF if ceiling is None else _magnitude_bits_at_least(ceiling)
    if top == _INF:  # no finite fp16 reaches the ceiling: fp16's own overflow, 2**16 once rounded to 11 bits
        below, limit = 65504.0, 2.0**16
    else:
        below, limit = np.array([top - 1, top], dtype=np.uint16).view(np.float16).astype(np.float64)
    as_bits = np.array([limit, (limit + below) / 2], dtype=np.float32).view(np.uint32)
    return int(as_bits[0]), int(as_bits[1])


def round_f32(x32: np.ndarray, ties: str = "half-even", *, ceiling: float | None = None,
              flush_subnormals: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """``_finish(round_fp16(x32, ties), flush_subnormals, ceiling)`` as float32, computed on the float32 bits.

    The bits of every result equal those of the reference path converted to float32: one rounding to fp16 with
    ``ties`` (overflow to +-inf from 65520 on), magnitudes that round to ``ceiling`` or more sent to +-inf, NaN and
    -0 to +0, and with ``flush_subnormals`` results below 2**-14 to +0. ``x32`` must be float32; the result goes to
    ``out`` (which may be ``x32`` itself, to round in place) or to a new array.
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}")
    x = np.asarray(x32)
    if x.dtype != np.float32:
        raise TypeError(f"round_f32 takes float32 values, got {x.dtype}; round float64 with round_fp16")
    if out is None:
        out = x.copy()
    elif out is not x:
        np.copyto(out, x)
    for piece in _in_cache_pieces(out):  # each element is rounded on its own: the same bits piece by piece
        _round_held(piece, ties, ceiling, flush_subnormals, nan_to=0, zero_sign=True)
    return out


def _in_cache_pieces(a: np.ndarray) -> Sequence[np.ndarray] | Iterator[np.ndarray]:
    """``a`` itself, or for a large C-contiguous array flat pieces of ``_ROUND_CHUNK`` elements, so that several
    elementwise passes over a piece run in cache (measured twice as fast on arrays of 1.5 MB and more)."""
    flat = a.reshape(-1) if a.flags.c_contiguous else None
    if flat is None or flat.size <= 2 * _ROUND_CHUNK:
        return (a,)
    return (flat[start:start + _ROUND_CHUNK] for start in range(0, flat.size, _ROUND_CHUNK))


def _round_held(f: np.ndarray, ties: str, ceiling: float | None, flush: bool, nan_to: int, zero_sign: bool) -> None:
    """Round the float32 array ``f`` in place to fp16 values (see :func:`round_f32`); NaN becomes the float32 bits
    ``nan_to`` and -0 stays -0 unless ``zero_sign``. Seven passes in the common case: four to find out which of
    the rare cases (NaN, fp16 subnormals, overflow) the array has, three to round."""
    if f.size == 0:
        return
    if f.ndim == 0:  # ufuncs return scalars for 0-d operands: work on a 1-element view
        f = f.reshape(1)
    u = f.view(np.uint32)
    t = np.bitwise_and(u, _F32_MAGNITUDE)
    np.subtract(t, 1, out=t)  # magnitude - 1: a zero wraps to 2**32 - 1 (or -1 read as int32) and joins no test
    signed = t.view(np.int32)
    largest = int(signed.max())  # the largest magnitude - 1
    if largest >= _F32_INF:  # a NaN (its magnitude is above inf's)
        np.copyto(u, np.uint32(nan_to), where=signed >= _F32_INF)
    if t.min() < _F32_MIN_NORMAL16 - 1:  # nonzero magnitudes below 2**-14: fp16's fixed 2**-24 step
        # done on their own, gathered: numpy's masked operations slow down on scattered masks
        small = np.flatnonzero(t < _F32_MIN_NORMAL16 - 1)
        flat = u.reshape(-1) if u.flags.c_contiguous else None
        values = (flat if flat is not None else u.ravel())[small]
        if flush:  # 0, but 2**-14 from the tie below it up (in both tie modes)
            rounded = np.where((values & _F32_MAGNITUDE) >= _F32_SUBNORMAL_TIE,
                               (values & _F32_SIGN) | np.uint32(_F32_MIN_NORMAL16), np.uint32(0))
        else:
            rounded = _round_subnormals(values.view(np.float32), ties, keep_sign=not zero_sign).view(np.uint32)
        if flat is not None:
            flat[small] = rounded
        else:
            u[np.unravel_index(small, u.shape)] = rounded
    # 11 significant bits from here; values already exact fp16 (as the small ones now are) pass through unchanged
    limit, maybe = _f32_overflow_bits(ceiling)
    overflow = largest >= maybe - 1
    if ties == "half-even" and not overflow:
        _split_half_even(f, t.view(np.float32), zero_sign)
        return
    if ties == "half-even":
        np.right_shift(u, 13, out=t)
        np.bitwise_and(t, 1, out=t)
        np.add(u, t, out=u)
        np.add(u, _F32_HALF - 1, out=u)
    else:  # half-away: on sign-magnitude bits, adding half a step to the magnitude rounds away from zero
        np.add(u, _F32_HALF, out=u)
    np.bitwise_and(u, _F32_KEEP, out=u)
    if overflow:
        np.bitwise_and(u, _F32_MAGNITUDE, out=t)
        over = t >= limit
        np.bitwise_and(u, _F32_SIGN, out=u, where=over)
        np.bitwise_or(u, np.uint32(_F32_INF), out=u, where=over)
    if zero_sign:
        np.add(f, np.float32(0.0), out=f)  # -0 + +0 = +0; every other value is unchanged


def _split_half_even(f: np.ndarray, scratch: np.ndarray, zero_sign: bool) -> None:
    """Round finite float32 values below 65520 to 11 significant bits, ties to even, in place: Veltkamp's split
    with c = (2**13 + 1) x, hi = c - (c - x), where float32 arithmetic does the rounding (checked against the
    integer rounding for every float32 of that range). Written as (x - c) + c it also turns -0 into +0."""
    c = np.multiply(f, np.float32(2**13 + 1), out=scratch)
    if zero_sign:
        np.subtract(f, c, out=f)
        np.add(f, c, out=f)
    else:
        np.subtract(c, f, out=f)
        np.subtract(c, f, out=f)


def _round_subnormals(x: np.ndarray, ties: str, keep_sign: bool) -> np.ndarray:
    """float32 values with 0 < |x| < 2**-14 rounded to multiples of 2**-24 (the fp16 subnormals, or 2**-14).

    The float32 step between 0.5 and 1 is 2**-24, so adding +-0.5 makes the float32 addition itself round |x| to
    that grid, ties to even; subtracting it back is exact. A value rounded to zero comes out +0 unless
    ``keep_sign``.
    """
    half = np.copysign(_HALF, x)
    rounded = (x + half) - half
    if ties == "half-away":
        # a tie the addition sent toward zero left x - rounded = +-2**-25 with x's sign (exact: both are within
        # 2**-25 of each other and below 2**-14); those move one step away from zero
        toward_zero = (x - rounded) == half * _SUBNORMAL_STEP
        rounded[toward_zero] += 2 * half[toward_zero] * _SUBNORMAL_STEP
    return np.copysign(rounded, x) if keep_sign else rounded


def hold_input(x: np.ndarray, dtype: str | np.dtype | type) -> np.ndarray:
    """``boundary_input(x, dtype).astype(np.float32)``: a user's array as the float32-held fp16 values the emulator
    computes with, the same bits with no float16 round trip for float16 and float32 data. Always a new array."""
    declared = _io_dtype(dtype)
    data = np.asarray(x)
    if data.dtype == np.float16:
        return _held_of_fp16_input(data)
    if data.dtype.kind == "f" and (data.dtype == np.float32 or declared == np.float32):
        with np.errstate(over="ignore"):
            held = data.astype(np.float32)  # the host's cast for an fp32 input; a copy for float32 data
        _round_held(held, "half-even", None, False, nan_to=_F32_INF, zero_sign=False)
        return held
    return boundary_input(data, declared).astype(np.float32)


def _held_of_fp16_input(h16: np.ndarray) -> np.ndarray:
    """fp16 bits widened on integers: the magnitude moved to float32's field and scaled by 2**112 (which also
    normalizes subnormals exactly), then the sign; inf stays inf and NaN becomes +inf (N6)."""
    w = h16.view(np.uint16).astype(np.uint32).reshape(h16.shape or (1,))
    sign = np.bitwise_and(w, 0x8000)
    np.bitwise_and(w, 0x7FFF, out=w)
    if w.size and w.max() >= _INF:
        np.copyto(sign, np.uint32(0), where=w > _INF)
        np.copyto(w, np.uint32(_F32_INF >> 13), where=w >= _INF)  # float32 inf once shifted; inf * 2**112 = inf
    np.left_shift(w, 13, out=w)
    held = w.view(np.float32)
    np.multiply(held, np.float32(2.0**112), out=held)
    np.left_shift(sign, 16, out=sign)
    np.bitwise_or(w, sign, out=w)
    return held.reshape(h16.shape)


def fp16_of_held(x32: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 arrays that hold fp16 values (every value the emulator holds) as float16, four times faster than
    ``astype``: scaling by 2**-112 puts fp16's exponent (or subnormal step) in place, so the bits need only a
    shift. Values that are not fp16 values are truncated, not rounded. Writes to ``out`` if given."""
    x = np.asarray(x32)
    if x.dtype != np.float32:
        raise TypeError(f"fp16_of_held takes float32 arrays, got {x.dtype}")
    if out is None:
        out = np.empty(x.shape, dtype=np.float16)
    scaled = np.multiply(x.reshape(x.shape or (1,)), np.float32(2.0**-112))
    bits = scaled.view(np.uint32)
    sign = np.right_shift(bits, 16)
    np.bitwise_and(sign, 0x8000, out=sign)
    np.right_shift(bits, 13, out=bits)
    np.bitwise_and(bits, 0x7FFF, out=bits)
    np.bitwise_or(bits, sign, out=out.view(np.uint16).reshape(bits.shape), casting="unsafe")
    return out


# ----------------------------------------------------------------------------------------------- conv and matmul


def _flush_subnormal_operand(x16: np.ndarray) -> np.ndarray:
    bits = x16.view(np.uint16)
    return _fp16_of_bits(np.where((bits & np.uint16(_INF)) == 0, np.uint16(0), bits))


def matmul(a16: np.ndarray, b16: np.ndarray, numerics: Numerics) -> np.ndarray:
    """``np.matmul`` of fp16 arrays as the ANE computes it: exact fp16 products, a wide sum, one rounding.

    Accumulator models (N3): ``"fp32"`` sums in float32 BLAS; ``"fixed-point"`` quantizes every product to the grid
    (round to nearest, ties even) and sums exactly; ``"groups-of-4"`` (the reference's third model) sums 4
    consecutive products in float32, rounds each group sum to fp16 and adds the groups exactly. The output is
    rounded with ``reduction_ties`` (2048+1 reads 2050 on hardware), subnormals flushed if set (N9), magnitudes
    >= ``matmul_ceiling`` sent to +-inf (N4), then NaN and -0 become +0 (N6).

    The fixed-point sum runs in float64 over integer counts of grid steps, so it is exact while the sum of the
    products' magnitudes stays below 2**53 steps (2**37 ~ 1.4e11 at the default grid): one product is at most
    65504**2 ~ 2**32, so it takes dozens of near-maximal products, far beyond the 32768 ceiling, to leave that range.
    """
    a, b = _as_fp16(a16, "matmul x"), _as_fp16(b16, "matmul y")
    if a.ndim == 0 or b.ndim == 0:
        raise GraphError(f"matmul needs operands of rank >= 1, got shapes {a.shape} and {b.shape}")
    vector_a, vector_b = a.ndim == 1, b.ndim == 1
    if vector_a:
        a = a[None, :]
    if vector_b:
        b = b[:, None]
    if a.shape[-1] != b.shape[-2]:
        raise GraphError(f"matmul inner dimensions differ: x {a16.shape} against y {b16.shape}")
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise GraphError(f"matmul batch dimensions do not broadcast: x {a16.shape} against y {b16.shape}") from None
    if numerics.flush_subnormals_in_matmul:
        a, b = _flush_subnormal_operand(a), _flush_subnormal_operand(b)
    (m, k), n = a.shape[-2:], b.shape[-1]
    with np.errstate(over="ignore", invalid="ignore"):
        if numerics.accumulator == "fp32":
            wide = np.matmul(a.astype(np.float32), b.astype(np.float32))
        else:
            a3 = np.broadcast_to(a, batch + (m, k)).reshape(-1, m, k)
            b3 = np.broadcast_to(b, batch + (k, n)).reshape(-1, k, n)
            wide = _exact_sum_matmul(a3, b3, numerics).reshape(batch + (m, n))
    out = finish_wide(wide, numerics)
    if vector_b:
        out = out[..., 0]
    if vector_a:
        out = out[..., 0, :] if not vector_b else out[..., 0]
    return out


def finish_wide(wide: np.ndarray, numerics: Numerics) -> np.ndarray:
    """A conv/matmul's wide sums to its fp16 output: one rounding (``reduction_ties``), subnormals flushed if set,
    the 2^15 ceiling, NaN-free."""
    return _finish(round_fp16(wide, numerics.reduction_ties), numerics.flush_subnormals_in_matmul,
                   numerics.matmul_ceiling)


def flush_subnormals(x: np.ndarray) -> np.ndarray:
    """fp16 values (in any float storage) below the smallest normal fp16, 2^-14, become 0 (a new array)."""
    # C order, whatever the input's: BLAS sums a transposed operand in another order (other fp32 bits). Three passes
    # (a masked copy into a copy, the former way, measured 1.3-1.6x slower on the matmul operands of a GPT-2 decode
    # step: numpy's masked copy slows down on scattered masks); -0 becomes +0, NaN stays NaN
    x = np.asarray(x, order="C")
    return np.where(np.abs(x) < np.float32(2.0**-14), np.zeros((), x.dtype), x)


def _chunks(batch: int, m: int, k: int, n: int, k_step: int) -> Iterator[tuple[slice, slice, slice]]:
    """Slices of (batch, rows, k) whose products array [k, batch, rows, n] stays near the budget."""
    if m * n >= _PRODUCT_BUDGET:
        bc, mc = 1, max(1, _PRODUCT_BUDGET // max(n, 1))
    else:
        bc, mc = max(1, min(batch, _PRODUCT_BUDGET // (m * n))), m
    kc = max(k_step, (_PRODUCT_BUDGET // (bc * mc * max(n, 1))) // k_step * k_step)
    for b0 in range(0, batch, bc):
        for m0 in range(0, m, mc):
            for k0 in range(0, k, kc):
                yield slice(b0, b0 + bc), slice(m0, m0 + mc), slice(k0, k0 + kc)


def _exact_sum_matmul(a3: np.ndarray, b3: np.ndarray, numerics: Numerics) -> np.ndarray:
    """[B, M, K] @ [B, K, N] -> float64 [B, M, N] under the fixed-point or groups-of-4 model."""
    batch, m, k = a3.shape
    n = b3.shape[-1]
    acc = np.zeros((batch, m, n), dtype=np.float64)
    if acc.size == 0 or k == 0:
        return acc
    fixed = numerics.accumulator == "fixed-point"
    # fp16 x fp16 products have 22 significant bits: exact in float32, also after scaling by a power of two.
    scale = 1.0 / numerics.accumulator_grid if fixed else 1.0
    a_t = (a3.astype(np.float32) * np.float32(scale)).transpose(2, 0, 1)  # [K, B, M]
    b_t = b3.astype(np.float32).transpose(1, 0, 2)  # [K, B, N]
    if not fixed and k % 4:  # zero products pad the last group without changing any sum
        pad = 4 - k % 4
        a_t = np.concatenate([a_t, np.zeros((pad,) + a_t.shape[1:], np.float32)])
        b_t = np.concatenate([b_t, np.zeros((pad,) + b_t.shape[1:], np.float32)])
        k += pad
    for bs, ms, ks in _chunks(batch, m, k, n, 1 if fixed else 4):
        a_c, b_c = a_t[ks, bs, ms, None], b_t[ks, bs, None, :]
        if fixed:
            products = a_c * b_c  # in grid steps
            np.rint(products, out=products)  # ties to even; exact, the result has fewer significant bits
            acc[bs, ms] += products.sum(axis=0, dtype=np.float64)
        else:
            group = a_c[0::4] * b_c[0::4]
            for j in (1, 2, 3):
                group += a_c[j::4] * b_c[j::4]  # the float32 group sum, in order
            acc[bs, ms] += round_fp16(group, numerics.reduction_ties).sum(axis=0, dtype=np.float64)
    if fixed:
        acc *= numerics.accumulator_grid
    return acc


# ---------------------------------------------------------------------------------------------------- reduce_sum


def reduce_sum(
    x16: np.ndarray, axes: int | Sequence[int] | None, keep_dims: bool, numerics: Numerics
) -> np.ndarray:
    """``reduce_sum`` over ``axes`` (all axes if None): a wide sum rounded once with ``reduction_ties``, or with
    ``reduce_sum_fp16`` an fp16 running sum in C order over the reduced elements (N14). Overflow only at the
    fp16 limit (65520 -> inf), no matmul ceiling (N4).

    The float64 sum of fp16 values (multiples of 2**-24, at most 65504) is exact while the sum of magnitudes
    stays below 2**29, e.g. for any 8192 values.
    """
    x = _as_fp16(x16, "reduce_sum x")
    reduced = _normalize_axes(axes, x.ndim)
    if not numerics.reduce_sum_fp16:
        return _wide_sum(x, reduced, keep_dims, numerics)
    kept = tuple(i for i in range(x.ndim) if i not in reduced)
    count = math.prod(x.shape[i] for i in reduced)
    rows = np.transpose(x, kept + reduced).reshape(tuple(x.shape[i] for i in kept) + (count,))
    running = np.zeros(rows.shape[:-1], dtype=np.float16)
    for i in range(rows.shape[-1]):
        # two fp16 values sum exactly in float64, so each step is one correct rounding
        with np.errstate(invalid="ignore"):
            step = running.astype(np.float64) + rows[..., i]
        running = round_fp16(step, numerics.elementwise_ties)
    if keep_dims:
        running = running.reshape(tuple(1 if i in reduced else s for i, s in enumerate(x.shape)))
    return _finish(np.asarray(running, dtype=np.float16))


def reduce_sum_held(x32: np.ndarray, axes: int | Sequence[int] | None, keep_dims: bool,
                    numerics: Numerics) -> np.ndarray:
    """``reduce_sum(x32.astype(np.float16), ...).astype(np.float32)`` for float32 arrays holding fp16 values: the
    wide sum reads them as they are, which spares the cast of every input element (the float64 sum of the same
    values, in the same order)."""
    if numerics.reduce_sum_fp16:
        return reduce_sum(x32.astype(np.float16), axes, keep_dims, numerics).astype(np.float32)
    return _wide_sum(x32, _normalize_axes(axes, x32.ndim), keep_dims, numerics).astype(np.float32)


def _wide_sum(x: np.ndarray, reduced: tuple[int, ...], keep_dims: bool, numerics: Numerics) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # inf - inf, made +0 below
        wide = np.sum(x, axis=reduced, dtype=np.float64, keepdims=keep_dims)
    return _finish(round_fp16(wide, numerics.reduction_ties))


def _normalize_axes(axes: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    listed = [axes] if isinstance(axes, (int, np.integer)) else list(axes)
    out = []
    for axis in listed:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
            raise MILProgramError(f"reduce_sum axis {axis!r} is out of range for a rank-{ndim} tensor")
        out.append(int(axis) % ndim)
    if len(set(out)) != len(out):
        raise MILProgramError(f"reduce_sum axes {listed} repeat an axis; list each axis once")
    return tuple(sorted(out))


# ------------------------------------------------------------------------------------------------- quirks (N7, N11)


def activation_quirks(op: str, x16_in: np.ndarray, y16_out: np.ndarray, numerics: Numerics) -> np.ndarray:
    """Patch an activation's exactly rounded output with the quirks of the ANE's tables (N7), if enabled.

    Measured on M1: gelu(0) = -0.000543 and silu(0) = -0.001259 (applied at an input of exactly +-0, the only
    points reported); sigmoid's input clamps to [-9.94, 8.32] (outputs beyond take the endpoint's value); exp is
    inf from 11.094 on (for fp16 inputs this equals the exact function's overflow, kept for clarity). Ops without
    a known quirk, or quirks disabled, return ``y16_out`` itself.
    """
    if not numerics.activation_quirks or op not in ("gelu", "silu", "sigmoid", "exp"):
        return y16_out
    x, y = _as_fp16(x16_in, f"{op} input"), _as_fp16(y16_out, f"{op} output")
    if x.shape != y.shape:
        raise GraphError(f"{op}: input shape {x.shape} and output shape {y.shape} differ")
    y = y.copy()
    if op == "gelu":
        y[x == 0] = _GELU_AT_ZERO
    elif op == "silu":
        y[x == 0] = _SILU_AT_ZERO
    elif op == "sigmoid":
        for edge, outside in ((_SIGMOID_LOW, x < _SIGMOID_LOW), (_SIGMOID_HIGH, x > _SIGMOID_HIGH)):
            y[outside] = np.float16(1.0 / (1.0 + math.exp(-edge)))
    else:
        y[x >= _EXP_INF_FROM] = np.inf
    return y


def slice_overflow(x16: np.ndarray, begins_last_axis_nonzero: bool, numerics: Numerics) -> np.ndarray:
    """M1/M2 (N11): a slice whose last-axis begin is nonzero sends |x| > 4094 to +-inf; otherwise ``x16`` itself."""
    x = _as_fp16(x16, "slice output")
    if not (numerics.slice_offset_overflow and begins_last_axis_nonzero):
        return x
    bits = x.view(np.uint16)
    magnitude = bits & np.uint16(0x7FFF)
    big = (magnitude > _magnitude_bits_at_least(SLICE_OVERFLOW_LIMIT)) & (magnitude <= _INF)
    return _fp16_of_bits(np.where(big, (bits & np.uint16(_SIGN)) | np.uint16(_INF), bits))
