"""Layouts a one-client user has: strided (column- and 2-D-sharded) views, many local devices, resharding.

Each test breaks on wrong bytes (values compared with the global array, damaged files caught) and, where a
path exists to save work, counts that work (bytes read through the kernel, from /proc/self/io).
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.format import BundleReader
from shardckpt.format.chunks import sidecar_filename

RNG = np.random.default_rng(13)
DTYPES = [np.int8, np.float16, np.float32, np.float64, np.complex128]  # item sizes 1, 2, 4, 8, 16


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _global(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    a = RNG.standard_normal(shape) * 50
    if np.issubdtype(dtype, np.complexfloating):
        a = a + 1j * RNG.standard_normal(shape)
    return a.astype(dtype)


def _data_files(prefix: str) -> list[str]:
    d = os.path.dirname(prefix)
    base = os.path.basename(prefix)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.startswith(base + ".data-") and "crc32c" not in n)


def _save_2x2(prefix: str, arrays: dict[str, np.ndarray]) -> sc.Mesh:
    mesh = sc.create_mesh([("x", 2), ("y", 2)])
    values = {k: sc.DTensor.from_global(v, sc.Layout(["x", "y"], mesh)) for k, v in arrays.items()}
    sc.name_based_save(mesh, prefix, values)
    return mesh


def _whole(t: sc.DTensor) -> np.ndarray:
    out = np.empty(t.shape, t.dtype)
    for d, shard in t.shards.items():
        out[tuple(slice(a, b) for a, b in t.bounds(d))] = shard
    return out


@pytest.fixture
def big(tmp_path):
    """A 2x2-sharded float32[2048, 2048] (four 4 MiB pieces, so the sidecar has chunk CRCs), one client."""
    prefix = str(tmp_path / "big")
    a = _global((2048, 2048), np.float32)
    _save_2x2(prefix, {"a": a})
    return prefix, a


def test_column_targets_read_each_stored_byte_once(big):
    prefix, a = big
    mesh = sc.create_mesh([("c", 4)])
    (data,) = _data_files(prefix)
    size = os.path.getsize(data)
    before = _rchar()
    (got,) = sc.sharded_restore(mesh, prefix, ["a"], [sc.Layout([sc.UNSHARDED, "c"], mesh)])
    read = _rchar() - before
    np.testing.assert_array_equal(_whole(got), a)
    # Two target column blocks share every stored piece: one read each of the piece, not one per block.
    assert size <= read < size + (1 << 20), (read, size)


def test_partial_column_reads_are_checked_against_the_chunks(big):
    prefix, a = big
    mesh = sc.create_mesh([("c", 4)])
    layout = sc.Layout([sc.UNSHARDED, "c"], mesh)
    spec = "2048 2048 100,1800:-"  # rows 100..1900: parts of each piece, read as one widened range per piece
    (got,) = sc.sharded_restore(mesh, prefix, ["a"], [layout], shape_and_slices=[spec])
    np.testing.assert_array_equal(_whole(got), a[100:1900])
    (data,) = _data_files(prefix)
    with BundleReader(prefix) as r:
        first_piece = r.stored_slices("a")[0].entry  # global rows 0..1024 or 1024..2048: row 500 is inside
    with open(data, "r+b") as f:  # a byte inside rows 100..1900 of the first piece
        f.seek(first_piece.offset + 500 * 1024 * 4 + 7)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(sc.ChecksumMismatchError, match="chunk checksum"):
        sc.sharded_restore(mesh, prefix, ["a"], [layout], shape_and_slices=[spec])
    with pytest.raises(sc.ChecksumMismatchError, match="checksum does not match"):
        sc.sharded_restore(mesh, prefix, ["a"], [layout])  # whole pieces: their own CRC
    os.unlink(sidecar_filename(data))  # no sidecar: partial reads go unchecked, whole pieces still checked
    (got,) = sc.sharded_restore(mesh, prefix, ["a"], [layout], shape_and_slices=[spec])
    want = a[100:1900].copy()
    assert (_whole(got) != want).sum() == 1
    with pytest.raises(sc.ChecksumMismatchError):
        sc.sharded_restore(mesh, prefix, ["a"], [layout])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_destinations_of_every_item_size(tmp_path, dtype):
    prefix = str(tmp_path / "odd")
    a = _global((37, 53), dtype)  # odd: boxes of 19 and 18 rows, 27 and 26 columns
    _save_2x2(prefix, {"a": a})
    for target in (["x", "y"], [sc.UNSHARDED, "y"], ["y", sc.UNSHARDED], [sc.UNSHARDED, sc.UNSHARDED]):
        mesh = sc.create_mesh([("x", 2), ("y", 2)])
        layout = sc.Layout(target, mesh)
        for kind in ("rows", "every-other"):
            shards = {}
            bases = {}
            for d in range(4):
                shape = tuple(hi - lo for lo, hi in layout.shard_bounds(a.shape, d))
                base = np.zeros((shape[0], shape[1] * 2 + 3), dtype)
                bases[d] = base
                shards[d] = base[:, 1 : 1 + shape[1]] if kind == "rows" else base[:, 1 : 1 + 2 * shape[1] : 2]
            dest = sc.DTensor(a.shape, np.dtype(dtype), layout, shards)
            (got,) = sc.sharded_restore(mesh, prefix, ["a"], [layout], into=[dest])
            np.testing.assert_array_equal(_whole(got), a)
            for d, base in bases.items():  # nothing written outside the destination views
                mask = np.ones(base.shape, bool)
                if kind == "rows":
                    mask[:, 1 : 1 + shards[d].shape[1]] = False
                else:
                    mask[:, 1 : 1 + 2 * shards[d].shape[1] : 2] = False
                assert not base[mask].any()


def test_read_boxes_matches_read_bounds_on_random_boxes(tmp_path):
    prefix = str(tmp_path / "boxes")
    a = _global((300, 260), np.float64)
    _save_2x2(prefix, {"a": a})
    rng = np.random.default_rng(5)
    with BundleReader(prefix) as r:
        for _ in range(40):
            boxes = []
            for _ in range(int(rng.integers(2, 5))):
                lo = rng.integers(0, [300, 260])
                hi = lo + rng.integers(0, [300, 260] - lo + 1)
                boxes.append(tuple(zip(lo.tolist(), hi.tolist())))
            got = r.read_boxes("a", boxes)
            for box, arr in zip(boxes, got):
                np.testing.assert_array_equal(arr, a[tuple(slice(lo, hi) for lo, hi in box)])
                np.testing.assert_array_equal(arr, r.read_bounds("a", box))


# --- saves of strided sources ------------------------------------------------------------------------


def _large_views() -> list[np.ndarray]:
    """Views over 4 MiB (so each is cut into segments) of every kind a writer meets, odd sizes included."""
    rng = np.random.default_rng(7)
    out = []
    for dtype in DTYPES:
        side = int(np.ceil(np.sqrt((5 << 20) / np.dtype(dtype).itemsize)))
        g = _global((2 * side + 1, 2 * side + 3), dtype)
        out.append(g[: side + 1, side + 1 :])  # a 2-D shard: short rows, odd count and length
        out.append(g[:, 1 : side + 2])  # a column block
    wide = rng.standard_normal((24, 3 * 65536 + 5)).astype(np.float32)
    out.append(wide[:, 3 : 3 * 65536 + 3])  # rows of 768 KiB: written from the array, one iovec each
    cube = rng.standard_normal((9, 700, 300)).astype(np.float64)
    out.append(cube[:, 100:650, :])  # contiguous 1.3 MiB sub-blocks inside a strided view
    out.append(cube[:, :, ::2])  # a stride inside the rows: gathered element by element
    out.append(cube.transpose(2, 0, 1))  # no row view at all
    out.append(rng.integers(0, 1 << 30, 3_000_001, dtype=np.int64)[::2])  # a strided vector
    out.append(rng.standard_normal((2301, 1031)).astype(np.float32))  # contiguous, segments off the 1 MiB grid
    return out


def _chunk_crcs_of(path: str, offset: int, size: int, chunk: int) -> list[int]:
    import crc32c

    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    return [crc32c.crc32c(data[i : i + chunk]) for i in range(0, size, chunk)]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_strided_large_sources_write_what_the_sequential_writer_appends(tmp_path, threads):
    from shardckpt.format import chunks
    from shardckpt.format.parallel_writer import write_data_file
    from shardckpt.format.writer import DataFileWriter, prepare

    views = _large_views()
    seq = DataFileWriter(str(tmp_path / "seq"))
    want = [seq.write(prepare(np.ascontiguousarray(v))) for v in views]
    seq.close(durable=False)
    par = str(tmp_path / "par")
    got, size = write_data_file(par, [prepare(v, contiguous=False) for v in views], threads=threads, durable=False,
                                sidecar=par + ".crc32c")
    assert got == want and size == seq.size
    assert (tmp_path / "par").read_bytes() == (tmp_path / "seq").read_bytes()
    table = chunks.load(par + ".crc32c", size)
    assert table is not None
    for e in got:  # every chunk CRC the sidecar holds is the CRC of those very bytes
        recorded = table.chunks_of(e.offset, e.size, e.crc32c)
        assert recorded is not None
        assert [int(c) for c in recorded] == _chunk_crcs_of(par, e.offset, e.size, table.chunk_size)


def test_a_failing_segment_removes_the_file(tmp_path):
    from shardckpt.format.parallel_writer import write_data_file
    from shardckpt.format.writer import prepare

    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_data_file(str(tmp_path / "f"), [prepare(v, contiguous=False) for v in _large_views()[:4]], midway=boom,
                        sidecar=str(tmp_path / "f.crc32c"))
    assert calls == [1] and not os.listdir(tmp_path)


def _gathered_views() -> list[np.ndarray]:
    """2-D shards of one matrix (rows 4 KiB apart, half of each used), 32 MiB: many bounce buffers' worth."""
    g = _global((4096, 2048), np.float32)
    return [g[i : i + 2048, j : j + 1024] for i in (0, 2048) for j in (0, 1024)]


