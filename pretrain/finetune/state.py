"""vit-finetune's checkpoints and preemption: what lets a fine-tune survive a SIGKILL or a scheduler's notice.

A checkpoint is `OUT/checkpoints/step-NNNNNNNN/`: accelerate's `save_state` (the model as safetensors, the optimizer,
every process's RNG states; accelerate reads them back with `weights_only=True`), `loader-rankK.json` with each
process's loader position, `progress.json` (the step, the evaluations so far, the trackers' run ids, the settings)
and with --ema-decay the weight average (safetensors). It is written under a `.partial` name and renamed when
complete, then `latest` names it: a kill at any moment leaves a complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data_pipeline.commands import UserError
from pretrain.train.weight_average import WeightAverage

log = logging.getLogger("finetune")

FOLDER = "checkpoints"
LATEST = "latest"
PROGRESS = "progress.json"
PARTIAL = ".partial"
AVERAGE = "weight_average.safetensors"


class ResumeError(UserError):
    """--resume names nothing to resume from, or would start over a run's checkpoints."""


def checkpoints_of(out: str) -> Path:
    return Path(out) / FOLDER


SETTINGS_A_RESUME_MAY_CHANGE = frozenset(
    {
        "out",
        "resume",
        "steps",
        "num_workers",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "trackers",
        "project",
        "storage_options",
    }
)
"""What may differ between a checkpoint's run and the run resuming it; anything else would silently train another
recipe from the middle of this one."""


def check_same_settings(folder: Path, settings: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse to resume `folder` with settings that change what is trained (one line naming them)."""
    changed = [
        f"--{name.replace('_', '-')} {json.dumps(saved.get(name))} (now {json.dumps(value)})"
        for name, value in settings.items()
        if name not in SETTINGS_A_RESUME_MAY_CHANGE and saved.get(name) != value
    ]
    if changed:
        raise ResumeError(
            f"{folder}: was trained with {', '.join(changed)}; resume with its settings, or choose another --out"
        )


def resolve(out: str, resume: str) -> Path | None:
    """The checkpoint folder `resume` names: auto/latest (the newest, or None to start), none (start; refused where
    checkpoints already are) or a step-NNNNNNNN folder."""
    root = checkpoints_of(out)
    latest = root / LATEST
    if resume in ("auto", "latest"):
        if latest.exists() and (root / latest.read_text().strip() / PROGRESS).exists():
            return root / latest.read_text().strip()
        # `latest` names a step being saved again (a resume from an older one, killed between two renames)
        complete = sorted(folder for folder in root.glob("step-*[0-9]") if (folder / PROGRESS).exists())
        return complete[-1] if complete else None
    if resume == "none":
        if latest.exists():
            raise ResumeError(
                f"{root}: holds the checkpoints of a fine-tune; --resume auto continues it, or choose another --out"
            )
        return None
    if not (root / resume / PROGRESS).exists():
        raise ResumeError(
            f"{root / resume}: no such checkpoint; pass auto, none or a step-NNNNNNNN folder under {root}"
        )
    return root / resume


def save(
    accelerator: Any,
    out: str,
    step: int,
    progress: dict[str, Any],
    loader_state: dict,
    keep: int,
    average: WeightAverage | None = None,
) -> Path:
    """Write the checkpoint of `step` on every process (each adds its loader position; the main process the weight
    average, if any) and make it `latest`."""
    root = checkpoints_of(out)
    final = root / f"step-{step:08d}"
    partial = final.with_name(final.name + PARTIAL)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a kill during an earlier save of this step
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    _write_json(partial / f"loader-rank{accelerator.process_index}.json", loader_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if average is not None:
            save_file(average.state_dict(), partial / AVERAGE)
        _write_json(partial / PROGRESS, {"step": step, **progress})
        replaced = final.with_name(final.name + ".replaced")
        if final.exists():  # this step saved before, by a run resumed from an older checkpoint since
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced, ignore_errors=True)
        _write_text(root / LATEST, final.name)
        # the newest `keep` up to this one; later ones (left by a resume from an older checkpoint) are overwritten
        # as the run gets there, never removed before it does
        for old in sorted(p for p in root.glob("step-*[0-9]") if p.name <= final.name)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, folder: Path, average: WeightAverage | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore the model, optimizer and RNG states of `folder` (and the weight average); returns its progress and
    every process's loader state (the loader takes them all: a checkpoint of another number of processes resumes
    too)."""
    accelerator.load_state(str(folder))
    if average is not None:
        if not (folder / AVERAGE).exists():
            raise ResumeError(f"{folder}: saved without --ema-decay; resume without it, or start afresh with it")
        average.load_state_dict(load_file(folder / AVERAGE))
    progress = json.loads((folder / PROGRESS).read_text())
    loaders = [json.loads(path.read_text()) for path in sorted(folder.glob("loader-rank*.json"))]
    return progress, loaders


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    scratch = path.with_name(path.name + PARTIAL)
    scratch.write_text(text)
    os.replace(scratch, path)


class Preemption:
    """SIGTERM or SIGUSR1 (a scheduler's notice) asks for a checkpoint at the next optimizer step. The processes
    agree through a gloo group on the host, once per optimizer step: no device is waited for, and every process
    stops at the same step even when the signal reached only some."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, processes: int):
        self.requested = False
        self.group = torch.distributed.new_group(backend="gloo") if processes > 1 else None

    def __enter__(self) -> Preemption:
        self.before = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self.before.items():  # a caller's own (pytest's, a notebook's) once the run is over
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.requested:
            log.warning("got signal %d; checkpointing after this optimizer step", signum)
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process was signalled (a collective: every process calls it at every optimizer step)."""
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
