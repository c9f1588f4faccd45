"""The soak under faults, CI-sized, and the findings it made, each as a small deterministic test.

`test_soak_under_faults` runs ``scripts/soak.py`` for `shardckpt launch` and for torch.distributed at once
(both mostly wait out timeouts, so they share the machine well): groups of client processes saving to fresh
prefixes and over one shared prefix, with a fault in about half the cycles (raise, late, stopped or killed
at a named point; SIGSTOP or SIGKILL at a random moment; job restarts), a second saver on the shared prefix,
a ``shardckpt clean`` loop and a reader loop beside them.  The soak's own checker (`soak.check`) lists every
broken promise; the test asserts that list is empty and that the faults really happened.

The findings: a save that every client was told had failed was published anyway, at once or by the next
``shardckpt clean`` or save (so the previous checkpoint was gone after a failed save); and a client that lost
the coordination service after writing its part reported a failure although client 0 had committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import shardckpt as sc
from shardckpt import faults
from shardckpt.coordination import LocalGroup

HERE = os.path.dirname(os.path.abspath(__file__))
SOAK = os.path.join(HERE, "..", "scripts", "soak.py")
sys.path.insert(0, HERE)
from test_sessions import holds, outcome, save  # noqa: E402

CYCLES = 100
TIMEOUT = 1.0


def run_soak(engine: str, cycles: int, seed: int, tmp, *extra: str) -> subprocess.Popen:
    out = tmp / f"{engine}-{seed}.json"
    return subprocess.Popen([sys.executable, SOAK, "--engine", engine, "--cycles", str(cycles), "--seed", str(seed),
                             "--timeout", str(TIMEOUT), "--dir", str(tmp / f"{engine}-{seed}"), "--json", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def summary_of(proc: subprocess.Popen, tmp, engine: str, seed: int) -> dict:
    text, _ = proc.communicate(timeout=900)
    path = tmp / f"{engine}-{seed}.json"
    assert path.exists(), text.decode(errors="replace")[-4000:]
    return json.loads(path.read_text())


def test_soak_under_faults(tmp_path):
    procs = {engine: run_soak(engine, CYCLES, seed, tmp_path) for engine, seed in (("launch", 11), ("torch", 12))}
    summaries = {engine: summary_of(p, tmp_path, engine, 11 if engine == "launch" else 12)
                 for engine, p in procs.items()}
    for engine, s in summaries.items():
        assert s["violations"] == [], (engine, s["violations"])
        assert s["reader"].get("wrong", 0) == 0 and s["reader"].get("ok", 0) > 100, (engine, s["reader"])
        injected = s["faults_injected"]
        # The faults happened (not only were planned): each kind at least once in 100 cycles.
        for kind in ("raise", "late", "stop", "rstop", "restart"):
            assert injected.get(kind, 0) >= 1, (engine, injected)
        assert s["save_outcomes"].get("ok", 0) >= CYCLES, (engine, s["save_outcomes"])
        assert s["second_saver"].get("ok", 0) >= 1 and s["second_saver"].get("PrefixBusyError", 0) >= 1, s
        assert s["clean"].get("busy", 0) >= 1, (engine, s["clean"])
        assert s["max_excess_s"]["root"] <= s["bound_s"] and s["max_excess_s"]["other"] <= s["bound_s"], s


def _eio(point: str):
    def at(p: str, client: int) -> None:
        if p == point and client == 0:
            raise OSError(5, f"injected EIO at {point}")
    return at


def _clean(prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardckpt.cli", "clean", prefix], capture_output=True, text=True,
                          timeout=120)


# Points of client 0's commit where the OS can refuse (a write, a rename, an fsync), before and after the
# moment the old index is removed (or, on a fresh prefix, the renames begin).
BEFORE = ["mid_index_write", "after_index_staged"]
AFTER = ["after_old_index_removed", "between_renames", "after_commit"]


CASES = [(p, fresh) for p in BEFORE + AFTER for fresh in (True, False)
         if not (fresh and p == "after_old_index_removed")]  # a fresh prefix has no old index to remove


@pytest.mark.parametrize("point, fresh", CASES, ids=[f"{p}-{'fresh' if f else 'overwrite'}" for p, f in CASES])
def test_a_save_reported_failed_is_never_published_and_one_past_its_commit_point_is_not_a_failure(
        tmp_path, point, fresh):
    """Finding 1: client 0's commit failing after it staged the index (fresh prefix) or after it removed the
    old index (overwrite) was reported to every client as a failure, yet the save was published: at once
    (a failed fsync of the directory after the last rename) or by the next ``shardckpt clean`` or save,
    which roll the staged index forward.  The previous checkpoint was then gone after a "failed" save."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(2)
    if not fresh:
        group.run(lambda c: save(c, prefix, 1))
    previous = None if fresh else 1
    with faults.hook(_eio(point)):
        results = group.run(lambda c: outcome(lambda: save(c, prefix, 2, overwrite=True)))
    done = _clean(prefix)
    assert done.returncode == 0, done
    now = holds(prefix)
    if point in BEFORE:
        # Before the commit point: a failure on every client, and the previous checkpoint stays.
        assert "OutcomeUnknownError" not in results and "ok" not in results, results
        assert now == previous, (results, done.stdout)
    else:
        # Past it: the save is (or, once cleaned, is) published, so no client may call it a failure: client 0
        # finishes the renames once more (then it is a success), or says the outcome is unknown.
        assert results in (["ok", "ok"], ["OutcomeUnknownError", "OutcomeUnknownError"]), results
        assert now == 2, (results, done.stdout)
    assert not [n for n in os.listdir(tmp_path) if ".staging-" in n or ".tempstate" in n]


