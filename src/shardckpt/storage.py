"""Where checkpoint bytes live: a local (POSIX) path, or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

One small surface serves both: read a whole small file (the index), random
reads into caller buffers (data files: ``preadv`` locally, ranged GETs remotely),
write a whole small file atomically, stream a large file, list, delete.  Remote
stores have no rename, so the commit protocol takes its object-store form there
(`commit.py`).  fsspec is imported only for URLs.

Local files are read only if they are regular files (symlinks to them are fine):
a FIFO, device or socket is refused with `NotARegularFileError` before any open
that could block, and no read goes past the size ``fstat`` reports.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Iterator
from typing import Any, Protocol

from .errors import CheckpointNotFoundError, NotARegularFileError, TruncatedFileError

Identity = tuple[object, ...]


def is_remote(path: str) -> bool:
    """True for a URL with a scheme other than ``file://``."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme not in ("", "file") and "/" not in scheme


def _fs(path: str) -> tuple[Any, str]:
    import fsspec

    fs, stripped = fsspec.core.url_to_fs(path)
    return fs, stripped


class RandomAccess(Protocol):
    """A data file open for random reads: its ``path`` and ``size`` in bytes."""
    path: str
    size: int

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views``, which are consecutive in the file, from byte ``offset``."""

    def map_private(self, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """A copy-on-write mapping of bytes ``[offset, offset + nbytes)`` and where they start in it,
        or None where the store cannot map files."""

    def close(self) -> None:
        """Release the file."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _check_regular(path: str, st: os.stat_result) -> None:
    """Raise unless ``st`` is a regular file: `IsADirectoryError` for a directory (callers treat it as no
    file), `NotARegularFileError` for anything else."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    kind = next((name for test, name in _KINDS if test(mode)), f"a special file (mode {mode:o})")
    raise NotARegularFileError(f"{path} is {kind}, not a regular file; it is not read")


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular local file at ``path`` and its ``fstat``.

    The type is checked before opening (a FIFO's open would wait for a writer, a device's has effects)
    and again on the descriptor, opened non-blocking, in case the name was replaced in between.
    Raises `NotARegularFileError`, `IsADirectoryError`, or the `OSError` of ``stat``/``open``.
    """
    _check_regular(path, os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        _check_regular(path, st)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular local file at ``path``: exactly the ``st_size`` bytes ``fstat`` reports,
    never "until end of file" (`TruncatedFileError` if it ends sooner), and its ``fstat``."""
    fd, st = open_regular(path)
    try:
        parts, pos = [], 0
        while pos < st.st_size:
            part = os.pread(fd, min(st.st_size - pos, 1 << 30), pos)
            if not part:
                raise TruncatedFileError(f"{path}: ended at {pos} of its {st.st_size} bytes while reading")
            parts.append(part)
            pos += len(part)
    finally:
        os.close(fd)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), st


class LocalFile:
    """A local data file read with ``preadv``; raises `CheckpointNotFoundError` if missing or a directory,
    `NotARegularFileError` if it is a FIFO, device or socket."""
    def __init__(self, path: str) -> None:
        try:
            fd, st = open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(f"data file {path} is missing") from None
        except IsADirectoryError:
            raise CheckpointNotFoundError(f"data file {path} is a directory, not a regular file") from None
        self.fd, self.size, self.path = fd, st.st_size, path

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views``, consecutive in the file, from byte ``offset``; raises `TruncatedFileError` at end of file."""
        got = os.preadv(self.fd, views, offset)
        if got >= sum(len(v) for v in views):
            return
        start = 0  # a short read: finish each buffer, or report where the file ended
        for v in views:
            end = start + len(v)
            if got < end:
                view, at = v[max(0, got - start) :], offset + max(got, start)
                while view:
                    n = os.preadv(self.fd, [view], at)
                    if n <= 0:
                        raise TruncatedFileError(f"{self.path}: ended at {at} while reading")
                    view, at = view[n:], at + n
            start = end

    def map_private(self, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """A private (copy-on-write) mapping over the page cache: reading it copies nothing, and writes
        through it stay in this process.  The caller has checked the range against `size`."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        return mmap.mmap(self.fd, nbytes + offset - start, access=mmap.ACCESS_COPY, offset=start), offset - start

    def close(self) -> None:
        """Close the file descriptor (mappings made from it stay valid)."""
        os.close(self.fd)


class RemoteFile:
    """Ranged GETs; one request per call, so callers pass coalesced, consecutive buffers."""

    def __init__(self, path: str) -> None:
        self.fs, self._key = _fs(path)
        self.path = path
        try:
            self.size = int(self.fs.info(self._key)["size"])
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"data file {path} is missing") from None

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views``, consecutive in the object, from byte ``offset`` with one ranged GET.

        Raises `TruncatedFileError` if the object ends first or the store returns fewer bytes.
        """
        total = sum(len(v) for v in views)
        if offset + total > self.size:
            raise TruncatedFileError(f"{self.path}: ended at {self.size} while reading")
        data = self.fs.cat_file(self._key, start=offset, end=offset + total)
        if len(data) != total:
            raise TruncatedFileError(f"{self.path}: a read of {total} bytes at {offset} returned {len(data)}")
        pos = 0
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def map_private(self, offset: int, nbytes: int) -> None:
        """Objects cannot be mapped: reads copy."""
        return None

    def close(self) -> None:
        """Nothing to release: every read is a request of its own."""
        pass


def open_random(path: str) -> RandomAccess:
    """The data file at ``path`` (local or URL) open for reads; raises `CheckpointNotFoundError` if it is missing."""
    return RemoteFile(path) if is_remote(path) else LocalFile(path)


def read_small(path: str) -> tuple[bytes, Identity]:
    """A whole (small) file and an identity that changes when the file is replaced (local: a regular file,
    read up to its ``fstat`` size; see `read_regular`)."""
    if is_remote(path):
        fs, key = _fs(path)
        try:
            info = fs.info(key)
            data = fs.cat_file(key)
        except FileNotFoundError:
            raise FileNotFoundError(path) from None
        return data, (info.get("ETag") or info.get("etag"), info.get("size"))
    data, st = read_regular(path)
    return data, (st.st_dev, st.st_ino, st.st_mtime_ns)


def identity(path: str) -> Identity | None:
    """What `read_small` returns as identity for ``path`` now, or None when there is no such file."""
    try:
        if is_remote(path):
            fs, key = _fs(path)
            info = fs.info(key)
            return (info.get("ETag") or info.get("etag"), info.get("size"))
        st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
        return None


def exists(path: str) -> bool:
    """Whether a file or object exists at ``path``."""
    if is_remote(path):
        fs, key = _fs(path)
        return bool(fs.exists(key))
    return os.path.exists(path)


def write_small(path: str, data: bytes) -> None:
    """One PUT: an object appears whole or not at all."""
    fs, key = _fs(path)
    fs.pipe_file(key, data)


def delete(path: str) -> None:
    """Remove the file or object at ``path``; one already gone is not an error."""
    if is_remote(path):
        fs, key = _fs(path)
        try:
            fs.rm_file(key)
        except FileNotFoundError:
            pass
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def list_prefix(prefix: str) -> Iterator[str]:
    """Full paths (URLs for remote stores) of the entries beside ``prefix`` whose names start with its base."""
    if is_remote(prefix):
        fs, key = _fs(prefix)
        directory, base = key.rsplit("/", 1) if "/" in key else ("", key)
        protocol = prefix.split("://", 1)[0]
        try:
            names = fs.ls(directory, detail=False)
        except FileNotFoundError:
            return
        for name in names:
            if name.rsplit("/", 1)[-1].startswith(base):
                yield f"{protocol}://{name}"
        return
    directory, base = os.path.split(prefix)
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(base):
            yield os.path.join(directory, name)


def open_stream(path: str, part_size: int = 64 << 20, concurrency: int = 4) -> Any:
    """A binary writer for a large object: on S3, a multipart upload whose parts go up in parallel
    (at most ``concurrency`` parts of ``part_size`` bytes in memory); elsewhere, fsspec's own writer."""
    fs, key = _fs(path)
    if type(fs).__name__ == "S3FileSystem" and hasattr(fs, "call_s3"):
        return S3ParallelUpload(fs, key, part_size, concurrency)
    return fs.open(key, "wb", block_size=part_size)


class S3ParallelUpload:
    """``write`` / ``close`` / ``discard`` over S3's multipart API, uploading parts concurrently."""

    def __init__(self, fs: Any, key: str, part_size: int, concurrency: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.fs, self.part_size, self.concurrency = fs, max(part_size, 5 << 20), concurrency
        self.bucket, _, self.key = key.partition("/")
        self.buffer = bytearray()
        self.pending: list[Any] = []
        self.upload_id: str | None = None
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="shardckpt-upload")

    def _upload(self, number: int, body: bytes) -> dict[str, Any]:
        out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                              PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": out["ETag"]}

    def _send(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
        from concurrent.futures import FIRST_COMPLETED, wait

        running = [f for f in self.pending if not f.done()]
        while len(running) >= self.concurrency:  # bound memory: at most `concurrency` parts in flight
            wait(running, return_when=FIRST_COMPLETED)
            running = [f for f in running if not f.done()]
        body = bytes(memoryview(self.buffer)[: self.part_size])  # one copy: a bytearray slice would add another
        del self.buffer[: self.part_size]
        self.pending.append(self.pool.submit(self._upload, len(self.pending) + 1, body))

    def write(self, data: bytes | memoryview) -> int:
        """Buffer ``data``, sending each full part (blocks while ``concurrency`` are in flight); returns its length."""
        self.buffer += data
        while len(self.buffer) >= self.part_size:
            self._send()
        return len(data)

    def close(self) -> None:
        """Upload what is left and complete the object (one PUT if it never filled a part); a failure aborts it."""
        try:
            if self.upload_id is None:  # small: one PUT
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
                return
            if self.buffer:
                self._send()
            parts = [f.result() for f in self.pending]
            self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                            MultipartUpload={"Parts": parts})
        except BaseException:
            self.discard()
            raise
        finally:
            self.pool.shutdown()

    def discard(self) -> None:
        """Abort the upload so no object appears; parts not yet sent are dropped."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:  # noqa: BLE001 - best effort; the object never appeared
                pass
            self.upload_id = None


def size(path: str) -> int | None:
    """The size in bytes of the file or object at ``path``, or None when there is none."""
    try:
        if is_remote(path):
            fs, key = _fs(path)
            # Another process wrote it: a listing this process cached earlier (s3fs keeps one) knows nothing of it.
            fs.invalidate_cache(key.rsplit("/", 1)[0] if "/" in key else key)
            return int(fs.info(key)["size"])
        return os.stat(path).st_size
    except FileNotFoundError:
        return None
