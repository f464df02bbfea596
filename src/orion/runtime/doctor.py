"""``orion doctor``: small probes that settle, on the machine at hand, what the public record leaves open about the ANE.

The ANE reference lists facts that sources contest (the CONFLICT items: concat, gelu, silu, reloading weights), that
one report alone makes (the 16-constant limit, rsqrt, the minimum surface) and numerics the emulator can only guess
(section 9). Each is a :class:`Target` field or a :class:`~orion.runtime.backends.numerics.Numerics` setting. A probe
is a tiny MIL program that decides one of them: it returns raw observations, and a pure function maps them to a
verdict and the setting's value.

Every probe runs in a child process (``python -m orion.runtime.doctor --child ID --backend NAME``, one JSON line on
stdout), because the private framework can crash or hang the process that calls it: a crash or a timeout becomes
the verdict ``crashed`` or ``timeout``, never the end of the user's process. With an ANE present each probe runs on
the ANE and on the emulator and the two are compared; elsewhere the emulator alone shows what Orion assumes.

On the emulator, compile-time facts are what the target profile assumes: a program that the constraint catalog
rejects for the target (for the catalog entries the probe settles) counts as a failed compile, since the emulator
itself runs any op it knows. Binding, surface and numerics facts come from the emulator's own behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from orion import __version__
from orion.compiler.targets import Target, get_target
from orion.errors import BackendError, SettingsError
from orion.fileio import atomic_write

#: Prefix of the one line a child prints; anything else on stdout (framework chatter) is ignored.
RESULT_MARK = "ORION-DOCTOR-RESULT "
NO_ANE_MESSAGE = ("No Apple Neural Engine here: the probes ran on the emulator, which shows what Orion assumes, "
                  "not what your chip does.")
EMULATOR_ONLY_MESSAGE = ("The probes ran on the emulator only (--backend emulator): they show what Orion assumes, "
                         "not what your chip does.")
BACKEND_CHOICES = ("auto", "ane", "emulator")


@dataclass(frozen=True)
class Probe:
    """One question for the hardware. ``settles`` names catalog ids, :class:`Target` fields and ``numerics.<name>``
    settings; ``run`` returns JSON-ready observations; ``verdict`` maps them to ``(verdict, {setting: value})``
    (an empty dict when the observations decide no setting). Hidden probes run only when asked for by id."""

    id: str
    settles: tuple[str, ...]
    question: str
    run: Callable[[Any], dict]
    verdict: Callable[[dict], tuple[str, dict]]
    hidden: bool = False


PROBES: dict[str, Probe] = {}
#: Where a child writes its scratch files: a directory its parent owns and removes even if the child crashes.
_scratch: Path | None = None


def register(probe: Probe) -> Probe:
    if probe.id in PROBES:
        raise SettingsError(f"probe id {probe.id!r} is registered twice; give the new probe another id")
    PROBES[probe.id] = probe
    return probe


# ---------------------------------------------------------------------------------------------------------------------
# JSON-ready numbers: inf and NaN as strings, so reports stay strict JSON.


def _num(x: Any) -> Any:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _nums(a: Any) -> list:
    return [_num(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def jsonable(obj: Any) -> Any:
    """Observations as strict JSON: numpy scalars to Python, non-finite floats to strings, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _decode(values: Any) -> np.ndarray:
    items = values if isinstance(values, list) else [values]
    return np.asarray([float(v) if isinstance(v, str) else v for v in items], dtype=np.float64)


def _error(msg: BaseException) -> str:
    return " ".join(f"{type(msg).__name__}: {msg}".split())[:2000]


# ---------------------------------------------------------------------------------------------------------------------
# The low-level model life: compile, load, evaluate on surfaces sized here, so the runtime's planner hides nothing.


def _emit(builder, backend, weight_layout: str = "per-tensor"):
    from orion.mil.emit import emit

    return emit(builder.graph, version=backend.target.mil_version, weight_layout=weight_layout)


def _without_param(module, var: str, param: str):
    """``module`` with parameter ``param`` of statement ``var`` removed (with its const, if nothing else reads it):
    the emitter always spells attribute defaults, but some probes need the form that leaves them out."""
    import copy

    from orion.mil.emit import MILModule
    from orion.mil.program import VarRef

    program = copy.deepcopy(module.program)
    ref = program.statement(var).args.pop(param)
    if isinstance(ref, VarRef):
        readers = [st for st in program.statements for arg in st.args.values()
                   if ref in (arg if isinstance(arg, tuple) else (arg,))]
        if not readers:
            program.statements = [st for st in program.statements if st.var != ref.name]
    return MILModule(program, program.to_text(), module.weight_files, module.weight_names)


def _assumed_rejections(backend, program, catalog: Sequence[str]) -> list[str]:
    """On the emulator: the catalog entries (among ``catalog``) the target says the ANE compiler rejects."""
    if backend.name != "emulator" or not catalog:
        return []
    from orion.compiler.constraints import check_program

    return [str(v) for v in check_program(program, backend.target) if v.constraint in catalog and v.severity == "error"]


@contextlib.contextmanager
def _loaded(backend, module, catalog: Sequence[str] = ()) -> Iterator[tuple[Any, dict]]:
    """Yield ``(model or None, info)``: info says how far compile and load got, with times and the error text."""
    info: dict[str, Any] = {"compiled": False, "loaded": False, "error": None, "stage": None, "ms": {}}
    assumed = _assumed_rejections(backend, module.program, catalog)
    if assumed:
        info.update(stage="compile", assumed=True, error=f"target {backend.target.name!r} assumes the ANE compiler "
                                                           f"rejects this: {'; '.join(assumed)}")
        yield None, info
        return
    with tempfile.TemporaryDirectory(prefix="model-", dir=_scratch) as tmp:
        module.write(tmp)
        model = None
        try:
            stage = "create"
            model = backend.new_model(module.text, {rel: Path(tmp) / rel for rel in module.weight_files})
            for stage, call in (("compile", model.compile), ("load", model.load)):
                t0 = time.perf_counter()
                call()
                info["ms"][stage] = round((time.perf_counter() - t0) * 1e3, 3)
                info["compiled" if stage == "compile" else "loaded"] = True
        except Exception as exc:
            info.update(stage=stage, error=_error(exc))
        try:
            yield (model if info["loaded"] else None), info
        finally:
            if model is not None:
                with contextlib.suppress(Exception):
                    model.unload()
                model.release()


