"""Reads a prefix in a loop while another process overwrites it; reports what it saw."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import shardckpt as sc


def main(prefix: str, seconds: float, out: str) -> int:
    seen = {"complete": 0, "absent": 0, "mixed": 0, "errors": [], "versions": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with sc.load_checkpoint(prefix) as reader:
                values = {name: reader.get_tensor(name) for name in ("a", "b", "c")}
        except sc.CheckpointNotFoundError:
            seen["absent"] += 1
            continue
        except sc.CheckpointError as exc:
            seen["errors"].append(f"{type(exc).__name__}: {exc}")
            continue
        versions = {int(np.unique(v)[0]) if np.unique(v).size == 1 else -1 for v in values.values()}
        if len(versions) == 1 and -1 not in versions:
            seen["complete"] += 1
            seen["versions"].append(versions.pop())
        else:
            seen["mixed"] += 1
    with open(out, "w") as f:
        json.dump(seen, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))
