"""Decode, normalise and re-encode one image for a shard.

EXIF orientation applied, converted to RGB with transparent pixels composited on white, high-bit-depth grayscale
scaled into 8 bits by its type's range (16-bit: value / 257; 32-bit integers: [0, 2^31 - 1]; floats: [0, 1]) rather
than clipped, shorter side brought down to `max_side` (never up), JPEG at `quality`. Large JPEGs are decoded at a
reduced DCT scale (1/2, 1/4 or 1/8) chosen by PIL's `draft` so that the decoded image is still at least the target
size: the final resize then only ever shrinks, which is as exact as decoding in full and several times cheaper.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

HIGH_BIT_DEPTH_SCALE = {"I;16": 1 / 257, "I;16L": 1 / 257, "I;16B": 1 / 257, "I": 255 / (2**31 - 1), "F": 255.0}
"""Factor from a high-bit-depth grayscale mode's values to 0-255: PIL's convert clips them instead (a 16-bit PNG of
mid-grey came out white, a float TIFF in [0, 1] black)."""


class SampleError(Exception):
    """A sample that cannot go into a shard; `reason` is one of the counted categories."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    max_side: int = 512
    """Shorter side of the stored image at most this many pixels."""
    quality: int = 95
    """JPEG quality of re-encoded images."""
    max_pixels: int = 89_478_485
    """Images with more pixels are skipped as possible decompression bombs (PIL's default limit)."""
    reencode: bool = True
    """False keeps the original bytes of a valid JPEG that needs no rotation, conversion or resizing."""


@dataclass(frozen=True)
class EncodedImage:
    jpeg: bytes
    original_size: tuple[int, int]
    """(width, height) of the source after EXIF orientation."""
    size: tuple[int, int]
    """(width, height) stored."""


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    shorter = min(width, height)
    if shorter <= max_side:
        return size
    scale = max_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_DEPTH_SCALE:
        values = np.asarray(image, dtype=np.float64) * HIGH_BIT_DEPTH_SCALE[image.mode]
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _transposed(size: tuple[int, int], image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation (orientations 5-8 swap width and height)."""
    orientation = image.getexif().get(0x0112, 1)
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def encode_image(data: bytes, options: ImageOptions) -> EncodedImage:
    """Raise SampleError("empty" | "not_an_image" | "too_many_pixels" | "truncated") for unusable input."""
    if not data:
        raise SampleError("empty", "zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SampleError("not_an_image", "not a format PIL can identify") from None
    except Image.DecompressionBombError as error:  # PIL's own limit, where this process keeps it (see worker.py)
        raise SampleError("too_many_pixels", str(error)) from None
    except Exception as error:  # PIL raises many types for malformed headers
        raise SampleError("not_an_image", f"{type(error).__name__}: {error}") from None
    if image.width * image.height > options.max_pixels:
        raise SampleError("too_many_pixels", f"{image.width}x{image.height} exceeds --max-pixels {options.max_pixels}")
    try:
        original = _transposed(image.size, image)
        target = _target_size(original, options.max_side)
        keep_original = (
            not options.reencode
            and image.format == "JPEG"
            and image.mode == "RGB"
            and original == image.size
            and image.getexif().get(0x0112, 1) == 1
            and target == original
        )
        if image.format == "JPEG" and target != original:
            scale = target[0] / original[0]
            image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        # full decode: truncated files fail here, not later in a training run (no decompression-bomb warning can
        # come: workers lift PIL's limit, the --max-pixels check above replaces it)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise SampleError("truncated", f"{type(error).__name__}: {error}") from None
    if keep_original:
        return EncodedImage(jpeg=data, original_size=original, size=original)
    image = _to_rgb(ImageOps.exif_transpose(image))
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=None)
    out = io.BytesIO()
    # a restart marker after every row of MCUs lets the loader decode only the rows a crop needs
    # (data_pipeline/load/jpeg_band.py), for about 100 bytes per image
    image.save(out, format="JPEG", quality=options.quality, restart_marker_rows=1)
    return EncodedImage(jpeg=out.getvalue(), original_size=original, size=image.size)
