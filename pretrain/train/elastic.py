"""Resuming on another number of ranks: DeepSpeed's universal checkpoint format, made once per checkpoint.

ZeRO 1-3 split the optimizer states (and, at stage 3, the weights) into one file per data-parallel rank, and
DeepSpeed refuses to load them on another number of ranks. Its converter (`deepspeed.checkpoint.ds_to_universal`)
rewrites such a checkpoint into one file per parameter (fp32 weights, Adam moments, step) that any number of ranks
can load with the config's `checkpoint.load_universal`. ZeRO 0 keeps whole states in one file and loads on any number
of ranks as it is (DeepSpeed skips its world-size check there, and its universal loader cannot read ZeRO 0 states).

The trainer converts on one process per copy of the checkpoint (rank 0 for a shared folder, each node's first rank
for object storage) into `<checkpoint folder>/universal/<tag>`, outside the `step-*` names, and reuses that copy
when the run is resumed again from the same checkpoint before it saved one of its own (which removes the copy).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from pretrain.weights.safe_load import weights_only_loads

UNIVERSAL = "universal"
"""Sub-folder of the checkpoint folder (or of a node's staging folder) holding converted copies, by tag."""
SOURCE_FILE = "source-trainer.sha256"
"""In a converted copy: the digest of the trainer.json of the checkpoint it was made from."""


def needs_conversion(zero_stage: int, saved_world_size: int | None, world_size: int) -> bool:
    """Whether a checkpoint saved on `saved_world_size` ranks must be converted to be loaded on `world_size`."""
    return zero_stage > 0 and saved_world_size is not None and saved_world_size != world_size


def universal_copy(folder: str, out: str) -> float | None:
    """Convert the DeepSpeed checkpoint in `folder` into the universal format at `out`: the seconds it took, or None
    when `out` is a complete conversion of this very checkpoint (it is renamed into place at the end, with the
    digest of the trainer.json it came from) and is reused. A copy of an earlier checkpoint saved under the same
    step (a run restarted afresh, or from an older checkpoint) is replaced."""
    source = hashlib.sha256(Path(folder, "trainer.json").read_bytes()).hexdigest()
    marker = Path(out, SOURCE_FILE)
    if marker.is_file() and marker.read_text() == source:
        return None
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    for stale in glob.glob(f"{glob.escape(out)}.tmp-*"):  # a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{out}.tmp-{uuid.uuid4().hex}"
    from deepspeed.checkpoint import ds_to_universal  # imported here: it pulls in DeepSpeed's checkpoint readers

    args = argparse.Namespace(
        input_folder=folder,
        output_folder=tmp,
        num_extract_workers=1,  # one process, no pool: the other ranks of the job already use the cores
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # DeepSpeed writes the universal-checkpoint record only for models it splits by tensor parallelism; a
        # purely data-parallel checkpoint holds none and the converter asks for this to add the (empty) record
        inject_missing_state=True,
    )
    # its files are unpickled with weights_only=False: routed through load_trusted like every other load; its
    # per-parameter printing and progress bars replaced by the trainer's one line (its errors are exceptions)
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    Path(tmp, SOURCE_FILE).write_text(source)
    try:
        os.replace(tmp, out)
    except OSError:  # a staging folder shared by nodes (a misconfiguration): another node's copy was first
        if not os.path.isdir(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):  # the converter's pointer to its output: we name tags ourselves
        os.remove(os.path.join(os.path.dirname(out), "latest_universal"))
    return time.perf_counter() - start


def repair_stage3_optimizer(optimizer: Any, weight_decays: list[float]) -> None:
    """Undo two defects of DeepSpeed 0.19's ZeRO-3 universal loader (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3): it gives every parameter group the first group's
    hyperparameters (our no-decay group would decay), and one `step` tensor to every sub-group, which fused AdamW
    then increments once per sub-group and step (wrong bias correction from there on)."""
    inner = optimizer.optimizer
    for group, decay in zip(inner.param_groups, weight_decays, strict=True):
        group["weight_decay"] = decay
    for state in inner.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()
