"""GPT-2 on the ANE (or its emulator): Hugging Face weights in, text out.

Design (docs/gpt2.md has the reasoning and the numbers):

* The transformer blocks run as compiled programs in the ANE layout ``[1, C, 1, S]``; embeddings run on the CPU,
  and the final LayerNorm and the tied classifier either on the CPU in float32 (the default: one BLAS call) or,
  with ``head="ane"``, on the ANE split along the vocabulary (:mod:`orion.models.head`; the 50,257 x 768
  classifier is past the per-axis limit of older chips).
* Several blocks per program, as many as the target's weight-tensor limit allows (ANE-21): each LayerNorm's affine
  part is folded into the linear layer after it, so a block costs 8 weight constants, the causal mask is an input,
  and the program's scalar constants (at most 8, shared by its blocks once the compiler merges equal ones) take the
  rest. Under a 16-tensor limit that is one block per program.
* Prefill runs on the smallest sequence bucket (32 ... 1024) that holds the prompt. Decode runs on the smallest
  surface known to work, with the new token in column 0: 16 fp32 columns where the target takes fp32 I/O, else 32
  fp16 columns (M1 rejects fp32 I/O); both have 64-byte rows. The KV cache lives in the decode programs' input
  surfaces and each step writes one column into it, so a token costs one dispatch per program and no copies of the
  cache. Attention against the cache needs no concat (rejected on some chips): the cache's scores and the
  token's own score share one softmax written out with a common maximum.
* LoRA adapters (PEFT's GPT-2 layout: ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are program
  inputs ``h{i}_lora_{target}_a/_b`` next to the baked base weights. Where the adapted layer's input LayerNorm is
  folded, the adapter is folded the same way: ``A' = A diag(gamma)`` and a bias input ``_c = s B A beta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from orion.compiler.passes import WeightCompression
from orion.compiler.targets import Target, get_target
from orion.errors import BindingError, OrionError
from orion.ir.builder import MASK_VALUE, GraphBuilder
from orion.lora import Adapter, AdapterSpec, LoraLayout
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from orion.models.head import VocabHead
from orion.models.lm import CachedDecoder, check_token_ids
from orion.models.spill import SpilledList
from orion.runtime.program import get_backend

PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024)
#: Weight constants one block needs once LayerNorms are folded: c_attn, attn c_proj, c_fc, mlp c_proj (w and b).
CONSTANTS_PER_BLOCK = 8
#: Distinct small constants a program reads, whatever its number of blocks (each takes a weight-tensor slot, ANE-21):
#: LayerNorm's eps and -0.5 exponent, the attention scale, decode's identity (place_columns), the tanh GELU's four.
SCALAR_CONSTANTS = 8


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_hf(cls, config: dict) -> "GPT2Config":
        if config.get("model_type") != "gpt2":
            raise OrionError(f"model_type {config.get('model_type')!r} is not gpt2")
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise OrionError(f"GPT-2 activation {act!r} is not supported; Orion runs the tanh form (gelu_new)")
        missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in config]
        if missing:
            raise OrionError(f"config.json lacks {missing}")
        if config["n_embd"] % config["n_head"]:
            raise OrionError(f"n_embd {config['n_embd']} does not split into {config['n_head']} heads")
        return cls(config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"],
                   config["n_head"], float(config.get("layer_norm_epsilon", 1e-5)))


@dataclass
class BlockWeights:
    """One block with LayerNorm affines folded in; linear weights in PyTorch ``[out, in]`` layout, float32."""

    qkv_w: np.ndarray
    qkv_b: np.ndarray
    proj_w: np.ndarray
    proj_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray
    ln_1: tuple[np.ndarray, np.ndarray]  # the folded LayerNorms' (gamma, beta), for folding adapters the same way
    ln_2: tuple[np.ndarray, np.ndarray]


def _fold_norm(gamma: np.ndarray, beta: np.ndarray, w_in_out: np.ndarray, bias: np.ndarray):
    """``linear(LN(x))`` with LN's affine moved into the linear layer: ``W (g * n + b) + c = (W g) n + (W b + c)``.
    ``w_in_out`` is Hugging Face's Conv1D layout ``[in, out]``."""
    w = w_in_out.T.astype(np.float64)  # [out, in]
    return (w * gamma[None, :]).astype(np.float32), (w @ beta + bias).astype(np.float32)


