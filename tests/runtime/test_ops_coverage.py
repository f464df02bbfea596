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
from orion.runtime.backends.numerics import Numerics
from tests.runtime.op_oracles import assert_within_fp16, mil_literal

SHAPE = (1, 6, 1, 16)


def run_op(tmp_path, op: str, x: np.ndarray, out_shape=None, out_dtype: str = "fp16", **params) -> np.ndarray:
    """Run ``op(x=x, **params)`` as a one-op MIL program (parameters as named consts) in the emulator."""
    lines = []
    for name, value in params.items():
        t, lit = mil_literal(value)
        lines.append(f'        {t} p_{name} = const()[name=string("p_{name}"), val={lit}];')
    args = ", ".join([f"{name}=p_{name}" for name in params] + ["x=x"])
    out_shape = list(x.shape if out_shape is None else out_shape)
    lines.append(f'        tensor<{out_dtype}, {out_shape}> y = {op}({args})[name=string("y")];')
    text = (f"program(1.3)\n{{\n    func main<ios18>(tensor<fp16, {list(x.shape)}> x) {{\n" + "\n".join(lines)
            + "\n    } -> (y);\n}\n")
    return load_text(text, tmp_path).run({"x": x})["y"]


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
        t, lit = mil_literal(value)
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


# -- 4. conv, conv_transpose and pools --------------------------------------------------------------------------------


def _same_pads(spatial, kernel, strides, dilations, lower: bool = False) -> list[int]:
    """TensorFlow's SAME padding (which coremltools follows): output ceil(in / stride), the odd pad after (before for
    ``same_lower``); as torch's pad order, last axis first."""
    pads = []
    for i, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if lower else (small, big))
    return [p for pair in reversed(pads) for p in pair]


def _torch_pads(pad_type: str, spatial, kernel, strides, dilations, pad) -> list[int]:
    if pad_type == "custom":
        return [p for i in reversed(range(len(spatial))) for p in (pad[2 * i], pad[2 * i + 1])]
    if pad_type == "valid":
        return [0] * (2 * len(spatial))
    return _same_pads(spatial, kernel, strides, dilations, lower=pad_type == "same_lower")


def _quantization(summed_shape) -> float:
    """The most the default fixed-point accumulator (N3) moves a wide sum of this many products: half a grid step
    each (each product rounds to the grid once)."""
    return float(np.prod(summed_shape)) * Numerics().accumulator_grid / 2


CONVS = [  # x shape, weight shape, params (strides, dilations, pad_type, pad, groups)
    ((1, 4, 9, 11), (6, 4, 3, 3), {"pad_type": "valid"}),
    ((2, 4, 9, 11), (6, 4, 3, 2), {"strides": [2, 3], "dilations": [1, 1], "pad_type": "valid"}),
    ((1, 4, 9, 11), (6, 4, 3, 3), {"strides": [1, 1], "dilations": [2, 3], "pad_type": "valid"}),
    ((1, 4, 10, 11), (6, 4, 3, 3), {"strides": [3, 2], "dilations": [2, 1], "pad_type": "same"}),
    ((1, 4, 10, 11), (6, 4, 4, 2), {"strides": [1, 2], "dilations": [1, 1], "pad_type": "same_lower"}),
    ((1, 4, 8, 8), (6, 4, 3, 5), {"strides": [2, 1], "dilations": [1, 2], "pad_type": "custom", "pad": [1, 2, 0, 3]}),
    ((1, 6, 8, 9), (9, 2, 3, 3), {"pad_type": "custom", "pad": [1, 1, 1, 1], "groups": 3}),
    ((1, 6, 8, 9), (6, 1, 3, 3), {"strides": [2, 2], "dilations": [1, 1], "pad_type": "same", "groups": 6}),
    ((1, 8, 1, 16), (5, 8, 1, 1), {}),  # the models' 1x1 conv
    ((2, 4, 20), (6, 4, 5), {"strides": [2], "dilations": [3], "pad_type": "custom", "pad": [4, 1]}),  # conv1d
    ((1, 6, 20), (4, 3, 3), {"strides": [1], "dilations": [1], "pad_type": "same", "groups": 2}),
]


