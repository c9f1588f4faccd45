"""Partial reads are checked: the ``P.data-R-of-N.crc32c`` sidecar holds a CRC32C per chunk of every large piece.

A byte flipped inside a stored piece must be caught by a resharding restore (which reads only part of each
piece), by ``read_slice`` and by ``shardckpt verify``; a stale or damaged sidecar must never be taken for
corruption of the data; TensorFlow must still read the checkpoint; a checkpoint with no sidecar reads as before.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import shardckpt as sc
from shardckpt import commit, storage
from shardckpt.format import BundleReader, chunks
from shardckpt.format import reader as reader_module
from shardckpt.format.coding import crc32c, mask_crc
from shardckpt.format.files import data_filename

RNG = np.random.default_rng(11)
KERNEL = RNG.standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB; 2x2 pieces of 4 MiB = 4 chunks each
SMALL = RNG.standard_normal((256, 256)).astype(np.float32)  # 2x2 pieces of 64 KiB: below one chunk
BIAS = np.arange(4096, dtype=np.float32)
MESH22 = sc.create_mesh([("x", 2), ("y", 2)])
MESH41 = sc.create_mesh([("x", 4), ("y", 1)])
NAMES = ["kernel", "small", "bias"]


def _save(prefix: str, kernel=KERNEL, small=SMALL, blocking=True, overwrite=False) -> None:
    def client(coord):
        local = MESH22.local_devices(coord.rank, coord.size)
        k = sc.DTensor.from_global(kernel, sc.Layout(["x", "y"], MESH22), local)
        s = sc.DTensor.from_global(small, sc.Layout(["x", "y"], MESH22), local)
        out = sc.sharded_save(MESH22, prefix, NAMES, [""] * 3, [k, s, BIAS], coordinator=coord,
                              blocking=blocking, overwrite=overwrite)
        return out if blocking else out.result()

    sc.LocalGroup(4).run(client)


def _restore_41(prefix: str, **kwargs) -> list[list[sc.DTensor]]:
    """Onto a 4x1 mesh on 4 clients: each client's row block takes the top or bottom half of two pieces."""
    def client(coord):
        layouts = [sc.Layout(["x", sc.UNSHARDED], MESH41)] * 2 + [sc.Layout([sc.UNSHARDED], MESH41)]
        return sc.sharded_restore(MESH41, prefix, NAMES, layouts, coordinator=coord, **kwargs)

    return sc.LocalGroup(4).run(client)


def _restore_whole(prefix: str, **kwargs) -> list[np.ndarray]:
    mesh = sc.create_mesh([("x", 1)], local_device_ids=[0])
    layouts = [sc.Layout.replicated(mesh, 2)] * 2 + [sc.Layout.replicated(mesh, 1)]
    return [t.to_numpy() for t in sc.sharded_restore(mesh, prefix, NAMES, layouts, **kwargs)]


def _restore_columns(prefix: str, **kwargs) -> list[np.ndarray]:
    """Onto a 1x4 mesh held by one client: column blocks, each half of a piece's width (strided reads)."""
    mesh = sc.create_mesh([("x", 1), ("y", 4)], local_device_ids=[0, 1, 2, 3])
    layouts = [sc.Layout([sc.UNSHARDED, "y"], mesh)] * 2 + [sc.Layout(["y"], mesh)]
    return [t.to_numpy() for t in sc.sharded_restore(mesh, prefix, NAMES, layouts, **kwargs)]


def _joined_41(got: list[list[sc.DTensor]]) -> list[np.ndarray]:
    """The tensors a 4x1 restore read, put back together from the four clients' row blocks."""
    return [np.concatenate([got[c][i].shards[c] for c in range(4)]) for i in range(2)] + [got[0][2].shards[0]]


def _check_values(got: list[np.ndarray]) -> None:
    for arr, want in zip(got, [KERNEL, SMALL, BIAS]):
        np.testing.assert_array_equal(arr, want)


def _piece(prefix: str, name: str, index: int = 0):
    with BundleReader(prefix) as r:
        p = r.stored_slices(name)[index]
        return p, data_filename(r.prefix, p.entry.shard_id, r.header.num_shards)


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("chunks") / "ckpt")
    _save(prefix)
    return prefix


