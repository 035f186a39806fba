"""How a run's batch divides over its ranks: checked by the trainer at start-up, and before a job is submitted by
`cluster.render` and `vit-plan` (a job refused at start-up has often waited hours in a queue).

data.batch_size is global; the micro-batch is deepspeed.micro_batch_size (or global / world size); gradient
accumulation is what is left, and must be whole.
"""

from __future__ import annotations

from data_pipeline.commands import UserError
from pretrain.config.schema import Config


class BatchError(UserError):
    """The batch sizes do not divide over the ranks; the message names the fields and a fix."""


def batch_sizes(config: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient-accumulation steps) for `world_size` ranks."""
    total = config.data.batch_size
    micro = config.deepspeed.micro_batch_size
    if total % world_size:
        raise BatchError(
            f"data.batch_size {total} does not divide over {world_size} ranks; choose a batch that is a multiple of "
            f"{world_size}, or a number of ranks that divides {total}"
        )
    if micro is None:
        return total // world_size, 1
    per_rank = total // world_size
    if per_rank % micro:
        fitting = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
        raise BatchError(
            f"data.batch_size {total} is not a multiple of deepspeed.micro_batch_size {micro} x {world_size} "
            f"ranks; set deepspeed.micro_batch_size to {fitting} (or null: {per_rank} per rank) for {world_size} ranks"
        )
    return micro, per_rank // micro
