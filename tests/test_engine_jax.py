"""sharded_save / sharded_restore across real JAX processes: ``jax.distributed`` on loopback, `JaxCoordinator`.

Each test starts its clients with ``tests/engine_worker.py jax SCENARIO``: the JAX
coordination service binds 127.0.0.1 only (``coordinator_bind_address``), every
client finds the engine with ``resolve(None)`` and checks its own restored shards
against the globals; this module checks the result files, exit codes and timings.
"""

from __future__ import annotations

import pytest

import engine_worker as ew

ENGINE = "jax"
TIMEOUT = 150  # per run of 4 processes; a hang fails the test instead of stalling it


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"{ENGINE}-save")
    return directory, ew.run_clients(ENGINE, 4, "save-restore", directory, timeout=TIMEOUT)


def test_four_processes_save_then_restore_on_three_meshes(saved):
    directory, run = saved
    ew.check_save_restore(run, directory, "JaxCoordinator")


def test_two_processes_restore_the_four_process_checkpoint_and_save_their_own(saved):
    directory, first = saved
    first.assert_ok(4)
    run = ew.run_clients(ENGINE, 2, "restore", directory, timeout=TIMEOUT)
    run.assert_ok(2)
    ew.check_committed(directory, "ckpt-2clients", 2)


def test_mismatch_and_write_error_commit_nothing_and_the_group_stays_usable(tmp_path):
    run = ew.run_clients(ENGINE, 4, "failures", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    ew.assert_nothing_left(tmp_path, "bad1", "bad2")
    ew.check_committed(tmp_path, "good", 4)


def test_a_process_that_never_arrives_is_named_after_the_timeout(tmp_path):
    run = ew.run_clients(ENGINE, 4, "absent", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    ew.assert_timeouts_name(run, 3, 4)
    ew.assert_nothing_left(tmp_path, "new")


def test_a_killed_process_is_named_long_before_the_jax_heartbeat_notices(tmp_path):
    # The workers set heartbeat_timeout_seconds=60: only then would JAX abort the survivors (SIGABRT).
    ew.check_client_dies(ew.run_clients(ENGINE, 4, "client-dies", tmp_path, timeout=TIMEOUT), tmp_path)


def test_binary_large_and_empty_payloads_and_timeout_zero(tmp_path):
    run = ew.run_clients(ENGINE, 4, "kv-edges", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    early = run.results[0]["events"]["zero_early"]
    assert "clients [1, 2, 3] of 4" in early["message"] and early["elapsed"] < 1, early


def test_a_late_client_fails_one_save_everywhere_and_the_next_saves_succeed(tmp_path):
    ew.check_late(ew.run_clients(ENGINE, 4, "late", tmp_path, timeout=TIMEOUT), tmp_path)
