"""The emulator runs MIL programs and weight files as other tools write them (issue 12): files whose header miscounts
their blobs, and the spellings public programs use, each giving the same outputs as Orion's canonical spelling."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from orion.errors import MILProgramError, WeightFileError
from orion.mil.blob import write_blob_file
from orion.mil.emit import MILModule
from orion.runtime.backends.emulator import load_text

# Fused QKV in the style of public ANE kernels: three 1x1 convs over one input, their weights in ONE file (at the
# offsets given below), concatenated along channels.
FUSED_QKV = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 16]> x) {
        string pt = const()[name=string("pt"), val=string("valid")];
        tensor<int32, [2]> st = const()[name=string("st"), val=tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name=string("pd"), val=tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name=string("dl"), val=tensor<int32, [2]>([1, 1])];
        int32 gr = const()[name=string("gr"), val=int32(1)];
        tensor<fp16, [6, 4, 1, 1]> Wq = const()[name=string("Wq"), val=tensor<fp16, [6, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/QFILE"), offset=uint64(QOFF)))];
        tensor<fp16, [6, 4, 1, 1]> Wk = const()[name=string("Wk"), val=tensor<fp16, [6, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/KFILE"), offset=uint64(KOFF)))];
        tensor<fp16, [6, 4, 1, 1]> Wv = const()[name=string("Wv"), val=tensor<fp16, [6, 4, 1, 1]>(BLOBFILE(path=string("@model_path/weights/VFILE"), offset=uint64(VOFF)))];
        tensor<fp16, [1, 6, 1, 16]> q = conv(dilations=dl, groups=gr, pad=pd, pad_type=pt, strides=st, weight=Wq, x=x)[name=string("cq")];
        tensor<fp16, [1, 6, 1, 16]> k = conv(dilations=dl, groups=gr, pad=pd, pad_type=pt, strides=st, weight=Wk, x=x)[name=string("ck")];
        tensor<fp16, [1, 6, 1, 16]> v = conv(dilations=dl, groups=gr, pad=pd, pad_type=pt, strides=st, weight=Wv, x=x)[name=string("cv")];
        int32 ax = const()[name=string("ax"), val=int32(1)];
        bool il = const()[name=string("il"), val=bool(false)];
        tensor<fp16, [1, 18, 1, 16]> y = concat(axis=ax, interleave=il, values=(q, k, v))[name=string("cat")];
    } -> (y);
}
"""


def _fused_program(files: list[str], offsets: list[int]) -> str:
    text = FUSED_QKV
    for tag, name, offset in zip("QKV", files, offsets):
        text = text.replace(f"{tag}FILE", name).replace(f"{tag}OFF", str(offset))
    return text


def test_fused_qkv_reads_three_blobs_from_a_file_whose_header_says_one(tmp_path, rng):
    weights = [rng.normal(0, 0.5, (6, 4, 1, 1)).astype(np.float16) for _ in range(3)]
    x = rng.normal(0, 1, (1, 4, 1, 16)).astype(np.float16)
    (tmp_path / "weights").mkdir()
    fused = tmp_path / "weights/qkv.bin"
    offsets = write_blob_file(fused, weights)
    data = bytearray(fused.read_bytes())
    struct.pack_into("<I", data, 0, 1)  # as the public kernel's file says
    fused.write_bytes(bytes(data))
    text = _fused_program(["qkv.bin"] * 3, offsets)
    (tmp_path / "model.mil").write_text(text)
    got = load_text(text, tmp_path).run({"x": x})["y"]

    separate = tmp_path / "separate"
    (separate / "weights").mkdir(parents=True)
    for name, w in zip(["q.bin", "k.bin", "v.bin"], weights):
        write_blob_file(separate / "weights" / name, [w])
    want = load_text(_fused_program(["q.bin", "k.bin", "v.bin"], [64] * 3), separate).run({"x": x})["y"]
    np.testing.assert_array_equal(got, want)
    # and against numpy: each conv is a matmul over channels, rounded to fp16
    exact = np.concatenate([np.einsum("oi,is->os", w[:, :, 0, 0].astype(np.float64), x[0, :, 0].astype(np.float64))
                            for w in weights])
    np.testing.assert_allclose(got[0, :, 0].astype(np.float64), exact, rtol=2e-3, atol=2e-3)

    module = MILModule.read(tmp_path)  # reading the whole folder walks every record, not the header's count
    assert [a.tobytes() for a in module.weight_files["weights/qkv.bin"]] == [w.tobytes() for w in weights]


def test_damaged_record_in_a_shared_file_is_named(tmp_path, rng):
    weights = [rng.normal(0, 0.5, (6, 4, 1, 1)).astype(np.float16) for _ in range(3)]
    (tmp_path / "weights").mkdir()
    fused = tmp_path / "weights/qkv.bin"
    offsets = write_blob_file(fused, weights)
    data = bytearray(fused.read_bytes())
    struct.pack_into("<I", data, offsets[2], 0xCAFEF00D)
    fused.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=rf"weight file {fused}, offset {offsets[2]}: bad sentinel 0xCAFEF00D"):
        load_text(_fused_program(["qkv.bin"] * 3, offsets), tmp_path)


