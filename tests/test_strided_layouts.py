"""Layouts a one-client user has: strided (column- and 2-D-sharded) views, many local devices, resharding.

Each test breaks on wrong bytes (values compared with the global array, damaged files caught) and, where a
path exists to save work, counts that work (bytes read through the kernel, from /proc/self/io).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.format import BundleReader
from shardckpt.format.chunks import sidecar_filename

RNG = np.random.default_rng(13)
DTYPES = [np.int8, np.float16, np.float32, np.float64, np.complex128]  # item sizes 1, 2, 4, 8, 16


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _global(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    a = RNG.standard_normal(shape) * 50
    if np.issubdtype(dtype, np.complexfloating):
        a = a + 1j * RNG.standard_normal(shape)
    return a.astype(dtype)


def _data_files(prefix: str) -> list[str]:
    d = os.path.dirname(prefix)
    base = os.path.basename(prefix)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.startswith(base + ".data-") and "crc32c" not in n)


def _save_2x2(prefix: str, arrays: dict[str, np.ndarray]) -> sc.Mesh:
    mesh = sc.create_mesh([("x", 2), ("y", 2)])
    values = {k: sc.DTensor.from_global(v, sc.Layout(["x", "y"], mesh)) for k, v in arrays.items()}
    sc.name_based_save(mesh, prefix, values)
    return mesh


def _whole(t: sc.DTensor) -> np.ndarray:
    out = np.empty(t.shape, t.dtype)
    for d, shard in t.shards.items():
        out[tuple(slice(a, b) for a, b in t.bounds(d))] = shard
    return out


@pytest.fixture
def big(tmp_path):
    """A 2x2-sharded float32[2048, 2048] (four 4 MiB pieces, so the sidecar has chunk CRCs), one client."""
    prefix = str(tmp_path / "big")
    a = _global((2048, 2048), np.float32)
    _save_2x2(prefix, {"a": a})
    return prefix, a


def test_column_targets_read_each_stored_byte_once(big):
    prefix, a = big
    mesh = sc.create_mesh([("c", 4)])
    (data,) = _data_files(prefix)
    size = os.path.getsize(data)
    before = _rchar()
    (got,) = sc.sharded_restore(mesh, prefix, ["a"], [sc.Layout([sc.UNSHARDED, "c"], mesh)])
    read = _rchar() - before
    np.testing.assert_array_equal(_whole(got), a)
    # Two target column blocks share every stored piece: one read each of the piece, not one per block.
    assert size <= read < size + (1 << 20), (read, size)


def test_partial_column_reads_are_checked_against_the_chunks(big):
    prefix, a = big
    mesh = sc.create_mesh([("c", 4)])
    layout = sc.Layout([sc.UNSHARDED, "c"], mesh)
    spec = "2048 2048 100,1800:-"  # rows 100..1900: parts of each piece, read as one widened range per piece
    (got,) = sc.sharded_restore(mesh, prefix, ["a"], [layout], shape_and_slices=[spec])
    np.testing.assert_array_equal(_whole(got), a[100:1900])
    (data,) = _data_files(prefix)
    with BundleReader(prefix) as r:
        first_piece = r.stored_slices("a")[0].entry  # global rows 0..1024 or 1024..2048: row 500 is inside
    with open(data, "r+b") as f:  # a byte inside rows 100..1900 of the first piece
        f.seek(first_piece.offset + 500 * 1024 * 4 + 7)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
        sc.sharded_restore(mesh, prefix, ["a"], [layout], shape_and_slices=[spec])
    with pytest.raises(sc.ChecksumMismatchError, match="checksum does not match"):
        sc.sharded_restore(mesh, prefix, ["a"], [layout])  # whole pieces: their own CRC
    os.unlink(sidecar_filename(data))  # no sidecar: partial reads go unchecked, whole pieces still checked
    (got,) = sc.sharded_restore(mesh, prefix, ["a"], [layout], shape_and_slices=[spec])
    want = a[100:1900].copy()
    assert (_whole(got) != want).sum() == 1
    with pytest.raises(sc.ChecksumMismatchError):
        sc.sharded_restore(mesh, prefix, ["a"], [layout])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_destinations_of_every_item_size(tmp_path, dtype):
    prefix = str(tmp_path / "odd")
    a = _global((37, 53), dtype)  # odd: boxes of 19 and 18 rows, 27 and 26 columns
    _save_2x2(prefix, {"a": a})
    for target in (["x", "y"], [sc.UNSHARDED, "y"], ["y", sc.UNSHARDED], [sc.UNSHARDED, sc.UNSHARDED]):
        mesh = sc.create_mesh([("x", 2), ("y", 2)])
        layout = sc.Layout(target, mesh)
        for kind in ("rows", "every-other"):
            shards = {}
            bases = {}
            for d in range(4):
                shape = tuple(hi - lo for lo, hi in layout.shard_bounds(a.shape, d))
                base = np.zeros((shape[0], shape[1] * 2 + 3), dtype)
                bases[d] = base
                shards[d] = base[:, 1 : 1 + shape[1]] if kind == "rows" else base[:, 1 : 1 + 2 * shape[1] : 2]
            dest = sc.DTensor(a.shape, np.dtype(dtype), layout, shards)
            (got,) = sc.sharded_restore(mesh, prefix, ["a"], [layout], into=[dest])
            np.testing.assert_array_equal(_whole(got), a)
            for d, base in bases.items():  # nothing written outside the destination views
                mask = np.ones(base.shape, bool)
                if kind == "rows":
                    mask[:, 1 : 1 + shards[d].shape[1]] = False
                else:
                    mask[:, 1 : 1 + 2 * shards[d].shape[1] : 2] = False
                assert not base[mask].any()


def test_read_boxes_matches_read_bounds_on_random_boxes(tmp_path):
    prefix = str(tmp_path / "boxes")
    a = _global((300, 260), np.float64)
    _save_2x2(prefix, {"a": a})
    rng = np.random.default_rng(5)
    with BundleReader(prefix) as r:
        for _ in range(40):
            boxes = []
            for _ in range(int(rng.integers(2, 5))):
                lo = rng.integers(0, [300, 260])
                hi = lo + rng.integers(0, [300, 260] - lo + 1)
                boxes.append(tuple(zip(lo.tolist(), hi.tolist())))
            got = r.read_boxes("a", boxes)
            for box, arr in zip(boxes, got):
                np.testing.assert_array_equal(arr, a[tuple(slice(lo, hi) for lo, hi in box)])
                np.testing.assert_array_equal(arr, r.read_bounds("a", box))
