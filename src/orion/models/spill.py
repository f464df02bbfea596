"""Weights a model needs only to build programs, kept in a private temporary file instead of in memory.

Once a model's programs are built they hold its weights (the emulator in the form its matmuls read, the ANE in its
compiled model); the model's own float32 copy is read again only when another program must be built (a new prefill
bucket, a decode capacity, an adapter layout), and then one program's blocks at a time. So that copy goes to a file
nobody else can open (unlinked at once where the OS allows) and comes back, bit for bit, on each use.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from typing import Iterable, NamedTuple, Sequence, TypeVar

import numpy as np

from orion.errors import OrionError

T = TypeVar("T")


class _Place(NamedTuple):
    """Where one array is in the file."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


class SpilledList(Sequence[T]):
    """A list of dataclasses whose fields are numpy arrays, or tuples and lists of them, written to a temporary file
    as it is made (only one item is in memory at a time) and read back, as new arrays, by each ``[i]`` or ``[i:j]``
    (one field: :meth:`field`). Anything else in a field (None, names) stays in memory as it is."""

    def __init__(self, items: Iterable[T]):
        self._file = tempfile.TemporaryFile(prefix="orion-weights-")
        self._lock = threading.Lock()
        self._items: list[tuple[type, dict]] = []  # per item: its class and, per field, where its arrays are
        try:
            for item in items:
                self._items.append((type(item), {f.name: self._write(getattr(item, f.name))
                                                  for f in dataclasses.fields(item)}))
                del item  # gone before the next is made
        except OSError as exc:
            self._file.close()
            raise _no_room(exc) from None

    def _write(self, value):
        """Append ``value``'s arrays; where they are (a place for an array, a tuple or list of them for a tuple or
        list, any other value itself)."""
        if isinstance(value, (tuple, list)):
            return type(value)(self._write(v) for v in value)
        if not isinstance(value, np.ndarray):
            return value
        array = np.asarray(value, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        place = _Place(self._file.tell(), array.dtype, array.shape)
        self._file.write(memoryview(array.reshape(-1).view(np.uint8)))
        return place

    def _read(self, place):
        if not isinstance(place, _Place):
            return type(place)(self._read(p) for p in place) if isinstance(place, (tuple, list)) else place
        offset, dtype, shape = place
        array = np.empty(shape, dtype)
        with self._lock:
            self._file.seek(offset)
            got = self._file.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        if got != array.nbytes:
            raise OrionError(f"the model's temporary weight file gave {got} of {array.nbytes} bytes; load the model "
                             "again")
        return array

    def _item(self, i: int) -> T:
        cls, fields = self._items[i]
        return cls(**{name: self._read(place) for name, place in fields.items()})

    def field(self, i: int, name: str):
        """Field ``name`` of item ``i``, read without the item's other fields."""
        return self._read(self._items[i][1][name])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self._items)))]
        return self._item(i)

    def __len__(self) -> int:
        return len(self._items)


def spilled_array(array: np.ndarray) -> np.ndarray:
    """``array``, read-only, in a private temporary file mapped into memory: only the parts read are in memory (an
    embedding table, of which each token reads one row)."""
    with tempfile.TemporaryFile(prefix="orion-weights-") as file:
        try:
            file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            file.flush()
        except OSError as exc:
            raise _no_room(exc) from None
        return np.memmap(file, array.dtype, "r", shape=array.shape)  # the map outlives the file object


def _no_room(exc: OSError) -> OrionError:
    return OrionError(f"could not keep the model's weights in a temporary file in {tempfile.gettempdir()} "
                      f"({exc.strerror or exc}); free space there or point TMPDIR elsewhere")
