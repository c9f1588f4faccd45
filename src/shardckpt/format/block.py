"""SSTable blocks: prefix-compressed key/value entries followed by a restart array.

Layout (every block kind: data, index, metaindex)::

    entry   := varint shared | varint non_shared | varint value_len | key[shared:] | value
    block   := entry* | fixed32 restart_offset[n] | fixed32 n

Invariant: every ``restart_interval``-th entry (counted from 0 in the block) stores
its whole key (``shared == 0``) and is listed in the restart array, so a reader can
binary-search the restarts and then scan at most ``restart_interval`` entries.

A parsed `Block` has been walked once, whole: keys strictly increasing, restart
offsets exactly at entries that share nothing, and at most `MAX_RESTART_INTERVAL`
entries per restart.  The last rule bounds the key bytes a block expands to (each
key is at most the bytes of its run) at 16 times its size; without it one restart
and n one-byte suffixes make n keys of up to n bytes each.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ..errors import CorruptCheckpointError
from .coding import decode_varint, encode_varint

# TF writes data blocks with a restart every 16 entries and index blocks with one at every entry.
MAX_RESTART_INTERVAL = 16


def common_prefix_length(a: bytes, b: bytes) -> int:
    """The number of leading bytes ``a`` and ``b`` share."""
    # Binary search on slice equality keeps the per-byte work in C.
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class BlockBuilder:
    """Builds one block; keys must arrive in strictly increasing bytewise order."""

    __slots__ = ("_interval", "_parts", "_size", "_restarts", "_counter", "_last_key")

    def __init__(self, restart_interval: int) -> None:
        self._interval = restart_interval
        self.reset()

    def reset(self) -> None:
        """Drop every entry added, to start the next block."""
        self._parts: list[bytes] = []
        self._size = 0
        self._restarts = [0]
        self._counter = 0
        self._last_key = b""

    @property
    def empty(self) -> bool:
        """Whether no entry has been added since the last reset."""
        return self._size == 0

    def size_estimate(self) -> int:
        """The size in bytes of the block `finish` would return now."""
        return self._size + 4 * len(self._restarts) + 4

    def add(self, key: bytes, value: bytes) -> None:
        """Append one entry; ``key`` must sort after the previous key (not checked here)."""
        if self._counter < self._interval:
            shared = common_prefix_length(self._last_key, key) if self._size else 0
        else:
            self._restarts.append(self._size)
            self._counter = 0
            shared = 0
        non_shared, value_len = len(key) - shared, len(value)
        if non_shared < 128 and value_len < 128:
            head = bytes((shared, non_shared, value_len)) if shared < 128 else (
                encode_varint(shared) + bytes((non_shared, value_len))
            )
        else:
            head = encode_varint(shared) + encode_varint(non_shared) + encode_varint(value_len)
        self._parts.append(head)
        self._parts.append(key[shared:])
        self._parts.append(value)
        self._size += len(head) + non_shared + value_len
        self._last_key = key
        self._counter += 1

    def finish(self) -> bytes:
        """The block's bytes: entries then restart array; call `reset` before reusing the builder."""
        tail = struct.pack(f"<{len(self._restarts) + 1}I", *self._restarts, len(self._restarts))
        return b"".join(self._parts) + tail


