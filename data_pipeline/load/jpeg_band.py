"""Decode only the rows of a JPEG that a crop needs.

build-shards writes every JPEG with a restart marker after each row of MCUs (the 8 or 16 pixel high strips the
encoder codes in order). A restart resets the decoder's DC predictions, so the entropy-coded data between two
markers decodes on its own: the strips a crop touches, with the frame header's height changed to theirs and the
markers renumbered from 0, form a valid smaller JPEG. The decoder then works through a band of the image instead of
all of it, and the rows asked for equal a full decode's. Only a band's outermost rows can differ: fancy chroma
upsampling blends each edge row with a chroma row from across the cut, which the band does not hold. So when the rows
asked for come that close to a strip's edge, the neighbouring strip is added as context; otherwise it is not decoded
(adding it always cost about a tenth of an average band's work). No library we depend on decodes a region
(libjpeg-turbo's jpeg_crop_scanline is not exposed by PIL or torchvision), hence this.

Only sequential JPEGs with one interleaved scan and a restart interval of one MCU row qualify (`strip_layout` says
which); anything else (progressive, no markers, an original kept by --no-reencode, malformed bytes) gives None and is
decoded whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOI, EOI = b"\xff\xd8", 0xD9
SEQUENTIAL_FRAMES = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
OTHER_FRAMES = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}  # progressive, lossless, arithmetic
SOS, DRI = 0xDA, 0xDD
RST0 = 0xD0
MARKER = re.compile(rb"\xff[^\x00]")  # inside entropy-coded data a 0xFF byte is stuffed with 0x00 unless a marker


@dataclass(frozen=True)
class Band:
    jpeg: bytes
    """A valid JPEG of full-image rows top .. top + height."""
    top: int
    height: int


@dataclass(frozen=True)
class StripLayout:
    width: int
    height: int
    components: int
    frame: int
    """Offset of the frame header's segment (its marker)."""
    mcu_height: int
    scan: int
    """Offset of the first entropy-coded byte."""
    strips: list[tuple[int, int]]
    """(start, end) of each MCU row's entropy-coded bytes."""


def strip_layout(data: bytes) -> StripLayout | None:
    """Where each MCU row's entropy-coded data lies, for JPEGs with the layout bands are cut from; else None."""
    try:
        return _strip_layout(data)
    except IndexError:  # truncated or malformed headers
        return None


def _strip_layout(data: bytes) -> StripLayout | None:
    if not data.startswith(SOI):
        return None
    pos, frame, restart_interval = 2, None, None
    while True:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in OTHER_FRAMES:
            return None
        if marker in SEQUENTIAL_FRAMES:
            frame = pos
        elif marker == DRI:
            restart_interval = int.from_bytes(data[pos + 4 : pos + 6], "big")
        elif marker == SOS:
            break
        pos += 2 + length
    if frame is None or not restart_interval:
        return None
    height, width = (
        int.from_bytes(data[frame + 5 : frame + 7], "big"),
        int.from_bytes(data[frame + 7 : frame + 9], "big"),
    )
    components = data[frame + 9]
    sampling = [data[frame + 11 + 3 * i] for i in range(components)]
    mcu_width, mcu_height = 8 * max(s >> 4 for s in sampling), 8 * max(s & 15 for s in sampling)
    if data[pos + 4] != components or height == 0:  # not one interleaved scan of every component
        return None
    if restart_interval != -(-width // mcu_width):  # a restart per MCU row, no more, no less
        return None
    scan = pos + 2 + length
    strips, start = [], scan
    for match in MARKER.finditer(data, scan):
        code = match.group()[1]
        if code == EOI:
            strips.append((start, match.start()))
            break
        if code & 0xF8 != RST0:  # another scan or table: not the single-scan layout we cut
            return None
        strips.append((start, match.start()))
        start = match.end()
    else:
        return None
    if len(strips) != -(-height // mcu_height):
        return None
    return StripLayout(width, height, components, frame, mcu_height, scan, strips)


def row_band(data: bytes, layout: StripLayout, top: int, bottom: int, edge_rows: int) -> Band | None:
    """The smallest JPEG holding full-image rows [top, bottom) decoded exactly as in the whole image, cut from `data`
    with its `layout`; None when that is the whole image.

    `edge_rows`: how close (in full-image rows) the rows asked for may come to a cut before the strip beyond it is
    added. One row is enough at full scale; rows taken from a decode at 1/r scale are rounded, which 2r covers.
    """
    step = layout.mcu_height
    first, last = top // step, -(-bottom // step)
    if top - first * step < edge_rows:
        first = max(0, first - 1)
    if last * step - bottom < edge_rows:
        last = min(len(layout.strips), last + 1)
    if first == 0 and last == len(layout.strips):
        return None  # the whole image: nothing to cut
    band_top = first * step
    band_height = min(layout.height, last * step) - band_top
    header = data[: layout.frame + 5] + band_height.to_bytes(2, "big") + data[layout.frame + 7 : layout.scan]
    parts = []
    for n, (start, end) in enumerate(layout.strips[first:last]):
        if n:
            parts.append(bytes((0xFF, RST0 + (n - 1) % 8)))
        parts.append(data[start:end])
    return Band(header + b"".join(parts) + bytes((0xFF, EOI)), band_top, band_height)
