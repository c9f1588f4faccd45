"""Reading bundles: lookup by name, whole tensors, and any slice assembled from stored slices.

Safety argument, stated once: before anything is allocated for a tensor, its
entry is validated (known dtype, non-negative shape whose element count fits in
int64, ``size == count * itemsize``, shard id below the header's shard count) and
the byte range ``[offset, offset + size)`` is checked against the data file's
real size (before it is read or mapped).  An assembled read first proves that the stored slices do not overlap
and cover the request, so the output is never larger than bytes that exist.
"""

from __future__ import annotations

import bisect
import difflib
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InsufficientSlicesError,
    InvalidArgumentError,
    NotARegularFileError,
    ShapeMismatchError,
    TensorNotFoundError,
    TruncatedFileError,
    UnsupportedDTypeError,
)
from ..storage import Identity, LocalFile, RandomAccess, identity, open_random, read_small
from . import chunks, strings
from .buffers import IOV_MAX, rows_of
from .chunks import ChunkTable, combine_chunks, sidecar_filename
from .coding import crc32c, crc32c_bulk, decode_varint, unmask_crc
from .dtypes import ITEMSIZE, DataType, datatype_name, to_numpy
from .files import data_filename, index_filename, normalize_prefix
from .protos import BIG_ENDIAN, BundleEntry, BundleHeader, decode_entry, decode_header
from .slices import (
    TensorSlice,
    box_volume,
    decode_slice_key,
    encode_slice_key,
    find_overlap,
    intersect_bounds,
    parse_shape_and_slice,
)
from .table import Table

Bounds = tuple[tuple[int, int], ...]
Verify = bool | Literal["full"]

_INT64_MAX = (1 << 63) - 1
_READ_CHUNK = 16 * 1024 * 1024
# A checked local read goes in pieces that are still in the core's cache when its CRC reads them: a CRC over the
# 16 MiB just read comes from memory, 1.6x slower here (5.7 vs 3.5 ms per 64 MiB, 256 KiB reads; smaller reads
# pay more calls).
_READ_CHECKED = 512 * 1024
_BOUNCE = 2 * 1024 * 1024  # rows shorter than _BOUNCE_ROW are read this many bytes at a time, then copied
_BOUNCE_ROW = 256 * 1024
_bounce = threading.local()
# Smaller pieces are copied even with ``mmap=True``: each mapping is a kernel VMA, and a process gets
# about 65,000 of them (vm.max_map_count), fewer than a checkpoint may have tensors.
_MMAP_MIN = 1 << 20
_BULK_MAX = _MMAP_MIN  # entries below this are read in runs by `read_many` (larger ones: mapped or alone)
_BULK_GAP = 64 << 10  # bytes between entries a run reads through rather than making another call
_BULK_SPAN = 64 << 20  # the most one run's buffer holds
_SNAPSHOT_TRIES = 5
_BULK_AFTER = 256
_SNAPSHOT_MAX_FILES = 256
_NPY_MAXDIMS: int
try:
    from numpy._core.multiarray import MAXDIMS as _NPY_MAXDIMS  # numpy >= 2: 64
except ImportError:  # pragma: no cover - numpy 1.x: 32
    from numpy.core.multiarray import MAXDIMS as _NPY_MAXDIMS  # type: ignore[no-redef]


@dataclass(frozen=True)
class _Span:
    """A partial read widened to the sidecar's chunks: bytes ``[lo, hi)`` of the entry must have CRC ``crc``."""

    lo: int
    hi: int
    crc: int
    chunk_crcs: np.ndarray
    table: ChunkTable | None  # None: the whole piece, checked by the entry's own CRC


@dataclass(frozen=True)
class StoredSlice:
    """One stored piece of a tensor: where it sits in the full tensor and the entry holding its bytes."""

    key: bytes
    bounds: Bounds
    entry: BundleEntry



# Types whose elements are objects of the writing process (a dataset iterator's state, a resource handle):
# listed, verified and copied as stored bytes, never turned into arrays.
OPAQUE = frozenset({int(DataType.VARIANT), int(DataType.RESOURCE)})


class _Where:
    """``"<prefix>: tensor <name>"``, spelled only when an error message needs it (most entries are valid)."""

    __slots__ = ("prefix", "key")

    def __init__(self, prefix: str, key: bytes) -> None:
        self.prefix, self.key = prefix, key

    def __str__(self) -> str:
        return f"{self.prefix}: tensor {_label(self.key)}"


def _label(key: bytes) -> str:
    """A key as people read it: a slice key as ``name (slice 0,512:-)``, not its ordered-code bytes."""
    if key[:1] == b"\x00":
        try:
            name, tslice = decode_slice_key(key)
        except CheckpointError:
            pass
        else:
            return f"{name.decode('utf-8', 'replace')} (slice {tslice})"
    return key.decode("utf-8", "replace")


