"""``shardckpt launch -n N script.py``: start N clients on this machine with a coordinator, like torchrun.

The coordinator (`KVServer`) binds 127.0.0.1 unless ``--host`` names another
address, and admits only connections that prove they hold a key derived from a
secret made for this launch; each client gets its own rank's key through its
environment only.  When any client exits non-zero, the others are terminated
(SIGTERM, then SIGKILL after a grace period) and the launcher exits with that
status.  Connections the coordinator refused are reported at exit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from .coordination.launcher import ENV_ADDRESS, ENV_KEY, ENV_RANK, ENV_SIZE, KVServer

GRACE_SECONDS = 5.0
log = logging.getLogger("shardckpt.launch")


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
           max_client_bytes: int | None = None) -> int:
    """Run ``argv`` as ``num_clients`` processes; returns 0 when all succeed, else the first failure's status.

    ``max_frame_bytes`` bounds one value sent to the coordinator (default ``SHARDCKPT_MAX_FRAME_BYTES`` or
    256 MiB) and ``max_client_bytes`` what one client may hold in it (default 4 frames).
    """
    if num_clients < 1:
        raise ValueError("need at least one client")
    server = KVServer(host, port, size=num_clients, max_frame_bytes=max_frame_bytes,
                      max_client_bytes=max_client_bytes).start()
    base = dict(os.environ if env is None else env)
    for name in (ENV_ADDRESS, ENV_RANK, ENV_SIZE, ENV_KEY):  # an outer launch's must not leak into ours
        base.pop(name, None)
    procs: list[subprocess.Popen[bytes]] = []
    previous = {}

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, forward)
    try:
        for rank in range(num_clients):
            procs.append(subprocess.Popen(_command(argv), env={**base, **server.env(rank)}))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"shardckpt launch: client {rank} exited with status {code}; stopping the others",
                      file=sys.stderr)
                _stop(procs)
                return code if code and code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
        refused = server.refusals()
        if refused:
            log.warning("coordinator at %s: %s", server.address, refused)
            print(f"shardckpt launch: coordinator at {server.address}: {refused}", file=sys.stderr)
