"""Configs: every shipped file validates, recipes match the paper, mistakes get one-line errors that name the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.config.__main__ import main as config_cli
from pretrain.config.reference import render_reference
from pretrain.config.schema import MaskedPatchObjective

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.json")) + sorted((ROOT / "configs/experiment_mpp").glob("*.json"))


def test_configs_are_shipped() -> None:
    names = {path.name for path in SHIPPED}
    assert {
        "vit_h14_jft.json",
        "vit_l16_i21k.json",
        "vit_b16_i21k.json",
        "vit_b16_imagenet.json",
        "vit_b16_mpp_jft.json",
        "demo_digits.json",
        "tiny_cpu.json",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates_and_builds(path: Path) -> None:
    config = load_config(path)
    with torch.device("meta"):
        model = config.model.build()
    assert model.grid_size == (config.model.image_size // model.patch_size,) * 2


def test_h14_jft_recipe_is_the_papers() -> None:
    config = load_config(ROOT / "configs/vit_h14_jft.json")
    assert (config.model.variant, config.model.image_size, config.model.num_classes) == ("H/14", 224, 18291)
    assert config.model.representation_size == 1280 and config.model.dropout == 0.0
    assert config.objective.loss == "sigmoid" and config.model.head_bias_init == -10.0
    assert (config.optimizer.lr, config.optimizer.betas, config.optimizer.weight_decay) == (3e-4, (0.9, 0.999), 0.1)
    assert config.data.batch_size == 4096
    assert (config.schedule.epochs, config.schedule.warmup_steps, config.schedule.decay) == (14, 10_000, "linear")
    assert config.deepspeed.precision == "bf16" and config.deepspeed.zero_stage >= 1


@pytest.mark.parametrize(
    ("name", "lr", "weight_decay", "dropout", "decay", "clip"),
    [
        ("vit_b16_i21k.json", 1e-3, 0.03, 0.1, "linear", 1.0),
        ("vit_l16_i21k.json", 1e-3, 0.03, 0.1, "linear", 1.0),
        ("vit_b16_imagenet.json", 3e-3, 0.3, 0.1, "cosine", 1.0),
    ],
)
def test_other_recipes_are_the_papers(
    name: str, lr: float, weight_decay: float, dropout: float, decay: str, clip: float
) -> None:
    config = load_config(ROOT / "configs" / name)
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.model.dropout) == (lr, weight_decay, dropout)
    assert (config.schedule.decay, config.optimizer.grad_clip_norm, config.data.batch_size) == (decay, clip, 4096)


def test_masked_patch_recipe_is_the_papers() -> None:
    config = load_config(ROOT / "configs/vit_b16_mpp_jft.json")
    assert isinstance(config.objective, MaskedPatchObjective)
    assert (config.objective.mask_ratio, config.objective.mask_token_prob, config.objective.random_patch_prob) == (
        0.5,
        0.8,
        0.1,
    )
    assert (config.optimizer.lr, config.schedule.steps, config.schedule.decay) == (2e-4, 1_000_000, "cosine")
    assert config.schedule.warmup_steps == 10_000 and config.data.batch_size == 4096


def test_overrides_are_applied_and_type_checked() -> None:
    config = load_config(
        ROOT / "configs/tiny_cpu.json",
        [
            "optimizer.lr=0.5",
            "model.variant=S/16",
            "model.image_size=64",
            "deepspeed.zero_stage=3",
            "data.storage_options.endpoint_url=http://127.0.0.1:5000",
        ],
    )
    assert config.optimizer.lr == 0.5 and config.model.variant == "S/16" and config.deepspeed.zero_stage == 3
    assert config.data.storage_options == {"endpoint_url": "http://127.0.0.1:5000"}
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage: Input should be 0, 1, 2 or 3 \(got 5\)"):
        load_config(ROOT / "configs/tiny_cpu.json", ["deepspeed.zero_stage=5"])


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """`python -m pretrain.config ARGS`, in-process (a subprocess per case would mostly time torch's import)."""
    monkeypatch.chdir(ROOT)

    def run(*args: str) -> CliResult:
        code = config_cli([*args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def test_cli_process_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path, model={"patch_size": 15})
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.config", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: {path}: model.patch_size: 15 does not divide image_size 224; choose a patch size that "
        f"divides it or change model.image_size\n"
    )


def write_config(tmp_path: Path, **changes: dict) -> Path:
    data = json.loads((ROOT / "configs/vit_b16_imagenet.json").read_text())
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": {"patch_size": 15}}, "model.patch_size: 15 does not divide image_size 224"),
        ({"model": {"variant": "B/15"}}, "model.variant: 15 does not divide image_size 224"),
        ({"model": {"pach_size": 16}}, "model.pach_size: unknown key; did you mean 'patch_size'?"),
        ({"model": {"variant": "XL/16"}}, "model.variant: variant 'XL/16': unknown size 'XL'"),
        ({"model": {"num_heads": 5}}, "model.num_heads: 5 heads do not divide width 768"),
        ({"model": {"dropout": 1.5}}, "model.dropout: Input should be less than 1 (got 1.5)"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: Input should be a valid number"),
        ({"schedule": {"steps": 1000}}, "schedule.steps: set exactly one of schedule.steps and schedule.epochs"),
        (
            {"objective": {"loss": "sigmoid", "label_smoothing": 0.1}},
            "objective.label_smoothing: applies to the softmax loss only",
        ),
        ({"objective": {"type": "mae"}}, "objective.type: 'mae' is not an objective"),
        (
            {"deepspeed": {"micro_batch_size": 3000}},
            "deepspeed.micro_batch_size: 3000 does not divide data.batch_size 4096",
        ),
        ({"model": {"num_classes": 0}}, "model.num_classes: is 0 but the supervised objective needs a classifier"),
        ({"data": {"crop_scale": [0.9, 0.1]}}, "data.crop_scale: [0.9, 0.1] is not a range"),
    ],
)
def test_broken_config_gets_one_line_per_problem(
    run_cli: Callable[..., CliResult], tmp_path: Path, changes: dict, expected: str
) -> None:
    path = write_config(tmp_path, **changes)
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: ")
    assert expected in lines[0]


