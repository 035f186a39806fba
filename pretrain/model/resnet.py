"""BiT-style ResNet stem of the hybrid ViT (paper Section 3.1, "Hybrid Architecture").

GroupNorm instead of BatchNorm and weight-standardised convolutions with TensorFlow "SAME" padding, as in the
original JAX code. Module names follow timm's ResNetV2 so that hybrid checkpoints map onto timm key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.init import lecun_normal_


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (N, C, H, W) like TensorFlow's "SAME": output = ceil(input / stride), extra padding at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """Convolution whose kernel is standardised (zero mean, unit variance per output channel) on every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps
        lecun_normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) * torch.rsqrt(var + self.eps)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups) followed by ReLU, or by nothing where the residual sum comes next."""

    def __init__(self, channels: int, act: bool = True, zero_scale: bool = False):
        super().__init__(32, channels, eps=1e-5)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        if zero_scale:  # the last norm of a residual branch starts at zero, so each unit starts as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Stem(nn.Module):
    """7x7 stride-2 root convolution, GroupNorm + ReLU, 3x3 stride-2 max-pool."""

    def __init__(self, in_chans: int, channels: int):
        super().__init__()
        self.conv = StdConv2d(in_chans, channels, 7, stride=2)
        self.norm = GroupNormAct(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, stride=2)


class Downsample(nn.Module):
    """Projection shortcut: 1x1 convolution with the unit's stride, then GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck unit (1x1, 3x3 with the stride, 1x1 at 4x width) with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        mid = out_channels // 4
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        self.conv1 = StdConv2d(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, act=False, zero_scale=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """ResNet-50-style feature extractor with `stages` units per stage; output stride 4 * 2**(len(stages) - 1)."""

    def __init__(self, stages: tuple[int, ...], in_chans: int = 3, stem_channels: int = 64):
        super().__init__()
        self.stem = Stem(in_chans, stem_channels)
        channels = [256 * 2**i for i in range(len(stages))]
        self.stages = nn.Sequential(
            *[
                Stage(stem_channels if i == 0 else channels[i - 1], channels[i], depth, 1 if i == 0 else 2)
                for i, depth in enumerate(stages)
            ]
        )
        self.out_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
