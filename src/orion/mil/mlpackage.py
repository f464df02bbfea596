"""Read a Core ML ML program (a ``.mlpackage`` directory) as MIL text, so that everything that reads MIL runs it.

A package holds ``Manifest.json``, a ``model.mlmodel`` protobuf (a ``Model`` whose ``mlProgram`` is the MIL program
in protobuf form) and ``weights/weight.bin``, a blob storage v2 file that the program's ``blobFileValue`` constants
name by ``@model_path/`` path and record offset, exactly as ``BLOBFILE`` does in MIL text.

The protobuf is turned into a :class:`~orion.mil.program.Program` and printed as MIL text, which the caller parses
like any ``model.mil``. Printing and parsing again (rather than handing the built program over) is both simpler and
more faithful: the one parser applies every check it applies to text (defined-before-use variables, reserved names,
BLOBFILE paths that stay inside the package, values that fit their type), the runtime backends take MIL text anyway,
and the printer writes numbers exactly (fp16/fp32 values survive ``repr``), so nothing is lost on the way. Only the
MIL program crosses: the emulator still executes nothing but MIL.

The protobuf definitions are coremltools' (``coremltools.proto``), an optional dependency: ``pip install
'orion-ane[coreml]'``. A multifunction package (coremltools' ``save_multifunction``: prefill and decode sharing
one weight file) becomes a multifunction text, its functions in the package's order, each run by name; a stateful
one (``states=[ct.StateType(...)]``) declares its buffers ``state<tensor<...>>``, which the emulator keeps between
calls. What MIL text cannot carry, or Orion does not run, is refused with one line naming it: neural-network
(non-ML-program) models, list or dictionary types, dynamic shapes, control flow blocks, dtypes outside
:data:`~orion.ir.types.NUMPY_DTYPES`.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import numpy as np

from orion.errors import MILProgramError, UnsafePathError
from orion.ir.ops import OPS
from orion.mil.program import (STRING, Argument, BlobRef, Literal, Program, Statement, TensorType, VarRef,
                                print_functions)

__all__ = ["is_mlpackage", "read_mlpackage"]

#: coremltools' ``MIL_pb2.DataType`` names -> MIL type names Orion holds.
_DTYPES = {
    "BOOL": "bool", "STRING": STRING, "FLOAT16": "fp16", "FLOAT32": "fp32", "INT8": "int8", "INT16": "int16",
    "INT32": "int32", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
}
#: Core ML's opset names are ``CoreML<n>``: CoreML5 is iOS15, ..., CoreML8 is iOS18.
_COREML_OPSET_OFFSET = 10
#: The program dialect that prints scalars as ``fp16(x)`` starts with ios18; earlier opsets write ``program(1.0)``.
_FIRST_SHORT_SCALAR_OPSET = 18


def is_mlpackage(path: str | Path) -> bool:
    """Whether ``path`` is a Core ML package directory (it has a ``Manifest.json``)."""
    path = Path(path)
    return path.is_dir() and (path.suffix == ".mlpackage" or (path / "Manifest.json").is_file())


def _protos():
    try:
        from coremltools.proto import MIL_pb2, Model_pb2
    except ImportError:
        raise MILProgramError("reading a .mlpackage needs coremltools's protobuf definitions; "
                              "install them with: pip install 'orion-ane[coreml]'") from None
    return MIL_pb2, Model_pb2


def _model_path(package: Path) -> Path:
    """The ``model.mlmodel`` the manifest names as the root model, refused if its path leaves ``Data/``."""
    manifest = package / "Manifest.json"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
        root = entries["itemInfoEntries"][entries["rootModelIdentifier"]]["path"]
    except FileNotFoundError:
        raise MILProgramError(f"{package} has no Manifest.json; is it a Core ML package?") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise MILProgramError(f"{manifest}: not a Core ML manifest (no root model entry: {exc!r})") from None
    normal = posixpath.normpath(str(root))
    if not isinstance(root, str) or normal.startswith(("/", "../")) or normal in ("..", ".") or "\\" in root:
        raise UnsafePathError(f"{manifest}: root model path {root!r} does not name a file inside the package")
    path = package / "Data" / normal
    if not path.is_file():
        raise MILProgramError(f"{manifest} names {root!r}, which is not in {package / 'Data'}")
    return path


class _Converter:
    """One function of an ML program protobuf -> :class:`Program`."""

    def __init__(self, mil_pb2, source: str):
        self.pb = mil_pb2
        self.source = source
        self.hoisted = 0

    def refuse(self, problem: str) -> MILProgramError:
        return MILProgramError(f"{self.source}: {problem}")

    def type_(self, value_type, what: str) -> TensorType:
        kind = value_type.WhichOneof("type")
        if kind != "tensorType":
            feature = {"stateType": "state (allowed only as a function input)", "listType": "list types",
                       "tupleType": "tuple types", "dictionaryType": "dictionary types"}.get(kind, repr(kind))
            raise self.refuse(f"{what} has a {feature} type, which Orion does not run")
        t = value_type.tensorType
        name = self.pb.DataType.Name(t.dataType)
        if name not in _DTYPES:
            raise self.refuse(f"{what} has dtype {name}, which Orion does not hold")
        shape = []
        for dim in t.dimensions:
            if dim.WhichOneof("dimension") != "constant":
                raise self.refuse(f"{what} has a dynamic dimension; Orion runs only fixed shapes "
                                  "(convert with fixed input shapes)")
            shape.append(int(dim.constant.size))
        if len(shape) != t.rank:
            raise self.refuse(f"{what} has rank {t.rank} but {len(shape)} dimensions; the shape must be known")
        return TensorType(_DTYPES[name], tuple(shape))

    def literal(self, value, what: str) -> Literal:
        t = self.type_(value.type, what)
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            return Literal(t, BlobRef(value.blobFileValue.fileName, int(value.blobFileValue.offset)))
        if kind != "immediateValue" or value.immediateValue.WhichOneof("value") != "tensor":
            raise self.refuse(f"{what} is a {kind or 'missing'} value other than a tensor, which MIL text cannot carry")
        tensor = value.immediateValue.tensor
        field = tensor.WhichOneof("value")
        if t.dtype == STRING:
            strings = list(tensor.strings.values) if field == "strings" else []
            if len(strings) != 1:
                raise self.refuse(f"{what} is a string value with {len(strings)} strings; MIL text holds one")
            return Literal(t, strings[0])
        np_dtype = t.numpy_dtype
        if field == "bytes":  # how coremltools stores fp16 and 8/16-bit integers
            raw = tensor.bytes.values
            if len(raw) != t.size * np_dtype.itemsize:
                raise self.refuse(f"{what} holds {len(raw)} bytes; {t} needs {t.size * np_dtype.itemsize}")
            array = np.frombuffer(raw, dtype=np_dtype.newbyteorder("<")).astype(np_dtype)
        elif field in ("floats", "ints", "bools", "longInts", "doubles"):
            values = list(getattr(tensor, field).values)
            if len(values) != t.size:
                raise self.refuse(f"{what} holds {len(values)} values; {t} needs {t.size}")
            array = np.array(values).astype(np_dtype)
            if not np.array_equal(array, np.array(values)) and t.dtype not in ("fp16", "fp32"):
                raise self.refuse(f"{what} holds values that do not fit {t.dtype}")
        else:
            raise self.refuse(f"{what} has no values")
        return Literal(t, array.reshape(t.shape))

    def argument(self, op_name: str, key: str, argument, statements: list[Statement]) -> Argument:
        bindings = list(argument.arguments)
        if len(bindings) == 1:
            return self.binding(op_name, key, bindings[0], statements, in_tuple=False)
        return tuple(self.binding(op_name, key, b, statements, in_tuple=True) for b in bindings)

    def binding(self, op_name: str, key: str, binding, statements: list[Statement], in_tuple: bool) -> Argument:
        if binding.WhichOneof("binding") == "name":
            return VarRef(binding.name)
        literal = self.literal(binding.value, f"operand {key} of {op_name}")
        if not in_tuple:
            return literal
        # MIL text's tuples hold variables only: a literal in one becomes a const of its own, just before
        self.hoisted += 1
        var = f"{op_name}_{key}_{self.hoisted}"
        statements.append(Statement(type=literal.type, var=var, op="const",
                                    attrs={"name": Literal(TensorType(STRING), var), "val": literal}))
        return VarRef(var)

    def statement(self, op, statements: list[Statement]) -> None:
        outputs = [(o.name, self.type_(o.type, f"output {o.name!r} of {op.type}")) for o in op.outputs]
        var = outputs[0][0] if outputs else op.type  # write_state has none; the validator names any other op without
        if len(op.blocks):
            raise self.refuse(f"op {op.type} ({var}) has nested blocks (control flow), which Orion does not run")
        declared = (*OPS[op.type].inputs, *OPS[op.type].attrs) if op.type in OPS else ()
        keys = [k for k in declared if k in op.inputs] + sorted(k for k in op.inputs if k not in declared)
        args = {k: self.argument(var, k, op.inputs[k], statements) for k in keys}
        attrs = {k: self.literal(op.attributes[k], f"attribute {k} of {var}") for k in sorted(op.attributes)}
        if "name" in attrs:  # the name first, as MIL text writes it
            attrs = {"name": attrs.pop("name"), **attrs}
        (var, t), *more = outputs or [("", None)]
        statements.append(Statement(type=t, var=var, op=op.type, args=args, attrs=attrs, more_outputs=tuple(more)))

    def build_info(self, program) -> dict[str, str]:
        """The program's ``buildInfo`` (which tools wrote it), as MIL text carries it; empty if it has none."""
        if "buildInfo" not in program.attributes:
            return {}
        entries = program.attributes["buildInfo"].immediateValue.dictionary.values
        return {str(self.literal(e.key, "a buildInfo key").value): str(self.literal(e.value, "a buildInfo value").value)
                for e in entries}

    def program(self, function_name: str, function) -> Program:
        opset = function.opset
        if not (opset.startswith("CoreML") and opset[len("CoreML"):].isdigit()):
            raise self.refuse(f"function {function_name} has opset {opset!r}; expected CoreML<n> (such as CoreML8)")
        ios = int(opset[len("CoreML"):]) + _COREML_OPSET_OFFSET
        if opset not in function.block_specializations:
            raise self.refuse(f"function {function_name} has no block for its opset {opset}")
        block = function.block_specializations[opset]
        inputs = [(i.name, self.input_type(i)) for i in function.inputs]
        states = tuple(i.name for i in function.inputs if i.type.WhichOneof("type") == "stateType")
        statements: list[Statement] = []
        for op in block.operations:
            self.statement(op, statements)
        return Program(inputs=inputs, statements=statements, outputs=list(block.outputs),
                       version="1.3" if ios >= _FIRST_SHORT_SCALAR_OPSET else "1.0", opset=f"ios{ios}",
                       function=function_name, states=states)

    def input_type(self, value) -> TensorType:
        """A function input's tensor type; a state input's is the tensor it wraps (``state<tensor<...>>``)."""
        value_type = value.type
        if value_type.WhichOneof("type") == "stateType":
            value_type = value_type.stateType.wrappedType
            wrapped = value_type.WhichOneof("type")
            if wrapped != "tensorType":
                raise self.refuse(f"state input {value.name!r} wraps {'a ' + wrapped if wrapped else 'nothing'}; "
                                  "Orion keeps tensor states only")
        return self.type_(value_type, f"input {value.name!r}")


