"""Checkpoints: DeepSpeed's engine state plus what DeepSpeed does not know (loader positions, RNG states, step), in
a local folder or on object storage, with a `latest` pointer that only ever names a complete checkpoint.

Layout of `<dir>/step-00001000/`: DeepSpeed's files (model, optimizer partitions, scheduler),
`loader-rank{r}.json` and `rng-rank{r}.pt` for every rank, `trainer.json` (format version, step, samples seen,
counters, the resolved config) and `model.json` (what the weights are; pretrain/weights/model_weights.py).
`<dir>/latest` holds the name of the newest complete checkpoint.

Saving: every rank writes into a local folder (the checkpoint dir itself when it is local; a staging folder in the
run folder otherwise), then each node uploads what it wrote. Only when every rank reports success does rank 0 write
`latest`, and only then are checkpoints beyond `keep_last` deleted. A crash at any moment leaves `latest` at the
previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from data_pipeline.commands import UserError
from data_pipeline.storage import filesystem, is_local, join, write_bytes_atomic
from pretrain.train import distributed
from pretrain.weights.model_weights import MODEL_FILE
from pretrain.weights.safe_load import load_trusted

log = logging.getLogger(__name__)

LATEST = "latest"
PREFIX = "step-"
TRAINER_FILE = "trainer.json"
TRAINER_FORMAT_VERSION = 1
"""Version of trainer.json; files without the field are of version 1 too (it was added later)."""


class CheckpointError(UserError):
    """A checkpoint cannot be saved or loaded; the message names the place and the cause."""


def read_latest(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """The checkpoint the `latest` pointer of the folder `root` names, or None when it has none yet."""
    try:
        return fs.cat_file(join(fs, root, LATEST)).decode().strip()
    except FileNotFoundError:
        return None


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


@dataclass
class Restored:
    step: int
    trainer: dict[str, Any]
    loader_states: list[dict[str, Any]]


class CheckpointStore:
    def __init__(
        self, url: str, storage_options: dict[str, Any], staging: str, keep_last: int, placement: distributed.Placement
    ):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.local = is_local(self.fs)
        self.staging = self.root if self.local else staging
        self.keep_last = keep_last
        self.placement = placement

    # -- saving ------------------------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail before training starts, not at the first save, when the place cannot be written."""
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            elif not self.fs.exists(self.root.split("/")[0]):
                raise FileNotFoundError(f"bucket {self.root.split('/')[0]} does not exist")
        except (OSError, PermissionError) as error:
            raise CheckpointError(f"{self.url}: cannot write checkpoints ({error}); check checkpoint.dir") from None

    def save(
        self,
        engine: Any,
        step: int,
        trainer_state: dict[str, Any],
        loader_state: dict[str, Any],
        model_file: dict[str, Any],
    ) -> None:
        tag = tag_of(step)
        rank = self.placement.rank
        folder = os.path.join(self.staging, tag)
        engine.save_checkpoint(self.staging, tag=tag, save_latest=False)
        with open(os.path.join(folder, f"loader-rank{rank}.json"), "w") as handle:
            json.dump(loader_state, handle)
        torch.save(rng_state(), os.path.join(folder, f"rng-rank{rank}.pt"))
        if self.placement.is_main:
            with open(os.path.join(folder, TRAINER_FILE), "w") as handle:
                json.dump({"format_version": TRAINER_FORMAT_VERSION, "step": step, **trainer_state}, handle, indent=1)
            with open(os.path.join(folder, MODEL_FILE), "w") as handle:
                json.dump(model_file, handle, indent=1)
        dist.barrier()
        ok = True
        if not self.local and self.placement.local_rank == 0:
            ok = self._upload(folder, tag)
        if not distributed.all_true(ok):
            raise CheckpointError(
                f"{self.url}/{tag}: upload failed on some node; `latest` still names the previous checkpoint"
            )
        if self.placement.is_main:
            write_bytes_atomic(self.fs, join(self.fs, self.root, LATEST), tag.encode())
            self._prune(tag)
        if not self.local and self.placement.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()

    def _upload(self, folder: str, tag: str) -> bool:
        # File by file rather than fsspec's recursive put: that one retries every remaining file after the first
        # failure (a minute on a refusing endpoint) before it reports; here the first failure ends the upload.
        try:
            for dirpath, _dirs, files in os.walk(folder):
                for name in files:
                    local = os.path.join(dirpath, name)
                    relative = os.path.relpath(local, folder)
                    self.fs.put_file(local, join(self.fs, self.root, tag, relative))
            return True
        except Exception as error:  # any storage failure: reported, and `latest` is not moved
            log.error("%s/%s: upload failed: %s: %s", self.url, tag, type(error).__name__, error)
            return False

    def tags(self) -> list[str]:
        try:
            names = [path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(name for name in names if name.startswith(PREFIX))

    def _delete_all(self) -> None:
        """Every checkpoint and the `latest` pointer, removed by rank 0 (`latest` first: never a dangling one)."""
        if self.placement.is_main:
            self.fs.rm(join(self.fs, self.root, LATEST))
            for tag in self.tags():
                self.fs.rm(join(self.fs, self.root, tag), recursive=True)
        dist.barrier()

    def _prune(self, newest: str) -> None:
        complete = [tag for tag in self.tags() if tag <= newest]
        for tag in complete[: -self.keep_last]:
            self.fs.rm(join(self.fs, self.root, tag), recursive=True)

    # -- loading -----------------------------------------------------------------------------------------------

    def resolve(self, resume: str, overwrite: bool = False) -> str | None:
        """The checkpoint to start from: 'none', 'auto' (the newest complete one, if any) or a tag or path. Starting
        afresh where another run's checkpoints are is refused (it would interleave the two runs' steps and records),
        unless `overwrite`: then they are deleted first."""
        if resume == "none":
            newest = read_latest(self.fs, self.root)
            dist.barrier()  # every rank has read `latest` before rank 0 may delete it (else they disagree, and hang)
            if newest is not None and not overwrite:
                raise CheckpointError(
                    f"{self.url}: holds the checkpoints of a run (newest {newest}); --resume none would overwrite "
                    "them: continue it with --resume auto, start in a new folder (run.output_dir or checkpoint.dir),"
                    " or add --overwrite to delete them and start afresh here"
                )
            if newest is not None:
                self._delete_all()
            return None
        if resume == "auto":
            return read_latest(self.fs, self.root)
        tag = resume.rstrip("/").rsplit("/", 1)[-1]
        if tag not in self.tags():
            raise CheckpointError(f"{self.url}/{tag}: no such checkpoint (have: {', '.join(self.tags()) or 'none'})")
        return tag

    def load(self, engine: Any, tag: str) -> Restored:
        folder = os.path.join(self.staging, tag)
        if not self.local and self.placement.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            self.fs.get(join(self.fs, self.root, tag) + "/", folder + "/", recursive=True)
        dist.barrier()
        if not os.path.exists(os.path.join(folder, TRAINER_FILE)):
            raise CheckpointError(
                f"{self.url}/{tag}: no {TRAINER_FILE}, the checkpoint is incomplete; pass --resume with an older one"
            )
        with open(os.path.join(folder, TRAINER_FILE)) as handle:
            trainer = json.load(handle)
        if trainer.get("format_version", 1) > TRAINER_FORMAT_VERSION:
            raise CheckpointError(
                f"{self.url}/{tag}: {TRAINER_FILE} has format_version {trainer['format_version']}, "
                f"this trainer reads up to {TRAINER_FORMAT_VERSION}; resume with the newer version"
            )
        load_path, _client = engine.load_checkpoint(
            self.staging, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(
                f"{self.url}/{tag}: DeepSpeed could not load it (incomplete?); pass --resume with an older checkpoint"
            )
        loader_states = []
        for name in sorted(os.listdir(folder)):
            if name.startswith("loader-rank"):
                with open(os.path.join(folder, name)) as handle:
                    loader_states.append(json.load(handle))
        rng_file = os.path.join(folder, f"rng-rank{self.placement.rank}.pt")
        if os.path.exists(rng_file) and trainer.get("world_size") == self.placement.world_size:
            set_rng_state(load_trusted(rng_file))
        return Restored(step=trainer["step"], trainer=trainer, loader_states=loader_states)
