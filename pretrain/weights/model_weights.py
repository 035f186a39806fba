"""Weights as every format reader returns them and every writer takes them, and the `model.json` that describes them.

`model.json` sits in every trainer checkpoint's step folder and in every native weights folder:

    {"format_version": 1, "model": {<ModelDescription>}, "encoder_prefix": "encoder."}

`model` is the architecture of the ViT the weights hold; `encoder_prefix` is the prefix of that ViT's tensors in the
saved state dict ("" for a classifier, "encoder." for a masked-patch model, whose [mask] token and patch head are
not part of the ViT). Conversion, `model.init_from`, analysis and few-shot read only this file, never the run
config, so a checkpoint stays readable when the config's schema changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.commands import UserError
from pretrain.config.schema import Config, MaskedPatchObjective
from pretrain.model.description import ModelDescription

MODEL_FILE = "model.json"
MODEL_FORMAT_VERSION = 1
"""Version of `model.json`; a reader refuses a file of a newer version than its own."""


class WeightsError(UserError):
    """Weights cannot be read, checked or written as asked; the message names the source and what to pass instead."""


@dataclass(frozen=True)
class Weights:
    """A ViT's fp32 state dict in our parameter names (timm's) and the architecture that holds it."""

    model: ModelDescription
    state: dict[str, torch.Tensor]


def encoder_prefix(config: Config) -> str:
    """Where the ViT's tensors are in the state dict of the module a run trains (see `pretrain.objectives`)."""
    return "encoder." if isinstance(config.objective, MaskedPatchObjective) else ""


def model_file(model: ModelDescription, prefix: str = "") -> dict[str, Any]:
    """The content of `model.json`."""
    return {"format_version": MODEL_FORMAT_VERSION, "model": model.to_json(), "encoder_prefix": prefix}


def parse_model_file(data: Any, source: str) -> tuple[ModelDescription, str]:
    """(architecture, encoder prefix) from the parsed `model.json` of `source`."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise WeightsError(f'{source}/{MODEL_FILE}: not a model description (no "model" object); is it damaged?')
    version = data.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise WeightsError(
            f"{source}/{MODEL_FILE}: format_version {version!r}, this code reads up to "
            f"{MODEL_FORMAT_VERSION}; update vit-pretrain to read it"
        )
    try:
        model = ModelDescription.from_json(data["model"])
    except TypeError as error:
        raise WeightsError(f"{source}/{MODEL_FILE}: {error}; is it damaged?") from None
    return model, str(data.get("encoder_prefix", ""))


def vit_weights(model: ModelDescription, state: dict[str, torch.Tensor], prefix: str) -> Weights:
    """The ViT's tensors of a trained module's state dict, under our names."""
    if prefix:
        state = {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}
    return Weights(model, state)


def weights_of_run(config: Config, state: dict[str, torch.Tensor]) -> Weights:
    """The ViT of a run's trained module: what a checkpoint's model.json says, from the run config itself."""
    return vit_weights(config.model.description(), state, encoder_prefix(config))
