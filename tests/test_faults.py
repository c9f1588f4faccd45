"""Fault injection: one of 4 real client processes dies (SIGKILL) or raises at each named point of a save.

For every point and victim the checkpoint is either absent or wholly one version
(old or new, never mixed), a committed checkpoint beside it is untouched, the
survivors finish within the timeout plus a few seconds, and a following save
cleans up and succeeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import shardckpt as sc
from shardckpt.coordination import KVServer
from shardckpt.faults import ENV as FAULT_ENV
from shardckpt.faults import POINTS

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from fault_worker import model  # noqa: E402

CLIENTS = 4
TIMEOUT = 1.5


def run_clients(prefix: str, version: int, fault: str | None = None) -> list[tuple[int, str]]:
    server = KVServer(size=CLIENTS).start()
    try:
        env = dict(os.environ)
        env.pop(FAULT_ENV, None)
        if fault:
            env[FAULT_ENV] = fault
        procs = [
            subprocess.Popen([sys.executable, os.path.join(HERE, "fault_worker.py"), prefix, str(version),
                              str(TIMEOUT)], env={**env, **server.env(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for r in range(CLIENTS)
        ]
        out = []
        deadline = time.monotonic() + 60
        for p in procs:
            try:
                text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise AssertionError("a client hung") from None
            out.append((p.returncode, text))
        return out
    finally:
        server.stop()


def files(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def check_one_version(prefix: str) -> int | None:
    """The version the checkpoint at ``prefix`` holds, wholly; None when there is no checkpoint."""
    try:
        reader = sc.load_checkpoint(prefix)
    except sc.CheckpointError:
        return None
    got = {n: reader.get_tensor(n) for n in ("kernel", "uneven", "bias", "names")}
    assert sorted(reader.get_variable_to_shape_map()) == sorted(got)
    for version in (1, 2):
        want = model(version)
        if all(np.array_equal(got[n], want[n]) for n in want):
            return version
    raise AssertionError(f"{prefix} holds mixed or wrong data")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Committed checkpoints 'other' and 'ckpt' (version 1), copied fresh for each case."""
    d = tmp_path_factory.mktemp("base")
    assert all(code == 0 for code, _ in run_clients(str(d / "other"), 1))
    other = files(d)
    assert all(code == 0 for code, _ in run_clients(str(d / "ckpt"), 1))
    return other, files(d)


CLIENT0_ONLY = {"mid_index_write", "after_index_staged", "after_old_index_removed", "between_renames", "after_commit"}
CASES = [(p, 0, "kill") for p in POINTS]
CASES += [(p, 2, "kill") for p in POINTS if p not in CLIENT0_ONLY]
CASES += [("mid_data_write", 2, "raise"), ("mid_index_write", 0, "raise"), ("between_renames", 0, "raise")]


@pytest.mark.parametrize("point, victim, action", CASES, ids=[f"{p}-{c}-{a}" for p, c, a in CASES])
def test_fault_at_point(tmp_path, base, point, victim, action):
    other, everything = base
    for name, data in everything.items():
        (tmp_path / name).write_bytes(data)
    prefix = str(tmp_path / "ckpt")
    start = time.monotonic()
    results = run_clients(prefix, 2, f"{point}@{victim}:{action}")
    elapsed = time.monotonic() - start
    report = "\n".join(text for _, text in results)
    for rank, (code, _) in enumerate(results):
        if rank == victim and action == "kill":
            assert code == -9, report
        else:
            assert code == 0, report  # finished with OK or a CheckpointError, never another exception
    assert elapsed < TIMEOUT * 3 + 15, report
    # 1. absent or wholly one version
    assert check_one_version(prefix) in (None, 1, 2)
    # 2. the other checkpoint is byte-for-byte unchanged
    now = files(tmp_path)
    assert {n: now[n] for n in other} == other
    # 4. a following save succeeds and leaves no staging or temporary files
    assert all("OK" in text for _, text in run_clients(prefix, 2))
    assert check_one_version(prefix) == 2
    assert not [n for n in os.listdir(tmp_path) if ".staging-" in n or ".tempstate" in n]
