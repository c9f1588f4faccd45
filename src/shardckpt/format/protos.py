"""The protobuf messages of the index, encoded by hand and byte-identical to TensorFlow.

TensorFlow serializes with proto3 rules: fields in number order, scalars equal to
their default omitted, set sub-messages written even when empty (a scalar's shape
is ``12 00``, a full slice extent ``0a 00``).  Decoders skip unknown fields, never
recurse beyond the fixed nesting of these messages, and check every length
against the bytes that hold it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import CorruptCheckpointError
from .coding import decode_varint, encode_varint, to_int32, to_int64
from .slices import FULL, TensorSlice

_fixed32 = struct.Struct("<I")

LITTLE_ENDIAN = 0
BIG_ENDIAN = 1


@dataclass(frozen=True)
class VersionDef:
    """TensorFlow's ``VersionDef``: the producer version and the consumers that may read the bundle."""
    producer: int = 1
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()


@dataclass(frozen=True)
class BundleHeader:
    """``BundleHeaderProto``, the index's entry under the empty key: data file count, byte order, version."""
    num_shards: int = 1
    endianness: int = LITTLE_ENDIAN
    version: VersionDef = VersionDef()


@dataclass
class BundleEntry:
    """``BundleEntryProto``: one tensor (or stored slice) of the index.

    ``dtype`` is a `DataType` code; ``offset`` and ``size`` are in bytes within data file ``shard_id``;
    ``crc32c`` is the masked CRC32C of those bytes; ``slices`` lists the stored slices of a partitioned tensor.
    """
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: list[TensorSlice] = field(default_factory=list)


# --- encoding -------------------------------------------------------------------------------------


def _ld(tag: bytes, payload: bytes) -> bytes:
    return tag + encode_varint(len(payload)) + payload


def encode_version(v: VersionDef) -> bytes:
    """The body of a ``VersionDef`` message."""
    out = b""
    if v.producer:
        out += b"\x08" + encode_varint(v.producer)
    if v.min_consumer:
        out += b"\x10" + encode_varint(v.min_consumer)
    if v.bad_consumers:
        out += _ld(b"\x1a", b"".join(encode_varint(c) for c in v.bad_consumers))
    return out


def encode_header(h: BundleHeader) -> bytes:
    """The serialized ``BundleHeaderProto``, as TensorFlow writes it."""
    out = b""
    if h.num_shards:
        out += b"\x08" + encode_varint(h.num_shards)
    if h.endianness:
        out += b"\x10" + encode_varint(h.endianness)
    return out + _ld(b"\x1a", encode_version(h.version))


_EMPTY_DIM = b"\x12\x00"


_shape_cache: dict[tuple[int, ...], bytes] = {}


def encode_shape(shape: tuple[int, ...]) -> bytes:
    """The body of a TensorShapeProto, length-prefixed (shapes repeat, so encodings are cached)."""
    cached = _shape_cache.get(shape)
    if cached is not None:
        return cached
    parts = []
    for dim in shape:
        if dim:
            body = b"\x08" + encode_varint(dim)
            parts.append(b"\x12" + encode_varint(len(body)) + body)
        else:
            parts.append(_EMPTY_DIM)
    body = b"".join(parts)
    out = b"\x12" + encode_varint(len(body)) + body
    if len(_shape_cache) < 4096:
        _shape_cache[shape] = out
    return out


def encode_slice(s: TensorSlice) -> bytes:
    """The body of a ``TensorSliceProto``: one extent per dimension, a full one as an empty message."""
    parts = []
    for start, length in s.extents:
        if length == FULL:
            parts.append(b"\x0a\x00")
        else:
            body = (b"\x08" + encode_varint(start) if start else b"") + b"\x10" + encode_varint(length)
            parts.append(b"\x0a" + encode_varint(len(body)) + body)
    return b"".join(parts)


def _varint(value: int) -> bytes:
    """`encode_varint`, with the sizes and offsets of a data file (under 2^28) spelled without a loop."""
    if 0 <= value < 0x4000:
        return encode_varint(value)
    if 0 < value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    if 0 < value < 0x10000000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, ((value >> 14) & 0x7F) | 0x80,
                      value >> 21))
    return encode_varint(value)


# (dtype, shape) -> the entry's first two fields: most entries of a model share a few of them.
_head_cache: dict[tuple[int, tuple[int, ...]], bytes] = {}


