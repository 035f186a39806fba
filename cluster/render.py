"""`python -m cluster.render TARGET ...`: a ready-to-submit job file from the templates in cluster/slurm and k8s.

Targets: pre-training (`slurm`, `pytorchjob`, `jobset`) and building shards in parts (`slurm-build-shards`,
`k8s-build-shards`).

Pre-training: the run config is validated first, and its batch against the number of ranks (a typo or a batch that
does not divide fails here, not after the job has waited in a queue). Slurm gets a copy of pretrain.sbatch with its
#SBATCH lines set (nodes, one task per GPU, GPUs and CPUs per node, time, partition, the preemption signal's lead
time) and the config as its default argument. Kubernetes gets the manifest with every placeholder filled, checked to
be complete YAML.

Building shards: build-shards' arguments come after `--` and are checked with its own parser, less the options the
job sets itself (--part, --num-parts, --finalize, --workers). Slurm gets a copy of build_shards.sbatch (a job array,
one task per part, then the same script as the finalize job); Kubernetes an indexed Job and its one-pod finalize Job.
The commands that submit them, in order, are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import shlex
import string
import sys
from pathlib import Path, PurePosixPath

import yaml

from data_pipeline.build import cli as build_cli
from data_pipeline.commands import UserError, reports_user_errors, storage_options
from data_pipeline.storage import is_remote_url
from pretrain.config import load_config
from pretrain.config.batch import BatchError, batch_sizes

ROOT = Path(__file__).resolve().parent
TEMPLATES = {
    "slurm": ROOT / "slurm" / "pretrain.sbatch",
    "pytorchjob": ROOT / "k8s" / "pytorchjob.yaml",
    "jobset": ROOT / "k8s" / "jobset.yaml",
    "slurm-build-shards": ROOT / "slurm" / "build_shards.sbatch",
    "k8s-build-shards": ROOT / "k8s" / "build-shards.yaml",
}
PRETRAIN_TARGETS = {
    "slurm": "sbatch script",
    "pytorchjob": "Kubeflow training operator PyTorchJob",
    "jobset": "JobSet",
}
BUILD_TARGETS = {
    "slurm-build-shards": "build-shards as a Slurm job array, one task per part, and its finalize job",
    "k8s-build-shards": "build-shards as a Kubernetes indexed Job, one pod per part, and its finalize Job",
}
SET_BY_THE_JOB = ("--part", "--num-parts", "--finalize")
"""build-shards options the build templates give themselves: one part per array task or index, then the finalize
step."""


def kubernetes_name(name: str) -> str:
    """A run name as a DNS-1123 label (lower case, digits and '-'), as Kubernetes object names must be."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50]
    if not label:
        raise UserError(f"--name {name!r}: no letters or digits to make a Kubernetes name from")
    return label


def sbatch_copy(template: Path, settings: dict[str, str], extra: list[str], lines: dict[str, str]) -> str:
    """The sbatch template with its `#SBATCH --KEY=` lines set from `settings`, `extra` directives added after the
    last one, and each of its lines that is a key of `lines` replaced by the value."""
    original = template.read_text().splitlines()
    missing = [line for line in lines if line not in original]
    if missing:  # the template was edited without this function: a bug, not the user's mistake
        raise RuntimeError(f"{template}: no line {missing[0]!r} to set")
    last_directive = max(n for n, line in enumerate(original) if line.startswith("#SBATCH "))
    rendered = []
    for n, line in enumerate(original):
        match = re.match(r"#SBATCH --([a-z-]+)=", line)
        if match and match.group(1) in settings:
            line = f"#SBATCH --{match.group(1)}={settings[match.group(1)]}"
        rendered.append(lines.get(line, line))
        if n == last_directive:
            rendered += [f"#SBATCH --{setting}" for setting in extra]
    return "\n".join(rendered) + "\n"


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


def spells(token: str, option: str) -> bool:
    """Whether build-shards' parser reads `token` as `option`: the option itself, `--option=VALUE`, or an
    abbreviation of it (argparse takes any unambiguous prefix)."""
    name = token.split("=", 1)[0]
    return name.startswith("--") and len(name) > 2 and option.startswith(name)


