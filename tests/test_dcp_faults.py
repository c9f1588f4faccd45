"""`shardckpt.dcp` under a full disk and beside `shardckpt clean`: one launch of 2 real gloo ranks (this file run
as a script is the worker) saving with ``dcp.save`` / ``dcp.async_save`` into a small tmpfs (`fs_helpers`), whose
free space a fault point (`faults.hook`, in each rank's own process) takes away at a chosen moment:

* before the save (so full that the lease cannot be written; or every rank's data write fails, sync and
  async);
* midway through the coordinator's index write (every rank's data is staged);
* on rank 1 alone, once rank 0's file is staged (the coordinator's staged file and lease outlive the failure);
* on a fresh directory right after the commit, before TensorFlow's ``checkpoint`` state file is written;

then `python -m shardckpt clean` runs while a save is held at ``after_index_staged`` (every data file and the
index staged, the old index still published), and once more after the processes exit, over what a failed save
left.  Every failure must reach every rank as a `CheckpointError` naming the prefix, leave the previous
checkpoint bit-identical and leave nothing the next save or ``clean`` cannot handle.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

pytestmark = [pytest.mark.timeout(300)]

RUN_TIMEOUT = 180
DISK = 4 << 20  # the tmpfs: room for one checkpoint and one staged save of the next, not for a filler as well
ROWS, COLS = 256, 1024  # "w", float32, Shard(0) over 2 ranks: 512 KiB per rank
MANY = 400  # small tensors, so that the index spans several pages (a fill midway through it is felt)


def expected(version: int) -> dict[str, np.ndarray]:
    """Every tensor of save ``version``, whole, as the bundle must hold it."""
    out = {"w": np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) + 1000 * version,
           "b": np.full(16, version, np.float64)}
    for i in range(MANY):
        out[f"many.t{i}"] = np.full(2, 1000 * version + i, np.float32)
    return out


def bundle_diff(directory: str, version: int) -> list[str]:
    """Names in the bundle of ``directory`` that are not bit-identical to save ``version`` ("step" the object)."""
    import shardckpt
    from shardckpt import objects

    bad = []
    with shardckpt.load_checkpoint(os.path.join(directory, "model")) as r:
        if sorted(r.get_variable_to_shape_map()) != sorted([*expected(version), "step"]):
            bad.append("names")
        for name, want in expected(version).items():
            got = r.get_tensor(name)
            if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
                bad.append(name)
        if objects.decode(r.get_tensor("step"), "step") != version:
            bad.append("step")
    return bad


def leftovers(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".staging-" in n or ".tempstate" in n or n.endswith(".lease"))


def clean(prefix: str) -> dict[str, Any]:
    """``python -m shardckpt clean PREFIX``, a real process of its own."""
    proc = subprocess.run([sys.executable, "-m", "shardckpt", "clean", prefix], capture_output=True, text=True,
                          timeout=60)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


# --- worker side -------------------------------------------------------------------------------------


def _failure(exc: BaseException) -> dict[str, Any]:
    """What a failed save raised on this rank: DCP's CheckpointException carries each failing rank's exception
    (pickled from its rank, so without its __cause__); anything else is looked at along its chain."""
    from torch.distributed.checkpoint.api import CheckpointException

    from shardckpt import CheckpointError

    found: list[tuple[int | None, BaseException]] = []
    if isinstance(exc, CheckpointException):
        found = [(rank, e) for rank, (e, _) in exc.failures.items()]
    else:
        found = [(None, exc)]
    out = []
    for rank, e in found:
        chain: list[BaseException] = []
        cur: BaseException | None = e
        while cur is not None and len(chain) < 10:
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        ours = next((c for c in chain if isinstance(c, CheckpointError)), None)
        out.append({"rank": rank, "type": type(e).__name__, "ours": type(ours).__name__ if ours else None,
                    "message": str(ours if ours is not None else e)[:2000],
                    "errno": getattr(ours, "errno", None)})
    return {"outer": type(exc).__name__, "failures": out}


def _fails(fn: Any) -> dict[str, Any] | None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; recorded
        return _failure(exc)
    return None


def _wait_for(path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def scenario(rank: int, disk: str, results: str, events: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fs_helpers import PAGE, fill_to
    from shardckpt import faults
    from shardckpt.torch import StorageWriter

    mesh = init_device_mesh("cpu", (2,))
    ck = os.path.join(disk, "ck")
    filler = os.path.join(disk, "filler")

    def state(version: int) -> dict[str, Any]:
        want = expected(version)
        return {"w": distribute_tensor(torch.from_numpy(want["w"]), mesh, [Shard(0)]),
                "b": torch.from_numpy(want["b"]),
                "many": {f"t{i}": torch.from_numpy(want[f"many.t{i}"]) for i in range(MANY)},
                "step": version}

    def save(version: int, where: str = ck) -> None:
        dcp.save(state(version), storage_writer=StorageWriter(where, durable=False))

    def free() -> None:
        if rank == 0 and os.path.exists(filler):
            os.unlink(filler)
        dist.barrier()

    def when(point: str, action: Any) -> Any:
        def fn(p: str, client: int) -> None:
            if p == point:
                action()
        return faults.hook(fn)

    def after(phase: str, version: int, where: str = ck) -> None:
        dist.barrier()  # every rank is past the save before rank 0 looks
        if rank == 0:
            events[f"{phase}_files"] = leftovers(where)
            events[f"{phase}_diff"] = bundle_diff(where, version)

    save(1)
    if rank == 0:
        events["index_bytes"] = os.path.getsize(os.path.join(ck, "model.index"))
        events["page"] = PAGE

    # A: the disk is full before the save starts: not even the lease can be written (the coordinator fails) ...
    if rank == 0:
        fill_to(disk, 0)
    dist.barrier()
    events["A_lease"] = _fails(lambda: save(2))
    after("A_lease", 1)
    free()
    # ... or the lease fits and each rank's data write fails.
    if rank == 0:
        fill_to(disk, 4 * PAGE)  # the lease fits, no data file does
    dist.barrier()
    events["A"] = _fails(lambda: save(2))
    after("A", 1)
    events["A_async"] = _fails(lambda: dcp.async_save(state(2), storage_writer=StorageWriter(ck, durable=False))
                               .result(timeout=120))
    after("A_async", 1)
    free()

    # B: every rank's data is staged; the disk fills midway through the coordinator's index.
    with when("mid_index_write", lambda: fill_to(disk, 0)):
        events["B"] = _fails(lambda: save(2))
    after("B", 1)
    free()

    save(2)
    after("C", 2)

    # D: rank 1 alone finds the disk full, once rank 0's file is staged: the coordinator's staged file and its
    # lease stay (its process lives on and DCP never calls finish), for the next save of this process.
    def rank_1_fills(phase: str, version: int) -> None:
        marker = os.path.join(results, f"staged-{phase}")
        if rank == 0:
            with when("after_data_fsync", lambda: open(marker, "w").close()):
                events[phase] = _fails(lambda: save(version))
        else:
            with when("after_plan", lambda: (_wait_for(marker), fill_to(disk, 0))):
                events[phase] = _fails(lambda: save(version))

    rank_1_fills("D", 3)
    after("D", 2)
    free()

    # E: `shardckpt clean` while the save is held after its index is staged, before it is published.
    def paused() -> None:
        before = sorted(os.listdir(ck))
        cleaned = clean(ck)  # the directory the user gave DCP, as they would name it
        events["E_paused"] = {"before": before, "after": sorted(os.listdir(ck)), "clean": cleaned,
                              "old": bundle_diff(ck, 2)}

    if rank == 0:
        with when("after_index_staged", paused):
            events["E"] = _fails(lambda: save(3))
    else:
        events["E"] = _fails(lambda: save(3))
    after("E", 3)

    # F: a fresh directory; the disk fills right after the commit, before TF's state file would be written.
    fresh = os.path.join(disk, "fresh")
    if rank == 0:
        with when("after_commit", lambda: fill_to(disk, 0)):
            events["F"] = _fails(lambda: save(5, fresh))
    else:
        events["F"] = _fails(lambda: save(5, fresh))
    dist.barrier()
    if rank == 0:
        events["F_files"] = sorted(os.listdir(fresh))
        events["F_index"] = os.path.exists(os.path.join(fresh, "model.index"))
        events["F_diff"] = bundle_diff(fresh, 5) if events["F_index"] else ["no index"]
    free()
    if rank == 0:
        import shutil

        shutil.rmtree(fresh)  # room for G
    dist.barrier()

    # G: as D, and then the processes exit: what is left is a dead session's, for `shardckpt clean`.
    rank_1_fills("G", 4)
    after("G", 3)
    free()


def worker(disk: str) -> int:
    import engine_worker as ew

    return ew.torch_worker(lambda rank, events: scenario(rank, disk, os.environ["WORKER_RESULTS"], events))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.exit(worker(sys.argv[2]))


# --- test side ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import engine_worker as ew
    from fs_helpers import full_filesystem

    base = tmp_path_factory.mktemp("dcpfaults")
    results = base / "results"
    results.mkdir()
    with full_filesystem(base, DISK) as disk:
        env = ew._base_env(str(results))
        env.pop("SHARDCKPT_FAULT", None)
        t = time.monotonic()
        codes, output = ew.launch_torch(2, [__file__, "worker", os.fspath(disk)], env, RUN_TIMEOUT)
        out = {}
        for name in os.listdir(results):
            if name.startswith("result-"):
                with open(results / name) as f:
                    res = json.load(f)
                out[res["rank"]] = res
        r = ew.Run(codes, out, output, time.monotonic() - t)
        print(f"dcp fault launch: {r.elapsed:.1f} s")
        yield disk, r


def _events(run: Any) -> dict[int, dict[str, Any]]:
    disk, r = run
    r.assert_ok(2)
    return {rank: res["events"] for rank, res in r.results.items()}


def _assert_enospc_everywhere(ev: dict[int, dict[str, Any]], phase: str, failing: set[int], prefix: str) -> None:
    """Every rank raised; each failing rank's exception is a CheckpointIOError (ENOSPC) naming the prefix."""
    for rank in (0, 1):
        got = ev[rank][phase]
        assert got is not None, f"{phase}: the save succeeded on rank {rank}"
        assert got["outer"] == "CheckpointException", got  # DCP's own, on every rank
        by_rank = {f["rank"]: f for f in got["failures"]}
        assert set(by_rank) == failing, (phase, rank, got)
        for f in by_rank.values():
            assert f["type"] == "CheckpointIOError" and f["ours"] == "CheckpointIOError", (phase, rank, f)
            assert f["errno"] == errno.ENOSPC and prefix in f["message"], (phase, rank, f)


