"""The emulator runs MIL programs and weight files as other tools write them (issue 12): files whose header miscounts
their blobs, and the spellings public programs use, each giving the same outputs as Orion's canonical spelling."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from orion.errors import WeightFileError
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
