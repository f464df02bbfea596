"""Lower an IR graph to a MIL :class:`Program` plus the weight blobs its BLOBFILE constants name.

The emitted form is the one the ANE compiler accepts (reference section 3): op parameters are named consts,
tensors of weights live in blob files under ``@model_path/``, outputs are named by the graph's output names.
The same graph always lowers to byte-identical text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orion.errors import GraphError, WeightFileError
from orion.fileio import write_atomic
from orion.ir.graph import Graph, sanitize_name
from orion.ir.ops import OPS, input_names
from orion.ir.types import NUMPY_DTYPES, SUB_BYTE_BITS, TensorType, dtype_name
from orion.mil.blob import BlobReader, BlobWriter, SubByteArray, blob_record_offsets, stored_dtype
from orion.mil.parse import parse_program, read_mil_file, resolve_blob_path
from orion.mil.program import DIALECTS, MODEL_PATH, BlobRef, Literal, Program, Statement, VarRef

#: ``per-tensor``: one weight file per constant (what Orion, maderix and M1 need); ``single``: all in one file.
WEIGHT_LAYOUTS = ("per-tensor", "single")
#: Weights of this size and more are what :meth:`MILModule.mapped` maps (fewer, larger maps: the OS limits them).
MAPPED_BYTES = 1 << 16



@dataclass
class MILModule:
    """What the compiler hands to a backend: MIL text, its parsed-equivalent program, and the weight files.

    ``weight_files`` maps a path relative to the model directory (``weights/wq.bin``) to the arrays stored in it,
    in file order; ``weight_names`` maps each BLOBFILE constant's name to ``(path, offset)``.
    """

    program: Program
    text: str
    weight_files: dict[str, list[np.ndarray]] = field(default_factory=dict)
    weight_names: dict[str, tuple[str, int]] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: str | os.PathLike, function: str | None = None) -> "MILModule":
        """Read ``directory/model.mil`` and every weight file it names (MIL from Orion or from another tool); of a
        text with several functions, ``program`` is ``function`` (None: main) and ``text`` keeps them all."""
        text, mil = read_mil_file(directory)
        program = parse_program(text, str(mil), function)
        declared = {}
        for st, ref in program.blob_refs():
            declared.setdefault(ref.path.removeprefix(MODEL_PATH), {})[ref.offset] = st
        weight_files: dict[str, list[np.ndarray]] = {}
        weight_names: dict[str, tuple[str, int]] = {}
        for rel, by_offset in declared.items():
            path = resolve_blob_path(mil.parent, MODEL_PATH + rel)
            if not path.is_file():
                first = next(iter(by_offset.values()))
                raise WeightFileError(f"line {first.line}: weight file {rel!r} of {first.var!r} not found at {path}")
            reader = BlobReader(path)
            arrays = []
            for offset, dtype, _ in reader.records():
                st = by_offset.get(offset)
                array = reader.read(offset, dtype=stored_dtype(st.type), shape=st.type.shape) if st \
                    else reader.read(offset)
                arrays.append(SubByteArray(array, dtype) if isinstance(dtype, str) else array)
                if st is not None:
                    weight_names[st.var] = (rel, offset)
            missing = set(by_offset) - {weight_names[st.var][1] for st in by_offset.values() if st.var in weight_names}
            if missing:
                st = by_offset[min(missing)]
                raise WeightFileError(f"line {st.line}: {st.var!r} names offset {min(missing)} of {rel!r}, "
                                      f"which holds no blob record there")
            weight_files[rel] = arrays
        return cls(program, text, weight_files, weight_names)

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``model.mil`` and the weight files under ``directory`` (each file atomically)."""
        root = Path(directory)
        self.write_weights(root, list(self.weight_files))
        write_atomic(root / "model.mil", self.text)
        return root

    def write_weights(self, directory: str | os.PathLike, files: list[str]) -> None:
        for rel in files:
            path = Path(directory) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with BlobWriter(path) as writer:
                for array in self.weight_files[rel]:
                    writer.add(array)

    def mapped(self, directory: str | os.PathLike, files: list[str] | None = None) -> "MILModule":
        """This module with the weights of ``files`` (default: all) of at least :data:`MAPPED_BYTES` read from
        ``directory`` (where :meth:`write` put them) as read-only maps instead of arrays in memory: once a program's
        files are written its backend reads those, and a second copy in memory would be dead weight. Equal values
        (floats as written: NaN and Inf sanitized); ``self`` is unchanged."""
        weight_files = {rel: list(arrays) for rel, arrays in self.weight_files.items()}
        for rel in self.weight_files if files is None else files:
            arrays = weight_files[rel]
            if any(_mappable(a) for a in arrays):
                reader = BlobReader(Path(directory) / rel)
                offsets = blob_record_offsets([a.nbytes for a in arrays])
                arrays[:] = [reader.map(offset, a.dtype, a.shape) if _mappable(a) else a
                             for a, offset in zip(arrays, offsets)]
        return MILModule(self.program, self.text, weight_files, dict(self.weight_names))

    def replace_weights(self, weights: dict[str, np.ndarray]) -> list[str]:
        """Put new values for named BLOBFILE constants (same size; cast to the stored dtype); returns the weight
        files that changed. The text does not change, so a compiled program can take them without a compile."""
        changed: list[str] = []
        for name, array in weights.items():
            if name not in self.weight_names:
                raise GraphError(f"no weight named {name!r}; weights: {sorted(self.weight_names)}")
            rel, offset = self.weight_names[name]
            arrays = self.weight_files[rel]
            index = blob_record_offsets([a.nbytes for a in arrays]).index(offset)
            old, new = arrays[index], np.asarray(array)
            if isinstance(old, SubByteArray):
                raise GraphError(f"weight {name!r} is stored as {old.dtype}; compress the new values and compile")
            if new.size != old.size:
                raise GraphError(f"weight {name!r} takes {list(old.shape)} ({old.size} values), got {list(new.shape)}")
            arrays[index] = np.ascontiguousarray(new.astype(old.dtype).reshape(old.shape))
            if rel not in changed:
                changed.append(rel)
        return changed

    def weight_bytes(self) -> int:
        return sum(a.nbytes for arrays in self.weight_files.values() for a in arrays)


