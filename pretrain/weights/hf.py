"""transformers' ViT format: `config.json`, `model.safetensors` and `preprocessor_config.json` for
`transformers.ViTForImageClassification` (and `ViTModel`).

The weights are copied into a model built by the installed transformers and written by its `save_pretrained`,
matched by the model's *structure* (the patch convolution, the class token and position table by shape, per block
the six linear layers and two norms in order), not by parameter names: transformers 5 renamed them
(`encoder.layer.N.attention.attention.query` became `layers.N.attention.q_proj`) and may again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pretrain.model.description import ModelDescription
from pretrain.weights.model_weights import Weights, WeightsError
from pretrain.weights.timm import unsupported


def _of_type(module: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


Slot = tuple[torch.Tensor, str, slice]
"""A transformers parameter, the native tensor it holds, and which rows of it (q, k and v share our fused qkv)."""


def _hf_slots(model: nn.Module, depth: int, width: int) -> list[Slot]:
    """Every parameter of a transformers ViTForImageClassification paired with its native tensor, found by the
    model's structure: the embeddings' convolution and 3-D tensors, per block the linear layers (q, k, v, out, fc1,
    fc2) and norms (before, after) in the order transformers registers them, the final norm, the classifier (if
    any)."""
    rows = slice(None)
    base = model.base_model
    embeddings = base.embeddings
    convolutions = _of_type(embeddings, nn.Conv2d)
    tokens = sorted((p for p in embeddings.parameters(recurse=False) if p.ndim == 3), key=lambda p: p.shape[1])
    block_lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(convolutions) != 1 or len(tokens) != 2 or len(block_lists) != 1:
        raise WeightsError(
            "unsupported transformers ViT layout: expected one patch convolution, a class token, "
            f"a position table and one list of {depth} blocks"
        )
    (conv,), (blocks,) = convolutions, block_lists
    slots: list[Slot] = [
        (conv.weight, "patch_embed.proj.weight", rows),
        (conv.bias, "patch_embed.proj.bias", rows),
        (tokens[0], "cls_token", rows),
        (tokens[1], "pos_embed", rows),
    ]
    for i, block in enumerate(blocks):
        linears, norms = _of_type(block, nn.Linear), _of_type(block, nn.LayerNorm)
        if len(linears) != 6 or len(norms) != 2:
            raise WeightsError(
                f"unsupported transformers ViT layout: block {i} has {len(linears)} linear layers "
                f"and {len(norms)} norms, not 6 and 2"
            )
        for n, layer in enumerate(linears[:3]):  # q, k, v: row blocks of the fused qkv
            part = slice(n * width, (n + 1) * width)
            slots += [
                (layer.weight, f"blocks.{i}.attn.qkv.weight", part),
                (layer.bias, f"blocks.{i}.attn.qkv.bias", part),
            ]
        for layer, ours in zip(
            [*linears[3:], *norms], ["attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"], strict=True
        ):
            slots += [(layer.weight, f"blocks.{i}.{ours}.weight", rows), (layer.bias, f"blocks.{i}.{ours}.bias", rows)]
    in_blocks = {id(m) for m in blocks.modules()}
    (final_norm,) = [m for m in _of_type(base, nn.LayerNorm) if id(m) not in in_blocks]
    in_base = {id(m) for m in base.modules()}
    slots += [(final_norm.weight, "norm.weight", rows), (final_norm.bias, "norm.bias", rows)]
    for classifier in [m for m in _of_type(model, nn.Linear) if id(m) not in in_base]:  # none when num_labels is 0
        slots += [(classifier.weight, "head.weight", rows), (classifier.bias, "head.bias", rows)]
    return slots


def to_hf(weights: Weights) -> nn.Module:
    """A `transformers.ViTForImageClassification` holding the weights (fp32, eval mode)."""
    from transformers import ViTConfig, ViTForImageClassification

    if problem := unsupported(weights, "hf"):
        raise WeightsError(problem)
    ours, state = weights.model, weights.state
    config = ViTConfig(
        hidden_size=ours.width,
        num_hidden_layers=ours.depth,
        num_attention_heads=ours.num_heads,
        intermediate_size=ours.mlp_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=ours.image_size,
        patch_size=ours.patch_size,
        num_channels=3,
        qkv_bias=True,
        num_labels=ours.num_classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTForImageClassification(config).eval()
    slots = _hf_slots(model, ours.depth, ours.width)
    with torch.no_grad():
        for parameter, name, rows in tqdm(slots, desc="copying into transformers' ViT", unit="tensor", leave=False):
            source = state[name][rows]
            if parameter.shape != source.shape:
                raise WeightsError(
                    f"{name}: transformers expects {tuple(parameter.shape)}, the weights have "
                    f"{tuple(source.shape)}; unsupported transformers ViT layout"
                )
            parameter.copy_(source)
    return model


def from_hf(folder: str) -> Weights:
    """Native weights from a transformers ViT classification folder (`save_pretrained` output)."""
    from transformers import AutoConfig, ViTForImageClassification

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise WeightsError(f"{folder}: not a transformers model folder ({error})") from None
    problems = [
        f"{name} is {value!r}"
        for name, value, wanted in (
            ("model_type", config.model_type, "vit"),
            ("hidden_act", getattr(config, "hidden_act", None), "gelu"),
            ("qkv_bias", getattr(config, "qkv_bias", None), True),
            ("num_channels", getattr(config, "num_channels", 3), 3),
        )
        if value != wanted
    ]
    if problems:
        raise WeightsError(
            f"{folder}: unsupported transformers config ({', '.join(problems)}); a ViT with GELU, "
            "qkv biases and RGB input is needed"
        )
    model = ViTForImageClassification.from_pretrained(folder)
    ours = ModelDescription(
        width=config.hidden_size,
        depth=config.num_hidden_layers,
        mlp_dim=config.intermediate_size,
        num_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        image_size=config.image_size,
        num_classes=config.num_labels,
        pool="token",
        pos_embed="learned",
        representation_size=None,
        stem_stages=None,
    )
    state: dict[str, torch.Tensor] = {}
    for parameter, name, rows in _hf_slots(model, config.num_hidden_layers, config.hidden_size):
        if rows == slice(None):
            state[name] = parameter.detach().clone()
        else:  # q, k and v arrive in order: concatenate them into the fused qkv
            state[name] = torch.cat([state[name], parameter.detach()]) if rows.start else parameter.detach().clone()
    return Weights(ours, state)


def write_preprocessor(out: Path, image_size: int) -> None:
    """transformers' image processor for our preprocessing: pixels / 127.5 - 1 (mean 0.5, std 0.5 on [0, 1]),
    bicubic resize to the model's resolution."""
    from transformers import ViTImageProcessor

    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
    ).save_pretrained(out)


def write_hf(weights: Weights, out: Path) -> None:
    to_hf(weights).save_pretrained(out)
    write_preprocessor(out, weights.model.image_size)
