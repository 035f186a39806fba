"""Decode a stored JPEG straight into the training crop: random-resized (Inception) crop and flip, or the evaluation
resize and centre crop, as uint8 3 x H x W.

Why not torchvision's `RandomResizedCrop` on a decoded image: decoding is most of the cost, and a JPEG can be
decoded at 1/2, 1/4 or 1/8 scale inside the IDCT (PIL's `draft`) for much less work. We choose the crop box on the
undecoded image's size first, then decode at the smallest scale that still leaves at least `image_size` pixels
across the crop in both directions, so the output has the same resolution as a full decode would give. The crop and
the resize run in torch (antialiased bilinear, like torchvision's). Crops that need the full scale are decoded by
torchvision's libjpeg-turbo binding instead of PIL, which is faster at full size. Either way only the band of rows
the crop covers is decoded, where the JPEG's restart markers allow it (data_pipeline/load/jpeg_band.py).

The randomness of a sample comes from its own generator, seeded by (seed, epoch, key), so a sample gets the same
crop whichever worker decodes it and whenever: a resumed run sees the same pixels.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipeline.load.jpeg_band import row_band, strip_layout

Box = tuple[float, float, float, float]  # left, top, width, height in pixels of the stored image
DCT_SCALES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Augment:
    image_size: int
    train: bool
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area of the random crop as a share of the image (Inception crop)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range of the random crop."""
    hflip: bool = True
    eval_crop_fraction: float = 0.875
    """Evaluation: the centre crop covers this share of the shorter side (resize to 256, crop 224)."""

    def rng(self, seed: int, epoch: int, key: str) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def random_resized_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """The Inception crop: area and log-aspect uniform in their ranges, 10 tries, then the centre at clamped ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def centre_box(width: int, height: int, fraction: float) -> Box:
    side = min(width, height) * fraction
    return (width - side) / 2, (height - side) / 2, side, side


def _pixels(data: bytes, rgb_jpeg: bool, reduction: int) -> torch.Tensor:
    """`data` decoded as uint8 3 x H' x W', at 1/reduction scale or more (JPEG only)."""
    if rgb_jpeg and reduction == 1:
        # libjpeg-turbo straight into a tensor: about half of PIL's time at full size (no RGBX layout, no copies)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG" and reduction > 1:
        # draft picks the largest power-of-two scale s with size // requested >= s on both axes; asking for
        # ceil(size / reduction) would give s = 1 for every odd width (683 // 342 == 1)
        image.draft("RGB", (image.width // reduction, image.height // reduction))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # np.array: torch wants a writable buffer


def _check_pixel_count(width: int, height: int) -> None:
    """PIL's decompression-bomb limit, for JPEGs whose size is read without PIL."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise Image.DecompressionBombError(f"{width} x {height} pixels is more than twice PIL's MAX_IMAGE_PIXELS")


def decode(data: bytes, augment: Augment, rng: np.random.Generator) -> torch.Tensor:
    """The augmented crop of one encoded image as uint8 3 x H x W. Raises PIL/OSError exceptions on corrupt data."""
    layout = strip_layout(data)  # JPEGs as build-shards writes them: the size is in the frame header PIL would read
    if layout is not None:
        width, height, rgb_jpeg = layout.width, layout.height, layout.components == 3
        _check_pixel_count(width, height)
    else:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        rgb_jpeg = image.format == "JPEG" and image.mode == "RGB"
    if augment.train:
        left, top, w, h = random_resized_box(width, height, rng, augment.crop_scale, augment.crop_ratio)
        flip = augment.hflip and rng.random() < 0.5
    else:
        left, top, w, h = centre_box(width, height, augment.eval_crop_fraction)
        flip = False
    size = augment.image_size
    reduction = max(1, min(8, int(min(w, h) // size)))
    band_top = 0
    if layout is not None:  # only the rows the crop needs (data_pipeline/load/jpeg_band.py)
        band = row_band(data, layout, math.floor(top), math.ceil(top + h), edge_rows=2 * reduction)
        if band is not None:
            data, band_top = band.jpeg, band.top
    pixels = _pixels(data, rgb_jpeg, reduction)
    # rows and columns in the (DCT-scaled) whole image's coordinates; rows then shifted into the band
    scale = next(k for k in DCT_SCALES if math.ceil(width / k) == pixels.shape[2])
    sy, sx = height / math.ceil(height / scale), width / pixels.shape[2]
    first_row, shift = round(top / sy), band_top // scale
    rows = slice(first_row - shift, max(first_row + 1, round((top + h) / sy)) - shift)
    cols = slice(round(left / sx), max(round(left / sx) + 1, round((left + w) / sx)))
    crop = pixels[None, :, rows, cols].contiguous(memory_format=torch.channels_last)
    # torch's antialiased bilinear has a fast uint8 path for channels-last images; PIL's resize is slower here
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return crop.flip(2) if flip else crop
