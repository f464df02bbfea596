"""Ops the coremltools corpus (tests/mil/coreml_corpus.py) found missing, each run as MIL text by the emulator and
compared with coremltools' own value of the op."""

from __future__ import annotations

import numpy as np
import pytest

from orion.errors import MILProgramError
from orion.runtime.backends.emulator import load_text
from tests.runtime.op_oracles import assert_within_fp16
from tests.runtime.test_ops_logic_layout import program_text, run_program


@pytest.mark.parametrize("axes", [None, [0], [-1], [1, 2], [2, 0, 1]])
def test_reverse_matches_coremltools(tmp_path, rng, coreml, axes):
    x = rng.normal(0, 3, (3, 4, 5)).astype(np.float16)
    params = {} if axes is None else {"axes": axes}
    oracle = coreml("reverse", x=x.astype(np.float32), **params)
    got = run_program(tmp_path, "reverse", {"x": x}, x.shape, **params)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


def test_reverse_refuses_a_repeated_or_missing_axis(tmp_path, rng):
    x = rng.normal(0, 1, (2, 3)).astype(np.float16)
    with pytest.raises(MILProgramError, match="name an axis twice"):
        run_program(tmp_path, "reverse", {"x": x}, x.shape, axes=[1, -1])
    with pytest.raises(MILProgramError, match="out of range"):
        run_program(tmp_path, "reverse", {"x": x}, x.shape, axes=[2])


def test_gather_takes_validate_indices_and_still_checks_every_index(tmp_path, rng, coreml):
    x = rng.normal(0, 3, (5, 4)).astype(np.float16)
    indices = np.array([4, 0, -1], np.int32)
    oracle = coreml("gather", x=x.astype(np.float32), indices=indices, axis=0)
    got = run_program(tmp_path, "gather", {"x": x, "indices": indices}, oracle.shape, axis=0, validate_indices=False)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))
    with pytest.raises(Exception, match="outside an axis of size 5"):
        run_program(tmp_path, "gather", {"x": x, "indices": np.array([5, 0, 1], np.int32)}, oracle.shape, axis=0,
                    validate_indices=False)


@pytest.mark.parametrize("alpha", [-0.5, 0.0, 1.25])
def test_thresholded_relu_matches_coremltools(tmp_path, rng, coreml, alpha):
    x = (rng.integers(-12, 12, (4, 9)) * 0.25).astype(np.float16)  # values at the threshold too
    oracle = coreml("thresholded_relu", x=x.astype(np.float32), alpha=np.float32(alpha))
    got = run_program(tmp_path, "thresholded_relu", {"x": x}, x.shape, alpha=alpha)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


@pytest.mark.parametrize("alpha, beta", [(1 / 6, 0.5), (0.2, 0.5), (-0.75, 0.25)])
def test_sigmoid_hard_matches_coremltools(tmp_path, rng, coreml, alpha, beta):
    x = rng.normal(0, 4, (5, 7)).astype(np.float16)
    alpha, beta = float(np.float16(alpha)), float(np.float16(beta))
    oracle = coreml("sigmoid_hard", x=x.astype(np.float32), alpha=np.float32(alpha), beta=np.float32(beta))
    got = run_program(tmp_path, "sigmoid_hard", {"x": x}, x.shape, alpha=alpha, beta=beta)
    assert_within_fp16(got, oracle, what="sigmoid_hard")


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_stack_matches_coremltools(tmp_path, rng, coreml, axis):
    values = {f"v{i}": rng.normal(0, 3, (3, 4)).astype(np.float16) for i in range(3)}
    oracle = coreml("stack", values=[v.astype(np.float32) for v in values.values()], axis=axis)
    got = run_program(tmp_path, "stack", values, oracle.shape, variadic="values", axis=axis)
    np.testing.assert_array_equal(got, oracle.astype(np.float16))


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_pixel_shuffle_and_unshuffle_match_torch(tmp_path, rng, factor):
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 3, (2, 2 * factor * factor, 3, 4)).astype(np.float16)
    want = torch.nn.functional.pixel_shuffle(torch.from_numpy(x.astype(np.float32)), factor).numpy()
    got = run_program(tmp_path, "pixel_shuffle", {"x": x}, want.shape, upscale_factor=factor)
    np.testing.assert_array_equal(got, want.astype(np.float16))
    back = torch.nn.functional.pixel_unshuffle(torch.from_numpy(want), factor).numpy()
    got = run_program(tmp_path / "u", "pixel_unshuffle", {"x": want.astype(np.float16)}, back.shape,
                      downscale_factor=factor)
    np.testing.assert_array_equal(got, back.astype(np.float16))


