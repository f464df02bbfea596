"""The ANE constraint catalog, and the checks that can be decided before the hardware sees a program.

Every fact the public record reports about what the ANE compiler or runtime rejects (or silently gets wrong) has a
stable id here. ``ANE-01`` … ``ANE-20`` are the Orion paper's Table 3 numbers exactly; ``ANE-21`` on are later
reports and the other facts of the team's ANE reference notes (sections 3, 5 and 9). A failed compile costs one of the
~119 compiles a process gets (ANE-05) and tells nothing about the cause, so everything decidable from the program
text is checked here first, with the catalog id, the place, and the fix.

* :func:`check_program`: the compile-time rules, for a :class:`~orion.mil.program.Program` and a target profile;
* :func:`check_binding`: the rules on surface byte sizes, for the runtime's binding planner;
* :func:`raise_on_errors`: turn error-severity violations into :class:`~orion.errors.ConstraintError`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from orion.compiler.targets import Target
from orion.errors import ConstraintError, GraphError
from orion.ir.ops import OPS, last_axis_slice_offset
from orion.ir.types import CAST_DTYPES, FLOAT_DTYPES
from orion.mil.program import NUMPY_DTYPES, BlobRef, Literal, Program, Statement, TensorType, VarRef
from orion.mil.validate import check_weight_files, validate_program

CATEGORIES = ("compile", "io-binding", "numerics", "runtime", "performance", "weights")
CHECKED_AT = ("compile", "binding", "run", "not-checkable")
SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Constraint:
    """One catalog entry. ``conflict`` names the :class:`Target` field that settles a CONFLICT item; ``setting``
    names the field any target-dependent entry reads (equal to ``conflict`` when both are set)."""

    id: str
    title: str
    category: str
    severity: str
    checked_at: str
    symptom: str
    fix: str
    source: str
    conflict: str | None = None
    setting: str | None = None


#: The public replication of Orion that reported the 16-weight-tensor limit with scalars, rsqrt and M1's fp16-only I/O.
ORION_FORK = "HiQS-Labs/Orion-fork test results of 2026-09-06 (M1 Pro, M4 Pro)"

_ENTRIES = (
    # --- Orion paper, Table 3 (numbers kept) ------------------------------------------------------------------------
    Constraint(
        "ANE-01", "concat is rejected by the compiler (works with interleave= in maderix's kernels)",
        "compile", "error", "compile",
        "compile fails", "return the parts as separate outputs, or write concat with a named interleave const where "
        "the target allows it", "Orion Table 3 #1; maderix/ANE (CONFLICT #1)", conflict="concat", setting="concat",
    ),
    Constraint(
        "ANE-02", "several outputs must have surfaces of equal allocation size", "io-binding", "error", "binding",
        "evaluation fails with status 0x1d", "pad every output surface to the largest", "Orion Table 3 #2",
    ),
    Constraint(
        "ANE-03", "outputs bind in alphabetical order of their MIL names", "io-binding", "error", "not-checkable",
        "silently wrong data", "by construction: the compiler declares outputs sorted by name "
        "(orion.compiler.passes.canonicalize_io) and the runtime binds surfaces in sorted-name order",
        "Orion Table 3 #3",
    ),
    Constraint(
        "ANE-04", "I/O surfaces below a minimum size (~49 KB known to work) fail", "io-binding", "error", "binding",
        "evaluation fails with status 0x1d (compiles fine)", "allocate at least min_surface_bytes; run decode on a "
        "sequence bucket of 16 with the token at position 0", "Orion Table 3 #4", setting="min_surface_bytes",
    ),
    Constraint(
        "ANE-05", "about 119 compiles per process, then compiles fail silently", "runtime", "error", "run",
        "silent compile failures (the compiler leaks state)", "the runtime counts compiles, caches programs, and "
        "checkpoints and re-executes the process before the limit", "Orion Table 3 #5 (P); maderix/ANE",
    ),
    Constraint(
        "ANE-06", "scaled_dot_product_attention ignores the causal mask", "compile", "error", "compile",
        "wrong attention (compiles and runs, mask has no effect)", "write attention out: matmul(transpose_y), scale, "
        "add a constant mask, softmax, matmul with V", "Orion Table 3 #6 (P); maderix/ANE",
    ),
    Constraint(
        "ANE-07", "weights are baked into the program at compile time", "weights", "error", "run",
        "stale weights: rewriting the weight file then unload/load gave unchanged outputs (maderix, M5)",
        "update weights with the target's weight_update strategy; a reload path must match a fresh compile on the "
        "device before it is trusted", "Orion Table 3 #7 (P); maderix/ANE (CONFLICT, section 2)",
        conflict="weight_update", setting="weight_update",
    ),
    Constraint(
        "ANE-08", "a BLOBFILE offset names the blob's 64-byte metadata record (64 for a file's first blob)",
        "weights", "error", "compile", "garbage weights, no error", "offset = record offset: 64 for the first blob, "
        "then 64-byte aligned (never 0, never the data offset)", "Orion Table 3 #8",
    ),
    Constraint(
        "ANE-09", "MIL text must be passed as NSData (UTF-8), not NSString", "runtime", "error", "not-checkable",
        "crash", "by construction: the runtime's ANE bridge always passes the text as UTF-8 bytes",
        "Orion Table 3 #9",
    ),
    Constraint(
        "ANE-10", "gelu is not a valid op (others use gelu(mode=...))", "compile", "error", "compile",
        "compile fails", "write the tanh approximation 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))",
        "Orion Table 3 #10 (CONFLICT #10)", conflict="gelu_native", setting="gelu_native",
    ),
    Constraint(
        "ANE-11", "the weight dictionary must be an empty dict, never nil", "runtime", "error", "not-checkable",
        "crash", "by construction: the runtime's ANE bridge always passes a dictionary, empty when there are no "
        "weights", "Orion Table 3 #11",
    ),
    Constraint(
        "ANE-12", "matmul transpose_x/transpose_y must be named bool consts", "compile", "error", "compile",
        "MIL rejected", "emit a named bool const (bool ty = const()[..., val=bool(true)]) and pass its name",
        "Orion Table 3 #12",
    ),
    Constraint(
        "ANE-13", "conv has no bias= parameter", "compile", "error", "compile", "MIL rejected",
        "drop bias= and add the bias with a separate add", "Orion Table 3 #13",
    ),
    Constraint(
        "ANE-14", "returned names must refer to live (post-DCE) values", "compile", "error", "compile",
        "invalid program", "return only names the function defines; rename after dead-code elimination",
        "Orion Table 3 #14",
    ),
    Constraint(
        "ANE-15", "re-executing the process costs ~50 ms", "performance", "warning", "not-checkable", "latency",
        "batch many steps per process; the runtime re-executes only near the compile limit (ANE-05)",
        "Orion Table 3 #15 (P)",
    ),
    Constraint(
        "ANE-16", "a conv with ~32K input channels is rejected (32K output channels compile)", "compile", "error",
        "compile", "compile fails", "tile the conv over input channels and add the partial results, or run it on "
        "the CPU", "Orion Table 3 #16; maderix/ANE (output side)", setting="max_conv_input_channels",
    ),
    Constraint(
        "ANE-17", "a 1x1 conv is about 3x faster than matmul for a linear layer", "performance", "warning",
        "compile", "speed", "write a linear layer with constant weights as conv with weight [O, I, 1, 1]",
        "Orion Table 3 #17 (P); maderix/ANE",
    ),
    Constraint(
        "ANE-18", "several inputs must have surfaces of equal allocation size", "io-binding", "error", "binding",
        "evaluation fails with status 0x1d", "pad every input surface to the largest and write data packed",
        "Orion Table 3 #18",
    ),
    Constraint(
        "ANE-19", "inputs bind in alphabetical order of their parameter names", "io-binding", "error",
        "not-checkable", "silently wrong data", "by construction: the compiler declares inputs sorted by name "
        "(orion.compiler.passes.canonicalize_io) and the runtime binds surfaces in sorted-name order",
        "Orion Table 3 #19",
    ),
    Constraint(
        "ANE-20", "an over-allocated surface is read as packed data from byte 0", "io-binding", "error",
        "not-checkable", "silently wrong data (stride padding is not honoured)", "by construction: the runtime "
        "writes and reads every tensor packed from byte 0", "Orion Table 3 #20",
    ),
    # --- later reports and the other facts (reference sections 3, 4, 5, 9) --------------------------------------------
    Constraint(
        "ANE-21", "at most 16 weight tensors per program: BLOBFILE constants, and every fp16/fp32 constant "
        "operand written in the text (a scalar such as an eps or a -0.5 exponent takes a slot too: a named one "
        "once, or once per reading op where shared_scalar_slots is per-use)", "weights",
        "error", "compile", "InvalidMILProgram with 17", "put fewer blocks in one program, share equal scalar "
        "constants, merge weights into fewer blobs, or pass weights as inputs",
        f"Orion (later report); {ORION_FORK}", setting="max_blob_constants",
    ),
    Constraint(
        "ANE-22", "rsqrt fails to compile (pow(x, -0.5) works)", "compile", "error", "compile", "compile fails",
        "write pow(x, -0.5) (the compiler's legalization does)", f"later report (reference section 3); {ORION_FORK}",
        setting="rsqrt_native",
    ),
    Constraint(
        "ANE-23", "I/O dtypes are fp16 or fp32 only (int32 and bf16 are rejected); M1 rejects fp32 inputs and "
        "outputs too", "io-binding", "error", "compile", "rejected at compile (Orion's own GPT-2 inference "
        "programs, which cross fp32 tensors, do not compile on M1)", "declare inputs and outputs fp16 where the "
        "target takes no fp32 (32 fp16 columns keep the 64-byte rows 16 fp32 columns have)",
        f"reference section 5; ANEForge; {ORION_FORK} (fp32 on M1)", setting="io_dtypes",
    ),
    Constraint(
        "ANE-24", "static shapes of rank at most 5", "compile", "error", "compile", "compile fails",
        "reshape to rank 4 ([1, C, 1, S])", "reference section 5", setting="max_rank",
    ),
    Constraint(
        "ANE-25", "per-axis extent limit: 16384 on older chips, 65536 on newer", "compile", "error", "compile",
        "compile fails", "tile the axis (a 32,000- or 50,257-entry classifier needs tiling on older chips)",
        "reference section 5; ANEForge; ANE guide (arXiv 2606.22283)", setting="max_axis",
    ),
    Constraint(
        "ANE-26", "matmul inner dimension not a multiple of 32", "numerics", "warning", "compile",
        "zeros in the output (one report)", "pad the inner dimension with zeros to a multiple of 32",
        "reference section 5 (one report)", setting="matmul_inner_multiple",
    ),
    Constraint(
        "ANE-27", "silu is reported invalid (others use it)", "compile", "error", "compile", "compile fails",
        "write x * sigmoid(x)", "Orion; other projects use silu (CONFLICT, section 3)", conflict="silu_native",
        setting="silu_native",
    ),
    Constraint(
        "ANE-28", "one blob per weight file on M1", "weights", "error", "compile",
        "M1 rejects a weight file holding several blobs", "write one file per weight (offset 64 in each)",
        "reference section 4 (Orion, maderix/ANE write one file per matrix)", setting="blobs_per_file",
    ),
    Constraint(
        "ANE-29", "M1/M2: a slice with a nonzero last-axis begin sends |x| > 4094 to inf", "numerics", "warning",
        "compile", "inf in the sliced values", "slice along another axis (transpose first), or keep the sliced "
        "values within +-4094", "ANEForge numeric cliffs (N11)", setting="slice_offset_overflow",
    ),
    Constraint(
        "ANE-30", "MIL dialect per chip: program(1.3)/ios18 on M3-M5, program(1.0)/ios16 on M1/M2", "compile",
        "error", "compile", "compile fails", "print the program in the target's dialect: program.to_text(version)",
        "reference section 3", setting="mil_version",
    ),
    Constraint(
        "ANE-31", "conv/matmul results of magnitude >= 32768 become +-inf", "numerics", "warning", "run",
        "inf in outputs (elementwise ops overflow only at 65504)", "scale activations or weights down; split long "
        "contractions; the emulator applies the same ceiling", "ANE guide; ANEForge (N4)",
    ),
    Constraint(
        "ANE-32", "conv pad_type/strides/pad/dilations/groups must be named consts", "compile", "error", "compile",
        "MIL rejected", "emit each as a named const and pass its name", "reference section 3 (Orion, maderix/ANE)",
    ),
    Constraint(
        "ANE-33", "fp32 inputs need a cast to fp16 inside the program", "io-binding", "warning", "compile",
        "rejected or computed in fp16 anyway (N1)", "cast(dtype=<string const \"fp16\">, x=input) before any other "
        "use", "reference section 5",
    ),
    Constraint(
        "ANE-34", "only ops known to run on the ANE", "compile", "error", "compile", "compile fails",
        "rewrite the op with known ones (see orion.ir.ops.OPS)", "Orion op registry (coremltools iOS18 op names)",
    ),
    Constraint(
        "ANE-35", "I/O last-axis bytes should be a multiple of 64", "io-binding", "warning", "compile",
        "silently wrong data if rows are 64-byte aligned (reports disagree with packed reads, #20)",
        "choose the last axis so that its bytes are a multiple of 64 (fp16: 32 elements, fp32: 16)",
        "reference section 5", setting="io_row_align_bytes",
    ),
    Constraint(
        "ANE-36", "working set above the ~32 MB on-chip SRAM", "performance", "warning", "compile",
        "about 30% slower", "split the program so each working set fits; checked by the compiler's SRAM estimate, "
        "not by check_program", "maderix/ANE", setting="sram_budget_bytes",
    ),
    Constraint(
        "ANE-37", "fp16 everywhere: beyond +-65504 is inf, NaN inputs read as +inf", "numerics", "warning", "run",
        "inf cascades and NaN in training", "clamp to +-65504 on every copy into the ANE (outputs read back keep "
        "+-inf), sanitize weights when writing (NaN -> 0, +-inf -> +-65504)", "Orion; ANE guide (N1, N5, N6)",
    ),
    Constraint(
        "ANE-38", "every statement follows its op's MIL definition: known parameters, every input given, constant "
        "parameters, operands the op accepts, the declared type equal to the op's result", "compile", "error",
        "compile", "the ANE compiler rejects the program; the emulator refuses it at load with the same message",
        "fix the statement as the message says (orion.ir.ops declares each op's inputs, parameters and shape rule)",
        "coremltools op definitions (iOS16/iOS18 opsets); orion.mil.validate, which the emulator runs too",
    ),
    Constraint(
        "ANE-39", "a cast to an integer or bool type inside a program: what the ANE computes is unknown", "numerics",
        "warning", "compile", "unknown: values are fp16 in flight (N1), so an integer may be rounded to fp16, "
        "computed otherwise, or refused at compile", "truncate on the CPU, or check the program with orion doctor "
        "on the device before relying on it; the emulator computes MIL's cast (truncation toward zero, wrap to the "
        "type's width, nonzero -> true) and holds the result as fp16",
        "unverified (no public report of an integer cast on the ANE); MIL semantics: coremltools' cast",
    ),
    Constraint(
        "ANE-40", "every BLOBFILE constant reads a blob record of its declared dtype and size from a weight file "
        "inside the model folder", "weights", "error", "compile", "the program does not load (the emulator refuses "
        "it at load with the same message)", "write the weight file with orion.mil.blob.BlobWriter next to the "
        "program, and name its record offset in the const", "blob storage v2 (reference section 4); "
        "orion.mil.validate.check_weight_files, the emulator's loader",
    ),
    Constraint(
        "ANE-41", "an op whose result is integer positions (reduce_argmax, reduce_argmin, topk's indices): what the "
        "ANE computes is unknown", "numerics", "warning", "compile", "unknown: values are fp16 in flight (N1), "
        "where an index above 2048 is not exact, and int32 outputs are rejected (ANE-23); the op may also be "
        "refused at compile", "return the fp16 scores and take the argmax or top-k on the CPU, or check the program "
        "with orion doctor on the device before relying on it; the emulator computes MIL's positions exactly "
        "(int32, first position among equal values) and reads them back as int32",
        "unverified (no public report of an index op on the ANE); MIL semantics: coremltools' reduce_argmax, "
        "reduce_argmin, topk",
    ),
    Constraint(
        "ANE-42", "a program with several functions (main plus prefill, decode ... sharing weights): whether the ANE "
        "compiles it and evaluates each function by the request's procedure index is unverified", "compile", "error",
        "compile", "unknown: every public request passes procedureIndex 0; the program may be refused, or run main "
        "only", "compile each function as a program of its own (orion run --function NAME on the emulator), or "
        "settle it with orion doctor --probe multi-function and compile for the profile it writes",
        "CONTESTED: reference section 2 (procedureIndex @0); Core ML multifunction models (coremltools 8) run "
        "through Core ML's own runtime", setting="multi_function",
    ),
    Constraint(
        "ANE-43", "a stateful program (state<...> inputs, read_state, write_state): whether the ANE keeps a state "
        "buffer between evaluations, and how the private API binds one, is unverified", "io-binding", "error",
        "compile", "unknown: no public direct-ANE project binds a state; the program may be refused, or the state "
        "lost between evaluations", "keep the cache in ordinary inputs and outputs (the KV cache as program inputs, "
        "as Orion's GPT-2 decode does), or run the stateful program on the emulator (load_program, whose state "
        "persists between run() calls)", "unverified: the reference has no report of state on the ANE; MIL "
        "semantics: coremltools' iOS18 read_state, coreml_update_state (write_state), slice_update",
    ),
    Constraint(
        "ANE-44", "compressed weights (constexpr ops) are decoded to fp16 before the multiply; int8 affine and "
        "palettes are reported (N12), per-block shift-scale (iOS18 int4/int8 with per-block scales) is not measured",
        "weights", "warning", "compile", "unknown for per-block scales: a public project reports wrong answers from "
        "Apple's grouped 4-bit weights", "prefer int8 (constexpr_affine_dequantize) or palettes "
        "(constexpr_lut_to_dense), or check the program on the device with orion doctor; how many weight-tensor "
        "slots one compressed weight takes is the setting compressed_weight_slots",
        "reference section 9 (N12); issue 15's user reports; coremltools constexpr op definitions",
        setting="compressed_weight_slots",
    ),
)

CATALOG: dict[str, Constraint] = {c.id: c for c in _ENTRIES}

#: Column titles of :func:`format_catalog` rows.
CATALOG_COLUMNS = ("id", "title", "category", "severity", "checked at", "setting", "symptom", "fix", "source")


@dataclass(frozen=True)
class Violation:
    """One broken constraint at one place."""

    constraint: str
    severity: str
    where: str
    message: str
    fix: str

    def __str__(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.constraint} {self.severity}{at}: {self.message}; fix: {self.fix}"


def raise_on_errors(violations: list[Violation]) -> None:
    """Raise :class:`ConstraintError` listing the error-severity violations, if any (warnings pass)."""
    errors = [v for v in violations if v.severity == "error"]
    if errors:
        raise ConstraintError(errors)


def format_catalog(target: Target | None = None) -> list[tuple[str, ...]]:
    """Rows of :data:`CATALOG_COLUMNS` for ``orion constraints``; with a target, the setting column shows its value."""
    rows = []
    for c in CATALOG.values():
        setting = ""
        if c.setting:
            setting = f"{c.setting}={getattr(target, c.setting)!r}" if target else c.setting
            if c.conflict:
                setting += " (CONFLICT)"
        rows.append((c.id, c.title, c.category, c.severity, c.checked_at, setting, c.symptom, c.fix, c.source))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Binding-time checks


def check_binding(input_sizes: Mapping[str, int], output_sizes: Mapping[str, int], target: Target) -> list[Violation]:
    """The rules on surface allocation sizes in bytes (ANE-02, ANE-04, ANE-18).

    ANE-03/ANE-19 (alphabetical binding) and ANE-20 (packed reads) hold by construction: the runtime binds surfaces
    in sorted-name order and writes every tensor packed from byte 0, so there is nothing to check here.
    """
    found = []
    for kind, cid, sizes in (("input", "ANE-18", input_sizes), ("output", "ANE-02", output_sizes)):
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{name}={size}" for name, size in sorted(sizes.items()))
            found.append(
                Violation(
                    cid, "error", f"{kind} surfaces",
                    f"{kind} surfaces differ in size ({listing} bytes); evaluation fails with status 0x1d",
                    f"allocate every {kind} surface at {max(sizes.values())} bytes and write data packed from byte 0",
                )
            )
        for name, size in sorted(sizes.items()):
            if size < target.min_surface_bytes:
                found.append(
                    Violation(
                        "ANE-04", "error", f"{kind} '{name}'",
                        f"surface of {size} bytes is below the {target.min_surface_bytes} bytes known to work; "
                        "evaluation fails with status 0x1d",
                        f"allocate at least {target.min_surface_bytes} bytes (decode: a sequence bucket of 16), or "
                        "lower min_surface_bytes once a probe shows a smaller size works",
                    )
                )
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Compile-time checks

#: The ops ANE-34 accepts: the declared ones reported to run on the ANE (the emulator runs all of ``OPS``).
ANE_KNOWN_OPS = frozenset(name for name, op in OPS.items() if op.ane_known)


def check_program(program: Program, target: Target, model_dir: Path | None = None) -> list[Violation]:
    """Every compile-time rule decidable from the program text, for ``target``; [] when nothing is wrong. With
    ``model_dir``, the weight files its BLOBFILE constants name there too (ANE-40).

    Not checked here: the SRAM working set (ANE-36, the compiler's estimate), and rules that need run-time data.
    """
    found = _Checker(program, target, ANE_KNOWN_OPS).run()
    if model_dir is not None:
        entry = CATALOG["ANE-40"]
        found += [Violation("ANE-40", entry.severity, p.where, p.message, entry.fix)
                  for p in check_weight_files(program, model_dir)]
    return found


def _nbytes(t: TensorType) -> int | None:
    return t.nbytes if t.dtype in NUMPY_DTYPES else None


def _is_text_float(value) -> bool:
    """An fp16/fp32 literal whose values are written in the MIL text (not a BLOBFILE reference)."""
    return isinstance(value, Literal) and value.type.dtype in FLOAT_DTYPES and not isinstance(value.value, BlobRef)


class _Checker:
    def __init__(self, program: Program, target: Target, known_ops: frozenset[str]):
        self.program = program
        self.target = target
        self.known_ops = known_ops
        self.types = program.var_types()
        self.consts = {st.var: st for st in program.statements if st.op == "const"}
        self.found: list[Violation] = []

    def run(self) -> list[Violation]:
        self.check_dialect()
        self.check_functions()
        self.check_states()
        self.check_definitions()
        for st in self.program.statements:
            self.check_statement(st)
        self.check_blobs()
        self.check_outputs()
        self.check_shapes()
        self.check_io()
        return self.found

    # -- helpers ---------------------------------------------------------------------------------------------------

    def add(self, cid: str, where: str, message: str, fix: str | None = None, severity: str | None = None) -> None:
        entry = CATALOG[cid]
        self.found.append(Violation(cid, severity or entry.severity, where, message, fix or entry.fix))

    @staticmethod
    def at(st: Statement) -> str:
        place = f"{st.op} '{st.var or st.name}'"
        return f"line {st.line} ({place})" if st.line else place

    def arg_type(self, arg) -> TensorType | None:
        if isinstance(arg, VarRef):
            return self.types.get(arg.name)
        return arg.type if isinstance(arg, Literal) else None

    def value(self, arg) -> np.ndarray | None:
        """The numeric value of an inline literal or of a named non-blob const; None when not constant."""
        if isinstance(arg, VarRef) and arg.name in self.consts:
            arg = self.consts[arg.name].attrs.get("val")
        if isinstance(arg, Literal) and isinstance(arg.value, np.ndarray):
            return arg.value
        return None

    def text_constant_operands(self) -> int:
        """fp16/fp32 constants written in the text (not BLOBFILE) that ops read: an inline literal once per use, a
        named const once however many ops read it, or once per reading op where the target's
        ``shared_scalar_slots`` is ``per-use``. Each takes a weight-tensor slot (ANE-21)."""
        per_use = self.target.shared_scalar_slots == "per-use"
        named: set[str] = set()
        slots = 0
        for st in self.program.statements:
            if st.op == "const":
                continue
            read: set[str] = set()
            for arg in st.args.values():
                for ref in arg if isinstance(arg, tuple) else (arg,):
                    if isinstance(ref, VarRef) and ref.name in self.consts:
                        if _is_text_float(self.consts[ref.name].attrs.get("val")):
                            read.add(ref.name)
                    elif _is_text_float(ref):
                        slots += 1
            slots += len(read) if per_use else len(read - named)
            named |= read
        return slots

    def compressed_parts(self) -> set[str]:
        """Where (as :meth:`values` names them) the consts are that only constexpr ops read."""
        readers: dict[str, set[str]] = defaultdict(set)
        for st in self.program.statements:
            for arg in st.args.values():
                for ref in arg if isinstance(arg, tuple) else (arg,):
                    if isinstance(ref, VarRef):
                        readers[ref.name].add(OPS[st.op].kind if st.op in OPS else st.op)
        return {self.at(st) for st in self.program.statements
                if st.op == "const" and readers.get(st.var) == {"constexpr"}}

    def compressed_parts_merged(self) -> int:
        """BLOBFILE constants not counted on their own where a compressed weight takes one slot
        (``compressed_weight_slots`` "one"): each constexpr op's stored parts count once together."""
        if self.target.compressed_weight_slots == "per-blob":
            return 0
        stored = {st.var for st, _ in self.program.blob_refs()}
        merged = 0
        for st in self.program.statements:
            if st.op in OPS and OPS[st.op].kind == "constexpr":
                parts = {ref.name for ref in st.args.values() if isinstance(ref, VarRef) and ref.name in stored}
                merged += max(0, len(parts) - 1)
        return merged

    def is_const(self, arg) -> bool:
        return isinstance(arg, Literal) or (isinstance(arg, VarRef) and arg.name in self.consts)

    # -- program ---------------------------------------------------------------------------------------------------

    def check_dialect(self) -> None:
        if self.program.version != self.target.mil_version:
            self.add(
                "ANE-30", "program",
                f"the program is program({self.program.version}) but target {self.target.name!r} needs "
                f"program({self.target.mil_version})",
                f"print it with program.to_text({self.target.mil_version!r})",
            )

    def check_functions(self) -> None:
        functions = self.program.functions
        if len(functions) > 1 and self.target.multi_function != "procedure-index":
            self.add("ANE-42", "program", f"the text holds {len(functions)} functions ({', '.join(functions)}); "
                                          f"target {self.target.name!r} has multi_function="
                                          f"{self.target.multi_function}")

    def check_states(self) -> None:
        for name in self.program.states:
            self.add("ANE-43", f"input '{name}'", f"state {name!r}: state on the ANE is unverified")

    def check_definitions(self) -> None:
        """MIL's op definitions, by the same function the emulator refuses a program with at load."""
        for problem in validate_program(self.program).problems:
            if problem.op and problem.op not in OPS:
                continue  # an unknown op: ANE-34 (or ANE-06) names it
            self.add("ANE-38", problem.where, problem.message)

    # -- statements ------------------------------------------------------------------------------------------------

    def check_statement(self, st: Statement) -> None:
        t, op, where = self.target, st.op, self.at(st)
        if op == "const":
            return
        if op == "scaled_dot_product_attention":
            self.add("ANE-06", where, "scaled_dot_product_attention ignores the causal mask on the ANE")
            return
        integer_results = [var for var, vt in st.outputs if OPS.get(op) is not None and OPS[op].kind == "index"
                           and vt.dtype not in FLOAT_DTYPES]
        if integer_results:
            self.add("ANE-41", where, f"{op} gives integer positions ({', '.join(integer_results)}): the ANE's "
                                      "result is unverified")
        if op not in self.known_ops:
            self.add("ANE-34", where, f"op {op!r} is not known to run on the ANE")
            return
        if op == "constexpr_blockwise_shift_scale":
            self.add("ANE-44", where, "per-block (or int4) shift-scale weights are not measured on the ANE")
        if op == "concat":
            if t.concat == "forbid":
                self.add("ANE-01", where, f"target {t.name!r} forbids concat",
                         "return the parts as separate outputs")
            elif t.concat == "interleave" and "interleave" not in st.args:
                self.add("ANE-01", where, "concat without interleave= failed to compile",
                         "pass interleave=<named bool const> (false keeps plain concatenation)")
        elif op == "gelu" and not t.gelu_native:
            self.add("ANE-10", where, f"target {t.name!r} has no native gelu")
        elif op == "silu" and not t.silu_native:
            self.add("ANE-27", where, f"target {t.name!r} has no native silu")
        elif op == "rsqrt" and not t.rsqrt_native:
            self.add("ANE-22", where, f"target {t.name!r} has no native rsqrt")
        elif op == "matmul":
            self.check_matmul(st, where)
        elif op == "conv":
            self.check_conv(st, where)
        elif op in ("slice_by_index", "slice_by_size"):
            self.check_slice(st, where)
        elif op == "cast" and st.type.dtype in CAST_DTYPES and st.type.dtype not in FLOAT_DTYPES:
            self.add("ANE-39", where, f"cast to {st.type.dtype}: the ANE's result is unverified")

    def check_matmul(self, st: Statement, where: str) -> None:
        for flag in ("transpose_x", "transpose_y"):
            if isinstance(st.args.get(flag), Literal):
                self.add("ANE-12", where, f"{flag} is an inline literal", "emit a named bool const")
        x = self.arg_type(st.args.get("x"))
        tx = self.value(st.args["transpose_x"]) if "transpose_x" in st.args else np.asarray(False)
        multiple = self.target.matmul_inner_multiple
        if x is not None and x.rank >= 2 and tx is not None:
            k = x.shape[-2] if bool(tx) else x.shape[-1]
            if k % multiple:
                self.add(
                    "ANE-26", where, f"inner dimension {k} is not a multiple of {multiple}",
                    f"pad the inner dimension with zeros to {-(-k // multiple) * multiple}",
                )
        for operand in ("x", "y"):
            arg = st.args.get(operand)
            if self.is_const(arg):
                name = arg.name if isinstance(arg, VarRef) else "an inline literal"
                self.add("ANE-17", where, f"matmul operand {operand} is constant ({name})")

    def check_conv(self, st: Statement, where: str) -> None:
        for param in ("pad_type", "strides", "pad", "dilations", "groups"):
            if isinstance(st.args.get(param), Literal):
                self.add("ANE-32", where, f"{param} is an inline literal", f"emit {param} as a named const")
        if "bias" in st.args:
            self.add("ANE-13", where, "conv has a bias= parameter")
        x = self.arg_type(st.args.get("x"))
        limit = self.target.max_conv_input_channels
        if x is not None and x.rank >= 2 and x.shape[1] > limit:
            self.add("ANE-16", where, f"{x.shape[1]} input channels exceed {limit}")

    def check_slice(self, st: Statement, where: str) -> None:
        x = self.arg_type(st.args.get("x"))
        attrs = {k: self.value(v) for k, v in st.args.items() if k != "x"}
        if not self.target.slice_offset_overflow or x is None or any(v is None for v in attrs.values()):
            return
        try:
            offset = last_axis_slice_offset(st.op, x.shape, OPS[st.op].resolve_attrs(
                {k: v.tolist() for k, v in attrs.items()}))
        except GraphError:
            return  # a malformed slice: the parser and the emulator refuse it with its line
        if offset:
            self.add(
                "ANE-29", where,
                f"last-axis offset {offset} is nonzero: on target {self.target.name!r} values with |x| > 4094 "
                "become inf",
            )

    # -- weights ---------------------------------------------------------------------------------------------------

    def check_blobs(self) -> None:
        refs = self.program.blob_refs()
        for st, ref in refs:
            if ref.offset < 64 or ref.offset % 64:
                self.add(
                    "ANE-08", self.at(st),
                    f"BLOBFILE offset {ref.offset} is not a metadata-record offset (64, 128, ... in steps of 64)",
                    "use the record offset: 64 for the first blob of a file",
                )
        limit = self.target.max_blob_constants
        if limit is not None:
            operands = self.text_constant_operands()
            merged = self.compressed_parts_merged()
            tensors = len(refs) - merged
            if tensors + operands > limit:
                parts = f", compressed weights' parts counted once: {merged} fewer" if merged else ""
                self.add(
                    "ANE-21", "program",
                    f"{tensors + operands} weight tensors ({tensors} BLOBFILE constants{parts} + "
                    f"{operands} fp16/fp32 "
                    f"constant operands written in the text), more than the {limit} target {self.target.name!r} "
                    "allows",
                )
        if self.target.blobs_per_file == "one":
            offsets: dict[str, set[int]] = defaultdict(set)
            for _, ref in refs:
                if ref.offset >= 64 and ref.offset % 64 == 0:  # bad offsets are ANE-08's
                    offsets[ref.path].add(ref.offset)
            for path, found in sorted(offsets.items()):
                if found != {64}:
                    self.add(
                        "ANE-28", f"weight file '{path}'",
                        f"blobs at offsets {sorted(found)}: target {self.target.name!r} takes one blob per file "
                        "(at offset 64)",
                    )

    # -- outputs, shapes, I/O --------------------------------------------------------------------------------------

    def check_outputs(self) -> None:
        for name in self.program.outputs:
            if name not in self.types:
                self.add("ANE-14", f"output '{name}'", f"returned name {name!r} is not defined by the function")

    def values(self) -> list[tuple[str, TensorType]]:
        placed = [(f"input '{name}'", t) for name, t in self.program.inputs]
        return placed + [(self.at(st), vt) for st in self.program.statements for _, vt in st.outputs]

    def check_shapes(self) -> None:
        t = self.target
        decoded = self.compressed_parts()
        for where, vt in self.values():
            if where in decoded:  # a compressed weight's part (a palette is rank + 2): decoded before use (ANE-44)
                continue
            if vt.rank > t.max_rank:
                self.add("ANE-24", where, f"rank {vt.rank} ({vt}) exceeds {t.max_rank}")
            big = [f"axis {i} = {d}" for i, d in enumerate(vt.shape) if d > t.max_axis]
            if big:
                self.add("ANE-25", where, f"{', '.join(big)} exceeds the per-axis limit {t.max_axis} ({vt})")

    def check_io(self) -> None:
        t = self.target
        inputs = [(n, vt) for n, vt in self.program.inputs if n not in self.program.states]  # states: ANE-43
        outputs = [(name, self.types[name]) for name in self.program.outputs if name in self.types]
        for kind, items in (("input", inputs), ("output", outputs)):
            for name, vt in items:
                where = f"{kind} '{name}'"
                if vt.dtype not in t.io_dtypes:
                    self.add("ANE-23", where, f"{kind} dtype {vt.dtype} is not one of {', '.join(t.io_dtypes)}")
                    continue
                row = vt.shape[-1] * NUMPY_DTYPES[vt.dtype].itemsize if vt.shape else 0
                if t.io_row_align_bytes and row % t.io_row_align_bytes:
                    self.add("ANE-35", where, f"last axis is {row} bytes, not a multiple of {t.io_row_align_bytes}")
                size = vt.nbytes
                if size < t.min_surface_bytes:
                    self.add(
                        "ANE-04", where,
                        f"{size} bytes is below the {t.min_surface_bytes}-byte surface known to work",
                        "the runtime must allocate its surface at min_surface_bytes or more (checked at binding); "
                        "otherwise use a larger sequence bucket",
                        severity="warning",
                    )
        for name, vt in inputs:
            if vt.dtype == "fp32":
                users = [st for st in self.program.statements if st.op != "cast" and self.uses(st, name)]
                if users:
                    self.add("ANE-33", f"input '{name}'", f"fp32 input is used by {self.at(users[0])} without a cast")
        for kind, cid, items in (("input", "ANE-18", inputs), ("output", "ANE-02", outputs)):
            sizes = {name: _nbytes(vt) for name, vt in items if _nbytes(vt) is not None}
            if len(set(sizes.values())) > 1:
                listing = ", ".join(f"{n}={s}" for n, s in sorted(sizes.items()))
                self.add(
                    cid, f"{kind}s",
                    f"{kind} tensors differ in size ({listing} bytes)",
                    f"the runtime pads every {kind} surface to {max(sizes.values())} bytes (checked at binding)",
                    severity="warning",
                )

    @staticmethod
    def uses(st: Statement, name: str) -> bool:
        for arg in st.args.values():
            refs = arg if isinstance(arg, tuple) else (arg,)
            if any(isinstance(r, VarRef) and r.name == name for r in refs):
                return True
        return False


__all__ = [
    "CATALOG",
    "CATALOG_COLUMNS",
    "Constraint",
    "Violation",
    "check_program",
    "check_binding",
    "format_catalog",
    "raise_on_errors",
]
