"""The program cache never hands back partial or foreign data: torn entries (from corruption or a writer killed with
SIGKILL) are misses that a new put repairs, concurrent writers of one key both succeed, names never leave an entry;
the LRU matches a naive list model; cache keys are injective in their parts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import orion.runtime.cache as cache_mod
from orion.errors import CacheError, SettingsError
from orion.runtime.cache import ArtifactCache, LRUCache, cache_key, default_cache_dir, os_build

KEY = hashlib.sha256(b"a program").hexdigest()
KEY2 = hashlib.sha256(b"another program").hexdigest()


def payload(seed: int = 0, big: int = 1 << 20) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {"net.plist": rnd.randbytes(700), "data": rnd.randbytes(big), "weights/w.bin": rnd.randbytes(64)}


def entry_dir(root: Path, key: str) -> Path:
    return root / key[:2] / key


def tmp_children(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir()) if (root / "tmp").exists() else []


# ------------------------------------------------------------------------------------------------- round trip


def test_round_trip_and_second_instance_hits(tmp_path):
    files = payload()
    cache = ArtifactCache(tmp_path)
    assert cache.get(KEY) is None
    cache.put(KEY, files)
    assert cache.get(KEY) == files
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores, cache.stats.corrupted) == (1, 1, 1, 0)
    other = ArtifactCache(tmp_path)  # what another process sees: only the directory is shared
    assert other.get(KEY) == files
    assert other.stats.hits == 1 and other.stats.misses == 0
    # files are stored verbatim at their names, next to a manifest
    for name, data in files.items():
        assert (entry_dir(tmp_path, KEY) / name).read_bytes() == data
    manifest = json.loads((entry_dir(tmp_path, KEY) / "manifest.json").read_text())
    assert manifest["key"] == KEY
    assert {f["name"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()
    }
    assert tmp_children(tmp_path) == []


def test_put_of_existing_valid_entry_does_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.put(KEY, payload(1))
    cache.put(KEY, payload(2))
    assert cache.get(KEY) == payload(1)
    assert cache.stats.stores == 1


def test_empty_file_and_empty_entry(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.put(KEY, {"empty": b""})
    cache.put(KEY2, {})
    assert cache.get(KEY) == {"empty": b""}
    assert cache.get(KEY2) == {}


# ------------------------------------------------------------------------------------------------- corruption


def _rewrite_manifest(entry: Path, edit) -> None:
    path = entry / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _truncate(entry: Path, outside: Path) -> None:
    data = (entry / "data").read_bytes()
    (entry / "data").write_bytes(data[: len(data) // 2])


def _flip_byte(entry: Path, outside: Path) -> None:
    data = bytearray((entry / "data").read_bytes())
    data[len(data) // 3] ^= 0x01
    (entry / "data").write_bytes(bytes(data))


def _append(entry: Path, outside: Path) -> None:
    with open(entry / "net.plist", "ab") as f:
        f.write(b"x")


def _delete_manifest(entry: Path, outside: Path) -> None:
    (entry / "manifest.json").unlink()


def _garbage_manifest(entry: Path, outside: Path) -> None:
    (entry / "manifest.json").write_bytes(b'{"format": 1, "files": [')


def _manifest_not_object(entry: Path, outside: Path) -> None:
    (entry / "manifest.json").write_text("[1, 2, 3]")


def _manifest_wrong_key(entry: Path, outside: Path) -> None:
    _rewrite_manifest(entry, lambda m: m.update(key=KEY2))


def _list_file(entry: Path, name: str, data: bytes) -> None:
    """Add a record for ``name`` with the size and sha256 of ``data`` to the entry's manifest."""
    record = {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _rewrite_manifest(entry, lambda m: m["files"].append(record))


def _escape(entry: Path, outside: Path) -> None:
    # a file one level up with a matching size and sha256: following the name would "verify"
    target = entry.parent / "escape"
    target.write_bytes(b"secret")
    outside.write_text(str(target))
    _list_file(entry, "../escape", b"secret")


def _absolute(entry: Path, outside: Path) -> None:
    target = outside.parent / "abs.bin"
    target.write_bytes(b"secret")
    outside.write_text(str(target))
    _list_file(entry, str(target), b"secret")


def _duplicate_name(entry: Path, outside: Path) -> None:
    _list_file(entry, "data", (entry / "data").read_bytes())


def _symlink(entry: Path, outside: Path) -> None:
    # same bytes, but the entry's file is a link to a file outside the entry
    target = outside.parent / "linked.bin"
    target.write_bytes((entry / "data").read_bytes())
    outside.write_text(str(target))
    (entry / "data").unlink()
    (entry / "data").symlink_to(target)


def _symlinked_dir(entry: Path, outside: Path) -> None:
    target = outside.parent / "linked_dir"
    target.mkdir()
    (target / "w.bin").write_bytes((entry / "weights" / "w.bin").read_bytes())
    outside.write_text(str(target / "w.bin"))
    (entry / "weights" / "w.bin").unlink()
    (entry / "weights").rmdir()
    (entry / "weights").symlink_to(target, target_is_directory=True)


def _missing_file(entry: Path, outside: Path) -> None:
    _list_file(entry, "extra", b"abc")


def _deleted_file(entry: Path, outside: Path) -> None:
    (entry / "weights" / "w.bin").unlink()


def _bad_size_field(entry: Path, outside: Path) -> None:
    _rewrite_manifest(entry, lambda m: m["files"][0].update(size="700"))


CORRUPTIONS = [
    _truncate, _flip_byte, _append, _delete_manifest, _garbage_manifest, _manifest_not_object, _manifest_wrong_key,
    _escape, _absolute, _duplicate_name, _symlink, _symlinked_dir, _missing_file, _deleted_file, _bad_size_field,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupted_entry_is_a_counted_miss_and_put_repairs_it(tmp_path, corrupt):
    root = tmp_path / "cache"
    files = payload(3, big=4096)
    cache = ArtifactCache(root)
    cache.put(KEY, files)
    note = tmp_path / "outside-target"  # the corruption records here any file it planted outside the entry
    corrupt(entry_dir(root, KEY), note)
    assert cache.get(KEY) is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupted) == (0, 1, 1)
    assert KEY not in cache.entries()  # removed
    if note.exists():  # files outside the entry are neither read nor deleted
        assert Path(note.read_text()).exists()
    assert cache.get(KEY) is None  # now a plain miss
    assert cache.stats.corrupted == 1
    cache.put(KEY, files)
    assert cache.get(KEY) == files
    assert cache.stats.stores == 2


def test_put_replaces_a_corrupted_entry(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.put(KEY, payload(4))
    _flip_byte(entry_dir(tmp_path, KEY), tmp_path / "unused")
    cache.put(KEY, payload(4))
    assert cache.stats.corrupted == 1 and cache.stats.stores == 2
    assert cache.get(KEY) == payload(4)


# ------------------------------------------------------------------------------------------------- bad input, I/O


@pytest.mark.parametrize(
    "names", [["../x"], ["/abs"], ["a/../b"], ["a/./b"], ["a//b"], [""], ["manifest.json"], ["a\\b"], ["a", "a/b"]]
)
def test_put_refuses_names_that_could_leave_the_entry(tmp_path, names):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(CacheError):
        cache.put(KEY, {n: b"x" for n in names})
    assert cache.entries() == []
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["", "ab", KEY.upper(), "../" + KEY[3:], KEY + "0"])
def test_bad_keys_are_refused(tmp_path, key):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(CacheError):
        cache.get(key)
    with pytest.raises(CacheError):
        cache.put(key, {"a": b"x"})


def test_disk_full_raises_cache_error_and_leaves_nothing(tmp_path, monkeypatch):
    real = cache_mod.write_new_file
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(cache_mod, "write_new_file", failing)
    cache = ArtifactCache(tmp_path)
    with pytest.raises(CacheError, match="ORION_CACHE_DIR") as info:
        cache.put(KEY, payload(5, big=10))
    assert str(calls[1]) in str(info.value) and os.strerror(errno.ENOSPC) in str(info.value)
    assert tmp_children(tmp_path) == [] and cache.entries() == []
    monkeypatch.setattr(cache_mod, "write_new_file", real)
    assert cache.get(KEY) is None
    cache.put(KEY, payload(5, big=10))
    assert cache.get(KEY) == payload(5, big=10)


def test_unwritable_root_raises_on_put_and_misses_on_get(tmp_path):
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")  # a file where the cache directory should be (works even when running as root)
    cache = ArtifactCache(root)
    with pytest.raises(CacheError, match=str(root)):
        cache.put(KEY, {"a": b"x"})
    assert cache.get(KEY) is None


def test_unreadable_entry_is_a_warned_miss_not_a_deletion(tmp_path, monkeypatch):
    cache = ArtifactCache(tmp_path)
    cache.put(KEY, payload(6, big=10))

    def denied(path, size):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(cache_mod, "_read_exact", denied)
    with pytest.warns(RuntimeWarning, match="uncached"):
        assert cache.get(KEY) is None
    assert cache.stats.corrupted == 0 and cache.entries() == [KEY]
    monkeypatch.undo()
    assert cache.get(KEY) == payload(6, big=10)


# ------------------------------------------------------------------------------------------------- maintenance


def test_entries_size_clear(tmp_path):
    cache = ArtifactCache(tmp_path)
    keys = sorted(hashlib.sha256(bytes([i])).hexdigest() for i in range(3))
    stored = {k: payload(i, big=1000 * (i + 1)) for i, k in enumerate(keys)}
    for k, files in stored.items():
        cache.put(k, files)
    assert cache.entries() == keys
    manifests = sum((entry_dir(tmp_path, k) / "manifest.json").stat().st_size for k in keys)
    assert cache.size_bytes() == sum(len(d) for f in stored.values() for d in f.values()) + manifests
    cache.clear()
    assert cache.entries() == [] and all(cache.get(k) is None for k in keys)
    assert cache.size_bytes() == 0
    assert ArtifactCache(tmp_path / "absent").entries() == []


def test_prune_stale_removes_only_old_temp_dirs(tmp_path):
    cache = ArtifactCache(tmp_path)
    old, fresh = tmp_path / "tmp" / "old.tmp", tmp_path / "tmp" / "fresh.tmp"
    for d in (old, fresh):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"partial")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    assert cache.prune_stale() == 1
    assert tmp_children(tmp_path) == [fresh]
    cache.put(KEY, {"a": b"x"})  # put prunes too, and keeps fresh temp dirs of live writers
    assert tmp_children(tmp_path) == [fresh]
    assert cache.prune_stale(older_than_s=-1) == 1 and tmp_children(tmp_path) == []
    assert cache.get(KEY) == {"a": b"x"}


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ORION_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ORION_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "orion"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "orion"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "orion"


