"""Streaming loader: decode + augment throughput per core, S3 streaming bandwidth, memory over many epochs.

Parts 2 and 3 run over JPEG shards written by build-shards from synthetic photo-like images (stored with the shorter
side at 512 px, like a typical pre-training corpus; crops at 224 px). Part 1 also runs over real photographs.

1. Decode + augment, one process: `make_loader(num_workers=0)` against plain webdataset + PIL full decode +
   torchvision `RandomResizedCrop(224)` + `PILToTensor` on the same shards, for three kinds of data:
   - synthetic: the photo-like images, by build-shards (target: at least 2x);
   - photos: crops of the photographs scikit-learn and scikit-image ship (china, flower; astronaut, chelsea, coffee,
     rocket when scikit-image is installed: `pip install -e '.[bench]'`), scaled to 683x512, by build-shards;
   - photos, other tool: the same kind of crops at 500x375 written straight into tars with PIL, as img2dataset and
     most WebDataset writers do (no restart markers, so the loader cannot cut a band of rows).
2. S3 bandwidth through moto's server (its own process) on loopback: the loader's reader (retrying, prefetching
   thread) against a raw s3fs sequential read of the same shards. Target: at least 0.9x with one stream; more with
   parallel streams. Moto serves from one Python process, so absolute numbers say little; the ratio is what counts.
3. Resident memory of a loader over 10 epochs: growth after the first epoch under 5%.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from benchmarks.bench_build_shards import make_corpus
from data_pipeline import make_loader
from data_pipeline.build.builder import BuildOptions, build
from data_pipeline.build.images import ImageOptions
from data_pipeline.load.remote import PrefetchedShard, ReadCounters, RetryingReader, RetryPolicy

IMAGE_SIZE = 224
DECODE_ROUNDS = 3
S3_ROUNDS = 9


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def photo_sources() -> list[np.ndarray]:
    """The colour photographs scikit-learn ships, and scikit-image's when it is installed."""
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:
        from skimage import data
    except ImportError:
        return photos
    return photos + [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]


def photo_crops(count: int, size: tuple[int, int]) -> Iterator[Image.Image]:
    """`count` random crops of 40-100% of a photograph's area at the aspect of `size`, scaled to `size`."""
    rng = np.random.default_rng(0)
    sources = photo_sources()
    aspect = size[0] / size[1]
    for i in range(count):
        photo = sources[i % len(sources)]
        height, width = photo.shape[:2]
        crop_w = min(width, round(np.sqrt(rng.uniform(0.4, 1.0) * width * height * aspect)))
        crop_h = min(height, round(crop_w / aspect))
        crop_w = round(crop_h * aspect)
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        region = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
        yield region.resize(size, Image.Resampling.BICUBIC)


