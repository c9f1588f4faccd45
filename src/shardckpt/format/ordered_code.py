"""TensorFlow's OrderedCode: byte strings whose memcmp order is the order of the encoded values.

Only the three forms that slice keys use are here: unsigned numbers, strings and
signed numbers, each with an encoder and a bounds-checked decoder.
"""

from __future__ import annotations

import re

from ..errors import CorruptCheckpointError

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_ESCAPES = re.compile(rb"[\x00\xff]")
_ESCAPED = {b"\x00": b"\x00\xff", b"\xff": b"\xff\x00"}


def encode_num_increasing(value: int) -> bytes:
    """Length byte (0..8) then the value big-endian with leading zeros dropped."""
    if not 0 <= value < (1 << 64):
        raise ValueError(f"unsigned 64-bit value out of range: {value}")
    n = (value.bit_length() + 7) // 8
    return bytes((n,)) + value.to_bytes(n, "big")


def encode_string(data: bytes) -> bytes:
    """Escape 0x00 as 00 ff and 0xff as ff 00, then terminate with 00 01."""
    if b"\x00" in data or b"\xff" in data:
        data = _ESCAPES.sub(lambda m: _ESCAPED[m.group()], data)
    return data + b"\x00\x01"


def encode_signed_num_increasing(value: int) -> bytes:
    """Signed varint whose leading bits hold the length; negatives are the complement form."""
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"signed 64-bit value out of range: {value}")
    magnitude = value if value >= 0 else ~value
    n = magnitude.bit_length() // 7 + 1  # bytes needed for 7n-1 value bits plus the sign
    # Two's complement in n bytes, with the n top bits flipped: they read as n one-bits
    # (the length) for a non-negative value, n zero-bits for a negative one.
    header = ((1 << n) - 1) << (8 * n - n)
    encoded = (value & ((1 << (8 * n)) - 1)) ^ header
    return encoded.to_bytes(n, "big")


def decode_num_increasing(buf: bytes, pos: int) -> tuple[int, int]:
    """``(value, next_pos)`` of the `encode_num_increasing` form at ``pos``; raises `CorruptCheckpointError`."""
    if pos >= len(buf):
        raise CorruptCheckpointError("truncated ordered-code number")
    n = buf[pos]
    if n > 8 or pos + 1 + n > len(buf):
        raise CorruptCheckpointError("bad ordered-code number length")
    return int.from_bytes(buf[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def decode_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    """``(data, next_pos)`` of the `encode_string` form at ``pos``; raises `CorruptCheckpointError`."""
    out = bytearray()
    end = len(buf)
    while True:
        stop = pos
        while stop < end and buf[stop] not in (0x00, 0xFF):
            stop += 1
        out += buf[pos:stop]
        if stop + 1 >= end:
            raise CorruptCheckpointError("unterminated ordered-code string")
        pair = buf[stop : stop + 2]
        if pair == b"\x00\x01":
            return bytes(out), stop + 2
        if pair == b"\x00\xff":
            out.append(0x00)
        elif pair == b"\xff\x00":
            out.append(0xFF)
        else:
            raise CorruptCheckpointError("bad escape in ordered-code string")
        pos = stop + 2


def decode_signed_num_increasing(buf: bytes, pos: int) -> tuple[int, int]:
    """``(value, next_pos)`` of the `encode_signed_num_increasing` form at ``pos``; raises `CorruptCheckpointError`."""
    if pos >= len(buf):
        raise CorruptCheckpointError("truncated ordered-code signed number")
    negative = not buf[pos] & 0x80
    flip = 0xFF if negative else 0
    b0 = buf[pos] ^ flip
    b1 = (buf[pos + 1] ^ flip) if pos + 1 < len(buf) else 0
    lead = 16 - ((~((b0 << 8) | b1)) & 0xFFFF).bit_length()  # leading one-bits of the 16-bit header
    n = lead
    if n < 1 or n > 10 or pos + n > len(buf):
        raise CorruptCheckpointError("bad ordered-code signed number length")
    raw = int.from_bytes(buf[pos : pos + n], "big")
    header = ((1 << n) - 1) << (8 * n - n)
    if negative:
        value = (raw | header) - (1 << (8 * n))
    else:
        value = raw & ~header
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise CorruptCheckpointError("ordered-code signed number overflows 64 bits")
    return value, pos + n