def test_a_full_disk_before_the_save_fails_every_rank_and_keeps_the_checkpoint(run) -> None:
    ev = _events(run)
    prefix = os.path.join(run[0], "ck", "model")
    _assert_enospc_everywhere(ev, "A_lease", {0}, prefix)
    assert ev[0]["A_lease_diff"] == [] and ev[0]["A_lease_files"] == []
    assert "cannot write the lease" in ev[0]["A_lease"]["failures"][0]["message"]
    for phase in ("A", "A_async"):
        _assert_enospc_everywhere(ev, phase, {0, 1}, prefix)
        assert ev[0][f"{phase}_diff"] == [], phase  # the previous checkpoint, bit for bit
        assert ev[0][f"{phase}_files"] == [], phase  # nothing staged, no lease: every rank failed its write


def test_a_disk_filling_midway_through_the_index_fails_every_rank_and_keeps_the_checkpoint(run) -> None:
    ev = _events(run)
    page = ev[0]["page"]
    assert ev[0]["index_bytes"] > 2 * page  # so its second half needs a page its first half did not take
    _assert_enospc_everywhere(ev, "B", {0}, os.path.join(run[0], "ck", "model"))
    assert ev[0]["B_diff"] == [] and ev[0]["B_files"] == []
    assert ev[0]["C_diff"] == [] and ev[0]["C_files"] == []  # with room again, the next save is published whole


