"""Writing a whole data file at once, in parallel, when every tensor is known up front.

Offsets are laid out first (sizes are known), so threads can ``pwritev`` their
parts independently; the file still holds the tensors in the given order,
byte-identical to what `DataFileWriter` would append.  No tensor bytes are
copied: a C-contiguous array is written from its own buffer in chunks (the CRC of
each chunk is taken right before the chunk is written, while it is in cache),
and a strided view whose rows are contiguous (a column block of a matrix) is
written row by row through the iovecs of ``pwritev``.  Small tensors are grouped
so one system call writes many.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from . import strings
from .buffers import IOV_MAX, byte_views
from .coding import crc32c, mask_crc
from .protos import BundleEntry
from .writer import PreparedTensor

CHUNK = 8 << 20  # bytes per write of a large tensor: fits in L2/L3 between its CRC and its write
GROUP = 4 << 20  # small tensors are written together until a group reaches this size
MIN_ROW = 4096  # rows shorter than this are gathered by a copy instead of one iovec each


def _pieces(data: np.ndarray) -> list[memoryview]:
    """The tensor's bytes in row-major order, over the array's own memory unless rows are too short."""
    views = byte_views(data, MIN_ROW)
    if views is None:
        return [np.ascontiguousarray(data).reshape(-1).view(np.uint8).data]
    return views


Piece = memoryview | np.ndarray  # an array piece is small and C-contiguous (see `_layout`)


def _flat(piece: Piece) -> memoryview:
    return piece.reshape(-1).view(np.uint8).data if isinstance(piece, np.ndarray) else piece


@dataclass
class _Job:
    offset: int
    tensors: list[tuple[int, list[Piece]]] = field(default_factory=list)
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


def _run(fd: int, job: _Job, crcs: list[int]) -> None:
    if len(job.tensors) == 1 and job.size > CHUNK:
        index, pieces = job.tensors[0]
        crc, pos = 0, job.offset
        for flat in map(_flat, pieces):
            for start in range(0, len(flat), CHUNK):
                chunk = flat[start : start + CHUNK]
                crc = crc32c(chunk, crc)
                _pwritev_all(fd, [chunk], pos)
                pos += len(chunk)
        if crcs[index] < 0:
            crcs[index] = crc
        return
    buffers: list[memoryview] = []
    small: list[Any] = []  # consecutive small arrays: joined into one buffer, not an iovec each
    for index, pieces in job.tensors:
        if crcs[index] < 0:
            crc = 0
            for piece in pieces:
                crc = crc32c(piece, crc)  # type: ignore[arg-type]  # an array piece is C-contiguous: a buffer
            crcs[index] = crc
        for piece in pieces:
            if isinstance(piece, np.ndarray):
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


def _layout(tensors: Sequence[PreparedTensor], start: int, shard_id: int,
            alignment: int) -> tuple[list[BundleEntry], list[int], list[_Job], int]:
    """Entries with offsets from ``start``, CRCs known so far (-1: to compute), and the write jobs."""
    entries: list[BundleEntry] = []
    crcs: list[int] = []
    jobs: list[_Job] = []
    offset = start
    job: _Job | None = None
    ndarray, entry = np.ndarray, BundleEntry
    for i, t in enumerate(tensors):
        data = t.data
        pieces: list[Piece]
        if type(data) is ndarray and data.nbytes < MIN_ROW and data.flags.c_contiguous:
            # Most tensors of a large model: the array itself (a C-contiguous buffer), gathered by `_run`.
            size = data.nbytes
            pieces = [data] if size else []
            crcs.append(-1)
        elif isinstance(data, list):
            parts, crc = strings.encode(data)
            views = [memoryview(p) for p in parts if p]
            pieces = list(views)
            crcs.append(crc)
            size = sum(len(p) for p in views)
        else:
            views = _pieces(data)
            pieces = list(views)
            crcs.append(-1)
            size = sum(len(p) for p in views)
        entries.append(entry(t.dtype, t.shape, shard_id, offset, size))
        if job is None or job.size + size > GROUP or size > GROUP:
            job = _Job(offset)
            jobs.append(job)
        job.tensors.append((i, pieces))
        job.size += size
        offset += size
        if alignment > 1 and offset % alignment:
            pad = bytes(alignment - offset % alignment)
            job.tensors.append((i, [memoryview(pad)]))  # after the tensor's CRC is taken: not in it
            job.size += len(pad)
            offset += len(pad)
    return entries, crcs, jobs, offset


def _finish(entries: list[BundleEntry], crcs: list[int]) -> None:
    if len(crcs) < 64:
        for entry, crc in zip(entries, crcs):
            entry.crc32c = mask_crc(max(crc, 0))
        return
    c = np.maximum(np.array(crcs, np.int64), 0).astype(np.uint64)  # masked all at once: mask_crc, vectorised
    masked = ((((c >> np.uint64(15)) | (c << np.uint64(17))) & np.uint64(0xFFFFFFFF)) + np.uint64(0xA282EAD8)) \
        & np.uint64(0xFFFFFFFF)
    for entry, crc in zip(entries, masked.tolist()):
        entry.crc32c = crc


def write_at(fd: int, tensors: Sequence[PreparedTensor], *, start: int = 0, shard_id: int = 0, alignment: int = 1,
             threads: int | None = None, midway: Callable[[], None] | None = None) -> tuple[list[BundleEntry], int]:
    """Write ``tensors`` in order into ``fd`` from byte ``start``; returns their entries and the end offset.

    ``midway`` runs once the first group of tensors is written (a fault-injection point for tests).
    """
    entries, crcs, jobs, end = _layout(tensors, start, shard_id, alignment)
    workers = threads or min(4, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-write") as pool:
            for i, future in enumerate([pool.submit(_run, fd, job, crcs) for job in jobs]):
                future.result()
                if i == 0 and midway is not None:
                    midway()
    else:
        for i, job in enumerate(jobs):
            _run(fd, job, crcs)
            if i == 0 and midway is not None:
                midway()
    _finish(entries, crcs)
    return entries, end


def write_stream(stream: BinaryIO, tensors: Sequence[PreparedTensor], *, start: int = 0, shard_id: int = 0,
                 alignment: int = 1, midway: Callable[[], None] | None = None) -> tuple[list[BundleEntry], int]:
    """Append ``tensors`` in order to a stream positioned at ``start`` (an object-store upload)."""
    entries, crcs, jobs, end = _layout(tensors, start, shard_id, alignment)
    for i, job in enumerate(jobs):
        for index, pieces in job.tensors:
            compute = crcs[index] < 0
            crc = 0
            for piece in map(_flat, pieces):
                for at in range(0, len(piece), CHUNK):
                    chunk = piece[at : at + CHUNK]
                    if compute:
                        crc = crc32c(chunk, crc)
                    stream.write(chunk)
            if compute:
                crcs[index] = crc
        if i == 0 and midway is not None:
            midway()
    _finish(entries, crcs)
    return entries, end


def write_data_file(path: str, tensors: Sequence[PreparedTensor], *, shard_id: int = 0, alignment: int = 1,
                    threads: int | None = None, durable: bool = True,
                    midway: Callable[[], None] | None = None) -> tuple[list[BundleEntry], int]:
    """Write ``tensors`` in order into a new file at ``path``; returns their entries and the file size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        entries, size = write_at(fd, tensors, shard_id=shard_id, alignment=alignment, threads=threads, midway=midway)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    return entries, size
