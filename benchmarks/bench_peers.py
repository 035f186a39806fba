"""The streaming loader against MosaicML streaming and litdata: the same JPEGs in S3, read through 20 ms of latency.

Corpus: 5,000 photo-like JPEGs with the shorter side at 512 px in 10 classes. Each system writes them in its own
format with its own writer (build-shards keeping the original bytes; `streaming.MDSWriter`; `litdata.optimize`), in
shards of about 500 samples, into moto's S3 server. Each reads through a loopback proxy that waits 20 ms before every
request (object storage's time to first byte), with its documented settings (the peers' cache folders and download
threads at their defaults) and delivers the same batches: random-resized crops of 224, flipped, uint8, 64 per batch
(benchmarks/peer_loaders.py; how each decodes is its own, and part of what is compared). The peers run in their own
virtual environments (benchmarks/peer_env.py).

Measured per system with 1 and 2 data workers, every run a fresh process with an empty cache (a new node):
- images/s from a fifth of an epoch to its end, and the seconds from making the loader to its first batch;
- after `state_dict()` at half an epoch and a fresh process: the seconds to the first batch, and the bytes it
  fetches over what the rest of the epoch holds;
- that the two halves deliver every sample exactly once (checked the same way for all three).
Targets: our images/s >= 1.0x the best peer's at each setting (the median over rounds of the ratio within a round);
our time to the first batch after a resume <= the best peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_build_shards import make_corpus
from benchmarks.bench_loader import moto_server
from benchmarks.peer_env import peer_python
from data_pipeline.build.builder import BuildOptions, build
from data_pipeline.build.images import ImageOptions
from tests.faulty_proxy import FaultyProxy

PEERS = {
    "streaming": ["mosaicml-streaming==0.13.0", "torch", "torchvision", "pillow"],
    "litdata": ["litdata==0.2.76", "torch", "torchvision", "pillow"],
}
SYSTEMS = ("ours", *PEERS)
SCRIPT = Path(__file__).with_name("peer_loaders.py")
SAMPLES_PER_SHARD = 500
LATENCY = 0.02
TIMEOUT = 1800


@dataclass
class Reading:
    images_per_s: float
    first_batch_s: float
    resumed_first_batch_s: float
    resumed_bytes_ratio: float
    """Bytes the resumed process fetched / the bytes of the samples it still had to deliver."""
    exactly_once: bool


class Bench:
    def __init__(self, work: Path, images: int) -> None:
        self.work, self.images = work, images
        self.pythons = {"ours": Path(sys.executable)} | {name: peer_python(name, reqs) for name, reqs in PEERS.items()}

    # -- data ----------------------------------------------------------------------------------------------------

    def write_all(self, fs) -> None:
        """The corpus, then each system's copy of it in S3 under s3://bench/<system>/."""
        images = self.work / "images"
        make_corpus(images, self.images, (683, 512))
        build(
            BuildOptions(
                input=str(images),
                output=str(self.work / "ours"),
                max_samples_per_shard=SAMPLES_PER_SHARD,
                workers=2,
                image=ImageOptions(max_side=512, reencode=False),
            )
        )
        shards = list((self.work / "ours").glob("train-*.tar"))
        shard_bytes = sum(path.stat().st_size for path in shards) // len(shards)
        self.corpus_bytes = sum(path.stat().st_size for path in images.rglob("*.jpg"))
        # the peers' writers take the files in a shuffled order, as a user would hand them a corpus listing
        entries = [
            {
                "key": str(path.relative_to(images).with_suffix("")),
                "label": int(path.parent.name[5:]),
                "path": str(path),
            }
            for path in sorted(images.rglob("*.jpg"))
        ]
        random.Random(0).shuffle(entries)
        (self.work / "corpus.json").write_text(json.dumps(entries))
        for name in PEERS:
            command = [str(self.pythons[name]), str(SCRIPT), "write", name, "--corpus", str(self.work / "corpus.json")]
            command += ["--output", str(self.work / name), "--samples-per-shard", str(SAMPLES_PER_SHARD)]
            command += ["--shard-bytes", str(shard_bytes)]
            subprocess.run(command, check=True, timeout=TIMEOUT, stdout=subprocess.DEVNULL)
        fs.mkdir("bench")
        for name in SYSTEMS:
            fs.put(str(self.work / name) + "/", f"bench/{name}/", recursive=True)
            shards = [path for path in (self.work / name).rglob("*") if path.is_file()]
            print(
                f"  {name:9s} {len(shards):3d} files, {sum(p.stat().st_size for p in shards) / 2**20:6.1f} MiB",
                flush=True,
            )
            shutil.rmtree(self.work / name)
        shutil.rmtree(images)

    # -- reads ---------------------------------------------------------------------------------------------------

    def read(self, proxy: FaultyProxy, system: str, workers: int, *extra: str) -> tuple[dict, int]:
        """One fresh process with an empty cache: its result and the bytes it fetched through the proxy."""
        cache = self.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        url = "s3://bench/ours/index.json" if system == "ours" else f"s3://bench/{system}"
        result = self.work / "result.json"
        command = [str(self.pythons[system]), str(SCRIPT), "read", system, "--url", url, "--endpoint", proxy.url]
        command += ["--workers", str(workers), "--cache", str(cache), "--result", str(result)]
        command += ["--samples", str(self.images), *extra]
        proxy.bytes_served = 0
        # streaming's shared memory outlives a process that ends the way a preempted one does; the next run cleans
        # it up, so the resource tracker's warning about it is noise here
        env = os.environ | {"PYTHONWARNINGS": "ignore:resource_tracker:UserWarning"}
        subprocess.run(command, check=True, timeout=TIMEOUT, env=env)
        return json.loads(result.read_text()), proxy.bytes_served

    def measure(self, proxy: FaultyProxy, system: str, workers: int) -> Reading:
        whole, _ = self.read(proxy, system, workers)
        state = self.work / "state.json"
        first, _ = self.read(proxy, system, workers, "--stop-at-half", str(state))
        rest, fetched = self.read(proxy, system, workers, "--resume", str(state))
        delivered = Counter(first["keys"]) + Counter(rest["keys"])
        everything = Counter(whole["keys"])
        exactly_once = len(everything) == self.images and max(everything.values()) == 1 and delivered == everything
        still_owed = self.corpus_bytes * (self.images - len(first["keys"])) / self.images
        return Reading(
            images_per_s=whole["images_per_s"],
            first_batch_s=whole["first_batch_s"],
            resumed_first_batch_s=rest["first_batch_s"],
            resumed_bytes_ratio=fetched / still_owed,
            exactly_once=exactly_once,
        )


