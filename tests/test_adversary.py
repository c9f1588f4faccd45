"""The adversary's tests: every fault point, every client, every way a client can be late, fail or die.

Each case checks the product's promises, not the mechanism:

* one save has ONE outcome on every client: success everywhere, failure everywhere, or
  `OutcomeUnknownError` on a client only where client 0 passed the commit point and went silent;
* a save that reports success committed exactly what every client passed (checked value by value);
* a failed save leaves the previous checkpoint readable, whole;
* the next save, called together, succeeds and leaves nothing behind;
* a second writer (another saver, ``shardckpt clean``) never interleaves with a live save.

Lateness is deterministic: a late client waits in a fault hook until every other client has
returned (so it is late past any timeout, without racing a sleep), or sleeps a fixed multiple of
the timeout where the point is what happens when it comes back within the grace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shardckpt as sc
from shardckpt import faults
from shardckpt.coordination import KVServer, LocalGroup
from shardckpt.faults import POINTS
from shardckpt.lease import PrefixLease

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
T = 0.15  # the faulty save's timeout; every save after it gets a long one, so only the fault can fail it
AFTER = 20.0
# Points only client 0 reaches (its commit).
CLIENT0_ONLY = {"mid_index_write", "after_index_staged", "after_old_index_removed", "between_renames", "after_commit",
                "before_barrier_committed"}
# Client 0 has decided to commit at these (the decision comes right after "after_barrier_written").
PAST_DECISION = CLIENT0_ONLY | {"after_barrier_committed"}


def model(step: int, n: int) -> dict[str, np.ndarray]:
    return {"w": np.full((6 * n, 4), step, np.float32) + np.arange(4, dtype=np.float32),
            "b": np.arange(16, dtype=np.int64) + 1000 * step}


def save(coord, prefix: str, step: int, *, timeout: float = AFTER, overwrite: bool = True,
         blocking: bool = True, durable: bool = True) -> sc.SaveResult:
    mesh = sc.create_mesh([("x", coord.size)])
    local = mesh.local_devices(coord.rank, coord.size)
    values = model(step, coord.size)
    w = sc.DTensor.from_global(values["w"], sc.Layout(["x", sc.UNSHARDED], mesh), local)
    result = sc.sharded_save(mesh, prefix, ["w", "b"], ["", ""], [w, values["b"]], coordinator=coord,
                             timeout=timeout, overwrite=overwrite, blocking=blocking, durable=durable)
    return result if blocking else result.result()  # type: ignore[union-attr,return-value]


def outcome(fn) -> str:
    """"ok" or the class name of the `CheckpointError` raised (anything else fails the test)."""
    try:
        fn()
        return "ok"
    except sc.CheckpointError as exc:
        return type(exc).__name__


def holds(prefix: str, n: int) -> int | None:
    """The step the checkpoint at ``prefix`` holds, wholly (every value checked); None if there is none."""
    if not os.path.exists(prefix + ".index"):
        return None
    with sc.load_checkpoint(prefix) as reader:
        w, b = reader.get_tensor("w"), reader.get_tensor("b")
    step = int(b[0]) // 1000
    want = model(step, n)
    assert np.array_equal(w, want["w"]) and np.array_equal(b, want["b"]), f"{prefix} holds wrong or mixed data"
    return step


def leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if ".staging-" in n or ".tempstate" in n or n.endswith(".lease")]


def run_group(group: LocalGroup, fn) -> tuple[list[str], list[threading.Event]]:
    """``fn(coord)`` on every client in its own thread; outcomes by rank, and per client an event set when
    it has returned (a late client's hook waits on the others')."""
    n = group.size
    out = [""] * n
    done = [threading.Event() for _ in range(n)]

    def client(r: int) -> None:
        try:
            out[r] = outcome(lambda: fn(group.coordinator(r)))
        except BaseException as exc:  # noqa: BLE001 - reported below, as the test's failure
            out[r] = f"UNEXPECTED {type(exc).__name__}: {exc}"
        finally:
            done[r].set()

    threads = [threading.Thread(target=client, args=(r,), name=f"adv-client-{r}") for r in range(n)]
    run_group.done = done  # type: ignore[attr-defined]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a client hung"
    return out, done


def check_one_outcome(results: list[str], state: int | None, old: int | None, new: int,
                      point: str | None = None) -> None:
    """The promises of one save whose outcomes are ``results`` and after which the prefix holds ``state``."""
    assert not any(r.startswith("UNEXPECTED") for r in results), results
    unknown = [r for r, res in enumerate(results) if res == "OutcomeUnknownError"]
    assert 0 not in unknown, results  # client 0 always knows
    known = {res for res in results if res != "OutcomeUnknownError"}
    if results[0] == "ok":
        assert known == {"ok"}, f"one save, two outcomes: {results}"
        assert state == new, (results, state)
    else:
        assert "ok" not in known, f"one save, two outcomes: {results}"
        assert state == old, f"a failed save did not leave the previous checkpoint: {results}, holds {state}"
    if unknown:
        assert point in PAST_DECISION, f"OutcomeUnknownError though client 0 never passed the commit point: {results}"


def then_saves_succeed(group: LocalGroup, directory, prefix: str, step: int) -> None:
    results, _ = run_group(group, lambda c: save(c, prefix, step))
    assert results == ["ok"] * group.size, results
    assert holds(prefix, group.size) == step
    assert not leftovers(directory), leftovers(directory)


def late_hook(point: str, victim: int, group_size: int, how: str):
    """A hook making ``victim`` late at ``point``: "wait" until every other client returned, or "sleep"."""
    fired: list[bool] = []

    def at(p: str, client: int) -> None:
        if p == point and client == victim and not fired:
            fired.append(True)
            if how == "wait":
                for r, ev in enumerate(run_group.done):  # type: ignore[attr-defined]
                    if r != victim:
                        assert ev.wait(60)
            else:
                time.sleep(2.5 * T)

    return at, fired


# Every point on client 0 and on the last client, with 2 and 3 clients; asynchronous saves with 2.
LATE = [(p, v, n, b) for n, b in ((2, True), (3, True), (2, False)) for v in (0, n - 1) for p in POINTS
        if v == 0 or p not in CLIENT0_ONLY]


@pytest.mark.parametrize("point, victim, n, blocking", LATE,
                         ids=[f"{p}-c{v}-of{n}-{'sync' if b else 'async'}" for p, v, n, b in LATE])
def test_a_late_client_at_every_point(tmp_path, point, victim, n, blocking):
    """Client ``victim`` is late at ``point``: past every timeout (a non-zero client waits until the others
    returned), or, for client 0, 2.5 timeouts (past the others' wait for its answer, within their grace)."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(n)
    then_saves_succeed(group, tmp_path, prefix, 1)
    hook, fired = late_hook(point, victim, n, "sleep" if victim == 0 else "wait")
    with faults.hook(hook):
        results, _ = run_group(group, lambda c: save(c, prefix, 2, timeout=T, blocking=blocking))
    assert fired
    check_one_outcome(results, holds(prefix, n), 1, 2, point)
    then_saves_succeed(group, tmp_path, prefix, 3)


def raise_hook(point: str, victim: int):
    fired: list[bool] = []

    def at(p: str, client: int) -> None:
        if p == point and client == victim and not fired:
            fired.append(True)
            raise faults.InjectedFault(f"injected at {p} on client {client}")

    return at, fired


RAISE = [(p, v, n, b) for n, b in ((2, True), (3, True), (2, False)) for v in (0, n - 1) for p in POINTS
         if v == 0 or p not in CLIENT0_ONLY]


@pytest.mark.parametrize("point, victim, n, blocking", RAISE,
                         ids=[f"{p}-c{v}-of{n}-{'sync' if b else 'async'}" for p, v, n, b in RAISE])
def test_a_client_raising_at_every_point(tmp_path, point, victim, n, blocking):
    """An exception at ``point`` on ``victim``: one outcome everywhere; failure leaves the old checkpoint."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(n)
    then_saves_succeed(group, tmp_path, prefix, 1)
    hook, fired = raise_hook(point, victim)
    with faults.hook(hook):
        results, _ = run_group(group, lambda c: save(c, prefix, 2, timeout=T, blocking=blocking))
    assert fired
    check_one_outcome(results, holds(prefix, n), 1, 2, point)
    then_saves_succeed(group, tmp_path, prefix, 3)


@pytest.mark.parametrize("point", ["after_index_staged", "mid_index_write"])
def test_a_first_save_that_failed_in_its_commit_is_not_published_later(tmp_path, point):
    """No checkpoint yet, overwrite=False, client 0's commit raises at ``point``: the save fails on every
    client, so the prefix must stay empty and the same save, called again, must succeed.  (The staged index
    left behind was rolled forward by the retry's recovery, which then refused with CheckpointExistsError.)"""
    prefix = str(tmp_path / "p")
    group = LocalGroup(2)
    hook, fired = raise_hook(point, 0)
    with faults.hook(hook):
        results, _ = run_group(group, lambda c: save(c, prefix, 1, timeout=T, overwrite=False))
    assert fired and "ok" not in results, results
    assert holds(prefix, 2) is None
    results, _ = run_group(group, lambda c: save(c, prefix, 2, overwrite=False))
    assert results == ["ok", "ok"], results
    assert holds(prefix, 2) == 2


def test_1000_failed_sessions_keep_the_store_bounded(tmp_path):
    """Failed sessions keep their keys for at most `KEPT` sessions, so memory stays bounded however many fail.
    Here: 400 saves fail (client 0's data write raises; client 1 posts its "done", which client 0 never
    reads) and 600 plain gathers fail (client 0 gives up before client 1 posts, so its post is never read)."""
    group = LocalGroup(2)
    prefix = str(tmp_path / "p")

    def failing(p: str, client: int) -> None:
        if p == "mid_data_write" and client == 0:
            raise faults.InjectedFault("injected")

    with faults.hook(failing):
        for step in range(400):
            results, _ = run_group(group, lambda c, s=step: save(c, prefix, s, durable=False))
            assert results == ["InjectedFault", "RemoteClientError"], results
    root, other = group.coordinator(0), group.coordinator(1)
    for _ in range(600):
        assert outcome(lambda: root.all_gather(b"x" * 1000, "g", 0.0)) == "ClientTimeoutError"
        assert outcome(lambda: other.all_gather(b"y" * 1000, "g", 0.0)) == "ClientTimeoutError"
    kept = root.KEPT
    assert len(group._data) <= 4 * kept, (len(group._data), sorted(group._data)[:10])
    then_saves_succeed(group, tmp_path, prefix, 3)


def test_a_client_making_an_extra_collective_call_never_commits_a_mix(tmp_path):
    """User bug: client 1 makes a collective call client 0 does not make, then both save to one prefix in
    a loop.  Sessions pair by number, so client 0's second save met client 1's first (its call still waiting
    for client 0's answer): same prefix, names and shapes, so the agreement passed, and the checkpoint of
    client 0's step 2 held client 1's shards of step 1, reported as a success on both.  Nothing that mixes
    two calls may be committed."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(2)
    root, other = group.coordinator(0), group.coordinator(1)
    got: dict[str, list[str]] = {"root": [], "other": []}

    def client0() -> None:
        for step in (1, 2):
            got["root"].append(outcome(lambda s=step: save(root, prefix, s, timeout=0.5)))

    def client1() -> None:
        assert outcome(lambda: other.all_gather(b"", "extra", 0.0)) == "ClientTimeoutError"  # the extra call
        got["other"].append(outcome(lambda: save(other, prefix, 1, timeout=0.5)))

    threads = [threading.Thread(target=client0), threading.Thread(target=client1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    state = holds(prefix, 2)  # raises on a mix
    if got["root"][1] == "ok":
        assert state == 2
    assert state is None or got["root"][state - 1] == "ok", (got, state)


def test_a_save_waits_for_shardckpt_clean_instead_of_failing(tmp_path):
    """`shardckpt clean` holds the prefix's lease while it recovers; a save starting then must wait for it, not
    fail with PrefixBusyError ("no save may ever fail because of clean").  Deterministic: the lease is held,
    as clean holds it, until client 0 has asked for it once."""
    prefix = str(tmp_path / "p")
    group = LocalGroup(2)
    then_saves_succeed(group, tmp_path, prefix, 1)
    held = PrefixLease.acquire(prefix, what="shardckpt clean")
    asked = threading.Event()
    real = PrefixLease.acquire.__func__  # type: ignore[attr-defined]

    def acquire(cls, p, **kw):
        try:
            return real(cls, p, **kw)
        finally:
            asked.set()

    def release_later() -> None:
        asked.wait(30)
        held.release()

    threading.Thread(target=release_later).start()
    PrefixLease.acquire = classmethod(acquire)  # type: ignore[method-assign]
    try:
        results, _ = run_group(group, lambda c: save(c, prefix, 2, timeout=5))
    finally:
        PrefixLease.acquire = classmethod(real)  # type: ignore[method-assign]
    assert results == ["ok", "ok"], results
    assert holds(prefix, 2) == 2


# --- real processes: SIGKILL at every point, under the launcher ----------------------------------------------

# One process imports shardckpt once and forks every client of every case from it: 40 interpreters starting
# at once took over a minute on a loaded 2-core machine; forks take milliseconds.  Each client reads its engine
# (the launcher's variables) and its fault from its environment, as a real client does.
ZYGOTE = r'''
import json, os, sys, time
import numpy as np
import shardckpt as sc

cases = json.loads(sys.stdin.readline())
go_r, go_w = os.pipe()
children = {}
for i, case in enumerate(cases):
    for r, env in enumerate(case["envs"]):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.environ.update(env)
            coord = sc.coordination.resolve(None)
            step, n = case["step"], coord.size
            mesh = sc.create_mesh([("x", n)])
            w = sc.DTensor.from_global(np.full((6 * n, 4), step, np.float32) + np.arange(4, dtype=np.float32),
                                       sc.Layout(["x", sc.UNSHARDED], mesh), mesh.local_devices(coord.rank, n))
            b = np.arange(16, dtype=np.int64) + 1000 * step  # as test_adversary.model
            os.read(go_r, 1)  # every client starts its save together
            t = time.monotonic()
            try:
                sc.sharded_save(mesh, case["prefix"], ["w", "b"], ["", ""], [w, b], coordinator=coord,
                                timeout=case["timeout"], overwrite=True)
                word = "ok"
            except sc.CheckpointError as exc:
                word = type(exc).__name__
            with open(f"{case['prefix']}.result-{r}", "w") as f:
                json.dump([word, time.monotonic() - t], f)
            os._exit(0)
        children[pid] = (i, r)
os.close(go_r)
os.write(go_w, b"g" * len(children))
status = {}
while children:
    pid, st = os.wait()
    i, r = children.pop(pid)
    status[f"{i}/{r}"] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
print(json.dumps(status), flush=True)
'''

KILL = [(p, v) for v in (0, 1) for p in POINTS if v == 0 or p not in CLIENT0_ONLY]


def test_sigkill_at_every_point_under_the_launcher(tmp_path):
    """2 real client processes per case, every case at once: client ``v`` SIGKILLs itself at each point of the
    save of step 2 over step 1.  The survivor finishes within its bound with an outcome the promises allow; the
    prefix holds one whole version (none only if client 0 died past its commit point); a save by a new group
    then succeeds, recovering what the dead left (its stale lease included)."""
    timeout = 2.0
    cases, servers = [], []
    try:
        for i, (point, victim) in enumerate(KILL):
            d = tmp_path / f"case{i}"
            d.mkdir()
            prefix = str(d / "p")
            results, _ = run_group(LocalGroup(2), lambda c, p=prefix: save(c, p, 1, durable=False))
            assert results == ["ok", "ok"]
            server = KVServer(size=2).start()
            servers.append(server)
            cases.append({"prefix": prefix, "step": 2, "timeout": timeout,
                          "envs": [{**server.env(r), faults.ENV: f"{point}@{victim}:kill"} for r in range(2)]})
        env = {k: v for k, v in os.environ.items() if k != faults.ENV}
        done = subprocess.run([sys.executable, "-c", ZYGOTE], input=json.dumps(cases) + "\n", env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for server in servers:
            server.stop()
    bad = []
    for i, ((point, victim), case) in enumerate(zip(KILL, cases)):
        prefix, survivor = case["prefix"], 1 - victim
        if status[f"{i}/{victim}"] != -signal.SIGKILL or status[f"{i}/{survivor}"] != 0:
            bad.append((point, victim, status[f"{i}/0"], status[f"{i}/1"]))
            continue
        with open(f"{prefix}.result-{survivor}") as f:
            got, elapsed = json.load(f)
        os.unlink(f"{prefix}.result-{survivor}")
        # the longest wait: the outcome (timeout + slack), then the grace after a lost abort
        bound = timeout + 2 * min(timeout, 10.0) + 10
        state = holds(prefix, 2)
        if victim == 0:
            allowed = {"ClientTimeoutError", "CoordinationError", "RemoteClientError"}
            if point in PAST_DECISION:
                allowed.add("OutcomeUnknownError")
            if point == "after_barrier_committed":  # it had told the outcome: the survivor knows it
                allowed.add("ok")
            ok = got in allowed and (state in (1, 2, None) if got == "OutcomeUnknownError"
                                     else state == (2 if got == "ok" else 1))
        else:
            # client 0 survives: success exactly when client 1 had reported its part written
            ok = state == (2 if got == "ok" else 1)
            ok = ok and (got == "ok") == (point in ("after_barrier_written", "after_barrier_committed"))
        if not ok or elapsed > bound:
            bad.append((point, victim, got, state, elapsed))
        then_saves_succeed(LocalGroup(2), os.path.dirname(prefix), prefix, 3)
    assert not bad, bad
