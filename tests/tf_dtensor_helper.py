"""Writes DTensor checkpoints with real TensorFlow; run as a script by tests/test_tf_interop.py.

TensorFlow's logical CPU devices can only be configured once per process, before
any other TensorFlow use, so this runs in a fresh interpreter:

    python tests/tf_dtensor_helper.py OUTDIR

It splits the host CPU into 8 logical devices and writes, under OUTDIR:

- ``mesh4/ckpt``: ``tf.experimental.dtensor.sharded_save`` on a 2x2 mesh (devices 0-3)
  of tensors with sharded, partly sharded and replicated layouts;
- ``mesh8/ckpt``: ``sharded_save`` on a 2x4 mesh (all 8 devices) where only some
  devices own a distinct slice, so the merge skips the devices that wrote nothing;
- ``tckpt/``: a ``tf.train.Checkpoint`` of DVariables on the 2x2 mesh;
- ``expected.npz`` (global values, keyed ``<case>/<name>``) and ``layouts.json``
  (``{case: {"mesh": [[dim, size], ...], "tensors": [[name, spec], ...], "prefix": ...}}``,
  tensors in SaveV2 argument order; a spec lists a mesh dim name or "unsharded" per tensor dim).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 8)

import ml_dtypes  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

U = dtensor.UNSHARDED


def _place(value: np.ndarray, spec: list[str], mesh: dtensor.Mesh) -> tf.Tensor:
    replicated = dtensor.copy_to_mesh(tf.constant(value), dtensor.Layout.replicated(mesh, value.ndim))
    if all(s == U for s in spec):
        return replicated
    return dtensor.relayout(replicated, dtensor.Layout(spec, mesh))


def _check_layout(t: tf.Tensor, spec: list[str]) -> None:
    got = dtensor.fetch_layout(t).sharding_specs
    assert list(got) == list(spec), (got, spec)


def main(out: str) -> None:
    rng = np.random.default_rng(7)
    mesh4 = dtensor.create_mesh([("x", 2), ("y", 2)], devices=[f"CPU:{i}" for i in range(4)], device_type="CPU")
    mesh8 = dtensor.create_mesh([("x", 2), ("y", 4)], device_type="CPU")
    expected: dict[str, np.ndarray] = {}
    layouts: dict[str, dict] = {}

    cases = {
        "mesh4": (
            mesh4,
            [("x", 2), ("y", 2)],
            [
                ("both", rng.standard_normal((4, 6)).astype(np.float32), ["x", "y"]),
                ("rows", rng.integers(-(2**62), 2**62, (4, 2)).astype(np.int64), ["x", U]),
                ("cols", rng.standard_normal((2, 6)), [U, "y"]),
                ("replicated", rng.integers(-100, 100, (2, 3)).astype(np.int32), [U, U]),
                ("yx3d", rng.standard_normal((4, 2, 6)).astype(np.float32), ["y", U, "x"]),
                ("scalar", np.array(3.5, np.float32), []),
                ("bf16", rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16), [U, "x"]),
                ("vec/ünï", np.arange(8, dtype=np.int32), ["y"]),
            ],
        ),
        "mesh8": (
            mesh8,
            [("x", 2), ("y", 4)],
            [
                ("rows8", rng.standard_normal((8, 3)).astype(np.float32), ["x", U]),
                ("rep8", np.array([1.0, -2.0], np.float64), [U]),
            ],
        ),
    }
    for case, (mesh, dims, tensors) in cases.items():
        prefix = os.path.join(out, case, "ckpt")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        names, values = [], []
        for name, value, spec in tensors:
            t = _place(value, spec, mesh)
            _check_layout(t, spec)
            names.append(name)
            values.append(t)
            expected[f"{case}/{name}"] = value
        dtensor.sharded_save(mesh, prefix, names, [""] * len(names), values)
        layouts[case] = {
            "mesh": [list(d) for d in dims],
            "tensors": [[name, list(spec)] for name, _, spec in tensors],
            "prefix": prefix,
        }

    # tf.train.Checkpoint of DVariables on the 2x2 mesh.
    a = rng.standard_normal((4, 4)).astype(np.float32)
    b = np.arange(4, dtype=np.int64)
    ckpt = tf.train.Checkpoint(
        a=dtensor.DVariable(_place(a, ["x", "y"], mesh4)),
        b=dtensor.DVariable(_place(b, [U], mesh4)),
    )
    path = ckpt.save(os.path.join(out, "tckpt", "ckpt"))
    expected["tckpt/a/.ATTRIBUTES/VARIABLE_VALUE"] = a
    expected["tckpt/b/.ATTRIBUTES/VARIABLE_VALUE"] = b
    layouts["tckpt"] = {"prefix": path}

    # ml_dtypes arrays do not survive np.savez portably: store raw bytes + dtype names.
    np.savez(
        os.path.join(out, "expected.npz"),
        **{k: np.frombuffer(v.tobytes(), np.uint8) for k, v in expected.items()},
    )
    meta = {k: [str(v.dtype), list(v.shape)] for k, v in expected.items()}
    with open(os.path.join(out, "layouts.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": layouts, "arrays": meta}, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])
