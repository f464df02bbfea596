"""Build graphs from Python, with the transformer patterns in the ANE layout ``[1, C, 1, S]``.

Channels sit on axis 1 and the sequence on axis 3, so a linear layer is a 1x1 conv with weight ``[O, I, 1, 1]``
(about 3x faster than matmul on the ANE) and per-channel vectors broadcast as ``[1, C, 1, 1]``.
"""

from __future__ import annotations

import math

import numpy as np

from orion.errors import GraphError
from orion.ir.graph import Graph, Value
from orion.ir.ops import OPS
from orion.ir.types import NUMPY_DTYPES, TensorType

#: Added to masked attention scores: large enough to zero a softmax entry, small enough for fp16.
MASK_VALUE = -1e4


def decode_placement(length: int, n: int, columns: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``slots`` and ``mask`` of :meth:`GraphBuilder.cached_attention` for a pass of ``n`` tokens after ``length``
    committed positions, as ``[columns, capacity]`` float32: column j (position ``length + j``) is placed in that
    slot (j < n) and attends to every slot up to it. The committed slots hold their positions, the fed ones are
    placed in the pass, later ones hold 0 (masked for the columns before them)."""
    position = length + np.arange(columns)[:, None]
    slot = np.arange(capacity)[None, :]
    slots = (slot == position) & (np.arange(columns)[:, None] < n)
    mask = np.where(slot <= position, np.float32(0.0), np.float32(MASK_VALUE))
    return slots.astype(np.float32), mask


class GraphBuilder:
    """``b = GraphBuilder("block"); x = b.input("x", (1, 768, 1, 64)); ...; b.output("y", y); g = b.graph``

    Every op of the registry is a method (``b.add(x, y)``, ``b.softmax(x, axis=-1)``); Python numbers given as
    operands become scalar constants of the other operand's dtype.
    """

    def __init__(self, name: str = "main"):
        self.graph = Graph(name)
        self._scope: list[str] = []
        self._eyes: dict[tuple[int, str], Value] = {}

    # -- basics --------------------------------------------------------------------------------------------------

    def input(self, name: str, shape, dtype: str = "fp16") -> Value:
        return self.graph.add_input(name, TensorType(dtype, tuple(int(d) for d in shape)))

    def output(self, name: str, value: Value) -> None:
        self.graph.set_output(name, value)

    def const(self, array, name: str = "const", dtype: str | None = None) -> Value:
        return self.graph.add_const(array, self._named(name), dtype)

    def weight(self, name: str, array, dtype: str = "fp16") -> Value:
        """A named weight tensor (becomes a BLOBFILE constant; its name is the key for weight updates)."""
        return self.const(array, name, dtype)

    def op(self, op: str, name: str | None = None, **kwargs) -> Value:
        spec = OPS[op]
        inputs, attrs = {}, {}
        tensor_names = [spec.variadic] if spec.variadic else list(spec.inputs)
        dtype = next((v.dtype for v in kwargs.values() if isinstance(v, Value)), "fp16")
        for key, val in kwargs.items():
            if key in tensor_names:
                if val is None and key in spec.optional:
                    continue
                if isinstance(val, (list, tuple)) and key == spec.variadic:
                    inputs[key] = [self._value(v, dtype) for v in val]
                else:
                    inputs[key] = self._value(val, dtype)
            else:
                attrs[key] = val
        return self.graph.add_node(op, inputs, attrs, self._named(name or op))

    def __getattr__(self, op: str):
        if op in OPS and op != "const":
            spec = OPS[op]
            positional = [spec.variadic] if spec.variadic else list(spec.inputs)

            def call(*args, name: str | None = None, **kwargs):
                if len(args) > len(positional):
                    raise GraphError(f"{op} takes {len(positional)} tensor inputs, got {len(args)}")
                kwargs.update(zip(positional, args))
                return self.op(op, name=name, **kwargs)

            return call
        raise AttributeError(op)

    def scope(self, prefix: str) -> "_Scope":
        """``with b.scope("layer0"):`` prefixes the names of nodes created inside."""
        return _Scope(self, prefix)

    def _named(self, name: str) -> str:
        return ".".join(self._scope + [name])

    def _value(self, v, dtype: str) -> Value:
        if isinstance(v, Value):
            return v
        if isinstance(v, (int, float, np.floating, np.integer)):
            return self.const(np.asarray(v, dtype=NUMPY_DTYPES[dtype]), "c")
        raise GraphError(f"expected a graph value or a number, got {type(v).__name__}")

    # -- transformer patterns ------------------------------------------------------------------------------------

    def linear(self, x: Value, weight: np.ndarray, bias: np.ndarray | None = None, name: str = "linear") -> Value:
        """``y = W x + b`` as a 1x1 conv; ``weight`` is ``[O, I]`` (PyTorch layout) or ``[O, I, 1, 1]``."""
        weight = np.asarray(weight)
        if weight.ndim == 2:
            weight = weight[:, :, None, None]
        w = self.weight(f"{name}.weight", weight, x.dtype)
        # the bias is stored [1, O, 1, 1] so the add it becomes on the ANE keeps the weight's name (for updates)
        b = None if bias is None else self.channel_vector(f"{name}.bias", bias, x.dtype)
        return self.op("conv", name=name, x=x, weight=w, bias=b)

    def channel_vector(self, name: str, values: np.ndarray, dtype: str) -> Value:
        """A per-channel parameter shaped ``[1, C, 1, 1]`` to broadcast over ``[1, C, 1, S]``."""
        return self.weight(name, np.asarray(values).reshape(1, -1, 1, 1), dtype)

    def layer_norm(self, x: Value, gamma=None, beta=None, eps: float = 1e-5, name: str = "ln") -> Value:
        """LayerNorm over channels, written with ops the ANE compiles (no layer_norm op). Without ``gamma`` and
        ``beta`` it only normalizes (a model can fold the affine part into the next linear layer)."""
        with self.scope(name):
            mean = self.reduce_mean(x, axes=[1], keep_dims=True, name="mean")
            xc = self.sub(x, mean, name="center")
            var = self.reduce_mean(self.mul(xc, xc, name="sq"), axes=[1], keep_dims=True, name="var")
            r = self.rsqrt(self.add(var, eps, name="var_eps"), name="rstd")
            y = self.mul(xc, r, name="norm")
            if gamma is not None:
                y = self.mul(y, self.channel_vector("weight", gamma, x.dtype), name="scale")
            if beta is not None:
                y = self.add(y, self.channel_vector("bias", beta, x.dtype), name="shift")
            return y

    def rms_norm(self, x: Value, gamma, eps: float = 1e-5, name: str = "rms") -> Value:
        """RMSNorm as ANE programs write it: sum of squares, times 1/d, plus eps, to the power -0.5."""
        d = x.shape[1]
        with self.scope(name):
            ss = self.reduce_sum(self.mul(x, x, name="sq"), axes=[1], keep_dims=True, name="ss")
            ms = self.add(self.mul(ss, 1.0 / d, name="ms"), eps, name="ms_eps")
            r = self.rsqrt(ms, name="rrms")
            y = self.mul(x, r, name="norm")
            return self.mul(y, self.channel_vector("weight", gamma, x.dtype), name="scale")

    def gelu_tanh(self, x: Value, name: str = "gelu") -> Value:
        return self.gelu(x, mode="TANH_APPROXIMATION", name=name)

    def swiglu(self, x: Value, w_gate, w_up, w_down, name: str = "ffn") -> Value:
        """SwiGLU FFN: ``down(silu(gate x) * up x)``."""
        with self.scope(name):
            g = self.linear(x, w_gate, name="gate")
            u = self.linear(x, w_up, name="up")
            return self.linear(self.mul(self.silu(g, name="act"), u, name="glu"), w_down, name="down")

    def gelu_mlp(self, x: Value, w_fc, b_fc, w_proj, b_proj, name: str = "mlp") -> Value:
        """GPT-2 MLP: ``proj(gelu_tanh(fc x))``."""
        with self.scope(name):
            h = self.gelu_tanh(self.linear(x, w_fc, b_fc, name="fc"), name="act")
            return self.linear(h, w_proj, b_proj, name="proj")

    def causal_mask(self, seq: int, dtype: str = "fp16") -> Value:
        """``[1, 1, S, S]`` additive mask: 0 on and below the diagonal, -1e4 above (the SDPA op ignores masks)."""
        mask = np.triu(np.full((seq, seq), MASK_VALUE, dtype=np.float32), k=1)
        return self.weight("causal_mask", mask.reshape(1, 1, seq, seq), dtype)

    def attention(self, q: Value, k: Value, v: Value, heads: int, mask: Value | None = None,
                  name: str = "attn") -> Value:
        """Causal attention written out: ``[1, d, 1, S]`` q/k/v -> ``[1, d, 1, S]``.

        reshape to ``[1, H, hd, S]``, transpose to ``[1, H, S, hd]``, ``q k^T`` (matmul with transpose_y),
        scale by ``1/sqrt(hd)``, add the mask, softmax on the last axis, times v, and back to ``[1, d, 1, S]``.
        """
        _, d, _, seq = q.shape
        if d % heads:
            raise GraphError(f"attention: {d} channels do not split into {heads} heads")
        hd = d // heads
        with self.scope(name):
            qh, kh, vh = (self.split_heads(t, heads, label) for t, label in ((q, "q"), (k, "k"), (v, "v")))
            scores = self.matmul(qh, kh, transpose_x=False, transpose_y=True, name="scores")
            scores = self.mul(scores, 1.0 / math.sqrt(hd), name="scaled")
            if mask is None:
                mask = self.causal_mask(seq, q.dtype)
            scores = self.add(scores, mask, name="masked")
            probs = self.softmax(scores, axis=-1, name="probs")
            ctx = self.matmul(probs, vh, transpose_x=False, transpose_y=False, name="ctx")  # [1, H, S, hd]
            ctx = self.transpose(ctx, perm=[0, 1, 3, 2], name="ctx_t")
            return self.reshape(ctx, shape=[1, d, 1, seq], name="merge")

    def split_heads(self, t: Value, heads: int, label: str) -> Value:
        """``[1, d, 1, S] -> [1, H, S, d/H]``: one head per slot of axis 1, positions before head channels."""
        _, d, _, seq = t.shape
        t = self.reshape(t, shape=[1, heads, d // heads, seq], name=f"{label}_heads")
        return self.transpose(t, perm=[0, 1, 3, 2], name=f"{label}_t")

    def eye(self, n: int, dtype: str = "fp16") -> Value:
        """The ``[1, 1, n, n]`` identity matrix, one constant per graph however often it is asked for (each distinct
        tensor constant takes one of a program's weight-tensor slots, ANE-21). (``identity`` is the op.)"""
        key = (n, dtype)
        if key not in self._eyes:
            self._eyes[key] = self.graph.add_const(np.eye(n, dtype=np.float32).reshape(1, 1, n, n), f"eye{n}", dtype)
        return self._eyes[key]

    def place_columns(self, new: Value, cache: Value, slots: Value, name: str) -> tuple[Value, Value]:
        """New columns put into their cache slots by a one-hot matmul: ``new [1, H, w, S]``, ``cache [1, H, w, T]``
        (0 in every slot without a committed position), ``slots [1, 1, S, T]`` (row j: a 1 at column j's position,
        or all 0) -> ``(written [1, H, w, S], full [1, H, w, T])``.

        A matmul rounds even a product by 1 (to the accumulator's grid, subnormals flushed), so ``written`` is
        ``new`` after the same matmul by the identity: what the cache must hold for a committed column, so that a
        later pass reads from the cache the very bits this one placed (placing ``written`` again changes nothing).
        """
        seq = new.shape[3]
        eye = self.eye(seq, new.dtype)
        written = self.matmul(new, eye, transpose_x=False, transpose_y=False, name=f"{name}_written")
        placed = self.matmul(written, slots, transpose_x=False, transpose_y=False, name=f"{name}_placed")
        return written, self.add(cache, placed, name=f"{name}_all")

    def cached_attention(self, q: Value, k: Value, v: Value, k_cache: Value, v_cache: Value, mask: Value,
                         slots: Value, heads: int, name: str = "attn") -> tuple[Value, Value, Value]:
        """Decode attention against a KV cache passed as inputs, with no concat (which some chips reject).

        ``q, k, v``: ``[1, d, 1, S]`` for the new positions; ``k_cache, v_cache``: ``[1, d, 1, T]``; ``slots``:
        ``[1, 1, S, T]``, the one-hot of each column's position (:meth:`place_columns`); ``mask``: ``[1, 1, S, T]``
        additive, per column (0 at the slots up to its own position, -1e4 elsewhere). The new keys and values are
        placed into their slots, and every column attends over the T slots in position order: one score matmul, one
        softmax, one matmul with the values. So a position's sums are the same products at the same indices whether
        its earlier positions come from the cache (a one-token pass) or from this pass (a verification of several),
        and S tokens verify in one pass with the logits, bit for bit, of S one-token passes. Masked slots weigh
        exactly 0, whatever they hold. Returns the attention ``[1, d, 1, S]`` and the k and v to commit
        (``written``, ``[1, d, 1, S]``).
        """
        _, d, _, seq = q.shape
        cap = k_cache.shape[3]
        hd = d // heads
        with self.scope(name):
            qh = self.split_heads(q, heads, "q")  # [1, H, S, hd]
            k_new, v_new = (self.reshape(t, shape=[1, heads, hd, seq], name=f"{label}_heads")
                            for t, label in ((k, "k"), (v, "v")))
            kc, vc = (self.reshape(t, shape=[1, heads, hd, cap], name=f"{label}_heads")
                      for t, label in ((k_cache, "kc"), (v_cache, "vc")))
            k_written, k_all = self.place_columns(k_new, kc, slots, "k")  # [1, H, hd, T]
            v_written, v_all = self.place_columns(v_new, vc, slots, "v")
            scores = self.matmul(qh, k_all, transpose_x=False, transpose_y=False, name="qk")  # [1, H, S, T]
            scores = self.add(self.mul(scores, 1.0 / math.sqrt(hd), name="qk_scaled"), mask, name="qk_masked")
            probs = self.softmax(scores, axis=-1, name="probs")
            ctx = self.matmul(probs, v_all, transpose_x=False, transpose_y=True, name="ctx")  # [1, H, S, hd]
            ctx = self.transpose(ctx, perm=[0, 1, 3, 2], name="ctx_t")
            return tuple(self.reshape(t, shape=[1, d, 1, seq], name=label)
                         for t, label in ((ctx, "merge"), (k_written, "k_out"), (v_written, "v_out")))

    def lora_down(self, x: Value, a: Value, name: str = "lora") -> Value:
        """``A x`` of a LoRA path: ``x [1, I, 1, S]`` and ``a [1, 1, r, I]`` (a program input) -> ``[1, 1, r, S]``."""
        _, cin, h, seq = x.shape
        rows = self.reshape(x, shape=[1, 1, cin, h * seq], name=f"{name}_rows")
        return self.matmul(a, rows, transpose_x=False, transpose_y=False, name=f"{name}_down")

    def lora_up(self, u: Value, b: Value, name: str = "lora") -> Value:
        """``B u`` back in the channel layout: ``u [1, 1, r, S]`` and ``b [1, 1, O, r]`` -> ``[1, O, 1, S]``. The
        adapter's scale is folded into ``b``, so the path is two matmuls on inputs: a new adapter is an input write."""
        out = self.matmul(b, u, transpose_x=False, transpose_y=False, name=f"{name}_up")
        return self.reshape(out, shape=[1, b.shape[2], 1, u.shape[3]], name=f"{name}_cols")

    def cast(self, x: Value, dtype: str, name: str | None = None) -> Value:
        return self.op("cast", name=name or f"to_{dtype}", x=x, dtype=dtype)


class _Scope:
    def __init__(self, builder: GraphBuilder, prefix: str):
        self.builder, self.prefix = builder, prefix

    def __enter__(self):
        self.builder._scope.append(self.prefix)

    def __exit__(self, *exc):
        self.builder._scope.pop()
