"""Lightning's ``CheckpointIO`` over ``torch.distributed.checkpoint`` and shardckpt's DCP storage layer.

    import lightning.pytorch as L
    import shardckpt.lightning

    trainer = L.Trainer(plugins=[shardckpt.lightning.CheckpointIO()])
    trainer.fit(model)                                     # each checkpoint a directory: DIR/model.*, DIR/checkpoint
    L.Trainer(plugins=[shardckpt.lightning.CheckpointIO()]).fit(model, ckpt_path=DIR)

Each checkpoint Lightning writes (``epoch=0-step=4.ckpt``, ``last.ckpt``) becomes a
directory holding one TensorFlow V2 bundle (`shardckpt.dcp`), written by ``dcp.save``
with `shardckpt.torch.StorageWriter` and read by ``dcp.load`` with `StorageReader`.

What is stored, and how
    Lightning's checkpoint dict is split before DCP sees it.  Every tensor is an entry
    of its own, named by its path joined with ``.``: the weights are
    ``state_dict.l.weight``, Adam's moments ``optimizer_states.0.state.0.exp_avg``,
    ModelCheckpoint's scores ``callbacks.ModelCheckpoint{...}.best_model_score``.  Each
    part without tensors (``epoch``, ``global_step``, ``pytorch-lightning_version``,
    ``loops``, ``hyper_parameters``, ``lr_schedulers``, an optimizer's
    ``param_groups``, the callbacks' paths) is one DT_STRING entry under its path, as
    JSON (`shardckpt.objects`: tuples, int keys and non-finite floats kept exactly).
    One more JSON entry, `LAYOUT_NAME`, holds the dict's shape: the containers, with
    each leaf replaced by its entry's name, and which dicts were ``OrderedDict`` (the
    module's ``state_dict``, with its ``_metadata`` of module versions) or Lightning's
    ``AttributeDict``; JSON alone would give plain dicts back.

    Anything else JSON cannot hold faithfully (a set, bytes, a custom class, another
    Mapping type) is an `InvalidArgumentError` naming the checkpoint and the entry,
    raised before anything is written, unless ``CheckpointIO(allow_pickle=True)``: then
    such entries are pickled behind shardckpt's pickle marker, and loading them needs
    ``allow_pickle=True`` too.  Nothing is ever pickled silently.

Loading
    DCP loads into a state dict built beforehand.  Lightning's ``load_checkpoint`` has
    no module or optimizer at hand (and a resumed run's optimizer state is still empty
    when it is called), so the target is built from the checkpoint alone: the layout
    entry is loaded first, then every tensor is allocated with the shape and dtype the
    bundle's index records (``StorageReader.read_metadata``), on ``map_location`` (a
    device or device string; CPU by default), and ``dcp.load`` fills them (a tensor its
    stored slices do not fill is refused by the reader, `InsufficientSlicesError`:
    nothing uninitialised is handed back).  The dict is then put back together from the
    layout.  No pickle from the file is run (``weights_only`` holds whatever it is given).

Processes
    Lightning calls ``save_checkpoint`` on global rank 0 only, with the full (replicated)
    state, and ``load_checkpoint`` on every rank, so each is a single-process DCP call
    (``no_dist=True``): no collective waits for ranks that never call it.  Strategies
    that save sharded state themselves (FSDP, ModelParallelStrategy) do not use a
    CheckpointIO plugin.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.data import AttributeDict as _FabricAttributeDict
from lightning.pytorch.plugins.io import CheckpointIO as _LightningCheckpointIO
from lightning.pytorch.utilities.parsing import AttributeDict as _PlAttributeDict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from . import objects
from .dcp import PREFIX_NAME, StorageReader, StorageWriter
from .errors import CorruptCheckpointError, InvalidArgumentError
from .format.files import index_filename
from .manager import STATE_FILENAME

__all__ = ["LAYOUT_NAME", "CheckpointIO"]

LAYOUT_NAME = "shardckpt_lightning.layout"  # the entry holding the checkpoint dict's shape
_LAYOUT_VERSION = 1

# Dict types Lightning's checkpoints hold that are stored as plain dicts and given back as themselves.
_DICT_TYPES: dict[type, str] = {
    OrderedDict: "OrderedDict",
    _FabricAttributeDict: "lightning.fabric.AttributeDict",
    _PlAttributeDict: "lightning.pytorch.AttributeDict",
}
_DICT_BY_NAME = {name: t for t, name in _DICT_TYPES.items()}

Path = tuple[Any, ...]


def _is_dict(value: Any) -> bool:
    return type(value) is dict or type(value) in _DICT_TYPES


def _is_seq(value: Any) -> bool:
    return type(value) is list or type(value) is tuple


class _Split:
    """A checkpoint dict taken apart: its leaves by entry name, its shape, its dict types."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.leaves: dict[str, Any] = {}
        self.types: list[list[Any]] = []  # [path, type name, OrderedDict _metadata or None], parents first

    def plain(self, value: Any, path: Path) -> Any:
        """``value`` with every allowed dict subclass made a dict (recorded), lists and tuples rebuilt."""
        t = type(value)
        if t in _DICT_TYPES:
            meta = getattr(value, "_metadata", None)
            if isinstance(meta, dict):  # module versions: {"l": {"version": 1}, ...}, read by load_state_dict
                meta = {k: dict(v) if type(v) in _DICT_TYPES else v for k, v in meta.items()}
            self.types.append([path, _DICT_TYPES[t], meta])
        if _is_dict(value):
            return {k: self.plain(v, (*path, k)) for k, v in value.items()}
        if t is list:
            return [self.plain(v, (*path, i)) for i, v in enumerate(value)]
        if t is tuple:
            return tuple(self.plain(v, (*path, i)) for i, v in enumerate(value))
        if isinstance(value, torch.Tensor):
            from torch.distributed.tensor import DTensor

            if isinstance(value, DTensor):
                raise InvalidArgumentError(
                    f"{self.where}: {_name(path)} is a DTensor; Lightning saves through a CheckpointIO from rank 0 "
                    "only, so only its local shard would be stored (save sharded state with the strategy instead)")
        return value

    def split(self, value: Any, path: Path) -> Any:
        """The shape of ``value``: containers holding tensors are kept, every other part is one named leaf."""
        if _has_tensor(value) and not isinstance(value, torch.Tensor):
            if type(value) is dict:
                return {k: self.split(v, (*path, k)) for k, v in value.items()}
            if type(value) is list:
                return [self.split(v, (*path, i)) for i, v in enumerate(value)]
            return tuple(self.split(v, (*path, i)) for i, v in enumerate(value))
        name = base = _name(path)
        n = 1
        while name in self.leaves or name == LAYOUT_NAME:  # "a.b" as a key and as a path: any unique name will do
            n += 1
            name = f"{base}~{n}"
        self.leaves[name] = value
        return name


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if type(value) is dict:
        return any(_has_tensor(v) for v in value.values())
    if _is_seq(value):
        return any(_has_tensor(v) for v in value)
    return False


