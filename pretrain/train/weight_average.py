"""Polyak averaging: an exponential moving average of the weights, the paper's fine-tuning evaluation weights.

The average is kept in fp32 whatever the training precision (a bf16 average could not move by less than its
rounding step, about 0.4% of a weight, so a decay of 0.9999 would freeze it). It covers whatever tensors it is given:
the whole model under ZeRO 0-2, or under ZeRO-3 the partition this rank holds (gathered whole only to be saved).
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


# -- ZeRO-3: each rank averages its partition ------------------------------------------------------------------------


def zero3_targets(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a ZeRO-3 rank averages: its partition of each parameter, which the optimizer updates and DeepSpeed
    gathers the parameter from (before each use, or after each step for the small ones it keeps whole on every rank:
    `regather_persistent` after swapping the average in or out)."""
    return {name: p.ds_tensor for name, p in module.named_parameters()}


def regather_persistent(module: torch.nn.Module) -> None:
    """Refresh the parameters DeepSpeed keeps whole on every rank (`ds_persist`) from their partitions, as it does
    after each optimizer step: their forward reads the whole tensor, not the partition."""
    persistent = [p for p in module.parameters() if p.ds_persist]
    if persistent:
        persistent[0].all_gather(persistent)


def gather_zero3(average: WeightAverage, module: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The whole average (on the main rank, on the CPU; None elsewhere), one parameter at a time: every rank takes
    part."""
    whole = {}
    for name, p in module.named_parameters():
        mine = average.average[name]
        parts = torch.empty(mine.numel() * torch.distributed.get_world_size(), dtype=mine.dtype, device=mine.device)
        torch.distributed.all_gather_into_tensor(parts, mine)
        if is_main:  # partitions are contiguous; the last is padded
            whole[name] = parts[: p.ds_numel].view(p.ds_shape).cpu()
    return whole if is_main else None


def partition_zero3(whole: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's partitions of a whole average (saved by `gather_zero3` on any number of ranks)."""
    rank = torch.distributed.get_rank()
    mine = {}
    for name, p in module.named_parameters():
        size = p.ds_tensor.ds_numel
        part = torch.zeros(size, dtype=torch.float32)
        flat = whole[name].flatten()[rank * size : (rank + 1) * size]
        part[: flat.numel()] = flat
        mine[name] = part
    return mine
