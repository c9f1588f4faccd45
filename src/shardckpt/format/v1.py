"""TensorFlow's V1 checkpoint format (``Saver(write_version=V1)``, ``SaveSlices``): read only.

A V1 checkpoint is one file, or several named by a pattern such as ``model-?????-of-00002``.  Each file is
an SSTable (the same table as a bundle's ``.index``) whose key ``""`` holds a ``SavedTensorSlices`` message
with only its ``meta``: per tensor its name, shape, dtype and the slices this file stores.  Every stored
slice is the value of its slice key (``encode_slice_key(name, slice)``, a full slice for an unpartitioned
tensor): a ``SavedTensorSlices`` whose ``data`` is a ``SavedSlice`` (name, slice, and a ``TensorProto``
holding the values in its typed repeated field: ``float_val``, ``int_val``, ``string_val`` ...).

Safety: a file is read whole, within its ``fstat`` size, and parsed by `Table` (every block CRC
checked).  A slice must lie inside its tensor's shape, slices must not overlap (TensorFlow's
TensorSliceSet rule), a record must hold at least one byte per element it claims before anything is
decoded, and the values decoded must be exactly the slice's element count.  A whole-tensor read needs
slices that cover the tensor, and is allocated only after every covering record passed the byte check,
so no read allocates more than a small multiple of the bytes on disk.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InsufficientSlicesError,
    NotARegularFileError,
    UnsupportedDTypeError,
)
from ..storage import read_regular
from .coding import to_int32
from .dtypes import DataType, datatype_name, to_numpy
from .protos import _fields, decode_shape, decode_slice, decode_version
from .slices import TensorSlice, box_volume, encode_slice_key, find_overlap
from .table import Table

_INT64_MAX = (1 << 63) - 1
_CONSUMER = 1  # TF_CHECKPOINT_VERSION: the consumer version a reader of this format is

# TensorProto field holding the values of each dtype, and how they are encoded there.
_FLOAT, _DOUBLE, _INT, _STRING, _SCOMPLEX, _INT64, _BOOL, _DCOMPLEX, _HALF, _UINT32, _UINT64 = (
    5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17)
_FIELD: dict[int, int] = {
    DataType.FLOAT: _FLOAT, DataType.DOUBLE: _DOUBLE, DataType.INT32: _INT, DataType.UINT8: _INT,
    DataType.INT16: _INT, DataType.INT8: _INT, DataType.UINT16: _INT, DataType.QINT8: _INT,
    DataType.QUINT8: _INT, DataType.QINT16: _INT, DataType.QUINT16: _INT, DataType.QINT32: _INT,
    DataType.STRING: _STRING, DataType.COMPLEX64: _SCOMPLEX, DataType.COMPLEX128: _DCOMPLEX,
    DataType.INT64: _INT64, DataType.BOOL: _BOOL, DataType.HALF: _HALF, DataType.BFLOAT16: _HALF,
    DataType.UINT32: _UINT32, DataType.UINT64: _UINT64,
}
# Fixed-width packed fields: numpy dtype of one stored number, and stored numbers per element.
_FIXED = {_FLOAT: ("<f4", 1), _DOUBLE: ("<f8", 1), _SCOMPLEX: ("<f4", 2), _DCOMPLEX: ("<f8", 2)}
_FIXED_WIRE = {_FLOAT: 5, _DOUBLE: 1, _SCOMPLEX: 5, _DCOMPLEX: 1}


@dataclass
class V1Tensor:
    """One tensor of a V1 checkpoint: dtype code, shape, and its stored slices with the file holding each."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    slices: list[tuple[TensorSlice, int]] = field(default_factory=list)


def is_v1_checkpoint(pattern: str) -> bool:
    """Whether ``pattern`` names V1 checkpoint files: a regular file, or a glob matching at least one."""
    return bool(_match(pattern))


