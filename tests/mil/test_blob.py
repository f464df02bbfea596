"""Orion's MIL weight files against coremltools' C++ blob storage reader and writer (the independent oracle)."""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orion.errors import WeightFileError
from orion.mil.blob import (BlobReader, BlobWriter, SubByteArray, blob_record_offsets, read_blob, sanitize,
                            write_blob_file)

#: numpy dtype name -> the coremltools method suffix (``write_<x>_data`` / ``read_<x>_data``).
CT_NAMES = {
    "float16": "fp16",
    "float32": "float",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
}


@pytest.fixture(scope="module")
def ms():
    return pytest.importorskip("coremltools.libmilstoragepython")


def ct_write(ms, path: Path, arrays: list[np.ndarray]) -> list[int]:
    """Write ``arrays`` (row-major) with coremltools; fp16 goes in as its uint16 bits, as the binding wants."""
    writer = ms._BlobStorageWriter(str(path), truncate_file=True)
    offsets = []
    for a in arrays:
        name = CT_NAMES[a.dtype.name]
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(-1)
        offsets.append(getattr(writer, f"write_{name}_data")(data.view(np.uint16) if name == "fp16" else data))
    del writer  # the C++ destructor closes the file
    return offsets


def ct_read(ms, path: Path, offset: int, dtype: np.dtype) -> np.ndarray:
    name = CT_NAMES[np.dtype(dtype).name]
    out = getattr(ms._BlobStorageReader(str(path)), f"read_{name}_data")(offset)
    return out.view(np.float16) if name == "fp16" else out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def row_major(a: np.ndarray) -> np.ndarray:
    """What a weight file stores for ``a``: little-endian, C order, flat."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(-1)


def fp16_sanitized(a: np.ndarray) -> np.ndarray:
    """The reference sanitization, spelled independently of ``sanitize``."""
    out = np.where(np.isnan(a), 0, a)
    out = np.where(np.isposinf(a), 65504, out)
    return np.where(np.isneginf(a), -65504, out).astype(a.dtype)


def mixed_arrays() -> list[np.ndarray]:
    """Every supported dtype, sizes that need padding, a 0-d, a 3-d, a transposed and a big-endian array."""
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal(3).astype(np.float16),
        rng.standard_normal(5).astype(np.float32),
        rng.integers(-128, 128, 7).astype(np.int8),
        np.array([200], dtype=np.uint8),
        rng.integers(-(2**31), 2**31, 2, dtype=np.int64).astype(np.int32),
        rng.integers(-(2**15), 2**15, 33).astype(np.int16),
        rng.integers(0, 2**16, 65).astype(np.uint16),
        rng.integers(0, 2**32, 17, dtype=np.uint64).astype(np.uint32),
        rng.standard_normal((2, 3, 5)).astype(np.float16),
        np.array(2.5, dtype=np.float32),
        rng.standard_normal((4, 6)).astype(np.float32).T,
        np.arange(9, dtype=">i4"),
        rng.standard_normal(64).astype(np.float16),
    ]


# 1. coremltools reads what Orion writes


def test_coremltools_reads_orion_file(ms, tmp_path):
    arrays = mixed_arrays()
    ours = write_blob_file(tmp_path / "orion.bin", arrays)
    assert ours == ct_write(ms, tmp_path / "ct.bin", arrays) == blob_record_offsets([a.nbytes for a in arrays])
    for offset, a in zip(ours, arrays):
        assert same_bits(ct_read(ms, tmp_path / "orion.bin", offset, a.dtype), row_major(a))


# 2. Orion reads what coremltools writes


def test_orion_reads_coremltools_file(ms, tmp_path):
    arrays = mixed_arrays()
    path = tmp_path / "ct.bin"
    offsets = ct_write(ms, path, arrays)
    reader = BlobReader(path)
    assert reader.count == len(arrays)
    assert reader.records() == [(o, row_major(a).dtype, a.nbytes) for o, a in zip(offsets, arrays)]
    for offset, a in reversed(list(zip(offsets, arrays))):
        got = reader.read(offset)
        assert same_bits(got, row_major(a))
        assert got.flags.writeable and got.flags.owndata
        shaped = reader.read(offset, dtype=a.dtype, shape=a.shape)
        assert same_bits(shaped, a.astype(a.dtype.newbyteorder("<"), order="C"))
        assert same_bits(read_blob(path, offset), row_major(a))


# 3. byte-identical files


def test_same_blobs_give_byte_identical_files(ms, tmp_path):
    arrays = mixed_arrays()
    ct_write(ms, tmp_path / "ct1.bin", arrays)
    ct_write(ms, tmp_path / "ct2.bin", arrays)
    write_blob_file(tmp_path / "orion.bin", arrays)
    reference = (tmp_path / "ct1.bin").read_bytes()
    assert (tmp_path / "ct2.bin").read_bytes() == reference  # coremltools is deterministic
    assert (tmp_path / "orion.bin").read_bytes() == reference


# 4. sanitize


def test_sanitize_fp16():
    a = np.array([np.nan, np.inf, -np.inf, 1.5, -0.0, 65504, -65504, 6e-8, -np.nan], dtype=np.float16)
    before = a.copy()
    got = sanitize(a)
    want = np.array([0, 65504, -65504, 1.5, -0.0, 65504, -65504, 6e-8, 0], dtype=np.float16)
    assert same_bits(got, want)
    assert same_bits(a, before) and not np.shares_memory(a, got)


def test_sanitize_fp32_keeps_finite_values():
    a = np.array([[np.nan, np.inf], [-np.inf, 1e6], [-1e30, 0.1]], dtype=np.float32)
    want = np.array([[0, 65504], [-65504, 1e6], [-1e30, 0.1]], dtype=np.float32)
    assert same_bits(sanitize(a), want)


def test_sanitize_leaves_integers_alone():
    a = np.array([-128, 0, 127], dtype=np.int8)
    got = sanitize(a)
    assert same_bits(got, a) and not np.shares_memory(a, got)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_writer_sanitizes_every_chunk(ms, tmp_path, dtype):
    a = np.random.default_rng(1).standard_normal(2_500_001).astype(dtype)
    for i, v in zip([0, 1_048_575, 1_048_576, 2_000_000, 2_500_000], [np.nan, np.inf, -np.inf, np.nan, np.inf]):
        a[i] = v
    before = a.copy()
    (offset,) = write_blob_file(tmp_path / "w.bin", [a])
    assert same_bits(ct_read(ms, tmp_path / "w.bin", offset, a.dtype), fp16_sanitized(a))
    assert same_bits(a, before)


# 5. error paths


@pytest.fixture
def valid(tmp_path):
    arrays = [
        np.arange(5, dtype=np.float16),
        np.zeros(200, np.int8),
        np.arange(7, dtype=np.float32),
    ]
    path = tmp_path / "valid.bin"
    return path, write_blob_file(path, arrays), arrays


def test_truncated_file_raises_at_every_cut(valid, tmp_path):
    path, offsets, arrays = valid
    data = path.read_bytes()
    cut_path = tmp_path / "cut.bin"
    for cut in range(len(data)):
        cut_path.write_bytes(data[:cut])
        if cut < 64:
            with pytest.raises(WeightFileError, match=r"cut\.bin, offset 0: short read"):
                BlobReader(cut_path)
            continue
        reader = BlobReader(cut_path)  # the header's count is not checked until the records are walked
        with pytest.raises(WeightFileError, match=r"short read|header counts 3 blobs, the \d+-byte file holds [0-2]"):
            reader.records()
        with pytest.raises(WeightFileError, match=rf"cut\.bin, offset {offsets[-1]}: short read"):
            reader.read(offsets[-1])
        for offset, a in zip(offsets, arrays):
            try:
                assert same_bits(reader.read(offset), a)
            except WeightFileError as e:
                assert f"offset {offset}" in str(e)


def test_missing_file(tmp_path):
    with pytest.raises(WeightFileError, match="nope.bin"):
        BlobReader(tmp_path / "nope.bin")


def patched(path: Path, at: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    out = path.with_name("patched.bin")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("version", [1, 3])
def test_bad_version(valid, version):
    with pytest.raises(WeightFileError, match=rf"patched\.bin, offset 0: header has version {version}, expected 2"):
        BlobReader(patched(valid[0], 4, "<I", version))


def test_header_overcount_is_refused_by_the_walk_not_by_a_read(valid):
    """Reading at an offset never consults the count; walking every record finds the file short of it."""
    path, offsets, arrays = valid
    reader = BlobReader(patched(path, 0, "<I", 1000))
    assert same_bits(reader.read(offsets[2]), arrays[2])
    size = path.stat().st_size
    with pytest.raises(WeightFileError, match=rf"patched\.bin, offset 0: header counts 1000 blobs, the {size}-byte "
                                              "file holds 3; the file is truncated"):
        reader.records()


@pytest.mark.parametrize("count", [0, 1, 2])
def test_header_undercount_reads_every_record(ms, tmp_path, count):
    """Other tools' files undercount (a public fused-QKV kernel's file says 1 blob and holds 3, and runs on
    hardware): every record is read at its offset, and the walk finds all of them."""
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((6, 5)).astype(np.float16), rng.standard_normal(33).astype(np.float32),
              rng.standard_normal((4, 4)).astype(np.float16)]
    full = tmp_path / "qkv.bin"
    offsets = ct_write(ms, full, arrays)
    path = patched(full, 0, "<I", count)
    assert struct.unpack_from("<I", path.read_bytes())[0] == count
    reader = BlobReader(path)
    assert reader.count == count
    assert reader.records() == [(o, a.dtype, a.nbytes) for o, a in zip(offsets, arrays)]
    for offset, a in zip(offsets, arrays):
        assert same_bits(reader.read(offset, a.dtype, a.shape), a)
        assert same_bits(ct_read(ms, path, offset, a.dtype), row_major(a))  # coremltools ignores the count too


@pytest.mark.parametrize(
    "field, fmt, value, match",
    [
        (0, "<I", 0xDEADBEEE, "bad sentinel 0xDEADBEEE"),
        (4, "<I", 99, r"dtype code 99 \(unknown\)"),
        (4, "<I", 16, r"dtype code 16 \(fp8e4m3fn\)"),
        (4, "<I", 5, r"dtype code 5 \(bf16\)"),
        (4, "<I", 2, "not a multiple of the float32 item size"),  # the 10-byte fp16 blob relabelled fp32
        (8, "<Q", 5, "not a multiple of the float16 item size"),
        (8, "<Q", 2**64 - 1, "short read"),
        (8, "<Q", 10_000, "short read"),
        (16, "<Q", 0, "data at 0, expected 128"),
        (16, "<Q", 192, "data at 192, expected 128"),
    ],
)
def test_corrupt_record(valid, field, fmt, value, match):
    path, offsets, _ = valid
    bad = patched(path, offsets[0] + field, fmt, value)
    reader = BlobReader(bad)
    with pytest.raises(WeightFileError, match=rf"patched\.bin, offset 64: .*{match}"):
        reader.read(64)
    with pytest.raises(WeightFileError, match=rf"offset 64: .*{match}"):
        reader.records()


@pytest.mark.parametrize(
    "field, fmt, value, match",
    [
        (0, "<I", 0x12345678, "bad sentinel 0x12345678, expected 0xDEADBEEF"),
        (8, "<Q", 4096, "short read: 4096 data bytes at {data} run past the end of the {size}-byte file"),
        (16, "<Q", 64, "record puts its data at 64, expected {data}"),
    ],
)
@pytest.mark.parametrize("which", [1, 2])
def test_damaged_later_record_names_file_offset_and_finding(valid, field, fmt, value, match, which):
    """A damaged record past the first, in a file whose header undercounts: the error names the file, the record's
    offset and what was found there; the records before it still read."""
    path, offsets, arrays = valid
    offset = offsets[which]
    bad = patched(patched(path, 0, "<I", 1), offset + field, fmt, value)
    want = re.escape(f"weight file {bad}, offset {offset}: "
                     + match.format(data=offset + 64, size=bad.stat().st_size))
    reader = BlobReader(bad)
    with pytest.raises(WeightFileError, match=want):
        reader.read(offset)
    with pytest.raises(WeightFileError, match=want):
        reader.records()
    for earlier in range(which):
        assert same_bits(reader.read(offsets[earlier]), arrays[earlier])


def test_bad_offsets(valid):
    path, offsets, _ = valid
    size = path.stat().st_size
    inside_data = offsets[1] + 128  # 64-byte aligned, within the 200 zero bytes of the int8 blob
    reader = BlobReader(path)
    for offset in [0, 1, 63, 65, 100, -64, offsets[1] - 64, inside_data, size, size + 64, 10**20]:
        with pytest.raises(WeightFileError, match=rf"valid\.bin, offset {offset}: "):
            reader.read(offset)


def test_unaligned_offset_is_refused_even_if_a_record_is_there(tmp_path):
    data = np.zeros(200, np.uint8)
    fake = 64 + 64 + 3  # inside the blob's data, not 64-byte aligned
    data[3 : 3 + 32] = np.frombuffer(struct.pack("<IIQQQ", 0xDEADBEEF, 3, 1, fake + 64, 0), np.uint8)
    path = tmp_path / "w.bin"
    write_blob_file(path, [data])
    with pytest.raises(WeightFileError, match=rf"offset {fake}: records start at 64 and are 64-byte aligned"):
        read_blob(path, fake)


def test_dtype_and_shape_must_match(valid):
    path, offsets, _ = valid
    reader = BlobReader(path)
    assert same_bits(reader.read(offsets[2], dtype=np.float32, shape=(7, 1)), np.arange(7, dtype=np.float32)[:, None])
    with pytest.raises(WeightFileError, match=f"offset {offsets[2]}: blob holds float32, not float16"):
        reader.read(offsets[2], dtype=np.float16)
    with pytest.raises(WeightFileError, match=r"blob holds 7 elements, shape \(2, 4\) needs 8"):
        reader.read(offsets[2], shape=(2, 4))


@pytest.mark.parametrize(
    "array",
    [np.zeros(3), np.zeros(3, bool), np.zeros(3, np.int64), np.zeros(3, np.complex64), np.array([None, 1])],
)
def test_writer_rejects_unsupported_dtypes(tmp_path, array):
    with BlobWriter(tmp_path / "w.bin") as writer:
        with pytest.raises(WeightFileError, match=rf"w\.bin: cannot store dtype {array.dtype}"):
            writer.add(array)
        assert writer.add(np.ones(2, np.float16)) == 64  # the writer is still usable
    assert BlobReader(tmp_path / "w.bin").records() == [(64, np.dtype(np.float16), 4)]


def test_coremltools_cannot_read_its_own_empty_blob(ms, tmp_path):
    """Why the writer refuses empty arrays; the reader still accepts coremltools' size-0 records."""
    path = tmp_path / "ct.bin"
    offsets = ct_write(ms, path, [np.zeros(0, np.float16), np.ones(3, np.float16), np.zeros(0, np.int8)])
    with pytest.raises(ValueError):
        ct_read(ms, path, offsets[0], np.float16)
    reader = BlobReader(path)
    assert reader.records() == [(64, np.float16, 0), (128, np.float16, 6), (256, np.int8, 0)]
    assert same_bits(reader.read(offsets[0], shape=(0, 4)), np.zeros((0, 4), np.float16))
    assert same_bits(reader.read(offsets[2]), np.zeros(0, np.int8))
    with BlobWriter(tmp_path / "w.bin") as writer:
        for shape in [(0,), (3, 0)]:
            with pytest.raises(WeightFileError, match=re.escape(f"empty array (shape {shape})")):
                writer.add(np.zeros(shape, np.float16))


