"""orion train / export / generate on a checkpoint, through the command line; resuming as a new user would (a
damaged checkpoint, flags left at their defaults or contradicting the checkpoint); a text file without blank lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from orion.cli.main import cli
from orion.models.hub import train_bpe_tokenizer
from orion.train.checkpoint import load_checkpoint
from orion.train.corpus import make_story_corpus, write_corpus
from orion.train.optim import cosine_lr


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
    # flags that agree with the checkpoint (--tokenizer: the same tokenizer from another file) are accepted
    more = train("--data", str(corpus), "--steps", "6", "--save-every", "2", "--out", str(out), "--resume",
                 "--tokenizer", str(out / "data" / "tokenizer.json"))
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
    (["--data", "", "--steps", "2"], "give --data"),
])
def test_train_errors_are_one_line(corpus, tmp_path, args, message):
    if "--data" not in args:
        args = ["--data", str(corpus), *args]
    result = train(*args, "--out", str(tmp_path / "x"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def orion(*args: str) -> subprocess.CompletedProcess:
    """``orion ARGS`` in its own process: stderr as a user sees it, Python's own warnings included."""
    env = {k: v for k, v in os.environ.items() if k != "ORION_TRACEBACK"}
    return subprocess.run([sys.executable, "-m", "orion.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def metric_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_skips_a_damaged_checkpoint_and_takes_the_model_from_the_one_it_resumes(corpus, tmp_path):
    """The review's session: a run with --seq-len 32, its newest checkpoint truncated, then --resume with --config
    given and --seq-len left out. One warning line names the damaged checkpoint and the one resumed from (no Python
    warning, no traceback); the run goes on with the checkpoint's sequence length and tokenizer."""
    out = tmp_path / "run"
    common = ["train", "--config", "tiny", "--data", str(corpus), "--batch", "2", "--backend", "emulator", "--out",
              str(out)]
    first = orion(*common, "--steps", "2", "--save-every", "1", "--seq-len", "32")
    assert first.returncode == 0, first.stderr
    damaged = out / "checkpoint-00000002" / "model.safetensors"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(1000)

    resumed = orion(*common, "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr and "Warning" not in resumed.stderr and ".py:" not in resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line.lower()]
    assert warnings == [f"warning: checkpoint {damaged}: truncated: 1000 bytes, state.json records {size}; "
                        f"skipped it, resuming from {out / 'checkpoint-00000001'}"], resumed.stderr
    _, _, state = load_checkpoint(out / "checkpoint-00000003")
    assert state["config"]["max_seq_len"] == 32 and state["data"]["seq_len"] == 32
    assert state["settings"]["seq_len"] == 32 and state["settings"]["preset"] == "tiny"
    assert ((out / "checkpoint-00000003" / "tokenizer.json").read_bytes()
            == (out / "checkpoint-00000001" / "tokenizer.json").read_bytes())
    assert metric_steps(out) == [1, 2, 3]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 2-step run (tiny, --seq-len 32, the BPE trained on the corpus) that the refusals below leave as it is."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = train("--data", str(corpus), "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("flag, value, message", [
    ("--seq-len", "64", "--seq-len 64 sets max_seq_len 64, but {checkpoint} holds a model with max_seq_len 32; "),
    ("--batch", "4", "--batch is 4, but {checkpoint} was trained with batch 2; "),
    ("--batch", "8", "--batch is 8, but {checkpoint} was trained with batch 2; "),  # the default, given
    ("--accum", "2", "--accum is 2, but {checkpoint} was trained with accum 1; "),
    ("--seed", "5", "--seed is 5, but {checkpoint} was trained with seed 0; "),
    ("--loss-scale", "none", "--loss-scale is none, but {checkpoint} was trained with loss_scale dynamic; "),
    ("--config", "stories110m", "--config stories110m sets dim 768, but {checkpoint} holds a model with dim 64; "),
    ("--lora-rank", "4", "--lora-rank is 4, but {checkpoint} trained a whole model, not a LoRA adapter; "),
    ("--lora-alpha", "8", "--lora-alpha is 8.0, but {checkpoint} trained a whole model, not a LoRA adapter; "),
    ("--tokenizer", None, "--tokenizer {value} (300 tokens) is not the tokenizer {checkpoint} was trained with "
                          "(saved in it, {held} tokens); "),
])
def test_resume_refuses_a_flag_given_that_contradicts_the_checkpoint(corpus, trained, tmp_path, flag, value,
                                                                      message):
    if value is None:  # another tokenizer, of another vocabulary
        train_bpe_tokenizer(make_story_corpus(50, seed=3), 300, tmp_path)
        value = str(tmp_path / "tokenizer.json")
    before = sorted(p.name for p in trained.iterdir())
    result = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", "3", "--backend", "emulator",
                                      "--out", str(trained), "--resume", flag, value])
    assert result.exit_code == 2, result.output
    checkpoint = trained / "checkpoint-00000002"
    held = load_checkpoint(checkpoint)[2]["config"]["vocab_size"]
    expected = "error: " + message.format(checkpoint=checkpoint, value=value, held=held)
    # one line: no traceback, and no progress bar drawn for a run that never starts
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected), result.stderr
    assert "leave " + flag + " out, or use another --out" in result.stderr
    assert sorted(p.name for p in trained.iterdir()) == before


