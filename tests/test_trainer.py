"""The DeepSpeed trainer on two CPU ranks (gloo), started as users start it: `deepspeed --num_gpus 2 pretrain/run.py`.

Data are scikit-learn's digits as shards on moto's S3 server. Each run takes some seconds of start-up, so every
test here launches as few runs as it can.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pytest
import s3fs
import timm
import torch
import wandb_records
from conftest import free_port, s3_bucket, two_rank_command
from deepspeed.utils import safe_get_full_fp32_param
from faulty_proxy import FaultyProxy
from safetensors.torch import load_file

from data_pipeline import make_loader
from data_pipeline.build.builder import BuildOptions, build
from data_pipeline.commands import UserError
from pretrain.config import ConfigError, validate
from pretrain.config.load import load_config
from pretrain.demos.digits import write_digits
from pretrain.evaluate.fewshot import main as fewshot_main
from pretrain.model import create_model
from pretrain.train import distributed
from pretrain.train.checkpoint import CheckpointError, CheckpointStore
from pretrain.train.compute import step_seconds, training_flops_per_image
from pretrain.train.metrics import read_metrics
from pretrain.train.sample_log import read_sample_log
from pretrain.train.trainer import Trainer
from pretrain.weights.convert import main as convert_checkpoint
from pretrain.weights.native import read_native
from pretrain.weights.surgery import load_matching
from pretrain.weights.trainer_checkpoint import read_checkpoint, read_state

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every test starts a trainer: DeepSpeed's start-up alone takes seconds


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images", size=16)
    build(
        BuildOptions(
            input=str(root / "images"),
            output=str(root / "shards"),
            val_fraction=0.2,
            max_samples_per_shard=200,
            workers=0,
        )
    )
    return root / "shards"


def put_digits(digit_shards: Path, s3: dict) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    fs.put(str(digit_shards) + "/", "bucket/digits/", recursive=True)


@pytest.fixture
def s3_digits(digit_shards: Path, s3: dict) -> dict:
    put_digits(digit_shards, s3)
    return s3


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


FAKE_CREDENTIALS = {"key": "AKIAFAKE0TEST0KEY", "secret": "fake-secret-0f9e8d7c"}


@dataclass(frozen=True)
class Run:
    """A finished two-rank run: what it wrote and printed, for tests that each check one concern of it."""

    stage: int
    config: Path
    dir: Path
    code: int
    output: str
    leaked_buffers: list[Path]

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"


# ZeRO 2 and 3; not 1, which is the same DeepSpeed optimizer class as 2 (stage_1_and_2.py) writing the same files
# (the Slurm preemption test in test_cluster.py trains, saves and resumes with ZeRO-1)
@pytest.fixture(scope="module", params=[2, 3], ids=lambda stage: f"zero{stage}")
def zero_stage_run(
    request: pytest.FixtureRequest, digit_shards: Path, s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    """One run per ZeRO stage, trained once for all the test_zero_stage_* tests, which must not change it. It reads
    its shards from S3 only while it trains: the bucket and credentials (`s3`'s, which is per test) are set up and
    removed here, before any of those tests runs."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}")
    with pytest.MonkeyPatch.context() as monkeypatch, s3_bucket(s3_server, monkeypatch) as options:
        put_digits(digit_shards, options)
        config = write_config(
            root / "config.json",
            options | FAKE_CREDENTIALS,  # moto takes any; none of them may reach a file the run writes
            root / "run",
            deepspeed={"zero_stage": stage},
            logging={"trackers": ["tensorboard", "csv"], "sample_keys": True},
            model={"pool": "token"},
            checkpoint={"storage_options": FAKE_CREDENTIALS},
        )
        process = launch(config, cli=True)  # the command users run, here once per stage
        code, output = finish(process)
    return Run(stage, config, root / "run", code, output, leaked_buffers=shm_buffers(process))


@pytest.fixture
def finished_run(zero_stage_run: Run) -> Run:
    """The shared run, for tests of what it wrote: if it failed they error here, saying so, rather than on a file it
    never wrote; test_zero_stage_run_trains_from_s3_shards shows its output."""
    if zero_stage_run.code != 0:
        pytest.fail(
            f"the ZeRO-{zero_stage_run.stage} run exited {zero_stage_run.code}; "
            "test_zero_stage_run_trains_from_s3_shards shows its output",
            pytrace=False,
        )
    return zero_stage_run


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


def convert(source: Path, to: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pretrain.weights.convert", str(source), "--to", to, *args, "--out", str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_zero_stage_run_trains_from_s3_shards(zero_stage_run: Run):
    run = zero_stage_run
    assert run.code == 0, run.output
    assert not run.leaked_buffers  # DeepSpeed never unlinks them; the trainer does
    train = read_metrics(run.dir, "train")
    assert [r["step"] for r in train] == [8, 16, 24, 32, 40, 48, 56, 64]
    # Trained: below ln(10), the loss of the zero-initialised head, by a margin a run that does not learn never
    # reaches. Not a fixed drop from the first logged loss: under zero.Init ZeRO-3 draws the same initial
    # distributions in another order, so its run is another seed's, and seed 0's draw learns slowly here (2.13 at
    # step 64; ZeRO-3 with seed 1 reached 1.79, ZeRO-2 1.86-1.93 with seeds 0-2).
    assert train[-1]["loss"] < math.log(10) - 0.1, [r["loss"] for r in train]
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["mfu"] > 0 for r in train)


