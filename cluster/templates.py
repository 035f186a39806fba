"""The job templates in cluster/slurm and cluster/k8s, one per `python -m cluster.render` target, and what the
renderers of both kinds of job (cluster.pretrain_jobs, cluster.build_jobs) do with them: a copy of an sbatch script
with its #SBATCH lines and defaults set, a run name as a Kubernetes object name, and the options that fill the
Kubernetes templates' image, workdir and s3_secret placeholders.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from data_pipeline.commands import UserError

ROOT = Path(__file__).resolve().parent
TEMPLATES = {
    "slurm": ROOT / "slurm" / "pretrain.sbatch",
    "pytorchjob": ROOT / "k8s" / "pytorchjob.yaml",
    "jobset": ROOT / "k8s" / "jobset.yaml",
    "slurm-build-shards": ROOT / "slurm" / "build_shards.sbatch",
    "k8s-build-shards": ROOT / "k8s" / "build-shards.yaml",
}


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


def add_kubernetes_options(parser: argparse.ArgumentParser, image_help: str) -> None:
    """--image, --workdir and --s3-secret: the container the Kubernetes templates run and its S3 credentials."""
    parser.add_argument("--image", help=image_help)
    parser.add_argument("--workdir", default="/workspace", help="the repository's folder inside the image")
    parser.add_argument(
        "--s3-secret",
        default="s3-credentials",
        help="Kubernetes Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the pods' environment",
    )