def make_photo_corpus(root: Path, count: int, size: tuple[int, int]) -> None:
    for i, image in enumerate(photo_crops(count, size)):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def other_tool_shards(root: Path, count: int) -> str:
    """Photo crops at 500x375 written straight into tars of 100 samples with PIL (q90): the brace pattern of them."""
    import webdataset as wds

    root.mkdir(parents=True)
    shards = -(-count // 100)
    crops = photo_crops(count, (500, 375))
    for shard in range(shards):
        with wds.TarWriter(str(root / f"shard-{shard:06d}.tar")) as writer:
            for i in range(shard * 100, min(count, shard * 100 + 100)):
                encoded = io.BytesIO()
                next(crops).save(encoded, format="JPEG", quality=90)
                writer.write({"__key__": f"{i:06d}", "jpg": encoded.getvalue(), "cls": i % 10})
    return f"{root}/shard-{{000000..{shards - 1:06d}}}.tar"


def build_shards(root: Path, images: int, corpus: Callable[[Path, int, tuple[int, int]], None] = make_corpus) -> Path:
    corpus(root / "images", images, (1024, 768) if corpus is make_corpus else (683, 512))
    build(
        BuildOptions(
            input=str(root / "images"),
            output=str(root / "shards"),
            max_samples_per_shard=100,
            workers=2,
            image=ImageOptions(max_side=512, quality=90),
        )
    )
    shutil.rmtree(root / "images")
    return root / "shards"


def baseline_decode(urls: list[str], limit: int) -> float:
    import webdataset as wds
    from torchvision import transforms

    transform = transforms.Compose(
        [transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
    start = time.perf_counter()
    count = 0
    for image, _label in dataset:
        transform(image)
        count += 1
        if count == limit:
            break
    return count / (time.perf_counter() - start)


def loader_decode(source: str, limit: int) -> float:
    loader = make_loader(source, batch_size=32, num_workers=0, image_size=IMAGE_SIZE, epochs=1)
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += int(batch["valid"].sum())
        if count >= limit:
            break
    return count / (time.perf_counter() - start)


def tar_urls(shards: Path) -> list[str]:
    return [str(path) for path in sorted(shards.glob("train-*.tar"))]


def raw_s3fs_read(fs, paths: list[str]) -> float:
    start = time.perf_counter()
    total = 0
    for path in paths:
        with fs.open(path, "rb", block_size=1 << 22) as handle:
            while chunk := handle.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


def loader_read(fs, paths: list[str], streams: int) -> float:
    counters = ReadCounters()

    def read(path: str) -> None:
        shard = PrefetchedShard(RetryingReader(fs, path, path, RetryPolicy(), counters))
        while shard.read(1 << 20):
            pass

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(read, paths))
    return counters.bytes / (time.perf_counter() - start)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3 endpoint on loopback, served by moto in its own process (in this one its request threads would
    compete for the GIL with what is measured); credentials for it in the environment."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(endpoint)
        for name, value in {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            os.environ.setdefault(name, value)
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def s3_bandwidth(shards: Path) -> dict[str, list[float]]:
    """Bytes/s of each reader in every round. Rounds interleave the readers, each round in another order, so that no
    reader always runs right after the same one."""
    import s3fs

    with moto_server() as endpoint:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(shards) + "/", "bench/shards/", recursive=True)
        paths = sorted(fs.glob("bench/shards/train-*.tar"))
        readers = {
            "raw s3fs, sequential": lambda: raw_s3fs_read(fs, paths),
            "loader reader, 1 stream": lambda: loader_read(fs, paths, 1),
            "loader reader, 4 streams": lambda: loader_read(fs, paths, 4),
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        names = list(readers)
        for round_ in range(S3_ROUNDS):
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                rates[name].append(readers[name]())
        return rates


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def memory_over_epochs(shards: Path, epochs: int) -> list[int]:
    loader = make_loader(str(shards / "index.json"), batch_size=32, num_workers=0, image_size=IMAGE_SIZE)
    per_epoch = loader.samples_per_epoch
    samples, readings = 0, []
    for batch in loader:
        samples += len(batch["key"])
        if samples >= per_epoch * (len(readings) + 1):
            readings.append(rss_bytes())
            if len(readings) == epochs:
                return readings
    return readings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per core: data workers run single-threaded, as DataLoader sets them up
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    met = True
    try:
        shards = build_shards(work, args.images)
        photos = build_shards(work / "photos", args.images, make_photo_corpus)
        other = other_tool_shards(work / "other", args.images)
        mib = sum(path.stat().st_size for path in shards.glob("*.tar")) / 2**20
        print(f"\nloader: {args.images} JPEGs (shorter side 512) in {mib:.0f} MiB of shards, crops {IMAGE_SIZE} px")

        # best of interleaved rounds: on a shared 2-core machine a single pass of each varies by 15%
        kinds = {
            "synthetic, build-shards": (str(shards / "index.json"), tar_urls(shards)),
            "photos, build-shards": (str(photos / "index.json"), tar_urls(photos)),
            "photos, other tool": (other, list(braceexpand(other))),
        }
        print(f"  decode+augment, 1 process, best of {DECODE_ROUNDS} rounds (images/s):")
        for kind, (source, urls) in kinds.items():
            rounds = [
                (baseline_decode(urls, args.images), loader_decode(source, args.images)) for _ in range(DECODE_ROUNDS)
            ]
            baseline, ours = max(b for b, _ in rounds), max(o for _, o in rounds)
            verdict = ""
            if kind.startswith("synthetic"):
                verdict = f" (target >= 2.00x): {'met' if ours >= 2 * baseline else 'MISSED'}"
                met &= ours >= 2 * baseline
            print(
                f"    {kind:24s} webdataset+PIL+torchvision {baseline:7.1f}, make_loader {ours:7.1f}: "
                f"{ours / baseline:5.2f}x{verdict}"
            )

        # Moto and the reader share the two cores, so one pass of the raw read alone varies by 25% here: each ratio
        # is the median over the rounds of the ratio within a round (whose passes run back to back)
        rates = s3_bandwidth(shards)
        raw = rates["raw s3fs, sequential"]
        ratios = {
            name: statistics.median(ours / theirs for ours, theirs in zip(values, raw, strict=True))
            for name, values in rates.items()
        }
        for name, values in rates.items():
            print(
                f"  S3 via moto, {name:26s} median {statistics.median(values) / 2**20:7.1f} MiB/s, "
                f"ratio within rounds {ratios[name]:5.2f}x (median of {S3_ROUNDS} rounds)"
            )
        one = ratios["loader reader, 1 stream"]
        print(f"  one stream / raw s3fs: {one:.2f}x (target >= 0.90x): {'met' if one >= 0.9 else 'MISSED'}")
        met &= one >= 0.9

        readings = memory_over_epochs(shards, args.epochs)
        growth = readings[-1] / readings[0] - 1
        print(
            f"  resident memory after epochs 1..{len(readings)}: "
            + " ".join(f"{reading / 2**20:.0f}" for reading in readings)
            + " MiB"
        )
        print(f"  growth after the first epoch: {growth:+.1%} (target < 5%): {'met' if growth < 0.05 else 'MISSED'}")
        met &= growth < 0.05
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