def test_os_build_names_the_platform():
    assert platform.platform() in os_build()


# ------------------------------------------------------------------------------------------------- processes

CHILD = r"""
import os, sys, time
from pathlib import Path
import orion.runtime.cache as c

root, key, src, block_at, release, go = sys.argv[1:7]
block_at = int(block_at)
files = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(Path(src).rglob("*")) if p.is_file()}
real, calls = c.write_new_file, [0]

def hooked(path, data):
    calls[0] += 1
    if calls[0] == block_at:  # write half of this file, say so, then hang (until killed or released)
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        print("BLOCKED", flush=True)
        while not (release and os.path.exists(release)):
            time.sleep(0.01)
        os.remove(path)
    real(path, data)

c.write_new_file = hooked
cache = c.ArtifactCache(Path(root), lock_timeout_s=30)
print("READY", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.001)
cache.put(key, files)
ok = cache.get(key) == files
print("STORES", cache.stats.stores, "OK", ok, flush=True)
"""


class Child:
    """A python process running CHILD; its stdout lines arrive on a queue so waits can time out."""

    def __init__(self, root: Path, src: Path, *, block_at: int = 0, release: Path | str = "", go: Path | str = ""):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), KEY, str(src), str(block_at), str(release), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.strip())
        self.lines.put("EOF")

    def expect(self, word: str, timeout: float = 30) -> str:
        line = self.lines.get(timeout=timeout)
        if not line.startswith(word):
            self.proc.kill()
            pytest.fail(f"child said {line!r}, expected {word}; stderr: {self.proc.stderr.read()}")
        return line

    def finish(self) -> int:
        """Wait for the end; returns the entries the child stored and checks its own get saw the full data."""
        line = self.expect("STORES")
        assert self.proc.wait(timeout=30) == 0
        _, stores, _, ok = line.split()
        assert ok == "True"
        return int(stores)


