"""`python -m pretrain.convert CHECKPOINT --to {hf,timm} --out DIR`: trained weights for downstream fine-tuning.

The checkpoint (any ZeRO stage, any number of ranks, local or s3://) is consolidated by DeepSpeed's zero_to_fp32
(`pretrain.weights.read_checkpoint`). A masked-patch checkpoint gives its encoder; `--num-classes K` puts a
zero-initialised K-class classifier on it (the paper's fine-tuning head), `--drop-representation` removes the
pre-logits layer as the paper does before fine-tuning.

- `--to hf`: `config.json`, `model.safetensors` and `preprocessor_config.json` for
  `transformers.ViTForImageClassification` (and `ViTModel`). The weights are copied into a model built by the
  installed transformers and written by its `save_pretrained`, matched by the model's *structure* (the patch
  convolution, the class token and position table by shape, per block the six linear layers and two norms in
  order), not by parameter names: transformers 5 renamed them (`encoder.layer.N.attention.attention.query` became
  `layers.N.attention.q_proj`) and may again.
- `--to timm`: `model.safetensors` (our names are timm's) and a timm `config.json`, loadable with
  `timm.create_model("local-dir:DIR", pretrained=True)`, strict.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config.schema import Config, MaskedPatchObjective
from pretrain.model.variants import parse_variant

TIMM_ARCHITECTURES = {
    (192, 16): "vit_tiny_patch16_224", (384, 16): "vit_small_patch16_224", (384, 32): "vit_small_patch32_224",
    (768, 8): "vit_base_patch8_224", (768, 16): "vit_base_patch16_224", (768, 32): "vit_base_patch32_224",
    (1024, 16): "vit_large_patch16_224", (1024, 32): "vit_large_patch32_224", (1280, 14): "vit_huge_patch14_224",
}
"""timm's registered ViTs by (width, patch size). Any other size is written as vit_base_patch16_224 with its own
model_args, which timm applies over the architecture's defaults (timm is not a run-time dependency here)."""


class ConversionError(Exception):
    """The weights cannot be written in the asked format; the message says why and which option helps."""


@dataclass
class Weights:
    """A native VisionTransformer's state dict and the `VisionTransformer` arguments that build it."""

    kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def num_classes(self) -> int:
        return self.kwargs["num_classes"]


def from_checkpoint(config: Config, state: dict[str, torch.Tensor]) -> Weights:
    """The trained ViT of a run: a masked-patch model's encoder (its [mask] token and patch head dropped)."""
    spec = parse_variant(config.model.variant)
    kwargs = {"width": spec.size.width, "depth": spec.size.depth, "mlp_dim": spec.size.mlp_dim,
              "num_heads": spec.size.num_heads, "patch_size": spec.patch_size, "stem_stages": spec.stem_stages,
              **config.model.model_kwargs()}
    for name in ("dropout", "attention_dropout", "drop_path", "head_bias_init"):
        kwargs.pop(name)  # training-only settings; the weights hold the head's bias
    if isinstance(config.objective, MaskedPatchObjective):
        state = {name.removeprefix("encoder."): tensor for name, tensor in state.items()
                 if name.startswith("encoder.")}
        kwargs["num_classes"] = 0
    return Weights(kwargs, state)


def replace_head(weights: Weights, num_classes: int | None, drop_representation: bool) -> Weights:
    """A zero-initialised `num_classes` head and/or no representation layer, as the paper fine-tunes."""
    kwargs, state = dict(weights.kwargs), dict(weights.state)
    if drop_representation and kwargs.get("representation_size"):
        state = {name: tensor for name, tensor in state.items() if not name.startswith("pre_logits.")}
        kwargs["representation_size"] = None
        if num_classes is None and kwargs["num_classes"]:
            raise ConversionError("the classifier reads the representation layer; dropping that needs a new head: "
                                  "add --num-classes K")
    if num_classes is not None:
        fan_in = kwargs.get("representation_size") or kwargs["width"]
        state["head.weight"] = torch.zeros(num_classes, fan_in)
        state["head.bias"] = torch.zeros(num_classes)
        kwargs["num_classes"] = num_classes
    if not kwargs["num_classes"]:
        raise ConversionError("these weights have no classifier (a masked-patch checkpoint, or num_classes 0); "
                              "add --num-classes K for a new zero-initialised one")
    return Weights(kwargs, state)


def _unsupported(weights: Weights, target: str) -> str | None:
    kwargs = weights.kwargs
    if kwargs.get("stem_stages"):
        return f"hybrid ResNet+ViT models cannot be exported to {target} yet"
    if kwargs["pos_embed"] != "learned":
        return f"{target}'s ViT has learned position embeddings only, these are fixed sin-cos"
    if kwargs.get("representation_size"):
        return f"{target}'s ViT classifier has no representation layer; add --drop-representation --num-classes K"
    if target == "hf" and kwargs["pool"] != "token":
        return "transformers' ViT classifies from the class token; this model pools by averaging (use --to timm)"
    return None


# -- timm --------------------------------------------------------------------------------------------------------


