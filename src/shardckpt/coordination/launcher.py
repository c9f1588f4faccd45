"""The framework-free engine of ``shardckpt launch``: a tiny authenticated key-value server over TCP, and its client.

The launcher process runs `KVServer` (bound to 127.0.0.1 unless told otherwise)
and starts client *r* with `KVServer.env` (r) in its environment:
``SHARDCKPT_COORDINATOR`` (host:port), ``SHARDCKPT_RANK``, ``SHARDCKPT_WORLD_SIZE``
and ``SHARDCKPT_COORDINATOR_KEY``, the hex of ``HMAC-SHA256(secret, "shardckpt launch
rank r")``.  The secret is random per server and never leaves the launcher; a client
holds only its own rank's key, so it can neither read the store without it nor pass
for another client.

Every connection starts with a mutual challenge-response; nothing else is read
before it succeeds::

    client: "SCKV" | 0x02 | u32 rank | client nonce (32)
    server: 0 | server nonce (32) | HMAC(key_r, "server" | rank | cn | sn | u32 max_frame) | u32 max_frame
            (or 2 | u32 len | message: refused; 3 | ...: busy, try again)
    client: HMAC(key_r, "client" | rank | cn | sn)
    server: 0 (authenticated as rank r) | 2 | u32 len | message

Fresh nonces on both sides make bytes recorded from one connection useless on
another.  Requests and answers, all length-prefixed so no parsing can overrun::

    request  := op(1) | u32 klen | key | u32 vlen | value
    response := status(1: 0 found | 1 absent | 2 error, then the server closes) | u32 vlen | value

``S`` set, ``D`` delete, ``C`` create-if-absent (answers the value now stored),
``G`` get (value: u32 wait in ms; answered when the key appears or the wait
ends), ``M`` get-many (empty key; value: u32 wait ms | u32 count | count ×
(u32 klen | key); answered with one response per key once all are present or the
wait ends).  A connection of rank *r* may set or delete only keys whose last
``/`` component is ``r`` (rank 0: any key); create and reads are open to every
authenticated client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import socketserver
import struct
import threading
import time

from ..errors import ClientTimeoutError, CoordinationError
from .base import StepDeadlineCoordinator

ENV_ADDRESS = "SHARDCKPT_COORDINATOR"
ENV_RANK = "SHARDCKPT_RANK"
ENV_SIZE = "SHARDCKPT_WORLD_SIZE"
ENV_KEY = "SHARDCKPT_COORDINATOR_KEY"
ENV_MAX_FRAME = "SHARDCKPT_MAX_FRAME_BYTES"

# The largest collective payload of a save is one client's index entries in the "written" gather: tens of bytes
# per stored slice, so 256 MiB covers millions of slices per client while one frame of it in flight per
# connection, and a few per client in the store, keep the launcher's memory within a few GiB at worst.
DEFAULT_MAX_FRAME = 256 << 20
MAX_KEY = 4096  # keys are a namespace, a session, a step and a rank
HANDSHAKE_SECONDS = 5.0  # an unauthenticated socket holds a slot at most this long
GRACE_SECONDS = 2.0  # how long past a collective's deadline a client still waits for the server's answer
CONNECT_SECONDS = 30.0  # a client keeps retrying a busy or unreachable server this long
OUTSIDE_COLLECTIVE_SECONDS = 30.0  # the answer bound of a set or delete made outside any collective

_MAGIC = b"SCKV\x02"
_NONCE = 32
_HELLO = struct.Struct(f"<{len(_MAGIC)}sI{_NONCE}s")
_u32 = struct.Struct("<I")
_OK, _ABSENT, _ERROR, _BUSY = 0, 1, 2, 3


def rank_key(secret: bytes, rank: int) -> bytes:
    """The key client ``rank`` proves itself with: HMAC-SHA256 of the launch secret and the rank."""
    return hmac.new(secret, b"shardckpt launch rank %d" % rank, hashlib.sha256).digest()


def _proof(key: bytes, role: bytes, rank: int, cn: bytes, sn: bytes, extra: bytes = b"") -> bytes:
    return hmac.new(key, role + _u32.pack(rank) + cn + sn + extra, hashlib.sha256).digest()


def max_frame_from_env(default: int = DEFAULT_MAX_FRAME) -> int:
    """``SHARDCKPT_MAX_FRAME_BYTES`` if set, else ``default``; `CoordinationError` if it is no byte count."""
    raw = os.environ.get(ENV_MAX_FRAME)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 0 < value < 1 << 32:
        raise CoordinationError(f"{ENV_MAX_FRAME}={raw!r} is not a byte count between 1 and 2^32-1")
    return value


class _HandshakeFailed(Exception):
    """A connection that did not prove it holds a client's key."""


