"""Session-scoped collectives: every value belongs to one operation (a save, a gather) and cannot leak into another.

A coordinator numbers the sessions it opens; every client opens its sessions in
the same order (one per ``sharded_save``, one per plain `Coordinator.all_gather`),
so session *k* on one client is session *k* on every other, however the earlier
sessions ended.  Inside a session steps have names, not numbers: a client that
gives up half-way leaves nothing that a later session could read, because every
key (or message header) carries the session number.  This is what makes "a
client was late past the timeout once" harmless to every later save.

The collectives are rooted at client 0, so their cost is linear in the client count:

* `Session.gather` — every client sends one value, client 0 receives them all;
* `Session.broadcast` — client 0 sends one value, every client receives it;
* `Session.decide` — the first value proposed wins, atomically, whoever proposes
  it; every later proposer learns the winner.  A save's commit point is a decision
  (client 0 proposes "commit", a client that gives up proposes "abort"), so one
  save has one outcome on every client.

Invariant: a value posted under session *k* is only ever read under session *k*.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable

from ..errors import ClientTimeoutError, CoordinationError

_count = struct.Struct("<I")


def pack_values(values: list[bytes]) -> bytes:
    """Length-prefixed concatenation, so a broadcast can carry every client's value."""
    return b"".join(_count.pack(len(v)) + v for v in values)


def unpack_values(blob: bytes, n: int) -> list[bytes]:
    out, pos = [], 0
    for _ in range(n):
        (length,) = _count.unpack_from(blob, pos)
        pos += 4
        out.append(blob[pos : pos + length])
        pos += length
    return out


# A client waiting for client 0's answer to a gather gives client 0 its whole timeout to hear from everyone,
# and this much more (at most) to answer: so it hears client 0 name the missing client rather than timing out
# at the same moment itself.
ANSWER_SLACK = 10.0


def answer_wait(timeout: float) -> float:
    """How long to wait for client 0's answer to a gather that itself waits ``timeout``."""
    return timeout + min(timeout, ANSWER_SLACK)


