"""`shardckpt.torch`: torch state dicts of DTensors, plain tensors and numbers, saved and loaded by real gloo ranks.

Two launches of fresh processes (this file run as a script is the worker):

* 4 ranks (2x2 ``("dp", "tp")`` mesh, an unnamed 1-D mesh of 4 and the ``tp``
  sub-mesh) save one state dict, load it back (a) with the same placements and
  (b) onto a 1-D mesh with other placements, save asynchronously and change the
  tensors right after, and see bad state dicts refused on every rank at once;
* a single process without torch.distributed saves and loads a state dict, then
  2 ranks load the 4-rank checkpoint (c) and save one of their own;

while TensorFlow (its own process) reads the 4-rank checkpoint.  Every value is
compared with numpy globals (`expected`), built the same way in every process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

pytestmark = [pytest.mark.timeout(300)]

RUN_TIMEOUT = 150  # per launch: a hang fails the test instead of stalling it

BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)


def expected() -> dict[str, Any]:
    """The global value of every entry, by checkpoint name (ints/floats for number leaves)."""
    def a(n: int, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> np.ndarray:
        return (np.arange(n, dtype=np.float64).reshape(shape) * scale).astype(dtype)

    return {
        "model/w_rows": a(48, (8, 6), np.float32, 0.5),
        "model/w_2d": a(48, (8, 6), np.float32, -0.25),
        "model/w_cols_bf16": a(40, (4, 10), BF16, 0.5),
        "model/nested": a(30, (10, 3), np.float32, 1.5),  # [Shard(0), Shard(0)]: 10 rows -> 3, 2, 3, 2
        "model/uneven": a(35, (7, 5), np.float64, 0.1),  # 7 rows over 4 ranks: 2, 2, 2, 1
        "model/tiny": a(6, (3, 2), np.int64, -7),  # 3 rows over 4: rank 3 holds nothing
        "model/tp_only": a(24, (6, 4), np.float32, 2.0),  # on the "tp" sub-mesh
        "model/bias": a(5, (5,), np.float32, 3.0),
        "model/emb_bf16": a(12, (3, 4), BF16, -1.0),
        "model/big": a(1_100_000, (1100, 1000), np.float32),  # > 4 MiB replicated: split among the ranks
        "model/scalar": np.array(2.5, np.float32),
        "model/mask": np.array([True, False, True]),
        "model/f8": np.array([0.5, 1, -1.5, 2, 448], np.float32).astype(F8),
        "optim/state/0/step": np.array(3.0, np.float32),
        "optim/state/0/exp_avg": a(48, (8, 6), np.float32, 0.125),
        "optim/state/0/exp_avg_sq": a(48, (8, 6), np.float32, 0.0625),
        "optim/state/1/step": np.array(3.0, np.float32),
        "optim/state/1/exp_avg": a(35, (7, 5), np.float64, -0.5),
        "optim/lr": 0.001,
        "optim/step": 42,
        "step": 100,
    }


# Placements per entry: (mesh, [placement per mesh dim]) with meshes "m2" (2x2 dp,tp), "m1" (unnamed [4]),
# "tp" (m2["tp"]), "flat" ([4] named), "x" ([2] named), "ab" ((1, 2) named); "plain" = torch.Tensor; "num".
SAVED: dict[str, tuple[str, list[str]]] = {
    "model/w_rows": ("m2", ["S0", "R"]),
    "model/w_2d": ("m2", ["S0", "S1"]),
    "model/w_cols_bf16": ("m2", ["R", "S1"]),
    "model/nested": ("m2", ["S0", "S0"]),
    "model/uneven": ("m1", ["S0"]),
    "model/tiny": ("m1", ["S0"]),
    "model/tp_only": ("tp", ["S0"]),
    "model/bias": ("plain", []),
    "model/emb_bf16": ("plain", []),
    "model/big": ("plain", []),
    "model/scalar": ("plain", []),
    "model/mask": ("plain", []),
    "model/f8": ("plain", []),
    "optim/state/0/step": ("plain", []),
    "optim/state/0/exp_avg": ("m2", ["S0", "S1"]),
    "optim/state/0/exp_avg_sq": ("m2", ["S0", "R"]),
    "optim/state/1/step": ("plain", []),
    "optim/state/1/exp_avg": ("m1", ["S0"]),
    "optim/lr": ("num", []),
    "optim/step": ("num", []),
    "step": ("num", []),
}

# (b) everything on a named 1-D mesh of 4, matrices split by columns instead of rows, some kinds swapped.
RESHARD_4: dict[str, tuple[str, list[str]]] = {
    name: (("flat", ["S1"]) if isinstance(v, np.ndarray) and v.ndim == 2 else
           ("flat", ["R"]) if isinstance(v, np.ndarray) else ("num", []))
    for name, v in expected().items()
}
RESHARD_4.update({
    "model/uneven": ("plain", []),  # saved as a DTensor, loaded as a plain tensor
    "model/bias": ("flat", ["S0"]),  # saved plain, loaded sharded (5 over 4: 2, 2, 1, 0)
    "model/big": ("flat", ["S0"]),
    "model/tiny": ("m2", ["S1", "S0"]),
})

# (c) two ranks: a 1-D mesh of 2 and a (1, 2) mesh.
RESHARD_2: dict[str, tuple[str, list[str]]] = {
    name: (("x", ["S0"]) if isinstance(v, np.ndarray) and v.ndim == 2 else ("plain", []) if isinstance(
        v, np.ndarray) else ("num", []))
    for name, v in expected().items()
}
RESHARD_2.update({
    "model/w_2d": ("ab", ["R", "S1"]),
    "model/nested": ("ab", ["S0", "S0"]),
    "model/bias": ("x", ["S0"]),
    "optim/state/0/exp_avg": ("ab", ["S1", "S0"]),
})


# --- worker side (torch imported only here) -----------------------------------------------------------


def _to_torch(arr: np.ndarray) -> Any:
    import torch

    arr = np.array(arr, copy=True, order="C")
    if arr.dtype == BF16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    if arr.dtype == F8:
        return torch.from_numpy(arr.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(arr)


def _to_numpy(t: Any) -> np.ndarray:
    import shardckpt.torch as sct

    return np.array(sct.to_numpy(t), copy=True)


def _placements(codes: list[str]) -> list[Any]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    out: list[Any] = []
    for c in codes:
        out.append(Replicate() if c == "R" else Partial() if c == "P" else Shard(int(c[1:])))
    return out


def build(meshes: dict[str, Any], spec: dict[str, tuple[str, list[str]]], *, zeros: bool = False) -> dict:
    """A nested state dict (int keys under optim/state) with the expected values, or zeros of the same kind."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    flat: dict[str, Any] = {}
    for name, value in expected().items():
        kind, codes = spec[name]
        if kind == "num":
            flat[name] = type(value)(0) if zeros else value
            continue
        t = _to_torch(value)
        if zeros:
            t = torch.zeros_like(t)
        # src_data_rank=None: each rank keeps torch's own chunk of its (identical) data, no communication
        flat[name] = t if kind == "plain" else distribute_tensor(t, meshes[kind], _placements(codes),
                                                                 src_data_rank=None)
    root: dict = {}
    for name, value in flat.items():
        node = root
        *parents, last = [int(p) if p.isdigit() else p for p in name.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return root


def check(state: dict, where: str) -> int:
    """Every entry equals its expected global value (DTensors through full_tensor, a collective)."""
    from torch.distributed.tensor import DTensor

    import shardckpt.torch as sct

    want = expected()
    leaves = sct.flatten_state_dict(state)
    assert sorted(leaves) == sorted(want), (where, sorted(leaves))
    for name in sorted(want):  # the same order on every rank: full_tensor is a collective
        got, value = leaves[name], want[name]
        if isinstance(value, np.ndarray):
            full = got.full_tensor() if isinstance(got, DTensor) else got
            arr = _to_numpy(full)
            assert arr.dtype == value.dtype and arr.shape == value.shape, (where, name, arr.dtype, arr.shape)
            assert np.array_equal(arr.astype(np.float64), value.astype(np.float64)), (where, name, arr, value)
        else:
            assert type(got) is type(value) and got == value, (where, name, got, value)
    return len(want)


def _meshes(size: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    if size == 4:
        m2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        return {"m2": m2, "tp": m2["tp"], "m1": init_device_mesh("cpu", (4,)),
                "flat": init_device_mesh("cpu", (4,), mesh_dim_names=("flat",))}
    return {"x": init_device_mesh("cpu", (2,), mesh_dim_names=("x",)),
            "ab": init_device_mesh("cpu", (1, 2), mesh_dim_names=("a", "b"))}


def expect_error(label: str, events: dict, fn: Any, allowed: tuple[type, ...]) -> None:
    import shardckpt

    try:
        fn()
    except shardckpt.CheckpointError as exc:
        events[label] = f"{type(exc).__name__}: {exc}"
        assert isinstance(exc, allowed), (label, events[label])
        return
    raise AssertionError(f"{label}: no error")


def scenario_four(rank: int, directory: str, events: dict) -> None:
    import torch
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    import shardckpt
    import shardckpt.torch as sct

    meshes = _meshes(4)
    prefix = os.path.join(directory, "ckpt")
    state = build(meshes, SAVED)
    events["layout_tp_only"] = repr(sct.torch_layout(state["model"]["tp_only"]))
    events["layout_nested"] = repr(sct.torch_layout(state["model"]["nested"]).sharding_specs)
    t = time.monotonic()
    result = sct.save(state, prefix)
    assert isinstance(result, shardckpt.SaveResult)
    events["save"] = {"elapsed": time.monotonic() - t, "bytes": result.bytes_written, "clients": result.num_clients}

    t = time.monotonic()
    same = sct.load(build(meshes, SAVED, zeros=True), prefix)
    events["load_same_s"] = time.monotonic() - t
    events["same"] = check(same, "same placements")
    events["other_mesh"] = check(sct.load(build(meshes, RESHARD_4, zeros=True), prefix), "1-D mesh, Shard(1)")

    # Asynchronous: the call returns after a host snapshot; changing the tensors then changes nothing saved.
    future = sct.save(state, os.path.join(directory, "ckpt-async"), blocking=False)
    assert isinstance(future, shardckpt.SaveFuture)
    with torch.no_grad():
        state["model"]["bias"].add_(1000)
        state["model"]["w_2d"].to_local().add_(1000)
        state["optim"]["state"][1]["exp_avg"].to_local().mul_(-1)
    future.result(timeout=60)
    events["async"] = check(sct.load(build(meshes, SAVED, zeros=True), os.path.join(directory, "ckpt-async")),
                            "async")

    # Refused on every rank at once, nothing written.
    def partial() -> None:
        bad = {"p": DTensor.from_local(torch.ones(4), meshes["m1"], [Partial()])}
        sct.save(bad, os.path.join(directory, "bad-partial"), timeout=30)

    expect_error("partial", events, partial, (shardckpt.InvalidArgumentError,))

    def strided() -> None:
        local = torch.ones(2)
        bad = {"s": DTensor.from_local(local, meshes["m2"], [_StridedShard(0, split_factor=2), Shard(0)])}
        sct.save(bad, os.path.join(directory, "bad-strided"), timeout=30)

    expect_error("strided", events, strided, (shardckpt.InvalidArgumentError,))

    def one_rank_bad() -> None:
        bad: dict[str, Any] = {"ok": torch.ones(3), "odd": {1} if rank == 1 else 1.0}  # a set: no JSON form
        sct.save(bad, os.path.join(directory, "bad-one-rank"), timeout=30)

    expect_error("one_rank_bad", events, one_rank_bad,
                 (shardckpt.InvalidArgumentError,) if rank == 1 else (shardckpt.RemoteClientError,))

    def mismatch() -> None:
        sct.save({"x": torch.ones(3 if rank else 4)}, os.path.join(directory, "bad-mismatch"), timeout=30)

    expect_error("mismatch", events, mismatch, (shardckpt.MismatchedCallError,))

    def wrong_dtype() -> None:
        target = build(meshes, SAVED, zeros=True)
        target["model"]["bias"] = torch.zeros(5, dtype=torch.float64)
        sct.load(target, prefix)

    expect_error("wrong_dtype", events, wrong_dtype, (shardckpt.DTypeMismatchError,))


def scenario_single(directory: str, events: dict) -> None:
    """No torch.distributed: one client, plain tensors and numbers."""
    import torch

    import shardckpt.torch as sct

    assert not torch.distributed.is_initialized()
    assert type(sct._coordinator(None)).__name__ == "SingleClient"
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4).t(),  # a non-contiguous view
                       "h": torch.arange(6, dtype=torch.bfloat16)},
             "optim": {0: {"step": 7}}, "lr": 0.25, "flag": True}
    prefix = os.path.join(directory, "single")
    result = sct.save(state, prefix)
    assert result.num_clients == 1 and result.files == [prefix + ".data-00000-of-00001"]
    target = {"model": {"w": torch.zeros(4, 3), "h": torch.zeros(6, dtype=torch.bfloat16)},
              "optim": {0: {"step": 0}}, "lr": 0.0, "flag": False}
    assert sct.load(target, prefix) is target
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["h"], state["model"]["h"])
    assert target["optim"][0]["step"] == 7 and target["lr"] == 0.25 and target["flag"] is True
    whole = sct.read_state_dict(prefix)
    assert torch.equal(whole["model"]["w"], state["model"]["w"]) and int(whole["optim"]["0"]["step"]) == 7
    events["single"] = sorted(sct.flatten_state_dict(state))


