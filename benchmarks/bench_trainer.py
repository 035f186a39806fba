"""The trainer on two CPU ranks, launched as users launch it (`deepspeed --num_gpus 2 pretrain/run.py`).

1. Memory: peak resident memory per rank of L/16 at 224 px, 2 steps, bf16, the same configuration under ZeRO-0 and
   ZeRO-3 (with the lean stage-3 buckets the trainer sets, and a smaller sub-group). Target: ZeRO-3 <= 0.65x ZeRO-0.
   Beside it, vit-plan's prediction of the growth from Ti/16 to L/16 against the measured one.
2. Input pipeline cost: images/s of the same model and batch with data streamed from S3 (moto in its own process,
   JPEG shards, one loader worker per rank) against one random batch served from memory. Target: >= 0.95x.
3. Scale check: H/14 at full size (632M parameters), 224 px, ZeRO-3, 2 steps and a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_loader import build_shards, free_port, moto_server
from pretrain.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LEAN_STAGE3 = {
    "zero_optimization": {
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 1e7,
        "reduce_bucket_size": 1e7,
        "sub_group_size": 1e7,
        "stage3_param_persistence_threshold": 1e4,
    }
}


def config(
    run_dir: Path,
    variant: str,
    stage: int,
    steps: int,
    batch: int,
    train: str = "synthetic",
    storage_options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    checkpoint_every: int = 10**6,
    num_classes: int = 1000,
) -> dict[str, Any]:
    return {
        "run": {"name": run_dir.name, "output_dir": str(run_dir), "seed": 0},
        "model": {"variant": variant, "image_size": 224, "num_classes": num_classes},
        "data": {"train": train, "batch_size": batch, "num_workers": 1, "storage_options": storage_options or {}},
        "optimizer": {"lr": 1e-4, "weight_decay": 0.05},
        "schedule": {"steps": steps, "warmup_steps": 1, "decay": "cosine"},
        # resident memory that follows what is live: the memory figures compare it with the plan
        "deepspeed": {
            "zero_stage": stage,
            "precision": "bf16",
            "return_freed_host_memory": True,
            "overrides": overrides or {},
        },
        "checkpoint": {"every_steps": checkpoint_every, "keep_last": 1},
        "logging": {"every_steps": 1, "trackers": []},
    }


def train(run_dir: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the trainer on 2 CPU ranks; the training records of metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(json.dumps(settings))
    command = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "pretrain" / "run.py"),
        "--config",
        str(path),
        "--resume",
        "none",
    ]
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        raise RuntimeError(f"{run_dir.name}: trainer exited {result.returncode}:\n{result.stdout[-3000:]}")
    return read_metrics(run_dir, "train")


def planned_peak_gb(settings: dict[str, Any]) -> float:
    """vit-plan's peak memory per GPU for a run on these 2 ranks, without headroom."""
    from pretrain.config.load import validate
    from pretrain.plan.planner import DataFacts, Hardware, make_plan

    hardware = Hardware(gpus=2, gpus_per_node=2, name="CPU", peak_tflops=1.0, memory_gb=1e3, mfu=0.5)
    plan = make_plan(validate(settings), hardware, DataFacts(None, None, "synthetic"), headroom=0.0)
    return plan["memory"]["stages"][settings["deepspeed"]["zero_stage"]]["peak_gb"]


def memory(work: Path) -> bool:
    peaks, growth = {}, {}
    for stage in (0, 3):
        overrides = LEAN_STAGE3 if stage == 3 else None
        runs = {
            variant: config(work / f"{variant[0]}-zero{stage}", variant, stage, steps=2, batch=4, overrides=overrides)
            for variant in ("Ti/16", "L/16")
        }
        measured = {
            variant: train(Path(settings["run"]["output_dir"]), settings)[-1]["memory_gb"]
            for variant, settings in runs.items()
        }
        planned = {variant: planned_peak_gb(settings) for variant, settings in runs.items()}
        peaks[stage] = measured["L/16"]
        # the process's own memory (Python, torch, DeepSpeed, gloo) cancels in the growth from Ti/16 to L/16
        growth[stage] = (measured["L/16"] - measured["Ti/16"], planned["L/16"] - planned["Ti/16"])
    ratio = peaks[3] / peaks[0]
    print(
        f"  L/16, 224 px, bf16, batch 2 per rank, 2 steps: peak resident memory per rank "
        f"ZeRO-0 {peaks[0]:.2f} GB, ZeRO-3 {peaks[3]:.2f} GB: {ratio:.2f}x (target <= 0.65x): "
        f"{'met' if ratio <= 0.65 else 'MISSED'}"
    )
    for stage, (measured_gb, planned_gb) in growth.items():
        print(
            f"  vit-plan, ZeRO-{stage}: growth from Ti/16 to L/16 measured {measured_gb:.2f} GB, planned "
            f"{planned_gb:.2f} GB: {planned_gb / measured_gb:.2f}x"
        )
    return ratio <= 0.65


def streaming(work: Path, images: int) -> bool:
    import s3fs

    shards = build_shards(work / "corpus", images)
    rates = {}
    with moto_server() as endpoint:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(shards) + "/", "bench/shards/", recursive=True)
        for source in ("synthetic", "s3://bench/shards/index.json"):
            name = "s3" if source.startswith("s3") else "synthetic"
            records = train(
                work / f"ti16-{name}",
                config(
                    work / f"ti16-{name}",
                    "Ti/16",
                    0,
                    steps=40,
                    batch=32,
                    train=source,
                    storage_options={"endpoint_url": endpoint},
                    num_classes=10,
                ),
            )
            steady = records[8:]  # after start-up: the first steps pay for allocation and the first shards
            rates[name] = sum(r["images_per_s"] for r in steady) / len(steady)
            waits = sum(r["data_wait"] for r in steady) / len(steady)
            print(
                f"  Ti/16, 224 px, batch 16 per rank, data {name:9s}: {rates[name]:6.1f} images/s, "
                f"waiting for data {waits:.1%}"
            )
    ratio = rates["s3"] / rates["synthetic"]
    print(f"  streamed from S3 / in memory: {ratio:.2f}x (target >= 0.95x): {'met' if ratio >= 0.95 else 'MISSED'}")
    return ratio >= 0.95


def scale_check(work: Path) -> bool:
    start = time.perf_counter()
    run_dir = work / "h14-zero3"
    records = train(run_dir, config(run_dir, "H/14", 3, steps=2, batch=2, overrides=LEAN_STAGE3, checkpoint_every=2))
    saved = (run_dir / "checkpoints" / "latest").read_text()
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / saved).rglob("*") if f.is_file())
    print(
        f"  H/14 (632M parameters), 224 px, ZeRO-3, 2 ranks: 2 steps, loss {records[-1]['loss']:.3f}, peak "
        f"{records[-1]['memory_gb']:.1f} GB per rank, checkpoint {saved} ({size / 1e9:.1f} GB) in "
        f"{time.perf_counter() - start:.0f} s"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="JPEGs in the streamed shards")
    parser.add_argument("--only", choices=["memory", "streaming", "scale"], help="run one part")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    print("\ntrainer (2 CPU ranks, deepspeed launcher):")
    try:
        parts = {
            "memory": lambda: memory(work),
            "streaming": lambda: streaming(work, args.images),
            "scale": lambda: scale_check(work),
        }
        met = [run() for name, run in parts.items() if args.only in (None, name)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
