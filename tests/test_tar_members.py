"""The loader's tar reader against webdataset's (tarfile) on the formats shard writers emit, and on damaged tars."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from data_pipeline.format.tar_reader import tar_members

LONG_DIR = "class_" + "x" * 120  # beyond ustar's 100-byte name field


def archive(tar_format: int, members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as tar:
        folder = tarfile.TarInfo("images/")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("images/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


MEMBERS = [
    ("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("000001.cls", b"3"),
    ("__index__", b"not a sample"),
    ("000002.jpg", b""),
    ("000002.json", b'{"labels": [1, 2]}'),
    (f"{LONG_DIR}/000003.jpg", b"x" * 513),
    ("café/000004.jpg", b"y" * 512),
    ("sub/__meta__/a.txt", b"z"),
]


def members(read, data: bytes) -> list[tuple[str, bytes]]:
    return [(member["fname"], member["data"]) for member in read(io.BytesIO(data))]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_same_members_as_webdataset(tar_format: int):
    # ustar keeps the long folder in its name prefix, GNU in a long-name member, pax in a path record
    entries = MEMBERS if tar_format != tarfile.USTAR_FORMAT else [m for m in MEMBERS if "é" not in m[0]]
    data = archive(tar_format, entries)
    ours = members(tar_members, data)
    assert ours == members(tar_file_iterator, data)
    assert [name for name, _ in ours] == [name for name, _ in entries if not name.startswith("__")]


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_each_member_has_the_offset_of_its_first_header_and_a_read_can_start_there(tar_format: int):
    # a long name's GNU or pax header comes before the member's own: a read that starts at the member starts there
    data = archive(tar_format, MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as reader:
        infos = reader.getmembers()
    expected = [(info.name, info.offset) for info in infos if info.isreg() and not info.name.startswith("__")]
    found = list(tar_members(io.BytesIO(data)))
    assert [(member["fname"], member["offset"]) for member in found] == expected
    for k, member in enumerate(found):
        rest = list(tar_members(io.BytesIO(data[member["offset"] :]), member["offset"]))
        assert rest == found[k:]


def test_compressed_tars_are_read_by_webdataset():
    data = gzip.compress(archive(tarfile.PAX_FORMAT, MEMBERS))
    assert members(tar_members, data) == members(tar_file_iterator, data)


def test_damaged_tars_raise_what_the_loader_counts():
    data = archive(tarfile.PAX_FORMAT, MEMBERS)
    with pytest.raises(EOFError, match="ends inside a member"):
        members(tar_members, data[: BLOCK_OF_FIRST_DATA + 100])
    with pytest.raises(EOFError, match="inside a member header"):
        members(tar_members, data[: BLOCK_OF_FIRST_DATA - 100])
    damaged = bytearray(data)
    damaged[10] ^= 0xFF  # a byte of the first header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        members(tar_members, bytes(damaged))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        members(tar_members, b"<html>not a tar</html>".ljust(2048))
    with pytest.raises(tarfile.ReadError, match="empty"):
        members(tar_members, b"")
    pax = tarfile.TarInfo("bad")
    pax.type, pax.size = tarfile.XHDTYPE, 512
    looping = pax.tobuf(tarfile.USTAR_FORMAT) + b"0 path=x\n".ljust(512, b"\0")  # a record length of 0
    with pytest.raises(tarfile.ReadError, match="pax record"):
        members(tar_members, looping)


BLOCK_OF_FIRST_DATA = 3 * 512  # the directory's header, the link's header, the first file's header
