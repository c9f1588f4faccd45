"""``shardckpt launch -n N script.py``: start N clients on this machine with a coordinator, like torchrun.

The coordinator (`KVServer`) binds 127.0.0.1 unless ``--host`` names another
address, and admits only connections that prove they hold a key derived from a
secret made for this launch; each client gets its own rank's key through its
environment only.  When any client exits non-zero, the others are terminated
(SIGTERM, then SIGKILL after a grace period) and the launcher exits with that
status.  Connections the coordinator refused are reported at exit.

Each client also gets what torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` — a port free when the
launch starts), so a script that calls ``torch.distributed.init_process_group()``
runs unchanged; the clients are all on this host, so local ranks are ranks.
Every line a client writes to stdout or stderr is passed on whole, prefixed with
``[rankN]``, to the launcher's stdout or stderr; Python clients run unbuffered
(``PYTHONUNBUFFERED=1``) so their lines arrive as they are written.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, TextIO

from .coordination.launcher import ENV_ADDRESS, ENV_KEY, ENV_RANK, ENV_SIZE, KVServer

GRACE_SECONDS = 5.0
# After the clients exit, how long their output may still take to drain (a grandchild may hold a pipe open).
DRAIN_SECONDS = 5.0
# Longest piece of a line handled at once.  A longer line is passed on as several prefixed lines: writing it
# in pieces under separate lock holds would let another client's line land inside it.
MAX_PIECE = 1 << 16
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
log = logging.getLogger("shardckpt.launch")


def free_port(host: str) -> int:
    """A TCP port nothing listens on at ``host`` now (the kernel's pick), for torch.distributed's store."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def torchrun_env(rank: int, size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables torchrun gives a worker of a one-host job."""
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


Sink = Callable[[bytes], None]


class _Relay:
    """Copies the clients' output lines to the launcher's, each whole line under one lock with its prefix."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, source: IO[bytes], sink: Sink, prefix: bytes) -> threading.Thread:
        t = threading.Thread(target=self._copy, args=(source, sink, prefix), daemon=True,
                             name="shardckpt-launch-output")
        t.start()
        self._threads.append(t)
        return t

    def _copy(self, source: IO[bytes], sink: Sink, prefix: bytes) -> None:
        # readline returns without a newline only at MAX_PIECE or at the end of the stream; either way the piece
        # is ended here, in the same write, so every write is one whole prefixed line.
        with source:
            while True:
                piece = source.readline(MAX_PIECE)
                if not piece:
                    break
                self.write(sink, prefix + piece + (b"" if piece.endswith(b"\n") else b"\n"))

    def write(self, sink: Sink, data: bytes) -> None:
        with self._lock:
            try:
                sink(data)
            except (OSError, ValueError):
                pass  # the launcher's own output is gone (closed pipe): the clients still run to the end

    def join(self, seconds: float, threads: list[threading.Thread] | None = None) -> None:
        deadline = time.monotonic() + seconds
        for t in self._threads if threads is None else threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _sink(stream: TextIO) -> Sink:
    """Write bytes to ``stream`` at once: through its binary buffer, or decoded where it has none (a StringIO)."""
    buffer = getattr(stream, "buffer", None)

    def write(data: bytes) -> None:
        if buffer is not None:
            stream.flush()  # what the launcher printed itself goes first
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode(errors="replace"))
            stream.flush()

    return write


def _command(argv: Sequence[str]) -> list[str]:
    if argv and argv[0] == "-m":
        return [sys.executable, *argv]
    if argv and argv[0].endswith(".py"):
        return [sys.executable, *argv]
    return list(argv)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(num_clients: int, argv: Sequence[str], *, host: str = "127.0.0.1", port: int = 0,
           env: dict[str, str] | None = None, max_frame_bytes: int | None = None,
           max_client_bytes: int | None = None, master_addr: str = "127.0.0.1", master_port: int = 0,
           prefix_output: bool = True) -> int:
    """Run ``argv`` as ``num_clients`` processes; returns 0 when all succeed, else the first failure's status.

    ``max_frame_bytes`` bounds one value sent to the coordinator (default ``SHARDCKPT_MAX_FRAME_BYTES`` or
    256 MiB) and ``max_client_bytes`` what one client may hold in it (default 4 frames).  ``master_addr`` and
    ``master_port`` (default: a free port) are torch.distributed's ``MASTER_ADDR`` and ``MASTER_PORT``.  With
    ``prefix_output`` each client's output lines are prefixed ``[rankN]``; without, the clients write straight
    to the launcher's stdout and stderr.
    """
    if num_clients < 1:
        raise ValueError("need at least one client")
    server = KVServer(host, port, size=num_clients, max_frame_bytes=max_frame_bytes,
                      max_client_bytes=max_client_bytes).start()
    base = dict(os.environ if env is None else env)
    for name in (ENV_ADDRESS, ENV_RANK, ENV_SIZE, ENV_KEY):  # an outer launch's must not leak into ours
        base.pop(name, None)
    if prefix_output:
        base["PYTHONUNBUFFERED"] = "1"
    torch_port = master_port or free_port(master_addr)
    relay = _Relay()
    readers: dict[int, list[threading.Thread]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    previous = {}

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    if threading.current_thread() is threading.main_thread():  # only there can Python take signals
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        pipe = subprocess.PIPE if prefix_output else None
        for rank in range(num_clients):
            client_env = {**base, **torchrun_env(rank, num_clients, master_addr, torch_port), **server.env(rank)}
            proc = subprocess.Popen(_command(argv), env=client_env, stdout=pipe, stderr=pipe)
            procs.append(proc)
            if proc.stdout is not None and proc.stderr is not None:
                readers[rank] = [relay.start(proc.stdout, _sink(sys.stdout), f"[rank{rank}] ".encode()),
                                 relay.start(proc.stderr, _sink(sys.stderr), f"[rank{rank}] ".encode())]
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                relay.join(DRAIN_SECONDS, readers.get(rank, []))  # its last words (a traceback) come first
                relay.write(_sink(sys.stderr), f"shardckpt launch: client {rank} exited with status {code}; "
                            "stopping the others\n".encode())
                _stop(procs)
                return code if code and code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        _stop(procs)
        relay.join(DRAIN_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
        refused = server.refusals()
        if refused:
            log.warning("coordinator at %s: %s", server.address, refused)
            relay.write(_sink(sys.stderr), f"shardckpt launch: coordinator at {server.address}: {refused}\n".encode())
