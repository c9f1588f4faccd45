"""Object storage: checkpoints on a real S3-protocol server (moto, on loopback) through fsspec/s3fs,
with injected faults that are retried or fail cleanly, never leaving a committed broken checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import shardckpt as sc

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from s3_server import S3Server  # noqa: E402

MESH = sc.create_mesh([("x", 2), ("y", 2)])
RNG = np.random.default_rng(5)
W = RNG.standard_normal((512, 256)).astype(np.float32)
U = RNG.standard_normal((33, 7)).astype(np.float64)
R = np.arange(100, dtype=np.int32)


@pytest.fixture(scope="module")
def s3():
    import fsspec

    server = S3Server().start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ENDPOINT_URL": server.endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["use_listings_cache"] = False
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("ckpts")
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _save(prefix, **kwargs):
    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        w = sc.DTensor.from_global(W, sc.Layout(["x", "y"], MESH), local)
        u = sc.DTensor.from_global(U, sc.Layout(["y", sc.UNSHARDED], MESH), local)
        return sc.sharded_save(MESH, prefix, ["w", "u", "r"], ["", "", ""], [w, u, R], coordinator=coord,
                               timeout=60, **kwargs)

    return sc.LocalGroup(4).run(client)


def _check(prefix):
    reader = sc.load_checkpoint(prefix)
    np.testing.assert_array_equal(reader.get_tensor("w"), W)
    np.testing.assert_array_equal(reader.get_tensor("u"), U)
    np.testing.assert_array_equal(reader.get_tensor("r"), R)


def _objects(prefix):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    base = prefix.split("://", 1)[1]
    return sorted(p.rsplit("/", 1)[1] for p in fs.ls(base.rsplit("/", 1)[0], detail=False)
                  if p.rsplit("/", 1)[1].startswith(base.rsplit("/", 1)[1] + "."))


def test_multi_client_save_and_resharding_restore(s3):
    prefix = "s3://ckpts/model"
    _save(prefix)
    assert _objects(prefix) == sorted([f"model.data-{r:05d}-of-00004{side}" for r in range(4)
                                       for side in ("", ".crc32c")] + ["model.index"])
    _check(prefix)
    target = sc.create_mesh([("a", 3)])

    def client(coord):
        return sc.sharded_restore(target, prefix, ["w", "u"], [sc.Layout([sc.UNSHARDED, "a"], target),
                                                               sc.Layout(["a", sc.UNSHARDED], target)],
                                  coordinator=coord)

    for restored in sc.LocalGroup(3).run(client):
        for t, g in zip(restored, (W, U)):
            for d, shard in t.shards.items():
                np.testing.assert_array_equal(shard, g[tuple(slice(a, b) for a, b in t.bounds(d))])


def test_ranged_reads_fetch_only_what_a_shard_needs(s3):
    prefix = "s3://ckpts/ranged"
    _save(prefix)
    s3.faults.log.clear()
    mesh = sc.create_mesh([("a", 1)], local_device_ids=[0])
    sc.sharded_restore(mesh, prefix, ["w"], [sc.Layout.replicated(mesh, 2)], shape_and_slices=["512 256 0,8:0,8"])
    gets = [line for line in s3.faults.log if line.startswith("GET /ckpts/ranged.data")]
    sidecar = [line for line in gets if ".crc32c" in line]
    assert len(gets) - len(sidecar) == 1  # one stored block touched, one ranged GET
    assert len(sidecar) == 1  # the chunk checksums that check it, in one GET


def test_faults_are_retried_and_the_checkpoint_is_correct(s3):
    prefix = "s3://ckpts/faulty"
    s3.faults.add("PUT", r"faulty\.data-00001", 503, 2)
    s3.faults.add("PUT", r"faulty\.index", 500, 1)
    s3.faults.add("GET", r"faulty\.data-00002", 0, 2)  # broken connections on reads
    s3.faults.add("GET", r"faulty\.index", 500, 2)
    try:
        _save(prefix)
        _check(prefix)
    finally:
        rules = list(s3.faults.rules)
        s3.faults.clear()
    assert all(r.seen > 0 for r in rules), [(r.path, r.seen) for r in rules]


def test_persistent_failure_fails_every_client_and_commits_nothing(s3):
    prefix = "s3://ckpts/broken"
    s3.faults.add("PUT", r"broken\.index", 500, 1000)
    try:
        with pytest.raises(sc.CheckpointError):
            _save(prefix)
    finally:
        s3.faults.clear()
    assert "broken.index" not in _objects(prefix)
    with pytest.raises(sc.CheckpointNotFoundError):
        sc.load_checkpoint(prefix)
    _save(prefix)  # the next save cleans up and succeeds
    _check(prefix)


def test_overwrite_replaces_and_another_client_count_leaves_no_stale_objects(s3):
    prefix = "s3://ckpts/over"
    _save(prefix)
    with pytest.raises(sc.CheckpointExistsError):
        _save(prefix)
    mesh = sc.create_mesh([("x", 2)])

    def client(coord):
        return sc.sharded_save(mesh, prefix, ["r"], [""], [R * 2], coordinator=coord, overwrite=True)

    sc.LocalGroup(2).run(client)
    assert _objects(prefix) == ["over.data-00000-of-00002", "over.data-00000-of-00002.crc32c",
                                "over.data-00001-of-00002", "over.data-00001-of-00002.crc32c", "over.index"]
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("r"), R * 2)


def test_four_processes_save_to_s3(s3, tmp_path):
    prefix = "s3://ckpts/procs"
    result = subprocess.run([sys.executable, "-m", "shardckpt", "launch", "-n", "4",
                             os.path.join(HERE, "launch_worker.py"), "save", prefix],
                            capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("w"), np.arange(96).reshape(12, 8))


def test_large_data_files_go_up_as_parallel_multipart_uploads(s3):
    from shardckpt import storage

    prefix = "s3://ckpts/big"
    big = np.arange(6 * (1 << 20), dtype=np.float32)  # 24 MiB in one client's file: 5 parts of 5 MiB
    s3.faults.log.clear()
    s3.faults.add("PUT", r"big\.data-00000.*partNumber=2", 503, 1)  # a failed part is retried
    original = storage.open_stream
    storage.open_stream = lambda path, part_size=5 << 20, concurrency=3: original(path, part_size, concurrency)
    try:
        sc.sharded_save(sc.create_mesh([("x", 1)]), prefix, ["big"], [""], [big])
    finally:
        storage.open_stream = original
        s3.faults.clear()
    parts = [line for line in s3.faults.log if "partNumber=" in line and "big.data" in line]
    assert len({line.split("partNumber=")[1].split("&")[0] for line in parts}) == 5
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("big"), big)
