"""Decode-and-crop against torchvision's transforms on the same images, and the reduced-scale decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from imaging import jpeg_bytes, photo
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipeline.build.images import ImageOptions, encode_image
from data_pipeline.load import augment as augment_module
from data_pipeline.load.augment import Augment, centre_box, decode, random_resized_box
from data_pipeline.load.jpeg_band import row_band, strip_layout


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
    full = (
        Image.open(io.BytesIO(data))
        .convert("RGB")
        .resize((256, 256), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    )
    assert (fast - torch.from_numpy(np.array(full)).permute(2, 0, 1).float()).abs().mean() < 2.5


@pytest.mark.parametrize(("size", "crop", "decoded_width"), [((683, 512), 448, 342), ((1001, 750), 900, 251)])
def test_crops_of_odd_sized_images_decode_at_reduced_scale(
    size: tuple[int, int], crop: int, decoded_width: int, monkeypatch: pytest.MonkeyPatch
):
    # 683 x 512 with a 448 px crop to 224: half scale; 1001 x 750 with a 900 px crop to 224: quarter scale
    data = encode_image(jpeg_bytes(*size, seed=4, quality=95), ImageOptions(max_side=1024, quality=90)).jpeg
    decoded = []
    real_pixels = augment_module._pixels

    def recorded_pixels(*args, **kwargs) -> torch.Tensor:
        decoded.append(real_pixels(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(augment_module, "_pixels", recorded_pixels)
    out = decode(data, Augment(224, train=False, eval_crop_fraction=crop / size[1]), np.random.default_rng(0))
    assert out.shape == (3, 224, 224) and decoded[0].shape[2] == decoded_width


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


def stored_jpeg(width: int, height: int, seed: int) -> bytes:
    """An image as build-shards stores it (re-encoded, restart marker per MCU row)."""
    source = jpeg_bytes(width + 8, height + 8, seed, quality=98)  # re-encoding needs a resize or conversion
    return encode_image(source, ImageOptions(max_side=min(width, height))).jpeg


def full_decode(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def scaled_decode(data: bytes, reduction: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (image.width // reduction, image.height // reduction))  # as the loader asks PIL
    return np.array(image.convert("RGB"))


@pytest.mark.parametrize("size", [(683, 512), (512, 683), (300, 221)])
def test_a_row_band_decodes_to_the_same_pixels_as_the_whole_image(size: tuple[int, int]):
    data = stored_jpeg(*size, seed=3)
    width, height = Image.open(io.BytesIO(data)).size
    whole = full_decode(data)
    whole_half = scaled_decode(data, 2)
    layout = strip_layout(data)
    assert layout is not None and (layout.width, layout.height, layout.components) == (width, height, 3)
    rng = np.random.default_rng(0)
    # random bands, and bands whose ends sit on and next to the 16-row strip edges, where a band is cut
    near = (-2, -1, 0, 1, 2)
    edges = [(16 * k + d, 16 * (k + 3) + e) for k in (1, 4, 7) for d in near for e in near]
    spans = [(int(top), int(rng.integers(top + 1, height + 1))) for top in rng.integers(0, height - 1, size=40)]
    for top, bottom in spans + edges:
        band = row_band(data, layout, top, bottom, edge_rows=1)
        if band is None:  # only when the band would be the whole image
            assert top < 32 and bottom > height - 32  # within a strip and its margin of both ends
            continue
        assert band.top <= top and band.top + band.height >= bottom and band.height < height
        pixels = full_decode(band.jpeg)
        assert pixels.shape == (3, band.height, width)
        # the rows asked for are exact; a neighbouring strip is there only when they reach a cut's edge row
        assert torch.equal(pixels[:, top - band.top : bottom - band.top], whole[:, top:bottom]), (top, bottom)
        assert band.top > top - 17 and band.top + band.height < bottom + 17
        # at half scale (the loader's rounding of rows included) with the margin the loader asks for
        band = row_band(data, layout, top, bottom, edge_rows=4)
        if band is None:
            continue
        start, stop = round(top / 2), max(round(top / 2) + 1, round(bottom / 2))
        half = scaled_decode(band.jpeg, 2)
        assert half.shape[1] == whole_half.shape[1]
        assert np.array_equal(half[start - band.top // 2 : stop - band.top // 2], whole_half[start:stop]), (top, bottom)


def test_jpegs_without_the_layout_are_decoded_whole():
    stored = stored_jpeg(320, 240, seed=4)
    assert strip_layout(stored) is not None
    out = io.BytesIO()
    Image.open(io.BytesIO(stored)).save(out, format="JPEG", quality=90, progressive=True, restart_marker_rows=1)
    png = io.BytesIO()
    photo(64, 48, seed=0).save(png, format="PNG")
    for data in (
        jpeg_bytes(320, 240, seed=4),  # no restart markers (a camera's file, or --no-reencode)
        out.getvalue(),  # progressive
        stored[:2000],
        stored[:300],
        stored[:3],
        b"",
        png.getvalue(),
    ):
        assert strip_layout(data) is None


def test_decoding_a_band_gives_the_crops_of_a_whole_decode(monkeypatch: pytest.MonkeyPatch):
    # the same samples, keys and seeds with banding turned off: identical training crops and evaluation crops
    data = stored_jpeg(683, 512, seed=5)
    augments = [Augment(224, train=True), Augment(96, train=True), Augment(224, train=False)]
    banded = [decode(data, augment, np.random.default_rng(n)) for augment in augments for n in range(30)]
    monkeypatch.setattr("data_pipeline.load.augment.row_band", lambda *args, **kwargs: None)
    whole = [decode(data, augment, np.random.default_rng(n)) for augment in augments for n in range(30)]
    assert all(torch.equal(a, b) for a, b in zip(banded, whole, strict=True))


def test_the_decompression_bomb_limit_holds_without_pil_reading_the_header(monkeypatch: pytest.MonkeyPatch):
    data = stored_jpeg(683, 512, seed=6)
    layout = strip_layout(data)  # the size comes from the frame header, not from PIL
    assert layout is not None
    decode(data, Augment(224, train=True), np.random.default_rng(0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", layout.width * layout.height // 2 - 1)
    with pytest.raises(Image.DecompressionBombError, match=f"{layout.width} x {layout.height}"):
        decode(data, Augment(224, train=True), np.random.default_rng(0))
