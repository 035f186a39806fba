"""The files build-shards writes next to the shards, as pydantic models.

- `index.json`: every shard with its split, sample count, bytes and sha256; totals per split and per class; what
  was skipped; the options used. Written last: its presence means the build is complete. The loader reads it.
- `classes.json`: class name -> index.
- `errors.jsonl`: one line per skipped sample: key, source, reason, detail.
- `_build/{split}-{n:06d}.json`: one record per committed shard, the builder's resume state (which ranks of the
  split's build order the shard covers and which of them failed). A re-run skips the shards that have a record.
- `_build/part-{k:06d}-of-{n:06d}.json`: written when part k of a build cut into n parts is complete; the finalize
  step reads them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

INDEX_FORMAT = "vit-pretrain-shards/1"
BUILD_DIR = "_build"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleFailure(Strict):
    row: int
    """Position of the input row in the order of the build (both splits)."""
    key: str
    source: str
    split: str
    reason: str
    detail: str = ""


class ShardRecord(Strict):
    """What one committed shard holds, and the input rows it accounts for."""

    fingerprint: str
    """Hash of the options and inputs that determine the shards' bytes; a re-run with other options must not mix."""
    split: str
    number: int
    name: str | None
    """File name of the shard; None when every row of it failed."""
    num_samples: int
    bytes: int
    sha256: str
    first_row: int
    end_row: int
    """The shard accounts for the split's rows in [first_row, end_row) of the build order."""
    class_counts: dict[str, int]
    failures: list[SampleFailure]
    retried: bool = False
    """Written by --retry-failed: holds rows that had failed in an earlier run."""
    recovered_keys: list[str] = []
    """Keys of earlier failures that this (retry) shard now holds."""


class ShardInfo(Strict):
    name: str
    split: str
    num_samples: int
    bytes: int
    sha256: str


class SplitTotals(Strict):
    num_samples: int
    num_shards: int
    bytes: int
    class_counts: dict[str, int]
    """Samples per class index (a multi-label sample counts once for each of its labels)."""


class ShardIndex(Strict):
    format: Literal["vit-pretrain-shards/1"] = INDEX_FORMAT
    num_classes: int
    multi_label: bool
    labelled: bool
    splits: dict[str, SplitTotals]
    shards: list[ShardInfo]
    skipped: dict[str, int]
    """Samples skipped, by reason (details in errors.jsonl)."""
    ignored_files: int
    """Files under an image folder that are not images (not samples, so not errors)."""
    input_rows: int
    options: dict[str, Any]

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [shard for shard in self.shards if shard.split == split]
