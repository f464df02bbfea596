"""What every language model shares: text in, sampled tokens out, streamed as text."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from orion.errors import BindingError, OrionError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compiles: int = 0  # programs compiled during this generation
    cache_hits: int = 0
    dispatches_per_token: int = 0
    backend: str = "none"  # the backend that executed the programs (orion.runtime.program.backends_that_ran)
    drafted: int = 0  # speculative decoding: tokens the draft proposed, and how many the target kept
    accepted: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first (which the prefill gives) per second of decoding."""
        return max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def line(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens | prefill {self.prefill_tok_s:.1f} tok/s | "
                f"decode {self.decode_tok_s:.1f} tok/s ({self.new_tokens} tokens) | compiles {self.compiles} | "
                f"cache hits {self.cache_hits} | {self.dispatches_per_token} dispatches/token | "
                f"backend {self.backend}" + (f" | draft: {self.accepted}/{self.drafted} accepted "
                                             f"({self.acceptance:.0%}), {self.decode_steps} target passes"
                                             if self.drafted else ""))


class DecodeSession:
    """One sequence being decoded in a model's programs, the interface exact speculative decoding needs.

    The KV cache holds ``length`` positions. ``feed(tokens)`` runs up to ``columns`` tokens at the next positions
    in ONE pass (each attends to the cache and causally to the others) and returns their logits ``[n, vocab]``;
    their keys and values stay pending until ``commit(n)`` adds the first ``n`` to the cache. ``rollback(length)``
    forgets positions from ``length`` on. ``end`` is the last position generation may reach (at most
    ``capacity``, the cache's size); ``programs`` are the programs one pass evaluates (``dispatches``: their
    evaluations plus any the classifier makes). A model returns one from ``start(ids, max_tokens)`` with the prompt's
    logits.
    """

    programs: list
    dispatches: int
    columns: int
    capacity: int
    end: int
    length: int

    def feed(self, tokens) -> np.ndarray:
        raise NotImplementedError

    def commit(self, n: int) -> None:
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        raise NotImplementedError

    def step(self, token: int) -> np.ndarray:
        """One token decoded and kept: its logits ``[vocab]``."""
        logits = self.feed([token])[0]
        self.commit(1)
        return logits

    def _check_feed(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not 1 <= tokens.size <= self.columns:
            raise BindingError(f"one pass takes 1 to {self.columns} tokens, got {tokens.size}")
        if self.length + tokens.size > self.end:
            raise BindingError(f"{tokens.size} tokens after {self.length} positions pass the session's end "
                               f"({self.end})")
        return tokens


def check_token_ids(ids, vocab_size: int, context: int):
    """One sequence of token ids as int64, refused (naming the fault) when empty, longer than the model's context or
    outside its vocabulary."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise BindingError("the prompt is empty: give at least one token")
    if ids.size > context:
        raise BindingError(f"{ids.size} tokens do not fit the model's context of {context}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise BindingError(f"token ids must be in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    return ids


class TextGenerator:
    """Mixin over ``generate_ids(ids, max_tokens, sampler, stop_ids)``, ``context_length``, a ``tokenizer`` and
    ``close()`` (the model is a context manager that closes its programs)."""

    tokenizer = None

    @property
    def context_length(self) -> int:
        """Most tokens one sequence (prompt and generated) may hold."""
        raise NotImplementedError

    def generate_ids(self, ids, max_tokens: int = 64, sampler=None, stop_ids=()) -> Iterator[int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def start(self, ids, max_tokens: int) -> tuple[DecodeSession, np.ndarray]:
        """Prefill ``ids``; a decode session with room for ``max_tokens`` more, and the logits after the prompt."""
        raise OrionError(f"{type(self).__name__} has no decode session (speculative decoding needs one)")

    def step_programs(self, phase: str, tokens: int) -> list:
        """The MIL programs one step evaluates, in order, as the compiler emits them for the model's target (nothing
        runs): ``phase`` "decode" with a KV cache for ``tokens`` positions, or "prefill" of ``tokens`` tokens."""
        raise OrionError(f"{type(self).__name__} does not describe its programs to the cost model yet")

    def host_bytes(self, phase: str) -> int:
        """Bytes the CPU reads in one step of ``phase`` (e.g. a classifier kept off the ANE)."""
        raise OrionError(f"{type(self).__name__} does not describe its host work to the cost model yet")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stream: bool = False, chat: bool = False,
                 draft=None, draft_tokens: int = 4):
        """Text in, text out (``stream=True``: an iterator of text pieces as tokens arrive). ``chat``: the prompt is
        a user message, formatted with the tokenizer's chat template. ``draft``: a smaller model with the same
        tokenizer that proposes ``draft_tokens`` tokens at a time for this model to verify in one pass (exact
        speculative decoding: the text is this model's, drawn from its distribution)."""
        from orion.models.sampling import Sampler

        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.encode(prompt, chat=chat)
        if draft is None:
            tokens = self.generate_ids(ids, max_tokens, sampler, self.stop_ids)
        else:
            from orion.models.speculative import speculative_ids

            if draft.tokenizer is not None and draft.encode(prompt, chat=chat) != ids:
                raise BindingError("the draft model's tokenizer splits the prompt differently from the target's: a "
                                   "draft must share the target's tokenizer")
            tokens = speculative_ids(self, draft, ids, max_tokens, sampler, self.stop_ids, draft_tokens)
        pieces = self.stream_text(tokens)
        return pieces if stream else "".join(pieces)

    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """The token ids of a prompt, refused when there is no tokenizer or no token. ``chat``: ``prompt`` is a user
        message (or ``[{"role": ..., "content": ...}, ...]``) formatted by the tokenizer's chat template (which writes
        the special tokens itself), or by ``chat_prompt`` for a tokenizer without one."""
        if self.tokenizer is None:
            raise OrionError("this model has no tokenizer; use generate_ids with token ids")
        if not chat:
            ids = self.tokenizer.encode(prompt)
        elif getattr(self.tokenizer, "chat_template", None) is not None:
            ids = self.tokenizer.encode(self.tokenizer.chat(prompt), add_special_tokens=False)
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = self.tokenizer.encode(self.chat_prompt(messages))
        if not ids:
            raise BindingError("the prompt is empty: give some text")
        return ids

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end a generation: the tokenizer's end of text."""
        eos = None if self.tokenizer is None else self.tokenizer.eos_id
        return () if eos is None else (eos,)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text of a chat (``[{"role": ..., "content": ...}, ...]``) for a tokenizer without a chat
        template: one ``role: content`` line per message, then ``assistant:``, which the model continues."""
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def stream_text(self, ids: Iterator[int]) -> Iterator[str]:
        """Text as tokens arrive; the end-of-text token that stops generation is not part of it."""
        decoder = self.tokenizer.stream()
        for token in ids:
            if token in self.stop_ids:
                continue
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest


def predict(model: TextGenerator, chip, prompt_tokens: int = 128, new_tokens: int = 64) -> dict:
    """The cost model's figures for ``model`` on ``chip``: ``{"decode": Estimate, "prefill": Estimate}`` for a
    prompt of ``prompt_tokens`` followed by ``new_tokens`` (the programs Orion would build for that run)."""
    from orion.compiler.costmodel import estimate

    if prompt_tokens < 1 or new_tokens < 1:
        raise BindingError(f"predict needs a prompt and new tokens (>= 1); got {prompt_tokens} and {new_tokens}")
    decode = model.step_programs("decode", prompt_tokens + new_tokens)
    prefill = model.step_programs("prefill", prompt_tokens)
    return {"decode": estimate(decode, chip, target=model.target, host_bytes=model.host_bytes("decode")),
            "prefill": estimate(prefill, chip, target=model.target, host_bytes=model.host_bytes("prefill"),
                                tokens=prompt_tokens)}


class AdapterHost:
    """LoRA adapters resident in a model, one (or none) active: ``load_adapter(path, name)``, ``set_adapter(name)``.

    The model's programs are built for one :class:`~orion.lora.LoraLayout` that every resident adapter fits (the
    union of their targets, the largest rank), with A and B as program inputs. Switching adapters, or to none (zero
    inputs: exactly the base model), writes those inputs and compiles nothing. Only loading an adapter that does not
    fit the current layout rebuilds the programs, once, at the next run: load every adapter before the first run to
    compile once. A model sets ``adapter_spec`` and ``target`` and implements the two hooks.
    """

    adapter_spec = None
    target = None

    def _init_adapters(self) -> None:
        self._adapters: dict = {}
        self._active: str | None = None
        self.lora = None  # the LoraLayout the programs are built with; None: base programs

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def load_adapter(self, path, name: str | None = None):
        """Read a PEFT LoRA adapter (a folder or a hub id) and keep it resident under ``name`` (default: the
        folder's name, or the hub id: a hub snapshot's folder is named after a commit); it becomes active with
        :meth:`set_adapter`. Returns the name."""
        from pathlib import Path

        from orion.lora import CONFIG_FILE, WEIGHTS_FILE, parse_peft
        from orion.models.hub import _read_json_object, read_safetensors, resolve_adapter

        folder = resolve_adapter(str(path))
        config = _read_json_object(folder / CONFIG_FILE, OrionError)
        adapter = parse_peft(config, read_safetensors(folder / WEIGHTS_FILE), self.adapter_spec, str(folder))
        local = Path(str(path)).expanduser().is_dir()
        return self.add_adapter(adapter, name or (folder.resolve().name if local else str(path)))

    def add_adapter(self, adapter, name: str):
        """Keep an :class:`~orion.lora.Adapter` resident under ``name`` (replacing one of that name)."""
        from orion.lora import LoraLayout

        self.adapter_spec.check(adapter, f"adapter {name!r}")  # before it is resident: a refusal changes nothing
        self._adapters[name] = adapter
        if self.lora is None or not self.lora.fits(adapter):
            self.lora = LoraLayout.covering(self._adapters.values(), self.target.matmul_inner_multiple)
            self._use_layout(self.lora)
        if name == self._active:
            self._write_adapter(adapter)
        return name

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter, or None for the base model; no compile."""
        if name is not None and name not in self._adapters:
            raise BindingError(f"no adapter named {name!r}; loaded: {self.adapters or 'none'}")
        self._active = name
        if self.lora is not None:
            self._write_adapter(self._adapters.get(name))

    def delete_adapter(self, name: str) -> None:
        """Forget an adapter (the programs keep their layout; deleting the active one leaves the base model)."""
        if name not in self._adapters:
            raise BindingError(f"no adapter named {name!r}; loaded: {self.adapters or 'none'}")
        del self._adapters[name]
        if name == self._active:
            self.set_adapter(None)

    def _current_adapter(self):
        return self._adapters.get(self._active)

    # hooks
    def _use_layout(self, layout) -> None:
        """Drop programs built for another layout (they are rebuilt, for ``layout``, when next needed)."""
        raise NotImplementedError

    def _write_adapter(self, adapter) -> None:
        """Write ``adapter``'s inputs (zeros for None) into every built program."""
        raise NotImplementedError