def test_zero_stage_run_writes_deepspeed_monitor_files(finished_run: Run):
    assert list((finished_run.dir / "monitor").rglob("events.out.tfevents.*"))  # DeepSpeed's TensorBoard monitor
    assert list((finished_run.dir / "monitor").rglob("*loss*.csv"))  # and its CSV monitor


def test_zero_stage_run_logs_planned_step_time_next_to_measured(finished_run: Run):
    # the planner's step time for this run (32 images on 2 ranks at logging.expected_mfu of a 1 TFLOP/s peak)
    planned = step_seconds(training_flops_per_image(load_config(str(finished_run.config), [])), 32, 2, 1.0, 0.45)
    train = read_metrics(finished_run.dir, "train")
    assert all(r["predicted_step_s"] == pytest.approx(planned) and r["step_s"] > 0 for r in train)
    assert f"(plan {planned:.3g} s)" in finished_run.output


def test_zero_stage_run_evaluates_held_out_shards_and_keeps_the_last_two_checkpoints(finished_run: Run):
    evaluation = read_metrics(finished_run.dir, "eval")[-1]
    assert evaluation["images"] == 361 and 0.2 < evaluation["top1"] <= evaluation["top5"]  # chance is 0.1
    assert (finished_run.checkpoints / "latest").read_text() == "step-00000064"
    assert sorted(p.name for p in finished_run.checkpoints.glob("step-*")) == ["step-00000048", "step-00000064"]
    assert "step 64/64 | epoch" in finished_run.output and "eval step 64 | top1" in finished_run.output


def test_zero_stage_run_exports_behave_as_our_model(finished_run: Run, tmp_path: Path):
    # the checkpoint, written in partitions by 2 ranks, exported for transformers and timm, behaves as our model
    from huggingface_hub import ModelCard
    from transformers import ViTForImageClassification

    exported = read_checkpoint(str(finished_run.checkpoints))
    assert not any(t.requires_grad for t in exported.state.values())  # no autograd graph holding the mapped partitions
    ours = exported.model.build().eval()
    ours.load_state_dict(exported.state)
    for target, size in (("hf", 16), ("timm", 16), ("hf", 24)):  # native resolution, and resized to a larger one
        out = tmp_path / f"{target}{size}"
        arguments = [str(finished_run.checkpoints), "--to", target, "--keep-head", "--image-size", str(size)]
        assert convert_checkpoint([*arguments, "--out", str(out)]) == 0  # in this process: the CLI is tested below
    exports = {
        16: [
            ViTForImageClassification.from_pretrained(tmp_path / "hf16").eval(),
            timm.create_model(f"local-dir:{tmp_path / 'timm16'}", pretrained=True).eval(),
        ],
        24: [ViTForImageClassification.from_pretrained(tmp_path / "hf24").eval()],
    }
    card = ModelCard.load(tmp_path / "hf16" / "README.md")  # what the Hub reads
    run_config = json.loads((finished_run.checkpoints / "step-00000064" / "trainer.json").read_text())["config"]
    last_eval = read_metrics(finished_run.dir, "eval")[-1]
    assert card.data.datasets == [run_config["data"]["train"]] and card.data.license == ""
    assert card.data.pipeline_tag == "image-classification"
    facts = card.data.vit_pretrain
    assert (facts["objective"], facts["steps"], facts["image_size"]) == ("supervised", 64, 16)
    assert facts["last_eval"] == {name: value for name, value in last_eval.items() if name != "kind"}
    assert f"| pre-training data | {run_config['data']['train']} |" in card.text
    assert f"step 64: top1 {last_eval['top1']:.4f}" in card.text
    with torch.no_grad():
        for size, models in exports.items():
            images = torch.randn(2, 3, size, size)
            reference = ours(images)  # at 24 px ours resizes its table on the fly, with the same function
            for model in models:
                hf_model = isinstance(model, ViTForImageClassification)
                logits = model(pixel_values=images).logits if hf_model else model(images)
                assert ((logits - reference).abs().max() / reference.abs().max()).item() <= 1e-5


def test_zero_stage_checkpoint_missing_a_rank_partition_is_refused_in_one_line(finished_run: Run, tmp_path: Path):
    # without one rank's partition the checkpoint is refused in one line, before anything is written; on a copy, as
    # the run is shared
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(finished_run.checkpoints, checkpoints)
    next((checkpoints / "step-00000064").glob("*rank_1_*optim_states.pt")).unlink()
    refused = convert(checkpoints, "hf", tmp_path / "incomplete")
    assert refused.returncode == 2 and "step-00000064: incomplete checkpoint (Expected 2 of" in refused.stderr
    assert len(error_lines(refused.stderr)) == 1, refused.stderr
    assert not (tmp_path / "incomplete").exists()


