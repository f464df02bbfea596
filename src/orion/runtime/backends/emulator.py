"""The ANE emulator: runs MIL text, and nothing but MIL text, with numpy under ANE numerics.

A program is parsed, checked statement by statement against the op declarations (unknown ops, parameters, and
declared types that disagree with the shape rules are errors with a line number), its BLOBFILE weights are read,
and each run evaluates the statements in order: every value is held as fp16, every op computes in float32 and is
rounded to fp16 by the rules of :mod:`orion.runtime.backends.numerics` (wide accumulator for conv/matmul, the
2^15 ceiling, no NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from orion.errors import BindingError, MILProgramError, OrionError, WeightFileError
from orion.ir.ops import OPS, Kernels, OpDef, input_names
from orion.ir.types import TensorType
from orion.mil.blob import BlobReader
from orion.mil.parse import parse_program, resolve_blob_path
from orion.mil.program import BlobRef, Literal, Program, Statement, VarRef
from orion.runtime.backends import numerics as ane
from orion.runtime.backends.numerics import Numerics

F16 = np.float16


class AneKernels(Kernels):
    """Conv/matmul and reduce_sum with the hardware's accumulator, as the numerics settings model it."""

    def __init__(self, settings: Numerics):
        self.settings = settings

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ane.matmul(a.astype(F16), b.astype(F16), self.settings)

    def reduce_sum(self, x: np.ndarray, axes: tuple[int, ...], keep_dims: bool) -> np.ndarray:
        return ane.reduce_sum(x.astype(F16), axes, keep_dims, self.settings)


@dataclass
class _Step:
    """One executable statement: read ``inputs`` from the environment, compute, store ``var``."""

    var: str
    op: OpDef
    inputs: list[str | tuple[str, ...]]
    attrs: dict
    statement: Statement


