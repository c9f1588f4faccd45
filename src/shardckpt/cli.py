"""The ``shardckpt`` command line.

Exit codes: 0 success; 1 the checkpoint is bad or an operation failed (the
message says what and where); 2 the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError
from .format.dtypes import datatype_name
from .format.reader import BundleReader

log = logging.getLogger("shardckpt")


# One unit system in every output: binary (KiB, MiB, GiB and GiB/s), in the bars as in the summaries.
BAR_UNITS: dict[str, Any] = {
    "unit": "iB", "unit_scale": True, "unit_divisor": 1024,
    "bar_format": "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}iB/{total_fmt}iB [{elapsed}<{remaining}, {rate_fmt}]",
}
# Below this many bytes a command is over before a bar would tell anything.
BAR_MIN_BYTES = 64 << 20


def bars_wanted(quiet: bool = False, json_output: bool = False) -> bool:
    """Progress bars go to stderr only when it is a terminal, and never with --quiet or --json."""
    if quiet or json_output:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _target(path: str) -> tuple[str, dict[str, object]]:
    """The checkpoint a command-line argument names, and (for a directory with a TensorFlow ``checkpoint``
    state file) the checkpoints that file lists: ``{"directory", "checkpoints": [{prefix, exists, latest}]}``."""
    from .checkpoint_reader import checkpoint_exists, checkpoint_state, resolve_checkpoint

    prefix = resolve_checkpoint(path)
    if prefix == path:
        return prefix, {}
    model, paths = checkpoint_state(path)
    if model is not None and model not in paths:
        paths.append(model)
    listed = [{"prefix": p, "exists": checkpoint_exists(p), "latest": p == prefix} for p in paths]
    return prefix, {"directory": path, "checkpoints": listed}


def _print_listing(listing: dict[str, object]) -> None:
    if listing:
        print(f"checkpoints in {listing['directory']} (its 'checkpoint' state file):")
        for c in listing["checkpoints"]:  # type: ignore[attr-defined]
            mark = " (latest, inspected below)" if c["latest"] else ("" if c["exists"] else " (missing)")
            print(f"  {c['prefix']}{mark}")


def _describe_v1(prefix: str) -> list[dict[str, object]]:
    from .checkpoint_reader import tf_dtype_name
    from .format.v1 import V1Reader

    reader = V1Reader(prefix)
    return [{"name": name, "dtype": tf_dtype_name(t.dtype), "shape": list(t.shape),
             "slices": [] if len(t.slices) == 1 and t.slices[0][0].covers(t.shape) else [str(s) for s, _ in t.slices],
             "bytes": reader.stored_bytes(name),
             "data_files": sorted({os.path.basename(reader.files[i]) for _, i in t.slices})}
            for name, t in sorted(reader.tensors.items())]


def interrupted_save_hint(prefix: object) -> str | None:
    """What an interrupted save left at ``prefix`` (staged or temporary files, a lease) and what to do, or None."""
    if not isinstance(prefix, str) or "://" in prefix:
        return None
    from .commit import leftovers
    from .lease import lease_filename

    files = sorted(f for group in leftovers(prefix).values() for f in group)
    lease = lease_filename(prefix)
    if os.path.lexists(lease):
        files.append(lease)
    if not files:
        return None
    total = 0
    for f in files:
        try:
            total += os.lstat(f).st_size
        except OSError:
            pass
    shown = "\n".join(f"  {f}" for f in files[:10]) + (f"\n  ... and {len(files) - 10} more" if len(files) > 10
                                                        else "")
    return (f"{prefix}: no index, but {len(files)} file(s) ({_human(total)}) of an interrupted save:\n{shown}\n"
            f"run 'shardckpt clean {prefix}' to finish it (if it passed its commit point) or remove them")


def describe(prefix: str) -> list[dict[str, object]]:
    """One record per tensor: name, dtype, shape, slices, bytes and the data files holding it."""
    from .format.v1 import is_v1_checkpoint

    if not os.path.exists(prefix + ".index") and is_v1_checkpoint(prefix):
        return _describe_v1(prefix)
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


def _print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    """``shardckpt inspect``: print one row per tensor (or a JSON report); exit status 0."""
    prefix, listing = _target(args.prefix)
    rows = describe(prefix)
    if args.json:
        _print_json({"prefix": prefix, **listing, "tensors": rows})
        return 0
    _print_listing(listing)
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
    print(f"{len(rows)} tensors, {_human(total)} in {prefix}")
    return 0


def verify_checkpoint(prefix: str, progress: bool | None = None) -> tuple[int, int, list[str]]:
    """Check every index block and every stored tensor's CRC32C; returns (tensors, bytes, problems).

    ``progress``: draw a bar on stderr (None: when stderr is a terminal)."""
    from tqdm import tqdm

    problems: list[str] = []
    from .format.v1 import V1Reader, is_v1_checkpoint

    if not os.path.exists(prefix + ".index") and is_v1_checkpoint(prefix):
        # A V1 file is one table: opening it checks every block's CRC, reading a tensor decodes its records.
        v1 = V1Reader(prefix)
        for name in v1.names():
            try:
                v1.read(name)
            except CheckpointError as exc:
                problems.append(str(exc))
        return len(v1.tensors), sum(os.path.getsize(f) for f in v1.files), problems
    # Mapped, not copied: the CRC reads the page cache in place and nothing is kept.
    with BundleReader(prefix, mmap=True) as reader:
        items = list(reader.entries())  # walks and checks every index block
        pieces = []
        for name, entry in items:
            try:
                pieces.extend(reader.stored_slices(name, entry))
            except CheckpointError as exc:
                problems.append(str(exc))
        total = sum(p.entry.size for p in pieces)
        done = 0
        show = bars_wanted() if progress is None else progress
        with tqdm(total=total, **BAR_UNITS, disable=not show or total < BAR_MIN_BYTES, desc="verify",
                  file=sys.stderr) as bar:
            for p in pieces:
                try:
                    reader.check_stored(p)  # DT_VARIANT too, as its stored bytes
                except CheckpointError as exc:
                    problems.append(str(exc))
                done += p.entry.size
                bar.update(p.entry.size)
    return len(items), done, problems


def cmd_verify(args: argparse.Namespace) -> int:
    """``shardckpt verify``: check every checksum; exit status 0 when all match, 1 otherwise."""
    start = time.perf_counter()
    args.prefix, _ = _target(args.prefix)  # a directory: its latest checkpoint
    count, nbytes, problems = verify_checkpoint(args.prefix, progress=bars_wanted(args.quiet, args.json))
    for problem in ([] if args.json else problems):
        print(f"FAIL: {problem}")
    elapsed = time.perf_counter() - start
    if args.json:
        _print_json({"prefix": args.prefix, "ok": not problems, "tensors": count, "bytes": nbytes,
                     "problems": problems, "seconds": round(elapsed, 3)})
        return 1 if problems else 0
    if problems:
        print(f"{args.prefix}: {len(problems)} problem(s) in {count} tensors")
        return 1
    print(f"OK: {args.prefix}: {count} tensors, {_human(nbytes)} verified in {elapsed:.2f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``shardckpt demo``: save, restore and check an example model; exit status 0 when every value matches."""
    from .demo import run_demo

    return run_demo(args)


