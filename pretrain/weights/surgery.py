"""Surgery on weights between formats and runs: which classifier they carry, position embeddings for another
resolution, refusing tensors that do not fit the model, and loading by name into a model being trained."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from pretrain.model.pos_embed import resize_pos_embed
from pretrain.weights.model_weights import Weights, WeightsError

log = logging.getLogger(__name__)


def choose_head(
    weights: Weights, *, keep_head: bool = False, num_classes: int | None = None, drop_representation: bool = False
) -> Weights:
    """The classifier the weights carry: the trained one (`keep_head`), a new zero-initialised `num_classes` one
    (the paper's fine-tuning head), or none at all (the default: fine-tuning replaces the pre-training head).
    `drop_representation` removes the pre-logits layer, as the paper does before fine-tuning."""
    if keep_head and num_classes is not None:
        raise WeightsError(
            "--keep-head and --num-classes exclude each other: keep the trained classifier or start a new one"
        )
    model, state = weights.model, dict(weights.state)
    if keep_head and not model.num_classes:
        raise WeightsError(
            "these weights have no classifier to keep (a masked-patch checkpoint, or num_classes 0); "
            "drop --keep-head, or add --num-classes K for a new zero-initialised one"
        )
    if drop_representation and model.representation_size:
        if keep_head:
            raise WeightsError(
                "the trained classifier reads the representation layer, so it cannot be kept without "
                "it: drop --keep-head (or --drop-representation)"
            )
        state = {name: tensor for name, tensor in state.items() if not name.startswith("pre_logits.")}
        model = model.replace(representation_size=None)
    if not keep_head:
        state = {name: tensor for name, tensor in state.items() if not name.startswith("head.")}
        model = model.replace(num_classes=0)
    if num_classes is not None:
        fan_in = model.representation_size or model.width
        state["head.weight"] = torch.zeros(num_classes, fan_in)
        state["head.bias"] = torch.zeros(num_classes)
        model = model.replace(num_classes=num_classes)
    return Weights(model, state)


def resize_positions(weights: Weights, image_size: int) -> Weights:
    """Position embeddings for `image_size` (same patch size, longer sequence): 2-D bicubic resize of the grid,
    class token kept, with the function the model itself uses at other resolutions."""
    model, state = weights.model, dict(weights.state)
    if image_size % model.patch_size:
        raise WeightsError(f"--image-size {image_size} is not a multiple of the patch size {model.patch_size}")
    if model.pos_embed == "learned":
        old, new = model.image_size // model.patch_size, image_size // model.patch_size
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (new, new), (old, old), model.prefix_tokens)
    return Weights(model.replace(image_size=image_size), state)


def check_weights(weights: Weights, source: str) -> None:
    """Refuse weights that do not fit the model their description builds (a checkpoint whose tensors belong to
    another variant than it says, an incomplete or hand-edited file) before anything is written."""
    with torch.device("meta"):
        model = weights.model.build()
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.state.items()}
    problems = [f"{name} is missing" for name in expected if name not in found]
    problems += [
        f"{name} is {found[name]}, not {expected[name]}"
        for name in expected
        if name in found and found[name] != expected[name]
    ]
    problems += [f"{name} is unexpected" for name in found if name not in expected]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise WeightsError(
            f"{source}: the tensors do not fit the model it describes ({weights.model.summary()}): "
            f"{'; '.join(problems[:3])}{more}; is it a checkpoint of another variant, or damaged?"
        )


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state` into `model` by name; between a masked-patch model and a classifier only the ViT's tensors, with
    the `encoder.` prefix dropped or added. Parameters the state lacks, and a classifier of another shape, keep their
    initialisation. A learned position table of another grid is resized to the model's (2-D bicubic, class token
    kept), so a run can start at another resolution. Any other tensor of another shape means another variant: an
    error. Works on a model built under ZeRO-3 (each parameter is gathered, written by rank 0's copy and
    re-partitioned). Returns the names not loaded.
    """
    from deepspeed.runtime.zero import GatheredParameters  # here: importing DeepSpeed announces the accelerator

    names = dict(model.named_parameters())
    renamed = dict(state)
    model_prefix, state_prefix = (_encoder_prefix(named) for named in (names, state))
    if state_prefix != model_prefix:
        # Between a masked-patch model and a classifier only the ViT carries over: the one's patch head and [mask]
        # token and the other's classifier are different things even where name and shape agree (512 classes).
        renamed = {
            model_prefix + name.removeprefix(state_prefix): tensor
            for name, tensor in state.items()
            if name.startswith(state_prefix)
        }
    prefix_tokens = 1 if {"cls_token", "encoder.cls_token"} & names.keys() else 0
    not_loaded, mismatched = [], []
    for name, parameter in names.items():
        tensor = renamed.get(name)
        shape = tuple(getattr(parameter, "ds_shape", parameter.shape))
        if tensor is not None and tuple(tensor.shape) != shape and name.endswith("pos_embed"):
            tensor = _resized_positions(tensor, shape, prefix_tokens, source)
        if tensor is None or tuple(tensor.shape) != shape:
            not_loaded.append(name)
            if tensor is not None and not name.rsplit(".", 1)[0].endswith("head"):  # classifiers may differ
                mismatched.append(f"{name} is {tuple(tensor.shape)}, the model's {shape}")
            continue
        with GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            parameter.copy_(tensor.to(parameter.dtype))
    if len(not_loaded) == len(names):
        raise WeightsError(f"{source}: no tensor matches the model; is it a checkpoint of the same variant?")
    if mismatched:
        raise WeightsError(
            f"{source}: another variant than this run's model ({'; '.join(mismatched[:2])}); "
            "set model.variant (and width, depth, ...) to those of the checkpoint"
        )
    if not_loaded:
        log.info("%s: kept the initial values of %s", source, ", ".join(not_loaded))
    return not_loaded


def _encoder_prefix(names: Iterable[str]) -> str:
    """Where the ViT's tensors are: under "encoder." in a masked-patch model, at the top in a classifier."""
    return "encoder." if any(name.startswith("encoder.") for name in names) else ""


def _resized_positions(table: torch.Tensor, shape: tuple[int, ...], prefix_tokens: int, source: str) -> torch.Tensor:
    """A learned position table resized to the model's square grid; unchanged (so reported as another variant) when
    the widths differ or either table is not a square grid after the class token."""
    old, new = (math.isqrt(n - prefix_tokens) for n in (table.shape[1], shape[1]))
    if table.shape[-1] != shape[-1] or old**2 != table.shape[1] - prefix_tokens or new**2 != shape[1] - prefix_tokens:
        return table
    log.info("%s: position embeddings resized from a %dx%d to a %dx%d grid", source, old, old, new, new)
    return resize_pos_embed(table, (new, new), (old, old), prefix_tokens)
