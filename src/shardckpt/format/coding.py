"""Primitive encodings shared by the table and the protos: varints, fixed32, masked CRC32C.

Decoders take an explicit ``limit`` and raise `CorruptCheckpointError` instead of
reading past it, so every caller gets bounds checking for free.
"""

from __future__ import annotations

import os
import struct
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


def _fastest() -> tuple[Callable[..., int], str]:
    """The CRC32C function to use and its name.

    Checking a resharding restore's partial reads costs one CRC pass over every byte read, which with the
    ``crc32c`` package (SSE4.2 ``crc32``, ~20 GB/s on cache-hot bytes) is ~14 % of the unchecked restore.
    The optional ``crc32c-rs`` package folds with AVX-512 VPCLMULQDQ where the CPU has it (~50 GB/s on
    this project's machines), and also releases the GIL on large buffers.  It is used when installed, after a
    known-answer check against ``crc32c``; ``SHARDCKPT_CRC32C=crc32c`` keeps the ``crc32c`` package.
    """
    if os.environ.get("SHARDCKPT_CRC32C", "").strip().lower() == "crc32c":
        return _crc32c.crc32c, "crc32c"
    try:
        import crc32c_rs
    except ImportError:
        return _crc32c.crc32c, "crc32c"
    candidates: list[tuple[Callable[..., int], str]] = []
    variant = getattr(crc32c_rs, "crc32c_avx512vl_vpclmulqdq_v4s5x3", None)
    # Its automatic choice goes by CPU model and left this project's (Intel, AVX-512) at the SSE4.2 speed;
    # the variant is taken only if the kernel reports every instruction set it needs.
    if variant is not None and {"avx512f", "avx512vl", "vpclmulqdq", "pclmulqdq", "sse4_2"} <= _cpu_flags():
        candidates.append((variant, "crc32c-rs (avx512 vpclmulqdq)"))
    auto = getattr(crc32c_rs, "crc32c", None)
    if auto is not None:
        candidates.append((auto, "crc32c-rs"))
    probe = bytes(range(256)) * 70 + b"shardckpt"  # long enough for the folding paths, with a ragged tail
    want = _crc32c.crc32c(probe)
    for fn, name in candidates:
        try:
            if fn(probe) == want and fn(probe[999:], fn(probe[:999])) == want and fn(b"", 7) == 7:
                return fn, name
        except Exception:  # an unsupported CPU or an incompatible release: the next one, or crc32c
            continue
    return _crc32c.crc32c, "crc32c"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_crc, CRC32C_BACKEND = _fastest()


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, extending ``value``; hardware-accelerated, GIL released."""
    return _crc(data, value)


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