def cmd_clean(args: argparse.Namespace) -> int:
    """``shardckpt clean``: finish or discard an interrupted save at the prefix, printing each action; exit status 0.

    It takes the prefix's lease first, so it never touches a live save's files: with a save in progress it
    fails (exit status 1) naming the save's holder.  A directory (a DCP or Orbax step directory, a manager's)
    stands for every prefix directly in it that has something left over.
    """
    from .commit import leftovers, recover
    from .lease import CLEANER, PrefixLease

    prefixes = _prefixes_with_leftovers(args.prefix) if os.path.isdir(args.prefix) else [args.prefix]
    for prefix in prefixes:
        actions: list[str] = []
        if leftovers(prefix):  # (nothing left over: no lease needed, so a read-only directory is fine)
            with PrefixLease.acquire(prefix, what=CLEANER):
                actions = recover(prefix)
        for line in actions:
            print(line)
        print(f"{prefix}: {'nothing to clean' if not actions else f'{len(actions)} action(s)'}")
    if not prefixes:
        print(f"{args.prefix}: nothing to clean")
    return 0


# What a save leaves behind: P.index or P.data-R-of-N (and its .crc32c sidecar), staged or temporary.
_LEFTOVER = re.compile(r"^(.+)\.(?:index|data-\d+-of-\d+(?:\.crc32c)?)(?:\.staging-|\.tempstate)")


