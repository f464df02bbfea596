"""What every language model shares: text in, sampled tokens out, streamed as text."""

from __future__ import annotations

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
    compiles: int = 0  # programs compiled during this generation
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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stream: bool = False):
        """Text in, text out (``stream=True``: an iterator of text pieces as tokens arrive)."""
        from orion.models.sampling import Sampler

        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        pieces = self.stream_text(self.generate_ids(self.encode(prompt), max_tokens, sampler, self.stop_ids))
        return pieces if stream else "".join(pieces)

    def encode(self, prompt: str) -> list[int]:
        """The token ids of a prompt, refused when there is no tokenizer or no token."""
        if self.tokenizer is None:
            raise OrionError("this model has no tokenizer; use generate_ids with token ids")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise BindingError("the prompt is empty: give some text")
        return ids

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end a generation: the tokenizer's end of text."""
        eos = None if self.tokenizer is None else self.tokenizer.eos_id
        return () if eos is None else (eos,)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text of a chat (``[{"role": ..., "content": ...}, ...]``) that the model continues with the
        assistant's answer. This plain format serves models without a chat template (a model that has one
        overrides this): one ``role: content`` line per message, then ``assistant:``."""
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
