"""One system's writer or loader, run by `bench_peers` in that system's own environment (ours, MosaicML streaming,
litdata). This file imports nothing of ours at module level, so a peer's environment can run it as a script.

    python peer_loaders.py write SYSTEM --corpus CORPUS.json --output DIR
    python peer_loaders.py read SYSTEM --url URL --endpoint URL --workers N --cache DIR --result OUT.json
                                       [--stop-at-half STATE.json | --resume STATE.json]

Every loader delivers the same thing: random-resized crops of 224 px, flipped, in uint8 batches of 64, one shuffled
epoch. How differs, and is part of what is compared: the peers decode every pixel with PIL and crop with torchvision, as
their documentation shows; `make_loader` decodes only the crop's rows at reduced DCT scale where that is exact enough.
A read reports the seconds from making the loader to its first batch, the images/s from a fifth of the epoch to its
end, and every key it delivered (the benchmark checks exactly-once delivery from those).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BATCH = 64
IMAGE_SIZE = 224


# -- writers: each system's own, over the same JPEG bytes ------------------------------------------------------------


def corpus_sample(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry of the corpus description written by bench_peers ({"key", "label", "path"}) as a sample."""
    return {"key": entry["key"], "cls": entry["label"], "jpg": Path(entry["path"]).read_bytes()}


def corpus_entries(corpus: str) -> list[dict[str, Any]]:
    return json.loads(Path(corpus).read_text())


def write_streaming(corpus: str, output: str, samples_per_shard: int, shard_bytes: int) -> None:
    from streaming import MDSWriter

    # MDS cuts shards by bytes: the benchmark passes the mean size of our shards, so both have about as many
    columns = {"key": "str", "cls": "int", "jpg": "bytes"}
    with MDSWriter(out=output, columns=columns, size_limit=shard_bytes) as writer:
        for entry in corpus_entries(corpus):
            writer.write(corpus_sample(entry))


def write_litdata(corpus: str, output: str, samples_per_shard: int, shard_bytes: int) -> None:
    import litdata

    litdata.optimize(
        fn=corpus_sample,
        inputs=corpus_entries(corpus),
        output_dir=output,
        chunk_size=samples_per_shard,
        num_workers=2,
        mode="overwrite",
    )


WRITERS = {"streaming": write_streaming, "litdata": write_litdata}


# -- loaders ---------------------------------------------------------------------------------------------------------