def scenario_two(rank: int, directory: str, events: dict) -> None:
    import shardckpt.torch as sct

    meshes = _meshes(2)
    prefix = os.path.join(directory, "ckpt")
    t = time.monotonic()
    state = sct.load(build(meshes, RESHARD_2, zeros=True), prefix)
    events["load_s"] = time.monotonic() - t
    events["two"] = check(state, "2 ranks")
    result = sct.save(state, os.path.join(directory, "ckpt-2ranks"))
    events["saved_clients"] = result.num_clients


def worker(scenario: str, directory: str) -> int:
    sys.path.insert(0, str(HERE))
    import engine_worker as ew

    results = os.environ["WORKER_RESULTS"]
    rank = int(os.environ["WORKER_RANK"])
    events: dict[str, Any] = {}
    ok, failure = True, None
    engine = None
    try:
        if scenario == "two" and rank == 0:
            scenario_single(directory, events)  # before torch.distributed exists in this process
        engine = ew.init_torch()
        if scenario == "four":
            scenario_four(rank, directory, events)
        else:
            scenario_two(rank, directory, events)
    except BaseException:  # noqa: BLE001 - reported to the parent
        ok, failure = False, traceback.format_exc()
        print(f"[rank {rank}] {failure}", file=sys.stderr, flush=True)
    with open(os.path.join(results, f"result-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "ok": ok, "events": events, "failure": failure}, f)
    if engine is not None:
        engine.finish()
    return 0 if ok else 1


# --- test side ----------------------------------------------------------------------------------------


def launch(n: int, scenario: str, directory: Path) -> Any:
    import engine_worker as ew

    results = tempfile.mkdtemp(prefix="shardckpt-torch-adapter-")
    try:
        env = ew._base_env(results)
        env["GLOO_SOCKET_IFNAME"] = "lo"
        t = time.monotonic()
        codes, output = ew.launch_torch(n, [__file__, "worker", scenario, os.fspath(directory)], env, RUN_TIMEOUT)
        out = {}
        for name in os.listdir(results):
            with open(os.path.join(results, name)) as f:
                res = json.load(f)
            out[res["rank"]] = res
        return ew.Run(codes, out, output, time.monotonic() - t)
    finally:
        shutil.rmtree(results, ignore_errors=True)


TF_READER = r"""
import json, sys
import numpy as np
import tensorflow as tf
reader = tf.train.load_checkpoint(sys.argv[1])
out, dtypes = {}, {}
for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    dtypes[name] = str(reader.get_variable_to_dtype_map()[name].name)
    out[name] = np.asarray(value).astype(np.float64)
np.savez(sys.argv[2], **{k.replace("/", "|"): v for k, v in out.items()})
print(json.dumps(dtypes))
"""

TF_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", BF16: "bfloat16",
             np.dtype(np.int64): "int64", np.dtype(bool): "bool", F8: "float8_e4m3fn"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 ranks save and reload; then, at the same time, TensorFlow reads it and 2 ranks load it."""
    directory = tmp_path_factory.mktemp("torch-adapter")
    t = time.monotonic()
    four = launch(4, "four", directory)
    out: dict[str, Any] = {"dir": directory, "four": four}
    if not (directory / "ckpt.index").exists():
        return out
    tf = None
    if importlib.util.find_spec("tensorflow") is not None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        tf = subprocess.Popen([sys.executable, "-c", TF_READER, str(directory / "ckpt"), str(directory / "tf.npz")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out["two"] = launch(2, "two", directory)
    if tf is not None:
        try:
            stdout, stderr = tf.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            tf.kill()
            stdout, stderr = tf.communicate()
        out["tf"] = (tf.returncode, stdout.decode(), stderr.decode())
    out["elapsed"] = time.monotonic() - t
    print(f"torch adapter launches: 4 ranks {four.elapsed:.1f} s, 2 ranks {out['two'].elapsed:.1f} s, "
          f"all {out['elapsed']:.1f} s")
    return out


def test_four_ranks_save_and_load_same_and_other_placements(runs) -> None:
    run = runs["four"]
    run.assert_ok(4)
    n = len(expected())
    for res in run.results.values():
        ev = res["events"]
        assert ev["save"]["clients"] == 4
        assert ev["same"] == ev["other_mesh"] == ev["async"] == n
        # The tp sub-mesh is saved on its root 2x2 mesh, replicated over dp.
        assert "sharding_specs=('tp', 'unsharded')" in ev["layout_tp_only"] and "('dp', 'tp')" in ev["layout_tp_only"]
        assert ev["layout_nested"] == "(('dp', 'tp'), 'unsharded')"
    # Each distinct piece once: the data files hold every byte exactly once (plus nothing else).
    total = sum(v.nbytes if isinstance(v, np.ndarray) else 8 for v in expected().values())
    assert sum(res["events"]["save"]["bytes"] for res in run.results.values()) == total
    # The big replicated tensor is split among the ranks rather than written by one.
    assert max(res["events"]["save"]["bytes"] for res in run.results.values()) < 4_400_000


def test_bad_state_dicts_fail_on_every_rank_and_write_nothing(runs) -> None:
    run, directory = runs["four"], runs["dir"]
    run.assert_ok(4)
    for rank, res in run.results.items():
        ev = res["events"]
        assert "Partial" in ev["partial"] and "_StridedShard" in ev["strided"]
        if rank == 1:
            assert ev["one_rank_bad"].startswith("InvalidArgumentError: odd: cannot save a set")
        else:
            assert "rank 1" in ev["one_rank_bad"] and "cannot save a set" in ev["one_rank_bad"]
        assert "model/bias" in ev["wrong_dtype"]
    assert not [p.name for p in directory.iterdir() if p.name.startswith("bad-")]


def test_checkpoint_content_matches_the_globals(runs) -> None:
    """Read back with shardckpt's numpy reader (no torch): names, dtypes and values."""
    import shardckpt

    runs["four"].assert_ok(4)
    for base in ("ckpt", "ckpt-async"):
        with shardckpt.load_checkpoint(runs["dir"] / base) as reader:
            assert sorted(reader.get_variable_to_shape_map()) == sorted(expected())
            for name, value in expected().items():
                got = reader.get_tensor(name)
                want = np.asarray(value)
                assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
                assert np.array_equal(got.astype(np.float64), want.astype(np.float64)), name


def test_single_process_without_torch_distributed(runs) -> None:
    run = runs["two"]
    run.assert_ok(2)
    assert run.results[0]["events"]["single"] == ["flag", "lr", "model/h", "model/w", "optim/0/step"]


def test_two_ranks_load_the_four_rank_checkpoint_and_save_their_own(runs) -> None:
    import shardckpt

    run = runs["two"]
    run.assert_ok(2)
    for res in run.results.values():
        assert res["events"]["two"] == len(expected()) and res["events"]["saved_clients"] == 2
    with shardckpt.load_checkpoint(runs["dir"] / "ckpt-2ranks") as reader:
        for name, value in expected().items():
            want = np.asarray(value)
            got = reader.get_tensor(name)
            assert got.dtype == want.dtype and np.array_equal(got.astype(np.float64), want.astype(np.float64))


def test_core_saves_tensors_laid_out_on_several_meshes(tmp_path) -> None:
    """What the adapter relies on: one sharded_save of tensors on a 2x2 mesh, a reshaped 4x1 mesh and a
    sub-mesh of two devices, each client holding only its own device."""
    import shardckpt as sc

    g = np.arange(56, dtype=np.float32).reshape(7, 8)

    def client(coord: Any) -> Any:
        r = coord.rank
        save_mesh = sc.Mesh(["rank"], [4], local_device_ids=[r])
        m22 = sc.Mesh(["x", "y"], [2, 2], device_ids=[0, 1, 2, 3], local_device_ids=[r])
        m41 = sc.Mesh(["a", "b"], [4, 1], device_ids=[3, 2, 1, 0], local_device_ids=[r])
        sub = sc.Mesh(["z"], [2], device_ids=[2, 3], local_device_ids=[r] if r >= 2 else [])
        values = [sc.DTensor.from_global(g, sc.Layout(["x", "y"], m22), [r]),
                  sc.DTensor.from_global(g, sc.Layout([sc.UNSHARDED, "a"], m41), [r]),
                  sc.DTensor.from_global(g, sc.Layout(["z", sc.UNSHARDED], sub), [r] if r >= 2 else []),
                  g]
        sc.sharded_save(save_mesh, tmp_path / "ck", ["a", "b", "c", "d"], [""] * 4, values, coordinator=coord)
        outside = sc.Mesh(["w"], [5], local_device_ids=[r])
        with pytest.raises(sc.InvalidArgumentError, match="outside the save mesh"):
            sc.sharded_save(save_mesh, tmp_path / "bad", ["e"], [""],
                            [sc.DTensor.from_global(g, sc.Layout(["w", sc.UNSHARDED], outside), [r])],
                            coordinator=coord, timeout=10)
        return r

    assert sc.LocalGroup(4).run(client) == [0, 1, 2, 3]
    with sc.load_checkpoint(tmp_path / "ck") as reader:
        for name in "abcd":
            np.testing.assert_array_equal(reader.get_tensor(name), g)
    assert not (tmp_path / "bad.index").exists()


def test_tensorflow_reads_the_checkpoint(runs) -> None:
    code, stdout, stderr = runs["tf"]
    assert code == 0, stderr[-4000:]
    dtypes = json.loads(stdout.strip().splitlines()[-1])
    values = np.load(runs["dir"] / "tf.npz")
    assert sorted(dtypes) == sorted(expected())
    for name, value in expected().items():
        want = np.asarray(value)
        assert dtypes[name] == TF_DTYPES[want.dtype], (name, dtypes[name])
        assert np.array_equal(values[name.replace("/", "|")], want.astype(np.float64)), name


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.exit(worker(sys.argv[2], sys.argv[3]))
