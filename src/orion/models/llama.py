"""A Llama-2 style decoder (llama2.c's "Stories" models) as ANE programs for training: RMSNorm, rotary position
embeddings, causal attention, SwiGLU.

One block is two programs that take every weight as an INPUT (so new weights after an optimizer step are a surface
write, never a compile): ``forward`` (x -> y, plus the activations the backward pass needs) and ``backward``
(dy and those activations -> dx, plus the activation gradients the CPU turns into weight gradients with float32
BLAS). Layout is the ANE's ``[1, C, 1, S]``; a linear layer with an input weight ``[1, 1, O, I]`` is a matmul.

Rotary embeddings without concat (which some chips reject): each head's channels split into the halves that
``rotate_half`` pairs, so the q and k projections are done as two half-size projections (rows of Wq gathered per
half on the CPU), rotated as ``(a, b) -> (a cos - b sin, b cos + a sin)``, and the attention scores are the sum of
the two halves' products.

LoRA adapters are more inputs (``lora_{target}_a`` and ``_b``; q and k, split in halves, take ``_b1`` and ``_b2``):
the forward program adds ``B (A x)`` to each adapted projection, the backward program adds ``A^T B^T dy`` to the
gradient at its input, and the CPU computes the adapter's gradients from the taps (:func:`lora_gradients`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from orion.compiler.passes import WeightCompression
from orion.errors import OrionError
from orion.ir.builder import GraphBuilder
from orion.ir.graph import Value
from orion.lora import Adapter, AdapterSpec, LoraLayout
from orion.models.lm import AdapterHost, GenerationStats, TextGenerator, check_token_ids


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise OrionError(f"dim {self.dim} must split into {self.n_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # llama2.c's stories110M: 12 layers, d 768, 12 heads, SwiGLU hidden 2048, vocab 32000, seq 256
    "stories110m": LlamaConfig(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=256),
    # about 1M parameters: tests and the demo
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=192, vocab_size=2048, max_seq_len=128),
}

LAYER_WEIGHTS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


def init_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """llama2.c-style initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers), norms at 1.
    Names: ``tok_embeddings``, ``layers.{i}.{wq,...}`` ([out, in]), ``norm``, ``output`` (absent when tied)."""
    rng = np.random.default_rng(seed)
    d, f = config.dim, config.hidden_dim
    std, proj_std = 0.02, 0.02 / np.sqrt(2 * config.n_layers)

    def normal(shape, s=std):
        return rng.normal(0.0, s, size=shape).astype(np.float32)

    w = {"tok_embeddings": normal((config.vocab_size, d))}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        w[p + "attention_norm"] = np.ones(d, np.float32)
        w[p + "wq"], w[p + "wk"], w[p + "wv"] = normal((d, d)), normal((d, d)), normal((d, d))
        w[p + "wo"] = normal((d, d), proj_std)
        w[p + "ffn_norm"] = np.ones(d, np.float32)
        w[p + "w1"], w[p + "w3"] = normal((f, d)), normal((f, d))
        w[p + "w2"] = normal((d, f), proj_std)
    w["norm"] = np.ones(d, np.float32)
    if not config.tie_embeddings:
        w["output"] = normal((config.vocab_size, d))
    return w


def rope_tables(config: LlamaConfig, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[1, 1, hd/2, S]`` for positions 0..S-1 (Hugging Face's rotate_half convention)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / config.head_dim)
    angles = np.outer(inv_freq, np.arange(seq, dtype=np.float64))  # [hd/2, S]
    return (np.cos(angles).reshape(1, 1, half, seq).astype(np.float32),
            np.sin(angles).reshape(1, 1, half, seq).astype(np.float32))


def half_rows(w: np.ndarray, config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a q/k projection ``[d, d]`` for the first and the second half of every head's channels."""
    hd, half = config.head_dim, config.head_dim // 2
    heads = w.reshape(config.n_heads, hd, -1)
    return (np.ascontiguousarray(heads[:, :half].reshape(config.n_heads * half, -1)),
            np.ascontiguousarray(heads[:, half:].reshape(config.n_heads * half, -1)))