def _conv_oracle(torch, x, w, bias, params, transpose=False):
    """torch's conv (float64) on ``x`` padded as the MIL parameters say."""
    rank = x.ndim - 2
    strides = params.get("strides", [1] * rank)
    dilations = params.get("dilations", [1] * rank)
    pads = _torch_pads(params.get("pad_type", "valid"), x.shape[2:], w.shape[2:], strides, dilations,
                       params.get("pad"))
    tx = torch.nn.functional.pad(torch.tensor(x.astype(np.float64)), pads)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}[rank]
    tb = None if bias is None else torch.tensor(bias.astype(np.float64))
    return conv(tx, torch.tensor(w.astype(np.float64)), tb, stride=strides, dilation=dilations,
                groups=params.get("groups", 1)).numpy()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_shape, w_shape, params", CONVS, ids=[f"{c[0]}x{c[1]}{sorted(c[2].items())}" for c in CONVS])
def test_conv_matches_torch(tmp_path, rng, x_shape, w_shape, params, with_bias):
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 1, x_shape).astype(np.float16)
    tensors = {"weight": rng.normal(0, 0.3, w_shape).astype(np.float16)}
    if with_bias:
        tensors["bias"] = rng.normal(0, 1, w_shape[:1]).astype(np.float16)
    oracle = _conv_oracle(torch, x, tensors["weight"], tensors.get("bias"), params)
    got = run_with_tensors(tmp_path, "conv", x, oracle.shape, tensors, **params)
    # the wide sum is rounded once, then the bias add rounds again (one ulp of each)
    wide = _conv_oracle(torch, x, tensors["weight"], None, params) if with_bias else None
    assert_within_fp16(got, oracle, what="conv", intermediate=wide, absolute=_quantization(w_shape[1:]))


def test_conv_is_one_wide_sum_under_the_2_15_ceiling(tmp_path):
    """A 3x3 conv over 4 channels sums 36 products in one wide sum: 36 * 32 * 28 = 32256 stays below 2^15, while
    36 * 32 * 32.75 = 37728 reaches the ceiling and reads inf (N4), though every kernel row's partial sum (12
    products, 12576) is far below it."""
    x = np.full((1, 4, 3, 3), 32.0, np.float16)
    below = run_with_tensors(tmp_path, "conv", x, (1, 1, 1, 1), {"weight": np.full((1, 4, 3, 3), 28, np.float16)})
    assert below.item() == 36 * 32 * 28
    above = run_with_tensors(tmp_path, "conv", x, (1, 1, 1, 1),
                             {"weight": np.full((1, 4, 3, 3), 32.75, np.float16)})
    assert above.item() == np.inf


def test_a_1x1_conv_is_bit_identical_to_the_matmul_of_its_weight(tmp_path, rng):
    """The models' convs (1x1, stride 1, no padding) keep the wide sums of a plain matmul, bit for bit."""
    x = rng.normal(0, 2, (1, 48, 1, 32)).astype(np.float16)
    w = rng.normal(0, 0.5, (16, 48, 1, 1)).astype(np.float16)
    got = run_with_tensors(tmp_path, "conv", x, (1, 16, 1, 32), {"weight": w})
    lines = [_const_tensor("w", w[:, :, 0, 0]),
             '        tensor<int32, [2]> s = const()[name=string("s"), val=tensor<int32, [2]>([48, 32])];',
             '        tensor<fp16, [48, 32]> rows = reshape(x=x, shape=s)[name=string("rows")];',
             '        tensor<fp16, [16, 32]> y = matmul(x=w, y=rows)[name=string("y")];']
    text = ("program(1.3)\n{\n    func main<ios18>(tensor<fp16, [1, 48, 1, 32]> x) {\n" + "\n".join(lines)
            + "\n    } -> (y);\n}\n")
    expected = load_text(text, tmp_path).run({"x": x})["y"]
    np.testing.assert_array_equal(got.reshape(16, 32).view(np.uint16), expected.view(np.uint16))