def _attr_value(value) -> object:
    """A const's numpy value as the op's attribute (lists for tensors, Python scalars for scalars)."""
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class EmulatedProgram:
    """A MIL program ready to run. Build one with :func:`load_program` or :func:`load_text`."""

    def __init__(self, program: Program, blob_loader: Callable[[BlobRef, TensorType, Statement], np.ndarray],
                 settings: Numerics | None = None):
        self.program = program
        self.settings = settings or Numerics()
        self.kernels = AneKernels(self.settings)
        self.inputs: list[tuple[str, TensorType]] = list(program.inputs)
        self.outputs: list[tuple[str, TensorType]] = program.output_types()
        self._consts: dict[str, object] = {}
        self._steps: list[_Step] = []
        self._prepare(blob_loader)

    # -- preparation: everything that does not depend on inputs is checked and done once ---------------------------

    def _prepare(self, blob_loader) -> None:
        types: dict[str, TensorType] = dict(self.program.inputs)
        for st in self.program.statements:
            if st.op == "const":
                self._consts[st.var] = self._const_value(st, blob_loader)
                types[st.var] = st.type
                continue
            op = OPS.get(st.op)
            if op is None:
                raise MILProgramError(f"line {st.line}: unknown op {st.op!r} (statement {st.var!r}); "
                                      f"the emulator runs: {', '.join(sorted(k for k in OPS if k != 'const'))}")
            tensor_params = set(input_names(op, list(st.args)))
            unknown = set(st.args) - tensor_params - set(op.attrs)
            if unknown:
                raise MILProgramError(f"line {st.line}: {st.op} has no parameter(s) {sorted(unknown)}; "
                                      f"it takes {sorted(set(input_names(op, list(op.inputs))) | set(op.attrs))}")
            missing = [p for p in input_names(op) if p not in st.args]
            if missing:
                raise MILProgramError(f"line {st.line}: {st.op} {st.var!r} is missing input(s) {missing}")
            attrs = {k: self._attr(st, k, v) for k, v in st.args.items() if k not in tensor_params}
            try:
                attrs = op.resolve_attrs(attrs)
                arg_types: list[TensorType] = []
                inputs: list[str | tuple[str, ...]] = []
                for name in input_names(op, list(st.args)):
                    arg = st.args[name]
                    refs = arg if isinstance(arg, tuple) else (arg,)
                    for ref in refs:
                        if not isinstance(ref, VarRef):
                            raise MILProgramError(f"line {st.line}: {st.op} input {name!r} must be a variable")
                        arg_types.append(types[ref.name])
                    inputs.append(tuple(r.name for r in refs) if isinstance(arg, tuple) else refs[0].name)
                inferred = op.infer(arg_types, attrs)
            except OrionError as exc:
                if isinstance(exc, MILProgramError):
                    raise
                raise MILProgramError(f"line {st.line}: {st.op} {st.var!r}: {exc}") from None
            if inferred.shape != st.type.shape:
                raise MILProgramError(f"line {st.line}: {st.var!r} is declared {st.type} but {st.op} gives shape "
                                      f"{list(inferred.shape)}")
            types[st.var] = st.type
            self._steps.append(_Step(st.var, op, inputs, attrs, st))

    def _attr(self, st: Statement, key: str, arg) -> object:
        if isinstance(arg, Literal):
            return _attr_value(arg.value)
        if isinstance(arg, VarRef) and arg.name in self._consts:
            return _attr_value(self._consts[arg.name])
        raise MILProgramError(f"line {st.line}: parameter {key!r} of {st.op} {st.var!r} must be a const")

    def _const_value(self, st: Statement, blob_loader) -> object:
        value = st.const_value
        if isinstance(value, BlobRef):
            return ane.boundary_input(blob_loader(value, st.type, st), st.type.dtype) \
                if st.type.dtype in ("fp16", "fp32") else blob_loader(value, st.type, st)
        if isinstance(value, np.ndarray) and st.type.dtype in ("fp16", "fp32"):
            return ane.boundary_input(value, st.type.dtype)
        if value is None:
            raise MILProgramError(f"line {st.line}: const {st.var!r} has no val")
        return value

    # -- running --------------------------------------------------------------------------------------------------

    def bind(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names and shapes, convert any float dtype to the fp16 the ANE would hold."""
        expected = dict(self.inputs)
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            parts = ([f"missing input(s) {missing}"] if missing else []) + ([f"unexpected input(s) {extra}"] if extra else [])
            raise BindingError(f"{'; '.join(parts)}; the program takes {sorted(expected)}")
        env: dict[str, np.ndarray] = {}
        for name, t in self.inputs:
            array = np.asarray(inputs[name])
            if array.dtype.kind != "f":
                raise BindingError(f"input {name!r} has dtype {array.dtype}; give a float array")
            if tuple(array.shape) != t.shape:
                raise BindingError(f"input {name!r} has shape {list(array.shape)}; the program declares {list(t.shape)}")
            env[name] = ane.boundary_input(array, t.dtype)
        return env

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, object] = dict(self._consts)
        env.update(self.bind(inputs))
        with np.errstate(all="ignore"):
            for step in self._steps:
                env[step.var] = self._execute(step, env)
        return {
            name: np.asarray(env[name]).astype(t.numpy_dtype if t.dtype in ("fp16", "fp32") else F16)
            for name, t in self.outputs
        }

    def _execute(self, step: _Step, env: dict) -> np.ndarray:
        args = [[env[n] for n in i] if isinstance(i, tuple) else env[i] for i in step.inputs]
        if step.op.variadic:
            arrays = [np.asarray(a, dtype=np.float32) for a in args[0]]
        else:
            arrays = [np.asarray(a, dtype=np.float32) for a in args]
        kind = step.op.kind
        if kind == "layout":
            result = step.op.compute(self.kernels, arrays, step.attrs)
            if step.op.name.startswith("slice") and self.settings.slice_offset_overflow:
                begin = step.attrs["begin"]
                result = ane.slice_overflow(result.astype(F16), bool(begin[-1]), self.settings)
            return np.asarray(result).astype(F16)
        result = step.op.compute(self.kernels, arrays, step.attrs)
        ties = self.settings.reduction_ties if kind in ("reduction", "wide") else self.settings.elementwise_ties
        out = ane.round_fp16(np.asarray(result, dtype=np.float32), ties) if result.dtype != F16 else result
        out = ane.ane_fix(out)
        if kind == "activation" and self.settings.activation_quirks:
            out = ane.activation_quirks(step.op.name, arrays[0].astype(F16), out, self.settings)
        return out


def directory_blob_loader(model_dir: Path) -> Callable[[BlobRef, TensorType, Statement], np.ndarray]:
    """Read BLOBFILE constants from files under ``model_dir`` (paths may not leave it)."""
    readers: dict[Path, BlobReader] = {}

    def load(ref: BlobRef, t: TensorType, st: Statement) -> np.ndarray:
        path = resolve_blob_path(model_dir, ref.path)
        if path not in readers:
            if not path.is_file():
                raise WeightFileError(f"line {st.line}: weight file {ref.path!r} of {st.var!r} not found at {path}")
            readers[path] = BlobReader(path)
        return readers[path].read(ref.offset, dtype=t.numpy_dtype, shape=t.shape)

    return load


def load_text(text: str, model_dir: str | Path, settings: Numerics | None = None,
              source: str = "<mil>") -> EmulatedProgram:
    return EmulatedProgram(parse_program(text, source), directory_blob_loader(Path(model_dir)), settings)


def load_program(model_dir: str | Path, settings: Numerics | None = None) -> EmulatedProgram:
    """Load ``model_dir/model.mil`` with its weights resolved under ``model_dir``."""
    model_dir = Path(model_dir)
    mil = model_dir / "model.mil" if model_dir.is_dir() else model_dir
    if not mil.is_file():
        raise MILProgramError(f"no MIL program at {mil}")
    try:
        text = mil.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MILProgramError(f"{mil} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return load_text(text, mil.parent, settings, source=str(mil))
