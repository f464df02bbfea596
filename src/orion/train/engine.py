"""Forward and backward of the Llama model: blocks on the backend, the rest on the CPU.

The backend runs each block's forward (with taps) and backward-through-activations programs; every weight is a
program input, so the two programs compile once (the other blocks' copies are cache hits) and an optimizer step
only writes input surfaces. The CPU (float32 BLAS) does the embedding, the final RMSNorm, the tied classifier, the
cross-entropy loss and its gradient, and every weight gradient from the taps; the weight gradients of block i are
computed on a worker thread while the backend runs the backward program of block i-1.

Only what is trained gets a gradient: the caller's ``grads`` dict names the trainable arrays. Training a LoRA adapter
on a frozen base gives only the adapter's names (``layers.{i}.{target}.lora_A/B``), so the CPU skips the classifier,
embedding and base weight gradients and computes the adapter's from the same taps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from orion.lora import Adapter, LoraLayout
from orion.models.llama import (BACKWARD_TAPS, LlamaBlocks, LlamaConfig, lora_gradients, rms_norm_rows,
                                weight_gradients)


def _to_channels(rows: np.ndarray) -> np.ndarray:
    """``[S, C]`` -> ``[1, C, 1, S]``."""
    return np.ascontiguousarray(rows.T)[None, :, None, :]


def _to_rows(channels: np.ndarray) -> np.ndarray:
    """``[1, C, 1, S]`` -> ``[S, C]`` float32."""
    return np.asarray(channels, np.float32)[0, :, 0, :].T


class LlamaEngine(LlamaBlocks):
    """The block programs (forward and backward) of one model size and sequence length, and the CPU half."""

    def __init__(self, config: LlamaConfig, seq: int, *, backend, target, cache=None, budget=None,
                 lora: LoraLayout | None = None):
        super().__init__(config, seq, backend=backend, target=target, cache=cache, budget=budget, backward=True,
                         lora=lora)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.adapter: Adapter | None = None

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Run with ``adapter`` (its arrays are read again at each call: an optimizer step then this)."""
        super().set_adapter(adapter)
        self.adapter = adapter

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        super().close()

    def loss_and_grads(self, weights: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, scale: float,
                       grads: dict[str, np.ndarray], tokens_in_step: int,
                       on_layer_done: Callable[[int], None] | None = None) -> float:
        """Forward and backward of one sequence; adds ``scale`` times its gradients (of the step's mean loss) into
        ``grads``, for the names it holds. Returns the sequence's summed cross-entropy. ``on_layer_done(i)`` is
        called on the worker thread once block i's gradients are added (a data-parallel run starts their
        all-reduce then, while the backend runs the next block's backward)."""
        c = self.config
        cpu = time.perf_counter()
        x = weights["tok_embeddings"][ids]  # [S, d]
        self.timings["cpu"] += time.perf_counter() - cpu
        h, taps = self.forward_all(_to_channels(x))
        cpu = time.perf_counter()
        # final RMSNorm, classifier, cross-entropy and their gradients: float32 on the CPU
        normed, x_hat, r = rms_norm_rows(_to_rows(h), weights["norm"], c.norm_eps)
        classifier_name = "output" if "output" in weights else "tok_embeddings"
        classifier = weights[classifier_name]
        logits = normed @ classifier.T
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        positions = np.arange(ids.size)
        loss = float(-np.log(np.maximum(probs[positions, targets], 1e-30)).sum())
        dlogits = probs
        dlogits[positions, targets] -= 1.0
        dlogits *= scale / tokens_in_step
        if classifier_name in grads:
            grads[classifier_name] += dlogits.T @ normed
        dnormed = dlogits @ classifier
        if "norm" in grads:
            grads["norm"] += (dnormed * x_hat).sum(0)
        d_hat = dnormed * weights["norm"]
        dy = r * (d_hat - x_hat * (x_hat * d_hat).mean(-1, keepdims=True))
        self.timings["cpu"] += time.perf_counter() - cpu
        # backward through the blocks; weight gradients of block i overlap the backward program of block i-1
        pending = []
        d = _to_channels(dy)
        for i in reversed(range(c.n_layers)):
            feed = {"dy": d, **{k: taps[i][k] for k in BACKWARD_TAPS}}
            out = self.run(self.backward[i], feed)
            pending.append(self._pool.submit(self._accumulate, i, taps[i], out, d, grads, on_layer_done))
            d = out["dx"]
        cpu = time.perf_counter()
        for job in pending:
            job.result()
        if "tok_embeddings" in grads:
            np.add.at(grads["tok_embeddings"], ids, _to_rows(d))
        self.timings["cpu"] += time.perf_counter() - cpu
        return loss

    def _accumulate(self, layer: int, taps, out, dy, grads, on_done: Callable[[int], None] | None) -> None:
        t0 = time.perf_counter()
        found = {}
        if f"layers.{layer}.wq" in grads:
            found |= weight_gradients(layer, self.config, taps, out, dy)
        if self.adapter is not None:
            found |= lora_gradients(self.adapter, layer, self.config, taps, out, dy)
        for name, g in found.items():
            if name in grads:
                grads[name] += g
        self.timings["cpu"] += time.perf_counter() - t0
        if on_done is not None:
            on_done(layer)
