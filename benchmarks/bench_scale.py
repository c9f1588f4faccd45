"""How a save's coordination cost grows with the client count: real processes, and a simulation up to thousands.

Usage::

    python benchmarks/bench_scale.py real [--sizes 8,16,32,64,128] [--reps 3] [--tensors 100] [--only sc,dcp]
                                          [--start fork|exec] [--rounds R] [--json real.json]
    python benchmarks/bench_scale.py sim [--sizes 8,...,4096] [--tensors 1000,100000] [--max-slices M]
                                         [--json sim.json] [--profile DIR]
    python benchmarks/bench_scale.py report --real real.json --sim sim.json [--output BENCHMARKS.md]

``real``: for each N (ascending), ``shardckpt launch -n N`` runs N client processes of this file that save T small
row-sharded float32 tensors (``[N*ROWS, COLS]``, ``ROWS x COLS`` per client) with ``durable=False``, and the same
T tensors are saved by N torch.distributed processes (gloo over a TCPStore on 127.0.0.1) with PyTorch DCP
(``FileSystemWriter(path, sync_files=False)``), in the same run.  Each launch does one untimed warm-up save and
then ``--reps`` timed saves; client 0 times each save between two barriers; the median is reported.  Output goes
to a directory on /dev/shm (page cache, no disk) and is deleted.  ``--rounds R`` repeats the launches R times,
alternating the systems at each N (sc, dcp, sc, dcp, ...); the median is over every round's timed saves.

How the N processes start (``--start``; outside the timed region either way, which begins after every client
has passed a barrier):

- ``fork`` (the default): one "zygote" per launch imports numpy, torch, torch.distributed, its DCP modules and
  shardckpt once, checks it still has a single thread, then forks the N ranks, which share its pages
  copy-on-write.  Both systems start this way.  A shardckpt rank gets the environment ``shardckpt launch`` would
  give it from the launcher's own coordinator (`KVServer`, run by this driver); a DCP rank gets ``RANK`` and
  ``WORLD_SIZE`` and makes its process group over a TCPStore on 127.0.0.1, as before.  128 separate
  python+torch processes do not fit in 24 GiB; 128 forked ones do.
- ``exec``: ``shardckpt launch -n N python bench_scale.py ...`` for shardckpt and one ``python`` process per rank
  for DCP, each importing what it needs itself.

After the last timed save, client 0 sums the proportional set size (PSS, from ``/proc/PID/smaps_rollup``) of
every rank and of their parent (the zygote, the launcher, or this driver for ``exec`` DCP) while they all wait at
a barrier, and reads ``MemAvailable``: the memory a launch really holds, shared pages counted once (not the
coordinator's: for ``fork`` shardckpt, that is this driver).

``sim``: the real code of the root (client 0) and of one ordinary client (client 1) runs ``sharded_save`` in two
threads against N-2 simulated clients, all over one in-memory key-value store (`SimCoordinator`, a
`KeyValueCoordinator`).  The simulated clients run the real session code (`_KVSession`: the same keys, parts and
values as a real client) with payloads the real encoders made: the agreement payload and digest from save's own
`_describe`, and each client's index entries by `_entries_for` and `pack_entries` over its own boxes and shard
id.  Their data files are hard links to one data file written by the real `write_data_file` (every client holds
the same values, so every data file has the same bytes) and the result is a complete checkpoint, checked by
reading it back.  Every store operation is counted (a "message": a request and its answer, as over the
launcher's TCP protocol) with its bytes on the wire (the launcher's framing), by collective and by client.  CPU
time is ``time.thread_time`` of the client's thread.  The root's local planning (`_normalize` and `plan_save`,
rewritten elsewhere) is timed apart on the same inputs, so coordination and merge stand on their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sections import write_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROWS, COLS = 1, 16  # one client's shard of every tensor: 1 x 16 float32 = 64 bytes
WAIT = 600.0  # every save and barrier timeout: 128 processes on 2 cores are slow, never stuck
START = "<!-- bench_scale:start -->"
END = "<!-- bench_scale:end -->"


def _scratch() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix="bench-scale-", dir=base)


def tensor_name(k: int) -> str:
    return f"layer{k // 10}/w{k % 10}"


def shard_value(k: int) -> np.ndarray:
    """Client-independent values, so every client's data file has the same bytes (the simulation relies on it)."""
    return np.full((ROWS, COLS), float(k), dtype=np.float32)


