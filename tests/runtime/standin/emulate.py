"""The stand-in's chip: the emulator, run on what the stand-in compiled and loaded.

The stand-in (``standin.c``) imports this module (named by ``$ORION_STANDIN_EMULATOR``) the first time it needs it, in
whatever process loaded it (a test, an ``orion doctor`` child); importing registers :func:`_serve` as its callback.
It gets the program as compiled at load (a directory with ``model.mil`` and the weight files rebuilt from ``data``)
and the surfaces' memory in binding order at evaluate, and runs the emulator backend's own model on them, so the
binding order, the surface rules and the numerics are the emulator's, with no second copy here.

The chip is the one a target profile describes (``$ORION_STANDIN_TARGET``, default ``default``): its compiler rejects
what the constraint catalog says that chip rejects, and it computes with that profile's numerics, changed by the JSON
object in ``$ORION_STANDIN_NUMERICS`` (model tests use the fp32 accumulator, as model programs on the emulator do).
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from orion.compiler.constraints import check_program
from orion.compiler.targets import get_target
from orion.errors import ConstraintError, EvaluationError, OrionError
from orion.mil.emit import MILModule
from orion.runtime.backends import ane
from orion.mil.parse import parse_functions
from orion.runtime.backends.emulator import EmulatorBackend, EmulatorModel, load_program
from orion.runtime.backends.numerics import Numerics
from orion.runtime.tensor import Surface

COMPILE, LOAD, EVALUATE, UNLOAD = range(4)
_SIZES = ctypes.POINTER(ctypes.c_size_t)
_BASES = ctypes.POINTER(ctypes.c_void_p)
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_long,
                            _BASES, _SIZES, ctypes.c_long, _BASES, _SIZES, ctypes.c_void_p, ctypes.c_size_t)


class _Memory(Surface):
    """Surface memory the stand-in hands over, as the ANE sees it (no copy; the base class allocates none here)."""

    def __init__(self, address: int, nbytes: int):  # noqa: super().__init__ would allocate memory of its own
        self.nbytes = nbytes
        self._memory = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=np.uint8)
        self._lock = threading.RLock()


_chips: dict[tuple[str, str], EmulatorBackend] = {}
#: model -> its procedures loaded so far (procedureIndex -> the emulator's model of that function of the text)
_loaded: dict[int, dict[int, EmulatorModel]] = {}
_weight_files: dict[int, list[str]] = {}


def _chip() -> EmulatorBackend:
    """The emulator backend of the profile and numerics the environment asks for now."""
    profile = os.environ.get("ORION_STANDIN_TARGET") or "default"
    numerics = os.environ.get("ORION_STANDIN_NUMERICS") or "{}"
    if (profile, numerics) not in _chips:
        root = Path(tempfile.mkdtemp(prefix="orion-standin-chip-"))
        chip = EmulatorBackend(get_target(profile), root=root)
        chip.numerics = Numerics.from_dict({**chip.numerics.to_dict(), **json.loads(numerics)})
        _chips[profile, numerics] = chip
    return _chips[profile, numerics]


def _status_text(exc: OrionError) -> str:
    """An emulator refusal as the ANE words it (``... status=0x1d : statusType=0x9 ...``)."""
    status = getattr(exc, "status", None)
    if isinstance(exc, EvaluationError) and status is not None:
        return f"ANEProgramProcessRequestDirect() Failed with status={status:#x} : statusType=0x9: {exc}"
    return str(exc)


def _procedure(model: int, procedure: int) -> EmulatorModel:
    """The loaded model's function at ``procedure`` (text order): the chip picks it by the request's index."""
    loaded = _loaded[model]
    if procedure not in loaded:
        first = loaded[0]
        functions = list(parse_functions(first.mil_text))
        if procedure >= len(functions):
            raise EvaluationError(f"procedureIndex {procedure}: the program has {len(functions)} function(s)")
        weights = {rel: first.directory / "compiled" / rel for rel in _weight_files[model]}  # the loaded snapshot
        loaded[procedure] = _load(first.mil_text, weights, functions[procedure])
    return loaded[procedure]


def _load(text: str, weights: dict, function: str | None) -> EmulatorModel:
    emulated = _chip().new_model(text, weights, function=function)
    emulated.compile()
    emulated.load()
    return emulated


def _run(stage: int, model: int, procedure: int, directory: bytes | None, n_in: int, in_base, in_size, n_out: int,
         out_base, out_size) -> None:
    if stage == COMPILE:
        program = load_program(directory.decode())  # parses and checks every statement, reads every weight record
        rejected = [v for v in check_program(program.program, _chip().target) if v.severity == "error"]
        if rejected:
            raise ConstraintError(rejected)
    elif stage == LOAD:
        module = MILModule.read(directory.decode())
        _loaded[model] = {0: _load(module.text, {rel: Path(directory.decode()) / rel for rel in module.weight_files},
                                   None)}
        _weight_files[model] = list(module.weight_files)
    elif stage == EVALUATE:
        inputs = [_Memory(in_base[i], in_size[i]) for i in range(n_in)]
        outputs = [_Memory(out_base[i], out_size[i]) for i in range(n_out)]
        _procedure(model, procedure).evaluate(inputs, outputs)
    elif stage == UNLOAD:
        _weight_files.pop(model)
        for emulated in _loaded.pop(model).values():
            emulated.release()


@CALLBACK
def _serve(stage, model, procedure, directory, n_in, in_base, in_size, n_out, out_base, out_size, message,
           message_size) -> int:
    """The stand-in's callback: 0 when done, else 1 with the reason written into ``message``."""
    try:
        _run(stage, model, procedure, directory, n_in, in_base, in_size, n_out, out_base, out_size)
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the stand-in as the framework's error text
        text = (_status_text(exc) if isinstance(exc, OrionError) else f"{type(exc).__name__}: {exc}").encode()
        ctypes.memmove(message, text[: message_size - 1] + b"\0", min(len(text), message_size - 1) + 1)
        return 1


def register() -> None:
    library = ctypes.CDLL(ane.library_paths()["ane"])  # the library the bridge loaded (same path, same handle)
    library.standin_set_callback.argtypes = [CALLBACK]
    library.standin_set_callback(_serve)


register()
