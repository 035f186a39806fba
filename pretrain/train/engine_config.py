"""The DeepSpeed JSON of a run, built from our config, and the optimizer's parameter groups.

How the batch divides over the ranks is pretrain/config/batch.py; the learning-rate schedule is
pretrain/train/schedule.py.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config.batch import batch_sizes
from pretrain.config.schema import Config
from pretrain.train.schedule import scheduler

STAGE3_LEAN = {
    # ZeRO-3 defaults keep up to 1e9 parameters live and prefetch 5e7; for the largest models on small machines
    # these (or tighter) values belong in deepspeed.overrides.
    "stage3_max_live_parameters": 1e8,
    "stage3_prefetch_bucket_size": 2e7,
    # the optimizer steps one sub-group of the partition at a time; its temporaries scale with this
    "sub_group_size": 1e8,
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def deepspeed_config(config: Config, world_size: int, steps: int, monitor_dir: str) -> dict[str, Any]:
    micro, accumulation = batch_sizes(config, world_size)
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero.update(STAGE3_LEAN)
    built: dict[str, Any] = {
        "train_batch_size": config.data.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "scheduler": scheduler(config, steps),
        "steps_per_print": 10**9,  # the trainer prints its own lines
        "wall_clock_breakdown": False,
        "tensorboard": {
            "enabled": "tensorboard" in config.logging.trackers,
            "output_path": monitor_dir,
            "job_name": "tensorboard",
        },
        "csv_monitor": {"enabled": "csv" in config.logging.trackers, "output_path": monitor_dir, "job_name": "csv"},
    }
    if config.optimizer.grad_clip_norm is not None:
        built["gradient_clipping"] = config.optimizer.grad_clip_norm
    return _merge(built, ds.overrides)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices (and conv kernels) only: not on biases, norms, position embeddings or tokens."""
    skip: set[str] = model.no_weight_decay()  # type: ignore[operator]
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
