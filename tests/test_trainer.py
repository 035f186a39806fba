"""The DeepSpeed trainer on two CPU ranks (gloo), started as users start it: `deepspeed --num_gpus 2 pretrain/run.py`.

Data are scikit-learn's digits as shards on moto's S3 server. Each run takes some seconds of start-up, so every
test launches as few runs as it can. The trainer's tests are in four modules of comparable run time, which `make test`
runs on two workers side by side: this one (one run per ZeRO stage, shared by the tests of what it wrote and how it
resumes), test_trainer_job_shape, test_trainer_faults and test_trainer_options.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import timm
import torch
from conftest import put_digits, s3_bucket
from deepspeed.utils import safe_get_full_fp32_param
from trainer_jobs import (
    ROOT,
    check_epoch_delivered_once,
    error_lines,
    finish,
    fp32_weights,
    launch,
    loader_states,
    one_rank_in_process,
    shm_buffers,
    step_noise,
    write_config,
)

from pretrain.config import ConfigError, validate
from pretrain.config.load import load_config
from pretrain.train import distributed
from pretrain.train.checkpoint import CheckpointError, CheckpointStore
from pretrain.train.compute import step_seconds, training_flops_per_image
from pretrain.train.metrics import read_metrics
from pretrain.train.trainer import Trainer
from pretrain.weights.convert import main as convert_checkpoint
from pretrain.weights.native import read_native
from pretrain.weights.trainer_checkpoint import read_checkpoint

pytestmark = pytest.mark.slow  # every test starts a trainer: DeepSpeed's start-up alone takes seconds


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


def convert(source: Path, to: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pretrain.weights.convert", str(source), "--to", to, *args, "--out", str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


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