def entry_head(dtype: int, shape: tuple[int, ...], shard_id: int = 0) -> bytes:
    """An entry's fields before its offset: dtype, shape, shard_id."""
    kind = (dtype, shape)
    out = _head_cache.get(kind)
    if out is None:
        out = (b"\x08" + encode_varint(dtype) if dtype else b"") + encode_shape(shape)
        if len(_head_cache) < 4096:
            _head_cache[kind] = out
    if shard_id:
        out += b"\x18" + encode_varint(shard_id)
    return out


def encode_entry(e: BundleEntry) -> bytes:
    """The serialized ``BundleEntryProto``, byte-identical to TensorFlow's."""
    out = entry_head(e.dtype, e.shape, e.shard_id)
    if e.offset:
        out += b"\x20" + _varint(e.offset)
    if e.size:
        out += b"\x28" + _varint(e.size)
    if e.crc32c:
        out += b"\x35" + _fixed32.pack(e.crc32c)
    for s in e.slices:
        out += _ld(b"\x3a", encode_slice(s))
    return out


# --- decoding -------------------------------------------------------------------------------------


def _fields(buf: bytes, pos: int, end: int, what: str):
    """Yield (field_number, wire_type, value_or_start, stop) for each field in buf[pos:end]."""
    while pos < end:
        tag, pos = decode_varint(buf, pos, end, what)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise CorruptCheckpointError(f"{what}: field number 0")
        if wire == 0:
            value, pos = decode_varint(buf, pos, end, what)
            yield number, 0, value, pos
        elif wire == 2:
            length, pos = decode_varint(buf, pos, end, what)
            if length > end - pos:
                raise CorruptCheckpointError(f"{what}: field {number} length {length} runs past the message")
            yield number, 2, pos, pos + length
            pos += length
        elif wire == 5:
            if end - pos < 4:
                raise CorruptCheckpointError(f"{what}: truncated fixed32 field {number}")
            yield number, 5, _fixed32.unpack_from(buf, pos)[0], pos + 4
            pos += 4
        elif wire == 1:
            if end - pos < 8:
                raise CorruptCheckpointError(f"{what}: truncated fixed64 field {number}")
            yield number, 1, None, pos + 8
            pos += 8
        else:
            raise CorruptCheckpointError(f"{what}: unsupported wire type {wire} for field {number}")


def _expect(wire: int, want: int, number: int, what: str) -> None:
    if wire != want:
        raise CorruptCheckpointError(f"{what}: field {number} has wire type {wire}, expected {want}")


def decode_version(buf: bytes, pos: int, end: int) -> VersionDef:
    """The ``VersionDef`` in ``buf[pos:end]``; raises `CorruptCheckpointError` for a malformed message."""
    producer = min_consumer = 0
    bad: list[int] = []
    for number, wire, value, stop in _fields(buf, pos, end, "VersionDef"):
        if number == 1:
            _expect(wire, 0, number, "VersionDef")
            producer = to_int32(value)
        elif number == 2:
            _expect(wire, 0, number, "VersionDef")
            min_consumer = to_int32(value)
        elif number == 3:
            if wire == 0:
                bad.append(to_int32(value))
            elif wire == 2:
                p = value
                while p < stop:
                    v, p = decode_varint(buf, p, stop, "VersionDef.bad_consumers")
                    bad.append(to_int32(v))
            else:
                _expect(wire, 2, number, "VersionDef")
    return VersionDef(producer, min_consumer, tuple(bad))


def decode_header(buf: bytes) -> BundleHeader:
    """The ``BundleHeaderProto`` in ``buf``; raises `CorruptCheckpointError` for a malformed message."""
    num_shards, endianness, version = 0, 0, VersionDef(0, 0)
    for number, wire, value, stop in _fields(buf, 0, len(buf), "BundleHeaderProto"):
        if number == 1:
            _expect(wire, 0, number, "BundleHeaderProto")
            num_shards = to_int32(value)
        elif number == 2:
            _expect(wire, 0, number, "BundleHeaderProto")
            endianness = to_int32(value)
        elif number == 3:
            _expect(wire, 2, number, "BundleHeaderProto")
            version = decode_version(buf, value, stop)
    return BundleHeader(num_shards, endianness, version)


