"""Sharded checkpoints across shardckpt and TensorFlow DTensor, in both directions, resharded on the way.

(a) 4 shardckpt clients (an in-process group) save on a 2x2 mesh; TensorFlow reads
    the checkpoint with ``tf.experimental.dtensor.name_based_restore`` into other
    layouts on other meshes (2x4, 1-D of 8, fully replicated) and with
    ``tf.train.load_checkpoint``.
(b) TensorFlow DTensor's ``sharded_save`` writes sharded and replicated DVariables
    on a 2x4 virtual CPU mesh; shardckpt restores them onto other meshes (3 clients
    on a 1-D mesh of 3, 2 clients on a 2x3 mesh, 1 client fully replicated).

TensorFlow's logical CPU devices must be configured before any other TensorFlow
use, so the TensorFlow side runs in a fresh interpreter: this file, run as a script::

    python tests/test_tf_dtensor_interop.py OUTDIR OUR_PREFIX

It writes ``OUTDIR/tf/ckpt`` (case b) and ``OUTDIR/report.json`` (what TF read in case a).
Both sides make their tensors with `values()` from the same seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import shardckpt as sc

U = sc.UNSHARDED
HERE = Path(__file__).resolve().parent


def values() -> dict[str, dict[str, np.ndarray]]:
    """The global tensors of both cases: ``ours`` (saved by shardckpt), ``tf`` (saved by TF DTensor)."""
    rng = np.random.default_rng(20240611)
    ours = {
        "w": rng.standard_normal((8, 6)).astype(np.float32),
        "r": rng.integers(-(2**40), 2**40, (10,)).astype(np.int64),
        "u": rng.standard_normal((7, 5)),  # uneven over every mesh dim
        "part": rng.standard_normal((8, 6)).astype(np.float32),  # saved as two slices of different layouts
        "b16": rng.standard_normal((6, 8)).astype(ml_dtypes.bfloat16),
    }
    theirs = {
        "a": rng.standard_normal((8, 12)).astype(np.float32),
        "b": rng.integers(-1000, 1000, (16,)).astype(np.int32),
        "c": rng.standard_normal((4, 6)),
        "d": rng.standard_normal((6, 8)).astype(ml_dtypes.bfloat16),
        "e": rng.integers(-(2**50), 2**50, (8, 4)).astype(np.int64),
    }
    return {"ours": ours, "tf": theirs}


# TF DTensor's save layouts (case b), on a ("x", 2), ("y", 4) mesh.
TF_LAYOUTS = {"a": ["x", "y"], "b": ["y"], "c": [U, U], "d": [U, "y"], "e": ["y", "x"]}

# TF's restore targets (case a): per mesh, per tensor; TF needs even splits.
TF_TARGETS = {
    "mesh2x4": ([("x", 2), ("y", 4)],
                {"w": ["y", "x"], "r": ["x"], "u": [U, U], "part": [U, "x"], "b16": ["x", "y"]}),
    "mesh8": ([("a", 8)], {"w": ["a", U], "r": [U], "u": [U, U], "part": ["a", U], "b16": [U, "a"]}),
    "replicated": ([("x", 2), ("y", 4)], {n: [U, U] if n != "r" else [U] for n in ("w", "r", "u", "part", "b16")}),
}


def same(got: np.ndarray, want: np.ndarray) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


# --------------------------------------------------------------------------------------------------
# The TensorFlow side (run as a script)
# --------------------------------------------------------------------------------------------------


def tf_main(out: str, our_prefix: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 8)
    from tensorflow.experimental import dtensor

    vals = values()
    report: dict[str, object] = {}

    def place(value: np.ndarray, spec: list[str], mesh: dtensor.Mesh) -> tf.Tensor:
        """A DTensor with layout ``spec``, built from each device's own shard (dtensor.pack)."""
        layout = dtensor.Layout(spec, mesh)
        ours = sc.Layout(spec, sc.create_mesh(list(zip(mesh.dim_names, mesh.shape()))))
        shards = []
        for device in mesh.local_device_ids():
            box = ours.shard_bounds(value.shape, device)
            shards.append(tf.constant(value[tuple(slice(lo, hi) for lo, hi in box)]))
        return dtensor.pack(shards, layout)

    def check(t: tf.Tensor, spec: list[str], mesh: dtensor.Mesh, want: np.ndarray) -> list[str]:
        """Every device's component against its part of ``want``; returns problems."""
        problems = []
        if list(dtensor.fetch_layout(t).sharding_specs) != list(spec):
            problems.append(f"layout {dtensor.fetch_layout(t).sharding_specs} != {spec}")
        ours = sc.Layout(spec, sc.create_mesh(list(zip(mesh.dim_names, mesh.shape()))))
        for device, component in zip(mesh.local_device_ids(), dtensor.unpack(t)):
            box = ours.shard_bounds(want.shape, device)
            if not same(component.numpy(), want[tuple(slice(lo, hi) for lo, hi in box)]):
                problems.append(f"device {device} holds the wrong values")
        return problems

    # (a) read shardckpt's checkpoint into other layouts.
    for case, (dims, targets) in TF_TARGETS.items():
        mesh = dtensor.create_mesh(dims, device_type="CPU")
        zeros = {}
        for name, spec in targets.items():
            want = vals["ours"][name]
            zeros[name] = dtensor.call_with_layout(
                tf.zeros, dtensor.Layout(spec, mesh), shape=want.shape, dtype=tf.as_dtype(want.dtype))
        restored = dtensor.name_based_restore(mesh, our_prefix, zeros)
        report[case] = {name: check(restored[name], targets[name], mesh, vals["ours"][name]) for name in targets}
    reader = tf.train.load_checkpoint(our_prefix)
    report["load_checkpoint_shapes"] = reader.get_variable_to_shape_map()
    report["load_checkpoint"] = {
        name: same(reader.get_tensor(name), want) for name, want in vals["ours"].items()
    }

    # (b) DTensor sharded_save of DVariables on a 2x4 mesh.
    mesh = dtensor.create_mesh([("x", 2), ("y", 4)], device_type="CPU")
    names, variables = [], []
    for name, spec in TF_LAYOUTS.items():
        v = dtensor.DVariable(place(vals["tf"][name], spec, mesh))
        problems = check(v.read_value(), spec, mesh, vals["tf"][name])
        assert not problems, (name, problems)
        names.append(name)
        variables.append(v)
    prefix = os.path.join(out, "tf", "ckpt")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    dtensor.sharded_save(mesh, prefix, names, [""] * len(names), variables)
    report["tf_prefix"] = prefix
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