def _surface_size(types, minimum: int) -> int:
    largest = max((t.nbytes for _, t in types), default=0)
    return max(minimum, -(-largest // 64) * 64)


def _sizes(given: int | Sequence[int] | None, count: int, default: int) -> list[int]:
    if given is None:
        return [default] * count
    if isinstance(given, int):
        return [given] * count
    return list(given)


def _raw(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The bytes a surface gets: uint8 arrays as they are, others cast to the declared dtype (inf, NaN kept)."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(array.astype(dtype)).view(np.uint8).reshape(-1)


def _evaluate(backend, model, program, inputs: dict | list, input_bytes=None, output_bytes=None,
              raw: bool = False) -> dict:
    """One evaluation with raw surface I/O. ``inputs`` by MIL name (bound in sorted order) or as a list of
    arrays in surface order; sizes default to the runtime's plan (largest tensor, at least the minimum)."""
    in_types = sorted(program.inputs)
    out_types = sorted(program.output_types())
    minimum = backend.target.min_surface_bytes
    arrays = [inputs[name] for name, _ in in_types] if isinstance(inputs, dict) else list(inputs)
    in_sizes = _sizes(input_bytes, len(arrays), _surface_size(in_types, minimum))
    out_sizes = _sizes(output_bytes, len(out_types), _surface_size(out_types, minimum))
    result: dict[str, Any] = {"evaluated": False, "error": None, "status": None, "surfaces": {
        "inputs": in_sizes, "outputs": out_sizes}}
    surfaces = []
    try:
        ins = []
        for (_, t), array, size in zip(in_types, arrays, in_sizes):
            data = _raw(array, t.numpy_dtype)
            s = backend.new_surface(size)
            surfaces.append(s)
            with s.lock() as view:
                view[:] = 0
                view[: data.size] = data[: size]
            ins.append(s)
        outs = []
        for size in out_sizes:
            s = backend.new_surface(size)
            surfaces.append(s)
            with s.lock() as view:
                view[:] = 0
            outs.append(s)
        t0 = time.perf_counter()
        model.evaluate(ins, outs)
        result["ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        result["outputs"], result["raw"] = {}, {}
        for (name, t), s in zip(out_types, outs):
            with s.lock(read_only=True) as view:
                data = np.array(view, dtype=np.uint8, copy=True)
            result["outputs"][name] = data[: t.nbytes].view(t.numpy_dtype).reshape(t.shape).copy()
            if raw:
                result["raw"][name] = data
        result["evaluated"] = True
    except Exception as exc:
        result["error"] = _error(exc)
        status = getattr(exc, "status", None)
        result["status"] = None if status is None else int(status)
    finally:
        for s in surfaces:
            with contextlib.suppress(Exception):
                s.close()
    return result


def _mismatch(y: np.ndarray, ref: np.ndarray) -> float:
    """Largest |y - ref| / max(1, |ref|); equal values (inf included) count 0, any other non-finite pair inf."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    if y.shape != ref.shape:
        return math.inf
    with np.errstate(invalid="ignore", over="ignore"):
        same = (y == ref) | (np.isnan(y) & np.isnan(ref))
        err = np.where(same, 0.0, np.abs(y - ref) / np.maximum(1.0, np.abs(ref)))
    err = np.where(np.isnan(err), math.inf, err)
    return float(err.max()) if err.size else 0.0


def _attempt(backend, module, feed: dict, expected: dict[str, np.ndarray] | None, catalog: Sequence[str] = (),
             tolerance: float = 0.0) -> dict:
    """Compile, load and run one program; ``works`` when every output is within ``tolerance`` of ``expected``
    (relative to max(1, |expected|)). The outputs ride along under ``_outputs`` for the probe to read."""
    with _loaded(backend, module, catalog) as (model, info):
        obs = {k: v for k, v in info.items()}
        obs.update(evaluated=False, works=False)
        if model is None:
            return obs
        run = _evaluate(backend, model, module.program, feed)
    obs.update({k: run[k] for k in ("evaluated", "status", "surfaces")})
    if not run["evaluated"]:
        obs.update(stage="evaluate", error=run["error"])
        return obs
    obs["ms"]["evaluate"] = run["ms"]
    outputs = run["outputs"]
    if expected is not None:
        error = max((_mismatch(outputs[name], ref) for name, ref in expected.items()), default=0.0)
        obs["max_rel_error"] = _num(error)
        obs["works"] = error <= tolerance
    else:
        obs["works"] = True
    obs["_outputs"] = outputs  # dropped before the observations leave the child
    return obs


def _public(obs: dict) -> dict:
    return {k: v for k, v in obs.items() if not k.startswith("_")}


def _fp16(values) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(np.float16)


def _row(values, width: int = 32) -> np.ndarray:
    """``values`` padded with zeros to ``[1, 1, 1, width]`` fp16 (a 64-byte row)."""
    row = np.zeros(width, dtype=np.float64)
    row[: len(values)] = values
    return _fp16(row).reshape(1, 1, 1, width)


def _builder(name: str):
    from orion.ir.builder import GraphBuilder

    return GraphBuilder(name)


def _conv(b, x, w, name: str):
    """A 1x1 conv in the known-good form: every parameter a named const, no bias."""
    return b.op("conv", name=name, x=x, weight=w, strides=[1, 1], pad_type="valid", pad=[0, 0, 0, 0],
                dilations=[1, 1], groups=1)


def _matmul(b, x, y, name: str, transpose_x: bool = False):
    return b.matmul(x, y, transpose_x=transpose_x, transpose_y=False, name=name)


C, S = 768, 32  # [1, 768, 1, 32] fp16 is 49,152 bytes: the surface size known to work (ANE-04)


def _rng() -> np.random.Generator:
    return np.random.default_rng(20260306)


# ---------------------------------------------------------------------------------------------------------------------
# Compile-time facts: the CONFLICT items and single reports (each variant is its own program and compile).


def _variants_verdict(obs: dict, name: str) -> bool:
    return bool(obs["variants"].get(name, {}).get("works"))


def _run_dialect(backend) -> dict:
    x = _fp16(np.arange(C * S).reshape(1, C, 1, S) % 256 - 128)
    variants = {}
    for version in ("1.3", "1.0"):
        b = _builder("dialect")
        b.output("y", b.mul(b.input("x", (1, C, 1, S)), 2.0, name="y"))
        from orion.mil.emit import emit

        module = emit(b.graph, version=version)
        variants[version] = _public(_attempt(backend, module, {"x": x}, {"y": x.astype(np.float64) * 2},
                                             ("ANE-30",)))
    return {"target_mil_version": backend.target.mil_version, "variants": variants}


def _verdict_dialect(obs: dict) -> tuple[str, dict]:
    working = [v for v in ("1.3", "1.0") if _variants_verdict(obs, v)]
    if not working:
        return "neither dialect runs", {}
    choice = obs["target_mil_version"] if obs["target_mil_version"] in working else working[0]
    return f"program({'/'.join(working)}) runs", {"mil_version": choice}


register(Probe("mil-dialect", ("ANE-30", "mil_version"),
               "which MIL dialect compiles: program(1.3)/ios18 or the verbose program(1.0)/ios16",
               _run_dialect, _verdict_dialect))


def _run_concat(backend) -> dict:
    half = C // 2
    rng = _rng()
    a = _fp16(rng.integers(-100, 100, (1, half, 1, S)))
    bv = _fp16(rng.integers(-100, 100, (1, half, 1, S)))
    plain = np.concatenate([a, bv], axis=1).astype(np.float64)
    inter = np.stack([a, bv], axis=2).reshape(1, C, 1, S).astype(np.float64)
    variants = {}
    for name, interleave in (("no-interleave", None), ("interleave-false", False), ("interleave-true", True)):
        b = _builder("concat")
        xa, xb = b.input("a", a.shape), b.input("b", bv.shape)
        b.output("y", b.concat([xa, xb], axis=1, interleave=bool(interleave), name="y"))
        module = _emit(b, backend)
        if interleave is None:
            module = _without_param(module, "y", "interleave")
        obs = _attempt(backend, module, {"a": a, "b": bv}, None, ("ANE-01",))
        if obs["evaluated"]:
            y = obs["_outputs"]["y"].astype(np.float64)
            obs["layout"] = ("concatenated" if np.array_equal(y, plain)
                             else "interleaved" if np.array_equal(y, inter) else "other")
            obs["works"] = obs["layout"] == ("interleaved" if interleave else "concatenated")
        variants[name] = _public(obs)
    return {"variants": variants}


def _verdict_concat(obs: dict) -> tuple[str, dict]:
    if _variants_verdict(obs, "no-interleave"):
        return "concat works", {"concat": "allow"}
    if _variants_verdict(obs, "interleave-false"):
        return "concat works with interleave=", {"concat": "interleave"}
    return "concat fails", {"concat": "forbid"}


register(Probe("concat-interleave", ("ANE-01", "concat"),
               "does concat compile and give the right data, with and without a named interleave const",
               _run_concat, _verdict_concat))


def _sweep_input(low: float, high: float) -> np.ndarray:
    return _fp16(np.linspace(low, high, C * S).reshape(1, C, 1, S))


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


#: Tolerance of the activation checks: 2% of max(1, |y|), far above fp16 rounding and table error, far below garbage.
ACTIVATION_TOLERANCE = 0.02


def _activation_variants(backend, catalog: str, cases: dict) -> dict:
    """``cases``: variant -> (op name, attrs, input sweep, exact function); an attrs value None means the
    parameter is left out of the MIL text."""
    variants = {}
    for name, (op, attrs, x, exact) in cases.items():
        b = _builder(op)
        b.output("y", b.op(op, name="y", x=b.input("x", x.shape), **{k: v for k, v in attrs.items() if v}))
        module = _emit(b, backend)
        for param in (k for k, v in attrs.items() if v is None):
            module = _without_param(module, "y", param)
        obs = _attempt(backend, module, {"x": x}, {"y": exact(x.astype(np.float64))}, (catalog,),
                       ACTIVATION_TOLERANCE)
        variants[name] = _public(obs)
    return {"variants": variants}


def _run_gelu(backend) -> dict:
    x = _sweep_input(-8, 8)
    return _activation_variants(backend, "ANE-10", {
        "mode-tanh": ("gelu", {"mode": "TANH_APPROXIMATION"}, x, _gelu_tanh),
        "mode-exact": ("gelu", {"mode": "EXACT"}, x, _gelu_exact),
        "no-mode": ("gelu", {"mode": None}, x, _gelu_exact),
    })


def _verdict_gelu(obs: dict) -> tuple[str, dict]:
    works = {v: _variants_verdict(obs, v) for v in ("mode-tanh", "mode-exact", "no-mode")}
    if all(works.values()):
        return "gelu works in every form", {"gelu_native": True}
    if any(works.values()):
        return f"gelu works only as {', '.join(v for v, ok in works.items() if ok)}", {"gelu_native": False}
    return "gelu fails", {"gelu_native": False}


register(Probe("gelu-mode", ("ANE-10", "gelu_native"),
               "does the gelu op compile and match gelu (tanh mode, exact mode, no mode)", _run_gelu, _verdict_gelu))


def _run_silu(backend) -> dict:
    return _activation_variants(backend, "ANE-27", {
        "silu": ("silu", {}, _sweep_input(-12, 12), lambda x: x * _sigmoid(x))})


def _run_rsqrt(backend) -> dict:
    x = _fp16(np.geomspace(2.0 ** -10, 1000.0, C * S).reshape(1, C, 1, S))
    return _activation_variants(backend, "ANE-22", {
        "rsqrt": ("rsqrt", {}, x, lambda v: 1.0 / np.sqrt(v)),
        "pow-control": ("pow", {"y": -0.5}, x, lambda v: 1.0 / np.sqrt(v)),
    })


def _native_verdict(op: str, field_name: str) -> Callable[[dict], tuple[str, dict]]:
    def verdict(obs: dict) -> tuple[str, dict]:
        ok = _variants_verdict(obs, op)
        return (f"{op} works" if ok else f"{op} fails"), {field_name: ok}

    return verdict


register(Probe("silu", ("ANE-27", "silu_native"), "does silu compile and match x*sigmoid(x)",
               _run_silu, _native_verdict("silu", "silu_native")))
register(Probe("rsqrt", ("ANE-22", "rsqrt_native"), "does rsqrt compile and match 1/sqrt(x) (pow(x,-0.5) as control)",
               _run_rsqrt, _native_verdict("rsqrt", "rsqrt_native")))


BLOB_COUNTS = (8, 16, 17, 64)


def _run_blob_limit(backend) -> dict:
    rng = _rng()
    x = _fp16(rng.integers(-8, 9, (1, C, 1, S)))
    variants = {}
    for n in BLOB_COUNTS:
        b = _builder("blobs")
        y = b.input("x", x.shape)
        expected = x.astype(np.float64)
        for i in range(n):
            w = ((np.arange(C) + i) % 4 / 4.0).reshape(1, C, 1, 1)  # quarters: every partial sum is exact in fp16
            expected = expected + w
            y = b.add(y, b.weight(f"w{i}", w), name=f"acc{i}")
        b.output("y", y)
        variants[str(n)] = _public(_attempt(backend, _emit(b, backend), {"x": x}, {"y": expected}, ("ANE-21",)))
    return {"variants": variants}


def _ladder(obs: dict, steps: Sequence[int]) -> tuple[int | None, int | None]:
    """(largest step that works with every smaller step working, first step that fails)."""
    best, failed = None, None
    for n in steps:
        if _variants_verdict(obs, str(n)):
            if failed is None:
                best = n
        elif failed is None:
            failed = n
    return best, failed


def _verdict_blob_limit(obs: dict) -> tuple[str, dict]:
    best, failed = _ladder(obs, BLOB_COUNTS)
    if best is None:
        return f"fails already with {BLOB_COUNTS[0]} constants", {}
    if failed is None:
        return f"no limit up to {best} constants", {"max_blob_constants": best}
    return f"{best} constants work, {failed} fail", {"max_blob_constants": best}


register(Probe("blob-constant-limit", ("ANE-21", "max_blob_constants"),
               f"how many BLOBFILE constants one program may have (tries {', '.join(map(str, BLOB_COUNTS))})",
               _run_blob_limit, _verdict_blob_limit))


def _run_blobs_per_file(backend) -> dict:
    rng = _rng()
    x = _fp16(rng.integers(-8, 9, (1, C, 1, S)))
    w1, w2 = (np.arange(C) % 4 / 4.0).reshape(1, C, 1, 1), (np.arange(C) % 8 / 8.0).reshape(1, C, 1, 1)
    variants = {}
    for layout in ("single", "per-tensor"):
        b = _builder("files")
        y = b.add(b.add(b.input("x", x.shape), b.weight("w1", w1), name="a1"), b.weight("w2", w2), name="y")
        b.output("y", y)
        expected = x.astype(np.float64) + w1 + w2
        variants[layout] = _public(_attempt(backend, _emit(b, backend, layout), {"x": x}, {"y": expected},
                                            ("ANE-28",)))
    return {"variants": variants}


def _verdict_blobs_per_file(obs: dict) -> tuple[str, dict]:
    if _variants_verdict(obs, "single"):
        return "two blobs in one file work", {"blobs_per_file": "many"}
    if _variants_verdict(obs, "per-tensor"):
        return "only one blob per file works", {"blobs_per_file": "one"}
    return "neither layout works", {}


register(Probe("blobs-per-file", ("ANE-28", "blobs_per_file"),
               "may one weight file hold several blobs (M1 is reported to reject it)",
               _run_blobs_per_file, _verdict_blobs_per_file))


def _signs(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 2, shape) * 2.0 - 1.0


def _conv_case(backend, cin: int, cout: int, catalog: Sequence[str]) -> dict:
    """x = +-1, w = +-2^-6: every product is on the accumulator grid and every sum is exact in fp16."""
    rng = _rng()
    x = _fp16(_signs(rng, (1, cin, 1, S)))
    w = _signs(rng, (cout, cin, 1, 1)) / 64.0
    b = _builder("conv")
    b.output("y", _conv(b, b.input("x", x.shape), b.weight("w", w), "y"))
    expected = np.einsum("oi,is->os", w[:, :, 0, 0], x[0, :, 0, :].astype(np.float64))[None, :, None, :]
    return _public(_attempt(backend, _emit(b, backend), {"x": x}, {"y": expected}, catalog))


CONV_INPUT_CHANNELS = (16384, 32000)


def _run_conv_in(backend) -> dict:
    return {"variants": {str(c): _conv_case(backend, c, 32, ("ANE-16",)) for c in CONV_INPUT_CHANNELS}}


def _verdict_conv_in(obs: dict) -> tuple[str, dict]:
    best, failed = _ladder(obs, CONV_INPUT_CHANNELS)
    if best is None:
        return f"fails already at {CONV_INPUT_CHANNELS[0]} input channels", {}
    if failed is None:
        return f"{best} input channels work", {"max_conv_input_channels": best}
    return f"{best} input channels work, {failed} fail", {"max_conv_input_channels": best}


register(Probe("conv-32k-input-channels", ("ANE-16", "max_conv_input_channels"),
               "does a 1x1 conv with 16384 / 32000 input channels compile and compute exactly",
               _run_conv_in, _verdict_conv_in))


def _run_conv_out(backend) -> dict:
    return {"variants": {"32000": _conv_case(backend, 64, 32000, ("ANE-16", "ANE-25"))}}


def _verdict_conv_out(obs: dict) -> tuple[str, dict]:
    return ("32000 output channels work" if _variants_verdict(obs, "32000") else "32000 output channels fail"), {}


register(Probe("conv-32k-output-channels", ("ANE-16", "ANE-25"),
               "does a 1x1 conv with 32000 output channels compile (maderix) while 32K input channels fail (Orion)",
               _run_conv_out, _verdict_conv_out))


MATMUL_INNER = (17, 48, 64)


def _run_matmul_inner(backend) -> dict:
    rng = _rng()
    variants = {}
    for k in MATMUL_INNER:
        w = _signs(rng, (1, 1, 32, k)) / 64.0
        y = _fp16(_signs(rng, (1, 1, k, 32)))
        b = _builder("inner")
        b.output("z", _matmul(b, b.weight("w", w), b.input("y", y.shape), "z"))
        variants[str(k)] = _public(_attempt(backend, _emit(b, backend), {"y": y}, {"z": w @ y.astype(np.float64)},
                                            ("ANE-26",)))
    return {"variants": variants}


def _verdict_matmul_inner(obs: dict) -> tuple[str, dict]:
    works = {k: _variants_verdict(obs, str(k)) for k in MATMUL_INNER}
    if all(works.values()):
        return "every inner dimension works", {"matmul_inner_multiple": 1}
    if works[64] and not (works[17] or works[48]):
        return "only inner dimensions that are multiples of 32 work", {"matmul_inner_multiple": 32}
    return f"inner dimensions that work: {[k for k, ok in works.items() if ok]}", {}


register(Probe("matmul-inner-multiple", ("ANE-26", "matmul_inner_multiple"),
               "are matmul inner dimensions 17 and 48 (not multiples of 32) computed correctly",
               _run_matmul_inner, _verdict_matmul_inner))


# ---------------------------------------------------------------------------------------------------------------------
# I/O binding facts: surfaces sized and ordered by hand through the low-level model API.


def _single(backend, module, feed, **kwargs) -> tuple[dict, dict | None]:
    """Compile once and evaluate once; (info, evaluation) with the evaluation None when compile/load failed."""
    with _loaded(backend, module) as (model, info):
        run = _evaluate(backend, model, module.program, feed, **kwargs) if model is not None else None
    return info, run


def _eval_summary(run: dict | None) -> dict:
    if run is None:
        return {"evaluated": False}
    return {k: run[k] for k in ("evaluated", "error", "status", "surfaces")}


BIND_DECLARED = ("mid", "zeta", "alpha")


def _run_binding_inputs(backend) -> dict:
    b = _builder("bind_in")
    mid, zeta, alpha = (b.input(n, (1, C, 1, S)) for n in BIND_DECLARED)
    b.output("y", b.add(b.add(alpha, b.mul(mid, 10.0, name="m10"), name="am"), b.mul(zeta, 100.0, name="z100"),
                        name="y"))
    module = _emit(b, backend)
    feeds = [np.full((1, C, 1, S), i + 1, dtype=np.float16) for i in range(3)]  # surface i holds i+1
    info, run = _single(backend, module, feeds)
    obs = {**{k: info[k] for k in ("compiled", "loaded", "error")}, **_eval_summary(run)}
    if run is not None and run["evaluated"]:
        y = float(run["outputs"]["y"].reshape(-1)[0])
        obs["y"] = _num(y)
        digits = {"alpha": int(y) % 10, "mid": int(y) // 10 % 10, "zeta": int(y) // 100 % 10} if math.isfinite(y) \
            else {}
        by_surface = {d: n for n, d in digits.items()}
        obs["order"] = [by_surface.get(i + 1, "?") for i in range(3)]
    return obs


def _order_verdict(obs: dict, named: dict[str, Sequence[str]]) -> tuple[str, dict]:
    if "order" not in obs:
        return "did not run", {}
    for label, order in named.items():
        if list(obs["order"]) == list(order):
            return label, {}
    return f"other order {obs['order']}", {}


register(Probe("binding-order-inputs", ("ANE-19",),
               "which input surface binds to which MIL name: alphabetical or declaration order",
               _run_binding_inputs,
               lambda obs: _order_verdict(obs, {"alphabetical": sorted(BIND_DECLARED), "declaration": BIND_DECLARED})))


BIND_RETURNED = ("mid", "zeta", "alpha")
BIND_STATEMENTS = ("zeta", "alpha", "mid")


def _run_binding_outputs(backend) -> dict:
    b = _builder("bind_out")
    x = b.input("x", (1, C, 1, S))
    made = {name: b.add(x, float(i + 1), name=name) for i, name in enumerate(BIND_STATEMENTS)}
    for name in BIND_RETURNED:
        b.output(name, made[name])
    module = _emit(b, backend)
    info, run = _single(backend, module, [np.zeros((1, C, 1, S), dtype=np.float16)])
    obs = {**{k: info[k] for k in ("compiled", "loaded", "error")}, **_eval_summary(run)}
    if run is not None and run["evaluated"]:
        # outputs come back by surface position; the helper labels them by sorted name, so read them positionally
        values = [float(run["outputs"][name].reshape(-1)[0]) for name in sorted(BIND_RETURNED)]
        obs["surface_values"] = _nums(values)
        names = {float(i + 1): n for i, n in enumerate(BIND_STATEMENTS)}
        obs["order"] = [names.get(v, "?") for v in values]
    return obs


register(Probe("binding-order-outputs", ("ANE-03",),
               "which output surface receives which MIL name: alphabetical, return or statement order",
               _run_binding_outputs,
               lambda obs: _order_verdict(obs, {"alphabetical": sorted(BIND_RETURNED), "return order": BIND_RETURNED,
                                                "statement order": BIND_STATEMENTS})))


def _run_unequal(backend) -> dict:
    b = _builder("unequal")
    a, c = b.input("a", (1, C, 1, S)), b.input("b", (1, C, 1, S))
    b.output("d", b.sub(a, c, name="d"))
    b.output("s", b.add(a, c, name="s"))
    module = _emit(b, backend)
    rng = _rng()
    feed = {"a": _fp16(rng.integers(-50, 50, (1, C, 1, S))), "b": _fp16(rng.integers(-50, 50, (1, C, 1, S)))}
    expected = {"d": feed["a"].astype(np.float64) - feed["b"], "s": feed["a"].astype(np.float64) + feed["b"]}
    size = _surface_size(module.program.inputs, backend.target.min_surface_bytes)
    cases = {"equal": {}, "inputs-unequal": {"input_bytes": [size, 2 * size]},
             "outputs-unequal": {"output_bytes": [size, 2 * size]}}
    obs: dict[str, Any] = {"cases": {}}
    with _loaded(backend, module) as (model, info):
        obs.update({k: info[k] for k in ("compiled", "loaded", "error")})
        if model is not None:
            for name, sizes in cases.items():
                run = _evaluate(backend, model, module.program, feed, **sizes)
                case = _eval_summary(run)
                if run["evaluated"]:
                    case["correct"] = all(_mismatch(run["outputs"][k], v) == 0 for k, v in expected.items())
                obs["cases"][name] = case
    return obs


def _verdict_unequal(obs: dict) -> tuple[str, dict]:
    cases = obs.get("cases", {})
    if not cases.get("equal", {}).get("correct"):
        return "equal surfaces fail too", {}
    unequal = [cases[k] for k in ("inputs-unequal", "outputs-unequal")]
    if all(not c["evaluated"] for c in unequal):
        statuses = sorted({c.get("status") for c in unequal}, key=str)
        return "refused" + "".join(f" (status {s:#x})" for s in statuses if s is not None), {}
    if all(c.get("correct") for c in unequal):
        return "accepted", {}
    return "mixed: " + ", ".join(f"{k} {'ok' if cases[k].get('correct') else 'fails'}"
                                 for k in ("inputs-unequal", "outputs-unequal")), {}


register(Probe("unequal-surfaces", ("ANE-02", "ANE-18"),
               "is an evaluation with input (or output) surfaces of unequal sizes refused", _run_unequal,
               _verdict_unequal))


SURFACE_CHANNELS = (1, 4, 16, 48, 96, 192, 384, 768)  # [1, c, 1, 32] fp16: 64 bytes to 49,152 bytes


def _doubling(backend, channels: int, surface_bytes: int) -> dict:
    """y = 2x on a [1, channels, 1, 32] tensor with every surface exactly ``surface_bytes`` long."""
    b = _builder("small")
    b.output("y", b.mul(b.input("x", (1, channels, 1, S)), 2.0, name="y"))
    x = _fp16(np.arange(channels * S).reshape(1, channels, 1, S) % 64)
    info, run = _single(backend, _emit(b, backend), {"x": x}, input_bytes=surface_bytes, output_bytes=surface_bytes)
    case = {**{k: info[k] for k in ("compiled", "loaded")}, **_eval_summary(run)}
    if info["error"]:
        case["error"] = info["error"]
    if run is not None and run["evaluated"]:
        case["correct"] = _mismatch(run["outputs"]["y"], x.astype(np.float64) * 2) == 0
    return case


def _run_min_surface(backend) -> dict:
    return {"exact_sizes": {str(c * S * 2): _doubling(backend, c, c * S * 2) for c in SURFACE_CHANNELS},
            "small_tensor_on_49152_byte_surfaces": _doubling(backend, 1, 49152)}


def _verdict_min_surface(obs: dict) -> tuple[str, dict]:
    sizes = sorted(int(k) for k in obs["exact_sizes"])
    ok = {n: bool(obs["exact_sizes"][str(n)].get("correct")) for n in sizes}
    smallest = None
    for n in reversed(sizes):
        if not ok[n]:
            break
        smallest = n
    over = "; a 64-byte tensor on 49,152-byte surfaces works" if obs["small_tensor_on_49152_byte_surfaces"].get(
        "correct") else "; a 64-byte tensor on 49,152-byte surfaces fails"
    if smallest is None:
        return "no tested size works" + over, {}
    return f"surfaces of {smallest} bytes and more work" + over, {"min_surface_bytes": smallest}


register(Probe("min-surface", ("ANE-04", "min_surface_bytes"),
               "the smallest I/O surface an evaluation accepts (64 bytes to 49,152 bytes), and whether a small "
               "tensor on a large surface works", _run_min_surface, _verdict_min_surface))


PACKED_SEQ = 17  # 34 bytes per row: packed and 64-byte-row layouts differ


def _run_packed(backend) -> dict:
    b = _builder("packed")
    b.output("y", b.add(b.input("x", (1, C, 1, PACKED_SEQ)), 0.5, name="y"))
    module = _emit(b, backend)
    x = _fp16(np.arange(C * PACKED_SEQ).reshape(1, C, 1, PACKED_SEQ) % 512)
    expected = x.astype(np.float64) + 0.5
    rows = 64 // 2  # fp16 elements per 64-byte row
    size = max(_surface_size(module.program.inputs, backend.target.min_surface_bytes), C * 64)

    def strided(a: np.ndarray) -> np.ndarray:
        out = np.zeros((C, rows), dtype=np.float16)
        out[:, :PACKED_SEQ] = a.reshape(C, PACKED_SEQ)
        return out.view(np.uint8).reshape(-1)

    def unstrided(raw: np.ndarray) -> np.ndarray:
        return raw[: C * 64].view(np.float16).reshape(C, rows)[:, :PACKED_SEQ].reshape(1, C, 1, PACKED_SEQ)

    obs: dict[str, Any] = {"cases": {}}
    with _loaded(backend, module) as (model, info):
        obs.update({k: info[k] for k in ("compiled", "loaded", "error")})
        if model is not None:
            for name, data in (("written-packed", x), ("written-64-byte-rows", strided(x))):
                run = _evaluate(backend, model, module.program, [data], size, size, raw=True)
                case = _eval_summary(run)
                if run["evaluated"]:
                    raw = run["raw"]["y"]
                    case["read-packed correct"] = _mismatch(run["outputs"]["y"], expected) == 0
                    case["read-64-byte-rows correct"] = _mismatch(unstrided(raw), expected) == 0
                obs["cases"][name] = case
    return obs


def _verdict_packed(obs: dict) -> tuple[str, dict]:
    cases = obs.get("cases", {})
    if cases.get("written-packed", {}).get("read-packed correct"):
        return "packed from byte 0", {"io_row_align_bytes": None}
    if cases.get("written-64-byte-rows", {}).get("read-64-byte-rows correct"):
        return "rows aligned to 64 bytes", {"io_row_align_bytes": 64}
    return "neither layout reads back", {}


register(Probe("packed-reads", ("ANE-20", "ANE-35", "io_row_align_bytes"),
               "are tensors with 34-byte rows read and written packed from byte 0, or in 64-byte rows",
               _run_packed, _verdict_packed))


# ---------------------------------------------------------------------------------------------------------------------
# Weight updates: the runtime's strategies against a fresh compile of the new weights (CONFLICT, section 2).


def _weight_graph(weight: np.ndarray):
    b = _builder("wu")
    b.output("y", b.linear(b.input("x", (1, 64, 1, S)), weight, name="fc"))
    return b.graph


def _run_weight_update(strategy: str) -> Callable[[Any], dict]:
    def run(backend) -> dict:
        from orion.runtime.budget import CompileBudget
        from orion.runtime.cache import ProgramCache
        from orion.runtime.program import Program

        rng = _rng()
        w_old, w_new = rng.normal(0, 0.2, (64, 64)), rng.normal(0, 0.2, (64, 64))
        feed = {"x": rng.normal(0, 1, (1, 64, 1, S))}

        def program(weight):
            return Program.from_graph(_weight_graph(weight), target=backend.target, backend=backend,
                                      cache=ProgramCache(None), budget=CompileBudget(8))

        with program(w_new) as fresh:
            y_fresh = fresh.run(feed)["y"].astype(np.float64)
        with program(w_old) as p:
            y_old = p.run(feed)["y"].astype(np.float64)
            t0 = time.perf_counter()
            [name] = p.weight_names()  # the one conv weight, under its sanitized MIL name
            p.update_weights({name: w_new[:, :, None, None]}, strategy=strategy)
            ms = round((time.perf_counter() - t0) * 1e3, 3)
            y_after = p.run(feed)["y"].astype(np.float64)
            compiles = p.compiles
        return {"strategy": strategy, "update_ms": ms, "compiles": compiles,
                "equal_to_fresh": bool(np.array_equal(y_after, y_fresh)),
                "equal_to_old": bool(np.array_equal(y_after, y_old)),
                "values": {"max_abs_diff_to_fresh": _num(np.abs(y_after - y_fresh).max()),
                           "max_abs_diff_old_to_fresh": _num(np.abs(y_old - y_fresh).max())}}

    return run


def _verdict_weight_update(obs: dict) -> tuple[str, dict]:
    if obs["equal_to_fresh"]:
        return "fresh", {"weight_update": obs["strategy"]}
    return ("stale" if obs["equal_to_old"] else "wrong (neither old nor new)"), {}


for _strategy in ("reload", "patch"):
    register(Probe(f"weight-update-{_strategy}", ("ANE-07", "weight_update"),
                   f"does Program.update_weights(strategy={_strategy!r}) give the outputs of a fresh compile",
                   _run_weight_update(_strategy), _verdict_weight_update))


def _run_lora_inputs(backend) -> dict:
    """A linear layer with its weight baked and a LoRA adapter's A and B as inputs (reference section 7): the program
    with one adapter, then the other written into the same input surfaces, against programs with each adapter merged
    into the baked weight."""
    from orion.runtime.budget import CompileBudget
    from orion.runtime.cache import ProgramCache
    from orion.runtime.program import Program

    rng = _rng()
    d, rank = 64, 32
    w = rng.normal(0, 0.1, (d, d))
    adapters = [(rng.normal(0, 0.2, (rank, d)), rng.normal(0, 0.2, (d, rank))) for _ in range(2)]
    feed = {"x": rng.normal(0, 1, (1, d, 1, S))}

    def graph(weight, lora: bool):
        b = _builder("lora")
        x = b.input("x", (1, d, 1, S))
        y = b.linear(x, weight, name="fc")
        if lora:
            a, up = b.input("fc_lora_a", (1, 1, rank, d)), b.input("fc_lora_b", (1, 1, d, rank))
            y = b.add(y, b.lora_up(b.lora_down(x, a), up), name="fc_adapted")
        b.output("y", y)
        return b.graph

    def program(weight, lora: bool = False):
        return Program.from_graph(graph(weight, lora), target=backend.target, backend=backend,
                                  cache=ProgramCache(None), budget=CompileBudget(8),
                                  weights_as_inputs=["fc_lora_a", "fc_lora_b"] if lora else ())

    merged = []
    for a, up in adapters:
        with program(w + up @ a) as p:
            merged.append(p.run(feed)["y"].astype(np.float64))
    outputs, ms = [], []
    with program(w, lora=True) as p:
        for a, up in adapters:
            t0 = time.perf_counter()
            p.update_weights({"fc_lora_a": a.reshape(1, 1, rank, d), "fc_lora_b": up.reshape(1, 1, d, rank)})
            ms.append(round((time.perf_counter() - t0) * 1e3, 3))
            outputs.append(p.run(feed)["y"].astype(np.float64))
        compiles = p.compiles
    return {"compiles": compiles, "swap_ms": ms, "values": {
        "max_abs_diff_to_merged": _nums([np.abs(o - m).max() for o, m in zip(outputs, merged)]),
        "second_to_first_merged": _num(np.abs(outputs[1] - merged[0]).max()),
        "adapters_differ_by": _num(np.abs(merged[0] - merged[1]).max()),
        "scale": _num(max(np.abs(m).max() for m in merged))}}


def _verdict_lora_inputs(obs: dict) -> tuple[str, dict]:
    values = obs["values"]
    errors, tolerance = _decode(values["max_abs_diff_to_merged"]), 0.01 * float(values["scale"])  # fp16 rounding
    if obs["compiles"] != 1:
        return f"the swap compiled ({obs['compiles']} compiles)", {}
    if (errors <= tolerance).all():
        return "adapters swap as inputs", {}
    if float(values["second_to_first_merged"]) <= tolerance:
        return "stale: the second adapter's inputs did not reach the program", {}
    return "wrong: adapter inputs do not give the merged weight's outputs", {}


register(Probe("lora-inputs", ("ANE-18", "ANE-19"),
               "do LoRA A and B passed as inputs next to a baked weight give the merged weight's outputs, "
               "and does writing another adapter change them without a compile",
               _run_lora_inputs, _verdict_lora_inputs))


# ---------------------------------------------------------------------------------------------------------------------
# Numerics (reference section 9): raw values of the probes it lists, and the settings they imply.


def _numerics_run(backend, b, feed: dict) -> tuple[dict, dict | None]:
    """Run a numerics program; (observations, outputs or None)."""
    module = _emit(b, backend)
    obs = _attempt(backend, module, feed, None)
    return _public(obs), obs.get("_outputs")


SMALL_PRODUCTS = (2.0 ** -18, 2.0 ** -17, 2.0 ** -16)


def _run_small_products(backend) -> dict:
    rows = _fp16([[2.0 ** -9], [2.0 ** -8], [2.0 ** -7]]) * np.ones((3, 64), dtype=np.float16)  # times 2^-9
    b = _builder("small_products")
    b.output("y", _matmul(b, b.input("x", (1, 1, 3, 64)), b.weight("w", np.full((1, 1, 64, 1), 2.0 ** -9)), "y"))
    obs, out = _numerics_run(backend, b, {"x": rows.reshape(1, 1, 3, 64)})
    if out is not None:
        obs["values"] = {"sums": _nums(out["y"]), "exact": _nums([64 * p for p in SMALL_PRODUCTS])}
    return obs


def _verdict_small_products(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    got, exact = _decode(obs["values"]["sums"]), _decode(obs["values"]["exact"])
    kept, lost = got == exact, got == 0
    if kept.all():
        return "no product lost (a wide exact sum)", {"numerics.accumulator": "fp32"}
    first = int(np.argmax(kept)) if kept.any() else len(kept)
    if lost[:first].all() and kept[first:].all():
        if first == len(kept):
            return "every product lost (a coarse fixed-point grid)", {"numerics.accumulator": "fixed-point"}
        grid = SMALL_PRODUCTS[first]
        return (f"products below 2^{int(math.log2(grid))} lost (fixed-point grid 2^{int(math.log2(grid))})",
                {"numerics.accumulator": "fixed-point", "numerics.accumulator_grid": grid})
    return f"partial loss {obs['values']['sums']}", {}


register(Probe("numerics-small-products", ("numerics.accumulator", "numerics.accumulator_grid"),
               "matmul [1,64]@[64,1] with every product 2^-18, 2^-17, 2^-16: which tiny products the wide "
               "accumulator drops (N3)", _run_small_products, _verdict_small_products))


TIE_CASES = ((2048.0, 1.0), (2048.0, 3.0), (-2048.0, -1.0))  # exact sums 2049, 2051, -2049: all fp16 ties
TIE_MODES = {"half-even": (2048.0, 2052.0, -2048.0), "half-away": (2050.0, 2052.0, -2050.0)}


def _run_ties(backend) -> dict:
    p, q = _row([a for a, _ in TIE_CASES]), _row([c for _, c in TIE_CASES])
    b = _builder("ties")
    xp, xq = b.input("p", p.shape), b.input("q", q.shape)
    r = b.input("r", (1, 1, 2, 32))
    b.output("added", b.add(xp, xq, name="added"))
    b.output("reduced", b.reduce_sum(r, axes=[2], keep_dims=True, name="reduced"))
    b.output("multiplied", _matmul(b, b.weight("ones", np.ones((1, 1, 1, 2))), r, "multiplied"))
    obs, out = _numerics_run(backend, b, {"p": p, "q": q, "r": np.concatenate([p, q], axis=2)})
    if out is not None:
        n = len(TIE_CASES)
        obs["values"] = {k: _nums(out[k].reshape(-1)[:n]) for k in ("added", "reduced", "multiplied")}
    return obs


def _tie_mode(values: list) -> str:
    got = tuple(_decode(values))
    return next((mode for mode, expect in TIE_MODES.items() if got == expect), f"other {list(got)}")


def _verdict_ties(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    modes = {k: _tie_mode(v) for k, v in obs["values"].items()}
    value = {}
    if modes["added"] in TIE_MODES:
        value["numerics.elementwise_ties"] = modes["added"]
    if modes["multiplied"] in TIE_MODES:
        value["numerics.reduction_ties"] = modes["multiplied"]
    return f"add {modes['added']}, reduce_sum {modes['reduced']}, matmul {modes['multiplied']}", value


register(Probe("numerics-ties", ("numerics.elementwise_ties", "numerics.reduction_ties"),
               "2048+1, 2048+3 and -2048-1 as add, reduce_sum and matmul: how ties round (N10)",
               _run_ties, _verdict_ties))


CEILING_SUMS = (16384, 32752, 32760, 32767, 32768, 60000)
CEILING_K = 16384


def _ceiling_columns() -> np.ndarray:
    """[1, 1, K, 32]: column j holds K small integers summing to CEILING_SUMS[j] (other columns zero)."""
    x = np.zeros((CEILING_K, 32))
    for j, total in enumerate(CEILING_SUMS):
        base, extra = divmod(total, CEILING_K)
        x[:, j] = base
        x[:extra, j] += 1
    return _fp16(x.reshape(1, 1, CEILING_K, 32))


ELEMENTWISE_HALVES = (16384.0, 30000.0, 32768.0, 40000.0)


def _run_ceiling(backend) -> dict:
    b = _builder("ceiling")
    x = b.input("x", (1, 1, CEILING_K, 32))
    e = b.input("e", (1, 1, 1, 32))
    b.output("mm", _matmul(b, b.weight("ones", np.ones((1, 1, 1, CEILING_K))), x, "mm"))
    b.output("rs", b.reduce_sum(x, axes=[2], keep_dims=True, name="rs"))
    b.output("ew", b.add(e, e, name="ew"))
    obs, out = _numerics_run(backend, b, {"x": _ceiling_columns(), "e": _row(ELEMENTWISE_HALVES)})
    if out is not None:
        n = len(CEILING_SUMS)
        obs["sums"] = list(CEILING_SUMS)
        obs["values"] = {"matmul": _nums(out["mm"].reshape(-1)[:n]), "reduce_sum": _nums(out["rs"].reshape(-1)[:n]),
                         "add_doubles": _nums(out["ew"].reshape(-1)[: len(ELEMENTWISE_HALVES)])}
    return obs


def _verdict_ceiling(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    inf = np.isinf(_decode(obs["values"]["matmul"]))
    reduce_inf = np.isinf(_decode(obs["values"]["reduce_sum"]))
    note = f"; reduce_sum inf from {CEILING_SUMS[int(np.argmax(reduce_inf))]}" if reduce_inf.any() else \
        "; reduce_sum finite throughout"
    if not inf.any():
        return "no matmul ceiling below 60000" + note, {"numerics.matmul_ceiling": 65520.0}
    first = int(np.argmax(inf))
    if inf[first:].all():
        ceiling = float(np.float16(CEILING_SUMS[first]))
        return f"matmul sums of {CEILING_SUMS[first]} and more are inf (ceiling {ceiling:g})" + note, \
            {"numerics.matmul_ceiling": ceiling}
    return f"inf pattern {inf.tolist()}" + note, {}


register(Probe("numerics-ceiling", ("numerics.matmul_ceiling", "ANE-31"),
               "sums of 16384 ... 60000 as matmul and reduce_sum, and 2x for elementwise add: where results "
               "become inf (N4)", _run_ceiling, _verdict_ceiling))


CANCELLATION = ((2048.0, 1.0, -2048.0), (1.0, 2048.0, -2048.0), (2048.0, -2048.0, 1.0), (65504.0, 65504.0, -65504.0))
ONES = 4096


def _sequential_fp16(values: Sequence[float]) -> float:
    """An fp16 running sum in order (numpy rounds each fp16 add half-even): the oracle of reduce_sum_fp16."""
    acc = np.float16(0)
    with np.errstate(over="ignore"):
        for v in values:
            acc = np.float16(acc + np.float16(v))
    return float(acc)


def _wide_fp16(values: Sequence[float]) -> float:
    with np.errstate(over="ignore"):
        return float(np.float16(math.fsum(float(np.float16(v)) for v in values)))


def _run_reduce_sum(backend) -> dict:
    triples = np.zeros((3, 32))
    for j, t in enumerate(CANCELLATION):
        triples[:, j] = t
    b = _builder("reduce")
    t_in, o_in = b.input("t", (1, 1, 3, 32)), b.input("o", (1, 1, ONES, 32))
    b.output("t_rs", b.reduce_sum(t_in, axes=[2], keep_dims=True, name="t_rs"))
    b.output("t_mm", _matmul(b, b.weight("ones3", np.ones((1, 1, 1, 3))), t_in, "t_mm"))
    b.output("o_rs", b.reduce_sum(o_in, axes=[2], keep_dims=True, name="o_rs"))
    b.output("o_mm", _matmul(b, b.weight("ones_k", np.ones((1, 1, 1, ONES))), o_in, "o_mm"))
    feed = {"t": _fp16(triples.reshape(1, 1, 3, 32)), "o": np.ones((1, 1, ONES, 32), dtype=np.float16)}
    obs, out = _numerics_run(backend, b, feed)
    if out is not None:
        n = len(CANCELLATION)
        obs["values"] = {
            "reduce_sum": _nums(np.concatenate([out["t_rs"].reshape(-1)[:n], out["o_rs"].reshape(-1)[:1]])),
            "matmul": _nums(np.concatenate([out["t_mm"].reshape(-1)[:n], out["o_mm"].reshape(-1)[:1]])),
        }
        cases = [list(t) for t in CANCELLATION] + [[1.0] * ONES]
        obs["predicted"] = {"wide": _nums([_wide_fp16(c) for c in cases]),
                            "fp16-running-sum": _nums([_sequential_fp16(c) for c in cases])}
    return obs


def _verdict_reduce_sum(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    got = _decode(obs["values"]["reduce_sum"])
    wide, running = _decode(obs["predicted"]["wide"]), _decode(obs["predicted"]["fp16-running-sum"])
    if np.array_equal(got, wide):
        return "reduce_sum sums wide", {"numerics.reduce_sum_fp16": False}
    if np.array_equal(got, running):
        return "reduce_sum is an fp16 running sum", {"numerics.reduce_sum_fp16": True}
    return f"reduce_sum gives {obs['values']['reduce_sum']}", {}


register(Probe("numerics-reduce-sum", ("numerics.reduce_sum_fp16",),
               "reduce_sum against matmul on cancellation triples and 4096 ones: wide sum or fp16 running sum (N14)",
               _run_reduce_sum, _verdict_reduce_sum))


MEAN_CASES = ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (0.1, 0.1, 0.1), (1.0, 2.0, 4.0))


def _run_reduce_mean(backend) -> dict:
    x = np.zeros((3, 32))
    for j, case in enumerate(MEAN_CASES):
        x[:, j] = case
    b = _builder("mean")
    b.output("m", b.reduce_mean(b.input("x", (1, 1, 3, 32)), axes=[2], keep_dims=True, name="m"))
    obs, out = _numerics_run(backend, b, {"x": _fp16(x.reshape(1, 1, 3, 32))})
    if out is not None:
        obs["values"] = {"means": _nums(out["m"].reshape(-1)[: len(MEAN_CASES)]),
                         "exact": _nums([np.float16(math.fsum(float(np.float16(v)) for v in c) / 3)
                                         for c in MEAN_CASES])}
    return obs


def _verdict_reduce_mean(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    got, exact = _decode(obs["values"]["means"]), _decode(obs["values"]["exact"])
    if np.array_equal(got, exact):
        return "exact (mean of [1,1,1] is 1)", {}
    return f"mean of [1,1,1] is {float(got[0]):g}; {int((got != exact).sum())} of {len(got)} means inexact", {}


register(Probe("numerics-reduce-mean", (), "reduce_mean of [1,1,1] and a few more triples: exact, or a sum times "
               "an fp16 reciprocal", _run_reduce_mean, _verdict_reduce_mean))


def all_finite_fp16() -> np.ndarray:
    """Every finite fp16 value once (+0 and -0 included), as ``[1, 62, 1, 1024]``: positives then negatives."""
    positive = np.arange(0x7C00, dtype=np.uint16)
    return np.concatenate([positive, positive | np.uint16(0x8000)]).view(np.float16).reshape(1, 62, 1, 1024)


def _exact_activations() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {
        "sigmoid": _sigmoid,
        "tanh": np.tanh,
        "gelu": _gelu_exact,
        "silu": lambda x: x * _sigmoid(x),
        "exp": np.exp,
        "log": np.log,
        "sqrt": np.sqrt,
        "rsqrt": lambda x: 1.0 / np.sqrt(x),
    }


#: Inputs whose outputs each activation reports verbatim (the quirks of N6/N7 live there).
SPECIAL_INPUTS = {"sigmoid": (-12.0, -9.94, 8.32, 10.0), "gelu": (0.0,), "silu": (0.0,), "exp": (11.09, 11.1),
                  "log": (0.0, -1.0), "sqrt": (-1.0,), "rsqrt": (0.0, -1.0), "tanh": (0.0,)}


def activation_errors(x: np.ndarray, y: np.ndarray, exact_fn: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Compare an activation's fp16 outputs with the exact function over inputs where the exact result is a finite
    fp16 value: max abs error, where, and in fp16 ulps of the exact result; plus overflow disagreements."""
    x64, y64 = x.astype(np.float64).reshape(-1), y.astype(np.float64).reshape(-1)
    with np.errstate(all="ignore"):
        exact = exact_fn(x64)
        finite = np.isfinite(exact) & (np.abs(exact) < 65520.0)
        overflow = np.isinf(exact) | (np.isfinite(exact) & (np.abs(exact) >= 65520.0))
        err = np.where(finite, np.abs(y64 - exact), 0.0)
        err = np.where(finite & ~np.isfinite(y64), np.inf, err)
        ulp = np.spacing(np.abs(exact[finite]).astype(np.float16)).astype(np.float64)
        ulps = err[finite] / ulp
    worst = int(np.argmax(err)) if err.size else 0
    return {
        "max_abs_error": _num(err.max() if err.size else 0.0),
        "at_input": _num(x64[worst]),
        "max_error_ulps": _num(ulps.max() if ulps.size else 0.0),
        "compared": int(finite.sum()),
        "finite_where_exact_overflows": int((overflow & np.isfinite(y64)).sum()),
    }


def _run_activations(backend) -> dict:
    x = all_finite_fp16()
    flat = x.reshape(-1)
    index = {float(v): i for i, v in enumerate(flat.astype(np.float64)) if v != 0 or not np.signbit(v)}
    results = {}
    for op, exact_fn in _exact_activations().items():
        b = _builder(op)
        b.output("y", b.op(op, name="y", x=b.input("x", x.shape)))
        obs, out = _numerics_run(backend, b, {"x": x})
        if out is not None:
            y = out["y"].reshape(-1)
            obs.update(activation_errors(x, y, exact_fn))
            obs["special"] = {f"{op}({v:g})": _num(y[index[float(np.float16(v))]]) for v in SPECIAL_INPUTS[op]}
            if op == "exp":
                big = flat.astype(np.float64)[np.isinf(y.astype(np.float64)) & (flat > 0)]
                obs["inf_from"] = _num(big.min()) if big.size else None
        results[op] = obs
    return {"activations": results,
            "values": {op: r["max_abs_error"] for op, r in results.items() if "max_abs_error" in r}}


def _verdict_activations(obs: dict) -> tuple[str, dict]:
    acts = obs["activations"]
    zeros = {op: acts[op]["special"][f"{op}(0)"] for op in ("gelu", "silu") if "special" in acts.get(op, {})}
    worst = ", ".join(f"{op} {err:.3g}" if isinstance(err, float) else f"{op} {err}"
                      for op, err in obs["values"].items())
    if not zeros:
        return f"max abs error: {worst}", {}
    quirks = any(v != 0.0 for v in zeros.values())
    label = "table quirks at 0" if quirks else "exact at 0"
    return f"{label}; max abs error: {worst}", {"numerics.activation_quirks": quirks}


register(Probe("numerics-activations", ("numerics.activation_quirks",),
               "each activation over every finite fp16 input against the exact function: max abs error, and the "
               "table quirks (gelu(0), silu(0), sigmoid clamp, exp overflow) (N7)", _run_activations,
               _verdict_activations))


BOUNDARY_VALUES = (70000.0, -70000.0, 65519.0, 65520.0, 65504.0, float("nan"), 1e-7, 1e-8)
BOUNDARY_MODEL = (math.inf, -math.inf, 65504.0, math.inf, 65504.0, math.inf)  # N1, N5, N6 for the first six


def _run_boundary(backend) -> dict:
    x = np.zeros((1, 1, 1, 32), dtype=np.float32)
    x.reshape(-1)[: len(BOUNDARY_VALUES)] = BOUNDARY_VALUES
    b = _builder("boundary")
    y16 = b.cast(b.input("x", x.shape, "fp32"), "fp16", name="y16")
    b.output("y16", y16)
    b.output("y32", b.cast(y16, "fp32", name="y32"))
    obs, out = _numerics_run(backend, b, {"x": x})
    if out is not None:
        n = len(BOUNDARY_VALUES)
        obs["inputs"] = _nums(BOUNDARY_VALUES)
        obs["values"] = {"fp16": _nums(out["y16"].reshape(-1)[:n]), "fp32": _nums(out["y32"].reshape(-1)[:n])}
    return obs


def _verdict_boundary(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    got = _decode(obs["values"]["fp16"])[: len(BOUNDARY_MODEL)]
    if np.array_equal(got, np.asarray(BOUNDARY_MODEL)):
        return "as modelled: >= 65520 and NaN become inf, 65519 rounds to 65504", {}
    return "differs from the model: " + ", ".join(f"{_num(v)}->{g}" for v, g in zip(BOUNDARY_VALUES, obs["values"][
        "fp16"])), {}


register(Probe("numerics-boundary-casts", (), "fp32 inputs 70000, 65519, 65520, NaN, 1e-7, 1e-8 cast to fp16 inside "
               "a program: overflow, rounding and NaN at the boundary (N1, N5, N6)", _run_boundary, _verdict_boundary))


#: (label, output, column, value N6 predicts)
NAN_CASES = (("inf - inf", "d", 0, 0.0), ("0 * inf", "m", 1, 0.0), ("sqrt(-1)", "s", 2, 0.0),
             ("log(-1)", "l", 2, 0.0), ("log(0)", "l", 3, -45440.0), ("-1 * 0", "m", 2, 0.0),
             ("NaN input * 1", "m", 4, math.inf), ("-0 - 0", "d", 5, 0.0))


def _run_nan(backend) -> dict:
    a = _row([math.inf, 0.0, -1.0, 0.0, math.nan, -0.0, 1.0])
    c = _row([math.inf, math.inf, 0.0, 0.0, 1.0, 0.0, 1.0])
    b = _builder("nan")
    xa, xb = b.input("a", a.shape), b.input("b", c.shape)
    b.output("d", b.sub(xa, xb, name="d"))
    b.output("m", b.mul(xa, xb, name="m"))
    b.output("s", b.sqrt(xa, name="s"))
    b.output("l", b.log(xa, name="l"))
    obs, out = _numerics_run(backend, b, {"a": a, "b": c})
    if out is not None:
        got = {label: out[name].reshape(-1)[col] for label, name, col, _ in NAN_CASES}
        obs["values"] = {label: _num(v) for label, v in got.items()}
        obs["negative_zero"] = [label for label, v in got.items() if v == 0 and np.signbit(v)]
        obs["any_nan"] = bool(any(np.isnan(out[k].astype(np.float64)).any() for k in out))
    return obs


def _verdict_nan(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    agree = [label for label, _, _, want in NAN_CASES
             if _decode(obs["values"][label])[0] == want and label not in obs["negative_zero"]]
    head = "NaN seen" if obs["any_nan"] else "NaN-free"
    return f"{head}; {len(agree)} of {len(NAN_CASES)} as N6 reports", {}


register(Probe("numerics-nan", (), "inf-inf, 0*inf, sqrt/log of negatives, log(0), -0 and a NaN input: what comes "
               "out instead of NaN (N6)", _run_nan, _verdict_nan))


def _run_subnormals(backend) -> dict:
    x = _row([2.0 ** -20, 2.0 ** -8, 2.0 ** -14, 1.0])  # subnormal operand, normal operands, normal control
    scale = np.zeros(32)
    scale[:4] = [2.0 ** 10, 2.0 ** -8, 1.0, 1.0]  # products: 2^-10 (from a subnormal), 2^-16 (subnormal result)
    b = _builder("subnormal")
    xin = b.input("x", x.shape)
    b.output("mm", _matmul(b, xin, b.weight("diag", np.diag(scale).reshape(1, 1, 32, 32)), "mm"))
    b.output("ew", b.mul(xin, b.weight("scale", scale.reshape(1, 1, 1, 32)), name="ew"))
    obs, out = _numerics_run(backend, b, {"x": x})
    if out is not None:
        obs["values"] = {"matmul": _nums(out["mm"].reshape(-1)[:4]), "elementwise": _nums(out["ew"].reshape(-1)[:4])}
        obs["exact"] = _nums([2.0 ** -10, 2.0 ** -16, 2.0 ** -14, 1.0])
    return obs


def _verdict_subnormals(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    mm, exact = _decode(obs["values"]["matmul"]), _decode(obs["exact"])
    operand, result = mm[0] == 0, mm[1] == 0
    if operand and result:
        return "matmul flushes subnormals", {"numerics.flush_subnormals_in_matmul": True}
    if mm[0] == exact[0] and mm[1] == exact[1]:
        return "matmul keeps subnormals", {"numerics.flush_subnormals_in_matmul": False}
    return (f"matmul: subnormal operand {'flushed' if operand else 'kept'}, subnormal result "
            f"{'flushed' if result else 'kept'}"), {}


register(Probe("numerics-subnormals", ("numerics.flush_subnormals_in_matmul",),
               "a subnormal operand and a subnormal result in matmul and in an elementwise mul (N9)",
               _run_subnormals, _verdict_subnormals))


SLICE_VALUES = (5000.0, -5000.0, 4094.0, 4096.0, 100.0)


def _run_slice(backend) -> dict:
    row = _row(SLICE_VALUES).reshape(-1)
    x = np.concatenate([row, row]).reshape(1, 1, 1, 64)
    b = _builder("slice")
    xin = b.input("x", x.shape)
    b.output("at_offset", b.slice_by_size(xin, begin=[0, 0, 0, 32], size=[1, 1, 1, 32], name="at_offset"))
    b.output("at_zero", b.slice_by_size(xin, begin=[0, 0, 0, 0], size=[1, 1, 1, 32], name="at_zero"))
    obs, out = _numerics_run(backend, b, {"x": x})
    if out is not None:
        n = len(SLICE_VALUES)
        obs["values"] = {k: _nums(out[k].reshape(-1)[:n]) for k in ("at_offset", "at_zero")}
    return obs


def _verdict_slice(obs: dict) -> tuple[str, dict]:
    if "values" not in obs:
        return "did not run", {}
    off, zero = _decode(obs["values"]["at_offset"]), _decode(obs["values"]["at_zero"])
    if not np.array_equal(zero, np.asarray(SLICE_VALUES)):
        return f"even a slice at offset 0 changes values: {obs['values']['at_zero']}", {}
    if np.array_equal(off, zero):
        return "exact at a nonzero offset", {"slice_offset_overflow": False}
    if np.isinf(off[0]) and np.isinf(off[1]):
        return "|x| > 4094 becomes inf at a nonzero offset", {"slice_offset_overflow": True}
    return f"at a nonzero offset: {obs['values']['at_offset']}", {}


register(Probe("slice-offset-overflow", ("ANE-29", "slice_offset_overflow"),
               "a slice whose last-axis begin is nonzero, on values 5000, -5000, 4094, 4096 (N11, M1/M2)",
               _run_slice, _verdict_slice))


# ---------------------------------------------------------------------------------------------------------------------
# Children: one probe, one backend, one process, one JSON line.


def _make_backend(name: str, target: Target, root: Path):
    if name == "emulator":
        from orion.runtime.backends.emulator import EmulatorBackend

        return EmulatorBackend(target, root=root)
    from orion.runtime.program import get_backend

    return get_backend(name, target)


def child_main(argv: Sequence[str] | None = None) -> int:
    """``--child ID --backend NAME [--target T] [--mil-version V] [--import MODULE]``: run one probe, print one line."""
    parser = argparse.ArgumentParser(prog="python -m orion.runtime.doctor")
    parser.add_argument("--child", required=True)
    parser.add_argument("--backend", required=True, choices=("ane", "emulator"))
    parser.add_argument("--target", default="default")
    parser.add_argument("--mil-version")
    parser.add_argument("--import", dest="modules", action="append", default=[])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    global _scratch
    _scratch = args.workdir
    result: dict[str, Any] = {"probe": args.child, "backend": args.backend}
    try:
        import importlib

        for module in args.modules:
            importlib.import_module(module)
        if args.child not in PROBES:
            raise SettingsError(f"unknown probe {args.child!r}")
        target = get_target(args.target)
        if args.mil_version and args.mil_version != target.mil_version:
            target = target.with_overrides(mil_version=args.mil_version)
        with tempfile.TemporaryDirectory(prefix="backend-", dir=_scratch) as root:
            backend = _make_backend(args.backend, target, Path(root))
            result["machine"] = backend.describe()
            result["observations"] = jsonable(PROBES[args.child].run(backend))
    except Exception as exc:
        result["error"] = _error(exc)
        result["traceback"] = traceback.format_exc()[-4000:]
    try:
        line = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a probe returned something JSON cannot hold: a bug, said plainly
        line = json.dumps({k: result[k] for k in ("probe", "backend")} | {"error": f"observations are not JSON: {exc}"})
    print(RESULT_MARK + line, flush=True)
    return 0


def _child_env(backend: str, workdir: str) -> dict[str, str]:
    """The child sees the modules the parent sees (a source checkout, a test package). An emulator child keeps
    every temp file in ``workdir``; an ANE child keeps the system temp directory, where the framework expects
    model directories."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if backend == "emulator":
        env["TMPDIR"] = workdir
    return env


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_probe_in_child(probe: Probe, backend: str, *, target: str = "default", timeout: float = 60.0,
                       mil_version: str | None = None) -> dict:
    """Run ``probe`` on ``backend`` in a fresh process. Returns ``{"status": "ok" | "error" | "crashed" |
    "timeout", "observations"?, "error"?, "returncode"?, "signal"?, "stderr"?, "machine"?, "seconds"}``."""
    cmd = [sys.executable, "-m", "orion.runtime.doctor", "--child", probe.id, "--backend", backend,
           "--target", target]
    if mil_version:
        cmd += ["--mil-version", mil_version]
    if probe.run.__module__ not in (__name__, "__main__"):
        cmd += ["--import", probe.run.__module__]
    with tempfile.TemporaryDirectory(prefix="orion-doctor-", ignore_cleanup_errors=True) as workdir:
        return _supervise(cmd + ["--workdir", workdir], _child_env(backend, workdir), timeout)


def _supervise(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Start the child in its own session, wait at most ``timeout``, and read its one result line."""
    t0 = time.perf_counter()
    posix = os.name == "posix"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=posix, text=True, errors="replace")

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and anything it started
            else:
                proc.kill()

    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill()
        stdout, stderr = proc.communicate()
        return {"status": "timeout", "error": f"no answer within {timeout:g} s; the child was killed",
                "stderr": stderr[-2000:], "seconds": round(time.perf_counter() - t0, 3)}
    except BaseException:  # Ctrl-C in the parent: a child in its own session would not get it
        kill()
        proc.wait()
        raise
    seconds = round(time.perf_counter() - t0, 3)
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(RESULT_MARK)), None)
    if line is None or proc.returncode != 0:
        out: dict[str, Any] = {"status": "crashed", "returncode": proc.returncode, "stderr": stderr[-2000:],
                               "seconds": seconds}
        if proc.returncode is not None and proc.returncode < 0:
            out["signal"] = _signal_name(-proc.returncode)
            out["error"] = f"the child died of {out['signal']}"
        else:
            out["error"] = f"the child exited with code {proc.returncode} without a result"
        return out
    result = json.loads(line[len(RESULT_MARK):])
    out = {"status": "error" if "error" in result else "ok", "seconds": seconds}
    for key in ("observations", "error", "traceback", "machine"):
        if key in result:
            out[key] = result[key]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The report.


def _judge(probe: Probe, child: dict) -> dict:
    """Add the verdict and value of one backend's run (failures are verdicts too)."""
    if child["status"] != "ok":
        detail = child.get("signal") or child.get("returncode")
        label = {"crashed": "crashed", "timeout": "timeout"}.get(child["status"], "error")
        return {**child, "verdict": f"{label} ({detail})" if label == "crashed" and detail is not None else label,
                "value": {}}
    try:
        verdict, value = probe.verdict(child["observations"])
    except Exception as exc:  # observations the verdict cannot read are a finding, not a doctor crash
        verdict, value = f"unreadable observations: {_error(exc)}", {}
    return {**child, "verdict": verdict, "value": value}


def _flatten_values(obs: dict) -> dict[str, np.ndarray]:
    values = obs.get("values", {}) if isinstance(obs, dict) else {}
    return {k: _decode(v) for k, v in values.items() if isinstance(v, (list, float, int, str))}


def compare(ane: dict, emulator: dict) -> dict:
    """ANE against emulator: verdicts, values, and every number both recorded under ``values``."""
    out: dict[str, Any] = {"verdict_equal": ane.get("verdict") == emulator.get("verdict"),
                           "value_equal": ane.get("value") == emulator.get("value")}
    a_obs, e_obs = ane.get("observations") or {}, emulator.get("observations") or {}
    if "variants" in a_obs and "variants" in e_obs:  # compile probes: which forms worked on each side
        out["variants_differing"] = sorted(
            v for v in set(a_obs["variants"]) | set(e_obs["variants"])
            if a_obs["variants"].get(v, {}).get("works") != e_obs["variants"].get(v, {}).get("works"))
    a, e = _flatten_values(a_obs), _flatten_values(e_obs)
    common = sorted(set(a) & set(e))
    if not common:
        out.update(outputs_equal=None, max_abs_diff=None, differing=[])
        return out
    differing, worst = [], 0.0
    for key in common:
        x, y = a[key], e[key]
        if x.shape != y.shape:
            differing.append(key)
            worst = math.inf
            continue
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        if not same.all():
            differing.append(key)
            with np.errstate(invalid="ignore"):
                diff = np.where(same, 0.0, np.abs(x - y))
            worst = max(worst, float(np.where(np.isnan(diff), math.inf, diff).max()))
    out.update(outputs_equal=not differing, max_abs_diff=_num(worst), differing=differing)
    return out


def ane_status() -> tuple[bool, str]:
    """(whether an ANE can run the probes here, why or why not); never raises."""
    try:
        from orion.runtime.backends.ane import AneBackend

        if AneBackend.available():
            return True, "the ANE backend is available"
        return False, "the ANE backend reports no Apple Neural Engine on this machine"
    except Exception as exc:  # the ANE module may be missing or fail to import off macOS
        return False, f"the ANE backend cannot be used here ({_error(exc)})"


def select_probes(ids: Sequence[str] | None) -> list[Probe]:
    if not ids:
        return [p for p in PROBES.values() if not p.hidden]
    unknown = [i for i in ids if i not in PROBES]
    if unknown:
        known = ", ".join(p.id for p in PROBES.values() if not p.hidden)
        raise SettingsError(f"unknown probe(s) {', '.join(unknown)}; known probes: {known}")
    return [PROBES[i] for i in dict.fromkeys(ids)]


def run_doctor(backend: str = "auto", probes: Sequence[str] | None = None, timeout: float = 60.0,
               target: str = "default", on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the probes (each in a child) and return the report. ``backend``: ``auto`` (the ANE and the emulator
    where an ANE exists, else the emulator), ``ane`` (the ANE only), ``emulator`` (the emulator only)."""
    if backend not in BACKEND_CHOICES:
        raise SettingsError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if not timeout > 0:
        raise SettingsError(f"timeout {timeout!r} must be a positive number of seconds")
    get_target(target)  # an unknown target fails here, not once per child
    selected = select_probes(probes)
    present, note = ane_status()
    if backend == "ane" and not present:
        raise BackendError(f"--backend ane: {note}; use --backend emulator (or auto) to see what Orion assumes")
    backends = {"auto": ["ane", "emulator"] if present else ["emulator"], "ane": ["ane"],
                "emulator": ["emulator"]}[backend]
    started = time.perf_counter()
    mil_version = None
    machine: dict[str, Any] = {}
    dialect = PROBES.get("mil-dialect")
    ordered = sorted(selected, key=lambda p: p is not dialect)  # the dialect decides how the others are printed
    entries = []
    for probe in ordered:
        runs: dict[str, dict] = {}
        for name in backends:
            child = run_probe_in_child(probe, name, target=target, timeout=timeout, mil_version=mil_version)
            runs[name] = _judge(probe, child)
            if child.get("machine") and (not machine or name == "ane"):
                machine = child["machine"]
        decisive = runs.get("ane") or runs["emulator"]
        if probe is dialect and "ane" in runs:
            mil_version = decisive["value"].get("mil_version")
        entry = {
            "id": probe.id,
            "question": probe.question,
            "settles": list(probe.settles),
            "verdict": decisive["verdict"],
            "value": decisive["value"],
            "ane": runs.get("ane"),
            "emulator": runs.get("emulator"),
            "comparison": compare(runs["ane"], runs["emulator"]) if len(runs) == 2 else None,
            "seconds": round(sum(r["seconds"] for r in runs.values()), 3),
        }
        entries.append(entry)
        if on_result is not None:
            on_result(entry)
    ran_ane = "ane" in backends
    if ran_ane:
        message = "Probes ran on the Apple Neural Engine and on the emulator." if len(backends) == 2 else \
            "Probes ran on the Apple Neural Engine only."
    else:
        message = EMULATOR_ONLY_MESSAGE if present else NO_ANE_MESSAGE
    os_build = None
    if ran_ane:
        from orion.runtime.cache import os_build as host_build  # sw_vers on macOS: what private-API results hinge on

        os_build = machine.get("macos_build") or host_build()  # AneBackend.describe() names it macos_build
    return {
        "orion_version": __version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": machine,
        "chip": machine.get("chip") if ran_ane else None,
        "os_build": os_build,
        "target": target,
        "ane_present": present,
        "ane_note": note,
        "backends": backends,
        "message": message,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 3),
        "probes": entries,
    }


# ---------------------------------------------------------------------------------------------------------------------
# What the ANE verdicts imply for a target profile.

#: Weight-update strategies in order of preference when several are fresh (patch is Orion's tested recipe).
_WEIGHT_PREFERENCE = ("patch", "reload")


def profile_overrides(report: dict) -> dict:
    """Target fields (and a ``numerics`` dict) the ANE verdicts imply; empty when no probe ran on the ANE."""
    overrides: dict[str, Any] = {}
    numerics: dict[str, Any] = {}
    fresh: list[str] = []
    weight_probes = 0
    for entry in report.get("probes", []):
        ane = entry.get("ane")
        if not ane or ane.get("status") != "ok":
            continue
        for key, value in ane.get("value", {}).items():
            if key == "weight_update":
                fresh.append(value)
            elif key.startswith("numerics."):
                numerics[key.split(".", 1)[1]] = value
            else:
                overrides[key] = value
        weight_probes += "weight_update" in entry.get("settles", [])
    if weight_probes:
        overrides["weight_update"] = next((s for s in _WEIGHT_PREFERENCE if s in fresh), "recompile")
    if numerics:
        overrides["numerics"] = numerics
    return overrides


def write_profile(report: dict, path: str | os.PathLike) -> Path:
    """Write the profile the ANE verdicts imply (``{"base", "overrides", "source", "chip", "os_build"}``),
    atomically: a crash leaves the old file or the new one, never half of one."""
    if "ane" not in report.get("backends", []):
        raise SettingsError("no probe ran on an Apple Neural Engine, so there is nothing to write to a profile; "
                            "run `orion doctor` on a Mac with Apple silicon")
    overrides = profile_overrides(report)
    fields = {k: v for k, v in overrides.items() if k != "numerics"}
    base = get_target(report.get("target", "default"))
    if "numerics" in overrides:  # the field slice_offset_overflow speaks for itself; its numerics twin follows it
        kept = {k: v for k, v in base.numerics.items() if k != "slice_offset_overflow"}
        fields["numerics"] = {**kept, **overrides["numerics"]}
    base.with_overrides(**fields)  # an invalid value fails here, before anything is written
    from orion.runtime.backends.numerics import Numerics

    Numerics.from_dict(overrides.get("numerics", {}))
    profile = {"base": base.name, "overrides": overrides, "source": "orion doctor", "chip": report.get("chip"),
               "os_build": report.get("os_build")}
    return _write_json_atomic(profile, path)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the whole report as strict JSON, atomically (for ``orion doctor --json FILE``)."""
    return _write_json_atomic(jsonable(report), path)


def _write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Printing.


def _value_text(value: dict) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}" for k, v in value.items())


def _cell(run: dict | None) -> str:
    if run is None:
        return "-"
    text = run["verdict"]
    if run["status"] != "ok" and run.get("error"):
        text += f": {run['error'][:160]}"
    return text


def print_report(report: dict, console) -> None:
    """A rich table: probe, what it settles, the ANE's and the emulator's verdicts, and the value decided."""
    from rich.markup import escape
    from rich.table import Table

    console.print(escape(f"orion {report['orion_version']} doctor on {report['platform']}"
                         + (f", chip {report['chip']}" if report.get("chip") else "")
                         + (f", OS build {report['os_build']}" if report.get("os_build") else "")
                         + f", target {report['target']}"), highlight=False)
    table = Table(title="ANE probes", show_lines=True)
    for col in ("probe", "settles", "ANE", "emulator", "verdict"):
        table.add_column(col, overflow="fold")
    for e in report["probes"]:
        verdict = e["verdict"] + (f"\n{_value_text(e['value'])}" if e["value"] else "")
        if e.get("comparison") and not e["comparison"]["verdict_equal"]:
            verdict += "\n(the emulator disagrees)"
        table.add_row(*(escape(s) for s in (e["id"], ", ".join(e["settles"]) or "-", _cell(e["ane"]),
                                             _cell(e["emulator"]), verdict)))
    console.print(table)
    console.print(escape(report["message"]), highlight=False)
    overrides = profile_overrides(report)
    if overrides:
        console.print(escape(f"profile overrides the ANE implies: {json.dumps(overrides, sort_keys=True)}"),
                      highlight=False)


if __name__ == "__main__":
    # Run through the importable module, so probes registered by --import modules land in the same registry.
    from orion.runtime.doctor import child_main as _main

    sys.exit(_main())
