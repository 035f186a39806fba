"""The numbers behind the paper's pictures, on cases whose answers are known, and the CLI on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from pretrain.demos.digits import write_digits
from pretrain.evaluate.analyze import (
    attention_maps,
    attention_rollout,
    filter_components,
    main,
    mean_attention_distance,
    position_similarity,
)
from pretrain.model import ModelDescription, create_model, sincos_2d
from pretrain.weights.model_weights import Weights
from pretrain.weights.native import write_native

GRID, PATCH = (3, 4), 8
TOKENS = 1 + GRID[0] * GRID[1]


def test_identity_attention_has_distance_zero_and_uniform_the_mean_pairwise_distance():
    identity = torch.eye(TOKENS).expand(2, 3, TOKENS, TOKENS)
    assert torch.allclose(mean_attention_distance(identity, GRID, PATCH, 1), torch.zeros(3, dtype=torch.float64))
    uniform = torch.full((2, 3, TOKENS, TOKENS), 1 / TOKENS)
    centres = [(r * PATCH, c * PATCH) for r in range(GRID[0]) for c in range(GRID[1])]
    pairs = list(itertools.product(centres, centres))  # every query with every key, itself included
    expected = sum(math.dist(a, b) for a, b in pairs) / len(pairs)
    assert torch.allclose(
        mean_attention_distance(uniform, GRID, PATCH, 1), torch.full((3,), expected, dtype=torch.float64)
    )


def test_rollout_through_identity_attention_is_the_identity():
    layers = [torch.eye(TOKENS).expand(4, TOKENS, TOKENS) for _ in range(5)]
    assert torch.allclose(attention_rollout(layers), torch.eye(TOKENS, dtype=torch.float64))
    uniform = [torch.full((4, TOKENS, TOKENS), 1 / TOKENS)]  # one uniform layer: half identity, half uniform
    expected = 0.5 * torch.eye(TOKENS, dtype=torch.float64) + 0.5 / TOKENS
    assert torch.allclose(attention_rollout(uniform), expected)


def test_fixed_sincos_position_similarity_peaks_on_the_diagonal():
    similarity = position_similarity(sincos_2d((7, 7), 64))
    assert torch.equal(similarity.argmax(-1), torch.arange(49))
    assert torch.allclose(similarity.diagonal(), torch.ones(49, dtype=torch.float64))


def test_filter_components_are_orthonormal_and_ordered_by_variance():
    torch.manual_seed(0)
    components, explained = filter_components(torch.randn(64, 3, 4, 4), count=28)
    flat = components.flatten(1)
    assert components.shape == (28, 3, 4, 4)
    assert torch.allclose(flat @ flat.T, torch.eye(28, dtype=torch.float64), atol=1e-9)
    assert (explained[:-1] >= explained[1:]).all() and explained.sum() <= 1


def test_recomputed_attention_reproduces_the_models_own_blocks():
    torch.manual_seed(0)
    model = create_model("Ti/8", image_size=32, width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, images)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 2, 17))
    # the first block's attention output from these probabilities equals the fused kernel's
    block = model.blocks[0]
    x = model.add_positions(*model.embed(images))
    qkv = block.attn.qkv(block.norm1(x)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    mixed = (maps[0] @ qkv[2]).transpose(1, 2).reshape(2, 17, 32)
    with torch.no_grad():
        assert torch.allclose(block.attn.proj(mixed), block.attn(block.norm1(x)), atol=1e-5)


@pytest.mark.slow  # writes 1,797 digits and renders five figures
def test_cli_writes_every_figure_and_the_summary(tmp_path: Path, capsys):
    torch.manual_seed(0)
    model = ModelDescription(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=32, num_classes=10)
    write_native(Weights(model, model.build().state_dict()), tmp_path / "weights")
    write_digits(tmp_path / "digits", size=32)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in (
                {"kind": "train", "step": 10, "loss": 2.0, "lr": 1e-3, "images_per_s": 100.0},
                {"kind": "train", "step": 20, "loss": 1.5, "lr": 5e-4, "images_per_s": 110.0},
                {"kind": "eval", "step": 20, "top1": 0.5},
            )
        )
    )
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "weights"),
                "--images",
                str(tmp_path / "digits"),
                "--out",
                str(tmp_path / "out"),
                "--num-images",
                "8",
                "--metrics",
                str(metrics),
            ]
        )
        == 0
    )
    assert "figures and summary.json from 8 images" in capsys.readouterr().out
    for name in ("embedding_filters", "position_similarity", "attention_distance", "attention_rollout", "curves"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["mean_attention_distance_px"]) == 2 and len(summary["mean_attention_distance_px"][0]) == 2
    assert len(summary["filter_variance_explained"]) == 28
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "nothing"),
                "--images",
                str(tmp_path / "digits"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