@pytest.fixture
def saved(pristine, tmp_path):
    directory, base = os.path.split(pristine)
    for name in os.listdir(directory):
        shutil.copyfile(os.path.join(directory, name), tmp_path / name)
    return str(tmp_path / base)


def _sidecars(prefix: str) -> list[str]:
    directory, base = os.path.split(prefix)
    return sorted(n for n in os.listdir(directory) if n.startswith(base) and n.endswith(".crc32c"))


# --- what a save writes -----------------------------------------------------------------------------


def test_every_data_file_gets_a_sidecar_that_describes_its_large_pieces(saved):
    assert _sidecars(saved) == [f"ckpt.data-{r:05d}-of-00004.crc32c" for r in range(4)]
    p, path = _piece(saved, "kernel", 1)
    table = chunks.load(chunks.sidecar_filename(path), os.path.getsize(path))
    assert table is not None and table.chunk_size == chunks.CHUNK_SIZE
    crcs = table.chunks_of(p.entry.offset, p.entry.size, p.entry.crc32c)
    assert crcs is not None and len(crcs) == 4
    data = open(path, "rb").read()
    for k, crc in enumerate(crcs):
        start = p.entry.offset + k * chunks.CHUNK_SIZE
        assert int(crc) == crc32c(data[start : start + chunks.CHUNK_SIZE])
    small, _ = _piece(saved, "small", 1)
    assert table.chunks_of(small.entry.offset, small.entry.size, small.entry.crc32c) is None  # read whole instead


def test_an_async_save_writes_sidecars_too(tmp_path):
    prefix = str(tmp_path / "ckpt")
    _save(prefix, blocking=False)
    assert len(_sidecars(prefix)) == 4
    p, path = _piece(prefix, "kernel", 2)
    _flip(path, p.entry.offset + 5 * 1000)
    with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
        _restore_41(prefix)


def test_tensorflow_reads_the_checkpoint_with_its_sidecars(saved):
    import tensorflow as tf
    assert sorted(name for name, _ in tf.train.list_variables(saved)) == sorted(NAMES)
    reader = tf.train.load_checkpoint(saved)
    for name, want in zip(NAMES, [KERNEL, SMALL, BIAS]):
        np.testing.assert_array_equal(reader.get_tensor(name), want)
    got = tf.raw_ops.RestoreV2(prefix=saved, tensor_names=["kernel"], shape_and_slices=["2048 2048 0,512:0,2048"],
                               dtypes=[tf.float32])
    np.testing.assert_array_equal(got[0].numpy(), KERNEL[:512])


def test_the_sidecar_is_not_taken_for_a_data_file(saved):
    directory = os.path.dirname(saved)
    names = [os.path.join(directory, n) for n in _sidecars(saved)]
    assert not any(commit._is_data_file(saved, n) for n in names)
    commit.remove_stale_data_files(saved, 4)
    assert len(_sidecars(saved)) == 4
    commit.remove_stale_data_files(saved, 3)  # a later save with 3 clients: the old files and sidecars go
    assert _sidecars(saved) == []


# --- a flipped data byte inside a piece -------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 1000, (1 << 20) - 1, 1 << 20, (2 << 20) + 4097, (4 << 20) - 1])
def test_a_resharding_restore_catches_a_flip_inside_a_piece(saved, where):
    p, path = _piece(saved, "kernel", 0)
    _flip(path, p.entry.offset + where)
    base = os.path.basename(path)
    with pytest.raises(sc.ChecksumMismatchError) as info:
        _restore_41(saved)
    message = str(info.value)
    chunk = p.entry.offset + where // chunks.CHUNK_SIZE * chunks.CHUNK_SIZE
    assert saved in message and "tensor kernel (slice 0,1024:0,1024)" in message and base in message
    assert f"at offset {chunk} " in message, message


def test_a_data_file_holding_one_piece_keeps_its_chunk_checks(tmp_path):
    # Each client's data file holds just its 4 MiB piece of one tensor: the piece is the whole file.  Its sidecar
    # was once refused as malformed, and the partial reads of the file then went unchecked.
    prefix = str(tmp_path / "one")

    def save(coord):
        local = MESH22.local_devices(coord.rank, coord.size)
        sc.sharded_save(MESH22, prefix, ["kernel"], [""],
                        [sc.DTensor.from_global(KERNEL, sc.Layout(["x", "y"], MESH22), local)], coordinator=coord)

    sc.LocalGroup(4).run(save)
    p, path = _piece(prefix, "kernel", 0)
    assert p.entry.offset == 0 and p.entry.size == os.path.getsize(path)
    table = chunks.load(chunks.sidecar_filename(path), os.path.getsize(path))
    assert table is not None and table.chunks_of(p.entry.offset, p.entry.size, p.entry.crc32c) is not None
    _flip(path, (2 << 20) + 99)

    def restore(coord):
        return sc.sharded_restore(MESH41, prefix, ["kernel"], [sc.Layout(["x", sc.UNSHARDED], MESH41)],
                                  coordinator=coord)

    with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
        sc.LocalGroup(4).run(restore)


