"""Every operation Orion knows, declared once: MIL name, tensor inputs, attributes, shape/dtype rule, numpy meaning.

The same declarations serve the graph builder (shape inference), the MIL emitter (which attributes become named
consts), the MIL parser's checks, and the emulator (the numpy meaning). Names follow coremltools' iOS18 op
definitions so the emitted text is what the ANE compiler expects.

Numpy meanings compute in float32 on float32 arrays. Three operations are routed through a :class:`Kernels` object so
that a backend can model the hardware: ``matmul`` (conv and matmul) and ``reduce_sum`` (its accumulator), and
``round`` (its tie rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from orion.errors import GraphError
from orion.ir.types import CAST_DTYPES, FLOAT_DTYPES, NUMPY_DTYPES, TensorType

REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """An op attribute. ``kind`` is how MIL spells it: ``int`` (int32 scalar), ``ints`` (1-D int32 tensor),
    ``bool``, ``bools`` (1-D bool tensor), ``string``, ``float`` (a scalar of the op's float dtype, coremltools'
    type ``T``: clip's bounds, an ``epsilon``), ``tensor`` (a const's value). A default of None means absent: the
    emitter writes nothing and the op applies coremltools' default."""

    kind: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: Callable[[list[TensorType], dict], TensorType]
    compute: Callable[["Kernels", list[np.ndarray], dict], np.ndarray]
    #: ``elementwise``, ``activation``, ``wide`` (conv/matmul: wide accumulator), ``reduction``, ``layout``,
    #: ``index`` (picks values or their positions without computing: argmax, topk), ``state``, ``const``,
    #: ``constexpr`` (decodes constants into a weight, once)
    kind: str = "elementwise"
    #: Inputs that may be absent (conv ``bias``).
    optional: tuple[str, ...] = ()
    #: The single input that takes a tuple of values (concat ``values``).
    variadic: str | None = None
    #: Reported to run on the ANE (reference sections 3 and 9). The catalog (ANE-34) refuses the others: the
    #: emulator runs every declared op, but a program that reaches the hardware should use only these.
    ane_known: bool = True
    #: The op gives several results (``split``, ``topk``): ``infer`` returns a tuple of types and ``compute`` a
    #: tuple of arrays, one per result, in the order a statement lists them.
    several_results: bool = False

    def resolve_attrs(self, attrs: dict) -> dict:
        """Fill defaults and reject unknown or missing attributes, naming them."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise GraphError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; known: {sorted(self.attrs)}")
        out = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                out[key] = attrs[key]
            elif spec.default is REQUIRED:
                raise GraphError(f"{self.name}: attribute {key!r} is required")
            else:
                out[key] = spec.default
        return out


class Kernels:
    """How conv/matmul and reduce_sum accumulate. This default is plain float32; the emulator substitutes ANE rules."""

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.matmul(a.astype(np.float32, copy=False), b.astype(np.float32, copy=False))

    def reduce_sum(self, x: np.ndarray, axes: tuple[int, ...], keep_dims: bool) -> np.ndarray:
        return np.sum(x, axis=axes, keepdims=keep_dims, dtype=np.float64).astype(np.float32)

    def round_integer(self, x: np.ndarray) -> np.ndarray:
        """MIL's ``round``: ties to even, as numpy and coremltools' value inference (the ANE's is a setting, N10)."""
        return np.round(x)


OPS: dict[str, OpDef] = {}


def _declare(name: str, inputs: Sequence[str], attrs: dict[str, Attr] | None = None, **kw) -> None:
    OPS[name] = OpDef(name=name, inputs=tuple(inputs), attrs=attrs or {}, **kw)


def _fail(op: str, msg: str) -> GraphError:
    return GraphError(f"{op}: {msg}")


def _axis(op: str, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise _fail(op, f"axis {axis} out of range for rank {rank}")
    return axis % rank


# ---------------------------------------------------------------------------------------------------------------------
# Elementwise


def _float(op: str, t: TensorType) -> TensorType:
    if t.dtype not in FLOAT_DTYPES:
        raise _fail(op, f"needs an fp16 or fp32 tensor, got {t.dtype}")
    return t


def _broadcast(op: str):
    def infer(types: list[TensorType], attrs: dict) -> TensorType:
        x, y = types
        if x.dtype != y.dtype:
            raise _fail(op, f"operands have different dtypes {x.dtype} and {y.dtype}; insert a cast")
        try:
            shape = np.broadcast_shapes(x.shape, y.shape)
        except ValueError:
            raise _fail(op, f"shapes {list(x.shape)} and {list(y.shape)} do not broadcast") from None
        return TensorType(x.dtype, tuple(shape))

    return infer


def _same(op: str):
    return lambda types, attrs: _float(op, types[0])


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
}
for _name, _fn in _BINARY.items():
    _declare(
        _name,
        ("x", "y"),
        infer=_broadcast(_name),
        compute=lambda k, xs, a, fn=_fn: fn(xs[0], xs[1]),
    )


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): far below fp16 resolution, and numpy has no erf.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.negative(x)  # 1 / (1 + exp(-x)), each step in place on one new array
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the right limit, 0
        np.exp(e, out=e)
    np.add(e, 1.0, out=e)
    return np.divide(1.0, e, out=e)


def _rsqrt(x: np.ndarray) -> np.ndarray:
    root = np.sqrt(x)
    return np.divide(1.0, root, out=root)


GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")


def _gelu(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return x * _sigmoid(1.702 * x)


def _gelu_infer(types, attrs):
    if attrs["mode"] not in GELU_MODES:
        raise _fail("gelu", f"mode {attrs['mode']!r} is not one of {GELU_MODES}")
    return _float("gelu", types[0])


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp,
    "sqrt": np.sqrt,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x * _sigmoid(x),
}
for _name, _fn in _UNARY.items():
    _declare(_name, ("x",), infer=_same(_name), compute=lambda k, xs, a, fn=_fn: fn(xs[0]), kind="activation")


#: coremltools' default ``epsilon`` of each op, held in fp16 as the ANE holds every constant (N1): log's 1e-45 and
#: rsqrt's 1e-12 vanish, inverse's 1e-4 becomes 1.0014e-4. (coremltools types the default in x's dtype; an fp32
#: program keeps the tiny values until the ANE casts them.)
DEFAULT_EPSILON = {op: float(np.float16(eps)) for op, eps in {
    "inverse": 1e-4, "log": 1e-45, "rsqrt": 1e-12,
    "layer_norm": 1e-5, "batch_norm": 1e-5, "instance_norm": 1e-5, "l2_norm": 1e-6,
}.items()}


def _epsilon(op: str, attrs: dict) -> float:
    return DEFAULT_EPSILON[op] if attrs["epsilon"] is None else float(attrs["epsilon"])


def _with_epsilon(op: str, fn: Callable[[np.ndarray], np.ndarray]):
    """``fn(x + epsilon)``, coremltools' meaning of the ops that take an optional ``epsilon``."""

    def compute(k, xs, a):
        eps = _epsilon(op, a)
        return fn(xs[0] + eps if eps else xs[0])

    return compute


for _name, _fn in (("log", np.log), ("rsqrt", _rsqrt), ("inverse", np.reciprocal)):
    _declare(_name, ("x",), {"epsilon": Attr("float", None)}, infer=_same(_name), compute=_with_epsilon(_name, _fn),
             kind="activation")
_declare(
    "gelu",
    ("x",),
    {"mode": Attr("string", "EXACT")},
    infer=_gelu_infer,
    compute=lambda k, xs, a: _gelu(xs[0], a["mode"]),
    kind="activation",
)
_declare("identity", ("x",), infer=lambda t, a: t[0], compute=lambda k, xs, a: xs[0], kind="layout")


# Further unary ops of coremltools' iOS15-iOS18 opsets. ``elementwise`` ones are exact, or one product rounded once;
# ``activation`` ones are the transcendental functions the ANE evaluates by tables (N7): the exact function rounded
# to fp16. Only erf and the reciprocal (inverse) appear in the reference's measurements (N7); the others are not
# known to run on the ANE.


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(x, 0.0)  # log(1 + e^x) without overflow for large x


_MORE_UNARY: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str, bool]] = {
    "abs": (np.abs, "elementwise", False),
    "sign": (np.sign, "elementwise", False),
    "floor": (np.floor, "elementwise", False),
    "ceil": (np.ceil, "elementwise", False),
    "square": (np.square, "elementwise", False),
    "relu6": (lambda x: np.clip(x, 0.0, 6.0), "elementwise", False),
    "softplus": (_softplus, "activation", False),
    "erf": (_erf, "activation", True),
    "sin": (np.sin, "activation", False),
    "cos": (np.cos, "activation", False),
    "exp2": (np.exp2, "activation", False),
}
for _name, (_fn, _kind, _known) in _MORE_UNARY.items():
    _declare(_name, ("x",), infer=_same(_name), compute=lambda k, xs, a, fn=_fn: fn(xs[0]), kind=_kind,
             ane_known=_known)


def _clip_infer(types, attrs):
    if not attrs["alpha"] <= attrs["beta"]:
        raise _fail("clip", f"alpha {attrs['alpha']} is above beta {attrs['beta']}")
    return _float("clip", types[0])


_declare("round", ("x",), infer=_same("round"), compute=lambda k, xs, a: k.round_integer(xs[0]), ane_known=False)
_declare("clip", ("x",), {"alpha": Attr("float"), "beta": Attr("float")}, infer=_clip_infer,
         compute=lambda k, xs, a: np.clip(xs[0], a["alpha"], a["beta"]), ane_known=False)
_declare("leaky_relu", ("x",), {"alpha": Attr("float")}, infer=_same("leaky_relu"),
         compute=lambda k, xs, a: np.where(xs[0] >= 0, xs[0], a["alpha"] * xs[0]), ane_known=False)
_declare("elu", ("x",), {"alpha": Attr("float")}, infer=_same("elu"),
         compute=lambda k, xs, a: np.where(xs[0] > 0, xs[0], a["alpha"] * np.expm1(np.minimum(xs[0], 0.0))),
         kind="activation", ane_known=False)


# ---------------------------------------------------------------------------------------------------------------------
# Reductions and softmax


def _reduce_axes(op: str, t: TensorType, axes) -> tuple[int, ...]:
    axes = tuple(_axis(op, int(ax), t.rank) for ax in axes)
    if len(set(axes)) != len(axes):
        raise _fail(op, f"repeated axes {list(axes)}")
    return axes


def _reduce_infer(op: str):
    def infer(types, attrs):
        t = _float(op, types[0])
        axes = _reduce_axes(op, t, attrs["axes"])
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape) if attrs["keep_dims"] or i not in axes)
        return TensorType(t.dtype, shape)

    return infer


def _reduce_sum(k: Kernels, xs, a):
    return k.reduce_sum(xs[0], _reduce_axes("reduce_sum", TensorType("fp32", xs[0].shape), a["axes"]), a["keep_dims"])


def _reduce_mean(k: Kernels, xs, a):
    # a wide sum divided before any rounding: one rounding of the mean, not of the sum and then of the quotient
    axes = _reduce_axes("reduce_mean", TensorType("fp32", xs[0].shape), a["axes"])
    return np.mean(xs[0], axis=axes, keepdims=a["keep_dims"], dtype=np.float64).astype(np.float32)


