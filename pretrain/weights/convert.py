"""`python -m pretrain.convert SOURCE --to {hf,timm,native} --out DIR`: weights for downstream fine-tuning and back.

SOURCE is a trainer checkpoint (any ZeRO stage, any number of ranks, local or s3://; consolidated by DeepSpeed's
zero_to_fp32 in `pretrain.weights`), a transformers ViT folder, a timm ViT state dict (or its folder), or a native
folder. A masked-patch checkpoint gives its encoder. The export carries no classifier unless asked: the paper
fine-tunes with a new zero-initialised head, which `--num-classes K` adds; `--keep-head` keeps the trained one (for
inference on the pre-training classes). `--drop-representation` removes the pre-logits layer as the paper does before
fine-tuning, `--image-size` resizes the position embeddings for another resolution. Tensors that do not fit the model
the source describes (another variant, a damaged file) are refused before anything is written.

- `--to hf`: `config.json`, `model.safetensors` and `preprocessor_config.json` for
  `transformers.ViTForImageClassification` (and `ViTModel`). The weights are copied into a model built by the
  installed transformers and written by its `save_pretrained`, matched by the model's *structure* (the patch
  convolution, the class token and position table by shape, per block the six linear layers and two norms in
  order), not by parameter names: transformers 5 renamed them (`encoder.layer.N.attention.attention.query` became
  `layers.N.attention.q_proj`) and may again.
- `--to timm`: `model.safetensors` (our names are timm's) and a timm `config.json`, loadable with
  `timm.create_model("local-dir:DIR", pretrained=True)`, strict; a hybrid on ResNet-50 stages becomes timm's
  `vit_base_r50_s16_224` family.
- `--to native`: `model.safetensors` in our names and `vit.json`, which `model.init_from` starts a run from.
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
from tqdm import tqdm

from data_pipeline.storage import parse_storage_options
from pretrain.config.schema import Config, MaskedPatchObjective
from pretrain.model.pos_embed import resize_pos_embed
from pretrain.model.variants import parse_variant, stem_stride
from pretrain.model.vit import VisionTransformer
from pretrain.weights import NATIVE_CONFIG, WeightsError, read_checkpoint, read_state

TIMM_ARCHITECTURES = {
    (192, 16): "vit_tiny_patch16_224", (384, 16): "vit_small_patch16_224", (384, 32): "vit_small_patch32_224",
    (768, 8): "vit_base_patch8_224", (768, 16): "vit_base_patch16_224", (768, 32): "vit_base_patch32_224",
    (1024, 16): "vit_large_patch16_224", (1024, 32): "vit_large_patch32_224", (1280, 14): "vit_huge_patch14_224",
}
"""timm's registered ViTs by (width, patch size). Any other size is written as vit_base_patch16_224 with its own
model_args, which timm applies over the architecture's defaults (timm is not a run-time dependency here)."""


TIMM_HYBRID, TIMM_HYBRID_STAGES = "vit_base_r50_s16_224", (3, 4, 9)
"""timm's hybrid: ResNet-50's first three stages under a ViT (model_args set the ViT's size)."""

STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
"""Attention heads of the standard ViT widths (Ti, S, B, L, H, g, G), for timm state dicts without a config."""


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


