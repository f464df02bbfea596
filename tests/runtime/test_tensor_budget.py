"""Surfaces and tensors (layout, zero-copy views, clamp and NaN policy) and the compile budget with re-exec."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from orion.errors import BindingError, CompileBudgetExceeded, SettingsError
from orion.runtime.budget import CompileBudget
from orion.runtime.tensor import Surface, Tensor


def test_channel_first_layout_and_row_conversions(rng):
    t = Tensor((1, 3, 1, 4), "fp16", Surface(4096))  # over-allocated: data packed from byte 0
    rows = rng.normal(size=(4, 3)).astype(np.float32)  # the CPU's [S, C]
    t.from_rows(rows)
    with t.surface.lock(read_only=True) as raw:
        flat = raw[: 3 * 4 * 2].view(np.float16)
        for c in range(3):
            for s in range(4):
                assert flat[c * 4 + s] == np.float16(rows[s, c])  # element (c, s) at c*S + s
        assert not raw[24:].any()
    np.testing.assert_array_equal(t.to_rows(), rows.astype(np.float16).astype(np.float32))
    t.from_rows(rows[:2])  # a shorter sequence zero-fills the rest of the bucket
    assert (t.to_rows()[2:] == 0).all()


def test_views_are_zero_copy():
    t = Tensor((1, 2, 1, 8), "fp32")
    with t.view() as v:
        v[0, 1, 0, 3] = 7.0
    with t.surface.lock() as raw:
        assert raw[: t.nbytes].view(np.float32)[1 * 8 + 3] == 7.0
    with t.view(read_only=True) as v, pytest.raises(ValueError):
        v[0, 0, 0, 0] = 1.0


def test_clamp_and_nan_policy():
    t = Tensor((1, 4, 1, 1), "fp16")
    t.write(np.array([np.nan, np.inf, -1e9, 3.0]).reshape(1, 4, 1, 1))
    np.testing.assert_array_equal(t.read().reshape(-1), [0, 65504, -65504, 3])  # written: NaN -> 0, clamped
    with t.view() as v:  # what an overflowing program leaves behind: +-inf, never NaN (N5, N6)
        v[...] = np.array([np.inf, -np.inf, 65504, 1], np.float16).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(t.read().reshape(-1), [np.inf, -np.inf, 65504, 1])  # read: kept as they are
    with t.view() as v:
        v[0, :, 0, 0] = np.array([np.inf, 1, -np.inf, 2], np.float16)
    np.testing.assert_array_equal(t.to_rows(1), [[np.inf, 1, -np.inf, 2]])


def test_tensor_errors():
    with pytest.raises(BindingError, match="fp16 or fp32"):
        Tensor((1, 1, 1, 1), "int32")
    with pytest.raises(BindingError, match="needs 64 bytes"):
        Tensor((1, 32, 1, 1), "fp16", Surface(16))
    with pytest.raises(BindingError, match="shape"):
        Tensor((1, 2, 1, 2)).write(np.zeros((2, 2)))
    with pytest.raises(BindingError, match=r"\[1, C, 1, S\]"):
        Tensor((2, 2)).to_rows()


def test_budget_counts_and_refuses_with_advice(monkeypatch):
    budget = CompileBudget(2)
    budget.charge()
    assert budget.can_afford(1) and not budget.can_afford(2)
    budget.charge()
    with pytest.raises(CompileBudgetExceeded, match="past its budget of 2.*ORION_COMPILE_BUDGET"):
        budget.charge("kernel k")
    assert budget.used == 2
    monkeypatch.setenv("ORION_COMPILE_BUDGET", "7")
    assert CompileBudget().limit == 7
    monkeypatch.setenv("ORION_COMPILE_BUDGET", "many")
    with pytest.raises(SettingsError, match="not an integer"):
        CompileBudget()


def test_reexec_saves_then_restarts_with_a_fresh_budget(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from orion.runtime.budget import CompileBudget, reexec, ENV_GENERATION
        state = {str(tmp_path / "state")!r}
        generation = int(os.environ.get(ENV_GENERATION, "0"))
        done = int(open(state).read()) if os.path.exists(state) else 0
        budget = CompileBudget(3)
        while done < 7:
            if not budget.can_afford(1):
                reexec(lambda: open(state, "w").write(str(done)))
            budget.charge()
            done += 1
        print("finished", done, "generation", generation)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "finished 7 generation 2"
