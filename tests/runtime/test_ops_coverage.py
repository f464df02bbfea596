"""The MIL ops beyond the transformer set, each run as MIL text by the emulator and compared with an oracle nobody
here wrote: coremltools' own numpy meaning of the op (its ``value_inference``), on the same fp16 inputs widened to
float32, within fp16 rounding (one ulp of the oracle's fp16 value)."""

from __future__ import annotations

import numpy as np
import pytest

from orion.compiler.compile import compile_graph
from orion.errors import GraphError
from orion.ir.builder import GraphBuilder
from orion.runtime.backends.emulator import load_text

SHAPE = (1, 6, 1, 16)


@pytest.fixture(scope="module")
def coreml():
    """``coreml(op, x=..., **params)``: coremltools' value of the op on constant inputs (its value_inference)."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import Builder as mb, Function

    def value(op: str, **params):
        with Function({}, opset_version=ct.target.iOS18):
            return np.asarray(getattr(mb, op)(**params).val, dtype=np.float64)

    return value


def _literal(value) -> tuple[str, str]:
    """A MIL type and literal for a parameter value: fp16 scalars, int32 scalars or lists, bools, strings."""
    if isinstance(value, bool):
        return "bool", f"bool({str(value).lower()})"
    if isinstance(value, int):
        return "int32", f"int32({value})"
    if isinstance(value, float):
        return "fp16", f"fp16({value!r})"
    if isinstance(value, str):
        return "string", f'string("{value}")'
    t = f"tensor<int32, [{len(value)}]>"
    return t, f"{t}([{', '.join(str(int(v)) for v in value)}])"


def run_op(tmp_path, op: str, x: np.ndarray, out_shape=None, out_dtype: str = "fp16", **params) -> np.ndarray:
    """Run ``op(x=x, **params)`` as a one-op MIL program (parameters as named consts) in the emulator."""
    lines = []
    for name, value in params.items():
        t, lit = _literal(value)
        lines.append(f'        {t} p_{name} = const()[name=string("p_{name}"), val={lit}];')
    args = ", ".join([f"{name}=p_{name}" for name in params] + ["x=x"])
    out_shape = list(x.shape if out_shape is None else out_shape)
    lines.append(f'        tensor<{out_dtype}, {out_shape}> y = {op}({args})[name=string("y")];')
    text = (f"program(1.3)\n{{\n    func main<ios18>(tensor<fp16, {list(x.shape)}> x) {{\n" + "\n".join(lines)
            + "\n    } -> (y);\n}\n")
    return load_text(text, tmp_path).run({"x": x})["y"]


def assert_within_fp16(got: np.ndarray, oracle: np.ndarray, ulps: float = 1.0, what: str = "",
                       intermediate: np.ndarray | None = None) -> None:
    """``got`` (fp16) is within ``ulps`` fp16 ulps of the oracle's exact value rounded to fp16, plus one ulp of an
    ``intermediate`` value the op rounds on the way (a wide sum before its bias add)."""
    ref = np.asarray(oracle, dtype=np.float64).astype(np.float16)
    assert got.shape == ref.shape, what
    assert np.isfinite(ref).all(), f"{what}: the oracle is not finite; pick another input range"
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bound = ulps * np.spacing(np.abs(ref)).astype(np.float64)
    if intermediate is not None:
        bound = bound + np.spacing(np.abs(np.asarray(intermediate).astype(np.float16))).astype(np.float64)
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), (f"{what}: emulator {got.flat[worst]} vs oracle {oracle.flat[worst]} "
                                  f"(rounded {ref.flat[worst]})")


def _fp16_input(rng, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, SHAPE).astype(np.float16)


# -- 1. elementwise ops and activations ------------------------------------------------------------------------------

UNARY = [  # op, input range, parameters (fp16-representable), kind of rounding
    ("abs", (-8, 8), {}),
    ("sign", (-8, 8), {}),
    ("floor", (-8, 8), {}),
    ("ceil", (-8, 8), {}),
    ("round", (-8, 8), {}),
    ("square", (-8, 8), {}),
    ("relu6", (-4, 10), {}),
    ("clip", (-4, 4), {"alpha": -1.5, "beta": 2.25}),
    ("leaky_relu", (-4, 4), {"alpha": 0.125}),
    ("leaky_relu", (-4, 4), {"alpha": 0.2998046875}),  # a product that rounds
    ("elu", (-4, 4), {"alpha": 0.75}),
    ("softplus", (-6, 6), {}),
    ("erf", (-3, 3), {}),
    ("sin", (-6, 6), {}),
    ("cos", (-6, 6), {}),
    ("exp2", (-6, 6), {}),
    ("inverse", (0.05, 8), {}),
    ("inverse", (-8, -0.05), {"epsilon": 0.5}),
    ("log", (0.01, 100), {}),
    ("log", (0.01, 100), {"epsilon": 0.25}),
    ("rsqrt", (0.01, 100), {}),
    ("rsqrt", (0.01, 100), {"epsilon": 0.75}),
]


@pytest.mark.parametrize("op, bounds, params", UNARY, ids=[f"{u[0]}{sorted(u[2].items())}" for u in UNARY])
def test_unary_op_matches_coremltools(tmp_path, rng, coreml, op, bounds, params):
    x = _fp16_input(rng, *bounds)
    if op == "round":  # not a tie: coremltools (numpy) rounds ties to even, the ANE away from zero (see below)
        x[np.abs(x - np.trunc(x)) == 0.5] += np.float16(0.125)
    got = run_op(tmp_path, op, x, **params)
    oracle = coreml(op, x=x.astype(np.float32), **{k: np.float32(v) for k, v in params.items()})
    assert_within_fp16(got, oracle, what=op)


def test_default_epsilons_are_coremltools_defaults_held_in_fp16(tmp_path, coreml):
    """coremltools' defaults typed as fp16 (the only dtype the ANE computes in): inverse adds fp16(1e-4); log's
    1e-45 and rsqrt's 1e-12 are 0 in fp16, so log(0) is the ANE's -45440 (N6) and rsqrt(0) is inf."""
    x = np.array([0.0, 1e-3, 2.0, 7.0], np.float16).reshape(1, 1, 1, 4)
    assert_within_fp16(run_op(tmp_path, "inverse", x), coreml("inverse", x=x), what="inverse")
    assert run_op(tmp_path, "inverse", x)[0, 0, 0, 0] == np.float16(1 / np.float16(1e-4))
    assert run_op(tmp_path, "log", x)[0, 0, 0, 0] == -45440
    assert run_op(tmp_path, "log", x, epsilon=0.5)[0, 0, 0, 0] == np.float16(np.log(0.5))
    assert run_op(tmp_path, "rsqrt", x)[0, 0, 0, 0] == np.inf
    for op in ("log", "rsqrt"):
        assert_within_fp16(run_op(tmp_path, op, x)[..., 1:], coreml(op, x=x[..., 1:]), what=op)


def test_round_sends_ties_away_from_zero_as_the_ane_does(tmp_path):
    """ANEForge's sweeps (N10): the ANE's round takes ties away from zero; coremltools' numpy meaning would give
    [-2, -0, 0, 2, 2]."""
    x = np.array([-2.5, -0.5, 0.5, 1.5, 2.5], np.float16).reshape(1, 1, 1, 5)
    assert run_op(tmp_path, "round", x).ravel().tolist() == [-3, -1, 1, 2, 3]


def test_float_parameters_go_through_builder_and_emitter_as_consts_of_the_ops_dtype(tmp_path, rng, coreml):
    b = GraphBuilder("clip")
    x = b.input("x", SHAPE)
    b.output("y", b.elu(b.clip(x, alpha=-1.5, beta=2.5), alpha=0.5))
    result = compile_graph(b.graph, target="m4")
    assert 'fp16 clip_alpha = const()[name=string("clip_alpha"), val=fp16(-1.5)]' in result.module.text
    result.module.write(tmp_path)
    data = _fp16_input(rng, -4, 4)
    got = load_text(result.module.text, tmp_path).run({"x": data})["y"]
    clipped = coreml("clip", x=data.astype(np.float32), alpha=np.float32(-1.5), beta=np.float32(2.5))
    assert_within_fp16(got, coreml("elu", x=clipped.astype(np.float32), alpha=np.float32(0.5)), what="clip+elu")


def test_catalog_refuses_ops_not_known_to_run_on_the_ane(tmp_path):
    """The emulator runs every declared op, but ANE-34 still names the ones nobody reported running on the ANE."""
    b = GraphBuilder("mix")
    x = b.input("x", SHAPE)
    b.output("y", b.erf(b.sin(x)))
    found = [(v.constraint, v.message) for v in compile_graph(b.graph, target="m4").violations]
    assert [c for c, m in found if "'sin'" in m] == ["ANE-34"]
    assert not [c for c, m in found if "'erf'" in m]


# -- 2. reductions and softmax ----------------------------------------------------------------------------------------

REDUCTIONS = [  # op, input range (the log ones need positive sums), axes
    ("reduce_min", (-8, 8), [1]),
    ("reduce_min", (-8, 8), [1, 3]),
    ("reduce_prod", (0.5, 1.5), [1]),
    ("reduce_prod", (-1.5, 1.5), [3]),
    ("reduce_l1_norm", (-4, 4), [1]),
    ("reduce_l2_norm", (-4, 4), [1]),
    ("reduce_l2_norm", (-4, 4), [-1]),
    ("reduce_sum_square", (-4, 4), [1]),
    ("reduce_log_sum", (0.1, 4), [3]),
    ("reduce_log_sum_exp", (-6, 6), [1]),
    ("reduce_log_sum_exp", (-6, 6), [1, 3]),
]


@pytest.mark.parametrize("keep_dims", [True, False])
@pytest.mark.parametrize("op, bounds, axes", REDUCTIONS, ids=[f"{r[0]}{r[2]}" for r in REDUCTIONS])
def test_reduction_matches_coremltools(tmp_path, rng, coreml, op, bounds, axes, keep_dims):
    x = _fp16_input(rng, *bounds)
    oracle = coreml(op, x=x.astype(np.float32), axes=axes, keep_dims=keep_dims)
    got = run_op(tmp_path, op, x, out_shape=oracle.shape, axes=axes, keep_dims=keep_dims)
    assert_within_fp16(got, oracle, what=op)


def test_log_sum_exp_does_not_overflow_where_the_exact_value_is_finite(tmp_path):
    """exp(1000) is beyond even float64, but the log-sum-exp of a row of 1000s (1000 + log 16) is not."""
    x = np.full(SHAPE, 1000.0, np.float16)
    got = run_op(tmp_path, "reduce_log_sum_exp", x, out_shape=(1, 6, 1, 1), axes=[3], keep_dims=True)
    assert_within_fp16(got, np.full((1, 6, 1, 1), 1000 + np.log(16)), what="lse")


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_softmax_over_any_axis_matches_coremltools(tmp_path, rng, coreml, axis):
    x = rng.uniform(-6, 6, (2, 6, 3, 16)).astype(np.float16)
    got = run_op(tmp_path, "softmax", x, axis=axis)
    assert_within_fp16(got, coreml("softmax", x=x.astype(np.float32), axis=axis), what=f"softmax axis {axis}")


# -- 3. linear and normalizations -------------------------------------------------------------------------------------


def _const_tensor(name: str, array: np.ndarray) -> str:
    t = f"tensor<fp16, {list(array.shape)}>"
    values = ", ".join(repr(float(v)) for v in array.ravel())
    return f'        {t} {name} = const()[name=string("{name}"), val={t}([{values}])];'


def run_with_tensors(tmp_path, op: str, x: np.ndarray, out_shape, tensors: dict, **params) -> np.ndarray:
    """``run_op`` with constant tensor parameters (weights, gamma, ...) written inline as fp16 consts."""
    lines = [_const_tensor(f"t_{name}", value) for name, value in tensors.items()]
    for name, value in params.items():
        t, lit = _literal(value)
        lines.append(f'        {t} p_{name} = const()[name=string("p_{name}"), val={lit}];')
    args = ", ".join([f"{n}=t_{n}" for n in tensors] + [f"{n}=p_{n}" for n in params] + ["x=x"])
    lines.append(f'        tensor<fp16, {list(out_shape)}> y = {op}({args})[name=string("y")];')
    text = (f"program(1.3)\n{{\n    func main<ios18>(tensor<fp16, {list(x.shape)}> x) {{\n" + "\n".join(lines)
            + "\n    } -> (y);\n}\n")
    return load_text(text, tmp_path).run({"x": x})["y"]


def _f32(tensors: dict) -> dict:
    return {k: v.astype(np.float32) for k, v in tensors.items()}


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(24,), (5, 24), (2, 5, 24)])
def test_linear_matches_coremltools(tmp_path, rng, coreml, x_shape, with_bias):
    x = rng.normal(0, 1, x_shape).astype(np.float16)
    tensors = {"weight": rng.normal(0, 0.3, (7, 24)).astype(np.float16)}
    if with_bias:
        tensors["bias"] = rng.normal(0, 1, (7,)).astype(np.float16)
    oracle = coreml("linear", x=x.astype(np.float32), **_f32(tensors))
    got = run_with_tensors(tmp_path, "linear", x, oracle.shape, tensors)
    # the wide sum is rounded, then the bias add (as a conv and its bias add): one ulp of each
    wide = coreml("linear", x=x.astype(np.float32), weight=tensors["weight"].astype(np.float32))
    assert_within_fp16(got, oracle, what="linear", intermediate=wide if with_bias else None)


@pytest.mark.parametrize("axes", [[1], [-1], [1, 3], None])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_coremltools(tmp_path, rng, coreml, axes, affine):
    x = rng.normal(0.5, 2, (2, 6, 1, 16)).astype(np.float16)
    axes_or_all = list(range(4)) if axes is None else axes
    shape = tuple(x.shape[a % 4] for a in sorted(a % 4 for a in axes_or_all))
    tensors = {}
    if affine:
        tensors = {"gamma": rng.normal(1, 0.5, shape).astype(np.float16),
                   "beta": rng.normal(0, 0.5, shape).astype(np.float16)}
    params = {"epsilon": 0.25} if affine else {}  # a large epsilon, so that dropping it shows
    if axes is not None:
        params["axes"] = axes
    # coremltools' default axes (all of them) cannot be filled on constant inputs: the oracle gets them explicitly
    oracle = coreml("layer_norm", x=x.astype(np.float32), **_f32(tensors),
                    **{k: (np.float32(v) if k == "epsilon" else v) for k, v in {"axes": axes_or_all, **params}.items()})
    got = run_with_tensors(tmp_path, "layer_norm", x, x.shape, tensors, **params)
    assert_within_fp16(got, oracle, what="layer_norm")


def test_batch_norm_matches_torch(tmp_path, rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(0.5, 2, (2, 6, 1, 16)).astype(np.float16)
    tensors = {"mean": rng.normal(0, 1, 6), "variance": rng.uniform(0.2, 3, 6), "gamma": rng.normal(1, 0.5, 6),
               "beta": rng.normal(0, 0.5, 6)}
    tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
    t = {k: torch.tensor(v.astype(np.float64)) for k, v in tensors.items()}
    oracle = torch.nn.functional.batch_norm(torch.tensor(x.astype(np.float64)), t["mean"], t["variance"],
                                            t["gamma"], t["beta"], training=False, eps=0.125).numpy()
    got = run_with_tensors(tmp_path, "batch_norm", x, x.shape, tensors, epsilon=0.125)
    assert_within_fp16(got, oracle, what="batch_norm")


@pytest.mark.parametrize("shape", [(2, 6, 1, 16), (2, 6, 16)])
def test_instance_norm_matches_torch(tmp_path, rng, shape):
    torch = pytest.importorskip("torch")
    x = rng.normal(0.5, 2, shape).astype(np.float16)
    tensors = {"gamma": rng.normal(1, 0.5, 6).astype(np.float16), "beta": rng.normal(0, 0.5, 6).astype(np.float16)}
    oracle = torch.nn.functional.instance_norm(
        torch.tensor(x.astype(np.float64)), weight=torch.tensor(tensors["gamma"].astype(np.float64)),
        bias=torch.tensor(tensors["beta"].astype(np.float64)), eps=0.25).numpy()
    got = run_with_tensors(tmp_path, "instance_norm", x, x.shape, tensors, epsilon=0.25)
    assert_within_fp16(got, oracle, what="instance_norm")


@pytest.mark.parametrize("shape", [(2, 6, 1, 16), (6, 2, 16)])
def test_l2_norm_matches_coremltools(tmp_path, rng, coreml, shape):
    x = rng.normal(0, 0.1, shape).astype(np.float16)
    for params in ({}, {"epsilon": 0.5}):
        oracle = coreml("l2_norm", x=x.astype(np.float32), **{k: np.float32(v) for k, v in params.items()})
        assert_within_fp16(run_op(tmp_path, "l2_norm", x, **params), oracle, what=f"l2_norm {params}")


def test_norm_parameters_are_checked_and_emitted_as_weight_blobs(tmp_path, rng, coreml):
    b = GraphBuilder("norms")
    x = b.input("x", SHAPE)
    gamma, beta = rng.normal(1, 0.5, 6).astype(np.float16), rng.normal(0, 0.5, 6).astype(np.float16)
    with pytest.raises(GraphError, match=r"gamma has shape \[5\], expected \[6\]"):
        b.op("layer_norm", x=x, axes=[1], gamma=gamma[:5])
    weight = rng.normal(0, 0.3, (4, 16)).astype(np.float16)
    y = b.op("linear", x=b.op("layer_norm", x=x, axes=[1], gamma=gamma, beta=beta, epsilon=0.25), weight=weight)
    b.output("y", y)
    result = compile_graph(b.graph, target="m4")
    assert "BLOBFILE" in result.module.text and "val=fp16(0.25)" in result.module.text
    assert {v.constraint for v in result.violations if "layer_norm" in v.message or "linear" in v.message} == {
        "ANE-34"}
    result.module.write(tmp_path)
    data = rng.normal(0, 2, SHAPE).astype(np.float16)
    got = load_text(result.module.text, tmp_path).run({"x": data})["y"]
    normed = coreml("layer_norm", x=data.astype(np.float32), axes=[1], gamma=gamma.astype(np.float32),
                    beta=beta.astype(np.float32), epsilon=np.float32(0.25))
    oracle = coreml("linear", x=normed.astype(np.float16).astype(np.float32), weight=weight.astype(np.float32))
    assert_within_fp16(got, oracle, ulps=2, what="layer_norm then linear")
