"""The emitter: deterministic text, ANE-form statements, names and parameters that exist in Apple's op definitions."""

from __future__ import annotations

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.compiler.targets import get_target
from orion.ir.builder import GraphBuilder
from orion.ir.ops import CONST_INPUTS, NOT_IN_COREMLTOOLS, OPS
from orion.mil.blob import BlobReader
from orion.mil.emit import MAPPED_BYTES, emit
from orion.mil.parse import parse_program
from orion.mil.program import BlobRef, VarRef
from examples.transformer_block import build as build_block


@pytest.fixture(scope="module")
def ios18_op():
    """``ios18_op(name)``: coremltools' definition of op ``name`` in its newest opset (iOS18); a fixture, so that
    only the tests against coremltools skip without it."""
    registry = pytest.importorskip("coremltools.converters.mil.mil.ops.registry")

    def newest(name: str):
        if name == "coreml_update_state":  # an op of coremltools' "coreml" dialect, not of an iOS opset
            from coremltools.converters.mil.mil.ops.defs.coreml_dialect.ops import coreml_update_state

            return coreml_update_state
        versions = registry.SSAOpRegistry.core_ops.get(name)
        assert versions, f"{name!r} is not an op in coremltools' registry"
        return versions[max(versions)]

    return newest


def _small_block():
    return build_block(d=64, heads=4, seq=16)


def test_every_declared_op_and_parameter_exists_in_coremltools_ios18(ios18_op):
    kind_domain = {"int": "int", "ints": "int", "bool": "bool", "bools": "bool", "string": "str", "float": "fp",
                   "tensor": "fp"}
    for op in OPS.values():
        if op.name in ("const", "write_state") or op.name in NOT_IN_COREMLTOOLS:  # write_state: the serialized
            continue  # coreml_update_state, no class of its own (coremltools' milproto loader reads its input= and data=)
        spec = ios18_op(op.name).input_spec.input_types
        tensor_inputs = [op.variadic] if op.variadic else list(op.inputs)
        for name in tensor_inputs:
            assert name in spec, f"{op.name}: input {name!r} is not in coremltools' {sorted(spec)}"
            fixed = op.kind == "constexpr" or name in CONST_INPUTS.get(op.name, ())  # the validator checks these
            assert spec[name].const == fixed, f"{op.name}: {name!r} const in coremltools: {spec[name].const}"
        for name, attr in op.attrs.items():
            assert name in spec, f"{op.name}: parameter {name!r} is not in coremltools' {sorted(spec)}"
            domains = " ".join(getattr(t, "__name__", str(t)) for t in spec[name].type_domain)
            assert kind_domain[attr.kind] in domains or not domains, (op.name, name, domains)


@pytest.mark.parametrize("version", ["1.3", "1.0"])
def test_every_emitted_statement_uses_coremltools_names(ios18_op, version):
    module = emit(_small_block(), version=version)
    for st in parse_program(module.text).statements:
        spec = ios18_op(st.op).input_spec.input_types
        assert set(st.args) <= set(spec), (st.op, set(st.args) - set(spec))


def test_same_graph_gives_byte_identical_text_and_weights():
    a, b = emit(_small_block()), emit(_small_block())
    assert a.text == b.text
    assert a.weight_files.keys() == b.weight_files.keys()
    for key in a.weight_files:
        for x, y in zip(a.weight_files[key], b.weight_files[key]):
            assert x.tobytes() == y.tobytes()


def test_text_round_trips_through_the_parser_in_both_dialects():
    for version in ("1.3", "1.0"):
        module = emit(_small_block(), version=version)
        assert module.text.startswith(f"program({version})")
        assert parse_program(module.text).to_text() == module.text


def test_ane_forms_named_params_no_conv_bias_blobfile_offsets(tmp_path):
    result = compile_graph(_small_block(), get_target("default"))
    program = parse_program(result.module.text)
    consts = {st.var for st in program.statements if st.op == "const"}
    for st in program.statements:
        if st.op == "conv":
            assert "bias" not in st.args
            for p in ("strides", "pad_type", "pad", "dilations", "groups"):
                assert isinstance(st.args[p], VarRef) and st.args[p].name in consts
        if st.op == "matmul":
            assert st.args["transpose_x"].name in consts and st.args["transpose_y"].name in consts
    result.module.write(tmp_path)
    for st, ref in program.blob_refs():
        assert isinstance(ref, BlobRef) and ref.path.startswith("@model_path/weights/") and ref.offset == 64
        path = tmp_path / ref.path.removeprefix("@model_path/")
        array = BlobReader(path).read(ref.offset, dtype=st.type.numpy_dtype, shape=st.type.shape)
        assert array.shape == st.type.shape


def test_single_weight_file_layout_offsets_point_at_records(tmp_path):
    module = emit(_small_block(), weight_layout="single")
    assert list(module.weight_files) == ["weights/weights.bin"]
    module.write(tmp_path)
    reader = BlobReader(tmp_path / "weights/weights.bin")
    offsets = [off for off, _, _ in reader.records()]
    program = parse_program(module.text)
    assert [ref.offset for _, ref in program.blob_refs()] == offsets
    # every blob reads back as the constant the graph holds
    graph_consts = {n.name: n.attrs["val"] for n in _small_block().nodes if n.is_const}
    for st, ref in program.blob_refs():
        np.testing.assert_array_equal(reader.read(ref.offset, shape=st.type.shape), graph_consts[st.var])


@pytest.mark.parametrize("layout", ["per-tensor", "single"])
def test_a_mapped_module_reads_its_large_weights_from_the_files_written(tmp_path, layout):
    module = emit(build_block(d=256, heads=4, seq=16), weight_layout=layout)
    module.write(tmp_path)
    mapped = module.mapped(tmp_path)
    assert mapped.text == module.text and mapped.weight_names == module.weight_names
    sizes = set()
    for rel, arrays in module.weight_files.items():
        assert len(mapped.weight_files[rel]) == len(arrays)
        for held, read in zip(arrays, mapped.weight_files[rel]):
            assert read.dtype == held.dtype and read.shape == held.shape and read.tobytes() == held.tobytes()
            assert _is_map(read) == (held.nbytes >= MAPPED_BYTES) and not _is_map(held)  # self is unchanged
            sizes.add(held.nbytes >= MAPPED_BYTES)
    assert sizes == {True, False}  # the block has weights on both sides of the line
    rel = next(iter(module.weight_files))
    only = module.mapped(tmp_path, [rel])
    assert all(not _is_map(a) for r, arrays in only.weight_files.items() if r != rel for a in arrays)


def _is_map(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_outputs_named_by_graph_and_inputs_passed_through_get_identity():
    b = GraphBuilder()
    x = b.input("x", (1, 4, 1, 16))
    y = b.exp(x, name="e")
    b.output("x_copy", x)
    b.output("first", y)
    b.output("second", y)
    program = parse_program(emit(b.graph).text)
    assert program.outputs == ["x_copy", "first", "second"]
    assert program.statement("x_copy").op == "identity"
    assert program.statement("first").op == "exp"
    assert program.statement("second").op == "identity"


def test_emitting_runs_the_same_as_before_the_pipeline(run_graph, rng):
    graph = _small_block()
    result = compile_graph(graph, "default")
    x = rng.normal(size=(1, 64, 1, 16)).astype(np.float32)
    before = run_graph(graph, {"x": x})["y"].astype(np.float32)
    after = run_graph(result.graph, {"x": x})["y"].astype(np.float32)
    np.testing.assert_allclose(after, before, atol=0.05, rtol=0.02)
