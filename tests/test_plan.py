"""The run planner (`python -m pretrain.plan.cli`): FLOPs against hand arithmetic, the memory model against DeepSpeed's
estimators, against saved-tensor hooks and against the peak memory of real runs on two CPU ranks, the fit / no-fit
decision, and its command line."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, two_rank_command
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline.build.builder import BuildOptions, build
from pretrain.config.load import load_config, validate
from pretrain.demos.digits import write_digits
from pretrain.model.vit import model_input
from pretrain.objectives import build_model, build_task
from pretrain.plan.cli import main
from pretrain.plan.gpus import gpu_spec, spec_for_device
from pretrain.plan.memory_model import activation_bytes
from pretrain.train.compute import forward_flops_per_image
from pretrain.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
JFT = str(ROOT / "configs" / "vit_h14_jft.json")
IMAGENET = str(ROOT / "configs" / "vit_b16_imagenet.json")


def plan(*args: str) -> tuple[int, dict, str]:
    """Run the CLI in-process with --json; (exit code, the plan, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--json"])
    return code, json.loads(out.getvalue()) if out.getvalue() else {}, err.getvalue()


# -- compute -------------------------------------------------------------------------------------------------------


def block_flops(tokens: int, width: int, mlp: int) -> int:
    # qkv + out projection (4 D^2) and the MLP (2 D M) per token, 2 FLOPs per multiply-add; q @ k^T and attn @ v
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width


def test_h14_on_jft_flops_days_and_cost_by_hand():
    # ViT-H/14 at 224 px: 16 x 16 patches + class token, 32 blocks of width 1280, MLP 5120; a 14x14x3 patch
    # projection, the 1280-wide representation layer and 18,291 sigmoid classes
    forward = 32 * block_flops(257, 1280, 5120) + 2 * 256 * 1280 * (14 * 14 * 3) + 2 * 1280 * 1280 + 2 * 1280 * 18291
    assert forward == 334_637_760_000
    code, result, _ = plan(
        "--config",
        JFT,
        "--gpus",
        "256",
        "--gpu-type",
        "H100",
        "--mfu",
        "0.4",
        "--price-per-gpu-hour",
        "2.5",
        "--train-samples",
        "303000000",
        "--bytes-per-sample",
        "100000",
    )
    assert code == 0
    steps = math.ceil(14 * 303_000_000 / 4096)  # the trainer's rounding of 14 epochs
    images = steps * 4096
    compute = result["compute"]
    assert result["run"]["steps"] == steps == 1_035_645
    assert compute["forward_flops_per_image"] == forward
    assert compute["training_flops"] == pytest.approx(3 * forward * images, rel=1e-12)
    assert compute["training_flops_with_recompute"] == pytest.approx(4 * forward * images, rel=1e-12)
    # the config checkpoints activations, so the GPUs execute the 4x count
    seconds = 4 * forward * images / (256 * 989.4e12 * 0.4)
    assert result["time"]["days"] == pytest.approx(seconds / 86400, rel=1e-9)
    assert result["time"]["gpu_hours"] == pytest.approx(seconds / 3600 * 256, rel=1e-9)
    assert result["time"]["cost"] == pytest.approx(seconds / 3600 * 256 * 2.5, rel=1e-9)
    assert result["time"]["step_seconds"] == pytest.approx(seconds / steps, rel=1e-9)
    # 32 nodes must read what 256 GPUs consume
    data = result["data"]
    assert data["bytes_per_epoch"] == 303_000_000 * 100_000
    assert data["read_gb_per_second_per_node"] == pytest.approx(images / seconds * 1e5 / 1e9 / 32, rel=1e-9)
    # ZeRO-1 reduce-scatters 16-bit gradients and all-gathers 16-bit weights once per step, in 16 images' compute
    # time per GPU: 387 Gb/s at 40% MFU, just under 400 Gb/s NICs (at 45% it is over: see the report test)
    params = result["memory"]["params"]
    moved = 2 * 2 * params * 255 / 256
    assert result["communication"]["bytes_per_gpu_per_step"] == pytest.approx(moved)
    assert result["communication"]["gb_per_second_per_gpu"] * 8 == pytest.approx(moved / (seconds / steps) * 8 / 1e9)
    assert 380 < result["communication"]["gb_per_second_per_gpu"] * 8 < 400
    assert not any(w.startswith("communication-bound") for w in result["warnings"])
    # the config leaves the micro-batch to the trainer: 4096 images over 256 GPUs
    assert result["run"]["micro_batch"] == 16 and result["run"]["gradient_accumulation"] == 1


def test_b16_on_imagenet_flops_by_hand_without_checkpointing():
    # ViT-B/16: 14 x 14 patches + class token, 12 blocks of 768, MLP 3072; representation layer, 1000 classes
    forward = 12 * block_flops(197, 768, 3072) + 2 * 196 * 768 * (16 * 16 * 3) + 2 * 768 * 768 + 2 * 768 * 1000
    code, result, _ = plan(
        "--config", IMAGENET, "--gpus", "16", "--gpu-type", "A100-80GB", "--train-samples", "1281167"
    )
    assert code == 0
    steps = math.ceil(300 * 1_281_167 / 4096)
    assert result["compute"]["forward_flops_per_image"] == forward == 35_128_836_096
    assert result["compute"]["training_flops"] == pytest.approx(3 * forward * steps * 4096, rel=1e-12)
    seconds = 3 * forward * steps * 4096 / (16 * 312e12 * 0.45)  # the config's logging.expected_mfu
    assert result["time"]["days"] == pytest.approx(seconds / 86400, rel=1e-9)
    assert result["run"]["gradient_accumulation"] == 1 and result["run"]["micro_batch"] == 256


@pytest.mark.parametrize(
    "objective",
    [
        {"type": "supervised"},
        {"type": "masked_patch_prediction", "target": "mean_color"},
        {"type": "masked_patch_prediction", "target": "downsampled_color", "mask_ratio": 0.3},
        {"type": "masked_patch_prediction", "target": "pixels"},
    ],
)
def test_the_counted_forward_flops_are_those_the_training_forward_computes(objective: dict):
    """The FLOPs that MFU and the plan use, against torch's FLOP counter on the forward a training step runs: for
    masked patch prediction, the prediction head over the corrupted patches (with the 4x4 target it costs twice this
    encoder) and not the classifier, which that forward never runs."""
    config = validate(
        {
            "run": {"name": "t"},
            "model": {"variant": "Ti/8", "image_size": 32, "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 2,
                      "pool": "gap", "num_classes": 10},
            "data": {"train": "x/index.json", "batch_size": 8},
            "objective": objective,
            "optimizer": {"lr": 1e-3},
            "schedule": {"steps": 10, "warmup_steps": 1},
        }
    )  # fmt: skip
    model, task = build_model(config), build_task(config)
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # the math attention runs as matrix products the counter sees (it has no formula for the fused CPU kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        task.loss(model, model_input(raw), raw, {"label": torch.zeros(2, dtype=torch.long)})
    assert counter.get_total_flops() / 2 == forward_flops_per_image(config)


@pytest.mark.parametrize(("setting", "blocks"), [(False, 0), (True, 12), (4, 3), (5, 3), (13, 1)])
def test_selective_checkpointing_recomputes_its_share_of_the_blocks(setting: bool | int, blocks: int):
    # every k-th block of B/16's 12: blocks 0, k, 2k, ... below 12
    code, result, _ = plan(
        "--config", IMAGENET, "--gpus", "16", "--gpu-type", "A100-80GB", "--train-samples", "1281167",
        "--set", f"deepspeed.activation_checkpointing={json.dumps(setting)}",
    )  # fmt: skip
    assert code == 0
    forward, images = result["compute"]["forward_flops_per_image"], result["run"]["images_seen"]
    assert result["run"]["checkpointed_blocks"] == blocks
    assert result["compute"]["executed_flops"] == pytest.approx((3 + blocks / 12) * forward * images, rel=1e-12)
    activations = result["memory"]["activations_mb_per_image"]
    stored, checkpointed = activations["stored"], activations["stored_with_checkpointing"]
    # each checkpointed block keeps its input instead of all its activations
    assert activations["stored_as_configured"] == pytest.approx(stored - blocks * (stored - checkpointed) / 12)


# -- memory --------------------------------------------------------------------------------------------------------


def printed_gb(estimator, model: torch.nn.Module, options: str, **kwargs) -> float:
    """The per-GPU number of DeepSpeed's printed estimate table, on the row of `options`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimator(model, **kwargs)
    for line in out.getvalue().splitlines():
        if line.rstrip().endswith(options):
            return float(re.findall(r"([\d.]+)GB", line)[1])
    raise AssertionError(out.getvalue())


def test_a_weight_average_adds_its_fp32_copy_on_every_gpu_or_a_share_under_zero3():
    common = ["--config", IMAGENET, "--gpus", "8", "--gpu-type", "A100-80GB", "--train-samples", "1281167"]
    _, plain, _ = plan(*common)
    _, averaged, _ = plan(*common, "--set", 'optimizer.ema={"decay": 0.9999}')
    params = plain["memory"]["params"]
    for stage in (0, 1, 2, 3):
        added = (
            averaged["memory"]["stages"][stage]["model_states_gb"] - plain["memory"]["stages"][stage]["model_states_gb"]
        )
        assert added == pytest.approx(4 * params / 1e9 / (8 if stage == 3 else 1), rel=1e-5)


def test_model_states_agree_with_deepspeeds_estimators():
    config = load_config(IMAGENET, [])
    model = build_model(config)  # a real B/16 with its 1000-class head: DeepSpeed counts its parameters itself
    _, result, _ = plan(
        "--config",
        IMAGENET,
        "--gpus",
        "2",
        "--gpus-per-node",
        "2",
        "--gpu-type",
        "A100-80GB",
        "--train-samples",
        "1281167",
        "--set",
        "data.batch_size=512",
    )
    stages = result["memory"]["stages"]
    gib = 2**30 / 1e9
    zero2 = printed_gb(
        estimate_zero2_model_states_mem_needs_all_live,
        model,
        "offload_optimizer=none",
        num_gpus_per_node=2,
        num_nodes=1,
    )
    zero3 = printed_gb(
        estimate_zero3_model_states_mem_needs_all_live,
        model,
        "offload_param=none, offload_optimizer=none, zero_init=1",
        num_gpus_per_node=2,
        num_nodes=1,
    )
    assert stages[2]["deepspeed_estimate_gb"] == pytest.approx(zero2 * gib, abs=0.006)
    assert stages[3]["deepspeed_estimate_gb"] == pytest.approx(zero3 * gib, abs=0.006)
    # stage 2 counts the same bytes (16-bit weights, then 18 bytes per parameter over the GPUs) ...
    assert stages[2]["model_states_gb"] == pytest.approx(stages[2]["deepspeed_estimate_gb"], rel=1e-6)
    # ... stage 3 two more per partitioned parameter (the 16-bit gradient partition), and not the largest layer,
    # whose gathered copy is among the buffers
    params = result["memory"]["params"]
    assert params == sum(p.numel() for p in model.parameters())
    assert stages[3]["model_states_gb"] == pytest.approx(20 * params / 2 / 1e9, rel=1e-6)
    # and the stages DeepSpeed has no estimator for: 20 bytes per parameter at stage 0, 4 + 16 / N at stage 1
    assert stages[0]["deepspeed_estimate_gb"] is None
    assert stages[0]["model_states_gb"] == pytest.approx(20 * params / 1e9, rel=1e-6)
    assert stages[1]["model_states_gb"] == pytest.approx((4 + 16 / 2) * params / 1e9, rel=1e-6)


def saved_bytes_per_image(config, checkpoint_every: int) -> float:
    """What autograd keeps for the backward pass, per image: the growth of the saved tensors (not parameters, nor
    the standardised conv kernels, which do not grow with the batch) from 2 to 4 images."""
    torch.manual_seed(0)
    model = build_model(config).to(torch.bfloat16).train()
    model.set_grad_checkpointing(checkpoint_every > 0, every=max(checkpoint_every, 1))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(batch: int) -> int:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        size = config.model.image_size
        images = torch.randn(batch, 3, size, size).to(torch.bfloat16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = model(images)
            torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.zeros(logits.shape))
        return sum(storages.values())

    return (saved(4) - saved(2)) / 2


@pytest.mark.slow  # real forward and backward passes at 128-160 px: about a minute on two CPU cores
@pytest.mark.parametrize(
    "model",
    [
        {"variant": "S/16", "image_size": 160, "num_classes": 10},
        {"variant": "R50+Ti/16", "image_size": 128, "depth": 2, "num_classes": 10},  # the stem dominates
    ],
)
def test_activations_per_image_match_what_autograd_saves(model: dict):
    config = validate(
        {
            **json.loads((ROOT / "configs" / "tiny_cpu.json").read_text()),
            "model": model,
            "deepspeed": {"precision": "bf16"},
        }
    )
    counted = activation_bytes(config)
    pixels = 3 * model["image_size"] ** 2  # the uint8 batch the trainer keeps for the loss, outside autograd
    assert counted.stored - pixels == pytest.approx(saved_bytes_per_image(config, 0), rel=0.03)
    assert counted.stored_checkpointed - pixels == pytest.approx(saved_bytes_per_image(config, 1), rel=0.03)
    every_third = -(-counted.depth // 3)  # blocks 0, 3, 6, ...
    assert counted.stored_with(every_third) - pixels == pytest.approx(saved_bytes_per_image(config, 3), rel=0.03)


TINY = {
    "variant": "Ti/16",
    "image_size": 32,
    "width": 64,
    "depth": 1,
    "mlp_dim": 128,
    "num_heads": 2,
    "num_classes": 10,
}
SMALL = {"variant": "S/16", "image_size": 224, "depth": 6, "num_classes": 10}
TWO_EPOCHS = {"epochs": 2, "warmup_steps": 1}


def run_config(
    path: Path,
    model: dict,
    stage: int,
    micro_batch: int,
    train: str = "synthetic",
    schedule: dict | None = None,
    precision: str = "bf16",
    checkpointing: bool | int = False,
) -> Path:
    config = {
        "run": {"name": path.stem, "output_dir": str(path.parent / path.stem), "seed": 0},
        "model": model,
        "data": {"train": train, "batch_size": 2 * micro_batch, "num_workers": 0},
        "optimizer": {"lr": 1e-4},
        "schedule": schedule or {"steps": 2, "warmup_steps": 1},
        # small reduction buckets: a CPU process only holds the pages of a buffer it has written, a GPU the whole
        "deepspeed": {
            "zero_stage": stage,
            "precision": precision,
            "micro_batch_size": micro_batch,
            "activation_checkpointing": checkpointing,
            "return_freed_host_memory": True,  # resident memory then follows what is live, which the plan predicts
            "overrides": {"zero_optimization": {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000}},
        },
        "checkpoint": {"every_steps": 1000},
        "logging": {"every_steps": 2, "trackers": [], "peak_tflops": 1.0},
    }
    path.write_text(json.dumps(config))
    return path


def measured_peak_gb(*configs: Path) -> list[float]:
    """Peak resident memory of the larger of two CPU ranks (the trainer logs it) of each config's run, in GB. The
    runs go side by side: a process's peak is its own, whatever runs beside it."""
    runs = []
    for config in configs:
        command = two_rank_command(free_port(), "pretrain/run.py", "--config", str(config), "--resume", "none")
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        # to a file: a pipe nobody reads while the other run is waited for fills up and stops the run
        with open(config.with_suffix(".log"), "w") as output:
            runs.append(subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment))
    for config, run in zip(configs, runs, strict=True):
        assert run.wait(timeout=300) == 0, config.with_suffix(".log").read_text()[-3000:]
    return [read_metrics(config.parent / config.stem, "train")[-1]["memory_gb"] for config in configs]