# Indirect: the stage-2 run the tests above share (pytest groups tests by the fixture's parameter value, so this one
# reuses it rather than training again). What model.json and trainer.json say does not depend on the stage.
@pytest.mark.parametrize("zero_stage_run", [2], ids=["zero2"], indirect=True)
def test_zero_stage_checkpoint_outlives_the_code(finished_run: Run, tmp_path: Path):
    """A checkpoint is described by its model.json, not by the run config it saved: it converts after the config's
    schema has changed. One written before model.json existed is read through that config, so it cannot."""
    original = finished_run.checkpoints
    newest = (original / "latest").read_text()
    described = json.loads((original / newest / "model.json").read_text())
    architecture = load_config(str(finished_run.config), []).model.description().to_json()
    assert described == {"format_version": 1, "model": architecture, "encoder_prefix": ""}

    # the saved run config as today's code would see one written under an older schema: a field it no longer has,
    # and a field it has since renamed
    copy = tmp_path / "checkpoints"
    shutil.copytree(original, copy)
    trainer_file = copy / newest / "trainer.json"
    trainer = json.loads(trainer_file.read_text())
    assert trainer["format_version"] == 1
    trainer["config"]["model"]["new_field"] = 1
    trainer["config"]["model"]["architecture"] = trainer["config"]["model"].pop("variant")
    trainer_file.write_text(json.dumps(trainer))
    with pytest.raises(ConfigError):  # else the conversion below proves nothing
        validate(trainer["config"])

    converted = convert(copy, "native", tmp_path / "native", "--keep-head")
    assert converted.returncode == 0, converted.stderr
    assert {p.name for p in (tmp_path / "native").iterdir()} == {"model.safetensors", "model.json"}
    native, expected = read_native(str(tmp_path / "native")), read_checkpoint(str(original))
    assert native.model == expected.model
    assert native.state.keys() == expected.state.keys()
    assert all(torch.equal(native.state[name], expected.state[name]) for name in expected.state)

    (copy / newest / "model.json").unlink()  # as a checkpoint written before model.json existed
    refused = convert(copy, "native", tmp_path / "legacy", "--keep-head")
    errors = error_lines(refused.stderr)
    assert refused.returncode == 2 and len(errors) == 1 and "no longer validates" in errors[0], refused.stderr
    assert not (tmp_path / "legacy").exists()


def test_zero_stage_run_writes_no_storage_credentials(finished_run: Run):
    written = [path for path in finished_run.dir.rglob("*") if path.is_file()]
    assert any(path.name == "trainer.json" for path in written) and any(path.suffix == ".pt" for path in written)
    for secret in FAKE_CREDENTIALS.values():
        assert secret not in finished_run.output
        assert not [path for path in written if secret.encode() in path.read_bytes()]


