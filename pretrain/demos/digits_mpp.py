"""`make demo-mpp`: masked patch prediction without labels, then fine-tuning with 10% of the labels, on the CPU.

1. scikit-learn's digits become PNG files (shared with `make demo`) and two sets of shards: the whole corpus
   *without labels* (its 80% train split for pre-training), and a stratified 10% of the training images *with*
   labels, for fine-tuning. The held-out 20% (`val`, chosen by a hash of each key, as in `make demo`) is never
   trained on;
2. `configs/demo_digits_mpp.json` pre-trains the demo's small ViT by masked patch prediction on two CPU ranks; every
   100 steps the frozen representation is probed by few-shot linear regression on the labelled digits;
3. `configs/demo_digits_finetune.json` fine-tunes on the 10% from the pre-trained weights (`model.init_from`), and
   the same recipe runs again from a random initialisation;
4. the few-shot accuracies and both held-out top-1 accuracies are printed.

Shards are built once; each training run resumes from its newest checkpoint, so a finished demo only re-evaluates.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from data_pipeline.build.plan import split_of
from data_pipeline.build.sources import row_key
from data_pipeline.commands import help_description, reports_user_errors
from pretrain.config import load_config
from pretrain.demos.digits import VAL_FRACTION, digit_shards, first_record, last_record
from pretrain.demos.launch import manifest_shards, train

LABELLED_SHARE = 0.1


def labelled_subset(images: Path, shards: Path, share: float, seed: int) -> int:
    """Shards of `share` of every class's training-split images, with labels; returns the number of images."""
    by_class = defaultdict(list)
    for path in sorted(images.glob("*/*.png")):
        relative = path.relative_to(images).as_posix()
        if split_of(row_key(relative), VAL_FRACTION) == "train":  # the key build-shards gave it in the full set
            by_class[path.parent.name].append(path)
    rows = [
        (str(path.resolve()), label)
        for label, paths in sorted(by_class.items())
        for path in paths[: max(1, round(share * len(paths)))]
    ]
    return manifest_shards(rows, shards, max_samples_per_shard=250, workers=2, seed=seed)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--pretrain-config", default="configs/demo_digits_mpp.json")
    parser.add_argument("--finetune-config", default="configs/demo_digits_finetune.json")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks to train on")
    args = parser.parse_args(argv)
    pretrain = load_config(args.pretrain_config)
    finetune = load_config(args.finetune_config)
    scratch = ["model.init_from=null", f"run.name={finetune.run.name}_scratch"]
    from_scratch = load_config(args.finetune_config, scratch)

    labelled = Path(pretrain.fewshot.datasets["digits"].train).parent
    images = labelled.parent / "images"
    digit_shards(images, labelled, pretrain.model.image_size, pretrain.run.seed)
    digit_shards(images, Path(pretrain.data.train).parent, pretrain.model.image_size, pretrain.run.seed, labels=False)
    subset = Path(finetune.data.train).parent
    if not (subset / "index.json").exists():
        count = labelled_subset(images, subset, LABELLED_SHARE, finetune.run.seed)
        print(f"{count} labelled training images ({LABELLED_SHARE:.0%} of each class) in {subset}")

    runs = {
        name: Path(config.run_dir)
        for name, config in (("pretrain", pretrain), ("finetune", finetune), ("scratch", from_scratch))
    }
    train(args.pretrain_config, [], args.ranks)
    train(args.finetune_config, [], args.ranks)
    train(args.finetune_config, scratch, args.ranks)

    mpp = last_record(runs["pretrain"], "eval")
    tuned, baseline = last_record(runs["finetune"], "eval"), last_record(runs["scratch"], "eval")
    print(f"masked patch prediction, step {mpp['step']}: held-out mean-colour accuracy {mpp['mpp_accuracy']:.4f}")
    for probes in (first_record(runs["pretrain"], "fewshot"), last_record(runs["pretrain"], "fewshot")):
        print(
            f"few-shot top-1 of the frozen representation at step {probes['step']}: "
            + ", ".join(
                f"{name.split('/')[-1]} {value:.4f}" for name, value in probes.items() if name.startswith("digits/")
            )
        )
    print(
        f"fine-tuned on {LABELLED_SHARE:.0%} of the labels: held-out top-1 {tuned['top1']:.4f} from masked patch "
        f"prediction, {baseline['top1']:.4f} from scratch ({tuned['images']:.0f} images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
