"""Hand-written ANE programs in the spellings public ANE projects use, run on the emulator against numpy.

The programs are written here; only their spellings follow the public generators (facts read from maderix/ANE's
training generators and probes and mechramc/Orion's MIL codegen):

* weights as function inputs and 1x1 convs over ``[1, C, 1, S]`` (maderix's "weights as tensors" kernels): shapes
  without spaces (``[1,64,1,16]``), ops without ``[name=...]``, scalar shorthand consts (``fp16 eps = const()...``),
  RMSNorm as reduce_sum / pow(-0.5), several results concatenated into one output;
* ``program(1.0)`` / ``ios16`` probes: ``dict<tensor<string, []>, ...>`` build info, spaces around ``=``, a bare
  ``true`` operand (``transpose_y = true``), ``scaled_dot_product_attention(query = ..., key = ..., value = ...)``;
* codegen style: per-op prefixed conv consts (``c1_pt``), one BLOBFILE per weight at offset 64, ``%g`` scalars
  (``fp16(1e-05)``), a cast through a named dtype const, neg/sqrt/rsqrt/exp/tanh, slice_by_index without masks.

Each reference is numpy in float64 on the same fp16 values; every program must run and match (issue 12's goal).
"""

from __future__ import annotations

import numpy as np
import pytest

from orion.mil.blob import write_blob_file
from orion.runtime.backends.emulator import load_text

HEADER_13 = ('program(1.3)\n[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, '
             '{"coremlc-version", "3505.4.1"}, {"coremltools-component-milinternal", ""}, '
             '{"coremltools-version", "9.0"}})]\n{\n')
HEADER_10 = ('program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", '
             '"3505.4.1"}})]\n{\n')
CONV_PARAMS = """        string pt = const()[name=string("pt"), val=string("valid")];
        tensor<int32, [2]> st = const()[name=string("st"), val=tensor<int32, [2]>([1,1])];
        tensor<int32, [4]> pd = const()[name=string("pd"), val=tensor<int32, [4]>([0,0,0,0])];
        tensor<int32, [2]> dl = const()[name=string("dl"), val=tensor<int32, [2]>([1,1])];
        int32 gr = const()[name=string("gr"), val=int32(1)];
"""


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-2) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= rtol * max(1.0, np.abs(want).max()), f"max |emulator - numpy| = {err}"


def _f16(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float16)


def _rms_norm(x, w, eps):
    """x [1, C, 1, S] normalized over channels, times w [1, C, 1, 1]."""
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * w


def _conv1x1(w, x):
    return np.einsum("oi,nihs->nohs", w[:, :, 0, 0], x)


# -- 1. RMSNorm + SwiGLU FFN, weights as inputs ------------------------------------------------------------------

D, H, S = 32, 64, 16


def _ffn_text() -> str:
    return HEADER_13 + f"""    func main<ios18>(tensor<fp16, [1, {D}, 1, {S}]> x, tensor<fp16, [1,{D},1,1]> rw, tensor<fp16, [{H},{D},1,1]> Wg, tensor<fp16, [{D},{H},1,1]> Wd, tensor<fp16, [{H},{D},1,1]> Wu) {{
        tensor<fp16, [1,{D},1,{S}]> sq = mul(x=x,y=x);
        tensor<int32, [1]> rax = const()[name=string("rax"), val=tensor<int32, [1]>([1])];
        bool kd = const()[name=string("kd"), val=bool(true)];
        tensor<fp16, [1,1,1,{S}]> ss = reduce_sum(x=sq,axes=rax,keep_dims=kd);
        fp16 invd = const()[name=string("invd"), val=fp16(0.031250)];
        tensor<fp16, [1,1,1,{S}]> ms = mul(x=ss,y=invd);
        fp16 eps = const()[name=string("eps"), val=fp16(0.00001)];
        tensor<fp16, [1,1,1,{S}]> mse = add(x=ms,y=eps);
        fp16 nhalf = const()[name=string("nhalf"), val=fp16(-0.5)];
        tensor<fp16, [1,1,1,{S}]> rr = pow(x=mse,y=nhalf);
        tensor<fp16, [1,{D},1,{S}]> xr = mul(x=x,y=rr);
        tensor<fp16, [1,{D},1,{S}]> xn = mul(x=xr,y=rw);
{CONV_PARAMS}        tensor<fp16, [1,{H},1,{S}]> g = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=Wg,x=xn);
        tensor<fp16, [1,{H},1,{S}]> u = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=Wu,x=xn);
        tensor<fp16, [1,{H},1,{S}]> sg = sigmoid(x=g);
        tensor<fp16, [1,{H},1,{S}]> sl = mul(x=g,y=sg);
        tensor<fp16, [1,{H},1,{S}]> gu = mul(x=sl,y=u);
        tensor<fp16, [1,{D},1,{S}]> y = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=Wd,x=gu);
        int32 cax = const()[name=string("cax"), val=int32(1)];
        bool cil = const()[name=string("cil"), val=bool(false)];
        tensor<fp16, [1,{2 * D + H},1,{S}]> out = concat(axis=cax,interleave=cil,values=(y,xn,gu));
    }} -> (out);
}}
"""


