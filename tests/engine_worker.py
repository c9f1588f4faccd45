"""One client of a real multi-process save/restore; run as a script by the ``test_engine_*`` modules.

    python tests/engine_worker.py ENGINE SCENARIO[+SCENARIO...] DIR

ENGINE names an entry of `ENGINES` (a small ``init`` function that brings up the
framework's multi-process runtime on loopback and returns an `Engine`); SCENARIO
names an entry of `SCENARIOS`; DIR is the checkpoint directory.  Environment-
launched engines read ``WORKER_RANK`` / ``WORKER_SIZE`` (and whatever else their
init needs); MPI ranks come from ``mpiexec``.  Each client writes
``$WORKER_RESULTS/result-<rank>.json`` (``{"rank", "ok", "events", "failure"}``)
and exits 0 when every check of its scenario passed, 1 otherwise.

The test modules import this file for the launch helpers at the bottom
(`run_clients`, `snapshot`, and `jax_worker_main` / `run_jax_workers` for modules
that are their own JAX worker); importing it imports no framework.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import shardckpt
from shardckpt import UNSHARDED, DTensor, Layout, create_mesh
from shardckpt.coordination import Coordinator, resolve

U = UNSHARDED
HERE = Path(__file__).resolve().parent
WORKER = HERE / "engine_worker.py"


# --- engines: bring up the framework, return a coordinator and a teardown -----------------------------


@dataclass
class Engine:
    rank: int
    size: int
    coordinator: Coordinator
    expected_class: str  # the class `resolve(None)` must detect for this engine
    finish: Callable[[], None] = lambda: None
    extra: dict[str, Any] = field(default_factory=dict)


def init_torch() -> Engine:
    """gloo over a loopback-only TCPStore: rank 0 hosts it on the listening socket the launcher passed."""
    from datetime import timedelta

    import torch.distributed as dist

    rank, size = int(os.environ["WORKER_RANK"]), int(os.environ["WORKER_SIZE"])
    port = int(os.environ["WORKER_PORT"])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=True, timeout=timedelta(seconds=60),
                              master_listen_fd=int(os.environ["WORKER_LISTEN_FD"]))
    else:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    transport = os.environ.get("WORKER_TORCH_TRANSPORT", "auto")
    if transport == "auto":
        coord = resolve(None)  # the no-argument TorchCoordinator() the library detects
    else:
        from shardckpt.coordination.torch_distributed import TorchCoordinator

        coord = TorchCoordinator(transport=transport)
        assert coord.transport == transport, coord.transport

    def finish() -> None:
        # Rank 0 hosts the store: it leaves only after every other rank is done with it.
        try:
            store.set(f"bye/{rank}", b"1")
            if rank == 0:
                store.wait([f"bye/{r}" for r in range(1, size)], timedelta(seconds=30))
        except Exception as exc:  # noqa: BLE001 - a scenario may have killed the store on purpose
            print(f"[{rank}] teardown: {exc}", file=sys.stderr)
            return
        dist.destroy_process_group()

    return Engine(rank, size, coord, "TorchCoordinator", finish, {"store": store})


def init_mpi() -> Engine:
    """mpi4py's COMM_WORLD, started by ``mpiexec.gforker`` (which listens on 127.0.0.1 only)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    _record_shared_memory(comm.Get_rank())
    return Engine(comm.Get_rank(), comm.Get_size(), resolve(None), "MPICoordinator")


def _record_shared_memory(rank: int) -> None:
    """Name the /dev/shm segments MPI mapped for this rank, so the launcher can remove them if the rank dies.

    MPICH unlinks its segments at MPI_Finalize; a rank killed on purpose never gets there.  Nothing else tells
    which of the machine's ``mpich_shm_*`` files are this job's (other users run MPI too).
    """
    results = os.environ.get("WORKER_RESULTS")
    if not results:
        return
    with open("/proc/self/maps") as f:
        names = sorted({tok for line in f for tok in line.split() if tok.startswith("/dev/shm/")})
    with open(os.path.join(results, f"shm-{rank}.txt"), "w") as f:
        f.write("\n".join(names))


def remove_recorded_shared_memory(results: str) -> list[str]:
    """Unlink the /dev/shm segments the ranks recorded that still exist (their job is over); returns them."""
    removed = []
    for name in os.listdir(results):
        if not name.startswith("shm-"):
            continue
        with open(os.path.join(results, name)) as f:
            for path in filter(None, f.read().split("\n")):
                if os.path.dirname(path) == "/dev/shm":
                    try:
                        os.unlink(path)
                        removed.append(path)
                    except FileNotFoundError:
                        pass
    return removed


ENGINES: dict[str, Callable[[], Engine]] = {"torch": init_torch, "mpi": init_mpi}


def jax_distributed_initialize(rank: int, size: int) -> None:
    """jax.distributed with its coordination service on ``127.0.0.1:$WORKER_PORT`` (the default binds [::]).

    The heartbeat timeout is generous: a dead process is found by shardckpt's own
    (shorter) timeout, before JAX's runtime would abort the survivors.
    """
    import jax

    address = f"127.0.0.1:{os.environ['WORKER_PORT']}"
    jax.distributed.initialize(coordinator_address=address, num_processes=size, process_id=rank,
                               coordinator_bind_address=address, initialization_timeout=60,
                               heartbeat_timeout_seconds=60)


