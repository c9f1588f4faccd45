"""Property tests (hypothesis) of the reader, the spec parser, the writer round trip and the key codings.

The contract under test: whatever bytes sit on disk, `BundleReader` and friends either
work or raise a `CheckpointError`; never an IndexError, struct.error, a bare
ValueError, MemoryError or OverflowError, and never an allocation out of proportion
with the files.  Corruption is injected at every layer: raw bytes (caught by CRCs),
block contents with their CRCs recomputed (exercises the block parser), entry values
re-packed into a valid table (exercises the proto parser), and entries with lying
fields re-encoded with `build_index` (exercises the semantic checks).

Budget: the defaults keep this module well under a minute.  Set
``SHARDCKPT_FUZZ_EXAMPLES=N`` to run every property with at least N examples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import shardckpt
from shardckpt import CheckpointError, InvalidArgumentError
from shardckpt.format import (
    BundleEntry,
    BundleHeader,
    BundleReader,
    BundleWriter,
    TensorSlice,
    VersionDef,
    data_filename,
    decode_slice_key,
    encode_slice_key,
    index_filename,
    merge_bundles,
    parse_shape_and_slice,
)
from shardckpt.format import ordered_code as oc
from shardckpt.format.block import Block, BlockBuilder
from shardckpt.format.coding import crc32c, decode_varint, mask_crc
from shardckpt.format.protos import decode_entry, decode_header, encode_entry, encode_header
from shardckpt.format.table import BLOCK_SIZE, FOOTER_SIZE, MAGIC, BlockHandle, Table, TableBuilder

_ENV = int(os.environ.get("SHARDCKPT_FUZZ_EXAMPLES", "0") or 0)
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)


def event(text: str) -> None:
    """Tally an outcome in ``--hypothesis-show-statistics`` (a no-op outside a property)."""
    if currently_in_test_context():
        _event(text)


def budget(default: int) -> settings:
    return settings(
        max_examples=max(default, _ENV),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- table surgery ------------------------------------------------------------------------------------


def trailer(block: bytes, kind: int = 0) -> bytes:
    return bytes((kind,)) + struct.pack("<I", mask_crc(crc32c(bytes((kind,)), crc32c(block))))


def footer_handles(index: bytes) -> tuple[BlockHandle, BlockHandle]:
    pos = len(index) - FOOTER_SIZE
    limit = pos + 40
    values = []
    for _ in range(4):
        v, pos = decode_varint(index, pos, limit)
        values.append(v)
    return BlockHandle(values[0], values[1]), BlockHandle(values[2], values[3])


def split_table(index: bytes) -> tuple[list[tuple[bytes, bytes]], bytes, bytes]:
    """A valid table as ([(index key, data block bytes)], metaindex bytes, index block bytes)."""
    meta, idx = footer_handles(index)
    index_block = index[idx.offset : idx.offset + idx.size]
    blocks = []
    for key, value in Block(index_block, "index"):
        off, pos = decode_varint(value, 0, len(value))
        size, _ = decode_varint(value, pos, len(value))
        blocks.append((key, index[off : off + size]))
    return blocks, index[meta.offset : meta.offset + meta.size], index_block


def assemble_table(
    blocks: list[tuple[bytes, bytes]], meta: bytes, raw_index: bytes | None = None, snappy: bool = False
) -> bytes:
    """Lay blocks out with correct trailers and footer (and a fresh index block unless one is given)."""
    out: list[bytes] = []
    offset = 0

    def put(block: bytes) -> BlockHandle:
        nonlocal offset
        kind = 0
        if snappy:
            import cramjam

            block, kind = bytes(cramjam.snappy.compress_raw(block)), 1
        out.append(block)
        out.append(trailer(block, kind))
        handle = BlockHandle(offset, len(block))
        offset += len(block) + 5
        return handle

    handles = [(key, put(block)) for key, block in blocks]
    meta_handle = put(meta)
    if raw_index is None:
        builder = BlockBuilder(1)
        for key, handle in handles:
            builder.add(key, handle.encode())
        raw_index = builder.finish()
    index_handle = put(raw_index)
    encoded = meta_handle.encode() + index_handle.encode()
    out.append(encoded + bytes(40 - len(encoded)) + MAGIC)
    return b"".join(out)


def table_items(index: bytes) -> list[tuple[bytes, bytes]]:
    return list(Table(index, "base"))


def build_table(items: dict[bytes, bytes], block_size: int = BLOCK_SIZE) -> bytes:
    table = TableBuilder(block_size)
    for key in sorted(items):
        table.add(key, items[key])
    return table.finish()


# --- byte mutations -------------------------------------------------------------------------------------

_POS = st.integers(0, 1 << 20)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), _POS, st.integers(1, 255)),
        st.tuples(st.just("set"), _POS, st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)),
        st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("delete"), _POS, st.integers(1, 16)),
        st.tuples(st.just("dup"), _POS, st.integers(1, 16)),
        st.tuples(st.just("truncate"), _POS),
    ),
    min_size=1,
    max_size=5,
)


def apply_ops(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind, n = op[0], len(buf)
        if kind == "truncate":
            del buf[op[1] % (n + 1) :]
        elif kind == "insert":
            p = op[1] % (n + 1)
            buf[p:p] = op[2]
        elif n:
            p = op[1] % n
            if kind == "flip":
                buf[p] ^= op[2]
            elif kind == "set":
                buf[p] = op[2]
            elif kind == "delete":
                del buf[p : p + op[2]]
            elif kind == "dup":
                buf[p:p] = buf[p : p + op[2]]
    return bytes(buf)


# --- the base checkpoint -------------------------------------------------------------------------------

P = np.arange(24, dtype=np.float32).reshape(4, 6)


def _write_base(prefix: Path) -> None:
    with BundleWriter(prefix, durable=False) as w:
        w.add("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
        w.add("i64", np.arange(5, dtype=np.int64) - 2)
        w.add("str", np.array([b"hello", b"", b"\x00\xffz", b"x" * 40], dtype=object))
        w.add("bool", np.array([[True, False], [False, True]]))
        w.add("bf16", np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16))
        w.add("scalar", np.float64(3.5))
        w.add("empty", np.zeros((0, 3), np.int32))
        w.add_slice("part", "4 6 0,2:-", P[0:2])
        w.add_slice("part", "4 6 2,2:0,3", P[2:4, 0:3])
        w.add_slice("part", "4 6 2,2:3,3", P[2:4, 3:6])
        w.add_slice("spart", "3 0,1", np.array([b"a"], dtype=object))
        w.add_slice("spart", "3 1,2", np.array([b"bb", b"ccc"], dtype=object))


_BASE_DIR = Path(tempfile.mkdtemp(prefix="shardckpt-fuzz-base-"))
_write_base(_BASE_DIR / "base")
BASE_INDEX = Path(index_filename(str(_BASE_DIR / "base"))).read_bytes()
BASE_DATA = Path(data_filename(str(_BASE_DIR / "base"), 0, 1)).read_bytes()
shutil.rmtree(_BASE_DIR)
BASE_ITEMS = table_items(BASE_INDEX)
BASE_HEADER = decode_header(BASE_ITEMS[0][1])
BASE_ENTRIES = {key: decode_entry(value) for key, value in BASE_ITEMS if key}
NAMES = sorted(k.decode() for k in BASE_ENTRIES if k[0] != 0)
# The same table in small blocks (a real multi-block index) and with snappy blocks.
SMALL_BLOCKS_INDEX = build_table(dict(BASE_ITEMS), block_size=64)
SNAPPY_INDEX = assemble_table(*split_table(SMALL_BLOCKS_INDEX)[:2], snappy=True)
VARIANTS = {"default": BASE_INDEX, "small_blocks": SMALL_BLOCKS_INDEX, "snappy": SNAPPY_INDEX}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_base_variants_are_valid(workdir: Path) -> None:
    for name, index in VARIANTS.items():
        prefix = workdir / name
        write_checkpoint(prefix, index, BASE_DATA)
        with BundleReader(prefix) as reader:
            assert sorted(n for n, _ in reader.entries()) == NAMES, name
            np.testing.assert_array_equal(reader.read("part"), P)
            assert list(reader.read("spart")) == [b"a", b"bb", b"ccc"]
    assert split_table(SMALL_BLOCKS_INDEX)[0].__len__() > 3
    assert assemble_table(*split_table(BASE_INDEX)) == BASE_INDEX  # the surgery helpers are exact


def write_checkpoint(prefix: Path, index: bytes, data: bytes | None, shards: dict[str, bytes] | None = None) -> None:
    Path(index_filename(str(prefix))).write_bytes(index)
    if data is not None:
        Path(data_filename(str(prefix), 0, 1)).write_bytes(data)
    for name, content in (shards or {}).items():
        (prefix.parent / name).write_bytes(content)


# --- driving the reader ---------------------------------------------------------------------------------


def _spec_for(shape: tuple[int, ...]) -> str | None:
    """A partial-slice spec inside ``shape``, when the shape admits one."""
    if not shape or shape[0] < 2 or len(shape) > 8:
        return None
    dims = " ".join(str(d) for d in shape)
    return f"{dims} 1,{shape[0] - 1}" + ":-" * (len(shape) - 1)


def exercise(prefix: Path, names: list[str] = NAMES) -> int:
    """Open and read everything every way; only CheckpointError may escape.  Returns #tensors read."""
    try:
        reader = BundleReader(prefix)
    except CheckpointError as err:
        event(f"open: {type(err).__name__}")
        return 0
    ok = 0
    with reader:
        found = dict.fromkeys(names)
        try:
            for name, _ in reader.entries():
                found[name] = None
        except CheckpointError:
            pass
        try:
            for _ in reader.raw_entries():
                pass
        except CheckpointError:
            pass
        for name in found:
            try:
                reader.has_tensor(name)
                shape = reader.entry(name).shape
            except CheckpointError:
                continue
            for verify in (True, False, "full"):
                try:
                    reader.read(name, verify=verify)
                    ok += 1
                except CheckpointError:
                    pass
            try:
                for piece in reader.stored_slices(name):
                    reader.read_stored(piece, verify=False)
                ok += 1
            except CheckpointError:
                pass
            spec = _spec_for(shape)
            if spec is not None:
                try:
                    reader.read_slice(name, spec)
                except CheckpointError:
                    pass
    event(f"reads that worked: {'none' if not ok else 'some' if ok < 4 * len(NAMES) else 'all'}")
    try:
        with shardckpt.load_checkpoint(prefix) as ck:
            ck.get_variable_to_shape_map()
            ck.get_variable_to_dtype_map()
    except CheckpointError:
        pass
    return ok


