"""The report: every probe on each backend, judged and compared; the profile its ANE verdicts imply; the table."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from orion import __version__
from orion.compiler.targets import get_target, read_profile
from orion.errors import BackendError, SettingsError
from orion.fileio import atomic_write
from orion.runtime.backends import BACKENDS, requested_backend
from orion.runtime.doctor.child import run_probe_in_child
from orion.runtime.doctor.registry import PROBES, Probe, _decode, _error, _num, jsonable

NO_ANE_MESSAGE = ("No Apple Neural Engine here: the probes ran on the emulator, which shows what Orion assumes, "
                  "not what your chip does.")
EMULATOR_ONLY_MESSAGE = ("The probes ran on the emulator only, as asked: they show what Orion assumes, not what your "
                         "chip does.")
ANE_NOT_REACHED_MESSAGE = ("No probe reached the Apple Neural Engine (each ANE child failed before it: see the "
                           "errors); what ran, ran on the emulator.")
NOTHING_RAN_MESSAGE = "No probe reached a backend: every child failed before it (see each probe's error)."


def _judge(probe: Probe, child: dict) -> dict:
    """Add the verdict and value of one backend's run (failures are verdicts too)."""
    if child["status"] != "ok":
        detail = child.get("signal") or child.get("returncode")
        label = {"crashed": "crashed", "timeout": "timeout"}.get(child["status"], "error")
        return {**child, "verdict": f"{label} ({detail})" if label == "crashed" and detail is not None else label,
                "value": {}}
    try:
        verdict, value = probe.verdict(child["observations"])
    except Exception as exc:  # observations the verdict cannot read are a finding, not a doctor crash
        verdict, value = f"unreadable observations: {_error(exc)}", {}
    return {**child, "verdict": verdict, "value": value}


def _ran(run: dict) -> bool:
    """Whether a backend's run counts as run there: its child reached the backend and answered or died there (a
    timeout answered nothing, a child that failed before its backend never touched it)."""
    return bool(run.get("reached")) and run["status"] != "timeout"


def _flatten_values(obs: dict) -> dict[str, np.ndarray]:
    values = obs.get("values", {}) if isinstance(obs, dict) else {}
    return {k: _decode(v) for k, v in values.items() if isinstance(v, (list, float, int, str))}


def compare(ane: dict, emulator: dict) -> dict:
    """ANE against emulator: verdicts, values, and every number both recorded under ``values``."""
    out: dict[str, Any] = {"verdict_equal": ane.get("verdict") == emulator.get("verdict"),
                           "value_equal": ane.get("value") == emulator.get("value")}
    a_obs, e_obs = ane.get("observations") or {}, emulator.get("observations") or {}
    if "variants" in a_obs and "variants" in e_obs:  # compile probes: which forms worked on each side
        out["variants_differing"] = sorted(
            v for v in set(a_obs["variants"]) | set(e_obs["variants"])
            if a_obs["variants"].get(v, {}).get("works") != e_obs["variants"].get(v, {}).get("works"))
    a, e = _flatten_values(a_obs), _flatten_values(e_obs)
    common = sorted(set(a) & set(e))
    if not common:
        out.update(outputs_equal=None, max_abs_diff=None, differing=[])
        return out
    differing, worst = [], 0.0
    for key in common:
        x, y = a[key], e[key]
        if x.shape != y.shape:
            differing.append(key)
            worst = math.inf
            continue
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        if not same.all():
            differing.append(key)
            with np.errstate(invalid="ignore"):
                diff = np.where(same, 0.0, np.abs(x - y))
            worst = max(worst, float(np.where(np.isnan(diff), math.inf, diff).max()))
    out.update(outputs_equal=not differing, max_abs_diff=_num(worst), differing=differing)
    return out


def ane_status() -> tuple[bool, str]:
    """(whether an ANE can run the probes here, why or why not); never raises."""
    try:
        from orion.runtime.backends.ane import AneBackend

        if AneBackend.available():
            return True, "the ANE backend is available"
        return False, "the ANE backend reports no Apple Neural Engine on this machine"
    except Exception as exc:  # the ANE module may be missing or fail to import off macOS
        return False, f"the ANE backend cannot be used here ({_error(exc)})"


