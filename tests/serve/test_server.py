"""``orion serve`` through the ``openai`` client against a real server on 127.0.0.1: the tiny random GPT-2 and two
LoRA adapters, answers equal to ``orion generate`` with the same settings."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from orion.cli.main import cli

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
def expected(tiny_gpt2_dir, tiny_gpt2_adapters):
    """``orion generate``'s continuation of PROMPT for the base model and each adapter (once per module)."""
    texts = {str(tiny_gpt2_dir): orion_generate(tiny_gpt2_dir, None, PROMPT)}
    texts.update({name: orion_generate(tiny_gpt2_dir, tiny_gpt2_adapters[name], PROMPT) for name in tiny_gpt2_adapters})
    assert len(set(texts.values())) == len(texts)  # each adapter changes the text: the comparisons mean something
    return texts


def test_models_lists_the_base_and_each_adapter(server, tiny_gpt2_dir):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [str(tiny_gpt2_dir), "fox", "cat"]
    assert server.client().models.retrieve("cat").parent == str(tiny_gpt2_dir)


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


MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me of the fox."}]
#: The documented fallback chat format (the tiny tokenizer has no chat template).
CHAT_PROMPT = "system: You tell stories.\nuser: Tell me of the fox.\nassistant:"


@pytest.mark.parametrize("model", ["base", "cat"])
def test_chat_equals_orion_generate_of_the_fallback_format(server, tiny_gpt2_dir, tiny_gpt2_adapters,
                                                           model):
    want = orion_generate(tiny_gpt2_dir, tiny_gpt2_adapters.get(model), CHAT_PROMPT)
    name = str(tiny_gpt2_dir) if model == "base" else model
    client = server.client()
    whole = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=NEW, extra_body={"top_k": TOP_K},
                                           **SETTINGS)
    assert whole.object == "chat.completion" and whole.model == name
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == want
    assert whole.usage.prompt_tokens == len(server.engine.model.encode(CHAT_PROMPT))
    assert whole.usage.completion_tokens == NEW

    chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=NEW, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"top_k": TOP_K}, **SETTINGS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens  # OpenAI's form


def test_switching_adapters_across_requests_compiles_nothing(server, expected):
    client = server.client()
    for model in expected:  # every program this prompt needs is built (or was, by earlier tests)
        client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, **SETTINGS)
    before = server.metrics()
    for model in [*expected, *reversed(list(expected)), *expected]:
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, extra_body={"top_k": TOP_K},
                                           **SETTINGS)
        assert answer.choices[0].text == expected[model]  # the switch took effect
    after = server.metrics()
    assert after["requests"]["completed"] == before["requests"]["completed"] + 3 * len(expected)
    assert after["compiles"] == before["compiles"] and after["cache_hits"] == before["cache_hits"]
    assert before["compiles"] + before["cache_hits"] > 0  # the counters do count the programs that were built
    assert after["backend"] == "emulator"
    assert after["last_generation"]["adapter"] == "cat" and after["tokens_per_second"] > 0
