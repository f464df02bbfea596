"""Forward and backward of the Llama model: blocks on the backend, the rest on the CPU.

The backend runs each block's forward (with taps) and backward-through-activations programs; every weight is a
program input, so the two programs compile once (the other blocks' copies are cache hits) and an optimizer step
only writes input surfaces. The CPU (float32 BLAS) does the embedding, the final RMSNorm, the tied classifier, the
cross-entropy loss and its gradient, and every weight gradient from the taps; the weight gradients of block i are
computed on a worker thread while the backend runs the backward program of block i-1.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from orion.models.gpt2 import causal_mask
from orion.models.llama import (
    BACKWARD_TAPS,
    LlamaConfig,
    backward_graph,
    forward_graph,
    layer_inputs,
    rope_tables,
    weight_gradients,
)
from orion.runtime.program import Program


def _to_channels(rows: np.ndarray) -> np.ndarray:
    """``[S, C]`` -> ``[1, C, 1, S]``."""
    return np.ascontiguousarray(rows.T)[None, :, None, :]


def _to_rows(channels: np.ndarray) -> np.ndarray:
    """``[1, C, 1, S]`` -> ``[S, C]`` float32."""
    return np.asarray(channels, np.float32)[0, :, 0, :].T


class LlamaEngine:
    """Owns the block programs of one model size and sequence length, and the weights they hold."""

    def __init__(self, config: LlamaConfig, seq: int, *, backend, target, cache=None, budget=None):
        self.config = config
        self.seq = seq
        self.timings = {"backend": 0.0, "cpu": 0.0, "update": 0.0}
        common = dict(backend=backend, target=target, cache=cache, budget=budget)
        self.forward = [Program.from_graph(forward_graph(config, seq), **common) for _ in range(config.n_layers)]
        self.backward = [Program.from_graph(backward_graph(config, seq), **common) for _ in range(config.n_layers)]
        for p in (*self.forward, *self.backward):
            p.load()
        cos, sin = rope_tables(config, seq)
        self._static = {"cos": cos, "sin": sin, "mask": causal_mask(seq)}
        self._pool = ThreadPoolExecutor(max_workers=1)

    @property
    def compiles(self) -> int:
        return sum(p.compiles for p in (*self.forward, *self.backward))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for p in (*self.forward, *self.backward):
            p.close()

    # -- weights --------------------------------------------------------------------------------------------------

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Write every block's weights into its programs' input surfaces (no compile)."""
        t0 = time.perf_counter()
        for i in range(self.config.n_layers):
            inputs = layer_inputs(weights, i, self.config)
            for program in (self.forward[i], self.backward[i]):
                for name, array in inputs.items():
                    if name in program.input_names:
                        program.input_tensor(name).write(array)
        self.timings["update"] += time.perf_counter() - t0

    # -- one sequence ---------------------------------------------------------------------------------------------

    def _run(self, program: Program, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        for name, array in feed.items():
            program.input_tensor(name).write(array)
        program.evaluate()
        out = {name: program.output_tensor(name).read() for name in program.output_names}
        self.timings["backend"] += time.perf_counter() - t0
        return out

    def loss_and_grads(self, weights: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, scale: float,
                       grads: dict[str, np.ndarray], tokens_in_step: int) -> float:
        """Forward and backward of one sequence; adds ``scale`` times its gradients (of the step's mean loss) into
        ``grads``. Returns the sequence's summed cross-entropy."""
        c = self.config
        cpu = time.perf_counter()
        x = weights["tok_embeddings"][ids]  # [S, d]
        self.timings["cpu"] += time.perf_counter() - cpu
        taps = []
        h = _to_channels(x)
        for i in range(c.n_layers):
            out = self._run(self.forward[i], {"x": h, **self._static})
            taps.append(out)
            h = out["y"]
        cpu = time.perf_counter()
        hidden = _to_rows(h)
        # final RMSNorm, tied classifier, cross-entropy: float32 on the CPU
        r = 1.0 / np.sqrt((hidden * hidden).mean(-1, keepdims=True) + c.norm_eps)
        x_hat = hidden * r
        normed = x_hat * weights["norm"]
        classifier = weights["output"] if "output" in weights else weights["tok_embeddings"]
        logits = normed @ classifier.T
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        positions = np.arange(ids.size)
        loss = float(-np.log(np.maximum(probs[positions, targets], 1e-30)).sum())
        dlogits = probs
        dlogits[positions, targets] -= 1.0
        dlogits *= scale / tokens_in_step
        classifier_name = "output" if "output" in weights else "tok_embeddings"
        grads[classifier_name] += dlogits.T @ normed
        dnormed = dlogits @ classifier
        grads["norm"] += (dnormed * x_hat).sum(0)
        d_hat = dnormed * weights["norm"]
        dy = r * (d_hat - x_hat * (x_hat * d_hat).mean(-1, keepdims=True))
        self.timings["cpu"] += time.perf_counter() - cpu
        # backward through the blocks; weight gradients of block i overlap the backward program of block i-1
        pending = []
        d = _to_channels(dy)
        for i in reversed(range(c.n_layers)):
            feed = {"dy": d, "cos": self._static["cos"], "sin": self._static["sin"],
                    **{k: taps[i][k] for k in BACKWARD_TAPS}}
            out = self._run(self.backward[i], feed)
            pending.append(self._pool.submit(self._accumulate, i, taps[i], out, d, grads))
            d = out["dx"]
        cpu = time.perf_counter()
        for job in pending:
            job.result()
        np.add.at(grads["tok_embeddings"], ids, _to_rows(d))
        self.timings["cpu"] += time.perf_counter() - cpu
        return loss

    def _accumulate(self, layer: int, taps, out, dy, grads) -> None:
        t0 = time.perf_counter()
        for name, g in weight_gradients(layer, self.config, taps, out, dy).items():
            grads[name] += g
        self.timings["cpu"] += time.perf_counter() - t0

