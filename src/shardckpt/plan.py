"""Who writes what: each client's share of a save, computed by that client alone from the agreed arguments.

Each distinct shard (a box of a tensor) is written exactly once.  A shard held by
devices of one client is written by that client.  A shard held by several clients
(a replica) is given to one of them by a rule that only needs the shard's *holder
set* (the clients holding it): every holder enumerates, from its own shards, all
the replicas that set holds, and deals them out the same way, largest first, to the
holder with the fewest bytes of that set so far (ties in an order rotated by the
set, so sets sharing a lowest client do not all pick it).  A replica larger than
`SPLIT_BYTES` is first cut into one piece per holder.

A client therefore plans in O(its own shards + tensors), never visiting another
client's devices: `plan_local`.  `plan_save` is the union of every client's local
plan (for tests and tools), and `check_partition` proves such a union writes every
element of every tensor exactly once.
"""

from __future__ import annotations

import heapq
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .errors import DuplicateTensorError, InvalidArgumentError
from .layout import Layout, _axes
from .mesh import Mesh

Bounds = tuple[tuple[int, int], ...]


class SaveTensor(NamedTuple):
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


class WriteItem(NamedTuple):
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

# tuple.__new__ builds a NamedTuple without its Python-level __new__: a save of 100,000 tensors makes 100,000.
_new = tuple.__new__


class Owners:
    """Which client owns each device: each client's contiguous block of ``mesh`` (``devices_by_client`` None),
    or explicit lists (a mesh naming ``local_device_ids``)."""

    def __init__(self, mesh: Mesh, num_clients: int, devices_by_client: Sequence[Sequence[int]] | None = None):
        self.mesh, self.num_clients = mesh, num_clients
        self._table: dict[int, int] | None = None
        if devices_by_client is not None:
            if len(devices_by_client) != num_clients:
                raise InvalidArgumentError(f"{len(devices_by_client)} device lists for {num_clients} clients")
            table: dict[int, int] = {}
            for client, devices in enumerate(devices_by_client):
                for d in devices:
                    if table.setdefault(d, client) != client:
                        raise InvalidArgumentError(f"device {d} is claimed by clients {table[d]} and {client}")
            self._table = table
            self._lists = [tuple(devices) for devices in devices_by_client]

    def devices(self, client: int) -> tuple[int, ...]:
        """The devices of ``client``."""
        if self._table is not None:
            return self._lists[client]
        return self.mesh.client_devices(client, self.num_clients)

    def of(self, device: int) -> int | None:
        """The client owning ``device``, or None."""
        if self._table is not None:
            return self._table.get(device)
        try:
            return self.mesh.owner(device, self.num_clients)
        except KeyError:
            return None


def check_disjoint_regions(tensors: Sequence[SaveTensor]) -> None:
    """The slices given for one name must not repeat or overlap (the merged index could not hold them)."""
    if len({t.name for t in tensors}) == len(tensors):
        return  # every name once: nothing can overlap
    by_name: dict[str, list[Bounds]] = {}
    for t in tensors:
        regions = by_name.get(t.name)
        if regions is None:
            by_name[t.name] = [t.region]
            continue
        for other in regions:
            if all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(other, t.region)) or (
                other == t.region
            ):
                raise DuplicateTensorError(f"tensor {t.name}: slices {other} and {t.region} overlap")
        regions.append(t.region)


class _Group:
    """The clients holding a set of devices, and this client's first device among them."""

    __slots__ = ("clients", "first")

    def __init__(self, clients: tuple[int, ...], first: int) -> None:
        self.clients, self.first = clients, first


def _replica_positions(mesh: Mesh, axes: frozenset[str], coords: dict[str, int]) -> list[int]:
    """Row-major positions of the devices agreeing with ``coords`` on ``axes`` (the free dims vary)."""
    positions = [0]
    for name, size in zip(mesh.dim_names, mesh.shape):
        if name in axes:
            positions = [p * size + coords[name] for p in positions]
        else:
            positions = [p * size + i for p in positions for i in range(size)]
    return positions


