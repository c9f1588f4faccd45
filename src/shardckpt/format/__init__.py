"""The TensorFlow V2 checkpoint ("tensor bundle") format: bytes on disk only, no networking.

Modules, lowest first: `coding` (varints, masked CRC32C), `block` and `table`
(the SSTable of the ``.index``), `ordered_code` and `slices` (slice keys and
``shape_and_slice`` strings), `dtypes`, `protos` (the index's messages),
`strings` (DT_STRING layout), `files` (names), then `writer`, `reader`, `merge`.
"""

from .dtypes import DataType
from .files import data_filename, index_filename
from .merge import merge_bundles
from .protos import BundleEntry, BundleHeader, VersionDef
from .reader import BundleReader, StoredSlice
from .slices import ShapeAndSlice, TensorSlice, decode_slice_key, encode_slice_key, parse_shape_and_slice
from .writer import BundleWriter, DataFileWriter, build_index, prepare

__all__ = [
    "BundleEntry",
    "BundleHeader",
    "BundleReader",
    "BundleWriter",
    "DataFileWriter",
    "DataType",
    "ShapeAndSlice",
    "StoredSlice",
    "TensorSlice",
    "VersionDef",
    "build_index",
    "data_filename",
    "decode_slice_key",
    "encode_slice_key",
    "index_filename",
    "merge_bundles",
    "parse_shape_and_slice",
    "prepare",
]
