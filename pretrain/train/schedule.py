"""The run's length in optimizer steps and its learning-rate schedule.

The schedule is DeepSpeed's own: linear warm-up from 0, then WarmupDecayLR (linear to min_lr; DeepSpeed starts that
warm-up at min_lr, which the recipes here set to 0), WarmupCosineLR (cosine to min_lr), or WarmupLR (constant).
"""

from __future__ import annotations

import math
from typing import Any

from pretrain.config.schema import Config


def total_steps(config: Config, train_samples: int) -> int:
    if config.schedule.steps is not None:
        return config.schedule.steps
    assert config.schedule.epochs is not None
    return max(1, math.ceil(config.schedule.epochs * train_samples / config.data.batch_size))


def scheduler(config: Config, steps: int) -> dict[str, Any]:
    schedule, lr = config.schedule, config.optimizer.lr
    warmup = max(1, min(schedule.warmup_steps, steps - 1))  # DeepSpeed refuses 0 (a 1-step run)
    if schedule.decay == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": schedule.min_lr / lr,
                "warmup_type": "linear",
            },
        }
    if schedule.decay == "linear":
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": warmup,
                "warmup_min_lr": schedule.min_lr,
                "warmup_max_lr": lr,
                "warmup_type": "linear",
            },
        }
    return {
        "type": "WarmupLR",
        "params": {
            "warmup_num_steps": warmup,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": lr,
            "warmup_type": "linear",
        },
    }
