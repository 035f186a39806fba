"""Checkpoints: DeepSpeed's engine state plus what DeepSpeed does not know (loader positions, RNG states, step), in
a local folder or on object storage, with a `latest` pointer that only ever names a complete checkpoint.

Layout of `<dir>/step-00001000/`: DeepSpeed's files (model, optimizer partitions, scheduler),
`loader-rank{r}.json` and `rng-rank{r}.pt` for every rank, `model.json` (what the weights are;
pretrain/weights/model_weights.py) and `trainer.json` (format version, step, samples seen, counters, world size, the
resolved config, and every other file of the checkpoint with its size). `<dir>/latest` holds the name of the newest
complete checkpoint.

Saving: every rank writes its files into its node's staging folder: the checkpoint dir itself when it is local, else
`checkpoint.staging_dir` (default: a folder in the node's temporary directory, never the shared run folder). For
object storage each rank then uploads the files it wrote (DeepSpeed names them by rank), several at a time, in
background threads while training goes on. At every step boundary the ranks agree in one collective (the same one
that carries a preemption request) whether the uploads have finished: then rank 0 writes `latest` and deletes
checkpoints beyond `keep_last`. The next save, the end of the run and a preemption wait for the upload; a failed
upload stops the run at the next step boundary, `latest` unchanged. A crash at any moment leaves `latest` at the
previous complete checkpoint.

Resuming: the file list in trainer.json is checked against the folder first, so `--resume auto` passes over a
checkpoint with a missing or truncated file to the previous complete one (with a warning). From object storage each
rank downloads the files it reads (its own partitions; each node's first rank the shared ones). On another number of
ranks ZeRO 1-3 checkpoints are loaded through DeepSpeed's universal format (pretrain/train/elastic.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file, save_file

from data_pipeline.commands import UserError
from data_pipeline.storage import filesystem, is_local, join, write_bytes_atomic
from pretrain.model.description import ModelDescription
from pretrain.train import distributed, elastic
from pretrain.weights.model_weights import MODEL_FILE, parse_model_file
from pretrain.weights.safe_load import load_trusted, weights_only_loads

log = logging.getLogger(__name__)

LATEST = "latest"
PREFIX = "step-"
TAG = re.compile(r"step-\d{8}")
TRAINER_FILE = "trainer.json"
WEIGHT_AVERAGE_FILE = "weight_average.safetensors"
"""optimizer.ema's average of the weights (fp32, by parameter name), written by rank 0."""
TRAINER_FORMAT_VERSION = 1
"""Version of trainer.json; files without the field are of version 1 too (it was added later)."""
TRANSFER_THREADS = 8
"""Files each rank uploads or downloads at once: object stores serve parallel requests at full speed each, and a
checkpoint is a few large files per rank."""
_RANK_MARK = re.compile(r"(?:pp_rank_|-rank)(\d+)[_.]")


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


def owner(name: str) -> int | None:
    """The rank that writes (and alone reads) a checkpoint file: DeepSpeed's per-rank partitions
    (`zero_pp_rank_3_mp_rank_00_optim_states.pt`) and ours (`rng-rank3.pt`, `loader-rank3.json`); None for what rank
    0 writes for all (`mp_rank_00_model_states.pt`, trainer.json, model.json)."""
    match = _RANK_MARK.search(name)
    return int(match.group(1)) if match else None


def default_staging_dir(url: str) -> str:
    """A node-local folder for the checkpoints of `url`: the same on every rank of a node, never on shared storage,
    one per user (a shared /tmp) and per URL (readable, and a hash so that a/b_c and a/b/c differ)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-64:]
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return os.path.join(tempfile.gettempdir(), f"vit-pretrain-staging-{os.getuid()}", f"{readable}-{digest}")


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
    weight_average: dict[str, torch.Tensor] | None


class Upload:
    """One rank's files of one checkpoint on their way to object storage, in background threads."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str, remote: str, names: list[str]):
        self.folder = folder
        self.names = names
        self.pool = ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="checkpoint-upload")
        self.futures: list[Future] = [
            self.pool.submit(fs.put_file, os.path.join(folder, name), join(fs, remote, name)) for name in names
        ]
        self.pool.shutdown(wait=False)

    def done(self) -> bool:
        return all(future.done() for future in self.futures)

    def cancel(self) -> None:
        """Drop the files not yet started (the run stops; the process exits once the ones in flight end)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def failure(self) -> str | None:
        """The first failed file's error, once it has failed."""
        for name, future in zip(self.names, self.futures, strict=True):
            if future.done() and future.exception() is not None:
                error = future.exception()
                return f"{name}: {type(error).__name__}: {error}"
        return None

    def remove_local_files(self) -> None:
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, name))
        with contextlib.suppress(OSError):  # another rank of the node still has files in it (the last one removes it)
            os.rmdir(self.folder)


