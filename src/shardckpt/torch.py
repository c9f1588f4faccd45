"""PyTorch adapter: save and load (nested) state dicts of tensors and DTensors, DCP-style, in TF's V2 format.

    import shardckpt.torch as sct

    sct.save(model.state_dict(), "/ckpt/step-100")            # every rank calls it
    state = model.state_dict()
    sct.load(state, "/ckpt/step-100")                          # in place, any mesh / rank count
    model.load_state_dict(state)

``StorageWriter`` / ``StorageReader`` (imported on first use from `shardckpt.dcp`) are
storage layers for ``torch.distributed.checkpoint`` (DCP) over the same format.

Each torch rank is one shardckpt client (a `TorchCoordinator` over the default
process group when torch.distributed is initialised, else a single client).

Names
    Nested dicts flatten to keys joined with ``"/"``: ``{"optim": {"state": {0:
    {"exp_avg": t}}}}`` is saved as ``optim/state/0/exp_avg`` (int keys become their
    decimal string).  Keys must be ``str`` or ``int``; two paths that flatten to the
    same name are refused.  `flatten_state_dict` shows the names.

Leaves
    * ``torch.distributed.tensor.DTensor`` with `Shard` / `Replicate` placements on
      a DeviceMesh of any rank (uneven shards follow torch's chunk rule, several
      `Shard` on one tensor dim nest in mesh-dim order or in the spec's
      ``shard_order``).  Its mesh becomes a shardckpt `Mesh` whose device ids are the
      torch mesh's global ranks (row-major ``device_mesh.mesh``); this process's
      only local device is its own rank.  A DTensor on a sub-mesh (``mesh["tp"]``)
      is saved on its root mesh, replicated over the other root dims, so every data
      parallel replica describes it alike.  `Partial` and `_StridedShard`
      placements are refused (redistribute or ``full_tensor()`` first).
    * a plain ``torch.Tensor``: replicated; every rank passes its full copy, each
      distinct piece is written once and big replicated tensors are split among
      the ranks.
    * ``int``, ``float``, ``bool`` and numpy arrays/scalars: saved as (0-d) numpy
      arrays; `load` puts the value back into the dict with the target's type.
    * ``None``, ``str``, lists and tuples (an optimizer's ``param_groups``): stored
      without pickle, as JSON in a DT_STRING scalar (`shardckpt.objects`, the same
      encoding as the DCP layer); `load` and `read_state_dict` give them back.
      Anything JSON cannot hold faithfully (sets, bytes, custom classes, tensors
      inside lists) is an `InvalidArgumentError` naming the entry.

Memory
    CPU tensors are handed to shardckpt as zero-copy numpy views (bfloat16 and the
    float8 types through an integer view and the matching ``ml_dtypes`` type).
    Tensors on CUDA are first copied to pinned host buffers (non-blocking, then one
    synchronize); other devices through ``.cpu()``.  `load` reads into host arrays
    and ``copy_``s them into the target tensors (and DTensors' local shards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.distributed

from . import objects
from .checkpoint_reader import load_checkpoint
from .coordination import Coordinator, SingleClient, default_timeout
from .dtensor import DTensor as _NpDTensor
from .errors import (
    CheckpointError,
    DTypeMismatchError,
    InvalidArgumentError,
    RemoteClientError,
    ShapeMismatchError,
    UnsupportedDTypeError,
)
from .layout import UNSHARDED, Layout, Spec
from .mesh import Mesh
from .restore import agreed_prefix, sharded_restore
from .save import SaveFuture, SaveResult, sharded_save

__all__ = ["flatten_state_dict", "load", "read_state_dict", "save", "to_numpy", "torch_layout"]

SEPARATOR = "/"

# torch dtypes without a numpy twin: viewed as the integer type of their size, then as the ml_dtypes type.
_VIEWED: dict[torch.dtype, tuple[torch.dtype, np.dtype]] = {torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16))}
for _torch_name, _carrier in (("float8_e4m3fn", torch.uint8), ("float8_e5m2", torch.uint8),
                              ("float8_e4m3fnuz", torch.uint8), ("float8_e5m2fnuz", torch.uint8)):
    if hasattr(torch, _torch_name) and hasattr(ml_dtypes, _torch_name):
        _VIEWED[getattr(torch, _torch_name)] = (_carrier, np.dtype(getattr(ml_dtypes, _torch_name)))
_CARRIER_NP = {torch.int16: np.dtype(np.int16), torch.uint8: np.dtype(np.uint8)}


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


# --- state dict flattening ----------------------------------------------------------------------------


def _walk(tree: Mapping[Any, Any], path: tuple[str, ...]) -> Iterator[tuple[str, MutableMapping[Any, Any], Any, Any]]:
    for key, value in tree.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            where = SEPARATOR.join(path) or "<top level>"
            raise InvalidArgumentError(f"state dict key {key!r} under {where}: keys must be str or int")
        sub = (*path, str(key))
        if isinstance(value, Mapping):
            yield from _walk(value, sub)
        else:
            yield SEPARATOR.join(sub), tree, key, value  # type: ignore[misc]


def _flatten(state_dict: Mapping[Any, Any]) -> list[tuple[str, MutableMapping[Any, Any], Any, Any]]:
    if not isinstance(state_dict, Mapping):
        raise InvalidArgumentError(f"a state dict must be a mapping, got {type(state_dict).__name__}")
    out, seen = [], set()
    for name, parent, key, value in _walk(state_dict, ()):
        if not name:
            raise InvalidArgumentError("state dict key '' at the top level gives an empty tensor name")
        if name in seen:
            raise InvalidArgumentError(f"two entries of the state dict flatten to the same name {name!r}")
        seen.add(name)
        out.append((name, parent, key, value))
    return out


def flatten_state_dict(state_dict: Mapping[Any, Any]) -> dict[str, Any]:
    """The checkpoint names of a (nested) state dict and their leaves: nested keys joined with ``"/"``."""
    return {name: value for name, _, _, value in _flatten(state_dict)}


# --- tensors to numpy ---------------------------------------------------------------------------------


def to_numpy(t: torch.Tensor, name: str = "tensor") -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (bfloat16/float8 as ml_dtypes); other devices are copied to host.

    CUDA tensors go through a pinned buffer; call ``torch.cuda.synchronize()`` before
    using the result (`save` does).
    """
    if t.layout != torch.strided:
        raise UnsupportedDTypeError(f"{name}: {t.layout} tensors are not supported (convert to dense first)")
    t = t.detach()
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        t = host
    elif t.device.type != "cpu":
        if t.device.type == "meta":
            raise InvalidArgumentError(f"{name}: a meta tensor has no data to save")
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    viewed = _VIEWED.get(t.dtype)
    try:
        if viewed is not None:
            return t.view(viewed[0]).numpy().view(viewed[1])
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise UnsupportedDTypeError(f"{name}: torch dtype {t.dtype} cannot be saved: {exc}") from None


