"""``shardckpt.jax``: pytrees of jax.Arrays saved and restored across real JAX processes.

Every JAX run is a set of subprocesses (this file is also the worker: ``python
test_adapter_jax.py SCENARIO DIR``), so the device count is the worker's own and a
hang is killed by a timeout.  Multi-process runs use ``jax.distributed`` with its
coordination service bound to 127.0.0.1.  Each worker compares every addressable
shard it restored against the numpy global (`global_value`) and reports the number
of shards it checked; this module also reads the files with shardckpt's reader and
with TensorFlow.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine_worker import jax_worker_main, run_jax_workers, tensorflow_reads, with_error

RUN_TIMEOUT = 120.0  # per run of processes: a hang fails the test instead of stalling it
SAVE_TIMEOUT = 60.0  # shardckpt's own collective timeout inside the workers

# name -> (shape, dtype); every process builds the same globals from the name.
TENSORS: dict[str, tuple[tuple[int, ...], str]] = {
    "params/w": ((8, 16), "float32"),
    "params/flat": ((16, 4), "float32"),
    "params/cols": ((6, 8), "float32"),
    "params/emb": ((8, 8), "bfloat16"),
    "rep": ((5, 3), "float32"),
    "other_mesh": ((16, 2), "int32"),
    "layers/0": ((4,), "float32"),
    "layers/1/mu": ((8,), "float32"),
    "layers/1/nu": ((8,), "float32"),
    "opt/count": ((2,), "int32"),
    "opt/scale": ((), "float32"),
    "step": ((), "int32"),
}
STEP = 7


def global_value(name: str) -> np.ndarray:
    """The global value of tensor ``name`` (deterministic, the same in every process)."""
    import ml_dtypes

    shape, dtype = TENSORS[name]
    if name == "step":
        return np.asarray(STEP, np.int32)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if dtype == "int32":
        return rng.integers(-1000, 1000, shape).astype(np.int32)
    values = rng.standard_normal(shape).astype(np.float32)
    return values.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else values


# --- worker side (runs in the subprocesses; imports jax) --------------------------------------------------


def _worker_tree(mesh: Any, other: Any) -> Any:
    """The pytree every save uses: shardings P("x","y"), P(("x","y")), P(None,"x"), replicated, bfloat16,
    a second mesh of the same devices, a namedtuple, a registered dataclass, a host scalar."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def put(name: str, spec: Any, on: Any = mesh) -> jax.Array:
        g = global_value(name)
        return jax.make_array_from_callback(g.shape, NamedSharding(on, spec), lambda idx: g[idx])

    return {
        "params": {"w": put("params/w", P("x", "y")), "flat": put("params/flat", P(("x", "y"))),
                   "cols": put("params/cols", P(None, "x")), "emb": put("params/emb", P("y", "x"))},
        "rep": put("rep", P()),
        "other_mesh": put("other_mesh", P("d"), other),  # == P(("x", "y")) on the main mesh
        "layers": [put("layers/0", P("x")), MuNu(put("layers/1/mu", P("y")), put("layers/1/nu", P()))],
        "opt": _opt(put("opt/count", P("x")), put("opt/scale", P())),
        "step": STEP,
    }


def _register() -> tuple[Any, Any]:
    import collections
    import dataclasses

    import jax

    mu_nu = collections.namedtuple("MuNu", ["mu", "nu"])

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Opt:
        count: Any
        scale: Any

    return mu_nu, Opt


MuNu: Any = None
_opt: Any = None


def _check(out: Any, target: Any, events: dict[str, Any], key: str) -> None:
    """Every restored leaf has the target's shape, dtype and sharding; every local shard equals the global's."""
    import jax

    pairs, _ = jax.tree_util.tree_flatten_with_path(out)
    targets = jax.tree_util.tree_leaves(target)
    assert len(pairs) == len(targets), (len(pairs), len(targets))
    checked = 0
    for (path, arr), want in zip(pairs, targets):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        g = global_value(name)
        assert isinstance(arr, jax.Array), (name, type(arr))
        assert arr.shape == g.shape and arr.dtype == g.dtype, (name, arr.shape, arr.dtype)
        sharding = getattr(want, "sharding", None)
        if sharding is not None:
            assert arr.sharding == sharding, (name, arr.sharding, sharding)
        for shard in arr.addressable_shards:
            got = np.asarray(shard.data)
            assert got.dtype == g.dtype and np.array_equal(got, g[shard.index]), (name, shard.device, shard.index)
            checked += 1
    events[key] = checked


def _abstract(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                        if isinstance(a, jax.Array) else 0, tree)


