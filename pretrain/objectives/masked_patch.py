"""Masked patch prediction, the paper's self-supervised objective (Section 4.6, Appendix B.1.2).

Per image, `mask_ratio` of the patch embeddings are corrupted before the position embeddings are added: of those,
`mask_token_prob` become a learnable [mask] embedding, `random_patch_prob` become the embedding of another patch of
the same image, and the rest stay unchanged. A linear head on each corrupted patch's output representation predicts
a target computed from the augmented uint8 image (before normalisation):

- "mean_color": the patch's mean colour, each channel quantised to 2^color_bits levels (3 bits: 512 classes);
- "downsampled_color": the patch average-pooled to 4x4, each cell quantised the same way (16 predictions);
- "pixels": all the patch's pixels in the model's input range [-1, 1], regressed with L2.

Every image gets the same number of corrupted patches, so all shapes are static (no host-device sync on a GPU).
The class token is not used by the loss, so with `pool: token` its output is untrained (it came out the same for
every image in an early digits run): the image representation for few-shot probes is the mean of the patch outputs
(`VisionTransformer.patch_representation`), whatever the pooling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero import register_external_parameter
from torch import nn

from pretrain.config.schema import MaskedPatchObjective
from pretrain.model.init import Dense
from pretrain.model.vit import VisionTransformer, model_input

MASK, RANDOM, KEEP = 0, 1, 2
"""What happens to a corrupted patch: replaced by the [mask] embedding, by another patch, or kept as it is."""
DOWNSAMPLED_GRID = 4


class Corruption(NamedTuple):
    positions: torch.Tensor
    """(B, k) patch indices (row-major over the grid) that are corrupted; the loss covers exactly these."""
    kind: torch.Tensor
    """(B, k) MASK, RANDOM or KEEP for each corrupted patch."""
    source: torch.Tensor
    """(B, k) index of the other patch whose embedding a RANDOM patch receives (never the patch itself)."""


def num_corrupted(num_patches: int, mask_ratio: float) -> int:
    return min(num_patches, max(1, round(mask_ratio * num_patches)))


def sample_corruption(
    batch: int,
    num_patches: int,
    objective: MaskedPatchObjective,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Corruption:
    """Draw which patches of each image are corrupted and how; `generator` (on `device`) makes it reproducible."""
    k = num_corrupted(num_patches, objective.mask_ratio)
    scores = torch.rand(batch, num_patches, device=device, generator=generator)
    positions = scores.argsort(dim=1)[:, :k]  # a uniformly random k-subset per image
    draw = torch.rand(batch, k, device=device, generator=generator)
    kind = torch.full_like(positions, KEEP)
    kind[draw < objective.mask_token_prob + objective.random_patch_prob] = RANDOM
    kind[draw < objective.mask_token_prob] = MASK
    # a shift of 1..N-1 around the grid: uniform over the other patches of the same image
    shift = torch.randint(1, max(num_patches, 2), (batch, k), device=device, generator=generator)
    source = (positions + shift) % num_patches
    return Corruption(positions, kind, source)


def corrupt(patches: torch.Tensor, corruption: Corruption, mask_token: torch.Tensor) -> torch.Tensor:
    """Patch embeddings (B, N, D) with the corrupted positions replaced; gradients flow to `mask_token`."""
    width = patches.shape[-1]
    index = corruption.positions[..., None].expand(-1, -1, width)
    chosen = patches.gather(1, index)
    other = patches.gather(1, corruption.source[..., None].expand(-1, -1, width))
    kind = corruption.kind[..., None]
    replaced = torch.where(
        kind == MASK, mask_token.to(patches.dtype).expand_as(chosen), torch.where(kind == RANDOM, other, chosen)
    )
    return patches.scatter(1, index, replaced)


def image_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, P, P), patches in the row-major grid order of the patch embedding."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    grid = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels, patch_size, patch_size)


def quantised_colour(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 3) channel values in [0, 255] -> colour class r * L^2 + g * L + b with L = 2^bits levels per channel."""
    levels = 2**bits
    quantised = (values * (levels / 256.0)).floor().long().clamp_(0, levels - 1)
    return (quantised[..., 0] * levels + quantised[..., 1]) * levels + quantised[..., 2]


