"""Soak run (on demand, not in CI): save/restore cycles with random layouts, random client counts and random
faults; checks zero wrong reads, zero leaked staging files and flat memory.

    python scripts/soak.py --cycles 200 --dir /tmp/soak

Every cycle saves a random model from 2-4 in-process clients (one client raising at a random fault point in
about a third of cycles) and every fifth cycle from 4 real processes with one SIGKILLed at a random point;
then the checkpoint is read back (whole and resharded onto a random mesh) and must be absent or wholly the
old or the new version.  The resident memory of this process is sampled after every cycle.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import shardckpt as sc
from shardckpt.coordination import KVServer
from shardckpt.coordination.launcher import ENV_ADDRESS, ENV_RANK, ENV_SIZE
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
    server = KVServer().start()
    try:
        env = {**os.environ, ENV_ADDRESS: server.address, ENV_SIZE: "4", FAULT_ENV: f"{point}@{victim}:kill"}
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "..", "tests", "fault_worker.py"), prefix,
                                   str(version % 2 + 1), "2"], env={**env, ENV_RANK: str(r)},
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
