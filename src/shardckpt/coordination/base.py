"""The one small protocol every engine implements, and a generic version over a key-value store.

A coordinator knows its client index (``rank``) and the client count (``size``)
and opens `Session`s: the collectives of one operation, scoped so that nothing
posted in one session is ever read in another (see `session.py`).  The plain
`all_gather` and `barrier` are one-step sessions.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..errors import ClientTimeoutError, CoordinationError, InvalidArgumentError
from .session import Session, TrivialSession, answer_wait

DEFAULT_TIMEOUT = 300.0


# The engines take a C int of milliseconds; longer waits (and ``inf``) are this long: about 24.8 days.
MAX_TIMEOUT = (2**31 - 1) / 1000

# Seconds a gather's reads may run past its deadline, for keys already in a remote store (`_get_many`).
LATE_READ_GRACE = 0.25


def default_timeout(timeout: float | None = None) -> float:
    """``timeout`` if given, else ``SHARDCKPT_TIMEOUT`` from the environment, else 300 seconds.

    ``inf`` and anything longer than `MAX_TIMEOUT` mean `MAX_TIMEOUT`; a negative or NaN timeout, or one that
    is not a number, raises `InvalidArgumentError`.
    """
    source = "timeout"
    if timeout is None:
        env = os.environ.get("SHARDCKPT_TIMEOUT")
        if not env:
            return DEFAULT_TIMEOUT
        source, timeout = "SHARDCKPT_TIMEOUT", env  # type: ignore[assignment]
    try:
        value = float(timeout)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{source}={timeout!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise InvalidArgumentError(f"{source}={timeout!r}: a timeout is a number of seconds >= 0")
    return min(value, MAX_TIMEOUT)


class Coordinator(ABC):
    """What a collective save needs from a cluster: who am I, how many are we, and sessions of collectives."""

    rank: int
    size: int
    engine: str = "?"

    @abstractmethod
    def session(self, kind: str) -> Session:
        """Open this client's next session; every client opens its sessions in the same order."""

    def all_gather(self, data: bytes, name: str, timeout: float) -> list[bytes]:
        """Every client's ``data``, by rank; raises `ClientTimeoutError` naming the missing clients.

        A session of its own: whatever happened to earlier ones, it pairs only with the same call elsewhere.
        """
        with self.session(name) as s:
            return s.all_gather(data, timeout)

    def barrier(self, name: str, timeout: float) -> None:
        """Wait until every client reaches ``name`` (``timeout`` in seconds); raises `ClientTimeoutError` otherwise.

        A gather of empty values and a one-byte release: unlike `all_gather`, whose answer lists every client's
        value, what each client receives does not grow with the client count.  When client 0 misses someone it
        broadcasts the error, so every client raises the same `ClientTimeoutError`.
        """
        with self.session(name) as s:
            try:
                s.gather("in", b"", timeout)
            except ClientTimeoutError as exc:
                s.broadcast("out", b"\x01" + str(exc).encode(), timeout)
                raise
            out = s.broadcast("out", b"\x00" if self.rank == 0 else None, answer_wait(timeout))
        if out[:1] == b"\x01":
            raise ClientTimeoutError(out[1:].decode(errors="replace"))

    def close(self) -> None:  # noqa: B027 - most engines own nothing to release
        """Release what the coordinator created (never the user's own process group)."""


class SingleClient(Coordinator):
    """One client owning every device: the collectives are trivial."""

    engine = "single"

    def __init__(self) -> None:
        self.rank, self.size = 0, 1
        self._sessions = itertools.count()

    def session(self, kind: str) -> Session:
        return TrivialSession(next(self._sessions), kind)


def _missing_error(engine: str, missing: list[int], size: int, what: str, timeout: float, rank: int) -> str:
    kind, _, step = what.rpartition("/")
    where = f"'{step}' of {kind}" if kind else f"'{step}'"
    return (f"{engine}: clients {missing} of {size} did not reach {where} within {timeout:g} s "
            f"(this is client {rank})")


