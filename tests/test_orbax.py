"""``shardckpt.orbax``: Orbax's CheckpointManager saving items as TF V2 bundles, across real JAX processes;
and ``shardckpt.jax.restore`` without a target.

Every JAX run is a set of subprocesses (this file is also the worker: ``python test_orbax.py SCENARIO DIR``),
so the device count is the worker's own (``XLA_FLAGS``) and a hang is killed by a timeout; several processes
use ``jax.distributed`` bound to 127.0.0.1.  Each worker compares the bytes of every addressable shard it
restored with the numpy global of that step and reports how many it checked; this module checks the step
directories, the bundle with TensorFlow and with ``shardckpt.torch.read_state_dict``, and the processes' exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine_worker import jax_worker_main, run_jax_workers, tensorflow_reads, with_error

RUN_TIMEOUT = 120.0  # per run of processes: a hang fails the test instead of stalling it

# name -> (shape, dtype); the same globals in every process, shifted by the step so that steps differ.
TENSORS: dict[str, tuple[tuple[int, ...], str]] = {
    "params/w": ((8, 16), "float32"),
    "params/emb": ((8, 8), "bfloat16"),
    "opt/0": ((16,), "float32"),
    "opt/1": ((4, 4), "int32"),
    "rep": ((4, 5), "float32"),
    "step": ((), "int32"),
}


def global_value(name: str, step: int) -> np.ndarray:
    import ml_dtypes

    shape, dtype = TENSORS[name]
    if name == "step":
        return np.asarray(step, np.int32)
    rng = np.random.default_rng(zlib.crc32(f"{name}@{step}".encode()))
    if dtype == "int32":
        return rng.integers(-1000, 1000, shape).astype(np.int32)
    values = rng.standard_normal(shape).astype(np.float32)
    return values.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else values


# --- worker side (runs in the subprocesses; imports jax and orbax) -----------------------------------------


def _save_mesh() -> Any:
    import jax

    devices = np.asarray(jax.devices()).reshape(2, -1)
    return jax.sharding.Mesh(devices, ("x", "y"))


def _other_mesh() -> Any:
    """The same devices in reverse order, transposed: every device holds another box than when saved."""
    import jax

    devices = np.asarray(jax.devices()[::-1]).reshape(-1, 2)
    return jax.sharding.Mesh(devices, ("a", "b"))


def _tree(step: int) -> Any:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _save_mesh()

    def put(name: str, spec: Any) -> jax.Array:
        g = global_value(name, step)
        return jax.make_array_from_callback(g.shape, NamedSharding(mesh, spec), lambda idx: g[idx])

    return {"params": {"w": put("params/w", P("x", "y")), "emb": put("params/emb", P(("x", "y")))},
            "opt": [put("opt/0", P("y")), put("opt/1", P(None, "x"))], "rep": global_value("rep", step).copy(),
            "step": step}


def _targets() -> Any:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _other_mesh()

    def sds(name: str, spec: Any) -> jax.ShapeDtypeStruct:
        shape, dtype = TENSORS[name]
        return jax.ShapeDtypeStruct(shape, np.dtype(global_value(name, 0).dtype),
                                    sharding=NamedSharding(mesh, spec))

    return {"params": {"w": sds("params/w", P("b", "a")), "emb": sds("params/emb", P(None, ("b", "a")))},
            "opt": [sds("opt/0", P()), sds("opt/1", P("a", "b"))], "rep": sds("rep", P("b")),
            "step": sds("step", P())}


def _flat(tree: Any) -> dict[str, Any]:
    import jax

    import shardckpt.jax as sj

    return dict(zip(sj.tree_names(tree), jax.tree_util.tree_leaves(tree)))


def _check_restored(out: Any, step: int) -> int:
    """Bit-compare every addressable shard with the global; the number of shards checked."""
    checked = 0
    flat = _flat(out)
    assert sorted(flat) == sorted(TENSORS), sorted(flat)
    for name, arr in flat.items():
        want = global_value(name, step)
        assert arr.dtype == want.dtype and arr.shape == want.shape, (name, arr.dtype, arr.shape)
        for shard in arr.addressable_shards:
            got = np.asarray(shard.data)
            assert got.tobytes() == np.ascontiguousarray(want[shard.index]).tobytes(), (name, shard.index)
            checked += 1
    return checked


def _check_host(out: Any, step: int) -> int:
    """A restore without target: nested dicts of whole numpy arrays."""
    assert sorted(out) == ["opt", "params", "rep", "step"] and sorted(out["opt"]) == ["0", "1"], out.keys()
    flat = {"params/w": out["params"]["w"], "params/emb": out["params"]["emb"], "opt/0": out["opt"]["0"],
            "opt/1": out["opt"]["1"], "rep": out["rep"], "step": out["step"]}
    for name, got in flat.items():
        want = global_value(name, step)
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, (name, type(got))
        assert got.tobytes() == want.tobytes(), name
    return len(flat)


def _manager(directory: str, **options: Any) -> Any:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.join(directory, "ckpt"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, **options))


def _save(mgr: Any, step: int) -> None:
    import orbax.checkpoint as ocp

    import shardckpt.orbax as so

    mgr.save(step, args=ocp.args.Composite(state=so.SaveArgs(_tree(step))))


def _restore(mgr: Any, step: int, target: Any) -> Any:
    import orbax.checkpoint as ocp

    import shardckpt.orbax as so

    return mgr.restore(step, args=ocp.args.Composite(state=so.RestoreArgs(target))).state


def scenario_manager(directory: str, events: dict[str, Any]) -> None:
    """Three steps through one manager (max_to_keep=2), restored onto another mesh and to host.  Step 3's
    writer is held at ``mid_data_write`` until ``mgr.save`` has returned (so the save is asynchronous) and the
    numpy leaf has been overwritten and the arrays deleted (so it wrote its own snapshot)."""
    import threading

    import jax
    import orbax.checkpoint as ocp

    import shardckpt.orbax as so
    from shardckpt import faults

    mgr = _manager(directory)
    for step in (1, 2):
        _save(mgr, step)
    # Step 2's write must be over before the hook goes in: on a loaded machine it could still reach mid_data_write
    # and be held there, while mgr.save(3) waits for it to finish (a 20 s stall, then a second hold: [False, True]).
    mgr.wait_until_finished()
    tree = _tree(3)
    returned = threading.Event()
    held: list[bool] = []

    def hold(point: str, client: int) -> None:
        if point == "mid_data_write":
            held.append(returned.wait(20))  # False: save did not return while its write was unfinished

    with faults.hook(hold):
        mgr.save(3, args=ocp.args.Composite(state=so.SaveArgs(tree)))
        tree["rep"][...] = -1
        for leaf in jax.tree_util.tree_leaves(tree):
            if isinstance(leaf, jax.Array):
                leaf.delete()
        returned.set()
        mgr.wait_until_finished()
    events["returned_before_write"] = held
    events["steps"] = list(mgr.all_steps())
    events["restored"] = {step: _check_restored(_restore(mgr, step, _targets()), step) for step in (2, 3)}
    events["host"] = _check_host(_restore(mgr, 3, None), 3)
    meta = mgr.item_metadata(3).state
    events["metadata"] = {name: [list(s.shape), str(s.dtype)] for name, s in _flat(meta).items()}
    mgr.close()


def scenario_fault_raise(directory: str, events: dict[str, Any]) -> None:
    """Step 2 fails on process 1 mid-write: every process learns it, step 1 stays; step 2 saved again works."""
    mgr = _manager(directory)
    _save(mgr, 1)
    mgr.wait_until_finished()
    os.environ["SHARDCKPT_FAULT"] = "mid_data_write@1:raise"
    try:
        _save(mgr, 2)
        mgr.wait_until_finished()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        events["failed"] = {"type": type(exc).__name__, "message": str(exc)}
    else:
        events["failed"] = None
    del os.environ["SHARDCKPT_FAULT"]
    events["steps_after_failure"] = list(mgr.all_steps())
    events["restored_1"] = _check_restored(_restore(mgr, 1, _targets()), 1)
    _save(mgr, 2)
    mgr.wait_until_finished()
    events["steps"] = list(mgr.all_steps())
    events["restored_2"] = _check_restored(_restore(mgr, 2, _targets()), 2)
    mgr.close()


def scenario_killed(directory: str, events: dict[str, Any]) -> None:
    """Step 1 saved; step 2 killed at the fault point the parent chose (the process dies: no result)."""
    mgr = _manager(directory)
    _save(mgr, 1)
    mgr.wait_until_finished()
    os.environ["SHARDCKPT_FAULT"] = os.environ["ORBAX_TEST_KILL"]
    _save(mgr, 2)
    mgr.wait_until_finished()
    events["survived"] = True  # never reached: the fault point kills this process


def scenario_after_kill(directory: str, events: dict[str, Any]) -> None:
    """A new process and manager after a killed save: only step 1 is listed and restores; step 2 again."""
    mgr = _manager(directory)
    events["steps_after_kill"] = list(mgr.all_steps())
    events["restored_1"] = _check_restored(_restore(mgr, 1, _targets()), 1)
    events["left_before"] = sorted(os.listdir(os.path.join(directory, "ckpt")))
    _save(mgr, 2)
    mgr.wait_until_finished()
    events["steps"] = list(mgr.all_steps())
    events["restored_2"] = _check_restored(_restore(mgr, 2, _targets()), 2)
    mgr.close()


def scenario_no_target(directory: str, events: dict[str, Any]) -> None:
    """``shardckpt.jax.restore(prefix)``: host numpy in nested dicts; the existing calls with a target."""
    import shardckpt
    import shardckpt.jax as sj

    prefix = os.path.join(directory, "plain", "model")
    sj.save(_tree(5), prefix)
    events["host"] = _check_host(sj.restore(prefix), 5)
    events["host_full_verify"] = _check_host(sj.restore(prefix, verify="full"), 5)
    events["positional"] = _check_restored(sj.restore(prefix, _targets()), 5)
    events["keyword"] = _check_restored(sj.restore(prefix, target=_targets()), 5)
    single = os.path.join(directory, "plain", "single")
    sj.save(np.arange(3, dtype=np.int16), single)
    got = sj.restore(single)
    events["single"] = [sorted(got), got["value"].tolist(), str(got["value"].dtype)]
    with_error(events, "needs_target", lambda: sj.restore(prefix, mmap=True))
    clash = os.path.join(directory, "plain", "clash")
    with shardckpt.BundleWriter(clash) as w:  # TensorFlow allows "a" beside "a/b"; nested dicts cannot
        w.add("a", np.zeros(2, np.float32))
        w.add("a/b", np.ones(2, np.float32))
    with_error(events, "clash", lambda: sj.restore(clash))


def scenario_handler(directory: str, events: dict[str, Any]) -> None:
    """`finalize` on its own (no index; a dead lease left; a live lease); a synchronous manager; a manager
    that never saw the handler restores by the handler name Orbax recorded."""
    import orbax.checkpoint as ocp

    import shardckpt.jax as sj
    import shardckpt.orbax as so
    from shardckpt.lease import PrefixLease

    handler = so.ShardckptCheckpointHandler()
    item = Path(directory, "item")
    item.mkdir()
    with_error(events, "no_index", lambda: handler.finalize(item))
    sj.save({"a": np.arange(3, dtype=np.float32)}, so.item_prefix(item))
    lease = Path(so.item_prefix(item) + ".lease")
    dead = ("import sys, os\nfrom shardckpt.lease import PrefixLease\n"
            "PrefixLease.acquire(sys.argv[1], what='a save that died')\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", dead, so.item_prefix(item)], check=True, timeout=60)
    events["dead_lease_before"] = lease.exists()
    handler.finalize(item)
    events["dead_lease_after"] = lease.exists()
    with PrefixLease.acquire(so.item_prefix(item), what="a live writer"):
        with_error(events, "live_lease", lambda: handler.finalize(item))
        events["live_lease_kept"] = lease.exists()

    sync = ocp.CheckpointManager(os.path.join(directory, "sync"),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    sync.save(4, args=ocp.args.Composite(state=so.SaveArgs(_tree(4))))
    events["sync_steps"] = list(sync.all_steps())
    sync.close()
    fresh = ocp.CheckpointManager(os.path.join(directory, "sync"))
    events["fresh_host"] = _check_host(fresh.restore(4).state, 4)
    events["fresh_restored"] = _check_restored(_restore(fresh, 4, _targets()), 4)
    fresh.close()

    two = ocp.CheckpointManager(os.path.join(directory, "two"))  # two items: two bundles, saved one after the other
    two.save(6, args=ocp.args.Composite(state=so.SaveArgs(_tree(6)), ema=so.SaveArgs(_tree(7))))
    two.wait_until_finished()
    out = two.restore(6, args=ocp.args.Composite(state=so.RestoreArgs(_targets()), ema=so.RestoreArgs(None)))
    events["two_items"] = [_check_restored(out.state, 6), _check_host(out.ema, 7)]
    events["two_items_files"] = sorted(os.listdir(os.path.join(directory, "two", "6")))
    two.close()


SCENARIOS = {"manager": scenario_manager, "fault-raise": scenario_fault_raise, "killed": scenario_killed,
             "after-kill": scenario_after_kill, "no-target": scenario_no_target,
             "handler": scenario_handler}


def worker_main(argv: list[str]) -> int:
    return jax_worker_main(argv, SCENARIOS)


# --- test side ---------------------------------------------------------------------------------------------


def run(scenario: str, directory: Path, processes: int, devices: int, *, expect_rc: int = 0,
        env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Start the workers; their results by process id (none expected when ``expect_rc`` is not 0)."""
    return run_jax_workers(__file__, scenario, directory, processes, devices, timeout=RUN_TIMEOUT,
                           expect_rc=expect_rc, env=env)


