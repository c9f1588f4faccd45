"""sharded_save(blocking=False): returns once the shards are copied, finishes in the background."""

from __future__ import annotations

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.faults import ENV as FAULT_ENV
from shardckpt.save import _async_state

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


# --- staging pool: snapshot buffers reused from one asynchronous save to the next -----------------


def _layers(coord, values):
    """Each array of ``values`` sharded over x and y; this client's DTensors."""
    local = MESH.local_devices(coord.rank, coord.size)
    return [sc.DTensor.from_global(v, sc.Layout(["x", "y"], MESH), local) for v in values]


def _check(prefix, names, values):
    reader = sc.load_checkpoint(prefix)
    for name, value in zip(names, values):
        np.testing.assert_array_equal(reader.get_tensor(name), value)


def test_second_async_save_snapshots_into_the_first_saves_buffers(tmp_path):
    w = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)
    r = np.arange(1000, dtype=np.int64)

    def client(coord):
        pool = _async_state(coord).pool
        mine_w, mine_r = w.copy(), r.copy()
        sc.sharded_save(MESH, str(tmp_path / "one"), ["w", "r"], ["", ""], _tensors(coord, mine_w, mine_r),
                        coordinator=coord, blocking=False, timeout=30).result(timeout=60)
        kept = pool.free_buffers()  # held here too, so no new buffer can land at their addresses
        made = pool.allocations
        mine_w += 1
        mine_r += 1
        t = _tensors(coord, mine_w, mine_r)
        result = sc.sharded_save(MESH, str(tmp_path / "two"), ["w", "r"], ["", ""], t, coordinator=coord,
                                 blocking=False, timeout=30).result(timeout=60)
        assert "blocking_copy" in result.timings
        assert pool.allocations == made
        assert sorted(map(id, pool.free_buffers())) == sorted(map(id, kept))
        # The second snapshot's bytes sit in a buffer the first save allocated.
        shard = np.ascontiguousarray(t[0].shards[MESH.local_devices(coord.rank, coord.size)[0]])
        assert any(b.tobytes() == shard.tobytes() for b in kept)
        return sum(b.nbytes for b in kept), pool.held

    kept = sc.LocalGroup(4).run(client)
    assert sum(n for n, _ in kept) == w.nbytes + r.nbytes  # one save's worth, over all clients
    assert all(held == n for n, held in kept)
    _check(tmp_path / "one", ["w", "r"], [w, r])
    _check(tmp_path / "two", ["w", "r"], [w + 1, r + 1])


@pytest.mark.parametrize("cap", [None, 20_000])
def test_changing_tensors_after_a_reusing_save_returns_changes_nothing_saved(tmp_path, cap):
    values = [np.arange(128 * 64, dtype=np.float32).reshape(128, 64) + 10_000 * i for i in range(3)]
    names = [f"l{i}" for i in range(3)]

    def client(coord):
        mine = [v.copy() for v in values]
        first = sc.sharded_save(MESH, str(tmp_path / "one"), names, [""] * 3, _layers(coord, mine),
                                coordinator=coord, blocking=False, max_staging_bytes=cap, timeout=30)
        for m in mine:  # the first save may still be writing: its snapshot must not see this
            m += 1
        second = sc.sharded_save(MESH, str(tmp_path / "two"), names, [""] * 3, _layers(coord, mine),
                                 coordinator=coord, blocking=False, max_staging_bytes=cap, timeout=30)
        for m in mine:
            m[:] = -1
        first.result(timeout=60)
        second.result(timeout=60)
        return _async_state(coord).pool.allocations

    allocations = sc.LocalGroup(4).run(client)
    assert all(a >= 1 for a in allocations)
    _check(tmp_path / "one", names, values)
    _check(tmp_path / "two", names, [v + 1 for v in values])


@pytest.mark.parametrize("cap, per_wave", [(20_000, 1), (70_000, 2)])
def test_waves_reuse_the_buffers_of_earlier_waves(tmp_path, cap, per_wave):
    shard_bytes = 128 * 64 * 4  # each client holds one 32 KiB shard of each tensor
    values = [np.arange(256 * 128, dtype=np.float32).reshape(256, 128) * (i + 1) for i in range(6)]
    names = [f"l{i}" for i in range(6)]

    def client(coord):
        pool = _async_state(coord).pool
        counts = []
        for step in range(2):
            step_values = [v + step for v in values]
            sc.sharded_save(MESH, str(tmp_path / f"s{step}"), names, [""] * 6, _layers(coord, step_values),
                            coordinator=coord, blocking=False, max_staging_bytes=cap, timeout=30).result(timeout=60)
            counts.append((pool.allocations, pool.held))
        return counts

    for counts in sc.LocalGroup(4).run(client):
        # Each wave waits for the one before, whose buffers come back first: never more than one wave's worth.
        assert counts == [(per_wave, per_wave * shard_bytes)] * 2
    for step in range(2):
        _check(tmp_path / f"s{step}", names, [v + step for v in values])


