"""sharded_save / sharded_restore with N clients as threads of one process (the in-process group)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.format import BundleReader, decode_slice_key

RNG = np.random.default_rng(1)
W = RNG.standard_normal((8, 6)).astype(np.float32)  # 2-D sharded over x and y
U = RNG.standard_normal((7, 5)).astype(np.float64)  # uneven: 7 rows over 2
R = np.arange(10, dtype=np.int64)  # replicated numpy
S = np.array([[b"a", b""], [b"\x00\xff", b"long" * 10]], dtype=object)  # strings, sharded by rows
P = RNG.standard_normal((4, 6)).astype(np.float32)  # rows 4..8 of a partitioned variable "part"
B16 = RNG.standard_normal((6, 4)).astype(np.float32).astype(sc.format.dtypes.to_numpy(14))  # bfloat16
GLOBALS = {"w": W, "u": U, "r": R, "s": S, "b16": B16}
MESH = sc.create_mesh([("x", 2), ("y", 2)])


def _save(prefix, clients=4, mesh=MESH, **kwargs):
    def client(coord):
        local = mesh.local_devices(coord.rank, coord.size)
        w = sc.DTensor.from_global(W, sc.Layout(["x", "y"], mesh), local)
        u = sc.DTensor.from_global(U, sc.Layout(["x", sc.UNSHARDED], mesh), local)
        s = sc.DTensor.from_global(S, sc.Layout(["y", sc.UNSHARDED], mesh), local)
        b = sc.DTensor.from_global(B16, sc.Layout([sc.UNSHARDED, "x"], mesh), local)
        p = sc.DTensor.from_global(P, sc.Layout(["x", "y"], mesh), local)
        return sc.sharded_save(mesh, prefix, ["w", "u", "r", "s", "b16", "part"], ["", "", "", "", "", "8 6 4,4:-"],
                               [w, u, R, s, b, p], coordinator=coord, timeout=30, **kwargs)

    return sc.LocalGroup(clients).run(client)


def _assemble(per_client):
    """Global arrays from every client's restored DTensors (each shard checked against its place)."""
    out = {}
    for restored in per_client:
        for name, t in restored.items():
            full = out.setdefault(name, np.empty(t.shape, t.dtype))
            for d, shard in t.shards.items():
                full[tuple(slice(a, b) for a, b in t.bounds(d))] = shard
    return out


def _restore(prefix, mesh, layouts, clients):
    def client(coord):
        local_mesh = mesh
        return sc.name_based_restore(local_mesh, prefix, {n: lay for n, lay in layouts.items()}, coordinator=coord)

    return sc.LocalGroup(clients).run(client)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    results = _save(prefix)
    return prefix, results


def test_every_value_round_trips_through_tensorflow_reader_facade(saved):
    prefix, results = saved
    reader = sc.load_checkpoint(prefix)
    for name, want in GLOBALS.items():
        np.testing.assert_array_equal(reader.get_tensor(name), want)
    np.testing.assert_array_equal(reader.get_slice("part", "8 6 4,4:-"), P)
    assert reader.get_variable_to_shape_map()["part"] == [8, 6]
    assert sorted(f for f in os.listdir(os.path.dirname(prefix))) == sorted(
        [f"ckpt.data-{r:05d}-of-00004{side}" for r in range(4) for side in ("", ".crc32c")] + ["ckpt.index"])
    assert [r.files for r in results] == [[f"{prefix}.data-{i:05d}-of-00004"] for i in range(4)]


def test_each_distinct_shard_is_written_once(saved):
    prefix, _ = saved
    reader = BundleReader(prefix)
    slices: dict[bytes, list] = {}
    plain = []
    for key, entry in reader.raw_entries():
        if key[0] == 0:
            name, tslice = decode_slice_key(key)
            slices.setdefault(name, []).append(tslice)
        elif not entry.slices:
            plain.append(key)
    assert sorted(plain) == [b"r"]  # the replicated array: one whole entry, written by one client
    assert len(slices[b"w"]) == 4 and len(set(slices[b"w"])) == 4  # 2x2 distinct blocks
    assert len(slices[b"u"]) == 2  # 2 row blocks, replicated over y: written once each
    assert len(slices[b"part"]) == 4
    assert reader.entry("w").slices and len(reader.entry("w").slices) == 4


