"""TensorFlow ``DataType`` values and the numpy dtypes that hold them in memory.

Every fixed-size type is stored as its in-memory bytes (little-endian).  The
narrow float and int4 types come from ``ml_dtypes``, whose int4/uint4 keep the
value in the low nibble of one byte, exactly as TensorFlow stores them.  It is
imported on the first use of such a type: some releases take most of a second
of CPU to import, which every client process and CLI call would pay for nothing.
Quantized types have no numpy twin: they read as their integer storage type and
are written back by naming the ``DataType`` explicitly.
"""

from __future__ import annotations

import enum
import sys
import threading

import numpy as np

from ..errors import UnsupportedDTypeError


class DataType(enum.IntEnum):
    """TensorFlow's ``DataType`` codes (types.proto), as stored in a `BundleEntry`'s ``dtype``."""
    FLOAT = 1
    DOUBLE = 2
    INT32 = 3
    UINT8 = 4
    INT16 = 5
    INT8 = 6
    STRING = 7
    COMPLEX64 = 8
    INT64 = 9
    BOOL = 10
    QINT8 = 11
    QUINT8 = 12
    QINT32 = 13
    BFLOAT16 = 14
    QINT16 = 15
    QUINT16 = 16
    UINT16 = 17
    COMPLEX128 = 18
    HALF = 19
    RESOURCE = 20
    VARIANT = 21
    UINT32 = 22
    UINT64 = 23
    FLOAT8_E5M2 = 24
    FLOAT8_E4M3FN = 25
    FLOAT8_E4M3FNUZ = 26
    FLOAT8_E4M3B11FNUZ = 27
    FLOAT8_E5M2FNUZ = 28
    INT4 = 29
    UINT4 = 30
    INT2 = 31
    UINT2 = 32
    FLOAT4_E2M1FN = 33


STRING_DTYPE = np.dtype(object)

_TO_NUMPY: dict[int, np.dtype] = {
    DataType.FLOAT: np.dtype("<f4"),
    DataType.DOUBLE: np.dtype("<f8"),
    DataType.INT32: np.dtype("<i4"),
    DataType.UINT8: np.dtype("u1"),
    DataType.INT16: np.dtype("<i2"),
    DataType.INT8: np.dtype("i1"),
    DataType.STRING: STRING_DTYPE,
    DataType.COMPLEX64: np.dtype("<c8"),
    DataType.INT64: np.dtype("<i8"),
    DataType.BOOL: np.dtype(bool),
    DataType.QINT8: np.dtype("i1"),
    DataType.QUINT8: np.dtype("u1"),
    DataType.QINT32: np.dtype("<i4"),
    DataType.QINT16: np.dtype("<i2"),
    DataType.QUINT16: np.dtype("<u2"),
    DataType.UINT16: np.dtype("<u2"),
    DataType.COMPLEX128: np.dtype("<c16"),
    DataType.HALF: np.dtype("<f2"),
    DataType.UINT32: np.dtype("<u4"),
    DataType.UINT64: np.dtype("<u8"),
}
# Codes held by ml_dtypes types, by attribute name (all in ml_dtypes >= 0.5; TensorFlow 2.21 saves INT2, UINT2
# and FLOAT4_E2M1FN one element per byte, value in the low bits, as ml_dtypes holds them).
_ML_NAMES = {DataType.BFLOAT16: "bfloat16", DataType.FLOAT8_E5M2: "float8_e5m2",
             DataType.FLOAT8_E4M3FN: "float8_e4m3fn", DataType.FLOAT8_E4M3FNUZ: "float8_e4m3fnuz",
             DataType.FLOAT8_E4M3B11FNUZ: "float8_e4m3b11fnuz", DataType.FLOAT8_E5M2FNUZ: "float8_e5m2fnuz",
             DataType.INT4: "int4", DataType.UINT4: "uint4", DataType.INT2: "int2", DataType.UINT2: "uint2",
             DataType.FLOAT4_E2M1FN: "float4_e2m1fn"}
# Bytes per element of every fixed-size type, known without importing ml_dtypes (readers check sizes with it).
ITEMSIZE: dict[int, int] = {int(code): dt.itemsize for code, dt in _TO_NUMPY.items() if code != DataType.STRING}
ITEMSIZE.update({int(code): 2 if code == DataType.BFLOAT16 else 1 for code in _ML_NAMES})
_ml_lock = threading.Lock()
_ml_loaded = False

_QUANTIZED = {DataType.QINT8, DataType.QUINT8, DataType.QINT32, DataType.QINT16, DataType.QUINT16}

# numpy dtype (native byte order) -> DataType; quantized types are never inferred.
_FROM_NUMPY: dict[np.dtype, DataType] = {
    dt.newbyteorder("="): DataType(code)
    for code, dt in _TO_NUMPY.items()
    if code not in _QUANTIZED and code != DataType.STRING
}
_FROM_NUMPY_SEEN: dict[object, DataType] = {}  # dtypes already resolved, as given


def _load_ml_dtypes() -> None:
    """Add the ml_dtypes types to both tables (once; the tables only ever grow, so readers need no lock)."""
    global _ml_loaded
    with _ml_lock:
        if _ml_loaded:
            return
        import ml_dtypes

        for code, name in _ML_NAMES.items():
            dt = np.dtype(getattr(ml_dtypes, name))
            _TO_NUMPY[code] = dt
            _FROM_NUMPY[dt.newbyteorder("=")] = code
        _ml_loaded = True


def datatype_name(code: int) -> str:
    """TensorFlow's name for a code, e.g. ``DT_FLOAT``; ``DataType(N)`` for an unknown code."""
    try:
        return "DT_" + DataType(code).name
    except ValueError:
        return f"DataType({code})"


def to_numpy(code: int) -> np.dtype:
    """The in-memory dtype of a stored ``DataType``; refuses variant, resource and unknown values."""
    dt = _TO_NUMPY.get(code)
    if dt is None and code in _ML_NAMES and not _ml_loaded:
        _load_ml_dtypes()
        dt = _TO_NUMPY.get(code)
    if dt is None:
        if code in (DataType.VARIANT, DataType.RESOURCE):
            raise UnsupportedDTypeError(
                f"{datatype_name(code)} tensors have no array form: they are listed, verified, diffed and copied as "
                "stored bytes, but cannot be read as arrays or saved from them"
            )
        raise UnsupportedDTypeError(f"unsupported or invalid {datatype_name(code)}")
    return dt


def from_numpy(dtype: np.dtype) -> DataType:
    """The ``DataType`` for a numpy dtype; bytes/str/object arrays are DT_STRING."""
    known = _FROM_NUMPY_SEEN.get(dtype)
    if known is not None:  # one dict lookup per tensor in saves of many small tensors
        return known
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return DataType.STRING
    code = _FROM_NUMPY.get(dtype.newbyteorder("="))
    if code is None and not _ml_loaded and "ml_dtypes" in sys.modules:
        # an ml_dtypes array can only exist once ml_dtypes is imported
        _load_ml_dtypes()
        code = _FROM_NUMPY.get(dtype.newbyteorder("="))
    if code is None:
        raise UnsupportedDTypeError(f"numpy dtype {dtype} has no TensorFlow DataType")
    if dtype.isnative:
        _FROM_NUMPY_SEEN[dtype] = code
    return code


def element_size(code: int) -> int:
    """Bytes per element on disk for a fixed-size type (0 for DT_STRING)."""
    if code == DataType.STRING:
        return 0
    size = ITEMSIZE.get(code)
    return to_numpy(code).itemsize if size is None else size
