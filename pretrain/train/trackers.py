"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow, fed the records the console shows.

TensorBoard and CSV are DeepSpeed's monitors (engine_config.py turns them on) and metrics.jsonl is always written
(metrics.py); this module adds the two trackers users compare runs in. Only rank 0 opens them. Each gets every
record's numbers as `kind/name` at the record's step (`numbers`), and the resolved config once, as the run's
parameters. The ids of their runs are saved with every checkpoint (trainer.json), so a resumed run writes on in the
same W&B and MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from data_pipeline.commands import UserError
from data_pipeline.storage import masked_urls
from pretrain.config.schema import Config

INSTALLED_APART = ("wandb", "mlflow")
"""Trackers whose library is an optional extra: `pip install 'vit-pretrain[wandb]'`."""
MLFLOW_PARAMS_PER_CALL = 100  # MLflow's limit per log_batch
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


class TrackerError(UserError):
    """A tracker was asked for that cannot run here."""


def check_installed(trackers: list[str], field: str = "logging.trackers") -> None:
    """On every rank, before any model is built: a tracker whose library is missing is an error naming `field`."""
    for name in trackers:
        # mlflow-skinny (the client the extra installs) and the full mlflow package both provide the module
        if name in INSTALLED_APART and not _importable(name):
            raise TrackerError(
                f"{field}: {name} is not installed; pip install 'vit-pretrain[{name}]' or take it off the list"
            )


def _importable(module: str) -> bool:
    # found without importing it (W&B and MLflow take a second or two to import, on every rank)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it; a half-removed package
        return False


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record as trackers take them: `kind/name` (train/loss, eval/top1, fewshot/...)."""
    kind = record.get("kind", "train")
    return {
        f"{kind}/{name}": float(value)
        for name, value in record.items()
        if isinstance(value, int | float) and name != "step"
    }


class Tracker(Protocol):
    name: str
    run_id: str

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self, finished: bool) -> None: ...


class WandbRun:
    """A W&B run (online, or offline with WANDB_MODE=offline; the key and the rest from W&B's environment)."""

    name = "wandb"

    def __init__(self, config: Config, run_dir: str, run_id: str | None):
        import wandb

        self.run = wandb.init(
            settings=wandb.Settings(x_disable_meta=True),  # its metadata holds the command line, credentials and all
            project=config.logging.project,
            name=config.run.name,
            id=run_id,  # None: W&B makes one
            resume="allow",  # a saved id: W&B continues that run (steps it already has are not logged twice)
            dir=run_dir,
            config=config.model_dump(mode="json"),  # secrets in storage options are masked by the schema
        )
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, finished: bool) -> None:
        if not finished:
            self.run.mark_preempting()  # shown as preempted, not crashed, until the resumed run continues it
        self.run.finish()


class MlflowRun:
    """An MLflow run through the client API (no global active run): logging.mlflow_tracking_uri, else
    $MLFLOW_TRACKING_URI, else a file store in the run folder."""

    name = "mlflow"

    def __init__(self, config: Config, run_dir: str, run_id: str | None):
        from mlflow import MlflowClient

        self.client = MlflowClient(mlflow_uri(config.logging.mlflow_tracking_uri, run_dir))
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return  # the parameters are the first start's; trainer.json of each checkpoint records the config
        experiment = self.client.get_experiment_by_name(config.logging.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(config.logging.project)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=config.run.name).info.run_id
        self._log_params(flat(config.model_dump(mode="json")))

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:MLFLOW_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start : start + MLFLOW_PARAMS_PER_CALL])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def mlflow_uri(configured: str | None, run_dir: str) -> str:
    """Where MLflow logs: the configured URI, else $MLFLOW_TRACKING_URI, else a file store in the run folder."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None:
        return uri
    # MLflow 3 refuses file stores unless told; the run folder's needs no server, which is why it is the default
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(run_dir, "mlruns").absolute().as_uri()


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A config as MLflow parameters: dotted paths to JSON values (model.variant -> "B/16")."""
    params: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            params.update(flat(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return params


OPENERS = {"wandb": WandbRun, "mlflow": MlflowRun}


def open_trackers(config: Config, run_dir: str, saved_ids: dict[str, str]) -> list[Tracker]:
    """The configured W&B and MLflow runs on rank 0, continuing the runs of `saved_ids` (from a checkpoint)."""
    opened = []
    for name in config.logging.trackers:
        if name not in OPENERS:
            continue
        try:
            opened.append(OPENERS[name](config, run_dir, saved_ids.get(name)))
        except Exception as error:  # no W&B key, no MLflow server, a saved run the store no longer has
            raise TrackerError(
                f"logging.trackers: {name} could not start ({type(error).__name__}: {masked_urls(str(error))}); "
                f"fix its setup (key, server, logging.mlflow_tracking_uri) or take it off the list"
            ) from None
    return opened