def gpt2_weights(state: Mapping[str, np.ndarray], config: GPT2Config, spill: bool = False):
    """Hugging Face GPT-2 tensors -> (embeddings, folded blocks, final norm). Names with or without
    ``transformer.``; a missing or misshapen tensor is an error that names it. ``spill``: the blocks go to a
    temporary file as they are folded (a :class:`~orion.models.spill.SpilledList`), not a list in memory."""
    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        for key in (f"transformer.{name}", name):
            if key in state:
                array = np.asarray(state[key], dtype=np.float32)
                if array.shape != shape:
                    raise OrionError(f"weight {key} has shape {list(array.shape)}; GPT-2 with this config needs "
                                     f"{list(shape)}")
                return array
        raise OrionError(f"weight {name} is missing from the checkpoint")

    d, v, p = config.n_embd, config.vocab_size, config.n_positions

    def block(i: int) -> BlockWeights:
        h = f"h.{i}"
        ln_1 = get(f"{h}.ln_1.weight", (d,)), get(f"{h}.ln_1.bias", (d,))
        ln_2 = get(f"{h}.ln_2.weight", (d,)), get(f"{h}.ln_2.bias", (d,))
        qkv_w, qkv_b = _fold_norm(*ln_1, get(f"{h}.attn.c_attn.weight", (d, 3 * d)),
                                  get(f"{h}.attn.c_attn.bias", (3 * d,)))
        fc_w, fc_b = _fold_norm(*ln_2, get(f"{h}.mlp.c_fc.weight", (d, 4 * d)), get(f"{h}.mlp.c_fc.bias", (4 * d,)))
        return BlockWeights(
            qkv_w, qkv_b,
            get(f"{h}.attn.c_proj.weight", (d, d)).T.copy(), get(f"{h}.attn.c_proj.bias", (d,)),
            fc_w, fc_b,
            get(f"{h}.mlp.c_proj.weight", (4 * d, d)).T.copy(), get(f"{h}.mlp.c_proj.bias", (d,)),
            ln_1, ln_2,
        )

    folded = (block(i) for i in range(config.n_layer))
    blocks = SpilledList(folded) if spill else list(folded)
    embeddings = (get("wte.weight", (v, d)), get("wpe.weight", (p, d)))
    final_norm = (get("ln_f.weight", (d,)), get("ln_f.bias", (d,)))
    return embeddings, blocks, final_norm


# ---------------------------------------------------------------------------------------------------------------------
# Adapters

#: PEFT's names for the projections of a GPT-2 block, by Orion's short target name.
LORA_MODULES = {"qkv": "attn.c_attn", "o": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}
#: Targets whose input LayerNorm is folded into the base weights, and the norm.
_FOLDED = {"qkv": "ln_1", "fc": "ln_2"}


def adapter_spec(config: GPT2Config) -> AdapterSpec:
    d = config.n_embd
    return AdapterSpec("gpt2", "transformer.h", LORA_MODULES,
                       {"qkv": (d, 3 * d), "o": (d, d), "fc": (d, 4 * d), "proj": (4 * d, d)}, config.n_layer,
                       default_targets=("qkv",), aliases={"attn": ("qkv", "o"), "ffn": ("fc", "proj")},
                       fan_in_fan_out=True)


def lora_input_name(layer: int, target: str, part: str) -> str:
    return f"h{layer:02d}_lora_{target}_{part}"


def lora_inputs(adapter: Adapter | None, layout: LoraLayout, blocks: list[BlockWeights], first: int,
                config: GPT2Config) -> dict[str, np.ndarray]:
    """The adapter inputs of the programs for blocks ``first ...`` (zeros where ``adapter`` lacks a module)."""
    spec = adapter_spec(config)
    values = {}
    for j, w in enumerate(blocks):
        layer = first + j
        for target in layout.targets:
            fan_in, fan_out = spec.features[target]
            a, b = layout.slot(adapter, layer, target, spec)
            if target in _FOLDED:
                gamma, beta = getattr(w, _FOLDED[target])
                values[lora_input_name(layer, target, "c")] = (b @ (a @ beta)).reshape(1, 1, 1, fan_out)
                a = a * gamma[None, :]
            values[lora_input_name(layer, target, "a")] = a.reshape(1, 1, layout.rank, fan_in)
            values[lora_input_name(layer, target, "b")] = b.reshape(1, 1, fan_out, layout.rank)
    return values


