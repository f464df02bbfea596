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
from typing import Mapping, Sequence

import numpy as np

from orion.errors import OrionError
from orion.ir.builder import GraphBuilder
from orion.ir.graph import Value
from orion.lora import Adapter, AdapterSpec, LoraLayout
from orion.models.head import VocabHead
from orion.models.lm import CachedDecoder, check_token_ids
from orion.models.spill import SpilledList, spilled_array


@dataclass(frozen=True)
class LlamaConfig:
    """One Llama-style decoder; the Hugging Face families (Llama, Mistral, Qwen2, Qwen3) are settings of it."""

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    n_kv_heads: int = 0  # grouped-query attention: heads of k and v (0: n_heads)
    head_dim: int = 0  # 0: dim // n_heads (Qwen3 sets its own)
    qkv_bias: bool = False  # biases on q, k, v (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # a bias on the output projection (Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm of every q and k head before RoPE (Qwen3)
    rope_scaling: tuple = ()  # config.json's rope_scaling as sorted (key, value) pairs

    def __post_init__(self):
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise OrionError(f"dim {self.dim} does not split into {self.n_heads} heads; give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "n_kv_heads", self.n_kv_heads or self.n_heads)
        object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), _frozen(v))
                                                              for k, v in dict(self.rope_scaling).items())))
        if self.head_dim % 2:
            raise OrionError(f"head_dim {self.head_dim} must be even (rotary embeddings pair its halves)")
        if self.n_heads % self.n_kv_heads:
            raise OrionError(f"num_key_value_heads {self.n_kv_heads} does not divide num_attention_heads "
                             f"{self.n_heads}")
        rope_frequencies(self)  # refuses a rope_scaling it cannot compute, naming the field

    @property
    def groups(self) -> int:
        """Query heads per k/v head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        """Plain JSON: rope_scaling as the object config.json writes."""
        scaling = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_scaling}
        return {**asdict(self), "rope_scaling": scaling}

    def check_trainable(self) -> None:
        """Training programs are the plain layout: refuse the inference-only settings, naming the first."""
        plain = {"n_kv_heads": self.n_heads, "head_dim": self.dim // self.n_heads, "qkv_bias": False,
                 "o_bias": False, "qk_norm": False, "rope_scaling": ()}
        for name, value in plain.items():
            if getattr(self, name) != value:
                raise OrionError(f"training runs the plain Llama layout; {name}={getattr(self, name)!r} is for "
                                 "inference only")


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies ``[hd/2]`` (float64), with config.json's ``rope_scaling`` applied: none,
    ``linear`` or ``llama3`` (Llama 3.1/3.2). Another type is refused naming the field."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / config.head_dim)
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    try:
        factor = float(scaling["factor"])
        if kind == "linear":
            return inv_freq / factor
        if kind == "llama3":
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old = float(scaling["original_max_position_embeddings"])
            wavelength = 2 * np.pi / inv_freq
            smooth = (old / wavelength - low) / (high - low)
            scaled = np.where(wavelength > old / low, inv_freq / factor, inv_freq)
            medium = (wavelength >= old / high) & (wavelength <= old / low)
            return np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    except KeyError as exc:
        raise OrionError(f"rope_scaling of type {kind!r} lacks {exc.args[0]!r}") from None
    raise OrionError(f"rope_scaling.rope_type {kind!r} is not supported (Orion runs default, linear and llama3)")


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


def rope_tables(config: LlamaConfig, seq: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[1, 1, hd/2, S]`` for positions start..start+S-1 (Hugging Face's rotate_half convention)."""
    half = config.head_dim // 2
    angles = np.outer(rope_frequencies(config), np.arange(start, start + seq, dtype=np.float64))  # [hd/2, S]
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
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return AdapterSpec("llama", "model.layers", LORA_MODULES,
                       {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
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
    """Builds one block's training programs (every weight an input); inputs are declared as they are first used.
    The graph functions name values by scope (``with builder.scope("ffn")``), the ops inside take their default
    names."""

    def __init__(self, name: str, config: LlamaConfig, seq: int, lora: LoraLayout | None = None):
        config.check_trainable()
        self.builder = GraphBuilder(name)
        self.config = config
        self.seq = seq
        self.lora = lora
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
        """A linear layer's weight: an input ``[1, 1, rows, cols]``."""
        return self.builder.input(name, (1, 1, rows, cols))

    def gain(self, name: str) -> Value:
        """A norm's gain as ``[1, d, 1, 1]``: an input row ``[1, 1, 1, d]`` reshaped."""
        d = self.config.dim
        return self.builder.reshape(self.builder.input(name, (1, 1, 1, d)), shape=[1, d, 1, 1])

    def linear(self, x: Value, w: Value, transpose: bool = False) -> Value:
        """``W x`` (or ``W^T x``) for ``x [1, I, 1, S]`` and an input weight ``[1, 1, O, I]``."""
        b = self.builder
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
        return rotate(self.builder, a, c, cos, sin, inverse)

    def rms(self, x: Value) -> tuple[Value, Value]:
        return rms(self.builder, x, self.config.norm_eps)

    def rms_backward(self, d_hat: Value, x_hat: Value, r: Value) -> Value:
        """``dx = r * (d_hat - x_hat * mean(x_hat * d_hat))``."""
        b = self.builder
        m = b.reduce_mean(b.mul(x_hat, d_hat), axes=[1], keep_dims=True)
        return b.mul(r, b.sub(d_hat, b.mul(x_hat, m)))


def forward_graph(config: LlamaConfig, seq: int, lora: LoraLayout | None = None):
    """One block forward. Inputs: x, cos, sin, mask, the weights (and ``lora``'s adapter inputs). Outputs: y and the
    backward pass's taps."""
    blk = _Block(f"llama_fwd{seq}", config, seq, lora)
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
    for name, value in taps.items():
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
    """The per-block training programs of one model and sequence length.

    The weights are input surfaces: every block's forward and backward program has the same MIL text, so only the
    first compiles (the others are cache hits), and new weights are surface writes, never a compile. (Inference
    bakes its weights: :class:`Llama`.) The rotary tables and the causal mask are inputs written once, as weights
    are: a run writes only the activations.
    """

    def __init__(self, config: LlamaConfig, seq: int, *, backend, target, cache=None, budget=None,
                 backward: bool = False, lora: LoraLayout | None = None):
        from orion.models.gpt2 import causal_mask
        from orion.runtime.program import Program

        self.config, self.seq, self.lora = config, seq, lora
        self.timings = {"backend": 0.0, "cpu": 0.0, "update": 0.0}
        common = dict(backend=backend, target=target, cache=cache, budget=budget)

        cos, sin = rope_tables(config, seq)
        static = {"cos": cos, "sin": sin, "mask": causal_mask(seq)}

        def program(graph) -> Program:
            """Weights, adapters and the static inputs are set with update_weights; the rest is each run's feed."""
            weights = [v.name for v in graph.inputs
                       if v.name in LAYER_INPUTS or v.name in static or v.name.startswith("lora_")]
            made = Program.from_graph(graph, weights_as_inputs=weights, **common)
            made.update_weights({name: value for name, value in static.items() if name in weights})
            return made

        self.forward = [program(forward_graph(config, seq, lora)) for _ in range(config.n_layers)]
        self.backward = [program(backward_graph(config, seq, lora)) for _ in range(config.n_layers)] if backward \
            else []
        for p in self.programs:
            p.load()

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
            out = self.run(program, {"x": h})
            taps.append(out)
            h = out["y"]
        return h, taps


def rms_norm_rows(x: np.ndarray, gain: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 RMSNorm over the last axis: (normed, x_hat, r)."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    x_hat = x * r
    return x_hat * gain, x_hat, r


# ---------------------------------------------------------------------------------------------------------------------
# Inference: prefill and decode programs with the KV cache resident in the decode programs' inputs


def rms(b: GraphBuilder, x: Value, eps: float, axis: int = 1) -> tuple[Value, Value]:
    """``x_hat = x * r`` with ``r = (mean(x^2) + eps)^-1/2`` over ``axis``; returns (x_hat, r)."""
    r = b.pow(b.add(b.reduce_mean(b.mul(x, x), axes=[axis], keep_dims=True), eps), -0.5)
    return b.mul(x, r), r


def rotate(b: GraphBuilder, a: Value, c: Value, cos: Value, sin: Value, inverse: bool = False):
    """Rotary embedding of every head's two halves: ``(a cos - c sin, c cos + a sin)``; ``inverse`` turns the other
    way, ``(a cos + c sin, c cos - a sin)`` (the transpose: how a gradient goes back)."""
    first, second = (b.add, b.sub) if inverse else (b.sub, b.add)
    return first(b.mul(a, cos), b.mul(c, sin)), second(b.mul(c, cos), b.mul(a, sin))


def grouped_rows(config: LlamaConfig, groups: int, width: int, offset: int) -> np.ndarray:
    """Indices into a per-head axis (``heads * head_dim``, heads ``kv * groups + g``) in the order the inference
    programs keep it: k/v head, then channels ``offset .. offset + width`` of the head, then the query head of the
    group. A tensor in this order reshapes to ``[1, KV, width, groups * S]`` with one reshape: grouped-query
    attention becomes one matmul per k/v head, its queries side by side with no broadcast, tile or concat."""
    kv = np.arange(config.n_kv_heads)[:, None, None]
    d = np.arange(width)[None, :, None]
    g = np.arange(groups)[None, None, :]
    return ((kv * groups + g) * config.head_dim + offset + d).reshape(-1)


#: Distinct scalar constants an inference program reads (each takes a weight-tensor slot, ANE-21): the norms' eps,
#: the q/k norms' 2 eps, the -0.5 exponent, decode's identity (place_columns).
INFERENCE_SCALARS = 4
#: The parts of a block's fused q/k/v projection, in order: the rotary halves of q and of k, then v.
QKV_PARTS = ("qa", "qb", "ka", "kb", "v")
#: Where each adapter target adds into a block, and its parts: (projection input, outputs).
_LORA_SITES = {"q": ("n1", ("qa", "qb")), "k": ("n1", ("ka", "kb")), "v": ("n1", ("v",)), "o": ("ctx", ("o",)),
               "gate": ("n2", ("gate",)), "up": ("n2", ("up",)), "down": ("g", ("down",))}


@dataclass
class InferenceBlock:
    """One block as the inference programs hold it: RMSNorm gains folded into the projections after them, the
    attention scale folded into q (or into the q norm's gain), q/k/v in :func:`grouped_rows` order and fused into
    one projection where the per-axis limit allows (else one per part), o's columns in the attention output's
    order, gate and up fused where the limit allows. Linear weights ``[out, in]``, float32."""

    qkv_w: list[np.ndarray]  # one projection per entry of qkv_parts
    qkv_b: list[np.ndarray] | None
    qkv_parts: list[tuple[str, ...]]
    o_w: np.ndarray
    o_b: np.ndarray | None
    ffn_w: list[np.ndarray]  # [gate; up] fused, or gate and up
    down_w: np.ndarray
    q_gain: tuple[np.ndarray, np.ndarray] | None  # the q/k norms' gains per rotary half (Qwen3)
    k_gain: tuple[np.ndarray, np.ndarray] | None
    norms: tuple[np.ndarray, np.ndarray]  # the folded RMSNorm gains, to fold adapters the same way

    @property
    def constants(self) -> int:
        qkv = len(self.qkv_w) * (1 + (self.qkv_b is not None))
        return (qkv + 2 + len(self.ffn_w) + (self.o_b is not None)
                + 2 * (self.q_gain is not None) + 2 * (self.k_gain is not None))


def _parts(config: LlamaConfig) -> dict[str, np.ndarray]:
    """Rows of each q/k/v part in its projection, and o's columns (:func:`grouped_rows`)."""
    half, g = config.head_dim // 2, config.groups
    return {"qa": grouped_rows(config, g, half, 0), "qb": grouped_rows(config, g, half, half),
            "ka": grouped_rows(config, 1, half, 0), "kb": grouped_rows(config, 1, half, half),
            "v": np.arange(config.n_kv_heads * config.head_dim), "o": grouped_rows(config, g, config.head_dim, 0)}


def _q_scale(config: LlamaConfig) -> float:
    """The attention scale where q's projection takes it (with q norms it goes into their gain instead)."""
    return 1.0 if config.qk_norm else 1.0 / np.sqrt(config.head_dim)


def inference_blocks(weights: Mapping[str, np.ndarray], config: LlamaConfig, max_axis: int,
                     spill: bool = False) -> Sequence[InferenceBlock]:
    """Orion-named weights -> the blocks the inference programs bake (:class:`InferenceBlock`), each layer's weights
    read once. ``spill``: the blocks go to a temporary file as they are folded (a
    :class:`~orion.models.spill.SpilledList`), not a list in memory."""
    rows, scale = _parts(config), _q_scale(config)
    half = config.head_dim // 2

    def block(i: int) -> InferenceBlock:
        layer = {name: np.asarray(weights[f"layers.{i}.{name}"], np.float64) for name in layer_shapes(config)}
        g1, g2 = layer["attention_norm"], layer["ffn_norm"]
        source = {"qa": ("q", scale), "qb": ("q", scale), "ka": ("k", 1.0), "kb": ("k", 1.0), "v": ("v", 1.0)}
        fused = sum(rows[p].size for p in QKV_PARTS) <= max_axis
        qkv_parts = [QKV_PARTS] if fused else [(p,) for p in QKV_PARTS]
        qkv_w = [np.float32(np.concatenate([layer[f"w{source[p][0]}"][rows[p]] * source[p][1] for p in parts]) * g1)
                 for parts in qkv_parts]
        qkv_b = ([np.float32(np.concatenate([layer[f"b{source[p][0]}"][rows[p]] * source[p][1] for p in parts]))
                  for parts in qkv_parts] if config.qkv_bias else None)
        gate, up = layer["w1"] * g2, layer["w3"] * g2
        ffn = [np.concatenate([gate, up])] if 2 * config.hidden_dim <= max_axis else [gate, up]
        norm_gains = None
        if config.qk_norm:  # RMS over a head from its halves' means gives r / sqrt(2): sqrt(2) goes into the gains
            q_norm = layer["q_norm"] * np.sqrt(2) / np.sqrt(config.head_dim)
            k_norm = layer["k_norm"] * np.sqrt(2)
            norm_gains = [tuple(np.float32(n[s]) for s in (slice(0, half), slice(half, None)))
                          for n in (q_norm, k_norm)]
        return InferenceBlock(
            qkv_w, qkv_b, qkv_parts, np.float32(layer["wo"][:, rows["o"]]),
            np.float32(layer["bo"]) if config.o_bias else None, [np.float32(f) for f in ffn], np.float32(layer["w2"]),
            *(norm_gains or (None, None)), (np.float32(g1), np.float32(g2)))

    folded = (block(i) for i in range(config.n_layers))
    return SpilledList(folded) if spill else list(folded)


def blocks_per_inference_program(target, blocks: Sequence[InferenceBlock]) -> int:
    """As many blocks as the target's weight-tensor limit holds next to the scalar constants (ANE-21)."""
    if target.max_blob_constants is None:
        return len(blocks)
    return max(1, min(len(blocks), (target.max_blob_constants - INFERENCE_SCALARS) // blocks[0].constants))


def inference_lora_name(layer: int, target: str, part: str) -> str:
    return f"l{layer:02d}_lora_{target}_{part}"


def inference_lora_inputs(adapter: Adapter | None, layout: LoraLayout, norms: list[tuple[np.ndarray, np.ndarray]],
                          first: int, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The adapter inputs of the inference program for blocks ``first ...`` (their folded RMSNorm gains ``norms``,
    :attr:`InferenceBlock.norms`), folded as the base weights are: A times the folded norm's gain, B's rows in the
    parts' order (q's times the attention scale), o's A columns in the attention output's order."""
    spec, rows, r = adapter_spec(config), _parts(config), layout.rank
    values = {}
    for j, block_norms in enumerate(norms):
        layer = first + j
        for target in layout.targets:
            fan_in, _ = spec.features[target]
            a, b = layout.slot(adapter, layer, target, spec)
            site, parts = _LORA_SITES[target]
            if site in ("n1", "n2"):
                a = a * block_norms[site == "n2"][None, :]
            if target == "o":
                a = a[:, rows["o"]]
            values[inference_lora_name(layer, target, "a")] = np.float32(a).reshape(1, 1, r, fan_in)
            for part in parts:
                out = b[rows[part]] * (_q_scale(config) if target == "q" else 1.0) if part in QKV_PARTS else b
                values[inference_lora_name(layer, target, f"b_{part}")] = np.float32(out).reshape(1, 1, -1, r)
    return values


class _InferenceGraph:
    """Builds one inference program: blocks over ``columns`` positions, with the adapter paths of ``lora``."""

    def __init__(self, name: str, config: LlamaConfig, columns: int, lora: LoraLayout | None):
        self.b, self.config, self.columns, self.lora = GraphBuilder(name), config, columns, lora

    def adapt(self, outputs: dict[str, Value], x: Value, target: str, layer: int) -> None:
        """Add ``target``'s adapter path ``B (A x)`` to its parts in ``outputs`` when the layout adapts it."""
        if self.lora is None or target not in self.lora.targets:
            return
        b, r = self.b, self.lora.rank
        u = b.lora_down(x, b.input(inference_lora_name(layer, target, "a"), (1, 1, r, x.shape[1])),
                        name=f"lora_{target}")
        for part in _LORA_SITES[target][1]:
            y = outputs[part]
            w = b.input(inference_lora_name(layer, target, f"b_{part}"), (1, 1, y.shape[1], r))
            outputs[part] = b.add(y, b.lora_up(u, w, name=f"lora_{target}_{part}"))

    def split(self, y: Value, sizes: dict[str, int]) -> dict[str, Value]:
        """Channel slices of ``y``, named."""
        out, start = {}, 0
        for name, size in sizes.items():
            out[name] = self.b.slice_by_index(y, begin=[0, start, 0, 0], end=[1, start + size, 1, self.columns],
                                              name=name)
            start += size
        return out

    def head_norm(self, a: Value, c: Value, gains: tuple[np.ndarray, np.ndarray], name: str):
        """RMSNorm of every head from its rotary halves ``[1, KV, hd/2, N]`` (gains carry the sqrt(2))."""
        b = self.b
        ms = b.add(b.reduce_mean(b.mul(a, a), axes=[2], keep_dims=True),
                   b.reduce_mean(b.mul(c, c), axes=[2], keep_dims=True))
        r = b.pow(b.add(ms, 2 * self.config.norm_eps), -0.5)
        return tuple(b.mul(b.mul(t, r), b.weight(f"{name}_{part}", g.reshape(1, 1, -1, 1)))
                     for t, g, part in zip((a, c), gains, "ab"))

    def qkv(self, x: Value, w: InferenceBlock, layer: int, rope: dict[str, Value]) -> dict[str, Value]:
        """The attention inputs: rotated q halves ``[1, KV, hd/2, G*N]``, k halves ``[1, KV, hd/2, N]``, v
        ``[1, KV, hd, N]``, and (``k_flat``) the rotated k halves and v as ``[1, C, 1, N]`` for the cache."""
        b, c, n = self.b, self.config, self.columns
        half, kv, g = c.head_dim // 2, c.n_kv_heads, c.groups
        n1, _ = rms(b, x, c.norm_eps)
        sizes = {"qa": c.n_heads * half, "qb": c.n_heads * half, "ka": kv * half, "kb": kv * half,
                 "v": kv * c.head_dim}
        parts = {}
        for j, names in enumerate(w.qkv_parts):
            y = b.linear(n1, w.qkv_w[j], None if w.qkv_b is None else w.qkv_b[j], name="_".join(names))
            parts |= self.split(y, {p: sizes[p] for p in names})
        for target in ("q", "k", "v"):
            self.adapt(parts, n1, target, layer)
        q = [b.reshape(parts[p], shape=[1, kv, half, g * n]) for p in ("qa", "qb")]
        k = [b.reshape(parts[p], shape=[1, kv, half, n]) for p in ("ka", "kb")]
        if w.q_gain is not None:
            q, k = self.head_norm(*q, w.q_gain, "q_norm"), self.head_norm(*k, w.k_gain, "k_norm")
        q = rotate(b, *q, rope["cos_q"], rope["sin_q"])
        k = rotate(b, *k, rope["cos_k"], rope["sin_k"])
        flat = {name: b.reshape(t, shape=[1, kv * half, 1, n]) for name, t in zip(("ka", "kb"), k)}
        flat["v"] = parts["v"]
        return {"qa": q[0], "qb": q[1], "ka": k[0], "kb": k[1],
                "v": b.reshape(parts["v"], shape=[1, kv, c.head_dim, n]), "flat": flat}

    def scores(self, t: dict[str, Value], ka: Value, kb: Value, mask: Value) -> Value:
        """``q . k`` of the two rotary halves, plus the mask: ``[1, KV, G*N, keys]``."""
        b = self.b
        return b.add(b.add(b.matmul(t["qa"], ka, transpose_x=True, transpose_y=False),
                           b.matmul(t["qb"], kb, transpose_x=True, transpose_y=False)), mask)

    def merge(self, ctx: Value) -> Value:
        """``[1, KV, hd, G*N] -> [1, KV*hd*G, 1, N]`` (o's columns are in this order)."""
        return self.b.reshape(ctx, shape=[1, ctx.shape[1] * ctx.shape[2] * self.config.groups, 1, self.columns])

    def finish(self, x: Value, ctx: Value, w: InferenceBlock, layer: int) -> Value:
        """Output projection, residual, RMSNorm (folded), SwiGLU, residual."""
        b, f = self.b, self.config.hidden_dim
        o = {"o": b.linear(ctx, w.o_w, w.o_b, name="o")}
        self.adapt(o, ctx, "o", layer)
        h = b.add(x, o["o"])
        n2, _ = rms(b, h, self.config.norm_eps)
        if len(w.ffn_w) == 1:
            ffn = self.split(b.linear(n2, w.ffn_w[0], name="gate_up"), {"gate": f, "up": f})
        else:
            ffn = {name: b.linear(n2, m, name=name) for name, m in zip(("gate", "up"), w.ffn_w)}
        self.adapt(ffn, n2, "gate", layer)
        self.adapt(ffn, n2, "up", layer)
        g = b.mul(b.silu(ffn["gate"]), ffn["up"])
        down = {"down": b.linear(g, w.down_w, name="down")}
        self.adapt(down, g, "down", layer)
        return b.add(h, down["down"])

    def rope_inputs(self) -> dict[str, Value]:
        half, g, n = self.config.head_dim // 2, self.config.groups, self.columns
        return {f"{f}_{s}": self.b.input(f"{f}_{s}", (1, 1, half, (g if s == "q" else 1) * n))
                for f in ("cos", "sin") for s in "qk"}


#: The cache tensors of a block: the rotated k halves and v (names by :func:`orion.models.gpt2.kv_name`).
CACHE_PARTS = ("ka", "kb", "v")


def inference_prefill_graph(blocks: list[InferenceBlock], first: int, config: LlamaConfig, seq: int,
                            lora: LoraLayout | None = None):
    """Blocks ``first ...`` over a ``seq`` bucket. Inputs: x, the causal mask repeated for the G query heads of a
    group ``[1, 1, G*S, S]``, the RoPE tables (q's repeated G times along the positions). Outputs: y and every
    block's rotated k halves and v (the decode cache's contents)."""
    from orion.models.gpt2 import kv_name

    gr = _InferenceGraph(f"llama_prefill{seq}_l{first}", config, seq, lora)
    b = gr.b
    x = b.input("x", (1, config.dim, 1, seq))
    mask = b.input("mask", (1, 1, config.groups * seq, seq))
    rope = gr.rope_inputs()
    for j, w in enumerate(blocks):
        i = first + j
        with b.scope(f"l{i:02d}"):
            t = gr.qkv(x, w, i, rope)
            p = b.softmax(gr.scores(t, t["ka"], t["kb"], mask), axis=-1)
            x = gr.finish(x, gr.merge(b.matmul(t["v"], p, transpose_x=False, transpose_y=True)), w, i)
        for part in CACHE_PARTS:
            b.output(kv_name(part, i, "prefill"), t["flat"][part])
    b.output("y", x)
    return b.graph


def inference_decode_graph(blocks: list[InferenceBlock], first: int, config: LlamaConfig, capacity: int,
                           lora: LoraLayout | None = None, *, target):
    """Blocks ``first ...`` for up to :func:`orion.models.gpt2.decode_io` new positions against a KV cache of
    ``capacity`` positions held in the inputs (``kac``/``kbc``/``vc`` per block, ``[1, C, 1, T]``).

    As GPT-2's (:meth:`GraphBuilder.cached_attention`): the new rotated k halves and v are placed into their slots
    (``slots [1, 1, N, T]``, one-hot), and every query attends over the T slots in position order as its row of
    ``mask [1, 1, G*N, T]`` allows (the rows of the N columns, repeated for the G query heads of a k/v group): one
    softmax, no concat. One new position (column 0) is a decode step; several are a verification pass (speculative
    decoding) with the same logits, bit for bit."""
    from orion.models.gpt2 import decode_io, kv_name

    io_dtype, n = decode_io(target)
    gr = _InferenceGraph(f"llama_decode{capacity}_l{first}", config, n, lora)
    b = gr.b
    half, kv = config.head_dim // 2, config.n_kv_heads
    widths = {"ka": half, "kb": half, "v": config.head_dim}

    def out(name: str, value: Value) -> None:
        b.output(name, b.cast(value, io_dtype, name=f"{name}_{io_dtype}"))

    x = b.cast(b.input("x", (1, config.dim, 1, n), dtype=io_dtype), "fp16", name="x_fp16")
    mask = b.input("mask", (1, 1, config.groups * n, capacity))
    slots = b.input("slots", (1, 1, n, capacity))
    rope = gr.rope_inputs()
    for j, w in enumerate(blocks):
        i = first + j
        cache = {part: b.input(kv_name(part, i, "cache"), (1, kv * widths[part], 1, capacity)) for part in CACHE_PARTS}
        with b.scope(f"l{i:02d}"):
            t = gr.qkv(x, w, i, rope)
            placed = {p: b.place_columns(t[p], b.reshape(cache[p], shape=[1, kv, widths[p], capacity]), slots, p)
                      for p in CACHE_PARTS}  # (written [1, KV, w, N], all slots [1, KV, w, T])
            probs = b.softmax(gr.scores(t, placed["ka"][1], placed["kb"][1], mask), axis=-1)  # [1, KV, G*N, T]
            ctx = b.matmul(placed["v"][1], probs, transpose_x=False, transpose_y=True)
            x = gr.finish(x, gr.merge(ctx), w, i)
        for part in CACHE_PARTS:
            out(kv_name(part, i, "new"), b.reshape(placed[part][0], shape=[1, kv * widths[part], 1, n]))
    out("y", x)
    return b.graph


class Llama(VocabHead, CachedDecoder):
    """A Llama-family model (Llama, Mistral, Qwen2, Qwen3 or Orion's own) for inference: prefill over sequence
    buckets, then decode with the KV cache resident in the decode programs' inputs, several blocks per program as
    the weight-tensor limit allows. ``head="ane"`` runs the classifier on the ANE, split along the vocabulary
    (``cpu``, the default, is float32 BLAS). LoRA adapters (program inputs): ``load_adapter``, ``set_adapter``."""

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], tokenizer=None, *, backend="auto",
                 target="default", cache=None, budget=None, head: str = "cpu", quantize=None):
        """``quantize``: compress the blocks' weights once, when their programs compile (``compile_graph``'s
        ``weights``); the classifier stays fp16 (on the ANE) or float32 (on the CPU)."""
        from orion.compiler.passes import WeightCompression
        from orion.compiler.targets import get_target
        from orion.models.gpt2 import PREFILL_BUCKETS
        from orion.runtime.program import get_backend

        self._init_head(head)
        self.config, self.tokenizer = config, tokenizer
        self.target = get_target(target)
        self.backend = get_backend(backend, self.target)
        self.cache, self.budget = cache, budget
        self.quantize = WeightCompression.of(quantize)
        self.context = min(config.max_seq_len, PREFILL_BUCKETS[-1])
        embeddings = np.asarray(weights["tok_embeddings"], np.float32)
        output = weights["output"] if "output" in weights else embeddings
        # float32 products are rounded once from the exact product, as float64's would be: the same bits, without
        # two float64 copies of the vocabulary's rows
        self.head_w = np.asarray(output, np.float32) * np.asarray(weights["norm"], np.float32)
        # each token reads one row of the embeddings: kept in a file, mapped (only the rows read are in memory)
        self.embeddings = spilled_array(embeddings)
        del embeddings, output
        # the blocks' float32 weights are read only to build programs (which then hold them): kept in a file
        self.blocks = inference_blocks(weights, config, self.target.max_axis, spill=True)
        self.group = blocks_per_inference_program(self.target, self.blocks)
        self.adapter_spec = adapter_spec(config)
        self._init_programs()

    # -- programs -----------------------------------------------------------------------------------------------

    def _block_pattern(self, layer: int) -> str:
        return f"l{layer:02d}_*"

    def _graph(self, kind: str, size: int, first: int):
        blocks = self.blocks[first:first + self.group]
        if kind == "prefill":
            return inference_prefill_graph(blocks, first, self.config, size, self.lora)
        return inference_decode_graph(blocks, first, self.config, size, self.lora, target=self.target)

    def _adapter_inputs(self, adapter: Adapter | None, first: int) -> dict[str, np.ndarray]:
        norms = [self.blocks.field(i, "norms") for i in self._layers(first)]
        return inference_lora_inputs(adapter, self.lora, norms, first, self.config)

    # -- forward ------------------------------------------------------------------------------------------------

    def _check_ids(self, ids) -> np.ndarray:
        return check_token_ids(ids, self.config.vocab_size, self.context)

    def _rope(self, start: int, n: int) -> dict[str, np.ndarray]:
        """The RoPE inputs for positions ``start .. start+n-1`` (q's repeated for the G heads of a group)."""
        cos, sin = rope_tables(self.config, n, start)
        g = self.config.groups
        return {"cos_k": cos, "sin_k": sin, "cos_q": np.tile(cos, (1, 1, 1, g)), "sin_q": np.tile(sin, (1, 1, 1, g))}

    head_constants = INFERENCE_SCALARS

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _head_norm(self, b: GraphBuilder, x: Value) -> Value:
        """The final RMSNorm in a classifier program (its gain is folded into ``head_w``)."""
        return rms(b, x, self.config.norm_eps)[0]

    def _cpu_head(self, hidden: np.ndarray) -> np.ndarray:
        normed, _, _ = rms_norm_rows(hidden, 1.0, self.config.norm_eps)
        return normed @ self.head_w.T

    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
        from orion.models.gpt2 import bucket_for, causal_mask

        n = ids.size
        seq = bucket_for(n)
        x = np.zeros((1, self.config.dim, 1, seq), np.float32)
        x[0, :, 0, :n] = self.embeddings[ids].T
        static = {"mask": np.tile(causal_mask(seq), (1, 1, self.config.groups, 1)), **self._rope(0, seq)}
        kv: dict[str, np.ndarray] = {}
        for program in self.programs("prefill", seq):
            out = program.run({"x": x, **static})
            x = out.pop("y")
            kv.update({name: array[0, :, 0, :n] for name, array in out.items()})
        return x[0, :, 0, :n].T, kv, seq

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits ``[len, vocab]`` for every position of one sequence (the prefill programs)."""
        hidden, _, _ = self._prefill(self._check_ids(token_ids))
        return self._head(hidden)

    # -- decode (CachedDecoder.generate_ids and its sessions) ---------------------------------------------------

    cache_parts = CACHE_PARTS

    def _mask_input(self, mask: np.ndarray) -> np.ndarray:
        return np.tile(mask[None, None], (1, 1, self.config.groups, 1))

    def _decode_inputs(self, tokens: np.ndarray, start: int, columns: int) -> tuple[np.ndarray, dict]:
        return self.embeddings[tokens], self._rope(start, columns)


HF_NAMES = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
            "wo": "self_attn.o_proj.weight", "w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight",
            "w2": "mlp.down_proj.weight", "attention_norm": "input_layernorm.weight",
            "ffn_norm": "post_attention_layernorm.weight", "bq": "self_attn.q_proj.bias",
            "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias",
            "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
#: The Hugging Face architectures Orion runs, by model_type: all one Llama-style decoder.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}


def layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Orion's name -> shape of every per-layer tensor this config has."""
    d, f, hd = config.dim, config.hidden_dim, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    shapes = {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d), "w3": (f, d), "w2": (d, f),
              "attention_norm": (d,), "ffn_norm": (d,)}
    if config.qkv_bias:
        shapes |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
    if config.o_bias:
        shapes["bo"] = (d,)
    if config.qk_norm:
        shapes |= {"q_norm": (hd,), "k_norm": (hd,)}
    return shapes


def hf_config(config: LlamaConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM (rotate_half RoPE as Orion computes it: no permutation)."""
    config.check_trainable()
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
            "intermediate_size": config.hidden_dim, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_heads, "num_hidden_layers": config.n_layers,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32"}


def to_hf_weights(weights: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": weights["tok_embeddings"], "model.norm.weight": weights["norm"]}
    for i in range(config.n_layers):
        for ours in layer_shapes(config):
            out[f"model.layers.{i}.{HF_NAMES[ours]}"] = weights[f"layers.{i}.{ours}"]
    if "output" in weights:
        out["lm_head.weight"] = weights["output"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def config_from_hf(config: dict, has_head: bool = False) -> LlamaConfig:
    """config.json of a Llama, Mistral, Qwen2 or Qwen3 checkpoint -> :class:`LlamaConfig`; a setting Orion cannot
    run is refused naming the field. Without ``tie_word_embeddings`` the embeddings are tied unless the checkpoint
    ``has_head`` (an ``lm_head.weight``)."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise OrionError(f"model_type {kind!r} is not supported: Orion runs gpt2 and {', '.join(FAMILIES)}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise OrionError(f"config.json lacks {missing}")
    rotary = config.get("rope_parameters") or {}
    refusals = {"hidden_act": (config.get("hidden_act", "silu") not in ("silu", "swish"), "Orion runs silu"),
                "mlp_bias": (bool(config.get("mlp_bias")), "Orion runs MLPs without biases"),
                "partial_rotary_factor": (config.get("partial_rotary_factor", rotary.get("partial_rotary_factor",
                                                                                         1.0)) != 1.0,
                                          "Orion rotates whole heads"),
                "layer_types": (any(t != "full_attention" for t in config.get("layer_types") or ()),
                                "Orion runs full attention in every layer")}
    for field_name, (refused, why) in refusals.items():
        if refused:
            raise OrionError(f"config.json field {field_name}={config.get(field_name)!r} is not supported: {why}")
    context = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    if window and (kind == "mistral" or config.get("use_sliding_window")):
        context = min(context, int(window))  # within the window, sliding attention is full attention
    biased = bool(config.get("attention_bias", False))
    # RoPE settings: rope_theta and rope_scaling, or (transformers 5) both in rope_parameters
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta", rope.pop("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    return LlamaConfig(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        hidden_dim=config["intermediate_size"], vocab_size=config["vocab_size"], max_seq_len=context,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        tie_embeddings=bool(config.get("tie_word_embeddings", not has_head)),
        n_kv_heads=config.get("num_key_value_heads") or 0, head_dim=config.get("head_dim") or 0,
        qkv_bias=kind == "qwen2" or biased, o_bias=kind != "qwen2" and biased, qk_norm=kind == "qwen3",
        rope_scaling=tuple(rope.items()))


def from_hf(config: dict, state: Mapping[str, np.ndarray], lazy: bool = False
            ) -> tuple[LlamaConfig, Mapping[str, np.ndarray]]:
    """A Hugging Face Llama-family folder's config and tensors -> Orion's config and float32 weights by Orion's
    names. A missing tensor is refused naming it, a misshapen one when it is read. ``lazy``: a mapping that reads
    each tensor from ``state`` when it is asked for (so that a loader that folds one layer at a time never holds
    them all), else a dict of them all."""
    cfg = config_from_hf(config, "lm_head.weight" in state)
    names = {"tok_embeddings": ("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim)),
             "norm": ("model.norm.weight", (cfg.dim,))}
    for i in range(cfg.n_layers):
        for ours, shape in layer_shapes(cfg).items():
            names[f"layers.{i}.{ours}"] = (f"model.layers.{i}.{HF_NAMES[ours]}", shape)
    if not cfg.tie_embeddings:
        names["output"] = ("lm_head.weight", (cfg.vocab_size, cfg.dim))
    missing = [name for name, _ in names.values() if name not in state]
    if missing:
        raise OrionError(f"weight {missing[0]} is missing from the checkpoint")
    weights = _Renamed(state, names)
    return cfg, weights if lazy else dict(weights)


class _Renamed(Mapping[str, np.ndarray]):
    """A checkpoint's tensors by Orion's names, each read, made float32 and checked against its shape when asked
    for."""

    def __init__(self, state: Mapping[str, np.ndarray], names: dict[str, tuple[str, tuple[int, ...]]]):
        self._state, self._names = state, names

    def __getitem__(self, ours: str) -> np.ndarray:
        name, shape = self._names[ours]
        array = np.asarray(self._state[name], np.float32)
        if array.shape != shape:
            raise OrionError(f"weight {name} has shape {list(array.shape)}; this config needs {list(shape)}")
        return array

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


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