def read_mlpackage(package: str | Path) -> tuple[str, Path]:
    """The MIL text of a Core ML package's ML program and the path of its ``model.mlmodel`` (whose folder is the
    ``@model_path/`` its weights are named under)."""
    package = Path(package)
    mil_pb2, model_pb2 = _protos()
    path = _model_path(package)
    model = model_pb2.Model()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError carries no more than this
        raise MILProgramError(f"{path}: not a Core ML model protobuf ({exc})") from None
    kind = model.WhichOneof("Type")
    if kind != "mlProgram":
        raise MILProgramError(f"{path}: a {kind or 'empty'} model, not an ML program; Orion reads ML programs "
                              "(convert with convert_to='mlprogram')")
    if not model.mlProgram.functions:
        raise MILProgramError(f"{path}: an ML program without functions")
    converter = _Converter(mil_pb2, str(path))
    functions = model.mlProgram.functions
    described = [f.name for f in model.description.functions]  # the order the package lists them in
    order = described if sorted(described) == sorted(functions) else sorted(functions)
    programs = [converter.program(name, functions[name]) for name in order]
    if len({(p.version, p.opset) for p in programs}) > 1:  # one text has one dialect
        raise MILProgramError(f"{path}: functions of different opsets ("
                              f"{', '.join(f'{p.function} {p.opset}' for p in programs)}); convert them for one target")
    programs[0].build_info = converter.build_info(model.mlProgram)
    try:
        return print_functions(programs, programs[0].version), path
    except ValueError as exc:  # a value MIL text cannot spell (NaN)
        raise MILProgramError(f"{path}: {exc}") from None
