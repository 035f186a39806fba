"""The cluster templates run the trainer for real: Slurm on a one-node loopback cluster (preempted, requeued,
resumed), and multi-node launches through the same environment the templates set."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import s3fs
import yaml
from conftest import free_port
from faulty_proxy import FaultyProxy
from k8s_schema import problems_of
from slurm_cluster import SlurmCluster, install_reason

from cluster.render import main as render
from pretrain.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm" / "pretrain.sbatch"


def tiny_config(run_dir: Path, steps: int) -> Path:
    """A 2-block ViT on synthetic batches, fp32 ZeRO-1, checkpoints only when preempted and at the end."""
    config = {
        "run": {"name": run_dir.name, "output_dir": str(run_dir), "seed": 0},
        "model": {
            "variant": "Ti/8",
            "image_size": 32,
            "width": 64,
            "depth": 2,
            "mlp_dim": 128,
            "num_heads": 2,
            "num_classes": 10,
        },
        "data": {"train": "synthetic", "batch_size": 16, "num_workers": 0},
        "optimizer": {"lr": 1e-3},
        "schedule": {"steps": steps, "warmup_steps": 5, "decay": "cosine"},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "checkpoint": {"every_steps": 100_000, "keep_last": 2},
        "logging": {"every_steps": 10, "tensorboard": False},
    }
    path = run_dir.parent / f"{run_dir.name}.json"
    run_dir.mkdir(parents=True)
    path.write_text(json.dumps(config))
    return path


def train_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [record["step"] for record in records if record["kind"] == "train"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_sbatch_job_checkpoints_on_the_preemption_signal_requeues_and_resumes_to_the_end(slurm, tmp_path: Path):
    run_dir = tmp_path / "run"
    steps = 400
    config = tiny_config(run_dir, steps)
    log = tmp_path / "job.log"
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--output={log}",
        f"--chdir={ROOT}",
        f"--export=ALL,PYTHON={sys.executable}",
        str(SBATCH),
        str(config),
    )
    job = submitted.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 240
        while not train_steps(run_dir) and time.monotonic() < deadline:  # training has started: preempt it
            time.sleep(0.2)
        assert train_steps(run_dir), f"no training step within 240 s:\n{log.read_text() if log.exists() else ''}"
        slurm.run("scancel", "--signal=USR1", job)
        while time.monotonic() < deadline:
            state = slurm.job(job)
            if state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=slurm.env, capture_output=True)
    output = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", f"{state}\n{output}"

    preempted = [line for line in output.splitlines() if line.startswith("preempted: checkpoint")]
    assert len(preempted) == 1, output
    saved = int(preempted[0].split(" step ")[1].split()[0])
    assert 0 < saved < steps
    assert f"job {job}: preempted, checkpoint saved; requeueing" in output
    assert f"job {job} (start 2): 1 node(s), 2 task(s)" in output
    assert f"resumed from {run_dir / 'checkpoints'}/step-{saved:08d} at step {saved}" in output
    assert f"step {steps}/{steps}" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{steps:08d}"
    logged = train_steps(run_dir)
    assert logged[-1] == steps and logged == sorted(logged)  # the second start continued, it did not start over


def slurm_task(node: int, port: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The trainer as one task of a 2-node job with one task (one CPU) per node: what srun gives it, plus what
    pretrain.sbatch exports."""
    env = {
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node),
        "SLURM_JOB_NODELIST": "node[0-1]",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "OMP_NUM_THREADS": "1",
    }
    return [sys.executable, "pretrain/run.py", *args], env