# --- real processes -------------------------------------------------------------------------------------


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _faults() -> int:
    """Page faults of this process so far: a forked rank's copy-on-write breaks of the zygote's pages are among
    the minor ones, so a save's count bounds what sharing those pages cost it."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def group_memory() -> dict[str, Any]:
    """Client 0's view of the launch's memory: PSS of its parent and of the parent's other children (the
    ranks), and the machine's MemAvailable.  Shared pages are split between their sharers, so the sum is what
    the launch holds."""
    parent = os.getppid()
    ranks = _children(parent)
    rank_kib = []
    for pid in ranks:
        try:
            rank_kib.append(_pss_kib(pid))
        except FileNotFoundError:  # exited between the listing and the read: it holds nothing now
            pass
    available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1])
    return {"processes": len(rank_kib), "ranks_pss_mib": sum(rank_kib) / 1024,
            "max_rank_pss_mib": max(rank_kib) / 1024, "parent_pss_mib": _pss_kib(parent) / 1024,
            "mem_available_mib": available / 1024}


def _worker_sc(args: argparse.Namespace) -> dict[str, Any]:
    import shardckpt as sc
    from shardckpt.coordination import LauncherCoordinator

    coord = LauncherCoordinator.from_env()
    n, rank = coord.size, coord.rank
    mesh = sc.create_mesh([("x", n)])
    lay = sc.Layout(["x", "unsharded"], mesh)
    names = [tensor_name(k) for k in range(args.tensors)]
    tensors = [sc.DTensor((n * ROWS, COLS), np.float32, lay, {rank: shard_value(k)}) for k in range(args.tensors)]
    times: list[float] = []
    phases: list[dict[str, float]] = []
    faults: list[int] = []
    for rep in range(args.reps + 1):
        prefix = os.path.join(args.dir, f"sc-{rep}", "ckpt")
        coord.barrier("start", WAIT)
        f0 = _faults()
        t = time.perf_counter()
        res = sc.sharded_save(mesh, prefix, names, [""] * len(names), tensors, coordinator=coord, timeout=WAIT,
                              durable=False)
        dt = time.perf_counter() - t
        f1 = _faults()
        coord.barrier("end", WAIT)
        if rep:  # the first is a warm-up
            times.append(dt)
            phases.append(res.timings)
            faults.append(f1 - f0)
        if rank == 0:
            if rep == 0:
                with sc.BundleReader(prefix) as r:  # a complete checkpoint: every client's slice is there
                    got = r.read(tensor_name(args.tensors - 1))
                    assert got.shape == (n * ROWS, COLS) and float(got.min()) == float(args.tensors - 1)
            shutil.rmtree(os.path.dirname(prefix))
    memory = group_memory() if rank == 0 else None  # every other client is alive, waiting here
    coord.barrier("memory", WAIT)
    coord.close()
    return {"times": times, "phases": phases, "memory": memory, "faults": faults}


def _worker_dcp(args: argparse.Namespace) -> dict[str, Any]:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    port = int(os.environ["BENCH_PORT"])
    if rank == 0:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        store = dist.TCPStore("127.0.0.1", port, n, is_master=True, timeout=timedelta(seconds=WAIT),
                              master_listen_fd=sock.fileno())
    else:
        store = dist.TCPStore("127.0.0.1", port, n, is_master=False, timeout=timedelta(seconds=WAIT))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=n,
                            timeout=timedelta(seconds=WAIT))
    mesh = init_device_mesh("cpu", (n,))
    sd = {tensor_name(k): DTensor.from_local(torch.from_numpy(shard_value(k)), mesh, [Shard(0)], run_check=False,
                                             shape=torch.Size((n * ROWS, COLS)), stride=(COLS, 1))
          for k in range(args.tensors)}
    times: list[float] = []
    faults: list[int] = []
    for rep in range(args.reps + 1):
        path = os.path.join(args.dir, f"dcp-{rep}")
        dist.barrier()
        f0 = _faults()
        t = time.perf_counter()
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, sync_files=False))
        dt = time.perf_counter() - t
        f1 = _faults()
        dist.barrier()
        if rep:
            times.append(dt)
            faults.append(f1 - f0)
        if rank == 0:
            shutil.rmtree(path)
    memory = group_memory() if rank == 0 else None  # every other rank is alive, waiting here
    dist.barrier()
    dist.destroy_process_group()
    return {"times": times, "memory": memory, "faults": faults}


def worker_main(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("SHARDCKPT_RANK", os.environ.get("RANK", "0")))
    if os.environ.get("BENCH_FAIL_RANK") == str(rank):  # the tests' fault point: this rank never joins
        return 7
    out = (_worker_sc if args.worker == "sc" else _worker_dcp)(args)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    return 0


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _rehearse(args: argparse.Namespace) -> list[str]:
    """The modules the worker imports lazily (DCP's first save imports some 200 of torch's), found by one
    single-client run in a throwaway child: imported in the zygote, their pages are shared by every rank too."""
    import traceback

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 1
        try:
            before = set(sys.modules)
            one = argparse.Namespace(**{**vars(args), "reps": 0, "dir": os.path.join(args.dir, "rehearsal")})
            os.makedirs(one.dir)
            if args.worker == "sc":
                from shardckpt.coordination.launcher import KVServer

                os.environ.update(KVServer("127.0.0.1", 0, size=1).start().env(0))
                _worker_sc(one)
            else:
                os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "BENCH_PORT": str(_free_port())})
                _worker_dcp(one)
            shutil.rmtree(one.dir)
            with os.fdopen(write, "w") as f:
                json.dump(sorted(set(sys.modules) - before), f)
            code = 0
        except BaseException:  # noqa: BLE001 - reported; the zygote goes on without the list
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, raw = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(raw) != 0 or not text:
        raise RuntimeError(f"zygote: the one-client rehearsal of {args.worker} failed")
    return list(json.loads(text))


def zygote_main(args: argparse.Namespace) -> int:
    """Import what both workers need once, then fork one rank per environment read from stdin (a JSON list).

    The fork comes before any thread exists (torch's pools, gloo, a coordinator's): a child of a threaded
    process may inherit a lock some other thread held.  A failing rank makes the others be killed, and the
    zygote exits with its status, as ``shardckpt launch`` does.
    """
    import traceback

    import torch  # noqa: F401 - imported for the children, before the fork
    import torch.distributed  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    import shardckpt  # noqa: F401
    import shardckpt.coordination  # noqa: F401

    envs = json.load(sys.stdin)
    for name in _rehearse(args):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that cannot be imported by name (a C extension's stub)
            pass
    if _threads() != 1:
        print(f"zygote: {_threads()} threads before the fork; refusing to fork", file=sys.stderr, flush=True)
        return 3
    # The imported modules' objects go to the permanent generation: the children's collections then never
    # write their headers, which would copy every page of the zygote's heap into every child.
    gc.freeze()
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, int] = {}
    for rank, env in enumerate(envs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(env)
                code = worker_main(args)
            except BaseException:  # noqa: BLE001 - reported, then the child's status says it failed
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks[pid] = rank
    status = 0
    while ranks:
        pid, raw = os.wait()
        code = os.waitstatus_to_exitcode(raw)
        rank = ranks.pop(pid)
        if code != 0 and status == 0:
            print(f"zygote: rank {rank} exited with status {code}; killing the others", file=sys.stderr, flush=True)
            status = code if code > 0 else 1
            for other in ranks:
                os.kill(other, signal.SIGKILL)
    return status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = os.path.join(ROOT, "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env["OMP_NUM_THREADS"] = "1"  # 128 processes on 2 cores: no per-process thread pools
    env["MKL_NUM_THREADS"] = "1"
    return env


def run_real(system: str, n: int, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """One launch of ``n`` processes: warm-up plus ``args.reps`` timed saves; client 0's times."""
    out = os.path.join(workdir, f"result-{system}-{n}.json")
    data = os.path.join(workdir, f"data-{system}-{n}")
    os.makedirs(data, exist_ok=True)
    me = [sys.executable, "-u", os.path.abspath(__file__), "--worker", system, "--dir", data, "--out", out,
          "--tensors", str(args.tensors), "--reps", str(args.reps)]
    env = _env()
    t = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    server = None
    try:
        if args.start == "fork":
            if system == "sc":
                from shardckpt.coordination.launcher import KVServer

                # The coordinator `shardckpt launch` runs, and the environment it gives each client.
                server = KVServer("127.0.0.1", 0, size=n).start()
                envs = [server.env(r) for r in range(n)]
            else:
                port = str(_free_port())
                envs = [{"RANK": str(r), "WORLD_SIZE": str(n), "BENCH_PORT": port} for r in range(n)]
            # Its own session, so that a timeout kills the ranks too (the process group).
            zygote = subprocess.Popen([*me, "--zygote"], env=env, stdin=subprocess.PIPE, start_new_session=True)
            procs = [zygote]
            assert zygote.stdin is not None
            zygote.stdin.write(json.dumps(envs).encode())  # the ranks' keys never touch a file
            zygote.stdin.close()
        elif system == "sc":
            procs = [subprocess.Popen([sys.executable, "-m", "shardckpt", "launch", "-n", str(n), *me], env=env)]
        else:
            env["BENCH_PORT"] = str(_free_port())
            procs = [subprocess.Popen(me, env={**env, "RANK": str(r), "WORLD_SIZE": str(n)}) for r in range(n)]
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        codes = [p.poll() for p in procs]
        if any(c != 0 for c in codes):
            bad = sorted({c for c in codes if c != 0}, key=str)
            raise RuntimeError(f"{system} N={n}: exit statuses {bad} after {time.monotonic() - t:.0f} s")
        with open(out) as f:
            result = json.load(f)
        os.unlink(out)
    finally:
        for p in procs:
            if p.poll() is None:
                if args.start == "fork":
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()
        if server is not None:
            server.stop()
        shutil.rmtree(data, ignore_errors=True)
    result["wall"] = time.monotonic() - t
    result["median"] = statistics.median(result["times"])
    return result


