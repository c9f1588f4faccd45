"""One writer per prefix: the lease a save (or a tool that deletes or replaces files) holds on its prefix.

On a POSIX file system the lease is the file ``P.lease``, made whole under a
private name and hard-linked into place (``link`` fails if the name exists, so two
holders can never both succeed), holding a JSON record of the holder (token, host,
pid, what, expiry).  The holder keeps an ``flock`` on it for as long as it lives: the
kernel drops that lock when the process dies, so "the holder is gone" is a fact,
not a guess, and a holder that is merely paused (SIGSTOP, a long GC, a swapped-out
VM) still holds it — a second writer is refused instead of interleaving with a
writer that may wake up and commit.

A lease is *dead*, and may be broken, when its lock can be taken (the holder
process is gone) — or, on file systems without ``flock`` (``ENOLCK``), when its
expiry has passed; the holder renews the expiry every `TTL` / 3 seconds.  Breaking
takes the lock on the old file and unlinks the name only if it still names that
same file, so two breakers cannot remove a lease that a third party made between.

On a full disk a new lease cannot be written, yet that is when ``shardckpt clean``
is needed most (a crashed save's staged files hold the space).  Then a dead lease
is *adopted* instead: its lock taken, its name checked to still be that file, and
the new record written over the old one's own block (an overwrite in place needs
no free space).  The lock makes adoption as exclusive as creation; without locks
there is no adoption.

On an object store there is no lock and no atomic create through fsspec: the
lease object is written if absent or expired and read back; two savers starting
within one round trip can both believe they hold it.  That limit is documented.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import asdict, dataclass

from . import storage
from .errors import CheckpointIOError, PrefixBusyError

SUFFIX = ".lease"
TTL = 30.0  # seconds a lease stays live without renewal where locks cannot be had
CLEANER = "shardckpt clean"  # the holder `what` of the CLI's clean, which saves wait for instead of failing

_HOST = socket.gethostname()
_MAX_RECORD = 4096


def lease_filename(prefix: str) -> str:
    """The lease of ``prefix``: ``P.lease``."""
    return prefix + SUFFIX


@dataclass
class Holder:
    """Who holds a lease, as recorded in it."""

    token: str
    what: str
    host: str
    pid: int
    since: float
    expires: float

    def describe(self) -> str:
        age = time.time() - self.since
        return f"{self.what} (token {self.token}, pid {self.pid} on {self.host}, for {age:.0f} s)"


def _parse(data: bytes) -> Holder | None:
    try:
        record = json.loads(data[:_MAX_RECORD])
        return Holder(str(record["token"]), str(record["what"]), str(record["host"]), int(record["pid"]),
                      float(record["since"]), float(record["expires"]))
    except (ValueError, KeyError, TypeError):
        return None


def _io_error(prefix: str, path: str, what: str, exc: OSError) -> CheckpointIOError:
    err = CheckpointIOError(exc.errno or errno.EIO, f"{prefix}: {what} {path}: {exc.strerror or exc}")
    err.filename = path
    return err


class PrefixLease:
    """A held lease on a prefix; `acquire` makes one, `release` (or ``with``) gives it back."""

    def __init__(self, prefix: str, holder: Holder, fd: int | None, locked: bool) -> None:
        self.prefix = prefix
        self.path = lease_filename(prefix)
        self.holder = holder
        self._fd = fd
        self._locked = locked
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @classmethod
    def acquire(cls, prefix: str, *, what: str, token: str | None = None, ttl: float = TTL) -> PrefixLease:
        """Take the lease of ``prefix`` for ``what`` or raise `PrefixBusyError` naming its live holder."""
        token = token or secrets.token_hex(8)
        now = time.time()
        holder = Holder(token, what, _HOST, os.getpid(), now, now + ttl)
        if storage.is_remote(prefix):
            return _acquire_remote(prefix, holder, ttl)
        path = lease_filename(prefix)
        for _attempt in range(8):
            try:
                lease = _try_create(prefix, path, holder)
            except CheckpointIOError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                lease = _adopt_dead(prefix, path, holder)
                if lease is None:
                    raise
            if lease is not None:
                lease._start_renewing(ttl)
                return lease
            _break_if_dead(prefix, path)
        raise PrefixBusyError(f"{prefix}: could not take the lease {path}: it keeps changing hands")

    def still_held(self) -> bool:
        """Whether ``P.lease`` is still this lease's file (nobody removed or replaced it by hand)."""
        if self._fd is None:
            return True
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            return False

    def _start_renewing(self, ttl: float) -> None:
        def renew() -> None:
            while not self._stop.wait(ttl / 3):
                self.holder.expires = time.time() + ttl
                with contextlib.suppress(Exception):
                    if self._fd is None:
                        storage.write_small(self.path, _record(self.holder))
                    else:
                        os.pwrite(self._fd, _record(self.holder).ljust(_MAX_RECORD // 4), 0)

        self._renewer = threading.Thread(target=renew, name="shardckpt-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Give the lease back: remove ``P.lease`` if it is still ours, then drop the lock."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if storage.is_remote(self.prefix):
            with contextlib.suppress(Exception):
                data, _ = storage.read_small(self.path)
                held = _parse(data)
                if held is not None and held.token == self.holder.token:
                    storage.delete(self.path)
            return
        if self._fd is None:
            return
        try:
            if self.still_held():
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> PrefixLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _record(holder: Holder) -> bytes:
    return json.dumps(asdict(holder)).encode()


def _try_create(prefix: str, path: str, holder: Holder) -> PrefixLease | None:
    """Make the lease whole under a private name, lock it, and link it into place; None if the name is taken."""
    private = f"{path}.{holder.token}.{secrets.token_hex(4)}.tempstate"
    try:
        fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _io_error(prefix, private, "cannot create the lease", exc) from exc
    try:
        locked = _lock(fd)
        try:
            os.write(fd, _record(holder).ljust(_MAX_RECORD // 4))
        except OSError as exc:  # a full disk: the name was free, its first block is not
            os.close(fd)
            raise _io_error(prefix, private, "cannot write the lease", exc) from exc
        try:
            os.link(private, path)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise _io_error(prefix, path, "cannot take the lease", exc) from exc
        return PrefixLease(prefix, holder, fd, locked)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(private)


def _open_unless_locked(prefix: str, path: str, flags: int) -> tuple[int, Holder | None, bool] | None:
    """Open the lease file at ``path`` and take its lock: (fd, its record, whether locks exist here), or None
    when it is gone.  Raises `PrefixBusyError` when its holder holds the lock (or it is not a regular file)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _io_error(prefix, path, "cannot open the lease", exc) from exc
    try:
        if not _is_regular(fd):
            raise PrefixBusyError(f"{prefix}: {path} is not a regular file; remove it by hand")
        holder = _read_holder(fd)
        try:
            locked = _lock(fd)
        except OSError:
            who = holder.describe() if holder else "a process that left no readable record"
            raise PrefixBusyError(f"{prefix}: the prefix is in use by {who}; wait for it to finish") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, holder, locked


def _adopt_dead(prefix: str, path: str, holder: Holder) -> PrefixLease | None:
    """Take over a dead lease file in place (a full disk); None when there is none to adopt.

    Raises `PrefixBusyError` when the lease is live."""
    opened = _open_unless_locked(prefix, path, os.O_RDWR)
    if opened is None:
        return None
    fd, _, locked = opened
    adopted = False
    try:
        record = _record(holder).ljust(_MAX_RECORD // 4)
        # Only a locked file whose name still names it (no breaker removed it meanwhile) and whose own blocks
        # hold the whole new record can be taken over.
        if not locked or os.stat(path).st_ino != os.fstat(fd).st_ino or os.fstat(fd).st_size < len(record):
            return None
        try:
            os.pwrite(fd, record, 0)
        except OSError as exc:
            raise _io_error(prefix, path, "cannot take over the dead lease", exc) from exc
        adopted = True
        return PrefixLease(prefix, holder, fd, True)
    finally:
        if not adopted:
            os.close(fd)  # drops the lock we may have taken: the lease stays as it was


def _lock(fd: int) -> bool:
    """Take an exclusive flock without waiting; False where the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False  # ENOLCK, EOPNOTSUPP ...: fall back on the expiry


def _read_holder(fd: int) -> Holder | None:
    return _parse(os.pread(fd, _MAX_RECORD, 0))


def holder_of(prefix: str) -> Holder | None:
    """The live holder of ``prefix``'s lease, or None when there is no live lease (for tools and messages)."""
    path = lease_filename(prefix)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _is_regular(fd):
            return None
        holder = _read_holder(fd)
        try:
            locked = _lock(fd)
        except OSError:
            return holder  # someone holds the lock: live
        if locked:
            return None  # we could lock it: its holder is gone
        return holder if holder is not None and holder.expires > time.time() else None
    finally:
        os.close(fd)


def _break_if_dead(prefix: str, path: str) -> None:
    """Remove the lease at ``path`` if its holder is provably gone; raise `PrefixBusyError` if it is live."""
    opened = _open_unless_locked(prefix, path, os.O_RDONLY)
    if opened is None:
        return  # released meanwhile: try again
    fd, holder, locked = opened
    try:
        if not locked and holder is not None and holder.expires > time.time():
            raise PrefixBusyError(
                f"{prefix}: the prefix is in use by {holder.describe()} (this file system has no locks: the lease "
                f"expires {holder.expires - time.time():.0f} s from now unless renewed)")
        # Dead.  We hold its lock (or locks do not exist here): remove the name only if it is still this file.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass
    finally:
        os.close(fd)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _read_remote(path: str) -> Holder | None:
    try:
        data, _ = storage.read_small(path)
    except Exception:  # noqa: BLE001 - absent or unreadable: no live holder recorded
        return None
    return _parse(data)


def _acquire_remote(prefix: str, holder: Holder, ttl: float) -> PrefixLease:
    path = lease_filename(prefix)
    held = _read_remote(path)
    if held is not None and held.expires > time.time():
        raise PrefixBusyError(f"{prefix}: the prefix is in use by {held.describe()}")
    storage.write_small(path, _record(holder))
    held = _read_remote(path)
    if held is None or held.token != holder.token:
        raise PrefixBusyError(f"{prefix}: another saver took the lease at the same moment"
                              + (f": {held.describe()}" if held else ""))
    lease = PrefixLease(prefix, holder, None, False)
    lease._start_renewing(ttl)
    return lease
