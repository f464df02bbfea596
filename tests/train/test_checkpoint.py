"""Checkpoints: exact round trips, pruning, replacement, every kind of damage, and a writer SIGKILLed mid-file.

Oracles are independent of the code under test: raw array bytes, ``hashlib`` over the files on disk, safetensors'
own reader, ``json``, and draws of an RNG that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orion.train.checkpoint as ck
from orion.errors import OrionError, SettingsError
from orion.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    python_rng_state,
    restore_python_rng,
    restore_rng,
    rng_state,
    save_checkpoint,
)

SPECIAL_F32 = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x00000001, 0x7F800000], dtype="<u4").view("<f4")


def make_run(seed: int) -> tuple[dict, dict, dict]:
    """Weights, AdamW moments (plus a step counter) and a state like a training loop's, all from ``seed``."""
    rng = np.random.default_rng(seed)
    weights = {
        "embed.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "blocks.0.attn.bias": rng.standard_normal(8, dtype=np.float32),
        "ln.scale": np.array(rng.standard_normal(), dtype=np.float32),  # 0-d
        "odd_bits": SPECIAL_F32.copy(),  # NaN payloads, -0, a denormal, inf: must come back bit for bit
    }
    optimizer = {f"{k}.{name}": rng.random(w.shape, dtype=np.float32) for name, w in weights.items() for k in "mv"}
    optimizer["step"] = np.array(seed, dtype=np.int64)
    state = {
        "config": {"lr": 3e-4, "betas": [0.9, 0.999], "model": "gpt2-tiny", "seed": seed},
        "data": {"epoch": 1, "index": 123 + seed, "shard": "train-000.bin"},
        "rng": {"numpy": rng_state(rng), "python": python_rng_state(random.Random(seed))},
        "loss_scale": 65536.0,
        "timings": {"step_s": 0.125, "save_s": 0.5},
        "unicode": "ß→\u2603",
    }
    return weights, optimizer, state


