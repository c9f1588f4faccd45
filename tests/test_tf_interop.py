"""Interoperability with real TensorFlow (tensorflow-cpu), in both directions.

Every test writes the same tensors twice, once through ``tf.raw_ops.SaveV2`` (or
``MergeV2Checkpoints``, ``tf.train.Checkpoint``, DTensor's ``sharded_save``) and once
through shardckpt, then checks that

- TensorFlow (``RestoreV2`` and ``tf.train.load_checkpoint``) reads our files,
- shardckpt (``BundleReader`` and ``load_checkpoint``) reads TensorFlow's files,
- the values are identical bit for bit (NaN payloads included), and
- for single-writer saves and merges, the files themselves are identical byte for byte.

DTensor checkpoints need a process whose CPU was split into logical devices before
any other TensorFlow use, so they are written by ``tests/tf_dtensor_helper.py`` in a
subprocess.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import shardckpt  # noqa: E402
from shardckpt import DataType  # noqa: E402
from shardckpt.format import BundleReader, BundleWriter, decode_slice_key, merge_bundles  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = ".data-00000-of-00001"


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One TF dtype: how TF names it, how we are told about it, and the numpy array that holds it."""

    key: str
    tf_dtype: tf.DType
    ours: DataType | None  # passed as dtype= to BundleWriter; None means inferred from the numpy dtype
    np_dtype: np.dtype  # what both readers return (storage ints for quantized types, object for strings)
    enum: int  # the DataType value on disk


def _kinds() -> dict[str, Kind]:
    plain = {
        "float32": np.float32,
        "float64": np.float64,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
        "float16": np.float16,
        "complex64": np.complex64,
        "complex128": np.complex128,
        "bfloat16": ml_dtypes.bfloat16,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
        "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
        "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
        "float8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz,
        "int4": ml_dtypes.int4,
        "uint4": ml_dtypes.uint4,
    }
    for key in ("int2", "uint2", "float4_e2m1fn"):  # DataType 31-33, in ml_dtypes >= 0.5
        if hasattr(ml_dtypes, key):
            plain[key] = getattr(ml_dtypes, key)
    out: dict[str, Kind] = {}
    for key, np_type in plain.items():
        try:
            tfd = tf.dtypes.as_dtype(np_type)
        except TypeError:  # a TensorFlow without this type: nothing to compare against
            continue
        out[key] = Kind(key, tfd, None, np.dtype(np_type), tfd.as_datatype_enum)
    quantized = {
        "qint8": (tf.qint8, DataType.QINT8, np.int8),
        "quint8": (tf.quint8, DataType.QUINT8, np.uint8),
        "qint16": (tf.qint16, DataType.QINT16, np.int16),
        "quint16": (tf.quint16, DataType.QUINT16, np.uint16),
        "qint32": (tf.qint32, DataType.QINT32, np.int32),
    }
    for key, (tfd, ours, storage) in quantized.items():
        out[key] = Kind(key, tfd, ours, np.dtype(storage), tfd.as_datatype_enum)
    out["string"] = Kind("string", tf.string, None, np.dtype(object), tf.string.as_datatype_enum)
    return out


KINDS = _kinds()
SHAPES = [(), (0, 3), (7,), (2, 3), (2, 3, 4), (3, 1, 2, 2), (2, 2, 1, 3, 2)]
STRING_POOL = [
    b"",
    b"\x00\xff",
    b"hello",
    "ünïcødé ✓ 名前".encode(),
    b"\x00",
    b"",
    bytes(range(256)),
    b"x" * 300,
]


def make_value(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Arbitrary bit patterns (NaNs, infinities, subnormals included) valid for the type."""
    k = KINDS[kind]
    n = int(np.prod(shape, dtype=np.int64))
    if kind == "string":
        start = int(rng.integers(0, len(STRING_POOL)))
        flat = np.empty(n, dtype=object)
        for i in range(n):
            flat[i] = STRING_POOL[(start + i) % len(STRING_POOL)]
        return flat.reshape(shape)
    if kind == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind in ("int4", "uint4", "float4_e2m1fn"):  # one element per byte, value in the low nibble
        return rng.integers(0, 16, size=shape, dtype=np.uint8).view(k.np_dtype)
    if kind in ("int2", "uint2"):  # one element per byte, value in the low 2 bits
        return rng.integers(0, 4, size=shape, dtype=np.uint8).view(k.np_dtype)
    raw = rng.integers(0, 256, size=n * k.np_dtype.itemsize, dtype=np.uint8)
    return raw.view(k.np_dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One SaveV2 argument: name, shape_and_slice, value, and the kind key."""

    name: str | bytes
    spec: str
    value: np.ndarray
    kind: str


def tf_save(prefix: Path | str, items: list[Item]) -> None:
    # SaveV2 creates dirname(prefix) but not its parents (our writer creates them all).
    Path(prefix).parent.parent.mkdir(parents=True, exist_ok=True)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=[it.name for it in items],
        shape_and_slices=[it.spec for it in items],
        tensors=[tf.constant(it.value, dtype=KINDS[it.kind].tf_dtype) for it in items],
    )


def our_save(prefix: Path | str, items: list[Item]) -> None:
    w = BundleWriter(prefix)
    for it in items:
        dtype = KINDS[it.kind].ours
        if it.spec:
            w.add_slice(it.name, it.spec, it.value, dtype=dtype)
        else:
            w.add(it.name, it.value, dtype=dtype)
    w.finish()


def save_both(tmp_path: Path, items: list[Item]) -> tuple[Path, Path]:
    """The same items saved by TensorFlow at ``tmp_path/tf/ckpt`` and by shardckpt at ``tmp_path/us/ckpt``;
    the two prefixes (theirs, ours)."""
    theirs, ours = tmp_path / "tf" / "ckpt", tmp_path / "us" / "ckpt"
    tf_save(theirs, items)
    our_save(ours, items)
    return theirs, ours


