"""The run configuration: one pydantic model per section of the JSON file, each field documented once, here.

Unknown keys are rejected everywhere. Checks that involve two fields raise `FieldError`, which names the field to
change, so the error printer can report `model.patch_size: ...` instead of the section alone.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, JsonValue, PlainSerializer, Tag, model_validator

from data_pipeline.storage import masked, masked_urls
from pretrain.model.description import ModelDescription
from pretrain.model.variants import parse_variant, stem_stride
from pretrain.model.vit import VisionTransformer


class FieldError(ValueError):
    """A cross-field check failed; `field` is the key (relative to the section) the user should change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    # allow_inf_nan=False: no field of a run means anything at infinity or NaN (a NaN learning rate validated, then
    # trained to NaN)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
Size = Annotated[int, Field(gt=0, le=1 << 16)]
"""A model dimension (pixels, width, depth, heads): above 2^16 it is a typo that would fail inside torch instead."""
StorageOptions = Annotated[dict[str, JsonValue], PlainSerializer(masked, when_used="json")]
"""fsspec options; written out (trainer.json, results.json, vit-config's output) with secret-looking values masked."""


class ModelConfig(Section):
    variant: str
    """Size and patch size in the paper's notation: Ti/16, S/16, B/32, B/16, L/16, H/14, g/14, G/14, any SIZE/PATCH,
    or the hybrid R50+B/16 (ResNet-50 stages (3, 4, 9), patch size 1 on its stride-16 feature map); or timm's name
    for one of them (vit_base_patch16_224, vit_huge_patch14_224, vit_base_r50_s16_224, ...: the names the timm export
    writes; the image size is still image_size)."""
    image_size: Size = 224
    """Training resolution in pixels (square). Position embeddings are learned for this grid and resized for others."""
    patch_size: Size | None = None
    """Overrides the variant's patch size; must divide image_size."""
    width: Size | None = None
    """Overrides the variant's hidden size D (for small debugging models)."""
    depth: Size | None = None
    """Overrides the variant's number of transformer blocks."""
    mlp_dim: Size | None = None
    """Overrides the variant's MLP hidden size."""
    num_heads: Size | None = None
    """Overrides the variant's number of attention heads; must divide the width."""
    num_classes: Annotated[int, Field(ge=0)] = 1000
    """Classifier outputs; 0 builds no classifier (the masked-patch objective brings its own head)."""
    pool: Literal["token", "gap"] = "token"
    """Image representation: the class token's output, or the mean of all patch outputs (global average pooling,
    which in the paper needs a different learning rate)."""
    pos_embed: Literal["learned", "sincos"] = "learned"
    """Learned 1-D position embeddings (the paper's default) or fixed 2-D sin-cos."""
    representation_size: Size | None = None
    """Width of the representation layer (dense + tanh "pre-logits") before the classifier, as in the paper's
    pre-training head; null for none (the paper's fine-tuning head)."""
    dropout: Probability = 0.0
    """Dropout after every dense layer except qkv, and after adding the position embeddings."""
    attention_dropout: Probability = 0.0
    """Dropout on the attention weights."""
    drop_path: Probability = 0.0
    """Stochastic depth rate of the last block; it grows linearly from 0 at the first block."""
    head_bias_init: float = 0.0
    """Initial classifier bias; -10 keeps a sigmoid head over thousands of classes from a huge initial loss."""
    compile: bool = False
    """Train the model compiled with torch.compile (through DeepSpeed's engine.compile, so ZeRO-3's parameter hooks
    stay outside the graph; works with activation checkpointing). The first steps pay for the compilation (a minute
    or more for large models); the weights, checkpoints and exports are the same as without. A GPU lever: on the
    CPU it gained nothing (B/16 step 0.97x, the demo under the trainer 0.67x; BENCHMARKS.md)."""
    init_from: str | None = None
    """Start from the weights of a trainer checkpoint (its folder, for the newest checkpoint, or one step-XXXXXXXX
    folder; local or s3://, read with checkpoint.storage_options): every tensor whose name and shape match is loaded,
    the rest keeps its initialisation; between a masked-patch model and a classifier only the ViT's tensors (so a
    masked-patch encoder gets a new classifier, and a classifier of as many classes as the patch head has outputs
    does not get that head). Optimizer and schedule start fresh; --resume of this run's own checkpoints takes
    precedence."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        try:
            spec = parse_variant(self.variant)
        except ValueError as error:
            raise FieldError("variant", str(error)) from None
        patch = self.patch_size or spec.patch_size
        if spec.stem_stages is not None and patch != stem_stride(spec.stem_stages):
            raise FieldError("patch_size", f"{patch} does not fit the hybrid {self.variant}; remove patch_size")
        if self.image_size % patch:
            which = "patch_size" if self.patch_size else "variant"
            raise FieldError(
                which,
                f"{patch} does not divide image_size {self.image_size}; choose a patch size that "
                f"divides it or change model.image_size",
            )
        width = self.width or spec.size.width
        heads = self.num_heads or spec.size.num_heads
        if width % heads:
            which = "num_heads" if self.num_heads else "width"
            raise FieldError(which, f"{heads} heads do not divide width {width}; choose a divisor of the width")
        if self.pos_embed == "sincos" and width % 4:
            raise FieldError("pos_embed", f"sincos needs a width divisible by 4, got {width}; use learned")
        return self

    @property
    def resolved_patch_size(self) -> int:
        """Patch size in pixels: patch_size or the variant's (a hybrid's is its ResNet stem's stride)."""
        return self.patch_size or parse_variant(self.variant).patch_size

    def description(self) -> ModelDescription:
        """The architecture: the variant's size and patch size with this section's overrides."""
        names = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        fixed = self.model_dump(include={"image_size", "num_classes", "pool", "pos_embed", "representation_size"})
        return ModelDescription.of_variant(self.variant, **fixed, **overrides)

    def training_settings(self) -> dict[str, Any]:
        """The `VisionTransformer` arguments that only matter while training."""
        return self.model_dump(include={"dropout", "attention_dropout", "drop_path", "head_bias_init"})

    def build(self) -> VisionTransformer:
        return self.description().build(**self.training_settings())