def parsed_build_arguments(line: list[str]) -> argparse.Namespace:
    """A build-shards command line parsed by build-shards' own parser; its complaint as a one-line UserError."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return build_cli.parse_args(line)
    except SystemExit as exit:
        if not exit.code:  # --help among them: build-shards' help was printed
            raise
        message = (captured.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
        raise UserError(f"build-shards arguments: {message.removeprefix('build-shards: error: ')}") from None


def checked_build_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """build-shards' arguments (after `--`) parsed as the jobs will parse them (a part's command line and the finalize
    step's), refused in one line where a job would fail after waiting in a queue."""
    given = args.build_args
    if not given:
        raise UserError(f"{args.target}: give build-shards' arguments after --, e.g. -- INPUT --output s3://bucket/out")
    for token in given:
        for option in SET_BY_THE_JOB:
            if spells(token, option):
                raise UserError(
                    f"{token}: the job sets --part, --num-parts and --finalize itself (one part per "
                    f"{'array task' if args.target == 'slurm-build-shards' else 'index'}, then the finalize step); "
                    "leave it out"
                )
        if spells(token, "--workers"):
            raise UserError(f"{token}: give the encoding processes per part (its CPUs) as --workers before --")
    if not any(spells(token, "--output") for token in given):
        raise UserError("build-shards needs --output: the folder or s3:// URL that every part writes to")
    if args.parts == 1:  # the whole build in one job
        lines = [given]
    else:
        parts = ["--num-parts", str(args.parts)]
        lines = [[*given, *parts, "--part", str(args.parts - 1)], [*given, *parts, "--finalize"]]
    build, *_ = [parsed_build_arguments(line) for line in lines]  # every line parsed: each job's complaint
    storage_options(build)  # a malformed --storage-option KEY=VALUE
    if args.target == "k8s-build-shards" and not is_remote_url(build.output):
        raise UserError(
            f"--output {build.output}: a folder inside each pod, which the other pods and the finalize step do not "
            "see; write to shared storage, e.g. s3://bucket/shards"
        )
    return build


def render_slurm_build(args: argparse.Namespace, name: str) -> str:
    settings = {
        "job-name": name,
        "cpus-per-task": str(args.workers),
        "time": args.time,
        "signal": f"TERM@{args.grace_seconds}",
    }
    extra = [f"partition={args.partition}"] if args.partition else []
    lines = {
        "default_args=()": f"default_args=({shlex.join(args.build_args)})",
        "num_parts=${NUM_PARTS:-}": f"num_parts=${{NUM_PARTS:-{args.parts}}}",
        "max_restarts=${MAX_RESTARTS:-10}": f"max_restarts=${{MAX_RESTARTS:-{args.backoff_limit}}}",
    }
    return sbatch_copy(TEMPLATES["slurm-build-shards"], settings, extra, lines)


def finalize_job(parts: dict) -> dict:
    """The parts Job as the finalize step: one pod without a completion index (so build_shards.sh finalizes) on one
    CPU, retried as a whole Job, since backoffLimitPerIndex and FailIndex are for indexed Jobs only."""
    job = copy.deepcopy(parts)
    job["metadata"]["name"] += "-finalize"
    spec = job["spec"]
    policy = spec["podFailurePolicy"]
    for rule in policy["rules"]:
        if rule["action"] == "FailIndex":
            # and exit 1, too many samples skipped in the whole dataset: the same again would say the same
            rule["action"], rule["onExitCodes"]["values"] = "FailJob", [1, 2]
    container = spec["template"]["spec"]["containers"][0]
    container["env"] = [variable for variable in container["env"] if variable["name"] != "WORKERS"]
    container["resources"]["requests"]["cpu"] = "1"
    job["spec"] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": spec["backoffLimitPerIndex"],
        "podFailurePolicy": policy,
        "template": spec["template"],
    }
    return job


def render_kubernetes_build(args: argparse.Namespace, name: str, parallelism: int) -> tuple[str, str]:
    """The parts Job and the finalize Job, each with its header."""
    template = TEMPLATES["k8s-build-shards"].read_text()
    # `$(NAME)` in a container's command is a reference to an environment variable; `$$` stands for one `$`
    build_args = [argument.replace("$", "$$") for argument in args.build_args]
    values = {
        "name": name,
        "image": args.image,
        "command": json.dumps(["bash", "cluster/k8s/build_shards.sh", *build_args]),
        "workdir": args.workdir,
        "parts": args.parts,
        "parallelism": parallelism,
        "workers": args.workers,
        "memory_per_part": args.memory_per_part,
        "s3_secret": args.s3_secret,
        "grace_seconds": args.grace_seconds,
        "backoff_limit": args.backoff_limit,
    }
    parts = yaml.safe_load(string.Template(template).substitute(values))
    header = "".join(line + "\n" for line in template.splitlines() if line.startswith("#"))
    finalize_header = (
        f"# The finalize step of Job {name}: cluster/k8s/build-shards.yaml as one pod without a completion index,\n"
        "# where build-shards --finalize checks every part and writes index.json, classes.json and errors.jsonl.\n"
        f"# Apply it once every part is complete:\n#   kubectl wait --for=condition=complete --timeout=-1s job/{name}\n"
    )
    return (
        header + yaml.safe_dump(parts, sort_keys=False),
        finalize_header + yaml.safe_dump(finalize_job(parts), sort_keys=False),
    )


