"""The ANE emulator: runs MIL text, and nothing but MIL text, with numpy under ANE numerics.

A program is parsed, checked statement by statement against the op declarations (unknown ops, parameters, and
declared types that disagree with the shape rules are errors with a line number), its BLOBFILE weights are read,
and each run evaluates the statements in order: every value is held as fp16, every op computes in float32 and is
rounded to fp16 by the rules of :mod:`orion.runtime.backends.numerics` (wide accumulator for conv/matmul, the
2^15 ceiling, no NaN).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from orion.errors import BackendError, BindingError, EvaluationError
from orion.ir.ops import Kernels, OpDef, last_axis_slice_offset
from orion.ir.types import FLOAT_DTYPES, TensorType
from orion.mil.parse import parse_functions, parse_program, read_mil_file, resolve_blob_path
from orion.mil.validate import directory_blob_loader, validate_program
from orion.mil.program import BlobRef, Literal, Program, Statement
from orion.mil.program import MODEL_PATH
from orion.runtime.backends import numerics
from orion.runtime.backends.base import (
    DIRECTORY_CLAIMS,
    Backend,
    BackendModel,
    evaluation_failure_message,
    model_identifier,
)
from orion.runtime.backends.numerics import Numerics
from orion.runtime.tensor import Surface, check_input_names

F16 = np.float16
#: The ANE's log(0): its activation table ends at a finite value (reference N6).
LOG_OF_ZERO = np.float16(-45440.0)


class AneKernels(Kernels):
    """Conv/matmul and reduce_sum with the hardware's accumulator, as the numerics settings model it.

    Operands arrive as float32 arrays holding fp16 values. With the ``fp32`` accumulator they go straight to BLAS
    (subnormals flushed first, except for operands in :attr:`flushed`, constants flushed once at load) and the
    sums are rounded in place on their float32 bits. Every result is final (rounded by the wide rules and
    NaN-free, held as float32); :meth:`finished` tells the emulator so that it does not round it again.
    """

    def __init__(self, settings: Numerics):
        self.settings = settings
        self.flushed: set[int] = set()
        self._last: np.ndarray | None = None

    def round_integer(self, x: np.ndarray) -> np.ndarray:
        if self.settings.round_ties == "half-away":
            return np.copysign(np.floor(np.abs(x) + 0.5), x)
        return np.round(x)

    def finished(self, result: np.ndarray) -> bool:
        """Whether ``result`` is the last kernel output, or a reshaped view of it (a conv's), and so final."""
        last, self._last = self._last, None
        return last is not None and (result is last or result.base is last)

    def _final(self, out: np.ndarray) -> np.ndarray:
        self._last = out
        return out

    def _operand(self, x: np.ndarray) -> np.ndarray:
        if not self.settings.flush_subnormals_in_matmul:
            return x
        view = x
        while view is not None:  # a reshaped view of a flushed constant is flushed too
            if id(view) in self.flushed:
                return x
            view = view.base
        return numerics.flush_subnormals(x)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        s = self.settings
        if s.accumulator != "fp32":  # exact sums in float64: rounded from there by the fp16 reference path
            return self._final(numerics.matmul(a.astype(F16), b.astype(F16), s).astype(np.float32))
        wide = np.matmul(self._operand(a), self._operand(b))
        return self._final(numerics.round_f32(wide, s.reduction_ties, ceiling=s.matmul_ceiling,
                                              flush_subnormals=s.flush_subnormals_in_matmul, out=wide))

    def reduce_sum(self, x: np.ndarray, axes: tuple[int, ...], keep_dims: bool) -> np.ndarray:
        return self._final(numerics.reduce_sum_held(x, axes, keep_dims, self.settings))


#: Tensor constants as the emulator holds them, by what they are made of: the programs of one model that carry the
#: same weights (its prefill and decode programs) hold one copy. Constants are never modified once held.
_HELD_CONSTANTS: "weakref.WeakValueDictionary[tuple, np.ndarray]" = weakref.WeakValueDictionary()


def _shared(key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
    """The held constant ``key`` names, made by ``make`` unless a loaded program holds it already."""
    held = _HELD_CONSTANTS.get(key)
    if held is None:
        held = _HELD_CONSTANTS[key] = make()
        held.flags.writeable = False  # shared: a write would change other programs' weights
    return held


@dataclass
class _Step:
    """One executable statement: read ``inputs`` from the environment, compute, store ``var``."""

    var: str
    op: OpDef
    inputs: list[str | tuple[str, ...]]
    attrs: dict
    statement: Statement
    #: A slice that starts inside its last axis: on M1/M2 it sends |x| > 4094 to inf (N11).
    offset_slice: bool = False
    #: Every result's variable (``var`` first): several for ``split`` and ``topk``.
    results: tuple[str, ...] = ()


class EmulatedProgram:
    """A MIL program ready to run. Build one with :func:`load_program` or :func:`load_text`."""

    def __init__(self, program: Program, blob_loader: Callable[[BlobRef, TensorType, Statement], np.ndarray],
                 settings: Numerics | None = None, check_only: bool = False):
        """``check_only``: check every statement and weight record, but hold no weights (it cannot run)."""
        self.program = program
        self.check_only = check_only
        self.settings = settings or Numerics()
        self.kernels = AneKernels(self.settings)
        self.inputs: list[tuple[str, TensorType]] = [(n, t) for n, t in program.inputs if n not in program.states]
        self._input_types = dict(self.inputs)
        self._state_types = {n: t for n, t in program.inputs if n in program.states}
        self._state: dict[str, np.ndarray] = {}
        self.reset_state()
        self.outputs: list[tuple[str, TensorType]] = program.output_types()
        self._consts: dict[str, object] = {}
        self._const_keys: dict[str, tuple] = {}  # what a tensor constant is made of, to share it (see _shared)
        self._steps: list[_Step] = []
        self._prepare(blob_loader)
        self._wide_consts = {} if check_only else self._flush_wide_constants()
        self._last_uses = self._plan_releases()
        self._kept: dict[str, tuple[tuple, np.ndarray]] = {}  # see hold_kept
        self._matmul_only_inputs = self._read_only_by_matmul() if self.settings.flush_subnormals_in_matmul else set()

    def _plan_releases(self) -> list[tuple[str, ...]]:
        """For each step, the values no later step reads (nor an output): a run drops them right away, so that
        numpy reuses their memory, still in cache, for the next results instead of touching fresh pages."""
        keep = set(self._consts) | {name for name, _ in self.outputs}
        last: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for ref in step.inputs:
                for name in ref if isinstance(ref, tuple) else (ref,):
                    last[name] = i
            for var in step.results:
                last.setdefault(var, i)  # a value nothing reads goes at once
        releases: list[list[str]] = [[] for _ in self._steps]
        for name, i in last.items():
            if name not in keep:
                releases[i].append(name)
        return [tuple(r) for r in releases]

    def _flush_wide_constants(self) -> dict[str, np.ndarray]:
        """Constants read by conv/matmul, with subnormals flushed once here instead of at every run (N9). A constant
        that nothing else reads (nor outputs) is replaced by its flushed values: weights are held once, not twice."""
        if not self.settings.flush_subnormals_in_matmul:
            return {}
        readers: dict[str, set[str]] = {}  # constant -> the kinds of op that read it
        for step in self._steps:
            for ref in step.inputs:
                for name in ref if isinstance(ref, tuple) else (ref,):
                    if isinstance(self._consts.get(name), np.ndarray):
                        readers.setdefault(name, set()).add(step.op.kind)
        outputs = {name for name, _ in self.outputs}
        out = {}
        for name, kinds in readers.items():
            if "wide" in kinds:
                value, key = self._consts[name], self._const_keys.get(name)
                out[name] = (numerics.flush_subnormals(value) if key is None else
                             _shared(("flushed",) + key, lambda: numerics.flush_subnormals(value)))
                self.kernels.flushed.add(id(out[name]))
                if kinds == {"wide"} and name not in outputs:
                    self._consts[name] = out[name]
        return out

    # -- preparation: everything that does not depend on inputs is checked and done once ---------------------------

    def _prepare(self, blob_loader) -> None:
        """The checks ``orion check`` runs (:func:`~orion.mil.validate.validate_program`), then the constants."""
        validation = validate_program(self.program)
        validation.raise_first()
        for st in self.program.statements:
            if st.op == "const":
                self._consts[st.var] = self._const_value(st, blob_loader)
        for r in validation.resolved:
            for name, literal in r.literals.items():
                self._consts[name] = self._literal_value(literal, r.statement, blob_loader, name)
            shape = r.arg_types[0].shape if r.arg_types else ()
            offset = last_axis_slice_offset(r.op.name, shape, r.attrs) if r.op.name in ("slice_by_index", "slice_by_size") else 0
            attrs = {**r.attrs, **{key: self._consts[var] for key, var in r.blob_attrs.items()}}
            if r.op.kind == "constexpr":
                self._consts[r.statement.var] = self._decoded(r, attrs)
                continue
            self._steps.append(_Step(r.statement.var, r.op, r.inputs, attrs, r.statement, offset_slice=offset != 0,
                                     results=tuple(var for var, _ in r.statement.outputs)))

    def _decoded(self, r, attrs: dict) -> np.ndarray:
        """A constexpr op's weight, decoded once at load and held in its dtype (fp16 values), as the ANE decodes
        compressed weights before the multiply (N12)."""
        names = [name for name in r.inputs if isinstance(name, str)]  # constants, as validation checked
        if self.check_only:
            return np.zeros(r.statement.type.shape, np.float32)
        with np.errstate(all="ignore"):
            value = r.op.compute(self.kernels, [self._consts[name] for name in names], attrs)
        return numerics.hold_input(np.asarray(value, np.float32), r.statement.type.dtype)

    def _const_value(self, st: Statement, blob_loader) -> object:
        return self._literal_value(st.attrs["val"], st, blob_loader, st.var)

    def _literal_value(self, literal: Literal, st: Statement, blob_loader, name: str) -> object:
        """The value of constant ``name``: floats as held fp16 values (shared with other programs holding the same),
        integers, bools and strings as they are written."""
        value = literal.value
        if isinstance(value, BlobRef):
            value = blob_loader(value, literal.type, st)
            if self.check_only:
                return value
        if isinstance(value, np.ndarray) and literal.type.dtype in FLOAT_DTYPES:
            dtype = literal.type.dtype
            key = (dtype, value.dtype.str, value.shape, hashlib.blake2b(np.ascontiguousarray(value)).digest())
            self._const_keys[name] = key
            return _shared(key, lambda: numerics.hold_input(value, dtype))  # fp16 values, float32 storage
        return value

    # -- running --------------------------------------------------------------------------------------------------

    def bind(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names and shapes, convert any float dtype to the fp16 the ANE would hold."""
        check_input_names([name for name, _ in self.inputs], inputs)
        return {name: self.hold(name, inputs[name]) for name, _ in self.inputs}

    def hold(self, name: str, data: np.ndarray) -> np.ndarray:
        """One input, checked and converted to a new float32 array of fp16 values (``data`` is never kept)."""
        t = self._input_types[name]
        array = np.asarray(data)
        if tuple(array.shape) != t.shape:
            raise BindingError(f"input {name!r} has shape {list(array.shape)}; the program declares {list(t.shape)}")
        if t.dtype in FLOAT_DTYPES:
            if array.dtype.kind != "f":
                raise BindingError(f"input {name!r} has dtype {array.dtype}; give a float array")
            return numerics.hold_input(array, t.dtype)
        # an integer or bool input enters exactly, as a constant does; the first op's result is held as fp16
        if array.dtype.kind not in "biu" or not np.array_equal(array, array.astype(t.numpy_dtype)):
            raise BindingError(f"input {name!r} is declared {t.dtype}; give an array of {t.dtype} values "
                               f"(got {array.dtype} data)")
        return array.astype(t.numpy_dtype)

    def _read_only_by_matmul(self) -> set[str]:
        """Inputs that only matmuls read (not outputs either): held with their subnormals flushed, see hold_kept."""
        kinds: dict[str, set[str]] = {}
        for step in self._steps:
            for ref in step.inputs:
                for name in ref if isinstance(ref, tuple) else (ref,):
                    kinds.setdefault(name, set()).add(step.op.name)
        outputs = {name for name, _ in self.outputs}
        return {name for name in self._input_types if kinds.get(name) == {"matmul"} and name not in outputs}

    def hold_kept(self, name: str, data: np.ndarray, version: tuple) -> np.ndarray:
        """:meth:`hold`, kept while ``version`` (a weight input's surface and its write count) stays the same: runs
        between two weight writes convert it once. An input only matmuls read is kept with its subnormals flushed,
        as a constant is (N9), so they do not flush it again at every run."""
        kept = self._kept.get(name)
        if kept is not None and kept[0] == version:
            return kept[1]
        held = self.hold(name, data)
        if kept is not None:
            self.kernels.flushed.discard(id(kept[1]))
        if name in self._matmul_only_inputs:
            held = numerics.flush_subnormals(held)
            self.kernels.flushed.add(id(held))  # the kept array lives (and keeps its id) until it is replaced
        self._kept[name] = (version, held)
        return held

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name in their declared dtype (fp16 for non-float declarations computed in fp16; exact integers
        in their declared type: see :func:`output_value`). States (``state<...>`` inputs) are not inputs: they
        persist between calls (:attr:`state`, :meth:`reset_state`)."""
        held = self.run_bound(self.bind(inputs))
        return {name: output_value(held[name], t) for name, t in self.outputs}

    def run_bound(self, bound: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on inputs converted by :meth:`bind` (or :meth:`hold`); the outputs as the emulator holds them,
        float32 arrays of fp16 values, possibly shared with the program (a constant): read them, do not modify
        them."""
        if self.check_only:
            raise BackendError("this program was only checked (check_only=True); load it with its weights to run it")
        env: dict[str, object] = dict(self._consts)
        env.update(bound)
        env.update(self._state)
        with np.errstate(all="ignore"):
            for step, done in zip(self._steps, self._last_uses):
                if step.op.several_results:
                    env.update(zip(step.results, self._execute(step, env)))
                else:
                    env[step.var] = self._execute(step, env)
                if step.op.kind == "state" and step.op.name != "read_state":
                    self._write_state(step, env)
                for name in done:
                    del env[name]
        return {name: _held(env[name]) for name, _ in self.outputs}

    # -- state: the buffers of state<...> inputs, kept between runs of this program -----------------------------

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Each state's current value, by name, in its declared dtype (a copy)."""
        return {name: output_value(self._state[name], t) for name, t in self._state_types.items()}

    def reset_state(self) -> None:
        """Every state back to zeros, as a new program starts."""
        self._state = {name: np.zeros(t.shape, np.float32 if t.dtype in FLOAT_DTYPES else t.numpy_dtype)
                       for name, t in self._state_types.items()}

    def _write_state(self, step: _Step, env: dict) -> None:
        """write_state(input=s, data=v) or coreml_update_state(state=s, value=v): ``s`` holds ``v`` from here on,
        in this run and the next (a copy: later ops never see the buffer change under them)."""
        name, value = step.inputs[0], env[step.inputs[1]]
        self._state[name] = env[name] = np.array(value, copy=True)

    def _execute(self, step: _Step, env: dict) -> np.ndarray | tuple[np.ndarray, ...]:
        """One op on float32 arrays holding fp16 values; the result is rounded to fp16 and held as float32 (each
        result of an op that gives several)."""
        kind = step.op.kind
        flushed = self._wide_consts if kind == "wide" else {}
        args = [[env[n] for n in i] if isinstance(i, tuple) else flushed.get(i, env[i]) for i in step.inputs]
        arrays = args[0] if step.op.variadic else args
        result = step.op.compute(self.kernels, arrays, step.attrs)
        if step.op.several_results:
            return tuple(self._hold_result(step, r, arrays) for r in result)
        return self._hold_result(step, result, arrays)

    def _hold_result(self, step: _Step, result: np.ndarray, arrays: list) -> np.ndarray:
        kind = step.op.kind
        if kind in ("layout", "index", "state") and result.dtype.kind in "biu":
            return result  # integers moved or picked (indices) stay exact: MIL's int32, never rounded to fp16
        if kind in ("layout", "index", "state"):  # moves or picks values without computing: they stay fp16 values
            if step.offset_slice and self.settings.slice_offset_overflow:
                return numerics.slice_overflow(result.astype(F16), step.offset_slice, self.settings).astype(np.float32)
            return np.asarray(result, dtype=np.float32)
        if self.kernels.finished(result):
            out = result
        else:
            ties = self.settings.reduction_ties if kind in ("reduction", "wide") else self.settings.elementwise_ties
            out = np.asarray(result, dtype=np.float32)
            # a result the op allocated is rounded in place; one it may share (an input, a view) is copied first
            owned = out is not result or (out.base is None and out.flags.writeable and
                                          all(out is not a for a in arrays))
            out = numerics.round_f32(out, ties, out=out if owned else None)
        if step.op.name == "log":  # log of 0 (x + epsilon == 0) is -inf, the only way to get it
            out[out == -np.inf] = LOG_OF_ZERO
        if kind == "activation" and self.settings.activation_quirks:
            out = numerics.activation_quirks(step.op.name, arrays[0].astype(F16), out.astype(F16), self.settings)
            out = out.astype(np.float32)
        return out


def _held(value) -> np.ndarray:
    """An output as the emulator holds it: exact integers (indices, integers only moved) or float32 fp16 values."""
    value = np.asarray(value)
    return value if value.dtype.kind in "iu" else value.astype(np.float32)


def output_value(held: np.ndarray, t: TensorType, target: np.ndarray | None = None) -> np.ndarray:
    """A held output in its declared dtype (fp16 for non-float declarations whose values went through the fp16
    datapath, as a cast's): a new array, or written into ``target`` (an array of the output's shape, e.g. a view of a
    surface) and returned. Exact integers (indices, integer inputs only moved) read in their declared type."""
    if held.dtype.kind in "iu" and t.dtype not in FLOAT_DTYPES and t.dtype != "bool":
        if target is None:
            return held.astype(t.numpy_dtype)
        np.copyto(target, held, casting="unsafe")
        return target
    if t.dtype == "fp32":
        if target is None:
            return held.copy()
        np.copyto(target, held)
        return target
    if t.dtype not in FLOAT_DTYPES:  # an integer input read back unchanged need not be an fp16 value yet
        with np.errstate(over="ignore"):
            held = held.astype(F16).astype(np.float32)
    if target is None or target.dtype == F16:
        return numerics.fp16_of_held(held, out=target)
    np.copyto(target, numerics.fp16_of_held(held), casting="unsafe")
    return target


def load_text(text: str, model_dir: str | Path, settings: Numerics | None = None, source: str = "<mil>",
              function: str | None = None) -> EmulatedProgram:
    """``function``: which function of a text with several to run (None: the only one, or main)."""
    return EmulatedProgram(parse_program(text, source, function), directory_blob_loader(Path(model_dir)), settings)


def load_program(model_dir: str | Path, settings: Numerics | None = None,
                 function: str | None = None) -> EmulatedProgram:
    """Load ``model_dir/model.mil`` with its weights resolved under ``model_dir`` (``function`` of several)."""
    text, mil = read_mil_file(model_dir)
    return load_text(text, mil.parent, settings, source=str(mil), function=function)


# ---------------------------------------------------------------------------------------------------------------------
# The emulator as a backend: the same model life, directories and surface rules as the ANE.


class EmulatorModel(BackendModel):
    """A model in ``<root>/<identifier>/``. Compiling checks the program and snapshots the weight files into
    ``compiled/`` (the ANE bakes weights at compile time: catalog ANE-07); loading reads that snapshot, so
    overwriting weight files without refreshing the snapshot gives stale outputs, as reported on hardware."""

    def __init__(self, backend: "EmulatorBackend", mil_text: str, weight_files: dict[str, Path],
                 function: str | None = None):
        self.backend = backend
        self.mil_text = mil_text
        self.function = function
        self.identifier = model_identifier(mil_text, [MODEL_PATH + rel for rel in weight_files])
        self.directory = backend.root / self.identifier
        self.directory.mkdir(parents=True, exist_ok=True)
        DIRECTORY_CLAIMS.claim(self.directory)
        self._released = False
        (self.directory / "model.mil").write_text(mil_text, encoding="utf-8")
        self._weight_paths = list(weight_files)
        self._copy_weights(weight_files, self.directory)
        self._program: EmulatedProgram | None = None

    @staticmethod
    def _copy_weights(weight_files: dict[str, Path], into: Path) -> None:
        for rel, source in weight_files.items():
            target = resolve_blob_path(into, MODEL_PATH + rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)

    def compile(self) -> None:
        text = (self.directory / "model.mil").read_text(encoding="utf-8")
        for program in parse_functions(text, str(self.directory / "model.mil")).values():  # every function,
            EmulatedProgram(program, directory_blob_loader(self.directory, data=False),  # statement and record
                            self.backend.numerics, check_only=True)
        self._snapshot_weights()
        plist = {"mil_sha256": hashlib.sha256(text.encode()).hexdigest(), "weights": sorted(self._weight_paths)}
        (self.directory / "net.plist").write_text(json.dumps(plist), encoding="utf-8")

    def _snapshot_weights(self) -> None:
        compiled = self.directory / "compiled"
        self._copy_weights({rel: self.directory / rel for rel in self._weight_paths}, compiled)

    def artifacts(self) -> dict[str, bytes]:
        return {"net.plist": (self.directory / "net.plist").read_bytes()}

    def install_artifacts(self, artifacts: dict[str, bytes]) -> None:
        (self.directory / "net.plist").write_bytes(artifacts["net.plist"])
        self._snapshot_weights()

    def write_weights(self, weight_files: dict[str, Path]) -> None:
        self._copy_weights(weight_files, self.directory)
        self._snapshot_weights()

    def load(self) -> None:
        plist_path = self.directory / "net.plist"
        if not plist_path.is_file():
            raise BackendError(f"model {self.identifier[:12]} is not compiled; compile it (or install artifacts)")
        text = (self.directory / "model.mil").read_text(encoding="utf-8")
        if json.loads(plist_path.read_text())["mil_sha256"] != hashlib.sha256(text.encode()).hexdigest():
            raise BackendError(f"model {self.identifier[:12]}: compiled artifacts belong to another program")
        self._program = EmulatedProgram(parse_program(text, function=self.function),
                                        directory_blob_loader(self.directory / "compiled"), self.backend.numerics)

    def evaluate(self, inputs: Sequence[Surface], outputs: Sequence[Surface]) -> None:
        program = self._program
        if program is None:
            raise BackendError(f"model {self.identifier[:12]} is not loaded; call load() first")
        in_types = sorted(program.inputs)  # the ANE binds in alphabetical order of MIL names (ANE-03, ANE-19)
        out_types = sorted(program.outputs)
        self._check_surfaces("input", in_types, inputs)
        self._check_surfaces("output", out_types, outputs)
        bound = {}
        for (name, t), surface in zip(in_types, inputs):
            with surface.lock(read_only=True) as raw:  # packed from byte 0 (ANE-20); converted while locked
                data = raw[: t.nbytes].view(t.numpy_dtype).reshape(t.shape)
                bound[name] = (program.hold_kept(name, data, (surface, surface.writes)) if surface.resident
                               else program.hold(name, data))
        held = program.run_bound(bound)
        for (name, t), surface in zip(out_types, outputs):
            with surface.lock() as raw:  # converted straight into the surface
                output_value(held[name], t, raw[: t.nbytes].view(t.numpy_dtype).reshape(t.shape))

    def _check_surfaces(self, kind: str, types: list[tuple[str, TensorType]], surfaces: Sequence[Surface]) -> None:
        if len(surfaces) != len(types):
            raise EvaluationError(evaluation_failure_message(
                None, f"{len(surfaces)} {kind} surfaces for {len(types)} {kind}s {[n for n, _ in types]}"))
        sizes = {s.nbytes for s in surfaces}
        if len(sizes) > 1:
            raise EvaluationError(evaluation_failure_message(0x1D, f"{kind} surfaces of unequal sizes "
                                                                   f"{[s.nbytes for s in surfaces]}"), 0x1D)
        minimum = self.backend.target.min_surface_bytes
        for (name, t), s in zip(types, surfaces):
            if s.nbytes < minimum or s.nbytes < t.nbytes:
                raise EvaluationError(evaluation_failure_message(
                    0x1D, f"{kind} {name!r} surface of {s.nbytes} bytes (needs >= {max(minimum, t.nbytes)})"), 0x1D)

    def unload(self) -> None:
        self._program = None

    def release(self, remove_directory: bool = True) -> None:
        if self._released:
            return
        self._released = True
        self.unload()
        if DIRECTORY_CLAIMS.release(self.directory) and remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def _remove_tree(directory: Path, owner: int) -> None:
    """At exit: the process's private model directories, released or not (no other process reads them); not in a
    forked child that exits through ``atexit``, whose parent still runs them."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def _remove_if_empty(directory: Path) -> None:
    """At exit: the root of the model directories goes once every model released its own."""
    with contextlib.suppress(OSError):
        directory.rmdir()


class EmulatorBackend(Backend):
    """Runs programs with numpy on any OS. ``numerics`` defaults to the target profile's overrides."""

    name = "emulator"

    def __init__(self, target, numerics: Numerics | None = None, root: Path | None = None):
        super().__init__(target)
        if numerics is None:
            settings = {k: v for k, v in target.numerics.items() if k in Numerics.__dataclass_fields__}
            numerics = Numerics(**settings)
        self.numerics = numerics
        self.root = Path(root) if root else Path(tempfile.gettempdir()) / f"orion-emulator-{os.getpid()}"
        # this process's own folder goes whole at exit: models never released would otherwise stay on disk
        if root:
            atexit.register(_remove_if_empty, self.root)
        else:
            atexit.register(_remove_tree, self.root, os.getpid())

    @classmethod
    def available(cls) -> bool:
        return True

    def new_model(self, mil_text: str, weight_files: dict[str, Path], function: str | None = None) -> EmulatorModel:
        return EmulatorModel(self, mil_text, weight_files, function)

    def new_surface(self, nbytes: int) -> Surface:
        return Surface(nbytes)
