"""``sharded_restore``: each client reads only the stored byte ranges its own target shards need.

No collective is needed for a prefix: the checkpoint is immutable once its index
exists, and every client computes its shards from the target layouts.  Shards of
the same box on several local devices (replication) are read once and shared.

A directory holding TensorFlow's ``checkpoint`` state file stands for its latest
checkpoint (`agreed_prefix`): then client 0 reads the state file and tells the
others, one broadcast, so that clients whose views of a shared directory differ
for a moment, or a save publishing while they start, cannot restore different steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .checkpoint_reader import resolve_checkpoint
from .coordination import Coordinator, default_timeout, resolve
from .dtensor import DTensor
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DTypeMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
)
from .faults import fault_point
from .format.dtypes import DataType, to_numpy
from .format.protos import BundleEntry
from .format.reader import BundleReader, Verify
from .format.slices import parse_shape_and_slice
from .gcpause import paused_gc
from .layout import Layout
from .mesh import Mesh

_POOL_BYTES = 1 << 20  # pieces this large are read by the thread pool


def is_checkpoint_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory that is not itself a prefix: it stands for its latest checkpoint."""
    text = os.fspath(path)
    return os.path.isdir(text) and not os.path.exists(text + ".index")


def agreed_prefix(path: str | os.PathLike[str], coordinator: Coordinator | None = None,
                  timeout: float | None = None) -> str:
    """The checkpoint ``path`` names, the same on every client.

    A prefix is returned as given, with no collective.  A directory (`is_checkpoint_directory`) is a
    collective that every client calls: client 0 resolves it (TensorFlow's ``checkpoint`` state file, as
    ``tf.train.latest_checkpoint``) and broadcasts the answer relative to the directory, which each client
    joins to its own ``path`` (mount points may differ).  Raises `CheckpointNotFoundError` on every client
    when the directory names no existing checkpoint.
    """
    text = os.fspath(path)
    if not is_checkpoint_directory(text):
        return text
    coord = resolve(coordinator)
    if coord.size == 1:
        return resolve_checkpoint(text)
    wait = default_timeout(timeout)
    answer: bytes | None = None
    if coord.rank == 0:
        try:
            found: str | None = resolve_checkpoint(text)
            error = None
        except CheckpointError as exc:
            found, error = None, str(exc)
        fault_point("after_latest_resolved", 0)
        if found is not None:
            relative = os.path.relpath(found, text)
            found = relative if not relative.startswith(os.pardir) else found
        answer = json.dumps({"prefix": found, "error": error}).encode()
    with coord.session("restore-latest") as session:
        reply = json.loads(session.broadcast("latest", answer, wait))
    if reply.get("error") or not isinstance(reply.get("prefix"), str):
        raise CheckpointNotFoundError(f"{text}: {reply.get('error') or 'client 0 found no checkpoint'}")
    return os.path.join(text, reply["prefix"])


