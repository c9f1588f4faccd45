"""Runs of small arrays on one client (`smallruns`, `format.runs`): the same files as the general path."""

from __future__ import annotations

import os
import random

import ml_dtypes
import numpy as np
import pytest

import shardckpt as sc
from shardckpt import faults, smallruns
from shardckpt.coordination import SingleClient
from shardckpt.format.coding import crc32c, encode_varint, mask_crc
from shardckpt.format.dtypes import from_numpy
from shardckpt.format.protos import BundleEntry, pack_entries
from shardckpt.format.runs import TensorRun, _varints


def _arguments() -> tuple[list[str], list[str], list[object]]:
    """Names, slices and values over many dtypes and shapes: runs broken by arrays the general path takes."""
    rng = np.random.default_rng(11)
    names: list[str] = []
    slices: list[str] = []
    values: list[object] = []

    def add(name: str, value: object, spec: str = "") -> None:
        names.append(name)
        slices.append(spec)
        values.append(value)

    kinds = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
             np.uint32, np.uint64, np.complex64, np.complex128, bool, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
             ml_dtypes.int4]
    for i in range(3000):
        kind = kinds[i % len(kinds)]
        shape = [(), (0,), (1,), (7,), (2, 3), (0, 4), (3, 1, 2), (300,)][i % 8]
        value = np.asarray(np.clip(rng.standard_normal(shape) * 50, -7, 7) if kind is ml_dtypes.int4
                           else rng.standard_normal(shape) * 50)
        add(f"run/{i}", np.asarray((value > 0) if kind is bool else value.astype(kind)))
        if i % 500 == 499:  # what breaks a run: each of these goes the general way
            add(f"str/{i}", np.array([b"a", b"", b"xyz" * i], dtype=object))
            add(f"big-endian/{i}", np.arange(5, dtype=">i4"))
            add(f"strided/{i}", np.arange(40, dtype=np.int16)[::3])
            add(f"large/{i}", rng.standard_normal(20_000))  # 160 KB: over `SMALL_BYTES`
            add(f"scalar/{i}", float(i))  # not an array
            add(f"slice/{i}", np.arange(6, dtype=np.float32).reshape(2, 3), "4 3 2,2:-")
            add(f"slice/{i}", np.arange(3, dtype=np.float32).reshape(1, 3), "4 3 0,1:-")
    for i in range(40):  # long and non-ASCII names: keys over 127 bytes, varint lengths of two bytes
        add(f"ünïcode/{'long' * 40}/{i}", np.full(3, i, np.int32))
    for i in range(9000):  # 4 KiB each, 36 MB: runs cut at `RUN_BYTES`; offsets of 4-byte varints
        add(f"filler/{i}", np.full(1024, i, np.float32))
    return names, slices, values


def _files(directory) -> dict[str, bytes]:
    return {f: (directory / f).read_bytes() for f in sorted(os.listdir(directory))}


def _save(prefix, names, slices, values, **kwargs):
    mesh = sc.create_mesh([("x", 1)])
    return sc.sharded_save(mesh, str(prefix), names, slices, values, coordinator=SingleClient(), **kwargs)


def test_runs_write_byte_identical_files_to_the_general_path(tmp_path, monkeypatch):
    names, slices, values = _arguments()
    packed = []
    pack = TensorRun.pack
    monkeypatch.setattr(TensorRun, "pack", lambda self, shard: packed.append(len(self)) or pack(self, shard))
    (tmp_path / "fast").mkdir()
    _save(tmp_path / "fast" / "ckpt", names, slices, values)
    monkeypatch.undo()
    assert len(packed) > 10 and sum(packed) > 10_000, packed  # the runs were taken, several of them
    monkeypatch.setattr(smallruns, "MIN_RUN", 1 << 62)  # no run is ever long enough: the general path
    (tmp_path / "general").mkdir()
    _save(tmp_path / "general" / "ckpt", names, slices, values)
    monkeypatch.undo()
    (tmp_path / "async").mkdir()  # a snapshotting save never makes runs
    _save(tmp_path / "async" / "ckpt", names, slices, values, blocking=False).result()
    fast = _files(tmp_path / "fast")
    assert fast.keys() == {"ckpt.index", "ckpt.data-00000-of-00001", "ckpt.data-00000-of-00001.crc32c"}
    assert fast == _files(tmp_path / "general") == _files(tmp_path / "async")
    got = sc.load_checkpoint(tmp_path / "fast" / "ckpt")
    for name, value in zip(names, values):
        if not name.startswith(("slice/", "str/")):
            np.testing.assert_array_equal(got.get_tensor(name), np.asarray(value), err_msg=name)


