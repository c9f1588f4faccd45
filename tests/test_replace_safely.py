"""No silent corruption: replacing a checkpoint, merging, comparing and restoring never lose or mix data.

Failures here are real: a tmpfs that is full (ENOSPC), a read-only bind mount (EROFS, which stops root
too), a prefix under a regular file (ENOTDIR), a process killed by ``os._exit`` in the middle of a publish.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import shardckpt as sc
from fs_helpers import fill_to, free_bytes, full_filesystem, read_only
from shardckpt.cli import main
from shardckpt.commit import recover
from shardckpt.convert import checkpoint_to_safetensors, open_source, safetensors_to_checkpoint
from shardckpt.diff import diff_tensors
from shardckpt.format import BundleReader, BundleWriter, merge_bundles

OLD = {"w": np.arange(1000, dtype=np.float32), "step": np.array(7, np.int64)}


def write(prefix: Path | str, tensors: dict, **kwargs) -> None:
    with BundleWriter(prefix, **kwargs) as w:
        for name, value in tensors.items():
            w.add(name, value)


def read_all(prefix: Path | str) -> dict[bytes, np.ndarray]:
    with BundleReader(prefix) as r:
        return {key: r.read(key) for key, e in r.raw_entries() if not key.startswith(b"\x00") or not e.slices}


def assert_holds(prefix: Path | str, tensors: dict) -> None:
    got = read_all(prefix)
    assert sorted(got) == sorted(k.encode() if isinstance(k, str) else k for k in tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(got[name.encode() if isinstance(name, str) else name], value)


def many_names(count: int = 3000) -> dict[str, np.ndarray]:
    """Tiny tensors with long names: a few pages of data but an index of well over 100 KiB."""
    return {f"layer_{i:05d}/" + "n" * 60: np.array(i, np.int32) for i in range(count)}


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- the file-system helpers themselves -----------------------------------------------------------------


def test_full_filesystem_refuses_writes_past_its_size_and_is_unmounted_after(tmp_path):
    with pytest.raises(RuntimeError), full_filesystem(tmp_path, 64 * 1024) as d:
        mount_point = d
        fill_to(d, 0)
        with pytest.raises(OSError) as info:
            (d / "more").write_bytes(b"x" * 8192)
        assert info.value.errno == errno.ENOSPC
        raise RuntimeError("the body failed")  # the mount is undone anyway
    assert not mount_point.exists()
    assert str(mount_point) not in Path("/proc/self/mounts").read_text()


def test_read_only_stops_root_and_is_undone_after(tmp_path):
    assert os.geteuid() == 0  # the reason chmod is not enough
    (tmp_path / "kept").write_bytes(b"abc")
    with read_only(tmp_path):
        with pytest.raises(OSError) as info:
            (tmp_path / "new").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        assert (tmp_path / "kept").read_bytes() == b"abc"
    (tmp_path / "new").write_bytes(b"x")


# --- 1. BundleWriter replaces an old checkpoint only once the new one is complete -----------------------


def test_overwrite_on_a_full_disk_keeps_the_old_checkpoint(tmp_path):
    new = many_names()
    with full_filesystem(tmp_path, 1 << 20) as d:
        prefix = d / "ckpt"
        write(prefix, OLD)
        fill_to(d, 64 * 1024)  # room for the new data file, not for its index
        with pytest.raises(sc.CheckpointIOError) as info:
            write(prefix, new)
        err = info.value
        assert err.errno == errno.ENOSPC and isinstance(err, OSError)
        assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
        assert str(prefix) in str(err)
        assert_holds(prefix, OLD)
        assert files(d) == [
            "ckpt.data-00000-of-00001", "ckpt.data-00000-of-00001.crc32c", "ckpt.index", "filler"
        ]  # nothing staged is left


def test_cli_convert_overwrite_on_a_full_disk_keeps_the_old_checkpoint(tmp_path):
    source = tmp_path / "new.safetensors"
    save_file(many_names(), str(source))
    with full_filesystem(tmp_path, 1 << 20) as d:
        prefix = d / "ckpt"
        write(prefix, OLD)
        fill_to(d, 64 * 1024)
        done = subprocess.run([sys.executable, "-m", "shardckpt", "convert", str(source), str(prefix), "--overwrite"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert str(prefix) in done.stderr and "No space left" in done.stderr
        assert "Traceback" not in done.stderr
        assert_holds(prefix, OLD)
        assert files(d) == ["ckpt.data-00000-of-00001", "ckpt.data-00000-of-00001.crc32c", "ckpt.index", "filler"]


def test_bundle_writer_stages_under_the_commit_names(tmp_path):
    prefix = tmp_path / "ckpt"
    w = BundleWriter(prefix)
    w.add("x", np.arange(5.0))
    (staged,) = files(tmp_path)
    assert staged.startswith("ckpt.data-00000-of-00001.staging-")
    assert recover(str(prefix)) == [f"removed {tmp_path / staged}"]  # a crashed writer is cleaned up
    w.abort()
    assert files(tmp_path) == []


_CRASH = """
import os, sys
import numpy as np
from shardckpt.format import BundleWriter
prefix, when, target = sys.argv[1], sys.argv[2], sys.argv[3]
real = getattr(os, when)
def crash(*args, **kwargs):
    if os.fspath(args[-1 if when == "replace" else 0]) == target:
        os._exit(17)  # the process dies here: no cleanup, no finally
    return real(*args, **kwargs)