# --- mutation strategies --------------------------------------------------------------------------------

_INTERESTING = [0, 1, 2, 3, 4, 6, 7, 8, 127, 128, 255, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]
_INTERESTING += [-1, -2, -(2**63)]
_DTYPES = [1, 2, 3, 4, 7, 9, 10, 14, 19, 20, 21, 29, 30, 0, 31, 99, -1, 2**31 - 1, -(2**31)]


def _ints(values: list[int], lo: int = _INT64_MIN, hi: int = _INT64_MAX) -> st.SearchStrategy[int]:
    return st.sampled_from(values) | st.integers(lo, hi)


_extent = st.one_of(
    st.just((0, -1)),
    st.tuples(_ints([0, 1, 2, 3], 0, 10), _ints([1, 2, 3], 1, 10)),
    st.tuples(_ints(_INTERESTING), _ints(_INTERESTING)),
)
_slice = st.lists(_extent, max_size=4).map(lambda xs: TensorSlice(tuple(xs)))
_ranked_slice = st.lists(_extent, min_size=1, max_size=4).map(lambda xs: TensorSlice(tuple(xs)))


# Shapes TF's TensorShape accepts but numpy cannot hold: 0 elements with an overflowing product of
# the other dims, or more dims than numpy's MAXDIMS.
_PATHOLOGICAL_SHAPES = [(0, 2**62, 2**62), (2**62, 0, 4), (0, 2**63 - 1), (1,) * 65, (0,) * 70, (1,) * 254, (1,) * 33]
_shapes = st.one_of(
    st.lists(st.integers(0, 6), max_size=4).map(tuple),
    st.lists(st.just(0) | _ints(_INTERESTING, -(2**63), 2**63 - 1), max_size=5).map(tuple),
    st.sampled_from(_PATHOLOGICAL_SHAPES),
)


