"""One sample's members besides its image, written by the builder and read by the loader, both here.

- `{key}.cls`: the class index of a single-label sample, as decimal text;
- `{key}.json`: the sample's record: original width and height, the source, a multi-label sample's `labels` (a
  list of class indices), and whatever metadata the manifest carried. Keys sorted, so shards are deterministic.
"""

from __future__ import annotations

import json
from typing import Any


class SkippedSample(Exception):
    """A sample the loader skips and counts: `reason` is the counter's name, the message says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason


def encode_members(jpeg: bytes, cls: int | None, record: dict[str, Any]) -> dict[str, bytes]:
    """The members of a sample in the order they are written: jpg, cls (single-label only), json."""
    members = {"jpg": jpeg}
    if cls is not None:
        members["cls"] = str(cls).encode()
    members["json"] = json.dumps(record, sort_keys=True, default=str).encode()
    return members


def record(members: dict[str, Any]) -> dict[str, Any]:
    """The sample's .json as an object; a malformed one is a skipped sample, never an exception out of the loader."""
    try:
        value = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise SkippedSample("bad_metadata", f".json is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise SkippedSample("bad_metadata", f".json is a {type(value).__name__}, not an object")
    return value


def single_label(members: dict[str, Any], num_classes: int | None) -> int:
    if "cls" not in members:
        raise SkippedSample("missing_label", "no .cls member")
    try:
        label = int(members["cls"])
    except (ValueError, TypeError):
        raise SkippedSample("bad_label", f".cls is {members['cls'][:20]!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SkippedSample("bad_label", f"label {label} outside 0..{(num_classes or 1) - 1}")
    return label


def multi_labels(members: dict[str, Any], num_classes: int) -> list[int]:
    if "json" not in members:
        raise SkippedSample("missing_label", "no .json with labels")
    labels = record(members).get("labels")
    if not isinstance(labels, list) or not labels:
        raise SkippedSample("missing_label", ".json has no labels list")
    for label in labels:
        if not isinstance(label, int) or not 0 <= label < num_classes:
            raise SkippedSample("bad_label", f"label {label!r} outside 0..{num_classes - 1}")
    return labels
