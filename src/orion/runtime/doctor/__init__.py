"""``orion doctor``: small probes that settle, on the machine at hand, what the public record leaves open about the ANE.

The ANE reference lists facts that sources contest (the CONFLICT items: concat, gelu, silu, reloading weights), that
one report alone makes (the 16-constant limit, rsqrt, the minimum surface) and numerics the emulator can only guess
(section 9). Each is a :class:`Target` field or a :class:`~orion.runtime.backends.numerics.Numerics` setting. A probe
is a tiny MIL program that decides one of them: it returns raw observations, and a pure function maps them to a
verdict and the setting's value.

Every probe runs in a child process (``python -m orion.runtime.doctor --child ID --backend NAME``, one JSON line on
stdout), because the private framework can crash or hang the process that calls it: a crash or a timeout becomes
the verdict ``crashed`` or ``timeout``, never the end of the user's process. With an ANE present each probe runs on
the ANE and on the emulator and the two are compared; elsewhere the emulator alone shows what Orion assumes.

On the emulator, compile-time facts are what the target profile assumes: a program that the constraint catalog
rejects for the target (for the catalog entries the probe settles) counts as a failed compile, since the emulator
itself runs any op it knows. Binding, surface and numerics facts come from the emulator's own behaviour.
"""

from orion.runtime.doctor.registry import PROBES, Probe, jsonable, register

# The probe modules register their probes on import; this order is the order of the report.
from orion.runtime.doctor import compile_probes, io_probes, numerics_probes  # noqa: F401
from orion.runtime.doctor.child import REACHED_MARK, RESULT_MARK, child_main, run_probe_in_child
from orion.runtime.doctor.numerics_probes import activation_errors, all_finite_fp16
from orion.runtime.doctor.report import (
    EMULATOR_ONLY_MESSAGE,
    NO_ANE_MESSAGE,
    ane_status,
    compare,
    print_report,
    profile_overrides,
    run_doctor,
    select_probes,
    write_profile,
    write_report,
)

__all__ = ["PROBES", "Probe", "register", "jsonable", "REACHED_MARK", "RESULT_MARK", "child_main", "run_probe_in_child",
           "activation_errors", "all_finite_fp16", "EMULATOR_ONLY_MESSAGE", "NO_ANE_MESSAGE",
           "ane_status", "compare", "print_report", "profile_overrides", "run_doctor", "select_probes",
           "write_profile", "write_report"]
