"""Writing bundles: one data file of tensor bytes in call order, one sorted index.

`DataFileWriter` appends tensors to a single data file and returns their index
entries; `BundleWriter` pairs one with the index to reproduce what one
``SaveV2`` call writes.  Bytes go from the caller's array to the file without an
intermediate copy for tensors of 256 KiB or more; the CRC of each chunk is taken
just before the chunk is written, while it is still in cache.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import NamedTuple

import numpy as np

from ..errors import (
    CheckpointError,
    DTypeMismatchError,
    DuplicateTensorError,
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDTypeError,
)
from . import strings
from .chunks import ChunkCrc, ChunkSums, sidecar_filename
from .coding import crc32c, crc32c_bulk, mask_crc
from .dtypes import DataType, datatype_name, from_numpy, to_numpy
from .files import (
    STAGING,
    TEMPSTATE,
    data_filename,
    index_filename,
    io_error,
    make_parent_directory,
    publish,
    staging_data_filename,
    staging_index_filename,
)
from .protos import BundleEntry, BundleHeader, encode_entry, encode_header
from .slices import ShapeAndSlice, encode_slice_key, parse_shape_and_slice
from .table import TableBuilder

_SMALL_WRITE = 256 * 1024
_CHUNK = 4 * 1024 * 1024


class PreparedTensor(NamedTuple):
    """A tensor ready to write: its DataType, shape, and bytes (or string elements).

    A tuple, not a dataclass: a save of 100,000 small tensors makes one per tensor.
    """

    dtype: int
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


# (numpy dtype, DataType) pairs seen by `prepare` whose bytes are already the stored form, as they are.
STORED_AS_IS: dict[tuple[np.dtype, int], bool] = {}


def prepare(
    array: object, dtype: int | None = None, what: str = "tensor", *, contiguous: bool = True
) -> PreparedTensor:
    """Check a value and bring it to the on-disk layout: little-endian, and C order unless ``contiguous``
    is False (then a strided view is kept for a writer that gathers rows itself). Copies only if needed."""
    if type(array) is np.ndarray and dtype is not None and (array.dtype, dtype) in STORED_AS_IS:
        # Seen before: a numeric dtype stored as is (checked below on first sight), so only the order matters.
        if contiguous and not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        return PreparedTensor(dtype, array.shape, array)
    arr = np.asarray(array)
    try:
        code = from_numpy(arr.dtype) if dtype is None else int(dtype)
        if code != DataType.STRING:
            to_numpy(code)  # refuses variant, resource and unknown codes
    except UnsupportedDTypeError as exc:
        raise UnsupportedDTypeError(f"{what}: {exc}") from None
    if code == DataType.STRING:
        if arr.dtype.kind not in "OSU":
            raise DTypeMismatchError(f"{what}: DT_STRING needs a bytes or str array, got {arr.dtype}")
        try:
            return PreparedTensor(code, arr.shape, strings.to_bytes_list(arr))
        except TypeError as exc:
            raise UnsupportedDTypeError(f"{what}: {exc}") from None
    want = to_numpy(code)
    if arr.dtype.newbyteorder("=") != want.newbyteorder("="):
        raise DTypeMismatchError(f"{what}: array of dtype {arr.dtype} cannot be stored as {datatype_name(code)}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    elif arr.dtype.isnative and len(STORED_AS_IS) < 256:
        STORED_AS_IS[(arr.dtype, code)] = True
    return PreparedTensor(code, arr.shape, np.ascontiguousarray(arr) if contiguous else arr)


class DataFileWriter:
    """Appends tensors to one data file; never seeks, so the bytes land in call order."""

    def __init__(self, path: str, *, shard_id: int = 0, alignment: int = 1, sums: ChunkSums | None = None) -> None:
        self.path = path
        self.shard_id = shard_id
        self.alignment = alignment
        self.sums = sums  # when given, collects the chunk CRCs of every piece over one chunk (the sidecar)
        self.size = 0
        self._pending = bytearray()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def _write_now(self, view: memoryview) -> None:
        assert self._fd is not None
        while view:
            view = view[os.write(self._fd, view) :]

    def _append(self, view: memoryview | bytes, crc: int, acc: ChunkCrc | None = None) -> int:
        """Queue or write ``view`` and return the CRC extended over it (into ``acc``, chunk by chunk, when given:
        then the value returned means nothing)."""
        n = len(view)
        if n < _SMALL_WRITE and acc is None:  # below coding.BULK_MIN: the small-buffer CRC, no size dispatch
            crc = crc32c(view, crc)
            self._pending += view
            if len(self._pending) >= _CHUNK:
                self._flush_pending()
        else:
            self._flush_pending()
            mv = memoryview(view)
            for start in range(0, n, _CHUNK):
                chunk = mv[start : start + _CHUNK]
                if acc is not None:
                    acc.update(chunk)
                else:
                    crc = crc32c_bulk(chunk, crc)
                self._write_now(chunk)
        self.size += n
        return crc

    def _flush_pending(self) -> None:
        if self._pending:
            self._write_now(memoryview(self._pending))
            self._pending = bytearray()

    def write(self, tensor: PreparedTensor) -> BundleEntry:
        """Append one tensor, then zeros up to a multiple of ``alignment`` bytes; returns its index entry.

        Raises `CheckpointError` once the file is closed.
        """
        if self._fd is None:
            raise CheckpointError(f"{self.path}: data file already closed")
        entry = BundleEntry(dtype=tensor.dtype, shape=tensor.shape, shard_id=self.shard_id, offset=self.size)
        acc = None
        if isinstance(tensor.data, list):  # strings are always read whole: no chunk CRCs
            pieces, crc = strings.encode(tensor.data)
            for piece in pieces:
                self._append(piece, 0)
        else:
            flat = tensor.data.reshape(-1).view(np.uint8)
            acc = ChunkCrc(self.sums.chunk_size) if self.sums is not None and self.sums.wants(flat.size) else None
            crc = self._append(flat.data, 0, acc) if flat.size else 0
            if acc is not None:
                crc = acc.finish()
        entry.size = self.size - entry.offset
        entry.crc32c = mask_crc(crc)
        if acc is not None and self.sums is not None:
            self.sums.add(entry.offset, entry.size, entry.crc32c, acc.crcs)
        if self.alignment > 1 and self.size % self.alignment:
            pad = self.alignment - self.size % self.alignment
            self._pending += bytes(pad)
            self.size += pad
        return entry

    def close(self, *, durable: bool) -> None:
        """Write out what is buffered and close the file, fsynced first when ``durable``; a second call does nothing."""
        if self._fd is None:
            return
        try:
            self._flush_pending()
            if durable:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and delete the file, for a save that is abandoned."""
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def build_index(header: BundleHeader, entries: Mapping[bytes, BundleEntry | bytes]) -> bytes:
    """The bytes of an index: the header under key "" then every entry in bytewise key order.

    An entry may be given already encoded (bytes), as clients ship most of them.
    """
    table = TableBuilder()
    table.add(b"", encode_header(header))
    keys = sorted(entries)
    given = list(map(entries.__getitem__, keys))
    values = [v if isinstance(v, bytes) else encode_entry(v) for v in given]
    table.add_sorted_columns(keys, values)
    return table.finish()