setattr(os, when, crash)
with BundleWriter(prefix) as w:
    w.add("w", np.full(1000, 2.0, np.float32))
    w.add("new", np.array([1, 2, 3]))
"""


@pytest.mark.parametrize("when", ["unlink", "replace"])
def test_a_crashed_overwrite_is_finished_or_undone_by_recover(tmp_path, when):
    """Killed before the old index goes: the old checkpoint stays.  Killed after: recover rolls forward."""
    prefix = tmp_path / "ckpt"
    write(prefix, OLD)
    index = f"{prefix}.index"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASH), str(prefix), when, index],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 17, done.stderr
    actions = recover(str(prefix))
    assert files(tmp_path) == ["ckpt.data-00000-of-00001", "ckpt.data-00000-of-00001.crc32c", "ckpt.index"]
    if when == "unlink":
        assert all(a.startswith("removed ") for a in actions) and len(actions) == 3  # index, data file, sidecar
        assert_holds(prefix, OLD)
    else:
        assert len(actions) == 1 and actions[0].startswith("completed the interrupted commit")
        assert_holds(prefix, {"w": np.full(1000, 2.0, np.float32), "new": np.array([1, 2, 3])})


# --- 2. merge_bundles checks every input before it moves anything -----------------------------------------


def _two_inputs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "in" / "a", tmp_path / "in" / "b"
    write(a, {"a": np.arange(3.0)})
    write(b, {"b": np.arange(4.0)})
    return a, b


def test_merge_with_a_missing_data_file_moves_nothing(tmp_path):
    a, b = _two_inputs(tmp_path)
    os.unlink(f"{b}.data-00000-of-00001")
    before = files(tmp_path / "in")
    with pytest.raises(sc.CheckpointNotFoundError) as info:
        merge_bundles([a, b], tmp_path / "out" / "m")
    assert f"{b}.data-00000-of-00001" in str(info.value)
    assert files(tmp_path / "in") == before
    assert_holds(a, {"a": np.arange(3.0)})
    assert not (tmp_path / "out").exists() or files(tmp_path / "out") == []


def test_merge_with_an_unreadable_later_input_moves_nothing(tmp_path):
    a, b = _two_inputs(tmp_path)
    Path(f"{b}.index").write_bytes(b"not an index at all, but long enough to have a footer" * 2)
    with pytest.raises(sc.CorruptCheckpointError):
        merge_bundles([a, b], tmp_path / "out" / "m")
    assert_holds(a, {"a": np.arange(3.0)})


def test_merge_on_a_full_disk_keeps_inputs_and_the_old_destination(tmp_path):
    with full_filesystem(tmp_path, 1 << 20) as d:
        dest = d / "m"
        write(dest, OLD)
        part = many_names(1500)
        write(d / "a", part)
        fill_to(d, 16 * 1024)  # the merged index does not fit
        with pytest.raises(sc.CheckpointIOError) as info:
            merge_bundles([d / "a"], dest)
        assert info.value.errno == errno.ENOSPC and str(dest) in str(info.value)
        assert_holds(dest, OLD)
        assert_holds(d / "a", part)
        assert files(d) == [
            "a.data-00000-of-00001", "a.data-00000-of-00001.crc32c", "a.index", "filler", "m.data-00000-of-00001",
            "m.data-00000-of-00001.crc32c", "m.index"
        ]


def test_merge_still_moves_the_data_and_drops_the_input_indexes(tmp_path):
    a, b = _two_inputs(tmp_path)
    write(tmp_path / "out" / "m", OLD)
    header = merge_bundles([a, b], tmp_path / "out" / "m")
    assert header.num_shards == 2
    assert_holds(tmp_path / "out" / "m", {"a": np.arange(3.0), "b": np.arange(4.0)})
    assert not (tmp_path / "in").exists()  # inputs moved, their emptied directory removed as TensorFlow does
    assert files(tmp_path / "out") == [
        "m.data-00000-of-00002", "m.data-00000-of-00002.crc32c", "m.data-00001-of-00002",
        "m.data-00001-of-00002.crc32c", "m.index"
    ]


def test_merge_into_one_of_its_inputs(tmp_path):
    a, b = _two_inputs(tmp_path)
    merge_bundles([a, b], a)
    assert_holds(a, {"a": np.arange(3.0), "b": np.arange(4.0)})
    assert files(tmp_path / "in") == [
        "a.data-00000-of-00002", "a.data-00000-of-00002.crc32c", "a.data-00001-of-00002",
        "a.data-00001-of-00002.crc32c", "a.index"
    ]


# --- 3. diff and convert: complex NaNs by component, names as full byte strings ---------------------------


@pytest.mark.parametrize(("x", "y", "equal"), [
    (complex(np.nan, 1), complex(np.nan, 2), False),
    (complex(1, np.nan), complex(np.nan, 1), False),
    (complex(np.nan, 1), complex(np.nan, 1), True),
    (complex(np.nan, np.nan), complex(np.nan, np.nan), True),
    (complex(np.nan, 0), complex(np.nan, -0.0), True),
])
def test_diff_compares_complex_numbers_by_component(tmp_path, x, y, equal):
    for dtype in (np.complex64, np.complex128):
        write(tmp_path / "a", {"z": np.array([1 + 1j, x], dtype)})
        write(tmp_path / "b", {"z": np.array([1 + 1j, y], dtype)})
        report = diff_tensors(tmp_path / "a", tmp_path / "b")
        assert report.identical is equal, (dtype, x, y)
        (t,) = report.tensors
        assert t.differing_elements == (0 if equal else 1)
    # what numpy says, component by component
    a, b = np.array([x]), np.array([y])
    assert equal == (np.array_equal(a.real, b.real, equal_nan=True) and np.array_equal(a.imag, b.imag, equal_nan=True))


def test_diff_of_complex_with_nan_in_the_same_component_reports_the_other_components_difference(tmp_path):
    write(tmp_path / "a", {"z": np.array([complex(np.nan, 1)])})
    write(tmp_path / "b", {"z": np.array([complex(np.nan, 4)])})
    (t,) = diff_tensors(tmp_path / "a", tmp_path / "b").tensors
    assert t.max_abs_diff == 3.0 and not t.equal


NAMES = [
    ({"\x00x": np.array([1.0]), "x": np.array([2.0])}, {"x": np.array([2.0])}),
    ({"a\x00b": np.array([1.0]), "a\x00c": np.array([2.0])}, {"a\x00b": np.array([1.0]), "a\x00d": np.array([2.0])}),
    ({b"\xff": np.array([1.0]), b"\xfe": np.array([2.0])}, {b"\xfe": np.array([1.0]), b"\xff": np.array([2.0])}),
]


@pytest.mark.parametrize(("left", "right"), NAMES)
def test_diff_tells_names_apart_by_every_byte(tmp_path, left, right):
    write(tmp_path / "a", left)
    write(tmp_path / "b", right)
    assert not diff_tensors(tmp_path / "a", tmp_path / "b").identical
    assert diff_tensors(tmp_path / "a", tmp_path / "a").identical
    assert len(open_source(tmp_path / "a").tensors()) == len(left)


def test_convert_keeps_a_name_that_starts_with_nul_both_ways(tmp_path):
    tensors = {"\x00x": np.array([1.0]), "x": np.array([2.0]), "a\x00b": np.array([3.0]), "a\x00c": np.array([4.0])}
    write(tmp_path / "ckpt", tensors)
    report = checkpoint_to_safetensors(tmp_path / "ckpt", tmp_path / "m.safetensors")
    assert report.tensors == 4 and not report.skipped
    safetensors_to_checkpoint(tmp_path / "m.safetensors", tmp_path / "back")
    assert_holds(tmp_path / "back", tensors)
    assert diff_tensors(tmp_path / "ckpt", tmp_path / "m.safetensors").identical


def test_convert_refuses_a_name_safetensors_cannot_hold(tmp_path):
    write(tmp_path / "ckpt", {b"\xff": np.array([1.0]), "ok": np.array([2.0])})
    with pytest.raises(sc.UnsupportedDTypeError, match="UTF-8"):
        checkpoint_to_safetensors(tmp_path / "ckpt", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    report = checkpoint_to_safetensors(tmp_path / "ckpt", tmp_path / "m.safetensors", skip_unsupported=True)
    assert report.tensors == 1 and len(report.skipped) == 1


def test_cli_diff_shows_names_it_cannot_print_escaped(tmp_path, capsys):
    write(tmp_path / "a", {"\x00x": np.array([1.0]), b"\xff": np.array([1.0])})
    write(tmp_path / "b", {"x": np.array([1.0])})
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "only in A: '\\x00x'" in out and "only in A: b'\\xff'" in out and "only in B: x" in out


# --- 4. sharded_restore(into=...) checks every destination before writing any -----------------------------


def test_restore_into_checks_every_shard_before_writing(tmp_path):
    prefix = tmp_path / "ckpt"
    write(prefix, {"a": np.arange(8, dtype=np.float32), "b": np.arange(8, dtype=np.float32)})
    mesh = sc.create_mesh([("x", 2)], local_device_ids=[0, 1])
    layout = sc.Layout(["x"], mesh)
    good = sc.DTensor((8,), np.float32, layout, {0: np.full(4, -1, np.float32), 1: np.full(4, -1, np.float32)})
    # the DTensor claims float32, but one shard is float64: found only when that shard was written
    bad = sc.DTensor((8,), np.float32, layout, {0: np.full(4, -1, np.float32), 1: np.full(4, -1, np.float64)})
    with pytest.raises(sc.DTypeMismatchError, match="device 1"):
        sc.sharded_restore(mesh, prefix, ["a", "b"], [layout, layout], into=[good, bad])
    assert all((s == -1).all() for t in (good, bad) for s in t.shards.values())


def test_restore_into_checks_shard_shapes_set_after_construction(tmp_path):
    prefix = tmp_path / "ckpt"
    write(prefix, {"a": np.arange(8, dtype=np.float32), "b": np.arange(8, dtype=np.float32)})
    mesh = sc.create_mesh([("x", 2)], local_device_ids=[0, 1])
    layout = sc.Layout(["x"], mesh)
    good = sc.DTensor((8,), np.float32, layout, {0: np.full(4, -1, np.float32), 1: np.full(4, -1, np.float32)})
    bad = sc.DTensor((8,), np.float32, layout, {0: np.full(4, -1, np.float32), 1: np.full(4, -1, np.float32)})
    bad.shards[1] = np.full(5, -1, np.float32)
    with pytest.raises(sc.ShapeMismatchError, match="device 1"):
        sc.sharded_restore(mesh, prefix, ["a", "b"], [layout, layout], into=[good, bad])
    assert all((s == -1).all() for t in (good, bad) for s in t.shards.values())


# --- 5. OS failures name the prefix and the file, as CheckpointIOError -------------------------------------


def _assert_io_error(info: pytest.ExceptionInfo, code: int, *names: object) -> None:
    err = info.value
    assert isinstance(err, sc.CheckpointIOError) and err.errno == code, repr(err)
    assert err.__cause__ is not None  # the original error, chained
    for name in names:
        assert str(name) in str(err), (name, str(err))


def test_prefix_under_a_regular_file(tmp_path):
    (tmp_path / "file.txt").write_text("hi")
    prefix = tmp_path / "file.txt" / "ckpt"
    write(tmp_path / "ok", OLD)
    save_file({"x": np.arange(3.0)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(sc.CheckpointIOError) as info:
        BundleWriter(prefix)
    _assert_io_error(info, errno.ENOTDIR, prefix)
    with pytest.raises(sc.CheckpointIOError) as info:
        safetensors_to_checkpoint(tmp_path / "x.safetensors", prefix)
    _assert_io_error(info, errno.ENOTDIR, prefix)
    with pytest.raises(sc.CheckpointIOError) as info:
        checkpoint_to_safetensors(tmp_path / "ok", tmp_path / "file.txt" / "x.safetensors")
    _assert_io_error(info, errno.ENOTDIR, tmp_path / "file.txt" / "x.safetensors")
    with pytest.raises(sc.CheckpointIOError) as info:
        merge_bundles([tmp_path / "ok"], prefix)
    _assert_io_error(info, errno.ENOTDIR, prefix)
    assert_holds(tmp_path / "ok", OLD)
    with pytest.raises(sc.CheckpointNotFoundError) as nf:
        sc.sharded_restore(sc.create_mesh([("x", 1)], local_device_ids=[0]), prefix, ["w"],
                           [sc.Layout.replicated(sc.create_mesh([("x", 1)], local_device_ids=[0]), 1)])
    assert str(prefix) in str(nf.value)


def test_read_only_directory(tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    write(d / "ckpt", OLD)
    save_file({"x": np.arange(3.0)}, str(tmp_path / "x.safetensors"))
    with read_only(d):
        with pytest.raises(sc.CheckpointIOError) as info:
            write(d / "ckpt", {"w": np.zeros(3)})
        _assert_io_error(info, errno.EROFS, d / "ckpt")
        with pytest.raises(sc.CheckpointIOError) as info:
            safetensors_to_checkpoint(tmp_path / "x.safetensors", d / "ckpt", overwrite=True)
        _assert_io_error(info, errno.EROFS, d / "ckpt")
        with pytest.raises(sc.CheckpointIOError) as info:
            checkpoint_to_safetensors(d / "ckpt", d / "y.safetensors")
        _assert_io_error(info, errno.EROFS, d / "y.safetensors")
        with pytest.raises(sc.CheckpointIOError) as info:
            merge_bundles([d / "ckpt"], d / "merged")
        _assert_io_error(info, errno.EROFS, d / "merged")
        # reading still works from a read-only directory
        mesh = sc.create_mesh([("x", 1)], local_device_ids=[0])
        (t,) = sc.sharded_restore(mesh, d / "ckpt", ["w"], [sc.Layout.replicated(mesh, 1)])
        np.testing.assert_array_equal(t.to_numpy(), OLD["w"])
        rc = main(["convert", str(tmp_path / "x.safetensors"), str(d / "ckpt"), "--overwrite"])
        err = capsys.readouterr().err
        assert rc == 1 and str(d / "ckpt") in err and "Read-only file system" in err
        rc = main(["clean", str(d / "ckpt")])
        assert rc == 0  # nothing to clean, nothing written
    (d / "ckpt.data-00000-of-00001.staging-0123").write_bytes(b"left by a crashed save")
    with read_only(d):
        rc = main(["clean", str(d / "ckpt")])
        err = capsys.readouterr().err
        assert rc == 1 and str(d / "ckpt") in err and "Read-only file system" in err and "Traceback" not in err
    assert_holds(d / "ckpt", OLD)


def test_disk_full_while_adding_tensors(tmp_path):
    with full_filesystem(tmp_path, 256 * 1024) as d:
        with pytest.raises(sc.CheckpointIOError) as info:
            write(d / "ckpt", {"big": np.zeros(1 << 20, np.uint8)})
        _assert_io_error(info, errno.ENOSPC, d / "ckpt", "big")
        assert files(d) == []
        assert free_bytes(d) > 200 * 1024  # the partial file is gone
    with full_filesystem(tmp_path, 256 * 1024) as d:
        save_file({"big": np.zeros(1 << 20, np.uint8)}, str(tmp_path / "big.safetensors"))
        with pytest.raises(sc.CheckpointIOError) as info:
            safetensors_to_checkpoint(tmp_path / "big.safetensors", d / "ckpt")
        _assert_io_error(info, errno.ENOSPC, d / "ckpt")
        write(tmp_path / "big", {"big": np.zeros(1 << 20, np.uint8)})
        with pytest.raises(sc.CheckpointIOError) as info:
            checkpoint_to_safetensors(tmp_path / "big", d / "big.safetensors")
        _assert_io_error(info, errno.ENOSPC, d / "big.safetensors")
        assert files(d) == []


def test_merge_across_file_systems_copies_where_it_cannot_link(tmp_path):
    a, b = _two_inputs(tmp_path)
    with full_filesystem(tmp_path, 1 << 20) as d:
        merge_bundles([a, b], d / "m")  # os.link gives EXDEV here
        assert_holds(d / "m", {"a": np.arange(3.0), "b": np.arange(4.0)})
        assert files(d) == [
            "m.data-00000-of-00002", "m.data-00000-of-00002.crc32c", "m.data-00001-of-00002",
            "m.data-00001-of-00002.crc32c", "m.index"
        ]
    assert not (tmp_path / "in").exists()


CRASHED_SAVE = textwrap.dedent("""
    import sys
    import numpy as np
    import shardckpt as sc
    mesh = sc.create_mesh([("x", 1)])
    sc.name_based_save(mesh, sys.argv[1], {"w": np.full(4096, 2.0, np.float32)}, overwrite=True)
