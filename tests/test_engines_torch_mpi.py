"""torch.distributed (gloo, loopback-only TCPStore) and MPI (mpi4py + the mpich wheel under
``mpiexec.gforker``, which listens on 127.0.0.1 only) as real engines: 4, then 2 and 3, processes.

Each test runs ``python tests/engine_worker.py ENGINE SCENARIO`` in every client; the
workers check their own shards against the numpy globals and exit 0/1; here we check
every one passed, the errors they reported, and what is on disk.  No mocks.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

import engine_worker as ew

pytestmark = [pytest.mark.timeout(300)]


def test_mpiexec_gforker_is_installed():
    """The mpich wheel of the test extras provides it."""
    assert (Path(sys.executable).parent / "mpiexec.gforker").exists() or shutil.which("mpiexec.gforker")


ENGINES = {"torch": "TorchCoordinator", "mpi": "MPICoordinator"}
RUN_TIMEOUT = 120  # per multi-process run: a hang fails the test instead of stalling it


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, engine: str):
    """4 clients save the model on a 2x2 mesh and restore it onto the same, a 1-D, a 4x1 and a replicated mesh."""
    directory = tmp_path_factory.mktemp(f"{engine}-saved")
    return directory, ew.run_clients(engine, 4, "save-restore", directory, timeout=RUN_TIMEOUT)


def copy_checkpoint(src, dst, base: str = "ckpt") -> None:
    for name in os.listdir(src):
        if name.startswith(base + "."):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def test_four_clients_save_then_restore_any_layout(saved, engine: str) -> None:
    directory, run = saved
    ew.check_save_restore(run, directory, ENGINES[engine])


@pytest.mark.parametrize("n", [2, 3])
def test_fewer_clients_restore_and_save(saved, engine: str, tmp_path, n: int) -> None:
    directory, first = saved
    first.assert_ok(4)
    copy_checkpoint(directory, tmp_path)
    run = ew.run_clients(engine, n, "restore", tmp_path, timeout=RUN_TIMEOUT)
    run.assert_ok(n)
    ew.check_committed(tmp_path, f"ckpt-{n}clients", n)
    ew.check_committed(tmp_path, "ckpt", 4)  # read, never touched


@pytest.fixture(scope="module")
def edges_then_failures(tmp_path_factory: pytest.TempPathFactory, engine: str):
    """One start-up for two scenarios: binary/large/empty/zero-timeout gathers, then failing saves and a good one."""
    directory = tmp_path_factory.mktemp(f"{engine}-failures")
    return directory, ew.run_clients(engine, 4, "kv-edges+failures", directory, timeout=RUN_TIMEOUT)


def test_binary_large_empty_and_zero_timeout_gathers(edges_then_failures) -> None:
    _directory, run = edges_then_failures
    run.assert_ok(4)
    for res in run.results.values():
        assert res["events"]["big"] and res["events"]["zero_late"]
    assert "[1, 2, 3]" in run.results[0]["events"]["zero_early"]["message"]


def test_failed_saves_commit_nothing_and_group_recovers(edges_then_failures) -> None:
    directory, run = edges_then_failures
    run.assert_ok(4)
    for rank, res in run.results.items():
        ev = res["events"]
        # rank 1 passed a wrong-shaped tensor: everyone (rank 1 too) refuses before writing anything
        assert ev["mismatch"]["type"] in ("MismatchedCallError", "RemoteClientError"), ev["mismatch"]
        assert ev["mismatch"]["elapsed"] < 30
        # rank 2 fails while writing its data file: it raises its own error, the others hear of it
        want = "UnsupportedDTypeError" if rank == 2 else "RemoteClientError"
        assert ev["write_error"]["type"] == want, ev["write_error"]
        if rank != 2:
            assert "client 2" in ev["write_error"]["message"]
        assert ev["good"] == 8  # the same clients then save and restore fine
    ew.assert_nothing_left(directory, "bad1", "bad2")
    ew.check_committed(directory, "good", 4)


def test_absent_client_is_named_and_nothing_changes(saved, engine: str, tmp_path) -> None:
    directory, first = saved
    first.assert_ok(4)
    copy_checkpoint(directory, tmp_path)
    before = ew.snapshot(tmp_path)
    run = ew.run_clients(engine, 4, "absent", tmp_path, timeout=RUN_TIMEOUT)
    run.assert_ok(4)
    for rank in range(3):
        ev = run.results[rank]["events"]["timeout"]
        assert ev["type"] == "ClientTimeoutError" and "[3]" in ev["message"], ev
        # Client 0 names the absent client to everyone once its own wait ends; the others started theirs a
        # moment later, so they may hear it a moment before their own timeout.
        assert ew.ABSENT_TIMEOUT - 1 <= ev["elapsed"] < ew.ABSENT_TIMEOUT + 5, ev
    assert ew.snapshot(tmp_path) == before  # the committed checkpoint byte for byte, and nothing new


def test_store_host_dies_raises_at_once(tmp_path) -> None:
    run = ew.run_clients("torch", 4, "host-dies", tmp_path, timeout=RUN_TIMEOUT)
    assert sorted(run.results) == [1, 2, 3], run.output  # rank 0 died on purpose
    for rank in (1, 2, 3):
        res = run.results[rank]
        assert res["ok"], res["failure"]
        ev = res["events"]["host_died"]
        assert ev["type"] == "CoordinationError" and "store" in ev["message"], ev
        assert ev["elapsed"] < 20, ev  # the save's timeout was 60 s
    ew.assert_nothing_left(tmp_path, "new")


def test_tensor_transport_fallback(tmp_path) -> None:
    """Without the c10d store: point-to-point gloo tensors; same failures, same naming of the absent rank."""
    run = ew.run_clients("torch", 4, "failures+absent", tmp_path, timeout=RUN_TIMEOUT,
                         env={"WORKER_TORCH_TRANSPORT": "tensor"})
    run.assert_ok(4)
    for rank in range(3):
        ev = run.results[rank]["events"]
        assert ev["mismatch"]["type"] in ("MismatchedCallError", "RemoteClientError")
        assert ev["timeout"]["type"] == "ClientTimeoutError" and "[3]" in ev["timeout"]["message"], ev["timeout"]
        assert ev["timeout"]["elapsed"] < ew.ABSENT_TIMEOUT + 5
    ew.assert_nothing_left(tmp_path, "bad1", "bad2", "new")
    ew.check_committed(tmp_path, "good", 4)



def test_a_late_client_fails_one_save_everywhere_and_the_next_saves_succeed(engine: str, tmp_path) -> None:
    """Client 1 sleeps past the timeout inside a save: before sessions, the clients then fell a collective apart
    and later saves failed or paired values of different saves.  Now: one outcome per save, the next succeed."""
    ew.check_late(ew.run_clients(engine, 4, "late", tmp_path, timeout=RUN_TIMEOUT), tmp_path)
