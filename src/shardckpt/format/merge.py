"""Merging bundles into one, with ``MergeV2Checkpoints`` semantics.

Entries of every input are gathered in input order; data files are renumbered in
the order they are first referenced and renamed to the destination's names; the
destination index is written last.  Two TensorFlow bugs are not copied: the
destination's own index is never deleted when it is also an input, and the
header's ``num_shards`` always equals the ``-of-`` count of the data files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, DuplicateTensorError
from .files import data_filename, fsync_directory, index_filename
from .protos import BundleEntry, BundleHeader
from .reader import BundleReader
from .writer import build_index, write_file_atomically


def merge_bundles(
    prefixes: Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    *,
    allow_missing_files: bool = False,
    delete_old_dirs: bool = True,
    durable: bool = True,
) -> BundleHeader:
    """Merge the bundles at ``prefixes`` into one bundle at ``destination``; returns its header."""
    dest = os.fspath(destination)
    dest_dir = os.path.dirname(dest)
    if dest_dir:
        os.makedirs(dest_dir, exist_ok=True)
    merged: dict[bytes, BundleEntry] = {}
    renames: dict[str, int] = {}  # old data path -> new shard id, in first-reference order
    first: BundleHeader | None = None
    inputs: list[str] = []
    for p in [os.fspath(x) for x in prefixes]:
        if not os.path.exists(index_filename(p)):
            if allow_missing_files:
                continue
            raise CheckpointNotFoundError(f"allow_missing_files was set to false and {p} did not exist.")
        inputs.append(p)
        with BundleReader(p) as reader:
            header = reader.header
            if first is None:
                first = header
            elif header.endianness != first.endianness or header.version != first.version:
                raise CorruptCheckpointError(
                    f"merging {p}: endianness or version differ from the first bundle merged"
                )
            for key, entry in reader.raw_entries():
                if not entry.slices and key not in merged:
                    old = data_filename(p, entry.shard_id, header.num_shards)
                    entry.shard_id = renames.setdefault(old, len(renames))
                combine_entry(merged, key, entry, f"prefix: {p}")

    if first is None:
        raise CheckpointNotFoundError("At least one prefix checkpoint file must exist, but none existed.")
    count = len(renames)
    _rename_all({old: data_filename(dest, new, count) for old, new in renames.items()})
    header = BundleHeader(num_shards=count, endianness=first.endianness, version=first.version)
    write_file_atomically(index_filename(dest), build_index(header, merged), durable=durable)
    if durable:
        fsync_directory(dest_dir)
    for p in inputs:
        if os.path.abspath(p) != os.path.abspath(dest):
            try:
                os.unlink(index_filename(p))
            except OSError:
                pass
    if delete_old_dirs:
        for d in {os.path.dirname(p) for p in inputs}:
            if os.path.abspath(d or ".") != os.path.abspath(dest_dir or "."):
                try:
                    os.rmdir(d)  # only succeeds when empty, as TensorFlow's DeleteDir
                except OSError:
                    pass
    return header


def combine_entry(merged: dict[bytes, BundleEntry], key: bytes, entry: BundleEntry, source: str) -> None:
    """Add one entry to a merged index: a new key is stored, a partitioned tensor gains the new slices."""
    seen = merged.get(key)
    if seen is None:
        merged[key] = entry
        return
    label = key.decode("utf-8", "replace")
    if not seen.slices:
        raise DuplicateTensorError(f"Duplicate tensor keyed by {label} encountered, when merging {source}")
    if not entry.slices or entry.dtype != seen.dtype or entry.shape != seen.shape:
        raise CorruptCheckpointError(
            f"merging {source}: partitioned tensor {label} has another dtype, shape or an unpartitioned entry"
        )
    seen.slices.extend(entry.slices)


def _rename_all(moves: dict[str, str]) -> None:
    """Rename many files where a target may be another move's source: go through unique temps then."""
    moves = {a: b for a, b in moves.items() if a != b}
    sources = set(moves)
    if any(b in sources for b in moves.values()):
        staged = {}
        for i, (a, b) in enumerate(moves.items()):
            tmp = f"{b}.merging{i}"
            os.replace(a, tmp)
            staged[tmp] = b
        moves = staged
    for a, b in moves.items():
        try:
            os.replace(a, b)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"data file {a} is missing; cannot merge it into {b}") from None
