"""Meshes, layouts, shard geometry and DTensor packing."""

from __future__ import annotations

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.plan import SaveTensor, plan_save


def test_mesh_basics_and_string_form():
    mesh = sc.create_mesh([("x", 2), ("y", 4)])
    assert mesh.size == 8 and mesh.dim_size("y") == 4
    assert mesh.coords(5) == {"x": 1, "y": 1}
    assert mesh.client_devices(1, 2) == (4, 5, 6, 7)
    assert mesh.client_devices(1, 3) == (2, 3, 4)  # uneven blocks
    text = mesh.to_string()
    assert text.startswith("|x=2,y=4|0,1,2,3,4,5,6,7|0,1,2,3,4,5,6,7|/job:localhost")
    again = sc.Mesh.from_string(text)
    assert (again.dim_names, again.shape, again.device_ids) == (mesh.dim_names, mesh.shape, mesh.device_ids)
    # DTensor's own string for a distributed mesh, with local ids and devices
    tf_text = "mesh|x=2|0,1|1|/job:worker/replica:0/task:1/device:CPU:0"
    m = sc.Mesh.from_string(tf_text)
    assert m.name == "mesh" and m.local_device_ids == (1,) and m.local_devices(0, 2) == (1,)
    with pytest.raises(sc.InvalidArgumentError):
        sc.create_mesh([("x", 2), ("x", 2)])
    with pytest.raises(sc.InvalidArgumentError):
        mesh.dim_size("z")


def test_layout_string_form_and_geometry():
    mesh = sc.create_mesh([("x", 2), ("y", 2)])
    layout = sc.Layout(["x", sc.UNSHARDED], mesh)
    assert layout.to_string().startswith("sharding_specs:x,unsharded, mesh:|x=2,y=2|")
    assert sc.Layout.from_string(layout.to_string()).sharding_specs == ("x", "unsharded")
    assert layout.shard_bounds((8, 3), 2) == ((4, 8), (0, 3))
    # Uneven: torch's chunk rule, 5 rows over 4 -> 2,2,1,0
    four = sc.Layout(["a"], sc.create_mesh([("a", 4)]))
    assert [four.shard_bounds((5,), d) for d in range(4)] == [((0, 2),), ((2, 4),), ((4, 5),), ((5, 5),)]
    with pytest.raises(sc.InvalidArgumentError):
        sc.Layout(["x", "x"], mesh)


def test_pack_unpack_and_from_global():
    mesh = sc.create_mesh([("x", 2)], local_device_ids=[0, 1])
    layout = sc.Layout(["x", sc.UNSHARDED], mesh)
    a = np.arange(12).reshape(4, 3)
    t = sc.pack([a[:2], a[2:]], layout)
    assert t.shape == (4, 3)
    np.testing.assert_array_equal(t.to_numpy(), a)
    assert [s.tolist() for s in sc.unpack(t)] == [a[:2].tolist(), a[2:].tolist()]
    g = sc.DTensor.from_global(a, layout)
    assert np.shares_memory(g.shards[0], a)  # views, no copies
    with pytest.raises(sc.ShapeMismatchError):
        sc.DTensor((4, 3), a.dtype, layout, {0: a})


def test_plan_balances_and_dedups_deterministically():
    mesh = sc.create_mesh([("x", 4)])
    rep = sc.Layout.replicated(mesh, 1)
    specs = [SaveTensor(f"t{i}", 1, 4, (100 * (i + 1),), ((0, 100 * (i + 1)),), rep) for i in range(8)]
    devices = [(0,), (1,), (2,), (3,)]
    items = plan_save(specs, devices)
    assert plan_save(specs, devices) == items
    assert len(items) == 8
    loads = [sum(it.nbytes for it in items if it.client == c) for c in range(4)]
    assert max(loads) <= 1.25 * sum(loads) / 4
    sharded = sc.Layout(["x"], mesh)
    items = plan_save([SaveTensor("s", 1, 4, (8,), ((0, 8),), sharded)], devices)
    assert [(it.box, it.client) for it in items] == [(((0, 2),), 0), (((2, 4),), 1), (((4, 6),), 2), (((6, 8),), 3)]
    with pytest.raises(sc.DuplicateTensorError):
        plan_save([SaveTensor("d", 1, 4, (8,), ((0, 4),), sharded), SaveTensor("d", 1, 4, (8,), ((2, 6),), sharded)],
                  devices)