def _match(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    return [pattern] if os.path.isfile(pattern) else []


class V1Reader:
    """The tensors of the V1 checkpoint at ``pattern`` (a file, or a glob of files as the state file names)."""

    def __init__(self, pattern: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(pattern)
        self.files = _match(self.prefix)
        if not self.files:
            raise CheckpointNotFoundError(f"no checkpoint at {self.prefix}: no V1 checkpoint file matches it")
        self._tables: list[Table] = []
        self.tensors: dict[str, V1Tensor] = {}
        for i, path in enumerate(self.files):
            try:
                data = read_regular(path)[0]
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self.prefix}: V1 checkpoint file {path} disappeared") from None
            except NotARegularFileError as exc:
                raise NotARegularFileError(f"{self.prefix}: {exc}") from None
            table = Table(data, path)
            self._tables.append(table)
            self._load_meta(i, path, table)
        for t in self.tensors.values():
            pair = find_overlap([s.bounds(t.shape) for s, _ in t.slices])
            if pair is not None:
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {t.name} has overlapping stored slices {TensorSlice.from_bounds(pair[0])} "
                    f"and {TensorSlice.from_bounds(pair[1])}")

    def _load_meta(self, i: int, path: str, table: Table) -> None:
        value = table.get(b"")
        if value is None:
            raise CorruptCheckpointError(f"{self.prefix}: {path} has no V1 metadata entry (key \"\")")
        where = f"{self.prefix}: {path}: V1 metadata"
        meta = None
        for number, wire, start, stop in _fields(value, 0, len(value), where):
            if number == 1 and wire == 2:
                meta = (start, stop)
        if meta is None:
            raise CorruptCheckpointError(f"{where}: the entry under key \"\" holds no SavedTensorSliceMeta")
        for number, wire, start, stop in _fields(value, meta[0], meta[1], where):
            if number == 2 and wire == 2:
                v = decode_version(value, start, stop)
                if v.producer < 0 or v.min_consumer > _CONSUMER or _CONSUMER in v.bad_consumers:
                    raise CorruptCheckpointError(
                        f"{where}: checkpoint version producer={v.producer} min_consumer={v.min_consumer} "
                        f"bad_consumers={list(v.bad_consumers)} is not readable by this consumer ({_CONSUMER})")
        for number, wire, start, stop in _fields(value, meta[0], meta[1], where):
            if number == 1 and wire == 2:
                self._add_tensor(i, path, value, start, stop)

    def _add_tensor(self, i: int, path: str, buf: bytes, pos: int, end: int) -> None:
        where = f"{self.prefix}: {path}: V1 metadata"
        name, dtype, slices = b"", 0, []
        shape: tuple[int, ...] = ()
        for number, wire, start, stop in _fields(buf, pos, end, where):
            if number == 1 and wire == 2:
                name = buf[start:stop]
            elif number == 2 and wire == 2:
                shape = decode_shape(buf, start, stop)
            elif number == 3 and wire == 0:
                dtype = to_int32(start)
            elif number == 4 and wire == 2:
                slices.append(decode_slice(buf, start, stop))
        label = name.decode("utf-8", "replace")
        where = f"{self.prefix}: tensor {label} in {path}"
        if (shape and min(shape) < 0) or math.prod(shape) > _INT64_MAX:
            raise CorruptCheckpointError(f"{where}: invalid shape {list(shape)}")
        for s in slices:
            if s.rank != len(shape):
                raise CorruptCheckpointError(f"{where}: slice {s} does not match the rank of {list(shape)}")
            try:
                s.slice_shape(shape)
            except CheckpointError:
                raise CorruptCheckpointError(f"{where}: slice {s} lies outside shape {list(shape)}") from None
        seen = self.tensors.get(label)
        if seen is None:
            seen = self.tensors[label] = V1Tensor(label, dtype, shape)
        elif seen.shape != shape or seen.dtype != dtype:
            raise CorruptCheckpointError(
                f"{where}: {datatype_name(dtype)}{list(shape)} here, {datatype_name(seen.dtype)}{list(seen.shape)} "
                f"in {self.files[seen.slices[0][1]] if seen.slices else 'another file'}")
        seen.slices.extend((s, i) for s in slices)

    def names(self) -> Iterator[str]:
        """Every tensor name, sorted."""
        return iter(sorted(self.tensors))

    def read(self, name: str) -> np.ndarray:
        """The whole tensor, assembled from its stored slices (which must cover it)."""
        t = self.tensors[name]
        try:
            dtype = to_numpy(t.dtype)
        except UnsupportedDTypeError as exc:
            raise UnsupportedDTypeError(f"{self.prefix}: tensor {name}: {exc}") from None
        full = tuple((0, d) for d in t.shape)
        volume = box_volume(full) if full else 1
        parts = [(s, i, s.bounds(t.shape)) for s, i in t.slices]
        if sum(box_volume(b) if b else 1 for _, _, b in parts) != volume:
            have = ", ".join(str(s) for s, _, _ in parts[:20]) or "none"
            raise InsufficientSlicesError(
                f"{self.prefix}: does not have sufficient slices for partitioned tensor {name}: shape "
                f"{list(t.shape)}, stored slices: {have}")
        records = []
        for s, i, bounds in parts:  # every record's size is checked before the output exists
            key = encode_slice_key(name.encode("utf-8"), s)
            path = self.files[i]
            value = self._tables[i].get(key)
            if value is None:
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {name} lists slice {s} in {path} but its data entry is missing")
            count = box_volume(bounds) if bounds else 1
            if count > len(value):
                raise CorruptCheckpointError(
                    f"{self.prefix}: tensor {name} slice {s} in {path}: {count} elements cannot fit in a "
                    f"{len(value)}-byte record")
            records.append((s, path, bounds, value, count))
        if len(parts) == 1 and parts[0][2] == full:
            s, path, _, value, count = records[0]
            return self._decode(name, s, path, value, count, t.dtype, dtype).reshape(t.shape)
        out = np.empty(t.shape, dtype)
        for s, path, bounds, value, count in records:
            piece = self._decode(name, s, path, value, count, t.dtype, dtype)
            out[tuple(slice(lo, hi) for lo, hi in bounds)] = piece.reshape(tuple(hi - lo for lo, hi in bounds))
        return out

    def _decode(self, name: str, s: TensorSlice, path: str, value: bytes, count: int, code: int,
                dtype: np.dtype) -> np.ndarray:
        where = f"{self.prefix}: tensor {name} slice {s} in {path}"
        data = None
        for number, wire, start, stop in _fields(value, 0, len(value), where):
            if number == 2 and wire == 2:
                data = (start, stop)
        if data is None:
            raise CorruptCheckpointError(f"{where}: the record holds no SavedSlice")
        proto = None
        for number, wire, start, stop in _fields(value, data[0], data[1], where):
            if number == 1 and wire == 2 and value[start:stop] != name.encode("utf-8"):
                raise CorruptCheckpointError(f"{where}: the record is of tensor {value[start:stop]!r}")
            if number == 2 and wire == 2 and decode_slice(value, start, stop) != s:
                raise CorruptCheckpointError(f"{where}: the record holds slice {decode_slice(value, start, stop)}")
            if number == 3 and wire == 2:
                proto = (start, stop)
        if proto is None:
            return self._values(where, value, 0, 0, count, code, dtype)
        return self._values(where, value, proto[0], proto[1], count, code, dtype)

    def _values(self, where: str, buf: bytes, pos: int, end: int, count: int, code: int,
                dtype: np.dtype) -> np.ndarray:
        number = _FIELD.get(code)
        if number is None:
            raise UnsupportedDTypeError(f"{where}: {datatype_name(code)} is not stored in V1 checkpoints")
        if number == _STRING:
            items = [buf[a:b] for n, w, a, b in _fields(buf, pos, end, where) if n == _STRING and w == 2]
            if len(items) != count:
                raise CorruptCheckpointError(f"{where}: {len(items)} strings stored for {count} elements")
            out = np.empty(count, object)
            out[:] = items
            return out
        chunks: list[np.ndarray] = []
        for n, w, a, b in _fields(buf, pos, end, where):
            if n != number:
                continue
            if number in _FIXED:
                kind, _ = _FIXED[number]
                width = np.dtype(kind).itemsize
                if w == 2:  # packed, as TensorFlow writes them
                    if (b - a) % width:
                        raise CorruptCheckpointError(f"{where}: packed field of {b - a} bytes is not whole values")
                    chunks.append(np.frombuffer(buf, kind, (b - a) // width, a))
                elif w == _FIXED_WIRE[number]:
                    chunks.append(np.frombuffer(buf, kind, 1, b - width))
            elif w == 2:
                chunks.append(_varints(buf, a, b, where))
            elif w == 0:
                chunks.append(np.array([a], np.uint64))
        stored = np.concatenate(chunks) if chunks else np.empty(0, np.uint64 if number not in _FIXED else "<f4")
        per = _FIXED[number][1] if number in _FIXED else 1
        if stored.size != count * per:
            raise CorruptCheckpointError(f"{where}: {stored.size // per} values stored for {count} elements")
        if number in _FIXED:
            return stored.view(dtype) if per == 2 else stored.astype(dtype)
        if number == _HALF:
            return stored.astype(np.uint16).view(dtype)
        if number == _BOOL:
            return stored != 0
        # int_val/int64_val hold sign-extended 64-bit values: wrap to the target width as TensorFlow's cast does.
        return stored.view(np.int64).astype(dtype)

    def stored_bytes(self, name: str) -> int:
        """The bytes of the records holding a tensor's slices (its values as V1 encodes them)."""
        t = self.tensors[name]
        total = 0
        for s, i in t.slices:
            value = self._tables[i].get(encode_slice_key(name.encode("utf-8"), s))
            total += len(value) if value is not None else 0
        return total

    def close(self) -> None:
        """Drop the tables read (the files were read whole; nothing stays open)."""
        self._tables.clear()


def _varints(buf: bytes, start: int, stop: int, where: str) -> np.ndarray:
    """The packed varints in ``buf[start:stop]`` as uint64, decoded without a Python loop per value."""
    raw = np.frombuffer(buf, np.uint8, stop - start, start)
    if raw.size == 0:
        return np.empty(0, np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise CorruptCheckpointError(f"{where}: truncated varint in a packed field")
    starts = np.concatenate(([0], ends[:-1] + 1))
    if int((ends - starts).max()) >= 10:
        raise CorruptCheckpointError(f"{where}: varint longer than 10 bytes in a packed field")
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = (np.arange(raw.size) - starts[group]).astype(np.uint64) * np.uint64(7)
    parts = (raw & 0x7F).astype(np.uint64) << shift
    return np.bitwise_or.reduceat(parts, starts)