class DataConfig(Section):
    train: str
    """Training shards: the URL of an index.json written by build-shards (local path, file://, s3://, ...), or a
    brace pattern of shard URLs such as s3://bucket/train-{000000..000127}.tar. "synthetic" serves one random batch
    from memory, to measure the model's throughput and memory without an input pipeline."""
    train_split: str = "train"
    """Split of the index to train on (build-shards writes "train" and "val")."""
    val: str | None = None
    """Held-out shards for evaluation, in the same forms as train (often the same index.json); null for none."""
    val_split: str = "val"
    """Split of the val index to evaluate on."""
    storage_options: StorageOptions = {}
    """fsspec storage options, e.g. {"endpoint_url": "http://127.0.0.1:9000"} for an S3-compatible store.
    Credentials belong in the environment (AWS_ACCESS_KEY_ID, ...), not in this file."""
    batch_size: PositiveInt
    """Global batch size: images per optimizer step summed over all ranks and accumulation steps."""
    num_workers: Annotated[int, Field(ge=0)] = 4
    """Loader worker processes per rank."""
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.08, 1.0)
    """Area range of the random-resized (Inception) crop, as fractions of the image."""
    crop_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (3 / 4, 4 / 3)
    """Aspect-ratio range of the random-resized crop."""
    hflip: bool = True
    """Random horizontal flips during training."""
    max_error_fraction: Annotated[float, Field(ge=0, le=1)] = 0.001
    """Fraction of corrupt or unreadable samples the loader skips (and counts) before it stops with an error."""

    @model_validator(mode="after")
    def _check_ranges(self) -> DataConfig:
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise FieldError(name, f"[{low}, {high}] is not a range; write the smaller value first")
        return self


