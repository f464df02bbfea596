"""A stand-in of the macOS frameworks, so the ANE bridge's real ctypes code runs here (see ``standin.c``).

:func:`standin_root` compiles ``standin.c`` once per session with the system C compiler and lays the result out
like macOS: every path of :data:`orion.runtime.backends.ane.LIBRARIES` (and the framework directory the availability
check looks for) under one root. :func:`ane_standin` points the bridge's one seam, ``$ORION_ANE_ROOT``, at that root
for a test, so ``backend="ane"`` runs through the bridge into the stand-in and from there into the emulator
(``emulate.py``); the variables reach child processes (``orion doctor``'s probes) too.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orion.runtime.backends import ane

SOURCE = Path(__file__).with_name("standin.c")
EMULATOR_MODULE = "tests.runtime.standin.emulate"


def build(root: Path) -> Path:
    """Compile the stand-in into ``root`` and link every framework path of the bridge to it; returns ``root``."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the stand-in of the macOS frameworks")
    library = root / "libstandin.so"
    flags = ["-shared", "-fPIC", "-O1", "-fvisibility=hidden", "-o", str(library), str(SOURCE), "-lpthread", "-ldl"]
    result = subprocess.run([compiler, *flags], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the stand-in failed:\n{result.stderr}")
    for path in ane.library_paths(str(root)).values():
        link = Path(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(library)
    return root


class Standin:
    """The stand-in's own counters and switches, for assertions."""

    def __init__(self, root: Path):
        self.root = root
        self.lib = ctypes.CDLL(str(root / "libstandin.so"))
        for name in ("standin_live_objects", "standin_failures", "standin_compiles"):
            getattr(self.lib, name).restype = ctypes.c_long
        self.lib.standin_last_failure.restype = ctypes.c_char_p
        self.lib.standin_fail_next.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self.lib.standin_set_option.argtypes = [ctypes.c_char_p, ctypes.c_long]
        self._failures_before = self.lib.standin_failures()

    def live_objects(self) -> int:
        return self.lib.standin_live_objects()

    def failures(self) -> int:
        """Failures the stand-in reported since this test began."""
        return self.lib.standin_failures() - self._failures_before

    def last_failure(self) -> str:
        return self.lib.standin_last_failure().decode()

    def compiles(self) -> int:
        return self.lib.standin_compiles()

    def fail_next(self, selector: str, description: str) -> None:
        """The next ``selector`` message returns NO with an NSError saying ``description``."""
        self.lib.standin_fail_next(selector.encode(), description.encode())

    def set_option(self, name: str, value: int) -> None:
        self.lib.standin_set_option(name.encode(), value)


@pytest.fixture(scope="session")
def standin_root(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("standin-root"))


@pytest.fixture
def ane_standin(standin_root, tmp_path, monkeypatch) -> Standin:
    """``backend="ane"`` runs through the bridge into the stand-in for this test; model directories go under a
    fresh ``$TMPDIR`` (what ``NSTemporaryDirectory()`` returns), which the test may inspect."""
    temp = tmp_path / "ane-tmp"
    temp.mkdir()
    monkeypatch.setenv("ORION_ANE_ROOT", str(standin_root))
    monkeypatch.setenv("ORION_STANDIN_EMULATOR", EMULATOR_MODULE)
    monkeypatch.setenv("TMPDIR", str(temp))
    standin = Standin(standin_root)
    standin.temp = temp
    yield standin
    standin.fail_next("", "")
    standin.set_option("skip_net_plist", 0)
