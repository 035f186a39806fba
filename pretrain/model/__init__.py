"""The ViT model family: `create_model("B/16")`, `flops_per_image("H/14", 224)`."""

from pretrain.model.description import ModelDescription
from pretrain.model.factory import create_model
from pretrain.model.flops import flops_per_image
from pretrain.model.pos_embed import resize_pos_embed, sincos_2d
from pretrain.model.variants import SIZES, ViTSize, parse_variant
from pretrain.model.vit import VisionTransformer, model_input

__all__ = [
    "SIZES",
    "ModelDescription",
    "ViTSize",
    "VisionTransformer",
    "create_model",
    "flops_per_image",
    "model_input",
    "parse_variant",
    "resize_pos_embed",
    "sincos_2d",
]
