"""Compare two sets of tensors (checkpoints or safetensors files): names, dtypes, shapes and values.

Two tensors are equal when they have the same dtype and shape and every element
is equal by value (NaN equals NaN at the same position; ``-0.0`` equals ``0.0``;
complex numbers compare their real and imaginary parts each that way, as
``np.array_equal(..., equal_nan=True)`` on ``.real`` and on ``.imag``),
or, with ``atol``, when no element differs by more than ``atol``.  The maximum
absolute difference is computed for every pair of common tensors of the same
shape whose values are numbers, even across dtypes (in float64, complex128 or,
for integers, exactly); it is ``nan`` where one side has a NaN the other lacks
(in the same component, for complex numbers).  Names are compared as the exact
bytes stored: ``"\\x00x"`` and ``"x"`` are two names.
Values are compared in chunks, so memory stays near the size of the two tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from .convert import Progress, TensorInfo, open_source

_CHUNK = 1 << 20  # elements compared at a time


@dataclass
class TensorDiff:
    """How one tensor present on both sides compares."""

    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    equal: bool
    max_abs_diff: float | int | None = None
    differing_elements: int | None = None
    note: str = ""

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (non-finite differences as the strings ``"nan"`` and ``"inf"``)."""
        value: object = self.max_abs_diff
        if isinstance(value, float) and not math.isfinite(value):
            value = "nan" if math.isnan(value) else "inf"
        return {"name": self.name, "equal": self.equal, "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "shape_a": list(self.shape_a), "shape_b": list(self.shape_b), "max_abs_diff": value,
                "differing_elements": self.differing_elements, "note": self.note}


@dataclass
class DiffReport:
    """The comparison of two sources: names on one side only, and every common tensor."""

    a: str
    b: str
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)
    atol: float = 0.0

    @property
    def identical(self) -> bool:
        """No name on one side only and every common tensor equal."""
        return not self.only_in_a and not self.only_in_b and all(t.equal for t in self.tensors)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"a": self.a, "b": self.b, "identical": self.identical, "atol": self.atol,
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "tensors": [t.to_json() for t in self.tensors]}


