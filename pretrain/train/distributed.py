"""Process-group set-up that works the same under `deepspeed`, `torchrun` and `srun`, plus the few collectives the
trainer needs outside DeepSpeed.

The deepspeed launcher and torchrun export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Under `srun`
(one task per device) only Slurm's variables exist, so they are mapped: SLURM_PROCID -> RANK, SLURM_LOCALID ->
LOCAL_RANK, SLURM_NTASKS -> WORLD_SIZE, SLURM_NTASKS_PER_NODE -> LOCAL_WORLD_SIZE, the first host of
SLURM_JOB_NODELIST -> MASTER_ADDR.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Placement:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-010,017],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def map_slurm_environment(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Fill the torch.distributed variables from Slurm's when a launcher did not set them."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", ""))  # "4" or "4(x2)"
    if per_node:
        env["LOCAL_WORLD_SIZE"] = per_node.group(0)
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
    env.setdefault("MASTER_PORT", str(DEFAULT_PORT))


def init() -> Placement:
    """Join (or, for a plain `python run.py`, create) the process group on the accelerator's backend."""
    map_slurm_environment()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        share_cores_between_local_ranks()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
    if accelerator.device_name() == "cpu":
        dist.barrier()  # every rank has now mapped every other rank's all-reduce buffer
        unlink_shm_allreduce_buffer(dist.get_rank())
    return Placement(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())


def shutdown() -> None:
    """Destroy the process group before the interpreter exits.

    Left to interpreter finalization, gloo's worker threads are still running while the interpreter is torn down, and
    the process aborts after its work is done ("terminate called without an active exception", SIGABRT, exit -6),
    which the launcher reports as a failed job: 9 of 30 two-rank torchrun runs of a small gloo script here, 0 of 30
    with this call. DeepSpeed keeps its own handles on the destroyed groups (its clone of the world group): they are
    dropped too, so that a later run in the same process (a notebook, the tests) builds new ones, and collected here,
    where gloo's threads still run: left in a reference cycle, a group was destroyed by the garbage collector of a
    data worker forked by the next run, which then waited forever for threads the fork had not copied (a hung test).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    gc.collect()


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove the name of this rank's /dev/shm all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU all-reduce (its shm comm op, DeepSpeed 0.19) creates one buffer per rank in /dev/shm and never
    unlinks it, so every CPU run left about 50 MB per rank of RAM behind for good (19 GB after a day of test runs
    here, enough to starve the machine). The mappings stay valid without the name, and the memory returns to the
    system when the ranks exit, even when they are killed.
    """
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def share_cores_between_local_ranks() -> None:
    """CPU ranks: give each rank of this host its share of the cores.

    torch starts one thread per core in every process, so N ranks on one host oversubscribe the cores N-fold, and
    OpenMP's spinning threads then make steps up to 4x slower at random (measured with 2 ranks on 2 cores). The
    deepspeed launcher only splits cores with --bind_cores_to_rank (and numactl); torchrun not at all.
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def all_true(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    value = torch.tensor([0.0 if flag else 1.0], device=device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() == 0.0


def wait_for(done: Callable[[], bool], max_interval: float = 1.0) -> None:
    """Wait until `done()` is true on every rank, asking all of them again after 50 ms, doubled up to `max_interval`
    seconds. For work that takes some ranks minutes (an upload, a download, a conversion): a rank blocked in one
    collective that long would be aborted by the process group's timeout (DeepSpeed's default: 10 minutes), short
    collectives are not. The first waits are short because most such work takes well under a second (a small
    checkpoint's upload), which a fixed 1 s interval rounded up to a second every time."""
    interval = 0.05
    while not all_true(done()):
        time.sleep(interval)
        interval = min(2 * interval, max_interval)


def any_of(flags: list[bool | torch.Tensor]) -> list[bool]:
    """For each flag, whether it is true on any rank: several questions in one collective and one read of the
    answers. A flag may be a tensor on the device (a loss that is not finite): it joins the collective where it is,
    so the answers are the only thing the host waits for."""
    values = torch.stack([torch.as_tensor(flag, device=device()).reshape(()).float() for flag in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [value == 1.0 for value in values.tolist()]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def replica_digests(module: torch.nn.Module) -> list[str]:
    """Every rank's sha256 of its copy of the parameters, gathered on all ranks. Data-parallel replicas (ZeRO 0-2)
    must hold the same bytes, on every node; a difference means the ranks diverged (a non-deterministic collective,
    a rank that skipped a step) and the run's weights depend on which rank saved them."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return digests
