"""Children: one probe, one backend, one process, one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from orion.compiler.targets import Target, get_target
from orion.errors import SettingsError
from orion.runtime.doctor import harness
from orion.runtime.doctor.registry import PROBES, Probe, _error, jsonable

#: Prefix of the one line a child prints; anything else on stdout (framework chatter) is ignored.
RESULT_MARK = "ORION-DOCTOR-RESULT "
#: Prefix of the line a child prints once its backend exists (with the machine's facts): a child that crashes or
#: hangs after it still ran on that backend, one that dies before it did not.
REACHED_MARK = "ORION-DOCTOR-REACHED "


def _make_backend(name: str, target: Target, root: Path):
    if name == "emulator":
        from orion.runtime.backends.emulator import EmulatorBackend

        return EmulatorBackend(target, root=root)
    from orion.runtime.program import get_backend

    return get_backend(name, target)


def child_main(argv: Sequence[str] | None = None) -> int:
    """``--child ID --backend NAME [--target T] [--mil-version V] [--import MODULE]``: run one probe, print one line."""
    parser = argparse.ArgumentParser(prog="python -m orion.runtime.doctor")
    parser.add_argument("--child", required=True)
    parser.add_argument("--backend", required=True, choices=("ane", "emulator"))
    parser.add_argument("--target", default="default")
    parser.add_argument("--mil-version")
    parser.add_argument("--import", dest="modules", action="append", default=[])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    harness._scratch = args.workdir
    result: dict[str, Any] = {"probe": args.child, "backend": args.backend}
    try:
        import importlib

        for module in args.modules:
            importlib.import_module(module)
        if args.child not in PROBES:
            raise SettingsError(f"unknown probe {args.child!r}")
        target = get_target(args.target)
        if args.mil_version and args.mil_version != target.mil_version:
            target = target.with_overrides(mil_version=args.mil_version)
        with tempfile.TemporaryDirectory(prefix="backend-", dir=harness._scratch) as root:
            backend = _make_backend(args.backend, target, Path(root))
            print(REACHED_MARK + json.dumps(jsonable(backend.describe())), flush=True)
            result["observations"] = jsonable(PROBES[args.child].run(backend))
    except Exception as exc:
        result["error"] = _error(exc)
        result["traceback"] = traceback.format_exc()[-4000:]
    try:
        line = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a probe returned something JSON cannot hold: a bug, said plainly
        line = json.dumps({k: result[k] for k in ("probe", "backend")} | {"error": f"observations are not JSON: {exc}"})
    print(RESULT_MARK + line, flush=True)
    return 0


def _child_env(backend: str, workdir: str) -> dict[str, str]:
    """The child sees the modules the parent sees (a source checkout, a test package). An emulator child keeps
    every temp file in ``workdir``; an ANE child keeps the system temp directory, where the framework expects
    model directories."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if backend == "emulator":
        env["TMPDIR"] = workdir
    return env


#: How much of a failed child's stderr the report keeps (the end, where a crash report or framework log ends).
STDERR_KEPT = 8000


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_probe_in_child(probe: Probe, backend: str, *, target: str = "default", timeout: float = 60.0,
                       mil_version: str | None = None) -> dict:
    """Run ``probe`` on ``backend`` in a fresh process. Returns ``{"status": "ok" | "error" | "crashed" |
    "timeout", "reached": whether the child got as far as the backend, "observations"?, "error"?, "returncode"?,
    "signal"?, "stderr"?, "machine"? (the backend's facts, once reached), "seconds"}``."""
    cmd = [sys.executable, "-m", "orion.runtime.doctor", "--child", probe.id, "--backend", backend,
           "--target", target]
    if mil_version:
        cmd += ["--mil-version", mil_version]
    # this package's probes register when the child imports it; any other module's, when the child imports that
    if probe.run.__module__ != "__main__" and not probe.run.__module__.startswith(f"{__package__}."):
        cmd += ["--import", probe.run.__module__]
    with tempfile.TemporaryDirectory(prefix="orion-doctor-", ignore_cleanup_errors=True) as workdir:
        return _supervise(cmd + ["--workdir", workdir], _child_env(backend, workdir), timeout)


def _supervise(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Start the child in its own session, wait at most ``timeout``, and read its result line (and whether it
    reached its backend, which a child that crashes or hangs afterwards has still said)."""
    t0 = time.perf_counter()
    posix = os.name == "posix"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=posix, text=True, errors="replace")

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and anything it started
            else:
                proc.kill()

    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        out: dict[str, Any] = {}
    except subprocess.TimeoutExpired:
        kill()
        stdout, stderr = proc.communicate()
        out = {"status": "timeout", "error": f"no answer within {timeout:g} s; the child was killed",
               "stderr": stderr[-STDERR_KEPT:]}
    except BaseException:  # Ctrl-C in the parent: a child in its own session would not get it
        kill()
        proc.wait()
        raise
    out["seconds"] = round(time.perf_counter() - t0, 3)
    reached = _marked(stdout, REACHED_MARK)
    out["reached"] = reached is not None
    if reached is not None:
        out["machine"] = reached
    if out.get("status") == "timeout":
        return out
    result = _marked(stdout, RESULT_MARK)
    if result is None or proc.returncode != 0:
        out.update(status="crashed", returncode=proc.returncode, stderr=stderr[-STDERR_KEPT:])
        if proc.returncode is not None and proc.returncode < 0:
            out["signal"] = _signal_name(-proc.returncode)
            out["error"] = f"the child died of {out['signal']}"
        else:
            out["error"] = f"the child exited with code {proc.returncode} without a result"
        return out
    out["status"] = "error" if "error" in result else "ok"
    for key in ("observations", "error", "traceback"):
        if key in result:
            out[key] = result[key]
    return out


def _marked(stdout: str, mark: str) -> Any:
    """The JSON after the last line starting with ``mark``, or None."""
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(mark)), None)
    return None if line is None else json.loads(line[len(mark):])
