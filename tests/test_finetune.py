"""`vit-finetune`: the paper's recipe on our shards, from a converted transformers folder to a better classifier."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb_records

from pretrain.config.load import validate
from pretrain.demos.digits import digit_shards
from pretrain.finetune.loop import FinetuneConfig, FinetuneError, batch_plan, build_model, learning_rate, main
from pretrain.objectives import build_model as build_ours
from pretrain.weights.hf import write_hf
from pretrain.weights.model_weights import weights_of_run
from pretrain.weights.surgery import choose_head, resize_positions

TINY = {"variant": "Ti/4", "image_size": 32, "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4, "num_classes": 10}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    digit_shards(root / "images", root / "shards", image_size=32, seed=0)
    return root / "shards" / "index.json"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers folder of a randomly initialised tiny ViT with a (random) 10-class head to be replaced."""
    config = validate(
        {
            "run": {"name": "t"},
            "model": TINY,
            "data": {"train": "x/index.json", "batch_size": 8},
            "optimizer": {"lr": 1e-3},
            "schedule": {"steps": 10, "warmup_steps": 1},
        }
    )
    torch.manual_seed(0)
    model = build_ours(config)
    with torch.no_grad():
        model.head.weight.normal_()
    folder = tmp_path_factory.mktemp("hf")
    write_hf(weights_of_run(config, model.state_dict()), folder)
    return folder


def test_schedule_warms_up_linearly_then_decays_to_zero_on_a_cosine():
    config = FinetuneConfig(model="m", train="t", out="o", steps=100, warmup_steps=10, lr=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.01) and learning_rate(config, 9) == pytest.approx(0.1)
    assert learning_rate(config, 10) == pytest.approx(0.1)
    assert learning_rate(config, 55) == pytest.approx(0.05)
    assert learning_rate(config, 99) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_batch_splits_over_processes_and_accumulation_or_says_what_to_change():
    config = FinetuneConfig(model="m", train="t", out="o", batch_size=512, micro_batch_size=32)
    assert batch_plan(config, 8) == (32, 2)
    assert batch_plan(FinetuneConfig(model="m", train="t", out="o"), 2) == (256, 1)
    with pytest.raises(FinetuneError, match="--batch-size 512 is not divisible by the 3 processes"):
        batch_plan(config, 3)
    with pytest.raises(FinetuneError, match="--micro-batch-size 48 does not divide the per-process batch 256"):
        batch_plan(FinetuneConfig(model="m", train="t", out="o", micro_batch_size=48), 2)


def test_the_model_gets_a_zero_head_for_the_classes_and_the_resized_position_table(pretrained: Path):
    from pretrain.weights.hf import from_hf

    config = FinetuneConfig(model=str(pretrained), train="t", out="o", image_size=48)
    model = build_model(config, [f"digit {n}" for n in range(5)])
    assert model.config.image_size == 48 and model.config.id2label[3] == "digit 3"
    assert model.classifier.weight.shape == (5, 64) and not model.classifier.weight.any()
    assert not model.classifier.bias.any()
    expected = resize_positions(choose_head(from_hf(str(pretrained)), num_classes=5), 48).state["pos_embed"]
    table = model.vit.embeddings.position_embeddings
    assert table.shape == (1, 145, 64) and torch.equal(table, expected)


@pytest.mark.slow
def test_finetuning_at_a_higher_resolution_learns_the_digits_and_saves_a_working_model(
    shards: Path, pretrained: Path, tmp_path: Path, capsys
):
    from transformers import pipeline

    out = tmp_path / "tuned"
    code = main(
        [
            "--model",
            str(pretrained),
            "--train",
            str(shards),
            "--out",
            str(out),
            "--image-size",
            "48",
            "--batch-size",
            "64",
            "--micro-batch-size",
            "32",
            "--steps",
            "60",
            "--warmup-steps",
            "6",
            "--lr",
            "0.1",
            "--no-hflip",
            "--crop-scale",
            "[0.6, 1.0]",
            "--num-workers",
            "0",
            "--log-every-steps",
            "20",
            "--eval-every-steps",
            "30",
            "--precision",
            "no",
            # fake credentials (the shards are local, so unused): none may reach the folder meant for sharing
            "--storage-option",
            "key=AKIAFAKE0TUNE0KEY",
            "--storage-options",
            '{"secret": "fake-tune-secret-4b3a"}',
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    for path in (p for p in out.rglob("*") if p.is_file()):
        assert b"AKIAFAKE0TUNE0KEY" not in path.read_bytes() and b"fake-tune-secret-4b3a" not in path.read_bytes()
    assert json.loads((out / "results.json").read_text())["config"]["storage_options"] == {
        "key": "***",
        "secret": "***",
    }
    assert "60 steps of 64 (1 processes x 2 passes x 32)" in printed and "step 60/60 | loss" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["storage_options"] == {"key": "***", "secret": "***"}
    assert [entry["step"] for entry in results["history"]] == [30, 60]
    assert results["images"] == 361  # the held-out 20% of 1,797, each counted once
    first, last = results["history"]
    # chance is 0.1 (one standard error 0.016 on 361 images); from random init, 60 steps end at 0.32-0.49 over seeds 0-2
    assert last["top1"] >= 0.25 and last["top1"] > first["top1"], results
    classify = pipeline("image-classification", model=str(out), device="cpu")
    image = next((shards.parent.parent / "images" / "7").iterdir())
    labels = [guess["label"] for guess in classify(str(image), top_k=10)]
    assert sorted(labels) == [str(n) for n in range(10)]  # the class names of classes.json, not LABEL_n


def test_bad_inputs_get_one_line_errors(shards: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "m", "--train", "t", "--out", "o", "--lr", "-1"])
    assert "--lr: Input should be greater than 0 (got -1)" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(tmp_path),
                "--train",
                str(shards),
                "--out",
                str(tmp_path / "o"),
                "--num-workers",
                "0",
                "--precision",
                "no",
            ]
        )
        == 2
    )  # accelerate keeps one precision per process
    assert "not a transformers model folder" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "index.json"
    assert (
        main(["--model", str(tmp_path), "--train", str(missing), "--out", str(tmp_path / "o"), "--precision", "no"])
        == 2
    )
    assert f"error: {missing}: no such file; pass the index.json build-shards wrote" in capsys.readouterr().err


