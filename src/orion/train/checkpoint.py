"""Training checkpoints that survive a kill at any instant: a resumed run gets back exactly what was saved, or an
older checkpoint, never a torn one.

Layout (``OUT`` is the run's output directory, ``STEP`` the step zero-padded to 8 digits)::

    OUT/checkpoint-STEP/model.safetensors      float32 master weights, names as given
    OUT/checkpoint-STEP/optimizer.safetensors  optimizer arrays (AdamW ``m.<name>``, ``v.<name>``, anything else)
    OUT/checkpoint-STEP/state.json             format, versions, step, size and sha256 of both files, the caller's
                                               state (config, data position, RNG states, loss scale, timings...)
                                               and a checksum of state.json itself
    OUT/.checkpoint.lock                       writers' cross-process lock; never deleted
    OUT/.checkpoint-STEP.tmp-<random>/         a checkpoint being written (or left by a killed writer)
    OUT/.checkpoint-STEP.old-<random>/         a checkpoint being replaced by a new save of the same step

Crash safety: a checkpoint only appears at ``checkpoint-STEP`` through one ``rename`` of a directory whose files
were fsynced, with state.json (which vouches for the others' sha256) written last. A reader re-checks every sha256,
so a disk that lost or changed bytes later gives a skipped checkpoint (``latest_checkpoint``) or a
:class:`CheckpointError` (``load_checkpoint``), never wrong numbers. Writers hold ``.checkpoint.lock`` for the whole
save, so any temp dir found while holding it belongs to a dead writer and is removed. No pickle anywhere: arrays are
safetensors, everything else strict JSON.

safetensors stores 0-d arrays and arrays with a zero-length axis exactly (shape kept), so both are allowed; array
names may be any string except ``__metadata__``, which the format reserves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from filelock import FileLock
from safetensors import SafetensorError

from orion import __version__
from orion.errors import OrionError, SettingsError
from orion.fileio import fsync_dir, write_new_file

FORMAT = "orion-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LOCK_FILE = ".checkpoint.lock"

_DIR_RE = re.compile(r"checkpoint-(\d{8})")
_TMP_RE = re.compile(r"\.checkpoint-(\d{8})\.tmp-[0-9a-f]+")
_ASIDE_RE = re.compile(r"\.checkpoint-(\d{8})\.old-[0-9a-f]+")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MAX_STEP = 10**8 - 1
#: Largest integer every JSON reader holds exactly (IEEE double); bigger RNG integers are written as strings.
_JSON_SAFE_INT = 2**53 - 1
#: numpy dtype kinds safetensors stores: bool, signed and unsigned ints, floats.
_ARRAY_KINDS = "biuf"
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_DAMAGED_FIX = "resume from an earlier checkpoint (latest_checkpoint skips damaged ones) or delete this directory"


class CheckpointError(OrionError):
    """A checkpoint that cannot be written, or one on disk that is missing, truncated, corrupted or malformed."""


# ------------------------------------------------------------------------------------------------------- saving


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    """The directory a checkpoint of ``step`` lives in: ``out_dir/checkpoint-STEP`` (8 digits, so names sort)."""
    return Path(out_dir) / f"checkpoint-{_check_step(step):08d}"


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    weights: Mapping[str, np.ndarray],
    optimizer: Mapping[str, np.ndarray],
    state: Mapping[str, Any],
    keep_last: int | None = 3,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint of ``step`` atomically and return its directory; then keep only the ``keep_last`` newest.

    ``weights`` must be float32 (the master copy); ``optimizer`` may hold bool, int or float arrays; ``state`` must be
    strict JSON (str keys, no tuples, no NaN) so that it loads back equal. A checkpoint already there for ``step`` is
    replaced. ``keep_last=None`` keeps every checkpoint. Stale temp dirs of killed writers are removed.
    ``extra_files`` (plain names -> bytes, e.g. ``tokenizer.json``) are written and checksummed with the rest.
    """
    extra = dict(extra_files or {})
    for name in extra:
        if not name or "/" in name or "\\" in name or name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE) \
                or name.startswith("."):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name other than the checkpoint's own")
    step = _check_step(step)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise SettingsError(f"keep_last={keep_last!r} is not a positive integer; fix: pass keep_last >= 1, or None")
    out = Path(out_dir)
    model_bytes = _serialize(weights, "weights", step, float32_only=True)
    optimizer_bytes = _serialize(optimizer, "optimizer", step, float32_only=False)
    user_state = _check_json(state, "state")
    if not isinstance(user_state, dict):
        raise CheckpointError(f"state is a {type(state).__name__}, not a dict; fix: pass a dict of JSON values")
    final = checkpoint_dir(out, step)
    try:
        created = not out.is_dir()
        out.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(out.parent)
        with FileLock(str(out / LOCK_FILE)):
            _remove_stale(out)
            tmp = out / f".checkpoint-{step:08d}.tmp-{secrets.token_hex(6)}"
            tmp.mkdir()
            try:
                files = {}
                for name, data in ((MODEL_FILE, model_bytes), (OPTIMIZER_FILE, optimizer_bytes), *extra.items()):
                    write_new_file(tmp / name, data)
                    files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                doc = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "orion_version": __version__,
                    "step": step,
                    "files": files,
                    "state": user_state,
                }
                doc["checksum"] = _checksum(doc)
                write_new_file(tmp / STATE_FILE, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("ascii"))
                fsync_dir(tmp)
                _install(tmp, final)
            except BaseException:
                with suppress(OSError):  # the next save removes it if this fails too
                    shutil.rmtree(tmp)
                raise
            if keep_last is not None:
                _prune(out, keep_last, final)
    except OSError as err:
        where = err.filename or out
        raise CheckpointError(
            f"cannot write checkpoint {final}: {where}: {err.strerror or err}; fix: free disk space or make {out} "
            "writable"
        ) from err
    return final


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= _MAX_STEP:
        raise CheckpointError(f"step={step!r} is not an integer in 0..{_MAX_STEP}; fix: pass the optimizer step count")
    return int(step)


