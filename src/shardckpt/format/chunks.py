"""Chunk checksums: the ``P.data-SSSSS-of-NNNNN.crc32c`` sidecar that lets a partial read be checked.

A bundle has one CRC32C per stored piece, so a read of part of a piece (a
resharding restore) could only be checked by reading the whole piece.  The
writer of a data file therefore also records, for every piece larger than one
chunk, the CRC32C of each fixed-size chunk of the piece (chunks start at the
piece's first byte, so none straddles two pieces), computed as the bytes are
written; the piece's own CRC is combined from them, so the bytes are checksummed
once.  A reader of part of a piece reads the whole chunks around it and checks
them; a piece of at most one chunk is read whole and checked by its own CRC.

The sidecar is bound to the data file it describes: it records the file's size
and, for every piece it covers, the piece's offset, size and (masked) CRC32C as
the index holds them.  A reader uses a piece's chunk CRCs only if all of these
agree with the index and the file, so a stale sidecar (the data file rewritten
in place, by TensorFlow say) is never taken for corruption: it is ignored.

Layout (little-endian)::

    header   "shardckc" | u32 version=1 | u32 chunk_size | u64 data_size | u64 pieces | u64 chunks
    pieces   pieces x (u64 offset | u64 size | u32 masked crc32c | u32 0), by increasing offset
    chunks   chunks x u32 crc32c (each piece's chunks in order, the pieces in order)
    trailer  u32 masked crc32c of every byte before it

Parsing is bounded by the data file's size before anything is read or allocated.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .. import storage
from ..errors import CheckpointError
from .coding import crc32c, crc32c_bulk, mask_crc, unmask_crc

log = logging.getLogger("shardckpt.chunks")

CHUNK_SIZE = 1 << 20  # default chunk: a partial read reads at most 2 chunks more than it needs
SUFFIX = ".crc32c"
MAGIC = b"shardckc"
VERSION = 1
MIN_CHUNK = 4096
MAX_CHUNK = 1 << 30

_HEADER = struct.Struct("<8sIIQQQ")
_TRAILER = struct.Struct("<I")
_PIECE = np.dtype([("offset", "<u8"), ("size", "<u8"), ("crc", "<u4"), ("zero", "<u4")])

# --- combining CRCs (GF(2) polynomial arithmetic over the reflected Castagnoli polynomial) ---------

_POLY = 0x82F63B78
_ONE = 1 << 31  # x^0 in the reflected representation


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial, both reflected."""
    product = 0
    bit = _ONE
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers() -> list[int]:
    out = [1 << 30]  # x^1
    for _ in range(63):
        out.append(_multmodp(out[-1], out[-1]))
    return out


_X2N = _powers()  # x^(2^k) mod p
_SHIFT: dict[int, int] = {}


def _x8n(nbytes: int) -> int:
    """x^(8 * nbytes) mod p: the operator that moves a CRC past ``nbytes`` zero bytes."""
    cached = _SHIFT.get(nbytes)
    if cached is not None:
        return cached
    p, k, n = _ONE, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 63], p)
        n >>= 1
        k += 1
    if len(_SHIFT) < 64:
        _SHIFT[nbytes] = p
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``A + B`` from ``crc1`` of A, ``crc2`` of B and B's length (zlib's crc32_combine rule)."""
    if len2 <= 0:
        return crc1
    return _multmodp(_x8n(len2), crc1) ^ crc2


_TABLES: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}


def _shift_tables(nbytes: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Moving a CRC past ``nbytes`` zero bytes as four byte-indexed tables.

    A partial read checks its span with one CRC combined from every chunk it covers, and `_multmodp` is a
    32-step Python loop (~10 us): a 1 GiB resharding restore combined ~1,000 chunks with it, holding the GIL
    for tens of milliseconds while the reader threads' copies and CRCs could have run.  The shift is linear
    over GF(2), so it is the XOR of its values on the CRC's four bytes: four lookups per chunk instead.
    """
    tables = _TABLES.get(nbytes)
    if tables is not None:
        return tables
    op = _x8n(nbytes)
    built: list[list[int]] = []
    for k in range(4):
        bits = [_multmodp(op, 1 << (8 * k + j)) for j in range(8)]
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ bits[low.bit_length() - 1]
        built.append(table)
    tables = (built[0], built[1], built[2], built[3])
    if len(_TABLES) < 64:  # chunk sizes are powers of two from MIN_CHUNK to MAX_CHUNK: a handful in practice
        _TABLES[nbytes] = tables
    return tables


