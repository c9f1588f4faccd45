"""Meshes: a named, row-major grid of logical devices, split among clients.

A device's coordinates are the row-major position of its id in ``device_ids``.
Unless told otherwise, client ``c`` of ``n`` owns the ``c``-th contiguous block of
``device_ids`` (DTensor's rule for distributed meshes); blocks may be uneven.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Mesh:
    """A named grid of devices: ``dim_names`` and ``shape``, ``device_ids`` (default ``0..size-1``) placed row-major.

    ``local_device_ids`` names this client's devices when they are not its contiguous block.  Raises
    `InvalidArgumentError` for duplicate or reserved names, non-positive sizes, or ids that do not fit.
    """
    dim_names: tuple[str, ...]
    shape: tuple[int, ...]
    device_ids: tuple[int, ...] = ()
    local_device_ids: tuple[int, ...] | None = None
    name: str = ""
    _position: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    _coords: dict[int, dict[str, int]] = field(default_factory=dict, init=False, repr=False, compare=False,
                                               hash=False)

    def __init__(
        self,
        dim_names: Sequence[str],
        shape: Sequence[int],
        *,
        device_ids: Sequence[int] | None = None,
        local_device_ids: Sequence[int] | None = None,
        name: str = "",
    ) -> None:
        names, dims = tuple(dim_names), tuple(int(s) for s in shape)
        if len(names) != len(dims):
            raise InvalidArgumentError(f"mesh has {len(names)} dim names but {len(dims)} sizes")
        if len(set(names)) != len(names) or any(not n or n in ("unsharded", "any", "match") for n in names):
            raise InvalidArgumentError(f"mesh dim names must be unique and not reserved: {list(names)}")
        if any(s <= 0 for s in dims):
            raise InvalidArgumentError(f"mesh dims must be positive: {list(dims)}")
        size = math.prod(dims)
        ids = tuple(range(size)) if device_ids is None else tuple(int(i) for i in device_ids)
        if len(ids) != size or len(set(ids)) != size:
            raise InvalidArgumentError(f"mesh of shape {list(dims)} needs {size} distinct device ids, got {list(ids)}")
        local = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
        if local is not None and not set(local) <= set(ids):
            raise InvalidArgumentError(f"local device ids {list(local)} are not all in the mesh")
        object.__setattr__(self, "dim_names", names)
        object.__setattr__(self, "shape", dims)
        object.__setattr__(self, "device_ids", ids)
        object.__setattr__(self, "local_device_ids", local)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_position", {d: i for i, d in enumerate(ids)})
        object.__setattr__(self, "_coords", {})

    @property
    def size(self) -> int:
        """The number of devices in the mesh."""
        return len(self.device_ids)

    def dim_size(self, name: str) -> int:
        """The size of mesh dimension ``name``; raises `InvalidArgumentError` for a name the mesh lacks."""
        try:
            return self.shape[self.dim_names.index(name)]
        except ValueError:
            raise InvalidArgumentError(f"mesh has no dimension {name!r} (dims: {list(self.dim_names)})") from None

    def coords(self, device_id: int) -> dict[str, int]:
        """The device's coordinate along every mesh dim (computed once per device)."""
        cached = self._coords.get(device_id)
        if cached is not None:
            return cached
        pos = self._position.get(device_id)
        if pos is None:
            raise InvalidArgumentError(f"device {device_id} is not in the mesh")
        out = {}
        for name, size in zip(reversed(self.dim_names), reversed(self.shape)):
            out[name] = pos % size
            pos //= size
        cached = self._coords[device_id] = {n: out[n] for n in self.dim_names}
        return cached

    def client_devices(self, client: int, num_clients: int) -> tuple[int, ...]:
        """The ``client``-th contiguous block of ``device_ids`` (DTensor's rule); blocks may be uneven."""
        if not 0 <= client < num_clients:
            raise InvalidArgumentError(f"client {client} is not in 0..{num_clients - 1}")
        if num_clients > self.size:
            raise InvalidArgumentError(f"{num_clients} clients cannot share a mesh of {self.size} devices")
        lo = client * self.size // num_clients
        hi = (client + 1) * self.size // num_clients
        return self.device_ids[lo:hi]

    def local_devices(self, client: int, num_clients: int) -> tuple[int, ...]:
        """Devices of ``client``: ``local_device_ids`` when the mesh names them, else its contiguous block."""
        if self.local_device_ids is not None:
            return self.local_device_ids
        return self.client_devices(client, num_clients)

    def owner(self, device_id: int, num_clients: int) -> int:
        """The client that holds ``device_id`` under the contiguous-block rule."""
        return _block_of(self._position[device_id], self.size, num_clients)

    def to_string(self) -> str:
        """DTensor's mesh string: ``name|x=2,y=4|global ids|local ids|local devices``."""
        dims = ",".join(f"{n}={s}" for n, s in zip(self.dim_names, self.shape))
        local = self.local_device_ids if self.local_device_ids is not None else self.device_ids
        devices = ",".join(f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in local)
        return f"{self.name}|{dims}|{_ids(self.device_ids)}|{_ids(local)}|{devices}"

    @classmethod
    def from_string(cls, text: str) -> Mesh:
        """Parse DTensor's mesh string.  DTensor places a device by its id (the row-major offset), not by
        where the string lists it, so the ids are kept sorted: ``|x=2|1,0|...`` puts device 0 at x=0."""
        parts = text.split("|")
        if len(parts) < 4:
            raise InvalidArgumentError(f"not a mesh string: {text!r}")
        name, dims, global_ids, local_ids = parts[:4]
        names, sizes = [], []
        for item in filter(None, dims.split(",")):
            n, _, s = item.partition("=")
            if not s.isdigit():
                raise InvalidArgumentError(f"bad mesh dimension {item!r} in {text!r}")
            names.append(n)
            sizes.append(int(s))
        try:
            ids = [int(i) for i in filter(None, global_ids.split(","))]
            local = [int(i) for i in filter(None, local_ids.split(","))]
        except ValueError:
            raise InvalidArgumentError(f"bad device ids in mesh string {text!r}") from None
        return cls(names, sizes, device_ids=sorted(ids) or None, local_device_ids=local if local_ids else None,
                   name=name)

    def __str__(self) -> str:
        return self.to_string()