def init_jax() -> Engine:
    """jax.distributed on loopback (`jax_distributed_initialize`)."""
    import jax

    rank, size = int(os.environ["WORKER_RANK"]), int(os.environ["WORKER_SIZE"])
    jax_distributed_initialize(rank, size)
    extra: dict[str, Any] = {}

    def finish() -> None:
        from jax._src import distributed

        dead = extra.get("dead")
        if not dead:
            jax.distributed.shutdown()  # a barrier of every process: the service host leaves last
            return
        # A process is gone: shutdown() would wait for it (or abort), so meet the live ones and leave.
        live = [r for r in range(size) if r not in dead]
        try:
            distributed.global_state.client.wait_at_barrier("engine-worker-bye", 30_000, live)
        except Exception as exc:  # noqa: BLE001
            print(f"[{rank}] teardown: {exc}", file=sys.stderr)
        if rank == 0:
            time.sleep(0.5)  # the service host leaves last
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)

    return Engine(rank, size, resolve(None), "JaxCoordinator", finish, extra)


def init_tf() -> Engine:
    """TF DTensor multi-client on CPU (one logical CPU per client); run inside a private network namespace,
    because TF's gRPC servers listen on every interface (see `launch_tf`)."""
    from tensorflow.experimental import dtensor
    from tensorflow.python.eager import context

    dtensor.initialize_accelerator_system("CPU", num_logical_cpu_devices=1)
    rank, size = int(os.environ["DTENSOR_CLIENT_ID"]), dtensor.num_clients()
    extra: dict[str, Any] = {}

    def finish() -> None:
        if not extra.get("dead"):
            context.context().wait_at_barrier("engine-worker-bye", 60_000)
            return
        if rank == 0:
            time.sleep(1.0)  # the coordination service's host leaves last
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)

    return Engine(rank, size, resolve(None), "TFCoordinator", finish, extra)


ENGINES.update(jax=init_jax, tf=init_tf)


# --- the model: numpy globals every client builds identically ----------------------------------------


def model_globals() -> dict[str, np.ndarray]:
    s = np.empty((3, 2), dtype=object)
    s[:] = [[b"", b"a"], [b"\x00\xff\x00", "na\u00efve".encode()], [b"x" * 300, b"last"]]
    return {
        "w": np.arange(48, dtype=np.float32).reshape(8, 6) * 0.5,  # 2-D sharded
        "b": np.arange(5, dtype=np.int64) * -3,  # replicated numpy array
        "e": np.linspace(0.0, 1.0, 21).reshape(7, 3),  # 7 rows over 2: uneven
        "v": np.arange(48, dtype=np.int32).reshape(8, 6) * 7,  # saved as two user slices
        "s": s,  # strings, 3x2 sharded unevenly
        "step": np.array(42, dtype=np.int64),  # a scalar
    }


def layouts_for(mesh: shardckpt.Mesh) -> dict[str, list[str]]:
    """Sharding specs of each tensor on ``mesh``: a 2-D mesh shards both dims, a 1-D mesh one dim."""
    if len(mesh.dim_names) == 2:
        d0, d1 = mesh.dim_names
        return {"w": [d0, d1], "b": [U], "e": [d0, U], "v": [d1, d0], "s": [d0, d1], "step": []}
    (a,) = mesh.dim_names
    return {"w": [a, U], "b": [a], "e": [U, a], "v": [U, a], "s": [a, U], "step": []}


V_SLICES = [("8 6 0,4:-", slice(0, 4)), ("8 6 4,4:-", slice(4, 8))]


def save_model(engine: Engine, mesh: shardckpt.Mesh, prefix: str, *, timeout: float = 60,
               tamper: Callable[[dict[str, np.ndarray]], None] | None = None) -> shardckpt.SaveResult:
    """Save the model with `layouts_for(mesh)`; "b" and "step" go in as plain (replicated) numpy arrays."""
    g = model_globals()
    if tamper is not None:
        tamper(g)
    specs = layouts_for(mesh)
    local = mesh.local_devices(engine.rank, engine.size)
    names, slices, values = [], [], []
    for name in ("w", "b", "e", "v", "s", "step"):
        if name in ("b", "step"):
            names.append(name), slices.append(""), values.append(g[name])
        elif name == "v":
            for spec, rows in V_SLICES:
                names.append(name), slices.append(spec)
                values.append(DTensor.from_global(g[name][rows], Layout(specs[name], mesh), local))
        else:
            names.append(name), slices.append("")
            values.append(DTensor.from_global(g[name], Layout(specs[name], mesh), local))
    return shardckpt.sharded_save(mesh, prefix, names, slices, values, coordinator=engine.coordinator,
                                  timeout=timeout)


def check_restore(engine: Engine, mesh: shardckpt.Mesh, prefix: str, *, replicated: bool = False) -> int:
    """Restore every tensor (and two slices of "v") onto ``mesh``; each local shard must equal the global's box."""
    g = model_globals()
    specs = layouts_for(mesh)
    if replicated:
        specs = {n: [U] * len(s) for n, s in specs.items()}
    targets: list[tuple[str, str, np.ndarray, list[str]]] = [(n, "", g[n], specs[n]) for n in g]
    targets.append(("v", "8 6 4,4:-", g["v"][4:8], specs["v"]))
    targets.append(("v", "8 6 2,5:1,4", g["v"][2:7, 1:5], specs["w"]))
    local = mesh.local_devices(engine.rank, engine.size)
    # No coordinator passed: restore finds the engine on its own.
    out = shardckpt.sharded_restore(mesh, prefix, [t[0] for t in targets], [Layout(t[3], mesh) for t in targets],
                                    shape_and_slices=[t[1] for t in targets])
    checked = 0
    for (name, spec, want, sharding), got in zip(targets, out):
        where = f"{prefix}: {name}[{spec}] on {mesh.dim_names}{mesh.shape} as {sharding}, client {engine.rank}"
        assert got.shape == want.shape, (where, got.shape, want.shape)
        assert got.dtype == want.dtype, (where, got.dtype, want.dtype)
        assert sorted(got.shards) == sorted(local), (where, sorted(got.shards), local)
        for device, shard in got.shards.items():
            box = tuple(slice(lo, hi) for lo, hi in got.layout.shard_bounds(want.shape, device))
            expected = want[box]
            assert shard.shape == expected.shape, (where, device, shard.shape, expected.shape)
            if want.dtype == object:
                assert shard.tolist() == expected.tolist(), (where, device, shard.tolist(), expected.tolist())
            else:
                assert np.array_equal(shard, expected), (where, device, shard, expected)
            checked += 1
    return checked


