"""The commit protocol on a POSIX directory: staging names, the commit, and
recovery after a crash.

Every file a save writes first carries ``.staging-TOKEN`` (TOKEN agreed by all
clients). Client 0 commits in this order, each step durable before the next:

1. ``P.index.staging-TOKEN`` is written whole (through a temporary name, so it
   exists only complete);
2. an older ``P.index`` is removed (overwrite only);
3. every ``P.data-R-of-N.staging-TOKEN`` is renamed to ``P.data-R-of-N`` (its
   chunk-checksum sidecar ``P.data-R-of-N.crc32c.staging-TOKEN`` just before it);
4. ``P.index.staging-TOKEN`` is renamed to ``P.index``; the directory is fsynced;
5. data files of an older shard count are removed.

Before step 1 and again before step 2, every staged data file is checked to be
the one its client wrote (its size and inode, as the client reported them), and
client 0 checks it still holds the prefix's lease (`lease.py`): a save never
publishes an index over files it did not write. So ``P.index`` present means the
checkpoint is complete and every data file it names is its own. After a crash,
`recover` looks at what is left: a staged index with no ``P.index`` means steps
1-2 completed, so the renames are finished (roll forward); anything else staged
belongs to a save that never reached its commit point and is deleted.  A commit
that fails before step 2 is done removes its staged index, so nothing of it is ever
published; one that fails after raises `OutcomeUnknownError`, never a plain failure,
as recovery will publish it.  (A crash between steps 1 and 2 on a fresh prefix is
rolled forward: client 0 had decided to commit, so no client heard of a failure.)
Nothing without ``.staging-`` or ``.tempstate`` in its name is ever deleted, except
step 5's stale data files after a successful commit. The object-store form of the
same protocol (no renames) writes data objects first and the index object last.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import storage
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    OutcomeUnknownError,
    PrefixBusyError,
)
from .format.chunks import SUFFIX as SIDECAR_SUFFIX
from .format.chunks import sidecar_filename
from .format.files import (
    STAGING,
    TEMPSTATE,
    data_filename,
    fsync_directory,
    index_filename,
    publish_sidecar,
    staging_data_filename,
)
from .format.merge import combine_entry
from .format.protos import BundleEntry, BundleHeader, decode_entry, decode_header, unpack_raw_entries
from .format.table import Table
from .format.writer import build_index, write_file_atomically
from .gcpause import paused_gc

log = logging.getLogger("shardckpt.commit")

Hook = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def sidecar_path(data_path: str) -> str:
    """The chunk-checksum sidecar of a data file, staged like it: ``P.data-R-of-N.crc32c[.staging-TOKEN]``."""
    head, sep, token = data_path.rpartition(STAGING)
    return sidecar_filename(head) + sep + token if sep else sidecar_filename(data_path)


@dataclass(frozen=True)
class StagedFile:
    """What a client reports of the data file it staged: its size, and its inode where it has one (0: none)."""

    size: int
    inode: int = 0


def verify_staged(prefix: str, token: str, files: list[StagedFile]) -> None:
    """Check that every data file of this save is in place, as its writer left it; raise otherwise.

    Run before anything is published, so a file removed or replaced meanwhile (by hand, by a tool that
    ignored the lease) fails the save and leaves the old checkpoint intact instead of publishing an index
    whose entries point into other bytes.
    """
    size = len(files)
    for r, want in enumerate(files):
        path = storage_name = staging_data_filename(prefix, r, size, token)
        if storage.is_remote(prefix):
            storage_name = data_filename(prefix, r, size)
            got = storage.size(storage_name)
            inode = 0
        else:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                got = None
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise CorruptCheckpointError(f"{prefix}: staged data file {path} is not a regular file")
                got, inode = st.st_size, st.st_ino
        if got is None:
            raise CheckpointNotFoundError(
                f"{prefix}: the data file of client {r}, {storage_name}, vanished before the commit; nothing "
                "was published")
        if got != want.size or (want.inode and inode and inode != want.inode):
            raise CorruptCheckpointError(
                f"{prefix}: the data file of client {r}, {storage_name}, is not the one it wrote "
                f"({got} bytes, inode {inode}; it wrote {want.size} bytes, inode {want.inode}); nothing was published")


def commit(prefix: str, token: str, files: list[StagedFile], pieces: list[bytes], *, overwrite: bool,
           durable: bool, hook: Hook = _noop, still_held: Callable[[], bool] = lambda: True) -> None:
    """Client 0's part: check the staged files, merge every client's entries and publish (steps 1-5 above)."""
    size = len(files)
    verify_staged(prefix, token, files)
    with paused_gc():
        table = build_index(BundleHeader(num_shards=size), _merge(pieces))
    index = index_filename(prefix)
    staged_index = index + STAGING + token
    write_file_atomically(staged_index, table, durable=durable,
                          midway=lambda: hook("mid_index_write"))
    try:
        hook("after_index_staged")
        verify_staged(prefix, token, files)
        if not still_held():
            raise PrefixBusyError(f"{prefix}: the lease {prefix}.lease was removed or replaced during the save; "
                                  "nothing was published")
        old = os.path.exists(index)
        if old and not overwrite:
            raise CheckpointExistsError(f"{prefix}: a checkpoint appeared at the prefix during the save")
        if old:
            os.unlink(index)
    except BaseException:
        # Before the commit point: a failed save must not leave a staged index, which a later recovery
        # (finding no P.index) would publish.
        _unlink(staged_index)
        raise
    # Past the commit point (no P.index, the staged one complete): recovery would publish it, so the save has
    # succeeded once its renames are done; an error here is retried once by finishing what is left.
    try:
        if old:
            hook("after_old_index_removed")
        _publish(prefix, token, size, staged_index, durable, hook, strict=True)
    except (CheckpointError, OSError) as exc:
        log.warning("%s: finishing the commit after: %s", prefix, exc)
        if not os.path.exists(staged_index) and os.path.exists(index):
            if durable:  # the index is in place: only its durability may be missing
                fsync_directory(os.path.dirname(prefix))
            return
        for r, want in enumerate(files):  # a data file no longer staged must be the one renamed, not an old one
            if not os.path.exists(staging_data_filename(prefix, r, size, token)):
                st = os.stat(data_filename(prefix, r, size))
                if want.inode and st.st_ino != want.inode:
                    raise CorruptCheckpointError(f"{prefix}: the data file of client {r} vanished during the "
                                                 "commit") from exc
        try:
            _publish(prefix, token, size, staged_index, durable, _noop)
        except Exception as again:  # noqa: BLE001 - whatever it is, the save is past its commit point
            raise OutcomeUnknownError(
                f"{prefix}: the save passed its commit point but publishing it failed ({again}); it is complete "
                f"on disk and `shardckpt clean {prefix}` or the next save to the prefix publishes it") from again


def _publish(prefix: str, token: str, size: int, staged_index: str, durable: bool, hook: Hook,
             strict: bool = False) -> None:
    """Rename the staged data files, then the index.  ``strict``: every staged file must be there (a commit);
    otherwise one already renamed by an interrupted commit is taken as done (recovery)."""
    replaced: list[int] = []
    try:
        for r in range(size):
            staged = staging_data_filename(prefix, r, size, token)
            final = data_filename(prefix, r, size)
            if strict or os.path.exists(staged):
                # Holding the file being replaced open makes the rename cheap: freeing its pages and
                # blocks happens at the close, after the commit, instead of inside the rename.
                try:
                    replaced.append(os.open(final, os.O_RDONLY | os.O_CLOEXEC))
                except FileNotFoundError:
                    pass
                # The sidecar before its data file: a roll-forward after a crash between the two still
                # finds the data file staged, so renames the sidecar too.
                publish_sidecar(sidecar_path(staged), sidecar_filename(final))
                os.replace(staged, final)
            if r == 0:
                hook("between_renames")
        os.replace(staged_index, index_filename(prefix))
        if durable:
            fsync_directory(os.path.dirname(prefix))
        hook("after_commit")
    finally:
        _close_later(replaced)
    try:
        remove_stale_data_files(prefix, size)
    except OSError as exc:  # the checkpoint is committed; an older one's files only take space
        log.warning("%s: could not remove data files of an older shard count: %s", prefix, exc)


def _close_later(fds: list[int]) -> None:
    if fds:
        def release() -> None:
            for fd in fds:
                os.close(fd)

        threading.Thread(target=release, name="shardckpt-release", daemon=True).start()


class _Partitioned:
    """A partitioned tensor's entry as clients sent it: the bytes before its slices (dtype, shape), the same
    from every client, and each client's encoded slices, in client order."""

    __slots__ = ("head", "slices")

    def __init__(self, head: bytes, slices: bytes) -> None:
        self.head = head
        self.slices = [slices]


