"""Soak runs: save/restore cycles under faults; checks zero wrong reads and zero wrongly reported outcomes.

    python scripts/soak.py --engine launch --cycles 300 --seed 1     # `shardckpt launch` groups of processes
    python scripts/soak.py --engine torch --cycles 300 --seed 1      # torch.distributed (gloo) groups
    python scripts/soak.py --engine local --cycles 200 --dir /tmp/soak  # in-process groups, resharded reads

``--engine launch|torch``: a driver starts a group of ``--clients`` processes (each loops: save step k to
a fresh prefix or over one shared prefix, then read it back) and, cycle by cycle, injects one fault chosen
from the seed: a client raising, sleeping (late, past the timeout or not), stopping itself (SIGSTOP past the
timeout, SIGCONT from the driver) or killing itself at a named fault point (``SHARDCKPT_FAULT``, set by the
client for that cycle only), or the driver SIGSTOPs or SIGKILLs a client at a random moment.  After a SIGKILL
the group is restarted as a real job restart (a new launcher or a new torch process group, so a new store),
from the next cycle, whose save goes to the killed cycle's prefix with no fault.  Beside the group, for the
whole run: a second saver (its own `SingleClient`) overwriting the shared prefix, a ``shardckpt clean`` loop
on it and a reader loop reading it.  Every value of step k is k, so a read is either wholly one step or wrong.

Checked (`check`): no read ever returned anything but one whole step; no save whose every reporting client
said "failed" is ever visible (to the reader, to a read-back, or after ``shardckpt clean``); no cycle where
some client reported ok and another failed; every ok save's read-back holds its step (or a later step of
the second saver); the checkpoint of a killed cycle's prefix is whole (one step it may hold) after clean;
every save call ended within ``2 * timeout + 10 + SLACK`` seconds of its start, not counting the time the
client itself was stopped or slept by injection; no group stopped making progress.

``--engine local``: every cycle saves a random model from 2-4 in-process clients (one client raising at a
random fault point in about a third of cycles) and every fifth cycle from 4 real processes with one SIGKILLed
at a random point; then the checkpoint is read back (whole and resharded onto a random mesh) and must be
absent or wholly the old or the new version.  The resident memory of this process is sampled after every cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np

import shardckpt as sc
from shardckpt import faults
from shardckpt.coordination import KVServer
from shardckpt.faults import ENV as FAULT_ENV
from shardckpt.faults import POINTS

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from fault_worker import model as process_model  # noqa: E402

CLIENT0_ONLY = {"mid_index_write", "after_index_staged", "after_old_index_removed", "between_renames", "after_commit"}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def random_model(rng: random.Random, version: int) -> dict[str, np.ndarray]:
    out = {}
    for i in range(rng.randint(2, 6)):
        shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(0, 3)))
        out[f"t{i}"] = np.full(shape, version * 100 + i, np.float32)
    return out


def random_layout(rng: random.Random, mesh: sc.Mesh, rank: int) -> sc.Layout:
    dims = list(mesh.dim_names) + [sc.UNSHARDED] * rank
    rng.shuffle(dims)
    specs, used = [], set()
    for d in dims[:rank]:
        specs.append(d if d not in used else sc.UNSHARDED)
        used.add(d)
    return sc.Layout(specs, mesh)


MODELS: dict[int, dict[str, np.ndarray]] = {}


def whole_version(prefix: str) -> int | None:
    """The version the checkpoint holds, checked whole against that version's model; None when absent."""
    try:
        reader = sc.load_checkpoint(prefix)
    except sc.CheckpointNotFoundError:
        return None
    names = sorted(reader.get_variable_to_shape_map())
    first = reader.get_tensor(names[0])
    version = int(first.reshape(-1)[0]) // 100 if first.size else None
    candidates = [version] if version is not None else list(MODELS)
    for v in candidates:
        model = MODELS.get(v)
        if model is not None and sorted(model) == names and all(
            np.array_equal(reader.get_tensor(n), model[n]) for n in names
        ):
            return v
    raise AssertionError(f"{prefix}: mixed or wrong data (names {names})")


def in_process_cycle(rng: random.Random, prefix: str, version: int) -> str:
    clients = rng.randint(2, 4)
    mesh = sc.create_mesh([("x", clients), ("y", rng.randint(1, 2))])
    model = random_model(rng, version)
    MODELS[version] = model
    for old in [v for v in MODELS if v < version - 5]:  # only the last few versions can be on disk
        del MODELS[old]
    layouts = {n: random_layout(rng, mesh, a.ndim) for n, a in model.items()}
    fault = None
    if rng.random() < 0.33:
        point = rng.choice([p for p in POINTS if p not in CLIENT0_ONLY] + sorted(CLIENT0_ONLY))
        fault = f"{point}@{0 if point in CLIENT0_ONLY else rng.randrange(clients)}:raise"
        os.environ[FAULT_ENV] = fault

    def client(coord):
        local = mesh.local_devices(coord.rank, coord.size)
        tensors = [sc.DTensor.from_global(a, layouts[n], local) for n, a in model.items()]
        try:
            sc.sharded_save(mesh, prefix, list(model), [""] * len(model), tensors, coordinator=coord,
                            overwrite=True, timeout=10)
            return "ok"
        except sc.CheckpointError as exc:
            return type(exc).__name__

    try:
        outcomes = sc.LocalGroup(clients).run(client)
    finally:
        os.environ.pop(FAULT_ENV, None)
    got = whole_version(prefix)
    if got == version:
        target = sc.create_mesh([("a", rng.randint(1, 3))])
        for name, a in model.items():
            lay = random_layout(rng, target, a.ndim)
            shards = sc.LocalGroup(target.size).run(
                lambda coord, n=name, lay=lay: sc.sharded_restore(target, prefix, [n], [lay], coordinator=coord)[0]
            )
            for t in shards:
                for d, shard in t.shards.items():
                    assert np.array_equal(shard, a[tuple(slice(lo, hi) for lo, hi in t.bounds(d))]), name
    return f"{clients} clients, fault {fault}: {sorted(set(outcomes))}, read version {got}"


