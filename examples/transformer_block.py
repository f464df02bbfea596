"""A GPT-2-style transformer block in the ANE layout, with random weights: `orion compile` builds it with build().

    orion compile examples/transformer_block.py --out out/block
    orion run out/block --random-inputs 0 --out out/block/outputs.npz

Sizes come from the environment so the same file serves a quick demo and a GPT-2-sized compile:
ORION_D (channels, 768), ORION_HEADS (12), ORION_SEQ (sequence bucket, 64).
"""

import os

import numpy as np

from orion.ir.builder import GraphBuilder


def fold_norm(gamma, beta, weight, bias):
    """``W (gamma * n + beta) + c = (W gamma) n + (W beta + c)``: a LayerNorm's affine part moved into the linear
    layer after it, which saves two of the 16 weight tensors a program may have (catalog ANE-21)."""
    return weight * gamma[None, :], weight @ beta + bias


def add_block(b: GraphBuilder, x, d: int, heads: int, rng: np.random.Generator, mask=None):
    """One pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(.)); q, k and v come from one conv. 16 weight
    tensors, the limit: 8 for the linear layers, the causal mask, and 7 distinct scalars (LayerNorm's eps and -0.5
    exponent, the attention scale, the tanh GELU's four)."""
    def w(*shape):
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    seq = x.shape[3]
    ln_1 = 1.0 + w(d), w(d)
    qkv = b.linear(b.layer_norm(x, name="ln_1"), *fold_norm(*ln_1, w(3 * d, d), w(3 * d)), name="c_attn")
    q, k, v = (b.slice_by_index(qkv, begin=[0, i * d, 0, 0], end=[1, (i + 1) * d, 1, seq], name=n)
               for i, n in enumerate("qkv"))
    a = b.attention(q, k, v, heads=heads, mask=mask, name="attn")
    x = b.add(x, b.linear(a, w(d, d), w(d), name="c_proj"), name="res_1")
    ln_2 = 1.0 + w(d), w(d)
    fc = fold_norm(*ln_2, w(4 * d, d), w(4 * d))
    return b.add(x, b.gelu_mlp(b.layer_norm(x, name="ln_2"), *fc, w(d, 4 * d), w(d), name="mlp"), name="res_2")


def build(d: int | None = None, heads: int | None = None, seq: int | None = None, seed: int = 0):
    d = d or int(os.environ.get("ORION_D", 768))
    heads = heads or int(os.environ.get("ORION_HEADS", 12))
    seq = seq or int(os.environ.get("ORION_SEQ", 64))
    b = GraphBuilder("gpt2_block")
    x = b.input("x", (1, d, 1, seq))
    b.output("y", add_block(b, x, d, heads, np.random.default_rng(seed)))
    return b.graph
