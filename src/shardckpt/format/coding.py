"""Primitive encodings shared by the table and the protos: varints, fixed32, masked CRC32C.

Decoders take an explicit ``limit`` and raise `CorruptCheckpointError` instead of
reading past it, so every caller gets bounds checking for free.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import crc32c as _crc32c

from ..errors import CorruptCheckpointError

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

_fixed32 = struct.Struct("<I")
pack_fixed32 = _fixed32.pack
unpack_fixed32_from = _fixed32.unpack_from

# The one-byte varints are by far the most common (lengths, tags, small sizes).
_SMALL = [bytes((i,)) for i in range(128)]


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, extending ``value``; hardware-accelerated, GIL released."""
    return _crc32c.crc32c(data, value)


# Bulk checksums (a data file's bytes as they are written or read) are a large share of a save's and a restore's
# CPU: the crc32c package runs ~22 GB/s per core here (SSE4.2), awscrt's AVX-512 folding ~45 GB/s, the same
# function.  awscrt's extension costs ~50 ms to load, so it is loaded on the first large buffer only (a process
# that handles small tensors, as most CLI calls and test clients do, never pays it); `load_bulk_crc` loads it
# ahead, and without awscrt (a platform with no wheel) the crc32c package does the bulk work too.
BULK_MIN = 256 * 1024
_bulk: Callable[[bytes | bytearray | memoryview, int], int] | None = None
_bulk_lock = threading.Lock()
BULK_IMPLEMENTATION = "crc32c"  # set by load_bulk_crc: "awscrt" when that is what bulk checksums use


def load_bulk_crc() -> str:
    """Load the bulk CRC32C implementation now (it is otherwise loaded on first use); returns its name."""
    global _bulk, BULK_IMPLEMENTATION
    with _bulk_lock:
        if _bulk is None:
            try:
                from awscrt.checksums import crc32c as fast
            except ImportError:
                _bulk = _crc32c.crc32c
            else:
                _bulk, BULK_IMPLEMENTATION = fast, "awscrt"
    return BULK_IMPLEMENTATION


def crc32c_bulk(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """`crc32c` for buffers that may be large: those of `BULK_MIN` bytes or more go to the bulk implementation."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size < BULK_MIN:
        return _crc32c.crc32c(data, value)
    fast = _bulk
    if fast is None:
        load_bulk_crc()
        fast = _bulk
        assert fast is not None
    return fast(data, value)


def mask_crc(crc: int) -> int:
    """LevelDB's CRC mask: rotate right by 15 and add a constant, so a CRC of CRCs stays strong."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask_crc(masked: int) -> int:
    """The CRC32C that `mask_crc` turned into ``masked``."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def encode_varint(value: int) -> bytes:
    """Base-128 varint of an unsigned value (negative int64s are taken two's-complement, as protobuf does)."""
    if 0 <= value < 16384:
        return _SMALL[value] if value < 128 else bytes(((value & 0x7F) | 0x80, value >> 7))
    value &= _U64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, limit: int, what: str = "varint") -> tuple[int, int]:
    """Decode one varint64 starting at ``pos``; never reads at or beyond ``limit``."""
    if pos < limit:
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
    result = 0
    shift = 0
    while True:
        if pos >= limit:
            raise CorruptCheckpointError(f"truncated {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result > _U64:
                raise CorruptCheckpointError(f"{what} overflows 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise CorruptCheckpointError(f"{what} longer than 10 bytes")


def to_int64(value: int) -> int:
    """Reinterpret a decoded uint64 varint as the int64 that protobuf would give."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_int32(value: int) -> int:
    """protobuf int32 semantics: a varint is truncated to its low 32 bits, then sign-taken."""
    value &= _U32
    return value - (1 << 32) if value >= (1 << 31) else value
