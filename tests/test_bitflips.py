"""Every byte of a small sharded checkpoint flipped in turn: each read raises a CheckpointError naming the file
it found bad, or returns exactly the original values (a flip in a byte nothing reads)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import shardckpt as sc

MESH = sc.create_mesh([("x", 2)])
MODEL = {
    "kernel": np.arange(48, dtype=np.float32).reshape(8, 6),
    "ids": np.arange(5, dtype=np.int64),
    "names": np.array([b"alpha", b"", b"\x00\xff"], dtype=object),
    "half": np.linspace(-1, 1, 6).astype(np.float16),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("flip")
    prefix = str(d / "ckpt")

    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        kernel = sc.DTensor.from_global(MODEL["kernel"], sc.Layout(["x", sc.UNSHARDED], MESH), local)
        values = [kernel, MODEL["ids"], MODEL["names"], MODEL["half"]]
        sc.sharded_save(MESH, prefix, list(MODEL), [""] * 4, values, coordinator=coord)

    sc.LocalGroup(2).run(client)
    return prefix


def _read_all(prefix):
    with sc.load_checkpoint(prefix) as reader:
        assert sorted(reader.get_variable_to_shape_map()) == sorted(MODEL)
        return {name: reader.get_tensor(name) for name in MODEL}


def test_every_byte_flipped(checkpoint, tmp_path, capsys):
    src_dir, base = os.path.split(checkpoint)
    names = sorted(n for n in os.listdir(src_dir) if n.startswith(base))
    counts = {}
    for name in names:
        original = open(os.path.join(src_dir, name), "rb").read()
        detected = harmless = 0
        for pos in range(len(original)):
            work = tmp_path / f"f{pos % 2}"
            if work.exists():
                shutil.rmtree(work)
            work.mkdir()
            for other in names:
                shutil.copyfile(os.path.join(src_dir, other), work / other)
            flipped = bytearray(original)
            flipped[pos] ^= 0x5A
            (work / name).write_bytes(bytes(flipped))
            try:
                got = _read_all(str(work / base))
            except sc.CheckpointError as exc:
                assert name in str(exc), f"byte {pos} of {name}: error does not name the file: {exc}"
                detected += 1
                continue
            for key, want in MODEL.items():
                assert got[key].dtype == want.dtype and np.array_equal(got[key], want), (
                    f"byte {pos} of {name} flipped: {key} read back wrong and undetected"
                )
            harmless += 1
        counts[name] = (len(original), detected, harmless)
    with capsys.disabled():
        for name, (size, detected, harmless) in counts.items():
            print(f"\n  {name}: {size} bytes flipped: {detected} detected, {harmless} harmless (unused bytes)")
    index = counts[base + ".index"]
    assert index[1] >= index[0] - 40  # only footer padding is unused in an index
    for name, (size, detected, harmless) in counts.items():
        if name.endswith(".crc32c"):
            assert harmless == size  # whole reads do not use the sidecar (tests/test_chunk_checksums.py does)
        elif ".data-" in name:
            assert detected == size  # every data byte belongs to a checksummed tensor
