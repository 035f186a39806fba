"""Hostile and malformed input, built here and fed to the real entry points: each gives one `error:` line and exit 2,
or is skipped and counted, and nothing is silently ruined."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from faulty_proxy import serve_folder
from imaging import image_folder, jpeg_bytes
from PIL import Image

from data_pipeline import make_loader
from data_pipeline.build.builder import BuildOptions, Output
from data_pipeline.build.cli import main as build_shards
from data_pipeline.build.images import ImageOptions, encode_image
from data_pipeline.format.sample import SkippedSample, multi_labels, single_label
from data_pipeline.format.tar_reader import tar_members
from data_pipeline.format.tar_writer import ShardWriter, sample_blocks
from data_pipeline.load.augment import Augment, decode
from data_pipeline.load.shardlist import SourceError
from data_pipeline.load.stream import LoaderError
from data_pipeline.storage import options_for
from pretrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def index_of(output: Path) -> dict:
    return json.loads((output / "index.json").read_text())


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- images that PIL's convert("RGB") clips ---------------------------------------------------------------------


def stored_mean(image: Image.Image, fmt: str) -> float:
    data = io.BytesIO()
    image.save(data, format=fmt)
    encoded = encode_image(data.getvalue(), ImageOptions())
    return float(np.asarray(Image.open(io.BytesIO(encoded.jpeg)).convert("L")).mean())


@pytest.mark.parametrize(
    ("values", "fmt", "scale"),
    [
        (np.full((32, 32), 24_000, np.uint16), "PNG", 1 / 257),  # mode I;16: mid-grey, stored white before
        (np.full((32, 32), 2**30, np.int32), "TIFF", 255 / (2**31 - 1)),  # mode I
        (np.full((32, 32), 0.36, np.float32), "TIFF", 255.0),  # mode F in [0, 1]: stored black before
    ],
    ids=["16-bit png", "32-bit int tiff", "float tiff"],
)
def test_high_bit_depth_grayscale_is_scaled_not_clipped(values: np.ndarray, fmt: str, scale: float):
    expected = float(values.flat[0]) * scale
    assert stored_mean(Image.fromarray(values), fmt) == pytest.approx(expected, abs=2)


def test_building_leaves_the_process_wide_decompression_bomb_limit_alone(tmp_path: Path):
    limit = Image.MAX_IMAGE_PIXELS
    image_folder(tmp_path / "in", {"a": 2})
    assert build_shards([str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "0"]) == 0
    assert Image.MAX_IMAGE_PIXELS == limit is not None  # a loader in this process keeps PIL's check


# -- build-shards: rows skipped and counted ---------------------------------------------------------------------


def test_sources_too_large_are_skipped_unread_and_the_same_file_three_ways_is_one_sample(tmp_path: Path):
    image_folder(tmp_path / "img", {"a": 1})
    one = tmp_path / "img" / "a" / "000.jpg"
    rows = [
        {"path": "img/a/000.jpg", "label": "a"},
        {"path": "./img/a/000.jpg", "label": "a"},
        {"path": str(one), "label": "a"},
        {"path": "/dev/zero", "label": "a"},  # endless: read 2.7 GB three times before the cap
        {"label": "a"},  # a later JSONL row without the path key
    ]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    code = build_shards([str(manifest), "--output", str(out), "--max-source-bytes", "1000000", "--workers", "0"])
    index = index_of(out)
    assert code == 1  # more skipped than --max-error-fraction: finished, and said so
    assert index["splits"]["train"]["num_samples"] == 1
    assert index["skipped"] == {"duplicate": 2, "too_large": 1, "missing_path": 1}


def test_a_file_name_that_is_not_utf8_is_skipped_and_counted(tmp_path: Path):
    image_folder(tmp_path / "in", {"a": 2})
    (tmp_path / "in" / "a").joinpath(os.fsdecode(b"bad-\xff.jpg")).write_bytes(jpeg_bytes(32, 32, seed=1))
    out = tmp_path / "out"
    assert build_shards([str(tmp_path / "in"), "--output", str(out), "--workers", "0"]) == 1
    assert index_of(out)["skipped"] == {"bad_file_name": 1}
    assert index_of(out)["splits"]["train"]["num_samples"] == 2


# -- build-shards: a user's mistake is one line and exit 2 -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("rows.jsonl", '{"path": "a.jpg", "label": "a"}\n["a.jpg", "a"]\n', "rows.jsonl:2: a list, not a JSON object"),
        ("rows.csv", b"path,label\n\xff.jpg,a\n", "rows.csv: not UTF-8 text (byte 11)"),
        ("rows.parquet", b"PAR1 not really", "rows.parquet: not a readable Parquet file"),
    ],
)
def test_malformed_manifests_get_one_line(name: str, text: str | bytes, expected: str, tmp_path: Path, capsys):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    assert build_shards([str(path), "--output", str(tmp_path / "out")]) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("{not json", r"classes.json: not JSON \(Expecting"), ("7", "classes.json: a JSON int that is no class table")],
)
def test_a_classes_file_that_is_no_table_gets_one_line(text: str, expected: str, tmp_path: Path, capsys):
    image_folder(tmp_path / "in", {"a": 1})
    (tmp_path / "classes.json").write_text(text)
    code = build_shards(
        [str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--classes", str(tmp_path / "classes.json")]
    )
    assert code == 2
    assert re.search(expected, one_error_line(capsys))


def test_a_second_build_into_the_same_output_is_refused(tmp_path: Path, capsys):
    image_folder(tmp_path / "in", {"a": 1})
    out = tmp_path / "out"
    running = Output(BuildOptions(input=str(tmp_path / "in"), output=str(out)))
    running.check_writable()
    with running.locked():
        assert build_shards([str(tmp_path / "in"), "--output", str(out)]) == 2
    assert f"{out}: another build-shards is writing here" in one_error_line(capsys)
    assert build_shards([str(tmp_path / "in"), "--output", str(out)]) == 0  # once the first is done


def test_a_temporary_folder_that_cannot_take_the_plan_gets_one_line(tmp_path: Path, capsys, monkeypatch):
    image_folder(tmp_path / "in", {"a": 2})
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a-file" / "tmp"))  # as a full or read-only disk fails
    assert build_shards([str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {tmp_path / 'a-file' / 'tmp'}/build-shards-plan-") and "set TMPDIR" in line, line


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    served = tmp_path / "served"
    served.mkdir()
    with serve_folder(served) as url:
        yield served, url


def test_object_store_options_are_not_handed_to_http_sources(http_folder: tuple[Path, str], tmp_path: Path):
    served, url = http_folder
    (served / "x.jpg").write_bytes(jpeg_bytes(48, 32, seed=3))
    manifest = tmp_path / "rows.csv"
    manifest.write_text(f"url,label\n{url}/x.jpg,a\n")
    s3 = "--storage-option", "endpoint_url=http://127.0.0.1:9", "--storage-option", "anon=false"
    assert build_shards([str(manifest), "--output", str(tmp_path / "out"), *s3, "--workers", "0"]) == 0
    assert index_of(tmp_path / "out")["splits"]["train"]["num_samples"] == 1
    assert options_for("s3://bucket/x", {"anon": False}) == {"anon": False}
    assert options_for(f"{url}/x.jpg", {"anon": False}) == {} == options_for("/local/x.jpg", {"anon": False})


# -- the loader ----------------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    writer = ShardWriter(str(path))
    for n, members in enumerate(samples):
        writer.add(sample_blocks(f"{n:06d}", members))
    writer.close()


def test_a_member_header_declaring_an_enormous_size_is_a_read_error(tmp_path: Path):
    write_shard(tmp_path / "s.tar", [{"jpg": jpeg_bytes(16, 16, seed=0), "cls": b"0"}])
    data = bytearray((tmp_path / "s.tar").read_bytes())
    data[124:136] = b"\x80" + (2**62).to_bytes(11, "big")  # GNU base-256 size field
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\x00 " % sum(data[:512])  # a valid header, lying only about the size
    with pytest.raises(tarfile.ReadError, match="declares"):
        list(tar_members(io.BytesIO(bytes(data))))


def test_a_non_tar_in_a_brace_pattern_is_a_source_error(tmp_path: Path):
    write_shard(tmp_path / "s-0.tar", [{"jpg": jpeg_bytes(16, 16, seed=0), "cls": b"0"}])
    (tmp_path / "s-1.tar").write_bytes(b"<html>not a tar</html>" * 40)
    with pytest.raises(SourceError, match=r"s-1.tar: not a readable tar shard"):
        make_loader(str(tmp_path / "s-{0..1}.tar"), batch_size=1, num_workers=0)


def test_labels_outside_the_model_and_malformed_metadata_are_skipped_and_counted(tmp_path: Path):
    image = jpeg_bytes(16, 16, seed=0)
    samples = [
        {"jpg": image, "cls": b"1", "json": b"{}"},
        {"jpg": image, "cls": b"7", "json": b"{}"},  # the model has 3 classes; there is no classes.json
        {"jpg": image, "cls": b"2", "json": b"{}"},
    ]
    write_shard(tmp_path / "s-0.tar", samples)
    loader = make_loader(
        str(tmp_path / "s-{0..0}.tar"),
        batch_size=2,
        num_workers=0,
        train=False,
        image_size=16,
        num_classes=3,
        max_error_fraction=0.5,
    )
    labels = torch.cat([batch["label"][batch["valid"]] for batch in loader])
    assert sorted(labels.tolist()) == [1, 2]
    assert loader.counters()["skipped"] == {"bad_label": 1}
    for metadata in (b"{not json", b"[1, 2]"):
        with pytest.raises(SkippedSample) as skipped:
            multi_labels({"json": metadata}, 3)
        assert skipped.value.reason == "bad_metadata"
    with pytest.raises(SkippedSample, match="outside"):
        single_label({"cls": b"-1"}, None)


def test_shards_that_disagree_with_their_index_are_counted_not_silently_cut(tmp_path: Path):
    image_folder(tmp_path / "img", {"a": 6, "b": 6})
    out = tmp_path / "out"
    assert (
        build_shards([str(tmp_path / "img"), "--output", str(out), "--max-samples-per-shard", "4", "--workers", "0"])
        == 0
    )
    index = index_of(out)
    shards = index["shards"]
    assert [shard["num_samples"] for shard in shards] == [4, 4, 4]
    shards[0]["num_samples"] = 5  # the index promises a sample the shard does not hold
    shards[1]["num_samples"] = 2  # the shard holds two samples the index does not list
    (out / "index.json").write_text(json.dumps(index))
    loader = make_loader(str(out / "index.json"), batch_size=4, num_workers=0, train=False, image_size=16)
    with pytest.raises(LoaderError, match=r"train-000001.tar: long_shard \(2 more samples than the index lists"):
        list(loader)  # beyond the default max_error_fraction: one line naming the shard
    loader = make_loader(
        str(out / "index.json"), batch_size=4, num_workers=0, train=False, image_size=16, max_error_fraction=0.5
    )
    keys = [key for batch in loader for key, valid in zip(batch["key"], batch["valid"], strict=True) if valid]
    assert len(keys) == len(set(keys)) == 10
    assert loader.counters()["skipped"] == {"short_shard": 1, "long_shard": 2}


def test_the_tar_reader_and_the_decoder_survive_thousands_of_mutated_shards(tmp_path: Path):
    """Whatever the bytes, only the errors the loader counts as a damaged shard or image come out."""
    write_shard(
        tmp_path / "s.tar",
        [{"jpg": jpeg_bytes(24, 16, seed=n), "cls": str(n).encode(), "json": b'{"labels": [1]}'} for n in range(3)],
    )
    original = (tmp_path / "s.tar").read_bytes()
    augment = Augment(16, train=True)
    rng = random.Random(0)
    for trial in range(3000):
        data = bytearray(original)
        for _ in range(rng.choice((1, 4, 32))):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if trial % 7 == 0:
            data = data[: rng.randrange(len(data))]
        try:
            members = list(tar_members(io.BytesIO(bytes(data))))
        except (tarfile.TarError, EOFError, ValueError, OSError):  # what stream.py counts as a damaged shard
            continue
        for member in members:
            name = member["fname"]
            try:
                if name.endswith(".jpg"):
                    decode(member["data"], augment, np.random.default_rng(trial))
                elif name.endswith(".cls"):
                    single_label({"cls": member["data"]}, 10)
                elif name.endswith(".json"):
                    multi_labels({"json": member["data"]}, 10)
            except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError, SkippedSample):
                continue  # what stream.py skips and counts as one sample


# -- the run config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=NaN", "optimizer.lr: Input should be a finite number"),
        ("schedule.min_lr=Infinity", "schedule.min_lr: Input should be a finite number"),
        ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
        ("model.width=100000000", "model.width: Input should be less than or equal to 65536"),
    ],
)
def test_values_that_validate_but_cannot_run_are_refused_by_the_schema(override: str, expected: str):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(ROOT / "configs" / "tiny_cpu.json", [override])


@pytest.mark.slow
def test_sigterm_during_an_s3_build_leaves_no_temporary_shard_behind(tmp_path: Path, s3: dict):
    image_folder(tmp_path / "in", {"a": 120}, size=(320, 240))
    url = "s3://bucket/out"
    work_dir = Path(Output(BuildOptions(input="", output=url, storage_options=s3)).work_dir)
    command = [
        sys.executable,
        "-m",
        "data_pipeline.build.cli",
        str(tmp_path / "in"),
        "--output",
        url,
        "--workers",
        "1",
        "--storage-option",
        f"endpoint_url={s3['endpoint_url']}",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(work_dir.glob("*.tar")) and time.monotonic() < deadline:  # a shard is being written
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert not work_dir.exists()
