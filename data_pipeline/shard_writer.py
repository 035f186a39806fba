"""One WebDataset shard as a plain POSIX tar with fixed metadata, so the same samples give the same bytes.

Members of a sample are consecutive and share the key: `{key}.jpg`, `{key}.cls`, `{key}.json`. The shard is
written to a local temporary file and handed to `storage.commit_file` only when complete.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _member_blocks(sizes: list[int]) -> int:
    """Bytes the members take in a tar: a header block each, data padded to blocks."""
    return sum(BLOCK + _padded(size) for size in sizes)


def _finished(body: int) -> int:
    """Tar size for members taking `body` bytes: plus the end marker, padded to a whole record."""
    return -(-(body + 2 * BLOCK) // RECORD) * RECORD


class ShardWriter:
    def __init__(self, path: str):
        self.path = path
        # Kept open across add() calls; close() closes it.
        self._tar = tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.body_bytes = 0
        self.num_samples = 0

    def size_with(self, members: dict[str, bytes]) -> int:
        """Size of the finished shard if this sample were added."""
        return _finished(self.body_bytes + _member_blocks([len(data) for data in members.values()]))

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.body_bytes += _member_blocks([len(data) for data in members.values()])
        self.num_samples += 1

    def close(self) -> tuple[int, str]:
        """Finish the tar; return its size in bytes and sha256."""
        self._tar.close()
        digest = hashlib.sha256()
        size = 0
        with open(self.path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()
