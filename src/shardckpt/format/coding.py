"""Primitive encodings shared by the table and the protos: varints, fixed32, masked CRC32C.

Decoders take an explicit ``limit`` and raise `CorruptCheckpointError` instead of
reading past it, so every caller gets bounds checking for free.
"""

from __future__ import annotations

import platform
import struct
import threading
from collections.abc import Callable, Iterable

import crc32c as _crc32c

from ..errors import CorruptCheckpointError, InvalidArgumentError

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
# CPU.  Which library is faster depends on the CPU, measured on two hosts of this VM (`benchmarks/bench_crc.py`):
# - with AVX-512 and VPCLMULQDQ, awscrt folds 64 bytes at a time: ~45-53 GB/s per core in cache against the crc32c
#   package's 22-27 (the same function);
# - without them awscrt falls back to its SSE4.2 loop: 0.87-0.94x the crc32c package's speed in cache, and half
#   its speed on buffers coming from memory (6.5-6.7 against 14-14.4 GB/s), which is what a save checksums.
# So awscrt takes the bulk work only on x86-64 Linux CPUs that report both features in /proc/cpuinfo; everywhere
# else (other CPUs and systems, unmeasured, and where awscrt cannot be imported) the crc32c package does.
# awscrt's extension costs ~50 ms to load, so the choice is made, and awscrt loaded, on the first large buffer only
# (a process that handles small tensors, as most CLI calls and test clients do, never pays it); `load_bulk_crc`
# makes it ahead.
BULK_MIN = 256 * 1024
BULK_IMPLEMENTATIONS = ("awscrt", "crc32c")
_bulk: Callable[[bytes | bytearray | memoryview, int], int] | None = None
_bulk_lock = threading.Lock()
BULK_IMPLEMENTATION = "crc32c"  # set by load_bulk_crc: "awscrt" when that is what bulk checksums use


def wide_clmul(machine: str, cpuinfo: Iterable[bytes]) -> bool:
    """Whether a CPU is one where awscrt's CRC32C is the faster: x86-64 (``machine`` as `platform.machine`
    gives it) whose first ``flags`` line of ``/proc/cpuinfo`` (``cpuinfo``) lists both ``avx512f`` and
    ``vpclmulqdq`` (the kernel lists ``avx512f`` only when it saves the AVX-512 registers, as awscrt checks)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return False
    for line in cpuinfo:
        name, _, value = line.partition(b":")
        if name.strip() == b"flags":
            flags = set(value.split())
            return b"avx512f" in flags and b"vpclmulqdq" in flags
    return False


def _cpu_prefers_awscrt() -> bool:
    try:
        with open("/proc/cpuinfo", "rb") as f:  # Linux; elsewhere no such file: the crc32c package
            return wide_clmul(platform.machine(), f)
    except OSError:
        return False


def load_bulk_crc(use: str | None = None) -> str:
    """Choose and load the bulk CRC32C implementation now (it is otherwise chosen on first use) and return its
    name: by the CPU (`wide_clmul`) unless ``use`` names one of `BULK_IMPLEMENTATIONS` (benchmarks and tests
    compare them; "awscrt" where it cannot be imported gives "crc32c").  Both compute the same function."""
    global _bulk, BULK_IMPLEMENTATION
    if use is not None and use not in BULK_IMPLEMENTATIONS:
        raise InvalidArgumentError(f"bulk CRC32C implementation {use!r}: expected one of {BULK_IMPLEMENTATIONS}")
    with _bulk_lock:
        if _bulk is None or use is not None:
            want = use if use is not None else ("awscrt" if _cpu_prefers_awscrt() else "crc32c")
            _bulk, BULK_IMPLEMENTATION = _crc32c.crc32c, "crc32c"
            if want == "awscrt":
                try:
                    from awscrt.checksums import crc32c as fast
                except ImportError:
                    pass
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