def _name(path: Path) -> str:
    return ".".join(str(k) for k in path) or "checkpoint"


def _walk_leaves(shape: Any) -> Iterator[str]:
    if isinstance(shape, str):
        yield shape
    elif isinstance(shape, dict):
        for v in shape.values():
            yield from _walk_leaves(v)
    elif isinstance(shape, (list, tuple)):
        for v in shape:
            yield from _walk_leaves(v)


def _assemble(shape: Any, values: dict[str, Any], where: str) -> Any:
    if isinstance(shape, str):
        return values[shape]
    if isinstance(shape, dict):
        return {k: _assemble(v, values, where) for k, v in shape.items()}
    if isinstance(shape, list):
        return [_assemble(v, values, where) for v in shape]
    if isinstance(shape, tuple):
        return tuple(_assemble(v, values, where) for v in shape)
    raise CorruptCheckpointError(f"{where}: {LAYOUT_NAME}: a {type(shape).__name__} in the layout's tree")


def _retype(value: Any, path: Path, types: dict[Path, tuple[type, Any]], on_way: set[Path], where: str) -> Any:
    """``value`` with the dicts at the recorded paths turned back into their types (only along those paths)."""
    if path not in on_way:
        return value
    if isinstance(value, dict):
        out: Any = {k: _retype(v, (*path, k), types, on_way, where) for k, v in value.items()}
    elif isinstance(value, list):
        out = [_retype(v, (*path, i), types, on_way, where) for i, v in enumerate(value)]
    elif isinstance(value, tuple):
        out = tuple(_retype(v, (*path, i), types, on_way, where) for i, v in enumerate(value))
    else:
        out = value
    if path in types:
        cls, meta = types[path]
        if not isinstance(out, dict):
            raise CorruptCheckpointError(f"{where}: {LAYOUT_NAME}: {_name(path)} is recorded as a {cls.__name__} "
                                         f"but holds a {type(out).__name__}")
        out = cls(out)
        if meta is not None:
            out._metadata = OrderedDict(meta)
    return out