@st.composite
def mutated_fields(draw, entry: BundleEntry, data_size: int) -> BundleEntry:
    e = dataclasses.replace(entry, slices=list(entry.slices))
    fields = draw(st.permutations(["dtype", "shape", "shard_id", "offset", "size", "crc32c", "slices"]))
    for field in fields[: draw(st.sampled_from([1, 1, 1, 2, 2, 3, 7]))]:  # mostly one lie at a time
        if field == "dtype":
            e.dtype = draw(st.sampled_from(_DTYPES))
        elif field == "shape":
            e.shape = draw(_shapes)
        elif field == "shard_id":
            e.shard_id = draw(_ints([0, 1, 2, -1, 2**31 - 1], -(2**31), 2**31 - 1))
        elif field == "offset":
            near = [entry.offset, data_size - 1, data_size, data_size + 1]
            e.offset = draw(_ints([0, 1, 4, *near, 2**40, 2**63 - 1, -1]))
        elif field == "size":
            e.size = draw(_ints([0, 1, 4, 8, entry.size, entry.size + 1, data_size, 2**40, 2**63 - 1, -1]))
        elif field == "crc32c":
            e.crc32c = draw(st.integers(0, 2**32 - 1))
        else:
            e.slices = draw(st.lists(_slice, max_size=3))
    if draw(st.booleans()):
        # Keep the entry self-consistent, so the lie gets past the size check and reaches the read path.
        itemsize = {1: 4, 2: 8, 3: 4, 4: 1, 7: 1, 9: 8, 10: 1, 14: 2, 19: 2, 29: 1, 30: 1}.get(e.dtype, 1)
        count = math.prod(d or 1 for d in e.shape) if 0 not in e.shape else 0
        if 0 <= count * itemsize <= _INT64_MAX:
            e.size = count * itemsize if e.dtype != 7 else max(e.size, count)
        if draw(st.booleans()):
            e.offset = 0 if draw(st.booleans()) else entry.offset
    return e


