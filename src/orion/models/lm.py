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
    compiles: int = 0
    cache_hits: int = 0
    dispatches_per_token: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def line(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens | prefill {self.prefill_tok_s:.1f} tok/s | "
                f"decode {self.decode_tok_s:.1f} tok/s ({self.new_tokens} tokens) | compiles {self.compiles} | "
                f"cache hits {self.cache_hits} | {self.dispatches_per_token} dispatches/token")


class TextGenerator:
    """Mixin over ``generate_ids(ids, max_tokens, sampler, stop_ids)`` and a ``tokenizer``."""

    tokenizer = None

    def generate_ids(self, ids, max_tokens: int = 64, sampler=None, stop_ids=()) -> Iterator[int]:
        raise NotImplementedError

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stream: bool = False):
        """Text in, text out (``stream=True``: an iterator of text pieces as tokens arrive)."""
        from orion.models.sampling import Sampler

        if self.tokenizer is None:
            raise OrionError("this model has no tokenizer; use generate_ids with token ids")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise BindingError("the prompt is empty: give some text")
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stop = () if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)
        pieces = self._stream_text(self.generate_ids(ids, max_tokens, sampler, stop))
        return pieces if stream else "".join(pieces)

    def _stream_text(self, ids: Iterator[int]) -> Iterator[str]:
        decoder = self.tokenizer.stream()
        for token in ids:
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest
