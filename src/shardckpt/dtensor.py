"""A numpy DTensor: global shape, dtype, layout, and the shards this client holds, by device id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError, ShapeMismatchError
from .layout import Layout


@dataclass
class DTensor:
    """A tensor sharded over a mesh: its global ``shape``, ``dtype`` and ``layout``, and this client's ``shards``.

    ``shards`` maps device id to that device's block of the global array; a shard whose shape disagrees with
    the layout raises `ShapeMismatchError`.
    """
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: Layout
    shards: dict[int, np.ndarray]

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = np.dtype(self.dtype)
        if self.layout.is_fully_replicated():
            for device, shard in self.shards.items():
                if tuple(shard.shape) != self.shape:
                    raise ShapeMismatchError(
                        f"shard of device {device} has shape {list(shard.shape)}; the tensor is replicated, "
                        f"so it must be the global shape {list(self.shape)}"
                    )
            return
        for device, shard in self.shards.items():
            bounds = self.layout.shard_bounds(self.shape, device)
            want = tuple(hi - lo for lo, hi in bounds)
            if tuple(shard.shape) != want:
                raise ShapeMismatchError(
                    f"shard of device {device} has shape {list(shard.shape)}, layout gives {list(want)} "
                    f"for global shape {list(self.shape)}"
                )

    @classmethod
    def replicated(cls, array: np.ndarray, layout: Layout, devices: Sequence[int]) -> DTensor:
        """``array`` on every device of ``devices`` under a replicated ``layout`` (no per-shard checks)."""
        t = cls.__new__(cls)
        t.shape, t.dtype, t.layout, t.shards = tuple(array.shape), array.dtype, layout, {d: array for d in devices}
        return t

    @classmethod
    def from_global(cls, array: object, layout: Layout, local_device_ids: Sequence[int] | None = None) -> DTensor:
        """Keep the shards of ``array`` (which every client has) that this client's devices hold, as views."""
        arr = np.asarray(array)
        devices = layout.mesh.local_device_ids if local_device_ids is None else local_device_ids
        if devices is None:
            devices = layout.mesh.device_ids
        shards = {}
        for d in devices:
            box = layout.shard_bounds(arr.shape, d)
            shards[d] = arr[tuple(slice(lo, hi) for lo, hi in box)]
        return cls(arr.shape, arr.dtype, layout, shards)

    def bounds(self, device_id: int) -> tuple[tuple[int, int], ...]:
        """The half-open ``(start, stop)`` per dimension of the block ``device_id`` holds."""
        return self.layout.shard_bounds(self.shape, device_id)

    def to_numpy(self) -> np.ndarray:
        """The global array; needs every device's shard locally (one client, or a replicated layout)."""
        out = np.empty(self.shape, self.dtype)
        covered = np.zeros(self.shape, bool) if out.size else None
        for device, shard in self.shards.items():
            box = tuple(slice(lo, hi) for lo, hi in self.bounds(device))
            out[box] = shard
            if covered is not None:
                covered[box] = True
        if covered is not None and not covered.all():
            raise InvalidArgumentError("to_numpy needs every shard; this client holds only some of them")
        return out

    def __repr__(self) -> str:
        return (f"DTensor(shape={list(self.shape)}, dtype={self.dtype}, layout={list(self.layout.sharding_specs)}, "
                f"local devices={sorted(self.shards)})")


def pack(shards: Sequence[object] | Mapping[int, object], layout: Layout,
         local_device_ids: Sequence[int] | None = None) -> DTensor:
    """Build a DTensor from this client's shards, one per local device in order (as ``dtensor.pack``)."""
    if isinstance(shards, Mapping):
        by_device = {int(d): np.asarray(s) for d, s in shards.items()}
    else:
        devices = local_device_ids if local_device_ids is not None else layout.mesh.local_device_ids
        if devices is None:
            devices = layout.mesh.device_ids
        if len(devices) != len(shards):
            raise InvalidArgumentError(f"{len(shards)} shards for {len(devices)} local devices")
        by_device = {int(d): np.asarray(s) for d, s in zip(devices, shards)}
    if not by_device:
        raise InvalidArgumentError("pack needs at least one shard")
    first = next(iter(by_device.values()))
    # The global shape follows from any device's shard and the layout: sum pieces along sharded dims.
    shape = []
    for dim, spec in enumerate(layout.sharding_specs):
        k = layout.num_shards(dim)
        if k == 1:
            shape.append(first.shape[dim])
            continue
        sizes: dict[tuple[int, ...], int] = {}
        axes = spec if isinstance(spec, tuple) else (spec,)
        for d, s in by_device.items():
            coords = layout.mesh.coords(d)
            sizes[tuple(coords[a] for a in axes)] = s.shape[dim]
        if len(sizes) == k:
            shape.append(sum(sizes.values()))
        else:
            # Not every piece is local: assume the even split DTensor requires.
            shape.append(max(sizes.values()) * k)
    return DTensor(tuple(shape), first.dtype, layout, by_device)


def unpack(t: DTensor) -> list[np.ndarray]:
    """This client's shards in device order (as ``dtensor.unpack``)."""
    return [t.shards[d] for d in sorted(t.shards)]