def test_rmsnorm_swiglu_ffn_with_weights_as_inputs(tmp_path):
    rng = np.random.default_rng(11)
    inputs = {"x": _f16(rng, (1, D, 1, S)), "rw": (1 + 0.2 * rng.standard_normal((1, D, 1, 1))).astype(np.float16),
              "Wg": _f16(rng, (H, D, 1, 1), D ** -0.5), "Wd": _f16(rng, (D, H, 1, 1), H ** -0.5),
              "Wu": _f16(rng, (H, D, 1, 1), D ** -0.5)}
    got = load_text(_ffn_text(), tmp_path).run(inputs)["out"]
    x, rw, wg, wd, wu = (inputs[k].astype(np.float64) for k in ("x", "rw", "Wg", "Wd", "Wu"))
    xn = _rms_norm(x, rw, 1e-5)
    g, u = _conv1x1(wg, xn), _conv1x1(wu, xn)
    gu = g / (1 + np.exp(-g)) * u
    _assert_close(got, np.concatenate([_conv1x1(wd, gu), xn, gu], axis=1))


# -- 2. causal attention forward, maderix layout ---------------------------------------------------------------

HEADS, HD = 4, 8


def _attention_text() -> str:
    dim = HEADS * HD
    scale = 1 / np.sqrt(HD)
    return HEADER_13 + f"""    func main<ios18>(tensor<fp16, [1, {dim}, 1, {S}]> x, tensor<fp16, [{dim},{dim},1,1]> Wq, tensor<fp16, [{dim},{dim},1,1]> Wk, tensor<fp16, [{dim},{dim},1,1]> Wv, tensor<fp16, [1,1,{S},{S}]> cm) {{
{CONV_PARAMS}        tensor<fp16, [1,{dim},1,{S}]> qf = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=Wq,x=x);
        tensor<fp16, [1,{dim},1,{S}]> kf = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=Wk,x=x);
        tensor<fp16, [1,{dim},1,{S}]> vf = conv(dilations=dl,groups=gr,pad=pd,pad_type=pt,strides=st,weight=Wv,x=x);
        tensor<int32, [4]> hsh = const()[name=string("hsh"), val=tensor<int32, [4]>([1,{HEADS},{HD},{S}])];
        tensor<int32, [4]> pm = const()[name=string("pm"), val=tensor<int32, [4]>([0,1,3,2])];
        tensor<fp16, [1,{HEADS},{HD},{S}]> q4 = reshape(shape=hsh,x=qf);
        tensor<fp16, [1,{HEADS},{S},{HD}]> q = transpose(perm=pm,x=q4);
        tensor<fp16, [1,{HEADS},{HD},{S}]> k4 = reshape(shape=hsh,x=kf);
        tensor<fp16, [1,{HEADS},{S},{HD}]> k = transpose(perm=pm,x=k4);
        tensor<fp16, [1,{HEADS},{HD},{S}]> v4 = reshape(shape=hsh,x=vf);
        tensor<fp16, [1,{HEADS},{S},{HD}]> v = transpose(perm=pm,x=v4);
        bool fa = const()[name=string("fa"), val=bool(false)];
        bool tr = const()[name=string("tr"), val=bool(true)];
        tensor<fp16, [1,{HEADS},{S},{S}]> s1 = matmul(transpose_x=fa,transpose_y=tr,x=q,y=k);
        fp16 scv = const()[name=string("scv"), val=fp16({scale:f})];
        tensor<fp16, [1,{HEADS},{S},{S}]> s2 = mul(x=s1,y=scv);
        tensor<fp16, [1,{HEADS},{S},{S}]> s3 = add(x=s2,y=cm);
        int32 sax = const()[name=string("sax"), val=int32(-1)];
        tensor<fp16, [1,{HEADS},{S},{S}]> p = softmax(axis=sax,x=s3);
        tensor<fp16, [1,{HEADS},{S},{HD}]> a = matmul(transpose_x=fa,transpose_y=fa,x=p,y=v);
        tensor<fp16, [1,{HEADS},{HD},{S}]> at = transpose(perm=pm,x=a);
        tensor<int32, [4]> osh = const()[name=string("osh"), val=tensor<int32, [4]>([1,{dim},1,{S}])];
        tensor<fp16, [1,{dim},1,{S}]> out = reshape(shape=osh,x=at);
    }} -> (out);
}}
"""


