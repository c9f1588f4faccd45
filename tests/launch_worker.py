"""A client script for `shardckpt launch` tests: save or restore, or misbehave on purpose."""

from __future__ import annotations

import sys
import time

import numpy as np

import shardckpt as sc

W = np.arange(96, dtype=np.float32).reshape(12, 8)
R = np.arange(5, dtype=np.int32)


def main(action: str, prefix: str) -> int:
    coord = sc.coordination.resolve(None)
    if action == "save":
        mesh = sc.create_mesh([("x", 2), ("y", 2)])
        w = sc.DTensor.from_global(W, sc.Layout(["x", "y"], mesh), mesh.local_devices(coord.rank, coord.size))
        sc.sharded_save(mesh, prefix, ["w", "r"], ["", ""], [w, R], timeout=20)
        return 0
    if action.startswith("restore"):
        mode = action.partition(":")[2] or "columns"
        if mode == "same":  # the saving mesh and layouts
            mesh = sc.create_mesh([("x", 2), ("y", 2)])
            layouts = [sc.Layout(["x", "y"], mesh), sc.Layout([sc.UNSHARDED], mesh)]
        elif mode == "replicated":
            mesh = sc.create_mesh([("a", coord.size)])
            layouts = [sc.Layout.replicated(mesh, 2), sc.Layout.replicated(mesh, 1)]
        else:  # another mesh shape: columns over a 1-D mesh of every client
            mesh = sc.create_mesh([("a", coord.size)])
            layouts = [sc.Layout([sc.UNSHARDED, "a"], mesh), sc.Layout(["a"], mesh)]
        w, r = sc.sharded_restore(mesh, prefix, ["w", "r"], layouts)
        for t, g in ((w, W), (r, R)):
            for d, shard in t.shards.items():
                assert np.array_equal(shard, g[tuple(slice(a, b) for a, b in t.bounds(d))])
        return 0
    if action == "die":
        if coord.rank == 2:
            return 3  # exits with an error at once
        time.sleep(60)  # the launcher must stop us long before this
        return 0
    if action == "absent":
        if coord.rank == 1:
            time.sleep(8)
            return 0
        try:
            sc.sharded_save(sc.create_mesh([("x", 4)]), prefix, ["r"], [""], [R], timeout=2)
        except sc.ClientTimeoutError as exc:
            print(f"client {coord.rank}: {exc}", file=sys.stderr)
            return 0 if "[1]" in str(exc) else 1
        return 1
    raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
