"""The ANE backend: the private ``AppleNeuralEngine.framework`` driven through ctypes (reference sections 2 and 5).

Why ctypes and not PyObjC: the bridge needs about twenty messages and a handful of IOSurface/CoreFoundation
functions; declaring each with its exact C prototype is short, adds no dependency, and keeps every pointer in our
hands (PyObjC will not pass a raw ``IOSurfaceRef`` to ``objectWithIOSurface:`` without a detour through ctypes).

Layout of this module, so that everything decidable without a Mac is tested on any OS:

- pure helpers (no ctypes library is loaded): the message prototype table (arm64 forbids variadic calls to
  ``objc_msgSend``, so every selector is cast to its own prototype), the C function table, the IOSurface property
  values, the weight dictionary and the model-directory file plan, NSError and status-code formatting;
- :class:`_Runtime`: the only code that loads libraries (libobjc, Foundation, CoreFoundation, IOSurface, the ANE
  framework) and calls into them; it is created with the first :class:`AneBackend`, never at import;
- :class:`AneBackend`, :class:`AneModel`, :class:`IOSurfaceBuffer`: the call sequence of reference section 2.

Threads: the runtime is process-wide and its caches are safe to fill from several threads; autorelease pools are
per thread and every call sequence opens and drains its own. Different models may compile and evaluate
concurrently on different threads (reference section 2); the calls on ONE model must be serialized by the caller
(:class:`orion.runtime.Program` holds a lock per program). ctypes releases the GIL during each framework call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import posixpath
import re
import shutil
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

import numpy as np

from orion.compiler.targets import Target
from orion.errors import BackendError, BindingError, EvaluationError, UnsafePathError, WeightFileError
from orion.mil.parse import parse_functions, resolve_blob_path, select_function
from orion.mil.program import MODEL_PATH
from orion.runtime.backends.base import (
    COMPILED_ARTIFACTS,
    DIRECTORY_CLAIMS,
    Backend,
    BackendModel,
    evaluation_failure_message,
)
from orion.runtime.tensor import Surface

ANE_FRAMEWORK = "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework"
#: Library paths for dlopen. Since macOS 11 system binaries live in the dyld shared cache: dlopen finds them at these
#: paths although no file exists there, so presence is checked on the framework DIRECTORY.
#: They are looked up under ``$ORION_ANE_ROOT`` (default ``/``): the one seam by which the tests substitute a stand-in
#: of these frameworks (``tests/runtime/standin``) for the real ones; nothing else differs.
LIBRARIES = {
    "objc": "/usr/lib/libobjc.A.dylib",
    "system": "/usr/lib/libSystem.B.dylib",
    "foundation": "/System/Library/Frameworks/Foundation.framework/Foundation",
    "cf": "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation",
    "iosurface": "/System/Library/Frameworks/IOSurface.framework/IOSurface",
    "ane": f"{ANE_FRAMEWORK}/AppleNeuralEngine",
}

QOS = 21  # every QoS 0-63 works with no measured difference; 21 is what the public projects pass
LOCK_READ_ONLY = 1  # kIOSurfaceLockReadOnly
CF_NUMBER_SINT64 = 4  # kCFNumberSInt64Type
#: Requests kept per model (one per distinct surface list: double buffering needs two, a few spare).
MAX_CACHED_REQUESTS = 8
MODEL_FILE = "model.mil"
NET_PLIST, COMPILED_DATA = COMPILED_ARTIFACTS

DESCRIPTOR_CLASS = "_ANEInMemoryModelDescriptor"
MODEL_CLASS = "_ANEInMemoryModel"
REQUEST_CLASS = "_ANERequest"
SURFACE_OBJECT_CLASS = "_ANEIOSurfaceObject"

# ---------------------------------------------------------------------------------------------------------------------
# C types and prototypes

_ID = _CLASS = _SEL = _IOSURFACE_REF = ctypes.c_void_p
_BOOL = ctypes.c_bool  # Objective-C BOOL is C bool on arm64
_ERROR_OUT = ctypes.POINTER(ctypes.c_void_p)  # NSError **
_ID_ARRAY = ctypes.POINTER(ctypes.c_void_p)  # const id *
_NSUINTEGER = ctypes.c_ulong
_NSINTEGER = ctypes.c_long

Signature = tuple[Any, tuple[Any, ...]]

#: selector -> (restype, argtypes including the receiver and the SEL), as working Objective-C code casts objc_msgSend.
MSG_SIGNATURES: dict[str, Signature] = {
    # AppleNeuralEngine (reference section 2)
    "modelWithMILText:weights:optionsPlist:": (_ID, (_CLASS, _SEL, _ID, _ID, _ID)),
    "inMemoryModelWithDescriptor:": (_ID, (_CLASS, _SEL, _ID)),
    "hexStringIdentifier": (_ID, (_ID, _SEL)),
    "compileWithQoS:options:error:": (_BOOL, (_ID, _SEL, ctypes.c_uint, _ID, _ERROR_OUT)),
    "loadWithQoS:options:error:": (_BOOL, (_ID, _SEL, ctypes.c_uint, _ID, _ERROR_OUT)),
    "evaluateWithQoS:options:request:error:": (_BOOL, (_ID, _SEL, ctypes.c_uint, _ID, _ID, _ERROR_OUT)),
    "unloadWithQoS:error:": (_BOOL, (_ID, _SEL, ctypes.c_uint, _ERROR_OUT)),
    "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:": (
        _ID, (_CLASS, _SEL, _ID, _ID, _ID, _ID, _ID, _ID, _ID)
    ),
    "objectWithIOSurface:": (_ID, (_CLASS, _SEL, _IOSURFACE_REF)),
    # Foundation
    "stringWithUTF8String:": (_ID, (_CLASS, _SEL, ctypes.c_char_p)),
    "UTF8String": (ctypes.c_char_p, (_ID, _SEL)),
    "dataWithBytes:length:": (_ID, (_CLASS, _SEL, ctypes.c_void_p, _NSUINTEGER)),
    "dictionaryWithObjects:forKeys:count:": (_ID, (_CLASS, _SEL, _ID_ARRAY, _ID_ARRAY, _NSUINTEGER)),
    "arrayWithObjects:count:": (_ID, (_CLASS, _SEL, _ID_ARRAY, _NSUINTEGER)),
    "numberWithInt:": (_ID, (_CLASS, _SEL, ctypes.c_int)),
    "retain": (_ID, (_ID, _SEL)),
    "release": (None, (_ID, _SEL)),
    "description": (_ID, (_ID, _SEL)),
    "userInfo": (_ID, (_ID, _SEL)),
    "domain": (_ID, (_ID, _SEL)),
    "code": (_NSINTEGER, (_ID, _SEL)),
}

#: The private methods the bridge sends, by class ("+" class method, "-" instance method): checked at start-up so a
#: macOS update that renames one fails with a message instead of an unrecognized-selector abort.
ANE_METHODS: dict[str, tuple[str, ...]] = {
    DESCRIPTOR_CLASS: ("+modelWithMILText:weights:optionsPlist:",),
    MODEL_CLASS: (
        "+inMemoryModelWithDescriptor:",
        "-hexStringIdentifier",
        "-compileWithQoS:options:error:",
        "-loadWithQoS:options:error:",
        "-evaluateWithQoS:options:request:error:",
        "-unloadWithQoS:error:",
    ),
    REQUEST_CLASS: ("+requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",),
    SURFACE_OBJECT_CLASS: ("+objectWithIOSurface:",),
}
FOUNDATION_CLASSES = ("NSString", "NSData", "NSDictionary", "NSArray", "NSNumber")

#: C functions: name -> (library key, restype, argtypes).
C_FUNCTIONS: dict[str, tuple[str, Any, tuple[Any, ...]]] = {
    "objc_getClass": ("objc", ctypes.c_void_p, (ctypes.c_char_p,)),
    "sel_registerName": ("objc", ctypes.c_void_p, (ctypes.c_char_p,)),
    "class_getClassMethod": ("objc", ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_void_p)),
    "class_getInstanceMethod": ("objc", ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_void_p)),
    "objc_autoreleasePoolPush": ("objc", ctypes.c_void_p, ()),
    "objc_autoreleasePoolPop": ("objc", None, (ctypes.c_void_p,)),
    "NSTemporaryDirectory": ("foundation", ctypes.c_void_p, ()),
    "CFNumberCreate": ("cf", ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p)),
    "CFDictionaryCreate": (
        "cf",
        ctypes.c_void_p,
        (ctypes.c_void_p, _ID_ARRAY, _ID_ARRAY, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p),
    ),
    "CFRelease": ("cf", None, (ctypes.c_void_p,)),
    "IOSurfaceCreate": ("iosurface", ctypes.c_void_p, (ctypes.c_void_p,)),
    "IOSurfaceLock": ("iosurface", ctypes.c_int, (ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))),
    "IOSurfaceUnlock": (
        "iosurface", ctypes.c_int, (ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
    ),
    "IOSurfaceGetBaseAddress": ("iosurface", ctypes.c_void_p, (ctypes.c_void_p,)),
    "IOSurfaceGetAllocSize": ("iosurface", ctypes.c_size_t, (ctypes.c_void_p,)),
    "sysctlbyname": (
        "system",
        ctypes.c_int,
        (ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t),
    ),
}


def library_root() -> str:
    """The directory the framework paths are resolved under: ``$ORION_ANE_ROOT``, else ``/``."""
    return os.environ.get("ORION_ANE_ROOT") or "/"


def library_paths(root: str | None = None) -> dict[str, str]:
    """:data:`LIBRARIES` resolved under ``root`` (default :func:`library_root`)."""
    root = root or library_root()
    return {key: os.path.join(root, path.lstrip("/")) for key, path in LIBRARIES.items()}


@functools.lru_cache(maxsize=None)
def prototype(selector: str) -> Any:
    """The ``CFUNCTYPE`` to cast ``objc_msgSend`` to for ``selector`` (KeyError for a selector not in the table)."""
    restype, argtypes = MSG_SIGNATURES[selector]
    return ctypes.CFUNCTYPE(restype, *argtypes)


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers


def unavailable_reason(system: str, machine: str, framework_present: bool) -> str | None:
    """Why the ANE backend cannot run on a machine, or None when it can."""
    if system != "darwin":
        return f"this is {system}/{machine}"
    if machine != "arm64":
        return f"this Mac's Python runs on {machine}, not arm64"
    if not framework_present:
        return f"{ANE_FRAMEWORK} is missing"
    return None


def unavailable_message(reason: str) -> str:
    return f"the ANE backend needs macOS on Apple silicon; use backend='emulator' ({reason})"


def surface_properties(nbytes: int) -> dict[str, int]:
    """IOSurfaceCreate properties of a flat tensor surface (reference section 5), keyed by the constants' symbols."""
    return {
        "kIOSurfaceWidth": nbytes,
        "kIOSurfaceHeight": 1,
        "kIOSurfaceBytesPerElement": 1,
        "kIOSurfaceBytesPerRow": nbytes,
        "kIOSurfaceAllocSize": nbytes,
        "kIOSurfacePixelFormat": 0,
    }