def decode_shape(buf: bytes, pos: int, end: int) -> tuple[int, ...]:
    """The dims of the ``TensorShapeProto`` in ``buf[pos:end]``; raises `CorruptCheckpointError` if malformed."""
    dims = []
    for number, wire, value, stop in _fields(buf, pos, end, "TensorShapeProto"):
        if number == 2:
            _expect(wire, 2, number, "TensorShapeProto")
            size = 0
            for n2, w2, v2, _ in _fields(buf, value, stop, "TensorShapeProto.Dim"):
                if n2 == 1:
                    _expect(w2, 0, n2, "TensorShapeProto.Dim")
                    size = to_int64(v2)
            dims.append(size)
        elif number == 3 and value:
            raise CorruptCheckpointError("Invalid tensor shape: unknown rank")
    return tuple(dims)


def decode_slice(buf: bytes, pos: int, end: int) -> TensorSlice:
    """The ``TensorSliceProto`` in ``buf[pos:end]``; raises `CorruptCheckpointError` for an invalid extent."""
    extents = []
    for number, wire, value, stop in _fields(buf, pos, end, "TensorSliceProto"):
        if number != 1:
            continue
        _expect(wire, 2, number, "TensorSliceProto")
        start, length = 0, FULL
        for n2, w2, v2, _ in _fields(buf, value, stop, "TensorSliceProto.Extent"):
            if n2 in (1, 2):
                _expect(w2, 0, n2, "TensorSliceProto.Extent")
                if n2 == 1:
                    start = to_int64(v2)
                else:
                    length = to_int64(v2)
        if length != FULL and (start < 0 or length <= 0 or start > (1 << 63) - 1 - length):
            raise CorruptCheckpointError(f"invalid slice extent start={start} length={length}")
        extents.append((start, length))
    return TensorSlice(tuple(extents))


_shape_decode_cache: dict[bytes, tuple[int, ...]] = {}


def _cached_shape(buf: bytes, pos: int, stop: int) -> tuple[int, ...]:
    body = buf[pos:stop]
    shape = _shape_decode_cache.get(body)
    if shape is None:
        shape = decode_shape(body, 0, len(body))
        if len(_shape_decode_cache) < 4096:
            _shape_decode_cache[body] = shape
    return shape


