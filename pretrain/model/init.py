"""Layers that initialise themselves as the original JAX ViT code does.

Initialisation happens inside each leaf layer's own constructor, never in a parent afterwards:
`deepspeed.zero.Init` partitions a module's parameters as soon as that module's constructor returns, so a parent
that re-initialised `self.fc.weight` after building `self.fc` would write into an empty partition.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

# Standard deviation of a unit normal truncated to [-2, 2]; JAX's truncated-normal variance scaling divides by it so
# that the truncated distribution has the requested variance.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


@torch.no_grad()
def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated normal with variance 1 / fan_in (flax's default kernel init)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


@torch.no_grad()
def xavier_uniform_fused_(weight: torch.Tensor, num_fused: int) -> torch.Tensor:
    """Xavier-uniform for `num_fused` kernels stacked along the output dim (the fused q, k, v projection).

    JAX keeps q, k and v as separate kernels, so each gets the bound of a (dim_in, dim_out / num_fused) matrix.
    """
    fan_out, fan_in = weight.shape[0] // num_fused, weight.shape[1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(weight, -bound, bound)


class Dense(nn.Linear):
    """A linear layer with the kernel and bias initialisers of the JAX code.

    kernel: "xavier" (transformer dense layers; `fused` kernels stacked along the output), "lecun" (flax's default,
    the representation layer) or "zeros" (the classifier). The bias is normal(bias_std) when bias_std > 0, otherwise
    the constant bias_value.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel: Literal["xavier", "lecun", "zeros"] = "xavier",
        fused: int = 1,
        bias_std: float = 0.0,
        bias_value: float = 0.0,
    ):
        super().__init__(in_features, out_features)
        with torch.no_grad():
            if kernel == "xavier":
                xavier_uniform_fused_(self.weight, fused)
            elif kernel == "lecun":
                lecun_normal_(self.weight)
            else:
                self.weight.zero_()
            if bias_std > 0:
                self.bias.normal_(std=bias_std)
            else:
                self.bias.fill_(bias_value)


class PatchConv(nn.Conv2d):
    """A non-overlapping (kernel = stride) convolution with lecun-normal kernel and zero bias: the patch embedding."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int):
        super().__init__(in_channels, out_channels, kernel_size=patch_size, stride=patch_size)
        lecun_normal_(self.weight)
        with torch.no_grad():
            self.bias.zero_()