class _Refused(Exception):
    """A request the server answers with an error status, then closes the connection."""


def _recv_into(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf


def _error_reply(status: int, message: str) -> bytes:
    text = message.encode()
    return bytes((status,)) + _u32.pack(len(text)) + text


class _Waiter:
    """A get waiting for keys: woken once, when the last of them arrives (not by every put to the store)."""

    __slots__ = ("cond", "missing")

    def __init__(self, lock: threading.Lock, missing: set[bytes]) -> None:
        self.cond = threading.Condition(lock)
        self.missing = missing


class _Store:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes | bytearray] = {}
        self.owner: dict[bytes, int] = {}
        self.held: dict[int, int] = {}  # bytes each rank's values take in the store
        self.lock = threading.Lock()
        # Waiters by the key they lack.  A put wakes only the gets that were waiting for its key and now lack
        # nothing: with N clients waiting for one broadcast while N others post, waking every waiter on every
        # put would be N^2 wake-ups (and as many re-checks) per collective.
        self.waiting: dict[bytes, dict[int, _Waiter]] = {}
        self.wakeups = 0  # waiters woken, for tests and benchmarks

    def put(self, key: bytes, value: bytes | bytearray, rank: int, quota: int) -> None:
        """Store ``value`` under ``key``, charged to ``rank``; the caller holds ``lock``."""
        old = self.data.get(key)
        old_owner = self.owner.get(key)
        credit = len(old) if old is not None and old_owner == rank else 0
        if self.held.get(rank, 0) - credit + len(value) > quota:
            raise _Refused(f"client {rank} would hold more than {quota} bytes in the launcher's store "
                           "(raise shardckpt launch --max-client-bytes)")
        self.pop(key)
        self.data[key] = value
        self.owner[key] = rank
        self.held[rank] = self.held.get(rank, 0) + len(value)
        waiters = self.waiting.pop(key, None)
        if waiters:
            for w in waiters.values():
                w.missing.discard(key)
                if not w.missing:
                    self.wakeups += 1
                    w.cond.notify()

    def pop(self, key: bytes) -> None:
        old = self.data.pop(key, None)
        if old is not None:
            owner = self.owner.pop(key)
            self.held[owner] -= len(old)

    def wait_for(self, keys: list[bytes], deadline: float) -> None:
        """Return once every key is present at once, or at ``deadline``; the caller holds ``lock``."""
        missing = {k for k in keys if k not in self.data}
        while missing and deadline > time.monotonic():
            w = _Waiter(self.lock, missing)
            for k in missing:
                self.waiting.setdefault(k, {})[id(w)] = w
            try:
                while w.missing and (left := deadline - time.monotonic()) > 0:
                    w.cond.wait(left)
            finally:
                for k in missing:
                    mine = self.waiting.get(k)
                    if mine is not None:
                        mine.pop(id(w), None)
                        if not mine:
                            del self.waiting[k]
            # A key that arrived may have been deleted since: wait again for what is gone.
            missing = {k for k in keys if k not in self.data}


def _may_write(rank: int, key: bytes) -> bool:
    return rank == 0 or key.rpartition(b"/")[2] == str(rank).encode()


