"""I/O binding facts: surfaces sized and ordered by hand through the low-level model API; and weight updates."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from orion.runtime.doctor.harness import (
    C,
    S,
    _attempt,
    _builder,
    _emit,
    _evaluate,
    _fp16,
    _loaded,
    _mismatch,
    _public,
    _rng,
    _surface_size,
)
from orion.runtime.doctor.registry import Probe, _decode, _num, _nums, register


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
    size = _surface_size(module.program.inputs, backend.target)
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


FP32_SEQ = 16  # [1, 768, 1, 16] fp32 is 49,152 bytes: Orion's fp32 surfaces that work on M4 Max


def _run_fp32_io(backend) -> dict:
    """An fp32 input cast to fp16 inside, an fp16 value cast to an fp32 output, and an all-fp16 control; each
    ``x * 2`` on integers, exact in both types."""
    x = _fp16(_rng().integers(-512, 512, (1, C, 1, S)))
    narrow = x[..., :FP32_SEQ]
    cases = {
        "fp32-input": ("fp32", "fp16", narrow),
        "fp32-output": ("fp16", "fp32", narrow),
        "fp16-control": ("fp16", "fp16", x),
    }
    variants = {}
    for name, (dtype_in, dtype_out, data) in cases.items():
        b = _builder("fp32_io")
        y = b.input("x", data.shape, dtype_in)
        if dtype_in == "fp32":
            y = b.cast(y, "fp16", name="x16")
        y = b.mul(y, 2.0, name="twice" if dtype_out == "fp32" else "y")
        if dtype_out == "fp32":
            y = b.cast(y, "fp32", name="y")
        b.output("y", y)
        feed, expected = {"x": data}, {"y": data.astype(np.float64) * 2}  # the surface gets x in its declared type
        variants[name] = _public(_attempt(backend, _emit(b, backend), feed, expected, ("ANE-23",)))
    return {"variants": variants}


def _verdict_fp32_io(obs: dict) -> tuple[str, dict]:
    variants = obs["variants"]
    if not variants["fp16-control"].get("works"):
        return "the fp16 control fails: nothing settled", {}
    failed = {name: variants[name].get("stage") or "wrong data" for name in ("fp32-input", "fp32-output")
              if not variants[name].get("works")}
    if not failed:
        return "fp32 inputs and outputs work", {"io_dtypes": ["fp16", "fp32"]}
    return "fp16 only: " + ", ".join(f"{name} fails ({stage})" for name, stage in failed.items()), \
        {"io_dtypes": ["fp16"]}


register(Probe("fp32-io", ("ANE-23", "io_dtypes"),
               "may a program take an fp32 input (cast to fp16 inside) and give an fp32 output (cast from fp16), "
               "next to an fp16 control", _run_fp32_io, _verdict_fp32_io))


PACKED_SEQ = 17  # 34 bytes per row: packed and 64-byte-row layouts differ


def _run_packed(backend) -> dict:
    b = _builder("packed")
    b.output("y", b.add(b.input("x", (1, C, 1, PACKED_SEQ)), 0.5, name="y"))
    module = _emit(b, backend)
    x = _fp16(np.arange(C * PACKED_SEQ).reshape(1, C, 1, PACKED_SEQ) % 512)
    expected = x.astype(np.float64) + 0.5
    rows = 64 // 2  # fp16 elements per 64-byte row
    size = max(_surface_size(module.program.inputs, backend.target), C * 64)

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
