"""build-shards throughput: 1 and 2 worker processes against a single-process PIL baseline, on the same images.

The baseline does the minimum a shard builder must do per image: open it with PIL, apply EXIF orientation, convert
to RGB, resize the shorter side to --max-side and re-encode at the same quality. Target: 2 workers reach at least
1.7x the images/s of 1 worker.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data_pipeline.builder import BuildOptions, build
from data_pipeline.images import ImageOptions

MAX_SIDE = 384
QUALITY = 95


def make_corpus(root: Path, count: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs (smooth colour fields with sensor-like noise) in 10 class folders."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    noise = rng.normal(0, 8, (size[1], size[0], 3)).astype(np.float32)
    for i in range(count):
        base, slope = rng.uniform(0, 255, 3), rng.uniform(-0.3, 0.3, (2, 3))
        shifted = np.roll(noise, (int(rng.integers(size[1])), int(rng.integers(size[0]))), axis=(0, 1))
        pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + shifted
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def baseline(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        scale = MAX_SIDE / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=QUALITY)
    return len(files) / (time.perf_counter() - start)


def builder(corpus: Path, output: Path, workers: int) -> float:
    options = BuildOptions(input=str(corpus), output=str(output), max_samples_per_shard=100, workers=workers,
                           image=ImageOptions(max_side=MAX_SIDE, quality=QUALITY))
    start = time.perf_counter()
    result = build(options)
    elapsed = time.perf_counter() - start
    shutil.rmtree(output)
    return result.written_samples / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds; each measure keeps its best (a single pass varies by 10%% here)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-build-shards-"))
    rates: dict[str, float] = {}
    try:
        make_corpus(work / "in", args.images, (args.width, args.height))
        files = sorted((work / "in").rglob("*.jpg"))
        for _ in range(args.rounds):
            for name, measure in (("baseline (PIL, 1 process)", lambda: baseline(files)),
                                  ("build-shards --workers 1", lambda: builder(work / "in", work / "out", 1)),
                                  ("build-shards --workers 2", lambda: builder(work / "in", work / "out", 2))):
                rates[name] = max(rates.get(name, 0.0), measure())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rates["baseline (PIL, 1 process)"]
    print(f"\nbuild-shards: {args.images} JPEGs of {args.width}x{args.height}, shorter side to {MAX_SIDE}, q{QUALITY}, "
          f"best of {args.rounds} rounds")
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:8.1f} images/s   {rate / base:5.2f}x baseline")
    scaling = rates["build-shards --workers 2"] / rates["build-shards --workers 1"]
    ok = scaling >= 1.7
    print(f"  2 workers / 1 worker: {scaling:.2f}x (target >= 1.70x): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
