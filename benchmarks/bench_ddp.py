"""The trainer against a plain PyTorch DDP loop: the demo's model, batch and optimizer on two CPU ranks.

Ours: `deepspeed --num_gpus 2 pretrain/run.py --config configs/demo_digits.json` as the demo runs it (ZeRO 2, AdamW
with weight decay, gradient clipping) but in fp32, on `data.train = "synthetic"` (one random batch in memory), its
images/s from metrics.jsonl. The peer: the same `VisionTransformer` in `DistributedDataParallel` over gloo, AdamW
with the same learning rate and decay, the same clipping, a random batch of the same size, and the share of the
cores per rank the trainer gives. fp32 on both sides: a DDP loop's bf16 is `torch.autocast`, which on this CPU runs
the demo model's step 10x slower than fp32 (5.1 against 0.5 s for 64 images on one core), and would flatter us.
Both time the same steps after the same warm-up; each round starts with another of the runs, and the ratio is the
median of the within-round ratios. Target: ours >= 0.95x DDP's images/s. Ours also runs with
`deepspeed.return_freed_host_memory` (off by default), for what that trade of speed for memory costs.

    python -m benchmarks.bench_ddp [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmarks.bench_loader import free_port
from benchmarks.bench_trainer import ROOT, train
from pretrain.model import create_model

DEMO = ROOT / "configs" / "demo_digits.json"
RANKS = 2
WARMUP_STEPS = 20
TIMED_STEPS = 60
TARGET = 0.95


def ours(work: Path, **sections: dict) -> float:
    """images/s of the trainer over the timed steps (the log windows after the warm-up); `sections` are merged into
    the config's sections."""
    settings = json.loads(DEMO.read_text())
    settings["run"] = {**settings["run"], "output_dir": str(work / "ours"), "eval_every_steps": None}
    settings["data"] = {**settings["data"], "train": "synthetic", "val": None}
    settings["schedule"] = {**settings["schedule"], "steps": WARMUP_STEPS + TIMED_STEPS}
    settings["checkpoint"] = {**settings["checkpoint"], "every_steps": 10**6}
    settings["deepspeed"] = {**settings["deepspeed"], "precision": "fp32"}
    settings["logging"] = {**settings["logging"], "every_steps": WARMUP_STEPS}
    for name, values in sections.items():
        settings[name] = {**settings[name], **values}
    records = train(work / "ours", settings)
    timed = [r for r in records if r["step"] > WARMUP_STEPS]
    return sum(r["images_per_s"] * r["step_s"] for r in timed) / sum(r["step_s"] for r in timed)


def _ddp_rank(rank: int, port: int, result: Path) -> None:
    settings = json.loads(DEMO.read_text())
    model_settings = {k: v for k, v in settings["model"].items() if k != "variant"}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // RANKS))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.manual_seed(0)
    model = DistributedDataParallel(create_model(settings["model"]["variant"], **model_settings))
    optimizer_settings = settings["optimizer"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optimizer_settings["lr"], weight_decay=optimizer_settings["weight_decay"]
    )
    micro = settings["data"]["batch_size"] // RANKS
    size = settings["model"]["image_size"]
    images = torch.rand(micro, 3, size, size) * 2 - 1
    labels = torch.randint(0, settings["model"]["num_classes"], (micro,))
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        if step == WARMUP_STEPS:
            dist.barrier()
            start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer_settings["grad_clip_norm"])
        optimizer.step()
    dist.barrier()
    if rank == 0:
        result.write_text(str(TIMED_STEPS * micro * RANKS / (time.perf_counter() - start)))
    dist.destroy_process_group()


def ddp(work: Path) -> float:
    result = work / "ddp.txt"
    mp.spawn(_ddp_rank, args=(free_port(), result), nprocs=RANKS)
    return float(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    runs = {
        "ours": ours,
        "ours, return_freed_host_memory": partial(ours, deepspeed={"return_freed_host_memory": True}),
        "ddp": ddp,
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            names = list(runs)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each round starts elsewhere
                work = Path(folder) / f"{len(rates[name])}-{names.index(name)}"
                work.mkdir()
                rates[name].append(runs[name](work))
    ratios = [a / b for a, b in zip(rates["ours"], rates["ddp"], strict=True)]
    ratio = statistics.median(ratios)
    bounded = statistics.median(
        a / b for a, b in zip(rates["ours, return_freed_host_memory"], rates["ddp"], strict=True)
    )
    print(
        f"\ntrainer vs plain DDP: demo model, batch {json.loads(DEMO.read_text())['data']['batch_size']} on "
        f"{RANKS} CPU ranks, {TIMED_STEPS} steps after {WARMUP_STEPS}, medians of {args.rounds} rounds"
    )
    for name, values in rates.items():
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:32s} {statistics.median(values):8.1f} images/s  ({each})")
    print(f"  ours with return_freed_host_memory / DDP: {bounded:.2f}x (the opt-in trade of speed for resident memory)")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  ours / DDP: {ratio:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET}x): {verdict}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
