"""Layouts: which mesh dimension (if any) shards each tensor dimension, and the shard each device holds.

A tensor dim of size ``n`` sharded over a mesh dim of size ``k`` splits into ``k``
pieces of ``ceil(n / k)`` elements, the last ones shorter or empty (torch's
``chunk`` rule).  When ``k`` divides ``n`` this is exactly DTensor's split; unlike
DTensor, uneven dims are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InvalidArgumentError
from .mesh import Mesh

UNSHARDED = "unsharded"

Bounds = tuple[tuple[int, int], ...]


Spec = str | tuple[str, ...]


def _axes(spec: Spec) -> tuple[str, ...]:
    if isinstance(spec, tuple):
        return spec
    return () if spec == UNSHARDED else (spec,)


@dataclass(frozen=True)
class Layout:
    """Per tensor dim: ``UNSHARDED``, a mesh dim name, or a tuple of mesh dim names.

    A tuple shards the dim over several mesh dims, outermost first, by nested splits (JAX's
    ``P(("x", "y"))``, torch's ``[Shard(0), Shard(0)]``); DTensor itself allows one name per dim.
    """

    sharding_specs: tuple[Spec, ...]
    mesh: Mesh
    # Asked once per tensor per client by every save and restore: 100,000 tensors ask it 100,000 times.
    _replicated: bool = field(init=False, repr=False, compare=False)

    def __init__(self, sharding_specs: Sequence[Spec], mesh: Mesh) -> None:
        specs: tuple[Spec, ...] = tuple(
            tuple(s) if isinstance(s, (tuple, list)) and len(s) != 1 else (s[0] if isinstance(s, (tuple, list)) else s)
            for s in sharding_specs
        )
        specs = tuple(UNSHARDED if s == () else s for s in specs)
        used = [axis for s in specs for axis in _axes(s)]
        if len(set(used)) != len(used):
            raise InvalidArgumentError(f"a mesh dimension shards two tensor dimensions: {list(specs)}")
        for axis in used:
            mesh.dim_size(axis)  # raises for an unknown mesh dim
        object.__setattr__(self, "sharding_specs", specs)
        object.__setattr__(self, "mesh", mesh)
        object.__setattr__(self, "_replicated", not used)

    @classmethod
    def replicated(cls, mesh: Mesh, rank: int) -> Layout:
        """Every device holds the whole rank-``rank`` tensor."""
        return cls([UNSHARDED] * rank, mesh)

    @classmethod
    def batch_sharded(cls, mesh: Mesh, batch_dim: str, rank: int) -> Layout:
        """Tensor dim 0 sharded over mesh dim ``batch_dim``, the other ``rank - 1`` dims unsharded."""
        return cls([batch_dim] + [UNSHARDED] * (rank - 1), mesh)

    @property
    def rank(self) -> int:
        """The number of tensor dimensions the layout describes."""
        return len(self.sharding_specs)

    def is_fully_replicated(self) -> bool:
        """Whether no tensor dimension is sharded."""
        return self._replicated

    def num_shards(self, dim: int) -> int:
        """How many pieces tensor dimension ``dim`` splits into (the product of its mesh dims' sizes)."""
        n = 1
        for axis in _axes(self.sharding_specs[dim]):
            n *= self.mesh.dim_size(axis)
        return n

    def shard_bounds(self, global_shape: Sequence[int], device_id: int) -> Bounds:
        """The half-open box of the global tensor that ``device_id`` holds (possibly empty)."""
        if len(global_shape) != self.rank:
            raise InvalidArgumentError(
                f"layout of rank {self.rank} {list(self.sharding_specs)} for a tensor of shape {list(global_shape)}"
            )
        if self.is_fully_replicated():
            self.mesh.coords(device_id)  # still refuses a device outside the mesh
            return tuple((0, n) for n in global_shape)
        coords = self.mesh.coords(device_id)
        out = []
        for spec, n in zip(self.sharding_specs, global_shape):
            start, stop = 0, n
            for axis in _axes(spec):  # split the current piece again along each mesh dim in turn
                k = self.mesh.dim_size(axis)
                chunk = -(-(stop - start) // k)
                start, stop = min(start + coords[axis] * chunk, stop), stop
                stop = min(start + chunk, stop)
            out.append((start, stop))
        return tuple(out)

    def to_string(self) -> str:
        """DTensor's layout string: ``sharding_specs:x,unsharded, mesh:<mesh string>``."""
        if any(isinstance(s, tuple) for s in self.sharding_specs):
            raise InvalidArgumentError("a layout sharding one dim over several mesh dims has no DTensor string form")
        return "sharding_specs:" + "".join(f"{s}," for s in self.sharding_specs) + " mesh:" + self.mesh.to_string()

    @classmethod
    def from_string(cls, text: str) -> Layout:
        """Parse DTensor's layout string (see `to_string`); raises `InvalidArgumentError` for anything else."""
        head, sep, mesh_text = text.partition(" mesh:")
        if not sep or not head.startswith("sharding_specs:"):
            raise InvalidArgumentError(f"not a layout string: {text!r}")
        specs = [s for s in head[len("sharding_specs:") :].split(",") if s]
        return cls(specs, Mesh.from_string(mesh_text))

    def __str__(self) -> str:
        return self.to_string()