def test_a_smaller_cap_leaves_only_what_one_wave_needs(tmp_path):
    shard_bytes = 128 * 64 * 4
    values = [np.arange(256 * 128, dtype=np.float32).reshape(256, 128) * (i + 1) for i in range(4)]
    names = [f"l{i}" for i in range(4)]

    def client(coord):
        pool = _async_state(coord).pool
        counts = []
        for step, cap in enumerate([70_000, 20_000]):
            sc.sharded_save(MESH, str(tmp_path / f"s{step}"), names, [""] * 4,
                            _layers(coord, [v + step for v in values]), coordinator=coord, blocking=False,
                            max_staging_bytes=cap, timeout=30).result(timeout=60)
            counts.append((pool.allocations, pool.held))
        return counts

    for counts in sc.LocalGroup(4).run(client):
        # Two buffers per wave, then one: the second save reuses one and the other is dropped.
        assert counts == [(2, 2 * shard_bytes), (2, shard_bytes)]
    for step in range(2):
        _check(tmp_path / f"s{step}", names, [v + step for v in values])


def test_reuse_staging_false_keeps_nothing_and_release_empties_the_pool(tmp_path):
    w = np.arange(64 * 64, dtype=np.float64).reshape(64, 64)

    def client(coord):
        pool = _async_state(coord).pool

        def save(name, value, **kwargs):
            sc.sharded_save(MESH, str(tmp_path / name), ["w"], [""], _layers(coord, [value]), coordinator=coord,
                            blocking=False, timeout=30, **kwargs).result(timeout=60)

        save("a", w)
        assert pool.free_buffers() and pool.held == w.nbytes // 4
        made = pool.allocations
        save("b", w + 1, reuse_staging=False)
        assert pool.free_buffers() == [] and pool.held == 0
        assert pool.allocations == made  # allocated outside the pool
        save("c", w + 2)
        assert pool.held == w.nbytes // 4
        sc.release_staging_memory(coord)
        assert pool.free_buffers() == [] and pool.held == 0
        sc.release_staging_memory(coord)  # nothing pending, nothing kept: still fine
        return True

    assert all(sc.LocalGroup(4).run(client))
    for name, add in (("a", 0), ("b", 1), ("c", 2)):
        _check(tmp_path / name, ["w"], [w + add])


def test_a_save_failing_mid_write_leaves_the_pool_usable(tmp_path, monkeypatch):
    values = [np.arange(256 * 128, dtype=np.float32).reshape(256, 128) * (i + 1) for i in range(3)]
    names = [f"l{i}" for i in range(3)]

    def client(coord):
        pool = _async_state(coord).pool

        def save(name, add):
            return sc.sharded_save(MESH, str(tmp_path / name), names, [""] * 3,
                                   _layers(coord, [v + add for v in values]), coordinator=coord, blocking=False,
                                   max_staging_bytes=20_000, timeout=30)

        save("ok1", 1).result(timeout=60)
        made = pool.allocations
        coord.barrier("before-fault", 30)  # no background save of any client still runs
        if coord.rank == 0:
            monkeypatch.setenv(FAULT_ENV, "mid_data_write@1:raise")
        coord.barrier("fault-set", 30)
        with pytest.raises(sc.CheckpointError):
            save("bad", 2).result(timeout=60)
        # Whatever the failed save took came back: the pool holds exactly its free buffers.
        assert pool.held == sum(b.nbytes for b in pool.free_buffers())
        coord.barrier("after-fault", 30)
        if coord.rank == 0:
            monkeypatch.delenv(FAULT_ENV)
        coord.barrier("fault-cleared", 30)
        save("ok2", 3).result(timeout=60)
        assert pool.allocations == made
        return True

    assert all(sc.LocalGroup(4).run(client))
    assert not (tmp_path / "bad.index").exists()
    _check(tmp_path / "ok1", names, [v + 1 for v in values])
    _check(tmp_path / "ok2", names, [v + 3 for v in values])
