"""Initialisers of the original JAX ViT code, for PyTorch tensors.

Each module initialises its own parameters at the end of its `__init__`. That order matters under
`deepspeed.zero.Init`, which partitions a module's parameters as soon as that module's constructor returns: a parent
that initialised its children afterwards would write into empty partitions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Standard deviation of a unit normal truncated to [-2, 2]; JAX's truncated-normal variance scaling divides by it so
# that the truncated distribution has the requested variance.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


@torch.no_grad()
def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated normal with variance 1 / fan_in (flax's default kernel init; the paper's patch embedding)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


@torch.no_grad()
def xavier_uniform_fused_(weight: torch.Tensor, num_fused: int) -> torch.Tensor:
    """Xavier-uniform for `num_fused` dense kernels stacked along the output dim (the fused q, k, v projection).

    JAX keeps q, k and v as separate kernels, so each gets the bound of a (dim_in, dim_out / num_fused) matrix.
    """
    fan_out, fan_in = weight.shape[0] // num_fused, weight.shape[1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(weight, -bound, bound)


@torch.no_grad()
def dense_(layer: nn.Linear, bias_std: float = 0.0) -> None:
    """Xavier-uniform kernel; zero bias, or normal(bias_std) (the MLP biases use 1e-6)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        if bias_std > 0:
            nn.init.normal_(layer.bias, std=bias_std)
        else:
            nn.init.zeros_(layer.bias)
