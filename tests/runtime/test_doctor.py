"""``orion doctor`` on the emulator: every probe runs in a child process and gives the verdict the emulator's
defaults imply (checked against hand reasoning and against the default target and numerics settings), crashes and
hangs of a child become verdicts, and the report, the profile overrides and the profile file behave."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import time

import numpy as np
import pytest
from rich.console import Console

from orion.compiler.targets import get_target
from orion.errors import BackendError, SettingsError
from orion.runtime.backends.numerics import Numerics
from orion.runtime.doctor import (
    NO_ANE_MESSAGE,
    PROBES,
    Probe,
    activation_errors,
    all_finite_fp16,
    compare,
    jsonable,
    print_report,
    profile_overrides,
    register,
    run_doctor,
    run_probe_in_child,
    write_profile,
    write_report,
)
from orion.runtime.doctor import registry
from orion.runtime.doctor import report as doctor_report

# -- hidden probes that exist only here (the child imports this module to find them) ----------------------------------


def _segfault(backend):
    os.kill(os.getpid(), signal.SIGSEGV)


def _exit139(backend):
    os._exit(139)


def _hang(backend):
    time.sleep(120)


def _raise(backend):
    raise ValueError("probe bug on purpose")


#: An NSError description as the framework might word it: several lines, longer than any display cut.
NSERROR_TEXT = ("InvalidMILProgram: the program could not be compiled.\n  in function main: operation 'y' (mul)\n"
                + "    detail: " + "tensor type mismatch; " * 150)


def _nserror(backend):
    """fp32-io on a backend whose every compile fails as the ANE bridge reports a framework NSError."""
    from pathlib import Path

    from orion.runtime.backends.ane import NSErrorInfo, call_failure

    real = backend.new_model

    def new_model(mil_text, weight_files):
        model = real(mil_text, weight_files)

        def compile():
            raise call_failure("compile", "0123abcd", Path("/private/var/folders/T/0123abcd"),
                               NSErrorInfo("com.apple.appleneuralengine", 3, NSERROR_TEXT))

        model.compile = compile
        return model

    backend.new_model = new_model
    return PROBES["fp32-io"].run(backend)


def _ok(obs):
    return "ok", {}


for _id, _run in (("test-segfault", _segfault), ("test-exit139", _exit139), ("test-hang", _hang),
                  ("test-raise", _raise), ("test-nserror", _nserror)):
    if _id not in PROBES:
        register(Probe(_id, ("test",), "a test-only probe", _run, _ok, hidden=True))


@pytest.fixture(scope="module")
def report():
    """Every public probe, each in its own child, on the emulator: the run the tests below read."""
    return run_doctor(backend="emulator", timeout=120)


def entry(report, probe_id):
    return next(e for e in report["probes"] if e["id"] == probe_id)


def observations(report, probe_id):
    e = entry(report, probe_id)
    assert e["emulator"]["status"] == "ok", e["emulator"]
    return e["emulator"]["observations"]


def values(report, probe_id, key):
    return [float(v) for v in observations(report, probe_id)["values"][key]]


# -- the report as a whole --------------------------------------------------------------------------------------------


def test_every_public_probe_ran_in_a_child_and_no_ane_is_claimed(report):
    assert [e["id"] for e in report["probes"]] == [p.id for p in PROBES.values() if not p.hidden]
    assert report["ane_present"] is False and report["backends"] == ["emulator"]
    assert report["message"] == NO_ANE_MESSAGE
    for e in report["probes"]:
        assert e["emulator"]["status"] == "ok", (e["id"], e["emulator"])
        assert e["ane"] is None and e["comparison"] is None
        assert e["verdict"] == e["emulator"]["verdict"] and e["value"] == e["emulator"]["value"]
        assert e["settles"] == list(PROBES[e["id"]].settles) and e["seconds"] > 0
        assert e["ran_on"] == ["emulator"] and e["emulator"]["reached"] is True
        assert e["emulator"]["machine"]["backend"] == "emulator"


def test_report_is_strict_json_and_round_trips(report):
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    for key in ("orion_version", "platform", "chip", "os_build", "ane_present", "backends", "probes", "target"):
        assert key in report
    for e in report["probes"]:
        for key in ("id", "settles", "verdict", "value", "ane", "emulator", "comparison", "seconds", "ran_on"):
            assert key in e


def test_emulator_values_are_the_default_profile_where_the_target_decides(report):
    """Each value a probe decides on the emulator is the default target's field or the default numerics setting;
    the three exceptions are facts the emulator computes itself rather than assumes."""
    target, numerics = get_target("default"), Numerics()
    emulator_facts = {"matmul_inner_multiple": 1, "io_row_align_bytes": None}  # computes any K; reads packed
    seen = set()
    for e in report["probes"]:
        for key, value in e["value"].items():
            seen.add(key)
            if key.startswith("numerics."):
                assert value == getattr(numerics, key.split(".", 1)[1]), (e["id"], key, value)
            elif key in emulator_facts:
                assert value == emulator_facts[key], (e["id"], key, value)
            elif key == "weight_update":
                assert value == e["id"].rsplit("-", 1)[1]  # both strategies give fresh outputs on the emulator
            else:  # a tuple field travels as a JSON list
                assert value == jsonable(getattr(target, key)), (e["id"], key, value)
    # every open numerics setting and every contested target field is decided by some probe
    # (the numerics twin of slice_offset_overflow follows its target field, decided by slice-offset-overflow;
    # activation_quirks needs gelu or silu, which the default target says the ANE rejects)
    assert {f"numerics.{f.name}" for f in dataclasses.fields(Numerics)
            if f.name not in ("slice_offset_overflow", "activation_quirks")} <= seen
    assert {"concat", "gelu_native", "silu_native", "rsqrt_native", "weight_update", "max_blob_constants",
            "shared_scalar_slots", "io_dtypes", "min_surface_bytes", "max_conv_input_channels", "slice_offset_overflow", "mil_version",
            "compressed_weight_slots"} <= seen


# -- hand-reasoned verdicts -------------------------------------------------------------------------------------------


def test_unequal_surfaces_are_refused_with_status_0x1d(report):
    obs = observations(report, "unequal-surfaces")
    assert obs["cases"]["equal"]["correct"] is True
    for case in ("inputs-unequal", "outputs-unequal"):
        assert obs["cases"][case]["evaluated"] is False and obs["cases"][case]["status"] == 0x1D
    assert entry(report, "unequal-surfaces")["verdict"] == "refused (status 0x1d)"


def test_binding_is_alphabetical(report):
    assert observations(report, "binding-order-inputs")["order"] == ["alpha", "mid", "zeta"]
    assert observations(report, "binding-order-outputs")["order"] == ["alpha", "mid", "zeta"]
    assert entry(report, "binding-order-inputs")["verdict"] == "alphabetical"
    assert entry(report, "binding-order-outputs")["verdict"] == "alphabetical"


def test_small_products_lose_what_a_2_to_16_grid_rounds_away(report):
    # products 2^-18 and 2^-17 are a quarter and a half grid step: rounded half-even to 0; 2^-16 is one step
    assert values(report, "numerics-small-products", "sums") == [0.0, 0.0, 64 * 2.0 ** -16]
    assert entry(report, "numerics-small-products")["value"] == {
        "numerics.accumulator": "fixed-point", "numerics.accumulator_grid": 2.0 ** -16}


def test_ties_half_even_for_add_half_away_for_reductions(report):
    # 2049 and -2049 lie between 2048 and 2050; 2051 between 2050 and 2052 (2052 is even and away from zero)
    assert values(report, "numerics-ties", "added") == [2048.0, 2052.0, -2048.0]
    assert values(report, "numerics-ties", "reduced") == [2050.0, 2052.0, -2050.0]
    assert values(report, "numerics-ties", "multiplied") == [2050.0, 2052.0, -2050.0]
    assert values(report, "numerics-ties", "rounded") == [1.0, 2.0, 3.0, -1.0, -3.0]  # round: away (ANEForge)


def test_ceiling_hits_matmul_at_32768_but_not_reduce_sum_or_add(report):
    sums = (16384, 32752, 32760, 32767, 32768, 60000)
    # 32752 is the largest fp16 below 32768; 32760 is a tie that rounds up to 32768 and so to inf
    assert values(report, "numerics-ceiling", "matmul") == [16384.0, 32752.0] + [math.inf] * 4
    assert values(report, "numerics-ceiling", "reduce_sum") == [float(np.float16(s)) for s in sums[:2]] + [
        32768.0, 32768.0, 32768.0, 60000.0]
    assert values(report, "numerics-ceiling", "add_doubles") == [32768.0, 60000.0, math.inf, math.inf]


def test_reduce_sum_is_wide_and_reduce_mean_of_ones_is_one(report):
    assert values(report, "numerics-reduce-sum", "reduce_sum") == [1.0, 1.0, 1.0, 65504.0, 4096.0]
    assert values(report, "numerics-reduce-sum", "matmul") == [1.0, 1.0, 1.0, math.inf, 4096.0]
    assert values(report, "numerics-reduce-mean", "means")[:2] == [1.0, 2.0]


def test_boundary_casts_and_nan_rules(report, tmp_path):
    from orion.runtime.doctor.numerics_probes import BOUNDARY_UNMEASURABLE

    assert entry(report, "numerics-boundary-casts")["verdict"] == BOUNDARY_UNMEASURABLE  # the default: no fp32 I/O
    casts = [float(v) for v in PROBES["numerics-boundary-casts"].run(emulator(tmp_path, "m4"))["values"]["fp16"]]
    assert casts[:6] == [math.inf, -math.inf, 65504.0, math.inf, 65504.0, math.inf]
    assert casts[6] == 2.0 ** -23 and casts[7] == 0.0  # 1e-7 rounds to 2 subnormal steps, 1e-8 to none
    nan = observations(report, "numerics-nan")
    assert nan["any_nan"] is False and nan["negative_zero"] == []
    assert {k: float(v) for k, v in nan["values"].items() if k != "log(0)"} == {
        "inf - inf": 0.0, "0 * inf": 0.0, "sqrt(-1)": 0.0, "log(-1)": 0.0, "-1 * 0": 0.0, "NaN input * 1": math.inf,
        "-0 - 0": 0.0}


def test_activation_sweep_skips_what_the_target_says_the_ane_rejects(report):
    acts = observations(report, "numerics-activations")["activations"]
    for op, catalog in (("gelu", "ANE-10"), ("silu", "ANE-27"), ("rsqrt", "ANE-22")):  # the default target's view
        assert acts[op]["assumed"] is True and catalog in acts[op]["error"] and "special" not in acts[op], op
    assert all("max_abs_error" in acts[op] for op in ("sigmoid", "tanh", "exp", "log", "sqrt"))  # the others ran
    assert entry(report, "numerics-activations")["value"] == {}  # gelu(0) and silu(0) unmeasured: nothing settled


def test_multi_function_follows_the_target_and_runs_each_function_where_it_says_so(report, tmp_path):
    """The default target does not know (ANE-42): both functions are refused by assumption, nothing is settled
    beyond "unknown"; a profile that says "procedure-index" gets each function's own outputs from one text."""
    assert entry(report, "multi-function")["value"] == {"multi_function": "unknown"}
    for variant in observations(report, "multi-function")["variants"].values():
        assert variant["assumed"] is True and "ANE-42" in variant["error"]
    obs = PROBES["multi-function"].run(emulator(tmp_path, multi_function="procedure-index"))
    assert all(v["works"] for v in obs["variants"].values()) and set(obs["variants"]) == {"main", "decode"}
    assert PROBES["multi-function"].verdict(obs) == ("each function runs by the request's procedure index",
                                                     {"multi_function": "procedure-index"})