def test_causal_attention_with_the_mask_as_an_input(tmp_path):
    rng = np.random.default_rng(12)
    dim = HEADS * HD
    mask = np.triu(np.full((S, S), -65504.0), 1).astype(np.float16)[None, None]  # fp16's -inf stand-in
    inputs = {"x": _f16(rng, (1, dim, 1, S)), "cm": mask,
              **{w: _f16(rng, (dim, dim, 1, 1), dim ** -0.5) for w in ("Wq", "Wk", "Wv")}}
    got = load_text(_attention_text(), tmp_path).run(inputs)["out"]
    x = inputs["x"].astype(np.float64)
    q, k, v = (_conv1x1(inputs[w].astype(np.float64), x).reshape(HEADS, HD, S).transpose(0, 2, 1)
               for w in ("Wq", "Wk", "Wv"))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(HD) + mask[0].astype(np.float64)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    _assert_close(got, (p @ v).transpose(0, 2, 1).reshape(1, dim, 1, S))


# -- 3. program(1.0) probes: spaces around '=', a bare true, sdpa by parameter name -------------------------------

def test_ios16_probes_with_bare_bool_operands_and_sdpa(tmp_path):
    rng = np.random.default_rng(13)
    text = HEADER_10 + f"""    func main<ios16>(tensor<fp16, [1, {HEADS}, {S}, {HD}]> q, tensor<fp16, [1, {HEADS}, {S}, {HD}]> k, tensor<fp16, [1, {HEADS}, {S}, {HD}]> v) {{
        tensor<fp16, [1, {HEADS}, {S}, {S}]> scores = matmul(x = q, y = k, transpose_y = true)[name = tensor<string, []>("qkt")];
        tensor<fp16, [1, {HEADS}, {S}, {HD}]> att = scaled_dot_product_attention(query = q, key = k, value = v)[name = tensor<string, []>("sdpa")];
    }} -> (scores, att);
}}
"""
    inputs = {n: _f16(rng, (1, HEADS, S, HD)) for n in "qkv"}
    got = load_text(text, tmp_path).run(inputs)
    q, k, v = (inputs[n].astype(np.float64)[0] for n in "qkv")
    scores = q @ k.transpose(0, 2, 1)
    _assert_close(got["scores"], scores[None])
    p = np.exp(scores / np.sqrt(HD) - (scores / np.sqrt(HD)).max(-1, keepdims=True))
    _assert_close(got["att"], (p / p.sum(-1, keepdims=True) @ v)[None])


# -- 4. codegen style: prefixed conv consts, one BLOBFILE per weight, casts and unary ops ------------------------

