"""What every language model shares: text in, sampled tokens out, streamed as text."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from orion.errors import BindingError, OrionError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compiles: int = 0
    cache_hits: int = 0
    dispatches_per_token: int = 0
    backend: str = "none"  # the backend that executed the programs (orion.runtime.program.backends_that_ran)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def line(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens | prefill {self.prefill_tok_s:.1f} tok/s | "
                f"decode {self.decode_tok_s:.1f} tok/s ({self.new_tokens} tokens) | compiles {self.compiles} | "
                f"cache hits {self.cache_hits} | {self.dispatches_per_token} dispatches/token | "
                f"backend {self.backend}")


def check_token_ids(ids, vocab_size: int, context: int):
    """One sequence of token ids as int64, refused (naming the fault) when empty, longer than the model's context or
    outside its vocabulary."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise BindingError("the prompt is empty: give at least one token")
    if ids.size > context:
        raise BindingError(f"{ids.size} tokens do not fit the model's context of {context}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise BindingError(f"token ids must be in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    return ids


class TextGenerator:
    """Mixin over ``generate_ids(ids, max_tokens, sampler, stop_ids)``, a ``tokenizer`` and ``close()`` (the model
    is a context manager that closes its programs)."""

    tokenizer = None

    def generate_ids(self, ids, max_tokens: int = 64, sampler=None, stop_ids=()) -> Iterator[int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stream: bool = False, chat: bool = False):
        """Text in, text out (``stream=True``: an iterator of text pieces as tokens arrive). ``chat``: the prompt is
        a user message, formatted with the tokenizer's chat template."""
        from orion.models.sampling import Sampler

        if self.tokenizer is None:
            raise OrionError("this model has no tokenizer; use generate_ids with token ids")
        ids = (self.tokenizer.encode(self.tokenizer.chat(prompt), add_special_tokens=False) if chat else
               self.tokenizer.encode(prompt))
        if not ids:
            raise BindingError("the prompt is empty: give some text")
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stop = () if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)
        pieces = self._stream_text(self.generate_ids(ids, max_tokens, sampler, stop), stop)
        return pieces if stream else "".join(pieces)

    def _stream_text(self, ids: Iterator[int], stop=()) -> Iterator[str]:
        """Text as tokens arrive; the end-of-text token that stops generation is not part of it."""
        decoder = self.tokenizer.stream()
        for token in ids:
            if token in stop:
                continue
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest


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
    ``context`` (the longest sequence it runs) and implements the hooks at the end.
    """

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
                                             weights_as_inputs=adapter_inputs)
                program.update_weights(adapter_inputs)
                program.load()
                programs.append(program)
            self._programs[key] = programs
        return self._programs[key]

    def decode_graphs(self, capacity: int) -> list:
        """The graphs of the programs one decode step dispatches, in order, for a KV cache of ``capacity`` positions
        (built, not compiled): what a cost model reads to predict a token's time on the ANE."""
        return [self._graph("decode", capacity, first) for first in self._groups()]

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

    def _count(self) -> tuple[int, int]:
        programs = self._all_programs()
        return sum(p.compiles for p in programs), sum(p.cache_hits for p in programs)

    def generate_ids(self, ids, max_tokens: int = 64, sampler=None, stop_ids=()) -> Iterator[int]:
        """Yield new token ids: prefill, then one decode step per token with the KV cache in the programs."""
        from orion.models.gpt2 import bucket_for
        from orion.runtime.program import backends_that_ran

        if sampler is None:
            from orion.models.sampling import Sampler

            sampler = Sampler(temperature=0.0)
        ids = self._check_ids(ids)
        if max_tokens < 0:
            raise BindingError(f"max_tokens must be >= 0, got {max_tokens}")
        total = min(ids.size + max_tokens, self.context)
        stats = self.stats = GenerationStats(prompt_tokens=ids.size)
        before = self._count()
        t0 = time.perf_counter()
        hidden, kv, _ = self._prefill(ids)
        token = sampler.sample(self._head(hidden[-1:])[0])
        stats.prefill_seconds = time.perf_counter() - t0
        stats.backend = backends_that_ran(self._all_programs())
        if max_tokens == 0:
            return
        programs = self.programs("decode", bucket_for(total))
        self._load_cache(programs, kv, ids.size)
        stats.dispatches_per_token = self.dispatches_per_token(programs)
        decode_start = time.perf_counter()
        pos = ids.size
        try:
            for _ in range(max_tokens):
                stats.new_tokens += 1
                yield int(token)
                if int(token) in stop_ids or pos >= total or stats.new_tokens == max_tokens:
                    break
                token = sampler.sample(self._decode_step(programs, int(token), pos))
                stats.decode_steps += 1
                pos += 1
        finally:
            stats.decode_seconds = time.perf_counter() - decode_start
            after = self._count()
            stats.compiles, stats.cache_hits = after[0] - before[0], after[1] - before[1]
            stats.backend = backends_that_ran(self._all_programs())

    def dispatches_per_token(self, programs: list) -> int:
        """Program evaluations one decode step makes with the decode ``programs``."""
        return len(programs)

    # hooks
    def _groups(self) -> list[int]:
        """The first block of every program."""
        raise NotImplementedError

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

    def _head(self, hidden):
        """Logits ``[n, vocab]`` of hidden rows ``[n, d]``."""
        raise NotImplementedError

    def _load_cache(self, programs: list, kv: dict, n: int) -> None:
        """Seed the decode programs' caches with the prefill's k/v of ``n`` positions."""
        raise NotImplementedError

    def _decode_step(self, programs: list, token: int, pos: int):
        """One token at position ``pos`` through every decode program; returns its logits."""
        raise NotImplementedError
