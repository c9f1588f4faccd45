"""shardckpt: save and restore sharded tensors from many processes, in TensorFlow's V2 checkpoint format."""

from .checkpoint_reader import CheckpointReader, latest_checkpoint, list_variables, load_checkpoint, load_variable
from .coordination import Coordinator, LocalGroup
from .dtensor import DTensor, pack, unpack
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ClientTimeoutError,
    CoordinationError,
    CorruptCheckpointError,
    DTypeMismatchError,
    DuplicateTensorError,
    EngineNotInitializedError,
    InsufficientSlicesError,
    InvalidArgumentError,
    MismatchedCallError,
    NotARegularFileError,
    OutcomeUnknownError,
    PrefixBusyError,
    RemoteClientError,
    ShapeMismatchError,
    TensorNotFoundError,
    TruncatedFileError,
    UnsupportedDTypeError,
)
from .format import BundleReader, BundleWriter, DataType, merge_bundles
from .layout import UNSHARDED, Layout
from .manager import CheckpointManager
from .mesh import Mesh, create_mesh
from .restore import name_based_restore, sharded_restore
from .save import SaveFuture, SaveResult, name_based_save, release_staging_memory, sharded_save, wait_for_pending_save

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "Coordinator",
    "DTensor",
    "Layout",
    "LocalGroup",
    "Mesh",
    "SaveFuture",
    "SaveResult",
    "UNSHARDED",
    "create_mesh",
    "name_based_restore",
    "name_based_save",
    "pack",
    "release_staging_memory",
    "sharded_restore",
    "sharded_save",
    "unpack",
    "wait_for_pending_save",
    "BundleReader",
    "BundleWriter",
    "CheckpointError",
    "CheckpointExistsError",
    "ClientTimeoutError",
    "CoordinationError",
    "MismatchedCallError",
    "RemoteClientError",
    "OutcomeUnknownError",
    "EngineNotInitializedError",
    "PrefixBusyError",
    "CheckpointIOError",
    "NotARegularFileError",
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
    "load_variable",
    "merge_bundles",
]
