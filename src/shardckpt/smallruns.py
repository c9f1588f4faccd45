"""Many small arrays on one client: consecutive ones planned, written and indexed as `TensorRun`s, in bulk.

On a save by one client that holds every device of the mesh, a whole numpy array (taken as replicated) is
always written whole, by this client, from its own memory: the plan's answer is known without asking
`plan_local` per tensor.  When the array is also C-ordered, small and of a dtype stored as is, the writer
needs no `PreparedTensor` either, and its index entry is a function of its name, dtype, shape, offset and
CRC alone.  Such arguments in a row (at least `MIN_RUN` of them, at most `RUN_BYTES` together) become one
`TensorRun`; every other argument goes through the general path, and the data file and the index are
byte-identical to what the general path writes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import numpy as np

from .format.dtypes import DataType, from_numpy, to_numpy
from .format.parallel_writer import GROUP
from .format.protos import BundleEntry
from .format.runs import TensorRun
from .plan import Owners, SaveTensor, WriteItem, check_disjoint_regions, plan_local

SMALL_BYTES = 64 << 10  # an array up to this size may join a run: its bytes are copied once into the run's buffer
RUN_BYTES = GROUP  # a run's bytes are one buffer, one write group of the general path
MIN_RUN = 16  # below this, a run's fixed numpy cost exceeds what it saves

Planned = WriteItem | TensorRun

_as_is: dict[np.dtype, bool] = {}


def _stored_as_is(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` hold their stored bytes as they are (what `format.writer.prepare` checks)."""
    found = _as_is.get(dtype)
    if found is None:
        code = from_numpy(dtype)
        found = (code != DataType.STRING and not dtype.hasobject and sys.byteorder == "little"
                 and dtype.byteorder in "=|<" and to_numpy(code).newbyteorder("=") == dtype.newbyteorder("="))
        if len(_as_is) < 256:
            _as_is[dtype] = found
    return found


def plan_with_runs(specs: Sequence[SaveTensor], values: Sequence[object], client: int,
                   owners: Owners) -> list[Planned]:
    """`plan_local`'s writes, in argument order, with runs of small plain arrays as `TensorRun`s.

    ``values[i]`` is argument i as `save._normalize` gave it: the numpy array itself for a whole array.
    """
    mesh = owners.mesh
    if owners.num_clients != 1 or not set(mesh.device_ids) <= set(owners.devices(client)):
        return list(plan_local(specs, client, owners))
    check_disjoint_regions(specs)  # over every argument: a slice elsewhere may name a run's tensor
    runs: list[tuple[int, int]] = []  # [first, end) of each run
    first, size = 0, 0
    as_is = _as_is.get
    for i, held in enumerate(values):
        if (type(held) is np.ndarray and held.nbytes <= SMALL_BYTES and held.flags.c_contiguous
                and (as_is(held.dtype) or _stored_as_is(held.dtype))):
            if size + held.nbytes <= RUN_BYTES:
                size += held.nbytes
                continue
            if i - first >= MIN_RUN:  # the run is full: this array starts the next
                runs.append((first, i))
            first, size = i, held.nbytes
            continue
        if i - first >= MIN_RUN:
            runs.append((first, i))
        first, size = i + 1, 0
    if len(values) - first >= MIN_RUN:
        runs.append((first, len(values)))
    if not runs:
        return list(plan_local(specs, client, owners))
    general_args = np.ones(len(values), bool)
    for start, end in runs:
        general_args[start:end] = False
    rest = np.flatnonzero(general_args).tolist()
    general = [it._replace(arg=rest[it.arg]) for it in plan_local([specs[a] for a in rest], client, owners)]
    out: list[Planned] = []
    at = 0
    for start, end in runs:
        while at < len(general) and general[at].arg < start:
            out.append(general[at])
            at += 1
        out.append(TensorRun([specs[a].name for a in range(start, end)], [specs[a].dtype for a in range(start, end)],
                             values[start:end]))  # type: ignore[arg-type]
    out.extend(general[at:])
    return out


def pack_written(items: Sequence[Planned], written: Sequence[BundleEntry], shard_id: int,
                 pack: Callable[[list[WriteItem], list[BundleEntry]], bytes]) -> bytes:
    """The index entries of a written plan: runs packed in bulk, ``pack`` for the general items' entries
    (``written``, one per general item, in order)."""
    out: list[bytes] = []
    general: list[WriteItem] = []
    at = 0
    for item in items:
        if type(item) is TensorRun:
            if general:
                out.append(pack(general, list(written[at : at + len(general)])))
                at += len(general)
                general = []
            out.append(item.pack(shard_id))
        else:
            general.append(item)  # type: ignore[arg-type]
    if general:
        out.append(pack(general, list(written[at : at + len(general)])))
    return b"".join(out)
