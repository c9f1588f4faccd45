"""Writing a whole data file at once, in parallel, when every tensor is known up front.

Offsets are laid out first (sizes are known), so threads can ``pwritev`` their
parts independently; the file still holds the tensors in the given order,
byte-identical to what `DataFileWriter` would append.  Small tensors are grouped
so one system call writes many.  A tensor over ``GROUP`` bytes is cut into
segments of about ``SEGMENT`` bytes, each its own job, so the writer threads
pipeline one segment's gathering and checksumming with another's ``pwrite``:

- contiguous runs (a C-ordered array, rows of at least ``DIRECT_ROW`` bytes, a
  contiguous sub-block of a view) are written straight from the array's memory,
  their CRC taken right before the write, while they are in cache;
- anything else (the 8 KiB rows of a 2-D-sharded matrix, a column block, a view
  with a stride inside its rows) is gathered, ``BOUNCE`` bytes at a time, into a
  reused bounce buffer, checksummed there while hot, and written from it: one
  system call per buffer instead of one iovec per short row.

A `TensorRun` (many small tensors, `format.runs`) is one buffer in a group, joined and checksummed by
the job that writes it.

Tensors over one sidecar chunk are checksummed chunk by chunk (`format.chunks`);
a segment's chunk CRCs are joined with its neighbours' (`join_chunk_crcs`) and
the tensor's own CRC combined from them, so every byte goes through CRC32C once.

A file that will be fsynced (``writeback=True``) has each job's range handed to
the kernel's writeback as soon as the job is written (Linux ``sync_file_range``),
so the device writes while later jobs are still being copied into the page cache
and the closing ``fsync`` finds little left to do.  That is a hint only: the
``fsync`` still decides durability and reports write errors.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from . import strings
from .buffers import IOV_MAX, byte_views, rows_of
from .chunks import CHUNK_SIZE, ChunkCrc, ChunkSums, combine_chunks, join_chunk_crcs
from .coding import crc32c_bulk, mask_crc
from .protos import BundleEntry
from .runs import TensorRun
from .writer import PreparedTensor

CHUNK = 8 << 20  # bytes per write of a contiguous run: fits in L3 between its CRC and its write
GROUP = 4 << 20  # small tensors are written together until a group reaches this size; larger ones are segmented
SEGMENT = 8 << 20  # bytes per job of a large tensor: the unit the writer threads pipeline
# Bytes gathered per bounce buffer.  Half of a 2 MiB L2: the buffer stays there, beside the source lines
# streaming through, between the copy, its CRC and the kernel's copy out of it.  2 MiB (all of L2) wrote
# 2-D-sharded views slower in 15 of 22 same-run pairs on a 2-core VM; one more pwritev per MiB costs ~us.
BOUNCE = 1 << 20
DIRECT_ROW = 256 << 10  # contiguous rows this long are written from the array, one iovec each, not gathered
MIN_ROW = 4096  # rows of a small tensor shorter than this are joined by a copy instead of one iovec each

_free_bounces: list[np.ndarray] = []  # reused across jobs and saves: a fresh buffer costs a page fault per 4 KiB
_MAX_FREE = 8


def _take_bounce() -> np.ndarray:
    try:
        return _free_bounces.pop()
    except IndexError:
        return np.empty(BOUNCE, np.uint8)


def _give_bounce(buf: np.ndarray) -> None:
    if len(_free_bounces) < _MAX_FREE:
        _free_bounces.append(buf)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # a CDLL function releases the GIL while it runs


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; wait for none of it


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + size)`` of ``fd`` to the device now.

    Where that does not exist or fails (another OS, a file system without it) nothing happens: the
    caller's ``fsync`` writes and checks everything anyway.
    """
    if _sync_file_range is not None and size > 0:
        _sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


Part = memoryview | list[memoryview] | np.ndarray  # a contiguous run, contiguous long rows, a block to gather