def lock_options(read_only: bool) -> int:
    return LOCK_READ_ONLY if read_only else 0


def weight_relative_path(key: str) -> str:
    """The model-directory path of a weight file given as ``weights/x.bin`` or ``@model_path/weights/x.bin``."""
    rest = key[len(MODEL_PATH):] if key.startswith(MODEL_PATH) else key
    resolve_blob_path(Path("."), MODEL_PATH + rest)  # refuses absolute paths, '..', backslashes
    normal = posixpath.normpath(rest)
    if normal != rest:
        raise UnsafePathError(f"weight path {key!r} is not in normal form; write it as {normal!r}")
    if normal in (MODEL_FILE, *COMPILED_ARTIFACTS):
        raise UnsafePathError(
            f"weight path {key!r} collides with the model directory's {normal!r}; put weights under weights/"
        )
    return normal


def _weight_sources(weight_files: dict[str, Path]) -> dict[str, Path]:
    """Relative path -> source file, in sorted order, each path checked once."""
    plan: dict[str, Path] = {}
    given_as: dict[str, str] = {}
    for key in sorted(weight_files):
        rel = weight_relative_path(key)
        if rel in plan:
            raise UnsafePathError(f"weight file {rel!r} is given twice, as {given_as[rel]!r} and {key!r}; keep one")
        plan[rel], given_as[rel] = Path(weight_files[key]), key
    return plan


