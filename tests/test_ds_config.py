"""The DeepSpeed JSON built from a run config, weight-decay groups, and Slurm's environment."""

from __future__ import annotations

import pytest

from pretrain.config.batch import BatchError, batch_sizes
from pretrain.config.load import validate
from pretrain.model import create_model
from pretrain.train.distributed import first_host, map_slurm_environment
from pretrain.train.engine_config import deepspeed_config, parameter_groups
from pretrain.train.schedule import total_steps

BASE = {
    "run": {"name": "t"},
    "model": {"variant": "Ti/16", "num_classes": 10},
    "data": {"train": "x/index.json", "batch_size": 64},
    "optimizer": {"lr": 1e-3, "grad_clip_norm": 1.0},
    "schedule": {"steps": 100, "warmup_steps": 10, "decay": "cosine", "min_lr": 1e-5},
}


def config(**sections):
    return validate({**BASE, **{name: {**BASE.get(name, {}), **values} for name, values in sections.items()}})


def test_batch_sizes_and_accumulation():
    assert batch_sizes(config(), 4) == (16, 1)
    assert batch_sizes(config(deepspeed={"micro_batch_size": 8}), 4) == (8, 2)
    with pytest.raises(BatchError, match="does not divide over 3 ranks"):
        batch_sizes(config(), 3)
    with pytest.raises(BatchError, match=r"not a multiple of deepspeed\.micro_batch_size 8 x 16 ranks"):
        batch_sizes(config(deepspeed={"micro_batch_size": 8}), 16)


def test_deepspeed_json_from_the_config():
    built = deepspeed_config(
        config(
            deepspeed={
                "micro_batch_size": 8,
                "zero_stage": 3,
                "overrides": {"zero_optimization": {"stage3_max_live_parameters": 5}},
            }
        ),
        world_size=2,
        steps=100,
        monitor_dir="m",
    )
    assert (
        built["train_batch_size"],
        built["train_micro_batch_size_per_gpu"],
        built["gradient_accumulation_steps"],
    ) == (64, 8, 4)
    assert built["zero_optimization"] == {
        "stage": 3,
        "stage3_max_live_parameters": 5,
        "stage3_prefetch_bucket_size": 2e7,
        "sub_group_size": 1e8,
    }
    assert built["bf16"]["enabled"] and not built["fp16"]["enabled"] and built["gradient_clipping"] == 1.0
    assert built["scheduler"] == {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": 100,
            "warmup_num_steps": 10,
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.01,
            "warmup_type": "linear",
        },
    }
    linear = deepspeed_config(config(schedule={"decay": "linear"}), 1, 100, "m")["scheduler"]
    assert linear["type"] == "WarmupDecayLR" and linear["params"]["warmup_max_lr"] == 1e-3


def test_epochs_become_steps_from_the_dataset_size():
    assert total_steps(config(schedule={"steps": None, "epochs": 2.5, "warmup_steps": 1}), 1000) == 40


def test_weight_decay_on_matrices_only():
    model = create_model("Ti/16", num_classes=10, depth=1)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert not {"cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} & decayed


def test_slurm_variables_become_torch_distributed_ones():
    assert first_host("gpu[003-010,017],cpu1") == "gpu003" and first_host("node7") == "node7"
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NODELIST": "n[12-13]",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
    }
    map_slurm_environment(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["LOCAL_WORLD_SIZE"]) == (
        "5",
        "1",
        "8",
        "n12",
        "4",
    )
    launched = {"RANK": "0", "SLURM_PROCID": "3"}
    map_slurm_environment(launched)
    assert launched["RANK"] == "0"