def test_compressed_weights_fit_one_slot_each_and_every_scheme_decodes_on_the_emulator(report):
    """The default target counts a compressed weight once: 16 int8 weights (32 stored parts) compile; int8, per-block
    int4 and lut4 weights each give the product of the fp16 weights they store, to fp16 rounding."""
    obs = observations(report, "compressed-weights")
    assert entry(report, "compressed-weights")["value"] == {"compressed_weight_slots": "one"}
    assert all(chain["compiled"] and chain["evaluated"] for chain in obs["chains"].values())
    assert set(obs["schemes"]) == {"int8", "int4/32", "lut4"}
    for scheme, result in obs["schemes"].items():
        assert result["works"] and 0 < result["max_rel_error"] < 0.005, (scheme, result)


def test_compressed_weights_verdict_names_a_wrong_decode_and_settles_nothing_when_nothing_compiles():
    chains = {"16": {"compiled": True}, "8": {"compiled": True}}
    schemes = {"int8": {"evaluated": True, "works": True}, "int4/32": {"evaluated": True, "works": False},
               "lut4": {"evaluated": False, "works": False}}
    verdict, value = PROBES["compressed-weights"].verdict({"chains": chains, "schemes": schemes})
    assert value == {"compressed_weight_slots": "one"}
    assert verdict.endswith("decoded right: ['int8']; wrong: ['int4/32']; did not run: ['lut4']")
    refused = {"compiled": False}
    verdict, value = PROBES["compressed-weights"].verdict({"chains": {"16": refused, "8": refused},
                                                            "schemes": schemes})
    assert value == {} and verdict.startswith("no program of int8 weights compiles")

