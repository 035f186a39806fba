"""`make demo`: the whole pipeline on real data, on this machine's CPU.

1. scikit-learn's bundled digits (1,797 scanned handwritten digits, 8x8 grey levels) are written as 32 px PNG files
   into an image-folder tree, one folder per digit;
2. `build-shards` turns the tree into WebDataset shards with a held-out 20% `val` split;
3. `deepspeed --num_gpus 2 pretrain/run.py --config configs/demo_digits.json` trains the configured small ViT on
   two CPU ranks (ZeRO-2, bf16) and evaluates it;
4. `convert-checkpoint` exports the checkpoint as a transformers folder without its classifier, and `vit-finetune
   --config configs/finetune/demo_digits.json` fine-tunes it at 48 px with the paper's recipe (SGD, a new
   zero-initialised head, position embeddings resized);
5. `vit-analyze` draws the paper's pictures of the pre-trained model (filters, position similarity, attention
   distance, rollout) and its training curves into runs/demo_digits/analysis;
6. both held-out top-1 accuracies and where the models and pictures are are printed.

Steps 1 and 2 are skipped when their output exists; training resumes from the newest checkpoint (`--resume auto`),
so an interrupted demo picks up where it stopped and a finished one only re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from data_pipeline.build.builder import BuildOptions, build
from data_pipeline.commands import help_description, reports_user_errors
from pretrain.config import load_config
from pretrain.demos.launch import train
from pretrain.evaluate.analyze import main as analyze
from pretrain.train.checkpoint import read_latest
from pretrain.train.metrics import read_metrics
from pretrain.weights.convert import main as convert

TARGET_TOP1 = 0.95
VAL_FRACTION = 0.2


def write_digits(folder: Path, size: int = 32) -> int:
    """The digits as dark ink on white, scaled from 8x8 to `size` px; returns the number of images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        ink = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(ink, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{n:04d}.png")
    return len(digits.images)


def digit_shards(images: Path, shards: Path, image_size: int, seed: int, labels: bool = True) -> None:
    """Write the digits as PNG files (once) and build shards with a 20% val split from them (once)."""
    if (shards / "index.json").exists():
        return
    if not images.exists():
        print(f"writing scikit-learn's digits to {images}: {write_digits(images, image_size)} images")
    build(
        BuildOptions(
            input=str(images),
            output=str(shards),
            val_fraction=VAL_FRACTION,
            max_samples_per_shard=250,
            workers=2,
            seed=seed,
            no_labels=not labels,
        )
    )
    print(f"shards{'' if labels else ' without labels'} in {shards}")


def first_record(run_dir: Path, kind: str) -> dict:
    return read_metrics(run_dir, kind)[0]


def last_record(run_dir: Path, kind: str) -> dict:
    return read_metrics(run_dir, kind)[-1]


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--config", default="configs/demo_digits.json", help="JSON run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks to train on")
    parser.add_argument(
        "--finetune-config",
        default="configs/finetune/demo_digits.json",
        help="vit-finetune config for the exported model",
    )
    parser.add_argument("--finetune-steps", default=None, help="override the fine-tuning steps (for quick checks)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    shards = Path(config.data.train).parent
    digit_shards(shards.parent / "images", shards, config.model.image_size, config.run.seed)
    train(args.config, args.overrides, args.ranks)

    run_dir, checkpoints = Path(config.run_dir), Path(config.checkpoint_dir)
    final = last_record(run_dir, "eval")
    latest = read_latest(LocalFileSystem(), str(checkpoints))
    print(
        f"held-out top-1 {final['top1']:.4f} on {final['images']:.0f} images (target {TARGET_TOP1}); "
        f"checkpoint {checkpoints / latest}",
        flush=True,
    )

    exported = run_dir / "exported" / "hf"
    if convert([str(checkpoints), "--to", "hf", "--out", str(exported)]) != 0:
        return 2
    tuning = [
        "--config",
        args.finetune_config,
        "--model",
        str(exported),
        "--train",
        config.data.train,
        "--out",
        str(run_dir / "finetuned"),
    ]
    if args.finetune_steps:
        tuning += ["--steps", args.finetune_steps, "--warmup-steps", "1"]
    print("$ vit-finetune " + " ".join(tuning), flush=True)
    code = subprocess.call([sys.executable, "-m", "pretrain.finetune.loop", *tuning])
    if code != 0:
        return code
    tuned = json.loads((run_dir / "finetuned" / "results.json").read_text())
    analysis = run_dir / "analysis"
    if (
        analyze(
            [
                "--checkpoint",
                str(checkpoints),
                "--images",
                config.data.train,
                "--out",
                str(analysis),
                "--metrics",
                str(run_dir / "metrics.jsonl"),
            ]
        )
        != 0
    ):
        return 2
    print(
        f"pre-trained at {config.model.image_size} px: held-out top-1 {final['top1']:.4f}; fine-tuned at "
        f"{tuned['config']['image_size']} px: held-out top-1 {tuned['top1']:.4f} (transformers model in "
        f"{run_dir / 'finetuned'}; pictures in {analysis})"
    )
    return 0 if final["top1"] >= TARGET_TOP1 and tuned["top1"] >= TARGET_TOP1 else 1


if __name__ == "__main__":
    sys.exit(main())
