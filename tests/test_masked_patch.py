"""Masked patch prediction: masking statistics, targets on crafted patches, the loss, and where gradients flow."""

from __future__ import annotations

import pytest
import torch

from pretrain.config.load import validate
from pretrain.config.schema import MaskedPatchObjective
from pretrain.model import create_model
from pretrain.objectives import build_model
from pretrain.objectives.masked_patch import (
    KEEP,
    MASK,
    RANDOM,
    MaskedPatchModel,
    corrupt,
    corrupted_targets,
    masked_patch_loss,
    patch_targets,
    prediction_size,
    sample_corruption,
)
from pretrain.train.engine_config import parameter_groups


def objective(**fields) -> MaskedPatchObjective:
    return MaskedPatchObjective(type="masked_patch_prediction", **fields)


def tiny_model(target: str = "mean_color", pool: str = "token") -> MaskedPatchModel:
    torch.manual_seed(0)
    encoder = create_model("Ti/4", image_size=16, width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=0, pool=pool)
    return MaskedPatchModel(encoder, objective(target=target))


@pytest.mark.parametrize("ratio", [0.5, 0.15])
def test_masking_statistics_over_many_draws(ratio):
    batch, patches = 4000, 196
    corruption = sample_corruption(
        batch, patches, objective(mask_ratio=ratio), generator=torch.Generator().manual_seed(0)
    )
    k = round(ratio * patches)
    assert corruption.positions.shape == (batch, k)
    # k distinct patches per image, every patch equally likely
    assert all(len(set(row)) == k for row in corruption.positions[:200].tolist())
    frequency = torch.bincount(corruption.positions.flatten(), minlength=patches) / batch
    assert frequency.min() > ratio - 0.04 and frequency.max() < ratio + 0.04
    shares = torch.bincount(corruption.kind.flatten(), minlength=3).double() / corruption.kind.numel()
    assert shares[MASK] == pytest.approx(0.8, abs=0.005)
    assert shares[RANDOM] == pytest.approx(0.1, abs=0.005)
    assert shares[KEEP] == pytest.approx(0.1, abs=0.005)
    assert not (corruption.source == corruption.positions).any()  # a random patch is always another one


def test_corrupt_replaces_only_the_chosen_patches():
    patches = torch.randn(3, 16, 8)
    mask_token = torch.randn(1, 1, 8)
    corruption = sample_corruption(3, 16, objective(), generator=torch.Generator().manual_seed(1))
    out = corrupt(patches, corruption, mask_token)
    chosen = torch.zeros(3, 16, dtype=torch.bool)
    for b in range(3):
        for position, kind, source in zip(*(t[b].tolist() for t in corruption), strict=True):
            chosen[b, position] = True
            expected = {MASK: mask_token[0, 0], RANDOM: patches[b, source], KEEP: patches[b, position]}[kind]
            assert torch.equal(out[b, position], expected)
    assert torch.equal(out[~chosen], patches[~chosen])


def test_mean_colour_target_of_crafted_patches():
    image = torch.zeros(1, 3, 8, 16, dtype=torch.uint8)  # two 8x8 patches side by side
    image[0, :, :, :8] = torch.tensor([255, 0, 130], dtype=torch.uint8)[:, None, None]
    image[0, :, :4, 8:] = 255  # right patch: half white, half black: mean 127.5 per channel
    targets = patch_targets(image, 8, objective(target="mean_color"))
    # 3 bits per channel: level = floor(value * 8 / 256); class = r * 64 + g * 8 + b
    assert targets.tolist() == [[7 * 64 + 0 * 8 + 4, 3 * 64 + 3 * 8 + 3]]
    two_bits = patch_targets(image, 8, objective(target="mean_color", color_bits=2))
    assert two_bits.tolist() == [[3 * 16 + 0 * 4 + 2, 1 * 16 + 1 * 4 + 1]]


