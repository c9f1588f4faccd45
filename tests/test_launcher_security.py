"""The coordinator of `shardckpt launch` against a foreign process on 127.0.0.1 that does not hold the launch's key.

It must not read, write or delete a key; bytes recorded from a real client's
connection and replayed must be refused; a flood of connections and oversized
frames must leave a real 4-client save correct and the launcher's peak memory
bounded by its limits; every refused connection is counted and reported.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.coordination import KVServer, LauncherCoordinator

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from launch_worker import R, W, recording_relay  # noqa: E402

u32 = struct.Struct("<I")
HELLO_REPLY = 1 + 32 + 32 + 4  # status, server nonce, server proof, frame limit


def old_frame(op: bytes, key: bytes, value: bytes) -> bytes:
    """A request in the protocol the coordinator spoke before it authenticated anyone."""
    return op + u32.pack(len(key)) + key + u32.pack(len(value)) + value


def hello(rank: int, nonce: bytes | None = None) -> bytes:
    return b"SCKV\x02" + u32.pack(rank) + (nonce or secrets.token_bytes(32))


def drain(sock: socket.socket, cap: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    out = bytearray()
    sock.settimeout(30)
    try:
        while len(out) < cap and (chunk := sock.recv(1 << 16)):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def talk(address: str, data: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return drain(sock)


def client(server: KVServer, rank: int) -> LauncherCoordinator:
    return LauncherCoordinator(server.address, rank, server.size or 4, server.key(rank))


def raw_authenticated(server: KVServer, rank: int) -> socket.socket:
    """A connection that completes the handshake by hand, to send what a LauncherCoordinator never would."""
    import hashlib
    import hmac

    host, _, port = server.address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    cn = secrets.token_bytes(32)
    sock.sendall(hello(rank, cn))
    reply = sock.recv(HELLO_REPLY, socket.MSG_WAITALL)
    sn = reply[1:33]
    sock.sendall(hmac.new(server.key(rank), b"client" + u32.pack(rank) + cn + sn, hashlib.sha256).digest())
    assert sock.recv(1) == b"\x00"
    return sock


def test_without_the_key_nobody_reads_writes_or_deletes_a_key():
    server = KVServer(size=2, handshake_timeout=1).start()
    try:
        owner = client(server, 0)
        owner._set("shardckpt/s/0/agree/0", b"the-secret-payload")
        key = b"shardckpt/s/0/agree/0"
        attempts = [
            old_frame(b"G", key, u32.pack(1000)),                       # read, old protocol
            old_frame(b"S", key, b"forged" * 10),                        # overwrite, old protocol
            old_frame(b"D", key, b""),                                   # delete, old protocol
            hello(1) + b"\0" * 32 + old_frame(b"G", key, u32.pack(0)),   # a handshake with a wrong proof
            hello(0) + client_proof_with_key(server.key(1)),             # client 1's key posing as client 0
            hello(7) + b"\0" * 32,                                       # a rank this launch has not
        ]
        for data in attempts:
            got = talk(server.address, data)
            assert b"the-secret-payload" not in got
            # at most the server's challenge, then a refusal; never the answer to a request
            assert got == b"" or (got[0] == 0 and len(got) >= HELLO_REPLY and b"authentication failed" in got), got
        assert owner._get("shardckpt/s/0/agree/0", 1) == b"the-secret-payload"
        assert server.failed_handshakes == len(attempts)
        assert "6 connection(s) failed the handshake" in server.refusals()
        owner.close()
    finally:
        server.stop()


def client_proof_with_key(key: bytes) -> bytes:
    """Bytes in the place of a proof, made with a real key but not for this connection's nonces."""
    import hashlib
    import hmac

    return hmac.new(key, b"client", hashlib.sha256).digest()


