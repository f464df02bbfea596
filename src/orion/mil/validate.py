"""Whether a MIL program follows MIL's op definitions, decided from its text alone.

``orion check`` reports every problem found here (catalog ANE-38) and the emulator refuses a program at load with
the first one, both through :func:`validate_program`: so ``check`` never passes a program the emulator refuses for
its text. The rules: inputs and outputs are numeric tensors; a const has a ``val`` of its declared type; an op is
known (:mod:`orion.ir.ops`), takes only its own parameters and gets all its inputs, variables for tensor inputs and
constants written in the text for the others; its operands satisfy its shape rule, and the declared type is the
result's; a cast in an ``ios16`` program only to the types that opset casts to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from orion.errors import GraphError, MILProgramError, UnsafePathError, WeightFileError
from orion.ir.ops import CONST_INPUTS, OPS, OPSET_OF, OpDef, input_names
from orion.ir.types import CAST_DTYPES_IOS16
from orion.mil.blob import BlobReader, stored_dtype
from orion.mil.parse import resolve_blob_path
from orion.mil.program import NUMPY_DTYPES, BlobRef, Literal, Program, Statement, TensorType, VarRef

__all__ = ["Problem", "ResolvedStatement", "Validation", "check_weight_files", "directory_blob_loader",
           "validate_program"]


@dataclass(frozen=True)
class Problem:
    """One broken rule: ``where`` is ``line N (op 'var')`` for a statement, ``input 'x'`` or ``output 'y'``."""

    where: str
    message: str
    #: The op of the statement at fault ("" for inputs and outputs).
    op: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class ResolvedStatement:
    """An op statement as the op declaration reads it: its tensor inputs by name (a tuple for the variadic one),
    their types, and its attributes with defaults filled."""

    statement: Statement
    op: OpDef
    inputs: list[str | tuple[str, ...]]
    arg_types: list[TensorType]
    attrs: dict
    #: Tensor inputs written inline (``pow(x=a, y=fp16(-0.5))``), by the name ``inputs`` gives them:
    #: ``<var>.<parameter>``, which no MIL variable can spell.
    literals: dict[str, Literal] = field(default_factory=dict)
    #: Tensor attributes stored in weight files (a norm's ``gamma``, ``linear``'s ``weight``), by the const that
    #: holds each: ``attrs`` has a stand-in of the right shape, the values are the loader's.
    blob_attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Validation:
    problems: list[Problem] = field(default_factory=list)
    #: Every op statement that follows its definition, in program order.
    resolved: list[ResolvedStatement] = field(default_factory=list)

    def raise_first(self) -> None:
        """Refuse the program with its first problem, one line."""
        if self.problems:
            more = len(self.problems) - 1
            raise MILProgramError(str(self.problems[0]) + (f" (and {more} more: orion check lists them)"
                                                           if more else ""))


class _Refusal(Exception):
    pass


def _where(st: Statement) -> str:
    return f"line {st.line} ({st.op} '{st.var or st.name}')" if st.line else f"{st.op} '{st.var or st.name}'"


def _attr_value(value) -> object:
    """A literal's value as an op attribute (lists for tensors, Python scalars for scalars, str for strings)."""
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def validate_program(program: Program) -> Validation:
    """Every problem of ``program`` by MIL's definitions, and the op statements resolved."""
    found = Validation()
    types = program.var_types()
    outputs = [(name, types[name]) for name in program.outputs if name in types]  # others: the parser's, ANE-14
    for kind, items in (("input", program.inputs), ("output", outputs)):
        for name, t in items:
            if t.dtype not in NUMPY_DTYPES:
                found.problems.append(Problem(f"{kind} '{name}'", f"{kind} of type {t}: inputs and outputs are "
                                              f"numeric tensors ({', '.join(NUMPY_DTYPES)})"))
    for name in program.outputs:
        if name in program.states:
            found.problems.append(Problem(f"output '{name}'", f"output {name!r} is a state; return a read_state "
                                          "of it"))
    consts = {st.var: st for st in program.statements if st.op == "const"}
    for st in program.statements:
        try:
            if st.op == "const":
                _check_const(st)
            else:
                found.resolved.append(_resolve(st, types, consts, program.opset, program.states))
        except _Refusal as exc:
            found.problems.append(Problem(_where(st), str(exc), st.op))
    return found


