"""The ANE bridge: everything decidable without a Mac is checked here against the reference's facts (section 2 and 5
of the team's ANE notes, Apple's public headers) written out independently below; the bridge's real ctypes code runs
against a stand-in of the frameworks (``tests/runtime/standin``) that checks every call as the reference says the
frameworks need it; tests marked ``ane`` run the real framework and need macOS on Apple silicon."""

from __future__ import annotations

import ast
import ctypes
import subprocess
import sys
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
    "description": "NSString* (id, SEL)",
    "userInfo": "NSDictionary* (id, SEL)",
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


def test_error_text_carries_the_user_info_once():
    detail = "{NSLocalizedDescription = ANECCompile() FAILED; compilerLog = line 3: bad op; }"
    full = f'Error Domain=com.apple.appleneuralengine.compiler Code=1 "ANECCompile() FAILED" UserInfo={detail}'
    with_info = ane.describe_error(NSErrorInfo("com.apple.appleneuralengine.compiler", 1, full, detail))
    assert with_info.count("line 3: bad op") == 1
    terse = ane.describe_error(NSErrorInfo("com.apple.appleneuralengine.compiler", 1, "ANECCompile() FAILED", detail))
    assert "ANECCompile() FAILED" in terse and "line 3: bad op" in terse  # a description without it gets it added


def test_call_failure_names_the_program(tmp_path):
    info = NSErrorInfo("com.apple.appleneuralengine", 10, "verifyBundleAtPath: invalid model")
    err = ane.call_failure("compile", "ABC", tmp_path / "ABC", info)
    assert type(err) is BackendError
    text = str(err)
    assert "compile" in text and "verifyBundleAtPath: invalid model" in text and "code 10" in text
    assert str(tmp_path / "ABC" / "model.mil") in text


# ---------------------------------------------------------------------------------------------------------------------
# The real bridge through the stand-in of the frameworks (tests/runtime/standin): every call goes through ctypes into
# a C library that checks its arguments as the reference says the frameworks need, and runs the emulator on evaluate.

SEQ = 384  # [1, 64, 1, 384] fp16 = 49,152 bytes: the surface size known to work
NBYTES = 64 * SEQ * 2


def ane_target():
    from orion.compiler.targets import get_target

    return get_target("default")


def _graph(rng, name: str = "lin", bias: bool = True):
    """y = x W^T (+ b): one weight file without the bias (the layout whose compiled ``data`` is reported)."""
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder(name)
    x = b.input("x", (1, 64, 1, SEQ))
    b.output("y", b.linear(x, rng.normal(0, 0.125, (64, 64)), rng.normal(0, 0.5, 64) if bias else None))
    return b.graph


def _difference_graph():
    """out = zeta - alpha, with zeta declared first: only alphabetical binding gives the right sign."""
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("order")
    zeta = b.input("zeta", (1, 64, 1, SEQ))
    alpha = b.input("alpha", (1, 64, 1, SEQ))
    b.output("out", b.sub(zeta, alpha))
    return b.graph


def _emitted(graph, directory: Path):
    """The MIL text and weight files of ``graph`` as the compiler writes them into ``directory``."""
    from orion.compiler.compile import compile_graph

    module = compile_graph(graph, ane_target()).module
    module.write(directory)
    return module.text, {rel: directory / rel for rel in module.weight_files}


def _run(model, backend, inputs: list[np.ndarray], out_count: int = 1, dtype=np.float16) -> list[np.ndarray]:
    """One evaluation on fresh surfaces; the outputs as ``dtype`` [1, 64, 1, SEQ] arrays."""
    ins = []
    for x in inputs:
        t = Tensor(x.shape, "fp16", surface=backend.new_surface(NBYTES))
        t.write(x)
        ins.append(t)
    outs = [Tensor((1, 64, 1, SEQ), "fp16", surface=backend.new_surface(NBYTES)) for _ in range(out_count)]
    model.evaluate([t.surface for t in ins], [t.surface for t in outs])
    result = [t.read().astype(dtype) for t in outs]
    for t in (*ins, *outs):
        t.surface.close()
    return result