def _restore_one(reader: BundleReader, name: str, layout: Layout, spec: str, local: Sequence[int],
                 verify: Verify, pool: ThreadPoolExecutor, dest: dict[int, np.ndarray] | None = None) -> _Pending:
    entry = reader.entry(name)
    dtype = to_numpy(entry.dtype)
    if spec:
        parsed = parse_shape_and_slice(spec)
        if parsed.shape != entry.shape:
            raise ShapeMismatchError(
                f"{reader.prefix}: tensor {name}: shape {list(parsed.shape)} in {spec!r} does not match the "
                f"checkpoint's {list(entry.shape)}"
            )
        region = parsed.slice.bounds(parsed.shape)
    else:
        region = tuple((0, d) for d in entry.shape)
    shape = tuple(hi - lo for lo, hi in region)
    if layout.rank != len(shape):
        raise ShapeMismatchError(
            f"{reader.prefix}: tensor {name} has rank {len(shape)} {list(shape)} but its target layout "
            f"{list(layout.sharding_specs)} has rank {layout.rank}"
        )
    boxes = {device: layout.shard_bounds(shape, device) for device in local}
    reads: dict[tuple[tuple[int, int], ...], Future | _Done | _Part] = {}
    dest = dest or {}
    distinct = list(dict.fromkeys(boxes.values()))
    if len(distinct) > 1 and not reader.mmap and reader.reads_overlap(name, _global(distinct, region), entry):
        # Column blocks of one stored piece: read each stored byte once for all of them (`read_boxes`).
        outs = [next((dest[d] for d in local if boxes[d] == box and d in dest), None) for box in distinct]
        together = pool.submit(reader.read_boxes, name, _global(distinct, region), verify=verify, entry=entry,
                               outs=outs)
        for k, box in enumerate(distinct):
            reads[box] = _Part(together, k)
        return _Pending(shape, dtype, layout, {device: reads[box] for device, box in boxes.items()}, dest)
    for box in distinct:
        global_box = tuple((r0 + lo, r0 + hi) for (lo, hi), (r0, _) in zip(box, region))
        nbytes = math.prod(hi - lo for lo, hi in box) * dtype.itemsize
        out = next((dest[d] for d in local if boxes[d] == box and d in dest), None)
        if nbytes >= _POOL_BYTES:
            reads[box] = pool.submit(reader.read_bounds, name, global_box, verify=verify, entry=entry, out=out)
        else:  # a thread hand-off costs more than reading a small piece here
            reads[box] = _Done(reader.read_bounds(name, global_box, verify=verify, entry=entry, out=out))
    return _Pending(shape, dtype, layout, {device: reads[box] for device, box in boxes.items()}, dest)


def _global(boxes: list[tuple[tuple[int, int], ...]], region: tuple[tuple[int, int], ...]
            ) -> list[tuple[tuple[int, int], ...]]:
    return [tuple((r0 + lo, r0 + hi) for (lo, hi), (r0, _) in zip(box, region)) for box in boxes]


class _Part:
    """One box of a `BundleReader.read_boxes` call running in the pool."""

    def __init__(self, future: Future, index: int) -> None:
        self.future, self.index = future, index

    def result(self) -> np.ndarray:
        return self.future.result()[self.index]


def _key(name: str | bytes) -> bytes:
    return name.encode() if isinstance(name, str) else bytes(name)


def _whole_everywhere(layout: Layout, shape: tuple[int, ...], local: Sequence[int],
                      full_boxes: dict[tuple[int, ...], tuple[tuple[int, int], ...]]) -> bool:
    """Whether every local device's shard of a tensor of ``shape`` is the whole tensor."""
    if layout.is_fully_replicated():
        return True
    full = full_boxes.get(shape)
    if full is None:
        full = full_boxes[shape] = tuple((0, d) for d in shape)
    return all(layout.shard_bounds(shape, d) == full for d in local)


class _Done:
    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def result(self) -> np.ndarray:
        return self.value