def weights_dictionary(weight_files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The descriptor's weights argument: ``{"@model_path/<rel>": {"offset": 0, "data": <file bytes>}}``.

    Empty (never None) when there are no weights: a nil dictionary crashes the framework (Orion #11).
    """
    result: dict[str, dict[str, Any]] = {}
    for rel, source in _weight_sources(weight_files).items():
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise WeightFileError(f"weight file {rel!r}: cannot read {source} ({exc.strerror or exc})") from None
        result[MODEL_PATH + rel] = {"offset": 0, "data": data}
    return result


def model_file_plan(mil_text: str, weight_files: dict[str, Path]) -> dict[str, bytes | Path]:
    """What the model directory must hold before compiling: model.mil (UTF-8) and each weight file at its path."""
    plan: dict[str, bytes | Path] = {MODEL_FILE: mil_text.encode("utf-8")}
    plan.update(_weight_sources(weight_files))
    return plan


def write_model_files(directory: Path, plan: dict[str, bytes | Path]) -> None:
    """Carry out :func:`model_file_plan` (a weight file that is already in place is left alone). Each file is
    replaced atomically: a model sharing the directory (same identifier) may be loading from it."""
    for rel, content in plan.items():
        _write_atomic(directory.joinpath(*PurePosixPath(rel).parts), content)


def _write_atomic(target: Path, content: bytes | Path) -> None:
    if isinstance(content, Path) and target.exists() and os.path.samefile(content, target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            shutil.copyfile(content, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def compiled_data_source(weight_paths: Sequence[str]) -> str | None:
    """The weight file the compiled ``data`` file is a byte copy of (Orion's finding, for a program with one weight
    file); None without weights. With several files the layout of ``data`` is unreported, so reusing or patching
    a compile is refused rather than guessed: a wrong ``data`` file gives silently wrong outputs."""
    if len(weight_paths) <= 1:
        return weight_paths[0] if weight_paths else None
    raise BackendError(
        f"the compiled 'data' file of a program with {len(weight_paths)} weight files has no reported layout, so "
        "its compile cannot be reused or patched on the ANE; emit the program with weight_layout='single', or "
        "recompile it (weight update strategy 'recompile')"
    )


def model_directory(temporary_directory: str, identifier: str) -> Path:
    """``NSTemporaryDirectory()/<hexStringIdentifier>/``; an identifier that is not one path component is refused."""
    if not identifier or identifier in (".", "..") or "/" in identifier or "\0" in identifier:
        raise BackendError(f"the ANE framework returned the model identifier {identifier!r}, which is not a name")
    return Path(temporary_directory) / identifier


@dataclass(frozen=True)
class NSErrorInfo:
    """What the bridge reads from an NSError: its full ``description`` (domain, code, localized text and user info,
    as Foundation prints it) and its ``userInfo`` dictionary's description, where the framework puts the details."""

    domain: str
    code: int
    description: str
    user_info: str = ""


_STATUS = re.compile(r"\bstatus=(0x[0-9a-fA-F]+)")


def parse_status(text: str) -> int | None:
    """The program status in an ANE error text (``... Failed with status=0x1d : statusType=0x9 ...``)."""
    match = _STATUS.search(text)
    return int(match.group(1), 16) if match else None


def describe_error(error: NSErrorInfo | None) -> str:
    if error is None:
        return "the framework returned NO without an NSError"
    text = f"{error.description or 'no description'} ({error.domain} code {error.code})"
    if error.user_info and error.user_info not in text:
        text += f"; userInfo {error.user_info}"
    return text


def call_failure(action: str, identifier: str, directory: Path, error: NSErrorInfo | None) -> BackendError:
    """The error for a failed compile/load/unload, naming the model's directory where its MIL text lies (kept after
    a failed compile, for inspection)."""
    return BackendError(f"ANE {action} of model {identifier} failed: {describe_error(error)}; "
                        f"the program is in {directory / MODEL_FILE}")


def evaluation_failure(identifier: str, error: NSErrorInfo | None) -> EvaluationError:
    """The error for a failed evaluation, with the program status code and its known meaning (the wording is
    shared with the emulator)."""
    status = parse_status(error.description) if error is not None else None
    return EvaluationError(evaluation_failure_message(status, f"model {identifier}: {describe_error(error)}"), status)


# ---------------------------------------------------------------------------------------------------------------------
# The ctypes layer


class _Runtime:
    """Loaded libraries, class and selector caches, and the few primitive calls everything else is built from."""

    def __init__(self) -> None:
        try:
            self._libs = {key: ctypes.CDLL(path) for key, path in library_paths().items()}
        except OSError as exc:
            raise BackendError(f"cannot load the ANE libraries ({exc}) on macOS {platform.mac_ver()[0] or '?'}: "
                               "macOS updates have broken private-API paths before") from None
        self._c: dict[str, Any] = {name: _bind(self._libs[lib], name) for name, (lib, _, _) in C_FUNCTIONS.items()}
        self._msg_send = ctypes.cast(self._libs["objc"].objc_msgSend, ctypes.c_void_p).value
        self._senders: dict[str, Any] = {}
        self._selectors: dict[str, int] = {}
        self._classes: dict[str, int] = {}
        cf = self._libs["cf"]
        self._key_callbacks = ctypes.addressof(ctypes.c_void_p.in_dll(cf, "kCFTypeDictionaryKeyCallBacks"))
        self._value_callbacks = ctypes.addressof(ctypes.c_void_p.in_dll(cf, "kCFTypeDictionaryValueCallBacks"))
        self._preflight()

    def _os_note(self) -> str:
        return (f"macOS {platform.mac_ver()[0] or '?'} build {self.sysctl_string('kern.osversion')}: "
                "macOS updates have broken private-API paths before")

    def _preflight(self) -> None:
        for name in FOUNDATION_CLASSES:
            self.cls(name)
        for class_name, methods in ANE_METHODS.items():
            cls = self.cls(class_name)
            for method in methods:
                lookup = "class_getClassMethod" if method[0] == "+" else "class_getInstanceMethod"
                if not self._c[lookup](cls, self.selector(method[1:])):
                    raise BackendError(f"{class_name} has no method {method}; {self._os_note()}")

    # -- Objective-C

    def cls(self, name: str) -> int:
        if name not in self._classes:
            pointer = self._c["objc_getClass"](name.encode())
            if not pointer:
                raise BackendError(f"Objective-C class {name} not found; {self._os_note()}")
            self._classes[name] = pointer
        return self._classes[name]

    def selector(self, name: str) -> int:
        if name not in self._selectors:
            self._selectors[name] = self._c["sel_registerName"](name.encode())
        return self._selectors[name]

    def send(self, receiver: int | None, selector: str, *args: Any) -> Any:
        """``objc_msgSend`` cast to the selector's own prototype."""
        sender = self._senders.get(selector)
        if sender is None:
            sender = self._senders.setdefault(selector, prototype(selector)(self._msg_send))
        return sender(receiver, self.selector(selector), *args)

    def send_checked(self, receiver: int, selector: str, *args: Any) -> tuple[bool, NSErrorInfo | None]:
        """Send a message whose last parameter is ``NSError **``; returns (result, error when the result is NO)."""
        error = ctypes.c_void_p()
        ok = bool(self.send(receiver, selector, *args, ctypes.byref(error)))
        return ok, (None if ok else self.error_info(error.value))

    def error_info(self, error: int | None) -> NSErrorInfo | None:
        if not error:
            return None
        return NSErrorInfo(
            domain=self.text(self.send(error, "domain")),
            code=int(self.send(error, "code")),
            description=self.text(self.send(error, "description")),
            user_info=self.text(self.send(self.send(error, "userInfo"), "description")),
        )

    @contextlib.contextmanager
    def pool(self) -> Iterator[None]:
        """An autorelease pool around one call sequence (on this thread)."""
        token = self._c["objc_autoreleasePoolPush"]()
        try:
            yield
        finally:
            self._c["objc_autoreleasePoolPop"](token)

    def retain(self, obj: int) -> int:
        return self.send(obj, "retain")

    def release(self, obj: int) -> None:
        self.send(obj, "release")

    def text(self, string: int | None) -> str:
        raw = self.send(string, "UTF8String") if string else None
        return raw.decode("utf-8", "replace") if raw else ""

    def string(self, value: str) -> int:
        if not isinstance(value, str) or "\0" in value:
            raise TypeError(f"an NSString is made from a str without NUL characters, not {value!r}")
        return self.send(self.cls("NSString"), "stringWithUTF8String:", value.encode("utf-8"))

    def data(self, value: bytes) -> int:
        return self.send(self.cls("NSData"), "dataWithBytes:length:", value, len(value))

    def number(self, value: int) -> int:
        if not -(2**31) <= value < 2**31:
            raise OverflowError(f"numberWithInt: takes a 32-bit int, got {value}")
        return self.send(self.cls("NSNumber"), "numberWithInt:", value)

    def array(self, items: Sequence[int]) -> int:
        if not all(items):  # nil in an NSArray raises NSInvalidArgumentException: the process would die
            raise BackendError(f"an NSArray cannot hold nil (item {[bool(i) for i in items].index(False)})")
        return self.send(self.cls("NSArray"), "arrayWithObjects:count:", (ctypes.c_void_p * len(items))(*items),
                         len(items))

    def plist(self, value: Any) -> int | None:
        """An autoreleased Foundation object for nested dict/list/str/bytes/int values (None is nil, refused inside a
        collection: Foundation raises on nil there, which kills the process)."""
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            inner = [*value, *value.values()] if isinstance(value, dict) else value
            if any(v is None for v in inner):
                raise TypeError(f"a dictionary or array for the framework cannot hold None: {value!r}")
        if isinstance(value, dict):
            keys = [self.string(k) for k in value]
            values = [self.plist(v) for v in value.values()]
            n = len(keys)
            return self.send(self.cls("NSDictionary"), "dictionaryWithObjects:forKeys:count:",
                             (ctypes.c_void_p * n)(*values), (ctypes.c_void_p * n)(*keys), n)
        if isinstance(value, list):
            return self.array([self.plist(v) for v in value])
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, bytes):
            return self.data(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return self.number(value)
        raise TypeError(f"no Foundation type for {type(value).__name__}")

    def temporary_directory(self) -> str:
        return self.text(self._c["NSTemporaryDirectory"]())

    # -- IOSurface and CoreFoundation

    def create_surface(self, properties: dict[str, int]) -> int:
        iosurface = self._libs["iosurface"]
        keys = [ctypes.c_void_p.in_dll(iosurface, name).value for name in properties]
        values = [self._c["CFNumberCreate"](None, CF_NUMBER_SINT64, ctypes.byref(ctypes.c_int64(v)))
                  for v in properties.values()]
        n = len(keys)
        try:
            options = self._c["CFDictionaryCreate"](None, (ctypes.c_void_p * n)(*keys), (ctypes.c_void_p * n)(*values),
                                                    n, self._key_callbacks, self._value_callbacks)
            try:
                ref = self._c["IOSurfaceCreate"](options)
            finally:
                self._c["CFRelease"](options)
        finally:
            for v in values:
                self._c["CFRelease"](v)
        if not ref:
            raise BackendError(f"IOSurfaceCreate refused {properties}")
        return ref

    def surface_size(self, ref: int) -> int:
        return int(self._c["IOSurfaceGetAllocSize"](ref))

    def lock_surface(self, ref: int, options: int) -> None:
        status = self._c["IOSurfaceLock"](ref, options, None)
        if status != 0:
            raise BackendError(f"IOSurfaceLock failed with kern_return {status:#x}")

    def unlock_surface(self, ref: int, options: int) -> None:
        status = self._c["IOSurfaceUnlock"](ref, options, None)
        if status != 0:
            raise BackendError(f"IOSurfaceUnlock failed with kern_return {status:#x}")

    def surface_view(self, ref: int, nbytes: int) -> np.ndarray:
        """The locked surface's memory as uint8 (valid until unlock)."""
        base = self._c["IOSurfaceGetBaseAddress"](ref)
        return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(base), dtype=np.uint8)

    def cf_release(self, ref: int) -> None:
        self._c["CFRelease"](ref)

    def sysctl_string(self, name: str) -> str:
        return sysctl_string(self._c["sysctlbyname"], name)


_RUNTIME: _Runtime | None = None
_RUNTIME_LOCK = threading.Lock()


def runtime() -> _Runtime:
    """The process's runtime, loading the libraries on first use."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = _Runtime()
        return _RUNTIME


def this_machine() -> tuple[str, str, bool]:
    """(system, machine, whether the framework directory exists): what :func:`unavailable_reason` needs.

    Where the framework is present, the system library says what the system is (``kern.ostype``, ``hw.machine``:
    a Python under Rosetta sees x86_64); elsewhere nothing is loaded and Python's own facts are enough."""
    if not os.path.isdir(os.path.join(library_root(), ANE_FRAMEWORK.lstrip("/"))):
        return sys.platform, platform.machine(), False
    try:
        sysctl = _bind(ctypes.CDLL(library_paths()["system"]), "sysctlbyname")
    except (OSError, AttributeError):
        return sys.platform, platform.machine(), True
    return sysctl_string(sysctl, "kern.ostype").lower(), sysctl_string(sysctl, "hw.machine"), True


def _bind(library: ctypes.CDLL, name: str) -> Any:
    """A C function of :data:`C_FUNCTIONS` from a loaded library, with its prototype."""
    _, restype, argtypes = C_FUNCTIONS[name]
    function = getattr(library, name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


def sysctl_string(sysctl: Any, name: str) -> str:
    """A string fact from ``sysctlbyname`` ("unknown" when the system has no such name)."""
    size = ctypes.c_size_t(0)
    if sysctl(name.encode(), None, ctypes.byref(size), None, 0) != 0 or size.value == 0:
        return "unknown"
    buffer = ctypes.create_string_buffer(size.value)
    if sysctl(name.encode(), buffer, ctypes.byref(size), None, 0) != 0:
        return "unknown"
    return buffer.value.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------------------------
# Surfaces, models, backend


class IOSurfaceBuffer(Surface):
    """A surface backed by an IOSurface: locked while mapped (read-only lock for reads), CFReleased on close."""

    def __init__(self, rt: _Runtime, nbytes: int):
        super().__init__(nbytes)  # validates the size and creates the lock
        self._memory = None  # the IOSurface replaces the base class's numpy memory
        self._runtime = rt
        self.ref: int | None = rt.create_surface(surface_properties(self.nbytes))
        self._finalizer = weakref.finalize(self, rt.cf_release, self.ref)
        if rt.surface_size(self.ref) < self.nbytes:
            self.close()
            raise BackendError(f"IOSurfaceCreate returned fewer than the {nbytes} bytes asked for")

    @contextlib.contextmanager
    def lock(self, read_only: bool = False) -> Iterator[np.ndarray]:
        with self._lock:
            if self.ref is None:
                raise BindingError("this surface is closed; create a new one with backend.new_surface()")
            options = lock_options(read_only)
            if not read_only:
                self.writes += 1
            self._runtime.lock_surface(self.ref, options)
            try:
                view = self._runtime.surface_view(self.ref, self.nbytes)
                if read_only:
                    view.flags.writeable = False
                yield view
            finally:
                self._runtime.unlock_surface(self.ref, options)

    def close(self) -> None:
        with self._lock:
            self._finalizer()
            self.ref = None


def surface_refs(surfaces: Sequence[Surface], role: str) -> list[int]:
    """The IOSurfaceRefs of a surface list, refusing surfaces the ANE cannot see."""
    if not surfaces:
        raise BindingError(f"the ANE needs at least one {role} surface")
    refs = []
    for i, surface in enumerate(surfaces):
        if not isinstance(surface, IOSurfaceBuffer):
            raise BindingError(f"{role} {i} is a {type(surface).__name__}, not an IOSurface; "
                               "create ANE surfaces with backend.new_surface()")
        if surface.ref is None:
            raise BindingError(f"{role} {i} is a closed surface; create a new one with backend.new_surface()")
        refs.append(surface.ref)
    return refs


class AneModel(BackendModel):
    """One ``_ANEInMemoryModel``. Calls on one model must be serialized by the caller (see the module docstring)."""

    def __init__(self, rt: _Runtime, descriptor: int, model: int, identifier: str, directory: Path,
                 weight_paths: Sequence[str], procedure: int = 0):
        self._runtime = rt
        self.procedure = procedure
        self._descriptor: int | None = descriptor
        self._model: int | None = model
        self.identifier = identifier
        self.directory = directory
        self._weight_paths = sorted(weight_paths)
        self._loaded = False
        self._keep_directory = False  # set by a failed compile: the error message points into the directory
        DIRECTORY_CLAIMS.claim(directory)
        #: (inputs, outputs) -> retained _ANERequest; the keys keep the surfaces alive while a request names them.
        self._requests: dict[tuple[tuple[Surface, ...], tuple[Surface, ...]], int] = {}

    def _live_model(self) -> int:
        if self._model is None:
            raise BackendError(f"model {self.identifier} was released; create a new one")
        return self._model

    def _call(self, action: str, selector: str, *args: Any) -> None:
        """Send ``selector`` with ``args`` (dicts become NSDictionary objects inside the call's own pool)."""
        model = self._live_model()
        rt = self._runtime
        with rt.pool():
            ok, error = rt.send_checked(model, selector, *[rt.plist(a) if isinstance(a, dict) else a for a in args])
        if not ok:
            raise call_failure(action, self.identifier, self.directory, error)

    def compile(self) -> None:
        try:
            self._call("compile", "compileWithQoS:options:error:", QOS, {})
        except BackendError:
            self._keep_directory = True
            raise

    def load(self) -> None:
        self._call("load", "loadWithQoS:options:error:", QOS, {})
        self._loaded = True

    def unload(self) -> None:
        """Unload, and drop the requests: they were built for this load (nothing of one load is reused by the next)."""
        if not self._loaded:
            return
        self._loaded = False  # a failed unload leaves the state unknown: never unload twice
        try:
            self._call("unload", "unloadWithQoS:error:", QOS)
        finally:
            self._release_requests()

    def _release_requests(self) -> None:
        rt = self._runtime
        with rt.pool():
            for request in self._requests.values():
                rt.release(request)
        self._requests.clear()

    # -- delta compilation (reference section 2): plain file operations in the model directory

    def artifacts(self) -> dict[str, bytes]:
        """Every file the compile left (``net.plist`` and ``data``, weightless programs included)."""
        self._live_model()
        try:
            return {name: (self.directory / name).read_bytes() for name in COMPILED_ARTIFACTS}
        except FileNotFoundError as exc:
            raise BackendError(f"model {self.identifier} has no {Path(exc.filename).name} in {self.directory}; "
                               "compile it first") from None

    def install_artifacts(self, artifacts: dict[str, bytes]) -> None:
        """Orion's tested recipe: the donor's net.plist, and the ``data`` file rebuilt from this model's weights (the
        donor's may hold other values); a weightless program takes the donor's ``data`` as it is."""
        self._live_model()
        source = compiled_data_source(self._weight_paths)
        needed = [NET_PLIST] if source is not None else [NET_PLIST, COMPILED_DATA]
        missing = [name for name in needed if name not in artifacts]
        if missing:
            raise BackendError(f"the artifacts to install lack {missing} (got {sorted(artifacts)})")
        _write_atomic(self.directory / NET_PLIST, artifacts[NET_PLIST])
        if source is None:
            _write_atomic(self.directory / COMPILED_DATA, artifacts[COMPILED_DATA])
        else:
            _write_atomic(self.directory / COMPILED_DATA, self.directory / source)

    def write_weights(self, weight_files: dict[str, Path]) -> None:
        self._live_model()
        plan = _weight_sources(weight_files)
        unknown = sorted(set(plan) - set(self._weight_paths))
        if unknown:
            raise WeightFileError(f"model {self.identifier} has no weight file(s) {unknown}; "
                                  f"its weight files are {self._weight_paths}")
        source = compiled_data_source(self._weight_paths)
        write_model_files(self.directory, dict(plan))
        if source in plan:
            _write_atomic(self.directory / COMPILED_DATA, self.directory / source)

    def evaluate(self, inputs: Sequence[Surface], outputs: Sequence[Surface]) -> None:
        model = self._live_model()
        if not self._loaded:
            raise BackendError(f"model {self.identifier} is not loaded; call load() before evaluate()")
        input_refs, output_refs = surface_refs(inputs, "input"), surface_refs(outputs, "output")
        key = (tuple(inputs), tuple(outputs))
        rt = self._runtime
        with rt.pool():
            request = self._requests.get(key)
            if request is None:
                request = self._cache_request(key, self._new_request(input_refs, output_refs))
            ok, error = rt.send_checked(model, "evaluateWithQoS:options:request:error:", QOS, rt.plist({}), request)
        if not ok:
            raise evaluation_failure(self.identifier, error)

    def _new_request(self, input_refs: list[int], output_refs: list[int]) -> int:
        rt = self._runtime
        wrappers = []
        for ref in (*input_refs, *output_refs):
            wrapper = rt.send(rt.cls(SURFACE_OBJECT_CLASS), "objectWithIOSurface:", ref)
            if not wrapper:
                raise BackendError("_ANEIOSurfaceObject refused an IOSurface")
            wrappers.append(wrapper)
        n = len(input_refs)
        request = rt.send(
            rt.cls(REQUEST_CLASS),
            "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",
            rt.array(wrappers[:n]),
            rt.plist(list(range(n))),
            rt.array(wrappers[n:]),
            rt.plist(list(range(len(output_refs)))),
            None,  # weightsBuffer: ignored, weights are baked into the compiled program
            None,  # perfStats
            rt.number(self.procedure),  # procedureIndex: 0 but for a function after the first (ANE-42)
        )
        if not request:
            raise BackendError(f"_ANERequest refused {n} inputs and {len(output_refs)} outputs")
        return rt.retain(request)

    def _cache_request(self, key: tuple[tuple[Surface, ...], tuple[Surface, ...]], request: int) -> int:
        if len(self._requests) >= MAX_CACHED_REQUESTS:
            oldest = next(iter(self._requests))
            self._runtime.release(self._requests.pop(oldest))
        self._requests[key] = request
        return request

    def release(self, remove_directory: bool = True) -> None:
        """Unload (a failure is a warning: the model is released all the same), release every object, and delete
        the directory unless another model uses it, ``remove_directory`` is False, or a failed compile kept it."""
        if self._model is None:
            return
        rt = self._runtime
        try:
            self.unload()
        except BackendError as exc:
            warnings.warn(f"releasing model {self.identifier} anyway: {exc}", RuntimeWarning, stacklevel=2)
        self._release_requests()
        with rt.pool():
            rt.release(self._model)
            if self._descriptor is not None:
                rt.release(self._descriptor)
        self._model = self._descriptor = None
        if DIRECTORY_CLAIMS.release(self.directory) and remove_directory and not self._keep_directory:
            _remove_directory(self.directory)


def _remove_directory(directory: Path) -> None:
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BackendError(f"could not delete the model directory {directory} ({exc}); delete it by hand") from None


class AneBackend(Backend):
    """The Apple Neural Engine through ``_ANEInMemoryModel``: macOS on Apple silicon only."""

    name = "ane"

    def __init__(self, target: Target):
        reason = unavailable_reason(*this_machine())
        if reason is not None:
            raise BackendError(unavailable_message(reason))
        super().__init__(target)
        self._runtime = runtime()

    @classmethod
    def available(cls) -> bool:
        try:
            return unavailable_reason(*this_machine()) is None
        except Exception:  # a probe must never raise
            return False

    def new_model(self, mil_text: str, weight_files: dict[str, Path], function: str | None = None) -> AneModel:
        plan = model_file_plan(mil_text, weight_files)  # checks the paths before anything is created
        # a request's procedureIndex picks the function, in text order (target setting multi_function, ANE-42)
        procedure = 0
        if function is not None:
            functions = parse_functions(mil_text)
            procedure = list(functions).index(select_function(functions, function).function)
        weights = weights_dictionary(weight_files)
        rt = self._runtime
        with rt.pool():
            descriptor = rt.send(rt.cls(DESCRIPTOR_CLASS), "modelWithMILText:weights:optionsPlist:",
                                 rt.data(plan[MODEL_FILE]), rt.plist(weights), None)
            if not descriptor:
                raise BackendError(f"{DESCRIPTOR_CLASS} refused the MIL text and {len(weights)} weight file(s)")
            model = rt.send(rt.cls(MODEL_CLASS), "inMemoryModelWithDescriptor:", descriptor)
            if not model:
                raise BackendError(f"{MODEL_CLASS} refused the descriptor")
            identifier = rt.text(rt.send(model, "hexStringIdentifier"))
            directory = model_directory(rt.temporary_directory(), identifier)
            weight_paths = [rel for rel in plan if rel != MODEL_FILE]
            result = AneModel(rt, rt.retain(descriptor), rt.retain(model), identifier, directory, weight_paths,
                              procedure)
        try:
            write_model_files(directory, plan)
        except OSError as exc:
            result.release(remove_directory=False)
            raise BackendError(f"could not write the model files into {directory} ({exc})") from None
        return result

    def new_surface(self, nbytes: int) -> IOSurfaceBuffer:
        return IOSurfaceBuffer(self._runtime, nbytes)

    def loads_disk_cache(self) -> bool:
        return self.target.load_disk_cache

    def describe(self) -> dict[str, str]:
        facts = super().describe()
        facts.update(
            chip=self._runtime.sysctl_string("machdep.cpu.brand_string"),
            macos=platform.mac_ver()[0] or "unknown",
            macos_build=self._runtime.sysctl_string("kern.osversion"),
        )
        return facts


__all__ = ["AneBackend", "AneModel", "IOSurfaceBuffer", "NSErrorInfo", "MSG_SIGNATURES", "C_FUNCTIONS",
           "ANE_METHODS", "prototype", "surface_properties", "weights_dictionary", "model_file_plan",
           "write_model_files", "compiled_data_source", "model_directory", "parse_status", "call_failure",
           "evaluation_failure"]
