"""Two-rank trainer jobs for the test_trainer* modules: a small config on the digits, launching and waiting for a job,
a one-rank job inside pytest's process, and reading back what a run wrote and trained on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import resource
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port, two_rank_command

from data_pipeline import make_loader
from pretrain.train import distributed
from pretrain.train.metrics import read_metrics
from pretrain.train.sample_log import read_sample_log
from pretrain.weights.trainer_checkpoint import read_state

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, s3: dict, run_dir: Path, **sections: dict) -> Path:
    config = {
        "run": {"name": "test", "output_dir": str(run_dir), "seed": 0},
        "model": {
            "variant": "Ti/4",
            "image_size": 16,
            "width": 64,
            "depth": 2,
            "mlp_dim": 128,
            "num_heads": 2,
            "num_classes": 10,
            "pool": "gap",
        },
        "data": {
            "train": "s3://bucket/digits/index.json",
            "val": "s3://bucket/digits/index.json",
            "storage_options": s3,
            "batch_size": 32,
            "num_workers": 1,
            "crop_scale": [0.7, 1.0],
            "hflip": False,
        },
        "optimizer": {"lr": 3e-3, "weight_decay": 0.01, "grad_clip_norm": 1.0},
        "schedule": {"steps": 64, "warmup_steps": 4, "decay": "cosine"},
        "deepspeed": {"zero_stage": 2, "precision": "bf16"},
        "checkpoint": {"every_steps": 16, "keep_last": 2},
        "logging": {"every_steps": 8, "trackers": [], "peak_tflops": 1.0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(json.dumps(config))
    return path


def launch(
    config: Path, *args: str, max_file_bytes: int | None = None, cli: bool = False, log: Path | None = None
) -> subprocess.Popen:
    """The two-rank job (through the `deepspeed` command with `cli`); with `max_file_bytes`, no file it writes may
    grow beyond that (a full disk). Its output is piped, or written to `log`."""
    port = free_port()
    command = two_rank_command(port, "pretrain/run.py", "--config", str(config), *args, cli=cli)
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes,) * 2)) if max_file_bytes else None
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=limit,
        )
    process.master_port = port  # type: ignore[attr-defined]
    return process


def shm_buffers(process: subprocess.Popen) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers of a launched job still named in /dev/shm (RAM)."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{process.master_port}_*"))


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def fp32_weights(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    return read_state(str(checkpoints / tag))  # DeepSpeed's zero_to_fp32 under weights_only loads


@contextlib.contextmanager
def one_rank_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment of a one-rank job in pytest's own process (quicker than a launcher); the preemption handlers
    the trainer installs are restored afterwards (they would swallow a SIGTERM meant for pytest)."""
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        distributed.shutdown()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def epoch_keys(digit_shards: Path, states: list[dict] | None = None) -> Counter:
    """The keys of epoch 0 of the digits' train split; with a run's final loader states, those it still owed."""
    # three workers: another job shape than the run's, so the states are re-cut into a finite run of what is left
    loader = make_loader(str(digit_shards / "index.json"), batch_size=64, image_size=16, epochs=1, num_workers=3)
    if states is not None:
        loader.load_state_dict(states)
    return Counter(
        key
        for batch in loader
        for key, epoch, valid in zip(batch["key"], batch["epoch"].tolist(), batch["valid"], strict=True)
        if valid and epoch == 0
    )


def check_epoch_delivered_once(
    run_dir: Path, final_states: list[dict], digit_shards: Path, resumed_at: int, ranks: tuple[int, int]
) -> None:
    """What the run trained on (on the old number of ranks up to the resume, on the new one after it), plus what its
    final loader states still owe of epoch 0, is every sample of epoch 0 exactly once; and no sample came twice in
    epoch 1."""
    records = read_sample_log(str(run_dir))
    assert all(record["trained"] for record in records)
    before, after = ranks
    assert {r["rank"] for r in records if r["step"] <= resumed_at} == set(range(before))
    assert {r["rank"] for r in records if r["step"] > resumed_at} == set(range(after))
    delivered: dict[int, Counter] = {0: Counter(), 1: Counter()}
    for record in records:
        for key, epoch in zip(record["keys"], record["epochs"], strict=True):
            delivered[epoch][key] += 1
    everything = epoch_keys(digit_shards)
    assert (
        sum(everything.values())
        == json.loads((digit_shards / "index.json").read_text())["splits"]["train"]["num_samples"]
    )
    assert delivered[0] + epoch_keys(digit_shards, final_states) == everything
    assert max(delivered[1].values()) == 1


def loader_states(fs: Any, checkpoint: str) -> list[dict]:
    return [json.loads(fs.cat_file(path)) for path in sorted(fs.glob(f"{checkpoint}/loader-rank*.json"))]


def step_noise(records: dict[int, dict]) -> float:
    """The largest change of the logged loss from one logged step to the next: a run's own step-to-step noise."""
    losses = [records[step]["loss"] for step in sorted(records)]
    return max(abs(b - a) for a, b in itertools.pairwise(losses))


MASKED_PATCH = {"model": {"num_classes": 0}, "objective": {"type": "masked_patch_prediction"}}


def run_until(process: subprocess.Popen, run_dir: Path, step: int, logged_before: int) -> None:
    """Wait until this process (not an earlier one, whose records come first) has logged `step`."""
    deadline = time.monotonic() + 180
    while True:
        records = read_metrics(run_dir, "train") if (run_dir / "metrics.jsonl").exists() else []
        if len(records) > logged_before and records[-1]["step"] >= step:
            return
        assert process.poll() is None and time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.02)
