"""The cluster templates run the trainer for real: Slurm on a one-node loopback cluster (preempted, requeued,
resumed), and multi-node launches through the same environment the templates set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from slurm_cluster import SlurmCluster, install_reason

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm" / "pretrain.sbatch"


def tiny_config(run_dir: Path, steps: int) -> Path:
    """A 2-block ViT on synthetic batches, fp32 ZeRO-1, checkpoints only when preempted and at the end."""
    config = {
        "run": {"name": run_dir.name, "output_dir": str(run_dir), "seed": 0},
        "model": {"variant": "Ti/8", "image_size": 32, "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 2,
                  "num_classes": 10},
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


def test_sbatch_job_checkpoints_on_the_preemption_signal_requeues_and_resumes_to_the_end(slurm, tmp_path: Path):
    run_dir = tmp_path / "run"
    steps = 400
    config = tiny_config(run_dir, steps)
    log = tmp_path / "job.log"
    submitted = slurm.run("sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
                          f"--chdir={ROOT}", f"--export=ALL,PYTHON={sys.executable}", str(SBATCH), str(config))
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
            if state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime":
                # Slurm holds a requeued job back for a while (about 2 minutes here); the test need not wait
                slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
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


def run_nodes(commands_and_envs: list[tuple[list[str], dict[str, str]]], timeout: float = 300) -> list[str]:
    """Start one process per "node", wait for all; their outputs (each must exit 0)."""
    processes = [subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for command, env in commands_and_envs]
    outputs = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        assert process.returncode == 0, output
        outputs.append(output)
    return outputs


def replicas(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["kind"] == "replicas"]
    return record


def test_two_slurm_nodes_on_loopback_train_together_to_identical_weights(tmp_path: Path):
    """What srun gives each task of a 2-node job with one task per node, plus what pretrain.sbatch exports."""
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, steps=30)
    port = str(free_port())
    nodes = [([sys.executable, "pretrain/run.py", "--config", str(config), "--resume", "auto"],
              {"SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
               "SLURM_NNODES": "2", "SLURM_NODEID": str(node), "SLURM_JOB_NODELIST": "node[0-1]",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for node in (0, 1)]
    outputs = run_nodes(nodes)
    assert "step 30/30" in outputs[0]
    record = replicas(run_dir)
    assert record["identical"] and len(record["sha256"]) == 2, record


def test_two_pytorchjob_pods_run_the_container_command_and_train_together(tmp_path: Path):
    """The environment Kubeflow's training operator injects into a master and a worker pod (nprocPerNode 1), with
    the master's service name replaced by loopback."""
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, steps=30)
    port = str(free_port())
    pods = [(["bash", "cluster/k8s/launch.sh", str(config)],
             {"PYTHON": sys.executable, "PYTHONUNBUFFERED": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
              "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(pod),
              "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(pod), "PET_NNODES": "2"}) for pod in (0, 1)]
    outputs = run_nodes(pods)
    assert "node 1 of 2: 1 process(es), rendezvous 127.0.0.1:" in outputs[1]
    assert "step 30/30" in outputs[0]
    record = replicas(run_dir)
    assert record["identical"] and len(record["sha256"]) == 2, record


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    scripts = sorted(ROOT.glob("cluster/**/*.sh")) + sorted(ROOT.glob("cluster/**/*.sbatch")) + [ROOT / ".ci/run"]
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