def _check_const(st: Statement) -> None:
    val = st.attrs.get("val")
    if val is None:
        raise _Refusal(f"const {st.var!r} has no val")
    if val.type != st.type:
        raise _Refusal(f"{st.var!r} is declared {st.type} but its val is {val.type}")


def _resolve(st: Statement, types: dict[str, TensorType], consts: dict[str, Statement], opset: str,
             states: tuple[str, ...] = ()) -> ResolvedStatement:
    op = OPS.get(st.op)
    if op is None or op.kind == "const":
        raise _Refusal(f"unknown op {st.op!r}; known: {', '.join(sorted(k for k in OPS if k != 'const'))}")
    if st.more_outputs and not op.several_results:
        raise _Refusal(f"{st.op} gives one result, the statement declares {len(st.outputs)} "
                       f"({', '.join(var for var, _ in st.outputs)})")
    tensor_params = set(input_names(op, list(st.args)))
    unknown = set(st.args) - tensor_params - set(op.attrs)
    if unknown:
        raise _Refusal(f"{st.op} has no parameter(s) {sorted(unknown)}; "
                       f"it takes {sorted(set(input_names(op, list(op.inputs))) | set(op.attrs))}")
    missing = [p for p in input_names(op) if p not in st.args]
    if missing:
        raise _Refusal(f"{st.op} {st.var!r} is missing input(s) {missing}")
    inputs: list[str | tuple[str, ...]] = []
    arg_types: list[TensorType] = []
    literals: dict[str, Literal] = {}
    for name in input_names(op, list(st.args)):
        arg = st.args[name]
        if isinstance(arg, Literal) and name != op.variadic:
            if arg.type.dtype not in NUMPY_DTYPES:
                raise _Refusal(f"{st.op} input {name!r} is a {arg.type.dtype} literal, not a tensor")
            inputs.append(f"{st.var}.{name}")
            arg_types.append(arg.type)
            literals[inputs[-1]] = arg
            continue
        if (name == op.variadic) != isinstance(arg, tuple):
            raise _Refusal(f"{st.op} input {name!r} must be " + ("a tuple of variables (a, b)" if name == op.variadic
                                                                    else "one variable, not a tuple"))
        refs = arg if isinstance(arg, tuple) else (arg,)
        if not all(isinstance(ref, VarRef) for ref in refs):
            raise _Refusal(f"{st.op} input {name!r} must be a tuple of variables, not of literals")
        undefined = [ref.name for ref in refs if ref.name not in types]
        if undefined:
            raise _Refusal(f"{st.op} input {name!r} reads {undefined[0]!r}, which nothing defines")
        _check_state_use(st, op, name, refs, states)
        arg_types += [types[ref.name] for ref in refs]
        inputs.append(tuple(ref.name for ref in refs) if isinstance(arg, tuple) else refs[0].name)
    attrs, blob_attrs = {}, {}
    for key, arg in st.args.items():
        if key in tensor_params:
            continue
        const = consts.get(arg.name) if isinstance(arg, VarRef) else None
        val = const.attrs.get("val") if const is not None else None
        if key in op.attrs and op.attrs[key].kind == "tensor" and isinstance(val, Literal) \
                and isinstance(val.value, BlobRef):
            blob_attrs[key] = arg.name  # its shape is enough to check the statement; its values come at load
            attrs[key] = np.broadcast_to(np.zeros((), NUMPY_DTYPES[val.type.dtype]), val.type.shape)
        else:
            attrs[key] = _const_attr(st, key, arg, consts)
    try:
        attrs = op.resolve_attrs(attrs)
        inferred = op.infer(arg_types, attrs)
    except GraphError as exc:  # its message names the op
        raise _Refusal(str(exc)) from None
    except (ValueError, TypeError, IndexError) as exc:  # a malformed attribute value, such as a string axis
        raise _Refusal(f"{st.op}: a parameter has a value of the wrong kind ({exc})") from None
    results = inferred if op.several_results else (inferred,)
    if len(results) != len(st.outputs):
        raise _Refusal(f"{st.op} of these operands gives {len(results)} results, the statement declares "
                       f"{len(st.outputs)} ({', '.join(var for var, _ in st.outputs)})")
    for (var, declared), result in zip(st.outputs, results):
        if result.shape != declared.shape or result.dtype != declared.dtype:
            raise _Refusal(f"{var!r} is declared {declared} but {st.op} of these operands gives {result}")
    fixed = input_names(op, list(st.args)) if op.kind == "constexpr" else CONST_INPUTS.get(op.name, ())
    loose = [ref for param, ref in zip(input_names(op, list(st.args)), inputs)
             if param in fixed and isinstance(ref, str) and ref not in consts and ref not in literals]
    if loose:
        raise _Refusal(f"{st.op} takes constants there: input {loose[0]!r} is not a const")
    if opset == "ios16" and OPSET_OF.get(op.name, "ios16") != "ios16":
        raise _Refusal(f"{op.name} needs the {OPSET_OF[op.name]} opset or later; this program is {opset}")
    if op.name == "cast" and opset == "ios16" and attrs["dtype"] not in CAST_DTYPES_IOS16:
        raise _Refusal(f"cast to {attrs['dtype']} needs the ios17 opset or later; {opset} casts to "
                       f"{', '.join(CAST_DTYPES_IOS16)}")
    return ResolvedStatement(st, op, inputs, arg_types, attrs, literals, blob_attrs)


