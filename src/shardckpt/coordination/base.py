"""The one small protocol every engine implements, and a generic version over a key-value store.

A coordinator knows its client index (``rank``) and the client count (``size``)
and offers one collective, `all_gather` of small byte strings, with a timeout;
barriers are gathers of nothing.  Every collective is named and numbered, and
all clients call them in the same order, so keys never collide.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod

from ..errors import ClientTimeoutError, CoordinationError

DEFAULT_TIMEOUT = 300.0


def default_timeout(timeout: float | None = None) -> float:
    """``timeout`` if given, else ``SHARDCKPT_TIMEOUT`` from the environment, else 300 seconds."""
    if timeout is not None:
        return float(timeout)
    env = os.environ.get("SHARDCKPT_TIMEOUT")
    if env:
        try:
            return float(env)
        except ValueError:
            raise CoordinationError(f"SHARDCKPT_TIMEOUT={env!r} is not a number of seconds") from None
    return DEFAULT_TIMEOUT


class Coordinator(ABC):
    """What a collective save needs from a cluster: who am I, how many are we, and gather bytes."""

    rank: int
    size: int
    engine: str = "?"

    @abstractmethod
    def all_gather(self, data: bytes, name: str, timeout: float) -> list[bytes]:
        """Every client's ``data``, by rank; raises `ClientTimeoutError` naming the missing clients."""

    def barrier(self, name: str, timeout: float) -> None:
        """Wait until every client reaches ``name`` (``timeout`` in seconds); raises `ClientTimeoutError` otherwise."""
        self.all_gather(b"", name, timeout)

    def release(self, name: str, timeout: float) -> None:
        """The last step of a collective operation: client 0 returns only after every other client has.

        Engines whose store lives in client 0's process need this so client 0 does not exit while
        others still read from it; the others do not wait.  A client that does not arrive is only
        reported as a missing name in the raised `ClientTimeoutError` on client 0.
        """
        self.barrier(name, timeout)

    def close(self) -> None:  # noqa: B027 - most engines own nothing to release
        """Release what the coordinator created (never the user's own process group)."""


class SingleClient(Coordinator):
    """One client owning every device: the collectives are trivial."""

    engine = "single"

    def __init__(self) -> None:
        self.rank, self.size = 0, 1

    def all_gather(self, data: bytes, name: str, timeout: float) -> list[bytes]:
        """``[data]``: there is no one else to wait for."""
        return [data]


class KeyValueCoordinator(Coordinator):
    """All-gather over a key-value store with blocking gets: each client sets one key, reads the others.

    A client that does not post within the timeout is named in the error.  A
    client deletes its key of collective *k-2* when it enters collective *k*: by
    then every client has posted *k-1*, so every client has finished reading *k-2*.
    """

    def __init__(self, rank: int, size: int, namespace: str = "shardckpt") -> None:
        self.rank, self.size = rank, size
        self._namespace = namespace
        self._seq = 0
        self._posted: list[str] = []

    @abstractmethod
    def _set(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    def _get(self, key: str, timeout: float) -> bytes | None:
        """The value, or None once ``timeout`` seconds pass without one."""

    def _delete(self, key: str) -> None:  # noqa: B027 - optional for stores that cannot delete
        pass

    def release(self, name: str, timeout: float) -> None:
        """Client 0 returns once every other client has arrived (or raises `ClientTimeoutError`); the others at once."""
        seq = self._seq
        self._seq += 1
        base = f"{self._namespace}/{seq}/{name}"
        if self.rank != 0:
            self._set(f"{base}/{self.rank}", b"")  # client 0, its only reader, deletes it
            return
        deadline = time.monotonic() + timeout
        missing = []
        for r in range(1, self.size):
            if self._get(f"{base}/{r}", max(0.0, deadline - time.monotonic())) is None:
                missing.append(r)
            else:
                self._delete(f"{base}/{r}")
        if missing:
            raise ClientTimeoutError(
                f"{self.engine}: clients {missing} of {self.size} did not reach '{name}' within {timeout:g} s"
            )

    def all_gather(self, data: bytes, name: str, timeout: float) -> list[bytes]:
        """Every client's ``data``, by rank; raises `ClientTimeoutError` naming clients absent after ``timeout`` s."""
        seq = self._seq
        self._seq += 1
        base = f"{self._namespace}/{seq}/{name}"
        mine = f"{base}/{self.rank}"
        self._set(mine, data)
        self._posted.append(mine)
        if len(self._posted) > 2:
            self._delete(self._posted.pop(0))
        deadline = time.monotonic() + timeout
        out: list[bytes | None] = [None] * self.size
        out[self.rank] = data
        missing = []
        for r in range(self.size):
            if r == self.rank:
                continue
            value = self._get(f"{base}/{r}", max(0.0, deadline - time.monotonic()))
            if value is None:
                missing.append(r)
            out[r] = value
        if missing:
            raise ClientTimeoutError(
                f"{self.engine}: clients {missing} of {self.size} did not reach '{name}' within {timeout:g} s "
                f"(this is client {self.rank})"
            )
        return [v if v is not None else b"" for v in out]
