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


def tar_size(member_sizes: list[int]) -> int:
    """Bytes a tar takes on disk: a header block per member, data padded to blocks, end marker, record padding."""
    body = sum(BLOCK + _padded(size) for size in member_sizes) + 2 * BLOCK
    return -(-body // RECORD) * RECORD


class ShardWriter:
    def __init__(self, path: str):
        self.path = path
        # Kept open across add() calls; close() closes it.
        self._tar = tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.member_sizes: list[int] = []
        self.num_samples = 0

    def size_with(self, members: dict[str, bytes]) -> int:
        """Size of the finished shard if this sample were added."""
        return tar_size(self.member_sizes + [len(data) for data in members.values()])

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self.member_sizes.append(len(data))
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