def _serialize(arrays: Mapping[str, np.ndarray], what: str, step: int, float32_only: bool) -> bytes:
    """safetensors bytes of ``arrays``; refuses what would not load back identical (names, dtypes, non-arrays)."""
    if not isinstance(arrays, Mapping):
        raise CheckpointError(f"{what} is a {type(arrays).__name__}, not a dict of name -> numpy array")
    flat = {}
    for name, array in arrays.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(
                f"{what} name {name!r} cannot be stored in safetensors; fix: use a string other than '__metadata__'"
            )
        if isinstance(array, np.generic):  # a numpy scalar is stored as the 0-d array it stands for
            array = np.asarray(array)
        if not isinstance(array, np.ndarray):
            raise CheckpointError(f"{what}[{name!r}] is a {type(array).__name__}; fix: pass a numpy array")
        if float32_only and array.dtype != np.float32:
            raise CheckpointError(
                f"{what}[{name!r}] is {array.dtype}; fix: checkpoint float32 master weights (.astype(np.float32))"
            )
        if array.dtype.kind not in _ARRAY_KINDS:
            raise CheckpointError(
                f"{what}[{name!r}] has dtype {array.dtype}, which safetensors does not store; fix: use a bool, int "
                "or float array"
            )
        # safetensors' numpy writer reads a strided view's buffer as if it were dense, and stores little-endian.
        flat[name] = np.require(array, dtype=array.dtype.newbyteorder("<"), requirements="C")
    return safetensors.numpy.save(flat, metadata={"format": FORMAT, "step": str(step)})


