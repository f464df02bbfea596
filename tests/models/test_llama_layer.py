"""One Llama block's forward and backward programs on the emulator against Hugging Face transformers'
LlamaDecoderLayer with torch autograd (same weights, same inputs), within fp16 tolerances.

dx is dy (the residual path) plus each RMSNorm's input gradient; the norms' parts are compared on their own, as
the residual path would hide an error in them within fp16 tolerances. The weights are 4 times llama2.c's init
scale, so that these parts are not small next to dy and fp16's rounding of dx leaves them measurable."""

from __future__ import annotations

import numpy as np
import pytest

from orion.models.llama import (
    BACKWARD_TAPS,
    LlamaConfig,
    backward_graph,
    forward_graph,
    inference_blocks,
    inference_decode_graph,
    inference_prefill_graph,
    init_weights,
    layer_inputs,
    rope_tables,
    weight_gradients,
)
from orion.runtime.budget import CompileBudget
from orion.runtime.cache import ProgramCache
from orion.runtime.program import Program
from orion.models.gpt2 import causal_mask
from tests.conftest import llama_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = LlamaConfig(dim=64, n_layers=1, n_heads=4, hidden_dim=192, vocab_size=256, max_seq_len=32)
SEQ = 32
LOSS_SCALE = 256.0


def hf_layer(weights):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=CONFIG.dim, intermediate_size=CONFIG.hidden_dim,
                                   num_attention_heads=CONFIG.n_heads, num_key_value_heads=CONFIG.n_heads,
                                   rms_norm_eps=CONFIG.norm_eps, rope_theta=CONFIG.rope_theta,
                                   max_position_embeddings=128, attn_implementation="eager")
    layer = LlamaDecoderLayer(cfg, layer_idx=0).float()
    names = {"self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
             "self_attn.o_proj.weight": "wo", "mlp.gate_proj.weight": "w1", "mlp.up_proj.weight": "w3",
             "mlp.down_proj.weight": "w2", "input_layernorm.weight": "attention_norm",
             "post_attention_layernorm.weight": "ffn_norm"}
    with torch.no_grad():
        for hf_name, ours in names.items():
            layer.get_parameter(hf_name).copy_(torch.from_numpy(weights[f"layers.0.{ours}"]))
    return layer, LlamaRotaryEmbedding(cfg), names


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    weights = llama_weights(CONFIG, seed=1, scale=4.0)
    x = rng.standard_normal((SEQ, CONFIG.dim)).astype(np.float16).astype(np.float32)
    dy = (rng.standard_normal((SEQ, CONFIG.dim)) * 0.1).astype(np.float16).astype(np.float32)
    return weights, x, dy


def test_forward_and_backward_match_autograd(setup):
    weights, x, dy = setup
    layer, rotary, names = hf_layer(weights)
    norm_input_grads = {}  # a norm's name -> the gradient at its input through the norm alone
    for norm in ("input_layernorm", "post_attention_layernorm"):
        layer.get_submodule(norm).register_full_backward_hook(
            lambda module, grad_in, grad_out, norm=norm: norm_input_grads.update({norm: grad_in[0][0].numpy()}))
    xt = torch.tensor(x[None], requires_grad=True)
    pos = torch.arange(SEQ)[None]
    mask = torch.triu(torch.full((SEQ, SEQ), float("-inf")), 1)[None, None]
    out = layer(xt, attention_mask=mask, position_ids=pos, position_embeddings=rotary(xt, pos))
    y_ref = (out[0] if isinstance(out, tuple) else out)[0]
    y_ref.backward(torch.tensor(dy))

    cos, sin = rope_tables(CONFIG, SEQ)
    w_in = layer_inputs(weights, 0, CONFIG)
    common = {"cos": cos, "sin": sin, **w_in}
    cache, budget = ProgramCache(None), CompileBudget(10)
    with Program.from_graph(forward_graph(CONFIG, SEQ), backend="emulator", cache=cache, budget=budget) as fwd:
        taps = fwd.run({"x": x.T.reshape(1, CONFIG.dim, 1, SEQ), "mask": causal_mask(SEQ), **common})
    y = taps["y"].astype(np.float32).reshape(CONFIG.dim, SEQ).T
    np.testing.assert_allclose(y, y_ref.detach().numpy(), atol=2e-2, rtol=2e-2)

    # with a loss scale, as training runs it: unscaled, fp16 gradients this small underflow (reference section 7)
    feed = {"dy": dy.T.reshape(1, CONFIG.dim, 1, SEQ) * LOSS_SCALE, **common, **{k: taps[k] for k in BACKWARD_TAPS}}
    feed = {k: v for k, v in feed.items() if k not in ("mask",)}
    with Program.from_graph(backward_graph(CONFIG, SEQ), backend="emulator", cache=cache, budget=budget) as bwd:
        feed = {k: v for k, v in feed.items() if k in bwd.input_names}
        grads = bwd.run(feed)
    grads = {k: v.astype(np.float32) / LOSS_SCALE for k, v in grads.items()}
    dx, dh = (grads[name].reshape(CONFIG.dim, SEQ).T for name in ("dx", "d_h"))
    dx_ref = xt.grad[0].numpy()
    # The norms' input gradients: dh = dy + the FFN norm's, dx = dh + the attention norm's. Measured within 0.2% of
    # the largest entry; a norm backward without its projection term (r * d_hat) is 20-40% off.
    for got, norm in ((dh - dy, "post_attention_layernorm"), (dx - dh, "input_layernorm")):
        ref = norm_input_grads[norm]
        assert np.abs(got - ref).max() < 0.01 * np.abs(ref).max(), (norm, np.abs(got - ref).max(), np.abs(ref).max())
    np.testing.assert_allclose(dx, dx_ref, atol=0.02 * np.abs(dx_ref).max() + 1e-3, rtol=0.05)

    dw = weight_gradients(0, CONFIG, taps, grads, feed["dy"] / LOSS_SCALE)
    for hf_name, ours in names.items():
        ref = layer.get_parameter(hf_name).grad.numpy()
        got = dw[f"layers.0.{ours}"]
        scale = np.abs(ref).max()
        assert got.shape == ref.shape, hf_name
        np.testing.assert_allclose(got, ref, atol=0.03 * scale + 1e-4, rtol=0.05, err_msg=hf_name)


def test_every_llama_program_crosses_fp16_only_where_the_profile_takes_no_fp32():
    """Training forward and backward (weights and LoRA factors as inputs) and inference prefill and decode (weights
    baked) on m1, which rejects fp32 I/O (Orion-fork, 2026-09-06): no fp32 input or output, no constraint error."""
    from orion.compiler.compile import compile_graph
    from orion.compiler.targets import get_target
    from orion.lora import LoraLayout
    from orion.mil.parse import parse_program

    m1 = get_target("m1")
    lora = LoraLayout(("down", "gate", "k", "o", "q", "up", "v"), 32)
    blocks = inference_blocks(init_weights(CONFIG, 0), CONFIG, m1.max_axis)[:1]
    graphs = [forward_graph(CONFIG, SEQ, lora), backward_graph(CONFIG, SEQ, lora),
              inference_prefill_graph(blocks, 0, CONFIG, SEQ, lora),
              inference_decode_graph(blocks, 0, CONFIG, SEQ, lora, target=m1)]
    for graph in graphs:
        result = compile_graph(graph, m1)
        assert result.errors == [], graph.name
        program = parse_program(result.module.text)
        io = [*program.inputs, *program.output_types()]
        assert any("lora_" in name for name, _ in io)
        assert {t.dtype for _, t in io} == {"fp16"}, graph.name