def select_probes(ids: Sequence[str] | None) -> list[Probe]:
    if not ids:
        return [p for p in PROBES.values() if not p.hidden]
    unknown = [i for i in ids if i not in PROBES]
    if unknown:
        known = ", ".join(p.id for p in PROBES.values() if not p.hidden)
        raise SettingsError(f"unknown probe(s) {', '.join(unknown)}; known probes: {known}")
    return [PROBES[i] for i in dict.fromkeys(ids)]


def run_doctor(backend: str = "auto", probes: Sequence[str] | None = None, timeout: float = 60.0,
               target: str = "default", on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the probes (each in a child) and return the report. ``backend``: ``auto`` (``$ORION_BACKEND`` when set,
    else the ANE and the emulator where an ANE exists, else the emulator), ``ane`` (the ANE only, an error where
    there is none), ``emulator`` (the emulator only). The report's ``backends`` are those some child reached."""
    backend, asked = requested_backend(backend)
    if not timeout > 0:
        raise SettingsError(f"timeout {timeout!r} must be a positive number of seconds")
    get_target(target)  # an unknown target fails here, not once per child
    selected = select_probes(probes)
    present, note = ane_status()
    if backend == "ane" and not present:
        raise BackendError(f"{asked}: {note}; use the emulator backend to see what Orion assumes")
    planned = {"auto": ["ane", "emulator"] if present else ["emulator"], "ane": ["ane"],
               "emulator": ["emulator"]}[backend]
    started = time.perf_counter()
    mil_version = None
    machine: dict[str, Any] = {}
    dialect = PROBES.get("mil-dialect")
    ordered = sorted(selected, key=lambda p: p is not dialect)  # the dialect decides how the others are printed
    entries = []
    for probe in ordered:
        runs: dict[str, dict] = {}
        for name in planned:
            child = run_probe_in_child(probe, name, target=target, timeout=timeout, mil_version=mil_version)
            runs[name] = _judge(probe, child)
            if child.get("machine") and (not machine or name == "ane"):
                machine = child["machine"]
        decisive = runs.get("ane") or runs["emulator"]
        if probe is dialect and "ane" in runs:
            mil_version = decisive["value"].get("mil_version")
        entry = {
            "id": probe.id,
            "question": probe.question,
            "settles": list(probe.settles),
            "verdict": decisive["verdict"],
            "value": decisive["value"],
            "ane": runs.get("ane"),
            "emulator": runs.get("emulator"),
            "comparison": compare(runs["ane"], runs["emulator"]) if len(runs) == 2 else None,
            "ran_on": [name for name, run in runs.items() if _ran(run)],
            "seconds": round(sum(r["seconds"] for r in runs.values()), 3),
        }
        entries.append(entry)
        if on_result is not None:
            on_result(entry)
    ran = {name for e in entries for name in e["ran_on"]}
    backends = [name for name in BACKENDS if name in ran]
    ran_ane = "ane" in backends
    if ran_ane:
        message = "Probes ran on the Apple Neural Engine and on the emulator." if len(backends) == 2 else \
            "Probes ran on the Apple Neural Engine only."
    elif "ane" in planned:
        message = ANE_NOT_REACHED_MESSAGE if backends else NOTHING_RAN_MESSAGE
    elif not backends:
        message = NOTHING_RAN_MESSAGE
    else:
        message = EMULATOR_ONLY_MESSAGE if present else NO_ANE_MESSAGE
    os_build = None
    if ran_ane:
        from orion.runtime.cache import os_build as host_build  # sw_vers on macOS: what private-API results hinge on

        os_build = machine.get("macos_build") or host_build()  # AneBackend.describe() names it macos_build
    return {
        "orion_version": __version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": machine,
        "chip": machine.get("chip") if ran_ane else None,
        "os_build": os_build,
        "target": target,
        "ane_present": present,
        "ane_note": note,
        "backend_asked": asked,
        "backends": backends,
        "message": message,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 3),
        "probes": entries,
    }


# ---------------------------------------------------------------------------------------------------------------------
# What the ANE verdicts imply for a target profile.

#: Weight-update strategies in order of preference when several are fresh (patch is Orion's tested recipe).
_WEIGHT_PREFERENCE = ("patch", "reload")


