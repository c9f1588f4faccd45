"""The CRC32C function every checksum goes through (`coding.crc32c`): the ``crc32c`` package, or the optional
``crc32c-rs`` when installed (AVX-512 folding, ~2.5x faster on cache-hot bytes).  Whichever is used must give
the same CRC as ``crc32c`` for every buffer shape the readers and writers pass, and a flipped byte must be caught
through it; ``SHARDCKPT_CRC32C=crc32c`` must keep the ``crc32c`` package.
"""

from __future__ import annotations

import os
import subprocess
import sys

import crc32c as icrar
import numpy as np
import pytest

import shardckpt as sc
from shardckpt.format import BundleReader, coding
from shardckpt.format.files import data_filename

try:
    import crc32c_rs
except ImportError:
    crc32c_rs = None

BACKENDS = [pytest.param(icrar.crc32c, id="crc32c")]
if crc32c_rs is not None:
    BACKENDS.append(pytest.param(crc32c_rs.crc32c, id="crc32c-rs"))
BACKENDS.append(pytest.param(coding._crc, id="selected"))


@pytest.mark.parametrize("fn", BACKENDS)
def test_every_backend_agrees_with_crc32c_on_every_buffer_shape(fn):
    rng = np.random.default_rng(5)
    for size in (0, 1, 7, 63, 64, 65, 255, 4096, 4097, 65536 + 3, (1 << 20) + 17):
        data = rng.integers(0, 256, size, np.uint8)
        want = icrar.crc32c(data.tobytes())
        assert fn(data) == want and fn(memoryview(data)) == want and fn(bytearray(data)) == want
        cut = size // 3
        assert fn(memoryview(data)[cut:], fn(data[:cut])) == want  # extending a running CRC
        assert fn(data.view(np.uint8)[cut:], icrar.crc32c(data[:cut].tobytes())) == want


@pytest.mark.parametrize("fn", BACKENDS)
def test_a_flip_inside_a_piece_is_caught_through_every_backend(fn, tmp_path, monkeypatch):
    monkeypatch.setattr(coding, "_crc", fn)
    mesh22 = sc.create_mesh([("x", 2), ("y", 2)], local_device_ids=[0, 1, 2, 3])
    kernel = np.random.default_rng(6).standard_normal((2048, 2048)).astype(np.float32)
    prefix = str(tmp_path / "ckpt")
    sc.sharded_save(mesh22, prefix, ["k"], [""], [sc.DTensor.from_global(kernel, sc.Layout(["x", "y"], mesh22),
                                                                         [0, 1, 2, 3])])
    with BundleReader(prefix) as r:
        piece = r.stored_slices("k")[0]
        path = data_filename(r.prefix, piece.entry.shard_id, r.header.num_shards)
    with open(path, "r+b") as f:
        f.seek(piece.entry.offset + (1 << 20) + 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    mesh41 = sc.create_mesh([("x", 4), ("y", 1)], local_device_ids=[0, 1, 2, 3])
    with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
        sc.sharded_restore(mesh41, prefix, ["k"], [sc.Layout(["x", sc.UNSHARDED], mesh41)])
    got = sc.sharded_restore(mesh41, prefix, ["k"], [sc.Layout(["x", sc.UNSHARDED], mesh41)], verify=False)
    assert not np.array_equal(got[0].to_numpy(), kernel)  # the flip was there to be caught


def _backend_in_subprocess(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("SHARDCKPT_CRC32C", None)
    if env_value is not None:
        env["SHARDCKPT_CRC32C"] = env_value
    out = subprocess.run([sys.executable, "-c", "from shardckpt.format import coding; print(coding.CRC32C_BACKEND)"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    return out.stdout.strip()


def test_the_environment_can_keep_the_crc32c_package():
    assert _backend_in_subprocess("crc32c") == "crc32c"


@pytest.mark.skipif(crc32c_rs is None, reason="crc32c-rs is not installed")
def test_crc32c_rs_is_used_when_installed():
    assert _backend_in_subprocess(None).startswith("crc32c-rs")