#: A target whose ANE compiles gelu, silu and rsqrt, so the activation probe measures them all on the emulator.
NATIVE_ACTIVATIONS = {"gelu_native": True, "silu_native": True, "rsqrt_native": True}


def test_activation_sweep_is_correctly_rounded_on_the_emulator(tmp_path):
    obs = PROBES["numerics-activations"].run(emulator(tmp_path, **NATIVE_ACTIVATIONS))
    acts = obs["activations"]
    assert set(acts) == {"sigmoid", "tanh", "gelu", "silu", "exp", "log", "sqrt", "rsqrt"}
    for op in ("tanh", "exp", "log", "sqrt", "rsqrt"):  # float32 then one rounding: half an ulp (+ double rounding)
        assert acts[op]["max_error_ulps"] <= 0.5001, (op, acts[op])
    assert acts["gelu"]["special"]["gelu(0)"] == 0.0 and acts["silu"]["special"]["silu(0)"] == 0.0
    assert acts["exp"]["inf_from"] == float(np.float16(11.09375))  # exp(11.09375) > 65520 > exp(11.0859375)
    assert PROBES["numerics-activations"].verdict(obs)[1] == {"numerics.activation_quirks": False}


def test_compile_time_conflicts_follow_the_default_target(report):
    assert entry(report, "concat-interleave")["value"] == {"concat": "forbid"}
    for variant in observations(report, "concat-interleave")["variants"].values():
        assert variant["assumed"] is True and "ANE-01" in variant["error"]
    blobs = observations(report, "blob-constant-limit")["variants"]
    assert blobs["17"]["assumed"] is True and blobs["17+s"]["assumed"] is True  # 16 blobs and a scalar: 17 tensors
    assert blobs["16"]["works"] is True and blobs["16+s"]["works"] is True
    assert blobs["16+shared"]["works"] is True and set(blobs) == {f"{n}{s}" for n in (8, 16, 17, 64)
                                                                    for s in ("", "+s")} | {"16+shared"}
    assert entry(report, "blob-constant-limit")["value"] == {"max_blob_constants": 16, "shared_scalar_slots": "one"}
    assert entry(report, "min-surface")["value"] == {"min_surface_bytes": 49152}
    assert entry(report, "fp32-io")["verdict"] == "fp16 only: fp32-input fails (compile), fp32-output fails (compile)"
    assert entry(report, "fp32-io")["value"] == {"io_dtypes": ["fp16"]}
    assert observations(report, "min-surface")["small_tensor_on_49152_byte_surfaces"]["correct"] is True
    assert entry(report, "weight-update-reload")["verdict"] == "fresh"
    assert entry(report, "weight-update-patch")["verdict"] == "fresh"


