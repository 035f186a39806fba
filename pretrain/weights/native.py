"""Our own weights folder: `model.safetensors` in our parameter names and `model.json` (pretrain/weights/
model_weights.py), what `model.init_from` starts a run from and the converter reads back. Folders written before
model.json existed hold `vit.json` (the bare architecture) instead; they are still read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_pipeline.storage import filesystem, join
from pretrain.model.description import ModelDescription
from pretrain.weights.model_weights import MODEL_FILE, Weights, WeightsError, model_file, parse_model_file

STATE_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "vit.json"


def is_native(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url.rstrip("/"), storage_options)
    return fs.exists(join(fs, path, STATE_FILE)) and (
        fs.exists(join(fs, path, MODEL_FILE)) or fs.exists(join(fs, path, LEGACY_MODEL_FILE))
    )


def write_native(weights: Weights, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in weights.state.items()}, str(out / STATE_FILE))
    (out / MODEL_FILE).write_text(json.dumps(model_file(weights.model), indent=2) + "\n")


def read_native_state(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    fs, path = filesystem(url.rstrip("/"), storage_options)
    try:
        return load(fs.cat_file(join(fs, path, STATE_FILE)))
    except SafetensorError as error:
        raise WeightsError(f"{url}/{STATE_FILE}: not a safetensors file ({error}); is it damaged?") from None


def read_native(url: str, storage_options: dict[str, Any] | None = None) -> Weights:
    fs, path = filesystem(url.rstrip("/"), storage_options)
    try:
        if fs.exists(join(fs, path, MODEL_FILE)):
            model, _ = parse_model_file(json.loads(fs.cat_file(join(fs, path, MODEL_FILE))), url)
        else:
            model = ModelDescription.from_json(json.loads(fs.cat_file(join(fs, path, LEGACY_MODEL_FILE))))
    except (json.JSONDecodeError, TypeError) as error:
        raise WeightsError(f"{url}: its model description is unreadable ({error}); is the folder damaged?") from None
    return Weights(model, read_native_state(url, storage_options))
