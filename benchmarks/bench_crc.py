"""Which bulk CRC32C is faster on this CPU: awscrt's against the crc32c package's, and what the choice costs a save
and a checked restore.

Usage::

    python benchmarks/bench_crc.py [--gib 1] [--reps 5] [--dir DIR] [--output BENCHMARKS.md]

Rows, each measured under both implementations (`coding.load_bulk_crc(name)`), alternating within every
repetition, the order flipping each time:

- *in cache*: one 1 MiB buffer checksummed over and over (the ceiling);
- *from memory*: ``--gib`` GiB checksummed in 1 MiB calls, each byte once per pass (what a save does with tensors
  that are not in cache: the writer checksums 1 MiB chunks);
- *save*: ``--gib`` GiB of float32 saved 2x2 by 4 in-process clients (`durable=False`, after `os.sync()`);
- *restore*: the same checkpoint read back whole by 1 client from the page cache, every piece checked by its CRC.

Medians and awscrt's speed-up (the median of the same-repetition ratios: rates awscrt / crc32c, times crc32c /
awscrt) are printed, with the CPU's flags that decide the choice, and with ``--output`` written as the section
between ``<!-- bench_crc:start -->`` and ``<!-- bench_crc:end -->`` of that file (appended at its end the first time).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import shardckpt as sc
from sections import write_section
from shardckpt.format import coding

START = "<!-- bench_crc:start -->"
END = "<!-- bench_crc:end -->"
MESH22 = sc.create_mesh([("x", 2), ("y", 2)])
CALL = 1 << 20


def _crc_rate(buf: np.ndarray, passes: int) -> float:
    """GB/s of `crc32c_bulk` over ``buf`` in `CALL`-byte calls, ``passes`` times."""
    view = memoryview(buf)
    t = time.perf_counter()
    for _ in range(passes):
        for at in range(0, len(view), CALL):
            coding.crc32c_bulk(view[at : at + CALL])
    return passes * len(view) / (time.perf_counter() - t) / 1e9


def _save(prefix: str, values: list[np.ndarray]) -> float:
    names = [f"t{k:02d}" for k in range(len(values))]
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
    os.makedirs(os.path.dirname(prefix))
    os.sync()

    def client(coord):
        local = MESH22.local_devices(coord.rank, coord.size)
        shards = [sc.DTensor.from_global(v, sc.Layout(["x", "y"], MESH22), local) for v in values]
        sc.sharded_save(MESH22, prefix, names, [""] * len(names), shards, coordinator=coord, durable=False)

    t = time.perf_counter()
    sc.LocalGroup(4).run(client)
    return time.perf_counter() - t


def _restore(prefix: str, into: list[np.ndarray]) -> float:
    t = time.perf_counter()
    with sc.BundleReader(prefix) as r:
        for k, out in enumerate(into):
            r.read_bounds(f"t{k:02d}", [(0, n) for n in out.shape], out=out)
    return time.perf_counter() - t


def _flags() -> str:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            line = next((x for x in f if x.startswith(b"flags")), b"")
    except OSError:
        return "unknown"
    flags = set(line.partition(b":")[2].split())
    shown = [x for x in (b"sse4_2", b"pclmulqdq", b"avx2", b"vpclmulqdq", b"avx512f") if x in flags]
    return " ".join(x.decode() for x in shown) + ("" if b"avx512f" in flags else " (no avx512f)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    choice = coding.load_bulk_crc()  # the CPU's choice, before the runs force one then the other
    for name in coding.BULK_IMPLEMENTATIONS:
        if coding.load_bulk_crc(name) != name:
            print(f"{name} cannot be loaded here", file=sys.stderr)
            return 1
    nbytes = int(args.gib * (1 << 30)) // (16 * 4 * 4) * (16 * 4 * 4)
    side = 2 * max(1, int((nbytes // 16 // 4) ** 0.5) // 2)
    values = [np.random.default_rng(k).random((side, side), dtype=np.float32) for k in range(16)]
    total = sum(v.nbytes for v in values)
    hot = np.random.default_rng(1).integers(0, 256, CALL, np.uint8)
    cold = np.random.default_rng(2).integers(0, 256, max(total, 64 << 20), np.uint8)  # past the L3
    into = [np.ones_like(v) for v in values]
    work = args.dir or tempfile.mkdtemp(prefix="bench_crc-")
    prefix = os.path.join(work, "ckpt", "ckpt")
    rows: dict[str, dict[str, list[float]]] = {k: {n: [] for n in coding.BULK_IMPLEMENTATIONS}
                                               for k in ("hot", "cold", "save", "restore")}
    load0 = os.getloadavg()[0]
    try:
        for rep in range(args.reps + 1):  # repetition 0 warms the page cache and the arrays, untimed
            order = coding.BULK_IMPLEMENTATIONS if rep % 2 else coding.BULK_IMPLEMENTATIONS[::-1]
            for name in order:
                coding.load_bulk_crc(name)
                got = {"hot": _crc_rate(hot, 1024), "cold": _crc_rate(cold, 1),
                       "save": _save(prefix, values), "restore": _restore(prefix, into)}
                if rep:
                    for k, v in got.items():
                        rows[k][name].append(v)
            if rep:
                print(f"rep {rep}: " + ", ".join(f"{k} {n} {rows[k][n][-1]:.3f}" for k in rows for n in order),
                      flush=True)
        for k, out in enumerate(into):
            if not np.array_equal(out, values[k]):
                raise AssertionError(f"t{k:02d} came back wrong")
    finally:
        coding.load_bulk_crc(choice)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    def med(k: str, n: str) -> float:
        return statistics.median(rows[k][n])

    def ratio(k: str) -> float:  # awscrt's speed-up, above 1 when it is the faster (rates a / c, times c / a)
        a, c = rows[k]["awscrt"], rows[k]["crc32c"]
        return statistics.median([(x / y) if k in ("hot", "cold") else (y / x) for x, y in zip(a, c)])

    now = _dt.datetime.now(_dt.timezone.utc)
    lines = [
        START,
        "## Bulk CRC32C: awscrt against the crc32c package (`benchmarks/bench_crc.py`)",
        "",
        f"{now:%Y-%m-%d %H:%M} UTC; {platform.machine()}, nproc {os.cpu_count()}, CPU flags: {_flags()}; "
        f"Python {sys.version.split()[0]}, numpy {np.__version__}; {total / (1 << 30):.2f} GiB (16 float32 "
        f"tensors of {side}x{side}); {args.reps} interleaved repetitions; load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.  shardckpt chooses **{choice}** on this CPU.",
        "",
        "| row | awscrt (median) | crc32c (median) | awscrt speed-up (median of same-repetition ratios) |",
        "|---|---|---|---|",
        f"| checksum in cache (1 MiB buffer) | {med('hot', 'awscrt'):.1f} GB/s | {med('hot', 'crc32c'):.1f} GB/s "
        f"| {ratio('hot'):.2f}x |",
        f"| checksum from memory (1 MiB calls) | {med('cold', 'awscrt'):.1f} GB/s | {med('cold', 'crc32c'):.1f} "
        f"GB/s | {ratio('cold'):.2f}x |",
        f"| save 2x2 on 4 in-process clients (durable=False) | {med('save', 'awscrt'):.3f} s | "
        f"{med('save', 'crc32c'):.3f} s | {ratio('save'):.2f}x |",
        f"| whole checked restore on 1 client (page cache) | {med('restore', 'awscrt'):.3f} s | "
        f"{med('restore', 'crc32c'):.3f} s | {ratio('restore'):.2f}x |",
        "",
        "A speed-up above 1 means awscrt is the faster.  shardckpt gives awscrt the bulk work only on x86-64 CPUs that "
        "list both `avx512f` and `vpclmulqdq`, where it folds 64 bytes at a time; elsewhere awscrt runs an SSE4.2 "
        "loop and the crc32c package is the faster.",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        write_section(args.output, text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
