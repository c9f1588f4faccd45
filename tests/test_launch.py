"""`shardckpt launch` and the CLI, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import shardckpt as sc

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "launch_worker.py")


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_launch_four_clients_save_then_restore_onto_other_meshes_and_client_counts(tmp_path):
    prefix = str(tmp_path / "ckpt")
    saved = _cli("launch", "-n", "4", WORKER, "save", prefix)
    assert saved.returncode == 0, saved.stderr
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("w"), np.arange(96).reshape(12, 8))
    # (a) the same mesh, (b) another mesh shape, (c) 2 and 3 clients, (d) fully replicated
    for clients, mode in ((4, "same"), (4, "columns"), (2, "columns"), (3, "columns"), (3, "replicated")):
        restored = _cli("launch", "-n", str(clients), WORKER, f"restore:{mode}", prefix)
        assert restored.returncode == 0, (clients, mode, restored.stderr)


def test_launch_stops_everyone_when_a_client_dies(tmp_path):
    start = time.monotonic()
    result = _cli("launch", "-n", "4", WORKER, "die", str(tmp_path / "x"))
    assert result.returncode == 3
    assert "client 2 exited with status 3" in result.stderr
    assert time.monotonic() - start < 30


def test_a_client_that_never_arrives_is_named(tmp_path):
    result = _cli("launch", "-n", "4", WORKER, "absent", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr
    assert "clients [1] of 4 did not reach 'agree'" in result.stderr


def test_coordinator_listens_on_loopback_only():
    from shardckpt.coordination import KVServer

    server = KVServer().start()
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


def test_inspect_and_verify(tmp_path):
    prefix = str(tmp_path / "m")
    with sc.BundleWriter(prefix) as w:
        w.add("a", np.arange(6, dtype=np.float32).reshape(2, 3))
        w.add_slice("p", "4 2 0,2:-", np.ones((2, 2), np.int8))
        w.add_slice("p", "4 2 2,2:-", np.zeros((2, 2), np.int8))
    out = _cli("inspect", prefix)
    assert out.returncode == 0
    assert "DT_FLOAT" in out.stdout and "[2, 3]" in out.stdout and "2 tensors" in out.stdout
    data = json.loads(_cli("inspect", prefix, "--json").stdout)
    assert data["tensors"][1] == {"name": "p", "dtype": "DT_INT8", "shape": [4, 2], "slices": ["0,2:-", "2,2:-"],
                                  "bytes": 8, "data_files": ["data-00000-of-00001"]}
    ok = _cli("verify", prefix)
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    data_file = tmp_path / "m.data-00000-of-00001"
    raw = bytearray(data_file.read_bytes())
    raw[5] ^= 0x40
    data_file.write_bytes(bytes(raw))
    bad = _cli("verify", prefix)
    assert bad.returncode == 1 and "checksum does not match" in bad.stdout and "tensor a" in bad.stdout
    missing = _cli("inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no checkpoint" in missing.stderr
    usage = _cli("inspect")
    assert usage.returncode == 2


def test_demo_runs_end_to_end(tmp_path):
    result = _cli("demo", "--size-mb", "32", "--dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every value verified" in result.stdout and result.stdout.rstrip().endswith("OK")


TORCH_SCRIPT = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")                         # env://: what the launcher set, as under torchrun
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
seen = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
print("sum", int(t.item()), "rank", dist.get_rank(), "of", dist.get_world_size(), sorted(seen.items()),
      "port", os.environ["MASTER_PORT"])
dist.destroy_process_group()
"""


def test_a_plain_torch_script_runs_under_launch(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(TORCH_SCRIPT)
    result = _cli("launch", "-n", "2", str(script), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if " sum " in line)
    assert len(lines) == 2, result.stdout
    ports = {line.rpartition(" port ")[2] for line in lines}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536, lines  # one MASTER_PORT, the TCPStore's
    for rank, line in enumerate(lines):
        env = [("LOCAL_RANK", str(rank)), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
               ("RANK", str(rank)), ("WORLD_SIZE", "2")]
        assert line.rpartition(" port ")[0] == f"[rank{rank}] sum 3 rank {rank} of 2 {env}"


CHATTY = """
import os, sys
rank = int(os.environ["RANK"])
mark = "ab"[rank]
for i in range(300):
    stream = sys.stdout if i % 2 else sys.stderr
    for _ in range(40):                                 # each line in 40 separate writes
        stream.write(mark * 100)
        stream.flush()
    stream.write("\\n")
sys.stdout.write("no newline at the end " + mark)
"""


def test_every_output_line_is_whole_and_prefixed_with_its_rank(tmp_path):
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    result = _cli("launch", "-n", "2", str(script))
    assert result.returncode == 0, result.stderr[-2000:]
    for stream, lines_per_rank in ((result.stdout, 151), (result.stderr, 150)):
        counts = {0: 0, 1: 0}
        for line in stream.splitlines():
            prefix, _, body = line.partition(" ")
            rank = {"[rank0]": 0, "[rank1]": 1}[prefix]
            mark = "ab"[rank]
            assert body == mark * 4000 or body == "no newline at the end " + mark, line[:80]
            counts[rank] += 1
        assert counts == {0: lines_per_rank, 1: lines_per_rank}
    assert "shardckpt launch" not in result.stderr


def test_each_relayed_write_is_one_whole_prefixed_line():
    # The race CI once hit: a last line without a newline and its ending went out in two writes, and another
    # client's line landed between them.  Every write the relay makes must be one whole line on its own.
    from shardckpt.launch import MAX_PIECE, _Relay

    read_end, write_end = os.pipe()
    long_line = b"x" * (MAX_PIECE * 2 + 10) + b"\n"
    writes: list[bytes] = []
    relay = _Relay()
    copier = relay.start(os.fdopen(read_end, "rb"), writes.append, b"[rank3] ")
    with os.fdopen(write_end, "wb") as w:  # more than a pipe holds: the relay must already be reading
        w.write(b"first\n" + long_line + b"no newline at the end")
    relay.join(10.0)
    assert not copier.is_alive()
    assert all(w.startswith(b"[rank3] ") and w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert b"".join(w[len(b"[rank3] "):-1] for w in writes) == b"first" + long_line[:-1] + b"no newline at the end"
    assert writes[0] == b"[rank3] first\n" and writes[-1] == b"[rank3] no newline at the end\n"
    assert len(writes) == 5  # the long line in three pieces, each its own prefixed line