def _check_json(value: Any, where: str) -> Any:
    """``value`` if ``json.loads(json.dumps(value)) == value``; otherwise name the part at fault and the fix."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{where} is {value}, which JSON cannot hold; fix: store it as a string or None")
        return value
    if isinstance(value, list):
        return [_check_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CheckpointError(
                    f"{where} has key {key!r} ({type(key).__name__}); fix: use string keys (JSON turns them into "
                    "strings, so the state would not load back equal)"
                )
        return {k: _check_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    hint = "use a list" if isinstance(value, tuple) else "convert it (e.g. .item(), .tolist(), str())"
    raise CheckpointError(f"{where} is a {type(value).__name__}, which is not plain JSON; fix: {hint}")


def _checksum(doc: dict) -> str:
    """sha256 of a canonical dump of ``doc``, so a flipped byte in state.json (which nothing else vouches for) shows."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an old ``final`` is renamed aside first, and deleted only once the new is in."""
    out = final.parent
    aside = None
    if final.is_symlink() or final.exists():
        if final.is_symlink() or not final.is_dir():
            raise CheckpointError(f"{final} exists and is not a checkpoint directory; fix: move it out of {out}")
        aside = out / f".{final.name}.old-{secrets.token_hex(6)}"
        os.rename(final, aside)
        fsync_dir(out)
    os.rename(tmp, final)
    fsync_dir(out)
    if aside is not None:
        shutil.rmtree(aside)


def _remove_stale(out: Path) -> None:
    """Clean up after killed writers (caller holds the lock, so no live writer owns any of these).

    A temp dir is deleted. A set-aside old checkpoint is put back if the writer died before its replacement was
    renamed in (else that step would be lost), and deleted otherwise.
    """
    for entry in sorted(out.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if _TMP_RE.fullmatch(entry.name):
            shutil.rmtree(entry)
        elif match := _ASIDE_RE.fullmatch(entry.name):
            final = checkpoint_dir(out, int(match[1]))
            if final.is_symlink() or final.exists():
                shutil.rmtree(entry)
            else:
                os.rename(entry, final)
                fsync_dir(out)


def _prune(out: Path, keep_last: int, written: Path) -> None:
    """Delete our checkpoints older than the ``keep_last`` newest complete ones, never ``written``.

    "Ours" means a real directory named ``checkpoint-`` + 8 digits; "complete" is the cheap check (state.json valid,
    files present with their recorded sizes), so pruning does not read every checkpoint's bytes. Damaged ones newer
    than the boundary stay for inspection (``latest_checkpoint`` warns about them).
    """
    ours = sorted(_regular_checkpoints(out), reverse=True)
    complete = [step for step, path in ours if _problem(path, deep=False) is None]
    if len(complete) <= keep_last:
        return
    boundary = complete[keep_last - 1]
    for step, path in ours:
        if step < boundary and path != written and not path.is_symlink():
            shutil.rmtree(path)


def _regular_checkpoints(out: Path) -> list[tuple[int, Path]]:
    return [
        (int(match[1]), entry)
        for entry in out.iterdir()
        if (match := _DIR_RE.fullmatch(entry.name)) and entry.is_dir()
    ]


# ------------------------------------------------------------------------------------------------------ reading


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``out_dir`` whose state.json and every file's sha256 check out, or None.

    Damaged or incomplete ones newer than it are skipped with a :class:`RuntimeWarning` naming them and the problem;
    temp dirs of writers are ignored. If a writer died while replacing a step's checkpoint, the set-aside old copy
    of that step counts (the next save puts it back in place).
    """
    path, damaged = find_latest_checkpoint(out_dir)
    for problem in damaged:
        warnings.warn(f"skipping damaged {problem}", RuntimeWarning, stacklevel=2)
    return path


def find_latest_checkpoint(out_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """:func:`latest_checkpoint` and, newest first, what is wrong with each damaged checkpoint newer than it (each
    problem names its checkpoint's path), for a caller that reports them in its own words."""
    out = Path(out_dir)
    damaged: list[str] = []
    if not out.is_dir():
        return None, damaged
    candidates = {step: [path] for step, path in _regular_checkpoints(out)}
    regular = set(candidates)
    for entry in sorted(out.iterdir()):
        match = _ASIDE_RE.fullmatch(entry.name)
        if match and entry.is_dir() and int(match[1]) not in regular:
            candidates.setdefault(int(match[1]), []).append(entry)
    for step in sorted(candidates, reverse=True):
        for path in candidates[step]:
            problem = _problem(path, deep=True)
            if problem is None:
                return path, damaged
            damaged.append(problem)
    return None, damaged


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """``(weights, optimizer, state)`` exactly as saved; raises :class:`CheckpointError` naming any damaged file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; fix: pass a path from latest_checkpoint()")
    doc = _read_state(path)
    arrays = []
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        file = path / name
        try:
            data = file.read_bytes()
        except OSError as err:
            raise CheckpointError(
                f"checkpoint {file}: cannot read ({err.strerror or err}); fix: {_DAMAGED_FIX}"
            ) from err
        _check_bytes(file, len(data), hashlib.sha256(data).hexdigest(), doc["files"][name])
        try:
            arrays.append(safetensors.numpy.load(data))
        except SafetensorError as err:
            raise CheckpointError(
                f"checkpoint {file}: not a valid safetensors file ({err}); fix: {_DAMAGED_FIX}"
            ) from err
    return arrays[0], arrays[1], doc["state"]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint directory holds, from its name (``checkpoint-00000200`` -> 200)."""
    name = Path(path).name
    match = _DIR_RE.fullmatch(name) or _ASIDE_RE.fullmatch(name)
    if not match:
        raise CheckpointError(f"{path} is not named like a checkpoint (checkpoint-<8 digits>)")
    return int(match[1])


def _problem(path: Path, deep: bool) -> str | None:
    """What is wrong with the checkpoint at ``path``, or None; ``deep`` also re-hashes the files."""
    try:
        doc = _read_state(path)
        for name, entry in doc["files"].items():
            file = path / name
            try:
                size = file.stat().st_size
                digest = _sha256_file(file) if deep else entry["sha256"]
            except OSError as err:
                raise CheckpointError(f"checkpoint {file}: cannot read ({err.strerror or err})") from err
            _check_bytes(file, size, digest, entry)
    except CheckpointError as err:
        return str(err).split("; fix:")[0]
    return None


def _read_state(path: Path) -> dict:
    """state.json of the checkpoint at ``path``, checked for format, step, file list and its own checksum."""
    file = path / STATE_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path}: {STATE_FILE} is missing (the save did not finish); fix: {_DAMAGED_FIX}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {file}: cannot read ({err}); fix: {_DAMAGED_FIX}") from err
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"checkpoint {file}: bad JSON at line {err.lineno}, column {err.colno} ({err.msg}); fix: {_DAMAGED_FIX}"
        ) from None
    problem = _state_problem(doc, path)
    if problem:
        raise CheckpointError(f"checkpoint {file}: {problem}; fix: {_DAMAGED_FIX}")
    return doc


