"""The coordination of a save is linear in the client count: counted on the real root and client code.

`benchmarks/bench_scale.py`'s simulation runs the real ``sharded_save`` of client 0 and of client 1 against
simulated clients 2..N-1 (the real session code with payloads made by save's own encoders) over an in-memory
store, and counts every store operation.  These tests check the counts, never times.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_scale.py")
_spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_scale"] = bench
_spec.loader.exec_module(bench)

STEPS = ["save/agree", "save/go", "save/written", "save/decision", "save/outcome", "save/done", "barrier/in",
         "barrier/out"]


@pytest.fixture(scope="module")
def runs() -> dict[int, dict]:
    return {n: bench.simulate(n, 100) for n in (32, 64)}


def test_every_collective_of_a_save_takes_at_most_2n_messages(runs: dict[int, dict]) -> None:
    n = 64
    r = runs[n]
    assert sorted(r["collectives"]) == sorted(STEPS)
    for label, row in r["collectives"].items():
        assert row["messages"] <= 2 * n, (label, row)
        # An ordinary client makes one request per collective (the decision is client 0's alone).
        assert row["client_messages"] <= 1, (label, row)
        # The simulated clients did what the real client 1 did, each.
        assert row["peer_messages"] == (n - 2) * row["client_messages"], (label, row)
    # A gather: N-1 posts, client 0's one batched read and its N-1 deletes; a broadcast: one post, N-1 reads.
    assert r["collectives"]["save/written"]["messages"] == 2 * n - 1
    assert r["collectives"]["save/agree"]["root_messages"] == n


def test_message_counts_grow_linearly(runs: dict[int, dict]) -> None:
    small, large = runs[32]["collectives"], runs[64]["collectives"]
    for label in STEPS:
        grow = large[label]["messages"] - small[label]["messages"]
        assert grow <= 2 * 32, (label, small[label], large[label])


def test_an_ordinary_client_receives_the_same_few_bytes_whatever_the_client_count(runs: dict[int, dict]) -> None:
    # A barrier or a save's answers must not carry one entry per client to every client: that is N^2 bytes.
    small, large = runs[32]["collectives"], runs[64]["collectives"]
    for label in STEPS:
        assert large[label]["client_received"] <= 4096, (label, large[label])
        assert large[label]["client_received"] - small[label]["client_received"] <= 8, (label, small[label],
                                                                                     large[label])


def test_the_simulated_save_is_a_complete_checkpoint() -> None:
    # simulate() reads back the last tensor (every client's slice) and the shard count; it raises otherwise.
    r = bench.simulate(8, 10)
    assert r["index_bytes"] > 0 and r["n"] == 8


def test_a_barrier_missing_a_client_fails_on_every_present_client_naming_it() -> None:
    import threading

    from shardckpt.coordination import LocalGroup
    from shardckpt.errors import ClientTimeoutError

    group = LocalGroup(3)
    errors: dict[int, BaseException] = {}

    def arrive(rank: int) -> None:
        try:
            group.coordinator(rank).barrier("b", 0.3)
        except ClientTimeoutError as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=arrive, args=(r,)) for r in (0, 1)]  # client 2 never comes
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(errors) == [0, 1]
    assert all("clients [2] of 3" in str(e) for e in errors.values()), errors
    # Client 2 comes late to that barrier: it learns at once how it ended, and the next one pairs all three.
    with pytest.raises(ClientTimeoutError, match=r"clients \[2\] of 3"):
        group.coordinator(2).barrier("b", 30.0)
    threads = [threading.Thread(target=group.coordinator(r).barrier, args=("c", 5.0)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