def to_timm(weights: Weights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """timm's `config.json` (architecture, model_args) and state dict; our parameter names are timm's."""
    if problem := _unsupported(weights, "timm"):
        raise ConversionError(problem)
    kwargs = weights.kwargs
    model_args = {
        "img_size": kwargs["image_size"], "patch_size": kwargs["patch_size"], "embed_dim": kwargs["width"],
        "depth": kwargs["depth"], "num_heads": kwargs["num_heads"], "mlp_ratio": kwargs["mlp_dim"] / kwargs["width"],
        "class_token": kwargs["pool"] == "token", "global_pool": "token" if kwargs["pool"] == "token" else "avg",
        # our final LayerNorm acts on the tokens before any pooling; timm's default for "avg" normalises after it
        "fc_norm": False,
    }
    architecture = TIMM_ARCHITECTURES.get((kwargs["width"], kwargs["patch_size"]), "vit_base_patch16_224")
    config = {"architecture": architecture, "num_classes": kwargs["num_classes"],
              "model_args": model_args,
              "pretrained_cfg": {"input_size": [3, kwargs["image_size"], kwargs["image_size"]],
                                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
                                 "interpolation": "bicubic", "num_classes": kwargs["num_classes"]}}
    return config, {name: tensor.contiguous() for name, tensor in weights.state.items()}


def write_timm(weights: Weights, out: Path) -> None:
    from safetensors.torch import save_file

    config, state = to_timm(weights)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# -- Hugging Face transformers ----------------------------------------------------------------------------------


def _of_type(module: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def _copy(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ConversionError(f"{what}: transformers expects shape {tuple(target.shape)}, the checkpoint has "
                              f"{tuple(source.shape)}; unsupported transformers ViT layout")
    with torch.no_grad():
        target.copy_(source)


def to_hf(weights: Weights) -> nn.Module:
    """A `transformers.ViTForImageClassification` holding the weights (fp32, eval mode)."""
    from transformers import ViTConfig, ViTForImageClassification

    if problem := _unsupported(weights, "hf"):
        raise ConversionError(problem)
    kwargs, state = weights.kwargs, weights.state
    config = ViTConfig(hidden_size=kwargs["width"], num_hidden_layers=kwargs["depth"],
                       num_attention_heads=kwargs["num_heads"], intermediate_size=kwargs["mlp_dim"],
                       hidden_act="gelu", layer_norm_eps=1e-6, image_size=kwargs["image_size"],
                       patch_size=kwargs["patch_size"], num_channels=3, qkv_bias=True,
                       num_labels=kwargs["num_classes"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config).eval()
    base = model.base_model
    embeddings = base.embeddings
    (conv,) = _of_type(embeddings, nn.Conv2d)
    _copy(conv.weight, state["patch_embed.proj.weight"], "patch embedding")
    _copy(conv.bias, state["patch_embed.proj.bias"], "patch embedding bias")
    tokens = {tuple(p.shape): p for p in embeddings.parameters(recurse=False)}
    _copy(tokens[tuple(state["cls_token"].shape)], state["cls_token"], "class token")
    _copy(tokens[tuple(state["pos_embed"].shape)], state["pos_embed"], "position embeddings")

    (blocks,) = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == kwargs["depth"]]
    width = kwargs["width"]
    for i, block in enumerate(blocks):
        linears, norms = _of_type(block, nn.Linear), _of_type(block, nn.LayerNorm)
        if len(linears) != 6 or len(norms) != 2:
            raise ConversionError(f"transformers block {i} has {len(linears)} linear layers and {len(norms)} norms, "
                                  "not 6 and 2; unsupported transformers ViT layout")
        query, key, value, out, fc1, fc2 = linears
        qkv_weight, qkv_bias = state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.bias"]
        for n, layer in enumerate((query, key, value)):
            _copy(layer.weight, qkv_weight[n * width:(n + 1) * width], f"block {i} q/k/v")
            _copy(layer.bias, qkv_bias[n * width:(n + 1) * width], f"block {i} q/k/v bias")
        for layer, ours in ((out, "attn.proj"), (fc1, "mlp.fc1"), (fc2, "mlp.fc2"), (norms[0], "norm1"),
                            (norms[1], "norm2")):
            _copy(layer.weight, state[f"blocks.{i}.{ours}.weight"], f"block {i} {ours}")
            _copy(layer.bias, state[f"blocks.{i}.{ours}.bias"], f"block {i} {ours} bias")
    in_blocks = {id(m) for m in blocks.modules()}
    (final_norm,) = [m for m in _of_type(base, nn.LayerNorm) if id(m) not in in_blocks]
    _copy(final_norm.weight, state["norm.weight"], "final norm")
    _copy(final_norm.bias, state["norm.bias"], "final norm bias")
    in_base = {id(m) for m in base.modules()}
    (classifier,) = [m for m in _of_type(model, nn.Linear) if id(m) not in in_base]
    _copy(classifier.weight, state["head.weight"], "classifier")
    _copy(classifier.bias, state["head.bias"], "classifier bias")
    return model


def write_hf(weights: Weights, out: Path) -> None:
    from transformers import ViTImageProcessor

    model = to_hf(weights)
    model.save_pretrained(out)
    size = weights.kwargs["image_size"]
    # our preprocessing: pixels / 127.5 - 1, i.e. mean 0.5 and std 0.5 on [0, 1]
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=3).save_pretrained(out)


# -- command line ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from pretrain.weights import WeightsError, read_checkpoint

    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint",
                        help="trainer checkpoint folder (its newest checkpoint) or a step-XXXXXXXX folder")
    parser.add_argument("--to", choices=["hf", "timm"], required=True, help="output format")
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="replace the classifier with a zero-initialised one of this many classes")
    parser.add_argument("--drop-representation", action="store_true",
                        help="remove the representation (pre-logits) layer, as the paper does for fine-tuning")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for an s3:// checkpoint, e.g. endpoint_url=http://...")
    args = parser.parse_args(argv)
    options = dict(option.split("=", 1) for option in args.storage_option)
    try:
        config, state = read_checkpoint(args.checkpoint, options)
        weights = replace_head(from_checkpoint(config, state), args.num_classes, args.drop_representation)
        (write_hf if args.to == "hf" else write_timm)(weights, Path(args.out))
    except (WeightsError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.to} weights ({config.model.variant}, {weights.num_classes} classes) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
