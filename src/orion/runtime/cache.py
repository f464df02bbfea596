"""Program caches: compiled artifacts in an on-disk store shared by processes, behind an in-memory LRU for this one.

A compile costs 10-80 ms and a process gets only ~119 of them (reference section 2), so the compiled artifacts of a
program (``net.plist``, ``data``: :data:`orion.runtime.backends.base.COMPILED_ARTIFACTS`) are kept on disk under a
key naming everything that can change them (:func:`cache_key`); copying them into a new model's directory lets a
load skip the compile, in this process or any later one.

On-disk layout of :class:`ArtifactCache` (``root`` is :func:`default_cache_dir` unless told otherwise)::

    root/<key[:2]>/<key>/manifest.json   format, key, created, orion_version, files: [{name, size, sha256}]
    root/<key[:2]>/<key>/<files...>      the entry's files at their relative names
    root/locks/<key>.lock                per-key cross-process lock (filelock); never deleted by hand
    root/tmp/                            entries being written, and entries being deleted

Crash safety rests on two facts: an entry only appears at its final path through one atomic ``rename`` of a complete
directory (manifest written last), and every ``get`` re-checks every file's size and sha256 against the manifest, so
a torn or tampered entry is a miss (and is removed), never partial data.

Error policy: ``get`` never fails the user's job because of the cache: an unreadable cache directory gives a miss
and a :class:`RuntimeWarning`. ``put`` and the management calls (``clear``, ``entries``, ``size_bytes``,
``prune_stale``) raise :class:`orion.errors.CacheError` naming the path and the fix, since silently not caching
would cost compiles without telling anyone; callers that prefer to run uncached catch it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Generic, TypeVar

from filelock import FileLock, Timeout

from orion import __version__
from orion.errors import CacheError, SettingsError
from orion.fileio import fsync_dir, write_new_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
#: errno values meaning "this entry is not what its manifest says" (as opposed to "cannot read the cache").
_TORN_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EMLINK}
_FIX = "make the directory writable and free disk space, or set ORION_CACHE_DIR to another directory"


# --------------------------------------------------------------------------------------------------------- keys


def _frame(h: hashlib._Hash, text: str) -> None:
    """Length-prefix each part so no two different part lists hash the same byte stream."""
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def cache_key(
    *, mil_text: str, weight_names: Iterable[str], target: str, backend: str, orion_version: str, os_build: str
) -> str:
    """sha256 hex of everything a compiled program depends on; weight-name order does not matter (the ANE's own
    identifier sorts them too)."""
    if isinstance(weight_names, str):
        raise TypeError("weight_names must be an iterable of names, not one string")
    names = sorted(weight_names)
    h = hashlib.sha256(b"orion-cache-key/1")
    for part in (mil_text, target, backend, orion_version, os_build):
        _frame(h, part)
    h.update(len(names).to_bytes(8, "big"))
    for name in names:
        _frame(h, name)
    return h.hexdigest()


@functools.cache
def os_build() -> str:
    """The OS build: macOS updates have broken compiled programs and private-API paths, so it is part of the key."""
    build = platform.platform()
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sw_vers", "-buildVersion"], capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            build = f"{build} ({out})"
    return build


def default_cache_dir() -> Path:
    """``$ORION_CACHE_DIR``, else ``$XDG_CACHE_HOME/orion`` (absolute values only, per the XDG spec), else
    ``~/.cache/orion``."""
    explicit = os.environ.get("ORION_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "orion"
    return Path.home() / ".cache" / "orion"


# ------------------------------------------------------------------------------------------------ path checks


def _check_key(key: str) -> str:
    """Keys become path components, so only what :func:`cache_key` produces is accepted."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise CacheError(f"bad cache key {key!r}: expected 64 lowercase hex digits; fix: build keys with cache_key()")
    return key


