"""What the demos and experiments share: training runs started as a user starts them, and shards of a chosen list
of images."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_pipeline.build.builder import BuildOptions, build


def deepspeed_command(config: str, overrides: list[str], ranks: int, master_port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS pretrain/run.py --config CONFIG --set ...`, with this environment's launcher (and
    `--master_port`, which jobs that run at the same time need apart)."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    command = [launcher, "--num_gpus", str(ranks)]
    if master_port is not None:
        command += ["--master_port", str(master_port)]
    command += [str(Path(__file__).parents[1] / "run.py"), "--config", config]
    for override in overrides:
        command += ["--set", override]
    return command


def start_training(
    config: str,
    overrides: list[str],
    ranks: int,
    log: Path | None = None,
    master_port: int | None = None,
    threads: int | None = None,
) -> subprocess.Popen:
    """Start the training job; its output goes to `log` (appended) when given, else to ours. `threads` sets each
    rank's OpenMP threads (by default the trainer shares the host's cores between its ranks)."""
    command = deepspeed_command(config, overrides, ranks, master_port)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    shown = f"OMP_NUM_THREADS={threads} " if threads else ""
    print(f"$ {shown}{' '.join(command)}{f' >> {log}' if log else ''}", flush=True)
    if log is None:
        return subprocess.Popen(command, env=environment)
    with open(log, "a") as output:  # the job holds its own copy of the file
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)


def report_failure(code: int, log: Path | None) -> None:
    """The one line a failed job leaves (75 is a preempted one's exit status)."""
    print(f"training exited with {code}{f'; its output is in {log}' if log else ''}", file=sys.stderr, flush=True)


def train(config: str, overrides: list[str], ranks: int, log: Path | None = None) -> None:
    """Run the training job to its end (`start_training`). A failed job stops the caller with one line and the job's
    exit status; an interrupted caller stops the job."""
    job = start_training(config, overrides, ranks, log)
    try:
        code = job.wait()
    except BaseException:
        stop(job)
        raise
    if code != 0:
        report_failure(code, log)
        raise SystemExit(exit_status(code))


def stop(job: subprocess.Popen) -> None:
    """Interrupt the job as Ctrl-C would and wait for its end: the deepspeed launcher passes SIGINT on to its ranks
    (killed, it would leave them running)."""
    job.send_signal(signal.SIGINT)
    job.wait()


def exit_status(code: int) -> int:
    """A job's return code as a shell's exit status: a job ended by signal N (code -N) as 128 + N."""
    return code if code >= 0 else 128 - code


def manifest_shards(rows: Iterable[tuple[str, str | None]], output: Path, **options: Any) -> int:
    """Shards of the images `rows` names ((path, label) pairs), through a manifest CSV beside `output`;
    `options` are build-shards' (`BuildOptions`). Returns the number of samples written."""
    manifest = output.parent / f"{output.name}.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return build(BuildOptions(input=str(manifest), output=str(output), **options)).written_samples