@pytest.mark.parametrize(
    "clients, dims, layout_of",
    [
        (4, [("x", 2), ("y", 2)], lambda rank: ["x", "y"][:rank] if rank == 2 else ["x"] + [sc.UNSHARDED] * (rank - 1)),
        (4, [("a", 4)], lambda rank: ["a"] + [sc.UNSHARDED] * (rank - 1)),
        (2, [("a", 2), ("b", 3)], lambda rank: [sc.UNSHARDED, "b"][:rank] if rank == 2 else ["a"]),
        (3, [("a", 3)], lambda rank: [sc.UNSHARDED] * (rank - 1) + ["a"]),
        (3, [("a", 3)], lambda rank: [sc.UNSHARDED] * rank),
    ],
    ids=["same-mesh", "4x1", "2-clients-2x3", "3-clients", "replicated"],
)
def test_restore_onto_other_meshes_and_client_counts(saved, clients, dims, layout_of):
    prefix, _ = saved
    mesh = sc.create_mesh(dims)
    layouts = {n: sc.Layout(layout_of(a.ndim), mesh) for n, a in GLOBALS.items()}
    got = _assemble(_restore(prefix, mesh, layouts, clients))
    for name, want in GLOBALS.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert got[name].dtype == want.dtype


def test_restore_a_user_slice_into_a_layout(saved):
    prefix, _ = saved
    mesh = sc.create_mesh([("a", 2)])

    def client(coord):
        return sc.sharded_restore(mesh, prefix, ["part", "w"], [sc.Layout(["a", sc.UNSHARDED], mesh)] * 2,
                                  shape_and_slices=["8 6 4,4:-", "8 6 2,4:1,3"], coordinator=coord)[0:2]

    per_client = sc.LocalGroup(2).run(client)
    part = _assemble([{"part": c[0]} for c in per_client])["part"]
    w = _assemble([{"w": c[1]} for c in per_client])["w"]
    np.testing.assert_array_equal(part, P)
    np.testing.assert_array_equal(w, W[2:6, 1:4])


def test_replicated_writes_are_balanced(tmp_path):
    mesh = sc.create_mesh([("x", 4)])
    arrays = [np.full((64 + 8 * i, 128), i, np.float32) for i in range(24)]  # replicated, various sizes

    def client(coord):
        return sc.sharded_save(mesh, str(tmp_path / "bal"), [f"t{i}" for i in range(24)], [""] * 24, arrays,
                               coordinator=coord)

    written = [r.bytes_written for r in sc.LocalGroup(4).run(client)]
    assert sum(written) == sum(a.nbytes for a in arrays)  # each written exactly once
    assert max(written) <= 1.25 * (sum(written) / 4), written
    reader = sc.load_checkpoint(tmp_path / "bal")
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(reader.get_tensor(f"t{i}"), a)


def test_refuses_to_overwrite_unless_asked(saved, tmp_path):
    prefix = str(tmp_path / "again")
    _save(prefix)
    with pytest.raises(sc.CheckpointExistsError, match="already exists"):
        _save(prefix)
    _save(prefix, overwrite=True)
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("w"), W)


def test_overwrite_with_another_client_count_removes_stale_files(tmp_path):
    prefix = str(tmp_path / "c")
    _save(prefix, clients=4)
    _save(prefix, clients=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["c.data-00000-of-00002", "c.data-00000-of-00002.crc32c",
                                            "c.data-00001-of-00002", "c.data-00001-of-00002.crc32c", "c.index"]
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("u"), U)


