"""Per-GPU memory of a training run, before it runs: model states under each ZeRO stage, DeepSpeed's buffers,
activations per image, and the largest micro-batch that fits.

A step has two peaks, and the larger one decides:
- forward and backward: weights, optimizer states, buffers and the activations of the micro-batch; gradients count
  where ZeRO-2/3 keep their partitions in buffers allocated once or accumulation keeps them across micro-batches,
  otherwise they fill the memory the activations free during the backward pass;
- the optimizer step: all model states, including the fp32 copies of the gradients the step reads; no activations.
Model states are weights, gradients, fp32 master weights, fp32 gradients and Adam's two moments, those ZeRO
partitions divided by the number of GPUs (the trainer's AdamW is fused, so the step needs no temporaries).
DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`) exist for stages 2 and 3 in mixed precision;
they are reported beside these counts. Stage 2 agrees exactly; for stage 3 DeepSpeed counts 18 bytes per partitioned
parameter and four bytes per parameter of the largest layer, where we count 20 (the 16-bit gradient partition too)
and ZeRO-3's gathered parameters up to stage3_max_live_parameters, as measured on this machine (tests/test_plan.py).
Buffers are what DeepSpeed allocates whole whatever the model: the gradient-reduction bucket
(zero_optimization.reduce_bucket_size elements; two with overlap_comm), the engine's all-reduce bucket at stage 0,
ZeRO-3's gathered parameters. Their sizes come from DeepSpeed's own config model, so its defaults apply.
Activations are what autograd keeps for the backward pass, counted from the tensor shapes of a pre-LN block with
fused attention (tests check the count against saved-tensor hooks), plus a working set of one block: its
recomputation under activation checkpointing, or the gradients of its largest tensors without.
Not counted: the CUDA context, NCCL's buffers and allocator fragmentation, a few hundred MB to a few GB between
them: the headroom is for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pretrain.config.schema import Config
from pretrain.model.resnet import Bottleneck, Downsample, ResNetStem
from pretrain.model.vit import HybridEmbed
from pretrain.objectives import build_model, build_task
from pretrain.plan.gpus import DEFAULT_HEADROOM

ENGINE_ALLREDUCE_BUCKET = 500_000_000
"""Elements per all-reduce bucket of DeepSpeed's engine without ZeRO (engine.MEMORY_OPT_ALLREDUCE_SIZE)."""
LOW_PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4
ADAM_MOMENTS = 8


@dataclass(frozen=True)
class ModelSize:
    params: int
    largest_layer_params: int
    """Parameters of the largest single module (its own, not its children's), as DeepSpeed's estimators count it."""


def model_size(config: Config) -> ModelSize:
    """Parameter counts of the run's model (with its objective's head), built on the meta device."""
    with torch.device("meta"):
        model = build_model(config)
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return ModelSize(sum(p.numel() for p in model.parameters()), largest)


@dataclass(frozen=True)
class StateBytes:
    """Model states per GPU."""

    weights: int
    gradients: int
    optimizer: int
    """fp32 master weights (mixed precision) and Adam's two moments."""
    step_gradients: int
    """fp32 copies of the gradients, which exist only during the optimizer step (mixed precision)."""
    weight_average: int = 0
    """optimizer.ema's fp32 average: whole on every GPU, or partitioned under ZeRO-3."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.step_gradients + self.weight_average


def model_states(size: ModelSize, stage: int, precision: str, gpus: int, averaged: bool = False) -> StateBytes:
    """Weights, gradients and optimizer states per GPU; ZeRO-1 partitions the optimizer's, ZeRO-2 also the gradients,
    ZeRO-3 also the weights. `averaged`: optimizer.ema's average too."""
    low = LOW_PRECISION_BYTES[precision]
    mixed = precision != "fp32"

    def share(bytes_per_param: int, partitioned: bool) -> int:
        return math.ceil(bytes_per_param * size.params / (gpus if partitioned else 1))

    return StateBytes(
        weights=share(low, stage >= 3),
        gradients=share(low, stage >= 2),
        optimizer=share(ADAM_MOMENTS + (FP32 if mixed else 0), stage >= 1),
        step_gradients=share(FP32 if mixed else 0, stage >= 1),
        weight_average=share(FP32 if averaged else 0, stage >= 3),
    )


def deepspeed_estimate(size: ModelSize, stage: int, precision: str, gpus: int, gpus_per_node: int) -> int | None:
    """DeepSpeed's own estimate of the model states per GPU (no offload), where it has one: stages 2 and 3 in mixed
    precision."""
    if precision == "fp32" or stage < 2:
        return None
    nodes = math.ceil(gpus / gpus_per_node)
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(size.params, gpus_per_node, nodes, cpu_offload=False)[1]
    return estimate_zero3_model_states_mem_needs(
        size.params, size.largest_layer_params, gpus_per_node, nodes, cpu_offload=False, cpu_offload_params=False
    )[1]


