"""The numbers of a run plan (`vit-plan`, pretrain/plan/cli.py): will the run fit, how long will it take, what will it
cost, before a single GPU is booked.

A plan has five parts:
- compute: forward FLOPs per image from the encoder's analytic count (pretrain/model/flops.py) plus the head its
  objective runs (the task's `head_flops_per_image`, pretrain/objectives/), x3 for a training step (up to x4 with
  activation checkpointing's extra forward pass over the checkpointed blocks), times the images the schedule sees:
  steps x global batch, where an epoch schedule becomes steps exactly as the trainer computes them;
- time and cost: wall-clock and GPU-hours at an assumed utilisation of the GPU's dense bf16 peak
  (pretrain/plan/gpus.py);
- memory per GPU for ZeRO stages 0-3 and the largest micro-batch that fits (pretrain/plan/memory_model.py);
- communication: the bytes each GPU exchanges per step and the bandwidth that hides them behind compute;
- data: bytes per epoch from the shard index, and the read bandwidth per node that keeps the GPUs fed.

Utilisation (--mfu) counts the FLOPs the GPUs execute, recomputation included, as the trainer's logged MFU does; the
trainer logs the step time this predicts next to the measured one (pretrain/train/trainer.py), so a plan can be checked
against the first minutes of a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from data_pipeline.commands import UserError
from pretrain.config.batch import batch_sizes
from pretrain.config.schema import Config
from pretrain.plan.gpus import DEFAULT_HEADROOM
from pretrain.plan.memory_model import (
    LOW_PRECISION_BYTES,
    activation_bytes,
    buffer_bytes,
    deepspeed_estimate,
    fit,
    gradients_held,
    model_size,
    model_states,
    offloads,
)
from pretrain.train.compute import checkpointed_blocks, forward_flops_per_image, passes_per_image, step_seconds
from pretrain.train.engine_config import deepspeed_config
from pretrain.train.schedule import total_steps

GB = 1e9
MB = 1e6
ZERO_STAGES = (0, 1, 2, 3)


class PlanError(UserError):
    """The run cannot be planned as asked; the message names the field or flag to change."""


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int
    name: str
    peak_tflops: float
    """Dense peak per GPU in the run's precision."""
    memory_gb: float
    mfu: float
    price_per_gpu_hour: float | None = None
    network_gbps: float = 400.0
    """Inter-node bandwidth per GPU, Gbit/s (one 400G NIC per GPU on current H100 nodes)."""


@dataclass(frozen=True)
class DataFacts:
    train_samples: int | None
    bytes_per_sample: float | None
    source: str
    """Where the numbers come from: the index URL, the command line, or why they are unknown."""


def read_data_facts(config: Config, train_samples: int | None, bytes_per_sample: float | None) -> DataFacts:
    """Training-set size and bytes per sample: from the flags where given, else from data.train's index.json."""
    from data_pipeline.load.shardlist import read_index

    if train_samples is not None:
        return DataFacts(train_samples, bytes_per_sample, "command line")
    source = config.data.train
    if not source.endswith(".json"):
        return DataFacts(None, bytes_per_sample, f"{source} is no index.json")
    try:
        index = read_index(source, dict(config.data.storage_options))
    except Exception as error:  # any failure (no network, credentials, format) means: ask for the flags
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return DataFacts(None, bytes_per_sample, f"{source} unreadable ({reason})")
    totals = index.splits.get(config.data.train_split)
    if totals is None or not totals.num_samples:
        return DataFacts(None, bytes_per_sample, f"{source} has no split {config.data.train_split!r}")
    per_sample = bytes_per_sample if bytes_per_sample is not None else totals.bytes / totals.num_samples
    return DataFacts(totals.num_samples, per_sample, source)