# A piece of a replica, before it is dealt: (nbytes, arg, sub-box, box, this client's device).
_Piece = tuple[int, int, Bounds, Bounds, int]


def plan_local(tensors: Sequence[SaveTensor], client: int, owners: Owners,
               split_bytes: int = SPLIT_BYTES) -> list[WriteItem]:
    """The writes of ``client``, in argument order (so its data file holds tensors in call order).

    ``split_bytes=0`` turns off the splitting of large replicated shards.  Raises `InvalidArgumentError`
    when a tensor's mesh holds a device of no client, `DuplicateTensorError` for overlapping slices.
    """
    check_disjoint_regions(tensors)
    mine = owners.devices(client)
    items: list[WriteItem] = []
    shared: dict[tuple[int, ...], list[_Piece]] = {}
    # Per distinct mesh: this client's devices in it, and the holder group of the whole mesh.
    per_mesh: dict[int, tuple[list[int], _Group | None]] = {}
    # Per (mesh, sharding axes, coordinates on them): the holder group of one replica set.
    groups: dict[tuple[int, frozenset[str], tuple[int, ...]], _Group] = {}

    def clients_of(t: SaveTensor, devices: Sequence[int]) -> tuple[int, ...]:
        clients: set[int] = set()
        for d in devices:
            c = owners.of(d)
            if c is None:
                raise InvalidArgumentError(f"tensor {t.name}: mesh device {d} belongs to no client")
            clients.add(c)
        return tuple(sorted(clients))

    for arg, t in enumerate(tensors):
        mesh = t.layout.mesh
        found = per_mesh.get(id(mesh))
        if found is None:
            in_mesh = set(mesh.device_ids)
            local = [d for d in mine if d in in_mesh]
            everyone = clients_of(t, mesh.device_ids)  # also refuses a mesh device no client owns
            found = per_mesh[id(mesh)] = (local, _Group(everyone, min(local)) if local else None)
        local, whole = found
        if not local:
            continue
        nbytes_item = t.itemsize or 1
        region = t.region
        count = 1
        for lo, hi in region:
            count *= hi - lo
        if count == 0 or t.layout.is_fully_replicated():
            # Also a tensor without elements: saved once, whole, by the holders of the whole mesh.
            assert whole is not None
            nbytes_item *= count
            if len(whole.clients) == 1:
                items.append(_new(WriteItem, (arg, region, whole.first, client, nbytes_item, None)))
            else:
                shared.setdefault(whole.clients, []).append((nbytes_item, arg, region, region, whole.first))
            continue
        axes = frozenset(a for spec in t.layout.sharding_specs for a in _axes(spec))
        shape = t.region_shape
        boxes: dict[Bounds, tuple[int, tuple[int, ...]]] = {}
        for d in local:  # in device order, so a box keeps its lowest local device
            bounds = t.layout.shard_bounds(shape, d)
            if any(lo >= hi for lo, hi in bounds):
                continue
            box = tuple((r0 + lo, r0 + hi) for (lo, hi), (r0, _) in zip(bounds, region))
            if box in boxes:
                continue
            coords = mesh.coords(d)
            key = (id(mesh), axes, tuple(coords[a] for a in sorted(axes)))
            g = groups.get(key)
            if g is None:
                ids = mesh.device_ids
                holders = [ids[p] for p in _replica_positions(mesh, axes, coords)]
                held = set(holders)
                g = groups[key] = _Group(clients_of(t, holders), min(x for x in local if x in held))
            boxes[box] = (g.first, g.clients)
        for box, (device, clients) in boxes.items():
            nbytes = nbytes_item
            for lo, hi in box:
                nbytes *= hi - lo
            if len(clients) == 1:
                items.append(WriteItem(arg, box, device, client, nbytes))
            else:
                shared.setdefault(clients, []).append((nbytes, arg, box, box, device))
    for clients, pieces in shared.items():
        items.extend(_deal(clients, pieces, client, split_bytes))
    if shared:
        items.sort(key=lambda it: (it.arg, it.box))
    return items


