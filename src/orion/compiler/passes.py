"""Graph passes. Each is a function ``Graph -> Graph`` that leaves its argument untouched; :func:`run_pipeline`
repeats a list of them until the graph stops changing.

Every rewrite keeps the ANE's results: constant folding computes in float32 and rounds to the value's dtype, as
the hardware rounds each op's result; cast elimination only drops casts that round-trip exactly.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from orion.compiler.targets import Target
from orion.errors import GraphError, SettingsError
from orion.ir.graph import Graph, Node, Value, infer_node, topological_nodes
from orion.ir.ops import OPS, Kernels, window
from orion.ir.types import NUMPY_DTYPES, TensorType

Pass = Callable[[Graph], Graph]


def _rebuild(graph: Graph, rewrite: Callable[[Graph, Node, Callable[[Value], Value]], Value | None],
             retype: bool = False) -> Graph:
    """Copy ``graph`` node by node; ``rewrite(new_graph, node, lookup)`` may return a replacement value for a node
    (built in ``new_graph``) or None to copy the node unchanged. A replacement keeps the node's type unless
    ``retype`` (then the rewrite must also rewrite every reader)."""
    g = Graph(graph.name)
    g._names = set(graph._names)
    mapping: dict[int, Value] = {}
    for v in graph.inputs:
        nv = Value(v.type, v.name)
        g.inputs.append(nv)
        mapping[v.id] = nv

    def lookup(v: Value) -> Value:
        return mapping[v.id]

    for node in graph.nodes:
        replacement = rewrite(g, node, lookup)
        if replacement is None:
            inputs = {k: [lookup(x) for x in v] if isinstance(v, list) else lookup(v) for k, v in node.inputs.items()}
            values = [Value(v.type, v.name) for v in node.outputs]
            nn = Node(node.op, inputs, dict(node.attrs), values[0], values[1:])
            for old, nv in zip(node.more, values[1:]):
                nv.producer = nn
                mapping[old.id] = nv
            values[0].producer = nn
            g.nodes.append(nn)
            replacement = values[0]
        elif node.more:
            raise GraphError(f"a rewrite replaced {node.name!r}, an op of several results, by one value")
        elif replacement.type != node.output.type and not retype:
            raise GraphError(f"rewrite of {node.name!r} changed its type {node.output.type} -> {replacement.type}")
        mapping[node.output.id] = replacement
    g.outputs = {k: lookup(v) for k, v in graph.outputs.items()}
    return g


# ---------------------------------------------------------------------------------------------------------------------
# Clean-up passes


def _is_noop(node: Node) -> bool:
    x = next(iter(node.inputs.values()), None)
    if not isinstance(x, Value):
        return False
    if node.op == "identity":
        return True
    if node.op == "reshape":
        return x.shape == node.output.shape
    if node.op == "transpose":
        return list(node.attrs["perm"]) == list(range(x.type.rank))
    if node.op == "cast":
        return node.attrs["dtype"] == x.dtype
    if node.op == "slice_by_size":
        return x.shape == node.output.shape
    return False


def eliminate_identities(graph: Graph) -> Graph:
    """Drop identity ops, and reshapes/transposes/casts/slices that leave their input as it is."""
    return _rebuild(graph, lambda g, node, lookup: lookup(node.inputs["x"]) if _is_noop(node) else None)


def eliminate_casts(graph: Graph) -> Graph:
    """``cast(cast(x, wide), narrow)`` where ``x`` was already narrow: fp16 -> fp32 -> fp16 is exact, so drop both."""

    def rewrite(g, node, lookup):
        if node.op != "cast":
            return None
        inner = node.inputs["x"].producer
        if inner is not None and inner.op == "cast":
            source = inner.inputs["x"]
            widening = source.dtype == "fp16" and inner.attrs["dtype"] == "fp32"
            if widening and node.attrs["dtype"] == "fp16":
                return lookup(source)
        return None

    return _rebuild(graph, rewrite)


def eliminate_dead_code(graph: Graph) -> Graph:
    """Keep only the nodes the outputs need (graph inputs always stay: they are the program's interface)."""
    live = {id(n) for n in topological_nodes(graph.outputs.values())}
    g = graph.copy()
    keep = [n for old, n in zip(graph.nodes, g.nodes) if id(old) in live]
    g.nodes = keep
    return g


def merge_scalar_constants(graph: Graph) -> Graph:
    """Read one constant for each scalar value: equal scalars (the eps and the -0.5 exponent of every norm, the
    constants of every GELU) become one, because each distinct constant takes one of the program's few
    weight-tensor slots (catalog ANE-21). Weights keep their own names: only single-element constants merge."""
    first: dict[tuple, Value] = {}

    def rewrite(g, node, lookup):
        if not node.is_const or node.output.type.size != 1:
            return None
        key = (node.output.type, np.asarray(node.attrs["val"]).tobytes())
        if key in first:
            return lookup(first[key])
        first[key] = node.output
        return None

    return _rebuild(graph, rewrite)


#: Op kinds whose result on constants is the same under every emulator numerics setting.
_FOLDABLE = ("elementwise", "layout")


def fold_constants(graph: Graph) -> Graph:
    """Replace elementwise and layout ops whose inputs are all constants by the constant they compute."""

    def rewrite(g, node, lookup):
        if node.is_const or OPS[node.op].kind not in _FOLDABLE or OPS[node.op].several_results:
            return None
        values = node.input_values()
        if not values or not all(v.producer is not None and v.producer.is_const for v in values):
            return None
        arrays = [v.producer.attrs["val"].astype(np.float32) for v in values]
        with np.errstate(all="ignore"):
            result = OPS[node.op].compute(Kernels(), arrays, node.attrs)
        dtype = NUMPY_DTYPES[node.output.dtype]
        result = np.asarray(result).astype(dtype).reshape(node.output.shape)
        nv = Value(node.output.type, node.output.name)
        nn = Node("const", {}, {"val": result}, nv)
        nv.producer = nn
        g.nodes.append(nn)
        return nv

    return _rebuild(graph, rewrite)


# ---------------------------------------------------------------------------------------------------------------------
# ANE legalization


def legalize(target: Target) -> Pass:
    """Rewrite what ``target`` cannot compile: rsqrt -> pow(-0.5), gelu -> tanh form (its sigmoid
    approximation -> x*sigmoid(1.702x)), silu -> x*sigmoid(x),
    conv bias -> separate add, concat -> one-hot 1x1 convs (exact: products with 1 and sums with 0)."""

    def rewrite(g: Graph, node: Node, lookup) -> Value | None:
        op, name = node.op, node.name

        def new(op_name: str, suffix: str, inputs: dict, attrs: dict | None = None) -> Value:
            return g.add_node(op_name, inputs, attrs or {}, f"{name}_{suffix}")

        def scalar(value: float, dtype: str, suffix: str) -> Value:
            return g.add_const(np.asarray(value, dtype=NUMPY_DTYPES[dtype]), f"{name}_{suffix}")

        if op == "rsqrt" and not target.rsqrt_native:
            x = lookup(node.inputs["x"])
            return new("pow", "pow", {"x": x, "y": scalar(-0.5, x.dtype, "exp")})
        if op == "gelu" and not target.gelu_native:
            x = lookup(node.inputs["x"])
            dt = x.dtype
            if node.attrs["mode"] == "SIGMOID_APPROXIMATION":  # its own formula, not the tanh form's (0.02 apart)
                scaled = new("mul", "arg", {"x": x, "y": scalar(1.702, dt, "c")})
                return new("mul", "out", {"x": x, "y": new("sigmoid", "sig", {"x": scaled})})
            cube = new("mul", "x3", {"x": new("mul", "x2", {"x": x, "y": x}), "y": x})
            inner = new("add", "inner", {"x": x, "y": new("mul", "cubic", {"x": cube, "y": scalar(0.044715, dt, "k")})})
            t = new("tanh", "tanh", {"x": new("mul", "arg", {"x": inner, "y": scalar(math.sqrt(2 / math.pi), dt, "c")})})
            half = new("mul", "half", {"x": x, "y": scalar(0.5, dt, "h")})
            return new("mul", "out", {"x": half, "y": new("add", "one_plus", {"x": t, "y": scalar(1.0, dt, "one")})})
        if op == "silu" and not target.silu_native:
            x = lookup(node.inputs["x"])
            return new("mul", "out", {"x": x, "y": new("sigmoid", "sig", {"x": x})})
        if op == "conv" and "bias" in node.inputs:
            inputs = {k: lookup(v) for k, v in node.inputs.items() if k != "bias"}
            conv = g.add_node("conv", inputs, node.attrs, f"{name}_conv")
            bias = lookup(node.inputs["bias"])
            channel_shape = [1, bias.type.size] + [1] * (conv.type.rank - 2)  # broadcast along axis 1
            if list(bias.shape) != channel_shape:
                bias = new("reshape", "bias4d", {"x": bias}, {"shape": channel_shape})
            return new("add", "bias", {"x": conv, "y": bias})
        if op == "concat" and target.concat == "forbid":
            return _concat_as_convs(g, node, lookup)
        return None

    return lambda graph: _rebuild(graph, rewrite)


def _concat_as_convs(g: Graph, node: Node, lookup) -> Value:
    """Concat without a concat op: move the axis to channels, scatter each part with a one-hot 1x1 conv, add."""
    parts = [lookup(v) for v in node.inputs["values"]]
    out_type = node.output.type
    rank = out_type.rank
    axis = int(node.attrs["axis"]) % rank
    if rank != 4:
        raise GraphError(f"concat {node.name!r}: the target forbids concat and only rank-4 concats can be rewritten")
    perm = list(range(rank))
    perm[1], perm[axis] = perm[axis], perm[1]
    total = out_type.shape[axis]
    dtype = NUMPY_DTYPES[out_type.dtype]
    acc, offset = None, 0
    for i, part in enumerate(parts):
        if axis != 1:
            part = g.add_node("transpose", {"x": part}, {"perm": perm}, f"{node.name}_t{i}")
        width = part.shape[1]
        onehot = np.zeros((total, width, 1, 1), dtype=dtype)
        onehot[offset + np.arange(width), np.arange(width), 0, 0] = 1
        if node.attrs["interleave"]:
            onehot[:] = 0
            onehot[np.arange(width) * len(parts) + i, np.arange(width), 0, 0] = 1
        w = g.add_const(onehot, f"{node.name}_scatter{i}")
        y = g.add_node("conv", {"x": part, "weight": w}, {}, f"{node.name}_part{i}")
        acc = y if acc is None else g.add_node("add", {"x": acc, "y": y}, {}, f"{node.name}_sum{i}")
        offset += width
    if axis != 1:
        acc = g.add_node("transpose", {"x": acc}, {"perm": perm}, f"{node.name}_back")
    return acc


# ---------------------------------------------------------------------------------------------------------------------
# Weights as inputs


def _is_plain_1x1(conv: Node) -> bool:
    """A conv that is one matmul of its weight: rank 4, 1x1 kernel, stride 1, no padding, groups=1."""
    x, w = conv.inputs["x"].type, conv.inputs["weight"].type
    if x.rank != 4 or w.shape[2:] != (1, 1) or int(conv.attrs["groups"]) != 1:
        return False
    win = window("conv", x.shape[2:], w.shape[2:], conv.attrs)
    return win.strides == (1, 1) and win.pads == ((0, 0), (0, 0))


def weights_to_inputs(names) -> Pass:
    """Turn the named constants into function inputs, so new weights are an input write and never a compile.

    A conv whose weight becomes an input is rewritten as a matmul (the form public weights-as-inputs pipelines run):
    the weight input is ``[1, 1, O, I]``, ``x`` is viewed as ``[1, 1, I, S]``, and the product goes back to
    ``[1, O, 1, S]``. Other constants keep their shape.
    """
    wanted = set(names)

    def apply(graph: Graph) -> Graph:
        found = {n.name for n in graph.nodes if n.is_const} & wanted
        missing = wanted - found
        if missing:
            known = sorted(n.name for n in graph.nodes if n.is_const)
            raise GraphError(f"no constant(s) named {sorted(missing)} to turn into inputs; constants: {known}")
        users = graph.users()
        conv_weights = set()
        for node in graph.nodes:
            if node.is_const and node.name in wanted:
                readers = users.get(node.output.id, [])
                as_weight = [u for u in readers if u.op == "conv" and u.inputs.get("weight") is node.output]
                if as_weight and len(as_weight) != len(readers):
                    raise GraphError(f"constant {node.name!r} is a conv weight and also read by other ops")
                if as_weight:
                    if not all(_is_plain_1x1(u) for u in as_weight):
                        raise GraphError(f"constant {node.name!r} feeds a conv that is not 1x1 with stride 1, no "
                                         "padding and groups=1; only such a conv can take its weight as an input")
                    conv_weights.add(node.name)

        def rewrite(g: Graph, node: Node, lookup) -> Value | None:
            if node.is_const and node.name in wanted:
                shape = node.output.shape
                if node.name in conv_weights:
                    shape = (1, 1, shape[0], shape[1])
                v = Value(TensorType(node.output.dtype, tuple(shape)), node.name)
                g.inputs.append(v)
                return v
            if node.op == "conv" and node.inputs["weight"].producer is not None \
                    and node.inputs["weight"].producer.name in conv_weights:
                x = lookup(node.inputs["x"])
                w = lookup(node.inputs["weight"])
                _, cin, h, s = x.shape
                xr = g.add_node("reshape", {"x": x}, {"shape": [1, 1, cin, h * s]}, f"{node.name}_rows")
                m = g.add_node("matmul", {"x": w, "y": xr}, {}, f"{node.name}_matmul")
                y = g.add_node("reshape", {"x": m}, {"shape": list(node.output.shape)}, f"{node.name}_cols")
                if "bias" in node.inputs:
                    bias = lookup(node.inputs["bias"])
                    if bias.shape != (1, bias.type.size, 1, 1):
                        bias = g.add_node("reshape", {"x": bias}, {"shape": [1, bias.type.size, 1, 1]},
                                          f"{node.name}_bias4d")
                    y = g.add_node("add", {"x": y, "y": bias}, {}, f"{node.name}_bias")
                return y
            return None

        return _rebuild(graph, rewrite, retype=True)

    return apply


# ---------------------------------------------------------------------------------------------------------------------
# I/O canonicalization


def canonicalize_io(graph: Graph) -> Graph:
    """Declare inputs and outputs in alphabetical order of their names: the order the ANE binds them in
    (catalog ANE-03, ANE-19), so declaration order, binding order and the order users see agree."""
    g = graph.copy()
    g.inputs = sorted(g.inputs, key=lambda v: v.name)
    g.outputs = dict(sorted(g.outputs.items()))
    return g


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline

CLEANUP: tuple[Pass, ...] = (eliminate_identities, eliminate_casts, fold_constants, merge_scalar_constants,
                             eliminate_dead_code)


def default_passes(target: Target) -> list[Pass]:
    return [legalize(target), *CLEANUP, canonicalize_io]


def run_pipeline(graph: Graph, passes: Sequence[Pass], max_rounds: int = 20) -> Graph:
    """Apply ``passes`` in order, repeatedly, until a whole round leaves the graph unchanged."""
    graph.validate()
    current = graph
    before = current.fingerprint()
    for _ in range(max_rounds):
        for p in passes:
            current = p(current)
        after = current.fingerprint()
        if after == before:
            current.validate()
            return current
        before = after
    raise GraphError(f"passes did not reach a fixpoint in {max_rounds} rounds")


# ---------------------------------------------------------------------------------------------------------------------
# Weight compression


#: ``int8``: per output channel constexpr_affine_dequantize (iOS16), per block constexpr_blockwise_shift_scale;
#: ``int4``: constexpr_blockwise_shift_scale; ``lutN``: an N-bit palette per output channel (or group of channels)
#: fitted by k-means, constexpr_lut_to_dense.
WEIGHT_SCHEMES = ("int8", "int4", "lut2", "lut4", "lut6", "lut8")
BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class WeightCompression:
    """How :func:`compress_weights` stores conv weights. ``block``: None for one scale (or palette) per output
    channel, else 32/64/128 input channels per scale (for palettes: output channels per palette). ``keep``: shell
    patterns of constant names left in fp16 (sensitive layers); weights under ``min_size`` values stay fp16 too.
    A scheme name parses with :meth:`of`."""

    scheme: str
    block: int | None = None
    keep: tuple[str, ...] = ()
    min_size: int = 4096
    #: Blocks of a model left in fp16 at each end (the first and last are the most sensitive); models apply it.
    keep_ends: int = 0

    def __post_init__(self):
        if self.scheme not in WEIGHT_SCHEMES:
            raise SettingsError(f"unknown weight scheme {self.scheme!r}; expected one of {', '.join(WEIGHT_SCHEMES)}")
        if self.block is not None and self.block not in BLOCK_SIZES:
            raise SettingsError(f"block {self.block!r} is not one of {BLOCK_SIZES} (or None: per channel)")

    @classmethod
    def of(cls, spec: "WeightCompression | str | None") -> "WeightCompression | None":
        """A scheme name (``"int4"``, or ``"int4/32"`` for blocks of 32) or a WeightCompression as it is."""
        if spec is None or isinstance(spec, WeightCompression):
            return spec
        scheme, _, block = str(spec).partition("/")
        if block and not block.isdigit():
            raise SettingsError(f"weights {spec!r}: write a scheme, or scheme/block such as int4/32")
        return cls(scheme, int(block) if block else None)

    def keeps_block(self, index: int, count: int) -> bool:
        """Whether block ``index`` of ``count`` stays fp16 under :attr:`keep_ends`."""
        return index < self.keep_ends or index >= count - self.keep_ends

    @property
    def bits(self) -> int:
        return int(self.scheme.removeprefix("lut").removeprefix("int"))


def _fp16_scale(amax: np.ndarray, levels: int) -> np.ndarray:
    """Symmetric scales held in fp16 (as the ANE holds them); an all-zero group gets scale 1."""
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float16)
    return np.where(scale > 0, scale, np.float16(6e-8))  # an underflowed scale still divides


