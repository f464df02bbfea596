"""MIL weight files ("blob storage v2"), the files ``BLOBFILE(path=..., offset=...)`` constants point into.

Layout (little-endian, reference section 4): a 64-byte header (uint32 blob count, uint32 version 2, zeros), then per
blob a 64-byte record (uint32 sentinel 0xDEADBEEF, uint32 dtype code, uint64 data size in bytes, uint64 absolute data
offset = record offset + 64, uint64 sub-byte padding bits, zeros) followed by the row-major data. Every record starts
on a 64-byte boundary; like coremltools, the writer pads *before* a record, so the file ends right after the last
blob's data and the two writers produce identical bytes.

The reader trusts each record, not the header's blob count: a program names a record by its offset, and other tools'
files undercount (a public fused-QKV kernel's file says 1 blob, holds 3, and runs on hardware).

Sub-byte types (int4, uint1, uint2, uint3, uint4, uint6: compressed weights and palette indices) are packed as
coremltools' writer packs them: values one after another, least significant bit first, the last byte zero-filled,
the record's padding field counting the unused bits. In memory they are :class:`SubByteArray` s, one value per byte.

Empty arrays: coremltools writes a size-0 record but its own reader then fails on it ("index out of bounds"), so
:class:`BlobWriter` refuses to write one; :class:`BlobReader` still reads such a record back as an empty array.
"""

from __future__ import annotations

import math
import operator
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from orion.errors import WeightFileError
from orion.ir.types import NUMPY_DTYPES, SUB_BYTE_BITS

PathLike = Union[str, os.PathLike]

