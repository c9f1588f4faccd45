"""Every bad input gets a clear `CheckpointError` subclass, and nothing on disk changes.

Each case asserts three things: the exact error class, that the message names the
file / prefix and/or the tensor involved, and that the directory holding the
checkpoint has the same file names and bytes after the failure as before it.
No TensorFlow is needed: bad indexes are crafted with `build_index` /
`TableBuilder` and raw bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import shardckpt
from bad_files import dat, idx, raises
from shardckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DuplicateTensorError,
    InsufficientSlicesError,
    InvalidArgumentError,
    ShapeMismatchError,
    TensorNotFoundError,
    TruncatedFileError,
    UnsupportedDTypeError,
)
from shardckpt.format import (
    BundleEntry,
    BundleHeader,
    BundleReader,
    BundleWriter,
    build_index,
    data_filename,
    index_filename,
    parse_shape_and_slice,
)
from shardckpt.format.coding import crc32c, decode_varint, mask_crc
from shardckpt.format.protos import encode_header
from shardckpt.format.table import FOOTER_SIZE, TRAILER_SIZE, TableBuilder

# --- helpers ---------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (recursively) by relative name, with its bytes."""
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@contextlib.contextmanager
def unchanged(directory: Path) -> Iterator[None]:
    """Assert that the block changes no file name and no byte under ``directory``."""
    before = snapshot(directory)
    yield
    after = snapshot(directory)
    assert sorted(after) == sorted(before), f"files changed: {sorted(before)} -> {sorted(after)}"
    for name, data in before.items():
        assert after[name] == data, f"{name} was modified"


def read_all(prefix: str | Path) -> dict[str, np.ndarray]:
    with BundleReader(prefix) as reader:
        return {name: reader.read(name) for name, _ in reader.entries()}


def write_raw(
    prefix: Path,
    entries: dict[bytes, BundleEntry],
    data: bytes | dict[int, bytes] = b"",
    header: BundleHeader | None = None,
) -> None:
    """A bundle from hand-made entries: the index via build_index, data files as given."""
    header = BundleHeader() if header is None else header
    files = data if isinstance(data, dict) else {0: data}
    for shard, content in files.items():
        Path(data_filename(str(prefix), shard, max(header.num_shards, 1))).write_bytes(content)
    Path(index_filename(str(prefix))).write_bytes(build_index(header, entries))


def write_raw_values(prefix: Path, values: dict[bytes, bytes], header: bytes | None = None) -> None:
    """An index whose entry values are arbitrary bytes (valid table, CRCs and all)."""
    table = TableBuilder()
    table.add(b"", encode_header(BundleHeader()) if header is None else header)
    for key in sorted(values):
        table.add(key, values[key])
    Path(index_filename(str(prefix))).write_bytes(table.finish())
    Path(data_filename(str(prefix), 0, 1)).write_bytes(b"")


def float_entry(arr: np.ndarray, offset: int = 0, **overrides) -> BundleEntry:
    raw = np.ascontiguousarray(arr, "<f4").tobytes()
    fields = dict(dtype=1, shape=arr.shape, offset=offset, size=len(raw), crc32c=mask_crc(crc32c(raw)))
    fields.update(overrides)
    return BundleEntry(**fields)