def _program(graph, backend: str, **kwargs):
    from orion.runtime import Program
    from orion.runtime.cache import ProgramCache

    kwargs.setdefault("cache", ProgramCache(None))
    return Program.from_graph(graph, backend=backend, **kwargs)


def test_the_seam_makes_the_real_availability_check_pass(ane_standin, monkeypatch):
    assert ane.this_machine() == ("darwin", "arm64", True)  # what the system library says, through the seam
    assert AneBackend.available()
    facts = AneBackend(ane_target()).describe()
    assert facts["backend"] == "ane" and facts["chip"] == "Apple M4 (Orion stand-in)"
    assert facts["macos_build"] == "25A000-standin"
    monkeypatch.delenv("ORION_ANE_ROOT")
    assert ane.this_machine()[2] is False
    assert AneBackend.available() is (sys.platform == "darwin")


def test_programs_run_through_the_bridge_as_on_the_emulator(ane_standin, rng):
    alpha, zeta = rng.normal(0, 1, (2, 1, 64, 1, SEQ))
    x = rng.normal(0, 1, (1, 64, 1, SEQ))
    live = ane_standin.live_objects()
    results = {}
    for backend in ("emulator", "ane"):
        with _program(_difference_graph(), backend) as p:
            results[backend, "order"] = p.run({"zeta": zeta, "alpha": alpha})["out"]
        with _program(_graph(np.random.default_rng(7)), backend) as p:
            results[backend, "linear"] = p.run({"x": x})["y"]
    for name in ("order", "linear"):
        np.testing.assert_array_equal(results["ane", name], results["emulator", name])
    np.testing.assert_allclose(results["ane", "order"], zeta - alpha, atol=4e-3)  # bound alphabetically
    assert ane_standin.live_objects() == live and ane_standin.failures() == 0