CONV_TRANSPOSES = [  # x shape, weight shape [C_in, C_out/groups, *K], params
    ((1, 4, 5, 6), (4, 3, 3, 3), {"pad_type": "valid"}),
    ((2, 4, 5, 6), (4, 3, 3, 2), {"strides": [2, 3], "dilations": [1, 1], "pad_type": "valid"}),
    ((1, 4, 5, 6), (4, 3, 3, 3), {"strides": [2, 1], "dilations": [2, 3], "pad_type": "custom", "pad": [1, 2, 0, 3]}),
    ((1, 4, 5, 6), (4, 3, 4, 3), {"strides": [2, 2], "dilations": [1, 1], "pad_type": "same"}),
    ((1, 4, 5, 6), (4, 3, 2, 2), {"strides": [3, 3], "dilations": [1, 1], "pad_type": "same"}),  # reach < stride
    ((1, 6, 5, 6), (6, 2, 3, 3), {"strides": [2, 2], "dilations": [1, 1], "pad_type": "custom", "pad": [1, 1, 1, 1],
                                  "groups": 3}),
    ((1, 4, 5, 6), (4, 3, 3, 3), {"strides": [2, 2], "dilations": [1, 1], "pad_type": "same",
                                  "output_shape": [1, 3, 9, 12]}),  # one of the sizes whose conv gives 5x6
    ((1, 4, 5, 6), (4, 3, 3, 3), {"strides": [2, 2], "dilations": [1, 1], "pad_type": "valid",
                                  "output_shape": [1, 3, 12, 14]}),  # beyond the full transpose: zeros after
    ((2, 4, 7), (4, 5, 3), {"strides": [2], "dilations": [2], "pad_type": "custom", "pad": [2, 1]}),  # 1-d
]


def _conv_transpose_oracle(torch, x, w, bias, params):
    """torch's full transpose (float64), then the positions MIL keeps: from the padding before of the conv that
    maps the output back to x (TensorFlow's rule), to the output size; zeros beyond the full transpose."""
    rank = x.ndim - 2
    strides, dilations = params.get("strides", [1] * rank), params.get("dilations", [1] * rank)
    pad_type, groups = params.get("pad_type", "valid"), params.get("groups", 1)
    transpose = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d}[rank]
    full = transpose(torch.tensor(x.astype(np.float64)), torch.tensor(w.astype(np.float64)), stride=strides,
                     dilation=dilations, groups=groups)
    reach = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)]
    if "output_shape" in params:
        out = params["output_shape"][2:]
    elif pad_type == "same":
        out = [d * s for d, s in zip(x.shape[2:], strides)]
    else:
        pad = params.get("pad", [0] * 2 * rank)
        out = [(d - 1) * s + r - pad[2 * i] - pad[2 * i + 1]
               for i, (d, s, r) in enumerate(zip(x.shape[2:], strides, reach))]
    pads = _torch_pads(pad_type, out, w.shape[2:], strides, dilations, params.get("pad"))  # last axis first
    befores = [pads[2 * (rank - 1 - axis)] for axis in range(rank)]
    crops = []
    for axis in reversed(range(rank)):
        start = befores[axis]
        crops += [-start, out[axis] - (full.shape[2 + axis] - start)]
    y = torch.nn.functional.pad(full, crops)
    if bias is not None:
        y = y + torch.tensor(bias.astype(np.float64)).reshape((1, -1) + (1,) * rank)
    return y.numpy()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_shape, w_shape, params", CONV_TRANSPOSES,
                         ids=[f"{c[0]}x{c[1]}{sorted(c[2].items())}" for c in CONV_TRANSPOSES])
