"""Programs with several functions (Core ML multifunction models: ``main`` plus ``prefill`` and ``decode`` sharing
weights): parsed, checked function by function, run by name on the emulator (``load_program(function=...)``, the
runtime's ``Program.from_mil(function=...)``, ``orion run --function``), and refused on the ANE backend while the
target says nobody knows whether the ANE runs them (ANE-42)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from orion.compiler.constraints import check_program
from orion.compiler.targets import get_target
from orion.errors import MILProgramError, SettingsError
from orion.mil.blob import BlobWriter
from orion.mil.parse import parse_functions, parse_program
from orion.runtime.backends.emulator import load_program

#: Three functions reading one weight file: main scales, prefill adds the weight, decode multiplies by it (other
#: shapes: a function has inputs of its own). Variable names repeat across functions: each is its own scope.
TEXT = """program(1.3)
[buildInfo = dict<string, string>({{"coremltools-version", "9.0"}})]
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {
        fp16 two = const()[name=string("two"), val=fp16(2)];
        tensor<fp16, [1, 4, 1, 8]> y = mul(x=x, y=two)[name=string("y")];
    } -> (y);
    func prefill<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {
        tensor<fp16, [1, 4, 1, 1]> w = const()[name=string("w"), val=tensor<fp16, [1, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/w.bin"), offset=uint64(64)))];
        tensor<fp16, [1, 4, 1, 8]> y = add(x=x, y=w)[name=string("y")];
    } -> (y);
    func decode<ios18>(tensor<fp16, [1, 4, 1, 1]> token) {
        tensor<fp16, [1, 4, 1, 1]> w = const()[name=string("w"), val=tensor<fp16, [1, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/w.bin"), offset=uint64(64)))];
        tensor<fp16, [1, 4, 1, 1]> out = mul(x=token, y=w)[name=string("out")];
    } -> (out);
}
"""

W = np.array([0.5, -1.25, 3.0, 0.75], np.float16).reshape(1, 4, 1, 1)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "weights").mkdir()
    with BlobWriter(tmp_path / "weights" / "w.bin") as writer:
        writer.add(W)
    (tmp_path / "model.mil").write_text(TEXT)
    return tmp_path


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float16)


def test_every_function_parses_in_its_own_scope():
    functions = parse_functions(TEXT)
    assert list(functions) == ["main", "prefill", "decode"]
    assert [name for name, _ in functions["decode"].inputs] == ["token"]
    assert all(f.functions == ("main", "prefill", "decode") for f in functions.values())
    assert parse_program(TEXT).function == "main"
    assert parse_program(TEXT, function="decode").outputs == ["out"]
    with pytest.raises(MILProgramError, match="has no function 'verify'; it has main, prefill, decode"):
        parse_program(TEXT, function="verify")
    with pytest.raises(MILProgramError, match="has functions prefill, decode and no main"):
        parse_program("program(1.3)\n{\n" + TEXT.split("    } -> (y);\n", 1)[1])  # prefill and decode only
    with pytest.raises(MILProgramError, match="function 'main' is defined twice"):
        parse_program(TEXT.replace("func prefill<", "func main<"))


def test_each_function_runs_by_name_with_the_shared_weights(model_dir):
    x, token = _x((1, 4, 1, 8)), _x((1, 4, 1, 1), 1)
    x32, t32, w32 = x.astype(np.float32), token.astype(np.float32), W.astype(np.float32)
    np.testing.assert_array_equal(load_program(model_dir).run({"x": x})["y"], (x32 * 2).astype(np.float16))
    np.testing.assert_array_equal(load_program(model_dir, function="prefill").run({"x": x})["y"],
                                  (x32 + w32).astype(np.float16))
    np.testing.assert_array_equal(load_program(model_dir, function="decode").run({"token": token})["out"],
                                  (t32 * w32).astype(np.float16))


def test_the_runtime_runs_a_function_on_the_emulator_backend(model_dir):
    from orion.runtime.program import Program

    token = _x((1, 4, 1, 1), 2)
    with Program.from_mil(model_dir, backend="emulator", check=False, function="decode") as program:
        out = program.run({"token": token})["out"]
    np.testing.assert_array_equal(out, (token.astype(np.float32) * W.astype(np.float32)).astype(np.float16))


def test_the_ane_backend_refuses_several_functions_while_the_target_does_not_know(model_dir, monkeypatch):
    """The refusal comes before any backend call: on a machine with an ANE (here: a pretend one) as on the
    stand-in, a multifunction text never reaches the hardware unless the profile settles it."""
    from orion.runtime import program as runtime_program

    class Pretend:
        name = "ane"

    monkeypatch.setattr(runtime_program, "get_backend", lambda backend, target: Pretend())
    with pytest.raises(SettingsError, match=r"3 functions \(main, prefill, decode\).*multi_function=unknown.*ANE-42"):
        runtime_program.Program.from_mil(model_dir, backend="ane", check=False, function="decode")


def test_check_names_the_contested_fact_unless_the_target_settles_it():
    program = parse_program(TEXT, function="prefill")
    found = [v for v in check_program(program, get_target("default")) if v.constraint == "ANE-42"]
    assert len(found) == 1 and found[0].severity == "error" and "main, prefill, decode" in found[0].message
    settled = get_target("default").with_overrides(multi_function="procedure-index")
    assert not [v for v in check_program(program, settled) if v.constraint == "ANE-42"]
    single = parse_program(TEXT.split("    func prefill", 1)[0] + "}\n")
    assert not [v for v in check_program(single, get_target("default")) if v.constraint == "ANE-42"]


def test_orion_check_checks_every_function(model_dir):
    """A wrong declared type in decode is found and placed in its function; the others are checked too."""
    (model_dir / "model.mil").write_text(TEXT.replace("tensor<fp16, [1, 4, 1, 1]> out = mul",
                                                      "tensor<fp16, [1, 4, 1, 2]> out = mul"))
    result = CliRunner().invoke(cli, ["check", str(model_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output
    assert "function decode, line 14 (mul 'out')" in result.output and "ANE-38" in result.output
    assert result.output.count("ANE-42") == 1  # a program-wide finding, once
    for name in ("main", "prefill", "decode"):
        assert f"function {name}:" in result.output


def test_orion_run_runs_the_function_named(model_dir, tmp_path):
    token = _x((1, 4, 1, 1), 3)
    np.savez(tmp_path / "in.npz", token=token)
    result = CliRunner().invoke(cli, ["run", str(model_dir), "--inputs", str(tmp_path / "in.npz"), "--out",
                                      str(tmp_path / "out.npz"), "--function", "decode", "--backend", "emulator"])
    assert result.exit_code == 0, result.output
    out = np.load(tmp_path / "out.npz")["out"]
    np.testing.assert_array_equal(out, (token.astype(np.float32) * W.astype(np.float32)).astype(np.float16))
    missing = CliRunner().invoke(cli, ["run", str(model_dir), "--random-inputs", "0", "--out",
                                       str(tmp_path / "o2.npz"), "--function", "verify", "--backend", "emulator"])
    assert missing.exit_code == 2 and "has no function 'verify'" in missing.output