def _mappable(array) -> bool:
    """A weight worth a map: a plain array (sub-byte ones are packed in the file) of :data:`MAPPED_BYTES` or more."""
    return isinstance(array, np.ndarray) and array.nbytes >= MAPPED_BYTES


def _attr_literal(kind: str, value, float_dtype: str) -> Literal:
    """An attribute's literal; a ``float`` one takes the op's float dtype (coremltools' ``T``)."""
    if kind == "float":
        return Literal(TensorType(float_dtype), np.asarray(value, dtype=NUMPY_DTYPES[float_dtype]))
    if kind == "int":
        return Literal(TensorType("int32"), np.asarray(int(value), dtype=np.int32))
    if kind == "ints":
        arr = np.asarray([int(v) for v in value], dtype=np.int32)
        return Literal(TensorType("int32", arr.shape), arr)
    if kind == "bool":
        return Literal(TensorType("bool"), np.asarray(bool(value)))
    if kind == "bools":
        arr = np.asarray([bool(v) for v in value])
        return Literal(TensorType("bool", arr.shape), arr)
    if kind == "string":
        return Literal(TensorType("string"), str(value))
    raise GraphError(f"attribute kind {kind!r} cannot be emitted")


def _name_attr(name: str) -> dict[str, Literal]:
    return {"name": Literal(TensorType("string"), name)}


