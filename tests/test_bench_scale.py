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
from hypothesis import given, settings
from hypothesis import strategies as st

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
_PATH = os.path.join(_BENCHMARKS, "bench_scale.py")
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)  # as when the script runs: its own directory first (`sections`)
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


# --- the root's merge of every client's entries (commit._merge) ------------------------------------------


def _pieces(n: int, *, whole_on: tuple[int, ...] = (0,), bad_shape_on: int | None = None) -> list[bytes]:
    """What n clients send in "written": each its slice of three row-sharded tensors (one 3-D, one with an
    uneven last client, one of int64), and a small whole tensor from the clients in ``whole_on``."""
    from shardckpt.format.protos import BundleEntry, pack_entries
    from shardckpt.format.slices import TensorSlice, encode_slice_key

    pieces = []
    for r in range(n):
        entries = []
        for name, dtype, shape in ((b"a/w", 1, (n * 3, 5, 2)), (b"b", 1, (n * 2 - 1, 7)), (b"c/x", 9, (n, 300))):
            rows = shape[0] // n + (1 if shape[0] % n else 0)
            lo, hi = r * rows, min((r + 1) * rows, shape[0])
            if bad_shape_on == r and name == b"b":
                shape = (shape[0] + 1, *shape[1:])
            box = ((lo, hi),) + tuple((0, d) for d in shape[1:])
            tslice = TensorSlice.from_bounds(box)
            entries.append((encode_slice_key(name, tslice), BundleEntry(dtype, shape[:0] + tuple(
                hi_ - lo_ for lo_, hi_ in box), r, 64 * (r + 1), 4 * (hi - lo), 12345 + r)))
            entries.append((name, BundleEntry(dtype=dtype, shape=shape, slices=[tslice])))
        if r in whole_on:
            entries.append((b"step", BundleEntry(9, (), r, 0, 8, 777)))
        pieces.append(pack_entries(entries))
    return pieces


def _reference_index(pieces: list[bytes]) -> bytes:
    """Every entry decoded and combined one by one: what MergeV2Checkpoints does, and the merge used to."""
    from shardckpt.format.merge import combine_entry
    from shardckpt.format.protos import BundleEntry, BundleHeader, unpack_entries
    from shardckpt.format.writer import build_index

    merged: dict[bytes, BundleEntry] = {}
    for rank, blob in enumerate(pieces):
        for key, entry in unpack_entries(blob):
            combine_entry(merged, key, entry, f"client {rank}")
    return build_index(BundleHeader(num_shards=len(pieces)), merged)


def test_the_root_merges_partitioned_entries_without_decoding_one_per_client(monkeypatch) -> None:
    from shardckpt import commit
    from shardckpt.format.protos import BundleHeader
    from shardckpt.format.writer import build_index

    decoded = []
    real = commit.decode_entry
    monkeypatch.setattr(commit, "decode_entry", lambda raw: decoded.append(raw) or real(raw))
    for n in (1, 2, 64):
        pieces = _pieces(n)
        got = build_index(BundleHeader(num_shards=n), commit._merge(pieces))
        assert got == _reference_index(pieces), n  # byte for byte
    assert decoded == []  # 64 clients x 3 partitioned tensors: no entry decoded


def test_the_root_merge_still_refuses_a_duplicate_or_a_disagreeing_entry() -> None:
    from shardckpt import commit
    from shardckpt.errors import CorruptCheckpointError, DuplicateTensorError

    with pytest.raises(DuplicateTensorError, match="step.*client 5"):
        commit._merge(_pieces(8, whole_on=(0, 5)))
    with pytest.raises(CorruptCheckpointError, match="client 3: partitioned tensor b "):
        commit._merge(_pieces(8, bad_shape_on=3))
    with pytest.raises(CorruptCheckpointError, match="client 1: partitioned tensor b "):
        commit._merge(_pieces(8, bad_shape_on=0))


