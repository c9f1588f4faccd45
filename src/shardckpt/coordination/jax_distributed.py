"""JAX's distributed runtime as an engine: the key-value store of ``jax.distributed``'s coordination service.

Use after ``jax.distributed.initialize(...)``::

    coord = JaxCoordinator()          # or let sharded_save find it
    shardckpt.sharded_save(mesh, prefix, names, slices, tensors, coordinator=coord)

Keys live under ``shardckpt/<instance>/``: every process numbers its
coordinators in creation order, so all processes must create them in the same
order (as they call collectives in the same order).  The blocking get has an
exact deadline; a missing client surfaces as `ClientTimeoutError`.

Note: a process that dies (rather than being late) is noticed by JAX itself
only after ``heartbeat_timeout_seconds``; JAX then aborts every other process.
Keep shardckpt's timeout shorter than the heartbeat timeout if you want the
Python-level error first.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..errors import CoordinationError
from .base import KeyValueCoordinator

_instances = itertools.count()
_MAX_MS = 2**31 - 1  # the runtimes take a C int of milliseconds


def _status(exc: BaseException) -> str:
    return str(exc).split(":", 1)[0].strip()


class JaxCoordinator(KeyValueCoordinator):
    """All-gather over ``jax._src.distributed.global_state.client`` (a ``DistributedRuntimeClient``)."""

    engine = "jax.distributed"

    def __init__(self, client: Any = None, *, rank: int | None = None, size: int | None = None) -> None:
        import jax
        from jax._src import distributed

        state = distributed.global_state
        if client is None:
            client = state.client
            if client is None:
                raise CoordinationError("jax.distributed is not initialized (call jax.distributed.initialize first)")
        if rank is None:
            rank = int(state.process_id) if state.client is not None else int(jax.process_index())
        if size is None:
            size = int(state.num_processes) if state.client is not None else int(jax.process_count())
        super().__init__(rank, size, namespace=f"shardckpt/{next(_instances)}")
        self._client = client

    def _set(self, key: str, value: bytes) -> None:
        try:
            self._client.key_value_set_bytes(key, value)
        except RuntimeError as exc:
            hint = " (were coordinators created in a different order on some process?)" if _status(
                exc) == "ALREADY_EXISTS" else ""
            raise CoordinationError(f"{self.engine}: cannot set key {key!r}: {exc}{hint}") from None

    def _create(self, key: str, value: bytes) -> bytes:
        # The service refuses to overwrite (allow_overwrite=False): setting is an atomic create.
        try:
            self._client.key_value_set_bytes(key, value)
            return value
        except RuntimeError as exc:
            if _status(exc) != "ALREADY_EXISTS":
                raise CoordinationError(f"{self.engine}: cannot create key {key!r}: {exc}") from None
        try:
            return bytes(self._client.key_value_try_get_bytes(key))
        except RuntimeError as exc:
            raise CoordinationError(f"{self.engine}: cannot get key {key!r}: {exc}") from None

    def _get(self, key: str, timeout: float) -> bytes | None:
        ms = min(int(timeout * 1000), _MAX_MS)
        try:
            if ms <= 0:
                return bytes(self._client.key_value_try_get_bytes(key))
            return bytes(self._client.blocking_key_value_get_bytes(key, ms))
        except RuntimeError as exc:  # jax.errors.JaxRuntimeError
            if _status(exc) in ("DEADLINE_EXCEEDED", "NOT_FOUND"):
                return None
            raise CoordinationError(f"{self.engine}: cannot get key {key!r}: {exc}") from None

    def _delete(self, key: str) -> None:
        try:
            self._client.key_value_delete(key)
        except RuntimeError:
            pass  # best effort: a leftover key only costs memory in the service