def make_plan(
    config: Config, hardware: Hardware, data: DataFacts, headroom: float = DEFAULT_HEADROOM
) -> dict[str, Any]:
    """Every number of the report, as plain data (the --json output)."""
    warnings: list[str] = []
    micro, accumulation = batch_sizes(config, hardware.gpus)  # a job that would be refused: exit 2 here
    config = _with_deepspeed(config, micro_batch_size=micro)
    batch = config.data.batch_size
    if config.schedule.steps is None and data.train_samples is None:
        raise PlanError(
            f"schedule.epochs needs the training-set size, but {data.source}; pass --train-samples N "
            f"(and --bytes-per-sample B)"
        )
    steps = total_steps(config, data.train_samples or 0)
    images = steps * batch
    forward = forward_flops_per_image(config)
    step_s = step_seconds(passes_per_image(config) * forward, batch, hardware.gpus, hardware.peak_tflops, hardware.mfu)
    seconds = steps * step_s
    gpu_hours = seconds / 3600 * hardware.gpus
    memory = memory_plan(config, hardware, steps, accumulation, headroom, warnings)

    return {
        "run": {
            "name": config.run.name,
            "variant": config.model.variant,
            "image_size": config.model.image_size,
            "params": memory["params"],
            "global_batch": batch,
            "micro_batch": micro,
            "gradient_accumulation": accumulation,
            "steps": steps,
            "images_seen": images,
            "epochs": images / data.train_samples if data.train_samples else None,
            "zero_stage": config.deepspeed.zero_stage,
            "precision": config.deepspeed.precision,
            "activation_checkpointing": config.deepspeed.activation_checkpointing,
            "checkpointed_blocks": checkpointed_blocks(config),
            "depth": config.model.description().depth,
        },
        "hardware": {
            "gpus": hardware.gpus,
            "gpus_per_node": hardware.gpus_per_node,
            "gpu_type": hardware.name,
            "peak_tflops": hardware.peak_tflops,
            "memory_gb": hardware.memory_gb,
            "mfu": hardware.mfu,
        },
        "compute": {
            "forward_flops_per_image": forward,
            "training_flops": 3 * forward * images,
            "training_flops_with_recompute": 4 * forward * images,
            "executed_flops": passes_per_image(config) * forward * images,
        },
        "time": {
            "step_seconds": step_s,
            "images_per_second": images / seconds,
            "days": seconds / 86400,
            "gpu_hours": gpu_hours,
            "price_per_gpu_hour": hardware.price_per_gpu_hour,
            "cost": gpu_hours * hardware.price_per_gpu_hour if hardware.price_per_gpu_hour is not None else None,
        },
        "memory": memory,
        "communication": communication_plan(config, hardware, memory["params"], accumulation, step_s, warnings),
        "data": data_plan(data, images / seconds, hardware),
        "warnings": warnings,
    }


def communication_plan(
    config: Config, hardware: Hardware, params: int, accumulation: int, step_s: float, warnings: list[str]
) -> dict[str, Any]:
    """Bytes each GPU sends per optimizer step for data parallelism (ring collectives move (N - 1) / N of a tensor
    per GPU), and the bandwidth that hides them behind the step's compute. ZeRO-0 all-reduces the 16-bit gradients
    once per step (2 tensor volumes); ZeRO-1 reduce-scatters them once and all-gathers the updated weights (2);
    ZeRO-2 reduce-scatters after every micro-batch (accumulation + 1); ZeRO-3 also gathers the weights for every
    forward and backward pass (3 x accumulation)."""
    stage = config.deepspeed.zero_stage
    volumes = {0: 2, 1: 2, 2: accumulation + 1, 3: 3 * accumulation}[stage]
    gpus = hardware.gpus
    per_gpu = volumes * LOW_PRECISION_BYTES[config.deepspeed.precision] * params * (gpus - 1) / gpus
    needed = per_gpu / step_s / GB
    nodes = math.ceil(gpus / hardware.gpus_per_node)
    if nodes > 1 and needed * 8 > hardware.network_gbps:
        warnings.append(
            f"communication-bound: ZeRO-{stage} moves {per_gpu / GB:.3g} GB per GPU per step, {needed * 8:.0f} Gb/s "
            f"per GPU to hide behind {step_s * 1000:.0f} ms of compute, above the {hardware.network_gbps:g} Gb/s "
            f"network: expect a lower MFU, or give each GPU more images per step (fewer GPUs or a larger batch)"
        )
    return {
        "bytes_per_gpu_per_step": per_gpu,
        "gb_per_second_per_gpu": needed,
        "network_gbps_per_gpu": hardware.network_gbps,
    }


