"""`shardckpt.tf`: TF DTensor's save/restore API over shardckpt, checked against TensorFlow itself.

Two TensorFlow programs run as subprocesses (TF's logical CPU devices must be set
before any other TF use), both started at once to save time:

* **single**: one client with 8 logical CPUs.  DVariables sharded ``["x", unsharded]``,
  ``["x", "y"]``, replicated, strings (replicated and sharded), bfloat16, a scalar,
  a plain ``tf.Variable``, and a variable saved as two ``shape_and_slices`` pieces
  of different layouts, are saved on a 2x4 mesh with ``shardckpt.tf.sharded_save``.
  They are read back with ``shardckpt.tf.name_based_restore`` into other layouts on
  other meshes (Layout targets, DVariables assigned in place), with TF's own
  ``dtensor.name_based_restore`` and with ``tf.train.load_checkpoint``.  A checkpoint
  written by TF DTensor's own ``sharded_save`` is restored through
  ``shardckpt.tf.name_based_restore`` onto another mesh.
* **multi**: 2 DTensor clients (``DTENSOR_JOBS`` on 127.0.0.1, inside one private
  network namespace, since TF's gRPC servers bind every interface), 2 logical CPUs
  each, save on a 2x2 mesh, then restore onto a 1-D mesh of 4, into DVariables, and
  with TF's reader; TF DTensor's multi-client ``sharded_save`` is read back too.

Expected components always come from TensorFlow itself (``dtensor.relayout`` of the
global value onto the target layout, then ``dtensor.unpack``) and are compared byte
for byte.  Each program records every check in a JSON report; a test per check.

Run by hand: ``python tests/test_adapter_tf.py single OUTDIR`` (the multi scenario
needs ``DTENSOR_*`` variables; see `_launch_multi`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_worker import netns_works  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
TIMEOUT = 170  # seconds per program; a hang fails the tests instead of stalling the run

# ---------------------------------------------------------------------------------------------------
# The TensorFlow side (run as a script).
# ---------------------------------------------------------------------------------------------------


class Checks:
    """Runs named checks, recording each outcome; the report is rewritten after every check."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], object]) -> None:
        t = time.monotonic()
        try:
            info = fn()
            self.results[name] = {"ok": True, "info": info}
        except BaseException:  # noqa: BLE001 - recorded, then reported by the test of that check
            self.results[name] = {"ok": False, "error": traceback.format_exc()}
        self.results[name]["seconds"] = round(time.monotonic() - t, 3)
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