@pytest.mark.parametrize("then", ["overwritten", "deleted"])
def test_a_reader_checks_the_checkpoint_it_opened_after_it_is_replaced_or_deleted(saved, tmp_path, then):
    # The reader's snapshot holds the data files it opened; their sidecars must be its snapshot's too, not whatever
    # sits under the name at the first partial read (another checkpoint's, or none after retention deleted it).
    p, path = _piece(saved, "kernel", 0)
    os.mkdir(tmp_path / "elsewhere")
    keep = str(tmp_path / "elsewhere" / "held")
    os.link(path, keep)  # the same inode as the file the reader holds: a flip through it is a flip under it
    with BundleReader(saved) as r:
        if then == "overwritten":
            _save(saved, kernel=KERNEL + 1, overwrite=True)
        else:
            for name in os.listdir(os.path.dirname(saved)):
                if name != "elsewhere":
                    os.unlink(os.path.join(os.path.dirname(saved), name))
        _flip(keep, p.entry.offset + (1 << 20) + 5)  # in the piece's second chunk, rows 256..511
        with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
            r.read_bounds("kernel", [(300, 301), (0, 1)])
        np.testing.assert_array_equal(r.read_bounds("kernel", [(0, 256), (0, 1024)]), KERNEL[:256, :1024])


