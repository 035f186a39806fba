"""Trained weights out of a trainer checkpoint, and into a model that starts from them.

A checkpoint is a folder written by `CheckpointStore` (local or on object storage): its root with a `latest`
pointer, or one `step-XXXXXXXX` folder inside it. Its weights are consolidated into one fp32 state dict by
DeepSpeed's own `zero_to_fp32` (any ZeRO stage, any number of ranks). That utility unpickles with
`torch.load(weights_only=False)`; here every load it makes is forced to `weights_only=True`, allowing only the three
DeepSpeed classes its files hold, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import zero_to_fp32
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from data_pipeline.storage import filesystem, is_local, join
from pretrain.checkpoint import LATEST, PREFIX
from pretrain.config import Config, validate
from pretrain.model.pos_embed import resize_pos_embed

log = logging.getLogger(__name__)

DEEPSPEED_CHECKPOINT_TYPES = [LossScaler, ZeroStageEnum, fragment_address]
"""The only non-tensor classes DeepSpeed's model and optimizer state files contain (DeepSpeed 0.19)."""
MODEL_STATES = "mp_rank_00_model_states.pt"


class WeightsError(Exception):
    """A checkpoint cannot be read; the message names it and says what to pass instead."""


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    load = torch.load

    def restricted(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_TYPES):
            return load(*args, **kwargs)

    zero_to_fp32.torch.load = restricted
    try:
        yield
    finally:
        zero_to_fp32.torch.load = load


def _locate(url: str, storage_options: dict[str, Any]) -> tuple[Any, str, str]:
    """(filesystem, checkpoint root, tag) for a checkpoint root (newest complete checkpoint) or a step folder."""
    fs, path = filesystem(url.rstrip("/"), storage_options)
    name = path.rsplit("/", 1)[-1]
    if name.startswith(PREFIX):
        root, tag = path.rsplit("/", 1)[0], name
    else:
        root = path
        try:
            tag = fs.cat_file(join(fs, root, LATEST)).decode().strip()
        except FileNotFoundError:
            raise WeightsError(f"{url}: not a checkpoint (no {LATEST} file); pass a checkpoint folder written by the "
                               f"trainer, one of its {PREFIX}XXXXXXXX folders, or a native weights folder") from None
    if not fs.exists(join(fs, root, tag, "trainer.json")):
        raise WeightsError(f"{url}: {tag} has no trainer.json; it is incomplete or not written by this trainer")
    return fs, root, tag


def read_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """The run config and the consolidated fp32 state dict of the checkpoint at `url`."""
    fs, root, tag = _locate(url, storage_options or {})
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as staging:
        if is_local(fs):
            local_root = root
        else:  # the model and optimizer partitions only; loader and RNG states are not needed here
            local_root = staging
            for remote in fs.ls(join(fs, root, tag), detail=False):
                name = remote.rsplit("/", 1)[-1]
                if (name.endswith(".pt") and not name.startswith("rng-")) or name == "trainer.json":
                    fs.get_file(remote, os.path.join(staging, tag, name))
        with open(os.path.join(local_root, tag, "trainer.json")) as handle:
            config = validate(json.load(handle)["config"])
        state = _consolidate(local_root, tag, url)
    return config, state


NATIVE_CONFIG = "vit.json"
"""Beside model.safetensors, marks a folder of native weights (written by `python -m pretrain.convert --to native`)."""


def read_state(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a trainer checkpoint or of a native weights folder (what `model.init_from` takes)."""
    from safetensors.torch import load as load_safetensors

    fs, path = filesystem(url.rstrip("/"), storage_options or {})
    if fs.exists(join(fs, path, NATIVE_CONFIG)):
        return load_safetensors(fs.cat_file(join(fs, path, "model.safetensors")))
    return read_checkpoint(url, storage_options)[1]


def _consolidate(root: str, tag: str, url: str) -> dict[str, torch.Tensor]:
    folder = os.path.join(root, tag)
    partitioned = any("optim_states" in name for name in os.listdir(folder))
    # no_grad: the fp32 partitions are saved as parameters (requires_grad), so without it the merged tensors' autograd
    # graph keeps every memory-mapped partition alive: one more fp32 copy of the model resident while converting.
    with _weights_only_loads(), torch.no_grad():
        if partitioned:
            try:
                return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
            except (FileNotFoundError, ValueError) as error:
                raise WeightsError(f"{url}/{tag}: incomplete checkpoint ({error})") from None
    # ZeRO stage 0 in fp32 keeps no optimizer partitions: the module states are the weights
    path = os.path.join(folder, MODEL_STATES)
    if not os.path.exists(path):
        raise WeightsError(f"{url}/{tag}: no {MODEL_STATES}; the checkpoint is incomplete")
    with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_TYPES):
        module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return {name: tensor.float() for name, tensor in module.items()}


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state` into `model` by name (after dropping or adding an `encoder.` prefix where the names differ that
    way); parameters the state lacks, and a classifier of another shape, keep their initialisation. A learned
    position table of another grid is resized to the model's (2-D bicubic, class token kept), so a run can start at
    another resolution. Any other tensor of another shape means another variant: an error. Works on a model built
    under ZeRO-3 (each parameter is gathered, written by rank 0's copy and re-partitioned). Returns the names not
    loaded.
    """
    names = dict(model.named_parameters())
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in names and name.startswith("encoder.") and name.removeprefix("encoder.") in names:
            name = name.removeprefix("encoder.")
        elif name not in names and f"encoder.{name}" in names:
            name = f"encoder.{name}"
        renamed[name] = tensor
    prefix_tokens = 1 if {"cls_token", "encoder.cls_token"} & names.keys() else 0
    not_loaded, mismatched = [], []
    for name, parameter in names.items():
        tensor = renamed.get(name)
        shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
        if tensor is not None and tuple(tensor.shape) != shape and name.endswith("pos_embed"):
            tensor = _resized_positions(tensor, shape, prefix_tokens, source)
        if tensor is None or tuple(tensor.shape) != shape:
            not_loaded.append(name)
            if tensor is not None and not name.rsplit(".", 1)[0].endswith("head"):  # classifiers may differ
                mismatched.append(f"{name} is {tuple(tensor.shape)}, the model's {shape}")
            continue
        with GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            parameter.copy_(tensor.to(parameter.dtype))
    if len(not_loaded) == len(names):
        raise WeightsError(f"{source}: no tensor matches the model; is it a checkpoint of the same variant?")
    if mismatched:
        raise WeightsError(f"{source}: another variant than this run's model ({'; '.join(mismatched[:2])}); "
                           "set model.variant (and width, depth, ...) to those of the checkpoint")
    if not_loaded:
        log.info("%s: kept the initial values of %s", source, ", ".join(not_loaded))
    return not_loaded


def _resized_positions(table: torch.Tensor, shape: tuple[int, ...], prefix_tokens: int,
                       source: str) -> torch.Tensor:
    """A learned position table resized to the model's square grid; unchanged (so reported as another variant) when
    the widths differ or either table is not a square grid after the class token."""
    old, new = (math.isqrt(n - prefix_tokens) for n in (table.shape[1], shape[1]))
    if table.shape[-1] != shape[-1] or old**2 != table.shape[1] - prefix_tokens or new**2 != shape[1] - prefix_tokens:
        return table
    log.info("%s: position embeddings resized from a %dx%d to a %dx%d grid", source, old, old, new, new)
    return resize_pos_embed(table, (new, new), (old, old), prefix_tokens)
