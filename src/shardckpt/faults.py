"""Named fault points in the save path, for tests that kill or fail one client at a chosen moment.

``SHARDCKPT_FAULT="<point>@<client>:<action>"`` (several separated by ``;``) makes
client ``<client>`` act when it reaches ``<point>``: ``kill`` (SIGKILL itself), ``raise``
(`InjectedFault`), ``stop`` (SIGSTOP itself: someone else sends SIGCONT) or
``sleep=<seconds>`` (a client late past the timeout, deterministically).  In-process
tests can instead register a function with `hook` (called with the point and the
client, e.g. to delete a file at the worst moment).  Unset (always, outside
tests), a fault point costs one dictionary lookup and one empty-list check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator

from .errors import CheckpointError

ENV = "SHARDCKPT_FAULT"

POINTS = (
    "after_agree",
    "after_plan",
    "mid_data_write",
    "after_data_fsync",
    "before_barrier_written",
    "after_barrier_written",
    "mid_index_write",
    "after_index_staged",
    "after_old_index_removed",
    "between_renames",
    "after_commit",
    "before_barrier_committed",
    "after_barrier_committed",
)
# Not a save's, so not in POINTS (the fault tests go through every one of those): a restore from a
# directory fires "after_latest_resolved" on client 0 once it read the state file, before it tells the others.

_hooks: list[Callable[[str, int], None]] = []


@contextlib.contextmanager
def hook(fn: Callable[[str, int], None]) -> Iterator[None]:
    """Call ``fn(point, client)`` at every fault point while the ``with`` block runs (in-process tests)."""
    _hooks.append(fn)
    try:
        yield
    finally:
        _hooks.remove(fn)


class InjectedFault(CheckpointError):
    """Raised at a fault point by request of ``SHARDCKPT_FAULT``."""


def fault_point(name: str, client: int) -> None:
    """Act as ``SHARDCKPT_FAULT`` (and any `hook`) asks at ``name`` on ``client``."""
    for fn in list(_hooks):
        fn(name, client)
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(";"):
        where, _, action = item.partition(":")
        point, _, who = where.partition("@")
        if point == name and who.isdigit() and int(who) == client:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
                continue
            if action.startswith("sleep="):
                time.sleep(float(action[6:]))
                continue
            raise InjectedFault(f"fault injected at {name} on client {client}")
