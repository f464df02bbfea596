"""Data-parallel training on 2 processes on 127.0.0.1 (emulator, tiny model), launched as users launch it: 2 ranks
of a global batch of 8 (4 rows each) give the per-step losses of 1 process with batch 8; a 2-rank run whose rank is
SIGKILLed after a checkpoint stops (the survivor names the dead rank, nothing is left running) and, resumed, ends
bitwise on the weights and moments of an uninterrupted 2-rank run. The pieces: the row shards, the overflow
agreement, and the error naming the extra."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import orion
from orion.errors import SettingsError
from orion.models import model_backend
from orion.runtime.cache import ProgramCache
from orion.train import distributed
from orion.train.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from orion.train.corpus import make_story_corpus, write_corpus
from orion.train.distributed import rank_rows
from orion.train.optim import AdamW, LossScaler, guarded_step
from orion.train.trainer import Trainer, TrainSettings

SRC = str(Path(orion.__file__).resolve().parents[1])
#: What every run here trains: the tiny preset on 32-token windows; lr 1e-2 so the losses move.
TRAIN = dict(preset="tiny", seq_len=32, lr=1e-2, seed=0)
TIMEOUT_S = 20  # --dist-timeout of the fault test: a survivor must stop well within it
STEPS, SAVE_EVERY = 16, 4  # the fault test's run: killed once checkpoint 4 is in, with steps left to kill


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    write_corpus(path, make_story_corpus(400, seed=0))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(corpus: Path, out: Path, steps: int, batch: int, save_every: int, *extra: str) -> list[str]:
    return ["-m", "orion.cli.main", "train", "--config", TRAIN["preset"], "--data", str(corpus), "--steps", str(steps),
            "--batch", str(batch), "--seq-len", str(TRAIN["seq_len"]), "--lr", str(TRAIN["lr"]), "--seed",
            str(TRAIN["seed"]), "--save-every", str(save_every), "--backend", "emulator", "--out", str(out), *extra]


def _env(**variables) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")} | variables


def _ranks(args: list[str], logs: Path, world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks started with the variables torchrun gives them (rank 0 then hosts the rendezvous store)."""
    port = str(_free_port())
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, *args], stdout=open(logs / f"rank{r}.out", "wb"),
                             stderr=open(logs / f"rank{r}.err", "wb"),
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def _reap(ranks: list[subprocess.Popen]) -> None:
    """Kill and wait for every rank still running (a test never leaves one behind)."""
    for rank in ranks:
        if rank.poll() is None:
            rank.kill()
            rank.wait()


def _finish(ranks: list[subprocess.Popen], logs: Path, timeout: float = 300) -> None:
    try:
        for rank in ranks:
            rank.wait(timeout=timeout)
    finally:
        _reap(ranks)
    for r, rank in enumerate(ranks):
        assert rank.returncode == 0, (logs / f"rank{r}.err").read_text()[-3000:]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))  # one writer: one row per step
    return [row["loss"] for row in rows]