def profile_overrides(report: dict) -> dict:
    """Target fields (and a ``numerics`` dict) the ANE verdicts imply; empty when no probe ran on the ANE."""
    overrides: dict[str, Any] = {}
    numerics: dict[str, Any] = {}
    fresh: list[str] = []
    weight_probes = 0
    for entry in report.get("probes", []):
        ane = entry.get("ane")
        if not ane or ane.get("status") != "ok":
            continue
        for key, value in ane.get("value", {}).items():
            if key == "weight_update":
                fresh.append(value)
            elif key.startswith("numerics."):
                numerics[key.split(".", 1)[1]] = value
            else:
                overrides[key] = value
        weight_probes += "weight_update" in entry.get("settles", [])
    if weight_probes:
        overrides["weight_update"] = next((s for s in _WEIGHT_PREFERENCE if s in fresh), "recompile")
    if numerics:
        overrides["numerics"] = numerics
    return overrides


def write_profile(report: dict, path: str | os.PathLike) -> Path:
    """Write the profile the ANE verdicts imply (``{"base", "overrides", "source", "chip", "os_build"}``),
    atomically: a crash leaves the old file or the new one, never half of one."""
    if "ane" not in report.get("backends", []):
        raise SettingsError("no probe ran on an Apple Neural Engine, so there is nothing to write to a profile; "
                            "run `orion doctor` on a Mac with Apple silicon")
    target = str(report.get("target", "default"))
    base_name, earlier = read_profile(Path(target)) if target.lower().endswith(".json") else (target, {})
    probed = profile_overrides(report)  # a profile probed under a profile file extends that file's overrides
    overrides = {**earlier, **probed}
    if "numerics" in earlier and "numerics" in probed:
        overrides["numerics"] = {**earlier["numerics"], **probed["numerics"]}
    fields = {k: v for k, v in overrides.items() if k != "numerics"}
    base = get_target(base_name)
    if "numerics" in overrides:  # the field slice_offset_overflow speaks for itself; its numerics twin follows it
        kept = {k: v for k, v in base.numerics.items() if k != "slice_offset_overflow"}
        fields["numerics"] = {**kept, **overrides["numerics"]}
    base.with_overrides(**fields)  # an invalid value fails here, before anything is written
    from orion.runtime.backends.numerics import Numerics

    Numerics.from_dict(overrides.get("numerics", {}))
    profile = {"base": base.name, "overrides": overrides, "source": "orion doctor", "chip": report.get("chip"),
               "os_build": report.get("os_build")}
    return _write_json_atomic(profile, path)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the whole report as strict JSON, atomically (for ``orion doctor --json FILE``)."""
    return _write_json_atomic(jsonable(report), path)


def _write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Printing.


def _value_text(value: dict) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}" for k, v in value.items())


def _cell(run: dict | None) -> str:
    if run is None:
        return "-"
    text = run["verdict"]
    if run["status"] != "ok" and run.get("error"):
        text += f": {' '.join(run['error'].split())[:160]}"  # one line here; the JSON report keeps it verbatim
    return text


def print_report(report: dict, console) -> None:
    """A rich table: probe, what it settles, the ANE's and the emulator's verdicts, and the value decided."""
    from rich.markup import escape
    from rich.table import Table

    console.print(escape(f"orion {report['orion_version']} doctor on {report['platform']}"
                         + (f", chip {report['chip']}" if report.get("chip") else "")
                         + (f", OS build {report['os_build']}" if report.get("os_build") else "")
                         + f", target {report['target']}"
                         + f", backends {'+'.join(report['backends']) or 'none'}"), highlight=False)
    table = Table(title="ANE probes", show_lines=True)
    for col in ("probe", "settles", "ANE", "emulator", "verdict"):
        table.add_column(col, overflow="fold")
    for e in report["probes"]:
        verdict = e["verdict"] + (f"\n{_value_text(e['value'])}" if e["value"] else "")
        if e.get("comparison") and not e["comparison"]["verdict_equal"]:
            verdict += "\n(the emulator disagrees)"
        table.add_row(*(escape(s) for s in (e["id"], ", ".join(e["settles"]) or "-", _cell(e["ane"]),
                                             _cell(e["emulator"]), verdict)))
    console.print(table)
    why = "" if "ane" in report["backends"] or not report.get("ane_note") else f" ({report['ane_note']})"
    console.print(escape(report["message"] + why), highlight=False)
    overrides = profile_overrides(report)
    if overrides:
        console.print(escape(f"profile overrides the ANE implies: {json.dumps(overrides, sort_keys=True)}"),
                      highlight=False)