def test_a_full_disk_on_one_rank_fails_every_rank_and_the_next_save_takes_over(run) -> None:
    ev = _events(run)
    _assert_enospc_everywhere(ev, "D", {1}, os.path.join(run[0], "ck", "model"))
    assert ev[0]["D_diff"] == []
    # Rank 0's staged data file and sidecar, and the lease its live process still holds ...
    left = ev[0]["D_files"]
    assert "model.lease" in left and len([n for n in left if n.startswith("model.data-00000-of-00002")]) == 2, left
    assert not [n for n in left if n.startswith("model.data-00001") or n.startswith("model.index")], left
    # ... are taken over by the next save of the same processes, which publishes exactly what it was given.
    assert ev[0]["E"] is None and ev[1]["E"] is None
    assert ev[0]["E_diff"] == [] and ev[0]["E_files"] == []


def test_clean_beside_a_save_held_after_its_index_is_staged_touches_nothing(run) -> None:
    ev = _events(run)
    paused = ev[0]["E_paused"]
    staged = [n for n in paused["before"] if ".staging-" in n]
    # Both ranks' data files and sidecars and the index, staged under one token; the old index still there.
    assert len(staged) == 5 and len({n.rsplit(".staging-", 1)[1] for n in staged}) == 1, paused["before"]
    assert "model.index" in paused["before"] and "model.lease" in paused["before"]
    cleaned = paused["clean"]
    assert cleaned["rc"] == 1 and "in use by shardckpt.dcp save" in cleaned["stderr"], cleaned
    assert paused["after"] == paused["before"]  # not one file removed
    assert paused["old"] == []  # the previous checkpoint, readable and bit-identical while the save waits
    assert ev[0]["E"] is None and ev[1]["E"] is None  # the save then completes ...
    assert ev[0]["E_diff"] == [] and ev[0]["E_files"] == []  # ... with exactly what it was given


def test_a_disk_full_after_the_commit_does_not_fail_a_published_save(run) -> None:
    """A save that raises must not have published; a fresh directory's state file is written before the commit."""
    ev = _events(run)
    assert ev[0]["F"] is None and ev[1]["F"] is None, (ev[0]["F"], ev[1]["F"])
    assert "checkpoint" in ev[0]["F_files"] and ev[0]["F_index"], ev[0]["F_files"]
    assert ev[0]["F_diff"] == [] and not [n for n in ev[0]["F_files"] if ".staging-" in n or n.endswith(".lease")]


def test_clean_finishes_what_a_dead_session_left_and_keeps_the_checkpoint(run) -> None:
    disk, _ = run
    ev = _events(run)
    _assert_enospc_everywhere(ev, "G", {1}, os.path.join(disk, "ck", "model"))
    ck = os.path.join(disk, "ck")
    left = leftovers(ck)
    assert left == ev[0]["G_files"] and "model.lease" in left and len(left) == 3, left  # the processes are gone
    cleaned = clean(ck)  # the directory stands for the prefix in it with leftovers
    assert cleaned["rc"] == 0 and f"{os.path.join(ck, 'model')}: 2 action(s)" in cleaned["stdout"], cleaned
    assert leftovers(ck) == []
    assert bundle_diff(ck, 3) == []