def tf_restore(prefix: Path | str, requests: list[tuple[str | bytes, str, str]]) -> list[np.ndarray]:
    """RestoreV2 of ``(name, shape_and_slice, kind)`` triples, as numpy arrays."""
    out = tf.raw_ops.RestoreV2(
        prefix=str(prefix),
        tensor_names=[r[0] for r in requests],
        shape_and_slices=[r[1] for r in requests],
        dtypes=[KINDS[r[2]].tf_dtype for r in requests],
    )
    return [t.numpy() for t in out]


def assert_same(got: object, want: np.ndarray, what: object = "") -> None:
    """Same shape, same dtype, same bits (strings: same bytes)."""
    if want.dtype == object:
        got = np.asarray(got, dtype=object)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert [bytes(x) for x in got.reshape(-1)] == [bytes(x) for x in want.reshape(-1)], what
        return
    got = np.asarray(got)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.tobytes() == want.tobytes(), (what, got, want)


def slice_of(value: np.ndarray, spec: str) -> np.ndarray:
    """The part of ``value`` a shape_and_slice string selects (computed independently of shardckpt)."""
    if not spec:
        return value
    *dims, sl = spec.split(" ")
    assert tuple(int(d) for d in dims) == value.shape
    index = []
    for piece in (p for p in sl.split(":") if p):
        if piece == "-":
            index.append(slice(None))
        else:
            start, length = (int(x) for x in piece.split(","))
            index.append(slice(start, start + length))
    return value[tuple(index)]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``: relative path -> bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_files(theirs: Path, ours: Path) -> None:
    """Both directory trees hold the same file names with the same bytes (with a readable diff), apart from our
    chunk-checksum sidecars (``<data file>.crc32c``, which TensorFlow never opens): one beside each data file."""
    a, b = snapshot(theirs), snapshot(ours)
    sidecars = {n for n in b if n.endswith(".crc32c")}
    assert {n.removesuffix(".crc32c") for n in sidecars} == {n for n in b if ".data-" in n and n not in sidecars}
    b = {n: v for n, v in b.items() if n not in sidecars}
    assert sorted(a) == sorted(b), f"file sets differ: TF {sorted(a)} vs ours {sorted(b)}"
    for name in a:
        x, y = a[name], b[name]
        if x != y:
            at = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
            pytest.fail(
                f"{name}: TF wrote {len(x)} bytes, we wrote {len(y)}; first difference at byte {at}: "
                f"TF {x[at : at + 16].hex()} vs ours {y[at : at + 16].hex()}"
            )


def index_data_blocks(prefix: Path) -> int:
    """How many data blocks the .index SSTable has (its index block has one restart per entry)."""
    data = Path(f"{prefix}.index").read_bytes()
    footer = data[-48:]
    assert footer[-8:] == bytes.fromhex("57fb808b247547db")
    values, pos = [], 0
    for _ in range(4):
        v = shift = 0
        while True:
            byte = footer[pos]
            pos += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(v)
    offset, size = values[2], values[3]
    (count,) = struct.unpack_from("<I", data, offset + size - 4)
    return count


def tf_numpy_dtype(dtype: tf.DType) -> np.dtype:
    """What shardckpt's dtype map should say for a TF dtype."""
    if dtype == tf.string:
        return np.dtype(object)
    for k in KINDS.values():
        if k.tf_dtype == dtype:
            return k.np_dtype
    raise AssertionError(f"unexpected dtype {dtype}")


# TensorFlow cannot assemble DT_STRING tensors: RestoreV2 (and tf.train.load_checkpoint) of a partitioned
# string tensor, or of any slice that is not exactly one stored slice, fails with this message.  shardckpt
# assembles them; the tests pin TF's refusal so a change in TensorFlow is noticed.
TF_STRING_ASSEMBLY = "Dtype string not supported"


def assert_tf_cannot_assemble(prefix: Path | str, name: str, spec: str) -> None:
    with pytest.raises(tf.errors.OpError, match=TF_STRING_ASSEMBLY):
        tf_restore(prefix, [(name, spec, "string")])


def assert_readers_agree(prefix: Path | str, tf_unreadable: frozenset[str] = frozenset()) -> None:
    """shardckpt.load_checkpoint and tf.train.load_checkpoint see the same names, shapes, dtypes, values.

    ``tf_unreadable`` names partitioned string tensors, which TensorFlow refuses to assemble.
    """
    theirs = tf.train.load_checkpoint(str(prefix))
    ours = shardckpt.load_checkpoint(prefix)
    shapes = theirs.get_variable_to_shape_map()
    assert ours.get_variable_to_shape_map() == shapes
    dtypes = ours.get_variable_to_dtype_map()
    assert dtypes == {n: tf_numpy_dtype(d) for n, d in theirs.get_variable_to_dtype_map().items()}
    assert shardckpt.list_variables(prefix) == tf.train.list_variables(str(prefix))
    for name in shapes:
        assert ours.has_tensor(name)
        if name in tf_unreadable:
            with pytest.raises(ValueError, match=TF_STRING_ASSEMBLY):  # the Python reader's error type
                theirs.get_tensor(name)
            continue
        want = theirs.get_tensor(name)
        want = np.asarray(want, dtype=object) if dtypes[name] == np.dtype(object) else np.asarray(want)
        assert_same(ours.get_tensor(name), want, name)


# --------------------------------------------------------------------------------------------------
# 1 + 2 + 7: every dtype, scalars, empty tensors, rank 1-5, byte-identical single-writer files
# --------------------------------------------------------------------------------------------------