def _tf_helpers() -> dict[str, Any]:
    """Functions shared by both scenarios; TF is imported by the caller first."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    unsharded = dtensor.UNSHARDED

    def layout(spec: list[str], mesh: Any) -> Any:
        return dtensor.Layout(spec, mesh)

    def place(value: np.ndarray, spec: list[str], mesh: Any) -> Any:
        """The global ``value`` as a DTensor on ``spec``, split by TensorFlow itself."""
        t = tf.constant(value, dtype=tf.string) if value.dtype == object else tf.constant(value)
        rep = dtensor.copy_to_mesh(t, dtensor.Layout.replicated(mesh, value.ndim))
        if all(s == unsharded for s in spec):
            return rep
        return dtensor.relayout(rep, layout(spec, mesh))

    def components(t: Any) -> list[np.ndarray]:
        if isinstance(t, tf.Variable):
            t = t.read_value()
        obj = t.dtype == tf.string
        return [np.asarray(c.numpy(), dtype=object) if obj else np.asarray(c.numpy()) for c in dtensor.unpack(t)]

    def same(got: np.ndarray, want: np.ndarray) -> bool:
        if got.dtype != want.dtype or got.shape != want.shape:
            return False
        if got.dtype == object:
            return bool(got.tolist() == want.tolist())
        return got.tobytes() == want.tobytes()

    def expect(t: Any, value: np.ndarray, spec: list[str], mesh: Any, what: str) -> int:
        """``t`` is laid out as ``spec`` on ``mesh`` and its local components equal TF's split of ``value``."""
        got_layout = dtensor.fetch_layout(t.read_value() if isinstance(t, tf.Variable) else t)
        assert got_layout.to_string() == layout(spec, mesh).to_string(), (what, got_layout.to_string())
        got, want = components(t), components(place(value, spec, mesh))
        assert len(got) == len(want) == mesh.num_local_devices(), (what, len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            assert same(g, w), f"{what}: component {i}: {g!r} != {w!r}"
        return len(got)

    return {"layout": layout, "place": place, "components": components, "same": same, "expect": expect,
            "U": unsharded}


def blank(value: np.ndarray) -> np.ndarray:
    """Zeros (empty strings for a string array) of ``value``'s shape and dtype: a restore target."""
    return np.full(value.shape, b"", dtype=object) if value.dtype == object else np.zeros_like(value)


def _strings(n: int, rng: np.random.Generator) -> np.ndarray:
    pool = [b"", b"a", b"\x00mid\x00", b"\xff\xfe not utf-8", "ünïcødé".encode(), b"x" * 300]
    return np.array([pool[i % len(pool)] + str(int(rng.integers(1000))).encode() * (i % 2) for i in range(n)],
                    dtype=object)


def single_values() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(20250101)
    return {
        "rows": rng.standard_normal((8, 6)).astype(np.float32),
        "both": rng.standard_normal((4, 8)).astype(np.float32),
        "rep": rng.integers(-(2**60), 2**60, (5, 3)).astype(np.int64),
        "str": _strings(3, rng),
        "str_sh": _strings(8, rng),
        "b16": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
        "part": rng.standard_normal((8, 8)).astype(np.float32),  # saved as two slices of different layouts
        "plain": rng.standard_normal(3),  # a plain tf.Variable: replicated
        "scalar": np.array(2.5, np.float32),
        # written by TF DTensor's own sharded_save
        "tf_a": rng.standard_normal((8, 12)).astype(np.float32),
        "tf_b": rng.integers(-1000, 1000, (16,)).astype(np.int32),
        "tf_c": rng.standard_normal((4, 6)),
        "tf_d": rng.standard_normal((6, 8)).astype(ml_dtypes.bfloat16),
        "tf_e": _strings(4, rng),
    }


def single_main(out: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 8)
    from tensorflow.experimental import dtensor

    import shardckpt
    from shardckpt import tf as sctf

    h = _tf_helpers()
    U, place, expect, layout = h["U"], h["place"], h["expect"], h["layout"]
    g = single_values()
    checks = Checks(os.path.join(out, "report.json"))
    mesh = dtensor.create_mesh([("x", 2), ("y", 4)], device_type="CPU")  # 8 devices
    # Another mesh on half the devices (ids 0..3 are CPU:4..7), another shape on all 8.
    mesh_p = dtensor.create_mesh([("p", 4)], devices=[f"CPU:{i}" for i in range(4, 8)], device_type="CPU")
    mesh_42 = dtensor.create_mesh([("x", 4), ("y", 2)], device_type="CPU")
    prefix = os.path.join(out, "ours", "ckpt")

    save_specs = {"rows": ["x", U], "both": ["x", "y"], "rep": [U, U], "str": [U], "str_sh": ["y"],
                  "b16": [U, "y"], "plain": [U], "scalar": []}
    names, slices, tensors = [], [], []
    for name, spec in save_specs.items():
        names.append(name)
        slices.append("")
        if name == "plain":
            tensors.append(tf.Variable(g[name]))
        elif name == "both":
            tensors.append(place(g[name], spec, mesh))  # a DTensor, not a variable
        else:
            tensors.append(dtensor.DVariable(place(g[name], spec, mesh)))
    # "part" (8x8) as two pieces: rows 0..4 sharded by rows, rows 4..8 sharded by columns.
    names += ["part", "part"]
    slices += ["8 8 0,4:-", "8 8 4,4:-"]
    tensors += [dtensor.DVariable(place(g["part"][:4], ["x", U], mesh)),
                dtensor.DVariable(place(g["part"][4:], [U, "y"], mesh))]
    all_names = [*save_specs, "part"]

    def save() -> object:
        result = sctf.sharded_save(mesh, prefix, names, slices, tensors)
        assert isinstance(result, shardckpt.SaveResult) and result.num_clients == 1, result
        files = sorted(os.listdir(os.path.dirname(prefix)))
        assert files == ["ckpt.data-00000-of-00001", "ckpt.data-00000-of-00001.crc32c", "ckpt.index"], files
        return result.bytes_written

    checks.run("save", save)

    other_p = {"rows": ["p", U], "both": [U, "p"], "rep": [U, U], "str": [U], "str_sh": ["p"],
               "b16": ["p", U], "part": ["p", U], "plain": [U], "scalar": []}
    other_42 = {"rows": [U, "y"], "both": ["y", "x"], "rep": [U, U], "str": [U], "str_sh": ["x"],
                "b16": ["x", "y"], "part": [U, "x"], "plain": [U], "scalar": []}

    def ours_onto_layouts() -> object:
        out_ = sctf.name_based_restore(mesh_p, prefix, {n: layout(s, mesh_p) for n, s in other_p.items()})
        assert list(out_) == list(other_p)
        return sum(expect(out_[n], g[n], s, mesh_p, n) for n, s in other_p.items())

    checks.run("ours_restore_onto_layouts_of_another_mesh", ours_onto_layouts)

    def ours_into_dvariables() -> object:
        variables = {n: dtensor.DVariable(place(blank(g[n]), s, mesh_42)) for n, s in other_42.items()}
        out_ = sctf.name_based_restore(mesh_42, prefix, variables)
        n_checked = 0
        for n, s in other_42.items():
            n_checked += expect(variables[n], g[n], s, mesh_42, n + " (variable)")
            n_checked += expect(out_[n], g[n], s, mesh_42, n + " (returned)")
        return n_checked

    checks.run("ours_restore_into_dvariables", ours_into_dvariables)

    def ours_same_layouts() -> object:
        targets = {n: place(blank(g[n]), s, mesh) for n, s in save_specs.items()}
        out_ = sctf.name_based_restore(mesh, prefix, targets)
        return sum(expect(out_[n], g[n], s, mesh, n) for n, s in save_specs.items())

    checks.run("ours_restore_same_layouts", ours_same_layouts)

    def ours_slices() -> object:
        got = sctf.sharded_restore(mesh, prefix, ["part", "str_sh", "b16"],
                                   [layout(["x", U], mesh), layout(["y"], mesh), layout([U, "x"], mesh)],
                                   shape_and_slices=["8 8 2,4:-", "8 0,4", "4 8 -:4,4"])
        return (expect(got[0], g["part"][2:6], ["x", U], mesh, "part[2:6]")
                + expect(got[1], g["str_sh"][:4], ["y"], mesh, "str_sh[:4]")
                + expect(got[2], g["b16"][:, 4:], [U, "x"], mesh, "b16[:, 4:]"))

    checks.run("ours_restore_slices", ours_slices)

    tf_readable = [n for n in all_names if n != "str_sh"]  # TF cannot assemble string slices

    def tf_name_based_restore() -> object:
        targets = {n: place(blank(g[n]), other_p[n], mesh_p) for n in tf_readable}
        got = dtensor.name_based_restore(mesh_p, prefix, targets)
        return sum(expect(got[n], g[n], other_p[n], mesh_p, n) for n in tf_readable)

    checks.run("tf_name_based_restore_reads_ours", tf_name_based_restore)

    def tf_load_checkpoint() -> object:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        assert shapes == {n: list(g[n].shape) for n in all_names}, shapes
        dtypes = reader.get_variable_to_dtype_map()
        assert dtypes["str_sh"] == tf.string and dtypes["b16"] == tf.bfloat16, dtypes
        for n in tf_readable:
            got = np.asarray(reader.get_tensor(n), dtype=object if g[n].dtype == object else None)
            assert h["same"](got, g[n]), (n, got, g[n])
        return len(tf_readable)

    checks.run("tf_load_checkpoint_reads_ours", tf_load_checkpoint)

    def wrong_targets() -> object:
        bad_shape = dtensor.DVariable(place(np.zeros((8, 4), np.float32), ["x", U], mesh))
        good = dtensor.DVariable(place(blank(g["rep"]), [U, U], mesh))  # restored first, yet must stay as is
        try:
            sctf.name_based_restore(mesh, prefix, {"rep": good, "rows": bad_shape})
        except shardckpt.ShapeMismatchError as exc:
            shape_message = str(exc)
        else:
            raise AssertionError("restoring (8, 6) into an (8, 4) variable did not fail")
        bad_dtype = dtensor.DVariable(place(np.zeros((8, 6), np.float64), ["x", U], mesh))
        try:
            sctf.name_based_restore(mesh, prefix, {"rows": bad_dtype})
        except shardckpt.DTypeMismatchError as exc:
            dtype_message = str(exc)
        else:
            raise AssertionError("restoring float32 into a float64 variable did not fail")
        untouched = h["components"](bad_shape) + h["components"](bad_dtype) + h["components"](good)
        assert all(not c.any() for c in untouched), "a failed restore changed a variable"
        try:
            sctf.name_based_restore(mesh, prefix, {"rows": tf.zeros((8, 6))})
        except shardckpt.InvalidArgumentError:
            pass
        else:
            raise AssertionError("a plain tf.Tensor target was accepted")
        return [shape_message, dtype_message]

    checks.run("wrong_targets_fail", wrong_targets)

    def async_snapshot() -> object:
        var = dtensor.DVariable(place(g["rows"], ["x", U], mesh))
        future = sctf.name_based_save(mesh, os.path.join(out, "async", "ckpt"), {"rows": var}, blocking=False)
        var.assign(place(blank(g["rows"]), ["x", U], mesh))  # after return: must not reach the file
        future.result(60)
        got = sctf.name_based_restore(mesh, os.path.join(out, "async", "ckpt"), {"rows": layout([U, U], mesh)})
        return expect(got["rows"], g["rows"], [U, U], mesh, "rows")

    checks.run("async_save_snapshots_variables", async_snapshot)

    def permuted_ids() -> object:
        # TF places a device by its id (row-major offset), whatever order the mesh string lists ids in.
        devices = ",".join(f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(4))
        mesh_perm = dtensor.Mesh.from_string(f"|x=2,y=2|3,1,2,0|3,1,2,0|{devices}")
        ours = sctf.to_mesh(mesh_perm)
        assert shardckpt.Mesh.from_string(mesh_perm.to_string()) == ours  # the core parser agrees
        assert all([ours.coords(d)[n] for n in ("x", "y")] == list(mesh_perm.device_location(d)) for d in range(4))
        var = dtensor.DVariable(place(g["both"], ["x", "y"], mesh_perm))
        path = os.path.join(out, "perm", "ckpt")
        sctf.name_based_save(mesh_perm, path, {"both": var})
        assert h["same"](tf.train.load_checkpoint(path).get_tensor("both"), g["both"])
        got = sctf.name_based_restore(mesh_perm, path, {"both": layout(["y", "x"], mesh_perm)})
        return expect(got["both"], g["both"], ["y", "x"], mesh_perm, "both")

    checks.run("mesh_with_permuted_device_ids", permuted_ids)

    # A checkpoint written by TF DTensor itself, restored by shardckpt onto other meshes.
    tf_prefix = os.path.join(out, "theirs", "ckpt")
    tf_specs = {"tf_a": ["x", "y"], "tf_b": ["y"], "tf_c": [U, U], "tf_d": [U, "y"], "tf_e": [U]}

    def tf_sharded_save() -> object:
        variables = [dtensor.DVariable(place(g[n], s, mesh)) for n, s in tf_specs.items()]
        dtensor.sharded_save(mesh, tf_prefix, list(tf_specs), [""] * len(tf_specs), variables)
        return sorted(os.listdir(os.path.dirname(tf_prefix)))

    checks.run("tf_sharded_save", tf_sharded_save)

    def ours_reads_tf() -> object:
        onto_p = {"tf_a": layout([U, "p"], mesh_p), "tf_b": layout(["p"], mesh_p),
                  "tf_c": dtensor.DVariable(place(blank(g["tf_c"]), ["p", U], mesh_p)),
                  "tf_d": dtensor.DVariable(place(blank(g["tf_d"]), [U, "p"], mesh_p)),
                  "tf_e": layout([U], mesh_p)}
        got = sctf.name_based_restore(mesh_p, tf_prefix, onto_p)
        n_checked = 0
        for n, spec in {"tf_a": [U, "p"], "tf_b": ["p"], "tf_c": ["p", U], "tf_d": [U, "p"], "tf_e": [U]}.items():
            n_checked += expect(got[n], g[n], spec, mesh_p, n)
            if not isinstance(onto_p[n], dtensor.Layout):
                n_checked += expect(onto_p[n], g[n], spec, mesh_p, n + " (variable)")
        got42 = sctf.name_based_restore(mesh_42, tf_prefix, {"tf_a": layout(["x", "y"], mesh_42),
                                                             "tf_d": layout(["y", "x"], mesh_42)})
        n_checked += expect(got42["tf_a"], g["tf_a"], ["x", "y"], mesh_42, "tf_a on 4x2")
        n_checked += expect(got42["tf_d"], g["tf_d"], ["y", "x"], mesh_42, "tf_d on 4x2")
        return n_checked

    checks.run("ours_restores_tf_sharded_save", ours_reads_tf)


def multi_values() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(20250202)
    return {
        "w": rng.standard_normal((4, 6)).astype(np.float32),
        "v": rng.standard_normal((4, 4)).astype(np.float32),
        "r": rng.integers(-(2**40), 2**40, (3, 5)).astype(np.int64),
        "s": _strings(3, rng),
        "ss": _strings(4, rng),
        "bf": rng.standard_normal((2, 8)).astype(ml_dtypes.bfloat16),
        "part": rng.standard_normal((8, 4)).astype(np.float32),
    }


def multi_main(out: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tensorflow.experimental import dtensor

    dtensor.initialize_accelerator_system("CPU", num_logical_cpu_devices=2)  # the first TF call
    import tensorflow as tf
    from tensorflow.python.eager import context

    import shardckpt
    from shardckpt import tf as sctf
    from shardckpt.coordination.tf_coordination import TFCoordinator

    rank = int(os.environ["DTENSOR_CLIENT_ID"])
    h = _tf_helpers()
    U, place, expect, layout = h["U"], h["place"], h["expect"], h["layout"]
    g = multi_values()
    checks = Checks(os.path.join(out, f"report-{rank}.json"))
    mesh = dtensor.create_distributed_mesh([("x", 2), ("y", 2)], device_type="CPU")
    mesh_a = dtensor.create_distributed_mesh([("a", 4)], device_type="CPU")
    prefix = os.path.join(out, "ours", "ckpt")

    specs = {"w": ["x", U], "v": ["y", "x"], "r": [U, U], "s": [U], "ss": ["y"], "bf": [U, "y"]}
    names = [*specs, "part", "part"]
    slices = [""] * len(specs) + ["8 4 0,4:-", "8 4 4,4:-"]
    tensors = [dtensor.DVariable(place(g[n], s, mesh)) for n, s in specs.items()]
    tensors += [dtensor.DVariable(place(g["part"][:4], ["x", U], mesh)),
                dtensor.DVariable(place(g["part"][4:], [U, "y"], mesh))]

    def save() -> object:
        coord = sctf.default_coordinator()
        assert isinstance(coord, TFCoordinator) and (coord.rank, coord.size) == (rank, 2), coord
        result = sctf.sharded_save(mesh, prefix, names, slices, tensors, timeout=60)
        assert isinstance(result, shardckpt.SaveResult) and result.num_clients == 2, result
        files = sorted(os.listdir(os.path.dirname(prefix)))
        assert files == ["ckpt.data-00000-of-00002", "ckpt.data-00000-of-00002.crc32c", "ckpt.data-00001-of-00002",
                         "ckpt.data-00001-of-00002.crc32c", "ckpt.index"], files
        return {"bytes": result.bytes_written, "local_devices": list(mesh.local_device_ids())}

    checks.run("save", save)

    onto = {"w": ["a", U], "v": [U, "a"], "r": [U, U], "s": [U], "ss": ["a"], "bf": [U, "a"], "part": ["a", U]}

    def restore_onto_layouts() -> object:
        got = sctf.name_based_restore(mesh_a, prefix, {n: layout(s, mesh_a) for n, s in onto.items()})
        return sum(expect(got[n], g[n], s, mesh_a, n) for n, s in onto.items())

    checks.run("ours_restore_onto_another_mesh", restore_onto_layouts)

    def restore_into_variables() -> object:
        swapped = {"w": [U, "x"], "v": ["x", "y"], "bf": ["x", "y"], "part": ["y", "x"], "s": [U]}
        variables = {n: dtensor.DVariable(place(blank(g[n]), s, mesh)) for n, s in swapped.items()}
        sctf.name_based_restore(mesh, prefix, variables)
        return sum(expect(variables[n], g[n], s, mesh, n) for n, s in swapped.items())

    checks.run("ours_restore_into_dvariables", restore_into_variables)

    def tf_restore() -> object:
        readable = [n for n in onto if n != "ss"]  # TF cannot assemble string slices
        targets = {n: place(blank(g[n]), onto[n], mesh_a) for n in readable}
        got = dtensor.name_based_restore(mesh_a, prefix, targets)
        n_checked = sum(expect(got[n], g[n], onto[n], mesh_a, n) for n in readable)
        if rank == 0:
            reader = tf.train.load_checkpoint(prefix)
            for n in readable:
                value = np.asarray(reader.get_tensor(n), dtype=object if g[n].dtype == object else None)
                assert h["same"](value, g[n]), n
        return n_checked

    checks.run("tf_reads_ours", tf_restore)

    tf_prefix = os.path.join(out, "theirs", "ckpt")

    def ours_reads_tf() -> object:
        dtensor.sharded_save(mesh, tf_prefix, ["w", "v", "r"], ["", "", ""],
                             [dtensor.DVariable(place(g[n], specs[n], mesh)) for n in ("w", "v", "r")])
        got = sctf.name_based_restore(mesh_a, tf_prefix, {n: layout(onto[n], mesh_a) for n in ("w", "v", "r")})
        return sum(expect(got[n], g[n], onto[n], mesh_a, n) for n in ("w", "v", "r"))

    checks.run("ours_restores_tf_sharded_save", ours_reads_tf)

    context.context().wait_at_barrier("test-adapter-tf-bye", 60_000)


# ---------------------------------------------------------------------------------------------------
# The pytest side.
# ---------------------------------------------------------------------------------------------------





_MULTI_SCRIPT = r"""
ip link set lo up || exit 97
for i in 0 1; do
  DTENSOR_CLIENT_ID=$i "$@" &
  pids[$i]=$!
done
for i in 0 1; do
  wait "${pids[$i]}"
  echo "CLIENT-EXIT $i $?"
done
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    for key in ("SHARDCKPT_COORDINATOR", "DTENSOR_JOBS", "DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS"):
        env.pop(key, None)
    return env


def _launch_single(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "single", str(out)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _launch_multi(out: Path) -> subprocess.Popen:
    """Two DTensor clients inside one private network namespace: TF's gRPC servers bind 0.0.0.0."""
    env = dict(_env(), DTENSOR_JOBS="127.0.0.1:23410,127.0.0.1:23411", DTENSOR_JOB_NAME="worker",
               DTENSOR_NUM_CLIENTS="2")
    unshare = [shutil.which("unshare") or "unshare", "-n" if os.geteuid() == 0 else "-rn"]
    return subprocess.Popen([*unshare, "bash", "-c", _MULTI_SCRIPT, "clients", sys.executable, __file__, "multi",
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


class Program:
    """A running TF program: `wait` returns (exit code, output, seconds), killing it after the deadline."""

    def __init__(self, proc: subprocess.Popen, out: Path) -> None:
        self.proc, self.out, self.started = proc, out, time.monotonic()
        self._done: tuple[int, str, float] | None = None

    def wait(self) -> tuple[int, str, float]:
        if self._done is None:
            try:
                output, _ = self.proc.communicate(timeout=max(1.0, TIMEOUT - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                output, _ = self.proc.communicate()
                output += f"\n*** killed after {TIMEOUT} s ***".encode()
            self._done = (self.proc.returncode, output.decode(errors="replace"), time.monotonic() - self.started)
        return self._done

    def report(self, name: str) -> dict[str, Any]:
        code, output, _ = self.wait()
        path = self.out / name
        assert path.exists(), f"no {name} (exit code {code})\n{output[-6000:]}"
        return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory):
    """Both TF programs, started together (each takes most of its time importing TF)."""
    single_out = tmp_path_factory.mktemp("tf-adapter-single")
    multi_out = tmp_path_factory.mktemp("tf-adapter-multi")
    started = {"single": Program(_launch_single(single_out), single_out)}
    if netns_works():
        started["multi"] = Program(_launch_multi(multi_out), multi_out)
    yield started
    for program in started.values():
        program.wait()


def _check(report: dict[str, Any], name: str, output: str) -> Any:
    assert name in report, f"check {name} did not run\n{output[-6000:]}"
    result = report[name]
    assert result["ok"], f"{name} failed:\n{result['error']}"
    return result["info"]


SINGLE_CHECKS = [
    "save",
    "ours_restore_onto_layouts_of_another_mesh",
    "ours_restore_into_dvariables",
    "ours_restore_same_layouts",
    "ours_restore_slices",
    "tf_name_based_restore_reads_ours",
    "tf_load_checkpoint_reads_ours",
    "wrong_targets_fail",
    "async_save_snapshots_variables",
    "mesh_with_permuted_device_ids",
    "tf_sharded_save",
    "ours_restores_tf_sharded_save",
]


@pytest.mark.parametrize("check", SINGLE_CHECKS)
def test_single_client(programs, check):
    program = programs["single"]
    info = _check(program.report("report.json"), check, program.wait()[1])
    if check.startswith(("ours_", "tf_name", "tf_load", "async", "mesh_")):
        assert isinstance(info, int) and info > 0, info  # some components (or tensors) were compared


def test_single_client_program_exits_cleanly(programs):
    code, output, _ = programs["single"].wait()
    assert code == 0, output[-6000:]


MULTI_CHECKS = ["save", "ours_restore_onto_another_mesh", "ours_restore_into_dvariables", "tf_reads_ours",
                "ours_restores_tf_sharded_save"]


def _multi(programs) -> Program:
    assert "multi" in programs, "could not make a private network namespace (unshare -n, ip) for TF's gRPC servers"
    return programs["multi"]


@pytest.mark.parametrize("check", MULTI_CHECKS)
def test_two_clients(programs, check):
    program = _multi(programs)
    output = program.wait()[1]
    infos = [_check(program.report(f"report-{rank}.json"), check, output) for rank in (0, 1)]
    if check == "save":
        assert [i["local_devices"] for i in infos] == [[0, 1], [2, 3]], infos
    else:
        assert all(isinstance(i, int) and i > 0 for i in infos), infos


def test_two_clients_exit_cleanly(programs):
    program = _multi(programs)
    code, output, _ = program.wait()
    exits = sorted(line.split()[1:] for line in output.splitlines() if line.startswith("CLIENT-EXIT "))
    assert code == 0 and exits == [["0", "0"], ["1", "0"]], output[-6000:]


if __name__ == "__main__":
    scenario, directory = sys.argv[1], sys.argv[2]
    {"single": single_main, "multi": multi_main}[scenario](directory)