def test_codegen_style_program_with_blobfile_weights(tmp_path):
    rng = np.random.default_rng(14)
    c, s = 16, 32
    w1 = _f16(rng, (c, c, 1, 1), c ** -0.5)
    bias = _f16(rng, (1, c, 1, 1), 0.5)
    (tmp_path / "weights").mkdir()
    write_blob_file(tmp_path / "weights/c1_w.bin", [w1])
    write_blob_file(tmp_path / "weights/b1.bin", [bias])
    blob = 'BLOBFILE(path=string("@model_path/weights/{}.bin"), offset=uint64(64))'
    conv = "".join(f'        {t} c1_{n} = const()[name=string("c1_{n}"), val={v}];\n' for t, n, v in [
        ("string", "pt", 'string("valid")'), ("tensor<int32, [2]>", "st", "tensor<int32, [2]>([1,1])"),
        ("tensor<int32, [4]>", "pd", "tensor<int32, [4]>([0,0,0,0])"),
        ("tensor<int32, [2]>", "dl", "tensor<int32, [2]>([1,1])"), ("int32", "gr", "int32(1)")])
    text = HEADER_13 + f"""    func main<ios18>(tensor<fp16, [1,{c},1,{s}]> x) {{
        tensor<fp16, [{c},{c},1,1]> c1_w = const()[name=string("c1_w"), val=tensor<fp16, [{c},{c},1,1]>({blob.format("c1_w")})];
        tensor<fp16, [1,{c},1,1]> b1 = const()[name=string("b1"), val=tensor<fp16, [1,{c},1,1]>({blob.format("b1")})];
{conv}        tensor<fp16, [1,{c},1,{s}]> c1 = conv(dilations=c1_dl, groups=c1_gr, pad=c1_pd, pad_type=c1_pt, strides=c1_st, weight=c1_w, x=x)[name=string("c1")];
        tensor<fp16, [1,{c},1,{s}]> h = add(x=c1, y=b1)[name=string("h")];
        string up_dt = const()[name=string("up_dt"), val=string("fp32")];
        tensor<fp32, [1,{c},1,{s}]> up = cast(dtype=up_dt, x=h)[name=string("up")];
        string dn_dt = const()[name=string("dn_dt"), val=string("fp16")];
        tensor<fp16, [1,{c},1,{s}]> dn = cast(dtype=dn_dt, x=up)[name=string("dn")];
        tensor<int32, [1]> ax = const()[name=string("ax"), val=tensor<int32, [1]>([3])];
        bool m_kd = const()[name=string("m_kd"), val=bool(true)];
        tensor<fp16, [1,{c},1,1]> m = reduce_mean(x=dn, axes=ax, keep_dims=m_kd)[name=string("m")];
        tensor<fp16, [1,{c},1,1]> mx = reduce_max(x=dn, axes=ax, keep_dims=m_kd)[name=string("mx")];
        tensor<fp16, [1,{c},1,{s}]> dc = sub(x=dn, y=mx)[name=string("dc")];
        tensor<fp16, [1,{c},1,{s}]> e = exp(x=dc)[name=string("e")];
        tensor<fp16, [1,{c},1,{s}]> ng = neg(x=e)[name=string("ng")];
        fp16 two = const()[name=string("two"), val=fp16(2)];
        tensor<fp16, [1,{c},1,{s}]> sh = add(x=ng, y=two)[name=string("sh")];
        tensor<fp16, [1,{c},1,{s}]> rt = sqrt(x=sh)[name=string("rt")];
        fp16 eps = const()[name=string("eps"), val=fp16(1e-05)];
        tensor<fp16, [1,{c},1,1]> m2 = mul(x=m, y=m)[name=string("m2")];
        tensor<fp16, [1,{c},1,1]> m2e = add(x=m2, y=eps)[name=string("m2e")];
        tensor<fp16, [1,{c},1,1]> rs = rsqrt(x=m2e)[name=string("rs")];
        tensor<fp16, [1,{c},1,{s}]> t = tanh(x=rt)[name=string("t")];
        tensor<fp16, [1,{c},1,{s}]> y = mul(x=t, y=rs)[name=string("y")];
        tensor<int32, [4]> sb = const()[name=string("sb"), val=tensor<int32, [4]>([0,0,0,8])];
        tensor<int32, [4]> se = const()[name=string("se"), val=tensor<int32, [4]>([1,{c},1,24])];
        tensor<fp16, [1,{c},1,16]> out = slice_by_index(begin=sb, end=se, x=y)[name=string("out")];
        tensor<fp16, [1,{c},1,16]> out_id = identity(x=out)[name=string("out_id")];
    }} -> (out_id);
}}
"""
    x = _f16(rng, (1, c, 1, s))
    got = load_text(text, tmp_path).run({"x": x})["out_id"]
    h = _conv1x1(w1.astype(np.float64), x.astype(np.float64)) + bias
    m, mx = h.mean(3, keepdims=True), h.max(3, keepdims=True)
    y = np.tanh(np.sqrt(2 - np.exp(h - mx))) / np.sqrt(m * m + 1e-5)
    _assert_close(got, y[..., 8:24], rtol=2e-2)


@pytest.mark.parametrize("operand, value", [("true", True), ("false", False)])
def test_bare_bool_operand_is_a_bool_literal(tmp_path, operand, value):
    """``transpose_y = true`` means what ``transpose_y = bool(true)`` does, in both dialects' headers."""
    rng = np.random.default_rng(15)
    a, b = _f16(rng, (1, 4, 6)), _f16(rng, (1, 4, 6) if value else (1, 6, 4))
    shape = [1, 4, 4]
    text = HEADER_13 + f"""    func main<ios18>(tensor<fp16, [1,4,6]> a, tensor<fp16, {list(b.shape)}> b) {{
        tensor<fp16, {shape}> y = matmul(x = a, y = b, transpose_y = {operand});
    }} -> (y);
}}
"""
    got = load_text(text, tmp_path).run({"a": a, "b": b})["y"]
    b64 = b.astype(np.float64)
    _assert_close(got, a.astype(np.float64) @ (b64.transpose(0, 2, 1) if value else b64))
