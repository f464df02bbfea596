"""orion.load on a Hugging Face folder, generation through the Python API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import orion
import orion.errors
from orion.cli.main import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2_dir):
    return tiny_gpt2_dir


def test_load_generate_and_logits(model_dir):
    with orion.load(str(model_dir), backend="emulator") as model:
        text = model.generate("Once upon a time", max_tokens=12, temperature=0.8, seed=3)
        again = model.generate("Once upon a time", max_tokens=12, temperature=0.8, seed=3)
        assert text == again and isinstance(text, str)
        pieces = list(model.generate("Once upon a time", max_tokens=12, temperature=0.8, seed=3, stream=True))
        assert "".join(pieces) == text
        assert model.stats.new_tokens <= 12 and model.stats.prompt_tokens == len(model.tokenizer.encode(
            "Once upon a time"))
        ids = model.tokenizer.encode("The cat sat on the mat")
        logits = model.logits(ids)
        reference = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
        with torch.no_grad():
            expected = reference(torch.tensor(ids)[None]).logits[0].numpy()
        assert np.abs(logits - expected).max() < 0.02 * np.abs(expected).max()


def test_generate_command_streams_text_and_prints_figures(model_dir):
    result = CliRunner().invoke(cli, ["generate", "--model", str(model_dir), "--prompt", "The cat",
                                      "--max-tokens", "8", "--seed", "1", "--backend", "emulator"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The cat")
    assert "prefill" in result.stderr and "decode" in result.stderr and "compiles" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/folder", "--prompt", "x"], "no such model folder"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "word " * 400], "context of 128"),
])
def test_generate_command_errors(model_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(model_dir)] + args
    result = CliRunner().invoke(cli, ["generate", *args, "--backend", "emulator"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_unknown_architecture_and_damaged_weights(model_dir, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(orion.errors.OrionError, match="model_type 'bert' is not supported"):
        orion.load(str(other))
    (other / "config.json").write_text(json.dumps(config))
    data = (other / "model.safetensors").read_bytes()
    (other / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(orion.errors.WeightFileError):
        orion.load(str(other))


def test_the_end_of_text_token_that_stops_generation_is_not_in_the_text(model_dir):
    """generate_ids yields the stop token (it is a generated token, counted in the figures); the text omits it."""
    from orion.models.hub import Tokenizer
    from orion.models.lm import TextGenerator

    tokenizer = Tokenizer.from_dir(model_dir)
    story = tokenizer.encode(" The cat sat")

    class Scripted(TextGenerator):
        def generate_ids(self, ids, max_tokens=64, sampler=None, stop_ids=()):
            assert tuple(stop_ids) == (tokenizer.eos_id,)
            yield from [*story, tokenizer.eos_id]

    model = Scripted()
    model.tokenizer = tokenizer
    assert tokenizer.eos_id is not None
    assert model.generate("Once", max_tokens=10) == " The cat sat"
    assert "".join(model.generate("Once", max_tokens=10, stream=True)) == " The cat sat"


def test_bench_predict_prints_the_cost_model_for_the_models_programs(model_dir, tmp_path):
    """The m4 target's 16 weight tensors per program hold one block: the tiny model's two blocks are two
    dispatches, and their weights (12 d^2 fp16 values each, plus biases) are what the table charges."""
    report = tmp_path / "predict.json"
    result = CliRunner().invoke(cli, ["bench", "predict", "--model", str(model_dir), "--chip", "m4",
                                      "--prompt-tokens", "20", "--new-tokens", "8", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "ANE cost model" in result.stdout and "67 GB/s" in result.stdout
    figures = json.loads(report.read_text())
    d = 64
    assert figures["target"] == "m4" and figures["decode"]["dispatches"] == 2
    assert figures["decode"]["weight_mb"] == pytest.approx(2 * 12 * d * d * 2 / 1e6, rel=0.05)
    assert figures["decode"]["tok_s"] > 0 and figures["prefill"]["tok_s"] > figures["decode"]["tok_s"]
    int8 = CliRunner().invoke(cli, ["bench", "predict", "--model", str(model_dir), "--chip", "m4", "--quantize",
                                    "int8", "--head", "ane", "--prompt-tokens", "20", "--new-tokens", "8",
                                    "--json", str(report)])
    assert int8.exit_code == 0, int8.output
    assert "weights int8, classifier on the ane" in int8.stdout
    compressed = json.loads(report.read_text())
    assert (compressed["weights"], compressed["head"], compressed["decode"]["host_mb"]) == ("int8", "ane", 0)
    assert compressed["decode"]["dispatches"] == 3  # two block programs and the classifier's
    for args in (["bench", "predict", "--model", str(model_dir), "--chip", "m4", "--keep-fp16", "h00_*"],
                 ["bench", "gpt2", "--model", str(model_dir), "--quantize", "int8", "--json", str(report)]):
        refused = CliRunner().invoke(cli, args)
        assert refused.exit_code == 2 and ("needs --quantize" in refused.stderr or
                                           "--quantize: only with --predict CHIP" in refused.stderr), refused.output
    bad = CliRunner().invoke(cli, ["bench", "gpt2", "--predict", "m9", "--model", str(model_dir)])
    assert bad.exit_code == 2 and "known chips: m1, m4" in bad.stderr
    measured_without_json = CliRunner().invoke(cli, ["bench", "gpt2", "--model", str(model_dir)])
    assert measured_without_json.exit_code == 2 and "--json" in measured_without_json.stderr


def test_generate_with_a_draft_prints_the_targets_text_and_the_acceptance(model_dir):
    """The model drafting for a second copy of itself: every drafted token is kept, and the text is the same."""
    args = ["generate", "--model", str(model_dir), "--prompt", "The cat", "--max-tokens", "12", "--temperature", "0",
            "--backend", "emulator"]
    alone = CliRunner().invoke(cli, args)
    drafted = CliRunner().invoke(cli, [*args, "--draft", str(model_dir), "--draft-tokens", "3"])
    assert alone.exit_code == 0 and drafted.exit_code == 0, drafted.output
    assert drafted.stdout == alone.stdout
    assert "draft: " in drafted.stderr and "(100%)" in drafted.stderr and "draft" not in alone.stderr
    bad = CliRunner().invoke(cli, [*args, "--draft", "/nonexistent/folder"])
    assert bad.exit_code == 2 and "no such model folder" in bad.stderr


def test_gpt2_takes_the_classifier_on_the_ane_and_refuses_an_unknown_place(model_dir):
    with orion.load(str(model_dir), backend="emulator", head="ane") as model:
        assert model.head == "ane" and len(model._head_graphs()) == 1
    with pytest.raises(orion.errors.OrionError, match="head must be one of"):
        orion.load(str(model_dir), backend="emulator", head="gpu")


def test_load_reads_a_gpt2_one_block_at_a_time(model_dir, monkeypatch):
    """orion.load reads the tensors as GPT-2 folds its blocks: a block's tensors are gone before the next block's
    are read, so the file is never all in memory (the folded blocks go to a temporary file)."""
    import re
    import weakref

    from orion.models.hub import SafetensorsFile

    alive: list[tuple[int, weakref.ref]] = []  # (block, tensor) of every tensor read and still referenced
    blocks_read = set()
    read = SafetensorsFile.__getitem__

    def counted(self, name):
        block = re.search(r"h\.(\d+)\.", name)
        if block:
            i = int(block.group(1))
            blocks_read.add(i)
            assert not [j for j, r in alive if j < i and r() is not None], f"block {i} read before the last's went"
        array = read(self, name)
        alive.append((int(block.group(1)) if block else -1, weakref.ref(array)))
        return array

    monkeypatch.setattr(SafetensorsFile, "__getitem__", counted)
    orion.load(str(model_dir), backend="emulator")
    assert blocks_read == {0, 1}
