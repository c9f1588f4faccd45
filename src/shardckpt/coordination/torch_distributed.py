"""torch.distributed as an engine: all-gathers over the process group's c10d store, no pickle.

The default transport is the key-value store torch created for the group (a
TCPStore, usually hosted by rank 0), wrapped in ``PrefixStore("shardckpt", ...)``:
each client sets one key per collective and waits for the others' with
``store.wait(keys, timeout)``, so a client that never arrives is named in a
`ClientTimeoutError`.  Losing the store's host raises `CoordinationError` at once.

When no store can be obtained (or ``transport="tensor"``), the fallback sends
uint8 tensors point to point over a gloo group (a new one when the group's
backend is not gloo, e.g. NCCL): lengths, then payloads, each receive waited
with the collective's deadline, so the late ranks are named there too.

torch is imported only here, and only when a `TorchCoordinator` is made.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..errors import ClientTimeoutError, CoordinationError
from .base import Coordinator, StepDeadlineCoordinator, _missing_error
from .session import MessageSession, Session


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CoordinationError(f"torch.distributed is not available: {exc}") from None
    if not dist.is_available() or not dist.is_initialized():
        raise CoordinationError("torch.distributed is not initialised: call init_process_group first")
    return dist


def _group_store(dist: Any, group: Any) -> Any | None:
    """The c10d store behind ``group`` (the default group's when ``group`` is None), or None."""
    try:
        from torch.distributed import distributed_c10d as c10d

        if group is None or group is c10d.GroupMember.WORLD:
            return c10d._get_default_store()
        return c10d._get_process_group_store(group)
    except Exception:  # noqa: BLE001 - private API: any failure means "no store", use the fallback
        return None


class TorchCoordinator(Coordinator):
    """A coordinator over an initialised torch.distributed process group (default: the world).

    ``transport`` is ``"auto"`` (the group's store if there is one, else tensors),
    ``"store"`` or ``"tensor"``.  Every rank of the group must create its
    coordinators in the same order (each is a collective namespace).  With
    ``transport="tensor"`` on a non-gloo group, the gloo group is made here with
    ``new_group``, which every rank of the world must call.
    """

    engine = "torch.distributed"

    def __init__(self, group: Any = None, *, transport: str = "auto") -> None:
        dist = _dist()
        if transport not in ("auto", "store", "tensor"):
            raise CoordinationError(f"unknown transport {transport!r} (auto, store or tensor)")
        self._dist = dist
        self._group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise CoordinationError("this process is not a member of the given process group")
        store = _group_store(dist, group) if transport in ("auto", "store") else None
        if store is None and transport == "store":
            raise CoordinationError("the process group has no c10d store this torch version exposes")
        self._impl: Coordinator = (
            _StoreCoordinator(dist, store, self.rank, self.size) if store is not None
            else _TensorCoordinator(dist, group, self.rank, self.size)
        )
        self.transport = "store" if store is not None else "tensor"

    def session(self, kind: str) -> Session:
        """This rank's next session over the chosen transport."""
        return self._impl.session(kind)

    def close(self) -> None:
        """Delete the keys left in the store, or destroy the gloo group made here; never the user's own group."""
        self._impl.close()


# A store call gives up this long past its step's deadline (or past this bound outside any step).
_GRACE = 2.0
_OUTSIDE = 30.0


class _Connection:
    """A connection of shardckpt's own to the group's store (a clone: the same keys over a new socket), used by
    one call at a time.  c10d's reads have no timeout against a host that stopped answering (SIGSTOP, a hung
    process): a call that outlives its bound abandons its connection, and the next call opens another."""

    def __init__(self, shared: Any) -> None:
        self._shared = shared
        self._store: Any = None
        self.lock = threading.Lock()

    def store(self) -> Any:
        if self._store is None:
            try:
                self._store = self._shared.clone()
            except Exception:  # noqa: BLE001 - a store that cannot clone: share the group's connection
                self._store = self._shared
        return self._store


class _StoreCoordinator(StepDeadlineCoordinator):
    engine = "torch.distributed"

    def __init__(self, dist: Any, store: Any, rank: int, size: int) -> None:
        self._dist = dist
        self._shared = dist.PrefixStore("shardckpt", store)
        # Clients number their coordinators (rank by rank, in the store), so a new coordinator on the same
        # group never reads the keys an earlier one left behind.
        instance = self._call(lambda: self._shared.add(f"instances/{rank}", 1), "register")
        super().__init__(rank, size, namespace=f"i{instance}")
        self._conn = _Connection(self._shared)

    def _call(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except self._dist.DistNetworkError as exc:
            raise CoordinationError(f"torch.distributed: lost the c10d store during {what}: {exc}") from None
        except RuntimeError as exc:  # DistStoreError and older torch's plain RuntimeError
            raise CoordinationError(f"torch.distributed: c10d store failed during {what}: {exc}") from None

    def _op(self, fn: Callable[[Any], Any], what: str, wait: float = 0.0) -> Any:
        """``fn(store)`` on a thread of its own, given up ``_GRACE`` s past the step's deadline (or ``wait``)."""
        deadline = self._step_deadline()
        limit = max(wait, deadline - time.monotonic() if deadline is not None else _OUTSIDE) + _GRACE
        conn = self._conn
        box: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                with conn.lock:
                    box.append((True, self._call(lambda: fn(conn.store()), what)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box.append((False, exc))

        worker = threading.Thread(target=run, name="shardckpt-c10d", daemon=True)
        worker.start()
        worker.join(limit)
        if not box:
            if self._conn is conn:
                self._conn = _Connection(self._shared)
            raise ClientTimeoutError(f"torch.distributed: the c10d store did not answer ({what}) within {limit:g} s; "
                                     "is its host, client 0's process, stopped? (this is client "
                                     f"{self.rank})")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _waited(self, st: Any, keys: list[str], timeout: float) -> bool:
        """Wait for ``keys`` up to ``timeout``; False when the wait timed out."""
        try:
            st.wait(keys, timedelta(seconds=timeout))
        except self._dist.DistNetworkError:
            raise
        except RuntimeError as exc:  # DistStoreError ("wait timeout after ...ms") is a RuntimeError
            if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
                return False
            raise
        return True

    def _set(self, key: str, value: bytes) -> None:
        self._op(lambda st: st.set(key, value), f"set {key}")

    def _get(self, key: str, timeout: float) -> bytes | None:
        if timeout < 0.001:
            # A zero timeout means "wait forever" to c10d: only look.
            return self._op(lambda st: bytes(st.get(key)) if st.check([key]) else None, f"check {key}")
        return self._op(lambda st: bytes(st.get(key)) if self._waited(st, [key], timeout) else None,
                        f"wait for {key}", timeout)

    def _create(self, key: str, value: bytes) -> bytes:
        # compare_set with an empty expected value creates the key only if it is absent, atomically in the
        # store's server, and returns what the key holds afterwards.
        return bytes(self._op(lambda st: st.compare_set(key, "", value), f"create {key}"))

    def _get_many(self, keys: list[str], timeout: float) -> list[bytes | None]:
        # One wait for all keys and one multi_get when they are all there (the usual case): 2 round trips
        # instead of 2 per key.  On a timeout, fall back to finding out which are missing.
        if timeout >= 0.001:
            got = self._op(lambda st: [bytes(v) for v in st.multi_get(keys)] if self._waited(st, keys, timeout)
                           else None, "wait", timeout)
            if got is not None:
                return got
        return [self._get(k, 0) for k in keys]

    def _delete(self, key: str) -> None:
        self._op(lambda st: st.delete_key(key), f"delete {key}")


_TAG_BASE = 1 << 20
_TAG_SPAN = 1 << 26


class _TensorCoordinator(Coordinator):
    """The fallback: point-to-point gloo messages, lengths then payloads, each receive waited with a deadline.

    A receive that does not complete by the deadline names its sender.  Sessions are `MessageSession`s;
    their decision lives with client 0.  After a
    timeout gloo closes the pairs of the late ranks, so the group should be
    re-initialised (as after any failed gloo collective).
    """

    engine = "torch.distributed"
    can_poll = False  # a gloo receive that times out closes its pair ...
    gather_to_all = True  # ... so every client must find the absent itself (N² messages: a fallback)

    def __init__(self, dist: Any, group: Any, rank: int, size: int) -> None:
        import torch

        self._torch = torch
        self._dist = dist
        self.rank, self.size = rank, size
        self._sessions = 0
        self._sends: list[tuple[Any, Any]] = []  # (work, tensor) of sends not yet delivered
        self._closed: set[int] = set()  # peers whose gloo pair closed (a receive from them timed out)
        if str(dist.get_backend(group)).lower() == "gloo":
            self._gloo, self._own = group, False
        else:
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            self._gloo, self._own = dist.new_group(ranks=ranks, backend="gloo"), True
        whole = self._gloo is None or self._gloo is dist.GroupMember.WORLD
        self._global = list(range(size)) if whole else [dist.get_global_rank(self._gloo, r) for r in range(size)]

    def session(self, kind: str) -> Session:
        self._sessions += 1
        return MessageSession(self, self.rank, self.size, self._sessions - 1, kind)

    def _wait(self, recvs: dict[int, Any], deadline: float) -> list[int]:
        missing = []
        for r, work in recvs.items():
            try:
                work.wait(timeout=timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except RuntimeError as exc:
                if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                    raise
                missing.append(r)
        return missing

    def _exchange(self, send_to: list[int], data: bytes | None, sources: list[int], seq: int, name: str,
                  timeout: float, partial: bool = False) -> dict[int, bytes]:
        """Lengths, then payloads (at least one byte: gloo sends no empty tensors); sends are not waited for."""
        torch, dist, group = self._torch, self._dist, self._gloo
        tag = _TAG_BASE + (2 * seq) % _TAG_SPAN
        deadline = time.monotonic() + timeout
        try:
            if send_to:
                payload = data or b""
                length = torch.tensor([len(payload)], dtype=torch.int64)
                body = torch.frombuffer(bytearray(payload or b"\0"), dtype=torch.uint8)
                for r in send_to:
                    if r in self._closed:
                        continue
                    try:
                        self._sends.append((dist.isend(length, dst=self._global[r], group=group, tag=tag), length))
                        self._sends.append((dist.isend(body, dst=self._global[r], group=group, tag=tag + 1), body))
                    except RuntimeError:
                        self._closed.add(r)  # gloo closed the pair: r was late once; it cannot hear us now
                self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
            if not sources:
                return {}
            lengths = {r: torch.zeros(1, dtype=torch.int64) for r in sources if r not in self._closed}
            recvs = {r: dist.irecv(t, src=self._global[r], group=group, tag=tag) for r, t in lengths.items()}
            missing = self._wait(recvs, deadline) + [r for r in sources if r in self._closed]
            self._closed.update(missing)  # a timed-out gloo receive closes its pair
            if missing and not partial:
                raise ClientTimeoutError(_missing_error(self.engine, missing, self.size, name, timeout, self.rank))
            here = [r for r in sources if r not in missing]
            bodies = {r: torch.empty(max(int(lengths[r].item()), 1), dtype=torch.uint8) for r in here}
            recvs = {r: dist.irecv(t, src=self._global[r], group=group, tag=tag + 1) for r, t in bodies.items()}
            stalled = self._wait(recvs, max(deadline, time.monotonic() + 30))
            if stalled:
                raise CoordinationError(
                    f"{self.engine}: clients {stalled} stopped sending in the middle of '{name}' (this is client "
                    f"{self.rank})"
                )
        except RuntimeError as exc:
            raise CoordinationError(f"{self.engine}: '{name}' failed on client {self.rank}: {exc}") from None
        return {r: bodies[r].numpy().tobytes()[: int(lengths[r].item())] for r in here}

    def close(self) -> None:
        if self._own:
            try:
                self._dist.destroy_process_group(self._gloo)
            except Exception:  # noqa: BLE001 - best effort
                pass
            self._own = False
