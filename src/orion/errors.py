"""Every error Orion raises on purpose derives from :class:`OrionError`, so callers (and the CLI) can tell a
user's mistake from a bug: the message names the problem and, where one exists, the fix."""

from __future__ import annotations


class OrionError(Exception):
    """Base class of the errors Orion reports to users."""


class MILSyntaxError(OrionError):
    """MIL text that does not parse; carries the 1-based line and column."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column


class MILProgramError(OrionError):
    """A MIL program that parses but cannot be run: unknown op, undefined variable, bad parameter, bad type."""


class WeightFileError(OrionError):
    """A weight (blob storage) file that is missing, truncated, or has a bad header or record."""


class UnsafePathError(OrionError):
    """A path read from a file that would leave its directory."""


class GraphError(OrionError):
    """An IR graph that is malformed: shapes or dtypes that do not fit an op, dangling values."""


class ConstraintError(OrionError):
    """A program that breaks an ANE constraint; ``violations`` lists what the catalog found."""

    def __init__(self, violations):
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


class BindingError(OrionError):
    """Inputs or outputs that do not fit a program: missing, extra, wrong shape, or surfaces the ANE would refuse."""


class SettingsError(OrionError):
    """A target profile, numerics setting or runtime option with an unknown name or a value out of range."""


class BackendError(OrionError):
    """A backend call that failed: compile, load, evaluate or unload (the framework's NSError text included)."""


class EvaluationError(BackendError):
    """An evaluation the ANE refuses, with its status code (0x1d: unequal or too small I/O surfaces)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message if status is None else f"{message} (status {status:#x})")
        self.status = status


class CompileBudgetExceeded(OrionError):
    """The process has used its compile budget; the ANE compiler fails silently past ~119 compiles."""


class CacheError(OrionError):
    """A program cache entry that cannot be written or read."""
