"""TensorFlow DTensor adapter: ``tf.experimental.dtensor``'s save/restore functions over shardckpt.

Drop-in replacements taking TF DTensor meshes, layouts, DTensors and DVariables::

    from shardckpt import tf as sctf

    sctf.sharded_save(mesh, prefix, ["w", "b"], ["", ""], [w, b])        # w, b: DVariables or DTensors
    out = sctf.name_based_restore(mesh, prefix, {"w": w, "b": b_layout})  # w assigned in place

Each TF client is one shardckpt client.  Its devices are its mesh's local devices;
with several clients (``DTENSOR_JOBS`` names more than one job) the clients agree
through TF's coordination service (`TFCoordinator`), else the one client owns every
device.  Only this client's components are touched (``dtensor.unpack`` on save,
``dtensor.pack`` on restore); nothing goes through TF's SaveV2, RestoreV2 or
MergeV2Checkpoints.  Unlike TF DTensor, ``shape_and_slices`` may name slices of a
larger variable, any layout may restore any checkpoint (also one written by TF, by
another number of clients or on another mesh), and the checkpoint is committed
atomically.

TF DTensor treats a device id as the device's row-major offset in the mesh,
whatever order the mesh string lists the ids in; the converted shardckpt `Mesh`
therefore lists the ids sorted (shardckpt places ids by their position in the list).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor as _dtensor

from . import restore as _restore
from . import save as _save
from .coordination import Coordinator, SingleClient
from .dtensor import DTensor
from .errors import DTypeMismatchError, InvalidArgumentError, ShapeMismatchError
from .layout import Layout
from .mesh import Mesh
from .save import SaveFuture, SaveResult

__all__ = [
    "default_coordinator",
    "from_tf",
    "name_based_restore",
    "name_based_save",
    "sharded_restore",
    "sharded_save",
    "to_layout",
    "to_mesh",
    "to_tf",
]

# TensorFlow ships no type stubs: its objects are ``Any`` here.
TFMesh = Any  # tf.experimental.dtensor.Mesh
TFLayout = Any  # tf.experimental.dtensor.Layout
TFTensor = Any  # tf.Tensor (possibly a DTensor) or tf.Variable (possibly a DVariable)

_lock = threading.Lock()
_coordinator: Coordinator | None = None


def default_coordinator() -> Coordinator:
    """This TF client's coordinator: `TFCoordinator` with several DTensor clients, else a single client.

    Made once, on first use.  With several clients every client must reach its first
    shardckpt save in the same order relative to other `TFCoordinator` creations.
    """
    global _coordinator
    with _lock:
        if _coordinator is None:
            if _dtensor.num_clients() > 1:
                from .coordination.tf_coordination import TFCoordinator

                _coordinator = TFCoordinator(_dtensor.client_id(), _dtensor.num_clients())
            else:
                _coordinator = SingleClient()
        return _coordinator


def to_mesh(mesh: TFMesh) -> Mesh:
    """The shardckpt `Mesh` of a TF DTensor mesh (a shardckpt `Mesh` is returned as is).

    Device ids keep TF's meaning (the row-major offset in the mesh); the local ids
    are this client's.  Single-device meshes have no shardckpt form.
    """
    if isinstance(mesh, Mesh):
        return mesh
    if mesh.is_single_device():
        raise InvalidArgumentError(f"single-device mesh {mesh.to_string()!r} cannot hold a sharded tensor")
    shape = [int(s) for s in mesh.shape()]
    ids = sorted(int(i) for i in np.asarray(mesh.global_device_ids()).reshape(-1))
    if ids != list(range(len(ids))):
        raise InvalidArgumentError(
            f"mesh {mesh.to_string()!r}: global device ids must be 0..{len(ids) - 1}, as TF DTensor makes them"
        )
    return Mesh(list(mesh.dim_names), shape, device_ids=ids,
                local_device_ids=[int(i) for i in mesh.local_device_ids()], name=str(mesh.name))


def to_layout(layout: TFLayout) -> Layout:
    """The shardckpt `Layout` of a TF DTensor layout (a shardckpt `Layout` is returned as is).

    Only ordinary (static) layouts qualify: parted and single-device layouts do not
    describe one global tensor split over the mesh.
    """
    if isinstance(layout, Layout):
        return layout
    kind = getattr(getattr(layout, "type", None), "name", "STATIC")
    if kind != "STATIC":
        raise InvalidArgumentError(f"layout {layout.to_string()!r} is {kind.lower()}; only static layouts are saved")
    return Layout([str(s) for s in layout.sharding_specs], to_mesh(layout.mesh))


def _numpy(component: Any, dtype: np.dtype) -> np.ndarray:
    value = component.numpy()
    # 0-d components come back as numpy scalars, or as bytes for tf.string.
    return np.asarray(value, dtype=object) if dtype.kind == "O" else np.asarray(value)


def _np_dtype(tf_dtype: Any) -> np.dtype:
    return np.dtype(tf.as_dtype(tf_dtype).as_numpy_dtype)


def from_tf(tensor: TFTensor) -> DTensor:
    """This client's components of a TF DTensor or DVariable, as a shardckpt `DTensor`.

    The arrays are TF's own host buffers where TF allows (CPU), not copies; a
    DVariable is read once, so later assignments do not change the result.
    """
    if isinstance(tensor, tf.Variable):
        tensor = tensor.read_value()
    if not (tf.is_tensor(tensor) and _dtensor.is_dtensor(tensor)):
        raise InvalidArgumentError(f"expected a DTensor or DVariable, got {type(tensor).__name__}")
    layout = to_layout(_dtensor.fetch_layout(tensor))
    local = layout.mesh.local_device_ids or ()
    dtype = _np_dtype(tensor.dtype)
    components = _dtensor.unpack(tensor)
    if len(components) != len(local):
        raise InvalidArgumentError(f"{len(components)} local components for {len(local)} local devices")
    shards = {device: _numpy(c, dtype) for device, c in zip(local, components)}
    return DTensor(tuple(int(d) for d in tensor.shape), dtype, layout, shards)


def to_tf(value: DTensor, layout: TFLayout) -> TFTensor:
    """Pack this client's shards of ``value`` into a TF DTensor on ``layout`` (``dtensor.pack``)."""
    ours = to_layout(layout)
    if tuple(ours.sharding_specs) != tuple(value.layout.sharding_specs) or ours.mesh != value.layout.mesh:
        raise InvalidArgumentError(f"{value!r} is not laid out as {layout.to_string()!r}")
    tf_dtype = tf.string if value.dtype.kind == "O" else tf.as_dtype(value.dtype)
    local = ours.mesh.local_device_ids or ()
    return _dtensor.pack([tf.constant(value.shards[d], dtype=tf_dtype) for d in local], layout)


