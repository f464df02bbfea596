"""Target profiles: every chip-dependent, contested or unverified fact about the ANE, in one place.

The public record disagrees with itself on several points (concat, gelu, silu, reloading weights: the CONFLICT items
of the team's ANE reference notes) and leaves others unmeasured (the smallest surface, the BLOBFILE constant limit). The
compiler, the constraint checker and the emulator read those facts from a :class:`Target` and nowhere else, so a
probe on real hardware (``orion doctor``) can settle one by changing one field.

``default`` takes the conservative side of every conflict: what is known to work on every chip. The per-chip
profiles record what has been reported for that chip, and fall back to the conservative value where nothing has.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orion.errors import SettingsError
from orion.mil.program import DIALECTS, NUMPY_DTYPES

CONCAT_MODES = ("forbid", "interleave", "allow")
BLOBS_PER_FILE = ("one", "many")
SHARED_SCALAR_SLOTS = ("one", "per-use")
WEIGHT_UPDATES = ("reload", "patch", "recompile", "inputs")
MULTI_FUNCTION = ("unknown", "procedure-index")
COMPRESSED_WEIGHT_SLOTS = ("one", "per-blob")
MiB = 1024 * 1024


def _note(text: str) -> Any:
    """Metadata carrying the field's meaning and sources, for :meth:`Target.describe`."""
    return {"note": text}