class SupervisedObjective(Section):
    type: Literal["supervised"] = "supervised"
    """Train the classifier on the shards' labels."""
    loss: Literal["softmax", "sigmoid"] = "softmax"
    """softmax cross-entropy over classes, or sigmoid cross-entropy per class for multi-label data such as JFT."""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing of the softmax targets (softmax only)."""

    @model_validator(mode="after")
    def _check_smoothing(self) -> SupervisedObjective:
        if self.label_smoothing and self.loss != "softmax":
            raise FieldError("label_smoothing", "applies to the softmax loss only; set it to 0 or use softmax")
        return self


class MaskedPatchObjective(Section):
    type: Literal["masked_patch_prediction"]
    """Self-supervised masked patch prediction (paper Section 4.6); labels are not used."""
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Fraction of patches corrupted per image (the paper uses 50%; 15% as in BERT was slightly worse)."""
    mask_token_prob: Annotated[float, Field(ge=0, le=1)] = 0.8
    """Of the corrupted patches: share replaced by the learnable [mask] embedding."""
    random_patch_prob: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Of the corrupted patches: share replaced by another patch's embedding; the rest stay unchanged."""
    target: Literal["mean_color", "downsampled_color", "pixels"] = "mean_color"
    """What to predict for a corrupted patch: its 3-bit mean colour (512 classes), a 4x4 downsized patch in 3-bit
    colour (16 predictions of 512 classes), or L2 regression on all its pixels. The paper found all three work at
    B/16, L2 slightly worse, and chose the mean colour for its few-shot results. On openclipart with a 0.8M-parameter
    model (`make experiment-mpp`, BENCHMARKS.md) the 4x4 target fine-tuned better than the mean colour at 400 and 800
    steps (+2.8 and +2.3 points over scratch, against +0.7 and +0.9; about one standard error of the held-out set),
    so that experiment uses it, at 1.4x the step time. The default stays the paper's, measured at B/16."""
    color_bits: Annotated[int, Field(ge=1, le=8)] = 3
    """Bits per colour channel of the classification targets (3 bits: 8 levels, 512 colours)."""

    @model_validator(mode="after")
    def _check_probabilities(self) -> MaskedPatchObjective:
        if self.mask_token_prob + self.random_patch_prob > 1:
            raise FieldError("random_patch_prob", "mask_token_prob + random_patch_prob exceed 1; lower one of them")
        return self


def _objective_type(value: Any) -> str:
    # "type" may be omitted for the supervised objective, so the union is told apart by a function.
    if isinstance(value, dict):
        return value.get("type", "supervised")
    return value.type


OBJECTIVES: dict[str, type[Section]] = {
    "supervised": SupervisedObjective,
    "masked_patch_prediction": MaskedPatchObjective,
}
Objective = Annotated[
    Annotated[SupervisedObjective, Tag("supervised")] | Annotated[MaskedPatchObjective, Tag("masked_patch_prediction")],
    Discriminator(_objective_type),
]


class WeightAverageConfig(Section):
    decay: Annotated[float, Field(gt=0, lt=1)]
    """average <- decay * average + (1 - decay) * weights at each update: 0.9999 averages over about the last 10k
    updates (the paper's Polyak averaging; timm's --model-ema-decay)."""
    start_step: Annotated[int, Field(ge=0)] = 0
    """Until this step the average follows the weights (the first weights are random)."""
    every_steps: PositiveInt = 1
    """Update the average every this many optimizer steps (on a GPU an update costs about one optimizer step's
    memory traffic over the weights)."""


class OptimizerConfig(Section):
    type: Literal["adamw"] = "adamw"
    """Adam with decoupled weight decay (PyTorch's AdamW: the decay is scaled by the learning rate, as in the
    original code), applied to weight matrices only."""
    lr: Annotated[float, Field(gt=0)]
    """Peak learning rate, reached at the end of warm-up."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """Adam's b1 and b2."""
    eps: Annotated[float, Field(gt=0)] = 1e-8
    """Adam's epsilon."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Decoupled weight decay on weight matrices (not biases, norms, position embeddings or tokens)."""
    grad_clip_norm: Annotated[float, Field(gt=0)] | None = None
    """Clip gradients to this global L2 norm; null for no clipping."""
    ema: WeightAverageConfig | None = None
    """Also keep an exponential moving average of the weights, in fp32 (of the bf16/fp16 weights the forward pass
    uses, under those precisions): whole on every rank under ZeRO 0-2, each rank its partition under ZeRO-3.
    Evaluations report it beside the raw weights (ema_top1 next to top1); checkpoints carry it whole
    (weight_average.safetensors) and `convert-checkpoint --weights ema` (the default when present) exports it."""


