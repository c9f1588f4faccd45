"""shardckpt against its peers on one multi-client workload, every system in the same run.

Usage::

    python benchmarks/bench_peers.py [--reps 5] [--quick] [--only sc,dcp,...] [--profile] [--output BENCHMARKS.md]

The workload: 1 GiB of float32 in 16 tensors of 4096x4096, each sharded 2x2 over 4 clients (one 2048x2048
shard of every tensor per client, 256 MiB per client), plus 64 small replicated float32[4096] tensors.

Systems (each repetition runs every one once, in an order rotated by one per repetition):

- ``sc``, ``sc-fast``: shardckpt ``sharded_save`` / ``sharded_restore``, 4 processes coordinated by shardckpt's own
  `KVServer` (what ``shardckpt launch`` runs), ``durable=True`` and ``durable=False``; ``sc-mmap`` saves like
  ``sc-fast`` and restores with ``mmap=True``.  Each then times a first in-place write over the restored shards.
- ``tf``: TF DTensor ``sharded_save`` / ``name_based_restore`` on a 2x2 mesh of 4 virtual CPU devices, one process.
- ``dcp``: PyTorch DCP ``save`` / ``load``, 4 gloo processes (loopback-only TCPStore), DTensors
  (Shard(0), Shard(1)) on a 2x2 DeviceMesh plus replicated small DTensors; load is in place into freshly
  allocated DTensors (DCP's model: the caller preallocates).  ``dcp-fast``: the same with
  ``FileSystemWriter(sync_files=False)``.
- ``orbax``: Orbax ``StandardCheckpointer`` save (+ ``wait_until_finished``) / restore of jax arrays sharded 2x2 over
  4 CPU devices (``--xla_force_host_platform_device_count=4``), one process.
- ``safetensors``: ``save_file`` / ``load_file`` (numpy) of the same 1 GiB as one unsharded file, one process.
- ``raw``: a ceiling: 4 processes each ``os.write`` their 256 MiB of shard bytes to a file (then ``fsync``, timed
  apart) and ``os.preadv`` them back into preallocated buffers.
- ``memcpy``: ``np.copyto`` of the 1 GiB into a preallocated, already touched buffer.

and shardckpt-only measurements:

- ``sc-extras`` (4 processes): a blocking save with peak RSS, restores onto the same 2x2 layout and onto a 4x1 mesh
  (resharding), then two asynchronous saves (``blocking=False``; the second reuses the staging memory of the
  first, as periodic checkpoints do) against a plain ``np.copyto`` of the client's shards.
- ``sc-one`` (1 process): restore of that checkpoint onto one client holding all four devices of the 2x2 mesh
  (same layout) and as whole tensors (resharding).
- ``sc-100k`` (1 process): 100,000 float32[16] tensors saved by 8 in-process clients (``LocalGroup(8)``, replicated,
  so the plan spreads them), restored split over the 8 clients and by one client; safetensors on the same dict
  as a reference.

``--layouts`` runs, instead, the layouts one client has (the issue "every layout at the ceiling"), each system in
its own process, in an order rotated per repetition, and writes the section between
``<!-- bench_peers:layouts:start -->`` and ``<!-- bench_peers:layouts:end -->``:

- ``one-sc`` (1 process): the same 1 GiB as 16 global float32[4096, 4096] arrays, saved (``durable=False``) and
  restored by one client owning 4 devices (2x2 mesh: 2-D-sharded numpy views from ``DTensor.from_global``; 1x4:
  column blocks) and 8 devices (2x4 and 1x8), plus resharding restores of the 2x2 checkpoint (to 4x1 rows, to
  whole tensors); beside the raw ceiling in the same process: ``os.write`` of the 1 GiB contiguous to one file.
  The phases run in an order rotated per repetition; ``os.sync()`` before each save.  ``--one-layouts 2d4``
  (with ``--no-write``) runs only those layouts beside the raw write, to iterate on one row.
- ``one-jax`` (1 process, 8 CPU devices): ``shardckpt.jax.save`` / ``restore`` of the arrays sharded 2x4 beside
  Orbax ``StandardCheckpointer`` in the same process, alternated (A B B A).
- ``tf``: TF DTensor on a 2x2 mesh of 4 logical CPU devices, one process (the row above).

Rules: each system runs in fresh worker processes that import their framework and build their data before the
clock starts; timing happens inside the workers, between barriers, around the save or restore call only; the
slowest client is reported.  Before each timed save the previous output is deleted (untimed) and ``os.sync()``
flushes dirty pages.  Restores read what was just written, from the page cache.  Results replace the section
between ``<!-- bench_peers:start -->`` and ``<!-- bench_peers:end -->`` of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import glob
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sections import write_section

MiB = 1 << 20
GiB = 1 << 30
NUM_LARGE = 16
NUM_SMALL = 64
SMALL_LEN = 4096
WORLD = 4
START = "<!-- bench_peers:start -->"
END = "<!-- bench_peers:end -->"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MAIN_SYSTEMS = ["sc", "sc-fast", "sc-mmap", "tf", "dcp", "dcp-fast", "orbax", "safetensors", "raw", "memcpy"]
EXTRA_SYSTEMS = ["sc-extras", "sc-one", "sc-100k"]
LAYOUT_SYSTEMS = ["tf", "one-sc", "one-jax"]
ALL_SYSTEMS = MAIN_SYSTEMS + EXTRA_SYSTEMS + ["one-sc", "one-jax"]
LAYOUTS_START = "<!-- bench_peers:layouts:start -->"
LAYOUTS_END = "<!-- bench_peers:layouts:end -->"
# one-sc: (phase suffix, mesh dims, layout of the large tensors) of the one-client saves
ONE_LAYOUTS = [("2d4", [("x", 2), ("y", 2)], ["x", "y"]), ("col4", [("c", 4)], ["-", "c"]),
               ("2d8", [("x", 2), ("y", 4)], ["x", "y"]), ("col8", [("c", 8)], ["-", "c"])]
NPROCS = {"sc": WORLD, "sc-fast": WORLD, "sc-mmap": WORLD, "dcp": WORLD, "dcp-fast": WORLD, "raw": WORLD,
          "sc-extras": WORLD}
LABELS = {
    "sc": "shardckpt, durable=True (fsync)",
    "sc-fast": "shardckpt, durable=False",
    "sc-mmap": "shardckpt, durable=False, restore with mmap=True",
    "tf": "TF DTensor sharded_save / name_based_restore",
    "dcp": "PyTorch DCP save / load",
    "dcp-fast": "PyTorch DCP, sync_files=False",
    "orbax": "Orbax StandardCheckpointer",
    "safetensors": "safetensors save_file / load_file (1 file)",
    "raw": "raw os.write / os.preadv, 4 processes",
    "raw+fsync": "raw os.write + fsync / os.preadv, 4 processes",
    "memcpy": "memcpy ceiling (np.copyto of 1 GiB)",
}


# --- the workload ---------------------------------------------------------------------------------


def large_name(k: int) -> str:
    return f"layer_{k:02d}/kernel"


def small_name(j: int) -> str:
    return f"layer_{j // 4:02d}/norm_{j % 4}"


def quad(k: int, q: int, side: int) -> np.ndarray:
    """Shard ``q`` (row-major on the 2x2 mesh: device q, row block q // 2, column block q % 2) of tensor k."""
    return np.random.default_rng(1000 + 4 * k + q).random((side // 2, side // 2), dtype=np.float32)


def quad_box(q: int, side: int) -> tuple[slice, slice]:
    h = side // 2
    r, c = divmod(q, 2)
    return slice(r * h, (r + 1) * h), slice(c * h, (c + 1) * h)


def full(k: int, side: int) -> np.ndarray:
    out = np.empty((side, side), np.float32)
    for q in range(4):
        out[quad_box(q, side)] = quad(k, q, side)
    return out


def small(j: int) -> np.ndarray:
    return np.random.default_rng(5000 + j).random(SMALL_LEN, dtype=np.float32)


def total_bytes(side: int) -> int:
    return NUM_LARGE * side * side * 4 + NUM_SMALL * SMALL_LEN * 4


# --- worker side ----------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs`` 5) and return that RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status()["VmRSS"]


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world = args.rank, args.world
        self.side = args.side
        self.dir = args.dir
        self.rep = args.rep
        self.result: dict[str, Any] = {"rank": self.rank}
        self.barrier: Callable[[str], None] = lambda name: None
        self.profile = bool(args.profile_dir) and self.rank == 0

    def timed(self, phase: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (after a barrier), record its seconds under ``phase``, barrier again."""
        perf = None
        if os.environ.get("BENCH_PERF_PHASE") == phase:  # sample this phase only, every thread, kernel included
            out = os.path.join(os.environ["BENCH_PERF_DIR"], f"{self.args.worker}-{phase}-{self.rank}.data")
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-g", "-p", str(os.getpid()), "-o", out],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        self.barrier(f"{phase}:start")
        prof = None
        if self.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t = time.perf_counter()
        out = fn()
        self.result[phase] = time.perf_counter() - t
        if perf is not None:
            perf.send_signal(2)
            perf.wait()
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.path.join(self.args.profile_dir, f"{self.args.worker}-{phase}.prof"))
        self.barrier(f"{phase}:end")
        return out

    def sync(self) -> None:
        """Flush dirty pages (client 0) so no save pays for earlier writeback; all clients wait for it."""
        self.barrier("sync:before")
        if self.rank == 0:
            os.sync()
        self.barrier("sync:after")

    def save_with_rss(self, phase: str, fn: Callable[[], Any]) -> Any:
        self.barrier(f"{phase}:rss")
        base = _reset_peak()
        out = self.timed(phase, fn)
        self.result[f"{phase}_rss_added"] = _status()["VmHWM"] - base
        return out


def _sc_coordinator(w: Worker):  # noqa: ANN202
    from shardckpt.coordination import LauncherCoordinator

    coord = LauncherCoordinator.from_env()
    w.barrier = lambda name: coord.barrier(name, 600)
    return coord


def _sc_model(w: Worker):  # noqa: ANN202
    import shardckpt as sc

    mesh = sc.create_mesh([("x", 2), ("y", 2)])
    lay = sc.Layout(["x", "y"], mesh)
    rep = sc.Layout.replicated(mesh, 1)
    names = [large_name(k) for k in range(NUM_LARGE)] + [small_name(j) for j in range(NUM_SMALL)]
    local = mesh.local_devices(w.rank, w.world)
    tensors: list[object] = [sc.DTensor((w.side, w.side), np.float32, lay, {d: quad(k, d, w.side) for d in local})
                             for k in range(NUM_LARGE)]
    tensors += [small(j) for j in range(NUM_SMALL)]
    layouts = [lay] * NUM_LARGE + [rep] * NUM_SMALL
    return sc, mesh, names, tensors, layouts, local


def _check_sc(restored: list, local: tuple[int, ...], side: int, whole: bool = False) -> None:
    for k in range(NUM_LARGE):
        t = restored[k]
        if whole:
            assert np.array_equal(t.shards[local[0]], full(k, side)), f"tensor {k} differs"
            continue
        for d, shard in t.shards.items():
            box = t.bounds(d)
            expect = full(k, side)[tuple(slice(a, b) for a, b in box)] if t.layout.mesh.shape != (2, 2) else quad(
                k, d, side)
            assert np.array_equal(shard, expect), f"tensor {k} device {d} differs"
    for j in range(NUM_SMALL):
        for shard in restored[NUM_LARGE + j].shards.values():
            assert np.array_equal(shard, small(j)), f"small tensor {j} differs"


def work_sc(w: Worker, durable: bool, mmap: bool = False) -> None:
    coord = _sc_coordinator(w)
    sc, mesh, names, tensors, layouts, local = _sc_model(w)
    prefix = os.path.join(w.dir, "ckpt")
    gc.collect()
    w.sync()
    res = w.save_with_rss("save", lambda: sc.sharded_save(mesh, prefix, names, [""] * len(names), tensors,
                                                          coordinator=coord, durable=durable))
    w.result["phases"] = res.timings
    w.result["local_bytes"] = sum(t.shards[d].nbytes for t in tensors[:NUM_LARGE] for d in local)
    out = w.timed("restore", lambda: sc.sharded_restore(mesh, prefix, names, layouts, coordinator=coord,
                                                         mmap=mmap))
    _check_sc(out, local, w.side)
    # A first write over every restored large shard: what a mapping defers (a page copy on first write) is paid
    # here, so restore + first write compares the copy and the mmap restores fairly.
    shards = list({id(s): s for t in out[:NUM_LARGE] for s in t.shards.values()}.values())
    w.timed("first_write", lambda: [np.add(s, 1.0, out=s) for s in shards])


def _abba(a: tuple, b: tuple, rep: int) -> list[tuple]:
    """A B B A (or B A A B on odd repetitions), phases suffixed #1 / #2: a first-restore penalty, or a drift
    within the run, then weighs on both layouts alike."""
    first, second = (a, b) if rep % 2 == 0 else (b, a)
    seq = [first, second, second, first]
    seen: dict[str, int] = {}
    out = []
    for item in seq:
        seen[item[0]] = seen.get(item[0], 0) + 1
        out.append((f"{item[0]}#{seen[item[0]]}",) + tuple(item[1:]))
    return out


def _warm_up(w: Worker, fn: Callable[[], object]) -> None:
    """An untimed restore first: the first restore after a save pays extra (fresh memory) that would otherwise
    fall on whichever layout comes first."""
    w.barrier("warm:start")
    fn()
    gc.collect()
    w.barrier("warm:end")


def _mean_abba(w: Worker, phases: list[str]) -> None:
    for phase in phases:
        w.result[phase] = (w.result.pop(f"{phase}#1") + w.result.pop(f"{phase}#2")) / 2


def work_sc_extras(w: Worker) -> None:
    coord = _sc_coordinator(w)
    sc, mesh, names, tensors, layouts, local = _sc_model(w)
    prefix = os.path.join(w.dir, "ckpt")
    gc.collect()
    w.sync()
    w.save_with_rss("save", lambda: sc.sharded_save(mesh, prefix, names, [""] * len(names), tensors,
                                                    coordinator=coord))
    w.result["local_bytes"] = sum(t.shards[d].nbytes for t in tensors[:NUM_LARGE] for d in local)
    # Same-layout and resharded (4x1 mesh: row blocks, each from two stored column blocks) restores, in an
    # order that alternates with the repetition.
    mesh41 = sc.create_mesh([("x", 4), ("y", 1)])
    layouts41 = [sc.Layout(["x", "y"], mesh41)] * NUM_LARGE + [sc.Layout.replicated(mesh41, 1)] * NUM_SMALL
    local41 = mesh41.local_devices(w.rank, w.world)
    same, other = ("restore_same", mesh, layouts, local), ("restore_4x1", mesh41, layouts41, local41)
    _warm_up(w, lambda: sc.sharded_restore(mesh, prefix, names, layouts, coordinator=coord))
    for phase, m, lays, loc in _abba(same, other, w.rep):
        out = w.timed(phase, lambda m=m, lays=lays: sc.sharded_restore(m, prefix, names, lays, coordinator=coord))
        _check_sc(out, loc, w.side)
        del out
        gc.collect()
    _mean_abba(w, ["restore_same", "restore_4x1"])
    # Asynchronous save: the blocking part against a plain copy of this client's shards.
    w.barrier("async:clean")
    if w.rank == 0:
        for path in glob.glob(prefix + ".*"):
            os.unlink(path)
    w.sync()
    srcs = [t.shards[d] for t in tensors[:NUM_LARGE] for d in local]

    def copy_fresh() -> list[np.ndarray]:
        bufs = [np.empty_like(s) for s in srcs]
        for b, s in zip(bufs, srcs):
            np.copyto(b, s)
        return bufs

    def copy_warm(bufs: list[np.ndarray]) -> None:
        for b, s in zip(bufs, srcs):
            np.copyto(b, s)

    fresh = w.timed("copy_fresh", copy_fresh)
    w.timed("copy_warm", functools.partial(copy_warm, fresh))
    del fresh
    gc.collect()
    w.sync()
    # The first asynchronous save of a process allocates its staging memory; later ones (periodic checkpoints)
    # reuse it.  Both are timed; the target is about the steady state.
    w.timed("async_first", lambda: sc.sharded_save(mesh, prefix + "-first", names, [""] * len(names), tensors,
                                                   coordinator=coord, blocking=False)).result()
    w.sync()
    t0 = time.perf_counter()
    fut = w.timed("async_blocking", lambda: sc.sharded_save(mesh, prefix, names, [""] * len(names), tensors,
                                                            coordinator=coord, blocking=False))
    fut.result()
    w.result["async_total"] = time.perf_counter() - t0
    w.barrier("async:done")


def work_sc_one(w: Worker) -> None:
    import shardckpt as sc

    prefix = os.path.join(w.dir, "..", "sc-extras", "ckpt")
    names = [large_name(k) for k in range(NUM_LARGE)] + [small_name(j) for j in range(NUM_SMALL)]
    mesh22 = sc.create_mesh([("x", 2), ("y", 2)], local_device_ids=[0, 1, 2, 3])
    lay22 = [sc.Layout(["x", "y"], mesh22)] * NUM_LARGE + [sc.Layout.replicated(mesh22, 1)] * NUM_SMALL
    mesh1 = sc.create_mesh([("x", 1)], local_device_ids=[0])
    lay1 = [sc.Layout.replicated(mesh1, 2)] * NUM_LARGE + [sc.Layout.replicated(mesh1, 1)] * NUM_SMALL
    same, other = ("restore_same", mesh22, lay22, False), ("restore_whole", mesh1, lay1, True)
    _warm_up(w, lambda: sc.sharded_restore(mesh22, prefix, names, lay22))
    for phase, m, lays, whole in _abba(same, other, w.rep):
        out = w.timed(phase, lambda m=m, lays=lays: sc.sharded_restore(m, prefix, names, lays))
        _check_sc(out, m.local_device_ids, w.side, whole=whole)
        del out
        gc.collect()
    _mean_abba(w, ["restore_same", "restore_whole"])


def work_sc_100k(w: Worker) -> None:
    from safetensors.numpy import load_file, save_file

    import shardckpt as sc

    n, clients = w.args.small_count, 8
    names = [f"block_{i // 100:04d}/param_{i % 100:02d}" for i in range(n)]
    base = np.random.default_rng(7).random((n, 16), dtype=np.float32)
    arrays = [base[i].copy() for i in range(n)]
    prefix = os.path.join(w.dir, "ckpt")
    group = sc.LocalGroup(clients)
    mesh = sc.create_mesh([("c", clients)])
    rep = sc.Layout.replicated(mesh, 1)
    times: dict[str, list[float]] = {"save": [], "restore_split": []}

    def save(coord) -> None:  # noqa: ANN001
        coord.barrier("go", 600)
        t = time.perf_counter()
        sc.sharded_save(mesh, prefix, names, [""] * n, arrays, coordinator=coord)
        times["save"].append(time.perf_counter() - t)

    def restore(coord) -> None:  # noqa: ANN001
        mine = names[coord.rank :: clients]
        coord.barrier("go", 600)
        t = time.perf_counter()
        out = sc.sharded_restore(mesh, prefix, mine, [rep] * len(mine), coordinator=coord)
        times["restore_split"].append(time.perf_counter() - t)
        for name, dt in zip(mine[:50], out[:50]):
            assert np.array_equal(dt.shards[coord.rank], base[names.index(name)])

    gc.collect()
    os.sync()
    group.run(save)
    w.result["save"] = max(times["save"])
    group.run(restore)
    w.result["restore_split"] = max(times["restore_split"])
    mesh1 = sc.create_mesh([("x", 1)])
    t = time.perf_counter()
    out = sc.sharded_restore(mesh1, prefix, names, [sc.Layout.replicated(mesh1, 1)] * n,
                             coordinator=sc.coordination.SingleClient())
    w.result["restore_one"] = time.perf_counter() - t
    assert all(np.array_equal(out[i].shards[0], base[i]) for i in range(0, n, 997))
    del out
    # Reference: safetensors, one process, the same dict.
    path = os.path.join(w.dir, "small.safetensors")
    named = dict(zip(names, arrays))
    gc.collect()
    os.sync()
    t = time.perf_counter()
    save_file(named, path)
    w.result["st_save"] = time.perf_counter() - t
    t = time.perf_counter()
    back = load_file(path)
    w.result["st_restore"] = time.perf_counter() - t
    assert np.array_equal(back[names[-1]], base[-1])
    w.result["bytes"] = int(base.nbytes)


def work_tf(w: Worker) -> None:
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    dtensor.initialize_accelerator_system("CPU", num_logical_cpu_devices=4)
    mesh = dtensor.create_mesh([("x", 2), ("y", 2)], device_type="CPU")
    lay = dtensor.Layout(["x", "y"], mesh)
    rep = dtensor.Layout.replicated(mesh, 1)
    names = [large_name(k) for k in range(NUM_LARGE)] + [small_name(j) for j in range(NUM_SMALL)]
    tensors = []
    for k in range(NUM_LARGE):
        tensors.append(dtensor.DVariable(dtensor.pack([tf.constant(quad(k, q, w.side)) for q in range(4)], lay)))
    for j in range(NUM_SMALL):
        tensors.append(dtensor.DVariable(dtensor.copy_to_mesh(tf.constant(small(j)), rep)))
    prefix = os.path.join(w.dir, "ckpt")
    targets = {n: t for n, t in zip(names, tensors)}
    if os.environ.get("BENCH_WARM"):  # --layouts: steady state, as the one-client rows (an untimed round first)
        warm = os.path.join(w.dir, "warm", "ckpt")
        dtensor.sharded_save(mesh, warm, names, [""] * len(names), tensors)
        dtensor.name_based_restore(mesh, warm, targets)
        shutil.rmtree(os.path.dirname(warm))
    gc.collect()
    os.sync()
    w.save_with_rss("save", lambda: dtensor.sharded_save(mesh, prefix, names, [""] * len(names), tensors))
    out = w.timed("restore", lambda: dtensor.name_based_restore(mesh, prefix, targets))
    for k in range(NUM_LARGE):
        parts = dtensor.unpack(out[large_name(k)])
        for q in range(4):
            assert np.array_equal(parts[q].numpy(), quad(k, q, w.side)), f"tf tensor {k} part {q}"
    assert np.array_equal(dtensor.unpack(out[small_name(3)])[0].numpy(), small(3))


def work_dcp(w: Worker, sync_files: bool = True) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    port = int(os.environ["BENCH_PORT"])
    if w.rank == 0:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        store = dist.TCPStore("127.0.0.1", port, w.world, is_master=True, timeout=timedelta(seconds=120),
                              master_listen_fd=sock.fileno())
    else:
        store = dist.TCPStore("127.0.0.1", port, w.world, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=w.rank, world_size=w.world,
                            timeout=timedelta(seconds=600))
    w.barrier = lambda name: dist.barrier()
    mesh = init_device_mesh("cpu", (2, 2))
    side, h = w.side, w.side // 2
    shard_pl, rep_pl = [Shard(0), Shard(1)], [Replicate(), Replicate()]

    def state(make_large: Callable[[int], torch.Tensor], make_small: Callable[[int], torch.Tensor]) -> dict:
        sd = {large_name(k): DTensor.from_local(make_large(k), mesh, shard_pl, run_check=False,
                                                shape=torch.Size((side, side)), stride=(side, 1))
              for k in range(NUM_LARGE)}
        sd.update({small_name(j): DTensor.from_local(make_small(j), mesh, rep_pl, run_check=False)
                   for j in range(NUM_SMALL)})
        return sd

    sd = state(lambda k: torch.from_numpy(quad(k, w.rank, side)), lambda j: torch.from_numpy(small(j)))
    path = os.path.join(w.dir, "ckpt")
    gc.collect()
    w.sync()
    writer = dcp.FileSystemWriter(path, sync_files=sync_files)
    w.save_with_rss("save", lambda: dcp.save(sd, storage_writer=writer))
    w.result["local_bytes"] = NUM_LARGE * h * h * 4
    target = state(lambda k: torch.empty((h, h), dtype=torch.float32),
                   lambda j: torch.empty(SMALL_LEN, dtype=torch.float32))
    w.timed("restore", lambda: dcp.load(target, checkpoint_id=path))
    for k in range(NUM_LARGE):
        assert np.array_equal(target[large_name(k)].to_local().numpy(), quad(k, w.rank, side)), f"dcp tensor {k}"
    assert np.array_equal(target[small_name(5)].to_local().numpy(), small(5))
    dist.barrier()
    dist.destroy_process_group()


def work_orbax(w: Worker) -> None:
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    assert len(devices) == 4, devices
    mesh = Mesh(np.array(devices).reshape(2, 2), ("x", "y"))
    sh, rep = NamedSharding(mesh, P("x", "y")), NamedSharding(mesh, P())
    side = w.side
    tree: dict[str, Any] = {}
    for k in range(NUM_LARGE):
        parts = {q: quad(k, q, side) for q in range(4)}

        def cb(index: tuple[slice, ...], parts: dict = parts) -> np.ndarray:
            h = side // 2
            return parts[2 * ((index[0].start or 0) // h) + (index[1].start or 0) // h]

        tree[large_name(k)] = jax.make_array_from_callback((side, side), sh, cb)
    for j in range(NUM_SMALL):
        tree[small_name(j)] = jax.device_put(small(j), rep)
    jax.block_until_ready(tree)
    path = os.path.join(w.dir, "ckpt")
    ckptr = ocp.StandardCheckpointer()
    gc.collect()
    os.sync()

    def save() -> None:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()

    w.save_with_rss("save", save)
    abstract = {name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for name, a in tree.items()}
    out = w.timed("restore", lambda: jax.block_until_ready(ckptr.restore(path, abstract)))
    for k in range(NUM_LARGE):
        for s in out[large_name(k)].addressable_shards:
            q = 2 * ((s.index[0].start or 0) // (side // 2)) + (s.index[1].start or 0) // (side // 2)
            assert np.array_equal(np.asarray(s.data), quad(k, q, side)), f"orbax tensor {k}"
    assert np.array_equal(np.asarray(out[small_name(9)]), small(9))
    ckptr.close()


def work_safetensors(w: Worker) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = {large_name(k): full(k, w.side) for k in range(NUM_LARGE)}
    tensors.update({small_name(j): small(j) for j in range(NUM_SMALL)})
    path = os.path.join(w.dir, "model.safetensors")
    gc.collect()
    os.sync()
    w.save_with_rss("save", lambda: save_file(tensors, path))
    out = w.timed("restore", lambda: load_file(path))
    for k in range(NUM_LARGE):
        assert np.array_equal(out[large_name(k)], tensors[large_name(k)])


def work_raw(w: Worker) -> None:
    _sc_coordinator(w)
    srcs = [quad(k, w.rank, w.side) for k in range(NUM_LARGE)]
    path = os.path.join(w.dir, f"raw-{w.rank}")
    gc.collect()
    w.sync()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def write() -> None:
        for s in srcs:
            view = memoryview(s.reshape(-1).view(np.uint8))
            while view:
                view = view[os.write(fd, view) :]

    w.timed("save", write)
    w.timed("fsync", lambda: os.fsync(fd))
    os.close(fd)
    bufs = [np.empty_like(s) for s in srcs]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read() -> None:
        pos = 0
        for b in bufs:
            view = memoryview(b.reshape(-1).view(np.uint8))
            while view:
                n = os.preadv(fd, [view], pos)
                view, pos = view[n:], pos + n

    w.timed("restore", read)
    os.close(fd)
    assert all(np.array_equal(b, s) for b, s in zip(bufs, srcs))


def work_memcpy(w: Worker) -> None:
    srcs = [full(k, w.side) for k in range(NUM_LARGE)]
    dsts = [np.zeros_like(s) for s in srcs]  # touched: pure copy bandwidth
    for d in dsts:
        d.fill(1.0)
    w.timed("save", lambda: [np.copyto(d, s) for d, s in zip(dsts, srcs)])
    assert np.array_equal(dsts[-1], srcs[-1])


def _one_model(w: Worker):  # noqa: ANN202
    arrays = [full(k, w.side) for k in range(NUM_LARGE)]
    names = [large_name(k) for k in range(NUM_LARGE)] + [small_name(j) for j in range(NUM_SMALL)]
    return arrays, names, [small(j) for j in range(NUM_SMALL)]


def work_one_sc(w: Worker) -> None:
    """One client, several devices: views of global arrays saved and restored, the raw write beside them."""
    import shardckpt as sc

    arrays, names, smalls = _one_model(w)
    flat = [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays]
    plans = {}
    for tag, dims, spec in ONE_LAYOUTS:
        mesh = sc.create_mesh(dims)
        lay = sc.Layout([sc.UNSHARDED if d == "-" else d for d in spec], mesh)
        rep = sc.Layout.replicated(mesh, 1)
        tensors: list[object] = [sc.DTensor.from_global(a, lay) for a in arrays] + list(smalls)
        plans[tag] = (mesh, [lay] * NUM_LARGE + [rep] * NUM_SMALL, tensors)
    m41 = sc.create_mesh([("r", 4)])
    rows = [sc.Layout(["r", sc.UNSHARDED], m41)] * NUM_LARGE + [sc.Layout.replicated(m41, 1)] * NUM_SMALL
    m1 = sc.create_mesh([("r", 1)])
    whole = [sc.Layout.replicated(m1, 2)] * NUM_LARGE + [sc.Layout.replicated(m1, 1)] * NUM_SMALL

    def fresh(tag: str) -> str:
        prefix = os.path.join(w.dir, tag, "ckpt")
        shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
        os.makedirs(os.path.dirname(prefix))
        gc.collect()
        os.sync()
        return prefix

    def raw() -> None:
        path = os.path.join(os.path.dirname(fresh("raw")), "raw")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        t = time.perf_counter()
        for view in flat:
            while view:
                view = view[os.write(fd, view) :]
        w.result["raw_save"] = time.perf_counter() - t
        os.close(fd)

    def one(tag: str) -> None:
        mesh, layouts, tensors = plans[tag]
        prefix = fresh(tag)
        t = time.perf_counter()
        sc.sharded_save(mesh, prefix, names, [""] * len(names), tensors, durable=False)
        w.result[f"save_{tag}"] = time.perf_counter() - t
        t = time.perf_counter()
        out = sc.sharded_restore(mesh, prefix, names, layouts)  # fresh output memory, as TF's restore
        w.result[f"restore_{tag}"] = time.perf_counter() - t
        for k in (0, NUM_LARGE - 1):
            for d, shard in out[k].shards.items():
                assert np.array_equal(shard, arrays[k][tuple(slice(a, b) for a, b in out[k].bounds(d))]), tag
        del out
        if tag == "2d4":  # resharding restores of the 2x2 checkpoint; the same-layout one just ran
            for phase, m, lays in (("restore_2d4_to_4x1", m41, rows), ("restore_2d4_to_whole", m1, whole)):
                gc.collect()
                t = time.perf_counter()
                out = sc.sharded_restore(m, prefix, names, lays)
                w.result[phase] = time.perf_counter() - t
                assert np.array_equal(out[3].to_numpy(), arrays[3]), phase
                del out

    chosen = os.environ.get("BENCH_ONE_LAYOUTS", "").split(",") if os.environ.get("BENCH_ONE_LAYOUTS") else None
    steps: list[Callable[[], None]] = [raw] + [functools.partial(one, tag) for tag, _, _ in ONE_LAYOUTS
                                               if chosen is None or tag in chosen]
    k = w.rep % len(steps)
    for step in steps[k:] + steps[:k]:
        # Steady state: each step runs once untimed first, so no phase pays for memory (page cache, output
        # arrays) the VM has not handed out lately and the next one reuses -- whichever ran before it.
        step()
        step()
    gc.collect()


def work_one_jax(w: Worker) -> None:
    """JAX with 8 CPU devices in one process: shardckpt.jax beside Orbax StandardCheckpointer, A B B A."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardckpt.jax as scj

    devices = jax.devices()
    assert len(devices) == 8, devices
    mesh = Mesh(np.array(devices).reshape(2, 4), ("x", "y"))
    sh, rep = NamedSharding(mesh, P("x", "y")), NamedSharding(mesh, P())
    arrays, names, smalls = _one_model(w)
    tree: dict[str, Any] = {n: jax.device_put(a, sh) for n, a in zip(names, arrays)}
    tree.update({n: jax.device_put(v, rep) for n, v in zip(names[NUM_LARGE:], smalls)})
    jax.block_until_ready(tree)
    del arrays
    abstract = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for n, a in tree.items()}
    ckptr = ocp.StandardCheckpointer()

    def check(out: dict) -> None:
        for n in (names[0], names[NUM_LARGE - 1], names[-1]):
            assert np.array_equal(np.asarray(out[n]), np.asarray(tree[n])), n

    # Each system saves over its own previous output, deleted (untimed) right before, as one-sc does, so a
    # save writes into the page-cache memory its last one freed (the steady state the report describes).
    # Keeping every output instead made each save grow the page cache into memory the VM had taken back
    # (several µs a page on first touch, varying with what ran just before): a cost of this machine per byte
    # written, paid by both systems, that measured the VM more than either of them.
    def run_sc(i: int) -> None:
        prefix = os.path.join(w.dir, "sc", "ckpt")
        shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
        gc.collect()
        os.sync()
        t = time.perf_counter()
        scj.save(tree, prefix)  # durable, like TensorStore's fsyncs
        w.result[f"sc_save#{i}"] = time.perf_counter() - t  # (#0: the untimed warm-up round)
        t = time.perf_counter()
        out = jax.block_until_ready(scj.restore(prefix, abstract))
        w.result[f"sc_restore#{i}"] = time.perf_counter() - t
        check(out)

    def run_orbax(i: int) -> None:
        path = os.path.join(w.dir, "orbax")
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
        os.sync()
        t = time.perf_counter()
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        w.result[f"orbax_save#{i}"] = time.perf_counter() - t
        t = time.perf_counter()
        out = jax.block_until_ready(ckptr.restore(path, abstract))
        w.result[f"orbax_restore#{i}"] = time.perf_counter() - t
        check(out)

    run_sc(0)  # untimed rounds first: steady state for both
    run_orbax(0)
    for phase, fn in _abba(("sc", run_sc), ("orbax", run_orbax), w.rep):
        fn(int(phase[-1]))
    ckptr.close()
    for key in [k for k in w.result if k.endswith("#0")]:
        del w.result[key]
    _mean_abba(w, ["sc_save", "sc_restore", "orbax_save", "orbax_restore"])


WORKERS: dict[str, Callable[[Worker], None]] = {
    "one-sc": work_one_sc,
    "one-jax": work_one_jax,
    "sc": lambda w: work_sc(w, True),
    "sc-fast": lambda w: work_sc(w, False),
    "sc-mmap": lambda w: work_sc(w, False, mmap=True),
    "sc-extras": work_sc_extras,
    "sc-one": work_sc_one,
    "sc-100k": work_sc_100k,
    "tf": work_tf,
    "dcp": work_dcp,
    "dcp-fast": lambda w: work_dcp(w, sync_files=False),
    "orbax": work_orbax,
    "safetensors": work_safetensors,
    "raw": work_raw,
    "memcpy": work_memcpy,
}


def worker_main(args: argparse.Namespace) -> int:
    w = Worker(args)
    WORKERS[args.worker](w)
    with open(args.out, "w") as f:
        json.dump(w.result, f)
    return 0


# --- orchestration --------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (busy excludes idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children (the workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(system: str, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.setdefault("PYTHONHASHSEED", "0")
    if system in ("orbax", "one-jax"):
        count = 8 if system == "one-jax" else 4
        flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
        env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={count}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    if getattr(args, "one_layouts", None):
        env["BENCH_ONE_LAYOUTS"] = ",".join(args.one_layouts)
    if args.perf:
        env["BENCH_PERF_PHASE"] = args.perf
        env["BENCH_PERF_DIR"] = args.perf_dir
    if system.startswith("dcp"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
        env["BENCH_PORT"] = str(_free_port())
    return env


def run_system(system: str, rep: int, workdir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start the system's worker processes (fresh), wait, and return every client's result."""
    from shardckpt.coordination import KVServer

    out_dir = os.path.join(workdir, system)
    if system != "sc-one":  # untimed: no system pays for deleting or overwriting an earlier output
        shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    n = NPROCS.get(system, 1)
    env = _env(system, args)
    server = KVServer("127.0.0.1", 0, size=n).start() if system.startswith("sc") or system == "raw" else None
    procs, outs = [], []
    try:
        for r in range(n):
            out = os.path.join(workdir, f".result-{system}-{r}.json")
            if os.path.exists(out):
                os.unlink(out)
            outs.append(out)
            wrap = args.wrap.format(system=system, rank=r, dir=workdir).split() if args.wrap else []
            cmd = wrap + [sys.executable, "-u", os.path.abspath(__file__), "--worker", system, "--rank", str(r),
                   "--world", str(n), "--dir", out_dir, "--out", out, "--rep", str(rep), "--side", str(args.side),
                   "--small-count", str(args.small_count)]
            if args.profile:
                cmd += ["--profile-dir", args.profile_dir]
            # The launcher's store is authenticated: each client gets its own key, as `shardckpt launch` gives.
            procs.append(subprocess.Popen(cmd, env={**env, **(server.env(r) if server is not None else {})},
                                          cwd=workdir))
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                time.sleep(2)  # let the others notice and report
                break
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
        if any(c != 0 for c in codes):
            raise RuntimeError(f"{system}: worker exit statuses {codes}")
        results = []
        for out in outs:
            with open(out) as f:
                results.append(json.load(f))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if server is not None:
            server.stop()


def _reduce(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Slowest client per timed phase; per-client maxima of RSS and the shardckpt phase timings."""
    out: dict[str, Any] = {}
    for key in results[0]:
        if key == "rank":
            continue
        vals = [r[key] for r in results if key in r]
        if isinstance(vals[0], (int, float)):
            out[key] = max(vals)
        elif isinstance(vals[0], dict):
            out[key] = {k: max(v.get(k, 0.0) for v in vals) for k in vals[0]}
    return out


def orchestrate(args: argparse.Namespace) -> int:
    if args.layouts:
        return orchestrate_layouts(args)
    systems = [s for s in ALL_SYSTEMS if not args.only or s in args.only]
    if "sc-one" in systems and "sc-extras" not in systems:
        systems.append("sc-extras")
    workdir = args.dir or tempfile.mkdtemp(prefix="bench-peers-", dir=args.tmp)
    os.makedirs(workdir, exist_ok=True)
    if args.profile:
        args.profile_dir = os.path.join(workdir, "profiles")
        os.makedirs(args.profile_dir, exist_ok=True)
    if args.perf:
        args.perf_dir = os.path.join(os.path.dirname(os.path.abspath(args.json)), "perf")
        os.makedirs(args.perf_dir, exist_ok=True)
    nbytes = total_bytes(args.side)
    print(f"workload: {NUM_LARGE} x {args.side}x{args.side} float32 sharded 2x2 over 4 clients + {NUM_SMALL} "
          f"replicated float32[{SMALL_LEN}] = {nbytes / GiB:.3f} GiB; {args.reps} repetitions; dir {workdir}",
          flush=True)
    runs: list[dict[str, dict[str, Any]]] = []
    errors: dict[str, str] = {}
    start = time.time()
    cpu0 = _cpu_ticks()
    mine0 = _own_cpu()
    try:
        for rep in range(args.reps):
            # Rotate the main systems by one per repetition; the shardckpt-only runs follow in a rotated order
            # too (sc-one reads what sc-extras wrote, so it stays right after it).
            main = [s for s in MAIN_SYSTEMS if s in systems]
            main = main[rep % len(main):] + main[: rep % len(main)] if main else []
            extras = [s for s in ["sc-extras", "sc-100k"] if s in systems]
            order = []
            for s in (main + extras if rep % 2 == 0 else extras + main):
                order.append(s)
                if s == "sc-extras" and "sc-one" in systems:
                    order.append("sc-one")
            run: dict[str, dict[str, Any]] = {}
            for system in order:
                t = time.perf_counter()
                try:
                    run[system] = _reduce(run_system(system, rep, workdir, args))
                except Exception as exc:  # noqa: BLE001 - one failing peer must not sink the whole report
                    errors[system] = str(exc)
                    print(f"  rep {rep}: {system} FAILED: {exc}", flush=True)
                    continue
                r = run[system]
                parts = [f"{k} {v:.3f}s" for k, v in r.items() if isinstance(v, float) and "rss" not in k]
                print(f"  rep {rep}: {system:12s} {', '.join(parts)}  ({time.perf_counter() - t:.0f}s with start-up)",
                      flush=True)
            runs.append(run)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.time() - start
    busy, total = (b - a for a, b in zip(cpu0, _cpu_ticks()))
    tick = os.sysconf("SC_CLK_TCK")
    others = max(0.0, busy / tick - (_own_cpu() - mine0))
    noise = {"machine_cpu_seconds": total / tick, "busy_cpu_seconds": busy / tick,
             "other_processes_cpu_seconds": others, "other_share": others / (total / tick) if total else 0.0}
    data = {"args": {k: v for k, v in vars(args).items() if k != "only"}, "runs": runs, "errors": errors,
            "machine": machine_info(args.tmp), "bytes": nbytes, "elapsed": elapsed, "noise": noise}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    if args.perf:
        print("\n".join(perf_summary(args.perf_dir)))
    text = report(data, perf_dir=args.perf_table)
    print()
    print(text)
    if args.profile:
        print_profiles(args.profile_dir)
    if args.output and not args.no_write:
        write_section(args.output, _block(text, START, END), START, END)
        print(f"\nwrote the section between {START} and {END} of {args.output}")
    return 0


def orchestrate_layouts(args: argparse.Namespace) -> int:
    """The one-client layouts (``--layouts``): each system in a fresh process, rotated per repetition."""
    systems = [s for s in LAYOUT_SYSTEMS if not args.only or s in args.only]
    os.environ["BENCH_WARM"] = "1"  # the workers inherit it (`_env`)
    workdir = args.dir or tempfile.mkdtemp(prefix="bench-layouts-", dir=args.tmp)
    os.makedirs(workdir, exist_ok=True)
    args.profile_dir = os.path.join(workdir, "profiles") if args.profile else None
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    nbytes = total_bytes(args.side)
    print(f"layouts: {NUM_LARGE} x {args.side}x{args.side} float32 + {NUM_SMALL} small = {nbytes / GiB:.3f} GiB, one "
          f"client; {args.reps} repetitions; dir {workdir}", flush=True)
    runs: list[dict[str, dict[str, Any]]] = []
    errors: dict[str, str] = {}
    start, cpu0, mine0 = time.time(), _cpu_ticks(), _own_cpu()
    try:
        for rep in range(args.reps):
            order = systems[rep % len(systems):] + systems[: rep % len(systems)]
            run: dict[str, dict[str, Any]] = {}
            for system in order:
                t = time.perf_counter()
                try:
                    run[system] = _reduce(run_system(system, rep, workdir, args))
                except Exception as exc:  # noqa: BLE001 - one failing system must not sink the report
                    errors[system] = str(exc)
                    print(f"  rep {rep}: {system} FAILED: {exc}", flush=True)
                    continue
                parts = [f"{k} {v:.3f}s" for k, v in run[system].items() if isinstance(v, float) and "rss" not in k]
                print(f"  rep {rep}: {system:8s} {', '.join(parts)}  ({time.perf_counter() - t:.0f}s)", flush=True)
            runs.append(run)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    busy, total = (b - a for a, b in zip(cpu0, _cpu_ticks()))
    tick = os.sysconf("SC_CLK_TCK")
    others = max(0.0, busy / tick - (_own_cpu() - mine0))
    data = {"runs": runs, "errors": errors, "machine": machine_info(args.tmp), "bytes": nbytes, "side": args.side,
            "elapsed": time.time() - start,
            "noise": {"machine_cpu_seconds": total / tick, "other_processes_cpu_seconds": others,
                      "other_share": others / (total / tick) if total else 0.0},
            "loadavg": os.getloadavg()}
    path = os.path.join(os.path.dirname(args.json), "bench_layouts.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    text = layouts_report(data)
    print()
    print(text)
    if args.output and not args.no_write:
        write_section(args.output, _block(text, LAYOUTS_START, LAYOUTS_END), LAYOUTS_START, LAYOUTS_END)
        print(f"\nwrote the section between {LAYOUTS_START} and {LAYOUTS_END} of {args.output}")
    return 0


def layouts_report(data: dict[str, Any]) -> str:
    runs, nbytes, m = data["runs"], data["bytes"], data["machine"]
    lines = [
        "## One client, many devices: every layout (`benchmarks/bench_peers.py --layouts`)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, {m['filesystem']} file "
        f"system; {m['date']}; {len(runs)} repetitions.  Other processes used {data['noise']['other_share']:.0%} of "
        f"the machine's CPU time during the run: compare the same-run ratios, not the seconds.",
        "",
        f"{nbytes / GiB:.2f} GiB: {NUM_LARGE} float32[{data['side']}, {data['side']}] + {NUM_SMALL} "
        f"float32[{SMALL_LEN}], one process.  Steady state: every system and layout runs one untimed round "
        "(save, restore) right before its timed one, so none pays for memory the VM has not handed out lately "
        "(~2 µs per 4 KiB page on first touch here) that the next one would reuse.  Saves after `os.sync()`, "
        "into the page cache; restores from the page cache into new arrays (from the allocator, which reuses "
        "what the untimed round freed).",
        "",
        "| what (one process) | save s, median (min–max) | save GB/s | restore s, median (min–max) |",
        "|---|---|---|---|",
    ]

    def cell(system: str, key: str) -> str:
        vals = _series(runs, system, key)
        if not vals:
            return "n/a"
        med, lo, hi = _stats(vals)
        return f"{med:.3f} ({lo:.3f}–{hi:.3f})"

    def row(label: str, system: str, save: str | None, restore: str | None) -> None:
        sv = _series(runs, system, save) if save else []
        lines.append(f"| {label} | {cell(system, save) if save else ''} | "
                     f"{_gbps(nbytes, sv) if sv else ''} | {cell(system, restore) if restore else ''} |")

    row("raw `os.write` of the same bytes, contiguous, one file (ceiling)", "one-sc", "raw_save", None)
    names = {"2d4": "4 devices, 2x2 mesh (2-D-sharded views)", "col4": "4 devices, 1x4 (column blocks)",
             "2d8": "8 devices, 2x4 mesh", "col8": "8 devices, 1x8 (column blocks)"}
    for tag, label in names.items():
        row(f"shardckpt, durable=False, {label}", "one-sc", f"save_{tag}", f"restore_{tag}")
    row("shardckpt: the 2x2 checkpoint restored as 4x1 row blocks", "one-sc", None, "restore_2d4_to_4x1")
    row("shardckpt: the 2x2 checkpoint restored as whole tensors", "one-sc", None, "restore_2d4_to_whole")
    row(LABELS["tf"] + " (2x2 of 4 logical CPUs)", "tf", "save", "restore")
    row("shardckpt.jax save (durable) / restore, 8 CPU devices, 2x4", "one-jax", "sc_save", "sc_restore")
    row("Orbax StandardCheckpointer, same process, same arrays", "one-jax", "orbax_save", "orbax_restore")

    def ratio(num: tuple[str, str], den: tuple[str, str]) -> float | None:
        return _med(_ratio_series(runs, num, den))

    def target(what: str, got: float | None, want: float, at_least: bool = True) -> None:
        if got is None:
            lines.append(f"- {what}: n/a")
            return
        ok = got >= want if at_least else got <= want
        verdict = "**met**" if ok else "**missed**"
        lines.append(f"- {what}: {'≥' if at_least else '≤'} {want:g}× → {got:.2f}×: {verdict}")

    lines += ["", "Targets of issue 13 (median of the same-repetition ratios):", ""]
    target("4 devices, 2-D views: save vs TF DTensor (TF s / ours)", ratio(("tf", "save"), ("one-sc", "save_2d4")), 1.5)
    target("4 devices, 2-D views: save vs the raw contiguous write, same process (raw s / ours)",
           ratio(("one-sc", "raw_save"), ("one-sc", "save_2d4")), 0.8)
    target("4 devices, 2-D views: restore vs TF DTensor", ratio(("tf", "restore"), ("one-sc", "restore_2d4")), 1.5)
    target("JAX, 8 devices: save vs Orbax", ratio(("one-jax", "orbax_save"), ("one-jax", "sc_save")), 2)
    target("JAX, 8 devices: restore vs Orbax", ratio(("one-jax", "orbax_restore"), ("one-jax", "sc_restore")), 2)
    target("Resharding 2x2 -> 4x1 (one client) vs the same layout (ours / ours)",
           ratio(("one-sc", "restore_2d4_to_4x1"), ("one-sc", "restore_2d4")), 1.3, at_least=False)
    target("Resharding 2x2 -> whole tensors (one client) vs the same layout",
           ratio(("one-sc", "restore_2d4_to_whole"), ("one-sc", "restore_2d4")), 1.5, at_least=False)
    if data.get("errors"):
        lines += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in data["errors"].items())]
    return "\n".join(lines) + "\n"


# --- reporting ------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for dist in ["numpy", "tensorflow-cpu", "torch", "jax", "jaxlib", "orbax-checkpoint", "tensorstore",
                 "safetensors", "crc32c"]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        import shardckpt

        out["shardckpt"] = shardckpt.__version__
    except ImportError:
        pass
    return out


def machine_info(path: str | None) -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    try:
        target = os.path.realpath(path or tempfile.gettempdir())
        fs, best = "?", ""
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1].rstrip("/") + "/" if len(parts) > 2 else None
                if mount and (target + "/").startswith(mount) and len(parts[1]) > len(best):
                    fs, best = parts[2], parts[1]
    except OSError:
        fs = "?"
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "filesystem": fs, "versions": _versions(),
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _series(runs: list[dict], system: str, key: str) -> list[float]:
    return [r[system][key] for r in runs if system in r and key in r[system]]


def _ratio_series(runs: list[dict], num: tuple[str, str], den: tuple[str, str]) -> list[float]:
    """Same-repetition ratios of seconds num/den (so den faster gives > 1)."""
    out = []
    for r in runs:
        if num[0] in r and den[0] in r and num[1] in r[num[0]] and den[1] in r[den[0]]:
            out.append(r[num[0]][num[1]] / r[den[0]][den[1]])
    return out


def _gbps(nbytes: int, seconds: list[float]) -> str:
    if not seconds:
        return "n/a"
    med, lo, hi = _stats(seconds)
    return f"{nbytes / med / 1e9:.2f} ({nbytes / hi / 1e9:.2f}–{nbytes / lo / 1e9:.2f})"


def _ratio_text(values: list[float]) -> str:
    if not values:
        return "n/a"
    med, lo, hi = _stats(values)
    return f"{med:.2f}× ({lo:.2f}–{hi:.2f})"


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(data: dict[str, Any], perf_dir: str | None = None, notes: str | None = None) -> str:
    runs, nbytes, m = data["runs"], data["bytes"], data["machine"]
    reps = len(runs)
    v = m["versions"]
    lines = [
        "## Against the peers: one 4-client workload (`benchmarks/bench_peers.py`)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, {m['filesystem']} file "
        f"system, Python {m['python']}; {m['date']}.",
        f"Versions: shardckpt {v.get('shardckpt', '?')}, numpy {v['numpy']}, tensorflow-cpu {v['tensorflow-cpu']}, "
        f"torch {v['torch']}, jax/jaxlib {v['jax']}/{v['jaxlib']}, orbax-checkpoint {v['orbax-checkpoint']} "
        f"(tensorstore {v['tensorstore']}), safetensors {v['safetensors']}, crc32c {v['crc32c']}.",
        "",
        f"Workload: {NUM_LARGE} float32 tensors of {data['args']['side']}×{data['args']['side']} sharded 2×2 over 4 "
        f"clients ({NUM_LARGE * data['args']['side'] ** 2 // MiB} MiB per client) plus {NUM_SMALL} replicated "
        f"float32[{SMALL_LEN}], "
        f"{nbytes / GiB:.3f} GiB in all. {reps} repetitions; every repetition runs every system once, in an order "
        "rotated by one each time. Each system runs in fresh processes; the clock runs inside them, between "
        "barriers, around the save or restore call only (no start-up, import or data building), and the slowest "
        "client counts. Before every timed save the previous output is deleted (untimed) and `os.sync()` runs. "
        "Restores read the files just written, from the page cache; DCP and raw restore into buffers "
        "allocated (not touched) before the clock starts, the others allocate inside the call. "
        "GB/s = 10^9 bytes of the logical checkpoint "
        "per second: median (slowest–fastest repetition).",
        "",
        "**Read the ratios, not the GB/s.** On this noisy 2-core VM memory that has not been touched recently "
        "costs about 2 µs per 4 KiB page to fault in, so any single number swings between about 0.5 and 3.3 GB/s "
        "from one run to the next; only ratios taken within the same repetition mean something. Ratios are "
        "shardckpt's speed over the peer's (peer seconds / shardckpt seconds, >1 = shardckpt faster), the median "
        "of the per-repetition ratios (range).",
        "",
        f"Other load during this run: processes outside the benchmark used {data['noise']['other_share']:.0%} of "
        f"the machine's CPU time ({data['noise']['other_processes_cpu_seconds']:.0f} of "
        f"{data['noise']['machine_cpu_seconds']:.0f} CPU-seconds over {data['elapsed'] / 60:.1f} minutes).",
        "",
        "Durability differs: shardckpt `durable=True`, DCP (`sync_files=True`) and Orbax (TensorStore) fsync "
        "their files; TF's SaveV2, safetensors and DCP with `sync_files=False` do not. Each peer is therefore "
        "compared with both shardckpt variants, and the targets use the like-for-like one (in bold).",
        "",
        "Restores: shardckpt's default restore copies into new arrays, as TF, Orbax and safetensors' `load_file` "
        "do; with `mmap=True` a shard that is one contiguous range of a data file comes back as a copy-on-write "
        "mapping of the page cache (as `torch.load(mmap=True)` or safetensors' torch loader), checksummed but "
        "not copied. What the mapping defers is paid on the first write to each page, so the sc rows also time "
        "one in-place `np.add` over every restored shard (`first write`).",
        "",
        "The last two columns give the room there is: how much faster than the peer the raw ceiling was in the "
        "same repetition (raw write for peers that do not fsync, raw write + fsync for those that do; raw preadv for "
        "restores). No system can beat a peer by more than that on this machine.",
        "",
        "| system | save GB/s | restore GB/s | save: shardckpt durable=True / peer | save: durable=False / peer | "
        "restore: shardckpt / peer | restore: mmap=True / peer | save: ceiling / peer | restore: ceiling / peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    durable_peers = {"dcp", "orbax", "raw+fsync"}
    for system in ["sc", "sc-fast", "sc-mmap", "tf", "dcp", "dcp-fast", "orbax", "safetensors", "raw", "raw+fsync",
                   "memcpy"]:
        base = "raw" if system == "raw+fsync" else system
        if not any(base in r for r in runs):
            continue
        if system == "raw+fsync":
            save = [r["raw"]["save"] + r["raw"]["fsync"] for r in runs if "raw" in r]
        else:
            save = _series(runs, base, "save")
        restore = _series(runs, base, "restore") if system not in ("raw+fsync", "memcpy") else []
        if system in ("sc", "sc-fast", "sc-mmap"):
            cells = ["—", "—", "—", "—"]
            ceil_save = [r[system]["save"] / c for r in runs if system in r and (c := _raw_save(r, system == "sc"))]
            ceil_restore = _ratio_series(runs, (system, "restore"), ("raw", "restore"))
            cells += [_ratio_text(ceil_save), _ratio_text(ceil_restore)]
        elif system in ("raw", "raw+fsync", "memcpy"):
            cells = ["—"] * 6
        else:
            def peer_save(r: dict, system: str = system) -> float | None:
                if system == "raw+fsync":
                    return r["raw"]["save"] + r["raw"]["fsync"] if "raw" in r else None
                return r.get(system, {}).get("save")

            rd = [p / r["sc"]["save"] for r in runs if "sc" in r and (p := peer_save(r)) is not None]
            rf = [p / r["sc-fast"]["save"] for r in runs if "sc-fast" in r and (p := peer_save(r)) is not None]
            rr = _ratio_series(runs, (base, "restore"), ("sc", "restore")) if restore else []
            rm = _ratio_series(runs, (base, "restore"), ("sc-mmap", "restore")) if restore else []
            like = "durable" if system in durable_peers else "fast"
            sd, sf = _ratio_text(rd), _ratio_text(rf)
            cells = [f"**{sd}**" if like == "durable" and rd else sd, f"**{sf}**" if like == "fast" and rf else sf,
                     _ratio_text(rr), _ratio_text(rm)]
            ceil_save = [r[system]["save"] / c for r in runs if system in r and (c := _raw_save(r, like == "durable"))]
            cells += [_ratio_text(ceil_save), _ratio_text(_ratio_series(runs, (system, "restore"), ("raw", "restore")))
                      if restore else "—"]
        lines.append(f"| {LABELS[system]} | {_gbps(nbytes, save)} | {_gbps(nbytes, restore) if restore else '—'} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines += _extras_table(runs, nbytes, data["args"])
    lines += _targets(runs, nbytes)
    if notes:
        lines += ["", notes.rstrip()]
    if perf_dir:
        table = perf_summary(perf_dir)
        if table:
            lines += ["", "Where the on-CPU time goes (`perf record -g` of the timed phase in every client, kernel "
                      "included, from a separate `--perf save` / `--perf restore` run; time spent waiting for the "
                      "disk or for a CPU is not on-CPU and not shown):", ""] + table
    if data["errors"]:
        lines += ["", "Failures: " + "; ".join(f"{k}: {v}" for k, v in data["errors"].items())]
    lines.append("")
    return "\n".join(lines)


def _raw_save(r: dict, durable: bool) -> float | None:
    """The raw ceiling's save seconds in repetition ``r``: write only, or write + fsync."""
    if "raw" not in r:
        return None
    return r["raw"]["save"] + (r["raw"]["fsync"] if durable else 0.0)


def _extras_table(runs: list[dict], nbytes: int, args: dict) -> list[str]:
    lines: list[str] = []
    phases = [r["sc"]["phases"] for r in runs if "sc" in r and "phases" in r["sc"]]
    if phases:
        keys = [k for k in phases[0] if k != "total"]
        lines += ["shardckpt save phases (durable=True, slowest client, median seconds): "
                  + ", ".join(f"{k} {statistics.median(p[k] for p in phases):.3f}" for k in keys) + ".", ""]
    if any("sc-extras" in r for r in runs):
        local = statistics.median(_series(runs, "sc-extras", "local_bytes")) if _series(
            runs, "sc-extras", "local_bytes") else 0
        lines += [
            "Resharding: after an untimed warm-up restore, the same-layout and the resharded restore are timed in "
            "the order A B B A (B A A B in odd repetitions) and each is the mean of its two runs.",
            "",
            "| shardckpt measurement | median (range) | |",
            "|---|---|---|",
            "| restore 2×2 → 2×2, 4 clients (same layout) | "
            f"{_gbps(nbytes, _series(runs, 'sc-extras', 'restore_same'))} GB/s | |",
            f"| restore 2×2 → 4×1, 4 clients (resharding) | {_gbps(nbytes, _series(runs, 'sc-extras', 'restore_4x1'))} "
            f"GB/s | time / same layout: "
            f"{_ratio_text(_ratio_series(runs, ('sc-extras', 'restore_4x1'), ('sc-extras', 'restore_same')))} |",
            f"| restore 2×2 → 2×2 on 1 client holding all 4 devices | "
            f"{_gbps(nbytes, _series(runs, 'sc-one', 'restore_same'))} GB/s | |",
            f"| restore 2×2 → whole tensors on 1 client (resharding) | "
            f"{_gbps(nbytes, _series(runs, 'sc-one', 'restore_whole'))} GB/s | time / same layout on 1 client: "
            f"{_ratio_text(_ratio_series(runs, ('sc-one', 'restore_whole'), ('sc-one', 'restore_same')))} |",
        ]
        fc, fm = _series(runs, "sc-fast", "first_write"), _series(runs, "sc-mmap", "first_write")
        if fc and fm:
            both_c = [r["sc-fast"]["restore"] + r["sc-fast"]["first_write"] for r in runs if "sc-fast" in r]
            both_m = [r["sc-mmap"]["restore"] + r["sc-mmap"]["first_write"] for r in runs if "sc-mmap" in r]
            lines += [
                f"| first write over the restored shards (`np.add` in place), slowest client | after the copy "
                f"restore {_stats(fc)[0]:.3f} s; after mmap=True {_stats(fm)[0]:.3f} s | restore + first write: "
                f"copy {_stats(both_c)[0]:.3f} s, mmap=True {_stats(both_m)[0]:.3f} s |",
            ]
        ab = _series(runs, "sc-extras", "async_blocking")
        a1 = _series(runs, "sc-extras", "async_first")
        cf = _series(runs, "sc-extras", "copy_fresh")
        cw = _series(runs, "sc-extras", "copy_warm")
        at = _series(runs, "sc-extras", "async_total")
        if ab:
            lines += [
                f"| async save (`blocking=False`): blocking part, slowest client | {_stats(ab)[0]:.3f} s "
                f"({_stats(ab)[1]:.3f}–{_stats(ab)[2]:.3f}) | "
                f"/ np.copyto into fresh buffers: "
                f"{_ratio_text(_ratio_series(runs, ('sc-extras', 'async_blocking'), ('sc-extras', 'copy_fresh')))};"
                f" / into already touched buffers: "
                f"{_ratio_text(_ratio_series(runs, ('sc-extras', 'async_blocking'), ('sc-extras', 'copy_warm')))} |",
                f"| the first async save of the process (allocates the staging memory the later ones reuse) | "
                f"{_stats(a1)[0]:.3f} s | / np.copyto into fresh buffers: "
                f"{_ratio_text(_ratio_series(runs, ('sc-extras', 'async_first'), ('sc-extras', 'copy_fresh')))} |"
                if a1 else "| first async save | n/a | |",
                f"| np.copyto of the client's {local / MiB:.0f} MiB of shards into fresh buffers (np.empty_like) | "
                f"{_stats(cf)[0]:.3f} s | into touched buffers: {_stats(cw)[0]:.3f} s |",
                f"| async save, call to `result()` returning | {_stats(at)[0]:.3f} s | "
                f"blocking save in the same run: {_stats(_series(runs, 'sc-extras', 'save'))[0]:.3f} s |",
            ]
        rss = _series(runs, "sc-extras", "save_rss_added") + _series(runs, "sc", "save_rss_added")
        if rss:
            lines.append(f"| peak RSS added by a blocking save, largest client | {max(rss) / MiB:.1f} MiB (median "
                         f"{statistics.median(rss) / MiB:.1f}) | local shards {local / MiB:.0f} MiB |")
        peers_rss = []
        for s in ["dcp", "tf", "orbax", "safetensors"]:
            vals = _series(runs, s, "save_rss_added")
            if vals:
                peers_rss.append(f"{s} {statistics.median(vals) / MiB:.0f} MiB")
        if peers_rss:
            lines.append("| peak RSS added by the peers' saves (median; DCP per client, others for the 1 process "
                         f"holding all 1 GiB) | {', '.join(peers_rss)} | |")
        lines.append("")
    if any("sc-100k" in r for r in runs):
        n = args.get("small_count", 100_000)
        s = _series(runs, "sc-100k", "save")
        lines += [
            f"{n:,} float32[16] tensors ({n * 64 / 1e6:.1f} MB), replicated over 8 in-process clients "
            "(`LocalGroup(8)`, the plan spreads them over the 8 writers): "
            f"save {_stats(s)[0]:.2f} s ({_stats(s)[1]:.2f}–{_stats(s)[2]:.2f}); restore split over the 8 clients "
            f"{_stats(_series(runs, 'sc-100k', 'restore_split'))[0]:.2f} s; restore of all by one client "
            f"{_stats(_series(runs, 'sc-100k', 'restore_one'))[0]:.2f} s. Reference, safetensors on the same dict "
            f"in one process: save {_stats(_series(runs, 'sc-100k', 'st_save'))[0]:.2f} s, load "
            f"{_stats(_series(runs, 'sc-100k', 'st_restore'))[0]:.2f} s.",
            "",
        ]
    return lines


def _targets(runs: list[dict], nbytes: int) -> list[str]:
    lines = ["Targets of issue 5 (median of the same-repetition ratios; like-for-like durability):", ""]

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**missed**")

    def speed(peer: str, phase: str, ref: str, want: float, what: str) -> None:
        ratios = _ratio_series(runs, (peer, phase), (ref, phase))
        med = _med(ratios)
        other = ""
        if phase == "save":
            alt = "sc-fast" if ref == "sc" else "sc"
            alt_med = _med(_ratio_series(runs, (peer, phase), (alt, phase)))
            if alt_med is not None:
                other = f" (with durable={'False' if alt == 'sc-fast' else 'True'}: {alt_med:.2f}×)"
        got = f"{med:.2f}×" if med is not None else "n/a"
        if phase == "restore":
            mm = _med(_ratio_series(runs, (peer, phase), ("sc-mmap", phase)))
            got = (f"copy (default) {got}: {mark(None if med is None else med >= want)}; mmap=True "
                   f"{'n/a' if mm is None else f'{mm:.2f}×'}: {mark(None if mm is None else mm >= want)}")
        if phase == "save":
            room = [r[peer]["save"] / c for r in runs if peer in r and (c := _raw_save(r, ref == "sc"))]
        else:
            room = _ratio_series(runs, (peer, "restore"), ("raw", "restore"))
        if phase == "restore":
            ceiling = (f"; raw preadv ceiling / peer speed: {_med(room):.2f}× (bounds the copying restore; a "
                       "mapping copies nothing)" if room else "")
            lines.append(f"- {what}: ≥ {want:g}× → {got}{ceiling}")
            return
        ceiling = f"; raw ceiling / peer speed: {_med(room):.2f}×" if room else ""
        lines.append(f"- {what}: ≥ {want:g}× → {got}{other}{ceiling}: {mark(None if med is None else med >= want)}")

    speed("tf", "save", "sc-fast", 6, "Save vs TF DTensor (durable=False, as SaveV2 does not fsync)")
    speed("dcp", "save", "sc", 10, "Save vs PyTorch DCP (durable=True, as DCP fsyncs)")
    speed("dcp-fast", "save", "sc-fast", 10, "Save vs PyTorch DCP, neither fsyncing (sync_files=False, durable=False)")
    speed("orbax", "save", "sc", 10, "Save vs Orbax (durable=True, as TensorStore fsyncs)")
    speed("safetensors", "save", "sc-fast", 1.0, "Save vs safetensors save_file (durable=False, as it does not fsync)")
    speed("tf", "restore", "sc", 5, "Restore vs TF DTensor")
    speed("dcp", "restore", "sc", 2, "Restore vs PyTorch DCP")
    speed("safetensors", "restore", "sc", 1.2, "Restore vs safetensors load_file")
    r41 = _med(_ratio_series(runs, ("sc-extras", "restore_4x1"), ("sc-extras", "restore_same")))
    r1 = _med(_ratio_series(runs, ("sc-one", "restore_whole"), ("sc-one", "restore_same")))
    worst = max([x for x in (r41, r1) if x is not None], default=None)
    lines.append(f"- Resharding restore ≤ 1.3× same-layout time → 2×2→4×1 on 4 clients "
                 f"{'n/a' if r41 is None else f'{r41:.2f}×'}, 2×2→whole on 1 client "
                 f"{'n/a' if r1 is None else f'{r1:.2f}×'}: {mark(None if worst is None else worst <= 1.3)}")
    af = _med(_ratio_series(runs, ("sc-extras", "async_blocking"), ("sc-extras", "copy_fresh")))
    aw = _med(_ratio_series(runs, ("sc-extras", "async_blocking"), ("sc-extras", "copy_warm")))
    lines.append(f"- Async blocking time ≤ 1.5× np.copyto of the local shards → "
                 f"{'n/a' if af is None else f'{af:.2f}×'} of a copy into fresh buffers: "
                 f"{mark(None if af is None else af <= 1.5)}; {'n/a' if aw is None else f'{aw:.2f}×'} of a copy into "
                 f"already touched buffers: {mark(None if aw is None else aw <= 1.5)}")
    rss = _series(runs, "sc-extras", "save_rss_added") + _series(runs, "sc", "save_rss_added")
    local = max(_series(runs, "sc-extras", "local_bytes") + _series(runs, "sc", "local_bytes"), default=0)
    if rss:
        limit = max(64 * MiB, local // 10)
        lines.append(f"- Blocking save adds ≤ max(64 MiB, 10 % of {local / MiB:.0f} MiB local shards) = "
                     f"{limit / MiB:.0f} MiB to peak RSS → worst client in any repetition {max(rss) / MiB:.1f} MiB: "
                     f"{mark(max(rss) <= limit)}")
    else:
        lines.append("- Peak RSS of a blocking save: n/a")
    return lines


PERF_CATEGORIES = [
    ("zeroing fresh pages", r"clear_page|folio_zero"),
    ("copying to/from the page cache", r"copy_to_iter|copy_page_to_iter|copy_folio_from_iter|copy_user|memmove|memcpy"),
    ("checksums", r"crc|CRC|adler"),
    ("Python interpreter", r"^_?Py|_PyEval|PyObject|gc_collect|visit_"),
    ("page faults, memory management", r"fault|pte|pmd|mm_|lru|page|alloc|free|zap|unmap|memcg|charge"),
    ("file system, block layer", r"ext4|jbd2|blk_|bio|iomap|writeback|folio|filemap|xa_|es_|dquot|buffer"),
    ("locks, scheduling", r"spin|mutex|rwsem|futex|schedul|osq|wake"),
]


def perf_summary(perf_dir: str) -> list[str]:
    """Where on-CPU time goes per system and phase, from ``--perf`` recordings (all clients summed)."""
    import re

    files = sorted(glob.glob(os.path.join(perf_dir, "*.data")))
    groups: dict[str, list[str]] = {}
    for path in files:
        key = os.path.basename(path).rsplit("-", 1)[0]  # SYSTEM-PHASE
        groups.setdefault(key, []).append(path)
    if not groups:
        return []
    names = [n for n, _ in PERF_CATEGORIES] + ["other"]
    lines = ["| system, phase | on-CPU seconds (all clients) | " + " | ".join(names) + " | top symbols |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for key, paths in groups.items():
        totals: dict[str, float] = {}
        symbols: dict[str, float] = {}
        samples = 0
        for path in paths:
            text = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "sym", "--stdio", "-g",
                                   "none", "--percent-limit", "0"], capture_output=True, text=True).stdout
            m = re.search(r"# Samples: (\d+)(K?)", text)
            n = int(m.group(1)) * (1000 if m.group(2) else 1) if m else 0
            samples += n
            for line in text.splitlines():
                hit = re.match(r"\s+([\d.]+)%\s+\[.\]\s+(.+?)\s*$", line)
                if not hit:
                    continue
                weight, sym = float(hit.group(1)) * n / 100, hit.group(2)
                symbols[sym] = symbols.get(sym, 0.0) + weight
                cat = next((c for c, rx in PERF_CATEGORIES if re.search(rx, sym)), "other")
                totals[cat] = totals.get(cat, 0.0) + weight
        if not samples:
            continue
        top = sorted(symbols.items(), key=lambda kv: -kv[1])[:3]
        shares = " | ".join(f"{totals.get(c, 0.0) / samples:.0%}" for c in names)
        tops = ", ".join(f"`{sym[:40]}` {w / samples:.0%}" for sym, w in top)
        lines.append(f"| {key} | {samples / 999:.2f} | {shares} | {tops} |")
    return lines


def print_profiles(profile_dir: str, top: int = 25) -> None:
    import pstats

    for path in sorted(glob.glob(os.path.join(profile_dir, "*.prof"))):
        print(f"\n=== cProfile (client 0): {os.path.basename(path)} ===")
        st = pstats.Stats(path)
        st.sort_stats("cumulative").print_stats(top)
        st.sort_stats("tottime").print_stats(12)


def _block(text: str, start: str, end: str) -> str:
    return f"{start}\n{text.rstrip()}\n{end}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5, or 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 repetitions and 10,000 instead of 100,000 small tensors")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help=f"a subset of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--profile", action="store_true", help="cProfile client 0's timed phases and print the top")
    p.add_argument("--layouts", action="store_true",
                   help="the one-client layouts (4 and 8 devices, views, JAX beside Orbax) and their own section")
    p.add_argument("--one-layouts", type=lambda s: s.split(","), default=None,
                   help="with --layouts: only these one-sc layouts (of " + ",".join(t for t, _, _ in ONE_LAYOUTS)
                   + ") beside the raw write; the section would lack the others, so --no-write is required")
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print the section but leave BENCHMARKS.md alone")
    p.add_argument("--json", default=os.path.join(ROOT, "bench-out", "bench_peers.json"))
    p.add_argument("--tmp", default=None, help="parent of the scratch directory (default: the system's)")
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--small-count", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=900, help=argparse.SUPPRESS)
    p.add_argument("--perf", default=None, metavar="PHASE",
                   help="perf record (kernel included) of the timed phase PHASE (save, restore, ...) of every worker, "
                   "into bench-out/perf/SYSTEM-PHASE-RANK.data")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="render (and write) the section from an earlier run's JSON instead of running")
    p.add_argument("--notes", default=None, metavar="FILE",
                   help="with --from-json: a Markdown file of remarks on this run, added to the section")
    p.add_argument("--perf-table", default=None, metavar="DIR",
                   help="add a table of where on-CPU time goes, from the recordings of a --perf run in DIR")
    p.add_argument("--wrap", default=None, help="a command prefix for every worker, e.g. 'perf stat -o "
                   "/tmp/{system}-{rank}.txt' ({system}, {rank}, {dir} are filled in)")
    # worker mode
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--profile-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        notes = None
        if args.notes:
            with open(args.notes) as f:
                notes = f.read()
        text = report(data, perf_dir=args.perf_table, notes=notes)
        print(text)
        if args.output and not args.no_write:
            write_section(args.output, _block(text, START, END), START, END)
            print(f"\nwrote the section between {START} and {END} of {args.output}")
        return 0
    if args.one_layouts:
        unknown = set(args.one_layouts) - {t for t, _, _ in ONE_LAYOUTS}
        if unknown or not args.layouts or not args.no_write:
            p.error("--one-layouts takes a subset of " + ",".join(t for t, _, _ in ONE_LAYOUTS)
                    + ", with --layouts and --no-write (a partial section must not replace the whole one)")
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.small_count is None:
        args.small_count = 10_000 if args.quick else 100_000
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