class CachedDecoder(AdapterHost, TextGenerator):
    """Generation over block programs with the KV cache resident in the decode programs' inputs (GPT-2, Llama).

    Prefill runs the prompt through the ``"prefill"`` programs of the smallest bucket that holds it; decode programs
    are built for the smallest cache capacity that holds prompt and new tokens, seeded with the prefill's k/v, and
    each token is one dispatch per program. A model sets ``config``, ``target``, ``backend``, ``cache``, ``budget``,
    ``context`` (the longest sequence it runs), ``blocks`` and ``group`` (blocks per program) and implements the hooks
    at the end.
    """

    @property
    def context_length(self) -> int:
        return self.context

    def _init_programs(self) -> None:
        self._programs: dict[tuple[str, int], list] = {}
        self.stats = GenerationStats()
        self._init_adapters()

    def programs(self, kind: str, size: int) -> list:
        """The programs for one phase (``"prefill"``, ``"decode"``) and size, compiled (or taken from the cache) on
        first use, one per group of blocks."""
        from orion.runtime.program import Program

        key = (kind, size)
        if key not in self._programs:
            programs = []
            for first in self._groups():
                adapter_inputs = ({} if self.lora is None else self._adapter_inputs(self._current_adapter(), first))
                program = Program.from_graph(self._graph(kind, size, first), backend=self.backend,
                                             target=self.target, cache=self.cache, budget=self.budget,
                                             weights_as_inputs=adapter_inputs, weights=self._compression(first))
                program.update_weights(adapter_inputs)
                program.load()
                programs.append(program)
            self._programs[key] = programs
        return self._programs[key]

    def step_graphs(self, phase: str, size: int) -> list:
        """The graphs of the programs one ``phase`` step dispatches, in order (the blocks', then any the classifier
        runs in), for a prefill bucket or a KV cache of ``size`` positions: built, not compiled, for the cost model."""
        return [self._graph(phase, size, first) for first in self._groups()] + self._head_graphs()

    def step_programs(self, phase: str, tokens: int) -> list:
        from orion.compiler.compile import compile_graph
        from orion.models.gpt2 import bucket_for

        if phase not in ("prefill", "decode"):
            raise BindingError(f"phase must be prefill or decode, got {phase!r}")
        graphs = self.step_graphs(phase, bucket_for(min(tokens, self.context)))
        blocks = [self._compression(first) for first in self._groups()]
        compression = blocks + [None] * (len(graphs) - len(blocks))  # the classifier's programs stay fp16
        return [compile_graph(graph, self.target, weights=spec).module.program
                for graph, spec in zip(graphs, compression)]

    def _compression(self, first: int):
        """The weight compression of the program starting at block ``first`` (None: fp16 weights): the model's
        ``quantize`` setting, with the blocks it keeps in fp16 (``keep_ends``) named by ``_block_pattern``."""
        spec = self.quantize
        if spec is None:
            return None
        kept = tuple(self._block_pattern(i) for i in self._layers(first) if spec.keeps_block(i, len(self.blocks)))
        return replace(spec, keep=spec.keep + kept)

    def close(self) -> None:
        for p in self._all_programs():
            p.close()
        self._programs.clear()

    def _use_layout(self, layout) -> None:
        self.close()

    def _write_adapter(self, adapter) -> None:
        if not self._programs:
            return
        values = [self._adapter_inputs(adapter, first) for first in self._groups()]
        for programs in self._programs.values():
            for program, inputs in zip(programs, values):
                program.update_weights(inputs)

    def _all_programs(self) -> list:
        return [p for ps in self._programs.values() for p in ps]

    def built(self) -> tuple[int, int]:
        """Compiles and cache hits of every program built so far (a generation's figures are its change)."""
        programs = self._all_programs()
        return sum(p.compiles for p in programs), sum(p.cache_hits for p in programs)

    def generate_ids(self, ids, max_tokens: int = 64, sampler=None, stop_ids=()) -> Iterator[int]:
        """Yield new token ids: prefill, then one decode step per token with the KV cache in the programs."""
        from orion.runtime.program import backends_that_ran

        if sampler is None:
            from orion.models.sampling import Sampler

            sampler = Sampler(temperature=0.0)
        ids = self._check_ids(ids)
        if max_tokens < 0:
            raise BindingError(f"max_tokens must be >= 0, got {max_tokens}")
        stats = self.stats = GenerationStats(prompt_tokens=ids.size)
        before = self.built()
        t0 = time.perf_counter()
        hidden, kv, _ = self._prefill(ids)
        token = sampler.sample(self._head(hidden[-1:])[0])
        stats.prefill_seconds = time.perf_counter() - t0
        stats.backend = backends_that_ran(self._all_programs())
        if max_tokens == 0:
            return
        session = self._session(kv, ids.size, max_tokens)
        stats.dispatches_per_token = session.dispatches
        decode_start = time.perf_counter()
        try:
            for _ in range(max_tokens):
                stats.new_tokens += 1
                yield int(token)
                if int(token) in stop_ids or session.length >= session.end or stats.new_tokens == max_tokens:
                    break
                token = sampler.sample(session.step(int(token)))
                stats.decode_steps += 1
        finally:
            stats.decode_seconds = time.perf_counter() - decode_start
            after = self.built()
            stats.compiles, stats.cache_hits = after[0] - before[0], after[1] - before[1]
            stats.backend = backends_that_ran(self._all_programs())

    def start(self, ids, max_tokens: int) -> tuple["CachedSession", np.ndarray]:
        ids = self._check_ids(ids)
        hidden, kv, _ = self._prefill(ids)
        return self._session(kv, ids.size, max_tokens), self._head(hidden[-1:])[0]

    def _session(self, kv: dict, length: int, max_tokens: int) -> "CachedSession":
        """A session over the decode programs of the smallest capacity that holds ``max_tokens`` more tokens (within
        the model's context), seeded with the prefill's k/v of ``length`` positions."""
        from orion.models.gpt2 import bucket_for

        end = min(length + max_tokens, self.context)
        return CachedSession(self, self.programs("decode", bucket_for(end)), kv, length, end)

    def dispatches_per_token(self, programs: list) -> int:
        """Program evaluations one decode step makes with the decode ``programs``."""
        return len(programs)

    def _groups(self) -> list[int]:
        """The first block of every program (``group`` blocks each)."""
        return list(range(0, len(self.blocks), self.group))

    def _layers(self, first: int) -> range:
        """The blocks of the program that starts at block ``first``."""
        return range(first, min(first + self.group, len(self.blocks)))

    # hooks

    def _graph(self, kind: str, size: int, first: int):
        """The graph of the ``kind`` program of ``size`` that starts at block ``first``."""
        raise NotImplementedError

    def _adapter_inputs(self, adapter, first: int) -> dict:
        """The adapter inputs (zeros for None) of the program that starts at block ``first``."""
        raise NotImplementedError

    def _check_ids(self, ids):
        raise NotImplementedError

    def _prefill(self, ids):
        """Run the prompt; returns the last block's hidden rows ``[n, d]``, every block's k/v, the bucket."""
        raise NotImplementedError

    def _head(self, hidden, rowwise: bool = False):
        """Logits ``[n, vocab]`` of hidden rows ``[n, d]`` (``rowwise``: each row's bits independent of the others'
        and of their number, as a decode pass needs)."""
        raise NotImplementedError

    def _head_graphs(self) -> list:
        """The graphs of the programs the classifier runs in after the blocks' (none where it runs on the CPU)."""
        raise NotImplementedError

    def _block_pattern(self, layer: int) -> str:
        """A shell pattern naming block ``layer``'s weights in the programs (what ``keep_ends`` leaves in fp16)."""
        raise NotImplementedError

    def _mask_input(self, mask: np.ndarray) -> np.ndarray:
        """The decode programs' ``mask`` input from one additive row per column ``[columns, capacity]``."""
        raise NotImplementedError

    def _decode_inputs(self, tokens: np.ndarray, start: int, columns: int) -> tuple[np.ndarray, dict]:
        """A decode pass's first hidden rows ``[n, d]`` for ``tokens`` at positions ``start ...``, and the inputs
        every decode program takes for those positions (e.g. RoPE tables over ``columns``)."""
        raise NotImplementedError


