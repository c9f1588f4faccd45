"""The one exception family of shardckpt.

Every failure the library reports on purpose is a `CheckpointError`.  The
subclasses also derive from the closest built-in exception so that code written
for plain Python (``except ValueError``, ``except FileNotFoundError``) keeps
working.  Messages name the prefix, the tensor and the file where they are known.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error shardckpt raises on purpose."""


class InvalidArgumentError(CheckpointError, ValueError):
    """A caller passed something malformed (a slice spec, a shape, a name)."""


class DuplicateTensorError(InvalidArgumentError):
    """The same tensor name (or the same slice of it) was added twice."""


class UnsupportedDTypeError(CheckpointError, TypeError):
    """A dtype that a V2 checkpoint cannot hold, or that shardckpt refuses (variant, resource)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the prefix, or a data file it names is missing."""


class TensorNotFoundError(CheckpointError, LookupError):
    """The checkpoint has no tensor of that name."""


class CorruptCheckpointError(CheckpointError):
    """The bytes on disk are not a valid checkpoint (TensorFlow's DataLoss)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A block or tensor checksum does not match the bytes read."""


class TruncatedFileError(CorruptCheckpointError):
    """A file ends before a structure it must hold."""


class InsufficientSlicesError(CheckpointError, LookupError):
    """The stored slices of a partitioned tensor do not cover the requested region."""


class ShapeMismatchError(InvalidArgumentError):
    """A requested or supplied shape disagrees with the checkpoint."""


class DTypeMismatchError(InvalidArgumentError):
    """A requested or supplied dtype disagrees with the checkpoint."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists at the prefix and ``overwrite`` was not given."""


class CoordinationError(CheckpointError):
    """The clients of a save or restore could not agree or communicate."""


class ClientTimeoutError(CoordinationError, TimeoutError):
    """Some clients did not arrive at a barrier within the timeout; the message names them."""


class MismatchedCallError(CoordinationError):
    """Clients called a collective save with different arguments."""


class RemoteClientError(CoordinationError):
    """Another client failed; this client stops too (the message carries the other client's error)."""


class OutcomeUnknownError(CoordinationError):
    """Client 0 passed the commit point of a save but its outcome never reached this client.

    The checkpoint may or may not have been published: look at the prefix (``P.index`` present means it
    was).  Distinct from a failure, which guarantees nothing was published.  Every client, client 0 too,
    raises it when client 0's commit failed past its commit point: the checkpoint is then complete on disk
    and ``shardckpt clean`` or the next save to the prefix publishes it.
    """


class EngineNotInitializedError(CoordinationError):
    """The environment says this process is one of many, but no engine is initialised to reach the others."""


class PrefixBusyError(CheckpointError):
    """Another live save (or tool) holds the prefix; the message names the holder."""


class CheckpointIOError(CheckpointError, OSError):
    """The operating system refused a read or write (disk full, permissions, not a directory ...).

    Names the prefix and the file; the original `OSError` is the ``__cause__`` and its ``errno`` is kept.
    """


class NotARegularFileError(CheckpointError):
    """A checkpoint file is a FIFO, a device, a directory or another special file: it is never opened."""


__all__ = [
    "CheckpointExistsError",
    "CoordinationError",
    "ClientTimeoutError",
    "MismatchedCallError",
    "RemoteClientError",
    "OutcomeUnknownError",
    "EngineNotInitializedError",
    "PrefixBusyError",
    "CheckpointIOError",
    "NotARegularFileError",
    "CheckpointError",
    "InvalidArgumentError",
    "DuplicateTensorError",
    "UnsupportedDTypeError",
    "CheckpointNotFoundError",
    "TensorNotFoundError",
    "CorruptCheckpointError",
    "ChecksumMismatchError",
    "TruncatedFileError",
    "InsufficientSlicesError",
    "ShapeMismatchError",
    "DTypeMismatchError",
]
