"""The per-process compile budget. The ANE compiler leaks state and fails *silently* after ~119 compiles in one
process (catalog ANE-05), so every compile is counted, the budget is never silently exceeded, and long jobs
checkpoint and re-exec themselves before it runs out (a re-exec costs ~50 ms: ANE-15)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable, NoReturn, Sequence

from orion.errors import CompileBudgetExceeded, SettingsError

DEFAULT_LIMIT = 100
ENV_LIMIT = "ORION_COMPILE_BUDGET"
#: Set in the environment of a re-exec'ed process: how many times the job has restarted itself.
ENV_GENERATION = "ORION_REEXEC_GENERATION"


def _limit_from_env() -> int:
    raw = os.environ.get(ENV_LIMIT)
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{ENV_LIMIT}={raw!r} is not an integer; set a compile budget such as 100") from None
    if value < 1:
        raise SettingsError(f"{ENV_LIMIT}={value} must be at least 1")
    return value


class CompileBudget:
    """Counts compiles; :meth:`charge` refuses the one that would pass the limit."""

    def __init__(self, limit: int | None = None):
        self.limit = _limit_from_env() if limit is None else int(limit)
        if self.limit < 1:
            raise SettingsError(f"compile budget {self.limit} must be at least 1")
        self.used = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int:
        return self.limit - self.used

    def charge(self, what: str = "a program") -> None:
        with self._lock:
            if self.used >= self.limit:
                raise CompileBudgetExceeded(
                    f"compiling {what} would be compile {self.used + 1} of this process, past its budget of "
                    f"{self.limit} (the ANE compiler fails silently past ~119): save a checkpoint and restart the "
                    f"process (orion.runtime.budget.reexec), use the program cache or weights-as-inputs programs "
                    f"to compile less, or raise the budget with {ENV_LIMIT} if a probe showed your chip allows more"
                )
            self.used += 1

    def can_afford(self, compiles: int) -> bool:
        return self.remaining >= compiles


#: The budget every runtime program charges unless given its own.
PROCESS_BUDGET = CompileBudget()


def reexec(save_checkpoint: Callable[[], None] | None = None, argv: Sequence[str] | None = None) -> NoReturn:
    """Save state, then replace this process with a fresh run of the same command (a fresh compile budget).

    ``argv`` defaults to this process's own arguments; the caller's command line should resume from the checkpoint
    (``--resume``). ``ORION_REEXEC_GENERATION`` counts restarts so a job can tell it was re-exec'ed.
    """
    if save_checkpoint is not None:
        save_checkpoint()
    sys.stdout.flush()
    sys.stderr.flush()
    args = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    env = dict(os.environ)
    env[ENV_GENERATION] = str(int(env.get(ENV_GENERATION, "0")) + 1)
    os.execve(args[0], args, env)
