"""DT_STRING tensors on disk: varint lengths, a masked CRC of the lengths, then the bytes.

::

    varint64 len[0..n) | fixed32 mask(C_len) | s[0] ‖ ... ‖ s[n-1]

``C_len`` is a CRC32C over the lengths as numbers (4 bytes little-endian each, 8
for a length above 2^32-1).  The entry CRC starts from ``C_len``, extends over the
4 stored checksum bytes, then over every string's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ..errors import ChecksumMismatchError, CorruptCheckpointError
from .coding import crc32c, decode_varint, encode_varint, mask_crc, unmask_crc

_U32 = 0xFFFFFFFF


def _lengths_crc(lengths: Sequence[int]) -> int:
    if all(n <= _U32 for n in lengths):
        return crc32c(np.asarray(lengths, dtype="<u4").tobytes()) if lengths else 0
    crc = 0
    for n in lengths:
        crc = crc32c(struct.pack("<I" if n <= _U32 else "<Q", n), crc)
    return crc


def to_bytes_list(array: np.ndarray) -> list[bytes]:
    """Elements of a bytes/str/object array as bytes, in row-major order (str is UTF-8)."""
    out = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, str):
            out.append(item.encode("utf-8"))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            out.append(bytes(item))
        else:
            raise TypeError(f"string tensor element of type {type(item).__name__} is not bytes or str")
    return out


def encode(elements: Sequence[bytes]) -> tuple[list[bytes], int]:
    """The on-disk pieces of a string tensor and its (unmasked) entry CRC."""
    lengths = [len(s) for s in elements]
    c_len = _lengths_crc(lengths)
    checksum = struct.pack("<I", mask_crc(c_len))
    payload = b"".join(elements)
    crc = crc32c(payload, crc32c(checksum, c_len))
    return [b"".join(encode_varint(n) for n in lengths), checksum, payload], crc


def decode(buf: bytes, count: int, where: str, expected_crc: int | None) -> np.ndarray:
    """Parse ``count`` strings from ``buf``; checks the lengths' CRC always, the entry CRC when given."""
    if count > len(buf):
        raise CorruptCheckpointError(f"{where}: {count} strings cannot fit in {len(buf)} bytes")
    lengths = []
    pos = 0
    for _ in range(count):
        n, pos = decode_varint(buf, pos, len(buf), f"{where}: string length")
        lengths.append(n)
    if len(buf) - pos < 4:
        raise CorruptCheckpointError(f"{where}: string tensor truncated before its length checksum")
    (stored,) = struct.unpack_from("<I", buf, pos)
    c_len = _lengths_crc(lengths)
    if unmask_crc(stored) != c_len:
        raise ChecksumMismatchError(f"{where}: the length checksum does not match")
    pos += 4
    if sum(lengths) > len(buf) - pos:
        raise CorruptCheckpointError(f"{where}: string bytes run past the entry")
    if expected_crc is not None:
        actual = crc32c(memoryview(buf)[pos : pos + sum(lengths)], crc32c(buf[pos - 4 : pos], c_len))
        if actual != expected_crc:
            raise ChecksumMismatchError(
                f"{where}: checksum does not match: stored {expected_crc:#010x} vs. calculated {actual:#010x}"
            )
    out = np.empty(count, dtype=object)
    for i, n in enumerate(lengths):
        out[i] = bytes(buf[pos : pos + n])
        pos += n
    return out
