"""The emulator runs MIL text as other ANE tools write it, computes every listed op like numpy (within fp16), applies
ANE numerics inside programs, and refuses bad programs with a line number."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.errors import BindingError, MILProgramError
from orion.ir.builder import GraphBuilder
from orion.runtime.backends.emulator import load_program, load_text
from orion.runtime.backends.numerics import Numerics


@pytest.fixture(scope="module")
def ms():
    """coremltools' blob storage binding: only the test of a weight file written by coremltools needs it."""
    return pytest.importorskip("coremltools.libmilstoragepython")

# Verbose program(1.0) text in the style of maderix/ANE-era kernels: spaces inside brackets, variable names that
# differ from name= attributes, both weights in ONE file (written below by coremltools, not by Orion).
VERBOSE = """program(1.0)
[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios16>(tensor<fp16, [1, 4, 1, 32]> x) {
        tensor<string, []> pt = const()[name = tensor<string, []>("pt"), val = tensor<string, []>("valid")];
        tensor<int32, [2]> st = const()[name = tensor<string, []>("st"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name = tensor<string, []>("pd"), val = tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name = tensor<string, []>("dl"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, []> gr = const()[name = tensor<string, []>("gr"), val = tensor<int32, []>(1)];
        tensor<fp16, [8, 4, 1, 1]> W = const()[name = tensor<string, []>("W"), val = tensor<fp16, [8, 4, 1, 1]>(BLOBFILE(path = tensor<string, []>("@model_path/weights/pack.bin"), offset = tensor<uint64, []>(64)))];
        tensor<fp16, [1, 8, 1, 1]> B = const()[name = tensor<string, []>("B"), val = tensor<fp16, [1, 8, 1, 1]>(BLOBFILE(path = tensor<string, []>("@model_path/weights/pack.bin"), offset = tensor<uint64, []>(OFFSET)))];
        tensor<fp16, [1, 8, 1, 32]> yc = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, strides = st, weight = W, x = x)[name = tensor<string, []>("cv")];
        tensor<fp16, [1, 8, 1, 32]> yb = add(x = yc, y = B)[name = tensor<string, []>("bias")];
        tensor<bool, []> tx = const()[name = tensor<string, []>("tx"), val = tensor<bool, []>(false)];
        tensor<bool, []> ty = const()[name = tensor<string, []>("ty"), val = tensor<bool, []>(true)];
        tensor<int32, [4]> rows = const()[name = tensor<string, []>("rows"), val = tensor<int32, [4]>([1, 1, 8, 32])];
        tensor<fp16, [1, 1, 8, 32]> yr = reshape(shape = rows, x = yb)[name = tensor<string, []>("rs")];
        tensor<fp16, [1, 1, 8, 8]> g = matmul(transpose_x = tx, transpose_y = ty, x = yr, y = yr)[name = tensor<string, []>("gram")];
        tensor<fp16, [1, 1, 8, 8]> out = relu(x = g)[name = tensor<string, []>("r")];
    } -> (out);
}
"""


def test_runs_verbose_mil_with_two_blobs_in_one_file_written_by_coremltools(ms, tmp_path, rng):
    w = rng.normal(0, 0.5, (8, 4, 1, 1)).astype(np.float16)
    bias = rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float16)
    (tmp_path / "weights").mkdir()
    writer = ms._BlobStorageWriter(str(tmp_path / "weights/pack.bin"), truncate_file=True)
    assert writer.write_fp16_data(w.reshape(-1).view(np.uint16)) == 64
    offset = writer.write_fp16_data(bias.reshape(-1).view(np.uint16))
    del writer
    text = VERBOSE.replace("OFFSET", str(offset))
    x = rng.normal(0, 1, (1, 4, 1, 32)).astype(np.float16)
    got = load_text(text, tmp_path).run({"x": x})["out"].astype(np.float64)

    y = np.einsum("oi,is->os", w[:, :, 0, 0].astype(np.float64), x[0, :, 0, :].astype(np.float64))
    y = (y.astype(np.float16).astype(np.float64) + bias[0, :, 0, :]).astype(np.float16).astype(np.float64)
    assert got.shape == (1, 1, 8, 8)
    gram = np.maximum(y @ y.T, 0)
    np.testing.assert_allclose(got[0, 0], gram, rtol=4e-3, atol=4e-3)


