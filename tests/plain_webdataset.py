"""Shards read back without any code of ours but the index format: what another tool would see."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

from data_pipeline.format.index import ShardIndex


def read_index(output: Path) -> ShardIndex:
    return ShardIndex.model_validate_json((output / "index.json").read_text())


def webdataset_samples(output: Path, split: str = "train") -> list[dict]:
    """Every sample of a split, read with plain webdataset."""
    urls = [str(output / shard.name) for shard in read_index(output).shards_of(split)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
