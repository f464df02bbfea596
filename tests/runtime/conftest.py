"""Fixtures of the runtime tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def coreml():
    """``coreml(op, x=..., **params)``: coremltools' value of the op on constant inputs (its value_inference)."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import Builder as mb, Function

    def value(op: str, **params):
        with Function({}, opset_version=ct.target.iOS18):
            return np.asarray(getattr(mb, op)(**params).val, dtype=np.float64)

    return value
