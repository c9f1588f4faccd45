"""Plain Python objects (optimizer ``param_groups``, step counters, learning rates) as one DT_STRING scalar.

A checkpoint must never make its reader run code, so objects are stored as JSON, never
pickled.  The stored bytes are a marker line then the document::

    shardckpt.json/1\\n{"lr": 0.001, "betas": {"$tuple": [0.9, 0.999]}, "params": [0, 1]}

Plain JSON carries ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` and
``dict`` with ``str`` keys.  A dict with exactly one key starting with ``$`` is a tag,
so the round trip stays faithful where JSON alone is not:

* ``{"$tuple": [...]}`` a tuple (Adam's ``betas``: a list would come back otherwise);
* ``{"$float": "nan" | "inf" | "-inf"}`` a non-finite float;
* ``{"$dict": [[key, value], ...]}`` a dict with non-``str`` keys (``int``, ``bool``,
  ``None``, ``float``, tuples of those) or with a key starting with ``$``.

Anything else (sets, bytes, tensors, numpy values, custom classes) is refused with an
`InvalidArgumentError` naming where it was found.  The caller may instead opt into
pickle, stored behind its own marker (`PICKLE_MARKER`), which a reader refuses
unless it opts in too.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import CorruptCheckpointError, InvalidArgumentError

JSON_MARKER = b"shardckpt.json/1\n"
PICKLE_MARKER = b"shardckpt.pickle/1\n"
MAX_DEPTH = 100  # nesting deeper than this is refused on both sides, so decoding cannot exhaust the stack

__all__ = ["JSON_MARKER", "PICKLE_MARKER", "decode", "encode", "is_encoded", "kind"]


def _enc(value: Any, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise InvalidArgumentError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    t = type(value)
    if value is None or t is bool or t is str or t is int:
        return value
    if t is float:
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if t is list:
        return [_enc(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if t is tuple:
        return {"$tuple": [_enc(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]}
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: _enc(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
        pairs = []
        for k, v in value.items():
            _check_key(k, where)
            pairs.append([_enc(k, f"{where} key {k!r}", depth + 1), _enc(v, f"{where}[{k!r}]", depth + 1)])
        return {"$dict": pairs}
    raise InvalidArgumentError(
        f"{where}: a {t.__module__}.{t.__qualname__} cannot be stored without pickle (storable: None, bool, int, "
        "float, str, and lists, tuples and dicts of those; tensors belong in the state dict's own entries)")


def _check_key(key: Any, where: str) -> None:
    if key is None or type(key) in (bool, int, float, str):
        return
    if type(key) is tuple:
        for k in key:
            _check_key(k, where)
        return
    raise InvalidArgumentError(f"{where}: a dict key of type {type(key).__name__} cannot be stored without pickle")


def encode(value: Any, where: str) -> bytes:
    """The stored form of ``value`` (marker + JSON), or `InvalidArgumentError` naming ``where``."""
    doc = _enc(value, where, 0)
    # ASCII only: lone surrogates and every other code point survive as JSON escapes.
    return JSON_MARKER + json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def kind(data: bytes) -> str | None:
    """``"json"`` or ``"pickle"`` for bytes `encode` (or an opted-in pickle) made, else None."""
    if data.startswith(JSON_MARKER):
        return "json"
    if data.startswith(PICKLE_MARKER):
        return "pickle"
    return None


def is_encoded(data: bytes) -> bool:
    return kind(data) is not None


def _dec(doc: Any, where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"{where}: stored object nested more than {MAX_DEPTH} levels deep")
    if doc is None or isinstance(doc, (bool, int, str)):
        return doc
    if isinstance(doc, float):
        if not math.isfinite(doc):
            raise CorruptCheckpointError(f"{where}: a bare non-finite float in a stored object")
        return doc
    if isinstance(doc, list):
        return [_dec(v, where, depth + 1) for v in doc]
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: unexpected JSON value {type(doc).__name__}")
    tags = [k for k in doc if k.startswith("$")]
    if not tags:
        return {k: _dec(v, where, depth + 1) for k, v in doc.items()}
    if len(doc) != 1:
        raise CorruptCheckpointError(f"{where}: a tag {tags[0]!r} must be the only key of its object")
    (tag, body), = doc.items()
    if tag == "$tuple" and isinstance(body, list):
        return tuple(_dec(v, where, depth + 1) for v in body)
    if tag == "$float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "$dict" and isinstance(body, list):
        out: dict[Any, Any] = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise CorruptCheckpointError(f"{where}: a $dict item must be a [key, value] pair")
            key = _dec(pair[0], where, depth + 1)
            try:
                hash(key)
            except TypeError:
                raise CorruptCheckpointError(
                    f"{where}: a $dict key must be hashable, got {type(key).__name__}") from None
            out[key] = _dec(pair[1], where, depth + 1)
        return out
    raise CorruptCheckpointError(f"{where}: unknown or malformed tag {tag!r} in a stored object")


def decode(data: bytes, where: str) -> Any:
    """The object of bytes `encode` made; `CorruptCheckpointError` naming ``where`` for anything else.

    Pickled bytes are never decoded here: the caller decides about those (`kind`).
    """
    if not data.startswith(JSON_MARKER):
        raise CorruptCheckpointError(f"{where}: not a stored object (no {JSON_MARKER!r} marker)")
    try:
        doc = json.loads(data[len(JSON_MARKER):].decode("ascii"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: the stored object is not valid JSON: {exc}") from None
    return _dec(doc, where, 0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