def start_nodes(commands_and_envs: list[tuple[list[str], dict[str, str]]], logs: Path) -> list[subprocess.Popen]:
    """One process per "node", each writing to its own file in `logs`, not to a pipe: a pipe that is not read while
    another node is waited for fills up (64 KiB of warnings suffice), blocks that node's writes and so, through the
    collectives, every node."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for n, (command, env) in enumerate(commands_and_envs):
        with (logs / f"node{n}.log").open("w") as log:
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, text=True
                )
            )
    return processes


def run_nodes(commands_and_envs: list[tuple[list[str], dict[str, str]]], timeout: float = 300) -> list[str]:
    """Start one process per "node", wait for all; their outputs (each must exit 0)."""
    with tempfile.TemporaryDirectory() as logs:
        processes = start_nodes(commands_and_envs, Path(logs))
        deadline = time.monotonic() + timeout
        timed_out = ""
        try:
            codes = [process.wait(timeout=max(0.0, deadline - time.monotonic())) for process in processes]
        except subprocess.TimeoutExpired:
            timed_out = f"timed out after {timeout:.0f} s, every node killed\n"
            for process in processes:
                process.kill()
                process.wait()
            codes = [process.returncode for process in processes]
        outputs = [(Path(logs) / f"node{n}.log").read_text() for n in range(len(processes))]
    report = [
        f"== node {n} exited {code}:\n{output[-3000:]}"
        for n, (code, output) in enumerate(zip(codes, outputs, strict=True))
    ]
    assert codes == [0] * len(processes), timed_out + "\n".join(report)
    return outputs


def replicas(run_dir: Path) -> dict:
    (record,) = read_metrics(run_dir, "replicas")
    return record


def upload_windows(output: str) -> list[tuple[int, int]]:
    """(step saved, step at whose end its upload was complete) for each checkpoint uploaded in the background."""
    written = {tag: int(tag[5:]) for tag in re.findall(r"checkpoint s3://\S+/(step-\d+) written", output)}
    uploaded = re.findall(r"checkpoint s3://\S+/(step-\d+) uploaded at step (\d+)", output)
    return [(written[tag], int(step)) for tag, step in uploaded if tag in written]


@pytest.mark.slow
def test_two_slurm_nodes_train_together_and_checkpoint_to_s3_while_training(s3: dict, tmp_path: Path):
    """Two nodes on loopback (one task each, their own staging folders, one shared run folder) train one model and
    checkpoint to S3 through a proxy that takes 1.2 s per MB written. The first job is killed while step 60 uploads:
    `latest` stays at step 30. The second resumes from there and finishes: each object was uploaded exactly once,
    each rank's partitions downloaded only by its node, training went on during the uploads, and both ranks end
    with the same weights."""
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, steps=90)
    store = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    with FaultyProxy(s3["endpoint_url"], every=0, write_seconds_per_mb=1.2) as proxy:
        sections = json.loads(config.read_text())
        options = {**s3, "endpoint_url": proxy.url}
        sections["checkpoint"] = {"dir": "s3://bucket/ckpt", "storage_options": options, "every_steps": 30}
        sections["logging"]["every_steps"] = 1
        config.write_text(json.dumps(sections))

        def job() -> list[tuple[list[str], dict[str, str]]]:
            port = str(free_port())
            staging = [f"checkpoint.staging_dir={tmp_path / f'node{node}'}" for node in (0, 1)]
            return [slurm_task(node, port, "--config", str(config), "--set", staging[node]) for node in (0, 1)]

        first = start_nodes(job(), tmp_path / "first")
        deadline = time.monotonic() + 180
        while not any("step-00000060" in key for key in proxy.uploads):
            assert all(p.poll() is None for p in first) and time.monotonic() < deadline, "no upload of step 60"
            time.sleep(0.02)
        for process in first:
            process.kill()
            process.wait()
        assert store.cat_file("bucket/ckpt/latest") == b"step-00000030"
        proxy.uploads.clear()
        proxy.downloads.clear()
        outputs = run_nodes(job())
    assert "resumed from s3://bucket/ckpt/step-00000030 at step 30" in outputs[0]
    assert store.cat_file("bucket/ckpt/latest") == b"step-00000090"
    written = {key: count for key, count in proxy.uploads.items() if "/step-" in key}
    assert set(written.values()) == {1}, written
    assert set(store.find("bucket/ckpt/step-00000090")) <= set(written)
    read = {key.rsplit("/", 1)[-1]: n for key, n in proxy.downloads.items() if "step-00000030/" in key}
    assert read["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == read["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1
    assert read["rng-rank0.pt"] == read["rng-rank1.pt"] == 1 and read["mp_rank_00_model_states.pt"] == 2
    assert not list((tmp_path / "node0").glob("step-*")) and not list((tmp_path / "node1").glob("step-*"))

    # the steps while an upload ran (not the step after the save, which wrote the files, nor the one after the
    # commit) against the job's other steps
    step_s = {record["step"]: record["step_s"] for record in read_metrics(run_dir, "train") if record["step"] > 30}
    windows = upload_windows(outputs[0])
    assert windows and windows[0][0] == 60 and windows[0][1] >= 63, outputs[0][-6000:]
    during = [step_s[n] for saved, done in windows for n in range(saved + 2, done + 1)]
    busy = {n for saved, done in windows for n in range(saved + 1, done + 2)}
    others = [seconds for n, seconds in step_s.items() if n not in busy and n > 31]
    assert statistics.median(during) <= 1.5 * statistics.median(others), (during, others)
    record = replicas(run_dir)
    assert record["identical"] and len(record["sha256"]) == 2, record


def rendered(target: str, tmp_path: Path, *options: str) -> dict:
    out = tmp_path / f"{target}.yaml"
    assert render([target, *options, "--image", "registry.example/vit-pretrain:1", "--out", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def containers(manifest: dict) -> list[dict]:
    if manifest["kind"] == "PyTorchJob":
        specs = manifest["spec"]["pytorchReplicaSpecs"].values()
        return [c for spec in specs for c in spec["template"]["spec"]["containers"]]
    jobs = manifest["spec"]["replicatedJobs"]
    return [c for job in jobs for c in job["template"]["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("target", ["pytorchjob", "jobset"])
def test_rendered_manifests_validate_against_the_published_api_models(target: str, tmp_path: Path):
    for nodes in (1, 4):
        manifest = rendered(
            target,
            tmp_path,
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            "8",
            "--config",
            "configs/vit_h14_jft.json",
            "--set",
            "optimizer.lr=1e-4",
        )
        assert problems_of(manifest) == [], manifest
        assert manifest["metadata"]["name"] == "vit-h14-jft"  # run.name as a DNS label
        for container in containers(manifest):
            assert container["command"] == [
                "bash",
                "cluster/k8s/launch.sh",
                "configs/vit_h14_jft.json",
                "--set=optimizer.lr=1e-4",
            ]
            assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
            assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        if target == "pytorchjob":
            replicas = {role: spec["replicas"] for role, spec in manifest["spec"]["pytorchReplicaSpecs"].items()}
            assert replicas == ({"Master": 1} if nodes == 1 else {"Master": 1, "Worker": 3})
            assert manifest["spec"]["runPolicy"]["backoffLimit"] == 10
        else:
            job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
            assert job["parallelism"] == job["completions"] == nodes and job["completionMode"] == "Indexed"
    manifest["spec"]["replicatedJob" if target == "jobset" else "runPolicy"] = {"backofLimit": 1}  # typos
    assert problems_of(manifest), "the validator must catch an unknown field"


def test_render_refuses_a_bad_config_in_one_line(tmp_path: Path, capsys):
    assert (
        render(
            [
                "slurm",
                "--nodes",
                "1",
                "--gpus-per-node",
                "8",
                "--config",
                "configs/vit_h14_jft.json",
                "--set",
                "model.image_size=225",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: configs/vit_h14_jft.json: model.") and "\n" not in error
    assert not (tmp_path / "x").exists()
    # the README's command with a micro-batch the trainer would refuse on 256 ranks
    command = ["slurm", "--nodes", "32", "--gpus-per-node", "8", "--config", "configs/vit_h14_jft.json"]
    assert render([*command, "--set", "deepspeed.micro_batch_size=64", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: configs/vit_h14_jft.json: data.batch_size 4096 is not a multiple of deepspeed.micro_batch_size 64 x "
        "256 ranks; set deepspeed.micro_batch_size to 16 (or null: 16 per rank) for 256 ranks"
    )
    assert not (tmp_path / "x").exists()
    assert render([*command, "--out", str(tmp_path / "x")]) == 0


def test_rendered_sbatch_sets_the_allocation_and_the_default_config(tmp_path: Path):
    out = tmp_path / "job.sbatch"
    assert (
        render(
            [
                "slurm",
                "--nodes",
                "4",
                "--gpus-per-node",
                "8",
                "--config",
                "configs/vit_h14_jft.json",
                "--partition",
                "gpu",
                "--grace-seconds",
                "600",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@600",
        "#SBATCH --job-name=vit_h14_jft",
        'default_config="configs/vit_h14_jft.json"',
    ):
        assert line in text.splitlines(), line
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or "shellcheck"
    assert subprocess.run([shellcheck, str(out)], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pytorchjob", "jobset"])
def test_two_pods_run_the_rendered_container_command_and_train_together(target: str, tmp_path: Path):
    """The rendered container command, run as two local processes with the environment each pod gets: for a
    PyTorchJob what Kubeflow's training operator injects (master and worker, nprocPerNode 1); for a JobSet the
    manifest's own variables and the index Kubernetes gives an indexed Job's pods. The pods' DNS names are replaced
    by loopback."""
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, steps=30)
    manifest = rendered(target, tmp_path, "--nodes", "2", "--gpus-per-node", "1", "--config", str(config))
    container = containers(manifest)[0]
    port = str(free_port())
    if target == "pytorchjob":
        pods = [
            {
                "PYTHONUNBUFFERED": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "2",
                "RANK": str(pod),
                "PET_NPROC_PER_NODE": manifest["spec"]["nprocPerNode"],
                "PET_NODE_RANK": str(pod),
                "PET_NNODES": "2",
            }
            for pod in (0, 1)
        ]
    else:
        declared = {variable["name"]: variable["value"] for variable in container["env"]}
        pods = [
            {**declared, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "JOB_COMPLETION_INDEX": str(pod)}
            for pod in (0, 1)
        ]
    # one core per "pod", as a pod's CPU limit would give it: two pods with a thread per core each would share 2 cores
    pod_share = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    outputs = run_nodes([(container["command"], {**env, **pod_share}) for env in pods])
    assert "node 1 of 2: 1 process(es), rendezvous 127.0.0.1:" in outputs[1]
    assert "step 30/30" in outputs[0]
    record = replicas(run_dir)
    assert record["identical"] and len(record["sha256"]) == 2, record


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    scripts = sorted(ROOT.glob("cluster/**/*.sh")) + sorted(ROOT.glob("cluster/**/*.sbatch")) + [ROOT / ".ci/run"]
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
