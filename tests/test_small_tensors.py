"""The fast paths for many small tensors: same bytes, same checks, no shared memory, few system calls."""

from __future__ import annotations

import os
import random

import ml_dtypes
import numpy as np
import pytest

import shardckpt as sc
from shardckpt import storage
from shardckpt.coordination import SingleClient
from shardckpt.format.coding import encode_varint
from shardckpt.format.protos import (
    BundleEntry,
    BundleHeader,
    _decode_entry_general,
    _varint,
    decode_entry,
    encode_entry,
)
from shardckpt.format.reader import BundleReader
from shardckpt.format.slices import TensorSlice
from shardckpt.format.table import TableBuilder
from shardckpt.format.writer import build_index


def _entries(rng: random.Random, n: int) -> list[BundleEntry]:
    out = []
    for _ in range(n):
        out.append(BundleEntry(
            rng.choice([0, 1, 3, 14, 19, 200]),
            tuple(rng.choice([0, 1, 5, 300, 1 << 40]) for _ in range(rng.randint(0, 4))),
            rng.choice([0, 1, 300, (1 << 31) - 1]),
            rng.choice([0, 5, 1 << 20, 1 << 45, 1 << 56, (1 << 63) - 1]),
            rng.choice([0, 64, 1 << 33, (1 << 63) - 1]),
            rng.choice([0, 1, 0xFFFFFFFF]),
            [TensorSlice(((0, 2),))] if rng.random() < 0.1 else []))
    return out


def _outcome(fn, buf: bytes):
    try:
        return fn(buf)
    except sc.CorruptCheckpointError:
        return "refused"


def test_fast_entry_decoder_agrees_with_the_general_one_on_valid_and_damaged_entries():
    rng = random.Random(7)
    for e in _entries(rng, 5000):
        buf = encode_entry(e)
        assert decode_entry(buf) == _decode_entry_general(buf) == e
        for _ in range(4):
            bad = bytearray(buf)
            if bad and rng.random() < 0.5:
                bad[rng.randrange(len(bad))] = rng.randrange(256)
            else:
                del bad[rng.randrange(len(bad) + 1):]
            assert _outcome(decode_entry, bytes(bad)) == _outcome(_decode_entry_general, bytes(bad))


def test_offset_varints_match_the_general_encoder():
    rng = random.Random(3)
    values = list(range(0, 40000)) + [rng.randrange(1 << 40) for _ in range(20000)]
    values += [(1 << 21) - 1, 1 << 21, (1 << 28) - 1, 1 << 28, (1 << 63) - 1, -1]
    assert all(_varint(v) == encode_varint(v) for v in values)


def test_table_built_in_one_pass_is_byte_identical():
    rng = random.Random(11)
    for _ in range(150):
        keys = sorted({bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randint(1, 12))) + b"x" * rng.choice([0, 200])
                       for _ in range(rng.choice([0, 1, 17, 300]))})
        pairs = [(k, bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 130, 300])))) for k in keys]
        size = rng.choice([64, 1024, 262144])
        one, many = TableBuilder(size), TableBuilder(size)
        one.add(b"", b"h")
        many.add(b"", b"h")
        for k, v in pairs:
            one.add(k, v)
        many.add_sorted(pairs)
        assert one.finish() == many.finish()
    with pytest.raises(ValueError, match="out of order"):
        TableBuilder().add_sorted([(b"b", b""), (b"a", b"")])