def _write_bundle(prefix: str, how: str) -> None:
    """KERNEL (one 16 MiB piece) written by one of the writers other than `sharded_save`."""
    if how == "BundleWriter":
        with sc.BundleWriter(prefix) as w:
            w.add("kernel", KERNEL)
    elif how == "convert":
        from safetensors.numpy import save_file

        save_file({"kernel": KERNEL}, prefix + ".safetensors")
        done = subprocess.run([sys.executable, "-m", "shardckpt", "convert", "-q", prefix + ".safetensors", prefix],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    else:  # merge_bundles of two inputs: one with a sidecar, one written without (as TensorFlow writes)
        with sc.BundleWriter(prefix + "-a") as w:
            w.add("kernel", KERNEL)
        with sc.BundleWriter(prefix + "-b") as w:
            w.add("bias", BIAS)
        os.unlink(chunks.sidecar_filename(data_filename(prefix + "-b", 0, 1)))
        sc.merge_bundles([prefix + "-a", prefix + "-b"], prefix)


@pytest.mark.parametrize("how", ["BundleWriter", "convert", "merge_bundles"])
def test_every_writer_leaves_partial_reads_checked(tmp_path, how):
    prefix = str(tmp_path / "ckpt")
    _write_bundle(prefix, how)
    names = sorted(n for n in os.listdir(tmp_path) if not n.endswith(".safetensors"))
    datas = [n for n in names if ".data-" in n and not n.endswith(".crc32c")]
    assert sorted(names) == sorted(["ckpt.index", *datas, *(n + ".crc32c" for n in datas)])  # no input's left
    p, path = _piece(prefix, "kernel", 0)
    assert chunks.load(chunks.sidecar_filename(path), os.path.getsize(path)) is not None
    with BundleReader(prefix) as r:
        np.testing.assert_array_equal(r.read_bounds("kernel", [(1000, 1100), (7, 2000)]), KERNEL[1000:1100, 7:2000])
    _flip(path, p.entry.offset + 1050 * 2048 * 4 + 99 * 4)  # element [1050, 99]
    with BundleReader(prefix) as r:
        with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
            r.read_bounds("kernel", [(1000, 1100), (7, 2000)])
        np.testing.assert_array_equal(r.read_bounds("kernel", [(0, 100), (0, 2048)]), KERNEL[:100])


def test_every_way_of_reading_part_of_a_piece_catches_it(saved):
    p, path = _piece(saved, "kernel", 3)  # rows 1024.., columns 1024..
    _flip(path, p.entry.offset + (3 << 20) + 12)  # row 1024 + 768, in the piece's last chunk
    mesh42 = sc.create_mesh([("x", 4), ("y", 2)], local_device_ids=list(range(8)))
    mapped = lambda s: sc.sharded_restore(mesh42, s, ["kernel"], [sc.Layout(["x", "y"], mesh42)],  # noqa: E731
                                          mmap=True)  # device 7's shard: the bottom half of the piece, mapped
    for read in (_restore_columns, _restore_whole, _restore_41, mapped):
        with pytest.raises(sc.ChecksumMismatchError, match="tensor kernel"):
            read(saved)
    with BundleReader(saved) as r:
        with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
            r.read_slice("kernel", "2048 2048 1700,100:1024,1024")
        np.testing.assert_array_equal(r.read_slice("kernel", "2048 2048 1024,512:1024,1024"),
                                      KERNEL[1024:1536, 1024:])  # other chunks of the same piece are fine
        with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
            r.read_bounds("kernel", [(1800, 1801), (1500, 1501)])
    assert _restore_41(saved, verify=False)  # asked not to check: nothing is


def test_a_flip_in_a_small_piece_is_caught_by_reading_it_whole(saved):
    p, path = _piece(saved, "small", 0)
    _flip(path, p.entry.offset + 300)  # row 0: in the top half, which client 0 of the 4x1 restore reads
    with pytest.raises(sc.ChecksumMismatchError, match=r"tensor small \(slice 0,128:0,128\)"):
        _restore_41(saved)


def test_shardckpt_verify_reports_the_flip(saved):
    p, path = _piece(saved, "kernel", 1)
    _flip(path, p.entry.offset + 777)
    out = subprocess.run([sys.executable, "-m", "shardckpt", "verify", "--quiet", saved], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and os.path.basename(path) in out.stdout + out.stderr, out


# --- sidecars that do not describe the file -----------------------------------------------------------


def test_a_sidecar_left_from_an_older_save_is_ignored(tmp_path):
    """TensorFlow rewrites the checkpoint in place (same names, shapes and offsets, new values)."""
    import tensorflow as tf
    prefix = str(tmp_path / "ckpt")
    mesh = sc.create_mesh([("x", 1)])
    sc.sharded_save(mesh, prefix, ["kernel"], [""], [KERNEL])
    old = open(prefix + ".data-00000-of-00001.crc32c", "rb").read()
    new = -KERNEL
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["kernel"], shape_and_slices=[""], tensors=[tf.constant(new)])
    assert open(prefix + ".data-00000-of-00001.crc32c", "rb").read() == old  # TF left it there
    with BundleReader(prefix) as r:
        np.testing.assert_array_equal(r.read_slice("kernel", "2048 2048 100,300:-"), new[100:400])
    mesh4 = sc.create_mesh([("x", 4)], local_device_ids=[0, 1, 2, 3])
    (got,) = sc.sharded_restore(mesh4, prefix, ["kernel"], [sc.Layout(["x", sc.UNSHARDED], mesh4)], mmap=True)
    np.testing.assert_array_equal(got.to_numpy(), new)


def test_a_sidecar_of_another_checkpoint_is_ignored(saved, tmp_path):
    other = str(tmp_path / "other" / "ckpt")
    _save(other, kernel=KERNEL + 1, small=SMALL + 1)
    for name in _sidecars(saved):  # same layout, other values: every piece's CRC differs
        shutil.copyfile(os.path.join(os.path.dirname(other), name), os.path.join(os.path.dirname(saved), name))
    _check_values(_joined_41(_restore_41(saved)))
    _check_values(_restore_columns(saved))


def _sidecar_path(prefix: str, shard: int = 0) -> str:
    return chunks.sidecar_filename(data_filename(prefix, shard, 4))


def test_every_byte_of_a_sidecar_flipped_is_ignored_never_reported_as_data_corruption(saved, caplog):
    """Ignored, not refused: a damaged sidecar says nothing about the data, which its index CRCs still
    check when read whole; refusing would make a good checkpoint unreadable for want of an extra file."""
    path = _sidecar_path(saved, 0)
    original = open(path, "rb").read()
    with BundleReader(saved) as r:
        p = r.stored_slices("kernel")[0]
    for pos in range(len(original)):
        flipped = bytearray(original)
        flipped[pos] ^= 0x01
        open(path, "wb").write(bytes(flipped))
        with BundleReader(saved) as r:
            np.testing.assert_array_equal(r.read_bounds("kernel", [(0, 1024), (0, 512)], entry=None),
                                          KERNEL[:1024, :512])
            assert r._chunk_span(p.entry, r._file(0), 0, 100) is None, pos  # not used, only ignored
    assert "ignoring the chunk checksums" in caplog.text


def _forge(path: str, header: tuple, pieces: list[tuple[int, int, int, int]], crcs: list[int],
           pad: bytes = b"") -> None:
    body = struct.pack("<8sIIQQQ", *header) + b"".join(struct.pack("<QQII", *p) for p in pieces)
    body += b"".join(struct.pack("<I", c) for c in crcs) + pad
    open(path, "wb").write(body + struct.pack("<I", mask_crc(crc32c(body))))


def test_hostile_sidecars_with_a_valid_checksum_are_ignored(saved):
    """Forged sidecars whose own CRC is right but whose contents lie: never a false error, never a large
    allocation, never a read outside the file."""
    p, path = _piece(saved, "kernel", 0)
    side = chunks.sidecar_filename(path)
    size = os.path.getsize(path)
    e = p.entry
    real = chunks.load(side, size)
    assert real is not None
    good = [int(c) for c in real.chunks_of(e.offset, e.size, e.crc32c)]
    C = chunks.CHUNK_SIZE
    cases = {
        "claims 2^40 pieces": ((chunks.MAGIC, 1, C, size, 1 << 40, 4), [], []),
        "claims 2^60 chunks": ((chunks.MAGIC, 1, C, size, 1, 1 << 60), [(e.offset, e.size, e.crc32c, 0)], good),
        "chunk size not a power of two": ((chunks.MAGIC, 1, C + 1, size, 1, 4), [(e.offset, e.size, e.crc32c, 0)],
                                          good),
        "tiny chunks": ((chunks.MAGIC, 1, 16, size, 0, 0), [], []),
        "other version": ((chunks.MAGIC, 2, C, size, 1, 4), [(e.offset, e.size, e.crc32c, 0)], good),
        "piece past the end": ((chunks.MAGIC, 1, C, size, 1, 4), [(size - 10, e.size, e.crc32c, 0)], good),
        "piece size wraps past 2^64": ((chunks.MAGIC, 1, C, size, 1, 4), [(8, (1 << 64) - 4, e.crc32c, 0)], good),
        "piece larger than the file": ((chunks.MAGIC, 1, C, size, 1, 4), [(0, size + 1, e.crc32c, 0)], good),
        "chunk count disagrees": ((chunks.MAGIC, 1, C, size, 1, 3), [(e.offset, e.size, e.crc32c, 0)], good[:3]),
        "overlapping pieces": ((chunks.MAGIC, 1, C, size, 2, 8),
                               [(e.offset, e.size, e.crc32c, 0), (e.offset + 8, e.size, e.crc32c, 0)], good * 2),
        "wrong data size": ((chunks.MAGIC, 1, C, size + 1, 1, 4), [(e.offset, e.size, e.crc32c, 0)],
                            [c ^ 1 for c in good]),
    }
    for what, (header, pieces, crcs) in cases.items():
        _forge(side, header, pieces, crcs)
        assert chunks.load(side, size) is None, what
        _check_values(_joined_41(_restore_41(saved)))
    _forge(side, (chunks.MAGIC, 1, C, size, 1, 4), [(e.offset, e.size, e.crc32c, 0)], good, pad=b"x")
    assert chunks.load(side, size) is None  # a trailing byte: the length no longer matches its counts
    os.unlink(side)
    os.mkdir(side)  # not a regular file
    assert chunks.load(side, size) is None
    _check_values(_restore_columns(saved))


def test_a_forged_sidecar_that_matches_the_index_but_not_the_bytes_is_reported(saved):
    """The other side of the binding: a sidecar bound to the index whose chunk CRC disagrees with the bytes
    is believed (the bytes or the sidecar are damaged): an error, never silently wrong values."""
    p, path = _piece(saved, "kernel", 0)
    side = chunks.sidecar_filename(path)
    e = p.entry
    good = [int(c) for c in chunks.load(side, os.path.getsize(path)).chunks_of(e.offset, e.size, e.crc32c)]
    _forge(side, (chunks.MAGIC, 1, chunks.CHUNK_SIZE, os.path.getsize(path), 1, 4), [(e.offset, e.size, e.crc32c, 0)],
           [good[0] ^ 1] + good[1:])
    with pytest.raises(sc.ChecksumMismatchError, match=f"at offset {e.offset} "):
        _restore_41(saved)


# --- checkpoints without sidecars ------------------------------------------------------------------------


def test_a_checkpoint_without_sidecars_reads_as_before(saved):
    for name in _sidecars(saved):
        os.unlink(os.path.join(os.path.dirname(saved), name))
    _check_values(_joined_41(_restore_41(saved)))
    _check_values(_restore_columns(saved))
    with BundleReader(saved) as r:
        p = r.stored_slices("kernel")[0]
        assert r._chunk_span(p.entry, r._file(p.entry.shard_id), 0, 100) is None
    p, path = _piece(saved, "kernel", 0)
    _flip(path, p.entry.offset + 1000)
    with pytest.raises(sc.ChecksumMismatchError):  # whole pieces are still checked by their own CRC
        _restore_whole(saved)
    _restore_41(saved)  # a part is not: what RELIABILITY.md says for checkpoints without sidecars


# --- the commit protocol ----------------------------------------------------------------------------------


def test_recovery_rolls_staged_sidecars_forward_or_removes_them(saved):
    directory, base = os.path.split(saved)
    token = "feedface"
    os.rename(saved + ".index", saved + ".index" + commit.STAGING + token)
    for r in range(4):
        data = data_filename(saved, r, 4)
        os.rename(data, data + commit.STAGING + token)
        os.rename(chunks.sidecar_filename(data), commit.sidecar_path(data + commit.STAGING + token))
    assert sorted(commit.leftovers(saved)) == [token]
    assert len(commit.leftovers(saved)[token]) == 9
    commit.recover(saved)  # passed its commit point: rolled forward, sidecars with their data files
    assert len(_sidecars(saved)) == 4 and commit.leftovers(saved) == {}
    p, path = _piece(saved, "kernel", 0)
    _flip(path, p.entry.offset + 99)
    with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
        _restore_41(saved)
    stray = commit.sidecar_path(data_filename(saved, 0, 4) + commit.STAGING + "0ld")
    open(stray, "wb").write(b"half")
    commit.recover(saved)  # a save that never reached its commit point: its staged sidecar goes
    assert not os.path.exists(stray)


def test_a_failed_save_leaves_no_sidecar(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ckpt")
    monkeypatch.setenv("SHARDCKPT_FAULT", "after_data_fsync@1:raise")
    with pytest.raises(sc.CheckpointError):
        _save(prefix)
    monkeypatch.delenv("SHARDCKPT_FAULT")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".crc32c") or ".crc32c." in n]


