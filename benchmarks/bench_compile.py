"""torch.compile against eager: a ViT-B/16 training step in one process, and the trainer with `model.compile`.

1. B/16 at 224 px, batch 8, fp32, AdamW, on the accelerator DeepSpeed finds (the CPU here): the same model compiled
   (`torch.compile`, inductor) and eager, in one process, each timed over the steps after its warm-up (the compiled
   model's first step compiles it; that time is reported). Rounds alternate which runs first; the ratio is the
   median of the within-round ratios. Target: compiled >= 1.1x eager. `--precision bf16` runs both under bf16
   autocast (the matrix products in bf16, as a GPU run trains), `--mode` passes a torch.compile mode (e.g.
   max-autotune-no-cudagraphs; on the CPU inductor's own GEMM kernels apply to constant weights only, so in a
   training step the matrix products stay aten's). On a GPU, where the target is meant to be checked, pass the
   run's per-GPU batch with `--batch`.
2. The trainer on two CPU ranks (`deepspeed --num_gpus 2 pretrain/run.py`), the demo's config on synthetic data in
   fp32 (bench_ddp's settings), with and without `model.compile` in the default mode (whatever the options of 1):
   images/s after the warm-up, side by side.

    python -m benchmarks.bench_compile [--rounds 2] [--precision fp32|bf16] [--mode MODE] [--batch 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch import nn

from benchmarks.bench_ddp import ours
from pretrain.model import create_model

BATCH = 8
WARMUP_STEPS = 2
TIMED_STEPS = 5
TARGET = 1.1


def step_rate(model: nn.Module, precision: str = "fp32", batch: int = BATCH) -> tuple[float, float]:
    """(images/s over the timed steps, seconds of the first step) of training `model` (1000 classes at 224 px) with
    AdamW in this process, on the accelerator; with bf16, the forward under bf16 autocast."""
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None

    def step() -> None:
        with autocast or contextlib.nullcontext():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    accelerator.synchronize()  # a GPU queues the kernels; the clock must wait for them
    first = time.perf_counter() - start
    for _ in range(WARMUP_STEPS - 1):
        step()
    accelerator.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    accelerator.synchronize()
    return TIMED_STEPS * batch / (time.perf_counter() - start), first


def b16(compiled: bool, mode: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("B/16", num_classes=1000)
    if compiled:
        model.compile(mode=mode)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--mode", default=None, help="a torch.compile mode; default: inductor's default")
    parser.add_argument("--batch", type=int, default=BATCH, help="images per step (on a GPU: the run's per-GPU batch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    first_steps: dict[str, list[float]] = {"eager": [], "compiled": []}
    for round_ in range(args.rounds):
        for name in ("eager", "compiled") if round_ % 2 == 0 else ("compiled", "eager"):
            torch._dynamo.reset()  # every round compiles afresh
            rate, first = step_rate(b16(name == "compiled", args.mode), args.precision, args.batch)
            rates[name].append(rate)
            first_steps[name].append(first)
    ratios = [c / e for c, e in zip(rates["compiled"], rates["eager"], strict=True)]
    ratio = statistics.median(ratios)
    mode = f", compile mode {args.mode}" if args.mode else ""
    print(
        f"\nB/16 training step, 224 px, batch {args.batch}, {args.precision}{mode}, one process on "
        f"{get_accelerator().device_name()}; {TIMED_STEPS} steps after {WARMUP_STEPS}"
    )
    for name in rates:
        print(
            f"  {name:8s} {statistics.median(rates[name]):6.2f} images/s  first step "
            f"{statistics.median(first_steps[name]):6.1f} s  (" + ", ".join(f"{r:.2f}" for r in rates[name]) + ")"
        )
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  compiled / eager: {ratio:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET}x): {verdict}")

    trainer = {}
    with tempfile.TemporaryDirectory() as folder:
        for compiled in (False, True):
            work = Path(folder) / f"compile-{compiled}"
            work.mkdir()
            trainer[compiled] = ours(work, model={"compile": compiled})
    print(
        f"  trainer, demo model on 2 ranks (fp32, default compile mode): eager {trainer[False]:.1f}, "
        f"compiled {trainer[True]:.1f} images/s "
        f"({trainer[True] / trainer[False]:.2f}x)"
    )
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
