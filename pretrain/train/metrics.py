"""What a run reports: `metrics.jsonl` in the run folder, DeepSpeed's monitors (TensorBoard, CSV), the trackers
(W&B, MLflow), one console line per log step; and the numbers behind them (throughput, time waiting for data,
TFLOP/s, MFU, memory)."""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

from pretrain.plan.gpus import spec_for_device
from pretrain.train.trackers import Tracker, numbers

log = logging.getLogger(__name__)


def measure_matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """TFLOP/s of a square matmul in `dtype` on this process's device: the CPU's peak for MFU, measured at start."""
    device = torch.device(get_accelerator().current_device_name())
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    get_accelerator().synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def device_peak_tflops(dtype: torch.dtype) -> float:
    """Peak dense TFLOP/s of this process's device for MFU and the predicted step time: the datasheet's for a GPU in
    the table (pretrain/plan/gpus.py) training in bf16/fp16, else a matmul measured now (the CPU, fp32, other GPUs)."""
    # DeepSpeed's accelerators do not report the product name; torch.cuda does, for NVIDIA and ROCm builds alike
    if get_accelerator().device_name() == "cuda" and dtype in (torch.bfloat16, torch.float16):
        spec = spec_for_device(torch.cuda.get_device_name())
        if spec is not None:
            return spec.bf16_tflops
    return measure_matmul_peak(dtype)


def memory_bytes() -> int:
    """Peak device memory on an accelerator; peak resident memory of this process on the CPU."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return int(accelerator.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepTimer:
    """Wall time of the steps since the last report, and the part of it spent waiting for the next batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.waiting = 0.0
        self.images = 0
        self.steps = 0

    def waited(self, seconds: float, images: int) -> None:
        self.waiting += seconds
        self.images += images

    def stepped(self) -> None:
        self.steps += 1

    def report(self) -> tuple[float, float, float]:
        """(seconds per optimizer step, images per second on this rank, share of time waiting for data)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed / max(self.steps, 1), self.images / elapsed, self.waiting / elapsed


METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run folder's metrics.jsonl, oldest first; only those of `kind` ("train", "eval",
    "fewshot", "replicas") when given."""
    with open(os.path.join(run_dir, METRICS_FILE)) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [record for record in records if kind is None or record.get("kind", "train") == kind]


class MetricsLog:
    """Rank 0 writes metrics.jsonl, DeepSpeed's monitors and the trackers (trackers.py); the other ranks only take
    part in the collectives that produce the numbers."""

    def __init__(self, output_dir: str, engine: Any, enabled: bool, trackers: list[Tracker]):
        self.enabled = enabled
        self.engine = engine
        self.trackers = trackers
        self.path = os.path.join(output_dir, METRICS_FILE)
        if enabled:
            os.makedirs(output_dir, exist_ok=True)

    def write(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        values, step = numbers(record), record["step"]
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            monitor.write_events([(name, value, step) for name, value in values.items()])
        for tracker in self.trackers:
            try:
                tracker.log(values, step)
            except Exception as error:  # a tracker's outage must not stop a training run: metrics.jsonl has it all
                log.warning("%s: could not log step %d (%s: %s)", tracker.name, step, type(error).__name__, error)
        if console:
            print(console, flush=True)

    def run_ids(self) -> dict[str, str]:
        """The trackers' runs, saved with each checkpoint so that a resumed run continues them."""
        return {tracker.name: tracker.run_id for tracker in self.trackers}

    def close(self, finished: bool) -> None:
        for tracker in self.trackers:
            tracker.close(finished)


def train_line(record: dict[str, Any], total_steps: int) -> str:
    grad = f"{record['grad_norm']:.3g}" if record.get("grad_norm") is not None else "-"
    return (
        f"step {record['step']}/{total_steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.3g} | grad {grad} | {record['images_per_s']:.1f} img/s | "
        f"data {record['data_wait']:.0%} | step {record['step_s']:.3g} s (plan {record['predicted_step_s']:.3g} s)"
        f" | {record['tflops']:.3g} TFLOP/s | MFU {record['mfu']:.1%} | "
        f"mem {record['memory_gb']:.2f} GB"
    )
