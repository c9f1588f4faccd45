"""JAX adapter: save and restore pytrees of ``jax.Array`` with `sharded_save` / `sharded_restore`.

::

    import shardckpt.jax as sj

    sj.save({"params": params, "opt": opt_state, "step": step}, "ckpt/model-100")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    state = sj.restore("ckpt/model-100", abstract)

Every process calls both with the same pytree structure, shapes, dtypes and
shardings (as JAX's own collectives require).  After ``jax.distributed.initialize``
the JAX coordinator is found automatically; a single process needs none.

**Tensor names** (`tree_names`): the pytree key path of each leaf, one component
per level joined with ``"/"``: a dict key as ``str(key)``, a list or tuple index as
its decimal number, a namedtuple or registered dataclass field by its name, a custom
node's flattened index as its number.  ``{"params": {"w": w}, "opt": [m, v]}`` gives
``params/w``, ``opt/0``, ``opt/1``; a pytree that is a single leaf is named ``value``.
Two leaves that map to the same name (``{"a/b": x, "a": {"b": y}}``) are refused.

**Shardings** map onto shardckpt meshes and layouts: a `NamedSharding` gives a
`Mesh` with the JAX mesh's axis names, shape and device ids (``d.id``, row-major over
``mesh.devices``), its local devices being this process's, and a `Layout` from the
`PartitionSpec` (``None`` → unsharded, a name, or a tuple of names = nested splits,
outermost first).  Any other sharding (``SingleDeviceSharding``, ``GSPMDSharding``,
``PositionalSharding`` where it exists, a custom one) is read through its
``devices_indices_map``: its shards must form a regular grid (which JAX's even
tiling guarantees); a fully replicated array is saved once, as a replicated tensor.

**Leaves** saved: ``jax.Array``; numpy arrays (kept as they are, replicated); Python
``bool``/``int``/``float``/``complex`` become 0-d arrays of JAX's default dtype for
them (``int32``/``float32`` unless ``jax_enable_x64``), so ``{"step": 5}`` restores
into ``{"step": 0}``.  ``bfloat16`` and the other ``ml_dtypes`` types are stored
natively; typed PRNG keys must be saved as ``jax.random.key_data(key)``.

One save writes one checkpoint, so its sharded (not fully replicated) arrays must
live on one mesh; arrays on another mesh are accepted when their shards fall exactly
onto a layout of that mesh (for instance ``P("d")`` on a 1-D mesh of the same devices
is ``P(("x", "y"))`` on the 2-D one).  Restore has no such limit: each target is read
into its own sharding, whatever mesh or number of processes saved the checkpoint.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from .coordination import Coordinator
from .dtensor import DTensor
from .errors import DTypeMismatchError, InvalidArgumentError, ShapeMismatchError
from .format.dtypes import to_numpy
from .format.reader import BundleReader
from .layout import UNSHARDED, Layout, Spec
from .mesh import Mesh
from .restore import agreed_prefix, sharded_restore
from .save import SaveFuture, SaveResult, sharded_save

__all__ = ["layout_from_sharding", "mesh_from_jax", "restore", "save", "tree_names"]

Bounds = tuple[tuple[int, int], ...]

ROOT_NAME = "value"
"""The name of the one tensor of a pytree that is a single leaf (its key path is empty)."""


# --- names ----------------------------------------------------------------------------------------


def _key_str(key: object) -> str:
    tu = jax.tree_util
    if isinstance(key, tu.DictKey):
        return str(key.key)
    if isinstance(key, tu.SequenceKey):
        return str(key.idx)
    if isinstance(key, tu.GetAttrKey):
        return str(key.name)
    if isinstance(key, tu.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_name(path: Sequence[object]) -> str:
    return "/".join(_key_str(k) for k in path) if path else ROOT_NAME


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_name(path) for path, _ in pairs]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidArgumentError(
                f"two pytree leaves share the checkpoint name {name!r} (leaves {seen[name]} and {i}); "
                "rename a key so that their '/'-joined key paths differ"
            )
        seen[name] = i
    return names, [leaf for _, leaf in pairs], treedef


def tree_names(tree: Any) -> list[str]:
    """The checkpoint name of every leaf of ``tree``, in ``jax.tree_util`` leaf order (see the module doc)."""
    return _flatten(tree)[0]


# --- shardings → meshes and layouts --------------------------------------------------------------


def _id(device: Any) -> int:
    return int(device.id)


def _local_ids(devices: Iterable[Any]) -> list[int]:
    me = jax.process_index()
    return [_id(d) for d in devices if int(d.process_index) == me]


def mesh_from_jax(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> Mesh:
    """The shardckpt `Mesh` of a concrete JAX mesh: same axis names, shape and device ids; local = this process's."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise InvalidArgumentError(f"{mesh} has no devices (an abstract mesh cannot hold or receive data)")
    devices = mesh.devices
    flat = list(devices.flat)
    return Mesh([str(n) for n in mesh.axis_names], devices.shape, device_ids=[_id(d) for d in flat],
                local_device_ids=_local_ids(flat))