class Planted:
    """A pickle payload: unpickling it runs a command (here: creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def resumable_copy(run: Run, s3_digits: dict, tmp_path: Path) -> Path:
    """The finished run's folder copied, with a config that reads the shards from this test's bucket."""
    shutil.copytree(run.dir, tmp_path / "run")
    sections = json.loads(run.config.read_text())
    del sections["data"]["storage_options"], sections["run"]
    return write_config(tmp_path / "config.json", s3_digits, tmp_path / "run", **sections)


@pytest.mark.parametrize("zero_stage_run", [2], ids=["zero2"], indirect=True)
def test_zero_stage_resume_refuses_a_planted_checkpoint_and_never_runs_it(
    finished_run: Run, s3_digits: dict, tmp_path: Path
):
    config = resumable_copy(finished_run, s3_digits, tmp_path)
    marker = tmp_path / "ran"
    states = tmp_path / "run" / "checkpoints" / "step-00000064" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)  # our own file, written by this test's run
    torch.save({**saved, "payload": Planted(marker)}, states)
    # and its size in trainer.json's file list, as an attacker would (else the file counts as damaged, not loaded)
    trainer_file = states.parent / "trainer.json"
    trainer = json.loads(trainer_file.read_text())
    trainer["files"][states.name] = states.stat().st_size
    trainer_file.write_text(json.dumps(trainer))
    code, output = finish(launch(config, "--resume", "auto"))
    errors = error_lines(output)
    assert code == 2 and len(errors) == 1 and f"{states}: refused to load" in errors[0], output
    assert not marker.exists()


@pytest.mark.parametrize("zero_stage_run", [2], ids=["zero2"], indirect=True)
def test_zero_stage_resume_none_refuses_to_overwrite_another_run_unless_asked(
    finished_run: Run,
    s3_digits: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    from pretrain import run

    config = resumable_copy(finished_run, s3_digits, tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    # the refusal in this process (one-line errors of two launched ranks are checked by the tests above); the
    # overwrite on two ranks, whose barrier keeps a rank from reading what the other deletes
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config), "--resume", "none"]) == 2
    output = capsys.readouterr().err
    errors = error_lines(output)
    assert len(errors) == 1, output
    assert f"{checkpoints}: holds the checkpoints of a run (newest step-00000064)" in errors[0]
    assert (checkpoints / "latest").read_text() == "step-00000064"

    short = ["--set", "schedule.steps=8", "--set", "checkpoint.every_steps=8"]
    code, output = finish(launch(config, "--resume", "none", "--overwrite", *short))
    assert code == 0, output
    assert (checkpoints / "latest").read_text() == "step-00000008"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000008"]
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [8]  # the old run's records are gone


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


@pytest.mark.parametrize("zero_stage_run", [2, 3], ids=["zero2", "zero3"], indirect=True)
def test_zero_stage_checkpoint_of_two_ranks_resumes_on_one(
    finished_run: Run, digit_shards: Path, s3_digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Resumed on one rank from the two-rank run's step 48, through a universal copy: the fp32 master weights are
    the saved ones exactly, step, learning rate and Adam's step count carry over, the no-decay group stays so, the
    global batch stays 32 (two accumulation steps of 16), the run ends as the uninterrupted one did, and the one rank
    trains on no sample the two had trained on in the same epoch."""
    config = resumable_copy(finished_run, s3_digits, tmp_path)
    saved = fp32_weights(tmp_path / "run" / "checkpoints", "step-00000048")  # consolidated from both partitions
    uninterrupted = {record["step"]: record for record in read_metrics(finished_run.dir, "train")}
    overrides = ["deepspeed.micro_batch_size=16"]  # what the two-rank run had per rank
    with one_rank_in_process(monkeypatch):
        trainer = Trainer(load_config(str(config), overrides), distributed.init(), resume="step-00000048")
        engine = trainer.engine
        assert trainer.universal and (trainer.micro_batch, trainer.accumulation) == (16, 2)
        assert engine.global_steps == 48
        assert engine.get_lr()[0] == pytest.approx(uninterrupted[48]["lr"], rel=1e-6)
        for name, parameter in engine.module.named_parameters():
            assert torch.equal(safe_get_full_fp32_param(parameter), saved[name]), name
        optimizer = engine.optimizer.optimizer
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
        assert {int(state["step"]) for state in optimizer.state.values()} == {48}
        copy = tmp_path / "run" / "checkpoints" / "universal" / "step-00000048"
        assert (copy / "zero").is_dir()
        assert trainer.train() == 0
    assert not copy.exists()  # removed once the run had saved on one rank
    resumed = {record["step"]: record for record in read_metrics(tmp_path / "run", "train")}
    for step in (56, 64):
        assert resumed[step]["lr"] == pytest.approx(uninterrupted[step]["lr"], rel=1e-6)
        assert resumed[step]["epoch"] == pytest.approx(uninterrupted[step]["epoch"])
    assert resumed[56]["loss"] <= uninterrupted[48]["loss"] + step_noise(uninterrupted)
    final = loader_states(fsspec.filesystem("file"), str(tmp_path / "run" / "checkpoints" / "step-00000064"))
    check_epoch_delivered_once(tmp_path / "run", final, digit_shards, resumed_at=48, ranks=(2, 1))


# ZeRO 2 and 3 in bf16 go from two ranks to one above; here from one to two: ZeRO 0 (no conversion), ZeRO 2 in bf16
# (what most runs use) and ZeRO 3 in fp32
@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "bf16"), (2, "bf16"), (3, "fp32")], ids=["zero0-bf16", "zero2-bf16", "zero3-fp32"]
)
def test_one_rank_checkpoint_on_s3_resumes_on_two_ranks(
    stage: int, precision: str, digit_shards: Path, s3_digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A one-rank run checkpointing to S3, resumed from its step 32 (of epoch 0's 45) on two ranks: each rank
    downloads what it reads into its node's staging folder, the node converts (ZeRO 1-3), the run continues on the
    one-rank run's schedule, and the two ranks train on the rest of epoch 0 once."""
    from pretrain import run

    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "config.json",
        s3_digits,
        run_dir,
        deepspeed={"zero_stage": stage, "precision": precision, "micro_batch_size": 16},
        # saved at 32 (resumed from) and 64 only: the steps the test reads
        checkpoint={"dir": "s3://bucket/ckpt", "storage_options": s3_digits, "every_steps": 32, "keep_last": 2},
        logging={"sample_keys": True},
    )
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config), "--set", f"checkpoint.staging_dir={tmp_path / 'one'}"]) == 0
    one_rank = {record["step"]: record for record in read_metrics(run_dir, "train")}
    staging = tmp_path / "two"
    code, output = finish(launch(config, "--resume", "step-00000032", "--set", f"checkpoint.staging_dir={staging}"))
    assert code == 0, output
    assert "step-00000032 at step 32 (saved on 1 ranks; now 2, 16 images per rank and 1 accumulation steps)" in output
    copy = staging / "universal" / "step-00000032"
    assert (f"universal copy {copy} converted in" in output) == (stage > 0), output
    if stage > 0:
        assert not copy.exists()  # removed once the run had saved on two ranks
    resumed = {record["step"]: record for record in read_metrics(run_dir, "train")}
    for step in (40, 48, 56, 64):
        assert resumed[step]["lr"] == pytest.approx(one_rank[step]["lr"], rel=1e-6)
    assert resumed[40]["loss"] <= one_rank[32]["loss"] + step_noise(one_rank)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_digits)
    assert fs.cat_file("bucket/ckpt/latest") == b"step-00000064"
    assert not list((staging).glob("step-*"))  # uploaded, then removed from the node
    final = loader_states(fs, "bucket/ckpt/step-00000064")
    check_epoch_delivered_once(run_dir, final, digit_shards, resumed_at=32, ranks=(1, 2))


