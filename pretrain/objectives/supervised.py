"""The supervised objective: softmax cross-entropy (optionally label-smoothed) or, for multi-label data such as JFT,
sigmoid cross-entropy summed over classes. Logits are cast to fp32 before the loss, whatever the training precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.config.schema import SupervisedObjective


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, objective: SupervisedObjective) -> torch.Tensor:
    logits = logits.float()
    if objective.loss == "sigmoid":
        # sum over classes, mean over images (big_vision's sigmoid_xent): the loss does not shrink with K
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=objective.label_smoothing)


def correct_counts(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                   multi_label: bool) -> dict[str, float]:
    """Sums over the valid images of a batch: top-1 and top-5 hits (single-label) or precision@1 (multi-label)."""
    valid = valid.to(logits.device)
    if multi_label:
        top = logits.argmax(-1)
        hit = labels.to(logits.device).gather(1, top[:, None])[:, 0] > 0
        return {"precision@1": float((hit & valid).sum()), "images": float(valid.sum())}
    labels = labels.to(logits.device)
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top5 == labels[:, None]
    return {"top1": float((hits[:, 0] & valid).sum()), "top5": float((hits.any(-1) & valid).sum()),
            "images": float(valid.sum())}
