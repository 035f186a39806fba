"""Strict validation of Kubernetes manifests against the API models published on PyPI, with no cluster.

- Core types (pods, jobs, volumes, ...) against the official `kubernetes` client's models, which carry every
  field's JSON name and type (`attribute_map`, `openapi_types`) and reject a missing required field or a value
  outside an enum when built; `batch/v1` Jobs whole;
- `kubeflow.org/v1` PyTorchJob against the Kubeflow training SDK (`kubeflow-training`, the same generated style);
- `jobset.x-k8s.io/v1alpha2` JobSet against the Kubeflow Trainer API models (`kubeflow-trainer-api`, pydantic),
  handing the Kubernetes types they embed to the core models.

Unknown fields are errors at every depth: a misspelt key is what a real API server would silently drop or refuse.
"""

from __future__ import annotations

import typing
from typing import Any

import kubeflow.training.models as training_models
import kubeflow_trainer_api.models as trainer_models
import kubernetes.client.models as core_models
from pydantic import BaseModel, TypeAdapter, ValidationError

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "object": (object,),
    "datetime": (str,),
}


def _classic(value: Any, type_name: str, path: str, problems: list[str]) -> None:
    if type_name.startswith("list["):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return
        for n, item in enumerate(value):
            _classic(item, type_name[5:-1], f"{path}[{n}]", problems)
        return
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping")
            return
        for key, item in value.items():
            _classic(item, inner, f"{path}.{key}", problems)
        return
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]) or (type_name == "int" and isinstance(value, bool)):
            problems.append(f"{path}: expected {type_name}, got {value!r}")
        return
    model = getattr(training_models, type_name, None) or getattr(core_models, type_name)
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a {type_name} mapping")
        return
    attributes = {json_name: attribute for attribute, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in attributes:
            problems.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            _classic(item, model.openapi_types[attributes[key]], f"{path}.{key}", problems)
    try:  # the generated constructors reject missing required fields and values outside an enum
        model(**{attributes[key]: item for key, item in value.items() if key in attributes})
    except (ValueError, TypeError) as error:
        problems.append(f"{path}: {type_name}: {error}")


def _pydantic(value: Any, annotation: Any, path: str, problems: list[str]) -> None:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        _pydantic(value, next(a for a in arguments if a is not type(None)), path, problems)
    elif origin is list:
        for n, item in enumerate(value if isinstance(value, list) else [value]):
            _pydantic(item, arguments[0], f"{path}[{n}]", problems)
    elif origin is dict:
        for key, item in (value if isinstance(value, dict) else {}).items():
            _pydantic(item, arguments[1], f"{path}.{key}", problems)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        name = annotation.__name__
        if name.startswith("IoK8s"):  # IoK8sApiBatchV1JobTemplateSpec -> kubernetes' V1JobTemplateSpec
            _classic(value, "V1" + name.rsplit("V1", 1)[1], path, problems)
            return
        fields = {field.alias or attribute: field for attribute, field in annotation.model_fields.items()}
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a {name} mapping")
            return
        problems += [f"{path}.{key}: unknown field of {name}" for key in value if key not in fields]
        problems += [
            f"{path}.{key}: required by {name}"
            for key, field in fields.items()
            if field.is_required() and key not in value
        ]
        for key, item in value.items():
            if key in fields:
                _pydantic(item, fields[key].annotation, f"{path}.{key}", problems)
    else:
        try:
            TypeAdapter(annotation).validate_python(item := value)
        except ValidationError as error:
            problems.append(f"{path}: {error.errors()[0]['msg']} (got {item!r})")


def problems_of(manifest: dict[str, Any]) -> list[str]:
    """Everything wrong with one manifest, one line each; empty when it is valid."""
    problems: list[str] = []
    kind = manifest.get("kind")
    if kind == "PyTorchJob" and manifest.get("apiVersion") == "kubeflow.org/v1":
        _classic(manifest, "KubeflowOrgV1PyTorchJob", kind, problems)
    elif kind == "JobSet" and manifest.get("apiVersion") == "jobset.x-k8s.io/v1alpha2":
        _pydantic(manifest, trainer_models.JobsetV1alpha2JobSet, kind, problems)
    elif kind == "Job" and manifest.get("apiVersion") == "batch/v1":
        _classic(manifest, "V1Job", kind, problems)
    elif kind == "Secret" and manifest.get("apiVersion") == "v1":
        _classic(manifest, "V1Secret", kind, problems)
    else:
        problems.append(f"{manifest.get('apiVersion')} {kind}: no schema here")
    return problems