class KeyValueCoordinator(Coordinator):
    """Sessions over a key-value store with blocking gets and an atomic create.

    Keys: ``<ns>/<session>/<step>/<rank>`` for a client's part of a gather (read and
    then deleted by client 0), ``<ns>/<session>/<step>`` for client 0's broadcasts and
    ``<ns>/<session>/decision`` for the decision.  Client 0 deletes a session's
    broadcasts and decision once every client is known to be past it: when the
    session itself says so (a save's last gather), or when a later session's gather
    hears from every client.  Until then they stay (for at most `KEPT` sessions), so
    a client that comes late reads at once how each session it missed ended and
    catches up, instead of waiting out a timeout in every one.
    """

    KEPT = 64
    MAX_VALUE = 4 << 20  # bytes per stored value; larger ones travel in parts
    late_read_grace = LATE_READ_GRACE  # a store a round trip away; 0 for one in this process

    def __init__(self, rank: int, size: int, namespace: str = "shardckpt") -> None:
        self.rank, self.size = rank, size
        self._namespace = namespace
        self._sessions = 0
        # Client 0, by failed session: its broadcasts not known read by all, and the other clients' posts it
        # never read (a late client posts after client 0 gave up; it also posts its "done" of a failed save).
        self._pending: list[tuple[int, list[str], list[str]]] = []

    @abstractmethod
    def _set(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    def _get(self, key: str, timeout: float) -> bytes | None:
        """The value, or None once ``timeout`` seconds pass without one."""

    @abstractmethod
    def _create(self, key: str, value: bytes) -> bytes:
        """Store ``value`` under ``key`` unless the key exists, atomically; the value stored afterwards."""

    def _get_many(self, keys: list[str], timeout: float) -> list[bytes | None]:
        """Each key's value, waiting for all until one deadline; engines with a batched wait override this.

        Past the deadline a key is still asked for with what is left of `LATE_READ_GRACE`: reading a key that is
        already there takes a round trip to the store, which on a loaded machine outlasts the 1 ms an expired
        wait would give it (TF's and JAX's gets then report the key missing although its client was in time).
        The grace is shared by the keys, so a wait ends at most that much after its deadline.  A store in this
        process (`late_read_grace` 0) answers at once and takes none.
        """
        deadline = time.monotonic() + timeout
        grace = self.late_read_grace
        out: list[bytes | None] = []
        for k in keys:
            left = deadline - time.monotonic()
            out.append(self._get(k, left if left > 0 else max(0.0, deadline + grace - time.monotonic())))
        return out

    def _delete(self, key: str) -> None:  # noqa: B027 - optional for stores that cannot delete
        pass

    def _drop_session(self) -> None:
        """Delete what the oldest pending session left: client 0's broadcasts, and any post never read."""
        _, broadcasts, posts = self._pending.pop(0)
        for key in broadcasts:
            self._delete(key)
        for key in posts:
            head = self._get(key, 0.0)
            if head is None:
                continue
            if head[:1] == b"\x01" and len(head) == 5:
                for i in range(int.from_bytes(head[1:], "little")):
                    self._delete(_part_key(key, i))
            self._delete(key)

    @contextlib.contextmanager
    def _within(self, timeout: float) -> Iterator[None]:
        """A session step of ``timeout`` seconds runs inside this: stores whose calls take no timeout of their
        own (a set, a create) bound them by it."""
        yield

    def session(self, kind: str) -> Session:
        number = self._sessions
        self._sessions += 1
        return _KVSession(self, number, kind)


class StepDeadlineCoordinator(KeyValueCoordinator):
    """A `KeyValueCoordinator` over a store whose set and create take no timeout: each session step records its
    deadline (per thread, so concurrent steps of other threads keep theirs) for the store calls it makes."""

    def __init__(self, rank: int, size: int, namespace: str = "shardckpt") -> None:
        super().__init__(rank, size, namespace)
        self._local = threading.local()

    @contextlib.contextmanager
    def _within(self, timeout: float) -> Iterator[None]:
        outer = self._step_deadline()
        self._local.deadline = time.monotonic() + timeout
        try:
            yield
        finally:
            self._local.deadline = outer

    def _step_deadline(self) -> float | None:
        """The ``time.monotonic()`` deadline of the step this thread is in, or None outside a step."""
        return getattr(self._local, "deadline", None)


def _part_key(key: str, i: int) -> str:
    # Part i of a large value: the last component (a client's rank, for its posts) stays last, so a store
    # that lets a client write only keys ending in its own rank accepts the parts too.
    head, last = key.rsplit("/", 1)
    return f"{head}~{i}/{last}"


# The steps in which clients post to client 0 (`Session.gather`), by session kind: where a failed session may
# hold posts client 0 never read.  A save's clients also post steps client 0 may never gather ("done" after a
# failure); a plain all_gather's only post is "in".
GATHERS = {"save": ("agree", "written", "done")}


class _KVSession(Session):
    def _put(self, key: str, data: bytes) -> list[str]:
        """Store ``data`` under ``key``: one value, or parts of at most ``MAX_VALUE`` bytes first and a head
        naming their count last (stores cap a value: torch's TCPStore at 8 MiB); every key written."""
        c, cap = self._c, self._c.MAX_VALUE
        if len(data) < cap:
            c._set(key, b"\x00" + data)
            return [key]
        parts = [_part_key(key, i) for i in range(-(-len(data) // cap))]
        view = memoryview(data)
        for i, part in enumerate(parts):
            c._set(part, bytes(view[i * cap : (i + 1) * cap]))
        c._set(key, b"\x01" + len(parts).to_bytes(4, "little"))
        return [key, *parts]

    def _whole(self, key: str, head: bytes, timeout: float) -> tuple[bytes, list[str]]:
        """The value whose head is ``head`` (its parts are in the store before it) and its part keys."""
        if head[:1] == b"\x00":
            return head[1:], []
        if head[:1] != b"\x01" or len(head) != 5:
            raise CoordinationError(f"{self._c.engine}: key {key!r} holds a value shardckpt did not write")
        parts = [_part_key(key, i) for i in range(int.from_bytes(head[1:], "little"))]
        values = self._c._get_many(parts, max(timeout, 1.0))
        if any(v is None for v in values):
            raise CoordinationError(f"{self._c.engine}: parts of {key!r} are missing from the store")
        return b"".join(v for v in values if v is not None), parts

    def __init__(self, coord: KeyValueCoordinator, number: int, kind: str) -> None:
        self._c = coord
        self.rank, self.size, self.number, self.kind = coord.rank, coord.size, number, kind
        self._base = f"{coord._namespace}/{number}"
        self._broadcasts: list[str] = []
        self._read: set[str] = set()  # client 0: the gathers it read whole (and deleted)
        self.succeeded = False  # set by the operation once every client has its outcome

    def gather(self, step: str, data: bytes, timeout: float) -> list[bytes] | None:
        with self._c._within(timeout):
            return self._gather(step, data, timeout)

    def _gather(self, step: str, data: bytes, timeout: float) -> list[bytes] | None:
        c = self._c
        if self.rank != 0:
            self._put(f"{self._base}/{step}/{self.rank}", data)
            return None
        others = [f"{self._base}/{step}/{r}" for r in range(1, self.size)]
        heads = c._get_many(others, timeout) if others else []
        values: list[bytes | None] = []
        for key, head in zip(others, heads):
            if head is None:
                values.append(None)
                continue
            value, parts = self._whole(key, head, timeout)
            values.append(value)
            for k in (key, *parts):
                c._delete(k)
        missing = [r for r, v in enumerate(values, start=1) if v is None]
        if missing:
            raise ClientTimeoutError(_missing_error(c.engine, missing, self.size, f"{self.kind}/{step}", timeout, 0))
        self._read.add(step)
        # Every client posted in this session, so every client is done with the earlier ones.
        while c._pending and c._pending[0][0] < self.number:
            c._drop_session()
        return [data] + [v for v in values if v is not None]

    def broadcast(self, step: str, data: bytes | None, timeout: float) -> bytes:
        with self._c._within(timeout):
            return self._broadcast(step, data, timeout)

    def _broadcast(self, step: str, data: bytes | None, timeout: float) -> bytes:
        c = self._c
        key = f"{self._base}/{step}"
        if self.rank == 0:
            assert data is not None
            self._broadcasts.extend(self._put(key, data))
            return data
        head = c._get(key, timeout)
        if head is None:
            raise ClientTimeoutError(_missing_error(c.engine, [0], self.size, f"{self.kind}/{step}", timeout,
                                                    self.rank))
        return self._whole(key, head, timeout)[0]

    def decide(self, value: bytes, timeout: float) -> bytes | None:
        key = f"{self._base}/decision"
        if self.rank == 0:
            self._broadcasts.append(key)
        with self._c._within(timeout):
            return self._c._create(key, value)

    def close(self) -> None:
        if self.rank != 0:
            return
        c = self._c
        if self.succeeded:
            for key in self._broadcasts:
                c._delete(key)
            return
        posts = [f"{self._base}/{step}/{r}" for step in GATHERS.get(self.kind, ("in",)) if step not in self._read
                 for r in range(1, self.size)]
        c._pending.append((self.number, self._broadcasts, posts))
        while len(c._pending) > c.KEPT:
            c._drop_session()