def test_tensorflow_knows_every_dtype_we_claim():
    """The dtype table is complete for this TensorFlow and its enum values are what we write."""
    expected = {
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "int4",
        "uint4",
        "bfloat16",
    }
    expected |= {k for k in ("int2", "uint2", "float4_e2m1fn") if hasattr(ml_dtypes, k)}
    assert expected <= set(KINDS), sorted(expected - set(KINDS))
    for k in KINDS.values():
        ours = k.ours if k.ours is not None else shardckpt.format.dtypes.from_numpy(k.np_dtype)
        assert int(ours) == k.enum, k


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_dtype_and_rank_both_directions(tmp_path, kind):
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    items = [
        Item(f"{kind}/rank{len(shape)}_{'x'.join(map(str, shape)) or 'scalar'}", "", make_value(kind, shape, rng), kind)
        for shape in SHAPES
    ]
    items.reverse()  # data in argument order, index in key order: make them differ
    save_both(tmp_path, items)

    # Byte-identical .index and .data, and nothing else left behind (no temp files).
    assert_same_files(tmp_path / "tf", tmp_path / "us")

    # TensorFlow reads ours.
    ours = tmp_path / "us" / "ckpt"
    restored = tf_restore(ours, [(it.name, "", kind) for it in items])
    for it, got in zip(items, restored):
        assert_same(got, it.value, it.name)
    reader = tf.train.load_checkpoint(str(ours))
    assert reader.get_variable_to_shape_map() == {it.name: list(it.value.shape) for it in items}
    assert reader.get_variable_to_dtype_map() == {it.name: KINDS[kind].tf_dtype for it in items}
    for it in items:
        got = reader.get_tensor(it.name)
        assert_same(np.asarray(got, dtype=object) if kind == "string" else got, it.value, it.name)

    # We read TensorFlow's.
    theirs = tmp_path / "tf" / "ckpt"
    with BundleReader(theirs) as br:
        assert br.header.num_shards == 1
        for it in items:
            e = br.entry(it.name)
            assert e.dtype == KINDS[kind].enum
            assert e.shape == it.value.shape
            assert_same(br.read(it.name), it.value, it.name)
    c = shardckpt.load_checkpoint(theirs)
    assert c.get_variable_to_shape_map() == {it.name: list(it.value.shape) for it in items}
    assert c.get_variable_to_dtype_map() == {it.name: KINDS[kind].np_dtype for it in items}
    for it in items:
        assert_same(c.get_tensor(it.name), it.value, it.name)
    assert_readers_agree(theirs)


def broad_mix(rng: np.random.Generator) -> tuple[list[Item], dict[str, tuple[np.ndarray, str]]]:
    """Every dtype, every rank, partitioned and string tensors, big tensors, names out of key order.

    Returns the SaveV2 arguments and the whole tensors they make.
    """
    items: list[Item] = []
    for i, kind in enumerate(sorted(KINDS)):
        shape = SHAPES[i % len(SHAPES)]
        items.append(Item(f"mix/{kind}", "", make_value(kind, shape, rng), kind))
        items.append(Item(f"Mix/{kind}/scalar", "", make_value(kind, (), rng), kind))
    wholes = {it.name: (it.value, it.kind) for it in items}
    big = rng.standard_normal((1000, 300)).astype(np.float32)  # > 256 KiB per slice: the direct-write path
    part = rng.integers(-(2**31), 2**31, (4, 6)).astype(np.int32)
    strs = make_value("string", (6,), rng)
    huge = rng.standard_normal((1_200_000,)).astype(np.float64)  # > 4 MiB: written in several chunks
    long_strings = np.array([b"\xfe" * 300_000, b"", b"a"], dtype=object)
    scalar = np.array(1.5, np.float32)
    wholes.update(
        {
            "zz/partitioned": (part, "int32"),
            "big": (big, "float32"),
            "strings/part": (strs, "string"),
            "huge": (huge, "float64"),
            "long string": (long_strings, "string"),
            "A": (part, "int32"),
            "a": (part, "int32"),
            "é": (scalar, "float32"),
        }
    )
    items += [
        Item("zz/partitioned", "4 6 2,2:-", part[2:4], "int32"),
        Item("big", "1000 300 600,400:-", big[600:], "float32"),
        Item("strings/part", "6 3,3", strs[3:], "string"),
        Item("huge", "", huge, "float64"),
        Item("zz/partitioned", "4 6 0,2:0,3", part[0:2, 0:3], "int32"),
        Item("big", "1000 300 0,600:-", big[:600], "float32"),
        Item("zz/partitioned", "4 6 0,2:3,3", part[0:2, 3:6], "int32"),
        Item("strings/part", "6 0,3", strs[:3], "string"),
        Item("long string", "", long_strings, "string"),
        Item("A", "4 6 -:-", part, "int32"),  # a full slice is stored as a plain entry
        Item("a", "4 6 0,4:0,6", part, "int32"),
        Item("é", "", scalar, "float32"),
    ]
    return items, wholes


def test_broad_mix_is_byte_identical_and_cross_readable(tmp_path):
    items, wholes = broad_mix(np.random.default_rng(1))
    save_both(tmp_path, items)
    assert_same_files(tmp_path / "tf", tmp_path / "us")

    names = sorted(wholes)
    tf_names = [n for n in names if n != "strings/part"]  # TF cannot assemble a partitioned string tensor
    strs = wholes["strings/part"][0]
    for prefix in (tmp_path / "us" / "ckpt", tmp_path / "tf" / "ckpt"):
        for name, got in zip(tf_names, tf_restore(prefix, [(n, "", wholes[n][1]) for n in tf_names])):
            assert_same(got, wholes[name][0], (prefix, name))
        got = tf_restore(prefix, [("strings/part", "6 0,3", "string"), ("strings/part", "6 3,3", "string")])
        assert_same(got[0], strs[:3])
        assert_same(got[1], strs[3:])
        assert_tf_cannot_assemble(prefix, "strings/part", "")
        with BundleReader(prefix) as br:
            assert not br.entry("A").slices and not br.entry("a").slices
            assert len(br.entry("zz/partitioned").slices) == 3
            for name in names:
                assert_same(br.read(name), wholes[name][0], (prefix, name))
        assert_readers_agree(prefix, frozenset({"strings/part"}))


# --------------------------------------------------------------------------------------------------
# 3: partitioned tensors
# --------------------------------------------------------------------------------------------------


