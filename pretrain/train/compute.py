"""What a training step costs: the FLOPs of one training image and the step time at a given utilisation.

The trainer logs its MFU and the predicted step time with these; `vit-plan` (pretrain/plan/planner.py) plans with the
same functions, so a plan can be checked against the first minutes of a real run.
"""

from __future__ import annotations

import torch

from pretrain.config.schema import Config
from pretrain.model import flops_per_image
from pretrain.objectives import build_task


def forward_flops_per_image(config: Config) -> float:
    """The analytic forward FLOPs for one training image at the configured resolution: the encoder's, then the head
    its objective runs (the classifier, or masked patch prediction's head on the corrupted patches)."""
    with torch.device("meta"):
        model = config.model.build()
    encoder = flops_per_image(model, config.model.image_size, classifier=False)
    return encoder + build_task(config).head_flops_per_image(model)


def checkpointed_blocks(config: Config) -> int:
    """How many transformer blocks recompute their activations in the backward pass."""
    every = config.deepspeed.checkpoint_every
    return -(-config.model.description().depth // every) if every else 0  # blocks 0, every, 2 * every, ...


def passes_per_image(config: Config) -> float:
    """Forward-pass equivalents of a training image: forward and a backward of twice its cost, plus the share of the
    forward that activation checkpointing repeats, counted as the checkpointed blocks' share of the whole forward: an
    overcount by that share of what lies outside the blocks (embedding and head; 10% of the total for make
    experiment-mpp's model with its 4x4 head if every block were checkpointed, under 1% at B/16)."""
    return 3 + checkpointed_blocks(config) / config.model.description().depth


def training_flops_per_image(config: Config) -> float:
    """FLOPs one training image costs as configured."""
    return passes_per_image(config) * forward_flops_per_image(config)


def step_seconds(flops_per_image_trained: float, batch_size: int, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Seconds per optimizer step when `gpus` devices sustain `mfu` of their peak."""
    return batch_size * flops_per_image_trained / (gpus * peak_tflops * 1e12 * mfu)
