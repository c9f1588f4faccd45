"""Real file-system failures for tests: a small full file system, a read-only directory.

Both need root (the test sandbox runs as root).  Root ignores permission bits, so ``chmod`` cannot make a
directory read-only for these tests; a read-only bind mount can, and it refuses writes with EROFS for
everyone.  A full disk is a tmpfs mounted with ``size=``: writes past it fail with ENOSPC exactly as on a
real full disk, and unmounting frees it.  Every mount is undone on exit, lazily if a file is still open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _umount(path: Path) -> None:
    done = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if done.returncode != 0:  # something still holds a file there: detach now, freed at the last close
        subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def full_filesystem(tmp_path: Path | str, size_bytes: int) -> Iterator[Path]:
    """A fresh empty directory on its own file system of ``size_bytes`` (rounded up to whole pages).

    Writes beyond the capacity fail with ``OSError(ENOSPC)``.  Use `fill_to` to leave an exact amount free.
    """
    mount_point = Path(tmp_path) / f"fullfs-{secrets.token_hex(4)}"
    mount_point.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={max(size_bytes, PAGE)},mode=0755", "tmpfs", str(mount_point))
    try:
        yield mount_point
    finally:
        _umount(mount_point)
        mount_point.rmdir()


def free_bytes(directory: Path | str) -> int:
    """Bytes an ordinary write can still use on the file system of ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def fill_to(directory: Path | str, leave_bytes: int) -> Path:
    """Create ``directory/filler`` so that exactly ``leave_bytes`` (whole pages) stay free; returns its path.

    Fills until ENOSPC first, then gives back what should stay free, so it does not depend on how the
    file system counts its own metadata.
    """
    path = Path(directory) / "filler"
    chunk = b"\xff" * (1 << 16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for size in (PAGE * 16, PAGE):  # a partial last chunk may still fit
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk[:size])
        end = os.fstat(fd).st_size
        give = -(-leave_bytes // PAGE) * PAGE
        os.ftruncate(fd, max(0, (end // PAGE) * PAGE - give))
    finally:
        os.close(fd)
    got = free_bytes(directory)
    assert got >= leave_bytes, (got, leave_bytes)
    return path


@contextlib.contextmanager
def read_only(directory: Path | str) -> Iterator[Path]:
    """``directory`` (which must exist) bind-mounted read-only onto itself: every write there fails with EROFS,
    even for root.  Files already in it stay readable."""
    path = Path(directory)
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)