def process_cycle(rng: random.Random, prefix: str, version: int) -> str:
    point = rng.choice(POINTS)
    victim = 0 if point in CLIENT0_ONLY else rng.randrange(4)
    server = KVServer(size=4).start()
    try:
        env = {**os.environ, FAULT_ENV: f"{point}@{victim}:kill"}
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "..", "tests", "fault_worker.py"), prefix,
                                   str(version % 2 + 1), "2"], env={**env, **server.env(r)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(4)]
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        server.stop()
    try:
        reader = sc.load_checkpoint(prefix)
        values = {n: reader.get_tensor(n) for n in ("kernel", "uneven", "bias", "names")}
        ok = any(all(np.array_equal(values[n], w[n]) for n in w) for w in (process_model(1), process_model(2)))
        assert ok, "process cycle: mixed or wrong data"
        state = "a whole version"
    except sc.CheckpointNotFoundError:
        state = "no checkpoint"
    return f"4 processes, kill {point}@{victim}: exit codes {codes}, {state}"


def local_main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    workdir = args.dir or tempfile.mkdtemp(prefix="shardckpt-soak-")
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    rss = []
    for cycle in range(args.cycles):
        if cycle % 5 == 4:
            line = process_cycle(rng, os.path.join(workdir, "proc"), cycle)
        else:
            line = in_process_cycle(rng, os.path.join(workdir, "inproc"), cycle)
        rss.append(rss_mib())
        print(f"[{cycle + 1}/{args.cycles}] {line}; rss {rss[-1]:.1f} MiB", flush=True)
    # Leftovers: a last clean save to each prefix must leave no staging or temporary files.
    from shardckpt.commit import recover

    for p in ("inproc", "proc"):
        recover(os.path.join(workdir, p))
    leaked = [n for n in os.listdir(workdir) if ".staging-" in n or ".tempstate" in n]
    growth = rss[-1] - rss[min(10, len(rss) - 1)]
    print(f"\n{args.cycles} cycles in {time.time() - start:.0f} s: 0 wrong reads, {len(leaked)} leaked staging files "
          f"after recovery, rss {rss[0]:.1f} -> {rss[-1]:.1f} MiB (growth after warm-up {growth:+.1f} MiB)")
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if leaked or growth > 64 else 0


# --- groups of processes under faults (--engine launch|torch) ------------------------------------------------

SHARED = "shared"
NAMES = ("w", "b", "c")
INTRUDER_BASE = 1_000_000  # the second saver's steps: 1_000_001, 1_000_002, ...
SLACK = 5.0  # seconds a save may take beyond its waits on a loaded 2-core machine (writes, commits, scheduling)
POLL = 0.02
# Injected raises where the save's outcome is already fixed model no failure sharded_save can have there:
# a client that learnt the outcome raising on its own afterwards would report a failure of its own making.
NO_RAISE = {"after_barrier_committed"}
# The same on client 0 alone: past its commit, before it tells the outcome, nothing of the save can raise.
NO_RAISE_ROOT = {"before_barrier_committed"}
KINDS = (("none", 0.45), ("raise", 0.09), ("late", 0.12), ("slow", 0.05), ("stop", 0.10), ("kill", 0.05),
         ("rstop", 0.10), ("rkill", 0.04))


def call_bound(timeout: float) -> float:
    """How long one save call may take, not counting the time its own client was stopped or slept by injection.

    A call waits in sequence at most: client 0's answer to the agreement (`answer_wait`: ``T + min(T, 10)``),
    then the outcome (the same), then, only when it gave up, the decision and a last look at the outcome
    (``min(T, 10)`` each); client 0 waits ``T`` at each of three gathers.  One fault per cycle makes at most
    one of those waits long, the others end as soon as client 0 answers; ``2 * T + 10`` covers the longest
    single path (`answer_wait` plus the grace) for any T, and `SLACK` the writes and scheduling.
    """
    return 2 * timeout + 10 + SLACK


# ``--force K:fresh|shared:KIND:POINT:VICTIM`` (tests): cycle K has that fault, and every other cycle none.
FORCED: dict[int, dict] = {}


