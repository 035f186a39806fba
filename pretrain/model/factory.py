"""Build a ViT from its name in the paper's notation."""

from __future__ import annotations

from typing import Any

from pretrain.model.variants import parse_variant
from pretrain.model.vit import VisionTransformer


def create_model(variant: str, **overrides: Any) -> VisionTransformer:
    """`create_model("H/14", num_classes=18291, representation_size=1280)`.

    Overrides are `VisionTransformer` arguments; they win over the variant's size (width, depth, mlp_dim,
    num_heads) and patch size, which is how tiny CPU models are made from a named variant.
    """
    spec = parse_variant(variant)
    size = spec.size
    kwargs: dict[str, Any] = {
        "width": size.width,
        "depth": size.depth,
        "mlp_dim": size.mlp_dim,
        "num_heads": size.num_heads,
        "patch_size": spec.patch_size,
        "stem_stages": spec.stem_stages,
    }
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)