class _Handler(socketserver.BaseRequestHandler):
    server: KVServer

    def handle(self) -> None:
        server, sock = self.server, self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            rank = self._handshake(sock)
        except (_HandshakeFailed, ConnectionError, OSError, struct.error):
            server._count("failed_handshakes")
            server._release(None)
            return
        if rank is None:  # authenticated, but over the per-client connection limit
            server._release(None)
            return
        try:
            sock.sendall(bytes((_OK,)))
            sock.settimeout(None)  # an authenticated client may stay idle between saves
            self._serve(sock, rank)
        except (ConnectionError, OSError, struct.error):
            pass
        finally:
            server._release(rank)

    def _handshake(self, sock: socket.socket) -> int | None:
        """The client's rank once it has proved its key; None when it did but may not open another connection."""
        server = self.server
        deadline = time.monotonic() + server.handshake_timeout
        magic, rank, cn = _HELLO.unpack(bytes(_recv_into(sock, _HELLO.size, deadline)))
        if magic != _MAGIC or (server.size is not None and rank >= server.size):
            raise _HandshakeFailed
        key = rank_key(server._secret, rank)
        sn = secrets.token_bytes(_NONCE)
        limit = _u32.pack(server.max_frame_bytes)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(bytes((_OK,)) + sn + _proof(key, b"server", rank, cn, sn, limit) + limit)
        answer = bytes(_recv_into(sock, _NONCE, deadline))
        if not hmac.compare_digest(answer, _proof(key, b"client", rank, cn, sn)):
            try:
                sock.sendall(_error_reply(_ERROR, "authentication failed"))
            except OSError:
                pass
            raise _HandshakeFailed
        refusal = server._admit(rank)
        if refusal:
            try:
                sock.sendall(_error_reply(_ERROR, refusal))
            except OSError:
                pass
            return None
        return rank

    def _serve(self, sock: socket.socket, rank: int) -> None:
        server = self.server
        limit = server.max_frame_bytes
        while True:
            op = _recv_into(sock, 1)
            try:
                (klen,) = _u32.unpack(_recv_into(sock, 4))
                if klen > MAX_KEY:
                    raise _Refused(f"a key of {klen} bytes is longer than {MAX_KEY}")
                key = bytes(_recv_into(sock, klen))
                (vlen,) = _u32.unpack(_recv_into(sock, 4))
                if vlen > limit:
                    raise _Refused(f"a value of {vlen} bytes exceeds the launcher's frame limit of {limit} bytes "
                                   f"(shardckpt launch --max-frame-bytes, {ENV_MAX_FRAME})")
                value = _recv_into(sock, vlen)
                replies = self._apply(op, key, value, rank)
            except _Refused as exc:
                server._count("limit_errors")
                sock.sendall(_error_reply(_ERROR, str(exc)))
                return
            for status, out in replies:
                header = bytes((status,)) + _u32.pack(len(out))
                if len(out) < 1 << 16:
                    sock.sendall(header + out)
                else:
                    sock.sendall(header)
                    sock.sendall(out)

    def _apply(self, op: bytearray, key: bytes, value: bytearray, rank: int) -> list[tuple[int, bytes | bytearray]]:
        server, store = self.server, self.server.store
        if op in (b"S", b"D") and not _may_write(rank, key):
            raise _Refused(f"client {rank} may not {'set' if op == b'S' else 'delete'} {key.decode(errors='replace')!r}"
                           f": only keys ending in /{rank}")
        with store.lock:
            if op == b"S":
                store.put(key, value, rank, server.max_client_bytes)
                return [(_OK, b"")]
            if op == b"D":
                store.pop(key)
                return [(_OK, b"")]
            if op == b"C":
                if key not in store.data:
                    store.put(key, value, rank, server.max_client_bytes)
                return [(_OK, store.data[key])]
            if op == b"G":
                if len(value) != 4:
                    raise _Refused("malformed get")
                keys = [key]
                ms = _u32.unpack(value)[0]
            elif op == b"M":
                keys, ms = _parse_many(value)
            else:
                raise _Refused(f"unknown operation {bytes(op)!r}")
            store.wait_for(keys, time.monotonic() + ms / 1000)
            found = [store.data.get(k) for k in keys]
        return [(_ABSENT, b"") if v is None else (_OK, v) for v in found]


def _parse_many(value: bytearray) -> tuple[list[bytes], int]:
    try:
        ms, count = struct.unpack_from("<II", value)
        pos, keys = 8, []
        for _ in range(count):
            (n,) = _u32.unpack_from(value, pos)
            if n > MAX_KEY or pos + 4 + n > len(value):
                raise _Refused("malformed get_many")
            keys.append(bytes(value[pos + 4 : pos + 4 + n]))
            pos += 4 + n
    except struct.error:
        raise _Refused("malformed get_many") from None
    if pos != len(value):
        raise _Refused("malformed get_many")
    return keys, ms


