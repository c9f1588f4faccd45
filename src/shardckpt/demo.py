"""``shardckpt demo``: 4 local clients save a ~1 GiB model, 3 clients restore it onto another mesh, all verified.

Values are a cheap deterministic function of (tensor, row, column), so any
client can build or check any shard without holding the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

SAVE_CLIENTS = 4
RESTORE_CLIENTS = 3
POLL_SECONDS = 0.2


def _progress_path(workdir: str, phase: str, rank: int) -> str:
    return os.path.join(workdir, f".demo-{phase}-{rank}.progress")


def _report_progress(workdir: str, phase: str, rank: int, done: int) -> None:
    """Tell the parent how many tensors this client has built (save) or checked (restore)."""
    path = _progress_path(workdir, phase, rank)
    with open(path + ".tmp", "w") as f:
        f.write(str(done))
    os.replace(path + ".tmp", path)


def _progress_of(workdir: str, phase: str, clients: int) -> int:
    done = 0
    for r in range(clients):
        try:
            with open(_progress_path(workdir, phase, r)) as f:
                done += int(f.read() or 0)
        except (OSError, ValueError):
            pass
    return done


def expected(k: int, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Tensor ``k``'s values over ``box``; a misplaced shard or a swapped tensor cannot match."""
    if not box:
        return np.array(k, np.float32)
    grids = np.ix_(*[np.arange(lo, hi, dtype=np.int64) for lo, hi in box])
    acc = np.full([hi - lo for lo, hi in box], k * 7919, dtype=np.int64)
    for d, g in enumerate(grids):
        acc += g * (2654435761 + 40503 * d)
    return (acc % 65521).astype(np.float32)


Spec = list[tuple[str, tuple[int, ...], str]]


