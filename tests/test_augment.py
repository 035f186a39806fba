"""Decode-and-crop against torchvision's transforms on the same images, and the reduced-scale decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from imaging import jpeg_bytes, photo
from PIL import Image
from torchvision import transforms

from data_pipeline.augment import Augment, centre_box, decode, random_resized_box


def test_evaluation_crop_matches_torchvision_resize_and_centre_crop():
    data = jpeg_bytes(640, 480, seed=1, quality=95)
    ours = decode(data, Augment(224, train=False), np.random.default_rng(0)).float()
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    theirs = reference(Image.open(io.BytesIO(data)).convert("RGB")).float()
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mean() < 2.0  # grey levels: same region, both antialiased bilinear


def test_reduced_scale_decode_keeps_the_crop_sharp():
    # a crop of 600 px out of 1200 px decodes at 1/2 scale; it must match the crop of a full decode
    data = jpeg_bytes(1200, 900, seed=2, quality=95)
    augment = Augment(256, train=False, eval_crop_fraction=2 / 3)
    fast = decode(data, augment, np.random.default_rng(0)).float()
    left, top, w, h = centre_box(1200, 900, 2 / 3)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR,
                                                              box=(left, top, left + w, top + h))
    assert (fast - torch.from_numpy(np.array(full)).permute(2, 0, 1).float()).abs().mean() < 2.5


def test_random_crops_cover_the_configured_area_and_ratio_ranges():
    rng = np.random.default_rng(0)
    boxes = [random_resized_box(640, 480, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    areas = np.array([w * h / (640 * 480) for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert all(left >= 0 and top >= 0 and left + w <= 640 and top + h <= 480 for left, top, w, h in boxes)
    assert areas.min() == pytest.approx(0.08, abs=0.01) and areas.max() > 0.9
    assert ratios.min() > 0.74 and ratios.max() < 1.35


def test_same_key_same_crop_and_png_input():
    augment = Augment(64, train=True)
    data = jpeg_bytes(200, 150, seed=3)
    first = decode(data, augment, augment.rng(seed=1, epoch=0, key="k"))
    again = decode(data, augment, augment.rng(seed=1, epoch=0, key="k"))
    other_epoch = decode(data, augment, augment.rng(seed=1, epoch=1, key="k"))
    assert torch.equal(first, again) and not torch.equal(first, other_epoch)
    png = io.BytesIO()
    photo(200, 150, seed=3).convert("RGBA").save(png, format="PNG")
    assert decode(png.getvalue(), augment, np.random.default_rng(0)).shape == (3, 64, 64)
