"""`make demo`: digits to PNG folders to shards to a two-rank DeepSpeed run to a held-out accuracy.

The full demo (300 steps, top-1 >= 0.95) takes minutes and runs as `make demo`; here it runs end to end with a short
schedule, which checks every stage without waiting for the accuracy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pretrain.demos.digits import main, write_digits

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo_digits.json")


def test_digits_become_an_image_folder(tmp_path: Path) -> None:
    assert write_digits(tmp_path, size=32) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(d) for d in range(10)]
    image = Image.open(next((tmp_path / "3").iterdir()))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # white paper, dark ink


@pytest.mark.slow
def test_demo_runs_every_stage(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    # every stage as `make demo` runs it, on batches of 16 instead of 128: a bf16 step here is emulated (no AVX-512)
    finetune = json.loads((ROOT / "configs" / "finetune" / "demo_digits.json").read_text())
    (tmp_path / "finetune.json").write_text(json.dumps({**finetune, "batch_size": 16}))
    code = main(
        [
            "--config",
            CONFIG,
            "--set",
            "data.batch_size=16",
            "--set",
            "schedule.steps=4",
            "--set",
            "schedule.warmup_steps=1",
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "data.num_workers=0",
            "--set",
            "logging.peak_tflops=1",  # not measured at start-up: the test reads no utilisation figure
            "--finetune-config",
            "finetune.json",
            "--finetune-steps",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code in (0, 1), out  # 1: below the target accuracy, expected after 4 steps
    match = re.search(r"held-out top-1 (\d\.\d+) on 361 images \(target 0.95\); checkpoint (\S+)", out)
    assert match, out
    assert Path(match.group(2)).name == "step-00000004" and (Path(match.group(2)) / "trainer.json").exists()
    assert (tmp_path / "runs/demo_digits/shards/index.json").exists()
    assert re.search(r"pre-trained at 32 px: held-out top-1 \d\.\d+; fine-tuned at 48 px: held-out top-1 \d\.\d+", out)
    assert (tmp_path / "runs/demo_digits/finetuned/model.safetensors").exists()
    assert (tmp_path / "runs/demo_digits/analysis/attention_rollout.png").exists()


def test_demo_reports_a_bad_config_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", CONFIG, "--set", "model.image_size=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.variant: 4 does not divide image_size 30" in err
