"""Merging bundles into one, with ``MergeV2Checkpoints`` semantics.

Entries of every input are gathered in input order; data files are renumbered in
the order they are first referenced and take the destination's names; the
destination index is published last, as a save publishes (see `merge_bundles`).  Two TensorFlow bugs are not copied: the
destination's own index is never deleted when it is also an input, and the
header's ``num_shards`` always equals the ``-of-`` count of the data files.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Sequence

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, DuplicateTensorError
from .chunks import SUFFIX as SIDECAR_SUFFIX
from .chunks import ChunkSums, sidecar_filename
from .files import (
    STAGING,
    data_filename,
    index_filename,
    io_error,
    make_parent_directory,
    publish,
    staging_data_filename,
    staging_index_filename,
)
from .protos import BundleEntry, BundleHeader
from .reader import BundleReader
from .writer import build_index, write_file_atomically

log = logging.getLogger("shardckpt.merge")

# Where a hard link is impossible the data file is copied instead, so an input is never moved before the
# merged bundle is published.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def merge_bundles(
    prefixes: Sequence[str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    *,
    allow_missing_files: bool = False,
    delete_old_dirs: bool = True,
    durable: bool = True,
) -> BundleHeader:
    """Merge the bundles at ``prefixes`` into one bundle at ``destination``; returns its header.

    Every input is read and every data file it needs is checked before anything is written.  The merged
    bundle is staged beside ``destination`` (each input data file hard-linked, or copied where links are
    impossible, to its ``.staging-TOKEN`` name) and published like a save; only then are the inputs removed.
    A failure leaves the inputs and an older checkpoint at ``destination`` as they were.
    """
    dest = os.fspath(destination)
    dest_dir = os.path.dirname(dest)
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
                    if old not in renames:
                        _check_data_file(p, old, dest)
                    entry.shard_id = renames.setdefault(old, len(renames))
                combine_entry(merged, key, entry, f"prefix: {p}")

    if first is None:
        raise CheckpointNotFoundError("At least one prefix checkpoint file must exist, but none existed.")
    count = len(renames)
    header = BundleHeader(num_shards=count, endianness=first.endianness, version=first.version)
    make_parent_directory(dest)
    token = secrets.token_hex(8)
    staged_index = staging_index_filename(dest, token)
    moves = [(old, staging_data_filename(dest, new, count, token), data_filename(dest, new, count))
             for old, new in renames.items()]
    # Each data file's sidecar (chunk checksums) goes with it: the bytes and their offsets do not change.  An input
    # without one (TensorFlow's) gets an empty one, so that no older sidecar is left under the new name.
    sidecars = [(sidecar_filename(old), sidecar_filename(final) + STAGING + token, sidecar_filename(final))
                for old, _, final in moves]
    doing, path = "stage the data file", dest
    try:
        for (old, staged, _), (old_side, staged_side, _) in zip(moves, sidecars):
            path = staged
            _link_or_copy(old, staged, durable)
            path = staged_side
            if os.path.isfile(old_side):  # by its real path: a symlinked sidecar is linked as the file it names
                _link_or_copy(os.path.realpath(old_side), staged_side, durable)
            else:
                ChunkSums().save(staged_side, os.path.getsize(staged), durable)
        doing, path = "write the index", staged_index
        write_file_atomically(staged_index, build_index(header, merged), durable=durable)
        doing, path = "publish the index", index_filename(dest)
        publish(dest, staged_index, [(staged, final) for _, staged, final in moves], durable=durable,
                sidecars=[(staged_side, final_side) for _, staged_side, final_side in sidecars])
    except BaseException as exc:
        # Past the commit point (staged index complete, old index gone) the staged files are the checkpoint
        # and are left for `commit.recover`; before it, they are only links or copies, so dropping them
        # loses nothing.
        if os.path.lexists(index_filename(dest)) or not os.path.lexists(staged_index):
            for _, staged, _ in moves:
                _unlink_quietly(staged)
            for _, staged_side, _ in sidecars:
                _unlink_quietly(staged_side)
            _unlink_quietly(staged_index)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise io_error(exc, dest, path, doing) from exc
        raise

    # By real path: the same file may be named differently ("x/a", "./x/a"), and a hard link and its
    # source are the same inode, so only the name tells an input's file from the merged bundle's.
    finals = {os.path.realpath(f) for f in [*(final for _, _, final in moves), index_filename(dest)]}
    for p in inputs:
        if os.path.realpath(index_filename(p)) not in finals:
            _unlink_quietly(index_filename(p))  # before its data files: a left-over index stays complete
    for old, _, _ in moves:
        if os.path.realpath(old) not in finals:
            _unlink_quietly(old)
            _unlink_quietly(sidecar_filename(old))
    _remove_other_shard_counts(dest, count, finals)
    if delete_old_dirs:
        for d in {os.path.dirname(p) for p in inputs}:
            if os.path.abspath(d or ".") != os.path.abspath(dest_dir or "."):
                try:
                    os.rmdir(d)  # only succeeds when empty, as TensorFlow's DeleteDir
                except OSError:
                    pass
    return header


def _check_data_file(prefix: str, path: str, dest: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"merging {prefix} into {dest}: data file {path} is missing; nothing was merged") from None
    except OSError as exc:
        raise io_error(exc, prefix, path, "read the data file") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CorruptCheckpointError(f"merging {prefix} into {dest}: data file {path} is not a regular file")


def _link_or_copy(source: str, target: str, durable: bool) -> None:
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    shutil.copyfile(source, target)
    if durable:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # the merged bundle is complete; this file is only left over
        log.warning("could not remove %s: %s", path, exc)


def _remove_other_shard_counts(dest: str, count: int, keep: set[str]) -> None:
    """Data files of an older checkpoint at ``dest`` with another shard count, now that it is replaced."""
    directory, base = os.path.split(dest)
    pattern = re.compile(re.escape(base) + r"\.data-\d{5,}-of-(\d{5,})(?:" + re.escape(SIDECAR_SUFFIX) + ")?")
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return
    for name in names:
        found = pattern.fullmatch(name)
        path = os.path.join(directory, name)
        if found and int(found.group(1)) != count and os.path.realpath(path) not in keep:
            _unlink_quietly(path)


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