@pytest.mark.parametrize("zero_stage_run", [2], ids=["zero2"], indirect=True)
def test_zero_stage_resume_passes_over_a_damaged_checkpoint_and_a_full_disk_keeps_the_last(
    finished_run: Run, s3_digits: dict, tmp_path: Path
):
    """A file of the newest checkpoint cut short: --resume auto warns and takes the one before, --resume with its
    name refuses in one line. Then the disk fills up at the next save: one line, exit 2, the checkpoint resumed from
    untouched."""
    config = resumable_copy(finished_run, s3_digits, tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    partition = next((checkpoints / "step-00000064").glob("*rank_1_*optim_states.pt"))
    size = partition.stat().st_size
    partition.write_bytes(partition.read_bytes()[:1000])
    store = CheckpointStore(str(checkpoints), {}, None, keep_last=2, placement=distributed.Placement(0, 0, 1))
    with pytest.raises(CheckpointError, match=rf"step-00000064: {partition.name} is 1000 bytes, {size} were written"):
        store.resolve("step-00000064")
    before = {path: path.read_bytes() for path in (checkpoints / "step-00000048").iterdir()}
    # model states of this model are ~160 kB per file: the save at step 64 cannot be written
    code, output = finish(launch(config, "--resume", "auto", max_file_bytes=64_000))
    assert f"step-00000064: {partition.name} is 1000 bytes, {size} were written; trying the checkpoint before" in output
    assert "resumed from" in output and "step-00000048 at step 48" in output
    errors = error_lines(output)
    assert code == 2 and len(errors) == 1 and "step-00000064: cannot write the checkpoint" in errors[0], output
    assert "`latest` still names the previous one" in errors[0]
    assert {path: path.read_bytes() for path in (checkpoints / "step-00000048").iterdir()} == before
    assert store.resolve("auto") == store.resolve("latest") == "step-00000048"  # "latest": OpenCLIP's spelling


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


def test_masked_patch_pretraining_on_unlabelled_shards_then_finetuning_from_it(
    digit_shards: Path, s3_digits: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    unlabelled = tmp_path / "unlabelled"
    build(
        BuildOptions(
            input=str(digit_shards.parent / "images"),
            output=str(unlabelled),
            val_fraction=0.2,
            max_samples_per_shard=200,
            workers=0,
            no_labels=True,
        )
    )
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_digits).put(
        str(unlabelled) + "/", "bucket/unlabelled/", recursive=True
    )
    pretrain_dir = tmp_path / "mpp"
    config = write_config(
        tmp_path / "mpp.json",
        s3_digits,
        pretrain_dir,
        model={"num_classes": 0, "pool": "token"},
        data={"train": "s3://bucket/unlabelled/index.json", "val": "s3://bucket/unlabelled/index.json"},
        objective={"type": "masked_patch_prediction", "target": "mean_color"},
        schedule={"steps": 48},
        deepspeed={"zero_stage": 3},
        fewshot={
            "datasets": {"digits": {"train": "s3://bucket/digits/index.json", "test": "s3://bucket/digits/index.json"}},
            "shots": [1, 5],
            "draws": 2,
            "every_steps": 24,
        },
    )
    code, output = finish(launch(config))
    assert code == 0, output
    train = read_metrics(pretrain_dir, "train")
    assert train[-1]["loss"] < train[0]["loss"] - 0.3, [r["loss"] for r in train]
    evaluation = read_metrics(pretrain_dir, "eval")[-1]
    assert evaluation["images"] == 361 and 0 < evaluation["mpp_accuracy"] < 1 and evaluation["mpp_loss"] > 0
    probes = read_metrics(pretrain_dir, "fewshot")
    assert [r["step"] for r in probes] == [0, 24, 48]  # step 0: the initial weights, as a baseline
    assert all(0.1 < r["digits/5shot"] <= 1 and 0 < r["digits/1shot"] <= 1 for r in probes), probes
    assert "few-shot step 48 | digits/1shot" in output

    weights = read_state(str(pretrain_dir / "checkpoints"))  # ZeRO-3 partitions, consolidated
    assert weights["mask_token"].shape == (1, 1, 64) and weights["head.weight"].shape == (512, 64)
    classifier = create_model("Ti/4", image_size=16, width=64, depth=2, mlp_dim=128, num_heads=2, num_classes=10)
    assert load_matching(classifier, weights, "mpp") == ["head.weight", "head.bias"]
    assert torch.equal(classifier.patch_embed.proj.weight, weights["encoder.patch_embed.proj.weight"])

    # the CLI probes the same checkpoint (the newest one: step 48) and reads the shards from S3
    command = [
        sys.executable,
        "-m",
        "pretrain.evaluate.fewshot",
        "--checkpoint",
        str(pretrain_dir / "checkpoints"),
        "--train",
        "s3://bucket/digits/index.json",
        "--test",
        "s3://bucket/digits/index.json",
        "--shots",
        "1",
        "5",
        "--draws",
        "2",
        "--storage-option",
        f"endpoint_url={s3_digits['endpoint_url']}",
    ]
    capsys.readouterr()
    assert fewshot_main(command[3:]) == 0  # in this process: its `python -m` line only adds an interpreter start
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "-shot top-1" in line]
    assert [float(line.split()[-1]) for line in lines] == pytest.approx(
        [probes[-1]["digits/1shot"], probes[-1]["digits/5shot"]], abs=0.05
    ), printed  # bf16 ranks vs fp32 here
    assert fewshot_main(["--checkpoint", str(tmp_path / "nowhere"), *command[5:]]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"error: {tmp_path / 'nowhere'}: no such file or folder"), errors

    finetune_dir = tmp_path / "finetune"
    # ZeRO-3 builds the classifier partitioned; fp32 and a vanishing learning rate keep the loaded weights visible
    config = write_config(
        tmp_path / "finetune.json",
        s3_digits,
        finetune_dir,
        model={"pool": "token", "init_from": str(pretrain_dir / "checkpoints")},
        schedule={"steps": 4, "warmup_steps": 1},
        optimizer={"lr": 1e-12},
        deepspeed={"zero_stage": 3, "precision": "fp32"},
        checkpoint={"every_steps": 4},
    )
    code, output = finish(launch(config))
    assert code == 0, output
    assert f"weights from {pretrain_dir / 'checkpoints'}; initialised afresh: head.weight, head.bias" in output
    tuned = read_state(str(finetune_dir / "checkpoints"))
    for name, tensor in tuned.items():
        if not name.startswith("head."):
            torch.testing.assert_close(tensor, weights[f"encoder.{name}"], rtol=0, atol=1e-6)


