"""sharded_save / sharded_restore across real JAX processes: ``jax.distributed`` on loopback, `JaxCoordinator`.

Each test starts its clients with ``tests/engine_worker.py jax SCENARIO``: the JAX
coordination service binds 127.0.0.1 only (``coordinator_bind_address``), every
client finds the engine with ``resolve(None)`` and checks its own restored shards
against the globals; this module checks the result files, exit codes and timings.
"""

from __future__ import annotations

import pytest

from engine_worker import assert_nothing_left, check_committed, check_late, run_clients

ENGINE = "jax"
TIMEOUT = 150  # per run of 4 processes; a hang fails the test instead of stalling it


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"{ENGINE}-save")
    return directory, run_clients(ENGINE, 4, "save-restore", directory, timeout=TIMEOUT)


def test_four_processes_save_then_restore_on_three_meshes(saved):
    directory, run = saved
    run.assert_ok(4)
    for result in run.results.values():
        events = result["events"]
        assert events["engine_class"] == "JaxCoordinator"
        assert events["save"]["clients"] == 4
        # Every restore checked every local shard (8 targets, one device per client on a 4-device mesh).
        assert [events[k] for k in ("restore_same", "restore_1d", "restore_4x1", "restore_replicated")] == [8] * 4
    check_committed(directory, "ckpt", 4)


def test_two_processes_restore_the_four_process_checkpoint_and_save_their_own(saved):
    directory, first = saved
    first.assert_ok(4)
    run = run_clients(ENGINE, 2, "restore", directory, timeout=TIMEOUT)
    run.assert_ok(2)
    check_committed(directory, "ckpt-2clients", 2)


def test_mismatch_and_write_error_commit_nothing_and_the_group_stays_usable(tmp_path):
    run = run_clients(ENGINE, 4, "failures", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    assert_nothing_left(tmp_path, "bad1", "bad2")
    check_committed(tmp_path, "good", 4)


def assert_timeouts_name(run, missing: int, n: int) -> None:
    for rank in range(n):
        if rank == missing:
            continue
        event = run.results[rank]["events"]["timeout"]
        assert event["type"] == "ClientTimeoutError", event
        assert f"clients [{missing}] of {n}" in event["message"], event
        assert 4.9 <= event["elapsed"] < 10, event  # timeout=5: not early, not much later


def test_a_process_that_never_arrives_is_named_after_the_timeout(tmp_path):
    run = run_clients(ENGINE, 4, "absent", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    assert_timeouts_name(run, 3, 4)
    assert_nothing_left(tmp_path, "new")


def test_a_killed_process_is_named_long_before_the_jax_heartbeat_notices(tmp_path):
    # The workers set heartbeat_timeout_seconds=60: only then would JAX abort the survivors (SIGABRT).
    run = run_clients(ENGINE, 4, "client-dies", tmp_path, timeout=TIMEOUT)
    assert run.returncodes == [0, 0, 0, -9], run.output
    assert sorted(run.results) == [0, 1, 2], run.output
    assert all(run.results[r]["ok"] for r in range(3)), run.output
    assert_timeouts_name(run, 3, 4)
    assert_nothing_left(tmp_path, "new")


def test_binary_large_and_empty_payloads_and_timeout_zero(tmp_path):
    run = run_clients(ENGINE, 4, "kv-edges", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    early = run.results[0]["events"]["zero_early"]
    assert "clients [1, 2, 3] of 4" in early["message"] and early["elapsed"] < 1, early


def test_a_late_client_fails_one_save_everywhere_and_the_next_saves_succeed(tmp_path):
    check_late(run_clients(ENGINE, 4, "late", tmp_path, timeout=TIMEOUT), tmp_path)
