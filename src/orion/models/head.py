"""The classifier (lm_head) on the CPU or on the ANE, for every :class:`~orion.models.lm.CachedDecoder`.

On the CPU it is float32 BLAS, one GEMV per token that reads the whole matrix. On the ANE it is split along the
vocabulary into chunks within the per-axis limit (a 50K-152K vocabulary is past it on older chips), one 1x1 conv
per chunk, as many chunks per program as the weight-tensor limit holds; the final norm runs in the same programs.
Which is faster depends on the chip: ``orion bench`` measures it and ``--predict`` costs it.
"""

from __future__ import annotations

import numpy as np

from orion.errors import OrionError
from orion.ir.builder import GraphBuilder

#: Where the classifier runs: ``cpu`` (float32 BLAS, one GEMV per token) or ``ane`` (chunk programs).
HEAD_PLACES = ("cpu", "ane")


def head_chunks(vocab: int, max_axis: int) -> tuple[int, int]:
    """(chunks, rows per chunk): the classifier split along the vocabulary into equal chunks within the per-axis
    limit (rows a multiple of 64; the last chunk's padding rows are zeros)."""
    chunks = -(-vocab // max_axis)
    rows = -(-vocab // chunks)
    rows = min(max_axis, -(-rows // 64) * 64)
    return -(-vocab // rows), rows


def head_graph(head_w: np.ndarray, norm, first: int, count: int, rows: int, *, target, name: str):
    """The classifier on the ANE for chunks ``first .. first+count-1`` of ``rows`` vocabulary entries each of
    ``head_w`` ``[vocab, d]``: x ``[1, d, 1, N]`` (decode_io) -> ``norm(builder, x)`` (the model's final norm) ->
    one 1x1 conv per chunk, outputs ``logits{k}``."""
    from orion.models.gpt2 import decode_io

    io_dtype, n = decode_io(target)
    b = GraphBuilder(f"{name}_head{first}")
    x = b.cast(b.input("x", (1, head_w.shape[1], 1, n), dtype=io_dtype), "fp16", name="x_fp16")
    normed = norm(b, x)
    for k in range(first, first + count):
        w = np.zeros((rows, head_w.shape[1]), np.float32)
        part = head_w[k * rows:(k + 1) * rows]
        w[:part.shape[0]] = part
        b.output(f"logits{k:02d}", b.cast(b.linear(normed, w, name=f"chunk{k:02d}"), io_dtype,
                                          name=f"logits{k:02d}_{io_dtype}"))
    return b.graph


class VocabHead:
    """Mixin (before :class:`~orion.models.lm.CachedDecoder`) for a model's classifier on the CPU or the ANE. The
    model calls :meth:`_init_head` and provides ``head_w`` (float32 ``[vocab, d]``), ``_head_norm(builder, x)`` (its
    final norm in a program), ``_cpu_head(hidden)`` (norm and classifier in float32), ``head_constants`` (the
    weight-tensor slots the head programs take besides the chunks) and ``vocab_size``."""

    head = "cpu"
    head_w: np.ndarray
    head_constants = 0

    def _init_head(self, head: str) -> None:
        if head not in HEAD_PLACES:
            raise OrionError(f"head must be one of {HEAD_PLACES}, got {head!r}")
        self.head = head
        self._head_programs: list = []

    def _head_plan(self) -> list[tuple[int, int, int]]:
        """(first chunk, chunks, rows per chunk) of each classifier program: chunks within the per-axis limit, as
        many per program as the weight-tensor limit holds."""
        chunks, rows = head_chunks(self.vocab_size, self.target.max_axis)
        limit = self.target.max_blob_constants
        per = chunks if limit is None else max(1, limit - self.head_constants)
        return [(k, min(per, chunks - k), rows) for k in range(0, chunks, per)]

    def _head_graphs(self) -> list:
        """The classifier programs' graphs where it runs on the ANE (``head="ane"``), else none."""
        if self.head == "cpu":
            return []
        return [head_graph(self.head_w, self._head_norm, *plan, target=self.target, name=type(self).__name__.lower())
                for plan in self._head_plan()]

    def host_bytes(self, phase: str) -> int:
        """Embedding rows are few; a classifier on the CPU (float32) is read whole for each token's logits: once
        per decode step, and once for a prefill (only its last position is scored)."""
        return self.head_w.nbytes if self.head == "cpu" else 0

    def _ane_head(self) -> list:
        from orion.runtime.program import Program

        if not self._head_programs:
            for graph in self._head_graphs():
                program = Program.from_graph(graph, backend=self.backend, target=self.target, cache=self.cache,
                                             budget=self.budget)
                program.load()
                self._head_programs.append(program)
        return self._head_programs

    def _all_programs(self) -> list:
        return super()._all_programs() + self._head_programs

    def close(self) -> None:
        super().close()  # closes _all_programs(), the head's among them
        self._head_programs = []

    def dispatches_per_token(self, programs: list) -> int:
        return len(programs) + (len(self._head_plan()) if self.head == "ane" else 0)

    def _head(self, hidden: np.ndarray, rowwise: bool = False) -> np.ndarray:
        """Final norm and the classifier: ``[n, d] -> [n, vocab]`` (float32 on the CPU, or the ANE's chunk programs
        for up to a decode surface of rows). ``rowwise``: each row's logits have the same bits however many rows
        come with it (a decode pass: one token, or several verified); the ANE's columns are independent, but BLAS
        sums one row (gemv) otherwise than several (gemm), so the CPU then makes one product per row."""
        from orion.models.gpt2 import decode_io

        hidden = np.asarray(hidden, np.float32)
        columns = decode_io(self.target)[1]
        if self.head == "cpu" or hidden.shape[0] > columns:
            if rowwise:
                return np.concatenate([self._cpu_head(row) for row in hidden[:, None]])
            return self._cpu_head(hidden)
        logits = []
        for program in self._ane_head():
            x = np.zeros((1, hidden.shape[1], 1, columns), np.float32)
            x[0, :, 0, :hidden.shape[0]] = hidden.T
            out = program.run({"x": x})
            logits += [out[name][0, :, 0, :hidden.shape[0]].T for name in sorted(out)]
        return np.concatenate(logits, axis=1)[:, :self.vocab_size].astype(np.float32)
