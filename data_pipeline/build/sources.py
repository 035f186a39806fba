"""Input corpora as a deterministic stream of rows: image-folder trees and manifests (CSV, TSV, JSONL, Parquet).

A row has a stable key (a hash of where it comes from, so keys are the same in every run and safe as tar member
names), a source URL, the file it names (`identity`: how duplicates are found, in plan.py), its label(s) and extra
metadata. Rows that can be rejected without reading the image (no path, no label, a name that is not UTF-8) carry
their failure reason along, so they are counted and listed like every other skipped sample. Nothing here holds more
than one manifest batch or one folder listing: a corpus of 300M rows streams through.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_pipeline.commands import UserError
from data_pipeline.storage import filesystem, open_url

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PATH_COLUMNS = ("path", "url", "image", "image_path", "file", "filepath")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 65_536
"""Rows per record batch read from a Parquet manifest: a few MB of keys and labels at a time."""
TEXT_READ_BYTES = 4 << 20
"""Bytes per read of a CSV, TSV or JSONL manifest."""


class InputError(UserError):
    """The input as a whole is unusable (missing, unreadable, wrong columns): a one-line message, exit 2."""


@dataclass
class Row:
    key: str
    source: str
    labels: list[Any] | None
    """Raw label values (names or integers) as found in the input; None when the corpus has no labels."""
    metadata: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    """A reason this row is skipped before its image is read."""
    identity: str | None = None
    """The file the row names (see `identity`); None when it names none (no path, a name that is not UTF-8)."""
    label_indices: list[int] = field(default_factory=list)


def row_key(identity: str) -> str:
    # surrogateescape: a file name that is not UTF-8 still has a key (its row is then skipped as bad_file_name)
    return hashlib.sha1(identity.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def read_image_folder(url: str, storage_options: dict[str, Any]) -> Iterator[Row | None]:
    """Every image under `url` in sorted order, one folder listing at a time; its label is the first-level folder
    it sits in (deeper folders belong to it). A file that is not an image yields None (ignored, and counted)."""
    fs, root = filesystem(url, storage_options)
    if not fs.isdir(root):
        raise InputError(f"{url}: no such folder; pass an image-folder tree or a manifest file")
    protocol = fsspec.utils.get_protocol(url)
    root = root.rstrip("/")
    for path in _sorted_files(fs, root):
        relative = posixpath.relpath(path, root)
        if _suffix(relative) not in IMAGE_EXTENSIONS:
            yield None
            continue
        parts = relative.split("/")
        source = path if protocol in ("file", "local") else f"{protocol}://{path}"
        row = Row(key=row_key(relative), source=source, labels=[parts[0]] if len(parts) > 1 else None)
        if not _is_utf8(relative):
            row.source, row.labels = relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), None
            row.failure = "bad_file_name"  # no label, no read: the name cannot be written into a shard or a record
        else:
            row.identity = identity(source)
            if len(parts) == 1:
                row.failure = "missing_label"
        yield row


def _sorted_files(fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[str]:
    """The files under `folder`, depth first, each folder's entries in sorted order: the same order on every run and
    machine, holding one folder's listing at a time (`find` lists the whole tree at once)."""
    try:
        entries = sorted(fs.ls(folder, detail=True), key=lambda entry: entry["name"])
    except OSError as error:  # find() skipped such a folder: its images were silently missing
        raise InputError(f"{folder}: cannot list it ({type(error).__name__}); fix its permissions or move it") from None
    fs.invalidate_cache(folder)  # object stores cache every listing: the tree would pile up in memory
    for entry in entries:
        name = entry["name"].rstrip("/")
        if entry["type"] == "directory":
            if name != folder:  # some object stores list the folder itself
                yield from _sorted_files(fs, name)
        else:
            yield name