def test_table_built_a_window_at_a_time_is_byte_identical(monkeypatch):
    # The numpy window path: short keys and values (one-byte lengths), restarts and block ends inside and
    # across windows, a builder already part-way through a block, and windows the scalar path must take.
    from shardckpt.format import table as table_module

    rng = random.Random(12)
    for trial in range(120):
        monkeypatch.setattr(table_module, "_WINDOW", rng.choice([1, 7, 16, 100, 16384]))
        prefix = bytes(rng.choice(b"\x00ab") for _ in range(rng.choice([0, 5, 40])))
        keys = sorted({prefix + bytes(rng.choice(b"\x00\x01ab\xff") for _ in range(rng.randint(0, 9)))
                       for _ in range(rng.choice([1, 15, 16, 17, 400, 3000]))} - {b""})
        long_at = rng.choice([None, 0, len(keys) // 2])
        pairs = [(k, bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 20, 127]))) if i != long_at
                  else b"v" * 128) for i, k in enumerate(keys)]
        split = rng.randint(0, len(pairs))
        size = rng.choice([32, 300, 4096, 262144])
        one, many = TableBuilder(size), TableBuilder(size)
        header = b"h" * rng.choice([1, 20])
        for builder in (one, many):
            builder.add(b"", header)
        for k, v in pairs:
            one.add(k, v)
        for k, v in pairs[:split]:  # part-way through a block, with its restart counter anywhere
            many.add(k, v)
        many.add_sorted(pairs[split:])
        assert one.finish() == many.finish(), trial
    with pytest.raises(ValueError, match="out of order"):
        TableBuilder().add_sorted([(b"a", b""), (b"c", b""), (b"b", b"")])
    builder = TableBuilder()
    builder.add(b"m", b"")
    with pytest.raises(ValueError, match="out of order"):
        builder.add_sorted([(b"a", b"")])


def _mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    out: dict[str, np.ndarray] = {}
    for i in range(300):
        kind = i % 10
        if kind == 0:
            out[f"f{i}"] = rng.standard_normal(7).astype(np.float32)
        elif kind == 1:
            out[f"b{i}"] = rng.integers(0, 2, 3).astype(bool)  # odd sizes: the next tensor starts unaligned
        elif kind == 2:
            out[f"h{i}"] = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
        elif kind == 3:
            out[f"c{i}"] = (rng.standard_normal(3) + 1j).astype(np.complex128)
        elif kind == 4:
            out[f"s{i}"] = np.array(np.float64(i))  # 0-d
        elif kind == 5:
            out[f"e{i}"] = np.zeros((0, 3), np.int32)  # no elements
        elif kind == 6:
            out[f"t{i}"] = np.array([b"ab", b"", b"xyz" * i], dtype=object)
        elif kind == 7:
            out[f"g{i}"] = np.arange(5, dtype=">i4")  # big-endian input
        elif kind == 8:
            out[f"v{i}"] = np.arange(20, dtype=np.int16)[::3]  # not contiguous
        else:
            out[f"i{i}"] = rng.integers(-100, 100, 9).astype(np.int8)
    return out


def test_many_small_tensors_of_every_kind_round_trip(tmp_path):
    arrays = _mixed()
    mesh = sc.create_mesh([("x", 1)])
    sc.name_based_save(mesh, str(tmp_path / "m"), arrays, coordinator=SingleClient())
    layouts = {n: sc.Layout.replicated(mesh, a.ndim) for n, a in arrays.items()}
    got = sc.name_based_restore(mesh, str(tmp_path / "m"), layouts, coordinator=SingleClient())
    for n, a in arrays.items():
        t = got[n].shards[0]
        want = a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder == ">" else a
        assert t.shape == a.shape and (t.dtype == want.dtype or a.dtype == object), n
        assert t.flags.aligned and t.flags.writeable, n
        np.testing.assert_array_equal(t, want, err_msg=n)
    # TensorFlow reads the same checkpoint.
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(tmp_path / "m"))
    for n in ["f0", "b1", "c3", "s4", "e5", "g7", "v8", "i9"]:
        np.testing.assert_array_equal(reader.get_tensor(n), arrays[n], err_msg=n)


def test_small_tensors_restored_together_share_no_bytes(tmp_path):
    # Two entries pointing at the same bytes (a hand-made index): each still gets its own memory.
    mesh = sc.create_mesh([("x", 1)])
    arrays = {f"t{i}": np.full(4, i, np.float32) for i in range(50)}
    prefix = tmp_path / "o"
    sc.name_based_save(mesh, str(prefix), arrays, coordinator=SingleClient())
    with BundleReader(prefix) as r:
        entries = dict(r.raw_entries())
    entries[b"t1"] = entries[b"t0"]
    (tmp_path / "o.index").write_bytes(build_index(BundleHeader(num_shards=1), entries))
    layout = sc.Layout.replicated(mesh, 1)
    got = sc.name_based_restore(mesh, str(prefix), {n: layout for n in arrays}, coordinator=SingleClient())
    got["t0"].shards[0][:] = 99
    np.testing.assert_array_equal(got["t1"].shards[0], np.zeros(4, np.float32))
    for i in range(2, 50):
        np.testing.assert_array_equal(got[f"t{i}"].shards[0], arrays[f"t{i}"])
        assert not np.shares_memory(got[f"t{i}"].shards[0], got[f"t{i - 1}"].shards[0])


