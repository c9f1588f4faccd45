"""``sharded_save``: every client writes the shards it owns, one client commits the merged index.

Flow (three small collectives and a release, all with the same timeout):

1. *agree*: every client sends a digest of its arguments, its local devices and
   any local error; client 0 adds a fresh token and whether the prefix exists.
   A mismatch or an error makes every client raise before anything is written.
2. every client writes its data file under a staging name
   ``P.data-RRRRR-of-NNNNN.staging-TOKEN`` (fsynced), then *written*: every
   client sends its index entries (or its error).
3. client 0 writes ``P.index.staging-TOKEN``, then commits: removes an old index
   (``overwrite=True``), renames the data files to their final names, renames the
   index last, fsyncs the directory, removes stale data files of an older shard
   count; then *committed* tells every client the outcome, and *done* lets client 0
   return only after the others (some engines' stores live in client 0's process).

``P.index`` present therefore means every data file it names is in place.  On an
object store the data objects take their final names at once and the index object
is written last (`commit.py`); an overwrite deletes the old index before any data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, cast, overload

import numpy as np

from . import errors, storage
from .commit import (
    STAGING,
    StagedFile,
    commit,
    commit_remote,
    recover,
    recover_remote,
    sidecar_path,
    staging_data_filename,
)
from .coordination import Coordinator, default_timeout, resolve
from .coordination.session import Session, answer_wait
from .dtensor import DTensor
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointIOError,
    ClientTimeoutError,
    CoordinationError,
    InvalidArgumentError,
    OutcomeUnknownError,
    RemoteClientError,
    ShapeMismatchError,
)
from .faults import fault_point
from .format.chunks import ChunkSums
from .format.dtypes import DataType, from_numpy
from .format.files import data_filename, index_filename
from .format.parallel_writer import write_at, write_data_file, write_stream
from .format.protos import BundleEntry, pack_entries
from .format.runs import TensorRun
from .format.slices import TensorSlice, encode_slice_key, parse_shape_and_slice
from .format.writer import STORED_AS_IS, PreparedTensor, prepare
from .gcpause import paused_gc
from .layout import Layout
from .lease import CLEANER, PrefixLease, holder_of, lease_filename
from .mesh import Mesh
from .plan import Owners, SaveTensor, WriteItem, plan_local
from .smallruns import Planned, pack_written, plan_with_runs

log = logging.getLogger("shardckpt.save")

# tuple.__new__ builds a NamedTuple without its Python-level __new__ (once per tensor of a save).
_new = tuple.__new__

# How long a client that gave up on a save still waits to learn client 0's decision, at most.
_GRACE = 10.0


@dataclass
class SaveResult:
    """What this client's part of a save did: the data file it wrote under ``prefix`` and its size in bytes.

    ``num_clients`` is how many clients took part; ``timings`` gives seconds per phase, ``total`` included.
    """
    prefix: str
    files: list[str]
    bytes_written: int
    num_clients: int
    timings: dict[str, float] = field(default_factory=dict)


def _as_dtensor(value: object, mesh: Mesh, local: Sequence[int], replicated: dict[int, Layout]) -> DTensor:
    if isinstance(value, DTensor):
        return value
    arr = np.asarray(value)
    layout = replicated.get(arr.ndim)
    if layout is None:
        layout = replicated[arr.ndim] = Layout.replicated(mesh, arr.ndim)
    return DTensor.replicated(arr, layout, local)


def _describe(prefix: str, mesh: Mesh, tensors: Sequence[SaveTensor]) -> dict[str, str]:
    """Per-aspect digests, so a mismatch can say which aspect differs.

    Layouts and dtypes repeat across tensors: each distinct one is spelled once and tensors refer to it by
    number, so the digest costs a few C-level joins per 100,000 tensors instead of a repr each.
    """
    layouts: dict[int, int] = {}
    spelled: dict[str, int] = {}
    refs = []
    boxes: dict[tuple, int] = {}
    box_refs = []
    for t in tensors:
        layout = t.layout
        n = layouts.get(id(layout))
        if n is None:  # numbered by content: equal layouts built apart are still one layout
            text = repr((layout.sharding_specs, layout.mesh.dim_names, layout.mesh.shape, layout.mesh.device_ids))
            n = layouts[id(layout)] = spelled.setdefault(text, len(spelled))
        refs.append(n)
        box = (t.full_shape, t.region)
        n = boxes.get(box)
        if n is None:
            n = boxes[box] = len(boxes)
        box_refs.append(n)
    parts = {
        "prefix": prefix,
        "mesh": mesh.to_string().split("|", 4)[1] + "|" + ",".join(map(str, mesh.device_ids)),
        "names": json.dumps([t.name for t in tensors]),  # not joined: a name may hold any character
        "shapes": repr(list(boxes)) + "|" + ",".join(map(str, box_refs)),
        "dtypes": repr([t.dtype for t in tensors]),
        "layouts": "\n".join(spelled) + "|" + ",".join(map(str, refs)),  # in order of first use
    }
    return {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in parts.items()}


def _io_error(prefix: str, path: str, what: str, exc: OSError) -> CheckpointIOError:
    """An OS refusal as a `CheckpointIOError` naming the prefix and the file (the OSError stays its cause)."""
    err = CheckpointIOError(exc.errno or errno.EIO, f"{prefix}: {what} {path}: {exc.strerror or exc}")
    err.filename = path
    return err


def _error_json(exc: BaseException) -> dict[str, object]:
    report: dict[str, object] = {"message": str(exc), "type": type(exc).__name__}
    if isinstance(exc, OSError) and exc.errno is not None:
        report["errno"] = exc.errno
    return report


def _remote_error(report: dict[str, object], default: type[CheckpointError] = RemoteClientError) -> CheckpointError:
    """Client 0's verdict as this client's exception: the same class where it is one of ours."""
    name = str(report.get("type", ""))
    cls = getattr(errors, name, None) if name in errors.__all__ else None
    if cls is CheckpointIOError:
        return CheckpointIOError(int(report.get("errno") or errno.EIO), str(report["message"]))  # type: ignore[call-overload]
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = default
    return cls(str(report["message"]))


def _normalize(
    mesh: Mesh, prefix: str, names: Sequence[str], slices: Sequence[str], values: Sequence[object],
    local: Sequence[int],
) -> tuple[list[SaveTensor], list[DTensor | np.ndarray]]:
    """The save's arguments as `SaveTensor` specs, and per argument its DTensor, or the numpy array itself
    (replicated: every local device holds it)."""
    if not (len(names) == len(slices) == len(values)):
        raise InvalidArgumentError(
            f"{prefix}: {len(names)} names, {len(slices)} shape_and_slices and {len(values)} tensors differ in length"
        )
    if not names:
        raise InvalidArgumentError(f"{prefix}: nothing to save")
    specs: list[SaveTensor] = []
    dtensors: list[DTensor | np.ndarray] = []
    replicated: dict[int, Layout] = {}
    mesh_devices = set(mesh.device_ids)
    # A model's many small tensors share a few dtypes and shapes: what follows from them is worked out once.
    kinds: dict[np.dtype, tuple[int, int]] = {}
    regions: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = {}
    for name, spec, value in zip(names, slices, values):
        if type(name) is not str and not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"{prefix}: tensor names must be non-empty strings, got {name!r}")
        if type(value) is np.ndarray and not spec:
            # The common case, a whole numpy array: replicated over the save mesh, no DTensor needed.
            kind = kinds.get(value.dtype)
            if kind is None:
                code = from_numpy(value.dtype)
                kind = kinds[value.dtype] = (int(code), 0 if code == DataType.STRING else value.dtype.itemsize)
            shape = value.shape
            region = regions.get(shape)
            if region is None:
                region = regions[shape] = tuple((0, d) for d in shape)
            layout = replicated.get(len(shape))
            if layout is None:
                layout = replicated[len(shape)] = Layout.replicated(mesh, len(shape))
            specs.append(_new(SaveTensor, (name, kind[0], kind[1], shape, region, layout)))
            dtensors.append(value)
            continue
        t = _as_dtensor(value, mesh, local, replicated)
        # A tensor may live on its own mesh (a sub-mesh or another shape) over devices of ``mesh``;
        # this client then holds the shards of its own devices in that mesh (maybe none).
        if t.layout.mesh is mesh:
            want = list(local)
        else:
            own = set(t.layout.mesh.device_ids)
            if not own <= mesh_devices:
                raise InvalidArgumentError(f"{prefix}: tensor {name} is laid out on a mesh with devices outside "
                                           f"the save mesh: {sorted(own - mesh_devices)[:8]}")
            want = [d for d in local if d in own]
        if set(t.shards) != set(want):
            raise InvalidArgumentError(
                f"{prefix}: tensor {name} has shards for devices {sorted(t.shards)}, this client owns {want}"
            )
        code = from_numpy(t.dtype)
        if spec:
            parsed = parse_shape_and_slice(spec)
            if parsed.slice_shape != t.shape:
                raise ShapeMismatchError(
                    f"{prefix}: tensor {name}: slice {spec!r} has shape {list(parsed.slice_shape)}, "
                    f"the tensor {list(t.shape)}"
                )
            full, region = parsed.shape, parsed.slice.bounds(parsed.shape)
        else:
            full, region = t.shape, tuple((0, d) for d in t.shape)
        itemsize = 0 if code == DataType.STRING else t.dtype.itemsize
        specs.append(SaveTensor(name, int(code), itemsize, full, region, t.layout))
        dtensors.append(t)
    return specs, dtensors


def _entries_for(items: list[WriteItem], specs: list[SaveTensor],
                 written: list[BundleEntry]) -> list[tuple[bytes, BundleEntry]]:
    """Index entries of written shards: whole tensors under their name, slices under slice keys."""
    entries: list[tuple[bytes, BundleEntry]] = []
    whole: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = {}
    for item, entry in zip(items, written):
        spec = specs[item.arg]
        key = spec.name.encode()
        shape = spec.full_shape
        full = whole.get(shape)
        if full is None:
            full = whole[shape] = tuple((0, n) for n in shape)
        if item.box == full:
            entries.append((key, entry))
        else:
            tslice = TensorSlice.from_bounds(item.box)
            entries.append((encode_slice_key(key, tslice), entry))
            entries.append((key, BundleEntry(dtype=spec.dtype, shape=spec.full_shape, slices=[tslice])))
    return entries


def _waves(items: list[WriteItem], cap: int | None) -> list[list[WriteItem]]:
    """Consecutive groups of items of at most ``cap`` bytes each (an item larger than ``cap`` alone)."""
    if cap is None:
        return [items]
    waves: list[list[WriteItem]] = [[]]
    size = 0
    for item in items:
        if waves[-1] and size + item.nbytes > cap:
            waves.append([])
            size = 0
        waves[-1].append(item)
        size += item.nbytes
    return waves


@dataclass
class _Written:
    """What writing left on one client: its index entries, or its error; its data file's size and inode."""

    blob: bytes = b""
    error: BaseException | None = None
    size: int = 0
    inode: int = 0