def footer_handles(index: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """(metaindex offset, size) and (index offset, size) from the footer."""
    pos = len(index) - FOOTER_SIZE
    limit = pos + 40
    meta_off, pos = decode_varint(index, pos, limit)
    meta_size, pos = decode_varint(index, pos, limit)
    idx_off, pos = decode_varint(index, pos, limit)
    idx_size, pos = decode_varint(index, pos, limit)
    return (meta_off, meta_size), (idx_off, idx_size)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


A = np.arange(12, dtype=np.float32).reshape(3, 4)
B = np.arange(5, dtype=np.int64) * 1000
S = np.array([b"hello", b"", b"\x00\xffz"], dtype=object)
P = np.arange(24, dtype=np.float64).reshape(4, 6)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A small bundle: plain float/int/string tensors and a tensor stored as two row slices."""
    prefix = tmp_path / "ckpt"
    with BundleWriter(prefix) as w:
        w.add("alpha_tensor", A)
        w.add("beta_tensor", B)
        w.add("string_tensor", S)
        w.add_slice("part_tensor", "4 6 0,2:-", P[0:2])
        w.add_slice("part_tensor", "4 6 2,2:-", P[2:4])
    return prefix


def test_fixture_reads_back(ckpt: Path) -> None:
    got = read_all(ckpt)
    np.testing.assert_array_equal(got["alpha_tensor"], A)
    np.testing.assert_array_equal(got["beta_tensor"], B)
    assert list(got["string_tensor"]) == list(S)
    np.testing.assert_array_equal(got["part_tensor"], P)


# --- the index file --------------------------------------------------------------------------------


def test_wrong_magic(ckpt: Path) -> None:
    flip(idx(ckpt), len(idx(ckpt).read_bytes()) - 1)
    with unchanged(ckpt.parent):
        err = raises(CorruptCheckpointError, BundleReader, ckpt, names=(str(idx(ckpt)),))
        assert "magic" in str(err)
        raises(CorruptCheckpointError, shardckpt.load_checkpoint, ckpt, names=(str(idx(ckpt)),))


@pytest.mark.parametrize("length", [0, 1, 8, 40, 47])
def test_index_shorter_than_footer(ckpt: Path, length: int) -> None:
    idx(ckpt).write_bytes(idx(ckpt).read_bytes()[:length])
    with unchanged(ckpt.parent):
        err = raises(TruncatedFileError, BundleReader, ckpt, names=(str(idx(ckpt)),))
        assert "too short" in str(err)


@pytest.mark.parametrize("where", ["minus1", "minus5", "minus8", "minus48", "minus49", "half", "49", "100"])
def test_truncated_index(ckpt: Path, where: str) -> None:
    full = idx(ckpt).read_bytes()
    n = len(full)
    cut = {
        "minus1": n - 1,
        "minus5": n - 5,
        "minus8": n - 8,
        "minus48": n - 48,
        "minus49": n - 49,
        "half": n // 2,
        "49": 49,
        "100": 100,
    }[where]
    idx(ckpt).write_bytes(full[:cut])
    with unchanged(ckpt.parent):
        err = raises(CorruptCheckpointError, BundleReader, ckpt, names=(str(idx(ckpt)),))
        assert "magic" in str(err)


def test_index_truncated_but_magic_kept(ckpt: Path) -> None:
    """A cut inside the blocks with the footer re-attached: handles now point past the table."""
    full = idx(ckpt).read_bytes()
    idx(ckpt).write_bytes(full[:50] + full[-FOOTER_SIZE:])
    with unchanged(ckpt.parent):
        raises(TruncatedFileError, BundleReader, ckpt, names=(str(idx(ckpt)),))


def test_flipped_byte_in_data_block(ckpt: Path) -> None:
    flip(idx(ckpt), 10)  # block 0 starts at offset 0 and holds the header and the first entries
    with unchanged(ckpt.parent):
        err = raises(ChecksumMismatchError, BundleReader, ckpt, names=(str(idx(ckpt)),))
        assert "checksum" in str(err)


def test_flipped_byte_in_data_block_trailer(ckpt: Path) -> None:
    index = idx(ckpt).read_bytes()
    (meta_off, _), _ = footer_handles(index)
    flip(idx(ckpt), meta_off - 2)  # the CRC of the last data block, right before the metaindex
    with unchanged(ckpt.parent):
        raises(ChecksumMismatchError, BundleReader, ckpt, names=(str(idx(ckpt)),))


def test_flipped_byte_in_index_block(ckpt: Path) -> None:
    index = idx(ckpt).read_bytes()
    _, (idx_off, idx_size) = footer_handles(index)
    flip(idx(ckpt), idx_off + idx_size // 2)
    with unchanged(ckpt.parent):
        raises(ChecksumMismatchError, BundleReader, ckpt, names=(str(idx(ckpt)),))


@pytest.mark.parametrize("byte", range(TRAILER_SIZE))
def test_flipped_byte_in_metaindex_trailer(ckpt: Path, byte: int) -> None:
    index = idx(ckpt).read_bytes()
    (meta_off, meta_size), _ = footer_handles(index)
    assert meta_size == 8  # the empty metaindex block
    flip(idx(ckpt), meta_off + meta_size + byte)
    with unchanged(ckpt.parent):
        raises(ChecksumMismatchError, BundleReader, ckpt, names=(str(idx(ckpt)),))


def test_flipped_byte_in_metaindex_block(ckpt: Path) -> None:
    index = idx(ckpt).read_bytes()
    (meta_off, _), _ = footer_handles(index)
    flip(idx(ckpt), meta_off + 1)
    with unchanged(ckpt.parent):
        raises(ChecksumMismatchError, BundleReader, ckpt, names=(str(idx(ckpt)),))


def test_corrupt_entry_proto_names_tensor(tmp_path: Path) -> None:
    """A CRC-valid index whose entry value is not a BundleEntryProto."""
    prefix = tmp_path / "ckpt"
    write_raw_values(prefix, {b"bad_proto": b"\x12\x7f"})  # shape field claims 127 bytes that are not there
    with unchanged(tmp_path):
        reader = BundleReader(prefix)
        raises(CorruptCheckpointError, reader.read, "bad_proto", names=("bad_proto", str(prefix)))
        raises(CorruptCheckpointError, lambda: list(reader.entries()), names=("bad_proto", str(prefix)))
        reader.close()


def test_corrupt_header_proto_names_file(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    write_raw_values(prefix, {}, header=b"\x1a\x05\x08")
    with unchanged(tmp_path):
        raises(CorruptCheckpointError, BundleReader, prefix, names=(str(idx(prefix)),))


def test_header_entry_missing(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    table = TableBuilder()
    table.add(b"only_a_tensor", b"")
    idx(prefix).write_bytes(table.finish())
    with unchanged(tmp_path):
        raises(CorruptCheckpointError, BundleReader, prefix, names=(str(idx(prefix)),))


def test_unreadable_version(tmp_path: Path) -> None:
    from shardckpt.format import VersionDef

    prefix = tmp_path / "ckpt"
    write_raw(prefix, {}, header=BundleHeader(version=VersionDef(producer=1, min_consumer=2)))
    with unchanged(tmp_path):
        raises(CorruptCheckpointError, BundleReader, prefix, names=(str(idx(prefix)),))


# --- the data files --------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 47, 48, -1])
def test_truncated_data_file(ckpt: Path, cut: int) -> None:
    data = dat(ckpt).read_bytes()
    dat(ckpt).write_bytes(data[:cut])
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        entries = dict(reader.entries())
        assert sorted(entries) == ["alpha_tensor", "beta_tensor", "part_tensor", "string_tensor"]
        keep = len(data[:cut])
        failed = 0
        for name in entries:
            pieces = reader.stored_slices(name)
            if all(p.entry.offset + p.entry.size <= keep for p in pieces):
                reader.read(name)
                continue
            failed += 1
            raises(TruncatedFileError, reader.read, name, names=(str(ckpt), str(dat(ckpt))))
        assert failed >= 1


def test_flipped_byte_in_tensor_data(ckpt: Path) -> None:
    with BundleReader(ckpt) as reader:
        e = reader.entry("alpha_tensor")
    flip(dat(ckpt), e.offset + 5)
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        err = raises(ChecksumMismatchError, reader.read, "alpha_tensor", names=("alpha_tensor", str(ckpt)))
        assert "checksum" in str(err).lower()
        # a partial read checks the CRC only with verify="full" (it does not read the whole entry otherwise)
        spec = "3 4 0,1:-"
        raises(ChecksumMismatchError, reader.read_slice, "alpha_tensor", spec, verify="full", names=("alpha_tensor",))
        # the other tensors are untouched, and verify=False skips the check
        np.testing.assert_array_equal(reader.read("beta_tensor"), B)
        assert not np.array_equal(reader.read("alpha_tensor", verify=False), A)


@pytest.mark.parametrize("where", ["lengths", "length_checksum", "bytes"])
def test_flipped_byte_in_string_tensor(ckpt: Path, where: str) -> None:
    with BundleReader(ckpt) as reader:
        e = reader.entry("string_tensor")
    # layout: 3 one-byte varint lengths | 4-byte length checksum | string bytes
    offset = {"lengths": 0, "length_checksum": 4, "bytes": 8}[where]
    flip(dat(ckpt), e.offset + offset)
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        try:
            reader.read("string_tensor")
        except CheckpointError as err:
            # a changed length can also make the strings run past the entry
            assert isinstance(err, (ChecksumMismatchError, CorruptCheckpointError))
            assert "string_tensor" in str(err) and str(ckpt) in str(err)
        else:
            pytest.fail("corrupt string tensor read without error")
        if where != "lengths":
            raises(ChecksumMismatchError, reader.read, "string_tensor", names=("string_tensor",))


def test_flipped_byte_in_slice_data(ckpt: Path) -> None:
    with BundleReader(ckpt) as reader:
        second = reader.stored_slices("part_tensor")[1]
    flip(dat(ckpt), second.entry.offset + 9)
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        raises(ChecksumMismatchError, reader.read, "part_tensor", names=("part_tensor", str(ckpt)))
        np.testing.assert_array_equal(reader.read_slice("part_tensor", "4 6 0,2:-"), P[0:2])


def test_missing_data_file(ckpt: Path) -> None:
    dat(ckpt).unlink()
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        assert len(list(reader.entries())) == 4  # the index alone still lists everything
        raises(CheckpointNotFoundError, reader.read, "alpha_tensor", names=(str(dat(ckpt)),))
        raises(CheckpointNotFoundError, reader.read, "part_tensor", names=(str(dat(ckpt)),))


def test_data_file_is_a_directory(ckpt: Path) -> None:
    dat(ckpt).unlink()
    dat(ckpt).mkdir()
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        raises(CheckpointNotFoundError, reader.read, "alpha_tensor", names=(str(dat(ckpt)),))


@pytest.mark.parametrize(
    "offset,size_extra",
    [(20, 0), (48, 0), (0, 4), (2**40, 0), (2**62, 0), (2**63 - 49, 0)],
)
def test_entry_runs_past_data_file(tmp_path: Path, offset: int, size_extra: int) -> None:
    prefix = tmp_path / "ckpt"
    arr = np.arange(12, dtype=np.float32)  # 48 bytes
    data = arr.tobytes()
    entry = float_entry(arr, offset=offset)
    if size_extra:  # keep size == count * itemsize: grow the shape along with the size
        arr2 = np.arange(13, dtype=np.float32)
        entry = float_entry(arr2, offset=offset)
    write_raw(prefix, {b"long_tensor": entry}, data)
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(TruncatedFileError, reader.read, "long_tensor", names=("long_tensor", str(dat(prefix))))
        raises(TruncatedFileError, reader.read_slice, "long_tensor", f"{entry.shape[0]} 1,2", names=("long_tensor",))


def test_string_entry_runs_past_data_file(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"str_tensor": BundleEntry(dtype=7, shape=(2,), offset=0, size=10**9)}, b"\x01\x01abcd")
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(TruncatedFileError, reader.read, "str_tensor", names=("str_tensor", str(dat(prefix))))


# --- entries that lie about themselves --------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(2**40, 2**40), (2**32, 2**32), (2**62, 2), (3, 2**61, 2**2), (2**63 - 1, 2)],
)
def test_shape_element_count_overflows_int64(tmp_path: Path, shape: tuple[int, ...]) -> None:
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"huge_tensor": BundleEntry(dtype=1, shape=shape, size=16)}, bytes(16))
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "huge_tensor", names=("huge_tensor", str(prefix)))
        raises(CorruptCheckpointError, reader.entry, "huge_tensor", names=("huge_tensor",))
        raises(CorruptCheckpointError, lambda: list(reader.entries()), names=("huge_tensor",))


@pytest.mark.parametrize("shape", [(0, 2**62, 2**62), (2**62, 0, 2**62), (0, 2**63 - 1)])
def test_empty_shape_that_numpy_cannot_hold(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """Zero elements, but the other dims overflow: numpy refuses the array, we must refuse cleanly."""
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"empty_huge": BundleEntry(dtype=1, shape=shape, size=0, crc32c=mask_crc(0))}, b"")
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "empty_huge", names=("empty_huge", str(prefix)))


def test_rank_beyond_numpy(tmp_path: Path) -> None:
    """TensorFlow allows rank 254, numpy 64: a clean error, not numpy's ValueError."""
    prefix = tmp_path / "ckpt"
    deep = BundleEntry(dtype=1, shape=(1,) * 70, size=4, crc32c=mask_crc(crc32c(bytes(4))))
    write_raw(prefix, {b"deep_tensor": deep}, bytes(4))
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        assert dict(reader.entries())["deep_tensor"].shape == (1,) * 70  # listing still works
        raises(CorruptCheckpointError, reader.read, "deep_tensor", names=("deep_tensor", str(prefix)))


@pytest.mark.parametrize("shape", [(-1,), (4, -1), (-(2**63),), (2, -3, 0)])
def test_negative_dims(tmp_path: Path, shape: tuple[int, ...]) -> None:
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"neg_tensor": BundleEntry(dtype=1, shape=shape, size=0)}, b"")
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "neg_tensor", names=("neg_tensor", str(prefix)))