def _deal(clients: tuple[int, ...], replicas: list[_Piece], me: int, split_bytes: int) -> list[WriteItem]:
    """The replicas held by ``clients`` that ``me`` writes: every holder computes the same deal."""
    k_all = len(clients)
    # A large replica is cut along its first dimension that can be cut, one piece per holder client
    # (each piece a valid TF slice), so the holders share its bytes.
    pieces: list[_Piece] = []
    for nbytes, arg, box, _, device in replicas:
        cut = next((d for d, (lo, hi) in enumerate(box) if hi - lo >= 2), None) if split_bytes else None
        if cut is None or nbytes <= split_bytes:
            pieces.append((nbytes, arg, box, box, device))
            continue
        lo, hi = box[cut]
        k = min(k_all, -(-nbytes // split_bytes), hi - lo)
        if k <= 1:
            pieces.append((nbytes, arg, box, box, device))
            continue
        for i in range(k):
            a, b = lo + (hi - lo) * i // k, lo + (hi - lo) * (i + 1) // k
            sub = box[:cut] + ((a, b),) + box[cut + 1 :]
            pieces.append((nbytes * (b - a) // (hi - lo), arg, sub, box, device))
    pieces.sort(key=lambda s: (-s[0], s[1], s[2]))
    # Ties go to holders in an order rotated by a checksum of the set, the same on every holder.
    shift = zlib.crc32(struct.pack(f"<{k_all}q", *clients)) % k_all
    heap = [(0, (i - shift) % k_all, c) for i, c in enumerate(clients)]
    heapq.heapify(heap)
    out: list[WriteItem] = []
    for nbytes, arg, sub, box, device in pieces:
        load, rank, c = heap[0]
        heapq.heapreplace(heap, (load + nbytes, rank, c))
        if c == me:
            within = None if sub == box else tuple((a - o, b - o) for (a, b), (o, _) in zip(sub, box))
            out.append(WriteItem(arg, sub, device, me, nbytes, within))
    return out


def plan_save(tensors: Sequence[SaveTensor], devices_by_client: Sequence[Sequence[int]],
              split_bytes: int = SPLIT_BYTES) -> list[WriteItem]:
    """Every client's writes (the union of their local plans), in argument order, for tests and tools.

    Every tensor's mesh must lie within the devices listed.
    """
    universe = sorted({d for devices in devices_by_client for d in devices})
    if not universe:
        raise InvalidArgumentError("no client holds a device")
    owners = Owners(Mesh(["all"], [len(universe)], device_ids=universe), len(devices_by_client),
                    devices_by_client)
    items = [it for c in range(len(devices_by_client)) for it in plan_local(tensors, c, owners, split_bytes)]
    items.sort(key=lambda it: (it.arg, it.box))
    return items


def check_partition(tensors: Sequence[SaveTensor], items: Sequence[WriteItem],
                    holders: Callable[[int, int], bool] | None = None) -> None:
    """Raise AssertionError unless ``items`` write every element of every tensor's region exactly once.

    ``holders(arg, device)``, when given, must hold for each item's device (it holds that shard).  Costs
    O(elements): for tests.
    """
    import numpy as np

    for arg, t in enumerate(tensors):
        mine = [it for it in items if it.arg == arg]
        shape = t.region_shape
        if not all(shape):
            assert len(mine) == 1 and mine[0].box == t.region, (t.name, mine)
            continue
        count = np.zeros(shape, np.int64)
        for it in mine:
            count[tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(it.box, t.region))] += 1
            assert it.nbytes == max(t.itemsize, 1) * int(np.prod([hi - lo for lo, hi in it.box])), it
            if holders is not None:
                assert holders(arg, it.device), (t.name, it)
        assert (count == 1).all(), (t.name, count)