def _parts(arr: np.ndarray) -> list[Part]:
    """A large array's bytes in row-major order as runs written from its memory and blocks to gather."""
    if arr.flags.c_contiguous:
        return [arr.reshape(-1).view(np.uint8).data]
    rows = rows_of(arr)
    if rows is not None and rows.shape[1] * arr.itemsize >= DIRECT_ROW:
        views = [r.view(np.uint8).data for r in rows]
        per = max(1, min(IOV_MAX, SEGMENT // len(views[0])))
        return [views[i : i + per] for i in range(0, len(views), per)]
    if rows is not None:
        arr = rows  # one 2-D view: blocks of whole rows
    out: list[Part] = []
    _blocks(arr, out)
    return out


def _blocks(arr: np.ndarray, out: list[Part]) -> None:
    """Cut ``arr`` along its first axis into blocks of at most ``BOUNCE`` bytes (C-contiguous ones as runs)."""
    if arr.flags.c_contiguous:
        out.append(arr.reshape(-1).view(np.uint8).data)
        return
    if arr.nbytes <= BOUNCE:
        out.append(arr)
        return
    unit = arr.nbytes // arr.shape[0]
    if unit <= BOUNCE:
        per = BOUNCE // unit
        out.extend(arr[i : i + per] for i in range(0, arr.shape[0], per))
        return
    for i in range(arr.shape[0]):
        _blocks(arr[i], out)


def _part_size(part: Part) -> int:
    if isinstance(part, list):
        return sum(len(v) for v in part)
    return part.nbytes


@dataclass
class _Segment:
    """One job of a large tensor: bytes ``[start, start + size)`` of it, at file offset ``offset``."""

    offset: int
    index: int
    start: int
    size: int
    parts: list[Part]


def _segments(index: int, arr: np.ndarray, offset: int) -> list[_Segment]:
    segs: list[_Segment] = []
    cur = _Segment(offset, index, 0, 0, [])
    for part in _parts(arr):
        if isinstance(part, memoryview) and len(part) > SEGMENT:
            pieces: list[Part] = [part[i : i + SEGMENT] for i in range(0, len(part), SEGMENT)]
        else:
            pieces = [part]
        for piece in pieces:
            n = _part_size(piece)
            if cur.parts and cur.size + n > SEGMENT:
                segs.append(cur)
                cur = _Segment(cur.offset + cur.size, index, cur.start + cur.size, 0, [])
            cur.parts.append(piece)
            cur.size += n
    if cur.parts:
        segs.append(cur)
    return segs


Write = Callable[[list[memoryview], int], None]


def _run_segment(write: Write, seg: _Segment, chunk_size: int) -> tuple[int, int, list[int]]:
    """Write one segment: runs from the array, blocks through a bounce buffer; each CRC'd just before
    its write.  Returns its chunk CRCs (`join_chunk_crcs`)."""
    acc = ChunkCrc(chunk_size, seg.start)
    pos = seg.offset
    bounce: np.ndarray | None = None
    try:
        for part in seg.parts:
            if isinstance(part, memoryview):
                for at in range(0, len(part), CHUNK):
                    run = part[at : at + CHUNK]
                    acc.update(run)
                    write([run], pos)
                    pos += len(run)
            elif isinstance(part, list):
                for view in part:
                    acc.update(view)
                write(part, pos)
                pos += sum(len(v) for v in part)
            else:
                if bounce is None:
                    bounce = _take_bounce()
                staged = bounce[: part.nbytes] if part.nbytes <= len(bounce) else np.empty(part.nbytes, np.uint8)
                staged.view(part.dtype).reshape(part.shape)[...] = part
                acc.update(staged.data)
                write([staged.data], pos)
                pos += part.nbytes
    finally:
        if bounce is not None:
            _give_bounce(bounce)
    return seg.start, seg.start + seg.size, acc.flush()


def _pieces(data: np.ndarray) -> list[memoryview]:
    """The tensor's bytes in row-major order, over the array's own memory unless rows are too short."""
    views = byte_views(data, MIN_ROW)
    if views is None:
        return [np.ascontiguousarray(data).reshape(-1).view(np.uint8).data]
    return views


@dataclass
class _Job:
    offset: int
    tensors: list[tuple[int, list[memoryview] | TensorRun]] = field(default_factory=list)
    size: int = 0


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    for start in range(0, len(buffers), IOV_MAX):
        batch = buffers[start : start + IOV_MAX]
        want = sum(len(b) for b in batch)
        done = os.pwritev(fd, batch, offset)
        if done < want:  # a short write: finish it piece by piece
            skip = done
            for b in batch:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                view = b[skip:]
                pos = offset + done
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos, done = view[n:], pos + n, done + n
                skip = 0
        offset += want


def _run(fd: int, job: _Job, crcs: list[int], chunked: list[ChunkCrc | None]) -> None:
    buffers: list[memoryview] = []
    small: list[memoryview] = []  # consecutive short pieces: joined into one buffer, not an iovec each
    for index, pieces in job.tensors:
        if isinstance(pieces, TensorRun):
            pieces = [memoryview(pieces.join())]
        elif index >= 0 and crcs[index] < 0:
            crcs[index] = _crc_of(pieces, chunked[index])
        for piece in pieces:
            if len(piece) < MIN_ROW:
                small.append(piece)
                continue
            if small:
                buffers.append(memoryview(b"".join(small)))
                small = []
            buffers.append(piece)
    if small:
        buffers.append(memoryview(b"".join(small)))
    if buffers:
        _pwritev_all(fd, buffers, job.offset)


def _crc_of(pieces: list[memoryview], acc: ChunkCrc | None) -> int:
    """The CRC32C of a tensor's bytes; chunk by chunk into ``acc`` when the sidecar wants them."""
    if acc is not None:
        for piece in pieces:
            acc.update(piece)
        return acc.finish()
    crc = 0
    for piece in pieces:
        crc = crc32c_bulk(piece, crc)
    return crc


@dataclass
class _Plan:
    """A data file laid out: entries with offsets, CRCs known so far (-1: to compute), the jobs in file
    order, the end offset, the chunk accumulators of grouped tensors the sidecar wants, and the chunk size
    segments are checksummed in."""

    entries: list[BundleEntry]
    crcs: list[int]
    jobs: list[_Job | _Segment]
    end: int
    chunked: list[ChunkCrc | None]
    chunk_size: int


def _layout(tensors: Sequence[PreparedTensor | TensorRun], start: int, shard_id: int, alignment: int,
            sums: ChunkSums | None = None) -> _Plan:
    entries: list[BundleEntry] = []
    crcs: list[int] = []
    chunked: list[ChunkCrc | None] = []
    jobs: list[_Job | _Segment] = []
    chunk_size = sums.chunk_size if sums is not None else CHUNK_SIZE
    group: _Job | None = None
    offset = start
    for t in tensors:
        if isinstance(t, TensorRun):
            if alignment > 1:
                raise ValueError("a TensorRun is laid out back to back: alignment must be 1")
            t.offset = offset
            size = t.nbytes
            if group is None or group.size + size > GROUP:
                group = _Job(offset)
                jobs.append(group)
            # Joined when its job runs, so only the groups being written hold a copy; -1: it takes its own CRCs.
            group.tensors.append((-1, t))
            group.size += size
            offset += size
            continue
        i = len(entries)
        if isinstance(t.data, list):
            parts, crc = strings.encode(t.data)
            pieces = [memoryview(p) for p in parts if p]
            crcs.append(crc)
            size = sum(len(p) for p in pieces)
        else:
            pieces = []
            crcs.append(-1)
            size = t.data.nbytes
        entries.append(BundleEntry(dtype=t.dtype, shape=t.shape, shard_id=shard_id, offset=offset, size=size))
        if crcs[-1] < 0 and size > GROUP:  # segmented: its chunk CRCs come from the segments
            chunked.append(None)
            jobs.extend(_segments(i, t.data, offset))  # type: ignore[arg-type]
            group = None
        else:
            if not isinstance(t.data, list):
                pieces = _pieces(t.data)
            wanted = sums is not None and crcs[-1] < 0 and sums.wants(size)
            chunked.append(ChunkCrc(chunk_size) if wanted else None)
            if group is None or group.size + size > GROUP:
                group = _Job(offset)
                jobs.append(group)
            group.tensors.append((i, pieces))
            group.size += size
        offset += size
        if alignment > 1 and offset % alignment:
            pad = bytes(alignment - offset % alignment)
            if group is None:
                group = _Job(offset)
                jobs.append(group)
            group.tensors.append((-1, [memoryview(pad)]))  # -1: in no tensor's CRC
            group.size += len(pad)
            offset += len(pad)
    return _Plan(entries, crcs, jobs, offset, chunked, chunk_size)


def _finish(plan: _Plan, done: list[tuple[int, int, list[int]] | None], sums: ChunkSums | None) -> None:
    segments: dict[int, list[tuple[int, int, list[int]]]] = {}
    for job, result in zip(plan.jobs, done):
        if isinstance(job, _Segment) and result is not None:
            segments.setdefault(job.index, []).append(result)
    size = plan.chunk_size
    for index, parts in segments.items():
        entry = plan.entries[index]
        joined = join_chunk_crcs(sorted(parts), size)
        last = entry.size - (len(joined) - 1) * size
        plan.crcs[index] = combine_chunks(joined, size, last)
        if sums is not None and sums.wants(entry.size):
            sums.add(entry.offset, entry.size, mask_crc(plan.crcs[index]), joined)
    for entry, crc, acc in zip(plan.entries, plan.crcs, plan.chunked):
        entry.crc32c = mask_crc(max(crc, 0))
        if acc is not None and sums is not None:
            sums.add(entry.offset, entry.size, entry.crc32c, acc.crcs)


def write_at(fd: int, tensors: Sequence[PreparedTensor | TensorRun], *, start: int = 0, shard_id: int = 0,
             alignment: int = 1, threads: int | None = None, midway: Callable[[], None] | None = None,
             sums: ChunkSums | None = None, writeback: bool = False) -> tuple[list[BundleEntry], int]:
    """Write ``tensors`` in order into ``fd`` from byte ``start``; returns their entries and the end offset.

    A `TensorRun` among them adds no entries to the result: its ``offset`` is set instead, and its own
    `TensorRun.pack` encodes its entries in bulk.

    ``midway`` runs once the first job (a group of small tensors or a segment of a large one) is written
    (a fault-injection point for tests).  ``sums`` collects the chunk CRCs of the file's sidecar
    (`format.chunks`), taken with the tensors' own.  ``writeback``: the caller will fsync ``fd``, so each
    written job's range is sent on to the device at once (`start_writeback`).
    """
    plan = _layout(tensors, start, shard_id, alignment, sums)
    write: Write = lambda buffers, pos: _pwritev_all(fd, buffers, pos)  # noqa: E731

    def run(job: _Job | _Segment) -> tuple[int, int, list[int]] | None:
        out = None
        if isinstance(job, _Segment):
            out = _run_segment(write, job, plan.chunk_size)
        else:
            _run(fd, job, plan.crcs, plan.chunked)
        if writeback:
            start_writeback(fd, job.offset, job.size)
        return out

    workers = threads or min(4, os.cpu_count() or 1)
    done: list[tuple[int, int, list[int]] | None] = []
    if workers > 1 and len(plan.jobs) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-write") as pool:
            futures = [pool.submit(run, job) for job in plan.jobs]
            try:
                for i, future in enumerate(futures):
                    done.append(future.result())
                    if i == 0 and midway is not None:
                        midway()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    else:
        for i, job in enumerate(plan.jobs):
            done.append(run(job))
            if i == 0 and midway is not None:
                midway()
    _finish(plan, done, sums)
    return plan.entries, plan.end


def write_stream(stream: BinaryIO, tensors: Sequence[PreparedTensor | TensorRun], *, start: int = 0, shard_id: int = 0,
                 alignment: int = 1, midway: Callable[[], None] | None = None,
                 sums: ChunkSums | None = None) -> tuple[list[BundleEntry], int]:
    """Append ``tensors`` in order to a stream positioned at ``start`` (an object-store upload)."""
    plan = _layout(tensors, start, shard_id, alignment, sums)

    def write(buffers: list[memoryview], pos: int) -> None:  # jobs run in file order: ``pos`` is the end
        for b in buffers:
            stream.write(b)

    done: list[tuple[int, int, list[int]] | None] = []
    for i, job in enumerate(plan.jobs):
        if isinstance(job, _Segment):
            done.append(_run_segment(write, job, plan.chunk_size))
        else:
            done.append(None)
            for index, pieces in job.tensors:
                if isinstance(pieces, TensorRun):
                    pieces = [memoryview(pieces.join())]
                compute = index >= 0 and plan.crcs[index] < 0
                acc = plan.chunked[index] if index >= 0 else None
                crc = 0
                for piece in pieces:
                    for at in range(0, len(piece), CHUNK):
                        chunk = piece[at : at + CHUNK]
                        if acc is not None and compute:
                            acc.update(chunk)
                        elif compute:
                            crc = crc32c_bulk(chunk, crc)
                        stream.write(chunk)
                if compute:
                    plan.crcs[index] = acc.finish() if acc is not None else crc
        if i == 0 and midway is not None:
            midway()
    _finish(plan, done, sums)
    return plan.entries, plan.end


def write_data_file(path: str, tensors: Sequence[PreparedTensor | TensorRun], *, shard_id: int = 0, alignment: int = 1,
                    threads: int | None = None, durable: bool = True,
                    midway: Callable[[], None] | None = None,
                    sidecar: str | None = None) -> tuple[list[BundleEntry], int]:
    """Write ``tensors`` in order into a new file at ``path``; returns their entries and the file size.

    With ``sidecar``, the chunk CRCs of the file's larger tensors are written there too (after the data,
    equally durable), so that reads of parts of them can be checked (`format.chunks`).
    """
    sums = ChunkSums() if sidecar is not None else None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        entries, size = write_at(fd, tensors, shard_id=shard_id, alignment=alignment, threads=threads, midway=midway,
                                 sums=sums, writeback=durable)
        if durable:
            os.fsync(fd)
        if sums is not None and sidecar is not None:
            sums.save(sidecar, size, durable)
    except BaseException:
        os.close(fd)
        for done in (path, sidecar):
            if done is not None:
                try:
                    os.unlink(done)
                except FileNotFoundError:
                    pass
        raise
    os.close(fd)
    return entries, size
