"""Run configs: plain JSON files validated by the pydantic models in `schema.py`.

`load_config("configs/vit_b16_imagenet.json", ["optimizer.lr=1e-3"])` returns a frozen `Config` or raises
`ConfigError` with one line per problem.
"""

from pretrain.config.load import ConfigError, apply_overrides, load_config, validate
from pretrain.config.schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "load_config", "validate"]
