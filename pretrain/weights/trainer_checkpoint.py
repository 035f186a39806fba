"""Weights out of a trainer checkpoint.

A checkpoint is a folder written by `CheckpointStore` (local or on object storage): its root with a `latest`
pointer, or one `step-XXXXXXXX` folder inside it. Its weights are consolidated into one fp32 state dict by
DeepSpeed's own `zero_to_fp32` (any ZeRO stage, any number of ranks), whose every load goes through
pretrain/weights/safe_load.py, so a tampered checkpoint cannot run code. What the weights are is read from the
step folder's `model.json` (pretrain/weights/model_weights.py), never from the run config, except for checkpoints
written before model.json existed.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import safetensors.torch
import torch
from deepspeed.utils import zero_to_fp32

from data_pipeline.storage import filesystem, is_local, join
from pretrain.config import ConfigError, validate
from pretrain.model.description import ModelDescription
from pretrain.train.checkpoint import LATEST, PREFIX, TRAINER_FILE, WEIGHT_AVERAGE_FILE, read_latest
from pretrain.weights.model_weights import (
    MODEL_FILE,
    Weights,
    WeightsError,
    encoder_prefix,
    parse_model_file,
    vit_weights,
)
from pretrain.weights.safe_load import load_trusted, weights_only_loads

MODEL_STATES = "mp_rank_00_model_states.pt"


def _locate(url: str, storage_options: dict[str, Any]) -> tuple[Any, str, str]:
    """(filesystem, checkpoint root, tag) for a checkpoint root (newest complete checkpoint) or a step folder."""
    fs, path = filesystem(url.rstrip("/"), storage_options)
    name = path.rsplit("/", 1)[-1]
    if name.startswith(PREFIX):
        root, tag = path.rsplit("/", 1)[0], name
    else:
        if not fs.exists(path):
            raise WeightsError(f"{url}: no such file or folder; pass a checkpoint folder written by the trainer")
        root, tag = path, read_latest(fs, path)
        if tag is None:
            raise WeightsError(
                f"{url}: not a checkpoint (no {LATEST} file); pass a checkpoint folder written by the "
                f"trainer, one of its {PREFIX}XXXXXXXX folders, or a native weights folder"
            )
    if not fs.exists(join(fs, root, tag, TRAINER_FILE)):
        raise WeightsError(f"{url}: {tag} has no {TRAINER_FILE}; it is incomplete or not written by this trainer")
    return fs, root, tag


def read_checkpoint(url: str, storage_options: dict[str, Any] | None = None, weights: str | None = None) -> Weights:
    """The trained ViT of the checkpoint at `url` (a masked-patch model's encoder), as its model.json describes it;
    a checkpoint written before model.json existed is described by the run config saved in its trainer.json.
    `weights`: "ema" (optimizer.ema's average), "raw" (the last weights), or None for the average if it has one."""
    fs, root, tag = _locate(url, storage_options or {})
    state = _state_of(fs, root, tag, url)
    average_file = join(fs, root, tag, WEIGHT_AVERAGE_FILE)
    if weights == "ema" and not fs.exists(average_file):
        raise WeightsError(f"{url}: {tag} has no weight average (trained without optimizer.ema); pass --weights raw")
    if weights != "raw" and fs.exists(average_file):
        state |= safetensors.torch.load(fs.cat_file(average_file))  # parameters; buffers stay the module's
    model, prefix = _description(fs, root, tag, url)
    return vit_weights(model, state, prefix)


def read_encoder_prefix(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Where the ViT is in the module the run at `url` trained: "encoder." for masked patch prediction, which
    trains neither the class token nor a representation layer, "" for a classifier (see model_weights.py)."""
    return _description(*_locate(url, storage_options or {}), url)[1]


def _description(fs: Any, root: str, tag: str, url: str) -> tuple[ModelDescription, str]:
    folder = join(fs, root, tag)
    if fs.exists(join(fs, folder, MODEL_FILE)):
        return parse_model_file(_read_json(fs, join(fs, folder, MODEL_FILE), url), f"{url}/{tag}")
    return _described_by_run_config(_read_json(fs, join(fs, folder, TRAINER_FILE), url), url)


def pinned_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The step folder `url` means now: itself, or a checkpoint root's newest. Reading weights and trainer.json from
    it describes one checkpoint even if training moves `latest` meanwhile."""
    tag = _locate(url, storage_options or {})[2]
    return url if url.rstrip("/").rsplit("/", 1)[-1] == tag else f"{url.rstrip('/')}/{tag}"


def read_trainer_record(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer.json of the checkpoint at `url` (its newest, for a checkpoint root)."""
    fs, root, tag = _locate(url, storage_options or {})
    return _read_json(fs, join(fs, root, tag, TRAINER_FILE), url)


def _read_json(fs: Any, path: str, url: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        name = path.rsplit("/", 1)[-1]
        raise WeightsError(f"{url}: {name} is not JSON ({error}); is the checkpoint damaged?") from None


def _described_by_run_config(trainer: Any, url: str) -> tuple[ModelDescription, str]:
    """How a checkpoint written before model.json is read: through the run config it saved."""
    try:
        config = validate(trainer["config"])
    except (ConfigError, KeyError, TypeError) as error:
        raise WeightsError(
            f"{url}: a checkpoint without {MODEL_FILE} whose saved run config no longer validates "
            f"({str(error).splitlines()[0]}); convert it with the version that wrote it"
        ) from None
    return config.model.description(), encoder_prefix(config)


def read_state(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The consolidated fp32 state dict of the whole module a run trained (what `model.init_from` loads by name)."""
    return _state_of(*_locate(url, storage_options or {}), url)


def _state_of(fs: Any, root: str, tag: str, url: str) -> dict[str, torch.Tensor]:
    """The consolidated state of the step folder `tag` (resolved once by the caller: `latest` may move meanwhile)."""
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as staging:
        if is_local(fs):
            local_root = root
        else:  # the model and optimizer partitions only; loader and RNG states are not needed here
            local_root = staging
            for remote in fs.ls(join(fs, root, tag), detail=False):
                name = remote.rsplit("/", 1)[-1]
                if name.endswith(".pt") and not name.startswith("rng-"):
                    fs.get_file(remote, os.path.join(staging, tag, name))
        return _consolidate(local_root, tag, url)


def _consolidate(root: str, tag: str, url: str) -> dict[str, torch.Tensor]:
    folder = os.path.join(root, tag)
    partitioned = any("optim_states" in name for name in os.listdir(folder))
    # no_grad: the fp32 partitions are saved as parameters (requires_grad), so without it the merged tensors' autograd
    # graph keeps every memory-mapped partition alive: one more fp32 copy of the model resident while converting.
    with weights_only_loads(), torch.no_grad():
        if partitioned:
            try:
                return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
            except (FileNotFoundError, ValueError) as error:
                raise WeightsError(f"{url}/{tag}: incomplete checkpoint ({error})") from None
    # ZeRO stage 0 in fp32 keeps no optimizer partitions: the module states are the weights
    path = os.path.join(folder, MODEL_STATES)
    if not os.path.exists(path):
        raise WeightsError(f"{url}/{tag}: no {MODEL_STATES}; the checkpoint is incomplete")
    module = load_trusted(path)["module"]
    return {name: tensor.float() for name, tensor in module.items()}