def _adapted(b: GraphBuilder, y, x, target: str, layer: int, lora: LoraLayout | None):
    """``y`` plus the adapter path of ``target`` when the layout adapts it: ``B (A x)`` (+ ``c`` where folded)."""
    if lora is None or target not in lora.targets:
        return y
    a = b.input(lora_input_name(layer, target, "a"), (1, 1, lora.rank, x.shape[1]))
    w_b = b.input(lora_input_name(layer, target, "b"), (1, 1, y.shape[1], lora.rank))
    y = b.add(y, b.lora_up(b.lora_down(x, a, name=f"lora_{target}"), w_b, name=f"lora_{target}"),
              name=f"{target}_adapted")
    if target in _FOLDED:  # the bias is an input row (64-byte multiple, ANE-35), added as [1, O, 1, 1]
        c = b.input(lora_input_name(layer, target, "c"), (1, 1, 1, y.shape[1]))
        y = b.add(y, b.reshape(c, shape=[1, y.shape[1], 1, 1], name=f"{target}_adapted_bias_channels"),
                  name=f"{target}_adapted_bias")
    return y


# ---------------------------------------------------------------------------------------------------------------------
# Programs

#: Where a block's keys or values are: the prefill programs' outputs, the decode programs' cache inputs, and the
#: decode programs' outputs holding the new position's column.
_KV_ROLES = {"prefill": "", "cache": "c", "new": "n"}


def kv_name(kind: str, layer: int, role: str) -> str:
    """The program tensor holding block ``layer``'s keys (``kind`` "k") or values ("v") in ``role``: ``k03``,
    ``kc03``, ``kn03``."""
    return f"{kind}{_KV_ROLES[role]}{layer:02d}"


def _block_start(b: GraphBuilder, x, w: BlockWeights, config: GPT2Config, layer: int, lora: LoraLayout | None):
    """LN_1 (folded) and the fused q/k/v projection."""
    d = config.n_embd
    seq = x.shape[3]
    normed = b.layer_norm(x, eps=config.layer_norm_epsilon, name="ln_1")
    qkv = _adapted(b, b.linear(normed, w.qkv_w, w.qkv_b, name="c_attn"), normed, "qkv", layer, lora)
    return [b.slice_by_index(qkv, begin=[0, i * d, 0, 0], end=[1, (i + 1) * d, 1, seq], name=n)
            for i, n in enumerate("qkv")]


def _block_end(b: GraphBuilder, x, attn, w: BlockWeights, config: GPT2Config, layer: int, lora: LoraLayout | None):
    """Attention output projection, residual, LN_2 (folded), MLP, residual."""
    x = b.add(x, _adapted(b, b.linear(attn, w.proj_w, w.proj_b, name="c_proj"), attn, "o", layer, lora),
              name="res_1")
    n = b.layer_norm(x, eps=config.layer_norm_epsilon, name="ln_2")
    h = b.gelu_tanh(_adapted(b, b.linear(n, w.fc_w, w.fc_b, name="c_fc"), n, "fc", layer, lora), name="gelu")
    return b.add(x, _adapted(b, b.linear(h, w.out_w, w.out_b, name="mlp_proj"), h, "proj", layer, lora),
                 name="res_2")


