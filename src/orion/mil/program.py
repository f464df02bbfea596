"""A MIL program as data: what the parser produces, the emitter builds, and the printer writes.

The two dialects the ANE compiler accepts differ only in how they spell things:

* ``program(1.3)`` / ``ios18`` (M3 and later): scalars are ``fp16(0.5)``, ``string("x")``, ``uint64(64)``;
* ``program(1.0)`` / ``ios16`` (M1/M2): every scalar is a rank-0 tensor, ``tensor<string, []>("x")``.

A :class:`Program` holds no dialect-specific spelling, so one program prints in either dialect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from orion.ir.types import NUMPY_DTYPES, TensorType  # noqa: F401 - re-exported for MIL users

#: Where BLOBFILE paths are rooted: the model's directory.
MODEL_PATH = "@model_path/"
#: Types that have no numpy array form.
STRING = "string"
#: ``"1.3"`` spells scalars as ``fp16(1)``; ``"1.0"`` spells them as ``tensor<fp16, []>(1)``.
DIALECTS = {"1.3": "ios18", "1.0": "ios16"}


@dataclass(frozen=True)
class VarRef:
    """A reference to a variable (a function input or a statement's result)."""

    name: str


@dataclass(frozen=True)
class BlobRef:
    """``BLOBFILE(path=..., offset=...)``: a tensor stored in a weight file.

    ``offset`` names the blob's 64-byte metadata record, not its data (catalog entry 8).
    """

    path: str
    offset: int


@dataclass(frozen=True, eq=False)
class Literal:
    """A typed constant written in the text: ``fp16(0.5)``, ``tensor<int32, [4]>([0,1,3,2])``, a string, or a blob.

    ``value`` is a numpy array of ``type.shape`` for numeric types, a ``str`` for strings, a :class:`BlobRef` for
    weights kept in a file.
    """

    type: TensorType
    value: Union[np.ndarray, str, BlobRef]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Literal) or other.type != self.type:
            return False
        if isinstance(self.value, np.ndarray) and isinstance(other.value, np.ndarray):
            return (self.value.dtype, self.value.shape, self.value.tobytes()) == (
                other.value.dtype, other.value.shape, other.value.tobytes())
        return self.value == other.value

    def __hash__(self) -> int:
        return hash(self.type)


#: What an operation argument can be: a variable, an inline literal, or a tuple of variables (``values=(a, b)``).
Argument = Union[VarRef, Literal, tuple]


@dataclass
class Statement:
    """``<type> <var> = <op>(<args>)[<attrs>];``

    ``args`` are the parameters inside ``(...)``; ``attrs`` those inside ``[...]`` (``name``, and ``val`` for a
    const). ``line`` is the 1-based source line, 0 for statements built in Python. An op with several results
    (``split``) names the first in ``type``/``var`` and the rest, in order, in ``more_outputs``:
    ``<type> <var>, <type> <var2> = split(...)``. An op without results (``write_state``) has ``var`` "" and
    ``type`` None: ``write_state(input=k, data=v);``.
    """

    type: TensorType | None
    var: str
    op: str
    args: dict[str, Argument] = field(default_factory=dict)
    attrs: dict[str, Literal] = field(default_factory=dict)
    line: int = field(default=0, compare=False)
    more_outputs: tuple[tuple[str, TensorType], ...] = ()

    @property
    def outputs(self) -> tuple[tuple[str, TensorType], ...]:
        """Every result of the statement as ``(var, type)``, in order (none for ``write_state``)."""
        return ((self.var, self.type), *self.more_outputs) if self.var else ()

    @property
    def name(self) -> str:
        """The ``name=`` attribute, which may differ from the variable name."""
        name = self.attrs.get("name")
        return name.value if name is not None and isinstance(name.value, str) else self.var

    @property
    def const_value(self) -> Union[np.ndarray, str, BlobRef, None]:
        """The value of a ``const`` statement, ``None`` for other ops."""
        return self.attrs["val"].value if self.op == "const" and "val" in self.attrs else None


@dataclass
class Program:
    """One MIL function (``main``, or another of a multifunction text) with its header."""

    inputs: list[tuple[str, TensorType]]
    statements: list[Statement]
    outputs: list[str]
    version: str = "1.3"
    opset: str = "ios18"
    function: str = "main"
    build_info: dict[str, str] = field(default_factory=dict)
    #: Every function of the text this one was read from, in order (empty for a program built in Python): a text
    #: with several (``main`` plus ``prefill``, ``decode`` ...) is one model whose functions share its weight files.
    functions: tuple[str, ...] = ()
    #: The inputs declared ``state<tensor<...>>``: buffers the program reads (read_state) and writes (write_state),
    #: kept between calls by whoever runs it; not bound as inputs.
    states: tuple[str, ...] = ()

    def statement(self, var: str) -> Statement:
        """The statement defining ``var`` (any of its results)."""
        for st in self.statements:
            if st.var == var or any(name == var for name, _ in st.more_outputs):
                return st
        raise KeyError(var)

    def var_types(self) -> dict[str, TensorType]:
        types = dict(self.inputs)
        for st in self.statements:
            types.update(st.outputs)
        return types

    def output_types(self) -> list[tuple[str, TensorType]]:
        types = self.var_types()
        return [(name, types[name]) for name in self.outputs]

    def blob_refs(self) -> list[tuple[Statement, BlobRef]]:
        return [(st, st.const_value) for st in self.statements if isinstance(st.const_value, BlobRef)]

    def to_text(self, version: str | None = None) -> str:
        """Print the program in its own dialect, or in ``version`` ("1.3" or "1.0")."""
        return print_program(self, version or self.version)