class ScheduleConfig(Section):
    epochs: Annotated[float, Field(gt=0)] | None = None
    """Training length in passes over the training set (its size comes from the shard index). Set epochs or steps."""
    steps: PositiveInt | None = None
    """Training length in optimizer steps. Set epochs or steps."""
    warmup_steps: Annotated[int, Field(ge=1)] = 10_000
    """Steps of linear warm-up from 0 to the peak learning rate; at least 1 (DeepSpeed's schedules refuse 0, and
    with 1 the first step runs at learning rate 0, as it does in every warm-up)."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up, down to min_lr at the last step."""
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    """Learning rate at the end of the decay."""

    @model_validator(mode="after")
    def _check_length(self) -> ScheduleConfig:
        if (self.epochs is None) == (self.steps is None):
            raise FieldError("steps", "set exactly one of schedule.steps and schedule.epochs")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise FieldError("warmup_steps", f"{self.warmup_steps} is not below steps {self.steps}; shorten warm-up")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters (the model is built under
    deepspeed.zero.Init)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision; fp16 uses dynamic loss scaling. Losses are computed in fp32 in every case."""
    micro_batch_size: PositiveInt | None = None
    """Images per rank per forward pass; null for data.batch_size / world size. Gradient accumulation is
    data.batch_size / (micro_batch_size * world size) and must be a whole number."""
    activation_checkpointing: bool | Annotated[int, Field(ge=2)] = False
    """Recompute transformer blocks' activations in the backward pass instead of storing them: true for every block
    (a block then keeps only its input; about 1/3 more compute), k >= 2 for every k-th block (blocks 0, k, 2k, ...;
    memory and extra compute in between, which vit-plan accounts for), false for none."""
    return_freed_host_memory: bool = False
    """CPU ranks only: fix glibc's mmap threshold at 1 MiB so that every freed buffer above it goes back to the system
    (pretrain/train/host_memory.py). Resident memory then stays near what is live (L/16 under ZeRO-3: 3.3 against
    5.4 GB per rank), but every larger allocation costs page faults: the demo trains at 105 instead of 161 images/s on
    two CPU ranks. Set it for large models on the CPU; GPU runs keep their tensors on the device and ignore it."""
    overrides: dict[str, Any] = {}
    """Merged last into the DeepSpeed JSON the trainer builds, for settings not modelled here (e.g.
    {"zero_optimization": {"stage3_max_live_parameters": 1e8}}); DeepSpeed validates them at start-up."""

    @property
    def checkpoint_every(self) -> int:
        """Recompute every this many blocks' activations (1: all); 0 for none."""
        if self.activation_checkpointing is True:
            return 1
        return int(self.activation_checkpointing)  # False is 0


class CheckpointConfig(Section):
    dir: str | None = None
    """Where checkpoints go: a local folder or s3://bucket/prefix; null for <run.output_dir>/checkpoints."""
    every_steps: PositiveInt = 1000
    """Save every this many optimizer steps (and always at the end and on preemption)."""
    keep_last: PositiveInt = 3
    """How many complete checkpoints to keep; older ones are deleted after a newer one is complete."""
    storage_options: StorageOptions = {}
    """fsspec storage options for an s3:// checkpoint dir (credentials from the environment)."""
    staging_dir: str | None = None
    """Node-local folder where each node writes its ranks' files of a checkpoint for object storage before they are
    uploaded (and downloads them on resume); null for a folder in the node's temporary directory. Never a folder
    shared by the nodes."""


TrackerName = Literal["tensorboard", "csv", "jsonl", "wandb", "mlflow"]


class LoggingConfig(Section):
    every_steps: PositiveInt = 50
    """Write a metrics line (console and metrics.jsonl) every this many steps."""
    trackers: list[TrackerName] = ["tensorboard"]
    """Where the records go besides the console, from rank 0: tensorboard and csv (DeepSpeed's monitors, under
    monitor/ in the run folder); jsonl (metrics.jsonl in the run folder, always written, listed or not); wandb
    (Weights & Biases, `pip install 'vit-pretrain[wandb]'`; WANDB_MODE=offline, WANDB_API_KEY and the rest from W&B's
    environment); mlflow (`pip install 'vit-pretrain[mlflow]'`; see mlflow_tracking_uri). Each gets the same records:
    train, eval, few-shot, replicas and checkpoint saves as kind/name at their step, and the resolved config as the
    run's parameters (secrets masked). A resumed run continues the same W&B and MLflow run: their ids are saved with
    every checkpoint. A tracker whose library is missing stops the run before it starts."""
    project: str = "vit-pretrain"
    """The W&B project and the MLflow experiment runs are logged under (the run is named run.name)."""
    mlflow_tracking_uri: Annotated[str, PlainSerializer(masked_urls, when_used="json")] | None = None
    """MLflow's tracking server or store (http://..., databricks, file:...); null for $MLFLOW_TRACKING_URI, or, when
    that is unset, a file store in the run folder (mlruns/, read with `mlflow ui --backend-store-uri`)."""
    sample_keys: bool = False
    """Write the keys and epochs of the samples every optimizer step trained on to samples/ in the run folder, a
    file per rank and start (read back with pretrain.train.sample_log.read_sample_log): to find the images behind a
    loss spike, or to check what a resumed run saw. About 40 bytes per sample."""
    peak_tflops: Annotated[float, Field(gt=0)] | None = None
    """Peak dense TFLOP/s per device for MFU; null for the GPU's datasheet peak (pretrain/plan/gpus.py) in bf16/fp16,
    or a matmul peak measured at start (CPU, fp32, GPUs not in the table)."""
    expected_mfu: Annotated[float, Field(gt=0, le=1)] = 0.45
    """Share of the peak the run is expected to sustain, counting the FLOPs executed (recomputation included, like
    the logged MFU): vit-plan's default --mfu; the trainer logs the step time it implies next to the measured one."""

    @model_validator(mode="after")
    def _each_tracker_once(self) -> LoggingConfig:
        twice = sorted({name for name in self.trackers if self.trackers.count(name) > 1})
        if twice:
            raise FieldError("trackers", f"{', '.join(twice)} listed more than once; list each tracker once")
        return self