def test_profile_overrides_are_empty_without_an_ane(report):
    assert profile_overrides(report) == {}


# -- children that crash, hang or fail --------------------------------------------------------------------------------


def test_a_segfaulting_probe_is_a_crashed_verdict_and_the_parent_survives(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the parent makes the child's scratch directory
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # and where a child left to itself would make its own
    result = run_probe_in_child(PROBES["test-segfault"], "emulator", timeout=60)
    assert result["status"] == "crashed" and result["signal"] == "SIGSEGV"
    assert list(tmp_path.iterdir()) == []  # the dead child's scratch is gone all the same
    rep = run_doctor(backend="emulator", probes=["test-exit139"], timeout=60)
    e = rep["probes"][0]
    assert e["verdict"] == "crashed (139)" and e["emulator"]["returncode"] == 139 and e["value"] == {}
    assert e["ran_on"] == ["emulator"] and rep["backends"] == ["emulator"]  # it died on the backend: a finding there


def test_a_hanging_probe_times_out_and_did_not_run():
    """The timeout covers the child's start-up too: 8 s leaves a loaded machine time to reach the backend."""
    t0 = time.perf_counter()
    rep = run_doctor(backend="emulator", probes=["test-hang"], timeout=8)
    result = rep["probes"][0]["emulator"]
    assert result["status"] == "timeout" and "within 8 s" in result["error"]
    assert time.perf_counter() - t0 < 30
    assert result["reached"] is True  # it hung on the backend, and answered nothing
    assert rep["probes"][0]["ran_on"] == [] and rep["backends"] == []
    assert rep["message"] == doctor_report.NOTHING_RAN_MESSAGE


def test_an_exception_in_a_probe_is_an_error_verdict_with_its_text():
    rep = run_doctor(backend="emulator", probes=["test-raise"], timeout=60)
    e = rep["probes"][0]
    assert e["verdict"] == "error" and "probe bug on purpose" in e["emulator"]["error"]


def test_a_framework_error_reaches_the_json_report_verbatim(tmp_path):
    """The NSError text travels from the bridge's exception through the child and the report to the JSON file
    unchanged: line breaks, length and all; only the printed table shortens it."""
    rep = run_doctor(backend="emulator", probes=["test-nserror"], timeout=60)
    write_report(rep, tmp_path / "report.json")
    variants = json.loads((tmp_path / "report.json").read_text())["probes"][0]["emulator"]["observations"]["variants"]
    control = variants["fp16-control"]  # the fp32 forms the default target refuses before any compile
    assert control["stage"] == "compile" and NSERROR_TEXT in control["error"] and len(control["error"]) > 3000
    assert "(com.apple.appleneuralengine code 3)" in control["error"]
    text = "BackendError: " + "x" * 30000  # past 20,000 characters a report says how much it left out
    assert registry._error(BackendError("x" * 30000)) == text[:20000] + " ... [10014 more characters]"


def test_bad_arguments_are_user_errors():
    with pytest.raises(SettingsError, match="unknown probe"):
        run_doctor(backend="emulator", probes=["no-such-probe"])
    with pytest.raises(SettingsError, match="backend"):
        run_doctor(backend="gpu")
    with pytest.raises(BackendError, match="backend 'ane': .*(no Apple Neural Engine|cannot be used)"):
        run_doctor(backend="ane", probes=["silu"])


def test_orion_backend_decides_what_auto_means(monkeypatch):
    monkeypatch.setenv("ORION_BACKEND", "ane")
    with pytest.raises(BackendError, match="ORION_BACKEND='ane': .*(no Apple Neural Engine|cannot be used)"):
        run_doctor(probes=["silu"])
    monkeypatch.setenv("ORION_BACKEND", "gpu")
    with pytest.raises(SettingsError, match="ORION_BACKEND='gpu'"):
        run_doctor(probes=["silu"])
    monkeypatch.setenv("ORION_BACKEND", "emulator")  # with an ANE present, auto would have run both
    monkeypatch.setattr(doctor_report, "ane_status", lambda: (True, "a stand-in ANE"))
    rep = run_doctor(probes=["silu"])
    assert rep["backends"] == ["emulator"] and rep["probes"][0]["ane"] is None
    assert rep["message"] == doctor_report.EMULATOR_ONLY_MESSAGE and rep["backend_asked"] == "ORION_BACKEND='emulator'"
    assert run_doctor(backend="emulator", probes=["silu"])["backend_asked"] == "backend 'emulator'"


def test_an_ane_child_that_fails_before_its_backend_did_not_run_there(monkeypatch):
    """Off a Mac the real ANE child cannot make its backend: the probe did not run on the ANE, whatever was asked."""
    monkeypatch.setattr(doctor_report, "ane_status", lambda: (True, "a stand-in ANE"))
    rep = run_doctor(probes=["silu"])
    e = rep["probes"][0]
    assert e["ane"]["status"] == "error" and e["ane"]["reached"] is False and "machine" not in e["ane"]
    assert e["ran_on"] == ["emulator"] and rep["backends"] == ["emulator"]
    assert rep["message"] == doctor_report.ANE_NOT_REACHED_MESSAGE and rep["chip"] is None
    with pytest.raises(SettingsError, match="Apple Neural Engine"):
        write_profile(rep, "never-written.json")
    console = Console(record=True, width=200)
    print_report(rep, console)
    assert first_line(console).endswith(", target default, backends emulator")


# -- profiles ---------------------------------------------------------------------------------------------------------


def ane_report(report, changes: dict[str, dict]):
    """The emulator report as if an ANE had answered, with the ANE's values replaced per probe id."""
    fake = json.loads(json.dumps(report))
    fake["backends"] = ["ane", "emulator"]
    fake["chip"], fake["os_build"] = "Apple M4 Max", "25A354"
    for e in fake["probes"]:
        e["ane"] = dict(e["emulator"], value=changes.get(e["id"], e["emulator"]["value"]))
        e["ran_on"] = ["ane", "emulator"]
    return fake


def test_profile_overrides_map_ane_values_to_target_fields_and_numerics(report):
    fake = ane_report(report, {"concat-interleave": {"concat": "interleave"},
                               "numerics-reduce-sum": {"numerics.reduce_sum_fp16": True},
                               "fp32-io": {"io_dtypes": ["fp16", "fp32"]},
                               "weight-update-patch": {}})  # patch stale, reload fresh
    overrides = profile_overrides(fake)
    assert overrides["concat"] == "interleave" and overrides["weight_update"] == "reload"
    assert overrides["numerics"]["reduce_sum_fp16"] is True
    assert overrides["numerics"]["accumulator_grid"] == 2.0 ** -16
    fields = {k: v for k, v in overrides.items() if k != "numerics"}
    target = get_target("default").with_overrides(**fields, numerics=overrides["numerics"])  # a valid profile
    assert target.concat == "interleave" and Numerics.from_dict(target.numerics).reduce_sum_fp16 is True
    assert target.io_dtypes == ("fp16", "fp32")
    both_stale = ane_report(report, {"weight-update-patch": {}, "weight-update-reload": {}})
    assert profile_overrides(both_stale)["weight_update"] == "recompile"
    crashed = ane_report(report, {})
    for e in crashed["probes"]:
        e["ane"]["status"] = "crashed"
    assert profile_overrides(crashed) == {}


def test_write_profile_writes_the_overrides_atomically(report, tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="Apple Neural Engine"):
        write_profile(report, tmp_path / "p.json")
    fake = ane_report(report, {"concat-interleave": {"concat": "interleave"}})
    path = tmp_path / "profiles" / "m4.json"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    write_profile(fake, path)
    data = json.loads(path.read_text())
    assert data == {"base": "default", "overrides": profile_overrides(fake), "source": "orion doctor",
                    "chip": "Apple M4 Max", "os_build": "25A354"}
    assert synced  # the data reached the disk before the rename
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_profile(ane_report(report, {"concat-interleave": {"concat": "allow"}}), path)
    assert path.read_bytes() == before  # the old profile is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["m4.json"]  # no temp file left behind


def test_write_profile_under_a_profile_file_extends_that_file(report, tmp_path):
    """Probing with ``--target earlier.json`` writes a profile on the file's named base, keeping the file's overrides
    the new probes did not settle (a file's stem is no base: loading such a profile would fail)."""
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"base": "m4", "overrides": {"concat": "allow", "max_blob_constants": 12,
                                                                "numerics": {"reduce_sum_fp16": True}}}))
    fake = ane_report(report, {"concat-interleave": {"concat": "interleave"}})
    fake["target"] = str(earlier)
    fake["probes"] = [e for e in fake["probes"] if e["id"] != "numerics-reduce-sum"]  # not probed this time
    path = write_profile(fake, tmp_path / "later.json")
    data = json.loads(path.read_text())
    assert data["base"] == "m4"
    assert data["overrides"]["concat"] == "interleave"  # the new probe wins
    assert data["overrides"]["numerics"]["reduce_sum_fp16"] is True  # kept where no new probe spoke
    later = get_target(str(path))
    assert later.concat == "interleave" and later.mil_version == get_target("m4").mil_version


