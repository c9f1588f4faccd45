"""``sharded_restore(..., mmap=True)``: large contiguous shards come back as copy-on-write mappings of the file."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.format import BundleReader
from shardckpt.format.files import data_filename

RNG = np.random.default_rng(7)
BIG = RNG.standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB; 2x2 shards of 1 MiB
ROWS = RNG.standard_normal((1024, 1024)).astype(np.float32)  # saved as row halves of 2 MiB
SMALL = np.arange(1000, dtype=np.float32)  # below the mapping threshold
MESH = sc.create_mesh([("x", 2), ("y", 2)])
MESH41 = sc.create_mesh([("x", 4), ("y", 1)])


def _mapped(arr: np.ndarray) -> bool:
    """Whether ``arr``'s memory is a file mapping (its base chain ends in an mmap)."""
    base = arr
    while base is not None:
        if isinstance(base, memoryview):
            return isinstance(base.obj, mmap.mmap)
        base = getattr(base, "base", None)
    return False


def _save(prefix, big=BIG, rows=ROWS, overwrite=False):
    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        b = sc.DTensor.from_global(big, sc.Layout(["x", "y"], MESH), local)
        r = sc.DTensor.from_global(rows, sc.Layout(["x", sc.UNSHARDED], MESH), local)
        return sc.sharded_save(MESH, prefix, ["big", "rows", "small"], ["", "", ""], [b, r, SMALL],
                               coordinator=coord, overwrite=overwrite)

    sc.LocalGroup(4).run(client)


def _restore(prefix, mesh, layouts, clients, **kwargs):
    names = list(layouts)

    def client(coord):
        return sc.sharded_restore(mesh, prefix, names, [layouts[n] for n in names], coordinator=coord, **kwargs)

    return sc.LocalGroup(clients).run(client)


@pytest.fixture
def saved(tmp_path):
    prefix = str(tmp_path / "ckpt")
    _save(prefix)
    return prefix


def _corrupt(prefix: str, name: str, at: int) -> None:
    """Flip one byte ``at`` bytes into the first stored piece of ``name``."""
    with BundleReader(prefix) as r:
        piece = r.stored_slices(name)[0]
        path = data_filename(r.prefix, piece.entry.shard_id, r.header.num_shards)
    with open(path, "r+b") as f:
        f.seek(piece.entry.offset + at)
        byte = f.read(1)
        f.seek(piece.entry.offset + at)
        f.write(bytes([byte[0] ^ 0x40]))


def test_same_layout_shards_are_mappings_with_the_saved_values(saved):
    layouts = {"big": sc.Layout(["x", "y"], MESH), "rows": sc.Layout(["x", sc.UNSHARDED], MESH),
               "small": sc.Layout.replicated(MESH, 1)}
    for big, rows, small in _restore(saved, MESH, layouts, 4, mmap=True):
        for t, full in ((big, BIG), (rows, ROWS)):
            for d, shard in t.shards.items():
                assert _mapped(shard) and shard.flags.writeable
                np.testing.assert_array_equal(shard, full[tuple(slice(a, b) for a, b in t.bounds(d))])
        assert not any(_mapped(s) for s in small.shards.values())  # small pieces are copied
        np.testing.assert_array_equal(small.to_numpy(), SMALL)


def test_row_blocks_of_a_piece_are_mapped_and_other_reshards_copy(saved):
    layouts = {"rows": sc.Layout(["x", sc.UNSHARDED], MESH41), "big": sc.Layout(["x", "y"], MESH41)}
    for rows, big in _restore(saved, MESH41, layouts, 4, mmap=True):
        for d, shard in rows.shards.items():  # 256 of a stored piece's 512 rows: one contiguous range
            assert _mapped(shard)
            np.testing.assert_array_equal(shard, ROWS[slice(*rows.bounds(d)[0])])
        for d, shard in big.shards.items():  # rows of two stored column blocks: assembled by copying
            assert not _mapped(shard)
            np.testing.assert_array_equal(shard, BIG[tuple(slice(a, b) for a, b in big.bounds(d))])
    one = sc.create_mesh([("x", 1)])
    (whole,) = sc.sharded_restore(one, saved, ["big"], [sc.Layout.replicated(one, 2)], mmap=True)
    assert not _mapped(whole.shards[0])
    np.testing.assert_array_equal(whole.shards[0], BIG)


