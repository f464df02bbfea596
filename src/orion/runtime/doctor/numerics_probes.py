"""Numerics (reference section 9): raw values of the probes it lists, and the settings they imply."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from orion.runtime.doctor.harness import (
    S,
    _attempt,
    _builder,
    _emit,
    _fp16,
    _gelu_exact,
    _matmul,
    _public,
    _rng,
    _row,
    _sigmoid,
)
from orion.runtime.doctor.registry import Probe, _decode, _num, _nums, register


def _numerics_run(backend, b, feed: dict, catalog: Sequence[str] = ()) -> tuple[dict, dict | None]:
    """Run a numerics program; (observations, outputs or None). ``catalog``: as for ``_attempt``."""
    module = _emit(b, backend)
    obs = _attempt(backend, module, feed, None, catalog)
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
ROUND_HALVES = (0.5, 1.5, 2.5, -0.5, -2.5)
ROUND_MODES = {"half-even": (0.0, 2.0, 2.0, 0.0, -2.0), "half-away": (1.0, 2.0, 3.0, -1.0, -3.0)}  # -0.0 == 0.0


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
    b = _builder("round_ties")  # its own program: no public report has `round` running on the ANE (ANE-34)
    b.output("rounded", b.op("round", x=b.input("h", (1, 1, 1, 32))))
    obs["round"], out = _numerics_run(backend, b, {"h": _row(ROUND_HALVES)})
    if out is not None:
        obs.setdefault("values", {})["rounded"] = _nums(out["rounded"].reshape(-1)[:len(ROUND_HALVES)])
    return obs


def _tie_mode(values: list, modes: dict = TIE_MODES) -> str:
    got = tuple(_decode(values))
    return next((mode for mode, expect in modes.items() if got == expect), f"other {list(got)}")


def _verdict_ties(obs: dict) -> tuple[str, dict]:
    values = obs.get("values", {})
    if not values:
        return "did not run", {}
    modes = {k: _tie_mode(v, ROUND_MODES if k == "rounded" else TIE_MODES) for k, v in values.items()}
    value = {}
    for output, setting in (("added", "elementwise_ties"), ("multiplied", "reduction_ties"), ("rounded", "round_ties")):
        if modes.get(output) in TIE_MODES:
            value[f"numerics.{setting}"] = modes[output]
    text = ", ".join(f"{op} {modes[k]}" for op, k in (("add", "added"), ("reduce_sum", "reduced"),
                                                       ("matmul", "multiplied"), ("round", "rounded")) if k in modes)
    return text, value


register(Probe("numerics-ties", ("numerics.elementwise_ties", "numerics.reduction_ties", "numerics.round_ties"),
               "2048+1, 2048+3 and -2048-1 as add, reduce_sum and matmul, and round of +-0.5, 1.5, 2.5: how ties "
               "round (N10)", _run_ties, _verdict_ties))


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


#: The catalog entries for activations a target may say the ANE compiler rejects (gelu, silu, rsqrt): the emulator
#: run then fails to compile them as that chip would.
ACTIVATION_CATALOG = ("ANE-10", "ANE-27", "ANE-22")

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
        obs, out = _numerics_run(backend, b, {"x": x}, ACTIVATION_CATALOG)
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
#: The verdict where the fp32 program does not compile: a chip without fp32 I/O (fp32-io) has no such cast.
BOUNDARY_UNMEASURABLE = ("not measurable here: the fp32-input program did not compile, as on a chip that takes no "
                         "fp32 inputs or outputs (see fp32-io); there Orion's runtime makes fp16 on the CPU, and no "
                         "fp32 value reaches the ANE")


def _run_boundary(backend) -> dict:
    x = np.zeros((1, 1, 1, 32), dtype=np.float32)
    x.reshape(-1)[: len(BOUNDARY_VALUES)] = BOUNDARY_VALUES
    b = _builder("boundary")
    y16 = b.cast(b.input("x", x.shape, "fp32"), "fp16", name="y16")
    b.output("y16", y16)
    b.output("y32", b.cast(y16, "fp32", name="y32"))
    obs, out = _numerics_run(backend, b, {"x": x}, ("ANE-23",))  # a target without fp32 I/O: as on its chip
    if out is not None:
        n = len(BOUNDARY_VALUES)
        obs["inputs"] = _nums(BOUNDARY_VALUES)
        obs["values"] = {"fp16": _nums(out["y16"].reshape(-1)[:n]), "fp32": _nums(out["y32"].reshape(-1)[:n])}
    return obs


def _verdict_boundary(obs: dict) -> tuple[str, dict]:
    if "values" not in obs and obs.get("stage") == "compile":
        return BOUNDARY_UNMEASURABLE, {}
    if "values" not in obs:
        return "did not run", {}
    got = _decode(obs["values"]["fp16"])[: len(BOUNDARY_MODEL)]
    if np.array_equal(got, np.asarray(BOUNDARY_MODEL)):
        return "as modelled: >= 65520 and NaN become inf, 65519 rounds to 65504", {}
    return "differs from the model: " + ", ".join(f"{_num(v)}->{g}" for v, g in zip(BOUNDARY_VALUES, obs["values"][
        "fp16"])), {}


register(Probe("numerics-boundary-casts", (), "fp32 inputs 70000, 65519, 65520, NaN, 1e-7, 1e-8 cast to fp16 inside "
               "a program: overflow, rounding and NaN at the boundary (N1, N5, N6); needs fp32 I/O",
               _run_boundary, _verdict_boundary))


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


VERIFY_D, VERIFY_HEADS, VERIFY_CAPACITY, VERIFY_LENGTH, VERIFY_K = 128, 2, 64, 9, 6


def _run_exact_verify(backend) -> dict:
    """A decode block's attention as Orion builds it (q/k/v projections, ``cached_attention`` over a KV cache held in
    inputs, an output projection): K one-token passes, each committing its k/v, against one pass of the same K
    tokens in K columns, from the same cache. Exact speculative decoding needs the outputs equal bit for bit; it
    assumes the chip's products give a column the same bits whatever the other columns hold and wherever it sits."""
    from orion.ir.builder import decode_placement
    from orion.runtime.budget import CompileBudget
    from orion.runtime.cache import ProgramCache
    from orion.runtime.program import Program

    rng = _rng()
    d, cap, length, k = VERIFY_D, VERIFY_CAPACITY, VERIFY_LENGTH, VERIFY_K
    b = _builder("exact_verify")
    x = b.input("x", (1, d, 1, S))
    caches = {name: b.input(name, (1, d, 1, cap)) for name in ("kc", "vc")}
    mask, slots = b.input("mask", (1, 1, S, cap)), b.input("slots", (1, 1, S, cap))
    q, key, value = (b.linear(x, rng.normal(0, 0.1, (d, d)), rng.normal(0, 0.1, d), name=n) for n in "qkv")
    ctx, key, value = b.cached_attention(q, key, value, caches["kc"], caches["vc"], mask, slots, VERIFY_HEADS)
    b.output("y", b.linear(ctx, rng.normal(0, 0.1, (d, d)), name="o"))
    b.output("kn", key)
    b.output("vn", value)
    tokens = _fp16(rng.normal(0, 1, (d, k))).astype(np.float32)
    prefix = {name: np.zeros((1, d, 1, cap), np.float32) for name in caches}
    for cache in prefix.values():
        cache[0, :, 0, :length] = _fp16(rng.normal(0, 1, (d, length)))

    def run(program, cache: dict, start: int, n: int) -> dict:
        feed = np.zeros((1, d, 1, S), np.float32)
        feed[0, :, 0, :n] = tokens[:, start - length:start - length + n]
        placed, masked = decode_placement(start, n, S, cap)
        return program.run({"x": feed, **cache, "slots": placed[None, None], "mask": masked[None, None]})

    with Program.from_graph(b.graph, target=backend.target, backend=backend, cache=ProgramCache(None),
                            budget=CompileBudget(4)) as program:
        cache = {name: c.copy() for name, c in prefix.items()}
        single = []
        for j in range(k):
            out = run(program, cache, length + j, 1)
            single.append(out["y"][0, :, 0, 0].astype(np.float64))
            for name, new in (("kc", "kn"), ("vc", "vn")):
                cache[name][0, :, 0, length + j] = out[new][0, :, 0, 0]
        together = run(program, prefix, length, k)["y"][0, :, 0, :k].T.astype(np.float64)
    single = np.stack(single)
    return {"values": {"equal": [bool(np.array_equal(t, s)) for t, s in zip(together, single)],
                       "max_abs_diff": _nums(np.abs(together - single).max(axis=1)),
                       "scale": _num(np.abs(single).max())}}


def _verdict_exact_verify(obs: dict) -> tuple[str, dict]:
    equal = obs["values"]["equal"]
    if all(equal):
        return f"bit-exact: {len(equal)} tokens in one pass give their one-token passes' outputs", {}
    differ = [i for i, same in enumerate(equal) if not same]
    worst = max(float(v) for v in _decode(obs["values"]["max_abs_diff"]))
    return (f"not bit-exact: positions {differ} differ by up to {worst:.3g} of {float(obs['values']['scale']):.3g} "
            "(speculative decoding keeps the target's distribution, not its exact greedy tokens)", {})


register(Probe("exact-verify", (),
               f"do {VERIFY_K} tokens attended in one decode pass (cached_attention) give, bit for bit, the outputs "
               "of one pass per token: the column independence exact speculative decoding assumes",
               _run_exact_verify, _verdict_exact_verify))