def _shards(devices: int) -> int:
    """Addressable shards per process of one restore of `_targets` (every target is on all devices)."""
    return devices * len(TENSORS)


def assert_clean_steps(root: Path, steps: list[int], num_files: int) -> None:
    """Only the final step directories; each item a bundle at ``state/checkpoint``; no lease, no staging."""
    assert sorted(p.name for p in root.iterdir()) == sorted(str(s) for s in steps), sorted(os.listdir(root))
    for step in steps:
        item = root / str(step) / "state"
        names = sorted(p.name for p in item.iterdir())
        bundle = sorted(["checkpoint.index"] + [f"checkpoint.data-{i:05d}-of-{num_files:05d}{side}"
                                                for i in range(num_files) for side in ("", ".crc32c")])
        assert [n for n in names if n.startswith("checkpoint")] == bundle, names
    everything = [p.name for p in root.rglob("*")]
    assert not [n for n in everything if n.endswith(".lease") or "staging" in n or "tmp" in n], everything


@pytest.fixture(scope="module")
def saved_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("orbax-one")
    return directory, run("manager", directory, 1, 8)[0]["events"]


def test_one_process_eight_devices_restores_onto_another_sharding_bit_identical(saved_one) -> None:
    directory, ev = saved_one
    assert ev["steps"] == [2, 3]
    assert ev["returned_before_write"] == [True]  # the handler is asynchronous
    assert ev["restored"] == {"2": _shards(8), "3": _shards(8)}
    assert ev["host"] == len(TENSORS)
    assert ev["metadata"] == {"params/w": [[8, 16], "float32"], "params/emb": [[8, 8], "bfloat16"],
                              "opt/0": [[16], "float32"], "opt/1": [[4, 4], "int32"], "rep": [[4, 5], "float32"],
                              "step": [[], "int32"]}


