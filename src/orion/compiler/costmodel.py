"""A cost model of the ANE: how long the programs Orion builds take on a given chip, in the ANE's own terms.

The emulator says whether a program computes the right thing, not how fast the ANE would run it. This model reads
the MIL programs one step evaluates (a decode step, a prefill) and charges each evaluation:

* a fixed **dispatch overhead** per program evaluation;
* its **memory traffic**, baked weights plus every I/O surface it reads and writes, over the bandwidth the ANE sees
  (the weights of a model-sized program never fit the ~32 MB SRAM, so each evaluation reads them again);
* its **compute**, conv FLOPs at the chip's conv throughput and every other op at its matmul throughput;

as ``overhead + max(memory, compute)`` (the ANE streams weights while it computes: a roofline per program), plus the
work a model leaves to the CPU per token (the host bytes it reads, e.g. a classifier kept in float32 BLAS) over the
CPU's bandwidth. A compressed weight (a ``constexpr_*`` op) is charged its stored parts at the size the blob writer
stores them: sub-byte data and palette indices packed, plus its scales, offsets and palettes. It is decoded to fp16
before the multiply (reference N12), but no source gives what the decode costs, so it is charged nothing: the
prediction for a compressed model is a bound from the bytes it saves. Every per-chip figure is a :class:`Figure` that
names its source; a chip that lacks one is refused, never guessed. The figures are public reports, not measurements of this project: ``orion doctor`` on a Mac is what
settles them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from orion.compiler.analysis import surface_bytes
from orion.compiler.targets import Target, get_target
from orion.errors import SettingsError
from orion.ir.ops import OPS
from orion.mil.program import BlobRef, Program, VarRef


@dataclass(frozen=True)
class Figure:
    value: float
    source: str


@dataclass(frozen=True)
class Chip:
    """Per-chip figures of the cost model; each field a :class:`Figure` with its source."""

    name: str
    target: str  # the target profile whose compiler rules the chip follows
    dispatch_us: Figure  # fixed cost of one program evaluation
    ane_gbps: Figure  # DRAM bandwidth the ANE reads weights and surfaces at
    conv_tflops: Figure  # fp16 throughput of 1x1 convs (linear layers)
    matmul_tflops: Figure  # fp16 throughput of matmul and the other ops
    host_gbps: Figure  # effective bandwidth of the CPU work a model does per token

    def rows(self) -> list[tuple[str, str, str]]:
        """``(field, value, source)`` for printing."""
        return [(f.name, f"{getattr(self, f.name).value:g}", getattr(self, f.name).source)
                for f in fields(self) if isinstance(getattr(self, f.name), Figure)]


_CONV_IS_3X = "1x1 conv ~3x faster than matmul (maderix, Orion #17): a third of the conv figure"

CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("m1", "m1",
         Figure(190, "~190 us per evaluation (reference section 10)"),
         Figure(65, "~60-70 GB/s on base chips (anemll-bench, reference sections 1 and 10)"),
         Figure(11, "11 TOPS as Apple rates it (reference section 10)"),
         Figure(11 / 3, _CONV_IS_3X),
         Figure(68, "68 GB/s unified memory (Apple's M1 specification): an upper bound")),
    Chip("m4", "m4",
         Figure(90, "~90 us per evaluation on M4 (reference section 10; issue 14)"),
         Figure(67, "~67 GB/s weight reads on M4 (reference section 10; issue 14)"),
         Figure(18.8, "18.8 TFLOPS fp16 measured on M4 (reference section 10; maderix 18.6)"),
         Figure(18.8 / 3, _CONV_IS_3X),
         Figure(120, "120 GB/s unified memory (Apple's M4 specification): an upper bound")),
    Chip("m4max", "m4",
         Figure(90, "not reported for M4 Max: M4's ~90 us (the same 16-core H16 Neural Engine)"),
         Figure(119, "~119 GB/s seen by the ANE on M4 Max (anemll-bench, reference section 1)"),
         Figure(18.8, "not reported for M4 Max: M4's 18.8 TFLOPS (the same Neural Engine)"),
         Figure(18.8 / 3, _CONV_IS_3X),
         Figure(141, "Orion's CPU decode on M4 Max: 283 tok/s x 497 MB of fp32 GPT-2 weights per token "
                     "(reference section 7)")),
    Chip("m5pro", "m5",
         Figure(90, "not reported for M5 Pro: M4's ~90 us (an assumption; dispatch is 0.07-0.2 ms on every chip "
                    "measured, reference section 1)"),
         Figure(145, "~145 GB/s (reference section 10)"),
         Figure(18.8, "18.8 TFLOPS conv (reference section 10)"),
         Figure(10.2, "10.2 TFLOPS matmul (reference section 10)"),
         Figure(307, "307 GB/s unified memory (Apple's M5 Pro specification): an upper bound")),
)}


def get_chip(name: str | Chip) -> Chip:
    if isinstance(name, Chip):
        return name
    key = name.lower().replace("-", "").replace(" ", "")
    if key not in CHIPS:
        raise SettingsError(f"no cost-model figures for chip {name!r}; known chips: {', '.join(CHIPS)}")
    return CHIPS[key]


# ---------------------------------------------------------------------------------------------------------------------
# What one program costs


@dataclass(frozen=True)
class ProgramCost:
    """What one evaluation of a program moves and computes."""

    name: str
    weight_bytes: int  # constants baked into the program (BLOBFILE, inline float tensors, compressed weights' parts
    # as stored; not op parameters)
    io_bytes: int  # every input and output surface, as the target rounds them
    conv_flops: int
    other_flops: int  # matmul (2 per multiply-add) and one per output element of every other op

    def seconds(self, chip: Chip) -> tuple[float, float, float]:
        """(dispatch, memory, compute) seconds of one evaluation on ``chip``."""
        memory = (self.weight_bytes + self.io_bytes) / (chip.ane_gbps.value * 1e9)
        compute = (self.conv_flops / chip.conv_tflops.value + self.other_flops / chip.matmul_tflops.value) / 1e12
        return chip.dispatch_us.value * 1e-6, memory, compute


def _const_bool(program: Program, arg) -> bool:
    if isinstance(arg, VarRef):
        value = program.statement(arg.name).const_value
    else:
        value = getattr(arg, "value", False)
    return bool(np.asarray(value).item()) if value is not None else False


def _compressed_parts(program: Program) -> set[str]:
    """The consts a constexpr op decodes into a weight (data, indices, scales, offsets, palettes; not its axis)."""
    return {arg.name for st in program.statements if st.op in OPS and OPS[st.op].kind == "constexpr"
            for key, arg in st.args.items() if key in OPS[st.op].inputs and isinstance(arg, VarRef)}


def program_cost(program: Program, target: Target | str = "default", name: str = "program") -> ProgramCost:
    """Walk a MIL program: its constants' bytes, its I/O surfaces' bytes on ``target``, its ops' FLOPs."""
    target = get_target(target)
    types = program.var_types()
    compressed = _compressed_parts(program)
    weight_bytes = conv = other = 0
    for st in program.statements:
        if st.op == "const":
            value = st.const_value
            if (isinstance(value, BlobRef) or st.var in compressed
                    or (st.type.dtype in ("fp16", "fp32") and st.type.size > 1)):
                weight_bytes += st.type.nbytes  # sub-byte types packed, as the blob writer stores them
            continue
        if st.op in OPS and OPS[st.op].kind == "constexpr":
            continue  # the decode to fp16 has no published cost: charged nothing (module docstring)
        out = sum(t.size for _, t in st.outputs)
        if st.op == "conv":
            w = types[st.args["weight"].name]
            conv += 2 * out * math.prod(w.shape[1:])
        elif st.op == "matmul":
            x = types[st.args["x"].name]
            inner = x.shape[-2] if _const_bool(program, st.args.get("transpose_x")) else x.shape[-1]
            other += 2 * out * inner
        elif st.op == "linear":
            other += 2 * out * types[st.args["weight"].name].shape[-1]
        else:
            other += out
    tensors = [t for _, t in program.inputs] + [t for _, t in program.output_types()]
    io = sum(surface_bytes(t.nbytes, target) for t in tensors)
    return ProgramCost(name, weight_bytes, io, conv, other)