def _combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One system at one N over its rounds: the median of every timed save of the rounds that finished."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[-1]["error"], "rounds": rounds}
    times = [x for r in ok for x in r["times"]]
    mems = [r["memory"] for r in ok if r.get("memory")]
    out: dict[str, Any] = {"times": times, "median": statistics.median(times), "rounds": rounds}
    if mems:
        out["memory"] = max(mems, key=lambda m: m["ranks_pss_mib"] + m["parent_pss_mib"])
    return out


def cmd_real(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sizes.split(",")]
    systems = args.only.split(",")
    workdir = _scratch()
    results: dict[str, dict[str, Any]] = {s: {} for s in systems}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results.update(json.load(f).get("results", {}))
    try:
        for n in sorted(sizes):
            rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
            for k in range(args.rounds):
                for system in systems:  # alternating: sc, dcp, sc, dcp, ... at each N
                    load = os.getloadavg()[0]
                    try:
                        r = run_real(system, n, args, workdir)
                    except RuntimeError as exc:
                        print(f"{exc}", flush=True)
                        r = {"error": str(exc)}
                    r["load_before"] = load
                    rounds[system].append(r)
                    results.setdefault(system, {})[str(n)] = _combine(rounds[system])
                    if "error" not in r:
                        mem = r.get("memory") or {}
                        print(f"{system:4} N={n:4} round {k + 1}: median {r['median']:.3f} s  "
                              f"{[round(x, 3) for x in r['times']]} (launch wall {r['wall']:.0f} s, load "
                              f"{load:.1f}; PSS ranks {mem.get('ranks_pss_mib', 0):.0f} MiB + parent "
                              f"{mem.get('parent_pss_mib', 0):.0f} MiB, MemAvailable "
                              f"{mem.get('mem_available_mib', 0):.0f} MiB)", flush=True)
                    if args.json:
                        _dump(args.json, {"machine": machine_info(), "tensors": args.tensors, "reps": args.reps,
                                          "rounds": args.rounds, "start": args.start, "results": results})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# --- simulation ------------------------------------------------------------------------------------------