class CachedSession(DecodeSession):
    """One sequence in a :class:`CachedDecoder`'s decode programs: the KV cache lives in their input surfaces
    (``cache_parts`` per block, names by :func:`orion.models.gpt2.kv_name`), every slot without a committed position
    at 0. ``feed`` writes up to ``columns`` tokens with their slots (one-hot) and their rows of the mask, evaluates
    each program once and leaves the new keys and values in the programs' outputs until ``commit`` copies the first
    ones into their slots; ``rollback`` zeroes the slots it forgets. A column sees the same keys and values at the
    same slots whether the positions before it were committed or are fed with it, so a pass of several tokens gives
    the logits of one pass per token, bit for bit (:meth:`orion.ir.builder.GraphBuilder.cached_attention`)."""

    def __init__(self, model: CachedDecoder, programs: list, kv: dict, length: int, end: int):
        self.model, self.programs = model, programs
        self.columns = programs[0].input_tensor("x").shape[3]
        self.capacity = programs[0].input_tensor("slots").shape[3]
        self.dispatches = model.dispatches_per_token(programs)
        self.end = end  # the last position generation may reach (the model's context bounds it)
        self.length = length
        self.pending = 0
        for _, name, cache in self._caches():
            cache[...] = 0
            cache[0, :, 0, :length] = kv[name("prefill")]

    def feed(self, tokens) -> np.ndarray:
        tokens = self._check_feed(tokens)
        n = tokens.size
        x, inputs = self.model._decode_inputs(tokens, self.length, self.columns)
        inputs = {**inputs, **self._placement(n)}
        for program in self.programs:
            with program.input_tensor("x").view() as xin:
                xin[0, :, 0, :n] = x.T
                xin[0, :, 0, n:] = 0  # unused columns meet the others in the placing matmuls (inf times 0 is NaN)
            for name, value in inputs.items():
                with program.input_tensor(name).view() as view:
                    view[...] = value
            program.evaluate()
            with program.output_tensor("y").view(read_only=True) as y:
                x = y[0, :, 0, :n].T.astype(np.float32)
        self.pending = n
        return self.model._head(x, rowwise=True)

    def _placement(self, n: int) -> dict[str, np.ndarray]:
        """The ``slots`` and ``mask`` inputs of a pass of ``n`` tokens (:func:`orion.ir.builder.decode_placement`)."""
        from orion.ir.builder import decode_placement

        slots, mask = decode_placement(self.length, n, self.columns, self.capacity)
        return {"slots": slots[None, None], "mask": self.model._mask_input(mask)}

    def commit(self, n: int) -> None:
        if not 0 <= n <= self.pending:
            raise BindingError(f"cannot commit {n} positions: the last feed left {self.pending}")
        at = slice(self.length, self.length + n)
        for program, name, cache in self._caches():  # the first n columns the pass placed, into their slots
            with program.output_tensor(name("new")).view(read_only=True) as new:
                cache[0, :, 0, at] = new[0, :, 0, :n]
        self.length += n
        self.pending = 0

    def rollback(self, length: int) -> None:
        if not 0 < length <= self.length:
            raise BindingError(f"cannot roll back to {length} positions: the cache holds {self.length}")
        for _, _, cache in self._caches():  # a forgotten key left in its slot would add to the next one placed there
            cache[0, :, 0, length:self.length] = 0
        self.length = length
        self.pending = 0

    def _caches(self):
        """``(program, name, cache)`` for every cache tensor of every block: the program holding it, ``name(kind)``
        its tensors' names (:func:`orion.models.gpt2.kv_name`), and a writable view of its input."""
        from functools import partial

        from orion.models.gpt2 import kv_name

        for first, program in zip(self.model._groups(), self.programs):
            for i in self.model._layers(first):
                for part in self.model.cache_parts:
                    with program.input_tensor(kv_name(part, i, "cache")).view() as cache:
                        yield program, partial(kv_name, part, i), cache
