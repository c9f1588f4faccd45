"""File names of a bundle: ``P.index`` and ``P.data-SSSSS-of-NNNNN`` (C's ``%05d``: wider past 99999)."""

from __future__ import annotations

import os


def index_filename(prefix: str) -> str:
    """The index file of the bundle at ``prefix``: ``P.index``."""
    return prefix + ".index"


def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    """Data file ``shard_id`` of ``num_shards``: ``P.data-SSSSS-of-NNNNN``."""
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


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