def test_a_client_writes_only_its_own_keys_and_client_0_writes_any():
    server = KVServer(size=3).start()
    try:
        c0, c1, c2 = (client(server, r) for r in range(3))
        c1._set("ns/s/4/1", b"one")
        c0._set("ns/s/4", b"broadcast")  # a value only client 0 posts
        c0._set("ns/s/4/2", b"zero-for-two")
        assert c2._get_many(["ns/s/4/1", "ns/s/4", "ns/s/4/2"], 1) == [b"one", b"broadcast", b"zero-for-two"]
        assert c1._create("ns/s/decision", b"commit") == b"commit"
        assert c2._create("ns/s/decision", b"abort") == b"commit"  # the first creator won
        with pytest.raises(sc.CoordinationError, match="client 2 may not set 'ns/s/4/1'") as err:
            c2._set("ns/s/4/1", b"forged")
        assert server.address in str(err.value)
        with pytest.raises(sc.CoordinationError, match="lost earlier"):  # the server closed that connection
            c2._get("ns/s/4/1", 0)
        c2 = client(server, 2)
        with pytest.raises(sc.CoordinationError, match="may not delete"):
            c2._delete("ns/s/4/1")
        with pytest.raises(sc.CoordinationError, match="may not set"):
            client(server, 1)._set("ns/s/decision", b"abort")
        assert c0._get_many(["ns/s/4/1", "ns/s/decision", "ns/s/4/9"], 0.2) == [b"one", b"commit", None]
        assert server.limit_errors == 3
    finally:
        server.stop()


def test_get_many_waits_for_every_key_in_one_round_trip():
    server = KVServer(size=2).start()
    try:
        c0, c1 = client(server, 0), client(server, 1)
        late = threading.Timer(0.3, lambda: c1._set("ns/s/1/1", b"late"))
        late.start()
        c0._set("ns/s/1/0", b"early")
        assert c0._get_many(["ns/s/1/0", "ns/s/1/1"], 30) == [b"early", b"late"]
        late.join()
        assert c0._get_many(["ns/s/1/0", "ns/s/2/1"], 0.2) == [b"early", None]
        gathered: list[list[bytes]] = []
        other = threading.Thread(target=lambda: gathered.append(c1.all_gather(b"b", "x", 30)))
        other.start()
        assert c0.all_gather(b"a", "x", 30) == [b"a", b"b"]
        other.join()
        assert gathered == [[b"a", b"b"]]
    finally:
        server.stop()


def test_a_put_wakes_only_the_gets_it_completes_so_a_collective_costs_linear_wakeups():
    # N clients waiting for one broadcast while N others post their gather values: waking every waiter on
    # every put (a store-wide notify) is N^2 wake-ups per collective; each get here is woken once.
    n = 24
    server = KVServer(size=n).start()
    try:
        clients = [client(server, r) for r in range(n)]
        out: list[list[bytes] | BaseException] = [[] for _ in range(n)]

        def run(r: int) -> None:
            try:
                for _ in range(3):
                    out[r] = clients[r].all_gather(bytes([r]), "w", 60)
            except BaseException as exc:  # reported below
                out[r] = exc

        before = server.store.wakeups
        threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(o == [bytes([r]) for r in range(n)] for o in out), out
        assert server.store.wakeups - before <= 3 * 2 * n  # three collectives, each a gather and a broadcast
        assert not server.store.waiting  # no waiter left registered
    finally:
        server.stop()


def test_a_key_deleted_before_the_others_arrive_is_waited_for_again():
    server = KVServer(size=2).start()
    try:
        c0, c1 = client(server, 0), client(server, 1)
        got: list[list[bytes | None]] = []
        waiter = threading.Thread(target=lambda: got.append(c0._get_many(["k/a/1", "k/b/1"], 30)))
        waiter.start()
        c1._set("k/a/1", b"first")
        c1._delete("k/a/1")
        c1._set("k/b/1", b"b")
        time.sleep(0.3)
        assert waiter.is_alive()  # "a" is gone again: the get still waits
        c1._set("k/a/1", b"second")
        waiter.join(30)
        assert got == [[b"second", b"b"]]
    finally:
        server.stop()


def test_bytes_recorded_from_a_real_connection_are_refused_when_replayed():
    server = KVServer(size=2).start()
    try:
        record: list[bytes] = []
        victim = LauncherCoordinator(recording_relay(server.address, record), 1, 2, server.key(1))
        victim._set("ns/s/1/1", b"v1")
        assert victim._get("ns/s/1/1", 1) == b"v1"
        victim._delete("ns/s/1/1")
        victim._set("ns/s/1/1", b"v2")
        time.sleep(0.2)  # let the relay's pump record the last request (it is forwarded before it is answered)
        captured = b"".join(record)
        assert len(captured) > 41 + 32 and captured[:5] == b"SCKV\x02"
        got = talk(server.address, captured)  # the whole conversation again: hello, proof, set v1, get, delete
        assert got[0] == 0 and len(got) == HELLO_REPLY + 1 + 4 + len(b"authentication failed"), got
        assert got.endswith(b"authentication failed")
        assert client(server, 0)._get("ns/s/1/1", 1) == b"v2"  # neither the set nor the delete ran again
        assert server.failed_handshakes == 1

        # and the other way round: a process replaying a real server's answers is not taken for the server
        answers: list[bytes] = []
        probe = socket.create_server(("127.0.0.1", 0))

        def fake_server() -> None:
            conn, _ = probe.accept()
            conn.recv(41)
            conn.sendall(answers[0])
            time.sleep(1)
            conn.close()

        host, _, port = server.address.rpartition(":")
        with socket.create_connection((host, int(port))) as real:
            real.sendall(hello(1))
            answers.append(real.recv(HELLO_REPLY, socket.MSG_WAITALL))
        threading.Thread(target=fake_server, daemon=True).start()
        with pytest.raises(sc.CoordinationError, match="is not this launch's coordinator"):
            LauncherCoordinator(f"127.0.0.1:{probe.getsockname()[1]}", 1, 2, server.key(1))
    finally:
        server.stop()


