"""The ``orion`` command as a user drives it: compile the example, run it, check programs, and get one clean
``error:`` line (exit status 2, --out untouched) for every mistake a user can make.

Oracles are independent of Orion's code: a float64 numpy GPT-2 block for the run outputs, the blob storage v2 layout
(reference section 4) for the weight files, and the text of the MIL file itself (regular expressions, not Orion's
parser) for names, shapes and error positions.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner, Result

from orion.cli.main import cli
from orion.compiler.targets import get_target

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "transformer_block.py"
D, HEADS, SEQ = 64, 4, 16
#: The example reads its sizes from the environment: small ones keep each compile well under a second.
SMALL = {"ORION_D": str(D), "ORION_HEADS": str(HEADS), "ORION_SEQ": str(SEQ)}
BLOB_PATH_RE = re.compile(r'BLOBFILE\(path\s*=\s*[^(]*\(\s*"@model_path/([^"]+)"\s*\)\s*,\s*offset\s*=\s*[^(]*\((\d+)\)')
REPORT_ROW_RE = re.compile(r"^\s*[│|┃]\s*(ANE-\d+)\s*[│|┃]\s*(\w+)\s*[│|┃]", re.MULTILINE)


# -- helpers ----------------------------------------------------------------------------------------------------------


def _runner() -> CliRunner:
    """click < 8.2 mixes stderr into stdout unless told not to; 8.2+ always keeps them apart."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(*args: object) -> Result:
    return _runner().invoke(cli, [str(a) for a in args], env=SMALL)


def _crash(result: Result) -> str:
    """The traceback of an exception that escaped the command (not a sys.exit), to say where a test failed."""
    if result.exc_info is None or isinstance(result.exception, SystemExit):
        return ""
    return "".join(traceback.format_exception(*result.exc_info))


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}" \
                                  f"\n{_crash(result)}"


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line, ``error: ...`` naming each fragment; no traceback anywhere."""
    detail = f"exit {result.exit_code}\nstderr:\n{result.stderr}\n{_crash(result)}"
    assert result.exit_code == 2, detail
    assert "Traceback" not in result.stdout + result.stderr, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("error:"), detail
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in the message\n{detail}"
    return lines[0]


def report_rows(stdout: str) -> list[tuple[str, str]]:
    """``(constraint id, severity)`` of each row of a printed constraint report."""
    return REPORT_ROW_RE.findall(stdout)


def assert_exit_matches_report(result: Result) -> list[tuple[str, str]]:
    """`orion check` exits 1 exactly when the report it printed holds an error row, 0 otherwise."""
    assert result.exit_code in (0, 1), f"exit {result.exit_code}\n{result.stderr}\n{_crash(result)}"
    rows = report_rows(result.stdout)
    if not rows:
        assert "no violations" in result.stdout, result.stdout
    assert all(sev in ("error", "warning") for _, sev in rows), rows
    has_error = any(sev == "error" for _, sev in rows)
    assert result.exit_code == (1 if has_error else 0), (rows, result.stdout)
    return rows


def mil_outputs(text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Output name -> (dtype, shape) read from the MIL text: the ``-> (...)`` list and each name's declaration."""
    names = re.search(r"->\s*\(([^)]*)\)\s*;", text).group(1)
    found = {}
    for name in (n.strip() for n in names.split(",")):
        decl = re.search(rf"tensor<(\w+),\s*\[([\d,\s]*)\]>\s+{name}\s*=", text)
        found[name] = (decl.group(1), tuple(int(n) for n in decl.group(2).split(",") if n.strip()))
    return found


def line_and_column(text: str, offset: int) -> tuple[int, int]:
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def example_inputs(seed: int = 1) -> np.ndarray:
    """Small fp16 inputs: the residual stream stays small, so fp16 rounding of y leaves the block's branches visible."""
    return (0.1 * np.random.default_rng(seed).standard_normal((1, D, 1, SEQ))).astype(np.float16)


