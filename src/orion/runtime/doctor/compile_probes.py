"""Compile-time facts: the CONFLICT items and single reports (each variant is its own program and compile)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from orion.runtime.doctor.harness import (
    C,
    S,
    _attempt,
    _builder,
    _conv,
    _emit,
    _fp16,
    _gelu_exact,
    _gelu_tanh,
    _matmul,
    _public,
    _rng,
    _sigmoid,
    _without_param,
)
from orion.runtime.doctor.registry import Probe, register


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
SCALAR = 0.5  # an fp16 scalar operand: every partial sum below stays exact in fp16


def _blob_program(backend, x: np.ndarray, blobs: int, scalar_reads: int = 0):
    """``x`` plus ``blobs`` BLOBFILE constants, then plus one named fp16 scalar const read by ``scalar_reads`` ops
    (an explicit const: the doctor runs no passes, so nothing merges or folds it): (module, expected output)."""
    b = _builder("blobs")
    y = b.input("x", x.shape)
    expected = x.astype(np.float64)
    for i in range(blobs):
        w = ((np.arange(C) + i) % 4 / 4.0).reshape(1, C, 1, 1)  # quarters: every partial sum is exact in fp16
        expected = expected + w
        y = b.add(y, b.weight(f"w{i}", w), name=f"acc{i}")
    if scalar_reads:
        s = b.const(np.float16(SCALAR), name="s")
        for i in range(scalar_reads):
            y = b.add(y, s, name=f"plus_s{i}")
        expected = expected + SCALAR * scalar_reads
    b.output("y", y)
    return _emit(b, backend), expected


def _run_blob_limit(backend) -> dict:
    """Variants ``N`` (N blobs) and ``N+s`` (N-1 blobs and one scalar operand: N weight tensors) for each count;
    then, where the limit is found exactly, ``L+shared``: L-1 blobs and one scalar read by two ops, L tensors if a
    shared scalar takes one slot and L+1 if it takes one per use."""
    rng = _rng()
    x = _fp16(rng.integers(-8, 9, (1, C, 1, S)))

    def attempt(blobs: int, scalar_reads: int = 0) -> dict:
        module, expected = _blob_program(backend, x, blobs, scalar_reads)
        return _public(_attempt(backend, module, {"x": x}, {"y": expected}, ("ANE-21",)))

    variants = {}
    for n in BLOB_COUNTS:
        variants[str(n)] = attempt(n)
        variants[f"{n}+s"] = attempt(n - 1, 1)
    obs = {"variants": variants}
    best, failed = _blob_ladder(obs)
    if best is not None and failed == best + 1:
        variants[f"{best}+shared"] = attempt(best - 1, 2)
    return obs


def _ladder(obs: dict, steps: Sequence[int],
            works: Callable[[int], bool] | None = None) -> tuple[int | None, int | None]:
    """(largest step that works with every smaller step working, first step that fails); a step works when its
    variant does, or when ``works(step)`` says so."""
    works = works or (lambda n: _variants_verdict(obs, str(n)))
    best, failed = None, None
    for n in steps:
        if works(n):
            if failed is None:
                best = n
        elif failed is None:
            failed = n
    return best, failed


def _blob_ladder(obs: dict) -> tuple[int | None, int | None]:
    """The ladder of weight-tensor counts where N blobs and N-1 blobs plus a scalar both work."""
    return _ladder(obs, BLOB_COUNTS, lambda n: _variants_verdict(obs, str(n)) and _variants_verdict(obs, f"{n}+s"))


def _verdict_blob_limit(obs: dict) -> tuple[str, dict]:
    best, failed = _blob_ladder(obs)
    if best is None:
        return f"fails already with {BLOB_COUNTS[0]} weight tensors", {}
    if failed is None:
        return f"no limit up to {best} weight tensors", {"max_blob_constants": best}
    scalar_free = [n for n in BLOB_COUNTS if n > best and _variants_verdict(obs, f"{n}+s")]
    text = f"{best} weight tensors work, {failed} fail"
    if scalar_free:
        text += f" (yet {scalar_free[0] - 1} blobs and a scalar work: a scalar took no slot)"
    value: dict = {"max_blob_constants": best}
    shared = obs["variants"].get(f"{best}+shared")
    if shared is not None:
        one = bool(shared.get("works"))
        value["shared_scalar_slots"] = "one" if one else "per-use"
        text += "; a scalar read by two ops takes " + ("one slot" if one else "a slot per use")
    return text, value


register(Probe("blob-constant-limit", ("ANE-21", "max_blob_constants", "shared_scalar_slots"),
               f"how many weight tensors one program may have: N BLOBFILE constants, or N-1 and a named scalar "
               f"operand (N = {', '.join(map(str, BLOB_COUNTS))}), and whether a scalar read twice costs one slot",
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


# -- several functions in one program (CONTESTED: every public request passes procedureIndex 0) ---------------------


def multi_function_modules(backend) -> dict:
    """One text with two functions over one shared weight file, ``main`` (x + w) and ``decode`` (x * w), as a
    module per function (each module's ``program`` is its function; the text and weight files are shared)."""
    import dataclasses

    from orion.mil.emit import MILModule
    from orion.mil.parse import parse_program

    w = _fp16(np.linspace(-2, 2, C).reshape(1, C, 1, 1))
    texts = []
    for name, op in (("main", "add"), ("decode", "mul")):
        b = _builder(name)
        b.output("y", b.op(op, name="y", x=b.input("x", (1, C, 1, S)), y=b.weight("w", w)))
        module = _emit(b, backend)  # both write weights/w.bin with the same values: one file for the two
        texts.append(dataclasses.replace(module.program, function=name).to_text(backend.target.mil_version))
    header = texts[0].splitlines()[:3]  # program(...), buildInfo, "{"
    bodies = [line for text in texts for line in text.splitlines()[3:-1]]
    text = "\n".join(header + bodies + ["}"]) + "\n"
    return {name: MILModule(parse_program(text, function=name), text, module.weight_files, module.weight_names)
            for name in ("main", "decode")}, w


def _run_multi_function(backend) -> dict:
    modules, w = multi_function_modules(backend)
    x = _fp16(_rng().uniform(-4, 4, (1, C, 1, S)))
    expected = {"main": x.astype(np.float64) + w, "decode": x.astype(np.float64) * w}
    variants = {name: _public(_attempt(backend, module, {"x": x}, {"y": expected[name]}, ("ANE-42",), 1e-3))
                for name, module in modules.items()}
    return {"variants": variants}


def _verdict_multi_function(obs: dict) -> tuple[str, dict]:
    works = {name: _variants_verdict(obs, name) for name in ("main", "decode")}
    if all(works.values()):
        return "each function runs by the request's procedure index", {"multi_function": "procedure-index"}
    if not any(v.get("compiled") for v in obs["variants"].values()):
        return "a program with several functions does not compile (or the target assumes so)", \
            {"multi_function": "unknown"}
    return f"compiles, but only {[n for n, ok in works.items() if ok] or 'no function'} gives its outputs", \
        {"multi_function": "unknown"}


register(Probe("multi-function", ("ANE-42", "multi_function"),
               "does a program with two functions sharing a weight compile, and does procedureIndex 1 run the second",
               _run_multi_function, _verdict_multi_function))


# -- compressed weights (UNKNOWN: how many weight slots a constexpr weight takes; per-block scales unmeasured) -------

#: Chained convs with int8 weights (data + scale each): 16 take 16 slots under "one" and 32 under "per-blob"; 8 fit
#: either way, so a refusal of 16 alone points at the slot count rather than at compressed weights themselves.
COMPRESSED_CHAINS = (16, 8)
#: Each scheme of :func:`~orion.compiler.passes.compress_weights` the ANE may decode differently.
COMPRESSED_SCHEMES = ("int8", "int4/32", "lut4")
COMPRESSED_TOLERANCE = 0.01  # fp16 rounding of a 768-term sum, relative to max(1, |y|): far below a wrong decode


def _compressed_chain(backend, count: int, weights: str, rng):
    """``count`` chained 768x768 convs compiled for the backend's target with ``weights`` compression, with the
    fp16 weights decoded as the constexpr ops store them."""
    from orion.compiler.compile import compile_graph
    from orion.compiler.passes import WeightCompression, decoded_weight

    spec = WeightCompression.of(weights)
    b = _builder("compressed")
    y, decoded = b.input("x", (1, C, 1, S)), []
    for i in range(count):
        w = rng.normal(0.0, 1.0 / np.sqrt(C), (C, C, 1, 1))
        decoded.append(decoded_weight(w.astype(np.float16).astype(np.float64), spec))
        y = _conv(b, y, b.weight(f"w{i}", w.astype(np.float16)), f"y{i}" if i < count - 1 else "y")
    b.output("y", y)
    return compile_graph(b.graph, backend.target, weights=spec).module, decoded


def _decoded_reference(x: np.ndarray, decoded: list[np.ndarray]) -> np.ndarray:
    y = x.astype(np.float64)
    for w in decoded:
        y = np.einsum("oi,bihw->bohw", w[:, :, 0, 0], y)
    return y


def _run_compressed(backend) -> dict:
    rng = _rng()
    x = _fp16(rng.uniform(-1, 1, (1, C, 1, S)))
    chains = {}
    for count in COMPRESSED_CHAINS:
        module, _ = _compressed_chain(backend, count, "int8", rng)
        chains[str(count)] = _public(_attempt(backend, module, {"x": x}, None, ("ANE-21",)))
    schemes = {}
    for scheme in COMPRESSED_SCHEMES:
        module, decoded = _compressed_chain(backend, 1, scheme, rng)
        schemes[scheme] = _public(_attempt(backend, module, {"x": x}, {"y": _decoded_reference(x, decoded)},
                                           ("ANE-21", "ANE-44"), COMPRESSED_TOLERANCE))
    return {"chains": chains, "schemes": schemes}


def _verdict_compressed(obs: dict) -> tuple[str, dict]:
    many, few = (obs["chains"][str(n)] for n in COMPRESSED_CHAINS)
    matched = [s for s, v in obs["schemes"].items() if v.get("works")]
    wrong = [s for s, v in obs["schemes"].items() if v.get("evaluated") and not v.get("works")]
    refused = [s for s, v in obs["schemes"].items() if not v.get("evaluated")]
    decodes = f"decoded right: {matched or 'none'}" + (f"; wrong: {wrong}" if wrong else "") \
        + (f"; did not run: {refused}" if refused else "")
    if many.get("compiled"):
        return f"{COMPRESSED_CHAINS[0]} int8 weights compile: a compressed weight takes one slot; {decodes}", \
            {"compressed_weight_slots": "one"}
    if few.get("compiled"):
        return f"{COMPRESSED_CHAINS[1]} int8 weights compile, {COMPRESSED_CHAINS[0]} do not: each stored part takes " \
               f"a slot; {decodes}", {"compressed_weight_slots": "per-blob"}
    return f"no program of int8 weights compiles; {decodes}", {}


register(Probe("compressed-weights", ("ANE-21", "ANE-44", "compressed_weight_slots"),
               "do 16 int8 weights (data + scale each) fit the 16 weight tensors, and do int8, per-block int4 "
               "(shift-scale) and lut4 weights decode to the fp16 values they store",
               _run_compressed, _verdict_compressed))
