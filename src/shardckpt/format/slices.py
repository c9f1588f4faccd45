"""Tensor slices: TF's ``TensorSlice``, the ``shape_and_slice`` string, and slice keys.

A slice has one extent per dimension, ``(start, length)``, where ``length == -1``
means the whole dimension.  That distinction is kept as written: ``"-"`` and
``"0,6"`` on a dimension of 6 select the same elements but serialize differently,
and byte-exactness with TensorFlow needs the difference.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CorruptCheckpointError, InvalidArgumentError
from . import ordered_code as oc

FULL = -1
_INT64_MAX = (1 << 63) - 1
_WHITESPACE = " \t\n\v\f\r"


def parse_int64(text: str) -> int | None:
    """TF's ``safe_strto64`` (absl ``SimpleAtoi``): optional spaces and sign, base-10 digits, int64 range."""
    text = text.strip(_WHITESPACE)
    digits = text[1:] if text[:1] in "+-" else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(text)
    return value if -(1 << 63) <= value <= _INT64_MAX else None


@dataclass(frozen=True)
class TensorSlice:
    """TF's ``TensorSlice``: one ``(start, length)`` extent per dimension, ``length == FULL`` for the whole of it."""
    extents: tuple[tuple[int, int], ...]

    @classmethod
    def full(cls, rank: int) -> TensorSlice:
        """The slice of a rank-``rank`` tensor that selects everything: ``-`` in every dimension."""
        return cls(((0, FULL),) * rank)

    @classmethod
    def from_bounds(cls, bounds: Sequence[tuple[int, int]]) -> TensorSlice:
        """The slice of the half-open box ``bounds``, with explicit extents (never `FULL`)."""
        return cls(tuple((int(a), int(b) - int(a)) for a, b in bounds))

    @classmethod
    def parse(cls, spec: str) -> TensorSlice:
        """TF's ``TensorSlice::Parse``: ``"-"`` or ``"start,length"`` per dim, joined by ``:``."""
        extents = []
        for piece in (p for p in spec.split(":") if p):
            if piece == "-":
                extents.append((0, FULL))
                continue
            numbers = [p for p in piece.split(",") if p]
            values = [parse_int64(p) for p in numbers]
            if len(values) != 2 or values[0] is None or values[1] is None:
                raise InvalidArgumentError(
                    f"Expected a pair of numbers or '-' but got '{piece}': string = {spec}"
                )
            start, length = values[0], values[1]
            if start < 0 or length <= 0:
                raise InvalidArgumentError(
                    "Expected non-negative start and positive length but got "
                    f"start = {start}, length = {length}: string = {spec}"
                )
            if start > _INT64_MAX - length:
                raise InvalidArgumentError(f"Extent overflows int64: start = {start}, length = {length}")
            extents.append((start, length))
        return cls(tuple(extents))

    @property
    def rank(self) -> int:
        """The number of dimensions."""
        return len(self.extents)

    def is_full_at(self, d: int) -> bool:
        """Whether dimension ``d`` is written as the whole dimension (``-``)."""
        return self.extents[d][1] == FULL

    def is_full(self) -> bool:
        """Whether every dimension is written as ``-`` (see `covers` for selecting every element)."""
        return all(length == FULL for _, length in self.extents)

    def bounds(self, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Half-open ``[start, stop)`` per dim, with full extents resolved against ``shape``."""
        return tuple(
            (0, dim) if length == FULL else (start, start + length)
            for (start, length), dim in zip(self.extents, shape)
        )

    def slice_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """TF's ``SliceTensorShape``: the shape this slice selects, with TF's checks."""
        if len(shape) != self.rank:
            raise InvalidArgumentError(
                f"Mismatching ranks: shape = {list(shape)}, slice = {self.to_string()}"
            )
        out = []
        for d, ((start, length), dim) in enumerate(zip(self.extents, shape)):
            if length == FULL:
                out.append(dim)
            elif start + length > dim:
                raise InvalidArgumentError(
                    f"Extent in dimension {d} out of bounds: shape = {list(shape)}, slice = {self.to_string()}"
                )
            else:
                out.append(length)
        return tuple(out)

    def covers(self, shape: Sequence[int]) -> bool:
        """True when the slice selects every element (TF's ``IsFullSlice``)."""
        return self.slice_shape(shape) == tuple(shape)

    def to_string(self) -> str:
        """The ``TensorSlice::DebugString`` form parsed by `parse`, e.g. ``-:0,2``."""
        return ":".join("-" if n == FULL else f"{s},{n}" for s, n in self.extents)

    def __str__(self) -> str:
        return self.to_string()


def intersect_bounds(
    a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int], ...] | None:
    """The overlap of two boxes, or None when they share no element (an empty box never overlaps)."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


Box = tuple[tuple[int, int], ...]


def find_overlap(boxes: Sequence[Box]) -> tuple[Box, Box] | None:
    """Two of ``boxes`` (half-open, one rank) that share an element, or None when they are pairwise disjoint.

    Dims on which every box has the same extent cannot tell any two apart, so only the others count.
    With one such dim, sorted neighbours are the only candidates; with two, a sweep along one keeps the
    boxes crossing the sweep line ordered along the other (they must be disjoint there) and checks a new
    box against its two neighbours only: O(n log n) either way, the layouts checkpoints use (row, column
    or 2-D grid partitions of any rank).  With more, each box is compared with every box crossing the
    sweep line of the dim with the most distinct starts: O(n * k) for k such boxes.
    """
    live = [tuple(b) for b in boxes if all(lo < hi for lo, hi in b)]  # an empty box holds no element
    if len(live) < 2:
        return None
    first = live[0]
    dims = [d for d in range(len(first)) if any(b[d] != first[d] for b in live)]
    if not dims:  # identical boxes (or scalars): the same elements
        return first, live[1]
    if len(dims) == 1:
        d = dims[0]
        ordered = sorted(live, key=lambda b: b[d])
        for a, b in zip(ordered, ordered[1:]):
            if intersect_bounds(a, b) is not None:
                return a, b
        return None
    if len(dims) == 2:
        return _sweep_2d(live, dims[0], dims[1])
    return _sweep_any(live, max(dims, key=lambda d: len({b[d][0] for b in live})))


def _sweep_2d(boxes: list[Box], a: int, b: int) -> tuple[Box, Box] | None:
    starts: list[int] = []  # dim-b starts of the boxes crossing the sweep line, sorted (they are disjoint in b)
    crossing: list[Box] = []
    ends: list[tuple[int, int]] = []  # heap of (dim-a end, dim-b start) of those boxes
    for box in sorted(boxes, key=lambda x: x[a][0]):
        while ends and ends[0][0] <= box[a][0]:
            _, start = heapq.heappop(ends)
            i = bisect.bisect_left(starts, start)
            del starts[i], crossing[i]
        i = bisect.bisect_right(starts, box[b][0])
        for j in (i - 1, i):
            if 0 <= j < len(crossing) and intersect_bounds(crossing[j], box) is not None:
                return crossing[j], box
        starts.insert(i, box[b][0])
        crossing.insert(i, box)
        heapq.heappush(ends, (box[a][1], box[b][0]))
    return None


def _sweep_any(boxes: list[Box], a: int) -> tuple[Box, Box] | None:
    crossing: dict[int, Box] = {}
    ends: list[tuple[int, int]] = []
    for n, box in enumerate(sorted(boxes, key=lambda x: x[a][0])):
        while ends and ends[0][0] <= box[a][0]:
            del crossing[heapq.heappop(ends)[1]]
        for other in crossing.values():
            if intersect_bounds(other, box) is not None:
                return other, box
        crossing[n] = box
        heapq.heappush(ends, (box[a][1], n))
    return None


def box_volume(bounds: Sequence[tuple[int, int]]) -> int:
    """The number of elements in the half-open box ``bounds``."""
    return math.prod(hi - lo for lo, hi in bounds)


@dataclass(frozen=True)
class ShapeAndSlice:
    """A parsed ``shape_and_slice`` string: the full ``shape``, the ``slice``, and the shape the slice selects."""
    shape: tuple[int, ...]
    slice: TensorSlice
    slice_shape: tuple[int, ...]


def parse_shape_and_slice(text: str) -> ShapeAndSlice:
    """Parse SaveV2/RestoreV2's ``"<d0> <d1> ... <slice>"`` with TF's acceptance rules."""
    pieces = text.split(" ")
    if len(pieces) < 2:
        raise InvalidArgumentError(f"Need least two elements in shape_and_slice specification: {text}")
    tslice = TensorSlice.parse(pieces[-1])
    shape = []
    for piece in pieces[:-1]:
        dim = parse_int64(piece)
        if dim is None:
            raise InvalidArgumentError(f"Non numerical dimension in shape_and_slice: {text}")
        if dim < 0:
            raise InvalidArgumentError(f"Negative dimension {dim} in shape_and_slice: {text}")
        shape.append(dim)
    check_shape(shape, f"shape_and_slice {text!r}")
    return ShapeAndSlice(tuple(shape), tslice, tslice.slice_shape(shape))


def check_shape(shape: Sequence[int], what: str, error: type[Exception] = InvalidArgumentError) -> int:
    """Validate dims and return the element count, refusing counts that overflow int64."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise error(f"{what}: negative dimension in shape {list(shape)}")
        count *= dim
    if count > _INT64_MAX:
        raise error(f"{what}: shape {list(shape)} has more than 2^63-1 elements")
    return count


def encode_slice_key(name: bytes, tslice: TensorSlice) -> bytes:
    """TF's ``EncodeTensorNameSlice``: 0, the name, the rank, then (start, length) per dim (full: 0, -1)."""
    parts = [oc.encode_num_increasing(0), oc.encode_string(name), oc.encode_num_increasing(tslice.rank)]
    for start, length in tslice.extents:
        if length == FULL:
            parts.append(b"\x80\x7f")  # (0, -1)
        else:
            parts.append(oc.encode_signed_num_increasing(start))
            parts.append(oc.encode_signed_num_increasing(length))
    return b"".join(parts)


def decode_slice_key(key: bytes) -> tuple[bytes, TensorSlice]:
    """Inverse of `encode_slice_key`, with TF's checks (leading 0, 0 < rank < 2^31-1)."""
    lead, pos = oc.decode_num_increasing(key, 0)
    if lead != 0:
        raise CorruptCheckpointError(f"slice key {key!r} does not start with 0")
    name, pos = oc.decode_string(key, pos)
    rank, pos = oc.decode_num_increasing(key, pos)
    if not 0 < rank < (1 << 31) - 1 or rank > len(key):
        raise CorruptCheckpointError(f"slice key {key!r} has bad rank {rank}")
    extents = []
    for _ in range(rank):
        start, pos = oc.decode_signed_num_increasing(key, pos)
        length, pos = oc.decode_signed_num_increasing(key, pos)
        extents.append((0, FULL) if length < 0 else (start, length))
    return name, TensorSlice(tuple(extents))
