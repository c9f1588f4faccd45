"""A PyTorch Distributed Checkpoint (DCP) storage layer that writes and reads a TensorFlow V2 bundle.

    import torch.distributed.checkpoint as dcp
    from shardckpt.torch import StorageReader, StorageWriter

    dcp.save(state, storage_writer=StorageWriter("/ckpt/step-100"))
    dcp.load(state, storage_reader=StorageReader("/ckpt/step-100"))

On disk
    ``path`` is a directory (DCP's convention).  It holds one bundle at the fixed
    prefix ``path/model`` (`PREFIX_NAME`: ``model.index``, ``model.data-R-of-N`` with
    N the world size, ``model.data-R-of-N.crc32c``) and TensorFlow's ``checkpoint``
    state file naming it, so ``tf.train.load_checkpoint(path)`` and
    ``shardckpt.load_checkpoint(path)`` read it.  There is no DCP ``.metadata`` pickle:
    `StorageReader.read_metadata` builds DCP's `Metadata` from the index.

Names
    Each tensor is stored under its fully qualified DCP name (``model.layers.0.weight``,
    ``optim.state.model.layers.0.weight.exp_avg``).  Each DCP chunk (a DTensor's
    local shard) is one TensorFlow slice, so TensorFlow sees the tensor whole, as a
    partitioned variable; a chunk that is the whole tensor is stored unpartitioned.
    Replicated chunks are written once: DCP's planner already picks one writer.

Objects
    DCP's "bytes" items (optimizer ``param_groups`` entries, ``lr``, ``step`` counters,
    strings, lists, ``None``) are stored as JSON (`shardckpt.objects`) in a DT_STRING
    scalar under their name, never pickled: the writer takes the original object from
    the planner (``lookup_object``) instead of the pickle DCP's planner would make.  On
    load the reader hands DCP's planner ``torch.save`` of the decoded object, bytes it
    made itself, so nothing from the file is ever unpickled.  An object JSON cannot hold
    faithfully is an `InvalidArgumentError` unless ``StorageWriter(path,
    allow_pickle=True)``; such entries carry their own marker and are refused on load
    unless ``StorageReader(path, allow_pickle=True)``.

Guarantees (the same as `sharded_save`'s)
    The coordinator takes the prefix's lease (`lease.py`) in ``prepare_global_plan``,
    finishes or discards what an earlier save left (`commit.recover`), and sends a
    fresh staging token to every rank inside its plan.  Each rank writes its own
    ``model.data-R-of-N.staging-TOKEN`` and its chunk-checksum sidecar in
    ``write_data`` (fsynced) and reports their size, inode and index entries in its
    write results; the coordinator writes TensorFlow's state file (when missing), then
    commits in ``finish`` (`commit.commit`: index staged, files checked, renames, index
    last) and lets the lease go.  If any rank fails, DCP raises on every rank and never
    calls ``finish``: nothing is published and the previous checkpoint stays readable.
    An OS refusal (a full disk) is a `CheckpointIOError` naming the prefix and the
    file, which DCP carries in its ``CheckpointException``.  The writer is not told, so
    that save's lease stays with the coordinator's process (released at once only when
    the coordinator's own ``write_data`` failed): writers in other processes keep being
    refused while it lives, and the next save of the same process to the path takes the
    lease over (unless that earlier save is inside its commit: then it waits for it).
    A save whose lease was taken over refuses to commit, so two overlapping saves of
    one process to one path end with the later one published, never a mix.
    Coordination uses DCP's own collectives only; ``use_collectives=False`` and plan
    caching are refused (each save needs one coordinator and a fresh token).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader as _DcpReader
from torch.distributed.checkpoint.storage import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import objects, storage
from .checkpoint_reader import latest_checkpoint
from .commit import STAGING, StagedFile, commit, recover, sidecar_path
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    PrefixBusyError,
    UnsupportedDTypeError,
)
from .faults import fault_point
from .format.dtypes import DataType, to_numpy
from .format.files import ORBAX_ITEM_PREFIX, index_filename, io_error, staging_data_filename
from .format.parallel_writer import write_data_file
from .format.protos import BundleEntry, pack_entries
from .format.reader import BundleReader
from .format.slices import TensorSlice, box_volume, encode_slice_key
from .format.writer import PreparedTensor, prepare, write_file_atomically
from .lease import CLEANER, PrefixLease, holder_of, lease_filename
from .manager import STATE_FILENAME, format_state

__all__ = ["PREFIX_NAME", "StorageReader", "StorageWriter"]

log = logging.getLogger("shardckpt.dcp")

PREFIX_NAME = "model"  # the bundle's prefix inside a DCP checkpoint directory
_DATA_FILE = "\x00shardckpt data file"  # the fqn of each rank's extra write result (never a real fqn)
_WHAT = "shardckpt.dcp save"  # the lease holder's description, in other writers' PrefixBusyError
_CLEAN_WAIT = 10.0  # seconds a save waits for `shardckpt clean` to let the prefix go
_TAKEOVER_WAIT = 60.0  # seconds a new save waits for an earlier one of this process that is committing


# --- the coordinator's hold on a prefix, shared by every writer of this process ---------------------


@dataclass
class _Hold:
    lease: PrefixLease
    token: str
    committing: bool = False


_holds: dict[str, _Hold] = {}
_holds_lock = threading.Lock()


def _take_prefix(prefix: str, token: str) -> _Hold:
    """The prefix's lease for a new save; one left by an earlier save of this process (which never reached
    ``finish``: DCP raised on every rank) is taken over, one that is committing is waited for."""
    deadline = time.monotonic() + _TAKEOVER_WAIT
    while True:
        with _holds_lock:
            old = _holds.get(prefix)
            if old is None or not old.committing:
                if old is not None:
                    del _holds[prefix]
                break
        if time.monotonic() > deadline:
            raise PrefixBusyError(f"{prefix}: another save of this process is still committing there")
        time.sleep(0.01)
    if old is not None:
        log.warning("%s: taking over the lease of save %s, which never finished", prefix, old.token)
        old.lease.release()
    hold = _Hold(_acquire(prefix, token), token)
    with _holds_lock:
        _holds[prefix] = hold
    return hold


def _acquire(prefix: str, token: str) -> PrefixLease:
    """The lease; held by `shardckpt clean` (a short recovery) it is waited for, as `sharded_save` does."""
    deadline = time.monotonic() + _CLEAN_WAIT
    while True:
        try:
            return PrefixLease.acquire(prefix, what=_WHAT, token=token)
        except PrefixBusyError:
            holder = holder_of(prefix)
            cleaning = holder.what == CLEANER if holder is not None else not os.path.lexists(lease_filename(prefix))
            if not cleaning or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _drop_hold(prefix: str, token: str) -> None:
    with _holds_lock:
        hold = _holds.get(prefix)
        if hold is None or hold.token != token:
            return
        del _holds[prefix]
    hold.lease.release()


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator sends each rank inside its plan: the save's token, the rank's file number, N."""

    token: str
    rank: int
    world: int