def _split_slices(raw: bytes) -> int:
    """Where the slices (field 7, last as `encode_entry` writes them) of an encoded entry start, when they are
    at least one and well framed to the end; -1 for anything else (the caller then decodes the entry)."""
    pos, end = 0, len(raw)
    while pos < end and raw[pos] != 0x3A:
        tag = raw[pos]
        pos += 1
        if tag in (0x08, 0x18, 0x20, 0x28):  # dtype, shard_id, offset, size: varints
            while pos < end and raw[pos] & 0x80:
                pos += 1
            pos += 1
        elif tag == 0x12:  # shape
            n, pos = _varint(raw, pos, end)
            pos += n
        elif tag == 0x35:  # crc32c
            pos += 4
        else:
            return -1
    head = pos
    if head >= end:
        return -1
    while pos < end:
        if raw[pos] != 0x3A:
            return -1
        n, pos = _varint(raw, pos + 1, end)
        pos += n
    return head if pos == end else -1


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return end + 1, end + 1  # runs past the buffer: the caller's bounds check fails


def _merge(pieces: list[bytes]) -> dict[bytes, BundleEntry | bytes]:
    """Every client's entries in one index.  Only a key sent by several clients (a partitioned tensor's
    entry, which gains every client's slices; anything else is a duplicate) needs combining; the others
    pass through as the bytes their client encoded.

    A partitioned tensor's entry comes from every client that holds a slice of it, N times per tensor: its
    encoded slices are appended as bytes when its dtype and shape bytes equal the first client's (what
    decoding and re-encoding would produce, byte for byte), so the root decodes no entry per client.  Any
    entry that does not fit that form is decoded and checked as before (`combine_entry` names the error).
    Keys sent once (most of them: every slice's own entry) are moved by dict operations, never one by one
    in Python: at 4,096 clients the index has millions of keys."""
    merged: dict[bytes, Any] = {}
    partitioned: dict[bytes, _Partitioned] = {}
    for rank, blob in enumerate(pieces):
        pairs = unpack_raw_entries(blob)
        new: dict[bytes, Any] = dict(pairs)
        if len(new) < len(pairs):  # a client holding several slices of one tensor sent its entry per slice
            for key, raw in pairs:
                if key in merged:
                    merged[key] = _combine(merged, partitioned, key, raw, rank)
                else:
                    merged[key] = raw
            continue
        for key in merged.keys() & new.keys() if merged else ():
            new[key] = _combine(merged, partitioned, key, new[key], rank)
        merged.update(new)
    for key, p in partitioned.items():
        merged[key] = p.head + b"".join(p.slices)
    return merged