@st.composite
def field_mutated_index(draw) -> bytes:
    """Entries with lying fields (and added/removed/renamed keys), re-encoded with build_index."""
    entries = dict(BASE_ENTRIES)
    keys = sorted(entries)
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True)):
        entries[key] = draw(mutated_fields(entries[key], len(BASE_DATA)))
    if draw(st.booleans()):
        del entries[draw(st.sampled_from(keys))]
    if draw(st.booleans()):  # a new key: a fresh slice key of an existing name, or an arbitrary one
        if draw(st.booleans()):
            name = draw(st.sampled_from(NAMES)).encode()
            key = encode_slice_key(name, draw(_ranked_slice))
        else:
            key = draw(st.binary(min_size=1, max_size=12))
        entries[key] = draw(mutated_fields(BASE_ENTRIES[draw(st.sampled_from(keys))], len(BASE_DATA)))
    header = BASE_HEADER
    if draw(st.integers(0, 3)) == 0:
        header = BundleHeader(
            num_shards=draw(_ints([0, 1, 2, -1, 2**31 - 1], -(2**31), 2**31 - 1)),
            endianness=draw(st.sampled_from([0, 1, 2, -1])),
            version=VersionDef(
                draw(st.sampled_from([0, 1, -1, 2**31 - 1])),
                draw(st.sampled_from([0, 1, 2])),
                tuple(draw(st.lists(st.sampled_from([0, 1, 2, -1]), max_size=2))),
            ),
        )
    table = TableBuilder(draw(st.sampled_from([64, 1024, BLOCK_SIZE])))
    table.add(b"", encode_header(header))
    for key in sorted(entries):
        table.add(key, encode_entry(entries[key]))
    return table.finish()


@st.composite
def mutated_index(draw) -> bytes:
    """An index mutated at one layer; the layer decides whether CRCs still hold."""
    base = VARIANTS[draw(st.sampled_from(sorted(VARIANTS)))]
    mode = draw(
        st.sampled_from(
            ["raw", "data_block", "index_block", "meta_block", "footer", "value", "key", "shuffle", "fields"]
        )
    )
    event(f"mode: {mode}")
    if mode == "raw":  # CRCs break: the checksums and the footer checks must catch it
        return apply_ops(base, draw(_OPS))
    if mode == "fields":
        return draw(field_mutated_index())
    snappy = base is SNAPPY_INDEX
    if mode in ("data_block", "index_block", "meta_block", "footer"):
        blocks, meta, raw_index = split_table(SMALL_BLOCKS_INDEX if snappy else base)
        if mode == "data_block":
            i = draw(st.integers(0, len(blocks) - 1))
            blocks[i] = (blocks[i][0], apply_ops(blocks[i][1], draw(_OPS)))
            return assemble_table(blocks, meta, snappy=snappy)
        if mode == "meta_block":
            return assemble_table(blocks, apply_ops(meta, draw(_OPS)), snappy=snappy)
        if mode == "index_block":
            return assemble_table(blocks, meta, apply_ops(raw_index, draw(_OPS)), snappy=snappy)
        # footer: rewrite the handles (the magic stays) with arbitrary varints
        table = assemble_table(blocks, meta, snappy=snappy)
        handles = draw(st.binary(min_size=0, max_size=40))
        if draw(st.booleans()):
            values = draw(st.lists(_ints([0, 5, 8, 13, 2**63, 2**64 - 1], 0, 2**64 - 1), min_size=4, max_size=4))
            handles = b"".join(BlockHandle(values[i], values[i + 1]).encode() for i in (0, 2))
        return table[:-FOOTER_SIZE] + handles + bytes(40 - len(handles)) + MAGIC
    items = dict(BASE_ITEMS)
    keys = sorted(items)
    if mode == "value":
        key = draw(st.sampled_from(keys))
        items[key] = apply_ops(items[key], draw(_OPS))
    elif mode == "key":
        key = draw(st.sampled_from(keys))
        items[apply_ops(key, draw(_OPS))] = items.pop(key)
    else:  # shuffle: values land under other keys (a header as an entry, a slice entry as a whole tensor ...)
        values = draw(st.permutations([items[k] for k in keys]))
        items = dict(zip(keys, values))
    return build_table(items, draw(st.sampled_from([64, BLOCK_SIZE])))


