"""Small real images for tests: smooth gradients with texture, so JPEG sizes and costs look like photos'."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-0.5, 0.5, size=(2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    out = io.BytesIO()
    photo(width, height, seed).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (96, 72)) -> list[Path]:
    """root/<class>/<n>.jpg for `classes` = {name: count}; returns the files written."""
    files = []
    for c, (name, count) in enumerate(sorted(classes.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / name / f"{i:03d}.jpg"
            path.write_bytes(jpeg_bytes(*size, seed=1000 * c + i))
            files.append(path)
    return files
