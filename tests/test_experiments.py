"""The data of `make experiment-mpp`, on a small corpus laid out like Debian's openclipart-png."""

from __future__ import annotations

import _thread
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plain_webdataset import webdataset_samples

from data_pipeline.build.sources import row_key
from pretrain.config import load_config
from pretrain.experiments import mpp_transfer, openclipart


def clip_art(root: Path, counts: dict[str, int]) -> None:
    """Transparent PNGs in category folders, every second one a folder deeper, as in the corpus."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        for n in range(count):
            folder = root / name / ("icons" if n % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGBA").save(folder / f"{name}_{n:03d}.png")


def keys(shards: Path, split: str = "train") -> set[str]:
    return {sample["__key__"] for sample in webdataset_samples(shards, split)}


def test_no_held_out_image_or_copy_of_one_is_trained_on_and_the_classes_are_balanced(tmp_path: Path) -> None:
    png = tmp_path / "png"
    clip_art(png, {"animals": 50, "computer": 40, "special": 12})
    # the corpus's copies: one file in two categories (no label to trust), one twice in its own category
    shutil.copy(png / "animals/animals_000.png", png / "computer/animals_000.png")
    shutil.copy(png / "computer/computer_000.png", png / "computer/icons/computer_000_again.png")
    shards = openclipart.prepare(tmp_path / "shards", png, min_class_images=40)

    held_out, labelled = keys(shards.labelled, "val"), keys(shards.labelled) | keys(shards.labelled, "val")
    assert held_out and held_out <= keys(shards.unlabelled, "val")  # held out of pre-training too
    assert not held_out & keys(shards.unlabelled)
    everything = keys(shards.unlabelled) | keys(shards.unlabelled, "val")
    assert len(everything) == 102  # every distinct image once, without labels
    assert row_key(str(png / "animals/animals_000.png")) in everything - labelled  # in two categories: unlabelled
    assert len(labelled) == 80  # the two large categories, each capped at the smaller's 40

    classes = json.loads((shards.labelled / "classes.json").read_text())
    assert classes == json.loads((shards.labelled10 / "classes.json").read_text())  # the same class indices
    assert sorted(classes) == ["animals", "computer"]
    few = webdataset_samples(shards.labelled10)
    assert {sample["__key__"] for sample in few} <= keys(shards.labelled)  # labels from the training split only
    per_class = [sum(int(sample["cls"]) == index for sample in few) for index in range(2)]
    train_per_class = [
        sum(int(sample["cls"]) == index for sample in webdataset_samples(shards.labelled)) for index in range(2)
    ]
    assert per_class == [round(openclipart.LABELLED_SHARE * count) for count in train_per_class]

    again = openclipart.prepare(tmp_path / "again", tmp_path / "png", min_class_images=40)
    assert keys(again.labelled10) == keys(shards.labelled10)  # a fixed selection, not a draw per call


def test_record_rewrites_only_its_variants_section_of_benchmarks(tmp_path: Path) -> None:
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nprose before\n")
    mpp_transfer.record_in_benchmarks(benchmarks, "paper", "first table")
    mpp_transfer.record_in_benchmarks(benchmarks, "downsampled", "other table")
    benchmarks.write_text(benchmarks.read_text() + "\nprose after\n")
    mpp_transfer.record_in_benchmarks(benchmarks, "paper", "second table")
    text = benchmarks.read_text()
    assert "first table" not in text and text.count("second table") == 1 and "other table" in text
    assert text.startswith("# Benchmarks\n\nprose before\n") and text.endswith("\nprose after\n")
    assert text.index("second table") < text.index("other table")  # rewritten in its place


def test_a_run_is_finished_only_once_evaluated_at_its_last_step_with_that_checkpoint_complete(tmp_path: Path) -> None:
    """A rerun skips finished runs; one killed after its final evaluation but before its final checkpoint was
    complete (`latest` still names the one before) must run again, or a fine-tune would start from older weights."""
    run = tmp_path / "run"

    def finished(steps: int) -> bool:
        settings = [f"run.output_dir={run}", f"schedule.steps={steps}"]
        return mpp_transfer.finished(load_config(str(mpp_transfer.CONFIGS / "finetune.json"), settings))

    assert not finished(200)
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 200, "top1": 0.5}) + "\n")
    (run / "checkpoints" / "latest").write_text("step-00000150")
    assert not finished(200)
    (run / "checkpoints" / "latest").write_text("step-00000200")
    assert finished(200) and finished(150)
    assert not finished(400)  # the same folder asked for a longer run


FAKE_RUN = """
import json, pathlib, sys, time
folder, partner, code = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(folder / "started").touch()
deadline = time.monotonic() + 20
while partner and not pathlib.Path(partner, "started").exists():
    if time.monotonic() > deadline:
        sys.exit("the run meant to train beside this one never started")
    time.sleep(0.05)
if code < 0:
    time.sleep(60)  # until interrupted
if code:
    sys.exit(code)
