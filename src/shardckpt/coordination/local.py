"""An in-process group: N clients as threads of one process sharing a dictionary."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .base import KeyValueCoordinator

T = TypeVar("T")


class LocalGroup:
    """The shared store of an in-process group; `coordinator(i)` is client ``i``'s view of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._clients: dict[int, LocalCoordinator] = {}

    def coordinator(self, rank: int) -> LocalCoordinator:
        """Client ``rank``'s coordinator: the same one each time, as a process keeps one per engine (it numbers
        the client's sessions, so a second one would reuse the first one's session numbers)."""
        with self._cond:
            if rank not in self._clients:
                self._clients[rank] = LocalCoordinator(self, rank)
            return self._clients[rank]

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` and wake every client waiting for it."""
        with self._cond:
            self._data[key] = value
            self._cond.notify_all()

    def get(self, key: str, timeout: float) -> bytes | None:
        """The value of ``key``, waiting up to ``timeout`` seconds for it to appear; None if it does not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._data:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._data[key]

    def create(self, key: str, value: bytes) -> bytes:
        """Store ``value`` under ``key`` unless it is there; the value stored afterwards."""
        with self._cond:
            stored = self._data.setdefault(key, value)
            self._cond.notify_all()
            return stored

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        with self._cond:
            self._data.pop(key, None)

    def run(self, fn: Callable[[LocalCoordinator], T]) -> list[T]:
        """Run ``fn(coordinator)`` on every client in its own thread; results by rank, first error raised."""
        with ThreadPoolExecutor(self.size, thread_name_prefix="shardckpt-client") as pool:
            futures = [pool.submit(fn, self.coordinator(r)) for r in range(self.size)]
            return [f.result() for f in futures]


class LocalCoordinator(KeyValueCoordinator):
    """Client ``rank`` of a `LocalGroup`: a key-value coordinator over its shared dictionary."""

    engine = "in-process"
    late_read_grace = 0.0  # the store answers at once: a read past the deadline needs no round trip

    def __init__(self, group: LocalGroup, rank: int) -> None:
        super().__init__(rank, group.size)
        self._group = group

    def _set(self, key: str, value: bytes) -> None:
        self._group.set(key, value)

    def _get(self, key: str, timeout: float) -> bytes | None:
        return self._group.get(key, timeout)

    def _create(self, key: str, value: bytes) -> bytes:
        return self._group.create(key, value)

    def _delete(self, key: str) -> None:
        self._group.delete(key)
