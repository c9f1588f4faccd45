"""File names of a bundle: ``P.index`` and ``P.data-SSSSS-of-NNNNN`` (C's ``%05d``: wider past 99999).

Also the names a bundle is written under before it is published (``<final>.staging-TOKEN``, the same for a
single writer, a merge and a multi-client save, so one recovery handles all of them), the publish itself,
and the error that reports a refused file operation.
"""

from __future__ import annotations

import errno
import logging
import os
import re

from ..errors import CheckpointIOError

log = logging.getLogger("shardckpt.files")

STAGING = ".staging-"
TEMPSTATE = ".tempstate"
ORBAX_ITEM_PREFIX = "checkpoint"  # the bundle inside an Orbax item directory (here: shardckpt.orbax imports JAX)


def index_filename(prefix: str) -> str:
    """The index file of the bundle at ``prefix``: ``P.index``."""
    return prefix + ".index"


def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    """Data file ``shard_id`` of ``num_shards``: ``P.data-SSSSS-of-NNNNN``."""
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


def staging_data_filename(prefix: str, rank: int, size: int, token: str) -> str:
    """The name client ``rank`` of ``size`` writes its data file under until the commit renames it."""
    return data_filename(prefix, rank, size) + STAGING + token


def staging_index_filename(prefix: str, token: str) -> str:
    """The name the index of save ``token`` has once complete, until it is published."""
    return index_filename(prefix) + STAGING + token


def publish_sidecar(staged: str, final: str) -> None:
    """Rename a staged chunk-checksum sidecar to its final name, best effort: past the commit point a sidecar that
    cannot take its name (a directory is there, say) must not fail the publish, which would leave the checkpoint
    without an index.  It is then dropped, and partial reads of its data file go unchecked, as without one."""
    try:
        os.replace(staged, final)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: could not publish the chunk checksums (%s); partial reads of its data file are unchecked",
                    final, exc)
        try:
            os.unlink(staged)
        except OSError:
            pass


def publish(prefix: str, staged_index: str, renames: list[tuple[str, str]], *, durable: bool,
            sidecars: list[tuple[str, str]] | None = None) -> None:
    """Make a staged bundle the checkpoint at ``prefix``, in the commit protocol's order.

    The staged data files and ``staged_index`` must be complete (and fsynced when ``durable``).  An older
    ``P.index`` is removed only after their names are durable, then the data files are renamed (``renames``
    of ``(staged, final)``), the index last: ``P.index`` present always means a complete bundle.  The staged
    ``sidecars`` of ``(staged, final)`` go first, each before the data files, best effort (`publish_sidecar`).
    """
    index = index_filename(prefix)
    directory = os.path.dirname(prefix)
    if os.path.lexists(index):
        if durable:
            fsync_directory(directory)  # no crash may leave the old index gone and the staged names not yet there
        os.unlink(index)
    for staged, final in sidecars or ():
        publish_sidecar(staged, final)
    for staged, final in renames:
        os.replace(staged, final)
    os.replace(staged_index, index)
    if durable:
        fsync_directory(directory)


_RUST_OS_ERROR = re.compile(r"os error (\d+)")


def io_error(exc: BaseException, prefix: str, path: str, doing: str) -> CheckpointIOError:
    """``exc`` (an `OSError`, or a library's error wrapping one) as a `CheckpointIOError` naming the prefix and file.

    The errno is kept; raise the result ``from exc``.
    """
    code = getattr(exc, "errno", None)
    if code is None:  # e.g. safetensors' Rust errors carry it only in the text
        found = _RUST_OS_ERROR.search(str(exc))
        code = int(found.group(1)) if found else None
    reason = (getattr(exc, "strerror", None) or os.strerror(code)) if code is not None else str(exc)
    message = f"{prefix}: cannot {doing}{'' if path == prefix else ' ' + path}: {reason}"
    return CheckpointIOError(message) if code is None else CheckpointIOError(code, message)


def make_parent_directory(prefix: str) -> None:
    """Create the directory ``prefix`` lives in; raises `CheckpointIOError` naming the prefix if it cannot."""
    directory = os.path.dirname(prefix)
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError as exc:  # some component of the path is a file, not a directory
        raise io_error(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), prefix, directory,
                       "create the directory") from exc
    except OSError as exc:
        raise io_error(exc, prefix, directory, "create the directory") from exc


def normalize_prefix(prefix: str | os.PathLike[str]) -> str:
    """A prefix as a string; a path naming the ``.index`` file is taken as its prefix (a common slip)."""
    text = os.fspath(prefix)
    if text.endswith(".index") and not os.path.exists(text + ".index"):
        return text[: -len(".index")]
    return text


def fsync_directory(path: str) -> None:
    """Make renames and creations in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
