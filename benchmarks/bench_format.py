"""Write and read one ~1 GiB bundle: shardckpt vs TensorFlow vs safetensors vs a raw os.write/os.preadv ceiling.

Usage::

    python benchmarks/bench_format.py [--size-gb 1.0] [--reps 5] [--dir DIR] [--output BENCHMARKS.md]

Every repetition runs every system once, in an order rotated by one each repetition (A B C, B C A, ...), so
slow phases of a noisy VM hit all systems alike; medians, min/max and *same-repetition* ratios are reported.
Before each timed save: the previous output is deleted (untimed) and ``os.sync()`` flushes dirty pages, so
writeback from one run does not land in the next.  Reads come from the page cache (each file was just written),
so they measure CPU, memory and syscall costs, not the disk.

The results replace the section between ``<!-- bench_format:start -->`` and ``<!-- bench_format:end -->`` of
``BENCHMARKS.md`` (created if missing); other benchmarks keep their own sections in the same file.
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
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from sections import write_section

MiB = 1 << 20
KiB = 1 << 10
START = "<!-- bench_format:start -->"
END = "<!-- bench_format:end -->"


# --- the workload ---------------------------------------------------------------------------------


@dataclass
class Workload:
    names: list[str]
    arrays: list[np.ndarray]
    total_bytes: int
    counts: dict[str, int]

    def describe(self) -> str:
        """'4 of 64-256 MiB, ...' from the tensors themselves; dtypes by bytes."""
        parts = []
        for cls in ("large", "medium", "small"):
            sizes = [a.nbytes for n, a in zip(self.names, self.arrays) if n.startswith(cls + "/")]
            if not sizes:
                continue
            unit, div = ("MiB", MiB) if max(sizes) >= MiB else ("KiB", KiB)
            parts.append(f"{len(sizes)} of {min(sizes) / div:.0f}-{max(sizes) / div:.0f} {unit}")
        by_dtype: dict[str, int] = {}
        for a in self.arrays:
            by_dtype[str(a.dtype)] = by_dtype.get(str(a.dtype), 0) + a.nbytes
        mix = ", ".join(f"{k} {v / self.total_bytes:.0%}" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1]))
        return f"{', '.join(parts)}; bytes by dtype: {mix}"


def _shape_for(nbytes: int, itemsize: int, rng: np.random.Generator) -> tuple[int, ...]:
    count = max(nbytes // itemsize, 1)
    for cols in (4096, 2048, 1024, 768, 512, 256, 128, 64, 32, 16):
        if count % cols == 0 and count // cols >= 1:
            return (count // cols, cols)
    return (count,)


def _make_array(nbytes: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "float32":
        shape = _shape_for(nbytes, 4, rng)
        return rng.random(shape, dtype=np.float32)
    if kind == "bfloat16":
        shape = _shape_for(nbytes, 2, rng)
        return rng.random(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
    if kind == "int8":
        shape = _shape_for(nbytes, 1, rng)
        return rng.integers(-128, 128, size=shape, dtype=np.int8)
    raise ValueError(kind)


def make_workload(size_gb: float, seed: int = 1234) -> Workload:
    """~size_gb GiB: a few 64-256 MiB tensors, dozens of 1-16 MiB, hundreds of 4-64 KiB; mostly float32."""
    rng = np.random.default_rng(seed)
    scale = size_gb
    plan: list[tuple[str, int, str]] = []  # (name, bytes, dtype)
    # Large: 256 + 192 + 128 + 64 MiB at 1 GiB; the 128 MiB one is bfloat16.
    for i, (mib, kind) in enumerate([(256, "float32"), (192, "float32"), (128, "bfloat16"), (64, "float32")]):
        nbytes = max(int(mib * MiB * scale) // 4096 * 4096, 4096)
        plan.append((f"large/{i:02d}/kernel", nbytes, kind))
    # Medium: 40 tensors of 1-16 MiB at 1 GiB (about 1 in 8 bfloat16, 1 in 10 int8).
    n_medium = max(int(round(40 * scale)), 1)
    for i in range(n_medium):
        nbytes = int(rng.integers(1 * MiB, 16 * MiB + 1)) // 4096 * 4096
        r = rng.random()
        kind = "bfloat16" if r < 0.125 else "int8" if r < 0.225 else "float32"
        plan.append((f"medium/{i:03d}/weights", nbytes, kind))
    # Small: 400 tensors of 4-64 KiB at 1 GiB (biases, norms, ...).
    n_small = max(int(round(400 * scale)), 1)
    for i in range(n_small):
        nbytes = int(rng.integers(4 * KiB, 64 * KiB + 1)) // 64 * 64
        r = rng.random()
        kind = "bfloat16" if r < 0.1 else "int8" if r < 0.2 else "float32"
        plan.append((f"small/{i:04d}/bias", nbytes, kind))
    # Interleave the classes as a model would (call order = data-file order), deterministically.
    order = rng.permutation(len(plan))
    plan = [plan[i] for i in order]
    names, arrays, counts = [], [], {"large": 0, "medium": 0, "small": 0}
    for name, nbytes, kind in plan:
        arrays.append(_make_array(nbytes, kind, rng))
        names.append(name)
        counts[name.split("/")[0]] += 1
    total = sum(a.nbytes for a in arrays)
    return Workload(names, arrays, total, counts)


# --- the systems ----------------------------------------------------------------------------------


def _remove(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _bundle_files(prefix: str) -> list[str]:
    d = os.path.dirname(prefix)
    base = os.path.basename(prefix)
    return [os.path.join(d, f) for f in os.listdir(d) if f.startswith(base + ".")]


@dataclass
class System:
    """One way of saving and reading the workload: save() and read() are timed, prepare/cleanup are not."""

    label: str
    files: Callable[[], list[str]]
    save: Callable[[], None]
    read: Callable[[], object] | None = None
    # For a read that is split in two stages (TF: RestoreV2, then .numpy()), read returns the extra timings.
    extra: dict[str, list[float]] = field(default_factory=dict)


def build_systems(w: Workload, workdir: str, *, tf, st_save, st_load) -> tuple[dict[str, System], np.ndarray]:
    """The systems to time, and the workload's bytes concatenated (what the raw ceiling writes)."""
    from shardckpt.format import BundleReader, BundleWriter

    names, arrays = w.names, w.arrays
    systems: dict[str, System] = {}

    # shardckpt -------------------------------------------------------------------------------
    sc_prefix = os.path.join(workdir, "sc", "model")
    sc_durable_prefix = os.path.join(workdir, "scd", "model")
    os.makedirs(os.path.dirname(sc_prefix), exist_ok=True)
    os.makedirs(os.path.dirname(sc_durable_prefix), exist_ok=True)

    def sc_save(prefix: str, durable: bool) -> Callable[[], None]:
        def run() -> None:
            wr = BundleWriter(prefix, durable=durable)
            for n, a in zip(names, arrays):
                wr.add(n, a)
            wr.finish()

        return run

    def sc_read() -> list[np.ndarray]:
        with BundleReader(sc_prefix) as r:
            return [r.read(n) for n in names]

    systems["shardckpt"] = System(
        "shardckpt BundleWriter(durable=False) / BundleReader.read",
        lambda: _bundle_files(sc_prefix),
        sc_save(sc_prefix, False),
        sc_read,
    )
    systems["shardckpt_durable"] = System(
        "shardckpt BundleWriter(durable=True, fsync)",
        lambda: _bundle_files(sc_durable_prefix),
        sc_save(sc_durable_prefix, True),
        None,
    )

    # TensorFlow ------------------------------------------------------------------------------
    if tf is not None:
        tf_prefix = os.path.join(workdir, "tf", "model")
        os.makedirs(os.path.dirname(tf_prefix), exist_ok=True)
        with tf.device("/cpu:0"):
            tf_tensors = [tf.constant(a) for a in arrays]  # converted once, before any timing
        tf_names = tf.constant(names)
        tf_specs = tf.constant([""] * len(names))
        tf_dtypes = [t.dtype for t in tf_tensors]
        tf_system = System(
            "TensorFlow raw_ops.SaveV2 / RestoreV2 + .numpy()",
            lambda: _bundle_files(tf_prefix),
            lambda: None,
            None,
            {"restore_only": []},
        )

        def tf_save() -> None:
            tf.raw_ops.SaveV2(prefix=tf_prefix, tensor_names=tf_names, shape_and_slices=tf_specs, tensors=tf_tensors)

        def tf_read() -> list[np.ndarray]:
            t0 = time.perf_counter()
            out = tf.raw_ops.RestoreV2(
                prefix=tf_prefix, tensor_names=tf_names, shape_and_slices=tf_specs, dtypes=tf_dtypes
            )
            t1 = time.perf_counter()
            tf_system.extra["restore_only"].append(t1 - t0)
            return [t.numpy() for t in out]

        tf_system.save = tf_save
        tf_system.read = tf_read
        systems["tensorflow"] = tf_system

    # safetensors -----------------------------------------------------------------------------
    if st_save is not None:
        st_path = os.path.join(workdir, "model.safetensors")
        # safetensors' numpy API has no bfloat16: store those as float16, same bytes and byte count.
        st_dict = {n: (a.view(np.float16) if a.dtype == ml_dtypes.bfloat16 else a) for n, a in zip(names, arrays)}

        def st_read() -> list[np.ndarray]:
            d = st_load(st_path)
            return [d[n] for n in names]

        systems["safetensors"] = System(
            "safetensors.numpy save_file / load_file", lambda: [st_path], lambda: st_save(st_dict, st_path), st_read
        )

    # raw ceiling -----------------------------------------------------------------------------
    raw_path = os.path.join(workdir, "raw.bin")
    blob = np.empty(w.total_bytes, np.uint8)
    pos = 0
    for a in arrays:
        flat = a.reshape(-1).view(np.uint8)
        blob[pos : pos + flat.size] = flat
        pos += flat.size
    back = np.ones(w.total_bytes, np.uint8)  # preallocated and touched: no page faults inside the timing

    def raw_save() -> None:
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def raw_read() -> list[np.ndarray]:
        fd = os.open(raw_path, os.O_RDONLY)
        try:
            view = memoryview(back)
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], got)
                if n <= 0:
                    raise OSError("short read")
                got += n
        finally:
            os.close(fd)
        return [back]

    systems["raw"] = System(
        "raw: one os.write / one os.preadv into a touched buffer", lambda: [raw_path], raw_save, raw_read
    )
    return systems, blob


