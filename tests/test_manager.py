"""CheckpointManager: numbered checkpoints, retention, async saves, and TensorFlow's state file both ways."""

from __future__ import annotations

import os
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import shardckpt as sc  # noqa: E402
import shardckpt.save as save_module  # noqa: E402
from shardckpt.manager import read_state_paths  # noqa: E402

MESH = sc.create_mesh([("x", 2), ("y", 2)])
LAYOUT = sc.Layout(["x", "y"], MESH)
BIAS = sc.Layout(["x"], MESH)


def _model(step: int) -> dict[str, np.ndarray]:
    return {
        "dense/kernel": np.arange(8 * 6, dtype=np.float32).reshape(8, 6) + step,
        "dense/bias": np.full((6,), step, dtype=np.int64),
    }


def _sharded(coord, step: int) -> dict[str, object]:
    local = MESH.local_devices(coord.rank, coord.size)
    m = _model(step)
    return {"dense/kernel": sc.DTensor.from_global(m["dense/kernel"], LAYOUT, local),
            "dense/bias": sc.DTensor.from_global(m["dense/bias"], BIAS, local)}


def _files(directory) -> list[str]:
    """The directory's files, less the chunk-checksum sidecars (each goes with its data file)."""
    return sorted(n for n in os.listdir(directory) if not n.endswith(".crc32c"))


def _state(directory) -> str:
    with open(os.path.join(directory, "checkpoint"), encoding="utf-8") as f:
        return f.read()


def test_four_clients_keep_the_newest_and_tensorflow_follows(tmp_path):
    d = str(tmp_path / "run")

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=2, coordinator=coord)
        for step in (10, 20, 30, 40):
            result = manager.save(step, MESH, _sharded(coord, step), timeout=30)
            assert isinstance(result, sc.SaveResult)
        target = {"dense/kernel": LAYOUT, "dense/bias": BIAS}
        latest = manager.restore(MESH, target)
        older = manager.restore(MESH, target, step=30)
        for device, shard in latest["dense/kernel"].shards.items():
            box = tuple(slice(lo, hi) for lo, hi in LAYOUT.shard_bounds((8, 6), device))
            np.testing.assert_array_equal(shard, _model(40)["dense/kernel"][box])
        return manager.latest_step(), older["dense/bias"].shards

    results = sc.LocalGroup(4).run(client)
    assert {latest for latest, _ in results} == {40}
    assert all(int(s[0]) == 30 for _, shards in results for s in shards.values())
    assert _files(d) == ["checkpoint", "ckpt-30.data-00000-of-00004", "ckpt-30.data-00001-of-00004",
                         "ckpt-30.data-00002-of-00004", "ckpt-30.data-00003-of-00004", "ckpt-30.index",
                         "ckpt-40.data-00000-of-00004", "ckpt-40.data-00001-of-00004",
                         "ckpt-40.data-00002-of-00004", "ckpt-40.data-00003-of-00004", "ckpt-40.index"]
    assert sorted(n for n in os.listdir(d) if n.endswith(".crc32c")) == [  # deleted with their data files
        f"ckpt-{s}.data-{r:05d}-of-00004.crc32c" for s in (30, 40) for r in range(4)]
    text = _state(d)
    assert text.splitlines()[:3] == ['model_checkpoint_path: "ckpt-40"', 'all_model_checkpoint_paths: "ckpt-30"',
                                     'all_model_checkpoint_paths: "ckpt-40"']
    # TensorFlow finds our newest checkpoint, reads it, and its own manager takes the directory over.
    assert tf.train.latest_checkpoint(d) == os.path.join(d, "ckpt-40")
    reader = tf.train.load_checkpoint(d)
    np.testing.assert_array_equal(reader.get_tensor("dense/kernel"), _model(40)["dense/kernel"])
    np.testing.assert_array_equal(reader.get_tensor("dense/bias"), _model(40)["dense/bias"])
    state = tf.train.get_checkpoint_state(d)
    assert list(state.all_model_checkpoint_paths) == [os.path.join(d, "ckpt-30"), os.path.join(d, "ckpt-40")]
    tf_manager = tf.train.CheckpointManager(tf.train.Checkpoint(), d, max_to_keep=2)
    assert tf_manager.latest_checkpoint == os.path.join(d, "ckpt-40")
    assert tf_manager.checkpoints == [os.path.join(d, "ckpt-30"), os.path.join(d, "ckpt-40")]
    assert sc.latest_checkpoint(d) == os.path.join(d, "ckpt-40")


