"""ViT sizes in the paper's notation.

A variant name is `SIZE/PATCH` ("B/16", "H/14", any patch size) or `STEM+SIZE/PATCH` for a hybrid whose patches are
the pixels of a ResNet feature map ("R50+B/16"), or the name timm registers for one of them ("vit_huge_patch14_224").
Sizes are data: one small record per row of the paper's Table 1 (and "Scaling Vision Transformers" for g and G).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


SIZES: dict[str, ViTSize] = {
    "Ti": ViTSize(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": ViTSize(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": ViTSize(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": ViTSize(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": ViTSize(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": ViTSize(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": ViTSize(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}

# Hybrid stems: name -> ResNet stage depths. The paper's R50 hybrid keeps stages (3, 4, 9) of ResNet-50 so that
# the feature map has stride 16; the ViT then uses patch size 1 on it.
STEMS: dict[str, tuple[int, ...]] = {
    "R50": (3, 4, 9),
}

TIMM_NAMES: dict[str, str] = {
    "vit_tiny_patch16_224": "Ti/16",
    "vit_small_patch16_224": "S/16",
    "vit_small_patch32_224": "S/32",
    "vit_base_patch8_224": "B/8",
    "vit_base_patch16_224": "B/16",
    "vit_base_patch32_224": "B/32",
    "vit_large_patch16_224": "L/16",
    "vit_large_patch32_224": "L/32",
    "vit_huge_patch14_224": "H/14",
    "vit_base_r50_s16_224": "R50+B/16",
}
"""timm's registered names of the paper's ViTs, and the variant each is: accepted wherever a variant is, and the names
the timm export writes. The image size stays `model.image_size` (timm's `_224` names its default resolution)."""

_NAME = re.compile(r"^(?:(?P<stem>[A-Za-z0-9]+)\+)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def stem_stride(stages: tuple[int, ...]) -> int:
    """Downsampling factor of a ResNet stem: stride-2 root conv, stride-2 max-pool, stride 2 from stage 2 on."""
    return 4 * 2 ** (len(stages) - 1)


@dataclass(frozen=True)
class Variant:
    name: str
    size: ViTSize
    # Pixels per patch side on the input image (for a hybrid: the stem's total stride).
    patch_size: int
    stem_stages: tuple[int, ...] | None = None


def parse_variant(name: str) -> Variant:
    """Parse "B/16", "R50+B/16", "vit_base_patch16_224", ... into a Variant named in the paper's notation; raise
    ValueError naming the allowed forms."""
    name = TIMM_NAMES.get(name.strip(), name)
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(
            f"variant {name!r} is not of the form SIZE/PATCH (e.g. B/16), STEM+SIZE/PATCH (R50+B/16) or a timm name "
            f"({', '.join(TIMM_NAMES)})"
        )
    size_name, patch, stem = match["size"], int(match["patch"]), match["stem"]
    if size_name not in SIZES:
        raise ValueError(f"variant {name!r}: unknown size {size_name!r}; choose one of {', '.join(SIZES)}")
    if patch < 1:
        raise ValueError(f"variant {name!r}: patch size must be at least 1")
    stages = None
    if stem is not None:
        if stem not in STEMS:
            raise ValueError(f"variant {name!r}: unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        stages = STEMS[stem]
        if patch != stem_stride(stages):
            raise ValueError(
                f"variant {name!r}: the {stem} stem has stride {stem_stride(stages)}, so write {stem}+{size_name}/"
                f"{stem_stride(stages)}"
            )
    return Variant(name=name.strip(), size=SIZES[size_name], patch_size=patch, stem_stages=stages)
