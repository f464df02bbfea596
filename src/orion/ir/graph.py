"""The dataflow graph: values with static types, nodes that apply one op, named inputs and outputs.

A graph is a plain list of nodes in topological order. Passes build new graphs or edit a copy; they never share
nodes between graphs. ``print(graph)`` gives a readable listing in the spirit of torch.fx.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from orion.errors import GraphError
from orion.ir.ops import get_op, input_names
from orion.ir.types import NUMPY_DTYPES, TensorType, dtype_name

_ids = itertools.count()
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def sanitize_name(name: str) -> str:
    """A MIL identifier for ``name``: dots and other characters become underscores."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if out and not out[0].isdigit() else f"v_{out}"


@dataclass(eq=False)
class Value:
    """A tensor in the graph. ``producer`` is None for a graph input."""

    type: TensorType
    name: str
    producer: "Node | None" = None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type.short()}"


@dataclass(eq=False)
class Node:
    """One op applied to input values. ``inputs`` maps MIL parameter names to values (a list for ``concat``)."""

    op: str
    inputs: dict[str, "Value | list[Value]"]
    attrs: dict
    output: Value
    #: The further results of an op with several (``split``, ``topk``), in order after ``output``.
    more: list[Value] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def outputs(self) -> list[Value]:
        return [self.output, *self.more]

    def input_values(self) -> list[Value]:
        out: list[Value] = []
        for v in self.inputs.values():
            out.extend(v if isinstance(v, list) else [v])
        return out

    @property
    def is_const(self) -> bool:
        return self.op == "const"


def infer_node(op_name: str, inputs: dict, attrs: dict) -> tuple[dict, TensorType]:
    """Check inputs and attributes against the op's declaration; return resolved attrs and the output type."""
    op = get_op(op_name)
    expected = input_names(op, list(inputs))
    if list(inputs) != expected and sorted(inputs) != sorted(expected):
        raise GraphError(f"{op_name}: inputs {sorted(inputs)} do not match the declared {expected}")
    if op.kind == "state":
        raise GraphError(f"{op_name} reads or writes a state, which a graph has not; write it in MIL text (the "
                         "parser, checker and emulator run it)")
    resolved = op.resolve_attrs(attrs)
    types: list[TensorType] = []
    for name in expected:
        v = inputs[name]
        types.extend(x.type for x in v) if isinstance(v, list) else types.append(v.type)
    return resolved, op.infer(types, resolved)