def _spec_entry(entry: object) -> Spec:
    if entry is None:
        return UNSHARDED
    if isinstance(entry, (tuple, list)):
        names = tuple(str(e) for e in entry)
        return names if names else UNSHARDED
    if isinstance(entry, str):
        return entry
    raise InvalidArgumentError(f"PartitionSpec entry {entry!r} is not a mesh axis name, a tuple of them, or None")


def _boxes(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict[int, Bounds]:
    """Device id → the half-open box of the global array it holds."""
    out: dict[int, Bounds] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        box = []
        for s, n in zip(index, shape):
            start, stop, step = s.indices(n) if isinstance(s, slice) else (int(s), int(s) + 1, 1)
            if step != 1:
                raise InvalidArgumentError(f"{sharding}: strided shards ({s}) have no layout")
            box.append((start, max(start, stop)))
        out[_id(device)] = tuple(box)
    return out


def _matches(layout: Layout, shape: tuple[int, ...], boxes: dict[int, Bounds]) -> bool:
    ids = layout.mesh.device_ids
    return len(ids) == len(boxes) and all(boxes.get(d) == layout.shard_bounds(shape, d) for d in ids)


def _search_layout(mesh: Mesh, shape: tuple[int, ...], boxes: dict[int, Bounds]) -> Layout | None:
    """A layout on ``mesh`` whose shard boxes are exactly ``boxes``, if there is one.

    The mesh dims that shard tensor dim ``i`` are those along which a step changes dim ``i``'s
    interval; only their order is tried.
    """
    if set(boxes) != set(mesh.device_ids):
        return None
    grid = np.asarray(mesh.device_ids, dtype=np.int64).reshape(mesh.shape)
    used: list[list[str]] = [[] for _ in shape]
    for axis, name in enumerate(mesh.dim_names):
        if mesh.shape[axis] == 1:
            continue
        lo = np.take(grid, range(mesh.shape[axis] - 1), axis=axis).flat
        hi = np.take(grid, range(1, mesh.shape[axis]), axis=axis).flat
        for dim in range(len(shape)):
            if any(boxes[int(a)][dim] != boxes[int(b)][dim] for a, b in zip(lo, hi)):
                used[dim].append(name)
    if len({n for u in used for n in u}) != sum(len(u) for u in used):
        return None  # a mesh dim moves two tensor dims at once: no layout does that
    for order in itertools.product(*(itertools.permutations(u) for u in used)):
        layout = Layout([tuple(o) if o else UNSHARDED for o in order], mesh)
        if _matches(layout, shape, boxes):
            return layout
    return None


def _grid_layout(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
                 boxes: dict[int, Bounds]) -> Layout | None:
    """A mesh made for ``sharding``: one dim ``d<i>`` per split tensor dim plus ``replica``, if its shards tile."""
    intervals = [sorted({b[i] for b in boxes.values()}) for i in range(len(shape))]
    for n, ivs in zip(shape, intervals):
        k = len(ivs)
        if n % k or ivs != [(j * (n // k), (j + 1) * (n // k)) for j in range(k)]:
            return None  # not k equal pieces (the only tiling JAX makes)
    cells: dict[tuple[int, ...], list[int]] = {}
    for device, box in boxes.items():
        cells.setdefault(tuple(ivs.index(b) for ivs, b in zip(intervals, box)), []).append(device)
    counts = {len(v) for v in cells.values()}
    full = 1
    for ivs in intervals:
        full *= len(ivs)
    if len(counts) != 1 or len(cells) != full:
        return None
    replicas = counts.pop()
    split = [i for i, ivs in enumerate(intervals) if len(ivs) > 1]
    names = [f"d{i}" for i in split] + (["replica"] if replicas > 1 or not split else [])
    sizes = [len(intervals[i]) for i in split] + ([replicas] if replicas > 1 or not split else [])
    order = [d for _, d in sorted((cell, d) for cell, devs in cells.items() for d in devs)]
    by_id = {_id(d): d for d in sharding.device_set}
    mesh = Mesh(names, sizes, device_ids=order, local_device_ids=_local_ids(by_id[d] for d in order))
    layout = Layout([f"d{i}" if len(ivs) > 1 else UNSHARDED for i, ivs in enumerate(intervals)], mesh)
    return layout if _matches(layout, shape, boxes) else None


def layout_from_sharding(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> Layout:
    """The shardckpt `Layout` (with its `Mesh`) that places an array of ``shape`` as ``sharding`` does.

    A `NamedSharding` keeps its mesh's axis names; other shardings get a mesh of dims ``d<i>`` (tensor
    dim ``i`` split) and ``replica``.  Raises `InvalidArgumentError` for shards that do not tile.
    """
    shape = tuple(int(n) for n in shape)
    boxes = _boxes(sharding, shape)
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = mesh_from_jax(sharding.mesh)
        spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
        if len(spec) != len(shape):
            raise InvalidArgumentError(f"{sharding}: spec of rank {len(sharding.spec)} for an array of shape {shape}")
        layout = Layout([_spec_entry(e) for e in spec], mesh)
        found = layout if _matches(layout, shape, boxes) else _search_layout(mesh, shape, boxes)
    else:
        found = _grid_layout(sharding, shape, boxes)
    if found is None:
        raise InvalidArgumentError(
            f"{sharding}: the shards of an array of shape {list(shape)} do not form a regular grid, "
            "so no shardckpt layout describes them"
        )
    return found


class _LayoutCache:
    """One conversion per distinct (sharding, shape) within a call."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Hashable, tuple[int, ...]], Layout] = {}

    def get(self, sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> Layout:
        try:
            key: tuple[Hashable, tuple[int, ...]] = (sharding, shape)
            hash(key)
        except TypeError:
            return layout_from_sharding(sharding, shape)
        if key not in self._cache:
            self._cache[key] = layout_from_sharding(sharding, shape)
        return self._cache[key]


def _mesh_key(mesh: Mesh) -> tuple[object, ...]:
    return mesh.dim_names, mesh.shape, mesh.device_ids, mesh.local_device_ids


# --- save -----------------------------------------------------------------------------------------


@dataclass
class _SaveLeaf:
    name: str
    array: jax.Array | None  # a sharded array, else None
    host: np.ndarray | None  # the local copy of a replicated value (None: this process has none)
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: Layout | None = None  # the sharded array's own layout


def _python_scalar(value: object) -> np.ndarray:
    arr = np.asarray(value)
    return arr.astype(jax.dtypes.canonicalize_dtype(arr.dtype), copy=False)


def _check_dtype(name: str, dtype: Any) -> np.dtype:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise InvalidArgumentError(f"leaf {name}: typed PRNG keys cannot be saved; save jax.random.key_data(key)")
    return np.dtype(dtype)


def _save_leaf(name: str, leaf: object, cache: _LayoutCache) -> _SaveLeaf:
    if isinstance(leaf, jax.Array):
        shape = tuple(int(n) for n in leaf.shape)
        dtype = _check_dtype(name, leaf.dtype)
        if leaf.is_fully_replicated:
            shards = leaf.addressable_shards
            host = np.asarray(shards[0].data) if shards else None
            return _SaveLeaf(name, None, host, shape, dtype)
        return _SaveLeaf(name, leaf, None, shape, dtype, cache.get(leaf.sharding, shape))
    if isinstance(leaf, (bool, int, float, complex)):
        host = _python_scalar(leaf)
    else:
        host = np.asarray(leaf)
    return _SaveLeaf(name, None, host, host.shape, _check_dtype(name, host.dtype))


def _save_mesh(leaves: Sequence[_SaveLeaf], tree_leaves: Sequence[object]) -> Mesh:
    """The mesh of the first sharded array; else of the first array on a mesh; else of every JAX device."""
    for leaf in leaves:
        if leaf.layout is not None:
            return leaf.layout.mesh
    for value in tree_leaves:
        sharding = value.sharding if isinstance(value, jax.Array) else None
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
            return mesh_from_jax(sharding.mesh)
    devices = jax.devices()
    return Mesh(["devices"], [len(devices)], device_ids=[_id(d) for d in devices],
                local_device_ids=_local_ids(devices))


def _on_mesh(leaf: _SaveLeaf, mesh: Mesh) -> Layout:
    assert leaf.layout is not None and leaf.array is not None
    if _mesh_key(leaf.layout.mesh) == _mesh_key(mesh):
        return Layout(leaf.layout.sharding_specs, mesh)
    found = _search_layout(mesh, leaf.shape, _boxes(leaf.array.sharding, leaf.shape))
    if found is None:
        raise InvalidArgumentError(
            f"leaf {leaf.name}: its sharding {leaf.array.sharding} does not fall onto a layout of the mesh "
            f"{list(zip(mesh.dim_names, mesh.shape))} (devices {list(mesh.device_ids)[:16]}) that the first sharded "
            "leaf uses; one save holds arrays of one mesh: reshard it, or save it in a separate checkpoint"
        )
    return found


def _dtensor(leaf: _SaveLeaf, mesh: Mesh) -> DTensor:
    local = mesh.local_device_ids or ()
    if leaf.array is None:
        if local and leaf.host is None:
            raise InvalidArgumentError(
                f"leaf {leaf.name}: this process holds no copy of the replicated array, but holds devices "
                f"{list(local)} of the checkpoint's mesh"
            )
        layout = Layout.replicated(mesh, len(leaf.shape))
        shards = {d: leaf.host for d in local} if leaf.host is not None else {}  # {}: no local devices
        return DTensor(leaf.shape, leaf.dtype, layout, shards)
    layout = _on_mesh(leaf, mesh)
    by_box: dict[Bounds, jax.Array] = {}
    device_box: dict[int, Bounds] = {}
    for shard in leaf.array.addressable_shards:
        box = layout.shard_bounds(leaf.shape, int(shard.device.id))
        device_box[int(shard.device.id)] = box
        by_box.setdefault(box, shard.data)  # one host copy per distinct box (replicas share it)
    for data in by_box.values():  # start every device-to-host copy before waiting on the first
        start = getattr(data, "copy_to_host_async", None)
        if start is not None:
            start()
    host = {box: np.asarray(data) for box, data in by_box.items()}  # zero-copy on CPU
    return DTensor(leaf.shape, leaf.dtype, layout, {d: host[box] for d, box in device_box.items()})


def save(
    pytree: Any,
    prefix: str | os.PathLike[str],
    *,
    coordinator: Coordinator | None = None,
    overwrite: bool = False,
    blocking: bool = True,
    **kwargs: Any,
) -> SaveResult | SaveFuture:
    """Save every leaf of ``pytree`` from every process into one TF V2 checkpoint at ``prefix``.

    Each process writes only shards that live on its devices; every distinct shard is
    written once.  ``kwargs`` go to `sharded_save` (``timeout``, ``durable``,
    ``max_staging_bytes``).  With ``blocking=False`` the call returns a `SaveFuture` once
    the shards this process writes are copied to host memory, so the arrays may then be
    donated or changed.  Names and supported leaves: see the module docstring.
    """
    names, tree_leaves, _ = _flatten(pytree)
    if not names:
        raise InvalidArgumentError(f"{os.fspath(prefix)}: the pytree has no leaves to save")
    cache = _LayoutCache()
    leaves = [_save_leaf(n, leaf, cache) for n, leaf in zip(names, tree_leaves)]
    mesh = _save_mesh(leaves, tree_leaves)
    tensors = [_dtensor(leaf, mesh) for leaf in leaves]
    return sharded_save(mesh, prefix, names, [""] * len(names), tensors, coordinator=coordinator,
                        overwrite=overwrite, blocking=blocking, **kwargs)


# --- restore --------------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding


def _target(name: str, leaf: object) -> _Target:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = leaf.sharding
        if sharding is None:
            sharding = default
        elif not isinstance(sharding, jax.sharding.Sharding):
            raise InvalidArgumentError(f"target {name}: {sharding!r} is not a concrete jax.sharding.Sharding")
        return _Target(name, tuple(int(n) for n in leaf.shape), _check_dtype(name, leaf.dtype), sharding)
    if isinstance(leaf, (bool, int, float, complex)):
        arr = _python_scalar(leaf)
    elif isinstance(leaf, (np.ndarray, np.generic)):
        arr = np.asarray(leaf)
    else:
        raise InvalidArgumentError(
            f"target {name}: {type(leaf).__name__} is not a jax.Array, jax.ShapeDtypeStruct, numpy array or scalar"
        )
    return _Target(name, arr.shape, arr.dtype, default)


def _check_against(prefix: str | os.PathLike[str], targets: Sequence[_Target]) -> None:
    """Every target's shape and dtype must be the checkpoint's: checked on the index, before any read."""
    with BundleReader(prefix) as reader:
        for t in targets:
            entry = reader.entry(t.name)
            if tuple(entry.shape) != t.shape:
                raise ShapeMismatchError(
                    f"{reader.prefix}: tensor {t.name} is {list(entry.shape)} in the checkpoint, "
                    f"the target is {list(t.shape)}"
                )
            stored = to_numpy(entry.dtype)
            if stored != t.dtype:
                raise DTypeMismatchError(
                    f"{reader.prefix}: tensor {t.name} is {stored} in the checkpoint, the target is {t.dtype}"
                )


_ALIGN = 64  # XLA's CPU client adopts a host buffer this aligned without a copy; numpy's large ones are 16
_ALIGNED_MIN = 1 << 20  # smaller tensors: restored in bulk (`read_many`), their copy is cheap


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _aligned_destination(t: _Target, layout: Layout) -> DTensor | None:
    """Shards for ``sharded_restore(into=...)`` that ``jax.device_put`` then adopts as they are (on CPU), so
    a restored array is not copied a second time into fresh memory; None for small or non-CPU targets."""
    local = layout.mesh.local_device_ids
    if (local is None or t.dtype.itemsize * int(np.prod(t.shape, dtype=np.int64)) < _ALIGNED_MIN
            or any(d.platform != "cpu" for d in t.sharding.addressable_devices)):
        return None
    shards = {d: _aligned(tuple(hi - lo for lo, hi in layout.shard_bounds(t.shape, d)), t.dtype) for d in local}
    return DTensor(t.shape, t.dtype, layout, shards)


def _to_jax(t: _Target, tensor: DTensor) -> jax.Array:
    devices = list(t.sharding.addressable_devices_indices_map(t.shape))
    arrays = jax.device_put([tensor.shards[_id(d)] for d in devices], devices)
    return jax.make_array_from_single_device_arrays(t.shape, t.sharding, arrays)


def _nest(prefix: str, names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """Nested dicts from ``/``-joined names: ``params/w`` -> ``{"params": {"w": ...}}``."""
    root: dict[str, Any] = {}
    for name, value in zip(names, values):
        parts = name.split("/")
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidArgumentError(
                    f"{prefix}: tensor {name} lies under tensor {'/'.join(parts[:depth + 1])}, so the checkpoint "
                    "has no nested-dict form; restore it with a target"
                )
            node = child
        if parts[-1] in node:
            raise InvalidArgumentError(
                f"{prefix}: tensor {name} is also a prefix of other tensors' names, so the checkpoint has no "
                "nested-dict form; restore it with a target"
            )
        node[parts[-1]] = value
    return root


def _restore_host(prefix: str | os.PathLike[str], verify: Any = True) -> dict[str, Any]:
    """Every tensor of the checkpoint, whole, as a host numpy array in nested dicts by its name."""
    with BundleReader(prefix) as reader:
        entries = list(reader.entries())
        whole = [(name.encode(), e) for name, e in entries if not e.slices]
        arrays = dict(zip((k.decode() for k, _ in whole), reader.read_many(whole, verify=verify)))
        values = [arrays[name] if name in arrays else reader.read(name, verify=verify) for name, _ in entries]
        return _nest(reader.prefix, [name for name, _ in entries], values)


def restore(
    prefix: str | os.PathLike[str],
    target: Any = None,
    *,
    coordinator: Coordinator | None = None,
    **kwargs: Any,
) -> Any:
    """Read the checkpoint at ``prefix`` into a pytree shaped like ``target``, each leaf a ``jax.Array``.

    Without a target (``target=None``) every tensor of the checkpoint is read whole into
    a host numpy array, in nested dicts by its name (``params/w`` → ``out["params"]["w"]``;
    list indices come back as string keys ``"0"``, ``"1"``; a single-leaf save as
    ``{"value": ...}``); only ``verify`` of the ``kwargs`` applies.  Every process
    reads everything, so use a target for arrays larger than one host's memory.

    A target leaf is a ``jax.ShapeDtypeStruct`` with a sharding (none: this process's first
    device), a ``jax.Array`` (its shape, dtype and sharding; its values are not used), or a
    numpy array or Python scalar (placed on this process's first device).  Shapes and dtypes
    must match the checkpoint (no casting).  Each process reads only the byte ranges of its
    own devices' shards, from a checkpoint saved on any mesh by any number of processes (or
    by TensorFlow).  ``kwargs`` go to `sharded_restore` (``verify``, ``threads``); no
    collective is needed for a prefix.  ``prefix`` may also be a directory holding a
    ``checkpoint`` state file: its latest checkpoint, as process 0 reads it and broadcasts
    through ``coordinator`` (every process calls it then).
    """
    prefix = agreed_prefix(prefix, coordinator)
    if target is None:
        unknown = set(kwargs) - {"verify"}
        if unknown:
            raise InvalidArgumentError(
                f"{os.fspath(prefix)}: {sorted(unknown)} need a target; without one only verify= applies"
            )
        return _restore_host(prefix, kwargs.get("verify", True))
    names, tree_leaves, treedef = _flatten(target)
    targets = [_target(n, leaf) for n, leaf in zip(names, tree_leaves)]
    if not targets:
        return jax.tree_util.tree_unflatten(treedef, [])
    _check_against(prefix, targets)
    cache = _LayoutCache()
    layouts = [cache.get(t.sharding, t.shape) for t in targets]
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, layout in enumerate(layouts):
        groups.setdefault(_mesh_key(layout.mesh), []).append(i)
    out: list[jax.Array | None] = [None] * len(targets)
    for members in groups.values():
        mesh = layouts[members[0]].mesh
        into = [_aligned_destination(targets[i], layouts[i]) for i in members] if "into" not in kwargs else None
        extra = dict(kwargs, into=into) if into is not None and any(d is not None for d in into) else kwargs
        restored = sharded_restore(mesh, prefix, [names[i] for i in members], [layouts[i] for i in members],
                                   coordinator=coordinator, **extra)
        for i, tensor in zip(members, restored):
            out[i] = _to_jax(targets[i], tensor)
    return jax.tree_util.tree_unflatten(treedef, out)