def _int_absdiff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| for integer (or bool) arrays, exact, as uint64."""
    if (a.dtype.kind == "u" and b.dtype.kind == "u") or (a.dtype.kind == "b" and b.dtype.kind == "b"):
        x, y = a.astype(np.uint64), b.astype(np.uint64)
        return np.where(x >= y, x - y, y - x)
    # Mixed or signed: values fit int64 except uint64 above 2^63-1, which Python ints handle.
    if (a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max) or (
            b.dtype == np.uint64 and b.size and b.max() > np.iinfo(np.int64).max):
        out = np.array([abs(int(p) - int(q)) for p, q in zip(a.tolist(), b.tolist())], dtype=np.uint64)
        return out
    x, y = a.astype(np.int64), b.astype(np.int64)
    with np.errstate(over="ignore"):
        d = np.where(x >= y, x - y, y - x)  # wraps past 2^63-1; read back as unsigned it is exact
    return d.view(np.uint64)


def _compare_chunk(a: np.ndarray, b: np.ndarray) -> tuple[float | int | None, int]:
    """(max |a-b| of the chunk, number of unequal elements)."""
    if a.dtype == object or b.dtype == object:
        if a.dtype != b.dtype:
            return None, int(a.size)
        return None, int(np.count_nonzero(a != b))
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        d = _int_absdiff(a, b)
        return (int(d.max()) if d.size else 0), int(np.count_nonzero(d))
    if a.dtype.kind == "c" or b.dtype.kind == "c":
        # np.isnan of a complex number is true if either part is NaN, so nan+1j would equal nan+2j:
        # compare the parts separately.
        x, y = a.astype(np.complex128), b.astype(np.complex128)
        (same_re, gap_re, lone_re), (same_im, gap_im, lone_im) = _parts(x.real, y.real), _parts(x.imag, y.imag)
        same = same_re & same_im
        unequal = int(np.count_nonzero(~same))
        if lone_re or lone_im:
            return math.nan, unequal
        d = np.hypot(gap_re, gap_im)
        return (float(d.max()) if d.size else 0.0), unequal
    same, gap, lone = _parts(a.astype(np.float64), b.astype(np.float64))
    unequal = int(np.count_nonzero(~same))
    if lone:
        return math.nan, unequal
    return (float(gap.max()) if gap.size else 0.0), unequal


def _parts(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """For real arrays: where they are equal (NaN equal to NaN), |x-y| elsewhere (0 where equal), and
    whether one side has a NaN where the other has none."""
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    same = (x == y) | (nan_x & nan_y)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.where(same, 0.0, np.abs(x - y))
    return same, gap, bool(np.any(nan_x != nan_y))


def _compare(a: np.ndarray, b: np.ndarray) -> tuple[float | int | None, int]:
    fa, fb = a.reshape(-1), b.reshape(-1)
    best: float | int | None = 0
    unequal = 0
    for start in range(0, fa.size, _CHUNK):
        m, n = _compare_chunk(fa[start : start + _CHUNK], fb[start : start + _CHUNK])
        unequal += n
        if m is None or best is None:
            best = None
        elif isinstance(m, float) and math.isnan(m) or isinstance(best, float) and math.isnan(best):
            best = math.nan
        else:
            best = max(best, m)
    if a.dtype == object or b.dtype == object:
        best = None
    elif a.dtype.kind not in "iub" or b.dtype.kind not in "iub":
        best = float(best) if best is not None else None
    return best, unequal


def _numeric(info: TensorInfo) -> bool:
    return info.numpy_dtype is not None and info.numpy_dtype != np.dtype(object)


def diff_tensors(a: str | os.PathLike[str], b: str | os.PathLike[str], *, atol: float = 0.0,
                 progress: Progress | None = None) -> DiffReport:
    """Compare every tensor of ``a`` with ``b`` (each a checkpoint prefix, a checkpoint directory, or a
    ``.safetensors`` file).  ``progress(bytes, total)`` is called as tensors are read."""
    with open_source(a) as src_a, open_source(b) as src_b:
        ta, tb = src_a.tensors(), src_b.tensors()
        report = DiffReport(src_a.path, src_b.path, atol=float(atol))
        report.only_in_a = sorted(set(ta) - set(tb))
        report.only_in_b = sorted(set(tb) - set(ta))
        common = sorted(set(ta) & set(tb))
        total = sum(ta[n].nbytes + tb[n].nbytes for n in common)
        for name in common:
            ia, ib = ta[name], tb[name]
            d = TensorDiff(name, ia.dtype, ib.dtype, ia.shape, ib.shape, equal=False)
            notes = []
            if ia.dtype != ib.dtype:
                notes.append("dtypes differ")
            if ia.shape != ib.shape:
                notes.append("shapes differ")
            readable = ia.numpy_dtype is not None and ib.numpy_dtype is not None
            raw_a = getattr(src_a, "read_raw", None) if not readable and ia.tf_dtype == ib.tf_dtype else None
            raw_b = getattr(src_b, "read_raw", None) if raw_a is not None else None
            if raw_a is not None and raw_b is not None and ia.shape == ib.shape:  # DT_VARIANT: the stored bytes
                ba, bb = raw_a(name), raw_b(name)
                if ba is None or bb is None:
                    notes.append("cannot be read")
                else:
                    d.equal = ba == bb
                    notes.append("stored bytes " + ("identical" if d.equal else "differ"))
            elif not readable:
                notes.append("cannot be read")
            elif ia.shape == ib.shape and (ia.dtype == ib.dtype or (_numeric(ia) and _numeric(ib))):
                va, vb = src_a.read(name), src_b.read(name)
                d.max_abs_diff, d.differing_elements = _compare(va, vb)
                del va, vb
                within = d.differing_elements == 0
                if not within and atol > 0 and d.max_abs_diff is not None:
                    within = not math.isnan(d.max_abs_diff) and d.max_abs_diff <= atol
                d.equal = within and ia.dtype == ib.dtype
                if d.differing_elements and not notes:
                    notes.append(f"{d.differing_elements} element(s) differ" + (" (within atol)" if within else ""))
            d.note = "; ".join(notes)
            report.tensors.append(d)
            if progress is not None:
                progress(ia.nbytes + ib.nbytes, total)
    return report
