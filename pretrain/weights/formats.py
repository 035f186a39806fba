"""One read/write interface over every weights format: `read_weights` recognises the source, `WRITERS` write one.

| format             | read from                                              | module                |
| ------------------ | ------------------------------------------------------ | --------------------- |
| trainer checkpoint | its root (newest checkpoint) or a step-XXXXXXXX folder | trainer_checkpoint.py |
| native             | a folder with model.safetensors and model.json         | native.py             |
| timm               | a state dict file, or a folder with timm's config.json | timm.py               |
| transformers (hf)  | a save_pretrained folder                               | hf.py                 |
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain.weights.hf import from_hf, write_hf
from pretrain.weights.model_weights import Weights
from pretrain.weights.native import is_native, read_native, read_native_state, write_native
from pretrain.weights.timm import from_timm, write_timm
from pretrain.weights.trainer_checkpoint import pinned_checkpoint, read_checkpoint, read_state, read_trainer_record

WRITERS: dict[str, Callable[[Weights, Path], None]] = {"hf": write_hf, "timm": write_timm, "native": write_native}


def source_format(source: str, storage_options: dict[str, Any] | None = None) -> str:
    """Which format `source` is in: "timm", "native", "hf" or "trainer" (a trainer checkpoint, the fallback)."""
    location = Path(source)
    if location.is_file():
        return "timm"
    if is_native(source, storage_options):
        return "native"
    if (location / "config.json").is_file():
        return "hf" if "model_type" in json.loads((location / "config.json").read_text()) else "timm"
    return "trainer"


def read_weights(source: str, storage_options: dict[str, Any] | None = None, weights: str | None = None) -> Weights:
    """Weights from a native folder, a transformers folder, a timm folder or file, or a trainer checkpoint (its
    weight average or raw weights: see `read_checkpoint`)."""
    readers: dict[str, Callable[[], Weights]] = {
        "timm": lambda: from_timm(source),
        "native": lambda: read_native(source, storage_options),
        "hf": lambda: from_hf(source),
        "trainer": lambda: read_checkpoint(source, storage_options, weights),
    }
    return readers[source_format(source, storage_options)]()


def pinned(source: str, storage_options: dict[str, Any] | None = None) -> str:
    """`source`, with a trainer checkpoint root replaced by its newest step folder (see `pinned_checkpoint`)."""
    return pinned_checkpoint(source, storage_options) if source_format(source, storage_options) == "trainer" else source


def training_record(source: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The trainer.json of a trainer checkpoint (step, samples seen, last evaluation, run config); None for the
    other formats, which do not record how the weights were trained."""
    return read_trainer_record(source, storage_options) if source_format(source, storage_options) == "trainer" else None


def read_init_state(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """What `model.init_from` loads by name: a native folder's tensors, or the whole trained module of a trainer
    checkpoint (a masked-patch model's [mask] token and head included, for continuing that objective)."""
    if is_native(url, storage_options):
        return read_native_state(url, storage_options)
    return read_state(url, storage_options)