""")


def test_clean_on_a_full_disk_takes_over_a_crashed_saves_lease_and_frees_its_files(tmp_path):
    # A save killed after staging leaves its files and a dead P.lease; the disk is then full, which is when
    # `clean` is needed most, yet a new lease cannot be written.  The dead lease is taken over in place.
    from shardckpt.faults import ENV as FAULT_ENV

    with full_filesystem(tmp_path, 1 << 20) as d:
        prefix = d / "ckpt"
        mesh = sc.create_mesh([("x", 1)])
        sc.name_based_save(mesh, prefix, {"w": np.full(4096, 1.0, np.float32)})
        env = {**os.environ, FAULT_ENV: "after_index_staged@0:kill"}
        env.pop("SHARDCKPT_COORDINATOR", None)
        crashed = subprocess.run([sys.executable, "-c", CRASHED_SAVE, str(prefix)], env=env, capture_output=True,
                                 timeout=120)
        assert crashed.returncode == -9, crashed.stderr[-2000:]
        left = [n for n in files(d) if ".staging-" in n]
        assert len(left) >= 2 and "ckpt.lease" in files(d), files(d)
        fill_to(d, 0)
        cleaned = subprocess.run([sys.executable, "-m", "shardckpt", "clean", str(prefix)], capture_output=True,
                                 text=True, timeout=120)
        assert cleaned.returncode == 0, cleaned.stderr[-2000:]
        assert files(d) == ["ckpt.data-00000-of-00001", "ckpt.data-00000-of-00001.crc32c", "ckpt.index",
                            "filler"] or files(d) == ["ckpt.data-00000-of-00001", "ckpt.index", "filler"], files(d)
        np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("w"), np.full(4096, 1.0, np.float32))


def test_clean_on_a_full_disk_never_takes_over_a_live_lease(tmp_path):
    from shardckpt.lease import PrefixLease

    with full_filesystem(tmp_path, 1 << 20) as d:
        prefix = d / "ckpt"
        write(prefix, OLD)
        staged = d / "ckpt.data-00000-of-00001.staging-0123456789abcdef"
        with PrefixLease.acquire(str(prefix), what="a live save"):
            staged.write_bytes(b"x" * 4096)
            fill_to(d, 0)
            cleaned = subprocess.run([sys.executable, "-m", "shardckpt", "clean", str(prefix)], capture_output=True,
                                     text=True, timeout=120)
            assert cleaned.returncode == 1 and "a live save" in cleaned.stderr, (cleaned.stdout, cleaned.stderr)
            assert staged.read_bytes() == b"x" * 4096
        assert_holds(prefix, OLD)


@pytest.mark.parametrize("how", ["BundleWriter", "merge_bundles", "sharded_save"])
def test_a_directory_at_the_sidecar_name_does_not_lose_the_checkpoint(tmp_path, how, caplog):
    # Past the commit point (the old index gone) a sidecar that cannot take its name must not fail the publish:
    # it is dropped with a warning, and the new checkpoint is complete (only its partial reads go unchecked).
    prefix = tmp_path / "ckpt"
    write(prefix, OLD)
    side = tmp_path / "ckpt.data-00000-of-00001.crc32c"
    side.unlink()
    side.mkdir()
    (side / "x").write_text("a non-empty directory")
    new = {"w": np.arange(600_000, dtype=np.float32), "step": np.array(8, np.int64)}  # 2.4 MB: chunk CRCs wanted
    if how == "BundleWriter":
        write(prefix, new)
    elif how == "merge_bundles":
        write(tmp_path / "part", new)
        sc.merge_bundles([tmp_path / "part"], prefix)
    else:
        mesh = sc.create_mesh([("x", 1)], local_device_ids=[0])
        sc.sharded_save(mesh, str(prefix), list(new), [""] * 2, list(new.values()), overwrite=True)
    assert_holds(prefix, new)
    assert "could not publish the chunk checksums" in caplog.text
    assert recover(str(prefix)) == []
    assert_holds(prefix, new)
    assert not [n for n in files(tmp_path) if "staging" in n]