def test_writes_of_gathered_rows_reuse_the_same_bounce_buffers(tmp_path):
    """Bounce buffers go back to the pool once written and the next save takes the same ones: it
    allocates none (a fresh buffer costs a page fault per 4 KiB), and the bytes are the sequential
    writer's."""
    from shardckpt.format import parallel_writer as pw
    from shardckpt.format.writer import DataFileWriter, prepare

    views = _gathered_views()
    seq = DataFileWriter(str(tmp_path / "seq"))
    want = [seq.write(prepare(np.ascontiguousarray(v))) for v in views]
    seq.close(durable=False)
    pw.write_data_file(str(tmp_path / "warm"), [prepare(v, contiguous=False) for v in views], threads=2,
                       durable=False)
    pool = {id(b) for b in pw._free_bounces}
    assert 0 < len(pool) <= pw._MAX_FREE
    got, size = pw.write_data_file(str(tmp_path / "par"), [prepare(v, contiguous=False) for v in views], threads=2,
                                   durable=False)
    assert {id(b) for b in pw._free_bounces} == pool
    assert got == want and size == seq.size
    assert (tmp_path / "par").read_bytes() == (tmp_path / "seq").read_bytes()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_write_the_os_refuses_mid_file_is_raised_and_the_file_removed(tmp_path, threads):
    """A ``pwritev`` refused on a writer thread (here EFBIG past RLIMIT_FSIZE, a real refusal) is raised by
    the caller, leaves no file (nor sidecar), and the next write works."""
    import resource
    import signal

    from shardckpt.format import parallel_writer as pw
    from shardckpt.format.writer import prepare

    views = _gathered_views()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (9 << 20, old_limit[1]))
    try:
        with pytest.raises(OSError) as err:
            pw.write_data_file(str(tmp_path / "f"), [prepare(v, contiguous=False) for v in views], threads=threads,
                               durable=False, sidecar=str(tmp_path / "f.crc32c"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert err.value.errno == errno.EFBIG
    assert not os.listdir(tmp_path)
    assert len(pw._free_bounces) <= pw._MAX_FREE
    got, _ = pw.write_data_file(str(tmp_path / "g"), [prepare(v, contiguous=False) for v in views], threads=threads,
                                durable=False)
    assert (tmp_path / "g").stat().st_size == got[-1].offset + got[-1].size


def test_midway_runs_once_the_first_job_is_in_the_file(tmp_path):
    """The fault point after the first job sees that job's bytes in the file, though other threads
    were already writing later jobs."""
    from shardckpt.format.parallel_writer import SEGMENT, write_data_file
    from shardckpt.format.writer import prepare

    path = tmp_path / "f"
    views = _gathered_views()
    first = views[0][: SEGMENT // (1024 * 4)]  # exactly one segment's rows
    seen = []
    write_data_file(str(path), [prepare(v, contiguous=False) for v in views], threads=2, durable=False,
                    midway=lambda: seen.append(path.read_bytes()[: SEGMENT]))
    assert seen == [np.ascontiguousarray(first).tobytes()]


def _files(prefix: str) -> dict[str, bytes]:
    d, base = os.path.split(prefix)
    return {n[len(base):]: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.startswith(base)}


_TF_READ = r"""
import hashlib, json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
out = {}
for prefix in sys.argv[1:]:
    r = tf.train.load_checkpoint(prefix)
    for name, dtype in sorted(r.get_variable_to_dtype_map().items()):
        (t,) = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[""], dtypes=[dtype])
        v = np.ascontiguousarray(t.numpy())
        out[prefix + ":" + name] = [str(v.dtype), list(v.shape), hashlib.sha256(v.tobytes()).hexdigest()]
print(json.dumps(out))
"""


def test_one_client_many_devices_saves_views_tensorflow_reads(tmp_path):
    import hashlib
    import json
    import subprocess
    import sys

    cases = {
        "m2x2": ([("x", 2), ("y", 2)], ["x", "y"]),
        "m2x4": ([("x", 2), ("y", 4)], ["x", "y"]),
        "cols8": ([("c", 8)], [sc.UNSHARDED, "c"]),
        "cols4": ([("c", 4)], [sc.UNSHARDED, "c"]),
    }
    # int16, not float16 or uint16: TensorFlow's reader of sliced tensors refuses those ("Dtype half not supported")
    arrays = {f"t{i}": _global(shape, dtype) for i, (shape, dtype) in
              enumerate([((2050, 2047), np.float32), ((1031, 4099), np.int16), ((613, 517), np.complex128),
                         ((4099, 1031), np.int8), ((37, 53), np.float64)])}
    prefixes = []
    for case, (dims, spec) in cases.items():
        mesh = sc.create_mesh(dims)
        layout = sc.Layout(spec, mesh)
        views = {n: sc.DTensor.from_global(a, layout) for n, a in arrays.items()}
        assert any(not s.flags.c_contiguous for t in views.values() for s in t.shards.values())
        copies = {n: sc.DTensor(t.shape, t.dtype, t.layout, {d: s.copy() for d, s in t.shards.items()})
                  for n, t in views.items()}
        sc.name_based_save(mesh, tmp_path / case / "views", views)
        sc.name_based_save(mesh, tmp_path / case / "copies", copies)
        # the same layout from views or from contiguous copies: the same files, byte for byte
        assert _files(str(tmp_path / case / "views")) == _files(str(tmp_path / case / "copies"))
        back = sc.name_based_restore(mesh, tmp_path / case / "views", {n: layout for n in arrays})
        for n, a in arrays.items():
            np.testing.assert_array_equal(_whole(back[n]), a)
        prefixes.append(str(tmp_path / case / "views"))
    proc = subprocess.run([sys.executable, "-c", _TF_READ, *prefixes], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    for prefix in prefixes:
        for n, a in arrays.items():
            assert seen[f"{prefix}:{n}"] == [str(a.dtype), list(a.shape),
                                            hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()]


_JAX_RESTORE = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import shardckpt.jax as scj

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
specs = {"a": P("x", "y"), "b": P(None, "y"), "c": P("x", None), "r": P()}
rng = np.random.default_rng(3)
host = {n: rng.standard_normal((1030, 2052)).astype(np.float32) for n in specs}
host["r"] = rng.standard_normal((300, 1001)).astype(np.float32)  # float32: jax without x64
if sys.argv[2] == "save":  # in its own process: the restore's process holds no freed memory to reuse
    scj.save({n: jax.device_put(host[n], NamedSharding(mesh, s)) for n, s in specs.items()}, sys.argv[1])
    sys.exit(0)
abstract = {n: jax.ShapeDtypeStruct(host[n].shape, host[n].dtype, sharding=NamedSharding(mesh, s))
            for n, s in specs.items()}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS:")
out = jax.block_until_ready(scj.restore(sys.argv[1], abstract))
added = rss("VmHWM:") - base
same = all(np.array_equal(np.asarray(out[n]), host[n]) for n in host)
held = sum(s.data.nbytes for a in out.values() for s in a.addressable_shards)
print(json.dumps({"same": same, "added": added, "held": held}))
"""


def test_jax_restore_hands_its_buffers_to_jax_without_a_second_copy(tmp_path):
    import json
    import subprocess
    import sys

    for mode in ("save", "restore"):
        proc = subprocess.run([sys.executable, "-c", _JAX_RESTORE, str(tmp_path / "j"), mode], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["same"]
    # Every device's shard restored into 64-byte-aligned host memory that jax.device_put adopts as it is, so
    # the restore touches no memory beyond the buffers the arrays keep (measured: 0.67x of the bytes the
    # shards report, replicas counted), where copying them into XLA's own buffers touched 1.0x.
    assert got["added"] < 0.85 * got["held"], got