def emit(graph: Graph, version: str = "1.3", weight_layout: str = "per-tensor",
         weights_dir: str = "weights") -> MILModule:
    """Lower ``graph`` (already legalized for its target) to MIL text and weight blobs."""
    if version not in DIALECTS:
        raise GraphError(f"unknown MIL version {version!r}; expected one of {sorted(DIALECTS)}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise GraphError(f"unknown weight layout {weight_layout!r}; expected one of {WEIGHT_LAYOUTS}")
    graph.validate()
    names: dict[int, str] = {}
    taken: set[str] = set()

    def claim(base: str) -> str:
        base = sanitize_name(base)
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    for v in graph.inputs:
        names[v.id] = claim(v.name)
    # An output takes the name of the statement that produces it, unless that value is an input, a constant,
    # or already named for another output: then an identity op carries the name.
    renamed_outputs: dict[int, str] = {}
    for out_name, v in graph.outputs.items():
        if out_name in taken:
            raise GraphError(f"output name {out_name!r} is also an input name")
        if v.producer is not None and not v.producer.is_const and v.id not in renamed_outputs:
            renamed_outputs[v.id] = out_name
        taken.add(out_name)

    statements: list[Statement] = []
    weight_files: dict[str, list[np.ndarray]] = {}
    weight_names: dict[str, tuple[str, int]] = {}
    single_path = f"{weights_dir}/weights.bin"

    def add_blob(name: str, array: np.ndarray) -> BlobRef:
        rel = single_path if weight_layout == "single" else f"{weights_dir}/{name}.bin"
        arrays = weight_files.setdefault(rel, [])
        arrays.append(array)
        offset = blob_record_offsets([a.nbytes for a in arrays])[-1]
        weight_names[name] = (rel, offset)
        return BlobRef(MODEL_PATH + rel, offset)

    # a compressed weight's parts live in weight files like any weight, whatever their dtype
    compressed = {v.id for node in graph.nodes if OPS[node.op].kind == "constexpr" for v in node.input_values()}
    for node in graph.nodes:
        out = node.output
        var = renamed_outputs.get(out.id) or claim(out.name)
        names[out.id] = var
        more = []
        for v in node.more:
            names[v.id] = renamed_outputs.get(v.id) or claim(v.name)
            more.append((names[v.id], v.type))
        if node.is_const:
            stored = out.id in compressed or out.type.dtype in SUB_BYTE_BITS
            statements.append(_const_statement(var, node.attrs["val"], add_blob, out.type, stored))
            continue
        spec = OPS[node.op]
        args: dict[str, object] = {}
        for key in input_names(spec, list(node.inputs)):
            v = node.inputs[key]
            args[key] = tuple(VarRef(names[x.id]) for x in v) if isinstance(v, list) else VarRef(names[v.id])
        for key, attr in spec.attrs.items():
            value = node.attrs.get(key)
            if value is None:
                continue
            const_var = claim(f"{var}_{key}")
            if attr.kind == "tensor":  # a constant tensor of the op's dtype: a weight blob unless it is a scalar
                array = np.asarray(value, dtype=NUMPY_DTYPES[out.type.dtype])
                statements.append(_const_statement(const_var, array, add_blob))
            else:
                lit = _attr_literal(attr.kind, value, out.type.dtype)
                statements.append(Statement(lit.type, const_var, "const", {}, {**_name_attr(const_var), "val": lit}))
            args[key] = VarRef(const_var)
        args = dict(sorted(args.items()))
        statements.append(Statement(out.type, var, node.op, args, _name_attr(var), more_outputs=tuple(more)))

    outputs: list[str] = []
    for out_name, v in graph.outputs.items():
        if renamed_outputs.get(v.id) == out_name:
            outputs.append(out_name)
            continue
        statements.append(Statement(v.type, out_name, "identity", {"x": VarRef(names[v.id])}, _name_attr(out_name)))
        outputs.append(out_name)

    program = Program(
        inputs=[(names[v.id], v.type) for v in graph.inputs],
        statements=statements,
        outputs=outputs,
        version=version,
        opset=DIALECTS[version],
    )
    return MILModule(program, program.to_text(), weight_files, weight_names)


def _const_statement(var: str, array: np.ndarray, add_blob, t: TensorType | None = None,
                     stored: bool = False) -> Statement:
    """A const: a literal in the text, or a BLOBFILE for float tensors and (``stored``) compressed weights' parts."""
    t = t or TensorType(dtype_name(array.dtype), tuple(array.shape))
    if t.size == 1 and t.dtype not in SUB_BYTE_BITS or not (stored or t.dtype in ("fp16", "fp32")):
        lit = Literal(t, np.asarray(array))
    else:
        data = SubByteArray(array, t.dtype) if t.dtype in SUB_BYTE_BITS else np.ascontiguousarray(array)
        lit = Literal(t, add_blob(var, data))
    return Statement(t, var, "const", {}, {**_name_attr(var), "val": lit})