def _name_problem(name: object) -> str | None:
    """Why ``name`` is not a safe relative file name inside an entry (None when it is)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\0" in name or "\\" in name or ":" in name:
        return "contains NUL, a backslash or a colon"
    if name.startswith("/"):
        return "is absolute"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' component"
    if name == MANIFEST:
        return f"is the reserved {MANIFEST}"
    return None


def _names_problem(names: list[str]) -> str | None:
    """Problems of a whole name list: unsafe names, duplicates, or a name used both as a file and a directory."""
    for name in names:
        problem = _name_problem(name)
        if problem:
            return f"file name {name!r} {problem}"
    if len(set(names)) != len(names):
        return "duplicate file names"
    taken = set(names)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in taken:
                return f"file name {'/'.join(parts[:i])!r} is also a directory of {name!r}"
    return None


# ------------------------------------------------------------------------------------------------- file helpers


class _Torn(Exception):
    """An entry that exists but does not match its manifest."""


def _open_regular(path: str | Path) -> int:
    """A descriptor for a regular file, never through a symlink; anything else is a torn entry."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        if err.errno in _TORN_ERRNOS:
            raise _Torn(f"{path}: {err.strerror}") from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Torn(f"{path}: not a regular file")
    return fd


def _read_exact(path: str, size: int) -> bytes:
    """Read a regular file (no symlink) of exactly ``size`` bytes; anything else is a torn entry."""
    fd = _open_regular(path)
    try:
        chunks, left = [], size + 1  # one byte more than promised reveals a file that grew
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != size:
        raise _Torn(f"{path}: {'more than ' if len(data) > size else ''}{len(data)} bytes, manifest says {size}")
    return data


def _read_exact_any(path: Path) -> bytes:
    """Read a manifest (any size, no symlink); a missing one is a torn entry."""
    with os.fdopen(_open_regular(path), "rb") as f:
        return f.read()