def test_limits_answer_with_a_clear_error_and_close():
    server = KVServer(size=2, max_frame_bytes=1 << 20, max_client_bytes=3 << 20, max_pending=4, max_per_rank=2,
                      handshake_timeout=1).start()
    try:
        c1 = client(server, 1)
        with pytest.raises(sc.CoordinationError, match=r"value of 1048577 bytes exceeds the frame limit"):
            c1._set("k/1", b"x" * ((1 << 20) + 1))  # refused before it is sent: the client learnt the limit
        for _ in range(5):
            c1._set("k/a/1", b"x" * (1 << 20))  # replacing its own value does not add up
        c1._set("k/b/1", b"x" * (1 << 20))
        c1._set("k/c/1", b"x" * (1 << 20))
        with pytest.raises(sc.CoordinationError, match=r"client 1 would hold more than 3145728 bytes") as err:
            c1._set("k/d/1", b"x")
        assert server.address in str(err.value)

        sock = raw_authenticated(server, 0)  # a frame header over the limit, sent by hand
        sock.sendall(b"S" + u32.pack(3) + b"k/0" + u32.pack(1 << 30))
        got = drain(sock)
        assert got[0] == 2 and b"exceeds the launcher's frame limit of 1048576 bytes" in got
        sock.close()

        c1b = client(server, 1)  # the second connection of client 1 (the first was closed by its error)
        c1c = client(server, 1)
        with pytest.raises(sc.CoordinationError, match="client 1 already has 2 connections open"):
            client(server, 1)
        c1b.close(), c1c.close()

        idle = [socket.create_connection(server.server_address[:2]) for _ in range(4)]  # every handshake slot
        time.sleep(0.2)
        assert talk(server.address, hello(0))[:1] == b"\x03"  # busy
        c0 = client(server, 0)  # retries until the idle sockets time out (1 s) and a slot frees
        assert c0._get("k/b/1", 0) == b"x" * (1 << 20)
        for s in idle:
            assert drain(s) == b""
            s.close()
        assert server.turned_away >= 2 and server.failed_handshakes == 4
        assert server.limit_errors == 3
    finally:
        server.stop()


SERVE = """
import sys, time
from shardckpt.coordination import KVServer
s = KVServer(size=2).start()
print(s.address, s.key(0).hex(), flush=True)
time.sleep(600)
"""