def predicted_peak_gb(config: Path) -> float:
    code, result, err = plan(
        "--config",
        str(config),
        "--gpus",
        "2",
        "--gpus-per-node",
        "2",
        "--peak-tflops",
        "1",
        "--gpu-memory-gb",
        "1000",
        "--headroom",
        "0",
    )
    assert code == 0, err
    return result["memory"]["stages"][json.loads(config.read_text())["deepspeed"]["zero_stage"]]["peak_gb"]


@pytest.mark.slow
# bf16 as users run it, and fp32: this CPU has no bf16 instructions, so a bf16 run of S/16 takes four times as long
# (217 s against 54 s for ZeRO 0 here); one stage in each precision keeps both accountings checked
# (the ZeRO-0 run with every other block checkpointed, 3 of 6, checks the selective accounting too; under ZeRO-3
# the measured growth runs about 0.05 GB above the plan whatever the activations, too close to the bound when they
# shrink)
# (bf16 with 4 images per rank: its emulated compute is most of the test's time, 109 s with 8)
@pytest.mark.parametrize(
    ("stage", "precision", "checkpointing", "micro_batch"), [(0, "bf16", 2, 4), (3, "fp32", False, 8)]
)
def test_predicted_peak_memory_matches_two_cpu_ranks_within_15_percent(
    stage: int, precision: str, checkpointing: bool | int, micro_batch: int, tmp_path: Path
):
    # A process's resident memory includes Python, torch, DeepSpeed and gloo: the growth from a one-block model to
    # S/16 (22M parameters, 4 or 8 images of 224 px: states and activations) is what the plan predicts.
    settings = {"precision": precision, "checkpointing": checkpointing}
    baseline = run_config(tmp_path / "baseline.json", TINY, stage, micro_batch=2, **settings)
    small = run_config(tmp_path / "small.json", SMALL, stage, micro_batch=micro_batch, **settings)
    peak_small, peak_baseline = measured_peak_gb(small, baseline)
    measured = peak_small - peak_baseline
    predicted = predicted_peak_gb(small) - predicted_peak_gb(baseline)
    print(f"predicted {predicted:.3f} GB, measured {measured:.3f} GB")
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)