_data = st.one_of(
    st.just(BASE_DATA),
    _OPS.map(lambda ops: apply_ops(BASE_DATA, ops)),
    st.integers(0, len(BASE_DATA)).map(lambda n: BASE_DATA[:n]),
    st.binary(max_size=64).map(lambda extra: BASE_DATA + extra),
    st.none(),  # the data file is missing
)


# --- (1) mutated index files ------------------------------------------------------------------------


@budget(400)
@given(index=mutated_index())
def test_mutated_index_only_raises_checkpoint_errors(workdir: Path, index: bytes) -> None:
    prefix = workdir / "idx"
    write_checkpoint(prefix, index, BASE_DATA)
    exercise(prefix)


@budget(150)
@given(index=field_mutated_index())
def test_lying_entries_only_raise_checkpoint_errors(workdir: Path, index: bytes) -> None:
    prefix = workdir / "fields"
    write_checkpoint(prefix, index, BASE_DATA, {"fields.data-00001-of-00002": BASE_DATA})
    exercise(prefix)


# --- (2) no allocation out of proportion with the files -------------------------------------------------


_ALLOC_FACTOR = 8
_ALLOC_CONSTANT = 4 << 20


def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_allocation_bound_is_meaningful(workdir: Path) -> None:
    """The bound catches an allocation driven by a claimed size: here a plain 64 MiB array."""
    assert _peak_while(lambda: np.ones(64 << 20, np.uint8)) > _ALLOC_CONSTANT + _ALLOC_FACTOR * 100_000
    prefix = workdir / "alloc_base"
    write_checkpoint(prefix, BASE_INDEX, BASE_DATA)
    assert _peak_while(lambda: exercise(prefix)) < _ALLOC_CONSTANT


@budget(100)
@given(index=st.one_of(field_mutated_index(), mutated_index()), data=_data)
def test_no_allocation_larger_than_the_files(workdir: Path, index: bytes, data: bytes | None) -> None:
    prefix = workdir / "alloc"
    write_checkpoint(prefix, index, data)
    if data is None:
        Path(data_filename(str(prefix), 0, 1)).unlink(missing_ok=True)
    on_disk = len(index) + len(data or b"")
    peak = _peak_while(lambda: exercise(prefix))
    assert peak <= on_disk * _ALLOC_FACTOR + _ALLOC_CONSTANT, f"peak {peak} bytes for {on_disk} bytes on disk"


# --- (3) whole-checkpoint fuzz -----------------------------------------------------------------------


@budget(200)
@given(index=mutated_index(), data=_data, merge=st.integers(0, 3))
def test_mutated_checkpoint_only_raises_checkpoint_errors(
    workdir: Path, index: bytes, data: bytes | None, merge: int
) -> None:
    root = workdir / "whole"
    shutil.rmtree(root, ignore_errors=True)
    (root / "src").mkdir(parents=True)
    prefix = root / "src" / "ckpt"
    write_checkpoint(prefix, index, data)
    exercise(prefix)
    if merge == 0:  # merging reads every entry too; whatever it leaves behind must read cleanly
        try:
            merge_bundles([prefix], root / "dest" / "merged", durable=False)
        except CheckpointError:
            return
        exercise(root / "dest" / "merged")


# --- (4) shape_and_slice strings ---------------------------------------------------------------------

_NUM = re.compile(r"^[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*$", re.ASCII)