def offloads(ds_config: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config moves optimizer states or parameters to CPU or NVMe, which this model does not
    count (its numbers are then an upper bound)."""
    zero = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    return zero.offload_optimizer is not None or zero.offload_param is not None


def buffer_bytes(ds_config: dict[str, Any], params: int, precision: str) -> int:
    """DeepSpeed's communication buffers per GPU, sized by the run's DeepSpeed config (and DeepSpeed's defaults)."""
    zero = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    low = LOW_PRECISION_BYTES[precision]
    stage = int(zero.stage)
    if stage == 0:
        return low * min(params, ENGINE_ALLREDUCE_BUCKET)
    if stage == 3:  # one reduction bucket, and the parameters gathered for the layers being computed
        return low * (zero.reduce_bucket_size + min(params, zero.max_live_parameters))
    if not zero.contiguous_gradients:
        return 0
    return low * zero.reduce_bucket_size * (2 if zero.overlap_comm else 1)


@dataclass(frozen=True)
class ActivationBytes:
    """Per image: what autograd keeps for the backward pass (outside the blocks, per block stored and per block
    checkpointed) and the working set of one block during the backward pass."""

    outside_blocks: int
    block: int
    block_checkpointed: int
    depth: int

    @property
    def working(self) -> int:
        return self.block  # a checkpointed block's recomputed activations, or the gradients of a stored one's

    def stored_with(self, checkpointed_blocks: int) -> int:
        kept = checkpointed_blocks * self.block_checkpointed + (self.depth - checkpointed_blocks) * self.block
        return self.outside_blocks + kept

    @property
    def stored(self) -> int:
        return self.stored_with(0)

    @property
    def stored_checkpointed(self) -> int:
        return self.stored_with(self.depth)

    def per_image(self, checkpointed_blocks: int) -> int:
        return self.stored_with(checkpointed_blocks) + self.working


def activation_bytes(config: Config) -> ActivationBytes:
    """Activation memory per image at the configured resolution and precision."""
    model_config = config.model
    with torch.device("meta"):
        model = model_config.build()
    act = LOW_PRECISION_BYTES[config.deepspeed.precision]
    first = model.blocks[0]
    width, mlp_dim, heads = first.mlp.fc1.in_features, first.mlp.fc1.out_features, first.attn.num_heads
    tokens = model.grid_size[0] * model.grid_size[1] + model.num_prefix_tokens
    layer_norm_stats = 2 * FP32  # mean and reciprocal standard deviation per token
    # saved per token: norm1's input, qkv's input and output (q, k, v), attention's output (proj's input), norm2's
    # input, fc1's input, fc1's output (GELU's input) and GELU's output (fc2's input); attention's log-sum-exp per head
    per_token = act * (8 * width + 2 * mlp_dim) + 2 * layer_norm_stats + FP32 * heads
    if model_config.dropout > 0:
        per_token += 2 * width + mlp_dim  # one-byte masks after proj, fc1's activation and fc2
    block = tokens * per_token
    pixels = 3 * model_config.image_size**2
    embedding = pixels  # the uint8 batch, kept for the loss
    if isinstance(model.patch_embed, HybridEmbed):
        embedding += _stem_bytes(model.patch_embed.backbone, model_config.image_size, act)
    else:
        embedding += act * pixels  # the patch projection's input
    # the final LayerNorm keeps its input; with class-token pooling the head's input is a view that keeps the whole
    # normalised sequence alive too
    norm_outputs = 2 if model.pool == "token" else 1
    # the loss keeps a few fp32 copies of each head output (upcast, probabilities, gradient)
    head_outputs = build_task(config).head_outputs_per_image(model)
    head = tokens * (norm_outputs * act * width + layer_norm_stats) + head_outputs * (act + 3 * FP32)
    return ActivationBytes(
        outside_blocks=embedding + head, block=block, block_checkpointed=tokens * act * width, depth=len(model.blocks)
    )


def _stem_bytes(backbone: ResNetStem, image_size: int, act: int) -> int:
    """The hybrid's ResNet stem, which runs at 4 to 16 times the token resolution: each weight-standardised conv
    keeps its (padded) input, each GroupNorm its input, each in-place ReLU its output; max-pool keeps its padded
    input and int64 indices."""
    channels = backbone.stem.conv.out_channels
    hw = math.ceil(image_size / 2)
    elements = 3 * image_size**2 + 3 * channels * hw**2  # padded image; conv output, ReLU output, padded for pooling
    hw = math.ceil(hw / 2)
    index_bytes = 8 * channels * hw**2
    elements += channels * hw**2  # the pooled map, the first unit's input
    for unit in backbone.modules():
        if not isinstance(unit, Bottleneck):
            continue
        mid, out = unit.conv1.out_channels, unit.conv3.out_channels
        out_hw = math.ceil(hw / unit.conv2.stride[0])
        shortcut = 1 if isinstance(unit.downsample, Downsample) else 0
        # conv1's output and ReLU output, conv2's padded input; conv2's output and ReLU output; conv3's output, the
        # shortcut projection's output, the unit's ReLU output
        elements += 3 * mid * hw**2 + 2 * mid * out_hw**2 + (2 + shortcut) * out * out_hw**2
        hw = out_hw
    return act * elements + index_bytes


@dataclass(frozen=True)
class Fit:
    micro_batch: int
    """Images per GPU per forward pass being checked."""
    peak_bytes: int
    """The larger of the forward/backward peak and the optimizer-step peak at that micro-batch."""
    usable_bytes: int
    max_micro_batch: int
    """Largest micro-batch within the usable memory (0: not even one image fits)."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes


def gradients_held(stage: int, accumulation: int) -> bool:
    """Whether gradients take memory beside the activations: ZeRO-2 and 3 keep their gradient partitions in buffers
    allocated once, and gradient accumulation keeps the previous micro-batches' gradients."""
    return stage >= 2 or accumulation > 1


def fit(
    states: StateBytes,
    buffers: int,
    per_image: int,
    micro_batch: int,
    with_gradients: bool,
    gpu_memory_bytes: float,
    headroom: float = DEFAULT_HEADROOM,
) -> Fit:
    """Whether `micro_batch` images fit beside the states and buffers, and the most that would."""
    usable = int(gpu_memory_bytes * (1 - headroom))
    held = (
        states.weights
        + states.optimizer
        + states.weight_average
        + buffers
        + (states.gradients if with_gradients else 0)
    )
    step = states.total + buffers
    most = max(0, (usable - held) // per_image) if step <= usable else 0
    return Fit(micro_batch, max(held + micro_batch * per_image, step), usable, most)