def _from_numpy(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    viewed = _VIEWED.get(dtype)
    if viewed is not None:
        return torch.from_numpy(arr.view(_CARRIER_NP[viewed[0]])).view(dtype)
    return torch.from_numpy(arr)


_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {t: npd for t, (_, npd) in _VIEWED.items()}


def _numpy_dtype(dtype: torch.dtype, name: str) -> np.dtype:
    found = _NUMPY_DTYPES.get(dtype)
    if found is None:
        try:
            found = _NUMPY_DTYPES[dtype] = np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
        except (TypeError, RuntimeError):
            raise UnsupportedDTypeError(f"{name}: torch dtype {dtype} has no numpy or TensorFlow twin") from None
    return found


# --- DeviceMesh and placements to Mesh and Layout ------------------------------------------------------


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _dim_names(device_mesh: Any) -> list[str]:
    names = list(device_mesh.mesh_dim_names or ())
    ok = (len(names) == device_mesh.ndim and len(set(names)) == len(names)
          and all(isinstance(n, str) and n and n not in (UNSHARDED, "any", "match") and "," not in n
                  and "=" not in n and "|" not in n for n in names))
    return names if ok else [f"dim{i}" for i in range(device_mesh.ndim)]


def _mesh_of(device_mesh: Any, rank: int) -> Mesh:
    grid = device_mesh.mesh
    ids = [int(i) for i in grid.flatten().tolist()]
    return Mesh(_dim_names(device_mesh), tuple(grid.shape), device_ids=ids,
                local_device_ids=[rank] if rank in ids else [])


def _root_mapping(device_mesh: Any) -> tuple[Any, list[int]] | None:
    """For a sub-mesh of a named root mesh: the root and the root dim of each sub-mesh dim, when the
    sub-mesh is the root's slice through this rank (so replicas of it on other ranks describe alike)."""
    root = device_mesh._get_root_mesh() if hasattr(device_mesh, "_get_root_mesh") else device_mesh
    if root is device_mesh or not root.mesh_dim_names or not device_mesh.mesh_dim_names:
        return None
    root_names = list(root.mesh_dim_names)
    if any(n not in root_names for n in device_mesh.mesh_dim_names):
        return None  # e.g. a flattened dim
    dims = [root_names.index(n) for n in device_mesh.mesh_dim_names]
    coord = root.get_coordinate()
    if coord is None:
        return None
    index = tuple(slice(None) if d in dims else coord[d] for d in range(root.ndim))
    kept = sorted(dims)
    piece = root.mesh[index].permute(*[kept.index(d) for d in dims])
    if tuple(piece.shape) != tuple(device_mesh.mesh.shape) or not torch.equal(piece, device_mesh.mesh):
        return None
    return root, dims


def torch_layout(dt: Any, rank: int | None = None) -> Layout:
    """The shardckpt `Layout` (on a `Mesh` of global ranks, local device = ``rank``) of a torch DTensor."""
    if rank is None:
        rank = _rank()[0]
    mesh, placements = dt.device_mesh, tuple(dt.placements)
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        _StridedShard = ()  # type: ignore[assignment,misc]
    from torch.distributed.tensor import Replicate, Shard

    ndim = dt.ndim
    per_dim: list[list[int]] = [[] for _ in range(ndim)]
    for m, p in enumerate(placements):
        if isinstance(p, _StridedShard):
            raise InvalidArgumentError(
                f"placement {p} on mesh dim {m}: _StridedShard is not supported (its shards are not "
                "contiguous boxes); redistribute to Shard/Replicate first")
        if isinstance(p, Shard):
            per_dim[p.dim % ndim].append(m)
        elif not isinstance(p, Replicate):
            raise InvalidArgumentError(
                f"placement {p} on mesh dim {m} is not supported (only Shard and Replicate): reduce a "
                "Partial DTensor with redistribute(placements=[Replicate()...]) or full_tensor() first")
    order = getattr(getattr(dt, "_spec", None), "shard_order", None)
    if order:
        try:
            custom = {int(e.tensor_dim): [int(m) for m in e.mesh_dims] for e in order}
        except (AttributeError, TypeError, ValueError):
            custom = {}
        if all(sorted(custom.get(d, [])) == per_dim[d] for d in range(ndim)):
            per_dim = [custom.get(d, []) for d in range(ndim)]
    mapping = _root_mapping(mesh)
    if mapping is not None:
        root, root_dims = mapping
        smesh = _mesh_of(root, rank)
        per_dim = [[root_dims[m] for m in ms] for ms in per_dim]
    else:
        smesh = _mesh_of(mesh, rank)
    specs: list[Spec] = [tuple(smesh.dim_names[m] for m in ms) if ms else UNSHARDED for ms in per_dim]
    return Layout(specs, smesh)


# --- save ---------------------------------------------------------------------------------------------


_coordinator_cache: tuple[Any, Coordinator] | None = None


def _coordinator(coordinator: Coordinator | None) -> Coordinator:
    """The caller's, else a TorchCoordinator on the default group (one per group), else a single client."""
    global _coordinator_cache
    if coordinator is not None:
        return coordinator
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SingleClient()
    from torch.distributed import distributed_c10d as c10d

    from .coordination.torch_distributed import TorchCoordinator

    group = c10d._get_default_group()
    if _coordinator_cache is None or _coordinator_cache[0] is not group:
        _coordinator_cache = (group, TorchCoordinator())
    return _coordinator_cache[1]


def _is_object(value: object) -> bool:
    """A leaf stored as JSON (`shardckpt.objects`): None, a str, a list or a tuple."""
    return value is None or isinstance(value, (str, list, tuple))


def _read_object(prefix: str | os.PathLike[str], name: str) -> Any:
    with load_checkpoint(prefix) as reader:
        if not reader.has_tensor(name):
            from .errors import TensorNotFoundError

            raise TensorNotFoundError(f"{prefix}: no entry {name} in the checkpoint")
        arr = reader.get_array(name)
    return _decoded(arr, prefix, name)


def _decoded(arr: np.ndarray, prefix: str | os.PathLike[str], name: str) -> Any:
    if arr.dtype != object and arr.ndim == 0:
        return arr.item()  # a number where the target had an object: the number
    data = arr[()] if arr.dtype == object and arr.ndim == 0 else None
    if not isinstance(data, bytes) or objects.kind(data) != "json":
        raise InvalidArgumentError(f"{prefix}: {name} is not a stored object (a tensor or a pickle); the target "
                                   "wants one")
    return objects.decode(data, f"{prefix}: {name}")


@dataclass
class _Leaf:
    name: str
    value: Any  # what sharded_save gets: a numpy DTensor or an ndarray
    mesh: Mesh | None  # the DTensor's mesh, None for replicated values


def _prepare(state_dict: Mapping[Any, Any], rank: int) -> list[_Leaf]:
    dtensor_cls = _dtensor_class()
    leaves: list[_Leaf] = []
    cuda: set[torch.device] = set()
    for name, _, _, value in _flatten(state_dict):
        if dtensor_cls is not None and isinstance(value, dtensor_cls):
            layout = torch_layout(value, rank)
            local = value.to_local()
            shards: dict[int, np.ndarray] = {}
            if rank in layout.mesh.local_devices(0, 1):
                box = layout.shard_bounds(tuple(value.shape), rank)
                want = tuple(hi - lo for lo, hi in box)
                if tuple(local.shape) != want:
                    raise ShapeMismatchError(
                        f"{name}: the local shard of rank {rank} has shape {list(local.shape)}, shardckpt's "
                        f"layout {list(layout.sharding_specs)} of placements {list(value.placements)} gives "
                        f"{list(want)}")
                shards[rank] = to_numpy(local, name)
                if local.is_cuda:
                    cuda.add(local.device)
            np_dtype = _numpy_dtype(value.dtype, name)
            leaves.append(_Leaf(name, _NpDTensor(tuple(value.shape), np_dtype, layout, shards), layout.mesh))
        elif isinstance(value, torch.Tensor):
            leaves.append(_Leaf(name, to_numpy(value, name), None))
            if value.is_cuda:
                cuda.add(value.device)
        elif isinstance(value, (bool, int, float, np.ndarray, np.generic)):
            arr = np.asarray(value)
            if arr.dtype.kind in "OUSV":
                raise InvalidArgumentError(f"{name}: numpy arrays of dtype {arr.dtype} are not supported")
            leaves.append(_Leaf(name, arr, None))
        elif _is_object(value):
            leaves.append(_Leaf(name, np.array(objects.encode(value, name), dtype=object), None))
        else:
            raise InvalidArgumentError(
                f"{name}: cannot save a {type(value).__name__} (state dict leaves must be tensors, DTensors, "
                "ints, floats, bools, numpy arrays, or None, str, lists and tuples of plain values; nest dicts "
                "for structure)")
    for device in cuda:  # the non-blocking copies into pinned buffers are done after this
        torch.cuda.synchronize(device)
    return leaves


def _save_mesh(leaves: list[_Leaf], rank: int, world: int) -> Mesh:
    """The DTensors' mesh when they share one over every rank (replicated values join it), else a 1-D mesh
    of all ranks with each DTensor on its own mesh."""
    meshes = {leaf.mesh for leaf in leaves if leaf.mesh is not None}
    if len(meshes) == 1:
        (only,) = meshes
        if sorted(only.device_ids) == list(range(world)):
            return only
    return Mesh(["rank"], [world], local_device_ids=[rank])


def _agree_locally_prepared(coord: Coordinator, error: BaseException | None, timeout: float) -> None:
    """Every rank learns whether every rank could prepare its state dict, so none waits in sharded_save."""
    if coord.size == 1:
        if error is not None:
            raise error
        return
    mine = json.dumps({"error": f"{type(error).__name__}: {error}" if error is not None else None}).encode()

    def first_error(replies: list[bytes]) -> bytes:
        # Only the verdict travels back: each rank receives one short value, not every rank's reply.
        for r, raw in enumerate(replies):
            reply = json.loads(raw)
            if reply["error"]:
                return json.dumps({"rank": r, "error": reply["error"]}).encode()
        return b"{}"

    with coord.session("torch-prepare") as session:
        verdict = json.loads(session.reduce(mine, first_error, timeout))
    if error is not None:
        raise error
    if verdict:
        raise RemoteClientError(f"shardckpt.torch.save: rank {verdict['rank']} could not prepare its state dict: "
                                f"{verdict['error']}")


def save(state_dict: Mapping[Any, Any], prefix: str | os.PathLike[str], *, coordinator: Coordinator | None = None,
         overwrite: bool = False, blocking: bool = True, **kwargs: Any) -> SaveResult | SaveFuture:
    """Save a (nested) state dict of tensors, DTensors and numbers from every rank into one checkpoint.

    Every rank calls it with a state dict of the same names, shapes, dtypes and
    placements (its own local shards).  ``coordinator`` (default: a `TorchCoordinator`
    on the default process group) must span every rank of the world, since
    DTensor meshes are described by global ranks.  ``kwargs`` go to `sharded_save`
    (``timeout``, ``durable``, ``max_staging_bytes``).  With ``blocking=False`` it
    returns a `SaveFuture` once this rank's data is copied to host memory.
    """
    coord = _coordinator(coordinator)
    rank, world = _rank()
    if coordinator is not None and not torch.distributed.is_initialized():
        rank, world = coord.rank, coord.size
    timeout = default_timeout(kwargs.get("timeout"))
    leaves: list[_Leaf] = []
    error: BaseException | None = None
    try:
        leaves = _prepare(state_dict, rank)
    except CheckpointError as exc:
        error = exc
    _agree_locally_prepared(coord, error, timeout)
    mesh = _save_mesh(leaves, rank, world)
    return sharded_save(mesh, prefix, [leaf.name for leaf in leaves], [""] * len(leaves),
                        [leaf.value for leaf in leaves], coordinator=coord, overwrite=overwrite,
                        blocking=blocking, **kwargs)


# --- load ---------------------------------------------------------------------------------------------


def _destination(target: object, layout: Layout, rank: int, dtensor_cls: Any) -> _NpDTensor | None:
    """A numpy DTensor over the target's own CPU memory, so `sharded_restore` reads straight into it."""
    if not isinstance(target, torch.Tensor):
        return None
    local = target.to_local() if dtensor_cls is not None and isinstance(target, dtensor_cls) else target
    if local.is_cuda or local.layout != torch.strided or rank not in layout.mesh.device_ids:
        return None
    try:
        view = to_numpy(local)
    except CheckpointError:
        return None
    if not view.flags.writeable:
        return None
    try:
        return _NpDTensor(tuple(target.shape), view.dtype, layout, {rank: view})
    except CheckpointError:
        return None  # shapes that disagree are reported by the load itself


def _copy_into(target: torch.Tensor, arr: np.ndarray, name: str) -> None:
    if arr.size and target.device.type == "cpu" and target.data_ptr() == arr.__array_interface__["data"][0]:
        return  # already read in place
    if tuple(target.shape) != tuple(arr.shape):
        raise ShapeMismatchError(f"{name}: the checkpoint's piece has shape {list(arr.shape)}, the target "
                                 f"{list(target.shape)}")
    src = _from_numpy(arr, target.dtype)
    with torch.no_grad():
        target.copy_(src)


def load(state_dict: MutableMapping[Any, Any], prefix: str | os.PathLike[str], *,
         coordinator: Coordinator | None = None, **kwargs: Any) -> MutableMapping[Any, Any]:
    """Load a checkpoint into ``state_dict`` in place and return it (DCP-style).

    The state dict's entries give the names, global shapes, dtypes and placements
    wanted; the checkpoint may come from any mesh and any number of ranks.  Tensors
    and DTensors' local shards are overwritten with ``copy_``; numbers are replaced
    by the stored value, converted to the target's type.  No collective is needed for a
    prefix.  ``prefix`` may also be a directory holding a ``checkpoint`` state file (a
    `shardckpt.CheckpointManager` or TensorFlow directory): its latest checkpoint, as
    rank 0 reads it and broadcasts through ``coordinator`` (every rank calls it then, as
    with ``dcp.load``).  ``kwargs`` go to `sharded_restore` (``verify``, ``threads``).
    """
    prefix = agreed_prefix(prefix, coordinator)  # past this, reading needs no coordination
    rank, _ = _rank()
    dtensor_cls = _dtensor_class()
    plain = Mesh(["rank"], [1], device_ids=[rank], local_device_ids=[rank])
    groups: dict[Mesh, list[tuple[str, Layout, Any, Any]]] = {}
    for name, parent, key, value in _flatten(state_dict):
        if _is_object(value):
            parent[key] = _read_object(prefix, name)
        elif dtensor_cls is not None and isinstance(value, dtensor_cls):
            layout = torch_layout(value, rank)
            groups.setdefault(layout.mesh, []).append((name, layout, value, (parent, key)))
        elif isinstance(value, (torch.Tensor, bool, int, float, np.ndarray, np.generic)):
            ndim = value.ndim if isinstance(value, (torch.Tensor, np.ndarray)) else 0
            groups.setdefault(plain, []).append((name, Layout.replicated(plain, ndim), value, (parent, key)))
        else:
            raise InvalidArgumentError(
                f"{name}: cannot load into a {type(value).__name__} (state dict leaves must be tensors, "
                "DTensors, ints, floats, bools, numpy arrays, or None, str, lists and tuples)")
    for mesh, entries in groups.items():
        into = [_destination(target, layout, rank, dtensor_cls) for _name, layout, target, _where in entries]
        restored = sharded_restore(mesh, prefix, [e[0] for e in entries], [e[1] for e in entries], into=into,
                                   **kwargs)
        for (name, _layout, target, (parent, key)), got in zip(entries, restored):
            if isinstance(target, torch.Tensor):
                if tuple(got.shape) != tuple(target.shape):
                    raise ShapeMismatchError(f"{prefix}: {name} is {list(got.shape)} in the checkpoint, the "
                                             f"target is {list(target.shape)}")
                want = _numpy_dtype(target.dtype, name)
                if got.dtype != want:
                    raise DTypeMismatchError(f"{prefix}: {name} is {got.dtype} in the checkpoint, the target "
                                             f"is {target.dtype}")
                if dtensor_cls is not None and isinstance(target, dtensor_cls):
                    if rank in got.shards:
                        with torch.no_grad():
                            _copy_into(target.to_local(), got.shards[rank], name)
                else:
                    _copy_into(target, got.shards[rank], name)
            elif isinstance(target, np.ndarray):
                arr = got.shards[rank]
                if arr.shape != target.shape:
                    raise ShapeMismatchError(f"{prefix}: {name} is {list(arr.shape)} in the checkpoint, the "
                                             f"target is {list(target.shape)}")
                if target.flags.writeable and arr.dtype == target.dtype:
                    target[...] = arr
                else:
                    parent[key] = arr
            else:
                arr = got.shards[rank]
                if arr.dtype == object:  # the checkpoint holds an object where the target has a number
                    parent[key] = _decoded(arr, prefix, name)
                    continue
                if arr.ndim != 0:
                    raise ShapeMismatchError(f"{prefix}: {name} is {list(arr.shape)} in the checkpoint, the "
                                             f"target is the number {target!r}")
                parent[key] = arr[()] if isinstance(target, np.generic) else type(target)(arr.item())
    return state_dict


def read_state_dict(prefix: str | os.PathLike[str], *, nested: bool = True) -> dict[str, Any]:
    """Every tensor of a checkpoint, whole, as CPU torch tensors (no template needed; any process).

    Names are split at ``"/"`` into nested dicts unless ``nested=False``.  Numbers
    saved from ints/floats come back as 0-d tensors; stored objects (``param_groups``)
    as the objects.  Meant for inspection and
    conversion: every rank that calls it reads everything.
    """
    out: dict[str, Any] = {}
    with load_checkpoint(prefix) as reader:
        dtypes = reader.get_variable_to_dtype_map()
        for name in sorted(reader.get_variable_to_shape_map()):
            arr = reader.get_array(name)  # 0-d arrays, not the numpy scalars get_tensor gives
            torch_dtype = next((t for t, (_, npd) in _VIEWED.items() if npd == dtypes[name]), None)
            tensor: Any
            if arr.dtype == object:
                data = arr[()] if arr.ndim == 0 else None
                if not isinstance(data, bytes) or objects.kind(data) != "json":
                    raise UnsupportedDTypeError(f"{prefix}: {name} holds strings, which torch cannot represent")
                tensor = objects.decode(data, f"{prefix}: {name}")
            else:
                try:
                    tensor = _from_numpy(arr, torch_dtype) if torch_dtype is not None else torch.from_numpy(arr)
                except TypeError:
                    raise UnsupportedDTypeError(f"{prefix}: {name} has dtype {arr.dtype}, which torch lacks") from None
            if not nested:
                out[name] = tensor
                continue
            node = out
            *parents, last = name.split(SEPARATOR)
            for p in parents:
                child = node.setdefault(p, {})
                if not isinstance(child, dict):
                    raise InvalidArgumentError(f"{prefix}: {name} nests under the tensor {p!r}")
                node = child
            if last in node:
                raise InvalidArgumentError(f"{prefix}: {name} is both a tensor and a prefix of others")
            node[last] = tensor
    return out


def __getattr__(name: str) -> Any:
    # The DCP storage layer imports torch.distributed.checkpoint: only when asked for.
    if name in ("StorageWriter", "StorageReader"):
        from . import dcp

        return getattr(dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