def test_switches_stand_alone(tmp_path: Path):
    from pretrain.finetune.loop import parse_args

    required = ["--model", "m", "--train", "t", "--out", "o"]
    defaults = parse_args(required)
    assert (defaults.keep_head, defaults.hflip) == (False, True)
    switched = parse_args([*required, "--keep-head", "--no-hflip"])
    assert (switched.keep_head, switched.hflip) == (True, False)
    (tmp_path / "config.json").write_text(json.dumps({"keep_head": True}))
    assert parse_args([*required, "--config", str(tmp_path / "config.json"), "--no-keep-head"]).keep_head is False


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs" / "finetune").glob("*.json")), ids=lambda p: p.name
)
def test_shipped_finetune_configs_validate_and_flags_win_over_them(path: Path):
    from pretrain.finetune.loop import parse_args

    config = parse_args(["--config", str(path), "--steps", "7", "--crop-scale", "[0.5, 1.0]"])
    assert config == FinetuneConfig.model_validate(
        {**json.loads(path.read_text()), "steps": 7, "crop_scale": [0.5, 1.0]}
    )


def finetune_command(pretrained: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pretrain.finetune",
        "--model",
        str(pretrained),
        "--train",
        str(shards),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--steps",
        "40",
        "--warmup-steps",
        "4",
        "--lr",
        "0.03",
        "--no-hflip",
        "--num-workers",
        "1",
        "--log-every-steps",
        "4",
        "--eval-every-steps",
        "20",
        "--checkpoint-every-steps",
        "8",
        "--ema-decay",
        "0.8",
        "--precision",
        "no",
        *extra,
    ]


def latest_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))


