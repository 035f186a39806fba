"""The trainer killed, preempted, writing to failing storage, or given a wrong config: a killed run resumes to the
uninterrupted run's weights bit for bit, a preempted one saves and exits 75, a failed upload never moves `latest`,
and a user's mistake is one line on rank 0.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
import s3fs
import torch
from faulty_proxy import FaultyProxy
from safetensors.torch import load_file
from trainer_jobs import MASKED_PATCH, finish, fp32_weights, launch, run_until, write_config

from pretrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # every test starts a trainer: DeepSpeed's start-up alone takes seconds


def test_killed_three_times_at_random_steps_under_storage_faults_resumes_to_bit_identical_weights(
    s3_digits: dict, tmp_path: Path, request: pytest.FixtureRequest
):
    """Masked patch prediction (its masks come from the device's generator, which a resume must restore too) is
    killed with SIGKILL at three random steps, reading its shards through a proxy that resets, refuses or stalls
    every ninth read, and resumed with --resume auto each time: its final weights and their average (optimizer.ema)
    equal an uninterrupted run's, trained meanwhile, bit for bit. The steps are drawn from a printed seed; a failure
    reproduces with that seed."""
    seed = random.randrange(1 << 30)
    draws = random.Random(seed)
    kills: list[int] = []
    while not kills or kills[-1] < 22:  # one kill at least after the first checkpoint (step 16) is complete
        kills = sorted(draws.sample(range(6, 62, 4), 3))  # 4 apart: each kill after the last restart
    print(f"killed at steps {kills} (seed {seed})")
    sections = {**MASKED_PATCH, "logging": {"every_steps": 1}, "optimizer": {"ema": {"decay": 0.9, "start_step": 8}}}
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = write_config(tmp_path / "reference.json", s3_digits, reference_dir, **sections)
    # alongside the killed runs (each rank has one thread either way, so the arithmetic is the same); its output to a
    # file, since a pipe nobody reads would fill and stop it
    reference_log = tmp_path / "reference.log"
    reference_run = launch(reference, log=reference_log)

    def stop_reference() -> None:  # when the test fails before it waits for it
        if reference_run.poll() is None:
            os.killpg(reference_run.pid, signal.SIGKILL)

    request.addfinalizer(stop_reference)

    # every ninth read, not every third: each resume fetches its held samples one range each, and at every third
    # read the faults' timeouts and back-offs took most of this test's three minutes
    with FaultyProxy(s3_digits["endpoint_url"], every=9, stall_seconds=1.0) as proxy:
        faulty = {**s3_digits, "endpoint_url": proxy.url, "config_kwargs": {"read_timeout": 0.5}}
        data = {"storage_options": faulty}
        killed = write_config(tmp_path / "killed.json", s3_digits, killed_dir, **sections, data=data)
        for step in kills:
            logged = len(read_metrics(killed_dir, "train")) if (killed_dir / "metrics.jsonl").exists() else 0
            process = launch(killed, "--resume", "auto")
            run_until(process, killed_dir, step, logged)
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, at once, mid-run
            process.wait()
        latest = (killed_dir / "checkpoints" / "latest").read_text()
        code, output = finish(launch(killed, "--resume", "auto"))
    assert code == 0, output
    assert finish(reference_run)[0] == 0, reference_log.read_text()
    assert f"resumed from {killed_dir / 'checkpoints'}/{latest}" in output
    assert sum(proxy.injected.values()) > 0, proxy.injected
    ours = fp32_weights(killed_dir / "checkpoints", "step-00000064")
    theirs = fp32_weights(reference_dir / "checkpoints", "step-00000064")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours), f"seed {seed}"
    averages = [
        load_file(folder / "checkpoints" / "step-00000064" / "weight_average.safetensors")
        for folder in (killed_dir, reference_dir)
    ]
    assert averages[0].keys() == averages[1].keys() and len(averages[0]) > 0 and averages[0].keys() <= ours.keys()
    assert all(torch.equal(averages[0][name], averages[1][name]) for name in averages[0]), f"seed {seed}"
    assert not torch.equal(averages[0]["encoder.pos_embed"], ours["encoder.pos_embed"])


def test_sigterm_saves_a_checkpoint_and_exits_75(s3_digits: dict, tmp_path: Path):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "config.json", s3_digits, run_dir, schedule={"steps": 400}, checkpoint={"every_steps": 1000}
    )
    process = launch(config)
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir, "train"):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    ranks = [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if any(arg.startswith("--local_rank") for arg in child.cmdline()) and child.name() != "pt_data_worker"
    ]
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)  # as a scheduler's preemption notice reaches every task
    code, output = finish(process)
    assert code == 75, output
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step-"))
    assert 2 <= step < 400 and "preempted: checkpoint" in output
    assert (run_dir / "checkpoints" / tag / "loader-rank1.json").exists()


def test_checkpoints_on_s3_and_a_failed_upload_never_moves_latest(s3_digits: dict, tmp_path: Path):
    with FaultyProxy(s3_digits["endpoint_url"], every=0, fail_writes_to="step-00000032") as proxy:
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 2}}}
        config = write_config(
            tmp_path / "config.json",
            s3_digits,
            tmp_path / "run",
            checkpoint={"dir": "s3://bucket/ckpt", "storage_options": options},
        )
        code, output = finish(launch(config))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_digits)
    assert code == 2, output
    assert "s3://bucket/ckpt/step-00000032: upload failed" in output
    assert fs.cat_file("bucket/ckpt/latest") == b"step-00000016"
    assert fs.exists("bucket/ckpt/step-00000016/loader-rank0.json")


def test_user_errors_are_one_line_on_rank_0(s3_digits: dict, tmp_path: Path):
    config = write_config(
        tmp_path / "config.json", s3_digits, tmp_path / "run", data={"train": "s3://bucket/nowhere/index.json"}
    )
    code, output = finish(launch(config, "--set", "data.batch_size=31"))
    assert code == 2
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: data.batch_size 31 does not divide over 2 ranks; choose a batch that is a multiple of 2, or a number "
        "of ranks that divides 31"
    ], output
    code, output = finish(launch(config))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "s3://bucket/nowhere/index.json: no such file" in errors[0], output