def prefill_graph(blocks: list[BlockWeights], first: int, config: GPT2Config, seq: int,
                  lora: LoraLayout | None = None):
    """Blocks ``first ...`` over a ``seq`` bucket: inputs x and the causal mask (and the adapter inputs of
    ``lora``); outputs y and each block's k, v."""
    b = GraphBuilder(f"gpt2_prefill{seq}_h{first}")
    x = b.input("x", (1, config.n_embd, 1, seq))
    mask = b.input("mask", (1, 1, seq, seq))
    for j, w in enumerate(blocks):
        i = first + j
        with b.scope(f"h{i}"):
            q, k, v = _block_start(b, x, w, config, i, lora)
            x = _block_end(b, x, b.attention(q, k, v, config.n_head, mask=mask), w, config, i, lora)
        b.output(kv_name("k", i, "prefill"), k)
        b.output(kv_name("v", i, "prefill"), v)
    b.output("y", x)
    return b.graph


def decode_io(target: Target) -> tuple[str, int]:
    """The dtype and column count of the decode programs' per-token tensors (x, y, the new k and v).

    ``[768, 16]`` fp32 is the surface reported to work, and its 64-byte rows read the same whether the ANE reads
    packed or 64-byte-aligned rows (ANE-35). Where the target takes no fp32 I/O (M1), 32 fp16 columns give the same
    rows and surface size. Values are the same either way: the program rounds x to fp16 where an fp16 input is
    rounded on the way in, and fp32 outputs are exact widenings of fp16 results."""
    return ("fp32", 16) if "fp32" in target.io_dtypes else ("fp16", 32)


def decode_graph(blocks: list[BlockWeights], first: int, config: GPT2Config, capacity: int,
                 lora: LoraLayout | None = None, *, target: Target):
    """Blocks ``first ...`` for new tokens in a bucket of :func:`decode_io` columns against a KV cache of
    ``capacity`` positions. Each column attends to the slots its row of ``mask`` allows, the new keys and values
    placed into their slots (``slots``, one-hot): one evaluation runs one token (column 0) or verifies several
    drafted ones, with the same logits bit for bit (:meth:`GraphBuilder.cached_attention`)."""
    b = GraphBuilder(f"gpt2_decode{capacity}_h{first}")
    d = config.n_embd
    io_dtype, columns = decode_io(target)

    def out(name: str, value):
        b.output(name, b.cast(value, io_dtype, name=f"{name}_{io_dtype}"))

    x = b.cast(b.input("x", (1, d, 1, columns), dtype=io_dtype), "fp16", name="x_fp16")
    mask = b.input("mask", (1, 1, columns, capacity))
    slots = b.input("slots", (1, 1, columns, capacity))
    for j, w in enumerate(blocks):
        i = first + j
        kc = b.input(kv_name("k", i, "cache"), (1, d, 1, capacity))
        vc = b.input(kv_name("v", i, "cache"), (1, d, 1, capacity))
        with b.scope(f"h{i}"):
            q, k, v = _block_start(b, x, w, config, i, lora)
            attn, k, v = b.cached_attention(q, k, v, kc, vc, mask, slots, config.n_head)
            x = _block_end(b, x, attn, w, config, i, lora)
        out(kv_name("k", i, "new"), k)
        out(kv_name("v", i, "new"), v)
    out("y", x)
    return b.graph


