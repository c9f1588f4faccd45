"""Tensor sources (a checkpoint or a ``.safetensors`` file) and conversion between the two formats.

`open_source` gives one read-only view over either format: names, dtypes and
shapes without reading data, then whole tensors one at a time (a partitioned
checkpoint tensor is assembled from its slices).  `checkpoint_to_safetensors`
and `safetensors_to_checkpoint` convert; both check every dtype before writing
anything, write under a temporary name and rename at the end, and report
progress through a callback (the command line draws the bar).

safetensors is read and written through the ``safetensors`` package's numpy API;
float8 tensors, which its numpy loader cannot map in some versions, are read
from their byte range as the header gives it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import ml_dtypes
import numpy as np

from . import storage
from .checkpoint_reader import CheckpointReader
from .commit import remove_stale_data_files
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from .format.dtypes import DataType, to_numpy
from .format.files import index_filename, io_error, make_parent_directory
from .format.slices import encode_slice_key
from .format.writer import BundleWriter
from .lease import PrefixLease

log = logging.getLogger("shardckpt.convert")

SAFETENSORS_SUFFIX = ".safetensors"

Progress = Callable[[int, int], None]
"""Called as ``progress(bytes_just_done, total_bytes)``."""

# safetensors dtype codes and the numpy dtypes that hold them.
_ST_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
_NUMPY_TO_ST = {dt.newbyteorder("="): code for code, dt in _ST_TO_NUMPY.items()}
_QUANTIZED = {DataType.QINT8, DataType.QUINT8, DataType.QINT16, DataType.QUINT16, DataType.QINT32}


def is_safetensors_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a safetensors file (by its ``.safetensors`` extension)."""
    return os.fspath(path).lower().endswith(SAFETENSORS_SUFFIX)


def safetensors_code(dtype: np.dtype) -> str | None:
    """The safetensors dtype code for a numpy dtype, or None when safetensors cannot hold it."""
    return _NUMPY_TO_ST.get(np.dtype(dtype).newbyteorder("="))


