"""Behaviour of the ViT itself: initialisation, pooling, resolution changes, checkpointing, construction modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain.config.load import validate
from pretrain.config.schema import MaskedPatchObjective
from pretrain.model import create_model, parse_variant, resize_pos_embed, sincos_2d
from pretrain.model.description import ModelDescription
from pretrain.objectives import MaskedPatchTask
from pretrain.weights.model_weights import Weights
from pretrain.weights.timm import to_timm

ROOT = Path(__file__).resolve().parents[1]

SMALL = {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4, "image_size": 32}


def test_variants_follow_the_paper() -> None:
    huge = parse_variant("H/14")
    assert (huge.size.width, huge.size.depth, huge.size.mlp_dim, huge.size.num_heads) == (1280, 32, 5120, 16)
    assert parse_variant("g/14").size.width == 1408
    assert parse_variant("G/14").size.depth == 48
    assert parse_variant("B/7").patch_size == 7
    assert parse_variant("R50+B/16").stem_stages == (3, 4, 9)
    with pytest.raises(ValueError, match="R50\\+B/16"):
        parse_variant("R50+B/32")
    with pytest.raises(ValueError, match="unknown size"):
        parse_variant("XL/16")
    with pytest.raises(ValueError, match="SIZE/PATCH"):
        parse_variant("B16")


@pytest.mark.parametrize(
    ("timm_name", "variant"),
    [("vit_huge_patch14_224", "H/14"), ("vit_base_patch16_224", "B/16"), ("vit_base_r50_s16_224", "R50+B/16")],
)
def test_timm_names_are_the_variants_the_timm_export_writes(timm_name: str, variant: str) -> None:
    assert parse_variant(timm_name) == parse_variant(variant)
    weights = Weights(ModelDescription.of_variant(timm_name, image_size=224, num_classes=10), {})
    assert to_timm(weights)[0]["architecture"] == timm_name
    config = validate({**json.loads((ROOT / "configs" / "tiny_cpu.json").read_text()), "model": {"variant": timm_name}})
    assert config.model.description() == ModelDescription.of_variant(variant, num_classes=config.model.num_classes)


def test_initialisation_follows_the_jax_code() -> None:
    torch.manual_seed(0)
    model = create_model("B/16", num_classes=10, head_bias_init=-10.0, representation_size=768)
    assert torch.all(model.head.weight == 0)
    assert torch.all(model.head.bias == -10.0)
    assert torch.all(model.cls_token == 0)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    mlp_bias = model.blocks[0].mlp.fc1.bias
    assert 0 < mlp_bias.abs().max().item() < 1e-5
    assert mlp_bias.std().item() == pytest.approx(1e-6, rel=0.1)
    # Patch embedding: lecun normal, variance 1 / fan_in with fan_in = 3 * 16 * 16.
    patch = model.patch_embed.proj.weight
    assert patch.std().item() == pytest.approx(math.sqrt(1 / 768), rel=0.05)
    # Fused qkv: xavier-uniform bound of each (768 -> 768) kernel, not of the fused (768 -> 2304) matrix.
    bound = math.sqrt(6 / (768 + 768))
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max().item() <= bound
    assert qkv.abs().max().item() > 0.99 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_no_weight_decay_covers_everything_but_weight_matrices() -> None:
    model = create_model("Ti/16", **SMALL)
    exempt = model.no_weight_decay()
    assert {"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight", "blocks.0.norm1.bias"} <= exempt
    assert "blocks.0.attn.qkv.weight" not in exempt
    assert "patch_embed.proj.weight" not in exempt


def test_global_average_pooling_has_no_class_token() -> None:
    model = create_model("Ti/8", pool="gap", **SMALL)
    assert model.cls_token is None
    assert model.pos_embed.shape == (1, 16, 64)
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(dim=1))


def test_representation_layer_is_dense_tanh() -> None:
    model = create_model("Ti/8", representation_size=32, **SMALL).eval()
    features = model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)
    assert features.shape == (2, 32)
    assert features.abs().max() < 1


def test_sincos_position_embeddings_are_fixed_and_not_saved() -> None:
    model = create_model("Ti/8", pos_embed="sincos", **SMALL)
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    table = sincos_2d((4, 4), 64)
    similarity = torch.nn.functional.normalize(table, dim=1) @ torch.nn.functional.normalize(table, dim=1).T
    assert torch.all(similarity.argmax(dim=1) == torch.arange(16))  # each position is most similar to itself
    # A larger grid gets its own table rather than an interpolated one.
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    # DeepSpeed's bf16 engine casts parameters only; the fp32 table must not promote the bf16 activations
    for parameter in model.parameters():
        parameter.data = parameter.data.bfloat16()
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_resize_keeps_class_token_and_is_identity_on_same_grid() -> None:
    table = torch.randn(1, 1 + 4 * 4, 8)
    assert resize_pos_embed(table, (4, 4)) is table
    bigger = resize_pos_embed(table, (6, 6))
    assert bigger.shape == (1, 1 + 36, 8)
    torch.testing.assert_close(bigger[:, :1], table[:, :1])
    # A constant grid stays constant under interpolation.
    constant = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 16, 8), 0.5)], dim=1)
    torch.testing.assert_close(
        resize_pos_embed(constant, (7, 5)), torch.cat([torch.zeros(1, 1, 8), torch.full((1, 35, 8), 0.5)], dim=1)
    )


def test_any_resolution_including_non_square_runs() -> None:
    model = create_model("Ti/8", **SMALL).eval()
    assert model(torch.randn(2, 3, 48, 64)).shape == (2, 1000)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("Ti/8", num_classes=5, **SMALL)
    with torch.no_grad():
        model.head.weight.normal_()
    images = torch.randn(4, 3, 32, 32)

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        model(images).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, gradients(), strict=True):
        torch.testing.assert_close(a, b)


def test_stochastic_depth_and_dropout_are_off_in_eval() -> None:
    model = create_model("Ti/8", dropout=0.5, drop_path=0.5, **SMALL)
    with torch.no_grad():
        model.head.weight.normal_()
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images), model(images))
    model.train()
    assert not torch.allclose(model(images), model(images))


def test_builds_on_the_meta_device_without_memory() -> None:
    with torch.device("meta"):
        model = create_model("G/14")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 1.8e9


def test_builds_under_deepspeed_zero_init_with_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        torch.manual_seed(0)
        reference = create_model("Ti/8", num_classes=10, head_bias_init=-3.0, **SMALL)
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
            partitioned = create_model("Ti/8", num_classes=10, head_bias_init=-3.0, **SMALL)
        params = list(partitioned.parameters())
        assert all(hasattr(p, "ds_id") for p in params)
        with deepspeed.zero.GatheredParameters(params):
            for (name, expected), actual in zip(reference.named_parameters(), params, strict=True):
                torch.testing.assert_close(actual.detach().clone(), expected.detach(), msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("pool", "pos_embed", "checkpoint_every", "masked_patch"),
    [("token", "learned", 0, False), ("gap", "sincos", 2, False), ("gap", "sincos", 1, True)],
)
def test_the_model_compiles_to_one_graph_forward_and_backward(
    pool: str, pos_embed: str, checkpoint_every: int, masked_patch: bool
) -> None:
    """`model.compile` pays most on a GPU when the model is one graph: a break (a `.item()`, a branch on a tensor's
    value) splits it and sends the device back to Python. Under the trainer at ZeRO 2 no break came from elsewhere
    (TORCH_LOGS=graph_breaks, BENCHMARKS.md); ZeRO-3's own parameter hooks break it, which is DeepSpeed's."""
    torch.manual_seed(0)
    classes = 0 if masked_patch else 5  # the masked-patch head replaces the classifier
    model = create_model("Ti/8", num_classes=classes, pool=pool, pos_embed=pos_embed, dropout=0.1, **SMALL)
    if checkpoint_every:
        model.set_grad_checkpointing(True, every=checkpoint_every)
    images = torch.randn(4, 3, 32, 32)
    if masked_patch:
        objective = MaskedPatchObjective(type="masked_patch_prediction", target="downsampled_color")
        task = MaskedPatchTask(objective, patch_size=8)
        model = task.wrap(model)
        raw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

        def loss(module: torch.nn.Module) -> torch.Tensor:
            return task.loss(module, images, raw, {})
    else:
        labels = torch.tensor([0, 1, 2, 3])

        def loss(module: torch.nn.Module) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(module(images), labels)

    # fullgraph: a graph break raises instead of silently splitting the graph; aot_eager traces the forward and the
    # backward as inductor does, without generating kernels (seconds, not a minute)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss(compiled).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