@contextlib.contextmanager
def _own_error() -> Iterator[None]:
    """Raise this process's own error instead of DCP's wrapper around it.

    DCP's ``CheckpointException`` is a ``BaseException``: ``except Exception`` misses it, as it would not miss
    Lightning's own CheckpointIO failing on a full disk or a corrupt file.  Here (``no_dist``) there is one
    process, so one error, and it is what the caller is owed."""
    try:
        yield
    except CheckpointException as exc:
        own = [e for e, _ in exc.failures.values()]
        if len(own) != 1 or not isinstance(own[0], Exception):
            raise
        raise own[0] from own[0].__cause__  # the OSError of a CheckpointIOError stays its cause


class CheckpointIO(_LightningCheckpointIO):
    """Lightning ``CheckpointIO`` writing each checkpoint as a TensorFlow V2 bundle through torch DCP.

    ``path`` (what Lightning calls the checkpoint file) is a directory: ``path/model.index``,
    ``path/model.data-00000-of-00001`` and TensorFlow's ``path/checkpoint``.  See the
    module's documentation for what is stored how.  ``allow_pickle=True`` stores (and
    loads) parts JSON cannot hold as pickles; ``durable=False`` skips the fsyncs;
    ``verify=False`` skips the CRC32C checks on load.
    """

    def __init__(self, *, allow_pickle: bool = False, durable: bool = True, verify: bool = True) -> None:
        super().__init__()
        self.allow_pickle = allow_pickle
        self.durable = durable
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got "
                            f"{storage_options!r}); configure CheckpointIO(...) instead")
        path = os.fspath(path)
        where = os.path.join(path, PREFIX_NAME)
        if not isinstance(checkpoint, dict):
            raise InvalidArgumentError(f"{where}: a checkpoint must be a dict, got {type(checkpoint).__name__}")
        parts = _Split(where)
        shape = parts.split(parts.plain(checkpoint, ()), ())
        for name, value in parts.leaves.items():
            if isinstance(value, torch.Tensor):
                continue
            try:
                objects.encode(value, f"{where}: {name}")  # refused here, before anything is written
            except InvalidArgumentError as exc:
                if not self.allow_pickle:
                    raise InvalidArgumentError(
                        f"{exc} (make it JSON-storable in on_save_checkpoint, or use "
                        "shardckpt.lightning.CheckpointIO(allow_pickle=True) for checkpoints only you load)") from None
        layout = {"version": _LAYOUT_VERSION, "tree": shape, "types": parts.types}
        objects.encode(layout, f"{where}: {LAYOUT_NAME}")  # an OrderedDict's _metadata JSON cannot hold
        state = dict(parts.leaves)
        state[LAYOUT_NAME] = layout
        writer = StorageWriter(path, allow_pickle=self.allow_pickle, durable=self.durable)
        planner = DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        with _own_error():
            dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        del weights_only  # nothing from the file is unpickled unless allow_pickle: weights-only always holds
        path = os.fspath(path)
        device = _device(map_location, path)
        reader = StorageReader(path, allow_pickle=self.allow_pickle, verify=self.verify)
        metadata = reader.read_metadata()
        prefix = os.path.join(path, PREFIX_NAME)
        where = f"{prefix} ({index_filename(prefix)})"
        if not isinstance(metadata.state_dict_metadata.get(LAYOUT_NAME), BytesStorageMetadata):
            raise CorruptCheckpointError(f"{path}: no {LAYOUT_NAME} entry: not a checkpoint of "
                                         "shardckpt.lightning.CheckpointIO (read it with shardckpt.load_checkpoint)")
        head: dict[str, Any] = {LAYOUT_NAME: None}
        with _own_error():
            dcp.load(head, storage_reader=reader, planner=_load_planner(), no_dist=True)
        layout = head[LAYOUT_NAME]
        if not (isinstance(layout, dict) and layout.get("version") == _LAYOUT_VERSION
                and isinstance(layout.get("types"), list)):
            raise CorruptCheckpointError(f"{where}: {LAYOUT_NAME} is not a version {_LAYOUT_VERSION} layout")
        tree = layout.get("tree")
        target: dict[str, Any] = {}
        for name in _walk_leaves(tree):
            md = metadata.state_dict_metadata.get(name)
            if md is None or name == LAYOUT_NAME:
                raise CorruptCheckpointError(f"{where}: the layout names {name!r}, which is not stored")
            if isinstance(md, TensorStorageMetadata):
                target[name] = torch.empty(md.size, dtype=md.properties.dtype, device=device)
            else:
                target[name] = None
        reader.reset(path)
        with _own_error():
            dcp.load(target, storage_reader=reader, planner=_load_planner(), no_dist=True)
        checkpoint = _assemble(tree, target, where)
        types: dict[Path, tuple[type, Any]] = {}
        for item in layout["types"]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], tuple)
                    and item[1] in _DICT_BY_NAME and (item[2] is None or isinstance(item[2], dict))):
                raise CorruptCheckpointError(f"{where}: {LAYOUT_NAME}: malformed type record {item!r}")
            types[item[0]] = (_DICT_BY_NAME[item[1]], item[2])
        on_way = {p[:i] for p in types for i in range(len(p) + 1)}
        checkpoint = _retype(checkpoint, (), types, on_way, where)
        if not isinstance(checkpoint, dict):
            raise CorruptCheckpointError(f"{where}: the layout's tree is a {type(checkpoint).__name__}, not a dict")
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete a checkpoint directory this plugin wrote (nothing if it is gone; anything else is refused)."""
        path = os.fspath(path)
        if not os.path.lexists(path):
            return
        ours = os.path.isdir(path) and not os.path.islink(path) and (
            os.path.exists(index_filename(os.path.join(path, PREFIX_NAME)))
            or os.path.exists(os.path.join(path, STATE_FILENAME)))
        if not ours:
            raise InvalidArgumentError(f"{path}: not a checkpoint directory of shardckpt.lightning.CheckpointIO "
                                       f"(no {PREFIX_NAME}.index or {STATE_FILENAME} inside); not removed")
        shutil.rmtree(path)


def _device(map_location: Any, path: str) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    raise InvalidArgumentError(f"{path}: map_location must be a device or device string for "
                               f"shardckpt.lightning.CheckpointIO, got {type(map_location).__name__}")


def _load_planner() -> DefaultLoadPlanner:
    # Neither flattening: the target is already flat, and DCP writes objects into the dict it was given only then.
    return DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