@dataclass(frozen=True)
class Target:
    """One ANE target profile. Fields are facts that differ by chip or that public reports contest.

    Build one from a profile (:func:`get_target`, :meth:`with_overrides`); ``DEFAULT`` below spells every field.
    """

    name: str = field(metadata=_note("profile name"))
    mil_version: str = field(
        metadata=_note(
            'MIL dialect: "1.3"/ios18 (M3, M4, M5) or the verbose "1.0"/ios16 that M1/M2 are reported to need '
            "(reference section 3)"
        )
    )
    concat: str = field(
        metadata=_note(
            'CONFLICT #1. "forbid": Orion\'s concat failed to compile (M4 Max); "interleave": maderix\'s concat with '
            'an interleave= const compiles; "allow": any concat'
        )
    )
    gelu_native: bool = field(
        metadata=_note("CONFLICT #10. Orion: gelu is invalid; others use gelu(mode=...). False: write the tanh form")
    )
    silu_native: bool = field(
        metadata=_note("CONFLICT (section 3): Orion reports silu invalid; others use it. False: write x*sigmoid(x)")
    )
    rsqrt_native: bool = field(
        metadata=_note(
            "rsqrt fails to compile while pow(x, -0.5) works (a later report; HiQS-Labs/Orion-fork 2026-09-06, "
            "M1 Pro and M4 Pro). False: write pow"
        )
    )
    max_axis: int = field(
        metadata=_note("largest extent of any tensor axis: 16384 on older chips, 65536 on newer (reference section 5)")
    )
    max_conv_input_channels: int = field(
        metadata=_note(
            "largest conv input-channel count: Orion #16 saw a 32,000-input-channel conv rejected (M4 Max) while "
            "maderix compiled 32K OUTPUT channels; the true bound below 32,000 is unmeasured"
        )
    )
    max_blob_constants: int | None = field(
        metadata=_note(
            "weight tensors per program: BLOBFILE constants plus every fp16/fp32 constant operand written in the "
            "text (a scalar takes a slot too); 16 in a later Orion report and in HiQS-Labs/Orion-fork 2026-09-06 "
            "(M1 Pro, M4 Pro). None: no limit"
        )
    )
    shared_scalar_slots: str = field(
        metadata=_note(
            'weight-tensor slots a named fp16/fp32 scalar const read by several ops takes: "one" (as the catalog '
            'assumed from HiQS-Labs/Orion-fork\'s "a scalar takes a slot") or "per-use"; orion doctor measures it'
        )
    )
    blobs_per_file: str = field(
        metadata=_note('"one": one blob per weight file (M1 is reported to reject several); "many": several allowed')
    )
    min_surface_bytes: int = field(
        metadata=_note(
            "smallest I/O surface accepted: 49,152 bytes is known to work, 3,072 is known to fail; the true minimum "
            "is unknown (Orion #4)"
        )
    )
    slice_offset_overflow: bool = field(
        metadata=_note("N11: a slice with a nonzero last-axis begin sends |x| > 4094 to inf (M1/M2; M3 unmeasured)")
    )
    matmul_inner_multiple: int = field(
        metadata=_note("matmul inner dimensions not a multiple of this gave zeros in one report (a warning)")
    )
    max_rank: int = field(metadata=_note("largest tensor rank (reference section 5)"))
    io_dtypes: tuple[str, ...] = field(
        metadata=_note(
            "dtypes a program input or output may have: int32 and bf16 are rejected everywhere (reference section "
            "5); M1 rejects fp32 too (HiQS-Labs/Orion-fork 2026-09-06, M1 Pro); fp32 works on M4 (Orion, "
            "[768, 16] fp32 surfaces)"
        )
    )
    io_row_align_bytes: int | None = field(
        metadata=_note(
            "I/O last-axis bytes should be a multiple of this: the ANE reads surfaces packed (Orion #20) while other "
            "reports say rows are 64-byte aligned; multiples of 64 satisfy both. None: no check"
        )
    )
    weight_update: str = field(
        metadata=_note(
            'how new weights reach a loaded program: "recompile" (always correct), "reload" (unload, rewrite the '
            'weight file, load: stale outputs on M5 per maderix and Orion #7), "patch" (copy the compiled net.plist '
            'and data: Orion\'s tested recipe), "inputs" (weights as program inputs)'
        )
    )
    sram_budget_bytes: int = field(
        metadata=_note("on-chip SRAM; about 30% slower once a program's working set exceeds it (maderix)")
    )
    numerics: dict[str, Any] = field(
        default_factory=dict,
        hash=False,
        metadata=_note("overrides of the emulator's numerics settings for this chip (str -> value)"),
    )
    load_disk_cache: bool = field(
        default=False,
        metadata=_note(
            "load a compile that another process cached on disk, without compiling: shown only within one process on "
            "hardware (Orion's delta-compilation recipe, ref. section 2); off until `orion doctor` shows it on the chip"
        ),
    )
    multi_function: str = field(
        default="unknown",
        metadata=_note(
            "CONTESTED: a MIL text with several functions (main plus prefill, decode ... sharing weights, as Core ML "
            "multifunction models ship): every public direct-ANE request passes procedureIndex @0 (ref. section 2) "
            'and nobody reports another. "unknown" (not shown to work, or refused): such programs are refused; '
            '"procedure-index": it compiles, and a request\'s procedureIndex picks the function (text order). '
            "orion doctor's multi-function probe settles it"
        ),
    )

    compressed_weight_slots: str = field(
        default="one",
        metadata=_note(
            'weight-tensor slots (max_blob_constants) a compressed weight takes: "one" (a constexpr op yields one '
            'weight, the assumption Orion makes) or "per-blob" (each of its BLOBFILE parts, data, scales, offsets or '
            "palette, counts); unmeasured: orion doctor on a Mac settles it"
        ),
    )

    def __post_init__(self) -> None:
        def bad(field_name: str, value: Any, expected: str) -> SettingsError:
            return SettingsError(f"target {self.name!r}: {field_name}={value!r} is invalid; expected {expected}")

        if self.mil_version not in DIALECTS:
            raise bad("mil_version", self.mil_version, f"one of {sorted(DIALECTS)}")
        for name, allowed in (
            ("concat", CONCAT_MODES),
            ("blobs_per_file", BLOBS_PER_FILE),
            ("shared_scalar_slots", SHARED_SCALAR_SLOTS),
            ("weight_update", WEIGHT_UPDATES),
            ("multi_function", MULTI_FUNCTION),
            ("compressed_weight_slots", COMPRESSED_WEIGHT_SLOTS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, getattr(self, name), f"one of {', '.join(allowed)}")
        positive = ("max_axis", "max_conv_input_channels", "min_surface_bytes", "matmul_inner_multiple")
        for name in (*positive, "max_rank", "sram_budget_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, value, "a positive integer")
        for name in ("max_blob_constants", "io_row_align_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(name, value, "a positive integer or None")
        io_dtypes = tuple(self.io_dtypes)
        if not io_dtypes or any(d not in NUMPY_DTYPES for d in io_dtypes):
            raise bad("io_dtypes", self.io_dtypes, f"a non-empty tuple of {', '.join(NUMPY_DTYPES)}")
        object.__setattr__(self, "io_dtypes", io_dtypes)
        if not isinstance(self.numerics, dict) or any(not isinstance(k, str) for k in self.numerics):
            raise bad("numerics", self.numerics, "a dict with string keys")
        # The emulator reads N11 from `numerics`; keep the two spellings of the fact in step.
        numerics = dict(self.numerics)
        numerics.setdefault("slice_offset_overflow", self.slice_offset_overflow)
        if numerics["slice_offset_overflow"] != self.slice_offset_overflow:
            raise bad(
                "numerics['slice_offset_overflow']",
                numerics["slice_offset_overflow"],
                f"the value of slice_offset_overflow ({self.slice_offset_overflow})",
            )
        object.__setattr__(self, "numerics", numerics)

    def with_overrides(self, **overrides: Any) -> Target:
        """A copy with some fields changed, e.g. after a probe settled one (unknown names are an error)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise SettingsError(f"unknown target field(s) {', '.join(unknown)}; known fields: {', '.join(names)}")
        if "slice_offset_overflow" in overrides and "numerics" not in overrides:
            numerics = {k: v for k, v in self.numerics.items() if k != "slice_offset_overflow"}
            overrides["numerics"] = numerics
        return dataclasses.replace(self, **overrides)

    def describe(self) -> list[tuple[str, str, str]]:
        """Rows ``(field, value, note)`` for printing, in field order."""
        rows = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = "none (no limit)" if f.name != "io_row_align_bytes" else "none (no check)"
            elif isinstance(value, tuple):
                text = ", ".join(value)
            elif isinstance(value, dict):
                text = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
            else:
                text = str(value)
            rows.append((f.name, text, f.metadata["note"]))
        return rows


# ---------------------------------------------------------------------------------------------------------------------
# Profiles. Sources are named as in the team's ANE reference notes ("ref. section N"); "conservative" marks a value
# chosen because nothing was reported for that chip.

DEFAULT = Target(
    name="default",
    mil_version="1.3",  # the dialect the reference shows (M3/M4/M5); the m1/m2 profiles switch to "1.0"
    concat="forbid",  # CONFLICT #1: separate outputs work on every chip
    gelu_native=False,  # CONFLICT #10: the tanh form compiles everywhere (Orion)
    silu_native=False,  # CONFLICT (section 3): x*sigmoid(x) compiles everywhere
    rsqrt_native=False,  # later reports (Orion-fork, M1 Pro and M4 Pro): rsqrt fails, pow works
    max_axis=16384,  # older chips' limit (ref. section 5)
    max_conv_input_channels=16384,  # below the 32,000 Orion #16 saw rejected; within every chip's axis limit
    max_blob_constants=16,  # later Orion report; Orion-fork on M1 Pro and M4 Pro (scalar operands count)
    shared_scalar_slots="one",  # unmeasured: the fork counts scalars, not their uses
    blobs_per_file="one",  # M1 rejects several blobs per file (ref. section 4)
    min_surface_bytes=49152,  # Orion #4: [768, 16] fp32 works
    slice_offset_overflow=True,  # N11 on M1/M2
    matmul_inner_multiple=32,  # one report: zeros otherwise (a warning)
    max_rank=5,  # ref. section 5
    io_dtypes=("fp16",),  # ref. section 5: int32 and bf16 are rejected; Orion-fork: M1 rejects fp32 too
    io_row_align_bytes=64,  # ref. section 5: packed reads vs 64-byte rows agree at multiples of 64
    weight_update="recompile",  # CONFLICT (section 2): the only path known correct on every chip
    sram_budget_bytes=32 * MiB,  # maderix: ~32 MB
)

M1 = DEFAULT.with_overrides(
    name="m1",
    mil_version="1.0",  # ref. section 3: M1/M2 need program(1.0)/ios16
    max_axis=16384,  # ref. section 5 (older chips); ANEForge: 16384 through the A15 family
    blobs_per_file="one",  # ref. section 4: M1 rejects several blobs in one file
    slice_offset_overflow=True,  # N11: measured on M1/M2
    io_dtypes=("fp16",),  # Orion-fork (M1 Pro, 2026-09-06): fp32 inputs and outputs are rejected
)

M2 = DEFAULT.with_overrides(
    name="m2",
    mil_version="1.0",  # ref. section 3
    max_axis=16384,  # ref. section 5; ANEForge: 16384 through the A15 family (M2)
    blobs_per_file="many",  # only M1 is reported to reject several blobs per file (ref. section 4)
    slice_offset_overflow=True,  # N11: measured on M1/M2
    io_dtypes=("fp16",),  # M2 shares M1's generation and dialect; fp32 I/O unmeasured -> as M1
)

M3 = DEFAULT.with_overrides(
    name="m3",
    mil_version="1.3",  # ref. section 3: program(1.3)/ios18 works on M3/M4/M5
    max_axis=65536,  # ref. section 5 (newer chips); ANEForge: 65536 from the A16 family on
    blobs_per_file="many",  # ref. section 4 (only M1 rejects)
    slice_offset_overflow=True,  # N11: M3 unmeasured -> conservative
)

M4 = DEFAULT.with_overrides(
    name="m4",
    mil_version="1.3",  # ref. section 3; Orion and maderix emit program(1.3) on M4
    concat="interleave",  # CONFLICT #1: maderix's training kernels (M4) compile concat with interleave; Orion's
    # form without it failed on M4 Max
    max_axis=65536,  # ref. section 5 (newer chips)
    blobs_per_file="many",  # Orion and maderix write one file per weight; only M1 is reported to reject several
    slice_offset_overflow=False,  # N11: exact on M4 and later
    io_dtypes=("fp16", "fp32"),  # ref. section 5: Orion's [768, 16] fp32 surfaces work on M4 Max
)

M5 = DEFAULT.with_overrides(
    name="m5",
    mil_version="1.3",  # ref. section 3
    max_axis=65536,  # ref. section 5 (newer chips)
    blobs_per_file="many",  # ref. section 4 (only M1 rejects)
    slice_offset_overflow=False,  # N11: exact on M4 and later
    weight_update="recompile",  # maderix: unload/rewrite/load gives stale outputs on M5 (macOS 26.3)
)

TARGETS: dict[str, Target] = {t.name: t for t in (DEFAULT, M1, M2, M3, M4, M5)}


def get_target(name: str | Target) -> Target:
    """The profile called ``name`` (case-insensitive), or a profile file (``*.json``) that ``orion doctor
    --write-profile`` wrote: ``{"base": "default", "overrides": {...}}``; a :class:`Target` is returned as is."""
    if isinstance(name, Target):
        return name
    if name.lower().endswith(".json"):
        return load_profile(Path(name))
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise SettingsError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}, "
                            "or a profile .json from `orion doctor --write-profile`") from None


def read_profile(path: Path) -> tuple[str, dict]:
    """A profile file's named base and its overrides, as written (``orion doctor --write-profile`` extends them)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"target profile {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"target profile {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("overrides", {}), dict):
        raise SettingsError(f"target profile {path} must be an object with 'base' and 'overrides'")
    base = str(data.get("base", "default"))
    if base.lower().endswith(".json"):
        raise SettingsError(f"target profile {path}: its base must be a named profile")
    return base, dict(data.get("overrides", {}))


def load_profile(path: Path) -> Target:
    """A target from a profile file: a named base profile with the probed values as overrides."""
    base_name, overrides = read_profile(path)
    base = get_target(base_name)
    numerics = {**base.numerics, **overrides.pop("numerics", {})}
    if "slice_offset_overflow" in overrides:  # the field speaks for itself; the base's numerics twin must not
        numerics.pop("slice_offset_overflow", None)
    if "io_dtypes" in overrides:
        overrides["io_dtypes"] = tuple(overrides["io_dtypes"])
    return base.with_overrides(name=path.stem, numerics=numerics, **overrides)


__all__ = ["Target", "TARGETS", "get_target", "read_profile", "CONCAT_MODES", "BLOBS_PER_FILE", "SHARED_SCALAR_SLOTS",
           "WEIGHT_UPDATES", "MULTI_FUNCTION"]
