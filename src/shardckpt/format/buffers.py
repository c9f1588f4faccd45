"""Zero-copy views of array memory for vectored I/O (``pwritev`` / ``preadv``)."""

from __future__ import annotations

import numpy as np

IOV_MAX = 1024  # iovecs per system call (Linux's limit)


def rows_of(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` as a 2-D view ``(rows, elements per row)`` whose rows are each contiguous in memory, in
    row-major order, or None when no such view exists without a copy.

    Callers that gather rows into a buffer need only this view (one numpy object), not a buffer per row:
    building thousands of per-row memoryviews cost more than the copy they fed.
    """
    if arr.ndim == 0 or arr.size == 0:
        return arr.reshape(1, -1) if arr.size else None
    rows = arr.view()
    try:
        rows.shape = (-1, arr.shape[-1])  # raises when the rows cannot be viewed without a copy
    except AttributeError:
        return None
    if rows.shape[1] > 1 and rows.strides[1] != arr.itemsize:
        return None
    return rows


def byte_views(arr: np.ndarray, min_row: int = 4096) -> list[memoryview] | None:
    """The array's bytes in row-major order as buffers over its own memory, or None if that needs a copy.

    One buffer for a C-contiguous array; one per row for a strided view whose rows are contiguous and at
    least ``min_row`` bytes (a column block of a matrix); None otherwise.
    """
    if arr.size == 0:
        return []
    if arr.flags.c_contiguous:
        return [arr.reshape(-1).view(np.uint8).data]
    if arr.ndim < 2:
        return None
    rows = rows_of(arr)
    if rows is None or rows.shape[1] * arr.itemsize < min_row:
        return None
    return [r.view(np.uint8).data for r in rows]
