"""Few-shot linear evaluation (paper Section 4.1): frozen representations, closed-form ridge regression onto {-1, 1}^K.

For each shot count, `draws` seeded draws take that many training images per class; each feature is standardised
with the draw's mean and standard deviation (so the regularisation means the same whatever the features' scale), a
linear map W = (X^T X + l2 I)^-1 X^T Y onto targets Y in {-1, 1}^K is solved in closed form (with the draw's mean
target as the unregularised bias), and the top-1 accuracy of argmax(XW + b) on the test images is averaged over
draws. L2 regularisation 2^10 is the default of the paper's public implementation, which standardises likewise.

The representation is the model's pre-logits: the representation layer's output when there is one, otherwise the
pooled output (class token or global average pool). A masked-patch model's is the mean of its encoder's patch
outputs, whatever the pooling: its loss trains neither the class token's output nor a representation layer.

`python -m pretrain.evaluate.fewshot --checkpoint runs/x/checkpoints --train SHARDS --test SHARDS` probes a
checkpoint; the trainer runs the same probes every `fewshot.every_steps` on the datasets its config names.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline import make_loader
from data_pipeline.commands import (
    add_storage_option,
    configure_logging,
    help_description,
    reports_user_errors,
    storage_options,
)
from data_pipeline.load.shardlist import SourceError

log = logging.getLogger(__name__)

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2 = 2.0**10
STD_EPSILON = 1e-5
"""Added to each feature's standard deviation: a feature constant over the draw (always so with one shot of a
dead unit) is then zero, not a division by zero."""


@dataclass
class Features:
    """Frozen representations of one split, sorted by sample key (so the draws do not depend on world size)."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


@dataclass
class RidgeProbe:
    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return (features.double() - self.mean) / self.std @ self.weights + self.bias


def fit_ridge(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = DEFAULT_L2) -> RidgeProbe:
    """Closed-form ridge regression of standardised features onto {-1, 1}^K targets, in float64."""
    x = features.double()
    targets = 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).double() - 1.0
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0) + STD_EPSILON
    x = (x - mean) / std
    samples, dims = x.shape
    if samples < dims:  # few shots: the equivalent n x n system X^T (X X^T + l2 I)^-1 Y is much smaller
        weights = x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(samples, dtype=x.dtype), targets)
    else:
        weights = torch.linalg.solve(x.T @ x + l2 * torch.eye(dims, dtype=x.dtype), x.T @ targets)
    return RidgeProbe(mean, std, weights, targets.mean(dim=0))