def partitioned_case(rng: np.random.Generator):
    v = rng.standard_normal((4, 6)).astype(np.float32)
    s = make_value("string", (5,), rng)
    w = rng.integers(-(2**40), 2**40, (4, 2, 6)).astype(np.int64)
    bf = rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)
    q = rng.integers(-128, 128, (6, 2)).astype(np.int8)
    big = rng.standard_normal((512, 300)).astype(np.float32)
    fulls = {
        "v": (v, "float32"),
        "s": (s, "string"),
        "w": (w, "int64"),
        "bf": (bf, "bfloat16"),
        "q": (q, "qint8"),
        "big": (big, "float32"),
        "dense": (rng.standard_normal((10,)).astype(np.float64), "float64"),
    }
    specs = [  # interleaved names, several slices of each name in one SaveV2 call
        ("v", "4 6 0,2:-"),
        ("s", "5 0,2"),
        ("v", "4 6 2,2:0,3"),
        ("w", "4 2 6 0,4:-:0,2"),
        ("dense", ""),
        ("bf", "3 4 1,2:-"),
        ("q", "6 2 4,2:-"),
        ("v", "4 6 2,2:3,3"),
        ("s", "5 2,3"),
        ("w", "4 2 6 -:0,2:2,4"),  # '-' and an explicit full extent mixed
        ("bf", "3 4 0,1:-"),
        ("q", "6 2 0,4:0,1"),
        ("big", "512 300 0,256:-"),
        ("q", "6 2 0,4:1,1"),
        ("big", "512 300 256,256:-"),
    ]
    items = [Item(name, spec, slice_of(fulls[name][0], spec), fulls[name][1]) for name, spec in specs]
    reads = [  # (name, request); "" = whole tensor
        *((name, "") for name in fulls),
        ("v", "4 6 1,2:2,3"),  # spans all three stored slices
        ("v", "4 6 0,4:2,2"),  # spans all three stored slices
        ("v", "4 6 2,2:3,3"),  # exactly one stored slice
        ("v", "4 6 -:5,1"),
        ("s", "5 0,2"),  # exactly a stored slice of a string tensor
        ("s", "5 2,3"),
        ("s", "5 1,3"),  # spans two stored slices of a string tensor (TF cannot)
        ("s", "5 4,1"),  # part of a stored slice (TF cannot)
        ("w", "4 2 6 1,2:1,1:1,3"),  # spans two
        ("bf", "3 4 0,2:1,2"),
        ("q", "6 2 3,2:-"),
        ("big", "512 300 250,10:7,100"),
        ("dense", "10 3,4"),  # a slice of an unpartitioned tensor
    ]
    return fulls, items, reads


def test_partitioned_tensors_both_directions(tmp_path):
    fulls, items, reads = partitioned_case(np.random.default_rng(3))
    theirs, ours = save_both(tmp_path, items)
    assert_same_files(tmp_path / "tf", tmp_path / "us")

    # The index lists only full names, with full shapes; the slices are on the full entry.
    with BundleReader(theirs) as br:
        assert {n: e.shape for n, e in br.entries()} == {n: v.shape for n, (v, _) in fulls.items()}
        assert len(br.entry("v").slices) == 3
        assert len(br.entry("q").slices) == 3
        assert not br.entry("dense").slices
        slice_keys = [k for k, _ in br.raw_entries() if k[0] == 0]
        assert len(slice_keys) == sum(1 for it in items if it.spec)
        assert {decode_slice_key(k)[0].decode() for k in slice_keys} == {it.name for it in items if it.spec}

    requests = [(name, spec, fulls[name][1]) for name, spec in reads]
    expected = [slice_of(fulls[name][0], spec) for name, spec in reads]
    tf_cannot = {("s", ""), ("s", "5 1,3"), ("s", "5 4,1")}
    for prefix in (ours, theirs):
        # TensorFlow: RestoreV2 of wholes and of slices spanning several stored slices.
        tf_ok = [i for i, r in enumerate(requests) if r[:2] not in tf_cannot]
        for i, got in zip(tf_ok, tf_restore(prefix, [requests[i] for i in tf_ok])):
            assert_same(got, expected[i], (prefix, requests[i]))
        for name, spec in sorted(tf_cannot):
            assert_tf_cannot_assemble(prefix, name, spec)
        # shardckpt: the same reads.
        with BundleReader(prefix) as br:
            for (name, spec, _), want in zip(requests, expected):
                got = br.read_slice(name, spec) if spec else br.read(name)
                assert_same(got, want, (prefix, name, spec))
        c = shardckpt.load_checkpoint(prefix)
        for (name, spec, _), want in zip(requests, expected):
            if spec:
                assert_same(c.get_slice(name, spec), want, (prefix, name, spec))
        assert_readers_agree(prefix, frozenset({"s"}))  # tf.train.load_checkpoint assembles them too


def test_uncovered_slices_fail_in_both(tmp_path):
    """A partitioned tensor missing a part: TF and shardckpt both refuse to assemble it, both serve the part."""
    v = np.arange(24, dtype=np.float32).reshape(4, 6)
    items = [Item("v", "4 6 0,2:-", v[:2], "float32"), Item("v", "4 6 3,1:-", v[3:], "float32")]
    theirs, ours = save_both(tmp_path, items)
    assert_same_files(tmp_path / "tf", tmp_path / "us")
    for prefix in (theirs, ours):
        for spec in ("", "4 6 1,2:-"):
            with pytest.raises(tf.errors.InvalidArgumentError, match="sufficient slices"):
                tf_restore(prefix, [("v", spec, "float32")])
            with BundleReader(prefix) as br, pytest.raises(shardckpt.InsufficientSlicesError):
                br.read_slice("v", spec) if spec else br.read("v")
        (got,) = tf_restore(prefix, [("v", "4 6 0,1:1,2", "float32")])
        assert_same(got, v[0:1, 1:3])
        with BundleReader(prefix) as br:
            assert_same(br.read_slice("v", "4 6 0,1:1,2"), v[0:1, 1:3])
            assert_same(br.read_slice("v", "4 6 3,1:-"), v[3:])