def _combine(merged: dict[bytes, Any], partitioned: dict[bytes, _Partitioned], key: bytes, raw: bytes,
             rank: int) -> Any:
    """What ``merged[key]`` becomes once client ``rank``'s entry ``raw`` for it is added."""
    seen = merged[key]
    if seen.__class__ is bytes:
        cut = _split_slices(seen)
        if cut > 0:
            seen = partitioned[key] = _Partitioned(seen[:cut], seen[cut:])
    if seen.__class__ is _Partitioned:
        head = seen.head
        cut = len(head)
        # One well-framed slice after the same head (the common case) is checked in O(1).
        if raw.startswith(head) and (
            (len(raw) > cut + 1 and raw[cut] == 0x3A and raw[cut + 1] < 0x80 and cut + 2 + raw[cut + 1] == len(raw))
                or _split_slices(raw) == cut):
            seen.slices.append(raw[cut:])
            return seen
        del partitioned[key]
        seen = head + b"".join(seen.slices)
    one = {key: seen if isinstance(seen, BundleEntry) else decode_entry(seen)}
    combine_entry(one, key, decode_entry(raw), f"client {rank}")
    return one[key]


def commit_remote(prefix: str, files: list[StagedFile], pieces: list[bytes]) -> None:
    """Object-store form, client 0's part: the data objects are in place (checked); one PUT of the index
    publishes them (an object appears whole or not at all).  An older index was removed before any data."""
    size = len(files)
    verify_staged(prefix, "", files)
    with paused_gc():
        table = build_index(BundleHeader(num_shards=size), _merge(pieces))
    storage.write_small(index_filename(prefix), table)
    remove_stale_data_files(prefix, size)


