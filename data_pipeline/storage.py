"""Reading and writing through fsspec: local paths, file://, s3://, http(s)://, anything fsspec opens.

Writes are atomic: a reader never sees half a file. Locally that is a temporary name in the same folder and a
rename; on object stores a single PUT (or a completed multipart upload) is already all-or-nothing.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

GENERIC_OPTIONS = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
"""Options every fsspec filesystem takes (its instance and listings caches)."""


@functools.cache
def _accepted(protocol: str) -> frozenset[str] | None:
    """The options the filesystem of `protocol` takes by name; None when its class cannot be looked up here."""
    try:
        parameters = inspect.signature(fsspec.get_filesystem_class(protocol).__init__).parameters.values()
    except (ImportError, ValueError):
        return None
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return frozenset(named | GENERIC_OPTIONS)


def options_for(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options that belong to `url`'s filesystem: those it takes by name. The user gives one set of
    options for a job; an object store's (endpoint_url, key, anon, config_kwargs) handed to HTTP's filesystem made
    every http(s) source of a build with S3 options unreadable, and local paths take none of them."""
    accepted = _accepted(fsspec.utils.get_protocol(url))
    options = dict(storage_options or {})
    return options if accepted is None else {name: value for name, value in options.items() if name in accepted}


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path inside it, with the storage options that apply to it."""
    return fsspec.core.url_to_fs(url, **options_for(url, storage_options))


def open_url(url: str, mode: str, storage_options: dict[str, Any] | None = None) -> Any:
    """`fsspec.open` with the storage options that apply to `url`."""
    return fsspec.open(url, mode, **options_for(url, storage_options))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_remote_url(url: str) -> bool:
    """Whether reading `url` waits on a network (s3://, http(s)://, ...) rather than on a local disk."""
    return fsspec.utils.get_protocol(url) not in ("file", "local")


def join(fs: fsspec.AbstractFileSystem, *parts: str) -> str:
    return fs.sep.join(part.rstrip(fs.sep) for part in parts)


SECRET_KEY = re.compile(r"(^key$|_key$|secret|password|passwd|token|credential|signature|auth)", re.IGNORECASE)
"""Names of storage options whose values are secrets: s3fs's key, secret and token, botocore's
aws_secret_access_key and aws_session_token inside client_kwargs, passwords, API tokens, ..."""
MASK = "***"


def masked(value: Any) -> Any:
    """Storage options (nested dicts and lists) with every secret-looking value replaced by MASK: what is written or
    printed anywhere (checkpoints, results, logs, messages) instead of the options themselves."""
    if isinstance(value, dict):
        return {key: MASK if SECRET_KEY.search(str(key)) and item else masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value


_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")


def masked_urls(text: str) -> str:
    """`text` with the user (and password) part of every URL in it replaced by MASK: `https://me:pw@host/x` becomes
    `https://***@host/x`."""
    return _URL_USERINFO.sub(f"{MASK}@", text)


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
