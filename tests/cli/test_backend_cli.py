"""Honest about where it ran: every command's summary names the backend that executed its programs, and ``ane``
(asked with ``--backend`` or ``ORION_BACKEND``) never falls back: without an ANE it is one ``error:`` line naming
why, exit status 2, nothing written."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from orion.cli.main import cli
from orion.runtime.backends.ane import AneBackend
from orion.train.corpus import make_story_corpus, write_corpus
from tests.cli.test_cli import EXAMPLE, SMALL, _runner, assert_ok, assert_user_error, example_inputs, snapshot

pytestmark = pytest.mark.skipif(AneBackend.available(), reason="checks a machine without an ANE")
WHY = ("needs macOS on Apple silicon", f"this is {sys.platform}")


def invoke(*args, env: dict | None = None):
    return _runner().invoke(cli, [str(a) for a in args], env={**SMALL, **(env or {})})


def refusals(*args):
    """The command asked for the ANE both ways: the flag, and the environment with the default ``auto``."""
    yield invoke(*args, "--backend", "ane"), "backend 'ane'"
    yield invoke(*args, env={"ORION_BACKEND": "ane"}), "ORION_BACKEND='ane'"


def assert_refused(result, asked: str) -> None:
    """One ``error:`` line that is the refusal itself: what was asked, and why it cannot run here."""
    line = assert_user_error(result, *WHY)
    assert line.startswith(f"error: {asked}: the ANE backend"), line


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    write_corpus(path, make_story_corpus(200, seed=0))
    return path


def test_run(tmp_path):
    model = tmp_path / "block"
    assert_ok(invoke("compile", EXAMPLE, "--out", model))
    np.savez(tmp_path / "in.npz", x=example_inputs())
    out = tmp_path / "results" / "out.npz"
    for result, asked in refusals("run", model, "--inputs", tmp_path / "in.npz", "--out", out):
        assert_refused(result, asked)
        assert snapshot(out.parent) is None
    done = invoke("run", model, "--inputs", tmp_path / "in.npz", "--out", out)
    assert_ok(done)
    assert done.stdout.splitlines()[-1] == f"ran on emulator; wrote {out}"


def test_generate(tiny_gpt2_dir):
    args = ("generate", "--model", tiny_gpt2_dir, "--prompt", "Once upon a time", "--max-tokens", "3", "--seed", "0")
    for result, asked in refusals(*args):
        assert_refused(result, asked)
        assert result.stdout == ""
    done = invoke(*args)
    assert_ok(done)
    assert done.stderr.strip().splitlines()[-1].endswith("dispatches/token | backend emulator"), done.stderr


def test_train(corpus, tmp_path):
    out = tmp_path / "run"
    args = ("train", "--config", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "2", "--data", corpus,
            "--out", out)
    for result, asked in refusals(*args):
        assert_refused(result, asked)
        assert not out.exists()
    done = invoke(*args)
    assert_ok(done)
    assert re.search(r"^done: .*'backend':\s*'emulator'", done.stdout, re.MULTILINE | re.DOTALL), done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["emulator", "emulator"]
    story = invoke("generate", "--model", out / "checkpoint-00000002", "--prompt", "Once", "--max-tokens", "2")
    assert_ok(story)
    assert story.stderr.strip().splitlines()[-1].endswith("dispatches/token | backend emulator"), story.stderr


def test_bench(tiny_gpt2_dir, tmp_path):
    report = tmp_path / "bench.json"
    args = ("bench", "gpt2", "--model", tiny_gpt2_dir, "--reference", "none", "--prompt-tokens", "8",
            "--new-tokens", "2", "--json", report)
    for result, asked in refusals(*args):
        assert_refused(result, asked)
        assert not report.exists()
    assert_ok(invoke(*args))
    data = json.loads(report.read_text())
    assert data["orion"]["backend"] == data["orion.backend"] == "emulator"
    assert data["target"] == "default"


def test_bench_records_the_target_the_model_was_built_for_and_the_machine(tiny_gpt2_dir, tmp_path):
    from orion.runtime.cache import os_build

    report = tmp_path / "bench.json"
    args = ("bench", "gpt2", "--model", tiny_gpt2_dir, "--reference", "none", "--prompt-tokens", "8",
            "--new-tokens", "2", "--json", report)
    assert_user_error(invoke(*args, "--target", "m9"), "unknown target 'm9'")
    assert not report.exists()
    done = invoke(*args, "--target", "m4")
    assert_ok(done)
    data = json.loads(report.read_text())
    assert data["target"] == "m4"  # the name of the profile the benchmarked model was built for
    assert data["chip"] is None and data["os_build"] == os_build()  # the emulator ran: no chip to name
    assert "target m4" in done.stdout


def test_every_command_offers_the_backends_of_the_registry():
    import click

    from orion.runtime.backends import BACKENDS

    def options(command, path=()):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from options(sub, (*path, name))
        for param in command.params:
            if param.name == "backend":
                yield " ".join(path), param

    found = dict(options(cli))
    assert set(found) == {"run", "generate", "serve", "train", "demo", "bench gpt2", "bench llama", "doctor"}
    for name, param in found.items():
        assert list(param.type.choices) == list(BACKENDS) and param.default == "auto", name