def _state_problem(doc: Any, path: Path) -> str | None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return f"not an Orion checkpoint state (no \"format\": \"{FORMAT}\")"
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        return f"bad format_version {version!r}"
    if version > FORMAT_VERSION:
        return f"format_version {version} is newer than this Orion reads ({FORMAT_VERSION}); upgrade orion"
    if doc.get("checksum") != _checksum({k: v for k, v in doc.items() if k != "checksum"}):
        return "checksum mismatch (the file was changed after it was written)"
    match = _DIR_RE.fullmatch(path.name) or _ASIDE_RE.fullmatch(path.name)
    if match and doc.get("step") != int(match[1]):
        return f"step {doc.get('step')!r} does not match the directory name {path.name}"
    files = doc.get("files")
    if not isinstance(files, dict) or not {MODEL_FILE, OPTIMIZER_FILE} <= set(files):
        return f"files must list {MODEL_FILE} and {OPTIMIZER_FILE}"
    if any(not isinstance(n, str) or not n or "/" in n or "\\" in n or n.startswith(".") or n == STATE_FILE
           for n in files):
        return "files names a path that is not a plain file in the checkpoint"
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA_RE.fullmatch(entry["sha256"])
        ):
            return f"bad size/sha256 record for {name}"
    if not isinstance(doc.get("state"), dict):
        return "state is not a JSON object"
    return None


def _check_bytes(file: Path, size: int, digest: str, entry: dict) -> None:
    if size != entry["size"]:
        kind = "truncated" if size < entry["size"] else "too long"
        raise CheckpointError(
            f"checkpoint {file}: {kind}: {size} bytes, state.json records {entry['size']}; fix: {_DAMAGED_FIX}"
        )
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {file}: sha256 mismatch ({digest[:12]}..., state.json records {entry['sha256'][:12]}...): "
            f"the file is corrupted; fix: {_DAMAGED_FIX}"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------- RNG