def _uvarint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A varint of at most 8 bytes (so below 2^56, no sign to take) at ``pos``, and the position after it;
    (-1, end) for anything else (truncated, longer), which the general decoder then reports."""
    v = shift = 0
    while pos < end and shift <= 49:
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, pos
        shift += 7
    return -1, end


# The first two fields (dtype and shape) as TF writes them -> (dtype, shape): they repeat across entries.
_head_decode_cache: dict[bytes, tuple[int, tuple[int, ...]]] = {}


def decode_entry(buf: bytes) -> BundleEntry:
    """Decode a BundleEntryProto; the canonical single-byte tags take a fast path."""
    end = len(buf)
    if end > 4 and buf[0] == 0x08 and buf[1] < 0x80 and buf[2] == 0x12 and buf[3] < 0x80 and 4 + buf[3] <= end:
        # TF's own layout: a one-byte dtype, then a short shape, seen before; then the location, by hand.
        stop = 4 + buf[3]
        head = buf[:stop]
        kind = _head_decode_cache.get(head)
        if kind is None:
            shape = decode_shape(buf, 4, stop)
            kind = (to_int32(buf[1]), shape)
            if len(_head_decode_cache) < 4096:
                _head_decode_cache[head] = kind
        # Then the location in TF's order, each field at most once; anything else goes the general way.
        pos, shard, offset, size, crc = stop, 0, 0, 0, 0
        if pos < end and buf[pos] == 0x18:
            shard, pos = _uvarint(buf, pos + 1, end)
            if shard < 0:
                return _decode_entry_slow(buf)
            shard = to_int32(shard)
        if pos < end and buf[pos] == 0x20:
            offset, pos = _uvarint(buf, pos + 1, end)
        if pos < end and buf[pos] == 0x28 and offset >= 0:
            size, pos = _uvarint(buf, pos + 1, end)
        if pos < end and buf[pos] == 0x35 and end - pos >= 5 and size >= 0:
            crc = _fixed32.unpack_from(buf, pos + 1)[0]
            pos += 5
        if pos != end or offset < 0 or size < 0:
            return _decode_entry_slow(buf)
        return BundleEntry(kind[0], kind[1], shard, offset, size, crc)
    return _decode_entry_slow(buf)


def _decode_entry_slow(buf: bytes) -> BundleEntry:
    e = BundleEntry()
    pos, end = 0, len(buf)
    varint = decode_varint
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x08:
            v, pos = varint(buf, pos, end, "BundleEntryProto.dtype")
            e.dtype = to_int32(v)
        elif tag == 0x12 or tag == 0x3A:
            n, pos = varint(buf, pos, end, "BundleEntryProto")
            stop = pos + n
            if stop > end:
                raise CorruptCheckpointError(f"BundleEntryProto: field length {n} runs past the message")
            if tag == 0x12:
                e.shape = _cached_shape(buf, pos, stop)
            else:
                e.slices.append(decode_slice(buf, pos, stop))
            pos = stop
        elif tag == 0x18:
            v, pos = varint(buf, pos, end, "BundleEntryProto.shard_id")
            e.shard_id = to_int32(v)
        elif tag == 0x20:
            v, pos = varint(buf, pos, end, "BundleEntryProto.offset")
            e.offset = to_int64(v)
        elif tag == 0x28:
            v, pos = varint(buf, pos, end, "BundleEntryProto.size")
            e.size = to_int64(v)
        elif tag == 0x35:
            if end - pos < 4:
                raise CorruptCheckpointError("BundleEntryProto: truncated crc32c")
            e.crc32c = _fixed32.unpack_from(buf, pos)[0]
            pos += 4
        else:
            return _decode_entry_general(buf)
    return e


def _decode_entry_general(buf: bytes) -> BundleEntry:
    """Any valid encoding: multi-byte tags, unknown fields, wrong wire types (reported)."""
    e = BundleEntry()
    end = len(buf)
    for number, wire, value, stop in _fields(buf, 0, end, "BundleEntryProto"):
        if number == 1:
            _expect(wire, 0, number, "BundleEntryProto")
            e.dtype = to_int32(value)
        elif number == 2:
            _expect(wire, 2, number, "BundleEntryProto")
            e.shape = decode_shape(buf, value, stop)
        elif number == 3:
            _expect(wire, 0, number, "BundleEntryProto")
            e.shard_id = to_int32(value)
        elif number == 4:
            _expect(wire, 0, number, "BundleEntryProto")
            e.offset = to_int64(value)
        elif number == 5:
            _expect(wire, 0, number, "BundleEntryProto")
            e.size = to_int64(value)
        elif number == 6:
            _expect(wire, 5, number, "BundleEntryProto")
            e.crc32c = value
        elif number == 7:
            _expect(wire, 2, number, "BundleEntryProto")
            e.slices.append(decode_slice(buf, value, stop))
    return e


def pack_entries(entries: list[tuple[bytes, BundleEntry]]) -> bytes:
    """Entries as ``(varint len, key, varint len, BundleEntryProto)*``: how clients ship index pieces."""
    out: list[bytes] = []
    small = _SMALL_VARINTS
    for key, entry in entries:
        value = encode_entry(entry)
        n, m = len(key), len(value)
        out += (small[n] if n < 128 else encode_varint(n), key, small[m] if m < 128 else encode_varint(m), value)
    return b"".join(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def unpack_entries(buf: bytes) -> list[tuple[bytes, BundleEntry]]:
    """The inverse of `pack_entries`; raises `CorruptCheckpointError` for a malformed buffer."""
    return [(key, decode_entry(value)) for key, value in unpack_raw_entries(buf)]


def unpack_raw_entries(buf: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, encoded entry) pairs of a `pack_entries` buffer, not decoded."""
    out: list[tuple[bytes, bytes]] = []
    append = out.append
    pos, end = 0, len(buf)
    while pos < end:
        n = buf[pos]
        if n < 0x80:  # one-byte lengths, the common case, without a call
            pos += 1
        else:
            n, pos = decode_varint(buf, pos, end, "packed entries")
        if n > end - pos:
            raise CorruptCheckpointError("packed entries: key runs past the buffer")
        key = buf[pos : pos + n]
        pos += n
        if pos >= end:
            raise CorruptCheckpointError("packed entries: truncated entry length")
        n = buf[pos]
        if n < 0x80:
            pos += 1
        else:
            n, pos = decode_varint(buf, pos, end, "packed entries")
        if n > end - pos:
            raise CorruptCheckpointError("packed entries: entry runs past the buffer")
        append((key, buf[pos : pos + n]))
        pos += n
    return out
