"""The interface every backend implements: the life of one model as the private ANE API knows it.

The sequence mirrors reference section 2: a model is created from MIL text and weight files, gets an identifier
(equal text and equal weight-file names give an equal identifier, hence the same work directory), has its files
written into that directory, is compiled, loaded, evaluated on lists of surfaces bound in alphabetical order of the
MIL names, unloaded, and finally released, which deletes the directory unless ownership passed to another model.

Everything above this interface (binding plans, caching, budgets, weight updates) is plain Python shared by all
backends; a backend only makes the calls.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

from orion.compiler.targets import Target
from orion.runtime.tensor import Surface

#: Files a compile adds to the model directory; copying them into a new directory lets a load skip the compile.
COMPILED_ARTIFACTS = ("net.plist", "data")


def model_identifier(mil_text: str, weight_paths: Sequence[str]) -> str:
    """What ``hexStringIdentifier`` promises: a function of the MIL text and the weight-dictionary keys only."""
    h = hashlib.sha256(mil_text.encode("utf-8"))
    for path in sorted(weight_paths):
        h.update(b"\0" + path.encode("utf-8"))
    return h.hexdigest()


class BackendModel(ABC):
    """One compiled-or-not program on a backend. Not thread-safe by itself: :class:`orion.runtime.Program` locks."""

    identifier: str
    #: ``<temp>/<identifier>/``: model.mil, the weight files at their paths, and after compiling the artifacts.
    directory: Path

    @abstractmethod
    def compile(self) -> None:
        """Compile the files in :attr:`directory` (counts against the process's compile budget)."""

    @abstractmethod
    def load(self) -> None:
        """Load the compiled program (its artifacts must be in :attr:`directory`)."""

    @abstractmethod
    def evaluate(self, inputs: Sequence[Surface], outputs: Sequence[Surface]) -> None:
        """Run once. ``inputs``/``outputs`` are in alphabetical order of their MIL names."""

    @abstractmethod
    def unload(self) -> None:
        """Unload; the directory and its files stay."""

    @abstractmethod
    def release(self, remove_directory: bool = True) -> None:
        """Drop the model object; delete the directory unless another model took it over."""

    # -- delta compilation: what lets a load skip the compile --------------------------------------------------------

    @abstractmethod
    def artifacts(self) -> dict[str, bytes]:
        """The weight-independent files a compile produced (``net.plist``), for the cache and for patching."""

    @abstractmethod
    def install_artifacts(self, artifacts: dict[str, bytes]) -> None:
        """Put another compile's artifacts into :attr:`directory` so :meth:`load` needs no compile."""

    @abstractmethod
    def write_weights(self, weight_files: dict[str, Path]) -> None:
        """Overwrite weight files in :attr:`directory` and the compiled copy of them (the ``data`` file on the
        ANE: Orion reports it is a byte copy of the weight file), so the next :meth:`load` uses the new values."""


class Backend(ABC):
    """A place to run programs: the ANE through the private framework, or the emulator."""

    name: str

    def __init__(self, target: Target):
        self.target = target

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether this backend can run on this machine."""

    @abstractmethod
    def new_model(self, mil_text: str, weight_files: dict[str, Path], function: str | None = None) -> BackendModel:
        """Create a model and write its files (``weight_files`` maps ``weights/x.bin`` paths to source files).
        ``function``: which function of a text with several the model evaluates (None: the only one, or main)."""

    @abstractmethod
    def new_surface(self, nbytes: int) -> Surface:
        """A surface of ``nbytes`` for this backend (an IOSurface on the ANE)."""

    def loads_disk_cache(self) -> bool:
        """Whether a compile another process cached on disk may be loaded instead of compiling."""
        return True

    def describe(self) -> dict[str, str]:
        """Machine facts recorded with every result (chip, OS build): macOS updates have broken private-API paths."""
        import platform

        return {"backend": self.name, "platform": platform.platform(), "machine": platform.machine()}


#: Evaluation status codes the ANE returns, with what they mean for a user.
STATUS_HINTS = {
    0x1D: "inputs (or outputs) must all have the same surface size, at least the minimum surface size "
          "(catalog ANE-02, ANE-04, ANE-18)",
}


def evaluation_failure_message(status: int | None, detail: str = "") -> str:
    """One wording for a refused evaluation, shared by the ANE bridge and the emulator so errors read the same."""
    hint = STATUS_HINTS.get(status or -1, "")
    parts = ["the ANE refused the evaluation"] + ([detail] if detail else []) + ([hint] if hint else [])
    return ": ".join(parts)


class DirectoryClaims:
    """Models with equal identifiers share one directory; it is deleted only when its last user releases it."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._users: dict[Path, int] = {}

    def claim(self, directory: Path) -> None:
        with self._lock:
            self._users[directory] = self._users.get(directory, 0) + 1

    def release(self, directory: Path) -> bool:
        """Drop one claim; True when nobody else uses the directory any more."""
        with self._lock:
            count = self._users.get(directory, 0) - 1
            if count > 0:
                self._users[directory] = count
                return False
            self._users.pop(directory, None)
            return True


DIRECTORY_CLAIMS = DirectoryClaims()