# --- scenarios -----------------------------------------------------------------------------------------


def staged_or_committed(directory: str, base: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(base + "."))


def expect_failure(engine: Engine, events: dict, label: str, fn: Callable[[], object],
                   allowed: tuple[type[BaseException], ...]) -> BaseException:
    t = time.monotonic()
    try:
        fn()
    except shardckpt.CheckpointError as exc:
        events[label] = {"type": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - t}
        assert isinstance(exc, allowed), (label, type(exc).__name__, str(exc))
        return exc
    raise AssertionError(f"{label}: client {engine.rank} saved without an error")


def scenario_save_restore(engine: Engine, directory: str, events: dict) -> None:
    """4 clients save on a 2x2 mesh, then restore onto (a) the same, (b) a 1-D mesh, (d) fully replicated."""
    mesh = create_mesh([("x", 2), ("y", 2)])
    t = time.monotonic()
    result = save_model(engine, mesh, os.path.join(directory, "ckpt"))
    events["save"] = {"elapsed": time.monotonic() - t, "bytes": result.bytes_written, "clients": result.num_clients}
    events["restore_same"] = check_restore(engine, mesh, os.path.join(directory, "ckpt"))
    events["restore_1d"] = check_restore(engine, create_mesh([("a", 4)]), os.path.join(directory, "ckpt"))
    events["restore_4x1"] = check_restore(engine, create_mesh([("x", 4), ("y", 1)]), os.path.join(directory, "ckpt"))
    events["restore_replicated"] = check_restore(engine, mesh, os.path.join(directory, "ckpt"), replicated=True)


def scenario_restore(engine: Engine, directory: str, events: dict) -> None:
    """(c) Fewer clients restore the 4-client checkpoint, then save and restore one of their own."""
    n = engine.size
    ckpt = os.path.join(directory, "ckpt")
    events["restore_2x2"] = check_restore(engine, create_mesh([("x", 2), ("y", 2)]), ckpt)
    events["restore_1d"] = check_restore(engine, create_mesh([("a", 2 * n)]), ckpt)
    events["restore_replicated"] = check_restore(engine, create_mesh([("x", 1), ("y", n)]), ckpt, replicated=True)
    own = os.path.join(directory, f"ckpt-{n}clients")
    save_model(engine, create_mesh([("a", 2 * n)]), own)
    events["own_2x2"] = check_restore(engine, create_mesh([("x", 2), ("y", 2)]), own)


def scenario_failures(engine: Engine, directory: str, events: dict) -> None:
    """A mismatched call, then a client failing while writing; nothing is committed; then a good save."""
    from shardckpt import MismatchedCallError, RemoteClientError, UnsupportedDTypeError

    mesh = create_mesh([("x", 2), ("y", 2)])

    def wrong_shape(g: dict[str, np.ndarray]) -> None:
        if engine.rank == 1:
            g["b"] = np.zeros(6, np.int64)

    expect_failure(engine, events, "mismatch",
                   lambda: save_model(engine, mesh, os.path.join(directory, "bad1"), timeout=30, tamper=wrong_shape),
                   (MismatchedCallError, RemoteClientError))

    def bad_string(g: dict[str, np.ndarray]) -> None:
        if engine.rank == 2:  # device 2 (x=1, y=0) holds s[2:3, 0:1] alone
            g["s"] = g["s"].copy()
            g["s"][2, 0] = 12345

    own = UnsupportedDTypeError if engine.rank == 2 else RemoteClientError
    expect_failure(engine, events, "write_error",
                   lambda: save_model(engine, mesh, os.path.join(directory, "bad2"), timeout=30, tamper=bad_string),
                   (own,))
    # The group is still usable: a good save and restore right after.
    save_model(engine, mesh, os.path.join(directory, "good"), timeout=30)
    events["good"] = check_restore(engine, mesh, os.path.join(directory, "good"))


ABSENT_TIMEOUT = 5.0


def scenario_absent(engine: Engine, directory: str, events: dict) -> None:
    """The last client never calls sharded_save; the others time out naming it."""
    from shardckpt import ClientTimeoutError

    absent = engine.size - 1
    marker = os.path.join(os.environ["WORKER_RESULTS"], "done-{}")
    if engine.rank == absent:
        # Stay alive (so this is a late client, not a dead one) until the others have given up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(os.path.exists(marker.format(r)) for r in range(absent)):
            time.sleep(0.05)
        events["absent"] = True
        return
    try:
        exc = expect_failure(engine, events, "timeout",
                             lambda: save_model(engine, create_mesh([("x", 2), ("y", 2)]),
                                                os.path.join(directory, "new"), timeout=ABSENT_TIMEOUT),
                             (ClientTimeoutError,))
        assert f"[{absent}]" in str(exc), str(exc)
    finally:
        Path(marker.format(engine.rank)).touch()


