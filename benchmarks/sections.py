"""Each benchmark owns one section of BENCHMARKS.md, between its own start and end markers, and rewrites only it."""

from __future__ import annotations

import os

NEW_FILE = ("# Benchmarks\n\nMeasured speed of shardckpt against TensorFlow and safetensors. Each benchmark script "
            "under `benchmarks/` rewrites only its own section, between its start and end markers.\n\n")


def write_section(path: str, block: str, start: str, end: str) -> None:
    """Put ``block`` (which begins with ``start`` and ends with ``end``) in place of the file's section between
    those markers, or at the end of the file the first time; everything outside the section is kept as it is."""
    if not (block.startswith(start) and block.rstrip("\n").endswith(end)):
        raise ValueError(f"the block must run from {start} to {end}")
    current = NEW_FILE
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            current = f.read()
    if start in current and end in current:
        head, rest = current.split(start, 1)
        new = head + block.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = current.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)
