"""`vit-analyze --checkpoint PATH --images SHARDS_OR_FOLDER --out DIR`: the paper's pictures of what a ViT learned.

For a trainer checkpoint, a converted transformers / timm / native folder (read by the converter):
- `embedding_filters.png`: the first 28 principal components of the RGB patch-embedding filters (paper Fig. 7 left);
- `position_similarity.png`: cosine similarity of each patch's position embedding with every other's, a grid of
  grids (Fig. 7 centre);
- `attention_distance.png`: mean attention distance in pixels of every head of every layer over a sample of images,
  against depth (Fig. 7 right);
- `attention_rollout.png`: images with the class token's rollout attention over them (Fig. 6);
- `curves.png`: loss, learning rate, images/s and evaluation metrics from the run's `metrics.jsonl`;
- `summary.json`: the numbers behind them.

Attention weights are recomputed from the blocks' own layers (the model runs fused attention, which returns none).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.commands import add_storage_option, help_description, reports_user_errors, storage_options
from pretrain.model import VisionTransformer, model_input
from pretrain.weights.model_weights import WeightsError
from pretrain.weights.surgery import check_weights

NUM_COMPONENTS = 28


# -- the numbers ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention probabilities, (B, heads, T, T) each, for model-input images (B, 3, H, W)."""
    patches, grid = model.embed(images)
    x = model.add_positions(patches, grid)
    maps = []
    for block in model.blocks:
        attention = block.attn
        batch, tokens, _ = x.shape
        qkv = attention.qkv(block.norm1(x)).reshape(batch, tokens, 3, attention.num_heads, attention.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        maps.append(((q @ k.transpose(-2, -1)) / math.sqrt(attention.head_dim)).softmax(-1))
        x = block(x)
    return maps


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of every pair of patches, (N, N)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], -1).double() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(
    attention: torch.Tensor, grid: tuple[int, int], patch_size: int, prefix_tokens: int
) -> torch.Tensor:
    """Per head, the attention-weighted distance in pixels from each patch query to the patches it attends to,
    averaged over queries and images: (B, heads, T, T) -> (heads,). Attention onto the class token has no place
    in the image, so each query's weights over the patches are renormalised to sum to 1."""
    weights = attention[:, :, prefix_tokens:, prefix_tokens:].double()
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights * patch_distances(grid, patch_size)).sum(-1).mean(dim=(0, 2))


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Rollout (Abnar and Zuidema): per layer the heads' mean attention plus the identity for the residual path,
    rows renormalised, multiplied from the first layer up. (heads, T, T) per layer -> (T, T)."""
    rollout = torch.eye(maps[0].shape[-1], dtype=torch.float64)
    for attention in maps:
        mixed = attention.double().mean(0) + torch.eye(attention.shape[-1], dtype=torch.float64)
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    return rollout


def position_similarity(table: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of position embeddings, (N, D) -> (N, N)."""
    unit = torch.nn.functional.normalize(table.double(), dim=-1)
    return unit @ unit.T


