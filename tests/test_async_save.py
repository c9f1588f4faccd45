"""sharded_save(blocking=False): returns once the shards are copied, finishes in the background."""

from __future__ import annotations

import numpy as np
import pytest

import shardckpt as sc

MESH = sc.create_mesh([("x", 2), ("y", 2)])


def _tensors(coord, w, r):
    local = MESH.local_devices(coord.rank, coord.size)
    return [sc.DTensor.from_global(w, sc.Layout(["x", "y"], MESH), local), r]


@pytest.mark.parametrize("cap", [None, 40_000])
def test_async_save_snapshots_then_lets_the_caller_change_its_tensors(tmp_path, cap):
    w = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)
    r = np.arange(1000, dtype=np.int64)

    def client(coord):
        mine_w, mine_r = w.copy(), r.copy()
        t = _tensors(coord, mine_w, mine_r)
        future = sc.sharded_save(MESH, str(tmp_path / "a"), ["w", "r"], ["", ""], t, coordinator=coord,
                                 blocking=False, max_staging_bytes=cap, timeout=30)
        assert isinstance(future, sc.SaveFuture)
        mine_w[:] = -1  # the caller may change its tensors right away
        mine_r[:] = -1
        return future.result(timeout=60)

    results = sc.LocalGroup(4).run(client)
    assert sum(res.bytes_written for res in results) == w.nbytes + r.nbytes
    assert "blocking_copy" in results[0].timings
    reader = sc.load_checkpoint(tmp_path / "a")
    np.testing.assert_array_equal(reader.get_tensor("w"), w)
    np.testing.assert_array_equal(reader.get_tensor("r"), r)


def test_second_async_save_waits_for_the_first_and_errors_surface_in_result(tmp_path):
    w = np.ones((64, 64), np.float32)

    def client(coord):
        first = sc.sharded_save(MESH, str(tmp_path / "one"), ["w"], [""], [w], coordinator=coord, blocking=False)
        second = sc.sharded_save(MESH, str(tmp_path / "two"), ["w"], [""], [w * 2], coordinator=coord,
                                 blocking=False)
        assert first.done()  # the second call waited for the first
        second.result()
        third = sc.sharded_save(MESH, str(tmp_path / "one"), ["w"], [""], [w], coordinator=coord, blocking=False)
        return third

    futures = None
    with pytest.raises(sc.CheckpointExistsError):
        futures = sc.LocalGroup(4).run(client)
    assert futures is None
    np.testing.assert_array_equal(sc.load_checkpoint(tmp_path / "two").get_tensor("w"), w * 2)


def test_background_failure_is_raised_by_result(tmp_path):
    layout = sc.Layout(["x", "y"], MESH)

    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        values = np.array([[b"ok"], [b"ok"]], dtype=object)
        if coord.rank == 1:
            values = np.array([[b"ok"], [7]], dtype=object)
        t = sc.DTensor((4, 2), object, layout, {d: values for d in local})
        future = sc.sharded_save(MESH, str(tmp_path / "bad"), ["s"], [""], [t], coordinator=coord, blocking=False,
                                 timeout=20)
        with pytest.raises(sc.CheckpointError):
            future.result(timeout=60)
        return True

    assert all(sc.LocalGroup(4).run(client))
    assert not (tmp_path / "bad.index").exists()