def test_an_overwrite_replaces_the_sidecars(saved):
    _save(saved, kernel=KERNEL * 2, overwrite=True)
    got = _restore_41(saved)
    np.testing.assert_array_equal(got[1][0].shards[1], KERNEL[512:1024] * 2)
    p, path = _piece(saved, "kernel", 0)
    assert chunks.load(chunks.sidecar_filename(path), os.path.getsize(path)).chunks_of(
        p.entry.offset, p.entry.size, p.entry.crc32c) is not None


# --- the bit-flip sweep over partial reads (RELIABILITY.md) ---------------------------------------------


def test_flips_of_data_bytes_are_caught_by_a_resharding_restore(saved, capsys):
    """Every 65537th byte of each data file flipped in turn, read back by the 4x1 resharding restore: with the
    sidecars every flip inside a piece is caught; without them, the flips in parts a restore reads are not."""
    directory = os.path.dirname(saved)
    results = {}
    for with_sidecars in (True, False):
        if not with_sidecars:
            for name in _sidecars(saved):
                os.unlink(os.path.join(directory, name))
        caught = silent = 0
        for r in range(4):
            path = data_filename(saved, r, 4)
            for pos in range(r, os.path.getsize(path), 65537):
                _flip(path, pos)
                try:
                    got = _restore_41(saved)
                except sc.ChecksumMismatchError as exc:
                    assert os.path.basename(path) in str(exc)
                    caught += 1
                else:
                    joined = _joined_41(got)
                    assert not all(np.array_equal(a, b) for a, b in zip(joined, [KERNEL, SMALL, BIAS])), pos
                    silent += 1
                finally:
                    _flip(path, pos)
        results[with_sidecars] = (caught, silent)
    with capsys.disabled():
        for key, (caught, silent) in results.items():
            print(f"\n  {'with' if key else 'without'} sidecars: {caught} flips caught, {silent} read back wrong")
    assert results[True][1] == 0 and results[True][0] > 200
    assert results[False][1] > 0


