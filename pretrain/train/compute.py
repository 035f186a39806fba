"""What a training step costs: the FLOPs of one training image and the step time at a given utilisation.

The trainer logs its MFU and the predicted step time with these; `vit-plan` (pretrain/plan/planner.py) plans with the
same functions, so a plan can be checked against the first minutes of a real run.
"""

from __future__ import annotations

import torch

from pretrain.config.schema import Config, MaskedPatchObjective
from pretrain.model import flops_per_image
from pretrain.objectives.masked_patch import head_flops_per_image


def forward_flops_per_image(config: Config) -> float:
    """The analytic forward FLOPs for one training image at the configured resolution: the model's, and for masked
    patch prediction its prediction head's."""
    with torch.device("meta"):
        model = config.model.build()
    flops = flops_per_image(model, config.model.image_size)
    if isinstance(config.objective, MaskedPatchObjective):
        patch_size = config.model.resolved_patch_size
        num_patches = (config.model.image_size // patch_size) ** 2
        flops += head_flops_per_image(config.objective, num_patches, model.width, patch_size)
    return flops


def checkpointed_blocks(config: Config) -> int:
    """How many transformer blocks recompute their activations in the backward pass."""
    every = config.deepspeed.checkpoint_every
    return -(-config.model.description().depth // every) if every else 0  # blocks 0, every, 2 * every, ...


def passes_per_image(config: Config) -> float:
    """Forward-pass equivalents of a training image: forward and a backward of twice its cost, plus the share of the
    forward that activation checkpointing repeats (counted as the checkpointed blocks' share of all blocks)."""
    return 3 + checkpointed_blocks(config) / config.model.description().depth


def training_flops_per_image(config: Config) -> float:
    """FLOPs one training image costs as configured."""
    return passes_per_image(config) * forward_flops_per_image(config)


def step_seconds(flops_per_image_trained: float, batch_size: int, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Seconds per optimizer step when `gpus` devices sustain `mfu` of their peak."""
    return batch_size * flops_per_image_trained / (gpus * peak_tflops * 1e12 * mfu)