def test_overlapping_slices_written_alike_and_refused_alike(tmp_path):
    """SaveV2 accepts overlapping slices of one tensor; neither reader assembles them."""
    v = np.arange(24, dtype=np.float32).reshape(4, 6)
    items = [Item("v", "4 6 0,3:-", v[:3], "float32"), Item("v", "4 6 2,2:-", v[2:], "float32")]
    theirs, ours = save_both(tmp_path, items)
    assert_same_files(tmp_path / "tf", tmp_path / "us")
    for prefix in (theirs, ours):
        with pytest.raises(tf.errors.InternalError, match="Overlapping slices"):
            tf_restore(prefix, [("v", "", "float32")])
        with BundleReader(prefix) as br, pytest.raises(shardckpt.CorruptCheckpointError, match="overlapping"):
            br.read("v")


def test_unusual_slice_specs_byte_identical(tmp_path):
    """Zero-size slices, starts that need long ordered-code encodings, and odd but valid spec syntax."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    items = [
        Item("empty", "0 4 -:0,2", np.zeros((0, 2), np.float32), "float32"),
        Item("empty", "0 4 -:2,2", np.zeros((0, 2), np.float32), "float32"),
        Item("empty_full", "0 -", np.zeros((0,), np.int8), "int8"),  # a full slice: a plain entry
        Item("far", "8589934592 1 8589934590,2:-", np.array([[1.0], [2.0]], np.float32), "float32"),
        Item("far", "8589934592 1 100,3:-", np.array([[3.0], [4.0], [5.0]], np.float32), "float32"),
        Item("farther", "4611686018427387904 1 4611686018427387900,4:-", np.arange(4, dtype=np.int8)[:, None], "int8"),
        Item("max", "9223372036854775807 1 9223372036854775806,1:-", np.array([[7]], np.int64), "int64"),
        Item("w", "4 6 :0,2:-:", w[0:2], "float32"),  # empty pieces are skipped
        Item("w", "4 6 2,2::-", w[2:4], "float32"),
        Item("plus", "4 6 +0,2:-", w[0:2], "float32"),  # strtoll-style sign accepted
        Item("s", "3 0,1", np.array([b"\x00\xff"], dtype=object), "string"),
        Item("s", "3 1,2", np.array([b"", b"abc"], dtype=object), "string"),
    ]
    theirs, ours = save_both(tmp_path, items)
    assert_same_files(tmp_path / "tf", tmp_path / "us")
    reads = [
        ("far", "8589934592 1 8589934590,2:-", "float32", np.array([[1.0], [2.0]], np.float32)),
        ("far", "8589934592 1 8589934591,1:-", "float32", np.array([[2.0]], np.float32)),
        ("far", "8589934592 1 101,2:-", "float32", np.array([[4.0], [5.0]], np.float32)),
        ("farther", "4611686018427387904 1 4611686018427387901,2:-", "int8", np.array([[1], [2]], np.int8)),
        # the full tensor would be 2^66 bytes; TF still reads its slice, and so must we
        ("max", "9223372036854775807 1 9223372036854775806,1:-", "int64", np.array([[7]], np.int64)),
        ("w", "", "float32", w),
        ("w", "4 6 1,2:1,4", "float32", w[1:3, 1:5]),
        ("plus", "4 6 0,2:-", "float32", w[0:2]),
        ("empty", "", "float32", np.zeros((0, 4), np.float32)),
        ("empty_full", "", "int8", np.zeros((0,), np.int8)),
        ("s", "3 1,2", "string", np.array([b"", b"abc"], dtype=object)),
    ]
    for prefix in (theirs, ours):
        for (name, spec, _, want), got in zip(reads, tf_restore(prefix, [r[:3] for r in reads])):
            assert_same(got, want, (prefix, name, spec))
        with BundleReader(prefix) as br:
            for name, spec, _, want in reads:
                assert_same(br.read_slice(name, spec), want, (prefix, name, spec))
            assert br.entry("far").shape == (8589934592, 1)
            assert not br.entry("empty_full").slices
            assert_same(br.read("s"), np.array([b"\x00\xff", b"", b"abc"], dtype=object))


# --------------------------------------------------------------------------------------------------
# 4: an index of several 256 KiB blocks
# --------------------------------------------------------------------------------------------------

GROUPS = ["encoder", "décodeur", "注意力", "слой", "Ωmega", "z"]


def long_name(i: int) -> str:
    group = GROUPS[i % len(GROUPS)]
    return f"{group}/block_{(i * 7) % 3000:04d}/" + "ünïcødé_παράμετρος_" * (3 + i % 5) + f"kernel_{i:04d}"


def many_tensors(n: int, rng: np.random.Generator) -> list[Item]:
    kinds = ["float32", "int64", "string", "float16", "bfloat16", "bool"]
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        items.append(Item(long_name(i), "", make_value(kind, ((), (2,), (1,), (3,), (), (2, 1))[i % 6], rng), kind))
    return items


def test_three_thousand_tensors_multi_block_index(tmp_path):
    items = many_tensors(3000, np.random.default_rng(4))
    theirs, ours = save_both(tmp_path, items)
    assert Path(f"{theirs}.index").stat().st_size > 2 * 262144
    assert index_data_blocks(theirs) >= 3
    assert_same_files(tmp_path / "tf", tmp_path / "us")

    by_name = {it.name: it for it in items}
    for prefix in (ours, theirs):
        restored = tf_restore(prefix, [(it.name, "", it.kind) for it in items])
        for it, got in zip(items, restored):
            assert_same(got, it.value, it.name)
        assert [n for n, _ in tf.train.list_variables(str(prefix))] == sorted(by_name, key=lambda s: s.encode())
        with BundleReader(prefix) as br:
            names = [n for n, _ in br.entries()]
            assert names == sorted(by_name, key=lambda s: s.encode())
            for name in names:
                assert_same(br.read(name), by_name[name].value, name)
    assert_readers_agree(theirs)


def test_huge_keys_and_non_utf8_names(tmp_path):
    """Entries of 2 x 256 KiB or more get a block of their own; last keys of 0xff bytes have no successor."""
    big = "h" * (600 * 1024)
    names: list[str | bytes] = ["a", big, "z" + big, "\u00e9" * 10, b"\xff\xfe", b"\xff\xff"]
    items = [Item(n, "", np.array([i, -i], np.int32), "int32") for i, n in enumerate(names)]
    theirs, ours = save_both(tmp_path, items)
    assert index_data_blocks(theirs) >= 3
    assert_same_files(tmp_path / "tf", tmp_path / "us")
    for prefix in (ours, theirs):
        for it, got in zip(items, tf_restore(prefix, [(it.name, "", "int32") for it in items])):
            assert_same(got, it.value)
        with BundleReader(prefix) as br:
            for it in items:
                assert_same(br.read(it.name), it.value)


# --------------------------------------------------------------------------------------------------
# 5: tf.train.Checkpoint, MergeV2Checkpoints and merge_bundles
# --------------------------------------------------------------------------------------------------


def test_tf_train_checkpoint_read_by_us_and_rewritten_byte_identical(tmp_path):
    rng = np.random.default_rng(5)
    values = {
        "kernel": rng.standard_normal((3, 4)).astype(np.float32),
        "step": np.array(7, np.int64),
        "mask": rng.integers(0, 2, (5,)).astype(bool),
        "half": rng.standard_normal((2, 2)).astype(np.float16),
        "names": np.array([b"a", b"", b"\x00\xff", "ü".encode()], dtype=object),
    }
    root = tf.train.Checkpoint(**{k: tf.Variable(v) for k, v in values.items()})
    root.layer = tf.train.Checkpoint(bias=tf.Variable(np.arange(4, dtype=np.float64)))
    path = root.save(str(tmp_path / "tf" / "ckpt"))
    assert sorted(os.listdir(tmp_path / "tf")) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]

    reader = shardckpt.load_checkpoint(path)
    for key, want in values.items():
        assert_same(reader.get_tensor(f"{key}/.ATTRIBUTES/VARIABLE_VALUE"), want, key)
    assert_same(reader.get_tensor("layer/bias/.ATTRIBUTES/VARIABLE_VALUE"), np.arange(4, dtype=np.float64))
    assert_same(reader.get_tensor("save_counter/.ATTRIBUTES/VARIABLE_VALUE"), np.array(1, np.int64))
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in reader.get_variable_to_shape_map()
    assert_readers_agree(path)
    assert shardckpt.load_checkpoint(tmp_path / "tf").prefix == path  # a directory resolves via its state file
    assert shardckpt.latest_checkpoint(tmp_path / "tf") == tf.train.latest_checkpoint(str(tmp_path / "tf"))

    # Rewrite every tensor with shardckpt in TF's data order: the bundle is byte-identical to TF's, and
    # tf.train.Checkpoint restores from it.
    with BundleReader(path) as br:
        order = sorted(((e.offset, name) for name, e in br.entries()))
        rewritten = tmp_path / "us" / "ckpt-1"
        with BundleWriter(rewritten) as w:
            for _, name in order:
                w.add(name, br.read(name), dtype=br.entry(name).dtype)
    for suffix in (".index", DATA):
        assert Path(f"{rewritten}{suffix}").read_bytes() == Path(f"{path}{suffix}").read_bytes(), suffix

    fresh = tf.train.Checkpoint(
        **{k: tf.Variable(np.zeros_like(v) if v.dtype != object else v[::-1]) for k, v in values.items()}
    )
    fresh.layer = tf.train.Checkpoint(bias=tf.Variable(np.zeros(4)))
    fresh.restore(str(rewritten)).assert_consumed()
    for key, want in values.items():
        got = getattr(fresh, key).numpy()
        assert_same(np.asarray(got, dtype=object) if want.dtype == object else got, want, key)
    assert_same(fresh.layer.bias.numpy(), np.arange(4, dtype=np.float64))


def merge_inputs(rng: np.random.Generator) -> tuple[list[list[Item]], dict[str, tuple[np.ndarray, str]]]:
    """Three single-writer bundles; a partitioned tensor whose slices are spread over all three."""
    p = rng.standard_normal((6, 4)).astype(np.float32)
    s = make_value("string", (4,), rng)
    fulls = {
        "p": (p, "float32"),
        "s": (s, "string"),
        "a": (rng.integers(0, 100, (3,)).astype(np.int64), "int64"),
        "b/ü": (make_value("bfloat16", (2, 2), rng), "bfloat16"),
        "c": (make_value("string", (3,), rng), "string"),
        "d": (make_value("qint32", (2,), rng), "qint32"),
        "e": (make_value("float8_e4m3fn", (0, 3), rng), "float8_e4m3fn"),
    }
    parts = [
        [
            Item("p", "6 4 0,2:-", p[0:2], "float32"),
            Item("a", "", fulls["a"][0], "int64"),
            Item("s", "4 0,1", s[0:1], "string"),
        ],
        [
            Item("b/ü", "", fulls["b/ü"][0], "bfloat16"),
            Item("p", "6 4 2,2:-", p[2:4], "float32"),
            Item("c", "", fulls["c"][0], "string"),
        ],
        [
            Item("p", "6 4 4,2:-", p[4:6], "float32"),
            Item("s", "4 1,3", s[1:], "string"),
            Item("d", "", fulls["d"][0], "qint32"),
            Item("e", "", fulls["e"][0], "float8_e4m3fn"),
        ],
    ]
    return parts, fulls


def check_merged(prefix: Path, fulls: dict[str, tuple[np.ndarray, str]]) -> None:
    names = sorted(n for n in fulls if n != "s")  # "s" is a partitioned string tensor: TF reads its slices only
    requests = [(n, "", fulls[n][1]) for n in names] + [
        ("p", "6 4 1,4:1,2", "float32"),
        ("s", "4 0,1", "string"),
        ("s", "4 1,3", "string"),
    ]
    expected = [fulls[n][0] for n in names] + [fulls["p"][0][1:5, 1:3], fulls["s"][0][0:1], fulls["s"][0][1:]]
    for (name, spec, _), got, want in zip(requests, tf_restore(prefix, requests), expected):
        assert_same(got, want, (name, spec))
    assert_tf_cannot_assemble(prefix, "s", "")
    with BundleReader(prefix) as br:
        for (name, spec, _), want in zip(requests, expected):
            assert_same(br.read_slice(name, spec), want, (name, spec))
        assert_same(br.read("s"), fulls["s"][0])
        assert_same(br.read_slice("s", "4 0,2"), fulls["s"][0][0:2])
    assert_readers_agree(prefix, frozenset({"s"}))


def test_merge_v2_checkpoints_vs_merge_bundles(tmp_path):
    parts, fulls = merge_inputs(np.random.default_rng(6))
    order = [2, 0, 1]  # merged shard ids follow input order, not part numbers
    for side, save in (("tf", tf_save), ("us", our_save)):
        for i, items in enumerate(parts):
            save(tmp_path / side / "ckpt_temp" / f"part-{i:05d}-of-00003", items)
    # Both writers produced identical parts.
    assert_same_files(tmp_path / "tf", tmp_path / "us")

    srcs = [str(tmp_path / "tf" / "ckpt_temp" / f"part-{i:05d}-of-00003") for i in order]
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=srcs, destination_prefix=str(tmp_path / "tf" / "ckpt"))
    header = merge_bundles(
        [tmp_path / "us" / "ckpt_temp" / f"part-{i:05d}-of-00003" for i in order], tmp_path / "us" / "ckpt"
    )
    assert header.num_shards == 3

    # Same files (inputs' indexes deleted, data files renamed, empty temp dir removed), same bytes.
    assert_same_files(tmp_path / "tf", tmp_path / "us")
    assert not (tmp_path / "tf" / "ckpt_temp").exists()
    assert sorted(os.listdir(tmp_path / "us")) == [
        "ckpt.data-00000-of-00003",
        "ckpt.data-00000-of-00003.crc32c",
        "ckpt.data-00001-of-00003",
        "ckpt.data-00001-of-00003.crc32c",
        "ckpt.data-00002-of-00003",
        "ckpt.data-00002-of-00003.crc32c",
        "ckpt.index",
    ]
    with BundleReader(tmp_path / "tf" / "ckpt") as br:
        assert br.header.num_shards == 3
        assert br.entry("d").shard_id == 0  # part 2 came first
        assert br.entry("a").shard_id == 1
        assert [(s.extents[0][0]) for s in br.entry("p").slices] == [4, 0, 2]

    check_merged(tmp_path / "us" / "ckpt", fulls)  # TF reads our merge
    check_merged(tmp_path / "tf" / "ckpt", fulls)  # we read TF's merge


def test_merge_of_merged_bundles_and_missing_inputs(tmp_path):
    """Multi-shard inputs are renumbered in first-reference order; missing inputs skipped on request."""
    parts, fulls = merge_inputs(np.random.default_rng(8))
    extra = [Item("x/extra", "", np.arange(5, dtype=np.uint16), "uint16")]
    fulls = {**fulls, "x/extra": (extra[0].value, "uint16")}
    for side, save in (("tf", tf_save), ("us", our_save)):
        d = tmp_path / side
        for i, items in enumerate([*parts, extra]):
            save(d / f"t{i}" / "part", items)
    assert_same_files(tmp_path / "tf", tmp_path / "us")

    def tf_merge(srcs, dest, allow_missing=False):
        tf.raw_ops.MergeV2Checkpoints(
            checkpoint_prefixes=[str(s) for s in srcs], destination_prefix=str(dest), allow_missing_files=allow_missing
        )

    def our_merge(srcs, dest, allow_missing=False):
        merge_bundles(srcs, dest, allow_missing_files=allow_missing)

    for side, merge in (("tf", tf_merge), ("us", our_merge)):
        d = tmp_path / side
        merge([d / "t1" / "part", d / "t0" / "part"], d / "m1" / "ckpt")
        merge([d / "nope" / "part", d / "t3" / "part", d / "t2" / "part"], d / "m2" / "ckpt", allow_missing=True)
        merge([d / "m2" / "ckpt", d / "m1" / "ckpt"], d / "final" / "ckpt")
    assert_same_files(tmp_path / "tf", tmp_path / "us")
    with BundleReader(tmp_path / "us" / "final" / "ckpt") as br:
        assert br.header.num_shards == 4
    check_merged(tmp_path / "us" / "final" / "ckpt", fulls)
    check_merged(tmp_path / "tf" / "final" / "ckpt", fulls)

    # Neither merges when an input is missing and allow_missing_files is false.
    with pytest.raises(tf.errors.InvalidArgumentError, match="allow_missing_files"):
        tf_merge([tmp_path / "tf" / "nope" / "part"], tmp_path / "tf" / "z")
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="allow_missing_files"):
        our_merge([tmp_path / "us" / "nope" / "part"], tmp_path / "us" / "z")


def test_merge_bundles_of_our_bundles_read_by_tf(tmp_path):
    """Our own multi-writer flow (no TF in the writing) produces a checkpoint TF restores completely."""
    rng = np.random.default_rng(9)
    full = rng.standard_normal((8, 5)).astype(np.float32)
    table = make_value("int4", (8, 3), rng)
    prefixes = []
    for rank in range(4):
        prefix = tmp_path / f"ckpt_temp/part-{rank:05d}-of-00004"
        with BundleWriter(prefix) as w:
            w.add_slice("w", f"8 5 {2 * rank},2:-", full[2 * rank : 2 * rank + 2])
            w.add_slice("t", f"8 3 {2 * rank},2:-", table[2 * rank : 2 * rank + 2])
            w.add(f"own/{rank}", np.array([rank] * 3, np.int16))
        prefixes.append(prefix)
    merge_bundles(prefixes, tmp_path / "ckpt")
    got = tf_restore(
        tmp_path / "ckpt",
        [
            ("w", "", "float32"),
            ("t", "", "int4"),
            ("w", "8 5 1,6:2,2", "float32"),
            *((f"own/{r}", "", "int16") for r in range(4)),
        ],
    )
    assert_same(got[0], full)
    assert_same(got[1], table)
    assert_same(got[2], full[1:7, 2:4])
    for r in range(4):
        assert_same(got[3 + r], np.array([r] * 3, np.int16))
    theirs = tf.train.load_checkpoint(str(tmp_path / "ckpt"))
    assert theirs.get_variable_to_shape_map() == {"w": [8, 5], "t": [8, 3], **{f"own/{r}": [3] for r in range(4)}}
    assert_same(theirs.get_tensor("w"), full)


# --------------------------------------------------------------------------------------------------
# 6: DTensor sharded_save on a virtual CPU mesh (written in a subprocess)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dtensor_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dtensor")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "tf_dtensor_helper.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, f"DTensor helper failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    meta = json.loads((out / "layouts.json").read_text(encoding="utf-8"))
    raw = np.load(out / "expected.npz")
    expected = {}
    for key, (dtype, shape) in meta["arrays"].items():
        dt = np.dtype(getattr(ml_dtypes, dtype)) if hasattr(ml_dtypes, dtype) else np.dtype(dtype)
        expected[key] = raw[key].view(dt).reshape(shape)
    return out, meta["cases"], expected


def dtensor_specs(
    mesh: list[list], tensors: list[list], shapes: dict[str, tuple[int, ...]]
) -> dict[int, list[tuple[str, str]]]:
    """Spec §7.1: which device saves which (name, shape_and_slice); the lowest device id wins a spec."""
    sizes = [size for _, size in mesh]
    axis = {name: i for i, (name, _) in enumerate(mesh)}
    seen: set[tuple[str, str]] = set()
    out: dict[int, list[tuple[str, str]]] = {}
    for device in range(int(np.prod(sizes))):
        coords = list(np.unravel_index(device, sizes))
        for name, spec in tensors:
            shape = shapes[name]
            if all(s == "unsharded" for s in spec):
                text = ""
            else:
                pieces = []
                for dim, m in zip(shape, spec):
                    if m == "unsharded":
                        pieces.append("-")
                    else:
                        per = dim // sizes[axis[m]]
                        pieces.append(f"{coords[axis[m]] * per},{per}")
                text = " ".join(map(str, shape)) + " " + ":".join(pieces)
            if (name, text) not in seen:
                seen.add((name, text))
                out.setdefault(device, []).append((name, text))
    return out


@pytest.mark.parametrize("case", ["mesh4", "mesh8"])
def test_dtensor_sharded_save_read_by_us(tmp_path, dtensor_out, case):
    out, cases, expected = dtensor_out
    meta = cases[case]
    prefix = meta["prefix"]
    values = {name: expected[f"{case}/{name}"] for name, _ in meta["tensors"]}

    # Values equal the global tensors, for shardckpt and TF alike.
    reader = shardckpt.load_checkpoint(prefix)
    assert reader.get_variable_to_shape_map() == {n: list(v.shape) for n, v in values.items()}
    for name, want in values.items():
        assert_same(reader.get_tensor(name), want, name)
    assert_readers_agree(prefix)

    # Which device stored which slice follows spec §7.1 (merged shard ids = saving devices in order).
    specs = dtensor_specs(meta["mesh"], meta["tensors"], {n: v.shape for n, v in values.items()})
    devices = sorted(specs)
    stored: dict[int, list[tuple[int, str, str]]] = {}
    with BundleReader(prefix) as br:
        assert br.header.num_shards == len(devices)
        for key, e in br.raw_entries():
            if e.slices:
                continue
            if key[0] == 0:
                name_b, tslice = decode_slice_key(key)
                name = name_b.decode()
                spec = " ".join(map(str, values[name].shape)) + " " + tslice.to_string()
            else:
                name, spec = key.decode(), ""
            stored.setdefault(devices[e.shard_id], []).append((e.offset, name, spec))
            # Every stored piece holds the right part of the global tensor.
            piece = br.read(key) if key[0] else br.read_slice(name, spec)
            assert_same(piece, slice_of(values[name], spec), (name, spec))
    assert {d: sorted(v[1:] for v in pieces) for d, pieces in stored.items()} == {
        d: sorted(v) for d, v in specs.items()
    }

    # Re-create the save with shardckpt: per-device bundles at prefix_dev-i-of-N (the data order inside a device
    # is taken from TF's file; TF does not use argument order there), then merge the candidates of every device
    # with allow_missing_files, as DTensor's MergeV2Checkpoints expansion does: byte-identical to TF's result.
    n = int(np.prod([size for _, size in meta["mesh"]]))
    width = len(str(n))
    ours = tmp_path / "ckpt"
    for device, pieces in stored.items():
        with BundleWriter(f"{ours}_dev-{device:0{width}d}-of-{n}") as w:
            for _, name, spec in sorted(pieces):
                w.add_slice(name, spec, slice_of(values[name], spec))
    merge_bundles([f"{ours}_dev-{i:0{width}d}-of-{n}" for i in range(n)], ours, allow_missing_files=True)
    theirs_dir = Path(prefix).parent
    assert_same_files(theirs_dir, tmp_path)  # the same files and bytes, with our sidecars beside the data files


def test_dtensor_train_checkpoint_read_by_us(dtensor_out):
    out, cases, expected = dtensor_out
    prefix = cases["tckpt"]["prefix"]
    reader = shardckpt.load_checkpoint(prefix)
    with BundleReader(prefix) as br:
        assert br.header.num_shards == 5  # 4 devices + the shard holding the object graph
        assert len(br.entry("a/.ATTRIBUTES/VARIABLE_VALUE").slices) == 4
    for name in ("a/.ATTRIBUTES/VARIABLE_VALUE", "b/.ATTRIBUTES/VARIABLE_VALUE"):
        assert_same(reader.get_tensor(name), expected[f"tckpt/{name}"], name)
    assert_readers_agree(prefix)
    assert shardckpt.load_checkpoint(Path(prefix).parent).prefix == prefix
