"""shardckpt.lightning.CheckpointIO under a real Lightning Trainer (CPU, one process): checkpoints are TensorFlow
bundles, resuming continues the run bit for bit, and what JSON cannot hold is refused, never pickled."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import shardckpt
import shardckpt.lightning
from shardckpt import CorruptCheckpointError, InvalidArgumentError, objects

BATCHES = 4  # per epoch


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin = torch.nn.Linear(3, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)  # running stats and an int64 counter; version 2 in _metadata
        self.extra: Any = None  # put into the checkpoint by on_save_checkpoint once global_step reaches extra_at
        self.extra_at = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = ((self.bn(self.lin(x)).sum(dim=1) - y) ** 2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)  # betas: a tuple, state keyed by int
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.extra is not None and self.trainer.global_step >= self.extra_at:
            checkpoint["extra"] = self.extra

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(2 * BATCHES, 3, generator=g), torch.randn(2 * BATCHES, generator=g))
        return DataLoader(data, batch_size=2)


class Seen(Callback):
    """What the run looked like when training started (after any restore) and each checkpoint Lightning made."""

    def __init__(self) -> None:
        self.start: dict[str, Any] = {}
        self.saved: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        self.start = {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                      "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                      "optim": copy.deepcopy(opt.state_dict()), "lr": opt.param_groups[0]["lr"]}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved.append(checkpoint)  # the dict itself: Lightning adds the callbacks' states after this hook


def trainer(root: Any, *callbacks: Callback, io: shardckpt.lightning.CheckpointIO | None = None,
            **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                     enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks),
                     plugins=[io or shardckpt.lightning.CheckpointIO(durable=False)], **kwargs)


def bits(t: torch.Tensor) -> list[int]:
    return t.reshape(-1).contiguous().view(torch.uint8).tolist()


def same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """``a`` and ``b`` equal with the same types all the way down; tensors bit for bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert bits(a) == bits(b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_checkpoints_are_bundles_and_resume_continues_bit_for_bit(tmp_path) -> None:
    torch.manual_seed(1)
    ckpts = tmp_path / "ckpts"
    seen = Seen()
    model = Tiny()
    trainer(tmp_path, ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=-1), seen, max_epochs=2).fit(model)
    path = ckpts / f"epoch=1-step={2 * BATCHES}.ckpt"
    assert sorted(os.listdir(ckpts)) == [f"epoch=0-step={BATCHES}.ckpt", path.name, "last.ckpt"]
    assert sorted(os.listdir(path)) == ["checkpoint", "model.data-00000-of-00001",
                                        "model.data-00000-of-00001.crc32c", "model.index"]

    # A TensorFlow bundle: the weights under their names, the rest JSON strings (no pickle anywhere).
    reader = shardckpt.load_checkpoint(str(path))
    shapes = reader.get_variable_to_shape_map()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights.items():
        assert shapes[f"state_dict.{name}"] == list(value.shape)
        stored = reader.get_array(f"state_dict.{name}")
        assert torch.equal(torch.from_numpy(stored.copy()).reshape(value.shape), value), name
    assert shapes["optimizer_states.0.state.0.exp_avg"] == [5, 3]
    strings = [n for n, dt in reader.get_variable_to_datatype_map().items() if dt == shardckpt.DataType.STRING]
    assert {"epoch", "global_step", "pytorch-lightning_version", "loops", "hyper_parameters",
            "optimizer_states.0.param_groups", shardckpt.lightning.LAYOUT_NAME} <= set(strings)
    for name in strings:
        assert objects.kind(reader.get_tensor(name)) == "json", name
    assert objects.decode(reader.get_tensor("global_step"), "global_step") == 2 * BATCHES
    assert objects.decode(reader.get_tensor("epoch"), "epoch") == 1

    # Resume in a new Trainer with a freshly initialised model: it starts where the checkpoint left off.
    torch.manual_seed(2)
    again = Tiny()
    assert not torch.equal(again.lin.weight, weights["lin.weight"])
    resumed = Seen()
    t2 = trainer(tmp_path / "second", resumed, max_epochs=3)
    t2.fit(again, ckpt_path=str(path))
    assert resumed.start["global_step"] == 2 * BATCHES and resumed.start["epoch"] == 2
    assert t2.global_step == 3 * BATCHES and t2.current_epoch == 3
    same(resumed.start["weights"], weights, "weights")
    same(resumed.start["optim"]["state"], seen.saved[-1]["optimizer_states"][0]["state"], "optimizer state")
    assert resumed.start["lr"] == 0.05 * 0.5 ** 2  # the StepLR schedule continued (two epochs stepped)