# ---------------------------------------------------------------------------------------------------------------------
# What a step costs


@dataclass(frozen=True)
class Estimate:
    """One step (a decode token, a prefill): every program evaluated once, in order, plus the host's work."""

    chip: Chip
    programs: tuple[ProgramCost, ...]
    host_bytes: int = 0
    tokens: int = 1  # tokens the step produces (1 for decode; the prompt for a prefill)

    def _sum(self, part: int) -> float:
        return sum(p.seconds(self.chip)[part] for p in self.programs)

    @property
    def dispatch_ms(self) -> float:
        return 1e3 * self._sum(0)

    @property
    def memory_ms(self) -> float:
        return 1e3 * self._sum(1)

    @property
    def compute_ms(self) -> float:
        return 1e3 * self._sum(2)

    @property
    def ane_ms(self) -> float:
        """Dispatch plus, per program, the longer of its memory traffic and its compute."""
        return 1e3 * sum(d + max(m, c) for d, m, c in (p.seconds(self.chip) for p in self.programs))

    @property
    def host_ms(self) -> float:
        return 1e3 * self.host_bytes / (self.chip.host_gbps.value * 1e9)

    @property
    def ms(self) -> float:
        return self.ane_ms + self.host_ms

    @property
    def tok_s(self) -> float:
        return 1e3 * self.tokens / self.ms

    @property
    def dispatches(self) -> int:
        return len(self.programs)

    @property
    def weight_mb(self) -> float:
        return sum(p.weight_bytes for p in self.programs) / 1e6

    @property
    def io_mb(self) -> float:
        return sum(p.io_bytes for p in self.programs) / 1e6

    def summary(self) -> dict:
        return {"chip": self.chip.name, "dispatches": self.dispatches, "weight_mb": self.weight_mb,
                "io_mb": self.io_mb, "host_mb": self.host_bytes / 1e6, "dispatch_ms": self.dispatch_ms,
                "memory_ms": self.memory_ms, "compute_ms": self.compute_ms, "ane_ms": self.ane_ms,
                "host_ms": self.host_ms, "ms": self.ms, "tok_s": self.tok_s}


def estimate(programs, chip: Chip | str, *, target: Target | str | None = None, host_bytes: int = 0,
             tokens: int = 1) -> Estimate:
    """The cost of evaluating each of ``programs`` (MIL programs, or :class:`ProgramCost`) once on ``chip``."""
    chip = get_chip(chip)
    target = get_target(target or chip.target)
    costs = tuple(p if isinstance(p, ProgramCost) else program_cost(p, target, f"program {i}")
                  for i, p in enumerate(programs))
    return Estimate(chip, costs, host_bytes, tokens)


def speculative_tok_s(target_step_ms: float, draft_step_ms: float, draft_tokens: int, acceptance: float) -> float:
    """Tokens per second of exact speculative decoding where one verify pass costs a target decode step (the
    drafted tokens fill columns the decode program computes anyway) and ``draft_tokens`` draft steps precede it;
    each drafted token is accepted with probability ``acceptance`` (independently), so a round yields
    ``(1 - a^(K+1)) / (1 - a)`` tokens (Leviathan et al., 2023)."""
    k, a = draft_tokens, acceptance
    per_round = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return 1e3 * per_round / (target_step_ms + k * draft_step_ms)