@dataclass(frozen=True)
class TensorInfo:
    """What a source says about one tensor before reading it.

    ``name`` is the stored name; a checkpoint name that is not UTF-8 is decoded with ``surrogateescape``, so
    every distinct byte string stays a distinct name (`name_bytes` gives the bytes back).
    ``dtype`` is a label common to both formats: numpy's name (``float32``,
    ``bfloat16``, ``float8_e4m3fn``), ``string`` for DT_STRING, ``qint8`` & co. for
    quantized types, the raw code for types shardckpt cannot read.  ``numpy_dtype``
    is what `TensorSource.read` returns, or None when the tensor cannot be read.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    numpy_dtype: np.dtype | None
    tf_dtype: int | None = None


def name_bytes(name: str) -> bytes:
    """The stored bytes of a `TensorInfo` name (the inverse of its ``surrogateescape`` decoding)."""
    return name.encode("utf-8", "surrogateescape")


def display_name(name: str) -> str:
    """A name as a terminal can show it: printable text as is, else quoted with escapes (``'\\x00x'``), and a
    name that is not UTF-8 as the bytes literal of its stored bytes (``b'\\xff'``)."""
    if not is_utf8_name(name):
        return repr(name_bytes(name))
    return name if name.isprintable() else repr(name)


def is_utf8_name(name: str) -> bool:
    """Whether a name is valid UTF-8 text (safetensors names must be)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TensorSource:
    """A read-only view of the tensors of one checkpoint or safetensors file."""

    path: str
    kind: str

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by name, in the file's order."""
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """One whole tensor."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _tf_label(code: int) -> str:
    if code == DataType.STRING:
        return "string"
    if code in _QUANTIZED:
        return DataType(code).name.lower()
    try:
        return to_numpy(code).name
    except CheckpointError:
        try:
            return DataType(code).name.lower()
        except ValueError:
            return f"datatype({code})"


class CheckpointSource(TensorSource):
    """A TensorFlow V2 checkpoint: a prefix, its ``.index`` path, or a directory with a state file."""

    kind = "checkpoint"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path)
        if text.endswith(".index") and not os.path.exists(index_filename(text)):
            text = text[: -len(".index")]
        self._reader = CheckpointReader(text)
        self.path = self._reader.prefix
        self._infos: dict[str, TensorInfo] | None = None

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by name in key order (not per-slice keys); variant and resource are listed but unreadable."""
        if self._infos is None and self._reader.format_version == 1:  # a V1 checkpoint: by name
            datatypes = self._reader.get_variable_to_datatype_map()
            self._infos = {}
            for name, shape in sorted(self._reader.get_variable_to_shape_map().items()):
                code = int(datatypes[name])
                try:
                    np_dtype: np.dtype | None = to_numpy(code)
                except UnsupportedDTypeError:
                    np_dtype = None
                count = int(np.prod(shape, dtype=object)) if shape else 1
                nbytes = count * (np_dtype.itemsize if np_dtype is not None and code != DataType.STRING else 1)
                self._infos[name] = TensorInfo(name, _tf_label(code), tuple(shape), nbytes, np_dtype, code)
        if self._infos is None:
            bundle = self._reader.bundle
            infos: dict[str, TensorInfo] = {}
            raws = list(bundle.raw_entries())
            # The stored slices of partitioned tensors are the keys their entries list; any other key, even one
            # starting with NUL as slice keys do, is a tensor of that exact name.
            slice_keys = {encode_slice_key(key, s) for key, raw in raws for s in raw.slices}
            for key, raw in raws:
                if key in slice_keys:
                    continue
                name = key.decode("utf-8", "surrogateescape")
                try:
                    entry = bundle.entry(key)
                    np_dtype = to_numpy(entry.dtype)
                    nbytes = sum(p.entry.size for p in bundle.stored_slices(key, entry))
                except UnsupportedDTypeError:  # variant, resource: listed, never read
                    entry, np_dtype, nbytes = raw, None, raw.size
                infos[name] = TensorInfo(name, _tf_label(entry.dtype), tuple(entry.shape), nbytes, np_dtype,
                                         entry.dtype)
            self._infos = infos
        return self._infos

    def read(self, name: str) -> np.ndarray:
        """One whole tensor (partitioned ones assembled); raises `TensorNotFoundError` for an unknown name."""
        if self._reader.format_version == 1:
            return self._reader.get_array(name)
        return self._reader.bundle.read(name_bytes(name))

    def read_raw(self, name: str) -> bytes | None:
        """The stored bytes of an unpartitioned tensor, CRC32C checked (how DT_VARIANT tensors are compared);
        None for a partitioned one."""
        if self._reader.format_version == 1:
            return None  # V1 has no opaque types
        bundle = self._reader.bundle
        key = name_bytes(name)
        if bundle.entry(key).slices:
            return None
        return bundle.read_raw(key)

    def close(self) -> None:
        """Close the checkpoint's data files."""
        self._reader.close()