@pytest.fixture
def spawn():
    """Start children; at teardown kill any still running (a failed test must not leave one hanging) and close pipes."""
    children: list[Child] = []

    def start(*args, **kwargs) -> Child:
        children.append(Child(*args, **kwargs))
        return children[-1]

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(timeout=30)
        child.proc.stderr.close()


def write_src(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


posix_only = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock semantics are POSIX")


@posix_only
@pytest.mark.parametrize("block_at", [1, 4], ids=["mid-first-file", "mid-manifest"])
def test_writer_killed_mid_put_leaves_a_miss_that_put_repairs(tmp_path, spawn, block_at):
    files = payload(7)
    assert len(files) == 3  # calls 1-3 write the files, call 4 the manifest
    root = tmp_path / "cache"
    child = spawn(root, write_src(tmp_path / "src", files), block_at=block_at)
    child.expect("READY")
    child.expect("BLOCKED")
    child.proc.send_signal(signal.SIGKILL)
    assert child.proc.wait(timeout=30) == -signal.SIGKILL
    assert len(tmp_children(root)) == 1  # the kill really happened mid-write: a half-written temp dir is left

    cache = ArtifactCache(root, lock_timeout_s=5)  # the dead child's lock must not block us
    assert cache.get(KEY) is None
    assert cache.entries() == [] and cache.stats.corrupted == 0
    cache.put(KEY, files)
    assert cache.get(KEY) == files
    assert ArtifactCache(root).get(KEY) == files
    assert cache.prune_stale(older_than_s=-1) == 1 and tmp_children(root) == []
    assert cache.get(KEY) == files


@posix_only
def test_processes_putting_one_key_at_once_all_succeed(tmp_path, spawn):
    files = payload(8, big=4 << 20)
    root, go = tmp_path / "cache", tmp_path / "go"
    src = write_src(tmp_path / "src", files)
    children = [spawn(root, src, go=go) for _ in range(3)]
    for child in children:
        child.expect("READY")
    go.touch()
    assert sum(child.finish() for child in children) == 1  # exactly one wrote; the others found a valid entry
    cache = ArtifactCache(root)
    assert cache.get(KEY) == files and cache.entries() == [KEY]
    assert tmp_children(root) == []


@posix_only
def test_second_writer_waits_for_the_lock_then_finds_the_entry(tmp_path, spawn):
    files = payload(9, big=1000)
    root, release = tmp_path / "cache", tmp_path / "release"
    src = write_src(tmp_path / "src", files)
    first = spawn(root, src, block_at=2, release=release)
    first.expect("READY")
    first.expect("BLOCKED")  # holds the key's lock, half-way through the files
    second = spawn(root, src)
    second.expect("READY")
    time.sleep(0.5)  # let the second reach the lock; without it, it would write its own entry and both would clash
    assert second.proc.poll() is None
    release.touch()
    assert first.finish() == 1
    assert second.finish() == 0
    assert ArtifactCache(root).get(KEY) == files


def test_threads_putting_one_key_at_once_all_succeed(tmp_path):
    files = payload(10, big=1 << 20)
    cache = ArtifactCache(tmp_path)
    errors: list[BaseException] = []

    def run():
        try:
            cache.put(KEY, files)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and cache.stats.stores == 1
    assert cache.get(KEY) == files


# ------------------------------------------------------------------------------------------------- cache_key

BASE = dict(mil_text="program(1.3)\n{}", weight_names=["weights/a.bin", "weights/b.bin"], target="m4",
            backend="ane", orion_version="0.1.0", os_build="macOS-15.1 (24B83)")


@pytest.mark.parametrize("field", [k for k in BASE])
def test_cache_key_changes_with_every_part(field):
    changed = dict(BASE)
    changed[field] = ["weights/a.bin", "weights/c.bin"] if field == "weight_names" else BASE[field] + "x"
    assert cache_key(**changed) != cache_key(**BASE)


def test_cache_key_ignores_weight_order_and_is_sha256_hex():
    key = cache_key(**BASE)
    assert key == cache_key(**{**BASE, "weight_names": iter(reversed(BASE["weight_names"]))})
    assert len(key) == 64 and int(key, 16) >= 0 and key == key.lower()


def test_cache_key_boundaries_are_unambiguous():
    a = cache_key(**{**BASE, "mil_text": "ab", "target": "c"})
    b = cache_key(**{**BASE, "mil_text": "a", "target": "bc"})
    c = cache_key(**{**BASE, "weight_names": ["a", "b"]})
    d = cache_key(**{**BASE, "weight_names": ["a\0b"]})
    e = cache_key(**{**BASE, "weight_names": ["ab"]})
    f = cache_key(**{**BASE, "weight_names": []})
    g = cache_key(**{**BASE, "weight_names": [""]})
    assert len({a, b, c, d, e, f, g}) == 7


texts = st.text(alphabet="ab\0/", max_size=4)
parts = st.fixed_dictionaries(dict(mil_text=texts, weight_names=st.lists(texts, max_size=3), target=texts,
                                   backend=texts, orion_version=texts, os_build=texts))


@settings(max_examples=300, deadline=None)
@given(parts, parts)
def test_cache_key_is_equal_exactly_when_parts_are(p, q):
    def norm(d):
        return tuple(sorted(v) if k == "weight_names" else v for k, v in sorted(d.items()))

    assert (cache_key(**p) == cache_key(**q)) == (norm(p) == norm(q))


# ------------------------------------------------------------------------------------------------- LRU


def test_lru_bound_and_eviction_order():
    lru = LRUCache(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)  # evicts b, the least recently used
    assert len(lru) == 2 and lru.get("b") is None
    lru.put("d", 4)  # evicts a
    assert lru.get("a") is None and lru.get("c") == 3 and lru.get("d") == 4
    lru.put("c", 5)  # a replaced value is the most recent too
    lru.put("e", 6)  # so d goes
    assert lru.get("d") is None and lru.get("c") == 5 and lru.get("e") == 6 and len(lru) == 2
    assert (lru.hits, lru.misses) == (5, 3)


def test_lru_refuses_a_bound_below_one():
    with pytest.raises(SettingsError):
        LRUCache(0)


ops = st.lists(
    st.one_of(st.tuples(st.just("get"), st.integers(0, 4)), st.tuples(st.just("put"), st.integers(0, 4))),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), ops)