class _Pending:
    """A DTensor whose shards are still being read by the pool."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, layout: Layout,
                 futures: dict[int, Future | _Done | _Part], dest: dict[int, np.ndarray]) -> None:
        self.shape, self.dtype, self.layout, self.futures, self.dest = shape, dtype, layout, futures, dest

    def result(self) -> DTensor:
        shards = {}
        for d, f in self.futures.items():
            got = f.result()
            own = self.dest.get(d)
            if own is not None and own is not got:  # another device of this client shares the box
                own[...] = got
                got = own
            shards[d] = got
        return DTensor(self.shape, self.dtype, self.layout, shards)


def sharded_restore(
    mesh: Mesh,
    file_prefix: str | os.PathLike[str],
    tensor_names: Sequence[str],
    layouts: Sequence[Layout],
    *,
    shape_and_slices: Sequence[str] | None = None,
    coordinator: Coordinator | None = None,
    verify: Verify = True,
    threads: int | None = None,
    into: Sequence[DTensor | None] | None = None,
    mmap: bool = False,
) -> list[DTensor]:
    """Read each named tensor (or the slice ``shape_and_slices[i]`` of it) into ``layouts[i]`` on this client.

    The checkpoint may have been saved on any mesh by any number of clients (or by
    TensorFlow); the stored slices are resharded on the fly.  ``verify=True``
    checks the CRC32C of every stored piece read whole, and of the chunks around
    every part of a piece read (the data file's ``.crc32c`` sidecar, which
    shardckpt writes; a checkpoint without one, as TensorFlow writes, leaves parts
    unchecked); ``verify="full"`` reads every piece touched whole and checks it.

    ``file_prefix`` may be a directory holding a ``checkpoint`` state file: its latest checkpoint, as client 0
    reads it (`agreed_prefix`; a collective then, which every client calls).

    ``into[i]``, when given, is a DTensor whose local shards receive tensor ``i``
    in place (its shape, dtype and layout must be the target's): memory the caller
    already holds is filled without a copy, as DCP loads.  Every shape and dtype is
    checked against the checkpoint before any of that memory is written.

    ``mmap=True`` returns shards that are one contiguous range of a local data file
    (the same layout as saved, or row blocks of it) of 1 MiB or more as arrays over
    a private copy-on-write mapping of the file, like ``torch.load(mmap=True)``:
    the restore copies nothing and touches no fresh memory; a page is copied when
    it is first written.  See `BundleReader` for what a mapping holds on to.
    Other shards, and destinations given by ``into``, are copied as usual.
    """
    if len(tensor_names) != len(layouts):
        raise InvalidArgumentError(f"{len(tensor_names)} names but {len(layouts)} layouts")
    specs = list(shape_and_slices) if shape_and_slices is not None else [""] * len(tensor_names)
    if len(specs) != len(tensor_names):
        raise InvalidArgumentError(f"{len(tensor_names)} names but {len(specs)} shape_and_slices")
    file_prefix = agreed_prefix(file_prefix, coordinator)
    if mesh.local_device_ids is not None:
        local = mesh.local_device_ids
    else:
        coord = resolve(coordinator)
        local = mesh.local_devices(coord.rank, coord.size)
    targets = list(into) if into is not None else [None] * len(tensor_names)
    if len(targets) != len(tensor_names):
        raise InvalidArgumentError(f"{len(tensor_names)} names but {len(targets)} destinations")
    workers = threads or min(4, os.cpu_count() or 1)
    # The collector is paused (see `gcpause`): the per-tensor loops below allocate a few objects per tensor.
    with (paused_gc(), BundleReader(file_prefix, mmap=mmap) as reader,
          ThreadPoolExecutor(workers, thread_name_prefix="shardckpt-read") as pool):
        for name, layout, spec, target in zip(tensor_names, layouts, specs, targets):
            if target is not None:
                _check_destination(reader, name, layout, spec, target)
        pending: list[_Pending | None] = []
        small: list[tuple[bytes, BundleEntry]] = []
        at: list[int] = []  # where each of `small` goes in the result
        full_boxes: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = {}
        string = DataType.STRING
        # Most tensors of a large model are small and restored whole onto every local device: their entries
        # are looked up together, and read in runs (`read_many`), not one read each.
        simple = [not spec and target is None for spec, target in zip(specs, targets)]
        keys = [name.encode() if type(name) is str else _key(name)
                for name, ok in zip(tensor_names, simple) if ok]
        found = iter(zip(keys, reader.entries_of(keys)))
        for name, layout, spec, target, ok in zip(tensor_names, layouts, specs, targets, simple):
            if ok:
                key, entry = next(found)
                if (not entry.slices and entry.dtype != string and entry.size < _POOL_BYTES
                        and len(layout.sharding_specs) == len(entry.shape)
                        and (layout.is_fully_replicated() or _whole_everywhere(layout, entry.shape, local,
                                                                               full_boxes))):
                    small.append((key, entry))
                    at.append(len(pending))
                    pending.append(None)
                    continue
            pending.append(_restore_one(reader, name, layout, spec, local, verify, pool,
                                        None if target is None else target.shards))
        out: list[DTensor | None] = [None] * len(pending)
        replicated = DTensor.replicated
        for i, array in zip(at, reader.read_many(small, verify=verify)):
            out[i] = replicated(array, layouts[i], local)
        return [p.result() if p is not None else out[i] for i, p in enumerate(pending)]  # type: ignore[misc]


def _check_destination(reader: BundleReader, name: str, layout: Layout, spec: str, target: DTensor) -> None:
    entry = reader.entry(name)
    shape = parse_shape_and_slice(spec).slice_shape if spec else entry.shape
    if target.shape != tuple(shape) or target.dtype != to_numpy(entry.dtype):
        error = ShapeMismatchError if target.shape != tuple(shape) else DTypeMismatchError
        raise error(
            f"{reader.prefix}: tensor {name} is {to_numpy(entry.dtype)}{list(shape)} in the checkpoint, the "
            f"destination is {target.dtype}{list(target.shape)}"
        )
    if target.layout.sharding_specs != layout.sharding_specs or target.layout.mesh != layout.mesh:
        raise InvalidArgumentError(f"{reader.prefix}: tensor {name}: the destination is laid out differently "
                                   "from the target layout")
    # Each shard on its own: a DTensor's dtype and the shapes its constructor checked say nothing about an
    # array swapped in later, and one found wrong midway would leave earlier destinations overwritten.
    dtype = to_numpy(entry.dtype)
    for d, shard in target.shards.items():
        if not isinstance(shard, np.ndarray):
            raise InvalidArgumentError(f"{reader.prefix}: tensor {name}: the destination of device {d} is a "
                                       f"{type(shard).__name__}, not a numpy array")
        want = tuple(hi - lo for lo, hi in layout.shard_bounds(tuple(shape), d))
        if tuple(shard.shape) != want:
            raise ShapeMismatchError(f"{reader.prefix}: tensor {name}: the destination of device {d} has shape "
                                     f"{list(shard.shape)}, the layout gives it {list(want)}")
        if shard.dtype != dtype:
            raise DTypeMismatchError(f"{reader.prefix}: tensor {name}: the destination of device {d} is "
                                     f"{shard.dtype}, the checkpoint holds {dtype}")
        if not shard.flags.writeable:
            raise InvalidArgumentError(f"{reader.prefix}: tensor {name}: the destination of device {d} is "
                                       "read-only")


Target = DTensor | Layout | tuple[Sequence[int], object, Layout]


def name_based_restore(
    mesh: Mesh,
    file_prefix: str | os.PathLike[str],
    name_tensor_map: Mapping[str, Target],
    **kwargs: object,
) -> dict[str, DTensor]:
    """Restore ``{name: target}`` where a target is a DTensor, a Layout, or ``(shape, dtype, layout)``.

    Shapes and dtypes given by a target are checked against the checkpoint.
    """
    names = list(name_tensor_map)
    layouts: list[Layout] = []
    expected: list[tuple[tuple[int, ...], np.dtype] | None] = []
    for name in names:
        target = name_tensor_map[name]
        if type(target) is Layout:  # the common case first
            layouts.append(target)
            expected.append(None)
        elif isinstance(target, DTensor):
            layouts.append(target.layout)
            expected.append((target.shape, target.dtype))
        elif isinstance(target, Layout):
            layouts.append(target)
            expected.append(None)
        else:
            shape, dtype, layout = target
            layouts.append(layout)
            expected.append((tuple(shape), np.dtype(dtype)))  # type: ignore[call-overload]
    out = sharded_restore(mesh, file_prefix, names, layouts, **kwargs)  # type: ignore[arg-type]
    for name, want, got in zip(names, expected, out):
        if want is None:
            continue
        if tuple(want[0]) != got.shape:
            raise ShapeMismatchError(f"{file_prefix}: tensor {name} is {list(got.shape)} in the checkpoint, "
                                     f"the target is {list(want[0])}")
        if want[1] != got.dtype:
            raise DTypeMismatchError(f"{file_prefix}: tensor {name} is {got.dtype} in the checkpoint, "
                                     f"the target is {want[1]}")
    return dict(zip(names, out))