def _snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_mismatched_calls_fail_everywhere_and_write_nothing(tmp_path):
    _save(str(tmp_path / "keep"))
    before = _snapshot(tmp_path)

    def client(coord):
        shape = (8, 6) if coord.rank != 2 else (8, 7)
        try:
            sc.sharded_save(MESH, str(tmp_path / "bad"), ["t"], [""], [np.zeros(shape, np.float32)],
                            coordinator=coord, timeout=20)
        except sc.CheckpointError as exc:
            return exc
        return None

    errors = sc.LocalGroup(4).run(client)
    assert all(isinstance(e, sc.MismatchedCallError) for e in errors), errors
    assert "shapes" in str(errors[0]) and "client 2" in str(errors[0])
    assert _snapshot(tmp_path) == before


def test_a_client_failing_mid_save_fails_every_client(tmp_path):
    _save(str(tmp_path / "keep"))
    before = _snapshot(tmp_path)
    layout = sc.Layout(["x", "y"], MESH)  # every device holds a distinct block: each client writes

    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        values = np.array([[b"ok"], [b"ok"]], dtype=object)
        if coord.rank == 3:
            values = np.array([[b"ok"], [12345]], dtype=object)  # not bytes: fails while writing
        t = sc.DTensor((4, 2), object, layout, {d: values for d in local})
        try:
            sc.sharded_save(MESH, str(tmp_path / "bad"), ["s"], [""], [t], coordinator=coord, timeout=20)
        except sc.CheckpointError as exc:
            return exc
        return None

    errors = sc.LocalGroup(4).run(client)
    assert all(isinstance(e, sc.CheckpointError) for e in errors), errors
    assert isinstance(errors[0], sc.RemoteClientError) and "client 3" in str(errors[0])
    assert _snapshot(tmp_path) == before  # nothing committed, no staging files left


class _Exploding:
    """A shard that passes the shape checks and fails when its bytes are taken: a bug, not an I/O error."""

    shape = (4, 3)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("boom while copying")


@pytest.mark.parametrize("blocking", [True, False])
def test_any_error_while_writing_fails_the_others_at_once(tmp_path, blocking):
    import time

    layout = sc.Layout(["x", "y"], MESH)

    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        shards = {d: (_Exploding() if coord.rank == 2 else np.ones((4, 3), np.float32)) for d in local}
        t = sc.DTensor.__new__(sc.DTensor)  # skip the constructor's checks, as an adapter's own type might
        t.shape, t.dtype, t.layout, t.shards = (8, 6), np.dtype(np.float32), layout, shards
        start = time.monotonic()
        try:
            out = sc.sharded_save(MESH, str(tmp_path / "x"), ["w"], [""], [t], coordinator=coord, timeout=60,
                                  blocking=blocking)
            if not blocking:
                out.result()
        except Exception as exc:  # noqa: BLE001 - the test looks at what each client got
            return exc, time.monotonic() - start
        return None, time.monotonic() - start

    results = sc.LocalGroup(4).run(client)
    errors = [e for e, _ in results]
    assert isinstance(errors[2], RuntimeError) and "boom" in str(errors[2])
    for rank in (0, 1, 3):
        assert isinstance(errors[rank], sc.RemoteClientError) and "client 2" in str(errors[rank]), errors
        assert "boom" in str(errors[rank])
    assert max(t for _, t in results) < 20  # not the 60 s timeout
    assert not os.path.exists(tmp_path / "x.index") and os.listdir(tmp_path) == []


def test_a_client_that_never_arrives_times_out_naming_it(tmp_path):
    import time

    def client(coord):
        if coord.rank == 1:
            return None  # never calls sharded_save
        start = time.monotonic()
        with pytest.raises(sc.ClientTimeoutError, match=r"\[1\]") as info:
            sc.sharded_save(MESH, str(tmp_path / "t"), ["x"], [""], [np.ones(3)], coordinator=coord, timeout=2)
        assert time.monotonic() - start < 10
        return info.value

    errors = sc.LocalGroup(4).run(client)
    assert all(isinstance(e, sc.ClientTimeoutError) for e in errors if e is not None)
    assert not os.path.exists(tmp_path / "t.index")


