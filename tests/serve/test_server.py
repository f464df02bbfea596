"""``orion serve`` through the ``openai`` client against a real server on 127.0.0.1: the tiny random GPT-2 and two
LoRA adapters, answers equal to ``orion generate`` with the same settings."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from tests.serve.conftest import ADAPTERS

PROMPT = "Once upon a time"
SETTINGS = dict(temperature=0.8, top_p=0.9, seed=7)
TOP_K = 40
NEW = 6


def orion_generate(model_dir, adapter_dir, prompt: str, max_tokens: int = NEW, temperature=0.8, top_p=0.9,
                   seed=7, top_k=TOP_K) -> str:
    """The text ``orion generate`` prints after the prompt, with the same settings."""
    args = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-tokens", str(max_tokens),
            "--temperature", str(temperature), "--top-p", str(top_p), "--seed", str(seed), "--top-k", str(top_k),
            "--backend", "emulator"] + (["--adapter", str(adapter_dir)] if adapter_dir else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(prompt) and result.stdout.endswith("\n")
    return result.stdout[len(prompt):-1]


@pytest.fixture(scope="module")
def expected(tiny_gpt2_dir, adapter_dirs):
    """``orion generate``'s continuation of PROMPT for the base model and each adapter (once per module)."""
    texts = {str(tiny_gpt2_dir): orion_generate(tiny_gpt2_dir, None, PROMPT)}
    texts.update({name: orion_generate(tiny_gpt2_dir, adapter_dirs[name], PROMPT) for name in ADAPTERS})
    assert len(set(texts.values())) == len(texts)  # each adapter changes the text: the comparisons mean something
    return texts


def test_models_lists_the_base_and_each_adapter(server, tiny_gpt2_dir):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [str(tiny_gpt2_dir), *ADAPTERS]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_orion_generate(server, expected, stream):
    client = server.client()
    for model, text in expected.items():
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, stream=stream,
                                           extra_body={"top_k": TOP_K}, **SETTINGS)
        if stream:
            chunks = list(answer)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            finish, usage = chunks[-1].choices[0].finish_reason, chunks[-1].usage
        else:
            got, finish, usage = answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
        assert got == text, model
        assert finish == "length" and usage.completion_tokens == NEW
        assert usage.prompt_tokens == len(server.engine.model.encode(PROMPT))
        assert usage.total_tokens == usage.prompt_tokens + NEW
