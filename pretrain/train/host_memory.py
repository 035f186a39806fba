"""Keep large host allocations in their own mappings, so that freeing them gives the memory back.

DeepSpeed allocates and frees big host buffers every step (gathered ZeRO-3 parameters, gradient buckets, optimizer
temporaries). glibc serves blocks above its mmap threshold with mmap and returns them on free, but it raises that
threshold (up to 32 MiB) after the first large free, and from then on such blocks come from the heap, which it
rarely trims. Resident memory then grows by gigabytes over the first steps (measured on L/16 under ZeRO-3 on two
CPU ranks: 5.4 GB steady and 6.7 GB peak per rank, against 3.3 GB and 3.7 GB with a fixed threshold; BENCHMARKS.md).
Fixing the threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops the adjustment) avoids it. Image-sized blocks
stay below the threshold, so the data path keeps using the heap.

It is not free: every block above the threshold is a fresh mapping whose pages fault in on first touch, and on the
CPU activations are such blocks. The demo model on two CPU ranks trains at 105 images/s with the threshold and 161
without (0.65x; THP-backed allocations gave 114): so it is opt-in, `deepspeed.return_freed_host_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold for this process (and the workers it forks); False where glibc is absent."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
