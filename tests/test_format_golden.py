"""Golden vectors of the format spec (§8 and the examples of §2-§6), byte for byte, without TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

import shardckpt
from shardckpt.format import BundleReader, BundleWriter, TensorSlice, decode_slice_key, encode_slice_key
from shardckpt.format import ordered_code as oc
from shardckpt.format.coding import crc32c, mask_crc, unmask_crc
from shardckpt.format.protos import BundleEntry, decode_entry, encode_entry
from shardckpt.format.table import Table, TableBuilder, short_successor, shortest_separator

GOLDEN_A_INDEX = bytes.fromhex(
    "00000608011a020801"
    "00010f770801120412020802280835593ce535"
    "0000000001000000"
    "000921adc3"
    "0000000001000000" "00c0f2a1b0"
    "0001027800240000000001000000"
    "00ab30707f"
    "2908360e" + "00" * 36 + "57fb808b247547db"
)

GOLDEN_B_INDEX = bytes.fromhex(
    "00000608011a020801000a130076000101028282807f0801120812020802120208022810354c28987400011676080112081202"
    "0804120208023a080a04080210020a00000000000100000000d3cb84a3000000000100000000c0f2a1b000010277004b0000"
    "00000100000000c6343adf50085d0e" + "00" * 36 + "57fb808b247547db"
)


def _files(tmp_path, prefix):
    return (
        (tmp_path / f"{prefix}.index").read_bytes(),
        (tmp_path / f"{prefix}.data-00000-of-00001").read_bytes(),
    )


def test_crc32c_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert mask_crc(0) == 0xA282EAD8
    for value in (0, 1, 0xE3069283, 0xFFFFFFFF, 0x12345678):
        assert unmask_crc(mask_crc(value)) == value


def test_golden_a_single_float_tensor(tmp_path):
    with BundleWriter(tmp_path / "g") as w:
        w.add("w", np.array([1.0, 2.0], np.float32))
    index, data = _files(tmp_path, "g")
    assert data == bytes.fromhex("0000803f00000040")
    assert len(GOLDEN_A_INDEX) == 121
    assert index == GOLDEN_A_INDEX


def test_golden_b_partitioned(tmp_path):
    with BundleWriter(tmp_path / "p") as w:
        w.add_slice("v", "4 2 2,2:-", np.array([[1, 2], [3, 4]], np.float32))
    index, _ = _files(tmp_path, "p")
    assert index == GOLDEN_B_INDEX
    reader = BundleReader(tmp_path / "p")
    entry = reader.entry("v")
    assert entry.shape == (4, 2) and entry.slices == [TensorSlice(((2, 2), (0, -1)))]
    np.testing.assert_array_equal(reader.read_slice("v", "4 2 2,2:-"), [[1, 2], [3, 4]])
    with pytest.raises(shardckpt.InsufficientSlicesError, match="sufficient slices"):
        reader.read("v")


def test_golden_c_string_tensor(tmp_path):
    with BundleWriter(tmp_path / "s") as w:
        entry = w.add("s", np.array([b"hi", b"", b"\x00\xffz"], dtype=object))
    _, data = _files(tmp_path, "s")
    assert data == bytes.fromhex("0200031b428bca686900ff7a")
    assert entry.size == 12
    assert entry.crc32c.to_bytes(4, "little") == bytes.fromhex("7cd49948")
    got = BundleReader(tmp_path / "s").read("s")
    assert got.tolist() == [b"hi", b"", b"\x00\xffz"]


def test_empty_string_tensor_is_mask_of_zero(tmp_path):
    with BundleWriter(tmp_path / "e") as w:
        entry = w.add("e", np.array([], dtype=object))
    _, data = _files(tmp_path, "e")
    assert data == bytes.fromhex("d8ea82a2") and entry.size == 4


def test_entry_proto_examples():
    # float32 [2,3] at offset 0
    e = BundleEntry(dtype=1, shape=(2, 3), size=24, crc32c=0x01020304)
    assert encode_entry(e) == bytes.fromhex("0801120812020802120208032818350403" + "0201")
    # int64 scalar at offset 36: an empty shape is still written
    e = BundleEntry(dtype=9, shape=(), offset=36, size=8, crc32c=0xAABBCCDD)
    assert encode_entry(e) == bytes.fromhex("08091200202428083" "5ddccbbaa")
    # float32 [0,3] at offset 99, size 0
    e = BundleEntry(dtype=1, shape=(0, 3), offset=99, size=0, crc32c=mask_crc(0))
    assert encode_entry(e) == bytes.fromhex("08011206120012020803206335d8ea82a2")
    # partitioned full entry, int32 [4,6], one slice rows 0..2
    e = BundleEntry(dtype=3, shape=(4, 6), slices=[TensorSlice(((0, 2), (0, -1)))])
    raw = bytes.fromhex("0803120812020804120208063a060a0210020a00")
    assert encode_entry(e) == raw
    assert decode_entry(raw) == e


def test_float32_crc_example(tmp_path):
    with BundleWriter(tmp_path / "c") as w:
        entry = w.add("x", np.arange(6, dtype=np.float32))
    assert entry.crc32c == 0x173DDBC0


def test_ordered_code_examples():
    assert oc.encode_num_increasing(0) == b"\x00"
    assert oc.encode_num_increasing(2) == b"\x01\x02"
    assert oc.encode_num_increasing(300) == b"\x02\x01\x2c"
    cases = {0: "80", 2: "82", 4: "84", 63: "bf", -1: "7f", -64: "40", 100: "c064"}
    cases.update({0x424242: "f0424242", -0x800: "3800"})
    for value, hexed in cases.items():
        assert oc.encode_signed_num_increasing(value) == bytes.fromhex(hexed), value
        assert oc.decode_signed_num_increasing(bytes.fromhex(hexed), 0) == (value, len(hexed) // 2)
    for value in (2**63 - 1, -(2**63), 2**62, -(2**62) - 1, 2**55, -(2**56)):
        enc = oc.encode_signed_num_increasing(value)
        assert oc.decode_signed_num_increasing(enc, 0) == (value, len(enc))
    assert oc.encode_string(b"a\x00b\xff") == b"a\x00\xffb\xff\x00\x00\x01"
    assert oc.decode_string(b"a\x00\xffb\xff\x00\x00\x01", 0) == (b"a\x00b\xff", 8)


def test_slice_key_examples():
    rows_0_2 = TensorSlice(((0, 2), (0, -1)))
    key = encode_slice_key(b"d_part", rows_0_2)
    assert key == bytes.fromhex("00" "645f7061727400 01".replace(" ", "") + "0102" "8082" "807f")
    assert encode_slice_key(b"d_part", TensorSlice(((2, 2), (0, -1)))).endswith(bytes.fromhex("01028282807f"))
    assert encode_slice_key(b"d_part", TensorSlice(((0, 2), (2, 2)))).endswith(bytes.fromhex("80828282"))
    assert decode_slice_key(key) == (b"d_part", rows_0_2)


def test_separator_and_successor_rules():
    assert short_successor(b"g_empty") == b"h"
    assert short_successor(b"y") == b"z"
    assert short_successor("é".encode()) == b"\xc4"
    assert short_successor(b"\xff\xff") == b"\xff\xff"
    assert shortest_separator(b"abc1725", b"abc1726") == b"abc1725"
    assert shortest_separator(b"the quick", b"the who") == b"the r"
    assert shortest_separator(b"abc", b"abcd") == b"abc"


def test_key_order_is_bytewise(tmp_path):
    names = ["é", "a", "Z", "A_b", "A/b", "A.b"]
    with BundleWriter(tmp_path / "o") as w:
        for i, name in enumerate(names):
            w.add(name, np.int32(i))
    got = [name for name, _ in BundleReader(tmp_path / "o").entries()]
    assert got == ["A.b", "A/b", "A_b", "Z", "a", "é"]


def test_multi_block_table_seek_and_iterate():
    builder = TableBuilder()
    items = [(f"key/{i:07d}".encode() + b"x" * (i % 50), bytes(i % 300)) for i in range(20000)]
    for k, v in items:
        builder.add(k, v)
    data = builder.finish()
    table = Table(data, "mem")
    assert list(table) == items
    for k, v in items[::997]:
        assert table.get(k) == v
    assert table.get(b"key/") is None and table.get(b"zzz") is None
    # The first block is cut just past 256 KiB, as TensorFlow cuts it.
    first_handle = next(iter(table._index))[1]
    from shardckpt.format.coding import decode_varint

    offset, pos = decode_varint(first_handle, 0, len(first_handle))
    size, _ = decode_varint(first_handle, pos, len(first_handle))
    assert offset == 0 and 262144 <= size < 262144 + 400


def test_restart_intervals():
    builder = TableBuilder()
    for i in range(40):
        builder.add(f"k{i:03d}".encode(), b"v")
    data = builder.finish()
    import struct

    # Data block: restarts at entries 0, 16, 32.
    table = Table(data, "mem")
    block_size = next(iter(table._index))[1]
    from shardckpt.format.coding import decode_varint

    _, pos = decode_varint(block_size, 0, len(block_size))
    size, _ = decode_varint(block_size, pos, len(block_size))
    (n,) = struct.unpack_from("<I", data, size - 4)
    assert n == 3


def test_alignment_pads_between_tensors(tmp_path):
    with BundleWriter(tmp_path / "al", data_alignment=64) as w:
        a = w.add("a", np.arange(3, dtype=np.float32))
        b = w.add("b", np.arange(5, dtype=np.int8))
    assert (a.offset, a.size, b.offset, b.size) == (0, 12, 64, 5)
    r = BundleReader(tmp_path / "al")
    np.testing.assert_array_equal(r.read("b"), np.arange(5, dtype=np.int8))


def test_merge_renumbers_and_concatenates_slices(tmp_path):
    for i in range(3):
        with BundleWriter(tmp_path / f"part{i}") as w:
            w.add_slice("v", f"6 2 {2 * i},2:-", np.full((2, 2), i, np.float32))
            w.add(f"only{i}", np.int64(i))
    header = shardckpt.merge_bundles([tmp_path / "part2", tmp_path / "part0", tmp_path / "part1"], tmp_path / "m")
    assert header.num_shards == 3
    r = BundleReader(tmp_path / "m")
    np.testing.assert_array_equal(r.read("v"), np.repeat([0, 1, 2], 2)[:, None] * np.ones((1, 2)))
    assert r.entry("only2").shard_id == 0  # the first input contributing a file gets shard 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # each data file with its sidecar; no input's left
        "m.data-00000-of-00003",
        "m.data-00000-of-00003.crc32c",
        "m.data-00001-of-00003",
        "m.data-00001-of-00003.crc32c",
        "m.data-00002-of-00003",
        "m.data-00002-of-00003.crc32c",
        "m.index",
    ]


def test_merge_into_own_prefix_keeps_index(tmp_path):
    with BundleWriter(tmp_path / "x") as w:
        w.add("t", np.ones(3, np.float32))
    shardckpt.merge_bundles([tmp_path / "x"], tmp_path / "x")
    np.testing.assert_array_equal(shardckpt.load_checkpoint(tmp_path / "x").get_tensor("t"), np.ones(3))


def test_merge_rejects_duplicates(tmp_path):
    for i in range(2):
        with BundleWriter(tmp_path / f"d{i}") as w:
            w.add("same", np.int32(i))
    with pytest.raises(shardckpt.DuplicateTensorError, match="same"):
        shardckpt.merge_bundles([tmp_path / "d0", tmp_path / "d1"], tmp_path / "m")
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="did not exist"):
        shardckpt.merge_bundles([tmp_path / "nothere"], tmp_path / "m")
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="At least one"):
        shardckpt.merge_bundles([tmp_path / "nothere"], tmp_path / "m", allow_missing_files=True)


def test_read_slice_across_stored_slices(tmp_path):
    full = np.arange(48, dtype=np.float64).reshape(8, 6)
    with BundleWriter(tmp_path / "r") as w:
        w.add_slice("t", "8 6 0,4:0,3", full[:4, :3])
        w.add_slice("t", "8 6 0,4:3,3", full[:4, 3:])
        w.add_slice("t", "8 6 4,4:-", full[4:])
    r = BundleReader(tmp_path / "r")
    np.testing.assert_array_equal(r.read("t"), full)
    np.testing.assert_array_equal(r.read_slice("t", "8 6 2,4:1,4"), full[2:6, 1:5])
    np.testing.assert_array_equal(r.read_slice("t", "8 6 2,4:1,4", verify="full"), full[2:6, 1:5])
    np.testing.assert_array_equal(r.read_slice("t", "8 6 4,4:-"), full[4:])


def test_facade(tmp_path):
    with BundleWriter(tmp_path / "f") as w:
        w.add("a/b", np.zeros((2, 3), np.float16))
        w.add("s", np.array(["x", "é"]))
    reader = shardckpt.load_checkpoint(tmp_path / "f")
    assert reader.get_variable_to_shape_map() == {"a/b": [2, 3], "s": [2]}
    assert reader.get_variable_to_dtype_map() == {"a/b": np.dtype(np.float16), "s": np.dtype(object)}
    assert reader.has_tensor("a/b") and not reader.has_tensor("nope")
    assert reader.get_tensor("s").tolist() == [b"x", "é".encode()]
    assert shardckpt.list_variables(tmp_path / "f") == [("a/b", [2, 3]), ("s", [2])]
    # Passing the .index file or a directory with a checkpoint state file also works.
    assert shardckpt.load_checkpoint(str(tmp_path / "f") + ".index").has_tensor("s")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "f"\nall_model_checkpoint_paths: "f"\n')
    assert shardckpt.load_checkpoint(tmp_path).has_tensor("s")


def test_read_bounds_into_a_callers_array(tmp_path):
    full = np.arange(48, dtype=np.float32).reshape(8, 6)
    with BundleWriter(tmp_path / "o") as w:
        w.add_slice("t", "8 6 0,4:-", full[:4])
        w.add_slice("t", "8 6 4,4:-", full[4:])
        w.add("s", np.array([b"a", b"bc"], dtype=object))
    r = BundleReader(tmp_path / "o")
    big = np.zeros((10, 6), np.float32)
    got = r.read_bounds("t", ((2, 7), (1, 5)), out=big[1:6, 1:5])  # a strided view of memory we hold
    np.testing.assert_array_equal(big[1:6, 1:5], full[2:7, 1:5])
    assert np.shares_memory(got, big)
    exact = np.empty((4, 6), np.float32)
    assert r.read_bounds("t", ((4, 8), (0, 6)), out=exact) is exact  # a stored slice read straight in
    np.testing.assert_array_equal(exact, full[4:])
    strings = np.empty(2, dtype=object)
    r.read_bounds("s", ((0, 2),), out=strings)
    assert strings.tolist() == [b"a", b"bc"]
    with pytest.raises(shardckpt.ShapeMismatchError, match="output array"):
        r.read_bounds("t", ((0, 2), (0, 6)), out=np.empty((2, 5), np.float32))
    with pytest.raises(shardckpt.ShapeMismatchError, match="output array"):
        r.read_bounds("t", ((0, 2), (0, 6)), out=np.empty((2, 6), np.float64))


LAZY_ML_DTYPES = r"""
import sys
import numpy as np
import shardckpt as sc
prefix, step = sys.argv[1], sys.argv[2]
if step == "write":
    mesh = sc.create_mesh([("x", 1)])
    sc.name_based_save(mesh, prefix, {"f": np.arange(6, dtype=np.float32)})
    r = sc.load_checkpoint(prefix)
    assert r.get_tensor("f").sum() == 15 and r.get_variable_to_dtype_map()["f"] == np.float32
    assert "ml_dtypes" not in sys.modules, "a float32 save and read imported ml_dtypes"
    import ml_dtypes
    sc.name_based_save(mesh, prefix + "-bf16", {"b": np.ones(3, ml_dtypes.bfloat16), "i": np.ones(2, ml_dtypes.int2)})
else:  # a reader that has never imported ml_dtypes: the narrow entries alone must bring the types in
    r = sc.load_checkpoint(prefix + "-bf16")
    assert str(r.get_tensor("b").dtype) == "bfloat16" and str(r.get_tensor("i").dtype) == "int2"
print("OK")
"""


def test_ml_dtypes_is_imported_only_when_a_narrow_type_is_met(tmp_path):
    # Some ml_dtypes releases take most of a second of CPU to import; a float-only client must not pay it.
    import subprocess
    import sys

    for step in ("write", "read"):
        out = subprocess.run([sys.executable, "-c", LAZY_ML_DTYPES, str(tmp_path / "ckpt"), step],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "OK", (step, out.stderr[-3000:])