def memory_plan(
    config: Config, hardware: Hardware, steps: int, accumulation: int, headroom: float, warnings: list[str]
) -> dict[str, Any]:
    size = model_size(config)
    activations = activation_bytes(config)
    precision = config.deepspeed.precision
    micro = config.deepspeed.micro_batch_size or 1
    checkpointed = checkpointed_blocks(config)
    depth = config.model.description().depth
    stages = []
    for stage in ZERO_STAGES:
        ds_config = deepspeed_config(_with_deepspeed(config, zero_stage=stage), hardware.gpus, steps, "plan")
        states = model_states(size, stage, precision, hardware.gpus, averaged=config.optimizer.ema is not None)
        buffers = buffer_bytes(ds_config, size.params, precision)
        estimate = deepspeed_estimate(size, stage, precision, hardware.gpus, hardware.gpus_per_node)
        held = gradients_held(stage, accumulation)
        fits = {
            blocks: fit(states, buffers, activations.per_image(blocks), micro, held, hardware.memory_gb * GB, headroom)
            for blocks in {0, checkpointed, depth}
        }
        chosen = fits[checkpointed]
        stages.append(
            {
                "stage": stage,
                "model_states_gb": states.total / GB,
                "deepspeed_estimate_gb": estimate / GB if estimate is not None else None,
                "buffers_gb": buffers / GB,
                "peak_gb": chosen.peak_bytes / GB,
                "fits": chosen.fits,
                "max_micro_batch": chosen.max_micro_batch,
                "max_micro_batch_without_checkpointing": fits[0].max_micro_batch,
                "max_micro_batch_with_checkpointing": fits[depth].max_micro_batch,
            }
        )
    usable_gb = hardware.memory_gb * (1 - headroom)
    configured = stages[config.deepspeed.zero_stage]
    if offloads(deepspeed_config(config, hardware.gpus, steps, "plan")):
        warnings.append(
            "deepspeed.overrides offload optimizer states or parameters, which the memory plan does not "
            "model: its GPU numbers are upper bounds"
        )
    if not configured["fits"]:
        others = [f"ZeRO-{s['stage']}" for s in stages if s["fits"]]
        advice = f"; or use {' / '.join(others)}" if others else ""
        warnings.append(
            f"does not fit: ZeRO-{configured['stage']} needs {configured['peak_gb']:.1f} GB per GPU at micro-batch "
            f"{micro}, {usable_gb:.1f} GB usable ({hardware.memory_gb:g} GB less {headroom:.0%} headroom); set "
            f"deepspeed.micro_batch_size to {configured['max_micro_batch']} or less{advice}"
        )
    elif checkpointed and configured["max_micro_batch_without_checkpointing"] >= micro:
        share = checkpointed / depth
        over = "" if checkpointed == depth else f" over {share:.0%} of the blocks"
        warnings.append(
            f"micro-batch {micro} fits without activation checkpointing (up to "
            f"{configured['max_micro_batch_without_checkpointing']}): deepspeed.activation_checkpointing=false "
            f"saves its extra forward pass{over}, {share / (3 + share):.0%} of the compute"
        )
    return {
        "params": size.params,
        "headroom": headroom,
        "usable_gb": usable_gb,
        "fits": configured["fits"],
        "activations_mb_per_image": {
            "stored": activations.stored / MB,
            "stored_with_checkpointing": activations.stored_checkpointed / MB,
            "stored_as_configured": activations.stored_with(checkpointed) / MB,
            "working": activations.working / MB,
        },
        "stages": stages,
    }


def data_plan(data: DataFacts, images_per_second: float, hardware: Hardware) -> dict[str, Any]:
    nodes = math.ceil(hardware.gpus / hardware.gpus_per_node)
    per_sample = data.bytes_per_sample
    read = images_per_second * per_sample if per_sample is not None else None
    return {
        "source": data.source,
        "train_samples": data.train_samples,
        "bytes_per_sample": per_sample,
        "bytes_per_epoch": data.train_samples * per_sample if data.train_samples and per_sample else None,
        "nodes": nodes,
        "images_per_second_per_node": images_per_second / nodes,
        "read_gb_per_second": read / GB if read is not None else None,
        "read_gb_per_second_per_node": read / GB / nodes if read is not None else None,
    }


def _with_deepspeed(config: Config, **fields: Any) -> Config:
    return config.model_copy(update={"deepspeed": config.deepspeed.model_copy(update=fields)})
