"""Pre-training jobs for `python -m cluster.render` (`slurm`, `pytorchjob`, `jobset`).

The run config is validated first, and its batch against the number of ranks (a typo or a batch that does not divide
fails here, not after the job has waited in a queue). Slurm gets a copy of pretrain.sbatch with its #SBATCH lines set
(nodes, one task per GPU, GPUs and CPUs per node, time, partition, the preemption signal's lead time) and the config as
its default argument. Kubernetes gets the manifest with every placeholder filled, checked to be complete YAML.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import yaml

from cluster.templates import TEMPLATES, add_kubernetes_options, kubernetes_name, sbatch_copy
from data_pipeline.commands import UserError
from pretrain.config import load_config
from pretrain.config.batch import BatchError, batch_sizes

PRETRAIN_TARGETS = {
    "slurm": "sbatch script",
    "pytorchjob": "Kubeflow training operator PyTorchJob",
    "jobset": "JobSet",
}


def render_slurm(args: argparse.Namespace, name: str) -> str:
    settings = {
        "job-name": name,
        "nodes": str(args.nodes),
        "ntasks-per-node": str(args.gpus_per_node),
        "time": args.time,
        "signal": f"USR1@{args.grace_seconds}",
    }
    extra = [f"gpus-per-node={args.gpus_per_node}", f"cpus-per-task={args.cpus_per_gpu}"]
    if args.partition:
        extra.append(f"partition={args.partition}")
    return sbatch_copy(TEMPLATES["slurm"], settings, extra, {'default_config=""': f'default_config="{args.config}"'})


def render_kubernetes(args: argparse.Namespace, name: str) -> str:
    template = TEMPLATES[args.target].read_text()
    command = ["bash", "cluster/k8s/launch.sh", args.config, *(f"--set={o}" for o in args.overrides)]
    values = {
        "name": name,
        "image": args.image,
        "command": json.dumps(command),
        "workdir": args.workdir,
        "nodes": args.nodes,
        "workers": args.nodes - 1,
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_node": args.cpus_per_gpu * args.gpus_per_node,
        "memory_per_node": args.memory_per_node,
        "shm_size": args.shm_size,
        "s3_secret": args.s3_secret,
        "grace_seconds": args.grace_seconds,
        "backoff_limit": args.backoff_limit,
    }
    manifest = yaml.safe_load(string.Template(template).substitute(values))
    if args.target == "pytorchjob" and args.nodes == 1:
        del manifest["spec"]["pytorchReplicaSpecs"]["Worker"]  # the operator refuses zero replicas
    header = "".join(line + "\n" for line in template.splitlines() if line.startswith("#"))
    return header + yaml.safe_dump(manifest, sort_keys=False)


def render_pretrain(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    world = args.nodes * args.gpus_per_node
    try:
        batch_sizes(config, world)  # what the trainer checks at start-up, before the job waits in a queue
    except BatchError as error:
        raise UserError(f"{args.config}: {error}") from None
    name = args.name or config.run.name
    job_name = name if args.target == "slurm" else kubernetes_name(name)
    if args.target == "slurm":
        text, out = render_slurm(args, job_name), args.out or f"{job_name}.sbatch"
        submit = f"sbatch {out}" + "".join(f" --set {o}" for o in args.overrides)
    else:
        text, out = render_kubernetes(args, job_name), args.out or f"{job_name}-{args.target}.yaml"
        submit = f"kubectl apply -f {out}"
    Path(out).write_text(text)
    print(
        f"{out}: {args.target} job {job_name}, {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {world} "
        f"ranks; submit with: {submit}"
    )
    return 0


def add_pretrain_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, required=True, help="nodes (one pod per node on Kubernetes)")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node; one rank each")
    parser.add_argument(
        "--config",
        required=True,
        help="run config, a path relative to the repository root (the job runs from there, in the image on Kubernetes)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, validated here and passed on to the job",
    )
    parser.add_argument("--name", help="job name (default: the config's run.name)")
    add_kubernetes_options(parser, "container image holding this repository (Kubernetes; required there)")
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per GPU, for data-loader workers")
    parser.add_argument("--memory-per-node", default="512Gi", help="memory request per pod (Kubernetes)")
    parser.add_argument("--shm-size", default="64Gi", help="/dev/shm size per pod (Kubernetes)")
    parser.add_argument(
        "--grace-seconds",
        type=int,
        default=300,
        help="seconds between the preemption signal and the kill, for the checkpoint",
    )
    parser.add_argument("--backoff-limit", type=int, default=10, help="restarts before the job is failed")
    parser.add_argument("--time", default="48:00:00", help="Slurm time limit per start of the job")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    parser.add_argument("--out", help="output file (default: NAME.sbatch or NAME-TARGET.yaml here)")