def save_ours(prefix: str) -> None:
    """4 clients on a 2x2 mesh: sharded, replicated numpy, uneven, a bfloat16 and a variable in two slices."""
    v = values()["ours"]
    mesh = sc.create_mesh([("x", 2), ("y", 2)])

    def client(coord):
        local = mesh.local_devices(coord.rank, coord.size)

        def dt(name, spec, value=None):
            return sc.DTensor.from_global(v[name] if value is None else value, sc.Layout(spec, mesh), local)

        names = ["w", "r", "u", "part", "b16", "part"]
        slices = ["", "", "", "8 6 0,4:-", "", "8 6 4,4:-"]
        tensors = [dt("w", ["x", "y"]), v["r"], dt("u", ["x", U]), dt("part", ["y", U], v["part"][:4]),
                   dt("b16", [U, "y"]), dt("part", ["x", "y"], v["part"][4:])]
        return sc.sharded_save(mesh, prefix, names, slices, tensors, coordinator=coord, timeout=60)

    results = sc.LocalGroup(4).run(client)
    assert [r.num_clients for r in results] == [4] * 4


def check_shards(per_client: list[dict[str, sc.DTensor]], want: dict[str, np.ndarray], devices: int) -> None:
    """Every shard any client holds is its part of the global value, and every device got its shard."""
    seen: dict[str, set[int]] = {}
    for restored in per_client:
        for name, t in restored.items():
            assert t.dtype == want[name].dtype and t.shape == want[name].shape, name
            for device, shard in t.shards.items():
                box = tuple(slice(lo, hi) for lo, hi in t.bounds(device))
                assert same(shard, want[name][box]), (name, device)
                seen.setdefault(name, set()).add(device)
    assert seen == {name: set(range(devices)) for name in want}


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory):
    out = tmp_path_factory.mktemp("dtensor_interop")
    our_prefix = str(out / "ours" / "ckpt")
    save_ours(our_prefix)
    proc = subprocess.run(
        [sys.executable, __file__, str(out), our_prefix],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, f"TensorFlow side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return our_prefix, json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", list(TF_TARGETS))
