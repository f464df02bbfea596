"""The ANE bridge: everything decidable without a Mac is checked here against the reference's facts (section 2 and 5
of the team's ANE notes, Apple's public headers) written out independently below; the call sequence is checked
against a fake runtime; tests marked ``ane`` run the real framework and need macOS on Apple silicon."""

from __future__ import annotations

import ast
import ctypes
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orion.errors import BackendError, BindingError, EvaluationError, OrionError, UnsafePathError, WeightFileError
from orion.runtime.backends import ane
from orion.runtime.backends.ane import AneBackend, NSErrorInfo
from orion.runtime.backends.base import STATUS_HINTS
from orion.runtime.tensor import Surface, Tensor

# ---------------------------------------------------------------------------------------------------------------------
# Reference signatures, spelled as C and converted by a table of this test's own (LP64 arm64 sizes).

_VOID_P = ctypes.c_void_p
_C_TYPES = {
    "void": None,
    "BOOL": ctypes.c_bool,  # objc.h: bool on arm64
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "uint32_t": ctypes.c_uint32,
    "kern_return_t": ctypes.c_int,
    "NSUInteger": ctypes.c_ulong,
    "NSInteger": ctypes.c_long,
    "CFIndex": ctypes.c_long,
    "CFNumberType": ctypes.c_long,
    "size_t": ctypes.c_size_t,
    "const char*": ctypes.c_char_p,
    "NSError**": ctypes.POINTER(_VOID_P),
    "const id*": ctypes.POINTER(_VOID_P),
    "const void**": ctypes.POINTER(_VOID_P),
    "uint32_t*": ctypes.POINTER(ctypes.c_uint32),
    "size_t*": ctypes.POINTER(ctypes.c_size_t),
}
_OBJECTS = {"id", "Class", "SEL", "IOSurfaceRef", "CFDictionaryRef", "CFTypeRef", "CFAllocatorRef", "Method"}


def _ctype(name: str):
    name = name.strip()
    if name in _C_TYPES:
        return _C_TYPES[name]
    if name in _OBJECTS or (name.endswith("*") and not name.endswith("**")):  # object and plain data pointers
        return _VOID_P
    raise KeyError(name)


def _parse(signature: str):
    """``"BOOL (id, SEL, unsigned int)"`` -> (c_bool, (c_void_p, c_void_p, c_uint))."""
    ret, _, rest = signature.partition("(")
    args = [a for a in rest.rstrip(")").split(",") if a.strip()]
    return _ctype(ret), tuple(_ctype(a) for a in args)


REFERENCE_MESSAGES = {
    # reference section 2, as working Objective-C code casts objc_msgSend
    "modelWithMILText:weights:optionsPlist:": "id (Class, SEL, NSData*, NSDictionary*, NSDictionary*)",
    "inMemoryModelWithDescriptor:": "id (Class, SEL, id)",
    "hexStringIdentifier": "NSString* (id, SEL)",
    "compileWithQoS:options:error:": "BOOL (id, SEL, unsigned int, NSDictionary*, NSError**)",
    "loadWithQoS:options:error:": "BOOL (id, SEL, unsigned int, NSDictionary*, NSError**)",
    "evaluateWithQoS:options:request:error:": "BOOL (id, SEL, unsigned int, NSDictionary*, id, NSError**)",
    "unloadWithQoS:error:": "BOOL (id, SEL, unsigned int, NSError**)",
    "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:":
        "id (Class, SEL, NSArray*, NSArray*, NSArray*, NSArray*, id, id, NSNumber*)",
    "objectWithIOSurface:": "id (Class, SEL, IOSurfaceRef)",
    # Foundation headers
    "stringWithUTF8String:": "id (Class, SEL, const char*)",
    "UTF8String": "const char* (id, SEL)",
    "dataWithBytes:length:": "id (Class, SEL, const void*, NSUInteger)",
    "dictionaryWithObjects:forKeys:count:": "id (Class, SEL, const id*, const id*, NSUInteger)",
    "arrayWithObjects:count:": "id (Class, SEL, const id*, NSUInteger)",
    "numberWithInt:": "id (Class, SEL, int)",
    "retain": "id (id, SEL)",
    "release": "void (id, SEL)",
    "localizedDescription": "NSString* (id, SEL)",
    "domain": "NSString* (id, SEL)",
    "code": "NSInteger (id, SEL)",
}

