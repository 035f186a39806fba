"""Checkpoint conversion at full size: peak resident memory of `convert-checkpoint` on H/14 against its fp32 size.

H/14 (632M parameters) is trained for 2 steps on two CPU ranks under ZeRO-2 and ZeRO-3 (bf16, so the checkpoint
holds bf16 module states and fp32 master weights with Adam's moments in partitions), then converted to transformers,
timm and native weights, each conversion in a fresh process whose own peak resident memory `os.wait4` reports.
Baseline measured in the same run: the fp32 model size, and the peak of a process that only imports what the
converter imports. Target: every conversion peaks at <= 3x the fp32 model size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_trainer import LEAN_STAGE3, ROOT, config, train
from pretrain.model import create_model

TARGET = 3.0


def peak_resident_gb(command: list[str]) -> tuple[float, float]:
    """(peak resident memory in GB, seconds) of `command` run to completion; fails on a non-zero exit."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read() if process.stdout else b""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output.decode()[-3000:]}")
    return usage.ru_maxrss * 1024 / 1e9, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ZeRO stages of the checkpoints")
    args = parser.parse_args(argv)
    with torch.device("meta"):
        fp32_gb = sum(p.numel() for p in create_model("H/14", num_classes=1000).parameters()) * 4 / 1e9
    imports, _ = peak_resident_gb([sys.executable, "-c", "import deepspeed, transformers, pretrain.weights.convert"])
    print(
        f"\ncheckpoint conversion, H/14: fp32 size {fp32_gb:.2f} GB; importing the converter alone peaks at "
        f"{imports:.2f} GB; target <= {TARGET:.0f}x the fp32 size"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    met = True
    try:
        for stage in args.stages:
            run_dir = work / f"h14-zero{stage}"
            overrides = LEAN_STAGE3 if stage == 3 else None
            train(run_dir, config(run_dir, "H/14", stage, steps=2, batch=2, overrides=overrides, checkpoint_every=2))
            for target in ("hf", "timm", "native"):
                out = work / f"{target}-zero{stage}"
                command = [
                    sys.executable,
                    "-m",
                    "pretrain.weights.convert",
                    str(run_dir / "checkpoints"),
                    "--to",
                    target,
                    "--keep-head",
                    "--out",
                    str(out),
                ]
                peak, seconds = peak_resident_gb(command)
                ratio = peak / fp32_gb
                met &= ratio <= TARGET
                print(
                    f"  ZeRO-{stage}, 2 ranks -> {target:6s}: peak {peak:5.2f} GB = {ratio:.2f}x fp32 in "
                    f"{seconds:.0f} s: {'met' if ratio <= TARGET else 'MISSED'}"
                )
                shutil.rmtree(out)
            shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