def test_large_replicated_shards_are_split_among_their_holders(tmp_path):
    mesh = sc.create_mesh([("x", 4)])
    rep = sc.Layout.replicated(mesh, 2)
    big = SaveTensor("big", 1, 4, (4096, 1024), ((0, 4096), (0, 1024)), rep)  # 16 MiB
    items = plan_save([big], [(0,), (1,), (2,), (3,)])
    assert sorted(it.client for it in items) == [0, 1, 2, 3]
    assert sorted(it.box for it in items) == [(((i * 1024, (i + 1) * 1024)), (0, 1024)) for i in range(4)]
    assert all(it.within == it.box for it in items)
    assert len(plan_save([big], [(0,), (1,), (2,), (3,)], split_bytes=0)) == 1
    # End to end: each client writes a quarter, and the tensor reads back whole.
    array = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)

    def client(coord):
        return sc.sharded_save(mesh, str(tmp_path / "r"), ["big"], [""], [array], coordinator=coord)

    written = [r.bytes_written for r in sc.LocalGroup(4).run(client)]
    assert written == [array.nbytes // 4] * 4
    np.testing.assert_array_equal(sc.load_checkpoint(tmp_path / "r").get_tensor("big"), array)


def test_a_dim_sharded_over_several_mesh_dims():
    mesh = sc.create_mesh([("x", 2), ("y", 3)])
    layout = sc.Layout([("x", "y"), sc.UNSHARDED], mesh)
    assert layout.num_shards(0) == 6
    # nested splits, outermost first: 12 rows -> 6 per x -> 2 per y
    assert [layout.shard_bounds((12, 4), d)[0] for d in range(6)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10),
                                                                       (10, 12)]
    # uneven, as torch's nested chunks: 10 rows -> 5 + 5 -> (2, 2, 1) each
    assert [layout.shard_bounds((10, 4), d)[0] for d in range(6)] == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9),
                                                                       (9, 10)]
    assert sc.Layout([("x",), sc.UNSHARDED], mesh).sharding_specs == ("x", sc.UNSHARDED)
    with pytest.raises(sc.InvalidArgumentError):
        sc.Layout([("x", "y"), "y"], mesh)


MESH_SCRIPT = """
import json, os, sys
import numpy as np
import shardckpt as sc
if sys.argv[1] == "torch":                              # no launcher variables: torch.distributed tells the rank
    for name in ("SHARDCKPT_COORDINATOR", "SHARDCKPT_RANK", "SHARDCKPT_WORLD_SIZE", "SHARDCKPT_COORDINATOR_KEY"):
        os.environ.pop(name)
    import torch.distributed as dist
    dist.init_process_group("gloo")
elif sys.argv[1] == "jax":                              # no launcher variables: JAX's distributed runtime tells
    for name in ("SHARDCKPT_COORDINATOR", "SHARDCKPT_RANK", "SHARDCKPT_WORLD_SIZE", "SHARDCKPT_COORDINATOR_KEY"):
        os.environ.pop(name)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    address = "127.0.0.1:" + os.environ["MASTER_PORT"]
    jax.distributed.initialize(coordinator_address=address, num_processes=int(os.environ["WORLD_SIZE"]),
                               process_id=int(os.environ["RANK"]), coordinator_bind_address=address,
                               initialization_timeout=120)
mesh = sc.create_mesh([("x", 2), ("y", 3)])
w = sc.DTensor.from_global(np.arange(36).reshape(6, 6), sc.Layout(["x", "y"], mesh))
small = sc.create_mesh([("z", 2)])                      # fewer devices than clients: no local block
print(json.dumps({"rank": int(os.environ["RANK"]), "local": list(mesh.local_device_ids),
                  "shards": sorted(w.shards), "small": small.local_device_ids}))
if sys.argv[1] == "jax":
    jax.distributed.shutdown()
"""


@pytest.mark.parametrize("engine", ["launch", "torch", "jax"])
def test_create_mesh_knows_this_clients_devices_in_a_launched_process(tmp_path, engine):
    import json
    import subprocess
    import sys

    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "shardckpt", "launch", "-n", "4", str(script), engine],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    seen = sorted((json.loads(line.partition(" ")[2]) for line in result.stdout.splitlines()),
                  key=lambda r: r["rank"])
    # 6 devices among 4 clients: DTensor's contiguous blocks, uneven (6*r//4 .. 6*(r+1)//4).
    blocks = [[0], [1, 2], [3], [4, 5]]
    assert seen == [{"rank": r, "local": blocks[r], "shards": blocks[r], "small": None} for r in range(4)]


def test_create_mesh_in_a_process_on_its_own_names_no_local_devices():
    # In-process groups (LocalGroup) pass device ids or ask their coordinator; the mesh must stay neutral.
    mesh = sc.create_mesh([("x", 4)])
    assert mesh.local_device_ids is None and mesh.local_devices(1, 2) == (2, 3)
    assert sc.create_mesh([("x", 4)], local_device_ids=[3]).local_device_ids == (3,)