def choose_head(weights: Weights, *, keep_head: bool = False, num_classes: int | None = None,
                drop_representation: bool = False) -> Weights:
    """The classifier the export carries: the trained one (`keep_head`), a new zero-initialised `num_classes` one
    (the paper's fine-tuning head), or none at all (the default: fine-tuning replaces the pre-training head).
    `drop_representation` removes the pre-logits layer, as the paper does before fine-tuning."""
    if keep_head and num_classes is not None:
        raise ConversionError("--keep-head and --num-classes exclude each other: keep the trained classifier or "
                              "start a new one")
    kwargs, state = dict(weights.kwargs), dict(weights.state)
    if keep_head and not kwargs["num_classes"]:
        raise ConversionError("these weights have no classifier to keep (a masked-patch checkpoint, or num_classes "
                              "0); drop --keep-head, or add --num-classes K for a new zero-initialised one")
    if drop_representation and kwargs.get("representation_size"):
        if keep_head:
            raise ConversionError("the trained classifier reads the representation layer, so it cannot be kept "
                                  "without it: drop --keep-head (or --drop-representation)")
        state = {name: tensor for name, tensor in state.items() if not name.startswith("pre_logits.")}
        kwargs["representation_size"] = None
    if not keep_head:
        state = {name: tensor for name, tensor in state.items() if not name.startswith("head.")}
        kwargs["num_classes"] = 0
    if num_classes is not None:
        fan_in = kwargs.get("representation_size") or kwargs["width"]
        state["head.weight"] = torch.zeros(num_classes, fan_in)
        state["head.bias"] = torch.zeros(num_classes)
        kwargs["num_classes"] = num_classes
    return Weights(kwargs, state)


def describe(kwargs: dict[str, Any]) -> str:
    return (f"{kwargs['width']} wide, {kwargs['depth']} blocks, patch {kwargs['patch_size']}, "
            f"{kwargs['image_size']} px, {kwargs['num_classes'] or 'no'} classes")


def check_weights(weights: Weights, source: str) -> None:
    """Refuse weights that do not fit the model their description builds (a checkpoint whose tensors belong to
    another variant than its config says, an incomplete or hand-edited file) before anything is written."""
    with torch.device("meta"):
        model = VisionTransformer(**weights.kwargs)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.state.items()}
    problems = [f"{name} is missing" for name in expected if name not in found]
    problems += [f"{name} is {found[name]}, not {expected[name]}" for name in expected
                 if name in found and found[name] != expected[name]]
    problems += [f"{name} is unexpected" for name in found if name not in expected]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ConversionError(f"{source}: the tensors do not fit the model it describes ({describe(weights.kwargs)}):"
                              f" {'; '.join(problems[:3])}{more}; is it a checkpoint of another variant, or damaged?")


def _unsupported(weights: Weights, target: str) -> str | None:
    kwargs = weights.kwargs
    if kwargs.get("stem_stages") and target == "hf":
        return "transformers' ViT has no ResNet stem; export hybrid models with --to timm"
    if kwargs.get("stem_stages") and tuple(kwargs["stem_stages"]) != TIMM_HYBRID_STAGES:
        return (f"timm's hybrid ViT has the ResNet-50 stages {TIMM_HYBRID_STAGES}, these weights have "
                f"{tuple(kwargs['stem_stages'])}")
    if kwargs["pos_embed"] != "learned":
        return f"{target}'s ViT has learned position embeddings only, these are fixed sin-cos"
    if kwargs.get("representation_size"):
        return f"{target}'s ViT has no representation (pre-logits) layer; add --drop-representation"
    if target == "hf" and kwargs["pool"] != "token":
        return "transformers' ViT classifies from the class token; this model pools by averaging (use --to timm)"
    return None


# -- timm --------------------------------------------------------------------------------------------------------


def to_timm(weights: Weights) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """timm's `config.json` (architecture, model_args) and state dict; our parameter names are timm's."""
    if problem := _unsupported(weights, "timm"):
        raise ConversionError(problem)
    kwargs = weights.kwargs
    hybrid = bool(kwargs.get("stem_stages"))
    model_args = {
        "img_size": kwargs["image_size"], "embed_dim": kwargs["width"],
        "depth": kwargs["depth"], "num_heads": kwargs["num_heads"], "mlp_ratio": kwargs["mlp_dim"] / kwargs["width"],
        "class_token": kwargs["pool"] == "token", "global_pool": "token" if kwargs["pool"] == "token" else "avg",
        # our final LayerNorm acts on the tokens before any pooling; timm's default for "avg" normalises after it
        "fc_norm": False,
    }
    if hybrid:  # timm's hybrid puts patch size 1 on the ResNet's feature map itself
        architecture = TIMM_HYBRID
    else:
        model_args["patch_size"] = kwargs["patch_size"]
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


