"""A TensorFlow-style reader: ``load_checkpoint``, ``load_variable`` and ``list_variables``.

Mirrors ``tf.train.load_checkpoint`` (TensorFlow's ``CheckpointReader``) so code written against
TensorFlow ports by changing the import: a prefix, a path to its ``.index``, a V1 checkpoint file (or the
``model-?????-of-NNNNN`` pattern of a sharded one), or a directory holding a ``checkpoint`` state file are
all accepted.  Values come back as TensorFlow returns them: numpy scalars for 0-d tensors (``bytes`` for a
DT_STRING scalar), arrays otherwise (object arrays of ``bytes`` for DT_STRING).
"""

from __future__ import annotations

import codecs
import os
import re

import numpy as np

from .errors import CheckpointNotFoundError, InvalidArgumentError, TensorNotFoundError, UnsupportedDTypeError
from .format.dtypes import DataType, to_numpy
from .format.reader import OPAQUE, BundleReader, close_matches, not_found_message
from .format.slices import encode_slice_key, parse_shape_and_slice
from .format.v1 import V1Reader, is_v1_checkpoint
from .storage import read_regular

_STATE_FIELD = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths):\s*"((?:[^"\\]|\\.)*)"\s*$',
                          re.MULTILINE)

Value = np.ndarray | np.generic | bytes


def unescape_text_proto(literal: str) -> str:
    """The value of a text-format protobuf string literal's body: escapes (``\\"``, octal bytes) decoded, UTF-8 kept."""
    raw = codecs.escape_decode(literal.encode("utf-8"))[0]  # ValueError for a malformed escape
    return raw.decode("utf-8")  # UnicodeDecodeError (a ValueError) for bytes that are not UTF-8


def checkpoint_state(directory: str | os.PathLike[str]) -> tuple[str | None, list[str]]:
    """``(model_checkpoint_path, all_model_checkpoint_paths)`` of ``directory/checkpoint`` (TensorFlow's state
    file), relative paths joined to ``directory``; ``(None, [])`` without a readable state file."""
    directory = os.fspath(directory)
    try:
        # A regular file only, read up to its size: a FIFO there must not hang the caller.
        text = read_regular(os.path.join(directory, "checkpoint"))[0].decode("utf-8")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
        return None, []
    model: str | None = None
    paths: list[str] = []
    for field, literal in _STATE_FIELD.findall(text):
        try:
            name = unescape_text_proto(literal)
        except ValueError:
            continue  # a malformed line names no checkpoint
        path = name if os.path.isabs(name) else os.path.join(directory, name)
        if field == "model_checkpoint_path":
            model = path  # the last one wins, as in text-format parsing
        else:
            paths.append(path)
    return model, paths


def checkpoint_exists(prefix: str) -> bool:
    """Whether a V2 checkpoint (``prefix.index``) or V1 checkpoint files (``prefix``, maybe a pattern) exist."""
    return os.path.exists(prefix + ".index") or is_v1_checkpoint(prefix)


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
    """The prefix named by ``directory/checkpoint``, if its files exist, else None (``tf.train.latest_checkpoint``)."""
    model, _ = checkpoint_state(directory)
    return model if model is not None and checkpoint_exists(model) else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> str:
    """The checkpoint ``path`` stands for: a directory (that is not itself a prefix) becomes its latest
    checkpoint; anything else is returned as given.  Raises `CheckpointNotFoundError` for a directory
    whose state file names no existing checkpoint."""
    text = os.fspath(path)
    if os.path.isdir(text) and not os.path.exists(text + ".index"):
        found = latest_checkpoint(text)
        if found is None:
            raise CheckpointNotFoundError(
                f"no checkpoint found in directory {text}: no 'checkpoint' state file naming an existing checkpoint")
        return found
    return text


def _scalar(value: np.ndarray) -> Value:
    """TensorFlow's reader returns 0-d tensors as numpy scalars (``bytes`` for strings), others as arrays."""
    return value[()] if value.ndim == 0 else value


