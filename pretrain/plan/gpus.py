"""Datasheet numbers of common training GPUs: dense bf16 tensor-core peak and memory, for planning and for MFU.

Peaks are the vendors' dense figures (the sparse "2:4" numbers are twice these and never reached by training).
Memory is the datasheet capacity in GB (1e9 bytes); the device reports a little more in GiB, so planning against
it errs on the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.commands import UserError

DEFAULT_HEADROOM = 0.1
"""Share of a GPU's memory a plan leaves free for the CUDA context, NCCL, fragmentation and the estimate's error."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    memory_gb: float
    """Device memory, GB (1e9 bytes)."""
    device_names: tuple[str, ...]
    """Lower-case substrings that all appear in the name the driver reports (torch.cuda.get_device_name)."""


# Order matters for matching device names: the more specific entry of a family comes first.
GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("A100-40GB", 312.0, 40.0, ("a100", "40gb")),
    GpuSpec("A100-80GB", 312.0, 80.0, ("a100",)),
    GpuSpec("H100-PCIe", 756.0, 80.0, ("h100", "pcie")),
    GpuSpec("H100-NVL", 835.5, 94.0, ("h100", "nvl")),
    GpuSpec("H100", 989.4, 80.0, ("h100",)),
    GpuSpec("H200-NVL", 835.5, 141.0, ("h200", "nvl")),
    GpuSpec("H200", 989.4, 141.0, ("h200",)),
    GpuSpec("B200", 2250.0, 180.0, ("b200",)),
    GpuSpec("MI300X", 1307.4, 192.0, ("mi300x",)),
)


class UnknownGpuError(UserError):
    """A GPU type that is not in the table; the message lists the known ones."""


def gpu_spec(name: str) -> GpuSpec:
    """The table entry called `name` (case-insensitive)."""
    for spec in GPUS:
        if spec.name.lower() == name.lower():
            return spec
    known = ", ".join(spec.name for spec in GPUS)
    raise UnknownGpuError(f"unknown GPU type {name!r}; use one of {known}, or give --peak-tflops and --gpu-memory-gb")


def spec_for_device(device_name: str) -> GpuSpec | None:
    """The entry for a driver-reported name such as "NVIDIA H100 80GB HBM3"; None for a device not in the table."""
    lowered = device_name.lower()
    for spec in GPUS:
        if all(part in lowered for part in spec.device_names):
            return spec
    return None