def combine_chunks(crcs: list[int] | np.ndarray, chunk_size: int, last_size: int) -> int:
    """The CRC32C of consecutive chunks of ``chunk_size`` bytes each, the last one ``last_size`` bytes."""
    n = len(crcs)
    if n == 0:
        return 0
    values = crcs.tolist() if isinstance(crcs, np.ndarray) else crcs
    total = int(values[0])
    if n == 1:
        return total
    full = n if last_size == chunk_size else n - 1  # chunks after the first shifted by a whole chunk
    t0, t1, t2, t3 = _shift_tables(chunk_size)
    for i in range(1, full):
        total = t0[total & 0xFF] ^ t1[(total >> 8) & 0xFF] ^ t2[(total >> 16) & 0xFF] ^ t3[total >> 24] ^ int(values[i])
    if full < n:
        total = crc32c_combine(total, int(values[-1]), last_size)
    return total


# --- writing ---------------------------------------------------------------------------------------


class ChunkCrc:
    """Running CRC32C of one piece, split into chunks of ``chunk_size`` bytes as the bytes stream by."""

    __slots__ = ("chunk_size", "crcs", "cur", "fill", "total")

    def __init__(self, chunk_size: int, start: int = 0) -> None:
        self.chunk_size = chunk_size
        self.crcs: list[int] = []
        self.cur = 0
        self.fill = start % chunk_size  # a segment starting mid-chunk: its first CRC is of a partial chunk
        self.total = 0

    def update(self, data: memoryview) -> None:
        n, at = len(data), 0
        while at < n:
            take = min(self.chunk_size - self.fill, n - at)
            self.cur = crc32c_bulk(data[at : at + take], self.cur)
            self.fill += take
            at += take
            if self.fill == self.chunk_size:
                self.crcs.append(self.cur)
                self.cur = self.fill = 0
        self.total += n

    def flush(self) -> list[int]:
        """The CRCs of this segment's chunks, the first and last possibly partial (see `join_chunk_crcs`)."""
        if self.total and self.fill:  # bytes since the last full chunk (fill is nonzero with none only at start)
            self.crcs.append(self.cur)
        self.cur = self.fill = 0
        return self.crcs

    def finish(self) -> int:
        """The piece's CRC32C (combined from its chunks); `crcs` then holds every chunk's."""
        last = self.chunk_size
        if self.fill:
            self.crcs.append(self.cur)
            last = self.fill
            self.cur = self.fill = 0
        return combine_chunks(self.crcs, self.chunk_size, last)


def join_chunk_crcs(segments: list[tuple[int, int, list[int]]], chunk_size: int) -> list[int]:
    """The chunk CRCs of a piece from those of its consecutive segments ``(start, end, crcs)`` (sorted, each
    from a `ChunkCrc` made with ``start`` and flushed): a segment starting mid-chunk continues the previous
    segment's last, partial chunk, so the two CRCs are combined."""
    out: list[int] = []
    for start, end, crcs in segments:
        if not crcs:
            continue
        if start % chunk_size and out:
            out[-1] = crc32c_combine(out[-1], crcs[0], min(chunk_size - start % chunk_size, end - start))
            out.extend(crcs[1:])
        else:
            out.extend(crcs)
    return out


@dataclass
class ChunkSums:
    """What a writer collects for one data file's sidecar: the chunk CRCs of every piece over one chunk."""

    chunk_size: int = field(default_factory=lambda: CHUNK_SIZE)
    pieces: list[tuple[int, int, int, list[int]]] = field(default_factory=list)

    def wants(self, size: int) -> bool:
        """Whether a piece of ``size`` bytes gets chunk CRCs (a smaller one is read whole instead)."""
        return size > self.chunk_size

    def add(self, offset: int, size: int, masked_crc: int, crcs: list[int]) -> None:
        self.pieces.append((offset, size, masked_crc, crcs))

    def encode(self, data_size: int) -> bytes:
        pieces = sorted(self.pieces)
        table = np.zeros(len(pieces), _PIECE)
        for i, (offset, size, crc, _) in enumerate(pieces):
            table[i] = (offset, size, crc, 0)
        chunks = np.array([c for *_, crcs in pieces for c in crcs], "<u4")
        body = (_HEADER.pack(MAGIC, VERSION, self.chunk_size, data_size, len(pieces), len(chunks))
                + table.tobytes() + chunks.tobytes())
        return body + _TRAILER.pack(mask_crc(crc32c(body)))

    def save(self, path: str, data_size: int, durable: bool = True) -> None:
        """Write the sidecar at ``path`` (one object on a remote store; fsynced when ``durable``)."""
        data = self.encode(data_size)
        if storage.is_remote(path):
            storage.write_small(path, data)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


# --- reading ---------------------------------------------------------------------------------------


