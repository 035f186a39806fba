"""Polyak averaging: an exponential moving average of the weights, the paper's fine-tuning evaluation weights.

The average is kept in fp32 whatever the training precision (a bf16 average could not move by less than its
rounding step, about 0.4% of a weight, so a decay of 0.9999 would freeze it). It covers whatever tensors it is given:
the whole model, or under ZeRO-3 the partition this rank holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class WeightAverage:
    """average <- decay * average + (1 - decay) * weights, every `every_steps` optimizer steps from `start_step`;
    before `start_step` it follows the weights (an average of the first, random, weights helps nobody)."""

    def __init__(self, weights: dict[str, torch.Tensor], decay: float, start_step: int = 0, every_steps: int = 1):
        self.decay, self.start_step, self.every_steps = decay, start_step, every_steps
        self.average = {name: tensor.detach().float().clone() for name, tensor in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor], step: int) -> None:
        """After optimizer step `step` (counted from 1)."""
        names = list(self.average)
        averages = [self.average[name] for name in names]
        current = [weights[name].detach().float() for name in names]
        if step <= self.start_step:
            torch._foreach_copy_(averages, current)
        elif (step - self.start_step) % self.every_steps == 0:
            torch._foreach_lerp_(averages, current, 1.0 - self.decay)  # one kernel per group, no device sync

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.average.keys():
            missing = sorted(self.average.keys() - state.keys())[:3]
            raise ValueError(f"the saved average does not cover the model's weights (e.g. {missing})")
        for name, tensor in state.items():
            self.average[name].copy_(tensor)

    @contextlib.contextmanager
    def swapped_into(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """The average in place of `weights` (to evaluate or save it), the weights restored afterwards."""
        kept = {name: tensor.detach().clone() for name, tensor in weights.items()}
        with torch.no_grad():
            for name, tensor in weights.items():
                tensor.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in weights.items():
                    tensor.copy_(kept[name])
