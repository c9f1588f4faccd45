"""``CheckpointManager``: numbered checkpoints in one directory, retention, and TensorFlow's state file.

Checkpoint ``step`` lives at ``directory/<checkpoint_name>-<step>`` (``ckpt-42.index``,
``ckpt-42.data-*``), the names ``tf.train.CheckpointManager`` uses, so either
library reads the other's directories.  The ``.index`` files on disk are the
truth about which steps exist; TensorFlow's ``checkpoint`` state file is
rewritten from them after every commit so that ``tf.train.latest_checkpoint``
finds the newest one.

Rules:

- steps only grow: a save whose step is older than the newest checkpoint is
  refused (and one equal to an existing step needs ``overwrite=True``); client 0
  decides from its view of the directory and every client learns its decision,
  so all of them raise or none does;
- after a save commits, and only then, client 0 deletes the checkpoints that
  fall out of retention: the ``max_to_keep`` newest stay, and with
  ``keep_every_n_steps=n`` so does the oldest checkpoint of every window of
  ``n`` steps (steps ``k*n .. k*n+n-1``).  The newest checkpoint is never
  deleted.  A checkpoint is deleted index first (made durable before its data
  files go), so a half-deleted checkpoint is never visible; the data files of
  one left half-deleted by a crash are removed by a later retention pass;
- client 0 then rewrites ``directory/checkpoint`` (temporary file + rename):
  ``model_checkpoint_path`` names the newest checkpoint and
  ``all_model_checkpoint_paths`` the ones retention may still delete (what
  TensorFlow lists), with relative paths and the timestamps TensorFlow's own
  manager needs to take them over;
- other clients do nothing beyond the save itself.

Housekeeping failures (deleting, writing the state file) are logged and never
fail a save: the checkpoint itself is committed by then.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from . import storage
from .checkpoint_reader import unescape_text_proto
from .commit import STAGING, TEMPSTATE
from .coordination import Coordinator, default_timeout, resolve
from .dtensor import DTensor
from .errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, InvalidArgumentError
from .format.files import fsync_directory, index_filename
from .format.writer import write_file_atomically
from .mesh import Mesh
from .restore import Target, name_based_restore
from .save import SaveFuture, SaveResult, name_based_save, wait_quietly

log = logging.getLogger("shardckpt.manager")

STATE_FILENAME = "checkpoint"

_STATE_FIELD = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths):\s*"((?:[^"\\]|\\.)*)"\s*$',
                          re.MULTILINE)


def _escape(text: str) -> str:
    """A string as a text-format protobuf string literal's body."""
    out = []
    for ch in text:
        if ch in "\"\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "".join(out)


def read_state_paths(directory: str | os.PathLike[str]) -> list[str]:
    """Every prefix a TensorFlow ``checkpoint`` state file names (model path last), as absolute-or-joined paths.

    Returns ``[]`` when there is no state file or it cannot be read.
    """
    directory = os.fspath(directory)
    try:
        text = storage.read_regular(os.path.join(directory, STATE_FILENAME))[0].decode("utf-8")
    except (OSError, UnicodeDecodeError, CheckpointError):
        return []
    paths = []
    for _, value in _STATE_FIELD.findall(text):
        try:
            name = unescape_text_proto(value)
        except ValueError:
            continue
        paths.append(name if os.path.isabs(name) else os.path.join(directory, name))
    return paths


def format_state(model_checkpoint_path: str, all_paths: list[str], timestamps: list[float],
                 last_preserved_timestamp: float | None) -> str:
    """TensorFlow's ``CheckpointState`` as text format, exactly the fields ``tf.train.CheckpointManager`` writes."""
    lines = [f'model_checkpoint_path: "{_escape(model_checkpoint_path)}"']
    lines += [f'all_model_checkpoint_paths: "{_escape(p)}"' for p in all_paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in timestamps]
    if last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {last_preserved_timestamp!r}")
    return "\n".join(lines) + "\n"