def test_every_problem_is_reported_at_once(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    path = write_config(tmp_path, model={"pool": "cls"}, optimizer={"lr": -1}, run={"nmae": "x"})
    lines = run_cli(str(path)).stderr.strip().splitlines()
    assert len(lines) == 3
    assert any("model.pool: Input should be 'token' or 'gap' (got \"cls\")" in line for line in lines)
    assert any("optimizer.lr: Input should be greater than 0 (got -1)" in line for line in lines)
    assert any("run.nmae: unknown key; did you mean 'name'?" in line for line in lines)


def test_missing_field_names_what_it_is(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    data = json.loads((ROOT / "configs/tiny_cpu.json").read_text())
    del data["data"]["batch_size"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(data))
    result = run_cli(str(path))
    assert result.returncode == 2
    assert "data.batch_size: required but missing; add it (Global batch size: images per optimizer step" in (
        result.stderr
    )


def test_unreadable_files_get_one_line(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "nope.json"))
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"error: {tmp_path / 'nope.json'}: no such config file; pass "
        f"the path of a JSON file such as configs/"
        f"vit_b16_imagenet.json",
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"variant": "B/16",}}')
    result = run_cli(str(bad))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: {bad}:1:30: invalid JSON: Expecting property name enclosed in double quotes"
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model:\n  variant: B/16\n")
    result = run_cli(str(yaml))
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"error: {yaml}:1:1: invalid JSON: Expecting value; configs are JSON (a run is data: see configs/*.json)",
    )


def test_bad_override_syntax_is_explained(run_cli: Callable[..., CliResult]) -> None:
    result = run_cli("configs/tiny_cpu.json", "--set", "optimizer.lr")
    assert result.returncode == 2
    assert "--set optimizer.lr: expected KEY.PATH=VALUE" in result.stderr
    result = run_cli("configs/tiny_cpu.json", "--set", "run.name.first=x")
    assert "run.name is a value, not a section" in result.stderr


def test_cli_prints_the_resolved_config(run_cli: Callable[..., CliResult]) -> None:
    result = run_cli("configs/tiny_cpu.json", "--set", "optimizer.lr=0.01")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["optimizer"]["lr"] == 0.01
    assert resolved["deepspeed"]["overrides"] == {}  # defaults are filled in
    assert resolved["objective"]["type"] == "supervised"


def test_field_reference_is_current() -> None:
    assert (ROOT / "configs/README.md").read_text() == render_reference(), "run `make configs-reference`"


def test_storage_credentials_are_masked_wherever_a_config_is_written(run_cli: Callable[..., CliResult], tmp_path: Path):
    from pretrain.finetune.loop import FinetuneConfig

    secrets = {"key": "AKIAFAKEKEY123", "secret": "fake-secret-9f8e", "client_kwargs": {"aws_session_token": "tok-77"}}
    options = {"endpoint_url": "http://127.0.0.1:9000", **secrets}
    path = write_config(tmp_path, data={"storage_options": options}, checkpoint={"storage_options": options})
    config = load_config(path)
    assert config.data.storage_options == options  # the run itself uses them
    written = [json.dumps(config.model_dump(mode="json")), run_cli(str(path)).stdout]  # trainer.json, vit-config
    tuning = FinetuneConfig(model="m", train="t", out="o", storage_options=options)
    written.append(json.dumps(tuning.model_dump(mode="json")))  # vit-finetune's results.json
    for text in written:
        assert "http://127.0.0.1:9000" in text
        assert not any(value in text for value in ("AKIAFAKEKEY123", "fake-secret-9f8e", "tok-77")), text