def _remove_tree(path: Path) -> None:
    """Delete a file, symlink or directory tree without following links out of it."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------- artifact cache


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Counts since this :class:`ArtifactCache` was created (per instance, not per directory)."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    corrupted: int = 0


class ArtifactCache:
    """Content-addressed on-disk store of small file sets, safe against concurrent processes and killed writers.

    Entries are immutable once stored: ``put`` of a key with a valid entry does nothing (the key names the content).
    """

    def __init__(self, root: Path | str, *, lock_timeout_s: float = 60.0):
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self._stats = CacheStats()
        self._stats_lock = threading.Lock()

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            return self._stats

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            self._stats = dataclasses.replace(
                self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()}
            )

    def _entry_dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold the per-key lock; the OS drops it if this process dies, so a killed writer never blocks others."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        path = lock_dir / f"{key}.lock"
        lock = FileLock(str(path), timeout=self.lock_timeout_s)
        try:
            lock.acquire()
        except Timeout as err:
            raise CacheError(
                f"timed out after {self.lock_timeout_s} s waiting for cache lock {path}; fix: wait for the other "
                f"Orion process writing this entry, or if none runs, delete {path}"
            ) from err
        try:
            yield
        finally:
            lock.release()

    def _read_entry(self, key: str, entry: Path) -> dict[str, bytes] | None:
        """The verified files of an entry, None if there is none; raises :class:`_Torn` or a non-torn OSError."""
        try:
            st = os.lstat(entry)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        if not stat.S_ISDIR(st.st_mode):
            raise _Torn(f"{entry}: not a directory")
        try:
            manifest = json.loads(_read_exact_any(entry / MANIFEST))
        except (ValueError, UnicodeDecodeError) as err:
            raise _Torn(f"{entry / MANIFEST}: unreadable JSON ({err})") from err
        files = _parse_manifest(manifest, key)
        real_entry = os.path.realpath(entry)
        out: dict[str, bytes] = {}
        for name, size, digest in files:
            path = os.path.join(real_entry, *name.split("/"))
            if os.path.realpath(path) != path:  # a symlinked directory on the way would lead out of the entry
                raise _Torn(f"{path}: leads outside its entry")
            data = _read_exact(path, size)
            if hashlib.sha256(data).hexdigest() != digest:
                raise _Torn(f"{path}: sha256 differs from the manifest")
            out[name] = data
        return out

    def _discard(self, entry: Path) -> None:
        """Remove an entry atomically (rename away, then delete), so readers see it whole or not at all."""
        trash = self.root / "tmp"
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{entry.name}.{os.getpid()}.{secrets.token_hex(4)}.trash"
        try:
            os.rename(entry, target)
        except FileNotFoundError:
            return
        _remove_tree(target)

    def get(self, key: str) -> dict[str, bytes] | None:
        """The files of a complete, verified entry, or None: a miss (torn entries are removed and counted), also
        when the cache cannot be read, with a RuntimeWarning, so a broken cache never stops the user's job."""
        _check_key(key)
        entry = self._entry_dir(key)
        try:
            try:
                files = self._read_entry(key, entry)  # entries are immutable once in place: no lock needed
            except _Torn:
                with self._locked(key):  # another process may be replacing it: decide under the lock
                    try:
                        files = self._read_entry(key, entry)
                    except _Torn:
                        self._discard(entry)
                        self._count(corrupted=1)
                        files = None
        except (OSError, CacheError) as err:
            warnings.warn(f"program cache {self.root} unreadable, running uncached: {err}", RuntimeWarning, 2)
            files = None
        self._count(**({"hits": 1} if files is not None else {"misses": 1}))
        return files

    def put(self, key: str, files: Mapping[str, bytes], replace: bool = False) -> None:
        """Store ``files`` under ``key`` atomically; does nothing if a valid entry exists, unless ``replace`` (the
        entry's files compiled but did not load)."""
        _check_key(key)
        names = list(files)
        problem = _names_problem(names)
        if problem:
            raise CacheError(f"cannot cache entry {key}: {problem}; fix: use plain names or safe relative paths")
        payload = [(name, bytes(files[name])) for name in names]
        entry = self._entry_dir(key)
        try:
            try:
                self.prune_stale()
            except CacheError:
                pass  # best effort; the write below reports a real problem with the directory
            with self._locked(key):
                try:
                    if self._read_entry(key, entry) is not None:
                        if not replace:
                            return
                        self._discard(entry)
                except _Torn:
                    self._discard(entry)
                    self._count(corrupted=1)
                self._write_entry(key, entry, payload)
        except OSError as err:
            where = err.filename or entry
            raise CacheError(f"cannot write program cache entry {where}: {err.strerror or err}; fix: {_FIX}") from err
        self._count(stores=1)

    def _write_entry(self, key: str, entry: Path, payload: list[tuple[str, bytes]]) -> None:
        """Files, then manifest, each fsynced, in a temp dir that is renamed into place in one step."""
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        try:
            listed = []
            for name, data in payload:
                path = tmp.joinpath(*name.split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                write_new_file(path, data)
                listed.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            manifest = {
                "format": MANIFEST_FORMAT,
                "key": key,
                "created": time.time(),
                "orion_version": __version__,
                "files": listed,
            }
            write_new_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
            for dirpath, _dirs, _files in os.walk(tmp, topdown=False):  # tmp itself comes last
                fsync_dir(Path(dirpath))
            shard_existed = entry.parent.is_dir()
            entry.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, entry)
        except BaseException:
            with suppress(OSError):  # prune_stale gets it later
                _remove_tree(tmp)
            raise
        fsync_dir(entry.parent)
        if not shard_existed:
            fsync_dir(self.root)

    def prune_stale(self, older_than_s: float = 3600) -> int:
        """Delete temp dirs of writers that died (older than ``older_than_s``); returns how many were removed."""
        tmp_root = self.root / "tmp"
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            children = list(tmp_root.iterdir())
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise CacheError(f"cannot list {tmp_root}: {err.strerror}; fix: {_FIX}") from err
        for child in children:
            try:
                if child.lstat().st_mtime <= cutoff:
                    _remove_tree(child)
                    removed += 1
            except FileNotFoundError:
                continue  # another process pruned or renamed it first
            except OSError as err:
                raise CacheError(f"cannot remove stale cache temp {child}: {err.strerror}; fix: {_FIX}") from err
        return removed

    def entries(self) -> list[str]:
        """Keys of the entries in place (not verified: ``get`` does that), sorted."""
        keys = []
        try:
            shards = [p for p in self.root.iterdir() if re.fullmatch(r"[0-9a-f]{2}", p.name)]
            for shard in shards:
                keys.extend(p.name for p in shard.iterdir() if _KEY_RE.fullmatch(p.name) and p.name[:2] == shard.name)
        except FileNotFoundError:
            return sorted(keys)
        except OSError as err:
            raise CacheError(f"cannot list program cache {self.root}: {err.strerror}; fix: {_FIX}") from err
        return sorted(keys)

    def clear(self) -> None:
        """Remove every entry, each under its lock (writers in progress and lock files are left alone)."""
        try:
            for key in self.entries():
                with self._locked(key):
                    self._discard(self._entry_dir(key))
        except OSError as err:
            where = err.filename or self.root
            raise CacheError(f"cannot clear program cache {where}: {err.strerror}; fix: {_FIX}") from err

    def size_bytes(self) -> int:
        """Bytes of all files under the root: what deleting the cache directory would free."""
        total = 0
        for dirpath, _dirs, filenames in os.walk(self.root):
            for name in filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        return total