def _read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts."""
    fd, _ = storage.open_regular(path)  # a FIFO or device is refused, never waited on
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CorruptCheckpointError(f"{path}: too short for a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > 100 << 20:
            raise CorruptCheckpointError(f"{path}: safetensors header of {size} bytes is implausible")
        blob = f.read(size)
    if len(blob) != size:
        raise CorruptCheckpointError(f"{path}: safetensors header truncated")
    try:
        header = json.loads(blob)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{path}: bad safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: bad safetensors header")
    return header, 8 + size


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file, read tensor by tensor through the safetensors package (memory-mapped)."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointNotFoundError(f"{self.path}: no such safetensors file")
        try:
            self._file = safe_open(self.path, framework="np")
            self._file.__enter__()
        except SafetensorError as exc:
            raise CorruptCheckpointError(f"{self.path}: {exc}") from None
        self._infos: dict[str, TensorInfo] | None = None
        self._header: tuple[dict[str, Any], int] | None = None

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by name; one whose dtype has no numpy equivalent has ``numpy_dtype`` None."""
        if self._infos is None:
            infos = {}
            for name in self._file.keys():  # noqa: SIM118 - safe_open is not iterable
                view = self._file.get_slice(name)
                code = view.get_dtype()
                shape = tuple(int(d) for d in view.get_shape())
                np_dtype = _ST_TO_NUMPY.get(code)
                count = int(np.prod(shape, dtype=object)) if shape else 1
                nbytes = count * np_dtype.itemsize if np_dtype is not None else 0
                label = np_dtype.name if np_dtype is not None else code.lower()
                infos[name] = TensorInfo(name, label, shape, nbytes, np_dtype)
            self._infos = infos
        return self._infos

    def read(self, name: str) -> np.ndarray:
        """One whole tensor.

        Raises `TensorNotFoundError`, `UnsupportedDTypeError` for a dtype with no numpy equivalent, and
        `CorruptCheckpointError` when the file does not hold the bytes its header promises.
        """
        from safetensors import SafetensorError

        info = self.tensors().get(name)
        if info is None:
            raise TensorNotFoundError(f"{self.path}: no tensor {name}")
        if info.numpy_dtype is None:
            raise UnsupportedDTypeError(f"{self.path}: tensor {name}: safetensors dtype {info.dtype} is not supported")
        try:
            return np.asarray(self._file.get_tensor(name))
        except (AttributeError, KeyError, TypeError):
            return self._read_raw(name, info)  # a dtype the package's numpy loader cannot map
        except SafetensorError as exc:
            raise CorruptCheckpointError(f"{self.path}: tensor {name}: {exc}") from None

    def _read_raw(self, name: str, info: TensorInfo) -> np.ndarray:
        assert info.numpy_dtype is not None
        if self._header is None:
            self._header = _read_safetensors_header(self.path)
        header, start = self._header
        begin, end = header[name]["data_offsets"]
        if end - begin != info.nbytes:
            raise CorruptCheckpointError(f"{self.path}: tensor {name}: {end - begin} bytes for {info.nbytes}")
        fd, _ = storage.open_regular(self.path)
        with os.fdopen(fd, "rb") as f:
            f.seek(start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise CorruptCheckpointError(f"{self.path}: tensor {name}: data truncated")
        return np.frombuffer(data, info.numpy_dtype).reshape(info.shape).copy()

    def close(self) -> None:
        """Release the memory-mapped file."""
        self._file.__exit__(None, None, None)


def open_source(path: str | os.PathLike[str]) -> TensorSource:
    """A `SafetensorsSource` for ``*.safetensors``, else a `CheckpointSource` (prefix or directory)."""
    return SafetensorsSource(path) if is_safetensors_path(path) else CheckpointSource(path)


@dataclass
class ConvertReport:
    """What a conversion did: tensors and bytes written, and tensors left out with the reason."""

    source: str
    destination: str
    direction: str
    tensors: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"source": self.source, "destination": self.destination, "direction": self.direction,
                "tensors": self.tensors, "bytes": self.bytes,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def _partition(infos: dict[str, TensorInfo], reason: Callable[[TensorInfo], str | None], what: str,
               skip_unsupported: bool, report: ConvertReport) -> list[TensorInfo]:
    keep, bad = [], []
    for info in infos.values():
        why = reason(info)
        if why is None:
            keep.append(info)
        else:
            bad.append((info.name, why))
    if bad and not skip_unsupported:
        listed = "; ".join(f"{n}: {r}" for n, r in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UnsupportedDTypeError(
            f"{report.source}: {len(bad)} tensor(s) cannot be stored in {what}: {listed} "
            "(pass skip_unsupported / --skip-unsupported to leave them out)")
    for name, why in bad:
        log.info("%s: leaving out tensor %s: %s", report.source, name, why)
    report.skipped = bad
    return keep


def _to_safetensors_reason(info: TensorInfo) -> str | None:
    if not is_utf8_name(info.name):
        return "the name is not UTF-8 text, which safetensors names must be"
    if info.dtype == "string":
        return "DT_STRING tensors have no safetensors dtype"
    if info.tf_dtype in _QUANTIZED:
        return f"quantized {info.dtype} has no safetensors dtype"
    if info.numpy_dtype is None or safetensors_code(info.numpy_dtype) is None:
        return f"{info.dtype} has no safetensors dtype"
    return None


def _check_destination(path: str, exists: bool, overwrite: bool) -> None:
    if exists and not overwrite:
        raise CheckpointExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")


def checkpoint_to_safetensors(
    prefix: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    skip_unsupported: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    metadata: dict[str, str] | None = None,
) -> ConvertReport:
    """Write every tensor of a checkpoint (partitioned ones assembled) to one safetensors file.

    Tensors safetensors cannot hold (strings, complex128, int4, quantized types, ...)
    raise `UnsupportedDTypeError` before anything is written, or are left out with
    ``skip_unsupported=True``.  All tensors are held in memory while the file is
    written (the safetensors API takes them at once).
    """
    from safetensors.numpy import save_file

    out = os.fspath(path)
    from safetensors import SafetensorError

    with CheckpointSource(prefix) as source:
        report = ConvertReport(source.path, out, "checkpoint-to-safetensors")
        _check_destination(out, os.path.exists(out), overwrite)
        infos = _partition(source.tensors(), _to_safetensors_reason, "safetensors", skip_unsupported, report)
        total = sum(i.nbytes for i in infos)
        arrays: dict[str, np.ndarray] = {}
        for info in infos:
            arrays[info.name] = np.asarray(source.read(info.name), order="C")  # keeps 0-d arrays 0-d
            if progress is not None:
                progress(info.nbytes, total)
    tmp = f"{out}.tmp-{secrets.token_hex(6)}"
    try:
        save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, SafetensorError)) and not isinstance(exc, CheckpointError):
            raise io_error(exc, out, tmp, "write the safetensors file") from exc
        raise
    report.tensors, report.bytes = len(arrays), sum(a.nbytes for a in arrays.values())
    log.info("%s: wrote %d tensors (%d bytes) to %s", report.source, report.tensors, report.bytes, out)
    return report


