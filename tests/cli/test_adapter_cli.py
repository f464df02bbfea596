"""``orion generate --adapter``: the continuation the Python API gives with the same adapter, and one clean error
line (exit status 2) for an adapter that cannot be read."""

from __future__ import annotations

import copy
import warnings

import pytest
from click.testing import CliRunner, Result

import orion
from orion.cli.main import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = "Once upon a time"
NEW = 8


@pytest.fixture(scope="module")
def folders(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 folder, and a PEFT adapter for it (random A and B: it changes the text)."""
    model_dir = tiny_gpt2_dir
    base = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    adapter_dir = tmp_path_factory.mktemp("adapters") / "story-lora"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
        peft_model.save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def generate(*args) -> Result:
    result = CliRunner().invoke(cli, ["generate", "--prompt", PROMPT, "--max-tokens", str(NEW), "--temperature", "0",
                                      "--backend", "emulator", *map(str, args)])
    return result


def test_generate_with_an_adapter_prints_what_the_python_api_gives(folders):
    model_dir, adapter_dir = folders
    with orion.load(str(model_dir), backend="emulator") as model:
        base_text = model.generate(PROMPT, max_tokens=NEW, temperature=0)
        model.set_adapter(model.load_adapter(adapter_dir))
        adapted_text = model.generate(PROMPT, max_tokens=NEW, temperature=0)
    assert adapted_text != base_text  # the adapter changes the continuation: the comparison below means something

    with_adapter = generate("--model", model_dir, "--adapter", adapter_dir)
    assert with_adapter.exit_code == 0, with_adapter.output
    assert with_adapter.stdout == PROMPT + adapted_text + "\n"
    assert "compiles" in with_adapter.stderr and "Traceback" not in with_adapter.output

    without = generate("--model", model_dir)
    assert without.exit_code == 0, without.output
    assert without.stdout == PROMPT + base_text + "\n"


@pytest.mark.parametrize("make_bad,fragments", [
    (lambda tmp, adapter: tmp / "no-such-adapter", ["no adapter folder at", "no-such-adapter", "adapter_config.json"]),
    (lambda tmp, adapter: _config_only(tmp, adapter), ["has no adapter_model.safetensors"]),
])
def test_a_bad_adapter_exits_2_with_one_error_line(folders, tmp_path, make_bad, fragments):
    model_dir, adapter_dir = folders
    result = generate("--model", model_dir, "--adapter", make_bad(tmp_path, adapter_dir))
    detail = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.exit_code == 2, detail
    assert "Traceback" not in result.output, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), detail
    for fragment in fragments:
        assert fragment in lines[0], (fragment, detail)
    assert result.stdout == ""  # nothing generated before the adapter is read


def _config_only(tmp, adapter):
    folder = tmp / "config-only"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    return folder