def torchvision_transform() -> Any:
    from torchvision import transforms

    return transforms.Compose(
        [transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )


def decode(jpeg: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def augmented(sample: dict[str, Any], transform: Any) -> dict[str, Any]:
    """A peer's stored sample as every system delivers it: the key, the augmented crop, the class."""
    return {"key": sample["key"], "image": transform(decode(sample["jpg"])), "cls": sample["cls"]}


class Loader:
    """A system's data loader as the benchmark drives it: batches of delivered keys, and its own resume state."""

    loader: Any

    def batches(self) -> Iterator[list[str]]:
        for batch in self.loader:
            yield list(batch["key"])

    def state_dict(self) -> Any:
        return self.loader.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.loader.load_state_dict(state)


class OursLoader(Loader):
    def __init__(self, url: str, endpoint: str, workers: int, cache: str) -> None:
        from data_pipeline import make_loader

        # no cache folder: the loader streams shards from object storage and keeps nothing on disk
        self.loader = make_loader(
            url,
            batch_size=BATCH,
            num_workers=workers,
            image_size=IMAGE_SIZE,
            epochs=1,
            storage_options={"endpoint_url": endpoint},
        )

    def batches(self) -> Iterator[list[str]]:
        for batch in self.loader:
            yield [key for key, valid in zip(batch["key"], batch["valid"].tolist(), strict=True) if valid]


class StreamingLoader(Loader):
    def __init__(self, url: str, endpoint: str, workers: int, cache: str) -> None:
        os.environ["S3_ENDPOINT_URL"] = endpoint  # how streaming is pointed at an S3-compatible store
        from streaming import StreamingDataLoader, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # a killed run leaves its shared memory behind; the documented remedy
        transform = torchvision_transform()

        class Images(StreamingDataset):
            def __getitem__(self, index: int) -> dict[str, Any]:
                return augmented(super().__getitem__(index), transform)

        # the settings of streaming's documentation for training: shuffled, batch size given to the dataset
        dataset = Images(remote=url, local=cache, shuffle=True, batch_size=BATCH)
        self.loader = StreamingDataLoader(dataset, batch_size=BATCH, num_workers=workers)


class LitdataLoader(Loader):
    def __init__(self, url: str, endpoint: str, workers: int, cache: str) -> None:
        import litdata
        from litdata.streaming import downloader

        # litdata fetches chunks with obstore, which refuses a plain-http endpoint (the loopback proxy) unless its
        # client options allow it; litdata builds those options from this module constant (workers fork after this)
        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"

        transform = torchvision_transform()

        class Images(litdata.StreamingDataset):
            def __getitem__(self, index: Any) -> dict[str, Any]:
                return augmented(super().__getitem__(index), transform)

        dataset = Images(url, cache_dir=cache, shuffle=True, storage_options={"endpoint_url": endpoint})
        self.loader = litdata.StreamingDataLoader(dataset, batch_size=BATCH, num_workers=workers)


LOADERS = {"ours": OursLoader, "streaming": StreamingLoader, "litdata": LitdataLoader}


# each system and its object-storage client (a training process has them loaded before it makes a loader)
IMPORTS = {"ours": ("data_pipeline", "s3fs"), "streaming": ("streaming", "boto3"), "litdata": ("litdata", "boto3")}


def read(args: argparse.Namespace) -> None:
    for module in (*IMPORTS[args.system], "torchvision", "PIL.Image"):
        importlib.import_module(module)  # before the clock starts: the same interpreter start-up for all
    started = time.perf_counter()
    loader = LOADERS[args.system](args.url, args.endpoint, args.workers, args.cache)
    if args.resume:
        loader.load_state_dict(json.loads(Path(args.resume).read_text()))
    keys: list[str] = []
    first_batch = steady_from = None
    for batch in loader.batches():
        now = time.perf_counter()
        first_batch = first_batch or now
        keys.extend(batch)
        # the rate is taken from a fifth of the epoch on: the first batches come from what the workers fetched and
        # decoded ahead while the loader started, which would flatter whoever prefetches most
        if steady_from is None and len(keys) >= args.samples // 5:
            steady_from, steady_keys = now, len(keys)
        if args.stop_at_half and len(keys) >= args.samples // 2:
            Path(args.stop_at_half).write_text(json.dumps(loader.state_dict()))
            break
    ended = time.perf_counter()
    assert first_batch is not None, "no batch"
    result = {"first_batch_s": first_batch - started, "keys": keys}
    if steady_from is not None and not args.stop_at_half and not args.resume:
        result["images_per_s"] = (len(keys) - steady_keys) / (ended - steady_from)
    Path(args.result).write_text(json.dumps(result))
    # like a preempted job: no orderly shutdown that a peer's workers or download threads could delay
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write")
    write.add_argument("system", choices=sorted(WRITERS))
    write.add_argument("--corpus", required=True)
    write.add_argument("--output", required=True)
    write.add_argument("--samples-per-shard", type=int, required=True)
    write.add_argument("--shard-bytes", type=int, required=True)
    reader = commands.add_parser("read")
    reader.add_argument("system", choices=sorted(LOADERS))
    reader.add_argument("--url", required=True)
    reader.add_argument("--endpoint", required=True)
    reader.add_argument("--workers", type=int, required=True)
    reader.add_argument("--cache", required=True)
    reader.add_argument("--result", required=True)
    reader.add_argument("--samples", type=int, required=True)
    reader.add_argument("--stop-at-half")
    reader.add_argument("--resume")
    args = parser.parse_args()
    if args.command == "write":
        WRITERS[args.system](args.corpus, args.output, args.samples_per_shard, args.shard_bytes)
    else:
        read(args)


if __name__ == "__main__":
    main()