@pytest.mark.parametrize("size", [0, 12, 20, 17, 2**40, -16])
def test_size_not_matching_shape(tmp_path: Path, size: int) -> None:
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"sized_tensor": BundleEntry(dtype=1, shape=(4,), size=size)}, bytes(64))
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "sized_tensor", names=("sized_tensor", str(prefix)))


def test_string_count_larger_than_size(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"strs": BundleEntry(dtype=7, shape=(100,), size=8)}, bytes(8))
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "strs", names=("strs", str(prefix)))


@pytest.mark.parametrize("shard_id,num_shards", [(1, 1), (2, 2), (-1, 1), (5, 0), (2**31 - 1, 3)])
def test_shard_id_out_of_range(tmp_path: Path, shard_id: int, num_shards: int) -> None:
    prefix = tmp_path / "ckpt"
    arr = np.arange(4, dtype=np.float32)
    files = {i: arr.tobytes() for i in range(max(num_shards, 1))}
    write_raw(prefix, {b"far_tensor": float_entry(arr, shard_id=shard_id)}, files, BundleHeader(num_shards=num_shards))
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "far_tensor", names=("far_tensor", str(prefix)))


@pytest.mark.parametrize("dtype,label", [(21, "DT_VARIANT"), (20, "DT_RESOURCE"), (99, "99"), (0, "0"), (-3, "-3")])
def test_unsupported_dtype_in_checkpoint(tmp_path: Path, dtype: int, label: str) -> None:
    prefix = tmp_path / "ckpt"
    write_raw(prefix, {b"odd_tensor": BundleEntry(dtype=dtype, shape=(2,), size=8)}, bytes(8))
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        err = raises(UnsupportedDTypeError, reader.read, "odd_tensor", names=("odd_tensor", str(prefix)))
        assert label in str(err)
        if dtype in (20, 21):  # DT_RESOURCE, DT_VARIANT: listed (TensorFlow lists them too), only reads refuse
            assert [name for name, _ in reader.entries()] == ["odd_tensor"]
        else:
            raises(UnsupportedDTypeError, lambda: list(reader.entries()), names=("odd_tensor",))