REFERENCE_FUNCTIONS = {
    "objc_getClass": "Class (const char*)",
    "sel_registerName": "SEL (const char*)",
    "class_getClassMethod": "Method (Class, SEL)",
    "class_getInstanceMethod": "Method (Class, SEL)",
    "objc_autoreleasePoolPush": "void* ()",
    "objc_autoreleasePoolPop": "void (void*)",
    "NSTemporaryDirectory": "NSString* ()",
    "CFNumberCreate": "CFNumberRef* (CFAllocatorRef, CFNumberType, const void*)",
    "CFDictionaryCreate": "CFDictionaryRef (CFAllocatorRef, const void**, const void**, CFIndex, "
                          "const CFDictionaryKeyCallBacks*, const CFDictionaryValueCallBacks*)",
    "CFRelease": "void (CFTypeRef)",
    "IOSurfaceCreate": "IOSurfaceRef (CFDictionaryRef)",
    "IOSurfaceLock": "kern_return_t (IOSurfaceRef, uint32_t, uint32_t*)",
    "IOSurfaceUnlock": "kern_return_t (IOSurfaceRef, uint32_t, uint32_t*)",
    "IOSurfaceGetBaseAddress": "void* (IOSurfaceRef)",
    "IOSurfaceGetAllocSize": "size_t (IOSurfaceRef)",
    "sysctlbyname": "int (const char*, void*, size_t*, void*, size_t)",
}


def test_message_table_matches_the_reference_signatures():
    assert set(ane.MSG_SIGNATURES) == set(REFERENCE_MESSAGES)
    for selector, signature in REFERENCE_MESSAGES.items():
        restype, argtypes = _parse(signature)
        assert ane.MSG_SIGNATURES[selector] == (restype, argtypes), selector
        proto = ane.prototype(selector)  # the CFUNCTYPE objc_msgSend is cast to at this call site
        assert proto._restype_ is restype and tuple(proto._argtypes_) == argtypes, selector
        assert ane.prototype(selector) is proto  # cached


def test_c_function_table_matches_the_headers():
    assert set(ane.C_FUNCTIONS) == set(REFERENCE_FUNCTIONS)
    for name, signature in REFERENCE_FUNCTIONS.items():
        _, restype, argtypes = ane.C_FUNCTIONS[name]
        assert (restype, tuple(argtypes)) == _parse(signature), name
    assert {lib for lib, _, _ in ane.C_FUNCTIONS.values()} <= set(ane.LIBRARIES)


def _sent_selectors() -> tuple[set[str], list[str]]:
    """Selectors at every call site of send/send_checked/_call in the bridge source, and any direct msgSend calls."""
    tree = ast.parse(Path(ane.__file__).read_text(encoding="utf-8"))
    selectors, direct = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("send", "send_checked", "_call"):
            selector = node.args[1]
            if isinstance(selector, ast.Name) and selector.id == "selector":
                continue  # a forwarder passing its own parameter on
            assert isinstance(selector, ast.Constant) and isinstance(selector.value, str), ast.unparse(node)
            selectors.add(selector.value)
        if name == "objc_msgSend":
            direct.append(ast.unparse(node))
    return selectors, direct


def test_every_selector_the_bridge_sends_has_its_prototype_and_every_prototype_is_used():
    selectors, direct = _sent_selectors()
    assert selectors == set(ane.MSG_SIGNATURES)
    assert direct == []  # no call through an uncast objc_msgSend


def test_private_methods_are_the_reference_classes_and_selectors():
    reference = {
        ("_ANEInMemoryModelDescriptor", "+modelWithMILText:weights:optionsPlist:"),
        ("_ANEInMemoryModel", "+inMemoryModelWithDescriptor:"),
        ("_ANEInMemoryModel", "-hexStringIdentifier"),
        ("_ANEInMemoryModel", "-compileWithQoS:options:error:"),
        ("_ANEInMemoryModel", "-loadWithQoS:options:error:"),
        ("_ANEInMemoryModel", "-evaluateWithQoS:options:request:error:"),
        ("_ANEInMemoryModel", "-unloadWithQoS:error:"),
        ("_ANERequest",
         "+requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:"),
        ("_ANEIOSurfaceObject", "+objectWithIOSurface:"),
    }
    assert {(c, m) for c, methods in ane.ANE_METHODS.items() for m in methods} == reference


# ---------------------------------------------------------------------------------------------------------------------
# Availability


