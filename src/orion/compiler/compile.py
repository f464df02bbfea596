"""Graph -> optimized graph -> MIL text + weights, with the constraint report: the compiler's front door."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from orion.compiler.analysis import IOPlan, plan_io, sram_warnings
from orion.compiler.constraints import Violation, check_program
from orion.compiler.passes import (Pass, WeightCompression, compress_weights, default_passes, quantize_activations,
                                   run_pipeline)
from orion.compiler.targets import Target, get_target
from orion.errors import SettingsError
from orion.ir.graph import Graph
from orion.mil.emit import MILModule, emit


@dataclass
class CompileResult:
    graph: Graph
    module: MILModule
    target: Target
    violations: list[Violation]
    sram_warnings: list[str]
    io_plan: IOPlan
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]


def io_plan_of(module: MILModule, target: Target) -> IOPlan:
    program = module.program
    return plan_io(
        {name: t.nbytes for name, t in program.inputs},
        {name: t.nbytes for name, t in program.output_types()},
        target,
    )


def compile_graph(graph: Graph, target: Target | str = "default", weight_layout: str | None = None,
                  passes: list[Pass] | None = None, weights: WeightCompression | str | None = None,
                  activations: dict[str, float] | None = None,
                  input_scales: dict[str, np.ndarray] | None = None) -> CompileResult:
    """Optimize and legalize ``graph`` for ``target``, emit MIL, and check it against the constraint catalog.
    ``weights`` compresses the conv weights first (``"int8"``, ``"int4/32"``, ``"lut4"``, or a
    :class:`~orion.compiler.passes.WeightCompression` with the layers to keep in fp16). ``activations`` (conv name ->
    largest input magnitude, from :func:`~orion.compiler.passes.activation_ranges`) makes those convs W8A8.
    ``input_scales`` (from :func:`~orion.compiler.passes.activation_scales` on calibration inputs) makes the
    weight compression of those convs activation-aware (AWQ).

    Violations are returned, not raised: the caller decides (the CLI prints them; the runtime refuses errors).
    """
    target = get_target(target)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = WeightCompression.of(weights)
    if input_scales and (spec is None or activations):
        raise SettingsError("input_scales need weights= and no activations= (W8A8 ranges are of the unscaled inputs)")
    if spec is not None:  # once, before the pipeline: legalization's exact one-hot convs stay fp16
        graph = compress_weights(spec, input_scales)(graph)
    if activations:
        graph = quantize_activations(activations)(graph)
    optimized = run_pipeline(graph, passes if passes is not None else default_passes(target))
    t1 = time.perf_counter()
    module = emit(optimized, version=target.mil_version, weight_layout=weight_layout or "per-tensor")
    t2 = time.perf_counter()
    violations = check_program(module.program, target)
    timings.update(passes=t1 - t0, emit=t2 - t1, check=time.perf_counter() - t2)
    return CompileResult(
        graph=optimized,
        module=module,
        target=target,
        violations=violations,
        sram_warnings=sram_warnings(optimized, target),
        io_plan=io_plan_of(module, target),
        timings=timings,
    )
