"""The framework-free engine of ``shardckpt launch``: a tiny key-value server over TCP, and its client.

The launcher process runs `KVServer` (bound to 127.0.0.1 unless told otherwise)
and starts the clients with ``SHARDCKPT_COORDINATOR`` (host:port),
``SHARDCKPT_RANK`` and ``SHARDCKPT_WORLD_SIZE`` in their environment.

Wire format, both directions length-prefixed so no parsing can overrun::

    request  := op(1: 'S' set | 'G' get | 'D' delete) | u32 klen | key | u32 vlen | value
    response := status(1: 0 found | 1 absent) | u32 vlen | value

A get's value is the wait time in milliseconds (u32); the server answers when the
key appears or the wait ends.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
import time

from ..errors import CoordinationError
from .base import KeyValueCoordinator

ENV_ADDRESS = "SHARDCKPT_COORDINATOR"
ENV_RANK = "SHARDCKPT_RANK"
ENV_SIZE = "SHARDCKPT_WORLD_SIZE"
_MAX_FRAME = 1 << 30
_u32 = struct.Struct("<I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = _u32.unpack(_recv_exact(sock, 4))
    if n > _MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes is too large")
    return _recv_exact(sock, n)


class _Store:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.cond = threading.Condition()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        store: _Store = self.server.store  # type: ignore[attr-defined]
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                op = _recv_exact(sock, 1)
                key = _recv_frame(sock)
                value = _recv_frame(sock)
                found, out = 0, b""
                with store.cond:
                    if op == b"S":
                        store.data[key] = value
                        store.cond.notify_all()
                    elif op == b"D":
                        store.data.pop(key, None)
                    elif op == b"G":
                        deadline = time.monotonic() + _u32.unpack(value)[0] / 1000
                        while key not in store.data and (left := deadline - time.monotonic()) > 0:
                            store.cond.wait(left)
                        if key in store.data:
                            out = store.data[key]
                        else:
                            found = 1
                    else:
                        return
                sock.sendall(bytes((found,)) + _u32.pack(len(out)) + out)
        except (ConnectionError, OSError, struct.error):
            return


class KVServer(socketserver.ThreadingTCPServer):
    """The launcher's key-value store, served to the clients over TCP in the background between `start` and `stop`."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.store = _Store()
        self._thread = threading.Thread(target=self.serve_forever, name="shardckpt-kv", daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` the server is bound to, as clients find it in ``SHARDCKPT_COORDINATOR``."""
        host, port = self.server_address[:2]
        return f"{host!s}:{port}" if isinstance(host, str) else f"{host.decode()}:{port}"

    def start(self) -> KVServer:
        """Start serving in the background; returns the server itself."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.shutdown()
        self.server_close()


class LauncherCoordinator(KeyValueCoordinator):
    """A client of `KVServer`; made from the environment ``shardckpt launch`` sets."""

    engine = "shardckpt launch"

    def __init__(self, address: str, rank: int, size: int) -> None:
        super().__init__(rank, size)
        host, _, port = address.rpartition(":")
        self._address = address
        self._lock = threading.Lock()
        try:
            self._sock = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
        except OSError as exc:
            raise CoordinationError(f"cannot reach the launcher's coordinator at {address}: {exc}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def from_env(cls) -> LauncherCoordinator:
        """The coordinator of this process, from the environment ``shardckpt launch`` set.

        Raises `CoordinationError` when a variable is missing or malformed, or the server cannot be reached.
        """
        try:
            return cls(os.environ[ENV_ADDRESS], int(os.environ[ENV_RANK]), int(os.environ[ENV_SIZE]))
        except (KeyError, ValueError) as exc:
            raise CoordinationError(f"incomplete shardckpt launch environment: {exc}") from None

    def _call(self, op: bytes, key: str, value: bytes, wait: float) -> bytes | None:
        k = key.encode()
        with self._lock:
            try:
                self._sock.settimeout(wait + 30)
                self._sock.sendall(op + _u32.pack(len(k)) + k + _u32.pack(len(value)) + value)
                status = _recv_exact(self._sock, 1)
                out = _recv_frame(self._sock)
            except OSError as exc:
                raise CoordinationError(f"lost the launcher's coordinator at {self._address}: {exc}") from None
        return out if status == b"\x00" else None

    def _set(self, key: str, value: bytes) -> None:
        self._call(b"S", key, value, 0)

    def _get(self, key: str, timeout: float) -> bytes | None:
        ms = min(int(timeout * 1000), 0xFFFFFFFF)
        return self._call(b"G", key, _u32.pack(ms), timeout)

    def _delete(self, key: str) -> None:
        self._call(b"D", key, b"", 0)

    def close(self) -> None:
        """Close the connection to the server."""
        self._sock.close()
