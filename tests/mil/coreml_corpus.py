"""A corpus of foreign programs: common torch and Hugging Face modules, converted by coremltools at test time.

Each case builds a module with random parameters (norm gains and biases too), its example inputs, and the
deployment target to convert for. :func:`outcome` converts it (``torch.jit.trace`` then ``ct.convert`` to an ML
program at ``FLOAT16`` precision), saves the ``.mlpackage``, runs it on the emulator and compares with torch's own
output in float32: the reference is never the emulator.

Left out because coremltools 9 itself cannot convert them (under torch 2.13 and transformers 5): a whole
``LlamaForCausalLM`` (traced: its ``int`` conversion fails on a shape; exported: no conversion for the ``alias``
node), a whole ``GPT2LMHeadModel`` without an explicit 4D mask (no conversion for ``diff``/``new_ones``), and
``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` traced (hence ``via="export"`` for those).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from orion.errors import OrionError
from orion.runtime.backends.emulator import load_program

#: |emulator - torch| <= RTOL * max(1, max|torch|): fp16 storage of every intermediate, over a few layers.
RTOL = 2e-2


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple]  # -> (module, inputs as a tuple of torch tensors)
    target: str = "iOS17"  # coremltools' minimum_deployment_target
    slow: bool = False  # kept out of the default run (conversion time)
    #: ``trace`` (torch.jit.trace) or ``export`` (torch.export), for modules coremltools converts only from the
    #: latter (attention modules whose traced shape arithmetic, under torch 2.13, coremltools' ``int`` conversion
    #: refuses).
    via: str = "trace"


@dataclass
class Outcome:
    case: str
    status: str  # "match", "wrong" (ran, disagrees with torch), "refused" (an OrionError), "crash" (anything else)
    detail: str  # the error message, or the error found


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def _randomize_norms(module) -> None:
    """Norm gains 1 + N(0, 0.2) and biases N(0, 0.2): at their init (1 and 0) a dropped gain would pass."""
    torch = _torch()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
            if type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight"):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))


def _wrap(fn, *modules):
    """A module computing ``fn(*inputs)``, with the ``modules`` it calls registered (their parameters are the
    traced program's weights)."""
    torch = _torch()

    class Fn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList(modules)

        def forward(self, *xs):
            return fn(*xs)

    return Fn()


def _first(out):
    """A transformers layer's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


# -- the cases ---------------------------------------------------------------------------------------------------


def _linear():
    torch = _torch()
    return torch.nn.Linear(32, 48), (torch.randn(4, 32),)


def _mlp(act: str):
    def build():
        torch = _torch()
        acts = {"gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"), "silu": torch.nn.SiLU(),
                "relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid()}
        mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), acts[act], torch.nn.Linear(64, 16))
        return mlp, (torch.randn(2, 8, 32),)
    return build


def _layer_norm():
    torch = _torch()
    m = torch.nn.LayerNorm(64)
    _randomize_norms(m)
    return m, (2 + 3 * torch.randn(2, 5, 64),)


def _rms_norm():
    torch = _torch()
    weight = 1 + 0.2 * torch.randn(64)
    return _wrap(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight), (torch.randn(3, 64),)


def _conv1d():
    torch = _torch()
    return torch.nn.Conv1d(8, 16, kernel_size=3, stride=2, padding=1), (torch.randn(1, 8, 40),)


def _conv2d():
    torch = _torch()
    return torch.nn.Conv2d(8, 12, kernel_size=3, stride=2, padding=1, groups=4), (torch.randn(1, 8, 15, 17),)


def _conv2d_dilated():
    torch = _torch()
    return torch.nn.Conv2d(6, 4, kernel_size=(3, 5), padding=(2, 1), dilation=2), (torch.randn(2, 6, 12, 12),)


def _conv_transpose2d():
    torch = _torch()
    return torch.nn.ConvTranspose2d(8, 4, kernel_size=4, stride=2, padding=1), (torch.randn(1, 8, 6, 7),)


def _conv_bn_relu():
    torch = _torch()
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    _randomize_norms(m)
    return m.eval(), (torch.randn(1, 4, 10, 10),)


def _pooling():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda x: torch.cat([f.max_pool2d(x, 3, stride=2, padding=1), f.avg_pool2d(x, 2, stride=2)], 1)), (
        torch.randn(1, 4, 12, 12),)


def _global_pool():
    torch = _torch()
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)), (
        torch.randn(2, 8, 7, 7),)


def _softmax_axis1():
    torch = _torch()
    return _wrap(lambda x: torch.softmax(3 * x, dim=1)), (torch.randn(2, 10, 6),)


def _sdpa():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda q, k, v: f.scaled_dot_product_attention(q, k, v)), (
        torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32))


def _sdpa_mask():
    torch = _torch()
    f = torch.nn.functional
    mask = torch.randn(16, 16)
    return _wrap(lambda q, k, v: f.scaled_dot_product_attention(q, k, v, attn_mask=mask)), (
        torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32))


def _sdpa_causal():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda q, k, v: f.scaled_dot_product_attention(q, k, v, is_causal=True)), (
        torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32))


def _attention_by_hand():
    torch = _torch()
    causal = torch.full((12, 12), float("-inf")).triu(1)

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, dim=-1) @ v

    return _wrap(attend), (torch.randn(2, 12, 16), torch.randn(2, 12, 16), torch.randn(2, 12, 16))


def _multihead_attention():
    torch = _torch()
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    return _wrap(lambda x: mha(x, x, x, need_weights=False)[0], mha), (torch.randn(1, 10, 32),)


def _embedding():
    torch = _torch()
    emb = torch.nn.Embedding(50, 16)
    return _wrap(lambda ids: emb(ids) * 2, emb), (torch.randint(0, 50, (2, 7)),)


def _gather_along_axis():
    torch = _torch()
    index = torch.randint(0, 8, (3, 5))
    return _wrap(lambda x: torch.gather(x, 1, index)), (torch.randn(3, 8),)


def _layout():
    torch = _torch()

    def shuffle(x):
        y = x.permute(0, 2, 1).reshape(2, 4, 12)
        return torch.cat([y[:, 1:3], y.flip(1)[:, :2]], dim=1).unsqueeze(1).squeeze(1)

    return _wrap(shuffle), (torch.randn(2, 12, 4),)


def _elementwise():
    torch = _torch()
    f = torch.nn.functional

    def zoo(x):
        return (f.leaky_relu(x, 0.1) + f.elu(x) + f.softplus(x) + f.relu6(3 * x) + torch.clamp(x, -0.5, 0.7)
                + torch.abs(x).sqrt() + torch.exp(-x * x) + torch.sin(x) * torch.cos(x) + torch.erf(x))

    return _wrap(zoo), (torch.randn(4, 32),)


def _cumsum_tril():
    torch = _torch()
    return _wrap(lambda x: torch.cumsum(x, dim=-1) + torch.tril(x)), (torch.randn(3, 8, 8),)


def _pad():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda x: f.pad(x, (1, 2, 0, 3), value=0.5) * 2), (torch.randn(1, 3, 5, 6),)


def _einsum():
    torch = _torch()
    return _wrap(lambda a, b: torch.einsum("bhqd,bhkd->bhqk", a, b)), (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8))


def _chunk():
    torch = _torch()
    return _wrap(lambda x: (lambda a, b: a * torch.sigmoid(b))(*x.chunk(2, dim=-1))), (torch.randn(2, 16),)


def _argmax():
    torch = _torch()
    return _wrap(lambda x: torch.argmax(x, dim=-1).to(torch.int32)), (torch.randn(3, 10),)


def _encoder_layer():
    torch = _torch()
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    _randomize_norms(layer)
    return layer.eval(), (torch.randn(1, 10, 32),)


def _gpt2_block():
    torch = _torch()
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(n_embd=32, n_head=4, n_layer=1, n_positions=16, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    block = GPT2Block(config).eval()
    _randomize_norms(block)
    return _wrap(lambda x: _first(block(x)), block), (torch.randn(1, 8, 32),)


def _decoder_layer(config_cls, layer_cls, rotary_cls):
    """A Llama-style decoder layer (grouped-query attention, RoPE) of transformers' ``layer_cls``, causal over 8
    positions."""
    torch = _torch()
    config = config_cls(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=1, max_position_embeddings=32, attn_implementation="eager")
    layer = layer_cls(config, layer_idx=0).eval()
    rotary = rotary_cls(config)
    _randomize_norms(layer)
    seq = 8
    positions = torch.arange(seq)[None]
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]

    def forward(x):
        return _first(layer(x, attention_mask=causal, position_embeddings=rotary(x, positions),
                            position_ids=positions))

    return _wrap(forward, layer, rotary), (torch.randn(1, seq, 32),)


def _llama_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    return _decoder_layer(LlamaConfig, LlamaDecoderLayer, LlamaRotaryEmbedding)


def _gpt2_model():
    torch = _torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=16, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    model = GPT2LMHeadModel(config).eval()
    _randomize_norms(model)
    mask = torch.full((8, 8), float("-inf")).triu(1)[None, None]  # a 4D mask is used as given (no mask building)
    return _wrap(lambda ids: model(ids, attention_mask=mask, use_cache=False).logits, model), (
        torch.randint(0, 64, (1, 8)),)


def _upsample_nearest():
    torch = _torch()
    m = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(3, 4, 3, padding=1))
    return m, (torch.randn(1, 3, 5, 6),)


def _upsample_bilinear():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda x: f.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)), (
        torch.randn(1, 3, 5, 6),)


def _group_norm():
    torch = _torch()
    m = torch.nn.GroupNorm(4, 8)
    _randomize_norms(m)
    return m, (torch.randn(2, 8, 5, 5),)


def _instance_norm():
    torch = _torch()
    m = torch.nn.InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(6))
        m.bias.copy_(0.2 * torch.randn(6))
    return m, (torch.randn(1, 6, 7, 7),)


def _pixel_shuffle():
    torch = _torch()
    return torch.nn.PixelShuffle(2), (torch.randn(1, 8, 3, 4),)


def _hard_activations():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda x: f.hardswish(x) + f.hardsigmoid(x) * f.mish(x)), (torch.randn(4, 16),)


def _log_softmax():
    torch = _torch()
    return torch.nn.LogSoftmax(dim=-1), (torch.randn(3, 20),)


def _stack_where():
    torch = _torch()
    return _wrap(lambda x, y: torch.stack([torch.where(x > y, x, y), x * y], dim=1)), (
        torch.randn(3, 5), torch.randn(3, 5))


def _normalize():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda x: f.normalize(x, dim=-1) * 3), (torch.randn(4, 16),)


def _max_over_dim():
    torch = _torch()
    return _wrap(lambda x: x.max(dim=1).values + x.mean(dim=1) - x.min(dim=1).values), (torch.randn(3, 7, 5),)


def _conv2d_same():
    torch = _torch()
    return torch.nn.Conv2d(4, 6, kernel_size=(3, 4), padding="same"), (torch.randn(1, 4, 9, 9),)


def _bert_layer():
    torch = _torch()
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    layer = BertLayer(config).eval()
    _randomize_norms(layer)
    return _wrap(lambda x: _first(layer(x)), layer), (torch.randn(1, 8, 32),)


def _lstm():
    torch = _torch()
    lstm = torch.nn.LSTM(8, 16, batch_first=True)
    return _wrap(lambda x: lstm(x)[0], lstm), (torch.randn(1, 5, 8),)


def _prelu():
    torch = _torch()
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.PReLU(6))
    with torch.no_grad():
        m[1].weight.copy_(0.1 + 0.3 * torch.rand(6))
    return m, (torch.randn(1, 3, 4, 5),)


def _topk():
    torch = _torch()
    return _wrap(lambda x: torch.topk(x, 3, dim=-1).values), (torch.randn(4, 10),)


def _variance():
    torch = _torch()
    def standardize(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)

    return _wrap(standardize), (2 + torch.randn(3, 24),)


def _masked_fill():
    torch = _torch()
    return _wrap(lambda x: x.masked_fill(x < -0.5, -3.0).softmax(-1)), (torch.randn(2, 3, 9),)


def _bert_model():
    torch = _torch()
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        num_hidden_layers=2, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False).eval()
    _randomize_norms(model)
    mask = torch.zeros(1, 1, 8, 8)  # a 4D additive mask is used as given (no mask building to convert)
    return _wrap(lambda ids: model(ids, attention_mask=mask).last_hidden_state, model), (
        torch.randint(0, 64, (1, 8)),)


def _vit_layer():
    torch = _torch()
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    config = ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    layer = ViTLayer(config).eval()
    _randomize_norms(layer)
    return _wrap(lambda x: _first(layer(x)), layer), (torch.randn(1, 9, 32),)


def _qwen2_layer():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    return _decoder_layer(Qwen2Config, Qwen2DecoderLayer, Qwen2RotaryEmbedding)


def _depthwise_conv_block():
    torch = _torch()
    m = torch.nn.Sequential(torch.nn.Conv1d(16, 16, 5, padding=2, groups=16), torch.nn.GELU(),
                            torch.nn.Conv1d(16, 24, 1), torch.nn.GroupNorm(1, 24))
    _randomize_norms(m)
    return m, (torch.randn(2, 16, 30),)


def _sdpa_gqa():
    torch = _torch()
    f = torch.nn.functional
    return _wrap(lambda q, k, v: f.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True)), (
        torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))


CASES = [
    Case("linear_ios16", _linear, "iOS16"),
    Case("linear_ios18", _linear, "iOS18"),
    Case("mlp_gelu", _mlp("gelu")),
    Case("mlp_gelu_tanh", _mlp("gelu_tanh"), slow=True),
    Case("mlp_silu", _mlp("silu"), "iOS18"),
    Case("mlp_relu", _mlp("relu"), "iOS16", slow=True),
    Case("mlp_tanh", _mlp("tanh"), slow=True),
    Case("mlp_sigmoid", _mlp("sigmoid"), slow=True),
    Case("layer_norm", _layer_norm, "iOS16"),
    Case("rms_norm", _rms_norm),
    Case("conv1d_stride_pad", _conv1d),
    Case("conv2d_groups", _conv2d, "iOS18"),
    Case("conv2d_dilated", _conv2d_dilated, slow=True),
    Case("conv_transpose2d", _conv_transpose2d, slow=True),
    Case("conv_bn_relu", _conv_bn_relu, slow=True),
    Case("pooling", _pooling),
    Case("global_pool_linear", _global_pool, slow=True),
    Case("softmax_axis1", _softmax_axis1),
    Case("sdpa_ios17", _sdpa),
    Case("sdpa_ios18", _sdpa, "iOS18"),
    Case("sdpa_mask_ios18", _sdpa_mask, "iOS18"),
    Case("sdpa_causal", _sdpa_causal, "iOS18", slow=True),
    Case("attention_by_hand", _attention_by_hand, slow=True),
    Case("multihead_attention", _multihead_attention, slow=True, via="export"),
    Case("embedding", _embedding),
    Case("gather_along_axis", _gather_along_axis, slow=True),
    Case("layout", _layout),
    Case("elementwise", _elementwise, slow=True),
    Case("cumsum_tril", _cumsum_tril, slow=True),
    Case("pad", _pad, slow=True),
    Case("einsum", _einsum, slow=True),
    Case("chunk_glu", _chunk),
    Case("argmax", _argmax, slow=True),
    Case("encoder_layer", _encoder_layer, slow=True, via="export"),
    Case("gpt2_block", _gpt2_block),
    Case("llama_layer", _llama_layer, "iOS18", via="export"),
    Case("gpt2_model", _gpt2_model, slow=True),
    Case("upsample_nearest", _upsample_nearest, slow=True),
    Case("upsample_bilinear", _upsample_bilinear, slow=True),
    Case("group_norm", _group_norm, slow=True),
    Case("instance_norm", _instance_norm, slow=True),
    Case("pixel_shuffle", _pixel_shuffle, slow=True),
    Case("hard_activations", _hard_activations, slow=True),
    Case("log_softmax", _log_softmax, slow=True),
    Case("stack_where", _stack_where, slow=True),
    Case("normalize", _normalize, slow=True),
    Case("max_over_dim", _max_over_dim, slow=True),
    Case("conv2d_same", _conv2d_same, slow=True),
    Case("bert_layer", _bert_layer, slow=True),
    Case("lstm", _lstm, slow=True),
    Case("prelu", _prelu, slow=True),
    Case("topk", _topk, slow=True),
    Case("variance", _variance, slow=True),
    Case("masked_fill", _masked_fill, slow=True),
    Case("bert_model", _bert_model, slow=True, via="export"),
    Case("vit_layer", _vit_layer, slow=True),
    Case("qwen2_layer", _qwen2_layer, "iOS18", slow=True, via="export"),
    Case("depthwise_conv_block", _depthwise_conv_block, "iOS16", slow=True),
    Case("sdpa_gqa_causal", _sdpa_gqa, "iOS18", slow=True),
]


def convert(case: Case, directory: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """The case's ``.mlpackage`` under ``directory``, its inputs and torch's outputs (float32, from fp16-exact
    float inputs so that input rounding is not counted as error)."""
    torch = _torch()
    import coremltools as ct

    module, inputs = case.build()
    module = module.eval()
    inputs = tuple(x.half().float() if x.is_floating_point() else x.to(torch.int32) for x in inputs)
    with torch.no_grad():
        expected = module(*inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    options = dict(convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                   minimum_deployment_target=getattr(ct.target, case.target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.via == "export":
            model = ct.convert(torch.export.export(module, inputs).run_decompositions({}), **options)
        else:  # traced with autograd on, so that torch's fused inference kernels stay out of the graph
            traced = torch.jit.trace(module, inputs, check_trace=False)
            model = ct.convert(traced, inputs=[ct.TensorType(name=f"x{i}", shape=tuple(x.shape),
                                                             dtype=np.float32 if x.is_floating_point() else np.int32)
                                               for i, x in enumerate(inputs)], **options)
    package = directory / f"{case.name}.mlpackage"
    model.save(str(package))
    return package, [x.numpy() for x in inputs], [y.float().numpy() for y in expected]


def outcome(case: Case, directory: Path) -> Outcome:
    package, inputs, expected = convert(case, directory)
    try:
        program = load_program(package)
        got = program.run({name: x for (name, _), x in zip(program.inputs, inputs)})
    except OrionError as exc:
        return Outcome(case.name, "refused", str(exc))
    except Exception as exc:  # noqa: BLE001 - the corpus reports it as a crash, a failure of its own
        return Outcome(case.name, "crash", f"{type(exc).__name__}: {exc}")
    outputs = [got[name] for name, _ in program.outputs]
    if len(outputs) != len(expected):
        return Outcome(case.name, "wrong", f"{len(outputs)} outputs, torch gives {len(expected)}")
    for i, (y, want) in enumerate(zip(outputs, expected)):
        y = np.asarray(y, dtype=np.float64)
        if y.shape != want.shape:
            return Outcome(case.name, "wrong", f"output {i} has shape {list(y.shape)}, torch {list(want.shape)}")
        err = float(np.abs(y - want).max()) if y.size else 0.0
        bound = RTOL * max(1.0, float(np.abs(want).max()))
        if not err <= bound:
            return Outcome(case.name, "wrong", f"output {i}: max |emulator - torch| = {err:.4g} > {bound:.4g}")
    return Outcome(case.name, "match", "")