def report(readings: dict[tuple[str, int], list[Reading]], rounds: int) -> bool:
    met = True
    for workers in (1, 2):
        print(f"\n  {workers} data worker(s); medians of {rounds} round(s)")
        print("  system       images/s  vs best peer  first batch  after resume  resume bytes  exactly once")
        ours = readings[("ours", workers)]
        ratios = {
            name: [o.images_per_s / p.images_per_s for o, p in zip(ours, readings[(name, workers)], strict=True)]
            for name in PEERS
        }
        best = min(PEERS, key=lambda name: statistics.median(ratios[name]))  # the peer we compare worst against
        for name in SYSTEMS:
            values = readings[(name, workers)]
            ratio = f"{statistics.median(ratios[best]):11.2f}x" if name == "ours" else " " * 12
            print(
                f"  {name:10s} {statistics.median(r.images_per_s for r in values):9.1f}  {ratio}"
                f" {statistics.median(r.first_batch_s for r in values):10.2f} s"
                f" {statistics.median(r.resumed_first_batch_s for r in values):11.2f} s"
                f" {statistics.median(r.resumed_bytes_ratio for r in values):12.2f}x"
                f"  {'yes' if all(r.exactly_once for r in values) else 'NO'}"
            )
        speed = statistics.median(ratios[best])
        resume = statistics.median(r.resumed_first_batch_s for r in ours)
        best_resume = min(statistics.median(r.resumed_first_batch_s for r in readings[(n, workers)]) for n in PEERS)
        print(
            f"  images/s vs the best peer ({best}): {speed:.2f}x (target >= 1.00x): {'met' if speed >= 1 else 'MISSED'}"
        )
        print(
            f"  first batch after a resume: {resume:.2f} s vs the best peer's {best_resume:.2f} s (target <=): "
            f"{'met' if resume <= best_resume else 'MISSED'}"
        )
        met &= speed >= 1 and resume <= best_resume and all(r.exactly_once for r in ours)
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; ratios are medians of within-round ratios")
    args = parser.parse_args(argv)
    import s3fs

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    readings: dict[tuple[str, int], list[Reading]] = {}
    try:
        bench = Bench(work, args.images)
        with moto_server() as endpoint:
            print(f"\nloaders vs peers: {args.images} JPEGs (shorter side 512), shards of {SAMPLES_PER_SHARD} samples")
            bench.write_all(s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True))
            with FaultyProxy(endpoint, every=0, latency_seconds=LATENCY, serve_ranges=True) as proxy:
                for round_ in range(args.rounds):
                    for workers in (1, 2):
                        # back to back, rotating which goes first: this machine's speed drifts over minutes
                        order = SYSTEMS[round_ % 3 :] + SYSTEMS[: round_ % 3]
                        for name in order:
                            reading = bench.measure(proxy, name, workers)
                            readings.setdefault((name, workers), []).append(reading)
                            print(f"  round {round_ + 1}, {workers} worker(s), {name}: {reading}", flush=True)
        return 0 if report(readings, args.rounds) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
