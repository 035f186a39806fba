"""Epoch boundaries and shuffle quality of the loader's sample order (no timing: the order is deterministic).

A corpus of 1,000 tiny images cut into 11 uneven shards (at most 97 samples each: one or two shards per worker and
epoch) and into 44 (at most 23: five or more), read by 2 ranks with 1-4 data workers each, batches of 16,
`open_shards` 4 (the default), two epochs per rank. Per setting it prints:
- epoch-0 share: of each rank's first samples_per_epoch / world_size samples, the share that belongs to epoch 0
  (1.0 when epochs are exact);
- the mean distance in a rank's stream between consecutive samples of the same shard and epoch (larger: shards are
  spread further apart, the shuffle mixes better), and the mean number of shards in a batch;
- in-shard order: the mean over shards and epochs of the rank correlation between where a sample is stored in its
  shard and when it is delivered among that shard's samples (0 for a uniform shuffle, 1 for stored order).
Target: epochs exact (share 1.000) in every setting; the two mixing figures are compared with BENCHMARKS.md's.

    python -m benchmarks.bench_epoch_order
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline import make_loader
from data_pipeline.build.builder import BuildOptions, build

IMAGES = 1000
WORLD_SIZE = 2
BATCH = 16


def images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / "images" / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root / "images"


def shards_of(folder: Path, per_shard: int) -> Path:
    output = folder.parent / f"shards-{per_shard}"
    build(BuildOptions(input=str(folder), output=str(output), max_samples_per_shard=per_shard, workers=0))
    return output


def shard_of_key(shards: Path) -> dict[str, tuple[str, int]]:
    """Each key's shard and its place among the shard's samples."""
    owner = {}
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as archive:
            keys = dict.fromkeys(name.split(".", 1)[0] for name in archive.getnames())
        owner.update({key: (path.name, place) for place, key in enumerate(keys)})
    return owner


def in_shard_order(stream: list[tuple[str, int]], owner: dict[str, tuple[str, int]]) -> list[float]:
    """Per shard and epoch: the rank correlation of stored place and delivery order."""
    stored: dict[tuple[str, int], list[int]] = {}
    for key, epoch in stream:
        shard, place = owner[key]
        stored.setdefault((shard, epoch), []).append(place)
    return [
        float(np.corrcoef(np.argsort(np.argsort(places)), np.arange(len(places)))[0, 1])
        for places in stored.values()
        if len(places) >= 3
    ]


def measure(shards: Path, owner: dict[str, tuple[str, int]], workers: int) -> tuple[float, float, float, float]:
    epoch0_shares, gaps, shards_per_batch, orders = [], [], [], []
    for rank in range(WORLD_SIZE):
        loader = make_loader(
            str(shards / "index.json"),
            batch_size=BATCH,
            image_size=8,
            rank=rank,
            world_size=WORLD_SIZE,
            num_workers=workers,
        )
        share = loader.samples_per_epoch // WORLD_SIZE
        stream: list[tuple[str, int]] = []
        for batch in itertools.islice(loader, 2 * share // BATCH):
            pairs = list(zip(batch["key"], batch["epoch"].tolist(), strict=True))
            stream += pairs
            shards_per_batch.append(len({owner[key][0] for key, _ in pairs}))
        epoch0_shares.append(sum(epoch == 0 for _, epoch in stream[:share]) / share)
        orders += in_shard_order(stream, owner)
        last: dict[tuple[str, int], int] = {}
        for position, (key, epoch) in enumerate(stream):
            group = (owner[key][0], epoch)
            if group in last:
                gaps.append(position - last[group])
            last[group] = position
    return min(epoch0_shares), statistics.mean(gaps), statistics.mean(shards_per_batch), statistics.mean(orders)


def main() -> int:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    with tempfile.TemporaryDirectory() as folder:
        source = images(Path(folder))
        print(f"\n{IMAGES} images, {WORLD_SIZE} ranks, batch {BATCH}, two epochs per rank")
        print(
            "  shards | workers | epoch-0 share of the first epoch | same-shard distance | shards per batch "
            "| in-shard order"
        )
        shares = []
        for per_shard in (97, 23):
            shards = shards_of(source, per_shard)
            owner = shard_of_key(shards)
            count = len({shard for shard, _ in owner.values()})
            for workers in (1, 2, 3, 4):
                exact, gap, mixed, order = measure(shards, owner, workers)
                shares.append(exact)
                print(f"  {count:6d} | {workers:7d} | {exact:32.3f} | {gap:19.2f} | {mixed:16.2f} | {order:14.3f}")
    met = min(shares) == 1.0
    print(f"  epochs exact on every rank (target: share 1.000 everywhere): {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
