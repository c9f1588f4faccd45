"""A directory holding a ``checkpoint`` state file is accepted wherever a restore takes a prefix.

Issue 12 asks for it everywhere a prefix is.  Restores of one step by many clients must not mix steps, so
client 0 reads the state file and the others take its answer (`restore.agreed_prefix`): these tests give the
clients different views of the directory, and publish a step between client 0's reading and the others'
restore, and every client still restores the one step client 0 found.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.coordination import LocalGroup


def _run_dir(tmp_path: Path, steps=(1, 2, 3)) -> Path:
    d = tmp_path / "run"
    with sc.CheckpointManager(d, max_to_keep=5) as manager:
        for step in steps:
            manager.save(step, sc.create_mesh([("x", 1)]), {"w": np.full(8, step, np.float32)})
    return d


def _restored_step(coord, directory: Path) -> int:
    mesh = sc.create_mesh([("x", 2)])
    out = sc.sharded_restore(mesh, directory, ["w"], [sc.Layout(["x"], mesh)], coordinator=coord)[0]
    values = {int(v) for shard in out.shards.values() for v in shard}
    assert len(values) == 1, values
    return values.pop()


def test_every_restore_entry_point_takes_a_directory(tmp_path):
    import torch

    import shardckpt.jax as scjax
    import shardckpt.torch as sctorch

    d = _run_dir(tmp_path)
    mesh = sc.create_mesh([("x", 1)])
    assert _restored_step(None, d) == 3
    assert int(sc.name_based_restore(mesh, d, {"w": sc.Layout.replicated(mesh, 1)})["w"].shards[0][0]) == 3
    state = {"w": torch.zeros(8)}
    sctorch.load(state, d)
    assert state["w"].tolist() == [3.0] * 8
    assert scjax.restore(d)["w"].tolist() == [3.0] * 8
    with pytest.raises(sc.CheckpointNotFoundError, match="no checkpoint found in directory"):
        sc.sharded_restore(mesh, tmp_path, ["w"], [sc.Layout.replicated(mesh, 1)])


def test_clients_whose_views_of_the_directory_differ_restore_the_same_step(tmp_path):
    # Client 1 sees the directory through another path whose state file is a step behind (an NFS attribute
    # cache, a sync that has not arrived): on its own it would restore step 2.
    d = _run_dir(tmp_path)
    stale = tmp_path / "stale-view"
    shutil.copytree(d, stale)
    text = (stale / "checkpoint").read_text()
    behind = text.replace('model_checkpoint_path: "ckpt-3"', 'model_checkpoint_path: "ckpt-2"')
    assert behind != text
    (stale / "checkpoint").write_text(behind)
    assert sc.load_checkpoint(stale).get_tensor("w")[0] == 2  # its own view
    assert LocalGroup(2).run(lambda c: _restored_step(c, d if c.rank == 0 else stale)) == [3, 3]


def test_a_step_published_while_the_clients_start_is_not_mixed_in(tmp_path):
    d = _run_dir(tmp_path)

    def publish_step_4(point: str, client: int) -> None:
        # Client 0 has read the state file (step 3); step 4 is published before any other client restores.
        if point == "after_latest_resolved":
            with sc.CheckpointManager(d, max_to_keep=5) as manager:
                manager.save(4, sc.create_mesh([("x", 1)]), {"w": np.full(8, 4, np.float32)})

    with sc.faults.hook(publish_step_4):
        assert LocalGroup(2).run(lambda c: _restored_step(c, d)) == [3, 3]
    assert sc.load_checkpoint(d).get_tensor("w")[0] == 4


def test_a_directory_without_a_checkpoint_fails_on_every_client(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    def client(coord) -> str:
        try:
            _restored_step(coord, empty)
        except sc.CheckpointNotFoundError as exc:
            return type(exc).__name__
        return "ok"

    assert LocalGroup(2).run(client) == ["CheckpointNotFoundError"] * 2