def test_keep_every_n_steps_keeps_the_oldest_of_each_window(tmp_path):
    d = str(tmp_path)
    unlinked: list[str] = []

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=2, keep_every_n_steps=10, coordinator=coord)
        for step in (0, 4, 8, 12, 16, 20, 24):
            manager.save(step, MESH, {"w": np.full((4,), step, np.float32)})
        return manager.all_steps()

    real_unlink = os.unlink

    def recording_unlink(path, *args, **kwargs):
        unlinked.append(os.path.basename(path))
        return real_unlink(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "unlink", recording_unlink)
        (steps,) = sc.LocalGroup(1).run(client)
    assert steps == [0, 12, 20, 24]  # windows 0-9, 10-19, 20-29 keep their oldest; 20 and 24 are the newest
    # Retention lists only what it may still delete, as TensorFlow's manager does.
    assert [os.path.basename(p) for p in read_state_paths(d)] == ["ckpt-24", "ckpt-20", "ckpt-24"]
    # Deletion removes a checkpoint's index before its data file.
    deleted = [n for n in unlinked if n.startswith("ckpt-") and not n.endswith(".crc32c")
               and ".lease" not in n]
    assert sorted(n for n in unlinked if n.endswith(".crc32c")) == [
        f"ckpt-{s}.data-00000-of-00001.crc32c" for s in (16, 4, 8)]
    assert deleted == ["ckpt-4.index", "ckpt-4.data-00000-of-00001", "ckpt-8.index", "ckpt-8.data-00000-of-00001",
                       "ckpt-16.index", "ckpt-16.data-00000-of-00001"]
    assert not [n for n in _files(d) if "tempstate" in n or "staging" in n]


def test_max_to_keep_none_keeps_everything(tmp_path):
    def client(coord):
        manager = sc.CheckpointManager(tmp_path, max_to_keep=None, coordinator=coord)
        for step in range(1, 8):
            manager.save(step, MESH, _sharded(coord, step))
        return manager.all_steps()

    assert sc.LocalGroup(2).run(client) == [list(range(1, 8))] * 2
    assert len(read_state_paths(tmp_path)) == 8


def test_async_save_applies_retention_and_state_only_after_its_commit(tmp_path, monkeypatch):
    d = str(tmp_path)
    release = threading.Event()
    entered = threading.Event()
    real_commit = save_module.commit

    def slow_commit(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real_commit(*args, **kwargs)

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=1, coordinator=coord)
        manager.save(1, MESH, _sharded(coord, 1), timeout=30)
        if coord.rank == 0:
            monkeypatch.setattr(save_module, "commit", slow_commit)
        coord.barrier("patched", 30)
        model = _sharded(coord, 2)
        future = manager.save(2, MESH, model, blocking=False, timeout=30)
        assert isinstance(future, sc.SaveFuture)
        for t in model.values():  # the caller may change its tensors at once
            for shard in t.shards.values():
                shard[...] = -7
        if coord.rank == 0:
            assert entered.wait(30)
            # Committing is held up: the older checkpoint and the state file are untouched.
            assert not future.done()
            assert manager.all_steps() == [1]
            assert _state(d).startswith('model_checkpoint_path: "ckpt-1"\n')
            release.set()
        result = future.result(timeout=60)
        assert result.prefix == os.path.join(d, "ckpt-2")
        manager.close()
        return manager.all_steps() if coord.rank == 0 else manager.latest_step()

    assert sc.LocalGroup(4).run(client) == [[2], 2, 2, 2]
    assert _state(d).startswith('model_checkpoint_path: "ckpt-2"\n')
    reader = sc.load_checkpoint(d)
    np.testing.assert_array_equal(reader.get_tensor("dense/kernel"), _model(2)["dense/kernel"])