def test_fit_and_no_fit_on_either_side_of_an_a100s_memory():
    # H/14 without activation checkpointing under ZeRO-1 on 8 A100-40GB, accumulating two micro-batches: the largest
    # micro-batch the plan allows fits, one more image does not
    common = [
        "--config",
        JFT,
        "--gpus",
        "8",
        "--gpu-type",
        "A100-40GB",
        "--train-samples",
        "303000000",
        "--set",
        "deepspeed.activation_checkpointing=false",
    ]

    def with_micro_batch(micro: int) -> tuple[int, dict, str]:
        return plan(*common, "--set", f"deepspeed.micro_batch_size={micro}", "--set", f"data.batch_size={16 * micro}")

    largest = with_micro_batch(1)[1]["memory"]["stages"][1]["max_micro_batch"]
    assert 20 < largest < 200
    results = {micro: with_micro_batch(micro) for micro in (largest, largest + 1)}
    code, inside, _ = results[largest]
    assert code == 0 and inside["memory"]["stages"][1]["fits"]
    assert inside["memory"]["stages"][1]["peak_gb"] <= inside["memory"]["usable_gb"] == pytest.approx(36.0)
    assert not any("does not fit" in warning for warning in inside["warnings"])
    code, outside, _ = results[largest + 1]
    assert code == 1 and not outside["memory"]["stages"][1]["fits"]
    assert outside["memory"]["stages"][1]["peak_gb"] > outside["memory"]["usable_gb"]
    warning = next(w for w in outside["warnings"] if "does not fit" in w)
    assert f"deepspeed.micro_batch_size to {largest} or less" in warning and "ZeRO-3" in warning
    # with checkpointing the same micro-batch fits easily
    assert outside["memory"]["stages"][1]["max_micro_batch_with_checkpointing"] > 4 * largest