@pytest.mark.parametrize("shard_id", [0, 1, 300])
@pytest.mark.parametrize("offset", [0, 1, 1 << 14, 1 << 21, 1 << 28, 1 << 40, (1 << 63) - 4096])
def test_a_run_packs_the_entries_pack_entries_spells(offset, shard_id):
    rng = random.Random(offset ^ shard_id)
    arrays = [np.full(rng.choice([(), (0,), (1,), (5, 2), (40,), (129, 1)]), rng.random(),
                      rng.choice([np.float32, np.int8, np.complex128, bool])) for _ in range(200)]
    names = [rng.choice(["a", "é" * 70, "x/" * 90]) + str(i) for i in range(len(arrays))]
    codes = [int(from_numpy(a.dtype)) for a in arrays]
    run = TensorRun(names, codes, arrays)
    data = run.join()
    assert data == b"".join(a.tobytes() for a in arrays)
    run.offset = offset
    entries = []
    at = offset
    for name, code, a in zip(names, codes, arrays):
        entry = BundleEntry(dtype=code, shape=a.shape, shard_id=shard_id, offset=at, size=a.nbytes,
                            crc32c=mask_crc(crc32c(a.tobytes())))
        entries.append((name.encode(), entry))
        at += a.nbytes
    assert run.pack(shard_id) == pack_entries(entries)


def test_varints_in_bulk_match_the_general_encoder():
    rng = random.Random(3)
    values = [0, 1, 127, 128, 16383, 16384, (1 << 63) - 1, (1 << 64) - 1]
    values += [rng.getrandbits(rng.randint(1, 64)) for _ in range(2000)]
    body, lens = _varints(np.array(values, np.uint64))
    for v, row, n in zip(values, body, lens):
        assert row[:n].tobytes() == encode_varint(v), v


def test_a_run_member_and_a_slice_of_the_same_name_are_refused(tmp_path):
    names = [f"t{i}" for i in range(40)] + ["t3"]
    values = [np.zeros(4, np.float32)] * 40 + [np.zeros((1, 4), np.float32)]
    with pytest.raises(sc.DuplicateTensorError, match="t3"):
        _save(tmp_path / "d", names, [""] * 40 + ["2 4 0,1:-"], values)
    assert [f for f in os.listdir(tmp_path) if "data" in f or "index" in f] == []


def test_a_save_of_runs_that_fails_mid_write_publishes_nothing_and_the_next_one_succeeds(tmp_path):
    names = [f"t{i}" for i in range(2000)]
    values = [np.full(8, i, np.float32) for i in range(2000)]

    def fail(point: str, client: int) -> None:
        if point == "mid_data_write":
            raise faults.InjectedFault(point)

    with faults.hook(fail), pytest.raises(faults.InjectedFault):
        _save(tmp_path / "f", names, [""] * len(names), values)
    assert not (tmp_path / "f.index").exists()
    assert [f for f in os.listdir(tmp_path) if "staging" in f] == []
    _save(tmp_path / "f", names, [""] * len(names), values)
    np.testing.assert_array_equal(sc.load_checkpoint(tmp_path / "f").get_tensor("t1999"), values[1999])