def first_line(console) -> str:
    """The report's first printed line (before the table's title), unwrapped."""
    return " ".join(console.export_text(clear=False).split("ANE probes")[0].split())


def test_print_report_shows_every_probe_and_says_no_ane(report):
    console = Console(record=True, width=200)
    print_report(report, console)
    assert first_line(console).endswith(", target default, backends emulator")
    text = console.export_text()
    assert f"No Apple Neural Engine here: the probes ran on the emulator, which shows what Orion assumes, not what " \
           f"your chip does. ({report['ane_note']})" in " ".join(text.split())
    for e in report["probes"]:
        assert e["id"] in text


# -- helpers with independent oracles ---------------------------------------------------------------------------------


def test_all_finite_fp16_lists_each_finite_value_once():
    x = all_finite_fp16()
    bits = x.view(np.uint16).reshape(-1)
    assert x.shape == (1, 62, 1, 1024) and np.isfinite(x).all()
    assert len(set(bits.tolist())) == bits.size == 2 * 31 * 1024  # 31 finite exponents x 1024 mantissas x 2 signs


def test_activation_errors_measure_ulps_against_the_exact_function():
    x = all_finite_fp16()
    exact = np.tanh(x.astype(np.float64))
    rounded = exact.astype(np.float16)
    good = activation_errors(x, rounded, np.tanh)
    assert good["max_error_ulps"] <= 0.5 and good["compared"] == x.size
    off = rounded.copy().reshape(-1)
    i = int(np.argmin(np.abs(x.reshape(-1).astype(np.float64) - 0.5)))
    off[i] = np.nextafter(np.nextafter(off[i], np.float16(2)), np.float16(2))  # two fp16 steps up
    bad = activation_errors(x, off.reshape(x.shape), np.tanh)
    assert 1.5 <= bad["max_error_ulps"] <= 2.5 and bad["at_input"] == float(x.reshape(-1)[i])