class KVServer(socketserver.ThreadingTCPServer):
    """The launcher's key-value store, served over TCP to clients holding a key derived from its secret.

    ``size`` (the client count, if known) bounds the ranks that may authenticate.
    A connection that fails or does not finish the handshake within
    ``handshake_timeout`` seconds is closed and counted in `failed_handshakes`;
    one arriving while ``max_pending`` handshakes are under way or ``max_connections``
    are open is told "busy", closed and counted in `turned_away`; an authenticated
    client going past ``max_frame_bytes`` per value, ``max_client_bytes`` held in the
    store or ``max_per_rank`` connections gets an error answer, is closed and is
    counted in `limit_errors`.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a flood must be turned away by us, not silently dropped by the kernel's backlog

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, size: int | None = None,
                 secret: bytes | None = None, max_frame_bytes: int | None = None,
                 max_client_bytes: int | None = None, max_pending: int = 32, max_connections: int | None = None,
                 max_per_rank: int = 8, handshake_timeout: float = HANDSHAKE_SECONDS) -> None:
        self.size = size
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.max_frame_bytes = max_frame_bytes if max_frame_bytes is not None else max_frame_from_env()
        if not 0 < self.max_frame_bytes < 1 << 32:
            raise ValueError(f"max_frame_bytes must be between 1 and 2^32-1, not {self.max_frame_bytes}")
        self.max_client_bytes = max_client_bytes if max_client_bytes is not None else 4 * self.max_frame_bytes
        self.max_pending = max_pending
        self.max_connections = (max_connections if max_connections is not None
                                else max_pending + max_per_rank * (size if size is not None else 32))
        self.max_per_rank = max_per_rank
        self.handshake_timeout = handshake_timeout
        self.failed_handshakes = 0
        self.turned_away = 0
        self.limit_errors = 0
        self._lock = threading.Lock()
        self._pending = 0
        self._open = 0
        self._per_rank: dict[int, int] = {}
        super().__init__((host, port), _Handler)
        self.store = _Store()
        self._thread = threading.Thread(target=self.serve_forever, name="shardckpt-kv", daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` the server is bound to, as clients find it in ``SHARDCKPT_COORDINATOR``."""
        host, port = self.server_address[:2]
        return f"{host!s}:{port}" if isinstance(host, str) else f"{host.decode()}:{port}"

    def key(self, rank: int) -> bytes:
        """The key of client ``rank`` (what its ``SHARDCKPT_COORDINATOR_KEY`` holds, in hex)."""
        return rank_key(self._secret, rank)

    def env(self, rank: int) -> dict[str, str]:
        """The environment variables client ``rank`` needs to connect (add ``SHARDCKPT_WORLD_SIZE`` if no size)."""
        out = {ENV_ADDRESS: self.address, ENV_RANK: str(rank), ENV_KEY: self.key(rank).hex()}
        if self.size is not None:
            out[ENV_SIZE] = str(self.size)
        return out

    def start(self) -> KVServer:
        """Start serving in the background; returns the server itself."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.shutdown()
        self.server_close()

    def refusals(self) -> str:
        """One line of what was refused, or "" when nothing was."""
        parts = []
        if self.failed_handshakes:
            parts.append(f"{self.failed_handshakes} connection(s) failed the handshake")
        if self.turned_away:
            parts.append(f"{self.turned_away} turned away at the connection limit")
        if self.limit_errors:
            parts.append(f"{self.limit_errors} client request(s) refused at a limit")
        return "; ".join(parts)

    # Slots are taken before a handler thread exists, so a flood never gets more than max_pending threads.
    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._lock:
            busy = self._pending >= self.max_pending or self._open >= self.max_connections
            if busy:
                self.turned_away += 1
            else:
                self._pending += 1
                self._open += 1
        if busy:
            try:
                request.setblocking(False)
                request.send(_error_reply(_BUSY, "busy"))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def _admit(self, rank: int) -> str:
        with self._lock:
            if self._per_rank.get(rank, 0) >= self.max_per_rank:
                self.limit_errors += 1
                return f"client {rank} already has {self.max_per_rank} connections open"
            self._per_rank[rank] = self._per_rank.get(rank, 0) + 1
            self._pending -= 1
            return ""

    def _release(self, rank: int | None) -> None:
        with self._lock:
            self._open -= 1
            if rank is None:
                self._pending -= 1
            else:
                self._per_rank[rank] -= 1


class LauncherCoordinator(StepDeadlineCoordinator):
    """A client of `KVServer`; made from the environment ``shardckpt launch`` sets.

    A collective gives up at its deadline plus `GRACE_SECONDS` even when the
    server stops answering, raising `ClientTimeoutError` naming the server.
    """

    engine = "shardckpt launch"

    def __init__(self, address: str, rank: int, size: int, key: bytes) -> None:
        super().__init__(rank, size)
        host, _, port = address.rpartition(":")
        self._address = address
        self._key = key
        self._lock = threading.Lock()
        self._broken: str | None = None
        deadline = time.monotonic() + CONNECT_SECONDS
        delay = 0.05
        while True:
            try:
                self._sock, self.max_frame_bytes = self._connect(host.strip("[]"), int(port), deadline)
                return
            except _Busy as exc:
                if time.monotonic() + delay >= deadline:
                    raise CoordinationError(f"{self.engine}: the coordinator at {address} stayed busy for "
                                            f"{CONNECT_SECONDS:g} s: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _connect(self, host: str, port: int, deadline: float) -> tuple[socket.socket, int]:
        address = self._address
        try:
            sock = socket.create_connection((host, port), timeout=max(0.001, deadline - time.monotonic()))
        except OSError as exc:
            raise CoordinationError(f"cannot reach the launcher's coordinator at {address}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cn = secrets.token_bytes(_NONCE)
            sock.sendall(_HELLO.pack(_MAGIC, self.rank, cn))
            status = _recv_into(sock, 1, deadline)[0]
            if status != _OK:
                message = self._message(sock, deadline)
                if status == _BUSY:
                    raise _Busy(message)
                raise CoordinationError(f"{self.engine}: the coordinator at {address} refused client {self.rank}: "
                                        f"{message}")
            reply = bytes(_recv_into(sock, _NONCE + 32 + 4, deadline))
            sn, proof, limit = reply[:_NONCE], reply[_NONCE:-4], reply[-4:]
            if not hmac.compare_digest(proof, _proof(self._key, b"server", self.rank, cn, sn, limit)):
                raise CoordinationError(f"{self.engine}: the process at {address} is not this launch's coordinator "
                                        f"(it could not prove it holds the launch's key)")
            sock.sendall(_proof(self._key, b"client", self.rank, cn, sn))
            status = _recv_into(sock, 1, deadline)[0]
            if status != _OK:
                raise CoordinationError(f"{self.engine}: the coordinator at {address} refused client {self.rank}: "
                                        f"{self._message(sock, deadline)} (is {ENV_KEY} this launch's?)")
            sock.settimeout(None)
            return sock, _u32.unpack(limit)[0]
        except (OSError, ConnectionError, struct.error) as exc:
            sock.close()
            raise CoordinationError(f"{self.engine}: handshake with the coordinator at {address} failed: "
                                    f"{exc or type(exc).__name__}") from None
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _message(sock: socket.socket, deadline: float | None) -> str:
        try:
            (n,) = _u32.unpack(_recv_into(sock, 4, deadline))
            return bytes(_recv_into(sock, min(n, 4096), deadline)).decode(errors="replace")
        except (OSError, ConnectionError, struct.error):
            return "(no reason given)"

    @classmethod
    def from_env(cls) -> LauncherCoordinator:
        """The coordinator of this process, from the environment ``shardckpt launch`` set.

        Raises `CoordinationError` when a variable is missing or malformed, or the server cannot be reached.
        """
        try:
            key = bytes.fromhex(os.environ[ENV_KEY])
            return cls(os.environ[ENV_ADDRESS], int(os.environ[ENV_RANK]), int(os.environ[ENV_SIZE]), key)
        except (KeyError, ValueError) as exc:
            raise CoordinationError(f"incomplete shardckpt launch environment: {type(exc).__name__} {exc}") from None

    def _call(self, op: bytes, key: str, value: bytes, wait: float, answers: int = 1) -> list[bytes | None]:
        k = key.encode()
        if len(k) > MAX_KEY:
            raise CoordinationError(f"{self.engine}: key {key[:80]!r}... is longer than {MAX_KEY} bytes")
        if len(value) > self.max_frame_bytes:
            raise CoordinationError(
                f"{self.engine}: a value of {len(value)} bytes exceeds the frame limit of {self.max_frame_bytes} "
                f"bytes of the coordinator at {self._address} (shardckpt launch --max-frame-bytes, {ENV_MAX_FRAME})")
        collective = self._step_deadline()
        now = time.monotonic()
        end = now + (wait + GRACE_SECONDS if op in (b"G", b"M") else OUTSIDE_COLLECTIVE_SECONDS)
        if collective is not None:
            end = min(end, max(collective, now) + GRACE_SECONDS)
        if not self._lock.acquire(timeout=max(0.0, end - now)):
            raise ClientTimeoutError(f"{self.engine}: another thread held the connection to the coordinator at "
                                     f"{self._address} past the deadline")
        try:
            if self._broken:
                raise CoordinationError(f"{self.engine}: the connection to the coordinator at {self._address} "
                                        f"was lost earlier: {self._broken}")
            try:
                self._sock.settimeout(max(0.001, end - time.monotonic()))
                self._sock.sendall(op + _u32.pack(len(k)) + k + _u32.pack(len(value)) + value)
                out: list[bytes | None] = []
                for _ in range(answers):
                    status = _recv_into(self._sock, 1, end)[0]
                    (n,) = _u32.unpack(_recv_into(self._sock, 4, end))
                    if status == _ERROR:
                        message = bytes(_recv_into(self._sock, min(n, 4096), end)).decode(errors="replace")
                        self._fail(f"refused: {message}")
                        raise CoordinationError(f"{self.engine}: the coordinator at {self._address} refused a "
                                                f"request of client {self.rank}: {message}")
                    if n > self.max_frame_bytes:
                        self._fail(f"an answer of {n} bytes")
                        raise CoordinationError(f"{self.engine}: the coordinator at {self._address} sent an answer "
                                                f"of {n} bytes, over its own limit")
                    body = _recv_into(self._sock, n, end)
                    out.append(bytes(body) if status == _OK else None)
                return out
            except TimeoutError:
                self._fail("it did not answer in time")
                raise ClientTimeoutError(
                    f"{self.engine}: the coordinator at {self._address} did not answer client {self.rank} within "
                    f"the deadline (+{GRACE_SECONDS:g} s); is the launcher alive?") from None
            except (OSError, ConnectionError) as exc:
                self._fail(str(exc) or type(exc).__name__)
                raise CoordinationError(f"lost the launcher's coordinator at {self._address}: {exc}") from None
        finally:
            self._lock.release()

    def _fail(self, reason: str) -> None:
        """The stream is out of step once an answer is cut short: no later call may use it."""
        self._broken = reason
        self._sock.close()

    def _set(self, key: str, value: bytes) -> None:
        self._call(b"S", key, value, 0)

    def _get(self, key: str, timeout: float) -> bytes | None:
        return self._call(b"G", key, _u32.pack(_ms(timeout)), timeout)[0]

    def _delete(self, key: str) -> None:
        self._call(b"D", key, b"", 0)

    def _create(self, key: str, value: bytes) -> bytes:
        """Store ``value`` under ``key`` unless a value is there already; returns the value now stored."""
        out = self._call(b"C", key, value, 0)[0]
        assert out is not None  # the server answers a create with the stored value
        return out

    def _get_many(self, keys: list[str], timeout: float) -> list[bytes | None]:
        """Each key's value, in one round trip once all are present, or None for those absent after ``timeout`` s."""
        encoded = [k.encode() for k in keys]
        if any(len(k) > MAX_KEY for k in encoded):
            raise CoordinationError(f"{self.engine}: a key is longer than {MAX_KEY} bytes")
        body = struct.pack("<II", _ms(timeout), len(keys)) + b"".join(_u32.pack(len(k)) + k for k in encoded)
        return self._call(b"M", "", body, timeout, answers=len(keys))

    def close(self) -> None:
        """Close the connection to the server."""
        self._sock.close()


class _Busy(Exception):
    """The server had no free slot; the client retries."""


def _ms(seconds: float) -> int:
    return max(0, min(int(seconds * 1000), 0xFFFFFFFF))
