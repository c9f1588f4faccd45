"""A checkpoint travels torch -> JAX -> TensorFlow -> torch, sharded differently at each stop, bfloat16 included.

Each framework runs in its own process (as in real use); values are compared bit for bit with the numpy
originals at every stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

import shardckpt as sc

MODEL = '''
import numpy as np, ml_dtypes
W = (np.arange(8 * 8, dtype=np.float32).reshape(8, 8) / 7).astype(ml_dtypes.bfloat16)
B = np.linspace(-1, 1, 6).astype(np.float32)
STEP = np.array(12, np.int64)
'''


def _run(code: str, env_extra: dict[str, str] | None = None) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MODEL) + textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_to_jax_to_tensorflow_and_back(tmp_path):
    p_torch, p_jax, p_tf = (str(tmp_path / n) for n in ("from_torch", "from_jax", "from_tf"))
    _run(f'''
        import torch, shardckpt.torch as sct
        state = {{"w": torch.from_numpy(W.view(np.int16)).view(torch.bfloat16), "b": torch.from_numpy(B),
                 "step": int(STEP)}}
        sct.save(state, {p_torch!r})
    ''')
    _run(f'''
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import shardckpt.jax as scj
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
        target = {{"w": jax.ShapeDtypeStruct((8, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", "y"))),
                  "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P("y"))),
                  "step": jax.ShapeDtypeStruct((), jnp.int64, sharding=NamedSharding(mesh, P()))}}
        got = scj.restore({p_torch!r}, target)
        assert np.asarray(got["w"]).view(np.uint16).tolist() == W.view(np.uint16).tolist()
        assert np.array_equal(np.asarray(got["b"]), B) and int(got["step"]) == int(STEP)
        scj.save(got, {p_jax!r})
    ''', {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_ENABLE_X64": "1"})
    _run(f'''
        import tensorflow as tf
        tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                                   [tf.config.LogicalDeviceConfiguration()] * 4)
        from tensorflow.experimental import dtensor
        import shardckpt.tf as sctf
        mesh = dtensor.create_mesh([("a", 4)], device_type="CPU")
        rep = lambda rank: dtensor.Layout.replicated(mesh, rank)
        got = sctf.name_based_restore(mesh, {p_jax!r}, {{"w": dtensor.Layout(["unsharded", "a"], mesh),
                                                        "b": rep(1), "step": rep(0)}})
        w = dtensor.relayout(got["w"], rep(2))
        assert np.asarray(dtensor.unpack(w)[0].numpy()).view(np.uint16).tolist() == W.view(np.uint16).tolist()
        sctf.sharded_save(mesh, {p_tf!r}, ["w", "b", "step"], ["", "", ""], [got["w"], got["b"], got["step"]])
        # TensorFlow's own reader agrees
        r = tf.train.load_checkpoint({p_tf!r})
        assert np.asarray(r.get_tensor("b")).tolist() == B.tolist()
    ''')
    _run(f'''
        import torch, shardckpt.torch as sct
        state = {{"w": torch.zeros(8, 8, dtype=torch.bfloat16), "b": torch.zeros(6), "step": 0}}
        sct.load(state, {p_tf!r})
        assert state["w"].view(torch.int16).numpy().view(np.uint16).tolist() == W.view(np.uint16).tolist()
        assert state["b"].numpy().tolist() == B.tolist() and state["step"] == int(STEP)
    ''')
    # and the numpy reader sees the same bytes at every stop
    for prefix in (p_torch, p_jax, p_tf):
        reader = sc.load_checkpoint(prefix)
        assert reader.get_tensor("w").view(np.uint16).tolist() == (
            (np.arange(64, dtype=np.float32).reshape(8, 8) / 7).astype(reader.get_tensor("w").dtype)
        ).view(np.uint16).tolist()