# -- the probes can tell settings apart (run in-process: the child machinery is tested above) -------------------------


def emulator(tmp_path, target="default", numerics=None, **overrides):
    from orion.runtime.backends.emulator import EmulatorBackend

    t = get_target(target).with_overrides(**overrides) if overrides else get_target(target)
    return EmulatorBackend(t, numerics=numerics, root=tmp_path / "emu")


def decide(probe_id, backend):
    probe = PROBES[probe_id]
    return probe.verdict(probe.run(backend))


@pytest.mark.parametrize("probe_id, settings, expected", [
    ("numerics-small-products", {"accumulator": "fp32"}, {"numerics.accumulator": "fp32"}),
    ("numerics-small-products", {"accumulator_grid": 2.0 ** -17},
     {"numerics.accumulator": "fixed-point", "numerics.accumulator_grid": 2.0 ** -17}),
    ("numerics-ties", {"elementwise_ties": "half-away", "reduction_ties": "half-even", "round_ties": "half-even"},
     {"numerics.elementwise_ties": "half-away", "numerics.reduction_ties": "half-even",
      "numerics.round_ties": "half-even"}),
    ("numerics-ceiling", {"matmul_ceiling": 65520.0}, {"numerics.matmul_ceiling": 65520.0}),
    ("numerics-reduce-sum", {"reduce_sum_fp16": True}, {"numerics.reduce_sum_fp16": True}),
    ("numerics-subnormals", {"flush_subnormals_in_matmul": False}, {"numerics.flush_subnormals_in_matmul": False}),
    ("slice-offset-overflow", {"slice_offset_overflow": False}, {"slice_offset_overflow": False}),
])
def test_numerics_probes_read_back_each_emulator_setting(tmp_path, probe_id, settings, expected):
    assert decide(probe_id, emulator(tmp_path, numerics=Numerics(**settings)))[1] == expected


def test_activation_probe_reads_back_the_table_quirks(tmp_path):
    backend = emulator(tmp_path, numerics=Numerics(activation_quirks=True), **NATIVE_ACTIVATIONS)
    assert decide("numerics-activations", backend)[1] == {"numerics.activation_quirks": True}


@pytest.mark.parametrize("probe_id, overrides, expected", [
    ("concat-interleave", {"concat": "interleave"}, {"concat": "interleave"}),
    ("concat-interleave", {"concat": "allow"}, {"concat": "allow"}),
    ("gelu-mode", {"gelu_native": True}, {"gelu_native": True}),
    ("silu", {"silu_native": True}, {"silu_native": True}),
    ("rsqrt", {"rsqrt_native": True}, {"rsqrt_native": True}),
    ("blob-constant-limit", {"max_blob_constants": None}, {"max_blob_constants": 64}),
    ("blob-constant-limit", {"max_blob_constants": 17}, {"max_blob_constants": 17}),  # 17..63: sharing unsettled
    ("blob-constant-limit", {"shared_scalar_slots": "per-use"},
     {"max_blob_constants": 16, "shared_scalar_slots": "per-use"}),
    ("blobs-per-file", {"blobs_per_file": "many"}, {"blobs_per_file": "many"}),
    ("min-surface", {"min_surface_bytes": 3072}, {"min_surface_bytes": 3072}),
    ("mil-dialect", {"mil_version": "1.0"}, {"mil_version": "1.0"}),
    ("fp32-io", {"io_dtypes": ("fp16", "fp32")}, {"io_dtypes": ["fp16", "fp32"]}),
    ("fp32-io", {"io_dtypes": ("fp32",)}, {}),  # the fp16 control fails: nothing settled
    ("conv-32k-input-channels", {"max_conv_input_channels": 32000, "max_axis": 65536},
     {"max_conv_input_channels": 32000}),
    ("compressed-weights", {"compressed_weight_slots": "per-blob"}, {"compressed_weight_slots": "per-blob"}),
])
def test_compile_probes_read_back_each_target_field(tmp_path, probe_id, overrides, expected):
    assert decide(probe_id, emulator(tmp_path, **overrides))[1] == expected