def test_downsampled_colour_target_of_a_crafted_patch():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    expected = []
    for cell in range(16):  # each 2x2 cell of the 8x8 patch gets its own colour, row-major
        row, col = divmod(cell, 4)
        colour = torch.tensor([cell * 16, 255 - cell * 16, (cell % 4) * 64], dtype=torch.uint8)
        image[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] = colour[:, None, None]
        r, g, b = (int(v) * 8 // 256 for v in colour)
        expected.append(r * 64 + g * 8 + b)
    targets = patch_targets(image, 8, objective(target="downsampled_color"))
    assert targets.shape == (1, 1, 16)
    assert targets[0, 0].tolist() == expected
    # patch sizes 4 does not divide (H/14) still give 16 cells
    assert patch_targets(
        torch.zeros(2, 3, 28, 28, dtype=torch.uint8), 14, objective(target="downsampled_color")
    ).shape == (2, 4, 16)


def test_pixel_target_is_the_patch_in_model_input_range():
    image = torch.randint(0, 256, (2, 3, 8, 16), dtype=torch.uint8)
    targets = patch_targets(image, 8, objective(target="pixels"))
    assert targets.shape == (2, 2, 3 * 64)
    right_patch = image[1, :, :, 8:].float() / 127.5 - 1.0
    assert torch.allclose(targets[1, 1], right_patch.flatten())


@pytest.mark.parametrize("target", ["mean_color", "downsampled_color", "pixels"])
def test_loss_is_zero_for_perfect_predictions(target):
    setting = objective(target=target)
    image = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    corruption = sample_corruption(2, 16, setting, generator=torch.Generator().manual_seed(0))
    targets = corrupted_targets(patch_targets(image, 4, setting), corruption)
    if target == "pixels":
        perfect = targets.clone()
        wrong = targets + 0.5
    else:
        colours = 2 ** (3 * setting.color_bits)
        perfect = 100.0 * torch.nn.functional.one_hot(targets, colours).float().flatten(2)
        wrong = 100.0 * torch.nn.functional.one_hot((targets + 1) % colours, colours).float().flatten(2)
    assert perfect.shape[-1] == prediction_size(setting, 4)
    assert masked_patch_loss(perfect, targets, setting).max() < 1e-6
    assert masked_patch_loss(wrong, targets, setting).min() > 0.2


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_unmasked_positions_get_no_gradient_from_the_loss(pool):
    model = tiny_model(pool=pool)
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide every gradient
    captured = {}

    def keep_grad(_module, _inputs, output):
        output.retain_grad()
        captured["tokens"] = output

    model.encoder.norm.register_forward_hook(keep_grad)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    setting = objective()
    corruption = sample_corruption(3, 16, setting, generator=torch.Generator().manual_seed(0))
    predictions = model(images.float() / 127.5 - 1, *corruption)
    targets = corrupted_targets(patch_targets(images, 4, setting), corruption)
    masked_patch_loss(predictions, targets, setting).mean().backward()

    grad = captured["tokens"].grad.abs().sum(-1)  # (B, prefix + N)
    prefix = model.encoder.num_prefix_tokens
    corrupted = torch.zeros(3, 16, dtype=torch.bool)
    corrupted.scatter_(1, corruption.positions, True)
    assert (grad[:, prefix:][~corrupted] == 0).all()
    assert (grad[:, prefix:][corrupted] > 0).all()
    if prefix:
        assert (grad[:, 0] == 0).all()  # the class token is not used by this loss
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_position_embeddings_are_added_after_corruption():
    model = tiny_model()
    captured = {}
    model.encoder.blocks[0].register_forward_pre_hook(lambda _m, inputs: captured.update(x=inputs[0]))
    setting = objective(mask_token_prob=1.0, random_patch_prob=0.0)  # every corrupted patch is [mask]
    corruption = sample_corruption(2, 16, setting, generator=torch.Generator().manual_seed(0))
    model(torch.zeros(2, 3, 16, 16), *corruption)
    pos_embed = model.encoder.pos_embed[0]
    for b in range(2):
        for position in corruption.positions[b].tolist():
            expected = model.mask_token[0, 0] + pos_embed[1 + position]
            assert torch.allclose(captured["x"][b, 1 + position], expected)


def test_masked_patch_model_from_a_config_trains_its_token_and_head_without_decay_on_them():
    config = validate(
        {
            "run": {"name": "t"},
            "model": {
                "variant": "Ti/4",
                "image_size": 16,
                "width": 32,
                "depth": 1,
                "mlp_dim": 64,
                "num_heads": 2,
                "num_classes": 0,
            },
            "data": {"train": "x/index.json", "batch_size": 8},
            "objective": {"type": "masked_patch_prediction", "target": "downsampled_color"},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.1},
            "schedule": {"steps": 10, "warmup_steps": 1},
        }
    )
    model = build_model(config)
    assert isinstance(model, MaskedPatchModel) and model.head.out_features == 16 * 512
    decay, no_decay = parameter_groups(model, 0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.mask_token) in no_decay_ids and id(model.encoder.pos_embed) in no_decay_ids
    assert id(model.head.weight) in {id(p) for p in decay["params"]}
    assert model(torch.zeros(2, 3, 16, 16), pre_logits=True).shape == (2, 32)  # the representation for probes


def test_probes_read_the_mean_of_the_patch_outputs_since_no_loss_trains_the_class_token():
    model = tiny_model(pool="token").eval()
    images = torch.randn(3, 3, 16, 16)
    tokens = model.encoder.forward_features(images)
    torch.testing.assert_close(model(images, pre_logits=True), tokens[:, 1:].mean(dim=1))
    assert not torch.allclose(model(images, pre_logits=True), model.encoder(images, pre_logits=True))  # class token