def _reshard_targets(mesh: Any) -> Any:
    """The same tensors on another mesh, each with another spec."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    a, b = mesh.axis_names

    def sds(name: str, spec: Any) -> jax.ShapeDtypeStruct:
        shape, dtype = TENSORS[name]
        return jax.ShapeDtypeStruct(shape, global_value(name).dtype, sharding=NamedSharding(mesh, spec))

    return {
        "params": {"w": sds("params/w", P((b, a), None)), "flat": sds("params/flat", P(a, b)),
                   "cols": sds("params/cols", P(None, (a, b))), "emb": sds("params/emb", P(None, (a, b)))},
        "rep": sds("rep", P()),
        "other_mesh": sds("other_mesh", P(b, None)),
        "layers": [sds("layers/0", P(a)), MuNu(sds("layers/1/mu", P((b, a))), sds("layers/1/nu", P(b)))],
        "opt": _opt(sds("opt/count", P(b)), sds("opt/scale", P())),
        "step": jax.ShapeDtypeStruct((), np.int32),  # no sharding: this process's first device
    }


def _meshes(n_devices: int) -> tuple[Any, Any, Any]:
    """(x, y) mesh, a 1-D mesh "d" of the same devices, and an (a, b) mesh of the devices reversed."""
    import jax
    from jax.sharding import Mesh

    devices = np.array(jax.devices())
    assert devices.size == n_devices, devices
    x = 2
    main = Mesh(devices.reshape(x, n_devices // x), ("x", "y"))
    other = Mesh(main.devices.reshape(-1), ("d",))
    flipped = Mesh(devices[::-1].reshape(n_devices // 2, 2), ("a", "b"))
    return main, other, flipped


def scenario_save4(directory: str, events: dict[str, Any]) -> None:
    """4 processes x 2 devices: save, restore into the same shardings and into another mesh."""
    import shardckpt.jax as sj

    main, other, flipped = _meshes(8)
    tree = _worker_tree(main, other)
    events["names"] = sj.tree_names(tree)
    t = time.perf_counter()
    result = sj.save(tree, os.path.join(directory, "ckpt"), timeout=SAVE_TIMEOUT)
    events["save_seconds"] = time.perf_counter() - t
    events["save_clients"] = result.num_clients
    same = dict(tree, step=0)  # jax.Arrays as targets: their shardings are used
    _check(sj.restore(os.path.join(directory, "ckpt"), same), same, events, "restore_same")
    target = _reshard_targets(flipped)
    _check(sj.restore(os.path.join(directory, "ckpt"), target), target, events, "restore_other_mesh")


def scenario_restore2(directory: str, events: dict[str, Any]) -> None:
    """2 processes x 2 devices: restore the 4-process checkpoint, then save and restore their own."""
    import shardckpt.jax as sj

    main, other, flipped = _meshes(4)
    src = os.path.join(directory, "ckpt")
    same = _abstract(_worker_tree(main, other))
    _check(sj.restore(src, same), same, events, "restore_same_specs")
    target = _reshard_targets(flipped)
    restored = sj.restore(src, target)
    _check(restored, target, events, "restore_other_mesh")
    result = sj.save(restored, os.path.join(directory, "ckpt2"), timeout=SAVE_TIMEOUT)
    events["save_clients"] = result.num_clients
    _check(sj.restore(os.path.join(directory, "ckpt2"), same), same, events, "restore_own")


def scenario_single(directory: str, events: dict[str, Any]) -> None:
    """One process, 8 CPU devices, no jax.distributed: round trips, other sharding kinds, errors."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    import shardckpt
    import shardckpt.jax as sj

    main, other, flipped = _meshes(8)
    tree = _worker_tree(main, other)
    prefix = os.path.join(directory, "ckpt")
    result = sj.save(tree, prefix)
    events["save_clients"] = result.num_clients
    same = dict(tree, step=0)
    _check(sj.restore(prefix, same), same, events, "restore_same")
    target = _reshard_targets(flipped)
    _check(sj.restore(prefix, target), target, events, "restore_other_mesh")

    # A GSPMDSharding (no mesh): read through devices_indices_map as a grid of shards.
    from jax._src.sharding_impls import GSPMDSharding

    hlo = NamedSharding(main, P("y", "x"))._to_xla_hlo_sharding(2)
    gspmd = GSPMDSharding(tuple(main.devices.flat), hlo)
    sds = jax.ShapeDtypeStruct((8, 16), np.float32, sharding=gspmd)
    _check(sj.restore(prefix, {"params": {"w": sds}}), {"params": {"w": sds}}, events, "restore_gspmd")
    # ... and saved: a GSPMD-sharded array alone makes its own mesh.
    arr = jax.make_array_from_callback((8, 16), gspmd, lambda idx: global_value("params/w")[idx])
    sj.save({"params": {"w": arr}}, os.path.join(directory, "gspmd"))
    one = {"params": {"w": jax.ShapeDtypeStruct((8, 16), np.float32, sharding=NamedSharding(main, P("x")))}}
    _check(sj.restore(os.path.join(directory, "gspmd"), one), one, events, "gspmd_saved")

    # Single-device arrays and host values only: replicated on a mesh of every device; a root leaf is "value".
    dev3 = jax.devices()[3]
    small = {"a": jax.device_put(np.arange(6.0, dtype=np.float32), dev3), "b": np.arange(3), "c": 2.5, "d": True}
    sj.save(small, os.path.join(directory, "small"))
    back = sj.restore(os.path.join(directory, "small"), {"a": jax.ShapeDtypeStruct((6,), np.float32,
                                                         sharding=SingleDeviceSharding(jax.devices()[5])),
                                                         "b": np.zeros(3, np.int64), "c": 0.0, "d": False})
    assert back["a"].devices() == {jax.devices()[5]} and np.array_equal(back["a"], np.arange(6.0))
    assert float(back["c"]) == 2.5 and back["c"].dtype == jnp.float32 and bool(back["d"]) is True
    assert np.array_equal(np.asarray(back["b"]), np.arange(3))
    assert shardckpt.list_variables(os.path.join(directory, "small")) == [
        ("a", [6]), ("b", [3]), ("c", []), ("d", [])]
    root = jax.device_put(np.ones((4, 2), np.float32), NamedSharding(main, P("y")))
    sj.save(root, os.path.join(directory, "root"))
    assert sj.tree_names(root) == ["value"]
    assert np.array_equal(sj.restore(os.path.join(directory, "root"), root), np.ones((4, 2)))

    # Asynchronous save: the arrays may be deleted once save returns.
    g = global_value("params/w")
    w = jax.make_array_from_callback(g.shape, NamedSharding(main, P("x", "y")), lambda idx: g[idx])
    future = sj.save({"params": {"w": w}}, os.path.join(directory, "async"), blocking=False)
    w.delete()
    assert future.result(timeout=60).num_clients == 1
    _check(sj.restore(os.path.join(directory, "async"), one), one, events, "async")
    # mmap=True passes through: 1 MiB shards come back from a mapping of the data file, with the same values.
    big = np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024)
    rows = NamedSharding(main, P("x"))
    sj.save({"big": jax.make_array_from_callback(big.shape, rows, lambda idx: big[idx])},
            os.path.join(directory, "big"))
    mapped = sj.restore(os.path.join(directory, "big"), {"big": jax.ShapeDtypeStruct(big.shape, np.float32,
                                                                                     sharding=rows)}, mmap=True)
    events["mmap_equal"] = bool(np.array_equal(np.asarray(mapped["big"]), big)) and mapped["big"].sharding == rows
    # Overwrite.
    with_error(events, "exists", lambda: sj.save({"params": {"w": arr}}, os.path.join(directory, "async")))
    sj.save({"params": {"w": arr}}, os.path.join(directory, "async"), overwrite=True)

    # Errors: each names the tensor and the reason.
    half = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("h",))
    on_half = jax.device_put(np.zeros(4, np.float32), NamedSharding(half, P("h")))
    with_error(events, "two_meshes", lambda: sj.save({"a": tree["params"]["w"], "b": on_half},
                                                     os.path.join(directory, "bad")))
    with_error(events, "duplicate", lambda: sj.save({"a/b": 1, "a": {"b": 2}}, os.path.join(directory, "bad")))
    with_error(events, "prng", lambda: sj.save({"k": jax.random.key(0)}, os.path.join(directory, "bad")))
    with_error(events, "shape", lambda: sj.restore(prefix, {"rep": jax.ShapeDtypeStruct((5, 4), np.float32)}))
    with_error(events, "dtype", lambda: sj.restore(prefix, {"rep": jax.ShapeDtypeStruct((5, 3), jnp.bfloat16)}))
    with_error(events, "missing", lambda: sj.restore(prefix, {"nope": jax.ShapeDtypeStruct((1,), np.float32)}))
    assert not os.path.exists(os.path.join(directory, "bad.index"))


