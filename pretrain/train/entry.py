"""Pre-train a ViT: `deepspeed pretrain/run.py --config configs/vit_h14_jft.json [--set k=v ...] [--resume auto]`.

The same script runs under `torchrun` and under `srun` (one task per device); see pretrain/train/distributed.py.
Errors a user can cause (config, data source, batch sizes, checkpoint place: every `UserError`) end the job before
training with one line on rank 0 and exit code 2. After a preemption signal the job saves a checkpoint and exits
with 75.
"""

from __future__ import annotations

import argparse
import os
import sys

from deepspeed.accelerator import get_accelerator

from data_pipeline.commands import USER_ERROR, UserError, configure_logging, report
from pretrain.config.load import load_config
from pretrain.train import distributed
from pretrain.train.host_memory import fix_mmap_threshold
from pretrain.train.trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pretrain/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (JSON), see configs/README.md")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (or latest): continue from the newest complete checkpoint if there is one (default); "
        "none: start afresh; or a checkpoint name such as step-00001000",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="with --resume none where a run's checkpoints already are: delete them and its metrics, start afresh",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    distributed.map_slurm_environment()
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        config = load_config(args.config, args.set)
        if config.deepspeed.return_freed_host_memory and get_accelerator().device_name() == "cpu":
            fix_mmap_threshold()  # before DeepSpeed and the model allocate
        placement = distributed.init()
        code = Trainer(config, placement, resume=args.resume, overwrite=args.overwrite).train()
    except UserError as error:
        code = report(error) if is_main else USER_ERROR
    # Not on an unexpected exception: another rank may still be inside a collective with this one.
    distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