def test_device_names_map_to_datasheet_entries():
    names = {
        "NVIDIA H100 80GB HBM3": "H100",
        "NVIDIA H100 PCIe": "H100-PCIe",
        "NVIDIA H100 NVL": "H100-NVL",
        "NVIDIA A100-SXM4-40GB": "A100-40GB",
        "NVIDIA A100-SXM4-80GB": "A100-80GB",
        "NVIDIA A100 80GB PCIe": "A100-80GB",
        "NVIDIA H200": "H200",
        "NVIDIA B200": "B200",
        "AMD Instinct MI300X": "MI300X",
    }
    for device, entry in names.items():
        assert spec_for_device(device) == gpu_spec(entry), device
    assert spec_for_device("NVIDIA GeForce RTX 4090") is None  # not in the table: the trainer measures a matmul


# -- command line --------------------------------------------------------------------------------------------------


def test_data_volume_comes_from_the_shard_index(tmp_path: Path):
    write_digits(tmp_path / "images", size=16)
    index = build(
        BuildOptions(input=str(tmp_path / "images"), output=str(tmp_path / "shards"), val_fraction=0.2, workers=0)
    ).index
    config = run_config(
        tmp_path / "digits.json",
        TINY,
        1,
        micro_batch=16,
        train=str(tmp_path / "shards/index.json"),
        schedule=TWO_EPOCHS,
    )
    code, result, _ = plan("--config", str(config), "--gpus", "2", "--gpu-type", "H100")
    assert code == 0
    train = index.splits["train"]
    assert result["data"]["train_samples"] == train.num_samples
    assert result["data"]["bytes_per_epoch"] == pytest.approx(train.bytes)
    assert result["run"]["steps"] == math.ceil(2 * train.num_samples / 32)


