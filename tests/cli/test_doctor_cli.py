"""``orion doctor`` from the command line: it probes against the target asked for, and refuses ``--write-profile``
before running anything when no ANE will run, however the emulator was asked for."""

from __future__ import annotations

import json

import pytest

import orion.runtime.doctor as doctor
from orion.cli.main import cli
from tests.cli.test_cli import _runner, assert_ok, assert_user_error


def invoke(*args, env: dict | None = None):
    return _runner().invoke(cli, [str(a) for a in args], env=env or {})


@pytest.mark.parametrize("args, env", [(("--backend", "emulator"), {}), ((), {"ORION_BACKEND": "emulator"})])
def test_write_profile_is_refused_before_any_probe_runs(tmp_path, monkeypatch, args, env):
    """With an ANE present, asking for the emulator (by flag or by ORION_BACKEND) leaves no ANE verdicts to write."""
    ran = []
    monkeypatch.setattr(doctor, "ane_status", lambda: (True, "a stand-in ANE"))
    monkeypatch.setattr(doctor, "run_doctor", lambda **kwargs: ran.append(kwargs))
    profile = tmp_path / "p.json"
    result = invoke("doctor", *args, "--write-profile", profile, env=env)
    assert_user_error(result, "--write-profile needs probe results from an Apple Neural Engine")
    assert ran == [] and not profile.exists()


def test_doctor_probes_against_the_target_asked_for(tmp_path):
    """fp32-io on the emulator is what the target assumes: fp16 only by default, fp32 too on m4 or a profile file
    that says so."""
    profile = tmp_path / "fp32-ok.json"
    profile.write_text(json.dumps({"base": "m1", "overrides": {"io_dtypes": ["fp16", "fp32"]}}))
    for target, io_dtypes in (("default", ["fp16"]), ("m4", ["fp16", "fp32"]), (profile, ["fp16", "fp32"])):
        report = tmp_path / "report.json"
        args = ("doctor", "--backend", "emulator", "--probe", "fp32-io", "--json", report, "--target", target)
        assert_ok(invoke(*args))
        data = json.loads(report.read_text())
        assert data["target"] == str(target) and data["probes"][0]["value"] == {"io_dtypes": io_dtypes}, target


def test_an_unknown_target_is_a_user_error():
    assert_user_error(invoke("doctor", "--backend", "emulator", "--target", "m9"), "unknown target 'm9'")