# --- running --------------------------------------------------------------------------------------


def _as_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def check_read(key: str, result: object, w: Workload, blob: np.ndarray) -> None:
    """Untimed, once: every system must give back exactly the bytes it was given."""
    if key == "raw":
        assert np.array_equal(result[0], blob), "raw read differs"  # type: ignore[index]
        return
    arrays = list(result)  # type: ignore[call-overload]
    assert len(arrays) == len(w.arrays), key
    for n, got, want in zip(w.names, arrays, w.arrays):
        assert got.shape == want.shape, (key, n, got.shape, want.shape)
        assert np.array_equal(_as_bytes(got), _as_bytes(want)), (key, n)


def run(
    w: Workload, systems: dict[str, System], blob: np.ndarray, reps: int, log: Callable[[str], None]
) -> dict[str, dict[str, list[float]]]:
    keys = list(systems)
    times: dict[str, dict[str, list[float]]] = {k: {"save": [], "read": []} for k in keys}
    checked: set[str] = set()
    for rep in range(-1, reps):  # rep -1 is a warm-up: imports, TF op setup, first allocations
        shift = rep % len(keys) if rep >= 0 else 0
        order = keys[shift:] + keys[:shift]
        for k in order:
            s = systems[k]
            _remove(s.files())
            gc.collect()
            os.sync()
            t0 = time.perf_counter()
            s.save()
            t_save = time.perf_counter() - t0
            t_read = None
            if s.read is not None:
                os.sync()  # writeback of what was just saved must not run during the read
                t0 = time.perf_counter()
                result = s.read()
                t_read = time.perf_counter() - t0
                if k not in checked:
                    check_read(k, result, w, blob)
                    checked.add(k)
                del result
            if rep >= 0:
                times[k]["save"].append(t_save)
                if t_read is not None:
                    times[k]["read"].append(t_read)
            elif "restore_only" in s.extra:
                s.extra["restore_only"].clear()
            msg = f"rep {rep:>2} {k:<18} save {t_save:7.3f}s"
            if t_read is not None:
                msg += f"  read {t_read:7.3f}s"
            log(msg + ("  (warm-up)" if rep < 0 else ""))
        gc.collect()
    for k in keys:
        s = systems[k]
        _remove(s.files())
        if "restore_only" in s.extra:
            times[k]["restore_only"] = list(s.extra["restore_only"])
    return times


