"""The trainer's objectives and options on two ranks or in pytest's process: masked patch prediction then fine-tuning,
the process group left behind, experiment trackers, the weight average, non-finite losses, the host syncs of an
optimizer step, checkpoints of another model, and torch.compile.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch
import wandb_records
from conftest import free_port
from safetensors.torch import load_file
from trainer_jobs import error_lines, finish, fp32_weights, launch, one_rank_in_process, write_config

from data_pipeline.build.builder import BuildOptions, build
from data_pipeline.commands import UserError
from pretrain.config import ConfigError
from pretrain.config.load import load_config
from pretrain.evaluate.fewshot import main as fewshot_main
from pretrain.model import create_model
from pretrain.train import distributed
from pretrain.train.metrics import read_metrics
from pretrain.train.trainer import Trainer
from pretrain.weights.convert import main as convert_checkpoint
from pretrain.weights.native import read_native
from pretrain.weights.surgery import load_matching
from pretrain.weights.trainer_checkpoint import read_state

pytestmark = pytest.mark.slow  # every test starts a trainer: DeepSpeed's start-up alone takes seconds


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
    times test (test_trainer_faults.py) resumes one exactly, and the class's own test checks the arithmetic."""
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