def plan(seed: int, k: int, clients: int, timeout: float, first: bool = False) -> dict:
    """Cycle ``k``'s prefix and fault, the same in the driver and in every client (derived from seed and k)."""
    rng = random.Random(f"{seed}/{k}")
    prefix = SHARED if rng.random() < 0.6 else f"fresh-{k:05d}"
    if first:  # the first save of a restarted job goes where the killed one went, and must succeed
        return {"k": k, "prefix": plan(seed, k - 1, clients, timeout)["prefix"], "kind": "none", "first": True}
    if FORCED:
        forced = FORCED.get(k)
        if forced is None:
            return {"k": k, "prefix": prefix, "kind": "none", "first": False}
        p = {"k": k, "first": False, **forced}
        p["prefix"] = SHARED if p["prefix"] == "shared" else f"fresh-{k:05d}"
        p.setdefault("sleep", round(timeout + 0.5, 2))
        p.setdefault("stop", round(timeout + 1.0, 2))
        p.setdefault("delay", 0.0)
        return p
    x, kind = rng.random(), "none"
    for name, weight in KINDS:
        if x < weight:
            kind = name
            break
        x -= weight
    points = [p for p in POINTS if kind != "raise" or p not in NO_RAISE]
    point = rng.choice(points)
    victim = 0 if point in CLIENT0_ONLY else rng.randrange(clients)
    if kind == "raise" and point in NO_RAISE_ROOT and victim == 0:
        victim = rng.randrange(1, clients)
    p = {"k": k, "prefix": prefix, "kind": kind, "first": False}
    if kind in ("raise", "late", "slow", "stop", "kill"):
        p.update(point=point, victim=victim)
    if kind in ("rstop", "rkill"):
        p.update(victim=rng.randrange(clients), delay=rng.uniform(0.0, 0.15))
    if kind == "late":
        p["sleep"] = round(timeout + rng.uniform(0.3, 1.2), 2)
    if kind == "slow":
        p["sleep"] = round(timeout * 0.4, 2)
    if kind in ("stop", "rstop"):
        p["stop"] = round(timeout + rng.uniform(0.5, 1.5), 2)
    return p


def fault_spec(p: dict, rank: int) -> str | None:
    """The ``SHARDCKPT_FAULT`` value for this client in this cycle (None: no fault of its own)."""
    if p.get("victim") != rank or "point" not in p:
        return None
    action = {"raise": "raise", "kill": "kill", "stop": "stop"}.get(p["kind"]) or f"sleep={p['sleep']}"
    return f"{p['point']}@{rank}:{action}"


def step_model(step: int, clients: int) -> dict[str, np.ndarray]:
    """Every value of step ``step`` is ``step``, so any mix of two steps is visible in one read."""
    return {"w": np.full((4 * clients, 8), step, np.float64), "b": np.full(7, step, np.int64),
            "c": np.full((3 * clients,), step, np.int32)}


def read_step(prefix: str) -> tuple[str, int | None]:
    """("ok", step) for a checkpoint wholly of one step; ("absent", None); ("error:Class", None); ("wrong", None)."""
    try:
        with sc.load_checkpoint(prefix) as reader:
            names = sorted(reader.get_variable_to_shape_map())
            values = [reader.get_tensor(n) for n in NAMES]
    except sc.CheckpointNotFoundError:
        if not os.path.exists(prefix + ".index"):
            return "absent", None
        return "error:CheckpointNotFoundError", None
    except sc.CheckpointError as exc:
        return f"error:{type(exc).__name__}", None
    if names != sorted(NAMES):
        return "wrong", None
    seen = {float(x) for v in values for x in np.unique(v)}
    if len(seen) != 1 or not float(next(iter(seen))).is_integer():
        return "wrong", None
    return "ok", int(next(iter(seen)))


