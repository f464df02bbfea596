"""The PyTorch twin of Orion's Llama training: transformers' LlamaForCausalLM holding Orion's weights, torch's AdamW
with the trainer's settings, one float32 step, and the per-step losses of a whole run next to the Trainer's. A plain
module (it imports neither pytest nor, until called, torch), so the tests and benchmarks/train.py share it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orion.models import model_backend
from orion.models.llama import LlamaConfig, init_weights
from orion.runtime.cache import ProgramCache
from orion.train.data import BatchStream
from orion.train.optim import cosine_lr
from orion.train.trainer import Trainer, TrainSettings


def hf_llama(config: LlamaConfig, weights: dict[str, np.ndarray]):
    """transformers' LlamaForCausalLM (float32, eager attention, tied classifier) holding ``weights``."""
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=True, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).float()
    names = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm"}
    for i in range(config.n_layers):
        for hf, ours in (("self_attn.q_proj", "wq"), ("self_attn.k_proj", "wk"), ("self_attn.v_proj", "wv"),
                         ("self_attn.o_proj", "wo"), ("mlp.gate_proj", "w1"), ("mlp.up_proj", "w3"),
                         ("mlp.down_proj", "w2"), ("input_layernorm", "attention_norm"),
                         ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{ours}"
    params = dict(model.named_parameters())
    assert params.keys() == names.keys() and model.lm_head.weight is params["model.embed_tokens.weight"]
    with torch.no_grad():
        for hf, ours in names.items():
            params[hf].copy_(torch.from_numpy(weights[ours]))
    return model


def torch_training_step(model, optimizer, inputs: np.ndarray, targets: np.ndarray, lr: float,
                        grad_clip: float) -> float:
    """One float32 step: mean next-token cross-entropy, backward, clip, AdamW at ``lr``; returns the loss."""
    import torch

    logits = model(input_ids=torch.from_numpy(inputs)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(targets).reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.item()


def torch_adamw(model, settings: TrainSettings):
    """torch's AdamW with the trainer's settings; like orion's AdamW by default, 1-D parameters (the norm gains)
    get no weight decay."""
    import torch

    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.adam_eps,
                             foreach=False)


def scheduled_lr(settings: TrainSettings, step: int) -> float:
    """The learning rate of step ``step`` (1-based): ``cosine_lr`` at ``step``, warmup a tenth of the run (1..100
    steps) unless set, down to ``min_lr_fraction`` of the peak at the last step."""
    warmup = settings.warmup if settings.warmup is not None else max(1, min(100, settings.steps // 10))
    return cosine_lr(step, max_lr=settings.lr, warmup_steps=warmup, total_steps=settings.steps,
                     min_lr=settings.lr * settings.min_lr_fraction)


def torch_reference_losses(trainer: Trainer) -> list[float]:
    """Per-step losses of the PyTorch twin of ``trainer``'s run: the same initial weights, the same batches (the
    BatchStream the trainer starts from), the cosine schedule, clipping and AdamW settings. One torch thread: for a
    model this small more only cost (on a busy machine, 100x: OpenMP threads wait on each other)."""
    import torch

    s, config = trainer.settings, trainer.config
    model = hf_llama(config, init_weights(config, s.seed))
    optimizer = torch_adamw(model, s)
    stream = BatchStream(trainer.dataset.train, s.batch, config.max_seq_len, seed=s.seed)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(1, s.steps + 1):
            batches = [next(stream) for _ in range(s.accum)]
            inputs = np.concatenate([b[0] for b in batches])
            targets = np.concatenate([b[1] for b in batches])
            losses.append(torch_training_step(model, optimizer, inputs, targets, scheduled_lr(s, step), s.grad_clip))
    finally:
        torch.set_num_threads(threads)
    return losses


def loss_parity(corpus: Path, out: Path, steps: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(orion losses, torch losses, orion's skipped steps) of the tiny preset trained ``steps`` steps on ``corpus``
    on the emulator (batch 2 x 32 tokens, lr 3e-3, the default warmup: a tenth of the steps) and of its twin."""
    settings = TrainSettings(preset="tiny", data=str(corpus), out=str(out), steps=steps, batch=2, seq_len=32,
                             lr=3e-3, save_every=10_000, seed=0)
    ours = []
    trainer = Trainer(settings, backend=model_backend("emulator"), target="default", cache=ProgramCache(None),
                      on_step=lambda record: ours.append(record["loss"]))
    result = trainer.run()
    return np.array(ours), np.array(torch_reference_losses(trainer)), result["skipped_steps"]
