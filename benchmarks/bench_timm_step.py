"""Our ViT-B/16 training step against timm's `vit_base_patch16_224`, the same work in one process.

B/16 at 224 px, batch 8, fp32 on the accelerator (the CPU here), 1000 classes, AdamW, no dropout; both eager, timed
over the steps after the warm-up (bench_compile's `step_rate`). Rounds alternate which model runs first; the ratio is
the median of the within-round ratios. Target (kept from earlier measurements): ours >= 1.0x timm's.

    python -m benchmarks.bench_timm_step [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import timm
import torch
from torch import nn

from benchmarks.bench_compile import BATCH, TIMED_STEPS, WARMUP_STEPS, b16, step_rate

TARGET = 1.0


def timm_b16() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", num_classes=1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    makers = {"ours": lambda: b16(compiled=False), "timm": timm_b16}
    rates: dict[str, list[float]] = {name: [] for name in makers}
    for round_ in range(args.rounds):
        for name in list(makers) if round_ % 2 == 0 else list(reversed(makers)):
            rates[name].append(step_rate(makers[name]())[0])
    ratios = [ours / theirs for ours, theirs in zip(rates["ours"], rates["timm"], strict=True)]
    ratio = statistics.median(ratios)
    print(f"\nB/16 training step, 224 px, batch {BATCH}, fp32, one process; {TIMED_STEPS} steps after {WARMUP_STEPS}")
    for name, values in rates.items():
        print(f"  {name:5s} {statistics.median(values):6.2f} images/s (" + ", ".join(f"{r:.2f}" for r in values) + ")")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  ours / timm: {ratio:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET}x): {verdict}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