def test_lru_matches_a_naive_list_model(bound, script):
    lru = LRUCache(bound)
    model: list[tuple[int, object]] = []  # least recently used first
    hits = misses = 0
    for op, key in script:
        index = next((i for i, (k, _) in enumerate(model) if k == key), None)
        if op == "get":
            expected = None
            if index is not None:
                expected = model.pop(index)[1]
                model.append((key, expected))
                hits += 1
            else:
                misses += 1
            assert lru.get(key) is expected
        else:
            value = [key]  # a fresh object: identity tells which put a get sees
            if index is not None:
                model.pop(index)
            model.append((key, value))
            del model[:-bound]
            lru.put(key, value)
        assert len(lru) == len(model)
    assert (lru.hits, lru.misses) == (hits, misses)


def test_lru_threads_keep_the_bound_and_the_counts():
    bound, per_thread = 8, 3000
    lru = LRUCache(bound)
    gets = [0]
    wrong: list[tuple[int, object]] = []
    sizes_ok = [True]
    record = threading.Lock()

    def work(seed):
        rnd = random.Random(seed)
        mine_gets = 0
        for i in range(per_thread):
            key = rnd.randrange(16)
            if rnd.random() < 0.5:
                lru.put(key, (key, seed, i))
                sizes_ok[0] &= len(lru) <= bound
            else:
                value = lru.get(key)
                mine_gets += 1
                if value is not None and value[0] != key:
                    with record:
                        wrong.append((key, value))
        with record:
            gets[0] += mine_gets

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sizes_ok[0] and not wrong
    assert lru.hits + lru.misses == gets[0]
