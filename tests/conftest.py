"""The suite leaves nothing behind in the temporary directory or /dev/shm.

Other processes on the machine make temporary files of their own at the same time, so the check only looks at
what can be ours: this session's processes get a private ``TMPDIR`` (set here, before any test or subprocess
runs), and at the end anything in it besides pytest's own ``tmp_path`` tree is a leak and fails the session.
/dev/shm has no per-process directory: new entries there that match the names our stack makes (shardckpt's,
MPICH's, torch's, glibc semaphores, PSM) are reported; they fail the session only with
``SHARDCKPT_STRICT_SHM=1`` (on a machine nobody else uses), since another user's MPI job makes the same names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

_ORIGINAL_TMP = tempfile.gettempdir()
SESSION_TMP = tempfile.mkdtemp(prefix="shardckpt-tests-", dir=_ORIGINAL_TMP)
os.environ["TMPDIR"] = SESSION_TMP  # inherited by every subprocess
tempfile.tempdir = None  # recomputed from TMPDIR on next use (pytest's tmp_path included)
# Caches a framework keeps on purpose (torch's inductor makes TMPDIR/torchinductor_USER on import of
# torch.distributed.tensor) go to one directory of the session, removed with it; anything else is a leak.
CACHES = "caches"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(SESSION_TMP, CACHES, "torchinductor"))

SHM = "/dev/shm"
SHM_PATTERNS = ("shardckpt", "mpich_shm_", "ucx_", "torch_", "sem.", "psm_", "psm2_", "jax", "xla")


def _shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir(SHM) if any(p in n for p in SHM_PATTERNS)}
    except OSError:
        return set()


def leftovers_in(directory: str) -> list[str]:
    """What a session left in its private temporary directory (pytest's own ``tmp_path`` tree aside)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith("pytest-of-") and n != CACHES)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    # A file's times come from the kernel's coarse clock, up to a tick behind time.time(): an entry made
    # right after this line would look older than the session without the margin.
    before, start = _shm_entries(), time.time() - 1.0
    yield
    problems = []
    left = leftovers_in(SESSION_TMP)
    if left:
        problems.append(f"left in the temporary directory {SESSION_TMP}: {left}")
    new_shm = []
    for name in sorted(_shm_entries() - before):
        try:
            if os.stat(os.path.join(SHM, name)).st_mtime >= start:
                new_shm.append(name)
        except FileNotFoundError:
            pass
    if new_shm:
        message = f"new entries in {SHM} since the session started (ours or another process's): {new_shm}"
        if os.environ.get("SHARDCKPT_STRICT_SHM") == "1":
            problems.append(message)
        else:
            print(f"\nwarning: {message}")
    # Pytest keeps its last few tmp_path trees for debugging; they live in this session's directory now,
    # so keep it when a leak is reported (to look at) and otherwise leave only pytest's tree in it.
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # The private directory goes once pytest is done with tmp_path, unless tests failed (their files help).
    if exitstatus == 0 and not leftovers_in(SESSION_TMP):
        shutil.rmtree(SESSION_TMP, ignore_errors=True)
