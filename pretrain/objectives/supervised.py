"""The supervised objective: softmax cross-entropy (optionally label-smoothed) or, for multi-label data such as JFT,
sigmoid cross-entropy summed over classes. Logits are cast to fp32 before the loss, whatever the training precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.commands import UserError
from data_pipeline.load.shardlist import ShardList
from pretrain.config.schema import SupervisedObjective
from pretrain.model.flops import classifier_flops
from pretrain.model.vit import VisionTransformer


class ObjectiveError(UserError):
    """The data does not fit the objective; the message names the config field to change."""


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, objective: SupervisedObjective) -> torch.Tensor:
    logits = logits.float()
    if objective.loss == "sigmoid":
        # sum over classes, mean over images (big_vision's sigmoid_xent): the loss does not shrink with K
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=objective.label_smoothing)


def correct_counts(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, multi_label: bool
) -> dict[str, float]:
    """Sums over the valid images of a batch: top-1 and top-5 hits (single-label) or precision@1 (multi-label)."""
    valid = valid.to(logits.device)
    if multi_label:
        top = logits.argmax(-1)
        hit = labels.to(logits.device).gather(1, top[:, None])[:, 0] > 0
        return {"precision@1": float((hit & valid).sum()), "images": float(valid.sum())}
    labels = labels.to(logits.device)
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top5 == labels[:, None]
    return {
        "top1": float((hits[:, 0] & valid).sum()),
        "top5": float((hits.any(-1) & valid).sum()),
        "images": float(valid.sum()),
    }


class SupervisedTask:
    """What the trainer needs from this objective: the model as it is, the loss on labels, and top-k sums."""

    labels = True

    def __init__(self, objective: SupervisedObjective, num_classes: int):
        self.objective = objective
        self.num_classes = num_classes

    def wrap(self, model: VisionTransformer) -> nn.Module:
        return model

    def head_outputs_per_image(self, model: VisionTransformer) -> int:
        """The classifier's logits."""
        return model.num_classes

    def head_flops_per_image(self, model: VisionTransformer) -> int:
        """The representation layer's and the classifier's forward FLOPs."""
        return classifier_flops(model)

    def check_shards(self, shards: ShardList, source: str) -> None:
        if not shards.labelled:
            raise ObjectiveError(
                f"{source}: the shards carry no labels; the supervised objective needs them (or "
                "use objective.type masked_patch_prediction)"
            )
        if shards.num_classes is not None and shards.num_classes != self.num_classes:
            raise ObjectiveError(
                f"model.num_classes is {self.num_classes} but {source} has {shards.num_classes} "
                f"classes; set model.num_classes to {shards.num_classes}"
            )
        if shards.multi_label != (self.objective.loss == "sigmoid"):
            want = "sigmoid" if shards.multi_label else "softmax"
            raise ObjectiveError(
                f"objective.loss is {self.objective.loss} but the shards are "
                f"{'multi' if shards.multi_label else 'single'}-label; use {want}"
            )

    def loss(self, engine: nn.Module, images: torch.Tensor, raw: torch.Tensor, batch: dict) -> torch.Tensor:
        return supervised_loss(engine(images), batch["label"].to(images.device), self.objective)

    def eval_sums(
        self, engine: nn.Module, images: torch.Tensor, raw: torch.Tensor, batch: dict, generator: torch.Generator
    ) -> dict[str, float]:
        multi_label = batch["label"].ndim == 2
        return correct_counts(engine(images).float(), batch["label"], batch["valid"], multi_label)
