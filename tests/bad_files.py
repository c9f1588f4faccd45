"""Helpers of the tests that hand readers damaged or hostile checkpoint files (test_bad_input,
test_hostile_files): where a prefix's index and data files are, and a check for one exact error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shardckpt import CheckpointError
from shardckpt.format import data_filename, index_filename


def idx(prefix: Path) -> Path:
    return Path(index_filename(str(prefix)))


def dat(prefix: Path, shard: int = 0, num: int = 1) -> Path:
    return Path(data_filename(str(prefix), shard, num))


def raises(exc_type: type[BaseException], fn: Callable[..., object], *args: object,
           names: tuple[str, ...] = (), **kwargs: object) -> BaseException:
    """Call ``fn`` and require exactly ``exc_type`` (not a parent) with every string of ``names`` in the message."""
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert type(err) is exc_type, f"expected {exc_type.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    for name in names:
        assert name in message, f"{name!r} not in error message {message!r}"
    return err