def test_resume_with_flags_left_out_continues_the_run_exactly_and_may_change_lr(corpus, tmp_path):
    """The review's bug: a run of --batch 2 resumed with --batch left out got the default 8 in its loss average while
    its restored batch stream still drew 2 sequences, scaling the loss and gradients by 1/4. Now every flag left out
    is the checkpoint's (data, batch, accum, seed, loss scaling, lr, ...), so the resumed run ends with
    bitwise the weights and losses of an uninterrupted one; a --lr given on resume is the new peak of the schedule."""
    from orion.models import model_backend
    from orion.train.trainer import Trainer, TrainSettings

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train("--data", str(corpus), "--steps", "4", "--out", str(whole), "--batch", "2", "--accum", "2",
                 "--seed", "3", "--loss-scale", "static", "--lr", "1e-2", "--save-every", "1", "--keep-last", "5",
                 "--seq-len", "32").exit_code == 0

    def stop_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    settings = TrainSettings(preset="tiny", data=str(corpus), out=str(part), steps=4, batch=2, accum=2, seed=3,
                             loss_scale="static", lr=1e-2, save_every=1, keep_last=5, seq_len=32)
    with pytest.raises(KeyboardInterrupt):
        Trainer(settings, backend=model_backend("emulator"), on_step=stop_after_two).run()
    resumed = CliRunner().invoke(cli, ["train", "--steps", "4", "--backend", "emulator", "--out", str(part),
                                       "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in part.glob("checkpoint-*")) == [f"checkpoint-0000000{i}" for i in (1, 2, 3, 4)]
    want, got = (load_checkpoint(out / "checkpoint-00000004") for out in (whole, part))
    for name in want[0]:
        assert got[0][name].tobytes() == want[0][name].tobytes(), name
    assert got[2]["settings"] | {"out": ""} == want[2]["settings"] | {"out": ""}
    assert got[2]["loss_scaler"] == want[2]["loss_scaler"]
    assert got[2]["data"] | {"path": ""} == want[2]["data"] | {"path": ""}
    losses = [[json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
              for out in (whole, part)]
    assert losses[1] == losses[0]

    more = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", "5", "--backend", "emulator",
                                    "--out", str(part), "--resume", "--lr", "5e-3"])
    assert more.exit_code == 0, more.output
    row = json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 5 and row["lr"] == cosine_lr(5, max_lr=5e-3, warmup_steps=1, total_steps=5, min_lr=5e-4)
    assert load_checkpoint(part / "checkpoint-00000005")[2]["settings"]["lr"] == 5e-3


def test_train_flag_defaults_are_a_fresh_runs_defaults():
    """A flag left at its default is passed as unset, so its shown default must be the one a fresh run uses."""
    from orion.train.trainer import FRESH_DEFAULTS

    defaults = {p.name: p.default for p in cli.commands["train"].params}
    flags = {name: value for name, value in FRESH_DEFAULTS.items() if name in defaults}
    assert {name: defaults[name] for name in flags} == flags and "lora_alpha" in flags


def test_a_text_file_without_blank_lines_trains_on_its_token_stream(tmp_path):
    """One sentence per line, as many corpora are: one document, so its token stream is split, and the user is told."""
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(s + ".\n" for story in make_story_corpus(150, seed=5)
                             for s in story.replace("\n", " ").split(". ")))
    out = tmp_path / "run"
    first = train("--data", str(notes), "--steps", "2", "--out", str(out))
    assert first.exit_code == 0, first.output
    info = json.loads((out / "data" / "dataset.json").read_text())
    total = info["train_tokens"] + info["val_tokens"]
    assert info["split"] == "tokens" and info["val_tokens"] == -(-total // 100)
    assert first.stderr.splitlines()[0] == (
        f"warning: {notes} has 1 document, too few to hold out 1% of them for validation (that takes at least 100 "
        f"documents; in a .txt file, blank lines separate them): split on its token stream instead, the last "
        f"{info['val_tokens']} of {total} tokens for validation"), first.stderr
    more = train("--data", str(notes), "--steps", "3", "--out", str(out), "--resume")
    assert more.exit_code == 0, more.output
    assert metric_steps(out) == [1, 2, 3]


def test_resume_without_config_takes_the_checkpoints_shape_whatever_it_is(corpus, tmp_path):
    """--config left at its default names no preset: a checkpoint of a shape no preset has (one layer) resumes."""
    from orion.models import model_backend
    from orion.train.trainer import Trainer, TrainSettings

    out = tmp_path / "run"
    Trainer(TrainSettings(data=str(corpus), out=str(out), steps=2, batch=2, seq_len=32,
                          model_overrides={"n_layers": 1}), backend=model_backend("emulator")).run()
    result = CliRunner().invoke(cli, ["train", "--data", str(corpus), "--steps", "3", "--batch", "2", "--backend",
                                      "emulator", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    config = load_checkpoint(out / "checkpoint-00000003")[2]["config"]
    assert config["n_layers"] == 1 and config["max_seq_len"] == 32
