"""What the loader streams: shard URLs with their sample counts and the label layout, from an index or a pattern.

A source is either the `index.json` that build-shards wrote (then the shards of one split are used) or a brace
pattern of shard URLs (`s3://b/train-{000000..000127}.tar`). Sample counts matter: they decide how an epoch is split
exactly across ranks and workers. For a pattern they come from an `index.json` beside the shards when there is one,
otherwise every shard is read once and counted (slow for big corpora, so it is logged).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Any

import braceexpand
from pydantic import ValidationError
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_pipeline.commands import UserError
from data_pipeline.format.index import ShardIndex
from data_pipeline.storage import filesystem

log = logging.getLogger(__name__)


class SourceError(UserError):
    """The loader's source cannot be used; the message names the URL and what to do."""


@dataclass(frozen=True)
class ShardList:
    urls: list[str]
    num_samples: list[int]
    labelled: bool
    num_classes: int | None
    """None when unknown (shards without an index or classes.json): labels are then not range-checked."""
    multi_label: bool

    @property
    def total(self) -> int:
        return sum(self.num_samples)


def _missing_source(url: str) -> SourceError:
    return SourceError(f"{url}: no such file; pass the index.json build-shards wrote, or a shard pattern")


def read_index(url: str, storage_options: dict[str, Any] | None) -> ShardIndex:
    fs, path = filesystem(url, storage_options)
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise _missing_source(url) from None
    try:
        return ShardIndex.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as error:
        first = str(error).splitlines()[0]
        raise SourceError(f"{url}: not an index written by build-shards ({first}); rebuild the shards") from None


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _count_samples(url: str, storage_options: dict[str, Any] | None) -> int:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        keys = {base_plus_ext(member["fname"])[0] for member in tar_file_iterator(io.BufferedReader(handle))}
    return len(keys - {None})


def resolve(source: str, *, split: str = "train", storage_options: dict[str, Any] | None = None) -> ShardList:
    """The shards of `source` (an index.json URL or a brace pattern of shard URLs) and their sample counts."""
    if source.endswith(".json"):
        index = read_index(source, storage_options)
        shards = index.shards_of(split)
        if not shards:
            raise SourceError(f"{source}: no shards in split {split!r} (splits: {', '.join(index.splits) or 'none'})")
        root = _parent(source)
        return ShardList(
            urls=[f"{root}/{shard.name}" for shard in shards],
            num_samples=[shard.num_samples for shard in shards],
            labelled=index.labelled,
            num_classes=index.num_classes,
            multi_label=index.multi_label,
        )

    urls = list(braceexpand.braceexpand(source))
    if not urls or not all(url.endswith(".tar") for url in urls):
        raise SourceError(f"{source}: expected an index.json URL or a brace pattern of .tar shard URLs")
    index_url = f"{_parent(urls[0])}/index.json"
    fs, index_path = filesystem(index_url, storage_options)
    if fs.exists(index_path):
        index = read_index(index_url, storage_options)
        known = {f"{_parent(index_url)}/{shard.name}": shard.num_samples for shard in index.shards}
        missing = [url for url in urls if url not in known]
        if not missing:
            counts = [known[url] for url in urls]
            return ShardList(urls, counts, index.labelled, index.num_classes, index.multi_label)
        log.warning("%s does not list %s; counting samples", index_url, missing[0])
    log.warning("%s: no index.json beside the shards; reading %d shards once to count samples", source, len(urls))
    counts = []
    for url in urls:
        try:
            counts.append(_count_samples(url, storage_options))
        except FileNotFoundError:
            raise SourceError(f"{url}: shard not found; check the pattern {source}") from None
        except (tarfile.TarError, EOFError, ValueError, OSError) as error:
            raise SourceError(f"{url}: not a readable tar shard ({type(error).__name__}: {error})") from None
    return ShardList(urls, counts, True, _class_count(urls[0], storage_options), multi_label=False)


def read_classes(source: str, storage_options: dict[str, Any] | None = None) -> dict[str, int] | None:
    """The class table (name -> index) from the classes.json beside the shards of `source` (an index.json URL or a
    shard pattern); None when there is none."""
    first = next(iter(braceexpand.braceexpand(source)))
    fs, path = filesystem(f"{_parent(first)}/classes.json", storage_options)
    try:
        classes = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        # no table beside a source that is not there either: say the source is missing, not the table
        source_fs, source_path = filesystem(first, storage_options)
        if not source_fs.exists(source_path):
            raise _missing_source(first) from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{fs.unstrip_protocol(path)}: not JSON ({error}); rebuild the shards") from None
    if not isinstance(classes, dict) or not all(isinstance(index, int) for index in classes.values()):
        raise SourceError(f"{fs.unstrip_protocol(path)}: not a class table (name -> index); rebuild the shards")
    return classes


def _class_count(url: str, storage_options: dict[str, Any] | None) -> int | None:
    classes = read_classes(url, storage_options)
    return None if classes is None else len(classes)