def draw_shots(labels: torch.Tensor, shots: int, num_classes: int, seed: int) -> torch.Tensor | None:
    """Indices of `shots` images per class, drawn with `seed`; None when some class has fewer images."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        members = (labels == label).nonzero()[:, 0]
        if len(members) < shots:
            return None
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen)


def fewshot_accuracy(
    train: Features,
    test: Features,
    num_classes: int,
    shots: Iterable[int] = DEFAULT_SHOTS,
    draws: int = 3,
    l2: float = DEFAULT_L2,
) -> dict[int, float]:
    """Mean top-1 on `test` per shot count; shot counts some class cannot supply are left out (and logged)."""
    results = {}
    for count in shots:
        accuracies = []
        for draw in range(draws):
            chosen = draw_shots(train.labels, count, num_classes, seed=1000 * count + draw)
            if chosen is None:
                log.warning("few-shot: some class has fewer than %d training images; skipping %d-shot", count, count)
                break
            probe = fit_ridge(train.features[chosen], train.labels[chosen], num_classes, l2)
            predicted = probe.scores(test.features).argmax(dim=1)
            accuracies.append(float((predicted == test.labels).double().mean()))
        if accuracies:
            results[count] = sum(accuracies) / len(accuracies)
    return results


@torch.no_grad()
def extract_features(represent: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict[str, Any]]) -> Features:
    """Representations of the valid images of `batches` (this rank's part), gathered from all ranks when running
    distributed; `represent` maps a uint8 image batch to (B, D) features."""
    features, labels, keys = [], [], []
    for batch in batches:
        valid = batch["valid"]
        features.append(represent(batch["image"]).float().cpu()[valid])
        labels.append(batch["label"][valid])
        keys += [key for key, ok in zip(batch["key"], valid.tolist(), strict=True) if ok]
    if not features:
        raise SourceError("few-shot: the loader delivered no batches (an empty split, or a loader already used)")
    part = (torch.cat(features), torch.cat(labels), keys)
    parts = [part]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    all_keys = [key for _, _, part_keys in parts for key in part_keys]
    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
    return Features(
        torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order], [all_keys[i] for i in order]
    )


def probe_batches(
    source: str,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    storage_options: dict[str, Any] | None = None,
    num_workers: int = 1,
) -> tuple[Any, int]:
    """A one-pass, centre-cropped loader over labelled single-label shards, and their number of classes."""
    loader = make_loader(
        source,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        train=False,
        image_size=image_size,
        storage_options=storage_options,
        split=split,
    )
    shards = loader.shards
    if not shards.labelled or shards.multi_label:
        raise SourceError(
            f"{source}: few-shot probes need single-label shards (these are "
            f"{'unlabelled' if not shards.labelled else 'multi-label'})"
        )
    if shards.num_classes is None:
        raise SourceError(f"{source}: no classes.json beside the shards; few-shot probes need the class count")
    return loader, shards.num_classes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate.fewshot", description=help_description(__doc__))
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="trainer checkpoint folder (its newest checkpoint) or one step-XXXXXXXX folder in it",
    )
    parser.add_argument(
        "--train", required=True, help="labelled shards to draw the shots from (index.json or brace pattern)"
    )
    parser.add_argument("--test", required=True, help="labelled held-out shards to score the probes on")
    parser.add_argument("--train-split", default="train", help="split of the --train index (default train)")
    parser.add_argument("--test-split", default="val", help="split of the --test index (default val)")
    parser.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS), help="images per class")
    parser.add_argument("--draws", type=int, default=3, help="seeded draws per shot count, averaged (default 3)")
    parser.add_argument("--l2", type=float, default=DEFAULT_L2, help="L2 regularisation (default 2^10)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    add_storage_option(parser, "an s3:// checkpoint and shards")
    return parser.parse_args(argv)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    from pretrain.model import model_input
    from pretrain.weights.surgery import check_weights
    from pretrain.weights.trainer_checkpoint import read_checkpoint, read_encoder_prefix

    args = parse_args(argv)
    configure_logging("%(message)s")
    options = storage_options(args)
    weights = read_checkpoint(args.checkpoint, options)
    check_weights(weights, args.checkpoint)  # the converter's one line, not load_state_dict's dump
    model = weights.model.build()
    model.load_state_dict(weights.state)
    model.eval()
    size = weights.model.image_size
    masked_patch = bool(read_encoder_prefix(args.checkpoint, options))  # its class token's output is untrained
    encode = model.patch_representation if masked_patch else functools.partial(model, pre_logits=True)
    represent = lambda images: encode(model_input(images))  # noqa: E731
    train_loader, num_classes = probe_batches(
        args.train, args.train_split, batch_size=args.batch_size, image_size=size, storage_options=options
    )
    test_loader, test_classes = probe_batches(
        args.test, args.test_split, batch_size=args.batch_size, image_size=size, storage_options=options
    )
    if test_classes != num_classes:
        raise SourceError(
            f"{args.test}: {test_classes} classes but {args.train} has {num_classes}; use the same class table for both"
        )
    train, test = extract_features(represent, train_loader), extract_features(represent, test_loader)
    results = fewshot_accuracy(train, test, num_classes, args.shots, args.draws, args.l2)
    for shots, accuracy in results.items():
        print(f"{shots:>3}-shot top-1 {accuracy:.4f}")
    print(
        f"({len(train.labels)} training and {len(test.labels)} test images, {num_classes} classes, "
        f"{args.draws} draws, l2 {args.l2:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
