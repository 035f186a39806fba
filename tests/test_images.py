"""Per-image processing: orientation, colour, size limits, bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from imaging import jpeg_bytes, photo
from PIL import Image

from data_pipeline.build.images import ImageOptions, SampleError, encode_image


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_shorter_side_is_capped_and_never_upscaled() -> None:
    big = encode_image(jpeg_bytes(800, 600, seed=0), ImageOptions(max_side=300))
    assert big.original_size == (800, 600)
    assert big.size == (400, 300) == decode(big.jpeg).size
    small = encode_image(jpeg_bytes(120, 90, seed=0), ImageOptions(max_side=300))
    assert small.size == (120, 90)


def test_reduced_dct_decode_matches_a_full_decode() -> None:
    data = jpeg_bytes(1600, 1200, seed=1)
    fast = np.asarray(decode(encode_image(data, ImageOptions(max_side=150, quality=100)).jpeg), dtype=np.float32)
    full = decode(data).convert("RGB").resize((200, 150), Image.Resampling.BICUBIC, reducing_gap=None)
    # Different decode paths: compare on average, not per pixel (JPEG noise at quality 100 is about 1 level).
    assert np.abs(fast - np.asarray(full, dtype=np.float32)).mean() < 3.0


def test_exif_orientation_is_applied() -> None:
    image = photo(80, 40, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    result = encode_image(out.getvalue(), ImageOptions())
    assert result.size == (40, 80) and result.original_size == (40, 80)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent black
    out = io.BytesIO()
    image.save(out, format="PNG")
    pixels = decode(encode_image(out.getvalue(), ImageOptions(quality=100)).jpeg).convert("RGB")
    assert all(channel > 240 for channel in pixels.getpixel((4, 16)))
    red = pixels.getpixel((28, 16))
    assert red[0] > 240 and red[1] < 20


def test_no_reencode_keeps_valid_jpeg_bytes_unless_work_is_needed() -> None:
    data = jpeg_bytes(100, 80, seed=3)
    assert encode_image(data, ImageOptions(reencode=False)).jpeg == data
    assert encode_image(data, ImageOptions(reencode=True)).jpeg != data
    assert encode_image(data, ImageOptions(reencode=False, max_side=40)).jpeg != data  # must shrink


@pytest.mark.parametrize(
    ("data", "options", "reason"),
    [
        (b"", ImageOptions(), "empty"),
        (b"this is a text file, not an image", ImageOptions(), "not_an_image"),
        (jpeg_bytes(200, 200, seed=4)[:1500], ImageOptions(), "truncated"),
        (jpeg_bytes(200, 200, seed=4), ImageOptions(max_pixels=10_000), "too_many_pixels"),
    ],
)
def test_bad_files_raise_a_counted_reason(data: bytes, options: ImageOptions, reason: str) -> None:
    with pytest.raises(SampleError) as error:
        encode_image(data, options)
    assert error.value.reason == reason