def from_timm(path: str) -> Weights:
    """Native weights from a timm ViT: a state dict file (.safetensors or .pth), or a folder with model.safetensors
    and timm's config.json (whose model_args give the number of heads; otherwise the paper's table does)."""
    location = Path(path)
    file = location / "model.safetensors" if location.is_dir() else location
    if not file.is_file():
        raise ConversionError(f"{path}: no such file; pass a timm state dict (.safetensors or .pth) or its folder")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
    except Exception as error:  # whatever the unpickler or safetensors say about a file that is not a state dict
        reason = " ".join(str(error).split())[:200]
        raise ConversionError(f"{path}: not a readable state dict ({type(error).__name__}: {reason})") from None
    config_file = file.parent / "config.json"
    model_args = json.loads(config_file.read_text()).get("model_args", {}) if config_file.is_file() else {}
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ConversionError(f"{path}: not a timm ViT state dict (no pos_embed / patch_embed.proj.weight)")
    native = {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    # a hybrid's ResNet (timm's ResNetV2 under patch_embed.backbone) has our module names
    foreign = sorted(k for k in state if k not in native and not k.startswith(("patch_embed.", "blocks.")))
    if foreign:
        raise ConversionError(f"{path}: timm tensors with no equivalent here: {', '.join(foreign[:4])} (e.g. fc_norm "
                              "of timm's average pooling, register tokens); unsupported timm ViT")
    width = state["pos_embed"].shape[-1]
    heads = model_args.get("num_heads") or STANDARD_HEADS.get(width)
    if heads is None:
        raise ConversionError(f"{path}: width {width} is not a standard ViT size; put timm's config.json (with "
                              "model_args.num_heads) beside the weights")
    stem_stages = _resnet_stages(state)
    patch = stem_stride(stem_stages) if stem_stages else state["patch_embed.proj.weight"].shape[-1]
    prefix = 1 if "cls_token" in state else 0
    grid = round((state["pos_embed"].shape[1] - prefix) ** 0.5)
    kwargs = {"width": width, "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
              "mlp_dim": state["blocks.0.mlp.fc1.weight"].shape[0], "num_heads": heads, "patch_size": patch,
              "image_size": grid * patch, "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
              "pool": "token" if prefix else "gap", "pos_embed": "learned", "representation_size": None,
              "stem_stages": stem_stages}
    return Weights(kwargs, dict(state))


def _resnet_stages(state: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Units per stage of a hybrid's ResNet, from its `patch_embed.backbone.stages.S.blocks.B.` tensors."""
    units: dict[int, set[int]] = {}
    for name in state:
        if name.startswith("patch_embed.backbone.stages."):
            stage, _, unit = name.split(".")[3:6]
            units.setdefault(int(stage), set()).add(int(unit))
    return tuple(len(units[stage]) for stage in sorted(units)) or None


# -- native --------------------------------------------------------------------------------------------------------


def write_native(weights: Weights, out: Path) -> None:
    """`model.safetensors` in our names and `vit.json` (the VisionTransformer arguments): what `model.init_from`
    and this converter read back."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in weights.state.items()}, str(out / "model.safetensors"))
    (out / NATIVE_CONFIG).write_text(json.dumps(weights.kwargs, indent=2) + "\n")


def read_native(folder: str) -> Weights:
    kwargs = json.loads((Path(folder) / NATIVE_CONFIG).read_text())
    if kwargs.get("stem_stages") is not None:
        kwargs["stem_stages"] = tuple(kwargs["stem_stages"])
    return Weights(kwargs, read_state(folder))


# -- Hugging Face transformers ----------------------------------------------------------------------------------


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
        raise ConversionError("unsupported transformers ViT layout: expected one patch convolution, a class token, "
                              f"a position table and one list of {depth} blocks")
    (conv,), (blocks,) = convolutions, block_lists
    slots: list[Slot] = [(conv.weight, "patch_embed.proj.weight", rows), (conv.bias, "patch_embed.proj.bias", rows),
                         (tokens[0], "cls_token", rows), (tokens[1], "pos_embed", rows)]
    for i, block in enumerate(blocks):
        linears, norms = _of_type(block, nn.Linear), _of_type(block, nn.LayerNorm)
        if len(linears) != 6 or len(norms) != 2:
            raise ConversionError(f"unsupported transformers ViT layout: block {i} has {len(linears)} linear layers "
                                  f"and {len(norms)} norms, not 6 and 2")
        for n, layer in enumerate(linears[:3]):  # q, k, v: row blocks of the fused qkv
            part = slice(n * width, (n + 1) * width)
            slots += [(layer.weight, f"blocks.{i}.attn.qkv.weight", part),
                      (layer.bias, f"blocks.{i}.attn.qkv.bias", part)]
        for layer, ours in zip([*linears[3:], *norms], ["attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"],
                               strict=True):
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

    if problem := _unsupported(weights, "hf"):
        raise ConversionError(problem)
    kwargs, state = weights.kwargs, weights.state
    config = ViTConfig(hidden_size=kwargs["width"], num_hidden_layers=kwargs["depth"],
                       num_attention_heads=kwargs["num_heads"], intermediate_size=kwargs["mlp_dim"],
                       hidden_act="gelu", layer_norm_eps=1e-6, image_size=kwargs["image_size"],
                       patch_size=kwargs["patch_size"], num_channels=3, qkv_bias=True,
                       num_labels=kwargs["num_classes"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config).eval()
    slots = _hf_slots(model, kwargs["depth"], kwargs["width"])
    with torch.no_grad():
        for parameter, name, rows in tqdm(slots, desc="copying into transformers' ViT", unit="tensor", leave=False):
            source = state[name][rows]
            if parameter.shape != source.shape:
                raise ConversionError(f"{name}: transformers expects {tuple(parameter.shape)}, the weights have "
                                      f"{tuple(source.shape)}; unsupported transformers ViT layout")
            parameter.copy_(source)
    return model


def from_hf(folder: str) -> Weights:
    """Native weights from a transformers ViT classification folder (`save_pretrained` output)."""
    from transformers import AutoConfig, ViTForImageClassification

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{folder}: not a transformers model folder ({error})") from None
    problems = [f"{name} is {value!r}" for name, value, wanted in (
        ("model_type", config.model_type, "vit"), ("hidden_act", getattr(config, "hidden_act", None), "gelu"),
        ("qkv_bias", getattr(config, "qkv_bias", None), True), ("num_channels", getattr(config, "num_channels", 3), 3),
    ) if value != wanted]
    if problems:
        raise ConversionError(f"{folder}: unsupported transformers config ({', '.join(problems)}); a ViT with GELU, "
                              "qkv biases and RGB input is needed")
    model = ViTForImageClassification.from_pretrained(folder)
    kwargs = {"width": config.hidden_size, "depth": config.num_hidden_layers, "mlp_dim": config.intermediate_size,
              "num_heads": config.num_attention_heads, "patch_size": config.patch_size,
              "image_size": config.image_size, "num_classes": config.num_labels, "pool": "token",
              "pos_embed": "learned", "representation_size": None, "stem_stages": None}
    state: dict[str, torch.Tensor] = {}
    for parameter, name, rows in _hf_slots(model, config.num_hidden_layers, config.hidden_size):
        if rows == slice(None):
            state[name] = parameter.detach().clone()
        else:  # q, k and v arrive in order: concatenate them into the fused qkv
            state[name] = torch.cat([state[name], parameter.detach()]) if rows.start else parameter.detach().clone()
    return Weights(kwargs, state)


def write_preprocessor(out: Path, image_size: int) -> None:
    """transformers' image processor for our preprocessing: pixels / 127.5 - 1 (mean 0.5, std 0.5 on [0, 1]),
    bicubic resize to the model's resolution."""
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=3).save_pretrained(out)


def write_hf(weights: Weights, out: Path) -> None:
    to_hf(weights).save_pretrained(out)
    write_preprocessor(out, weights.kwargs["image_size"])


# -- command line ------------------------------------------------------------------------------------------------


def read_any(source: str, storage_options: dict[str, Any]) -> Weights:
    """Weights from a native folder, a transformers folder, a timm folder or file, or a trainer checkpoint."""
    location = Path(source)
    if location.is_file():
        return from_timm(source)
    if (location / NATIVE_CONFIG).is_file():
        return read_native(source)
    if (location / "config.json").is_file():
        described = json.loads((location / "config.json").read_text())
        return from_hf(source) if "model_type" in described else from_timm(source)
    config, state = read_checkpoint(source, storage_options)
    return from_checkpoint(config, state)


def resize_positions(weights: Weights, image_size: int) -> Weights:
    """Position embeddings for `image_size` (same patch size, longer sequence): 2-D bicubic resize of the grid,
    class token kept, with the function the model itself uses at other resolutions."""
    kwargs, state = dict(weights.kwargs), dict(weights.state)
    patch = kwargs["patch_size"]
    if image_size % patch:
        raise ConversionError(f"--image-size {image_size} is not a multiple of the patch size {patch}")
    if kwargs["pos_embed"] == "learned":
        old, new = kwargs["image_size"] // patch, image_size // patch
        prefix = 1 if kwargs["pool"] == "token" else 0
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (new, new), (old, old), prefix)
    kwargs["image_size"] = image_size
    return Weights(kwargs, state)