def test_small_tensor_restore_reads_in_few_calls_and_save_writes_in_few(tmp_path, monkeypatch):
    mesh = sc.create_mesh([("x", 1)])
    arrays = {f"layer{i // 10}/w{i % 10}": np.full(16, i, np.float32) for i in range(5000)}
    writes = []
    pwritev = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: writes.append(len(bufs)) or pwritev(fd, bufs, off))
    sc.name_based_save(mesh, str(tmp_path / "c"), arrays, coordinator=SingleClient())
    monkeypatch.undo()
    assert len(writes) <= 2, writes  # 320 KB of tensors: one group, one buffer
    reads = []
    read_into = storage.LocalFile.read_into

    def counting(self, views, offset):
        reads.append(self.path)
        return read_into(self, views, offset)

    monkeypatch.setattr(storage.LocalFile, "read_into", counting)
    layout = sc.Layout.replicated(mesh, 1)
    got = sc.name_based_restore(mesh, str(tmp_path / "c"), {n: layout for n in arrays}, coordinator=SingleClient())
    # one read of the data file; the reader reads its sidecar when it opens the checkpoint (header, then the rest)
    names = [os.path.basename(r) for r in reads]
    assert names.count("c.data-00000-of-00001") == 1, names
    assert names.count("c.data-00000-of-00001.crc32c") == 2 and len(names) == 3, names
    for n, a in arrays.items():
        np.testing.assert_array_equal(got[n].shards[0], a)


def test_a_damaged_small_tensor_among_many_is_named(tmp_path):
    mesh = sc.create_mesh([("x", 1)])
    arrays = {f"t{i}": np.full(8, i, np.float32) for i in range(400)}
    prefix = tmp_path / "d"
    sc.name_based_save(mesh, str(prefix), arrays, coordinator=SingleClient())
    with BundleReader(prefix) as r:
        at = r.entry("t123").offset
    data = tmp_path / "d.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[at + 3] ^= 0x10
    data.write_bytes(bytes(raw))
    layout = sc.Layout.replicated(mesh, 1)
    with pytest.raises(sc.ChecksumMismatchError, match="t123"):
        sc.name_based_restore(mesh, str(prefix), {n: layout for n in arrays}, coordinator=SingleClient())
    got = sc.name_based_restore(mesh, str(prefix), {n: layout for n in arrays}, coordinator=SingleClient(),
                                verify=False)
    np.testing.assert_array_equal(got["t122"].shards[0], arrays["t122"])
    data.write_bytes(bytes(raw[: at + 4]))  # cut inside t123
    with pytest.raises(sc.TruncatedFileError, match="t123"):
        sc.name_based_restore(mesh, str(prefix), {n: layout for n in arrays}, coordinator=SingleClient())


def test_equal_layouts_built_apart_agree_and_different_ones_do_not(tmp_path):
    mesh = sc.create_mesh([("x", 2)])
    arrays = [np.arange(8, dtype=np.float32) + i for i in range(20)]

    def save(coord, fresh: bool, spec: str):
        shared = sc.Layout([spec], mesh)
        tensors = [sc.DTensor.from_global(a, sc.Layout([spec], mesh) if fresh else shared,
                                          mesh.local_devices(coord.rank, coord.size)) for a in arrays]
        return sc.sharded_save(mesh, str(tmp_path / f"l{spec}"), [f"t{i}" for i in range(20)], [""] * 20, tensors,
                               coordinator=coord)

    sc.LocalGroup(2).run(lambda coord: save(coord, coord.rank == 1, "x"))
    np.testing.assert_array_equal(sc.load_checkpoint(tmp_path / "lx").get_tensor("t3"), arrays[3])
    with pytest.raises(sc.MismatchedCallError, match="layouts"):
        sc.LocalGroup(2).run(lambda coord: save(coord, True, "x" if coord.rank else sc.UNSHARDED))
