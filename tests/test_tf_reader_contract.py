"""`shardckpt.load_checkpoint` behaves as TensorFlow's `tf.train.load_checkpoint` wherever a user would notice.

Every checkpoint here is written by real TensorFlow (2.21, in one subprocess per module) and what TensorFlow's
own reader returns for it is recorded there; shardckpt's answers are compared with those records.  The V1
checkpoints are TensorFlow's `Saver(write_version=V1)` / `SaveSlices` output; the crafted V1 files of the
adversary tests are built with the project's own SSTable writer.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.checkpoint_reader import load_variable
from shardckpt.cli import main
from shardckpt.convert import checkpoint_to_safetensors
from shardckpt.diff import diff_tensors
from shardckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InsufficientSlicesError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from shardckpt.format.coding import encode_varint
from shardckpt.format.protos import encode_shape, encode_slice
from shardckpt.format.slices import TensorSlice, encode_slice_key
from shardckpt.format.table import TableBuilder

ITER = "iterator/.ATTRIBUTES/ITERATOR_STATE"


def _describe(value):
    """A value's Python type, dtype, shape and exact contents, as JSON.  TensorFlow's answers are described by
    this same function (its source runs in `_TF_WRITER`), so only what the readers return can differ."""
    kind = type(value).__module__ + "." + type(value).__name__
    if isinstance(value, bytes):
        return {"type": kind, "bytes": value.hex()}
    arr = np.asarray(value)
    if arr.dtype == object:
        return {"type": kind, "dtype": "object", "shape": list(arr.shape), "bytes": [b.hex() for b in arr.ravel()]}
    return {"type": kind, "dtype": str(arr.dtype), "shape": list(arr.shape),
            "values": arr.astype(np.complex128).ravel().view(np.float64).tolist()}


# Writes the checkpoints and records, for each, what TensorFlow's reader says about every tensor.
_TF_WRITER = textwrap.dedent(r'''
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    root = sys.argv[1]
''') + inspect.getsource(_describe) + textwrap.dedent(r'''
    def record(path):
        r = tf.train.load_checkpoint(path)
        out = {"debug": r.debug_string().hex(), "list": tf.train.list_variables(path),
               "dtypes": {k: v.name for k, v in r.get_variable_to_dtype_map().items()}, "tensors": {}}
        for name in r.get_variable_to_shape_map():
            try:
                out["tensors"][name] = _describe(r.get_tensor(name))
            except Exception as exc:
                out["tensors"][name] = {"error": type(exc).__name__}
        return out

    records = {}
    # 1. tf.train.Checkpoint with a tf.data iterator (a DT_VARIANT entry) and scalars of many dtypes,
    #    three saves through tf.train.CheckpointManager (max_to_keep=2: the state file names two).
    it = iter(tf.data.Dataset.range(10))
    next(it)
    ck = tf.train.Checkpoint(iterator=it, f=tf.Variable(np.float32(1.5)), d=tf.Variable(np.float64(-2.25)),
                             i=tf.Variable(np.int64(3)), b=tf.Variable(True), s=tf.Variable(b"hello"),
                             sa=tf.Variable([b"a", b"", b"\x00\xff"]), bf=tf.Variable(tf.constant(1.5, tf.bfloat16)),
                             h=tf.Variable(np.float16(2.5)), c=tf.Variable(np.complex64(1 - 2j)),
                             m=tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
                             e=tf.Variable(np.zeros((0, 3), np.int32)))
    manager = tf.train.CheckpointManager(ck, root + "/managed", max_to_keep=2)
    for _ in range(3):
        manager.save()
    records["managed"] = record(manager.latest_checkpoint)
    records["managed_latest"] = manager.latest_checkpoint
    # 2. A partitioned tensor, written by SaveV2 as slices.
    tf.raw_ops.SaveV2(prefix=root + "/parts/p", tensor_names=["v", "v", "w"],
                      shape_and_slices=["4 2 0,2:-", "4 2 2,2:-", ""],
                      tensors=[np.ones((2, 2), np.float32), np.full((2, 2), 3, np.float32), np.int32(7)])
    records["parts"] = record(root + "/parts/p")
    # 3. V1: Saver(write_version=V1), one file, with a partitioned variable; and a sharded V1 saver.
    for sharded in (False, True):
        g = tf.Graph()
        with g.as_default():
            tf.compat.v1.get_variable("a", initializer=np.arange(6, dtype=np.float32).reshape(2, 3))
            tf.compat.v1.get_variable("s", initializer=np.float64(7))
            tf.compat.v1.get_variable("n", initializer=np.array([-1, 2, -300], np.int32))
            tf.compat.v1.get_variable("l", initializer=np.array([[-(2**40)], [5]], np.int64))
            tf.compat.v1.get_variable("q", initializer=np.array([1, -2], np.int8))
            tf.compat.v1.get_variable("t", initializer=np.array([True, False]))
            tf.compat.v1.Variable(tf.constant([b"x", b"yz", b""]), name="st")
            tf.compat.v1.Variable(tf.constant(b"q"), name="ss")
            part = tf.compat.v1.get_variable("part", shape=[6, 2],
                                             initializer=tf.compat.v1.random_uniform_initializer(),
                                             partitioner=tf.compat.v1.fixed_size_partitioner(3))
            saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V1, sharded=sharded)
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                name = "v1s" if sharded else "v1"
                os.makedirs(root + "/" + name)
                path = saver.save(sess, root + "/" + name + "/model")
                records[name] = record(path)
                records[name]["path"] = path
                records[name]["part"] = sess.run(tf.concat(list(part), 0) if not isinstance(part, tf.Variable)
                                                 else part).ravel().tolist()
    # 4. SaveSlices of a float16 tensor: TensorFlow writes it (half_val) but its reader cannot read it back.
    tf.raw_ops.SaveSlices(filename=root + "/half", tensor_names=["h"], shapes_and_slices=[""],
                          data=[np.array([1.5, -2], np.float16)])
    json.dump(records, open(root + "/records.json", "w"))
''')

_TF_RESTORE = textwrap.dedent(r'''
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    it = iter(tf.data.Dataset.range(10))
    tf.train.Checkpoint(iterator=it).restore(sys.argv[1]).expect_partial()
    print(int(next(it)))
''')


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def tfdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tfreader")
    _run(_TF_WRITER, str(root))
    return root


@pytest.fixture(scope="module")
def records(tfdir: Path) -> dict[str, Any]:
    return json.loads((tfdir / "records.json").read_text())


def _dtype_label(dtype: Any) -> str:
    """Our dtype map's value spelled as TensorFlow's DType.name."""
    if isinstance(dtype, sc.DataType):
        return dtype.name.lower()
    return "string" if dtype == np.dtype(object) else np.dtype(dtype).name


# --- 1. values, types, scalars -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["managed", "parts", "v1", "v1s"])
def test_every_value_has_tensorflows_type_dtype_shape_and_bytes(tfdir: Path, records: dict[str, Any],
                                                                which: str) -> None:
    rec = records[which]
    path = records["managed_latest"] if which == "managed" else rec.get("path", str(tfdir / "parts" / "p"))
    reader = sc.load_checkpoint(path)
    checked = 0
    for name, theirs in rec["tensors"].items():
        if "error" in theirs:
            continue  # the variant (both refuse), V1 partitioned (TensorFlow refuses; tested below)
        assert _describe(reader.get_tensor(name)) == theirs, name
        checked += 1
    assert checked >= (2 if which == "parts" else 5)
    if which == "managed":  # the scalars really are numpy scalars and bytes, as TF gives them
        assert type(reader.get_tensor("f/.ATTRIBUTES/VARIABLE_VALUE")) is np.float32
        assert type(reader.get_tensor("s/.ATTRIBUTES/VARIABLE_VALUE")) is bytes
        assert reader.get_tensor("sa/.ATTRIBUTES/VARIABLE_VALUE").dtype == object


# --- 3. debug_string, list_variables, maps, load_variable, has_tensor ---------------------------------------


@pytest.mark.parametrize("which", ["managed", "parts"])
def test_debug_string_is_byte_identical_to_tensorflows(tfdir: Path, records: dict[str, Any], which: str) -> None:
    path = records["managed_latest"] if which == "managed" else str(tfdir / "parts" / "p")
    ours = sc.load_checkpoint(path).debug_string()
    assert isinstance(ours, bytes)
    assert ours == bytes.fromhex(records[which]["debug"])
    if which == "parts":  # TF prints a partitioned tensor as its raw slice keys; so do we
        assert ours.count(b"\x00v\x00") == 2 and b"\nv (" not in ours


def test_v1_debug_string_has_tensorflows_lines(records: dict[str, Any]) -> None:
    """Same lines (", 3 slices" included); TensorFlow's order is its hash map's, ours sorted."""
    ours = sc.load_checkpoint(records["v1"]["path"]).debug_string()
    theirs = bytes.fromhex(records["v1"]["debug"])
    assert sorted(ours.splitlines()) == sorted(theirs.splitlines())
    assert b"part (DT_FLOAT) [6,2], 3 slices" in ours.splitlines()
    assert ours.splitlines() == sorted(ours.splitlines())


@pytest.mark.parametrize("which", ["managed", "parts", "v1", "v1s"])
def test_list_variables_and_the_maps_match_tensorflow(tfdir: Path, records: dict[str, Any], which: str) -> None:
    rec = records[which]
    path = records["managed_latest"] if which == "managed" else rec.get("path", str(tfdir / "parts" / "p"))
    assert [list(x) for x in sc.list_variables(path)] == rec["list"]
    reader = sc.load_checkpoint(path)
    assert reader.get_variable_to_shape_map() == {n: s for n, s in rec["list"]}
    assert {n: _dtype_label(d) for n, d in reader.get_variable_to_dtype_map().items()} == rec["dtypes"]
    for name in reader.get_variable_to_shape_map():
        assert reader.has_tensor(name)
    assert not reader.has_tensor("no/such") and not reader.has_tensor("")


def test_load_variable_takes_a_directory_a_prefix_and_a_tensor_name(tfdir: Path, records: dict[str, Any]) -> None:
    f = "f/.ATTRIBUTES/VARIABLE_VALUE"
    for where in (tfdir / "managed", records["managed_latest"]):
        assert load_variable(where, f) == np.float32(1.5)
        assert load_variable(where, f + ":0") == np.float32(1.5)  # TF drops a tensor name's ":0"
    assert sc.list_variables(tfdir / "managed") == sc.list_variables(records["managed_latest"])
    assert load_variable(tfdir / "v1", "s") == 7.0 and type(load_variable(tfdir / "v1", "ss")) is bytes


# --- 2. DT_VARIANT ------------------------------------------------------------------------------------------


def test_variant_entries_list_inspect_verify_and_diff_but_get_tensor_refuses(
        tfdir: Path, records: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    prefix = records["managed_latest"]
    reader = sc.load_checkpoint(prefix)
    assert reader.get_variable_to_shape_map()[ITER] == [3]
    assert reader.get_variable_to_dtype_map()[ITER] is sc.DataType.VARIANT
    with pytest.raises(UnsupportedDTypeError) as info:
        reader.get_tensor(ITER)
    msg = str(info.value)
    assert prefix in msg and ITER in msg and prefix + ".data-00000-of-00001" in msg and "DT_VARIANT" in msg
    with pytest.raises(UnsupportedDTypeError):
        reader.get_slice(ITER, "")
    assert main(["inspect", prefix]) == 0
    out = capsys.readouterr().out
    assert ITER in out and "DT_VARIANT" in out
    assert main(["verify", "-q", prefix]) == 0
    assert "OK" in capsys.readouterr().out
    report = diff_tensors(prefix, tfdir / "managed")  # the directory stands for the same checkpoint
    assert report.identical
    assert [t.note for t in report.tensors if t.name == ITER] == ["stored bytes identical"]


def _damaged_iterator_copy(records: dict[str, Any], tmp_path: Path,
                           damage: Callable[[bytearray, int, int], None]) -> str:
    """The managed checkpoint copied into ``tmp_path``, its variant entry's stored bytes changed in place by
    ``damage(data_file_bytes, entry_offset, entry_size)``; the copy's prefix."""
    src = Path(records["managed_latest"])
    for f in src.parent.glob(src.name + ".*"):
        shutil.copy(f, tmp_path / f.name)
    prefix = str(tmp_path / src.name)
    entry = sc.BundleReader(prefix).entry(ITER)
    data = Path(prefix + ".data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    damage(raw, entry.offset, entry.size)
    data.write_bytes(bytes(raw))
    return prefix


def test_a_flipped_byte_in_a_variant_entry_fails_verify_and_diff(
        tfdir: Path, records: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def flip(raw: bytearray, offset: int, size: int) -> None:
        raw[offset + size // 2] ^= 0x10

    prefix = _damaged_iterator_copy(records, tmp_path, flip)
    assert main(["verify", "-q", prefix]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and ITER in out and "checksum" in out
    with pytest.raises(ChecksumMismatchError, match=ITER):  # as for any other damaged tensor
        diff_tensors(prefix, Path(records["managed_latest"]))


def test_a_variant_element_running_past_its_entry_is_corrupt_not_a_crash(
        records: dict[str, Any], tmp_path: Path) -> None:
    def huge_first_element(raw: bytearray, offset: int, size: int) -> None:
        raw[offset : offset + 5] = b"\xff\xff\xff\xff\x0f"  # a 4 GiB length

    prefix = _damaged_iterator_copy(records, tmp_path, huge_first_element)
    with pytest.raises(CorruptCheckpointError, match="runs past"):
        sc.BundleReader(prefix).read_raw(ITER)


def test_merge_copies_a_variant_entry_byte_for_byte_and_tensorflow_restores_the_iterator(
        records: dict[str, Any], tmp_path: Path) -> None:
    src = Path(records["managed_latest"])
    (tmp_path / "in").mkdir()
    for f in src.parent.glob(src.name + ".*"):
        shutil.copy(f, tmp_path / "in" / f.name)
    before = sc.BundleReader(tmp_path / "in" / src.name)
    want_entry = before._table.get(ITER.encode())  # the encoded index entry
    want_bytes = before.read_raw(ITER)
    before.close()
    dest = tmp_path / "merged"
    sc.merge_bundles([str(tmp_path / "in" / src.name)], str(dest))
    after = sc.BundleReader(dest)
    assert after._table.get(ITER.encode()) == want_entry
    assert after.read_raw(ITER) == want_bytes
    assert _run(_TF_RESTORE, str(dest)).strip() == "1"  # the iterator had yielded 0 when saved


def test_convert_names_the_variant_it_cannot_put_in_safetensors(records: dict[str, Any], tmp_path: Path) -> None:
    prefix = records["managed_latest"]
    with pytest.raises(UnsupportedDTypeError, match=ITER.replace(".", r"\.")):
        checkpoint_to_safetensors(prefix, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    report = checkpoint_to_safetensors(prefix, tmp_path / "x.safetensors", skip_unsupported=True)
    assert ITER in [name for name, _ in report.skipped]


# --- 4. directories with a state file -----------------------------------------------------------------------


def test_inspect_of_a_manager_directory_lists_its_checkpoints_and_inspects_the_latest(
        tfdir: Path, records: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    latest = records["managed_latest"]
    assert main(["inspect", str(tfdir / "managed")]) == 0
    out = capsys.readouterr().out
    assert f"{tfdir / 'managed' / 'ckpt-2'}\n" in out and f"{latest} (latest" in out
    assert "ckpt-1" not in out.replace("ckpt-1.", "")  # retention removed it; the state file no longer names it
    assert out.rstrip().endswith(f"in {latest}")
    assert main(["inspect", "--json", str(tfdir / "managed")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prefix"] == latest and [c["prefix"] for c in doc["checkpoints"]] == [
        str(tfdir / "managed" / "ckpt-2"), latest]
    assert main(["verify", "-q", str(tfdir / "managed")]) == 0
    assert latest in capsys.readouterr().out


def test_a_shardckpt_manager_directory_is_accepted_everywhere(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    mesh = sc.create_mesh([("x", 1)])
    with sc.CheckpointManager(tmp_path / "run", max_to_keep=2) as manager:
        for step in (1, 2, 3):
            manager.save(step, mesh, {"w": np.full(4, step, np.float32)})
    assert (tmp_path / "run" / "checkpoint").is_file()  # the manager writes TensorFlow's state file
    assert float(load_variable(tmp_path / "run", "w")[0]) == 3.0
    assert sc.list_variables(tmp_path / "run") == [("w", [4])]
    assert main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ckpt-2" in out and "ckpt-3 (latest" in out
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint found in directory"):
        sc.load_checkpoint(tmp_path)


# --- 5. closest names ---------------------------------------------------------------------------------------


def test_a_missing_name_error_lists_the_closest_names_everywhere(tfdir: Path, records: dict[str, Any]) -> None:
    prefix = records["managed_latest"]
    reader = sc.load_checkpoint(prefix)
    wrong = "m/.ATTRIBUTES/VARIABLE_VALUES"
    for call in (lambda: reader.get_tensor(wrong), lambda: reader.get_slice(wrong, ""),
                 lambda: load_variable(tfdir / "managed", wrong), lambda: sc.BundleReader(prefix).read(wrong),
                 lambda: sc.BundleReader(prefix).entry(wrong)):
        with pytest.raises(TensorNotFoundError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"Key {wrong} not found in checkpoint {prefix}")
        assert "closest names: m/.ATTRIBUTES/VARIABLE_VALUE" in msg
    with pytest.raises(TensorNotFoundError, match="closest names: part"):
        sc.load_checkpoint(records["v1"]["path"]).get_tensor("prt")
    with pytest.raises(TensorNotFoundError) as info:
        reader.get_tensor("zzzzzzzzzzzzzzzzzzzzzzzzzz")
    assert "closest" not in str(info.value)


# --- 6. V1 ------------------------------------------------------------------------------------------------


def test_v1_partitioned_variable_is_assembled_with_the_values_tensorflow_saved(records: dict[str, Any]) -> None:
    for which in ("v1", "v1s"):
        rec = records[which]
        assert rec["tensors"]["part"] == {"error": "UnimplementedError"}  # TF's reader refuses; we assemble
        ours = sc.load_checkpoint(rec["path"]).get_tensor("part")
        assert ours.dtype == np.float32 and ours.shape == (6, 2)
        np.testing.assert_array_equal(ours.ravel(), np.array(rec["part"], np.float32))


def test_v1_checkpoints_resolve_through_their_state_file(tfdir: Path, records: dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert "?????" in records["v1s"]["path"]  # a sharded V1 state file names a pattern
    for which in ("v1", "v1s"):
        assert sc.latest_checkpoint(tfdir / which) == records[which]["path"]
        reader = sc.load_checkpoint(tfdir / which)
        assert reader.format_version == 1
        np.testing.assert_array_equal(reader.get_tensor("a"), np.arange(6, dtype=np.float32).reshape(2, 3))
        np.testing.assert_array_equal(reader.get_slice("a", "2 3 1,1:-"), [[3, 4, 5]])
        assert main(["inspect", str(tfdir / which)]) == 0
        assert "part" in capsys.readouterr().out
        assert main(["verify", str(tfdir / which)]) == 0
        assert "OK" in capsys.readouterr().out


def test_v1_float16_that_tensorflow_writes_is_read(tfdir: Path) -> None:
    reader = sc.load_checkpoint(tfdir / "half")
    got = reader.get_tensor("h")
    assert got.dtype == np.float16 and got.tolist() == [1.5, -2.0]


# --- V1 adversary: crafted files -------------------------------------------------------------------------


def _ld(tag: int, body: bytes) -> bytes:
    return encode_varint(tag) + encode_varint(len(body)) + body


def _meta(tensors: list[tuple[bytes, tuple[int, ...], int, list[TensorSlice]]]) -> bytes:
    metas = b"".join(_ld(0x0A, _ld(0x0A, n) + encode_shape(shape) + b"\x18" + encode_varint(dt)
                                + b"".join(_ld(0x22, encode_slice(s)) for s in slices))
                     for n, shape, dt, slices in tensors)
    return _ld(0x0A, metas + _ld(0x12, b"\x08\x01"))


def _record(name: bytes, s: TensorSlice, proto: bytes) -> bytes:
    return _ld(0x12, _ld(0x0A, name) + _ld(0x12, encode_slice(s)) + _ld(0x1A, proto))


def _v1_file(path: Path, meta: bytes, records: dict[bytes, bytes]) -> Path:
    builder = TableBuilder()
    builder.add(b"", meta)
    for key in sorted(records):
        builder.add(key, records[key])
    path.write_bytes(builder.finish())
    return path


def _floats(values: list[float]) -> bytes:
    return _ld(0x2A, struct.pack(f"<{len(values)}f", *values))


def test_a_crafted_v1_file_reads_when_well_formed(tmp_path: Path) -> None:
    full = TensorSlice.full(1)
    path = _v1_file(tmp_path / "ok", _meta([(b"x", (3,), 1, [full])]),
                    {encode_slice_key(b"x", full): _record(b"x", full, _floats([1, 2, 3]))})
    assert sc.load_checkpoint(path).get_tensor("x").tolist() == [1, 2, 3]


@pytest.mark.parametrize("case", ["huge_shape", "slice_outside", "overlap", "count_mismatch", "long_field",
                                  "truncated_varint", "missing_record", "wrong_slice_in_record"])
def test_crafted_v1_files_raise_corrupt_checkpoint_quickly_with_bounded_memory(tmp_path: Path, case: str) -> None:
    full, half0, half1 = TensorSlice.full(1), TensorSlice(((0, 2),)), TensorSlice(((1, 2),))
    key = encode_slice_key(b"x", full)
    shape: tuple[int, ...] = (3,)
    slices = [full]
    recs = {key: _record(b"x", full, _floats([1, 2, 3]))}
    if case == "huge_shape":  # 2^40 elements claimed, 12 bytes stored: refused before any allocation
        shape = (1 << 40,)
    elif case == "slice_outside":
        slices = [TensorSlice(((2, 5),))]
    elif case == "overlap":
        slices = [half0, half1]
        recs = {encode_slice_key(b"x", s): _record(b"x", s, _floats([1, 2])) for s in slices}
    elif case == "count_mismatch":
        recs = {key: _record(b"x", full, _floats([1, 2]))}
    elif case == "long_field":  # a packed field claiming 2^31 bytes inside a 30-byte record
        recs = {key: _record(b"x", full, b"\x2a\x80\x80\x80\x80\x08" + b"\x00" * 12)}
    elif case == "truncated_varint":
        shape = (2,)
        recs = {key: _record(b"x", full, _ld(0x3A, b"\x01\x80"))}
        meta = _meta([(b"x", shape, 3, slices)])  # DT_INT32 in int_val
    elif case == "missing_record":
        recs = {}
    elif case == "wrong_slice_in_record":
        recs = {key: _record(b"x", TensorSlice(((0, 3),)), _floats([1, 2, 3]))}
    if case != "truncated_varint":
        meta = _meta([(b"x", shape, 1, slices)])
    path = _v1_file(tmp_path / "bad", meta, recs)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError):
            sc.load_checkpoint(path).get_tensor("x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_every_truncation_and_every_bit_flip_of_a_real_v1_file_is_an_error_or_the_right_values(
        records: dict[str, Any], tmp_path: Path) -> None:
    original = Path(records["v1"]["path"]).read_bytes()
    good = sc.load_checkpoint(records["v1"]["path"])
    want = {n: good.get_tensor(n) for n in good.get_variable_to_shape_map()}
    path = tmp_path / "model"
    outcomes = {"error": 0, "same": 0}
    cases = [original[:n] for n in range(0, len(original), 7)]
    cases += [original[:i] + bytes((original[i] ^ (1 << (i % 8)),)) + original[i + 1:] for i in range(len(original))]
    for data in cases:
        path.write_bytes(data)
        try:
            reader = sc.load_checkpoint(path)
            got = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
        except CheckpointError:
            outcomes["error"] += 1
            continue
        assert got.keys() == want.keys()
        for n in want:
            np.testing.assert_array_equal(got[n], want[n])
        outcomes["same"] += 1
    assert outcomes["error"] > len(original)  # nearly every damage is detected (footer padding is not checked)


def test_v1_slices_that_do_not_cover_the_tensor_raise_insufficient_slices(tmp_path: Path) -> None:
    s = TensorSlice(((0, 2),))
    path = _v1_file(tmp_path / "gap", _meta([(b"x", (3,), 1, [s])]),
                    {encode_slice_key(b"x", s): _record(b"x", s, _floats([1, 2]))})
    with pytest.raises(InsufficientSlicesError):
        sc.load_checkpoint(path).get_tensor("x")


def test_no_checkpoint_at_all_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        sc.load_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointNotFoundError):
        sc.load_checkpoint(str(tmp_path / "nothing-?????-of-00002"))
    assert not os.listdir(tmp_path)


def test_a_resource_entry_is_listed_inspected_verified_and_merged_but_not_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TensorFlow 2.21 cannot save a DT_RESOURCE tensor (SaveV2 CHECK-fails); a crafted one is kept as bytes."""
    from shardckpt.format.coding import crc32c, mask_crc
    from shardckpt.format.files import data_filename, index_filename
    from shardckpt.format.protos import BundleEntry, BundleHeader
    from shardckpt.format.writer import build_index

    prefix = tmp_path / "r"
    w = np.arange(3, dtype=np.float32).tobytes()
    blob = b"\x01\x02\x03\x04\x05"
    Path(data_filename(str(prefix), 0, 1)).write_bytes(w + blob)
    Path(index_filename(str(prefix))).write_bytes(build_index(BundleHeader(), {
        b"w": BundleEntry(dtype=1, shape=(3,), size=12, crc32c=mask_crc(crc32c(w))),
        b"handle": BundleEntry(dtype=20, shape=(), offset=12, size=5, crc32c=mask_crc(crc32c(blob)))}))
    reader = sc.load_checkpoint(prefix)
    assert sc.list_variables(prefix) == [("handle", []), ("w", [3])]
    assert reader.get_variable_to_dtype_map()["handle"] is sc.DataType.RESOURCE
    assert reader.debug_string() == b"handle (DT_RESOURCE) []\nw (DT_FLOAT) [3]\n"
    with pytest.raises(UnsupportedDTypeError, match="handle.*DT_RESOURCE"):
        reader.get_tensor("handle")
    assert reader.bundle.read_raw("handle") == blob
    assert main(["inspect", str(prefix)]) == 0 and "DT_RESOURCE" in capsys.readouterr().out
    assert main(["verify", "-q", str(prefix)]) == 0
    capsys.readouterr()
    sc.merge_bundles([str(prefix)], str(tmp_path / "m"))
    assert sc.BundleReader(tmp_path / "m").read_raw("handle") == blob


def test_diff_and_convert_take_a_v1_checkpoint(records: dict[str, Any], tmp_path: Path) -> None:
    path = records["v1"]["path"]
    report = diff_tensors(path, Path(path).parent)
    assert report.identical and len(report.tensors) == 9
    out = checkpoint_to_safetensors(path, tmp_path / "v1.safetensors", skip_unsupported=True)
    assert sorted(n for n, _ in out.skipped) == ["ss", "st"]
    back = diff_tensors(path, tmp_path / "v1.safetensors")
    assert back.only_in_a == ["ss", "st"] and all(t.equal for t in back.tensors)


def test_closest_names_among_many_find_a_typo_at_either_end_or_inside() -> None:
    from shardckpt.format.reader import close_matches

    names = [f"layer_{i}/dense/kernel" for i in range(20000)] + [f"layer_{i}/bias" for i in range(20000)]
    assert close_matches("layer_5000/dense/kernal", names)[0] == "layer_5000/dense/kernel"
    assert close_matches("layr_17/bias", names)[0] == "layer_17/bias"
    assert close_matches("layer_123/dnse/kernel", names)[0] == "layer_123/dense/kernel"