def test_a_frozen_server_fails_the_collective_at_its_deadline_naming_the_server():
    proc = subprocess.Popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    try:
        address, key = proc.stdout.readline().split()
        coord = LauncherCoordinator(address, 0, 2, bytes.fromhex(key))
        os.kill(proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(sc.ClientTimeoutError, match=f"coordinator at {address} did not answer client 0"):
            coord.all_gather(b"x", "agree", 3)
        elapsed = time.monotonic() - start
        # the socket's own timeout was the wait + 30 s: this took 33 s before
        assert elapsed < 3 + 2 + 5, elapsed
        with pytest.raises(sc.CoordinationError, match="lost earlier"):
            coord.all_gather(b"x", "again", 3)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class Flood:
    """Threads of a foreign process hammering the coordinator; every connection it made is counted once."""

    def __init__(self, address: str, threads: int = 6) -> None:
        self.address = address
        self.made = 0
        self.pushed = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _attempt(self, kind: int) -> None:
        host, _, port = self.address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        with self._lock:
            self.made += 1
        pushed = 0
        try:
            if kind == 1:
                sock.sendall(hello(0) + b"\0" * 32)  # a wrong proof
            elif kind == 2:  # an old-protocol set of 1 GiB: as much of it as the server takes
                sock.sendall(old_frame(b"S", b"shardckpt/0/agree/0", b"")[:-4] + u32.pack(1 << 30))
                chunk = b"\xab" * (1 << 20)
                while pushed < 64 << 20:
                    sock.sendall(chunk)
                    pushed += len(chunk)
            elif kind == 3:
                sock.sendall(b"SCKV")  # stalls inside the handshake until the server's deadline
        except (BrokenPipeError, ConnectionResetError):
            pass
        drain(sock)
        sock.close()
        with self._lock:
            self.pushed += pushed

    def _run(self, i: int) -> None:
        kind = i
        while not self.stop.is_set():
            self._attempt(kind % 4)
            kind += 1
            time.sleep(0.01)

    def __enter__(self) -> Flood:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join()


def test_a_real_launch_saves_correctly_under_attack_and_reports_what_it_refused(tmp_path):
    limit = 4 << 20
    d = str(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "shardckpt", "launch", "-n", "4", "--max-frame-bytes", str(limit),
         os.path.join(HERE, "launch_worker.py"), "guarded", d],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def wait_files(names: list[str], seconds: float = 180) -> None:
            deadline = time.monotonic() + seconds
            while not all(os.path.exists(os.path.join(d, n)) for n in names):
                assert launcher.poll() is None, launcher.communicate()
                assert time.monotonic() < deadline, f"{names} never appeared"
                time.sleep(0.05)

        wait_files(["address"] + [f"ready-{r}" for r in range(4)])
        address = open(os.path.join(d, "address")).read()
        baseline = _peak_rss(launcher.pid)
        foreign = 0
        for data in (old_frame(b"G", b"shardckpt/0/agree/0", u32.pack(2000)),
                     old_frame(b"S", b"shardckpt/0/agree/1", b"forged" * 8),
                     old_frame(b"D", b"shardckpt/0/agree/2", b""),
                     hello(1) + b"\0" * 32):
            got = talk(address, data)
            assert got == b"" or b"authentication failed" in got
            foreign += 1
        # a burst of stalled handshakes holds every pre-authentication slot (32) for the 5 s deadline
        stalled = [socket.create_connection(address.rsplit(":", 1)) for _ in range(40)]
        for s in stalled:
            s.sendall(b"SCKV")
        with Flood(address) as flood:
            open(os.path.join(d, "start"), "w").close()
            wait_files([f"saved-{r}" for r in range(4)])
        for s in stalled:
            drain(s)
            s.close()
        foreign += len(stalled) + flood.made
        replayed = talk(address, open(os.path.join(d, "recorded-1"), "rb").read())
        assert replayed.endswith(b"authentication failed") and len(replayed) < HELLO_REPLY + 64
        foreign += 1
        peak = _peak_rss(launcher.pid)
        open(os.path.join(d, "finish"), "w").close()
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, err
    reader = sc.load_checkpoint(os.path.join(d, "ckpt"))
    np.testing.assert_array_equal(reader.get_tensor("w"), W)
    np.testing.assert_array_equal(reader.get_tensor("r"), R)
    limits = open(os.path.join(d, "limits-2")).read()
    assert f"value of {limit + 1} bytes exceeds the frame limit of {limit} bytes" in limits
    assert "store after " in limits and f"client 2 would hold more than {4 * limit} bytes" in limits
    # every foreign connection was refused and counted, once; client 2's store overrun was the only client refusal
    line = next(x for x in err.splitlines() if "failed the handshake" in x)
    failed = int(line.split(": ")[-1].split(" connection(s)")[0])
    away = int(line.split("; ")[1].split(" turned away")[0]) if "turned away" in line else 0
    assert failed + away == foreign, (line, foreign)
    assert away >= 8
    assert "1 client request(s) refused at a limit" in line
    # The flood pushed 64 MiB per oversized attempt; the launcher's peak memory grew by less than its own limits
    # allow one client to hold (4 frames) plus one frame in flight per connection of the 4 clients.
    growth = peak - baseline
    print(f"\nforeign connections {foreign} (failed {failed}, turned away {away}); flood pushed "
          f"{flood.pushed >> 20} MiB; launcher peak RSS {baseline >> 20} -> {peak >> 20} MiB (+{growth >> 20} MiB)")
    assert growth < 4 * limit + 4 * limit + (32 << 20), growth