class RunConfig(Section):
    name: str
    """Run name; used in the default output folder and in logs."""
    description: str = ""
    """Free text: where the recipe comes from, what the run is for."""
    output_dir: str | None = None
    """Run folder for metrics.jsonl, monitors and (by default) checkpoints; null for runs/<name>."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    """Seed of model initialisation, data order and augmentation."""
    eval_every_steps: PositiveInt | None = None
    """Evaluate on data.val every this many steps (and at the end); null to evaluate at the end only."""


class FewShotDataset(Section):
    train: str
    """Labelled single-label shards the probes are fitted on (index.json URL or brace pattern); each draw takes
    `shots` images per class from them, so a small set (tens of images per class) is enough."""
    test: str
    """Labelled held-out shards the probes are scored on (often the same index.json)."""
    train_split: str = "train"
    """Split of the train index."""
    test_split: str = "val"
    """Split of the test index."""


class FewShotConfig(Section):
    datasets: dict[str, FewShotDataset] = {}
    """Few-shot datasets by name (metrics are named e.g. digits/10shot, kind "fewshot"); none to skip probes.
    Shards are read with data.storage_options."""
    shots: list[PositiveInt] = [1, 5, 10, 25]
    """Training images per class of each probe."""
    draws: PositiveInt = 3
    """Seeded draws of the training images per shot count; the accuracies are averaged."""
    l2_reg: Annotated[float, Field(gt=0)] = 1024.0
    """L2 regularisation of the closed-form least squares (2^10 in the paper's public code)."""
    every_steps: PositiveInt | None = None
    """Probe every this many steps, before the first step (a baseline) and at the end; null to probe at the end
    only."""


class Config(Section):
    """A whole run. Sections: model, data, objective, optimizer, schedule, deepspeed, checkpoint, logging, run,
    fewshot."""

    model: ModelConfig
    """The network."""
    data: DataConfig
    """Shards, batch size, augmentation."""
    objective: Objective = SupervisedObjective()
    """What the network is trained to do: "supervised" or "masked_patch_prediction" (see the type field)."""
    optimizer: OptimizerConfig
    """AdamW settings."""
    schedule: ScheduleConfig
    """Training length and learning-rate schedule."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """ZeRO stage, precision, micro-batch, activation checkpointing."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Where and how often to save."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics and monitors."""
    run: RunConfig
    """Name, seed, output folder, evaluation cadence."""
    fewshot: FewShotConfig = FewShotConfig()
    """Few-shot linear probes of the frozen representation during training (paper Section 4.1)."""

    @property
    def run_dir(self) -> str:
        """The run folder (metrics.jsonl, monitors, default checkpoints): run.output_dir, or runs/<run.name>."""
        return self.run.output_dir or os.path.join("runs", self.run.name)

    @property
    def checkpoint_dir(self) -> str:
        """Where checkpoints go: checkpoint.dir, or <run folder>/checkpoints."""
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @model_validator(mode="after")
    def _check_sections(self) -> Config:
        if isinstance(self.objective, SupervisedObjective) and self.model.num_classes == 0:
            raise FieldError(
                "model.num_classes",
                "is 0 but the supervised objective needs a classifier; set it to the number of classes",
            )
        micro = self.deepspeed.micro_batch_size
        if micro is not None and self.data.batch_size % micro:
            raise FieldError(
                "deepspeed.micro_batch_size",
                f"{micro} does not divide data.batch_size {self.data.batch_size}; choose a divisor",
            )
        return self
