"""Layouts: which mesh dimension (if any) shards each tensor dimension, and the shard each device holds.

A tensor dim of size ``n`` sharded over a mesh dim of size ``k`` splits into ``k``
pieces of ``ceil(n / k)`` elements, the last ones shorter or empty (torch's
``chunk`` rule).  When ``k`` divides ``n`` this is exactly DTensor's split; unlike
DTensor, uneven dims are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidArgumentError
from .mesh import Mesh

UNSHARDED = "unsharded"

Bounds = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Layout:
    sharding_specs: tuple[str, ...]
    mesh: Mesh

    def __init__(self, sharding_specs: Sequence[str], mesh: Mesh) -> None:
        specs = tuple(sharding_specs)
        used = [s for s in specs if s != UNSHARDED]
        if len(set(used)) != len(used):
            raise InvalidArgumentError(f"a mesh dimension shards two tensor dimensions: {list(specs)}")
        for s in used:
            mesh.dim_size(s)  # raises for an unknown mesh dim
        object.__setattr__(self, "sharding_specs", specs)
        object.__setattr__(self, "mesh", mesh)

    @classmethod
    def replicated(cls, mesh: Mesh, rank: int) -> Layout:
        return cls([UNSHARDED] * rank, mesh)

    @classmethod
    def batch_sharded(cls, mesh: Mesh, batch_dim: str, rank: int) -> Layout:
        return cls([batch_dim] + [UNSHARDED] * (rank - 1), mesh)

    @property
    def rank(self) -> int:
        return len(self.sharding_specs)

    def is_fully_replicated(self) -> bool:
        return all(s == UNSHARDED for s in self.sharding_specs)

    def num_shards(self, dim: int) -> int:
        spec = self.sharding_specs[dim]
        return 1 if spec == UNSHARDED else self.mesh.dim_size(spec)

    def shard_bounds(self, global_shape: Sequence[int], device_id: int) -> Bounds:
        """The half-open box of the global tensor that ``device_id`` holds (possibly empty)."""
        if len(global_shape) != self.rank:
            raise InvalidArgumentError(
                f"layout of rank {self.rank} {list(self.sharding_specs)} for a tensor of shape {list(global_shape)}"
            )
        coords = self.mesh.coords(device_id)
        out = []
        for spec, n in zip(self.sharding_specs, global_shape):
            if spec == UNSHARDED:
                out.append((0, n))
                continue
            k = self.mesh.dim_size(spec)
            chunk = -(-n // k)
            start = min(coords[spec] * chunk, n)
            out.append((start, min(start + chunk, n)))
        return tuple(out)

    def to_string(self) -> str:
        """DTensor's layout string: ``sharding_specs:x,unsharded, mesh:<mesh string>``."""
        return "sharding_specs:" + "".join(s + "," for s in self.sharding_specs) + " mesh:" + self.mesh.to_string()

    @classmethod
    def from_string(cls, text: str) -> Layout:
        head, sep, mesh_text = text.partition(" mesh:")
        if not sep or not head.startswith("sharding_specs:"):
            raise InvalidArgumentError(f"not a layout string: {text!r}")
        specs = [s for s in head[len("sharding_specs:") :].split(",") if s]
        return cls(specs, Mesh.from_string(mesh_text))

    def __str__(self) -> str:
        return self.to_string()