def _local_value(value: object) -> DTensor | np.ndarray:
    """A DTensor/DVariable as a shardckpt DTensor; anything else as one replicated array."""
    if isinstance(value, (DTensor, np.ndarray)):
        return value
    if isinstance(value, tf.Variable):
        value = value.read_value()
    if tf.is_tensor(value):
        if _dtensor.is_dtensor(value):
            return from_tf(value)
        return _numpy(value, _np_dtype(value.dtype))
    return np.asarray(value)


def _string(value: object) -> str:
    if tf.is_tensor(value):
        if _dtensor.is_dtensor(value):  # a prefix packed onto a mesh: every component holds the same
            value = _dtensor.unpack(value)[0]
        value = value.numpy()  # type: ignore[attr-defined]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return os.fspath(value)  # type: ignore[arg-type]


def _strings(values: object) -> list[str]:
    if tf.is_tensor(values):
        if _dtensor.is_dtensor(values):
            values = _dtensor.unpack(values)[0]
        values = values.numpy().reshape(-1).tolist()  # type: ignore[attr-defined]
    return [_string(v) for v in values]  # type: ignore[attr-defined]


def sharded_save(
    mesh: TFMesh,
    file_prefix: str | os.PathLike[str] | TFTensor,
    tensor_names: Sequence[str] | TFTensor,
    shape_and_slices: Sequence[str] | TFTensor,
    tensors: Sequence[TFTensor],
    **kwargs: Any,
) -> SaveResult | SaveFuture:
    """Save DTensors and DVariables from every TF client into one checkpoint (``dtensor.sharded_save``).

    Every client calls this alike.  Each tensor is a DTensor or DVariable on ``mesh``;
    a plain ``tf.Tensor``, ``tf.Variable`` or array is taken as replicated.  Each
    distinct shard is written once, by one client; the checkpoint is complete on
    disk when the call returns on any client.  ``shape_and_slices[i]`` may name
    the slice of a larger variable that ``tensors[i]`` holds (SaveV2's syntax),
    which TF DTensor refuses.  Keyword arguments are `shardckpt.sharded_save`'s
    (``coordinator``, ``timeout``, ``overwrite``, ``durable``, ``blocking``, ...);
    the coordinator defaults to `default_coordinator`.
    """
    if kwargs.get("coordinator") is None:
        kwargs["coordinator"] = default_coordinator()
    return _save.sharded_save(to_mesh(mesh), _string(file_prefix), _strings(tensor_names),
                              _strings(shape_and_slices), [_local_value(t) for t in tensors], **kwargs)