def _ids(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids)


def _block_of(pos: int, size: int, num_clients: int) -> int:
    # Inverse of client_devices' block bounds: the client c with c*size//n <= pos < (c+1)*size//n.
    c = pos * num_clients // size
    while (c + 1) * size // num_clients <= pos:
        c += 1
    while c * size // num_clients > pos:
        c -= 1
    return c


def this_client() -> tuple[int, int] | None:
    """(rank, client count) of this process in the job it was started as, or None when it is on its own.

    Read from what the launcher or an initialised engine already holds, in the order coordination's engine
    detection uses: ``shardckpt launch``'s variables, then torch.distributed, JAX's distributed runtime,
    TensorFlow DTensor's variables and MPI.  Nothing is imported or initialised here.
    """
    rank, size = os.environ.get("SHARDCKPT_RANK", ""), os.environ.get("SHARDCKPT_WORLD_SIZE", "")
    if os.environ.get("SHARDCKPT_COORDINATOR") and rank.isdigit() and size.isdigit():
        return int(rank), int(size)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    jax_dist = sys.modules.get("jax._src.distributed")
    state = getattr(jax_dist, "global_state", None)
    if state is not None and getattr(state, "client", None) is not None:
        return int(state.process_id), int(state.num_processes)
    rank, size = os.environ.get("DTENSOR_CLIENT_ID", ""), os.environ.get("DTENSOR_NUM_CLIENTS", "")
    if "tensorflow" in sys.modules and os.environ.get("DTENSOR_JOBS") and rank.isdigit() and size.isdigit():
        return int(rank), int(size)
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        return int(mpi.COMM_WORLD.Get_rank()), int(mpi.COMM_WORLD.Get_size())
    return None


def create_mesh(dims: Sequence[tuple[str, int]], *, device_ids: Sequence[int] | None = None,
                local_device_ids: Sequence[int] | None = None, name: str = "") -> Mesh:
    """``create_mesh([("x", 2), ("y", 4)])``, as ``tf.experimental.dtensor.create_mesh``.

    As DTensor's ``create_distributed_mesh``, a process that is client ``r`` of ``n`` (started by ``shardckpt
    launch``, or with torch.distributed, JAX's distributed runtime, TF DTensor or MPI initialised) gets a mesh
    whose ``local_device_ids`` are its contiguous block of ``device_ids``, so `DTensor.from_global` keeps only
    this client's shards; pass ``local_device_ids`` to say otherwise.  A mesh with fewer devices than clients
    names no local devices (a restore then asks its coordinator).
    """
    mesh = Mesh([d for d, _ in dims], [s for _, s in dims], device_ids=device_ids,
                local_device_ids=local_device_ids, name=name)
    if local_device_ids is not None:
        return mesh
    client = this_client()
    if client is None or client[1] <= 1 or client[1] > mesh.size or not 0 <= client[0] < client[1]:
        return mesh
    return Mesh(mesh.dim_names, mesh.shape, device_ids=mesh.device_ids,
                local_device_ids=mesh.client_devices(*client), name=name)
