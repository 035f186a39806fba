"""`vit-plan --config configs/vit_h14_jft.json --gpus 256 --gpu-type H100`: will the run fit, how long will it take,
what will it cost, before a single GPU is booked.

Prints a short report of the plan pretrain/plan/planner.py computes (compute, time and cost, memory per ZeRO stage,
communication, data); with --json the same numbers as JSON. Exit status: 0, or 1 when the configured ZeRO stage does
not fit (the report says what would), 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from data_pipeline.commands import help_description, reports_user_errors
from pretrain.plan.gpus import DEFAULT_HEADROOM, GPUS, gpu_spec

if TYPE_CHECKING:
    from pretrain.config.schema import Config
    from pretrain.plan.planner import Hardware

GB = 1e9


# -- the report ----------------------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def report(plan: dict[str, Any]) -> str:
    run, hw, compute, time, memory, data = (plan[k] for k in ("run", "hardware", "compute", "time", "memory", "data"))
    epochs = f" ({run['epochs']:.3g} epochs)" if run["epochs"] else ""
    blocks, depth = run["checkpointed_blocks"], run["depth"]
    checkpointing = {0: "without activation checkpointing", depth: "with activation checkpointing"}.get(
        blocks, f"with activation checkpointing of {blocks} of {depth} blocks"
    )
    cost = f", ${time['cost']:,.0f} at ${time['price_per_gpu_hour']:g}/GPU-hour" if time["cost"] is not None else ""
    lines = [
        f"{run['name']}: ViT-{run['variant']} at {run['image_size']} px, {run['params'] / 1e6:.1f}M parameters, "
        f"ZeRO-{run['zero_stage']} {run['precision']} {checkpointing}",
        f"  {hw['gpus']} x {hw['gpu_type']} ({hw['peak_tflops']:g} TFLOP/s, {hw['memory_gb']:g} GB), "
        f"{data['nodes']} nodes of {hw['gpus_per_node']}; batch {run['global_batch']} = {run['micro_batch']} per GPU "
        f"x {hw['gpus']} GPUs x {run['gradient_accumulation']} accumulation",
        "compute",
        f"  forward {_si(compute['forward_flops_per_image'], 'FLOP')} per image; {run['steps']:,} steps, "
        f"{run['images_seen']:,} images{epochs}",
        f"  training {_si(compute['training_flops'], 'FLOP')} (3x forward); "
        f"{_si(compute['training_flops_with_recompute'], 'FLOP')} with activation checkpointing (4x); "
        f"{_si(compute['executed_flops'], 'FLOP')} as configured ({3 + blocks / depth:.3g}x)",
        f"time at {hw['mfu']:.0%} MFU",
        f"  {time['step_seconds']:.3g} s per step, {time['images_per_second']:,.0f} images/s; "
        f"{time['days']:.3g} days, {time['gpu_hours']:,.0f} GPU-hours{cost}",
        f"memory per GPU ({memory['usable_gb']:.1f} GB usable: {memory['headroom']:.0%} headroom)",
        "  activations per image: {stored:.1f} MB, {stored_with_checkpointing:.1f} MB with checkpointing, "
        "{stored_as_configured:.1f} MB as configured, + {working:.1f} MB working set".format(
            **memory["activations_mb_per_image"]
        ),
        "  ZeRO  states GB (DeepSpeed's)  buffers GB  peak GB  fits  max micro-batch (no ckpt / ckpt)",
    ]
    for s in memory["stages"]:
        estimate = f"({s['deepspeed_estimate_gb']:.2f})" if s["deepspeed_estimate_gb"] is not None else ""
        lines.append(
            f"  {s['stage']:>4}  {s['model_states_gb']:>9.2f} {estimate:>8}  {s['buffers_gb']:>10.2f}  "
            f"{s['peak_gb']:>7.2f}"
            f"  {'yes' if s['fits'] else 'NO':>4}  {s['max_micro_batch_without_checkpointing']:>6} / "
            f"{s['max_micro_batch_with_checkpointing']}"
        )
    comms = plan["communication"]
    lines += [
        "communication per GPU",
        f"  {comms['bytes_per_gpu_per_step'] / GB:.3g} GB per step: {comms['gb_per_second_per_gpu'] * 8:,.0f} "
        f"Gb/s to hide it behind compute ({comms['network_gbps_per_gpu']:g} Gb/s network)",
    ]
    lines.append("data")
    if data["read_gb_per_second"] is not None:
        epoch = f"{data['bytes_per_epoch'] / 1e12:.3g} TB per epoch, " if data["bytes_per_epoch"] else ""
        lines.append(
            f"  {epoch}{data['bytes_per_sample'] / 1e3:.0f} kB per image ({data['source']}); "
            f"read {data['read_gb_per_second']:.3g} GB/s, {data['read_gb_per_second_per_node']:.3g} GB/s "
            f"and {data['images_per_second_per_node']:,.0f} images/s per node"
        )
    else:
        lines.append(
            f"  {data['images_per_second_per_node']:,.0f} images/s per node; bytes unknown "
            f"({data['source']}): pass --bytes-per-sample"
        )
    lines += [f"warning: {warning}" for warning in plan["warnings"]]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu_names = ", ".join(f"{g.name} ({g.bf16_tflops:g} TFLOP/s, {g.memory_gb:g} GB)" for g in GPUS)
    parser = argparse.ArgumentParser(prog="vit-plan", description=help_description(__doc__))
    parser.add_argument("--config", required=True, help="run config (JSON)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, as for pretrain/run.py (repeatable)",
    )
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel ranks)")
    parser.add_argument("--gpu-type", default=None, help=f"one of {gpu_names}")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="share of the dense peak sustained, recomputation included (default: the config's logging.expected_mfu)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak per GPU, overrides the table")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="memory per GPU, overrides the table")
    parser.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        help=f"share of GPU memory kept free for the CUDA context, NCCL and fragmentation (default {DEFAULT_HEADROOM})",
    )
    parser.add_argument(
        "--network-gbps",
        type=float,
        default=400.0,
        help="inter-node bandwidth per GPU in Gbit/s, for the communication check (default 400)",
    )
    parser.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, for the cost")
    parser.add_argument(
        "--train-samples", type=int, default=None, help="training-set size (default: from data.train's index.json)"
    )
    parser.add_argument(
        "--bytes-per-sample",
        type=float,
        default=None,
        help="average stored bytes per image (default: from data.train's index.json)",
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the report")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpus_per_node < 1:
        parser.error("--gpus and --gpus-per-node must be at least 1")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: give a share of the peak in (0, 1], e.g. 0.45")
    if not 0 <= args.headroom < 1:
        parser.error(f"--headroom {args.headroom}: give a share of the memory in [0, 1), e.g. 0.1")
    if args.gpu_type is None and (args.peak_tflops is None or args.gpu_memory_gb is None):
        parser.error("give --gpu-type, or both --peak-tflops and --gpu-memory-gb")
    return args


def hardware_from_args(args: argparse.Namespace, config: Config) -> Hardware:
    from pretrain.plan.planner import Hardware, PlanError

    spec = gpu_spec(args.gpu_type) if args.gpu_type else None
    if spec is not None and config.deepspeed.precision == "fp32" and args.peak_tflops is None:
        raise PlanError(f"the table's {spec.name} peak is for bf16; an fp32 run needs --peak-tflops")
    return Hardware(
        gpus=args.gpus,
        gpus_per_node=min(args.gpus_per_node, args.gpus),
        name=spec.name if spec else "GPU",
        peak_tflops=args.peak_tflops or spec.bf16_tflops,  # type: ignore[union-attr]
        memory_gb=args.gpu_memory_gb or spec.memory_gb,  # type: ignore[union-attr]
        mfu=args.mfu or config.logging.expected_mfu,
        price_per_gpu_hour=args.price_per_gpu_hour,
        network_gbps=args.network_gbps,
    )


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed announces the accelerator it detected on stdout when imported; the report (or JSON) owns stdout
    with contextlib.redirect_stdout(sys.stderr):
        from pretrain.config.load import load_config
        from pretrain.plan.planner import make_plan, read_data_facts
    config = load_config(args.config, args.set)
    hardware = hardware_from_args(args, config)
    data = read_data_facts(config, args.train_samples, args.bytes_per_sample)
    plan = make_plan(config, hardware, data, args.headroom)
    print(json.dumps(plan, indent=2) if args.json else report(plan))
    return 0 if plan["memory"]["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