def test_retention_removes_the_oldest_step_and_leaves_no_lease_or_temporary_directory(saved_one) -> None:
    directory, _ = saved_one
    assert_clean_steps(directory / "ckpt", [2, 3], 1)


def test_tensorflow_and_torch_read_the_step_bundle_whole(saved_one, tmp_path: Path) -> None:
    directory, _ = saved_one
    prefix = directory / "ckpt" / "3" / "state" / "checkpoint"
    dtypes, arrays = tensorflow_reads(prefix, tmp_path, timeout=RUN_TIMEOUT)
    assert dtypes == {n: d for n, (_, d) in TENSORS.items()}
    assert sorted(arrays) == sorted(TENSORS)
    for name in TENSORS:
        want = global_value(name, 3)
        want = want.view(np.uint16) if TENSORS[name][1] == "bfloat16" else want
        got = arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name

    import shardckpt.torch as st

    state = st.read_state_dict(prefix)
    assert float(state["params"]["w"][2, 3]) == float(global_value("params/w", 3)[2, 3])
    assert state["opt"]["1"].numpy().tobytes() == global_value("opt/1", 3).tobytes()
    assert int(state["step"]) == 3


def test_the_dcp_storage_reader_takes_the_item_directory_or_its_bundle_prefix(saved_one) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from shardckpt.torch import StorageReader

    directory, _ = saved_one
    item = directory / "ckpt" / "3" / "state"
    for path in (item, item / "checkpoint"):
        got = {"params": {"w": torch.zeros(8, 16), "emb": torch.zeros(8, 8, dtype=torch.bfloat16)},
               "opt": {"1": torch.zeros(4, 4, dtype=torch.int32)}, "step": torch.zeros((), dtype=torch.int32)}
        dcp.load(got, storage_reader=StorageReader(path), no_dist=True)  # "params/w" offered as "params.w"
        assert got["params"]["w"].numpy().tobytes() == global_value("params/w", 3).tobytes(), path
        assert got["params"]["emb"].view(torch.uint16).numpy().tobytes() == \
            global_value("params/emb", 3).view(np.uint16).tobytes(), path
        assert got["opt"]["1"].numpy().tobytes() == global_value("opt/1", 3).tobytes(), path
        assert int(got["step"]) == 3, path