OPS_PROGRAM = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> a, tensor<fp32, [1, 4, 1, 8]> b) {
        string f16 = const()[name=string("f16"), val=string("fp16")];
        tensor<fp16, [1, 4, 1, 8]> b16 = cast(dtype=f16, x=b)[name=string("b16")];
        tensor<fp16, [1, 4, 1, 8]> s = sub(x=a, y=b16)[name=string("s")];
        tensor<fp16, [1, 4, 1, 8]> m = mul(x=a, y=b16)[name=string("m")];
        tensor<fp16, [1, 4, 1, 8]> ab = relu(x=a)[name=string("ab")];
        fp16 half = const()[name=string("half"), val=fp16(0.5)];
        tensor<fp16, [1, 4, 1, 8]> p = pow(x=ab, y=half)[name=string("p")];
        tensor<fp16, [1, 4, 1, 8]> sq = sqrt(x=ab)[name=string("sq")];
        tensor<fp16, [1, 4, 1, 8]> e = exp(x=a)[name=string("e")];
        tensor<fp16, [1, 4, 1, 8]> th = tanh(x=a)[name=string("th")];
        tensor<fp16, [1, 4, 1, 8]> sg = sigmoid(x=a)[name=string("sg")];
        tensor<fp16, [1, 4, 1, 8]> sl = silu(x=a)[name=string("sl")];
        string md = const()[name=string("md"), val=string("TANH_APPROXIMATION")];
        tensor<fp16, [1, 4, 1, 8]> ge = gelu(mode=md, x=a)[name=string("ge")];
        tensor<int32, [1]> ax1 = const()[name=string("ax1"), val=tensor<int32, [1]>([1])];
        bool kd = const()[name=string("kd"), val=bool(true)];
        tensor<fp16, [1, 1, 1, 8]> rs = reduce_sum(axes=ax1, keep_dims=kd, x=a)[name=string("rs")];
        tensor<fp16, [1, 1, 1, 8]> rm = reduce_mean(axes=ax1, keep_dims=kd, x=a)[name=string("rm")];
        tensor<fp16, [1, 1, 1, 8]> rx = reduce_max(axes=ax1, keep_dims=kd, x=a)[name=string("rx")];
        int32 lastax = const()[name=string("lastax"), val=int32(-1)];
        tensor<fp16, [1, 4, 1, 8]> sm = softmax(axis=lastax, x=a)[name=string("sm")];
        tensor<int32, [4]> shp = const()[name=string("shp"), val=tensor<int32, [4]>([1, 4, 8, 1])];
        tensor<fp16, [1, 4, 8, 1]> rsh = reshape(shape=shp, x=a)[name=string("rsh")];
        tensor<int32, [4]> pm = const()[name=string("pm"), val=tensor<int32, [4]>([0, 3, 2, 1])];
        tensor<fp16, [1, 8, 1, 4]> tr = transpose(perm=pm, x=a)[name=string("tr")];
        tensor<int32, [4]> bg = const()[name=string("bg"), val=tensor<int32, [4]>([0, 1, 0, 2])];
        tensor<int32, [4]> en = const()[name=string("en"), val=tensor<int32, [4]>([1, 3, 1, 8])];
        tensor<fp16, [1, 2, 1, 6]> si = slice_by_index(begin=bg, end=en, x=a)[name=string("si")];
        tensor<int32, [4]> sz = const()[name=string("sz"), val=tensor<int32, [4]>([1, 2, 1, -1])];
        tensor<fp16, [1, 2, 1, 6]> ss = slice_by_size(begin=bg, size=sz, x=a)[name=string("ss")];
        bool il = const()[name=string("il"), val=bool(false)];
        tensor<fp16, [1, 8, 1, 8]> cc = concat(axis=ax1c, interleave=il, values=(a, b16))[name=string("cc")];
        bool tt = const()[name=string("tt"), val=bool(true)];
        bool ff = const()[name=string("ff"), val=bool(false)];
        tensor<fp16, [1, 4, 8, 8]> mt = matmul(transpose_x=tt, transpose_y=tt, x=rsh2, y=rsh)[name=string("mt")];
        fp32 two = const()[name=string("two"), val=fp32(2)];
        tensor<fp32, [1, 4, 1, 8]> b2 = mul(x=b, y=two)[name=string("b2")];
    } -> (s, m, p, sq, e, th, sg, sl, ge, rs, rm, rx, sm, rsh, tr, si, ss, cc, mt, b2);
}
"""
OPS_PROGRAM = OPS_PROGRAM.replace(
    '        tensor<fp16, [1, 8, 1, 8]> cc',
    '        int32 ax1c = const()[name=string("ax1c"), val=int32(1)];\n        tensor<fp16, [1, 8, 1, 8]> cc',
).replace(
    '        bool tt',
    '        tensor<int32, [4]> shp2 = const()[name=string("shp2"), val=tensor<int32, [4]>([1, 4, 1, 8])];\n'
    '        tensor<fp16, [1, 4, 1, 8]> rsh2 = reshape(shape=shp2, x=a)[name=string("rsh2")];\n        bool tt',
)


def test_every_listed_op_matches_numpy(tmp_path, rng):
    a = rng.normal(0, 1, (1, 4, 1, 8)).astype(np.float16)
    b = rng.normal(0, 1, (1, 4, 1, 8)).astype(np.float32)
    got = load_text(OPS_PROGRAM, tmp_path).run({"a": a, "b": b})
    A, B = a.astype(np.float64), b.astype(np.float16).astype(np.float64)
    sig = 1 / (1 + np.exp(-A))
    e = np.exp(A - A.max(-1, keepdims=True))
    expected = {
        "s": A - B, "m": A * B, "p": np.sqrt(np.maximum(A, 0)), "sq": np.sqrt(np.maximum(A, 0)), "e": np.exp(A),
        "th": np.tanh(A), "sg": sig, "sl": A * sig,
        "ge": 0.5 * A * (1 + np.tanh(math.sqrt(2 / math.pi) * (A + 0.044715 * A ** 3))),
        "rs": A.sum(1, keepdims=True), "rm": A.mean(1, keepdims=True), "rx": A.max(1, keepdims=True),
        "sm": e / e.sum(-1, keepdims=True), "rsh": A.reshape(1, 4, 8, 1), "tr": A.transpose(0, 3, 2, 1),
        "si": A[:, 1:3, :, 2:8], "ss": A[:, 1:3, :, 2:8], "cc": np.concatenate([A, B], axis=1),
        "mt": np.swapaxes(A.reshape(1, 4, 1, 8), -1, -2) @ np.swapaxes(A.reshape(1, 4, 8, 1), -1, -2),
        "b2": 2 * B,
    }
    assert set(got) == set(expected)
    assert got["b2"].dtype == np.float32 and got["s"].dtype == np.float16
    for key, ref in expected.items():
        np.testing.assert_allclose(got[key].astype(np.float64), ref, rtol=4e-3, atol=4e-3, err_msg=key)


def _single_op(tmp_path, body: str, inputs: str, outputs: str):
    text = (f'program(1.3)\n{{\n    func main<ios18>({inputs}) {{\n{body}\n    }} -> ({outputs});\n}}\n')
    return load_text(text, tmp_path)


def test_matmul_ceiling_and_nan_policy_inside_programs(tmp_path):
    body = """        bool f = const()[name=string("f"), val=bool(false)];
        tensor<fp16, [1, 1, 1, 1]> y = matmul(transpose_x=f, transpose_y=f, x=a, y=b)[name=string("y")];
        tensor<fp16, [1, 1, 32768, 1]> z = sub(x=b, y=b)[name=string("z")];"""
    prog = _single_op(tmp_path, body, "tensor<fp16, [1, 1, 1, 32768]> a, tensor<fp16, [1, 1, 32768, 1]> b",
                      "y, z")
    ones = np.ones((1, 1, 1, 32768), np.float32)
    out = prog.run({"a": ones, "b": np.ones((1, 1, 32768, 1), np.float32)})
    assert out["y"][0, 0, 0, 0] == np.inf  # 32768 >= 2^15: inf at the conv/matmul output (N4)
    fewer = ones.copy()
    fewer[..., 32759:] = 0
    assert prog.run({"a": fewer, "b": np.ones((1, 1, 32768, 1))})["y"][0, 0, 0, 0] == 32752  # largest finite
    nan_in = np.ones((1, 1, 32768, 1))
    nan_in[0] = np.nan
    z = prog.run({"a": ones, "b": nan_in})["z"]
    assert not np.isnan(z).any() and (z == 0).all()  # NaN input -> +inf; inf - inf -> +0 (N6)


def test_accumulator_setting_changes_small_products(tmp_path):
    body = """        bool f = const()[name=string("f"), val=bool(false)];
        tensor<fp16, [1, 1, 1, 1]> y = matmul(transpose_x=f, transpose_y=f, x=a, y=b)[name=string("y")];"""
    inputs = "tensor<fp16, [1, 1, 1, 64]> a, tensor<fp16, [1, 1, 64, 1]> b"
    feed = {"a": np.full((1, 1, 1, 64), 2.0 ** -9), "b": np.full((1, 1, 64, 1), 2.0 ** -9)}  # products 2^-18
    text = f'program(1.3)\n{{\n    func main<ios18>({inputs}) {{\n{body}\n    }} -> (y);\n}}\n'
    assert load_text(text, tmp_path).run(feed)["y"].item() == 0.0  # fixed-point grid 2^-16 drops them (N3)
    fp32 = load_text(text, tmp_path, Numerics(accumulator="fp32")).run(feed)["y"].item()
    assert fp32 == 64 * 2.0 ** -18


@pytest.mark.parametrize("body,message", [
    ('        tensor<fp16, [1, 4, 1, 8]> y = frobnicate(x=a)[name=string("y")];', "line 4 (frobnicate 'y'): unknown op 'frobnicate'"),
    ('        tensor<fp16, [1, 4, 1, 9]> y = exp(x=a)[name=string("y")];', "declared tensor<fp16, [1, 4, 1, 9]>"),
    ('        tensor<fp16, [1, 4, 1, 8]> y = exp(x=a, gamma=a)[name=string("y")];', "no parameter(s) ['gamma']"),
    ('        tensor<fp16, [1, 1, 1, 8]> y = reduce_sum(axes=a, x=a)[name=string("y")];', "must be a const"),
    ('        tensor<fp16, [1, 4, 1, 8]> y = add(x=a)[name=string("y")];', "missing input(s) ['y']"),
])
def test_bad_programs_are_refused_with_their_line(tmp_path, body, message):
    with pytest.raises(MILProgramError, match=None) as info:
        _single_op(tmp_path, body, "tensor<fp16, [1, 4, 1, 8]> a", "y")
    assert message in str(info.value)


def test_binding_errors_name_the_problem(tmp_path):
    prog = _single_op(tmp_path, '        tensor<fp16, [1, 4, 1, 8]> y = exp(x=a)[name=string("y")];',
                      "tensor<fp16, [1, 4, 1, 8]> a", "y")
    with pytest.raises(BindingError, match=r"missing input\(s\) \['a'\]"):
        prog.run({})
    with pytest.raises(BindingError, match=r"unexpected input\(s\) \['b'\]"):
        prog.run({"a": np.zeros((1, 4, 1, 8)), "b": np.zeros(1)})
    with pytest.raises(BindingError, match=r"shape \[1, 4, 8\]"):
        prog.run({"a": np.zeros((1, 4, 8))})
    with pytest.raises(BindingError, match="float array"):
        prog.run({"a": np.zeros((1, 4, 1, 8), dtype=np.int32)})


def test_missing_weight_file_and_escaping_paths(tmp_path):
    from orion.errors import UnsafePathError, WeightFileError

    const = ('        tensor<fp16, [1, 4, 1, 8]> w = const()[name=string("w"), val=tensor<fp16, [1, 4, 1, 8]>('
             'BLOBFILE(path=string("@model_path/PATH"), offset=uint64(64)))];\n'
             '        tensor<fp16, [1, 4, 1, 8]> y = add(x=a, y=w)[name=string("y")];')
    with pytest.raises(WeightFileError, match="not found"):
        _single_op(tmp_path, const.replace("PATH", "weights/nope.bin"), "tensor<fp16, [1, 4, 1, 8]> a", "y")
    with pytest.raises(UnsafePathError):
        _single_op(tmp_path, const.replace("PATH", "../outside.bin"), "tensor<fp16, [1, 4, 1, 8]> a", "y")


def test_load_program_reads_model_dir(tmp_path):
    (tmp_path / "model.mil").write_text(
        'program(1.3)\n{\n    func main<ios18>(tensor<fp16, [1, 2, 1, 2]> a) {\n'
        '        tensor<fp16, [1, 2, 1, 2]> y = tanh(x=a)[name=string("y")];\n    } -> (y);\n}\n')
    out = load_program(tmp_path).run({"a": np.full((1, 2, 1, 2), 0.5)})["y"]
    assert out.dtype == np.float16 and np.allclose(out, np.tanh(0.5), atol=1e-3)
    with pytest.raises(MILProgramError, match="no MIL program"):
        load_program(tmp_path / "absent")


@pytest.mark.parametrize(
    "begin, begin_mask, starts_inside",
    [
        ([0, 0, 0, 5], [False, False, False, True], False),  # a masked begin reads from 0 (the review's case)
        ([0, 0, 0, 5], [False, False, False, False], True),
        ([0, 0, 0, -64], [False, False, False, False], False),  # counted from the end of a 64-wide axis: offset 0
        ([0, 0, 0, -59], [False, False, False, False], True),
        ([0, 5, 0, 0], [False, False, False, False], False),  # another axis: no effect
    ],
)
def test_catalog_and_emulator_agree_on_the_m1_slice_rule(tmp_path, rng, begin, begin_mask, starts_inside):
    b = GraphBuilder("slice")
    x = b.input("x", (1, 32, 1, 64))
    b.output("y", b.slice_by_index(x, begin=begin, end=[0, 0, 0, 0], begin_mask=begin_mask, end_mask=[True] * 4))
    result = compile_graph(b.graph, target="m1")
    assert ("ANE-29" in [v.constraint for v in result.violations]) == starts_inside
    assert "ANE-29" not in [v.constraint for v in compile_graph(b.graph, target="m4").violations]
    result.module.write(tmp_path)
    data = rng.uniform(-8000, 8000, (1, 32, 1, 64)).astype(np.float16)
    got = load_text(result.module.text, tmp_path, Numerics(slice_offset_overflow=True)).run({"x": data})["y"]
    kept = data[tuple(slice(None if m else b_, None) for b_, m in zip(begin, begin_mask))]
    expected = np.where(np.abs(kept) > 4094, np.copysign(np.inf, kept), kept) if starts_inside else kept
    assert got.tolist() == expected.tolist()


def test_weights_read_only_by_matmul_are_held_once_and_others_keep_their_subnormals(tmp_path):
    """Flushing subnormals of conv/matmul constants at load (N9) replaces a constant only conv/matmul read; one
    that an elementwise op also reads keeps its subnormals there."""
    tiny = 2.0**-20  # an fp16 subnormal
    w = f"tensor<fp16, [1, 1, 4, 1]>([{tiny!r}, 1.0, 2.0, 3.0])"
    body = f"""        bool f = const()[name=string("f"), val=bool(false)];
        tensor<fp16, [1, 1, 4, 1]> shared = const()[name=string("shared"), val={w}];
        tensor<fp16, [1, 1, 4, 1]> only = const()[name=string("only"), val={w}];
        tensor<fp16, [1, 1, 1, 1]> y = matmul(transpose_x=f, transpose_y=f, x=a, y=only)[name=string("y")];
        tensor<fp16, [1, 1, 1, 1]> u = matmul(transpose_x=f, transpose_y=f, x=a, y=shared)[name=string("u")];
        tensor<fp16, [1, 1, 4, 1]> z = add(x=shared, y=shared)[name=string("z")];"""
    inputs = "tensor<fp16, [1, 1, 1, 4]> a"
    text = f'program(1.3)\n{{\n    func main<ios18>({inputs}) {{\n{body}\n    }} -> (y, u, z);\n}}\n'
    prog = load_text(text, tmp_path, Numerics(accumulator="fp32"))
    assert prog._consts["only"] is prog._wide_consts["only"]  # one copy of the weight
    assert prog._consts["shared"] is not prog._wide_consts["shared"]
    out = prog.run({"a": np.array([[[[2.0**14, 0, 0, 0]]]])})
    assert out["y"].item() == out["u"].item() == 0.0  # flushed before the product: 2**14 * 2**-20 would be 2**-6
    assert out["z"][0, 0, 0, 0] == 2 * tiny  # the elementwise op reads the subnormal


def test_programs_with_the_same_weights_hold_them_once(tmp_path):
    """A model's prefill and decode programs carry the same weights: loaded side by side, they share the held
    (and flushed) arrays, read-only; the arrays go with the last program that holds them."""
    import gc

    from orion.runtime.backends import emulator

    b = GraphBuilder("shared")
    x = b.input("x", (1, 8, 1, 4))
    w = np.random.default_rng(0).normal(0, 1, (6, 8)).astype(np.float32)
    b.output("y", b.linear(x, w, np.arange(6, dtype=np.float32), name="fc"))
    compile_graph(b.graph, "default").module.write(tmp_path)
    first, second = load_program(tmp_path), load_program(tmp_path)
    weights = [name for name, v in first._wide_consts.items() if v.size == w.size]
    assert weights and all(first._wide_consts[n] is second._wide_consts[n] for n in weights)
    assert all(not first._consts[n].flags.writeable for n in first._const_keys)
    data = np.ones((1, 8, 1, 4), np.float16)
    assert first.run({"x": data})["y"].tobytes() == second.run({"x": data})["y"].tobytes()
    before = len(emulator._HELD_CONSTANTS)
    del first, second
    gc.collect()
    assert len(emulator._HELD_CONSTANTS) < before


def _run_with_a_loaded_program(tmp_path, then: str) -> str:
    """Standard output of a fresh interpreter (temporary folder ``tmp_path``) that compiles and runs one program
    ``p`` on the emulator, leaves it loaded, then runs ``then``."""
    import subprocess
    import sys

    script = (
        "import os, sys, numpy as np\n"
        "from orion.ir.builder import GraphBuilder\n"
        "from orion.runtime.program import Program\n"
        "from orion.runtime.cache import ProgramCache\n"
        "b = GraphBuilder('left')\n"
        "b.output('y', b.linear(b.input('x', (1, 64, 1, 16)), np.full((64, 64), 0.01), name='fc'))\n"
        "p = Program.from_graph(b.graph, backend='emulator', cache=ProgramCache(None))\n"
        "p.run({'x': np.ones((1, 64, 1, 16))})\n"
    ) + then
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          check=True).stdout


def test_a_process_s_own_model_folder_goes_at_exit_with_models_never_released(tmp_path):
    """A program left loaded at exit (no close) leaves nothing in the temporary folder: the emulator's per-process
    folder is private, so it goes whole."""
    root, had_models = _run_with_a_loaded_program(
        tmp_path, "print(p.backend.root, list(p.backend.root.iterdir()) != [])\n").split()
    assert had_models == "True" and Path(root).parent == tmp_path
    assert not Path(root).exists()


def test_a_forked_child_exiting_leaves_its_parent_s_model_folder(tmp_path):
    """A child forked after the parent built a program runs the parent's exit hooks when it exits normally: the
    parent's folder (its loaded models) must stay."""
    out = _run_with_a_loaded_program(tmp_path, (
        "assert p.backend.root.exists()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print(p.backend.root.exists())\n"
    ))
    assert out.split() == ["True"]
