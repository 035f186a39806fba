"""Reading and writing through fsspec: local paths, file://, s3://, http(s)://, anything fsspec opens.

Writes are atomic: a reader never sees half a file. Locally that is a temporary name in the same folder and a
rename; on object stores a single PUT (or a completed multipart upload) is already all-or-nothing.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path inside it. Storage options apply to remote URLs only."""
    protocol = fsspec.utils.get_protocol(url)
    options = storage_options if protocol not in ("file", "local") else {}
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(fs: fsspec.AbstractFileSystem, *parts: str) -> str:
    return fs.sep.join(part.rstrip(fs.sep) for part in parts)


_TEMPORARY = re.compile(r".+\.tmp-[0-9a-f]{32}")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole small file so that readers see the old content or the new, never a mix."""
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Delete the temporary files a killed writer left in a local folder (object stores never have any)."""
    if is_local(fs) and os.path.isdir(folder):
        for entry in os.scandir(folder):
            if entry.is_file() and _TEMPORARY.fullmatch(entry.name):
                os.remove(entry.path)


def commit_file(local_tmp: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Move a finished local file to its final place: a rename on local disk, an upload otherwise."""
    if is_local(fs):
        os.replace(local_tmp, path)
    else:
        fs.put_file(local_tmp, path)
        os.remove(local_tmp)
