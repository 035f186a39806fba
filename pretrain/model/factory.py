"""Build a ViT from its name in the paper's notation."""

from __future__ import annotations

from typing import Any

from pretrain.model.description import FIELDS, ModelDescription
from pretrain.model.vit import VisionTransformer


def create_model(variant: str, **overrides: Any) -> VisionTransformer:
    """`create_model("H/14", num_classes=18291, representation_size=1280)`.

    Overrides are `VisionTransformer` arguments; they win over the variant's size (width, depth, mlp_dim,
    num_heads) and patch size, which is how tiny CPU models are made from a named variant.
    """
    architecture = {name: value for name, value in overrides.items() if name in FIELDS}
    training = {name: value for name, value in overrides.items() if name not in FIELDS}
    return ModelDescription.of_variant(variant, **architecture).build(**training)