# One computation in Orion's canonical spelling: every literal a named const, every statement named.
CANONICAL = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x, tensor<fp16, [1, 4, 1, 8]> b) {
        fp16 floor = const()[name=string("floor"), val=fp16(0.000244140625)];
        tensor<fp16, [1, 4, 1, 8]> m = maximum(x=x, y=floor)[name=string("m")];
        fp16 scale = const()[name=string("scale"), val=fp16(-3.0)];
        tensor<fp16, [1, 4, 1, 8]> s = mul(x=b, y=scale)[name=string("s")];
        tensor<fp16, [1, 4, 1, 8]> a = add(x=m, y=s)[name=string("a")];
        tensor<int32, [4]> shape = const()[name=string("shape"), val=tensor<int32, [4]>([1, 4, 8, 1])];
        tensor<fp16, [1, 4, 8, 1]> r = reshape(shape=shape, x=a)[name=string("r")];
        tensor<int32, [4]> perm = const()[name=string("perm"), val=tensor<int32, [4]>([0, 1, 3, 2])];
        tensor<fp16, [1, 4, 1, 8]> t = transpose(perm=perm, x=r)[name=string("t")];
        tensor<int32, [1]> axes = const()[name=string("axes"), val=tensor<int32, [1]>([1])];
        bool keep = const()[name=string("keep"), val=bool(true)];
        tensor<fp16, [1, 1, 1, 8]> total = reduce_sum(axes=axes, keep_dims=keep, x=t)[name=string("total")];
        int32 axis = const()[name=string("axis"), val=int32(-1)];
        tensor<fp16, [1, 1, 1, 8]> y = softmax(axis=axis, x=total)[name=string("y")];
    } -> (y, t);
}
"""

# The same computation as other tools spell it: HEADER's program version and opset, inline hex-float operands,
# untyped lists, consts without a name, statements without [name = ...], verbose and short scalar types mixed.
FOREIGN = """HEADER
{
    func main<OPSET>(tensor<fp16, [1, 4, 1, 8]> x, tensor<fp16, [1, 4, 1, 8]> b) {
        tensor<fp16, [1, 4, 1, 8]> m = maximum(x = x, y = fp16(0x1p-12))[name = string("m")];
        tensor<fp16, [1, 4, 1, 8]> s = mul(x = b, y = tensor<fp16, []>(-0x1.8p+1));
        tensor<fp16, [1, 4, 1, 8]> a = add(x = m, y = s);
        tensor<fp16, [1, 4, 8, 1]> r = reshape(shape = [1, 4, 8, 1], x = a);
        tensor<int32, [4]> perm = const()[val = tensor<int32, [4]>([0, 1, 3, 2])];
        tensor<fp16, [1, 4, 1, 8]> t = transpose(perm = perm, x = r)[name = tensor<string, []>("t")];
        tensor<bool, []> keep = const()[val = tensor<bool, []>(true)];
        tensor<fp16, [1, 1, 1, 8]> total = reduce_sum(axes = [1], keep_dims = keep, x = t);
        int32 axis = const()[name = string("axis"), val = int32(-1)];
        tensor<fp16, [1, 1, 1, 8]> y = softmax(axis = axis, x = total);
    } -> (y, t);
}
"""

HEADERS = [
    ("program(1.3)", "ios18"),
    ("program(1.3)", "ios17"),
    ('program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", "3505.4.1"}})]',
     "ios16"),
    ("program(1.0)", "ios17"),
]


@pytest.mark.parametrize("header, opset", HEADERS)
def test_foreign_spellings_compute_what_the_canonical_spelling_does(tmp_path, rng, header, opset):
    foreign = FOREIGN.replace("HEADER", header).replace("OPSET", opset)
    x = rng.normal(0, 1, (1, 4, 1, 8)).astype(np.float16)
    b = rng.normal(0, 1, (1, 4, 1, 8)).astype(np.float16)
    want = load_text(CANONICAL, tmp_path).run({"x": x, "b": b})
    got = load_text(foreign, tmp_path).run({"x": x, "b": b})
    assert set(got) == {"y", "t"}
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])
    # and the computation is what it says, so an emulator that ignored an operand would be caught
    a = np.maximum(x.astype(np.float64), 2.0**-12) - 3.0 * b.astype(np.float64)
    np.testing.assert_allclose(got["t"].astype(np.float64), a, rtol=2e-3, atol=2e-3)
    total = a.sum(axis=1, keepdims=True)
    e = np.exp(total - total.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(got["y"].astype(np.float64), e / e.sum(axis=-1, keepdims=True), rtol=1e-2, atol=2e-3)


SEVERAL_RESULTS = """program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 8]> x) {
        RESULTS = OP(x = x);
        tensor<fp16, [1, 4, 1, 8]> y = relu(x = b);
    } -> (y);
}
"""


@pytest.mark.parametrize(
    "results, op, message",
    [
        ("tensor<fp16, [1, 4, 1, 8]> a, tensor<fp16, [1, 4, 1, 8]> b", "relu",
         r"line 4 \(relu 'a'\): relu gives one result, the statement declares 2 \(a, b\)"),
        ("(tensor<fp16, [1, 2, 1, 8]> a, tensor<fp16, [1, 2, 1, 8]> b)", "split",
         r"line 4 \(split 'a'\): split: attribute 'axis' is required"),
    ],
)
def test_statements_with_several_results_are_refused_by_name(tmp_path, results, op, message):
    """A statement whose op gives one result but which declares two, and a split missing its axis: each refused
    with its line, op and variable."""
    with pytest.raises(MILProgramError, match=message):
        load_text(SEVERAL_RESULTS.replace("RESULTS", results).replace("OP", op), tmp_path)