def _records(url: str, storage_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The manifest's rows one at a time, never the whole file in memory: Parquet by record batches, CSV, TSV and
    JSONL by lines."""
    try:
        with open_url(url, "rb", storage_options) as handle:
            if _suffix(url) == ".parquet":
                yield from _parquet_records(url, handle)
            elif _suffix(url) == ".jsonl":
                yield from _jsonl_records(url, _text_lines(url, handle))
            else:
                yield from csv.DictReader(_text_lines(url, handle), delimiter="\t" if _suffix(url) == ".tsv" else ",")
    except FileNotFoundError:
        raise InputError(f"{url}: no such manifest file") from None


def _parquet_records(url: str, handle: Any) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet is read from its footer, so the file must seek; fsspec's streaming HTTP files (a server without
    # ranges or sizes) say seekable() and then cannot
    try:
        handle.seek(0, os.SEEK_END)
        handle.seek(0)
    except (ValueError, OSError):  # then the file is read whole
        handle = io.BytesIO(handle.read())
    try:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except pa.ArrowException as error:
        raise InputError(f"{url}: not a readable Parquet file ({error})") from None


def _binary_lines(handle: Any) -> Iterator[bytes]:
    """The lines of a file, each with its b"\\n", read in large blocks: fsspec's readline on s3:// and http(s)://
    files fetches a whole block per line and seeks back (quadratic in the file), and a non-seekable HTTP stream
    cannot seek at all."""
    rest = b""
    while block := handle.read(TEXT_READ_BYTES):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _text_lines(url: str, handle: Any) -> Iterator[str]:
    """The lines of a text manifest, decoded as UTF-8 (a leading byte-order mark dropped)."""
    offset = 0
    for number, raw in enumerate(_binary_lines(handle)):
        if number == 0 and raw.startswith(codecs.BOM_UTF8):
            raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(
                f"{url}: not UTF-8 text (byte {offset + error.start}); save the manifest as UTF-8"
            ) from None
        offset += len(raw)


def _jsonl_records(url: str, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{url}:{number}: invalid JSON line ({error.msg})") from None
        if not isinstance(record, dict):
            raise InputError(
                f"{url}:{number}: a {type(record).__name__}, not a JSON object; each line must be one row "
                'such as {"path": "a.jpg", "label": "cat"}'
            )
        yield record


def _label_values(value: Any) -> list[Any] | None:
    """A cell -> list of raw labels; JSON lists are accepted in CSV/TSV cells; None for an empty cell."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve(source: str, manifest_url: str) -> str:
    """Relative paths in a manifest are relative to the manifest's folder."""
    if "://" in source or source.startswith("/"):
        return source
    return posixpath.join(posixpath.dirname(manifest_url), source)


def identity(source: str) -> str:
    """What makes two sources the same file: a local path made absolute and normalised (`one.png`, `./one.png` and
    its absolute path are one file; symlinks are not followed), a URL as written."""
    if "://" in source and not source.startswith("file://"):
        return source
    return os.path.abspath(source.removeprefix("file://"))


def read_manifest(
    url: str, storage_options: dict[str, Any], path_column: str | None, label_column: str | None
) -> Iterator[Row]:
    """The manifest's rows in file order; the columns are checked on the first row, before any is yielded."""
    with contextlib.closing(_records(url, storage_options)) as records:  # the file is closed on an error too
        yield from _manifest_rows(url, records, path_column, label_column)


def _manifest_rows(
    url: str, records: Iterator[dict[str, Any]], path_column: str | None, label_column: str | None
) -> Iterator[Row]:
    first = next(records, None)
    if first is None:
        raise InputError(f"{url}: the manifest has no rows")
    columns = list(first)
    path_column = path_column or next((name for name in PATH_COLUMNS if name in columns), None)
    if path_column not in columns:
        raise InputError(f"{url}: no path column; found {', '.join(columns)}; pass --path-column NAME")
    if label_column is not None and label_column not in columns:
        raise InputError(
            f"{url}: no label column {label_column!r}; found {', '.join(columns)}; pass --label-column "
            f"NAME or --no-labels"
        )
    # a row may lack a column the first row has (JSONL): skipped and counted, not a crash
    for record in itertools.chain([first], records):
        source = str(record.get(path_column) or "")
        labels = _label_values(record.get(label_column)) if label_column else None
        extra = {k: v for k, v in record.items() if k not in (path_column, label_column)}
        row = Row(key=row_key(source), source=_resolve(source, url), labels=labels, metadata=extra)
        if not source:
            row.failure = "missing_path"
        else:
            row.identity = identity(row.source)
            if label_column and labels is None:
                row.failure = "missing_label"
        yield row


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


class LabelCensus:
    """The class table of a corpus, collected one row at a time: the names in sorted order, or, if every label is
    an integer, the integers themselves as indices."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.integers = True
        self.top = -1

    def add(self, labels: list[Any]) -> None:
        for value in labels:
            self.names.add(str(value))
            if self.integers:  # one name settles it for the rest of the corpus
                number = _as_int(value)
                if number is None:
                    self.integers = False
                else:
                    self.top = max(self.top, number)

    def table(self) -> dict[str, int]:
        if self.names and self.integers:
            return {str(index): index for index in range(self.top + 1)}
        return {name: index for index, name in enumerate(sorted(self.names))}


class ClassTable:
    """Class name -> index, and the mapping of a row's raw labels through it."""

    def __init__(self, classes: dict[str, int], given: bool):
        self.classes = classes
        # integer labels are also taken as indices of a given table
        self._given_indices = set(classes.values()) if given else set()

    def indices(self, labels: list[Any]) -> list[int] | None:
        """The sorted class indices of a row's raw labels; None when one is not in the table (an unknown_label)."""
        indices = set()
        for value in labels:
            index = self.classes.get(str(value))
            if index is None and _as_int(value) in self._given_indices:
                index = _as_int(value)
            if index is None:
                return None
            indices.add(index)
        return sorted(indices)


CLASSES_FORMS = "give a JSON object of name -> index, a JSON list of names, or a text file of one name per line"


def load_classes(url: str, storage_options: dict[str, Any]) -> dict[str, int]:
    """A class table from JSON (an object name -> index, or a list of names) or a text file of one name per line."""
    try:
        with open_url(url, "r", storage_options) as handle:
            text = handle.read()
    except FileNotFoundError:
        raise InputError(f"{url}: no such classes file") from None
    if url.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{url}: not JSON ({error.msg} at line {error.lineno}); {CLASSES_FORMS}") from None
        if isinstance(data, list) and all(isinstance(name, str | int) for name in data):
            return {str(name): i for i, name in enumerate(data)}
        if isinstance(data, dict) and all(_as_int(index) is not None for index in data.values()):
            return {str(name): int(index) for name, index in data.items()}
        raise InputError(f"{url}: a JSON {type(data).__name__} that is no class table; {CLASSES_FORMS}")
    return {line.strip(): i for i, line in enumerate(line for line in text.splitlines() if line.strip())}