def test_blob_limit_verdict_says_when_a_scalar_took_no_slot():
    """A chip that takes 16 blobs plus a scalar but not 17 blobs: the limit stays 16, and the verdict says so."""
    works = {"8": True, "8+s": True, "16": True, "16+s": True, "17": False, "17+s": True, "64": False,
             "64+s": False, "16+shared": True}
    verdict, value = PROBES["blob-constant-limit"].verdict({"variants": {k: {"works": v} for k, v in works.items()}})
    assert value == {"max_blob_constants": 16, "shared_scalar_slots": "one"}
    assert "16 weight tensors work, 17 fail (yet 16 blobs and a scalar work: a scalar took no slot)" in verdict
    works.update({"16+s": False})  # now the scalar costs a slot at 16: the ladder stops at 8, sharing unsettled
    verdict, value = PROBES["blob-constant-limit"].verdict({"variants": {k: {"works": v} for k, v in works.items()}})
    assert value == {"max_blob_constants": 8} and verdict.startswith("8 weight tensors work, 16 fail")


def test_probe_surfaces_are_the_runtimes_plan_for_the_target(tmp_path):
    """The probes allocate what the runtime would: the target's row alignment and minimum apply."""
    def surfaces(**overrides):
        variant = PROBES["mil-dialect"].run(emulator(tmp_path, **overrides))["variants"]["1.3"]
        assert variant["works"] is True
        return variant["surfaces"]

    assert surfaces() == {"inputs": [49152], "outputs": [49152]}  # [1, 768, 1, 32] fp16, exactly the minimum
    assert surfaces(min_surface_bytes=1024, io_row_align_bytes=32768) == {"inputs": [65536], "outputs": [65536]}


def test_concat_interleave_true_is_checked_against_interleaved_data(tmp_path):
    obs = PROBES["concat-interleave"].run(emulator(tmp_path, concat="allow"))
    assert obs["variants"]["interleave-true"]["layout"] == "interleaved"
    assert obs["variants"]["interleave-false"]["layout"] == "concatenated"


def test_weight_update_probe_sees_stale_weights(tmp_path):
    """A backend that rewrites weight files but loads the compiled snapshot: what maderix saw on M5 for reload."""
    from orion.runtime.backends.emulator import EmulatorBackend, EmulatorModel

    class StaleModel(EmulatorModel):
        def write_weights(self, weight_files):
            self._copy_weights(weight_files, self.directory)  # files change, the compiled copy does not

    class StaleBackend(EmulatorBackend):
        def new_model(self, mil_text, weight_files):
            return StaleModel(self, mil_text, weight_files)

    backend = StaleBackend(get_target("default"), root=tmp_path / "emu")
    assert decide("weight-update-reload", backend) == ("stale", {})
    assert decide("weight-update-patch", backend) == ("fresh", {"weight_update": "patch"})


def test_a_chip_that_refuses_fp32_io_at_compile(tmp_path):
    """As Orion-fork saw on M1: any program with an fp32 input or output fails to compile. fp32-io says fp16 only
    (at compile), and the boundary-cast probe says it cannot measure there instead of reporting a failure."""
    import re

    from orion.runtime.backends.emulator import EmulatorBackend, EmulatorModel
    from orion.runtime.doctor.numerics_probes import BOUNDARY_UNMEASURABLE

    class RefusingModel(EmulatorModel):
        def compile(self):
            raise BackendError("ANE compile of model 0123abcd failed: InvalidMILProgram (com.apple.appleneuralengine "
                               "code 3)")

    class Fp16OnlyBackend(EmulatorBackend):
        def new_model(self, mil_text, weight_files):
            fp32_io = re.search(r"main<\w+>\([^)]*fp32", mil_text) or re.search(r"tensor<fp32[^>]*> y = ", mil_text)
            return (RefusingModel if fp32_io else EmulatorModel)(self, mil_text, weight_files)

    backend = Fp16OnlyBackend(get_target("m4"), root=tmp_path / "emu")  # a profile that expects fp32 I/O to work
    assert decide("fp32-io", backend) == ("fp16 only: fp32-input fails (compile), fp32-output fails (compile)",
                                          {"io_dtypes": ["fp16"]})
    assert decide("numerics-boundary-casts", backend) == (BOUNDARY_UNMEASURABLE, {})
    assert decide("numerics-boundary-casts", emulator(tmp_path, "m4"))[0].startswith("as modelled")


def test_compare_reports_equal_values_and_the_largest_difference():
    def run(verdict, vals):
        return {"verdict": verdict, "value": {}, "observations": {"values": vals}}

    same = compare(run("a", {"x": [1.0, "inf"]}), run("a", {"x": [1.0, "inf"]}))
    assert same["outputs_equal"] is True and same["max_abs_diff"] == 0.0 and same["verdict_equal"] is True
    diff = compare(run("a", {"x": [1.0, 2.5], "y": [0.0]}), run("b", {"x": [1.0, 2.0], "y": [0.0]}))
    assert diff["differing"] == ["x"] and diff["max_abs_diff"] == 0.5 and diff["verdict_equal"] is False
    assert compare(run("a", {"x": ["inf"]}), run("a", {"x": [65504.0]}))["max_abs_diff"] == "inf"