def test_failed_async_save_deletes_nothing(tmp_path):
    d = str(tmp_path)

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=1, coordinator=coord)
        manager.save(1, MESH, {"s": np.array([b"ok"], dtype=object)})
        bad = np.array([7], dtype=object)  # on every client: whichever the plan has write it fails
        future = manager.save(2, MESH, {"s": bad}, blocking=False, timeout=20)
        with pytest.raises(sc.CheckpointError):
            future.result(timeout=60)
        manager.close()
        return manager.all_steps()

    assert sc.LocalGroup(4).run(client) == [[1]] * 4
    assert _state(d).startswith('model_checkpoint_path: "ckpt-1"\n')
    assert not [n for n in _files(d) if n.startswith("ckpt-2")]


def test_steps_never_go_back_and_every_client_agrees(tmp_path):
    d = str(tmp_path)

    def client(coord):
        manager = sc.CheckpointManager(d, coordinator=coord)
        manager.save(5, MESH, {"w": np.ones(3, np.float32)}, timeout=30)
        with pytest.raises(sc.InvalidArgumentError, match="older than the newest"):
            manager.save(4, MESH, {"w": np.ones(3, np.float32)}, timeout=30)
        with pytest.raises(sc.CheckpointExistsError):
            manager.save(5, MESH, {"w": np.ones(3, np.float32)}, timeout=30)
        manager.save(5, MESH, {"w": np.full(3, 2, np.float32)}, overwrite=True, timeout=30)
        with pytest.raises(sc.InvalidArgumentError, match="client 0 step 6"):
            manager.save(6 + coord.rank % 2, MESH, {"w": np.ones(3, np.float32)}, timeout=30)
        with pytest.raises(sc.InvalidArgumentError, match="non-negative int"):
            manager.save(-1 if coord.rank == 2 else 6, MESH, {"w": np.ones(3, np.float32)}, timeout=30)
        return manager.all_steps()

    assert sc.LocalGroup(4).run(client) == [[5]] * 4
    np.testing.assert_array_equal(sc.load_checkpoint(d).get_tensor("w"), np.full(3, 2, np.float32))


def test_only_client_zero_does_housekeeping_and_half_deleted_checkpoints_are_swept(tmp_path, monkeypatch):
    d = str(tmp_path)
    os.makedirs(d, exist_ok=True)
    # What a crash in the middle of a deletion leaves: data files whose index is already gone.
    for name in ("ckpt-1.data-00000-of-00002", "ckpt-1.data-00001-of-00002"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "unrelated.txt").write_text("keep me")
    ranks: list[int] = []
    real = sc.CheckpointManager._housekeeping

    def spy(self, newest):
        ranks.append(self.coordinator.rank)
        return real(self, newest)

    monkeypatch.setattr(sc.CheckpointManager, "_housekeeping", spy)

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=3, coordinator=coord)
        assert manager.latest_step() is None
        with pytest.raises(sc.CheckpointNotFoundError):
            manager.restore(MESH, {"w": sc.Layout.replicated(MESH, 1)})
        manager.save(2, MESH, {"w": np.ones(3, np.float32)})
        with pytest.raises(sc.CheckpointNotFoundError):
            manager.restore(MESH, {"w": sc.Layout.replicated(MESH, 1)}, step=1)
        return manager.latest_step()

    assert sc.LocalGroup(4).run(client) == [2] * 4
    assert ranks == [0]
    assert _files(d) == ["checkpoint", "ckpt-2.data-00000-of-00004", "ckpt-2.data-00001-of-00004",
                         "ckpt-2.data-00002-of-00004", "ckpt-2.data-00003-of-00004", "ckpt-2.index", "unrelated.txt"]


