"""`vit-finetune --model HF_FOLDER --train INDEX --out DIR`: fine-tune a converted ViT on our shards, the paper's way.

The defaults are the paper's fine-tuning recipe (Appendix B.1.1): SGD with momentum 0.9, no weight decay, gradient
clipping at global norm 1, cosine decay after a linear warm-up, batch 512, 384 px, and a new zero-initialised head.
The model is a transformers ViT folder (`convert-checkpoint --to hf`, or any transformers ViT with GELU and qkv
biases). It is read through the converter, so the position embeddings are resized to the fine-tuning resolution
once, with the function our model and the converter use, and the head is replaced by a zero-initialised one for the
dataset's classes.

Hugging Face accelerate runs it on one device or many (`accelerate launch -m pretrain.finetune.loop ...`); each process
streams its own share of the shards with our loader, and `micro_batch_size` below the per-process batch accumulates
gradients. The model is evaluated on the held-out split every `eval_every_steps` and at the end, then written with
`save_pretrained` (with the class names as labels and a matching image processor) beside `results.json`. Losses and
evaluations go to the console, `metrics.jsonl` and the `trackers`. The training state is saved every
`checkpoint_every_steps` and on SIGTERM/SIGUSR1 (exit 75), and `--resume auto` continues it (state.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_pipeline.commands import (
    EXIT_PREEMPTED,
    UserError,
    add_storage_option,
    configure_logging,
    help_description,
    json_or_text,
    reports_user_errors,
    storage_options,
)
from data_pipeline.load.shardlist import read_classes
from pretrain.config.load import read_json
from pretrain.config.schema import StorageOptions, SupervisedObjective
from pretrain.finetune import state
from pretrain.model import model_input
from pretrain.train.trackers import check_installed, flat, mlflow_uri
from pretrain.train.weight_average import WeightAverage
from pretrain.weights.hf import from_hf, to_hf, write_preprocessor
from pretrain.weights.surgery import choose_head, resize_positions

log = logging.getLogger("finetune")

PositiveInt = Annotated[int, Field(gt=0)]


class FinetuneConfig(BaseModel):
    """A fine-tuning run; every field is also a command-line option (`lr` is `--lr`, `micro_batch_size` is
    `--micro-batch-size`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    model: str
    """transformers ViT folder to start from (`convert-checkpoint ... --to hf --out DIR`)."""
    train: str
    """Training shards: the index.json written by build-shards (local or s3://) or a brace pattern."""
    out: str
    """Folder for the fine-tuned model (save_pretrained) and results.json."""
    val: str | None = None
    """Held-out shards; default: the train index (its val_split)."""
    train_split: str = "train"
    """Split of the train index to fine-tune on."""
    val_split: str = "val"
    """Split of the val index to evaluate on."""
    image_size: PositiveInt = 384
    """Fine-tuning resolution; the position embeddings are resized to it (the patch size stays)."""
    batch_size: PositiveInt = 512
    """Global batch per optimizer step, across all processes."""
    micro_batch_size: PositiveInt | None = None
    """Images per process per forward pass; default the whole per-process batch. Smaller values accumulate."""
    steps: PositiveInt = 20_000
    """Optimizer steps (the paper: 20k for ImageNet; fewer for small datasets)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 500
    """Linear warm-up from 0 before the cosine decay."""
    lr: Annotated[float, Field(gt=0)] = 0.01
    """Peak learning rate (the paper sweeps 0.003, 0.01, 0.03 and 0.06)."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """SGD weight decay (the paper uses none for fine-tuning)."""
    grad_clip_norm: Annotated[float, Field(gt=0)] | None = 1.0
    """Clip gradients to this global norm; null for no clipping."""
    keep_head: bool = False
    """Fine-tune the folder's classifier instead of a new zero-initialised one (it must have the dataset's classes)."""
    precision: Literal["no", "bf16", "fp16"] = "bf16"
    """Accelerate's mixed precision: no, bf16 or fp16 (autocast; the weights stay fp32)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the random-resized crop, as fractions of the image."""
    hflip: bool = True
    """Random horizontal flips (off for data where mirroring changes the class, such as digits)."""
    num_workers: Annotated[int, Field(ge=0)] = 4
    """Loader worker processes per process."""
    eval_every_steps: PositiveInt | None = None
    """Evaluate during training every this many steps; it always evaluates at the end."""
    log_every_steps: PositiveInt = 50
    """Print the loss, learning rate and images/s every this many steps."""
    seed: int = 0
    """Seeds the head-independent randomness: data order, crops, flips."""
    storage_options: StorageOptions = {}
    """fsspec options for s3:// shards, e.g. {"endpoint_url": "http://..."}."""
    checkpoint_every_steps: PositiveInt = 1000
    """Save the training state (model, optimizer, RNG, loader position) to OUT/checkpoints every this many steps; it
    is also saved at the end and when SIGTERM or SIGUSR1 arrives (then the run exits with 75)."""
    keep_checkpoints: PositiveInt = 2
    """Checkpoints kept in OUT/checkpoints (the newest)."""
    resume: str = "auto"
    """auto (or latest): continue from OUT/checkpoints' newest if there is one; none: start afresh (refused where a
    run's checkpoints are); or a checkpoint folder name such as step-00001000."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """accelerate's trackers to log to besides the console and OUT/metrics.jsonl, as logging.trackers of the
    pre-training config: tensorboard (under OUT), wandb (`pip install 'vit-pretrain[wandb]'`), mlflow (`pip install
    'vit-pretrain[mlflow]'`; $MLFLOW_TRACKING_URI or OUT/mlruns). A resumed run continues their runs."""
    project: str = "vit-finetune"
    """The W&B project and MLflow experiment (the run is named after OUT's folder)."""
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Also keep an exponential moving average of the weights (Polyak averaging, as the paper's fine-tuning numbers
    use; 0.9999 at the paper's 20k steps, less for short runs), updated every step in fp32. Evaluations report both
    (ema_top1 beside top1); OUT holds the averaged model and OUT/raw the last weights."""


class FinetuneError(UserError):
    """A fine-tuning run cannot start; the message names the input and what to change."""


def parse_args(argv: list[str] | None) -> FinetuneConfig:
    """`--config FILE` (a JSON object of FinetuneConfig fields) and a `--flag` for every field, which wins over the
    file; a flag's help is the field's documentation. Flag values are JSON where they parse (numbers, null, true,
    lists) and strings otherwise."""
    parser = argparse.ArgumentParser(prog="vit-finetune", description=help_description(__doc__))
    parser.add_argument("--config", help="JSON file of the fields below (e.g. configs/finetune/demo_digits.json)")
    add_storage_option(parser, "s3:// shards")
    for name, field in FinetuneConfig.model_fields.items():
        if name == "storage_options":
            continue
        default = " (required)" if field.is_required() else f" (default: {json.dumps(field.default)})"
        flag, help_text = f"--{name.replace('_', '-')}", f"{field.description}{default}"
        if field.annotation is bool:  # a switch that stands alone, as in every other tool: --keep-head, --no-hflip
            parser.add_argument(flag, dest=name, help=help_text, action=argparse.BooleanOptionalAction, default=None)
        elif get_origin(field.annotation) is list:  # --trackers wandb mlflow
            parser.add_argument(flag, dest=name, help=help_text, nargs="*", metavar=name.upper())
        else:
            parser.add_argument(flag, dest=name, help=help_text, metavar=name.upper())
    args = parser.parse_args(argv)
    settings = read_json(args.config) if args.config else {}
    flags = {name: value for name, value in vars(args).items() if name in FinetuneConfig.model_fields}
    settings |= {
        name: json_or_text(value) if isinstance(value, str) else value
        for name, value in flags.items()
        if value is not None
    }
    if options := storage_options(args):  # the flags' options win over the file's, key by key
        from_file = settings.get("storage_options")
        settings["storage_options"] = (from_file if isinstance(from_file, dict) else {}) | options
    try:
        return FinetuneConfig.model_validate(settings)
    except ValidationError as error:
        problems = [
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" else "")
            for e in error.errors()
        ]
        parser.error("; ".join(problems))


# -- the model -----------------------------------------------------------------------------------------------------


def build_model(config: FinetuneConfig, class_names: list[str]) -> torch.nn.Module:
    """The transformers ViT to fine-tune: position embeddings at `image_size`, a zero-initialised head for
    `class_names` (or the folder's own with keep_head), the class names as labels."""
    weights = from_hf(config.model)
    if config.keep_head and weights.model.num_classes != len(class_names):
        raise FinetuneError(
            f"{config.model}: keep_head, but its classifier has {weights.model.num_classes} classes and "
            f"{config.train} has {len(class_names)}; drop --keep-head for a new head"
        )
    weights = choose_head(
        weights, keep_head=config.keep_head, num_classes=None if config.keep_head else len(class_names)
    )
    if weights.model.image_size != config.image_size:
        weights = resize_positions(weights, config.image_size)
    model = to_hf(weights)
    model.config.id2label = dict(enumerate(class_names))
    model.config.label2id = {name: n for n, name in enumerate(class_names)}
    return model.train()


def class_table(config: FinetuneConfig) -> list[str]:
    classes = read_classes(config.train, config.storage_options)
    if not classes:
        raise FinetuneError(
            f"{config.train}: no classes.json beside the shards; fine-tuning needs the class table build-shards writes"
        )
    return sorted(classes, key=classes.__getitem__)


# -- training ------------------------------------------------------------------------------------------------------


def learning_rate(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps` (`step` counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_plan(config: FinetuneConfig, processes: int) -> tuple[int, int]:
    """(images per forward pass per process, forward passes per optimizer step)."""
    if config.batch_size % processes:
        raise FinetuneError(f"--batch-size {config.batch_size} is not divisible by the {processes} processes")
    per_process = config.batch_size // processes
    micro = config.micro_batch_size or per_process
    if per_process % micro:
        raise FinetuneError(
            f"--micro-batch-size {micro} does not divide the per-process batch {per_process} "
            f"(--batch-size {config.batch_size} over {processes} processes)"
        )
    return micro, per_process // micro


def evaluate(model: torch.nn.Module, config: FinetuneConfig, accelerator: Any, batch_size: int) -> dict[str, float]:
    """Top-1 and top-5 over the held-out split, summed across processes (padding excluded)."""
    from data_pipeline import make_loader
    from pretrain.objectives.supervised import correct_counts

    loader = make_loader(
        config.val or config.train,
        batch_size=batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=config.num_workers,
        seed=config.seed,
        train=False,
        image_size=config.image_size,
        storage_options=config.storage_options,
        split=config.val_split,
    )
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            logits = model(pixel_values=model_input(batch["image"].to(accelerator.device))).logits
            counts = correct_counts(logits.float(), batch["label"], batch["valid"], multi_label=False)
            sums += torch.tensor(
                [counts["top1"], counts["top5"], counts["images"]], device=accelerator.device, dtype=torch.float64
            )
    model.train()
    top1, top5, images = accelerator.reduce(sums, reduction="sum").tolist()
    return {"top1": top1 / max(images, 1), "top5": top5 / max(images, 1), "images": images}


def finetune(config: FinetuneConfig) -> dict[str, Any] | None:
    """Fine-tune to `steps`, resuming from `resume`; returns the results, or None after a preemption (the
    checkpoint is saved)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from data_pipeline import make_loader
    from pretrain.objectives.supervised import supervised_loss  # these import DeepSpeed: not for --help
    from pretrain.train.metrics import MetricsLog

    check_installed(config.trackers, "--trackers")
    accelerator = Accelerator(
        mixed_precision=config.precision, log_with=config.trackers or None, project_dir=config.out
    )
    micro, accumulation = batch_plan(config, accelerator.num_processes)
    set_seed(config.seed)
    class_names = class_table(config)
    resume_from = state.resolve(config.out, config.resume)  # before the model: a refused resume costs seconds
    if len(set(gather_object([str(resume_from)]))) > 1:  # one process resuming and another starting would hang
        raise FinetuneError(f"{config.out}: the processes see different checkpoints; --out must be a shared folder")
    loader = make_loader(
        config.train,
        batch_size=micro,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=config.num_workers,
        seed=config.seed,
        train=True,
        image_size=config.image_size,
        storage_options=config.storage_options,
        split=config.train_split,
        crop_scale=config.crop_scale,
        hflip=config.hflip,
    )
    if loader.shards.multi_label:
        raise FinetuneError(f"{config.train}: multi-label shards; vit-finetune trains single-label classifiers")
    model = build_model(config, class_names)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    # The schedule is stepped here, once per optimizer step, rather than handed to accelerate, whose scheduler
    # wrapper steps once per process per optimizer step unless batches are split.
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = SupervisedObjective(type="supervised", loss="softmax")
    weights = dict(accelerator.unwrap_model(model).named_parameters())
    average = WeightAverage(weights, config.ema_decay) if config.ema_decay else None
    first, history, tracker_ids = 0, [], {}
    if resume_from is not None:
        progress, loader_states = state.load(accelerator, resume_from, average)
        state.check_same_settings(resume_from, settings(config), progress["settings"])
        loader.load_state_dict(loader_states)
        first, history, tracker_ids = progress["step"], progress["history"], progress["trackers"]
        accelerator.print(f"resumed from {resume_from} at step {first}")
    metrics = MetricsLog(
        config.out,
        None,
        accelerator.is_main_process,
        open_trackers(accelerator, config, tracker_ids, resume_from is not None),
    )
    accelerator.print(
        f"fine-tuning {config.model} at {config.image_size} px on {loader.shards.total} images of "
        f"{len(class_names)} classes: {config.steps} steps of {config.batch_size} "
        f"({accelerator.num_processes} processes x {accumulation} passes x {micro})"
    )
    with state.Preemption(accelerator.num_processes) as preemption:
        batches = iter(loader)
        started, done = time.perf_counter(), first
        for step in range(first, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            loss_sum = torch.zeros((), device=accelerator.device)
            for n in range(accumulation):
                batch = next(batches)
                # gradients are all-reduced on the last pass only
                sync = contextlib.nullcontext() if n == accumulation - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    logits = model(pixel_values=model_input(batch["image"].to(accelerator.device))).logits
                    loss = supervised_loss(logits, batch["label"].to(accelerator.device), objective) / accumulation
                    accelerator.backward(loss)
                loss_sum += loss.detach()
            if config.grad_clip_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if average is not None:
                average.update(weights, done)
            if done % config.log_every_steps == 0 or done == config.steps:
                record = {
                    "kind": "train",
                    "step": done,
                    "loss": accelerator.reduce(loss_sum, reduction="mean").item(),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": (done - first) * config.batch_size / (time.perf_counter() - started),
                }
                metrics.write(
                    record,
                    f"step {done}/{config.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"{record['images_per_s']:.1f} images/s",
                )
            if done == config.steps or (config.eval_every_steps and done % config.eval_every_steps == 0):
                history.append(evaluation(model, config, accelerator, micro, done, metrics, average))
            preempted = preemption.agreed()
            if preempted or done == config.steps or done % config.checkpoint_every_steps == 0:
                progress = {
                    "history": history,
                    "trackers": {**tracker_ids, **metrics.run_ids()},
                    "settings": settings(config),
                }
                folder = state.save(
                    accelerator, config.out, done, progress, loader.state_dict(), config.keep_checkpoints, average
                )
                accelerator.print(f"checkpoint {folder}", flush=True)
            if preempted:
                accelerator.print(
                    f"preempted: checkpoint {folder} saved; exit {EXIT_PREEMPTED}; rerun with --resume auto", flush=True
                )
                metrics.close(finished=False)
                return None
    if not history or history[-1]["step"] != done:  # resumed from the checkpoint of the last step, before its eval
        history.append(evaluation(model, config, accelerator, micro, done, metrics, average))
    metrics.close(finished=True)
    results = {**history[-1], "history": history, "config": config.model_dump(mode="json")}
    if accelerator.is_main_process:
        out = Path(config.out)
        if average is not None:
            save_model(accelerator.unwrap_model(model), out / "raw", config.image_size)
            with average.swapped_into(weights):
                save_model(accelerator.unwrap_model(model), out, config.image_size)
        else:
            save_model(accelerator.unwrap_model(model), out, config.image_size)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return results


def settings(config: FinetuneConfig) -> dict[str, Any]:
    """The run's settings as a checkpoint records them (storage options masked)."""
    return config.model_dump(mode="json")


def evaluation(
    model: torch.nn.Module,
    config: FinetuneConfig,
    accelerator: Any,
    batch_size: int,
    step: int,
    metrics: Any,
    average: WeightAverage | None,
) -> dict[str, float]:
    """`evaluate` at `step` (of the averaged weights too, as ema_*), logged (console, metrics.jsonl, trackers) and
    returned for the history."""
    result = {"step": step, **evaluate(model, config, accelerator, batch_size)}
    line = f"eval step {step} | top1 {result['top1']:.4f} | top5 {result['top5']:.4f}"
    if average is not None:
        with average.swapped_into(dict(accelerator.unwrap_model(model).named_parameters())):
            averaged = evaluate(model, config, accelerator, batch_size)
        result |= {"ema_top1": averaged["top1"], "ema_top5": averaged["top5"]}
        line += f" | ema top1 {result['ema_top1']:.4f} | ema top5 {result['ema_top5']:.4f}"
    metrics.write({"kind": "eval", **result}, f"{line} on {result['images']:.0f} images")
    return result


def save_model(model: torch.nn.Module, out: Path, image_size: int) -> None:
    model.save_pretrained(out)
    write_preprocessor(out, image_size)


def open_trackers(accelerator: Any, config: FinetuneConfig, saved_ids: dict[str, str], resumed: bool) -> list:
    """accelerate's trackers of `config.trackers` (on the main process), continuing the runs of `saved_ids`; the
    config becomes the run's parameters when it starts (not again when it resumes: MLflow refuses a changed one)."""
    if not config.trackers:
        return []
    name = Path(config.out).name
    if "mlflow" in config.trackers:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri(None, config.out))  # accelerate's MLflow tracker logs to the global one
    accelerator.init_trackers(
        config.project,
        config=None if resumed else flat(config.model_dump(mode="json")),
        init_kwargs={
            "wandb": {
                "name": name,
                "dir": config.out,
                "id": saved_ids.get("wandb"),
                "resume": "allow",
                "settings": {"x_disable_meta": True},  # its metadata holds the command line, credentials and all
            },
            "mlflow": {"run_name": name, "run_id": saved_ids.get("mlflow")},
        },
    )
    if not accelerator.is_main_process:
        return []
    return [AccelerateTracker(accelerator.get_tracker(tracker, unwrap=False), tracker) for tracker in config.trackers]


class AccelerateTracker:
    """One of accelerate's trackers, as the metrics log takes trackers (pretrain/train/trackers.py)."""

    def __init__(self, tracker: Any, name: str):
        self.tracker, self.name = tracker, name
        run = tracker.tracker
        self.run_id = {"wandb": lambda: run.id, "mlflow": lambda: run.info.run_id}.get(name, lambda: "")()

    def log(self, values: dict[str, float], step: int) -> None:
        self.tracker.log(values, step=step)

    def close(self, finished: bool) -> None:
        if not finished and self.name == "wandb":
            self.tracker.tracker.mark_preempting()  # shown as preempted until the resumed run continues it
        if not finished and self.name == "mlflow":
            import mlflow

            mlflow.end_run(status="KILLED")  # as the pre-training trainer marks a preempted run
            return
        self.tracker.finish()


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    configure_logging()
    config = parse_args(argv)
    results = finetune(config)
    if results is None:
        return EXIT_PREEMPTED
    averaged = f" (averaged weights {results['ema_top1']:.4f}, the model written)" if "ema_top1" in results else ""
    print(f"held-out top-1 {results['top1']:.4f}{averaged} on {results['images']:.0f} images; model in {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
