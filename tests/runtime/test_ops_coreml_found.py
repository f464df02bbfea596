"""Ops the coremltools corpus (tests/mil/coreml_corpus.py) found missing, each run as MIL text by the emulator and
compared with coremltools' own value of the op."""

from __future__ import annotations

import numpy as np
import pytest

from orion.errors import MILProgramError
from tests.runtime.test_ops_logic_layout import run_program


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