# ---------------------------------------------------------------------------------------------------------------------
# Printing


DEFAULT_BUILD_INFO = {
    "coremlc-component-MIL": "3510.2.1",
    "coremlc-version": "3505.4.1",
    "coremltools-component-milinternal": "",
    "coremltools-version": "9.0",
}


def _format_number(dtype: str, x) -> str:
    if dtype == "bool":
        return "true" if bool(x) else "false"
    if dtype in ("fp16", "fp32"):
        x = float(x)
        if np.isnan(x):
            raise ValueError(f"MIL text cannot spell the {dtype} value {x}")
        if np.isinf(x):
            return "inf" if x > 0 else "-inf"  # the spelling compiled model.mil files use
        if x == 0 and np.signbit(x):
            return "-0.0"  # str(int(-0.0)) would drop the sign bit
        if x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return repr(float(np.float32(x))) if dtype == "fp32" else repr(float(x))
    return str(int(x))


def _scalar_type(dtype: str, verbose: bool) -> str:
    return f"tensor<{dtype}, []>" if verbose else dtype


def format_literal(lit: Literal, verbose: bool) -> str:
    t = lit.type
    if isinstance(lit.value, BlobRef):
        path = format_literal(Literal(TensorType(STRING), lit.value.path), verbose)
        offset = f"{_scalar_type('uint64', verbose)}({lit.value.offset})"
        return f"{t}(BLOBFILE(path={path}, offset={offset}))"
    if t.dtype == STRING:
        text = lit.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{_scalar_type(STRING, verbose)}("{text}")'
    if t.is_scalar:
        return f"{_scalar_type(t.dtype, verbose)}({_format_number(t.dtype, np.asarray(lit.value).item())})"
    flat = np.asarray(lit.value).reshape(-1)
    return f"{t}([{', '.join(_format_number(t.dtype, v) for v in flat)}])"


def format_argument(arg: Argument, verbose: bool) -> str:
    if isinstance(arg, VarRef):
        return arg.name
    if isinstance(arg, tuple):
        return "(" + ", ".join(format_argument(a, verbose) for a in arg) + ")"
    return format_literal(arg, verbose)


def format_type(t: TensorType, verbose: bool) -> str:
    return _scalar_type(t.dtype, verbose) if t.is_scalar else str(t)


def print_program(program: Program, version: str = "1.3") -> str:
    return print_functions([program], version)


def print_functions(programs: list[Program], version: str = "1.3") -> str:
    """The MIL text of one program holding ``programs`` as its functions (the header is the first one's), as a
    multifunction model writes them: each function its own scope, all sharing the model folder's weight files."""
    if version not in DIALECTS:
        raise ValueError(f"unknown MIL program version {version!r}; expected one of {sorted(DIALECTS)}")
    verbose = version == "1.0"
    info = programs[0].build_info or DEFAULT_BUILD_INFO
    key = _scalar_type(STRING, verbose)
    entries = ", ".join(f'{{"{k}", "{v}"}}' for k, v in info.items())
    lines = [f"program({version})", f"[buildInfo = dict<{key}, {key}>({{{entries}}})]", "{"]
    for program in programs:
        lines += _print_function(program, version, verbose)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _print_function(program: Program, version: str, verbose: bool) -> list[str]:
    opset = program.opset if version == program.version else DIALECTS[version]
    params = ", ".join(f"{'state<' + format_type(t, verbose) + '>' if name in program.states else format_type(t, verbose)}"
                       f" {name}" for name, t in program.inputs)
    lines = [f"    func {program.function}<{opset}>({params}) {{"]
    for st in program.statements:
        args = ", ".join(f"{k}={format_argument(v, verbose)}" for k, v in st.args.items())
        attrs = ", ".join(f"{k}={format_literal(v, verbose)}" for k, v in st.attrs.items())
        results = ", ".join(f"{format_type(t, verbose)} {var}" for var, t in st.outputs)
        lines.append(f"        {results + ' = ' if results else ''}{st.op}({args})[{attrs}];")
    lines.append(f"    }} -> ({', '.join(program.outputs)});")
    return lines