WRITERS = {"hf": write_hf, "timm": write_timm, "native": write_native}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="trainer checkpoint folder (its newest checkpoint) or a step-XXXXXXXX folder "
                        "(local or s3://), a transformers ViT folder, a timm state dict or folder, or a native folder")
    parser.add_argument("--to", choices=list(WRITERS), required=True,
                        help="hf (transformers), timm, or native (what model.init_from reads)")
    parser.add_argument("--out", required=True, help="output folder (local)")
    head = parser.add_mutually_exclusive_group()
    head.add_argument("--num-classes", type=int, default=None,
                      help="a new zero-initialised classifier of this many classes, as the paper fine-tunes "
                           "(default: no classifier; fine-tuning adds its own)")
    head.add_argument("--keep-head", action="store_true",
                      help="keep the trained classifier (for inference with the pre-training classes)")
    parser.add_argument("--drop-representation", action="store_true",
                        help="remove the representation (pre-logits) layer, as the paper does for fine-tuning")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the position embeddings for this resolution (e.g. 384 for fine-tuning)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the written tensors")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for an s3:// checkpoint, e.g. endpoint_url=http://...")
    args = parser.parse_args(argv)
    try:
        options = parse_storage_options(args.storage_option)
    except ValueError as error:
        parser.error(str(error))
    try:
        weights = read_any(args.source, options)
        check_weights(weights, args.source)
        weights = choose_head(weights, keep_head=args.keep_head, num_classes=args.num_classes,
                              drop_representation=args.drop_representation)
        if args.image_size:
            weights = resize_positions(weights, args.image_size)
        weights = Weights(weights.kwargs, {k: v.to(DTYPES[args.dtype]) for k, v in weights.state.items()})
        WRITERS[args.to](weights, Path(args.out))
    except (WeightsError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.to} weights ({describe(weights.kwargs)}) in {args.out}")
    if not weights.num_classes:
        print("no classifier written: --keep-head keeps the trained one, --num-classes K adds a new one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
