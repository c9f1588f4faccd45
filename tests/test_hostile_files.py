"""Hostile files: nothing a checkpoint directory holds can hang a reader, make it read without bound, or make
it do work out of proportion to the bytes on disk; and stored slices that overlap are refused on every path.

Special files (FIFOs, devices) are refused before they are opened for a blocking read.  FIFO tests keep a
background "unblocker" that opens each FIFO for writing whenever a reader waits on it, so a reader that does
block gets end-of-file and fails the assertion instead of hanging the suite.  The one test whose old failure
was an unbounded read runs in a child process with a capped address space.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import shardckpt as sc
from bad_files import dat, idx, raises
from shardckpt import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidArgumentError,
    NotARegularFileError,
    ShapeMismatchError,
    cli,
)
from shardckpt.coordination.local import LocalCoordinator
from shardckpt.format import BundleEntry, BundleHeader, BundleReader, BundleWriter, build_index, slices
from shardckpt.format import reader as reader_module
from shardckpt.format.block import BlockBuilder
from shardckpt.format.coding import crc32c, mask_crc
from shardckpt.format.protos import encode_header
from shardckpt.format.slices import TensorSlice, encode_slice_key
from shardckpt.format.table import MAGIC, Table, TableBuilder

A = np.arange(12, dtype=np.float32).reshape(3, 4)
P = np.arange(24, dtype=np.float64).reshape(4, 6)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    prefix = tmp_path / "ckpt"
    with BundleWriter(prefix) as w:
        w.add("alpha", A)
        w.add_slice("part", "4 6 0,2:-", P[0:2])
        w.add_slice("part", "4 6 2,2:-", P[2:4])
    return prefix


@contextlib.contextmanager
def unblocker(*fifos: Path) -> Iterator[None]:
    """While the block runs, open each FIFO for writing (and close it at once) whenever a reader waits on it,
    so a reader stuck in a blocking open gets end-of-file instead of hanging the test run."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.05):
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader is waiting
                    continue
                os.close(fd)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out + err


# --- 1. FIFOs -----------------------------------------------------------------------------------------


def test_fifo_as_index_is_refused_by_every_reader(ckpt: Path) -> None:
    make_fifo(idx(ckpt))
    with unblocker(idx(ckpt)):
        for fn in (BundleReader, sc.load_checkpoint, sc.list_variables):
            err = raises(NotARegularFileError, fn, ckpt, names=(str(ckpt), str(idx(ckpt))))
            assert "not a regular file" in str(err)