# --- the index micro-benchmark ---------------------------------------------------------------------


def _index_entries(n: int, distinct_shapes: bool) -> dict[bytes, object]:
    from shardckpt.format import BundleEntry

    rng = np.random.default_rng(7)
    if distinct_shapes:  # every shape different: the worst case for the shape caches of protos.py
        rows = rng.integers(1, 1 << 20, size=n)
        cols = rng.integers(1, 1 << 12, size=n)
    else:  # a model's layers repeat: 8 tensors per layer, each position with its own shape
        rows = np.tile(np.array([1024, 1024, 4096, 1, 1, 1024, 1, 1]), n // 8 + 1)[:n]
        cols = np.tile(np.array([4096, 1024, 1024, 4096, 1024, 3072, 1, 1]), n // 8 + 1)[:n]
    sizes = rows * cols * 4
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    crcs = rng.integers(0, 1 << 32, size=n)
    entries: dict[bytes, object] = {}
    for i in range(n):
        key = f"model/layer_{i // 8:05d}/sub_{i % 8}/kernel".encode()
        entries[key] = BundleEntry(
            dtype=1, shape=(int(rows[i]), int(cols[i])), offset=int(offsets[i]), size=int(sizes[i]), crc32c=int(crcs[i])
        )
    return entries


def bench_index(n: int, reps: int, lookups: int = 20_000) -> list[dict[str, object]]:
    """build_index, then Table iteration + decode_entry of every entry, then Table.get of a sample of keys."""
    from shardckpt.format import BundleHeader, build_index
    from shardckpt.format.protos import decode_entry
    from shardckpt.format.table import Table

    results = []
    # Repeating shapes first: protos.py's shape caches stop adding once they hold 4096 shapes.
    for distinct in (False, True):
        entries = _index_entries(n, distinct)
        keys = list(entries)
        sample = [keys[i] for i in np.random.default_rng(3).choice(n, size=min(lookups, n), replace=False)]
        build_t, parse_t, get_t = [], [], []
        data = b""
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            data = build_index(BundleHeader(), entries)  # type: ignore[arg-type]
            build_t.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            count = 0
            for key, value in Table(data, "bench.index"):
                if key:
                    decode_entry(value)
                    count += 1
            parse_t.append(time.perf_counter() - t0)
            assert count == n
            table = Table(data, "bench.index")
            t0 = time.perf_counter()
            for key in sample:
                if table.get(key) is None:
                    raise AssertionError(key)
            get_t.append((time.perf_counter() - t0) / len(sample))
        results.append(
            {
                "distinct": distinct,
                "entries": n,
                "bytes": len(data),
                "build": build_t,
                "parse": parse_t,
                "get": get_t,
                "lookups": len(sample),
            }
        )
    return results


# --- reporting -------------------------------------------------------------------------------------


def machine_info(workdir: str) -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                    break
    except OSError:
        pass
    fs = "unknown"
    try:
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if os.path.realpath(workdir).startswith(mnt) and len(mnt) >= len(best):
                    best, fs = mnt, f"{parts[2]} on {parts[0]} ({mnt})"
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("tensorflow", "safetensors", "crc32c", "ml_dtypes"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "not installed"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "filesystem": fs,
        **versions,
    }


def _ratio_stats(a: list[float], b: list[float]) -> tuple[float, float, float]:
    r = [x / y for x, y in zip(a, b)]
    return statistics.median(r), min(r), max(r)


def render(w: Workload, times: dict, index: list[dict], info: dict[str, str], args: argparse.Namespace) -> str:
    gb = w.total_bytes / 1e9
    labels = {
        "shardckpt": "shardckpt `BundleWriter(durable=False)` / `BundleReader.read` (CRC checked)",
        "shardckpt_durable": "shardckpt `BundleWriter()` (durable=True: fsync data, index, directory)",
        "tensorflow": "TensorFlow `raw_ops.SaveV2` / `RestoreV2` + `.numpy()` (CRC checked, no fsync)",
        "safetensors": "safetensors.numpy `save_file` / `load_file` (no checksum)",
        "raw": "raw ceiling: one `os.write` / one `os.preadv` into a touched buffer",
    }
    lines = [
        START,
        "## Format: one bundle, save and read (`benchmarks/bench_format.py`)",
        "",
        f"Run `{' '.join(['python', 'benchmarks/bench_format.py'] + sys.argv[1:])}` on {info['date']}.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
        f"files on {info['filesystem']}; Python {info['python']}, numpy {info['numpy']}, "
        f"TensorFlow {info['tensorflow']}, safetensors {info['safetensors']}, crc32c {info['crc32c']}, "
        f"ml_dtypes {info['ml_dtypes']}.",
        "",
        f"Workload: one bundle of {w.total_bytes / (1 << 30):.3f} GiB ({w.total_bytes:,} bytes) in {len(w.names)} "
        f"tensors in interleaved order: {w.describe()}; fixed seed (safetensors gets the bfloat16 tensors as "
        "float16 views of the same bytes: its numpy API has no bfloat16). "
        f"{args.reps} repetitions after one warm-up; each repetition runs every system in an order rotated by one "
        "each time. Before each timed save the previous files are deleted and `os.sync()` is called (both "
        "untimed); each read follows its own save and an `os.sync()`, so **reads come from the page cache**. "
        "Objects alive after setup (TensorFlow's included) are moved out of the cyclic GC's reach with "
        "`gc.freeze()`, and `gc.collect()` runs untimed before each operation. "
        "Times are wall-clock seconds: median [min-max]; GB/s = 10^9 bytes / median.",
        "",
        "| system | save s | save GB/s | read s | read GB/s |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(xs: list[float]) -> tuple[str, str]:
        if not xs:
            return "-", "-"
        m = statistics.median(xs)
        return f"{m:.3f} [{min(xs):.3f}-{max(xs):.3f}]", f"{gb / m:.2f}"

    for k, t in times.items():
        s_cell, s_rate = cell(t["save"])
        r_cell, r_rate = cell(t["read"])
        lines.append(f"| {labels.get(k, k)} | {s_cell} | {s_rate} | {r_cell} | {r_rate} |")
        if "restore_only" in t:
            ro_cell, ro_rate = cell(t["restore_only"])
            lines.append(
                f"| TensorFlow `RestoreV2` alone (EagerTensors, no `.numpy()` copy) | | | {ro_cell} | {ro_rate} |"
            )
    lines += [
        "",
        "Same-repetition ratios, shardckpt time / other time (below 1: shardckpt faster): median [min-max] over "
        "the repetitions.",
        "",
        "| ratio | save | read |",
        "| --- | --- | --- |",
    ]
    sc = times["shardckpt"]
    for k, label in (
        ("tensorflow", "shardckpt / TensorFlow"),
        ("safetensors", "shardckpt / safetensors"),
        ("raw", "shardckpt / raw ceiling"),
    ):
        if k not in times:
            continue
        s = _ratio_stats(sc["save"], times[k]["save"])
        r = _ratio_stats(sc["read"], times[k]["read"])
        lines.append(f"| {label} | {s[0]:.2f} [{s[1]:.2f}-{s[2]:.2f}] | {r[0]:.2f} [{r[1]:.2f}-{r[2]:.2f}] |")
    if "tensorflow" in times:
        r = _ratio_stats(sc["read"], times["tensorflow"]["restore_only"])
        lines.append(
            f"| shardckpt / TensorFlow `RestoreV2` alone (no numpy arrays) | | {r[0]:.2f} [{r[1]:.2f}-{r[2]:.2f}] |"
        )
        s = _ratio_stats(times["shardckpt_durable"]["save"], times["tensorflow"]["save"])
        lines.append(
            f"| shardckpt durable=True / TensorFlow (TF does not fsync) | {s[0]:.2f} [{s[1]:.2f}-{s[2]:.2f}] | |"
        )
    lines += [
        "",
        f"Index micro-benchmark: an index of {index[0]['entries']:,} entries, median [min-max] of "
        f"{len(index[0]['build'])} runs: `build_index` (sort, encode, SSTable), then a `Table` over the bytes "
        "iterated with `decode_entry` on every entry, then `Table.get` (what `BundleReader.entry` does per "
        f"tensor) on {index[0]['lookups']:,} random keys.",
        "",
        "| shapes | .index bytes | build_index s | iterate + decode s | Table.get µs per key |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in index:
        b, p, g = r["build"], r["parse"], r["get"]
        what = "all distinct (worst case for the shape caches)" if r["distinct"] else "8 repeating (layers)"
        lines.append(
            f"| {what} | {r['bytes']:,} | {statistics.median(b):.3f} [{min(b):.3f}-{max(b):.3f}] | "
            f"{statistics.median(p):.3f} [{min(p):.3f}-{max(p):.3f}] | "
            f"{statistics.median(g) * 1e6:.0f} [{min(g) * 1e6:.0f}-{max(g) * 1e6:.0f}] |"
        )
    lines += [
        "",
        "How to read these numbers: on these VMs, memory that was not recently used costs about 2 µs per 4 KiB "
        "page to fault in (about 0.5 s per GiB), and the page cache and the allocator carry state from one run to "
        "the next, so a single system's throughput swings between about 0.5 and 3.3 GB/s from run to run. Only "
        "the ratios between systems measured in the same run (the second table) are meaningful; compare "
        "absolute numbers across machines or runs with care. The raw read copies into a buffer that was touched "
        "beforehand, so it pays no page faults: it is a ceiling, not a like-for-like peer. Every other read "
        "allocates fresh arrays (one per tensor) and pays those faults; TensorFlow with `.numpy()` pays them twice "
        "(its own tensors, then the numpy copies).",
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="bundle size in GiB (default 1.0)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5, at least 1)")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a new temporary directory)")
    ap.add_argument("--index-entries", type=int, default=100_000)
    ap.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"),
        help="Markdown file to update",
    )
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating the file")
    ap.add_argument("--skip", action="append", default=[], choices=["tensorflow", "safetensors"])
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tf = st_save = st_load = None
    if "tensorflow" not in args.skip:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf  # noqa: F811
    if "safetensors" not in args.skip:
        from safetensors.numpy import load_file as st_load  # noqa: F811
        from safetensors.numpy import save_file as st_save  # noqa: F811

    t0 = time.perf_counter()
    w = make_workload(args.size_gb)
    log(
        f"workload: {len(w.names)} tensors, {w.total_bytes / (1 << 30):.3f} GiB, built in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    workdir = tempfile.mkdtemp(prefix="bench_format_", dir=args.dir)
    try:
        systems, blob = build_systems(w, workdir, tf=tf, st_save=st_save, st_load=st_load)
        # TensorFlow's import leaves ~a million Python objects; frozen, the cyclic GC stops rescanning them
        # inside whichever timed call happens to trigger a full collection.
        gc.collect()
        gc.freeze()
        times = run(w, systems, blob, args.reps, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log("index micro-benchmark ...")
    index = bench_index(args.index_entries, args.reps)
    info = machine_info(args.dir or tempfile.gettempdir())
    section = render(w, times, index, info, args)
    if args.no_write:
        print(section)
    else:
        write_section(args.output, section, START, END)
        print(section)
        log(f"updated {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