class BundleReader:
    """Read-only access to the bundle at ``prefix`` (the index is read once, data files lazily).

    With ``mmap=True``, a read that is one contiguous byte range of a local data file (a stored piece
    whole, or a block of its leading rows) of at least 1 MiB returns an array over a private,
    copy-on-write mapping of the file instead of a copy, as ``torch.load(mmap=True)`` does: nothing is
    copied or zeroed until the caller writes a page.  Writes stay in the process.  The mapping keeps
    the file's blocks allocated while the array lives, even after the file is deleted or replaced,
    and a file truncated in place while mapped would end the process with SIGBUS (shardckpt and
    TensorFlow never truncate a checkpoint's files; they write new ones and rename).  A mapped array
    is checked once, when it is returned: it stays a view of the file, so a later change to the
    file's bytes (written in place, or a page dropped and read again from a failing disk) shows in
    it unchecked.  Copy it, or restore into arrays of your own (``into=``), to hold checked bytes.
    """

    def __init__(self, prefix: str | os.PathLike[str], *, mmap: bool = False) -> None:
        self.prefix = normalize_prefix(prefix)
        self._mmap = mmap
        self.index_path = index_filename(self.prefix)
        self._files: dict[int, RandomAccess] = {}
        self._pieces: dict[bytes, list[StoredSlice]] = {}
        self._values: dict[bytes, bytes] | None = None
        self._lookups = 0
        for _ in range(_SNAPSHOT_TRIES):
            identity = self._open()
            if self._open_data_files(identity):
                return
            self.close()
        raise CheckpointError(f"{self.prefix}: the checkpoint kept changing while it was being opened")

    @property
    def mmap(self) -> bool:
        """Whether large contiguous reads are returned as private mappings of the data files."""
        return self._mmap

    def _open(self) -> Identity:
        """Read and check the index; returns the identity of the index file that was read."""
        try:
            data, ident = read_small(self.index_path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.prefix}: {self.index_path} does not exist"
            ) from None
        except IsADirectoryError:
            raise CheckpointNotFoundError(f"no checkpoint at {self.prefix}: {self.index_path} is a directory") from None
        except NotADirectoryError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.prefix}: a parent of {self.index_path} is not a directory"
            ) from None
        except NotARegularFileError as exc:
            raise NotARegularFileError(f"{self.prefix}: {exc}") from None
        self._table = Table(data, self.index_path)
        first = next(iter(self._table.seek(b"")), None)
        if first is None or first[0] != b"":
            raise CorruptCheckpointError(f"{self.index_path}: no bundle header entry")
        try:
            self.header: BundleHeader = decode_header(first[1])
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{self.index_path}: bundle header: {exc}") from None
        v = self.header.version
        if v.producer < 0 or v.min_consumer > 1 or 1 in v.bad_consumers:
            raise CorruptCheckpointError(
                f"{self.index_path}: checkpoint version producer={v.producer} min_consumer={v.min_consumer} "
                f"bad_consumers={list(v.bad_consumers)} is not readable by this consumer (1)"
            )
        return ident

    def _open_data_files(self, ident: Identity) -> bool:
        """Open every data file now, then check the index is still the one read: a consistent snapshot.

        A save that replaces this checkpoint removes the old index before it renames any data file,
        so if the index is unchanged after the data files are open, they all belong to it; open
        descriptors keep their files even after they are replaced.  The sidecars (chunk checksums) of
        local files are read now too, for the same reason: one read later, once the checkpoint was
        replaced or deleted, would find another checkpoint's sidecar or none, and leave partial reads of
        the bytes this reader still holds unchecked.  (An object store's are read on first use: its
        objects are not held the way a descriptor holds a file, and a restore that touches one object
        should not GET every sidecar.)  Past `_SNAPSHOT_MAX_FILES` files are opened on first use
        instead (file-descriptor limits), without that guarantee.
        """
        if not 0 < self.header.num_shards <= _SNAPSHOT_MAX_FILES:
            return True
        for shard in range(self.header.num_shards):
            try:
                f = self._file(shard)
            except (CheckpointNotFoundError, NotARegularFileError):
                continue  # reported when a tensor in it is read
            if isinstance(f, LocalFile):
                self._sidecar(shard, f)
        return identity(self.index_path) == ident

    # --- index ------------------------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[str, BundleEntry]]:
        """Every tensor (not the per-slice keys) in key order, with its validated entry."""
        for key, value in self._table:
            if key and key[0] != 0:
                yield _label(key), self._validate(key, self._decode(key, value))

    def raw_entries(self) -> Iterator[tuple[bytes, BundleEntry]]:
        """Every entry including slice keys, undecoded names, unvalidated (for merging and tools)."""
        for key, value in self._table:
            if key:
                yield key, self._decode(key, value)

    def _get(self, key: bytes) -> bytes | None:
        """The raw value of ``key``.  After many lookups the whole index is turned into a dictionary
        once (one pass over the table), so restoring 100,000 tensors does not seek 100,000 times."""
        if self._values is not None:
            return self._values.get(key)
        self._lookups += 1
        if self._lookups > _BULK_AFTER:
            self._values = dict(self._table)
            return self._values.get(key)
        return self._table.get(key)

    def has_tensor(self, name: str | bytes) -> bool:
        key = _as_key(name)
        return bool(key) and self._get(key) is not None

    def entry(self, name: str | bytes) -> BundleEntry:
        key = _as_key(name)
        value = self._get(key) if key else None  # key "" is the header, not a tensor
        if value is None:
            raise self._not_found(key)
        return self._validate(key, self._decode(key, value))

    def entries_of(self, keys: Sequence[bytes]) -> list[BundleEntry]:
        """`entry` for many keys (bytes) at once: one pass, without a call per lookup step."""
        if self._values is None and len(keys) + self._lookups > _BULK_AFTER:
            self._values = dict(self._table)
        values = self._values
        out: list[BundleEntry] = []
        append, decode, validate = out.append, decode_entry, self._validate
        for key in keys:
            value = (values.get(key) if values is not None else self._get(key)) if key else None
            if value is None:
                raise self._not_found(key)
            try:
                entry = decode(value)
            except CorruptCheckpointError as exc:
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {_label(key)} in {self.index_path}: {exc}") from None
            append(validate(key, entry))
        return out

    def _not_found(self, key: bytes) -> TensorNotFoundError:
        """TensorFlow's message, with the closest names the checkpoint does hold (one pass over the index)."""
        names = (_label(k) for k, _ in self._table if k and k[0] != 0)
        return TensorNotFoundError(not_found_message(_label(key), self.prefix, close_matches(_label(key), names)))

    def _decode(self, key: bytes, value: bytes) -> BundleEntry:
        try:
            return decode_entry(value)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{self.prefix}: tensor {_label(key)} in {self.index_path}: {exc}") from None

    def _validate(self, key: bytes, e: BundleEntry) -> BundleEntry:
        if not e.slices:  # the common case, checked in a few steps; anything it refuses is looked at fully below
            itemsize = ITEMSIZE.get(e.dtype)
            shape = e.shape
            if (itemsize is not None and (not shape or min(shape) >= 0) and e.offset >= 0
                    and 0 <= e.shard_id < max(self.header.num_shards, 1)
                    and e.size == math.prod(shape) * itemsize <= _INT64_MAX):
                return e
        return self._validate_fully(key, e)

    def _validate_fully(self, key: bytes, e: BundleEntry) -> BundleEntry:
        where = _Where(self.prefix, key)
        opaque = e.dtype in OPAQUE
        try:
            dtype = np.dtype(np.uint8) if opaque else to_numpy(e.dtype)
        except CheckpointError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if e.shape and min(e.shape) < 0:
            raise CorruptCheckpointError(f"{where}: Invalid tensor shape {list(e.shape)}")
        count = math.prod(e.shape)
        if count > _INT64_MAX:
            raise CorruptCheckpointError(f"{where}: shape {list(e.shape)} has more than 2^63-1 elements")
        if e.slices:
            for s in e.slices:
                if s.rank != len(e.shape):
                    raise CorruptCheckpointError(f"{where}: slice {s} does not match rank of {list(e.shape)}")
                try:
                    s.slice_shape(e.shape)
                except CheckpointError:
                    raise CorruptCheckpointError(f"{where}: slice {s} lies outside shape {list(e.shape)}") from None
            return e
        if not 0 <= e.shard_id < max(self.header.num_shards, 1) or e.offset < 0 or e.size < 0:
            raise CorruptCheckpointError(
                f"{where}: bad location shard={e.shard_id} offset={e.offset} size={e.size} "
                f"(bundle has {self.header.num_shards} shards)"
            )
        if opaque:  # listed and copied as bytes, never decoded: only their place in the data file matters
            pass
        elif e.dtype == DataType.STRING:
            if count > e.size:
                raise CorruptCheckpointError(f"{where}: {count} strings cannot fit in {e.size} bytes")
        elif e.size != count * dtype.itemsize:
            raise CorruptCheckpointError(
                f"{where}: Invalid size in bundle entry: {e.size} bytes for {count} elements of {dtype}"
            )
        return e

    # --- data files -------------------------------------------------------------------------------

    def _file(self, shard_id: int) -> RandomAccess:
        cached = self._files.get(shard_id)
        if cached is None:
            path = data_filename(self.prefix, shard_id, self.header.num_shards)
            cached = open_random(path)
            self._files[shard_id] = cached
        return cached

    def _locate(self, key: bytes, e: BundleEntry) -> RandomAccess:
        try:
            f = self._file(e.shard_id)
        except (CheckpointNotFoundError, NotARegularFileError) as exc:
            raise type(exc)(f"{self.prefix}: tensor {_label(key)}: {exc}") from None
        if e.offset + e.size > f.size:
            raise TruncatedFileError(
                f"{self.prefix}: tensor {_label(key)} needs bytes [{e.offset}, {e.offset + e.size}) "
                f"of {f.path}, which has {f.size} bytes"
            )
        return f

    def _pread_into(self, f: RandomAccess, views: list[memoryview], offset: int, verify_crc: int | None) -> int:
        """Fill ``views`` (consecutive in the file) from ``offset``; returns the CRC of the bytes when asked,
        taken chunk by chunk right after each chunk is read, while it is in cache (extending ``verify_crc``)."""
        crc = verify_crc or 0
        # (a remote read is one GET per call, so it stays large)
        step = _READ_CHECKED if verify_crc is not None and isinstance(f, LocalFile) else _READ_CHUNK
        pos = offset
        batch: list[memoryview] = []
        size = 0
        for view in views:
            # Large buffers go in chunks; small ones (rows) are gathered into one vectored read.
            for start in range(0, len(view), step):
                batch.append(view[start : start + step])
                size += len(batch[-1])
                if size >= step or len(batch) == IOV_MAX:
                    f.read_into(batch, pos)
                    if verify_crc is not None:
                        for b in batch:
                            crc = crc32c_bulk(b, crc)
                    pos += size
                    batch, size = [], 0
        if batch:
            f.read_into(batch, pos)
            if verify_crc is not None:
                for b in batch:
                    crc = crc32c_bulk(b, crc)
        return crc

    def _pread_array(self, f: RandomAccess, arr: np.ndarray, offset: int, verify_crc: int | None) -> int:
        """Fill ``arr`` (C-contiguous, or with contiguous rows: `rows_of`) from consecutive file bytes at
        ``offset``; returns the CRC of the bytes when asked (extending ``verify_crc``).

        Short rows of a strided array (a column block) are not read one iovec each: the kernel copies
        thousands of short iovecs several times slower than one buffer.  They are read ``_BOUNCE``
        bytes at a time into one reused buffer, checksummed there while hot, and copied into place; only
        the 2-D row view is built for them, never a buffer per row.
        """
        if arr.flags.c_contiguous:
            views = [arr.reshape(-1).view(np.uint8).data] if arr.size else []
            return self._pread_into(f, views, offset, verify_crc)
        rows = rows_of(arr)
        if rows is None:
            raise AssertionError("_pread_array needs an array with contiguous rows")
        rowbytes = rows.shape[1] * arr.itemsize
        if rowbytes >= _BOUNCE_ROW:
            return self._pread_into(f, [r.view(np.uint8).data for r in rows], offset, verify_crc)
        per = max(1, _BOUNCE // rowbytes)
        buf = getattr(_bounce, "buf", None)
        if buf is None or len(buf) < per * rowbytes:
            buf = _bounce.buf = np.empty(max(_BOUNCE, rowbytes), np.uint8)
        crc = verify_crc or 0
        pos = offset
        for start in range(0, rows.shape[0], per):
            chunk = rows[start : start + per]
            staged = buf[: chunk.nbytes]
            f.read_into([staged.data], pos)
            if verify_crc is not None:
                crc = crc32c_bulk(staged.data, crc)
            chunk[...] = staged.view(rows.dtype).reshape(chunk.shape)
            pos += chunk.nbytes
        return crc

    def _mapped(self, key: bytes, e: BundleEntry, f: RandomAccess, first: int, shape: tuple[int, ...],
                check: bool, chunks: bool = False) -> np.ndarray | None:
        """Bytes ``first`` onward of entry ``e``, as an array of ``shape`` over a private mapping of the file
        (the range is checked by `_locate`), CRC-checked over the whole entry when ``check``, else over the
        sidecar's chunks around it when ``chunks`` (`_chunk_span`); None when this read copies instead (mmap
        off, a small or string or byte-swapped or misaligned piece, a remote store)."""
        if not self._mmap or e.dtype == DataType.STRING:
            return None
        dtype = to_numpy(e.dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if (nbytes < _MMAP_MIN or (self.header.endianness == BIG_ENDIAN and dtype.itemsize > 1)
                or (e.offset + first) % dtype.alignment):
            return None
        span = self._chunk_span(e, f, first, nbytes) if chunks and not check else None
        check = check or span is True
        start, size = (e.offset, e.size) if check else (e.offset + first, nbytes)
        if isinstance(span, _Span):
            start, size = e.offset + span.lo, span.hi - span.lo
        got = f.map_private(start, size)
        if got is None:
            return None
        mapping, at = got
        if check:
            with memoryview(mapping) as view:
                crc = crc32c_bulk(view[at : at + size])
            if crc != unmask_crc(e.crc32c):
                raise _crc_error(f"{self.prefix}: tensor {_label(key)} in {f.path}", e, crc)
            at += first
        elif isinstance(span, _Span):
            with memoryview(mapping) as view:
                crc = crc32c_bulk(view[at : at + size])
            if crc != span.crc:
                raise self._chunk_error(key, e, f, span)
            at += first - span.lo
        return np.frombuffer(mapping, np.uint8, nbytes, at).view(dtype).reshape(shape)

    def _read_whole(self, key: bytes, e: BundleEntry, verify: Verify, out: np.ndarray | None = None) -> np.ndarray:
        if e.dtype in OPAQUE:
            raise self._refuse_opaque(key, e)
        f = self._locate(key, e)
        where = f"{self.prefix}: tensor {_label(key)} in {f.path}"
        dtype = to_numpy(e.dtype)
        if len(e.shape) > _NPY_MAXDIMS or not _numpy_can_hold(e.shape, dtype.itemsize):
            raise CorruptCheckpointError(f"{where}: shape {list(e.shape)} cannot be held in a numpy array")
        if out is None:
            mapped = self._mapped(key, e, f, 0, e.shape, bool(verify))
            if mapped is not None:
                return mapped
        count = math.prod(e.shape)
        if e.dtype == DataType.STRING:
            buf = bytearray(e.size)
            self._pread_into(f, [memoryview(buf)], e.offset, None)
            expected = unmask_crc(e.crc32c) if verify else None
            return strings.decode(bytes(buf), count, where, expected).reshape(e.shape)
        in_place = out is not None and (out.flags.c_contiguous or rows_of(out) is not None)
        target: np.ndarray = out if out is not None and in_place else np.empty(e.shape, dtype)
        crc = self._pread_array(f, target, e.offset, 0 if verify else None)
        if verify and crc != unmask_crc(e.crc32c):
            raise _crc_error(where, e, crc)
        if self.header.endianness == BIG_ENDIAN and dtype.itemsize > 1:
            target.byteswap(inplace=True)
        if out is not None and target is not out:
            out[...] = target
        return target

    def _read_region(self, key: bytes, e: BundleEntry, local: Bounds, verify: Verify, dst: np.ndarray) -> None:
        """Fill ``dst`` with the box ``local`` (coordinates inside the stored entry).

        A whole entry is read straight into ``dst`` when ``dst`` is contiguous, its CRC checked; a
        part is read as the one byte range that spans it, straight into ``dst`` when both the range and
        ``dst`` are contiguous, else through a buffer.  A part is checked (when ``verify``) against the
        data file's sidecar: widened to whole chunks whose CRCs the sidecar holds, or, for a piece of at
        most one chunk, read whole and checked by its own CRC; with no usable sidecar it is not checked.
        """
        whole = all(lo == 0 and hi == dim for (lo, hi), dim in zip(local, e.shape))
        if whole and e.dtype != DataType.STRING:
            self._read_whole(key, e, verify, out=dst)
            return
        box = tuple(slice(lo, hi) for lo, hi in local)
        if whole or e.dtype == DataType.STRING or verify == "full":
            dst[...] = self._read_whole(key, e, verify)[box]
            return
        f = self._locate(key, e)
        dtype = to_numpy(e.dtype)
        strides = [dtype.itemsize] * len(e.shape)
        for d in range(len(e.shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * e.shape[d + 1]
        first = sum(lo * s for (lo, _), s in zip(local, strides))
        last = sum((hi - 1) * s for (_, hi), s in zip(local, strides))
        nbytes = last - first + dtype.itemsize
        span = self._chunk_span(e, f, first, nbytes) if verify and dst.size else None
        if span is True:
            dst[...] = self._read_whole(key, e, verify)[box]
            return
        swap = self.header.endianness == BIG_ENDIAN and dtype.itemsize > 1
        if nbytes == dst.nbytes and (dst.flags.c_contiguous or rows_of(dst) is not None):
            if isinstance(span, _Span):
                crc = self._crc_of_range(f, e.offset + span.lo, first - span.lo, 0)
                crc = self._pread_array(f, dst, e.offset + first, crc)
                crc = self._crc_of_range(f, e.offset + first + nbytes, span.hi - first - nbytes, crc)
                if crc != span.crc:
                    raise self._chunk_error(key, e, f, span)
            else:
                self._pread_array(f, dst, e.offset + first, None)
            if swap:
                dst.byteswap(inplace=True)
            return
        self._read_span(key, e, f, span if isinstance(span, _Span) else None, first, nbytes, [(first, local, dst)])

    def _read_span(self, key: bytes, e: BundleEntry, f: RandomAccess, span: _Span | None, first: int,
                   nbytes: int, parts: Sequence[tuple[int, Bounds, np.ndarray]]) -> None:
        """Read bytes ``[first, first + nbytes)`` of entry ``e`` once (widened to ``span`` when it checks
        them) into this thread's scratch buffer and copy each of ``parts`` (its first byte, its box in the
        entry, its destination) out of it."""
        dtype = to_numpy(e.dtype)
        lo, hi = (span.lo, span.hi) if span is not None else (first, first + nbytes)
        buf = _scratch(hi - lo)
        crc = self._pread_into(f, [buf.data], e.offset + lo, 0 if span is not None else None)
        if span is not None and crc != span.crc:
            if span.table is None:  # the whole piece, checked by its own CRC
                raise _crc_error(f"{self.prefix}: tensor {_label(key)} in {f.path}", e, crc)
            raise self._chunk_error(key, e, f, span)
        strides = [dtype.itemsize] * len(e.shape)
        for d in range(len(e.shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * e.shape[d + 1]
        swap = self.header.endianness == BIG_ENDIAN and dtype.itemsize > 1
        for start, local, dst in parts:
            region = np.ndarray(tuple(b - a for a, b in local), dtype, buffer=buf, offset=start - lo,
                                strides=tuple(strides))
            dst[...] = region.byteswap() if swap else region

    def _read_regions(self, key: bytes, e: BundleEntry, parts: Sequence[tuple[Bounds, np.ndarray]],
                      verify: Verify) -> None:
        """Fill each destination with its box of entry ``e``, reading each stored byte at most once: boxes
        whose byte ranges overlap (column blocks of one piece) are read together as one range and copied
        out of it; the others are read as `_read_region` reads one."""
        if len(parts) < 2 or e.dtype == DataType.STRING or verify == "full":
            for local, dst in parts:
                self._read_region(key, e, local, verify, dst)
            return
        itemsize = to_numpy(e.dtype).itemsize
        spans = sorted((*_byte_range(local, e.shape, itemsize), i) for i, (local, dst) in enumerate(parts) if dst.size)
        groups: list[list[tuple[int, int, int]]] = []
        end = 0
        for lo, hi, i in spans:
            if groups and lo < end:
                groups[-1].append((lo, hi, i))
            else:
                groups.append([(lo, hi, i)])
            end = max(end, hi) if len(groups[-1]) > 1 else hi
        for group in groups:
            if len(group) == 1:
                local, dst = parts[group[0][2]]
                self._read_region(key, e, local, verify, dst)
                continue
            first, last = group[0][0], max(hi for _, hi, _ in group)
            f = self._locate(key, e)
            span: _Span | bool | None = None
            if verify and first == 0 and last == e.size:  # the whole piece: its own CRC checks it
                span = _Span(0, e.size, unmask_crc(e.crc32c), np.zeros(0, np.uint32), None)
            elif verify:
                span = self._chunk_span(e, f, first, last - first)
                if span is True:
                    span = _Span(0, e.size, unmask_crc(e.crc32c), np.zeros(0, np.uint32), None)
            self._read_span(key, e, f, span if isinstance(span, _Span) else None, first, last - first,
                            [(lo, parts[i][0], parts[i][1]) for lo, _, i in group])

    def _chunk_span(self, e: BundleEntry, f: RandomAccess, first: int, nbytes: int) -> _Span | bool | None:
        """How to check a read of bytes ``[first, first + nbytes)`` of entry ``e``: the chunks around it
        (a `_Span`), True when the piece is at most one chunk (read it whole: its own CRC checks it), or
        None when nothing can (no usable sidecar, or one that does not record this very piece)."""
        table = self._sidecar(e.shard_id, f)
        if table is None:
            return None
        size = table.chunk_size
        if e.size <= size:
            return True
        crcs = table.chunks_of(e.offset, e.size, e.crc32c)
        if crcs is None:
            return None
        k0, k1 = first // size, (first + nbytes - 1) // size
        lo, hi = k0 * size, min((k1 + 1) * size, e.size)
        picked = crcs[k0 : k1 + 1]
        return _Span(lo, hi, combine_chunks(picked, size, hi - k1 * size), picked, table)

    _sidecars: dict[int, ChunkTable | None] | None = None

    def _sidecar(self, shard_id: int, f: RandomAccess) -> ChunkTable | None:
        """The sidecar of data file ``shard_id``, loaded on first use (None: none, or unusable)."""
        cache = self._sidecars
        if cache is None:
            cache = self._sidecars = {}
        if shard_id not in cache:  # two threads may both load it: the same answer either way
            cache[shard_id] = chunks.load(sidecar_filename(f.path), f.size)
        return cache[shard_id]

    def _crc_of_range(self, f: RandomAccess, offset: int, nbytes: int, crc: int) -> int:
        """``crc`` extended over file bytes ``[offset, offset + nbytes)`` (less than a chunk: the widening)."""
        if nbytes <= 0:
            return crc
        buf = bytearray(nbytes)
        f.read_into([memoryview(buf)], offset)
        return crc32c_bulk(buf, crc)

    def _chunk_error(self, key: bytes, e: BundleEntry, f: RandomAccess, span: _Span) -> ChecksumMismatchError:
        """The error for a widened read whose bytes do not match their chunk CRCs, naming the bad chunk."""
        if span.table is None:
            raise AssertionError("a whole-piece span is reported by _crc_error")
        size = span.table.chunk_size
        bad = (e.offset + span.lo, e.offset + span.hi)
        for i, start in enumerate(range(span.lo, span.hi, size)):
            end = min(start + size, span.hi)
            if self._crc_of_range(f, e.offset + start, end - start, 0) != int(span.chunk_crcs[i]):
                bad = (e.offset + start, e.offset + end)
                break
        return ChecksumMismatchError(
            f"{self.prefix}: tensor {_label(key)} in {f.path}: bytes [{bad[0]}, {bad[1]}) at offset {bad[0]} "
            f"do not match their chunk checksum in {span.table.path} (a partial read of the {e.size}-byte "
            f"stored piece at offset {e.offset})"
        )

    # --- tensors ----------------------------------------------------------------------------------

    def stored_slices(self, name: str | bytes, entry: BundleEntry | None = None) -> list[StoredSlice]:
        """The pieces a tensor is stored as (one full piece for an unpartitioned tensor).

        Every read goes through here, so this is where pieces that overlap are refused (TF's
        TensorSliceSet rule): two pieces holding the same element could give two clients, or two
        boxes, different values for it.  A partitioned tensor's list is checked once and kept.
        """
        key = _as_key(name)
        e = entry if entry is not None else self.entry(key)
        if not e.slices:
            return [StoredSlice(key, tuple((0, d) for d in e.shape), e)]
        cached = self._pieces.get(key)
        if cached is not None:
            return list(cached)
        out = []
        for s in e.slices:
            skey = encode_slice_key(key, s)
            value = self._get(skey)
            if value is None:
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {_label(key)} lists slice {s} but its data entry is missing"
                )
            se = self._validate(skey, self._decode(skey, value))
            if se.slices or se.dtype != e.dtype or se.shape != s.slice_shape(e.shape):
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {_label(key)} slice {s} entry has dtype {se.dtype} shape "
                    f"{list(se.shape)}, expected dtype {e.dtype} shape {list(s.slice_shape(e.shape))}"
                )
            out.append(StoredSlice(skey, s.bounds(e.shape), se))
        pair = find_overlap([p.bounds for p in out])
        if pair is not None:
            raise CorruptCheckpointError(
                f"{self.prefix}: tensor {_label(key)} has overlapping stored slices "
                f"{TensorSlice.from_bounds(pair[0])} and {TensorSlice.from_bounds(pair[1])} in {self.index_path}"
            )
        self._pieces[key] = out
        return list(out)

    def read_many(self, items: Sequence[tuple[bytes, BundleEntry]], *, verify: Verify = True) -> list[np.ndarray]:
        """Whole unpartitioned entries (validated, as `entry` gives them), each as its own array.

        Entries under 1 MiB that lie close together in a data file are read with one call per run of
        them into one buffer, their CRC32Cs checked there, and returned as arrays over that buffer
        (distinct entries never share bytes: an entry overlapping another is read on its own).  A
        checkpoint of 100,000 small tensors is read in a few calls instead of 100,000.
        """
        out: list[np.ndarray | None] = [None] * len(items)
        bulk: list[tuple[int, int, int]] = []
        for i, (key, e) in enumerate(items):
            if e.slices:
                raise InvalidArgumentError(f"{self.prefix}: tensor {_label(key)} is partitioned; read it whole")
            if e.dtype == DataType.STRING or e.dtype in OPAQUE or e.size >= _BULK_MAX:
                out[i] = self._read_whole(key, e, verify)
            else:
                bulk.append((e.shard_id, e.offset, i))
        bulk.sort()
        swap = self.header.endianness == BIG_ENDIAN
        kinds: dict[int, np.dtype] = {}
        n, at = len(bulk), 0
        while at < n:
            shard, start, i = bulk[at]
            key, e = items[i]
            f = self._locate(key, e)
            stop, end = at + 1, start + e.size
            while stop < n:  # extend the run while the next entry follows closely and does not overlap
                shard2, offset, j = bulk[stop]
                size = items[j][1].size
                if shard2 != shard or offset < end or offset - end > _BULK_GAP or offset + size - start > _BULK_SPAN:
                    break
                if offset + size > f.size:
                    self._locate(items[j][0], items[j][1])  # raises, naming the tensor
                end = offset + size
                stop += 1
            buf = np.empty(end - start, np.uint8)
            if end > start:
                f.read_into([buf.data], start)
            run = bulk[at:stop]
            if verify:  # every CRC of the run, then one vectorised comparison
                mv = memoryview(buf)  # type: ignore[arg-type]
                got = [crc32c(mv[o - start : o - start + items[j][1].size]) for _, o, j in run]
                want = np.array([items[j][1].crc32c for _, _, j in run], np.uint64)
                rot = (want - np.uint64(0xA282EAD8)) & np.uint64(0xFFFFFFFF)  # unmask_crc, vectorised
                want = ((rot >> np.uint64(17)) | (rot << np.uint64(15))) & np.uint64(0xFFFFFFFF)
                bad = np.flatnonzero(want != np.array(got, np.uint64))
                if bad.size:
                    k = int(bad[0])
                    key, e = items[run[k][2]]
                    raise _crc_error(f"{self.prefix}: tensor {_label(key)} in {f.path}", e, got[k])
            for _, offset, j in run:
                key, e = items[j]
                dtype = kinds.get(e.dtype)
                if dtype is None:
                    dtype = kinds[e.dtype] = to_numpy(e.dtype)
                shape = e.shape
                # `entry` checked size == elements x itemsize < 1 MiB: only a shape without elements or with
                # too many dims can still be one numpy cannot hold.
                if len(shape) > _NPY_MAXDIMS or not e.size and not _numpy_can_hold(shape, dtype.itemsize):
                    raise CorruptCheckpointError(f"{self.prefix}: tensor {_label(key)} in {f.path}: shape "
                                                 f"{list(shape)} cannot be held in a numpy array")
                if (offset - start) % dtype.alignment:  # a view would be misaligned: its own memory instead
                    arr = np.empty(shape, dtype)
                    arr.reshape(-1).view(np.uint8)[:] = buf[offset - start : offset - start + e.size]
                else:
                    arr = np.ndarray(shape, dtype, buf, offset - start)
                if swap and dtype.itemsize > 1:
                    arr.byteswap(inplace=True)
                out[j] = arr
            at = stop
        return out  # type: ignore[return-value]

    def _refuse_opaque(self, key: bytes, e: BundleEntry) -> UnsupportedDTypeError:
        path = data_filename(self.prefix, e.shard_id, self.header.num_shards)
        return UnsupportedDTypeError(
            f"{self.prefix}: tensor {_label(key)} in {path} is {datatype_name(e.dtype)} (shape {list(e.shape)}, "
            f"{e.size} bytes): its elements are TensorFlow objects, not numbers, so it cannot be read as an "
            "array; it is listed, verified and copied as stored bytes (`read_raw`)"
        )

    def read_raw(self, name: str | bytes, *, verify: bool = True) -> bytes:
        """The stored bytes of an unpartitioned entry of any dtype (DT_VARIANT too), as they sit in its data file.

        With ``verify``, checked against the entry's CRC32C as TensorFlow computes it: over the bytes for
        fixed-size types, the DT_STRING layout's own rule, and for DT_VARIANT over each element's length as
        8 little-endian bytes, its serialized bytes and its 4-byte element checksum (so the elements are
        walked, and one running past the entry or an element count that differs from the shape is
        `CorruptCheckpointError`).  DT_RESOURCE entries, which TensorFlow never writes, are not checked.
        """
        key = _as_key(name)
        e = self.entry(key)
        if e.slices:
            raise InvalidArgumentError(f"{self.prefix}: tensor {_label(key)} is partitioned; read its stored "
                                       "slices (`stored_slices`) one by one")
        return self._raw(key, e, verify)

    def _raw(self, key: bytes, e: BundleEntry, verify: bool) -> bytes:
        f = self._locate(key, e)
        buf = bytearray(e.size)
        if e.size:
            f.read_into([memoryview(buf)], e.offset)
        data = bytes(buf)
        if not verify or e.dtype == DataType.RESOURCE:
            return data
        where = f"{self.prefix}: tensor {_label(key)} in {f.path}"
        if e.dtype == DataType.VARIANT:
            crc = variant_crc(data, math.prod(e.shape), where)
        elif e.dtype == DataType.STRING:
            strings.decode(data, math.prod(e.shape), where, unmask_crc(e.crc32c))
            return data
        else:
            crc = crc32c_bulk(data)
        if crc != unmask_crc(e.crc32c):
            raise _crc_error(where, e, crc)
        return data

    def check_stored(self, piece: StoredSlice) -> None:
        """Read one stored piece and check its CRC32C (DT_VARIANT and DT_RESOURCE as stored bytes, `read_raw`)."""
        if piece.entry.dtype in OPAQUE:
            self._raw(piece.key, piece.entry, True)
        else:
            self._read_whole(piece.key, piece.entry, True)

    def read_stored(self, piece: StoredSlice, *, verify: Verify = True) -> np.ndarray:
        """The bytes of one stored piece as an array (CRC32C checked when ``verify``)."""
        return self._read_whole(piece.key, piece.entry, verify)

    def read(self, name: str | bytes, *, verify: Verify = True) -> np.ndarray:
        """The whole tensor; a partitioned tensor is assembled from its slices."""
        key = _as_key(name)
        e = self.entry(key)
        return self._assemble(key, e, tuple((0, d) for d in e.shape), verify)

    def read_slice(self, name: str | bytes, spec: str | TensorSlice, *, verify: Verify = True) -> np.ndarray:
        """A slice given as RestoreV2's ``shape_and_slice`` string (or a `TensorSlice`) of a tensor."""
        key = _as_key(name)
        e = self.entry(key)
        if isinstance(spec, str):
            if not spec:
                return self._assemble(key, e, tuple((0, d) for d in e.shape), verify)
            parsed = parse_shape_and_slice(spec)
            if parsed.shape != e.shape:
                raise ShapeMismatchError(
                    f"{self.prefix}: tensor_name = {_label(key)}; shape in shape_and_slice spec "
                    f"{list(parsed.shape)} does not match the shape stored in checkpoint: {list(e.shape)}"
                )
            tslice = parsed.slice
        else:
            tslice = spec
            tslice.slice_shape(e.shape)
        return self._assemble(key, e, tslice.bounds(e.shape), verify)

    def read_bounds(self, name: str | bytes, bounds: Sequence[tuple[int, int]], *, verify: Verify = True,
                    entry: BundleEntry | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The box ``bounds`` (half-open per dim) of a tensor (whose validated ``entry`` the caller may pass).

        With ``out`` (an array of the box's shape and the tensor's dtype) the bytes are read into it, so
        memory the caller already holds is filled in place and no new pages are touched; it is returned.
        """
        key = _as_key(name)
        e = entry if entry is not None else self.entry(key)
        return self._assemble(key, e, self._check_box(key, e, bounds, out), verify, out)

    def check_covered(self, name: str | bytes, bounds: Sequence[tuple[int, int]], *,
                      entry: BundleEntry | None = None) -> None:
        """Raise `InsufficientSlicesError` unless the stored slices fill the box ``bounds``; reads nothing."""
        key = _as_key(name)
        e = entry if entry is not None else self.entry(key)
        box = self._check_box(key, e, bounds, None)
        parts = [inter for p in self.stored_slices(key, e) if (inter := intersect_bounds(p.bounds, box)) is not None]
        _check_cover(self.prefix, key, box, parts)

    def read_boxes(self, name: str | bytes, boxes: Sequence[Sequence[tuple[int, int]]], *, verify: Verify = True,
                   entry: BundleEntry | None = None, outs: Sequence[np.ndarray | None] | None = None
                   ) -> list[np.ndarray]:
        """Several boxes of one tensor at once (`read_bounds` of each), reading every stored byte at most once:
        where two boxes need overlapping byte ranges of a stored piece (column blocks of it), that range is
        read once and both are copied out of it.  Every box and output is checked before any is written."""
        key = _as_key(name)
        e = entry if entry is not None else self.entry(key)
        dests = list(outs) if outs is not None else [None] * len(boxes)
        if len(dests) != len(boxes):
            raise InvalidArgumentError(f"{self.prefix}: tensor {_label(key)}: {len(boxes)} boxes, {len(dests)} outputs")
        checked = [self._check_box(key, e, b, o) for b, o in zip(boxes, dests)]
        dtype = to_numpy(e.dtype)
        if self._mmap or e.dtype == DataType.STRING or len(checked) < 2:
            return [self._assemble(key, e, b, verify, o) for b, o in zip(checked, dests)]
        itemsize = dtype.itemsize
        pieces = self.stored_slices(key, e)
        work: dict[int, list[tuple[Bounds, np.ndarray]]] = {}
        results: list[np.ndarray] = []
        for bounds in checked:
            shape = tuple(hi - lo for lo, hi in bounds)
            if len(e.shape) > _NPY_MAXDIMS or not _numpy_can_hold(shape, itemsize):
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {_label(key)} of shape {list(e.shape)}: a read of shape {list(shape)} "
                    "cannot be held in a numpy array"
                )
            parts = [(i, inter) for i, p in enumerate(pieces)
                     if (inter := intersect_bounds(p.bounds, bounds)) is not None]
            _check_cover(self.prefix, key, bounds, [inter for _, inter in parts])
            for i, _ in parts:
                p = pieces[i]
                if not _numpy_can_hold(p.entry.shape, itemsize):
                    raise CorruptCheckpointError(
                        f"{self.prefix}: tensor {_label(key)}: stored piece of shape {list(p.entry.shape)} "
                        "cannot be held in a numpy array"
                    )
                self._locate(p.key, p.entry)
        for bounds, out in zip(checked, dests):
            target = out if out is not None else np.empty(tuple(hi - lo for lo, hi in bounds), dtype)
            results.append(target)
            for i, p in enumerate(pieces):
                inter = intersect_bounds(p.bounds, bounds)
                if inter is None:
                    continue
                local = tuple((lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(inter, p.bounds))
                dst = tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(inter, bounds))
                work.setdefault(i, []).append((local, target[dst]))
        for i, parts_of in work.items():
            self._read_regions(pieces[i].key, pieces[i].entry, parts_of, verify)
        return results

    def reads_overlap(self, name: str | bytes, boxes: Sequence[Sequence[tuple[int, int]]],
                      entry: BundleEntry | None = None) -> bool:
        """Whether reading ``boxes`` one by one would read some stored bytes twice (then `read_boxes` saves)."""
        key = _as_key(name)
        e = entry if entry is not None else self.entry(key)
        itemsize = to_numpy(e.dtype).itemsize
        pieces = self.stored_slices(key, e)
        stored = {p.bounds for p in pieces}
        wanted = [tuple((int(a), int(b)) for a, b in bounds) for bounds in boxes]
        if all(b in stored for b in wanted):  # the saved layout: each box is one piece
            return False
        for p in pieces:
            ranges = []
            for bounds in wanted:
                inter = intersect_bounds(p.bounds, bounds)
                if inter is not None and box_volume(inter):
                    local = tuple((lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(inter, p.bounds))
                    ranges.append(_byte_range(local, p.entry.shape, itemsize))
            ranges.sort()
            if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
                return True
        return False

    def _check_box(self, key: bytes, e: BundleEntry, bounds: Sequence[tuple[int, int]],
                   out: np.ndarray | None) -> Bounds:
        box = tuple((int(a), int(b)) for a, b in bounds)
        if len(box) != len(e.shape):
            raise ShapeMismatchError(
                f"{self.prefix}: tensor {_label(key)} has rank {len(e.shape)} (shape {list(e.shape)}); the box "
                f"{[list(b) for b in box]} has rank {len(box)}"
            )
        for d, ((lo, hi), dim) in enumerate(zip(box, e.shape)):
            if not 0 <= lo <= hi <= dim:
                raise InvalidArgumentError(
                    f"{self.prefix}: tensor {_label(key)}: the box {[list(b) for b in box]} is not inside shape "
                    f"{list(e.shape)} in dimension {d}"
                )
        if out is not None:
            want = tuple(hi - lo for lo, hi in box)
            if e.dtype in OPAQUE:
                raise self._refuse_opaque(key, e)
            if tuple(out.shape) != want or out.dtype != to_numpy(e.dtype):
                raise ShapeMismatchError(
                    f"{self.prefix}: tensor {_label(key)}: the output array is {out.dtype}{list(out.shape)}, "
                    f"the read is {to_numpy(e.dtype)}{list(want)}"
                )
        return box

    def _assemble(self, key: bytes, e: BundleEntry, bounds: Bounds, verify: Verify,
                  out: np.ndarray | None = None) -> np.ndarray:
        # numpy refuses more than MAXDIMS dims, and dims whose non-zero product overflows intp even
        # for 0 elements (TF accepts both).  Every array below has the shape of the request or of a
        # stored piece it reads, so those are checked, not the full shape: TF reads a small slice of a
        # tensor whose full size would not fit in int64 bytes.
        if e.dtype in OPAQUE:
            raise self._refuse_opaque(key, e)
        itemsize = to_numpy(e.dtype).itemsize
        shape = tuple(hi - lo for lo, hi in bounds)
        if len(e.shape) > _NPY_MAXDIMS or not _numpy_can_hold(shape, itemsize):
            raise CorruptCheckpointError(
                f"{self.prefix}: tensor {_label(key)} of shape {list(e.shape)}: a read of shape {list(shape)} "
                "cannot be held in a numpy array"
            )
        pieces = self.stored_slices(key, e)
        for p in pieces:
            if p.bounds == bounds:
                if out is not None and e.dtype != DataType.STRING:
                    self._read_region(p.key, p.entry, tuple((0, d) for d in p.entry.shape), verify, out)
                    return out
                whole = self._read_whole(p.key, p.entry, verify)
                if out is not None:
                    out[...] = whole
                    return out
                return whole
        parts = []
        for p in pieces:
            inter = intersect_bounds(p.bounds, bounds)
            if inter is not None:
                parts.append((p, inter))
        _check_cover(self.prefix, key, bounds, [inter for _, inter in parts])
        for p, _ in parts:
            if not _numpy_can_hold(p.entry.shape, itemsize):
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {_label(key)}: stored piece of shape {list(p.entry.shape)} "
                    "cannot be held in a numpy array"
                )
            f = self._locate(p.key, p.entry)
        if out is None and self._mmap and len(parts) == 1:  # a block of leading rows of one piece: map it
            p, inter = parts[0]
            first = _contiguous_start(tuple((lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(inter, p.bounds)),
                                      p.entry.shape, itemsize)
            if first is not None:
                mapped = self._mapped(p.key, p.entry, f, first, shape, verify == "full", chunks=bool(verify))
                if mapped is not None:
                    return mapped
        if out is None:
            out = np.empty(shape, to_numpy(e.dtype))
        for p, inter in parts:
            local = tuple((lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(inter, p.bounds))
            dst = tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(inter, bounds))
            self._read_region(p.key, p.entry, local, verify, out[dst])
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._sidecars = None  # a snapshot retried after a change reads them again

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_CLOSE_WINDOW = 300


def close_matches(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (``difflib.get_close_matches``), best first.

    difflib costs tens of microseconds a name, seconds for 100,000; so from a large checkpoint only the
    names next to ``name`` in sorted order and in sorted order of reversed names (those sharing the
    longest prefix or suffix with it, where a typo's neighbours are) are compared.
    """
    pool = sorted(set(names))
    if len(pool) > 4 * _CLOSE_WINDOW:
        at = bisect.bisect_left(pool, name)
        near = pool[max(0, at - _CLOSE_WINDOW) : at + _CLOSE_WINDOW]
        backwards = sorted(p[::-1] for p in pool)
        at = bisect.bisect_left(backwards, name[::-1])
        near += [p[::-1] for p in backwards[max(0, at - _CLOSE_WINDOW) : at + _CLOSE_WINDOW]]
        pool = sorted(set(near))
    return difflib.get_close_matches(name, pool, n=n)


def not_found_message(name: str, prefix: str, close: Sequence[str]) -> str:
    """TensorFlow's "Key ... not found in checkpoint" message, naming the checkpoint and the closest names."""
    hint = f"; closest names: {', '.join(close)}" if close else ""
    return f"Key {name} not found in checkpoint {prefix}{hint}"


def _numpy_can_hold(shape: Sequence[int], itemsize: int) -> bool:
    """numpy's own limit: the product of the non-zero dims times the item size must fit in intp."""
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim or 1
    return nbytes <= _INT64_MAX


def _crc_error(where: str, e: BundleEntry, crc: int) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{where} ({e.size} bytes): checksum does not match: stored {unmask_crc(e.crc32c):#010x} "
        f"vs. calculated on the restored bytes {crc:#010x}"
    )


def _byte_range(local: Bounds, shape: Sequence[int], itemsize: int) -> tuple[int, int]:
    """The bytes ``[first, last)`` of a C-ordered array of ``shape`` that span the non-empty box ``local``."""
    first = last = 0
    stride = itemsize
    for d in range(len(shape) - 1, -1, -1):
        first += local[d][0] * stride
        last += (local[d][1] - 1) * stride
        stride *= shape[d]
    return first, last + itemsize


_SCRATCH_MAX = 64 << 20  # a thread keeps a scratch buffer up to this size for the next read; larger: fresh
_scratch_of = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """``nbytes`` of this thread's reused scratch memory (fresh pages cost a fault each on first touch)."""
    if nbytes > _SCRATCH_MAX:
        return np.empty(nbytes, np.uint8)
    buf = getattr(_scratch_of, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _scratch_of.buf = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf[:nbytes]


def _contiguous_start(local: Bounds, shape: Sequence[int], itemsize: int) -> int | None:
    """The byte offset of box ``local`` inside a C-ordered array of ``shape`` if the box is one contiguous
    range (leading dims of extent 1, then any range of one dim, then whole dims), else None."""
    k = 0
    while k < len(shape) - 1 and local[k][1] - local[k][0] == 1:
        k += 1
    if any(local[d] != (0, shape[d]) for d in range(k + 1, len(shape))):
        return None
    offset, stride = 0, itemsize
    for d in range(len(shape) - 1, -1, -1):
        offset += local[d][0] * stride
        stride *= shape[d]
    return offset


def _as_key(name: str | bytes) -> bytes:
    return name.encode("utf-8") if isinstance(name, str) else bytes(name)


def _check_cover(prefix: str, key: bytes, want: Bounds, boxes: list[Bounds]) -> None:
    """The parts of disjoint stored pieces (`stored_slices` proved them so) inside ``want`` must fill it:
    with no overlap, that is exactly when their volumes add up to its volume."""
    if want and box_volume(want) and sum(box_volume(b) for b in boxes) != box_volume(want):
        have = ", ".join(str(TensorSlice.from_bounds(b)) for b in boxes[:20]) or "none"
        more = f" and {len(boxes) - 20} more" if len(boxes) > 20 else ""
        raise InsufficientSlicesError(
            f"{prefix}: does not have sufficient slices for partitioned tensor {_label(key)} to read "
            f"{TensorSlice.from_bounds(want)}; stored slices overlapping it: {have}{more}"
        )


def variant_crc(data: bytes, count: int, where: str) -> int:
    """The CRC32C TensorFlow records for a DT_VARIANT entry of ``count`` elements stored as ``data``.

    Each element is stored as a varint length, that many bytes of its serialized ``VariantTensorDataProto``
    and a 4-byte checksum; the entry's CRC covers, per element, the length as a little-endian uint64 (not
    the varint), the bytes and the checksum.  Every length is checked against the bytes that remain.
    """
    crc, pos, end = 0, 0, len(data)
    for i in range(count):
        n, body = decode_varint(data, pos, end, f"{where}: DT_VARIANT element {i}")
        if n > end - body - 4:
            raise CorruptCheckpointError(
                f"{where}: DT_VARIANT element {i} of {n} bytes at offset {pos} runs past the entry's {end} bytes")
        crc = crc32c(data[body : body + n + 4], crc32c(_U64.pack(n), crc))
        pos = body + n + 4
    if pos != end:
        raise CorruptCheckpointError(
            f"{where}: {count} DT_VARIANT elements take {pos} of the entry's {end} bytes")
    return crc


_U64 = struct.Struct("<Q")