def test_two_processes_save_through_the_manager_and_restore_onto_another_sharding(tmp_path: Path) -> None:
    results = run("manager", tmp_path, 2, 2)
    for res in results:
        ev = res["events"]
        assert ev["steps"] == [2, 3]
        assert ev["restored"] == {"2": _shards(2), "3": _shards(2)}
        assert ev["host"] == len(TENSORS)
        assert ev["returned_before_write"] == [True]
    assert_clean_steps(tmp_path / "ckpt", [2, 3], 2)


def test_a_save_failing_on_one_process_fails_the_step_everywhere_and_keeps_the_previous(tmp_path: Path) -> None:
    results = run("fault-raise", tmp_path, 2, 2)
    for rank, res in enumerate(results):
        ev = res["events"]
        assert ev["failed"] is not None, f"process {rank}: the failed step 2 was reported as saved"
        assert "fault injected at mid_data_write on client 1" in ev["failed"]["message"], ev["failed"]
        assert ev["steps_after_failure"] == [1]
        assert ev["restored_1"] == _shards(2)
        assert ev["steps"] == [1, 2] and ev["restored_2"] == _shards(2)
    assert_clean_steps(tmp_path / "ckpt", [1, 2], 2)


@pytest.mark.parametrize("point", ["mid_data_write", "after_commit"])
def test_a_process_killed_mid_save_leaves_the_previous_step_and_lists_no_failed_step(tmp_path: Path,
                                                                                    point: str) -> None:
    run("killed", tmp_path, 1, 4, expect_rc=-signal.SIGKILL, env={"ORBAX_TEST_KILL": f"{point}@0:kill"})
    ev = run("after-kill", tmp_path, 1, 4)[0]["events"]
    assert ev["steps_after_kill"] == [1]
    assert ev["restored_1"] == _shards(4)
    assert ev["left_before"] == ["1", "2.orbax-checkpoint-tmp"]  # the killed save's, removed by the next save of 2
    assert ev["steps"] == [1, 2] and ev["restored_2"] == _shards(4)
    assert_clean_steps(tmp_path / "ckpt", [1, 2], 1)