def patch_targets(images: torch.Tensor, patch_size: int, objective: MaskedPatchObjective) -> torch.Tensor:
    """Targets for every patch of uint8 images (B, 3, H, W): colour classes (B, N) or (B, N, 16), or pixels
    (B, N, 3 * P * P) flattened channel-major."""
    patches = image_patches(images.float(), patch_size)  # (B, N, 3, P, P) in [0, 255]
    if objective.target == "mean_color":
        return quantised_colour(patches.mean(dim=(-2, -1)), objective.color_bits)
    if objective.target == "downsampled_color":
        batch, num, channels = patches.shape[:3]
        # adaptive pooling also covers patch sizes 4 does not divide (14): cells then overlap by a pixel
        cells = F.adaptive_avg_pool2d(patches.reshape(batch * num, channels, patch_size, patch_size), DOWNSAMPLED_GRID)
        cells = cells.reshape(batch, num, channels, DOWNSAMPLED_GRID**2).transpose(-1, -2)  # (B, N, 16, 3)
        return quantised_colour(cells, objective.color_bits)
    return model_input(patches).flatten(2)


def prediction_size(objective: MaskedPatchObjective, patch_size: int, channels: int = 3) -> int:
    colours = 2 ** (3 * objective.color_bits)
    if objective.target == "mean_color":
        return colours
    if objective.target == "downsampled_color":
        return DOWNSAMPLED_GRID**2 * colours
    return channels * patch_size * patch_size


def masked_patch_loss(
    predictions: torch.Tensor, targets: torch.Tensor, objective: MaskedPatchObjective
) -> torch.Tensor:
    """Per-image loss (B,) from head outputs (B, k, out) and the targets of the corrupted patches, in fp32.

    Cross-entropy (averaged over the 16 cells for downsampled_color) or the mean squared error per pixel value.
    """
    predictions = predictions.float()
    if objective.target == "pixels":
        return (predictions - targets.float()).square().flatten(1).mean(dim=1)
    batch = predictions.shape[0]
    logits = predictions.reshape(*targets.shape, -1)  # (B, k, C) or (B, k, 16, C)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.reshape(batch, -1).mean(dim=1)


def corrupted_targets(targets: torch.Tensor, corruption: Corruption) -> torch.Tensor:
    """Pick the corrupted positions out of per-patch targets (B, N, ...) -> (B, k, ...)."""
    index = corruption.positions.reshape(*corruption.positions.shape, *([1] * (targets.ndim - 2)))
    return targets.gather(1, index.expand(-1, -1, *targets.shape[2:]))


class MaskedPatchModel(nn.Module):
    """A ViT encoder with a learnable [mask] embedding and a per-patch prediction head.

    `forward(images, positions, kind, source)` returns the head's outputs (B, k, out) at the corrupted positions;
    `forward(images, pre_logits=True)` returns the encoder's image representation for few-shot probes: the mean of
    its patch outputs, since no loss reads the class token. The corruption travels as three tensors rather than a
    tuple so that DeepSpeed's hooks see plain tensor arguments.
    """

    def __init__(self, encoder: VisionTransformer, objective: MaskedPatchObjective):
        super().__init__()
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.empty(1, 1, encoder.width))
        nn.init.normal_(self.mask_token, std=0.02)  # like the position embeddings it is added to
        # zero kernel as for the classifier: every target starts equally likely (or at mid-grey for pixels)
        self.head = Dense(encoder.width, prediction_size(objective, encoder.patch_size), kernel="zeros")
        # This forward uses the encoder's own tensors (class token, position table) without calling the encoder
        # itself, so ZeRO-3 must gather them for this module's forward (a no-op at other stages).
        for parameter in encoder.parameters(recurse=False):
            register_external_parameter(self, parameter)

    def no_weight_decay(self) -> set[str]:
        skip = {"mask_token", "head.bias"}
        return skip | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        self.encoder.set_grad_checkpointing(enable, every)

    def forward(
        self,
        images: torch.Tensor,
        positions: torch.Tensor | None = None,
        kind: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
        pre_logits: bool = False,
    ) -> torch.Tensor:
        if pre_logits or positions is None or kind is None or source is None:
            return self.encoder.patch_representation(images)
        corruption = Corruption(positions, kind, source)
        encoder = self.encoder
        patches, grid = encoder.embed(images)
        tokens = encoder.encode(encoder.add_positions(corrupt(patches, corruption, self.mask_token), grid))
        outputs = tokens[:, encoder.num_prefix_tokens :]
        outputs = outputs.gather(1, corruption.positions[..., None].expand(-1, -1, outputs.shape[-1]))
        return self.head(outputs)