def test_load_gives_back_exactly_the_dict_lightning_saved(tmp_path) -> None:
    seen = Seen()
    model = Tiny()
    trainer(tmp_path, ModelCheckpoint(dirpath=tmp_path / "c", monitor="loss", save_top_k=1), seen,
            max_epochs=1).fit(model)
    (path,) = (tmp_path / "c").iterdir()
    saved = seen.saved[-1]
    assert type(saved["state_dict"]) is OrderedDict
    loaded = shardckpt.lightning.CheckpointIO().load_checkpoint(path)
    same(loaded, saved)  # epoch, version string, loops, callbacks (tensors inside), tuples, int keys, hparams
    assert loaded["state_dict"]._metadata == saved["state_dict"]._metadata  # BatchNorm's version 2 included
    assert loaded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_an_object_json_cannot_hold_is_refused_naming_it_and_the_previous_checkpoint_stays(tmp_path) -> None:
    ckpts = tmp_path / "ckpts"
    model = Tiny()
    model.extra, model.extra_at = {"tags": {"a", "b"}}, 2 * BATCHES  # a set, from the second epoch's save on
    refused = rf"ckpts/epoch=1-step={2 * BATCHES}.ckpt/model: extra\['tags'\]: a builtins\.set cannot be stored"
    with pytest.raises(InvalidArgumentError, match=refused):
        trainer(tmp_path, ModelCheckpoint(dirpath=ckpts, save_top_k=-1), max_epochs=2).fit(model)
    assert sorted(os.listdir(ckpts)) == [f"epoch=0-step={BATCHES}.ckpt"]  # nothing of the refused one
    io = shardckpt.lightning.CheckpointIO()
    first = io.load_checkpoint(ckpts / f"epoch=0-step={BATCHES}.ckpt")
    assert first["global_step"] == BATCHES and "extra" not in first
    # Over the same path: refused before anything is written, the checkpoint there unchanged.
    with pytest.raises(InvalidArgumentError, match=r"model: loops\['x'\]: a builtins\.bytes cannot be stored"):
        io.save_checkpoint({**first, "global_step": 99, "loops": {"x": b"raw"}}, ckpts / f"epoch=0-step={BATCHES}.ckpt")
    same(io.load_checkpoint(ckpts / f"epoch=0-step={BATCHES}.ckpt"), first)


def test_allow_pickle_stores_it_pickled_and_only_an_opted_in_reader_loads_it(tmp_path) -> None:
    model = Tiny()
    model.extra = {"tags": {"a", "b"}}
    io = shardckpt.lightning.CheckpointIO(allow_pickle=True, durable=False)
    trainer(tmp_path, ModelCheckpoint(dirpath=tmp_path / "c"), io=io, max_epochs=1).fit(model)
    (path,) = (tmp_path / "c").iterdir()
    assert objects.kind(shardckpt.load_checkpoint(str(path)).get_tensor("extra")) == "pickle"
    assert objects.kind(shardckpt.load_checkpoint(str(path)).get_tensor("epoch")) == "json"
    # the reader's own refusal, not DCP's wrapper (a BaseException that ``except Exception`` would miss)
    with pytest.raises(shardckpt.CheckpointError, match="extra.*is a pickle"):
        shardckpt.lightning.CheckpointIO().load_checkpoint(path)
    assert io.load_checkpoint(path)["extra"] == {"tags": {"a", "b"}}


def test_top_k_removes_old_checkpoint_directories_and_remove_refuses_what_is_not_one(tmp_path) -> None:
    ckpts = tmp_path / "ckpts"
    trainer(tmp_path, ModelCheckpoint(dirpath=ckpts, save_top_k=1), max_epochs=2).fit(Tiny())
    assert os.listdir(ckpts) == [f"epoch=1-step={2 * BATCHES}.ckpt"]  # Lightning removed epoch 0's directory
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    io = shardckpt.lightning.CheckpointIO()
    with pytest.raises(InvalidArgumentError, match="not a checkpoint directory.*not removed"):
        io.remove_checkpoint(other)
    assert (other / "keep.txt").read_text() == "mine"
    io.remove_checkpoint(tmp_path / "gone")  # nothing there: nothing to do, as Lightning's own CheckpointIO


def test_a_dcp_checkpoint_without_the_layout_is_refused(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    from shardckpt.torch import StorageWriter

    dcp.save({"w": torch.ones(2)}, storage_writer=StorageWriter(tmp_path / "plain", durable=False), no_dist=True)
    with pytest.raises(CorruptCheckpointError, match="no shardckpt_lightning.layout entry"):
        shardckpt.lightning.CheckpointIO().load_checkpoint(tmp_path / "plain")


DDP_WORKER = r"""
import json, os, sys
import torch
import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, sys.argv[1])
import shardckpt.lightning
from test_lightning import Seen, Tiny

out = sys.argv[2]
rank = int(os.environ["RANK"])

def trainer(epochs, *callbacks):
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, enable_progress_bar=False,
                     logger=False, enable_model_summary=False, default_root_dir=out, callbacks=list(callbacks),
                     plugins=[shardckpt.lightning.CheckpointIO(durable=False)])

torch.manual_seed(1)
model = Tiny()
trainer(1, ModelCheckpoint(dirpath=os.path.join(out, "ckpts"), save_top_k=-1)).fit(model)
saved = {k: v.reshape(-1).view(torch.uint8).tolist() for k, v in model.state_dict().items()}
(name,) = os.listdir(os.path.join(out, "ckpts"))
torch.manual_seed(2 + rank)
seen = Seen()
t2 = trainer(2, seen)
t2.fit(Tiny(), ckpt_path=os.path.join(out, "ckpts", name))
start = {k: v.reshape(-1).view(torch.uint8).tolist() for k, v in seen.start["weights"].items()}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"name": name, "saved": saved, "start": start, "start_step": seen.start["global_step"],
               "end_step": t2.global_step, "world": t2.world_size}, f)
"""


def test_ddp_on_two_gloo_processes_saves_from_rank_0_and_every_rank_resumes_from_it(tmp_path) -> None:
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    scratch = tmp_path / "tmp"  # torchrun's own logs go to TMPDIR
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), os.path.dirname(__file__), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    per_epoch = BATCHES // 2  # the DistributedSampler halves each rank's batches
    assert r0["world"] == r1["world"] == 2 and r0["name"] == f"epoch=0-step={per_epoch}.ckpt"
    assert sorted(os.listdir(tmp_path / "ckpts" / r0["name"])) == [  # written by rank 0 alone: one data file
        "checkpoint", "model.data-00000-of-00001", "model.data-00000-of-00001.crc32c", "model.index"]
    for r in (r0, r1):
        assert r["start_step"] == per_epoch and r["end_step"] == 2 * per_epoch
        assert r["start"] == r0["saved"]  # both ranks start from rank 0's saved state, bit for bit


