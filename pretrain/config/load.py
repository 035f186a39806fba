"""Read a JSON config, apply `--set key.path=value` overrides, validate, and explain every problem in one line.

Overrides are applied to the parsed JSON before validation, so they are type-checked by the same pydantic models as
the file itself.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from data_pipeline.commands import UserError, json_or_text
from pretrain.config.schema import OBJECTIVES, Config, FieldError


class ConfigError(UserError):
    """Everything wrong with a config, one line per problem, each naming its JSON path and the fix."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"optimizer.lr=1e-3"` -> (["optimizer", "lr"], 0.001). Values are JSON where they parse, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text}: expected KEY.PATH=VALUE, e.g. --set optimizer.lr=1e-3"])
    return key.strip().split("."), json_or_text(raw)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` set; intermediate sections are created when missing."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, key in enumerate(path[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError([f"--set {text}: {where} is a value, not a section; set {where}=VALUE instead"])
        node[path[-1]] = value
    return data


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            [f"{path}: no such config file; pass the path of a JSON file such as configs/vit_b16_imagenet.json"]
        ) from None
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the config file ({error.strerror})"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        # YAML and TOML are what other trainers take; say that ours is JSON rather than only where parsing stopped
        hint = "; configs are JSON (a run is data: see configs/*.json)" if not str(path).endswith(".json") else ""
        raise ConfigError([f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}{hint}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the config must be a JSON object with sections model, data, ..."])
    return data


def validate(data: dict[str, Any]) -> Config:
    """Validate parsed JSON; raise ConfigError with one line per problem."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError([_describe(item, data) for item in error.errors()]) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config file; raise ConfigError naming the file with each problem."""
    try:
        return validate(apply_overrides(read_json(path), overrides))
    except ConfigError as error:
        prefix = f"{path}: "
        raise ConfigError([p if p.startswith(str(path)) else prefix + p for p in error.problems]) from None


def _strip_tags(loc: tuple[Any, ...]) -> list[str]:
    """Drop the union tag pydantic inserts after "objective" (("objective", "supervised", "loss") -> objective.loss)."""
    parts = [str(part) for part in loc]
    if len(parts) >= 2 and parts[0] == "objective" and parts[1] in OBJECTIVES:
        del parts[1]
    return parts


REPLACED_KEYS = {
    "logging.tensorboard": 'logging.trackers: list the trackers, e.g. "trackers": ["tensorboard"] (or [] for none)',
    "logging.csv": 'logging.trackers: list the trackers, e.g. "trackers": ["tensorboard", "csv"]',
}
"""Keys of earlier configs and what says the same now: their error names the new key instead of "unknown key"."""


def _section_model(parts: list[str], data: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model that owns the keys at `parts` (for suggesting the names a misspelt key could have meant)."""
    model: type[BaseModel] = Config
    node: Any = data
    for part in parts:
        node = node.get(part, {}) if isinstance(node, dict) else {}
        if model is Config and part == "objective":
            model = OBJECTIVES.get(node.get("type", "supervised") if isinstance(node, dict) else "", None)
        else:
            annotation = model.model_fields[part].annotation if part in model.model_fields else None
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            return None
    return model


def _describe(item: dict[str, Any], data: dict[str, Any]) -> str:
    parts = _strip_tags(item["loc"])
    kind = item["type"]
    error = item.get("ctx", {}).get("error")
    if isinstance(error, FieldError):
        return f"{'.'.join([*parts, error.field])}: {error}"
    path = ".".join(parts) or "(top level)"
    if kind == "extra_forbidden" and path in REPLACED_KEYS:
        return f"{path}: replaced by {REPLACED_KEYS[path]}"
    if kind == "extra_forbidden":
        owner = _section_model(parts[:-1], data)
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(parts[-1], allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{path}: unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        owner = _section_model(parts[:-1], data)
        field = owner.model_fields.get(parts[-1]) if owner else None
        about = f" ({field.description.split('.')[0].strip()})" if field and field.description else ""
        return f"{path}: required but missing; add it{about}"
    if kind == "union_tag_invalid":
        return f"{path}.type: {item['ctx']['tag']!r} is not an objective; choose one of {', '.join(OBJECTIVES)}"
    got = item.get("input")
    return f"{path}: {item['msg']} (got {json.dumps(got) if _is_json(got) else repr(got)})"


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
