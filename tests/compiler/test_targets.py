"""Target profiles: lookup, overrides, and that the profiles say what the ANE reference says about each chip."""

from __future__ import annotations

import dataclasses

import pytest

from orion.compiler.targets import TARGETS, Target, get_target
from orion.errors import OrionError, SettingsError

CHIPS = ("m1", "m2", "m3", "m4", "m5")


def test_profiles_are_named_and_complete():
    assert set(TARGETS) == {"default", *CHIPS}
    for name, target in TARGETS.items():
        assert target.name == name
        assert get_target(name) is target
        assert get_target(name.upper()) is target


def test_a_target_is_its_own_target():
    custom = get_target("m1").with_overrides(min_surface_bytes=4096)  # a target that no name reaches
    assert get_target(custom) is custom


def test_unknown_target_lists_the_known_names():
    with pytest.raises(OrionError) as err:
        get_target("m9")
    message = str(err.value)
    assert "'m9'" in message
    for name in TARGETS:
        assert name in message


def test_targets_are_frozen_and_hashable():
    m1 = get_target("m1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m1.concat = "allow"  # type: ignore[misc]
    assert {m1: 1}[get_target("m1")] == 1


def test_with_overrides_returns_a_changed_copy():
    m4 = get_target("m4")
    changed = m4.with_overrides(min_surface_bytes=4096, gelu_native=True)
    assert (changed.min_surface_bytes, changed.gelu_native) == (4096, True)
    assert (m4.min_surface_bytes, m4.gelu_native) == (49152, False)
    assert changed.concat == m4.concat and changed.name == "m4"


def test_with_overrides_rejects_unknown_fields_by_name():
    with pytest.raises(OrionError) as err:
        get_target("default").with_overrides(max_axes=1)
    assert "max_axes" in str(err.value) and "max_axis" in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("concat", "sometimes"),
        ("mil_version", "2.0"),
        ("blobs_per_file", "two"),
        ("weight_update", "hope"),
        ("max_axis", 0),
        ("max_blob_constants", -1),
        ("io_dtypes", ("fp16", "float8")),
        ("min_surface_bytes", True),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(OrionError) as err:
        get_target("default").with_overrides(**{field: value})
    assert field in str(err.value)


def test_optional_limits_accept_none():
    t = get_target("default").with_overrides(max_blob_constants=None, io_row_align_bytes=None)
    assert t.max_blob_constants is None and t.io_row_align_bytes is None


def test_numerics_is_a_plain_dict_that_follows_slice_offset_overflow():
    for target in TARGETS.values():
        assert type(target.numerics) is dict
        assert all(isinstance(k, str) for k in target.numerics)
        assert target.numerics["slice_offset_overflow"] is target.slice_offset_overflow
    flipped = get_target("m1").with_overrides(slice_offset_overflow=False)
    assert flipped.numerics["slice_offset_overflow"] is False
    extra = get_target("m4").with_overrides(numerics={"accumulator": "fp32"})
    assert extra.numerics == {"accumulator": "fp32", "slice_offset_overflow": False}
    with pytest.raises(OrionError):
        get_target("m1").with_overrides(numerics={"slice_offset_overflow": False})


def test_describe_has_one_row_per_field_with_a_note():
    rows = get_target("m2").describe()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(Target)]
    for field, value, note in rows:
        assert isinstance(value, str) and value
        assert isinstance(note, str) and len(note) > 10
    values = {r[0]: r[1] for r in rows}
    assert values["mil_version"] == "1.0" and values["io_dtypes"] == "fp16"
    assert dict((r[0], r[1]) for r in get_target("m4").describe())["io_dtypes"] == "fp16, fp32"
    assert dict((r[0], r[1]) for r in get_target("default").with_overrides(max_blob_constants=None).describe())[
        "max_blob_constants"
    ].startswith("none")


# --- what the reference says -------------------------------------------------------------------------------------