class ChunkTable:
    """A parsed, self-consistent sidecar of a data file of ``data_size`` bytes."""

    def __init__(self, path: str, chunk_size: int, data_size: int, pieces: np.ndarray, chunks: np.ndarray) -> None:
        self.path, self.chunk_size, self.data_size = path, chunk_size, data_size
        self._offsets = pieces["offset"]
        self._pieces = pieces
        self._chunks = chunks
        counts = -(-pieces["size"].astype(np.int64) // chunk_size)
        self._first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)

    def chunks_of(self, offset: int, size: int, masked_crc: int) -> np.ndarray | None:
        """The chunk CRCs of the piece at ``offset`` if the sidecar records that very piece, else None."""
        i = int(np.searchsorted(self._offsets, offset))
        if i >= len(self._offsets):
            return None
        row = self._pieces[i]
        if int(row["offset"]) != offset or int(row["size"]) != size or int(row["crc"]) != masked_crc:
            return None
        first = int(self._first[i])
        return self._chunks[first : first + -(-size // self.chunk_size)]


def sidecar_filename(data_path: str) -> str:
    """The sidecar of the data file at ``data_path``."""
    return data_path + SUFFIX


def load(path: str, data_size: int) -> ChunkTable | None:
    """The sidecar at ``path`` for a data file of ``data_size`` bytes, or None when there is none or it is
    unusable (damaged, of another version, or describing a file of another size): partial reads of that
    file are then unchecked, as without a sidecar.  Never raises for what the file holds."""
    try:
        f = storage.open_random(path)
    except (CheckpointError, OSError):
        return None  # no sidecar: written by TensorFlow or an older shardckpt
    try:
        return _parse(f, path, data_size)
    except (CheckpointError, OSError, ValueError) as exc:
        log.warning("%s: ignoring the chunk checksums: %s", path, exc)
        return None
    finally:
        f.close()


def _largest(data_size: int) -> int:
    """The most bytes a well-formed sidecar of a ``data_size``-byte file can have (smallest chunks)."""
    pieces = data_size // (MIN_CHUNK + 1)
    return _HEADER.size + pieces * _PIECE.itemsize + 4 * (pieces + data_size // MIN_CHUNK) + _TRAILER.size


def _parse(f: storage.RandomAccess, path: str, data_size: int) -> ChunkTable | None:
    if not _HEADER.size + _TRAILER.size <= f.size <= _largest(data_size):
        raise ValueError(f"{f.size} bytes cannot be a sidecar of a {data_size}-byte file")
    # The header first: a file that is not a sidecar of this data file (junk, a huge file) is refused after reading
    # 40 bytes, not after reading up to 0.8% of the data file's size, as every reader opening the checkpoint would.
    # (On an object store, where each read is a GET and sidecars are read on first use, it stays one read.)
    local = isinstance(f, storage.LocalFile)
    head = bytearray(_HEADER.size if local else f.size)
    f.read_into([memoryview(head)], 0)
    magic, version, chunk_size, size, npieces, nchunks = _HEADER.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a version {VERSION} sidecar")
    if f.size != _HEADER.size + npieces * _PIECE.itemsize + 4 * nchunks + _TRAILER.size:
        raise ValueError(f"{f.size} bytes do not hold the {npieces} pieces and {nchunks} chunks its header counts")
    data = head
    if local:
        data = bytearray(f.size)  # bounded by the data file's size (checked above)
        f.read_into([memoryview(data)], 0)
        if data[: _HEADER.size] != head:
            raise ValueError("it changed while it was read")
    if size != data_size:
        log.info("%s: ignoring the chunk checksums of a %d-byte file: the data file has %d", path, size, data_size)
        return None
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size {chunk_size}")
    # Each piece is over one chunk and the pieces do not overlap, which bounds both counts by the file.
    if npieces * (chunk_size + 1) > data_size or nchunks > npieces + data_size // chunk_size:
        raise ValueError(f"{npieces} pieces and {nchunks} chunks cannot describe {data_size} bytes")
    want = _HEADER.size + npieces * _PIECE.itemsize + 4 * nchunks + _TRAILER.size
    if f.size != want:
        raise ValueError(f"{f.size} bytes, expected {want}")
    (stored,) = _TRAILER.unpack_from(data, want - _TRAILER.size)
    if crc32c(memoryview(data)[: want - _TRAILER.size]) != unmask_crc(stored):
        raise ValueError("its own checksum does not match")
    pieces = np.frombuffer(data, _PIECE, npieces, _HEADER.size)
    chunks = np.frombuffer(data, "<u4", nchunks, _HEADER.size + npieces * _PIECE.itemsize)
    offsets, sizes = pieces["offset"].astype(np.uint64), pieces["size"].astype(np.uint64)
    if npieces:
        ends = offsets + sizes  # no overflow: each term is below data_size < 2^63 once checked
        if (np.any(sizes <= chunk_size) or np.any(offsets >= data_size) or np.any(sizes > data_size)
                or np.any(ends > data_size) or np.any(offsets[1:] < ends[:-1]) or np.any(pieces["zero"])):
            raise ValueError("its pieces overlap, are out of order or lie outside the file")
    if int(np.sum(-(-sizes.astype(np.int64) // chunk_size))) != nchunks:
        raise ValueError("its chunk count does not match its pieces")
    return ChunkTable(path, chunk_size, data_size, pieces, chunks)
