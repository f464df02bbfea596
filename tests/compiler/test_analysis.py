"""SRAM working-set estimates and the I/O plan, checked against sizes computed by hand."""

from __future__ import annotations

import numpy as np

from orion.compiler.analysis import plan_io, sram_warnings, sram_working_sets, surface_bytes
from orion.compiler.compile import compile_graph
from orion.compiler.targets import get_target
from orion.ir.builder import GraphBuilder


def test_working_set_counts_inputs_weights_and_output():
    b = GraphBuilder()
    x = b.input("x", (1, 64, 1, 32))
    b.output("y", b.linear(x, np.zeros((128, 64)), name="proj"))
    (conv,) = [e for e in sram_working_sets(b.graph) if e.op == "conv"]
    assert conv.bytes == 2 * (64 * 32 + 128 * 64 + 128 * 32)


def test_ops_over_the_budget_are_reported():
    b = GraphBuilder()
    x = b.input("x", (1, 4096, 1, 1024))  # 8 MiB in, 8 MiB out, 32 MiB of weights
    b.output("y", b.linear(x, np.zeros((4096, 4096), np.float16), name="big"))
    target = get_target("default")
    warnings = sram_warnings(b.graph, target)
    assert len(warnings) == 1 and "'big'" in warnings[0] and "SRAM" in warnings[0]
    assert sram_warnings(b.graph, target.with_overrides(sram_budget_bytes=2**30)) == []


def test_io_plan_sorts_names_and_makes_sizes_uniform():
    target = get_target("default").with_overrides(min_surface_bytes=4096)
    plan = plan_io({"zeta": 100, "alpha": 6000}, {"out": 10}, target)
    assert [name for name, _ in plan.inputs] == ["alpha", "zeta"]
    assert plan.input_surface_bytes == 6016  # the largest, rounded up to 64 bytes
    assert plan.output_surface_bytes == 4096  # raised to the target's minimum


def test_surfaces_follow_the_targets_row_alignment_and_minimum():
    target = get_target("default").with_overrides(min_surface_bytes=1024)
    assert target.io_row_align_bytes == 64
    assert surface_bytes(1100, target) == 1152  # 17 rows of 64 bytes
    assert surface_bytes(1000, target) == 1024  # raised to the minimum
    wide = target.with_overrides(io_row_align_bytes=768)
    assert surface_bytes(1100, wide) == 1536  # two 768-byte steps (64-byte steps would give 1152)
    assert surface_bytes(1536, wide) == 1536  # already aligned: unchanged
    assert surface_bytes(1100, target.with_overrides(io_row_align_bytes=None)) == 1100  # packed: no rounding
    assert surface_bytes(1100, wide.with_overrides(min_surface_bytes=4096)) == 4096
    plan = plan_io({"x": 1100}, {"y": 500}, wide)
    assert (plan.input_surface_bytes, plan.output_surface_bytes) == (1536, 1024)


def test_compile_reports_the_plan_of_the_emitted_program():
    b = GraphBuilder()
    b2 = b.input("b_in", (1, 8, 1, 64))
    a = b.input("a_in", (1, 16, 1, 64))
    b.output("y", b.add(b2, b.slice_by_index(a, begin=[0, 0, 0, 0], end=[1, 8, 1, 64])))
    result = compile_graph(b.graph, "default")
    assert [n for n, _ in result.module.program.inputs] == ["a_in", "b_in"]
    assert result.io_plan.inputs == (("a_in", 16 * 64 * 2), ("b_in", 8 * 64 * 2))
    assert result.io_plan.input_surface_bytes == get_target("default").min_surface_bytes
