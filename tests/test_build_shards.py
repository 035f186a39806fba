"""build-shards end to end: folders and manifests, local and S3, read back with tar and plain webdataset."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from faulty_proxy import FaultyProxy
from imaging import image_folder, jpeg_bytes
from plain_webdataset import read_index, webdataset_samples

from data_pipeline.build.cli import main
from data_pipeline.format.index import ShardIndex

ROOT = Path(__file__).resolve().parents[1]


def build(*args: str) -> int:
    return main([*args])


def output_files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_image_folder_to_local_shards(tmp_path: Path) -> None:
    image_folder(tmp_path / "in", {"cat": 7, "dog": 5, "eel": 3})
    (tmp_path / "in/dog/deeper").mkdir()
    (tmp_path / "in/dog/deeper/x.jpg").write_bytes(jpeg_bytes(64, 64, seed=99))  # belongs to "dog"
    (tmp_path / "in/cat/README.txt").write_text("not an image")
    out = tmp_path / "out"
    assert build(str(tmp_path / "in"), "--output", str(out), "--max-samples-per-shard", "4", "--workers", "2") == 0

    assert json.loads((out / "classes.json").read_text()) == {"cat": 0, "dog": 1, "eel": 2}
    index = read_index(out)
    assert index.splits["train"].num_samples == 16 and index.ignored_files == 1 and index.skipped == {}
    assert index.splits["train"].class_counts == {"0": 7, "1": 6, "2": 3}
    assert [s.num_samples for s in index.shards] == [4, 4, 4, 4]
    assert [s.name for s in index.shards] == [f"train-{i:06d}.tar" for i in range(4)]

    listing = subprocess.run(["tar", "tf", str(out / "train-000000.tar")], capture_output=True, text=True, check=True)
    names = listing.stdout.split()
    assert len(names) == 12 and [n.rsplit(".", 1)[1] for n in names[:3]] == ["jpg", "cls", "json"]

    samples = webdataset_samples(out)
    assert len(samples) == 16 and len({s["__key__"] for s in samples}) == 16
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    deeper = by_source[str(tmp_path / "in/dog/deeper/x.jpg")]
    assert deeper["cls"] == b"1" and json.loads(deeper["json"])["width"] == 64
    # Shuffled before sharding: the samples are not in the tree's (class by class) order.
    assert [s["cls"] for s in samples] != sorted(s["cls"] for s in samples)


def test_same_inputs_give_identical_bytes_and_splits_follow_keys(tmp_path: Path) -> None:
    image_folder(tmp_path / "in", {"a": 10, "b": 10})
    outputs = []
    for name, seed in (("one", "0"), ("two", "0"), ("three", "7")):
        out = tmp_path / name
        assert (
            build(
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--val-fraction",
                "0.3",
                "--seed",
                seed,
                "--max-samples-per-shard",
                "5",
            )
            == 0
        )
        outputs.append(out)
    assert output_files(outputs[0]) == output_files(outputs[1])
    val_keys = [{s["__key__"] for s in webdataset_samples(out, "val")} for out in outputs]
    assert val_keys[0] == val_keys[2] and 0 < len(val_keys[0]) < 20  # another seed reorders, the split stays
    train_order = [[s["__key__"] for s in webdataset_samples(out)] for out in (outputs[0], outputs[2])]
    assert train_order[0] != train_order[1]


def test_the_same_tree_in_another_place_gives_the_same_shards_in_the_same_order(tmp_path: Path) -> None:
    """A corpus copied to another disk or mount point (a manifest beside it too) is the same data set: a run that
    trains on it sees the same batches."""
    orders = []
    for place in ("here", "there/deeper"):
        image_folder(tmp_path / place / "in", {"a": 8, "b": 8})
        write_manifest(
            tmp_path / place / "in" / "list.csv",
            [
                {"path": f"{label}/{image.name}", "label": label}
                for label in "ab"
                for image in (tmp_path / place / "in" / label).iterdir()
            ],
        )
        for source in ("in", "in/list.csv"):
            out = tmp_path / place / f"out-{source.replace('/', '-')}"
            assert (
                build(
                    str(tmp_path / place / source),
                    "--output",
                    str(out),
                    "--val-fraction",
                    "0.3",
                    "--max-samples-per-shard",
                    "5",
                )
                == 0
            )
            orders.append([[s["__key__"] for s in webdataset_samples(out, split)] for split in ("train", "val")])
    assert orders[0] == orders[2] and orders[1] == orders[3]
    assert len(orders[0][0]) + len(orders[0][1]) == 16


def write_manifest(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_manifest_formats(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / f"img/{i}.jpg").write_bytes(jpeg_bytes(50, 40, seed=i))
        rows.append({"path": f"img/{i}.jpg", "label": ["zebra", "ant"][i % 2], "caption": f"photo {i}"})
    manifest = tmp_path / f"manifest{suffix}"
    write_manifest(manifest, rows)
    out = tmp_path / "out"
    assert build(str(manifest), "--output", str(out)) == 0
    assert json.loads((out / "classes.json").read_text()) == {"ant": 0, "zebra": 1}
    samples = webdataset_samples(out)
    assert len(samples) == 6
    for sample in samples:
        meta = json.loads(sample["json"])
        number = int(meta["caption"].split()[1])  # extra columns are kept as metadata
        assert sample["cls"] == (b"1" if number % 2 == 0 else b"0")
        assert meta["source"].endswith(f"img/{number}.jpg") and (meta["width"], meta["height"]) == (50, 40)


def test_integer_and_multi_label_manifest(tmp_path: Path) -> None:
    rows = []
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(30, 30, seed=i))
        rows.append({"url": str(tmp_path / f"{i}.jpg"), "label": [i % 3, 4] if i else [2]})
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, rows)
    out = tmp_path / "out"
    assert build(str(manifest), "--output", str(out)) == 0
    index = read_index(out)
    assert index.multi_label and index.num_classes == 5
    assert index.splits["train"].class_counts == {"0": 1, "1": 1, "2": 2, "4": 3}
    samples = webdataset_samples(out)
    assert all("cls" not in s for s in samples)  # multi-label: labels live in the json
    assert sorted(tuple(json.loads(s["json"])["labels"]) for s in samples) == [(0, 4), (1, 4), (2,), (2, 4)]


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path: Path) -> None:
    good = [tmp_path / f"good{i}.jpg" for i in range(20)]
    for i, path in enumerate(good):
        path.write_bytes(jpeg_bytes(40, 30, seed=i))
    bad = {
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(500),
        "truncated.jpg": jpeg_bytes(300, 300, seed=1)[:2000],
        "empty.jpg": b"",
        "notes.txt": b"just text",
        "huge.jpg": jpeg_bytes(400, 400, seed=2),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    rows = [{"path": str(p), "label": "good"} for p in good]
    rows += [{"path": str(tmp_path / name), "label": "good"} for name in bad]
    rows += [
        {"path": str(tmp_path / "missing.jpg"), "label": "good"},
        {"path": str(good[0]), "label": "good"},
        {"path": str(good[1]).replace("good1", "good01"), "label": ""},
        {"path": str(good[2]).replace("good2", "x"), "label": "martian"},
    ]
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows)
    (tmp_path / "classes.txt").write_text("good\nbad\n")
    # one row per shard: the 9 rows that fail leave shard numbers without a shard (their records list them)
    common = [str(manifest), "--classes", str(tmp_path / "classes.txt"), "--max-pixels", "100000"]
    common += ["--max-samples-per-shard", "1"]

    strict = tmp_path / "strict"
    assert build(*common, "--output", str(strict)) == 1  # 9 of 29 skipped is over the default 1%
    index = read_index(strict)
    assert index.splits["train"].num_samples == 20 and len(index.shards) == 20
    assert len(list((strict / "_build").glob("train-*.json"))) == 29
    assert index.skipped == {
        "duplicate": 1,
        "empty": 1,
        "missing_label": 1,
        "not_an_image": 2,
        "too_many_pixels": 1,
        "truncated": 1,
        "unknown_label": 1,
        "unreadable": 1,
    }
    errors = [json.loads(line) for line in (strict / "errors.jsonl").read_text().splitlines()]
    assert {(Path(e["source"]).name, e["reason"]) for e in errors} >= {
        ("corrupt.jpg", "not_an_image"),
        ("truncated.jpg", "truncated"),
        ("empty.jpg", "empty"),
        ("notes.txt", "not_an_image"),
        ("huge.jpg", "too_many_pixels"),
        ("missing.jpg", "unreadable"),
    }
    assert all(e["detail"] or e["reason"] in ("duplicate", "missing_label", "unknown_label") for e in errors)

    lenient = tmp_path / "lenient"
    assert build(*common, "--output", str(lenient), "--max-error-fraction", "0.5") == 0


def test_missing_input_and_unwritable_output_exit_2_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nowhere'}: no such folder; pass an image-folder tree or a manifest file"
    image_folder(tmp_path / "in", {"a": 1})
    (tmp_path / "file").write_text("x")
    assert build(str(tmp_path / "in"), "--output", str(tmp_path / "file" / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'file' / 'out'}: cannot write the output") and "\n" not in err


def test_retry_failed_adds_what_now_works(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(40, 30, seed=i))
    rows = [{"path": str(tmp_path / f"{i}.jpg"), "label": "x"} for i in range(8)]  # 6.jpg and 7.jpg missing
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows)
    out = tmp_path / "out"
    args = [str(manifest), "--output", str(out), "--max-error-fraction", "0.5"]
    assert build(*args) == 0
    assert read_index(out).skipped == {"unreadable": 2}
    (tmp_path / "6.jpg").write_bytes(jpeg_bytes(40, 30, seed=6))  # the storage hiccup is over for one of them
    assert build(*args, "--retry-failed") == 0
    index = read_index(out)
    assert index.skipped == {"unreadable": 1} and index.splits["train"].num_samples == 7
    assert [s.name for s in index.shards] == ["train-000000.tar", "train-000001.tar"]
    errors = (out / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and "7.jpg" in errors[0]
    assert len(webdataset_samples(out)) == 7


def _corpus_and_options(tmp_path: Path) -> list[str]:
    """Write a 160-image folder under tmp_path; return build-shards arguments for it, all but --output."""
    image_folder(tmp_path / "in", {f"class{c}": 40 for c in range(4)}, size=(320, 240))
    return [
        str(tmp_path / "in"),
        "--max-samples-per-shard",
        "8",
        "--val-fraction",
        "0.2",
        "--max-side",
        "200",
        "--workers",
        "2",
    ]


def _wait_for_records(output: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(list((output / "_build").glob("train-*.json"))) < count and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["builder and workers", "one worker"])
def test_killed_build_resumes_to_identical_output(tmp_path: Path, killed: str) -> None:
    command = [sys.executable, "-m", "data_pipeline.build.cli", *_corpus_and_options(tmp_path)]
    clean = tmp_path / "clean"
    subprocess.run([*command, "--output", str(clean)], check=True, capture_output=True, cwd=ROOT)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        [*command, "--output", str(resumed)],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_records(resumed, 3)
    if killed == "builder and workers":
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    else:
        workers = [p for p in psutil.Process(process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[0].kill()
        # A pool that lost a worker must not wait for it forever: one line, exit 3, the other worker gone too.
        _, err = process.communicate(timeout=60)
        last_line = err.replace("\r", "\n").strip().splitlines()[-1]
        assert process.returncode == 3, err
        assert last_line.startswith(f"error: {resumed}: a worker process died"), err
        assert "run the same command again" in last_line and "Traceback" not in err
        assert not psutil.wait_procs(workers, timeout=10)[1]
    assert not (resumed / "index.json").exists(), "the build finished before it could be killed"
    done_before = {p.name for p in resumed.glob("*.tar")}
    assert 3 <= len(done_before) < len(list(clean.glob("*.tar")))
    # what a kill inside an atomic write leaves (the kill above lands there only now and then)
    for stale in ("index.json", "_build/train-000000.json"):
        (resumed / f"{stale}.tmp-{'0' * 32}").write_bytes(b'{"half')

    subprocess.run([*command, "--output", str(resumed)], check=True, capture_output=True, cwd=ROOT)
    assert output_files(resumed) == output_files(clean)


def dataset_files(output: Path) -> dict[str, bytes]:
    """Every file of an output but those of how it was built: the parts' markers and the builders' lock files."""
    files = output_files(output)
    return {name: data for name, data in files.items() if not name.startswith("_build/part-") and ".lock" not in name}


@pytest.mark.slow
def test_three_parts_in_any_order_one_killed_equal_the_one_machine_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = [*_corpus_and_options(tmp_path), "--max-samples-per-shard", "4"]
    command = [sys.executable, "-m", "data_pipeline.build.cli", *arguments]
    clean, parts = tmp_path / "clean", tmp_path / "parts"
    subprocess.run([*command, "--output", str(clean)], check=True, capture_output=True, cwd=ROOT)

    def part(number: int, *extra: str, output: Path = parts) -> list[str]:
        return [*arguments, "--output", str(output), "--num-parts", "3", "--part", str(number), *extra]

    killed = subprocess.Popen(
        [*command[:3], *part(0)], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_records(parts, 2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (parts / "_build/part-000000-of-000003.json").exists(), "part 0 finished before it could be killed"
    assert build(*part(2)) == 0
    capsys.readouterr()
    finalize = [*arguments, "--output", str(parts), "--num-parts", "3", "--finalize"]
    assert build(*finalize) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {parts}: part(s) 0, 1 of 3 not built (no _build/part-000000-of-000003.json); run build-shards with "
        "--num-parts 3 --part K for each, then --finalize again"
    )
    assert build(*part(1)) == 0 and build(*part(0)) == 0
    assert not (parts / "index.json").exists()
    damaged = parts / "train-000015.tar"  # of part 1: train has 31 shards, part 1 builds 10 to 19
    damaged.write_bytes(damaged.read_bytes()[:-1024])
    capsys.readouterr()
    assert build(*finalize) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {damaged}: missing or damaged; run part 1 again (--num-parts 3 --part 1), then --finalize"
    )
    assert build(*part(1)) == 0
    assert build(*finalize) == 0
    assert dataset_files(parts) == dataset_files(clean)

    capsys.readouterr()
    assert build(*part(1, "--seed", "1")) == 2  # over shards of this build
    assert capsys.readouterr().err.strip() == (
        f"error: {parts}/_build/train-000010.json: a shard of part 1 built with other inputs or options; write to a "
        "new --output, or delete the shards of part 1 and their records (_build/SPLIT-NNNNNN.json) to build them again"
    )

    # a part built with another seed (each part alone cannot know) is refused by the finalize step
    mixed = tmp_path / "mixed"
    for number, seed in ((0, "0"), (1, "1"), (2, "0")):
        assert build(*part(number, "--seed", seed, "--workers", "0", output=mixed)) == 0
    capsys.readouterr()
    assert build(*arguments, "--output", str(mixed), "--num-parts", "3", "--finalize") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {mixed}: part 1 of 3 was built with seed=1, this command has seed=0; build every part with the same "
        "options"
    )


@pytest.mark.slow
def test_failed_shard_upload_stops_with_one_line_and_a_rerun_finishes(
    tmp_path: Path, s3: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import s3fs

    arguments = _corpus_and_options(tmp_path)
    direct = ("--storage-option", f"endpoint_url={s3['endpoint_url']}")
    assert build(*arguments, "--output", "s3://bucket/clean", *direct) == 0
    with FaultyProxy(s3["endpoint_url"], every=0, fail_writes_to="resumed/train-000002.tar") as proxy:
        code = build(
            *arguments,
            "--output",
            "s3://bucket/resumed",
            "--storage-option",
            f"endpoint_url={proxy.url}",
            "--storage-option",
            'config_kwargs={"retries": {"max_attempts": 2}}',
        )
    last_line = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 3
    assert last_line.startswith("error: s3://bucket/resumed/train-000002.tar: commit failed"), last_line
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    assert fs.exists("bucket/resumed/train-000001.tar") and not fs.exists("bucket/resumed/train-000002.tar")
    assert not fs.exists("bucket/resumed/index.json")

    assert build(*arguments, "--output", "s3://bucket/resumed", *direct) == 0
    fs.invalidate_cache()
    clean = {path.removeprefix("bucket/clean/"): fs.cat_file(path) for path in fs.find("bucket/clean")}
    resumed = {path.removeprefix("bucket/resumed/"): fs.cat_file(path) for path in fs.find("bucket/resumed")}
    assert resumed == clean


def test_s3_manifest_to_s3_shards(tmp_path: Path, s3: dict[str, str]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    rows = []
    for i in range(5):
        fs.pipe_file(f"bucket/raw/{i}.jpg", jpeg_bytes(60, 40, seed=i))
        rows.append({"path": f"{i}.jpg", "label": "odd" if i % 2 else "even"})
    rows.append({"path": "gone.jpg", "label": "odd"})
    local = tmp_path / "m.jsonl"
    write_manifest(local, rows)
    fs.put_file(str(local), "bucket/raw/manifest.jsonl")
    endpoint = f"endpoint_url={s3['endpoint_url']}"
    assert (
        build(
            "s3://bucket/raw/manifest.jsonl",
            "--output",
            "s3://bucket/shards",
            "--storage-option",
            endpoint,
            "--max-samples-per-shard",
            "3",
            "--max-error-fraction",
            "0.5",
            "--workers",
            "2",
        )
        == 0
    )

    fs.invalidate_cache()
    index = ShardIndex.model_validate_json(fs.cat_file("bucket/shards/index.json"))
    assert index.splits["train"].num_samples == 5 and index.skipped == {"unreadable": 1}
    assert json.loads(fs.cat_file("bucket/shards/classes.json")) == {"even": 0, "odd": 1}
    # Plain webdataset over s3fs streams, and tar over the downloaded bytes.
    streams = [{"url": shard.name, "stream": fs.open(f"bucket/shards/{shard.name}", "rb")} for shard in index.shards]
    samples = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams)))
    assert len(samples) == 5
    assert {json.loads(s["json"])["source"] for s in samples} == {f"s3://bucket/raw/{i}.jpg" for i in range(5)}
    assert sorted(shard.num_samples for shard in index.shards) == [2, 3]  # the unreadable row's shard is short
    for shard in index.shards:
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"bucket/shards/{shard.name}"))) as tar:
            assert len(tar.getnames()) == 3 * shard.num_samples
    assert not any("tmp" in path for path in fs.find("bucket/shards"))


def test_text_manifests_are_read_in_blocks_whatever_falls_on_a_block_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifests are streamed in blocks of bytes split into lines by us (fsspec's readline is quadratic on object
    stores); 7-byte blocks put a boundary inside the byte-order mark, inside CRLF pairs, multi-byte characters and
    a quoted field that spans lines, and the rows equal csv's and json's reading of the whole file."""
    from data_pipeline.build import sources

    text = 'path,label,caption\r\na.jpg,cät,"two\r\nlines, and a comma"\r\nb.jpg,dög,\r\nc.jpg,cät,"x"""'
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    lines = ['{"path": "a.jpg", "label": "ünï"}', "", '{"path": "b.jpg", "label": "x", "n": 3}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines), encoding="utf-8")
    whole = list(csv.DictReader(io.StringIO(text)))
    monkeypatch.setattr(sources, "TEXT_READ_BYTES", 7)
    rows = list(sources.read_manifest(str(tmp_path / "m.csv"), {}, None, "label"))
    assert [(r.source, r.labels, r.metadata) for r in rows] == [
        (str(tmp_path / w["path"]), [w["label"]], {"caption": w["caption"]}) for w in whole
    ]
    assert rows[0].metadata["caption"] == "two\r\nlines, and a comma"
    rows = list(sources.read_manifest(str(tmp_path / "m.jsonl"), {}, None, "label"))
    assert [(r.labels, r.metadata) for r in rows] == [(["ünï"], {}), (["x"], {"n": 3})]


def test_remote_reads_in_flight_through_resets_503s_and_stalls_give_the_fault_free_shards(
    tmp_path: Path, s3: dict[str, str]
) -> None:
    """Sixteen reads in flight per worker from S3 through a proxy that resets, refuses (503) or stalls every third
    image read (each image once): every row ends in a shard or in errors.jsonl, and the output equals, byte for byte,
    a build that read the same manifest one image at a time without faults."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    rows = []
    for i in range(48):
        fs.pipe_file(f"bucket/raw/{i:02d}.jpg", jpeg_bytes(64, 48, seed=i))
        rows.append({"path": f"{i:02d}.jpg", "label": str(i % 3)})
    rows.append({"path": "gone.jpg", "label": "0"})
    write_manifest(tmp_path / "m.jsonl", rows)
    fs.put_file(str(tmp_path / "m.jsonl"), "bucket/raw/manifest.jsonl")
    common = ["s3://bucket/raw/manifest.jsonl", "--max-samples-per-shard", "10", "--val-fraction", "0.2"]
    common += ["--max-error-fraction", "0.1", "--workers", "1"]
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    endpoint = f"endpoint_url={s3['endpoint_url']}"
    assert build(*common, "--output", str(reference), "--storage-option", endpoint, "--reads-in-flight", "1") == 0
    with FaultyProxy(s3["endpoint_url"], every=3, stall_seconds=3.0, faulted_suffix=".jpg", transient=True) as proxy:
        options = ["--storage-option", f"endpoint_url={proxy.url}"]
        options += ["--storage-option", 'config_kwargs={"read_timeout": 1.0, "retries": {"max_attempts": 1}}']
        assert build(*common, "--output", str(faulty), *options, "--reads-in-flight", "16") == 0
    assert min(proxy.injected.values()) > 0, proxy.injected
    assert proxy.most_active_gets > 4  # the reads were in flight together
    names = sorted(path.name for path in reference.iterdir() if path.is_file())
    assert names == sorted(path.name for path in faulty.iterdir() if path.is_file())
    assert all((reference / name).read_bytes() == (faulty / name).read_bytes() for name in names)
    index = read_index(faulty)
    assert sum(t.num_samples for t in index.splits.values()) == 48 and index.skipped == {"unreadable": 1}


def test_s3_output_to_a_missing_bucket_exits_2(
    tmp_path: Path, s3: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    image_folder(tmp_path / "in", {"a": 1})
    code = build(
        str(tmp_path / "in"),
        "--output",
        "s3://no-such-bucket/x",
        "--storage-option",
        f"endpoint_url={s3['endpoint_url']}",
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: s3://no-such-bucket/x: cannot write the output") and ("\n" not in err)
    assert "testing" not in err  # credentials never appear in messages
