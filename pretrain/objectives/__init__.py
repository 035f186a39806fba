"""Training objectives. Each is a task object the trainer drives the same way: `labels` (does the loader deliver
them), `wrap(model)` (the module DeepSpeed trains), `check_shards`, `loss` and `eval_sums`; and what its head costs
per image after the encoder (`head_outputs_per_image`, `head_flops_per_image`), for the FLOP count and the planner's
memory model."""

from __future__ import annotations

from torch import nn

from pretrain.config.schema import Config, SupervisedObjective
from pretrain.objectives.masked_patch import MaskedPatchTask
from pretrain.objectives.supervised import ObjectiveError, SupervisedTask

Task = SupervisedTask | MaskedPatchTask


def build_task(config: Config) -> Task:
    if isinstance(config.objective, SupervisedObjective):
        return SupervisedTask(config.objective, config.model.num_classes)
    return MaskedPatchTask(config.objective, config.model.resolved_patch_size)


def build_model(config: Config) -> nn.Module:
    """The module a run trains: the configured ViT, wrapped as its objective needs (e.g. a [mask] token and head).

    Call it under `deepspeed.zero.Init` for ZeRO-3. Its state dict is what a consolidated checkpoint holds.
    """
    return build_task(config).wrap(config.model.build())


__all__ = ["MaskedPatchTask", "ObjectiveError", "SupervisedTask", "Task", "build_model", "build_task"]