def test_writes_stay_in_the_process_and_mappings_outlive_an_overwrite(saved):
    layout = sc.Layout(["x", sc.UNSHARDED], MESH)
    (first,) = _restore(saved, MESH, {"rows": layout}, 1, mmap=True)[0]
    shard = first.shards[0]
    shard[:] = -1.0  # copy-on-write: neither the file nor a later restore sees this
    with BundleReader(saved) as r:
        np.testing.assert_array_equal(r.read("rows"), ROWS)
    (again,) = _restore(saved, MESH, {"rows": layout}, 1, mmap=True)[0]
    np.testing.assert_array_equal(again.to_numpy(), ROWS)
    _save(saved, big=-BIG, rows=-ROWS, overwrite=True)  # new files are renamed over the mapped ones
    assert _mapped(again.shards[3])
    np.testing.assert_array_equal(again.to_numpy(), ROWS)  # still the old checkpoint's bytes
    (new,) = _restore(saved, MESH, {"rows": layout}, 1, mmap=True)[0]
    np.testing.assert_array_equal(new.to_numpy(), -ROWS)


def test_a_flipped_byte_in_a_mapped_piece_is_caught(saved):
    _corrupt(saved, "big", 12345)
    layout = sc.Layout(["x", "y"], MESH)
    where = r"tensor big \(slice 0,512:0,512\) in .*ckpt\.data-00000-of-00004"
    with pytest.raises(sc.ChecksumMismatchError, match=where):
        _restore(saved, MESH, {"big": layout}, 4, mmap=True)


def test_a_part_is_checked_against_its_whole_piece_with_verify_full(saved):
    _corrupt(saved, "rows", 3 << 19)  # in the second half of the first row piece (2 MiB)
    mesh = sc.create_mesh([("x", 4), ("y", 1)], local_device_ids=[0])  # client 0 of 4: rows 0..256
    layout = sc.Layout(["x", sc.UNSHARDED], mesh)
    (first,) = sc.sharded_restore(mesh, saved, ["rows"], [layout], mmap=True)
    assert _mapped(first.shards[0])  # a part is read without a CRC unless verify="full"
    np.testing.assert_array_equal(first.shards[0], ROWS[:256])
    with pytest.raises(sc.ChecksumMismatchError, match=r"tensor rows \(slice 0,512:0,1024\)"):
        sc.sharded_restore(mesh, saved, ["rows"], [layout], mmap=True, verify="full")


def test_into_wins_over_mmap(saved):
    mesh = sc.create_mesh([("x", 2), ("y", 2)], local_device_ids=[0, 1, 2, 3])
    layout = sc.Layout(["x", "y"], mesh)
    mine = {d: np.zeros((512, 512), np.float32) for d in range(4)}
    (got,) = sc.sharded_restore(mesh, saved, ["big"], [layout], mmap=True,
                                into=[sc.DTensor((1024, 1024), np.float32, layout, mine)])
    assert all(got.shards[d] is mine[d] for d in range(4))
    np.testing.assert_array_equal(got.to_numpy(), BIG)


def test_reader_maps_whole_pieces_and_refuses_a_truncated_file(saved):
    with BundleReader(saved, mmap=True) as r:
        piece = r.stored_slices("big")[0]
        got = r.read_stored(piece)
        assert _mapped(got)
        np.testing.assert_array_equal(got, BIG[:512, :512])
        path = data_filename(r.prefix, piece.entry.shard_id, r.header.num_shards)
    os.truncate(path, piece.entry.offset + 100)
    with BundleReader(saved, mmap=True) as r, pytest.raises(sc.TruncatedFileError, match="needs bytes"):
        r.read_stored(r.stored_slices("big")[0])