def _step_of(key: str) -> tuple[int, str]:
    """(session, step) of a store key ``ns/session/step[~part][/rank]``."""
    parts = key.split("/")
    return int(parts[1]), parts[2].split("~", 1)[0]


@dataclasses.dataclass
class Tally:
    ops: int = 0
    sent: int = 0  # request bytes on the wire (launcher framing)
    received: int = 0  # answer bytes on the wire


class SimStore:
    """One dictionary with blocking reads, counting every operation by (session, step) and by client class."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.lock = threading.Lock()
        self.tally: dict[tuple[str, int, str], Tally] = defaultdict(Tally)
        self.counting = True

    def count(self, who: str, key: str, sent: int, received: int) -> None:
        if not self.counting:
            return
        session, step = _step_of(key)
        with self.lock:
            t = self.tally[(who, session, step)]
            t.ops += 1
            t.sent += sent
            t.received += received

    def wait_for(self, key: str, deadline: float) -> bytes | None:
        with self.cond:
            while key not in self.data:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.data[key]


def _sim_classes() -> type:
    from shardckpt.coordination.base import KeyValueCoordinator

    class _Sim(KeyValueCoordinator):
        """A client of `SimStore`: the real session code over an in-memory store, every operation counted.

        The request and answer sizes are those of the launcher's protocol: op(1) | u32 klen | key | u32 vlen |
        value, and status(1) | u32 vlen | value.
        """

        engine = "simulated store"

        def __init__(self, store: SimStore, rank: int, size: int, who: str) -> None:
            super().__init__(rank, size)
            self.store, self.who = store, who

        def _set(self, key: str, value: bytes) -> None:
            with self.store.cond:
                self.store.data[key] = value
                self.store.cond.notify_all()
            self.store.count(self.who, key, 9 + len(key) + len(value), 5)

        def _get(self, key: str, timeout: float) -> bytes | None:
            value = self.store.wait_for(key, time.monotonic() + timeout)
            self.store.count(self.who, key, 13 + len(key), 5 + len(value or b""))
            return value

        def _get_many(self, keys: list[str], timeout: float) -> list[bytes | None]:
            # One request (as the launcher's get-many), waiting key after key: linear, however they arrive.
            deadline = time.monotonic() + timeout
            out = [self.store.wait_for(k, deadline) for k in keys]
            self.store.count(self.who, keys[0], 17 + sum(4 + len(k) for k in keys),
                             sum(5 + len(v or b"") for v in out))
            return out

        def _create(self, key: str, value: bytes) -> bytes:
            with self.store.cond:
                stored = self.store.data.setdefault(key, value)
                self.store.cond.notify_all()
            self.store.count(self.who, key, 9 + len(key) + len(value), 5 + len(stored))
            return stored

        def _delete(self, key: str) -> None:
            with self.store.cond:
                self.store.data.pop(key, None)
            self.store.count(self.who, key, 9 + len(key), 5)

    return _Sim


@dataclasses.dataclass
class Model:
    """One client's save arguments for N clients and T tensors."""

    n: int
    t: int

    def __post_init__(self) -> None:
        import shardckpt as sc

        self.mesh = sc.create_mesh([("x", self.n)])
        self.layout = sc.Layout(["x", "unsharded"], self.mesh)
        self.names = [tensor_name(k) for k in range(self.t)]
        self.values = [shard_value(k) for k in range(self.t)]

    def tensors(self, rank: int) -> list[object]:
        import shardckpt as sc

        return [sc.DTensor((self.n * ROWS, COLS), np.float32, self.layout, {rank: v}) for v in self.values]