class CheckpointStore:
    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any],
        staging: str | None,
        keep_last: int,
        placement: distributed.Placement,
    ):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.local = is_local(self.fs)
        self.staging = self.root if self.local else (staging or default_staging_dir(self.url))
        self.keep_last = keep_last
        self.placement = placement
        self.upload: Upload | None = None
        self.uploading_tag: str | None = None

    @property
    def keeps_folder(self) -> bool:
        """Whether this process tends its copy of the staging folder (clears, converts, prunes): one per copy, rank 0
        for a local checkpoint folder (one shared copy), each node's first rank for object storage."""
        return self.placement.is_main if self.local else self.placement.local_rank == 0

    # -- saving ------------------------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail before training starts, not at the first save, when the place cannot be written."""
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            else:
                os.makedirs(self.staging, exist_ok=True)
                if not self.fs.exists(self.root.split("/")[0]):
                    raise FileNotFoundError(f"bucket {self.root.split('/')[0]} does not exist")
        except OSError as error:
            raise CheckpointError(f"{self.url}: cannot write checkpoints ({error}); check checkpoint.dir") from None

    def save(
        self,
        engine: Any,
        step: int,
        trainer_state: dict[str, Any],
        loader_state: dict[str, Any],
        model_file: dict[str, Any],
        weight_average: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write this rank's files of the checkpoint of `step` (rank 0: the weight average too, the same on every
        rank); a local checkpoint is complete on return, one for object storage once its upload is
        (`step_questions`, `at_step_boundary`, `finish_upload`)."""
        self.finish_upload(step)  # the previous checkpoint's upload first: `latest` moves in order
        tag = tag_of(step)
        rank = self.placement.rank
        folder = os.path.join(self.staging, tag)
        self._clear(tag)
        error = None
        try:
            engine.save_checkpoint(self.staging, tag=tag, save_latest=False)
            with open(os.path.join(folder, f"loader-rank{rank}.json"), "w") as handle:
                json.dump(loader_state, handle)
            torch.save(rng_state(), os.path.join(folder, f"rng-rank{rank}.pt"))
            if self.placement.is_main:
                with open(os.path.join(folder, MODEL_FILE), "w") as handle:
                    json.dump(model_file, handle, indent=1)
                if weight_average is not None:
                    save_file(weight_average, os.path.join(folder, WEIGHT_AVERAGE_FILE))
        except (OSError, RuntimeError) as failure:  # a full or read-only disk (torch.save's writer raises
            error = failure  # RuntimeError): the previous checkpoint stays the one to resume
            # in this rank's log too: a rank failing inside DeepSpeed's save may leave the others in its barrier,
            # and then the launcher ends the job before rank 0 could print the line below
            log.error("%s/%s: cannot write the checkpoint on rank %d: %s", self.url, tag, rank, failure)
        own = None if error else self._own_files(folder)
        written = distributed.all_gather_object(own)
        if any(files is None for files in written):
            raise CheckpointError(
                f"{self.url}/{tag}: cannot write the checkpoint ({error or 'on another rank'}); `latest` still names "
                "the previous one: free space or check checkpoint.dir and resume"
            )
        files = {name: size for rank_files in written for name, size in rank_files.items()}
        if self.placement.is_main:
            record = {"format_version": TRAINER_FORMAT_VERSION, "step": step, **trainer_state, "files": files}
            with open(os.path.join(folder, TRAINER_FILE), "w") as handle:
                json.dump(record, handle, indent=1)
        if self.local:
            dist.barrier()  # trainer.json is written
            self._commit(tag)
            if self.placement.is_main:
                print(f"checkpoint {self.url}/{tag}", flush=True)
            return
        names = sorted(own) + ([TRAINER_FILE] if self.placement.is_main else [])
        self.upload = Upload(self.fs, folder, join(self.fs, self.root, tag), names)
        self.uploading_tag = tag
        if self.placement.is_main:
            print(f"checkpoint {self.url}/{tag} written; uploading while training goes on", flush=True)

    def _clear(self, tag: str) -> None:
        """Remove what an earlier save of the same step left (a run resumed from an older checkpoint saves its steps
        again, maybe on another number of ranks, whose leftover partitions would be read as part of the new one)."""
        if self.keeps_folder:
            shutil.rmtree(os.path.join(self.staging, tag), ignore_errors=True)
            shutil.rmtree(os.path.join(self.staging, elastic.UNIVERSAL, tag), ignore_errors=True)
        if self.placement.is_main and not self.local and self.fs.exists(join(self.fs, self.root, tag)):
            self.fs.rm(join(self.fs, self.root, tag), recursive=True)
        dist.barrier()

    def _own_files(self, folder: str) -> dict[str, int]:
        """This rank's files in a checkpoint folder (rank 0 also has the unmarked ones), with their sizes."""
        rank = self.placement.rank
        return {
            entry.name: entry.stat().st_size
            for entry in os.scandir(folder)
            if entry.is_file()
            and entry.name != TRAINER_FILE  # written after this list, which it holds
            and not entry.name.startswith(".")  # a download in progress
            and (owner(entry.name) or 0) == rank
        }

    def step_questions(self, preempt_requested: bool) -> list[bool]:
        """What every rank tells the others once per optimizer step (in the trainer's one collective of the step):
        whether it was asked to stop, whether its upload failed, whether its upload is still running."""
        upload = self.upload
        pending = upload is not None and not upload.done()  # first: a file failing in between counts as pending
        failed = upload is not None and upload.failure() is not None
        return [preempt_requested, failed, pending]

    def at_step_boundary(self, step: int, answers: list[bool]) -> bool:
        """Act on the answers to `step_questions` (each: true on any rank) after the optimizer step: a failed upload
        anywhere stops the run (one line); once no rank's upload runs the checkpoint is committed. Returns whether
        any rank was asked to stop."""
        preempt, any_failed, any_pending = answers
        if self.upload is not None and any_failed:
            self._upload_failed()
        if self.upload is not None and not any_pending:
            self._commit_upload(f"at step {step}")
        return preempt

    def finish_upload(self, step: int) -> None:
        """At the end of `step`, wait until every rank's upload of the pending checkpoint has finished, then commit it
        (or stop)."""
        if self.upload is None:
            return
        start = time.perf_counter()
        distributed.wait_for(self.upload.done)
        if not distributed.all_true(self.upload.failure() is None):
            self._upload_failed()
        self._commit_upload(f"at step {step} after waiting {time.perf_counter() - start:.1f} s")

    def _upload_failed(self) -> None:
        assert self.upload is not None
        self.upload.cancel()
        failure = self.upload.failure()  # before the files go: a read cut short by their removal is not the cause
        self.upload.remove_local_files()  # never committed: the staged copy is of no use (uploads in flight end)
        if failure:
            log.error("%s/%s: upload failed on rank %d: %s", self.url, self.uploading_tag, self.placement.rank, failure)
        raise CheckpointError(
            f"{self.url}/{self.uploading_tag}: upload failed ({failure or 'on another rank'}); `latest` still names "
            "the previous checkpoint: check the store and resume with --resume auto"
        )

    def _commit_upload(self, when: str) -> None:
        assert self.upload is not None and self.uploading_tag is not None and self.upload.failure() is None
        self.upload.remove_local_files()
        tag, self.upload, self.uploading_tag = self.uploading_tag, None, None
        self._commit(tag)
        if self.placement.is_main:
            print(f"checkpoint {self.url}/{tag} uploaded {when}", flush=True)

    def _commit(self, tag: str) -> None:
        """Every rank's files of `tag` are in place: rank 0 points `latest` at it and prunes older checkpoints."""
        error = None
        if self.placement.is_main:
            try:
                write_bytes_atomic(self.fs, join(self.fs, self.root, LATEST), tag.encode())
            except Exception as failure:  # any storage failure: every rank stops together, in one line
                error = f"{type(failure).__name__}: {failure}"
        if not distributed.all_true(error is None):
            raise CheckpointError(
                f"{self.url}/{LATEST}: cannot point it at {tag} ({error or 'on rank 0'}); it still names the previous "
                "checkpoint: check the store and resume"
            )
        if self.keeps_folder:
            self._remove_universal_copies(before=tag)
        if self.placement.is_main:
            try:
                self._prune(tag)
            except Exception as failure:  # older checkpoints left in place cost space, not correctness
                log.warning(
                    "%s: pruning checkpoints before %s failed: %s: %s", self.url, tag, type(failure).__name__, failure
                )

    def tags(self) -> list[str]:
        try:
            names = [path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(name for name in names if TAG.fullmatch(name))

    def _delete_all(self) -> None:
        """Every checkpoint and the `latest` pointer, removed by rank 0 (`latest` first: never a dangling one)."""
        if self.placement.is_main:
            self.fs.rm(join(self.fs, self.root, LATEST))
            for tag in self.tags():
                self.fs.rm(join(self.fs, self.root, tag), recursive=True)
            shutil.rmtree(os.path.join(self.staging, elastic.UNIVERSAL), ignore_errors=True)
        dist.barrier()

    def _prune(self, newest: str) -> None:
        complete = [tag for tag in self.tags() if tag <= newest]
        for tag in complete[: -self.keep_last]:
            self.fs.rm(join(self.fs, self.root, tag), recursive=True)

    def _remove_universal_copies(self, before: str) -> None:
        """Converted copies of checkpoints older than `before`, which this number of ranks has just saved: a resume
        starts from it (or a newer one) and needs no conversion. Object storage: one copy per node, each removed
        by its node's first rank."""
        folder = os.path.join(self.staging, elastic.UNIVERSAL)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                if TAG.fullmatch(name) and name < before:
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------------------

    def resolve(self, resume: str, overwrite: bool = False) -> str | None:
        """The checkpoint to start from: 'none', 'auto' or 'latest' (OpenCLIP's word; the newest complete one, if any)
        or a tag or path. Starting afresh where another run's checkpoints are is refused (it would interleave the two
        runs' steps and records), unless `overwrite`: then they are deleted first."""
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
        if resume in ("auto", "latest"):
            return self._newest_complete()
        tag = resume.rstrip("/").rsplit("/", 1)[-1]
        if tag not in self.tags():
            raise CheckpointError(f"{self.url}/{tag}: no such checkpoint (have: {', '.join(self.tags()) or 'none'})")
        problem = self.incomplete(tag)
        if problem:
            raise CheckpointError(f"{self.url}/{tag}: {problem}; pass --resume with another checkpoint")
        return tag

    def _newest_complete(self) -> str | None:
        """`latest`, or when it is damaged (a file lost or cut short after it was written) the newest complete
        checkpoint before it."""
        latest = read_latest(self.fs, self.root)
        if latest is None:
            return None
        candidates = [latest] + [tag for tag in reversed(self.tags()) if tag < latest]
        for tag in candidates:
            problem = self.incomplete(tag)
            if problem is None:
                return tag
            if self.placement.is_main:
                log.warning("%s/%s: %s; trying the checkpoint before it", self.url, tag, problem)
        raise CheckpointError(
            f"{self.url}: no complete checkpoint (newest {latest}); restore the missing files, or start afresh with "
            "--resume none --overwrite"
        )

    def trainer_record(self, tag: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.fs.cat_file(join(self.fs, self.root, tag, TRAINER_FILE)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def model_record(self, tag: str) -> tuple[ModelDescription, str] | None:
        """What the weights of the checkpoint `tag` are (its model.json: architecture, encoder prefix), or None for a
        checkpoint from before model.json was written."""
        source = f"{self.url}/{tag}"
        try:
            data = json.loads(self.fs.cat_file(join(self.fs, self.root, tag, MODEL_FILE)))
        except FileNotFoundError:
            return None
        except ValueError:
            raise CheckpointError(f"{source}/{MODEL_FILE} is not JSON; is it damaged?") from None
        return parse_model_file(data, source)

    def incomplete(self, tag: str) -> str | None:
        """What is wrong with the checkpoint `tag` (no trainer.json, a file missing or of another size than written),
        or None. Checkpoints from before trainer.json listed its files are taken as they are."""
        record = self.trainer_record(tag)
        if record is None:
            return f"no {TRAINER_FILE}, the checkpoint is incomplete"
        if "step" not in record:
            return f"{TRAINER_FILE} is damaged"
        listed = record.get("files", {})
        present = {
            entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size")
            for entry in self.fs.ls(join(self.fs, self.root, tag), detail=True)
        }
        missing = sorted(name for name in listed if name not in present)
        if missing:
            return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
        cut = sorted(name for name, size in listed.items() if present[name] != size)
        if cut:
            return f"{cut[0]} is {present[cut[0]]} bytes, {listed[cut[0]]} were written"
        return None

    def load(self, engine: Any, tag: str, universal: bool, weight_decays: list[float]) -> Restored:
        """Restore `engine` (and return the rest) from the complete checkpoint `tag`; with `universal`, through a
        universal copy of it (another number of ranks, ZeRO 1-3)."""
        folder = self._local_copy(tag, everything=universal)
        with open(os.path.join(folder, TRAINER_FILE)) as handle:
            trainer = json.load(handle)
        if trainer.get("format_version", 1) > TRAINER_FORMAT_VERSION:
            raise CheckpointError(
                f"{self.url}/{tag}: {TRAINER_FILE} has format_version {trainer['format_version']}, "
                f"this trainer reads up to {TRAINER_FORMAT_VERSION}; resume with the newer version"
            )
        load_dir, load_tag = self.staging, tag
        if universal:
            load_dir, load_tag = os.path.join(self.staging, elastic.UNIVERSAL), tag
            self._convert(folder, os.path.join(load_dir, tag), trainer.get("world_size"))
        try:
            # DeepSpeed's universal loader unpickles with torch.load directly, past the engine's guarded loads
            with weights_only_loads():
                load_path, _client = engine.load_checkpoint(
                    load_dir, tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        except UserError:
            raise
        except Exception as error:  # anything DeepSpeed raises on a file it cannot use: one line, not a traceback
            raise CheckpointError(
                f"{self.url}/{tag}: DeepSpeed could not load it ({type(error).__name__}: {error}); pass --resume with "
                "another checkpoint"
            ) from None
        if load_path is None:
            raise CheckpointError(
                f"{self.url}/{tag}: DeepSpeed could not load it (incomplete?); pass --resume with an older checkpoint"
            )
        if universal and int(engine.zero_optimization_stage()) == 3:
            elastic.repair_stage3_optimizer(engine.optimizer, weight_decays)
        loader_states = []
        for name in sorted(os.listdir(folder)):
            if name.startswith("loader-rank"):
                with open(os.path.join(folder, name)) as handle:
                    loader_states.append(json.load(handle))
        rng_file = os.path.join(folder, f"rng-rank{self.placement.rank}.pt")
        if os.path.exists(rng_file) and trainer.get("world_size") == self.placement.world_size:
            set_rng_state(load_trusted(rng_file))
        average_file = os.path.join(folder, WEIGHT_AVERAGE_FILE)
        weight_average = load_file(average_file) if os.path.exists(average_file) else None
        if not self.local:  # the downloaded copy, once every rank of the node has read it
            dist.barrier()
            if self.placement.local_rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
        return Restored(trainer["step"], trainer, loader_states, weight_average)

    def _convert(self, folder: str, out: str, saved_world_size: int | None) -> None:
        """The universal copy, made by one process per copy of the checkpoint while the others wait."""
        converter = self.keeps_folder
        error = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-convert") as pool:
            conversion = pool.submit(elastic.universal_copy, folder, out) if converter else None
            distributed.wait_for(lambda: conversion is None or conversion.done())
        if conversion is not None and conversion.exception() is not None:
            failure = conversion.exception()
            error = str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {failure}"
        elif conversion is not None and self.placement.is_main:
            seconds = conversion.result()
            done = "reused" if seconds is None else f"converted in {seconds:.1f} s"
            print(
                f"{self.url}/{os.path.basename(out)}: saved on {saved_world_size} ranks, resumed on "
                f"{self.placement.world_size}: universal copy {out} {done}",
                flush=True,
            )
        if not distributed.all_true(error is None):
            raise CheckpointError(
                f"{self.url}/{os.path.basename(out)}: cannot convert it for {self.placement.world_size} ranks "
                f"({error or 'on another node'}); resume on {saved_world_size} ranks"
            )

    def _local_copy(self, tag: str, everything: bool) -> str:
        """The folder of `tag` on this node: the checkpoint itself when local; else the files this rank reads,
        downloaded into the node's staging folder (each node's first rank: the shared ones, or with `everything`
        all of them, for a conversion)."""
        folder = os.path.join(self.staging, tag)
        if self.local:
            return folder
        first_of_node = self.placement.local_rank == 0
        if first_of_node:  # what a crash left of an earlier download or upload of this step
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        dist.barrier()
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(join(self.fs, self.root, tag))]

        def reads(name: str) -> bool:
            if first_of_node and (everything or owner(name) is None or name.startswith("loader-rank")):
                return True
            return not everything and owner(name) == self.placement.rank

        def download(name: str) -> None:
            tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
            self.fs.get_file(join(self.fs, self.root, tag, name), tmp)
            os.replace(tmp, os.path.join(folder, name))  # another node sharing this folder may fetch it too

        with ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="checkpoint-download") as pool:
            downloads = [pool.submit(download, name) for name in names if reads(name)]
            distributed.wait_for(lambda: all(future.done() for future in downloads))
        # any storage failure: reported in one line on every rank
        failures = [future.exception() for future in downloads if future.exception() is not None]
        error = f"{type(failures[0]).__name__}: {failures[0]}" if failures else None
        if not distributed.all_true(error is None):
            raise CheckpointError(
                f"{self.url}/{tag}: download failed ({error or 'on another rank'}); check the store and resume"
            )
        return folder