def test_add_after_close(tmp_path):
    writer = BlobWriter(tmp_path / "w.bin")
    writer.close()
    writer.close()
    with pytest.raises(WeightFileError, match="closed"):
        writer.add(np.ones(1, np.float16))


# 6. atomicity


def test_exception_leaves_existing_file_untouched(tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"old weights")
    with pytest.raises(RuntimeError):
        with BlobWriter(target) as writer:
            writer.add(np.ones(1000, np.float16))
            temps = [p.name for p in tmp_path.iterdir() if p != target]
            assert len(temps) == 1 and temps[0].endswith(".tmp")  # written beside the target, not over it
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_exception_creates_no_file(tmp_path):
    with pytest.raises(WeightFileError):
        with BlobWriter(tmp_path / "w.bin") as writer:
            writer.add(np.zeros(2, np.float64))
    assert list(tmp_path.iterdir()) == []


def test_target_replaced_only_on_close_after_fsync(ms, tmp_path, monkeypatch):
    target = tmp_path / "w.bin"
    target.write_bytes(b"old weights")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    writer = BlobWriter(target)
    offset = writer.add(np.arange(3, dtype=np.float32))
    assert target.read_bytes() == b"old weights"
    writer.close()
    assert events[:2] == ["fsync", "replace"]
    assert same_bits(ct_read(ms, target, offset, np.float32), np.arange(3, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


# 7. property: random blob lists round-trip through both pairs of writer and reader


@st.composite
def blob_arrays(draw) -> np.ndarray:
    """Any bit pattern (NaNs with payloads, infinities, subnormals) of a random dtype and size."""
    dtype = np.dtype(draw(st.sampled_from([np.float16, np.float32, np.int8, np.uint8, np.int32])))
    n = draw(st.integers(0, 300))
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).copy()


@settings(max_examples=60, deadline=None)
@given(st.lists(blob_arrays(), min_size=1, max_size=6))
def test_round_trip_property(ms, arrays):
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = Path(d) / "orion.bin", Path(d) / "ct.bin"
        # coremltools writer -> Orion reader, empty blobs included: raw bits back, no sanitizing on read.
        offsets = ct_write(ms, theirs, arrays)
        assert blob_record_offsets([a.nbytes for a in arrays]) == offsets
        reader = BlobReader(theirs)
        assert [o for o, _, _ in reader.records()] == offsets
        for offset, a in zip(offsets, arrays):
            assert same_bits(reader.read(offset), a)
        # Orion writer -> coremltools reader: empty arrays are refused, the rest arrive sanitized.
        with BlobWriter(ours) as writer:
            for a in arrays:
                if a.size == 0:
                    with pytest.raises(WeightFileError):
                        writer.add(a)
        kept = [a for a in arrays if a.size]
        written = write_blob_file(ours, kept)
        assert written == ct_write(ms, theirs, kept)
        for offset, a in zip(written, kept):
            want = fp16_sanitized(a) if a.dtype.kind == "f" else a
            assert same_bits(ct_read(ms, ours, offset, a.dtype), want)


def test_a_check_without_data_refuses_the_same_truncations_as_a_read(valid, tmp_path):
    """``read(data=False)`` (the emulator's compile-time check) reads no data but refuses every file a full read
    refuses, and gives zeros of the record's shape otherwise."""
    path, offsets, arrays = valid
    data = path.read_bytes()
    cut_path = tmp_path / "cut.bin"
    for cut in range(64 + 3 * 64, len(data) + 1):
        cut_path.write_bytes(data[:cut])
        try:
            reader = BlobReader(cut_path)
        except WeightFileError:
            continue
        for offset, array in zip(offsets, arrays):
            try:
                full = reader.read(offset, array.dtype, array.shape)
            except WeightFileError:
                with pytest.raises(WeightFileError):
                    reader.read(offset, array.dtype, array.shape, data=False)
                continue
            np.testing.assert_array_equal(full, array)
            checked = reader.read(offset, array.dtype, array.shape, data=False)
            assert checked.shape == array.shape and checked.dtype == array.dtype and not checked.any()


def test_orion_reads_a_file_coremltools_appended_to(ms, tmp_path):
    """coremltools' writer reopened without truncation appends after the last blob and updates the count."""
    path = tmp_path / "ct.bin"
    first, second = np.arange(5, dtype=np.float16) - 2.5, np.arange(3, dtype=np.float32) * 0.75 + 1
    (o1,) = ct_write(ms, path, [first])
    writer = ms._BlobStorageWriter(str(path), truncate_file=False)
    o2 = writer.write_float_data(second)
    del writer
    reader = BlobReader(path)
    assert reader.count == 2 and reader.records() == [(o1, first.dtype, first.nbytes), (o2, second.dtype, 12)]
    assert same_bits(reader.read(o1), first) and same_bits(reader.read(o2), second)


# ---------------------------------------------------------------------------------------------------------------------
# Sub-byte types (compressed weights' data and palette indices): packed as coremltools' writer packs them

SUB_BYTE_RANGES = {"int4": (-8, 7), "uint1": (0, 1), "uint2": (0, 3), "uint3": (0, 7), "uint4": (0, 15),
                   "uint6": (0, 63)}


def sub_byte_arrays(count: int, seed: int = 0) -> dict[str, SubByteArray]:
    """Every sub-byte type with ``count`` values spanning its whole range (both ends included)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (low, high) in SUB_BYTE_RANGES.items():
        values = rng.integers(low, high + 1, count)
        values[:2] = [low, high][:count]
        out[name] = SubByteArray(values.astype(np.int8 if low < 0 else np.uint8), name)
    return out


@pytest.mark.parametrize("count", [1, 5, 37, 64])
def test_sub_byte_files_equal_coremltools_bytes_both_ways(ms, tmp_path, count):
    """Orion's file is byte-identical to coremltools' for the same values (padding bits included), coremltools reads
    Orion's values back, and Orion reads coremltools' back."""
    arrays = sub_byte_arrays(count, seed=count)
    with BlobWriter(tmp_path / "ours.bin") as writer:
        ours = {name: writer.add(a) for name, a in arrays.items()}
    writer = ms._BlobStorageWriter(str(tmp_path / "ct.bin"), truncate_file=True)
    theirs = {name: getattr(writer, f"write_{name}_data")(a.values) for name, a in arrays.items()}
    del writer
    assert ours == theirs
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ct.bin").read_bytes()
    ct_reader = ms._BlobStorageReader(str(tmp_path / "ours.bin"))
    reader = BlobReader(tmp_path / "ct.bin")
    for name, a in arrays.items():
        assert np.array_equal(getattr(ct_reader, f"read_{name}_data")(ours[name]), a.values)
        back = reader.read(theirs[name], dtype=name, shape=(count,))
        assert back.dtype == a.values.dtype and np.array_equal(back, a.values)
    assert [(o, d) for o, d, _ in reader.records()] == [(theirs[n], n) for n in arrays]


def test_sub_byte_packing_is_least_significant_bits_first(tmp_path):
    """The layout itself, written out by hand: int4 [1, -2, 3] is 0x1 | 0xE << 4, then 0x3; 4 padding bits."""
    with BlobWriter(tmp_path / "w.bin") as writer:
        writer.add(SubByteArray(np.array([1, -2, 3], np.int8), "int4"))
    raw = (tmp_path / "w.bin").read_bytes()
    _, code, size, _, padding = struct.unpack_from("<IIQQQ", raw, 64)
    assert (code, size, padding) == (8, 2, 4)
    assert raw[128:130] == bytes([0xE1, 0x03])


def test_sub_byte_values_out_of_range_or_read_as_another_type_are_refused(tmp_path):
    with pytest.raises(WeightFileError, match=r"uint2 values must lie in \[0, 3\], got \[0, 4\]"):
        SubByteArray(np.array([0, 4], np.uint8), "uint2")
    with BlobWriter(tmp_path / "w.bin") as writer:
        writer.add(SubByteArray(np.array([1, 2, 3], np.uint8), "uint4"))
    with pytest.raises(WeightFileError, match="blob holds uint4, not int4"):
        read_blob(tmp_path / "w.bin", 64, dtype="int4")
    with pytest.raises(WeightFileError, match="blob holds uint4, not uint8"):
        read_blob(tmp_path / "w.bin", 64, dtype=np.uint8)
    bad = patched(tmp_path / "w.bin", 64 + 24, "<Q", 3)  # 16 bits minus 3 is no whole number of 4-bit values
    with pytest.raises(WeightFileError, match="holds no whole number of values"):
        BlobReader(bad).read(64)


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a map of a file (somewhere down its chain of bases)."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_a_map_holds_what_a_read_gives_and_no_memory_of_its_own(ms, tmp_path):
    arrays = mixed_arrays()
    path = tmp_path / "w.bin"
    offsets = write_blob_file(path, arrays)
    reader = BlobReader(path)
    for a, offset in zip(arrays, offsets):
        mapped = reader.map(offset, dtype=a.dtype.newbyteorder("<"), shape=a.shape)
        assert type(mapped) is np.ndarray and is_mapped(mapped) and not mapped.flags.writeable
        assert same_bits(mapped, reader.read(offset, dtype=a.dtype.newbyteorder("<"), shape=a.shape))
        assert same_bits(mapped, ct_read(ms, path, offset, a.dtype).reshape(a.shape))  # what coremltools reads
    old = reader.map(offsets[-1])
    write_blob_file(path, [np.zeros(64, np.float16)])  # Orion's writers replace the file: the old map is intact
    assert same_bits(old, arrays[-1])


def test_a_map_is_checked_like_a_read(valid, tmp_path):
    path, offsets, _ = valid
    reader = BlobReader(path)
    with pytest.raises(WeightFileError, match=f"offset {offsets[2]}: blob holds float32, not float16"):
        reader.map(offsets[2], dtype=np.float16)
    with pytest.raises(WeightFileError, match=r"blob holds 7 elements, shape \(2, 4\) needs 8"):
        reader.map(offsets[2], shape=(2, 4))
    with pytest.raises(WeightFileError, match="records start at 64"):
        reader.map(offsets[2] + 1)
    packed = tmp_path / "p.bin"
    offset, = write_blob_file(packed, [SubByteArray(np.array([1, -2, 3], np.int8), "int4")])
    with pytest.raises(WeightFileError, match="int4 blob is packed: read it, it cannot be mapped"):
        BlobReader(packed).map(offset)