def test_conv_transpose_matches_torch(tmp_path, rng, x_shape, w_shape, params, with_bias):
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 1, x_shape).astype(np.float16)
    tensors = {"weight": rng.normal(0, 0.3, w_shape).astype(np.float16)}
    if with_bias:
        tensors["bias"] = rng.normal(0, 1, (w_shape[1] * params.get("groups", 1),)).astype(np.float16)
    oracle = _conv_transpose_oracle(torch, x, tensors["weight"], tensors.get("bias"), params)
    got = run_with_tensors(tmp_path, "conv_transpose", x, oracle.shape, tensors, **params)
    wide = _conv_transpose_oracle(torch, x, tensors["weight"], None, params) if with_bias else None
    assert_within_fp16(got, oracle, what="conv_transpose", intermediate=wide,
                       absolute=_quantization((w_shape[0] // params.get("groups", 1),) + w_shape[2:]))


POOLS = [  # x shape, params
    ((1, 3, 9, 11), {"kernel_sizes": [3, 3], "pad_type": "valid"}),
    ((2, 3, 9, 11), {"kernel_sizes": [3, 2], "strides": [2, 3], "pad_type": "valid"}),
    ((1, 3, 9, 11), {"kernel_sizes": [3, 3], "strides": [2, 2], "pad_type": "custom", "pad": [1, 1, 1, 1]}),
    ((1, 3, 9, 11), {"kernel_sizes": [2, 3], "strides": [2, 2], "pad_type": "custom", "pad": [1, 0, 0, 1]}),
    ((1, 3, 9, 11), {"kernel_sizes": [3, 3], "strides": [2, 2], "pad_type": "custom", "pad": [1, 1, 1, 1],
                     "ceil_mode": True}),
    ((1, 3, 10, 11), {"kernel_sizes": [3, 2], "strides": [3, 2], "pad_type": "valid", "ceil_mode": True}),
    ((1, 3, 10, 11), {"kernel_sizes": [3, 4], "strides": [2, 3], "pad_type": "same"}),
    ((2, 3, 20), {"kernel_sizes": [4], "strides": [3], "pad_type": "custom", "pad": [2, 2], "ceil_mode": True}),
]


def _pool_oracle(torch, op: str, x, params, exclude_padding: bool = False):
    """torch's pool (float64) on ``x`` padded as MIL says; pads torch cannot take (asymmetric, or wider than half
    the kernel) as an explicit pad (zeros for the average, where every position counts, -inf for the max)."""
    rank = x.ndim - 2
    kernel, strides = params["kernel_sizes"], params.get("strides", [1] * rank)
    pads = _torch_pads(params["pad_type"], x.shape[2:], kernel, strides, [1] * rank, params.get("pad"))
    befores, afters = pads[::2][::-1], pads[1::2][::-1]
    tx = torch.tensor(x.astype(np.float64))
    fn = getattr(torch.nn.functional, f"{op}{rank}d")
    ceil = params.get("ceil_mode", False)
    if befores == afters and all(2 * p <= k for p, k in zip(befores, kernel)):
        extra = {"count_include_pad": not exclude_padding} if op == "avg_pool" else {}
        return fn(tx, kernel, strides, padding=befores, ceil_mode=ceil, **extra).numpy()
    assert not exclude_padding, "an explicit zero pad counts in the average"
    fill = 0.0 if op == "avg_pool" else -np.inf
    return fn(torch.nn.functional.pad(tx, pads, value=fill), kernel, strides, ceil_mode=ceil).numpy()


@pytest.mark.parametrize("x_shape, params", POOLS, ids=[f"{p[0]}{sorted(p[1].items())}" for p in POOLS])
def test_max_pool_matches_torch(tmp_path, rng, x_shape, params):
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 2, x_shape).astype(np.float16)
    x.flat[::7] = -np.abs(x.flat[::7]) - 8  # some all-negative windows: padding must not read as 0
    oracle = _pool_oracle(torch, "max_pool", x, params)
    np.testing.assert_array_equal(run_op(tmp_path, "max_pool", x, oracle.shape, **params), oracle.astype(np.float16))


# torch excludes padding from an average only for its own (symmetric) padding
AVG_POOLS = [(*pool, False) for pool in POOLS] + [
    (*pool, True) for pool in POOLS if pool[1]["pad_type"] == "valid" or pool[1].get("pad") in ([1, 1, 1, 1], [2, 2])]


@pytest.mark.parametrize("x_shape, params, exclude", AVG_POOLS,
                         ids=[f"{p[0]}{sorted(p[1].items())}-exclude={p[2]}" for p in AVG_POOLS])
def test_avg_pool_matches_torch(tmp_path, rng, x_shape, params, exclude):
    torch = pytest.importorskip("torch")
    x = rng.normal(0.5, 2, x_shape).astype(np.float16)
    oracle = _pool_oracle(torch, "avg_pool", x, params, exclude_padding=exclude)
    got = run_op(tmp_path, "avg_pool", x, oracle.shape, exclude_padding_from_average=exclude, **params)
    assert_within_fp16(got, oracle, what="avg_pool")


# -- 5. scaled_dot_product_attention ----------------------------------------------------------------------------------


def _sdpa_program(q, k, v, mask) -> str:
    """``scaled_dot_product_attention`` with query an input, key and value fp16 consts, and ``mask``: None, a bool
    const, or a float mask as a second input."""
    inputs, lines, args = [f"tensor<fp16, {list(q.shape)}> q"], [_const_tensor("k", k), _const_tensor("v", v)], ""
    if mask is not None and mask.dtype == np.bool_:
        t = f"tensor<bool, {list(mask.shape)}>"
        values = ", ".join("true" if m else "false" for m in mask.ravel())
        lines.append(f'        {t} m = const()[name=string("m"), val={t}([{values}])];')
        args = ", attn_mask=m"
    elif mask is not None:
        inputs.append(f"tensor<fp16, {list(mask.shape)}> m")
        args = ", attn_mask=m"
    out = list(q.shape[:-1]) + [v.shape[-1]]
    lines.append(f"        tensor<fp16, {out}> y = scaled_dot_product_attention(query=q, key=k, value=v{args})"
                 '[name=string("y")];')
    return (f"program(1.3)\n{{\n    func main<ios18>({', '.join(inputs)}) {{\n" + "\n".join(lines)
            + "\n    } -> (y);\n}\n")


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "causal"])
@pytest.mark.parametrize("shape", [((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 6)), ((3, 4, 4), (3, 6, 4), (3, 6, 5))])
def test_scaled_dot_product_attention_matches_torch(tmp_path, rng, shape, mask_kind):
    torch = pytest.importorskip("torch")
    q, k, v = (rng.normal(0, 1, s).astype(np.float16) for s in shape)
    scores = q.shape[:-1] + (k.shape[-2],)
    mask = {None: None,
            "bool": rng.random(scores[-2:]) < 0.6,  # broadcast over the batch
            "float": rng.normal(0, 2, scores).astype(np.float16),
            "causal": np.tril(np.ones(scores[-2:], bool), k=scores[-1] - scores[-2])}[mask_kind]
    if mask is not None and mask.dtype == np.bool_:
        mask[..., 0] = True  # no row without a position to attend to
    tm = None if mask is None else torch.tensor(mask if mask.dtype == np.bool_ else mask.astype(np.float64))
    oracle = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(t.astype(np.float64)) for t in (q, k, v)), attn_mask=tm).numpy()
    feeds = {"q": q} if mask is None or mask.dtype == np.bool_ else {"q": q, "m": mask}
    got = load_text(_sdpa_program(q, k, v, mask), tmp_path).run(feeds)["y"]
    assert_within_fp16(got, oracle, what=f"sdpa mask={mask_kind}")