@pytest.mark.parametrize("sh, sw", [(2, 3), (1, 2), (1.5, 2.5)])
def test_upsample_nearest_neighbor_matches_torch(tmp_path, rng, sh, sw):
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 3, (1, 3, 4, 6)).astype(np.float16)
    size = (int(4 * sh), int(6 * sw))
    want = torch.nn.functional.interpolate(torch.from_numpy(x.astype(np.float32)), size=size, mode="nearest").numpy()
    got = run_program(tmp_path, "upsample_nearest_neighbor", {"x": x}, want.shape, scale_factor_height=sh,
                      scale_factor_width=sw)
    np.testing.assert_array_equal(got, want.astype(np.float16))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sh, sw", [(2, 3), (3, 1), (1.5, 2.5)])
def test_upsample_bilinear_matches_torch(tmp_path, rng, align_corners, sh, sw):
    """torch's two bilinear modes at the output size (its scale recomputed, as MIL's op is defined)."""
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 3, (2, 3, 4, 5)).astype(np.float16)
    size = (int(4 * sh), int(5 * sw))
    want = torch.nn.functional.interpolate(torch.from_numpy(x.astype(np.float64)), size=size, mode="bilinear",
                                           align_corners=align_corners).numpy()
    got = run_program(tmp_path, "upsample_bilinear", {"x": x}, want.shape, scale_factor_height=sh,
                      scale_factor_width=sw, align_corners=align_corners)
    assert_within_fp16(got, want, ulps=1.0, what=f"bilinear align_corners={align_corners}",
                       absolute=float(np.abs(want).max()) * 2 ** -20)


@pytest.mark.parametrize("out, align_corners, half_pixel, grid", [
    (5, False, None, [0, 0.1, 0.5, 0.9, 1]),  # the examples of coremltools' op documentation
    (6, False, None, [0, 0, 1 / 3, 2 / 3, 1, 1]),
    (5, True, None, [0, 0.25, 0.5, 0.75, 1]),
    (6, True, None, [0, 0.2, 0.4, 0.6, 0.8, 1]),
    (4, False, False, [0, 0.5, 1, 1]),  # TF's legacy ResizeBilinear grid: i * in / out
])
def test_upsample_bilinear_samples_coremltools_documented_grid(tmp_path, out, align_corners, half_pixel, grid):
    """On the ramp [0, 1] the output is the sampling grid itself."""
    x = np.array([0, 1], np.float16).reshape(1, 1, 1, 2)
    params = {"scale_factor_height": 1, "scale_factor_width": out / 2, "align_corners": align_corners}
    if half_pixel is not None:
        params["half_pixel_centers"] = half_pixel
    got = run_program(tmp_path, "upsample_bilinear", {"x": x}, (1, 1, 1, out), **params)
    assert_within_fp16(got.reshape(-1), np.array(grid, np.float64), what="grid")
    with pytest.raises(MILProgramError, match="cannot both be true"):
        run_program(tmp_path, "upsample_bilinear", {"x": x}, (1, 1, 1, out), **{**params, "align_corners": True,
                                                                                "half_pixel_centers": True})


def test_neg_matches_torch(tmp_path, rng):
    """``neg`` has no coremltools definition (public ANE codegen writes it): torch.neg is the oracle."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([rng.normal(0, 3, 30), [0.0, -0.0, 65504.0, 6e-8]]).astype(np.float16).reshape(2, 17)
    got = run_program(tmp_path, "neg", {"x": x}, x.shape)
    want = torch.neg(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)  # values: the emulator's held results do not keep a zero's sign


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 3, 5), (1, 2, 2, 3, 4)])
def test_prelu_matches_coremltools_and_torch(tmp_path, rng, coreml, shape):
    """coremltools' value of a rank-4 prelu; torch's for ranks 3 and 5 (coremltools evaluates those only for one
    shared slope)."""
    torch = pytest.importorskip("torch")
    x = rng.normal(0, 3, shape).astype(np.float16)
    alpha = rng.uniform(-0.5, 0.9, shape[1]).astype(np.float16)
    if len(shape) == 4:
        oracle = coreml("prelu", x=x.astype(np.float32), alpha=alpha.astype(np.float32))
    else:
        oracle = torch.nn.functional.prelu(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(
            alpha.astype(np.float64))).numpy()
    text = program_text("prelu", {"x": x}, shape).replace(
        "x=x)", "x=x, alpha=al)").replace(
        ") {\n", ") {\n" + f'        tensor<fp16, [{shape[1]}]> al = const()[name=string("al"), '
                           f'val=tensor<fp16, [{shape[1]}]>([{", ".join(repr(float(a)) for a in alpha)}])];\n', 1)
    got = load_text(text, tmp_path).run({"x": x})["out"]
    assert_within_fp16(got, oracle, what="prelu")
    with pytest.raises(MILProgramError, match="one slope per channel"):
        load_text(text.replace(f"[{shape[1]}]", f"[{shape[1] + 1}]").replace("])];", ", 0.5])];", 1), tmp_path)