def test_default_takes_the_side_known_to_work_everywhere():
    d = get_target("default")
    # CONFLICT items: separate outputs, decomposed activations, full recompile are what is known to work.
    assert d.concat == "forbid"
    assert d.gelu_native is False and d.silu_native is False and d.rsqrt_native is False
    assert d.weight_update == "recompile"
    # Chip-dependent items: the most restrictive value of any chip.
    chips = [get_target(c) for c in CHIPS]
    assert d.mil_version == "1.3"  # the dialect the reference shows; m1/m2 profiles use "1.0"
    assert d.blobs_per_file == "one"
    assert d.slice_offset_overflow is True
    for field in ("max_axis", "max_conv_input_channels", "max_blob_constants", "max_rank"):
        assert getattr(d, field) <= min(getattr(c, field) for c in chips), field
    assert d.min_surface_bytes >= max(c.min_surface_bytes for c in chips)
    assert set(d.io_dtypes) <= set.intersection(*(set(c.io_dtypes) for c in chips))


def test_reported_values():
    d = get_target("default")
    assert d.min_surface_bytes == 49152  # [768, 16] fp32 works (Orion #4)
    assert d.max_blob_constants == 16
    assert d.matmul_inner_multiple == 32
    assert d.max_rank == 5
    assert d.io_dtypes == ("fp16",)  # M1 rejects fp32 I/O (Orion-fork, 2026-09-06)
    assert d.rsqrt_native is False  # rsqrt fails on M1 Pro and M4 Pro (Orion-fork)
    assert d.sram_budget_bytes == 32 * 1024 * 1024
    # Orion #16: a 32,000-input-channel conv was rejected, so no profile may allow it.
    assert all(t.max_conv_input_channels < 32000 for t in TARGETS.values())


def test_profiles_differ_where_chips_differ():
    t = {c: get_target(c) for c in CHIPS}
    # MIL dialect: program(1.0) on M1/M2, program(1.3) on M3-M5.
    assert [t[c].mil_version for c in CHIPS] == ["1.0", "1.0", "1.3", "1.3", "1.3"]
    # Only M1 is reported to reject several blobs per file.
    assert [t[c].blobs_per_file for c in CHIPS] == ["one", "many", "many", "many", "many"]
    # N11: the slice overflow is measured on M1/M2, absent on M4 and later.
    assert t["m1"].slice_offset_overflow and t["m2"].slice_offset_overflow
    assert not t["m4"].slice_offset_overflow and not t["m5"].slice_offset_overflow
    # Per-axis limit: 16384 on older chips, 65536 on newer.
    assert t["m1"].max_axis == t["m2"].max_axis == 16384
    assert t["m4"].max_axis == t["m5"].max_axis == 65536
    # CONFLICT #1: maderix's concat with interleave compiled on M4.
    assert t["m4"].concat == "interleave"
    # fp32 I/O: rejected on M1 (Orion-fork), used by Orion on M4; unreported chips take the conservative side.
    assert [t[c].io_dtypes for c in CHIPS] == [("fp16",), ("fp16",), ("fp16",), ("fp16", "fp32"), ("fp16",)]
    # rsqrt and the 16-weight-tensor limit: reported on M1 Pro and M4 Pro, assumed on every chip.
    assert all(not t[c].rsqrt_native and t[c].max_blob_constants == 16 for c in CHIPS)


def test_a_profile_file_from_doctor_is_a_target(tmp_path):
    import json

    path = tmp_path / "my-m4.json"
    path.write_text(json.dumps({"base": "m4", "overrides": {"concat": "allow", "numerics": {"accumulator": "fp32"}},
                                "source": "orion doctor"}))
    target = get_target(str(path))
    assert target.name == "my-m4" and target.concat == "allow" and target.numerics["accumulator"] == "fp32"
    assert target.mil_version == get_target("m4").mil_version
    path.write_text(json.dumps({"base": "m4", "overrides": {"no_such_field": 1}}))
    with pytest.raises(SettingsError, match="no_such_field"):
        get_target(str(path))
    path.write_text("{not json")
    with pytest.raises(SettingsError, match="not readable JSON"):
        get_target(str(path))
    with pytest.raises(SettingsError, match="not found"):
        get_target(str(tmp_path / "absent.json"))


def test_a_profile_that_settles_the_slice_rule_loads_on_a_base_that_differs(tmp_path):
    """An M4 probed on the default base: the field and the emulator's numerics twin both follow the probe."""
    import json

    from orion.runtime.backends.numerics import Numerics

    path = tmp_path / "probed.json"
    path.write_text(json.dumps({"base": "default", "overrides": {"slice_offset_overflow": False}}))
    target = get_target(str(path))
    assert target.slice_offset_overflow is False
    assert Numerics.from_dict(target.numerics).slice_offset_overflow is False
