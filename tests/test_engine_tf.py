"""sharded_save / sharded_restore across real TF DTensor clients: TF's coordination service, `TFCoordinator`.

Each run starts its clients with ``tests/engine_worker.py tf SCENARIO``, all inside
one private network namespace (``unshare -n``): TF's gRPC servers listen on every
interface and nothing configures that, so the namespace keeps them on its own
loopback.  Every client finds the engine with ``resolve(None)`` and checks its own
restored shards against the globals; this module checks the result files, exit
codes and timings, and reads the checkpoint with TensorFlow's own reader too.
Starting 4 TF clients takes most of a run, so one run covers several scenarios.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine_worker as ew


def test_a_private_network_namespace_can_be_made():
    """TF's gRPC servers bind every interface, so its clients run in a namespace of their own."""
    assert ew.netns_works(), "cannot make a private network namespace (unshare -n, ip): run as root on Linux"

ENGINE = "tf"
TIMEOUT = 240  # per run of 4 TF clients (about 20 s on an idle 2-core machine); a hang fails the test


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"{ENGINE}-save")
    return directory, ew.run_clients(ENGINE, 4, "save-restore+kv-edges", directory, timeout=TIMEOUT)


def test_four_clients_save_then_restore_on_three_meshes(saved):
    directory, run = saved
    ew.check_save_restore(run, directory, "TFCoordinator")


def test_tensorflow_reads_the_four_client_checkpoint(saved):
    directory, run = saved
    run.assert_ok(4)
    import tensorflow as tf

    prefix = str(directory / "ckpt")
    reader = tf.train.load_checkpoint(prefix)
    want = ew.model_globals()
    assert reader.get_variable_to_shape_map() == {n: list(v.shape) for n, v in want.items()}
    for name, value in want.items():
        if value.dtype == object:
            # TF assembles only fixed-size dtypes from stored slices ("Dtype string not supported"), and "s" is
            # stored sharded; shardckpt's reader checked it in test_four_clients_save_then_restore_on_three_meshes.
            continue
        got = reader.get_tensor(name)
        assert got.dtype == value.dtype and np.array_equal(got, value), name


def test_binary_large_and_empty_payloads_and_timeout_zero(saved):
    # Values cross TF's key-value store as base64: NULs, 0xff and non-UTF-8 survive; 6 MB payloads pass.
    _, run = saved
    run.assert_ok(4)
    assert all(run.results[r]["events"]["zero_late"] and run.results[r]["events"]["big"] for r in range(4))
    early = run.results[0]["events"]["zero_early"]
    assert "clients [1, 2, 3] of 4" in early["message"] and early["elapsed"] < 1, early


def test_two_clients_restore_the_four_client_checkpoint_and_save_their_own(saved):
    directory, first = saved
    first.assert_ok(4)
    run = ew.run_clients(ENGINE, 2, "restore", directory, timeout=TIMEOUT)
    run.assert_ok(2)
    ew.check_committed(directory, "ckpt-2clients", 2)


def test_failures_commit_nothing_then_a_client_that_never_arrives_is_named(tmp_path):
    run = ew.run_clients(ENGINE, 4, "failures+absent", tmp_path, timeout=TIMEOUT)
    run.assert_ok(4)
    ew.assert_nothing_left(tmp_path, "bad1", "bad2", "new")
    ew.check_committed(tmp_path, "good", 4)
    ew.assert_timeouts_name(run, 3, 4)


def test_a_killed_client_is_named_after_the_timeout(tmp_path):
    ew.check_client_dies(ew.run_clients(ENGINE, 4, "client-dies", tmp_path, timeout=TIMEOUT), tmp_path)


def test_a_late_client_fails_one_save_everywhere_and_the_next_saves_succeed(tmp_path):
    ew.check_late(ew.run_clients(ENGINE, 4, "late", tmp_path, timeout=TIMEOUT), tmp_path)
