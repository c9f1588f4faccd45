"""Who writes what: the deterministic save plan every client computes from the shared arguments.

Each distinct shard (a box of a tensor) is written exactly once.  A shard held by
devices of one client is written by that client; a shard replicated across
clients goes, largest first, to the holder client with the fewest bytes so far
(ties to the lower client index).  Every client runs the same computation on the
same agreed inputs, so no extra communication is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DuplicateTensorError, InvalidArgumentError
from .layout import Layout

Bounds = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SaveTensor:
    """One argument of a save: a region (the user's slice) of a tensor, laid out over the mesh."""

    name: str
    dtype: int
    itemsize: int
    full_shape: tuple[int, ...]
    region: Bounds
    layout: Layout

    @property
    def region_shape(self) -> tuple[int, ...]:
        """The shape of the saved region."""
        return tuple(hi - lo for lo, hi in self.region)


@dataclass(frozen=True)
class WriteItem:
    """One write of the plan: the ``box`` of save argument ``arg`` that ``client`` writes from ``device``'s shard.

    ``nbytes`` is the box's size in bytes.
    """
    arg: int
    box: Bounds  # in full-tensor coordinates
    device: int  # a device whose local shard holds this box
    client: int
    nbytes: int
    within: Bounds | None = None  # the box inside that shard when it is only part of it (a split replica)


SPLIT_BYTES = 4 << 20  # a shard replicated across clients and larger than this is split among them


def _shards(t: SaveTensor, devices: Sequence[int]) -> dict[Bounds, list[int]]:
    """Distinct non-empty boxes of ``t`` (full-tensor coordinates) and the devices holding each."""
    if t.layout.is_fully_replicated():
        return {t.region: list(devices)}
    out: dict[Bounds, list[int]] = {}
    shape = t.region_shape
    for d in devices:
        local = t.layout.shard_bounds(shape, d)
        if any(lo >= hi for lo, hi in local):
            continue
        box = tuple((r0 + lo, r0 + hi) for (lo, hi), (r0, _) in zip(local, t.region))
        out.setdefault(box, []).append(d)
    if not out:  # a tensor without elements is still saved, once, whole
        out[t.region] = list(devices)
    return out


def check_disjoint_regions(tensors: Sequence[SaveTensor]) -> None:
    """The slices given for one name must not repeat or overlap (the merged index could not hold them)."""
    by_name: dict[str, list[Bounds]] = {}
    for t in tensors:
        regions = by_name.setdefault(t.name, [])
        for other in regions:
            if all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(other, t.region)) or (
                other == t.region
            ):
                raise DuplicateTensorError(f"tensor {t.name}: slices {other} and {t.region} overlap")
        regions.append(t.region)


def plan_save(tensors: Sequence[SaveTensor], devices_by_client: Sequence[Sequence[int]],
              split_bytes: int = SPLIT_BYTES) -> list[WriteItem]:
    """Every client's writes, in argument order (so data files hold tensors in call order).

    ``split_bytes=0`` turns off the splitting of large replicated shards.
    """
    owner: dict[int, int] = {}
    for client, devices in enumerate(devices_by_client):
        for d in devices:
            if d in owner:
                raise InvalidArgumentError(f"device {d} is claimed by clients {owner[d]} and {client}")
            owner[d] = client
    check_disjoint_regions(tensors)
    load = [0] * len(devices_by_client)
    items: list[WriteItem] = []
    shared: list[tuple[int, int, Bounds, Sequence[int]]] = []
    # Holder sets repeat (every replicated tensor has the same ones): their clients, and each client's
    # first device, are worked out once per distinct set.
    holder_info: dict[tuple[int, ...], tuple[list[int], dict[int, int]]] = {}

    def info(holders: Sequence[int]) -> tuple[list[int], dict[int, int]]:
        key = holders if isinstance(holders, tuple) else tuple(holders)
        found = holder_info.get(key)
        if found is None:
            first: dict[int, int] = {}
            for d in sorted(holders):
                first.setdefault(owner[d], d)
            found = holder_info[key] = (sorted(first), first)
        return found

    checked_meshes: set[int] = set()
    for arg, t in enumerate(tensors):
        mesh_devices = t.layout.mesh.device_ids
        if id(t.layout.mesh) not in checked_meshes:
            missing = [d for d in mesh_devices if d not in owner]
            if missing:
                raise InvalidArgumentError(f"tensor {t.name}: mesh devices {missing[:8]} belong to no client")
            checked_meshes.add(id(t.layout.mesh))
        # Most small tensors are replicated: one box, held by the whole mesh (a tuple, hashed once in `info`).
        boxes: list[tuple[Bounds, Sequence[int]]] = (
            [(t.region, mesh_devices)] if t.layout.is_fully_replicated() else list(_shards(t, mesh_devices).items()))
        for box, holders in boxes:
            nbytes = max(t.itemsize, 1)
            for lo, hi in box:
                nbytes *= hi - lo
            if len(info(holders)[0]) == 1:
                client = owner[holders[0]]
                load[client] += nbytes
                items.append(WriteItem(arg, box, min(holders), client, nbytes))
            else:
                shared.append((nbytes, arg, box, holders))
    # A large shard held by several clients is cut along its first dimension that can be cut, one piece
    # per holder client (each piece a valid TF slice), so the replicas share its bytes.
    pieces: list[tuple[int, int, Bounds, Bounds, Sequence[int]]] = []
    for nbytes, arg, box, holders in shared:
        if not split_bytes or nbytes <= split_bytes:
            pieces.append((nbytes, arg, box, box, holders))
            continue
        cut = next((d for d, (lo, hi) in enumerate(box) if hi - lo >= 2), None)
        k = 1
        if cut is not None:
            lo, hi = box[cut]
            k = min(len(info(holders)[0]), -(-nbytes // split_bytes), hi - lo)
        if k <= 1 or cut is None:
            pieces.append((nbytes, arg, box, box, holders))
            continue
        for i in range(k):
            a, b = lo + (hi - lo) * i // k, lo + (hi - lo) * (i + 1) // k
            sub = box[:cut] + ((a, b),) + box[cut + 1 :]
            pieces.append((nbytes * (b - a) // (hi - lo), arg, sub, box, holders))
    # Largest first, each to the least-loaded holder client (ties: the lowest client index).
    pieces.sort(key=lambda s: (-s[0], s[1], s[2]))
    for nbytes, arg, sub, box, holders in pieces:
        holder_clients, first = info(holders)
        client = min(holder_clients, key=load.__getitem__)
        load[client] += nbytes
        within = None if sub == box else tuple((a - o, b - o) for (a, b), (o, _) in zip(sub, box))
        items.append(WriteItem(arg, sub, first[client], client, nbytes, within))
    items.sort(key=lambda it: (it.arg, it.box))
    return items
