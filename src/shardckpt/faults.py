"""Named fault points in the save path, for tests that kill or fail one client at a chosen moment.

``SHARDCKPT_FAULT="<point>@<client>:<kill|raise>"`` (several separated by ``;``)
makes client ``<client>`` SIGKILL itself, or raise `InjectedFault`, when it reaches
``<point>``.  Unset (always, outside tests), a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

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


class InjectedFault(CheckpointError):
    """Raised at a fault point by request of ``SHARDCKPT_FAULT``."""


def fault_point(name: str, client: int) -> None:
    """SIGKILL this process or raise `InjectedFault` if ``SHARDCKPT_FAULT`` asks for it at ``name`` on ``client``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(";"):
        where, _, action = item.partition(":")
        point, _, who = where.partition("@")
        if point == name and who.isdigit() and int(who) == client:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"fault injected at {name} on client {client}")