def test_the_model_directory_holds_the_files_before_compiling(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    text, files = _emitted(_graph(rng, bias=False), tmp_path / "m")
    model = backend.new_model(text, files)
    assert model.directory == ane_standin.temp / model.identifier  # NSTemporaryDirectory()/<hexStringIdentifier>
    assert (model.directory / "model.mil").read_bytes() == text.encode()
    [(rel, source)] = files.items()
    assert (model.directory / rel).read_bytes() == source.read_bytes()
    assert backend.new_model(text, files).identifier == model.identifier  # same text and weight keys
    assert backend.new_model(text + "\n", files).identifier != model.identifier
    model.compile()
    assert model.artifacts()["data"] == source.read_bytes()  # the compiled copy of the one weight file

    again = backend.new_model(text, files)
    (again.directory / "model.mil").unlink()  # the framework compiles the FILES: they must be there first
    with pytest.raises(BackendError, match="model.mil is missing"):
        again.compile()


def test_a_weightless_program_compiles_with_an_empty_weights_dictionary(ane_standin):
    backend = AneBackend(ane_target())
    text, files = _emitted(_difference_graph(), Path(ane_standin.temp) / "src")
    assert files == {}
    model = backend.new_model(text, files)  # a nil dictionary would abort the process (Orion #11)
    model.compile()
    assert set(model.artifacts()) == {"net.plist", "data"}  # every artifact, weightless programs included
    model.load()
    a, z = np.full((2, 1, 64, 1, SEQ), 3.0, np.float16)
    z += 2
    [out] = _run(model, backend, [a, z])
    np.testing.assert_array_equal(out, z - a)
    model.release()


def test_a_compile_error_carries_the_full_nserror_and_keeps_the_directory(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    text, files = _emitted(_graph(rng), tmp_path / "m")
    model = backend.new_model(text.replace(" = conv(", " = convolve(", 1), files)
    with pytest.raises(BackendError) as info:
        model.compile()
    message = str(info.value)
    assert "ANECCompile() FAILED" in message and "com.apple.appleneuralengine.compiler code 1" in message
    assert "unknown op 'convolve'" in message  # the detail the framework put in userInfo
    assert "NSLocalizedFailureReason" in message
    assert str(model.directory / "model.mil") in message
    model.release()
    assert (model.directory / "model.mil").is_file()  # kept for inspection: the message points there


def test_evaluate_reuses_one_request_per_surface_list_and_bounds_the_cache(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    model = backend.new_model(*_emitted(_graph(rng), tmp_path / "m"))
    with pytest.raises(BackendError, match="load"):
        model.evaluate([backend.new_surface(NBYTES)], [backend.new_surface(NBYTES)])
    model.compile()
    model.load()
    inputs = [backend.new_surface(NBYTES) for _ in range(ane.MAX_CACHED_REQUESTS + 3)]
    y = backend.new_surface(NBYTES)
    live = []
    for surface in [inputs[0], *inputs]:
        model.evaluate([surface], [y])
        live.append(ane_standin.live_objects())
    assert live[1] == live[0]  # the same surfaces again: the same request
    per_request = live[2] - live[1]
    assert per_request > 0
    assert live[ane.MAX_CACHED_REQUESTS] - live[0] == per_request * (ane.MAX_CACHED_REQUESTS - 1)
    assert live[-1] == live[ane.MAX_CACHED_REQUESTS]  # bounded: the oldest request is released
    model.release()
    for surface in (*inputs, y):
        surface.close()
    assert ane_standin.failures() == 0


def test_requests_are_rebuilt_after_an_unload_and_load(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    model = backend.new_model(*_emitted(_graph(rng), tmp_path / "m"))
    model.compile()
    model.load()
    x, y = backend.new_surface(NBYTES), backend.new_surface(NBYTES)
    model.evaluate([x], [y])
    model.unload()
    model.load()
    model.evaluate([x], [y])  # a request of the earlier load would be refused
    model.release()
    assert ane_standin.failures() == 0


def test_unequal_or_small_surfaces_fail_with_status_1d(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    model = backend.new_model(*_emitted(_difference_graph(), tmp_path / "m"))
    model.compile()
    model.load()
    surfaces = [backend.new_surface(n) for n in (NBYTES, NBYTES + 64, NBYTES)]
    with pytest.raises(EvaluationError) as info:
        model.evaluate(surfaces[:2], surfaces[2:])  # checked by the stand-in: one allocation size per side
    assert info.value.status == 0x1D and STATUS_HINTS[0x1D] in str(info.value)
    small = [backend.new_surface(4096) for _ in range(3)]
    with pytest.raises(EvaluationError) as info:
        model.evaluate(small[:2], small[2:])  # checked by the chip (the emulator): below the minimum
    assert info.value.status == 0x1D
    model.release()


def test_surfaces_the_ane_cannot_see_are_refused(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    model = backend.new_model(*_emitted(_graph(rng), tmp_path / "m"))
    model.compile()
    model.load()
    good = backend.new_surface(NBYTES)
    with pytest.raises(BindingError, match="new_surface"):
        model.evaluate([Surface(NBYTES)], [good])
    closed = backend.new_surface(NBYTES)
    closed.close()
    with pytest.raises(BindingError, match="closed"):
        model.evaluate([good], [closed])
    with pytest.raises(BindingError, match="at least one"):
        model.evaluate([], [good])
    model.release()


def test_release_unloads_releases_everything_and_deletes_the_directory(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    live = ane_standin.live_objects()
    model = backend.new_model(*_emitted(_graph(rng), tmp_path / "m"))
    model.compile()
    model.load()
    _run(model, backend, [rng.normal(0, 1, (1, 64, 1, SEQ))])
    model.release()  # the stand-in reports a model released while loaded
    assert ane_standin.failures() == 0 and ane_standin.live_objects() == live
    assert not model.directory.exists()
    model.release()  # twice is harmless
    with pytest.raises(BackendError, match="released"):
        model.compile()

    kept = backend.new_model(*_emitted(_graph(rng), tmp_path / "k"))
    kept.release(remove_directory=False)  # never loaded: no unload either
    assert (kept.directory / "model.mil").is_file()
    assert ane_standin.failures() == 0 and ane_standin.live_objects() == live


def test_directory_is_deleted_by_its_last_user(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    text, files = _emitted(_graph(rng), tmp_path / "m")
    first, second = backend.new_model(text, files), backend.new_model(text, files)
    assert first.directory == second.directory
    first.release()
    assert second.directory.is_dir()
    second.release()
    assert not second.directory.exists()


def test_a_failing_unload_is_a_warning_and_releases_everything(ane_standin, rng):
    live = ane_standin.live_objects()
    x = rng.normal(0, 1, (1, 64, 1, SEQ))
    with pytest.warns(RuntimeWarning, match="device busy"):
        with _program(_graph(rng), "ane") as p:
            y = p.run({"x": x})["y"]
            directory = p._model.directory
            ane_standin.fail_next("unloadWithQoS:error:", "device busy")
    assert np.isfinite(y).all() and not directory.exists()
    assert ane_standin.live_objects() == live


def test_orion_run_writes_its_outputs_before_cleanup(ane_standin, rng, tmp_path):
    from click.testing import CliRunner

    from orion.cli.main import cli

    _emitted(_graph(rng), tmp_path / "model")
    np.savez(tmp_path / "in.npz", x=rng.normal(0, 1, (1, 64, 1, SEQ)).astype(np.float32))
    outputs = {}
    for backend in ("emulator", "ane"):
        out = tmp_path / f"{backend}.npz"
        run = ["run", str(tmp_path / "model"), "--inputs", str(tmp_path / "in.npz"), "--out", str(out),
               "--backend", backend]
        if backend == "ane":
            ane_standin.fail_next("unloadWithQoS:error:", "device busy")
            with pytest.warns(RuntimeWarning, match="device busy"):
                result = CliRunner().invoke(cli, run)
        else:
            result = CliRunner().invoke(cli, run)
        assert result.exit_code == 0, result.output
        with np.load(out) as got:
            outputs[backend] = got["y"]
    # the refused unload, then the release of a model still loaded: all a caller can do after a failed unload
    assert ane_standin.failures() == 2 and "released while loaded" in ane_standin.last_failure()
    np.testing.assert_array_equal(outputs["ane"], outputs["emulator"])


@pytest.mark.parametrize("strategy", ["patch", "reload", "recompile"])
def test_weight_updates_give_the_outputs_of_a_fresh_compile(ane_standin, rng, strategy):
    from orion.ir.builder import GraphBuilder

    def graph(w):
        b = GraphBuilder("upd")
        x = b.input("x", (1, 64, 1, SEQ))
        b.output("y", b.linear(x, w, name="fc"))
        return b.graph

    old, new = rng.normal(0, 0.125, (2, 64, 64))
    x = rng.normal(0, 1, (1, 64, 1, SEQ))
    with _program(graph(new), "ane") as fresh:
        want = fresh.run({"x": x})["y"]
    compiles = ane_standin.compiles()
    with _program(graph(old), "ane", weight_update=strategy) as p:
        before = p.run({"x": x})["y"]
        p.update_weights({"fc.weight": new})
        np.testing.assert_array_equal(p.run({"x": x})["y"], want)
    assert not np.array_equal(before, want)
    assert ane_standin.compiles() - compiles == (2 if strategy == "recompile" else 1)
    assert ane_standin.failures() == 0


def test_several_weight_files_refuse_reuse_instead_of_guessing(ane_standin, rng, tmp_path):
    backend = AneBackend(ane_target())
    text, files = _emitted(_graph(rng), tmp_path / "m")  # weight and bias: two files
    assert len(files) == 2
    model = backend.new_model(text, files)
    with pytest.raises(BackendError, match="weight_layout='single'"):
        model.install_artifacts({"net.plist": b"<plist/>", "data": b""})
    with pytest.raises(BackendError, match="weight_layout='single'"):
        model.write_weights({next(iter(files)): tmp_path / "m" / next(iter(files))})
    with pytest.raises(WeightFileError, match="weights/other.bin"):
        model.write_weights(_files(tmp_path, {"weights/other.bin": b"x"}))
    model.release()


def test_iosurface_buffer_locks_for_every_access(ane_standin):
    backend = AneBackend(ane_target())
    live = ane_standin.live_objects()
    surface = backend.new_surface(NBYTES)
    assert ane_standin.live_objects() == live + 1  # the IOSurface; its property dictionary and numbers are gone
    tensor = Tensor((1, 64, 1, SEQ), "fp16", surface=surface)
    x = np.arange(64 * SEQ, dtype=np.float32).reshape(1, 64, 1, SEQ) % 2048
    tensor.write(x)
    np.testing.assert_array_equal(tensor.read(), x.astype(np.float16))
    with surface.lock(read_only=True) as view:
        assert not view.flags.writeable
    surface.close()
    surface.close()
    assert ane_standin.live_objects() == live and ane_standin.failures() == 0  # locks paired, one CFRelease
    with pytest.raises(BindingError, match="closed"):
        with surface.lock():
            pass
    with pytest.raises(BindingError):
        backend.new_surface(0)


def test_ten_thousand_evaluations_leak_nothing(ane_standin):
    from orion.ir.builder import GraphBuilder

    b = GraphBuilder("tiny")
    x = b.input("x", (1, 8, 1, 32))
    b.output("y", b.relu(x))
    with _program(b.graph, "ane") as p:
        p.run({"x": np.ones((1, 8, 1, 32))})
        live = ane_standin.live_objects()
        for _ in range(10_000):
            p.evaluate()
        assert ane_standin.live_objects() == live
    assert ane_standin.failures() == 0


def test_arguments_that_would_raise_in_objective_c_are_refused_first(ane_standin):
    rt = ane.runtime()
    with rt.pool():
        with pytest.raises(TypeError, match="None"):
            rt.plist({"a": None})
        with pytest.raises(TypeError, match="None"):
            rt.plist([1, None])
        with pytest.raises(TypeError, match="NUL"):
            rt.string("a\0b")
        with pytest.raises(BackendError, match="nil"):
            rt.array([0])
    assert ane_standin.failures() == 0


_ABORTS = {
    "nil in a dictionary": ("rt.send(rt.cls('NSDictionary'), 'dictionaryWithObjects:forKeys:count:', "
                            "(ctypes.c_void_p * 1)(None), (ctypes.c_void_p * 1)(rt.string('k')), 1)",
                            "attempt to insert nil object"),
    "MIL text as NSString": ("rt.send(rt.cls('_ANEInMemoryModelDescriptor'), 'modelWithMILText:weights:optionsPlist:', "
                             "rt.string('program'), rt.plist({}), None)", "MIL text must be NSData"),
    "unrecognized selector": ("rt.send(rt.string('x'), 'code')", "unrecognized selector"),
}


@pytest.mark.parametrize("case", sorted(_ABORTS))
def test_what_objective_c_raises_on_kills_the_process(ane_standin, case):
    """The stand-in dies as an uncaught Objective-C exception would: the bridge must never get there."""
    call, message = _ABORTS[case]
    code = f"import ctypes\nfrom orion.runtime.backends import ane\nrt = ane.runtime()\nrt.pool().__enter__()\n{call}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode < 0 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The program cache on the ANE: what a compile leaves, and loading it in another process


def _cached_program(graph, cache, target):
    from orion.runtime import Program

    return Program.from_graph(graph, backend="ane", cache=cache, target=target)


@pytest.mark.parametrize("weights", ["one weight file", "none"])
def test_loading_a_compile_cached_by_another_process_is_a_target_setting(ane_standin, rng, tmp_path, weights):
    from orion.runtime.cache import ProgramCache

    graph = _graph(rng, bias=False) if weights == "one weight file" else _difference_graph()
    feed = {v.name: rng.normal(0, 1, (1, 64, 1, SEQ)) for v in graph.inputs}
    with _cached_program(graph, ProgramCache(tmp_path / "c"), ane_target()) as first:
        want = first.run(feed)
    assert first.compiles == 1
    with _cached_program(graph, ProgramCache(tmp_path / "c"), ane_target()) as off:  # "another process"
        assert off.run(feed).keys() == want.keys()
    assert (off.compiles, off.cache_hits) == (1, 0)  # off by default: compiled again
    on = ane_target().with_overrides(load_disk_cache=True)
    with _cached_program(graph, ProgramCache(tmp_path / "c"), on) as p:
        for name, value in p.run(feed).items():
            np.testing.assert_array_equal(value, want[name])
    assert (p.compiles, p.cache_hits) == (0, 1)
    assert ane_standin.failures() == 0


def test_a_cached_compile_that_fails_to_load_is_compiled_again_and_replaced(ane_standin, rng, tmp_path):
    from orion.runtime.cache import ProgramCache

    graph, x = _graph(rng, bias=False), rng.normal(0, 1, (1, 64, 1, SEQ))
    on = ane_target().with_overrides(load_disk_cache=True)
    with _cached_program(graph, ProgramCache(tmp_path / "c"), on) as first:
        want = first.run({"x": x})["y"]
        key = first._key()
    cache = ProgramCache(tmp_path / "c")
    damaged = dict(cache.get(key))
    damaged["net.plist"] = b"from another OS build"
    cache.disk.put(key, damaged, replace=True)
    with pytest.warns(RuntimeWarning, match="did not load"):
        with _cached_program(graph, ProgramCache(tmp_path / "c"), on) as p:
            np.testing.assert_array_equal(p.run({"x": x})["y"], want)
    assert (p.compiles, p.cache_hits) == (1, 0)
    assert ProgramCache(tmp_path / "c").get(key)["net.plist"] != damaged["net.plist"]  # the entry was replaced
    with _cached_program(graph, ProgramCache(tmp_path / "c"), on) as again:
        again.run({"x": x})
    assert (again.compiles, again.cache_hits) == (0, 1)


@pytest.mark.parametrize("problem", ["no net.plist", "unwritable cache"])
def test_a_failed_cache_write_never_throws_away_a_working_compile(ane_standin, rng, tmp_path, problem):
    from orion.runtime.cache import ProgramCache

    root = tmp_path / "c"
    if problem == "no net.plist":
        ane_standin.set_option("skip_net_plist", 1)
    else:
        root.parent.joinpath("file").write_bytes(b"")
        root = root.parent / "file" / "cache"  # under a file: nothing can be created there
    x = rng.normal(0, 1, (1, 64, 1, SEQ))
    with pytest.warns(RuntimeWarning, match="not cached"):
        with _cached_program(_graph(rng), ProgramCache(root), ane_target()) as p:
            y = p.run({"x": x})["y"]
    assert p.compiles == 1 and np.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------------------------
# On a Mac with an ANE (pytest -m ane): the facts of reference sections 2 and 5 on the real framework

on_ane = pytest.mark.skipif(not AneBackend.available(), reason="needs macOS on Apple silicon")


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
    # 3,072 bytes, as the [768, 1] fp32 surface reported to fail (Orion #4); fp16, which every chip compiles (M1
    # rejects fp32 I/O at compile, which would fail before the evaluation this is about)
    x = b.input("x", (1, 1536, 1, 1))
    b.output("y", b.relu(x))
    with pytest.raises(EvaluationError):
        _run_on_ane(device, b.graph, {"x": rng.normal(0, 1, (1, 1536, 1, 1)).astype(np.float16)}, tmp_path)


#: The tests above that need a real ANE (``pytest -m ane``).
ANE_TESTS = [f for name, f in list(globals().items())
             if name.startswith("test_") and any(m.name == "ane" for m in getattr(f, "pytestmark", []))]


@pytest.mark.parametrize("chip", ["m1", "m4"])
@pytest.mark.parametrize("ane_test", ANE_TESTS, ids=lambda f: f.__name__)
def test_the_ane_tests_pass_on_the_standins_chip_of_each_profile(ane_standin, monkeypatch, tmp_path, rng, ane_test,
                                                                  chip):
    """What the ``ane`` tests assume of the chip holds on the oldest and a newer profile (M1 rejects fp32 I/O at
    compile): a test that would fail for that reason on someone's Mac fails here first."""
    from orion.compiler.targets import get_target

    monkeypatch.setenv("ORION_STANDIN_TARGET", chip)  # the stand-in's chip is the one the profile describes
    ane_test(AneBackend(get_target(chip)), tmp_path, rng)
