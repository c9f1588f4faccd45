"""``shardckpt demo``: write an example model as a sharded checkpoint, read it back other ways, verify."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from .format import BundleReader, BundleWriter, merge_bundles


def _model(size_mb: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = max(64, int((size_mb * (1 << 20) / 4 / 8) ** 0.5) // 4 * 4)
    model = {f"layer_{i}/kernel": rng.standard_normal((side, side), dtype=np.float32) for i in range(8)}
    model.update({f"layer_{i}/bias": rng.standard_normal(side, dtype=np.float32) for i in range(8)})
    model["embedding/uneven"] = rng.standard_normal((side + 3, 96), dtype=np.float32)
    model["step"] = np.array(1000, dtype=np.int64)
    return model


def run_demo(args: argparse.Namespace) -> int:
    workdir = args.dir or tempfile.mkdtemp(prefix="shardckpt-demo-")
    os.makedirs(workdir, exist_ok=True)
    prefix = os.path.join(workdir, "ckpt")
    clients = 4
    try:
        model = _model(args.size_mb)
        total = sum(a.nbytes for a in model.values())
        print(f"model: {len(model)} tensors, {total / (1 << 20):.1f} MiB; {clients} writers, each its own file")
        start = time.perf_counter()
        parts = []
        for c in range(clients):
            part = f"{prefix}_dev-{c}-of-{clients}"
            with BundleWriter(part) as w:
                for name, array in model.items():
                    if array.ndim == 0 or name.endswith("bias"):
                        if c == 0:
                            w.add(name, array)  # replicated: one writer
                        continue
                    rows = np.array_split(np.arange(array.shape[0]), clients)[c]
                    if len(rows):
                        spec = f"{' '.join(map(str, array.shape))} {rows[0]},{len(rows)}:-"
                        w.add_slice(name, spec, array[rows[0] : rows[-1] + 1])
            parts.append(part)
        merge_bundles(parts, prefix)
        save_s = time.perf_counter() - start
        files = sorted(f for f in os.listdir(workdir) if f.startswith("ckpt"))
        print(f"saved  {prefix}: {len(files)} files, {total / save_s / 1e9:.2f} GB/s ({save_s:.2f} s)")

        start = time.perf_counter()
        with BundleReader(prefix) as reader:
            for name, array in model.items():
                if not np.array_equal(reader.read(name), array):
                    print(f"MISMATCH in {name}")
                    return 1
        read_s = time.perf_counter() - start
        print(f"restored whole tensors: {total / read_s / 1e9:.2f} GB/s ({read_s:.2f} s), all values equal")

        start = time.perf_counter()
        nbytes = 0
        with BundleReader(prefix) as reader:
            for name, array in model.items():
                if array.ndim != 2:
                    continue
                cols = np.array_split(np.arange(array.shape[1]), 3)
                for piece in cols:  # another layout: 3 column blocks
                    spec = f"{array.shape[0]} {array.shape[1]} -:{piece[0]},{len(piece)}"
                    got = reader.read_slice(name, spec)
                    nbytes += got.nbytes
                    if not np.array_equal(got, array[:, piece[0] : piece[-1] + 1]):
                        print(f"MISMATCH in {name} columns {piece[0]}..{piece[-1]}")
                        return 1
        reshard_s = time.perf_counter() - start
        print(f"restored onto 3 column shards: {nbytes / reshard_s / 1e9:.2f} GB/s ({reshard_s:.2f} s), "
              "all values equal")
        print("OK")
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