class MaskedPatchTask:
    """What the trainer needs from this objective: the model wrapper, the training loss and evaluation sums."""

    labels = False  # the loader ignores any labels in the shards

    def __init__(self, objective: MaskedPatchObjective, patch_size: int):
        self.objective = objective
        self.patch_size = patch_size

    def wrap(self, encoder: VisionTransformer) -> MaskedPatchModel:
        return MaskedPatchModel(encoder, self.objective)

    def head_outputs_per_image(self, encoder: VisionTransformer) -> int:
        """The prediction head's outputs: it reads only the corrupted patches' outputs, and the encoder's classifier,
        if any, never runs."""
        patches = encoder.grid_size[0] * encoder.grid_size[1]
        return num_corrupted(patches, self.objective.mask_ratio) * prediction_size(self.objective, encoder.patch_size)

    def head_flops_per_image(self, encoder: VisionTransformer) -> int:
        """2 x width x the head's outputs (its bias adds not counted): beside the encoder, small with the paper's mean
        colour at B/16 and 224 px (77 MFLOP against 35 GFLOP), not with the 4x4 target at a small width (67 against
        116 MFLOP per image for make experiment-mpp's model)."""
        return 2 * encoder.width * self.head_outputs_per_image(encoder)

    def check_shards(self, shards: object, source: str) -> None:
        """Any shards will do: labels, if there are any, are not read."""

    def _losses(
        self, engine: nn.Module, images: torch.Tensor, raw: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patch_size = self.patch_size
        num_patches = (raw.shape[-2] // patch_size) * (raw.shape[-1] // patch_size)
        corruption = sample_corruption(raw.shape[0], num_patches, self.objective, raw.device, generator)
        predictions = engine(images, *corruption)
        targets = corrupted_targets(patch_targets(raw, patch_size, self.objective), corruption)
        return masked_patch_loss(predictions, targets, self.objective), predictions, targets

    def loss(self, engine: nn.Module, images: torch.Tensor, raw: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean loss over the micro-batch; the corruption is drawn from the device's global generator, whose state
        every checkpoint saves, so a resumed run draws the same masks."""
        return self._losses(engine, images, raw, None)[0].mean()

    def eval_sums(
        self, engine: nn.Module, images: torch.Tensor, raw: torch.Tensor, batch: dict, generator: torch.Generator
    ) -> dict[str, float]:
        """Summed held-out loss (and target accuracy for colour targets) over the valid images of a batch."""
        losses, predictions, targets = self._losses(engine, images, raw, generator)
        valid = batch["valid"].to(losses.device)
        sums = {"mpp_loss": float((losses * valid).sum()), "images": float(valid.sum())}
        if self.objective.target != "pixels":
            hits = predictions.float().reshape(*targets.shape, -1).argmax(-1) == targets
            sums["mpp_accuracy"] = float((hits.flatten(1).float().mean(1) * valid).sum())
        return sums
