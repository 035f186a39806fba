"""What a ViT is, as data: the architecture a set of weights belongs to, without any training setting.

`ModelDescription` is what the run config resolves to (`ModelConfig.description()`), what every checkpoint records
in its `model.json`, what the converter reads and writes in every format, and what the planner sizes. Training-only
settings (dropout, stochastic depth, the classifier's initial bias) are not part of it: they are passed to `build`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pretrain.model.variants import parse_variant
from pretrain.model.vit import Pool, PosEmbed, VisionTransformer


@dataclass(frozen=True)
class ModelDescription:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    """Pixels per patch side on the input image (for a hybrid: the ResNet stem's total stride)."""
    image_size: int = 224
    num_classes: int = 1000
    """Classifier outputs; 0 for none."""
    pool: Pool = "token"
    pos_embed: PosEmbed = "learned"
    representation_size: int | None = None
    """Width of the pre-logits layer; None for none."""
    stem_stages: tuple[int, ...] | None = None
    """Units per stage of a hybrid's ResNet stem; None for a plain ViT."""

    @classmethod
    def of_variant(cls, variant: str, **overrides: Any) -> ModelDescription:
        """The paper's `variant` ("B/16", "R50+B/16") with `overrides` of any field (e.g. a tiny width for tests)."""
        spec = parse_variant(variant)
        size = spec.size
        fields = {
            "width": size.width,
            "depth": size.depth,
            "mlp_dim": size.mlp_dim,
            "num_heads": size.num_heads,
            "patch_size": spec.patch_size,
            "stem_stages": spec.stem_stages,
        }
        return cls(**(fields | overrides))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelDescription:
        """The inverse of `to_json`; raises TypeError naming an unknown or missing field."""
        data = dict(data)
        if data.get("stem_stages") is not None:
            data["stem_stages"] = tuple(data["stem_stages"])
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.stem_stages is not None:
            data["stem_stages"] = list(self.stem_stages)
        return data

    def replace(self, **changes: Any) -> ModelDescription:
        return dataclasses.replace(self, **changes)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches in the sequence: the class token, when the model pools from it."""
        return 1 if self.pool == "token" else 0

    def build(self, **training: Any) -> VisionTransformer:
        """The model, with training-only settings (dropout, attention_dropout, drop_path, head_bias_init)."""
        return VisionTransformer(**dataclasses.asdict(self), **training)

    def summary(self) -> str:
        return (
            f"{self.width} wide, {self.depth} blocks, patch {self.patch_size}, {self.image_size} px, "
            f"{self.num_classes or 'no'} classes"
        )


FIELDS = frozenset(field.name for field in dataclasses.fields(ModelDescription))
"""The names of the architecture's fields; every other `VisionTransformer` argument is a training setting."""