def _peer_payloads(model: Model, prefix: str, template: str) -> tuple[Callable[[int], bytes], Callable[[int], bytes],
                                                                         int]:
    """What simulated client r sends, made by save's own encoders: its agreement payload and its entries blob;
    and the size of the data file every client writes (written to ``template`` by the real writer)."""
    from shardckpt.format.parallel_writer import write_data_file
    from shardckpt.format.writer import prepare
    from shardckpt.plan import WriteItem
    from shardckpt.save import _describe, _entries_for, _normalize

    specs, _ = _normalize(model.mesh, prefix, model.names, [""] * model.t, model.tensors(0), (0,))
    digest = _describe(prefix, model.mesh, specs)
    prepared = [prepare(v, specs[0].dtype, template) for v in model.values]
    written, size = write_data_file(template, prepared, shard_id=0, durable=False)
    nbytes = ROWS * COLS * 4

    def agree(r: int) -> bytes:
        # "nth": the first save of each simulated client's coordinator, as the real clients' is.
        return json.dumps({"digest": digest, "devices": [r], "error": None, "nth": 1}).encode()

    def entries(r: int) -> bytes:
        from shardckpt.format.protos import pack_entries

        box = ((r * ROWS, (r + 1) * ROWS), (0, COLS))
        items = [WriteItem(k, box, r, r, nbytes) for k in range(model.t)]
        return pack_entries(_entries_for(items, specs, [dataclasses.replace(e, shard_id=r) for e in written]))

    return agree, entries, size


def _written_message(size: int, inode: int, blob: bytes) -> bytes:
    """A client's "written" report, framed as `_Save.finish` frames it."""
    header = json.dumps({"error": None, "size": size, "inode": inode}).encode()
    return len(header).to_bytes(4, "little") + header + blob


class Peers(threading.Thread):
    """Clients 2..N-1: the real session code of an ordinary client, driven through one save, with precomputed
    payloads.  Data files are hard links to the template (same bytes as every real client's)."""

    def __init__(self, store: SimStore, model: Model, prefix: str, template: str, agree: Callable[[int], bytes],
                 blobs: list[bytes], size: int) -> None:
        super().__init__(name="sim-peers", daemon=True)
        self.model, self.prefix, self.template, self.size = model, prefix, template, size
        self.agree, self.blobs = agree, blobs
        sim = _sim_classes()
        self.coords = [sim(store, r, model.n, "peers") for r in range(2, model.n)]
        self.error: BaseException | None = None
        self.go = threading.Event()

    def run(self) -> None:
        from shardckpt.commit import staging_data_filename

        try:
            self.go.wait()
            sessions = [c.session("save") for c in self.coords]
            for s in sessions:
                s.gather("agree", self.agree(s.rank), WAIT)
            verdicts = [json.loads(s.broadcast("go", None, WAIT)) for s in sessions]
            token = verdicts[0]["token"]
            assert all(v["token"] == token and not v["error"] for v in verdicts), verdicts[0]
            for s in sessions:
                path = staging_data_filename(self.prefix, s.rank, self.model.n, token)
                os.link(self.template, path)
                inode = os.stat(path).st_ino
                s.gather("written", _written_message(self.size, inode, self.blobs[s.rank - 2]), WAIT)
            outcomes = [json.loads(s.broadcast("outcome", None, WAIT)) for s in sessions]
            assert all(o["error"] is None for o in outcomes), outcomes[0]
            for s in sessions:
                s.gather("done", b"", WAIT)
                s.close()
            # A barrier after the save, as a training loop has: its messages are counted too.
            sessions = [c.session("barrier") for c in self.coords]
            for s in sessions:
                s.gather("in", b"", WAIT)
            for s in sessions:
                s.broadcast("out", None, WAIT)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


@dataclasses.dataclass
class Clock:
    """CPU seconds of one real client's thread at each fault point (``time.thread_time``)."""

    marks: dict[str, float] = dataclasses.field(default_factory=dict)


def _instrument() -> tuple[dict[tuple[str, str], float], Callable[[], None]]:
    """CPU seconds, by thread, of the root's merge and index building and of every client's local planning
    (`_normalize`, `plan_save`): wrappers calling the originals, removed by the returned function."""
    from shardckpt import commit, save

    spent: dict[tuple[str, str], float] = defaultdict(float)
    targets = [(commit, "_merge"), (commit, "build_index"), (save, "_normalize"), (save, "plan_local")]
    originals = [(mod, name, getattr(mod, name)) for mod, name in targets]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[(threading.current_thread().name, name)] += time.thread_time() - t
        return wrapper

    for mod, name, fn in originals:
        setattr(mod, name, timed(name, fn))

    def undo() -> None:
        for mod, name, fn in originals:
            setattr(mod, name, fn)

    return spent, undo


