"""The ``shardckpt`` command line.

Exit codes: 0 success; 1 the checkpoint is bad or an operation failed (the
message says what and where); 2 the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from .errors import CheckpointError
from .format.dtypes import datatype_name
from .format.reader import BundleReader

log = logging.getLogger("shardckpt")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(prefix: str) -> list[dict[str, object]]:
    """One record per tensor: name, dtype, shape, slices, bytes and the data files holding it."""
    rows = []
    with BundleReader(prefix) as reader:
        num_shards = reader.header.num_shards
        for name, entry in reader.entries():
            pieces = reader.stored_slices(name, entry)
            rows.append(
                {
                    "name": name,
                    "dtype": datatype_name(entry.dtype),
                    "shape": list(entry.shape),
                    "slices": [str(s) for s in entry.slices],
                    "bytes": sum(p.entry.size for p in pieces),
                    "data_files": sorted(
                        {f"data-{p.entry.shard_id:05d}-of-{num_shards:05d}" for p in pieces}
                    ),
                }
            )
    return rows


def _files_cell(files: list[str]) -> str:
    return ",".join(files) if len(files) <= 2 else f"{files[0]} .. {files[-1]} ({len(files)} files)"


def cmd_inspect(args: argparse.Namespace) -> int:
    rows = describe(args.prefix)
    if args.json:
        json.dump({"prefix": args.prefix, "tensors": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = ("name", "dtype", "shape", "slices", "bytes", "data file")
    table = [
        (
            str(r["name"]),
            str(r["dtype"]),
            str(r["shape"]),
            str(len(r["slices"])) if r["slices"] else "-",  # type: ignore[arg-type]
            str(r["bytes"]),
            _files_cell(r["data_files"]),  # type: ignore[arg-type]
        )
        for r in rows
    ]
    widths = [max([len(h)] + [len(row[i]) for row in table]) for i, h in enumerate(header)]
    for row in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    total = sum(int(r["bytes"]) for r in rows)  # type: ignore[call-overload]
    print(f"{len(rows)} tensors, {_human(total)} in {args.prefix}")
    return 0


def verify_checkpoint(prefix: str, progress: bool | None = None) -> tuple[int, int, list[str]]:
    """Check every index block and every stored tensor's CRC32C; returns (tensors, bytes, problems)."""
    from tqdm import tqdm

    problems: list[str] = []
    with BundleReader(prefix) as reader:
        items = list(reader.entries())  # walks and checks every index block
        pieces = []
        for name, entry in items:
            try:
                pieces.extend(reader.stored_slices(name, entry))
            except CheckpointError as exc:
                problems.append(str(exc))
        total = sum(p.entry.size for p in pieces)
        done = 0
        with tqdm(total=total, unit="B", unit_scale=True, disable=progress is False or total < (64 << 20),
                  desc="verify", file=sys.stderr) as bar:
            for p in pieces:
                try:
                    reader.read_stored(p)
                except CheckpointError as exc:
                    problems.append(str(exc))
                done += p.entry.size
                bar.update(p.entry.size)
    return len(items), done, problems


def cmd_verify(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    count, nbytes, problems = verify_checkpoint(args.prefix, progress=None if not args.quiet else False)
    for problem in problems:
        print(f"FAIL: {problem}")
    elapsed = time.perf_counter() - start
    if problems:
        print(f"{args.prefix}: {len(problems)} problem(s) in {count} tensors")
        return 1
    print(f"OK: {args.prefix}: {count} tensors, {_human(nbytes)} verified in {elapsed:.2f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_clean(args: argparse.Namespace) -> int:
    from .commit import recover

    actions = recover(args.prefix)
    for line in actions:
        print(line)
    print(f"{args.prefix}: {'nothing to clean' if not actions else f'{len(actions)} action(s)'}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    if not args.command_line:
        raise SystemExit("shardckpt launch: name a script or command to run")
    return launch(args.nproc, args.command_line, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardckpt",
        description="Save, restore and check sharded tensors in TensorFlow's V2 checkpoint format.",
        epilog="Exit codes: 0 success, 1 bad checkpoint or failed operation, 2 bad command line.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the tensors of a checkpoint",
                       description="List every tensor: name, dtype, shape, slices, bytes and data file.")
    p.add_argument("prefix", help="checkpoint prefix (the path without .index)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum of a checkpoint",
                       description="Read every index block and every tensor and check their CRC32C. "
                       "Exit status 0 when all match, 1 otherwise.")
    p.add_argument("prefix")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("clean", help="finish or remove what an interrupted save left behind",
                       description="Look for staging files of an interrupted save at PREFIX: complete its commit "
                       "if it had passed its commit point, else delete them. Never deletes a committed checkpoint.")
    p.add_argument("prefix")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("launch", help="run a script as N local clients with a coordinator (like torchrun)",
                       description="Start N copies of a script (or command) on this machine. Each gets "
                       "SHARDCKPT_RANK, SHARDCKPT_WORLD_SIZE and SHARDCKPT_COORDINATOR, so shardckpt calls in it "
                       "coordinate with no further setup. If one client fails, the others are stopped and the "
                       "launcher exits non-zero.")
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of clients")
    p.add_argument("--host", default="127.0.0.1", help="address the coordinator binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: any free port)")
    p.add_argument("command_line", nargs=argparse.REMAINDER, help="script.py [args...], -m module, or a command")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("demo", help="save, restore and verify an example checkpoint",
                       description="Write an example model as a checkpoint, read it back, verify every value "
                       "and print a summary.")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    p.add_argument("--size-mb", type=int, default=1024, help="approximate model size in MiB (default 1024)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