time.sleep(0.5)  # its training
(folder / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 200}) + "\\n")
(folder / "checkpoints").mkdir()
(folder / "checkpoints" / "latest").write_text("step-00000200")
"""
"""A stand-in for a training job: after its partner run has started (when it has one), it exits with its code
(negative: once interrupted), or trains for half a second and leaves what a finished run leaves. The scheduling is what
these tests test, training is tested elsewhere."""


class FakeJobs:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, partners: dict[Path, Path] | None = None) -> None:
        self.partners, self.codes = partners or {}, {}
        self.started: list[tuple[Path, int, int]] = []
        self.processes: list[subprocess.Popen] = []
        self.before_start: Callable[[Path], None] = lambda folder: None
        monkeypatch.setattr(mpp_transfer, "start_training", self.start)
        monkeypatch.setattr(mpp_transfer, "POLL_SECONDS", 0.05)

    def start(
        self, config: str, settings: list[str], ranks: int, log: Path, master_port: int, threads: int
    ) -> subprocess.Popen:
        folder = log.parent
        self.before_start(folder)
        self.started.append((folder, master_port, threads))
        partner = str(self.partners.get(folder, ""))
        code = str(self.codes.get(folder, 0))
        self.processes.append(subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(folder), partner, code]))
        return self.processes[-1]

    @property
    def folders(self) -> list[Path]:
        return [folder for folder, _, _ in self.started]


def test_a_run_that_trains_again_first_removes_the_runs_that_start_from_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-training run that trains again (after an interruption, or removed by hand) changes the weights its
    fine-tune started from: the fine-tune must start over, even when the call that retrains stops before it."""
    config = mpp_transfer.CONFIGS / "finetune.json"
    pretrain = mpp_transfer.Run(config, tmp_path / "pretrain", ())
    tuned = mpp_transfer.Run(config, tmp_path / "tuned", (), start=pretrain)
    scratch = mpp_transfer.Run(config, tmp_path / "scratch", ())
    jobs = FakeJobs(monkeypatch)
    mpp_transfer.launch_all([pretrain, tuned, scratch], ranks=2, jobs=1)
    assert jobs.folders == [pretrain.folder, tuned.folder, scratch.folder]
    mpp_transfer.launch_all([pretrain, tuned, scratch], ranks=2, jobs=2)
    assert len(jobs.started) == 3  # all finished: nothing runs again
    shutil.rmtree(scratch.folder)
    mpp_transfer.launch_all([pretrain, tuned, scratch, scratch], ranks=2, jobs=2)
    assert jobs.folders[3:] == [scratch.folder]  # a run named twice trains once

    shutil.rmtree(pretrain.folder)

    def interrupted(run: mpp_transfer.Run, ranks: int, master_port: int, threads: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mpp_transfer.Run, "launch", interrupted)
    with pytest.raises(KeyboardInterrupt):  # stopped while the pre-training trains again
        mpp_transfer.launch_all([pretrain, tuned, scratch], ranks=2, jobs=1)
    assert not tuned.folder.exists() and scratch.folder.exists()


def test_runs_train_side_by_side_each_on_its_port_and_cores_and_after_the_run_they_start_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--jobs 2`: the two pre-training runs train at the same time (each waits for the other to have started), on
    their own master ports and half the cores each; a fine-tune starts only once its pre-training has finished. A
    failed run lets the running one end, starts no other, and ends the call with its exit status. An interrupted
    call interrupts its running jobs and waits for them."""
    config = mpp_transfer.CONFIGS / "finetune.json"
    first = mpp_transfer.Run(config, tmp_path / "first", ())
    tuned = mpp_transfer.Run(config, tmp_path / "tuned", (), start=first)
    second = mpp_transfer.Run(config, tmp_path / "second", ())
    runs = [first, tuned, second]  # the fine-tune listed before a run that is ready
    jobs = FakeJobs(monkeypatch, {first.folder: second.folder, second.folder: first.folder})
    monkeypatch.setattr(mpp_transfer.os, "sched_getaffinity", lambda pid: {0, 1})

    def after_its_pretraining(folder: Path) -> None:
        if folder == tuned.folder:
            assert mpp_transfer.finished(first.resolved()), "the fine-tune started before its pre-training finished"

    jobs.before_start = after_its_pretraining
    mpp_transfer.launch_all(runs, ranks=1, jobs=2)
    assert jobs.folders == [first.folder, second.folder, tuned.folder]
    ports = {folder: port for folder, port, _ in jobs.started}
    assert ports[first.folder] != ports[second.folder]
    assert {threads for _, _, threads in jobs.started} == {1}

    for run in runs:
        shutil.rmtree(run.folder)
    jobs.partners.clear()
    jobs.codes[first.folder] = 75  # fails at once, while the second run trains
    with pytest.raises(SystemExit) as failure:
        mpp_transfer.launch_all(runs, ranks=1, jobs=2)
    assert failure.value.code == 75
    assert mpp_transfer.finished(second.resolved()) and not tuned.folder.exists()

    for run in runs:
        shutil.rmtree(run.folder, ignore_errors=True)
    jobs.codes[first.folder] = jobs.codes[second.folder] = -1
    interrupt = threading.Timer(1.0, _thread.interrupt_main)
    jobs.before_start = lambda folder: interrupt.start() if folder == second.folder else None
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            mpp_transfer.launch_all(runs, ranks=1, jobs=2)
    finally:
        interrupt.cancel()
    assert [process.returncode for process in jobs.processes[-2:]] == [-signal.SIGINT] * 2
    assert time.monotonic() - began < 30  # interrupted, not waited for
