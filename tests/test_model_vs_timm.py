"""Our ViT against timm's, an implementation nobody here wrote: parameter counts, logits, position-embedding resize."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from pretrain.model import create_model, flops_per_image

TIMM_NAMES = {
    "B/16": "vit_base_patch16_224",
    "L/16": "vit_large_patch16_224",
    "H/14": "vit_huge_patch14_224",
    "R50+B/16": "vit_base_r50_s16_224",
}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("variant", list(TIMM_NAMES))
def test_parameter_count_equals_timm(variant: str) -> None:
    with torch.device("meta"):
        ours = create_model(variant, num_classes=1000)
        theirs = timm.create_model(TIMM_NAMES[variant], num_classes=1000)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised head and tokens random values so that every weight shows in the logits."""
    with torch.no_grad():
        model.head.weight.normal_(std=0.05)
        model.head.bias.normal_(std=0.05)
        model.cls_token.normal_(std=0.05)
    return model.eval()


@pytest.mark.parametrize(
    ("variant", "overrides", "resolution"),
    [
        # B/16's twelve blocks and the hybrid's ResNet stem take 10-20 s a case on two CPU cores; the quick loop
        # (-m "not slow") keeps the H/14 cases
        pytest.param("B/16", {}, 224, marks=pytest.mark.slow),
        pytest.param("B/16", {}, 288, marks=pytest.mark.slow),
        # Full width, depth cut to keep the test quick on two CPU cores.
        ("H/14", {"depth": 2}, 224),
        ("H/14", {"depth": 2}, 280),
        pytest.param("R50+B/16", {"depth": 2}, 224, marks=pytest.mark.slow),
        pytest.param("R50+B/16", {"depth": 2}, 288, marks=pytest.mark.slow),
    ],
)
def test_logits_match_timm(variant: str, overrides: dict, resolution: int) -> None:
    torch.manual_seed(0)
    ours = randomised(create_model(variant, image_size=224, **overrides))
    theirs = timm.create_model(TIMM_NAMES[variant], num_classes=1000, img_size=resolution, **overrides).eval()
    # timm's own loader resizes the 224 px position embeddings to its grid; ours resizes on the fly.
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    images = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        error = relative_error(ours(images), theirs(images))
    assert error <= 1e-5


@pytest.mark.parametrize(("variant", "gflops"), [("B/16", 35.1), ("L/16", 123.0), ("H/14", 334.8)])
def test_flops_match_published(variant: str, gflops: float) -> None:
    assert flops_per_image(variant, 224) / 1e9 == pytest.approx(gflops, rel=0.01)


def test_flops_grow_with_resolution_and_count_the_stem() -> None:
    # 384 px has 2.25x the patches and attention grows quadratically, so the cost more than doubles.
    assert flops_per_image("B/16", 384) > 2.25 * flops_per_image("B/16", 224)
    # The hybrid costs the ViT plus its ResNet stem (ResNet-50's first three stages are about 4 GMACs at 224 px).
    stem_gflops = (flops_per_image("R50+B/16", 224) - flops_per_image("B/16", 224)) / 1e9
    assert 6.0 < stem_gflops < 10.0