@pytest.mark.parametrize("dtype", [21, 20, 99, 0])
def test_unsupported_dtype_in_writer(tmp_path: Path, dtype: int) -> None:
    with unchanged(tmp_path), pytest.raises(UnsupportedDTypeError) as info, BundleWriter(tmp_path / "ckpt") as w:
        w.add("odd_tensor", np.zeros(2, np.float32), dtype=dtype)
    assert "odd_tensor" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        np.array([np.datetime64("2020-01-01")]),
        np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
        np.array([1, None], dtype=object),
    ],
    ids=["datetime", "structured", "object-none"],
)
def test_unsupported_numpy_dtype_in_writer(tmp_path: Path, value: np.ndarray) -> None:
    with unchanged(tmp_path), pytest.raises(UnsupportedDTypeError) as info, BundleWriter(tmp_path / "ckpt") as w:
        w.add("odd_tensor", value)
    assert "odd_tensor" in str(info.value) or str(value.dtype) in str(info.value)


# --- partitioned tensors in the index ---------------------------------------------------------------


def test_slice_entry_missing(tmp_path: Path) -> None:
    from shardckpt.format import TensorSlice

    prefix = tmp_path / "ckpt"
    full = BundleEntry(dtype=1, shape=(4,), slices=[TensorSlice(((0, 2),)), TensorSlice(((2, 2),))])
    write_raw(prefix, {b"lonely_part": full}, b"")
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "lonely_part", names=("lonely_part", str(prefix)))


