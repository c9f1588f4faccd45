"""MPI (mpi4py) as an engine: session collectives from nonblocking point-to-point messages, no pickle.

Each step of a session (`MessageSession`: gather to client 0, broadcast from it,
client 0's decision) sends one message, ``instance | seq | payload``, with ``Isend``
from a numpy uint8 buffer, and receives by polling ``Improbe`` (then ``Irecv`` into a
buffer of the probed size) until the deadline.  Ranks whose message has not
arrived by then are named in a `ClientTimeoutError`.  ``seq`` numbers the session
and the step; the tag cycles with it and the receiver checks the header (which
coordinator, which session and step), so a late message of an abandoned session
is recognised and dropped, never taken for a newer one.  Sends are never waited
for: they stay posted, as a key stays in a key-value store, their buffers kept
alive until they complete, and `close` cancels what is left.

MPI collectives are not used: they cannot time out, so one absent rank would
hang every other one.
"""

from __future__ import annotations

import atexit
import struct
import time
from typing import Any

from ..errors import ClientTimeoutError, CoordinationError
from .base import Coordinator, _missing_error
from .session import MessageSession, Session

_HEADER = struct.Struct("<QQ")  # (coordinator instance on this communicator, session * steps + step)
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
        self._sessions = 0
        # Every rank makes its coordinators on a communicator in the same order, so they number them alike;
        # the number goes into each message, so a coordinator never takes another's late message.
        key = self._comm.py2f()
        self._instance = _instances[key] = _instances.get(key, 0) + 1
        # (request, buffer) of messages still in flight when a collective returned or gave up.
        self._orphans: list[tuple[Any, Any]] = []
        # Sends are never waited for, so the last broadcast of a program may still be in flight when it ends:
        # deliver it before MPI is finalised (mpi4py finalises at exit too; handlers registered later run first).
        atexit.register(self._drain, 10.0)

    def _tag(self, seq: int) -> int:
        return self._tag_top - (seq % self._tag_span)

    def _drain(self, limit: float) -> None:
        """Keep MPI moving our pending sends until they are delivered (or ``limit`` seconds pass)."""
        deadline = time.monotonic() + limit
        try:
            while self._orphans and time.monotonic() < deadline and not self._MPI.Is_finalized():
                self._reap_orphans()
                time.sleep(0.001)
        except self._MPI.Exception:
            pass

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

    def session(self, kind: str) -> Session:
        """This rank's next session; its steps travel as messages numbered by session and step."""
        self._sessions += 1
        return MessageSession(self, self.rank, self.size, self._sessions - 1, kind)

    def _exchange(self, send_to: list[int], data: bytes | None, sources: list[int], seq: int, name: str,
                  timeout: float, partial: bool = False) -> dict[int, bytes]:
        """Send ``data`` to ``send_to`` (not waiting for delivery) and receive collective ``seq`` from ``sources``.

        Raises `ClientTimeoutError` naming the sources not heard from within ``timeout`` seconds (unless
        ``partial``), and `CoordinationError` when MPI itself fails.
        """
        MPI, np, comm = self._MPI, self._np, self._comm
        self._reap_orphans()
        tag = self._tag(seq)
        start = time.monotonic()
        deadline = start + timeout
        grace = max(timeout, 30.0)
        out: dict[int, bytes] = {}
        message = np.frombuffer(_HEADER.pack(self._instance, seq) + (data or b""), dtype=np.uint8)
        receiving: dict[int, tuple[Any, Any]] = {}  # rank -> (request, buffer) of a matched message
        waiting = list(sources)
        try:
            # Sends complete in the background (kept alive until then): the receiver may come later.
            self._keep([(r, comm.Isend([message, MPI.BYTE], dest=r, tag=tag)) for r in send_to], message)
            pause, idle = 0.0002, 0
            while waiting:
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
                        continue  # a message of a long-gone session that shared this tag: drop it
                    out[r] = raw[_HEADER.size :]
                    waiting.remove(r)
                self._reap_orphans()
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
            self._keep([], message, receiving)
            raise CoordinationError(f"{self.engine}: '{name}' failed on client {self.rank}: {exc}") from None
        if waiting:
            self._keep([], message, receiving)
            if not partial:
                raise ClientTimeoutError(_missing_error(self.engine, waiting, self.size, name, timeout, self.rank))
        return out

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
