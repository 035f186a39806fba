"""timm's ViT format: `model.safetensors` (our parameter names are timm's) and a timm `config.json`, loadable with
`timm.create_model("local-dir:DIR", pretrained=True)`, strict; a hybrid on ResNet-50 stages becomes timm's
`vit_base_r50_s16_224` family. timm is not a run-time dependency: only its file layout is written and read here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pretrain.model.description import ModelDescription
from pretrain.model.variants import TIMM_NAMES, parse_variant, stem_stride
from pretrain.weights.model_weights import Weights, WeightsError

_TIMM_VARIANTS = {name: parse_variant(variant) for name, variant in TIMM_NAMES.items()}
TIMM_ARCHITECTURES = {
    (spec.size.width, spec.patch_size): name for name, spec in _TIMM_VARIANTS.items() if spec.stem_stages is None
}
"""timm's registered ViTs by (width, patch size). Any other size is written as vit_base_patch16_224 with its own
model_args, which timm applies over the architecture's defaults (timm is not a run-time dependency here)."""


TIMM_HYBRID = next(name for name, spec in _TIMM_VARIANTS.items() if spec.stem_stages)
TIMM_HYBRID_STAGES = _TIMM_VARIANTS[TIMM_HYBRID].stem_stages
"""timm's hybrid: ResNet-50's first three stages under a ViT (model_args set the ViT's size)."""

STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
"""Attention heads of the standard ViT widths (Ti, S, B, L, H, g, G), for timm state dicts without a config."""


def unsupported(weights: Weights, target: str) -> str | None:
    """Why the weights cannot be written for timm or transformers (`target`), or None."""
    model = weights.model
    if model.stem_stages and target == "hf":
        return "transformers' ViT has no ResNet stem; export hybrid models with --to timm"
    if model.stem_stages and tuple(model.stem_stages) != TIMM_HYBRID_STAGES:
        return (
            f"timm's hybrid ViT has the ResNet-50 stages {TIMM_HYBRID_STAGES}, these weights have {model.stem_stages}"
        )
    if model.pos_embed != "learned":
        return f"{target}'s ViT has learned position embeddings only, these are fixed sin-cos"
    if model.representation_size:
        return f"{target}'s ViT has no representation (pre-logits) layer; add --drop-representation"
    if target == "hf" and model.pool != "token":
        return "transformers' ViT classifies from the class token; this model pools by averaging (use --to timm)"
    return None


def to_timm(weights: Weights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """timm's `config.json` (architecture, model_args) and state dict; our parameter names are timm's."""
    if problem := unsupported(weights, "timm"):
        raise WeightsError(problem)
    model = weights.model
    hybrid = bool(model.stem_stages)
    model_args = {
        "img_size": model.image_size,
        "embed_dim": model.width,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_dim / model.width,
        "class_token": model.pool == "token",
        "global_pool": "token" if model.pool == "token" else "avg",
        # our final LayerNorm acts on the tokens before any pooling; timm's default for "avg" normalises after it
        "fc_norm": False,
    }
    if hybrid:  # timm's hybrid puts patch size 1 on the ResNet's feature map itself
        architecture = TIMM_HYBRID
    else:
        model_args["patch_size"] = model.patch_size
        architecture = TIMM_ARCHITECTURES.get((model.width, model.patch_size), "vit_base_patch16_224")
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, model.image_size, model.image_size],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "num_classes": model.num_classes,
        },
    }
    return config, {name: tensor.contiguous() for name, tensor in weights.state.items()}


def write_timm(weights: Weights, out: Path) -> None:
    from safetensors.torch import save_file

    config, state = to_timm(weights)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def from_timm(path: str) -> Weights:
    """Native weights from a timm ViT: a state dict file (.safetensors or .pth), or a folder with model.safetensors
    and timm's config.json (whose model_args give the number of heads; otherwise the paper's table does)."""
    location = Path(path)
    file = location / "model.safetensors" if location.is_dir() else location
    if not file.is_file():
        raise WeightsError(f"{path}: no such file; pass a timm state dict (.safetensors or .pth) or its folder")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
    except Exception as error:  # whatever the unpickler or safetensors say about a file that is not a state dict
        reason = " ".join(str(error).split())[:200]
        raise WeightsError(f"{path}: not a readable state dict ({type(error).__name__}: {reason})") from None
    config_file = file.parent / "config.json"
    model_args = json.loads(config_file.read_text()).get("model_args", {}) if config_file.is_file() else {}
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise WeightsError(f"{path}: not a timm ViT state dict (no pos_embed / patch_embed.proj.weight)")
    native = {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    # a hybrid's ResNet (timm's ResNetV2 under patch_embed.backbone) has our module names
    foreign = sorted(k for k in state if k not in native and not k.startswith(("patch_embed.", "blocks.")))
    if foreign:
        raise WeightsError(
            f"{path}: timm tensors with no equivalent here: {', '.join(foreign[:4])} (e.g. fc_norm "
            "of timm's average pooling, register tokens); unsupported timm ViT"
        )
    width = state["pos_embed"].shape[-1]
    heads = model_args.get("num_heads") or STANDARD_HEADS.get(width)
    if heads is None:
        raise WeightsError(
            f"{path}: width {width} is not a standard ViT size; put timm's config.json (with "
            "model_args.num_heads) beside the weights"
        )
    stem_stages = _resnet_stages(state)
    patch = stem_stride(stem_stages) if stem_stages else state["patch_embed.proj.weight"].shape[-1]
    prefix = 1 if "cls_token" in state else 0
    grid = round((state["pos_embed"].shape[1] - prefix) ** 0.5)
    model = ModelDescription(
        width=width,
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_heads=heads,
        patch_size=patch,
        image_size=grid * patch,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        pool="token" if prefix else "gap",
        pos_embed="learned",
        representation_size=None,
        stem_stages=stem_stages,
    )
    return Weights(model, dict(state))


def _resnet_stages(state: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Units per stage of a hybrid's ResNet, from its `patch_embed.backbone.stages.S.blocks.B.` tensors."""
    units: dict[int, set[int]] = {}
    for name in state:
        if name.startswith("patch_embed.backbone.stages."):
            stage, _, unit = name.split(".")[3:6]
            units.setdefault(int(stage), set()).add(int(unit))
    return tuple(len(units[stage]) for stage in sorted(units)) or None