def test_slice_outside_shape_in_index(tmp_path: Path) -> None:
    from shardckpt.format import TensorSlice

    prefix = tmp_path / "ckpt"
    full = BundleEntry(dtype=1, shape=(4,), slices=[TensorSlice(((3, 2),))])
    write_raw(prefix, {b"wide_part": full}, b"")
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "wide_part", names=("wide_part", str(prefix)))


# --- the writer --------------------------------------------------------------------------------------


def _dup_add_twice(w: BundleWriter) -> None:
    w.add("dup_tensor", A)
    w.add("dup_tensor", A)


def _dup_add_then_slice(w: BundleWriter) -> None:
    w.add("dup_tensor", P)
    w.add_slice("dup_tensor", "4 6 0,2:-", P[:2])


def _dup_slice_then_add(w: BundleWriter) -> None:
    w.add_slice("dup_tensor", "4 6 0,2:-", P[:2])
    w.add("dup_tensor", P)


def _dup_same_slice_twice(w: BundleWriter) -> None:
    w.add_slice("dup_tensor", "4 6 0,2:-", P[:2])
    w.add_slice("dup_tensor", "4 6 0,2:-", P[:2])


def _dup_full_slice_twice(w: BundleWriter) -> None:
    w.add_slice("dup_tensor", "4 6 -:-", P)
    w.add_slice("dup_tensor", "4 6 0,4:0,6", P)


DUPLICATES = [_dup_add_twice, _dup_add_then_slice, _dup_slice_then_add, _dup_same_slice_twice, _dup_full_slice_twice]


@pytest.mark.parametrize("case", DUPLICATES, ids=lambda f: f.__name__)
def test_duplicate_names_in_writer(tmp_path: Path, case) -> None:
    prefix = tmp_path / "new"
    with unchanged(tmp_path), pytest.raises(DuplicateTensorError) as info, BundleWriter(prefix) as w:
        case(w)
    assert "dup_tensor" in str(info.value) and str(prefix) in str(info.value)
    assert not idx(prefix).exists() and not dat(prefix).exists()