def simulate(n: int, t: int, profile: str | None = None, verify: bool = True) -> dict[str, Any]:
    """One simulated save (and one barrier) of ``n`` clients and ``t`` tensors; counts and CPU seconds."""
    import shardckpt as sc
    from shardckpt import faults
    from shardckpt.plan import plan_save
    from shardckpt.save import _normalize

    assert n >= 3
    workdir = _scratch()
    try:
        prefix = os.path.join(workdir, "ckpt")
        template = os.path.join(workdir, "template.data")
        model = Model(n, t)
        t0 = time.perf_counter()
        agree, entries, size = _peer_payloads(model, prefix, template)
        blobs = [entries(r) for r in range(2, n)]
        prep = time.perf_counter() - t0

        # The root's local planning on the same inputs, timed apart (being rewritten elsewhere).
        c = time.thread_time()
        specs, _ = _normalize(model.mesh, prefix, model.names, [""] * t, model.tensors(0), (0,))
        normalize_cpu = time.thread_time() - c
        c = time.thread_time()
        plan_save(specs, [model.mesh.client_devices(r, n) for r in range(n)])
        plan_cpu = time.thread_time() - c

        store = SimStore()
        sim = _sim_classes()
        coords = {r: sim(store, r, n, "root" if r == 0 else "client") for r in (0, 1)}
        peers = Peers(store, model, prefix, template, agree, blobs, size)
        clocks = {0: Clock(), 1: Clock()}
        cpu: dict[int, float] = {}
        errors: list[BaseException] = []
        results: dict[int, Any] = {}

        def on_point(point: str, client: int) -> None:
            if client in clocks and point not in clocks[client].marks:
                clocks[client].marks[point] = time.thread_time()

        def client(rank: int) -> None:
            import cProfile

            prof = cProfile.Profile() if profile and rank == 0 else None
            tensors = model.tensors(rank)
            start = time.thread_time()
            clocks[rank].marks["start"] = start
            try:
                if prof is not None:
                    prof.enable()
                results[rank] = sc.sharded_save(model.mesh, prefix, model.names, [""] * t, tensors,
                                                coordinator=coords[rank], timeout=WAIT, durable=False)
                clocks[rank].marks["saved"] = time.thread_time()
                coords[rank].barrier("barrier", WAIT)
                if prof is not None:
                    prof.disable()
                    assert profile is not None
                    prof.dump_stats(os.path.join(profile, f"root-n{n}-t{t}.prof"))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
            finally:
                clocks[rank].marks["end"] = time.thread_time()
                cpu[rank] = time.thread_time() - start

        spent, undo = _instrument()
        threads = [threading.Thread(target=client, args=(r,), name=f"sim-client-{r}") for r in (0, 1)]
        wall = time.perf_counter()
        try:
            with faults.hook(on_point):
                peers.start()
                for th in threads:
                    th.start()
                peers.go.set()
                for th in threads:
                    th.join()
                peers.join()
        finally:
            undo()
        wall = time.perf_counter() - wall
        if peers.error is not None:
            raise peers.error
        if errors:
            raise errors[0]
        if verify:  # every client's slice is in the published checkpoint
            with sc.BundleReader(prefix) as reader:
                got = reader.read(tensor_name(t - 1))
                assert got.shape == (n * ROWS, COLS) and float(got.min()) == float(got.max()) == float(t - 1)
                assert reader.header.num_shards == n
        index_bytes = os.path.getsize(prefix + ".index")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # Per collective: messages by everyone, and what the root and one ordinary client (the real one) took.
    collectives: dict[str, dict[str, int]] = {}
    for (who, session, step), tally in sorted(store.tally.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        label = f"{'save' if session == 0 else 'barrier'}/{step}"
        row = collectives.setdefault(label, {"messages": 0, "root_messages": 0, "root_received": 0,
                                             "client_messages": 0, "client_received": 0, "client_sent": 0,
                                             "peer_messages": 0})
        row["messages"] += tally.ops
        if who == "root":
            row["root_messages"] += tally.ops
            row["root_received"] += tally.received
        elif who == "client":
            row["client_messages"] += tally.ops
            row["client_received"] += tally.received
            row["client_sent"] += tally.sent
        else:
            row["peer_messages"] += tally.ops
    m0 = clocks[0].marks
    m1 = clocks[1].marks
    res0 = results[0]
    return {
        "n": n, "t": t, "wall": wall, "prep": prep, "index_bytes": index_bytes,
        "collectives": collectives,
        "max_messages": max(r["messages"] for r in collectives.values()),
        "max_client_received": max(r["client_received"] for r in collectives.values()),
        "root_cpu": cpu[0], "client_cpu": cpu[1],
        "normalize_cpu": normalize_cpu, "plan_cpu": plan_cpu,
        "root": {
            "agree_normalize_plan": m0["after_agree"] - m0["start"],
            "write": m0["before_barrier_written"] - m0["after_plan"],
            "written_decide": m0["after_barrier_written"] - m0["before_barrier_written"],
            "commit": m0["before_barrier_committed"] - m0["after_barrier_written"],
            "outcome_done": m0["saved"] - m0["before_barrier_committed"],
            "barrier": m0["end"] - m0["saved"],
            "merge": spent[("sim-client-0", "_merge")], "build_index": spent[("sim-client-0", "build_index")],
            "normalize": spent[("sim-client-0", "_normalize")], "plan": spent[("sim-client-0", "plan_local")],
        },
        "client": {
            "agree_normalize_plan": m1["after_agree"] - m1["start"],
            "rest": m1["end"] - m1["after_agree"],
            "normalize": spent[("sim-client-1", "_normalize")], "plan": spent[("sim-client-1", "plan_local")],
        },
        "root_timings": res0.timings,
    }


def coordination_cpu(r: dict[str, Any], who: str = "root") -> float:
    """A client's CPU over the save and the barrier without its local planning (`_normalize` and `plan_save`,
    timed inside its save) and, for the root, without writing its own data file."""
    if who == "root":
        p = r["root"]
        return r["root_cpu"] - p.get("normalize", r["normalize_cpu"]) - p.get("plan", r["plan_cpu"]) - p["write"]
    p = r["client"]
    return r["client_cpu"] - p.get("normalize", r["normalize_cpu"]) - p.get("plan", r["plan_cpu"])


def cmd_sim(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sizes.split(",")]
    counts = [int(x) for x in args.tensors.split(",")]
    out: dict[str, Any] = {"machine": machine_info(), "runs": []}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            out["runs"] = json.load(f).get("runs", [])
    done = {(r["n"], r["t"]) for r in out["runs"]}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    for t in counts:
        for n in sorted(sizes):
            if n * t > args.max_slices:
                print(f"skip N={n} T={t}: {n * t} slices > --max-slices {args.max_slices}", flush=True)
                continue
            if (n, t) in done:
                continue
            r = simulate(n, t, profile=args.profile)
            out["runs"].append(r)
            print(f"N={n:5} T={t:6}: messages/collective <= {r['max_messages']:6} (2N={2 * n}), client received "
                  f"<= {r['max_client_received']} B; root cpu {r['root_cpu']:.2f} s (coordination+merge "
                  f"{coordination_cpu(r):.2f}, merge {r['root']['merge']:.2f}, index {r['root']['build_index']:.2f}, "
                  f"plan {r['plan_cpu']:.2f}, normalize {r['normalize_cpu']:.2f}); client cpu "
                  f"{r['client_cpu']:.2f} s (without planning {coordination_cpu(r, 'client'):.2f}); "
                  f"wall {r['wall']:.1f} s, prep {r['prep']:.1f} s", flush=True)
            if args.json:
                _dump(args.json, out)
    return 0


# --- report ----------------------------------------------------------------------------------------------


def fit_exponent(ns: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(N): cost ~ N^slope."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def _dump(path: str, data: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def machine_info() -> dict[str, Any]:
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "-"
    return {"nproc": os.cpu_count(), "memory": mem, "cpu": cpu, "python": sys.version.split()[0],
            "torch": torch_version, "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _real_lines(real: dict[str, Any]) -> list[str]:
    res = real["results"]
    sc, dcp = res.get("sc", {}), res.get("dcp", {})
    ns = sorted({int(k) for k in [*sc, *dcp]})
    lines = ["| N | shardckpt save (s) | DCP save (s) | DCP / shardckpt | PSS, shardckpt (MiB) | PSS, DCP (MiB) |",
             "|---|---|---|---|---|---|"]

    def med(d: dict[str, Any], n: int) -> float | None:
        v = d.get(str(n), {})
        return v.get("median")

    def pss(d: dict[str, Any], n: int) -> str:
        m = d.get(str(n), {}).get("memory")
        return "-" if not m else f"{m['ranks_pss_mib'] + m['parent_pss_mib']:.0f}"

    for n in ns:
        a, b = med(sc, n), med(dcp, n)
        lines.append(f"| {n} | {_fmt(a, 3)} | {_fmt(b, 3)} | {_fmt(b / a if a and b else None, 1)}× | "
                     f"{pss(sc, n)} | {pss(dcp, n)} |")
    for name, d in (("shardckpt", sc), ("DCP", dcp)):
        pts = [(n, med(d, n)) for n in ns if med(d, n)]
        e = fit_exponent([p[0] for p in pts], [p[1] for p in pts])  # type: ignore[misc]
        lines.append("")
        lines.append(f"Fitted growth, {name}: time ~ N^{_fmt(e)} over N = {', '.join(str(p[0]) for p in pts)}.")
    return lines


def _plan(r: dict[str, Any]) -> tuple[float, float]:
    """The root's `_normalize` and `plan_save` CPU inside its save (older runs: timed apart)."""
    return r["root"].get("normalize", r["normalize_cpu"]), r["root"].get("plan", r["plan_cpu"])


def report(real: dict[str, Any] | None, sim: dict[str, Any] | None, notes: str = "") -> str:
    info = (sim or real or {}).get("machine", machine_info())
    out = [START, "", "## Thousands of clients: coordination cost (`benchmarks/bench_scale.py`)", "",
           f"Machine: {info['nproc']} cores ({info['cpu']}), {info['memory']}, Python {info['python']}, "
           f"torch {info['torch']}; {info['date']}.", ""]
    if real:
        rounds = real.get("rounds", 1)
        start = {"fork": "ranks forked by one zygote per launch", "exec": "shardckpt launch / one python per "
                 "DCP rank"}[real.get("start", "exec")]
        out += [f"### Real processes: T = {real['tensors']} row-sharded float32 tensors (1×16 per client), "
                f"page cache (/dev/shm), no fsync, median of {real['reps']} saves after a warm-up"
                f"{'' if rounds == 1 else f' in each of {rounds} alternating launches'}, timed by client 0 "
                f"between barriers; {start}; PSS: every rank and their parent after the last save", ""]
        out += _real_lines(real)
        out.append("")
    if sim:
        runs = sim["runs"]
        out += ["### Simulation: the real root and one real client against N-2 simulated clients", "",
                "Messages: store operations (each a request and its answer) of every client in one collective, "
                "the largest collective of the save or of the barrier after it. Received: bytes a non-root "
                "client received in one collective (launcher framing), the largest. CPU: `thread_time` of the "
                "client's thread over the save and the barrier; *coordination + merge* is the root's CPU "
                "without its local planning (`_normalize`, `plan_save`, timed inside its save) and "
                "without writing its own data file.", "",
                "| T | N | messages / collective (≤ 2N) | non-root received / collective | root CPU (s) | "
                "root coordination + merge (s) | of which `_merge` | `build_index` | root planning (normalize + "
                "plan) | non-root CPU (s) | non-root without planning (s) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(runs, key=lambda r: (r["t"], r["n"])):
            out.append(f"| {r['t']} | {r['n']} | {r['max_messages']} | {r['max_client_received']} B | "
                       f"{r['root_cpu']:.2f} | {coordination_cpu(r):.2f} | {r['root']['merge']:.2f} | "
                       f"{r['root']['build_index']:.2f} | {_plan(r)[0]:.2f} + {_plan(r)[1]:.2f} | "
                       f"{r['client_cpu']:.2f} | {coordination_cpu(r, 'client'):.2f} |")
        out.append("")
        for t in sorted({r["t"] for r in runs}):
            rs = sorted((r for r in runs if r["t"] == t), key=lambda r: r["n"])
            ns = [r["n"] for r in rs]
            series = {
                "messages / collective": [r["max_messages"] for r in rs],
                "root coordination + merge CPU": [coordination_cpu(r) for r in rs],
                "root `_merge`": [r["root"]["merge"] for r in rs],
                "root planning (plan_save)": [_plan(r)[1] for r in rs],
                "non-root CPU without planning": [coordination_cpu(r, "client") for r in rs],
            }
            fits = ", ".join(f"{k} N^{_fmt(fit_exponent(ns, v))}" for k, v in series.items())
            out.append(f"Fitted growth at T = {t} (N = {ns[0]}…{ns[-1]}): {fits}.")
            out.append("")
    if notes:
        out += [notes.strip(), ""]
    out.append(END)
    return "\n".join(out) + "\n"


def cmd_report(args: argparse.Namespace) -> int:
    real = sim = None
    if args.real:
        with open(args.real) as f:
            real = json.load(f)
    if args.sim:
        with open(args.sim) as f:
            sim = json.load(f)
    notes = ""
    if args.notes:
        with open(args.notes) as f:
            notes = f.read()
    text = report(real, sim, notes)
    if not args.output:
        sys.stdout.write(text)
        return 0
    write_section(args.output, text, START, END)
    return 0


def _iter_sizes(lo: int, hi: int) -> Iterator[int]:
    n = lo
    while n <= hi:
        yield n
        n *= 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["sc", "dcp"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("real", help="real processes: shardckpt launch and PyTorch DCP")
    r.add_argument("--sizes", default="8,16,32,64,128")
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--tensors", type=int, default=100)
    r.add_argument("--only", default="sc,dcp")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds per launch")
    r.add_argument("--start", choices=["fork", "exec"], default="fork",
                   help="fork: one zygote imports torch and shardckpt, forks the ranks; exec: shardckpt launch "
                        "and one python per DCP rank")
    r.add_argument("--rounds", type=int, default=1, help="launches per system at each N, alternating")
    r.add_argument("--json")
    s = sub.add_parser("sim", help="simulated clients around the real root and one real client")
    s.add_argument("--sizes", default=",".join(map(str, _iter_sizes(8, 4096))))
    s.add_argument("--tensors", default="1000,100000")
    s.add_argument("--max-slices", type=int, default=4096 * 1000, help="skip runs with N*T above this")
    s.add_argument("--json")
    s.add_argument("--profile", help="directory for a cProfile of the root's thread per run")
    o = sub.add_parser("report", help="write the tables")
    o.add_argument("--real")
    o.add_argument("--sim")
    o.add_argument("--output")
    o.add_argument("--notes", help="a Markdown file of findings to put under the tables")
    if argv is None:
        argv = sys.argv[1:]
    if "--worker" in argv:
        w = argparse.ArgumentParser()
        w.add_argument("--worker", choices=["sc", "dcp"])
        w.add_argument("--dir")
        w.add_argument("--out")
        w.add_argument("--tensors", type=int)
        w.add_argument("--reps", type=int)
        w.add_argument("--zygote", action="store_true")
        wargs = w.parse_args(argv)
        return zygote_main(wargs) if wargs.zygote else worker_main(wargs)
    args = p.parse_args(argv)
    if args.cmd == "real":
        return cmd_real(args)
    if args.cmd == "sim":
        return cmd_sim(args)
    if args.cmd == "report":
        return cmd_report(args)
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