def test_with_an_ane_both_backends_run_and_are_compared(monkeypatch, tmp_path):
    """A stand-in ANE (the emulator under the m4 profile, in children) drives the ANE path of run_doctor."""
    monkeypatch.setattr(doctor_report, "ane_status", lambda: (True, "a stand-in ANE"))
    real = run_probe_in_child
    calls = []

    def fake(probe, backend, *, target="default", timeout=60.0, mil_version=None):
        calls.append((probe.id, backend, mil_version))
        if backend == "ane":  # with the facts AneBackend.describe() gives
            result = real(probe, "emulator", target="m4", timeout=timeout, mil_version=mil_version)
            return dict(result, machine={**result["machine"], "backend": "ane", "chip": "Apple M4 Max",
                                         "macos": "15.1", "macos_build": "24B83"})
        return real(probe, backend, target=target, timeout=timeout, mil_version=mil_version)

    monkeypatch.setattr(doctor_report, "run_probe_in_child", fake)  # the name run_doctor calls
    rep = run_doctor(backend="auto", probes=["slice-offset-overflow", "concat-interleave", "mil-dialect"])
    assert rep["backends"] == ["ane", "emulator"] and rep["ane_present"] is True
    assert all(e["ran_on"] == ["ane", "emulator"] for e in rep["probes"])
    assert [c[0] for c in calls[:2]] == ["mil-dialect", "mil-dialect"]  # the dialect first ...
    assert {c[2] for c in calls[2:]} == {"1.3"}  # ... and every later child prints programs in it
    slice_entry = entry(rep, "slice-offset-overflow")
    assert slice_entry["value"] == {"slice_offset_overflow": False}  # the ANE decides
    assert slice_entry["emulator"]["value"] == {"slice_offset_overflow": True}
    assert slice_entry["comparison"]["verdict_equal"] is False
    assert slice_entry["comparison"]["differing"] == ["at_offset"] and slice_entry["comparison"]["max_abs_diff"] == "inf"
    assert entry(rep, "mil-dialect")["comparison"]["verdict_equal"] is True
    overrides = profile_overrides(rep)
    assert overrides == {"mil_version": "1.3", "concat": "interleave", "slice_offset_overflow": False}
    assert rep["chip"] == "Apple M4 Max" and rep["os_build"] == "24B83"  # the ANE child's, not this machine's
    path = write_profile(rep, tmp_path / "m4.json")
    assert json.loads(path.read_text())["chip"] == "Apple M4 Max"
    written = json.loads(path.read_text())["overrides"]
    assert get_target("default").with_overrides(**written).concat == "interleave"
    console = Console(record=True, width=200)
    print_report(rep, console)
    assert first_line(console).endswith(", target default, backends ane+emulator")
    assert "the emulator disagrees" in console.export_text()


def test_lora_inputs_probe_swaps_adapters_without_a_compile_and_sees_a_stale_one(report, tmp_path):
    """On the emulator the adapter inputs give the merged weight's outputs; a backend that keeps the first inputs it
    saw (as a chip that cached them would) is called stale."""
    from orion.runtime.backends.emulator import EmulatorBackend, EmulatorModel

    assert entry(report, "lora-inputs")["verdict"] == "adapters swap as inputs"
    assert observations(report, "lora-inputs")["compiles"] == 1

    class FirstInputsModel(EmulatorModel):
        def evaluate(self, inputs, outputs):
            if not hasattr(self, "_first"):
                self._first = [bytes(s._memory) for s in inputs]
            for surface, saved in zip(inputs, self._first):
                if surface is not inputs[-1]:  # "x" binds last; the adapter inputs keep their first values
                    surface._memory[:] = np.frombuffer(saved, np.uint8)
            super().evaluate(inputs, outputs)

    class FirstInputsBackend(EmulatorBackend):
        def new_model(self, mil_text, weight_files):
            return FirstInputsModel(self, mil_text, weight_files)

    backend = FirstInputsBackend(get_target("default"), root=tmp_path / "emu")
    verdict, _ = decide("lora-inputs", backend)
    assert verdict.startswith("stale")


def test_exact_verify_probe_finds_bit_exact_passes_and_names_a_chip_whose_columns_leak(report, tmp_path,
                                                                                      monkeypatch):
    """On the emulator (both accumulators) one pass of several tokens gives their one-token passes' outputs bit for
    bit; products whose columns depend on each other (each sum nudged by its row's mean) make it say where not."""
    from orion.runtime.backends.emulator import AneKernels

    assert entry(report, "exact-verify")["verdict"].startswith("bit-exact")
    assert decide("exact-verify", emulator(tmp_path, numerics=Numerics(accumulator="fp32")))[0].startswith("bit-exact")
    plain = AneKernels.matmul

    def leaky(self, a, b):
        out = plain(self, a, b)
        return out + out.mean(axis=-1, keepdims=True) * np.float32(1e-2)

    monkeypatch.setattr(AneKernels, "matmul", leaky)
    verdict, value = decide("exact-verify", emulator(tmp_path))
    assert verdict.startswith("not bit-exact: positions [") and value == {}