def test_tf_name_based_restore_reads_our_sharded_save(exchanged, case):
    _, report = exchanged
    assert report[case] == {name: [] for name in TF_TARGETS[case][1]}


def test_tf_load_checkpoint_reads_our_sharded_save(exchanged):
    our_prefix, report = exchanged
    want = values()["ours"]
    assert report["load_checkpoint_shapes"] == {n: list(v.shape) for n, v in want.items()}
    assert report["load_checkpoint"] == {n: True for n in want}
    # shardckpt's own reader agrees (the variable in two slices is assembled).
    reader = sc.load_checkpoint(our_prefix)
    for name, value in want.items():
        assert same(reader.get_tensor(name), value), name


RESTORE_MESHES = {
    # 3 clients, one device each: 8, 16 and 6-long dims split unevenly 3+3+2, 6+6+4, 2+2+2.
    "a3": (3, [("a", 3)], {"a": ["a", U], "b": ["a"], "c": [U, "a"], "d": ["a", U], "e": [U, U]}),
    # 2 clients, three devices each, on a 2x3 mesh.
    "p2q3": (2, [("p", 2), ("q", 3)], {"a": ["q", "p"], "b": ["p"], "c": ["p", "q"], "d": [U, "q"], "e": ["q", U]}),
    # 1 client, fully replicated over 4 devices.
    "replicated": (1, [("r", 4)], {"a": [U, U], "b": [U], "c": [U, U], "d": [U, U], "e": [U, U]}),
}


@pytest.mark.parametrize("case", list(RESTORE_MESHES))
def test_we_restore_tf_dtensor_sharded_save_onto_other_meshes(exchanged, case):
    _, report = exchanged
    prefix = report["tf_prefix"]
    want = values()["tf"]
    clients, dims, specs = RESTORE_MESHES[case]
    mesh = sc.create_mesh(dims)
    # TF wrote one data file per device that held a distinct slice, then merged them.
    with sc.BundleReader(prefix) as br:
        assert br.header.num_shards == 8
        assert len(br.entry("a").slices) == 8 and len(br.entry("b").slices) == 4 and not br.entry("c").slices

    def client(coord):
        names = list(specs)
        out = sc.sharded_restore(mesh, prefix, names, [sc.Layout(specs[n], mesh) for n in names], coordinator=coord)
        assert all(set(t.shards) == set(mesh.local_devices(coord.rank, coord.size)) for t in out)
        return dict(zip(names, out))

    check_shards(sc.LocalGroup(clients).run(client), want, mesh.size)


def test_we_restore_a_slice_of_a_tf_dtensor_variable(exchanged):
    _, report = exchanged
    want = values()["tf"]["a"]
    mesh = sc.create_mesh([("a", 3)])

    def client(coord):
        (t,) = sc.sharded_restore(mesh, report["tf_prefix"], ["a"], [sc.Layout([U, "a"], mesh)],
                                  shape_and_slices=["8 12 3,4:2,9"], coordinator=coord)
        return {"a": t}

    check_shards(sc.LocalGroup(3).run(client), {"a": want[3:7, 2:11]}, 3)


if __name__ == "__main__":
    tf_main(sys.argv[1], sys.argv[2])
