"""A run of small tensors written as one: bytes joined once, index entries encoded for the whole run at once.

A model's many small tensors (biases, norms) each cost a few microseconds of Python per stage of a save
(a `PreparedTensor`, a `BundleEntry`, its encoding), which for 100,000 of them outweighs writing their
bytes.  A `TensorRun` holds consecutive C-ordered arrays whose bytes are already the stored form; the
writer lays the run out as one buffer (`parallel_writer`), and `TensorRun.pack` encodes the run's
``BundleEntryProto``s with numpy, a handful of array operations per run instead of a call per entry.
The bytes are those the per-tensor path produces: the file is the arrays' bytes back to back, and each
record is ``varint len, key, varint len, BundleEntryProto`` exactly as `protos.pack_entries` spells it.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import cast

import numpy as np

from .coding import crc32c
from .protos import entry_head

_MASK_DELTA = 0xA282EAD8
_nbytes = attrgetter("nbytes")


class TensorRun:
    """Consecutive tensors of one data file: ``names`` (str, stored whole under these keys), their ``codes``
    (`DataType`) and ``arrays`` (C-contiguous, native little-endian, stored as is).

    The writer that lays the run out sets ``offset``, its first byte in the data file, and calls `join` when
    it writes it.
    """

    __slots__ = ("names", "codes", "arrays", "nbytes", "offset", "crcs")

    def __init__(self, names: Sequence[str], codes: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        self.names, self.codes, self.arrays = names, codes, arrays
        self.nbytes = sum(map(_nbytes, arrays))
        self.offset = -1
        self.crcs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrays)

    def join(self) -> bytes:
        """The run's bytes, in order, a copy the caller drops once written; takes the tensors' CRCs from them."""
        arrays = cast("Sequence[memoryview]", self.arrays)  # C-contiguous: buffers of their bytes in order
        self.crcs = np.fromiter(map(crc32c, arrays), np.uint32, len(arrays))
        return b"".join(arrays)

    def pack(self, shard_id: int) -> bytes:
        """The run's index entries in `protos.pack_entries` form, once `join` ran and ``offset`` is set."""
        assert self.crcs is not None and self.offset >= 0, "pack before the run was written"
        n = len(self.arrays)
        keys = [name.encode() for name in self.names]
        heads = list(map(entry_head, self.codes, map(attrgetter("shape"), self.arrays), [shard_id] * n))
        sizes = np.fromiter(map(_nbytes, self.arrays), np.uint64, n)
        offsets = np.cumsum(sizes) - sizes + np.uint64(self.offset)
        c = self.crcs.astype(np.uint64)
        masked = ((((c >> np.uint64(15)) | (c << np.uint64(17))) & np.uint64(0xFFFFFFFF)) + np.uint64(_MASK_DELTA)) \
            & np.uint64(0xFFFFFFFF)
        key_lens = np.fromiter(map(len, keys), np.int64, n)
        head_lens = np.fromiter(map(len, heads), np.int64, n)
        # Proto3: a field equal to its default (0) is not written, tag included.
        off_field, off_len = _tagged(0x20, offsets)
        size_field, size_len = _tagged(0x28, sizes)
        crc_field = np.empty((n, 5), np.uint8)
        crc_field[:, 0] = 0x35
        crc_field[:, 1:] = masked.astype("<u4").view(np.uint8).reshape(n, 4)
        crc_len = np.where(masked != 0, 5, 0)
        value_lens = head_lens + off_len + size_len + crc_len
        klen_field, klen_len = _varints(key_lens.astype(np.uint64))
        vlen_field, vlen_len = _varints(value_lens.astype(np.uint64))
        record = klen_len + key_lens + vlen_len + value_lens
        out = np.empty(int(record.sum()), np.uint8)
        pos = np.cumsum(record) - record
        _put(out, pos, klen_field, klen_len)
        pos = pos + klen_len
        _put_blob(out, pos, b"".join(keys), key_lens)
        pos = pos + key_lens
        _put(out, pos, vlen_field, vlen_len)
        pos = pos + vlen_len
        _put_blob(out, pos, b"".join(heads), head_lens)
        pos = pos + head_lens
        _put(out, pos, off_field, off_len)
        pos = pos + off_len
        _put(out, pos, size_field, size_len)
        pos = pos + size_len
        _put(out, pos, crc_field, crc_len)
        return out.tobytes()


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each uint64 as a protobuf varint: a byte matrix (row i's first ``lens[i]`` bytes) and ``lens``."""
    n = len(values)
    cols = []
    lens = np.ones(n, np.int64)
    rest = values
    for _ in range(10):  # a uint64 takes at most 10 varint bytes
        low = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest = rest >> np.uint64(7)
        more = rest != 0
        cols.append(low | (more.astype(np.uint8) << 7))
        if not more.any():
            break
        lens += more
    return np.stack(cols, axis=1) if cols else np.zeros((n, 1), np.uint8), lens


def _tagged(tag: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tag byte and the varint of each value, or nothing (length 0) where the value is 0."""
    body, lens = _varints(values)
    field = np.empty((len(values), body.shape[1] + 1), np.uint8)
    field[:, 0] = tag
    field[:, 1:] = body
    return field, np.where(values != 0, lens + 1, 0)


def _put(out: np.ndarray, pos: np.ndarray, field: np.ndarray, lens: np.ndarray) -> None:
    """Row i's first ``lens[i]`` bytes of ``field`` into ``out`` from ``pos[i]`` on."""
    cols = np.arange(field.shape[1])
    keep = cols < lens[:, None]
    out[(pos[:, None] + cols)[keep]] = field[keep]


def _put_blob(out: np.ndarray, pos: np.ndarray, blob: bytes, lens: np.ndarray) -> None:
    """Consecutive pieces of ``blob`` (piece i is ``lens[i]`` bytes) into ``out`` at ``pos[i]`` each."""
    starts = np.cumsum(lens) - lens
    out[np.repeat(pos - starts, lens) + np.arange(len(blob))] = np.frombuffer(blob, np.uint8)