def write_file_atomically(path: str, data: bytes, *, durable: bool, midway: Callable[[], None] | None = None) -> None:
    """Write ``data`` to a fresh temporary name beside ``path``, then rename it over ``path``.

    ``midway`` runs when half the bytes are written (a fault-injection point for tests).
    """
    tmp = f"{path}{TEMPSTATE}{secrets.randbits(64)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        half = len(view) // 2
        while len(view) > half:
            view = view[os.write(fd, view[: len(view) - half]) :]
        if midway is not None:
            midway()
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _key(name: str | bytes) -> bytes:
    key = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    if not key:
        raise InvalidArgumentError("the empty tensor name is reserved for the bundle header")
    return key


class BundleWriter:
    """Writes one single-writer bundle at ``prefix``, as ``SaveV2`` does.

    Call `add` / `add_slice` once per SaveV2 argument, in order, then `finish`.
    Files are written under the commit protocol's staging names
    (``<final>.staging-TOKEN``) and published as a multi-client save is: an older
    checkpoint at the prefix is replaced only once the new data and index are
    complete and durable, so a full disk or a crash never loses it, and
    ``commit.recover`` (``shardckpt clean``) finishes or discards what a killed
    writer left.  Used as a context manager, an exception discards the staged files.
    An operating-system failure raises `CheckpointIOError` and discards the bundle.
    """

    def __init__(self, prefix: str | os.PathLike[str], *, data_alignment: int = 1, durable: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        if data_alignment < 1:
            raise InvalidArgumentError(f"data_alignment must be >= 1, got {data_alignment}")
        self._durable = durable
        self._entries: dict[bytes, BundleEntry] = {}
        self._token = secrets.token_hex(8)
        make_parent_directory(self.prefix)
        self._data_path = data_filename(self.prefix, 0, 1)
        staged = staging_data_filename(self.prefix, 0, 1, self._token)
        # The sidecar is staged under the commit protocol's name for it, so `commit.recover` treats it as a save's.
        self._sidecar = sidecar_filename(self._data_path) + STAGING + self._token
        self._sums = ChunkSums()
        try:
            self._data = DataFileWriter(staged, alignment=data_alignment, sums=self._sums)
        except OSError as exc:
            raise io_error(exc, self.prefix, staged, "create the data file") from exc
        self._done = False

    def _check_open(self) -> None:
        if self._done:
            raise CheckpointError(f"{self.prefix}: bundle writer already finished or aborted")

    def _write(self, tensor: PreparedTensor, label: str) -> BundleEntry:
        try:
            return self._data.write(tensor)
        except OSError as exc:
            # Part of the tensor may be in the file: the offsets of later ones would be wrong.
            self.abort()
            raise io_error(exc, self.prefix, self._data.path, f"write {label} to") from exc

    def add(self, name: str | bytes, array: object, *, dtype: int | None = None) -> BundleEntry:
        """Store a whole tensor under ``name`` (SaveV2 with an empty shape_and_slice)."""
        self._check_open()
        key = _key(name)
        if key in self._entries:
            raise DuplicateTensorError(f"{self.prefix}: adding duplicate key: {key.decode('utf-8', 'replace')}")
        label = f"tensor {key.decode('utf-8', 'replace')}"
        tensor = prepare(array, dtype, f"{self.prefix}: {label}")
        entry = self._write(tensor, label)
        self._entries[key] = entry
        return entry

    def add_slice(
        self,
        name: str | bytes,
        shape_and_slice: str | ShapeAndSlice,
        array: object,
        *,
        dtype: int | None = None,
    ) -> BundleEntry:
        """Store ``array`` as one slice of the tensor ``name`` (SaveV2 with a shape_and_slice string)."""
        self._check_open()
        if isinstance(shape_and_slice, str):
            if not shape_and_slice:
                return self.add(name, array, dtype=dtype)
            spec = parse_shape_and_slice(shape_and_slice)
        else:
            spec = shape_and_slice
        key = _key(name)
        label = f"{self.prefix}: tensor {key.decode('utf-8', 'replace')}"
        tensor = prepare(array, dtype, label)
        if tensor.shape != spec.slice_shape:
            raise ShapeMismatchError(
                f"{label}: slice in shape_and_slice specification does not match the shape of the tensor "
                f"to save: {spec.slice_shape} vs {tensor.shape}"
            )
        if spec.slice.covers(spec.shape):
            return self.add(name, tensor.data if tensor.dtype != DataType.STRING else array, dtype=tensor.dtype)
        full = self._entries.get(key)
        if full is not None:
            if not full.slices:
                raise DuplicateTensorError(f"{label}: already added as a whole tensor")
            if full.dtype != tensor.dtype or full.shape != spec.shape:
                raise ShapeMismatchError(
                    f"{label}: slice of {datatype_name(tensor.dtype)}{list(spec.shape)} added to a tensor "
                    f"of {datatype_name(full.dtype)}{list(full.shape)}"
                )
        slice_key = encode_slice_key(key, spec.slice)
        if slice_key in self._entries:
            raise DuplicateTensorError(f"{label}: slice {spec.slice} added twice")
        self._entries[slice_key] = self._write(tensor, f"tensor {key.decode('utf-8', 'replace')} slice {spec.slice}")
        if full is None:
            full = self._entries[key] = BundleEntry(dtype=tensor.dtype, shape=spec.shape)
        full.slices.append(spec.slice)
        return full

    def finish(self) -> None:
        """Complete the staged data file and index, then publish them under their final names.

        On failure before the old index is removed, the staged files are deleted and an older checkpoint at
        the prefix is untouched.
        """
        self._check_open()
        self._done = True
        index_path = index_filename(self.prefix)
        staged_index = staging_index_filename(self.prefix, self._token)
        doing, path = "write the data file", self._data.path
        try:
            self._data.close(durable=self._durable)
            doing, path = "write the chunk checksums", self._sidecar
            self._sums.save(self._sidecar, self._data.size, self._durable)  # always: it replaces an older one
            doing, path = "write the index", staged_index
            write_file_atomically(staged_index, build_index(BundleHeader(), self._entries), durable=self._durable)
            doing, path = "publish the index", index_path
            publish(self.prefix, staged_index, [(self._data.path, self._data_path)], durable=self._durable,
                    sidecars=[(self._sidecar, sidecar_filename(self._data_path))])
        except BaseException as exc:
            # Past the commit point (staged index complete, old index gone) the staged files are the
            # checkpoint: they are left for `commit.recover` to roll forward.
            if os.path.lexists(index_path) or not os.path.lexists(staged_index):
                self._data.discard()
                _unlink(self._sidecar)
                _unlink(staged_index)
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
                raise io_error(exc, self.prefix, path, doing) from exc
            raise

    def abort(self) -> None:
        """Discard everything written so far; the final names are untouched."""
        if not self._done:
            self._done = True
            self._data.discard()

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finish()