def test_reads_and_continues_a_directory_tensorflow_manager_wrote(tmp_path):
    d = str(tmp_path)
    v = tf.Variable(tf.reshape(tf.range(48, dtype=tf.float32), (8, 6)))
    w = tf.Variable(tf.ones((4,), tf.bfloat16))
    tf_manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v, w=w), d, max_to_keep=3)
    for _ in range(4):
        v.assign_add(tf.ones((8, 6)))
        tf_manager.save()
    expected = v.numpy()
    name = "v/.ATTRIBUTES/VARIABLE_VALUE"
    # The state file alone also yields the steps (even without listing .index files).
    assert [os.path.basename(p) for p in read_state_paths(d)] == ["ckpt-4", "ckpt-2", "ckpt-3", "ckpt-4"]

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=3, coordinator=coord)
        steps = manager.all_steps()
        restored = manager.restore(MESH, {name: LAYOUT, "w/.ATTRIBUTES/VARIABLE_VALUE": BIAS})
        for device, shard in restored[name].shards.items():
            box = tuple(slice(lo, hi) for lo, hi in LAYOUT.shard_bounds((8, 6), device))
            np.testing.assert_array_equal(shard, expected[box])
        manager.save(5, MESH, {name: restored[name]})
        return steps, manager.latest_step()

    # Other clients may return before client 0 has applied retention, so all_steps is checked afterwards.
    assert sc.LocalGroup(4).run(client) == [([2, 3, 4], 5)] * 4
    assert sc.CheckpointManager(d).all_steps() == [3, 4, 5]
    assert tf.train.latest_checkpoint(d) == os.path.join(d, "ckpt-5")
    np.testing.assert_array_equal(tf.train.load_checkpoint(d).get_tensor(name), expected)
    reopened = tf.train.CheckpointManager(tf.train.Checkpoint(v=v, w=w), d, max_to_keep=3)
    assert reopened.checkpoints == [os.path.join(d, f"ckpt-{s}") for s in (3, 4, 5)]


def test_bad_arguments():
    with pytest.raises(sc.InvalidArgumentError):
        sc.CheckpointManager("/tmp/x", max_to_keep=0)
    with pytest.raises(sc.InvalidArgumentError):
        sc.CheckpointManager("/tmp/x", keep_every_n_steps=0)
    with pytest.raises(sc.InvalidArgumentError):
        sc.CheckpointManager("/tmp/x", checkpoint_name="a/b")


def test_dotted_checkpoint_name_and_numpy_steps(tmp_path):
    d = str(tmp_path)

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=1, checkpoint_name="model.ckpt", coordinator=coord)
        for step in np.arange(1, 4, dtype=np.int64):
            manager.save(step, MESH, {"w": np.full(2, step, np.int32)})
        return manager.latest_step()

    assert sc.LocalGroup(1).run(client) == [3]
    assert _files(d) == ["checkpoint", "model.ckpt-3.data-00000-of-00001", "model.ckpt-3.index"]
    assert tf.train.latest_checkpoint(d) == os.path.join(d, "model.ckpt-3")


def test_non_ascii_and_quoted_names_round_trip_through_the_state_file(tmp_path):
    d = str(tmp_path)
    name = 'модель "v2"'

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=2, checkpoint_name=name, coordinator=coord)
        manager.save(1, MESH, {"w": np.ones(2, np.float32)})
        return manager.latest_step()

    assert sc.LocalGroup(1).run(client) == [1]
    expected = os.path.join(d, f"{name}-1")
    assert tf.train.latest_checkpoint(d) == expected
    assert sc.latest_checkpoint(d) == expected
    assert read_state_paths(d) == [expected, expected]