@pytest.mark.parametrize("case", DUPLICATES, ids=lambda f: f.__name__)
def test_duplicate_over_existing_checkpoint(ckpt: Path, case) -> None:
    """A failed rewrite of an existing prefix leaves the old checkpoint byte for byte."""
    with unchanged(ckpt.parent), pytest.raises(DuplicateTensorError), BundleWriter(ckpt) as w:
        case(w)
    np.testing.assert_array_equal(read_all(ckpt)["alpha_tensor"], A)


@pytest.mark.parametrize("case", DUPLICATES, ids=lambda f: f.__name__)
def test_duplicate_caught_then_abort(tmp_path: Path, case) -> None:
    prefix = tmp_path / "new"
    with unchanged(tmp_path):
        w = BundleWriter(prefix)
        with pytest.raises(DuplicateTensorError):
            case(w)
        assert not idx(prefix).exists() and not dat(prefix).exists()
        w.abort()


@pytest.mark.parametrize(
    "spec,shape",
    [("4 6 0,2:-", (3, 6)), ("4 6 0,2:-", (2, 5)), ("4 6 0,2:-", (2,)), ("4 6 -:1,3", (4, 6)), ("4 6 -:-", (4, 5))],
)
def test_slice_array_shape_mismatch(tmp_path: Path, spec: str, shape: tuple[int, ...]) -> None:
    with unchanged(tmp_path), pytest.raises(ShapeMismatchError) as info, BundleWriter(tmp_path / "ckpt") as w:
        w.add_slice("sliced_tensor", spec, np.zeros(shape, np.float32))
    assert "sliced_tensor" in str(info.value)


def test_slice_of_other_shape_or_dtype(tmp_path: Path) -> None:
    with unchanged(tmp_path), pytest.raises(ShapeMismatchError) as info, BundleWriter(tmp_path / "ckpt") as w:
        w.add_slice("sliced_tensor", "4 6 0,2:-", np.zeros((2, 6), np.float32))
        w.add_slice("sliced_tensor", "5 6 2,2:-", np.zeros((2, 6), np.float32))
    assert "sliced_tensor" in str(info.value)
    with unchanged(tmp_path), pytest.raises(ShapeMismatchError), BundleWriter(tmp_path / "ckpt") as w:
        w.add_slice("sliced_tensor", "4 6 0,2:-", np.zeros((2, 6), np.float32))
        w.add_slice("sliced_tensor", "4 6 2,2:-", np.zeros((2, 6), np.float64))


def test_bad_spec_in_writer(tmp_path: Path) -> None:
    with unchanged(tmp_path), pytest.raises(InvalidArgumentError) as info, BundleWriter(tmp_path / "ckpt") as w:
        w.add_slice("sliced_tensor", "4 6 0,2", np.zeros((2, 6), np.float32))
    assert "Mismatching ranks" in str(info.value)


def test_empty_name_in_writer(tmp_path: Path) -> None:
    with unchanged(tmp_path), pytest.raises(InvalidArgumentError), BundleWriter(tmp_path / "ckpt") as w:
        w.add("", A)


