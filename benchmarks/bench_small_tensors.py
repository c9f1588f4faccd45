"""100,000 small tensors on one client: shardckpt's save/restore vs safetensors' save_file/load_file.

Usage::

    python benchmarks/bench_small_tensors.py [--tensors 100000] [--elements 16] [--reps 5] [--dir DIR]
                                             [--output BENCHMARKS.md]

Each repetition runs every system once, in an order rotated by one each repetition, so a slow moment of a
shared machine hits all of them alike; medians and same-repetition ratios are reported, in wall time and in
this process's CPU time (``time.process_time``: what a loaded machine disturbs least).  Before each timed
save the previous output is deleted and ``os.sync()`` flushes dirty pages (both untimed).  Reads come from
the page cache.  safetensors does not fsync, so the like-for-like row is ``shardckpt durable=False``;
``durable=True`` (the default: data and index fsynced) is compared with ``save_file`` followed by an fsync.

The results are appended to ``BENCHMARKS.md`` as a new section (one per run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np


def _clients():
    import shardckpt as sc
    from shardckpt.coordination import SingleClient

    return sc, SingleClient()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--elements", type=int, default=16, help="float32 elements per tensor")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--output", default=None, help="append a section to this markdown file")
    args = ap.parse_args()

    from safetensors.numpy import load_file, save_file

    sc, coord = _clients()
    rng = np.random.default_rng(0)
    tensors = {f"layer{i // 10:05d}/param{i % 10}": rng.standard_normal(args.elements).astype(np.float32)
               for i in range(args.tensors)}
    mesh = sc.create_mesh([("x", 1)])
    layout = sc.Layout.replicated(mesh, 1)
    targets = {name: layout for name in tensors}
    root = tempfile.mkdtemp(prefix="bench_small_", dir=args.dir)
    prefix = os.path.join(root, "sc", "ckpt")
    st_path = os.path.join(root, "st", "model.safetensors")
    os.makedirs(os.path.dirname(prefix))
    os.makedirs(os.path.dirname(st_path))
    phases: dict[str, list[float]] = {}

    def clear(directory: str) -> None:
        for f in os.listdir(directory):
            os.remove(os.path.join(directory, f))
        os.sync()

    def sc_save(durable: bool) -> Callable[[], None]:
        def run() -> None:
            result = sc.name_based_save(mesh, prefix, tensors, coordinator=coord, durable=durable)
            for k, v in result.timings.items():
                phases.setdefault(f"save durable={durable}: {k}", []).append(v)
        return run

    def sc_restore() -> None:
        out = sc.name_based_restore(mesh, prefix, targets, coordinator=coord)
        assert len(out) == len(tensors)

    def st_save(fsync: bool) -> Callable[[], None]:
        def run() -> None:
            save_file(tensors, st_path)
            if fsync:
                fd = os.open(st_path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        return run

    def st_load() -> None:
        out = load_file(st_path)
        assert len(out) == len(tensors)

    # (name, setup run untimed before it, timed function)
    systems: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
        ("shardckpt save durable=False", lambda: clear(os.path.dirname(prefix)), sc_save(False)),
        ("shardckpt restore", lambda: None, sc_restore),
        ("safetensors save_file", lambda: clear(os.path.dirname(st_path)), st_save(False)),
        ("safetensors load_file", lambda: None, st_load),
        ("shardckpt save durable=True", lambda: clear(os.path.dirname(prefix)), sc_save(True)),
        ("safetensors save_file + fsync", lambda: clear(os.path.dirname(st_path)), st_save(True)),
    ]
    # Loads need their file: the saves run before the loads within each repetition's rotation of pairs.
    pairs = [(systems[0], systems[1]), (systems[2], systems[3]), (systems[4],), (systems[5],)]
    wall: dict[str, list[float]] = {s[0]: [] for s in systems}
    cpu: dict[str, list[float]] = {s[0]: [] for s in systems}
    sc_save(False)()  # warm up: imports, first-sight caches
    sc_restore()
    st_save(False)()
    st_load()
    phases.clear()
    for rep in range(args.reps):
        order = pairs[rep % len(pairs):] + pairs[: rep % len(pairs)]
        for group in order:
            for name, setup, fn in group:
                setup()
                gc.collect()
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {wall[n][-1]:.3f}s" for n in wall), flush=True)
    shutil.rmtree(root, ignore_errors=True)

    def ratios(a: str, b: str, table: dict[str, list[float]]) -> tuple[float, float, float]:
        r = [x / y for x, y in zip(table[a], table[b])]
        return statistics.median(r), min(r), max(r)

    lines = []
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"\n## Small tensors: {args.tensors:,} x {args.elements} float32 on one client ({stamp})\n")
    lines.append(f"`python benchmarks/bench_small_tensors.py --tensors {args.tensors} --elements {args.elements} "
                 f"--reps {args.reps}`; {platform.platform()}, Python {platform.python_version()}, "
                 f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (a shared machine). Interleaved "
                 "repetitions, `os.sync()` before each timed save, reads from the page cache.\n")
    lines.append("| system | median wall s | min | max | median CPU s |")
    lines.append("|---|---|---|---|---|")
    for name in wall:
        w = wall[name]
        lines.append(f"| {name} | {statistics.median(w):.3f} | {min(w):.3f} | {max(w):.3f} | "
                     f"{statistics.median(cpu[name]):.3f} |")
    lines.append("")
    lines.append("| same-repetition ratio | wall: median (min-max) | CPU: median (min-max) |")
    lines.append("|---|---|---|")
    for a, b in [("shardckpt save durable=False", "safetensors save_file"),
                 ("shardckpt restore", "safetensors load_file"),
                 ("shardckpt save durable=True", "safetensors save_file + fsync")]:
        rw, rc = ratios(a, b, wall), ratios(a, b, cpu)
        lines.append(f"| {a} / {b} | {rw[0]:.2f} ({rw[1]:.2f}-{rw[2]:.2f}) | {rc[0]:.2f} ({rc[1]:.2f}-{rc[2]:.2f}) |")
    lines.append("")
    lines.append("Save phases (`SaveResult.timings`, median wall seconds): " + ", ".join(
        f"{k.split(': ')[0].replace('save ', '')} {k.split(': ')[1]} {statistics.median(v):.3f}"
        for k, v in phases.items() if not k.endswith("total")) + ".\n")
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