@pytest.mark.parametrize("chunk_size", [chunks.MIN_CHUNK, 1 << 16, chunks.CHUNK_SIZE])
@pytest.mark.parametrize("count,last", [(1, 0), (2, 0), (2, 1), (3, -1), (9, 0), (17, 7)])
def test_combined_chunk_crcs_equal_the_crc_of_the_bytes(chunk_size, count, last):
    """The table-driven shift of `combine_chunks` against a CRC of the whole buffer: every count, a last chunk
    full or short, chunk CRCs as a list (the writer) or an array (the sidecar)."""
    last_size = chunk_size if last == 0 else (last if last > 0 else chunk_size + last)
    data = np.random.default_rng(count * 31 + last).integers(0, 256, chunk_size * (count - 1) + last_size,
                                                             np.uint8).tobytes()
    parts = [crc32c(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]
    assert len(parts) == count
    assert chunks.combine_chunks(parts, chunk_size, last_size) == crc32c(data)
    assert chunks.combine_chunks(np.array(parts, "<u4"), chunk_size, last_size) == crc32c(data)
    # and the same as the bit-serial rule it replaces
    slow = parts[0]
    for i in range(1, count):
        slow = chunks.crc32c_combine(slow, parts[i], chunk_size if i < count - 1 else last_size)
    assert slow == crc32c(data)


@pytest.mark.parametrize("where", [0, reader_module._READ_CHECKED - 1, reader_module._READ_CHECKED,
                                   (4 << 20) - 1])
def test_a_whole_piece_read_in_checked_pieces_catches_a_flip_at_every_seam(saved, where):
    """A checked local read goes in `_READ_CHECKED` pieces, each CRC'd while in cache: a flip on either side of
    a seam between two of them, or in the first or last byte, still fails the piece's CRC, contiguous or not."""
    p, path = _piece(saved, "kernel", 0)
    _flip(path, p.entry.offset + where)
    with BundleReader(saved) as r:
        with pytest.raises(sc.ChecksumMismatchError, match="tensor kernel"):
            r.read_bounds("kernel", [(0, 1024), (0, 1024)], out=np.empty((1024, 1024), np.float32))
        with pytest.raises(sc.ChecksumMismatchError, match="tensor kernel"):
            r.read_bounds("kernel", [(0, 1024), (0, 1024)], out=np.empty((1024, 2048), np.float32)[:, :1024])
        got = r.read_bounds("kernel", [(0, 1024), (0, 1024)], verify=False)
    want = KERNEL[:1024, :1024].copy().view(np.uint8).reshape(-1)
    want[where] ^= 0x5A
    np.testing.assert_array_equal(got.view(np.uint8).reshape(-1), want)  # the flip is where the test put it
    with pytest.raises(sc.ChecksumMismatchError, match="tensor kernel"):
        _restore_whole(saved)


def test_a_junk_sidecar_is_refused_after_its_header(saved, monkeypatch):
    # Every reader reads the sidecars when it opens a checkpoint: a junk file at a sidecar's name (here as large as
    # the sidecar of the data file may be) must cost a 40-byte read, not a read of the whole file.
    p, path = _piece(saved, "kernel", 0)
    side = chunks.sidecar_filename(path)
    with open(side, "wb") as f:
        f.write(b"junk" * (chunks._largest(os.path.getsize(path)) // 4))
    sizes = []
    real = storage.LocalFile.read_into

    def counting(self, views, offset):
        if self.path == side:
            sizes.append(sum(len(v) for v in views))
        return real(self, views, offset)

    monkeypatch.setattr(storage.LocalFile, "read_into", counting)
    with BundleReader(saved) as r:
        np.testing.assert_array_equal(r.read_bounds("kernel", [(0, 10), (0, 1024)]), KERNEL[:10, :1024])
    assert sizes == [40], sizes