SCENARIOS = {"save4": scenario_save4, "restore2": scenario_restore2, "single": scenario_single}


def _setup() -> None:
    global MuNu, _opt
    MuNu, _opt = _register()


def worker_main(argv: list[str]) -> int:
    return jax_worker_main(argv, SCENARIOS, setup=_setup)


# --- test side ---------------------------------------------------------------------------------------------


def run(scenario: str, directory: Path, processes: int, devices: int) -> list[dict[str, Any]]:
    """Start ``processes`` workers with ``devices`` CPU devices each; their results by process id."""
    return run_jax_workers(__file__, scenario, directory, processes, devices, timeout=RUN_TIMEOUT)


def _assert_checkpoint(prefix: Path, num_files: int) -> None:
    """The files hold exactly the globals (read with shardckpt's reader, no JAX)."""
    import shardckpt

    assert sorted(p.name for p in prefix.parent.glob(prefix.name + ".*")) == sorted(
        [f"{prefix.name}.index"] + [f"{prefix.name}.data-{i:05d}-of-{num_files:05d}{side}"
                                    for i in range(num_files) for side in ("", ".crc32c")])
    reader = shardckpt.load_checkpoint(str(prefix))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(TENSORS)
    for name in TENSORS:
        got, want = reader.get_tensor(name), global_value(name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name


# Shards a process holds: per tensor, its addressable shards (2 devices per process on 8 or 4 devices).
def _shards_per_process(devices_per_process: int) -> int:
    return devices_per_process * len(TENSORS) - 1  # "step" targets a ShapeDtypeStruct without sharding: 1 device


@pytest.fixture(scope="module")
def saved4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("jax-adapter")
    return directory, run("save4", directory, processes=4, devices=2)


def test_four_processes_save_and_restore_into_the_same_and_another_mesh(saved4) -> None:
    directory, results = saved4
    for res in results:
        ev = res["events"]
        assert ev["save_clients"] == 4
        assert ev["names"] == ["layers/0", "layers/1/mu", "layers/1/nu", "opt/count", "opt/scale", "other_mesh",
                               "params/cols", "params/emb", "params/flat", "params/w", "rep", "step"]
        # Same shardings: 2 devices x 12 tensors, but "step" (a Python int target) lands on 1 device.
        assert ev["restore_same"] == 2 * len(TENSORS) - 1
        assert ev["restore_other_mesh"] == _shards_per_process(2)
    _assert_checkpoint(directory / "ckpt", 4)


def test_two_processes_restore_the_four_process_checkpoint(saved4) -> None:
    directory, _ = saved4
    results = run("restore2", directory, processes=2, devices=2)
    for res in results:
        ev = res["events"]
        assert ev["restore_same_specs"] == 2 * len(TENSORS) - 1  # "step" is an int target there too
        assert ev["restore_other_mesh"] == _shards_per_process(2)
        assert ev["save_clients"] == 2 and ev["restore_own"] == 2 * len(TENSORS) - 1
    _assert_checkpoint(directory / "ckpt2", 2)


def test_tensorflow_reads_the_jax_checkpoint(saved4, tmp_path: Path) -> None:
    directory, _ = saved4
    dtypes, arrays = tensorflow_reads(directory / "ckpt", tmp_path, timeout=RUN_TIMEOUT)
    assert dtypes == {n: {"float32": "float32", "int32": "int32", "bfloat16": "bfloat16"}[d]
                      for n, (_, d) in TENSORS.items()}
    assert sorted(arrays) == sorted(TENSORS)
    for name in TENSORS:
        want = global_value(name)
        if TENSORS[name][1] == "bfloat16":
            want = want.view(np.uint16)  # bit-exact
        got = arrays[name]
        assert got.dtype == want.dtype and np.array_equal(got, want), name


def test_single_process_eight_devices(tmp_path: Path) -> None:
    (res,) = run("single", tmp_path, processes=1, devices=8)
    ev = res["events"]
    assert ev["save_clients"] == 1
    assert ev["restore_same"] == 8 * len(TENSORS) - 7  # "step" (a Python int target): 1 device
    assert ev["restore_other_mesh"] == 8 * len(TENSORS) - 7
    assert ev["restore_gspmd"] == ev["gspmd_saved"] == ev["async"] == 8
    assert ev["mmap_equal"] is True
    assert ev["exists"]["type"] == "CheckpointExistsError"
    assert ev["two_meshes"]["type"] == "InvalidArgumentError" and "leaf b" in ev["two_meshes"]["message"]
    assert ev["duplicate"]["type"] == "InvalidArgumentError" and "'a/b'" in ev["duplicate"]["message"]
    assert ev["prng"]["type"] == "InvalidArgumentError" and "key_data" in ev["prng"]["message"]
    assert ev["shape"]["type"] == "ShapeMismatchError" and "rep" in ev["shape"]["message"]
    assert ev["dtype"]["type"] == "DTypeMismatchError" and "bfloat16" in ev["dtype"]["message"]
    assert ev["missing"]["type"] == "TensorNotFoundError" and "nope" in ev["missing"]["message"]
    _assert_checkpoint(tmp_path / "ckpt", 1)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