class Session(ABC):
    """The collectives of one operation on one client; make it with `Coordinator.session`."""

    rank: int
    size: int
    number: int
    kind: str
    # Set when every client is known to have learnt the outcome (client 0 gathered "done"): what the
    # session posted may then go at once; a failed session's values stay a while for late clients.
    succeeded: bool = False

    @abstractmethod
    def gather(self, step: str, data: bytes, timeout: float) -> list[bytes] | None:
        """Client 0: every client's ``data`` by rank (waiting up to ``timeout`` s; raises `ClientTimeoutError`
        naming the absent).  Any other client: sends ``data`` and returns None at once."""

    @abstractmethod
    def broadcast(self, step: str, data: bytes | None, timeout: float) -> bytes:
        """Client 0 sends ``data`` (and returns it); every other client waits up to ``timeout`` s for it."""

    @abstractmethod
    def decide(self, value: bytes, timeout: float) -> bytes | None:
        """Propose ``value``; the value that won (the first proposed in this session, ours or another's).

        None only on engines whose decision lives with client 0 when client 0 did not answer within
        ``timeout``: the winner is then unknown to this client.
        """

    def confirm(self, step: str, timeout: float) -> None:
        """Client 0 waits until every other client has reached ``step`` (a gather of nothing); the others go on."""
        self.gather(step, b"", timeout)

    def all_gather(self, data: bytes, timeout: float) -> list[bytes]:
        """Every client's ``data``, on every client: a gather and a broadcast (O(N) messages, N values each).

        When client 0 misses someone it broadcasts the error, so every client raises the same
        `ClientTimeoutError` instead of waiting out its own timeout.
        """
        return unpack_values(self.reduce(data, pack_values, timeout), self.size)

    def reduce(self, data: bytes, judge: Callable[[list[bytes]], bytes], timeout: float) -> bytes:
        """``judge(every client's data)``, computed by client 0 and returned on every client.

        A gather and a broadcast, like `all_gather`, but a client receives only the verdict: an agreement
        whose answer is one short value costs each client O(1) bytes, whatever the client count.  A timeout
        on client 0 is broadcast, so every client raises the same `ClientTimeoutError`.
        """
        try:
            values = self.gather("in", data, timeout)
        except ClientTimeoutError as exc:
            if self.rank == 0:
                try:
                    self.broadcast("out", b"\x01" + str(exc).encode(), timeout)
                except CoordinationError:
                    pass  # the others find out by their own timeout
            raise
        out = self.broadcast("out", None if values is None else b"\x00" + judge(values), answer_wait(timeout))
        if out[:1] == b"\x01":
            raise ClientTimeoutError(out[1:].decode(errors="replace"))
        return out[1:]

    def close(self) -> None:  # noqa: B027 - most sessions hold nothing
        """Forget what this session posted that nobody needs any more."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrivialSession(Session):
    """The session of a single client: nothing to wait for."""

    def __init__(self, number: int, kind: str) -> None:
        self.rank, self.size, self.number, self.kind = 0, 1, number, kind
        self._decided: bytes | None = None

    def gather(self, step: str, data: bytes, timeout: float) -> list[bytes] | None:
        return [data]

    def broadcast(self, step: str, data: bytes | None, timeout: float) -> bytes:
        assert data is not None
        return data

    def decide(self, value: bytes, timeout: float) -> bytes | None:
        if self._decided is None:
            self._decided = value
        return self._decided


# Message engines (MPI, torch's tensor transport) number a session's steps: a step's number is its place here.
STEPS = ("in", "out", "agree", "go", "written", "outcome", "done", "cleared", "decide?", "decide!")
_STEP_SPAN = 16


class MessageSession(Session):
    """A session over point-to-point messages (engines without a key-value store).

    The engine supplies ``_exchange(send_to, data, sources, seq, what, timeout, partial)``:
    send ``data`` to ``send_to`` without waiting for delivery, and return the messages
    of ``sources`` for collective ``seq`` that arrive within ``timeout`` (raising
    `ClientTimeoutError` for the absent unless ``partial``).  A decision lives with
    client 0: it takes the first proposal that reached it (its own unless another came
    first) and sends the winner to everyone; a client whose proposal gets no answer
    from client 0 learns nothing (None).  An engine with ``can_poll = False`` cannot
    look for proposals without waiting: client 0 decides alone, the others learn None.
    """

    def __init__(self, engine: object, rank: int, size: int, number: int, kind: str) -> None:
        self._e = engine
        self.rank, self.size, self.number, self.kind = rank, size, number, kind
        self._decided: bytes | None = None

    def _seq(self, step: str) -> int:
        return self.number * _STEP_SPAN + STEPS.index(step)

    def _x(self, send_to: list[int], data: bytes | None, sources: list[int], step: str, timeout: float,
           partial: bool = False) -> dict[int, bytes]:
        return self._e._exchange(send_to, data, sources, self._seq(step), f"{self.kind}/{step}",  # type: ignore
                                 timeout, partial)

    def confirm(self, step: str, timeout: float) -> None:
        if self.rank != 0:
            self._x([0], b"", [], step, timeout)
        else:
            self._x([], None, list(range(1, self.size)), step, timeout)

    def gather(self, step: str, data: bytes, timeout: float) -> list[bytes] | None:
        if getattr(self._e, "gather_to_all", False):
            # Every client hears from every other and names the absent itself: where a timed-out receive
            # breaks the transport (gloo), nobody could hear client 0 tell them afterwards.
            others = [r for r in range(self.size) if r != self.rank]
            got = self._x(others, data, others, step, timeout)
            got[self.rank] = data
            return [got[r] for r in range(self.size)] if self.rank == 0 else None
        if self.rank != 0:
            self._x([0], data, [], step, timeout)
            return None
        others = list(range(1, self.size))
        got = self._x([], None, others, step, timeout)
        return [data] + [got[r] for r in others]

    def broadcast(self, step: str, data: bytes | None, timeout: float) -> bytes:
        if self.rank == 0:
            assert data is not None
            self._x(list(range(1, self.size)), data, [], step, timeout)
            return data
        return self._x([], None, [0], step, timeout)[0]

    def decide(self, value: bytes, timeout: float) -> bytes | None:
        if self._decided is not None:
            return self._decided
        if not getattr(self._e, "can_poll", True):
            # A transport whose receives cannot be polled (gloo closes a pair whose receive times out): client 0
            # decides alone, and a client that gives up cannot know the decision.
            self._decided = value if self.rank == 0 else None
            return self._decided
        if self.rank == 0:
            asked = self._x([], None, list(range(1, self.size)), "decide?", 0, partial=True)
            self._decided = asked[min(asked)] if asked else value
            self._x(list(range(1, self.size)), self._decided, [], "decide!", timeout)
            return self._decided
        self._x([0], value, [], "decide?", timeout)
        self._decided = self._x([], None, [0], "decide!", timeout, partial=True).get(0)
        return self._decided