def rng_state(generator: np.random.Generator) -> dict:
    """The full state of a numpy Generator as JSON: integers past 2**53 (which JSON readers round) become strings.

    Includes the SeedSequence, so ``spawn`` after :func:`restore_rng` also matches an uninterrupted run.
    """
    bit_generator = generator.bit_generator
    state = dict(bit_generator.state)
    name = state.pop("bit_generator")
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"bit generator {name!r} is not one numpy ships; fix: use one of {_BIT_GENERATORS}")
    seed_seq = bit_generator.seed_seq
    seq = None
    if isinstance(seed_seq, np.random.SeedSequence):
        entropy = seed_seq.entropy
        seq = {
            "entropy": _enc_int(entropy) if isinstance(entropy, (int, np.integer)) else [_enc_int(e) for e in entropy],
            "spawn_key": [_enc_int(k) for k in seed_seq.spawn_key],
            "pool_size": seed_seq.pool_size,
            "n_children_spawned": seed_seq.n_children_spawned,
        }
    return {"bit_generator": name, "state": _enc(state), "seed_seq": seq}


def restore_rng(state: Mapping[str, Any]) -> np.random.Generator:
    """A Generator in exactly the state :func:`rng_state` recorded: its next draws are the ones that would have come."""
    try:
        name = state["bit_generator"]
        if name not in _BIT_GENERATORS:
            raise ValueError(f"unknown bit generator {name!r}")
        seq = state["seed_seq"]
        seed_seq = None
        if seq is not None:
            entropy = seq["entropy"]
            seed_seq = np.random.SeedSequence(
                _dec(entropy),
                spawn_key=tuple(_dec(k) for k in seq["spawn_key"]),
                pool_size=seq["pool_size"],
                n_children_spawned=seq["n_children_spawned"],
            )
        bit_generator = getattr(np.random, name)(seed_seq)
        bit_generator.state = {"bit_generator": name, **_dec(state["state"])}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"numpy RNG state is damaged ({err!r}); fix: pass a dict made by rng_state()") from err
    return np.random.Generator(bit_generator)


def python_rng_state(rnd: random.Random | None = None) -> dict:
    """The state of ``rnd`` (default: the ``random`` module's own generator) as JSON."""
    version, internal, gauss_next = (rnd.getstate() if rnd is not None else random.getstate())
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def restore_python_rng(state: Mapping[str, Any], rnd: random.Random | None = None) -> None:
    """Put ``rnd`` (default: the ``random`` module's own generator) back in the state :func:`python_rng_state` gave."""
    try:
        value = (state["version"], tuple(state["internal"]), state["gauss_next"])
        (rnd.setstate if rnd is not None else random.setstate)(value)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"Python RNG state is damaged ({err!r}); fix: pass a dict made by python_rng_state()"
        ) from err


def _enc_int(value: int) -> int | str:
    value = int(value)
    return value if abs(value) <= _JSON_SAFE_INT else str(value)


def _enc(value: Any) -> Any:
    """numpy's bit generator state as JSON: dicts kept, ints as :func:`_enc_int`, arrays tagged with dtype/shape."""
    if isinstance(value, dict):
        return {k: _enc(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.dtype.name, "shape": list(value.shape), "values": [_enc_int(v) for v in value.flat]}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return _enc_int(value)
    raise CheckpointError(f"unexpected {type(value).__name__} in a numpy RNG state; fix: use a numpy bit generator")


def _dec(value: Any) -> Any:
    """Inverse of :func:`_enc` (every string in an encoded RNG state is an integer)."""
    if isinstance(value, dict):
        if set(value) == {"ndarray", "shape", "values"}:
            return np.array([int(v) for v in value["values"]], dtype=value["ndarray"]).reshape(value["shape"])
        return {k: _dec(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dec(v) for v in value]
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return int(value)
    raise TypeError(f"unexpected {type(value).__name__} {value!r}")
