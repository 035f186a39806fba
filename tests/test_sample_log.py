"""The sample log's timeline across starts: a resume takes over from its step, a resume from an older checkpoint
abandons what later starts logged, and a line cut short by a kill is passed over."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.train.sample_log import SampleLog, read_sample_log


def batch(step: int) -> dict:
    return {"key": [f"s{step}a", f"s{step}b"], "epoch": torch.tensor([0, 0]), "valid": torch.tensor([True, True])}


def run(run_dir: Path, first_step: int, last_step: int, rank: int = 0) -> None:
    log = SampleLog(str(run_dir), first_step, rank, enabled=True)
    for step in range(first_step + 1, last_step + 1):
        log.write(step, batch(step), trained=step != 2)
    log.close()


def test_each_step_comes_from_the_last_start_before_it(tmp_path: Path):
    run(tmp_path, 0, 10)
    run(tmp_path, 6, 9)  # resumed at 6 on two ranks, killed at 9 while rank 1 was writing
    (tmp_path / "samples" / "from-step-00000006" / "rank-00001.jsonl").write_text('{"step": 7, "rank": 1, "tra')
    assert [r["step"] for r in read_sample_log(str(tmp_path))] == [1, 2, 3, 4, 5, 6, 7, 8, 9]

    run(tmp_path, 4, 5)  # resumed from an older checkpoint: what the start at 6 logged is abandoned
    records = read_sample_log(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1] == {"step": 2, "rank": 0, "trained": False, "keys": ["s2a", "s2b"], "epochs": [0, 0]}
    assert not (tmp_path / "samples" / "from-step-00000006").exists()


def test_nothing_is_written_unless_asked(tmp_path: Path):
    log = SampleLog(str(tmp_path), 0, 0, enabled=False)
    log.write(1, batch(1), trained=True)
    log.close()
    assert not (tmp_path / "samples").exists()
    assert read_sample_log(str(tmp_path)) == []