def test_a_staged_file_replaced_before_the_commit_is_never_published_by_clean(tmp_path):
    """Finding 1 again, worse: on a fresh prefix, a data file replaced after the index was staged failed the
    save (verified publish), but the staged index stayed, and ``shardckpt clean`` then published it over the
    replaced file: a corrupt checkpoint where the save had said "nothing was published"."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(2)

    def at(point: str, client: int) -> None:
        if point == "after_index_staged" and client == 0:
            for n in os.listdir(tmp_path):
                if n.startswith("p.data-00001") and ".staging-" in n:
                    path = tmp_path / n
                    data = path.read_bytes()
                    os.unlink(path)
                    path.write_bytes(data[:-1])

    with faults.hook(at):
        results = group.run(lambda c: outcome(lambda: save(c, prefix, 2)))
    assert results == ["CorruptCheckpointError", "CorruptCheckpointError"], results
    done = _clean(prefix)
    assert done.returncode == 0, done
    assert not os.path.exists(prefix + ".index"), done.stdout
    with pytest.raises(sc.CheckpointNotFoundError):
        sc.load_checkpoint(prefix)


def test_a_client_that_loses_the_store_after_writing_does_not_report_a_failure(tmp_path):
    """Finding 2 (torch.distributed: the store lives in rank 0's process): rank 0 commits and dies before
    its outcome reaches the others; they lost the store while waiting and reported CoordinationError, a
    failure, although the checkpoint was published.  The outcome is unknown to them, and they say so."""
    out = tmp_path / "torch.json"
    proc = subprocess.run([sys.executable, SOAK, "--engine", "torch", "--cycles", "4", "--seed", "0",
                           "--timeout", "5", "--dir", str(tmp_path / "run"), "--json", str(out),
                           "--force", "1:fresh:kill:after_commit:0"], capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["faults_injected_by_point"] == {"kill@after_commit": 1}, s
    assert s["violations"] == [], s["violations"]
    # Cycle 1 was published (its prefix holds step 1 after clean): its survivors must not call it a failure.
    # (The checker also requires the restarted job's first save, to that prefix, to succeed.)
    assert s["consensus_by_cycle"][1] == "unknown", s


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
@pytest.mark.parametrize("point", ["after_agree", "mid_data_write", "before_barrier_written"])
def test_an_interrupt_in_client_0s_save_does_not_keep_the_prefix(tmp_path, point, blocking):
    """Found beside the soak: a BaseException (Ctrl-C) escaping client 0's save between the agreement and the
    commit kept the prefix's lease for the life of the process, so every later save to the prefix from it
    failed with PrefixBusyError naming itself."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(2)

    def at(p: str, client: int) -> None:
        if p == point and client == 0:
            raise KeyboardInterrupt

    def client(c) -> str:
        try:
            return outcome(lambda: save(c, prefix, 1, blocking=blocking))
        except KeyboardInterrupt:
            return "KeyboardInterrupt"

    with faults.hook(at):
        first, other = group.run(client)
    # The other client fails too: told by client 0 (which reports its interrupt where it still can), or by
    # its own timeout.
    assert first == "KeyboardInterrupt" and other in ("RemoteClientError", "ClientTimeoutError"), (first, other)
    assert group.run(lambda c: outcome(lambda: save(c, prefix, 2, overwrite=True))) == ["ok", "ok"]
    assert holds(prefix) == 2
    assert not [n for n in os.listdir(tmp_path) if ".staging-" in n or ".tempstate" in n or n.endswith(".lease")]
