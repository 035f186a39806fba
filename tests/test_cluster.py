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
from imaging import image_folder
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
        "logging": {"every_steps": 10, "trackers": [], "peak_tflops": 1.0},  # no peak measured at start-up
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
    steps = 200  # preempted after step 10 is logged, it saves within a few steps; 200 leave a margin
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
            time.sleep(0.2)
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
    """(step saved, step at whose end its upload was complete) for each checkpoint uploaded in the background: seen
    complete at a step boundary, or waited for at the next save or the run's end (on a fast machine the steps can
    outrun the proxy's upload)."""
    written = {tag: int(tag[5:]) for tag in re.findall(r"checkpoint s3://\S+/(step-\d+) written", output)}
    uploaded = re.findall(r"checkpoint s3://\S+/(step-\d+) uploaded at step (\d+)", output)
    return [(written[tag], int(step)) for tag, step in uploaded if tag in written]


@pytest.mark.alone  # compares the steps during uploads with the others
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


BUILD_ARGS = ["/data/my images", "--output", "/shared/shards", "--max-samples-per-shard", "4"]


def rendered_build(target: str, out: Path, capsys, options: list[str], build_args: list[str]) -> list[str]:
    """Render a build-shards target into `out`; the submit commands it printed, in order."""
    assert render([target, *options, "--out", str(out), "--", *build_args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{out}"), printed
    return [line.strip() for line in printed[1:]]


def recording_stubs(folder: Path) -> dict[str, str]:
    """What a job script needs to run without a cluster: `srun` (runs the command after its options), `scontrol` and
    a PYTHON, each appending its name and arguments as a JSON line to CALLS; PYTHON exits with STUB_STATUS."""
    folder.mkdir()
    record = (
        "import json, os, sys\n"
        "with open(os.environ['CALLS'], 'a') as calls:\n"
        "    calls.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
    )
    bodies = {
        "srun": "start = next(n for n, a in enumerate(sys.argv) if n and not a.startswith('-'))\n"
        "os.execv(sys.argv[start], sys.argv[start:])\n",
        "scontrol": "",
        "python": "sys.exit(int(os.environ.get('STUB_STATUS', '0')))\n",
    }
    for name, body in bodies.items():
        (folder / name).write_text(f"#!{sys.executable}\n{record}{body}")
        (folder / name).chmod(0o755)
    return {
        "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(folder / "python"),
        "CALLS": str(folder / "calls.jsonl"),
    }


def run_job_script(command: list[str], stubs: dict[str, str], **variables: str) -> tuple[int, str, list[list[str]]]:
    """Run a job script with the stubs and `variables` as the scheduler's environment (none of ours leaks in): its
    exit status, output, and the stubs' calls."""
    calls = Path(stubs["CALLS"])
    calls.unlink(missing_ok=True)
    ours = ("SLURM_", "JOB_COMPLETION_INDEX", "NUM_PARTS", "MAX_RESTARTS", "WORKERS")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    result = subprocess.run(command, cwd=ROOT, env={**env, **stubs, **variables}, capture_output=True, text=True)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return result.returncode, result.stdout + result.stderr, recorded


def array_task(task: int, first: int, last: int, restarts: int = 0) -> dict[str, str]:
    """The variables Slurm gives task `task` of an array `first`-`last` (4 CPUs per task)."""
    return {
        "SLURM_JOB_ID": str(200 + task),
        "SLURM_ARRAY_JOB_ID": "100",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(first),
        "SLURM_ARRAY_TASK_MAX": str(last),
        "SLURM_ARRAY_TASK_COUNT": str(last - first + 1),
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_RESTART_COUNT": str(restarts),
    }


def test_rendered_build_shards_sbatch_sets_the_tasks_and_prints_the_array_then_the_finalize_job(tmp_path: Path, capsys):
    out = tmp_path / "build.sbatch"
    options = ["--parts", "3", "--workers", "4", "--partition", "cpu", "--time", "06:00:00", "--grace-seconds", "60"]
    commands = rendered_build("slurm-build-shards", out, capsys, [*options, "--backoff-limit", "2"], BUILD_ARGS)
    lines = out.read_text().splitlines()
    for line in (
        "#SBATCH --job-name=build-shards",  # build- and the last folder of --output
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --time=06:00:00",
        "#SBATCH --signal=TERM@60",
        "#SBATCH --requeue",
        "#SBATCH --partition=cpu",
        "default_args=('/data/my images' --output /shared/shards --max-samples-per-shard 4)",
        "num_parts=${NUM_PARTS:-3}",
        "max_restarts=${MAX_RESTARTS:-2}",
    ):
        assert line in lines, line
    # no --array in the file: the finalize job is the same file submitted without one
    assert not [line for line in lines if line.startswith("#SBATCH --array")]
    assert commands == [
        f"jid=$(sbatch --parsable --array=0-2 {out})",
        f"sbatch --dependency=afterok:$jid --cpus-per-task=1 --job-name=build-shards-finalize --output=%x-%j.log {out}",
    ]
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or "shellcheck"
    assert subprocess.run([shellcheck, str(out)], capture_output=True).returncode == 0

    commands = rendered_build("slurm-build-shards", out, capsys, [*options, "--parallelism", "2"], BUILD_ARGS)
    assert commands[0] == f"jid=$(sbatch --parsable --array=0-2%2 {out})"  # two parts at a time


def test_build_shards_sbatch_runs_its_part_requeues_a_stopped_one_and_finalizes(tmp_path: Path, capsys):
    """The rendered script and the template, run with the variables Slurm sets and stand-ins for srun, scontrol and
    Python: the build-shards command line of each array task and of the finalize job, and the requeues."""
    out = tmp_path / "build.sbatch"
    rendered_build("slurm-build-shards", out, capsys, ["--parts", "3", "--backoff-limit", "2"], BUILD_ARGS)
    stubs = recording_stubs(tmp_path / "stubs")
    module = ["-m", "data_pipeline.build.cli"]

    def part(k: int) -> list[str]:
        return ["python", *module, "--workers", "4", *BUILD_ARGS, "--num-parts", "3", "--part", str(k)]

    status, output, calls = run_job_script(["bash", str(out)], stubs, **array_task(1, 0, 2))
    assert status == 0, output
    assert calls == [
        ["srun", "--ntasks=1", "--cpus-per-task=4", stubs["PYTHON"], *part(1)[1:]],
        part(1),
    ]
    assert "(start 1): part 1 of 3, 4 worker(s)" in output
    # one part re-run by hand (sbatch --array=1): the rendered copy knows the number of parts
    assert run_job_script(["bash", str(out)], stubs, **array_task(1, 1, 1))[2][-1] == part(1)
    status, output, calls = run_job_script(["bash", str(out)], stubs, SLURM_JOB_ID="300", SLURM_CPUS_PER_TASK="1")
    assert status == 0 and calls[-1] == ["python", *module, *BUILD_ARGS, "--num-parts", "3", "--finalize"], output

    # stopped part-way (3) or by the time-limit signal (143): requeued while restarts remain; other failures are not
    for code in (3, 143):
        status, output, calls = run_job_script(["bash", str(out)], stubs, STUB_STATUS=str(code), **array_task(0, 0, 2))
        assert status == 0 and calls[-1] == ["scontrol", "requeue", "200"], output
        status, output, calls = run_job_script(
            ["bash", str(out)], stubs, STUB_STATUS=str(code), **array_task(0, 0, 2, restarts=2)
        )
        assert status == code and calls[-1][0] == "python", output
        assert f"stopped part-way (exit {code}) after 2 restart(s); not requeued" in output
    status, output, calls = run_job_script(["bash", str(out)], stubs, STUB_STATUS="2", **array_task(0, 0, 2))
    assert status == 2 and calls[-1][0] == "python"

    # the template by hand: the arguments after the script, the number of parts from a 0-(N-1) array or NUM_PARTS
    template = ["bash", str(ROOT / "cluster" / "slurm" / "build_shards.sbatch"), *BUILD_ARGS]
    assert run_job_script(template, stubs, **array_task(2, 0, 2))[2][-1] == part(2)
    status, output, calls = run_job_script(template, stubs, **array_task(1, 1, 1))
    assert status == 2 and not calls and "export NUM_PARTS=N" in output
    assert run_job_script(template, stubs, NUM_PARTS="3", **array_task(1, 1, 1))[2][-1] == part(1)
    status, output, calls = run_job_script(template, stubs, NUM_PARTS="2", **array_task(2, 0, 2))
    assert status == 2 and not calls and "the dataset has 2 part(s), 0 to 1" in output
    status, output, calls = run_job_script(template, stubs, SLURM_JOB_ID="300")
    assert status == 2 and not calls and "export NUM_PARTS=N" in output
    status, output, calls = run_job_script(template[:2], stubs, **array_task(0, 0, 2))
    assert status == 2 and not calls and output.startswith("usage: ")

    # one part is the whole build (build-shards takes --part and --finalize with two parts or more): nothing to finalize
    whole = ["python", *module, "--workers", "4", *BUILD_ARGS]
    assert run_job_script(template, stubs, **array_task(0, 0, 0))[2][-1] == whole
    status, output, calls = run_job_script(template, stubs, NUM_PARTS="1", SLURM_JOB_ID="300")
    assert status == 0 and not calls and "one part, built whole with its index.json; nothing to finalize" in output


def test_rendered_build_shards_jobs_validate_against_the_api_models(tmp_path: Path, capsys):
    out = tmp_path / "build.yaml"
    build_args = ["s3://bucket/price$list.parquet", "--output", "s3://bucket/shards/", "--storage-option", "anon=false"]
    options = [
        "--parts",
        "5",
        "--workers",
        "6",
        "--parallelism",
        "2",
        "--backoff-limit",
        "3",
        "--memory-per-part",
        "24Gi",
    ]
    image = ["--image", "registry.example/vit-pretrain:1", "--name", "ImageNet shards"]
    commands = rendered_build("k8s-build-shards", out, capsys, [*options, *image], build_args)
    parts, finalize = (yaml.safe_load(path.read_text()) for path in (out, tmp_path / "build-finalize.yaml"))
    assert problems_of(parts) == [] and problems_of(finalize) == []
    assert commands == [
        f"kubectl apply -f {out}",
        f"kubectl wait --for=condition=complete --timeout=-1s job/imagenet-shards && "
        f"kubectl apply -f {tmp_path / 'build-finalize.yaml'}",
    ]
    assert parts["metadata"]["name"] == "imagenet-shards" and finalize["metadata"]["name"] == "imagenet-shards-finalize"

    spec = parts["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 5, 2)
    assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec  # a failed part is retried on its own
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailIndex", "onExitCodes": {"containerName": "build-shards", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    # What the API server refuses beyond the schema: per-index limits and FailIndex outside an indexed Job, a
    # failure policy without restartPolicy Never.
    spec = finalize["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 3)
    assert "completionMode" not in spec and "backoffLimitPerIndex" not in spec
    assert [rule["action"] for rule in spec["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore"]
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [1, 2]
    for job, env, cpu in ((parts, {"NUM_PARTS": "5", "WORKERS": "6"}, "6"), (finalize, {"NUM_PARTS": "5"}, "1")):
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 120
        # `$` doubled: Kubernetes reads `$(NAME)` in a command as a variable and `$$` as one `$`
        doubled = build_args[0].replace("$", "$$")
        assert container["command"] == ["bash", "cluster/k8s/build_shards.sh", doubled, *build_args[1:]]
        # no JOB_COMPLETION_INDEX here: Kubernetes gives it to an indexed Job's pods, and without it is the finalize
        assert {variable["name"]: variable["value"] for variable in container["env"]} == env
        assert container["resources"]["requests"] == {"cpu": cpu, "memory": "24Gi"}
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    spec["backoffLimitPerIndx"] = 1  # a typo
    assert problems_of(finalize), "the validator must catch an unknown field"


def test_build_shards_container_command_builds_the_pods_part_or_finalizes(tmp_path: Path, capsys):
    """The rendered container commands, run with the environment each pod gets (an indexed Job's pods get
    JOB_COMPLETION_INDEX from Kubernetes) and a stand-in for Python: the build-shards command lines."""
    out = tmp_path / "build.yaml"
    build_args = ["s3://bucket/in.parquet", "--output", "s3://bucket/shards"]
    rendered_build("k8s-build-shards", out, capsys, ["--parts", "3", "--workers", "2", "--image", "i:1"], build_args)
    stubs = recording_stubs(tmp_path / "stubs")
    module = ["python", "-m", "data_pipeline.build.cli"]
    for path, index, expected in (
        (out, "2", [*module, "--workers", "2", *build_args, "--num-parts", "3", "--part", "2"]),
        (tmp_path / "build-finalize.yaml", None, [*module, *build_args, "--num-parts", "3", "--finalize"]),
    ):
        (container,) = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]["containers"]
        env = {variable["name"]: variable["value"] for variable in container["env"]}
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = index
        status, output, calls = run_job_script(container["command"], stubs, **env)
        assert status == 0 and calls == [expected], output
        # exec: build-shards is the container's main process, its exit status the pod's
        assert run_job_script(container["command"], stubs, STUB_STATUS="3", **env)[0] == 3

    # one part: the whole build in the indexed Job's one pod, nothing left for the finalize Job
    rendered_build("k8s-build-shards", out, capsys, ["--parts", "1", "--workers", "2", "--image", "i:1"], build_args)
    (container,) = yaml.safe_load(out.read_text())["spec"]["template"]["spec"]["containers"]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    status, output, calls = run_job_script(container["command"], stubs, JOB_COMPLETION_INDEX="0", **env)
    assert status == 0 and calls == [[*module, "--workers", "2", *build_args]], output
    status, output, calls = run_job_script(container["command"], stubs, **env)
    assert status == 0 and not calls and "nothing to finalize" in output


@pytest.mark.parametrize(
    ("target", "options", "build_args", "error"),
    [
        ("slurm-build-shards", ["--parts", "0"], BUILD_ARGS, "--parts 0: must be at least 1"),
        ("slurm-build-shards", ["--parts", "2", "--workers", "0"], BUILD_ARGS, "--workers 0: must be at least 1"),
        ("k8s-build-shards", ["--parts", "2", "--backoff-limit", "-1"], BUILD_ARGS, "--backoff-limit -1: must be at "),
        ("slurm-build-shards", ["--parts", "2"], None, "slurm-build-shards: give build-shards' arguments after --"),
        ("slurm-build-shards", ["--parts", "2"], ["/data/in", "--max-side", "384"], "build-shards needs --output"),
        ("slurm-build-shards", ["--parts", "2"], [*BUILD_ARGS, "--part", "1"], "--part: the job sets --part, "),
        ("slurm-build-shards", ["--parts", "2"], [*BUILD_ARGS, "--num-parts=2"], "--num-parts=2: the job sets "),
        (
            "k8s-build-shards",
            ["--parts", "2", "--image", "i:1"],
            ["s3://b/in", "--output", "s3://b/o", "--finalize"],
            "--finalize: the job sets --part, --num-parts and --finalize itself (one part per index, then",
        ),
        ("slurm-build-shards", ["--parts", "2"], [*BUILD_ARGS, "--fin"], "--fin: the job sets --part, "),
        ("slurm-build-shards", ["--parts", "2"], [*BUILD_ARGS, "--workers", "4"], "--workers: give the encoding "),
        (
            "slurm-build-shards",
            ["--parts", "2"],
            [*BUILD_ARGS, "--max-side", "0"],
            "build-shards arguments: --max-side must be at least 1",
        ),
        (
            "slurm-build-shards",
            ["--parts", "2"],
            [*BUILD_ARGS, "--max-sampels", "4"],
            "build-shards arguments: unrecognized arguments: --max-sampels 4",
        ),
        ("slurm-build-shards", ["--parts", "2"], [*BUILD_ARGS, "--storage-option", "anon"], "--storage-option anon: "),
        # what build-shards refuses on a part's command line, not on a one-machine one
        ("slurm-build-shards", ["--parts", "2"], [*BUILD_ARGS, "--retry-failed"], "build-shards arguments: "),
        ("k8s-build-shards", ["--parts", "2"], ["s3://b/in", "--output", "s3://b/o"], "k8s-build-shards needs --image"),
        (
            "k8s-build-shards",
            ["--parts", "2", "--image", "i:1"],
            BUILD_ARGS,
            "--output /shared/shards: a folder inside",
        ),
    ],
)
def test_render_refuses_what_the_build_jobs_would_fail_on_in_one_line(
    target: str, options: list[str], build_args: list[str] | None, error: str, tmp_path: Path, capsys
):
    separator = [] if build_args is None else ["--", *build_args]
    assert render([target, *options, "--out", str(tmp_path / "job"), *separator]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: {error}") and "\n" not in message, message
    assert not list(tmp_path.iterdir())


def output_files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def job_states(slurm: SlurmCluster, job: str) -> dict[str, str]:
    """JobState of a job, or of each task of an array job (as ARRAYID_TASK)."""
    states = {}
    for line in slurm.run("scontrol", "show", "job", "-o", job).splitlines():
        fields = dict(token.partition("=")[::2] for token in line.split())
        task = fields.get("ArrayTaskId")
        states[f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]] = fields["JobState"]
    return states


@pytest.mark.slow
def test_build_shards_array_and_finalize_job_on_slurm_give_the_one_machine_build(slurm, tmp_path: Path, capsys):
    """The rendered build-shards job array (3 parts, one CPU each) and its finalize job, submitted to the loopback
    Slurm cluster with the commands the render prints: the shards, index.json, classes.json, errors.jsonl and the
    build records are byte for byte those of build-shards on one machine."""
    images = tmp_path / "images"
    image_folder(images, {"cat": 12, "dog": 12, "eel": 12}, size=(96, 64))
    options = ["--max-samples-per-shard", "4", "--val-fraction", "0.2"]
    local = tmp_path / "local"
    build = [sys.executable, "-m", "data_pipeline.build.cli", str(images), "--output", str(local), *options]
    subprocess.run([*build, "--workers", "1"], cwd=ROOT, check=True, capture_output=True)

    jobs, out = tmp_path / "jobs", tmp_path / "parts"
    jobs.mkdir()
    script = jobs / "build.sbatch"
    commands = rendered_build(
        "slurm-build-shards",
        script,
        capsys,
        ["--parts", "3", "--workers", "1"],
        [str(images), "--output", str(out), *options],
    )
    submission = subprocess.run(
        ["bash", "-euc", "\n".join([*commands, 'echo "array $jid"'])],
        cwd=jobs,  # the jobs run (and log) in the submission folder
        env={**slurm.env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert submission.returncode == 0, f"{commands}\n{submission.stdout}{submission.stderr}"
    array = re.search(r"^array (\d+)$", submission.stdout, re.MULTILINE).group(1)
    finalize = re.search(r"Submitted batch job (\d+)", submission.stdout).group(1)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            tasks, final = job_states(slurm, array), job_states(slurm, finalize)[finalize]
            failed = [task for task, state in tasks.items() if state in ended and state != "COMPLETED"]
            if final in ended or failed:  # a failed part leaves the finalize job pending for ever
                break
            time.sleep(1)
    finally:
        subprocess.run(["scancel", array, finalize], env=slurm.env, capture_output=True)
    logs = "\n".join(f"== {path.name}\n{path.read_text()[-3000:]}" for path in sorted(jobs.glob("*.log")))
    assert tasks == {f"{array}_{k}": "COMPLETED" for k in range(3)} and final == "COMPLETED", f"{tasks} {final}\n{logs}"
    for k in range(3):
        assert f"part {k} of 3, 1 worker(s)" in (jobs / f"build-parts-{array}_{k}.log").read_text()
    assert "finalizing the build of 3 parts" in (jobs / f"build-parts-finalize-{finalize}.log").read_text()

    # every file, and in _build/ the shards' records; the rest of _build/ is each build's own bookkeeping (part
    # markers, locks)
    records = re.compile(r"_build/(train|val)-\d{6}\.json")

    def compared(output: Path) -> dict[str, bytes]:
        files = output_files(output)
        return {name: data for name, data in files.items() if not name.startswith("_build/") or records.fullmatch(name)}

    built, reference = compared(out), compared(local)
    assert len([name for name in reference if name.endswith(".tar")]) >= 6
    assert any(records.fullmatch(name) for name in reference)
    assert sorted(built) == sorted(reference)
    assert [name for name, data in reference.items() if built[name] != data] == []