def join_halves(first: np.ndarray, second: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Inverse of :func:`half_rows` along axis 0 (for gradients ``[d/2, ...]`` of each half)."""
    half = config.head_dim // 2
    a = first.reshape(config.n_heads, half, -1)
    b = second.reshape(config.n_heads, half, -1)
    return np.concatenate([a, b], axis=1).reshape(config.dim, -1)


#: The names of a block's weights as program inputs (:func:`layer_inputs`).
LAYER_INPUTS = ("g_attn", "g_ffn", "wq_a", "wq_b", "wk_a", "wk_b", "wv", "wo", "w1", "w3", "w2")


def layer_inputs(weights: dict[str, np.ndarray], layer: int, config: LlamaConfig) -> dict[str, np.ndarray]:
    """A block's weights as the programs' inputs: matmul form ``[1, 1, O, I]``, norm gains ``[1, 1, 1, d]`` (a row:
    its bytes are a multiple of 64, so packed and 64-byte-aligned reads agree, ANE-35)."""
    p = f"layers.{layer}."
    d, f = config.dim, config.hidden_dim
    qa, qb = half_rows(weights[p + "wq"], config)
    ka, kb = half_rows(weights[p + "wk"], config)
    return {
        "g_attn": weights[p + "attention_norm"].reshape(1, 1, 1, d),
        "g_ffn": weights[p + "ffn_norm"].reshape(1, 1, 1, d),
        "wq_a": qa.reshape(1, 1, d // 2, d), "wq_b": qb.reshape(1, 1, d // 2, d),
        "wk_a": ka.reshape(1, 1, d // 2, d), "wk_b": kb.reshape(1, 1, d // 2, d),
        "wv": weights[p + "wv"].reshape(1, 1, d, d), "wo": weights[p + "wo"].reshape(1, 1, d, d),
        "w1": weights[p + "w1"].reshape(1, 1, f, d), "w3": weights[p + "w3"].reshape(1, 1, f, d),
        "w2": weights[p + "w2"].reshape(1, 1, d, f),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Adapters

#: Hugging Face module paths of the projections an adapter may target, by Orion's short target name.
LORA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
#: Targets whose output rows the programs split into the rotary halves.
_HALVED = ("q", "k")


def adapter_spec(config: LlamaConfig) -> AdapterSpec:
    d, f = config.dim, config.hidden_dim
    return AdapterSpec("llama", "model.layers", LORA_MODULES,
                       {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f),
                        "down": (f, d)}, config.n_layers, default_targets=("q", "v"),
                       aliases={"attn": ("q", "k", "v", "o"), "ffn": ("gate", "up", "down"),
                                "mlp": ("gate", "up", "down")})


def lora_inputs(adapter: Adapter | None, layout: LoraLayout, layer: int, config: LlamaConfig) -> dict[str, np.ndarray]:
    """One block's adapter inputs (zeros where ``adapter`` lacks a module): ``A [1, 1, R, in]`` and the scaled
    ``B [1, 1, out, R]`` (its rotary halves for q and k), with R the layout's rank."""
    spec, r = adapter_spec(config), layout.rank
    values = {}
    for target in layout.targets:
        fan_in, fan_out = spec.features[target]
        a, b = layout.slot(adapter, layer, target, spec)
        values[f"lora_{target}_a"] = a.reshape(1, 1, r, fan_in)
        if target in _HALVED:
            for part, rows in zip(("b1", "b2"), half_rows(b, config)):
                values[f"lora_{target}_{part}"] = rows.reshape(1, 1, fan_out // 2, r)
        else:
            values[f"lora_{target}_b"] = b.reshape(1, 1, fan_out, r)
    return values


def lora_gradients(adapter: Adapter, layer: int, config: LlamaConfig, taps: dict[str, np.ndarray],
                   grads: dict[str, np.ndarray], dy: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of one block's adapter modules on the CPU, from each adapted projection's input ``x`` (a forward
    tap) and the gradient ``d`` at its output (a backward output): with ``u = A x``, ``dB = s d u^T`` and
    ``dA = s (B^T d) x^T``. Names as :meth:`Adapter.to_arrays`."""
    def cols(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).reshape(-1, a.shape[-1])

    inputs = {"q": "t_n1", "k": "t_n1", "v": "t_n1", "o": "t_o", "gate": "t_n2", "up": "t_n2", "down": "t_g"}
    outputs = {"q": lambda: join_halves(cols(grads["d_q1"]), cols(grads["d_q2"]), config),
               "k": lambda: join_halves(cols(grads["d_k1"]), cols(grads["d_k2"]), config),
               "v": lambda: cols(grads["d_v"]), "o": lambda: cols(grads["d_h"]), "gate": lambda: cols(grads["d_a"]),
               "up": lambda: cols(grads["d_u"]), "down": lambda: cols(dy)}
    out = {}
    for (i, target), m in adapter.modules.items():
        if i != layer:
            continue
        x, d = cols(taps[inputs[target]]), outputs[target]()
        out[f"layers.{i}.{target}.lora_B"] = m.scale * (d @ (m.a @ x).T)
        out[f"layers.{i}.{target}.lora_A"] = m.scale * ((m.b.T @ d) @ x.T)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Graph pieces


class _Block:
    """Builds one block's programs; inputs are declared as they are first used. With ``baked`` (one layer's
    :func:`layer_inputs`) the weights are constants named after ``layer`` instead of inputs, and each linear layer
    is a 1x1 conv: an inference program. The graph functions name values by scope (``with builder.scope("ffn")``),
    the ops inside take their default names."""

    def __init__(self, name: str, config: LlamaConfig, seq: int, lora: LoraLayout | None = None,
                 baked: dict[str, np.ndarray] | None = None, layer: int = 0):
        self.builder = GraphBuilder(name)
        self.config = config
        self.seq = seq
        self.lora = lora
        # Baked weights are made here, outside any scope, so that each keeps its name (its weight file's), distinct
        # per layer (each layer's program is its own compile); in conv form: gains [1, d, 1, 1], matrices [O, I, 1, 1].
        self.consts = None if baked is None else {
            name: self.builder.weight(f"l{layer:02d}_{name}", w.reshape(1, -1, 1, 1) if name.startswith("g_")
                                      else w.reshape(*w.shape[2:], 1, 1))
            for name, w in baked.items()}
        self._down: dict[str, Value] = {}

    def adapts(self, target: str) -> bool:
        return self.lora is not None and target in self.lora.targets

    def adapted(self, y: Value, x: Value, target: str, part: str = "b") -> Value:
        """``y`` plus the adapter path ``B (A x)`` of ``target`` when the layout adapts it (``A x`` shared by the
        two halves of q and k)."""
        if not self.adapts(target):
            return y
        b, rank = self.builder, self.lora.rank
        if target not in self._down:
            a = b.input(f"lora_{target}_a", (1, 1, rank, x.shape[1]))
            self._down[target] = b.lora_down(x, a, name=f"lora_{target}")
        w = b.input(f"lora_{target}_{part}", (1, 1, y.shape[1], rank))
        return b.add(y, b.lora_up(self._down[target], w, name=f"lora_{target}_{part}"))

    def adapted_back(self, dx: Value, target: str, grads: list[tuple[Value, str]]) -> Value:
        """``dx`` plus the adapter's share of the gradient at its input: ``A^T sum_p(B_p^T d_p)``."""
        if not self.adapts(target):
            return dx
        b, rank = self.builder, self.lora.rank
        with b.scope(f"lora_{target}"):
            du = None
            for d, part in grads:
                w = b.input(f"lora_{target}_{part}", (1, 1, d.shape[1], rank))
                rows = b.reshape(d, shape=[1, 1, d.shape[1], self.seq])
                t = b.matmul(w, rows, transpose_x=True, transpose_y=False)
                du = t if du is None else b.add(du, t)
            a = b.input(f"lora_{target}_a", (1, 1, rank, dx.shape[1]))
            back = b.matmul(a, du, transpose_x=True, transpose_y=False)
            return b.add(dx, b.reshape(back, shape=[1, dx.shape[1], 1, self.seq]))

    def weight(self, name: str, rows: int, cols: int) -> Value:
        """A linear layer's weight: an input ``[1, 1, rows, cols]``, or the baked constant."""
        if self.consts is not None:
            return self.consts[name]
        return self.builder.input(name, (1, 1, rows, cols))

    def gain(self, name: str) -> Value:
        """A norm's gain as ``[1, d, 1, 1]``: the baked constant, or an input row ``[1, 1, 1, d]`` reshaped."""
        if self.consts is not None:
            return self.consts[name]
        d = self.config.dim
        return self.builder.reshape(self.builder.input(name, (1, 1, 1, d)), shape=[1, d, 1, 1])

    def linear(self, x: Value, w: Value, transpose: bool = False) -> Value:
        """``W x`` (or ``W^T x``) for ``x [1, I, 1, S]`` and an input weight ``[1, 1, O, I]`` (a baked ``[O, I, 1,
        1]`` weight: a 1x1 conv)."""
        b = self.builder
        if self.consts is not None:
            return b.conv(x=x, weight=w)
        rows = b.reshape(x, shape=[1, 1, x.shape[1], self.seq])
        out = b.matmul(w, rows, transpose_x=transpose, transpose_y=False)
        return b.reshape(out, shape=[1, out.shape[2], 1, self.seq])

    def project(self, x: Value, target: str, weight: str, rows: int, part: str = "b") -> Value:
        """``target``'s projection of ``x`` by the weight called ``weight`` (``rows`` outputs), plus its adapter."""
        return self.adapted(self.linear(x, self.weight(weight, rows, x.shape[1])), x, target, part)

    def heads(self, t: Value) -> Value:
        """``[1, H*k, 1, S] -> [1, H, k, S]``."""
        n_heads = self.config.n_heads
        return self.builder.reshape(t, shape=[1, n_heads, t.shape[1] // n_heads, self.seq])

    def flat(self, t: Value) -> Value:
        """``[1, H, k, S] -> [1, H*k, 1, S]``."""
        return self.builder.reshape(t, shape=[1, t.shape[1] * t.shape[2], 1, self.seq])

    def rotate(self, a: Value, c: Value, cos: Value, sin: Value, inverse: bool = False) -> tuple[Value, Value]:
        """Rotary embedding of the two halves of every head: ``(a cos - c sin, c cos + a sin)``; ``inverse`` turns
        the other way, ``(a cos + c sin, c cos - a sin)`` (the transpose: how a gradient goes back)."""
        b = self.builder
        first, second = (b.add, b.sub) if inverse else (b.sub, b.add)
        return first(b.mul(a, cos), b.mul(c, sin)), second(b.mul(c, cos), b.mul(a, sin))

    def rms(self, x: Value) -> tuple[Value, Value]:
        """``x_hat = x * r`` with ``r = (mean(x^2) + eps)^-1/2`` over channels; returns (x_hat, r)."""
        b = self.builder
        mean_square = b.reduce_mean(b.mul(x, x), axes=[1], keep_dims=True)
        r = b.pow(b.add(mean_square, self.config.norm_eps), -0.5)
        return b.mul(x, r), r

    def rms_backward(self, d_hat: Value, x_hat: Value, r: Value) -> Value:
        """``dx = r * (d_hat - x_hat * mean(x_hat * d_hat))``."""
        b = self.builder
        m = b.reduce_mean(b.mul(x_hat, d_hat), axes=[1], keep_dims=True)
        return b.mul(r, b.sub(d_hat, b.mul(x_hat, m)))


def forward_graph(config: LlamaConfig, seq: int, lora: LoraLayout | None = None,
                  baked: dict[str, np.ndarray] | None = None, layer: int = 0):
    """One block forward. Inputs: x, cos, sin, mask, the weights (and ``lora``'s adapter inputs). Outputs: y and the
    backward pass's taps. With ``baked`` (layer ``layer``'s :func:`layer_inputs`): the weights are constants and y
    is the only output, for inference."""
    blk = _Block(f"llama_fwd{seq}", config, seq, lora, baked, layer)
    b, d, f, half = blk.builder, config.dim, config.hidden_dim, config.dim // 2
    x = b.input("x", (1, d, 1, seq))
    cos = b.input("cos", (1, 1, config.head_dim // 2, seq))
    sin = b.input("sin", (1, 1, config.head_dim // 2, seq))
    mask = b.input("mask", (1, 1, seq, seq))
    with b.scope("attn_norm"):
        x_hat1, r1 = blk.rms(x)
        n1 = b.mul(x_hat1, blk.gain("g_attn"))
    with b.scope("q"):  # q and k in the halves rotate_half pairs: [1, H, hd/2, S] each
        q1, q2 = (blk.heads(blk.project(n1, "q", w, half, part)) for w, part in (("wq_a", "b1"), ("wq_b", "b2")))
    with b.scope("k"):
        k1, k2 = (blk.heads(blk.project(n1, "k", w, half, part)) for w, part in (("wk_a", "b1"), ("wk_b", "b2")))
    with b.scope("rope"):
        qr1, qr2 = blk.rotate(q1, q2, cos, sin)
        kr1, kr2 = blk.rotate(k1, k2, cos, sin)
    with b.scope("v"):
        v = blk.heads(blk.project(n1, "v", "wv", d))  # [1, H, hd, S]
    with b.scope("attn"):
        scores = b.add(b.matmul(qr1, kr1, transpose_x=True, transpose_y=False),  # the sum of the halves' products
                       b.matmul(qr2, kr2, transpose_x=True, transpose_y=False))
        scores = b.add(b.mul(scores, 1.0 / np.sqrt(config.head_dim)), mask)
        p = b.softmax(scores, axis=-1)  # [1, H, S(query), S(key)]
        o = blk.flat(b.matmul(v, p, transpose_x=False, transpose_y=True))  # [1, d, 1, S]
    with b.scope("o"):
        h = b.add(x, blk.project(o, "o", "wo", d))
    with b.scope("ffn_norm"):
        x_hat2, r2 = blk.rms(h)
        n2 = b.mul(x_hat2, blk.gain("g_ffn"))
    with b.scope("ffn"):
        a = blk.project(n2, "gate", "w1", f)
        u = blk.project(n2, "up", "w3", f)
        g = b.mul(b.silu(a), u)
        y = b.add(h, blk.project(g, "down", "w2", d))
    taps = {"y": y, "t_xhat1": x_hat1, "t_r1": r1, "t_n1": n1, "t_qr1": qr1, "t_qr2": qr2, "t_kr1": kr1,
            "t_kr2": kr2, "t_v": v, "t_p": p, "t_o": o, "t_xhat2": x_hat2, "t_r2": r2, "t_n2": n2, "t_a": a,
            "t_u": u, "t_g": g}
    for name, value in (taps if baked is None else {"y": y}).items():
        b.output(name, value)
    return b.graph


#: Forward outputs the backward program reads (the rest stay on the CPU for weight gradients).
BACKWARD_TAPS = ("t_xhat1", "t_r1", "t_qr1", "t_qr2", "t_kr1", "t_kr2", "t_v", "t_p", "t_xhat2", "t_r2", "t_a",
                 "t_u")


def backward_graph(config: LlamaConfig, seq: int, lora: LoraLayout | None = None):
    """One block backward through activations. Inputs: dy, the taps, cos/sin, the weights (and ``lora``'s adapter
    inputs). Outputs: dx and the gradients at each linear layer's output (and at each norm's output) for the CPU's
    weight and adapter gradients."""
    blk = _Block(f"llama_bwd{seq}", config, seq, lora)
    b, d, f, half, H = blk.builder, config.dim, config.hidden_dim, config.dim // 2, config.n_heads
    hd2 = config.head_dim // 2
    dy = b.input("dy", (1, d, 1, seq))
    t = {name: b.input(name, shape) for name, shape in (
        ("t_xhat1", (1, d, 1, seq)), ("t_r1", (1, 1, 1, seq)), ("t_qr1", (1, H, hd2, seq)),
        ("t_qr2", (1, H, hd2, seq)), ("t_kr1", (1, H, hd2, seq)), ("t_kr2", (1, H, hd2, seq)),
        ("t_v", (1, H, config.head_dim, seq)), ("t_p", (1, H, seq, seq)), ("t_xhat2", (1, d, 1, seq)),
        ("t_r2", (1, 1, 1, seq)), ("t_a", (1, f, 1, seq)), ("t_u", (1, f, 1, seq)))}
    cos = b.input("cos", (1, 1, hd2, seq))
    sin = b.input("sin", (1, 1, hd2, seq))
    with b.scope("ffn"):
        dg = blk.adapted_back(blk.linear(dy, blk.weight("w2", d, f), transpose=True), "down", [(dy, "b")])
        sig = b.sigmoid(t["t_a"])
        silu = b.mul(t["t_a"], sig)
        dsilu = b.mul(sig, b.add(b.mul(t["t_a"], b.sub(1.0, sig)), 1.0))  # silu'(a) = sig(a) (1 + a (1 - sig(a)))
        da = b.mul(b.mul(dg, t["t_u"]), dsilu)
        du = b.mul(dg, silu)
        dn2 = b.add(blk.linear(da, blk.weight("w1", f, d), transpose=True),
                    blk.linear(du, blk.weight("w3", f, d), transpose=True))
        dn2 = blk.adapted_back(blk.adapted_back(dn2, "gate", [(da, "b")]), "up", [(du, "b")])
    with b.scope("ffn_norm"):
        dh = b.add(dy, blk.rms_backward(b.mul(dn2, blk.gain("g_ffn")), t["t_xhat2"], t["t_r2"]))
    with b.scope("o"):
        do = blk.linear(dh, blk.weight("wo", d, d), transpose=True)
        do = blk.heads(blk.adapted_back(do, "o", [(dh, "b")]))  # [1, H, hd, S]
    with b.scope("attn"):
        dp = b.matmul(do, t["t_v"], transpose_x=True, transpose_y=False)  # [1, H, S, S]
        dv = blk.flat(b.matmul(do, t["t_p"], transpose_x=False, transpose_y=False))
        rowdot = b.reduce_sum(b.mul(dp, t["t_p"]), axes=[3], keep_dims=True)
        ds = b.mul(b.mul(t["t_p"], b.sub(dp, rowdot)), 1.0 / np.sqrt(config.head_dim))
        dqr1 = b.matmul(t["t_kr1"], ds, transpose_x=False, transpose_y=True)
        dqr2 = b.matmul(t["t_kr2"], ds, transpose_x=False, transpose_y=True)
        dkr1 = b.matmul(t["t_qr1"], ds, transpose_x=False, transpose_y=False)
        dkr2 = b.matmul(t["t_qr2"], ds, transpose_x=False, transpose_y=False)
    with b.scope("rope"):
        dq1, dq2 = (blk.flat(g) for g in blk.rotate(dqr1, dqr2, cos, sin, inverse=True))
        dk1, dk2 = (blk.flat(g) for g in blk.rotate(dkr1, dkr2, cos, sin, inverse=True))
    with b.scope("qkv"):
        dn1 = blk.linear(dv, blk.weight("wv", d, d), transpose=True)
        for grad, w in ((dq1, "wq_a"), (dq2, "wq_b"), (dk1, "wk_a"), (dk2, "wk_b")):
            dn1 = b.add(dn1, blk.linear(grad, blk.weight(w, half, d), transpose=True))
        dn1 = blk.adapted_back(dn1, "v", [(dv, "b")])
        dn1 = blk.adapted_back(dn1, "q", [(dq1, "b1"), (dq2, "b2")])
        dn1 = blk.adapted_back(dn1, "k", [(dk1, "b1"), (dk2, "b2")])
    with b.scope("attn_norm"):
        dx = b.add(dh, blk.rms_backward(b.mul(dn1, blk.gain("g_attn")), t["t_xhat1"], t["t_r1"]))
    for name, value in (("dx", dx), ("d_h", dh), ("d_q1", dq1), ("d_q2", dq2), ("d_k1", dk1), ("d_k2", dk2),
                        ("d_v", dv), ("d_a", da), ("d_u", du), ("d_n1", dn1), ("d_n2", dn2)):
        b.output(name, value)
    return b.graph


def weight_gradients(layer: int, config: LlamaConfig, taps: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                     dy: np.ndarray) -> dict[str, np.ndarray]:
    """Weight gradients on the CPU (float32 BLAS) from the forward taps and the backward program's outputs:
    ``dW = d_out @ in^T`` summed over positions; a norm's gain gets ``sum(d_norm_out * x_hat)``."""
    def cols(a: np.ndarray) -> np.ndarray:  # [1, C, 1, S] (or [1, H, k, S]) -> [C, S] float32
        return np.asarray(a, np.float32).reshape(-1, a.shape[-1])

    p = f"layers.{layer}."
    n1, n2, o, g = cols(taps["t_n1"]), cols(taps["t_n2"]), cols(taps["t_o"]), cols(taps["t_g"])
    dq = join_halves(cols(grads["d_q1"]), cols(grads["d_q2"]), config)
    dk = join_halves(cols(grads["d_k1"]), cols(grads["d_k2"]), config)
    return {
        p + "wq": dq @ n1.T, p + "wk": dk @ n1.T, p + "wv": cols(grads["d_v"]) @ n1.T,
        p + "wo": cols(grads["d_h"]) @ o.T,
        p + "w1": cols(grads["d_a"]) @ n2.T, p + "w3": cols(grads["d_u"]) @ n2.T, p + "w2": cols(dy) @ g.T,
        p + "attention_norm": (cols(grads["d_n1"]) * cols(taps["t_xhat1"])).sum(-1),
        p + "ffn_norm": (cols(grads["d_n2"]) * cols(taps["t_xhat2"])).sum(-1),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Running the blocks, and the model as a text generator


class LlamaBlocks:
    """The per-block programs of one model and sequence length.

    For training the weights are input surfaces: every block's forward and backward program has the same MIL text,
    so only the first compiles (the others are cache hits), and new weights are surface writes, never a compile.
    For inference (``baked``: the model's weights) each block's weights are baked into its own forward program
    (1x1 convs, one compile per block); only LoRA adapters are inputs.
    """

    def __init__(self, config: LlamaConfig, seq: int, *, backend, target, cache=None, budget=None,
                 backward: bool = False, lora: LoraLayout | None = None, baked: dict[str, np.ndarray] | None = None,
                 quantize=None):
        from orion.models.gpt2 import causal_mask
        from orion.runtime.program import Program

        if baked is not None and backward:
            raise OrionError("training programs take the weights as inputs; baked weights are for inference")
        self.config, self.seq, self.lora, self.baked = config, seq, lora, baked is not None
        self.timings = {"backend": 0.0, "cpu": 0.0, "update": 0.0}
        common = dict(backend=backend, target=target, cache=cache, budget=budget)

        spec = WeightCompression.of(quantize)

        def program(graph, layer: int | None = None) -> Program:
            """Weights and adapters are set with update_weights; the rest is each run's feed. Baked weights are
            compressed as ``quantize`` says, unless the layer is one it keeps in fp16."""
            weights = [v.name for v in graph.inputs if v.name in LAYER_INPUTS or v.name.startswith("lora_")]
            kept = spec is None or layer is None or spec.keeps_block(layer, config.n_layers)
            return Program.from_graph(graph, weights_as_inputs=weights, weights=None if kept else spec, **common)

        self.forward = [program(forward_graph(config, seq, lora, None if baked is None else
                                              layer_inputs(baked, i, config), i), i) for i in range(config.n_layers)]
        self.backward = [program(backward_graph(config, seq, lora)) for _ in range(config.n_layers)] if backward \
            else []
        for p in self.programs:
            p.load()
        cos, sin = rope_tables(config, seq)
        self.static = {"cos": cos, "sin": sin, "mask": causal_mask(seq)}

    @property
    def programs(self):
        return [*self.forward, *self.backward]

    @property
    def compiles(self) -> int:
        return sum(p.compiles for p in self.programs)

    def close(self) -> None:
        for p in self.programs:
            p.close()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        if self.baked:
            raise OrionError("these block programs have their weights baked in; build new ones for new weights")
        self._write_layers(lambda i: layer_inputs(weights, i, self.config))

    def set_adapter(self, adapter: Adapter | None) -> None:
        """The adapter's inputs (zeros for None) into every block's programs: the base model when None."""
        if self.lora is None:
            raise OrionError("these block programs were built without adapter inputs (lora=None)")
        self._write_layers(lambda i: lora_inputs(adapter, self.lora, i, self.config))

    def _write_layers(self, inputs_of) -> None:
        import time

        t0 = time.perf_counter()
        for i in range(self.config.n_layers):
            inputs = inputs_of(i)
            for program in (self.forward[i], *self.backward[i:i + 1]):
                program.update_weights(inputs)
        self.timings["update"] += time.perf_counter() - t0

    def run(self, program, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        t0 = time.perf_counter()
        out = program.run(feed)
        self.timings["backend"] += time.perf_counter() - t0
        return out

    def forward_all(self, x_channels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """All blocks forward on ``[1, d, 1, S]``: the last block's output and every block's taps."""
        taps = []
        h = x_channels
        for program in self.forward:
            out = self.run(program, {"x": h, **self.static})
            taps.append(out)
            h = out["y"]
        return h, taps


def rms_norm_rows(x: np.ndarray, gain: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 RMSNorm over the last axis: (normed, x_hat, r)."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    x_hat = x * r
    return x_hat * gain, x_hat, r


class Llama(AdapterHost, TextGenerator):
    """A trained Llama for inference: one forward program per block with its weights baked in, over the model's
    context window. LoRA adapters (program inputs): ``load_adapter(path, name)``, ``set_adapter(name)``."""

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], tokenizer=None, *, backend="auto",
                 target="default", cache=None, budget=None, quantize=None):
        """``quantize``: compress the baked block weights at compile (``compile_graph``'s ``weights``)."""
        from orion.compiler.targets import get_target
        from orion.runtime.program import get_backend

        self.config, self.weights, self.tokenizer = config, weights, tokenizer
        self.target = get_target(target)
        self.backend = get_backend(backend, self.target)
        self._options = dict(backend=self.backend, target=self.target, cache=cache, budget=budget, quantize=quantize)
        self.adapter_spec = adapter_spec(config)
        self._init_adapters()
        self._blocks: LlamaBlocks | None = None
        self.stats = GenerationStats()

    @property
    def blocks(self) -> LlamaBlocks:
        """The block programs, built (for the current adapter layout) on first use."""
        if self._blocks is None:
            self._blocks = LlamaBlocks(self.config, self.config.max_seq_len, lora=self.lora, baked=self.weights,
                                       **self._options)
            if self.lora is not None:
                self._blocks.set_adapter(self._current_adapter())
        return self._blocks

    def _use_layout(self, layout: LoraLayout) -> None:
        self.close()

    def _write_adapter(self, adapter: Adapter | None) -> None:
        if self._blocks is not None:
            self._blocks.set_adapter(adapter)

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len

    def logits(self, token_ids) -> np.ndarray:
        ids = check_token_ids(token_ids, self.config.vocab_size, self.config.max_seq_len)
        n, seq = ids.size, self.config.max_seq_len
        x = np.zeros((seq, self.config.dim), np.float32)
        x[:n] = self.weights["tok_embeddings"][ids]
        h, _ = self.blocks.forward_all(np.ascontiguousarray(x.T)[None, :, None, :])
        hidden = np.asarray(h, np.float32)[0, :, 0, :n].T
        normed, _, _ = rms_norm_rows(hidden, self.weights["norm"], self.config.norm_eps)
        return normed @ self.weights.get("output", self.weights["tok_embeddings"]).T

    def generate_ids(self, ids, max_tokens: int = 64, sampler=None, stop_ids=()):
        """Each token reruns the window (no KV cache: these programs are the training ones)."""
        import time

        from orion.models.sampling import Sampler
        from orion.runtime.program import backends_that_ran

        sampler = sampler or Sampler(temperature=0.0)
        ids = list(np.asarray(ids).reshape(-1))
        built = 0 if self._blocks is None else self._blocks.compiles  # compiles before this generation
        stats = self.stats = GenerationStats(prompt_tokens=len(ids), dispatches_per_token=self.config.n_layers,
                                             compiles=self.blocks.compiles - built,
                                             cache_hits=sum(p.cache_hits for p in self.blocks.programs))
        t0 = time.perf_counter()
        logits = self.logits(ids)[-1]
        stats.prefill_seconds = time.perf_counter() - t0
        stats.backend = backends_that_ran(self.blocks.programs)
        t1 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                token = int(sampler.sample(logits))
                stats.new_tokens += 1
                yield token
                if token in stop_ids or len(ids) + 1 >= self.config.max_seq_len or stats.new_tokens == max_tokens:
                    break
                ids.append(token)
                logits = self.logits(ids)[-1]
                stats.decode_steps += 1
        finally:
            stats.decode_seconds = time.perf_counter() - t1


HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj",
            "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_config(config: LlamaConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM (rotate_half RoPE as Orion computes it: no permutation)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
            "intermediate_size": config.hidden_dim, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_heads, "num_hidden_layers": config.n_layers,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32"}


def to_hf_weights(weights: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": weights["tok_embeddings"], "model.norm.weight": weights["norm"]}
    for i in range(config.n_layers):
        for ours, theirs in HF_NAMES.items():
            out[f"model.layers.{i}.{theirs}.weight"] = weights[f"layers.{i}.{ours}"]
    if "output" in weights:
        out["lm_head.weight"] = weights["output"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_hf(config: dict, state: dict[str, np.ndarray]) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """A Hugging Face Llama folder's config and tensors -> Orion's config and weight names."""
    if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get("num_attention_heads"):
        raise OrionError("grouped-query attention (num_key_value_heads != num_attention_heads) is not supported")
    tied = bool(config.get("tie_word_embeddings", "lm_head.weight" not in state))
    cfg = LlamaConfig(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                      n_heads=config["num_attention_heads"], hidden_dim=config["intermediate_size"],
                      vocab_size=config["vocab_size"], max_seq_len=config.get("max_position_embeddings", 256),
                      norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                      rope_theta=float(config.get("rope_theta", 10000.0)), tie_embeddings=tied)

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise OrionError(f"weight {name} is missing from the checkpoint")
        return np.asarray(state[name], np.float32)

    weights = {"tok_embeddings": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
    for i in range(cfg.n_layers):
        for ours, theirs in HF_NAMES.items():
            weights[f"layers.{i}.{ours}"] = get(f"model.layers.{i}.{theirs}.weight")
    if not tied:
        weights["output"] = get("lm_head.weight")
    return cfg, weights


def export_hf(weights: dict[str, np.ndarray], config: LlamaConfig, out_dir,
              tokenizer_files: dict[str, bytes] | None = None):
    """Write a Hugging Face Llama folder (config.json, model.safetensors and the tokenizer's files, e.g.
    tokenizer.json and tokenizer_config.json) that transformers' LlamaForCausalLM loads; every file is written
    atomically."""
    import json
    from pathlib import Path

    from safetensors.numpy import save

    from orion.fileio import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config.json": (json.dumps(hf_config(config), indent=2) + "\n").encode(),
             "model.safetensors": save(to_hf_weights(weights, config), metadata={"format": "pt"})}
    files |= tokenizer_files or {}
    for name, data in files.items():
        write_atomic(out / name, data)
    return out
