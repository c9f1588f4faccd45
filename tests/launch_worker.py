"""A client script for `shardckpt launch` tests: save or restore, or misbehave on purpose."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import numpy as np

import shardckpt as sc
from shardckpt.coordination.launcher import ENV_ADDRESS

W = np.arange(96, dtype=np.float32).reshape(12, 8)
R = np.arange(5, dtype=np.int32)


def recording_relay(target: str, record: list[bytes]) -> str:
    """A loopback relay to ``target`` for one connection, appending what the client sends to ``record``."""
    listener = socket.create_server(("127.0.0.1", 0))
    host, _, port = target.rpartition(":")

    def pump(src: socket.socket, dst: socket.socket, rec: list[bytes] | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if rec is not None:
                    rec.append(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def run() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, int(port)))
        threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()
        pump(client, upstream, record)

    threading.Thread(target=run, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def wait_for(path: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.05)


def put(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def guarded(directory: str) -> int:
    """A save while a foreign process attacks the coordinator (tests/test_launcher_security.py drives it).

    Client 1 talks through a relay that records its bytes, for the test to replay; client 2 then runs into the
    limits of the coordinator on purpose.
    """
    record: list[bytes] = []
    rank = int(os.environ["SHARDCKPT_RANK"])
    if rank == 0:
        put(os.path.join(directory, "address"), os.environ[ENV_ADDRESS].encode())
    if rank == 1:
        os.environ[ENV_ADDRESS] = recording_relay(os.environ[ENV_ADDRESS], record)
    coord = sc.coordination.resolve(None)
    put(os.path.join(directory, f"ready-{rank}"), b"")
    wait_for(os.path.join(directory, "start"))
    mesh = sc.create_mesh([("x", 2), ("y", 2)])
    w = sc.DTensor.from_global(W, sc.Layout(["x", "y"], mesh), mesh.local_devices(coord.rank, coord.size))
    sc.sharded_save(mesh, os.path.join(directory, "ckpt"), ["w", "r"], ["", ""], [w, R], timeout=120)
    if rank == 1:
        put(os.path.join(directory, "recorded-1"), b"".join(record))
    if rank == 2:
        limit = coord.max_frame_bytes  # type: ignore[attr-defined]
        lines = []
        try:
            coord._set("probe/big/2", b"x" * (limit + 1))  # type: ignore[attr-defined]
        except sc.CoordinationError as exc:
            lines.append(f"frame: {exc}")
        try:
            for i in range(64):  # whole frames until the store holds more than this client may
                coord._set(f"probe/{i}/2", b"y" * limit)  # type: ignore[attr-defined]
        except sc.CoordinationError as exc:
            lines.append(f"store after {i}: {exc}")
        put(os.path.join(directory, "limits-2"), "\n".join(lines).encode())
    put(os.path.join(directory, f"saved-{rank}"), b"")
    wait_for(os.path.join(directory, "finish"))
    return 0


def main(action: str, prefix: str) -> int:
    if action == "guarded":
        return guarded(prefix)
    coord = sc.coordination.resolve(None)
    if action == "save":
        mesh = sc.create_mesh([("x", 2), ("y", 2)])
        w = sc.DTensor.from_global(W, sc.Layout(["x", "y"], mesh), mesh.local_devices(coord.rank, coord.size))
        sc.sharded_save(mesh, prefix, ["w", "r"], ["", ""], [w, R], timeout=20)
        return 0
    if action.startswith("restore"):
        mode = action.partition(":")[2] or "columns"
        if mode == "same":  # the saving mesh and layouts
            mesh = sc.create_mesh([("x", 2), ("y", 2)])
            layouts = [sc.Layout(["x", "y"], mesh), sc.Layout([sc.UNSHARDED], mesh)]
        elif mode == "replicated":
            mesh = sc.create_mesh([("a", coord.size)])
            layouts = [sc.Layout.replicated(mesh, 2), sc.Layout.replicated(mesh, 1)]
        else:  # another mesh shape: columns over a 1-D mesh of every client
            mesh = sc.create_mesh([("a", coord.size)])
            layouts = [sc.Layout([sc.UNSHARDED, "a"], mesh), sc.Layout(["a"], mesh)]
        w, r = sc.sharded_restore(mesh, prefix, ["w", "r"], layouts)
        for t, g in ((w, W), (r, R)):
            for d, shard in t.shards.items():
                assert np.array_equal(shard, g[tuple(slice(a, b) for a, b in t.bounds(d))])
        return 0
    if action == "die":
        if coord.rank == 2:
            return 3  # exits with an error at once
        time.sleep(60)  # the launcher must stop us long before this
        return 0
    if action == "absent":
        if coord.rank == 1:
            time.sleep(8)
            return 0
        try:
            sc.sharded_save(sc.create_mesh([("x", 4)]), prefix, ["r"], [""], [R], timeout=2)
        except sc.ClientTimeoutError as exc:
            print(f"client {coord.rank}: {exc}", file=sys.stderr)
            return 0 if "[1]" in str(exc) else 1
        return 1
    raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