def wait_for_checkpoint(process: subprocess.Popen, out: Path, after: int) -> None:
    """Until `latest` names a checkpoint past step `after`."""
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "latest").exists() or latest_step(out) <= after:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_preempted_then_killed_finetune_resumes_to_the_same_weights_average_and_tracker_runs(
    shards: Path, pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    # one thread: a matmul's sums do not depend on how a machine splits them
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    reference = tmp_path / "reference"
    # trained alongside the interrupted runs (one thread each either way); to a file, as a pipe nobody reads fills up
    with open(tmp_path / "reference.log", "w") as log:
        reference_run = subprocess.Popen(
            finetune_command(pretrained, shards, reference), env=env, stdout=log, stderr=subprocess.STDOUT
        )

    out = tmp_path / "interrupted"
    # fake credentials (the shards are local, so unused): none may reach a file, W&B's and MLflow's included
    secret = "fake-tracker-secret-7c1d"
    command = finetune_command(
        pretrained,
        shards,
        out,
        "--trackers",
        "wandb",
        "mlflow",
        "--project",
        "digits",
        "--storage-option",
        f"secret={secret}",
    )
    started = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(started, out, 0)
    started.send_signal(signal.SIGTERM)  # a scheduler's notice: a checkpoint at the next step, then exit 75
    output, _ = started.communicate(timeout=120)
    assert started.returncode == 75 and "preempted: checkpoint" in output, output[-3000:]
    preempted_at = latest_step(out)
    assert 8 <= preempted_at < 40

    resumed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(resumed, out, preempted_at)
    time.sleep(0.3)  # a few steps past the checkpoint: they are trained again after the kill
    resumed.kill()
    resumed.wait()
    # where the last start resumes: on a fast machine those 0.3 s may have reached the next checkpoint
    killed_after = latest_step(out)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert reference_run.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    for weights in ("model.safetensors", "raw/model.safetensors"):  # the average, and the last weights
        ours, theirs = load_file(out / weights), load_file(reference / weights)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not torch.equal(ours["classifier.weight"], load_file(out / "model.safetensors")["classifier.weight"])
    history = [json.loads((folder / "results.json").read_text())["history"] for folder in (out, reference)]
    assert history[0] == history[1] and [entry["step"] for entry in history[0]] == [20, 40]
    assert all(0 < entry["ema_top1"] <= entry["ema_top5"] for entry in history[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000032", "step-00000040"]
    assert not [path for path in out.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    capsys.readouterr()
    assert main([*command[3:], "--lr", "0.1"]) == 2  # refused before anything starts, so in this process
    refused = capsys.readouterr().err
    assert refused.strip().splitlines()[-1] == (
        f"error: {out / 'checkpoints' / 'step-00000040'}: was trained with --lr 0.03 (now 0.1); resume with its "
        "settings, or choose another --out"
    ), refused[-2000:]

    # every start logged to the same W&B and MLflow run; a step trained twice logged the same values twice. W&B
    # writes through a buffer that a SIGKILL loses: the steps only the killed start logged may be missing there
    logged = {
        (f"{record['kind']}/{name}", record["step"]): value
        for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        for name, value in record.items()
        if name in ("loss", "top1")
    }
    assert sorted(step for name, step in logged if name == "train/loss") == list(range(4, 41, 4))
    ids = json.loads((out / "checkpoints" / "step-00000040" / "progress.json").read_text())["trackers"]
    files = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 3 and len(list((out / "wandb").glob("offline-run-*"))) == 3
    from_wandb = {}
    for file in files:
        from_wandb |= wandb_records.history(file)
    assert all(from_wandb[key] == value for key, value in logged.items() if key in from_wandb)
    assert all(key in from_wandb for key in logged if not preempted_at < key[1] <= killed_after), sorted(from_wandb)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the run set to write its folder's store
    client = MlflowClient((out / "mlruns").as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert found.info.run_id == ids["mlflow"] and found.data.params["steps"] == "40"
    for name in ("train/loss", "eval/top1"):
        assert {(name, m.step): m.value for m in client.get_metric_history(found.info.run_id, name)} == {
            key: value for key, value in logged.items() if key[0] == name
        }


def test_the_weight_average_is_the_hand_computed_one_in_fp32_and_swaps_in_and_out():
    from pretrain.train.weight_average import WeightAverage

    weight = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    average = WeightAverage({"w": weight}, decay=0.9, start_step=1, every_steps=2)
    expected = weight.float().clone()
    for step, value in enumerate([3.0, 5.0, 7.0, 9.0, 11.0], start=1):
        weight.fill_(value)  # what an optimizer step left
        average.update({"w": weight}, step)
        if step <= 1:
            expected = weight.float().clone()  # until start_step it follows the weights
        elif (step - 1) % 2 == 0:  # steps 3 and 5
            expected = 0.9 * expected + 0.1 * weight.float()
        assert average.average["w"].dtype == torch.float32
        assert torch.allclose(average.average["w"], expected, rtol=1e-6), (step, average.average["w"], expected)
    assert average.average["w"].tolist() == pytest.approx([0.9 * (0.9 * 3 + 0.1 * 7) + 0.1 * 11] * 2)
    with average.swapped_into({"w": weight}):
        assert weight.tolist() == pytest.approx([4.16] * 2, abs=0.02)  # in bf16
    assert weight.tolist() == [11.0, 11.0]
    restored = WeightAverage({"w": torch.zeros(2)}, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert torch.equal(restored.average["w"], average.average["w"])


def test_resume_names_a_complete_checkpoint_or_says_what_to_pass(tmp_path: Path):
    from pretrain.finetune.state import ResumeError, resolve

    out = tmp_path / "out"
    assert resolve(str(out), "auto") is None and resolve(str(out), "none") is None  # nothing yet: start
    for step in (8, 16):
        (out / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (out / "checkpoints" / f"step-{step:08d}" / "progress.json").write_text("{}")
    (out / "checkpoints" / "step-00000024.partial").mkdir()  # a save cut short
    (out / "checkpoints" / "latest").write_text("step-00000016")
    assert resolve(str(out), "latest") == out / "checkpoints" / "step-00000016"
    assert resolve(str(out), "step-00000008") == out / "checkpoints" / "step-00000008"
    (out / "checkpoints" / "latest").write_text("step-00000024")  # killed while that step replaced an older save
    assert resolve(str(out), "auto") == out / "checkpoints" / "step-00000016"
    with pytest.raises(ResumeError, match="holds the checkpoints of a fine-tune; --resume auto continues it"):
        resolve(str(out), "none")
    with pytest.raises(ResumeError, match="step-00000099: no such checkpoint; pass auto, none or a step-NNNNNNNN"):
        resolve(str(out), "step-00000099")