def name_based_save(mesh: TFMesh, file_prefix: str | os.PathLike[str] | TFTensor,
                    name_tensor_map: Mapping[str, TFTensor], **kwargs: Any) -> SaveResult | SaveFuture:
    """Save ``{name: DTensor or DVariable}`` whole (``dtensor.name_based_save``); see `sharded_save`."""
    names = list(name_tensor_map)
    return sharded_save(mesh, file_prefix, names, [""] * len(names), [name_tensor_map[n] for n in names],
                        **kwargs)


def sharded_restore(
    mesh: TFMesh,
    file_prefix: str | os.PathLike[str] | TFTensor,
    tensor_names: Sequence[str],
    targets: Sequence[TFTensor | TFLayout],
    *,
    shape_and_slices: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[TFTensor]:
    """Restore each named tensor (or the slice ``shape_and_slices[i]`` of it) into ``targets[i]``.

    A target is a DTensor or DVariable (its shape and dtype must match what is read;
    a DVariable is assigned in place) or a ``dtensor.Layout``.  Returns DTensors on
    the targets' layouts, built with ``dtensor.pack`` from this client's shards
    only.  Each target is restored on its own layout's mesh (TF requires that to
    be ``mesh``; shardckpt does not).  The checkpoint may come from any mesh, any
    number of clients, shardckpt or TensorFlow.  No collective is involved.
    Keyword arguments go to `shardckpt.sharded_restore` (``verify``, ``threads``).
    """
    del mesh  # the layouts carry their meshes; kept for TF's signature
    names = _strings(tensor_names)
    if len(names) != len(targets):
        raise InvalidArgumentError(f"{len(names)} names but {len(targets)} targets")
    specs = [""] * len(names) if shape_and_slices is None else _strings(shape_and_slices)
    if len(specs) != len(names):
        raise InvalidArgumentError(f"{len(names)} names but {len(specs)} shape_and_slices")
    prefix = _string(file_prefix)
    tf_layouts: list[TFLayout] = []
    expected: list[tuple[tuple[int, ...], np.dtype] | None] = []
    for name, target in zip(names, targets):
        if isinstance(target, tf.Variable) or tf.is_tensor(target):
            value = target.read_value() if isinstance(target, tf.Variable) else target
            if not _dtensor.is_dtensor(value):
                raise InvalidArgumentError(f"{prefix}: target of {name} must be a DTensor, DVariable or Layout")
            tf_layouts.append(_dtensor.fetch_layout(value))
            expected.append((tuple(int(d) for d in target.shape), _np_dtype(target.dtype)))
        elif isinstance(target, _dtensor.Layout):
            tf_layouts.append(target)
            expected.append(None)
        else:
            raise InvalidArgumentError(f"{prefix}: target of {name} is a {type(target).__name__}, "
                                       "not a DTensor, DVariable or Layout")
    layouts = [to_layout(lay) for lay in tf_layouts]
    by_mesh: dict[Mesh, list[int]] = {}
    for i, layout in enumerate(layouts):
        by_mesh.setdefault(layout.mesh, []).append(i)
    restored: list[DTensor | None] = [None] * len(names)
    for ours, idx in by_mesh.items():
        got = _restore.sharded_restore(ours, prefix, [names[i] for i in idx], [layouts[i] for i in idx],
                                       shape_and_slices=[specs[i] for i in idx], **kwargs)
        for i, value in zip(idx, got):
            restored[i] = value
    values: list[DTensor] = []
    for name, want, value in zip(names, expected, restored):  # check every target before assigning any
        assert value is not None
        if want is not None and want[0] != value.shape:
            raise ShapeMismatchError(f"{prefix}: tensor {name} is {list(value.shape)} in the checkpoint, "
                                     f"the target is {list(want[0])}")
        if want is not None and want[1] != value.dtype:
            raise DTypeMismatchError(f"{prefix}: tensor {name} is {value.dtype} in the checkpoint, "
                                     f"the target is {want[1]}")
        values.append(value)
    out = [to_tf(value, tf_layout) for value, tf_layout in zip(values, tf_layouts)]
    for target, packed in zip(targets, out):
        if isinstance(target, tf.Variable):
            target.assign(packed)
    return out


def name_based_restore(
    mesh: TFMesh,
    file_prefix: str | os.PathLike[str] | TFTensor,
    name_tensor_map: Mapping[str, TFTensor | TFLayout],
    **kwargs: Any,
) -> dict[str, TFTensor]:
    """Restore ``{name: DTensor, DVariable or dtensor.Layout}`` (``dtensor.name_based_restore``).

    DVariables are assigned in place; every restored value is returned as a DTensor
    on its target's layout, by name.  See `sharded_restore`.
    """
    names = list(name_tensor_map)
    values = sharded_restore(mesh, file_prefix, names, [name_tensor_map[n] for n in names], **kwargs)
    return dict(zip(names, values))