_REDUCE_ATTRS = {"axes": Attr("ints"), "keep_dims": Attr("bool", False)}
_declare("reduce_sum", ("x",), _REDUCE_ATTRS, infer=_reduce_infer("reduce_sum"), compute=_reduce_sum, kind="reduction")
_declare(
    "reduce_mean", ("x",), _REDUCE_ATTRS, infer=_reduce_infer("reduce_mean"), compute=_reduce_mean, kind="reduction"
)
_declare(
    "reduce_max",
    ("x",),
    _REDUCE_ATTRS,
    infer=_reduce_infer("reduce_max"),
    compute=lambda k, xs, a: np.max(xs[0], axis=tuple(int(i) for i in a["axes"]), keepdims=a["keep_dims"]),
    kind="reduction",
)



def _log_sum_exp(x: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # an all-inf row keeps its inf instead of inf - inf
    out = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
    return out if keepdims else np.squeeze(out, axis=axis)


# Reductions nobody has measured on the ANE: computed exactly in float64 and rounded once (no accumulator model,
# N14 concerns reduce_sum only), and not known to run there (the catalog's ANE-34 refuses them).
_MORE_REDUCTIONS: dict[str, Callable[[np.ndarray, tuple[int, ...], bool], np.ndarray]] = {
    "reduce_min": lambda x, axis, keepdims: np.min(x, axis=axis, keepdims=keepdims),
    "reduce_prod": lambda x, axis, keepdims: np.prod(x, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _log_sum_exp,
}
for _name, _fn in _MORE_REDUCTIONS.items():
    _declare(
        _name,
        ("x",),
        _REDUCE_ATTRS,
        infer=_reduce_infer(_name),
        compute=lambda k, xs, a, fn=_fn, op=_name: fn(
            xs[0].astype(np.float64), _reduce_axes(op, TensorType("fp32", xs[0].shape), a["axes"]), a["keep_dims"]
        ).astype(np.float32),
        kind="reduction",
        ane_known=False,
    )


def _softmax(k, xs, a):
    x = xs[0]
    e = x - np.max(x, axis=a["axis"], keepdims=True)  # the hardware subtracts the row maximum (N8)
    np.exp(e, out=e)
    return np.divide(e, np.sum(e, axis=a["axis"], keepdims=True), out=e)


def _softmax_infer(types, attrs):
    t = _float("softmax", types[0])
    _axis("softmax", int(attrs["axis"]), t.rank)
    return t


_declare("softmax", ("x",), {"axis": Attr("int", -1)}, infer=_softmax_infer, compute=_softmax, kind="activation")


# ---------------------------------------------------------------------------------------------------------------------
# Layout


def _reshape_shape(t: TensorType, shape) -> tuple[int, ...]:
    shape = [int(d) for d in shape]
    if shape.count(-1) > 1 or any(d < -1 or d == 0 for d in shape):
        raise _fail("reshape", f"invalid target shape {shape}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or t.size % known:
            raise _fail("reshape", f"cannot reshape {list(t.shape)} to {shape}")
        shape[shape.index(-1)] = t.size // known
    if math.prod(shape) != t.size:
        raise _fail("reshape", f"cannot reshape {list(t.shape)} ({t.size} elements) to {shape}")
    return tuple(shape)


_declare(
    "reshape",
    ("x",),
    {"shape": Attr("ints")},
    infer=lambda t, a: TensorType(t[0].dtype, _reshape_shape(t[0], a["shape"])),
    compute=lambda k, xs, a: xs[0].reshape(_reshape_shape(TensorType("fp32", xs[0].shape), a["shape"])),
    kind="layout",
)


def _transpose_infer(types, attrs):
    t = types[0]
    perm = [int(p) for p in attrs["perm"]]
    if sorted(p % t.rank if t.rank else p for p in perm) != list(range(t.rank)):
        raise _fail("transpose", f"perm {perm} is not a permutation of {t.rank} axes")
    return TensorType(t.dtype, tuple(t.shape[p] for p in perm))


_declare(
    "transpose",
    ("x",),
    {"perm": Attr("ints")},
    infer=_transpose_infer,
    compute=lambda k, xs, a: np.transpose(xs[0], [int(p) for p in a["perm"]]),
    kind="layout",
)


def _index_slices(op: str, shape, attrs) -> tuple[slice, ...]:
    begin, end = list(attrs["begin"]), list(attrs["end"])
    rank = len(shape)
    stride = list(attrs.get("stride") if attrs.get("stride") is not None else [1] * rank)
    begin_mask = list(attrs.get("begin_mask") if attrs.get("begin_mask") is not None else [False] * rank)
    end_mask = list(attrs.get("end_mask") if attrs.get("end_mask") is not None else [False] * rank)
    squeeze_mask = _squeeze_mask(attrs, rank)
    if not len(begin) == len(end) == len(stride) == len(begin_mask) == len(end_mask) == len(squeeze_mask) == rank:
        raise _fail(op, f"begin/end/stride/masks must each have {rank} entries")
    out = []
    for d in range(rank):
        if int(stride[d]) == 0:
            raise _fail(op, f"stride 0 on axis {d}")
        b = None if begin_mask[d] else int(begin[d])
        if squeeze_mask[d]:  # coremltools: the one element at begin (end and stride ignored), its axis then dropped
            out.append(slice(b, None, _INT32_END - 1))
            continue
        e = None if end_mask[d] else int(end[d])
        out.append(slice(b, e, int(stride[d])))
    return tuple(out)


def _squeeze_mask(attrs: dict, rank: int) -> list[bool]:
    mask = attrs.get("squeeze_mask")
    return [False] * rank if mask is None else [bool(m) for m in mask]


def _slice_index(k, xs, a):
    x = xs[0]
    squeezed = tuple(d for d, m in enumerate(_squeeze_mask(a, x.ndim)) if m)
    return np.squeeze(x[_index_slices("slice_by_index", x.shape, a)], axis=squeezed)


def _slice_index_infer(types, attrs):
    t = types[0]
    slices = _index_slices("slice_by_index", t.shape, attrs)
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(slices, t.shape))
    if 0 in shape:
        raise _fail("slice_by_index", f"empty slice {list(shape)} of {list(t.shape)}")
    squeeze_mask = _squeeze_mask(attrs, t.rank)
    return TensorType(t.dtype, tuple(n for n, m in zip(shape, squeeze_mask) if not m))


_declare(
    "slice_by_index",
    ("x",),
    {
        "begin": Attr("ints"),
        "end": Attr("ints"),
        "stride": Attr("ints", None),
        "begin_mask": Attr("bools", None),
        "end_mask": Attr("bools", None),
        "squeeze_mask": Attr("bools", None),
    },
    infer=_slice_index_infer,
    compute=_slice_index,
    kind="layout",
)


def _size_slices(shape, attrs) -> tuple[slice, ...]:
    begin, size = [int(b) for b in attrs["begin"]], [int(s) for s in attrs["size"]]
    if not len(begin) == len(size) == len(shape):
        raise _fail("slice_by_size", f"begin and size must each have {len(shape)} entries")
    out = []
    for b, s, n in zip(begin, size, shape):
        b = b % n if -n <= b < 0 else b
        e = n if s == -1 else b + s
        if not (0 <= b < e <= n):
            raise _fail("slice_by_size", f"slice begin={begin} size={size} out of range for shape {list(shape)}")
        out.append(slice(b, e))
    return tuple(out)


_declare(
    "slice_by_size",
    ("x",),
    {"begin": Attr("ints"), "size": Attr("ints")},
    infer=lambda t, a: TensorType(t[0].dtype, tuple(s.stop - s.start for s in _size_slices(t[0].shape, a))),
    compute=lambda k, xs, a: xs[0][_size_slices(xs[0].shape, a)],
    kind="layout",
)


def last_axis_slice_offset(op: str, shape: Sequence[int], attrs: dict) -> int:
    """Where a slice starts on the last axis: the lowest index it reads there, with negative begins counted from the
    end and a set ``begin_mask`` bit read as 0 (for the usual positive stride). The M1/M2 slice rule (N11) applies
    when this is nonzero; the constraint catalog (ANE-29) and the emulator both decide by this one function."""
    slices = _index_slices(op, shape, attrs) if op == "slice_by_index" else _size_slices(shape, attrs)
    kept = range(*slices[-1].indices(shape[-1]))
    return min(kept) if kept else 0


def _cast_infer(types, attrs):
    if attrs["dtype"] not in CAST_DTYPES:
        raise _fail("cast", f"unsupported dtype {attrs['dtype']!r}; MIL casts to {', '.join(CAST_DTYPES)}")
    if types[0].dtype not in CAST_DTYPES:
        raise _fail("cast", f"cannot cast from {types[0].dtype}; MIL casts from {', '.join(CAST_DTYPES)}")
    return TensorType(attrs["dtype"], types[0].shape)


_INT32_MIN, _INT32_END = -(2**31), 2**31


def cast_values(x: np.ndarray, dtype: str) -> np.ndarray:
    """MIL's ``cast`` of the values ``x`` (any numeric or bool array) to ``dtype``, as coremltools' value inference
    computes it (numpy's conversions, as on x86-64): to bool, nonzero is true; to fp16/fp32, rounding to nearest
    even (overflow gives inf); to an integer type, truncation toward zero, a value outside int32 (or inf) becoming
    -2**31, then two's-complement wrap to the type's width (300.7 -> int8 44, -1.5 -> uint8 255)."""
    x = np.asarray(x)
    target = NUMPY_DTYPES[dtype]
    if dtype == "bool":
        return x != 0
    if dtype in FLOAT_DTYPES:
        with np.errstate(over="ignore"):
            return x.astype(target)
    if x.dtype.kind == "f":
        whole = np.trunc(x.astype(np.float64))
        in_range = np.isfinite(whole) & (whole >= _INT32_MIN) & (whole < _INT32_END)
        x = np.where(in_range, whole, _INT32_MIN)
    return x.astype(np.int64).astype(target)  # integer narrowing wraps


_declare(
    "cast",
    ("x",),
    {"dtype": Attr("string")},
    infer=_cast_infer,
    compute=lambda k, xs, a: cast_values(xs[0], a["dtype"]),
)


def _concat_infer(types, attrs):
    if not types:
        raise _fail("concat", "needs at least one value")
    first = types[0]
    axis = _axis("concat", int(attrs["axis"]), first.rank)
    for t in types[1:]:
        if t.dtype != first.dtype or t.rank != first.rank:
            raise _fail("concat", f"values differ in dtype or rank: {first.short()} vs {t.short()}")
        if any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis):
            raise _fail("concat", f"shapes {list(first.shape)} and {list(t.shape)} differ off axis {axis}")
    if attrs["interleave"] and len({t.shape for t in types}) != 1:
        raise _fail("concat", "interleave needs values of equal shape")
    shape = list(first.shape)
    shape[axis] = sum(t.shape[axis] for t in types)
    return TensorType(first.dtype, tuple(shape))


def _concat(k, xs, a):
    axis = int(a["axis"])
    if not a["interleave"]:
        return np.concatenate(xs, axis=axis)
    # interleave: element i of every value, then element i+1 ... (stack along a new axis after `axis`)
    stacked = np.stack(xs, axis=(axis % xs[0].ndim) + 1)
    shape = list(xs[0].shape)
    shape[axis] *= len(xs)
    return stacked.reshape(shape)


_declare(
    "concat",
    (),
    {"axis": Attr("int"), "interleave": Attr("bool", False)},
    infer=_concat_infer,
    compute=_concat,
    kind="layout",
    variadic="values",
)


# ---------------------------------------------------------------------------------------------------------------------
# Conv and matmul: the wide-accumulator ops

PAD_TYPES = ("valid", "same", "same_lower", "custom")


def _spatial(op: str, attrs: dict, key: str, n: int, fill: int) -> list[int]:
    """A per-spatial-axis attribute: the declared default (written for rank-4 programs) stands for ``fill`` on
    every axis whatever the rank, as coremltools' default does; a given value must have ``n`` entries."""
    value = attrs[key]
    if value is OPS[op].attrs[key].default:
        return [fill] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise _fail(op, f"{key} {value} must have {n} entries (one per spatial axis)")
    return value


@dataclass(frozen=True)
class Window:
    """Where a sliding window (conv, pool) reads: per spatial axis its kernel size, stride, dilation and the
    padding before and after, and the output size (coremltools' ``spatial_dimensions_out_shape``)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    out: tuple[int, ...]


def window(op: str, spatial: Sequence[int], kernel: Sequence[int], attrs: dict, ceil_mode: bool = False) -> Window:
    """The window of a conv or pool over ``spatial`` input sizes: ``same`` pads as TensorFlow does (the odd pad
    after; ``same_lower``: before), ``custom`` takes ``pad`` as [before, after] per axis."""
    n = len(spatial)
    strides = _spatial(op, attrs, "strides", n, 1)
    dilations = _spatial(op, attrs, "dilations", n, 1) if "dilations" in attrs else [1] * n
    if min(strides + dilations) < 1:
        raise _fail(op, f"strides {strides} and dilations {dilations} must be positive")
    pad_type = attrs["pad_type"]
    if pad_type not in PAD_TYPES:
        raise _fail(op, f"pad_type {pad_type!r} is not one of {', '.join(PAD_TYPES)}")
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]  # the span one output reads, dilation included
    if pad_type == "custom":
        pad = _spatial(op, attrs, "pad", 2 * n, 0)
        if min(pad) < 0:
            raise _fail(op, f"pad {pad} must not be negative")
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    elif pad_type == "valid":
        pads = [(0, 0)] * n
    else:
        totals = [max(0, s * math.ceil(i / s) - i + r - s) for i, s, r in zip(spatial, strides, reach)]
        lower = pad_type == "same_lower"
        pads = [((t + 1) // 2, t // 2) if lower else (t // 2, (t + 1) // 2) for t in totals]
    out = []
    for i, s, r, (before, after) in zip(spatial, strides, reach, pads):
        size = i + before + after - r
        o = (size + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and before + after and (o - 1) * s >= i + (before + after) / 2:
            o -= 1  # coremltools drops a ceil_mode window that would start in the padding after
        if size < 0 or o < 1:
            raise _fail(op, f"kernel reach {reach} does not fit spatial size {list(spatial)} with padding {pads}")
        out.append(o)
    return Window(tuple(kernel), tuple(strides), tuple(dilations), tuple(pads), tuple(out))


def window_views(x: np.ndarray, w: Window) -> list[np.ndarray]:
    """For each kernel offset (row-major over the kernel), the strided view of zero-padded ``x`` ``[N, C, *D]``
    that this offset reads for every output position: arrays ``[N, C, *out]``."""
    if any(p for pair in w.pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0), *w.pads])
    views = []
    for offset in np.ndindex(*w.kernel):
        index = tuple(slice(k * d, k * d + (o - 1) * s + 1, s)
                      for k, d, s, o in zip(offset, w.dilations, w.strides, w.out))
        views.append(x[(slice(None), slice(None)) + index])
    return views


def _conv_types(op: str, types, attrs):
    x, w = types[0], types[1]
    if not 3 <= x.rank <= 5 or w.rank != x.rank:
        raise _fail(op, f"x and weight must both have rank 3, 4 or 5, got {x.short()} and {w.short()}")
    if x.dtype != w.dtype:
        raise _fail(op, f"x is {x.dtype} but weight is {w.dtype}")
    return x, w, int(attrs["groups"])


def _conv_infer(types, attrs):
    x, w, groups = _conv_types("conv", types, attrs)
    if groups < 1 or x.shape[1] % groups or w.shape[0] % groups or w.shape[1] * groups != x.shape[1]:
        raise _fail("conv", f"weight {list(w.shape)} with groups={groups} does not fit {x.shape[1]} input channels")
    if len(types) > 2 and types[2].shape not in ((w.shape[0],), (1, w.shape[0]) + (1,) * (x.rank - 2)):
        raise _fail("conv", f"bias shape {list(types[2].shape)} does not match {w.shape[0]} output channels")
    win = window("conv", x.shape[2:], w.shape[2:], attrs)
    return TensorType(x.dtype, (x.shape[0], w.shape[0]) + win.out)


def _wide_window_sums(k: Kernels, x: np.ndarray, w: np.ndarray, groups: int, win: Window) -> np.ndarray:
    """im2col, then one grouped matmul through the kernels: every output is one wide sum over C_in/G x kernel
    products, so the accumulator model and its 2^15 ceiling apply as they do to a 1x1 conv (whose single window
    is ``x`` itself: the plain matmul of its weight, bit for bit)."""
    n, cin = x.shape[:2]
    cout = w.shape[0]
    views = window_views(x, win)
    cols = views[0][:, :, None] if len(views) == 1 else np.stack(views, axis=2)  # [N, Cin, K, *out]
    xg = cols.reshape(n, groups, cin // groups * len(views), math.prod(win.out))  # [N, G, Cin/G*K, P]
    wg = w.reshape(groups, cout // groups, cin // groups * len(views))  # [G, Cout/G, Cin/G*K]
    return k.matmul(wg[None], xg).reshape((n, cout) + win.out)


def _add_bias(y: np.ndarray, xs) -> np.ndarray:
    if len(xs) < 3:
        return y
    return y + xs[2].reshape((1, y.shape[1]) + (1,) * (y.ndim - 2))  # a new array: a backend may treat the
    # kernel's output as final, and the add rounds again


def _conv(k: Kernels, xs, a):
    x, w = xs[0], xs[1]
    return _add_bias(_wide_window_sums(k, x, w, int(a["groups"]), window("conv", x.shape[2:], w.shape[2:], a)), xs)


_CONV_ATTRS = {
    "strides": Attr("ints", (1, 1)),
    "pad_type": Attr("string", "valid"),
    "pad": Attr("ints", (0, 0, 0, 0)),
    "dilations": Attr("ints", (1, 1)),
    "groups": Attr("int", 1),
}
_declare("conv", ("x", "weight", "bias"), _CONV_ATTRS, infer=_conv_infer, compute=_conv, kind="wide",
         optional=("bias",))


def _transpose_crops(op: str, x_shape, w_shape, attrs) -> tuple[tuple[int, ...], list[int], Window]:
    """A conv_transpose's output spatial size (coremltools' rule, or ``output_shape``) and, per axis, how many
    leading positions of the full transpose ((D-1)*s + reach) it drops: the padding before of the conv that maps
    the output back to x. Also that conv's window (strides and dilations as given)."""
    n = len(x_shape) - 2
    if attrs["pad_type"] == "same_lower":
        raise _fail(op, "pad_type 'same_lower' is not one of valid, same, custom")
    strides = _spatial(op, attrs, "strides", n, 1)
    dilations = _spatial(op, attrs, "dilations", n, 1)
    reach = [(kk - 1) * d + 1 for kk, d in zip(w_shape[2:], dilations)]
    if attrs["output_shape"] is not None:
        out = [int(v) for v in attrs["output_shape"]]
        if len(out) != n + 2:
            raise _fail(op, f"output_shape {out} must have {n + 2} entries [N, C_out, *spatial]")
        out = out[2:]
    elif attrs["pad_type"] == "same":
        out = [d * s for d, s in zip(x_shape[2:], strides)]
    else:
        pad = _spatial(op, attrs, "pad", 2 * n, 0) if attrs["pad_type"] == "custom" else [0] * (2 * n)
        out = [(d - 1) * s + r - pad[2 * i] - pad[2 * i + 1]
               for i, (d, s, r) in enumerate(zip(x_shape[2:], strides, reach))]
    if min(out) < 1:
        raise _fail(op, f"output spatial size {out} is not positive")
    forward = window(op, out, w_shape[2:], attrs)
    return tuple(out), [before for before, _ in forward.pads], forward


