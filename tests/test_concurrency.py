"""Concurrent saves and a reader racing a writer: nobody sees a partial or mixed checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np

import shardckpt as sc

HERE = os.path.dirname(__file__)
MESH = sc.create_mesh([("x", 2), ("y", 2)])


def _save(prefix: str, version: int, overwrite: bool = False) -> None:
    a = np.full((64, 32), version, np.float32)
    b = np.full((33, 8), version, np.int64)
    c = np.full((16,), version, np.float64)

    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        ta = sc.DTensor.from_global(a, sc.Layout(["x", "y"], MESH), local)
        tb = sc.DTensor.from_global(b, sc.Layout(["y", sc.UNSHARDED], MESH), local)
        sc.sharded_save(MESH, prefix, ["a", "b", "c"], ["", "", ""], [ta, tb, c], coordinator=coord,
                        overwrite=overwrite, timeout=30)

    sc.LocalGroup(4).run(client)


def _version(prefix: str) -> int:
    reader = sc.load_checkpoint(prefix)
    values = {int(np.unique(reader.get_tensor(n))[0]) for n in ("a", "b", "c")}
    assert len(values) == 1
    return values.pop()


def test_two_groups_save_different_prefixes_of_one_directory(tmp_path):
    errors = []

    def group(name, version):
        try:
            for i in range(3):
                _save(str(tmp_path / f"{name}-{i}"), version + i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=group, args=("p", 10)), threading.Thread(target=group, args=("q", 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(3):
        assert _version(str(tmp_path / f"p-{i}")) == 10 + i
        assert _version(str(tmp_path / f"q-{i}")) == 20 + i
    assert not [n for n in os.listdir(tmp_path) if ".staging-" in n or ".tempstate" in n]


def test_reader_racing_ten_overwrites_never_sees_mixed_data(tmp_path):
    prefix = str(tmp_path / "latest")
    _save(prefix, 0)
    out = str(tmp_path / "seen.json")
    reader = subprocess.Popen([sys.executable, os.path.join(HERE, "reader_loop.py"), prefix, "8", out])
    try:
        for version in range(1, 11):
            _save(prefix, version, overwrite=True)
            _save(str(tmp_path / f"ckpt-{version}"), version)
    finally:
        assert reader.wait(timeout=60) == 0
    seen = json.load(open(out))
    assert seen["mixed"] == 0 and not seen["errors"], seen
    assert seen["complete"] > 0
    assert seen["versions"] == sorted(seen["versions"])  # never goes back to an older version
    assert _version(prefix) == 10
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("latest")) == sorted(
        [f"latest.data-{r:05d}-of-00004{side}" for r in range(4) for side in ("", ".crc32c")] + ["latest.index"])
