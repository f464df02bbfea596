"""Analyses that inform rather than rewrite: the SRAM working set of each op, and the I/O surface plan."""

from __future__ import annotations

from dataclasses import dataclass

from orion.compiler.targets import Target
from orion.ir.graph import Graph


@dataclass(frozen=True)
class SramEstimate:
    node: str
    op: str
    bytes: int


def sram_working_sets(graph: Graph) -> list[SramEstimate]:
    """Bytes each op touches at once: its inputs (weights included) and its output.

    Past ~32 MB the ANE spills to DRAM and runs about 30% slower (reference section 1), so an op above the
    target's budget is a candidate for tiling.
    """
    return [
        SramEstimate(node.name, node.op, sum(v.type.nbytes for v in node.input_values()) + node.output.type.nbytes)
        for node in graph.nodes
        if not node.is_const
    ]


def sram_warnings(graph: Graph, target: Target) -> list[str]:
    budget = target.sram_budget_bytes
    return [
        f"{e.op} {e.node!r} touches {e.bytes / 2**20:.1f} MiB, over the {budget / 2**20:.0f} MiB SRAM budget: "
        f"expect ~30% slower; split it (fewer channels or a shorter sequence per program)"
        for e in sram_working_sets(graph)
        if e.bytes > budget
    ]


def surface_bytes(nbytes: int, target: Target) -> int:
    """The surface a tensor of ``nbytes`` gets on ``target``: rounded up to a multiple of the target's I/O row
    alignment (reference section 5: packed reads and 64-byte rows agree on such sizes; None rounds nothing) and
    raised to the smallest surface the target accepts (ANE-04)."""
    align = target.io_row_align_bytes or 1
    return max(target.min_surface_bytes, -(-nbytes // align) * align)


@dataclass(frozen=True)
class IOPlan:
    """How a program's tensors bind: names in binding (alphabetical) order, and one allocation size for all
    inputs and one for all outputs (the ANE fails with status 0x1d on unequal sizes: ANE-02, ANE-18)."""

    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]
    input_surface_bytes: int
    output_surface_bytes: int


def plan_io(inputs: dict[str, int], outputs: dict[str, int], target: Target) -> IOPlan:
    """``inputs``/``outputs`` map MIL names to the packed byte size of each tensor."""
    def uniform(sizes: dict[str, int]) -> int:
        return surface_bytes(max(sizes.values()), target) if sizes else 0

    return IOPlan(
        inputs=tuple(sorted(inputs.items())),
        outputs=tuple(sorted(outputs.items())),
        input_surface_bytes=uniform(inputs),
        output_surface_bytes=uniform(outputs),
    )
