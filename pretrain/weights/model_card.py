"""The model card (`README.md`) of a transformers export: what whoever receives the folder needs to know about the
weights, with the Hugging Face metadata header that `huggingface_hub.ModelCard.load` reads.

From a trainer checkpoint the card names the pre-training data, the objective, the steps and images seen, the
training resolution and the last evaluation (all from the checkpoint's trainer.json); from another format it says that
the source did not record them. The licence field is left empty for the user: it depends on the data, which we do not
know. URLs are written with any user or password part masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from data_pipeline.storage import masked_urls
from pretrain.weights.model_weights import Weights

OBJECTIVES = {"supervised": "supervised classification", "masked_patch_prediction": "masked patch prediction"}


def model_card(weights: Weights, source: str, record: dict[str, Any] | None) -> str:
    """The card's text for `weights` converted from `source`; `record` is the trainer.json of a trainer checkpoint."""
    model = weights.model
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification" if model.num_classes else "image-feature-extraction",
        "tags": ["vision-transformer", "vit-pretrain"],
        "license": "",
    }
    rows = [("architecture", f"ViT, {model.summary()}"), ("converted from", masked_urls(source))]
    if record is None:
        rows.append(("training", "not recorded in the source (not a trainer checkpoint)"))
        title = "Vision Transformer"
    else:
        config, evaluation = record["config"], record.get("last_eval")
        data = masked_urls(config["data"]["train"])
        metadata["datasets"] = [data]
        metadata["vit_pretrain"] = {
            "objective": config["objective"]["type"],
            "steps": record["step"],
            "images_seen": record["samples_seen"],
            "image_size": config["model"]["image_size"],
            "last_eval": evaluation,
        }
        rows += [
            ("pre-training data", data),
            ("objective", OBJECTIVES.get(config["objective"]["type"], config["objective"]["type"])),
            ("steps", f"{record['step']} ({record['samples_seen']} images)"),
            ("training resolution", f"{config['model']['image_size']} px"),
            ("last evaluation", _evaluation(evaluation, config["data"].get("val"))),
        ]
        title = config["run"]["name"]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n# {title}\n\n"
        "A Vision Transformer trained with vit-pretrain and written for transformers by `convert-checkpoint`.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "Licence: fill in `license` above with the licence of these weights and of the data they were trained on.\n"
    )


def _evaluation(evaluation: dict[str, float] | None, val: str | None) -> str:
    if not evaluation:
        return "none recorded"
    metrics = ", ".join(f"{name} {value:.4f}" for name, value in evaluation.items() if name not in ("step", "images"))
    where = f" of {masked_urls(val)}" if val else ""
    return f"step {evaluation['step']}: {metrics} on {evaluation['images']:.0f} images{where}"


def write_model_card(weights: Weights, source: str, record: dict[str, Any] | None, out: Path) -> None:
    (out / "README.md").write_text(model_card(weights, source, record))
