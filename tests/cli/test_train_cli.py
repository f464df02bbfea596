"""orion train / export / generate on a checkpoint, through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from orion.train.corpus import make_story_corpus, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    write_corpus(path, make_story_corpus(300, seed=0))
    return path


def train(*args):
    return CliRunner().invoke(cli, ["train", "--config", "tiny", "--batch", "2", "--seq-len", "32",
                                    "--backend", "emulator", *args])


def test_train_resume_export_and_generate(corpus, tmp_path):
    out = tmp_path / "run"
    first = train("--data", str(corpus), "--steps", "4", "--save-every", "2", "--out", str(out))
    assert first.exit_code == 0, first.output
    assert (out / "checkpoint-00000004" / "tokenizer.json").is_file() and (out / "loss.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "tokens_per_s", "ms_backend", "ms_cpu", "ms_update"} <= set(rows[0])
    more = train("--data", str(corpus), "--steps", "6", "--save-every", "2", "--out", str(out), "--resume")
    assert more.exit_code == 0, more.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    hf = tmp_path / "hf"
    exported = CliRunner().invoke(cli, ["export", str(out / "checkpoint-00000006"), "--out", str(hf)])
    assert exported.exit_code == 0, exported.output
    assert {p.name for p in hf.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    gen = CliRunner().invoke(cli, ["generate", "--model", str(out / "checkpoint-00000006"), "--prompt",
                                   "Once upon a time", "--max-tokens", "5", "--seed", "0", "--backend", "emulator"])
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.startswith("Once upon a time")


def test_exported_model_loads_in_transformers_with_orions_logits(corpus, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import orion

    out = tmp_path / "run"
    assert train("--data", str(corpus), "--steps", "2", "--out", str(out)).exit_code == 0
    assert CliRunner().invoke(cli, ["export", str(out / "checkpoint-00000002"), "--out", str(tmp_path / "hf")]
                              ).exit_code == 0
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with orion.load(str(out / "checkpoint-00000002"), backend="emulator") as model:
        ids = model.tokenizer.encode("Once upon a time there was a fox")
        got = model.logits(ids)
    with torch.no_grad():
        expected = reference(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(got - expected).max() < 0.01 * np.abs(expected).max() + 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent.txt", "--steps", "2"], "no such file"),
    (["--config", "huge", "--steps", "2"], "unknown preset"),
])
def test_train_errors_are_one_line(corpus, tmp_path, args, message):
    if "--data" not in args:
        args = ["--data", str(corpus), *args]
    result = train(*args, "--out", str(tmp_path / "x"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
