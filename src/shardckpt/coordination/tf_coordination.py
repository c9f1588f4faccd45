"""TensorFlow's coordination service as an engine, as DTensor multi-client sets it up.

Use after ``dtensor.initialize_accelerator_system(...)`` in every client
(``DTENSOR_CLIENT_ID``, ``DTENSOR_JOBS`` ... in the environment)::

    coord = TFCoordinator()           # or let sharded_save find it
    shardckpt.sharded_save(mesh, prefix, names, slices, tensors, coordinator=coord)

The service's key-value store keeps C strings (a NUL ends the value) and its
Python getter decodes UTF-8, so values travel base64-encoded.  A get with a
timeout of 0 would block forever, so an expired wait still asks with at least 1 ms
(a gather's reads past the deadline share `LATE_READ_GRACE`: see `_get_many`).
Keys live under ``shardckpt/<instance>/``: every client numbers its
coordinators in creation order, so all clients must create them in the same order.
"""

from __future__ import annotations

import base64
import itertools
import os

from ..errors import CoordinationError
from .base import KeyValueCoordinator

_instances = itertools.count()
_MAX_MS = 2**31 - 1  # the runtimes take a C int of milliseconds
_MARK = "b:"  # never an empty value, whatever the payload


class TFCoordinator(KeyValueCoordinator):
    """All-gather over ``tensorflow.python.eager.context.context()``'s coordination key-value store."""

    engine = "tensorflow coordination service"

    def __init__(self, rank: int | None = None, size: int | None = None) -> None:
        from tensorflow.experimental import dtensor
        from tensorflow.python.eager import context
        from tensorflow.python.framework import errors_impl

        if rank is None:
            rank = int(os.environ["DTENSOR_CLIENT_ID"]) if "DTENSOR_CLIENT_ID" in os.environ else dtensor.client_id()
        if size is None:
            size = dtensor.num_clients()
        super().__init__(int(rank), int(size), namespace=f"shardckpt/{next(_instances)}")
        self._ctx = context.context()
        self._errors = errors_impl

    def _set(self, key: str, value: bytes) -> None:
        try:
            self._ctx.set_config_key_value(key, _MARK + base64.b64encode(value).decode("ascii"))
        except self._errors.OpError as exc:
            hint = (" (were coordinators created in a different order on some client?)"
                    if isinstance(exc, self._errors.AlreadyExistsError) else "")
            raise CoordinationError(f"{self.engine}: cannot set key {key!r}: {exc.message}{hint}") from None

    def _create(self, key: str, value: bytes) -> bytes:
        # The service refuses to set an existing key: setting is an atomic create.
        try:
            self._ctx.set_config_key_value(key, _MARK + base64.b64encode(value).decode("ascii"))
            return value
        except self._errors.AlreadyExistsError:
            pass
        except self._errors.OpError as exc:
            raise CoordinationError(f"{self.engine}: cannot create key {key!r}: {exc.message}") from None
        got = self._get(key, 1.0)
        if got is None:
            raise CoordinationError(f"{self.engine}: key {key!r} exists but cannot be read")
        return got

    def _get(self, key: str, timeout: float) -> bytes | None:
        ms = min(max(1, int(timeout * 1000)), _MAX_MS)
        try:
            text = self._ctx.get_config_key_value(key, ms)
        except self._errors.DeadlineExceededError:
            return None
        except self._errors.OpError as exc:
            raise CoordinationError(f"{self.engine}: cannot get key {key!r}: {exc.message}") from None
        if not text.startswith(_MARK):
            raise CoordinationError(f"{self.engine}: key {key!r} holds a value shardckpt did not write")
        return base64.b64decode(text[len(_MARK):])

    def _delete(self, key: str) -> None:
        try:
            self._ctx.delete_config_key_value(key)
        except self._errors.OpError:
            pass  # best effort: a leftover key only costs memory in the service