@pytest.mark.slow  # the report comes from a subprocess: torch's and DeepSpeed's imports
def test_report_and_one_line_errors(tmp_path: Path):
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.plan.cli",
            "--config",
            JFT,
            "--gpus",
            "256",
            "--gpu-type",
            "H100",
            "--train-samples",
            "303000000",
            "--bytes-per-sample",
            "110000",
            "--price-per-gpu-hour",
            "2.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    for expected in (
        "ViT-H/14 at 224 px",
        "256 x H100",
        "days",
        "GPU-hours",
        "$",
        "ZeRO",
        "GB/s",
        "warning: communication-bound: ZeRO-1",
    ):
        assert expected in report.stdout
    assert report.stdout.strip() in (ROOT / "README.md").read_text()  # the README shows this very report
    code, _, err = plan("--config", JFT, "--gpus", "8", "--gpu-type", "V100", "--train-samples", "1")
    assert code == 2 and "unknown GPU type 'V100'" in err and "H100" in err and len(err.splitlines()) == 1
    # an epoch schedule whose index cannot be read asks for the training-set size
    missing = run_config(
        tmp_path / "missing.json",
        TINY,
        1,
        micro_batch=16,
        train=str(tmp_path / "nowhere/index.json"),
        schedule=TWO_EPOCHS,
    )
    code, _, err = plan("--config", str(missing), "--gpus", "2", "--gpu-type", "H100")
    assert code == 2 and "--train-samples" in err and "nowhere/index.json" in err and len(err.splitlines()) == 1
    code, _, err = plan("--config", JFT, "--gpus", "3", "--gpu-type", "H100", "--train-samples", "1000")
    assert code == 2 and "data.batch_size 4096" in err
    # a job the trainer would refuse at start-up is refused here, with the micro-batch that would run
    code, _, err = plan(
        "--config",
        JFT,
        "--gpus",
        "256",
        "--gpu-type",
        "H100",
        "--train-samples",
        "1",
        "--set",
        "deepspeed.micro_batch_size=64",
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "micro_batch_size 64 x 256 ranks; set deepspeed.micro_batch_size to 16 (or null: 16 per rank)" in err
    # offloading is not modelled, and the plan says so
    _, offloaded, _ = plan(
        "--config",
        JFT,
        "--gpus",
        "8",
        "--gpu-type",
        "H100",
        "--train-samples",
        "1000",
        "--set",
        'deepspeed.overrides={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}',
    )
    assert any("upper bounds" in warning for warning in offloaded["warnings"])