def _strto64(text: str) -> int | None:
    if not _NUM.match(text):
        return None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def oracle(text: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]] | None:
    """Spec §5, written independently: (shape, extents) or None for an InvalidArgument."""
    pieces = text.split(" ")
    if len(pieces) < 2:
        return None
    shape = []
    for piece in pieces[:-1]:
        dim = _strto64(piece)
        if dim is None or dim < 0:
            return None
        shape.append(dim)
    extents = []
    for piece in pieces[-1].split(":"):
        if not piece:
            continue
        if piece == "-":
            extents.append((0, -1))
            continue
        numbers = [_strto64(p) for p in piece.split(",") if p]
        if len(numbers) != 2 or None in numbers:
            return None
        start, length = numbers
        if start < 0 or length <= 0 or start + length > _INT64_MAX:
            return None
        extents.append((start, length))
    if len(extents) != len(shape) or math.prod(shape) > _INT64_MAX:
        return None
    for (start, length), dim in zip(extents, shape):
        if length != -1 and start + length > dim:
            return None
    return tuple(shape), tuple(extents)


_spec_tokens = st.lists(
    st.sampled_from(list("0123456789") * 3 + list(" ,:-+") * 2 + ["\t", "x", "\x00", "9223372036854775807"]),
    max_size=30,
).map("".join)
_dim_text = st.one_of(
    st.integers(0, 10).map(str),
    st.sampled_from(["9223372036854775807", "9223372036854775808", "4294967296", "-1", "+3", " 3", "", "a", "0x1"]),
)
_extent_text = st.one_of(
    st.just("-"),
    st.tuples(st.integers(-2, 10), st.integers(-2, 10)).map(lambda t: f"{t[0]},{t[1]}"),
    st.sampled_from(["", "--", "0,", ",2", "0,,2", "1,2,3", "9223372036854775807,1", " 1,1", "1,1 "]),
)
_structured_spec = st.tuples(st.lists(_dim_text, max_size=4), st.lists(_extent_text, max_size=5), st.booleans()).map(
    lambda t: " ".join(t[0]) + " " + ":".join(t[1]) + (":" if t[2] else "")
)


@budget(1000)
@given(text=st.one_of(_spec_tokens, st.text(max_size=20), _structured_spec))
@example(text="4 6 0,2:-:")
@example(text="4 6 :0,2:-")
@example(text="4  0,2")
@example(text="")
@example(text="9223372036854775807 9223372036854775806,1")
def test_parse_shape_and_slice_only_invalid_argument(text: str) -> None:
    expected = oracle(text)
    try:
        parsed = parse_shape_and_slice(text)
    except InvalidArgumentError as err:
        assert isinstance(err, CheckpointError)
        assert expected is None, f"{text!r} rejected ({err}) but spec §5 accepts it as {expected}"
        return
    assert expected is not None, f"{text!r} accepted as {parsed} but spec §5 rejects it"
    assert (parsed.shape, parsed.slice.extents) == expected
    assert all(d >= 0 for d in parsed.shape) and math.prod(parsed.shape) <= _INT64_MAX
    assert parsed.slice.rank == len(parsed.shape) == len(parsed.slice_shape)
    for (start, length), dim, got in zip(parsed.slice.extents, parsed.shape, parsed.slice_shape):
        if length == -1:
            assert start == 0 and got == dim
        else:
            assert start >= 0 and length > 0 and start + length <= dim and got == length
    for lo, hi in parsed.slice.bounds(parsed.shape):
        assert 0 <= lo <= hi
    # the canonical rendering parses to the same thing
    canon = " ".join(map(str, parsed.shape)) + " " + parsed.slice.to_string()
    assert parse_shape_and_slice(canon) == parsed


# --- (5) write / read round trip --------------------------------------------------------------------

_FIXED = [
    np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.complex64, np.complex128,
    ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e4m3b11fnuz,
]  # fmt: skip