def _alive_with(marker: str) -> list[str]:
    """Command lines of the live processes that mention ``marker`` (a run's unique --out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if marker in cmdline and "State:\tZ" not in status:
                found.append(cmdline)
    return found


def test_two_ranks_of_batch_4_give_the_per_step_losses_of_one_process_of_batch_8(corpus, tmp_path):
    steps = 4
    one = tmp_path / "one"
    Trainer(TrainSettings(data=str(corpus), out=str(one), steps=steps, batch=8, save_every=3, **TRAIN),
            backend=model_backend("emulator"), target="default", cache=ProgramCache(None)).run()

    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port())]
    result = subprocess.run(launch + _train_args(corpus, two, steps, 8, 3), env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[:3000]

    single, parallel = _losses(one), _losses(two)
    assert len(parallel) == steps
    np.testing.assert_allclose(parallel, single, rtol=0, atol=1e-4)
    assert parallel != single  # the sums ran in another order: the 2-rank losses are the ranks' own, not a copy
    weights, _, state = load_checkpoint(latest_checkpoint(two))
    reference, _, _ = load_checkpoint(latest_checkpoint(one))
    assert state["ranks"] == 2 and state["step"] == steps
    for name in reference:  # Adam's m / sqrt(v) magnifies rounding where v is tiny: 6 steps of lr 1e-2 move ~0.06
        np.testing.assert_allclose(weights[name], reference[name], rtol=0, atol=1e-3, err_msg=name)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> tuple[dict, dict, list[float]]:
    """An uninterrupted 2-rank run: its final weights, moments and losses."""
    out = tmp_path_factory.mktemp("straight")
    _finish(_ranks(_train_args(corpus, out / "run", STEPS, 4, SAVE_EVERY), out / "logs"), out / "logs")
    weights, moments, _ = load_checkpoint(latest_checkpoint(out / "run"))
    return weights, moments, _losses(out / "run")


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_rank_stops_the_run_naming_it_and_resume_ends_bitwise_as_an_uninterrupted_run(corpus, tmp_path,
                                                                                               straight, victim):
    """SIGKILL lands on rank ``victim`` once a checkpoint is written (rank 0 is the writer and hosts the store)."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    ranks = _ranks(_train_args(corpus, out, STEPS, 4, SAVE_EVERY, "--dist-timeout", str(TIMEOUT_S)), logs)
    survivor = 1 - victim
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(out) is None:
            assert all(rank.poll() is None for rank in ranks), (logs / "rank0.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        ranks[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        ranks[survivor].wait(timeout=TIMEOUT_S + 10)
        stopped_after = time.monotonic() - killed
    finally:
        _reap(ranks)
    assert ranks[victim].returncode == -signal.SIGKILL
    error = (logs / f"rank{survivor}.err").read_text()
    assert ranks[survivor].returncode == 2, error[-3000:]
    assert stopped_after < TIMEOUT_S
    named = "rank 1 stopped responding" if victim == 1 else "rank 0 (or the launcher), which hosts the rendezvous"
    assert f"error: rank {survivor} of 2: " in error and named in error, error[-3000:]
    assert _alive_with(str(out)) == []
    assert not list(out.glob(".checkpoint-*.tmp-*")) or victim == 0  # only a dying writer can leave a torn one
    resumed_from = checkpoint_step(latest_checkpoint(out))
    assert SAVE_EVERY <= resumed_from < STEPS

    _finish(_ranks(_train_args(corpus, out, STEPS, 4, SAVE_EVERY, "--resume"), tmp_path / "resumed"),
            tmp_path / "resumed")
    weights, moments, state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == STEPS
    for name in straight[0]:
        assert np.array_equal(weights[name], straight[0][name]), name
    for name in straight[1]:
        assert np.array_equal(moments[name], straight[1][name]), name
    assert _losses(out) == straight[2]


@pytest.mark.slow
def test_a_hung_rank_stops_the_run_naming_it_within_the_timeout(corpus, tmp_path):
    """SIGSTOP instead of SIGKILL: no connection closes, so the survivor's collective must time out."""
    out, logs, timeout = tmp_path / "run", tmp_path / "logs", 5
    ranks = _ranks(_train_args(corpus, out, STEPS, 4, SAVE_EVERY, "--dist-timeout", str(timeout)), logs)
    try:
        while latest_checkpoint(out) is None:
            assert all(rank.poll() is None for rank in ranks), (logs / "rank0.err").read_text()[-3000:]
            time.sleep(0.02)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        ranks[0].wait(timeout=6 * timeout)
        waited = time.monotonic() - stopped
    finally:
        _reap(ranks)
    error = (logs / "rank0.err").read_text()
    assert ranks[0].returncode == 2 and timeout <= waited < 4 * timeout, (waited, error[-3000:])
    assert "error: rank 0 of 2: " in error and "Timed out" in error and "rank 1 stopped responding" in error, error
    assert _alive_with(str(out)) == []


def test_the_ranks_rows_cover_the_global_batch_without_overlap():
    for world in (1, 2, 3, 4):
        shards = [set(rank_rows(12, rank, world)) for rank in range(world)]
        assert set().union(*shards) == set(range(12)) and sum(map(len, shards)) == 12
    with pytest.raises(SettingsError, match=r"--batch 6 does not split over 4 ranks.*multiple of 4"):
        rank_rows(6, 0, 4)


def _step(weights, agree):
    optimizer = AdamW({k: v.copy() for k, v in weights.items()}, lr=1e-2)
    scaler = LossScaler("dynamic", init_scale=256.0)
    grads = {k: np.full_like(v, 0.5) for k, v in weights.items()}
    report = guarded_step(optimizer, scaler, grads, max_norm=1.0, lr=1e-2, agree=agree)
    return optimizer, scaler, report


def test_an_overflow_on_another_rank_skips_the_step_here_too():
    weights = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.full(4, 0.3, np.float32)}
    asked = []
    optimizer, scaler, report = _step(weights, lambda found: asked.append(found) or True)  # another rank overflowed
    assert report.skipped and scaler.scale == 128.0 and optimizer.step_count == 0
    assert asked == [False]  # this rank's own gradients were finite
    for name, w in weights.items():
        assert np.array_equal(optimizer.params[name], w)
    optimizer, scaler, report = _step(weights, lambda found: asked.append(found) or found)  # nobody overflowed
    assert not report.skipped and scaler.scale == 256.0 and optimizer.step_count == 1
    assert asked == [False, False, False]  # asked about the gradients, then about the new weights


def test_a_multi_process_run_without_torch_names_the_extra_and_a_single_process_run_never_imports_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    with pytest.raises(SettingsError, match=r"pip install 'orion-ane\[distributed\]'"):
        distributed._torch_distributed()
    probe = ("import sys, orion.cli.main, orion.train.trainer, orion.train.distributed as d; "
             "assert not d.launched(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK")}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_a_rank_without_torchruns_variables_is_told_to_use_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert distributed.launched()
    with pytest.raises(SettingsError, match=r"MASTER_PORT .*not: launch the ranks with torchrun"):
        distributed.ProcessGroup.from_environment(5)
