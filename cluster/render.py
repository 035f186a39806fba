"""`python -m cluster.render TARGET ...`: a ready-to-submit job file from the templates in cluster/slurm and k8s.

Targets: pre-training (`slurm`, `pytorchjob`, `jobset`) and building shards in parts (`slurm-build-shards`,
`k8s-build-shards`). This module is the command line only: the jobs are rendered by cluster.pretrain_jobs and
cluster.build_jobs, from the templates listed in cluster.templates.
"""

from __future__ import annotations

import argparse
import sys

from cluster.build_jobs import BUILD_EPILOG, BUILD_TARGETS, add_build_options, render_build
from cluster.pretrain_jobs import PRETRAIN_TARGETS, add_pretrain_options, render_pretrain
from data_pipeline.commands import reports_user_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.render", description=__doc__.splitlines()[0])
    targets = parser.add_subparsers(dest="target", required=True, metavar="target")
    subparsers = {}
    for target, what in PRETRAIN_TARGETS.items():
        subparsers[target] = targets.add_parser(
            target, help=f"pre-training: {what}", description=f"Pre-training: {what}"
        )
        add_pretrain_options(subparsers[target])
    for target, what in BUILD_TARGETS.items():
        subparsers[target] = targets.add_parser(
            target,
            help=what,
            description=what,
            usage=f"python -m cluster.render {target} --parts N [options] -- INPUT --output OUT [build-shards options]",
            epilog=BUILD_EPILOG.format(target=target),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_build_options(subparsers[target], target)
    argv = list(sys.argv[1:] if argv is None else argv)
    build_args: list[str] = []
    if argv and argv[0] in BUILD_TARGETS and "--" in argv:
        cut = argv.index("--")
        argv, build_args = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.build_args = build_args
    if args.target in PRETRAIN_TARGETS:
        if args.nodes < 1 or args.gpus_per_node < 1:
            subparsers[args.target].error("--nodes and --gpus-per-node must be at least 1")
        if args.target != "slurm" and not args.image:
            subparsers[args.target].error(f"{args.target} needs --image (a container image holding this repository)")
    return args


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return render_build(args) if args.target in BUILD_TARGETS else render_pretrain(args)


if __name__ == "__main__":
    sys.exit(main())