# --- shape_and_slice strings (spec §5) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "Need least two elements"),
        ("4", "Need least two elements"),
        ("-", "Need least two elements"),
        ("4:-", "Need least two elements"),
        ("4  -", "Non numerical dimension"),  # double space: an empty dim
        ("4 6  0,2:-", "Non numerical dimension"),
        (" 4 -", "Non numerical dimension"),
        ("a -", "Non numerical dimension"),
        ("4.0 -", "Non numerical dimension"),
        ("0x4 -", "Non numerical dimension"),
        ("9223372036854775808 -", "Non numerical dimension"),
        ("4 0,2,3", "Expected a pair of numbers or '-'"),
        ("4 0", "Expected a pair of numbers or '-'"),
        ("4 a,2", "Expected a pair of numbers or '-'"),
        ("4 0,b", "Expected a pair of numbers or '-'"),
        ("4 --", "Expected a pair of numbers or '-'"),
        ("4 0;2", "Expected a pair of numbers or '-'"),
        ("4 ,", "Expected a pair of numbers or '-'"),
        ("4 0,9223372036854775808", "Expected a pair of numbers or '-'"),
        ("4 6 0,2:-,", "Expected a pair of numbers or '-'"),
        ("4 -1,2", "Expected non-negative start and positive length"),
        ("4 0,0", "Expected non-negative start and positive length"),
        ("4 0,-1", "Expected non-negative start and positive length"),
        ("4 1,-2", "Expected non-negative start and positive length"),
        ("4 6 0,2", "Mismatching ranks"),
        ("4 0,2:-", "Mismatching ranks"),
        ("4 6 -:-:-", "Mismatching ranks"),
        ("4 6 ::", "Mismatching ranks"),
        ("4 3,2", "Extent in dimension 0 out of bounds"),
        ("4 4,1", "Extent in dimension 0 out of bounds"),
        ("4 6 0,4:5,2", "Extent in dimension 1 out of bounds"),
        ("0 0,1", "Extent in dimension 0 out of bounds"),
        ("4 9223372036854775807,1", ""),  # start + length overflows int64
        ("-4 -", ""),  # negative dimension
        ("4294967296 4294967296 -:-", ""),  # element count overflows int64
    ],
)
def test_parse_shape_and_slice_errors(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_shape_and_slice(text)
    assert type(info.value) is InvalidArgumentError
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text,shape,extents,slice_shape",
    [
        ("4 6 0,2:-", (4, 6), ((0, 2), (0, -1)), (2, 6)),
        ("4 6 0,2:-:", (4, 6), ((0, 2), (0, -1)), (2, 6)),  # trailing ':' skipped
        ("4 6 :0,2:-", (4, 6), ((0, 2), (0, -1)), (2, 6)),  # leading ':' skipped
        ("4 6 0,,2:-", (4, 6), ((0, 2), (0, -1)), (2, 6)),  # empty pieces between commas skipped
        ("4 6 ,0,2,:-", (4, 6), ((0, 2), (0, -1)), (2, 6)),
        ("4 6 0,2::-", (4, 6), ((0, 2), (0, -1)), (2, 6)),
        ("4 6 -:-", (4, 6), ((0, -1), (0, -1)), (4, 6)),
        ("+4 6 -:+1,+2", (4, 6), ((0, -1), (1, 2)), (4, 2)),
        ("0 -", (0,), ((0, -1),), (0,)),
        ("9223372036854775807 9223372036854775806,1", (2**63 - 1,), ((2**63 - 2, 1),), (1,)),
    ],
)
def test_parse_shape_and_slice_accepted(text, shape, extents, slice_shape) -> None:
    parsed = parse_shape_and_slice(text)
    assert parsed.shape == shape
    assert parsed.slice.extents == extents
    assert parsed.slice_shape == slice_shape