class Graph:
    """A function: named inputs, nodes in topological order, named outputs (an ordered dict)."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: dict[str, Value] = {}
        self._names: set[str] = set()

    # -- construction --------------------------------------------------------------------------------------------

    def unique_name(self, base: str) -> str:
        base = sanitize_name(base)
        name = base
        for i in itertools.count(1):
            if name not in self._names:
                break
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        if not _NAME.match(name):
            raise GraphError(f"input name {name!r} is not a valid MIL identifier (letters, digits, underscore)")
        if name in self._names:
            raise GraphError(f"duplicate name {name!r}")
        self._names.add(name)
        value = Value(type, name)
        self.inputs.append(value)
        return value

    def add_node(self, op: str, inputs: dict, attrs: dict | None = None,
                 name: str | None = None) -> Value | tuple[Value, ...]:
        """The node's result, or a tuple of them for an op with several (``split``)."""
        resolved, out_type = infer_node(op, inputs, attrs or {})
        several = get_op(op).several_results
        base = self.unique_name(name or op)
        values = [Value(t, base if i == 0 else self.unique_name(f"{base}_{i}"))
                  for i, t in enumerate(out_type if several else (out_type,))]
        node = Node(op, dict(inputs), resolved, values[0], values[1:])
        for value in values:
            value.producer = node
        self.nodes.append(node)
        return tuple(values) if several else values[0]

    def add_const(self, array: np.ndarray, name: str = "const", dtype: str | None = None) -> Value:
        """A constant of ``array``'s dtype, or of MIL type ``dtype`` (a sub-byte type such as ``int4`` is held one
        value per int8/uint8 element)."""
        array = np.asarray(array) if dtype is None else np.asarray(array).astype(NUMPY_DTYPES[dtype], copy=False)
        if not array.flags.c_contiguous:
            array = array.copy()  # (np.ascontiguousarray would turn a scalar into shape [1])
        value = Value(TensorType(dtype or dtype_name(array.dtype), tuple(array.shape)), self.unique_name(name))
        node = Node("const", {}, {"val": array}, value)
        value.producer = node
        self.nodes.append(node)
        return value

    def set_output(self, name: str, value: Value) -> None:
        if not _NAME.match(name):
            raise GraphError(f"output name {name!r} is not a valid MIL identifier")
        if name in self.outputs:
            raise GraphError(f"duplicate output {name!r}")
        self.outputs[name] = value

    # -- queries -------------------------------------------------------------------------------------------------

    def users(self) -> dict[int, list[Node]]:
        """Value id -> nodes that read it."""
        out: dict[int, list[Node]] = {}
        for node in self.nodes:
            for v in node.input_values():
                out.setdefault(v.id, []).append(node)
        return out

    def consts(self) -> list[Node]:
        return [n for n in self.nodes if n.is_const]

    def validate(self) -> None:
        """Topological order, no dangling values, outputs defined."""
        defined = {v.id for v in self.inputs}
        for node in self.nodes:
            for v in node.input_values():
                if v.id not in defined:
                    raise GraphError(f"node {node.name!r} ({node.op}) reads {v.name!r} before it is defined")
            defined.update(v.id for v in node.outputs)
        for name, v in self.outputs.items():
            if v.id not in defined:
                raise GraphError(f"output {name!r} refers to an undefined value {v.name!r}")

    def fingerprint(self) -> str:
        """A hash of structure, types, attributes and constant bytes: equal graphs have equal fingerprints."""
        h = hashlib.sha256()
        index = {v.id: f"i{i}" for i, v in enumerate(self.inputs)}
        for v in self.inputs:
            h.update(f"in {v.name} {v.type}\n".encode())
        for i, node in enumerate(self.nodes):
            index.update({v.id: f"n{i}.{j}" if j else f"n{i}" for j, v in enumerate(node.outputs)})
            args = {k: [index[x.id] for x in v] if isinstance(v, list) else index[v.id] for k, v in node.inputs.items()}
            arrays = {k: v for k, v in node.attrs.items() if isinstance(v, np.ndarray)}  # a const's val, a gamma
            attrs = {k: v for k, v in node.attrs.items() if k not in arrays}
            results = " ".join(f"{v.name} {v.type}" for v in node.outputs)
            h.update(f"{node.op} {results} {args} {sorted(attrs.items())}\n".encode())
            for key in sorted(arrays):
                h.update(f"{key} {arrays[key].dtype} {arrays[key].shape}\n".encode())
                h.update(np.ascontiguousarray(arrays[key]).tobytes())
        for name, v in self.outputs.items():
            h.update(f"out {name} {index.get(v.id)}\n".encode())
        return h.hexdigest()

    # -- copying -------------------------------------------------------------------------------------------------

    def copy(self) -> "Graph":
        """A structural copy with fresh values (constant arrays are shared: passes never mutate them in place)."""
        g = Graph(self.name)
        g._names = set(self._names)
        mapping: dict[int, Value] = {}
        for v in self.inputs:
            nv = Value(v.type, v.name)
            mapping[v.id] = nv
            g.inputs.append(nv)
        for node in self.nodes:
            inputs = {
                k: [mapping[x.id] for x in v] if isinstance(v, list) else mapping[v.id] for k, v in node.inputs.items()
            }
            values = [Value(v.type, v.name) for v in node.outputs]
            nn = Node(node.op, inputs, dict(node.attrs), values[0], values[1:])
            for old, nv in zip(node.outputs, values):
                nv.producer = nn
                mapping[old.id] = nv
            g.nodes.append(nn)
        g.outputs = {k: mapping[v.id] for k, v in self.outputs.items()}
        return g

    # -- printing ------------------------------------------------------------------------------------------------

    def __str__(self) -> str:
        params = ", ".join(f"%{v.name}: {v.type.short()}" for v in self.inputs)
        lines = [f"graph {self.name}({params}):"]
        for node in self.nodes:
            if node.is_const:
                val = node.attrs["val"]
                shown = f"{val.item()!r}" if val.size == 1 else f"<{val.size} values>"
                lines.append(f"  %{node.name} = const({shown}) : {node.output.type.short()}")
                continue
            args = ", ".join(
                f"{k}=({', '.join('%' + x.name for x in v)})" if isinstance(v, list) else f"{k}=%{v.name}"
                for k, v in node.inputs.items()
            )
            attrs = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in node.attrs.items() if v is not None)
            results = ", ".join(f"%{v.name}" for v in node.outputs)
            lines.append(f"  {results} = {node.op}({args}){' {' + attrs + '}' if attrs else ''} : "
                         f"{', '.join(v.type.short() for v in node.outputs)}")
        outs = ", ".join(f"{k}=%{v.name}" for k, v in self.outputs.items())
        lines.append(f"  return ({outs})")
        return "\n".join(lines)

    __repr__ = __str__

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts


def _fmt_attr(v) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ",".join(str(x) for x in np.asarray(v).reshape(-1).tolist()) + "]"
    return repr(v)


def topological_nodes(outputs: Iterable[Value]) -> list[Node]:
    """Nodes needed to compute ``outputs``, in dependency order."""
    order: list[Node] = []
    placed: set[int] = set()  # nodes, by id: two results of one node place it once
    seen: set[int] = set()
    stack: list[tuple[Value, bool]] = [(v, False) for v in outputs]
    while stack:
        v, done = stack.pop()
        if v.producer is None or v.id in seen and not done:
            continue
        if done:
            if id(v.producer) not in placed:
                placed.add(id(v.producer))
                order.append(v.producer)
            continue
        seen.add(v.id)
        stack.append((v, True))
        stack.extend((x, False) for x in v.producer.input_values() if x.id not in seen)
    return order