class CheckpointManager:
    """Numbered, sharded checkpoints in ``directory`` with retention, as ``tf.train.CheckpointManager``.

    Every client creates one with the same arguments (and its own ``coordinator``,
    or None to use the one this process has set up) and calls `save` with the same
    step.  ``max_to_keep=None`` keeps every checkpoint; ``keep_every_n_steps=n``
    additionally keeps the oldest checkpoint of every window of ``n`` steps forever.
    A manager is used from one thread at a time; `close` (or ``with``) waits for a
    pending asynchronous save and stops the background thread.

    When `save` returns (or its future completes) on client 0, retention and the
    state file are done; other clients return as soon as the checkpoint is
    committed, so there `latest_step` is already the new step but `all_steps` may
    for a moment still list checkpoints client 0 is about to delete.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 5,
        keep_every_n_steps: int | None = None,
        checkpoint_name: str = "ckpt",
        coordinator: Coordinator | None = None,
    ) -> None:
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or int(max_to_keep) < 1):
            raise InvalidArgumentError(f"max_to_keep must be None or at least 1, got {max_to_keep!r}")
        if keep_every_n_steps is not None and (isinstance(keep_every_n_steps, bool) or int(keep_every_n_steps) < 1):
            raise InvalidArgumentError(f"keep_every_n_steps must be None or at least 1, got {keep_every_n_steps!r}")
        if not checkpoint_name or os.sep in checkpoint_name or (os.altsep and os.altsep in checkpoint_name):
            raise InvalidArgumentError(f"checkpoint_name must be a file name, got {checkpoint_name!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self.keep_every_n_steps = None if keep_every_n_steps is None else int(keep_every_n_steps)
        self.checkpoint_name = checkpoint_name
        self._coordinator = coordinator
        self._pattern = re.compile(re.escape(checkpoint_name) + r"-(0|[1-9][0-9]*)")
        self._file_pattern = re.compile(re.escape(checkpoint_name) + r"-(0|[1-9][0-9]*)\.(?:index|data-)")
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[SaveResult] | None = None
        self._lock = threading.Lock()

    # --- what is on disk ---------------------------------------------------------------------------

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this manager's saves go through."""
        return resolve(self._coordinator)

    def prefix(self, step: int) -> str:
        """The checkpoint prefix of ``step``: ``directory/<checkpoint_name>-<step>``."""
        return os.path.join(self.directory, f"{self.checkpoint_name}-{int(step)}")

    def _step_of(self, filename: str, suffix: str) -> int | None:
        if not filename.endswith(suffix):
            return None
        match = self._pattern.fullmatch(filename[: len(filename) - len(suffix)])
        return int(match.group(1)) if match else None

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint in the directory, oldest first.

        Read from the ``<checkpoint_name>-<step>.index`` files and from the prefixes a
        ``checkpoint`` state file names in this directory (so directories written by
        TensorFlow's ``tf.train.CheckpointManager`` are read too).  Only checkpoints
        whose index exists count: an index appears only once a checkpoint is complete.
        """
        steps: set[int] = set()
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            step = self._step_of(name, ".index")
            if step is not None:
                steps.add(step)
        here = os.path.realpath(self.directory)
        for path in read_state_paths(self.directory):
            if os.path.realpath(os.path.dirname(path)) != here:
                continue
            match = self._pattern.fullmatch(os.path.basename(path))
            if match and os.path.exists(index_filename(path)):
                steps.add(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest (highest) step with a complete checkpoint, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    @property
    def latest_checkpoint(self) -> str | None:
        """The prefix of the newest checkpoint, or None (as ``tf.train.CheckpointManager.latest_checkpoint``)."""
        step = self.latest_step()
        return None if step is None else self.prefix(step)

    @property
    def checkpoints(self) -> list[str]:
        """Prefixes of every complete checkpoint, oldest first."""
        return [self.prefix(s) for s in self.all_steps()]

    # --- saving ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        mesh: Mesh,
        name_tensor_map: Mapping[str, object],
        *,
        blocking: bool = True,
        **kwargs: Any,
    ) -> SaveResult | SaveFuture:
        """Save ``{name: DTensor or array}`` as checkpoint ``step`` from every client, then apply retention.

        Mirrors `name_based_save` (``kwargs``: ``timeout``, ``overwrite``, ``durable``,
        ``max_staging_bytes``).  ``step`` must not be older than the newest checkpoint;
        an existing step needs ``overwrite=True``.  With ``blocking=False`` the call returns a
        `SaveFuture` once this client's shards are copied; the commit, then retention and
        the state file (client 0), happen in the background, and the future completes
        after them.  A save first waits for this manager's previous asynchronous save.
        """
        if "coordinator" in kwargs:
            raise InvalidArgumentError("CheckpointManager.save: the coordinator is the manager's")
        self.wait_until_finished()
        coord = self.coordinator
        timeout = default_timeout(kwargs.get("timeout"))
        self._agree_step(coord, step, bool(kwargs.get("overwrite", False)), timeout)
        step = int(step)
        prefix = self.prefix(step)
        outcome = name_based_save(mesh, prefix, dict(name_tensor_map), coordinator=coord, blocking=blocking,
                                  **kwargs)
        if isinstance(outcome, SaveResult):
            if coord.rank == 0:
                self._housekeeping(int(step))
            return outcome
        inner = outcome
        rank = coord.rank

        def finish() -> SaveResult:
            result = inner.result()
            if rank == 0:
                self._housekeeping(int(step))
            return result

        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-manager")
            future = self._executor.submit(finish)
            self._pending = future
        return SaveFuture(future, inner.prefix, inner.blocking_seconds)

    def _agree_step(self, coord: Coordinator, step: int, overwrite: bool, timeout: float) -> None:
        """Every client checks its step; client 0 adds the steps on disk; everyone applies the same verdict."""
        error = None
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            error = f"step must be a non-negative int, got {step!r}"
        else:
            step = int(step)
        payload: dict[str, object] = {"step": step if error is None else None, "error": error}
        where = f"{self.directory}: CheckpointManager.save"

        def judge(raw: list[bytes]) -> bytes:
            # Client 0 checks every client's step; only the verdict and its listing go back (O(1) per client).
            replies = [json.loads(b) for b in raw]
            for r, reply in enumerate(replies):
                if reply["error"]:
                    return json.dumps({"error": f"client {r}: {reply['error']}"}).encode()
            for r, reply in enumerate(replies):
                if reply["step"] != replies[0]["step"]:
                    return json.dumps({"error": f"client {r} saves step {reply['step']}, client 0 step "
                                                f"{replies[0]['step']}"}).encode()
            return json.dumps({"steps": self.all_steps()}).encode()

        with coord.session("manager-save") as session:
            verdict = json.loads(session.reduce(json.dumps(payload).encode(), judge, timeout))
        if "error" in verdict:
            raise InvalidArgumentError(f"{where}: {verdict['error']}")
        existing = verdict["steps"]
        if existing and step < existing[-1]:
            raise InvalidArgumentError(
                f"{where}: step {step} is older than the newest checkpoint, step {existing[-1]}; steps must not "
                "decrease (delete the newer checkpoints or use another directory)")
        if step in existing and not overwrite:
            raise CheckpointExistsError(
                f"{where}: step {step} already has a checkpoint at {self.prefix(step)} (pass overwrite=True)")

    def wait_until_finished(self) -> None:
        """Block until this manager's pending asynchronous save, its retention and state file are done.

        The save's own error stays with its future.
        """
        wait_quietly(self._pending)

    def close(self) -> None:
        """Wait for a pending asynchronous save, then stop the background thread."""
        self.wait_until_finished()
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- restoring ---------------------------------------------------------------------------------

    def latest(self, timeout: float | None = None) -> int | None:
        """The newest step with a complete checkpoint, the same on every client (or None); a collective.

        Every client calls it.  It first waits for this manager's pending asynchronous save (so that save's
        step counts once it committed); then client 0 lists the directory and broadcasts what it found: one
        collective of O(clients) messages, so clients whose views of a shared directory differ for a moment
        (caching, a step visible to some clients only) still agree.  `latest_step` is this client's own view.
        """
        self.wait_until_finished()
        coord = self.coordinator
        wait = default_timeout(timeout)
        mine = self.latest_step() if coord.rank == 0 else None
        with coord.session("manager-latest") as session:
            reply = session.broadcast("out", json.dumps({"step": mine}).encode() if coord.rank == 0 else None,
                                      wait)
        step = json.loads(reply)["step"]
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise InvalidArgumentError(f"{self.directory}: client 0 reported latest step {step!r}")
        return step

    def restore(self, mesh: Mesh, name_tensor_map: Mapping[str, Target], step: int | None = None, *,
                timeout: float | None = None, **kwargs: Any) -> dict[str, DTensor]:
        """Restore ``{name: target}`` from checkpoint ``step`` (default: the newest), as `name_based_restore`.

        Waits for this manager's pending asynchronous save first.  Without ``step`` every client calls it: the
        newest step is `latest` (client 0's listing, shared), so all clients restore the same checkpoint.
        ``timeout`` bounds that agreement; other ``kwargs`` go to `name_based_restore`.  Raises
        `CheckpointNotFoundError` when the directory has no checkpoint, or none for ``step``.
        """
        self.wait_until_finished()
        if step is None:
            step = self.latest(timeout)
            if step is None:
                raise CheckpointNotFoundError(
                    f"{self.directory}: no {self.checkpoint_name}-<step> checkpoint to restore")
        prefix = self.prefix(step)
        if not os.path.exists(index_filename(prefix)):
            raise CheckpointNotFoundError(f"{self.directory}: no checkpoint for step {step} (no {prefix}.index)")
        kwargs.setdefault("coordinator", self._coordinator)
        return name_based_restore(mesh, prefix, name_tensor_map, **kwargs)

    # --- retention and the state file (client 0) ---------------------------------------------------

    def _retained(self, steps: list[int], newest: int) -> tuple[list[int], list[int]]:
        """(the steps retention may still delete later, the steps kept forever) among ``steps``."""
        window = steps if self.max_to_keep is None else steps[-self.max_to_keep :]
        keep = set(window) | {newest}
        forever: list[int] = []
        if self.keep_every_n_steps is not None:
            firsts: dict[int, int] = {}
            for s in steps:  # ascending: the first seen in a window is its oldest
                firsts.setdefault(s // self.keep_every_n_steps, s)
            forever = sorted(s for s in firsts.values() if s not in keep)
        return sorted(keep), forever

    def _housekeeping(self, newest: int) -> None:
        try:
            self._apply_retention(newest)
        except (OSError, CheckpointError) as exc:
            log.error("%s: retention after step %d failed: %s", self.directory, newest, exc)
        try:
            self._write_state()
        except (OSError, CheckpointError) as exc:
            log.error("%s: writing the %s state file failed: %s", self.directory, STATE_FILENAME, exc)

    def _files_by_step(self) -> dict[int, list[str]]:
        """Every file of every ``<checkpoint_name>-<step>`` prefix (index, data, staged and temporary)."""
        out: dict[int, list[str]] = {}
        for name in os.listdir(self.directory):
            match = self._file_pattern.match(name)
            if match:
                out.setdefault(int(match.group(1)), []).append(name)
        return out

    def _apply_retention(self, newest: int) -> None:
        steps = self.all_steps()
        if newest not in steps:
            return
        window, forever = self._retained(steps, newest)
        keep = set(window) | set(forever)
        for step in steps:
            if step not in keep:
                self._delete(step)
        # Data files of checkpoints a crash left half-deleted (index gone, no staged index to roll forward).
        for step, names in self._files_by_step().items():
            if step >= newest or step in keep or f"{self.checkpoint_name}-{step}.index" in names:
                continue
            if any(n.startswith(f"{self.checkpoint_name}-{step}.index{STAGING}") for n in names):
                continue
            if all(STAGING not in n and TEMPSTATE not in n for n in names):
                log.info("%s: removing the rest of half-deleted checkpoint %d", self.directory, step)
                self._delete(step)

    def _delete(self, step: int) -> None:
        """Delete every file of checkpoint ``step``: its index first, durably, then everything else."""
        prefix = self.prefix(step)
        log.info("%s: deleting checkpoint %s", self.directory, os.path.basename(prefix))
        try:
            os.unlink(index_filename(prefix))
            fsync_directory(self.directory)
        except FileNotFoundError:
            pass
        for name in self._files_by_step().get(step, []):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass

    def _write_state(self) -> None:
        steps = self.all_steps()
        if not steps:
            return
        window, forever = self._retained(steps, steps[-1])
        stamps: list[float] = []
        for s in window:
            try:
                stamps.append(os.stat(index_filename(self.prefix(s))).st_mtime)
            except FileNotFoundError:
                stamps.append(0.0)
        last_preserved = min(stamps) - 1.0
        if forever:
            try:
                last_preserved = min(last_preserved, os.stat(index_filename(self.prefix(forever[-1]))).st_mtime)
            except FileNotFoundError:
                pass
        names = [os.path.basename(self.prefix(s)) for s in window]
        text = format_state(names[-1], names, stamps, last_preserved)
        write_file_atomically(os.path.join(self.directory, STATE_FILENAME), text.encode("utf-8"), durable=True)