def test_a_tensor_whose_stored_slices_do_not_cover_it_is_refused_not_left_uninitialised(tmp_path) -> None:
    import numpy as np

    from shardckpt import BundleWriter

    layout = objects.encode({"version": 1, "tree": {"w": "w", "epoch": "epoch"}, "types": []}, "layout")
    with BundleWriter(tmp_path / "c" / "model", durable=False) as w:
        w.add_slice("w", "6 0,2", np.ones(2, np.float32))  # elements 2, 3 and 5 are stored nowhere
        w.add_slice("w", "6 4,1", np.ones(1, np.float32))
        w.add("epoch", np.array(objects.encode(0, "epoch"), dtype=object))
        w.add(shardckpt.lightning.LAYOUT_NAME, np.array(layout, dtype=object))
    with pytest.raises(shardckpt.InsufficientSlicesError, match=r"c/model: does not have sufficient slices for "
                       r"partitioned tensor w to read 0,6; stored slices overlapping it: 0,2, 4,1"):
        shardckpt.lightning.CheckpointIO().load_checkpoint(tmp_path / "c")


class FillDiskAt(Callback):
    """Takes the last free byte of the file system at fault point ``point`` of the save Lightning makes at
    ``step`` (a real ENOSPC from then on, `fs_helpers`), after noting the bytes of the checkpoint it writes over."""

    def __init__(self, directory: Any, point: str, step: int, path: Any) -> None:
        self.directory, self.point, self.step, self.path = directory, point, step, path
        self.armed = False
        self.before: dict[str, bytes] = {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.armed = trainer.global_step == self.step  # called just before the CheckpointIO writes
        if self.armed:
            self.before = files(self.path)

    def __call__(self, point: str, client: int) -> None:
        if self.armed and point == self.point:
            from fs_helpers import fill_to

            fill_to(self.directory, 0)


def files(directory: Any) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_the_next_save_works(tmp_path) -> None:
    """The disk fills while a checkpoint is written over (in its data file, then in its index): the fit stops
    with a CheckpointIOError naming the checkpoint, which is still the previous one byte for byte with nothing
    staged beside it, and once there is room a run resumed from it saves over it."""
    import errno

    from fs_helpers import full_filesystem
    from shardckpt import CheckpointIOError, faults

    with full_filesystem(tmp_path, 1 << 20) as disk:
        path = disk / "ckpts" / "run.ckpt"  # written over at the end of each epoch

        def fit(epochs: int, *callbacks: Callback, resume: bool = True) -> None:
            checkpoints = ModelCheckpoint(dirpath=disk / "ckpts", filename="run", enable_version_counter=False)
            trainer(tmp_path, checkpoints, *callbacks, max_epochs=epochs).fit(
                Tiny(), ckpt_path=str(path) if resume else None)

        for point, file, resume in (("after_plan", "model.data-00000-of-00001.staging-", False),
                                    ("after_data_fsync", "model.index", True)):
            fill = FillDiskAt(disk, point, 2 * BATCHES, path)
            with faults.hook(fill), pytest.raises(CheckpointIOError) as info:
                fit(2, fill, resume=resume)
            assert info.value.errno == errno.ENOSPC, info.value
            assert f"{path / 'model'}: " in str(info.value) and file in str(info.value), info.value
            assert sorted(fill.before) == ["checkpoint", "model.data-00000-of-00001",
                                           "model.data-00000-of-00001.crc32c", "model.index"]
            assert files(path) == fill.before  # nothing staged beside it, not one byte changed
            assert shardckpt.lightning.CheckpointIO().load_checkpoint(path)["global_step"] == BATCHES
            os.unlink(disk / "filler")
        again = Seen()
        fit(2, again)
        assert again.start["global_step"] == BATCHES and len(again.saved) == 1
        same(shardckpt.lightning.CheckpointIO().load_checkpoint(path), again.saved[0])
        assert again.saved[0]["global_step"] == 2 * BATCHES