def test_the_catalog_refuses_sdpa_by_ane_06_and_the_emulator_runs_it(tmp_path, rng):
    """The reference (ANE-06): the ANE ignores the op's mask, so orion check names that rule (not ANE-34) while the
    emulator computes the op's MIL meaning."""
    from orion.compiler.constraints import ANE_KNOWN_OPS, check_program
    from orion.compiler.targets import get_target
    from orion.mil.parse import parse_program

    q, k, v = (rng.normal(0, 1, (1, 4, 8)).astype(np.float16) for _ in range(3))
    text = _sdpa_program(q, k, v, np.tril(np.ones((4, 4), bool)))
    found = [f.constraint for f in check_program(parse_program(text), get_target("m4"))]
    assert "ANE-06" in found and "ANE-34" not in found and "ANE-38" not in found  # the others: I/O layout rules
    assert "scaled_dot_product_attention" not in ANE_KNOWN_OPS
    assert load_text(text, tmp_path).run({"q": q})["y"].shape == (1, 4, 8)


@pytest.mark.parametrize("x_shape, w_shape, params", [CONVS[5], CONVS[9]], ids=["conv2d", "conv1d"])
def test_a_conv_with_bias_compiles_to_conv_and_add_of_any_rank(tmp_path, rng, x_shape, w_shape, params):
    """The compiler splits a conv's bias into an add along the channel axis (ANE-13) for rank 3 as for rank 4."""
    torch = pytest.importorskip("torch")
    w, bias = rng.normal(0, 0.3, w_shape).astype(np.float16), rng.normal(0, 1, w_shape[:1]).astype(np.float16)
    b = GraphBuilder("conv_bias")
    y = b.op("conv", x=b.input("x", x_shape), weight=b.weight("w", w), bias=b.weight("b", bias), **params)
    b.output("y", y)
    result = compile_graph(b.graph, target="m4")
    assert "ANE-13" not in {v.constraint for v in result.violations} and " add(" in result.module.text
    result.module.write(tmp_path)
    x = rng.normal(0, 1, x_shape).astype(np.float16)
    got = load_text(result.module.text, tmp_path).run({"x": x})["y"]
    assert_within_fp16(got, _conv_oracle(torch, x, w, bias, params), what="conv + bias",
                       intermediate=_conv_oracle(torch, x, w, None, params), absolute=_quantization(w_shape[1:]))