def _check_state_use(st: Statement, op: OpDef, name: str, refs, states: tuple[str, ...]) -> None:
    """A state is read and written only through the state ops' first input, which takes nothing else."""
    takes_state = op.kind == "state" and name == op.inputs[0]
    for ref in refs:
        if takes_state and ref.name not in states:
            raise _Refusal(f"{st.op} input {name!r} must be a state (a function input declared state<tensor<...>>), "
                           f"not {ref.name!r}")
        if not takes_state and ref.name in states:
            raise _Refusal(f"{st.op} reads the state {ref.name!r} directly; read it with read_state(input={ref.name})")


def _const_attr(st: Statement, key: str, arg, consts: dict[str, Statement]) -> object:
    if isinstance(arg, VarRef) and arg.name in consts:
        arg = consts[arg.name].attrs.get("val")
    if isinstance(arg, Literal) and not isinstance(arg.value, BlobRef):
        return _attr_value(arg.value)
    raise _Refusal(f"parameter {key!r} of {st.op} {st.var!r} must be a const written in the text")


def directory_blob_loader(model_dir: Path, data: bool = True) -> Callable[[BlobRef, TensorType, Statement],
                                                                         np.ndarray]:
    """Read BLOBFILE constants from files under ``model_dir`` (paths may not leave it); ``data=False`` checks each
    record and gives zeros."""
    readers: dict[Path, BlobReader] = {}

    def load(ref: BlobRef, t: TensorType, st: Statement) -> np.ndarray:
        path = resolve_blob_path(model_dir, ref.path)
        if path not in readers:
            if not path.is_file():
                raise WeightFileError(f"line {st.line}: weight file {ref.path!r} of {st.var!r} not found at {path}")
            readers[path] = BlobReader(path)
        return readers[path].read(ref.offset, dtype=stored_dtype(t), shape=t.shape, data=data)

    return load


def check_weight_files(program: Program, model_dir: Path) -> list[Problem]:
    """Every BLOBFILE constant whose record the emulator's loader (this module's) refuses under ``model_dir``."""
    load = directory_blob_loader(Path(model_dir), data=False)
    problems = []
    for st, ref in program.blob_refs():
        if st.type.dtype not in NUMPY_DTYPES:
            continue  # validate_program refuses the const's type
        try:
            load(ref, st.type, st)
        except (WeightFileError, UnsafePathError) as exc:
            problems.append(Problem(_where(st), str(exc), st.op))
    return problems