def scenario_host_dies(engine: Engine, directory: str, events: dict) -> None:
    """torch: rank 0 (the store's host) dies; the others get a CoordinationError at once, not a timeout."""
    from shardckpt import ClientTimeoutError, CoordinationError

    engine.coordinator.barrier("everyone-up", 60)
    if engine.rank == 0:
        time.sleep(0.5)
        os._exit(0)
    exc = expect_failure(engine, events, "host_died",
                         lambda: save_model(engine, create_mesh([("x", 2), ("y", 2)]),
                                            os.path.join(directory, "new"), timeout=60),
                         (CoordinationError,))
    assert not isinstance(exc, ClientTimeoutError), str(exc)
    assert events["host_died"]["elapsed"] < 20, events["host_died"]


SCENARIOS: dict[str, Callable[[Engine, str, dict], None]] = {
    "save-restore": scenario_save_restore,
    "restore": scenario_restore,
    "failures": scenario_failures,
    "absent": scenario_absent,
    "host-dies": scenario_host_dies,
}


def scenario_client_dies(engine: Engine, directory: str, events: dict) -> None:
    """Key-value engines (jax, tf): the last client is SIGKILLed after start-up; the others time out naming it."""
    from shardckpt import ClientTimeoutError

    dead = engine.size - 1
    engine.extra["dead"] = [dead]
    engine.coordinator.barrier("everyone-up", 60)
    if engine.rank == dead:
        os.kill(os.getpid(), signal.SIGKILL)
    exc = expect_failure(engine, events, "timeout",
                         lambda: save_model(engine, create_mesh([("x", 2), ("y", 2)]),
                                            os.path.join(directory, "new"), timeout=ABSENT_TIMEOUT),
                         (ClientTimeoutError,))
    assert f"[{dead}]" in str(exc), str(exc)


SCENARIOS["client-dies"] = scenario_client_dies

LATE_TIMEOUT = 3.0


def scenario_late(engine: Engine, directory: str, events: dict) -> None:
    """Client 1 is late past the timeout in one save (it sleeps at a fault point): that save fails on every
    client and leaves nothing, and the next two saves, called together, succeed with the right data."""
    from shardckpt import faults

    mesh = create_mesh([("x", 2), ("y", 2)])
    engine.coordinator.barrier("everyone-up", 60)
    if engine.rank == 1:
        os.environ[faults.ENV] = f"before_barrier_written@1:sleep={LATE_TIMEOUT * 2.5}"
    outcomes = []
    for i, timeout in enumerate((LATE_TIMEOUT, 60.0, 60.0)):
        t = time.monotonic()
        try:
            save_model(engine, mesh, os.path.join(directory, f"late-{i}"), timeout=timeout)
            outcomes.append({"outcome": "ok", "elapsed": time.monotonic() - t})
        except shardckpt.CheckpointError as exc:
            outcomes.append({"outcome": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - t})
        os.environ.pop(faults.ENV, None)
    events["late"] = outcomes


SCENARIOS["late"] = scenario_late


def scenario_kv_edges(engine: Engine, directory: str, events: dict) -> None:
    """Key-value engines (jax, tf): binary and large payloads, empty ones, and a timeout of 0 both ways."""
    from shardckpt import ClientTimeoutError

    coord, rank, n = engine.coordinator, engine.rank, engine.size
    coord.barrier("start", 60)
    payload = bytes([0, 255, 0, rank]) + "ü".encode() + b"\x00" * 3
    assert coord.all_gather(payload, "binary", 30) == [bytes([0, 255, 0, r]) + "ü".encode() + b"\x00" * 3
                                                       for r in range(n)]
    assert coord.all_gather(b"", "empty", 30) == [b""] * n
    for size in (1 << 20, 6 << 20):  # sharded_save's "written" gather carries every index entry of a client
        big = np.random.default_rng(rank).integers(0, 256, size, dtype=np.uint8).tobytes()
        got = coord.all_gather(big, f"big-{size}", 60)
        assert [len(g) for g in got] == [size] * n
        assert all(g == np.random.default_rng(r).integers(0, 256, size, dtype=np.uint8).tobytes()
                   for r, g in enumerate(got))
    events["big"] = True
    # Timeout 0, nobody else there yet: fails at once, naming everyone else.
    marker = os.path.join(os.environ["WORKER_RESULTS"], "kv-{}-{}")
    if rank == 0:
        t = time.monotonic()
        try:
            coord.all_gather(b"early", "zero-early", 0)
            raise AssertionError("a gather with timeout 0 succeeded before the others posted")
        except ClientTimeoutError as exc:
            events["zero_early"] = {"message": str(exc), "elapsed": time.monotonic() - t}
            assert f"{list(range(1, n))}" in str(exc), str(exc)
        Path(marker.format("early", 0)).touch()
    else:
        while not os.path.exists(marker.format("early", 0)):
            time.sleep(0.02)
        # Client 0 gave up on that gather and said so: the others fail too (one outcome), at once.
        try:
            coord.all_gather(b"late", "zero-early", 30)
            raise AssertionError("a gather client 0 abandoned succeeded on another client")
        except ClientTimeoutError as exc:
            assert f"{list(range(1, n))}" in str(exc), str(exc)
    # Timeout 0, everybody else already posted: succeeds.
    if rank == 0:
        while not all(os.path.exists(marker.format("late", r)) for r in range(1, n)):
            time.sleep(0.02)
        time.sleep(0.5)  # for engines without a store (MPI), let the messages arrive
        assert coord.all_gather(b"0", "zero-late", 0) == [str(r).encode() for r in range(n)]
    else:
        from shardckpt.coordination import KeyValueCoordinator

        kv = getattr(coord, "_impl", coord)  # torch wraps its store-backed coordinator
        if isinstance(kv, KeyValueCoordinator):
            store_set = kv._set

            def set_then_mark(key: str, value: bytes) -> None:  # tells client 0 once the key is in the store
                store_set(key, value)
                if key.endswith(f"/in/{rank}"):  # this client's part of the gather is in the store
                    Path(marker.format("late", rank)).touch()

            kv._set = set_then_mark  # type: ignore[method-assign]
            assert coord.all_gather(str(rank).encode(), "zero-late", 30) == [str(r).encode() for r in range(n)]
            kv._set = store_set  # type: ignore[method-assign]
        else:  # MPI: messages are sent when the call starts; client 0 waits a moment after the marker
            Path(marker.format("late", rank)).touch()
            assert coord.all_gather(str(rank).encode(), "zero-late", 30) == [str(r).encode() for r in range(n)]
    coord.barrier("end", 60)
    events["zero_late"] = True