def test_jax_restore_without_target_gives_host_numpy_in_nested_dicts(tmp_path: Path) -> None:
    ev = run("no-target", tmp_path, 1, 4)[0]["events"]
    assert ev["host"] == ev["host_full_verify"] == len(TENSORS)
    assert ev["positional"] == ev["keyword"] == _shards(4)
    assert ev["single"] == [["value"], [0, 1, 2], "int16"]
    assert ev["needs_target"]["type"] == "InvalidArgumentError" and "mmap" in ev["needs_target"]["message"]
    clash = ev["clash"]
    assert clash["type"] == "InvalidArgumentError", clash
    assert "clash" in clash["message"] and "tensor a/b" in clash["message"], clash


def test_finalize_requires_the_index_breaks_a_dead_lease_and_refuses_a_live_one(tmp_path: Path) -> None:
    ev = run("handler", tmp_path, 1, 4)[0]["events"]
    assert ev["no_index"]["type"] == "CheckpointNotFoundError" and "checkpoint.index" in ev["no_index"]["message"]
    assert ev["dead_lease_before"] is True and ev["dead_lease_after"] is False
    assert ev["live_lease"]["type"] == "PrefixBusyError" and "a live writer" in ev["live_lease"]["message"]
    assert ev["live_lease_kept"] is True
    assert ev["sync_steps"] == [4]
    assert ev["fresh_host"] == len(TENSORS) and ev["fresh_restored"] == _shards(4)
    assert_clean_steps(tmp_path / "sync", [4], 1)
    assert ev["two_items"] == [_shards(4), len(TENSORS)]
    assert [n for n in ev["two_items_files"] if "." not in n and n[0] != "_"] == ["ema", "state"], ev["two_items_files"]


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