#: Fractions of a group's largest magnitude tried as its clipping range: the one with the least squared error wins
#: (clipping a few outliers buys finer steps for the rest; it matters at 4 bits).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _symmetric(w: np.ndarray, block: int | None, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest symmetric integers ``q`` and fp16 scales with ``w ~ scale * q``: one scale per output
    channel, or per ``block`` input channels of each; each group's range from :data:`CLIP_RATIOS`. ``q`` in
    [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    out, cin = w.shape[0], w.shape[1]
    groups = w.reshape(out, cin // block, -1) if block else w.reshape(out, 1, -1)
    levels = 2 ** (bits - 1) - 1
    amax = np.abs(groups).max(axis=2, keepdims=True)
    best_q, best_scale, best_err = None, None, None
    for ratio in CLIP_RATIOS:
        scale = _fp16_scale(amax * ratio, levels).astype(np.float64)
        q = np.clip(np.round(groups / scale), -levels, levels)
        err = ((q * scale - groups) ** 2).sum(axis=2, keepdims=True)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
            continue
        better = err < best_err
        best_q = np.where(better, q, best_q)
        best_scale, best_err = np.where(better, scale, best_scale), np.minimum(err, best_err)
    return best_q.reshape(w.shape).astype(np.int8), best_scale.astype(np.float16).reshape(out, -1)


def _palettes(rows: np.ndarray, entries: int, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means per row of ``rows`` [R, n]: palettes [R, entries] (started at quantiles) and each value's index."""
    palette = np.quantile(rows, (np.arange(entries) + 0.5) / entries, axis=1).T  # [R, entries]
    span = float(np.abs(rows).max()) * 4 + 1.0
    lift = np.arange(rows.shape[0])[:, None] * span  # rows apart on one line: one searchsorted for all
    for _ in range(iterations + 1):
        palette = np.sort(palette, axis=1)
        mids = (palette[:, 1:] + palette[:, :-1]) / 2
        index = np.searchsorted((mids + lift).ravel(), (rows + lift).ravel()).reshape(rows.shape)
        index -= np.arange(rows.shape[0])[:, None] * (entries - 1)
        slots = (index + np.arange(rows.shape[0])[:, None] * entries).ravel()  # (row, entry) as one number
        sums = np.bincount(slots, weights=rows.ravel(), minlength=palette.size).reshape(palette.shape)
        counts = np.bincount(slots, minlength=palette.size).reshape(palette.shape)
        palette = np.where(counts > 0, sums / np.maximum(counts, 1), palette)
    return palette, index


def _lut_parts(w64: np.ndarray, spec: WeightCompression) -> tuple[np.ndarray, np.ndarray, int]:
    """Palettes, indices and output channels per palette of a ``lutN`` weight."""
    out = w64.shape[0]
    group = spec.block if spec.block and out % spec.block == 0 else 1
    palette, index = _palettes(w64.reshape(out // group, -1), 2 ** spec.bits)
    return palette, index, group


def _int_parts(w64: np.ndarray, spec: WeightCompression) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Integers, fp16 scales and input channels per scale (None: per output channel) of an ``intN`` weight."""
    block = spec.block if spec.block and w64.shape[1] % spec.block == 0 else None
    q, scale = _symmetric(w64, block, spec.bits)
    return q, scale, block


def decoded_weight(w64: np.ndarray, spec: WeightCompression) -> np.ndarray:
    """The fp16 weight the constexpr op of :func:`compress_weight` decodes ``w64`` to (float64 values)."""
    if spec.scheme.startswith("lut"):
        palette, index, group = _lut_parts(w64, spec)
        rows = np.repeat(palette.astype(np.float16), group, axis=0)
        w = np.take_along_axis(rows, index.reshape(rows.shape[0], -1), 1)
    else:
        q, scale, _ = _int_parts(w64, spec)
        w = q.reshape(w64.shape[0], scale.shape[1], -1) * scale[:, :, None].astype(np.float64)
    return w.reshape(w64.shape).astype(np.float16).astype(np.float64)


def compress_weight(g: Graph, name: str, w: np.ndarray, spec: WeightCompression, out_type: TensorType) -> Value:
    """The constexpr op that stores conv weight ``w`` [O, I, ...] as ``spec`` says, built in ``g``."""
    w64 = w.astype(np.float64)
    out = w.shape[0]
    rank = w.ndim
    float_dtype = NUMPY_DTYPES[out_type.dtype]
    if spec.scheme.startswith("lut"):
        palette, index, group = _lut_parts(w64, spec)
        lut = palette.astype(float_dtype).reshape((out // group,) + (1,) * (rank - 1) + (2 ** spec.bits, 1))
        indices = g.add_const(index.reshape(w.shape), f"{name}_indices", f"uint{spec.bits}")
        inputs, op = {"indices": indices, "lut": g.add_const(lut, f"{name}_lut")}, "constexpr_lut_to_dense"
    else:
        q, scale, block = _int_parts(w64, spec)
        data = g.add_const(q, f"{name}_data", spec.scheme)
        if spec.scheme == "int8" and block is None:  # the iOS16 form every chip decodes (N12)
            inputs = {"quantized_data": data, "zero_point": g.add_const(np.int8(0), f"{name}_zero"),
                      "scale": g.add_const(scale.reshape(out).astype(float_dtype), f"{name}_scale")}
            op = "constexpr_affine_dequantize"
        else:
            scale = scale.reshape((out, scale.shape[1]) + (1,) * (rank - 2)).astype(float_dtype)
            inputs, op = {"data": data, "scale": g.add_const(scale, f"{name}_scale")}, "constexpr_blockwise_shift_scale"
    attrs, value_type = infer_node(op, inputs, {"axis": 0} if op == "constexpr_affine_dequantize" else {})
    if value_type != out_type:
        raise GraphError(f"compressing {name!r} gave {value_type}, expected {out_type}")
    value = Value(out_type, name)
    node = Node(op, inputs, attrs, value)
    value.producer = node
    g.nodes.append(node)
    return value


def compressed_nbytes(spec: WeightCompression, shape: tuple[int, ...], float_bytes: int = 2) -> int:
    """Bytes a weight of ``shape`` takes stored as ``spec`` says: its data plus its scales or palettes."""
    size, out, cin = math.prod(shape), shape[0], shape[1]
    if spec.scheme.startswith("lut"):
        palettes = out // spec.block if spec.block and out % spec.block == 0 else out
        return -(-size * spec.bits // 8) + palettes * 2 ** spec.bits * float_bytes
    scales = out * (cin // spec.block if spec.block and cin % spec.block == 0 else 1)
    return -(-size * spec.bits // 8) + scales * float_bytes


def _conv_reading(g: Graph, node: Node, lookup, x: Value) -> Value:
    """A copy of conv ``node`` in ``g`` that reads ``x`` instead of its input (the rest through ``lookup``)."""
    inputs = {k: x if k == "x" else lookup(v) for k, v in node.inputs.items()}
    value = Value(node.output.type, node.output.name)
    conv = Node("conv", inputs, dict(node.attrs), value)
    value.producer = conv
    g.nodes.append(conv)
    return value


def compress_weights(spec: WeightCompression, input_scales: dict[str, np.ndarray] | None = None) -> Pass:
    """Store every float conv weight (at least ``spec.min_size`` values, not matched by ``spec.keep``, and smaller
    compressed: a palette per narrow channel can outweigh it) compressed: a constexpr op decodes it to the same fp16
    weight shape before the conv, so the conv and everything after it stay as they were. Weight bytes drop to about
    bits/16 of fp16, plus the scales or palettes.

    ``input_scales`` (conv name -> fp16 per-input-channel factors ``1/s``, from :func:`activation_scales`) makes
    those convs activation-aware: the weight is stored as ``w * s`` (its salient input channels rounded finer) and
    a ``mul`` by ``1/s`` before the conv undoes it, so the product is the same."""
    input_scales = input_scales or {}

    def apply(graph: Graph) -> Graph:
        users = graph.users()
        chosen = {
            n.output.id for n in graph.nodes
            if n.is_const and n.output.dtype in ("fp16", "fp32") and n.output.type.size >= spec.min_size
            and n.output.type.rank >= 2 and users.get(n.output.id)
            and all(u.op == "conv" and u.inputs.get("weight") is n.output for u in users[n.output.id])
            and not any(fnmatch.fnmatchcase(n.name, pattern) for pattern in spec.keep)
            and compressed_nbytes(spec, n.output.shape, n.output.type.numpy_dtype.itemsize) < n.output.type.nbytes
        }
        scaled = {  # weight id -> 1/s, for a chosen weight read by one scaled conv only
            conv.inputs["weight"].id: input_scales[conv.name] for conv in graph.nodes
            if conv.op == "conv" and conv.name in input_scales and conv.inputs["weight"].id in chosen
            and len(users[conv.inputs["weight"].id]) == 1
        }

        def rewrite(g: Graph, node: Node, lookup) -> Value | None:
            if node.op == "conv" and node.inputs["weight"].id in scaled:
                x = lookup(node.inputs["x"])
                inverse = scaled[node.inputs["weight"].id].reshape((1, -1) + (1,) * (x.type.rank - 2))
                factor = g.add_const(inverse.astype(NUMPY_DTYPES[x.dtype]), f"{node.name}_input_scale")
                return _conv_reading(g, node, lookup, g.add_node("mul", {"x": x, "y": factor}, {}, f"{node.name}_scaled"))
            if node.output.id not in chosen:
                return None
            w = np.asarray(node.attrs["val"], np.float64)
            if node.output.id in scaled:  # w * s, with s = 1 / (the fp16 factor) so the mul undoes it exactly
                inverse = scaled[node.output.id].astype(np.float64)
                w = w / inverse.reshape((1, -1) + (1,) * (w.ndim - 2))
            return compress_weight(g, node.name, w, spec, node.output.type)

        return _rebuild(graph, rewrite)

    return apply


#: Exponents tried by :func:`activation_scales`: ``s_c = mean|x_c| ** alpha``; 0 is the plain scheme.
AWQ_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _conv_inputs(graph: Graph, feeds: Sequence[dict[str, np.ndarray]]):
    """Each conv node with its input on each feed, from the graph's numpy meaning (float32)."""
    for feed in feeds:
        env = {v.id: np.asarray(feed[v.name], np.float32) for v in graph.inputs}
        for node in graph.nodes:
            args = [[env[x.id] for x in v] if isinstance(v, list) else env[v.id] for v in node.inputs.values()]
            spec = OPS[node.op]
            arrays = args[0] if spec.variadic else args
            env[node.output.id] = np.asarray(spec.compute(Kernels(), arrays, node.attrs), np.float32)
            if node.op == "conv":
                yield node, env[node.inputs["x"].id]


def activation_scales(graph: Graph, feeds: Sequence[dict[str, np.ndarray]], spec: WeightCompression,
                      alphas: Sequence[float] = AWQ_ALPHAS) -> dict[str, np.ndarray]:
    """Activation-aware scaling (AWQ): for each conv with a constant float weight (groups 1), the fp16 factors
    ``1/s`` per input channel, ``s_c = mean|x_c| ** alpha`` over calibration ``feeds``, with the ``alpha`` of
    ``alphas`` whose ``spec``-compressed weight gives the least squared conv output error on those inputs. Input
    channels that carry large activations get larger weights, so finer steps, where rounding costs most. Convs
    whose best ``alpha`` is 0 (the plain scheme) are left out. Feed the result to :func:`compress_weights`."""
    inputs: dict[str, list[np.ndarray]] = {}
    convs: dict[str, Node] = {}
    for node, x in _conv_inputs(graph, feeds):
        w = node.inputs["weight"].producer
        if (w is not None and w.is_const and node.inputs["weight"].dtype in ("fp16", "fp32")
                and int(node.attrs["groups"]) == 1):
            inputs.setdefault(node.name, []).append(x)
            convs[node.name] = node
    chosen: dict[str, np.ndarray] = {}
    for name, xs in inputs.items():
        node = convs[name]
        w = np.asarray(node.inputs["weight"].producer.attrs["val"], np.float64)
        axes = (0,) + tuple(range(2, xs[0].ndim))
        magnitude = np.mean([np.abs(x).mean(axis=axes) for x in xs], axis=0).astype(np.float64)
        magnitude = np.maximum(magnitude, magnitude.max() * 1e-4 + 1e-12)  # silent channels keep a usable factor
        best, best_err = None, None
        for alpha in alphas:
            s = magnitude ** alpha
            s = s / np.sqrt(s.max() * s.min())  # centred around 1: the fp16 factors stay far from its limits
            inverse = (1 / s).astype(np.float16)
            s = 1 / inverse.astype(np.float64)
            shape = (1, -1) + (1,) * (w.ndim - 2)
            error = decoded_weight(w * s.reshape(shape), spec) / s.reshape(shape) - w
            err = sum(float((OPS["conv"].compute(Kernels(), [x, error.astype(np.float32)], node.attrs) ** 2).sum())
                      for x in xs)
            if best_err is None or err < best_err:
                best, best_err = (None if alpha == 0 else inverse), err
        if best is not None:
            chosen[name] = best
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# int8 activations (W8A8)


def activation_ranges(graph: Graph, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """The largest magnitude each conv's input reaches over calibration ``feeds`` (the graph's numpy meaning, float32),
    by conv name: what :func:`quantize_activations` turns into static int8 scales."""
    ranges: dict[str, float] = {}
    for node, x in _conv_inputs(graph, feeds):
        ranges[node.name] = max(ranges.get(node.name, 0.0), float(np.abs(x).max()))
    return ranges


def quantize_activations(ranges: dict[str, float]) -> Pass:
    """W8A8 as public int8 ANE kernels run it: the input of each conv named in ``ranges`` goes through
    ``quantize`` (int8, a static per-tensor scale of range / 127) and ``dequantize`` before the multiply, so the
    conv multiplies int8 activations by (compressed) weights decoded to fp16."""

    def rewrite(g: Graph, node: Node, lookup) -> Value | None:
        if node.op != "conv" or node.name not in ranges or ranges[node.name] <= 0:
            return None
        x = lookup(node.inputs["x"])
        scale = g.add_const(np.asarray(np.float16(ranges[node.name] / 127), NUMPY_DTYPES[x.dtype]), f"{node.name}_a_scale")
        q = g.add_node("quantize", {"input": x, "scale": scale}, {"output_dtype": "int8"}, f"{node.name}_a_int8")
        return _conv_reading(g, node, lookup, g.add_node("dequantize", {"input": q, "scale": scale}, {}, f"{node.name}_a"))

    return lambda graph: _rebuild(graph, rewrite)