class CheckpointReader:
    """What ``tf.train.load_checkpoint`` returns, for shardckpt and TensorFlow (V2 and V1) checkpoints alike."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        path = resolve_checkpoint(prefix)
        self._bundle: BundleReader | None = None
        self._v1: V1Reader | None = None
        if not os.path.exists(path + ".index") and not path.endswith(".index") and is_v1_checkpoint(path):
            self._v1 = V1Reader(path)
            self.prefix = self._v1.prefix
            self.format_version = 1
        else:
            self._bundle = BundleReader(path)
            self.prefix = self._bundle.prefix
            self.format_version = 2
        self._shapes: dict[str, list[int]] | None = None
        self._dtypes: dict[str, int] | None = None

    def _maps(self) -> tuple[dict[str, list[int]], dict[str, int]]:
        if self._shapes is None or self._dtypes is None:
            shapes: dict[str, list[int]] = {}
            dtypes: dict[str, int] = {}
            if self._v1 is not None:
                for name, t in self._v1.tensors.items():
                    shapes[name], dtypes[name] = list(t.shape), t.dtype
            else:
                assert self._bundle is not None
                raws = list(self._bundle.raw_entries())
                # As TensorFlow: the keys of stored slices are those the entries list; any other key, even one
                # starting with NUL as slice keys do, is a variable of that name.
                slice_keys = {encode_slice_key(key, s) for key, e in raws for s in e.slices}
                for key, e in raws:
                    if key not in slice_keys:
                        name = key.decode("utf-8", "replace")
                        shapes[name], dtypes[name] = list(e.shape), e.dtype
            self._shapes, self._dtypes = shapes, dtypes
        return self._shapes, self._dtypes

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """Name to shape (a list) of every variable; the per-slice keys of partitioned tensors are not listed."""
        return {name: list(shape) for name, shape in self._maps()[0].items()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype | DataType]:
        """Name to numpy dtype (``object`` for DT_STRING, ml_dtypes for bfloat16/float8/int4; quantized types as
        their integer storage), or the `DataType` (``DataType.VARIANT``, ``DataType.RESOURCE``) where no numpy
        dtype exists.  TensorFlow returns ``tf.DType`` objects: ``tf.as_dtype`` takes either."""
        out: dict[str, np.dtype | DataType] = {}
        for name, code in self._maps()[1].items():
            try:
                out[name] = _dtype(code)
            except UnsupportedDTypeError as exc:
                raise UnsupportedDTypeError(f"{self.prefix}: tensor {name}: {exc}") from None
        return out

    def get_variable_to_datatype_map(self) -> dict[str, DataType | int]:
        """Name to stored `DataType` code of every variable (the exact TensorFlow type, quantized ones too)."""
        out: dict[str, DataType | int] = {}
        for name, code in self._maps()[1].items():
            try:
                out[name] = DataType(code)
            except ValueError:
                out[name] = code
        return out

    def has_tensor(self, name: str) -> bool:
        """Whether the checkpoint holds a key called ``name`` (as TensorFlow, a V2 slice key counts too)."""
        if self._v1 is not None:
            return name in self._v1.tensors
        assert self._bundle is not None
        return self._bundle.has_tensor(name)

    def close_names(self, name: str, n: int = 3) -> list[str]:
        """The variable names closest to ``name`` (``difflib.get_close_matches``), for error messages."""
        return close_matches(name, self._maps()[0], n)

    def _missing(self, name: str) -> TensorNotFoundError:
        return TensorNotFoundError(not_found_message(name, self.prefix, self.close_names(name)))

    def get_tensor(self, name: str) -> Value:
        """The whole tensor (partitioned ones assembled), CRC32C checked; a 0-d tensor as a numpy scalar or
        ``bytes``.  Raises `TensorNotFoundError` naming the closest names, `UnsupportedDTypeError` for
        DT_VARIANT or DT_RESOURCE entries."""
        return _scalar(self.get_array(name))

    def get_array(self, name: str) -> np.ndarray:
        """`get_tensor`, but always an array (0-d for a scalar), for code that wants numpy arrays throughout."""
        if self._v1 is not None:
            if name not in self._v1.tensors:
                raise self._missing(name)
            return self._v1.read(name)
        assert self._bundle is not None
        return self._bundle.read(name)

    def get_slice(self, name: str, shape_and_slice: str) -> np.ndarray:
        """A slice as RestoreV2 takes it, e.g. ``"4 6 0,2:-"`` (always an array)."""
        if self._v1 is not None:
            whole = np.asarray(self._v1.read(name)) if name in self._v1.tensors else None
            if whole is None:
                raise self._missing(name)
            if not shape_and_slice:
                return whole
            spec = parse_shape_and_slice(shape_and_slice)
            if tuple(spec.shape) != whole.shape:
                raise InvalidArgumentError(f"{self.prefix}: tensor {name} has shape {list(whole.shape)}, "
                                           f"the spec {shape_and_slice!r} says {list(spec.shape)}")
            return whole[tuple(slice(lo, hi) for lo, hi in spec.slice.bounds(spec.shape))].copy()
        assert self._bundle is not None
        return self._bundle.read_slice(name, shape_and_slice)

    def debug_string(self) -> bytes:
        """TensorFlow's ``CheckpointReader.debug_string()``: one line ``name (DT_TYPE) [d0,d1]`` per key.

        V2 (as TensorFlow's BundleReader): in key order, every entry without slices, so a partitioned
        tensor shows as its slice keys, raw bytes and all.  V1: each tensor, ``, N slices`` added when it
        has several; in name order (TensorFlow's order there is its hash map's).
        """
        lines = []
        if self._v1 is not None:
            for name in sorted(self._v1.tensors):
                t = self._v1.tensors[name]
                more = f", {len(t.slices)} slices" if len(t.slices) > 1 else ""
                lines.append(f"{name} ({tf_dtype_name(t.dtype)}) {_dims(t.shape)}{more}\n".encode())
            return b"".join(lines)
        assert self._bundle is not None
        for key, e in self._bundle.raw_entries():
            if not e.slices:
                lines.append(key + f" ({tf_dtype_name(e.dtype)}) {_dims(e.shape)}\n".encode())
        return b"".join(lines)

    @property
    def bundle(self) -> BundleReader:
        """The underlying `BundleReader`, for slice-level and raw access (V2 checkpoints only)."""
        if self._bundle is None:
            raise InvalidArgumentError(f"{self.prefix} is a V1 checkpoint: it has no tensor bundle")
        return self._bundle

    def close(self) -> None:
        """Close the data files opened so far."""
        if self._bundle is not None:
            self._bundle.close()
        if self._v1 is not None:
            self._v1.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dtype(code: int) -> np.dtype | DataType:
    if code in OPAQUE:
        return DataType(code)
    return to_numpy(code)


def _dims(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def tf_dtype_name(code: int) -> str:
    """``DataType_Name`` as TensorFlow prints it: ``DT_FLOAT``, ``DT_INVALID`` for 0, ``DT_FLOAT_REF`` for
    reference types, and ``""`` for a code TensorFlow does not know."""
    if code == 0:
        return "DT_INVALID"
    ref = code > 100
    try:
        return "DT_" + DataType(code - 100 if ref else code).name + ("_REF" if ref else "")
    except ValueError:
        return ""


def load_checkpoint(ckpt_dir_or_file: str | os.PathLike[str]) -> CheckpointReader:
    """A reader for the checkpoint at ``ckpt_dir_or_file`` (or the latest one in a directory), as
    ``tf.train.load_checkpoint``.  Raises `CheckpointNotFoundError` when there is none."""
    return CheckpointReader(ckpt_dir_or_file)


def load_variable(ckpt_dir_or_file: str | os.PathLike[str], name: str) -> Value:
    """One tensor's value, as ``tf.train.load_variable`` (a trailing ``:0`` of a tensor name is dropped)."""
    if name.endswith(":0"):
        name = name[:-2]
    with CheckpointReader(ckpt_dir_or_file) as reader:
        return reader.get_tensor(name)


def list_variables(ckpt_dir_or_file: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """``(name, shape)`` of every variable, sorted by name, as ``tf.train.list_variables``."""
    with CheckpointReader(ckpt_dir_or_file) as reader:
        return sorted(reader.get_variable_to_shape_map().items())
