"""``shardckpt launch -n N script.py``: start N clients on this machine with a coordinator, like torchrun.

The coordinator (`KVServer`) binds 127.0.0.1 unless ``--host`` names another
address.  When any client exits non-zero, the others are terminated (SIGTERM,
then SIGKILL after a grace period) and the launcher exits with that status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from .coordination.launcher import ENV_ADDRESS, ENV_RANK, ENV_SIZE, KVServer

GRACE_SECONDS = 5.0


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
           env: dict[str, str] | None = None) -> int:
    """Run ``argv`` as ``num_clients`` processes; returns 0 when all succeed, else the first failure's status."""
    if num_clients < 1:
        raise ValueError("need at least one client")
    server = KVServer(host, port).start()
    base = dict(os.environ if env is None else env)
    base[ENV_ADDRESS] = server.address
    base[ENV_SIZE] = str(num_clients)
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
            procs.append(subprocess.Popen(_command(argv), env={**base, ENV_RANK: str(rank)}))
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