class Log:
    """One JSON record per line, appended and flushed at once (a SIGKILL loses at most the line being written)."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process

    def __call__(self, **record: object) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


_stopping = threading.Event()


def _on_term(_signum: int, _frame: object) -> None:
    # The launcher (or the driver) stops the group: finish the save under way, so its outcome is recorded.
    _stopping.set()


def init_engine(engine: str) -> sc.coordination.Coordinator:
    if engine == "launch":
        return sc.coordination.resolve(None)
    from datetime import timedelta

    import torch.distributed as dist

    rank, size = int(os.environ["SOAK_RANK"]), int(os.environ["SOAK_SIZE"])
    port = int(os.environ["SOAK_PORT"])
    # The store of the job lives in rank 0's process, on the loopback socket the driver bound for it; gloo's
    # own listeners go on lo too.
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=True, timeout=timedelta(seconds=60),
                              master_listen_fd=int(os.environ["SOAK_LISTEN_FD"]))
    else:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    return sc.coordination.resolve(None)


def client_main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    coord = init_engine(args.engine)
    rank, size = coord.rank, coord.size
    log = Log(os.path.join(args.results, f"client-{rank}.jsonl"))
    log(ev="start", gen=args.gen, rank=rank, pid=os.getpid(), t=time.monotonic(), engine=coord.engine)
    mesh = sc.create_mesh([("x", size)])
    local = mesh.local_devices(rank, size)
    # Like any job, wait for every process to be up before the first step: starting 3-4 interpreters on a
    # loaded machine takes longer than the saves' short timeout.
    coord.barrier("soak-start", 120)
    reached: dict[str, float] = {}
    code = 0
    with faults.hook(lambda point, client: reached.setdefault(point, time.monotonic())):
        for k in range(args.start, args.cycles):
            if _stopping.is_set():
                break
            p = plan(args.seed, k, size, args.timeout, first=k == args.start and args.gen > 0)
            spec = fault_spec(p, rank)
            if spec:
                os.environ[FAULT_ENV] = spec
            prefix = os.path.join(args.dir, p["prefix"])
            m = step_model(k, size)
            tensors = [sc.DTensor.from_global(m["w"], sc.Layout(["x", sc.UNSHARDED], mesh), local), m["b"],
                       sc.DTensor.from_global(m["c"], sc.Layout(["x"], mesh), local)]
            reached.clear()
            log(ev="begin", gen=args.gen, k=k, rank=rank, t=time.monotonic())
            t0 = time.monotonic()
            outcome, message = "ok", ""
            try:
                sc.sharded_save(mesh, prefix, list(NAMES), [""] * 3, tensors, coordinator=coord, overwrite=True,
                                timeout=args.timeout)
            except sc.CheckpointError as exc:
                outcome, message = type(exc).__name__, str(exc)[:400]
            finally:
                os.environ.pop(FAULT_ENV, None)
            t1 = time.monotonic()
            slept = p["sleep"] if spec and "sleep" in p and p["point"] in reached else 0.0
            back = read_step(prefix) if outcome == "ok" else None
            log(ev="end", gen=args.gen, k=k, rank=rank, t0=t0, t1=t1, tr=time.monotonic(), outcome=outcome,
                message=message, slept=slept, read=back, reached=sorted(reached))
            if outcome == "CoordinationError":
                code = 3  # the engine itself is gone (torch: the store died with rank 0): this job is over
                break
    open(os.path.join(args.results, f"done-{args.gen}-{rank}"), "w").close()
    if args.engine == "torch" and rank == 0:
        # The store lives here: stay until every other client of this job is done with it.
        deadline = time.monotonic() + call_bound(args.timeout) * 2
        while time.monotonic() < deadline and not all(
                os.path.exists(os.path.join(args.results, f"done-{args.gen}-{r}")) for r in range(size)):
            time.sleep(POLL)
    return code


def intruder_main(args: argparse.Namespace) -> int:
    """The second saver: its own single-client job overwriting the shared prefix now and then."""
    signal.signal(signal.SIGTERM, _on_term)
    log = Log(os.path.join(args.results, "intruder.jsonl"))
    coord = sc.coordination.SingleClient()
    mesh = sc.create_mesh([("x", 1)])
    prefix = os.path.join(args.dir, SHARED)
    rng = random.Random(f"{args.seed}/intruder")
    j = 0
    while not _stopping.wait(rng.uniform(0.2, 0.8)):
        j += 1
        step = INTRUDER_BASE + j
        m = step_model(step, 1)
        t0 = time.monotonic()
        outcome, message = "ok", ""
        try:
            sc.sharded_save(mesh, prefix, list(NAMES), [""] * 3, [m[n] for n in NAMES], coordinator=coord,
                            overwrite=True, timeout=args.timeout)
        except sc.CheckpointError as exc:
            outcome, message = type(exc).__name__, str(exc)[:400]
        t1 = time.monotonic()
        log(ev="intrude", step=step, t0=t0, t1=t1, outcome=outcome, message=message, pid=os.getpid(),
            read=read_step(prefix) if outcome == "ok" else None, tr=time.monotonic())
    return 0


def cleaner_main(args: argparse.Namespace) -> int:
    """``shardckpt clean`` on the shared prefix in a loop (the CLI's own entry point, in this process)."""
    import io

    from shardckpt.cli import main as cli_main

    signal.signal(signal.SIGTERM, _on_term)
    log = Log(os.path.join(args.results, "cleaner.jsonl"))
    rng = random.Random(f"{args.seed}/cleaner")
    prefix = os.path.join(args.dir, SHARED)
    while not _stopping.wait(rng.uniform(0.1, 0.5)):
        out, err = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(["clean", prefix])
        text = (out.getvalue() + err.getvalue()).strip()
        if rc == 0:
            kind = "nothing" if "nothing to clean" in text else "cleaned"
        else:
            kind = "busy" if "PrefixBusy" in text or "in use by" in text or "could not take the lease" in text \
                else "error"
        log(ev="clean", t0=t0, t1=time.monotonic(), rc=rc, kind=kind, text=text[-400:])
    return 0


def reader_main(args: argparse.Namespace) -> int:
    """Reads the shared prefix continuously; every successful read must be wholly one step's data."""
    signal.signal(signal.SIGTERM, _on_term)
    log = Log(os.path.join(args.results, "reader.jsonl"))
    prefix = os.path.join(args.dir, SHARED)
    counts: Counter[str] = Counter()
    steps: set[int] = set()
    last = time.monotonic()
    while not _stopping.wait(0.02):
        state, step = read_step(prefix)
        counts[state] += 1
        if step is not None:
            steps.add(step)
        if state == "wrong":
            log(ev="wrong", t=time.monotonic())
        if time.monotonic() - last > 1.0:  # a summary now and then: a killed reader loses at most a second
            log(ev="reads", counts=dict(counts), steps=sorted(steps))
            last = time.monotonic()
    log(ev="reads", counts=dict(counts), steps=sorted(steps))
    return 0


def _role_cmd(role: str, args: argparse.Namespace, **extra: object) -> list[str]:
    cmd = [os.path.abspath(__file__), "--role", role, "--engine", args.engine, "--dir", args.dir, "--results",
           args.results, "--seed", str(args.seed), "--cycles", str(args.cycles), "--clients", str(args.clients),
           "--timeout", str(args.timeout)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    for spec in args.force:
        cmd += ["--force", spec]
    return cmd


_OURS: list[str] = []  # the results directory: in the command line of every process this run started


def _signal(pid: int, sig: int) -> None:
    """Signal ``pid`` only if it is still one of this run's processes (a pid may be reused once it exits)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return
    if _OURS and _OURS[0].encode() in cmdline and b"--role" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class Group:
    """One job: a launcher and its clients, or torch processes (rank 0 hosting the store)."""

    def __init__(self, args: argparse.Namespace, gen: int, start: int, env: dict[str, str]) -> None:
        self.engine = args.engine
        self.procs: list[subprocess.Popen] = []
        self.out = open(os.path.join(args.results, f"group-{gen}.out"), "wb")  # noqa: SIM115 - closed in stop
        cmd = _role_cmd("client", args, gen=gen, start=start)
        if self.engine == "launch":
            self.procs.append(subprocess.Popen([sys.executable, "-m", "shardckpt.cli", "launch", "-n",
                                                str(args.clients), *cmd], env=env, stdout=self.out,
                                               stderr=subprocess.STDOUT, start_new_session=True))
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        try:
            for rank in range(args.clients):
                e = dict(env, SOAK_RANK=str(rank), SOAK_SIZE=str(args.clients),
                         SOAK_PORT=str(listener.getsockname()[1]), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
                fds: tuple[int, ...] = ()
                if rank == 0:
                    e["SOAK_LISTEN_FD"] = str(listener.fileno())
                    fds = (listener.fileno(),)
                self.procs.append(subprocess.Popen([sys.executable, *cmd], env=e, pass_fds=fds, stdout=self.out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
        finally:
            listener.close()

    def failed(self) -> bool:
        """Whether the job is over because a process failed (torch: the driver plays torchrun's agent)."""
        codes = [p.poll() for p in self.procs]
        return any(c not in (None, 0) for c in codes)

    def finished(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def stop(self, pids: list[int], grace: float) -> None:
        """Every client gets SIGCONT (a stopped process cannot act on SIGTERM), then SIGTERM, then SIGKILL."""
        for pid in pids:
            _signal(pid, signal.SIGCONT)
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in pids:  # launcher's clients that outlived it
            _signal(pid, signal.SIGKILL)
        self.out.close()


def drive(args: argparse.Namespace) -> dict:
    """Run the whole soak; returns the driver's own events and what every process recorded."""
    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for name in ("SHARDCKPT_COORDINATOR", "SHARDCKPT_RANK", "SHARDCKPT_WORLD_SIZE", "SHARDCKPT_COORDINATOR_KEY",
                 FAULT_ENV, "WORLD_SIZE"):
        env.pop(name, None)
    dlog = Log(os.path.join(args.results, "driver.jsonl"))
    _OURS[:] = [args.results]
    side = []
    for role in ("intruder", "cleaner", "reader"):
        with open(os.path.join(args.results, f"{role}.err"), "wb") as err:
            side.append(subprocess.Popen([sys.executable, *_role_cmd(role, args)], env=env, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=err))
    bound = call_bound(args.timeout)
    t_start = time.monotonic()
    start, gen = 0, 0
    try:
        while start < args.cycles:
            group = Group(args, gen, start, env)
            dlog(ev="group", gen=gen, start=start, t=time.monotonic())
            offsets: dict[int, int] = {}
            pids: dict[int, int] = {}
            current: dict[int, int] = {}  # rank -> cycle begun last
            stopped: dict[int, float] = {}  # pid -> when to SIGCONT
            actions: list[tuple[float, str, int, int]] = []  # (when, signal, rank, k)
            armed: set[tuple[int, int]] = set()
            last_progress = time.monotonic()
            hang = False
            while True:
                now = time.monotonic()
                for rank in range(args.clients):
                    path = os.path.join(args.results, f"client-{rank}.jsonl")
                    if not os.path.exists(path):
                        continue
                    with open(path) as f:
                        f.seek(offsets.get(rank, 0))
                        chunk = f.read()
                    lines = chunk.split("\n")
                    offsets[rank] = offsets.get(rank, 0) + len(chunk) - len(lines[-1])
                    for line in lines[:-1]:
                        rec = json.loads(line)
                        if rec.get("gen") != gen:
                            continue
                        last_progress = now
                        if rec["ev"] == "start":
                            pids[rank] = rec["pid"]
                        elif rec["ev"] == "begin":
                            current[rank] = rec["k"]
                            p = plan(args.seed, rec["k"], args.clients, args.timeout,
                                     first=rec["k"] == start and gen > 0)
                            due = p["kind"] in ("rstop", "rkill") and p["victim"] == rank
                            if due and (rank, rec["k"]) not in armed:
                                armed.add((rank, rec["k"]))
                                actions.append((now + p["delay"], p["kind"], rank, rec["k"]))
                # A client that stopped itself at a fault point: continue it once it is past the timeout.
                for rank, pid in pids.items():
                    if pid not in stopped and _proc_state(pid) == "T":
                        k = current.get(rank, -1)
                        p = plan(args.seed, k, args.clients, args.timeout, first=k == start and gen > 0)
                        stopped[pid] = now + p.get("stop", args.timeout + 1)
                        dlog(ev="stopped", how="point", rank=rank, pid=pid, k=k, t=now)
                for pid, when in list(stopped.items()):
                    if now >= when:
                        _signal(pid, signal.SIGCONT)  # (the launcher may have ended it)
                        del stopped[pid]
                        rank = next(r for r, q in pids.items() if q == pid)
                        dlog(ev="cont", rank=rank, pid=pid, t=now)
                        last_progress = now
                for item in [a for a in actions if a[0] <= now]:
                    actions.remove(item)
                    _, kind, rank, k = item
                    pid = pids.get(rank)
                    if pid is None or _proc_state(pid) in (None, "Z"):
                        continue
                    # A random moment: inside cycle k's save, or already in its read-back or the next save.
                    if kind == "rkill":
                        _signal(pid, signal.SIGKILL)
                        dlog(ev="killed", rank=rank, pid=pid, k=k, now_in=current.get(rank), t=now)
                    elif pid not in stopped:
                        _signal(pid, signal.SIGSTOP)
                        p = plan(args.seed, k, args.clients, args.timeout)
                        stopped[pid] = now + p["stop"]
                        dlog(ev="stopped", how="driver", rank=rank, pid=pid, k=k, now_in=current.get(rank), t=now)
                if group.finished() or (args.engine == "torch" and group.failed()):
                    break
                if not stopped and now - last_progress > bound + 5:
                    hang = True
                    dlog(ev="hang", gen=gen, t=now, current=current)
                    break
                time.sleep(POLL)
            codes_before = [p.poll() for p in group.procs]
            group.stop(list(pids.values()), grace=bound)
            ended = all(c == 0 for c in codes_before)
            begun = max(current.values(), default=start - 1)
            dlog(ev="group_end", gen=gen, codes=codes_before, hang=hang, begun=begun, t=time.monotonic())
            if ended and begun >= args.cycles - 1 and not hang:
                break
            # A real job restart: what the killed cycle left must be one whole step, or nothing if it was
            # past its commit point (the next save's recovery completes it).
            killed_prefix = os.path.join(args.dir, plan(args.seed, begun, args.clients, args.timeout,
                                                        first=begun == start and gen > 0)["prefix"])
            dlog(ev="restart", gen=gen, k=begun, prefix=os.path.basename(killed_prefix),
                 state=read_step(killed_prefix), t=time.monotonic())
            start, gen = begun + 1, gen + 1
            if hang:
                break
    finally:
        for p in side:
            p.terminate()
        for p in side:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    elapsed = time.monotonic() - t_start
    # The end: every prefix, cleaned by the real tool, must hold what its saves' outcomes say.
    final = {}
    import io

    from shardckpt.cli import main as cli_main

    for name in sorted(os.listdir(args.dir)):
        prefix = name.split(".")[0]  # the soak's prefixes have no dot: shared, fresh-00042
        if prefix not in final:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = cli_main(["clean", os.path.join(args.dir, prefix)])
            final[prefix] = {"clean_rc": rc, "state": read_step(os.path.join(args.dir, prefix))}
    for k in range(args.cycles):
        prefix = plan(args.seed, k, args.clients, args.timeout)["prefix"]
        if prefix != SHARED and prefix not in final:
            final[prefix] = {"clean_rc": 0, "state": read_step(os.path.join(args.dir, prefix))}
    leftovers = [n for n in os.listdir(args.dir) if ".staging-" in n or ".tempstate" in n]
    return {"elapsed": elapsed, "final": final, "leftovers": leftovers}


def _category(outcome: str) -> str:
    return "ok" if outcome == "ok" else "unknown" if outcome == "OutcomeUnknownError" else "failed"


def _overlap(a0: float, a1: float, intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for b0, b1 in intervals)


def check(args: argparse.Namespace, run: dict) -> dict:
    """Every promise over everything recorded; returns counts and the list of violations (empty: all kept)."""
    res = args.results
    clients = {r: read_log(os.path.join(res, f"client-{r}.jsonl")) for r in range(args.clients)}
    driver = read_log(os.path.join(res, "driver.jsonl"))
    intruder = [r for r in read_log(os.path.join(res, "intruder.jsonl")) if r["ev"] == "intrude"]
    cleaner = read_log(os.path.join(res, "cleaner.jsonl"))
    reads = [r for r in read_log(os.path.join(res, "reader.jsonl")) if r["ev"] == "reads"]
    violations: list[str] = []
    bound = call_bound(args.timeout)
    intruder_pids = {r["pid"] for r in intruder}

    # Stopped intervals per client process (by the driver, or by itself at a fault point; SIGCONT ends both).
    pid_stops: dict[int, list[tuple[float, float]]] = {}
    open_stop: dict[int, float] = {}
    for ev in driver:
        if ev["ev"] == "stopped":
            open_stop[ev["pid"]] = ev["t"]
        elif ev["ev"] == "cont" and ev["pid"] in open_stop:
            pid_stops.setdefault(ev["pid"], []).append((open_stop.pop(ev["pid"]), ev["t"]))
    pid_of: dict[tuple[int, int], int] = {}
    ends: dict[int, dict[int, dict]] = {}
    for rank, recs in clients.items():
        for rec in recs:
            if rec["ev"] == "start":
                pid_of[(rec["gen"], rank)] = rec["pid"]
            elif rec["ev"] == "end":
                ends.setdefault(rec["k"], {})[rank] = rec

    plans = {}
    restarts = [ev for ev in driver if ev["ev"] == "restart"]
    firsts = {ev["k"] + 1 for ev in restarts}
    for k in range(args.cycles):
        plans[k] = plan(args.seed, k, args.clients, args.timeout, first=k in firsts)
    # "Injected" counts what reached the victim: a fault point the client passed, or a signal the driver sent.
    injected: Counter[str] = Counter()
    for k, p in plans.items():
        kind = p["kind"]
        if kind in ("raise", "late", "slow", "stop", "kill"):
            rec = ends.get(k, {}).get(p["victim"])
            self_stopped = kind == "stop" and any(
                ev["ev"] == "stopped" and ev["how"] == "point" and ev["k"] == k for ev in driver)
            self_killed = kind == "kill" and rec is None  # it never reported: its fault point killed it
            if self_stopped or self_killed or (rec is not None and p["point"] in rec["reached"]):
                injected[f"{kind}@{p['point']}"] += 1
    injected_kinds: Counter[str] = Counter()
    for key, n in injected.items():
        injected_kinds[key.split("@")[0]] += n
    injected_kinds["rstop"] = sum(1 for ev in driver if ev["ev"] == "stopped" and ev["how"] == "driver")
    injected_kinds["rkill"] = sum(1 for ev in driver if ev["ev"] == "killed")
    injected_kinds["restart"] = len(restarts)

    # One outcome per save.
    consensus: dict[int, str] = {}
    outcomes: Counter[str] = Counter()
    for k in range(args.cycles):
        reps = ends.get(k, {})
        for rec in reps.values():
            outcomes[rec["outcome"]] += 1
        cats = {_category(rec["outcome"]) for rec in reps.values()}
        if not reps:
            consensus[k] = "none"
        elif "ok" in cats and "failed" in cats:
            consensus[k] = "split"
            violations.append(f"cycle {k} ({plans[k]}): clients disagree: "
                              f"{ {r: (rec['outcome'], rec['message'][:160]) for r, rec in sorted(reps.items())} }")
        elif "ok" in cats:
            consensus[k] = "ok"
            root = reps.get(0)
            if root is not None and root["outcome"] != "ok":
                violations.append(f"cycle {k}: client 0 reported {root['outcome']} while another reported ok")
        elif "failed" in cats:
            consensus[k] = "failed"
        else:
            consensus[k] = "unknown"
    failed_steps = {k for k, c in consensus.items() if c == "failed"}
    failed_steps |= {r["step"] for r in intruder if r["outcome"] != "ok"}

    # What anyone ever saw on disk: never a mix, never a failed save's step.
    seen: list[tuple[str, tuple]] = []
    for k, reps in ends.items():
        for rank, rec in reps.items():
            if rec["read"]:
                seen.append((f"read-back of cycle {k} by client {rank}", tuple(rec["read"])))
    for r in intruder:
        if r["read"]:
            seen.append((f"read-back of second saver step {r['step']}", tuple(r["read"])))
    for ev in restarts:
        seen.append((f"restart after cycle {ev['k']} ({ev['prefix']})", tuple(ev["state"])))
    for prefix, f in run["final"].items():
        seen.append((f"final {prefix}", tuple(f["state"])))
    reader_counts: Counter[str] = Counter(reads[-1]["counts"]) if reads else Counter()
    reader_steps = set(reads[-1]["steps"]) if reads else set()
    for step in reader_steps:
        seen.append(("reader", ("ok", step)))
    for what, (state, step) in seen:
        if state == "wrong":
            violations.append(f"{what}: wrong data (not wholly one step)")
        if step is not None and step in failed_steps:
            violations.append(f"{what}: holds step {step}, whose save every client reported failed")
        if step is not None and step < INTRUDER_BASE and step >= args.cycles:
            violations.append(f"{what}: holds step {step}, which no one saved")
    if reader_counts["wrong"]:
        violations.append(f"reader: {reader_counts['wrong']} wrong reads")

    # Every ok save's read-back holds its own step (or, on the shared prefix, a later save of the second saver).
    for k, reps in ends.items():
        for rank, rec in reps.items():
            if rec["outcome"] != "ok":
                continue
            state, step = rec["read"]
            if state == "ok" and step == k:
                continue
            if plans[k]["prefix"] == SHARED:
                later = [r for r in intruder if r["outcome"] == "ok" and r["t1"] >= rec["t0"] and r["t0"] <= rec["tr"]]
                if (state == "ok" and step in {r["step"] for r in later}) or (state != "ok" and later):
                    continue
            violations.append(f"cycle {k}: client {rank} saved ok but read back {state} {step}")

    # The end state of every fresh prefix, after `shardckpt clean`, is what its save's outcome says.
    final_states: Counter[str] = Counter()
    writers: dict[str, list[int]] = {}
    for k, p in plans.items():
        if p["prefix"] != SHARED:
            writers.setdefault(p["prefix"], []).append(k)
    for prefix, ks in writers.items():
        possible: set[int | None] = {None}  # None: no checkpoint
        for k in ks:  # a fresh prefix and, after a kill there, the restarted job's first save
            c = consensus[k]
            possible = {k} if c == "ok" else possible if c == "failed" else possible | {k}
        state, step = run["final"].get(prefix, {"state": ("absent", None)})["state"]
        final_states[f"{'+'.join(consensus[k] for k in ks)}->{state}"] += 1
        if not ((state == "absent" and None in possible) or (state == "ok" and step in possible)):
            violations.append(f"{prefix} (cycles {ks}: {[consensus[k] for k in ks]}) holds {state} {step} after "
                              f"clean; it may hold only {sorted(possible, key=str)}")
    for k in firsts:
        if k >= args.cycles or k not in ends:
            continue
        for rank, rec in ends[k].items():
            if rec["outcome"] == "ok":
                continue
            busy_by_other = rec["outcome"] == "PrefixBusyError" and (
                "shardckpt clean" in rec["message"] or any(f"pid {pid} " in rec["message"] for pid in intruder_pids))
            if not busy_by_other:
                violations.append(f"cycle {k}, the first save after a restart, failed on client {rank}: "
                                  f"{rec['outcome']}: {rec['message'][:200]}")

    # No wait past its bound; no hang.
    excess_max = {"root": 0.0, "other": 0.0}
    raw_max = 0.0
    for k, reps in ends.items():
        for rank, rec in reps.items():
            pid = pid_of.get((next(r["gen"] for r in clients[rank] if r["ev"] == "end" and r["k"] == k), rank))
            stopped = _overlap(rec["t0"], rec["t1"], pid_stops.get(pid, []))
            dur = rec["t1"] - rec["t0"]
            excess = dur - stopped - rec["slept"]
            raw_max = max(raw_max, dur)
            role = "root" if rank == 0 else "other"
            excess_max[role] = max(excess_max[role], excess)
            if excess > bound:
                violations.append(f"cycle {k}: client {rank}'s save took {dur:.1f} s ({excess:.1f} s not counting "
                                  f"its own stop/sleep), over the bound {bound:.1f} s: {rec['outcome']}")
    for ev in driver:
        if ev["ev"] == "hang":
            violations.append(f"group {ev['gen']} made no progress for {bound + 5:.0f} s: {ev['current']}")
    for prefix, f in run["final"].items():
        if f["clean_rc"] != 0:
            violations.append(f"the final `shardckpt clean {prefix}` exited {f['clean_rc']}")
    if run["leftovers"]:
        violations.append(f"staged or temporary files left after the final clean: {run['leftovers']}")
    cleaned: Counter[str] = Counter(r["kind"] for r in cleaner)
    for r in cleaner:
        if r["kind"] == "error":
            violations.append(f"shardckpt clean failed: {r['text'][-200:]}")
    intruded: Counter[str] = Counter(r["outcome"] for r in intruder)
    for r in intruder:
        if r["outcome"] not in ("ok", "PrefixBusyError"):
            violations.append(f"second saver step {r['step']}: {r['outcome']}: {r['message'][:200]}")
    return {
        "engine": args.engine, "cycles": args.cycles, "clients": args.clients, "timeout": args.timeout,
        "seed": args.seed, "elapsed_s": round(run["elapsed"], 1),
        "faults_planned": dict(Counter(p["kind"] for p in plans.values())),
        "faults_injected": dict(injected_kinds), "faults_injected_by_point": dict(sorted(injected.items())),
        "save_outcomes": dict(outcomes), "consensus": dict(Counter(consensus.values())),
        "consensus_by_cycle": [consensus[k] for k in range(args.cycles)],
        "by_fault": {kind: {"cycles": n, "consensus": dict(Counter(consensus[k] for k, p in plans.items()
                                                                  if p["kind"] == kind)),
                            "outcomes": dict(Counter(rec["outcome"] for k, p in plans.items() if p["kind"] == kind
                                                     for rec in ends.get(k, {}).values()))}
                     for kind, n in Counter(p["kind"] for p in plans.values()).items()},
        "final_fresh_prefixes": dict(final_states),
        "restart_states": dict(Counter(ev["state"][0] for ev in restarts)),
        "reader": dict(reader_counts), "reader_steps_seen": len(reader_steps),
        "second_saver": dict(intruded), "clean": dict(cleaned),
        "max_call_s": round(raw_max, 2), "max_excess_s": {k: round(v, 2) for k, v in excess_max.items()},
        "bound_s": bound, "leftovers": run["leftovers"], "violations": violations,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("local", "launch", "torch"), default="local")
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1.0, help="the saves' timeout in seconds")
    parser.add_argument("--json", default=None, help="write the summary here as JSON")
    parser.add_argument("--force", action="append", default=[], metavar="K:fresh|shared:KIND:POINT:VICTIM",
                        help="give cycle K this fault and every other cycle none (repeatable)")
    # Internal: the processes the driver starts.
    parser.add_argument("--role", default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gen", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for spec in args.force:
        k, prefix, kind, point, victim = spec.split(":")
        FORCED[int(k)] = {"prefix": prefix, "kind": kind, "point": point, "victim": int(victim)}
    if args.role != "driver":
        return {"client": client_main, "intruder": intruder_main, "cleaner": cleaner_main,
                "reader": reader_main}[args.role](args)
    if args.engine == "local":
        return local_main(args)
    temporary = args.dir is None
    args.dir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="shardckpt-soak-"))
    args.results = os.path.join(args.dir, "records")
    args.dir = os.path.join(args.dir, "ckpt")
    summary = check(args, drive(args))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    if temporary and not summary["violations"]:
        shutil.rmtree(os.path.dirname(args.dir), ignore_errors=True)
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
