"""The SSTable file (TensorFlow's TSL variant of LevelDB's table): the ``.index`` of a bundle.

::

    [data block][trailer] ... [metaindex block][trailer] [index block][trailer] [footer]

    trailer := byte compression_type | fixed32 mask(crc32c(block ‖ type))
    footer  := handle metaindex | handle index | zero pad to 40 bytes | fixed64 magic
    handle  := varint64 offset | varint64 size        (size excludes the trailer)

Data blocks restart every 16 keys and are cut once their estimated size reaches
256 KiB; the index block restarts at every key and maps a separator key >= every
key of block *i* and < every key of block *i+1* to block *i*'s handle.  The reader
verifies the trailer CRC of every block it loads.

The reader trusts no handle: on opening, the index block's handles must be strictly
increasing, must not overlap and must lie before the footer, so the data blocks
together hold at most the file's bytes and each is read at most once.  A data block,
when first loaded, must hold keys above the previous block's separator and up to
its own (with `Block`'s rules, keys strictly increase across the whole table).
"""

from __future__ import annotations

import bisect
import operator
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ChecksumMismatchError, CorruptCheckpointError, TruncatedFileError
from .block import Block, BlockBuilder
from .coding import crc32c, decode_varint, encode_varint, mask_crc, unmask_crc

BLOCK_SIZE = 262144
DATA_RESTART_INTERVAL = 16
INDEX_RESTART_INTERVAL = 1
FOOTER_SIZE = 48
TRAILER_SIZE = 5
MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1
_MAX_HANDLES_LEN = 40  # two handles of at most 2 x 10 bytes each