def test_fifo_as_index_fails_every_cli_command(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_fifo(idx(ckpt))
    with unblocker(idx(ckpt)):
        for argv, want in [
            (["inspect", str(ckpt)], 1),
            (["verify", "-q", str(ckpt)], 1),
            (["diff", "-q", str(ckpt), str(ckpt)], 2),
            (["convert", "-q", str(ckpt), str(tmp_path / "out.safetensors")], 1),
        ]:
            code, text = run_cli(argv, capsys)
            assert code == want, (argv, text)
            assert "not a regular file" in text and str(idx(ckpt)) in text, (argv, text)
    assert not (tmp_path / "out.safetensors").exists()


def test_fifo_as_data_file_is_refused_when_read(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_fifo(dat(ckpt))
    with unblocker(dat(ckpt)):
        with BundleReader(ckpt) as reader:  # the index alone is fine: listing works
            assert sorted(name for name, _ in reader.entries()) == ["alpha", "part"]
            raises(NotARegularFileError, reader.read, "alpha", names=(str(ckpt), "alpha", str(dat(ckpt))))
            raises(NotARegularFileError, reader.read, "part", names=(str(ckpt), "part", str(dat(ckpt))))
        with BundleReader(ckpt, mmap=True) as reader:
            raises(NotARegularFileError, reader.read, "alpha", names=(str(dat(ckpt)),))
        with sc.load_checkpoint(ckpt) as r:
            raises(NotARegularFileError, r.get_tensor, "alpha", names=(str(dat(ckpt)),))
        code, text = run_cli(["inspect", str(ckpt)], capsys)
        assert code == 0, text
        code, text = run_cli(["verify", "-q", str(ckpt)], capsys)
        assert code == 1 and "not a regular file" in text and str(dat(ckpt)) in text, text
        code, text = run_cli(["diff", "-q", str(ckpt), str(ckpt)], capsys)
        assert code == 2 and "not a regular file" in text, text


def test_fifo_as_checkpoint_state_file_is_refused(ckpt: Path) -> None:
    state = ckpt.parent / "checkpoint"
    os.mkfifo(state)
    with unblocker(state):
        raises(NotARegularFileError, sc.load_checkpoint, ckpt.parent, names=(str(state),))
        raises(NotARegularFileError, sc.latest_checkpoint, ckpt.parent, names=(str(state),))


def test_symlinks_to_regular_files_still_read(ckpt: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "real"
    elsewhere.mkdir()
    for path in (idx(ckpt), dat(ckpt)):
        target = elsewhere / path.name
        path.rename(target)
        path.symlink_to(target)
    for mmap in (False, True):
        with BundleReader(ckpt, mmap=mmap) as reader:
            np.testing.assert_array_equal(reader.read("alpha"), A)
            np.testing.assert_array_equal(reader.read("part"), P)


# --- 2. devices and files whose size is not their length ------------------------------------------


def test_index_symlinked_to_dev_zero_is_refused_without_reading(ckpt: Path) -> None:
    idx(ckpt).unlink()
    idx(ckpt).symlink_to("/dev/zero")
    # In a child whose address space is capped: an unbounded read ends there as MemoryError.
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from shardckpt.format import BundleReader\n"
        "try:\n"
        "    BundleReader(sys.argv[1])\n"
        "except BaseException as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("NotARegularFileError"), out.stdout + out.stderr
    assert str(idx(ckpt)) in out.stdout and "not a regular file" in out.stdout


def test_data_file_symlinked_to_a_device_is_refused(ckpt: Path) -> None:
    dat(ckpt).unlink()
    dat(ckpt).symlink_to("/dev/zero")
    with BundleReader(ckpt) as reader:
        raises(NotARegularFileError, reader.read, "alpha", names=(str(ckpt), "alpha", str(dat(ckpt))))


def test_index_read_stops_at_the_size_fstat_reports(ckpt: Path) -> None:
    # /proc files are regular but report size 0 while yielding bytes: only the 0 bytes fstat promised are read.
    idx(ckpt).unlink()
    idx(ckpt).symlink_to("/proc/self/status")
    err = raises(sc.TruncatedFileError, BundleReader, ckpt, names=(str(idx(ckpt)),))
    assert "0 bytes" in str(err)


# --- 3. the index table: block handles and key order ----------------------------------------------


def _trailer(block: bytes) -> bytes:
    return b"\x00" + struct.pack("<I", mask_crc(crc32c(b"\x00", crc32c(block))))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _handle(offset: int, size: int) -> bytes:
    return _varint(offset) + _varint(size)


def _block(entries: list[tuple[bytes, bytes]], interval: int = 16) -> bytes:
    b = BlockBuilder(interval)
    for k, v in entries:
        b.add(k, v)
    return b.finish()


def assemble_table(data_blocks: list[bytes], index: Callable[[list[tuple[int, int]]], list[tuple[bytes, bytes]]],
                   meta_at: int | None = None) -> bytes:
    """A table of ``data_blocks`` (each followed by its trailer) whose index block entries are
    ``index(handles)``, given the true (offset, size) of every data block."""
    out, handles = b"", []
    for raw in data_blocks:
        handles.append((len(out), len(raw)))
        out += raw + _trailer(raw)
    meta = _block([])
    meta_handle = (len(out), len(meta))
    out += meta + _trailer(meta)
    index_raw = _block(index(handles), interval=1)
    index_handle = (len(out), len(index_raw))
    out += index_raw + _trailer(index_raw)
    handles_bytes = _handle(*meta_handle) + _handle(*index_handle)
    return out + handles_bytes + bytes(40 - len(handles_bytes)) + MAGIC


HEADER = encode_header(BundleHeader())


def _names(n: int, start: int = 0) -> list[bytes]:
    return [b"t%06d" % i for i in range(start, start + n)]


def test_a_repeated_index_handle_is_refused_at_open(tmp_path: Path) -> None:
    """24 KB of index that would yield a million entries: one data block, its handle listed 1000 times."""
    entries = [(b"", HEADER)] + [(k, b"") for k in _names(999)]
    table = assemble_table([_block(entries)],
                           lambda hs: [(b"u%06d" % i, _handle(*hs[0])) for i in range(1000)])
    assert len(table) < 40_000
    prefix = tmp_path / "ckpt"
    idx(prefix).write_bytes(table)
    dat(prefix).write_bytes(b"")
    err = raises(CorruptCheckpointError, BundleReader, prefix, names=(str(idx(prefix)),))
    assert "handle" in str(err)


def _two_blocks(first: list[bytes], second: list[bytes]) -> list[bytes]:
    return [_block([(b"", HEADER)] + [(k, b"") for k in first]), _block([(k, b"") for k in second])]


BAD_TABLES: dict[str, Callable[[], bytes]] = {
    # offsets must grow and blocks may not share bytes
    "decreasing handles": lambda: assemble_table(
        _two_blocks(_names(3), _names(3, 3))[::-1],
        lambda hs: [(b"t000002", _handle(*hs[1])), (b"u", _handle(*hs[0]))]),
    "overlapping handles": lambda: assemble_table(
        _two_blocks(_names(3), _names(3, 3)),
        lambda hs: [(b"t000002", _handle(hs[0][0], hs[0][1])), (b"u", _handle(hs[0][0] + 4, hs[1][1]))]),
    "handle into the footer": lambda: assemble_table(
        _two_blocks(_names(3), _names(3, 3)),
        lambda hs: [(b"t000002", _handle(*hs[0])), (b"u", _handle(hs[1][0], hs[1][1] + 10_000))]),
    "huge handle": lambda: assemble_table(
        _two_blocks(_names(3), _names(3, 3)),
        lambda hs: [(b"t000002", _handle(*hs[0])), (b"u", _handle(2**63, 2**63))]),
    # keys must grow across blocks: block 2's keys sort before block 1's, separators claim otherwise
    "keys decrease across blocks": lambda: assemble_table(
        _two_blocks(_names(3, 10), _names(3)),
        lambda hs: [(b"t000012", _handle(*hs[0])), (b"u", _handle(*hs[1]))]),
    "index keys not increasing": lambda: assemble_table(
        _two_blocks(_names(3), _names(3, 3)),
        lambda hs: [(b"u", _handle(*hs[0])), (b"u", _handle(*hs[1]))]),
    "key above its separator": lambda: assemble_table(
        _two_blocks(_names(3), _names(3, 3)),
        lambda hs: [(b"t000001", _handle(*hs[0])), (b"u", _handle(*hs[1]))]),
    "keys decrease inside a block": lambda: assemble_table(
        [_block([(b"", HEADER), (b"t2", b""), (b"t1", b"")])], lambda hs: [(b"u", _handle(*hs[0]))]),
    "duplicate key inside a block": lambda: assemble_table(
        [_block([(b"", HEADER), (b"t1", b""), (b"t1", b"")])], lambda hs: [(b"u", _handle(*hs[0]))]),
    # one restart for thousands of entries, each key one byte longer than the last: quadratic key bytes
    "sparse restarts": lambda: assemble_table(
        [_block([(b"", HEADER)] + [(b"t" + b"x" * i, b"") for i in range(6000)], interval=10**9)],
        lambda hs: [(b"u", _handle(*hs[0]))]),
}


def open_and_list(prefix: Path) -> None:
    with BundleReader(prefix) as reader:
        for _ in reader.raw_entries():
            pass


# Faults of the index block itself are found when the table is opened; those of a data block when the
# block is first loaded, before any of its entries is returned.
AT_OPEN = {"decreasing handles": CorruptCheckpointError, "overlapping handles": CorruptCheckpointError,
           "handle into the footer": sc.TruncatedFileError, "huge handle": sc.TruncatedFileError,
           "index keys not increasing": CorruptCheckpointError}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_malformed_index_tables_are_refused_before_their_entries_are_used(tmp_path: Path, case: str) -> None:
    prefix = tmp_path / "ckpt"
    idx(prefix).write_bytes(BAD_TABLES[case]())
    dat(prefix).write_bytes(b"")
    if case in AT_OPEN:
        raises(AT_OPEN[case], BundleReader, prefix, names=(str(idx(prefix)),))
    else:
        raises(CorruptCheckpointError, open_and_list, prefix, names=(str(idx(prefix)),))


def test_valid_multi_block_tables_still_read(tmp_path: Path) -> None:
    keys = sorted(os.urandom(random.Random(7).randrange(1, 40)) + b"%05d" % i for i in range(3000))
    builder = TableBuilder(block_size=512)
    for k in [b""] + keys:
        builder.add(k, k[::-1])
    data = builder.finish()
    table = Table(data, "t.index")
    assert [k for k, _ in table] == [b""] + keys
    rng = random.Random(3)
    for k in rng.sample(keys, 300):
        assert table.get(k) == k[::-1]
        assert table.get(k + b"\x00") is None
        assert next(iter(table.seek(k)))[0] == k
    empty = TableBuilder().finish()  # no data block at all: an empty index block
    assert list(Table(empty, "e.index")) == []


# --- 4. overlapping stored slices -----------------------------------------------------------------


def _write_overlapping(prefix: Path) -> None:
    """``t`` [4, 3] float32 stored as rows 0:2, rows 2:4 and rows 1:3 (which overlaps both)."""
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    pieces = {"0,2:-": full[0:2], "2,2:-": full[2:4], "1,2:-": full[1:3] + 100}
    data, entries, extents = b"", {}, []
    for spec, arr in pieces.items():
        raw = arr.astype("<f4").tobytes()
        s = TensorSlice.parse(spec)
        entries[encode_slice_key(b"t", s)] = BundleEntry(dtype=1, shape=arr.shape, offset=len(data), size=len(raw),
                                                         crc32c=mask_crc(crc32c(raw)))
        extents.append(s)
        data += raw
    entries[b"t"] = BundleEntry(dtype=1, shape=(4, 3), slices=tuple(extents))
    idx(prefix).write_bytes(build_index(BundleHeader(), entries))
    dat(prefix).write_bytes(data)


def test_overlapping_slices_are_refused_on_every_read_path(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    _write_overlapping(prefix)
    names = (str(prefix), "t", "overlapping")
    with BundleReader(prefix) as reader:
        raises(CorruptCheckpointError, reader.read, "t", names=names)
        raises(CorruptCheckpointError, reader.stored_slices, "t", names=names)
        # boxes equal to one stored slice were returned without looking at the others
        raises(CorruptCheckpointError, reader.read_bounds, "t", ((0, 2), (0, 3)), names=names)
        raises(CorruptCheckpointError, reader.read_slice, "t", "4 3 2,2:-", names=names)
        raises(CorruptCheckpointError, reader.read_bounds, "t", ((0, 2), (0, 3)),
               out=np.empty((2, 3), np.float32), names=names)
    with BundleReader(prefix, mmap=True) as reader:
        raises(CorruptCheckpointError, reader.read_bounds, "t", ((2, 4), (0, 3)), names=names)
    with sc.load_checkpoint(prefix) as r:
        raises(CorruptCheckpointError, r.get_slice, "t", "4 3 0,2:-", names=names)


def test_overlapping_slices_are_refused_by_a_two_way_sharded_restore(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    _write_overlapping(prefix)
    mesh = sc.create_mesh([("x", 2)])

    def client(coord: LocalCoordinator) -> BaseException | None:
        try:
            sc.sharded_restore(mesh, str(prefix), ["t"], [sc.Layout(["x", sc.UNSHARDED], mesh)], coordinator=coord)
        except CheckpointError as exc:
            return exc
        return None

    for err in sc.LocalGroup(2).run(client):
        assert type(err) is CorruptCheckpointError, err
        assert "overlapping" in str(err) and "t" in str(err)


def test_verify_reports_overlapping_slices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "ckpt"
    _write_overlapping(prefix)
    _, _, problems = cli.verify_checkpoint(str(prefix), progress=False)
    assert any("overlapping" in p and str(prefix) in p for p in problems), problems
    code, text = run_cli(["verify", "-q", str(prefix)], capsys)
    assert code == 1 and "overlapping" in text, text


def test_disjoint_and_empty_slices_are_not_overlaps() -> None:
    assert slices.find_overlap([((0, 2), (0, 3)), ((2, 4), (0, 3))]) is None
    empty = ((0, 0), (0, 3))  # holds no element, so overlaps nothing
    assert slices.find_overlap([empty, empty, ((0, 4), (0, 3))]) is None
    assert slices.find_overlap([((0, 1), (0, 1))]) is None
    assert slices.find_overlap([(), ()]) is not None  # two scalars are the same element
    pair = slices.find_overlap([((0, 2), (0, 3)), ((2, 4), (0, 3)), ((1, 3), (2, 3))])
    assert pair is not None and ((1, 3), (2, 3)) in pair and slices.intersect_bounds(*pair) is not None


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_find_overlap_agrees_with_brute_force(rank: int) -> None:
    rng = random.Random(rank)
    for _ in range(400):
        boxes = []
        for _ in range(rng.randrange(0, 9)):
            box = []
            for _ in range(rank):
                lo = rng.randrange(0, 6)
                box.append((lo, lo + rng.randrange(0, 3)))
            boxes.append(tuple(box))
        brute = any(slices.intersect_bounds(a, b) is not None for i, a in enumerate(boxes) for b in boxes[i + 1 :])
        got = slices.find_overlap(boxes)
        assert (got is not None) == brute, boxes
        if got is not None:
            assert slices.intersect_bounds(*got) is not None


# --- 5. many slices: work linear-ish in their number -----------------------------------------------


def _count_intersections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every call of the box-intersection helper, however the reader and slice code reach it."""
    calls = [0]
    real = slices.intersect_bounds

    def counting(a, b):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(a, b)

    monkeypatch.setattr(slices, "intersect_bounds", counting)
    monkeypatch.setattr(reader_module, "intersect_bounds", counting)
    return calls


def _write_grid(prefix: Path, rows: int, cols: int, row_block: int, col_block: int) -> np.ndarray:
    full = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    with BundleWriter(prefix, durable=False) as w:
        for r in range(0, rows, row_block):
            for c in range(0, cols, col_block):
                w.add_slice("v", f"{rows} {cols} {r},{row_block}:{c},{col_block}", full[r : r + row_block,
                                                                                         c : c + col_block])
    return full


def test_column_slices_assemble_with_linear_intersection_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 2000
    prefix = tmp_path / "ckpt"
    full = _write_grid(prefix, 1, n, 1, 1)
    calls = _count_intersections(monkeypatch)
    with BundleReader(prefix) as reader:
        np.testing.assert_array_equal(reader.read("v"), full)
        np.testing.assert_array_equal(reader.read_bounds("v", ((0, 1), (10, 1500))), full[:, 10:1500])
    assert calls[0] <= 6 * n, calls[0]  # the old sweep compared every pair: ~n^2/2 = 2,000,000


def test_grid_slices_assemble_with_linear_intersection_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = 60
    prefix = tmp_path / "ckpt"
    full = _write_grid(prefix, k, k, 1, 1)
    calls = _count_intersections(monkeypatch)
    with BundleReader(prefix) as reader:
        np.testing.assert_array_equal(reader.read("v"), full)
    assert calls[0] <= 6 * k * k, calls[0]  # the old sweep: every box against its row of k


def test_find_overlap_work_is_linear_on_column_and_grid_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_intersections(monkeypatch)
    n = 20000
    columns = [((0, 1), (i, i + 1)) for i in range(n)]
    assert slices.find_overlap(columns) is None
    assert calls[0] <= 2 * n, calls[0]
    calls[0] = 0
    grid = [((i, i + 1), (j, j + 1)) for i in range(141) for j in range(141)]
    random.Random(1).shuffle(grid)
    assert slices.find_overlap(grid) is None
    assert calls[0] <= 4 * len(grid), calls[0]
    calls[0] = 0
    assert slices.find_overlap(columns + [((0, 1), (n // 2, n // 2 + 2))]) is not None
    assert calls[0] <= 2 * n + 2, calls[0]


# --- 6. read_bounds arguments ----------------------------------------------------------------------


def test_read_bounds_with_a_box_of_the_wrong_rank_or_range(ckpt: Path) -> None:
    with BundleReader(ckpt) as reader:
        names = (str(ckpt), "alpha")
        raises(ShapeMismatchError, reader.read_bounds, "alpha", ((0, 3),), names=names)
        raises(ShapeMismatchError, reader.read_bounds, "alpha", ((0, 3), (0, 4), (0, 1)), names=names)
        raises(ShapeMismatchError, reader.read_bounds, "part", ((0, 4),), names=(str(ckpt), "part"))
        raises(ShapeMismatchError, reader.read_bounds, "alpha", ((0, 3),), out=np.empty((3,), np.float32),
               names=names)
        raises(InvalidArgumentError, reader.read_bounds, "alpha", ((-1, 2), (0, 4)), names=names)
        raises(InvalidArgumentError, reader.read_bounds, "alpha", ((2, 1), (0, 4)), names=names)
        raises(InvalidArgumentError, reader.read_bounds, "alpha", ((0, 3), (0, 5)), names=names)
        raises(InvalidArgumentError, reader.read_bounds, "part", ((0, 5), (0, 6)), names=(str(ckpt), "part"))
        np.testing.assert_array_equal(reader.read_bounds("alpha", ((1, 3), (0, 4))), A[1:3])
        np.testing.assert_array_equal(reader.read_bounds("alpha", ((1, 1), (0, 4))), A[1:1])