def test_run_leaves_no_process_group_behind(digit_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A process that exits with gloo's process group alive aborts in interpreter finalization ("terminate called
    without an active exception", exit -6) in about 1 of 3 two-rank runs here, failing a job that had finished. The
    run therefore destroys the group itself, after a finished run and after a user error alike."""
    import torch.distributed as dist

    from pretrain import run

    local = {"train": str(digit_shards / "index.json"), "val": str(digit_shards / "index.json"), "storage_options": {}}
    config = write_config(
        tmp_path / "config.json",
        {},
        tmp_path / "run",
        data=local,
        schedule={"steps": 4, "warmup_steps": 1},
        checkpoint={"every_steps": 1000},
    )
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config)]) == 0
        assert not dist.is_initialized()
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        assert run.main(["--config", str(config), "--set", f"data.train={tmp_path / 'nowhere.json'}"]) == 2
        assert not dist.is_initialized()


def test_wandb_and_mlflow_get_what_metrics_jsonl_gets_and_a_resumed_run_continues_their_runs(
    digit_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from mlflow import MlflowClient

    from pretrain import run

    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch: its run file is written, nothing is sent
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run folder's store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set by the run too; not left to it for the read-back
    run_dir = tmp_path / "run"
    local = {"train": str(digit_shards / "index.json"), "val": str(digit_shards / "index.json"), "storage_options": {}}
    config = write_config(
        tmp_path / "config.json",
        {},
        run_dir,
        data=local,
        schedule={"steps": 4, "warmup_steps": 1},
        checkpoint={"every_steps": 2},
        logging={"every_steps": 2, "trackers": ["wandb", "mlflow", "jsonl"], "project": "digits"},
    )
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config)]) == 0
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        assert run.main(["--config", str(config), "--set", "schedule.steps=6"]) == 0  # resumed at step 4

    ids = json.loads((run_dir / "checkpoints" / "step-00000006" / "trainer.json").read_text())["trackers"]
    assert set(ids) == {"wandb", "mlflow"}
    assert json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer.json").read_text())["trackers"] == ids
    expected = {
        (f"{record['kind']}/{name}", record["step"]): value
        for record in read_metrics(run_dir)
        for name, value in record.items()
        if name in ("loss", "lr", "top1", "save_s")
    }
    assert {key[0] for key in expected} == {"train/loss", "train/lr", "eval/top1", "checkpoint/save_s"}
    assert sorted(step for name, step in expected if name == "train/loss") == [2, 4, 6]

    # W&B: one run, started twice (a run file per start), holding every value at its step
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 2 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    logged = wandb_records.history(files[0]) | wandb_records.history(files[1])
    assert {key: logged[key] for key in expected} == expected
    assert wandb_records.config(files[0])["model"]["variant"] == "Ti/4"

    # MLflow: one run in the run folder's store, the same values, the config as parameters
    client = MlflowClient((run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("digits")
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == ids["mlflow"] and found.info.status == "FINISHED" and found.info.run_name == "test"
    assert found.data.params["model.variant"] == "Ti/4" and found.data.params["schedule.steps"] == "4"
    for name in {name for name, _ in expected}:
        history = {(name, m.step): m.value for m in client.get_metric_history(ids["mlflow"], name)}
        assert history == {key: value for key, value in expected.items() if key[0] == name}


def test_the_weight_average_under_zero3_is_the_hand_computed_one_is_evaluated_exported_and_resumed(
    digit_shards: Path, tmp_path: Path
):
    """ZeRO-3 on two ranks, the hardest case: each rank averages its partitions (DeepSpeed keeps the tensors under
    1,000 elements whole on every rank and gathers them from the partitions after each step), the checkpoint holds
    the gathered average, and a resumed run partitions it again. ZeRO 0-2 average whole tensors: the killed-three-
    times test resumes one exactly, and the class's own test checks the arithmetic."""
    run_dir = tmp_path / "run"
    local = {"train": str(digit_shards / "index.json"), "val": str(digit_shards / "index.json"), "storage_options": {}}
    zero3 = {"overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 1000}}}
    config = write_config(
        tmp_path / "config.json",
        {},
        run_dir,
        data=local,
        # fp32: the average of exactly the weights the checkpoints hold
        deepspeed={"zero_stage": 3, "precision": "fp32", **zero3},
        optimizer={"ema": {"decay": 0.75, "start_step": 1, "every_steps": 2}},
        schedule={"steps": 5, "warmup_steps": 1},
        checkpoint={"every_steps": 1, "keep_last": 5},
        logging={"every_steps": 1},
    )
    code, output = finish(launch(config))
    assert code == 0, output
    checkpoints = run_dir / "checkpoints"
    weights = {step: fp32_weights(checkpoints, f"step-{step:08d}") for step in (1, 3, 5)}  # the steps it averages
    saved = load_file(checkpoints / "step-00000005" / "weight_average.safetensors")
    assert saved.keys() == weights[1].keys()
    for name, average in saved.items():
        expected = weights[1][name]  # until start_step it follows the weights; then steps 3 and 5 update it
        expected = 0.75 * expected + 0.25 * weights[3][name]
        expected = 0.75 * expected + 0.25 * weights[5][name]
        assert torch.allclose(average, expected, rtol=1e-6, atol=1e-7), name
    evaluation = read_metrics(run_dir, "eval")[-1]
    assert 0 <= evaluation["ema_top1"] <= evaluation["ema_top5"] <= 1 and evaluation["step"] == 5

    # in this process: the command line's exit codes and messages are tested through subprocesses elsewhere
    for weights_flag, expected_state in (("ema", saved), ("raw", weights[5])):
        arguments = [str(checkpoints), "--to", "native", "--weights", weights_flag, "--keep-head"]
        assert convert_checkpoint([*arguments, "--out", str(tmp_path / weights_flag)]) == 0
        exported = read_native(str(tmp_path / weights_flag)).state
        assert all(torch.equal(exported[name], expected_state[name]) for name in exported)
    assert (
        convert_checkpoint([str(checkpoints), "--to", "native", "--keep-head", "--out", str(tmp_path / "default")]) == 0
    )
    assert read_native(str(tmp_path / "default")).state.keys() == exported.keys()
    assert all(torch.equal(read_native(str(tmp_path / "default")).state[n], saved[n]) for n in exported)

    # resumed: each rank takes its partitions of the saved average back, and step 7 updates them
    code, output = finish(launch(config, "--set", "schedule.steps=7"))
    assert code == 0 and "resumed from" in output, output
    resumed = load_file(checkpoints / "step-00000007" / "weight_average.safetensors")
    last = fp32_weights(checkpoints, "step-00000007")
    for name, average in resumed.items():
        assert torch.allclose(average, 0.75 * saved[name] + 0.25 * last[name], rtol=1e-6, atol=1e-7), name


def test_a_tracker_that_is_not_installed_or_an_old_logging_key_is_one_line_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    class Absent(importlib.abc.MetaPathFinder):
        """This environment without W&B, as a machine that never installed the extra."""

        def find_spec(self, name: str, *_: Any) -> None:
            if name == "wandb" or name.startswith("wandb."):
                raise ModuleNotFoundError(name)

    monkeypatch.setattr(sys, "meta_path", [Absent(), *sys.meta_path])
    for name in [module for module in sys.modules if module == "wandb" or module.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    config = write_config(tmp_path / "config.json", {}, tmp_path / "run", logging={"trackers": ["wandb"]})
    with pytest.raises(
        UserError, match=r"^logging.trackers: wandb is not installed; pip install 'vit-pretrain\[wandb\]'"
    ):
        Trainer(load_config(str(config), []), distributed.Placement(0, 0, 1))
    with pytest.raises(ConfigError, match=r"logging.tensorboard: replaced by logging.trackers"):
        load_config(str(config), ["logging.tensorboard=true"])


def test_non_finite_losses_are_skipped_and_ten_in_a_row_stop_the_run(
    digit_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """A learning rate of 1e30 sends the weights to 1e30 within the first steps; every loss after that is infinite
    or NaN. Those steps are skipped (no update), and the tenth in a row stops the run naming the step."""
    from pretrain import run

    local = {"train": str(digit_shards / "index.json"), "val": None, "storage_options": {}}
    config = write_config(
        tmp_path / "config.json", {}, tmp_path / "run", data=local, optimizer={"lr": 1e30}, schedule={"warmup_steps": 1}
    )
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config)]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert re.fullmatch(
        r"error: loss was not finite 10 times in a row at step \d; lower optimizer.lr or check the data", errors[0]
    )


def test_an_optimizer_step_makes_one_collective_and_reads_the_device_once(
    digit_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """On a GPU every read of a value on the device stops the host from queueing kernels until the device catches
    up, and every collective is a round trip between ranks: a step of the loop makes one of each (the loss is read at
    log steps only). Counted by wrapping torch.distributed.all_reduce and the tensor methods that read a value, for
    calls from pretrain/train/, as the difference between an 8-step and a 4-step run that log and save only at their
    last step."""
    from pretrain import run

    calls: Counter = Counter()
    ours = f"{os.sep}pretrain{os.sep}train{os.sep}"

    def counted(kind: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if ours in sys._getframe(1).f_code.co_filename:
                calls[kind] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.distributed, "all_reduce", counted("collectives", torch.distributed.all_reduce))
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, counted("device reads", getattr(torch.Tensor, method)))
    local = {"train": str(digit_shards / "index.json"), "val": None, "storage_options": {}}
    totals = {}
    for steps in (4, 8):
        config = write_config(
            tmp_path / f"{steps}.json",
            {},
            tmp_path / f"run-{steps}",
            data=local,
            schedule={"steps": steps, "warmup_steps": 1},
            deepspeed={"micro_batch_size": 32},  # the whole batch: one micro-step per optimizer step
            checkpoint={"every_steps": steps},
            logging={"every_steps": steps},
        )
        calls.clear()
        with one_rank_in_process(monkeypatch):
            assert run.main(["--config", str(config)]) == 0
        totals[steps] = dict(calls)
    per_step = {kind: (totals[8][kind] - totals[4][kind]) / 4 for kind in totals[8]}
    assert per_step == {"collectives": 1, "device reads": 1}, totals


def test_a_checkpoint_of_another_model_or_with_a_file_damaged_in_place_is_refused_in_one_line(
    digit_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """Resuming with a config that builds another model is refused before DeepSpeed sees the checkpoint, naming the
    fields; a file overwritten in place at its size (which the file list cannot see) fails inside DeepSpeed's load,
    and that too reaches the user as one line naming the checkpoint."""
    from pretrain import run

    local = {"train": str(digit_shards / "index.json"), "val": None, "storage_options": {}}
    schedule = {"steps": 4, "warmup_steps": 1}
    config = write_config(tmp_path / "config.json", {}, tmp_path / "run", data=local, schedule=schedule)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config), "--set", "checkpoint.every_steps=4"]) == 0
        capsys.readouterr()
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        longer = ["--config", str(config), "--set", "schedule.steps=8"]
        assert run.main([*longer, "--set", "model.mlp_dim=256", "--set", "model.image_size=32"]) == 2
        errors = error_lines(capsys.readouterr().err)
        assert errors == [
            f"error: {checkpoint}: holds another model (model.mlp_dim 128 there, 256 here; model.image_size 16 "
            "there, 32 here); resume with the settings it was trained with, or start a new run in another "
            "run.output_dir"
        ]
        states = checkpoint / "mp_rank_00_model_states.pt"
        damaged = bytearray(states.read_bytes())
        damaged[-200:] = bytes(200)  # the zip's central directory
        states.write_bytes(bytes(damaged))
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        assert run.main(longer) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"error: {checkpoint}"), errors
    assert "mp_rank_00_model_states.pt" in errors[0], errors


