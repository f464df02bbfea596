"""Programs on backends: ``Program`` (compile, load, run, update weights), ``get_backend``, tensors, the cache."""

from orion.runtime.backends import BACKENDS


def __getattr__(name: str):
    """``Program`` and ``get_backend`` load the compiler: imported on first use, so that ``BACKENDS`` stays light."""
    if name in ("Program", "get_backend"):
        from orion.runtime import program

        return getattr(program, name)
    raise AttributeError(f"module 'orion.runtime' has no attribute {name!r}")


__all__ = ["BACKENDS", "Program", "get_backend"]
