"""Tensors that travel to and from the ANE: flat byte buffers ("surfaces") holding ``[1, C, 1, S]`` data packed from
byte 0, with zero-copy numpy views.

On macOS a surface is an IOSurface (width = bytes, height 1, one byte per element) that must be locked while
mapped; elsewhere it is plain memory with the same interface. Layout is channel-first: element (c, s) at c*S + s.

NaN policy (stated once, used by every write): writing clamps to +-65504 and turns NaN into 0, so no NaN or inf ever
reaches the ANE from the CPU. Reading copies the values as they are: an overflow inside a program gives +-inf on the
hardware (N5), and the caller must see it (a loss scaler backs off on it; ``orion run`` counts it), not a 65504 that
looks finite.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np

from orion.errors import BindingError

FP16_MAX = 65504.0
_DTYPES = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


def check_input_names(expected, given) -> None:
    """Refuse missing or unexpected inputs, naming each, before anything is copied."""
    expected, given = set(expected), set(given)
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        parts = ([f"missing input(s) {missing}"] if missing else []) + ([f"unexpected input(s) {extra}"] if extra else [])
        raise BindingError(f"{'; '.join(parts)}; the program takes {sorted(expected)}")


class Surface:
    """A flat buffer of ``nbytes``; subclasses back it with an IOSurface. ``lock`` yields a uint8 view."""

    #: Writable mappings so far: a reader that derived something from the bytes (the emulator's float32 copy of a
    #: weight input) knows it is still valid while this count has not moved.
    writes = 0
    #: Set for weight inputs, written rarely and read by many runs: worth keeping what is derived from them.
    resident = False

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise BindingError(f"a surface needs a positive size, got {nbytes} bytes")
        self.nbytes = int(nbytes)
        self._memory = np.zeros(self.nbytes, dtype=np.uint8)
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def lock(self, read_only: bool = False) -> Iterator[np.ndarray]:
        """Map the surface; the view is valid only inside the ``with`` block."""
        with self._lock:
            if not read_only:
                self.writes += 1
            yield self._memory

    def close(self) -> None:
        """Release the memory (an IOSurface is CFReleased)."""


_CHUNK = 1 << 16
_NONFINITE = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def _repair(values: np.ndarray) -> None:
    """Apply the NaN policy in place to values bound for the ANE: +-inf and magnitudes past 65504 -> +-65504,
    NaN -> 0. Scans the bits as integers (fast) and repairs only if needed."""
    if values.dtype == np.float32:
        np.clip(values, -FP16_MAX, FP16_MAX, out=values)  # fp32 tensors still hold fp16 range on the ANE
    utype, magnitude, exponent = _NONFINITE[values.dtype]
    bits = values.view(utype) & magnitude
    if bits.size and bits.max() >= exponent:
        bad = bits >= exponent
        nan = bad & (bits > exponent)
        np.copyto(values, np.where(values > 0, FP16_MAX, -FP16_MAX).astype(values.dtype), where=bad & ~nan)
        values[nan] = 0.0


class Tensor:
    """A ``[1, C, 1, S]`` (or any static shape) fp16/fp32 tensor stored packed at the start of a surface.

    ``with t.view() as a:`` gives a zero-copy numpy array of the declared shape. ``write`` copies with the clamp and
    NaN policy above, ``read`` copies as is; ``from_rows``/``to_rows`` convert from/to the CPU's ``[S, C]`` row-major layout.
    """

    def __init__(self, shape: tuple[int, ...], dtype: str = "fp16", surface: Surface | None = None):
        if dtype not in _DTYPES:
            raise BindingError(f"ANE tensors are fp16 or fp32, not {dtype!r} (int32 and bf16 I/O are rejected)")
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.np_dtype = _DTYPES[dtype]
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize
        self.surface = surface or Surface(self.nbytes)
        if self.surface.nbytes < self.nbytes:
            raise BindingError(f"a {list(self.shape)} {dtype} tensor needs {self.nbytes} bytes; "
                               f"the surface has {self.surface.nbytes}")

    @contextlib.contextmanager
    def view(self, read_only: bool = False) -> Iterator[np.ndarray]:
        with self.surface.lock(read_only) as raw:
            view = raw[: self.nbytes].view(self.np_dtype).reshape(self.shape)
            if read_only:
                view = view.view()
                view.flags.writeable = False
            yield view

    def write(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.shape != self.shape:
            raise BindingError(f"expected shape {list(self.shape)}, got {list(array.shape)}")
        if array.dtype.kind != "f":
            raise BindingError(f"expected a float array, got {array.dtype}")
        with self.view() as v, np.errstate(over="ignore", invalid="ignore"):
            flat_in, flat_out = array.reshape(-1), v.reshape(-1)
            for start in range(0, flat_out.size, _CHUNK):  # copy and check chunk by chunk, while it is in cache
                chunk = flat_out[start:start + _CHUNK]
                np.copyto(chunk, flat_in[start:start + _CHUNK], casting="unsafe")
                _repair(chunk)

    def read(self) -> np.ndarray:
        with self.view(read_only=True) as v:
            return v.copy()

    # -- the CPU's [S, C] row-major layout --------------------------------------------------------------------

    def _channels_seq(self) -> tuple[int, int]:
        if len(self.shape) != 4 or self.shape[0] != 1 or self.shape[2] != 1:
            raise BindingError(f"row conversion needs a [1, C, 1, S] tensor, this one is {list(self.shape)}")
        return self.shape[1], self.shape[3]

    def from_rows(self, rows: np.ndarray) -> None:
        """Write a ``[S', C]`` array (S' <= S; the rest is zero) in the channel-first layout."""
        c, s = self._channels_seq()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != c or rows.shape[0] > s:
            raise BindingError(f"expected rows of shape [<= {s}, {c}], got {list(rows.shape)}")
        with self.view() as v:
            v[0, :, 0, : rows.shape[0]] = rows.T
            v[0, :, 0, rows.shape[0]:] = 0
            _repair(v)

    def to_rows(self, count: int | None = None) -> np.ndarray:
        """The first ``count`` positions as a float32 ``[count, C]`` array."""
        c, s = self._channels_seq()
        count = s if count is None else count
        with self.view(read_only=True) as v:
            return v[0, :, 0, :count].astype(np.float32).T.copy()
