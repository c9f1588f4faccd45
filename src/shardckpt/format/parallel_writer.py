"""Writing a whole data file at once, in parallel, when every tensor is known up front.

Offsets are laid out first (sizes are known), so threads can ``pwritev`` their
parts independently; the file still holds the tensors in the given order,
byte-identical to what `DataFileWriter` would append.  No tensor bytes are
copied: a C-contiguous array is written from its own buffer in chunks (the CRC of
each chunk is taken right before the chunk is written, while it is in cache),
and a strided view whose rows are contiguous (a column block of a matrix) is
written row by row through the iovecs of ``pwritev``.  Small tensors are grouped
so one system call writes many.  Tensors over one sidecar chunk are checksummed
chunk by chunk (`format.chunks`), their own CRC combined from the chunks', so
every byte still goes through CRC32C once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from . import strings
from .buffers import IOV_MAX, byte_views
from .chunks import ChunkCrc, ChunkSums
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


@dataclass
class _Job:
    offset: int
    tensors: list[tuple[int, list[memoryview]]] = field(default_factory=list)
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
    if len(job.tensors) == 1 and job.size > CHUNK:
        index, pieces = job.tensors[0]
        acc = chunked[index] if crcs[index] < 0 else None
        crc, pos = 0, job.offset
        for piece in pieces:
            for start in range(0, len(piece), CHUNK):
                chunk = piece[start : start + CHUNK]
                if acc is not None:
                    acc.update(chunk)
                else:
                    crc = crc32c(chunk, crc)
                _pwritev_all(fd, [chunk], pos)
                pos += len(chunk)
        if crcs[index] < 0:
            crcs[index] = acc.finish() if acc is not None else crc
        return
    buffers: list[memoryview] = []
    small: list[memoryview] = []  # consecutive short pieces: joined into one buffer, not an iovec each
    for index, pieces in job.tensors:
        if crcs[index] < 0:
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
        crc = crc32c(piece, crc)
    return crc


def _layout(tensors: Sequence[PreparedTensor], start: int, shard_id: int, alignment: int,
            sums: ChunkSums | None = None) -> tuple[list[BundleEntry], list[int], list[_Job], int,
                                                    list[ChunkCrc | None]]:
    """Entries with offsets from ``start``, CRCs known so far (-1: to compute), the write jobs, and the
    chunk CRC accumulators of the tensors that ``sums`` wants chunk CRCs of."""
    entries: list[BundleEntry] = []
    crcs: list[int] = []
    chunked: list[ChunkCrc | None] = []
    jobs: list[_Job] = []
    offset = start
    for i, t in enumerate(tensors):
        if isinstance(t.data, list):
            parts, crc = strings.encode(t.data)
            pieces = [memoryview(p) for p in parts if p]
            crcs.append(crc)
        else:
            pieces = _pieces(t.data)
            crcs.append(-1)
        size = sum(len(p) for p in pieces)
        wanted = sums is not None and crcs[-1] < 0 and sums.wants(size)
        chunked.append(ChunkCrc(sums.chunk_size) if wanted and sums is not None else None)
        entries.append(BundleEntry(dtype=t.dtype, shape=t.shape, shard_id=shard_id, offset=offset, size=size))
        if not jobs or jobs[-1].size + size > GROUP or size > GROUP:
            jobs.append(_Job(offset))
        jobs[-1].tensors.append((i, pieces))
        jobs[-1].size += size
        offset += size
        if alignment > 1 and offset % alignment:
            pad = bytes(alignment - offset % alignment)
            jobs[-1].tensors.append((i, [memoryview(pad)]))  # after the tensor's CRC is taken: not in it
            jobs[-1].size += len(pad)
            offset += len(pad)
    return entries, crcs, jobs, offset, chunked


def _finish(entries: list[BundleEntry], crcs: list[int], chunked: list[ChunkCrc | None],
            sums: ChunkSums | None) -> None:
    for entry, crc, acc in zip(entries, crcs, chunked):
        entry.crc32c = mask_crc(max(crc, 0))
        if acc is not None and sums is not None:
            sums.add(entry.offset, entry.size, entry.crc32c, acc.crcs)


def write_at(fd: int, tensors: Sequence[PreparedTensor], *, start: int = 0, shard_id: int = 0, alignment: int = 1,
             threads: int | None = None, midway: Callable[[], None] | None = None,
             sums: ChunkSums | None = None) -> tuple[list[BundleEntry], int]:
    """Write ``tensors`` in order into ``fd`` from byte ``start``; returns their entries and the end offset.

    ``midway`` runs once the first group of tensors is written (a fault-injection point for tests).
    ``sums`` collects the chunk CRCs of the file's sidecar (`format.chunks`), taken with the tensors' own.
    """
    entries, crcs, jobs, end, chunked = _layout(tensors, start, shard_id, alignment, sums)
    workers = threads or min(4, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-write") as pool:
            for i, future in enumerate([pool.submit(_run, fd, job, crcs, chunked) for job in jobs]):
                future.result()
                if i == 0 and midway is not None:
                    midway()
    else:
        for i, job in enumerate(jobs):
            _run(fd, job, crcs, chunked)
            if i == 0 and midway is not None:
                midway()
    _finish(entries, crcs, chunked, sums)
    return entries, end


def write_stream(stream: BinaryIO, tensors: Sequence[PreparedTensor], *, start: int = 0, shard_id: int = 0,
                 alignment: int = 1, midway: Callable[[], None] | None = None,
                 sums: ChunkSums | None = None) -> tuple[list[BundleEntry], int]:
    """Append ``tensors`` in order to a stream positioned at ``start`` (an object-store upload)."""
    entries, crcs, jobs, end, chunked = _layout(tensors, start, shard_id, alignment, sums)
    for i, job in enumerate(jobs):
        for index, pieces in job.tensors:
            compute = crcs[index] < 0
            acc = chunked[index]
            crc = 0
            for piece in pieces:
                for at in range(0, len(piece), CHUNK):
                    chunk = piece[at : at + CHUNK]
                    if acc is not None and compute:
                        acc.update(chunk)
                    elif compute:
                        crc = crc32c(chunk, crc)
                    stream.write(chunk)
            if compute:
                crcs[index] = acc.finish() if acc is not None else crc
        if i == 0 and midway is not None:
            midway()
    _finish(entries, crcs, chunked, sums)
    return entries, end


def write_data_file(path: str, tensors: Sequence[PreparedTensor], *, shard_id: int = 0, alignment: int = 1,
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
                                 sums=sums)
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