def assert_arrays_identical(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


def assert_loads_as(path: Path, weights: dict, optimizer: dict, state: dict) -> None:
    got_w, got_o, got_s = load_checkpoint(path)
    assert_arrays_identical(got_w, weights)
    assert_arrays_identical(got_o, optimizer)
    assert got_s == state


def names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def checkpoints(out: Path) -> list[str]:
    return [n for n in names(out) if re.fullmatch(r"checkpoint-\d{8}", n)]


def latest_without_warnings(out: Path) -> Path | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return latest_checkpoint(out)


# ------------------------------------------------------------------------------------------------- round trips


def test_round_trip_is_bitwise_and_files_are_what_state_json_says(tmp_path):
    weights, optimizer, state = make_run(1)
    path = save_checkpoint(tmp_path, 200, weights, optimizer, state)

    assert path == tmp_path / "checkpoint-00000200" == checkpoint_dir(tmp_path, 200)
    assert checkpoint_step(path) == 200
    assert names(path) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert_loads_as(path, weights, optimizer, state)
    # Independent readers: safetensors' own loader, json, hashlib.
    assert_arrays_identical(safetensors.numpy.load_file(str(path / "model.safetensors")), weights)
    assert_arrays_identical(safetensors.numpy.load_file(str(path / "optimizer.safetensors")), optimizer)
    doc = json.loads((path / "state.json").read_text())
    assert doc["step"] == 200 and doc["format_version"] == 1 and doc["state"] == state
    assert doc["orion_version"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        data = (path / name).read_bytes()
        assert doc["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert latest_without_warnings(tmp_path) == path


def test_strided_and_big_endian_arrays_keep_their_values(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    weights = {"strided": base[::2, ::3], "transposed": base.T}
    optimizer = {"big_endian": np.arange(5, dtype=">f8"), "flags": np.array([True, False, True])}
    path = save_checkpoint(tmp_path, 1, weights, optimizer, {})
    got_w, got_o, _ = load_checkpoint(path)
    for got, want in [(got_w, weights), (got_o, optimizer)]:
        for name, array in want.items():
            np.testing.assert_array_equal(got[name], array)
            assert got[name].shape == array.shape
    assert got_o["big_endian"].dtype == np.dtype("<f8")


def test_loaded_arrays_are_writable_and_leave_the_checkpoint_as_saved(tmp_path):
    """A resumed run updates its master weights and moments in place: the loaded arrays must take that, and the
    files must not (arrays mapped onto a checkpoint's files would write the update into them)."""
    weights, optimizer, state = make_run(2)
    path = save_checkpoint(tmp_path, 3, weights, optimizer, state)
    w, o, _ = load_checkpoint(path)
    assert all(a.flags.writeable for a in [*w.values(), *o.values()])
    w["embed.weight"] += 1
    o["m.embed.weight"] *= 0
    np.testing.assert_array_equal(w["embed.weight"], weights["embed.weight"] + 1)
    assert not o["m.embed.weight"].any()
    assert_loads_as(path, weights, optimizer, state)


@pytest.mark.parametrize(
    ("weights", "optimizer", "state", "match"),
    [
        ({"w": np.zeros(2, np.float64)}, {}, {}, r"float64.*astype\(np.float32\)"),
        ({"w": [1.0]}, {}, {}, "numpy array"),
        ({"__metadata__": np.zeros(2, np.float32)}, {}, {}, "__metadata__"),
        ({}, {"c": np.zeros(2, np.complex64)}, {}, "complex64"),
        ({}, {}, {"betas": (0.9, 0.99)}, r"state\['betas'\] is a tuple.*use a list"),
        ({}, {}, {"loss": float("nan")}, r"state\['loss'\] is nan"),
        ({}, {}, {1: "x"}, "string keys"),
        ({}, {}, {"scale": np.float16(2)}, r"state\['scale'\] is a float16"),
        ({}, {}, [1, 2], "not a dict"),
    ],
)
def test_save_refuses_what_would_not_load_back_equal(tmp_path, weights, optimizer, state, match):
    with pytest.raises(CheckpointError, match=match) as info:
        save_checkpoint(tmp_path, 1, weights, optimizer, state)
    assert isinstance(info.value, OrionError)
    assert not (tmp_path / "checkpoint-00000001").exists()


@pytest.mark.parametrize("step", [-1, 10**8, 1.5, True])
def test_bad_step(tmp_path, step):
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(tmp_path, step, {}, {}, {})


@pytest.mark.parametrize("keep_last", [0, -2, 1.5])
def test_bad_keep_last(tmp_path, keep_last):
    with pytest.raises(SettingsError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, {}, {}, keep_last=keep_last)


# ------------------------------------------------------------------------------ pruning, replacing, cleaning up


def test_keep_last_prunes_oldest_and_nothing_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for foreign in ("checkpoint-best", "checkpoint-123", ".checkpoint-cache", "checkpoint-000000100"):
        (tmp_path / foreign).mkdir()
        (tmp_path / foreign / "x").write_text("mine")
    saved = {}
    for step in (10, 20, 30, 40, 50):
        saved[step] = make_run(step)
        save_checkpoint(tmp_path, step, *saved[step], keep_last=3)

    assert checkpoints(tmp_path) == ["checkpoint-00000030", "checkpoint-00000040", "checkpoint-00000050"]
    for foreign in ("checkpoint-best", "checkpoint-123", ".checkpoint-cache", "checkpoint-000000100"):
        assert (tmp_path / foreign / "x").read_text() == "mine"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    for step in (30, 40, 50):
        assert_loads_as(checkpoint_dir(tmp_path, step), *saved[step])

    # A run restarted from an earlier step: the checkpoint just written is never pruned.
    rolled_back = make_run(5)
    save_checkpoint(tmp_path, 5, *rolled_back, keep_last=2)
    assert checkpoints(tmp_path) == [
        "checkpoint-00000005",
        "checkpoint-00000040",
        "checkpoint-00000050",
    ]
    assert_loads_as(checkpoint_dir(tmp_path, 5), *rolled_back)


def test_keep_last_none_keeps_all_and_damaged_ones_do_not_count(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, *make_run(step), keep_last=None)
    assert len(checkpoints(tmp_path)) == 3
    (checkpoint_dir(tmp_path, 3) / "model.safetensors").unlink()
    # keep_last=2 counts complete checkpoints only: 4 and 2, so 1 goes and damaged 3 (newer) stays for inspection.
    save_checkpoint(tmp_path, 4, *make_run(4), keep_last=2)
    assert checkpoints(tmp_path) == [
        "checkpoint-00000002",
        "checkpoint-00000003",
        "checkpoint-00000004",
    ]


def test_saving_an_existing_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 10, *make_run(1))
    second = make_run(2)
    path = save_checkpoint(tmp_path, 10, *second)
    assert names(tmp_path) == [".checkpoint.lock", "checkpoint-00000010"]
    assert_loads_as(path, *second)


def test_a_step_is_not_lost_when_its_replacement_dies_between_the_renames(tmp_path, monkeypatch):
    first = make_run(1)
    save_checkpoint(tmp_path, 10, *first, keep_last=1)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device", str(src))  # the old copy is already set aside
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, 10, *make_run(2), keep_last=1)
    monkeypatch.setattr(os, "rename", real_rename)

    aside = [n for n in names(tmp_path) if n.startswith(".checkpoint-00000010.old-")]
    assert len(aside) == 1 and not checkpoint_dir(tmp_path, 10).exists()
    found = latest_without_warnings(tmp_path)
    assert found == tmp_path / aside[0] and checkpoint_step(found) == 10
    assert_loads_as(found, *first)

    third = make_run(3)
    save_checkpoint(tmp_path, 20, *third, keep_last=2)  # puts the set-aside step back, then saves
    assert names(tmp_path) == [".checkpoint.lock", "checkpoint-00000010", "checkpoint-00000020"]
    assert_loads_as(checkpoint_dir(tmp_path, 10), *first)
    assert_loads_as(checkpoint_dir(tmp_path, 20), *third)


def test_stale_temp_dirs_are_ignored_then_removed(tmp_path):
    first = make_run(1)
    save_checkpoint(tmp_path, 10, *first)
    # A complete-looking copy under a temp name (a writer killed just before its rename) must not count.
    shutil.copytree(checkpoint_dir(tmp_path, 10), tmp_path / ".checkpoint-00000010.tmp-0123abcd")
    (tmp_path / ".checkpoint-00000090.tmp-ffff").mkdir()
    (tmp_path / ".checkpoint-00000090.tmp-ffff" / "model.safetensors").write_bytes(b"\x10\x00")
    assert latest_without_warnings(tmp_path) == checkpoint_dir(tmp_path, 10)

    save_checkpoint(tmp_path, 20, *make_run(2))
    assert names(tmp_path) == [".checkpoint.lock", "checkpoint-00000010", "checkpoint-00000020"]
    assert_loads_as(checkpoint_dir(tmp_path, 10), *first)


# --------------------------------------------------------------------------------------------------- damage


def _truncate(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-7])


def _flip_byte(path: Path) -> None:
    file = path / "optimizer.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _flip_state_digit(path: Path) -> None:
    file = path / "state.json"
    file.write_text(file.read_text().replace('"index": 143', '"index": 144'))


DAMAGE = {
    "missing model": (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "No such file"),
    "missing optimizer": (lambda p: (p / "optimizer.safetensors").unlink(), "optimizer.safetensors", "No such file"),
    "truncated safetensors": (_truncate, "model.safetensors", r"truncated: \d+ bytes, state.json records \d+"),
    "flipped byte": (_flip_byte, "optimizer.safetensors", "sha256 mismatch"),
    "bad JSON": (lambda p: (p / "state.json").write_text('{"format": "orion-'), "state.json", "bad JSON at line 1"),
    "missing state.json": (lambda p: (p / "state.json").unlink(), "state.json is missing", "did not finish"),
    "edited state.json": (_flip_state_digit, "state.json", "checksum mismatch"),
    "empty directory": (lambda p: [f.unlink() for f in p.iterdir()], "state.json is missing", "did not finish"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_skipped_and_refused(tmp_path, kind):
    damage, file, problem = DAMAGE[kind]
    good = make_run(10)
    save_checkpoint(tmp_path, 10, *good)
    bad = save_checkpoint(tmp_path, 20, *make_run(20))
    damage(bad)

    with pytest.warns(RuntimeWarning, match="checkpoint-00000020") as caught:
        assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert any(file in str(w.message) and re.search(problem, str(w.message)) for w in caught)

    with pytest.raises(CheckpointError, match=problem) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert isinstance(info.value, OrionError)
    assert "checkpoint-00000020" in message and file in message and "fix:" in message
    assert_loads_as(checkpoint_dir(tmp_path, 10), *good)


def test_nothing_valid_gives_none(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    bad = save_checkpoint(tmp_path, 5, *make_run(5))
    (bad / "state.json").unlink()
    with pytest.warns(RuntimeWarning, match="checkpoint-00000005"):
        assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "checkpoint-00000099")


def test_state_json_of_another_step_is_refused(tmp_path):
    a = save_checkpoint(tmp_path, 1, *make_run(1))
    b = save_checkpoint(tmp_path, 2, *make_run(2))
    shutil.copy(a / "state.json", b / "state.json")
    with pytest.raises(CheckpointError, match="does not match the directory name"):
        load_checkpoint(b)


# ------------------------------------------------------------------------------------- killed mid-write (FAULT)

CHILD = r"""
import os, sys, time
import orion.train.checkpoint as ck
from tests.train.test_checkpoint import make_run

real_write = ck.write_new_file

def write_half_then_hang(path, data):
    if path.name == ck.MODEL_FILE:
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print("half-written", len(data), flush=True)
        while True:
            time.sleep(60)
    real_write(path, data)

ck.write_new_file = write_half_then_hang
ck.save_checkpoint(sys.argv[1], 20, *make_run(20))
print("finished", flush=True)
"""


def test_writer_killed_mid_checkpoint_leaves_previous_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    ten = make_run(10)
    save_checkpoint(out, 10, *ten)

    repo = Path(__file__).resolve().parents[2]
    src = Path(ck.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(repo), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline().decode() if ready else ""
        assert line.startswith("half-written"), (line, child.poll())
        full_size = int(line.split()[1])
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    # The kill landed mid-file: a temp dir holds half of model.safetensors and no state.json; no checkpoint-20.
    (tmp,) = [p for p in out.iterdir() if p.name.startswith(".checkpoint-00000020.tmp-")]
    assert names(tmp) == ["model.safetensors"]
    assert 0 < (tmp / "model.safetensors").stat().st_size < full_size
    assert not checkpoint_dir(out, 20).exists()

    assert latest_without_warnings(out) == checkpoint_dir(out, 10)
    assert_loads_as(checkpoint_dir(out, 10), *ten)

    twenty = make_run(20)
    assert save_checkpoint(out, 20, *twenty) == checkpoint_dir(out, 20)  # the dead writer's lock is free
    assert latest_without_warnings(out) == checkpoint_dir(out, 20)
    assert_loads_as(checkpoint_dir(out, 20), *twenty)
    assert names(out) == [".checkpoint.lock", "checkpoint-00000010", "checkpoint-00000020"]


# ------------------------------------------------------------------------------------------ property: round trip

FLOAT32_ARRAYS = st.lists(st.integers(0, 3), max_size=3).flatmap(
    lambda shape: st.binary(min_size=4 * int(np.prod(shape)), max_size=4 * int(np.prod(shape))).map(
        lambda raw, shape=shape: np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    )
)
OPTIMIZER_DTYPES = ["<f2", "<f4", "<f8", "<i1", "<i4", "<i8", "<u1", "<u8", "|b1"]


@st.composite
def optimizer_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(OPTIMIZER_DTYPES)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = int(np.prod(shape))
    raw = draw(st.binary(min_size=dtype.itemsize * size, max_size=dtype.itemsize * size))
    if dtype.kind == "b":
        raw = bytes(b & 1 for b in raw)  # numpy bools are 0 or 1
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


NAMES = st.text(max_size=6).filter(lambda s: s != "__metadata__")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=st.dictionaries(NAMES, FLOAT32_ARRAYS, max_size=4),
    optimizer=st.dictionaries(NAMES, optimizer_arrays(), max_size=4),
    state=st.dictionaries(st.text(max_size=5), JSON, max_size=4),
    step=st.integers(0, 10**8 - 1),
)
def test_any_arrays_and_json_state_round_trip_exactly(weights, optimizer, state, step):
    with tempfile.TemporaryDirectory() as out:
        path = save_checkpoint(out, step, weights, optimizer, state)
        assert checkpoint_step(path) == step
        assert latest_without_warnings(Path(out)) == path
        got_w, got_o, got_s = load_checkpoint(path)
        assert_arrays_identical(got_w, weights)
        assert_arrays_identical(got_o, optimizer)
        assert got_s == state and json.loads(json.dumps(got_s)) == state


# ------------------------------------------------------------------------------------------------------- RNG


def _json_ints(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _json_ints(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_ints(v)
    elif isinstance(value, int):
        yield value


@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_numpy_rng_resumes_exactly(bit_generator):
    uninterrupted = np.random.Generator(getattr(np.random, bit_generator)([7, 11]))
    uninterrupted.random(3)
    uninterrupted.integers(0, 1000, size=1, dtype=np.uint32)  # leaves a buffered half word in some generators
    saved = json.loads(json.dumps(rng_state(uninterrupted)))  # as it travels through state.json
    assert all(abs(i) <= 2**53 for i in _json_ints(saved))  # big ints went in as strings

    resumed = restore_rng(saved)
    assert resumed.integers(0, 2**32, size=3, dtype=np.uint32).tolist() == uninterrupted.integers(
        0, 2**32, size=3, dtype=np.uint32
    ).tolist()
    assert resumed.random(5).tobytes() == uninterrupted.random(5).tobytes()
    assert resumed.standard_normal(4).tobytes() == uninterrupted.standard_normal(4).tobytes()
    (child_resumed,) = resumed.spawn(1)
    (child_uninterrupted,) = uninterrupted.spawn(1)
    assert child_resumed.random(3).tobytes() == child_uninterrupted.random(3).tobytes()


def test_rng_states_survive_a_checkpoint(tmp_path):
    gen, rnd = np.random.default_rng(99), random.Random(5)
    gen.random(10)
    rnd.gauss(0, 1)  # leaves gauss_next set: part of the state
    path = save_checkpoint(tmp_path, 1, {}, {}, {"numpy": rng_state(gen), "python": python_rng_state(rnd)})
    _, _, state = load_checkpoint(path)
    resumed, resumed_py = restore_rng(state["numpy"]), random.Random()
    restore_python_rng(state["python"], resumed_py)
    assert resumed.random(8).tobytes() == gen.random(8).tobytes()
    assert [resumed_py.gauss(0, 1) for _ in range(3)] == [rnd.gauss(0, 1) for _ in range(3)]
    assert [resumed_py.random() for _ in range(3)] == [rnd.random() for _ in range(3)]


def test_python_module_rng_round_trip():
    before = random.getstate()
    try:
        random.seed(3)
        random.random()
        saved = json.loads(json.dumps(python_rng_state()))
        expected = [random.random() for _ in range(4)]
        random.seed(12345)
        restore_python_rng(saved)
        assert [random.random() for _ in range(4)] == expected
    finally:
        random.setstate(before)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(bit_generator="Mystery"),
        lambda s: s.pop("state"),
        lambda s: s["state"]["state"].update(state="not a number"),
    ],
)
def test_damaged_numpy_rng_state_is_refused(damage):
    state = rng_state(np.random.default_rng(1))
    damage(state)
    with pytest.raises(CheckpointError, match="rng_state"):
        restore_rng(state)


def test_damaged_python_rng_state_is_refused():
    state = python_rng_state(random.Random(1))
    state["internal"] = state["internal"][:10]
    with pytest.raises(CheckpointError, match="python_rng_state"):
        restore_python_rng(state, random.Random())
