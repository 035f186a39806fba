"""`make demo` on its built-in default: the configured model builds and trains one step's worth of gradients."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pretrain.demo import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_builds_the_configured_model_and_runs_backward(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["--config", "configs/demo_digits.json"]) == 0
    out = capsys.readouterr().out
    assert "demo_digits: Ti/4 at 32 px" in out
    loss = float(re.search(r"loss (\d+\.\d+)", out).group(1))
    assert loss == pytest.approx(math.log(10), abs=1e-3)  # zero-initialised head: uniform over 10 classes
    assert float(re.search(r"gradient norm (\d+\.\d+)", out).group(1)) > 0


def test_demo_reports_a_bad_config_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "configs/demo_digits.json", "--set", "model.image_size=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.variant: 4 does not divide image_size 30" in err
