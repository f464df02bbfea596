"""The low-level model life: compile, load, evaluate on surfaces sized here, so the runtime's planner hides nothing;
and the small graph builders and exact references the probes share."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from orion.compiler.analysis import surface_bytes
from orion.compiler.targets import Target
from orion.runtime.doctor.registry import _error, _num

#: Where a child writes its scratch files: a directory its parent owns and removes even if the child crashes.
_scratch: Path | None = None


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
            weights = {rel: Path(tmp) / rel for rel in module.weight_files}
            functions = module.program.functions  # of a text with several, the model runs module.program's
            model = (backend.new_model(module.text, weights, function=module.program.function) if len(functions) > 1
                     else backend.new_model(module.text, weights))
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


def _surface_size(types, target: Target) -> int:
    """The runtime's surface for the largest of ``types`` on ``target``."""
    return surface_bytes(max((t.nbytes for _, t in types), default=0), target)


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
    arrays in surface order; sizes default to the runtime's plan (largest tensor, aligned, at least the minimum)."""
    in_types = sorted(program.inputs)
    out_types = sorted(program.output_types())
    arrays = [inputs[name] for name, _ in in_types] if isinstance(inputs, dict) else list(inputs)
    in_sizes = _sizes(input_bytes, len(arrays), _surface_size(in_types, backend.target))
    out_sizes = _sizes(output_bytes, len(out_types), _surface_size(out_types, backend.target))
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


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))
