"""Chat templates (tokenizer_config.json's chat_template) rendered with jinja2, against transformers'
apply_chat_template on the same folder; ``orion generate --chat`` on a Llama-family folder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import orion
from orion.cli.main import cli
from orion.errors import OrionError
from orion.models.bench import randomize_biases_and_norms
from orion.models.hub import Tokenizer, train_bpe_tokenizer
from tests.conftest import STORY_TEXTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

#: A template in the style of the published ones: a system turn, roles, the end-of-text token after each turn,
#: loop controls, an exception for a bad role, and the generation prompt.
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|endoftext|>system\nYou are kind.{{ eos_token }}\n{% endif %}"
            "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
            "<|endoftext|>{{ message['role'] }}\n{{ message['content'] | trim }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny random Qwen2 with a BPE tokenizer that adds a BOS (as Llama's do: the chat prompt, which writes its
    own, must not get a second) and the chat template above, saved in Hugging Face layout."""
    import tokenizers

    folder = tmp_path_factory.mktemp("tiny-chat")
    tok = train_bpe_tokenizer(STORY_TEXTS, 300, folder)
    tok.inner.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.eos_id)])
    tok.inner.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id))
    randomize_biases_and_norms(model).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("messages", [
    "The cat sat on the mat ",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"},
     {"role": "assistant", "content": "there was a fox."}, {"role": "user", "content": "And then?"}],
])
def test_the_chat_prompt_is_the_one_transformers_renders(chat_dir, messages):
    ours = Tokenizer.from_dir(chat_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(chat_dir)
    conversation = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    text = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.chat(messages) == text
    expected = theirs.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ours.encode(ours.chat(messages), add_special_tokens=False) == list(expected)
    assert ours.encode("The cat")[0] == ours.eos_id  # the BOS plain prompts get


def test_template_errors_and_a_folder_without_one_are_refused(chat_dir, tmp_path):
    tok = Tokenizer.from_dir(chat_dir)
    with pytest.raises(OrionError, match="unknown role robot"):
        tok.chat([{"role": "robot", "content": "beep"}])
    plain = train_bpe_tokenizer(STORY_TEXTS, 300, tmp_path)
    with pytest.raises(OrionError, match="no chat template"):
        plain.chat("hello")


def test_named_templates_and_chat_template_jinja(chat_dir, tmp_path):
    """tokenizer_config.json may list named templates ("default" is the chat one); chat_template.jinja wins."""
    train_bpe_tokenizer(STORY_TEXTS, 300, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}!"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).chat("hi") == "hi!"
    (tmp_path / "chat_template.jinja").write_text("[{{ messages[0].content }}]")
    assert Tokenizer.from_dir(tmp_path).chat("hi") == "[hi]"


def test_generate_with_chat_feeds_the_templated_prompt(chat_dir):
    with orion.load(str(chat_dir), backend="emulator") as model:
        text = model.generate("The cat", max_tokens=6, temperature=0.0, chat=True)
        expected = model.tokenizer.encode(model.tokenizer.chat("The cat"), add_special_tokens=False)
        assert model.stats.prompt_tokens == len(expected) > len(model.tokenizer.encode("The cat"))
    result = CliRunner().invoke(cli, ["generate", "--model", str(chat_dir), "--prompt", "The cat", "--chat",
                                      "--max-tokens", "6", "--temperature", "0", "--backend", "emulator"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "The cat\n" + text + "\n"


def test_generate_chat_without_a_template_warns_and_uses_the_plain_format(tiny_gpt2_dir):
    """The server's format for models without a template (TextGenerator.chat_prompt), said on stderr."""
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_gpt2_dir), "--prompt", "x", "--chat",
                                      "--max-tokens", "2", "--backend", "emulator"])
    assert result.exit_code == 0 and "no chat template" in result.stderr, result.output
    with orion.load(str(tiny_gpt2_dir), backend="emulator") as model:
        plain = model.tokenizer.encode("user: x\nassistant:")
    assert f"prompt {len(plain)} tokens" in result.stderr


def test_generate_with_chat_and_a_llama_draft_prints_the_targets_text(chat_dir):
    """A Llama drafting for a second copy of itself, on the chat prompt (the draft's prompt is templated as the
    target's): every drafted token is kept, and the text is the target's alone."""
    args = ["generate", "--model", str(chat_dir), "--prompt", "The dog ran", "--chat", "--max-tokens", "10",
            "--temperature", "0", "--backend", "emulator"]
    alone = CliRunner().invoke(cli, args)
    drafted = CliRunner().invoke(cli, [*args, "--draft", str(chat_dir), "--draft-tokens", "3"])
    assert alone.exit_code == 0 and drafted.exit_code == 0, drafted.output
    assert drafted.stdout == alone.stdout
    assert "draft: " in drafted.stderr and "(100%)" in drafted.stderr
