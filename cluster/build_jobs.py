"""Building shards in parts, as jobs for `python -m cluster.render` (`slurm-build-shards`, `k8s-build-shards`).

build-shards' arguments come after `--` and are checked with its own parser, less the options the job sets itself
(--part, --num-parts, --finalize, --workers). Slurm gets a copy of build_shards.sbatch (a job array, one task per part,
then the same script as the finalize job); Kubernetes an indexed Job and its one-pod finalize Job. The commands that
submit them, in order, are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shlex
import string
from pathlib import Path, PurePosixPath

import yaml

from cluster.templates import TEMPLATES, add_kubernetes_options, kubernetes_name, sbatch_copy
from data_pipeline.build import cli as build_cli
from data_pipeline.commands import UserError, storage_options
from data_pipeline.storage import is_remote_url

BUILD_TARGETS = {
    "slurm-build-shards": "build-shards as a Slurm job array, one task per part, and its finalize job",
    "k8s-build-shards": "build-shards as a Kubernetes indexed Job, one pod per part, and its finalize Job",
}
SET_BY_THE_JOB = ("--part", "--num-parts", "--finalize")
"""build-shards options the build templates give themselves: one part per array task or index, then the finalize
step."""


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
        add_kubernetes_options(parser, "container image holding this repository (required)")
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
