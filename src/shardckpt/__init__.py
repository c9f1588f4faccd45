"""shardckpt: save and restore sharded tensors from many processes, in TensorFlow's V2 checkpoint format."""

from .checkpoint_reader import CheckpointReader, latest_checkpoint, list_variables, load_checkpoint
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    DTypeMismatchError,
    DuplicateTensorError,
    InsufficientSlicesError,
    InvalidArgumentError,
    ShapeMismatchError,
    TensorNotFoundError,
    TruncatedFileError,
    UnsupportedDTypeError,
)
from .format import BundleReader, BundleWriter, DataType, merge_bundles

__version__ = "0.1.0"

__all__ = [
    "BundleReader",
    "BundleWriter",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "DTypeMismatchError",
    "DataType",
    "DuplicateTensorError",
    "InsufficientSlicesError",
    "InvalidArgumentError",
    "ShapeMismatchError",
    "TensorNotFoundError",
    "TruncatedFileError",
    "UnsupportedDTypeError",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "merge_bundles",
]
