"""MPI (mpi4py) as an engine: all-gathers from nonblocking point-to-point messages, no pickle.

Every collective sends each other rank one message, ``instance | seq | payload``, with
``Isend`` from a numpy uint8 buffer, and receives the others' by polling
``Improbe`` (then ``Imrecv`` into a buffer of the probed size) until the deadline.
Ranks whose message has not arrived by then are named in a `ClientTimeoutError`.
The tag cycles with the collective's sequence number and the receiver checks the
header (which coordinator, which collective), so a late message of an abandoned
collective is recognised and dropped, never taken for a newer one.  Sends still pending when a collective
ends (a timeout, or a slow peer) stay posted, as a key stays in a key-value
store: a late rank still receives them; their buffers are kept alive until they
complete, and `close` cancels what is left.

MPI collectives are not used: they cannot time out, so one absent rank would
hang every other one.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from ..errors import ClientTimeoutError, CoordinationError
from .base import Coordinator

_HEADER = struct.Struct("<QQ")  # (coordinator instance on this communicator, collective seq)
_TAG_SPAN = 1 << 14  # distinct tags cycled through; the seq header disambiguates the wrap-around
_MIN_LOOK = 0.01  # even a timeout of 0 polls this long: MPI moves a message only while it is polled
_instances: dict[int, int] = {}  # coordinators made so far, by communicator handle


class MPICoordinator(Coordinator):
    """A coordinator over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    All ranks of ``comm`` must create their coordinators in the same order and
    call the collectives in the same order.  Messages use the top ``16384`` tags
    below ``MPI.TAG_UB`` of ``comm``: the program must not receive with
    ``MPI.ANY_TAG`` on the same communicator while a save runs.
    """

    engine = "MPI"

    def __init__(self, comm: Any = None) -> None:
        try:
            import numpy as np
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise CoordinationError(f"mpi4py is not available: {exc}") from None
        if not MPI.Is_initialized() or MPI.Is_finalized():
            raise CoordinationError("MPI is not initialised (or already finalised)")
        self._MPI, self._np = MPI, np
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        tag_ub = self._comm.Get_attr(MPI.TAG_UB)
        tag_ub = int(tag_ub) if tag_ub else 32767
        self._tag_top = tag_ub
        self._tag_span = min(_TAG_SPAN, tag_ub // 2)
        self._seq = 0
        # Every rank makes its coordinators on a communicator in the same order, so they number them alike;
        # the number goes into each message, so a coordinator never takes another's late message.
        key = self._comm.py2f()
        self._instance = _instances[key] = _instances.get(key, 0) + 1
        # (request, buffer) of messages still in flight when a collective returned or gave up.
        self._orphans: list[tuple[Any, Any]] = []

    def _tag(self, seq: int) -> int:
        return self._tag_top - (seq % self._tag_span)

    def _reap_orphans(self) -> None:
        alive = []
        for req, buf in self._orphans:
            try:
                done = req.Test()
            except self._MPI.Exception:
                done = True
            if not done:
                alive.append((req, buf))
        self._orphans = alive

    def all_gather(self, data: bytes, name: str, timeout: float) -> list[bytes]:
        """Every rank's ``data``, by rank.

        Raises `ClientTimeoutError` naming the ranks not heard from within ``timeout`` seconds, and
        `CoordinationError` when MPI itself fails.
        """
        MPI, np, comm = self._MPI, self._np, self._comm
        seq = self._seq
        self._seq += 1
        self._reap_orphans()
        if self.size == 1:
            return [data]
        tag = self._tag(seq)
        start = time.monotonic()
        deadline = start + timeout
        grace = max(timeout, 30.0)
        out: list[bytes | None] = [None] * self.size
        out[self.rank] = data
        message = np.frombuffer(_HEADER.pack(self._instance, seq) + data, dtype=np.uint8)
        sends: list[tuple[int, Any]] = []
        receiving: dict[int, tuple[Any, Any]] = {}  # rank -> (request, buffer) of a matched message
        waiting = [r for r in range(self.size) if r != self.rank]
        try:
            for r in waiting:
                sends.append((r, comm.Isend([message, MPI.BYTE], dest=r, tag=tag)))
            pause, idle = 0.0002, 0
            while True:
                progressed = False
                for r in waiting:
                    if r in receiving:
                        continue
                    status = MPI.Status()
                    msg = comm.Improbe(source=r, tag=tag, status=status)
                    if msg is not None:
                        buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
                        receiving[r] = (msg.Irecv([buf, MPI.BYTE]), buf)
                        progressed = True
                for r, (req, buf) in list(receiving.items()):
                    if not req.Test():
                        continue
                    del receiving[r]
                    progressed = True
                    raw = buf.tobytes()
                    if len(raw) < _HEADER.size or _HEADER.unpack_from(raw) != (self._instance, seq):
                        continue  # a late message of an older collective that shared this tag: drop it
                    out[r] = raw[_HEADER.size :]
                    waiting.remove(r)
                sends = [(r, req) for r, req in sends if not req.Test()]
                # Done when every message is in and ours are delivered (a large one needs our progress).
                if not waiting and not sends:
                    break
                now = time.monotonic()
                # Past the deadline, stop once a few passes bring nothing new (MPI moves messages only while
                # polled, so even a timeout of 0 takes what has arrived), but finish receiving a matched
                # message: its sender is here.
                idle = 0 if progressed else idle + 1
                if (now >= deadline and idle >= 3 and now >= start + _MIN_LOOK
                        and (not receiving or now >= deadline + grace)):
                    break
                if progressed:
                    pause = 0.0002
                else:
                    time.sleep(pause if now < deadline else 0.001)
                    pause = min(pause * 2, 0.005)
        except MPI.Exception as exc:
            self._keep(sends, message, receiving)
            raise CoordinationError(f"{self.engine}: '{name}' failed on client {self.rank}: {exc}") from None
        if waiting:
            self._keep(sends, message, receiving)
            raise ClientTimeoutError(
                f"{self.engine}: clients {waiting} of {self.size} did not reach '{name}' within {timeout:g} s "
                f"(this is client {self.rank})"
            )
        # Every peer's message arrived, so every peer is in this collective and will receive ours:
        # sends still pending (a large message, a slow peer) finish in the background.
        self._keep(sends, message)
        return [v if v is not None else b"" for v in out]

    def _keep(self, sends: list[tuple[int, Any]], buffer: Any,
              receiving: dict[int, tuple[Any, Any]] | None = None) -> None:
        self._orphans.extend((req, buffer) for _r, req in sends)
        self._orphans.extend((receiving or {}).values())

    def close(self) -> None:
        """Cancel the sends no rank has received (a rank that never came); call before ``MPI.Finalize``."""
        self._reap_orphans()
        for req, _buf in self._orphans:
            try:
                req.Cancel()
            except self._MPI.Exception:
                pass
        deadline = time.monotonic() + 1.0
        while self._orphans and time.monotonic() < deadline:
            self._reap_orphans()
            time.sleep(0.001)