@dataclass(frozen=True)
class BlockHandle:
    """Where a block sits in the table: ``offset`` and ``size`` in bytes, the trailer excluded."""
    offset: int
    size: int

    def encode(self) -> bytes:
        """The handle as two varints, as index entries and the footer store it."""
        return encode_varint(self.offset) + encode_varint(self.size)


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (TF's bytewise FindShortestSeparator)."""
    n = min(len(start), len(limit))
    d = 0
    while d < n and start[d] == limit[d]:
        d += 1
    if d < n:
        byte = start[d]
        if byte < 0xFF and byte + 1 < limit[d]:
            return start[:d] + bytes((byte + 1,))
    return start


def short_successor(key: bytes) -> bytes:
    """A short key k >= key (TF's FindShortSuccessor): bump the first byte that is not 0xff."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes((byte + 1,))
    return key


_SMALL_HEADS = [[bytes((a, b)) for b in range(128)] for a in range(128)]
_ONE_BYTE = [bytes((i,)) for i in range(128)]
_FLAT_HEADS = [head for row in _SMALL_HEADS for head in row]  # shared * 128 + non_shared -> the two bytes
_WINDOW = 16384  # entries add_sorted encodes per numpy pass (a window's key matrix stays a few MiB)


def _trailer(block: bytes, kind: int) -> bytes:
    crc = crc32c(bytes((kind,)), crc32c(block))
    return bytes((kind,)) + struct.pack("<I", mask_crc(crc))


class TableBuilder:
    """Accumulates sorted key/value pairs and returns the whole table as bytes."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self._block_size = block_size
        self._out: list[bytes] = []
        self._offset = 0
        self._data = BlockBuilder(DATA_RESTART_INTERVAL)
        self._index = BlockBuilder(INDEX_RESTART_INTERVAL)
        self._last_key = b""
        self._num_entries = 0
        self._pending: BlockHandle | None = None

    def add(self, key: bytes, value: bytes) -> None:
        """Append one entry; raises ValueError unless ``key`` sorts after every key added before."""
        if self._num_entries:
            if key <= self._last_key:
                raise ValueError(f"table keys out of order: {key!r} after {self._last_key!r}")
            # An entry at least twice the block size gets a block of its own.
            if len(key) + len(value) >= 2 * self._block_size:
                self._flush()
        if self._pending is not None:
            self._index.add(shortest_separator(self._last_key, key), self._pending.encode())
            self._pending = None
        self._last_key = key
        self._num_entries += 1
        self._data.add(key, value)
        if self._data.size_estimate() >= self._block_size:
            self._flush()

    def add_sorted(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """`add` for many entries at once, the same bytes (a million-key index spends most of its time here).

        Runs of entries whose keys and values are all shorter than 128 bytes (one-byte varints: every index
        entry of a sharded save) are encoded a window at a time with numpy: shared prefixes, restart points
        and block ends computed as arrays, the block's pieces placed by list slicing.  Anything else goes
        through `_add_scalar`, which is `add` inlined."""
        pairs = pairs if isinstance(pairs, list) else list(pairs)
        self.add_sorted_columns([k for k, _ in pairs], [v for _, v in pairs])

    def add_sorted_columns(self, keys: list[bytes], values: list[bytes]) -> None:
        """`add_sorted` of ``zip(keys, values)``, for a caller that has the two lists already."""
        for start in range(0, len(keys), _WINDOW):
            ks, vs = keys[start : start + _WINDOW], values[start : start + _WINDOW]
            if not self._add_window(ks, vs):
                self._add_scalar(zip(ks, vs))

    def _add_window(self, keys: list[bytes], values: list[bytes]) -> bool:
        """Add the entries with array arithmetic; False (nothing added) when they need `_add_scalar`."""
        m = len(keys)
        if not m:
            return True
        nk = np.fromiter(map(len, keys), np.int64, m)
        nv = np.fromiter(map(len, values), np.int64, m)
        if (int(nk.max()) >= 128 or int(nv.max()) >= 128 or int((nk + nv).max()) >= 2 * self._block_size
                or self._data._interval != DATA_RESTART_INTERVAL):
            return False  # multi-byte lengths, or an entry that gets a block of its own
        if self._num_entries and not keys[0] > self._last_key or not all(map(operator.lt, keys, keys[1:])):
            return False  # out of order: `_add_scalar` raises the error naming the pair
        data = self._data
        interval, block_size = data._interval, self._block_size
        # Shared prefix of each key with the one before it (the block's last key for the first), by comparing
        # the keys as rows of a zero-padded byte matrix; padding never counts, as lengths cap the result.
        prev = data._last_key
        width = max(int(nk.max()), len(prev), 1)
        rows = np.frombuffer(b"".join(k.ljust(width, b"\0") for k in [prev, *keys]), np.uint8).reshape(m + 1, width)
        differ = rows[1:] != rows[:-1]
        first = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
        lengths = np.concatenate(([len(prev)], nk))
        shared_all = np.minimum(first, np.minimum(lengths[:-1], lengths[1:]))
        pos = 0
        while pos < m:
            if self._pending is not None:
                self._index.add(shortest_separator(self._last_key, keys[pos]), self._pending.encode())
                self._pending = None
            size0, counter0 = data._size, data._counter
            k = np.arange(m - pos)
            lead = interval - counter0  # the first entry that restarts (its counter reaches the interval)
            restart = (k >= lead) & ((k - lead) % interval == 0)
            shared = np.where(restart, 0, shared_all[pos:])
            if size0 == 0:
                shared[0] = 0
            esize = 3 + nk[pos:] - shared + nv[pos:]
            cum = size0 + np.cumsum(esize)
            full = cum + 4 * (len(data._restarts) + np.cumsum(restart)) + 4 >= block_size
            end = int(full.argmax()) + 1 if full.any() else m - pos
            shared, restart = shared[:end], restart[:end]
            non_shared = nk[pos : pos + end] - shared
            parts: list[bytes] = [b""] * (4 * end)
            parts[0::4] = list(map(_FLAT_HEADS.__getitem__, (shared * 128 + non_shared).tolist()))
            parts[1::4] = list(map(_ONE_BYTE.__getitem__, nv[pos : pos + end].tolist()))
            parts[2::4] = [key[s:] if s else key for key, s in zip(keys[pos : pos + end], shared.tolist())]
            parts[3::4] = values[pos : pos + end]
            data._parts += parts
            data._restarts += (cum[:end] - esize[:end])[restart].tolist()
            data._size = int(cum[end - 1])
            hits = np.flatnonzero(restart)
            data._counter = end - int(hits[-1]) if hits.size else counter0 + end
            data._last_key = self._last_key = keys[pos + end - 1]
            self._num_entries += end
            pos += end
            if data._size + 4 * len(data._restarts) + 4 >= block_size:
                self._flush()
        return True

    def _add_scalar(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """`add` inlined (the entry of a data block encoded in place), for entries `_add_window` cannot take."""
        data = self._data
        interval, block_size = data._interval, self._block_size
        small = _SMALL_HEADS
        for key, value in pairs:
            last = self._last_key
            nk, nv = len(key), len(value)
            if self._num_entries:
                if key <= last:
                    raise ValueError(f"table keys out of order: {key!r} after {last!r}")
                if nk + nv >= 2 * block_size:
                    self._flush()
            if self._pending is not None:
                self._index.add(shortest_separator(last, key), self._pending.encode())
                self._pending = None
            self._last_key = key
            self._num_entries += 1
            # BlockBuilder.add, inline.
            if data._counter < interval:
                if data._size:
                    n = min(len(data._last_key), nk)
                    diff = int.from_bytes(data._last_key[:n], "big") ^ int.from_bytes(key[:n], "big")
                    shared = n - (diff.bit_length() + 7) // 8
                else:
                    shared = 0
            else:
                data._restarts.append(data._size)
                data._counter = 0
                shared = 0
            non_shared = nk - shared
            if shared < 128 and non_shared < 128 and nv < 128:
                head = small[shared][non_shared] + bytes((nv,))
            else:
                head = encode_varint(shared) + encode_varint(non_shared) + encode_varint(nv)
            data._parts += (head, key[shared:], value)
            data._size += len(head) + non_shared + nv
            data._last_key = key
            data._counter += 1
            if data._size + 4 * len(data._restarts) + 4 >= block_size:
                self._flush()

    def _write_block(self, builder: BlockBuilder) -> BlockHandle:
        raw = builder.finish()
        builder.reset()
        handle = BlockHandle(self._offset, len(raw))
        self._out.append(raw)
        self._out.append(_trailer(raw, NO_COMPRESSION))
        self._offset += len(raw) + TRAILER_SIZE
        return handle

    def _flush(self) -> None:
        if self._data.empty:
            return
        self._pending = self._write_block(self._data)

    def finish(self) -> bytes:
        """The whole table (blocks, metaindex, index and footer); the builder must not be used afterwards."""
        self._flush()
        meta = self._write_block(BlockBuilder(DATA_RESTART_INTERVAL))
        if self._pending is not None:
            self._index.add(short_successor(self._last_key), self._pending.encode())
            self._pending = None
        index = self._write_block(self._index)
        handles = meta.encode() + index.encode()
        self._out.append(handles + bytes(_MAX_HANDLES_LEN - len(handles)) + MAGIC)
        return b"".join(self._out)


def _snappy_decompress(data: bytes, where: str) -> bytes:
    import cramjam  # imported lazily: TensorFlow never writes compressed bundle blocks

    try:
        return bytes(cramjam.snappy.decompress_raw(data))
    except Exception as exc:  # cramjam raises its own error types
        raise CorruptCheckpointError(f"{where}: corrupt snappy block ({exc})") from None


class Table:
    """Reads an SSTable held in memory (an index file is small and read whole)."""

    def __init__(self, data: bytes, path: str) -> None:
        self._data = data
        self._path = path
        size = len(data)
        if size < FOOTER_SIZE:
            raise TruncatedFileError(f"{path}: not an sstable (file is too short: {size} bytes)")
        footer = size - FOOTER_SIZE
        if data[size - 8 :] != MAGIC:
            raise CorruptCheckpointError(f"{path}: not an sstable (bad magic number)")
        meta_off, pos = decode_varint(data, footer, footer + _MAX_HANDLES_LEN, f"{path}: footer")
        meta_size, pos = decode_varint(data, pos, footer + _MAX_HANDLES_LEN, f"{path}: footer")
        idx_off, pos = decode_varint(data, pos, footer + _MAX_HANDLES_LEN, f"{path}: footer")
        idx_size, pos = decode_varint(data, pos, footer + _MAX_HANDLES_LEN, f"{path}: footer")
        self._limit = footer
        self.metaindex_handle = BlockHandle(meta_off, meta_size)
        # TF never reads the (always empty) metaindex; its CRC is still checked so a flip there is not silent.
        self._read_block(self.metaindex_handle)
        where = f"{path}: index block"
        self._index = index = Block(self._read_block(BlockHandle(idx_off, idx_size)), where)
        self._separators: list[bytes] = []
        self._handles: list[BlockHandle] = []
        end = 0
        for separator, value in index:
            handle = self._handle(value)
            if handle.offset < end:
                raise CorruptCheckpointError(
                    f"{where}: handle {len(self._handles)} (offset {handle.offset}, {handle.size} bytes) does not "
                    f"start after the previous block, which ends at {end}: handles must increase without overlap"
                )
            self._check_extent(handle)
            end = handle.offset + handle.size + TRAILER_SIZE
            self._separators.append(separator)
            self._handles.append(handle)
        self._blocks: dict[int, Block] = {}

    def _check_extent(self, handle: BlockHandle) -> None:
        if handle.offset + handle.size + TRAILER_SIZE > self._limit:
            raise TruncatedFileError(
                f"{self._path}: block at offset {handle.offset}: {handle.size} bytes + trailer run past the end "
                f"of the table ({self._limit} bytes)"
            )

    def _read_block(self, handle: BlockHandle) -> bytes:
        where = f"{self._path}: block at offset {handle.offset}"
        end = handle.offset + handle.size
        self._check_extent(handle)
        block = self._data[handle.offset : end]
        kind = self._data[end]
        (stored,) = struct.unpack_from("<I", self._data, end + 1)
        actual = crc32c(bytes((kind,)), crc32c(block))
        if unmask_crc(stored) != actual:
            raise ChecksumMismatchError(f"{where}: block checksum mismatch")
        if kind == NO_COMPRESSION:
            return block
        if kind == SNAPPY_COMPRESSION:
            return _snappy_decompress(block, where)
        raise CorruptCheckpointError(f"{where}: bad block type {kind}")

    def _handle(self, value: bytes) -> BlockHandle:
        off, pos = decode_varint(value, 0, len(value), f"{self._path}: block handle")
        size, _ = decode_varint(value, pos, len(value), f"{self._path}: block handle")
        return BlockHandle(off, size)

    def _data_block(self, i: int) -> Block:
        """Data block ``i``, verified; kept, since lookups of many tensors revisit the same few blocks and the
        whole table is in memory anyway (its CRC and keys are checked once, not once per lookup)."""
        block = self._blocks.get(i)
        if block is None:
            handle = self._handles[i]
            where = f"{self._path}: data block {i} at offset {handle.offset}"
            block = Block(self._read_block(handle), where)
            if block.first_key is not None:
                assert block.last_key is not None
                if i and block.first_key <= self._separators[i - 1]:
                    raise CorruptCheckpointError(
                        f"{where}: first key {block.first_key[:64]!r} does not sort after the previous block's "
                        f"separator {self._separators[i - 1][:64]!r}"
                    )
                if block.last_key > self._separators[i]:
                    raise CorruptCheckpointError(
                        f"{where}: last key {block.last_key[:64]!r} sorts after its separator "
                        f"{self._separators[i][:64]!r}"
                    )
            self._blocks[i] = block
        return block

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for i in range(len(self._handles)):
            yield from self._data_block(i)

    def seek(self, target: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Entries from the first key >= ``target`` on; reads only the blocks it walks through."""
        # Block i holds the keys in (separator i-1, separator i]: the first that can hold target is the
        # first whose separator is >= target.
        first = bisect.bisect_left(self._separators, target)
        for i in range(first, len(self._handles)):
            block = self._data_block(i)
            yield from (block.seek(target) if i == first else block)

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None; raises `CorruptCheckpointError` for a damaged block it reads."""
        for found, value in self.seek(key):
            return value if found == key else None
        return None
