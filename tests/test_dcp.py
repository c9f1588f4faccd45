"""`shardckpt.dcp`: PyTorch DCP saving into and loading from a TensorFlow V2 bundle, with real gloo ranks.

Two launches of fresh processes (this file run as a script is the worker):

* 4 ranks, a tensor-parallel model on a 2x2 ``("dp", "tp")`` gloo mesh (uneven
  Colwise/Rowwise shards, a replicated bias) plus Adam state and plain objects from
  ``get_state_dict``: ``dcp.save`` and ``dcp.async_save``; a rank that raises inside
  ``write_data`` and a coordinator that fails inside ``finish`` leave the previous
  checkpoint bit-identical and the next save to the path succeeds; an object without a
  JSON form fails on every rank;
* 2 ranks on a 1-D mesh with the Colwise/Rowwise plan swapped load both checkpoints
  (resharding every matrix) and ``set_state_dict`` them; then a rank is SIGKILLed
  while writing over a checkpoint, which stays readable and bit-identical;

while TensorFlow (its own process) reads both 4-rank checkpoints.  Objects, crafted
entries and pickle opt-in are tested in this process (``no_dist=True``).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

pytestmark = [pytest.mark.timeout(400)]

RUN_TIMEOUT = 180

EXTRA = {"epoch": 3, "note": "ok", "none": None, "hist": [1.5, float("inf"), -0.0], "pair": (1, "a"),
         "nested": [{"k": [1, 2]}, {"k": []}]}


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


# --- worker side -------------------------------------------------------------------------------------


def _model(mesh: Any, swapped: bool) -> Any:
    import torch
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    plan = {"0": RowwiseParallel(), "2": ColwiseParallel()} if swapped else {"0": ColwiseParallel(),
                                                                              "2": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def _flat_full(state: dict) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every DCP fqn of a state dict: tensors whole (gathered; a collective), objects as they are."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.tensor import DTensor

    flat, _ = flatten_state_dict(state)
    tensors, objs = {}, {}
    for fqn in sorted(flat):
        v = flat[fqn]
        if isinstance(v, DTensor):
            tensors[fqn] = v.full_tensor().detach().numpy().copy()
        elif isinstance(v, torch.Tensor):
            tensors[fqn] = v.detach().numpy().copy()
        else:
            objs[fqn] = v
    return tensors, objs


def _scaled(state: Any) -> Any:
    import torch

    if isinstance(state, dict):
        return {k: _scaled(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return state * 2 + 1
    return state


def _expect_failure(events: dict, label: str, fn: Any) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        fn()
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - recorded for the test
        events[label] = f"{type(exc).__name__}: {exc}"[:3000]
    else:
        events[label] = None


def _compare(prefix: str, tensors: dict[str, np.ndarray]) -> list[str]:
    """Names whose whole tensor in the bundle is not bit-identical to ``tensors``."""
    import shardckpt

    bad = []
    with shardckpt.load_checkpoint(prefix) as r:
        for fqn, want in tensors.items():
            got = r.get_tensor(fqn)
            if got.dtype != want.dtype or got.shape != want.shape or _bits(got) != _bits(want):
                bad.append(fqn)
    return bad


def _tcp_sockets() -> set[str]:
    """This process's TCP sockets (listening or connected), from its fds and the kernel's tables."""
    import engine_worker as ew

    return {f"{table} {cols[1]} -> {cols[2]} state {cols[3]}" for table, cols in ew.own_tcp_sockets()}


def _grid(mesh: Any) -> dict[str, Any]:
    """DTensors on the whole 2x2 mesh: both dims sharded, one replicated, one dim sharded twice (uneven)."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10)
    return {"ss": distribute_tensor(full, mesh, [Shard(0), Shard(1)]),
            "rs": distribute_tensor(full + 1, mesh, [Replicate(), Shard(1)]),
            "sr": distribute_tensor(full + 2, mesh, [Shard(0), Replicate()]),
            "s0s0": distribute_tensor(torch.arange(7.0), mesh, [Shard(0), Shard(0)])}