#: Numpy dtype (little-endian) -> blob dtype code, for the types Orion reads and writes.
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype("<f2"): 1,
    np.dtype("<f4"): 2,
    np.dtype("u1"): 3,
    np.dtype("i1"): 4,
    np.dtype("<i2"): 6,
    np.dtype("<u2"): 7,
    np.dtype("<i4"): 14,
    np.dtype("<u4"): 15,
}
#: Blob dtype code -> numpy dtype: the inverse of :data:`DTYPE_CODES`.
CODE_DTYPES: dict[int, np.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
#: Sub-byte MIL type -> blob dtype code, the codes coremltools 9 writes.
SUB_BYTE_CODES: dict[str, int] = {"int4": 8, "uint1": 9, "uint2": 10, "uint4": 11, "uint3": 12, "uint6": 13}
CODE_SUB_BYTES: dict[int, str] = {code: name for name, code in SUB_BYTE_CODES.items()}
#: Codes the format defines but Orion does not handle (numpy has no such dtypes); named in error messages.
UNSUPPORTED_CODES: dict[int, str] = {5: "bf16", 16: "fp8e4m3fn", 17: "fp8e5m2"}


@dataclass(frozen=True)
class SubByteArray:
    """The values of a sub-byte MIL type (``dtype``: int4, uint1 ... uint6), one per element of an int8/uint8
    array; :attr:`nbytes` is their packed size, as stored."""

    values: np.ndarray
    dtype: str

    def __post_init__(self):
        bits = SUB_BYTE_BITS[self.dtype]
        low, high = (-(1 << bits - 1), (1 << bits - 1) - 1) if self.dtype == "int4" else (0, (1 << bits) - 1)
        if self.values.size and (int(self.values.min()) < low or int(self.values.max()) > high):
            raise WeightFileError(f"{self.dtype} values must lie in [{low}, {high}], got "
                                  f"[{int(self.values.min())}, {int(self.values.max())}]")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def size(self) -> int:
        return self.values.size

    @property
    def nbytes(self) -> int:
        return -(-self.values.size * SUB_BYTE_BITS[self.dtype] // 8)

    def packed(self) -> tuple[np.ndarray, int]:
        """The stored bytes and the number of unused bits at the end of the last one."""
        bits = SUB_BYTE_BITS[self.dtype]
        unsigned = self.values.reshape(-1).astype(np.uint8) & ((1 << bits) - 1)  # two's complement for int4
        planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
        return np.packbits(planes.reshape(-1), bitorder="little"), self.nbytes * 8 - self.values.size * bits

    @classmethod
    def unpack(cls, data: np.ndarray, dtype: str, count: int) -> "SubByteArray":
        bits = SUB_BYTE_BITS[dtype]
        planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
        values = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1)
        if dtype == "int4":
            values = np.where(values >= 8, values - 16, values)
        return cls(values.astype(NUMPY_DTYPES[dtype]), dtype)

#: Largest finite fp16 value: what +-Inf become, so weights stay finite on an fp16 machine.
FP16_MAX = 65504.0
VERSION = 2
SENTINEL = 0xDEADBEEF
ALIGNMENT = 64

_HEADER = struct.Struct("<II56x")
_RECORD = struct.Struct("<IIQQQ32x")
#: Float dtype -> (same-size unsigned view, mask dropping the sign, exponent bits): a value is NaN or Inf exactly
#: when its unsigned magnitude bits reach the all-ones exponent. Integer ops on a view are ~10x faster than
#: ``np.isfinite`` on float16.
_NONFINITE_BITS = {
    np.dtype("<f2"): (np.dtype("<u2"), 0x7FFF, 0x7C00),
    np.dtype("<f4"): (np.dtype("<u4"), 0x7FFFFFFF, 0x7F800000),
}
#: Elements per chunk when scanning float data: large enough for few Python steps, small enough to stay in cache.
_CHUNK = 1 << 20
_SUPPORTED = ", ".join([*(str(d) for d in DTYPE_CODES), *SUB_BYTE_CODES])
_TRUNCATED = "the file is truncated; write it again"
_CORRUPT = "the file is corrupt; write it again"
_NOT_V2 = "this is not a MIL blob storage v2 file"
_BAD_OFFSET = "a BLOBFILE offset must name a blob's 64-byte record (64 for the first blob of a file)"


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _dtype_name(code: int) -> str:
    if code in CODE_DTYPES:
        return str(CODE_DTYPES[code])
    return UNSUPPORTED_CODES.get(code, "unknown")


def stored_dtype(t) -> np.dtype | str:
    """The dtype to read a BLOBFILE constant of MIL type ``t`` with: a sub-byte type by name."""
    return t.dtype if t.dtype in SUB_BYTE_BITS else t.numpy_dtype


def blob_record_offsets(nbytes: list[int]) -> list[int]:
    """Record offsets that blobs of these data sizes get, in order: lets an emitter print ``BLOBFILE`` offsets
    before (or without) writing the file. Matches :meth:`BlobWriter.add` and coremltools."""
    offsets = []
    end = _HEADER.size
    for n in nbytes:
        offsets.append(_align(end))
        end = offsets[-1] + _RECORD.size + n
    return offsets


def sanitize(array: ArrayLike) -> np.ndarray:
    """A copy of ``array`` with NaN -> 0 and +-Inf -> +-65504 (fp16 max) for float arrays; other arrays are copied.

    Why: one NaN or Inf weight poisons every output of an fp16 matmul on the ANE. In an fp16 array +-Inf are the
    only values beyond fp16 range, so this is also the fp16 clamp; finite fp32 values are left as they are.
    """
    arr = np.asarray(array)
    if arr.dtype.kind != "f":
        return arr.copy()
    return np.nan_to_num(arr, copy=True, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def _has_nonfinite(chunk: np.ndarray, scratch: np.ndarray) -> bool:
    utype, magnitude, exponent = _NONFINITE_BITS[chunk.dtype]
    bits = scratch[: chunk.size]
    np.bitwise_and(chunk.view(utype), magnitude, out=bits)
    return bool(bits.max() >= exponent)


class BlobWriter:
    """Writes a weight file atomically: blobs go to a temp file in the target's directory, which replaces the
    target only on :meth:`close`, so a crash or an exception never leaves a half-written weight file behind."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        self._count = 0
        self._end = _HEADER.size
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except OSError as e:
            raise WeightFileError(
                f"weight file {self.path}: cannot create {self._tmp.name}: {e.strerror}; "
                "check that the directory exists and is writable"
            ) from e
        self._file: Optional[BinaryIO] = os.fdopen(fd, "wb")
        self._guard(self._file.write, _HEADER.pack(0, VERSION))

    def add(self, array: ArrayLike | SubByteArray) -> int:
        """Append ``array`` (in its own dtype, row-major; floats sanitized; a :class:`SubByteArray` packed) and
        return its record offset."""
        file = self._open_file()
        if isinstance(array, SubByteArray):
            return self._add_sub_byte(file, array)
        arr = np.asarray(array)
        dtype = arr.dtype.newbyteorder("<")
        code = DTYPE_CODES.get(dtype)
        if code is None:
            raise WeightFileError(
                f"weight file {self.path}: cannot store dtype {arr.dtype}; cast the array to one of {_SUPPORTED}"
            )
        if arr.size == 0:
            raise WeightFileError(
                f"weight file {self.path}: cannot store an empty array (shape {arr.shape}); coremltools cannot "
                "read empty blobs back, so drop the constant or give it inline"
            )
        flat = np.ascontiguousarray(arr, dtype=dtype).reshape(-1)
        offset = _align(self._end)
        head = bytes(offset - self._end) + _RECORD.pack(SENTINEL, code, flat.nbytes, offset + _RECORD.size, 0)
        self._guard(file.write, head)
        if dtype in _NONFINITE_BITS:
            self._write_floats(file, flat)
        else:
            self._guard(file.write, memoryview(flat))
        self._end = offset + _RECORD.size + flat.nbytes
        self._count += 1
        return offset

    def _add_sub_byte(self, file: BinaryIO, array: SubByteArray) -> int:
        if array.size == 0:
            raise WeightFileError(f"weight file {self.path}: cannot store an empty {array.dtype} array")
        data, padding = array.packed()
        offset = _align(self._end)
        head = _RECORD.pack(SENTINEL, SUB_BYTE_CODES[array.dtype], data.nbytes, offset + _RECORD.size, padding)
        self._guard(file.write, bytes(offset - self._end) + head)
        self._guard(file.write, memoryview(data))
        self._end = offset + _RECORD.size + data.nbytes
        self._count += 1
        return offset

    def _write_floats(self, file: BinaryIO, flat: np.ndarray) -> None:
        """Writes in chunks so the NaN/Inf scan and the write share the cache, and only bad chunks are copied."""
        scratch = np.empty(min(flat.size, _CHUNK), dtype=_NONFINITE_BITS[flat.dtype][0])
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            if _has_nonfinite(chunk, scratch):
                chunk = sanitize(chunk)
            self._guard(file.write, memoryview(chunk))

    def close(self) -> None:
        """Write the blob count, fsync, and move the file onto ``path``. Closing twice does nothing."""
        if self._file is None:
            return
        file = self._file
        self._guard(file.seek, 0)
        self._guard(file.write, _HEADER.pack(self._count, VERSION))
        self._guard(file.flush)
        self._guard(os.fsync, file.fileno())
        self._file = None
        file.close()
        try:
            os.replace(self._tmp, self.path)
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise WeightFileError(f"weight file {self.path}: cannot replace it: {e.strerror}; check permissions") from e
        if os.name == "posix":  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def abort(self) -> None:
        """Drop the temp file; ``path`` keeps whatever it held before."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self._tmp.unlink(missing_ok=True)

    def _open_file(self) -> BinaryIO:
        if self._file is None:
            raise WeightFileError(f"weight file {self.path}: writer is closed; open a new BlobWriter")
        return self._file

    def _guard(self, call, *args):
        """Run a file operation; on an OS error drop the temp file and report it (disk full, I/O error)."""
        try:
            return call(*args)
        except OSError as e:
            self.abort()
            raise WeightFileError(
                f"weight file {self.path}: write failed: {e}; check free space and permissions"
            ) from e

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_blob_file(path: PathLike, arrays: list[np.ndarray]) -> list[int]:
    """Write ``arrays`` to a new weight file at ``path``; returns their record offsets, in order."""
    with BlobWriter(path) as writer:
        return [writer.add(a) for a in arrays]


class BlobReader:
    """Reads a weight file, checking every field it relies on, so a bad file fails with a :class:`WeightFileError`
    that names the file and offset instead of returning garbage weights."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        with self._open() as f:
            self.size = os.fstat(f.fileno()).st_size
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise self._error(0, f"short read: the header needs 64 bytes, the file has {len(header)}; {_TRUNCATED}")
        self.count, version = _HEADER.unpack(header)
        if version != VERSION:
            raise self._error(0, f"header has version {version}, expected {VERSION}; {_NOT_V2}")

    def read(
        self, offset: int, dtype: Optional[DTypeLike | str] = None, shape: Optional[tuple[int, ...]] = None,
        data: bool = True,
    ) -> np.ndarray:
        """The array whose record is at ``offset``; ``dtype`` (a numpy dtype, or a sub-byte MIL type name such as
        ``"int4"``) and ``shape``, if given, must match the record. A sub-byte blob comes back unpacked, one value
        per int8/uint8 element. With ``data=False`` only the record and the file's length are checked and the array
        is zeros (a check of a program's weights that costs no reading)."""
        with self._open() as f:
            record_dtype, nbytes, count = self._checked(f, offset, dtype, shape)
            sub_byte = isinstance(record_dtype, str)
            holder = NUMPY_DTYPES[record_dtype] if sub_byte else record_dtype
            if not data:  # the record (checked above) vouches that its data fits in the file
                arr = np.zeros(count, dtype=holder)
                return arr if shape is None else arr.reshape(shape)
            raw = np.empty(nbytes if sub_byte else count, dtype=np.uint8 if sub_byte else holder)
            if nbytes:
                f.seek(offset + _RECORD.size)
                got = f.readinto(memoryview(raw.view(np.uint8)))
                if got != nbytes:
                    raise self._error(offset, f"short read: got {got} of {nbytes} data bytes; {_TRUNCATED}")
        arr = SubByteArray.unpack(raw, record_dtype, count).values if sub_byte else raw
        return arr if shape is None else arr.reshape(shape)

    def map(self, offset: int, dtype: Optional[DTypeLike] = None, shape: Optional[tuple[int, ...]] = None
            ) -> np.ndarray:
        """The array whose record is at ``offset`` as a read-only map of the file (checked as :meth:`read` checks
        it): no memory of its own, the OS pages it in from the file when read. The file must not be changed in
        place while the map lives (Orion's writers replace files, which leaves a mapped one intact). Sub-byte
        records are packed, so they are read, not mapped."""
        with self._open() as f:
            record_dtype, nbytes, count = self._checked(f, offset, dtype, shape)
        if isinstance(record_dtype, str):
            raise self._error(offset, f"a {record_dtype} blob is packed: read it, it cannot be mapped")
        if not nbytes:
            arr = np.empty(0, record_dtype)
        else:
            arr = np.memmap(self.path, dtype=record_dtype, mode="r", offset=offset + _RECORD.size,
                            shape=(count,)).view(np.ndarray)  # a plain array; the map lives as long as it does
        return arr if shape is None else arr.reshape(shape)

    def _checked(self, f: BinaryIO, offset: int, dtype: Optional[DTypeLike | str],
                 shape: Optional[tuple[int, ...]]) -> tuple[np.dtype | str, int, int]:
        """The record at ``offset`` (dtype, data bytes, element count), refused unless ``dtype`` and ``shape`` (when
        given) match it."""
        offset = operator.index(offset)
        record_dtype, nbytes, padding = self._record(f, offset)
        wanted = dtype if dtype is None or dtype in SUB_BYTE_BITS else np.dtype(dtype).newbyteorder("<")
        if wanted is not None and wanted != record_dtype:
            raise self._error(offset, f"blob holds {record_dtype}, not {wanted}; ask for the dtype it was written with")
        sub_byte = isinstance(record_dtype, str)
        count = (nbytes * 8 - padding) // SUB_BYTE_BITS[record_dtype] if sub_byte else nbytes // record_dtype.itemsize
        if shape is not None and math.prod(shape) != count:
            raise self._error(
                offset, f"blob holds {count} elements, shape {tuple(shape)} needs {math.prod(shape)}; fix the shape"
            )
        return record_dtype, nbytes, count

    def records(self) -> list[tuple[int, np.dtype | str, int]]:
        """``(offset, dtype, nbytes)`` of every blob (a sub-byte dtype by its MIL name), walking the records from the first one to the end of the file.

        The walk trusts the records, not the header's count (see the module docstring); a file holding fewer blobs
        than its header counts was cut short, and is refused."""
        out = []
        offset = _HEADER.size
        with self._open() as f:
            while offset < self.size:
                dtype, nbytes, _ = self._record(f, offset)
                out.append((offset, dtype, nbytes))
                offset = _align(offset + _RECORD.size + nbytes)
        if len(out) < self.count:
            raise self._error(
                0, f"header counts {self.count} blobs, the {self.size}-byte file holds {len(out)}; {_TRUNCATED}"
            )
        return out

    def _record(self, f: BinaryIO, offset: int) -> tuple[np.dtype | str, int, int]:
        """The record's dtype (a sub-byte one by name), data size and unused bits of a sub-byte blob."""
        if offset < _HEADER.size or offset % ALIGNMENT:
            raise self._error(offset, f"records start at 64 and are 64-byte aligned; {_BAD_OFFSET}")
        if offset + _RECORD.size > self.size:
            raise self._error(
                offset, f"short read: the 64-byte record runs past the end of the {self.size}-byte file; {_BAD_OFFSET}"
            )
        f.seek(offset)
        raw = f.read(_RECORD.size)
        if len(raw) < _RECORD.size:
            raise self._error(offset, f"short read: got {len(raw)} of 64 record bytes; {_TRUNCATED}")
        sentinel, code, nbytes, data_offset, padding = _RECORD.unpack(raw)
        if sentinel != SENTINEL:
            raise self._error(offset, f"bad sentinel 0x{sentinel:08X}, expected 0x{SENTINEL:08X}; {_BAD_OFFSET}")
        if code not in CODE_DTYPES and code not in CODE_SUB_BYTES:
            raise self._error(
                offset,
                f"dtype code {code} ({_dtype_name(code)}) is not supported; write the blob as one of {_SUPPORTED}",
            )
        if data_offset != offset + _RECORD.size:
            raise self._error(
                offset, f"record puts its data at {data_offset}, expected {offset + _RECORD.size}; {_CORRUPT}"
            )
        if data_offset + nbytes > self.size:
            raise self._error(
                offset,
                f"short read: {nbytes} data bytes at {data_offset} run past the end of the {self.size}-byte file; "
                + _TRUNCATED,
            )
        if code in CODE_SUB_BYTES:
            if padding >= 8 or padding > nbytes * 8 or (nbytes * 8 - padding) % SUB_BYTE_BITS[CODE_SUB_BYTES[code]]:
                raise self._error(offset, f"{CODE_SUB_BYTES[code]} blob of {nbytes} bytes with {padding} padding bits "
                                          f"holds no whole number of values; {_CORRUPT}")
            return CODE_SUB_BYTES[code], nbytes, padding
        dtype = CODE_DTYPES[code]
        if nbytes % dtype.itemsize:
            raise self._error(
                offset, f"data size {nbytes} is not a multiple of the {dtype} item size {dtype.itemsize}; {_CORRUPT}"
            )
        return dtype, nbytes, 0

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise WeightFileError(f"weight file {self.path}: cannot open: {e.strerror}; check the path") from e

    def _error(self, offset: int, problem: str) -> WeightFileError:
        return WeightFileError(f"weight file {self.path}, offset {offset}: {problem}")


def read_blob(
    path: PathLike, offset: int, dtype: Optional[DTypeLike] = None, shape: Optional[tuple[int, ...]] = None
) -> np.ndarray:
    """Read one blob from ``path``; see :meth:`BlobReader.read`."""
    return BlobReader(path).read(offset, dtype, shape)