def recover_remote(prefix: str) -> list[str]:
    """Object-store form of `recover`: data objects with no index are an unfinished save's; delete them."""
    if storage.exists(index_filename(prefix)):
        return []
    done = []
    for path in list(storage.list_prefix(prefix)):
        if _is_data_file(prefix, path.removesuffix(SIDECAR_SUFFIX)):
            storage.delete(path)
            done.append(f"removed {path}")
    return done


def _is_data_file(prefix: str, path: str) -> bool:
    lead = prefix.rstrip("/").rsplit("/", 1)[-1] + ".data-"
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(lead):
        return False
    shard, sep, total = name[len(lead) :].partition("-of-")
    return bool(sep) and shard.isdigit() and total.isdigit()


def remove_stale_data_files(prefix: str, num_shards: int) -> None:
    """Delete ``P.data-*-of-M`` files of another shard count (an older checkpoint's), after a commit."""
    keep_suffix = f"-of-{num_shards:05d}"
    for path in list(storage.list_prefix(prefix)):
        data = path.removesuffix(SIDECAR_SUFFIX)  # a data file's sidecar goes with it
        if _is_data_file(prefix, data) and not data.endswith(keep_suffix):
            storage.delete(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def leftovers(prefix: str) -> dict[str, list[str]]:
    """Staged or temporary files of ``prefix`` by token (``""`` for ``.tempstate`` files of single writers)."""
    directory, base = os.path.split(prefix)
    out: dict[str, list[str]] = {}
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return out
    for name in names:
        if not (name.startswith(base + ".index") or name.startswith(base + ".data-")):
            continue
        path = os.path.join(directory, name)
        if STAGING in name:
            token = name.rsplit(STAGING, 1)[1].split(TEMPSTATE, 1)[0]
            out.setdefault(token, []).append(path)
        elif TEMPSTATE in name:
            out.setdefault("", []).append(path)
    return out


def recover(prefix: str, *, durable: bool = True) -> list[str]:
    """Finish or discard what a crashed save left at ``prefix``; returns what was done, one line per action.

    Only call it holding the prefix's lease (`lease.PrefixLease`): then no live save owns any staged file.
    """
    done: list[str] = []
    index = index_filename(prefix)
    found = leftovers(prefix)
    staged = {
        token: index + STAGING + token
        for token, paths in found.items()
        if token and index + STAGING + token in paths
    }
    if not os.path.exists(index) and staged:
        # The newest staged index passed its commit point (the old index was already gone).
        token = max(staged, key=lambda t: os.stat(staged[t]).st_mtime_ns)
        try:
            size = _num_shards(staged[token])
            if all(os.path.exists(staging_data_filename(prefix, r, size, token))
                   or os.path.exists(data_filename(prefix, r, size)) for r in range(size)):
                _publish(prefix, token, size, staged[token], durable, _noop)
                done.append(f"completed the interrupted commit of save {token}")
                found.pop(token)
        except (CheckpointError, OSError) as exc:
            log.warning("%s: could not complete staged save %s: %s", prefix, token, exc)
    for paths in found.values():
        for path in paths:
            if os.path.exists(path):
                _unlink(path)
                done.append(f"removed {path}")
    return done


def _num_shards(staged_index: str) -> int:
    table = Table(storage.read_regular(staged_index)[0], staged_index)
    for key, value in table.seek(b""):
        if key == b"":
            return decode_header(value).num_shards
        break
    raise CheckpointError(f"{staged_index}: no bundle header")