@st.composite
def tensors(draw) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["fixed", "bool", "int4", "uint4", "bytes", "str"]))
    if kind == "fixed":
        dtype = np.dtype(draw(st.sampled_from(_FIXED)))
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        arr = np.frombuffer(raw, dtype).reshape(shape).copy()
        if dtype.itemsize > 1 and dtype.kind in "iufc" and draw(st.booleans()):
            arr = arr.astype(dtype.newbyteorder(">"))  # the writer must store it little-endian
        return arr
    if kind == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool).reshape(shape)
    if kind in ("int4", "uint4"):
        lo, hi = (-8, 7) if kind == "int4" else (0, 15)
        dtype = ml_dtypes.int4 if kind == "int4" else ml_dtypes.uint4
        return np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype).reshape(shape)
    if kind == "bytes":
        items = draw(st.lists(st.binary(max_size=10), min_size=n, max_size=n))
    else:
        items = draw(st.lists(st.text(st.characters(codec="utf-8"), max_size=6), min_size=n, max_size=n))
    arr = np.empty(n, dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def _stored(arr: np.ndarray) -> np.ndarray:
    """What a read returns for ``arr``: little-endian fixed types, UTF-8 bytes for str."""
    if arr.dtype == object:
        out = np.empty(arr.shape, dtype=object)
        out.reshape(-1)[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in arr.reshape(-1).tolist()]
        return out
    return arr.astype(arr.dtype.newbyteorder("<"))


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    want = _stored(want)
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object and got.reshape(-1).tolist() == want.reshape(-1).tolist()
    else:
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()  # bytewise: NaN payloads and -0.0 survive


def _cuts(draw, dim: int) -> list[tuple[int, int]]:
    points = sorted(draw(st.sets(st.integers(1, dim - 1), max_size=3))) if dim > 1 else []
    edges = [0, *points, dim]
    return list(zip(edges[:-1], edges[1:]))


def _extent_spec(draw, lo: int, hi: int, dim: int) -> str:
    if lo == 0 and hi == dim and (dim == 0 or draw(st.booleans())):
        return "-"
    return f"{lo},{hi - lo}"


@budget(100)
@given(
    arrays=st.lists(tensors(), min_size=1, max_size=4),
    names=st.lists(
        st.tuples(
            st.characters(codec="utf-8", exclude_characters="\x00"), st.text(st.characters(codec="utf-8"), max_size=8)
        ).map("".join),
        min_size=4,
        max_size=4,
        unique=True,
    ),
    partition=st.lists(st.booleans(), min_size=4, max_size=4),
    alignment=st.sampled_from([1, 8, 64]),
    data=st.data(),
)
def test_round_trip(workdir: Path, arrays, names, partition, alignment, data) -> None:
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        prefix = root / "rt"
        with BundleWriter(prefix, data_alignment=alignment, durable=False) as w:
            for arr, name, part in zip(arrays, names, partition):
                if not part or arr.ndim == 0:
                    w.add(name, arr)
                    continue
                rows = _cuts(data.draw, arr.shape[0])
                cols = _cuts(data.draw, arr.shape[1]) if arr.ndim > 1 else [(0, 0)]
                for r0, r1 in rows:
                    for c0, c1 in cols:
                        extents = [_extent_spec(data.draw, r0, r1, arr.shape[0])]
                        box = [slice(r0, r1)]
                        if arr.ndim > 1:
                            extents.append(_extent_spec(data.draw, c0, c1, arr.shape[1]))
                            box.append(slice(c0, c1))
                        extents += ["-"] * (arr.ndim - len(extents))
                        spec = " ".join(map(str, arr.shape)) + " " + ":".join(extents)
                        w.add_slice(name, spec, arr[tuple(box)])
        with BundleReader(prefix) as reader:
            listed = dict(reader.entries())
            assert sorted(listed) == sorted(names[: len(arrays)])
            for arr, name in zip(arrays, names):
                assert listed[name].shape == arr.shape
                assert_same(reader.read(name), arr)
                assert_same(reader.read(name, verify="full"), arr)
                if arr.ndim == 0:
                    continue
                extents, box = [], []
                for dim in arr.shape:
                    if dim == 0 or data.draw(st.booleans()):
                        extents.append("-")
                        box.append(slice(None))
                    else:
                        start = data.draw(st.integers(0, dim - 1))
                        length = data.draw(st.integers(1, dim - start))
                        extents.append(f"{start},{length}")
                        box.append(slice(start, start + length))
                spec = " ".join(map(str, arr.shape)) + " " + ":".join(extents)
                assert_same(reader.read_slice(name, spec), arr[tuple(box)])
    finally:
        shutil.rmtree(root)


# --- (6) ordered code and slice keys ------------------------------------------------------------------

_int64 = st.integers(_INT64_MIN, _INT64_MAX)
_BOUNDARIES = [0, -1, 63, 64, -64, -65, 2**62, -(2**62), _INT64_MAX, _INT64_MIN]


@budget(1000)
@given(
    value=_int64
    | st.sampled_from(_BOUNDARIES + [s * (2**k + d) for s in (1, -1) for k in range(0, 63, 7) for d in (-1, 0, 1)]),
    tail=st.binary(max_size=4),
)
def test_signed_num_round_trip(value: int, tail: bytes) -> None:
    encoded = oc.encode_signed_num_increasing(value)
    assert 1 <= len(encoded) <= 10
    assert oc.decode_signed_num_increasing(encoded + tail, 0) == (value, len(encoded))
    assert oc.decode_signed_num_increasing(b"\x00" + encoded, 1) == (value, len(encoded) + 1)


def test_signed_num_every_length_boundary() -> None:
    for n in range(1, 11):
        for value in (2 ** min(7 * n - 1, 63) - 1, -(2 ** min(7 * n - 1, 63))):
            value = max(min(value, _INT64_MAX), _INT64_MIN)
            encoded = oc.encode_signed_num_increasing(value)
            assert len(encoded) == n, (value, encoded.hex())
            assert oc.decode_signed_num_increasing(encoded, 0) == (value, n)
    with pytest.raises(ValueError):
        oc.encode_signed_num_increasing(_INT64_MAX + 1)
    with pytest.raises(ValueError):
        oc.encode_signed_num_increasing(_INT64_MIN - 1)


@budget(1000)
@given(a=_int64 | st.sampled_from(_BOUNDARIES), b=_int64 | st.sampled_from(_BOUNDARIES))
def test_signed_num_order_is_memcmp_order(a: int, b: int) -> None:
    ea, eb = oc.encode_signed_num_increasing(a), oc.encode_signed_num_increasing(b)
    assert (ea < eb) == (a < b) and (ea == eb) == (a == b)


@budget(300)
@given(a=st.integers(0, 2**64 - 1), b=st.integers(0, 2**64 - 1))
def test_unsigned_num_round_trip_and_order(a: int, b: int) -> None:
    ea, eb = oc.encode_num_increasing(a), oc.encode_num_increasing(b)
    assert oc.decode_num_increasing(ea, 0) == (a, len(ea))
    assert (ea < eb) == (a < b)


@budget(300)
@given(a=st.binary(max_size=12), b=st.binary(max_size=12))
def test_string_round_trip_and_order(a: bytes, b: bytes) -> None:
    ea, eb = oc.encode_string(a), oc.encode_string(b)
    assert oc.decode_string(ea + b"\x01\xff", 0) == (a, len(ea))
    assert (ea < eb) == (a < b)


_key_extent = st.one_of(
    st.just((0, -1)),
    st.integers(0, _INT64_MAX - 1).flatmap(lambda s: st.tuples(st.just(s), st.integers(1, _INT64_MAX - s))),
    st.tuples(st.integers(0, 100), st.integers(1, 100)),
)


@budget(500)
@given(name=st.binary(min_size=1, max_size=16), extents=st.lists(_key_extent, min_size=1, max_size=6))
def test_slice_key_round_trip(name: bytes, extents: list[tuple[int, int]]) -> None:
    tslice = TensorSlice(tuple(extents))
    key = encode_slice_key(name, tslice)
    assert key[0] == 0  # sorts after the header, before every name
    assert decode_slice_key(key) == (name, tslice)


@budget(500)
@given(key=st.binary(max_size=40) | st.binary(max_size=30).map(lambda b: b"\x00" + oc.encode_string(b"n") + b))
def test_decode_slice_key_garbage(key: bytes) -> None:
    try:
        name, tslice = decode_slice_key(key)
    except CheckpointError:
        return
    assert tslice.rank > 0
    for start, length in tslice.extents:
        assert length == -1 or isinstance(start, int)


@budget(500)
@given(buf=st.binary(max_size=24), pos=st.integers(0, 30))
def test_ordered_code_decoders_on_garbage(buf: bytes, pos: int) -> None:
    for decode in (oc.decode_signed_num_increasing, oc.decode_num_increasing, oc.decode_string):
        try:
            _, end = decode(buf, pos)
        except CheckpointError:
            continue
        assert pos < end <= len(buf)


# --- lower layers on their own ------------------------------------------------------------------------


@budget(400)
@given(raw=st.binary(max_size=64) | _OPS.map(lambda ops: apply_ops(encode_entry(BASE_ENTRIES[b"part"]), ops)))
def test_proto_decoders_on_garbage(raw: bytes) -> None:
    for decode in (decode_entry, decode_header):
        try:
            decode(raw)
        except CheckpointError:
            pass


@budget(400)
@given(
    raw=st.binary(max_size=80) | _OPS.map(lambda ops: apply_ops(split_table(SMALL_BLOCKS_INDEX)[0][0][1], ops)),
    target=st.binary(max_size=6),
)
def test_block_parser_on_garbage(raw: bytes, target: bytes) -> None:
    try:
        block = Block(raw, "fuzz")
        list(block)
    except CheckpointError:
        pass
    try:
        list(Block(raw, "fuzz").seek(target))
    except CheckpointError:
        pass