def filter_components(weight: torch.Tensor, count: int = NUM_COMPONENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of the patch-embedding filters (D, 3, P, P): (count, 3, P, P) and the share of the
    variance each explains."""
    flat = weight.double().flatten(1)
    flat = flat - flat.mean(0)
    _, singular, components = torch.linalg.svd(flat, full_matrices=False)
    count = min(count, components.shape[0])
    explained = singular**2 / (singular**2).sum()
    return components[:count].reshape(count, *weight.shape[1:]), explained[:count]


# -- inputs --------------------------------------------------------------------------------------------------------


def load_model(source: str, storage_options: dict[str, Any]) -> VisionTransformer:
    from pretrain.weights.formats import read_weights  # here: importing DeepSpeed announces the accelerator

    weights = read_weights(source, storage_options)
    check_weights(weights, source)  # mismatched tensors: the converter's one-line error, not load_state_dict's dump
    model = weights.model.build()
    model.load_state_dict(weights.state)
    return model.eval()


def sample_images(source: str, count: int, image_size: int, storage_options: dict[str, Any]) -> torch.Tensor:
    """Up to `count` uint8 images (B, 3, S, S): centre crops from shards (held-out split first) or from a folder."""
    from PIL import Image

    location = Path(source)
    if location.is_dir():
        files = sorted(p for p in location.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not files:
            raise WeightsError(f"{source}: no images (jpg, png, webp) in this folder")
        pictures = []
        for path in files[:count]:
            image = Image.open(path).convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            pictures.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        return torch.stack(pictures)
    from data_pipeline import make_loader
    from data_pipeline.load.shardlist import SourceError

    def loader(split: str) -> Any:
        return make_loader(
            source,
            batch_size=min(count, 64),
            num_workers=0,
            train=False,
            image_size=image_size,
            storage_options=storage_options,
            split=split,
            labels=False,
        )

    try:
        batches_of = loader("val")
    except SourceError:  # an index without a held-out split, or plain shards
        batches_of = loader("train")
    batches, taken = [], 0
    for batch in batches_of:
        valid = batch["image"][batch["valid"]]
        batches.append(valid[: count - taken])
        taken += len(batches[-1])
        if taken >= count:
            break
    return torch.cat(batches)


def read_curves(metrics: Path) -> dict[str, list[dict[str, Any]]]:
    """A run's metrics.jsonl records by kind (train, eval, ...)."""
    from pretrain.train.metrics import read_metrics  # here: importing DeepSpeed announces the accelerator

    records: dict[str, list[dict[str, Any]]] = {}
    for record in read_metrics(metrics.parent):
        records.setdefault(record.get("kind", "train"), []).append(record)
    return records


# -- pictures ------------------------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, size: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    return figure, axes


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_filters(components: torch.Tensor, path: Path) -> None:
    figure, axes = _figure(4, 7, 1.2)
    for axis, component in zip(axes.flat, components, strict=False):
        scaled = (component - component.min()) / (component.max() - component.min() + 1e-12)
        axis.imshow(scaled.permute(1, 2, 0).numpy(), interpolation="nearest")
    figure.suptitle("principal components of the RGB patch-embedding filters")
    _save(figure, path)


def draw_position_similarity(similarity: torch.Tensor, grid: tuple[int, int], path: Path) -> None:
    rows, cols = grid
    figure, axes = _figure(rows, cols, 0.6 if rows > 8 else 1.0)
    for index, axis in enumerate(axes.flat):
        axis.imshow(similarity[index].reshape(rows, cols).numpy(), vmin=-1, vmax=1, cmap="viridis")
    figure.suptitle("position embedding similarity (cosine), one small grid per patch")
    _save(figure, path)


def draw_attention_distance(distances: torch.Tensor, path: Path) -> None:
    figure, axes = _figure(1, 1, 4.0)
    axis = axes[0, 0]
    depth = torch.arange(1, distances.shape[0] + 1)
    for head in range(distances.shape[1]):
        axis.scatter(depth, distances[:, head], s=12)
    axis.set_xticks(depth.tolist())
    axis.set_yticks(np.linspace(0, float(distances.max()) or 1, 5).round(1).tolist())
    axis.set_xlabel("network depth (layer)")
    axis.set_ylabel("mean attention distance (pixels)")
    _save(figure, path)


def draw_rollout(images: torch.Tensor, masks: list[torch.Tensor], path: Path) -> None:
    figure, axes = _figure(2, len(masks), 1.8)
    for column, (image, mask) in enumerate(zip(images, masks, strict=True)):
        axes[0, column].imshow(image.permute(1, 2, 0).numpy())
        upsampled = torch.nn.functional.interpolate(mask[None, None].float(), size=image.shape[-2:], mode="bilinear")
        axes[1, column].imshow(image.permute(1, 2, 0).numpy())
        axes[1, column].imshow(upsampled[0, 0].numpy(), alpha=0.6, cmap="inferno")
    figure.suptitle("attention rollout from the class token")
    _save(figure, path)


def draw_curves(records: dict[str, list[dict[str, Any]]], path: Path) -> None:
    train = records.get("train", [])
    evaluation = records.get("eval", [])
    panels = [("loss", train, "loss"), ("learning rate", train, "lr"), ("images/s", train, "images_per_s")]
    panels += [
        (f"eval {name}", evaluation, name) for name in ("top1", "mpp_accuracy") if evaluation and name in evaluation[-1]
    ]
    figure, axes = _figure(1, len(panels), 3.0)
    for axis, (title, series, name) in zip(axes.flat, panels, strict=True):
        steps = [r["step"] for r in series if r.get(name) is not None]
        values = [r[name] for r in series if r.get(name) is not None]
        axis.plot(steps, values)
        axis.set_title(title)
        axis.set_xticks(np.linspace(0, max(steps or [1]), 3).round().tolist())
        axis.set_yticks(np.linspace(min(values or [0]), max(values or [1]), 3).tolist())
        axis.tick_params(labelsize=7)
    _save(figure, path)


# -- command line --------------------------------------------------------------------------------------------------


def analyze(
    model: VisionTransformer, images: torch.Tensor, out: Path, metrics: Path | None, rollout_images: int = 6
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    patch_size, prefix = model.patch_size, model.num_prefix_tokens
    filters = model.patch_embed.proj.weight.detach()
    if filters.shape[1] == 3:  # a hybrid's patch embedding reads ResNet features, not RGB pixels
        components, explained = filter_components(filters)
        draw_filters(components, out / "embedding_filters.png")
        summary["filter_variance_explained"] = explained.tolist()
    grid = model.grid_size
    table = model.position_embeddings(grid)[0, prefix:].detach()
    similarity = position_similarity(table)
    draw_position_similarity(similarity, grid, out / "position_similarity.png")
    summary["position_similarity_self_is_row_max"] = float(
        (similarity.argmax(-1) == torch.arange(len(table))).double().mean()
    )
    maps = attention_maps(model, model_input(images))
    distances = torch.stack([mean_attention_distance(a, grid, patch_size, prefix) for a in maps])
    draw_attention_distance(distances, out / "attention_distance.png")
    summary["mean_attention_distance_px"] = distances.tolist()
    if prefix:
        shown = images[:rollout_images]
        masks = []
        for n in range(len(shown)):
            rollout = attention_rollout([a[n] for a in maps])[0, prefix:]
            masks.append((rollout / rollout.max()).reshape(grid))
        draw_rollout(shown, masks, out / "attention_rollout.png")
    if metrics is not None and metrics.exists():
        draw_curves(read_curves(metrics), out / "curves.png")
    summary["images"] = len(images)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-analyze", description=help_description(__doc__))
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="trainer checkpoint folder (or step folder), or a converted transformers / timm / native weights folder",
    )
    parser.add_argument("--images", required=True, help="shards (index.json or brace pattern) or a folder of images")
    parser.add_argument("--out", required=True, help="folder for the PNG files and summary.json")
    parser.add_argument("--num-images", type=int, default=64, help="images for the attention distances")
    parser.add_argument(
        "--metrics",
        default=None,
        help="a run's metrics.jsonl for curves.png (default: the one "
        "beside a local trainer checkpoint folder, if there is one)",
    )
    add_storage_option(parser, "s3:// inputs")
    args = parser.parse_args(argv)
    options = storage_options(args)
    model = load_model(args.checkpoint, options)
    images = sample_images(args.images, args.num_images, model.grid_size[0] * model.patch_size, options)
    metrics = Path(args.metrics) if args.metrics else Path(args.checkpoint).parent / "metrics.jsonl"
    summary = analyze(model, images, Path(args.out), metrics)
    last = summary["mean_attention_distance_px"][-1]
    print(
        f"{args.out}: figures and summary.json from {summary['images']} images; last layer's mean attention "
        f"distance {min(last):.1f}-{max(last):.1f} px over its heads"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
