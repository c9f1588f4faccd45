"""Pausing Python's cyclic garbage collector over the per-tensor loops of a save or restore.

A save of 100,000 small tensors allocates about a million short-lived tuples, lists and
entries.  Each 700 of them start a young-generation collection, and the objects that
survive long enough (the plan, the entries) start full collections that walk every
live object of the process, the caller's arrays and model included: on CPython 3.11
that came to more than the rest of the save put together.  None of these loops makes
reference cycles, so nothing is lost by not looking for them meanwhile; reference
counting still frees everything at once.  The pause covers stretches the calling thread
spends in these loops and their reads and writes (a blocking save's writing, a
restore), never a wait on other clients; it nests, is shared by threads, and leaves a
collector the application turned off alone.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was on when the outermost pause began


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Turn the cyclic collector off for the block (if it was on), and back on after the last such block."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