def _random_pieces(data) -> list[bytes]:
    """Clients that hold any number of a tensor's row blocks and send its entry once per block or once with
    all their blocks, beside tensors held whole by one client: every shape the merge must get right."""
    from shardckpt.format.protos import BundleEntry, pack_entries
    from shardckpt.format.slices import TensorSlice, encode_slice_key

    n = data.draw(st.integers(1, 6))
    per_client: list[list[tuple[bytes, BundleEntry]]] = [[] for _ in range(n)]
    for t in range(data.draw(st.integers(1, 4))):
        name = f"t{t}".encode()
        blocks = data.draw(st.integers(1, 8))
        shape = (blocks * 2, 3)
        owner = [data.draw(st.integers(0, n - 1)) for _ in range(blocks)]
        for r in range(n):
            mine = [b for b in range(blocks) if owner[b] == r]
            slices = [TensorSlice.from_bounds(((2 * b, 2 * b + 2), (0, 3))) for b in mine]
            for b, s in zip(mine, slices):
                per_client[r].append((encode_slice_key(name, s), BundleEntry(1, (2, 3), r, 24 * b, 24, 99 + b)))
            if not slices:
                continue
            if data.draw(st.booleans()):
                per_client[r].append((name, BundleEntry(dtype=1, shape=shape, slices=slices)))
            else:
                per_client[r] += [(name, BundleEntry(dtype=1, shape=shape, slices=[s])) for s in slices]
    per_client[data.draw(st.integers(0, n - 1))].append((b"whole", BundleEntry(9, (), 0, 0, 8, 7)))
    return [pack_entries(entries) for entries in per_client]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_root_merge_equals_decoding_and_combining_every_entry(data) -> None:
    from shardckpt import commit
    from shardckpt.format.protos import BundleHeader
    from shardckpt.format.writer import build_index

    pieces = _random_pieces(data)
    assert build_index(BundleHeader(num_shards=len(pieces)), commit._merge(pieces)) == _reference_index(pieces)


# --- real processes, CI-sized: both systems started by one zygote each ------------------------------------


@pytest.mark.parametrize("start", ["fork", "exec"])
def test_the_real_benchmark_runs_both_systems_and_measures_their_memory(tmp_path, start) -> None:
    # fork lets 128 torch ranks fit in memory (one zygote imports torch and shardckpt, forks the ranks); exec is
    # shardckpt launch and one python per DCP rank.  A rank that did not save, or saved something incomplete,
    # fails its launch (rank 0 reads the checkpoint back), and a failed launch is an error, never a time.
    import torch  # noqa: F401  - the test extras install it; both systems need it here
    out = tmp_path / "real.json"
    assert bench.main(["real", "--sizes", "3", "--reps", "1", "--tensors", "4", "--rounds", "2", "--start", start,
                       "--timeout", "300", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert data["start"] == start and data["rounds"] == 2
    for system in ("sc", "dcp"):
        r = data["results"][system]["3"]
        assert "error" not in r, r
        assert len(r["rounds"]) == 2 and len(r["times"]) == 2  # one timed save per round
        assert all(len(x["faults"]) == 1 and x["faults"][0] >= 0 for x in r["rounds"]), r["rounds"]
        mem = r["memory"]
        assert mem["processes"] == 3, mem  # the parent's children are the three ranks, no more
        assert 0 < mem["max_rank_pss_mib"] <= mem["ranks_pss_mib"] and mem["parent_pss_mib"] > 0
    assert "| 3 |" in bench.report(data, None)


@pytest.mark.parametrize("system", ["sc", "dcp"])
def test_a_failing_forked_rank_fails_its_launch_and_the_zygote_stops_the_others(tmp_path, monkeypatch,
                                                                                 system) -> None:
    # Rank 1 exits with status 7 before it joins the others (BENCH_FAIL_RANK), so ranks 0 and 2 wait for it.
    # The zygote must pass on its status and kill them: were they left to the launch's deadline, the launch
    # would end with a rank still running ("exit statuses [None]").
    import argparse

    import torch  # noqa: F401  - the test extras install it; both systems need it here

    monkeypatch.setenv("BENCH_FAIL_RANK", "1")
    args = argparse.Namespace(tensors=2, reps=1, timeout=300.0, start="fork")
    with pytest.raises(RuntimeError, match=rf"{system} N=3: exit statuses \[7\]"):
        bench.run_real(system, 3, args, str(tmp_path))
