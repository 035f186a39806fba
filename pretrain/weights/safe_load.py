"""The one way checkpoint files are unpickled: `torch.load(weights_only=True)`, allowing only the few DeepSpeed classes
its files hold, so a tampered checkpoint cannot run code.

DeepSpeed loads its own files with `torch.load(weights_only=False)`, in the places we use: its engine's checkpoint
engine (resume: module states, optimizer partitions), `zero_to_fp32` (conversion), and the universal-checkpoint
converter and loader (resume on another number of ranks). The trainer routes the engine's loads through
`load_trusted` with `guard_engine_loads`; the others call `torch.load` directly and run inside
`weights_only_loads()`. A refused file gives one line naming it.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pretrain.weights.model_weights import WeightsError

DEEPSPEED_CHECKPOINT_TYPES = [LossScaler, ZeroStageEnum, fragment_address]
"""The only non-tensor classes DeepSpeed's model and optimizer state files contain (DeepSpeed 0.19)."""
_torch_load = torch.load
"""torch.load itself: `weights_only_loads` replaces the module attribute, which is what DeepSpeed's modules call."""


class UntrustedCheckpointError(WeightsError):
    """A checkpoint file holds something other than tensors and DeepSpeed's plain records: refused, not run."""


def load_trusted(path: str, map_location: Any = "cpu", **options: Any) -> Any:
    """`torch.load` of a checkpoint file that cannot execute code; raises UntrustedCheckpointError naming it."""
    options["weights_only"] = True
    try:
        with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_TYPES):
            return _torch_load(path, map_location=map_location, **options)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UntrustedCheckpointError(
            f"{path}: refused to load: not a checkpoint file of tensors ({type(error).__name__}: {reason}); it is "
            "damaged or was tampered with: use another checkpoint (one of its step-XXXXXXXX folders)"
        ) from None


def guard_engine_loads(engine: Any) -> None:
    """Route every file a DeepSpeed engine loads on resume through `load_trusted`, whichever checkpoint engine
    (torch, fast, decoupled writers) its config chose; saving is untouched."""
    engine.checkpoint_engine.load = lambda path, map_location=None: load_trusted(path, map_location)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside it, every `torch.load` of this process (DeepSpeed's zero_to_fp32, its universal-checkpoint converter
    and loader) goes through `load_trusted`."""
    torch.load = load_trusted
    try:
        yield
    finally:
        torch.load = _torch_load
