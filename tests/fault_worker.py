"""One client of a fault-injection run: save version V of a small model over a 2x2 mesh, report the outcome."""

from __future__ import annotations

import sys
import time

import numpy as np

import shardckpt as sc


def model(version: int) -> dict[str, np.ndarray]:
    base = np.arange(24 * 16, dtype=np.float32).reshape(24, 16)
    return {
        "kernel": base + 1000 * version,
        "uneven": np.arange(7 * 3, dtype=np.int64).reshape(7, 3) + 1000 * version,
        "bias": np.full(16, version, np.float64),
        "names": np.array([f"v{version}-{i}".encode() for i in range(4)], dtype=object),
    }


def main(prefix: str, version: int, timeout: float) -> int:
    coord = sc.coordination.resolve(None)
    mesh = sc.create_mesh([("x", 2), ("y", 2)])
    local = mesh.local_devices(coord.rank, coord.size)
    m = model(version)
    tensors = [
        sc.DTensor.from_global(m["kernel"], sc.Layout(["x", "y"], mesh), local),
        sc.DTensor.from_global(m["uneven"], sc.Layout(["x", sc.UNSHARDED], mesh), local),
        m["bias"],
        sc.DTensor.from_global(m["names"], sc.Layout(["y"], mesh), local),
    ]
    start = time.monotonic()
    try:
        sc.sharded_save(mesh, prefix, list(m), [""] * len(m), tensors, overwrite=True, timeout=timeout)
        print(f"client {coord.rank}: OK {time.monotonic() - start:.2f}s", flush=True)
    except sc.CheckpointError as exc:
        print(f"client {coord.rank}: {type(exc).__name__} after {time.monotonic() - start:.2f}s: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