@dataclass(frozen=True)
class _RankFile:
    """What a rank reports of its staged data file, in its extra write result."""

    token: str
    rank: int
    size: int
    inode: int
    entries: bytes  # pack_entries of its index entries


def _discard(path: str) -> None:
    for p in (path, sidecar_path(path)):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _os_refusal(exc: BaseException) -> TypeGuard[OSError]:
    return isinstance(exc, OSError) and not isinstance(exc, CheckpointError)


def _named(exc: OSError, path: str) -> str:
    """The file the refusal was about: its own where it names one (a sidecar, a staged index), else ``path``."""
    return exc.filename if isinstance(exc.filename, str) else path


def _full(size: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    return all(o == 0 for o in offsets) and sizes == size


class StorageWriter(_DcpWriter):
    """DCP storage writer of a TensorFlow V2 bundle at ``path/model`` (see the module's documentation).

    ``allow_pickle=True`` stores objects JSON cannot hold as pickles (refused by readers that
    do not opt in); ``durable=False`` skips the fsyncs (tests, scratch checkpoints).  The
    writer keeps no state between saves besides its arguments, so it pickles (DCP's
    process-based async save ships it to another process) and one writer can serve many saves.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False, durable: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.allow_pickle = allow_pickle
        self.durable = durable
        self.is_coordinator = False

    @property
    def prefix(self) -> str:
        return os.path.join(self.path, PREFIX_NAME)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "allow_pickle": self.allow_pickle, "durable": self.durable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], allow_pickle=state["allow_pickle"], durable=state["durable"])  # type: ignore[misc]

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" not in os.fspath(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if storage.is_remote(self.path):
            raise InvalidArgumentError(f"{self.path}: shardckpt's DCP StorageWriter writes to local or shared POSIX "
                                       "file systems only (use shardckpt.torch.save for object storage)")
        if kwargs.get("use_collectives", True) is False:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            if world > 1:
                raise InvalidArgumentError(f"{self.prefix}: shardckpt's StorageWriter needs DCP's collectives "
                                           "(use_collectives=False would make every rank commit its own index)")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(f"{self.prefix}: cannot create the checkpoint directory: {exc}") from exc

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator takes the prefix and sends every rank the save's token and its file number."""
        if any(not p.usable for p in plans):
            raise InvalidArgumentError(f"{self.prefix}: DCP plan caching (enable_plan_caching=True) is not supported "
                                       "by shardckpt's StorageWriter: each save needs a fresh staging token")
        token = secrets.token_hex(8)
        hold = _take_prefix(self.prefix, token)
        try:
            for action in recover(self.prefix, durable=self.durable):
                log.warning("%s: %s (left by an earlier save that did not finish)", self.prefix, action)
        except BaseException as exc:
            _drop_hold(self.prefix, hold.token)
            if _os_refusal(exc):
                raise io_error(exc, self.prefix, self.prefix, "clean up an earlier save") from exc
            raise
        world = len(plans)
        return [dataclasses.replace(p, storage_data=_PlanData(token, r, world)) for r, p in enumerate(plans)]

    # --- write ------------------------------------------------------------------------------------

    def _object_bytes(self, item: WriteItem, planner: SavePlanner) -> bytes:
        fqn = item.index.fqn
        where = f"{self.prefix}: {fqn}"
        lookup: Callable[[MetadataIndex], Any] | None = getattr(planner, "lookup_object", None)
        error: InvalidArgumentError | None = None
        if lookup is not None:
            try:
                return objects.encode(lookup(item.index), where)
            except InvalidArgumentError as exc:
                error = exc
        if not self.allow_pickle:
            if error is None:
                error = InvalidArgumentError(f"{where}: the planner {type(planner).__name__} has no lookup_object, so "
                                             "the original object cannot be stored without pickle")
            raise InvalidArgumentError(f"{error} (StorageWriter(..., allow_pickle=True) stores it pickled; readers "
                                       "then need StorageReader(..., allow_pickle=True))") from None
        data = planner.resolve_data(item)
        if not isinstance(data, io.BytesIO):
            raise InvalidArgumentError(f"{where}: the planner resolved a bytes item to {type(data).__name__}")
        return objects.PICKLE_MARKER + data.getvalue()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's items into its own staged data file (fsynced, with its sidecar)."""
        info = plan.storage_data
        if not isinstance(info, _PlanData):
            raise InvalidArgumentError(f"{self.prefix}: the save plan carries no shardckpt token (was the plan made "
                                       "by this writer's prepare_global_plan?)")
        staging = staging_data_filename(self.prefix, info.rank, info.world, info.token)
        try:
            fault_point("after_plan", info.rank)
            prepared: list[PreparedTensor] = []
            keys: list[tuple[WriteItem, bytes, BundleEntry | None]] = []  # entry: the partitioned head, if any
            for item in plan.items:
                fqn = item.index.fqn
                key = fqn.encode()
                if not key or key[0] == 0:
                    raise InvalidArgumentError(f"{self.prefix}: the name {fqn!r} cannot be a bundle key")
                if item.type == WriteItemType.BYTE_IO:
                    prepared.append(PreparedTensor(DataType.STRING, (), [self._object_bytes(item, planner)]))
                    keys.append((item, key, None))
                    continue
                td = item.tensor_data
                assert td is not None
                size = tuple(int(d) for d in td.size)
                offsets = tuple(int(o) for o in td.chunk.offsets)
                sizes = tuple(int(s) for s in td.chunk.sizes)
                whole = _full(size, offsets, sizes)
                if not whole and 0 in sizes:
                    continue  # an empty shard adds nothing; the other chunks cover the tensor
                tensor = planner.resolve_data(item)
                if not isinstance(tensor, torch.Tensor):
                    raise InvalidArgumentError(f"{self.prefix}: {fqn}: the planner resolved a tensor item to "
                                               f"{type(tensor).__name__}")
                arr = _host_array(tensor, fqn)
                if tuple(arr.shape) != sizes:
                    raise InvalidArgumentError(f"{self.prefix}: {fqn}: the chunk at {list(offsets)} is "
                                               f"{list(arr.shape)}, the plan says {list(sizes)}")
                p = prepare(arr, None, f"{staging}: tensor {fqn}", contiguous=False)
                prepared.append(p)
                if whole:
                    keys.append((item, key, None))
                else:
                    tslice = TensorSlice.from_bounds([(o, o + s) for o, s in zip(offsets, sizes)])
                    keys.append((item, encode_slice_key(key, tslice),
                                 BundleEntry(dtype=p.dtype, shape=size, slices=[tslice])))
            entries, nbytes = write_data_file(staging, prepared, shard_id=info.rank, durable=self.durable,
                                              midway=lambda: fault_point("mid_data_write", info.rank),
                                              sidecar=sidecar_path(staging))
            inode = os.stat(staging).st_ino
            fault_point("after_data_fsync", info.rank)
        except BaseException as exc:
            _discard(staging)
            if self.is_coordinator:  # this save fails for sure: let the prefix go at once
                _drop_hold(self.prefix, info.token)
            if _os_refusal(exc):
                raise io_error(exc, self.prefix, _named(exc, staging), "write") from exc
            raise
        index: list[tuple[bytes, BundleEntry]] = []
        results: list[WriteResult] = []
        for (item, key, head), entry in zip(keys, entries):
            index.append((key, entry))
            if head is not None:
                index.append((item.index.fqn.encode(), head))
            results.append(WriteResult(index=item.index, size_in_bytes=entry.size, storage_data=key))
        results.append(WriteResult(index=MetadataIndex(_DATA_FILE), size_in_bytes=nbytes,
                                   storage_data=_RankFile(info.token, info.rank, nbytes, inode, pack_entries(index))))
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    # --- commit -----------------------------------------------------------------------------------

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator commits every rank's staged file and entries (index last), then lets the prefix go."""
        prefix = self.prefix
        ranks: list[_RankFile | None] = [None] * len(results)
        for rank_results in results:
            for res in rank_results:
                if isinstance(res.storage_data, _RankFile):
                    if not 0 <= res.storage_data.rank < len(results):
                        raise InvalidArgumentError(f"{prefix}: a write result names rank {res.storage_data.rank}")
                    ranks[res.storage_data.rank] = res.storage_data
        missing = [r for r, f in enumerate(ranks) if f is None]
        if missing:
            raise InvalidArgumentError(f"{prefix}: no data file was reported by rank(s) {missing}; nothing was "
                                       "published")
        files = [f for f in ranks if f is not None]
        token = files[0].token
        if any(f.token != token for f in files):
            raise InvalidArgumentError(f"{prefix}: the ranks wrote under different staging tokens; nothing was "
                                       "published")
        with _holds_lock:
            hold = _holds.get(prefix)
            if hold is None or hold.token != token:
                hold = None
            else:
                hold.committing = True
        if hold is None:
            for r in range(len(files)):
                _discard(staging_data_filename(prefix, r, len(files), token))
            raise PrefixBusyError(f"{prefix}: this save's lease was taken over by a later save of this process "
                                  "(or never taken); nothing was published")
        try:
            # Before the commit: written after it, a full disk there failed a save that was already published.
            self._write_state_file()
            commit(prefix, token, [StagedFile(f.size, f.inode) for f in files], [f.entries for f in files],
                   overwrite=True, durable=self.durable, hook=lambda point: fault_point(point, 0),
                   still_held=hold.lease.still_held)
        except BaseException as exc:
            if not os.path.exists(index_filename(prefix) + STAGING + token):  # before the commit point
                for r in range(len(files)):
                    _discard(staging_data_filename(prefix, r, len(files), token))
            if _os_refusal(exc):
                raise io_error(exc, prefix, _named(exc, index_filename(prefix)), "commit") from exc
            raise
        finally:
            with _holds_lock:
                hold.committing = False
            _drop_hold(prefix, token)

    def _write_state_file(self) -> None:
        """TensorFlow's ``checkpoint`` file naming the bundle, written only when it differs (it never changes)."""
        path = os.path.join(self.path, STATE_FILENAME)
        text = format_state(PREFIX_NAME, [PREFIX_NAME], [], None).encode()
        try:
            with open(path, "rb") as f:
                if f.read(len(text) + 1) == text:
                    return
        except OSError:
            pass
        try:
            write_file_atomically(path, text, durable=self.durable)
        except OSError as exc:
            raise io_error(exc, self.prefix, path, "write the checkpoint state file") from exc


def _host_array(tensor: torch.Tensor, fqn: str) -> np.ndarray:
    from .torch import to_numpy as torch_to_numpy

    if tensor.is_cuda:
        tensor = tensor.detach().cpu()  # a synchronous copy: the writer needs the bytes now
    return torch_to_numpy(tensor, fqn)


# --- read -------------------------------------------------------------------------------------------


def _torch_dtype(code: int) -> torch.dtype | None:
    from .torch import _VIEWED

    try:
        npd = to_numpy(code)
    except CheckpointError:
        return None
    for t, (_, viewed) in _VIEWED.items():
        if viewed == npd:
            return t
    try:
        return torch.from_numpy(np.empty(0, npd)).dtype
    except TypeError:
        return None


def _resolve_prefix(path: str) -> str:
    """The bundle of a checkpoint directory: ``path/model``, else the one its ``checkpoint`` file names, else
    an Orbax item directory's ``path/checkpoint`` (`shardckpt.orbax`), else ``path`` itself as a prefix (a
    bundle saved by `sharded_save` or ``shardckpt.torch.save``)."""
    inside = os.path.join(path, PREFIX_NAME)
    if os.path.exists(index_filename(inside)):
        return inside
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is not None:
            return found
    item = os.path.join(path, ORBAX_ITEM_PREFIX)
    if os.path.exists(index_filename(item)):
        return item
    if os.path.exists(index_filename(path)):
        return path
    raise CheckpointNotFoundError(f"no checkpoint at {path}: neither {index_filename(inside)} nor a checkpoint "
                                  f"state file nor an Orbax item's {index_filename(item)} nor {index_filename(path)}")


@dataclass(frozen=True)
class _ReadData:
    """What `read_metadata` leaves in the `Metadata` for `read_data`: the bundle and each fqn's key."""

    prefix: str
    names: dict[str, str]  # fqn -> bundle name, only where they differ
    gaps: dict[str, int]  # fqn -> index of its whole-tensor chunk, for tensors the stored slices do not fill


class StorageReader(_DcpReader):
    """DCP storage reader of a TensorFlow V2 bundle: one `StorageWriter` wrote, or any bundle.

    ``path`` is a checkpoint directory (``path/model``, or the bundle its TensorFlow
    ``checkpoint`` file names), an Orbax item directory (``<step>/<item>``, whose bundle
    `shardckpt.orbax` writes at ``<item>/checkpoint``) or a bundle's prefix.  Bundle names with ``/`` (saved by
    ``shardckpt.torch.save``) are offered to DCP also with ``.``, DCP's separator, unless taken.
    Every read is served from the stored slices that overlap it, with CRC32C checks
    (``verify=False`` skips them); a region no stored slice holds is an
    `InsufficientSlicesError`, never left as the target held it.  Pickled objects
    (``StorageWriter(allow_pickle=True)``) are refused unless ``allow_pickle=True``.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False, verify: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.allow_pickle = allow_pickle
        self.verify = verify
        self._data: _ReadData | None = None

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._data = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" not in os.fspath(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's `Metadata` from the bundle's index: tensors with their stored slices as chunks, objects as bytes."""
        # DCP retries with rank=R for rank-local metadata only when this raised: the same error is the answer.
        prefix = _resolve_prefix(self.path)
        items: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        names: dict[str, str] = {}
        gaps: dict[str, int] = {}
        with BundleReader(prefix) as reader:
            listed = list(reader.entries())
            present = {name for name, _ in listed}
            for name, entry in listed:
                md: TensorStorageMetadata | BytesStorageMetadata
                if entry.dtype == DataType.STRING:
                    md = BytesStorageMetadata()
                else:
                    dtype = _torch_dtype(entry.dtype)
                    if dtype is None:
                        log.warning("%s: %s has a dtype torch lacks; not offered to DCP", prefix, name)
                        continue
                    pieces = reader.stored_slices(name, entry)
                    chunks = [ChunkStorageMetadata(offsets=torch.Size([lo for lo, _ in p.bounds]),
                                                   sizes=torch.Size([hi - lo for lo, hi in p.bounds]))
                              for p in pieces]
                    # DCP's planner reads only what overlaps a stored chunk: a region no slice holds would keep
                    # whatever the target held.  One more chunk, the whole tensor, makes the planner ask for
                    # every region, and `read_data` refuses the ones not stored (pieces are disjoint, so
                    # volumes say whether they fill the tensor).
                    if sum(box_volume(p.bounds) for p in pieces) != math.prod(entry.shape):
                        gaps[name] = len(chunks)
                        chunks.append(ChunkStorageMetadata(offsets=torch.Size([0] * len(entry.shape)),
                                                           sizes=torch.Size(entry.shape)))
                    md = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(entry.shape), chunks)
                items[name] = md
                # shardckpt.torch.save joins nested keys with "/", DCP with ".": offer both unless taken.
                dotted = name.replace("/", ".")
                if dotted != name and dotted not in present and dotted not in names:
                    items[dotted] = md
                    names[dotted] = name
                    if name in gaps:
                        gaps[dotted] = gaps[name]
        data = _ReadData(prefix, names, gaps)
        self._data = data
        return Metadata(state_dict_metadata=dict(items), storage_data=data,
                        storage_meta=StorageMeta(checkpoint_id=self.path))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if isinstance(metadata.storage_data, _ReadData):
            self._data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _object(self, reader: BundleReader, name: str, fqn: str) -> Any:
        where = f"{reader.prefix}: {fqn}"
        entry = reader.entry(name)
        if entry.shape != ():
            arr = reader.read(name, verify=self.verify)
            return arr.tolist()  # a string tensor of another writer: its elements, as bytes
        raw = reader.read(name, verify=self.verify)[()]
        data = raw if isinstance(raw, bytes) else bytes(raw)
        found = objects.kind(data)
        if found == "json":
            return objects.decode(data, f"{where} in {reader.index_path}")
        if found == "pickle":
            if not self.allow_pickle:
                raise InvalidArgumentError(
                    f"{where} in {reader.index_path} is a pickle, which can run code when loaded; refused (pass "
                    "StorageReader(..., allow_pickle=True) only for checkpoints you trust)")
            return _Pickled(data[len(objects.PICKLE_MARKER):])
        return data  # a plain string of another writer (TensorFlow's object graph, say)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Every read of this rank's plan, from the stored slices that overlap it (CRCs checked)."""
        data = self._data
        if data is None:
            self.read_metadata()
            data = self._data
        assert data is not None
        with BundleReader(data.prefix) as reader:
            entries: dict[str, BundleEntry] = {}
            reads: list[tuple[ReadItem, str, str]] = []
            for item in plan.items:
                fqn = item.storage_index.fqn
                name = data.names.get(fqn, fqn)
                if item.type != LoadItemType.BYTE_IO and item.storage_index.index == data.gaps.get(fqn, -1):
                    # A region of the whole-tensor chunk: its data comes with the stored chunks' own items;
                    # checked before anything is written into the target.
                    entry = entries.get(name)
                    if entry is None:
                        entry = entries[name] = reader.entry(name)
                    reader.check_covered(name, _box(item, entry), entry=entry)
                    continue
                reads.append((item, fqn, name))
            for item, fqn, name in reads:
                if item.type == LoadItemType.BYTE_IO:
                    value = self._object(reader, name, fqn)
                    buf = io.BytesIO()
                    if isinstance(value, _Pickled):
                        buf.write(value.data)
                    else:
                        torch.save(value, buf)  # our own bytes, from the decoded JSON
                    buf.seek(0)
                    planner.load_bytes(item, buf)
                    continue
                entry = entries.get(name)
                if entry is None:
                    entry = entries[name] = reader.entry(name)
                self._read_tensor(reader, name, entry, item, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_tensor(self, reader: BundleReader, name: str, entry: BundleEntry, item: ReadItem,
                     planner: LoadPlanner) -> None:
        arr = reader.read_bounds(name, _box(item, entry), verify=self.verify, entry=entry)
        target = planner.resolve_tensor(item).detach()
        dtype = _torch_dtype(entry.dtype)
        if dtype is None or dtype != target.dtype:
            raise UnsupportedDTypeError(f"{reader.prefix}: {item.storage_index.fqn} is {arr.dtype} in "
                                        f"{reader.index_path}, the target is {target.dtype}")
        from .torch import _from_numpy

        src = _from_numpy(arr if arr.flags.c_contiguous else arr.copy(), dtype)
        if tuple(src.shape) != tuple(target.shape):
            raise CorruptCheckpointError(f"{reader.prefix}: {item.storage_index.fqn}: read {list(src.shape)} for a "
                                         f"target of {list(target.shape)}")
        with torch.no_grad():
            target.copy_(src)
        planner.commit_tensor(item, target)


def _box(item: ReadItem, entry: BundleEntry) -> list[tuple[int, int]]:
    """The region of the tensor a read item asks for, in the tensor's own coordinates."""
    base = item.storage_index.offset or torch.Size([0] * len(entry.shape))
    return [(int(b) + int(o), int(b) + int(o) + int(n)) for b, o, n in zip(base, item.storage_offsets, item.lengths)]


@dataclass(frozen=True)
class _Pickled:
    data: bytes
