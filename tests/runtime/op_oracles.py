"""What the op-coverage tests share: MIL literals for an op's parameters, and a bound in fp16 ulps (coremltools'
own value of an op is the ``coreml`` fixture of this folder's conftest)."""

from __future__ import annotations

import numpy as np


def mil_literal(value) -> tuple[str, str]:
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


def assert_within_fp16(got: np.ndarray, oracle: np.ndarray, ulps: float = 1.0, what: str = "",
                       intermediate: np.ndarray | None = None, absolute: float = 0.0) -> None:
    """``got`` (fp16) is within ``ulps`` fp16 ulps of the oracle's exact value rounded to fp16, plus one ulp of an
    ``intermediate`` value the op rounds on the way (a wide sum before its bias add), plus ``absolute`` (the
    accumulator's quantization of a wide sum's products)."""
    ref = np.asarray(oracle, dtype=np.float64).astype(np.float16)
    assert got.shape == ref.shape, what
    assert np.isfinite(ref).all(), f"{what}: the oracle is not finite; pick another input range"
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bound = ulps * np.spacing(np.abs(ref)).astype(np.float64) + absolute
    if intermediate is not None:
        bound = bound + np.spacing(np.abs(np.asarray(intermediate).astype(np.float16))).astype(np.float64)
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), (f"{what}: emulator {got.flat[worst]} vs oracle {oracle.flat[worst]} "
                                  f"(rounded {ref.flat[worst]})")