def test_a_compiled_model_trains_like_the_eager_one_under_zero3_with_checkpointing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """model.compile through DeepSpeed's engine.compile, with ZeRO-3's partitioned parameters and one of the two
    blocks checkpointed: the same losses and weights as the eager run (to float rounding), the same parameter names
    in the checkpoint."""
    results = {}
    for compiled in (False, True):
        config = write_config(
            tmp_path / f"config-{compiled}.json",
            {},
            tmp_path / f"run-{compiled}",
            data={"train": "synthetic", "val": None, "storage_options": {}},
            schedule={"steps": 4, "warmup_steps": 1},
            deepspeed={"zero_stage": 3, "precision": "fp32", "activation_checkpointing": 2},
            model={"compile": compiled, "dropout": 0.0},
            logging={"every_steps": 1},
            checkpoint={"every_steps": 4},
        )
        with one_rank_in_process(monkeypatch):
            trainer = Trainer(load_config(str(config), []), distributed.init(), resume="none")
            assert trainer.engine.is_compiled == compiled
            assert trainer.train() == 0
        losses = [record["loss"] for record in read_metrics(tmp_path / f"run-{compiled}", "train")]
        results[compiled] = losses, fp32_weights(tmp_path / f"run-{compiled}" / "checkpoints", "step-00000004")
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = results[False], results[True]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_weights.keys() == eager_weights.keys()
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