def blocks_per_program(target: Target, n_layer: int) -> int:
    """As many blocks as the target's weight-tensor limit holds next to the program's scalar constants (ANE-21)."""
    limit = target.max_blob_constants
    if limit is None:
        return n_layer
    return max(1, min(n_layer, (limit - SCALAR_CONSTANTS) // CONSTANTS_PER_BLOCK))


def causal_mask(seq: int) -> np.ndarray:
    return np.triu(np.full((seq, seq), MASK_VALUE, np.float32), k=1).reshape(1, 1, seq, seq)


def bucket_for(length: int, buckets=PREFILL_BUCKETS) -> int:
    for size in buckets:
        if size >= length:
            return size
    raise BindingError(f"a sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


# ---------------------------------------------------------------------------------------------------------------------
# The model


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


class GPT2(VocabHead, CachedDecoder):
    """``model = GPT2(config, state, tokenizer)``; ``model.logits(ids)``; ``model.generate(prompt)``;
    ``model.load_adapter(path, name)`` and ``model.set_adapter(name)`` for LoRA adapters. ``head="ane"`` runs the
    final LayerNorm and the classifier on the ANE, split along the vocabulary (``cpu``, the default, is float32
    BLAS)."""

    def __init__(self, config: GPT2Config, state: dict[str, np.ndarray], tokenizer=None, *, backend="auto",
                 target: Target | str = "default", cache: ProgramCache | None = None,
                 budget: CompileBudget | None = None, quantize=None, head: str = "cpu"):
        """``quantize``: compress the blocks' weights once, when their programs compile (``compile_graph``'s
        ``weights``: ``"int8"``, ``"int4/32"``, ``"lut4"``, a WeightCompression); the classifier stays fp16 (on
        the ANE) or float32 (on the CPU)."""
        self._init_head(head)
        self.config = config
        self.quantize = WeightCompression.of(quantize)
        self.tokenizer = tokenizer
        self.target = get_target(target)
        self.backend = get_backend(backend, self.target)
        # the blocks' float32 weights are read only to build programs (which then hold them): kept in a file
        (self.wte, self.wpe), self.blocks, self.final_norm = gpt2_weights(state, config, spill=True)
        self.head_w = self.wte  # tied
        self.group = blocks_per_program(self.target, config.n_layer)
        self.cache = cache
        self.budget = budget
        self.context = config.n_positions
        self.adapter_spec = adapter_spec(config)
        self._init_programs()

    # -- programs -----------------------------------------------------------------------------------------------

    def _block_pattern(self, layer: int) -> str:
        return f"h{layer}_*"

    def _graph(self, kind: str, size: int, first: int):
        blocks = self.blocks[first:first + self.group]
        return (prefill_graph(blocks, first, self.config, size, self.lora) if kind == "prefill" else
                decode_graph(blocks, first, self.config, size, self.lora, target=self.target))

    def _adapter_inputs(self, adapter: Adapter | None, first: int) -> dict[str, np.ndarray]:
        return lora_inputs(adapter, self.lora, self.blocks[first:first + self.group], first, self.config)

    # -- forward ------------------------------------------------------------------------------------------------

    def _check_ids(self, ids) -> np.ndarray:
        return check_token_ids(ids, self.config.vocab_size, self.config.n_positions)

    def _embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        return self.wte[ids] + self.wpe[start:start + ids.size]

    #: Weight-tensor slots of a classifier program besides its chunks: the scalars and LayerNorm's gain and bias.
    head_constants = SCALAR_CONSTANTS + 2

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _head_norm(self, b: GraphBuilder, x):
        """The final LayerNorm in a classifier program."""
        return b.layer_norm(x, *self.final_norm, eps=self.config.layer_norm_epsilon, name="ln_f")

    def _cpu_head(self, hidden: np.ndarray) -> np.ndarray:
        """Final LayerNorm and the tied classifier on the CPU, float32: ``[n, d] -> [n, vocab]``."""
        g, b = self.final_norm
        return _layer_norm(hidden, g, b, self.config.layer_norm_epsilon) @ self.wte.T

    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
        """Run the prompt; returns the last block's hidden rows [n, d], every block's k/v [d, n], the bucket."""
        n = ids.size
        seq = bucket_for(n)
        x = np.zeros((1, self.config.n_embd, 1, seq), np.float32)
        x[0, :, 0, :n] = self._embed(ids, 0).T
        mask = causal_mask(seq)
        kv: dict[str, np.ndarray] = {}
        for program in self.programs("prefill", seq):
            out = program.run({"x": x, "mask": mask})
            x = out.pop("y")
            kv.update({name: array[0, :, 0, :n] for name, array in out.items()})
        return x[0, :, 0, :n].T, kv, seq

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits ``[len, vocab]`` for every position of one sequence (the prefill programs)."""
        ids = self._check_ids(token_ids)
        hidden, _, _ = self._prefill(ids)
        return self._head(hidden)

    # -- decode (CachedDecoder.generate_ids and its sessions) ---------------------------------------------------

    #: The cache tensors of a block (names by :func:`kv_name`).
    cache_parts = ("k", "v")

    def _mask_input(self, mask: np.ndarray) -> np.ndarray:
        return mask[None, None]

    def _decode_inputs(self, tokens: np.ndarray, start: int, columns: int) -> tuple[np.ndarray, dict]:
        return self._embed(tokens, start), {}