def test_back_to_back_async_saves_queue_and_retention_follows_each(tmp_path):
    d = str(tmp_path)

    def client(coord):
        with sc.CheckpointManager(d, max_to_keep=2, coordinator=coord) as manager:
            futures = [manager.save(step, MESH, _sharded(coord, step), blocking=False, timeout=30)
                       for step in range(1, 6)]
            assert all(f.done() for f in futures[:-1])  # each save waited for the one before
            futures[-1].result(timeout=60)
        return manager.latest_step()

    assert sc.LocalGroup(4).run(client) == [5] * 4
    assert sc.CheckpointManager(d).all_steps() == [4, 5]
    assert tf.train.latest_checkpoint(d) == os.path.join(d, "ckpt-5")
    np.testing.assert_array_equal(tf.train.load_checkpoint(d).get_tensor("dense/kernel"), _model(5)["dense/kernel"])


def _restored_step(manager, coord) -> object:
    out = manager.restore(MESH, {"dense/bias": BIAS}, timeout=30)
    return sorted({int(v) for shard in out["dense/bias"].shards.values() for v in shard})


@pytest.mark.parametrize("ask, want", [(_restored_step, [2]), (lambda m, c: m.latest(timeout=30), 2)],
                         ids=["restore", "latest"])
def test_restore_and_latest_wait_for_the_managers_own_pending_async_save(tmp_path, ask, want):
    d = str(tmp_path / "run")
    armed, asked = threading.Event(), threading.Event()

    def hold_step_2(point: str, client: int) -> None:
        # Client 0's background save of step 2 is held before it writes, until its question was answered (or
        # 3 s): a restore or latest that does not wait for the pending save finds only step 1.
        if armed.is_set() and point == "after_plan" and client == 0:
            asked.wait(3)

    def client(coord):
        manager = sc.CheckpointManager(d, coordinator=coord)
        manager.save(1, MESH, _sharded(coord, 1), timeout=30)
        coord.barrier("saved-1", 30)
        if coord.rank == 0:
            armed.set()
        coord.barrier("armed", 30)
        manager.save(2, MESH, _sharded(coord, 2), blocking=False, timeout=30)
        answer = ask(manager, coord)
        if coord.rank == 0:
            asked.set()
        manager.close()
        return answer

    with sc.faults.hook(hold_step_2):
        assert sc.LocalGroup(2).run(client) == [want, want]


def test_clients_agree_on_the_latest_step_when_their_listings_differ(tmp_path):
    d = tmp_path / "run"
    listed = threading.Event()

    def publish_step_3() -> None:
        # Step 3 appears (its data files, then its index) after client 0 chose and before client 1 looks.
        names = sorted(os.listdir(d))
        for name in names:
            if name.startswith("ckpt-2.") and not name.startswith("ckpt-2.index"):
                os.link(d / name, d / ("ckpt-3." + name[len("ckpt-2."):]))
        os.link(d / "ckpt-2.index", d / "ckpt-3.index")

    def client(coord):
        manager = sc.CheckpointManager(d, coordinator=coord)
        for step in (1, 2):
            manager.save(step, MESH, _sharded(coord, step), timeout=30)
        coord.barrier("saved", 30)
        if coord.rank == 1:
            assert listed.wait(30)
        out = manager.restore(MESH, {"dense/bias": BIAS}, timeout=30)
        latest = manager.latest(timeout=30)
        if coord.rank == 0:
            publish_step_3()
            listed.set()
        values = sorted({int(v) for shard in out["dense/bias"].shards.values() for v in shard})
        return values, latest, manager.latest_step()

    # Each client's own view differs (client 1 sees step 3); restore and latest follow client 0's listing.
    assert sc.LocalGroup(2).run(client) == [([2], 2, 3), ([2], 2, 3)]


def test_latest_of_an_empty_directory_is_none_everywhere_and_restore_says_so(tmp_path):
    def client(coord):
        manager = sc.CheckpointManager(tmp_path / "none", coordinator=coord)
        latest = manager.latest(timeout=30)
        with pytest.raises(sc.CheckpointNotFoundError, match="no ckpt-<step> checkpoint"):
            manager.restore(MESH, {"dense/bias": BIAS}, timeout=30)
        return latest

    assert sc.LocalGroup(3).run(client) == [None, None, None]