def reference_block(x: np.ndarray) -> np.ndarray:
    """The example's GPT-2 block in float64 numpy, tokens as rows, with the example's weights (same seed and order)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32).astype(np.float64)

    g1, b1 = 1.0 + w(D), w(D)
    w_attn, b_attn = w(3 * D, D), w(3 * D)
    w_proj, b_proj = w(D, D), w(D)
    g2, b2 = 1.0 + w(D), w(D)
    w_fc, b_fc, w_out, b_out = w(4 * D, D), w(4 * D), w(D, 4 * D), w(D)

    def layer_norm(z, g, b):
        m = z.mean(-1, keepdims=True)
        return (z - m) / np.sqrt(((z - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

    t = x[0, :, 0, :].T.astype(np.float64)  # [S, D]
    qkv = layer_norm(t, g1, b1) @ w_attn.T + b_attn
    hd = D // HEADS
    q, k, v = (qkv[:, i * D:(i + 1) * D].reshape(SEQ, HEADS, hd).transpose(1, 0, 2) for i in range(3))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    scores = np.where(np.triu(np.ones((SEQ, SEQ), bool), 1), -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    t = t + (p @ v).transpose(1, 0, 2).reshape(SEQ, D) @ w_proj.T + b_proj
    f = layer_norm(t, g2, b2) @ w_fc.T + b_fc
    f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
    t = t + f @ w_out.T + b_out
    return t.T[None, :, None, :]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` (or ``path`` itself) with its bytes; None when nothing is there."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    """The example compiled once per target the tests use."""
    base = tmp_path_factory.mktemp("compiled")
    dirs = {}
    for target in ("default", "m1"):
        dirs[target] = base / target
        assert_ok(invoke("compile", EXAMPLE, "--out", dirs[target], "--target", target))
    return dirs


@pytest.fixture
def model(tmp_path, compiled) -> Path:
    """A private copy of the default compile, free to break."""
    return Path(shutil.copytree(compiled["default"], tmp_path / "model"))


# -- happy path -------------------------------------------------------------------------------------------------------


def test_compile_writes_mil_and_every_weight_file_it_names(compiled):
    out = compiled["default"]
    text = (out / "model.mil").read_text(encoding="utf-8")
    assert re.match(r"program\((1\.3|1\.0)\)", text)
    refs = BLOB_PATH_RE.findall(text)
    assert refs, "the example has weights, so the MIL must name weight files"
    for rel, offset in refs:
        data = (out / rel).read_bytes()
        count, version = struct.unpack_from("<II", data, 0)
        assert version == 2 and count >= 1, rel
        sentinel, _code, nbytes, data_offset = struct.unpack_from("<IIQQ", data, int(offset))
        assert sentinel == 0xDEADBEEF, (rel, offset)
        assert data_offset == int(offset) + 64 and data_offset + nbytes <= len(data), (rel, offset)


def test_run_writes_outputs_named_typed_and_shaped_as_the_mil_declares(compiled, tmp_path):
    text = (compiled["default"] / "model.mil").read_text(encoding="utf-8")
    declared = mil_outputs(text)
    x = example_inputs()
    np.savez(tmp_path / "in.npz", x=x)
    assert_ok(invoke("run", compiled["default"], "--inputs", tmp_path / "in.npz", "--out", tmp_path / "out.npz"))
    with np.load(tmp_path / "out.npz") as got:
        outputs = {k: got[k] for k in got.files}
    assert set(outputs) == set(declared)
    for name, (dtype, shape) in declared.items():
        assert outputs[name].dtype == np.dtype({"fp16": "float16", "fp32": "float32"}[dtype]), name
        assert outputs[name].shape == shape, name
    # Values: the float64 block within fp16 error (a block without its causal mask is off by ~0.06 here).
    np.testing.assert_allclose(outputs["y"].astype(np.float64), reference_block(x.astype(np.float64)), rtol=0,
                               atol=3e-3)


def test_run_accepts_float64_float32_and_float16_inputs_alike(compiled, tmp_path):
    x = example_inputs(seed=2)  # fp16 values: exact in every wider float type, so all runs must agree bit for bit
    results = {}
    for dtype in (np.float64, np.float32, np.float16):
        name = np.dtype(dtype).name
        np.savez(tmp_path / f"{name}.npz", x=x.astype(dtype))
        out = tmp_path / f"out_{name}.npz"
        assert_ok(invoke("run", compiled["default"], "--inputs", tmp_path / f"{name}.npz", "--out", out))
        with np.load(out) as got:
            results[name] = got["y"]
    assert results["float64"].tobytes() == results["float32"].tobytes() == results["float16"].tobytes()


def test_run_keeps_an_overflow_as_inf_and_counts_it(tmp_path):
    from orion.compiler.compile import compile_graph
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("overflow")
    b.output("y", b.mul(b.input("x", (1, 32, 1, 32)), 100.0, name="y"))
    compile_graph(b.graph, "default").module.write(tmp_path / "model")
    x = np.random.default_rng(4).uniform(-100, 100, (1, 32, 1, 32)).astype(np.float16)
    x[0, :3, 0, 0] = [1000, -1000, 655]  # 100000 and -100000 overflow fp16; 65500 does not
    np.savez(tmp_path / "in.npz", x=x)
    result = invoke("run", tmp_path / "model", "--inputs", tmp_path / "in.npz", "--out", tmp_path / "out.npz")
    assert_ok(result)
    with np.load(tmp_path / "out.npz") as got:
        y = got["y"]
    assert y[0, :3, 0, 0].tolist() == [math.inf, -math.inf, 65504.0]  # 65500 rounds to fp16's largest value
    assert np.isfinite(y).sum() == y.size - 2
    assert "non-finite 2" in result.stdout


def test_m1_target_writes_program_1_0_that_runs_like_the_default(compiled, tmp_path):
    m1_text = (compiled["m1"] / "model.mil").read_text(encoding="utf-8")
    assert m1_text.lstrip().startswith("program(1.0)")
    assert re.search(r"func main<ios16>", m1_text)
    x = example_inputs(seed=3)
    np.savez(tmp_path / "in.npz", x=x)
    ys = {}
    for target, directory in compiled.items():
        assert_ok(invoke("run", directory, "--inputs", tmp_path / "in.npz", "--out", tmp_path / f"{target}.npz"))
        with np.load(tmp_path / f"{target}.npz") as got:
            ys[target] = got["y"].astype(np.float64)
    np.testing.assert_allclose(ys["m1"], ys["default"], rtol=0, atol=2e-3)


@pytest.mark.parametrize("target", ["default", "m1", "m4"])
def test_check_exit_status_matches_the_printed_report(compiled, target):
    result = invoke("check", compiled["default"], "--target", target)
    rows = assert_exit_matches_report(result)
    program_version = re.match(r"\s*program\(([\d.]+)\)", (compiled["default"] / "model.mil").read_text()).group(1)
    dialect_rows = [sev for cid, sev in rows if cid == "ANE-30"]
    # ANE-30 (MIL dialect per chip) is reported, as an error, exactly when the file's dialect is not the target's.
    assert dialect_rows == (["error"] if program_version != get_target(target).mil_version else [])


def test_constraints_lists_the_papers_twenty_ids():
    result = invoke("constraints")
    assert_ok(result)
    ids = set(re.findall(r"ANE-\d\d", result.stdout))
    assert {f"ANE-{i:02d}" for i in range(1, 21)} <= ids


def test_targets_lists_profiles_and_shows_one():
    result = invoke("targets")
    assert_ok(result)
    assert {"default", "m1"} <= set(result.stdout.split())
    result = invoke("targets", "m1")
    assert_ok(result)
    assert re.search(r"mil_version\s*[│|]\s*1\.0\s", result.stdout), result.stdout


def test_installed_console_script(compiled, tmp_path):
    """The `orion` entry point of the installed package, in a real process: compile, run, and a clean user error."""
    exe = shutil.which("orion") or str(Path(sys.executable).with_name("orion"))
    assert Path(exe).is_file(), "the orion console script is not installed next to this Python"
    env = {**os.environ, **SMALL}
    env.pop("ORION_TRACEBACK", None)
    out_dir = tmp_path / "model"
    done = subprocess.run([exe, "compile", str(EXAMPLE), "--out", str(out_dir)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    np.savez(tmp_path / "in.npz", x=example_inputs())
    done = subprocess.run([exe, "run", str(out_dir), "--inputs", str(tmp_path / "in.npz"), "--out",
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out_dir / "model.mil").read_bytes() == (compiled["default"] / "model.mil").read_bytes()
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_allclose(got["y"].astype(np.float64), reference_block(example_inputs().astype(np.float64)),
                                   rtol=0, atol=3e-3)
    done = subprocess.run([exe, "run", str(tmp_path / "absent"), "--random-inputs", "0", "--out",
                           str(tmp_path / "never.npz")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error:"), done.stderr
    assert not (tmp_path / "never.npz").exists()


# -- `orion run`: bad input --------------------------------------------------------------------------------------------

# Each case breaks the model copy or the inputs file and returns (the MODEL_DIR argument, fragments the message needs).
RunCase = Callable[[Path, Path], tuple[Path, list[str]]]


def _edit_mil(model: Path, old: str, new: str) -> tuple[str, int]:
    """Replace the first ``old`` in model.mil; returns the new text and the offset of the replacement."""
    path = model / "model.mil"
    text = path.read_text(encoding="utf-8")
    at = text.index(old)
    text = text[:at] + new + text[at + len(old):]
    path.write_text(text, encoding="utf-8")
    return text, at


def _first_weight(model: Path) -> Path:
    rel, _ = BLOB_PATH_RE.findall((model / "model.mil").read_text(encoding="utf-8"))[0]
    return model / rel


def case_syntax_error(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    text, at = _edit_mil(model, "= mul(", "= mul((")
    line, column = line_and_column(text, at + len("= mul("))  # the second '(' is the token at fault
    return model, [f"line {line}, column {column}"]


def case_unknown_op(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    text, at = _edit_mil(model, "= mul(", "= frobnicate(")
    return model, [f"line {line_and_column(text, at)[0]}", "frobnicate"]


def case_missing_input(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    np.savez(inputs)
    return model, ["missing", "'x'"]


def case_extra_input(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    np.savez(inputs, x=example_inputs(), bogus=example_inputs())
    return model, ["bogus"]


def case_wrong_shape(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    np.savez(inputs, x=example_inputs()[..., : SEQ // 2])
    return model, ["'x'", f"[1, {D}, 1, {SEQ // 2}]"]


def case_integer_input(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    np.savez(inputs, x=np.ones((1, D, 1, SEQ), dtype=np.int32))
    return model, ["'x'", "int32"]


def case_weight_bad_header(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    weight = _first_weight(model)
    data = bytearray(weight.read_bytes())
    struct.pack_into("<I", data, 4, 7)  # version field: 2 in every blob storage v2 file
    weight.write_bytes(bytes(data))
    return model, [weight.name]


def case_weight_truncated(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    weight = _first_weight(model)
    weight.write_bytes(weight.read_bytes()[:-10])  # header and record intact, the data cut short
    return model, [weight.name, "short read"]


def case_weight_missing(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    weight = _first_weight(model)
    weight.unlink()
    return model, [weight.name]


def case_blob_path_escapes(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    weight = _first_weight(model)
    shutil.copy(weight, model.parent / weight.name)  # the escaping path names a real file: refusing is the only defence
    rel = weight.relative_to(model).as_posix()
    _edit_mil(model, f'"@model_path/{rel}"', f'"@model_path/../{weight.name}"')
    return model, [".."]


def case_inputs_not_npz(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    inputs.write_bytes(b"this is not a zip archive\n" * 4)
    return model, [inputs.name]


def case_inputs_npy_named_npz(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    with open(inputs, "wb") as f:  # a bare .npy array under a .npz name
        np.save(f, example_inputs())
    return model, [inputs.name]


def case_inputs_file_missing(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    inputs.unlink()
    return model, [inputs.name]


def case_model_dir_missing(model: Path, inputs: Path) -> tuple[Path, list[str]]:
    return model.parent / "no_such_model", ["no_such_model"]


RUN_CASES: list[RunCase] = [
    case_syntax_error, case_unknown_op, case_missing_input, case_extra_input, case_wrong_shape, case_integer_input,
    case_weight_bad_header, case_weight_truncated, case_weight_missing, case_blob_path_escapes, case_inputs_not_npz,
    case_inputs_npy_named_npz, case_inputs_file_missing, case_model_dir_missing,
]


@pytest.mark.parametrize("out_exists", [False, True], ids=["out-absent", "out-exists"])
@pytest.mark.parametrize("case", RUN_CASES, ids=lambda c: c.__name__[len("case_"):])
def test_run_bad_input_is_one_error_line_and_leaves_out_alone(model, tmp_path, case, out_exists):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=example_inputs())
    model_arg, fragments = case(model, inputs)
    out_file = tmp_path / "results" / "out.npz"
    if out_exists:
        out_file.parent.mkdir()
        out_file.write_bytes(b"previous results")
    before = snapshot(out_file.parent)
    assert_user_error(invoke("run", model_arg, "--inputs", inputs, "--out", out_file), *fragments)
    assert snapshot(out_file.parent) == before  # not created, not replaced, no temp file left


def test_run_needs_exactly_one_input_source(model, tmp_path):
    np.savez(tmp_path / "in.npz", x=example_inputs())
    out_file = tmp_path / "out.npz"
    assert_user_error(invoke("run", model, "--out", out_file), "--inputs", "--random-inputs")
    assert_user_error(invoke("run", model, "--inputs", tmp_path / "in.npz", "--random-inputs", "0", "--out", out_file))
    assert not out_file.exists()


# -- `orion compile`: bad input ---------------------------------------------------------------------------------------


def _graph_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "graph.py"
    path.write_text(body, encoding="utf-8")
    return path


COMPILE_CASES = {
    "graph-file-missing": (lambda tmp: (tmp / "absent.py", []), ["absent.py"]),
    "no-build": (lambda tmp: (_graph_file(tmp, "X = 1\n"), []), ["graph.py", "build()"]),
    "build-raises": (lambda tmp: (_graph_file(tmp, "def build():\n    raise RuntimeError('boom')\n"), []),
                     ["graph.py", "boom"]),
    "build-raises-multiline-message": (
        lambda tmp: (_graph_file(tmp, "def build():\n    raise ValueError('first line\\nsecond line')\n"), []),
        ["graph.py", "first line"]),
    "graph-file-python-syntax-error": (lambda tmp: (_graph_file(tmp, "def build(:\n"), []), ["graph.py"]),
    "unknown-target": (lambda tmp: (EXAMPLE, ["--target", "m99"]), ["m99"]),
    # Paths are the user's text, not markup: brackets in a folder name must come back verbatim.
    "bracketed-folder": (lambda tmp: (tmp / "[draft]" / "absent.py", []), ["[draft]"]),
    "bracketed-closing-folder": (lambda tmp: (tmp / "[/draft]" / "absent.py", []), ["[/draft]"]),
}


@pytest.mark.parametrize("out_exists", [False, True], ids=["out-absent", "out-exists"])
@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compile_bad_input_is_one_error_line_and_leaves_out_alone(tmp_path, name, out_exists):
    make, fragments = COMPILE_CASES[name]
    graph, extra = make(tmp_path)
    out_dir = tmp_path / "out"
    if out_exists:
        (out_dir / "weights").mkdir(parents=True)
        (out_dir / "model.mil").write_text("previous program\n")
        (out_dir / "weights" / "w.bin").write_bytes(b"previous weights")
    before = snapshot(out_dir)
    assert_user_error(invoke("compile", graph, "--out", out_dir, *extra), *fragments)
    assert snapshot(out_dir) == before


def test_targets_and_check_refuse_an_unknown_target(model):
    assert_user_error(invoke("targets", "m99"), "m99")
    assert_user_error(invoke("check", model, "--target", "m99"), "m99")


def test_check_reports_a_syntax_error_with_line_and_column(model):
    text, at = _edit_mil(model, "= mul(", "= mul((")
    line, column = line_and_column(text, at + len("= mul("))
    assert_user_error(invoke("check", model), f"line {line}, column {column}")


def test_check_of_a_missing_path_is_a_user_error(tmp_path):
    assert_user_error(invoke("check", tmp_path / "absent.mil"), "absent.mil")


# -- `orion check` on hand-written MIL that breaks catalog rules --------------------------------------------------

MATMUL_MIL = """program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 1, 32, 32]> a, tensor<fp16, [1, 1, 32, 32]> b) {
        bool tx = const()[name=string("tx"), val=bool(false)];
        bool ty = const()[name=string("ty"), val=bool(true)];
        tensor<fp16, [1, 1, 32, 32]> y = matmul(transpose_x=tx, transpose_y=TY, x=a, y=b)[name=string("y")];
    } -> (y);
}
"""

CONV_MIL = """program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 2, 1, 32]> x) {
        string pt = const()[name=string("pt"), val=string("valid")];
        tensor<int32, [2]> st = const()[name=string("st"), val=tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name=string("pd"), val=tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name=string("dl"), val=tensor<int32, [2]>([1, 1])];
        int32 gr = const()[name=string("gr"), val=int32(1)];
        tensor<fp16, [2, 2, 1, 1]> w = const()[name=string("w"), val=tensor<fp16, [2, 2, 1, 1]>([1, 0, 0, 1])];
        tensor<fp16, [2]> bs = const()[name=string("bs"), val=tensor<fp16, [2]>([0.5, -0.5])];
        tensor<fp16, [1, 2, 1, 32]> y = conv(BIASdilations=dl, groups=gr, pad=pd, pad_type=pt, strides=st, weight=w, x=x)[name=string("y")];
    } -> (y);
}
"""

# (text with the rule broken, the same program obeying it, the rule's id)
HAND_WRITTEN = {
    "matmul-inline-transpose": (MATMUL_MIL.replace("TY", "bool(true)"), MATMUL_MIL.replace("TY", "ty"), "ANE-12"),
    "conv-bias": (CONV_MIL.replace("BIAS", "bias=bs, "), CONV_MIL.replace("BIAS", ""), "ANE-13"),
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_check_lists_the_rule_a_hand_written_program_breaks(tmp_path, name):
    broken, clean, cid = HAND_WRITTEN[name]
    path = tmp_path / "hand.mil"
    path.write_text(broken, encoding="utf-8")
    result = invoke("check", path)
    rows = assert_exit_matches_report(result)
    assert result.exit_code == 1
    assert (cid, "error") in rows, rows
    path.write_text(clean, encoding="utf-8")
    rows = assert_exit_matches_report(invoke("check", path))
    assert cid not in {c for c, _ in rows}, rows
