"""A TensorFlow-style reader: ``load_checkpoint`` and ``list_variables`` over a bundle.

Mirrors ``tf.train.load_checkpoint`` so code written against TensorFlow ports by
changing the import: a prefix, a path to its ``.index`` or a directory holding a
``checkpoint`` state file are all accepted.
"""

from __future__ import annotations

import codecs
import os
import re

import numpy as np

from .errors import CheckpointNotFoundError
from .format.dtypes import to_numpy
from .format.reader import BundleReader
from .storage import read_regular

_STATE_LINE = re.compile(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"\s*$', re.MULTILINE)


def unescape_text_proto(literal: str) -> str:
    """The value of a text-format protobuf string literal's body: escapes (``\\"``, octal bytes) decoded, UTF-8 kept."""
    raw = codecs.escape_decode(literal.encode("utf-8"))[0]  # ValueError for a malformed escape
    return raw.decode("utf-8")  # UnicodeDecodeError (a ValueError) for bytes that are not UTF-8


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
    """The prefix named by ``directory/checkpoint`` (TensorFlow's state file), or None."""
    path = os.path.join(os.fspath(directory), "checkpoint")
    try:
        # A regular file only, read up to its size: a FIFO there must not hang the caller.
        text = read_regular(path)[0].decode("utf-8")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
        return None
    match = _STATE_LINE.search(text)
    if match is None:
        return None
    try:
        name = unescape_text_proto(match.group(1))
    except ValueError:
        return None  # a malformed state file names no checkpoint
    prefix = name if os.path.isabs(name) else os.path.join(os.fspath(directory), name)
    return prefix if os.path.exists(prefix + ".index") else None


def _resolve(prefix: str | os.PathLike[str]) -> str:
    text = os.fspath(prefix)
    if os.path.isdir(text) and not os.path.exists(text + ".index"):
        found = latest_checkpoint(text)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint found in directory {text}")
        return found
    return text


class CheckpointReader:
    """What ``tf.train.load_checkpoint`` returns, for shardckpt and TensorFlow checkpoints alike."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self._bundle = BundleReader(_resolve(prefix))
        self.prefix = self._bundle.prefix

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """Name to shape of every tensor (per-slice keys of partitioned tensors excluded)."""
        return {name: list(e.shape) for name, e in self._bundle.entries()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype]:
        """Name to numpy dtype (``object`` for DT_STRING, ml_dtypes for bfloat16/float8/int4)."""
        return {name: to_numpy(e.dtype) for name, e in self._bundle.entries()}

    def has_tensor(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor called ``name``."""
        return self._bundle.has_tensor(name)

    def get_tensor(self, name: str) -> np.ndarray:
        """The whole tensor, CRC32C checked; raises `TensorNotFoundError` if there is no such name."""
        return self._bundle.read(name)

    def get_slice(self, name: str, shape_and_slice: str) -> np.ndarray:
        """A slice as RestoreV2 takes it, e.g. ``"4 6 0,2:-"``."""
        return self._bundle.read_slice(name, shape_and_slice)

    @property
    def bundle(self) -> BundleReader:
        """The underlying `BundleReader`, for slice-level and raw access."""
        return self._bundle

    def close(self) -> None:
        """Close the data files opened so far."""
        self._bundle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint(prefix: str | os.PathLike[str]) -> CheckpointReader:
    """A reader for the checkpoint at ``prefix`` (or the latest one in a directory), as ``tf.train.load_checkpoint``.

    Raises `CheckpointNotFoundError` when there is none.
    """
    return CheckpointReader(prefix)


def list_variables(prefix: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """``(name, shape)`` of every tensor, sorted by name, as ``tf.train.list_variables``."""
    with CheckpointReader(prefix) as reader:
        return sorted(reader.get_variable_to_shape_map().items())