def _parse_manifest(manifest: object, key: str) -> list[tuple[str, int, str]]:
    """Check a manifest written by anyone (names included: a file must never be read from outside its entry)."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or manifest.get("key") != key:
        raise _Torn(f"manifest of {key}: wrong format, version or key")
    listed = manifest.get("files")
    if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
        raise _Torn(f"manifest of {key}: 'files' is not a list of objects")
    out = []
    for f in listed:
        name, size, digest = f.get("name"), f.get("size"), f.get("sha256")
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA_RE.fullmatch(digest):
            raise _Torn(f"manifest of {key}: bad size or sha256 for {name!r}")
        out.append((name, size, digest))
    problem = _names_problem([name for name, _, _ in out])
    if problem:
        raise _Torn(f"manifest of {key}: {problem}")
    return out


# -------------------------------------------------------------------------------------------------- LRU cache

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Thread-safe map bounded by entry count that drops the least recently used entry first."""

    def __init__(self, max_entries: int):
        if type(max_entries) is not int or max_entries < 1:
            raise SettingsError(f"LRU cache size {max_entries!r} is not a positive integer; fix: pass max_entries >= 1")
        self.max_entries = max_entries
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value (now most recently used), or ``default``."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self._hits += 1
                return self._data[key]
            self._misses += 1
            return default

    def put(self, key: K, value: V) -> None:
        """Insert or replace ``key`` as most recently used, evicting beyond ``max_entries``."""
        with self._lock:
            self._data.pop(key, None)
            self._data[key] = value
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


class ProgramCache:
    """Compiled artifacts by cache key: a bounded in-memory LRU in front of an optional on-disk
    :class:`ArtifactCache`, so a second program in this process skips the disk and a second process skips the
    compile. ``ProgramCache(None)`` keeps memory only."""

    def __init__(self, root: Path | str | None, memory_entries: int = 64):
        self.disk = ArtifactCache(root) if root is not None else None
        self.memory: LRUCache[str, dict[str, bytes]] = LRUCache(memory_entries)
        self._lock = threading.Lock()
        self.hits = self.misses = self.stores = 0

    def get(self, key: str, disk: bool = True) -> dict[str, bytes] | None:
        """From memory, else (``disk``) from the disk store, where other processes' compiles are."""
        found = self.memory.get(key)
        if found is None and disk and self.disk is not None:
            found = self.disk.get(key)
            if found is not None:
                self.memory.put(key, found)
        with self._lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        return found

    def put(self, key: str, files: Mapping[str, bytes], replace: bool = False) -> None:
        files = dict(files)
        self.memory.put(key, files)
        if self.disk is not None:
            self.disk.put(key, files, replace=replace)
        with self._lock:
            self.stores += 1

    def stats(self) -> dict[str, int]:
        out = {"hits": self.hits, "misses": self.misses, "stores": self.stores}
        if self.disk is not None:
            out["corrupted"] = self.disk.stats.corrupted
        return out


_DEFAULT: ProgramCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_program_cache() -> ProgramCache:
    """The process-wide cache under :func:`default_cache_dir` (``ORION_CACHE=off`` keeps it in memory only)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            off = os.environ.get("ORION_CACHE", "").lower() in ("0", "off", "no", "false")
            _DEFAULT = ProgramCache(None if off else default_cache_dir())
        return _DEFAULT