def model_spec(size_mb: int) -> Spec:
    """(name, shape, kind) with kind in sharded2d / rows / replicated, totalling about ``size_mb``."""
    side = 4096 if size_mb >= 512 else 1024
    per = side * side * 4
    count = max(2, int(size_mb * (1 << 20) * 0.95 // per))
    spec: Spec = [(f"layer_{i:02d}/kernel", (side, side), "sharded2d") for i in range(count)]
    spec += [(f"layer_{i:02d}/bias", (side,), "replicated") for i in range(count)]
    spec += [("embedding", (side + 3, side // 8), "rows"), ("head", (side // 4, side + 1), "rows")]
    spec += [("replicated_table", (side // 4, side), "replicated"), ("step", (), "replicated")]
    return spec


def _client(phase: str, workdir: str, size_mb: int) -> int:
    import shardckpt as sc

    coord = sc.coordination.resolve(None)
    prefix = os.path.join(workdir, "ckpt")
    spec = model_spec(size_mb)
    if phase == "save":
        mesh = sc.create_mesh([("x", 2), ("y", 2)])
        local = mesh.local_devices(coord.rank, coord.size)
        layouts = {"sharded2d": ["x", "y"], "rows": ["x", sc.UNSHARDED]}
        tensors: list[object] = []
        for k, (_, shape, kind) in enumerate(spec):
            if kind == "replicated":
                tensors.append(expected(k, tuple((0, n) for n in shape)))
                continue
            layout = sc.Layout(layouts[kind], mesh)
            shards = {d: expected(k, layout.shard_bounds(shape, d)) for d in local}
            tensors.append(sc.DTensor(shape, np.dtype(np.float32), layout, shards))
            _report_progress(workdir, phase, coord.rank, k + 1)
        _report_progress(workdir, phase, coord.rank, len(spec))
        start = time.perf_counter()
        result = sc.sharded_save(mesh, prefix, [n for n, _, _ in spec], [""] * len(spec), tensors,
                                 overwrite=True, blocking=True)
        report = {"seconds": time.perf_counter() - start, "bytes": result.bytes_written,
                  "timings": result.timings, "ok": True}
    else:
        mesh = sc.create_mesh([("a", coord.size)])
        layouts_r = [sc.Layout([sc.UNSHARDED, "a"] if len(shape) == 2 else ["a"] * len(shape), mesh)
                     for _, shape, _ in spec]
        start = time.perf_counter()
        restored = sc.sharded_restore(mesh, prefix, [n for n, _, _ in spec], layouts_r)
        seconds = time.perf_counter() - start
        ok, nbytes = True, 0
        for k, t in enumerate(restored):
            for d, shard in t.shards.items():
                nbytes += shard.nbytes
                if not np.array_equal(shard, expected(k, t.bounds(d))):
                    print(f"client {coord.rank}: MISMATCH in {spec[k][0]} device {d}", file=sys.stderr)
                    ok = False
            _report_progress(workdir, phase, coord.rank, k + 1)
        report = {"seconds": seconds, "bytes": nbytes, "ok": ok}
    with open(os.path.join(workdir, f".demo-{phase}-{coord.rank}.json"), "w") as f:
        json.dump(report, f)
    return 0 if report["ok"] else 1


def _run_phase(phase: str, clients: int, workdir: str, size_mb: int, tensors: int, show: bool) -> int:
    """Launch one phase's clients; on a terminal, a bar of the tensors they built (save) or checked (restore)."""
    from .launch import launch

    argv = ["-m", "shardckpt.demo", phase, workdir, str(size_mb)]
    if not show:
        return launch(clients, argv)
    from tqdm import tqdm

    total = tensors * clients
    steps = {"save": ("building shards", "writing the checkpoint"), "restore": ("restoring", "verifying")}[phase]
    finished = threading.Event()

    def follow(bar: Any) -> None:  # the launcher keeps the main thread (it forwards signals from there)
        label = f"{phase}: {steps[0]}"
        while not finished.wait(POLL_SECONDS):
            done = _progress_of(workdir, phase, clients)
            if done > bar.n:
                bar.update(done - bar.n)
            now = f"{phase}: {steps[1] if done > 0 and (phase == 'restore' or done >= total) else steps[0]}"
            if now != label:
                label = now
                bar.set_description(label)

    with tqdm(total=total, desc=f"{phase}: {steps[0]}", unit="tensor", file=sys.stderr, leave=False) as bar:
        follower = threading.Thread(target=follow, args=(bar,), name="shardckpt-demo-progress", daemon=True)
        follower.start()
        try:
            return launch(clients, argv)
        finally:
            finished.set()
            follower.join()


def run_demo(args: argparse.Namespace) -> int:
    """Save with 4 launched clients, restore onto 3 and print throughput; returns 0 when every value matched, else 1.

    Writes under ``args.dir`` (kept) or a temporary directory (removed); ``args.size_mb`` is the model size in MiB.
    """
    from .cli import bars_wanted

    workdir = args.dir or tempfile.mkdtemp(prefix="shardckpt-demo-")
    os.makedirs(workdir, exist_ok=True)
    spec = model_spec(args.size_mb)
    total = sum(int(np.prod(s)) * 4 for _, s, _ in spec)
    print(f"model: {len(spec)} tensors, {total / (1 << 30):.2f} GiB: 2-D sharded on a 2x2 mesh, row-sharded "
          f"with uneven rows, replicated")
    try:
        for phase, n in (("save", SAVE_CLIENTS), ("restore", RESTORE_CLIENTS)):
            start = time.perf_counter()
            code = _run_phase(phase, n, workdir, args.size_mb, len(spec), bars_wanted())
            wall = time.perf_counter() - start
            if code != 0:
                print(f"{phase} failed (exit status {code})")
                return 1
            reports = []
            for r in range(n):
                with open(os.path.join(workdir, f".demo-{phase}-{r}.json")) as f:
                    reports.append(json.load(f))
            slowest = max(rep["seconds"] for rep in reports)
            nbytes = sum(rep["bytes"] for rep in reports)
            if phase == "save":
                files = sorted(f for f in os.listdir(workdir) if f.startswith("ckpt"))
                # Client 0 has phases of its own (the commit): each phase's slowest client that has it.
                phases = {k: max(rep["timings"].get(k, 0.0) for rep in reports) for k in reports[0]["timings"]}
                detail = ", ".join(f"{k} {v:.2f}s" for k, v in phases.items() if k != "total")
                print(f"save:    {n} clients wrote {nbytes / (1 << 30):.2f} GiB into {len(files)} files in "
                      f"{slowest:.2f} s = {nbytes / slowest / (1 << 30):.2f} GiB/s ({detail}); "
                      f"with process start-up {wall:.1f} s")
            else:
                print(f"restore: {n} clients on a 1-D mesh of {n} (columns resharded) read "
                      f"{nbytes / (1 << 30):.2f} GiB in {slowest:.2f} s = {nbytes / slowest / (1 << 30):.2f} GiB/s; "
                      f"every value verified; with process start-up {wall:.1f} s")
        print("OK")
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for name in os.listdir(workdir):
                if name.startswith(".demo-") and (name.endswith(".progress") or name.endswith(".progress.tmp")):
                    os.unlink(os.path.join(workdir, name))


if __name__ == "__main__":
    sys.exit(_client(sys.argv[1], sys.argv[2], int(sys.argv[3])))