SCENARIOS["kv-edges"] = scenario_kv_edges


def _chain(*names: str) -> Callable[[Engine, str, dict], None]:
    """Several scenarios in one start-up of the clients (TF's start-up is the slow part of a run)."""

    def run(engine: Engine, directory: str, events: dict) -> None:
        for name in names:
            SCENARIOS[name](engine, directory, events)

    return run


SCENARIOS["save-restore+kv-edges"] = _chain("save-restore", "kv-edges")


def own_tcp_sockets() -> list[tuple[str, list[str]]]:
    """This process's TCP sockets, listening or connected: (table, its row's columns) from the kernel's tables
    for every socket among its fds (Linux /proc; [] elsewhere)."""
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        found.extend((table, cols) for cols in (row.split() for row in rows) if cols[9] in inodes)
    return found


def non_loopback_listeners() -> list[str]:
    """This process's listening TCP sockets bound to anything but loopback (Linux /proc; [] elsewhere)."""
    bad = []
    for table, cols in own_tcp_sockets():
        local, state = cols[1], cols[3]
        if state != "0A":  # 0A: LISTEN
            continue
        addr = local.split(":")[0]
        loopback = (addr.endswith("7F") if len(addr) == 8  # 127.x.x.x, little-endian hex
                    else addr in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F"))
        if not loopback:
            bad.append(f"{table}: {local}")
    return bad


def main(argv: list[str]) -> int:
    engine_name, scenario, directory = argv[1:4]
    results = os.environ["WORKER_RESULTS"]
    t0 = time.time()
    engine = ENGINES[engine_name]()
    print(f"[{engine.rank}] init {time.time() - t0:.2f}", file=sys.stderr, flush=True)
    events: dict[str, Any] = {"engine_class": type(engine.coordinator).__name__}
    ok, failure = True, None
    try:
        assert type(engine.coordinator).__name__ == engine.expected_class, events["engine_class"]
        assert (engine.coordinator.rank, engine.coordinator.size) == (engine.rank, engine.size)
        # "a+b" (unless registered as such): scenario a, then b, in the same start-up of the clients
        for name in [scenario] if scenario in SCENARIOS else scenario.split("+"):
            SCENARIOS[name](engine, directory, events)
        if os.environ.get("WORKER_CHECK_LOOPBACK"):
            assert not non_loopback_listeners(), f"listening beyond loopback: {non_loopback_listeners()}"
    except BaseException:  # noqa: BLE001 - reported to the parent
        ok, failure = False, traceback.format_exc()
        print(f"[client {engine.rank}] {failure}", file=sys.stderr, flush=True)
    with open(os.path.join(results, f"result-{engine.rank}.json"), "w") as f:
        json.dump({"rank": engine.rank, "ok": ok, "events": events, "failure": failure}, f)
    t = time.monotonic()
    engine.finish()
    print(f"[{engine.rank}] finish {time.monotonic() - t:.2f} at {time.time() - t0:.2f}", file=sys.stderr, flush=True)
    return 0 if ok else 1


def write_result(rank: int, ok: bool, events: dict[str, Any], failure: str | None) -> None:
    """``$WORKER_RESULTS/result-RANK.json``, whole or not at all (the parent may read while a rank dies)."""
    path = os.path.join(os.environ["WORKER_RESULTS"], f"result-{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "ok": ok, "events": events, "failure": failure}, f)
    os.replace(path + ".tmp", path)


def torch_worker(run: Callable[[int, dict[str, Any]], None], *, hard_exit: bool = False) -> int:
    """A gloo rank of a test module's own scenario: init, ``run(rank, events)``, the result file, teardown.

    ``hard_exit`` skips the group's teardown (a scenario that killed a peer cannot leave it in order)."""
    rank = int(os.environ["WORKER_RANK"])
    events: dict[str, Any] = {}
    ok, failure = True, None
    engine = None
    try:
        engine = init_torch()
        run(rank, events)
    except BaseException:  # noqa: BLE001 - reported to the parent
        ok, failure = False, traceback.format_exc()
        print(f"[rank {rank}] {failure}", file=sys.stderr, flush=True)
    write_result(rank, ok, events, failure)
    if hard_exit:
        os._exit(0)
    if engine is not None:
        engine.finish()
    return 0 if ok else 1


# --- launch helpers for the test modules ---------------------------------------------------------------


@dataclass
class Run:
    returncodes: list[int]
    results: dict[int, dict]
    output: str
    elapsed: float

    def assert_ok(self, n: int) -> None:
        assert sorted(self.results) == list(range(n)), f"results from {sorted(self.results)}\n{self.output}"
        bad = {r: res["failure"] for r, res in self.results.items() if not res["ok"]}
        assert not bad, f"clients failed: {bad}\n{self.output}"
        assert all(rc == 0 for rc in self.returncodes), f"exit codes {self.returncodes}\n{self.output}"


def _communicate(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int], str]:
    deadline = time.monotonic() + timeout
    outputs, codes, timed_out = [], [], False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, _ = p.communicate()
        outputs.append(out.decode(errors="replace"))
        codes.append(p.returncode)
    text = "\n".join(f"--- process {i} (rc {c}) ---\n{o}" for i, (c, o) in enumerate(zip(codes, outputs)))
    if timed_out:
        raise AssertionError(f"clients did not finish within {timeout} s (killed)\n{text}")
    return codes, text


def _base_env(results: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WORKER_RESULTS": results, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.pop("SHARDCKPT_COORDINATOR", None)  # never pick up a launcher's engine by accident
    return env


def launch_torch(n: int, argv: list[str], env: dict[str, str], timeout: float) -> tuple[list[int], str]:
    """n processes with WORKER_RANK/SIZE; rank 0 inherits a socket already listening on 127.0.0.1."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    procs = []
    try:
        for rank in range(n):
            e = dict(env, WORKER_RANK=str(rank), WORKER_SIZE=str(n), WORKER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                     MASTER_ADDR="127.0.0.1", WORKER_CHECK_LOOPBACK="1")
            fds: tuple[int, ...] = ()
            if rank == 0:
                e["WORKER_LISTEN_FD"] = str(listener.fileno())
                fds = (listener.fileno(),)
            procs.append(subprocess.Popen([sys.executable, *argv], env=e, pass_fds=fds, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    finally:
        listener.close()
    return _communicate(procs, timeout)


def launch_mpi(n: int, argv: list[str], env: dict[str, str], timeout: float) -> tuple[list[int], str]:
    """``mpiexec.gforker`` from the venv's ``mpich`` wheel (next to the interpreter)."""
    mpiexec = Path(sys.executable).parent / "mpiexec.gforker"
    if not mpiexec.exists():
        found = shutil.which("mpiexec.gforker")
        if found is None:
            raise FileNotFoundError("mpiexec.gforker (pip install mpich) is not installed")
        mpiexec = Path(found)
    # gforker itself listens on 127.0.0.1 only, but the ranks' network module (UCX by default in the mpich
    # wheel, or libfabric) opens listeners on the first real interface: pin both to loopback.
    env = dict(env, UCX_NET_DEVICES="lo", FI_TCP_IFACE="lo", FI_SOCKETS_IFACE="lo", WORKER_CHECK_LOOPBACK="1")
    proc = subprocess.Popen([str(mpiexec), "-n", str(n), sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return _communicate([proc], timeout)


LAUNCHERS: dict[str, Callable[[int, list[str], dict[str, str], float], tuple[list[int], str]]] = {
    "torch": launch_torch,
    "mpi": launch_mpi,
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_jax(n: int, argv: list[str], env: dict[str, str], timeout: float) -> tuple[list[int], str]:
    """n processes with WORKER_RANK/SIZE and WORKER_PORT, a free loopback port for JAX's coordinator."""
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True,
                         env=dict(env, WORKER_RANK=str(r), WORKER_SIZE=str(n), WORKER_PORT=str(port),
                                  JAX_PLATFORMS="cpu"))
        for r in range(n)
    ]
    return _communicate(procs, timeout)


_TF_NETNS_SCRIPT = r"""
ip link set lo up || exit 97
pids=()
for ((i = 0; i < WORKER_SIZE; i++)); do
  DTENSOR_CLIENT_ID=$i WORKER_RANK=$i "$@" &
  pids+=($!)
done
for ((i = 0; i < WORKER_SIZE; i++)); do
  wait "${pids[$i]}"
  echo "ENGINE-WORKER-EXIT $i $?"
done
"""


def netns_works() -> bool:
    """Whether this machine lets us make a private network namespace (TF's servers bind every interface)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    cmd = [unshare, "-n"] if os.geteuid() == 0 else [unshare, "-rn"]
    try:
        return subprocess.run([*cmd, "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def launch_tf(n: int, argv: list[str], env: dict[str, str], timeout: float) -> tuple[list[int], str]:
    """n DTensor clients inside one private network namespace (``unshare -n``, root or user namespaces):
    TF's gRPC servers bind 0.0.0.0 and no setting changes that, so nothing but the namespace's loopback
    is reachable.  Returns each client's exit status (negative for a signal, as Popen does)."""
    jobs = ",".join(f"127.0.0.1:{23400 + i}" for i in range(n))  # the namespace is private: fixed ports are free
    unshare = shutil.which("unshare")
    if unshare is None:
        raise FileNotFoundError("unshare (util-linux) is not installed")
    env = dict(env, WORKER_SIZE=str(n), DTENSOR_JOBS=jobs, DTENSOR_JOB_NAME="worker", DTENSOR_NUM_CLIENTS=str(n),
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    prefix = [unshare, "-n"] if os.geteuid() == 0 else [unshare, "-rn"]
    proc = subprocess.Popen([*prefix, "bash", "-c", _TF_NETNS_SCRIPT, "engine-worker", sys.executable, *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    (code,), output = _communicate([proc], timeout)
    codes: dict[int, int] = {}
    for line in output.splitlines():
        if line.startswith("ENGINE-WORKER-EXIT "):
            _, rank, rc = line.split()
            codes[int(rank)] = 128 - int(rc) if int(rc) > 128 else int(rc)  # bash reports a signal as 128+N
    if sorted(codes) != list(range(n)):
        raise AssertionError(f"the namespace launcher failed (rc {code}) before every client ran\n{output}")
    return [codes[r] for r in range(n)], output


LAUNCHERS.update(jax=launch_jax, tf=launch_tf)


def run_clients(engine: str, n: int, scenario: str, directory: str | os.PathLike[str], *, timeout: float = 60,
                env: dict[str, str] | None = None) -> Run:
    """Run SCENARIO on n clients of ENGINE; every client's result file, by rank."""
    results = tempfile.mkdtemp(prefix="shardckpt-results-")
    try:
        full_env = _base_env(results)
        full_env.update(env or {})
        t = time.monotonic()
        codes, output = LAUNCHERS[engine](n, [str(WORKER), engine, scenario, os.fspath(directory)], full_env,
                                          timeout)
        elapsed = time.monotonic() - t
        out = {}
        for name in os.listdir(results):
            if name.startswith("result-"):
                with open(os.path.join(results, name)) as f:
                    res = json.load(f)
                out[res["rank"]] = res
        return Run(codes, out, output, elapsed)
    finally:
        remove_recorded_shared_memory(results)  # the job's processes are all gone by now
        shutil.rmtree(results, ignore_errors=True)


# --- test modules that are their own JAX workers (test_adapter_jax, test_orbax) -------------------------------
# Such a module runs as ``python MODULE SCENARIO DIR`` in each process: its ``__main__`` calls `jax_worker_main`,
# which writes ``DIR/result-SCENARIO-RANK.json``; its tests start the processes and read those with
# `run_jax_workers`.


def jax_worker_main(argv: list[str], scenarios: dict[str, Callable[[str, dict[str, Any]], None]], *,
                    setup: Callable[[], None] = lambda: None) -> int:
    """Run scenario ``argv[0]`` in directory ``argv[1]`` in this process; ``setup`` runs once JAX is up.

    Exits 0 when the scenario passed; the result file says how it went either way."""
    scenario, directory = argv
    rank, size = int(os.environ.get("WORKER_RANK", "0")), int(os.environ.get("WORKER_SIZE", "1"))
    t0 = time.time()
    import jax

    if size > 1:
        jax_distributed_initialize(rank, size)
    setup()
    events: dict[str, Any] = {"init_seconds": time.time() - t0}
    ok, failure = True, None
    try:
        scenarios[scenario](directory, events)
    except BaseException:  # noqa: BLE001 - reported to the parent
        ok, failure = False, traceback.format_exc()
        print(f"[process {rank}] {failure}", file=sys.stderr, flush=True)
    events["total_seconds"] = time.time() - t0
    with open(os.path.join(directory, f"result-{scenario}-{rank}.json"), "w") as f:
        json.dump({"ok": ok, "events": events, "failure": failure}, f)
    if size > 1:
        jax.distributed.shutdown()  # a barrier of every process: the service host leaves last
    return 0 if ok else 1


def with_error(events: dict[str, Any], key: str, fn: Callable[[], object]) -> None:
    """``events[key]``: the type and message of what ``fn()`` raised, or None when it returned."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        events[key] = {"type": type(exc).__name__, "message": str(exc)}
    else:
        events[key] = None


def run_jax_workers(script: str | os.PathLike[str], scenario: str, directory: Path, processes: int, devices: int,
                    *, timeout: float, expect_rc: int = 0, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``python SCRIPT SCENARIO DIRECTORY`` in ``processes`` processes of ``devices`` CPU devices each.

    Each process has a session of its own (so a hang is killed with whatever it started) and writes its output
    to a log file in ``directory``; past ``timeout`` every process group is killed and the run fails.  Returns
    the processes' results by process id.  With ``expect_rc`` other than 0, every process must exit with it
    and none may have reported.  The logs and result files are removed."""
    base = dict(os.environ)
    base.pop("SHARDCKPT_COORDINATOR", None)  # never pick up a launcher's engine by accident
    base.pop("SHARDCKPT_FAULT", None)  # faults are injected only where a test asks for them (``env``)
    base.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                 "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "WORKER_SIZE": str(processes),
                 "WORKER_PORT": str(_free_port()), "TF_CPP_MIN_LOG_LEVEL": "2"})
    base.update(env or {})
    logs = [directory / f"log-{scenario}-{r}.txt" for r in range(processes)]
    procs = []
    for r in range(processes):
        with open(logs[r], "wb") as out:
            procs.append(subprocess.Popen([sys.executable, os.fspath(script), scenario, str(directory)], stdout=out,
                                          stderr=subprocess.STDOUT, env=dict(base, WORKER_RANK=str(r)),
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            p.wait()
    output = "\n".join(f"--- process {r} (rc {p.returncode}) ---\n{logs[r].read_text(errors='replace')[-6000:]}"
                       for r, p in enumerate(procs))
    for log in logs:
        log.unlink()
    assert not timed_out, f"{scenario}: processes did not finish within {timeout} s (killed)\n{output}"
    codes = [p.returncode for p in procs]
    paths = [directory / f"result-{scenario}-{r}.json" for r in range(processes)]
    if expect_rc != 0:
        assert codes == [expect_rc] * processes, output
        assert not [path for path in paths if path.exists()], output
        return []
    results = []
    for r, path in enumerate(paths):
        assert path.exists(), f"{scenario}: process {r} reported nothing\n{output}"
        results.append(json.loads(path.read_text()))
        path.unlink()
    bad = {r: res["failure"] for r, res in enumerate(results) if not res["ok"]}
    assert not bad, f"{scenario}: processes failed: {bad}\n{output}"
    assert codes == [0] * processes, output
    return results


_TF_READER_SCRIPT = """
import sys, json, numpy as np, tensorflow as tf
r = tf.train.load_checkpoint(sys.argv[1])
dtypes = {k: v.name for k, v in r.get_variable_to_dtype_map().items()}
arrays = {}
for k in dtypes:
    a = np.asarray(r.get_tensor(k))
    arrays[k.replace('/', '|')] = a.view(np.uint16) if dtypes[k] == 'bfloat16' else a
np.savez(sys.argv[2], **arrays)
print(json.dumps(dtypes))
"""


def tensorflow_reads(prefix: str | os.PathLike[str], scratch: Path, *, timeout: float
                     ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """What ``tf.train.load_checkpoint(prefix)`` reads: each tensor's TF dtype name and value, by name.

    TensorFlow runs in a process of its own (the test process may hold JAX's runtime); bfloat16 values come back
    as their uint16 bits, for a bit-exact comparison.  ``scratch`` is a directory for the hand-over file."""
    out = scratch / "tf.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _TF_READER_SCRIPT, os.fspath(prefix), str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dtypes = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as arrays:
        values = {name.replace("|", "/"): arrays[name] for name in arrays.files}
    out.unlink()
    return dtypes, values


def check_committed(directory: str | os.PathLike[str], base: str, num_clients: int) -> None:
    """``directory/base`` is a complete checkpoint of `model_globals` written by num_clients, with no staging left."""
    names = sorted(n for n in os.listdir(directory) if n.startswith(base + "."))
    want = [f"{base}.data-{r:05d}-of-{num_clients:05d}{side}" for r in range(num_clients)
            for side in ("", ".crc32c")] + [f"{base}.index"]
    assert names == sorted(want), names
    g = model_globals()
    with shardckpt.load_checkpoint(os.path.join(directory, base)) as reader:
        assert sorted(reader.get_variable_to_shape_map()) == sorted(g)
        for name, value in g.items():
            got = reader.get_tensor(name)
            assert got.shape == value.shape and got.dtype == value.dtype, (name, got.shape, got.dtype)
            assert got.tolist() == value.tolist(), (name, got, value)


def check_save_restore(run: Run, directory: str | os.PathLike[str], engine_class: str) -> None:
    """What `scenario_save_restore` must show: 4 clients found ``engine_class`` with ``resolve(None)``, saved
    together, and each restore checked every local shard (8 targets, one device per client on a 4-device mesh)."""
    run.assert_ok(4)
    for result in run.results.values():
        events = result["events"]
        assert events["engine_class"] == engine_class
        assert events["save"]["clients"] == 4
        assert [events[k] for k in ("restore_same", "restore_1d", "restore_4x1", "restore_replicated")] == [8] * 4
    check_committed(directory, "ckpt", 4)


def assert_timeouts_name(run: Run, missing: int, n: int) -> None:
    """Every client but ``missing`` timed out naming it, after the save's timeout (`ABSENT_TIMEOUT`)."""
    for rank in range(n):
        if rank == missing:
            continue
        event = run.results[rank]["events"]["timeout"]
        assert event["type"] == "ClientTimeoutError", event
        assert f"clients [{missing}] of {n}" in event["message"], event
        assert 4.9 <= event["elapsed"] < 10, event  # timeout=5: not early, not much later


def check_client_dies(run: Run, directory: str | os.PathLike[str]) -> None:
    """What `scenario_client_dies` must show: client 3 was killed, the others named it and left nothing."""
    assert run.returncodes == [0, 0, 0, -9], run.output
    assert sorted(run.results) == [0, 1, 2], run.output
    assert all(run.results[r]["ok"] for r in range(3)), run.output
    assert_timeouts_name(run, 3, 4)
    assert_nothing_left(directory, "new")


def check_late(run: Run, directory: str | os.PathLike[str], n: int = 4) -> None:
    """What `scenario_late` must show: the late save failed on every client and left nothing; the next two
    succeeded on every client with the right data; nobody waited past the late client's sleep plus the slack."""
    run.assert_ok(n)
    outcomes = [[o["outcome"] for o in run.results[r]["events"]["late"]] for r in range(n)]
    assert all(o[0] != "ok" for o in outcomes) and all(o[1:] == ["ok", "ok"] for o in outcomes), outcomes
    assert not [name for name in os.listdir(directory) if name.startswith("late-0.")]
    for i in (1, 2):
        check_committed(directory, f"late-{i}", n)
    first = max(run.results[r]["events"]["late"][0]["elapsed"] for r in range(n))
    assert first < LATE_TIMEOUT * 2.5 + 10 + 5, first


def assert_nothing_left(directory: str | os.PathLike[str], *bases: str) -> None:
    """No file of a failed save: no index, no data file, no staging file for any of ``bases``."""
    left = [n for n in os.listdir(directory) if any(n.startswith(b + ".") for b in bases) or ".staging-" in n]
    assert not left, left


def snapshot(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file directly in ``directory``, by name, with its bytes."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv))
