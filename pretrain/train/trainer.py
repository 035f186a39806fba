"""The training loop: build data, model and DeepSpeed engine from a config, train, evaluate, log, checkpoint, resume.

Read top to bottom: `Trainer.__init__` sets everything up in the order that fails fastest (data and checkpoint
place before the model is built), `train` is the loop, `evaluate` the held-out pass, `save`/`restore` the
checkpoints. Preemption (SIGTERM, SIGUSR1) is honoured at the next step boundary: every rank saves and the process
exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any

import deepspeed
import torch

from data_pipeline import make_loader
from data_pipeline.commands import EXIT_PREEMPTED, UserError
from data_pipeline.load.loader import StreamingLoader
from data_pipeline.load.synthetic import SOURCE as SYNTHETIC
from data_pipeline.load.synthetic import SyntheticLoader
from pretrain.config.batch import batch_sizes
from pretrain.config.schema import Config
from pretrain.evaluate.fewshot import extract_features, fewshot_accuracy, probe_batches
from pretrain.model import model_input
from pretrain.objectives import ObjectiveError, build_model, build_task
from pretrain.train import distributed
from pretrain.train.checkpoint import CheckpointStore
from pretrain.train.compute import step_seconds, training_flops_per_image
from pretrain.train.elastic import needs_conversion
from pretrain.train.engine_config import deepspeed_config, parameter_groups
from pretrain.train.metrics import METRICS_FILE, MetricsLog, StepTimer, device_peak_tflops, memory_bytes, train_line
from pretrain.train.sample_log import SampleLog, remove_sample_log
from pretrain.train.schedule import total_steps
from pretrain.train.trackers import TrackerError, check_installed, open_trackers
from pretrain.train.weight_average import (
    WeightAverage,
    gather_zero3,
    partition_zero3,
    regather_persistent,
    zero3_targets,
)
from pretrain.weights.formats import read_init_state
from pretrain.weights.model_weights import WeightsError, encoder_prefix, model_file
from pretrain.weights.safe_load import guard_engine_loads
from pretrain.weights.surgery import load_matching

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 10
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingError(UserError):
    """Training cannot go on (or start); the message says why and what to do."""


class Trainer:
    def __init__(self, config: Config, placement: distributed.Placement, resume: str = "auto", overwrite: bool = False):
        self.config = config
        self.placement = placement
        self.output_dir = config.run_dir
        self.micro_batch, self.accumulation = batch_sizes(config, placement.world_size)
        self.dtype = DTYPES[config.deepspeed.precision]
        self.task = build_task(config)
        check_installed(config.logging.trackers)

        # Data first: a missing shard, a wrong endpoint or a class-count mismatch fails before any model is built
        self.train_loader = self._loader(config.data.train, config.data.train_split, train=True)
        try:
            self.task.check_shards(self.train_loader.shards, config.data.train)
        except ObjectiveError as error:
            raise TrainingError(str(error)) from None
        for dataset in config.fewshot.datasets.values():
            _, train_classes = self._probe_loader(dataset.train, dataset.train_split)
            _, test_classes = self._probe_loader(dataset.test, dataset.test_split)
            if train_classes != test_classes:
                raise TrainingError(
                    f"fewshot: {dataset.test} has {test_classes} classes but {dataset.train} has "
                    f"{train_classes}; use shards with the same class table"
                )
        self.steps = total_steps(config, self.train_loader.samples_per_epoch)
        self.checkpoints = CheckpointStore(
            config.checkpoint_dir,
            dict(config.checkpoint.storage_options),
            config.checkpoint.staging_dir,
            config.checkpoint.keep_last,
            placement,
        )
        self.checkpoints.check_writable()
        # before the model is built: a refused --resume none costs seconds, not a model's initialisation
        tag = self.checkpoints.resolve(resume, overwrite)
        if overwrite and resume == "none" and placement.is_main:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.output_dir, METRICS_FILE))  # the old run's records
            remove_sample_log(self.output_dir)
        if tag is not None:
            self._check_same_model(tag)
        saved_world_size = (self.checkpoints.trainer_record(tag) or {}).get("world_size") if tag else None
        self.universal = needs_conversion(config.deepspeed.zero_stage, saved_world_size, placement.world_size)

        ds_config = deepspeed_config(config, placement.world_size, self.steps, os.path.join(self.output_dir, "monitor"))
        if self.universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        torch.manual_seed(config.run.seed)  # the same initial weights on every rank
        if config.deepspeed.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = build_model(config)
        else:
            model = build_model(config)
        if config.model.init_from:
            self._init_from(model, config.model.init_from)
        if config.deepspeed.checkpoint_every:
            model.set_grad_checkpointing(every=config.deepspeed.checkpoint_every)
        optim = config.optimizer
        # fused: one kernel over all tensors and no temporaries the size of the model (the foreach default on GPUs
        # allocates a few), which the memory plan (pretrain/plan/memory_model.py) relies on
        groups = parameter_groups(model, optim.weight_decay)
        self.weight_decays = [group["weight_decay"] for group in groups]
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if config.model.compile:
            self.engine.compile()  # the wrapped module in place: parameter names, and so checkpoints, stay the same
        guard_engine_loads(self.engine)  # DeepSpeed unpickles checkpoint files with weights_only=False
        torch.manual_seed(config.run.seed + 1 + placement.rank)  # dropout and stochastic depth differ per rank

        self.train_flops_per_image = training_flops_per_image(config)
        self.peak_tflops = config.logging.peak_tflops or device_peak_tflops(self.dtype)
        # what vit-plan predicts for this run on this hardware, logged next to the measured step time
        self.predicted_step_s = step_seconds(
            self.train_flops_per_image,
            config.data.batch_size,
            placement.world_size,
            self.peak_tflops,
            config.logging.expected_mfu,
        )
        self.samples_seen = 0
        self.nonfinite_steps = 0
        self.last_eval: dict[str, float] | None = None  # saved with checkpoints: an export's model card reports it
        self.end_evaluated_at: int | None = None  # the step whose end-of-run evaluation and probes ran
        self.preempt_requested = False
        self.tracker_ids: dict[str, str] = {}  # the W&B and MLflow runs a resumed run continues
        ema = config.optimizer.ema
        self.average = WeightAverage(self._weights(), ema.decay, ema.start_step, ema.every_steps) if ema else None
        if tag is not None:
            self.restore(tag)
        trackers, failure = [], None
        if placement.is_main:
            try:
                trackers = open_trackers(config, self.output_dir, self.tracker_ids)
            except TrackerError as error:
                failure = error
        if not distributed.all_true(failure is None):  # every rank stops, not only the one that opens them
            raise failure or TrackerError("logging.trackers: a tracker could not start on rank 0 (its log says why)")
        self.metrics = MetricsLog(self.output_dir, self.engine, enabled=placement.is_main, trackers=trackers)
        self.sample_log = SampleLog(
            self.output_dir, self.engine.global_steps, placement.rank, enabled=config.logging.sample_keys
        )

    # -- set-up helpers ------------------------------------------------------------------------------------------

    def _check_same_model(self, tag: str) -> None:
        """A resumed run trains the checkpoint's model: a config that builds another one (a changed width, image size,
        class count or objective) is refused here, naming the fields, not by DeepSpeed's state-dict dump."""
        saved = self.checkpoints.model_record(tag)
        if saved is None:
            return
        (model, prefix), current = saved, self.config.model.description()
        # fixed sin-cos position embeddings hold no tensor: such a model resumes at another resolution
        free = {"image_size"} if model.pos_embed == current.pos_embed == "sincos" else set()
        changed = [
            f"model.{field.name} {getattr(model, field.name)!r} there, {getattr(current, field.name)!r} here"
            for field in dataclasses.fields(current)
            if field.name not in free and getattr(model, field.name) != getattr(current, field.name)
        ]
        if prefix != encoder_prefix(self.config):
            changed.append(
                f"objective.type: the ViT's weights under {prefix!r} there, {encoder_prefix(self.config)!r} here"
            )
        if changed:
            raise TrainingError(
                f"{self.checkpoints.url}/{tag}: holds another model ({'; '.join(changed)}); resume with the settings "
                "it was trained with, or start a new run in another run.output_dir"
            )

    def _loader(self, source: str, split: str, train: bool) -> StreamingLoader | SyntheticLoader:
        data = self.config.data
        if source == SYNTHETIC:
            return SyntheticLoader(
                batch_size=self.micro_batch,
                image_size=self.config.model.image_size,
                num_classes=self.config.model.num_classes,
                seed=self.config.run.seed,
            )
        return make_loader(
            source,
            batch_size=self.micro_batch,
            rank=self.placement.rank,
            world_size=self.placement.world_size,
            num_workers=data.num_workers if train else min(data.num_workers, 1),
            seed=self.config.run.seed,
            train=train,
            image_size=self.config.model.image_size,
            storage_options=dict(data.storage_options),
            split=split,
            crop_scale=data.crop_scale,
            crop_ratio=data.crop_ratio,
            hflip=data.hflip,
            max_error_fraction=data.max_error_fraction,
            labels=self.task.labels,
            num_classes=self.config.model.num_classes or None,
        )

    def _init_from(self, model: torch.nn.Module, url: str) -> None:
        try:
            state = read_init_state(url, dict(self.config.checkpoint.storage_options))
            not_loaded = load_matching(model, state, url)
        except WeightsError as error:
            raise TrainingError(f"model.init_from: {error}") from None
        if self.placement.is_main:
            fresh = f"; initialised afresh: {', '.join(not_loaded)}" if not_loaded else ""
            print(f"weights from {url}{fresh}", flush=True)

    def _images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images on the device (for targets computed from pixels), and the same in the [-1, 1] range of the
        paper's preprocessing in the training dtype (the model's input)."""
        raw = images.to(distributed.device(), non_blocking=True)
        return raw, model_input(raw).to(self.dtype)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.preempt_requested:
            log.warning("rank %d: got signal %d; checkpointing at the next step boundary", self.placement.rank, signum)
        self.preempt_requested = True

    # -- the loop ------------------------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to the configured length; returns the process exit code (0, or EXIT_PREEMPTED)."""
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)
        config, engine = self.config, self.engine
        eval_every = config.run.eval_every_steps
        probe_every = config.fewshot.every_steps
        timer = StepTimer()
        # the loss is summed where it is computed and read at log steps only: on a GPU every read waits for the
        # device, and the host could not queue the next kernels meanwhile
        loss_sum, loss_count, nonfinite_in_a_row = torch.zeros((), device=distributed.device()), 0, 0
        batches = iter(self.train_loader)
        if probe_every and engine.global_steps == 0:
            self.fewshot(0)  # the initial weights' numbers: the baseline every later probe is read against
        while engine.global_steps < self.steps:
            start = time.perf_counter()
            batch = next(batches)
            timer.waited(time.perf_counter() - start, int(batch["valid"].numpy().sum()))  # host memory: no wait
            steps_before = engine.global_steps
            raw, images = self._images(batch["image"])
            loss = self.task.loss(engine, images, raw, batch)
            # the micro-step's one collective and one wait for the device: whether the loss is finite on every rank
            # (and, before the optimizer step, the checkpoint store's questions: a preemption, the uploads)
            questions = [~torch.isfinite(loss.detach())]
            if engine.is_gradient_accumulation_boundary():
                questions += self.checkpoints.step_questions(self.preempt_requested)
            nonfinite, *answers = distributed.any_of(questions)
            self.sample_log.write(steps_before + 1, batch, trained=not nonfinite)
            if nonfinite:
                # every rank skips the same micro-batch, so the ranks stay in step
                self.nonfinite_steps += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise TrainingError(
                        f"loss was not finite {nonfinite_in_a_row} times in a row at step "
                        f"{engine.global_steps}; lower optimizer.lr or check the data"
                    )
                continue
            nonfinite_in_a_row = 0
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            loss_count += 1
            self.samples_seen += self.micro_batch * self.placement.world_size
            if engine.global_steps == steps_before:  # inside a gradient-accumulation cycle
                continue
            step = engine.global_steps
            if self.average is not None:
                self.average.update(self._weights(), step)
            timer.stepped()
            if step % config.logging.every_steps == 0 or step == self.steps:
                self._log_train(step, timer, loss_sum.item(), loss_count)
                timer.reset()
                loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            # the last step's evaluation comes before its checkpoint, which then records it (an export's model card)
            if step == self.steps or (eval_every and step % eval_every == 0):
                self.evaluate(step)
            if step == self.steps or (probe_every and step % probe_every == 0):
                self.fewshot(step)
            if step == self.steps:
                self.end_evaluated_at = step
            preempted = self.checkpoints.at_step_boundary(step, answers)
            if preempted or step % config.checkpoint.every_steps == 0 or step == self.steps:
                self.save(step)
            if preempted or step == self.steps:
                self.checkpoints.finish_upload(step)
            if preempted:
                if self.placement.is_main:
                    print(
                        f"preempted: checkpoint {self.checkpoints.url} step {step} saved; exit "
                        f"{EXIT_PREEMPTED}; rerun with --resume auto",
                        flush=True,
                    )
                self.metrics.close(finished=False)
                return EXIT_PREEMPTED
        self.sample_log.close()
        if self.end_evaluated_at != engine.global_steps:  # resumed at the end from a checkpoint saved before it
            self.evaluate(engine.global_steps)
            self.fewshot(engine.global_steps)
        self.check_replicas(engine.global_steps)
        self.metrics.close(finished=True)
        return 0

    def check_replicas(self, step: int) -> None:
        """Log whether every data-parallel rank ended with the same weights (ZeRO-3 partitions them: nothing to
        compare)."""
        if self.config.deepspeed.zero_stage == 3 or self.placement.world_size == 1:
            return
        digests = distributed.replica_digests(self.engine.module)
        identical = len(set(digests)) == 1
        line = (
            f"replicas: the {len(digests)} ranks hold identical weights (sha256 {digests[0][:12]})"
            if identical
            else f"replicas DIVERGED at step {step}: sha256 per rank {[d[:12] for d in digests]}"
        )
        self.metrics.write({"kind": "replicas", "step": step, "identical": identical, "sha256": digests}, line)
        if not identical:
            log.error("%s; the ranks no longer train the same model: check for non-deterministic collectives", line)

    def _log_train(self, step: int, timer: StepTimer, loss_sum: float, loss_count: int) -> None:
        step_s, rate, waiting = timer.report()
        loss_total, count, rate_total, waiting_total, step_total = distributed.all_sum(
            [loss_sum, loss_count, rate, waiting, step_s]
        )
        memory = distributed.all_max(memory_bytes())
        world = self.placement.world_size
        tflops = rate_total / world * self.train_flops_per_image / 1e12
        counters = self.train_loader.counters()
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "kind": "train",
            "step": step,
            "epoch": self.samples_seen / self.train_loader.samples_per_epoch,
            "loss": loss_total / max(count, 1),
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_s": rate_total,
            "data_wait": waiting_total / world,
            "step_s": step_total / world,
            "predicted_step_s": self.predicted_step_s,
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops,
            "memory_gb": memory / 1e9,
            "skipped_samples": sum(counters["skipped"].values()),
            "nonfinite_steps": self.nonfinite_steps,
            "retries": counters["retries"],
        }
        self.metrics.write(record, train_line(record, self.steps))

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        """The objective's held-out metrics on data.val (top-1/top-5 or precision@1; masked-patch loss and accuracy
        with the same masks at every evaluation), of the weight average too (as ema_*)."""
        if self.config.data.val is None:
            return {}
        result, images = self._held_out()
        if self.average is not None:
            result |= {f"ema_{name}": value for name, value in self._held_out_of_the_average().items()}
        record = {"kind": "eval", "step": step, **result, "images": images}
        self.last_eval = {"step": step, **result, "images": images}
        self.metrics.write(
            record,
            f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()) + f" | {images:.0f} images",
        )
        return result

    def _held_out(self) -> tuple[dict[str, float], float]:
        """The metrics on data.val and the number of images; every rank gets the same number of (padded) batches."""
        loader = self._loader(self.config.data.val, self.config.data.val_split, train=False)
        generator = torch.Generator(distributed.device()).manual_seed(self.config.run.seed + self.placement.rank)
        sums: dict[str, float] = {}
        self.engine.eval()
        with torch.no_grad():
            for batch in loader:
                raw, images = self._images(batch["image"])
                for name, value in self.task.eval_sums(self.engine, images, raw, batch, generator).items():
                    sums[name] = sums.get(name, 0.0) + value
        self.engine.train()
        names = sorted(sums)
        totals = dict(zip(names, distributed.all_sum([sums[name] for name in names]), strict=True))
        images = max(totals.pop("images"), 1.0)
        return {name: value / images for name, value in totals.items()}, images

    def _held_out_of_the_average(self) -> dict[str, float]:
        zero3 = self.config.deepspeed.zero_stage == 3
        with self.average.swapped_into(self._weights()):
            if zero3:
                regather_persistent(self.engine.module)
            result = self._held_out()[0]
        if zero3:
            regather_persistent(self.engine.module)
        return result

    def _weights(self) -> dict[str, torch.Tensor]:
        """What the weight average follows on this rank: the parameters, whole under ZeRO 0-2, partitioned under 3."""
        if self.config.deepspeed.zero_stage == 3:
            return zero3_targets(self.engine.module)
        return dict(self.engine.module.named_parameters())

    def _probe_loader(self, source: str, split: str) -> tuple[Any, int]:
        return probe_batches(
            source,
            split,
            batch_size=self.micro_batch,
            image_size=self.config.model.image_size,
            rank=self.placement.rank,
            world_size=self.placement.world_size,
            storage_options=dict(self.config.data.storage_options),
        )

    def fewshot(self, step: int) -> dict[str, float]:
        """Few-shot linear probes of the frozen representation on each configured dataset (rank 0 logs them)."""
        settings = self.config.fewshot
        result: dict[str, float] = {}
        if not settings.datasets:
            return result
        represent = lambda raw: self.engine(self._images(raw)[1], pre_logits=True)  # noqa: E731
        self.engine.eval()
        for name, dataset in settings.datasets.items():
            train_loader, num_classes = self._probe_loader(dataset.train, dataset.train_split)
            test_loader, _ = self._probe_loader(dataset.test, dataset.test_split)
            train, test = extract_features(represent, train_loader), extract_features(represent, test_loader)
            accuracies = fewshot_accuracy(train, test, num_classes, settings.shots, settings.draws, settings.l2_reg)
            result.update({f"{name}/{shots}shot": value for shots, value in accuracies.items()})
        self.engine.train()
        self.metrics.write(
            {"kind": "fewshot", "step": step, **result},
            f"few-shot step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()),
        )
        return result

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, step: int) -> None:
        trainer_state = {
            "samples_seen": self.samples_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "world_size": self.placement.world_size,
            "last_eval": self.last_eval,
            "end_evaluated_at": self.end_evaluated_at,
            "trackers": {**self.tracker_ids, **self.metrics.run_ids()},  # a tracker left out for a while keeps its run
            "config": self.config.model_dump(mode="json"),
        }
        model = model_file(self.config.model.description(), encoder_prefix(self.config))
        start = time.perf_counter()
        average = None
        if self.average is not None and self.config.deepspeed.zero_stage == 3:
            average = gather_zero3(self.average, self.engine.module, self.placement.is_main)
        elif self.average is not None:
            average = self.average.state_dict()
        self.checkpoints.save(self.engine, step, trainer_state, self.train_loader.state_dict(), model, average)
        # the store printed where it went; the trackers get how long training waited for it
        self.metrics.write({"kind": "checkpoint", "step": step, "save_s": time.perf_counter() - start})

    def restore(self, tag: str) -> None:
        restored = self.checkpoints.load(self.engine, tag, self.universal, self.weight_decays)
        self.train_loader.load_state_dict(restored.loader_states)
        self.samples_seen = restored.trainer["samples_seen"]
        self.nonfinite_steps = restored.trainer["nonfinite_steps"]
        self.last_eval = restored.trainer.get("last_eval")
        self.end_evaluated_at = restored.trainer.get("end_evaluated_at")
        self.tracker_ids = restored.trainer.get("trackers", {})
        if self.average is not None:
            # a checkpoint without one: optimizer.ema was switched on for the rest of the run
            saved = restored.weight_average
            if saved is not None and self.config.deepspeed.zero_stage == 3:
                saved = partition_zero3(saved, self.engine.module)
            self.average.load_state_dict(saved or self._weights())
            if restored.weight_average is None and self.placement.is_main:
                print(f"{self.checkpoints.url}/{tag} has no weight average; it starts from the resumed weights")
        if self.placement.is_main:
            saved = restored.trainer.get("world_size", self.placement.world_size)
            elsewhere = (
                f" (saved on {saved} ranks; now {self.placement.world_size}, {self.micro_batch} images per rank and "
                f"{self.accumulation} accumulation steps)"
                if saved != self.placement.world_size
                else ""
            )
            print(f"resumed from {self.checkpoints.url}/{tag} at step {restored.step}{elsewhere}", flush=True)
