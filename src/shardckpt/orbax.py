"""Orbax: a checkpoint handler that stores an item as one TF V2 bundle written by `shardckpt.jax.save`.

::

    import orbax.checkpoint as ocp
    import shardckpt.orbax as so

    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    mgr.save(step, args=ocp.args.Composite(state=so.SaveArgs(state)))
    mgr.wait_until_finished()
    state = mgr.restore(step, args=ocp.args.Composite(state=so.RestoreArgs(abstract_state)))

Orbax owns the step directories, retention and the atomic rename; the handler owns
what is inside an item's directory: the bundle ``<item dir>/checkpoint`` (`ITEM_PREFIX`),
that is ``checkpoint.index``, ``checkpoint.data-RRRRR-of-NNNNN`` and their ``.crc32c``
sidecars, which ``tf.train.load_checkpoint(f"{step_dir}/state/checkpoint")`` and
`shardckpt.torch.read_state_dict` read as they are.  Tensor names are
`shardckpt.jax.tree_names` of the saved pytree.

How the two commits nest: Orbax saves into ``<step>.orbax-checkpoint-tmp/<item>.orbax-checkpoint-tmp``
on every process; shardckpt's save (its lease, staged files and verified commit) runs
wholly inside that directory, so when every process's save has returned the bundle there
is complete and the lease is released.  Orbax then syncs the processes, calls `finalize`
on the primary host (which checks that ``checkpoint.index`` exists and that no
``checkpoint.lease`` is left: a dead one is removed, a live one fails the step) and renames
the item, then the step directory, into place.  A save that fails on any process fails
its step before the rename, so the step never appears in ``mgr.all_steps()`` and earlier
steps are untouched; its temporary directory stays until the same step is saved again
(Orbax removes it then) or a manager with ``cleanup_tmp_directories=True`` starts.

The handler is asynchronous: `async_save` waits for Orbax's directory creation, agrees
with the other processes and copies this process's shards to host memory
(`shardckpt.jax.save` with ``blocking=False``), and returns; the writes and the commit run
in shardckpt's background thread, and Orbax's finalize waits for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from . import jax as sj
from . import storage
from .coordination import Coordinator
from .errors import CheckpointNotFoundError
from .format.dtypes import to_numpy
from .format.files import ORBAX_ITEM_PREFIX, index_filename
from .format.reader import BundleReader
from .lease import PrefixLease, lease_filename

__all__ = ["ITEM_PREFIX", "RestoreArgs", "SaveArgs", "ShardckptCheckpointHandler"]

ITEM_PREFIX = ORBAX_ITEM_PREFIX
"""The bundle's prefix inside an item's directory: ``<step dir>/<item>/checkpoint.index`` and its data files."""


def item_prefix(directory: str | os.PathLike[str]) -> str:
    """The bundle prefix of the item stored in ``directory``."""
    return os.path.join(os.fspath(directory), ITEM_PREFIX)


async def _noop() -> None:
    return None


class ShardckptCheckpointHandler(ocp.AsyncCheckpointHandler):
    """Saves a pytree of ``jax.Array`` (and numpy arrays, scalars) as one TF V2 bundle per item.

    ``coordinator``, ``timeout``, ``durable`` and ``max_staging_bytes`` go to every save (see
    `shardckpt.sharded_save`); the defaults find the JAX coordinator after ``jax.distributed.initialize``.
    ``verify`` goes to every restore.  Orbax makes one with no arguments when it meets `SaveArgs` or
    `RestoreArgs`; pass ``item_handlers={"state": ShardckptCheckpointHandler(...)}`` to the
    ``CheckpointManager`` to set them.
    """

    def __init__(self, *, coordinator: Coordinator | None = None, timeout: float | None = None,
                 durable: bool = True, max_staging_bytes: int | None = None, verify: Any = True) -> None:
        self._coordinator = coordinator
        self._save_kwargs: dict[str, Any] = {"timeout": timeout, "durable": durable,
                                             "max_staging_bytes": max_staging_bytes}
        self._verify = verify

    async def async_save(self, directory: Any, args: SaveArgs) -> list[Any]:
        # Orbax may still be creating the temporary directory (create_directories_asynchronously, its
        # default); it removes one it finds already there, so nothing may be written before it signals.
        await asyncio.to_thread(lambda: ocp.future.CommitFutureAwaitingContractedSignals(_noop()).result())
        future = sj.save(args.tree, item_prefix(directory), coordinator=self._coordinator, blocking=False,
                         **self._save_kwargs)
        return [future]  # has result(timeout), as Orbax's Future protocol asks

    def save(self, directory: Any, args: SaveArgs) -> None:
        sj.save(args.tree, item_prefix(directory), coordinator=self._coordinator, blocking=True,
                **self._save_kwargs)

    def restore(self, directory: Any, args: RestoreArgs | None = None) -> Any:
        target = args.target if args is not None else None
        if target is None:
            return sj.restore(item_prefix(directory), verify=self._verify)
        return sj.restore(item_prefix(directory), target, coordinator=self._coordinator, verify=self._verify)

    def metadata(self, directory: Any) -> dict[str, Any]:
        """Nested dicts (by tensor name, as a restore without target gives) of ``jax.ShapeDtypeStruct``.

        Without shardings: add them (``jax.tree.map``) to make a target that restores onto devices.
        """
        prefix = item_prefix(directory)
        with BundleReader(prefix) as reader:
            pairs = [(name, jax.ShapeDtypeStruct(tuple(e.shape), to_numpy(e.dtype))) for name, e in reader.entries()]
        return sj._nest(prefix, [n for n, _ in pairs], [s for _, s in pairs])

    def finalize(self, directory: Any) -> None:
        """On the primary host, after every process's save returned: the bundle is complete, no lease is left."""
        prefix = item_prefix(directory)
        remote = storage.is_remote(prefix)
        index = index_filename(prefix)
        if not (storage.exists(index) if remote else os.path.isfile(index)):
            raise CheckpointNotFoundError(f"{prefix}: no {index} after the save; the step is not finalized")
        lease = lease_filename(prefix)
        if storage.exists(lease) if remote else os.path.lexists(lease):
            # A lease outliving its save (a release whose unlink failed): taking it breaks a dead one, and a
            # live holder (a second writer into this temporary directory) raises PrefixBusyError instead.
            PrefixLease.acquire(prefix, what="orbax finalize").release()

    @classmethod
    def typestr(cls) -> str:
        return "shardckpt.orbax.ShardckptCheckpointHandler"


@ocp.args.register_with_handler(ShardckptCheckpointHandler, for_save=True)
@dataclasses.dataclass
class SaveArgs(ocp.args.CheckpointArgs):
    """Save ``tree`` (a pytree of ``jax.Array``, numpy arrays, Python scalars) as one bundle."""

    tree: Any


@ocp.args.register_with_handler(ShardckptCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class RestoreArgs(ocp.args.CheckpointArgs):
    """Restore into ``target`` (``jax.ShapeDtypeStruct`` with shardings, or arrays, as `shardckpt.jax.restore`
    takes), on any sharding; ``None``: every tensor whole as host numpy arrays in nested dicts by name."""

    target: Any = None