def _to_checkpoint_reason(info: TensorInfo) -> str | None:
    if info.numpy_dtype is None:
        return f"safetensors dtype {info.dtype} is not supported by shardckpt"
    return None


def safetensors_to_checkpoint(
    path: str | os.PathLike[str],
    prefix: str | os.PathLike[str],
    *,
    skip_unsupported: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConvertReport:
    """Write every tensor of a safetensors file to a single-writer checkpoint at ``prefix``.

    TensorFlow reads the result (bfloat16 and float8 keep their dtypes).  The
    checkpoint appears only once complete (data file, then index, renamed in place).
    """
    out = os.fspath(prefix)
    with SafetensorsSource(path) as source:
        report = ConvertReport(source.path, out, "safetensors-to-checkpoint")
        _check_destination(out, os.path.exists(index_filename(out)), overwrite)
        infos = _partition(source.tensors(), _to_checkpoint_reason, "a checkpoint", skip_unsupported, report)
        if not infos:
            raise InvalidArgumentError(f"{source.path}: no tensor to convert")
        total = sum(i.nbytes for i in infos)
        # One writer per prefix: a save (or another convert) to the same prefix raises PrefixBusyError.  The lease
        # lives in the prefix's directory, so that is made first (as a save makes it).
        make_parent_directory(out)
        with PrefixLease.acquire(out, what="shardckpt convert"):
            _check_destination(out, os.path.exists(index_filename(out)), overwrite)
            with BundleWriter(out) as writer:
                for info in infos:
                    writer.add(info.name, source.read(info.name))
                    if progress is not None:
                        progress(info.nbytes, total)
            try:
                remove_stale_data_files(out, 1)  # an overwritten checkpoint's data files of another shard count
            except OSError as exc:  # the new checkpoint is complete; only an older one's files are left over
                log.warning("%s: could not remove data files of the checkpoint it replaced: %s", out, exc)
        report.tensors, report.bytes = len(infos), total
    log.info("%s: wrote %d tensors (%d bytes) to %s", report.source, report.tensors, report.bytes, out)
    return report