@dataclass
class _Save:
    """One save after the agreement: everything the write and commit phases need."""

    coord: Coordinator
    session: Session
    wait: float
    prefix: str
    token: str
    overwrite: bool
    durable: bool
    specs: list[SaveTensor]
    dtensors: list[DTensor | np.ndarray]
    items: list[Planned]  # `TensorRun`s only in a blocking one-client save (`smallruns`)
    timings: dict[str, float]
    t0: float
    lease: PrefixLease | None = None  # client 0's hold on the prefix, from the agreement to the outcome
    plan_error: CheckpointError | None = None  # this client's plan failed: reported as its write's error

    @property
    def rank(self) -> int:
        return self.coord.rank

    @property
    def remote(self) -> bool:
        return self._remote

    def __post_init__(self) -> None:
        self._remote = storage.is_remote(self.prefix)

    @property
    def staging(self) -> str:
        """Where this client's data goes first: a staging name locally, the final object name remotely."""
        if self.remote:
            return data_filename(self.prefix, self.rank, self.coord.size)
        return staging_data_filename(self.prefix, self.rank, self.coord.size, self.token)

    def prepared(self, items: Sequence[Planned], snapshot: Callable[[np.ndarray], np.ndarray] | None = None) -> list:
        out: list = []
        staging = self.staging
        specs, dtensors = self.specs, self.dtensors
        for item in items:
            if type(item) is TensorRun:  # written as it is; never snapshot (only blocking saves make runs)
                assert snapshot is None
                out.append(item)
                continue
            assert type(item) is WriteItem
            spec = specs[item.arg]
            held = dtensors[item.arg]
            # A numpy array was given as is: the same on every device.
            shard = held if isinstance(held, np.ndarray) else held.shards[item.device]
            if item.within is not None:
                shard = np.asarray(shard)[tuple(slice(a, b) for a, b in item.within)]
            if snapshot is not None:  # a C-ordered copy the caller can no longer change
                shard = snapshot(np.asarray(shard))
            if type(shard) is np.ndarray and (shard.dtype, spec.dtype) in STORED_AS_IS:
                out.append(_new(PreparedTensor, (spec.dtype, shard.shape, shard)))  # what `prepare` would give
                continue
            out.append(prepare(shard, spec.dtype, f"{staging}: tensor {spec.name}", contiguous=False))
        return out

    def failed_write(self, exc: Exception) -> _Written:
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            exc = _io_error(self.prefix, self.staging, "cannot write", exc)
        return _Written(error=exc)

    def write_blocking(self) -> _Written:
        """Write every item straight from the caller's arrays."""
        t = time.perf_counter()
        try:
            fault_point("after_agree", self.rank)
            fault_point("after_plan", self.rank)
            if self.plan_error is not None:
                raise self.plan_error
            with paused_gc():
                return self._write_blocking()
        except Exception as exc:  # noqa: BLE001 - reported to every client, re-raised here
            return self.failed_write(exc)
        finally:
            self.timings["write"] = time.perf_counter() - t

    def _write_blocking(self) -> _Written:
        """The writes and the entries, with the cyclic collector paused (`gcpause`)."""
        prepared = self.prepared(self.items)
        midway = lambda: fault_point("mid_data_write", self.rank)  # noqa: E731
        inode = 0
        if self.remote:
            stream = storage.open_stream(self.staging)
            sums = ChunkSums()  # chunk checksums: the sidecar
            try:
                written, size = write_stream(stream, prepared, shard_id=self.rank, midway=midway, sums=sums)
            except BaseException:
                stream.discard()  # abort the upload: no partial object
                raise
            stream.close()
            sums.save(sidecar_path(self.staging), size)
        else:
            written, size = write_data_file(self.staging, prepared, shard_id=self.rank, durable=self.durable,
                                            midway=midway, sidecar=sidecar_path(self.staging))
            inode = os.stat(self.staging).st_ino
        fault_point("after_data_fsync", self.rank)
        return _Written(self.packed(written), None, size, inode)

    def packed(self, written: list[BundleEntry]) -> bytes:
        """This client's index entries, as `pack_entries` spells them."""
        def general(items: list[WriteItem], entries: list[BundleEntry]) -> bytes:
            return pack_entries(_entries_for(items, self.specs, entries))
        if any(type(item) is TensorRun for item in self.items):
            return pack_written(self.items, written, self.rank, general)
        return general(cast("list[WriteItem]", self.items), written)

    def _give_up(self) -> None:
        """This client's part of a failed save: its staged file goes, and client 0 lets the prefix go."""
        _discard(self.staging)
        self._release()

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def finish(self, w: _Written) -> SaveResult:
        """Report how the writes went, decide and commit on client 0, and learn the one outcome."""
        t = time.perf_counter()
        header = json.dumps({"error": _error_json(w.error) if w.error else None, "size": w.size,
                             "inode": w.inode}).encode()
        mine = len(header).to_bytes(4, "little") + header + w.blob
        try:
            if self.rank == 0:
                return self._finish_root(mine, w.error, w.size, t)
            return self._finish_other(mine, w.error, w.size, t)
        finally:
            self._release()  # whatever escaped: a lease kept by this process would refuse every later save
            self.session.close()

    def abandon(self) -> None:
        """This client stops before reporting its writes (an interrupt): its file and the lease go; the
        others learn nothing from it and give up at their timeout, and nothing is published."""
        _discard(self.staging)
        self._release()
        self.session.close()

    def _finish_other(self, mine: bytes, error: BaseException | None, written: int, t: float) -> SaveResult:
        s, prefix, wait = self.session, self.prefix, self.wait
        fault_point("before_barrier_written", self.rank)
        s.gather("written", mine, wait)
        if error is not None:
            _discard(self.staging)  # client 0 sees the error and never commits
            raise error
        self.timings["barrier_written"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            fault_point("after_barrier_written", self.rank)
            fault_point("before_barrier_committed", self.rank)
            outcome = json.loads(s.broadcast("outcome", None, answer_wait(wait)))
        except CheckpointError as exc:
            # This client reported its part written, then gave up (a timeout) or failed (the store lost, an
            # error of its own): abandon the save, unless client 0 already decided to commit: then its outcome
            # is all that counts, for this client too.
            try:
                won = s.decide(f"abort: client {self.rank}: {exc}".encode(), min(wait, _GRACE))
            except CheckpointError:
                won = None
            if won is not None and won.startswith(b"abort"):
                _discard(self.staging)
                if not isinstance(exc, ClientTimeoutError):
                    raise
                raise ClientTimeoutError(f"{prefix}: sharded_save abandoned, nothing was published: {exc}") from None
            try:
                outcome = json.loads(s.broadcast("outcome", None, min(wait, _GRACE)))
            except CheckpointError:
                raise OutcomeUnknownError(
                    f"{prefix}: client 0 {'decided to commit' if won else 'may have committed'} the save but its "
                    f"outcome did not arrive within {wait:g} s; look at {prefix}.index to know") from None
            log.warning("%s: client %d: %s (client 0 had decided to commit)", prefix, self.rank, exc)
        self.timings["barrier_committed"] = time.perf_counter() - t
        try:  # the outcome is known: nothing failing from here on changes it
            fault_point("after_barrier_committed", self.rank)
            s.confirm("done", wait)
        except CheckpointError as exc:
            log.warning("%s: client %d, after learning the outcome: %s", prefix, self.rank, exc)
        if outcome["error"]:
            if outcome.get("discard"):
                _discard(self.staging)
            raise _remote_error(outcome["error"])
        return self._result(written)

    def _finish_root(self, mine: bytes, error: BaseException | None, written: int, t: float) -> SaveResult:
        s, prefix, wait = self.session, self.prefix, self.wait
        try:
            fault_point("before_barrier_written", 0)
            pieces = s.gather("written", mine, wait)
            assert pieces is not None
            statuses = [json.loads(p[4 : 4 + int.from_bytes(p[:4], "little")]) for p in pieces]
            failed = [(r, st["error"]) for r, st in enumerate(statuses) if st["error"]]
            if error is not None:
                raise error
            if failed:
                r, report = failed[0]
                raise RemoteClientError(f"{prefix}: sharded_save: client {r} failed: {report['message']}")
            self.timings["barrier_written"] = time.perf_counter() - t
            fault_point("after_barrier_written", 0)
            won = s.decide(b"commit", wait)
            if won != b"commit":
                raise ClientTimeoutError(f"{prefix}: sharded_save abandoned before the commit, nothing was "
                                         f"published: {(won or b'').decode(errors='replace')}")
        except BaseException as exc:
            try:
                with contextlib.suppress(CheckpointError):  # a broken transport: the others time out instead
                    s.decide(f"abort: client 0: {exc}".encode(), wait)
                    report = _error_json(exc if isinstance(exc, CheckpointError) else RemoteClientError(
                        f"{prefix}: sharded_save: client 0 failed: {exc}"))
                    s.broadcast("outcome", json.dumps({"error": report, "discard": True}).encode(), wait)
            finally:
                self._give_up()
            raise

        t = time.perf_counter()
        commit_error: CheckpointError | None = None
        try:
            bodies = [p[4 + int.from_bytes(p[:4], "little") :] for p in pieces]
            files = [StagedFile(st["size"], st["inode"]) for st in statuses]
            if self.remote:
                commit_remote(prefix, files, bodies)
            else:
                lease = self.lease
                commit(prefix, self.token, files, bodies, overwrite=self.overwrite, durable=self.durable,
                       hook=lambda point: fault_point(point, 0),
                       still_held=lease.still_held if lease is not None else lambda: True)
        except CheckpointError as exc:
            commit_error = exc
        except OSError as exc:
            commit_error = _io_error(prefix, prefix + ".index", "commit failed writing", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must still end the save on every client and free the prefix
            commit_error = CheckpointError(f"{prefix}: commit failed: {type(exc).__name__}: {exc}")
        # A commit that failed before its commit point leaves no staged index: the staged data files go.  One
        # that failed after it (the old index already removed) is rolled forward by the next recovery, which
        # needs them.
        discard = commit_error is not None and not isinstance(commit_error, OutcomeUnknownError) and (
            self.remote or not os.path.exists(index_filename(prefix) + STAGING + self.token))
        if commit_error is not None:
            log.error("%s: commit failed: %s", prefix, commit_error)
            if discard:
                _discard(self.staging)
        self._release()
        self.timings["commit"] = time.perf_counter() - t
        t = time.perf_counter()
        # The outcome is decided: nothing failing from here on (telling the others, hearing they know) changes
        # it on this client; a client that does not hear it says its outcome is unknown.
        try:
            fault_point("before_barrier_committed", 0)
            outcome = {"error": _error_json(commit_error) if commit_error else None, "discard": discard}
            s.broadcast("outcome", json.dumps(outcome).encode(), wait)
            self.timings["barrier_committed"] = time.perf_counter() - t
            fault_point("after_barrier_committed", 0)
            s.confirm("done", wait)  # the others have read the outcome: this process may exit now
            s.succeeded = True
        except CheckpointError as exc:
            log.warning("%s: after the outcome was decided: %s", prefix, exc)
        if commit_error is not None:
            raise commit_error
        return self._result(written)

    def _result(self, written: int) -> SaveResult:
        size = self.coord.size
        self.timings["total"] = time.perf_counter() - self.t0
        return SaveResult(self.prefix, [data_filename(self.prefix, self.rank, size)], written, size, self.timings)


def _take_lease(prefix: str, token: str, patience: float) -> PrefixLease:
    """The prefix's lease; held by `shardckpt clean` (a short recovery), it is waited for up to ``patience`` s:
    a tool must not make a save fail.  Another save holding it is refused at once."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return PrefixLease.acquire(prefix, what="sharded_save", token=token)
        except errors.PrefixBusyError:
            holder = holder_of(prefix)
            cleaning = holder.what == CLEANER if holder is not None else not os.path.lexists(lease_filename(prefix))
            if not cleaning or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _verdict(prefix: str, mesh: Mesh, replies: list[dict], overwrite: bool, durable: bool,
             lease_box: list[PrefixLease], wait: float) -> dict[str, object]:
    """Client 0: may the save go ahead?  Checks every client's arguments, takes the prefix's lease, and cleans
    up after an earlier save that did not finish (only ever with the lease held: no live save is touched)."""
    failed = [(r, m["error"]) for r, m in enumerate(replies) if m.get("error")]
    if failed:
        r, report = failed[0]
        return {"error": {"message": f"{prefix}: sharded_save: client {r} failed: {report['message']}",
                          "type": "RemoteClientError"}}
    for r, reply in enumerate(replies):
        if reply.get("nth") != replies[0].get("nth"):
            return {"error": {"message": f"{prefix}: sharded_save: this is save {reply.get('nth')} of client {r} "
                              f"but save {replies[0].get('nth')} of client 0: the clients' collective calls are out "
                              "of step (one made a call the others did not); nothing was written",
                              "type": "MismatchedCallError"}}
    mine = replies[0]["digest"]
    for r, reply in enumerate(replies):
        if reply["digest"] != mine:
            aspects = sorted(k for k in mine if reply["digest"].get(k) != mine[k])
            return {"error": {"message": f"{prefix}: sharded_save called with different {', '.join(aspects)} on "
                              f"client {r} than on client 0; nothing was written", "type": "MismatchedCallError"}}
    devices = [list(r["devices"]) for r in replies]
    size = len(replies)
    claimed: dict[int, int] = {}
    for r, own in enumerate(devices):
        for d in own:
            if claimed.setdefault(d, r) != r:
                return {"error": {"message": f"{prefix}: sharded_save: device {d} is claimed by clients "
                                  f"{claimed[d]} and {r}", "type": "InvalidArgumentError"}}
    # The usual layout (each client its contiguous block of the mesh) travels as a flag, not N lists.
    blocks = all(own == list(mesh.client_devices(r, size)) for r, own in enumerate(devices))
    token = secrets.token_hex(8)
    remote = storage.is_remote(prefix)
    try:
        # The others wait for this verdict at most `answer_wait`: the slack beyond the gather's timeout, halved.
        lease_box.append(_take_lease(prefix, token, (answer_wait(wait) - wait) / 2))
        actions = recover_remote(prefix) if remote else recover(prefix, durable=durable)
        for action in actions:
            log.warning("%s: %s (left by an earlier save that did not finish)", prefix, action)
        exists = storage.exists(index_filename(prefix))
        if exists and not overwrite:
            raise CheckpointExistsError(f"{prefix}: a checkpoint already exists (pass overwrite=True to replace it)")
        if exists and remote:
            # No renames on an object store: the old index goes before any data object is replaced, so it
            # never describes new data.
            storage.delete(index_filename(prefix))
    except CheckpointError as exc:
        return {"error": _error_json(exc)}
    except OSError as exc:
        return {"error": _error_json(_io_error(prefix, prefix, "cleaning up an earlier save failed at", exc))}
    return {"error": None, "token": token, "devices": None if blocks else devices}


def _agree(mesh: Mesh, prefix: str, tensor_names: Sequence[str], shape_and_slices: Sequence[str],
           tensors: Sequence[object], coord: Coordinator, wait: float, overwrite: bool, durable: bool,
           small_runs: bool = False) -> _Save:
    """Open the save's session: check every client called alike, take the prefix, compute this client's plan."""
    rank, size = coord.rank, coord.size
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    session = coord.session("save")
    nth = _next_save(coord)
    local = mesh.local_devices(rank, size)
    directory = os.path.dirname(prefix)
    local_error: BaseException | None = None
    specs: list[SaveTensor] = []
    dtensors: list[DTensor | np.ndarray] = []
    try:
        with paused_gc():
            specs, dtensors = _normalize(mesh, prefix, tensor_names, shape_and_slices, tensors, local)
            # One client's digest is only ever compared with itself.
            digest = _describe(prefix, mesh, specs) if size > 1 else {}
        if directory and not storage.is_remote(prefix):
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise _io_error(prefix, directory, "cannot create the directory", exc) from exc
    except CheckpointError as exc:
        local_error = exc
    payload = {"digest": digest if local_error is None else {},
               "devices": list(local), "error": _error_json(local_error) if local_error else None, "nth": nth}
    lease_box: list[PrefixLease] = []
    try:
        if rank == 0:
            try:
                replies = session.gather("agree", json.dumps(payload).encode(), wait)
                assert replies is not None
                verdict = _verdict(prefix, mesh, [json.loads(b) for b in replies], overwrite, durable, lease_box, wait)
            except ClientTimeoutError as exc:
                verdict = {"error": _error_json(ClientTimeoutError(f"{prefix}: sharded_save: {exc}"))}
            try:
                session.broadcast("go", json.dumps(verdict).encode(), wait)
            except CoordinationError:
                if not verdict["error"]:
                    raise
                # Telling the others failed too (gloo after a timeout): they learn by their own timeout.
        else:
            session.gather("agree", json.dumps(payload).encode(), wait)
            try:
                verdict = json.loads(session.broadcast("go", None, answer_wait(wait)))
            except ClientTimeoutError as exc:
                # Tell client 0, should it come late, that this client is gone: it fails at once, not at its
                # own timeout, and never commits (it needs this client's entries).
                session.gather("written", _abandoned(exc), wait)
                raise ClientTimeoutError(f"{prefix}: sharded_save: {exc}") from None
        timings["agree"] = time.perf_counter() - t0
        if local_error is not None:
            raise local_error
        if verdict["error"]:
            raise _remote_error(verdict["error"])  # type: ignore[arg-type]
    except BaseException:
        for lease in lease_box:
            lease.release()
        session.close()
        raise
    t = time.perf_counter()
    # Each client plans only its own writes; the owners of other devices follow from the mesh (contiguous
    # blocks) unless the verdict lists every client's devices.
    owners = Owners(mesh, size, cast("list[Sequence[int]] | None", verdict["devices"]))
    items: list[Planned] = []
    plan_error: CheckpointError | None = None
    try:
        with paused_gc():
            # Runs of small arrays are written straight from the caller's arrays: not for a snapshotting save.
            if small_runs and size == 1 and not storage.is_remote(prefix):
                items = plan_with_runs(specs, dtensors, rank, owners)
            else:
                items = list(plan_local(specs, rank, owners))
    except CheckpointError as exc:
        # The session is open and client 0 holds the lease: the error goes the way a write error goes, so
        # every client learns the one outcome and `finish` lets the prefix go.
        plan_error = exc
    timings["plan"] = time.perf_counter() - t
    return _Save(coord, session, wait, prefix, str(verdict["token"]), overwrite, durable, specs, dtensors, items,
                 timings, t0, lease_box[0] if lease_box else None, plan_error)


def _abandoned(exc: BaseException) -> bytes:
    header = json.dumps({"error": {"message": f"gave up: {exc}", "type": "ClientTimeoutError"}, "size": 0,
                         "inode": 0}).encode()
    return len(header).to_bytes(4, "little") + header


class SaveFuture:
    """The outcome of ``sharded_save(..., blocking=False)``: `result` waits and returns or raises."""

    def __init__(self, future: Future[SaveResult], prefix: str, blocking_seconds: float) -> None:
        self._future = future
        self.prefix = prefix
        self.blocking_seconds = blocking_seconds

    def result(self, timeout: float | None = None) -> SaveResult:
        """Wait up to ``timeout`` seconds (None: forever) for the save; returns its result or raises its error."""
        return self._future.result(timeout)

    def done(self) -> bool:
        """Whether the save has finished, successfully or not."""
        return self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like `result`; returns the save's error, or None when it succeeded."""
        return self._future.exception(timeout)


class _StagingPool:
    """Snapshot buffers kept from one asynchronous save to the next, by size in bytes.

    Fresh memory costs a page fault per page on first touch; periodic saves of the same shapes
    copy into pages already touched instead.  A buffer is lent for one wave and comes back only
    once that wave is written, so none is handed out while a write still reads it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: dict[int, list[np.ndarray]] = {}  # left by the previous save, not yet taken by this one
        self._free: dict[int, list[np.ndarray]] = {}  # given back during this save
        self.held = 0  # bytes of every buffer the pool owns, free or lent
        self.allocations = 0  # fresh buffers made: what reuse saves

    def begin(self, sizes: Counter[int]) -> None:
        """Start a save that snapshots arrays of ``sizes`` bytes: drop what it could never take."""
        with self._lock:
            for nbytes, bucket in self._free.items():
                self._left.setdefault(nbytes, []).extend(bucket)
            self._free = {}
            for nbytes in list(self._left):
                extra = len(self._left[nbytes]) - sizes[nbytes]
                if extra > 0:
                    del self._left[nbytes][:extra]
                    self.held -= extra * nbytes
                    if not self._left[nbytes]:
                        del self._left[nbytes]

    def take(self, nbytes: int, limit: int | None) -> np.ndarray:
        """A buffer of ``nbytes`` bytes, reused if one is free; making one first drops free buffers
        until the pool holds at most ``limit`` bytes, so a wave cap bounds what stays behind too."""
        with self._lock:
            # An earlier wave's buffer first: the previous save's then stay untaken if this one needs
            # fewer at once (a smaller cap), and `end` drops them.
            for free in (self._free, self._left):
                bucket = free.get(nbytes)
                if bucket:
                    buf = bucket.pop()
                    if not bucket:
                        del free[nbytes]
                    return buf
            if limit is not None:
                for free in (self._left, self._free):
                    while free and self.held + nbytes > limit:
                        size, bucket = next(iter(free.items()))
                        bucket.pop()
                        self.held -= size
                        if not bucket:
                            del free[size]
            self.held += nbytes
            self.allocations += 1
            return np.empty(nbytes, np.uint8)  # untouched: its pages fault in on the first copy

    def give_back(self, buffers: list[np.ndarray]) -> None:
        with self._lock:
            for buf in buffers:
                self._free.setdefault(buf.nbytes, []).append(buf)

    def end(self) -> None:
        """The save is over and has given back all it took: what it left untouched goes."""
        with self._lock:
            self.held -= sum(n * len(b) for n, b in self._left.items())
            self._left = {}

    def clear(self) -> None:
        with self._lock:
            self.held -= sum(n * len(b) for free in (self._left, self._free) for n, b in free.items())
            self._left, self._free = {}, {}

    def free_buffers(self) -> list[np.ndarray]:
        """The buffers ready to be taken (for tests)."""
        with self._lock:
            return [b for free in (self._left, self._free) for bucket in free.values() for b in bucket]


@dataclass
class _AsyncState:
    """Per coordinator (so in-process clients do not queue behind each other): one background saver
    and the buffers its saves snapshot into."""

    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="shardckpt-async-save"))
    pending: Future[SaveResult] | None = None
    pool: _StagingPool = field(default_factory=_StagingPool)


_async_lock = threading.Lock()
_async: weakref.WeakKeyDictionary[Coordinator, _AsyncState] = weakref.WeakKeyDictionary()


# Per coordinator: how many saves it has opened.  Sessions pair by number, so a client that made a collective
# call the others did not would pair this save with another call of theirs; the count tells the calls apart.
_save_counts: weakref.WeakKeyDictionary[Coordinator, int] = weakref.WeakKeyDictionary()


def _next_save(coord: Coordinator) -> int:
    with _async_lock:
        n = _save_counts[coord] = _save_counts.get(coord, 0) + 1
        return n


def _async_state(coord: Coordinator) -> _AsyncState:
    with _async_lock:
        state = _async.get(coord)
        if state is None:
            state = _async[coord] = _AsyncState()
        return state


def wait_for_pending_save(coordinator: Coordinator | None = None) -> None:
    """Block until the last asynchronous save through this coordinator has finished.

    Its errors stay with its own future.
    """
    wait_quietly(_async_state(resolve(coordinator)).pending)


def wait_quietly(pending: Future | None) -> None:
    """Wait for an asynchronous save, if any; its error stays with its own future."""
    if pending is not None:
        try:
            pending.result()
        except BaseException:  # noqa: BLE001 - reported through that save's own future
            pass


def release_staging_memory(coordinator: Coordinator | None = None) -> None:
    """Wait for the last asynchronous save through this coordinator, then free the snapshot buffers it
    kept for the next one (see ``reuse_staging`` of `sharded_save`)."""
    coord = resolve(coordinator)
    wait_for_pending_save(coord)
    _async_state(coord).pool.clear()


@overload
def sharded_save(mesh: Mesh, file_prefix: str | os.PathLike[str], tensor_names: Sequence[str],
                 shape_and_slices: Sequence[str], tensors: Sequence[object], *,
                 coordinator: Coordinator | None = ..., timeout: float | None = ..., overwrite: bool = ...,
                 durable: bool = ..., blocking: Literal[True] = ..., max_staging_bytes: int | None = ...,
                 reuse_staging: bool = ...) -> SaveResult:
    ...


@overload
def sharded_save(mesh: Mesh, file_prefix: str | os.PathLike[str], tensor_names: Sequence[str],
                 shape_and_slices: Sequence[str], tensors: Sequence[object], *,
                 coordinator: Coordinator | None = ..., timeout: float | None = ..., overwrite: bool = ...,
                 durable: bool = ..., blocking: Literal[False], max_staging_bytes: int | None = ...,
                 reuse_staging: bool = ...) -> SaveFuture:
    ...


def sharded_save(
    mesh: Mesh,
    file_prefix: str | os.PathLike[str],
    tensor_names: Sequence[str],
    shape_and_slices: Sequence[str],
    tensors: Sequence[object],
    *,
    coordinator: Coordinator | None = None,
    timeout: float | None = None,
    overwrite: bool = False,
    durable: bool = True,
    blocking: bool = True,
    max_staging_bytes: int | None = None,
    reuse_staging: bool = True,
) -> SaveResult | SaveFuture:
    """Save DTensors (or numpy arrays, taken as replicated) from every client into one checkpoint.

    Every client calls this with the same names, slices, shapes, dtypes and
    layouts, passing its own local shards.  On return, on any client, the
    checkpoint at ``file_prefix`` is complete on disk.  ``shape_and_slices[i]``
    may name a slice of a larger variable (SaveV2's syntax); the DTensor then
    holds that slice, itself sharded by its layout.

    With ``blocking=False`` the call returns a `SaveFuture` as soon as the shards
    this client writes are copied to host memory; the caller may then change its
    tensors.  Writing, the barriers and the commit run in a background thread.
    ``max_staging_bytes`` caps that copy: beyond it, copying waits for earlier
    copies to be written (in waves).  A save waits for an earlier asynchronous one.
    ``reuse_staging`` keeps the snapshot buffers for the next asynchronous save through the same
    coordinator: fresh memory costs a page fault per page, so periodic saves of the same shapes copy
    into warm memory instead.  `release_staging_memory` frees them; ``reuse_staging=False`` keeps none.
    """
    coord = resolve(coordinator)
    wait_for_pending_save(coord)
    wait = default_timeout(timeout)
    session = _agree(mesh, os.fspath(file_prefix), tensor_names, shape_and_slices, tensors, coord, wait,
                     overwrite, durable, small_runs=blocking)
    if blocking:
        try:
            written = session.write_blocking()
        except BaseException:
            session.abandon()
            raise
        return session.finish(written)
    t = time.perf_counter()
    state = _async_state(coord)
    if not reuse_staging:
        state.pool.clear()  # the previous save is over, so nothing is lent
    staged = _StagedWrite(session, max_staging_bytes, state.pool if reuse_staging else None)
    try:
        staged.copy_all()
    except BaseException:
        staged.writer.shutdown()
        if staged.fd is not None:
            os.close(staged.fd)
        session.abandon()
        raise
    session.timings["blocking_copy"] = time.perf_counter() - t
    future = state.executor.submit(_finish_async, session, staged)
    state.pending = future
    return SaveFuture(future, session.prefix, time.perf_counter() - session.t0)


def _finish_async(session: _Save, staged: _StagedWrite) -> SaveResult:
    try:
        written = staged.complete()
    except BaseException:  # an interrupt in a writer thread: as in a blocking save
        session.abandon()
        raise
    return session.finish(written)


class _StagedWrite:
    """Copies a session's shards in waves (bounded memory) while a writer thread writes earlier waves."""

    def __init__(self, session: _Save, cap: int | None, pool: _StagingPool | None) -> None:
        self.session = session
        self.cap = cap
        self.pool = pool
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-stage")
        self.fd: int | None = None
        self.stream: BinaryIO | None = None
        self.end = 0
        self.entries: list[BundleEntry] = []
        self.futures: list[tuple[Future[None], int]] = []
        self.error: BaseException | None = None
        self.sums = ChunkSums()  # chunk checksums: the sidecar

    def _snapshot(self, lent: list[np.ndarray], shard: np.ndarray) -> np.ndarray:
        if self.pool is None or shard.dtype.hasobject or shard.dtype.kind in "SU" or not shard.nbytes:
            return np.array(shard, copy=True, order="C")
        buf = self.pool.take(shard.nbytes, self.cap)
        lent.append(buf)
        out = buf.view(shard.dtype).reshape(shard.shape)
        np.copyto(out, shard, casting="no")
        return out

    def _write_wave(self, prepared: list, lent: list[np.ndarray], first: bool) -> None:
        rank = self.session.rank
        midway = (lambda: fault_point("mid_data_write", rank)) if first else None
        try:
            if self.stream is not None:
                written, self.end = write_stream(self.stream, prepared, start=self.end, shard_id=rank, midway=midway,
                                                 sums=self.sums)
            else:
                assert self.fd is not None
                written, self.end = write_at(self.fd, prepared, start=self.end, shard_id=rank, midway=midway,
                                             sums=self.sums, writeback=self.session.durable)
            self.entries.extend(written)
        finally:
            # The writers are done with the wave whether or not it failed (a stream keeps its own copy),
            # and the copy loop waits on this future, so a later wave may take these buffers.
            if self.pool is not None:
                self.pool.give_back(lent)

    def copy_all(self) -> None:
        s = self.session
        try:
            fault_point("after_agree", s.rank)
            fault_point("after_plan", s.rank)
            if s.plan_error is not None:
                raise s.plan_error
            if s.remote:
                self.stream = storage.open_stream(s.staging)
            else:
                self.fd = os.open(s.staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            items = cast("list[WriteItem]", s.items)  # no runs: `_agree` makes them for blocking saves only
            if self.pool is not None:
                self.pool.begin(Counter(it.nbytes for it in items if s.specs[it.arg].dtype != DataType.STRING))
            in_flight = 0
            for i, wave in enumerate(_waves(items, self.cap)):
                size = sum(it.nbytes for it in wave)
                while self.cap is not None and self.futures and in_flight + size > self.cap:
                    done, nbytes = self.futures.pop(0)
                    done.result()  # its buffers are back in the pool once this returns
                    in_flight -= nbytes
                lent: list[np.ndarray] = []
                try:
                    with paused_gc():
                        prepared = s.prepared(wave, functools.partial(self._snapshot, lent))
                except BaseException:
                    if self.pool is not None:
                        self.pool.give_back(lent)
                    raise
                self.futures.append((self.writer.submit(self._write_wave, prepared, lent, i == 0), size))
                in_flight += size
        except Exception as exc:  # noqa: BLE001 - reported to every client, re-raised here
            self.error = exc

    def complete(self) -> _Written:
        """In the background: finish the writes, fsync, and hand the entries to `_Save.finish`."""
        s = self.session
        t = time.perf_counter()
        try:
            for future, _ in self.futures:
                future.result()
            if self.error is not None:
                raise self.error
            if self.fd is not None and s.durable:
                os.fsync(self.fd)
            self.sums.save(sidecar_path(s.staging), self.end, s.durable)
            fault_point("after_data_fsync", s.rank)
            inode = os.fstat(self.fd).st_ino if self.fd is not None else 0
            with paused_gc():
                blob = s.packed(self.entries)
            return _Written(blob, None, self.end, inode)
        except Exception as exc:  # noqa: BLE001 - reported to every client, re-raised here
            return s.failed_write(exc)
        finally:
            if self.fd is not None:
                os.close(self.fd)
            if self.stream is not None:
                self.stream.close()  # completes the upload
            self.writer.shutdown()
            if self.pool is not None:
                self.pool.end()
            s.timings["write"] = time.perf_counter() - t


def _discard(path: str) -> None:
    storage.delete(path)
    storage.delete(sidecar_path(path))


def name_based_save(mesh: Mesh, file_prefix: str | os.PathLike[str], name_tensor_map: dict[str, object],
                    **kwargs: object) -> SaveResult | SaveFuture:
    """Save ``{name: DTensor or array}`` whole (no slices), as DTensor's ``name_based_save``."""
    names = list(name_tensor_map)
    return sharded_save(mesh, file_prefix, names, [""] * len(names), [name_tensor_map[n] for n in names],
                        **kwargs)  # type: ignore[call-overload]
