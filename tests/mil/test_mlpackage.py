"""Core ML packages read as MIL: the package's ML program becomes the MIL text the parser, validator, emulator and
CLI already take; what MIL cannot carry, or Orion does not run, is refused with one line naming it."""

from __future__ import annotations

import builtins
import json
import shutil

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from orion.cli.main import cli  # noqa: E402
from orion.errors import MILProgramError, UnsafePathError  # noqa: E402
from orion.mil.mlpackage import read_mlpackage  # noqa: E402
from orion.mil.parse import parse_program  # noqa: E402
from orion.runtime.backends.emulator import load_program  # noqa: E402


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A converted Linear -> LayerNorm -> concat-with-a-flip module, its input and torch's output."""
    torch.manual_seed(3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 24)
            self.norm = torch.nn.LayerNorm(24)

        def forward(self, x):
            y = self.norm(self.fc(x))
            return torch.cat([y, y.flip(-1) * 0.5], dim=-1)

    net = Net().eval()
    with torch.no_grad():
        net.norm.weight.copy_(1 + 0.2 * torch.randn(24))
        net.norm.bias.copy_(0.2 * torch.randn(24))
    x = torch.randn(3, 16).half().float()
    with torch.no_grad():
        want = net(x).numpy()
    model = ct.convert(torch.jit.trace(net, x), inputs=[ct.TensorType(name="x", shape=x.shape)],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                       minimum_deployment_target=ct.target.iOS18)
    path = tmp_path_factory.mktemp("pkg") / "net.mlpackage"
    model.save(str(path))
    return path, x.numpy(), want


def test_package_reads_as_the_mil_text_of_its_program(package):
    path, _, _ = package
    text, model = read_mlpackage(path)
    program = parse_program(text, str(model))
    assert model.name == "model.mlmodel" and (model.parent / "weights" / "weight.bin").is_file()
    assert program.opset == "ios18" and program.version == "1.3"
    assert program.build_info["coremltools-component-torch"] == torch.__version__  # who wrote it, carried over
    assert [name for name, _ in program.inputs] == ["x"]
    ops = {st.op for st in program.statements}
    assert {"linear", "layer_norm", "reverse", "concat"} <= ops
    assert program.blob_refs(), "the weights stay in the package's weight file"


def test_emulator_runs_the_package_and_matches_torch(package):
    path, x, want = package
    program = load_program(path)
    (name, _), = program.outputs
    got = program.run({"x": x})[name].astype(np.float64)
    np.testing.assert_allclose(got, want, atol=2e-2 * max(1, np.abs(want).max()))


def test_cli_runs_and_checks_a_package(package, tmp_path):
    path, x, want = package
    np.savez(tmp_path / "in.npz", x=x)
    result = CliRunner().invoke(cli, ["run", str(path), "--inputs", str(tmp_path / "in.npz"),
                                      "--out", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        (got,) = out.values()
    np.testing.assert_allclose(got.astype(np.float64), want, atol=2e-2 * max(1, np.abs(want).max()))
    result = CliRunner().invoke(cli, ["check", str(path), "--target", "m4"])
    assert "model.mlmodel" in result.output
    assert "ANE-34" in result.output  # linear/layer_norm/reverse are not known ANE ops: check says so by name
    assert result.exit_code != 0


def _copy(package, tmp_path):
    target = tmp_path / "copy.mlpackage"
    shutil.copytree(package, target)
    return target


def test_manifest_path_out_of_the_package_is_refused(package, tmp_path):
    path = _copy(package[0], tmp_path)
    manifest = json.loads((path / "Manifest.json").read_text())
    root = manifest["rootModelIdentifier"]
    manifest["itemInfoEntries"][root]["path"] = "../../elsewhere/model.mlmodel"
    (path / "Manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError, match="inside the package"):
        read_mlpackage(path)


def test_damaged_protobuf_and_missing_manifest_are_named(package, tmp_path):
    path = _copy(package[0], tmp_path)
    model = next(path.glob("Data/*/model.mlmodel"))
    model.write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(MILProgramError, match="not a Core ML model protobuf"):
        read_mlpackage(path)
    (path / "Manifest.json").unlink()
    with pytest.raises(MILProgramError, match="no Manifest.json"):
        read_mlpackage(path)


def _rewrite(path, edit):
    from coremltools.proto import Model_pb2

    model_file = next(path.glob("Data/*/model.mlmodel"))
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    edit(spec)
    model_file.write_bytes(spec.SerializeToString())


def _add_function_of_another_opset(spec):
    """A second function converted for iOS17 (opset CoreML7) beside the iOS18 main: one MIL text has one dialect."""
    other = spec.mlProgram.functions["other"]
    other.CopyFrom(spec.mlProgram.functions["main"])
    other.opset = "CoreML7"
    other.block_specializations["CoreML7"].CopyFrom(other.block_specializations.pop("CoreML8"))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.ClearField("mlProgram"), "not an ML program"),
    (lambda s: _add_function_of_another_opset(s), "functions of different opsets"),
    (lambda s: s.mlProgram.functions["main"].inputs[0].type.tensorType.dimensions[0].unknown.SetInParent(),
     "dynamic dimension"),
    (lambda s: s.mlProgram.functions["main"].inputs[0].type.tensorType.__setattr__("dataType", 13), "BFLOAT16"),
    (lambda s: s.mlProgram.functions["main"].inputs[0].type.stateType.SetInParent(),
     "state input 'x' wraps nothing"),
    (lambda s: s.mlProgram.functions["main"].block_specializations["CoreML8"].operations[-1].outputs[0].type
     .stateType.wrappedType.tensorType.SetInParent(), r"state \(allowed only as a function input\)"),
])
def test_what_orion_does_not_run_is_refused_in_one_line(package, tmp_path, edit, message):
    path = _copy(package[0], tmp_path)
    _rewrite(path, edit)
    with pytest.raises(MILProgramError, match=message) as info:
        read_mlpackage(path)
    assert "\n" not in str(info.value)


def test_a_literal_inside_a_tuple_becomes_a_const_of_its_own(package, tmp_path):
    """MIL text's tuples hold variables; a protobuf may bind a value there (concat's values): it is hoisted."""
    path, x, want = package
    path = _copy(path, tmp_path)

    def inline_second_value(spec):
        from coremltools.proto import MIL_pb2

        block = spec.mlProgram.functions["main"].block_specializations["CoreML8"]
        concat = next(op for op in block.operations if op.type == "concat")
        binding = concat.inputs["values"].arguments[1]
        value = MIL_pb2.Value()
        value.type.CopyFrom(concat.outputs[0].type)
        value.type.tensorType.dimensions[-1].constant.size = 24
        value.immediateValue.tensor.bytes.values = np.full((3, 24), 0.25, np.float16).tobytes()
        binding.ClearField("name")
        binding.value.CopyFrom(value)

    _rewrite(path, inline_second_value)
    program = load_program(path)
    (name, _), = program.outputs
    got = program.run({"x": x})[name].astype(np.float64)
    np.testing.assert_allclose(got[:, :24], want[:, :24], atol=2e-2 * max(1, np.abs(want).max()))
    np.testing.assert_array_equal(got[:, 24:], 0.25)


def test_missing_coremltools_names_the_extra(package, monkeypatch):
    real_import = builtins.__import__

    def no_coremltools(name, *args, **kwargs):
        if name.startswith("coremltools"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    with pytest.raises(MILProgramError, match=r"orion-ane\[coreml\]"):
        read_mlpackage(package[0])