def _prefixes_with_leftovers(directory: str) -> list[str]:
    """The prefixes directly in ``directory`` that staged or temporary files belong to, sorted."""
    found = {m.group(1) for m in map(_LEFTOVER.match, os.listdir(directory)) if m}
    return [os.path.join(directory, base) for base in sorted(found)]


def cmd_launch(args: argparse.Namespace) -> int:
    """``shardckpt launch``: run the command as N local clients; exit status 0, else the first failing client's."""
    from .launch import launch

    if not args.command_line:
        raise SystemExit("shardckpt launch: name a script or command to run")
    for flag, value in (("--max-frame-bytes", args.max_frame_bytes), ("--max-client-bytes", args.max_client_bytes)):
        if value is not None and not 0 < value < 1 << 32:
            raise SystemExit(f"shardckpt launch: {flag} must be between 1 and 2^32-1, not {value}")
    return launch(args.nproc, args.command_line, host=args.host, port=args.port,
                  max_frame_bytes=args.max_frame_bytes, max_client_bytes=args.max_client_bytes,
                  master_addr=args.master_addr, master_port=args.master_port, prefix_output=not args.no_prefix)


class _Bar:
    """A byte progress bar on stderr, drawn once the first progress call gives the total (only on a terminal,
    never with --quiet or --json, and not below 64 MiB).

    Its clock starts when the command starts, not at that first call: the first call comes after the first
    tensor was read, and timing that tensor's bytes from then on gave a rate of nearly nothing over nearly no
    time (a ``diff`` of one large tensor showed tens of GB/s).
    """

    def __init__(self, desc: str, quiet: bool, json_output: bool = False) -> None:
        self.desc, self.show = desc, bars_wanted(quiet, json_output)
        self._bar: Any = None
        self._start = time.time()  # tqdm's own clock

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, **BAR_UNITS, desc=self.desc, file=sys.stderr,
                             disable=not self.show or total < BAR_MIN_BYTES)
            self._bar.start_t = self._bar.last_print_t = self._start
        self._bar.update(done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def cmd_convert(args: argparse.Namespace) -> int:
    """``shardckpt convert``: checkpoint to safetensors or back.

    Exit status 0 converted, 1 unreadable input or failed write, 2 when not exactly one side is ``.safetensors``.
    """
    from .convert import checkpoint_to_safetensors, display_name, is_safetensors_path, safetensors_to_checkpoint

    from_st, to_st = is_safetensors_path(args.source), is_safetensors_path(args.destination)
    if from_st == to_st:
        print("shardckpt convert: exactly one of SOURCE and DESTINATION must end in .safetensors "
              f"(got {args.source!r} and {args.destination!r})", file=sys.stderr)
        return 2
    bar = _Bar("convert", args.quiet, args.json)
    try:
        convert = safetensors_to_checkpoint if from_st else checkpoint_to_safetensors
        report = convert(args.source, args.destination, skip_unsupported=args.skip_unsupported,
                         overwrite=args.overwrite, progress=bar)
    except OSError as exc:  # CheckpointIOError names the prefix and file; a bare OSError may not
        where = "" if isinstance(exc, CheckpointError) else f"{args.source} -> {args.destination}: "
        print(f"error: {where}{exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    if args.json:
        _print_json(report.to_json())
        return 0
    for name, why in report.skipped:
        print(f"skipped {display_name(name)}: {why}")
    print(f"{report.source} -> {report.destination}: {report.tensors} tensors, {_human(report.bytes)}")
    return 0


def _diff_text(report: Any) -> None:
    from .convert import display_name

    print(f"A: {report.a}")
    print(f"B: {report.b}")
    for name in report.only_in_a:
        print(f"only in A: {display_name(name)}")
    for name in report.only_in_b:
        print(f"only in B: {display_name(name)}")
    if report.tensors:
        header = ("name", "dtype", "shape", "max |a-b|", "status")
        rows = []
        for t in report.tensors:
            dtype = t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a} -> {t.dtype_b}"
            shape = str(list(t.shape_a)) if t.shape_a == t.shape_b else f"{list(t.shape_a)} -> {list(t.shape_b)}"
            diff = "-" if t.max_abs_diff is None else (f"{t.max_abs_diff:.6g}" if isinstance(t.max_abs_diff, float)
                                                      else str(t.max_abs_diff))
            status = "same" if t.equal and not t.note else ("same, " + t.note if t.equal else "DIFFERENT")
            if not t.equal and t.note:
                status += ": " + t.note
            rows.append((display_name(t.name), dtype, shape, diff, status))
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
        for row in [header, tuple("-" * w for w in widths), *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    differing = sum(not t.equal for t in report.tensors)
    if report.identical:
        print(f"identical: {len(report.tensors)} tensors")
    else:
        print(f"different: {len(report.only_in_a)} only in A, {len(report.only_in_b)} only in B, "
              f"{differing} of {len(report.tensors)} common tensors differ")


def cmd_diff(args: argparse.Namespace) -> int:
    """``shardckpt diff``: compare two checkpoints; exit status 0 identical, 1 different, 2 unreadable input."""
    from .diff import diff_tensors

    bar = _Bar("diff", args.quiet, args.json)
    try:
        report = diff_tensors(args.a, args.b, atol=args.atol, progress=bar)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    if args.json:
        _print_json(report.to_json())
    else:
        _diff_text(report)
    return 0 if report.identical else 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line; each subcommand sets ``func`` to its ``cmd_*`` handler."""
    parser = argparse.ArgumentParser(
        prog="shardckpt",
        description="Save, restore and check sharded tensors in TensorFlow's V2 checkpoint format.\n"
        "A checkpoint is named by its prefix (the path without .index); where noted, a directory holding\n"
        "a TensorFlow 'checkpoint' state file stands for its latest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="'shardckpt COMMAND --help' explains each command.\n\n"
        "Exit codes: 0 success, 1 bad checkpoint or failed operation, 2 bad command line\n"
        "(diff: 0 identical, 1 different, 2 trouble, as diff(1)).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the tensors of a checkpoint",
                       description="List every tensor: name, dtype, shape, slices, bytes and data file.")
    p.add_argument("prefix", help="checkpoint prefix (the path without .index), a V1 checkpoint file, or a "
                   "directory with a 'checkpoint' state file (its checkpoints are listed, the latest inspected)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum of a checkpoint",
                       description="Read every index block and every tensor and check their CRC32C. "
                       "Exit status 0 when all match, 1 otherwise.")
    p.add_argument("prefix", help="checkpoint prefix (the path without .index), a V1 checkpoint file, or a "
                   "directory with a 'checkpoint' state file (its latest checkpoint)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable result (exit status as without it)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("clean", help="finish or remove what an interrupted save left behind",
                       description="Look for staging files of an interrupted save at PREFIX: complete its commit "
                       "if it had passed its commit point, else delete them. Never deletes a committed checkpoint.")
    p.add_argument("prefix", help="checkpoint prefix (the path without .index), or a directory: every prefix in it")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("launch", help="run a script as N local clients with a coordinator (like torchrun)",
                       description="Start N copies of a script (or command) on this machine. Each gets "
                       "SHARDCKPT_RANK, SHARDCKPT_WORLD_SIZE, SHARDCKPT_COORDINATOR and its own "
                       "SHARDCKPT_COORDINATOR_KEY (the coordinator admits only connections that prove they hold "
                       "such a key), so shardckpt calls in it coordinate with no further setup; and what torchrun "
                       "sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so "
                       "torch.distributed.init_process_group() works too. Output lines are prefixed [rankN]. "
                       "If one client fails, the others are stopped and the launcher exits non-zero.")
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of clients")
    p.add_argument("--host", default="127.0.0.1", help="address the coordinator binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: any free port)")
    p.add_argument("--master-addr", default="127.0.0.1",
                   help="MASTER_ADDR given to the clients for torch.distributed (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=0,
                   help="MASTER_PORT given to the clients (default: a port free at launch)")
    p.add_argument("--no-prefix", action="store_true",
                   help="pass the clients' output through as is, without the [rankN] line prefixes")
    p.add_argument("--max-frame-bytes", type=int, default=None, metavar="N",
                   help="largest value one client may send the coordinator in one collective "
                   "(default: SHARDCKPT_MAX_FRAME_BYTES or 256 MiB)")
    p.add_argument("--max-client-bytes", type=int, default=None, metavar="N",
                   help="most bytes one client may hold in the coordinator's store (default: 4 frames)")
    p.add_argument("command_line", nargs=argparse.REMAINDER, help="script.py [args...], -m module, or a command")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser(
        "convert", help="convert a checkpoint to a .safetensors file, or back",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert between a TensorFlow V2 checkpoint and a safetensors file; the direction follows "
        "from which\nargument ends in .safetensors.\n\n"
        "  checkpoint -> safetensors: every tensor, partitioned ones assembled from their slices; all tensors\n"
        "      are held in memory while the file is written.  Strings, complex128, int4 and quantized\n"
        "      types have no safetensors dtype: the command fails naming them unless --skip-unsupported.\n"
        "  safetensors -> checkpoint: one single-writer checkpoint at DESTINATION that TensorFlow reads.\n\n"
        "bfloat16 and float8 keep their dtypes both ways.  Nothing appears at DESTINATION until it is\n"
        "complete; an existing DESTINATION is replaced only with --overwrite.",
        epilog="examples:\n  shardckpt convert /ckpts/ckpt-1000 model.safetensors\n"
        "  shardckpt convert /ckpts latest.safetensors        (a directory: its latest checkpoint)\n"
        "  shardckpt convert model.safetensors /ckpts/imported\n\n"
        "exit status: 0 converted, 1 bad input or failed conversion, 2 bad command line.")
    p.add_argument("source", metavar="SOURCE", help="checkpoint prefix or directory, or a .safetensors file")
    p.add_argument("destination", metavar="DESTINATION", help="a .safetensors file, or a checkpoint prefix")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="leave out tensors the destination cannot hold (listed on output) instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "diff", help="compare two checkpoints or safetensors files tensor by tensor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare A and B (each a checkpoint prefix, a checkpoint directory or a .safetensors file):\n"
        "names only in A or only in B, dtype and shape differences, and for every common tensor the\n"
        "maximum absolute difference and how many elements differ.  Values compare by value (NaN equals\n"
        "NaN at the same position); partitioned tensors are assembled first.",
        epilog="examples:\n  shardckpt diff run1/ckpt-100 run2/ckpt-100\n"
        "  shardckpt diff --json --atol 1e-6 /ckpts/ckpt-7 model.safetensors\n\n"
        "exit status (as diff(1)): 0 identical, 1 different, 2 trouble (unreadable input, bad command line).")
    p.add_argument("a", metavar="A", help="checkpoint prefix or directory, or a .safetensors file")
    p.add_argument("b", metavar="B", help="checkpoint prefix or directory, or a .safetensors file")
    p.add_argument("--atol", type=float, default=0.0,
                   help="count tensors whose values differ by at most ATOL as equal (default 0)")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("demo", help="save, restore and verify an example checkpoint",
                       description="Write an example model as a checkpoint, read it back, verify every value "
                       "and print a summary.")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    p.add_argument("--size-mb", type=int, default=1024, help="approximate model size in MiB (default 1024)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    A `CheckpointError`, or an `OSError` (named by the command's prefix), is printed and gives 1; a bad
    command line exits with 2 (argparse's `SystemExit`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        hint = interrupted_save_hint(getattr(args, "prefix", None)) if isinstance(exc, CheckpointNotFoundError) \
            else None
        if hint:
            print(hint, file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. `clean` in a read-only directory: no traceback, and say where
        where = getattr(args, "prefix", None)
        print(f"error: {where}: {exc}" if where else f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
