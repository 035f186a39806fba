"""Debian's openclipart-png (8,121 PNG clip-art images in 22 category folders) as shards for learning experiments.

The corpus is public, made by nobody here, and installs anywhere Debian does; `corpus()` installs it when missing,
as the Slurm tests install Slurm. Three sets of shards come from it, all split by the same hash of each image's
path (`build-shards --val-fraction`), each distinct file counted once (the corpus has copies under several paths),
so no held-out image is ever trained on, with or without labels:

- `unlabelled`: every distinct image of the corpus, without labels; its `train` split is the pre-training data, its
  `val` split the held-out set of the pre-training loss;
- `labelled`: the categories with at least `MIN_CLASS_IMAGES` images, each capped at the smallest of them so the
  classes are balanced; `train` is what few-shot probes draw from and what supervised pre-training learns, `val` is
  the held-out set every accuracy is measured on;
- `labelled10`: `LABELLED_SHARE` of each class's `train` images, for fine-tuning with few labels.

Which images are capped and which make the 10% is fixed (seeded by `SELECTION_SEED`), not drawn per run: the
experiment's seeds vary the training, never the data.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.build.images import ImageOptions
from data_pipeline.build.plan import split_of
from data_pipeline.build.sources import row_key
from data_pipeline.commands import UserError
from pretrain.demos.launch import manifest_shards

CORPUS = Path("/usr/share/openclipart/png")
PACKAGE = "openclipart-png"
MIN_CLASS_IMAGES = 250
"""Categories with at least this many distinct, single-category files are the classes: 7 of the 22 (computer 1,672,
shapes, signs_and_symbols, recreation, people, food, animals 259). Next come transportation (170) and "unsorted"
(150), which is no category. Chosen (before any run on the deduplicated corpus) for a held-out set of about 350."""
VAL_FRACTION = 0.2
LABELLED_SHARE = 0.1
SELECTION_SEED = 0
MAX_SIDE = 72
"""Stored images' shorter side: the experiment's models see 64 px crops."""


@dataclass(frozen=True)
class Image:
    path: str
    """Absolute path: build-shards keys a manifest row by it, and so decides its split."""
    category: str | None
    """Its top-level folder; None when copies of the same file sit in several categories (no label to trust)."""


@dataclass(frozen=True)
class Shards:
    unlabelled: Path
    labelled: Path
    labelled10: Path


def corpus(root: Path = CORPUS) -> list[Image]:
    """Every distinct PNG of the corpus, once, with its category folder; installs the Debian package when missing.

    The corpus holds byte-identical copies under several paths (905 files have 2,126 copies, e.g. the same dolphin in
    animals/fish and animals/mammals). Split by path, a held-out image's copy would be trained on; so each file
    counts once, at its first path, and a file found in two categories has no label."""
    if root == CORPUS and not root.is_dir():
        install()
    copies: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.png")):
        if len(path.relative_to(root).parts) > 1:
            copies[hashlib.sha256(path.read_bytes()).hexdigest()].append(path)
    images = []
    for paths in copies.values():
        categories = {path.relative_to(root).parts[0] for path in paths}
        images.append(Image(str(paths[0]), categories.pop() if len(categories) == 1 else None))
    if not images:
        raise UserError(f"{root}: no PNG images in category folders; run apt-get install --reinstall {PACKAGE}")
    return images


def install() -> None:
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise UserError(
            f"{CORPUS} is missing and this process cannot install it: run apt-get install {PACKAGE} as root "
            "(Debian or Ubuntu), then run the experiment again"
        )
    print(f"installing {PACKAGE} (130 MB) with apt-get", flush=True)
    for command in ([apt, "update", "-q"], [apt, "install", "-y", "-q", PACKAGE]):
        if subprocess.call(command, stdout=subprocess.DEVNULL) != 0:
            raise UserError(f"{' '.join(command)} failed; install {PACKAGE} by hand and run the experiment again")


def split(image: Image) -> str:
    """The split build-shards gives the image's manifest row."""
    return split_of(row_key(image.path), VAL_FRACTION)


def labelled_images(images: list[Image], min_class_images: int = MIN_CLASS_IMAGES) -> list[Image]:
    """The balanced labelled set: the large categories, each cut to the size of the smallest by a fixed draw."""
    by_category: dict[str, list[Image]] = defaultdict(list)
    for image in images:
        if image.category is not None:
            by_category[image.category].append(image)
    large = {name: members for name, members in by_category.items() if len(members) >= min_class_images}
    cap = min(len(members) for members in large.values())
    chosen = []
    for name in sorted(large):
        chosen += random.Random(f"{SELECTION_SEED}/{name}").sample(large[name], cap)
    return chosen


def few_labels(labelled: list[Image]) -> list[Image]:
    """`LABELLED_SHARE` of each class's training images, by a fixed draw."""
    by_category: dict[str, list[Image]] = defaultdict(list)
    for image in labelled:
        if split(image) == "train":
            by_category[image.category].append(image)
    chosen = []
    for name, members in sorted(by_category.items()):
        chosen += random.Random(f"{SELECTION_SEED}/10%/{name}").sample(members, round(LABELLED_SHARE * len(members)))
    return chosen


def build_shards(
    images: list[Image], output: Path, labels: bool, val_fraction: float, classes: Path | None = None
) -> int:
    """Shards of `images` (once; an existing build is kept), with the class table `classes` if given; returns the
    number of samples written, -1 for a build that existed."""
    if (output / "index.json").exists():
        return -1
    return manifest_shards(
        ((image.path, image.category) for image in images),
        output,
        max_samples_per_shard=1000,
        val_fraction=val_fraction,
        image=ImageOptions(max_side=MAX_SIDE),
        classes=str(classes) if classes else None,
        no_labels=not labels,
        workers=2,
    )


def prepare(folder: Path, root: Path = CORPUS, min_class_images: int = MIN_CLASS_IMAGES) -> Shards:
    """The three sets of shards in `folder` (built once) from the corpus at `root`."""
    images = corpus(root)
    labelled = labelled_images(images, min_class_images)
    subset = few_labels(labelled)
    shards = Shards(folder / "unlabelled", folder / "labelled", folder / "labelled10")
    for members, output, labels, val_fraction, classes in (
        (images, shards.unlabelled, False, VAL_FRACTION, None),
        (labelled, shards.labelled, True, VAL_FRACTION, None),
        (subset, shards.labelled10, True, 0.0, shards.labelled / "classes.json"),  # the same class indices
    ):
        written = build_shards(members, output, labels, val_fraction, classes)
        if written >= 0:
            print(f"{written} images{'' if labels else ' without labels'} in {output}", flush=True)
    return shards