def scenario_four(rank: int, directory: str, events: dict) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from shardckpt.faults import ENV
    from shardckpt.torch import StorageWriter

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model(mesh["tp"], swapped=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    uneven = distribute_tensor(torch.arange(7.0), mesh["tp"], [Shard(0)])  # 4 and 3 rows
    tiny = distribute_tensor(torch.ones(1), mesh["tp"], [Shard(0)])  # one element: the second shard is empty
    state = {"model": msd, "optim": osd, "extra": dict(EXTRA), "uneven": uneven, "tiny": tiny,
             "empty": torch.zeros(0, 3), "grid": _grid(mesh)}
    tensors, objs = _flat_full(state)
    if rank == 0:
        np.savez(os.path.join(directory, "expected.npz"), **{k.replace("/", "|"): v for k, v in tensors.items()})
        with open(os.path.join(directory, "objects.pkl"), "wb") as f:  # the test's own file, never a checkpoint
            pickle.dump(objs, f)

    # DCP's own collectives only: no socket (a TCPStore server, a second rendezvous's connections) and no
    # process group appears during the save (seen at its fault points on every rank) or the load.
    from torch.distributed.distributed_c10d import _world

    from shardckpt import faults
    from shardckpt.torch import StorageReader

    sockets, groups = _tcp_sockets(), len(_world.pg_map)
    new_sockets: dict[str, list[str]] = {}

    def look(point: str, client: int) -> None:
        if _tcp_sockets() - sockets:
            new_sockets[point] = sorted(_tcp_sockets() - sockets)
        events.setdefault("points_seen", []).append(point)

    t = time.monotonic()
    with faults.hook(look):
        dcp.save(state, storage_writer=StorageWriter(os.path.join(directory, "sync"), durable=False))
    events["sync_s"] = time.monotonic() - t
    # The 2x2-mesh DTensors back onto the same mesh and placements, from zeros.
    back = {"grid": {k: v * 0 for k, v in _grid(mesh).items()}}
    dcp.load(back, storage_reader=StorageReader(os.path.join(directory, "sync")))
    look("after_load", rank)
    events["grid_back"] = [k for k, v in back["grid"].items()
                           if _bits(v.full_tensor().numpy()) != _bits(tensors[f"grid.{k}"])
                           or v.placements != state["grid"][k].placements]
    events["new_sockets"] = new_sockets
    events["new_groups"] = len(_world.pg_map) - groups
    t = time.monotonic()
    fut = dcp.async_save(state, storage_writer=StorageWriter(os.path.join(directory, "async"), durable=False))
    events["async_type"] = type(fut).__name__
    fut.result(timeout=120)
    events["async_s"] = time.monotonic() - t

    fail = os.path.join(directory, "fail")
    dcp.save(state, storage_writer=StorageWriter(fail, durable=False))
    scaled = _scaled(state)
    scaled_tensors, _ = _flat_full(scaled)

    def with_fault(spec: str) -> Any:
        def run() -> None:
            os.environ[ENV] = spec
            try:
                dcp.save(scaled, storage_writer=StorageWriter(fail, durable=False))
            finally:
                del os.environ[ENV]
        return run

    _expect_failure(events, "write_fails", with_fault("after_plan@2:raise"))
    if rank == 0:
        events["after_write_fails"] = _compare(os.path.join(fail, "model"), tensors)
    _expect_failure(events, "finish_fails", with_fault("after_index_staged@0:raise"))
    if rank == 0:
        events["after_finish_fails"] = _compare(os.path.join(fail, "model"), tensors)
    dcp.save(scaled, storage_writer=StorageWriter(fail, durable=False))  # no PrefixBusyError: the lease went
    if rank == 0:
        events["after_resave"] = _compare(os.path.join(fail, "model"), scaled_tensors)
        events["fail_files"] = sorted(os.listdir(fail))

    _expect_failure(events, "set_refused", lambda: dcp.save(
        {"w": torch.ones(2), "bad": {1, 2}}, storage_writer=StorageWriter(os.path.join(directory, "bad"))))
    events["bad_index"] = os.path.exists(os.path.join(directory, "bad", "model.index"))


def scenario_two(rank: int, directory: str, events: dict) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from shardckpt.faults import ENV
    from shardckpt.torch import StorageReader, StorageWriter

    with np.load(os.path.join(directory, "expected.npz")) as z:
        expected = {k.replace("|", "/"): z[k] for k in z.files}
    with open(os.path.join(directory, "objects.pkl"), "rb") as f:
        expected_objs = pickle.load(f)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = _model(mesh, swapped=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)

    for which in ("sync", "async"):
        msd, osd = get_state_dict(model, opt)
        for sd in (msd, osd["state"]):
            for v in (sd.values() if sd is msd else [x for s in sd.values() for x in s.values()]):
                (v.to_local() if isinstance(v, DTensor) else v).detach().zero_()
        extra = {"epoch": 0, "note": "", "none": 0, "hist": [], "pair": None,
                 "nested": [{"k": None}, {"k": None}]}  # lists of dicts: DCP flattens them, the template too
        uneven = distribute_tensor(torch.zeros(7), mesh, [Replicate()])
        grid = {"ss": distribute_tensor(torch.zeros(6, 10), mesh, [Shard(1)]),
                "rs": distribute_tensor(torch.zeros(6, 10), mesh, [Shard(0)]),
                "sr": distribute_tensor(torch.zeros(6, 10), mesh, [Replicate()]),
                "s0s0": distribute_tensor(torch.zeros(7), mesh, [Shard(0)])}
        state = {"model": msd, "optim": osd, "extra": extra, "uneven": uneven,
                 "tiny": distribute_tensor(torch.zeros(1), mesh, [Replicate()]), "empty": torch.ones(0, 3),
                 "grid": grid}
        events[f"{which}_placements"] = str(msd["0.weight"].placements)
        dcp.load(state, storage_reader=StorageReader(os.path.join(directory, which)))
        tensors, objs = _flat_full(state)
        events[f"{which}_names"] = sorted(tensors) == sorted(expected)
        events[f"{which}_bad"] = [k for k in expected if k not in tensors or _bits(tensors[k]) != _bits(expected[k])
                                  or tensors[k].dtype != expected[k].dtype]
        events[f"{which}_objects"] = repr(objs) == repr(expected_objs)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        events[f"{which}_lr"] = opt.param_groups[0]["lr"]

    two = os.path.join(directory, "two")
    dcp.save(state, storage_writer=StorageWriter(two, durable=False))
    import engine_worker as ew

    ew.write_result(rank, True, events, None)  # rank 1 does not outlive the next save
    os.environ[ENV] = "mid_data_write@1:kill"
    events["killed"] = "no"
    try:
        dcp.save(_scaled(state), storage_writer=StorageWriter(two, durable=False))
    except BaseException as exc:  # noqa: BLE001 - rank 1 is gone (DCP's CheckpointException is a BaseException)
        events["killed"] = f"{type(exc).__name__}"
    finally:
        del os.environ[ENV]


def scenario_fsdp2(rank: int, directory: str, events: dict) -> None:
    """FSDP2 (`fully_shard`, parameters as Shard(0) DTensors) plus Adam through get_state_dict, saved and loaded
    into a differently initialised copy: every full tensor bit-identical, param_groups back."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shardckpt.torch import StorageReader, StorageWriter

    mesh = init_device_mesh("cpu", (2,))

    def build(seed: int, lr: float) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        for part in (model[0], model[2], model):
            fully_shard(part, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model(torch.randn(5, 8)).sum().backward()
        opt.step()
        return model, opt

    model, opt = build(0, 0.01)
    msd, osd = get_state_dict(model, opt)
    events["placements"] = str(msd["0.weight"].placements)
    out = os.path.join(directory, "fsdp2")
    dcp.save({"model": msd, "optim": osd}, storage_writer=StorageWriter(out))
    want = {k: v.full_tensor() for k, v in msd.items()}
    want_opt = {f"{k}/{n}": (t.full_tensor() if hasattr(t, "full_tensor") else t)
                for k, st in osd["state"].items() for n, t in st.items()}
    model2, opt2 = build(1, 0.5)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, storage_reader=StorageReader(out))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd3, osd3 = get_state_dict(model2, opt2)
    events["bad"] = [k for k, v in msd3.items() if not torch.equal(v.full_tensor(), want[k])]
    events["bad_opt"] = [f"{k}/{n}" for k, st in osd3["state"].items() for n, t in st.items()
                         if not torch.equal(t.full_tensor() if hasattr(t, "full_tensor") else t, want_opt[f"{k}/{n}"])]
    events["lr"] = opt2.param_groups[0]["lr"]


def worker(scenario: str, directory: str) -> int:
    import engine_worker as ew

    run = {"four": scenario_four, "two": scenario_two, "fsdp2": scenario_fsdp2}[scenario]
    # "two" kills the other rank: no orderly teardown of the group
    return ew.torch_worker(lambda rank, events: run(rank, directory, events), hard_exit=scenario == "two")


# --- test side ----------------------------------------------------------------------------------------


def launch(n: int, scenario: str, directory: Path, results: Path) -> Any:
    import engine_worker as ew

    results.mkdir()
    env = ew._base_env(str(results))
    env["GLOO_SOCKET_IFNAME"] = "lo"
    t = time.monotonic()
    codes, output = ew.launch_torch(n, [__file__, "worker", scenario, os.fspath(directory)], env, RUN_TIMEOUT)
    out = {}
    for name in os.listdir(results):
        with open(results / name) as f:
            res = json.load(f)
        out[res["rank"]] = res
    return ew.Run(codes, out, output, time.monotonic() - t)


TF_READER = r"""
import json, sys
import numpy as np
import tensorflow as tf
out, strings = {}, {}
for d in sys.argv[2:]:
    reader = tf.train.load_checkpoint(d)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, bytes):
            strings[d + "|" + name] = value.decode("latin-1")
        else:
            out[d + "|" + name] = np.asarray(value)