def test_module_imports_and_probes_without_loading_any_library():
    code = (
        "import ctypes\n"
        "def refuse(*a, **k): raise AssertionError('a library was loaded')\n"
        "ctypes.CDLL = ctypes.cdll.LoadLibrary = refuse\n"
        "import orion.runtime.backends.ane as ane\n"
        "ane.AneBackend.available(); ane.surface_properties(64); ane.prototype('retain')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(sys.platform == "darwin", reason="checks a non-Mac machine")
def test_unavailable_here_and_the_constructor_says_what_to_use():
    assert AneBackend.available() is False
    with pytest.raises(BackendError, match=r"the ANE backend needs macOS on Apple silicon; use backend='emulator'"):
        AneBackend(ane_target())


def test_available_never_raises(monkeypatch):
    def broken():
        raise OSError("no platform facts")

    monkeypatch.setattr(ane, "this_machine", broken)
    assert AneBackend.available() is False


@pytest.mark.parametrize(
    "system, machine, present, ok",
    [
        ("linux", "x86_64", False, False),
        ("linux", "aarch64", True, False),
        ("darwin", "x86_64", True, False),  # Intel Mac, or Python under Rosetta
        ("darwin", "arm64", False, False),
        ("darwin", "arm64", True, True),
    ],
)
def test_unavailable_reason(system, machine, present, ok):
    reason = ane.unavailable_reason(system, machine, present)
    assert (reason is None) == ok
    if not ok:
        assert reason and ane.unavailable_message(reason).startswith(
            "the ANE backend needs macOS on Apple silicon; use backend='emulator'")


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers


@given(st.integers(1, 1 << 30))
def test_surface_properties_follow_the_flat_layout(nbytes):
    # reference section 5: width = bytes, height 1, bytes per element 1, bytes per row = bytes, alloc = bytes, format 0
    assert ane.surface_properties(nbytes) == {
        "kIOSurfaceWidth": nbytes,
        "kIOSurfaceHeight": 1,
        "kIOSurfaceBytesPerElement": 1,
        "kIOSurfaceBytesPerRow": nbytes,
        "kIOSurfaceAllocSize": nbytes,
        "kIOSurfacePixelFormat": 0,
    }


def test_lock_options():
    assert ane.lock_options(read_only=True) == 1  # kIOSurfaceLockReadOnly
    assert ane.lock_options(read_only=False) == 0


def _files(tmp_path: Path, names: dict[str, bytes]) -> dict[str, Path]:
    out = {}
    for i, (key, data) in enumerate(names.items()):
        src = tmp_path / "src" / f"f{i}.bin"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        out[key] = src
    return out


def test_weights_dictionary_entries(tmp_path):
    files = _files(tmp_path, {"weights/a.bin": b"\x01\x02", "@model_path/weights/sub/b.bin": b"\x03" * 70})
    assert ane.weights_dictionary(files) == {
        "@model_path/weights/a.bin": {"offset": 0, "data": b"\x01\x02"},
        "@model_path/weights/sub/b.bin": {"offset": 0, "data": b"\x03" * 70},
    }
    empty = ane.weights_dictionary({})
    assert empty == {} and empty is not None  # never nil (Orion #11)


@pytest.mark.parametrize("key", ["../x.bin", "/abs.bin", "weights\\a.bin", "@model_path/../x.bin", "weights/./a.bin",
                                 "weights//a.bin", "model.mil", "net.plist", "@model_path/data", ""])
def test_bad_weight_paths_are_refused(tmp_path, key):
    files = _files(tmp_path, {key: b"x"})
    with pytest.raises(UnsafePathError):
        ane.weights_dictionary(files)
    with pytest.raises(UnsafePathError):
        ane.model_file_plan("program", files)


def test_the_same_weight_file_given_twice_is_refused(tmp_path):
    files = _files(tmp_path, {"weights/a.bin": b"1", "@model_path/weights/a.bin": b"2"})
    with pytest.raises(UnsafePathError, match="given twice"):
        ane.weights_dictionary(files)


def test_missing_weight_file_names_it(tmp_path):
    with pytest.raises(WeightFileError, match="weights/a.bin"):
        ane.weights_dictionary({"weights/a.bin": tmp_path / "nope.bin"})


def test_model_file_plan_and_writing_it(tmp_path):
    text = "program(1.3)\n// caf\u00e9 \u2013 non-ASCII survives as UTF-8\n"
    files = _files(tmp_path, {"weights/a.bin": b"A" * 3, "@model_path/weights/deep/b.bin": b"B" * 5})
    plan = ane.model_file_plan(text, files)
    assert set(plan) == {"model.mil", "weights/a.bin", "weights/deep/b.bin"}
    assert plan["model.mil"] == text.encode("utf-8")
    directory = tmp_path / "model"
    ane.write_model_files(directory, plan)
    written = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    assert written == {"model.mil": text.encode("utf-8"), "weights/a.bin": b"AAA", "weights/deep/b.bin": b"BBBBB"}
    # A weight file already in place (the caller wrote into the model directory) is left as it is.
    in_place = {"weights/a.bin": directory / "weights/a.bin"}
    ane.write_model_files(directory, ane.model_file_plan(text, in_place))
    assert (directory / "weights/a.bin").read_bytes() == b"AAA"


def test_compiled_data_source():
    assert ane.compiled_data_source([]) is None
    assert ane.compiled_data_source(["weights/w.bin"]) == "weights/w.bin"
    with pytest.raises(BackendError, match="weight_layout='single'"):
        ane.compiled_data_source(["weights/a.bin", "weights/b.bin"])


def test_model_directory():
    assert ane.model_directory("/var/folders/x/T/", "A1B2C3") == Path("/var/folders/x/T/A1B2C3")
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(BackendError):
            ane.model_directory("/tmp", bad)


# Error texts as the public record quotes them.
STATUS_1D = "ANEProgramProcessRequestDirect() Failed with status=0x1d : statusType=0x9: Program Inference error"
STATUS_12 = "ANEProgramProcessRequestDirect() Failed with status=0x12 : statusType=0x9: Request cancelled"


def test_parse_status():
    assert ane.parse_status(STATUS_1D) == 0x1D
    assert ane.parse_status(STATUS_12) == 0x12
    assert ane.parse_status("statusType=0x9: Program Inference error") is None
    assert ane.parse_status("verifyBundleAtPath: invalid model") is None


def test_evaluation_failure_carries_the_status_and_the_hint():
    err = ane.evaluation_failure("ABC", NSErrorInfo("com.apple.appleneuralengine", 8, STATUS_1D))
    assert isinstance(err, EvaluationError) and isinstance(err, BackendError) and isinstance(err, OrionError)
    assert err.status == 0x1D
    text = str(err)
    assert STATUS_HINTS[0x1D] in text  # the wording shared with the emulator
    assert "status 0x1d" in text and "com.apple.appleneuralengine code 8" in text and "ABC" in text
    other = ane.evaluation_failure("ABC", NSErrorInfo("com.apple.appleneuralengine", 8, STATUS_12))
    assert other.status == 0x12 and STATUS_HINTS[0x1D] not in str(other) and "Request cancelled" in str(other)
    bare = ane.evaluation_failure("ABC", None)
    assert bare.status is None and "without an NSError" in str(bare)


def test_call_failure_names_the_program(tmp_path):
    info = NSErrorInfo("com.apple.appleneuralengine", 10, "verifyBundleAtPath: invalid model")
    err = ane.call_failure("compile", "ABC", tmp_path / "ABC", info)
    assert type(err) is BackendError
    text = str(err)
    assert "compile" in text and "verifyBundleAtPath: invalid model" in text and "code 10" in text
    assert str(tmp_path / "ABC" / "model.mil") in text


# ---------------------------------------------------------------------------------------------------------------------
# The call sequence, against a fake runtime that records what the bridge asks for


class FakeRuntime:
    """Stands in for ``ane._Runtime``: objects are handles into a table; every message is checked against the
    prototype table for its arity and recorded."""

    HEX = "0123456789ABCDEF"

    def __init__(self, temp: Path):
        self.temp = temp
        self.objects: dict[int, object] = {}
        self.calls: list[tuple[object, str, tuple]] = []
        self.retains: Counter = Counter()
        self.releases: Counter = Counter()
        self.failures: dict[str, NSErrorInfo] = {}
        self.compile_saw: set[str] | None = None
        self.pool_depth = 0
        self.surfaces: dict[int, np.ndarray] = {}
        self.surface_log: list[tuple] = []

    def _new(self, value) -> int:
        handle = 0x1000 + 16 * len(self.objects)
        self.objects[handle] = value
        return handle

    @contextmanager
    def pool(self):
        self.pool_depth += 1
        try:
            yield
        finally:
            self.pool_depth -= 1

    def cls(self, name: str) -> str:
        return f"class {name}"

    def _record(self, receiver, selector, args, extra):
        assert self.pool_depth > 0, f"{selector} sent outside an autorelease pool"
        assert len(args) + extra == len(ane.MSG_SIGNATURES[selector][1]) - 2, selector
        self.calls.append((receiver, selector, args))

    def send(self, receiver, selector: str, *args):
        self._record(receiver, selector, args, 0)
        if selector == "retain":
            self.retains[receiver] += 1
            return receiver
        if selector == "release":
            self.releases[receiver] += 1
            return None
        if selector == "hexStringIdentifier":
            return self._new(self.HEX)
        return self._new((selector, receiver, args))

    def send_checked(self, receiver, selector: str, *args):
        self._record(receiver, selector, args, 1)
        if selector == "compileWithQoS:options:error:":
            root = self.temp / self.HEX
            self.compile_saw = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        error = self.failures.get(selector)
        return error is None, error

    def retain(self, obj):
        return self.send(obj, "retain")

    def release(self, obj):
        self.send(obj, "release")

    def text(self, handle) -> str:
        return self.objects[handle]

    def data(self, value: bytes):
        return self._new(("NSData", value))

    def number(self, value: int):
        return self._new(("NSNumber", value))

    def array(self, items):
        return self._new(("NSArray", list(items)))

    def plist(self, value):
        return None if value is None else self._new(("plist", value))

    def temporary_directory(self) -> str:
        return str(self.temp) + "/"

    def create_surface(self, properties):
        ref = self._new(("IOSurface", dict(properties)))
        self.surfaces[ref] = np.zeros(properties["kIOSurfaceAllocSize"], dtype=np.uint8)
        return ref

    def surface_size(self, ref):
        return self.surfaces[ref].size

    def lock_surface(self, ref, options):
        self.surface_log.append(("lock", ref, options))

    def unlock_surface(self, ref, options):
        self.surface_log.append(("unlock", ref, options))

    def surface_view(self, ref, nbytes):
        return self.surfaces[ref][:nbytes]

    def cf_release(self, ref):
        self.surface_log.append(("CFRelease", ref))

    def sysctl_string(self, name):
        return {"machdep.cpu.brand_string": "Apple M4", "kern.osversion": "24A335"}[name]


def ane_target():
    from orion.compiler.targets import get_target

    return get_target("default")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    rt = FakeRuntime(tmp_path / "T")
    (tmp_path / "T").mkdir()
    monkeypatch.setattr(ane, "this_machine", lambda: ("darwin", "arm64", True))
    monkeypatch.setattr(ane, "runtime", lambda: rt)
    return rt


def _sent(rt: FakeRuntime, selector: str) -> list[tuple]:
    return [(receiver, args) for receiver, sel, args in rt.calls if sel == selector]


MIL = "program(1.3)\n{\n}\n"


def test_new_model_builds_the_descriptor_and_writes_the_files_before_compiling(fake, tmp_path):
    backend = AneBackend(ane_target())
    files = _files(tmp_path, {"weights/w.bin": b"W" * 10})
    model = backend.new_model(MIL, files)

    [(receiver, (mil, weights, options))] = _sent(fake, "modelWithMILText:weights:optionsPlist:")
    assert receiver == "class _ANEInMemoryModelDescriptor"
    assert fake.objects[mil] == ("NSData", MIL.encode("utf-8"))  # NSData, never NSString
    assert fake.objects[weights] == ("plist", {"@model_path/weights/w.bin": {"offset": 0, "data": b"W" * 10}})
    assert options is None
    [(receiver, _)] = _sent(fake, "inMemoryModelWithDescriptor:")
    assert receiver == "class _ANEInMemoryModel"
    assert model.identifier == FakeRuntime.HEX
    assert model.directory == fake.temp / FakeRuntime.HEX

    model.compile()
    assert fake.compile_saw == {"model.mil", "weights/w.bin"}
    [(receiver, (qos, opts))] = _sent(fake, "compileWithQoS:options:error:")
    assert qos == 21 and fake.objects[opts] == ("plist", {})
    model.load()
    [(_, (qos, opts))] = _sent(fake, "loadWithQoS:options:error:")
    assert qos == 21 and fake.objects[opts] == ("plist", {})


def test_no_weights_gives_an_empty_dictionary(fake):
    AneBackend(ane_target()).new_model(MIL, {})
    [(_, (_, weights, _))] = _sent(fake, "modelWithMILText:weights:optionsPlist:")
    assert weights is not None and fake.objects[weights] == ("plist", {})


def test_compile_failure_reports_the_nserror(fake):
    fake.failures["compileWithQoS:options:error:"] = NSErrorInfo("com.apple.appleneuralengine", 10, "invalid model")
    model = AneBackend(ane_target()).new_model(MIL, {})
    with pytest.raises(BackendError, match="compile .*invalid model"):
        model.compile()


def test_evaluate_builds_one_request_per_surface_list(fake):
    backend = AneBackend(ane_target())
    model = backend.new_model(MIL, {})
    a, b, y = (backend.new_surface(64) for _ in range(3))
    with pytest.raises(BackendError, match="load"):
        model.evaluate([a, b], [y])
    model.compile()
    model.load()
    model.evaluate([a, b], [y])
    model.evaluate([a, b], [y])
    [(receiver, args)] = _sent(fake, "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:"
                                     "procedureIndex:")
    assert receiver == "class _ANERequest"
    ins, in_idx, outs, out_idx, weights_buffer, perf_stats, procedure = args
    wrapped = [(recv, a_[0]) for recv, a_ in _sent(fake, "objectWithIOSurface:")]
    assert all(recv == "class _ANEIOSurfaceObject" for recv, _ in wrapped)
    assert [w for _, w in wrapped] == [a.ref, b.ref, y.ref]
    assert [fake.objects[w][2][0] for w in fake.objects[ins][1]] == [a.ref, b.ref]
    assert [fake.objects[w][2][0] for w in fake.objects[outs][1]] == [y.ref]
    assert fake.objects[in_idx] == ("plist", [0, 1]) and fake.objects[out_idx] == ("plist", [0])
    assert weights_buffer is None and perf_stats is None and fake.objects[procedure] == ("NSNumber", 0)
    evaluations = _sent(fake, "evaluateWithQoS:options:request:error:")
    assert len(evaluations) == 2
    for _, (qos, opts, request) in evaluations:
        assert qos == 21 and fake.objects[opts] == ("plist", {}) and fake.objects[request][0].startswith("request")

    model.evaluate([b, a], [y])  # another order is another binding: a new request
    assert len(_sent(fake, "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:"
                           "procedureIndex:")) == 2


def test_request_cache_is_bounded_and_releases_what_it_drops(fake):
    backend = AneBackend(ane_target())
    model = backend.new_model(MIL, {})
    model.load()
    y = backend.new_surface(64)
    for _ in range(ane.MAX_CACHED_REQUESTS + 3):
        model.evaluate([backend.new_surface(64)], [y])
    requests = [handle for handle, value in fake.objects.items() if isinstance(value, tuple)
                and value[0] == "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:"
                                "procedureIndex:"]
    assert sum(fake.releases[r] for r in requests) == 3
    model.release()
    assert all(fake.releases[r] == fake.retains[r] == 1 for r in requests)


def test_evaluation_failure_raises_with_status(fake):
    fake.failures["evaluateWithQoS:options:request:error:"] = NSErrorInfo("com.apple.appleneuralengine", 8, STATUS_1D)
    backend = AneBackend(ane_target())
    model = backend.new_model(MIL, {})
    model.load()
    with pytest.raises(EvaluationError) as info:
        model.evaluate([backend.new_surface(64)], [backend.new_surface(128)])
    assert info.value.status == 0x1D and STATUS_HINTS[0x1D] in str(info.value)


def test_surfaces_the_ane_cannot_see_are_refused(fake):
    backend = AneBackend(ane_target())
    model = backend.new_model(MIL, {})
    model.load()
    good = backend.new_surface(64)
    with pytest.raises(BindingError, match="new_surface"):
        model.evaluate([Surface(64)], [good])
    closed = backend.new_surface(64)
    closed.close()
    with pytest.raises(BindingError, match="closed"):
        model.evaluate([good], [closed])
    with pytest.raises(BindingError, match="at least one"):
        model.evaluate([], [good])


def test_release_unloads_releases_everything_and_deletes_the_directory(fake):
    backend = AneBackend(ane_target())
    model = backend.new_model(MIL, {})
    model.compile()
    model.load()
    model.evaluate([backend.new_surface(64)], [backend.new_surface(64)])
    model.release()
    [(_, (qos,))] = _sent(fake, "unloadWithQoS:error:")
    assert qos == 21
    unload_at = next(i for i, c in enumerate(fake.calls) if c[1] == "unloadWithQoS:error:")
    first_release = next(i for i, c in enumerate(fake.calls) if c[1] == "release")
    assert unload_at < first_release  # always unload before release
    assert fake.retains and fake.retains == fake.releases  # every retained object released once
    assert not model.directory.exists()
    model.release()  # twice is harmless
    with pytest.raises(BackendError, match="released"):
        model.compile()


def test_release_can_keep_the_directory_and_skips_unload_when_not_loaded(fake):
    model = AneBackend(ane_target()).new_model(MIL, {})
    model.release(remove_directory=False)
    assert (model.directory / "model.mil").read_bytes() == MIL.encode()
    assert _sent(fake, "unloadWithQoS:error:") == []
    assert fake.retains == fake.releases


def test_directory_is_deleted_by_its_last_user(fake):
    backend = AneBackend(ane_target())
    first = backend.new_model(MIL, {})
    second = backend.new_model(MIL, {})  # same MIL text: same identifier, same directory
    assert first.directory == second.directory
    first.release()
    assert second.directory.is_dir()
    second.release()
    assert not second.directory.exists()


def test_artifacts_install_and_weight_writes(fake, tmp_path):
    backend = AneBackend(ane_target())
    files = _files(tmp_path, {"weights/w.bin": b"old weights"})
    donor = backend.new_model(MIL, files)
    with pytest.raises(BackendError, match="compile it first"):
        donor.artifacts()
    (donor.directory / "net.plist").write_bytes(b"<plist/>")  # what a compile leaves behind
    artifacts = donor.artifacts()
    assert artifacts == {"net.plist": b"<plist/>"}

    # Orion's recipe in a fresh directory: donor's net.plist, data rebuilt as a byte copy of the weight file
    fresh = tmp_path / "fresh"
    fake.temp = fresh
    fresh.mkdir()
    new_files = _files(tmp_path / "n", {"weights/w.bin": b"new weights"})
    model = backend.new_model(MIL, new_files)
    model.install_artifacts(artifacts)
    assert (model.directory / "net.plist").read_bytes() == b"<plist/>"
    assert (model.directory / "data").read_bytes() == b"new weights"
    with pytest.raises(BackendError, match="net.plist"):
        model.install_artifacts({})

    newer = _files(tmp_path / "m", {"@model_path/weights/w.bin": b"newer"})
    model.write_weights(newer)
    assert (model.directory / "weights/w.bin").read_bytes() == b"newer"
    assert (model.directory / "data").read_bytes() == b"newer"
    with pytest.raises(WeightFileError, match="weights/other.bin"):
        model.write_weights(_files(tmp_path / "o", {"weights/other.bin": b"x"}))


def test_several_weight_files_refuse_reuse_instead_of_guessing(fake, tmp_path):
    backend = AneBackend(ane_target())
    model = backend.new_model(MIL, _files(tmp_path, {"weights/a.bin": b"a", "weights/b.bin": b"b"}))
    with pytest.raises(BackendError, match="weight_layout='single'"):
        model.install_artifacts({"net.plist": b"<plist/>"})
    with pytest.raises(BackendError, match="weight_layout='single'"):
        model.write_weights(_files(tmp_path / "n", {"weights/a.bin": b"A"}))
    assert (model.directory / "weights/a.bin").read_bytes() == b"a"  # nothing written


def test_iosurface_buffer_locks_for_every_access(fake):
    backend = AneBackend(ane_target())
    surface = backend.new_surface(64)
    [props] = [v[1] for v in fake.objects.values() if isinstance(v, tuple) and v[0] == "IOSurface"]
    assert props == ane.surface_properties(64)
    tensor = Tensor((1, 4, 1, 8), "fp16", surface=surface)
    x = np.arange(32, dtype=np.float16).reshape(1, 4, 1, 8)
    tensor.write(x)
    np.testing.assert_array_equal(tensor.read(), x)
    np.testing.assert_array_equal(fake.surfaces[surface.ref].view(np.float16), x.reshape(-1))
    assert fake.surface_log == [("lock", surface.ref, 0), ("unlock", surface.ref, 0),
                                ("lock", surface.ref, 1), ("unlock", surface.ref, 1)]
    with surface.lock(read_only=True) as view:
        assert not view.flags.writeable
    ref = surface.ref
    surface.close()
    surface.close()
    assert [e for e in fake.surface_log if e[0] == "CFRelease"] == [("CFRelease", ref)]
    with pytest.raises(BindingError, match="closed"):
        with surface.lock():
            pass
    with pytest.raises(BindingError):
        backend.new_surface(0)


def test_describe_records_chip_and_os_build(fake):
    facts = AneBackend(ane_target()).describe()
    assert facts["backend"] == "ane" and facts["chip"] == "Apple M4" and facts["macos_build"] == "24A335"


# ---------------------------------------------------------------------------------------------------------------------
# On a Mac with an ANE (pytest -m ane): the facts of reference sections 2 and 5 on the real framework

on_ane = pytest.mark.skipif(not AneBackend.available(), reason="needs macOS on Apple silicon")
SEQ = 384  # [1, 64, 1, 384] fp16 = 49,152 bytes: the surface size known to work


def _chip_target(backend: AneBackend):
    from orion.compiler.targets import get_target

    chip = backend.describe()["chip"].lower()
    return next((get_target(n) for n in ("m1", "m2", "m3", "m4", "m5") if f"apple {n}" in chip), get_target("default"))


@pytest.fixture
def device():
    backend = AneBackend(ane_target())
    backend.target = _chip_target(backend)  # M1/M2 need the verbose MIL dialect
    return backend


def _run_on_ane(device, graph, inputs: dict[str, np.ndarray], tmp_path: Path, sizes: dict[str, int] | None = None):
    """Compile ``graph`` and run it once on the ANE, surfaces bound in alphabetical order of the MIL names (sized
    ``sizes[name]`` bytes where given). Returns the ANE's outputs and the emulator's for the same MIL text."""
    from orion.compiler.compile import compile_graph
    from orion.runtime.backends.emulator import load_text

    result = compile_graph(graph, device.target)
    module = result.module
    module.write(tmp_path)
    model = device.new_model(module.text, {rel: tmp_path / rel for rel in module.weight_files})
    program = module.program
    tensors = {
        name: Tensor(t.shape, t.dtype, surface=device.new_surface(max(t.nbytes, (sizes or {}).get(name, 0))))
        for name, t in [*program.inputs, *program.output_types()]
    }
    try:
        model.compile()
        assert all((model.directory / name).is_file() for name in ane.COMPILED_ARTIFACTS)
        model.load()
        for name, value in inputs.items():
            tensors[name].write(value)
        in_names = sorted(n for n, _ in program.inputs)
        out_names = sorted(n for n, _ in program.output_types())
        model.evaluate([tensors[n].surface for n in in_names], [tensors[n].surface for n in out_names])
        got = {n: tensors[n].read() for n in out_names}
    finally:
        model.release()
        for tensor in tensors.values():
            tensor.surface.close()
    assert not model.directory.exists()
    return got, load_text(module.text, tmp_path).run(inputs)


@pytest.mark.ane
@on_ane
def test_conv_1x1_matches_the_emulator(device, tmp_path, rng):
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("conv")
    x = b.input("x", (1, 64, 1, SEQ))
    b.output("y", b.linear(x, rng.normal(0, 0.125, (64, 64)).astype(np.float16)))
    xv = rng.normal(0, 1, (1, 64, 1, SEQ)).astype(np.float16)
    got, want = _run_on_ane(device, b.graph, {"x": xv}, tmp_path)
    np.testing.assert_allclose(got["y"].astype(np.float32), want["y"].astype(np.float32), rtol=2e-3, atol=2e-3)


def _difference_graph():
    """out = zeta - alpha, with zeta declared first: only alphabetical binding gives the right sign."""
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("order")
    zeta = b.input("zeta", (1, 64, 1, SEQ))
    alpha = b.input("alpha", (1, 64, 1, SEQ))
    b.output("out", b.sub(zeta, alpha))
    return b.graph


@pytest.mark.ane
@on_ane
def test_inputs_bind_in_alphabetical_order(device, tmp_path, rng):
    a = rng.normal(0, 1, (1, 64, 1, SEQ)).astype(np.float16)
    z = rng.normal(0, 1, (1, 64, 1, SEQ)).astype(np.float16)
    got, _ = _run_on_ane(device, _difference_graph(), {"alpha": a, "zeta": z}, tmp_path)
    np.testing.assert_array_equal(got["out"], (z.astype(np.float32) - a.astype(np.float32)).astype(np.float16))


@pytest.mark.ane
@on_ane
def test_outputs_bind_in_alphabetical_order(device, tmp_path, rng):
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("outs")
    x = b.input("x", (1, 64, 1, SEQ))
    b.output("zz", b.mul(x, 2.0))  # declared first
    b.output("aa", b.add(x, 1.0))
    xv = rng.integers(-8, 8, (1, 64, 1, SEQ)).astype(np.float16)  # exact in fp16 either way
    got, _ = _run_on_ane(device, b.graph, {"x": xv}, tmp_path)
    np.testing.assert_array_equal(got["aa"], xv + np.float16(1))
    np.testing.assert_array_equal(got["zz"], xv * np.float16(2))


@pytest.mark.ane
@on_ane
def test_unequal_input_surfaces_fail_with_status_1d(device, tmp_path, rng):
    x = {n: rng.normal(0, 1, (1, 64, 1, SEQ)).astype(np.float16) for n in ("alpha", "zeta")}
    with pytest.raises(EvaluationError) as info:
        _run_on_ane(device, _difference_graph(), x, tmp_path, sizes={"zeta": 2 * 64 * SEQ + 16384})
    assert info.value.status == 0x1D


@pytest.mark.ane
@on_ane
def test_inputs_padded_to_equal_sizes_are_read_packed_from_byte_zero(device, tmp_path, rng):
    x = {n: rng.normal(0, 1, (1, 64, 1, SEQ)).astype(np.float16) for n in ("alpha", "zeta")}
    padded = 2 * 64 * SEQ + 16384
    got, _ = _run_on_ane(device, _difference_graph(), x, tmp_path, sizes={"alpha": padded, "zeta": padded})
    want = (x["zeta"].astype(np.float32) - x["alpha"].astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(got["out"], want)


@pytest.mark.ane
@on_ane
def test_a_surface_below_the_minimum_fails_at_evaluation(device, tmp_path, rng):
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("small")
    x = b.input("x", (1, 768, 1, 1), "fp32")  # [768, 1] fp32 = 3,072 bytes: reported to fail (Orion #4)
    b.output("y", b.cast(b.relu(b.cast(x, "fp16")), "fp32"))
    with pytest.raises(EvaluationError):
        _run_on_ane(device, b.graph, {"x": rng.normal(0, 1, (1, 768, 1, 1)).astype(np.float32)}, tmp_path)