def _conv_transpose_infer(types, attrs):
    x, w, groups = _conv_types("conv_transpose", types, attrs)
    if groups < 1 or x.shape[1] % groups or w.shape[0] != x.shape[1]:
        raise _fail("conv_transpose", f"weight {list(w.shape)} (C_in, C_out/groups, *K) with groups={groups} "
                                      f"does not fit {x.shape[1]} input channels")
    cout = w.shape[1] * groups
    if len(types) > 2 and types[2].shape not in ((cout,), (1, cout) + (1,) * (x.rank - 2)):
        raise _fail("conv_transpose", f"bias shape {list(types[2].shape)} does not match {cout} output channels")
    out, _, _ = _transpose_crops("conv_transpose", x.shape, w.shape, attrs)
    if attrs["output_shape"] is not None and tuple(attrs["output_shape"][:2]) != (x.shape[0], cout):
        raise _fail("conv_transpose", f"output_shape {list(attrs['output_shape'])} must start [{x.shape[0]}, {cout}]")
    return TensorType(x.dtype, (x.shape[0], cout) + out)


def _conv_transpose(k: Kernels, xs, a):
    """The adjoint of a conv, run as a conv so that each output is one wide sum: x spread out by the strides
    (zeros between), padded by reach-1 less the crop, read by the flipped kernel with its channel axes swapped."""
    x, w = xs[0], xs[1]
    groups, spatial = int(a["groups"]), x.shape[2:]
    out, crops, forward = _transpose_crops("conv_transpose", x.shape, w.shape, a)
    spread = np.zeros(x.shape[:2] + tuple((d - 1) * s + 1 for d, s in zip(spatial, forward.strides)), x.dtype)
    spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in forward.strides)] = x
    reach = [(kk - 1) * d + 1 for kk, d in zip(w.shape[2:], forward.dilations)]
    before = [r - 1 - c for r, c in zip(reach, crops)]
    after = [o + r - 1 - m - b for o, r, m, b in zip(out, reach, spread.shape[2:], before)]
    crop = tuple(slice(max(-b, 0), m - max(-e, 0)) for b, e, m in zip(before, after, spread.shape[2:]))
    spread = spread[(slice(None), slice(None)) + crop]  # a negative pad crops
    pads = tuple((max(b, 0), max(e, 0)) for b, e in zip(before, after))
    cin, cout_g = w.shape[:2]
    flipped = w.reshape((groups, cin // groups, cout_g) + w.shape[2:]).swapaxes(1, 2)
    flipped = flipped[(Ellipsis,) + (slice(None, None, -1),) * len(spatial)].reshape(
        (groups * cout_g, cin // groups) + w.shape[2:])
    win = Window(tuple(w.shape[2:]), (1,) * len(spatial), forward.dilations, pads, out)
    return _add_bias(_wide_window_sums(k, spread, np.ascontiguousarray(flipped), groups, win), xs)


# coremltools' conv_transpose (weight [C_in, C_out/groups, *K]); not reported on the ANE.
_declare("conv_transpose", ("x", "weight", "bias"), {**_CONV_ATTRS, "output_shape": Attr("ints", None)},
         infer=_conv_transpose_infer, compute=_conv_transpose, kind="wide", optional=("bias",), ane_known=False)


# Pools (coremltools' avg_pool and max_pool): not reported on the ANE. The windows are those of a conv without
# dilation; a ceil_mode window that runs past the padding after reads nothing there (torch's rule as well).

_POOL_ATTRS = {
    "kernel_sizes": Attr("ints"),
    "strides": Attr("ints", (1, 1)),
    "pad_type": Attr("string"),
    "pad": Attr("ints", (0, 0, 0, 0)),
    "ceil_mode": Attr("bool", False),
}


def _pool_window(op: str, shape, attrs) -> Window:
    if not 3 <= len(shape) <= 5:
        raise _fail(op, f"x must have rank 3, 4 or 5, got shape {list(shape)}")
    kernel = [int(k) for k in attrs["kernel_sizes"]]
    if len(kernel) != len(shape) - 2 or min(kernel) < 1:
        raise _fail(op, f"kernel_sizes {kernel} must be {len(shape) - 2} positive sizes")
    ceil_mode = bool(attrs["ceil_mode"])
    if ceil_mode and attrs["pad_type"] == "same":
        raise _fail(op, "ceil_mode needs pad_type valid or custom")
    return window(op, shape[2:], kernel, attrs, ceil_mode=ceil_mode)


def _pool_infer(op: str):
    def infer(types, attrs):
        x = _float(op, types[0])
        return TensorType(x.dtype, x.shape[:2] + _pool_window(op, x.shape, attrs).out)

    return infer


def _pool_views(op: str, x: np.ndarray, a: dict, fill: float, overhang_fill: float | None = None):
    """The window views of ``x``, padding read as ``fill`` and a ceil_mode overhang as ``overhang_fill``."""
    win = _pool_window(op, x.shape, a)
    overhang = [max(0, (o - 1) * s + k - (i + b + e))
                for o, s, k, i, (b, e) in zip(win.out, win.strides, win.kernel, x.shape[2:], win.pads)]
    padded = np.pad(x, [(0, 0), (0, 0), *win.pads], constant_values=fill)
    if any(overhang):
        padded = np.pad(padded, [(0, 0), (0, 0)] + [(0, h) for h in overhang],
                        constant_values=fill if overhang_fill is None else overhang_fill)
    return window_views(padded, Window(win.kernel, win.strides, win.dilations, ((0, 0),) * len(win.out), win.out))


def _avg_pool(k, xs, a):
    """The exact window sum over its count of positions (padding counted unless excluded), rounded once."""
    x = xs[0].astype(np.float64)
    total = sum(_pool_views("avg_pool", x, a, 0.0))
    ones = np.ones((1, 1) + x.shape[2:])
    count = sum(_pool_views("avg_pool", ones, a, 0.0 if a["exclude_padding_from_average"] else 1.0, 0.0))
    return (total / count).astype(np.float32)


def _max_pool(k, xs, a):
    return np.maximum.reduce(_pool_views("max_pool", xs[0], a, -np.inf))


_declare("avg_pool", ("x",), {**_POOL_ATTRS, "exclude_padding_from_average": Attr("bool", False)},
         infer=_pool_infer("avg_pool"), compute=_avg_pool, kind="reduction", ane_known=False)
_declare("max_pool", ("x",), _POOL_ATTRS, infer=_pool_infer("max_pool"), compute=_max_pool, kind="reduction",
         ane_known=False)


def _matmul_dims(op, x: TensorType, y: TensorType, tx: bool, ty: bool):
    if x.rank < 2 or y.rank < 2:
        raise _fail(op, f"operands must have rank >= 2, got {x.short()} and {y.short()}")
    m, kx = (x.shape[-1], x.shape[-2]) if tx else (x.shape[-2], x.shape[-1])
    ky, n = (y.shape[-1], y.shape[-2]) if ty else (y.shape[-2], y.shape[-1])
    if kx != ky:
        raise _fail(op, f"inner dimensions differ: {list(x.shape)} x {list(y.shape)} (transpose_x={tx}, transpose_y={ty})")
    try:
        batch = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except ValueError:
        raise _fail(op, f"batch dims {list(x.shape[:-2])} and {list(y.shape[:-2])} do not broadcast") from None
    return tuple(batch) + (m, n)


def _matmul_infer(types, attrs):
    x, y = types
    if x.dtype != y.dtype:
        raise _fail("matmul", f"operands have different dtypes {x.dtype} and {y.dtype}")
    return TensorType(x.dtype, _matmul_dims("matmul", x, y, bool(attrs["transpose_x"]), bool(attrs["transpose_y"])))


def _matmul(k: Kernels, xs, a):
    x, y = xs
    if a["transpose_x"]:
        x = np.swapaxes(x, -1, -2)
    if a["transpose_y"]:
        y = np.swapaxes(y, -1, -2)
    return k.matmul(x, y)


_declare(
    "matmul",
    ("x", "y"),
    {"transpose_x": Attr("bool", False), "transpose_y": Attr("bool", False)},
    infer=_matmul_infer,
    compute=_matmul,
    kind="wide",
)



# ``scaled_dot_product_attention`` (iOS18): softmax(Q K^T / sqrt(E) + mask) V, a bool mask keeping the True
# positions and a float mask added to the scores. Computed exactly in float64 and rounded once. On the ANE the op
# compiles and runs but ignores the mask (reference ANE-06): the catalog refuses it by that rule, and programs
# write attention out with matmul, mask add and softmax. So it is not counted as known to run there.


def _sdpa_infer(types, attrs):
    op = "scaled_dot_product_attention"
    q, k, v = types[:3]
    if not q.rank == k.rank == v.rank >= 3:
        raise _fail(op, f"query, key and value must have one rank >= 3, got {q.short()}, {k.short()}, {v.short()}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in FLOAT_DTYPES:
        raise _fail(op, f"query, key and value must share an fp16 or fp32 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2] or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise _fail(op, f"shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)} are not [B.., L, E], [B.., S, E], "
                        "[B.., S, EV]")
    scores = q.shape[:-1] + (k.shape[-2],)
    if len(types) > 3:
        mask = types[3]
        if mask.dtype not in ("bool",) + FLOAT_DTYPES:
            raise _fail(op, f"attn_mask must be bool, fp16 or fp32, got {mask.dtype}")
        try:
            if np.broadcast_shapes(mask.shape, scores) != scores:
                raise ValueError
        except ValueError:
            raise _fail(op, f"attn_mask {list(mask.shape)} does not broadcast to the scores {list(scores)}") from None
    return TensorType(q.dtype, q.shape[:-1] + v.shape[-1:])


def _sdpa(k, xs, a):
    q, key, v = (t.astype(np.float64) for t in xs[:3])
    scores = np.matmul(q, np.swapaxes(key, -1, -2)) / math.sqrt(q.shape[-1])
    if len(xs) > 3:
        mask = xs[3]
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    scores = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(scores / np.sum(scores, axis=-1, keepdims=True), v).astype(np.float32)


_declare("scaled_dot_product_attention", ("query", "key", "value", "attn_mask"), infer=_sdpa_infer, compute=_sdpa,
         kind="reduction", optional=("attn_mask",), ane_known=False)


def _linear_infer(types, attrs):
    x = _float("linear", types[0])
    w, b = np.shape(attrs["weight"]), attrs["bias"]
    if len(w) != 2 or x.rank < 1 or x.shape[-1] != w[1]:
        raise _fail("linear", f"weight {list(w)} must be [out, {x.shape[-1] if x.rank else '?'}] for x {x.short()}")
    if b is not None and np.shape(b) != (w[0],):
        raise _fail("linear", f"bias shape {list(np.shape(b))} is not [{w[0]}]")
    return TensorType(x.dtype, x.shape[:-1] + (w[0],))


def _linear(k: Kernels, xs, a):
    x, w = xs[0], np.asarray(a["weight"], dtype=np.float32)
    y = k.matmul(x.reshape(-1, w.shape[1]), np.ascontiguousarray(w.T)).reshape(x.shape[:-1] + (w.shape[0],))
    if a["bias"] is not None:
        y = y + np.asarray(a["bias"], dtype=np.float32)  # a new array, rounded again: the add a conv's bias becomes
    return y


# ``linear``: coremltools' ``x @ weight.T + bias`` with constant weight [O, I]. The ANE form of a linear layer is a
# 1x1 conv (GraphBuilder.linear); this op is not known to run there.
_declare(
    "linear",
    ("x",),
    {"weight": Attr("tensor"), "bias": Attr("tensor", None)},
    infer=_linear_infer,
    compute=_linear,
    kind="wide",
    ane_known=False,
)


# Normalizations, coremltools' meanings with constant parameters. Computed exactly in float64 and rounded once with
# the elementwise rule (their last step is a multiply-add). Nobody has reported these ops on the ANE (programs write
# them with reduce_mean, pow and mul), so the catalog refuses them.


def _norm_axes(op: str, x: TensorType, attrs: dict) -> tuple[int, ...]:
    """The axes an op normalizes over, and a check that its per-channel parameters fit them."""
    if op == "layer_norm":
        axes = tuple(range(x.rank)) if attrs["axes"] is None else _reduce_axes(op, x, attrs["axes"])
        shape = tuple(x.shape[i] for i in sorted(axes))
    else:
        low, high = {"batch_norm": (3, 5), "instance_norm": (3, 4), "l2_norm": (3, None)}[op]
        if x.rank < low or (high is not None and x.rank > high):
            raise _fail(op, f"x must have rank {low}..{high or ''}, got {x.short()}")
        axes = {"batch_norm": (), "instance_norm": tuple(range(2, x.rank)),
                "l2_norm": tuple(range(x.rank - 3, x.rank))}[op]
        shape = (x.shape[1],)
    for name in ("mean", "variance", "gamma", "beta"):
        value = attrs.get(name)
        if value is not None and tuple(np.shape(value)) != shape:
            raise _fail(op, f"{name} has shape {list(np.shape(value))}, expected {list(shape)}")
    return axes


def _norm_infer(op: str):
    def infer(types, attrs):
        _norm_axes(op, _float(op, types[0]), attrs)
        return types[0]

    return infer


def _normalize(op: str):
    def compute(k, xs, a):
        x = xs[0].astype(np.float64)
        axes = _norm_axes(op, TensorType("fp32", x.shape), a)
        eps = _epsilon(op, a)
        if op == "l2_norm":
            return (x / np.sqrt(np.sum(x * x, axis=axes, keepdims=True) + eps)).astype(np.float32)
        # parameters broadcast over the normalized axes (layer_norm) or along the channel axis 1
        keep = sorted(axes) if op == "layer_norm" else [1]
        shape = [d if i in keep else 1 for i, d in enumerate(x.shape)]

        def param(name: str, default: float) -> np.ndarray | float:
            value = a.get(name)
            return default if value is None else np.asarray(value, dtype=np.float64).reshape(shape)

        if op == "batch_norm":
            mean, var = param("mean", 0.0), param("variance", 1.0)
        else:
            mean = np.mean(x, axis=axes, keepdims=True)
            var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + eps) * param("gamma", 1.0) + param("beta", 0.0)
        return y.astype(np.float32)

    return compute


_EPSILON_ATTR = {"epsilon": Attr("float", None)}
_AFFINE_ATTRS = {"gamma": Attr("tensor", None), "beta": Attr("tensor", None), **_EPSILON_ATTR}
for _name, _attrs in (
    ("layer_norm", {"axes": Attr("ints", None), **_AFFINE_ATTRS}),
    ("batch_norm", {"mean": Attr("tensor"), "variance": Attr("tensor"), **_AFFINE_ATTRS}),
    ("instance_norm", _AFFINE_ATTRS),
    ("l2_norm", _EPSILON_ATTR),
):
    _declare(_name, ("x",), _attrs, infer=_norm_infer(_name), compute=_normalize(_name), ane_known=False)


# ---------------------------------------------------------------------------------------------------------------------
# Comparisons, logical ops and select (coremltools' iOS15-iOS18 meanings). A bool result is a tensor of 0s and 1s;
# the emulator holds it as fp16 values, where both are exact. Nobody has reported these ops on the ANE.


def _bool_operands(op: str, types: list[TensorType]) -> None:
    for t in types:
        if t.dtype != "bool":
            raise _fail(op, f"needs bool operands, got {t.dtype}")


def _compare_infer(op: str):
    def infer(types, attrs):
        return TensorType("bool", _broadcast(op)(types, attrs).shape)

    return infer


def _logical_infer(op: str):
    def infer(types, attrs):
        _bool_operands(op, types)
        return _broadcast(op)(types, attrs) if len(types) == 2 else types[0]

    return infer


_COMPARISONS = {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
}
for _name, _fn in _COMPARISONS.items():
    _declare(_name, ("x", "y"), infer=_compare_infer(_name), compute=lambda k, xs, a, fn=_fn: fn(xs[0], xs[1]),
             ane_known=False)

# bool operands are held as 0/1 values: nonzero is true
for _name, _fn in (("logical_and", np.logical_and), ("logical_or", np.logical_or), ("logical_xor", np.logical_xor)):
    _declare(_name, ("x", "y"), infer=_logical_infer(_name),
             compute=lambda k, xs, a, fn=_fn: fn(xs[0] != 0, xs[1] != 0), ane_known=False)
_declare("logical_not", ("x",), infer=_logical_infer("logical_not"), compute=lambda k, xs, a: xs[0] == 0,
         ane_known=False)


def _select_infer(types, attrs):
    cond, a, b = types
    _bool_operands("select", [cond])
    if a.dtype != b.dtype:
        raise _fail("select", f"a and b have different dtypes {a.dtype} and {b.dtype}")
    try:
        shape = np.broadcast_shapes(cond.shape, a.shape, b.shape)
    except ValueError:
        raise _fail("select", f"shapes {list(cond.shape)}, {list(a.shape)}, {list(b.shape)} do not broadcast") from None
    return TensorType(a.dtype, tuple(shape))


# elementwise, not layout: an int32 constant chosen becomes an fp16 value like any computed result
_declare("select", ("cond", "a", "b"), infer=_select_infer, compute=lambda k, xs, a: np.where(xs[0] != 0, xs[1], xs[2]),
         ane_known=False)



# Layout ops beyond reshape/transpose/slice/concat, coremltools' meanings. They move values without computing (their
# results stay fp16 values), except cumsum, a sum along an axis, computed exactly and rounded once. Nobody has
# reported them on the ANE.


def _tile_infer(types, attrs):
    t, reps = types[0], [int(r) for r in attrs["reps"]]
    if len(reps) != t.rank or min(reps, default=0) < 1:
        raise _fail("tile", f"reps {reps} must have {t.rank} entries, each at least 1")
    return TensorType(t.dtype, tuple(n * r for n, r in zip(t.shape, reps)))


_declare("tile", ("x",), {"reps": Attr("ints")}, infer=_tile_infer,
         compute=lambda k, xs, a: np.tile(xs[0], [int(r) for r in a["reps"]]), kind="layout", ane_known=False)


def _squeezed_axes(shape: Sequence[int], axes) -> tuple[int, ...]:
    """The listed axes, or every size-1 axis when ``axes`` is absent. A listed axis of another size is refused:
    coremltools' shape rule keeps it, but its value inference (numpy's squeeze) fails on it."""
    if axes is None:
        return tuple(i for i, n in enumerate(shape) if n == 1)
    axes = _reduce_axes("squeeze", TensorType("fp32", tuple(shape)), axes)
    wide = [i for i in axes if shape[i] != 1]
    if wide:
        raise _fail("squeeze", f"axis {wide[0]} has size {shape[wide[0]]}, not 1")
    return axes


def _squeeze_infer(types, attrs):
    t = types[0]
    drop = _squeezed_axes(t.shape, attrs["axes"])
    return TensorType(t.dtype, tuple(n for i, n in enumerate(t.shape) if i not in drop))


_declare("squeeze", ("x",), {"axes": Attr("ints", None)}, infer=_squeeze_infer,
         compute=lambda k, xs, a: np.squeeze(xs[0], axis=_squeezed_axes(xs[0].shape, a["axes"])), kind="layout",
         ane_known=False)


def _expanded_shape(shape: Sequence[int], axes) -> tuple[int, ...]:
    """``shape`` with a 1 at each of ``axes``, counted in the result's rank (negative from its end)."""
    rank = len(shape) + len(axes)
    where = _reduce_axes("expand_dims", TensorType("fp32", (1,) * rank), axes)
    dims = iter(shape)
    return tuple(1 if i in where else next(dims) for i in range(rank))


_declare("expand_dims", ("x",), {"axes": Attr("ints")},
         infer=lambda t, a: TensorType(t[0].dtype, _expanded_shape(t[0].shape, a["axes"])),
         compute=lambda k, xs, a: xs[0].reshape(_expanded_shape(xs[0].shape, a["axes"])), kind="layout",
         ane_known=False)

PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}  # MIL mode: numpy's


def _pad_widths(op: str, shape: Sequence[int], attrs) -> list[tuple[int, int]]:
    """(before, after) for every axis: ``pad`` holds pairs for the last len(pad)/2 axes."""
    pad = [int(p) for p in attrs["pad"]]
    if attrs["mode"] not in PAD_MODES:
        raise _fail(op, f"mode {attrs['mode']!r} is not one of {tuple(PAD_MODES)}")
    if len(pad) % 2 or len(pad) > 2 * len(shape) or min(pad, default=0) < 0:
        raise _fail(op, f"pad {pad} must hold non-negative (before, after) pairs for at most {len(shape)} axes")
    widths = [(0, 0)] * (len(shape) - len(pad) // 2) + list(zip(pad[::2], pad[1::2]))
    if attrs["mode"] == "reflect" and any(max(w) >= n for w, n in zip(widths, shape)):
        raise _fail(op, f"reflect pad {pad} must be smaller than each padded axis of {list(shape)}")
    return widths


def _pad(k, xs, a):
    widths = _pad_widths("pad", xs[0].shape, a)
    if a["mode"] == "constant":
        return np.pad(xs[0], widths, constant_values=np.float16(a["constant_val"]))  # held as fp16, as constants are
    return np.pad(xs[0], widths, PAD_MODES[a["mode"]])


def _pad_infer(types, attrs):
    t = types[0]
    widths = _pad_widths("pad", t.shape, attrs)
    return TensorType(t.dtype, tuple(n + b + e for n, (b, e) in zip(t.shape, widths)))


_declare("pad", ("x",), {"pad": Attr("ints"), "mode": Attr("string", "constant"), "constant_val": Attr("float", 0.0)},
         infer=_pad_infer, compute=_pad, kind="layout", ane_known=False)


def _band_part_infer(types, attrs):
    if types[0].rank < 2:
        raise _fail("band_part", f"x must have rank 2 or more, got {types[0].short()}")
    return types[0]


def _band_part(k, xs, a):
    """Keep diagonals -lower..upper of the last two axes (a negative bound keeps that whole triangle), zero the rest."""
    x = xs[0]
    rows, cols = np.indices(x.shape[-2:])
    lower, upper = int(a["lower"]), int(a["upper"])
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


_declare("band_part", ("x",), {"lower": Attr("int", -1), "upper": Attr("int", -1)}, infer=_band_part_infer,
         compute=_band_part, kind="layout", ane_known=False)


def _cumsum_infer(types, attrs):
    t = _float("cumsum", types[0])
    if not -1 <= int(attrs["axis"]) < t.rank:  # coremltools' range: -1 is the only negative axis
        raise _fail("cumsum", f"axis {attrs['axis']} is not in [-1, {t.rank - 1}]")
    return t


def _cumsum(k, xs, a):
    """Running sums along ``axis`` (from the end with ``reverse``); ``exclusive`` leaves each element out of its
    own sum (the first is 0). Exact in float64, rounded once."""
    axis, x = int(a["axis"]), xs[0].astype(np.float64)
    if a["reverse"]:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if a["exclusive"]:
        out -= x
    return (np.flip(out, axis) if a["reverse"] else out).astype(np.float32)


_declare("cumsum", ("x",), {"axis": Attr("int", 0), "exclusive": Attr("bool", False), "reverse": Attr("bool", False)},
         infer=_cumsum_infer, compute=_cumsum, kind="reduction", ane_known=False)



# Indexing: integer indices arrive as int32 consts or inputs (exact) or as an op's result (whole fp16 values).
# Negative indices count from the end (coremltools' iOS16+ meaning); one outside the axis is an error at run time.

INDEX_DTYPES = ("int32", "int16", "uint16", "int8", "uint8")


def _indices(op: str, indices: np.ndarray, size: int) -> np.ndarray:
    idx = np.asarray(indices).astype(np.int64)
    bad = (idx < -size) | (idx >= size)
    if bad.any():
        raise _fail(op, f"index {int(idx[bad].flat[0])} is outside an axis of size {size}")
    return idx % size


def _index_operands(op: str, types: list[TensorType], axis) -> int:
    x, indices = types
    if indices.dtype not in INDEX_DTYPES:
        raise _fail(op, f"indices must be an integer tensor ({', '.join(INDEX_DTYPES)}), got {indices.dtype}")
    return _axis(op, int(axis), x.rank)


def _gather_infer(types, attrs):
    x, indices = types
    axis, batch = _index_operands("gather", types, attrs["axis"]), int(attrs["batch_dims"])
    if not 0 <= batch <= min(axis, indices.rank) or x.shape[:batch] != indices.shape[:batch]:
        raise _fail("gather", f"batch_dims {batch} must lead both x {x.short()} and indices {indices.short()} "
                              f"(at most axis {axis})")
    return TensorType(x.dtype, x.shape[:axis] + indices.shape[batch:] + x.shape[axis + 1:])


def _gather(k, xs, a):
    x, axis, batch = xs[0], int(a["axis"]) % xs[0].ndim, int(a["batch_dims"])
    idx = _indices("gather", xs[1], x.shape[axis])
    if batch == 0:
        return np.take(x, idx, axis=axis)
    # each of the leading batch entries gathers with its own indices
    return np.stack([_gather(k, [xb, ib], {"axis": axis - 1, "batch_dims": batch - 1}) for xb, ib in zip(x, idx)])


# ``validate_indices`` (iOS17+): the emulator checks every index whatever it says (one outside the axis is an error).
_declare("gather", ("x", "indices"), {"axis": Attr("int", 0), "batch_dims": Attr("int", 0),
                                      "validate_indices": Attr("bool", None)}, infer=_gather_infer,
         compute=_gather, kind="layout", ane_known=False)


def _gather_along_axis_infer(types, attrs):
    x, indices = types
    axis = _index_operands("gather_along_axis", types, attrs["axis"])
    if indices.rank != x.rank or any(i != axis and a != b for i, (a, b) in enumerate(zip(x.shape, indices.shape))):
        raise _fail("gather_along_axis", f"indices {indices.short()} must match x {x.short()} off axis {axis}")
    return TensorType(x.dtype, indices.shape)


def _gather_along_axis(k, xs, a):
    axis = int(a["axis"]) % xs[0].ndim
    return np.take_along_axis(xs[0], _indices("gather_along_axis", xs[1], xs[0].shape[axis]), axis=axis)


_declare("gather_along_axis", ("x", "indices"), {"axis": Attr("int", 0), "validate_indices": Attr("bool", None)},
         infer=_gather_along_axis_infer,
         compute=_gather_along_axis, kind="layout", ane_known=False)


# einsum: coremltools defines it for two patterns only, matrices on axes -1 and -3 with the others batch
# (broadcast where 1): "nchw,nwhu->nchu" and "chw,whr->chr", in any letters. A matmul per batch: the wide op.

EINSUM_PATTERNS = {4: ((0, 1, 2, 3), (0, 3, 2, 4), (0, 1, 2, 4)), 3: ((0, 1, 2), (2, 1, 3), (0, 1, 3))}


def _einsum_rank(equation: str) -> int:
    """The rank of the supported pattern ``equation`` spells (letters numbered by first appearance)."""
    terms = equation.replace(" ", "").replace("->", ",").split(",")
    numbers: dict[str, int] = {}
    spelled = tuple(tuple(numbers.setdefault(c, len(numbers)) for c in term) for term in terms)
    for rank, pattern in EINSUM_PATTERNS.items():
        if "->" in equation and spelled == pattern:
            return rank
    raise _fail("einsum", f"equation {equation!r} is not one coremltools supports: 'nchw,nwhu->nchu' or "
                          "'chw,whr->chr' (in any letters)")


def _einsum_infer(types, attrs):
    if len(types) != 2:
        raise _fail("einsum", f"needs two values, got {len(types)}")
    x, y = types
    rank = _einsum_rank(attrs["equation"])
    if x.dtype != y.dtype or x.rank != rank or y.rank != rank or x.shape[-1] != y.shape[-3]:
        raise _fail("einsum", f"values {x.short()} and {y.short()} do not fit {attrs['equation']!r}")
    batch = [(x.shape[i], y.shape[i]) for i in ((-4, -2) if rank == 4 else (-2,))]
    if any(a != b and 1 not in (a, b) for a, b in batch):
        raise _fail("einsum", f"batch axes of {x.short()} and {y.short()} do not broadcast")
    shape = [max(x.shape[0], y.shape[0])] if rank == 4 else []
    return TensorType(x.dtype, tuple(shape + [x.shape[-3], max(x.shape[-2], y.shape[-2]), y.shape[-1]]))


def _einsum(k: Kernels, xs, a):
    x, y = xs
    if x.ndim == 3:
        x, y = x[None], y[None]
    # [n, c, h, w] @ [n, w, h, u] as [n, h, c, w] @ [n, h, w, u], then back to [n, c, h, u]
    out = np.swapaxes(k.matmul(np.swapaxes(x, 1, 2), np.swapaxes(y, 1, 2)), 1, 2)
    return out[0] if xs[0].ndim == 3 else out


_declare("einsum", (), {"equation": Attr("string")}, infer=_einsum_infer, compute=_einsum, kind="wide",
         variadic="values", ane_known=False)


# Ops with several results, positions and state (coremltools' iOS15-iOS18 meanings). ``split`` moves values;
# ``topk`` and ``reduce_argmax``/``reduce_argmin`` pick values or positions: their integer results are exact indices
# (an fp16 hold would turn index 2049 into 2048), their float results the fp16 values picked. Nobody has reported
# these ops on the ANE.

SPLIT_DTYPES = ("fp16", "fp32", "int32", "bool")


def _split_sizes(shape: Sequence[int], attrs: dict) -> list[int]:
    """The size of each piece along ``axis``: ``split_sizes`` as given (their count must equal ``num_splits`` when
    both are given), or ``num_splits`` equal pieces."""
    axis = _axis("split", int(attrs["axis"]), len(shape))
    num, sizes = attrs["num_splits"], attrs["split_sizes"]
    if sizes is not None:
        sizes = [int(n) for n in sizes]
        if num is not None and int(num) != len(sizes):
            raise _fail("split", f"num_splits {num} differs from the {len(sizes)} split_sizes {sizes}")
        if min(sizes, default=0) < 1 or sum(sizes) != shape[axis]:
            raise _fail("split", f"split_sizes {sizes} must be positive and add up to {shape[axis]} (axis {axis})")
        return sizes
    if num is None:
        raise _fail("split", "needs num_splits or split_sizes")
    num = int(num)
    if num < 1 or shape[axis] % num:
        raise _fail("split", f"num_splits {num} does not divide axis {axis} of size {shape[axis]}")
    return [shape[axis] // num] * num


def _split_infer(types, attrs):
    x = types[0]
    if x.dtype not in SPLIT_DTYPES:
        raise _fail("split", f"x must be {', '.join(SPLIT_DTYPES)}, got {x.dtype}")
    sizes = _split_sizes(x.shape, attrs)
    axis = int(attrs["axis"]) % x.rank
    return tuple(TensorType(x.dtype, x.shape[:axis] + (n,) + x.shape[axis + 1:]) for n in sizes)


def _split(k, xs, a):
    x = xs[0]
    return tuple(np.split(x, np.cumsum(_split_sizes(x.shape, a))[:-1], axis=int(a["axis"])))


_declare("split", ("x",), {"axis": Attr("int"), "num_splits": Attr("int", None), "split_sizes": Attr("ints", None)},
         infer=_split_infer, compute=_split, kind="layout", ane_known=False, several_results=True)

PICK_DTYPES = ("fp16", "fp32", "int32")


def _picked(op: str, t: TensorType) -> TensorType:
    if t.dtype not in PICK_DTYPES:
        raise _fail(op, f"x must be {', '.join(PICK_DTYPES)}, got {t.dtype}")
    return t


#: The index dtypes of ``reduce_argmax``/``reduce_argmin``'s ``output_dtype`` (iOS17; int32 before) and of
#: ``topk``'s ``output_indices_dtype`` (iOS18).
ARG_DTYPES = ("int32", "uint16")


def _topk_infer(types, attrs):
    x = _picked("topk", types[0])
    axis, k = _axis("topk", int(attrs["axis"]), x.rank), int(attrs["k"])
    if not 1 <= k <= x.shape[axis]:
        raise _fail("topk", f"k {k} is not in [1, {x.shape[axis]}] (axis {axis})")
    shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
    values = TensorType(x.dtype, shape)
    dtype = attrs["output_indices_dtype"] or "int32"
    if dtype not in ARG_DTYPES:
        raise _fail("topk", f"output_indices_dtype {dtype!r} is not one of {', '.join(ARG_DTYPES)}")
    return (values, TensorType(dtype, shape)) if attrs["return_indices"] else (values,)


def _topk(k, xs, a):
    """The k largest (smallest with ``ascending``) along ``axis``, in order; equal values in index order."""
    x, axis = xs[0], int(a["axis"])
    order = np.argsort(x if a["ascending"] else -x.astype(np.float64), axis=axis, kind="stable")
    indices = np.take(order, np.arange(int(a["k"])), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    if not a["return_indices"]:
        return (values,)
    return values, indices.astype(NUMPY_DTYPES[a["output_indices_dtype"] or "int32"])


_declare("topk", ("x",), {"k": Attr("int", 1), "axis": Attr("int", -1), "ascending": Attr("bool", False),
                          "sort": Attr("bool", True), "return_indices": Attr("bool", True),
                          "output_indices_dtype": Attr("string", None)},
         infer=_topk_infer, compute=_topk, kind="index", ane_known=False, several_results=True)

def _arg_infer(op: str):
    def infer(types, attrs):
        x = _picked(op, types[0])
        axis = _axis(op, int(attrs["axis"]), x.rank)
        dtype = attrs["output_dtype"] or "int32"
        if dtype not in ARG_DTYPES:
            raise _fail(op, f"output_dtype {dtype!r} is not one of {', '.join(ARG_DTYPES)}")
        shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape) if attrs["keep_dims"] or i != axis)
        return TensorType(dtype, shape)

    return infer


def _arg(fn):
    def compute(k, xs, a):  # the first position of the extreme, as numpy (and coremltools) picks it
        axis = int(a["axis"]) % xs[0].ndim
        out = fn(xs[0], axis=axis, keepdims=bool(a["keep_dims"]))
        return out.astype(NUMPY_DTYPES[a["output_dtype"] or "int32"])

    return compute


for _name, _fn in (("reduce_argmax", np.argmax), ("reduce_argmin", np.argmin)):
    _declare(_name, ("x",), {"axis": Attr("int", -1), "keep_dims": Attr("bool", False),
                             "output_dtype": Attr("string", None)},
             infer=_arg_infer(_name), compute=_arg(_fn), kind="index", ane_known=False)


# State (iOS18): a function input declared ``state<tensor<...>>`` is a buffer kept between calls, read with
# ``read_state`` and replaced with ``write_state`` (or coremltools' ``coreml_update_state``, a write then a read);
# ``slice_update`` writes a slice of a tensor (a KV cache's new position). Whoever runs the program holds the
# buffers (the emulator: ``EmulatedProgram.state``); nobody has reported state on the ANE.


def _state_infer(op: str):
    def infer(types, attrs):
        if len(types) == 2 and types[1] != types[0]:
            raise _fail(op, f"the value {types[1]} is not of the state's type {types[0]}")
        return () if op == "write_state" else types[-1]

    return infer


_declare("read_state", ("input",), infer=_state_infer("read_state"), compute=lambda k, xs, a: xs[0].copy(),
         kind="state", ane_known=False)
_declare("write_state", ("input", "data"), infer=_state_infer("write_state"), compute=lambda k, xs, a: (),
         kind="state", ane_known=False, several_results=True)
_declare("coreml_update_state", ("state", "value"), infer=_state_infer("coreml_update_state"),
         compute=lambda k, xs, a: xs[1].copy(), kind="state", ane_known=False)

#: What a slice_update's begin and end may be (coremltools' type domain U).
SLICE_INDEX_DTYPES = ("int32", "int16", "int8")


def _slice_update_attrs(xs, a) -> dict:
    return {**a, "begin": [int(b) for b in np.ravel(xs[2])], "end": [int(e) for e in np.ravel(xs[3])]}


def _slice_update_infer(types, attrs):
    x, update, begin, end = types
    if update.dtype != x.dtype or update.rank == 0:
        raise _fail("slice_update", f"update {update.short()} must be a tensor of x's dtype {x.dtype}")
    for name, t in (("begin", begin), ("end", end)):
        if t.dtype not in SLICE_INDEX_DTYPES or t.shape != (x.rank,):
            raise _fail("slice_update", f"{name} must be an integer tensor of shape [{x.rank}], got {t.short()}")
    return x


def _slice_update(k, xs, a):
    """x with ``x[begin:end:stride]`` (masks as slice_by_index) replaced by ``update``; begin and end may be
    computed (a KV cache's position), so the update's shape is checked here, at run time."""
    x, update = xs[0], xs[1]
    attrs = _slice_update_attrs(xs, a)
    slices = _index_slices("slice_update", x.shape, attrs)
    out = x.copy()
    squeezed = tuple(d for d, m in enumerate(_squeeze_mask(attrs, x.ndim)) if m)
    target = np.squeeze(out[slices], axis=squeezed)
    if target.shape != update.shape:
        raise _fail("slice_update", f"update has shape {list(update.shape)} but begin {attrs['begin']} end "
                                    f"{attrs['end']} select {list(target.shape)} of x {list(x.shape)}")
    out[slices] = update.reshape(out[slices].shape)
    return out


_declare("slice_update", ("x", "update", "begin", "end"),
         {"stride": Attr("ints", None), "begin_mask": Attr("bools", None), "end_mask": Attr("bools", None),
          "squeeze_mask": Attr("bools", None)},
         infer=_slice_update_infer, compute=_slice_update, kind="layout", ane_known=False)


# ---------------------------------------------------------------------------------------------------------------------
# Compressed weights and int8 activations. The constexpr ops (coremltools' names and meanings: iOS16
# constexpr_affine_dequantize, iOS18 constexpr_blockwise_shift_scale and constexpr_lut_to_dense) decode constant
# inputs into an fp16 weight before the multiply, as the ANE does (N12: w = fp16(s * (q - z))); the emulator decodes
# each once at load. quantize/dequantize (iOS17) carry int8 activations around a matmul (W8A8); their int8 values are
# whole numbers, exact in fp16.

AFFINE_DTYPES = ("int8", "uint8")
SHIFT_SCALE_DTYPES = ("int4", "uint4", "int8", "uint8")
LUT_INDEX_BITS = {"uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6, "uint8": 8}
QUANTIZED_DTYPES = {"int8": (-128, 127), "uint8": (0, 255)}
#: Inputs that must be constants (coremltools declares them ``const``), besides every input of a constexpr op.
CONST_INPUTS = {"quantize": ("scale", "zero_point"), "dequantize": ("scale", "zero_point")}
#: The opset each of these ops first appears in: an ``ios16`` program may not use the later ones.
OPSET_OF = {"constexpr_affine_dequantize": "ios16", "constexpr_blockwise_shift_scale": "ios18",
            "constexpr_lut_to_dense": "ios18", "quantize": "ios17", "dequantize": "ios17"}


def _axis_vector(op: str, name: str, t: TensorType | None, data: TensorType, axis: int) -> None:
    """A per-axis parameter: a scalar or a vector of ``data.shape[axis]`` values (coremltools' broadcast rule)."""
    if t is not None and not (t.rank == 0 or (t.rank == 1 and t.shape[0] == data.shape[axis])):
        raise _fail(op, f"{name} {t.short()} must be a scalar or a vector of {data.shape[axis]} values (axis {axis})")


def _along(vector: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """A scalar as it is, a vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor (float32)."""
    if not np.ndim(vector):
        return np.float32(vector)
    shape = [1] * rank
    shape[axis] = -1
    return np.asarray(vector, np.float32).reshape(shape)


def _affine_infer(types, attrs):
    q, zero, scale = types
    if q.dtype not in AFFINE_DTYPES or zero.dtype != q.dtype:
        raise _fail("constexpr_affine_dequantize", f"quantized_data and zero_point must both be int8 or uint8, "
                                                   f"got {q.dtype} and {zero.dtype}")
    axis = _axis("constexpr_affine_dequantize", int(attrs["axis"]), q.rank)
    _float("constexpr_affine_dequantize", scale)
    for name, t in (("zero_point", zero), ("scale", scale)):
        _axis_vector("constexpr_affine_dequantize", name, t, q, axis)
    return TensorType(scale.dtype, q.shape)


def _affine(k, xs, a):
    q, zero, scale = xs
    axis = int(a["axis"]) % q.ndim
    return (q.astype(np.float32) - _along(zero, q.ndim, axis)) * _along(scale, q.ndim, axis)


_declare("constexpr_affine_dequantize", ("quantized_data", "zero_point", "scale"), {"axis": Attr("int")},
         infer=_affine_infer, compute=_affine, kind="constexpr")


def _blocks(op: str, data: Sequence[int], per_block: Sequence[int], name: str) -> tuple[int, ...]:
    """Block sizes ``data / per_block`` along each axis; each must divide exactly."""
    if len(per_block) != len(data) or any(p < 1 or n % p for n, p in zip(data, per_block)):
        raise _fail(op, f"{name} {list(per_block)} must have one size per axis of {list(data)}, each dividing it")
    return tuple(n // p for n, p in zip(data, per_block))


def _shift_scale_infer(types, attrs):
    op = "constexpr_blockwise_shift_scale"
    data, scale, offset = (types + [None])[:3]
    if data.dtype not in SHIFT_SCALE_DTYPES + FLOAT_DTYPES or data.rank < 1:
        raise _fail(op, f"data must be a tensor of {', '.join(SHIFT_SCALE_DTYPES + FLOAT_DTYPES)}, got {data.short()}")
    _float(op, scale)
    _blocks(op, data.shape, scale.shape, "scale")
    if offset is not None and (offset.shape != scale.shape or offset.dtype not in (data.dtype, *FLOAT_DTYPES)):
        raise _fail(op, f"offset {offset.short()} must have scale's shape {list(scale.shape)} and data's dtype "
                        f"({data.dtype}) or a float dtype")
    return TensorType(scale.dtype, data.shape)


def _per_block(values: np.ndarray, blocks: Sequence[int]) -> np.ndarray:
    for axis, size in enumerate(blocks):
        if size > 1:
            values = np.repeat(values, size, axis)
    return values


def _shift_scale(k, xs, a):
    data, scale = xs[0].astype(np.float32), np.asarray(xs[1], np.float32)
    blocks = _blocks("constexpr_blockwise_shift_scale", data.shape, scale.shape, "scale")
    if len(xs) > 2:
        data = data - _per_block(np.asarray(xs[2], np.float32), blocks)
    return data * _per_block(scale, blocks)


_declare("constexpr_blockwise_shift_scale", ("data", "scale", "offset"), infer=_shift_scale_infer,
         compute=_shift_scale, kind="constexpr", optional=("offset",))


def _lut_infer(types, attrs):
    op = "constexpr_lut_to_dense"
    indices, lut = types
    if indices.dtype not in LUT_INDEX_BITS or indices.rank < 1:
        raise _fail(op, f"indices must be a tensor of {', '.join(LUT_INDEX_BITS)}, got {indices.short()}")
    if lut.dtype not in FLOAT_DTYPES + AFFINE_DTYPES or lut.rank != indices.rank + 2:
        raise _fail(op, f"lut {lut.short()} must be fp16, fp32, int8 or uint8 of rank {indices.rank + 2} "
                        "(palettes per block of each axis, then entries, then vector size)")
    _blocks(op, indices.shape, lut.shape[:-2], "lut")
    if lut.shape[-2] != 2 ** LUT_INDEX_BITS[indices.dtype]:
        raise _fail(op, f"{indices.dtype} indices need {2 ** LUT_INDEX_BITS[indices.dtype]} palette entries, "
                        f"lut has {lut.shape[-2]}")
    shape = list(indices.shape)
    if lut.shape[-1] > 1:
        if attrs["vector_axis"] is None:
            raise _fail(op, f"a vector size of {lut.shape[-1]} needs vector_axis")
        shape[_axis(op, int(attrs["vector_axis"]), indices.rank)] *= lut.shape[-1]
    return TensorType(lut.dtype, tuple(shape))


def _lut(k, xs, a):
    indices, lut = np.asarray(xs[0]).astype(np.intp), np.asarray(xs[1], np.float32)
    blocks = _blocks("constexpr_lut_to_dense", indices.shape, lut.shape[:-2], "lut")
    palette = np.zeros((1,) * indices.ndim, np.intp)  # which palette each element reads, in lut's block order
    for axis, (n, size, count) in enumerate(zip(indices.shape, blocks, lut.shape[:-2])):
        shape = [1] * indices.ndim
        shape[axis] = n
        palette = palette * count + (np.arange(n) // size).reshape(shape)
    flat = lut.reshape(-1, lut.shape[-2], lut.shape[-1])
    values = flat[palette, indices]  # indices.shape + (vector size,)
    if lut.shape[-1] == 1:
        return values[..., 0]
    axis = int(a["vector_axis"]) % indices.ndim
    out_shape = list(indices.shape)
    out_shape[axis] *= lut.shape[-1]
    return np.moveaxis(values, -1, axis + 1).reshape(out_shape)


_declare("constexpr_lut_to_dense", ("indices", "lut"), {"vector_axis": Attr("int", None)}, infer=_lut_infer,
         compute=_lut, kind="constexpr")


def _quantize_params(op: str, types, attrs, data: TensorType) -> int | None:
    """Check ``scale`` and ``zero_point`` (the inputs after the first); return the axis they run along (None for
    scalars)."""
    scale, zero = (types[1:] + [None])[:2]
    _float(op, scale)
    axis = attrs["axis"]
    if axis is None:
        if scale.rank or (zero is not None and zero.rank):
            raise _fail(op, "a vector scale or zero_point needs axis")
        return None
    axis = _axis(op, int(axis), data.rank)
    for name, t in (("scale", scale), ("zero_point", zero)):
        _axis_vector(op, name, t, data, axis)
    return axis


def _quantize_infer(types, attrs):
    x = _float("quantize", types[0])
    if attrs["output_dtype"] not in QUANTIZED_DTYPES:
        raise _fail("quantize", f"output_dtype {attrs['output_dtype']!r} is not one of {tuple(QUANTIZED_DTYPES)}")
    if len(types) > 2 and types[2].dtype != attrs["output_dtype"]:
        raise _fail("quantize", f"zero_point is {types[2].dtype}, output_dtype {attrs['output_dtype']}")
    _quantize_params("quantize", types, attrs, x)
    return TensorType(attrs["output_dtype"], x.shape)


def _quantize(k, xs, a):
    x = xs[0]
    axis = None if a["axis"] is None else int(a["axis"]) % x.ndim
    zero = _along(xs[2], x.ndim, axis) if len(xs) > 2 else np.float32(0)
    low, high = QUANTIZED_DTYPES[a["output_dtype"]]
    return np.clip(k.round_integer(x / _along(xs[1], x.ndim, axis)) + zero, low, high)


def _dequantize_infer(types, attrs):
    x = types[0]
    if x.dtype not in QUANTIZED_DTYPES or (len(types) > 2 and types[2].dtype != x.dtype):
        raise _fail("dequantize", f"input and zero_point must be int8 or uint8 alike, got {x.short()}")
    _quantize_params("dequantize", types, attrs, x)
    return TensorType(types[1].dtype, x.shape)


def _dequantize(k, xs, a):
    x = xs[0]
    axis = None if a["axis"] is None else int(a["axis"]) % x.ndim
    zero = _along(xs[2], x.ndim, axis) if len(xs) > 2 else np.float32(0)
    return (np.asarray(x, np.float32) - zero) * _along(xs[1], x.ndim, axis)


# Reported on the ANE by public int8 kernels (W8A8, reference section 1); the datapath's rounding is the round op's.
_declare("quantize", ("input", "scale", "zero_point"), {"axis": Attr("int", None), "output_dtype": Attr("string")},
         infer=_quantize_infer, compute=_quantize, optional=("zero_point",))
_declare("dequantize", ("input", "scale", "zero_point"), {"axis": Attr("int", None)}, infer=_dequantize_infer,
         compute=_dequantize, optional=("zero_point",))


# s19-coreml: ops that coremltools conversions of common torch modules emit (torch.flip is ``reverse``).


def _reverse_axes(rank: int, axes) -> tuple[int, ...]:
    """The axes ``reverse`` flips: all of them when ``axes`` is absent (coremltools' default)."""
    if axes is None:
        return tuple(range(rank))
    out = tuple(_axis("reverse", int(a), rank) for a in np.asarray(axes).reshape(-1))
    if len(set(out)) != len(out):
        raise _fail("reverse", f"axes {[int(a) for a in np.asarray(axes).reshape(-1)]} name an axis twice")
    return out


def _reverse_infer(types, attrs):
    _reverse_axes(types[0].rank, attrs["axes"])
    return types[0]


_declare("reverse", ("x",), {"axes": Attr("ints", None)}, infer=_reverse_infer,
         compute=lambda k, xs, a: np.flip(xs[0], _reverse_axes(xs[0].ndim, a["axes"])), kind="layout",
         ane_known=False)

#: Ops no coremltools opset defines that public ANE code writes anyway (mechramc/Orion's codegen emits ``neg``).
NOT_IN_COREMLTOOLS = frozenset({"neg"})
_declare("neg", ("x",), infer=_same("neg"), compute=lambda k, xs, a: np.negative(xs[0]), ane_known=False)


def _prelu_infer(types, attrs):
    x, alpha = _float("prelu", types[0]), np.asarray(attrs["alpha"])
    if not 3 <= x.rank <= 5 or alpha.shape != (x.shape[1],):
        raise _fail("prelu", f"needs x of rank 3 to 5 and alpha of shape [{x.shape[1] if x.rank > 1 else '?'}] "
                             f"(one slope per channel), got {x.short()} and alpha {list(alpha.shape)}")
    return x


def _prelu(k, xs, a):
    alpha = np.asarray(a["alpha"], dtype=np.float32).reshape((1, -1) + (1,) * (xs[0].ndim - 2))
    return np.where(xs[0] > 0, xs[0], alpha * xs[0])


_declare("prelu", ("x",), {"alpha": Attr("tensor")}, infer=_prelu_infer, compute=_prelu, ane_known=False)
_declare("thresholded_relu", ("x",), {"alpha": Attr("float")}, infer=_same("thresholded_relu"),
         compute=lambda k, xs, a: np.where(xs[0] >= a["alpha"], xs[0], 0.0), ane_known=False)
_declare("sigmoid_hard", ("x",), {"alpha": Attr("float"), "beta": Attr("float")},
         infer=_same("sigmoid_hard"),
         compute=lambda k, xs, a: np.clip(np.float32(a["alpha"]) * xs[0] + np.float32(a["beta"]), 0.0, 1.0),
         ane_known=False)


def _stack_infer(types, attrs):
    first = types[0]
    if any(t != first for t in types):
        raise _fail("stack", f"values must share one type, got {', '.join(t.short() for t in types)}")
    axis = _axis("stack", int(attrs["axis"]), first.rank + 1)
    return TensorType(first.dtype, first.shape[:axis] + (len(types),) + first.shape[axis:])


_declare("stack", (), {"axis": Attr("int")}, infer=_stack_infer,
         compute=lambda k, xs, a: np.stack(xs, axis=int(a["axis"])), kind="layout", variadic="values",
         ane_known=False)


def _pixel_shuffle_infer(op: str, factor_key: str):
    def infer(types, attrs):
        x, r = types[0], int(attrs[factor_key])
        if x.rank != 4 or r < 1:
            raise _fail(op, f"needs a rank-4 x and a {factor_key} of at least 1, got {x.short()} and {r}")
        n, c, h, w = x.shape
        if op == "pixel_shuffle":
            if c % (r * r):
                raise _fail(op, f"channels {c} are not a multiple of {factor_key}^2 = {r * r}")
            return TensorType(x.dtype, (n, c // (r * r), h * r, w * r))
        if h % r or w % r:
            raise _fail(op, f"height {h} and width {w} must be multiples of {factor_key} {r}")
        return TensorType(x.dtype, (n, c * r * r, h // r, w // r))

    return infer


def _pixel_shuffle(k, xs, a):
    """[n, c*r*r, h, w] -> [n, c, h*r, w*r]: channel c*r*r + i*r + j lands at row h*r + i, column w*r + j."""
    x, r = xs[0], int(a["upscale_factor"])
    n, c, h, w = x.shape
    return x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def _pixel_unshuffle(k, xs, a):
    x, r = xs[0], int(a["downscale_factor"])
    n, c, h, w = x.shape
    return x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, h // r, w // r)


_declare("pixel_shuffle", ("x",), {"upscale_factor": Attr("int")},
         infer=_pixel_shuffle_infer("pixel_shuffle", "upscale_factor"), compute=_pixel_shuffle, kind="layout",
         ane_known=False)
_declare("pixel_unshuffle", ("x",), {"downscale_factor": Attr("int")},
         infer=_pixel_shuffle_infer("pixel_unshuffle", "downscale_factor"), compute=_pixel_unshuffle,
         kind="layout", ane_known=False)


# Upsampling of the last two axes: the output size is floor(size * scale factor) (fp32 or int32 factors).
_UPSAMPLE_ATTRS = {"scale_factor_height": Attr("float", 1), "scale_factor_width": Attr("float", 1)}


def _upsample_infer(op: str):
    def infer(types, attrs):
        x = _float(op, types[0])
        sh, sw = float(attrs["scale_factor_height"]), float(attrs["scale_factor_width"])
        if x.rank < 3 or sh <= 0 or sw <= 0:
            raise _fail(op, f"needs x of rank 3 or more and positive scale factors, got {x.short()}, {sh}, {sw}")
        if op == "upsample_bilinear" and attrs["align_corners"] and attrs["half_pixel_centers"]:
            raise _fail(op, "align_corners and half_pixel_centers cannot both be true")
        out = (math.floor(x.shape[-2] * sh), math.floor(x.shape[-1] * sw))
        if min(out) < 1:
            raise _fail(op, f"scale factors {sh}, {sw} leave no output of {x.short()}")
        return TensorType(x.dtype, x.shape[:-2] + out)

    return infer


def _upsampled_size(a: dict, axis_size: int, key: str) -> int:
    return math.floor(axis_size * float(a[key]))


def _upsample_nearest(k, xs, a):
    """Output pixel i reads input floor(i * in / out) (torch's ``nearest``; for whole factors, i // factor)."""
    x = xs[0]
    for axis, key in ((-2, "scale_factor_height"), (-1, "scale_factor_width")):
        size = x.shape[axis]
        out = _upsampled_size(a, size, key)
        x = np.take(x, np.minimum(np.arange(out) * size // out, size - 1), axis=axis)
    return x


def _bilinear_grid(size: int, out: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """Where output pixel i samples the input, as coremltools' upsample_bilinear defines it (clamped to the axis)."""
    i = np.arange(out, dtype=np.float64)
    if align_corners:
        grid = i * ((size - 1) / (out - 1) if out > 1 else 0.0)
    elif half_pixel:
        grid = (i + 0.5) * (size / out) - 0.5
    else:
        grid = i * (size / out)
    return np.clip(grid, 0, size - 1)


def _upsample_bilinear(k, xs, a):
    x = xs[0].astype(np.float32)
    half_pixel = (not a["align_corners"]) if a["half_pixel_centers"] is None else bool(a["half_pixel_centers"])
    for axis, key in ((-2, "scale_factor_height"), (-1, "scale_factor_width")):
        size = x.shape[axis]
        grid = _bilinear_grid(size, _upsampled_size(a, size, key), bool(a["align_corners"]), half_pixel)
        lo = np.floor(grid).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        shape = [1] * x.ndim
        shape[axis] = len(grid)
        frac = (grid - lo).astype(np.float32).reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
    return x


_declare("upsample_nearest_neighbor", ("x",), dict(_UPSAMPLE_ATTRS),
         infer=_upsample_infer("upsample_nearest_neighbor"), compute=_upsample_nearest, kind="layout",
         ane_known=False)
_declare("upsample_bilinear", ("x",),
         {**_UPSAMPLE_ATTRS, "align_corners": Attr("bool", True), "half_pixel_centers": Attr("bool", None)},
         infer=_upsample_infer("upsample_bilinear"), compute=_upsample_bilinear, ane_known=False)

# end of s19-coreml's block


# A constant: ``val`` holds the numpy array. Weights are constants that the emitter writes to blob files.
_declare("const", (), {"val": Attr("tensor")}, infer=lambda t, a: None, compute=lambda k, xs, a: a["val"], kind="const")


def input_names(op: OpDef, present: Sequence[str] | None = None) -> list[str]:
    """The tensor input names an op takes, in declaration order (``present`` filters optional ones)."""
    names = [op.variadic] if op.variadic else list(op.inputs)
    return [n for n in names if n not in op.optional or (present is not None and n in present)]


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


__all__ = ["OPS", "OpDef", "Attr", "Kernels", "get_op", "input_names", "last_axis_slice_offset", "cast_values",
           "GELU_MODES", "REQUIRED", "Window", "window", "window_views"]
