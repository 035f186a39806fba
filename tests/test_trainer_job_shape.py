"""A one-rank run's checkpoint on S3 resumed on two ranks: per ZeRO stage and precision, the node converts it, the
run continues on its schedule, and epoch 0 is trained on once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import s3fs
from trainer_jobs import (
    check_epoch_delivered_once,
    finish,
    launch,
    loader_states,
    one_rank_in_process,
    step_noise,
    write_config,
)

from pretrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # every test starts a trainer: DeepSpeed's start-up alone takes seconds


# ZeRO 2 and 3 in bf16 go from two ranks to one in test_trainer.py; here from one to two: ZeRO 0 (no conversion),
# ZeRO 2 in bf16 (what most runs use) and ZeRO 3 in fp32
@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "bf16"), (2, "bf16"), (3, "fp32")], ids=["zero0-bf16", "zero2-bf16", "zero3-fp32"]
)
def test_one_rank_checkpoint_on_s3_resumes_on_two_ranks(
    stage: int, precision: str, digit_shards: Path, s3_digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A one-rank run checkpointing to S3, resumed from its step 32 (of epoch 0's 45) on two ranks: each rank
    downloads what it reads into its node's staging folder, the node converts (ZeRO 1-3), the run continues on the
    one-rank run's schedule, and the two ranks train on the rest of epoch 0 once."""
    from pretrain import run

    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "config.json",
        s3_digits,
        run_dir,
        deepspeed={"zero_stage": stage, "precision": precision, "micro_batch_size": 16},
        # saved at 32 (resumed from) and 64 only: the steps the test reads
        checkpoint={"dir": "s3://bucket/ckpt", "storage_options": s3_digits, "every_steps": 32, "keep_last": 2},
        logging={"sample_keys": True},
    )
    with one_rank_in_process(monkeypatch):
        assert run.main(["--config", str(config), "--set", f"checkpoint.staging_dir={tmp_path / 'one'}"]) == 0
    one_rank = {record["step"]: record for record in read_metrics(run_dir, "train")}
    staging = tmp_path / "two"
    code, output = finish(launch(config, "--resume", "step-00000032", "--set", f"checkpoint.staging_dir={staging}"))
    assert code == 0, output
    assert "step-00000032 at step 32 (saved on 1 ranks; now 2, 16 images per rank and 1 accumulation steps)" in output
    copy = staging / "universal" / "step-00000032"
    assert (f"universal copy {copy} converted in" in output) == (stage > 0), output
    if stage > 0:
        assert not copy.exists()  # removed once the run had saved on two ranks
    resumed = {record["step"]: record for record in read_metrics(run_dir, "train")}
    for step in (40, 48, 56, 64):
        assert resumed[step]["lr"] == pytest.approx(one_rank[step]["lr"], rel=1e-6)
    assert resumed[40]["loss"] <= one_rank[32]["loss"] + step_noise(one_rank)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_digits)
    assert fs.cat_file("bucket/ckpt/latest") == b"step-00000064"
    assert not list((staging).glob("step-*"))  # uploaded, then removed from the node
    final = loader_states(fs, "bucket/ckpt/step-00000064")
    check_epoch_delivered_once(run_dir, final, digit_shards, resumed_at=32, ranks=(1, 2))