def test_trailing_colon_spec_round_trips(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    with BundleWriter(prefix) as w:
        w.add_slice("t", "4 6 0,2:-:", P[:2])
        w.add_slice("t", "4 6 :2,2:-", P[2:])
    with BundleReader(prefix) as reader:
        np.testing.assert_array_equal(reader.read("t"), P)
        np.testing.assert_array_equal(reader.read_slice("t", "4 6 1,2:-:"), P[1:3])


# --- reading with a spec ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["3 5 0,1:-", "4 4 -:-", "3 0,1", "3 4 2 -:-:-", "12 0,3"])
def test_read_slice_shape_mismatch(ckpt: Path, spec: str) -> None:
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        raises(ShapeMismatchError, reader.read_slice, "alpha_tensor", spec, names=("alpha_tensor", str(ckpt)))


@pytest.mark.parametrize("spec", ["3 4 0,1", "3 4 3,1:-", "3 4 x", "3 4 0,0:-"])
def test_read_slice_bad_spec(ckpt: Path, spec: str) -> None:
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader, pytest.raises(InvalidArgumentError):
        reader.read_slice("alpha_tensor", spec)


def test_read_slice_partitioned_shape_mismatch(ckpt: Path) -> None:
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        raises(ShapeMismatchError, reader.read_slice, "part_tensor", "4 7 0,2:-", names=("part_tensor",))


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    """A partitioned [4, 6] tensor of which only rows 0..2 and the block (2..4, 0..3) were saved."""
    prefix = tmp_path / "partial"
    with BundleWriter(prefix) as w:
        w.add_slice("holey_tensor", "4 6 0,2:-", P[0:2])
        w.add_slice("holey_tensor", "4 6 2,2:0,3", P[2:4, 0:3])
    return prefix


@pytest.mark.parametrize("spec", [None, "4 6 -:-", "4 6 2,2:-", "4 6 1,2:-", "4 6 3,1:2,2", "4 6 -:5,1"])
def test_insufficient_slices(partial: Path, spec: str | None) -> None:
    with unchanged(partial.parent), BundleReader(partial) as reader:
        if spec is None:
            raises(InsufficientSlicesError, reader.read, "holey_tensor", names=("holey_tensor", str(partial)))
        else:
            raises(InsufficientSlicesError, reader.read_slice, "holey_tensor", spec, names=("holey_tensor",))


@pytest.mark.parametrize(
    "spec,expect",
    [("4 6 0,2:-", P[0:2]), ("4 6 1,2:0,3", P[1:3, 0:3]), ("4 6 3,1:1,2", P[3:4, 1:3]), ("4 6 0,1:5,1", P[0:1, 5:6])],
)
def test_sufficient_slices_of_partial(partial: Path, spec: str, expect: np.ndarray) -> None:
    with BundleReader(partial) as reader:
        np.testing.assert_array_equal(reader.read_slice("holey_tensor", spec), expect)


def test_overlapping_stored_slices(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    with BundleWriter(prefix) as w:
        w.add_slice("overlap_tensor", "4 6 0,3:-", P[0:3])
        w.add_slice("overlap_tensor", "4 6 2,2:-", P[2:4])
    with unchanged(tmp_path), BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "overlap_tensor", names=("overlap_tensor", str(prefix)))
        raises(CorruptCheckpointError, reader.read_slice, "overlap_tensor", "4 6 2,1:-", names=("overlap_tensor",))
        # as TensorFlow (RestoreV2: "Overlapping slices"), even a request inside one stored slice is refused
        raises(CorruptCheckpointError, reader.read_slice, "overlap_tensor", "4 6 0,2:-", names=("overlap_tensor",))


def test_overlapping_stored_slices_after_merge(tmp_path: Path) -> None:
    a, b, dest = tmp_path / "a" / "ckpt", tmp_path / "b" / "ckpt", tmp_path / "merged"
    with BundleWriter(a) as w:
        w.add_slice("overlap_tensor", "4 6 -:0,4", P[:, 0:4])
    with BundleWriter(b) as w:
        w.add_slice("overlap_tensor", "4 6 -:3,3", P[:, 3:6])
    shardckpt.merge_bundles([a, b], dest)
    with unchanged(tmp_path), BundleReader(dest) as reader:
        raises(CorruptCheckpointError, reader.read, "overlap_tensor", names=("overlap_tensor",))


# --- names and prefixes -------------------------------------------------------------------------------


def test_tensor_not_found(ckpt: Path) -> None:
    with unchanged(ckpt.parent), BundleReader(ckpt) as reader:
        raises(TensorNotFoundError, reader.read, "no_such_tensor", names=("no_such_tensor", str(ckpt)))
        raises(TensorNotFoundError, reader.read_slice, "no_such_tensor", "3 4 -:-", names=("no_such_tensor",))
        raises(TensorNotFoundError, reader.entry, "alpha", names=("alpha",))  # a prefix of a real name
        raises(TensorNotFoundError, reader.entry, "", names=(str(ckpt),))  # the header key is no tensor
        assert not reader.has_tensor("no_such_tensor")
    with shardckpt.load_checkpoint(ckpt) as r:
        raises(TensorNotFoundError, r.get_tensor, "no_such_tensor", names=("no_such_tensor",))


def test_prefix_does_not_exist(tmp_path: Path) -> None:
    with unchanged(tmp_path):
        for prefix in [tmp_path / "nope", tmp_path / "missing_dir" / "ckpt", tmp_path / "nope.index"]:
            raises(CheckpointNotFoundError, BundleReader, prefix, names=(str(prefix).removesuffix(".index"),))
            raises(CheckpointNotFoundError, shardckpt.load_checkpoint, prefix)
        raises(CheckpointNotFoundError, shardckpt.load_checkpoint, tmp_path)  # a directory with no state file


def test_prefix_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "plain_file").write_bytes(b"x")
    with unchanged(tmp_path):
        raises(CheckpointNotFoundError, BundleReader, tmp_path / "plain_file" / "ckpt", names=("plain_file",))


def test_index_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "ckpt.index").mkdir()
    with unchanged(tmp_path):
        raises(CheckpointNotFoundError, BundleReader, tmp_path / "ckpt", names=(str(tmp_path / "ckpt"),))


def test_index_path_instead_of_prefix(ckpt: Path) -> None:
    with unchanged(ckpt.parent):
        for arg in (str(ckpt) + ".index", Path(str(ckpt) + ".index")):
            with BundleReader(arg) as reader:
                assert reader.prefix == str(ckpt)
                np.testing.assert_array_equal(reader.read("alpha_tensor"), A)
                np.testing.assert_array_equal(reader.read("part_tensor"), P)
            with shardckpt.load_checkpoint(arg) as r:
                np.testing.assert_array_equal(r.get_tensor("beta_tensor"), B)
                assert r.get_variable_to_shape_map()["alpha_tensor"] == [3, 4]


def test_errors_are_one_family() -> None:
    import shardckpt.errors

    for name in shardckpt.errors.__all__:
        assert issubclass(getattr(shardckpt.errors, name), CheckpointError), name
    assert issubclass(ChecksumMismatchError, CorruptCheckpointError)
    assert issubclass(TruncatedFileError, CorruptCheckpointError)