np.savez(sys.argv[1], **out)
print(json.dumps(strings))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("dcp")
    directory = base / "ckpt"
    directory.mkdir()
    t = time.monotonic()
    four = launch(4, "four", directory, base / "results-four")
    out: dict[str, Any] = {"dir": directory, "four": four}
    if not (directory / "sync" / "model.index").exists():
        return out
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    tf = subprocess.Popen([sys.executable, "-c", TF_READER, str(base / "tf.npz"), str(directory / "sync"),
                           str(directory / "async")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out["two"] = launch(2, "two", directory, base / "results-two")
    try:
        stdout, stderr = tf.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        tf.kill()
        stdout, stderr = tf.communicate()
    out["tf"] = (tf.returncode, stdout.decode(), stderr.decode(), base / "tf.npz")
    out["elapsed"] = time.monotonic() - t
    ev = four.results.get(0, {}).get("events", {})
    print(f"dcp launches: 4 ranks {four.elapsed:.1f} s (save {ev.get('sync_s', 0):.2f} s, async_save "
          f"{ev.get('async_s', 0):.2f} s), 2 ranks {out['two'].elapsed:.1f} s, all {out['elapsed']:.1f} s")
    return out


def _expected(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(directory / "expected.npz") as z:
        tensors = {k.replace("|", "/"): z[k] for k in z.files}
    with open(directory / "objects.pkl", "rb") as f:
        return tensors, pickle.load(f)


def test_four_ranks_save_sync_and_async(runs) -> None:
    run = runs["four"]
    run.assert_ok(4)
    tensors, objs = _expected(runs["dir"])
    assert "model.0.weight" in tensors and "optim.state.0.weight.exp_avg" in tensors
    assert "optim.param_groups.0.betas" in objs and "extra.pair" in objs
    for which in ("sync", "async"):
        d = runs["dir"] / which
        # N data files for N ranks, the sidecars, the index, TF's state file; no DCP .metadata pickle.
        names = sorted(os.listdir(d))
        assert "checkpoint" in names and "model.index" in names and ".metadata" not in names, names
        assert not [n for n in names if ".staging-" in n or ".tempstate" in n or n.endswith(".lease")], names
        assert len([n for n in names if n.startswith("model.data-") and n.endswith("-of-00004")]) == 4, names
    assert run.results[0]["events"]["async_type"] == "Future"


def test_the_bundle_holds_every_fqn_whole_and_partitioned(runs) -> None:
    import shardckpt
    from shardckpt import objects
    from shardckpt.format.reader import BundleReader

    tensors, objs = _expected(runs["dir"])
    prefix = runs["dir"] / "sync" / "model"
    with BundleReader(prefix) as r:
        names = {name: e for name, e in r.entries()}
        assert sorted(names) == sorted([*tensors, *objs])
        # 6 rows over tp=2 (Colwise): slices of 3 rows, each written once although dp=2 replicates them.

        def boxes(name: str) -> list:
            return sorted(s.bounds(names[name].shape) for s in names[name].slices)

        assert boxes("model.0.weight") == [((0, 3), (0, 8)), ((3, 6), (0, 8))]
        assert boxes("uneven") == [((0, 4),), ((4, 7),)]
        assert boxes("model.2.weight") == [((0, 5), (0, 3)), ((0, 5), (3, 6))]
        # One element over 2 shards: the empty shard adds nothing, the other is the whole tensor.
        assert not names["tiny"].slices and names["tiny"].shape == (1,) and names["empty"].shape == (0, 3)
        assert not names["model.2.bias"].slices  # Replicate: one whole piece
        # On the whole 2x2 mesh: 4 blocks; columns over the second dim written once though the first
        # replicates them; rows likewise; 7 elements split over both dims in turn (4, 3 -> 2, 2, 2, 1).
        assert boxes("grid.ss") == [((r, r + 3), (c, c + 5)) for r in (0, 3) for c in (0, 5)]
        assert boxes("grid.rs") == [((0, 6), (0, 5)), ((0, 6), (5, 10))]
        assert boxes("grid.sr") == [((0, 3), (0, 10)), ((3, 6), (0, 10))]
        assert boxes("grid.s0s0") == [((0, 2),), ((2, 4),), ((4, 6),), ((6, 7),)]
        for fqn, want in objs.items():
            got = objects.decode(r.read(fqn)[()], fqn)
            assert repr(got) == repr(want), fqn
    assert shardckpt.load_checkpoint(runs["dir"] / "sync").get_tensor("model.0.weight").shape == (6, 8)


def test_2x2_mesh_dtensors_load_back_onto_their_own_placements(runs) -> None:
    for r, res in runs["four"].results.items():
        assert res["events"]["grid_back"] == [], (r, res["events"]["grid_back"])


def test_dcp_save_and_load_open_no_socket_and_no_process_group_of_their_own(runs) -> None:
    for r, res in runs["four"].results.items():
        ev = res["events"]
        assert ev["new_sockets"] == {} and ev["new_groups"] == 0, (r, ev["new_sockets"], ev["new_groups"])
        # The look was taken inside the save on every rank (its data write) and on rank 0 in its commit too.
        assert {"after_data_fsync", "after_load"} <= set(ev["points_seen"]), ev["points_seen"]
        if r == 0:
            assert "after_index_staged" in ev["points_seen"], ev["points_seen"]


def test_a_bit_flip_in_a_dcp_written_bundle_is_found_by_dcp_load(runs, tmp_path) -> None:
    import dataclasses
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan

    from shardckpt.format.files import data_filename
    from shardckpt.format.reader import BundleReader
    from shardckpt.torch import StorageReader

    tensors, _ = _expected(runs["dir"])
    copy = tmp_path / "sync"
    shutil.copytree(runs["dir"] / "sync", copy)
    prefix = str(copy / "model")
    with BundleReader(prefix) as r:  # the second column block of grid.ss, rows 3..5: written by a rank
        piece = next(p for p in r.stored_slices("grid.ss") if p.bounds == ((3, 6), (5, 10)))
    path = data_filename(prefix, piece.entry.shard_id, 4)
    with open(path, "r+b") as f:
        f.seek(piece.entry.offset + 7)
        byte = f.read(1)
        f.seek(piece.entry.offset + 7)
        f.write(bytes([byte[0] ^ 0x10]))
    target = {"grid": {"ss": torch.zeros(6, 10)}, "model": {"0.weight": torch.zeros(6, 8)}}
    msg = _dcp_error(lambda: dcp.load(target, storage_reader=StorageReader(copy), no_dist=True))
    assert "ChecksumMismatchError" in msg and "grid.ss" in msg and os.path.basename(path) in msg, msg
    # A read of part of that piece is checked too (against its chunk, read whole: a piece under one chunk).
    reader = StorageReader(copy)
    md = reader.read_metadata()
    planner = DefaultLoadPlanner()
    part = {"grid": {"ss": torch.zeros(6, 10)}}
    planner.set_up_planner(part, md, True)
    reader.set_up_storage_reader(md, True)
    items = [i for i in planner.create_local_plan().items if tuple(i.storage_index.offset) == (3, 5)]
    items = [dataclasses.replace(i, storage_offsets=torch.Size([1, 0]), dest_offsets=torch.Size([4, 5]),
                                 lengths=torch.Size([1, 5])) for i in items]  # row 4 of the block only
    assert len(items) == 1
    from shardckpt import ChecksumMismatchError

    with pytest.raises(ChecksumMismatchError, match="grid.ss"):
        reader.read_data(LoadPlan(items), planner)
    # Every other tensor of the bundle still loads, bit-identical.
    other = {"model": {"0.weight": torch.zeros(6, 8)}}
    dcp.load(other, storage_reader=StorageReader(copy), no_dist=True)
    assert _bits(other["model"]["0.weight"].numpy()) == _bits(tensors["model.0.weight"])


def test_a_failing_rank_or_commit_keeps_the_old_checkpoint_and_the_next_save_works(runs) -> None:
    ev = {r: res["events"] for r, res in runs["four"].results.items()}
    for r in range(4):
        assert ev[r]["write_fails"] is not None and "fault injected at after_plan on client 2" in ev[r]["write_fails"]
        assert ev[r]["finish_fails"] is not None
        assert "fault injected at after_index_staged on client 0" in ev[r]["finish_fails"]
    assert ev[0]["after_write_fails"] == [] and ev[0]["after_finish_fails"] == []
    assert ev[0]["after_resave"] == []
    files = ev[0]["fail_files"]
    assert not [n for n in files if ".staging-" in n or n.endswith(".lease")], files


def test_an_object_without_json_form_fails_on_every_rank(runs) -> None:
    for res in runs["four"].results.values():
        msg = res["events"]["set_refused"]
        assert msg is not None and "bad: a builtins.set cannot be stored without pickle" in msg, msg
        assert res["events"]["bad_index"] is False


def test_two_ranks_reshard_both_checkpoints_bit_identical(runs) -> None:
    run = runs["two"]
    assert sorted(run.results) == [0, 1], run.output
    for r in (0, 1):
        res = run.results[r]
        ev = res["events"]
        assert ev.get("sync_bad") == [] and ev.get("async_bad") == [], (ev, res["failure"], run.output[-3000:])
        assert ev["sync_names"] and ev["async_names"] and ev["sync_objects"] and ev["async_objects"], ev
        assert ev["sync_placements"] == "(Shard(dim=1),)"  # Rowwise now: columns, where columns were rows
        assert ev["sync_lr"] == 0.01  # the saved param_groups reached the optimizer


def test_a_rank_killed_mid_write_leaves_the_old_checkpoint(runs, tmp_path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from shardckpt.torch import StorageReader, StorageWriter

    run = runs["two"]
    assert run.results[0]["events"]["killed"] not in (None, "no"), run.output[-3000:]
    assert "killed" not in run.results[1]["events"]  # its last word came before the save that killed it
    assert run.returncodes[1] == -9, run.returncodes
    tensors, _ = _expected(runs["dir"])
    two = runs["dir"] / "two"
    with __import__("shardckpt").load_checkpoint(two) as r:
        for fqn, want in tensors.items():
            assert _bits(r.get_tensor(fqn)) == _bits(want), fqn
    # The dead rank's lease is broken and its staged files are cleaned by the next save.
    dcp.save({"x": torch.arange(3.0)}, storage_writer=StorageWriter(two, durable=False), no_dist=True)
    assert not [n for n in os.listdir(two) if ".staging-" in n or n.endswith(".lease")], os.listdir(two)
    got = {"x": torch.zeros(3)}
    dcp.load(got, storage_reader=StorageReader(two), no_dist=True)
    assert torch.equal(got["x"], torch.arange(3.0))


def test_tensorflow_reads_every_fqn_whole(runs) -> None:
    from shardckpt import objects

    code, stdout, stderr, npz = runs["tf"]
    assert code == 0, stderr[-4000:]
    strings = json.loads(stdout.strip().splitlines()[-1])
    tensors, objs = _expected(runs["dir"])
    with np.load(npz) as z:
        for which in ("sync", "async"):
            d = str(runs["dir"] / which)
            got = {k.split("|", 1)[1]: z[k] for k in z.files if k.startswith(d + "|")}
            assert sorted(got) == sorted(tensors)
            for fqn, want in tensors.items():
                assert got[fqn].dtype == want.dtype and _bits(got[fqn]) == _bits(want), (which, fqn)
            texts = {k.split("|", 1)[1]: v for k, v in strings.items() if k.startswith(d + "|")}
            assert sorted(texts) == sorted(objs)
            for fqn, text in texts.items():
                assert repr(objects.decode(text.encode("latin-1"), fqn)) == repr(objs[fqn])


# --- in this process: objects, crafted entries, pickle opt-in, other bundles ---------------------------


def _dcp_error(fn: Any) -> str:
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as info:
        fn()
    return str(info.value)


def test_objects_round_trip_faithfully_and_refuse_what_json_cannot_hold() -> None:
    import math

    from shardckpt import InvalidArgumentError, objects

    value = {"t": (1, (2.5, None)), "f": [float("nan"), float("inf"), float("-inf"), -0.0, 1.0, 1],
             "k": {1: "a", (2, "b"): [True, False], None: 0, "$x": 1}, "s": "\ud800 é", "big": 2**100, "e": {}}
    back = objects.decode(objects.encode(value, "v"), "v")
    assert back["t"] == (1, (2.5, None)) and type(back["t"][1]) is tuple
    assert math.isnan(back["f"][0]) and back["f"][1:3] == [math.inf, -math.inf]
    assert math.copysign(1, back["f"][3]) == -1 and type(back["f"][4]) is float and type(back["f"][5]) is int
    assert back["k"] == {1: "a", (2, "b"): [True, False], None: 0, "$x": 1}
    assert back["s"] == "\ud800 é" and back["big"] == 2**100 and back["e"] == {}
    for bad, where in (({1}, "v"), (b"x", "v"), ([object()], "v[0]"), ({"a": np.float32(1)}, "v['a']"),
                       ({frozenset(): 1}, "v")):
        with pytest.raises(InvalidArgumentError, match=f"^{__import__('re').escape(where)}: "):
            objects.encode(bad, "v")


@pytest.mark.parametrize("payload", [
    b'{"$evil": 1}', b'{"$tuple": 1}', b'{"$dict": [[[1], 2]]}', b'{"$float": "1e999"}', b"[NaN]",
    b"[" * 200_000, b"\xff", b'{"$tuple": [], "x": 1}',
])
def test_a_crafted_json_entry_is_refused(tmp_path, payload: bytes) -> None:
    import torch.distributed.checkpoint as dcp

    from shardckpt import BundleWriter, objects
    from shardckpt.torch import StorageReader

    with BundleWriter(str(tmp_path / "model")) as w:
        w.add("x", np.array(objects.JSON_MARKER + payload, dtype=object))
    msg = _dcp_error(lambda: dcp.load({"x": 0}, storage_reader=StorageReader(tmp_path), no_dist=True))
    assert "CorruptCheckpointError" in msg and f"{tmp_path / 'model'}: x in " in msg, msg


def test_a_region_no_stored_slice_holds_is_refused_not_left_stale(tmp_path) -> None:
    import dataclasses

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan

    from shardckpt import BundleWriter
    from shardckpt.torch import StorageReader

    with BundleWriter(str(tmp_path / "model"), durable=False) as w:
        w.add_slice("x", "6 0,3", np.arange(3, dtype=np.float32))  # elements 3..5 are stored nowhere
        w.add_slice("y", "4 0,2", np.ones(2, np.float32))  # two slices that fill y
        w.add_slice("y", "4 2,2", np.full(2, 2, np.float32))
    target = {"x": torch.full((6,), -1.0), "y": torch.zeros(4)}
    msg = _dcp_error(lambda: dcp.load(target, storage_reader=StorageReader(tmp_path), no_dist=True))
    assert "InsufficientSlicesError" in msg and "sufficient slices for partitioned tensor x to read 0,6" in msg, msg
    assert torch.equal(target["x"], torch.full((6,), -1.0))  # refused before anything was written
    # The gap does not spoil what is stored: y loads, and so does the stored part of x.
    only_y = {"y": torch.zeros(4)}
    dcp.load(only_y, storage_reader=StorageReader(tmp_path), no_dist=True)
    assert torch.equal(only_y["y"], torch.tensor([1.0, 1, 2, 2]))
    reader = StorageReader(tmp_path)
    md = reader.read_metadata()
    assert len(md.state_dict_metadata["y"].chunks) == 2  # a filled tensor: its stored slices only
    planner = DefaultLoadPlanner()
    part = {"x": torch.full((6,), -1.0)}
    planner.set_up_planner(part, md, True)
    reader.set_up_storage_reader(md, True)
    items = [dataclasses.replace(i, lengths=torch.Size([3])) for i in planner.create_local_plan().items]
    assert len(items) == 2  # the stored slice's and the whole-tensor chunk's, both cut to elements 0..2
    reader.read_data(LoadPlan(items), planner).wait()
    assert torch.equal(part["x"], torch.tensor([0.0, 1, 2, -1, -1, -1]))


class _Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_a_crafted_pickle_entry_runs_nothing_without_opt_in(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    from shardckpt import BundleWriter, objects
    from shardckpt.torch import StorageReader

    canary = tmp_path / "canary"
    with BundleWriter(str(tmp_path / "model")) as w:
        w.add("x", np.array(objects.PICKLE_MARKER + pickle.dumps(_Boom(str(canary))), dtype=object))
        w.add("y", np.array(pickle.dumps(_Boom(str(canary))), dtype=object))  # no marker at all
    msg = _dcp_error(lambda: dcp.load({"x": 0}, storage_reader=StorageReader(tmp_path), no_dist=True))
    assert "is a pickle" in msg and "allow_pickle=True" in msg, msg
    got: dict[str, Any] = {"y": 0}
    dcp.load(got, storage_reader=StorageReader(tmp_path), no_dist=True)
    assert isinstance(got["y"], bytes)  # handed over as the raw bytes, never unpickled
    assert not canary.exists()


def test_pickle_only_with_opt_in_on_both_sides(tmp_path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from shardckpt.torch import StorageReader, StorageWriter

    state = {"w": torch.ones(2), "s": {1, 2}}
    msg = _dcp_error(lambda: dcp.save(state, storage_writer=StorageWriter(tmp_path), no_dist=True))
    assert "s: a builtins.set cannot be stored without pickle" in msg and "allow_pickle=True" in msg
    assert not (tmp_path / "model.index").exists()
    dcp.save(state, storage_writer=StorageWriter(tmp_path, allow_pickle=True), no_dist=True)
    msg = _dcp_error(lambda: dcp.load({"w": torch.zeros(2), "s": None}, storage_reader=StorageReader(tmp_path),
                                      no_dist=True))
    assert "s in " in msg and "is a pickle" in msg
    got: dict[str, Any] = {"w": torch.zeros(2), "s": None}
    dcp.load(got, storage_reader=StorageReader(tmp_path, allow_pickle=True), no_dist=True)
    assert got["s"] == {1, 2} and torch.equal(got["w"], torch.ones(2))


def test_a_live_second_writer_is_refused_and_the_old_checkpoint_stays(tmp_path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from shardckpt.lease import PrefixLease
    from shardckpt.torch import StorageReader, StorageWriter

    dcp.save({"x": torch.ones(3)}, storage_writer=StorageWriter(tmp_path), no_dist=True)
    with PrefixLease.acquire(str(tmp_path / "model"), what="another writer"):
        msg = _dcp_error(lambda: dcp.save({"x": torch.zeros(3)}, storage_writer=StorageWriter(tmp_path),
                                          no_dist=True))
        assert "PrefixBusyError" in msg and "another writer" in msg, msg
    got = {"x": torch.zeros(3)}
    dcp.load(got, storage_reader=StorageReader(tmp_path), no_dist=True)
    assert torch.equal(got["x"], torch.ones(3))
    dcp.save({"x": torch.full((3,), 2.0)}, storage_writer=StorageWriter(tmp_path), no_dist=True)
    dcp.load(got, storage_reader=StorageReader(tmp_path), no_dist=True)
    assert torch.equal(got["x"], torch.full((3,), 2.0))


def test_the_lease_is_held_from_the_plan_to_the_commit(tmp_path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from shardckpt import faults
    from shardckpt.lease import holder_of
    from shardckpt.torch import StorageWriter

    prefix = str(tmp_path / "model")
    seen: dict[str, Any] = {}

    def look(point: str, client: int) -> None:
        holder = holder_of(prefix)
        seen[point] = holder.what if holder is not None else None

    with faults.hook(look):
        dcp.save({"x": torch.ones(300_000)}, storage_writer=StorageWriter(tmp_path), no_dist=True)
    assert seen["after_plan"] == seen["mid_data_write"] == seen["after_index_staged"] == "shardckpt.dcp save"
    assert holder_of(prefix) is None and not (tmp_path / "model.lease").exists()


def test_the_writer_pickles_for_process_based_async_save(tmp_path) -> None:
    from shardckpt.torch import StorageWriter

    w = pickle.loads(pickle.dumps(StorageWriter(tmp_path, allow_pickle=True, durable=False)))
    assert (w.path, w.allow_pickle, w.durable) == (str(tmp_path), True, False)


def test_storage_reader_loads_a_shardckpt_torch_checkpoint(tmp_path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    import shardckpt.torch as sct
    from shardckpt.torch import StorageReader

    sct.save({"layer": {"w": torch.arange(6.0).reshape(2, 3)}, "n": 7}, tmp_path / "ckpt")
    got: dict[str, Any] = {"layer": {"w": torch.zeros(2, 3)}}
    dcp.load(got, storage_reader=StorageReader(tmp_path / "ckpt"), no_dist=True)
    assert torch.equal(got["layer"]["w"], torch.arange(6.0).reshape(2, 3))
    # A DCP key holding "/" is stored as it is and found again under it.
    from shardckpt.torch import StorageWriter

    dcp.save({"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}, storage_writer=StorageWriter(tmp_path / "d"),
             no_dist=True)
    back: dict[str, Any] = {"a/b": torch.zeros(2), "a": {"b": torch.ones(2)}}
    dcp.load(back, storage_reader=StorageReader(tmp_path / "d"), no_dist=True)
    assert torch.equal(back["a/b"], torch.ones(2)) and torch.equal(back["a"]["b"], torch.zeros(2))


def test_shardckpt_torch_saves_optimizer_param_groups_without_pickle(tmp_path) -> None:
    import torch

    import shardckpt
    import shardckpt.torch as sct
    from shardckpt import objects

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.125, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "note": "x", "none": None}
    sct.save(state, tmp_path / "ckpt")
    raw = shardckpt.load_checkpoint(tmp_path / "ckpt").get_tensor("optim/param_groups")
    assert raw.startswith(objects.JSON_MARKER)
    back = sct.read_state_dict(tmp_path / "ckpt")
    assert back["optim"]["param_groups"] == opt.state_dict()["param_groups"]
    assert back["optim"]["param_groups"][0]["betas"] == (0.8, 0.9) and back["none"] is None
    opt2 = torch.optim.Adam(model.parameters(), lr=1.0)
    model(torch.randn(4, 3)).sum().backward()
    opt2.step()
    target = {"model": model.state_dict(), "optim": opt2.state_dict(), "note": "", "none": 1}
    sct.load(target, tmp_path / "ckpt")
    assert target["optim"]["param_groups"] == opt.state_dict()["param_groups"] and target["note"] == "x"
    opt2.load_state_dict(target["optim"])
    assert opt2.param_groups[0]["lr"] == 0.125
    with pytest.raises(shardckpt.InvalidArgumentError, match=r"^bad\[1\]: a builtins.set cannot be stored"):
        sct.save({"bad": [1, {2}]}, tmp_path / "bad")
    assert not (tmp_path / "bad.index").exists()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.exit(worker(sys.argv[2], sys.argv[3]))


def test_fsdp2_model_and_adam_round_trip_bit_identical(tmp_path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    run = launch(2, "fsdp2", directory, tmp_path / "results")
    run.assert_ok(2)
    for res in run.results.values():
        ev = res["events"]
        assert "Shard(dim=0)" in ev["placements"]
        assert ev["bad"] == [] and ev["bad_opt"] == [] and ev["lr"] == 0.01
    import shardckpt

    names = dict(shardckpt.list_variables(str(directory / "fsdp2" / "model")))
    assert names["model.0.weight"] == [6, 8] and names["model.2.weight"] == [3, 6]  # whole, under the fqn
