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
    ``capacity``, the cache's size); ``programs`` are the programs one pass evaluates. A model returns one from
    ``start(ids, max_tokens)`` with the prompt's logits.
    """

    programs: list
    columns: int
    capacity: int
    end: int
    length: int

    def feed(self, tokens) -> "np.ndarray":
        raise NotImplementedError

    def commit(self, n: int) -> None:
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        raise NotImplementedError

    def step(self, token: int) -> "np.ndarray":
        """One token decoded and kept: its logits ``[vocab]``."""
        logits = self.feed([token])[0]
        self.commit(1)
        return logits

    def _check_feed(self, tokens) -> "np.ndarray":
        import numpy as np

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

    def start(self, ids, max_tokens: int) -> tuple[DecodeSession, "np.ndarray"]:
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
                 top_p: float | None = None, seed: int | None = None, stream: bool = False, draft=None,
                 draft_tokens: int = 4):
        """Text in, text out (``stream=True``: an iterator of text pieces as tokens arrive). ``draft``: a smaller
        model with the same tokenizer that proposes ``draft_tokens`` tokens at a time for this model to verify in
        one pass (exact speculative decoding: the text is this model's, drawn from its distribution)."""
        from orion.models.sampling import Sampler

        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.encode(prompt)
        if draft is None:
            tokens = self.generate_ids(ids, max_tokens, sampler, self.stop_ids)
        else:
            from orion.models.speculative import speculative_ids

            if draft.tokenizer is not None and draft.tokenizer.encode(prompt) != ids:
                raise BindingError("the draft model's tokenizer splits the prompt differently from the target's: a "
                                   "draft must share the target's tokenizer")
            tokens = speculative_ids(self, draft, ids, max_tokens, sampler, self.stop_ids, draft_tokens)
        pieces = self.stream_text(tokens)
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