def test_timeout_comes_from_the_environment(monkeypatch):
    from shardckpt.coordination import default_timeout

    monkeypatch.setenv("SHARDCKPT_TIMEOUT", "7.5")
    assert default_timeout() == 7.5 and default_timeout(3) == 3
    monkeypatch.delenv("SHARDCKPT_TIMEOUT")
    assert default_timeout() == 300


def test_restore_checks_shapes_and_dtypes(saved):
    prefix, _ = saved
    mesh = sc.create_mesh([("a", 1)])
    with pytest.raises(sc.ShapeMismatchError, match="w"):
        sc.name_based_restore(mesh, prefix, {"w": ((8, 5), np.float32, sc.Layout.replicated(mesh, 2))})
    with pytest.raises(sc.DTypeMismatchError, match="w"):
        sc.name_based_restore(mesh, prefix, {"w": ((8, 6), np.float64, sc.Layout.replicated(mesh, 2))})
    with pytest.raises(sc.ShapeMismatchError, match="rank"):
        sc.sharded_restore(mesh, prefix, ["w"], [sc.Layout.replicated(mesh, 1)])
    with pytest.raises(sc.TensorNotFoundError, match="nope"):
        sc.sharded_restore(mesh, prefix, ["nope"], [sc.Layout.replicated(mesh, 1)])


def test_single_client_without_coordinator(tmp_path):
    mesh = sc.create_mesh([("x", 2)])
    t = sc.DTensor.from_global(W, sc.Layout(["x", sc.UNSHARDED], mesh))
    sc.name_based_save(mesh, tmp_path / "one", {"w": t, "r": R})
    targets = {"w": sc.Layout([sc.UNSHARDED, "x"], mesh), "r": sc.Layout.replicated(mesh, 1)}
    got = sc.name_based_restore(mesh, tmp_path / "one", targets)
    np.testing.assert_array_equal(got["w"].to_numpy(), W)
    np.testing.assert_array_equal(got["r"].to_numpy(), R)


def test_restore_into_arrays_the_caller_holds(saved):
    prefix, _ = saved
    mesh = sc.create_mesh([("a", 2)])
    layout = sc.Layout([sc.UNSHARDED, "a"], mesh)

    def client(coord):
        local = mesh.local_devices(coord.rank, coord.size)
        mine = {d: np.zeros([8, 3], np.float32) for d in local}
        dest = sc.DTensor((8, 6), np.float32, layout, mine)
        (got,) = sc.sharded_restore(mesh, prefix, ["w"], [layout], coordinator=coord, into=[dest])
        assert all(got.shards[d] is mine[d] for d in local)  # filled in place, no new arrays
        bad = sc.DTensor((8, 6), np.float64, layout, {d: np.full([8, 3], 7.0) for d in local})
        with pytest.raises(sc.DTypeMismatchError):
            sc.sharded_restore(mesh, prefix, ["u", "w"], [sc.Layout(["a", sc.UNSHARDED], mesh), layout],
                               coordinator=coord, into=[None, bad])
        assert all((s == 7.0).all() for s in bad.shards.values())  # checked before anything was written
        return got

    restored = sc.LocalGroup(2).run(client)
    np.testing.assert_array_equal(_assemble([{"w": t} for t in restored])["w"], W)


def test_restore_into_two_local_replicas(saved):
    prefix, _ = saved
    mesh = sc.create_mesh([("a", 2)], local_device_ids=[0, 1])
    layout = sc.Layout.replicated(mesh, 1)
    mine = {0: np.zeros(10, np.int64), 1: np.zeros(10, np.int64)}
    (got,) = sc.sharded_restore(mesh, prefix, ["r"], [layout], into=[sc.DTensor((10,), np.int64, layout, mine)])
    assert got.shards[0] is mine[0] and got.shards[1] is mine[1]
    np.testing.assert_array_equal(mine[0], R)
    np.testing.assert_array_equal(mine[1], R)