class Block:
    """A parsed view over one block's bytes (already checksum-verified by the table)."""

    __slots__ = ("_data", "_restarts_at", "_num_restarts", "_where", "first_key", "last_key", "_keys", "_spans")

    def __init__(self, data: bytes, where: str) -> None:
        self._data = data
        self._where = where
        size = len(data)
        if size < 4:
            raise CorruptCheckpointError(f"{where}: block of {size} bytes is too small")
        (n,) = struct.unpack_from("<I", data, size - 4)
        if n == 0 or n > (size - 4) // 4:
            raise CorruptCheckpointError(f"{where}: bad restart count {n} in a block of {size} bytes")
        self._num_restarts = n
        self._restarts_at = size - 4 * (n + 1)
        self.first_key: bytes | None = None
        self.last_key: bytes | None = None
        # What the walk in `_check` decoded, kept for `__iter__`: every key, and (start, end) of each value.
        self._keys: list[bytes] = []
        self._spans: list[tuple[int, int]] = []
        self._check()

    def _check(self) -> None:
        """Walk every entry once (see the module docstring for the rules); sets `first_key` and `last_key`."""
        n, limit, where = self._num_restarts, self._restarts_at, self._where
        restarts = struct.unpack_from(f"<{n}I", self._data, limit)
        if restarts[0] != 0:
            raise CorruptCheckpointError(f"{where}: first restart offset is {restarts[0]}, not 0")
        if limit == 0:  # the empty block: no entry, one restart at 0
            if n != 1:
                raise CorruptCheckpointError(f"{where}: {n} restarts in a block without entries")
            return
        data = self._data
        keys, spans = self._keys, self._spans
        pos, key, r, run, due = 0, b"", 0, 0, 0  # due: offset of the next restart not yet reached
        while pos < limit:
            if pos == due:
                r, run, prev = r + 1, 1, b""  # a restart entry shares nothing
                due = restarts[r] if r < n else limit
            else:
                if due < pos:
                    raise CorruptCheckpointError(f"{where}: restart offset {due} is not at an entry")
                run += 1
                if run > MAX_RESTART_INTERVAL:
                    raise CorruptCheckpointError(
                        f"{where}: more than {MAX_RESTART_INTERVAL} entries after the restart at offset "
                        f"{restarts[r - 1]}")
                prev = key
            # The common one-byte header inline (this walk is most of the cost of loading a block).
            if pos + 3 <= limit and data[pos] < 0x80 and data[pos + 1] < 0x80 and data[pos + 2] < 0x80:
                shared, start = data[pos], pos + 3
                stop = start + data[pos + 1]
                if shared <= len(prev) and stop + data[pos + 2] <= limit:
                    new = prev[:shared] + data[start:stop] if shared else data[start:stop]
                    end = stop + data[pos + 2]
                    spans.append((stop, end))
                    pos = end
                else:
                    new, _, _, pos = self._entry(pos, prev)  # raises, naming the fault
            else:
                new, vstart, vend, pos = self._entry(pos, prev)
                spans.append((vstart, vend))
            keys.append(new)
            if self.first_key is None:
                self.first_key = new
            elif new <= key:
                raise CorruptCheckpointError(f"{where}: keys out of order: {new[:64]!r} after {key[:64]!r}")
            key = new
        if r != n:
            raise CorruptCheckpointError(f"{where}: restart offset {restarts[r]} is not at an entry")
        self.last_key = key

    def _restart(self, i: int) -> int:
        (off,) = struct.unpack_from("<I", self._data, self._restarts_at + 4 * i)
        if off > self._restarts_at:
            raise CorruptCheckpointError(f"{self._where}: restart offset {off} past the entries")
        return off

    def _entry(self, pos: int, prev_key: bytes) -> tuple[bytes, int, int, int]:
        """Decode the entry at ``pos``: (key, value_start, value_end, next_pos)."""
        data, limit = self._data, self._restarts_at
        if pos + 3 <= limit and data[pos] < 0x80 and data[pos + 1] < 0x80 and data[pos + 2] < 0x80:
            shared, non_shared, value_len = data[pos], data[pos + 1], data[pos + 2]
            pos += 3
        else:
            shared, pos = decode_varint(data, pos, limit, f"{self._where}: entry header")
            non_shared, pos = decode_varint(data, pos, limit, f"{self._where}: entry header")
            value_len, pos = decode_varint(data, pos, limit, f"{self._where}: entry header")
        if shared > len(prev_key):
            raise CorruptCheckpointError(
                f"{self._where}: entry at offset {pos} shares {shared} bytes with a key of {len(prev_key)}"
            )
        if non_shared + value_len > limit - pos:
            raise CorruptCheckpointError(f"{self._where}: entry at offset {pos} runs past the block")
        key_end = pos + non_shared
        key = prev_key[:shared] + data[pos:key_end] if shared else data[pos:key_end]
        return key, key_end, key_end + value_len, key_end + value_len

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        data = self._data
        for key, (vstart, vend) in zip(self._keys, self._spans):
            yield key, data[vstart:vend]

    def seek(self, target: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Yield entries starting at the first key >= ``target``."""
        lo, hi = 0, self._num_restarts - 1
        # Find the last restart whose key is < target; the answer lies after it.
        while lo < hi:
            mid = (lo + hi + 1) // 2
            pos = self._restart(mid)
            if pos >= self._restarts_at:
                hi = mid - 1
                continue
            key, _, _, _ = self._entry(pos, b"")
            if key < target:
                lo = mid
            else:
                hi = mid - 1
        data = self._data
        pos, key = self._restart(lo), b""
        while pos < self._restarts_at:
            key, vstart, vend, pos = self._entry(pos, key)
            if key >= target:
                yield key, data[vstart:vend]
                break
        while pos < self._restarts_at:
            key, vstart, vend, pos = self._entry(pos, key)
            yield key, data[vstart:vend]