@pytest.mark.parametrize("op, inputs, params, message", [
    ("conv", {"x": (1, 4, 8, 8), "weight": (6, 4, 3, 3)}, {"strides": [1, 1, 1]}, r"strides \[1, 1, 1\] must have 2"),
    ("conv", {"x": (1, 4, 2, 8), "weight": (6, 4, 3, 3)}, {}, r"kernel reach \[3, 3\] does not fit"),
    ("conv", {"x": (1, 4, 8, 8), "weight": (6, 4, 3, 3)}, {"pad_type": "full"}, r"pad_type 'full' is not one of"),
    ("conv", {"x": (1, 4, 8, 8), "weight": (6, 2, 3, 3)}, {"groups": 3}, r"groups=3 does not fit 4 input"),
    ("conv_transpose", {"x": (1, 4, 5, 5), "weight": (4, 3, 3, 3)}, {"output_shape": [1, 5, 11, 11]},
     r"output_shape \[1, 5, 11, 11\] must start \[1, 3\]"),
    ("conv_transpose", {"x": (1, 4, 5, 5), "weight": (4, 3, 3, 3)}, {"pad_type": "same_lower"},
     "pad_type 'same_lower' is not one of valid, same, custom"),
    ("max_pool", {"x": (1, 4, 8, 8)}, {"kernel_sizes": [2, 2], "pad_type": "same", "ceil_mode": True},
     "ceil_mode needs pad_type valid or custom"),
    ("avg_pool", {"x": (1, 4, 8, 8)}, {"kernel_sizes": [2], "pad_type": "valid"}, r"kernel_sizes \[2\] must be 2"),
    ("scaled_dot_product_attention", {"query": (1, 4, 8), "key": (1, 5, 8), "value": (1, 6, 8)}, {},
     r"are not \[B.., L, E\]"),
])
def test_bad_window_parameters_are_refused_with_one_line(op, inputs, params, message):
    b = GraphBuilder("bad")
    values = {name: (b.input(name, shape) if name in ("x", "query") else b.weight(name, np.ones(shape, np.float32)))
              for name, shape in inputs.items()}
    with pytest.raises(GraphError, match=message):
        b.op(op, **values, **params)