def render_build(args: argparse.Namespace) -> int:
    for option, least in (("parts", 1), ("workers", 1), ("parallelism", 1), ("backoff_limit", 0)):
        value = getattr(args, option)
        if value is not None and value < least:
            raise UserError(f"--{option.replace('_', '-')} {value}: must be at least {least}")
    if args.target == "k8s-build-shards" and not args.image:
        raise UserError("k8s-build-shards needs --image (a container image holding this repository)")
    build = checked_build_arguments(args)
    folder = PurePosixPath(build.output.rstrip("/")).name
    name = args.name or (f"build-{folder}" if folder else "build-shards")
    parallelism = min(args.parallelism or args.parts, args.parts)
    at_once = "all at once" if parallelism == args.parts else f"{parallelism} at a time"
    sizes = f"{args.parts} part(s) x {args.workers} CPU(s), {at_once}"
    if args.target == "slurm-build-shards":
        out = args.out or f"{name}.sbatch"
        Path(out).write_text(render_slurm_build(args, name))
        array = f"0-{args.parts - 1}" + ("" if parallelism == args.parts else f"%{parallelism}")
        finalize = shlex.join(["--cpus-per-task=1", f"--job-name={name}-finalize", "--output=%x-%j.log", out])
        print(f"{out}: Slurm job array {name}, {sizes}, then its finalize job; submit both with:")
        print(f"  jid=$(sbatch --parsable --array={array} {shlex.quote(out)})")
        print(f"  sbatch --dependency=afterok:$jid {finalize}")
        return 0
    job_name = kubernetes_name(name)
    out = Path(args.out or f"{job_name}.yaml")
    finalize_out = out.with_name(f"{out.stem}-finalize{out.suffix}")
    parts_text, finalize_text = render_kubernetes_build(args, job_name, parallelism)
    out.write_text(parts_text)
    finalize_out.write_text(finalize_text)
    print(f"{out}, {finalize_out}: indexed Job {job_name}, {sizes}, then Job {job_name}-finalize; submit in order:")
    print(f"  kubectl apply -f {shlex.quote(str(out))}")
    print(
        f"  kubectl wait --for=condition=complete --timeout=-1s job/{job_name} && "
        f"kubectl apply -f {shlex.quote(str(finalize_out))}"
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
    parser.add_argument("--image", help="container image holding this repository (Kubernetes; required there)")
    parser.add_argument("--workdir", default="/workspace", help="the repository's folder inside the image")
    parser.add_argument(
        "--s3-secret",
        default="s3-credentials",
        help="Kubernetes Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the pods' environment",
    )
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


def add_build_options(parser: argparse.ArgumentParser, target: str) -> None:
    parser.add_argument("--parts", type=int, required=True, help="parts of the dataset; one array task (pod) each")
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help="CPUs per part, one build-shards encoding process each (default: %(default)s)",
    )
    parser.add_argument("--parallelism", type=int, help="parts running at once (default: all)")
    parser.add_argument("--name", help="job name (default: build-<last folder of --output>)")
    if target == "k8s-build-shards":
        parser.add_argument("--image", help="container image holding this repository (required)")
        parser.add_argument("--workdir", default="/workspace", help="the repository's folder inside the image")
        parser.add_argument(
            "--s3-secret",
            default="s3-credentials",
            help="Kubernetes Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the pods' environment",
        )
        parser.add_argument("--memory-per-part", default="16Gi", help="memory request per pod (default: %(default)s)")
    else:
        parser.add_argument("--time", default="48:00:00", help="time limit per start of a part (default: %(default)s)")
        parser.add_argument("--partition", help="partition (default: the cluster's default)")
    parser.add_argument(
        "--grace-seconds",
        type=int,
        default=120,
        help="seconds between SIGTERM (before the time limit, or an eviction) and the kill, for build-shards to stop "
        "cleanly (default: %(default)s)",
    )
    parser.add_argument(
        "--backoff-limit",
        type=int,
        default=10,
        help="retries of a part before it is failed (Slurm: requeues after exit 3 or the time limit; Kubernetes: "
        "failed pods per index) (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        help="output file (default: NAME.sbatch, or NAME.yaml and NAME-finalize.yaml; the finalize Job's file is "
        "named after this one)",
    )


BUILD_EPILOG = """\
build-shards' arguments follow --: INPUT, --output (shared by all parts: a shared file system on Slurm, s3:// or
another remote URL on Kubernetes) and any other option of build-shards (--help lists them), the same for every part
and the finalize step, e.g.

  python -m cluster.render {target} --parts 8 --workers 16 ... -- s3://bucket/images.parquet \\
      --output s3://bucket/shards --max-samples-per-shard 5000 --storage-option endpoint_url=https://s3.example
"""


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
