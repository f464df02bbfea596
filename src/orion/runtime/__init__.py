"""Programs on backends: ``Program`` (compile, load, run, update weights), ``get_backend``, tensors, the cache."""

from orion.runtime.program import BACKENDS, Program, get_backend

__all__ = ["BACKENDS", "Program", "get_backend"]
