"""Analytic forward FLOPs of a ViT, for MFU and for planning runs.

Counts the multiply-adds of convolutions and matrix products (one multiply-add = 2 FLOPs), including the two
attention matmuls; normalisation, activations and softmax are left out, as in the usual MFU accounting. A training
step costs about 3x the forward pass (4x with activation checkpointing).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.model.factory import create_model
from pretrain.model.resnet import Bottleneck, Downsample, ResNetStem
from pretrain.model.vit import HybridEmbed, VisionTransformer


def _conv_flops(conv: nn.Conv2d, out_hw: tuple[int, int]) -> int:
    kernel = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
    return 2 * out_hw[0] * out_hw[1] * conv.out_channels * kernel


def _strided(hw: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)  # "SAME" padding


def _resnet_flops(backbone: ResNetStem, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """FLOPs of the hybrid's ResNet stem and the size of its feature map."""
    hw = _strided(hw, backbone.stem.conv.stride[0])
    flops = _conv_flops(backbone.stem.conv, hw)
    hw = _strided(hw, 2)  # max-pool
    for unit in backbone.modules():
        if not isinstance(unit, Bottleneck):
            continue
        out_hw = _strided(hw, unit.conv2.stride[0])
        flops += _conv_flops(unit.conv1, hw) + _conv_flops(unit.conv2, out_hw) + _conv_flops(unit.conv3, out_hw)
        if isinstance(unit.downsample, Downsample):
            flops += _conv_flops(unit.downsample.conv, out_hw)
        hw = out_hw
    return flops, hw


def _embedding_flops(model: VisionTransformer, image_size: int) -> int:
    grid = (image_size // model.patch_size, image_size // model.patch_size)
    if isinstance(model.patch_embed, HybridEmbed):
        flops, feature_hw = _resnet_flops(model.patch_embed.backbone, (image_size, image_size))
        return flops + _conv_flops(model.patch_embed.proj, feature_hw)
    return _conv_flops(model.patch_embed.proj, grid)


def _block_flops(tokens: int, width: int, mlp_dim: int) -> int:
    projections = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp_dim)  # qkv, out, fc1, fc2
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and attention @ v, summed over heads
    return projections + attention


def classifier_flops(model: VisionTransformer) -> int:
    """Forward FLOPs of the representation layer and the classifier, for one image."""
    flops = 0
    for layer in (getattr(model.pre_logits, "fc", None), model.head):
        if isinstance(layer, nn.Linear):
            flops += 2 * layer.in_features * layer.out_features
    return flops


def flops_per_image(model_or_variant: VisionTransformer | str, image_size: int, classifier: bool = True) -> float:
    """Forward FLOPs for one image at `image_size` pixels (square).

    A variant name is counted with its default head (1000 classes, no representation layer). `classifier=False`
    leaves out the representation layer and the classifier, for a count that adds the head the training objective
    runs instead (`pretrain.train.compute.forward_flops_per_image`).
    """
    if isinstance(model_or_variant, str):
        with torch.device("meta"):
            model = create_model(model_or_variant, image_size=image_size)
    else:
        model = model_or_variant
    first = model.blocks[0]
    width, mlp_dim = first.mlp.fc1.in_features, first.mlp.fc1.out_features
    tokens = (image_size // model.patch_size) ** 2 + model.num_prefix_tokens
    return float(
        _embedding_flops(model, image_size)
        + len(model.blocks) * _block_flops(tokens, width, mlp_dim)
        + (classifier_flops(model) if classifier else 0)
    )
